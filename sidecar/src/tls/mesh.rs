//! The mesh identity every listener and dialer reads: the current
//! [`Leaf`] and [`Trust`], and the rustls configs made from them. Each
//! change (a renewed leaf, new roots) builds a new [`Snapshot`] and swaps
//! it in whole: new connections take the new one, open connections keep
//! the config they were made with, no listener restarts.
//!
//! Lock rule: `snapshot` is held only to clone or replace the `Arc`,
//! never across an await or a handshake. The per-upstream client configs
//! are made on first use and cached in the snapshot they belong to.
//!
//! Each leaf installed gets a generation number ([`LeafStamp`]): outbound
//! mesh connections carry the stamp of the leaf they were made with, and
//! the pool asks [`MeshTls::usable`] (one atomic load) before handing one
//! out — see [`super::expiry`].
//!
//! Its counters (handshake failures by direction and reason, renewals,
//! connections retired or cut for an old or expired leaf) and what
//! `/status`, `/config` and `/ready` say about it live here too.
//! The task that keeps the leaf and roots current is [`super::renew`]'s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rustls::{ClientConfig, ServerConfig};
use serde_json::json;

use super::expiry::LeafStamp;
use super::leaf::{Leaf, now_unix};
use super::trust::{self, InboundVerifier, OutboundVerifier, Trust};
use crate::config::Protocol;

/// What a dial to a sidecar offers in ALPN, from the upstream's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    H2,
    Http1,
    None,
}

impl Alpn {
    pub fn of(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Http2 | Protocol::Grpc => Alpn::H2,
            Protocol::Http => Alpn::Http1,
            Protocol::Tcp => Alpn::None,
        }
    }

    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::H2 => vec![b"h2".to_vec()],
            Alpn::Http1 => vec![b"http/1.1".to_vec()],
            Alpn::None => Vec::new(),
        }
    }
}

/// Why the mesh cannot carry a connection yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("no mesh leaf certificate yet (waiting for the registry to sign one)")]
    NoLeaf,
    #[error("no mesh CA roots yet (waiting for the registry's ca_roots watch)")]
    NoRoots,
    #[error("the mesh TLS config could not be built from the leaf and roots")]
    Broken,
}

/// The leaf, the roots and the configs made of them, as of one change.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub leaf: Option<Arc<Leaf>>,
    /// The leaf's generation (0 before the first leaf): what connections
    /// dialled with this snapshot's configs are stamped with.
    generation: u64,
    pub trust: Option<Arc<Trust>>,
    /// The inbound listeners' config (both of the above are needed).
    server: Option<Arc<ServerConfig>>,
    /// By upstream service and ALPN, made on first use: each verifies the
    /// server names that service, and keeps its own resumption cache.
    clients: Mutex<HashMap<(String, Alpn), Arc<ClientConfig>>>,
}

impl Snapshot {
    fn not_ready(&self) -> Option<NotReady> {
        if self.leaf.is_none() {
            Some(NotReady::NoLeaf)
        } else if self.trust.is_none() {
            Some(NotReady::NoRoots)
        } else if self.server.is_none() {
            Some(NotReady::Broken)
        } else {
            None
        }
    }
}

/// Direction label values.
const DIRECTIONS: [&str; 2] = ["inbound", "outbound"];

/// Counters of the mesh's TLS.
#[derive(Debug, Default)]
struct Counters {
    /// By direction (see [`DIRECTIONS`]) and reason ([`trust::REASONS`]).
    handshake_failures: [[AtomicU64; trust::REASONS.len()]; 2],
    renewals_ok: AtomicU64,
    renewals_error: AtomicU64,
    /// Pooled outbound connections retired because the leaf they were
    /// made with was renewed or about to expire.
    retired_outbound: AtomicU64,
    /// Inbound connections still open when their peer's certificate
    /// expired (closed or drained then).
    peer_expired: AtomicU64,
}

