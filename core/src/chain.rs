//! Consul's discovery chain, compiled: what `service-router`,
//! `service-splitter` and `service-resolver` entries make of the calls to
//! one service. A request goes router → splitter → resolver → subset →
//! endpoints; the compiled [`Chain`] answers the first three steps without
//! allocating ([`Chain::route`], [`Destination::pick`]) and lists the
//! targets (a service, optionally a subset of its instances by filter)
//! whose endpoints the caller keeps.
//!
//! Semantics, as Consul's compiler has them:
//! - routes are tried in order, the first match wins; a route without a
//!   match takes everything; after the routes comes the default route to
//!   the service itself;
//! - a destination (route or default) with a `ServiceSubset` goes straight
//!   to that service's resolver; without one it goes to the service's
//!   splitter when it has one (splits to another service with its own
//!   splitter are flattened, weights multiplied), else to its resolver;
//! - a resolver `Redirect` sends the service elsewhere (loops refused); a
//!   subset left out is the resolver's `DefaultSubset`; a named subset must
//!   exist; `Failover` (by subset, or `*`) lists the targets tried, in
//!   order, when a target has no healthy endpoint;
//! - split weights are percentages with two decimals and add up to 100.
//!
//! Owns: reading the three kinds and deciding per request. Does not touch:
//! endpoints, health, sending (the sidecar), storage (the registry, which
//! calls [`validate_entry`] on write).

use std::time::Duration;

use serde_json::{Map, Value};

use crate::filter::Filter;
use crate::intentions::HeaderValues;
use crate::intentions::fields::{array, boolean, fields, join, nonempty_string, object};
use crate::intentions::matching::Permission;
use crate::intentions::permission::parse_permission;

/// Redirects and nested splitters followed at most this deep.
const MAX_DEPTH: usize = 8;
/// Split weights in units of 0.01 %.
const WHOLE: u32 = 10_000;

pub use crate::entries::Entries;

/// The compiled chain for calls to one service.
#[derive(Debug)]
pub struct Chain {
    pub service: String,
    routes: Vec<Route>,
    default: Destination,
    /// Every target any destination or failover names, each once.
    pub targets: Vec<Target>,
    /// Worked out once ([`Chain::is_plain`]: asked per request).
    plain: bool,
}

#[derive(Debug)]
struct Route {
    http: Option<Permission>,
    query: Vec<QueryMatch>,
    dest: Destination,
}

#[derive(Debug)]
struct QueryMatch {
    name: String,
    test: QueryTest,
}

#[derive(Debug)]
enum QueryTest {
    Present,
    Exact(String),
    Regex(regex::Regex),
}

/// Where a route (or the default) sends a request, and how.
#[derive(Debug, Default)]
pub struct Destination {
    /// Cumulative: a roll below `upto` (of 10,000) picks that split.
    pub splits: Vec<Split>,
    pub prefix_rewrite: Option<String>,
    /// The route's `PathPrefix` (or `PathExact`) that `prefix_rewrite`
    /// replaces.
    pub rewrite_from: Option<String>,
    pub request_timeout: Option<Duration>,
    /// How long a pooled connection to the target may sit idle.
    pub idle_timeout: Option<Duration>,
    pub num_retries: Option<u32>,
    pub retry_on_connect_failure: bool,
    pub retry_on_status_codes: Vec<u16>,
    pub request_headers: HeaderMods,
    pub response_headers: HeaderMods,
    /// The route's fault injection (over the target's).
    pub fault: Option<Fault>,
    /// `RetryOn`: the conditions retried, besides the upstream's own.
    pub retry_on: RetryOn,
}

/// The `RetryOn` conditions Meshwork retries on (Envoy's names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`
    pub any_5xx: bool,
    /// `gateway-error`: 502, 503, 504.
    pub gateway_error: bool,
    /// `reset`
    pub reset: bool,
    /// `connect-failure`
    pub connect_failure: bool,
}

fn parse_retry_on(value: Option<&Value>, at: &str) -> Result<RetryOn, String> {
    let mut on = RetryOn::default();
    for v in array(value, at).map_err(text)? {
        match v.as_str() {
            Some("5xx") => on.any_5xx = true,
            Some("gateway-error") => on.gateway_error = true,
            Some("reset") => on.reset = true,
            Some("connect-failure") => on.connect_failure = true,
            _ => {
                return Err(format!(
                    "{at}: {v} is not a condition Meshwork retries on (5xx, gateway-error, reset, connect-failure)"
                ));
            }
        }
    }
    Ok(on)
}

/// One weighted share of a destination.
#[derive(Debug)]
pub struct Split {
    pub upto: u32,
    /// Index into [`Chain::targets`].
    pub target: usize,
    pub request_headers: HeaderMods,
    pub response_headers: HeaderMods,
}

/// `RequestHeaders` / `ResponseHeaders`: Add, Set, Remove.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HeaderMods {
    pub add: Vec<(String, String)>,
    pub set: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderMods {
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }
}

/// Meshwork's fault injection (Istio's semantics), on a route's
/// `Destination` or a service's `service-defaults` entry:
/// `{"Delay": {"Percent": 10, "Duration": "2s"}, "Abort": {"Percent": 5,
/// "HTTPStatus": 503, "GRPCStatus": 14}}`. Applied in the caller's
/// sidecar; the route's wins over the service's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fault {
    pub delay: Option<Delay>,
    pub abort: Option<Abort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delay {
    /// Of 10,000 requests, this many are delayed.
    pub per_10k: u32,
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    /// Of 10,000 requests, this many are aborted.
    pub per_10k: u32,
    /// The status an HTTP caller gets (default 503).
    pub http_status: u16,
    /// The `grpc-status` a gRPC caller gets (default 14, UNAVAILABLE).
    pub grpc_status: u8,
}

/// A service, or a subset of its instances.
#[derive(Debug)]
pub struct Target {
    /// `<subset>.<service>` or `<service>`, as Consul names targets.
    pub id: String,
    pub service: String,
    pub subset: Option<String>,
    pub filter: Option<Filter>,
    pub only_passing: bool,
    /// Indexes into [`Chain::targets`], tried in order when this target
    /// has no healthy endpoint.
    pub failover: Vec<usize>,
    pub connect_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    /// From the service's `service-defaults` entry.
    pub fault: Option<Fault>,
    /// The resolver's `LoadBalancer`.
    pub load_balancer: Option<LoadBalancer>,
}

/// A resolver's `LoadBalancer`, as far as the sidecar balances that way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancer {
    /// `round_robin`, `least_request`, `random`, or `ring_hash` (`maglev`
    /// is balanced as `ring_hash`).
    pub policy: String,
    /// `HashPolicies`, in order (Envoy's semantics): each that finds its
    /// value in the request adds it to the hash; a `Terminal` one that
    /// finds it ends the list. None found (or none given): the client's
    /// address.
    pub hash_policies: Vec<HashPolicy>,
}

/// One of a `LoadBalancer`'s `HashPolicies`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashPolicy {
    pub on: HashOn,
    pub terminal: bool,
}

