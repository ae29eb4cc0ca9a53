//! What a gateway's HTTP listener asks of a request from outside before
//! it goes into the mesh, in order:
//!
//! 1. `CONNECT` is refused (405): the gateway routes requests, it does
//!    not open tunnels.
//! 2. A listener with `HTTPSRedirect` answers `308` to the same host and
//!    path over HTTPS, and nothing else.
//! 3. The client's address: the peer's, or — with `trusted_hops` set in
//!    `[gateway]` — the address that many hops back in
//!    `X-Forwarded-For`. `X-Forwarded-For` (the trusted part of the chain
//!    and the peer), `X-Forwarded-Proto` and `Forwarded` (RFC 7239) are
//!    set by the gateway: what a client sent beyond the trusted hops is
//!    not passed on.
//! 4. Per-client rate limit by address (before authentication, so a
//!    flood costs no signature checks) — or, `By: "subject"`, after it,
//!    by the token's `sub` or the API key's name.
//! 5. Authentication, when the listener asks for it: an API key of the
//!    gateway's `[[gateway.api_keys]]` in the listener's header, or a JWT
//!    one of its providers verifies (`super::jwt`). Headers the gateway
//!    sets from a token (claims, the forwarded payload) are removed from
//!    every request first, so a client cannot supply them. Failure: 401
//!    with `WWW-Authenticate`.
//!
//! The answer gets `Strict-Transport-Security` when the listener has
//! `HSTS`.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request};
use meshwork_core::ingress::{ClientLimit, LimitBy};
use meshwork_core::jwt_provider::{Location, Provider};
use serde_json::Value;

use super::jwt::{self, Refused};
use super::keys::Keyring;
use crate::config::edge::EdgeSpec;
use crate::http::rescue::ProxyError;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Why a request was refused, for `/metrics`.
const REASONS: [&str; 15] = [
    "missing",
    "api-key",
    "too-large",
    "malformed",
    "algorithm",
    "unknown-key",
    "signature",
    "expired",
    "not-yet-valid",
    "issuer",
    "audience",
    "claims",
    "claim-value",
    "no-keys",
    "method",
];

fn reason_index(reason: &str) -> usize {
    REASONS.iter().position(|r| *r == reason).unwrap_or(0)
}

/// Who a client is, for its bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ClientKey {
    Ip(IpAddr),
    /// A subject (`key:<name>` or `jwt:<provider>:<sub>`), hashed: a long
    /// `sub` costs the table no more than a short one.
    Subject(u64),
}

#[derive(Debug)]
struct ClientBucket {
    tokens: f64,
    last: Instant,
}

/// The buckets of the clients seen last, at most `max_clients`.
#[derive(Debug)]
struct Buckets {
    limit: ClientLimit,
    /// By client and route (`u16::MAX`: the listener-wide bucket).
    table: std::sync::Mutex<lru::LruCache<(ClientKey, u16), ClientBucket>>,
    limited: AtomicU64,
    evicted: AtomicU64,
    /// Keyed per process: subjects hash unpredictably.
    hasher: std::hash::RandomState,
}

