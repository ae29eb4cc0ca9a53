//! Policy from the registry's config entries, compiled for this sidecar
//! and applied live: [`intentions`] (who may call this service),
//! [`ratelimit`] (how often) and [`chain`] (where its outbound HTTP calls go: routes, splits, subsets,
//! failover). Decisions themselves are `meshwork_core`'s pure functions,
//! the same the registry validates and answers with.

pub mod chain;
pub mod intentions;
pub mod ratelimit;
