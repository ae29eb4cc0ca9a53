//! L7: one HTTP request from the listener's server to an endpoint of the
//! cluster through a pooled client (HTTP/1.1 keep-alive or HTTP/2
//! multiplexing, per the upstream's protocol). Hop-by-hop headers are
//! dropped, `x-request-id` is added when absent (`traceparent` passes
//! untouched), the cluster's limits are enforced, and a failed attempt is
//! retried on another endpoint when that is safe: the body was empty or
//! buffered (at most 64 KiB) and either the connection was never made or
//! the method is idempotent. `Upgrade` requests (WebSocket) are spliced
//! once both sides agree on 101. Trailers (gRPC) pass through in both
//! directions because bodies are streamed frame by frame.

pub mod body;
pub mod headers;
pub mod idle;
pub mod rescue;
pub mod retry;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use rand::Rng;

pub use body::{ClientBody, Guards, OutgoingBody, ResponseBody};

use crate::config::{Balance, Protocol};
use crate::http::headers::{content_length, is_grpc, is_upgrade, strip_hop_by_hop};
use crate::http::idle::Busy;
use crate::http::rescue::ProxyError;
use crate::telemetry::{AccessLog, Outcome, unix_ms};
use crate::upstream::balance::hash_of;
use crate::upstream::cluster::{Cluster, Source, acquire_owned};
use crate::upstream::dial::ConnectError;
use crate::upstream::endpoint::EndpointState;
use crate::upstream::h1;
use crate::upstream::pool::{Lease, Pool, SendError};

/// Bodies up to this size are buffered so the request can be retried.
const MAX_REPLAY_BODY: u64 = 64 * 1024;
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// One listener's HTTP proxy: its cluster and pooled client.
#[derive(Debug)]
pub struct HttpProxy {
    pub cluster: Arc<Cluster>,
    pub direction: &'static str,
    pool: Pool<OutgoingBody>,
    protocol: Protocol,
    access_log: bool,
}

/// The request body: kept (so it can be sent again), with its trailers if
/// it had any, or streamed once.
enum RequestBody {
    Replayable(Bytes, Option<hyper::HeaderMap>),
    Streaming(Option<ClientBody>),
}

impl HttpProxy {
    pub fn new(cluster: Arc<Cluster>, direction: &'static str, access_log: bool) -> Self {
        let protocol = cluster.config().protocol;
        let pool = Pool::new(Arc::clone(&cluster));
        HttpProxy {
            cluster,
            direction,
            pool,
            protocol,
            access_log,
        }
    }

    /// The same proxy (cluster and pooled connections) with the access
    /// log on or off (a config reload).
    pub fn with_access_log(&self, access_log: bool) -> Self {
        HttpProxy {
            cluster: Arc::clone(&self.cluster),
            direction: self.direction,
            pool: self.pool.clone(),
            protocol: self.protocol,
            access_log,
        }
    }

