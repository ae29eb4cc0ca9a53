//! A mesh client of the test's own: a rustls client that presents a leaf
//! fetched from the registry (`/v1/agent/connect/ca/leaf/:service`) and is
//! never renewed, on connections the test keeps open as long as it likes.
//! It checks nothing of the server (the suites using it test what the
//! server does with the client's certificate, not the other way round).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A leaf as the registry's agent endpoint gives it: its chain and key
/// (PEM), and the end of its validity.
#[derive(Debug, Clone)]
pub struct AgentLeaf {
    pub cert_pem: String,
    pub key_pem: String,
    /// `ValidBefore`, in Unix seconds.
    pub valid_before_unix: u64,
}

impl AgentLeaf {
    /// From the endpoint's JSON.
    pub fn from_json(leaf: &serde_json::Value) -> Result<Self> {
        let valid_before = leaf["ValidBefore"].as_str().context("ValidBefore")?;
        Ok(AgentLeaf {
            cert_pem: leaf["CertPEM"].as_str().context("CertPEM")?.to_owned(),
            key_pem: leaf["PrivateKeyPEM"]
                .as_str()
                .context("PrivateKeyPEM")?
                .to_owned(),
            valid_before_unix: meshwork_core::timestamp::parse_rfc3339(valid_before)
                .context("ValidBefore is RFC 3339")?
                / 1_000_000_000,
        })
    }

    /// A connector presenting this leaf.
    pub fn connector(&self) -> Result<TlsConnector> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("leaf PEM")?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).context("key PEM")?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer))
            .with_client_auth_cert(chain, key)?;
        Ok(TlsConnector::from(Arc::new(config)))
    }

    /// How long until the leaf expires (zero once it has).
    pub fn expires_in(&self) -> Duration {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(self.valid_before_unix);
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }
}

/// A TLS connection to `addr` (an IP and port) with `connector`.
pub async fn connect(connector: &TlsConnector, addr: &str) -> Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let ip = tcp.peer_addr()?.ip();
    Ok(connector
        .connect(ServerName::IpAddress(ip.into()), tcp)
        .await?)
}

/// What arrives on `stream` until the peer closes it (EOF or an error) or
/// `limit` passes; and whether it closed.
pub async fn read_until_close(
    stream: &mut TlsStream<TcpStream>,
    limit: Duration,
) -> (String, bool) {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let mut closed = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// One HTTP/1.1 response on a kept-alive connection: read until a
/// `Content-Length` body is complete, within `limit`.
pub async fn read_response(stream: &mut TlsStream<TcpStream>, limit: Duration) -> Result<String> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                return Ok(text);
            }
        }
        let left = deadline
            .checked_duration_since(Instant::now())
            .context("no whole response in time")?;
        let n = tokio::time::timeout(left, stream.read(&mut buf))
            .await
            .context("no whole response in time")??;
        anyhow::ensure!(n > 0, "closed after {text:?}");
        out.extend_from_slice(&buf[..n]);
    }
}

/// rustls's ring provider for the suites' own TLS servers and clients.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // The ring provider, as the binaries (no aws-lc build).
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any server certificate.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
