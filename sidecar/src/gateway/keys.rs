//! The key sets of the JWT providers a gateway's listeners use, kept
//! current: an inline set is read when its entry applies, a file at every
//! apply and reload (SIGHUP), a remote set (HTTPS) fetched in the
//! background every `CacheDuration` — a failed fetch keeps the last good
//! keys, is logged and counted, and is retried with backoff. Requests read
//! a provider's keys with one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use meshwork_core::jwt_provider::{Keys, Provider, Remote, TrustedCa};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use super::jwt::KeySet;

/// Largest key set fetched (bytes).
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// The system's CA bundle (Debian's `ca-certificates`).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// One provider as the listeners see it.
#[derive(Debug)]
pub struct ProviderKeys {
    pub provider: Provider,
    pub keys: ArcSwapOption<KeySet>,
    fetch_failures: AtomicU64,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for ProviderKeys {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// Every provider in use, by name.
#[derive(Debug, Default)]
pub struct Keyring {
    providers: Mutex<HashMap<String, Arc<ProviderKeys>>>,
}

impl Keyring {
    /// The provider `name`, as last applied.
    pub fn get(&self, name: &str) -> Option<Arc<ProviderKeys>> {
        self.providers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Makes `providers` the ones kept: a new or changed provider gets
    /// its keys (a remote one a fetch task), a file is read again, the
    /// rest is dropped (its task stops). Key problems are logged, never
    /// fatal: the listener refuses tokens until keys load.
    pub fn sync(&self, providers: &[Provider]) {
        // Files first, without the lock (requests read the keyring).
        let read: Vec<Option<Result<KeySet, String>>> = providers
            .iter()
            .map(|p| match &p.keys {
                Keys::File(path) => Some(
                    read_small(path)
                        .and_then(|b| KeySet::parse(&b).map_err(|e| format!("{path}: {e}"))),
                ),
                _ => None,
            })
            .collect();
        let mut map = self.providers.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|name, _| providers.iter().any(|p| p.name == *name));
        for (provider, file) in providers.iter().zip(read) {
            let old = map.get(&provider.name).cloned();
            let kept = old.clone().filter(|k| k.provider == *provider);
            let entry = match kept.clone() {
                Some(k) => k,
                None => {
                    let fresh = Arc::new(ProviderKeys {
                        provider: provider.clone(),
                        keys: ArcSwapOption::empty(),
                        fetch_failures: AtomicU64::new(0),
                        task: Mutex::new(None),
                    });
                    // The same key source under changed settings: its keys
                    // carry over (a key server down now does not lose them).
                    if let Some(old) = old.filter(|o| o.provider.keys == provider.keys) {
                        fresh.keys.store(old.keys.load_full());
                    }
                    map.insert(provider.name.clone(), Arc::clone(&fresh));
                    if let Keys::Remote(remote) = &provider.keys {
                        let task = tokio::spawn(refresh(
                            Arc::downgrade(&fresh),
                            provider.name.clone(),
                            remote.clone(),
                        ));
                        *fresh.task.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(task.abort_handle());
                    }
                    fresh
                }
            };
            let loaded = match &provider.keys {
                Keys::Inline(text) if kept.is_none() => Some(KeySet::parse(text.as_bytes())),
                Keys::File(_) => file,
                _ => None,
            };
            match loaded {
                Some(Ok(set)) => entry.keys.store(Some(Arc::new(set))),
                Some(Err(e)) => {
                    // A file that went bad keeps the last good keys.
                    tracing::warn!(provider = %provider.name, error = %e, "JWT provider keys not loaded");
                }
                None => {}
            }
        }
    }

    /// `/metrics` lines.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let map = self.providers.lock().unwrap_or_else(|e| e.into_inner());
        if map.is_empty() {
            return;
        }
        out.push_str("# HELP meshwork_gateway_jwt_keys Signing keys loaded per JWT provider (0: tokens are refused).\n# TYPE meshwork_gateway_jwt_keys gauge\n");
        let mut names: Vec<_> = map.keys().collect();
        names.sort();
        for name in &names {
            let n = map[*name].keys.load().as_ref().map_or(0, |k| k.keys());
            let name = meshwork_core::prometheus::escape(name);
            let _ = writeln!(out, "meshwork_gateway_jwt_keys{{provider=\"{name}\"}} {n}");
        }
        out.push_str("# HELP meshwork_gateway_jwks_fetch_failures_total Failed fetches of a remote key set (the last good keys are kept).\n# TYPE meshwork_gateway_jwks_fetch_failures_total counter\n");
        for name in &names {
            let n = map[*name].fetch_failures.load(Ordering::Relaxed);
            let name = meshwork_core::prometheus::escape(name);
            let _ = writeln!(
                out,
                "meshwork_gateway_jwks_fetch_failures_total{{provider=\"{name}\"}} {n}"
            );
        }
    }
}

/// Largest key or CA file read (bytes).
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// A regular file of at most [`MAX_FILE_BYTES`] (a path from a config
/// entry could name a FIFO or a device).
fn read_small(path: &str) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{path}: not a regular file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!("{path}: larger than {MAX_FILE_BYTES} bytes"));
    }
    std::fs::read(path).map_err(|e| format!("{path}: {e}"))
}