/// What a hash policy hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// A request header (lower-case name).
    Header(String),
    /// A cookie; with `ttl` or `session`, one the sidecar sets (a random
    /// value, `Set-Cookie` on the response) when the request has none, so
    /// that a client's next requests stick to the same endpoint.
    Cookie {
        name: String,
        ttl: Option<Duration>,
        session: bool,
        path: Option<String>,
    },
    /// A query parameter.
    QueryParameter(String),
    /// The client's address.
    SourceIp,
}

fn parse_load_balancer(value: &Value, at: &str) -> Result<LoadBalancer, String> {
    let obj = object(value, at).map_err(text)?;
    let [policy, ring, least, hashes] = fields(
        obj,
        &[
            "Policy",
            "RingHashConfig",
            "LeastRequestConfig",
            "HashPolicies",
        ],
        at,
    )
    .map_err(text)?;
    let _ = (ring, least);
    let policy = match nonempty_string(policy, &join(at, "Policy")).map_err(text)? {
        None | Some("round_robin") => "round_robin",
        Some("least_request") => "least_request",
        Some("random") => "random",
        Some("ring_hash" | "maglev") => "ring_hash",
        Some(other) => {
            return Err(format!(
                "{at}.Policy: {other:?} is not a policy (round_robin, least_request, random, ring_hash, maglev)"
            ));
        }
    };
    let mut hash_policies = Vec::new();
    for (i, h) in array(hashes, &join(at, "HashPolicies"))
        .map_err(text)?
        .iter()
        .enumerate()
    {
        let h_at = format!("{at}.HashPolicies[{i}]");
        let h = object(h, &h_at).map_err(text)?;
        let [field, value, source_ip, terminal, cookie] = fields(
            h,
            &[
                "Field",
                "FieldValue",
                "SourceIP",
                "Terminal",
                "CookieConfig",
            ],
            &h_at,
        )
        .map_err(text)?;
        let terminal = boolean(terminal, &join(&h_at, "Terminal")).map_err(text)?;
        let source_ip = boolean(source_ip, &join(&h_at, "SourceIP")).map_err(text)?;
        let field = nonempty_string(field, &join(&h_at, "Field")).map_err(text)?;
        let value = nonempty_string(value, &join(&h_at, "FieldValue")).map_err(text)?;
        if field.is_some() && source_ip {
            return Err(format!("{h_at}: set Field or SourceIP, not both"));
        }
        if cookie.is_some() && field != Some("cookie") {
            return Err(format!("{h_at}.CookieConfig: only with Field = \"cookie\""));
        }
        let on = match (field, source_ip) {
            (None, true) => HashOn::SourceIp,
            (None, false) => {
                return Err(format!(
                    "{h_at}: set Field (header, cookie, query_parameter) or SourceIP = true"
                ));
            }
            (Some(field), _) => {
                let name =
                    value.ok_or_else(|| format!("{h_at}.FieldValue: the {field} to hash on"))?;
                match field {
                    "header" => {
                        if axum_like_header_name(name) {
                            HashOn::Header(name.to_ascii_lowercase())
                        } else {
                            return Err(format!(
                                "{h_at}.FieldValue: {name:?} is not a header name"
                            ));
                        }
                    }
                    "cookie" => {
                        if !name
                            .bytes()
                            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
                        {
                            return Err(format!(
                                "{h_at}.FieldValue: {name:?} is not a cookie name"
                            ));
                        }
                        let (ttl, session, path) = match cookie {
                            None => (None, false, None),
                            Some(c) => {
                                let c_at = join(&h_at, "CookieConfig");
                                let c = object(c, &c_at).map_err(text)?;
                                let [session, ttl, path] =
                                    fields(c, &["Session", "TTL", "Path"], &c_at).map_err(text)?;
                                let session =
                                    boolean(session, &join(&c_at, "Session")).map_err(text)?;
                                let ttl =
                                    duration(ttl, &join(&c_at, "TTL"))?.filter(|t| !t.is_zero());
                                if session && ttl.is_some() {
                                    return Err(format!("{c_at}: a Session cookie has no TTL"));
                                }
                                let path =
                                    nonempty_string(path, &join(&c_at, "Path")).map_err(text)?;
                                if let Some(p) = path
                                    && (!p.starts_with('/')
                                        || p.bytes().any(|b| b.is_ascii_control() || b == b';'))
                                {
                                    return Err(format!("{c_at}.Path: {p:?} is not a cookie path"));
                                }
                                (ttl, session, path.map(str::to_owned))
                            }
                        };
                        HashOn::Cookie {
                            name: name.to_owned(),
                            ttl,
                            session,
                            path,
                        }
                    }
                    "query_parameter" => HashOn::QueryParameter(name.to_owned()),
                    other => {
                        return Err(format!(
                            "{h_at}.Field: {other:?} is not a hash field (header, cookie, query_parameter)"
                        ));
                    }
                }
            }
        };
        hash_policies.push(HashPolicy { on, terminal });
    }
    if !hash_policies.is_empty() && policy != "ring_hash" {
        return Err(format!(
            "{at}.HashPolicies: hashing needs Policy ring_hash or maglev"
        ));
    }
    Ok(LoadBalancer {
        policy: policy.to_owned(),
        hash_policies,
    })
}

/// An HTTP header name (RFC 9110 token characters).
fn axum_like_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl Chain {
    /// Compiles the chain for calls to `service`. Errors name the entry
    /// and field.
    pub fn compile(service: &str, entries: &dyn Entries) -> Result<Self, String> {
        let mut compiler = Compiler {
            entries,
            targets: Vec::new(),
        };
        let mut routes = Vec::new();
        if let Some(router) = entries.entry("service-router", service) {
            let path = format!("service-router {service:?}");
            let [routes_field] = fields(router, &["Routes"], &path).map_err(|e| e.to_string())?;
            for (i, route) in array(routes_field, &join(&path, "Routes"))
                .map_err(|e| e.to_string())?
                .iter()
                .enumerate()
            {
                let at = format!("{path}.Routes[{i}]");
                routes.push(compiler.route(service, route, &at)?);
            }
        }
        let default = Destination {
            splits: compiler.splits(service, 0)?,
            ..Destination::default()
        };
        let mut chain = Self {
            service: service.to_owned(),
            routes,
            default,
            targets: compiler.targets,
            plain: false,
        };
        chain.plain = chain.says_nothing();
        Ok(chain)
    }

    /// The chain of a tcp upstream's connections: the resolver alone
    /// (redirect, subsets, failover, connect timeout, load balancer). As
    /// in Consul, a router or splitter for the service is refused: they
    /// need requests to match and split.
    pub fn compile_l4(service: &str, entries: &dyn Entries) -> Result<Self, String> {
        for kind in ["service-router", "service-splitter"] {
            if entries.entry(kind, service).is_some() {
                return Err(format!(
                    "{kind} {service:?}: routes and splits need an HTTP upstream (protocol http, http2 or grpc); this upstream is tcp"
                ));
            }
        }
        Self::compile(service, entries)
    }

    /// The destination of route `route` (`None`: the default).
    pub fn destination(&self, route: Option<usize>) -> &Destination {
        route
            .and_then(|i| self.routes.get(i))
            .map_or(&self.default, |r| &r.dest)
    }

    /// Every destination: the routes' (by index), then the default
    /// (`None`).
    pub fn destinations(&self) -> impl Iterator<Item = (Option<usize>, &Destination)> {
        self.routes
            .iter()
            .enumerate()
            .map(|(i, r)| (Some(i), &r.dest))
            .chain(std::iter::once((None, &self.default)))
    }

    /// Whether no entry changes anything: every request goes to the whole
    /// service.
    ///
    /// Anything an entry says makes a chain not plain: a resolver's
    /// timeouts, `OnlyPassing` or `LoadBalancer` alone (no subset, no
    /// route) still apply, as do a lone split's header changes.
    #[inline]
    pub fn is_plain(&self) -> bool {
        self.plain
    }

    fn says_nothing(&self) -> bool {
        let [target] = self.targets.as_slice() else {
            return false;
        };
        let d = &self.default;
        self.routes.is_empty()
            && target.service == self.service
            && target.subset.is_none()
            && target.filter.is_none()
            && !target.only_passing
            && target.failover.is_empty()
            && target.fault.is_none()
            && target.connect_timeout.is_none()
            && target.request_timeout.is_none()
            && target.load_balancer.is_none()
            && d.prefix_rewrite.is_none()
            && d.request_timeout.is_none()
            && d.idle_timeout.is_none()
            && d.num_retries.is_none()
            && !d.retry_on_connect_failure
            && d.retry_on_status_codes.is_empty()
            && d.request_headers.is_empty()
            && d.response_headers.is_empty()
            && d.fault.is_none()
            && d.retry_on == RetryOn::default()
            && d.splits
                .iter()
                .all(|s| s.request_headers.is_empty() && s.response_headers.is_empty())
    }

    /// The destination of a request: the first route that matches, else
    /// the default. `query` is the raw query string, if any.
    pub fn route<H: HeaderValues + ?Sized>(
        &self,
        method: &str,
        path: &str,
        query: Option<&str>,
        headers: &H,
    ) -> (Option<usize>, &Destination) {
        let request = crate::intentions::Request::new(method, path, headers);
        for (i, route) in self.routes.iter().enumerate() {
            if route.http.as_ref().is_none_or(|p| p.matches(&request))
                && route.query.iter().all(|q| q.matches(query))
            {
                return (Some(i), &route.dest);
            }
        }
        (None, &self.default)
    }
}