    /// Answers one request: the upstream's response or the proxy's own.
    /// `connection` is held until the response's last byte (it marks the
    /// client connection busy).
    ///
    /// The answering future is boxed: it is over a KiB, and hyper moves
    /// the service future into place per request (several times over for
    /// HTTP/2, where each stream is a spawned task); one allocation is
    /// cheaper than those copies. The box is filled by one copy of the
    /// whole future, so its size still counts (see [`HttpProxy::answer`]).
    pub fn handle(
        &self,
        mut req: Request<ClientBody>,
        peer: SocketAddr,
        connection: Busy,
    ) -> Pin<Box<impl Future<Output = Response<ResponseBody>> + Send + '_>> {
        // Upgrades need an HTTP/1.1 hop all the way (HTTP/2 has no
        // Upgrade; its extended CONNECT is not supported yet).
        let downstream_upgrade = (self.protocol == Protocol::Http && is_upgrade(&req))
            .then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        Box::pin(self.answer(parts, body, downstream_upgrade, peer, connection))
    }

    /// Not an `async fn`, whose arguments would be stored twice in its
    /// future (as arguments and again as locals); the request comes in
    /// parts for the same reason (a `Request` split inside would keep its
    /// own storage beside the parts').
    #[allow(clippy::manual_async_fn)]
    fn answer(
        &self,
        mut parts: hyper::http::request::Parts,
        body: ClientBody,
        downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
        peer: SocketAddr,
        connection: Busy,
    ) -> impl Future<Output = Response<ResponseBody>> + Send + '_ {
        async move {
            let start = Instant::now();
            let grpc = is_grpc(&parts.headers);
            let mut log = self.access_log.then(|| LogContext::new(&parts));
            if !parts.headers.contains_key(REQUEST_ID) {
                let id = request_id();
                if let Some(log) = &mut log {
                    log.request_id = id.to_str().ok().map(str::to_owned);
                }
                parts.headers.insert(REQUEST_ID, id);
            }
            let cluster = &self.cluster;
            // The settings this request runs under, whatever a reload does meanwhile.
            let config = cluster.config();
            let Some(active) = acquire_owned(cluster, |g| &g.requests, config.limits.max_requests)
            else {
                return self.fail(
                    ProxyError::CircuitOpen("max_requests"),
                    grpc,
                    start,
                    log,
                    None,
                    0,
                );
            };
            let upgrade = downstream_upgrade.is_some();
            strip_hop_by_hop(&mut parts.headers, upgrade);
            let version = self.upstream_version();
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
                .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
            let method = parts.method.clone();
            let hash = match (&config.balance, &config.hash_header) {
                (Balance::RingHash, Some(name)) => parts
                    .headers
                    .get(name.as_str())
                    .map(|v| hash_of(v.as_bytes())),
                (Balance::RingHash, None) => Some(hash_of(&peer.ip())),
                _ => None,
            };
            let policy = &config.retries;
            let deadline = tokio::time::Instant::from_std(start) + config.request_timeout;
            let mut body = if body.is_end_stream() {
                RequestBody::Replayable(Bytes::new(), None)
            } else if policy.attempts > 0
                && !upgrade
                && content_length(&parts.headers).is_some_and(|n| n <= MAX_REPLAY_BODY)
            {
                // Boxed: only requests with a body get here (see `Pool::send`).
                match Box::pin(tokio::time::timeout_at(deadline, body.collect())).await {
                    Ok(Ok(collected)) => {
                        let trailers = collected.trailers().cloned();
                        RequestBody::Replayable(collected.to_bytes(), trailers)
                    }
                    Ok(Err(_)) => {
                        return self.fail(
                            ProxyError::BadRequest("the request body broke off"),
                            grpc,
                            start,
                            log,
                            None,
                            0,
                        );
                    }
                    Err(_) => {
                        return self.fail(
                            ProxyError::Timeout(config.request_timeout),
                            grpc,
                            start,
                            log,
                            None,
                            0,
                        );
                    }
                }
            } else {
                RequestBody::Streaming(Some(body))
            };
            // An HTTP/1.1 upstream and a body in memory: the inline leg (see
            // `h1`). Upgrades, CONNECT and streamed bodies go through hyper.
            // (A message with a length carries no trailers in HTTP/1.1: a
            // kept body's are for an HTTP/2 upstream.)
            let inline = version == Version::HTTP_11
                && !upgrade
                && method != Method::CONNECT
                && matches!(body, RequestBody::Replayable(..));
            let had_length = parts.headers.contains_key(header::CONTENT_LENGTH);
            let idempotent = retry::idempotent(&method);
            let max_attempts = 1 + policy.attempts;
            // Endpoints already tried (filled only when retrying, so the usual
            // single attempt allocates nothing).
            let mut tried: Vec<SocketAddr> = Vec::new();
            let mut attempt = 0u32;
            let mut retry_slot = None;
            // The endpoint just failed, when the next attempt waits first.
            // Waited for here, at the top, so that nothing of the failed
            // attempt (its response or error) is kept across the wait in
            // this future.
            let mut backoff_after: Option<SocketAddr> = None;
            loop {
                if let Some(failed) = backoff_after.take()
                    && !Box::pin(self.wait_backoff(attempt, deadline)).await
                {
                    return self.fail(
                        ProxyError::Timeout(config.request_timeout),
                        grpc,
                        start,
                        log,
                        Some(failed),
                        attempt,
                    );
                }
                attempt += 1;
                let Some(endpoint) = cluster.pick(&config, hash, &tried) else {
                    return self.fail(
                        ProxyError::NoHealthyUpstream(config.name.clone()),
                        grpc,
                        start,
                        log,
                        None,
                        attempt,
                    );
                };
                let in_flight = endpoint.start_request();
                let replayable = matches!(body, RequestBody::Replayable(..));
                let can_retry = replayable && attempt < max_attempts;
                let Some(pending) =
                    acquire_owned(cluster, |g| &g.pending, config.limits.max_pending)
                else {
                    return self.fail(
                        ProxyError::CircuitOpen("max_pending"),
                        grpc,
                        start,
                        log,
                        Some(endpoint.addr),
                        attempt,
                    );
                };
                let result = match (&mut body, inline) {
                    (RequestBody::Replayable(bytes, _), true) => {
                        // Encoded straight from the client's headers: nothing
                        // to copy for a retry.
                        let head = h1::RequestHead {
                            method: &method,
                            path: &path,
                            headers: &parts.headers,
                            body: bytes,
                            had_length,
                        };
                        // Built in place: a future bound to a name first would
                        // be stored twice in this one (as the name and inside
                        // the timeout).
                        tokio::time::timeout_at(
                            deadline,
                            self.pool.send_inline(
                                endpoint.addr,
                                &endpoint.authority,
                                &head,
                                idempotent,
                            ),
                        )
                        .await
                        .map(|r| r.map(|(head, body)| Upstream::Inline(head, body)))
                    }
                    (body, _) => {
                        let outgoing = match self.outgoing_request(
                            body,
                            &method,
                            &endpoint,
                            &path,
                            &mut parts.headers,
                            can_retry,
                        ) {
                            Ok(outgoing) => outgoing,
                            Err(e) => {
                                return self.fail(
                                    e,
                                    grpc,
                                    start,
                                    log,
                                    Some(endpoint.addr),
                                    attempt,
                                );
                            }
                        };
                        // Boxed: these futures are larger than the inline
                        // leg's, and this future is moved into its own box per
                        // request, every byte of it.
                        if version == Version::HTTP_2 {
                            let (head, body) = outgoing.into_parts();
                            Box::pin(tokio::time::timeout_at(
                                deadline,
                                self.pool.send_h2(
                                    endpoint.addr,
                                    Request::from_parts(head, ()),
                                    body,
                                ),
                            ))
                            .await
                            .map(|r| r.map(Upstream::H2))
                        } else {
                            Box::pin(tokio::time::timeout_at(
                                deadline,
                                self.pool.send(endpoint.addr, outgoing),
                            ))
                            .await
                            .map(|r| r.map(|(response, lease)| Upstream::Hyper(response, lease)))
                        }
                    }
                };
                drop(pending);
                drop(retry_slot.take());
                let error = match result {
                    Err(_) => {
                        if version == Version::HTTP_2 {
                            // Maybe a dead connection that no FIN or RST told
                            // of: the next request gets a new one.
                            self.pool.retire_h2(endpoint.addr);
                        }
                        return self.fail(
                            ProxyError::Timeout(config.request_timeout),
                            grpc,
                            start,
                            log,
                            Some(endpoint.addr),
                            attempt,
                        );
                    }
                    Ok(Ok(response)) => {
                        let status = response.status();
                        let failed = status.is_server_error();
                        // The peer's sidecar could not reach its app: the
                        // request went no further than that sidecar, so it is
                        // as safe to send elsewhere as a failed connect.
                        let unreached = self.cluster.source == Source::Registry
                            && endpoint.sidecar
                            && (status == StatusCode::SERVICE_UNAVAILABLE
                                || response.headers().contains_key(GRPC_STATUS))
                            && rescue::never_reached_app(response.headers());
                        let retry_as_connect = unreached && policy.on.connect_failure;
                        // A peer sidecar that never reached its app: retried like
                        // a connect failure, any method. Otherwise only a retryable
                        // status of an idempotent request, within the budget.
                        let retry_why = if retry_as_connect && can_retry {
                            Some(
                                "the endpoint's sidecar could not reach its app; trying another endpoint",
                            )
                        } else if failed
                            && can_retry
                            && idempotent
                            && policy.on.status(status.as_u16())
                            && let Some(slot) = retry::budget(cluster)
                        {
                            retry_slot = Some(slot);
                            Some("retrying on another endpoint")
                        } else {
                            None
                        };
                        if let Some(why) = retry_why {
                            cluster.report(&endpoint, true);
                            tracing::debug!(upstream = %config.name, endpoint = %endpoint.addr, %status, attempt, "{why}");
                            drop(response);
                            drop(in_flight);
                            tried.push(endpoint.addr);
                            backoff_after = Some(endpoint.addr);
                            continue;
                        }
                        cluster.report(&endpoint, failed);
                        cluster
                            .metrics
                            .record(status.as_u16(), Outcome::Upstream, start.elapsed());
                        if let Some(log) = log {
                            log.write(
                                self,
                                status.as_u16(),
                                Outcome::Upstream,
                                Some(endpoint.addr),
                                attempt,
                                start,
                            );
                        }
                        return self.forward(
                            response,
                            downstream_upgrade,
                            Guards::new(active, in_flight, connection),
                        );
                    }
                    Ok(Err(e)) => classify(e),
                };
                let connect = matches!(
                    error,
                    ProxyError::ConnectFailure(_) | ProxyError::ConnectTimeout(..)
                );
                // Neither a full circuit nor a client's broken body is the
                // endpoint's failure.
                if !matches!(
                    error,
                    ProxyError::CircuitOpen(_) | ProxyError::BadRequest(_)
                ) {
                    cluster.report(&endpoint, true);
                }
                let safe = (connect && policy.on.connect_failure)
                    || (matches!(error, ProxyError::Reset(_)) && policy.on.reset && idempotent);
                // A connection that was never made cost the upstream nothing,
                // so connect failures do not spend the retry budget.
                let slot = if can_retry && safe && !connect {
                    retry::budget(cluster).map(Some)
                } else {
                    Some(None)
                };
                if can_retry
                    && safe
                    && let Some(slot) = slot
                {
                    tracing::debug!(upstream = %config.name, endpoint = %endpoint.addr, error = %error, attempt, "retrying on another endpoint");
                    retry_slot = slot;
                    drop(in_flight);
                    tried.push(endpoint.addr);
                    backoff_after = Some(endpoint.addr);
                    continue;
                }
                tracing::debug!(upstream = %config.name, endpoint = %endpoint.addr, error = %error, attempt, retryable = can_retry && safe, "request failed");
                return self.fail(error, grpc, start, log, Some(endpoint.addr), attempt);
            }
        }
    }

    /// What the upstream speaks.
    fn upstream_version(&self) -> Version {
        match self.protocol {
            Protocol::Http2 | Protocol::Grpc => Version::HTTP_2,
            _ => Version::HTTP_11,
        }
    }

    /// The request for hyper's HTTP/1.1 client (streamed bodies, upgrades,
    /// CONNECT) or the HTTP/2 leg: the last attempt takes the headers,
    /// earlier ones a copy.
    fn outgoing_request(
        &self,
        body: &mut RequestBody,
        method: &Method,
        endpoint: &EndpointState,
        path: &hyper::http::uri::PathAndQuery,
        headers: &mut hyper::HeaderMap,
        can_retry: bool,
    ) -> Result<Request<OutgoingBody>, ProxyError> {
        let version = self.upstream_version();
        let outgoing_body = match body {
            RequestBody::Replayable(bytes, trailers) => {
                OutgoingBody::Full(Some(bytes.clone()), trailers.clone())
            }
            RequestBody::Streaming(b) => match b.take() {
                Some(b) => OutgoingBody::Streaming(b),
                None => OutgoingBody::Full(None, None),
            },
        };
        let uri = target_uri(version, method, endpoint, path)
            .map_err(|_| ProxyError::BadRequest("the request target is not a valid URI"))?;
        let mut outgoing = Request::new(outgoing_body);
        *outgoing.method_mut() = method.clone();
        *outgoing.uri_mut() = uri;
        *outgoing.version_mut() = version;
        *outgoing.headers_mut() = if can_retry {
            headers.clone()
        } else {
            std::mem::take(headers)
        };
        if version == Version::HTTP_11 && !outgoing.headers().contains_key(header::HOST) {
            // An HTTP/1.0 request without Host: name the endpoint.
            if let Ok(v) = HeaderValue::from_str(endpoint.authority.as_str()) {
                outgoing.headers_mut().insert(header::HOST, v);
            }
        }
        Ok(outgoing)
    }

    /// Passes the upstream's response on, holding `guards` until its last
    /// byte; a 101 answer to an upgrade request splices the two upgraded
    /// connections instead.
    fn forward(
        &self,
        response: Upstream,
        downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
        guards: Guards,
    ) -> Response<ResponseBody> {
        let (mut response, lease) = match response {
            Upstream::Inline(head, body) => {
                // The inline leg leaves hop-by-hop fields out as it parses.
                let mut headers = head.headers;
                self.strip_error_header(&mut headers);
                let mut response = Response::new(ResponseBody::inline(body, guards));
                *response.status_mut() = head.status;
                *response.headers_mut() = headers;
                return response;
            }
            Upstream::H2(response) => {
                let (mut head, body) = response.into_parts();
                head.version = Version::HTTP_11;
                self.strip_response_headers(&mut head.headers);
                return Response::from_parts(head, ResponseBody::h2(body, guards));
            }
            Upstream::Hyper(response, lease) => (response, lease),
        };
        let upstream_upgrade = (response.status() == StatusCode::SWITCHING_PROTOCOLS)
            .then(|| hyper::upgrade::on(&mut response));
        let (mut head, body) = response.into_parts();
        head.version = Version::HTTP_11;
        if let (Some(down), Some(up)) = (downstream_upgrade, upstream_upgrade) {
            let name = self.cluster.config().name.clone();
            tokio::spawn(async move {
                let _guards = guards;
                // The upstream connection is the splice's now.
                let _lease = lease;
                match tokio::join!(down, up) {
                    (Ok(down), Ok(up)) => {
                        let mut down = TokioIo::new(down);
                        let mut up = TokioIo::new(up);
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                    (d, u) => {
                        tracing::debug!(upstream = %name, down_ok = d.is_ok(), up_ok = u.is_ok(), "upgrade did not complete")
                    }
                }
            });
            return Response::from_parts(head, ResponseBody::Empty);
        }
        self.strip_response_headers(&mut head.headers);
        Response::from_parts(head, ResponseBody::upstream(body, lease, guards))
    }

    fn strip_response_headers(&self, headers: &mut hyper::HeaderMap) {
        strip_hop_by_hop(headers, false);
        self.strip_error_header(headers);
    }

    fn strip_error_header(&self, headers: &mut hyper::HeaderMap) {
        if self.cluster.source == Source::Local {
            // Only a sidecar may say why it answered: an app's own
            // x-meshwork-error would make peers retry.
            headers.remove(rescue::ERROR_HEADER);
        }
    }

    /// Sleeps before a retry; false when the deadline comes first.
    async fn wait_backoff(&self, attempt: u32, deadline: tokio::time::Instant) -> bool {
        self.cluster.metrics.retries.fetch_add(1, Ordering::Relaxed);
        let wait = retry::backoff(attempt);
        if tokio::time::Instant::now() + wait >= deadline {
            return false;
        }
        tokio::time::sleep(wait).await;
        true
    }

    fn fail(
        &self,
        error: ProxyError,
        grpc: bool,
        start: Instant,
        log: Option<LogContext>,
        endpoint: Option<SocketAddr>,
        attempts: u32,
    ) -> Response<ResponseBody> {
        let response = rescue::respond(&error, grpc).map(ResponseBody::Own);
        let status = response.status().as_u16();
        self.cluster
            .metrics
            .record(status, error.outcome(), start.elapsed());
        if let Some(log) = log {
            log.write(self, status, error.outcome(), endpoint, attempts, start);
        }
        response
    }
}

