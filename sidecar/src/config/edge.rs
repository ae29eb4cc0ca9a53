//! A gateway listener's edge settings as configured: the entry's policy,
//! the providers it names and the gateway's own settings (the live edge is
//! `crate::gateway::edge`).

use std::sync::Arc;

use meshwork_core::ingress::Edge as EdgePolicy;
use meshwork_core::jwt_provider::Provider;

/// One `[[gateway.api_keys]]` entry: a name and the SHA-256 of the key
/// (the key itself is never in the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: String,
    pub sha256: [u8; 32],
}

/// A gateway listener's edge settings: the entry's policy, the providers
/// it names (as their entries say) and the gateway's own settings. Part
/// of the listener's identity: a change replaces its route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeSpec {
    pub policy: EdgePolicy,
    pub providers: Vec<Provider>,
    /// The headers every `jwt-provider` entry sets (claims, payload):
    /// removed from every request on every listener, so a client cannot
    /// supply them through a listener that does not verify tokens.
    pub owned_headers: Vec<String>,
    pub api_keys: Arc<Vec<ApiKey>>,
    pub trusted_hops: u8,
    /// The listener terminates TLS (`X-Forwarded-Proto: https`).
    pub https: bool,
    pub port: u16,
}
