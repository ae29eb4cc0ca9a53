//! A cluster: one upstream's endpoints as the proxy sees them. A task
//! follows the discovery channel and swaps in a new immutable [`Table`]
//! on each change; per-endpoint counters (in flight, failures, ejection)
//! live in [`EndpointStats`] ([`super::endpoint`]) shared across tables,
//! so an update keeps them and in-flight requests finish on the endpoint
//! they started on. The panic threshold lives here too; passive health
//! (outlier ejection) in [`super::outlier`], the picking itself in
//! [`super::balance`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use meshwork_proto::v1::{Endpoint, Health};
use serde::Serialize;

use crate::agent::INBOUND_PORT_META;
use crate::config::{Balance, Upstream};
use crate::discovery::{EndpointSet, Endpoints, ShutdownToken};
use crate::telemetry::ClusterMetrics;
use crate::upstream::balance::{self, Ring};
pub use crate::upstream::endpoint::{EndpointState, EndpointStats, InFlight};
use crate::upstream::endpoint::{authority_of, now_ms};

/// Below this share of healthy endpoints, all endpoints are used (Envoy's
/// panic threshold): better to spread load over maybe-bad instances than
/// to crush the few good ones.
const PANIC_THRESHOLD_PERCENT: usize = 50;

/// Clusters up to this size pick from a list on the stack.
const SMALL_CLUSTER: usize = 32;

/// The immutable view a request picks from.
#[derive(Debug, Default)]
pub struct Table {
    /// The registry index it reflects (0 for static clusters).
    pub index: u64,
    /// A first snapshot arrived (static clusters: always).
    pub ready: bool,
    pub endpoints: Vec<Arc<EndpointState>>,
    pub ring: Option<Ring>,
}

impl Table {
    /// Whether the endpoint at `addr` has a sidecar in front (dialled
    /// with mutual TLS). Looked up when a connection is made, not per
    /// request.
    pub fn is_sidecar(&self, addr: SocketAddr) -> bool {
        self.endpoints.iter().any(|e| e.addr == addr && e.sidecar)
    }
}

/// Where a cluster's endpoints come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The registry (an outbound upstream).
    Registry,
    /// The local app (the inbound listener).
    Local,
}

/// What `/clusters` shows of one endpoint.
#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub key: String,
    pub address: String,
    pub weight: u32,
    pub health: &'static str,
    /// `mesh`: its sidecar is dialled with mutual TLS; `plain`: no
    /// sidecar in front (or the local app), dialled as it is.
    pub tls: &'static str,
    pub ejected: bool,
    pub ejected_for_ms: u64,
    pub ejections: u32,
    pub in_flight: usize,
    pub consecutive_failures: u32,
    pub requests: u64,
    pub failures: u64,
}

/// Circuit-breaker counters of a cluster.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Requests in flight (HTTP) or connections proxied (TCP).
    pub requests: AtomicUsize,
    /// Requests sent upstream and waiting for the response head.
    pub pending: AtomicUsize,
    /// Upstream connections open.
    pub connections: AtomicUsize,
    /// Retries in flight (for the budget).
    pub retries: AtomicUsize,
    /// Client connections open on the listener.
    pub downstream: AtomicUsize,
}

/// Decrements a gauge when dropped.
#[derive(Debug)]
pub struct GaugeGuard<'a>(&'a AtomicUsize);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes one unit of `gauge` when it is below `max`.
pub fn acquire(gauge: &AtomicUsize, max: usize) -> Option<GaugeGuard<'_>> {
    gauge
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| GaugeGuard(gauge))
}

/// Owned variant of [`GaugeGuard`] for guards that outlive a borrow.
#[derive(Debug)]
pub struct OwnedGauge {
    cluster: Arc<Cluster>,
    which: fn(&Gauges) -> &AtomicUsize,
}

