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

/// The ACL token the sidecar presents to the registry (`[registry] token`
/// or `token_file`), sent as `x-consul-token` metadata on every call.
/// Its `Debug` never shows the secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RegistryToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl RegistryToken {
    /// A token from its SecretID; refused if it could not travel in a
    /// header (non-visible-ASCII characters).
    pub fn new(secret: &str) -> Result<Self, String> {
        let secret = secret.trim();
        if secret.is_empty() {
            return Ok(Self(None));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the registry token has characters a header cannot carry".to_owned());
        }
        secret
            .parse()
            .map(|v| Self(Some(v)))
            .map_err(|_| "the registry token has characters a header cannot carry".to_owned())
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl std::fmt::Debug for RegistryToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "\"<hidden>\""
        } else {
            "None"
        })
    }
}

impl tonic::service::Interceptor for RegistryToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("x-consul-token", value.clone());
        }
        Ok(request)
    }
}

/// A connection to a registry server whose calls carry the token.
pub(crate) type RegistryChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, RegistryToken>;

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
