//! The data plane's front: one outbound listener per upstream
//! (`127.0.0.1:<port>` for the local app) and one inbound listener in front
//! of the app. This module binds the listeners, assembles each one's stack
//! ([`tcp`] splice, or [`serve`] into the HTTP proxy of [`crate::http`],
//! over a [`Cluster`] of [`crate::upstream`]) and owns every connection
//! task, so that shutdown can stop accepting, let in-flight requests
//! finish for the drain period, then cut what is left. It reads endpoint
//! sets from [`crate::discovery`] and never talks to the registry itself.

pub mod serve;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{
    Balance, Config, Inbound, Limits, OutlierPolicy, ProxySettings, RetryOn, RetryPolicy, Upstream,
};
use crate::discovery::Discovery;
use crate::http::HostTable;
use crate::http::{self, idle};
use crate::policy::chain::{self, ChainEntries, Routing};
use crate::policy::intentions::{Caller, Intentions};
use crate::policy::ratelimit::Limits as RateLimits;
use crate::telemetry::{self, ClusterGauges};
use crate::tls::MeshTls;
use crate::tls::stream::{ServerStream, Stream};
use crate::upstream::cluster::{self, Cluster};
use meshwork_core::chain::{Destination, Target};

pub use crate::upstream::{BoxError, MAX_HEADER_BYTES, ProxyBody};

/// A client must send a request's whole head within this (slowloris), and
/// its first byte within this of connecting.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 streams a client may reset before the server answers, per
/// connection (rapid reset, CVE-2023-44487).
pub(crate) const H2_MAX_PENDING_RESETS: usize = 20;
/// HTTP/2 streams the server may reset for protocol errors before it
/// closes the connection.
pub(crate) const H2_MAX_LOCAL_RESETS: usize = 256;
pub(crate) const H2_MAX_STREAMS: u32 = 1024;

/// Why the proxy could not start (or a reload could not apply).
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({key}): {source}")]
pub struct BindError {
    key: String,
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// What a listener serves: replaced whole when a reload changes what the
/// listener is (its upstream, protocol or app); reloads that only change
/// settings reconfigure the cluster in place instead.
#[derive(Debug)]
struct Route {
    direction: &'static str,
    cluster: Arc<Cluster>,
    http: Option<Arc<http::HttpProxy>>,
    /// A tcp upstream's discovery chain (the resolver's targets).
    l4: Option<Arc<Routing<tcp::TcpTarget>>>,
    access_log: bool,
    /// Cancelled when a reload replaces or removes the route, or when the
    /// proxy stops accepting (a child of that token): its HTTP connections
    /// finish what is in flight and close (clients reconnect to the new
    /// route). Shared by the routes [`Route::with_access_log`] makes.
    retired: CancellationToken,
    /// Cancelled a drain period after `retired` (or at the end of the
    /// proxy's drain): cuts whatever of the route is still open.
    cut: CancellationToken,
}

impl Route {
    /// `stop_accepting` and `stop_now` are the proxy's tokens.
    fn new(
        direction: &'static str,
        (cluster, routing, hosts, edge): (
            Arc<Cluster>,
            Option<Routed>,
            Option<HostTable>,
            Option<Arc<crate::gateway::edge::Edge>>,
        ),
        access_log: bool,
        (stop_accepting, stop_now): (&CancellationToken, &CancellationToken),
    ) -> Arc<Self> {
        let (http_routing, l4) = match routing {
            Some(Routed::Http(r)) => (Some(r), None),
            Some(Routed::Tcp(r)) => (None, Some(r)),
            None => (None, None),
        };
        let http = cluster.config().protocol.is_http().then(|| {
            let proxy = http::HttpProxy::new(Arc::clone(&cluster), direction, access_log);
            let proxy = match http_routing {
                Some(routing) => proxy.with_routing(routing),
                None => proxy,
            };
            let proxy = match hosts {
                Some(hosts) => proxy.with_hosts(hosts),
                None => proxy,
            };
            Arc::new(match edge {
                Some(edge) => proxy.with_edge(edge),
                None => proxy,
            })
        });
        Arc::new(Route {
            direction,
            cluster,
            http,
            l4,
            access_log,
            retired: stop_accepting.child_token(),
            cut: stop_now.child_token(),
        })
    }

    /// The same cluster, pooled connections and lifetime (retiring either
    /// retires both), another access-log setting.
    fn with_access_log(&self, access_log: bool) -> Arc<Self> {
        Arc::new(Route {
            direction: self.direction,
            cluster: Arc::clone(&self.cluster),
            http: self
                .http
                .as_ref()
                .map(|h| Arc::new(h.with_access_log(access_log))),
            l4: self.l4.clone(),
            access_log,
            retired: self.retired.clone(),
            cut: self.cut.clone(),
        })
    }

    /// Stops the route: HTTP connections close once idle, and after
    /// `grace` everything still open is cut.
    fn retire(&self, grace: Duration) {
        self.retired.cancel();
        let cut = self.cut.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(grace) => cut.cancel(),
                () = cut.cancelled() => {}
            }
        });
    }
}

/// An outbound listener's discovery chain, by what it carries.
enum Routed {
    Http(Arc<Routing<http::HttpProxy>>),
    Tcp(Arc<Routing<tcp::TcpTarget>>),
}

impl Route {
    /// The chain's target clusters now: (route, target id, cluster).
    fn target_clusters(&self) -> Vec<(String, String, Arc<Cluster>)> {
        if let Some(hosts) = self.http.as_ref().and_then(|h| h.hosts.as_ref()) {
            // A gateway listener's services: the route is the hosts.
            // A host's service with a chain: its targets' clusters too.
            let mut out = Vec::new();
            for (route, proxy) in hosts.iter() {
                let label = format!("host {}", route.hosts.join(","));
                out.push((
                    label.clone(),
                    route.upstream.name.clone(),
                    Arc::clone(&proxy.cluster),
                ));
                if let Some(routing) = &proxy.routing {
                    for (r, target, p) in routing.target_proxies() {
                        out.push((format!("{label} {r}"), target, Arc::clone(&p.cluster)));
                    }
                }
            }
            return out;
        }
        if let Some(routing) = self.http.as_ref().and_then(|h| h.routing.as_ref()) {
            return routing
                .target_proxies()
                .into_iter()
                .map(|(r, t, p)| (r, t, Arc::clone(&p.cluster)))
                .collect();
        }
        self.l4.as_ref().map_or_else(Vec::new, |routing| {
            routing
                .target_proxies()
                .into_iter()
                .map(|(r, t, p)| (r, t, Arc::clone(&p.0)))
                .collect()
        })
    }

    /// The chain applied now, if the listener follows one.
    fn applied_chain(&self) -> Option<Arc<chain::Applied>> {
        if let Some(routing) = self.http.as_ref().and_then(|h| h.routing.as_ref()) {
            return Some(routing.applied());
        }
        self.l4.as_ref().map(|r| r.applied())
    }
}

/// Identifies a listener across reloads: its configured address, and for
/// several on port 0 (tests), which one in order.
type SlotKey = (SocketAddr, usize);

