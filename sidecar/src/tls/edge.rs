//! A gateway's TLS for outside clients: the certificates of its
//! `[[gateway.certificates]]`, one picked per connection by the name the
//! client asks for (SNI) — an exact host first, then a `*.` wildcard
//! covering one label. A name no certificate covers, or no name at all,
//! fails the handshake: no certificate is shown to a client that did not
//! name its host (nothing leaks which hosts the gateway serves). TLS 1.2
//! and 1.3 with rustls's modern suites only; ALPN `h2` and `http/1.1`.
//! The files are read when the config is loaded and on every reload
//! (SIGHUP): a new certificate applies to new connections, open ones keep
//! theirs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// One `[[gateway.certificates]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeCert {
    /// Host names (lower case), `*.`-wildcards allowed.
    pub hosts: Vec<String>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The certificates by host.
#[derive(Debug)]
struct ByHost {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ByHost {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        if let Some(cert) = self.exact.get(&name) {
            return Some(Arc::clone(cert));
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).map(Arc::clone)
    }
}

/// The TLS server configurations of a gateway's TLS listeners: HTTP
/// ones offer ALPN `h2` and `http/1.1`, tcp ones no ALPN (a client's own
/// protocol name is not refused, and no HTTP/2 is negotiated in front of
/// a byte stream).
#[derive(Debug, Clone)]
pub struct EdgeTls {
    http: Arc<ServerConfig>,
    tcp: Arc<ServerConfig>,
}

fn certified(cert: &EdgeCert) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.cert_file)
        .map_err(|e| format!("{}: {e}", cert.cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.cert_file.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate in the file",
            cert.cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&cert.key_file).map_err(|e| {
        format!(
            "cannot read a private key from {}: {e}",
            cert.key_file.display()
        )
    })?;
    CertifiedKey::from_der(chain, key, &super::provider())
        .map(Arc::new)
        .map_err(|e| {
            format!(
                "{} and {} do not go together: {e}",
                cert.cert_file.display(),
                cert.key_file.display()
            )
        })
}

impl EdgeTls {
    /// Reads every certificate and key; an unreadable file, a key that
    /// does not match its certificate or a host given twice is an error
    /// naming it.
    pub fn load(certs: &[EdgeCert]) -> Result<Self, String> {
        let mut by_host = ByHost {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for cert in certs {
            let key = certified(cert)?;
            for host in &cert.hosts {
                let (table, name) = match host.strip_prefix("*.") {
                    Some(parent) => (&mut by_host.wildcard, parent),
                    None => (&mut by_host.exact, host.as_str()),
                };
                if table.insert(name.to_owned(), Arc::clone(&key)).is_some() {
                    return Err(format!("host {host:?} has two certificates"));
                }
            }
        }
        let tcp = ServerConfig::builder_with_provider(super::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(by_host));
        let mut http = tcp.clone();
        http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            http: Arc::new(http),
            tcp: Arc::new(tcp),
        })
    }

    /// The configuration of an HTTP listener (`http`) or a tcp one.
    pub fn server_config(&self, http: bool) -> Arc<ServerConfig> {
        Arc::clone(if http { &self.http } else { &self.tcp })
    }
}