/// The shared mesh identity; cheap to clone.
#[derive(Debug, Clone)]
pub struct MeshTls {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// This sidecar's service: its leaf names it.
    service: String,
    snapshot: RwLock<Arc<Snapshot>>,
    /// The generation of the current leaf while connections made with it
    /// may take requests; 0 (no leaf's) from [`MeshTls::leaf_expiring`]
    /// until the next leaf. Written under the `snapshot` write lock (and
    /// by `leaf_expiring` with a compare-exchange); read without a lock,
    /// once per pooled connection handed out.
    usable: AtomicU64,
    counters: Counters,
    /// The last renewal's error, cleared by a success (for `/status`).
    last_error: Mutex<Option<String>>,
}

impl MeshTls {
    pub fn new(service: &str) -> Self {
        MeshTls {
            inner: Arc::new(Inner {
                service: service.to_owned(),
                snapshot: RwLock::default(),
                usable: AtomicU64::new(0),
                counters: Counters::default(),
                last_error: Mutex::default(),
            }),
        }
    }

    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The current leaf, roots and configs.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(
            &self
                .inner
                .snapshot
                .read()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Why new mesh connections cannot be made yet, if they cannot.
    pub fn not_ready(&self) -> Option<NotReady> {
        self.snapshot().not_ready()
    }

    /// The inbound listeners' config now.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, NotReady> {
        let snapshot = self.snapshot();
        match (&snapshot.server, snapshot.not_ready()) {
            (Some(server), _) => Ok(Arc::clone(server)),
            (None, reason) => Err(reason.unwrap_or(NotReady::Broken)),
        }
    }

    /// The config to dial a sidecar of `service` with, speaking `alpn`.
    pub fn client_config(&self, service: &str, alpn: Alpn) -> Result<Arc<ClientConfig>, NotReady> {
        self.dial_config(service, alpn).map(|(config, _)| config)
    }

    /// [`MeshTls::client_config`] and the stamp of the leaf it presents,
    /// for the connection dialled with it to carry.
    pub fn dial_config(
        &self,
        service: &str,
        alpn: Alpn,
    ) -> Result<(Arc<ClientConfig>, LeafStamp), NotReady> {
        let snapshot = self.snapshot();
        let stamp = LeafStamp(snapshot.generation);
        if let Some(reason) = snapshot.not_ready() {
            return Err(reason);
        }
        let (Some(leaf), Some(trust)) = (&snapshot.leaf, &snapshot.trust) else {
            return Err(NotReady::Broken);
        };
        let mut clients = snapshot.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(config) = clients.get(&(service.to_owned(), alpn)) {
            return Ok((Arc::clone(config), stamp));
        }
        let config = client_config(leaf, trust, service, alpn).map_err(|e| {
            tracing::warn!(upstream = %service, error = %e, "cannot build the mesh client TLS config");
            NotReady::Broken
        })?;
        clients.insert((service.to_owned(), alpn), Arc::clone(&config));
        Ok((config, stamp))
    }

    /// Whether a connection made with the leaf `stamp` may take another
    /// request: its leaf is still the current one and not about to expire.
    /// One atomic load: asked each time a pooled connection is handed out.
    #[inline]
    pub fn usable(&self, stamp: LeafStamp) -> bool {
        self.inner.usable.load(Ordering::Acquire) == stamp.0
    }

