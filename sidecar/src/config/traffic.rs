//! The proxy's part of the config file: `[inbound]`, `[[upstreams]]` and
//! `[proxy]`, validated into [`Inbound`], [`Upstream`] and [`ProxySettings`].
//! Defaults follow Envoy/Consul practice (connect 5 s, request 15 s, idle
//! 1 h, circuit breaker 1024/1024/1024, ejection 30 s base). This module
//! only parses; it knows nothing about sockets.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::{InboundSection, ProxySection, UpstreamSection, duration};

/// The sidecar inbound listener's default address.
pub const DEFAULT_INBOUND: &str = "0.0.0.0:21000";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
/// No ejection lasts longer than this, however often an endpoint has been
/// ejected (Envoy's `max_ejection_time` default). A `base_ejection` over it
/// is refused rather than stretching the cap, as Envoy would.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 (and HTTP/2 with prior knowledge, which hyper's auto
    /// server detects), proxied at L7.
    Http,
    /// HTTP/2 to the upstream.
    Http2,
    /// gRPC: HTTP/2 to the upstream, errors as gRPC statuses.
    Grpc,
    /// Raw bytes (L4).
    Tcp,
}

impl Protocol {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "http" => Protocol::Http,
            "http2" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "tcp" => Protocol::Tcp,
            _ => return None,
        })
    }

    pub fn is_http(self) -> bool {
        self != Protocol::Tcp
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        })
    }
}

/// How an upstream endpoint is picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
    /// Power of two choices on in-flight requests.
    LeastRequest,
    Random,
    /// Consistent hashing on a header (or the client's address).
    RingHash,
}

impl Balance {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "round_robin" => Balance::RoundRobin,
            "least_request" => Balance::LeastRequest,
            "random" => Balance::Random,
            "ring_hash" => Balance::RingHash,
            _ => return None,
        })
    }
}

/// When a failed attempt is tried again (on another endpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    /// The TCP connection could not be made (always safe to retry).
    pub connect_failure: bool,
    /// The upstream reset or closed the connection before answering.
    pub reset: bool,
    /// Any 5xx answer.
    pub any_5xx: bool,
    /// These status codes.
    pub statuses: Vec<u16>,
}

impl RetryOn {
    pub fn status(&self, code: u16) -> bool {
        (self.any_5xx && (500..600).contains(&code)) || self.statuses.contains(&code)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 = none).
    pub attempts: u32,
    pub on: RetryOn,
    /// Retries in flight may be at most this share of requests in flight
    /// (at least 3 are always allowed, as in Envoy).
    pub budget_percent: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutlierPolicy {
    /// Consecutive 5xx (or connect failures) that eject an endpoint; 0 = off.
    pub consecutive_5xx: u32,
    /// Ejection time is this times the number of ejections so far, at
    /// most [`MAX_EJECTION`] (which this may not exceed).
    #[serde(serialize_with = "millis")]
    pub base_ejection: Duration,
    /// At most this share of endpoints is ejected at once.
    pub max_ejection_percent: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Open upstream connections (TCP: proxied connections).
    pub max_connections: usize,
    /// Client connections open on the listener at once: past it, the
    /// oldest idle HTTP connection is closed to make room, or (none idle)
    /// the new connection is refused.
    pub max_downstream: usize,
    /// Requests sent upstream and waiting for the response head.
    pub max_pending: usize,
    /// Requests in flight.
    pub max_requests: usize,
}

/// One `[[upstreams]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Upstream {
    /// The service's name in the registry.
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    /// Only instances carrying this tag.
    pub tag: Option<String>,
    pub balance: Balance,
    pub hash_header: Option<String>,
    #[serde(serialize_with = "millis")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "millis")]
    pub request_timeout: Duration,
    #[serde(serialize_with = "millis")]
    pub idle_timeout: Duration,
    pub retries: RetryPolicy,
    pub outlier: OutlierPolicy,
    pub limits: Limits,
    /// A discovery-chain target's `LoadBalancer.HashPolicies` (ring hash);
    /// over `hash_header` when given.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "hash_policies"
    )]
    pub hash_policies: Vec<meshwork_core::chain::HashPolicy>,
    /// Which settings the file gives (they win over the registry's).
    #[serde(skip)]
    pub explicit: Explicit,
    /// Settings taken from the registry's config entries: setting → the
    /// entry and field (see [`Upstream::with_defaults`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub from_registry: BTreeMap<String, String>,
    /// A gateway's listener that terminates TLS for outside clients
    /// (`crate::tls::edge`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub edge_tls: bool,
    /// A gateway's listener for several services (or hosts): each request
    /// goes to the first route whose hosts match its `Host`; none: 404.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub host_routes: Vec<HostRoute>,
    /// A gateway's HTTP listener: what it asks of outside clients
    /// (`crate::gateway::edge`).
    #[serde(skip)]
    pub edge: Option<std::sync::Arc<super::edge::EdgeSpec>>,
}

