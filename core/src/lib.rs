//! What both Meshwork binaries need and nothing heavier: the registry
//! server and the sidecar each link this crate, and the sidecar links
//! nothing of the server's (no Raft, storage, REST server or DNS).
//!
//! - [`health`]: check status and definitions as the catalog keeps them,
//!   and one run of an HTTP or TCP probe;
//! - [`duration`]: Go-style durations as Consul writes them;
//! - [`filter`]: Consul's filter expressions (service-resolver subsets);
//! - [`chain`]: Consul's discovery chain (router, splitter, resolver)
//!   compiled per called service;
//! - [`config_file`]: config-file errors, one line each with its line;
//! - [`backoff`]: the retry delays of every reconnect and retry loop;
//! - [`log_level`]: log filters within what the build compiled in;
//! - [`notify`]: systemd's readiness protocol;
//! - [`ratelimit`]: `service-defaults` `RateLimits`, parsed, and token buckets;
//! - [`prometheus`]: the text exposition format and a lock-free histogram;
//! - [`timestamp`]: RFC 3339 times as Consul writes them;
//! - [`frame`] and [`backup`]: the checksummed snapshot frame and the API
//!   backup archive built on it;
//! - [`intentions`]: Consul service-intentions entries validated, compiled
//!   and evaluated (connection and request decisions);
//! - [`http_path`]: request paths normalised as L7 intentions match them;
//! - [`ingress`]: the `ingress-gateway` entry's listeners, checked.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod backup;
pub mod chain;
pub mod config_file;
pub mod duration;
pub mod entries;
pub mod filter;
pub mod frame;
pub mod health;
pub mod http_path;
pub mod ingress;
pub mod intentions;
pub mod jwt_provider;
pub mod log_level;
pub mod notify;
pub mod prometheus;
pub mod ratelimit;
pub mod timestamp;
pub mod upstream_defaults;
