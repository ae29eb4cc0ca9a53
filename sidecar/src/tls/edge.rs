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

/// TLS sessions a gateway remembers for resumption without tickets.
const SESSION_CACHE: usize = 16 * 1024;

/// Handshakes with outside clients refused (bad TLS, an unknown or
/// missing SNI) and timed out; `/metrics`.
pub static HANDSHAKES_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub static HANDSHAKES_TIMED_OUT: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

type Resumption = (
    Arc<dyn rustls::server::ProducesTickets>,
    Arc<dyn rustls::server::StoresServerSessions>,
);

/// The process's ticket keys and session cache (made once).
fn resumption() -> Result<Resumption, String> {
    static MADE: std::sync::OnceLock<Resumption> = std::sync::OnceLock::new();
    if let Some(made) = MADE.get() {
        return Ok(made.clone());
    }
    let ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
    let cache: Arc<dyn rustls::server::StoresServerSessions> =
        rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    Ok(MADE.get_or_init(|| (ticketer, cache)).clone())
}

/// `/metrics` lines of the gateway's TLS.
pub fn render_metrics(out: &mut String) {
    use std::sync::atomic::Ordering::Relaxed;
    out.push_str(&format!(
        "# HELP meshwork_gateway_tls_handshake_failures_total Outside clients' TLS handshakes that failed, by reason (refused: bad TLS, a name no certificate covers or none; timeout).\n# TYPE meshwork_gateway_tls_handshake_failures_total counter\nmeshwork_gateway_tls_handshake_failures_total{{reason=\"refused\"}} {}\nmeshwork_gateway_tls_handshake_failures_total{{reason=\"timeout\"}} {}\n",
        HANDSHAKES_REFUSED.load(Relaxed),
        HANDSHAKES_TIMED_OUT.load(Relaxed)
    ));
}

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
        let mut tcp = ServerConfig::builder_with_provider(super::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(by_host));
        // Resumption for returning clients (a full handshake is the costly
        // part of a new connection): stateless tickets (keys rotated by
        // rustls every 6 hours) and a session cache for clients without
        // ticket support, larger than rustls's 256 so that more than a few
        // hundred clients can resume.
        // One ticketer and cache for the process: a certificate reload
        // does not make every returning client do a full handshake.
        let (ticketer, cache) = resumption()?;
        tcp.ticketer = ticketer;
        tcp.session_storage = cache;
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

/// What identifies a file's content cheaply: modification time, length
/// and inode (a file replaced by a rename or a symlink swap is seen too).
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamps(certs: &[EdgeCert]) -> Vec<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    certs
        .iter()
        .flat_map(|c| [&c.cert_file, &c.key_file])
        .map(|path| {
            let m = std::fs::metadata(path).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        })
        .collect()
}

/// A gateway's certificates as served: the files, what they looked like
/// when read, and what was read. A config names the files; a change of
/// their content (seen by [`Served::changed`], polled, and at every
/// reload) is read again and applies to new connections — open ones keep
/// their session. A file that cannot be read keeps the last good set.
#[derive(Debug, Default)]
pub struct Served {
    certs: Vec<EdgeCert>,
    stamps: Vec<Stamp>,
    tls: Option<EdgeTls>,
}

impl Served {
    /// `certs` as `tls` (read by the config's load just now).
    pub fn new(certs: &[EdgeCert], tls: Option<EdgeTls>) -> Self {
        Self {
            certs: certs.to_vec(),
            stamps: stamps(certs),
            tls,
        }
    }

    pub fn tls(&self) -> Option<EdgeTls> {
        self.tls.clone()
    }

    /// A reloaded config's certificates: other files are taken as the
    /// config read them; the same files stay as served (a change of their
    /// content is [`Served::changed`]'s to find).
    pub fn configure(&mut self, certs: &[EdgeCert], tls: Option<EdgeTls>) {
        if self.certs != certs {
            *self = Served::new(certs, tls);
        }
    }

    /// The files and their stamps now, when they differ from what is
    /// served (then read them with [`EdgeTls::load`] and
    /// [`Served::install`]).
    pub fn changed(&self) -> Option<(Vec<EdgeCert>, Vec<Stamp>)> {
        if self.certs.is_empty() {
            return None;
        }
        let now = stamps(&self.certs);
        (now != self.stamps).then(|| (self.certs.clone(), now))
    }

    /// Puts what was read from `certs` (as they were at `stamps`) in
    /// service, unless the config moved to other files meanwhile; a
    /// failed read keeps the last good set (and is not retried until the
    /// files change again).
    pub fn install(
        &mut self,
        certs: &[EdgeCert],
        stamps: Vec<Stamp>,
        read: Result<EdgeTls, String>,
    ) {
        if self.certs != certs {
            return;
        }
        self.stamps = stamps;
        match read {
            Ok(tls) => {
                tracing::info!(
                    files = certs.len(),
                    "gateway certificates changed on disk: read again, new connections get them"
                );
                self.tls = Some(tls);
            }
            Err(e) => {
                tracing::warn!(error = %e, "gateway certificates changed on disk but cannot be read; the last good ones stay in use");
            }
        }
    }
}