/// One service of a gateway listener that routes by host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostRoute {
    /// Lower-case host names; `*.example.com` matches any name ending in
    /// `.example.com`, `name.ingress.*` any name starting with
    /// `name.ingress.` (Consul's default for a service without hosts).
    pub hosts: Vec<String>,
    pub upstream: Upstream,
}

impl HostRoute {
    /// How well `host` (lower case, no port) matches this route, as Envoy
    /// ranks virtual-host domains: an exact name beats any `*.suffix`
    /// (the longest suffix first), which beats a `prefix.*` (the longest
    /// first); `None`: no match.
    pub fn rank(&self, host: &str) -> Option<(u8, usize)> {
        self.hosts
            .iter()
            .filter_map(|h| {
                if let Some(suffix) = h.strip_prefix('*') {
                    (host.len() > suffix.len() && host.ends_with(suffix))
                        .then_some((2, suffix.len()))
                } else if let Some(prefix) = h.strip_suffix('*') {
                    (host.len() > prefix.len() && host.starts_with(prefix))
                        .then_some((1, prefix.len()))
                } else {
                    (h == host).then_some((3, h.len()))
                }
            })
            .max()
    }
}

/// The settings of an `[[upstreams]]` entry that its file gives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Explicit {
    pub protocol: bool,
    pub connect_timeout: bool,
    pub retry_on: bool,
    pub max_connections: bool,
    pub max_pending: bool,
    pub max_requests: bool,
    pub consecutive_5xx: bool,
    pub base_ejection: bool,
    pub max_ejection_percent: bool,
}

impl Upstream {
    /// This upstream with the registry's settings for it
    /// (`meshwork_core::upstream_defaults`) where its file says nothing.
    /// A protocol from the registry brings its default retry conditions
    /// along unless the file lists them.
    pub fn with_defaults(
        &self,
        d: &meshwork_core::upstream_defaults::UpstreamDefaults,
    ) -> Upstream {
        let mut out = self.clone();
        out.from_registry.clear();
        let e = self.explicit;
        let mut took = |setting: &'static str| {
            if let Some(source) = d.sources.get(setting) {
                out.from_registry.insert(setting.to_owned(), source.clone());
            }
        };
        if !e.protocol
            && let Some(p) = d.protocol.as_deref().and_then(Protocol::parse)
        {
            took("protocol");
            out.protocol = p;
            if !e.retry_on {
                out.retries.on = default_retry_on(p);
            }
        }
        if !e.connect_timeout
            && let Some(t) = d.connect_timeout
        {
            took("connect_timeout");
            out.connect_timeout = t;
        }
        let limits = [
            (
                e.max_connections,
                d.max_connections,
                "limits.max_connections",
            ),
            (e.max_pending, d.max_pending, "limits.max_pending"),
            (e.max_requests, d.max_requests, "limits.max_requests"),
        ];
        for (explicit, value, setting) in limits {
            if let (false, Some(n)) = (explicit, value) {
                took(setting);
                let n = n as usize;
                match setting {
                    "limits.max_connections" => out.limits.max_connections = n,
                    "limits.max_pending" => out.limits.max_pending = n,
                    _ => out.limits.max_requests = n,
                }
            }
        }
        if !e.consecutive_5xx
            && let Some(n) = d.consecutive_5xx
        {
            took("outlier.consecutive_5xx");
            out.outlier.consecutive_5xx = n;
        }
        if !e.base_ejection
            && let Some(t) = d.base_ejection
        {
            took("outlier.base_ejection");
            out.outlier.base_ejection = t.min(MAX_EJECTION);
        }
        if !e.max_ejection_percent
            && let Some(p) = d.max_ejection_percent
        {
            took("outlier.max_ejection_percent");
            out.outlier.max_ejection_percent = p.min(100);
        }
        // A hash header needs HTTP; a tcp upstream keeps ring hashing on
        // the client's address.
        if out.protocol == Protocol::Tcp {
            out.hash_header = None;
            out.retries.on.reset = false;
            out.retries.on.any_5xx = false;
            out.retries.on.statuses.clear();
        }
        out
    }
}

