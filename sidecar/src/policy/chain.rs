//! The discovery chain applied to outbound calls: the registry's
//! `service-router`, `service-splitter` and `service-resolver` entries,
//! followed live and compiled per upstream with `meshwork_core::chain`
//! (the code the registry validates them with at `PUT`).
//!
//! Per request, [`Routing::choose`] runs the router and the splitter,
//! fails over to the resolver's failover targets when the chosen target
//! has no healthy endpoint, applies the route's path rewrite and the
//! header changes, and hands the request to the target's own proxy (a
//! cluster of the target's instances, subset filter applied, with the
//! route's timeout and retries). Target proxies are made once per chain
//! version, all at once, into an immutable table, so failover targets are
//! warm; a new chain's table replaces the old one with a pointer swap
//! (requests in flight finish on the table they started on), and a
//! request reads it without a lock. A tcp upstream's connections follow
//! the resolver alone ([`Routing::choose_connection`]). A chain that does
//! not compile keeps the previous one and is logged and reported.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use hyper::Request;
use meshwork_core::chain::{Chain, Destination, Entries, Fault, HeaderMods, Target};
use meshwork_proto::v1::ConfigEntry;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::applied::{AppliedConfig, Consumer};
use crate::discovery::{ConfigEntries, Discovery, TopicState};

const KINDS: [&str; 4] = [
    "service-router",
    "service-splitter",
    "service-resolver",
    "service-defaults",
];

/// The kinds' entries, followed once per sidecar, and where each
/// upstream's chain says what it applied.
#[derive(Debug, Clone)]
pub struct ChainEntries {
    kinds: [ConfigEntries; 4],
    applied: AppliedConfig,
}

/// Faults injected, by kind (for `/metrics`).
pub static FAULTS_DELAYED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub static FAULTS_ABORTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `/metrics` lines of the faults injected.
pub fn render_metrics() -> String {
    use std::sync::atomic::Ordering;
    format!(
        "# HELP meshwork_sidecar_faults_injected_total Requests an injected fault delayed or aborted.\n# TYPE meshwork_sidecar_faults_injected_total counter\nmeshwork_sidecar_faults_injected_total{{kind=\"delay\"}} {}\nmeshwork_sidecar_faults_injected_total{{kind=\"abort\"}} {}\n",
        FAULTS_DELAYED.load(Ordering::Relaxed),
        FAULTS_ABORTED.load(Ordering::Relaxed),
    )
}

impl ChainEntries {
    pub fn follow(discovery: &Discovery, applied: AppliedConfig) -> Self {
        Self {
            kinds: KINDS.map(|kind| discovery.config_entries(kind)),
            applied,
        }
    }
}