impl Destination {
    /// The path after `PrefixRewrite`, when this destination rewrites and
    /// `path` starts with what it replaces.
    pub fn rewrite(&self, path: &str) -> Option<String> {
        let (from, to) = (
            self.rewrite_from.as_deref()?,
            self.prefix_rewrite.as_deref()?,
        );
        let rest = path.strip_prefix(from)?;
        let mut out = String::with_capacity(to.len() + rest.len());
        out.push_str(to);
        // `/admin` → `/` on `/admin/users`: `/users`, not `//users`.
        if to.ends_with('/') && rest.starts_with('/') {
            out.push_str(&rest[1..]);
        } else {
            out.push_str(rest);
        }
        Some(out)
    }

    /// The split a roll in `0..10_000` lands on.
    pub fn pick(&self, roll: u32) -> &Split {
        let roll = roll % WHOLE;
        self.splits
            .iter()
            .find(|s| roll < s.upto)
            .or(self.splits.last())
            .expect("a destination has at least one split")
    }
}

impl QueryMatch {
    fn matches(&self, query: Option<&str>) -> bool {
        let value = query.and_then(|q| {
            q.split('&').find_map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (name == self.name).then_some(value)
            })
        });
        match (&self.test, value) {
            (_, None) => false,
            (QueryTest::Present, Some(_)) => true,
            (QueryTest::Exact(want), Some(v)) => v == want,
            (QueryTest::Regex(r), Some(v)) => r.is_match(v),
        }
    }
}

struct Compiler<'e> {
    entries: &'e dyn Entries,
    targets: Vec<Target>,
}

fn text(e: crate::intentions::IntentionError) -> String {
    e.to_string()
}

fn duration(value: Option<&Value>, path: &str) -> Result<Option<Duration>, String> {
    match nonempty_string(value, path).map_err(text)? {
        None => Ok(None),
        Some(s) => crate::duration::parse_duration(s)
            .map(Some)
            .ok_or_else(|| format!("{path}: {s:?} is not a duration (e.g. \"5s\", \"250ms\")")),
    }
}

fn header_mods(value: Option<&Value>, path: &str) -> Result<HeaderMods, String> {
    let Some(value) = value else {
        return Ok(HeaderMods::default());
    };
    let object = object(value, path).map_err(text)?;
    let [add, set, remove] = fields(object, &["Add", "Set", "Remove"], path).map_err(text)?;
    let pairs = |value: Option<&Value>, at: &str| -> Result<Vec<(String, String)>, String> {
        let Some(value) = value else {
            return Ok(Vec::new());
        };
        let map = value
            .as_object()
            .ok_or_else(|| format!("{at}: must be an object of header names to values"))?;
        map.iter()
            .map(|(k, v)| match v.as_str() {
                Some(v) => {
                    http::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| format!("{at}: {k:?} is not a header name"))?;
                    http::HeaderValue::from_str(v)
                        .map_err(|_| format!("{at}.{k}: {v:?} is not a header value"))?;
                    Ok((k.to_ascii_lowercase(), v.to_owned()))
                }
                None => Err(format!("{at}.{k}: must be a string")),
            })
            .collect()
    };
    let remove = array(remove, &join(path, "Remove"))
        .map_err(text)?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_ascii_lowercase)
                .ok_or_else(|| format!("{path}.Remove: must be a list of header names"))
        })
        .collect::<Result<_, _>>()?;
    Ok(HeaderMods {
        add: pairs(add, &join(path, "Add"))?,
        set: pairs(set, &join(path, "Set"))?,
        remove,
    })
}