/// One listener: its socket stays bound across reloads for as long as the
/// config has it, whatever it serves.
#[derive(Debug)]
struct Slot {
    key: SlotKey,
    /// Where it is actually bound.
    local: SocketAddr,
    route: RwLock<Arc<Route>>,
    /// The listener is gone from the config: stop accepting, free the port.
    closed: CancellationToken,
    /// The client connections open on it, oldest first.
    conns: Mutex<Conns>,
}

/// A listener's open client connections, in the order they were accepted.
#[derive(Debug, Default)]
struct Conns {
    next: u64,
    open: std::collections::BTreeMap<u64, Open>,
    /// When the last "connection limit reached" line was logged.
    logged: Option<std::time::Instant>,
}

/// One open client connection.
#[derive(Debug)]
struct Open {
    /// HTTP connections only: what tells whether it is idle.
    activity: Option<Arc<idle::Activity>>,
    /// Closes it (gracefully: what is in flight finishes).
    close: CancellationToken,
}

/// Holds a connection's place in [`Slot::conns`] until dropped.
#[derive(Debug)]
struct Admitted {
    slot: Arc<Slot>,
    seq: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.slot.conns().open.remove(&self.seq);
    }
}

impl Slot {
    fn conns(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place for a new connection under the listener's limit: at
    /// the limit, the oldest idle HTTP connection is closed to make room;
    /// with none idle, `None` (the new connection is refused). Either is
    /// counted, and logged at most every 10 s.
    fn admit(
        self: &Arc<Self>,
        cluster: &Cluster,
        activity: Option<Arc<idle::Activity>>,
        close: CancellationToken,
    ) -> Option<Admitted> {
        let max = cluster.config().limits.max_downstream;
        let mut conns = self.conns();
        if conns.open.len() >= max {
            let idle = conns
                .open
                .iter()
                .find(|(_, o)| o.activity.as_ref().is_some_and(|a| a.is_idle()))
                .map(|(seq, _)| *seq);
            let now = std::time::Instant::now();
            let log = conns
                .logged
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10));
            if log {
                conns.logged = Some(now);
            }
            match idle.and_then(|seq| conns.open.remove(&seq)) {
                Some(oldest) => {
                    oldest.close.cancel();
                    cluster
                        .metrics
                        .downstream_evicted
                        .fetch_add(1, Ordering::Relaxed);
                    if log {
                        tracing::warn!(listener = %self.local, limit = max, "client connection limit reached: closing the oldest idle connection to make room");
                    }
                }
                None => {
                    cluster
                        .metrics
                        .downstream_refused
                        .fetch_add(1, Ordering::Relaxed);
                    if log {
                        tracing::warn!(listener = %self.local, limit = max, "client connection limit reached and none idle: refusing new connections");
                    }
                    return None;
                }
            }
        }
        let seq = conns.next;
        conns.next += 1;
        conns.open.insert(seq, Open { activity, close });
        Some(Admitted {
            slot: Arc::clone(self),
            seq,
        })
    }

    fn route(&self) -> Arc<Route> {
        Arc::clone(&self.route.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn set_route(&self, route: Arc<Route>) -> Arc<Route> {
        std::mem::replace(
            &mut *self.route.write().unwrap_or_else(|e| e.into_inner()),
            route,
        )
    }
}

/// What a reload changed in the data plane.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ProxyChanges {
    /// Listeners opened.
    pub added: Vec<String>,
    /// Listeners closed (their connections drain).
    pub removed: Vec<String>,
    /// Listeners now serving another upstream, protocol or app (their
    /// connections drain; new ones get the new route).
    pub replaced: Vec<String>,
    /// Upstreams whose settings changed in place.
    pub reconfigured: Vec<String>,
}

impl ProxyChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.replaced.is_empty()
            && self.reconfigured.is_empty()
    }
}

/// The running data plane.
#[derive(Debug)]
pub struct Proxy {
    /// Every listener, in config order, inbound first.
    slots: RwLock<Vec<Arc<Slot>>>,
    /// Sockets bound before [`Proxy::run`]; moved to their accept loops by it.
    unstarted: Mutex<Vec<(Arc<Slot>, TcpListener)>>,
    running: AtomicBool,
    settings: RwLock<ProxySettings>,
    inbound: RwLock<Option<Inbound>>,
    discovery: Discovery,
    /// The mesh identity: the inbound listener's TLS, and the outbound
    /// clusters' TLS to sidecars.
    mesh: MeshTls,
    /// A gateway's certificates for its TLS listeners (replaced by a
    /// reload).
    edge: RwLock<crate::tls::edge::Served>,
    /// A gateway's JWT providers' keys.
    keyring: Arc<crate::gateway::keys::Keyring>,
    /// What the inbound listener checks callers against.
    intentions: Intentions,
    /// How often they may call.
    limits: RateLimits,
    /// Ends the clusters' discovery followers.
    shutdown: CancellationToken,
    /// The discovery-chain entries, followed from the first outbound HTTP
    /// listener on.
    chain_entries: std::sync::OnceLock<ChainEntries>,
    /// What the policy built from config entries has applied (reported to
    /// the registry by the agent).
    applied: crate::policy::applied::AppliedConfig,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    draining: AtomicBool,
    /// Every accept loop and connection task.
    tasks: TaskTracker,
    /// Stops accepting (and starts graceful shutdown of connections).
    stop_accepting: CancellationToken,
    /// The end of the drain period: cut whatever is still open.
    stop_now: CancellationToken,
}

/// The inbound listener's cluster: the local app, no retries but connect
/// failures, no ejection, no request timeout unless configured (the
/// caller's sidecar has its own).
fn inbound_upstream(service_name: &str, inbound: &Inbound) -> Upstream {
    Upstream {
        name: service_name.to_owned(),
        listen: inbound.listen,
        protocol: inbound.protocol,
        tag: None,
        balance: Balance::RoundRobin,
        hash_header: None,
        connect_timeout: inbound.connect_timeout,
        request_timeout: inbound
            .request_timeout
            .unwrap_or(crate::config::NO_REQUEST_TIMEOUT),
        idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
        // Once more on a fresh connection when a pooled one to the app
        // turns out closed (idempotent requests only).
        retries: RetryPolicy {
            attempts: 1,
            on: RetryOn {
                connect_failure: true,
                reset: inbound.protocol.is_http(),
                ..RetryOn::default()
            },
            budget_percent: 20,
        },
        outlier: OutlierPolicy {
            consecutive_5xx: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 0,
        },
        hash_policies: Vec::new(),
        explicit: crate::config::Explicit::default(),
        from_registry: std::collections::BTreeMap::new(),
        edge_tls: false,
        host_routes: Vec::new(),
        edge: None,
        limits: Limits {
            max_connections: 1024,
            max_pending: 1024,
            max_requests: 1024,
            max_downstream: inbound.max_connections,
        },
    }
}