/// The `[inbound]` listener, in front of the local app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inbound {
    pub listen: SocketAddr,
    pub protocol: Protocol,
    /// The local app.
    pub app: SocketAddr,
    /// Client connections open at once (see [`Limits::max_downstream`]).
    pub max_connections: usize,
    /// Connecting to the app.
    #[serde(serialize_with = "millis")]
    pub connect_timeout: Duration,
    /// A request to the app, answer included (`None`: no limit of its own).
    #[serde(serialize_with = "optional_millis")]
    pub request_timeout: Option<Duration>,
    /// Which settings the file gives (they win over the registry's).
    #[serde(skip)]
    pub explicit: InboundExplicit,
    /// Settings taken from the registry's config entries: setting → the
    /// entry and field (see [`Inbound::with_defaults`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub from_registry: BTreeMap<String, String>,
}

/// The settings of `[inbound]` that its file gives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboundExplicit {
    pub connect_timeout: bool,
    pub request_timeout: bool,
    pub max_connections: bool,
}

impl Inbound {
    /// This listener with the registry's settings for its service
    /// (`meshwork_core::upstream_defaults::for_inbound`) where the file
    /// says nothing.
    pub fn with_defaults(&self, d: &meshwork_core::upstream_defaults::InboundDefaults) -> Inbound {
        let mut out = self.clone();
        out.from_registry.clear();
        let e = self.explicit;
        let mut took = |setting: &'static str| {
            if let Some(source) = d.sources.get(setting) {
                out.from_registry
                    .insert(format!("inbound.{setting}"), source.clone());
            }
        };
        if let (false, Some(t)) = (e.connect_timeout, d.connect_timeout) {
            took("connect_timeout");
            out.connect_timeout = t;
        }
        if let (false, Some(t)) = (e.request_timeout, d.request_timeout) {
            took("request_timeout");
            out.request_timeout = Some(t);
        }
        if let (false, Some(n)) = (e.max_connections, d.max_connections) {
            took("max_connections");
            out.max_connections = n as usize;
        }
        out
    }
}

/// `[proxy]`: process-wide proxy settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxySettings {
    #[serde(serialize_with = "millis")]
    pub drain: Duration,
    pub access_log: bool,
}

/// Hash policies as `/config` shows them: `header:x-user`, `cookie:sid`,
/// `query_parameter:user`, `source_ip` (`!` after a terminal one).
fn hash_policies<S: serde::Serializer>(
    policies: &[meshwork_core::chain::HashPolicy],
    s: S,
) -> Result<S::Ok, S::Error> {
    use meshwork_core::chain::HashOn;
    s.collect_seq(policies.iter().map(|p| {
        let on = match &p.on {
            HashOn::Header(h) => format!("header:{h}"),
            HashOn::Cookie { name, .. } => format!("cookie:{name}"),
            HashOn::QueryParameter(q) => format!("query_parameter:{q}"),
            HashOn::SourceIp => "source_ip".to_owned(),
        };
        if p.terminal { format!("{on}!") } else { on }
    }))
}

fn optional_millis<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => millis(d, s),
        None => s.serialize_none(),
    }
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

