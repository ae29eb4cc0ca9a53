//! Phase 1, prepare: the request's headers as they go upstream (an
//! `x-request-id` when absent (`ensure_request_id`, first of all, so even
//! a refused request logs one), hop-by-hop fields dropped, `Host` and
//! `:authority` per the upstream's protocol) and what every attempt needs
//! of the request (target, method, the consistent-hash key). No I/O.

use std::net::SocketAddr;

use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::http::uri::{Authority, PathAndQuery};
use hyper::{Method, Version};
use rand::Rng;

use super::access_log::LogContext;
use super::headers::strip_hop_by_hop;
use super::rescue::ProxyError;
use super::{REQUEST_ID, TRACEPARENT};
use crate::config::{Balance, Upstream};
use crate::upstream::balance::hash_of;
use crate::upstream::h1;

/// What every attempt needs of the request, taken once.
pub(super) struct Prepared {
    pub version: Version,
    pub path: PathAndQuery,
    /// What a CONNECT asks to reach (its authority-form target).
    pub connect_to: Option<Authority>,
    pub method: Method,
    /// `Connection: upgrade`: the client asks to switch protocols.
    pub upgrade: bool,
    /// The consistent-hash key (ring hash balancing only).
    pub hash: Option<u64>,
    /// The client sent `Content-Length` (repeated upstream, even when 0).
    pub had_length: bool,
    pub idempotent: bool,
    /// When the request times out, whatever its attempts...
    pub deadline: tokio::time::Instant,
    /// ...and the timeout that set it (the config of the request's start).
    pub timeout: std::time::Duration,
}

impl Prepared {
    /// The request as the HTTP/1.1 client encodes it: straight from the
    /// client's headers and the kept body, nothing copied for a retry.
    pub fn inline_head<'a>(
        &'a self,
        headers: &'a HeaderMap,
        body: &'a Bytes,
    ) -> h1::RequestHead<'a> {
        let length = if self.had_length || !body.is_empty() {
            h1::Length::Exact(body.len() as u64)
        } else {
            h1::Length::None
        };
        self.h1_head(headers, body, length)
    }

    /// The same for a body that streams: with its declared length, or
    /// chunked when it has none (`exact`: the body's own size hint).
    pub fn streamed_head<'a>(
        &'a self,
        headers: &'a HeaderMap,
        exact: Option<u64>,
        empty: bool,
    ) -> h1::RequestHead<'a> {
        let length = match exact {
            Some(n) if self.had_length => h1::Length::Exact(n),
            _ if empty => h1::Length::None,
            _ => h1::Length::Chunked,
        };
        self.h1_head(headers, &EMPTY, length)
    }

    fn h1_head<'a>(
        &'a self,
        headers: &'a HeaderMap,
        body: &'a Bytes,
        length: h1::Length,
    ) -> h1::RequestHead<'a> {
        let target = match &self.connect_to {
            Some(authority) => authority.as_str(),
            None => self.path.as_str(),
        };
        h1::RequestHead {
            method: &self.method,
            target,
            headers,
            body,
            length,
            upgrade: self.upgrade,
        }
    }
}

/// What a streamed request's head borrows as its (absent) in-memory body.
static EMPTY: Bytes = Bytes::from_static(b"");

/// Rewrites `parts.headers` for the upstream and takes what the attempts
/// need. `version` is what the upstream speaks.
pub(super) fn prepare(
    parts: &mut Parts,
    config: &Upstream,
    version: Version,
    peer: SocketAddr,
    upgrade: bool,
    deadline: tokio::time::Instant,
) -> Prepared {
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if version == Version::HTTP_2 {
        // HTTP/2 carries the authority in `:authority` (the endpoint
        // dialled); a Host header naming something else makes the
        // request malformed (RFC 9113 §8.3.1).
        parts.headers.remove(header::HOST);
        // Values unique to each request would only churn the HPACK
        // dynamic table (each one inserted, evicting useful entries,
        // and every lookup walking the chain of earlier ids): sent as
        // never-indexed literals instead.
        for name in [&REQUEST_ID, &TRACEPARENT] {
            if let Some(value) = parts.headers.get_mut(name) {
                value.set_sensitive(true);
            }
        }
    } else if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        // HTTP/2 downstream, HTTP/1.1 upstream: the authority becomes Host.
        parts.headers.insert(header::HOST, v);
    }
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let hash = match (&config.balance, &config.hash_header) {
        (Balance::RingHash, _) if !config.hash_policies.is_empty() => {
            Some(policy_hash(&config.hash_policies, parts, peer))
        }
        (Balance::RingHash, Some(name)) => parts
            .headers
            .get(name.as_str())
            .map(|v| hash_of(v.as_bytes())),
        (Balance::RingHash, None) => Some(hash_of(&peer.ip())),
        _ => None,
    };
    let connect_to = (parts.method == Method::CONNECT)
        .then(|| parts.uri.authority().cloned())
        .flatten();
    Prepared {
        version,
        path,
        connect_to,
        upgrade,
        idempotent: super::retry::idempotent(&parts.method),
        method: parts.method.clone(),
        hash,
        had_length: parts.headers.contains_key(header::CONTENT_LENGTH),
        deadline,
        timeout: config.request_timeout,
    }
}

