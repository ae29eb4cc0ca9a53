//! Policy from the registry's config entries, compiled for this sidecar
//! and applied live: [`intentions`] (who may call this service).
//! Decisions themselves are `meshwork_core::intentions`'s pure functions,
//! the same the registry answers with.

pub mod intentions;