impl Compiler<'_> {
    fn route(&mut self, service: &str, route: &Value, at: &str) -> Result<Route, String> {
        let route = object(route, at).map_err(text)?;
        let [matching, destination] = fields(route, &["Match", "Destination"], at).map_err(text)?;
        let (http, query) = match matching {
            None => (None, Vec::new()),
            Some(m) => {
                let m_path = join(at, "Match");
                let [http] =
                    fields(object(m, &m_path).map_err(text)?, &["HTTP"], &m_path).map_err(text)?;
                match http {
                    None => (None, Vec::new()),
                    Some(http) => self.http_match(http, &join(&m_path, "HTTP"))?,
                }
            }
        };
        let mut dest = match destination {
            None => Destination {
                splits: self.splits(service, 0)?,
                ..Destination::default()
            },
            Some(d) => self.destination(service, d, &join(at, "Destination"))?,
        };
        if dest.prefix_rewrite.is_some() {
            dest.rewrite_from = matching
                .and_then(Value::as_object)
                .and_then(|m| m.iter().find(|(k, _)| k.eq_ignore_ascii_case("http")))
                .and_then(|(_, h)| h.as_object())
                .and_then(|h| {
                    h.iter()
                        .find(|(k, v)| {
                            let k = k.replace(['_', '-'], "").to_ascii_lowercase();
                            (k == "pathprefix" || k == "pathexact")
                                && v.as_str().is_some_and(|v| !v.is_empty())
                        })
                        .and_then(|(_, v)| v.as_str())
                })
                .map(str::to_owned);
            if dest.rewrite_from.is_none() {
                return Err(format!(
                    "{at}.Destination.PrefixRewrite: needs a PathPrefix or PathExact match to replace"
                ));
            }
        }
        Ok(Route { http, query, dest })
    }

    fn http_match(
        &mut self,
        http: &Value,
        at: &str,
    ) -> Result<(Option<Permission>, Vec<QueryMatch>), String> {
        let mut http = object(http, at).map_err(text)?.clone();
        // QueryParam is the router's own; the rest reads as an L7
        // intention's HTTP block (the same matchers, Envoy's).
        let query_key = http
            .keys()
            .find(|k| k.replace(['_', '-'], "").eq_ignore_ascii_case("queryparam"))
            .cloned();
        let query_value = query_key.and_then(|k| http.remove(&k));
        let mut query = Vec::new();
        for (i, q) in array(query_value.as_ref(), &join(at, "QueryParam"))
            .map_err(text)?
            .iter()
            .enumerate()
        {
            let q_at = format!("{at}.QueryParam[{i}]");
            let q = object(q, &q_at).map_err(text)?;
            let [name, present, exact, regex] =
                fields(q, &["Name", "Present", "Exact", "Regex"], &q_at).map_err(text)?;
            let name = nonempty_string(name, &join(&q_at, "Name"))
                .map_err(text)?
                .ok_or_else(|| format!("{q_at}.Name: must be set"))?;
            let present = boolean(present, &join(&q_at, "Present")).map_err(text)?;
            let exact = nonempty_string(exact, &join(&q_at, "Exact")).map_err(text)?;
            let regex = nonempty_string(regex, &join(&q_at, "Regex")).map_err(text)?;
            let test = match (present, exact, regex) {
                (true, None, None) => QueryTest::Present,
                (false, Some(e), None) => QueryTest::Exact(e.to_owned()),
                (false, None, Some(r)) => QueryTest::Regex(
                    regex::Regex::new(&format!(r"\A(?:{r})\z"))
                        .map_err(|e| format!("{q_at}.Regex: {e}"))?,
                ),
                _ => {
                    return Err(format!(
                        "{q_at}: set exactly one of Present, Exact or Regex"
                    ));
                }
            };
            query.push(QueryMatch {
                name: name.to_owned(),
                test,
            });
        }
        let says_something = http
            .values()
            .any(|v| !crate::intentions::fields::says_nothing(v));
        let permission = if says_something {
            let mut wrapped = Map::new();
            wrapped.insert("Action".into(), Value::String("allow".into()));
            wrapped.insert("HTTP".into(), Value::Object(http));
            let parsed = parse_permission(&wrapped, at).map_err(text)?;
            Some(parsed)
        } else {
            None
        };
        Ok((permission, query))
    }

    fn destination(&mut self, service: &str, d: &Value, at: &str) -> Result<Destination, String> {
        const FIELDS: [&str; 14] = [
            "Fault",
            "RetryOn",
            "Service",
            "ServiceSubset",
            "Namespace",
            "Partition",
            "PrefixRewrite",
            "RequestTimeout",
            "IdleTimeout",
            "NumRetries",
            "RetryOnConnectFailure",
            "RetryOnStatusCodes",
            "RequestHeaders",
            "ResponseHeaders",
        ];
        let d = object(d, at).map_err(text)?;
        let [
            fault,
            retry_on,
            svc,
            subset,
            namespace,
            partition,
            rewrite,
            timeout,
            idle,
            retries,
            on_connect,
            codes,
            req,
            resp,
        ] = fields(d, &FIELDS, at).map_err(text)?;
        only_default(namespace, partition, at)?;
        let fault = fault
            .map(|f| parse_fault(f, &join(at, "Fault")))
            .transpose()?;
        let retry_on = parse_retry_on(retry_on, &join(at, "RetryOn"))?;
        let target_service = nonempty_string(svc, &join(at, "Service"))
            .map_err(text)?
            .unwrap_or(service)
            .to_owned();
        let subset = nonempty_string(subset, &join(at, "ServiceSubset")).map_err(text)?;
        let splits = match subset {
            Some(subset) => vec![Split {
                upto: WHOLE,
                target: self.target(&target_service, Some(subset), 0)?,
                request_headers: HeaderMods::default(),
                response_headers: HeaderMods::default(),
            }],
            None => self.splits(&target_service, 0)?,
        };
        let num_retries = match retries {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| format!("{at}.NumRetries: must be a whole number"))?,
            ),
        };
        let retry_on_status_codes = array(codes, &join(at, "RetryOnStatusCodes"))
            .map_err(text)?
            .iter()
            .map(|c| {
                c.as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| (100..600).contains(n))
                    .ok_or_else(|| format!("{at}.RetryOnStatusCodes: {c} is not an HTTP status"))
            })
            .collect::<Result<_, _>>()?;
        let prefix_rewrite = nonempty_string(rewrite, &join(at, "PrefixRewrite"))
            .map_err(text)?
            .map(str::to_owned);
        Ok(Destination {
            splits,
            prefix_rewrite,
            rewrite_from: None,
            request_timeout: duration(timeout, &join(at, "RequestTimeout"))?,
            idle_timeout: duration(idle, &join(at, "IdleTimeout"))?,
            num_retries,
            retry_on_connect_failure: boolean(on_connect, &join(at, "RetryOnConnectFailure"))
                .map_err(text)?,
            retry_on_status_codes,
            request_headers: header_mods(req, &join(at, "RequestHeaders"))?,
            response_headers: header_mods(resp, &join(at, "ResponseHeaders"))?,
            fault,
            retry_on,
        })
    }

    /// The splits of calls to `service` without a subset: its splitter's,
    /// flattened, or all to its resolver.
    fn splits(&mut self, service: &str, depth: usize) -> Result<Vec<Split>, String> {
        if depth > MAX_DEPTH {
            return Err(format!(
                "service-splitter {service:?}: splitters nest more than {MAX_DEPTH} deep (a loop?)"
            ));
        }
        let Some(splitter) = self.entries.entry("service-splitter", service) else {
            return Ok(vec![Split {
                upto: WHOLE,
                target: self.target(service, None, 0)?,
                request_headers: HeaderMods::default(),
                response_headers: HeaderMods::default(),
            }]);
        };
        let at = format!("service-splitter {service:?}");
        let [splits] = fields(splitter, &["Splits"], &at).map_err(text)?;
        let splits = array(splits, &join(&at, "Splits")).map_err(text)?;
        if splits.is_empty() {
            return Err(format!("{at}.Splits: must have at least one split"));
        }
        let mut out = Vec::new();
        let mut total = 0u32;
        for (i, split) in splits.iter().enumerate() {
            let s_at = format!("{at}.Splits[{i}]");
            let split = object(split, &s_at).map_err(text)?;
            let [weight, svc, subset, namespace, partition, req, resp] = fields(
                split,
                &[
                    "Weight",
                    "Service",
                    "ServiceSubset",
                    "Namespace",
                    "Partition",
                    "RequestHeaders",
                    "ResponseHeaders",
                ],
                &s_at,
            )
            .map_err(text)?;
            only_default(namespace, partition, &s_at)?;
            let weight = weight
                .and_then(Value::as_f64)
                .filter(|w| (0.0..=100.0).contains(w))
                .ok_or_else(|| format!("{s_at}.Weight: must be a number from 0 to 100"))?;
            let units = (weight * 100.0).round() as u32;
            if (f64::from(units) - weight * 100.0).abs() > 1e-6 {
                return Err(format!(
                    "{s_at}.Weight: {weight} has more than two decimals (0.01 % is the finest split)"
                ));
            }
            let target_service = nonempty_string(svc, &join(&s_at, "Service"))
                .map_err(text)?
                .unwrap_or(service)
                .to_owned();
            let subset = nonempty_string(subset, &join(&s_at, "ServiceSubset")).map_err(text)?;
            let request_headers = header_mods(req, &join(&s_at, "RequestHeaders"))?;
            let response_headers = header_mods(resp, &join(&s_at, "ResponseHeaders"))?;
            if units == 0 {
                // Still checked above; takes no traffic.
                if subset.is_some() || target_service != service {
                    self.target(&target_service, subset, 0)?;
                }
                continue;
            }
            let nested = subset.is_none()
                && target_service != service
                && self
                    .entries
                    .entry("service-splitter", &target_service)
                    .is_some();
            if nested {
                let inner = self.splits(&target_service, depth + 1)?;
                let mut before = 0u32;
                for s in inner {
                    let share = (s.upto - before) * units / WHOLE;
                    before = s.upto;
                    total += share;
                    out.push(Split {
                        upto: total,
                        target: s.target,
                        request_headers: merge(&request_headers, &s.request_headers),
                        response_headers: merge(&response_headers, &s.response_headers),
                    });
                }
            } else {
                total += units;
                out.push(Split {
                    upto: total,
                    target: self.target(&target_service, subset, 0)?,
                    request_headers,
                    response_headers,
                });
            }
        }
        if depth == 0 && total != WHOLE {
            return Err(format!(
                "{at}.Splits: the weights add up to {}, not 100",
                f64::from(total) / 100.0
            ));
        }
        if let Some(last) = out.last_mut()
            && depth == 0
        {
            last.upto = WHOLE;
        }
        Ok(out)
    }

    /// The target for `service` (and subset), through its resolver's
    /// redirect and default subset; added to the list once.
    fn target(
        &mut self,
        service: &str,
        subset: Option<&str>,
        depth: usize,
    ) -> Result<usize, String> {
        self.resolve(service, subset, depth, true)
    }

    fn resolve(
        &mut self,
        service: &str,
        subset: Option<&str>,
        depth: usize,
        with_failover: bool,
    ) -> Result<usize, String> {
        if depth > MAX_DEPTH {
            return Err(format!(
                "service-resolver {service:?}: redirects go more than {MAX_DEPTH} deep (a loop?)"
            ));
        }
        let resolver = self.entries.entry("service-resolver", service);
        let at = format!("service-resolver {service:?}");
        const FIELDS: [&str; 8] = [
            "DefaultSubset",
            "Subsets",
            "Redirect",
            "Failover",
            "ConnectTimeout",
            "RequestTimeout",
            "LoadBalancer",
            "PrioritizeByLocality",
        ];
        let [
            default_subset,
            subsets,
            redirect,
            failover,
            connect,
            request,
            load_balancer,
            locality,
        ] = match resolver {
            Some(r) => fields(r, &FIELDS, &at).map_err(text)?,
            None => [None; 8],
        };
        if locality.is_some_and(|l| !crate::intentions::fields::says_nothing(l)) {
            return Err(format!(
                "{at}.PrioritizeByLocality: Meshwork has no localities (zones, regions) yet"
            ));
        }
        if let Some(redirect) = redirect {
            let r_at = join(&at, "Redirect");
            let r = object(redirect, &r_at).map_err(text)?;
            let (to, to_subset) = service_ref(r, &r_at)?;
            let to = to.unwrap_or(service).to_owned();
            let to_subset = to_subset.map(str::to_owned);
            if to == service && to_subset.is_none() {
                return Err(format!("{r_at}: redirects {service:?} to itself"));
            }
            return self.resolve(&to, to_subset.as_deref(), depth + 1, with_failover);
        }
        let subset = subset.map(str::to_owned).or(nonempty_string(
            default_subset,
            &join(&at, "DefaultSubset"),
        )
        .map_err(text)?
        .map(str::to_owned));
        let (filter, only_passing) = match &subset {
            None => (None, false),
            Some(name) => {
                let s_at = join(&at, "Subsets");
                let found = subsets
                    .and_then(Value::as_object)
                    .and_then(|m| m.get(name))
                    .ok_or_else(|| format!("{s_at}: no subset {name:?} (named by a route, split, redirect, failover or DefaultSubset)"))?;
                let s_at = format!("{s_at}.{name}");
                let found = object(found, &s_at).map_err(text)?;
                let [filter, only_passing] =
                    fields(found, &["Filter", "OnlyPassing"], &s_at).map_err(text)?;
                let filter = nonempty_string(filter, &join(&s_at, "Filter"))
                    .map_err(text)?
                    .map(|f| Filter::parse(f).map_err(|e| format!("{s_at}.Filter: {e}")))
                    .transpose()?;
                (
                    filter,
                    boolean(only_passing, &join(&s_at, "OnlyPassing")).map_err(text)?,
                )
            }
        };
        let id = match &subset {
            Some(s) => format!("{s}.{service}"),
            None => service.to_owned(),
        };
        if let Some(existing) = self.targets.iter().position(|t| t.id == id) {
            return Ok(existing);
        }
        let index = self.targets.len();
        self.targets.push(Target {
            id,
            service: service.to_owned(),
            subset: subset.clone(),
            filter,
            only_passing,
            failover: Vec::new(),
            connect_timeout: duration(connect, &join(&at, "ConnectTimeout"))?,
            request_timeout: duration(request, &join(&at, "RequestTimeout"))?,
            fault: self.service_fault(service)?,
            load_balancer: load_balancer
                .map(|lb| parse_load_balancer(lb, &join(&at, "LoadBalancer")))
                .transpose()?,
        });
        if with_failover && let Some(failover) = failover {
            let f_at = join(&at, "Failover");
            let map = failover.as_object().ok_or_else(|| {
                format!("{f_at}: must be an object of subset (or \"*\") to failover")
            })?;
            let key = subset.as_deref().unwrap_or("*");
            if let Some(policy) = map.get(key).or_else(|| map.get("*")) {
                let p_at = format!("{f_at}.{key}");
                let policy = object(policy, &p_at).map_err(text)?;
                let [svc, f_subset, namespace, targets, datacenters, _] = fields(
                    policy,
                    &[
                        "Service",
                        "ServiceSubset",
                        "Namespace",
                        "Targets",
                        "Datacenters",
                        "Policy",
                    ],
                    &p_at,
                )
                .map_err(text)?;
                only_default(namespace, None, &p_at)?;
                if !array(datacenters, &join(&p_at, "Datacenters"))
                    .map_err(text)?
                    .is_empty()
                {
                    return Err(format!("{p_at}.Datacenters: Meshwork has one datacenter"));
                }
                let mut chosen = Vec::new();
                let svc = nonempty_string(svc, &join(&p_at, "Service")).map_err(text)?;
                let f_subset =
                    nonempty_string(f_subset, &join(&p_at, "ServiceSubset")).map_err(text)?;
                if svc.is_some() || f_subset.is_some() {
                    chosen.push((
                        svc.unwrap_or(service).to_owned(),
                        f_subset.map(str::to_owned),
                    ));
                }
                for (i, t) in array(targets, &join(&p_at, "Targets"))
                    .map_err(text)?
                    .iter()
                    .enumerate()
                {
                    let t_at = format!("{p_at}.Targets[{i}]");
                    let t = object(t, &t_at).map_err(text)?;
                    let (svc, t_subset) = service_ref(t, &t_at)?;
                    chosen.push((
                        svc.unwrap_or(service).to_owned(),
                        t_subset.map(str::to_owned),
                    ));
                }
                let mut failover = Vec::new();
                for (svc, s) in chosen {
                    let t = self.resolve(&svc, s.as_deref(), depth + 1, false)?;
                    if t != index && !failover.contains(&t) {
                        failover.push(t);
                    }
                }
                self.targets[index].failover = failover;
            }
        }
        Ok(index)
    }
}