impl Drop for OwnedGauge {
    fn drop(&mut self) {
        (self.which)(&self.cluster.gauges).fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes one unit of a cluster gauge, owned.
pub fn acquire_owned(
    cluster: &Arc<Cluster>,
    which: fn(&Gauges) -> &AtomicUsize,
    max: usize,
) -> Option<OwnedGauge> {
    which(&cluster.gauges)
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()?;
    Some(OwnedGauge {
        cluster: Arc::clone(cluster),
        which,
    })
}

#[derive(Debug)]
pub struct Cluster {
    /// Swapped by a config reload ([`Cluster::reconfigure`]); a request
    /// reads it once and keeps that version to its end.
    config: ArcSwap<Upstream>,
    pub source: Source,
    /// The local app, for the inbound listener's cluster.
    pub app: Option<SocketAddr>,
    table: ArcSwap<Table>,
    /// The last endpoint set from discovery, to rebuild the table when a
    /// reload changes the tag filter or the balancer.
    last_set: Mutex<Option<Arc<EndpointSet>>>,
    /// Endpoint stats by key and address, reused by the next table.
    stats: Mutex<HashMap<(String, SocketAddr), Arc<EndpointStats>>>,
    round_robin: AtomicUsize,
    panicking: AtomicBool,
    /// A `tcp` listener has seen an HTTP client (warned once).
    pub http_on_tcp_warned: AtomicBool,
    /// The mesh identity its connections to sidecars present and check
    /// (registry clusters; the local app is dialled plain).
    pub mesh: Option<crate::tls::MeshTls>,
    pub gauges: Gauges,
    pub metrics: ClusterMetrics,
    /// A service-resolver subset: only the instances its filter passes
    /// (and, with `OnlyPassing`, only passing ones).
    subset: Option<Subset>,
    /// Woken when a table from discovery is installed (requests that came
    /// before the first one wait for it: [`Cluster::first_set`]).
    updated: tokio::sync::Notify,
}

/// The instances a discovery-chain target keeps.
#[derive(Debug, Clone)]
pub struct Subset {
    pub filter: Option<meshwork_core::filter::Filter>,
    pub only_passing: bool,
}

/// An endpoint as a subset filter sees it.
struct FilterView<'a>(&'a Endpoint);

impl meshwork_core::filter::Fields for FilterView<'_> {
    fn service_id(&self) -> &str {
        &self.0.service_id
    }
    fn service_name(&self) -> &str {
        &self.0.service_name
    }
    fn address(&self) -> &str {
        &self.0.address
    }
    fn port(&self) -> u32 {
        self.0.port
    }
    fn tags(&self) -> &[String] {
        &self.0.tags
    }
    fn meta(&self, key: &str) -> Option<&str> {
        self.0.meta.get(key).map(String::as_str)
    }
    fn meta_is_empty(&self) -> bool {
        self.0.meta.is_empty()
    }
    fn node(&self) -> &str {
        &self.0.node
    }
    fn node_address(&self) -> &str {
        &self.0.node_address
    }
}

impl Cluster {
    fn new(config: Upstream, source: Source) -> Self {
        Cluster {
            metrics: ClusterMetrics::default(),
            config: ArcSwap::from_pointee(config),
            source,
            app: None,
            table: ArcSwap::default(),
            last_set: Mutex::default(),
            stats: Mutex::default(),
            round_robin: AtomicUsize::new(0),
            panicking: AtomicBool::new(false),
            http_on_tcp_warned: AtomicBool::new(false),
            mesh: None,
            gauges: Gauges::default(),
            subset: None,
            updated: tokio::sync::Notify::new(),
        }
    }