/// The settings of a discovery-chain target's cluster: the listener's
/// upstream, then the resolver's (connect and request timeouts, load
/// balancer) and the route's (timeouts, retries; HTTP only).
fn target_config(base: &Upstream, target: &Target, dest: &Destination) -> Upstream {
    let mut config = base.clone();
    if target.service != base.name {
        config.tag = None;
    }
    config.name = target.service.clone();
    if let Some(timeout) = dest.request_timeout.or(target.request_timeout) {
        config.request_timeout = timeout;
    }
    if let Some(timeout) = target.connect_timeout {
        config.connect_timeout = timeout;
    }
    if let Some(idle) = dest.idle_timeout {
        config.idle_timeout = idle;
    }
    if let Some(lb) = &target.load_balancer {
        // Policies were checked when the chain compiled.
        if let Some(balance) = crate::config::Balance::parse(&lb.policy) {
            config.balance = balance;
        }
        config.hash_header = None;
        config.hash_policies = lb.hash_policies.clone();
    }
    if let Some(retries) = dest.num_retries {
        config.retries.attempts = retries;
    }
    config.retries.on.connect_failure |=
        dest.retry_on_connect_failure || dest.retry_on.connect_failure;
    config.retries.on.reset |= dest.retry_on.reset;
    config.retries.on.any_5xx |= dest.retry_on.any_5xx;
    if dest.retry_on.gateway_error {
        config.retries.on.statuses.extend([502, 503, 504]);
    }
    config
        .retries
        .on
        .statuses
        .extend(dest.retry_on_status_codes.iter().copied());
    config
}

/// One listener as a config asks for it.
struct Wanted {
    key: SlotKey,
    config_key: String,
    direction: &'static str,
    upstream: Upstream,
    /// Inbound: the local app.
    app: Option<SocketAddr>,
}

fn wanted(config: &Config) -> Vec<Wanted> {
    let mut list = Vec::new();
    if let Some(inbound) = &config.inbound {
        list.push(Wanted {
            key: (inbound.listen, 0),
            config_key: "inbound.listen".into(),
            direction: "inbound",
            upstream: inbound_upstream(&config.service_name, inbound),
            app: Some(inbound.app),
        });
    }
    for (i, upstream) in config.upstreams.iter().enumerate() {
        let nth = list
            .iter()
            .filter(|w: &&Wanted| w.key.0 == upstream.listen)
            .count();
        list.push(Wanted {
            key: (upstream.listen, nth),
            config_key: match &config.gateway {
                // A gateway's listeners come from its entry, by port.
                Some(g) => format!(
                    "ingress-gateway {:?} listener on port {}",
                    g.name,
                    upstream.listen.port()
                ),
                None => format!("upstreams[{i}].listen"),
            },
            direction: "outbound",
            upstream: upstream.clone(),
            app: None,
        });
    }
    list
}

async fn bind(key: &str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError {
        key: key.to_owned(),
        addr,
        source,
    })
}

/// Who is on the other end of an accepted connection: its address and,
/// on the inbound listener, the service its verified mesh certificate
/// names (what intentions decide on). Plain listeners (outbound, for the
/// local app) have no caller identity.
#[derive(Debug, Clone)]
pub struct Downstream {
    pub peer: SocketAddr,
    pub caller: Option<Arc<Caller>>,
}

/// The inbound listener's mutual TLS: the handshake within
/// [`HEADER_READ_TIMEOUT`] and the caller's service name from its
/// verified SPIFFE ID. Without `mesh` (outbound listeners) the stream is
/// passed on plain. `None`: refused (counted, logged at debug) or no mesh
/// identity yet.
async fn secure(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    mesh: Option<(MeshTls, (Intentions, RateLimits))>,
    edge: Option<(crate::tls::edge::EdgeTls, bool)>,
) -> Option<(ServerStream, Option<Arc<Caller>>)> {
    if let Some((edge, http)) = edge {
        let _ = stream.set_nodelay(true);
        let accept = tokio_rustls::TlsAcceptor::from(edge.server_config(http)).accept(stream);
        return match tokio::time::timeout(HEADER_READ_TIMEOUT, accept).await {
            Ok(Ok(tls)) => Some((Stream::Tls(Box::new(tls)), None)),
            Ok(Err(e)) => {
                crate::tls::edge::HANDSHAKES_REFUSED.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, error = %e, "gateway TLS handshake refused");
                None
            }
            Err(_) => {
                crate::tls::edge::HANDSHAKES_TIMED_OUT.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "gateway TLS handshake timed out");
                None
            }
        };
    }
    let Some((mesh, intentions)) = mesh else {
        return Some((Stream::Plain(stream), None));
    };
    let config = match mesh.server_config() {
        Ok(config) => config,
        Err(reason) => {
            mesh.count_failure("inbound", "other");
            tracing::debug!(%peer, %reason, "inbound connection refused");
            return None;
        }
    };
    let _ = stream.set_nodelay(true);
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    let tls = match tokio::time::timeout(HEADER_READ_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            mesh.handshake_failed("inbound", &e);
            tracing::debug!(%peer, error = %e, "inbound mesh TLS handshake refused");
            return None;
        }
        Err(_) => {
            mesh.count_failure("inbound", "protocol");
            tracing::debug!(%peer, "inbound mesh TLS handshake timed out");
            return None;
        }
    };
    // The verifier checked the chain and the trust domain on a full
    // handshake. A resumed session skips the verifier, so its certificate
    // is checked again against the roots in force now: a leaf that has
    // expired, or whose root was pruned, does not live on through a
    // session ticket.
    let connection = tls.get_ref().1;
    let resumed = connection.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let caller = match connection.peer_certificates().and_then(|c| c.split_first()) {
        None => Err("no client certificate"),
        Some((leaf, presented)) if resumed => match mesh.snapshot().trust.as_ref() {
            None => Err("no roots"),
            Some(trust) => trust
                .verify(
                    leaf,
                    presented,
                    rustls::pki_types::UnixTime::now(),
                    webpki::KeyUsage::client_auth(),
                    None,
                )
                .map_err(|e| {
                    mesh.count_failure("inbound", crate::tls::trust::reason_of(&e));
                    "a resumed session's certificate no longer verifies"
                }),
        },
        Some((leaf, _)) => crate::tls::spiffe::of_certificate(leaf)
            .map_err(|_| "no SPIFFE ID in the client certificate"),
    };
    let service = match caller {
        Ok(id) => Arc::<str>::from(id.service),
        Err(why) => {
            if !resumed {
                mesh.count_failure("inbound", "bad_identity");
            }
            tracing::debug!(%peer, why, "inbound mesh connection refused");
            return None;
        }
    };
    // Until when the caller's certificate holds: the connection takes no
    // request after that (see `expire_at`).
    let not_after = connection
        .peer_certificates()
        .and_then(crate::tls::expiry::peer_not_after);
    let caller = Arc::new(Caller::new(service, intentions, not_after));
    Some((Stream::Tls(Box::new(tls)), Some(caller)))
}

/// Resolves when `caller`'s certificate expires (never without a caller
/// or a readable expiry: outbound listeners), having marked it expired and
/// counted the connection. One timer per connection, armed once; the
/// connection's next request is then its last (see the HTTP listener).
async fn expire_at(caller: Option<Arc<Caller>>, mesh: MeshTls, peer: SocketAddr) {
    let Some((caller, at)) = caller.and_then(|c| c.not_after_unix.map(|at| (c, at))) else {
        return std::future::pending().await;
    };
    tokio::time::sleep_until(crate::tls::expiry::deadline(at)).await;
    caller.mark_expired();
    mesh.count_peer_expired();
    tracing::debug!(%peer, source = %caller.service, "the caller's certificate has expired: its next request is the connection's last");
}