impl Compiler<'_> {
    /// The `Fault` of `service`'s `service-defaults` entry, if any.
    fn service_fault(&self, service: &str) -> Result<Option<Fault>, String> {
        let Some(defaults) = self.entries.entry("service-defaults", service) else {
            return Ok(None);
        };
        defaults
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("fault"))
            .map(|(_, f)| parse_fault(f, &format!("service-defaults {service:?}.Fault")))
            .transpose()
    }
}

/// A percentage (two decimals at most) in units of 0.01 %.
fn percent(value: Option<&Value>, at: &str) -> Result<u32, String> {
    let p = value
        .and_then(Value::as_f64)
        .filter(|p| (0.0..=100.0).contains(p))
        .ok_or_else(|| format!("{at}: must be a number from 0 to 100"))?;
    let units = (p * 100.0).round();
    if (units - p * 100.0).abs() > 1e-6 {
        return Err(format!("{at}: {p} has more than two decimals"));
    }
    Ok(units as u32)
}

fn parse_fault(value: &Value, at: &str) -> Result<Fault, String> {
    let obj = object(value, at).map_err(text)?;
    let [delay, abort] = fields(obj, &["Delay", "Abort"], at).map_err(text)?;
    let delay = match delay {
        None => None,
        Some(d) => {
            let d_at = join(at, "Delay");
            let d = object(d, &d_at).map_err(text)?;
            let [p, length] = fields(d, &["Percent", "Duration"], &d_at).map_err(text)?;
            let duration = duration(length, &join(&d_at, "Duration"))?
                .ok_or_else(|| format!("{d_at}.Duration: must be set (e.g. \"2s\")"))?;
            Some(Delay {
                per_10k: percent(p, &join(&d_at, "Percent"))?,
                duration,
            })
        }
    };
    let abort = match abort {
        None => None,
        Some(a) => {
            let a_at = join(at, "Abort");
            let a = object(a, &a_at).map_err(text)?;
            let [p, http, grpc] =
                fields(a, &["Percent", "HTTPStatus", "GRPCStatus"], &a_at).map_err(text)?;
            let http_status = match http {
                None => 503,
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| (200..600).contains(n))
                    .ok_or_else(|| {
                        format!("{a_at}.HTTPStatus: {v} is not an HTTP status from 200 to 599")
                    })?,
            };
            let grpc_status = match grpc {
                None => 14,
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u8::try_from(n).ok())
                    .filter(|n| (1..=16).contains(n))
                    .ok_or_else(|| {
                        format!("{a_at}.GRPCStatus: {v} is not a gRPC error code (1-16)")
                    })?,
            };
            Some(Abort {
                per_10k: percent(p, &join(&a_at, "Percent"))?,
                http_status,
                grpc_status,
            })
        }
    };
    if delay.is_none() && abort.is_none() {
        return Err(format!("{at}: set Delay, Abort or both"));
    }
    Ok(Fault { delay, abort })
}