    /// The leaf `stamp` is about to expire (no renewed one came in time):
    /// connections made with it are handed out no more. Nothing changes
    /// if another leaf has been installed meanwhile.
    pub(super) fn leaf_expiring(&self, stamp: LeafStamp) {
        let _ = self
            .inner
            .usable
            .compare_exchange(stamp.0, 0, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Swaps in a new leaf (renewed) and/or new roots; configs are rebuilt.
    /// A new leaf is a new generation: connections made with the previous
    /// one are retired by the pools. The stamp of the leaf now in use.
    pub(super) fn install(&self, leaf: Option<Arc<Leaf>>, trust: Option<Arc<Trust>>) -> LeafStamp {
        let mut slot = self
            .inner
            .snapshot
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let generation = if leaf.is_some() {
            let next = slot.generation + 1;
            self.inner.usable.store(next, Ordering::Release);
            next
        } else {
            slot.generation
        };
        let leaf = leaf.or_else(|| slot.leaf.clone());
        let trust = trust.or_else(|| slot.trust.clone());
        let server = match (&leaf, &trust) {
            (Some(leaf), Some(trust)) => match server_config(leaf, trust) {
                Ok(config) => Some(config),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot build the mesh server TLS config from the new leaf and roots");
                    None
                }
            },
            _ => None,
        };
        *slot = Arc::new(Snapshot {
            leaf,
            generation,
            trust,
            server,
            clients: Mutex::default(),
        });
        LeafStamp(generation)
    }

    #[cfg(test)]
    pub(crate) fn install_for_tests(&self, leaf: Leaf, trust: Trust) -> LeafStamp {
        self.install(Some(Arc::new(leaf)), Some(Arc::new(trust)))
    }

    #[cfg(test)]
    pub(crate) fn leaf_expiring_for_tests(&self, stamp: LeafStamp) {
        self.leaf_expiring(stamp);
    }

    pub(super) fn renewal(&self, result: Result<(), String>) {
        let counters = &self.inner.counters;
        let mut last = self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                counters.renewals_ok.fetch_add(1, Ordering::Relaxed);
                *last = None;
            }
            Err(e) => {
                counters.renewals_error.fetch_add(1, Ordering::Relaxed);
                *last = Some(e);
            }
        }
    }

    /// Counts a failed handshake (`direction`: inbound or outbound).
    pub fn handshake_failed(&self, direction: &str, error: &std::io::Error) {
        let reason = trust::reason(error);
        self.count_failure(direction, reason);
    }

    /// Counts a refused handshake whose reason is already known.
    pub fn count_failure(&self, direction: &str, reason: &str) {
        let d = usize::from(direction != "inbound");
        let r = trust::REASONS
            .iter()
            .position(|x| *x == reason)
            .unwrap_or(trust::REASONS.len() - 1);
        self.inner.counters.handshake_failures[d][r].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a pooled outbound connection retired for its leaf.
    pub fn count_retired(&self) {
        self.inner
            .counters
            .retired_outbound
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an inbound connection whose peer's certificate expired while
    /// it was open.
    pub fn count_peer_expired(&self) {
        self.inner
            .counters
            .peer_expired
            .fetch_add(1, Ordering::Relaxed);
    }

    /// What `/status` and `/config` show: the leaf (serial, SPIFFE ID,
    /// validity, root) and the roots (trust domain, ids).
    pub fn status(&self) -> serde_json::Value {
        let snapshot = self.snapshot();
        let leaf = snapshot.leaf.as_ref().map(|leaf| {
            json!({
                "spiffe_id": leaf.spiffe_id.uri(),
                "serial": leaf.serial,
                "valid_after": rfc3339(leaf.valid_after_unix),
                "valid_before": rfc3339(leaf.valid_before_unix),
                "valid_before_unix": leaf.valid_before_unix,
                "expires_in_secs": leaf.expires_in(now_unix()),
                "root_id": leaf.root_id,
            })
        });
        let roots = snapshot.trust.as_ref().map(|t| {
            json!({
                "trust_domain": t.trust_domain,
                "active_root_id": t.active_root_id,
                "root_ids": t.root_ids,
                "default_intention": if t.default_allow { "allow" } else { "deny" },
                "leaf_ttl_secs": t.leaf_ttl.as_secs(),
            })
        });
        let last_error = self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        json!({
            "ready": snapshot.not_ready().is_none(),
            "not_ready_reason": snapshot.not_ready().map(|r| r.to_string()),
            "service": self.inner.service,
            "trust_domain": snapshot.trust.as_ref().map(|t| t.trust_domain.clone()),
            "leaf": leaf,
            "roots": roots,
            "last_renewal_error": last_error,
        })
    }

    /// Prometheus text for `/metrics`.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        let counters = &self.inner.counters;
        let mut out = String::new();
        out.push_str("# HELP meshwork_sidecar_leaf_expiry_seconds Seconds until the mesh leaf certificate expires (absent before the first leaf).\n# TYPE meshwork_sidecar_leaf_expiry_seconds gauge\n");
        if let Some(leaf) = &self.snapshot().leaf {
            let _ = writeln!(
                out,
                "meshwork_sidecar_leaf_expiry_seconds {}",
                leaf.expires_in(now_unix())
            );
        }
        out.push_str("# HELP meshwork_sidecar_leaf_renewals_total Leaf certificate signings asked of the registry, by result.\n# TYPE meshwork_sidecar_leaf_renewals_total counter\n");
        let _ = writeln!(
            out,
            "meshwork_sidecar_leaf_renewals_total{{result=\"ok\"}} {}",
            counters.renewals_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "meshwork_sidecar_leaf_renewals_total{{result=\"error\"}} {}",
            counters.renewals_error.load(Ordering::Relaxed)
        );
        out.push_str("# HELP meshwork_sidecar_tls_handshake_failures_total Mesh TLS handshakes that failed, by direction and reason.\n# TYPE meshwork_sidecar_tls_handshake_failures_total counter\n");
        for (d, direction) in DIRECTIONS.iter().enumerate() {
            for (r, reason) in trust::REASONS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "meshwork_sidecar_tls_handshake_failures_total{{direction=\"{direction}\",reason=\"{reason}\"}} {}",
                    counters.handshake_failures[d][r].load(Ordering::Relaxed)
                );
            }
        }
        out.push_str("# HELP meshwork_sidecar_tls_peer_expired_total Inbound mesh HTTP connections still open when the peer's certificate expired (the next request on each is its last: answered, then HTTP/1.1 closes and HTTP/2 sends GOAWAY).\n# TYPE meshwork_sidecar_tls_peer_expired_total counter\n");
        let _ = writeln!(
            out,
            "meshwork_sidecar_tls_peer_expired_total{{direction=\"inbound\"}} {}",
            counters.peer_expired.load(Ordering::Relaxed)
        );
        out.push_str("# HELP meshwork_sidecar_tls_connections_retired_total Pooled mesh connections retired because the leaf they were made with was renewed or about to expire (closed once idle).\n# TYPE meshwork_sidecar_tls_connections_retired_total counter\n");
        let _ = writeln!(
            out,
            "meshwork_sidecar_tls_connections_retired_total{{direction=\"outbound\"}} {}",
            counters.retired_outbound.load(Ordering::Relaxed)
        );
        out
    }
}

fn rfc3339(unix: i64) -> String {
    meshwork_core::timestamp::format_rfc3339(u64::try_from(unix).unwrap_or(0) * 1_000_000_000)
}

/// TLS 1.2 and 1.3 with the ring provider.
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn server_config(leaf: &Leaf, trust: &Arc<Trust>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(super::provider())
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(Arc::new(InboundVerifier {
            trust: Arc::clone(trust),
        }))
        .with_single_cert(leaf.chain.clone(), leaf.key())?;
    // Offered both: what is spoken is the listener's protocol, which the
    // server tells from the bytes (the HTTP/2 preface or not).
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn client_config(
    leaf: &Leaf,
    trust: &Arc<Trust>,
    service: &str,
    alpn: Alpn,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(OutboundVerifier {
            trust: Arc::clone(trust),
            service: service.to_owned(),
        }))
        .with_client_auth_cert(leaf.chain.clone(), leaf.key())?;
    config.alpn_protocols = alpn.protocols();
    // Session resumption stays on (rustls's in-memory cache, by endpoint
    // address): reconnects to a sidecar skip the full handshake.
    Ok(Arc::new(config))
}