/// How often a gateway looks at its certificate files.
const CERTIFICATE_POLL: Duration = Duration::from_secs(2);

impl Proxy {
    /// Binds every listener of `config` and starts following the
    /// upstreams' endpoints (nothing is accepted until [`Proxy::run`]).
    /// A config without listeners makes an idle proxy that a reload can
    /// give listeners later.
    pub async fn bind(
        config: &Config,
        discovery: Discovery,
        mesh: MeshTls,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, BindError> {
        let proxy = Arc::new(Proxy {
            slots: RwLock::default(),
            unstarted: Mutex::default(),
            running: AtomicBool::new(false),
            settings: RwLock::new(config.proxy.clone()),
            inbound: RwLock::new(config.inbound.clone()),
            edge: RwLock::new(match &config.gateway {
                Some(g) => crate::tls::edge::Served::new(&g.certificates, g.tls.clone()),
                None => crate::tls::edge::Served::default(),
            }),
            discovery,
            mesh,
            intentions: Intentions::default(),
            limits: RateLimits::default(),
            shutdown,
            chain_entries: std::sync::OnceLock::new(),
            applied: crate::policy::applied::AppliedConfig::default(),
            reloading: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
            tasks: TaskTracker::new(),
            stop_accepting: CancellationToken::new(),
            stop_now: CancellationToken::new(),
            keyring: Arc::default(),
        });
        proxy.sync_keys(config);
        let mut slots = Vec::new();
        for w in wanted(config) {
            let socket = bind(&w.config_key, w.upstream.listen).await?;
            slots.push((proxy.new_slot(&w, &socket, config.proxy.access_log), socket));
        }
        *proxy.slots.write().unwrap_or_else(|e| e.into_inner()) =
            slots.iter().map(|(s, _)| Arc::clone(s)).collect();
        *proxy.unstarted.lock().unwrap_or_else(|e| e.into_inner()) = slots;
        Ok(proxy)
    }

    fn new_cluster(&self, w: &Wanted) -> Arc<Cluster> {
        match w.app {
            Some(app) => Cluster::local(w.upstream.clone(), app),
            // All instances with their health: the balancer needs the
            // unhealthy ones for the panic threshold.
            None => Cluster::follow(
                w.upstream.clone(),
                self.discovery.service(&w.upstream.name, false),
                self.shutdown.clone(),
                Some(self.mesh.clone()),
            ),
        }
    }

    /// An outbound listener's discovery chain: its targets' clusters
    /// derive their settings from the listener's, then the resolver's and
    /// (HTTP) the route's (timeouts, retries). A tcp listener follows the
    /// resolver alone.
    fn new_routing(&self, w: &Wanted, access_log: bool) -> Option<Routed> {
        // A gateway listener routing by host: each host's service has its
        // own chain (`new_hosts`).
        if w.app.is_some() || !w.upstream.host_routes.is_empty() {
            return None;
        }
        let entries = self
            .chain_entries
            .get_or_init(|| ChainEntries::follow(&self.discovery, self.applied.clone()));
        let layer = if w.upstream.protocol.is_http() {
            chain::Layer::Http
        } else {
            chain::Layer::Tcp
        };
        let applied = chain::follow(
            entries,
            w.upstream.name.clone(),
            layer,
            self.shutdown.clone(),
        );
        let (discovery, mesh, shutdown) = (
            self.discovery.clone(),
            self.mesh.clone(),
            self.shutdown.clone(),
        );
        let base = w.upstream.clone();
        let cluster = move |target: &Target, dest: &Destination| {
            let config = target_config(&base, target, dest);
            let endpoints = discovery.service(&target.service, false);
            let mesh = Some(mesh.clone());
            if target.filter.is_some() || target.only_passing {
                let subset = cluster::Subset {
                    filter: target.filter.clone(),
                    only_passing: target.only_passing,
                };
                Cluster::follow_subset(config, endpoints, shutdown.clone(), mesh, subset)
            } else {
                Cluster::follow(config, endpoints, shutdown.clone(), mesh)
            }
        };
        Some(match layer {
            chain::Layer::Http => {
                let make = move |target: &Target, dest: &Destination| {
                    Arc::new(http::HttpProxy::new(
                        cluster(target, dest),
                        "outbound",
                        access_log,
                    ))
                };
                Routed::Http(Routing::start(applied, Box::new(make)))
            }
            chain::Layer::Tcp => {
                let make = move |target: &Target, dest: &Destination| {
                    Arc::new(tcp::TcpTarget(cluster(target, dest)))
                };
                Routed::Tcp(Routing::start(applied, Box::new(make)))
            }
        })
    }

    /// A gateway listener's services by host: each a proxy with its own
    /// cluster and discovery chain (`None`: not such a listener).
    fn new_hosts(&self, w: &Wanted, access_log: bool) -> Option<HostTable> {
        if w.upstream.host_routes.is_empty() {
            return None;
        }
        let table = w
            .upstream
            .host_routes
            .iter()
            .map(|route| {
                let one = Wanted {
                    key: w.key,
                    config_key: w.config_key.clone(),
                    direction: w.direction,
                    upstream: route.upstream.clone(),
                    app: None,
                };
                let proxy = http::HttpProxy::new(self.new_cluster(&one), w.direction, access_log);
                let proxy = match self.new_routing(&one, access_log) {
                    Some(Routed::Http(routing)) => proxy.with_routing(routing),
                    _ => proxy,
                };
                (route.clone(), Arc::new(proxy))
            })
            .collect();
        Some(table)
    }

    /// A gateway HTTP listener's edge (authentication, client limits,
    /// forwarding headers); `None` for any other listener.
    fn new_edge(&self, w: &Wanted) -> Option<Arc<crate::gateway::edge::Edge>> {
        let spec = w.upstream.edge.clone()?;
        Some(Arc::new(crate::gateway::edge::Edge::new(
            spec,
            Arc::clone(&self.keyring),
        )))
    }

    /// Keeps the keys of the JWT providers `config`'s listeners name
    /// (read again: a reload re-reads key files).
    fn sync_keys(&self, config: &Config) {
        let providers: Vec<_> = config
            .upstreams
            .iter()
            .filter_map(|u| u.edge.as_ref())
            .flat_map(|e| e.providers.iter().cloned())
            .collect();
        self.keyring.sync(&providers);
    }

    fn new_slot(&self, w: &Wanted, socket: &TcpListener, access_log: bool) -> Arc<Slot> {
        let cluster = (
            self.new_cluster(w),
            self.new_routing(w, access_log),
            self.new_hosts(w, access_log),
            self.new_edge(w),
        );
        Arc::new(Slot {
            key: w.key,
            local: socket.local_addr().unwrap_or(w.upstream.listen),
            route: RwLock::new(Route::new(w.direction, cluster, access_log, self.tokens())),
            closed: CancellationToken::new(),
            conns: Mutex::default(),
        })
    }

    /// (stop accepting, stop now): what routes derive their tokens from.
    fn tokens(&self) -> (&CancellationToken, &CancellationToken) {
        (&self.stop_accepting, &self.stop_now)
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The addresses actually bound (tests bind port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.slots().iter().map(|s| s.local).collect()
    }

    /// Starts accepting on every listener.
    /// Reads a gateway's certificate files again when they changed on
    /// disk (new connections get them; open ones keep theirs).
    pub fn refresh_certificates(&self) {
        let changed = self
            .edge
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .changed();
        if let Some((certs, stamps)) = changed {
            let read = crate::tls::edge::EdgeTls::load(&certs);
            self.edge
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .install(&certs, stamps, read);
        }
    }

    pub fn run(self: &Arc<Self>) {
        self.running.store(true, Ordering::SeqCst);
        // A gateway watches its certificate files (every 2 s: cheap, a
        // stat per file; no inotify dependency, and it sees a file put in
        // place by any means, a symlink swap included).
        let watcher = Arc::downgrade(self);
        let stop = self.stop_accepting.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CERTIFICATE_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(proxy) = watcher.upgrade() else {
                    return;
                };
                proxy.refresh_certificates();
            }
        });
        let unstarted =
            std::mem::take(&mut *self.unstarted.lock().unwrap_or_else(|e| e.into_inner()));
        for (slot, socket) in unstarted {
            self.start(slot, socket);
        }
    }

    fn start(self: &Arc<Self>, slot: Arc<Slot>, socket: TcpListener) {
        let route = slot.route();
        let config = route.cluster.config();
        let span =
            tracing::info_span!("listener", direction = route.direction, upstream = %config.name);
        tracing::info!(parent: &span, address = %slot.local, protocol = %config.protocol, "listening");
        let proxy = Arc::clone(self);
        self.tasks.spawn(tracing::Instrument::instrument(
            proxy.accept_loop(slot, socket),
            span,
        ));
    }

    async fn accept_loop(self: Arc<Self>, slot: Arc<Slot>, socket: TcpListener) {
        let h1 = serve::http1_builder();
        loop {
            let (stream, peer) = tokio::select! {
                () = self.stop_accepting.cancelled() => return,
                () = slot.closed.cancelled() => {
                    tracing::info!(address = %slot.local, "listener removed by a reload; closed");
                    return;
                }
                accepted = socket.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off
                        // instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // What the listener serves now (a reload may have changed it).
            let route = slot.route();
            let activity = route
                .http
                .is_some()
                .then(|| Arc::new(idle::Activity::new(true)));
            let close = CancellationToken::new();
            let Some(admitted) = slot.admit(&route.cluster, activity.clone(), close.clone()) else {
                drop(stream);
                continue;
            };
            let Some(open) = cluster::acquire_owned(&route.cluster, |g| &g.downstream, usize::MAX)
            else {
                continue;
            };
            // Inbound: mutual TLS first (in the connection's task), and
            // the verified caller's service name goes with every request.
            let mesh = (route.direction == "inbound").then(|| {
                let policy = (self.intentions.clone(), self.limits.clone());
                (self.mesh.clone(), policy)
            });
            // A gateway's TLS listener: outside clients' TLS ends here.
            let edge = if route.cluster.config().edge_tls {
                match self.edge.read().unwrap_or_else(|e| e.into_inner()).tls() {
                    Some(edge) => Some((edge, route.http.is_some())),
                    None => {
                        // Not opened without certificates (`gateway`);
                        // a reload that dropped them closes it too.
                        drop(stream);
                        continue;
                    }
                }
            } else {
                None
            };
            match (&route.http, activity) {
                (None, _) | (_, None) => {
                    // A tcp upstream's chain picks the target's cluster per
                    // connection (the listener's own when it is plain).
                    let cluster = route
                        .l4
                        .as_ref()
                        .and_then(|r| r.choose_connection())
                        .map_or_else(|| Arc::clone(&route.cluster), |t| Arc::clone(&t.0));
                    let (direction, access_log, cut) =
                        (route.direction, route.access_log, route.cut.clone());
                    self.tasks.spawn(async move {
                        let _open = (open, admitted);
                        let Some((stream, caller)) = secure(stream, peer, mesh, edge).await else {
                            return;
                        };
                        // A byte stream is not cut when the caller's
                        // certificate expires: an open connection finishes
                        // (as Envoy and Linkerd do), a client could not
                        // tell a cut from a failure, and nothing can move
                        // it to the caller's renewed leaf.
                        tcp::proxy_connection(
                            stream,
                            Downstream { peer, caller },
                            cluster,
                            direction,
                            access_log,
                            cut,
                        )
                        .await;
                    });
                }
                (Some(accepted_with), Some(activity)) => {
                    let _ = stream.set_nodelay(true);
                    let (slot, accepted_with) = (Arc::clone(&slot), Arc::clone(accepted_with));
                    let cluster = Arc::clone(&route.cluster);
                    // Retired by a reload or when the proxy stops accepting.
                    let retired = route.retired.clone();
                    let cut = route.cut.clone();
                    let idle_timeout = route.cluster.config().idle_timeout;
                    let h1 = h1.clone();
                    let tls = self.mesh.clone();
                    self.tasks.spawn(async move {
                        let _open = (open, admitted);
                        let handshake = async {
                            tokio::select! {
                                secured = secure(stream, peer, mesh, edge) => secured,
                                () = retired.cancelled() => None,
                                () = close.cancelled() => None,
                            }
                        };
                        let Some((stream, caller)) = handshake.await else {
                            return;
                        };
                        let busy = Arc::clone(&activity);
                        // At the caller's expiry the connection is marked
                        // (nothing closes: an idle HTTP/1.1 connection
                        // closed under a client about to send would fail
                        // its request); the first request after it starts
                        // the graceful close below.
                        let expired = expire_at(caller.clone(), tls, peer);
                        let drain = CancellationToken::new();
                        let close_after = drain.clone();
                        let service = move |req| {
                            // A reload that kept the cluster but changed how
                            // it is served (access log) applies to the next
                            // request; a replaced route keeps serving its own
                            // connections until they close.
                            let now = slot.route();
                            let http = match &now.http {
                                Some(h) if Arc::ptr_eq(&now.cluster, &cluster) => Arc::clone(h),
                                _ => Arc::clone(&accepted_with),
                            };
                            let busy = busy.busy();
                            let caller = caller.clone();
                            // A request after the caller's certificate
                            // expired is the connection's last: it is
                            // answered, then HTTP/1.1 closes (the answer
                            // says `Connection: close`) and HTTP/2 sends
                            // GOAWAY and closes once its streams are done.
                            if caller.as_ref().is_some_and(|c| c.expired()) {
                                close_after.cancel();
                            }
                            async move { Ok(http.handle(req, peer, caller, busy).await) }
                        };
                        let io = idle::Tracked::new(stream, Arc::clone(&activity));
                        let connection = serve::connection(io, &h1, service, drain.clone());
                        tokio::pin!(connection);
                        // Idle (false), or retired or closed to make room
                        // (true); polled only when one of them changes, not
                        // at every request. Polled before the connection,
                        // so that a request read in the same wake-up as the
                        // caller's expiry already finds the caller marked.
                        let mut ended = idle::OnOwnWake::new(async move {
                            let expired = async {
                                expired.await;
                                std::future::pending::<()>().await;
                            };
                            tokio::select! {
                                () = activity.idle(HEADER_READ_TIMEOUT, idle_timeout) => false,
                                () = retired.cancelled() => true,
                                () = close.cancelled() => true,
                                () = expired => true,
                            }
                        });
                        tokio::select! {
                            biased;
                            retired = &mut ended => if !retired {
                                return;
                            },
                            result = connection.as_mut() => {
                                if let Err(e) = result {
                                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                                }
                                return;
                            }
                        }
                        // Finish what is in flight, refuse new requests.
                        drain.cancel();
                        tokio::select! {
                            _ = connection.as_mut() => {}
                            () = cut.cancelled() => {}
                        }
                    });
                }
            }
        }
    }

    /// Applies a reloaded config: listeners the new config no longer has
    /// close (their connections drain), new ones open, listeners whose
    /// upstream, protocol or app changed get a new route (old connections
    /// drain), and settings of the same upstream change in place (pooled
    /// connections, endpoint counters and ejections are kept; requests in
    /// flight finish under the settings they started with). Every new
    /// socket is bound first: when one cannot be, nothing changes.
    pub async fn reload(self: &Arc<Self>, config: &Config) -> Result<ProxyChanges, BindError> {
        let _one = self.reloading.lock().await;
        self.sync_keys(config);
        let old_slots = self.slots();
        let wanted = wanted(config);
        let mut fresh = Vec::new();
        for w in &wanted {
            if !old_slots.iter().any(|s| s.key == w.key) {
                fresh.push((w.key, bind(&w.config_key, w.upstream.listen).await?));
            }
        }
        // From here on nothing fails.
        let grace = config.proxy.drain;
        let access_log = config.proxy.access_log;
        let mut changes = ProxyChanges::default();
        let mut slots = Vec::new();
        let mut to_start = Vec::new();
        for w in &wanted {
            let label = format!(
                "{} {} on {}",
                w.direction, w.upstream.name, w.upstream.listen
            );
            if let Some(pos) = fresh.iter().position(|(k, _)| *k == w.key) {
                let (_, socket) = fresh.swap_remove(pos);
                let slot = self.new_slot(w, &socket, access_log);
                to_start.push((Arc::clone(&slot), socket));
                slots.push(slot);
                changes.added.push(label);
                continue;
            }
            let Some(slot) = old_slots.iter().find(|s| s.key == w.key) else {
                continue;
            };
            let route = slot.route();
            let current = route.cluster.config();
            let same_identity = route.direction == w.direction
                && current.name == w.upstream.name
                && current.protocol == w.upstream.protocol
                && route.cluster.app == w.app
                // A gateway listener's hosts and services are its table's.
                && current.host_routes == w.upstream.host_routes
                // And what it asks of clients, its edge's (a new edge
                // starts with empty client buckets).
                && current.edge == w.upstream.edge
                // The pool's idle timeout is fixed when it is made.
                && (current.idle_timeout == w.upstream.idle_timeout || route.http.is_none());
            if same_identity {
                if *current != w.upstream {
                    route.cluster.reconfigure(w.upstream.clone());
                    changes.reconfigured.push(label);
                }
                if route.access_log != access_log {
                    // Open connections pick the new one up per request.
                    slot.set_route(route.with_access_log(access_log));
                }
            } else {
                let cluster = (
                    self.new_cluster(w),
                    self.new_routing(w, access_log),
                    self.new_hosts(w, access_log),
                    self.new_edge(w),
                );
                let old =
                    slot.set_route(Route::new(w.direction, cluster, access_log, self.tokens()));
                old.retire(grace);
                changes.replaced.push(label);
            }
            slots.push(Arc::clone(slot));
        }
        for slot in &old_slots {
            if !slots.iter().any(|s| Arc::ptr_eq(s, slot)) {
                slot.closed.cancel();
                let route = slot.route();
                route.retire(grace);
                changes.removed.push(format!(
                    "{} {} on {}",
                    route.direction,
                    route.cluster.config().name,
                    slot.local
                ));
            }
        }
        *self.slots.write().unwrap_or_else(|e| e.into_inner()) = slots;
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = config.proxy.clone();
        *self.inbound.write().unwrap_or_else(|e| e.into_inner()) = config.inbound.clone();
        match &config.gateway {
            Some(g) => self
                .edge
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .configure(&g.certificates, g.tls.clone()),
            None => {
                *self.edge.write().unwrap_or_else(|e| e.into_inner()) =
                    crate::tls::edge::Served::default();
            }
        }
        self.refresh_certificates();
        // Every service a listener now uses stays followed: the upstreams,
        // a gateway listener's host routes and every discovery-chain
        // target (made, or named by the chain applied, whose table a task
        // may be making right now). Only what no listener uses is dropped.
        let followed: std::collections::HashSet<String> = self
            .slots()
            .iter()
            .flat_map(|slot| {
                let route = slot.route();
                let mut names = vec![route.cluster.config().name.clone()];
                names.extend(
                    route
                        .target_clusters()
                        .into_iter()
                        .map(|(_, _, cluster)| cluster.config().name.clone()),
                );
                if let Some(chain) = route.applied_chain().and_then(|a| a.chain.clone()) {
                    names.extend(chain.targets.iter().map(|t| t.service.clone()));
                }
                // A gateway listener's host routes: each one's chain too.
                let hosts = route.http.as_ref().and_then(|h| h.hosts.clone());
                for (_, proxy) in hosts.iter().flat_map(|h| h.iter()) {
                    let chain = proxy
                        .routing
                        .as_ref()
                        .and_then(|r| r.applied().chain.clone());
                    if let Some(chain) = chain {
                        names.extend(chain.targets.iter().map(|t| t.service.clone()));
                    }
                }
                names
            })
            .collect();
        self.discovery.retain(|service| followed.contains(service));
        if self.running.load(Ordering::SeqCst) && !self.stop_accepting.is_cancelled() {
            for (slot, socket) in to_start {
                self.start(slot, socket);
            }
        } else {
            self.unstarted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(to_start);
        }
        Ok(changes)
    }

    /// Stops accepting, lets in-flight requests finish within the drain
    /// period, then cuts what is left.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.stop_accepting.cancel();
        self.tasks.close();
        let grace = self
            .settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .drain;
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.tasks.len(),
                "drain period of {grace:?} over; closing what is still open"
            );
            self.stop_now.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), self.tasks.wait()).await;
        } else {
            tracing::info!("drained");
        }
    }

    /// The proxy has listeners (a sidecar without `[inbound]` or
    /// `[[upstreams]]` has none until a reload adds some).
    pub fn has_listeners(&self) -> bool {
        !self
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// `(direction, cluster)` of every listener, in config order.
    fn clusters_now(&self) -> Vec<(&'static str, Arc<Cluster>)> {
        self.slots()
            .iter()
            .map(|s| {
                let route = s.route();
                (route.direction, Arc::clone(&route.cluster))
            })
            .collect()
    }

    /// Its traffic since it started, per (direction, service): every
    /// cluster's counts (a listener's, its chain targets', a gateway's
    /// host services'), each cluster once, summed by the service it
    /// calls (reported to the registry for `/v1/mesh/topology`).
    pub fn traffic(&self) -> Vec<meshwork_proto::v1::TrafficEdge> {
        let mut seen = std::collections::HashSet::new();
        let mut edges: std::collections::BTreeMap<
            (&'static str, String),
            meshwork_proto::v1::TrafficEdge,
        > = std::collections::BTreeMap::new();
        for slot in self.slots() {
            let route = slot.route();
            let clusters = std::iter::once(Arc::clone(&route.cluster))
                .chain(route.target_clusters().into_iter().map(|(_, _, c)| c));
            for cluster in clusters {
                if !seen.insert(Arc::as_ptr(&cluster)) {
                    continue;
                }
                let name = cluster.config().name.clone();
                let edge = edges
                    .entry((route.direction, name.clone()))
                    .or_insert_with(|| meshwork_proto::v1::TrafficEdge {
                        direction: route.direction.to_owned(),
                        service: name,
                        ..Default::default()
                    });
                let classes = cluster.metrics.by_class();
                if edge.by_class.is_empty() {
                    edge.by_class = vec![0; classes.len()];
                }
                for (sum, n) in edge.by_class.iter_mut().zip(classes) {
                    *sum += n;
                }
                let buckets = cluster.metrics.latency.buckets();
                if edge.latency_le_us.is_empty() {
                    edge.latency_le_us = buckets.iter().map(|(le, _)| *le).collect();
                    edge.latency_counts = vec![0; buckets.len()];
                }
                for (sum, (_, n)) in edge.latency_counts.iter_mut().zip(buckets) {
                    *sum += n;
                }
            }
        }
        edges.into_values().collect()
    }

    /// The clusters of the discovery-chain targets of every outbound
    /// listener: (upstream, route, target id, cluster).
    fn target_clusters(&self) -> Vec<(String, String, String, Arc<Cluster>)> {
        self.slots()
            .iter()
            .flat_map(|slot| {
                let route = slot.route();
                let upstream = route.cluster.config().name.clone();
                route
                    .target_clusters()
                    .into_iter()
                    .map(move |(r, target, cluster)| (upstream.clone(), r, target, cluster))
            })
            .collect()
    }

    /// The intentions its inbound listener applies (kept current by
    /// [`crate::policy::intentions::run`]).
    pub fn intentions(&self) -> &Intentions {
        &self.intentions
    }

    /// The inbound rate limits (see `policy::ratelimit::run`).
    pub fn limits(&self) -> &RateLimits {
        &self.limits
    }

    /// What its policy has applied of the registry's config entries.
    pub fn applied(&self) -> &crate::policy::applied::AppliedConfig {
        &self.applied
    }

    /// The mesh identity its listeners use.
    pub fn mesh(&self) -> &MeshTls {
        &self.mesh
    }

    /// Why the proxy cannot carry mesh traffic yet: it has listeners and
    /// no leaf or roots (an inbound listener refuses every client until
    /// then, an outbound one cannot dial sidecars).
    pub fn mesh_not_ready(&self) -> Option<crate::tls::mesh::NotReady> {
        if self.has_listeners() {
            self.mesh.not_ready()
        } else {
            None
        }
    }

    /// Whether it has an inbound listener.
    pub fn has_inbound(&self) -> bool {
        self.inbound
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The inbound listener refuses every request until the first
    /// intentions arrive: true while it has to.
    pub fn intentions_pending(&self) -> bool {
        self.inbound
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
            && !self.intentions.loaded()
    }

    /// Every upstream has received its first endpoint set.
    pub fn ready(&self) -> bool {
        self.clusters_now().iter().all(|(_, c)| c.table().ready)
    }

    /// Prometheus text for `/metrics`.
    pub fn metrics(&self) -> String {
        let mut clusters: Vec<(String, Arc<Cluster>)> = self
            .clusters_now()
            .into_iter()
            .map(|(direction, c)| {
                let labels = telemetry::cluster_labels(direction, &c.config().name, None);
                (labels, c)
            })
            .collect();
        clusters.extend(
            self.target_clusters()
                .into_iter()
                .map(|(upstream, route, target, c)| {
                    let labels =
                        telemetry::cluster_labels("outbound", &upstream, Some((&target, &route)));
                    (labels, c)
                }),
        );
        let rows = clusters.iter().map(|(labels, c)| {
            let table = c.table();
            let gauges = ClusterGauges {
                requests_active: c.gauges.requests.load(Ordering::Relaxed),
                pending: c.gauges.pending.load(Ordering::Relaxed),
                connections_active: c.gauges.connections.load(Ordering::Relaxed),
                downstream_active: c.gauges.downstream.load(Ordering::Relaxed),
                endpoints: table.endpoints.len(),
                endpoints_healthy: table.endpoints.iter().filter(|e| e.healthy).count(),
                endpoints_ejected: table.endpoints.iter().filter(|e| e.ejected()).count(),
            };
            (labels.clone(), &c.metrics, gauges)
        });
        let mut text = telemetry::render(
            rows,
            self.discovery.streams(),
            self.draining.load(Ordering::Relaxed),
        );
        text.push_str(&self.mesh.render_metrics());
        text.push_str(&self.intentions.render_metrics());
        text.push_str(&chain::render_metrics());
        text.push_str(&self.limits.render_metrics());
        let edges: Vec<_> = self
            .slots()
            .iter()
            .filter_map(|slot| slot.route().http.as_ref().and_then(|h| h.edge.clone()))
            .collect();
        if !edges.is_empty() {
            text.push_str(crate::gateway::edge::METRICS_HEAD);
            for edge in &edges {
                edge.render_metrics(&mut text);
            }
        }
        self.keyring.render_metrics(&mut text);
        if self
            .edge
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .tls()
            .is_some()
        {
            crate::tls::edge::render_metrics(&mut text);
        }
        text
    }

    /// `/clusters`: every cluster's endpoints and their state.
    pub fn clusters(&self) -> serde_json::Value {
        let mut list: Vec<_> = self
            .clusters_now()
            .iter()
            .map(|(direction, c)| cluster_json(c, direction))
            .collect();
        // The discovery chain's targets, each a cluster of its own.
        list.extend(
            self.target_clusters()
                .into_iter()
                .map(|(upstream, route, target, c)| {
                    let mut entry = cluster_json(&c, "outbound");
                    if let Some(entry) = entry.as_object_mut() {
                        entry.insert("upstream".into(), upstream.into());
                        entry.insert("target".into(), target.into());
                        entry.insert("route".into(), route.into());
                    }
                    entry
                }),
        );
        let (up, total) = self.discovery.streams();
        json!({
            "registry_connected": up == total,
            "draining": self.draining.load(Ordering::Relaxed),
            "clusters": list,
        })
    }

    /// `/config`: the listeners, their settings and the routing table now.
    pub fn config(&self) -> serde_json::Value {
        let upstreams: Vec<_> = self
            .clusters_now()
            .iter()
            .filter(|(direction, _)| *direction == "outbound")
            .map(|(_, c)| {
                let table = c.table();
                json!({
                    "upstream": *c.config(),
                    "index": table.index,
                    "endpoints": table
                        .endpoints
                        .iter()
                        .map(|e| json!({"key": e.key, "address": e.addr.to_string(), "weight": e.weight, "health": e.health}))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        // The discovery chain each outbound listener applies: the
        // config-entry index, its targets, and why newer entries were
        // refused (the previous chain stays).
        let chains: Vec<_> = self
            .slots()
            .iter()
            .filter_map(|slot| {
                let route = slot.route();
                let applied = route.applied_chain()?;
                let targets: Vec<_> = applied.chain.iter().flat_map(|c| {
                    c.targets.iter().map(|t| json!({
                        "id": t.id,
                        "service": t.service,
                        "subset": t.subset,
                        "filter": t.filter.as_ref().map(|f| f.as_str()),
                        "only_passing": t.only_passing,
                        "failover": t.failover.iter().map(|f| &c.targets[*f].id).collect::<Vec<_>>(),
                    }))
                }).collect();
                Some(json!({
                    "upstream": route.cluster.config().name,
                    "index": applied.index,
                    "loaded": applied.chain.is_some(),
                    "plain": applied.chain.as_ref().is_none_or(|c| c.is_plain()),
                    "targets": targets,
                    "refused": applied.refused,
                }))
            })
            .collect();
        json!({
            "inbound": *self.inbound.read().unwrap_or_else(|e| e.into_inner()),
            "mesh": self.mesh.status(),
            "upstreams": upstreams,
            "chains": chains,
            "proxy": *self.settings.read().unwrap_or_else(|e| e.into_inner()),
        })
    }
}

/// One cluster as `/clusters` shows it.
fn cluster_json(c: &Cluster, direction: &str) -> serde_json::Value {
    let table = c.table();
    let config = c.config();
    json!({
        "name": config.name,
        "direction": direction,
        "source": c.source,
        "protocol": config.protocol,
        "balance": config.balance,
        "ready": table.ready,
        "index": table.index,
        "panic": c.panicking(),
        "requests_active": c.gauges.requests.load(Ordering::Relaxed),
        "pending": c.gauges.pending.load(Ordering::Relaxed),
        "connections_active": c.gauges.connections.load(Ordering::Relaxed),
        "downstream_connections_active": c.gauges.downstream.load(Ordering::Relaxed),
        "endpoints": c.view(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::leaf::tests::signed;
    use crate::tls::mesh::Alpn;
    use crate::tls::trust::Trust;
    use crate::tls::trust::tests::TestCa;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TD: &str = "c0ffee.meshwork";

    fn mesh_of(ca: &TestCa, service: &str) -> MeshTls {
        let mesh = MeshTls::new(service);
        let trust = Trust::from_roots(&ca.roots(TD)).expect("trust");
        mesh.install_for_tests(signed(ca, TD, service), trust);
        mesh
    }

    /// An inbound listener's accept: one connection through [`secure`],
    /// answering its caller's name; what the handshake gave.
    async fn inbound(mesh: MeshTls) -> (SocketAddr, tokio::task::JoinHandle<Option<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let served = tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.expect("accept");
            let (mut stream, caller) =
                secure(stream, peer, Some((mesh, Default::default())), None).await?;
            let caller = caller.map(|c| c.service.to_string()).unwrap_or_default();
            let _ = stream.write_all(caller.as_bytes()).await;
            let _ = stream.shutdown().await;
            Some(caller)
        });
        (addr, served)
    }

    async fn dial(client: Arc<rustls::ClientConfig>, addr: SocketAddr) -> std::io::Result<String> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await?;
        let mut got = String::new();
        tls.read_to_string(&mut got).await?;
        Ok(got)
    }

    fn failures(mesh: &MeshTls, direction: &str, reason: &str) -> String {
        let line = format!(
            "meshwork_sidecar_tls_handshake_failures_total{{direction=\"{direction}\",reason=\"{reason}\"}} "
        );
        mesh.render_metrics()
            .lines()
            .find_map(|l| l.strip_prefix(&line).map(str::to_owned))
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn mesh_peers_handshake_and_the_caller_is_named() {
        let ca = TestCa::new("mesh");
        let (api, web) = (mesh_of(&ca, "api"), mesh_of(&ca, "web"));
        let (addr, served) = inbound(api.clone()).await;
        let client = web.client_config("api", Alpn::Http1).expect("client");
        assert_eq!(dial(client, addr).await.expect("answered"), "web");
        assert_eq!(served.await.expect("joined").as_deref(), Some("web"));
    }

    #[tokio::test]
    async fn the_wrong_server_a_foreign_client_and_plain_text_are_refused() {
        let ca = TestCa::new("mesh");
        let (api, web) = (mesh_of(&ca, "api"), mesh_of(&ca, "web"));
        // web dials what it thinks is "billing" but finds api: refused.
        let (addr, _served) = inbound(api.clone()).await;
        let client = web.client_config("billing", Alpn::Http1).expect("client");
        let e = dial(client, addr).await.expect_err("refused");
        web.handshake_failed("outbound", &e);
        assert_eq!(failures(&web, "outbound", "bad_identity"), "1");
        // A client of another CA: refused by the inbound side.
        let other = mesh_of(&TestCa::new("other"), "web");
        let (addr, served) = inbound(api.clone()).await;
        let client = other.client_config("api", Alpn::H2).expect("client");
        assert!(dial(client, addr).await.is_err());
        assert_eq!(served.await.expect("joined"), None);
        assert_eq!(failures(&api, "inbound", "unknown_ca"), "1");
        // Plain text: refused at the handshake.
        let (addr, served) = inbound(api.clone()).await;
        let mut plain = tokio::net::TcpStream::connect(addr).await.expect("connect");
        plain
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(served.await.expect("joined"), None);
        assert_eq!(failures(&api, "inbound", "protocol"), "1");
        // TLS without a client certificate.
        let (addr, served) = inbound(api.clone()).await;
        let anonymous = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_no_client_auth();
        let _ = dial(Arc::new(anonymous), addr).await;
        assert_eq!(served.await.expect("joined"), None);
        assert_eq!(failures(&api, "inbound", "no_client_cert"), "1");
    }

    #[tokio::test]
    async fn without_a_leaf_inbound_connections_are_refused_and_ready_says_why() {
        let mesh = MeshTls::new("api");
        assert_eq!(mesh.not_ready(), Some(crate::tls::mesh::NotReady::NoLeaf));
        let (addr, served) = inbound(mesh.clone()).await;
        let _ = tokio::net::TcpStream::connect(addr).await.expect("connect");
        assert_eq!(served.await.expect("joined"), None);
        assert!(mesh.client_config("web", Alpn::None).is_err());
    }

    /// A client that checks nothing (to show the server refuses it for
    /// lack of a certificate, not the other way round).
    #[derive(Debug)]
    struct AcceptAnything;

    impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }

        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            crate::tls::provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
}