/// A `Redirect` or failover target: (Service, ServiceSubset). Other
/// datacenters, peers, namespaces and partitions are refused, not ignored:
/// Meshwork has one datacenter and the default namespace and partition.
fn service_ref<'v>(
    object: &'v Map<String, Value>,
    at: &str,
) -> Result<(Option<&'v str>, Option<&'v str>), String> {
    let [svc, subset, namespace, partition, datacenter, peer] = fields(
        object,
        &[
            "Service",
            "ServiceSubset",
            "Namespace",
            "Partition",
            "Datacenter",
            "Peer",
        ],
        at,
    )
    .map_err(text)?;
    only_default(namespace, partition, at)?;
    for (value, field) in [(datacenter, "Datacenter"), (peer, "Peer")] {
        if let Some(v) = nonempty_string(value, &join(at, field)).map_err(text)? {
            return Err(format!(
                "{at}.{field}: {v:?}: Meshwork has one datacenter and no peers"
            ));
        }
    }
    Ok((
        nonempty_string(svc, &join(at, "Service")).map_err(text)?,
        nonempty_string(subset, &join(at, "ServiceSubset")).map_err(text)?,
    ))
}

/// `Namespace` and `Partition` may only name the default ones.
fn only_default(
    namespace: Option<&Value>,
    partition: Option<&Value>,
    at: &str,
) -> Result<(), String> {
    for (value, field) in [(namespace, "Namespace"), (partition, "Partition")] {
        if let Some(v) = nonempty_string(value, &join(at, field)).map_err(text)?
            && v != "default"
        {
            return Err(format!(
                "{at}.{field}: {v:?}: namespaces and partitions are Consul Enterprise features; Meshwork has the default one only"
            ));
        }
    }
    Ok(())
}

fn merge(outer: &HeaderMods, inner: &HeaderMods) -> HeaderMods {
    let mut all = outer.clone();
    all.add.extend(inner.add.iter().cloned());
    all.set.extend(inner.set.iter().cloned());
    all.remove.extend(inner.remove.iter().cloned());
    all
}