/// An upstream's answer: from hyper's client (with the HTTP/1.1
/// connection to give back after the body), the inline leg or the HTTP/2
/// leg.
enum Upstream {
    Hyper(Response<Incoming>, Lease<OutgoingBody>),
    Inline(h1::Head, h1::Body),
    H2(Response<crate::upstream::h2c::Body>),
}

impl Upstream {
    fn status(&self) -> StatusCode {
        match self {
            Upstream::Hyper(r, _) => r.status(),
            Upstream::Inline(head, _) => head.status,
            Upstream::H2(r) => r.status(),
        }
    }

    fn headers(&self) -> &hyper::HeaderMap {
        match self {
            Upstream::Hyper(r, _) => r.headers(),
            Upstream::Inline(head, _) => &head.headers,
            Upstream::H2(r) => r.headers(),
        }
    }
}

/// Turns a pool error into what went wrong.
fn classify(error: SendError) -> ProxyError {
    match error {
        SendError::Connect(ConnectError::Timeout(addr, d)) => {
            ProxyError::ConnectTimeout(addr.to_string(), d)
        }
        SendError::Connect(ConnectError::Limit) => ProxyError::CircuitOpen("max_connections"),
        SendError::Connect(other) => ProxyError::ConnectFailure(other.to_string()),
        SendError::Handshake(..) => ProxyError::ConnectFailure(error.to_string()),
        SendError::Inline(e) => ProxyError::Reset(e.to_string()),
        // Refused: the upstream did not process the stream (RFC 9113 §8.7),
        // as safe to send elsewhere as a failed connect.
        SendError::H2(e) if e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
            ProxyError::ConnectFailure(format!("the upstream refused the stream: {e}"))
        }
        // Reset by the sidecar itself: the client's request body broke off.
        SendError::H2(e) if e.is_reset() && !e.is_remote() && !e.is_library() => {
            ProxyError::BadRequest("the request body broke off")
        }
        SendError::H2(e) => ProxyError::Reset(e.to_string()),
        SendError::Http(e) => {
            let mut text = e.to_string();
            if let Some(cause) = std::error::Error::source(&e) {
                text = format!("{text}: {cause}");
            }
            ProxyError::Reset(text)
        }
    }
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