/// The chain an upstream applies now.
#[derive(Debug, Default)]
pub struct Applied {
    /// `None` until every kind's first snapshot arrived.
    pub chain: Option<Arc<Chain>>,
    /// The highest config-entry index it reflects.
    pub index: u64,
    /// Each kind's index (what the sidecar reports as applied).
    pub indexes: Vec<(&'static str, u64)>,
    /// Why the latest entries were not applied (the previous chain stays).
    pub refused: Option<String>,
}

/// Bodies by (kind, name), envelope removed.
struct Bodies(HashMap<(&'static str, String), Map<String, Value>>);

impl Entries for Bodies {
    fn entry(&self, kind: &str, name: &str) -> Option<&Map<String, Value>> {
        let kind = KINDS.iter().find(|k| **k == kind)?;
        self.0.get(&(*kind, name.to_owned()))
    }
}

fn bodies(states: &[Arc<TopicState<BTreeMap<String, ConfigEntry>>>]) -> Result<Bodies, String> {
    let mut out = HashMap::new();
    for (kind, state) in KINDS.iter().zip(states) {
        for (name, entry) in &state.value {
            out.insert((*kind, name.clone()), super::entry_body(entry)?);
        }
    }
    Ok(Bodies(out))
}

/// Which requests a chain sees: HTTP ones (router, splitter and resolver),
/// or connections of a tcp upstream (the resolver only, as in Consul:
/// a router or splitter for the service is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Http,
    Tcp,
}

/// Compiles the chain of calls to `service` on every change of the
/// entries, until `shutdown`. What it applied is reported by the
/// [`Routing`] that uses it, once its table is in place.
pub fn follow(
    entries: &ChainEntries,
    service: String,
    layer: Layer,
    shutdown: CancellationToken,
) -> (watch::Receiver<Arc<Applied>>, Consumer) {
    let (tx, rx) = watch::channel(Arc::new(Applied::default()));
    let mut kinds = entries.kinds.clone();
    let consumer: Consumer = entries
        .applied
        .consumer(format!("upstream {service}"), &KINDS);
    tokio::spawn(async move {
        loop {
            let states: Vec<_> = kinds
                .iter_mut()
                .map(|k| Arc::clone(&k.borrow_and_update()))
                .collect();
            if states.iter().all(|s| s.ready) {
                let index = states.iter().map(|s| s.index).max().unwrap_or(0);
                let indexes: Vec<_> = KINDS
                    .iter()
                    .copied()
                    .zip(states.iter().map(|s| s.index))
                    .collect();
                let compiled = bodies(&states).and_then(|b| match layer {
                    Layer::Http => Chain::compile(&service, &b),
                    Layer::Tcp => Chain::compile_l4(&service, &b),
                });
                let previous = tx.borrow().chain.clone();
                let applied = match compiled {
                    Ok(chain) => {
                        tracing::info!(upstream = %service, index, plain = chain.is_plain(), targets = chain.targets.len(), "discovery chain applied");
                        Applied {
                            chain: Some(Arc::new(chain)),
                            index,
                            indexes,
                            refused: None,
                        }
                    }
                    Err(why) => {
                        tracing::warn!(upstream = %service, index, error = %why, "discovery chain refused; keeping the previous one");
                        Applied {
                            chain: previous,
                            index,
                            indexes,
                            refused: Some(why),
                        }
                    }
                };
                if tx.send(Arc::new(applied)).is_err() {
                    return;
                }
            }
            let [a, b, c, d] = &mut kinds;
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = a.changed() => if changed.is_err() { return },
                changed = b.changed() => if changed.is_err() { return },
                changed = c.changed() => if changed.is_err() { return },
                changed = d.changed() => if changed.is_err() { return },
            }
        }
    });
    (rx, consumer)
}

/// What answers for one target (the HTTP proxy of its cluster, or the
/// cluster of a tcp upstream's target): all the routing needs of it is
/// whether it could take a request now.
pub trait TargetProxy {
    /// Some endpoint is healthy and not ejected.
    fn has_healthy(&self) -> bool;
}

/// Makes the proxy of one target, with the settings of the destination
/// that leads to it.
pub type MakeProxy<P> = dyn Fn(&Target, &Destination) -> Arc<P> + Send + Sync;

/// One outbound listener's routing: its chain and the target proxies,
/// compiled into one immutable [`Table`] per chain version. A request
/// reads the table with an atomic load (no lock) and keeps it until it
/// is done; a new chain's table is made whole, then swapped in.
pub struct Routing<P> {
    applied: watch::Receiver<Arc<Applied>>,
    /// `None`: no chain yet, or a plain one (the listener's own cluster
    /// serves).
    table: ArcSwapOption<Table<P>>,
}

impl<P> std::fmt::Debug for Routing<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing").finish_non_exhaustive()
    }
}

/// The target proxies of one chain version, by (route, target): route
/// `None` is the default route. A flat table (slot
/// `(route + 1) * targets + target`, the default route first): a request
/// finds its proxy by index, not by hashing.
struct Table<P> {
    chain: Arc<Chain>,
    targets: usize,
    proxies: Vec<Option<Arc<P>>>,
}

impl<P> Table<P> {
    fn slot(&self, route: Option<usize>, target: usize) -> usize {
        route.map_or(0, |r| r + 1) * self.targets + target
    }

    fn get(&self, route: Option<usize>, target: usize) -> Option<&Arc<P>> {
        self.proxies.get(self.slot(route, target))?.as_ref()
    }

    /// The proxy for `target` on `route`, or the first of its failover
    /// targets (in order) with a healthy endpoint when it has none; with
    /// none healthy anywhere, the target's own (its "no healthy upstream"
    /// answers).
    fn healthy(&self, route: Option<usize>, target: usize) -> Option<&Arc<P>>
    where
        P: TargetProxy,
    {
        let proxy = self.get(route, target)?;
        if proxy.has_healthy() {
            return Some(proxy);
        }
        self.chain.targets[target]
            .failover
            .iter()
            .filter_map(|f| self.get(route, *f))
            .find(|p| p.has_healthy())
            .or(Some(proxy))
    }
}