impl Buckets {
    fn new(limit: ClientLimit) -> Self {
        Self {
            limit,
            // Grown as clients come (a full-size table up front would
            // reserve memory for clients that never come), bounded below.
            table: std::sync::Mutex::new(lru::LruCache::unbounded()),
            limited: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn subject(&self, subject: &str) -> ClientKey {
        use std::hash::BuildHasher as _;
        ClientKey::Subject(self.hasher.hash_one(subject))
    }

    /// Takes a token of `key`'s bucket for `path` (its route's, else the
    /// listener's); `Err(wait)` until the next one.
    fn take(&self, key: ClientKey, path: &str, now: Instant) -> Result<(), Duration> {
        let normal = (!self.limit.routes.is_empty()).then(|| normalize_path(path));
        let route = self
            .limit
            .routes
            .iter()
            .enumerate()
            .find(|(_, r)| normal.as_deref().is_some_and(|p| r.path.matches(p)));
        let (slot, rate, burst) = match (route, self.limit.rate) {
            (Some((i, r)), _) => (u16::try_from(i).unwrap_or(u16::MAX - 1), r.rate, r.burst),
            (None, Some(rate)) => (u16::MAX, rate, self.limit.burst),
            (None, None) => return Ok(()),
        };
        let key = (key, slot);
        let burst = f64::from(burst);
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = match table.get_mut(&key) {
            Some(b) => b,
            None => {
                while table.len() >= self.limit.max_clients.max(1) {
                    table.pop_lru();
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
                // A new (or forgotten) client starts with a full bucket.
                table.push(
                    key.clone(),
                    ClientBucket {
                        tokens: burst,
                        last: now,
                    },
                );
                table.get_mut(&key).ok_or(Duration::ZERO)?
            }
        };
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            self.limited.fetch_add(1, Ordering::Relaxed);
            // The rate is at least 0.001 a second (checked when read): the
            // wait is at most 1,000 s.
            Err(Duration::try_from_secs_f64((1.0 - bucket.tokens) / rate)
                .unwrap_or(Duration::from_secs(1000)))
        }
    }
}

/// `path` as a backend may read it, for matching a route's limit: the
/// one normal form the inbound intentions use (`meshwork_core::http_path::normalize`:
/// unreserved escapes decoded, `//` merged, `.` and `..` resolved), so
/// `//login`, `/%6Cogin` and `/x/../login` all count as `/login`. A path
/// with no normal form is matched as it is (no route takes it; the
/// listener-wide bucket still does). Matching is case-sensitive.
fn normalize_path(path: &str) -> String {
    meshwork_core::http_path::normalize(path).map_or_else(|_| path.to_owned(), Cow::into_owned)
}

/// A listener's edge, live: its spec, the providers' keys, the client
/// buckets and counters.
#[derive(Debug)]
pub struct Edge {
    spec: Arc<EdgeSpec>,
    keyring: Arc<Keyring>,
    buckets: Option<Buckets>,
    hsts: Option<HeaderValue>,
    /// Headers the gateway sets from tokens: removed from every request.
    owned_headers: Vec<HeaderName>,
    refused: [AtomicU64; REASONS.len()],
}

/// The headers a provider sets from a verified token.
pub fn provider_headers(p: &Provider) -> impl Iterator<Item = &str> {
    p.claim_headers
        .iter()
        .map(|c| c.header.as_str())
        .chain(p.forward_payload.as_deref())
}

/// What the edge made of a request it let through.
#[derive(Debug, Default)]
pub struct Admitted {
    /// The answer's `Strict-Transport-Security`.
    pub hsts: Option<HeaderValue>,
}

impl Edge {
    pub fn new(spec: Arc<EdgeSpec>, keyring: Arc<Keyring>) -> Self {
        let mut owned_headers = Vec::new();
        let names = spec
            .providers
            .iter()
            .flat_map(provider_headers)
            .chain(spec.owned_headers.iter().map(String::as_str));
        for name in names {
            if let Ok(h) = HeaderName::from_bytes(name.as_bytes())
                && !owned_headers.contains(&h)
            {
                owned_headers.push(h);
            }
        }
        Self {
            buckets: spec.policy.rate_limit.clone().map(Buckets::new),
            hsts: spec
                .policy
                .hsts
                .as_deref()
                .and_then(|v| HeaderValue::from_str(v).ok()),
            owned_headers,
            keyring,
            spec,
            refused: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn refuse(&self, reason: &str) {
        self.refused[reason_index(reason)].fetch_add(1, Ordering::Relaxed);
    }

    /// Checks and prepares `req` from `peer`; the proxy's own answer when
    /// it goes no further (`Err`).
    pub fn admit<B>(&self, req: &mut Request<B>, peer: SocketAddr) -> Result<Admitted, EdgeAnswer> {
        if req.method() == Method::CONNECT {
            self.refuse("method");
            return Err(EdgeAnswer::Error(ProxyError::MethodNotAllowed(
                "CONNECT: the gateway routes requests, it opens no tunnels",
            )));
        }
        if let Some(port) = self.spec.policy.https_redirect {
            return Err(match redirect_location(req, port) {
                Some(location) => EdgeAnswer::Redirect(location),
                None => EdgeAnswer::Error(ProxyError::BadRequest(
                    "the Host header is not a name or address to redirect to",
                )),
            });
        }
        // Headers spelled with `_`: CGI-style servers (WSGI, Rack, PHP) read
        // `x_user` as `x-user`, so one could pass for a header the gateway
        // sets or strips. Dropped, as Envoy's edge setting does.
        let underscored: Vec<HeaderName> = req
            .headers()
            .keys()
            .filter(|k| k.as_str().contains('_'))
            .cloned()
            .collect();
        for name in underscored {
            req.headers_mut().remove(&name);
        }
        let client = self.forwarded(req, peer);
        let by_subject = self
            .buckets
            .as_ref()
            .is_some_and(|b| b.limit.by == LimitBy::Subject);
        if let Some(buckets) = self.buckets.as_ref().filter(|_| !by_subject) {
            buckets
                .take(ClientKey::Ip(client), req.uri().path(), Instant::now())
                .map_err(|wait| EdgeAnswer::Error(ProxyError::RateLimited(wait)))?;
        }
        for name in &self.owned_headers {
            req.headers_mut().remove(name);
        }
        let subject = if self.spec.policy.authenticates() {
            match self.authenticate(req) {
                Ok(subject) => subject,
                Err((reason, challenge)) => {
                    self.refuse(reason);
                    // Limited by subject, a failure has none: it is charged
                    // to the address, so guessing keys is limited too.
                    if let Some(buckets) = self.buckets.as_ref().filter(|_| by_subject) {
                        buckets
                            .take(ClientKey::Ip(client), req.uri().path(), Instant::now())
                            .map_err(|wait| EdgeAnswer::Error(ProxyError::RateLimited(wait)))?;
                    }
                    return Err(EdgeAnswer::Error(ProxyError::Unauthenticated(challenge)));
                }
            }
        } else {
            None
        };
        if let Some(buckets) = self.buckets.as_ref().filter(|_| by_subject) {
            let key = match subject {
                Some(s) => buckets.subject(&s),
                None => ClientKey::Ip(client),
            };
            buckets
                .take(key, req.uri().path(), Instant::now())
                .map_err(|wait| EdgeAnswer::Error(ProxyError::RateLimited(wait)))?;
        }
        Ok(Admitted {
            hsts: self.hsts.clone(),
        })
    }

    /// The listener's `Strict-Transport-Security`, if any.
    pub fn hsts(&self) -> Option<HeaderValue> {
        self.hsts.clone()
    }

    /// Sets the forwarding headers; the client's address.
    fn forwarded<B>(&self, req: &mut Request<B>, peer: SocketAddr) -> IpAddr {
        let hops = usize::from(self.spec.trusted_hops);
        let headers = req.headers_mut();
        let mut chain: Vec<IpAddr> = Vec::new();
        if hops > 0 {
            for value in headers.get_all(&X_FORWARDED_FOR) {
                let Ok(text) = value.to_str() else {
                    continue;
                };
                for item in text.split(',') {
                    // A malformed entry ends what can be believed: the
                    // addresses left of it are dropped with it.
                    match item.trim().parse::<IpAddr>() {
                        Ok(ip) => chain.push(ip),
                        Err(_) => chain.clear(),
                    }
                }
            }
        }
        chain.push(peer.ip());
        // With N trusted hops the client is N entries left of the peer (a
        // shorter chain's first entry); with trusted proxies named, only
        // as far as each hop is one of them.
        let proxies = &self.spec.trusted_proxies;
        let mut first = chain.len() - 1;
        for _ in 0..hops {
            if first == 0
                || !(proxies.is_empty() || proxies.iter().any(|c| c.contains(chain[first])))
            {
                break;
            }
            first -= 1;
        }
        let believed = first < chain.len() - 1;
        let chain = &chain[first..];
        let client = chain[0];
        // The trusted proxy's (the last) value; a trusted proxy must set
        // it (one that passes its client's on is not to be trusted).
        let proto_from_hop = believed
            .then(|| {
                headers
                    .get_all(&X_FORWARDED_PROTO)
                    .iter()
                    .next_back()
                    .cloned()
            })
            .flatten()
            .filter(|v| v == "http" || v == "https");
        if !believed {
            // Nobody in front to vouch for these.
            for name in ["x-real-ip", "x-forwarded-host", "x-forwarded-port"] {
                headers.remove(name);
            }
        }
        let proto = proto_from_hop.unwrap_or_else(|| {
            HeaderValue::from_static(if self.spec.https { "https" } else { "http" })
        });
        let mut xff = String::new();
        let mut forwarded = String::new();
        for (i, ip) in chain.iter().enumerate() {
            if i > 0 {
                xff.push_str(", ");
                forwarded.push_str(", ");
            }
            let _ = write!(xff, "{ip}");
            match ip {
                IpAddr::V4(v4) => {
                    let _ = write!(forwarded, "for={v4}");
                }
                IpAddr::V6(v6) => {
                    let _ = write!(forwarded, "for=\"[{v6}]\"");
                }
            }
        }
        let _ = write!(forwarded, ";proto={}", proto.to_str().unwrap_or("https"));
        headers.remove(&X_FORWARDED_FOR);
        headers.remove(&FORWARDED);
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert(X_FORWARDED_FOR, v);
        }
        if let Ok(v) = HeaderValue::from_str(&forwarded) {
            headers.insert(FORWARDED, v);
        }
        headers.insert(X_FORWARDED_PROTO, proto);
        client
    }

    /// An API key or a token that passes: the subject for the client
    /// limit (`key:<name>`, `jwt:<provider>:<sub>`; `None` for a token
    /// without `sub`). Whatever passes, every provider's token headers
    /// other than a verified one kept by `Forward` are removed: no
    /// unverified token reaches the service beside a verified one.
    fn authenticate<B>(
        &self,
        req: &mut Request<B>,
    ) -> Result<Option<String>, (&'static str, String)> {
        let policy = &self.spec.policy;
        let mut reason = "missing";
        let mut token_seen = false;
        if let Some(header) = &policy.api_key_header
            && let several = req.headers().get_all(header.as_str()).iter().count() > 1
            // Removes every value: a key is never passed on.
            && let Some(value) = req.headers_mut().remove(header.as_str())
        {
            match self.api_key(value.as_bytes()).filter(|_| !several) {
                Some(name) => {
                    self.strip_tokens(req, None);
                    return Ok(Some(format!("key:{name}")));
                }
                None => reason = "api-key",
            }
        }
        for required in &policy.jwt {
            // The provider as this listener was made with (its keys from
            // the keyring, which a later failed reload may have moved on).
            let Some(provider) = self
                .spec
                .providers
                .iter()
                .find(|p| p.name == required.provider)
            else {
                reason = "no-keys";
                continue;
            };
            let (token, location) = match find_token(req, provider) {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(()) => {
                    // The same location twice: which one would the
                    // service read?
                    token_seen = true;
                    reason = "malformed";
                    continue;
                }
            };
            token_seen = true;
            let keys = self
                .keyring
                .get(&provider.name)
                .and_then(|entry| entry.keys.load_full());
            let Some(keys) = keys else {
                reason = "no-keys";
                continue;
            };
            let verified = jwt::verify(&token, provider, &keys, &required.claims)
                .and_then(|claims| pass_claims(req, provider, &token, &claims).map(|()| claims));
            match verified {
                Ok(claims) => {
                    self.strip_tokens(req, Some((provider, location)));
                    let sub = claims.get("sub").and_then(Value::as_str);
                    return Ok(sub.map(|s| format!("jwt:{}:{s}", provider.name)));
                }
                Err(refused) => {
                    // What this provider may have set before failing.
                    for name in provider_headers(provider) {
                        req.headers_mut().remove(name);
                    }
                    reason = refused.as_str();
                }
            }
        }
        let realm = format!("realm=\"{}\"", self.spec.port);
        let challenge = if policy.jwt.is_empty() {
            format!("ApiKey {realm}")
        } else if token_seen {
            format!(
                "Bearer {realm}, error=\"invalid_token\", error_description=\"{}\"",
                describe(reason)
            )
        } else {
            format!("Bearer {realm}")
        };
        Err((reason, challenge))
    }

    /// Removes every provider's token headers but `kept` (the verified
    /// token's, when its provider forwards it).
    fn strip_tokens<B>(&self, req: &mut Request<B>, kept: Option<(&Provider, &Location)>) {
        let keep = match kept {
            Some((
                _,
                Location::Header {
                    name,
                    forward: true,
                    ..
                },
            )) => Some(name.as_str()),
            _ => None,
        };
        for p in &self.spec.providers {
            for location in &p.locations {
                if let Location::Header { name, .. } = location
                    && Some(name.as_str()) != keep
                {
                    req.headers_mut().remove(name.as_str());
                }
            }
        }
    }

    /// The name of the key `presented` is (compared by SHA-256, every
    /// entry looked at).
    fn api_key(&self, presented: &[u8]) -> Option<String> {
        if presented.is_empty() || presented.len() > 1024 {
            return None;
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, presented);
        let mut found = None;
        for key in self.spec.api_keys.iter() {
            let diff = key
                .sha256
                .iter()
                .zip(digest.as_ref())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(key.name.clone());
            }
        }
        found
    }

    /// `/metrics` lines of this listener.
    pub fn render_metrics(&self, out: &mut String) {
        let port = self.spec.port;
        for (i, reason) in REASONS.iter().enumerate() {
            let n = self.refused[i].load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "meshwork_gateway_refused_total{{listener=\"{port}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        if let Some(b) = &self.buckets {
            let clients = b.table.lock().unwrap_or_else(|e| e.into_inner()).len();
            let _ = writeln!(
                out,
                "meshwork_gateway_rate_limited_total{{listener=\"{port}\"}} {}\nmeshwork_gateway_rate_limit_clients{{listener=\"{port}\"}} {clients}\nmeshwork_gateway_rate_limit_evicted_total{{listener=\"{port}\"}} {}",
                b.limited.load(Ordering::Relaxed),
                b.evicted.load(Ordering::Relaxed)
            );
        }
    }
}

/// The metrics' HELP and TYPE lines (once for every listener).
pub const METRICS_HEAD: &str = "# HELP meshwork_gateway_refused_total Requests a gateway listener refused before routing, by reason (authentication, CONNECT).\n# TYPE meshwork_gateway_refused_total counter\n# HELP meshwork_gateway_rate_limited_total Requests refused by a gateway listener's per-client rate limit.\n# TYPE meshwork_gateway_rate_limited_total counter\n# HELP meshwork_gateway_rate_limit_clients Clients in a gateway listener's rate-limit table.\n# TYPE meshwork_gateway_rate_limit_clients gauge\n# HELP meshwork_gateway_rate_limit_evicted_total Clients dropped from a full rate-limit table (least recently seen first).\n# TYPE meshwork_gateway_rate_limit_evicted_total counter\n";

/// What the gateway's 401 says about a token (never more than the
/// category).
fn describe(reason: &str) -> &'static str {
    match reason {
        "expired" => "the token has expired",
        "not-yet-valid" => "the token is not valid yet",
        "issuer" => "the token's issuer is not accepted",
        "audience" => "the token is not for this audience",
        "claims" => "the token lacks a required claim",
        "too-large" => "the token is too large",
        "no-keys" => "the issuer's keys are not available",
        _ => "the token is not valid",
    }
}

/// The first token `provider`'s locations find, and where; `Err` when
/// that location holds it more than once (two headers, two query
/// parameters or two cookies of the name).
#[allow(clippy::result_unit_err)]
fn find_token<'p, B>(
    req: &Request<B>,
    provider: &'p Provider,
) -> Result<Option<(String, &'p Location)>, ()> {
    for location in &provider.locations {
        let mut found: Vec<String> = Vec::new();
        match location {
            Location::Header { name, prefix, .. } => {
                for value in req.headers().get_all(name.as_str()) {
                    let Ok(value) = value.to_str() else {
                        return Err(());
                    };
                    let rest = if prefix.is_empty() {
                        Some(value)
                    } else {
                        value
                            .get(..prefix.len())
                            .filter(|p| p.eq_ignore_ascii_case(prefix))
                            .map(|_| &value[prefix.len()..])
                    };
                    if let Some(token) = rest.map(str::trim).filter(|t| !t.is_empty()) {
                        found.push(token.to_owned());
                    }
                }
            }
            Location::QueryParam(name) => {
                if let Some(query) = req.uri().query() {
                    found.extend(
                        form_urlencoded::parse(query.as_bytes())
                            .filter(|(k, _)| k == name)
                            .map(|(_, v)| v.into_owned()),
                    );
                }
            }
            Location::Cookie(name) => {
                for value in req.headers().get_all(header::COOKIE) {
                    let Ok(text) = value.to_str() else {
                        continue;
                    };
                    for pair in text.split(';') {
                        if let Some((k, v)) = pair.trim().split_once('=')
                            && k == name
                        {
                            found.push(v.to_owned());
                        }
                    }
                }
            }
        }
        match found.len() {
            0 => continue,
            1 => return Ok(found.pop().map(|t| (t, location))),
            _ => return Err(()),
        }
    }
    Ok(None)
}