/// The request target sent upstream: origin form (`/path?query`) for
/// HTTP/1.1, authority form for CONNECT, the absolute URI (scheme and
/// `:authority`) for HTTP/2.
fn target_uri(
    version: Version,
    method: &Method,
    endpoint: &EndpointState,
    path: &hyper::http::uri::PathAndQuery,
) -> Result<Uri, hyper::http::Error> {
    if version == Version::HTTP_11 {
        if method == Method::CONNECT {
            return Ok(Uri::from(endpoint.authority.clone()));
        }
        return Ok(Uri::from(path.clone()));
    }
    let mut target = hyper::http::uri::Parts::default();
    target.scheme = Some(hyper::http::uri::Scheme::HTTP);
    target.authority = Some(endpoint.authority.clone());
    target.path_and_query = Some(path.clone());
    Ok(Uri::from_parts(target)?)
}

/// What the access log needs of the request, taken before it moves on.
struct LogContext {
    method: String,
    path: String,
    protocol: &'static str,
    request_id: Option<String>,
    traceparent: Option<String>,
}

impl LogContext {
    fn new(req: &hyper::http::request::Parts) -> Self {
        let text = |name: &str| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        LogContext {
            method: req.method.to_string(),
            path: req.uri.path().to_owned(),
            protocol: match req.version {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            request_id: text(REQUEST_ID.as_str()),
            traceparent: text("traceparent"),
        }
    }

    fn write(
        self,
        proxy: &HttpProxy,
        status: u16,
        outcome: Outcome,
        endpoint: Option<SocketAddr>,
        attempts: u32,
        start: Instant,
    ) {
        AccessLog {
            ts_unix_ms: unix_ms(),
            direction: proxy.direction,
            upstream: &proxy.cluster.config().name,
            method: &self.method,
            path: &self.path,
            protocol: self.protocol,
            status,
            outcome: outcome.as_str(),
            endpoint: endpoint.map(|e| e.to_string()),
            attempts,
            duration_ms: start.elapsed().as_secs_f64() * 1000.0,
            request_id: self.request_id.as_deref(),
            traceparent: self.traceparent.as_deref(),
        }
        .write();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::idle::Activity;

    /// The size of what `f` returns, without calling it.
    fn size_of_output<F: Fn(Request<ClientBody>) -> R, R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    #[tokio::test]
    async fn the_future_hyper_moves_per_request_is_small() {
        let text = "[registry]\naddresses = [\"127.0.0.1:8502\"]\n[service]\nname = \"web\"\nport = 8080\n[[upstreams]]\nname = \"api\"\nlisten = \"127.0.0.1:9191\"\nprotocol = \"http\"\n";
        let mut config = crate::config::Config::parse("t.toml", text).expect("valid");
        let upstream = config.upstreams.remove(0);
        let cluster = Cluster::local(upstream, "127.0.0.1:1".parse().expect("addr"));
        let proxy = HttpProxy::new(cluster, "outbound", false);
        let activity = Arc::new(Activity::new(true));
        let peer: SocketAddr = "127.0.0.1:2".parse().expect("addr");
        let handle = |req| proxy.handle(req, peer, activity.busy());
        assert!(size_of_output(&handle) <= 16);
        // What goes into that box, copied whole per request: 2.9 KiB
        // before the large send futures were boxed and the arguments no
        // longer stored twice; some 1.5 KiB since.
        fn size_of_answer<F: Fn(hyper::http::request::Parts, ClientBody) -> R, R>(_: &F) -> usize {
            std::mem::size_of::<R>()
        }
        let answer = |parts, body| proxy.answer(parts, body, None, peer, activity.busy());
        let size = size_of_answer(&answer);
        assert!(size <= 2048, "the answering future grew to {size} bytes");
        assert_eq!(request_id().len(), 32);
        assert_ne!(request_id(), request_id());
    }
}