/// The ring-hash key of a request under `policies` (Envoy's semantics: the
/// values found are hashed together, in order, up to the first terminal
/// policy that found one; none found: the client's address).
fn policy_hash(
    policies: &[meshwork_core::chain::HashPolicy],
    parts: &Parts,
    peer: SocketAddr,
) -> u64 {
    use meshwork_core::chain::HashOn;
    let mut found: Option<u64> = None;
    for policy in policies {
        let value: Option<u64> = match &policy.on {
            HashOn::Header(name) => parts
                .headers
                .get(name.as_str())
                .map(|v| hash_of(v.as_bytes())),
            HashOn::Cookie { name, .. } => {
                crate::policy::chain::request_cookie(&parts.headers, name)
                    .map(|v| hash_of(v.as_bytes()))
                    .or_else(|| {
                        parts
                            .extensions
                            .get::<crate::policy::chain::GeneratedCookie>()
                            .filter(|g| g.name == *name)
                            .map(|g| hash_of(g.value.as_bytes()))
                    })
            }
            HashOn::QueryParameter(name) => parts.uri.query().and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == name.as_str())
                    .map(|(_, v)| hash_of(v.as_bytes()))
            }),
            HashOn::SourceIp => Some(hash_of(&peer.ip())),
        };
        if let Some(v) = value {
            found = Some(match found {
                // Combined as Envoy does: rotate the previous, xor.
                Some(h) => h.rotate_left(1) ^ v,
                None => v,
            });
            if policy.terminal {
                break;
            }
        }
    }
    found.unwrap_or_else(|| hash_of(&peer.ip()))
}

/// The request-target and `Host` rules (RFC 9112 §3.2–3.3 for HTTP/1.x,
/// RFC 9113 §8.3.1 for HTTP/2), checked before anything goes upstream:
/// an HTTP/1.x request has at most one `Host`, and HTTP/1.1 exactly one;
/// an absolute-form target's authority replaces `Host`; a target neither
/// origin-form (`/…`) nor absolute is refused, except CONNECT's
/// authority-form and `OPTIONS *`. In HTTP/2, `:authority` wins over a
/// `host` header, which is dropped.
pub(super) fn check_target(parts: &mut Parts) -> Result<(), ProxyError> {
    let uri = &parts.uri;
    // Userinfo in an authority (RFC 9110 §4.2.4 deprecates it) would
    // reach the app as a Host that URL parsers read differently.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(ProxyError::BadRequest("an authority with userinfo"));
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    if parts.version == Version::HTTP_2 {
        if uri.authority().is_some() {
            parts.headers.remove(header::HOST);
        }
        return Ok(());
    }
    let absolute = uri.scheme().is_some();
    if parts.method == Method::CONNECT {
        if absolute || uri.authority().is_none() {
            return Err(ProxyError::BadRequest(
                "CONNECT needs an authority-form target (host:port)",
            ));
        }
    } else if absolute {
        let authority = uri.authority().map(|a| HeaderValue::from_str(a.as_str()));
        match authority {
            Some(Ok(host)) => {
                parts.headers.insert(header::HOST, host);
            }
            _ => return Err(ProxyError::BadRequest("an absolute target without a host")),
        }
    } else if uri.authority().is_some() {
        return Err(ProxyError::BadRequest(
            "the request target must start with / (or be an absolute URI)",
        ));
    } else if uri.path() == "*" && parts.method != Method::OPTIONS {
        return Err(ProxyError::BadRequest("a * target is for OPTIONS only"));
    }
    if parts.version == Version::HTTP_11 && !parts.headers.contains_key(header::HOST) {
        return Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs a Host header",
        ));
    }
    Ok(())
}