/// What [`Routing::choose`] decided.
pub struct Chosen<P> {
    pub proxy: Arc<P>,
    /// The chain, route and split chosen (for the response's header
    /// changes, applied by [`Chosen::change_response`]).
    chain: Arc<Chain>,
    route: Option<usize>,
    split: usize,
    /// The fault to inject (the route's, else the target service's).
    pub fault: Option<Fault>,
    /// A hash cookie the sidecar made for this client (`Set-Cookie` on
    /// the response; see [`sticky_cookie`]).
    pub set_cookie: Option<hyper::header::HeaderValue>,
}

impl<P: TargetProxy + Send + Sync + 'static> Routing<P> {
    /// The routing of one listener, and the task that makes each new
    /// chain's table as soon as it is applied (not at its first request:
    /// a target's cluster then has its endpoints by the time a request
    /// comes, and a service no upstream followed before does not start
    /// empty and answer the first requests with 503), swaps it in and
    /// then reports the chain applied (`consumer`). It ends with the
    /// routing.
    pub fn start(
        (applied, consumer): (watch::Receiver<Arc<Applied>>, Consumer),
        make: Box<MakeProxy<P>>,
    ) -> Arc<Self> {
        let routing = Arc::new(Self {
            applied: applied.clone(),
            table: ArcSwapOption::empty(),
        });
        let weak = Arc::downgrade(&routing);
        let mut changes = applied;
        tokio::spawn(async move {
            let mut made: Option<Arc<Chain>> = None;
            loop {
                let now = Arc::clone(&changes.borrow_and_update());
                let Some(routing) = weak.upgrade() else {
                    return;
                };
                let same = match (&made, &now.chain) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    let table = now
                        .chain
                        .as_ref()
                        .filter(|c| !c.is_plain())
                        .map(|chain| Arc::new(make_table(chain, &make)));
                    routing.table.store(table);
                    made.clone_from(&now.chain);
                }
                drop(routing);
                consumer.applied(&now.indexes, now.refused.clone());
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        routing
    }
}

impl<P: TargetProxy> Routing<P> {
    /// The target proxies of the chain in use, for `/metrics` and
    /// `/clusters`: (route — `default` or the router's route number —,
    /// target id, proxy), sorted.
    pub fn target_proxies(&self) -> Vec<(String, String, Arc<P>)> {
        let table = self.table.load();
        let Some(table) = table.as_ref() else {
            return Vec::new();
        };
        let mut out: Vec<_> = table
            .proxies
            .iter()
            .enumerate()
            .filter_map(|(slot, proxy)| {
                let proxy = proxy.as_ref()?;
                let (route, target) = (slot / table.targets, slot % table.targets);
                let route = match route {
                    0 => "default".to_owned(),
                    r => (r - 1).to_string(),
                };
                Some((
                    route,
                    table.chain.targets.get(target)?.id.clone(),
                    Arc::clone(proxy),
                ))
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    /// The chain applied now (for `/config`).
    pub fn applied(&self) -> Arc<Applied> {
        Arc::clone(&self.applied.borrow())
    }

    /// Routes `req`: `None` when no entry changes anything (the listener's
    /// own cluster serves it); otherwise the target's proxy, with the
    /// request already rewritten.
    pub fn choose<B>(&self, req: &mut Request<B>) -> Option<Chosen<P>> {
        let table = self.table.load();
        let table = table.as_ref()?;
        let chain = &table.chain;
        let (route, dest) = chain.route(
            req.method().as_str(),
            req.uri().path(),
            req.uri().query(),
            req.headers(),
        );
        let split = dest.pick(rand::random_range(0..10_000));
        let split_index = dest
            .splits
            .iter()
            .position(|s| std::ptr::eq(s, split))
            .unwrap_or(0);
        let target = &chain.targets[split.target];
        let proxy = Arc::clone(table.healthy(route, split.target)?);
        let set_cookie = sticky_cookie(target, req);
        let fault = dest.fault.clone().or_else(|| target.fault.clone());
        apply(&dest.request_headers, req.headers_mut());
        apply(&split.request_headers, req.headers_mut());
        if let Some(path) = dest.rewrite(req.uri().path()) {
            let path_and_query = match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            let mut parts = req.uri().clone().into_parts();
            if let Ok(pq) = path_and_query.parse() {
                parts.path_and_query = Some(pq);
                if let Ok(uri) = hyper::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
        }
        Some(Chosen {
            proxy,
            chain: Arc::clone(chain),
            route,
            split: split_index,
            fault,
            set_cookie,
        })
    }

    /// Routes a connection of a tcp upstream: `None` when no entry changes
    /// anything; otherwise the proxy of the resolver's target (its subset,
    /// or a redirect's service), or of its first failover target with a
    /// healthy endpoint when it has none.
    pub fn choose_connection(&self) -> Option<Arc<P>> {
        let table = self.table.load();
        let table = table.as_ref()?;
        let split = table.chain.destination(None).pick(0);
        table.healthy(None, split.target).map(Arc::clone)
    }
}

/// Every (route, target) proxy of `chain`, failover targets included.
fn make_table<P>(chain: &Arc<Chain>, make: &MakeProxy<P>) -> Table<P> {
    let routes = chain.destinations().count();
    let mut table = Table {
        chain: Arc::clone(chain),
        targets: chain.targets.len(),
        proxies: Vec::new(),
    };
    table
        .proxies
        .resize_with(routes * chain.targets.len(), || None);
    for (route, dest) in chain.destinations() {
        let mut wanted: Vec<usize> = dest.splits.iter().map(|s| s.target).collect();
        let mut i = 0;
        while i < wanted.len() {
            for f in &chain.targets[wanted[i]].failover {
                if !wanted.contains(f) {
                    wanted.push(*f);
                }
            }
            i += 1;
        }
        for t in wanted {
            let slot = table.slot(route, t);
            if let Some(place) = table.proxies.get_mut(slot)
                && place.is_none()
            {
                *place = Some(make(&chain.targets[t], dest));
            }
        }
    }
    table
}

/// A cookie the sidecar set on this request's response (its value is what
/// the request hashes on: it had none of its own); put in the request's
/// extensions by `policy::chain`.
#[derive(Debug, Clone)]
pub struct GeneratedCookie {
    pub name: String,
    pub value: String,
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn request_cookie<'h>(headers: &'h hyper::HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v.trim_matches('"'))
        })
}

/// A ring-hash target whose hash policy is a cookie the sidecar sets
/// (`CookieConfig` with a `TTL` or `Session`), for a request that has no
/// such cookie: a new random value, which the request hashes on (a request
/// extension the balancer reads) and the response sets, so the client's
/// next requests go to the same endpoint (Envoy's generated cookies).
fn sticky_cookie<B>(target: &Target, req: &mut Request<B>) -> Option<hyper::header::HeaderValue> {
    use meshwork_core::chain::HashOn;
    let lb = target.load_balancer.as_ref()?;
    let (name, ttl, path) = lb.hash_policies.iter().find_map(|p| match &p.on {
        HashOn::Cookie {
            name,
            ttl,
            session,
            path,
        } if ttl.is_some() || *session => Some((name, ttl, path)),
        _ => None,
    })?;
    if request_cookie(req.headers(), name).is_some() {
        return None;
    }
    let value = format!("{:016x}", rand::random::<u64>());
    let mut header = format!(
        "{name}={value}; Path={}; HttpOnly",
        path.as_deref().unwrap_or("/")
    );
    if let Some(ttl) = ttl {
        header.push_str(&format!("; Max-Age={}", ttl.as_secs().max(1)));
    }
    let header = hyper::header::HeaderValue::from_str(&header).ok()?;
    req.extensions_mut().insert(GeneratedCookie {
        name: name.clone(),
        value,
    });
    Some(header)
}

impl<P> Chosen<P> {
    /// The destination's and the split's response header changes.
    pub fn change_response(&self, headers: &mut hyper::HeaderMap) {
        let dest = self.chain.destination(self.route);
        apply(&dest.response_headers, headers);
        if let Some(cookie) = &self.set_cookie {
            headers.append(hyper::header::SET_COOKIE, cookie.clone());
        }
        if let Some(split) = dest.splits.get(self.split) {
            apply(&split.response_headers, headers);
        }
    }
}

/// Applies Add (append), Set (replace) and Remove to `headers`.
#[inline]
pub fn apply(mods: &HeaderMods, headers: &mut hyper::HeaderMap) {
    if !mods.is_empty() {
        apply_mods(mods, headers);
    }
}

fn apply_mods(mods: &HeaderMods, headers: &mut hyper::HeaderMap) {
    use hyper::header::{HeaderName, HeaderValue};
    for name in &mods.remove {
        if let Ok(name) = HeaderName::try_from(name.as_str()) {
            headers.remove(name);
        }
    }
    for (name, value) in &mods.set {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            headers.insert(name, value);
        }
    }
    for (name, value) in &mods.add {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            headers.append(name, value);
        }
    }
}