fn socket_addr(f: &str, key: &str, text: &str, errors: &mut Vec<String>) -> SocketAddr {
    text.parse().unwrap_or_else(|_| {
        errors.push(format!("{f}: {key}: {text:?} is not IP:PORT"));
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

fn protocol(f: &str, key: &str, text: Option<&str>, errors: &mut Vec<String>) -> Protocol {
    let text = text.unwrap_or("tcp");
    Protocol::parse(text).unwrap_or_else(|| {
        errors.push(format!(
            "{f}: {key}: {text:?} is not one of http, http2, grpc, tcp"
        ));
        Protocol::Tcp
    })
}

fn or_error<T>(result: Result<T, String>, fallback: T, errors: &mut Vec<String>) -> T {
    result.unwrap_or_else(|e| {
        errors.push(e);
        fallback
    })
}

fn percent(f: &str, key: &str, value: u32, errors: &mut Vec<String>) -> u32 {
    if value > 100 {
        errors.push(format!("{f}: {key}: {value} is over 100"));
    }
    value.min(100)
}

fn limit(f: &str, key: &str, value: Option<u32>, errors: &mut Vec<String>) -> usize {
    limit_or(f, key, value, 1024, errors)
}

fn limit_or(
    f: &str,
    key: &str,
    value: Option<u32>,
    default: usize,
    errors: &mut Vec<String>,
) -> usize {
    match value {
        None => default,
        Some(0) => {
            errors.push(format!("{f}: {key}: must be at least 1"));
            default
        }
        Some(n) => n as usize,
    }
}

/// A gateway's listener for one service (`crate::gateway`): `name` on
/// `listen` with the entry's `protocol` (explicit: the service's own
/// `Protocol` does not change it), every other setting as an
/// `[[upstreams]]` entry that names only these.
pub fn gateway_upstream(
    name: &str,
    listen: SocketAddr,
    protocol: &str,
) -> Result<Upstream, String> {
    let mut errors = Vec::new();
    let section = UpstreamSection {
        name: name.to_owned(),
        listen: listen.to_string(),
        protocol: Some(protocol.to_owned()),
        tag: None,
        balance: None,
        hash_header: None,
        connect_timeout: None,
        request_timeout: None,
        idle_timeout: None,
        retries: None,
        outlier: None,
        limits: None,
    };
    let mut made = upstreams("ingress-gateway", vec![section], &mut errors);
    match (made.pop(), errors.is_empty()) {
        (Some(u), true) => Ok(u),
        _ => Err(errors.join("; ")),
    }
}

/// Client connections a listener keeps open at once unless configured.
pub const DEFAULT_MAX_DOWNSTREAM: usize = 4096;

/// `[inbound]`; `app_default` is where the app listens by default.
pub(super) fn inbound(
    f: &str,
    raw: InboundSection,
    app_default: SocketAddr,
    errors: &mut Vec<String>,
) -> Inbound {
    Inbound {
        listen: socket_addr(
            f,
            "inbound.listen",
            raw.listen.as_deref().unwrap_or(DEFAULT_INBOUND),
            errors,
        ),
        protocol: protocol(f, "inbound.protocol", raw.protocol.as_deref(), errors),
        app: raw
            .app
            .map_or(app_default, |a| socket_addr(f, "inbound.app", &a, errors)),
        max_connections: limit_or(
            f,
            "inbound.max_connections",
            raw.max_connections,
            DEFAULT_MAX_DOWNSTREAM,
            errors,
        ),
        connect_timeout: or_error(
            duration(
                f,
                "inbound.connect_timeout",
                raw.connect_timeout.as_deref(),
                DEFAULT_CONNECT_TIMEOUT,
            ),
            DEFAULT_CONNECT_TIMEOUT,
            errors,
        ),
        request_timeout: raw.request_timeout.as_deref().map(|text| {
            or_error(
                duration(f, "inbound.request_timeout", Some(text), NO_REQUEST_TIMEOUT),
                NO_REQUEST_TIMEOUT,
                errors,
            )
        }),
        explicit: InboundExplicit {
            connect_timeout: raw.connect_timeout.is_some(),
            request_timeout: raw.request_timeout.is_some(),
            max_connections: raw.max_connections.is_some(),
        },
        from_registry: BTreeMap::new(),
    }
}

/// What "no request timeout" means on the inbound listener: a day.
pub const NO_REQUEST_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

fn retry_on(f: &str, key: &str, list: &[String], errors: &mut Vec<String>) -> RetryOn {
    let mut on = RetryOn::default();
    for item in list {
        match item.as_str() {
            "connect-failure" => on.connect_failure = true,
            "reset" => on.reset = true,
            "5xx" => on.any_5xx = true,
            "gateway-error" => on.statuses.extend([502, 503, 504]),
            code => match code.parse::<u16>() {
                Ok(c) if (500..600).contains(&c) => on.statuses.push(c),
                _ => errors.push(format!(
                    "{f}: {key}: {item:?} is not one of connect-failure, reset, 5xx, gateway-error or a 5xx status code"
                )),
            },
        }
    }
    on.statuses.sort_unstable();
    on.statuses.dedup();
    on
}

/// Connect failures always; for HTTP also resets (idempotent requests
/// only), which is what a pooled connection closed by the other side at
/// the wrong moment looks like.
fn default_retry_on(protocol: Protocol) -> RetryOn {
    RetryOn {
        connect_failure: true,
        reset: protocol.is_http(),
        ..RetryOn::default()
    }
}

pub(super) fn upstreams(
    f: &str,
    raw: Vec<UpstreamSection>,
    errors: &mut Vec<String>,
) -> Vec<Upstream> {
    let mut names = HashSet::new();
    let mut listens = HashSet::new();
    let mut out = Vec::new();
    for (i, u) in raw.into_iter().enumerate() {
        let key = format!("upstreams[{i}]");
        let explicit = Explicit {
            protocol: u.protocol.is_some(),
            connect_timeout: u.connect_timeout.is_some(),
            retry_on: u.retries.as_ref().is_some_and(|r| r.on.is_some()),
            max_connections: u
                .limits
                .as_ref()
                .is_some_and(|l| l.max_connections.is_some()),
            max_pending: u.limits.as_ref().is_some_and(|l| l.max_pending.is_some()),
            max_requests: u.limits.as_ref().is_some_and(|l| l.max_requests.is_some()),
            consecutive_5xx: u
                .outlier
                .as_ref()
                .is_some_and(|o| o.consecutive_5xx.is_some()),
            base_ejection: u
                .outlier
                .as_ref()
                .is_some_and(|o| o.base_ejection.is_some()),
            max_ejection_percent: u
                .outlier
                .as_ref()
                .is_some_and(|o| o.max_ejection_percent.is_some()),
        };
        if u.name.trim().is_empty() {
            errors.push(format!("{f}: {key}.name: must not be empty"));
        } else if !names.insert(u.name.clone()) {
            errors.push(format!(
                "{f}: {key}.name: {:?} is listed twice (give each upstream once; tags select subsets)",
                u.name
            ));
        }
        let listen = socket_addr(f, &format!("{key}.listen"), &u.listen, errors);
        if listen.port() != 0 && !listens.insert(listen) {
            errors.push(format!("{f}: {key}.listen: {listen} is used twice"));
        }
        let protocol = protocol(f, &format!("{key}.protocol"), u.protocol.as_deref(), errors);
        let balance = match u.balance.as_deref() {
            None => Balance::RoundRobin,
            Some(b) => Balance::parse(b).unwrap_or_else(|| {
                errors.push(format!(
                    "{f}: {key}.balance: {b:?} is not one of round_robin, least_request, random, ring_hash"
                ));
                Balance::RoundRobin
            }),
        };
        if let Some(h) = &u.hash_header {
            if balance != Balance::RingHash {
                errors.push(format!(
                    "{f}: {key}.hash_header: only used with balance = \"ring_hash\""
                ));
            } else if protocol == Protocol::Tcp {
                errors.push(format!(
                    "{f}: {key}.hash_header: a tcp upstream has no headers (it hashes the client's address)"
                ));
            } else if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                errors.push(format!(
                    "{f}: {key}.hash_header: {h:?} is not a header name"
                ));
            }
        }
        let d = |name: &str, text: Option<&str>, default: Duration, errors: &mut Vec<String>| {
            or_error(
                duration(f, &format!("{key}.{name}"), text, default),
                default,
                errors,
            )
        };
        let connect_timeout = d(
            "connect_timeout",
            u.connect_timeout.as_deref(),
            DEFAULT_CONNECT_TIMEOUT,
            errors,
        );
        let request_timeout = d(
            "request_timeout",
            u.request_timeout.as_deref(),
            DEFAULT_REQUEST_TIMEOUT,
            errors,
        );
        let idle_timeout = d(
            "idle_timeout",
            u.idle_timeout.as_deref(),
            DEFAULT_IDLE_TIMEOUT,
            errors,
        );
        let retries = match u.retries {
            None => RetryPolicy {
                attempts: 2,
                on: default_retry_on(protocol),
                budget_percent: 20,
            },
            Some(r) => RetryPolicy {
                attempts: match r.attempts {
                    Some(n) if n > 10 => {
                        errors.push(format!("{f}: {key}.retries.attempts: {n} is over 10"));
                        10
                    }
                    n => n.unwrap_or(2),
                },
                on: match &r.on {
                    None => default_retry_on(protocol),
                    Some(list) => retry_on(f, &format!("{key}.retries.on"), list, errors),
                },
                budget_percent: percent(
                    f,
                    &format!("{key}.retries.budget_percent"),
                    r.budget_percent.unwrap_or(20),
                    errors,
                ),
            },
        };
        if protocol == Protocol::Tcp
            && (retries.on.reset || !retries.on.statuses.is_empty() || retries.on.any_5xx)
        {
            errors.push(format!(
                "{f}: {key}.retries.on: a tcp upstream can only retry connect-failure"
            ));
        }
        let outlier = match u.outlier {
            None => OutlierPolicy {
                consecutive_5xx: 5,
                base_ejection: Duration::from_secs(30),
                max_ejection_percent: 50,
            },
            Some(o) => OutlierPolicy {
                consecutive_5xx: o.consecutive_5xx.unwrap_or(5),
                base_ejection: d(
                    "outlier.base_ejection",
                    o.base_ejection.as_deref(),
                    Duration::from_secs(30),
                    errors,
                ),
                max_ejection_percent: percent(
                    f,
                    &format!("{key}.outlier.max_ejection_percent"),
                    o.max_ejection_percent.unwrap_or(50),
                    errors,
                ),
            },
        };
        if outlier.base_ejection > MAX_EJECTION {
            errors.push(format!(
                "{f}: {key}.outlier.base_ejection: {:?} is over the {}-minute cap on ejections",
                outlier.base_ejection,
                MAX_EJECTION.as_secs() / 60
            ));
        }
        let limits = match u.limits {
            None => Limits {
                max_connections: 1024,
                max_pending: 1024,
                max_requests: 1024,
                max_downstream: DEFAULT_MAX_DOWNSTREAM,
            },
            Some(l) => Limits {
                max_connections: limit(
                    f,
                    &format!("{key}.limits.max_connections"),
                    l.max_connections,
                    errors,
                ),
                max_pending: limit(
                    f,
                    &format!("{key}.limits.max_pending"),
                    l.max_pending,
                    errors,
                ),
                max_requests: limit(
                    f,
                    &format!("{key}.limits.max_requests"),
                    l.max_requests,
                    errors,
                ),
                max_downstream: limit_or(
                    f,
                    &format!("{key}.limits.max_downstream_connections"),
                    l.max_downstream_connections,
                    DEFAULT_MAX_DOWNSTREAM,
                    errors,
                ),
            },
        };
        out.push(Upstream {
            name: u.name,
            listen,
            protocol,
            tag: u.tag.filter(|t| !t.is_empty()),
            balance,
            hash_header: u.hash_header.map(|h| h.to_ascii_lowercase()),
            connect_timeout,
            request_timeout,
            idle_timeout,
            retries,
            outlier,
            limits,
            hash_policies: Vec::new(),
            explicit,
            from_registry: BTreeMap::new(),
            edge_tls: false,
            host_routes: Vec::new(),
            edge: None,
        });
    }
    out
}

pub(super) fn proxy(f: &str, raw: ProxySection, errors: &mut Vec<String>) -> ProxySettings {
    ProxySettings {
        drain: or_error(
            duration(f, "proxy.drain", raw.drain.as_deref(), DEFAULT_DRAIN),
            DEFAULT_DRAIN,
            errors,
        ),
        access_log: raw.access_log.unwrap_or(false),
    }
}
