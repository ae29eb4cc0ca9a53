//! The Meshwork sidecar: the agent next to every service instance
//! ([`agent`]), its configuration ([`config`]), the admin listener
//! ([`admin`]), systemd notification ([`notify`]) and the discovery of
//! upstream endpoints ([`discovery`]) for the data plane, whose counters
//! [`telemetry`] renders; [`reload`] applies a changed config file without
//! a restart.
//!
//! The data plane, by phase, dependencies pointing down:
//! [`listener`] (bind, accept, serve HTTP/1.1 and HTTP/2, TCP splice,
//! drain) → [`http`] (one request: prepare, capture the body, pick, send,
//! decide on a retry, respond; errors to responses in `http::rescue`) →
//! [`upstream`] (clusters, endpoints, balancing, outlier ejection, dialling,
//! pooled HTTP/1.1 and HTTP/2 client connections).

pub mod admin;
pub mod agent;
pub mod config;
pub mod discovery;
pub mod http;
pub mod listener;
pub mod notify;
pub mod reload;
pub mod telemetry;
pub mod upstream;

/// A gRPC endpoint for a registry server (`HOST:PORT`), as every part of
/// the sidecar dials it: 2 s connect timeout, `TCP_NODELAY`.
pub(crate) fn registry_endpoint(addr: &str) -> Result<tonic::transport::Endpoint, String> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map(|e| {
            e.connect_timeout(std::time::Duration::from_secs(2))
                .tcp_nodelay(true)
        })
        .map_err(|e| format!("{addr}: {e}"))
}