/// Checks a router, splitter or resolver entry on write, as far as it can
/// be checked alone plus the entries already stored (`entries`): the
/// chain of the service it names must compile. Other kinds pass.
pub fn validate_entry(
    kind: &str,
    name: &str,
    body: &Map<String, Value>,
    stored: &dyn Entries,
) -> Result<(), String> {
    if kind == "proxy-defaults" {
        return crate::upstream_defaults::validate_proxy_defaults(name, body);
    }
    if kind == "ingress-gateway" {
        return crate::ingress::parse(name, body).map(|_| ());
    }
    if kind == crate::jwt_provider::KIND {
        return crate::jwt_provider::parse(name, body).map(|_| ());
    }
    if kind == "service-defaults" {
        crate::ratelimit::RateLimits::from_service_defaults(name, body)?;
        crate::upstream_defaults::validate_service_defaults(name, body)?;
        return match body.iter().find(|(k, _)| k.eq_ignore_ascii_case("fault")) {
            Some((_, f)) => parse_fault(f, &format!("service-defaults {name:?}.Fault")).map(|_| ()),
            None => Ok(()),
        };
    }
    if !matches!(
        kind,
        "service-router" | "service-splitter" | "service-resolver"
    ) {
        return Ok(());
    }
    struct With<'a> {
        kind: &'a str,
        name: &'a str,
        body: &'a Map<String, Value>,
        stored: &'a dyn Entries,
    }
    impl Entries for With<'_> {
        fn entry(&self, kind: &str, name: &str) -> Option<&Map<String, Value>> {
            if kind == self.kind && name == self.name {
                Some(self.body)
            } else {
                self.stored.entry(kind, name)
            }
        }
    }
    let with = With {
        kind,
        name,
        body,
        stored,
    };
    Chain::compile(name, &with).map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    #[derive(Default)]
    struct Store(BTreeMap<(String, String), Map<String, Value>>);

    impl Store {
        fn with(mut self, kind: &str, name: &str, body: Value) -> Self {
            let Value::Object(body) = body else {
                panic!("an object")
            };
            self.0.insert((kind.into(), name.into()), body);
            self
        }
    }

    impl Entries for Store {
        fn entry(&self, kind: &str, name: &str) -> Option<&Map<String, Value>> {
            self.0.get(&(kind.to_owned(), name.to_owned()))
        }
    }

    const NO_HEADERS: &[(&str, &str)] = &[];

    fn target_of<'c>(chain: &'c Chain, dest: &Destination, roll: u32) -> &'c str {
        &chain.targets[dest.pick(roll).target].id
    }

    fn resolver() -> Value {
        json!({
            "DefaultSubset": "v1",
            "Subsets": {
                "v1": {"Filter": "Service.Meta.version == v1"},
                "v2": {"Filter": "Service.Meta.version == v2", "OnlyPassing": true}
            },
            "Failover": {"v2": {"ServiceSubset": "v1"}}
        })
    }

    #[test]
    fn without_entries_everything_goes_to_the_service() {
        let chain = Chain::compile("api", &Store::default()).expect("compiles");
        assert!(chain.is_plain());
        let (route, dest) = chain.route("GET", "/", None, NO_HEADERS);
        assert_eq!(route, None);
        assert_eq!(target_of(&chain, dest, 1234), "api");
    }

    #[test]
    fn router_splitter_and_resolver_make_the_chain_consul_makes() {
        let store = Store::default()
            .with("service-resolver", "api", resolver())
            .with(
                "service-splitter",
                "api",
                json!({"Splits": [
                    {"Weight": 90, "ServiceSubset": "v1"},
                    {"Weight": 10, "ServiceSubset": "v2", "ResponseHeaders": {"Set": {"x-split": "v2"}}}
                ]}),
            )
            .with(
                "service-router",
                "api",
                json!({"Routes": [
                    {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}},
                     "Destination": {"ServiceSubset": "v2"}},
                    {"Match": {"HTTP": {"PathPrefix": "/admin"}},
                     "Destination": {"Service": "admin", "PrefixRewrite": "/", "RequestTimeout": "3s", "NumRetries": 2}},
                    {"Match": {"HTTP": {"QueryParam": [{"Name": "debug", "Present": true}], "Methods": ["GET"]}},
                     "Destination": {"ServiceSubset": "v1"}}
                ]}),
            );
        let chain = Chain::compile("api", &store).expect("compiles");
        assert!(!chain.is_plain());
        let canary: &[(&str, &str)] = &[("x-canary", "1")];
        let (route, dest) = chain.route("GET", "/x", None, canary);
        assert_eq!(route, Some(0));
        assert_eq!(target_of(&chain, dest, 0), "v2.api");
        let (route, dest) = chain.route("POST", "/admin/users", None, NO_HEADERS);
        assert_eq!(route, Some(1));
        assert_eq!(target_of(&chain, dest, 0), "admin");
        assert_eq!(dest.prefix_rewrite.as_deref(), Some("/"));
        assert_eq!(dest.rewrite("/admin/users").as_deref(), Some("/users"));
        assert_eq!(dest.rewrite("/admin").as_deref(), Some("/"));
        assert_eq!(dest.request_timeout, Some(Duration::from_secs(3)));
        assert_eq!(dest.num_retries, Some(2));
        let (route, _) = chain.route("GET", "/x", Some("a=1&debug"), NO_HEADERS);
        assert_eq!(route, Some(2));
        let (route, _) = chain.route("POST", "/x", Some("debug=1"), NO_HEADERS);
        assert_eq!(route, None, "the method does not match");
        // The default route: the splitter, 90/10 over 10,000 rolls.
        let (_, dest) = chain.route("GET", "/x", None, NO_HEADERS);
        let v2 = (0..10_000)
            .filter(|r| target_of(&chain, dest, *r) == "v2.api")
            .count();
        assert_eq!(v2, 1_000);
        assert_eq!(
            dest.pick(9_999).response_headers.set,
            vec![("x-split".into(), "v2".into())]
        );
        // Targets: v2 fails over to v1; filters parsed; only-passing kept.
        let v2 = chain.targets.iter().find(|t| t.id == "v2.api").expect("v2");
        assert!(v2.only_passing);
        assert_eq!(chain.targets[v2.failover[0]].id, "v1.api");
        assert_eq!(
            v2.filter.as_ref().map(Filter::as_str),
            Some("Service.Meta.version == v2")
        );
    }

    #[test]
    fn nested_splitters_and_redirects_flatten() {
        let store = Store::default()
            .with(
                "service-splitter",
                "api",
                json!({"Splits": [{"Weight": 50}, {"Weight": 50, "Service": "api-next"}]}),
            )
            .with(
                "service-splitter",
                "api-next",
                json!({"Splits": [{"Weight": 50, "Service": "blue"}, {"Weight": 50, "Service": "green"}]}),
            )
            .with("service-resolver", "green", json!({"Redirect": {"Service": "green2"}}));
        let chain = Chain::compile("api", &store).expect("compiles");
        let (_, dest) = chain.route("GET", "/", None, NO_HEADERS);
        let count = |id: &str| {
            (0..10_000)
                .filter(|r| target_of(&chain, dest, *r) == id)
                .count()
        };
        assert_eq!(
            (count("api"), count("blue"), count("green2")),
            (5_000, 2_500, 2_500)
        );
    }

    #[test]
    fn bad_chains_are_refused_naming_the_entry_and_field() {
        let cases = [
            (
                Store::default().with("service-splitter", "api", json!({"Splits": [{"Weight": 60}, {"Weight": 30, "Service": "b"}]})),
                "weights add up to 90",
            ),
            (
                Store::default().with("service-splitter", "api", json!({"Splits": [{"Weight": 99.995}, {"Weight": 0.005, "Service": "b"}]})),
                "more than two decimals",
            ),
            (
                Store::default().with("service-resolver", "api", json!({"DefaultSubset": "v9", "Subsets": {"v1": {"Filter": "Service.ID == a"}}})),
                "no subset \"v9\"",
            ),
            (
                Store::default().with("service-resolver", "api", json!({"DefaultSubset": "v1", "Subsets": {"v1": {"Filter": "Service.Meta.version = v1"}}})),
                "Subsets.v1.Filter: filter",
            ),
            (
                Store::default()
                    .with("service-resolver", "api", json!({"Redirect": {"Service": "b"}}))
                    .with("service-resolver", "b", json!({"Redirect": {"Service": "api"}})),
                "a loop?",
            ),
            (
                Store::default().with("service-router", "api", json!({"Routes": [{"Match": {"HTTP": {"PathPrefix": "admin"}}}]})),
                "doesn't start with '/'",
            ),
            (
                Store::default().with("service-router", "api", json!({"Routes": [{"Destination": {"RequestTimeout": "soon"}}]})),
                "is not a duration",
            ),
            (
                Store::default().with("service-router", "api", json!({"Routes": [{"Destination": {"Fault": {"Abort": {"Percent": 101}}}}]})),
                "Fault.Abort.Percent: must be a number from 0 to 100",
            ),
            (
                Store::default().with("service-defaults", "api", json!({"Fault": {"Delay": {"Percent": 10}}})),
                "service-defaults \"api\".Fault.Delay.Duration: must be set",
            ),
            (
                Store::default().with("service-router", "api", json!({"Routes": [{"Destination": {"Fault": {}}}]})),
                "set Delay, Abort or both",
            ),
            (
                Store::default().with("service-router", "api", json!({"Routes": [{"Destination": {"RetryOn": ["5xx", "retriable-4xx"]}}]})),
                "\"retriable-4xx\" is not a condition Meshwork retries on",
            ),
            (
                Store::default().with("service-resolver", "api", json!({"Redirect": {"Service": "api", "Datacenter": "dc2"}})),
                "Redirect.Datacenter: \"dc2\": Meshwork has one datacenter",
            ),
            (
                Store::default().with("service-splitter", "api", json!({"Splits": [{"Weight": 100, "Namespace": "team-a"}]})),
                "Splits[0].Namespace: \"team-a\": namespaces and partitions",
            ),
            (
                Store::default().with("service-resolver", "api", json!({"LoadBalancer": {"Policy": "least_request", "HashPolicies": [{"Field": "header", "FieldValue": "x-user"}]}})),
                "hashing needs Policy ring_hash or maglev",
            ),
            (
                Store::default().with("service-resolver", "api", json!({"LoadBalancer": {"Policy": "ring_hash", "HashPolicies": [{"Field": "path", "FieldValue": "id"}]}})),
                "\"path\" is not a hash field",
            ),
            (
                Store::default().with("service-resolver", "api", json!({"LoadBalancer": {"Policy": "ring_hash", "HashPolicies": [{"Field": "cookie", "FieldValue": "id", "CookieConfig": {"Session": true, "TTL": "1h"}}]}})),
                "a Session cookie has no TTL",
            ),
            (
                Store::default().with("service-resolver", "api", json!({"PrioritizeByLocality": {"Mode": "failover"}})),
                "PrioritizeByLocality: Meshwork has no localities",
            ),
        ];
        for (store, says) in cases {
            let err = Chain::compile("api", &store).expect_err(says);
            assert!(err.contains(says), "{says}: {err}");
        }
    }

    #[test]
    fn load_balancer_and_idle_timeout_are_read() {
        let store = Store::default()
            .with("service-resolver", "api", json!({"LoadBalancer": {"Policy": "maglev", "HashPolicies": [{"Field": "header", "FieldValue": "X-User"}]}}))
            .with("service-router", "api", json!({"Routes": [{"Destination": {"IdleTimeout": "30s", "Namespace": "default"}}]}));
        let chain = Chain::compile("api", &store).expect("compiles");
        let (_, dest) = chain.route("GET", "/", None, NO_HEADERS);
        assert_eq!(dest.idle_timeout, Some(Duration::from_secs(30)));
        let lb = chain.targets[dest.pick(0).target]
            .load_balancer
            .clone()
            .expect("lb");
        assert_eq!(lb.policy, "ring_hash");
        assert_eq!(
            lb.hash_policies,
            [HashPolicy {
                on: HashOn::Header("x-user".into()),
                terminal: false
            }]
        );
        let store = Store::default().with(
            "service-resolver",
            "api",
            json!({"LoadBalancer": {"Policy": "ring_hash", "HashPolicies": [
                {"Field": "cookie", "FieldValue": "sid", "CookieConfig": {"TTL": "1h", "Path": "/"}, "Terminal": true},
                {"Field": "query_parameter", "FieldValue": "user"},
                {"SourceIP": true}]}}),
        );
        let chain = Chain::compile("api", &store).expect("compiles");
        let lb = chain.targets[0].load_balancer.clone().expect("lb");
        assert_eq!(
            lb.hash_policies
                .iter()
                .map(|p| p.on.clone())
                .collect::<Vec<_>>(),
            [
                HashOn::Cookie {
                    name: "sid".into(),
                    ttl: Some(Duration::from_secs(3600)),
                    session: false,
                    path: Some("/".into())
                },
                HashOn::QueryParameter("user".into()),
                HashOn::SourceIp
            ]
        );
        assert!(lb.hash_policies[0].terminal);
        // A resolver that only balances or times out still applies.
        assert!(!chain.is_plain(), "a LoadBalancer alone applies");
        let timeout_only =
            Store::default().with("service-resolver", "api", json!({"ConnectTimeout": "2s"}));
        let chain = Chain::compile("api", &timeout_only).expect("compiles");
        assert!(!chain.is_plain(), "a ConnectTimeout alone applies");
        assert!(
            Chain::compile("api", &Store::default())
                .expect("compiles")
                .is_plain()
        );
    }

    #[test]
    fn faults_come_from_the_route_or_the_service_defaults() {
        let store = Store::default()
            .with("service-defaults", "api", json!({"Protocol": "http", "Fault": {"Delay": {"Percent": 12.5, "Duration": "2s"}}}))
            .with(
                "service-router",
                "api",
                json!({"Routes": [{"Match": {"HTTP": {"PathPrefix": "/x"}},
                                   "Destination": {"Fault": {"Abort": {"Percent": 5, "GRPCStatus": 8}}, "RetryOn": ["gateway-error", "reset"]}}]}),
            );
        let chain = Chain::compile("api", &store).expect("compiles");
        assert!(
            !chain.is_plain(),
            "a service fault alone makes the chain matter"
        );
        let (_, dest) = chain.route("GET", "/x", None, NO_HEADERS);
        let abort = dest
            .fault
            .as_ref()
            .and_then(|f| f.abort.clone())
            .expect("abort");
        assert_eq!(
            (abort.per_10k, abort.http_status, abort.grpc_status),
            (500, 503, 8)
        );
        assert!(dest.retry_on.gateway_error && dest.retry_on.reset && !dest.retry_on.any_5xx);
        let target = &chain.targets[dest.pick(0).target];
        let delay = target
            .fault
            .as_ref()
            .and_then(|f| f.delay.clone())
            .expect("delay");
        assert_eq!(
            (delay.per_10k, delay.duration),
            (1_250, Duration::from_secs(2))
        );
    }

    #[test]
    fn validation_on_write_sees_the_entry_with_those_stored() {
        let stored = Store::default().with("service-resolver", "api", resolver());
        let split = json!({"Splits": [{"Weight": 100, "ServiceSubset": "v3"}]});
        let body = split.as_object().expect("object");
        let err = validate_entry("service-splitter", "api", body, &stored).expect_err("v3 unknown");
        assert!(err.contains("no subset \"v3\""), "{err}");
        let ok = json!({"Splits": [{"Weight": 100, "ServiceSubset": "v2"}]});
        validate_entry(
            "service-splitter",
            "api",
            ok.as_object().expect("object"),
            &stored,
        )
        .expect("v2 exists");
    }
}
