//! TLS from the sidecar to the registry's gRPC TLS port (`[registry] tls =
//! true`): the registry's certificate checked against `ca_file` and the
//! name `server_name` (`server.<dc>.meshwork`, what `meshctl tls cert
//! create --server` puts in it), and this sidecar's own certificate when
//! the registry asks for one (`verify_incoming`). Operator-provided files
//! only: the mesh's own certificates are [`super::mesh`]'s.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

/// `[registry]` TLS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryTlsSettings {
    pub ca_file: PathBuf,
    /// A client certificate and key, for a registry with `verify_incoming`.
    pub client: Option<(PathBuf, PathBuf)>,
    pub server_name: String,
}

/// What the sidecar dials the registry with.
#[derive(Debug)]
pub struct RegistryTls {
    settings: RegistryTlsSettings,
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl RegistryTls {
    /// Reads and checks the files: one line saying what is wrong.
    pub fn load(settings: RegistryTlsSettings) -> Result<Self, String> {
        let provider = super::provider();
        let mut roots = rustls::RootCertStore::empty();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&settings.ca_file)
            .map_err(|e| format!("cannot read {}: {e}", settings.ca_file.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| {
                format!(
                    "{} is not PEM certificates: {e}",
                    settings.ca_file.display()
                )
            })?;
        if certs.is_empty() {
            return Err(format!(
                "{} holds no certificate",
                settings.ca_file.display()
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", settings.ca_file.display()))?;
        }
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match &settings.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| format!("cannot read {}: {e}", cert.display()))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("{} is not PEM certificates: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    format!("cannot read a private key from {}: {e}", key.display())
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("{} and its key: {e}", cert.display()))?
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let server_name = ServerName::try_from(settings.server_name.clone())
            .map_err(|e| format!("server_name {:?}: {e}", settings.server_name))?;
        Ok(Self {
            settings,
            config: Arc::new(config),
            server_name,
        })
    }

    pub fn settings(&self) -> &RegistryTlsSettings {
        &self.settings
    }

    /// Dials the URI's host and port and completes the handshake.
    pub(crate) fn connector(
        self: &Arc<Self>,
    ) -> impl tower::Service<
        tonic::codegen::http::Uri,
        Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
        Error = io::Error,
        Future = impl Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>>
                 + Send,
    > + Clone
    + Send
    + 'static {
        let tls = Arc::clone(self);
        tower::service_fn(move |uri: tonic::codegen::http::Uri| {
            let tls = Arc::clone(&tls);
            async move {
                let host = uri
                    .host()
                    .unwrap_or_default()
                    .trim_matches(|c| c == '[' || c == ']');
                let port = uri.port_u16().unwrap_or(8503);
                let tcp = TcpStream::connect((host, port)).await?;
                tcp.set_nodelay(true)?;
                let stream = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    tokio_rustls::TlsConnector::from(Arc::clone(&tls.config))
                        .connect(tls.server_name.clone(), tcp),
                )
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
                Ok(TokioIo::new(stream))
            }
        })
    }
}