/// Puts a verified token's claims (and payload) in the headers its
/// provider names; a value no header may carry refuses the token.
fn pass_claims<B>(
    req: &mut Request<B>,
    provider: &Provider,
    token: &str,
    claims: &Value,
) -> Result<(), Refused> {
    for c in &provider.claim_headers {
        let text = match jwt::claim(claims, &c.claim) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => s.clone(),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
            // Lists and objects as JSON (one line: serde_json escapes
            // control characters inside strings).
            Some(v) => v.to_string(),
        };
        if text.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(Refused::ClaimValue);
        }
        let value = HeaderValue::from_str(&text).map_err(|_| Refused::ClaimValue)?;
        let name = HeaderName::from_bytes(c.header.as_bytes()).map_err(|_| Refused::ClaimValue)?;
        req.headers_mut().insert(name, value);
    }
    if let Some(header) = &provider.forward_payload
        && let Some(payload) = token.split('.').nth(1)
        && let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.as_bytes()),
            HeaderValue::from_str(payload),
        )
    {
        req.headers_mut().insert(name, value);
    }
    Ok(())
}

/// `https://<host>[:port]<path>` for a request on a redirecting
/// listener; `None` when the host is missing or not a name or address
/// (nothing but the client's own host is ever named).
fn redirect_location<B>(req: &Request<B>, port: u16) -> Option<String> {
    let host = crate::http::headers::request_host(req);
    let plain = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'));
    if host.is_empty() || !plain {
        return None;
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    Some(if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    })
}