/// Adds an `x-request-id` when the request has none, and gives the log
/// line the same id.
pub(super) fn ensure_request_id(headers: &mut hyper::HeaderMap, log: Option<&mut LogContext>) {
    if headers.contains_key(REQUEST_ID) {
        return;
    }
    let id = request_id();
    if let Some(log) = log {
        log.request_id = id.to_str().ok().map(str::to_owned);
    }
    headers.insert(REQUEST_ID, id);
}

/// A random `x-request-id`: 128 bits as 32 lowercase hex digits. The
/// bits come from a per-thread wyrand generator seeded from the OS-seeded
/// `rand` generator (ids must be unique, not unguessable: this is some
/// ten times cheaper than drawing from ChaCha), and the digits are written
/// into a per-thread slab that many ids share, so an id costs no
/// allocation of its own.
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    const LEN: usize = 32;
    thread_local! {
        static SLAB: std::cell::RefCell<bytes::BytesMut> =
            std::cell::RefCell::new(bytes::BytesMut::new());
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(rand::rng().random());
    }
    let mut id = [0u8; LEN];
    STATE.with(|state| {
        for half in id.chunks_exact_mut(LEN / 2) {
            let n = wyrand(state);
            for (i, pair) in half.chunks_exact_mut(2).enumerate() {
                let byte = (n >> (56 - 8 * i)) as u8;
                pair[0] = HEX[usize::from(byte >> 4)];
                pair[1] = HEX[usize::from(byte & 0xf)];
            }
        }
    });
    let shared = SLAB.with_borrow_mut(|slab| {
        if slab.capacity() < LEN {
            *slab = bytes::BytesMut::with_capacity(LEN * 64);
        }
        slab.extend_from_slice(&id);
        slab.split().freeze()
    });
    // Hex digits are always a valid header value.
    HeaderValue::from_maybe_shared(shared)
        .unwrap_or_else(|_| HeaderValue::from_static("00000000000000000000000000000000"))
}

/// wyrand: one 64-bit output per step, full period over the state.
fn wyrand(state: &std::cell::Cell<u64>) -> u64 {
    let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
    state.set(s);
    let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
    (t >> 64) as u64 ^ t as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(head: &str, version: Version, hosts: &[&str]) -> Parts {
        let (method, target) = head.split_once(' ').expect("method and target");
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(target)
            .version(version);
        for host in hosts {
            builder = builder.header(header::HOST, *host);
        }
        builder.body(()).expect("request").into_parts().0
    }

    fn check(head: &str, version: Version, hosts: &[&str]) -> Result<Option<String>, &'static str> {
        let mut p = parts(head, version, hosts);
        match check_target(&mut p) {
            Ok(()) => Ok(p
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)),
            Err(ProxyError::BadRequest(why)) => Err(why),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn targets_and_hosts_follow_rfc_9112() {
        let v11 = Version::HTTP_11;
        assert_eq!(check("GET /x", v11, &["a"]), Ok(Some("a".into())));
        assert!(check("GET /x", v11, &["a", "b"]).is_err());
        assert!(check("GET /x", v11, &[]).is_err());
        assert_eq!(check("GET /x", Version::HTTP_10, &[]), Ok(None));
        // The absolute form's authority replaces Host.
        assert_eq!(
            check("GET http://real:8080/x", v11, &["fake"]),
            Ok(Some("real:8080".into()))
        );
        assert!(check("GET c-noslash", v11, &["a"]).is_err());
        assert!(check("GET *", v11, &["a"]).is_err());
        assert_eq!(check("OPTIONS *", v11, &["a"]), Ok(Some("a".into())));
        assert_eq!(
            check("CONNECT db:5432", v11, &["db:5432"]),
            Ok(Some("db:5432".into()))
        );
        // HTTP/2: :authority wins, host goes.
        assert_eq!(
            check("GET https://auth/x", Version::HTTP_2, &["other"]),
            Ok(None)
        );
    }
}
