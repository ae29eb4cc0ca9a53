//! The discovery chain applied to outbound HTTP calls: the registry's
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
//! version, all at once, so failover targets are warm; a new chain
//! replaces them (requests in flight finish on the ones they started on).
//! A chain that does not compile keeps the previous one and is logged.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

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

/// Compiles the chain of calls to `service` on every change of the
/// entries, until `shutdown`.
pub fn follow(
    entries: &ChainEntries,
    service: String,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<Applied>> {
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
                let compiled = bodies(&states).and_then(|b| Chain::compile(&service, &b));
                let previous = tx.borrow().chain.clone();
                let applied = match compiled {
                    Ok(chain) => {
                        tracing::info!(upstream = %service, index, plain = chain.is_plain(), targets = chain.targets.len(), "discovery chain applied");
                        Applied {
                            chain: Some(Arc::new(chain)),
                            index,
                            refused: None,
                        }
                    }
                    Err(why) => {
                        tracing::warn!(upstream = %service, index, error = %why, "discovery chain refused; keeping the previous one");
                        Applied {
                            chain: previous,
                            index,
                            refused: Some(why),
                        }
                    }
                };
                consumer.applied(&indexes, applied.refused.clone());
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
    rx
}

/// What answers for one target (the HTTP proxy of its cluster): all the
/// routing needs of it is whether it could take a request now.
pub trait TargetProxy {
    /// Some endpoint is healthy and not ejected.
    fn has_healthy(&self) -> bool;
}

/// Makes the proxy of one target, with the settings of the destination
/// that leads to it.
pub type MakeProxy<P> = dyn Fn(&Target, &Destination) -> Arc<P> + Send + Sync;

/// One outbound listener's routing: its chain and the target proxies.
pub struct Routing<P> {
    applied: watch::Receiver<Arc<Applied>>,
    made: RwLock<Made<P>>,
    make: Box<MakeProxy<P>>,
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
struct Made<P> {
    chain: Option<Arc<Chain>>,
    targets: usize,
    proxies: Vec<Option<Arc<P>>>,
}

impl<P> Default for Made<P> {
    fn default() -> Self {
        Self {
            chain: None,
            targets: 0,
            proxies: Vec::new(),
        }
    }
}

impl<P> Made<P> {
    fn slot(&self, route: Option<usize>, target: usize) -> usize {
        route.map_or(0, |r| r + 1) * self.targets + target
    }

    fn get(&self, route: Option<usize>, target: usize) -> Option<&Arc<P>> {
        self.proxies.get(self.slot(route, target))?.as_ref()
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

impl<P: TargetProxy> Routing<P> {
    pub fn new(applied: watch::Receiver<Arc<Applied>>, make: Box<MakeProxy<P>>) -> Self {
        Self {
            applied,
            made: RwLock::default(),
            make,
        }
    }

    /// [`Routing::new`], and a task that makes each new chain's target
    /// proxies as soon as it is applied (not at its first request): a
    /// target's cluster then has its endpoints by the time a request
    /// comes (a service no upstream followed before would otherwise start
    /// empty and answer the first requests with 503). It ends with the
    /// routing.
    pub fn start(applied: watch::Receiver<Arc<Applied>>, make: Box<MakeProxy<P>>) -> Arc<Self>
    where
        P: Send + Sync + 'static,
    {
        let routing = Arc::new(Self::new(applied.clone(), make));
        let weak = Arc::downgrade(&routing);
        let mut changes = applied;
        tokio::spawn(async move {
            loop {
                let chain = changes.borrow_and_update().chain.clone();
                match (weak.upgrade(), chain) {
                    (None, _) => return,
                    (Some(routing), Some(chain)) if !chain.is_plain() => routing.prepare(&chain),
                    _ => {}
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        routing
    }

    /// Makes `chain`'s target proxies unless they are made already.
    fn prepare(&self, chain: &Arc<Chain>) {
        let current = |made: &Made<P>| made.chain.as_ref().is_some_and(|c| Arc::ptr_eq(c, chain));
        if current(&self.made.read().unwrap_or_else(|e| e.into_inner())) {
            return;
        }
        let mut made = self.made.write().unwrap_or_else(|e| e.into_inner());
        if !current(&made) {
            *made = self.make_all(chain);
        }
    }

    /// The target proxies of the chain in use, for `/metrics` and
    /// `/clusters`: (route — `default` or the router's route number —,
    /// target id, proxy), sorted.
    pub fn target_proxies(&self) -> Vec<(String, String, Arc<P>)> {
        let made = self.made.read().unwrap_or_else(|e| e.into_inner());
        let Some(chain) = made.chain.as_ref() else {
            return Vec::new();
        };
        let mut out: Vec<_> = made
            .proxies
            .iter()
            .enumerate()
            .filter_map(|(slot, proxy)| {
                let proxy = proxy.as_ref()?;
                let (route, target) = (slot / made.targets, slot % made.targets);
                let route = match route {
                    0 => "default".to_owned(),
                    r => (r - 1).to_string(),
                };
                Some((
                    route,
                    chain.targets.get(target)?.id.clone(),
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
        let chain = self.applied.borrow().chain.clone()?;
        if chain.is_plain() {
            return None;
        }
        let (route, dest) = chain.route(
            req.method().as_str(),
            req.uri().path(),
            req.uri().query(),
            req.headers(),
        );
        let split = dest.pick(rand::random_range(0..10_000));
        // Made already by the task of `start`, unless this request came
        // first (then it makes them; the others wait).
        let mut made = self.made.read().unwrap_or_else(|e| e.into_inner());
        if !made.chain.as_ref().is_some_and(|c| Arc::ptr_eq(c, &chain)) {
            drop(made);
            self.prepare(&chain);
            made = self.made.read().unwrap_or_else(|e| e.into_inner());
        }
        let split_index = dest
            .splits
            .iter()
            .position(|s| std::ptr::eq(s, split))
            .unwrap_or(0);
        let target = &chain.targets[split.target];
        let mut proxy = made.get(route, split.target)?;
        if !proxy.has_healthy() {
            // The resolver's failover, in order; with none healthy, the
            // target itself answers (503 no healthy upstream).
            if let Some(next) = target
                .failover
                .iter()
                .filter_map(|f| made.get(route, *f))
                .find(|p| p.has_healthy())
            {
                proxy = next;
            }
        }
        let proxy = Arc::clone(proxy);
        drop(made);
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
            chain: Arc::clone(&chain),
            route,
            split: split_index,
            fault,
            set_cookie,
        })
    }

    /// Every (route, target) proxy of `chain`, failover targets included.
    fn make_all(&self, chain: &Arc<Chain>) -> Made<P> {
        let routes = chain.destinations().count();
        let mut made = Made {
            chain: Some(Arc::clone(chain)),
            targets: chain.targets.len(),
            proxies: Vec::new(),
        };
        made.proxies
            .resize_with(routes * chain.targets.len(), || None);
        let mut add = |route: Option<usize>, dest: &Destination| {
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
                let slot = made.slot(route, t);
                if let Some(place) = made.proxies.get_mut(slot)
                    && place.is_none()
                {
                    *place = Some((self.make)(&chain.targets[t], dest));
                }
            }
        };
        for (i, dest) in chain.destinations() {
            add(i, dest);
        }
        made
    }
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