/// Fetches `remote` now and every `refresh` after, until the provider is
/// dropped; failures retry sooner (1 s doubling, at most `refresh`).
async fn refresh(keys: std::sync::Weak<ProviderKeys>, name: String, remote: Remote) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let result = tokio::time::timeout(remote.timeout, fetch(&remote))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", remote.timeout)))
            .and_then(|body| KeySet::parse(&body));
        let Some(entry) = keys.upgrade() else {
            return;
        };
        let wait = match result {
            Ok(set) => {
                tracing::debug!(provider = %name, keys = set.keys(), "JWT key set fetched");
                entry.keys.store(Some(Arc::new(set)));
                backoff = Duration::from_secs(1);
                remote.refresh
            }
            Err(e) => {
                entry.fetch_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(provider = %name, uri = %remote.uri, error = %e,
                    kept = entry.keys.load().is_some(), "JWT key set fetch failed; keeping the last good keys");
                let wait = backoff.min(remote.refresh);
                backoff = (backoff * 2).min(remote.refresh);
                wait
            }
        };
        drop(entry);
        tokio::time::sleep(wait).await;
    }
}

fn roots(ca: Option<&TrustedCa>) -> Result<rustls::RootCertStore, String> {
    let certs: Vec<CertificateDer<'static>> = match ca {
        Some(TrustedCa::Pem(pem)) => CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("the trusted CA: {e}"))?,
        Some(TrustedCa::File(path)) => CertificateDer::pem_slice_iter(&read_small(path)?)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{path}: {e}"))?,
        None => CertificateDer::pem_file_iter(SYSTEM_ROOTS)
            .map_err(|e| format!("{SYSTEM_ROOTS}: {e}"))?
            .filter_map(Result::ok)
            .collect(),
    };
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err("no CA certificate to check the key server with".into());
    }
    Ok(store)
}

/// One GET of the key set over HTTPS (HTTP/1.1), at most
/// [`MAX_JWKS_BYTES`].
async fn fetch(remote: &Remote) -> Result<Vec<u8>, String> {
    let uri: hyper::Uri = remote
        .uri
        .parse()
        .map_err(|e| format!("{}: {e}", remote.uri))?;
    let host = uri.host().ok_or("the URI has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(remote.trusted_ca.as_ref())?)
        .with_no_client_auth();
    let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
        .map_err(|e| format!("{host}: {e}"))?;
    let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    // Ended with this fetch, however it ends (a timeout drops the future).
    struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _conn = AbortOnDrop(tokio::spawn(conn));
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = hyper::Request::get(path)
        .header(
            hyper::header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = send
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("the key server answered {}", response.status()));
    }
    let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the key set: {e}"))?
        .to_bytes();
    Ok(body.to_vec())
}
