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
pub mod gateway;
pub mod http;
pub mod listener;
pub mod notify;
pub mod policy;
pub mod reload;
pub mod telemetry;
pub mod tls;
pub mod upstream;

/// How the sidecar reaches the registry: the ACL token it presents
/// (`[registry] token` or `token_file`, sent as `x-consul-token` metadata
/// on every call) and, with `[registry] tls`, TLS to the registry's gRPC
/// TLS port. Its `Debug` never shows the secret.
#[derive(Clone, Default)]
pub struct RegistryAccess {
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    tls: Option<std::sync::Arc<tls::RegistryTls>>,
}

impl PartialEq for RegistryAccess {
    fn eq(&self, other: &Self) -> bool {
        self.token == other.token
            && self.tls.as_ref().map(|t| t.settings()) == other.tls.as_ref().map(|t| t.settings())
    }
}

impl RegistryAccess {
    /// The same, reaching the registry over TLS.
    pub fn with_tls(mut self, tls: Option<std::sync::Arc<tls::RegistryTls>>) -> Self {
        self.tls = tls;
        self
    }

    /// A channel to the registry server at `addr` (`HOST:PORT`): plain,
    /// or TLS with `[registry] tls`.
    pub(crate) async fn channel(
        &self,
        addr: &str,
        timeout: Option<std::time::Duration>,
    ) -> Result<tonic::transport::Channel, String> {
        let mut endpoint = registry_endpoint(addr)?;
        if let Some(timeout) = timeout {
            endpoint = endpoint.timeout(timeout);
        }
        let connected = match &self.tls {
            None => endpoint.connect().await,
            Some(tls) => endpoint.connect_with_connector(tls.connector()).await,
        };
        connected.map_err(|e| {
            let mut text = format!("{addr}: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        })
    }

    /// A token from its SecretID; refused if it could not travel in a
    /// header (non-visible-ASCII characters).
    pub fn new(secret: &str) -> Result<Self, String> {
        let secret = secret.trim();
        if secret.is_empty() {
            return Ok(Self::default());
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the registry token has characters a header cannot carry".to_owned());
        }
        secret
            .parse()
            .map(|v| Self {
                token: Some(v),
                tls: None,
            })
            .map_err(|_| "the registry token has characters a header cannot carry".to_owned())
    }

    pub fn is_set(&self) -> bool {
        self.token.is_some()
    }
}

impl std::fmt::Debug for RegistryAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAccess")
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("tls", &self.tls.as_ref().map(|t| t.settings()))
            .finish()
    }
}

impl tonic::service::Interceptor for RegistryAccess {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.token {
            request
                .metadata_mut()
                .insert("x-consul-token", value.clone());
        }
        Ok(request)
    }
}

/// A connection to a registry server whose calls carry the token.
pub(crate) type RegistryChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, RegistryAccess>;

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