    /// Waits, at most `limit`, for discovery's first endpoint set (a
    /// listener just opened — a gateway's new listener, say — may get a
    /// request before its service's endpoints arrive, a few milliseconds
    /// later; answering 503 then would fail a client for nothing). True
    /// when the table is ready.
    pub async fn first_set(&self, limit: std::time::Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.updated.notified();
                if self.table().ready {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// As [`Cluster::follow`], keeping only the instances of `subset`.
    pub fn follow_subset(
        config: Upstream,
        endpoints: Endpoints,
        shutdown: ShutdownToken,
        mesh: Option<crate::tls::MeshTls>,
        subset: Subset,
    ) -> Arc<Self> {
        Self::follow_with(config, endpoints, shutdown, mesh, Some(subset))
    }

    /// Whether any endpoint could take a request now (healthy and not
    /// ejected): a discovery-chain target without one fails over.
    pub fn has_healthy(&self) -> bool {
        let table = self.table();
        let now = now_ms();
        table
            .endpoints
            .iter()
            .any(|e| e.healthy && !e.ejected_at(now))
    }

    /// A cluster of one fixed endpoint (the local app).
    pub fn local(config: Upstream, app: SocketAddr) -> Arc<Self> {
        let cluster = Arc::new(Cluster {
            app: Some(app),
            ..Self::new(config, Source::Local)
        });
        cluster.install(Table {
            index: 0,
            ready: true,
            endpoints: vec![Arc::new(EndpointState::new(
                "local/app".into(),
                app,
                1,
                true,
            ))],
            ring: None,
        });
        cluster
    }

    /// A cluster that follows `endpoints` until `shutdown`; endpoints
    /// with a sidecar are dialled with mutual TLS as `mesh`.
    pub fn follow(
        config: Upstream,
        endpoints: Endpoints,
        shutdown: ShutdownToken,
        mesh: Option<crate::tls::MeshTls>,
    ) -> Arc<Self> {
        Self::follow_with(config, endpoints, shutdown, mesh, None)
    }

    fn follow_with(
        config: Upstream,
        mut endpoints: Endpoints,
        shutdown: ShutdownToken,
        mesh: Option<crate::tls::MeshTls>,
        subset: Option<Subset>,
    ) -> Arc<Self> {
        let cluster = Arc::new(Cluster {
            mesh,
            subset,
            ..Self::new(config, Source::Registry)
        });
        // What discovery already knows (a service followed for another
        // cluster): in the table before the first request, not after.
        cluster.follow_update(Arc::clone(&endpoints.borrow_and_update()));
        let weak = Arc::downgrade(&cluster);
        let name = cluster.config().name.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = endpoints.changed() => {
                        if changed.is_err() {
                            tracing::debug!(upstream = %name, "discovery ended");
                            return;
                        }
                    }
                }
                let set = Arc::clone(&endpoints.borrow_and_update());
                // The cluster is gone (the proxy shut down): stop.
                let Some(cluster) = weak.upgrade() else {
                    return;
                };
                cluster.follow_update(set);
            }
        });
        cluster
    }

    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// The upstream's settings now.
    pub fn config(&self) -> Arc<Upstream> {
        self.config.load_full()
    }

    /// Applies new settings for the same upstream (a config reload):
    /// requests in flight finish under the settings they started with,
    /// endpoint counters and ejections are kept, and the table is rebuilt
    /// when the tag filter or the balancer changed.
    pub fn reconfigure(&self, config: Upstream) {
        let old = self.config.swap(Arc::new(config));
        let new = self.config();
        if old.tag == new.tag && old.balance == new.balance {
            return;
        }
        match self.source {
            Source::Registry => {
                // Under the lock: an update racing with this one used
                // either the new settings or is redone here with them.
                let last = self.last_set.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(set) = &*last {
                    self.update(set);
                }
            }
            Source::Local => {
                let table = self.table();
                self.install(Table {
                    index: table.index,
                    ready: table.ready,
                    endpoints: table.endpoints.clone(),
                    ring: None,
                });
            }
        }
    }

    /// A discovery update: kept for [`Cluster::reconfigure`], then applied.
    fn follow_update(&self, set: Arc<EndpointSet>) {
        let mut last = self.last_set.lock().unwrap_or_else(|e| e.into_inner());
        self.update(&set);
        *last = Some(set);
        self.updated.notify_waiters();
    }

    fn install(&self, mut table: Table) {
        if self.config().balance == Balance::RingHash {
            table.ring = Some(Ring::build(&table.endpoints));
        }
        self.table.store(Arc::new(table));
    }

    /// Rebuilds the table from a discovery update.
    fn update(&self, set: &EndpointSet) {
        let config = self.config();
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let mut kept = HashMap::new();
        let mut endpoints = Vec::new();
        for endpoint in set.value.values() {
            if let Some(tag) = &config.tag
                && !endpoint.tags.contains(tag)
            {
                continue;
            }
            if let Some(subset) = &self.subset
                && (subset.only_passing && endpoint.health != Health::Passing as i32
                    || subset
                        .filter
                        .as_ref()
                        .is_some_and(|f| !f.matches(&FilterView(endpoint))))
            {
                continue;
            }
            let Some(mut state) = endpoint_state(endpoint) else {
                tracing::warn!(upstream = %config.name, endpoint = %endpoint.key, address = %endpoint.address, "endpoint address is not an IP address; skipped");
                continue;
            };
            let id = (state.key.clone(), state.addr);
            let shared = stats.get(&id).cloned().unwrap_or_default();
            state.stats = Arc::clone(&shared);
            kept.insert(id, shared);
            endpoints.push(Arc::new(state));
        }
        *stats = kept;
        drop(stats);
        tracing::info!(upstream = %config.name, index = set.index, endpoints = endpoints.len(), healthy = endpoints.iter().filter(|e| e.healthy).count(), "endpoints updated");
        self.install(Table {
            index: set.index,
            ready: set.ready,
            endpoints,
            ring: None,
        });
    }

    /// Picks an endpoint, avoiding `tried` when others are left. `config`
    /// is the settings the request runs under (read once per request).
    pub fn pick(
        &self,
        config: &Upstream,
        hash: Option<u64>,
        tried: &[SocketAddr],
    ) -> Option<Arc<EndpointState>> {
        let table = self.table();
        let all = &table.endpoints;
        if all.is_empty() {
            return None;
        }
        let healthy = all.iter().filter(|e| e.healthy).count();
        let panic = healthy * 100 < all.len() * PANIC_THRESHOLD_PERCENT;
        if panic != self.panicking.load(Ordering::Relaxed) {
            self.panicking.store(panic, Ordering::Relaxed);
            if panic {
                tracing::warn!(upstream = %config.name, healthy, total = all.len(), "fewer than {PANIC_THRESHOLD_PERCENT}% of endpoints are healthy: panic mode, using all of them");
            } else {
                tracing::info!(upstream = %config.name, "out of panic mode");
            }
        }
        // The clock only matters once some endpoint has been ejected.
        let now = if all
            .iter()
            .any(|e| e.stats.ejected_until_ms.load(Ordering::Relaxed) != 0)
        {
            now_ms()
        } else {
            0
        };
        let usable = |i: usize| panic || all[i].healthy;
        // Healthy (or all, in panic), not ejected, not tried yet; each
        // condition is dropped, last first, when nothing would be left.
        // Gathered on the stack for small clusters: no allocation per pick.
        let mut stack = [0usize; SMALL_CLUSTER];
        let mut heap = Vec::new();
        let mut gather = |keep: &dyn Fn(usize) -> bool| {
            if all.len() <= SMALL_CLUSTER {
                let mut n = 0;
                for i in (0..all.len()).filter(|&i| keep(i)) {
                    stack[n] = i;
                    n += 1;
                }
                n
            } else {
                heap.clear();
                heap.extend((0..all.len()).filter(|&i| keep(i)));
                heap.len()
            }
        };
        let mut n =
            gather(&|i| usable(i) && !all[i].ejected_at(now) && !tried.contains(&all[i].addr));
        if n == 0 {
            n = gather(&|i| usable(i) && !all[i].ejected_at(now));
        }
        if n == 0 {
            n = gather(&usable);
        }
        let candidates = if all.len() <= SMALL_CLUSTER {
            &stack[..n]
        } else {
            &heap[..]
        };
        let counter = self.round_robin.fetch_add(1, Ordering::Relaxed);
        balance::pick(
            config.balance,
            all,
            candidates,
            counter,
            table.ring.as_ref(),
            hash,
        )
        .map(|i| Arc::clone(&all[i]))
    }

    pub fn view(&self) -> Vec<EndpointView> {
        let now = now_ms();
        self.table()
            .endpoints
            .iter()
            .map(|e| {
                let until = e.stats.ejected_until_ms.load(Ordering::Relaxed);
                EndpointView {
                    key: e.key.clone(),
                    address: e.addr.to_string(),
                    weight: e.weight,
                    health: e.health,
                    tls: if e.sidecar && self.mesh.is_some() {
                        "mesh"
                    } else {
                        "plain"
                    },
                    ejected: e.ejected_at(now),
                    ejected_for_ms: until.saturating_sub(now),
                    ejections: e.stats.ejections.load(Ordering::Relaxed),
                    in_flight: e.in_flight(),
                    consecutive_failures: e.stats.consecutive_failures.load(Ordering::Relaxed),
                    requests: e.stats.requests.load(Ordering::Relaxed),
                    failures: e.stats.failures.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    pub fn panicking(&self) -> bool {
        self.panicking.load(Ordering::Relaxed)
    }
}

/// An endpoint from the registry as the proxy dials it: at its sidecar's
/// inbound port when it advertises one, else at its own port.
fn endpoint_state(endpoint: &Endpoint) -> Option<EndpointState> {
    let ip: IpAddr = endpoint.address.parse().ok()?;
    let inbound = endpoint
        .meta
        .get(INBOUND_PORT_META)
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0);
    let port = inbound.or_else(|| u16::try_from(endpoint.port).ok())?;
    let health = Health::try_from(endpoint.health).unwrap_or(Health::Critical);
    let (healthy, weight, health) = match health {
        Health::Passing => (true, endpoint.weight_passing, "passing"),
        Health::Warning => (true, endpoint.weight_warning, "warning"),
        Health::Maintenance => (false, 1, "maintenance"),
        Health::Critical | Health::Unspecified => (false, 1, "critical"),
    };
    let addr = SocketAddr::new(ip, port);
    Some(EndpointState {
        key: endpoint.key.clone(),
        authority: authority_of(addr),
        addr,
        weight: if weight == 0 { 1 } else { weight },
        healthy,
        health,
        sidecar: inbound.is_some(),
        stats: Arc::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn upstream() -> Upstream {
        let text = r#"
[registry]
addresses = ["127.0.0.1:8502"]
[service]
name = "web"
port = 8080
[[upstreams]]
name = "api"
listen = "127.0.0.1:9191"
protocol = "http"
outlier = { consecutive_5xx = 2, base_ejection = "30s", max_ejection_percent = 50 }
"#;
        let mut c = Config::parse("t.toml", text).expect("valid");
        c.upstreams.remove(0)
    }

    fn endpoint(i: u8, health: Health, inbound: Option<u16>) -> Endpoint {
        Endpoint {
            key: format!("n{i}/api-{i}"),
            address: format!("127.0.0.{i}"),
            port: 8000,
            health: health as i32,
            weight_passing: 1,
            weight_warning: 1,
            meta: inbound
                .map(|p| (INBOUND_PORT_META.to_owned(), p.to_string()))
                .into_iter()
                .collect(),
            ..Endpoint::default()
        }
    }

    fn cluster(endpoints: Vec<Endpoint>) -> Cluster {
        let c = Cluster::new(upstream(), Source::Registry);
        c.update(&EndpointSet {
            index: 7,
            ready: true,
            value: endpoints.into_iter().map(|e| (e.key.clone(), e)).collect(),
        });
        c
    }

    #[test]
    fn sidecar_endpoints_are_dialled_at_their_inbound_port() {
        let c = cluster(vec![endpoint(1, Health::Passing, Some(21000))]);
        let picked = c.pick(&c.config(), None, &[]).expect("one");
        assert_eq!(picked.addr, "127.0.0.1:21000".parse().expect("addr"));
        assert!(picked.sidecar);
        let c = cluster(vec![endpoint(1, Health::Passing, None)]);
        let picked = c.pick(&c.config(), None, &[]).expect("one");
        assert_eq!(picked.addr, "127.0.0.1:8000".parse().expect("addr"));
        assert!(!picked.sidecar);
    }

    #[test]
    fn only_healthy_endpoints_unless_in_panic() {
        let c = cluster(vec![
            endpoint(1, Health::Passing, None),
            endpoint(2, Health::Critical, None),
        ]);
        for _ in 0..20 {
            assert_eq!(c.pick(&c.config(), None, &[]).expect("one").key, "n1/api-1");
        }
        assert!(!c.panicking());
        let c = cluster(vec![
            endpoint(1, Health::Passing, None),
            endpoint(2, Health::Critical, None),
            endpoint(3, Health::Critical, None),
        ]);
        let picked: std::collections::HashSet<String> = (0..30)
            .map(|_| c.pick(&c.config(), None, &[]).expect("one").key.clone())
            .collect();
        assert_eq!(picked.len(), 3, "panic mode uses every endpoint");
        assert!(c.panicking());
    }

    #[test]
    fn retries_avoid_tried_endpoints() {
        let c = cluster(vec![
            endpoint(1, Health::Passing, None),
            endpoint(2, Health::Passing, None),
        ]);
        let first = c.pick(&c.config(), None, &[]).expect("one");
        for _ in 0..10 {
            assert_ne!(
                c.pick(&c.config(), None, &[first.addr]).expect("one").addr,
                first.addr
            );
        }
    }

    #[test]
    fn consecutive_failures_eject_within_the_share() {
        let c = cluster(vec![
            endpoint(1, Health::Passing, None),
            endpoint(2, Health::Passing, None),
        ]);
        let table = c.table();
        let (a, b) = (&table.endpoints[0], &table.endpoints[1]);
        c.report(a, true);
        c.report(a, false);
        c.report(a, true);
        assert!(!a.ejected(), "a success resets the streak");
        c.report(a, true);
        assert!(a.ejected());
        for _ in 0..20 {
            assert_eq!(c.pick(&c.config(), None, &[]).expect("one").key, b.key);
        }
        c.report(b, true);
        c.report(b, true);
        assert!(!b.ejected(), "at most 50% ejected");
        // Stats survive a table update.
        c.update(&EndpointSet {
            index: 8,
            ready: true,
            value: [
                endpoint(1, Health::Passing, None),
                endpoint(2, Health::Passing, None),
            ]
            .into_iter()
            .map(|e| (e.key.clone(), e))
            .collect(),
        });
        assert!(c.table().endpoints[0].ejected());
    }
}
