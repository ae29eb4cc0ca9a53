//! The REST API (axum), compatible with Consul's HTTP API for the parts
//! clients use. Handlers parse and validate, then call [`RegistryNode`];
//! errors map to responses in `error.rs` only.

pub mod error;
pub mod kv;
pub mod query;
pub mod status;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::Uri;
use axum::routing::{any, delete, get};
use tokio_util::sync::CancellationToken;

use crate::node::RegistryNode;
use error::ApiError;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub node: Arc<RegistryNode>,
    /// Ends blocking queries early on shutdown.
    pub shutdown: CancellationToken,
    pub node_name: Arc<str>,
    pub node_uuid: Arc<str>,
    pub node_raft_addr: String,
    pub datacenter: Arc<str>,
}

/// The REST router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/kv", any(kv::handle))
        .route("/v1/kv/", any(kv::handle))
        .route("/v1/kv/{*key}", any(kv::handle))
        .route("/v1/status/leader", get(status::leader))
        .route("/v1/status/peers", get(status::peers))
        .route(
            "/v1/operator/raft/configuration",
            get(status::raft_configuration),
        )
        .route("/v1/operator/raft/peer", delete(status::remove_peer))
        .route("/v1/agent/self", get(status::agent_self))
        .fallback(not_found)
        // The KV handler enforces its own limit with a clearer message;
        // this bounds every other body.
        .layer(DefaultBodyLimit::max(kv::MAX_VALUE_BYTES))
        .with_state(state)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no such endpoint: {}", uri.path()))
}