/// The gateway's own answer to a request it does not forward.
#[derive(Debug)]
pub enum EdgeAnswer {
    Error(ProxyError),
    Redirect(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::edge::ApiKey;
    use meshwork_core::ingress::Edge as EdgePolicy;

    fn edge(policy: EdgePolicy, trusted_hops: u8) -> Edge {
        Edge::new(
            Arc::new(EdgeSpec {
                policy,
                providers: Vec::new(),
                owned_headers: vec!["x-user".into()],
                api_keys: Arc::new(vec![ApiKey {
                    name: "partner".into(),
                    sha256: ring::digest::digest(&ring::digest::SHA256, b"secret")
                        .as_ref()
                        .try_into()
                        .unwrap_or([0; 32]),
                }]),
                trusted_hops,
                trusted_proxies: Arc::default(),
                https: true,
                port: 8443,
            }),
            Arc::default(),
        )
    }

    fn request(xff: Option<&str>) -> Request<()> {
        let mut r = Request::get("/a?b=1")
            .header("host", "shop.example.com:8080")
            .header("forwarded", "for=6.6.6.6")
            .body(())
            .unwrap_or_default();
        if let Some(xff) = xff {
            r.headers_mut().insert(
                X_FORWARDED_FOR,
                HeaderValue::from_str(xff).unwrap_or(HeaderValue::from_static("x")),
            );
        }
        r
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 9], 5000))
    }

    fn header<'r>(r: &'r Request<()>, name: &str) -> &'r str {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[test]
    fn forwarding_headers_believe_only_the_trusted_hops() {
        // No trusted hop: the client's own X-Forwarded-For and Forwarded
        // are replaced by the peer.
        let e = edge(EdgePolicy::default(), 0);
        let mut r = request(Some("1.1.1.1, 2.2.2.2"));
        assert_eq!(e.forwarded(&mut r, peer()), IpAddr::from([10, 0, 0, 9]));
        assert_eq!(header(&r, "x-forwarded-for"), "10.0.0.9");
        assert_eq!(header(&r, "forwarded"), "for=10.0.0.9;proto=https");
        assert_eq!(header(&r, "x-forwarded-proto"), "https");
        // One trusted hop (a load balancer in front): the client is the
        // last entry it added; what the client claimed before is dropped.
        let e = edge(EdgePolicy::default(), 1);
        let mut r = request(Some("1.1.1.1, 2.2.2.2"));
        assert_eq!(e.forwarded(&mut r, peer()), IpAddr::from([2, 2, 2, 2]));
        assert_eq!(header(&r, "x-forwarded-for"), "2.2.2.2, 10.0.0.9");
        assert_eq!(
            header(&r, "forwarded"),
            "for=2.2.2.2, for=10.0.0.9;proto=https"
        );
        // Fewer entries than trusted hops: the first; a malformed entry
        // drops what is left of it; IPv6 quoted in Forwarded.
        let e = edge(EdgePolicy::default(), 3);
        let mut r = request(Some("garbage, 2001:db8::1"));
        assert_eq!(
            e.forwarded(&mut r, peer()),
            "2001:db8::1"
                .parse::<IpAddr>()
                .unwrap_or(IpAddr::from([0; 4]))
        );
        assert_eq!(
            header(&r, "forwarded"),
            "for=\"[2001:db8::1]\", for=10.0.0.9;proto=https"
        );
    }

    #[test]
    fn only_named_proxies_are_believed() {
        let mut spec = (*edge(EdgePolicy::default(), 2).spec).clone();
        spec.trusted_proxies = Arc::new(vec![
            crate::config::edge::Cidr::parse("10.0.0.0/8").unwrap_or_else(|e| panic!("{e}")),
        ]);
        let e = Edge::new(Arc::new(spec), Arc::default());
        // The peer is a proxy; the entry before it (2.2.2.2) is not: it
        // is the client, whatever it claims before.
        let mut r = request(Some("1.1.1.1, 2.2.2.2"));
        assert_eq!(e.forwarded(&mut r, peer()), IpAddr::from([2, 2, 2, 2]));
        assert_eq!(header(&r, "x-forwarded-for"), "2.2.2.2, 10.0.0.9");
        // Two proxies in front: both within the block.
        let mut r = request(Some("1.1.1.1, 10.1.1.1"));
        assert_eq!(e.forwarded(&mut r, peer()), IpAddr::from([1, 1, 1, 1]));
        // A peer outside the block: nothing it says is believed.
        let mut r = request(Some("1.1.1.1"));
        let outsider = SocketAddr::from(([192, 168, 0, 7], 5000));
        assert_eq!(
            e.forwarded(&mut r, outsider),
            IpAddr::from([192, 168, 0, 7])
        );
        assert_eq!(header(&r, "x-forwarded-for"), "192.168.0.7");
        let c = crate::config::edge::Cidr::parse("2001:db8::/32").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.contains("2001:db8:1::5".parse().unwrap_or(IpAddr::from([0; 4]))));
        assert!(!c.contains(IpAddr::from([10, 0, 0, 1])));
        assert!(crate::config::edge::Cidr::parse("10.0.0.0/33").is_err());
        assert!(crate::config::edge::Cidr::parse("x/8").is_err());
    }

    #[test]
    fn connect_redirects_and_api_keys() {
        let e = edge(EdgePolicy::default(), 0);
        let mut r = request(None);
        *r.method_mut() = Method::CONNECT;
        assert!(matches!(
            e.admit(&mut r, peer()),
            Err(EdgeAnswer::Error(ProxyError::MethodNotAllowed(_)))
        ));
        let e = edge(
            EdgePolicy {
                https_redirect: Some(8443),
                ..EdgePolicy::default()
            },
            0,
        );
        let mut r = request(None);
        match e.admit(&mut r, peer()) {
            Err(EdgeAnswer::Redirect(l)) => assert_eq!(l, "https://shop.example.com:8443/a?b=1"),
            other => panic!("{other:?}"),
        }
        r.headers_mut()
            .insert("host", HeaderValue::from_static("evil.example/x@y"));
        assert!(matches!(
            e.admit(&mut r, peer()),
            Err(EdgeAnswer::Error(ProxyError::BadRequest(_)))
        ));
        let e = edge(
            EdgePolicy {
                api_key_header: Some("x-api-key".into()),
                ..EdgePolicy::default()
            },
            0,
        );
        let mut r = request(None);
        r.headers_mut()
            .insert("x-api-key", HeaderValue::from_static("secret"));
        assert!(e.admit(&mut r, peer()).is_ok());
        assert!(r.headers().get("x-api-key").is_none(), "not passed on");
        r.headers_mut()
            .insert("x-api-key", HeaderValue::from_static("secreT"));
        match e.admit(&mut r, peer()) {
            Err(EdgeAnswer::Error(ProxyError::Unauthenticated(c))) => {
                assert_eq!(c, "ApiKey realm=\"8443\"")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_a_client_may_not_pass_on_is_removed() {
        // An API-key listener of a gateway whose providers set x-user and
        // read Authorization: a spoofed x-user, an x_user spelling, an
        // unverified Authorization and X-Real-IP are all gone.
        let mut e = edge(
            EdgePolicy {
                api_key_header: Some("x-api-key".into()),
                ..EdgePolicy::default()
            },
            0,
        );
        let mut spec = (*e.spec).clone();
        spec.providers.push(
            meshwork_core::jwt_provider::parse(
                "idp",
                serde_json::json!({"JSONWebKeySet": {"Local": {"Filename": "/k"}},
                "ClaimToHeaders": [{"Claim": "sub", "HeaderName": "x-user"}]})
                .as_object()
                .unwrap_or(&serde_json::Map::new()),
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        e = Edge::new(Arc::new(spec), Arc::default());
        let mut r = request(None);
        for (k, v) in [
            ("x-api-key", "secret"),
            ("x-user", "root"),
            ("x_user", "root"),
            ("x_forwarded_for", "1.2.3.4"),
            ("authorization", "Bearer forged"),
            ("x-real-ip", "1.2.3.4"),
        ] {
            r.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).unwrap_or(X_FORWARDED_FOR),
                HeaderValue::from_static(v),
            );
        }
        assert!(e.admit(&mut r, peer()).is_ok());
        for gone in [
            "x-user",
            "x_user",
            "x_forwarded_for",
            "authorization",
            "x-real-ip",
            "x-api-key",
        ] {
            assert!(r.headers().get(gone).is_none(), "{gone} passed");
        }
        // Two API keys: which one would count? Refused.
        let mut r = request(None);
        r.headers_mut()
            .append("x-api-key", HeaderValue::from_static("secret"));
        r.headers_mut()
            .append("x-api-key", HeaderValue::from_static("other"));
        assert!(matches!(
            e.admit(&mut r, peer()),
            Err(EdgeAnswer::Error(ProxyError::Unauthenticated(_)))
        ));
    }

    #[test]
    fn a_token_given_twice_is_refused_and_later_locations_are_read() {
        let p = meshwork_core::jwt_provider::parse(
            "idp",
            serde_json::json!({"JSONWebKeySet": {"Local": {"Filename": "/k"}},
                "Locations": [{"Header": {"Name": "x-token"}}, {"QueryParam": {"Name": "t"}}]})
            .as_object()
            .unwrap_or(&serde_json::Map::new()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut r = Request::get("/a?t=one").body(()).unwrap_or_default();
        assert!(
            matches!(find_token(&r, &p), Ok(Some((t, _))) if t == "one"),
            "the second location"
        );
        r.headers_mut()
            .append("x-token", HeaderValue::from_static("a"));
        r.headers_mut()
            .append("x-token", HeaderValue::from_static("b"));
        assert_eq!(find_token(&r, &p).map(|f| f.is_some()), Err(()));
        let r = Request::get("/a?t=one&t=two").body(()).unwrap_or_default();
        assert_eq!(find_token(&r, &p).map(|f| f.is_some()), Err(()));
    }

    #[test]
    fn client_buckets_are_bounded_and_per_client() {
        let b = Buckets::new(ClientLimit {
            rate: Some(1.0),
            burst: 2,
            routes: vec![meshwork_core::ingress::RouteLimit {
                path: meshwork_core::ratelimit::PathMatch::Prefix("/login".into()),
                rate: 0.1,
                burst: 1,
            }],
            by: LimitBy::ClientIp,
            max_clients: 3,
        });
        let now = Instant::now();
        let ip = |n: u8| ClientKey::Ip(IpAddr::from([10, 0, 0, n]));
        assert!(b.take(ip(1), "/", now).is_ok());
        assert!(b.take(ip(1), "/", now).is_ok());
        let wait = b.take(ip(1), "/", now).expect_err("the burst is spent");
        assert!(wait <= Duration::from_secs(1) && wait > Duration::ZERO);
        // The route's own bucket, per client.
        assert!(b.take(ip(1), "/login", now).is_ok());
        let wait = b.take(ip(1), "/login/x", now).expect_err("one per 10 s");
        assert!(wait > Duration::from_secs(9));
        assert!(b.take(ip(2), "/", now).is_ok(), "another client");
        assert!(
            b.take(ip(1), "/", now + Duration::from_secs(1)).is_ok(),
            "a token a second"
        );
        // Spellings of the same path draw from the route's bucket.
        for variant in ["//login", "/%6Cogin", "/./login", "/x/../login"] {
            assert!(b.take(ip(1), variant, now).is_err(), "{variant}");
        }
        assert_eq!(normalize_path("/a//b/./c/../d/"), "/a/b/d/");
        assert_eq!(normalize_path("/.."), "/");
        assert_eq!(b.limited.load(Ordering::Relaxed), 6);
        // A fourth bucket pushes out the least recently seen (ip 1's
        // route bucket).
        assert!(b.take(ip(3), "/", now).is_ok());
        assert_eq!(b.evicted.load(Ordering::Relaxed), 1);
        assert_eq!(b.table.lock().map(|t| t.len()).unwrap_or(0), 3);
        assert_eq!(b.limited.load(Ordering::Relaxed), 6);
    }
}
