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

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::Rng;

use super::balance::hash_of;
use super::cluster::{Cluster, EndpointState, Source, acquire_owned};
use super::connect::{ConnectError, Connector};
use super::headers::{content_length, is_grpc, is_upgrade, strip_hop_by_hop};
use super::rescue::{self, ProxyError};
use super::{BoxError, ProxyBody, retry};
use crate::config::{Balance, Protocol};
use crate::telemetry::{AccessLog, Outcome, unix_ms};

/// Bodies up to this size are buffered so the request can be retried.
const MAX_REPLAY_BODY: u64 = 64 * 1024;
const REQUEST_ID: &str = "x-request-id";

/// One listener's HTTP proxy: its cluster and pooled client.
#[derive(Debug)]
pub struct HttpProxy {
    pub cluster: Arc<Cluster>,
    pub direction: &'static str,
    client: Client<Connector, ProxyBody>,
    protocol: Protocol,
    access_log: bool,
}

/// The request body: kept (so it can be sent again) or streamed once.
enum RequestBody {
    Replayable(Bytes),
    Streaming(Option<Incoming>),
}

impl HttpProxy {
    pub fn new(cluster: Arc<Cluster>, direction: &'static str, access_log: bool) -> Self {
        let protocol = cluster.config().protocol;
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(cluster.config().idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new());
        if matches!(protocol, Protocol::Http2 | Protocol::Grpc) {
            builder.http2_only(true);
        }
        let client = builder.build(Connector {
            cluster: Arc::clone(&cluster),
        });
        HttpProxy {
            cluster,
            direction,
            client,
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
            client: self.client.clone(),
            protocol: self.protocol,
            access_log,
        }
    }

    /// Answers one request: the upstream's response or the proxy's own.
    /// `connection` is held until the response's last byte (it marks the
    /// client connection busy).
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        connection: impl Send + 'static,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let grpc = is_grpc(req.headers());
        let mut log = self.access_log.then(|| LogContext::new(&req));
        if !req.headers().contains_key(REQUEST_ID) {
            let id = format!("{:032x}", rand::rng().random::<u128>());
            if let Ok(v) = HeaderValue::from_str(&id) {
                req.headers_mut().insert(REQUEST_ID, v);
            }
            if let Some(log) = &mut log {
                log.request_id = Some(id);
            }
        }
        let cluster = &self.cluster;
        let Some(active) = acquire_owned(
            cluster,
            |g| &g.requests,
            cluster.config().limits.max_requests,
        ) else {
            return self.fail(
                ProxyError::CircuitOpen("max_requests"),
                grpc,
                start,
                log,
                None,
                0,
            );
        };
        // Upgrades need an HTTP/1.1 hop all the way (HTTP/2 has no
        // Upgrade; its extended CONNECT is not supported yet).
        let upgrade = self.protocol == Protocol::Http && is_upgrade(&req);
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        let version = match self.protocol {
            Protocol::Http2 | Protocol::Grpc => Version::HTTP_2,
            _ => Version::HTTP_11,
        };
        if version == Version::HTTP_2 {
            // HTTP/2 carries the authority in `:authority` (the endpoint
            // dialled); a Host header naming something else makes the
            // request malformed (RFC 9113 §8.3.1).
            parts.headers.remove(header::HOST);
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
        let hash = match (&cluster.config().balance, &cluster.config().hash_header) {
            (Balance::RingHash, Some(name)) => parts
                .headers
                .get(name.as_str())
                .map(|v| hash_of(v.as_bytes())),
            (Balance::RingHash, None) => Some(hash_of(&peer.ip())),
            _ => None,
        };
        let policy = &cluster.config().retries;
        let deadline = tokio::time::Instant::now() + cluster.config().request_timeout;
        let mut body = if body.is_end_stream() {
            RequestBody::Replayable(Bytes::new())
        } else if policy.attempts > 0
            && !upgrade
            && content_length(&parts.headers).is_some_and(|n| n <= MAX_REPLAY_BODY)
        {
            match tokio::time::timeout_at(deadline, body.collect()).await {
                Ok(Ok(collected)) => RequestBody::Replayable(collected.to_bytes()),
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
                        ProxyError::Timeout(cluster.config().request_timeout),
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
        let max_attempts = 1 + policy.attempts;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt = 0u32;
        let mut retry_slot = None;
        loop {
            attempt += 1;
            let Some(endpoint) = cluster.pick(hash, &tried) else {
                return self.fail(
                    ProxyError::NoHealthyUpstream(cluster.config().name.clone()),
                    grpc,
                    start,
                    log,
                    None,
                    attempt,
                );
            };
            tried.push(endpoint.addr);
            let in_flight = endpoint.start_request();
            let replayable = matches!(body, RequestBody::Replayable(_));
            let outgoing_body = match &mut body {
                RequestBody::Replayable(bytes) => rescue::full(bytes.clone()),
                RequestBody::Streaming(b) => match b.take() {
                    Some(b) => b.map_err(BoxError::from).boxed_unsync(),
                    None => rescue::empty(),
                },
            };
            let mut target = hyper::http::uri::Parts::default();
            target.scheme = Some(hyper::http::uri::Scheme::HTTP);
            target.authority = Some(endpoint.authority.clone());
            target.path_and_query = Some(path.clone());
            let uri = match Uri::from_parts(target) {
                Ok(uri) => uri,
                Err(_) => {
                    return self.fail(
                        ProxyError::BadRequest("the request target is not a valid URI"),
                        grpc,
                        start,
                        log,
                        Some(endpoint.addr),
                        attempt,
                    );
                }
            };
            let mut outgoing = Request::new(outgoing_body);
            *outgoing.method_mut() = method.clone();
            *outgoing.uri_mut() = uri;
            *outgoing.version_mut() = version;
            *outgoing.headers_mut() = parts.headers.clone();
            let Some(pending) =
                acquire_owned(cluster, |g| &g.pending, cluster.config().limits.max_pending)
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
            let result = tokio::time::timeout_at(deadline, self.client.request(outgoing)).await;
            drop(pending);
            drop(retry_slot.take());
            let can_retry = replayable && attempt < max_attempts;
            let error = match result {
                Err(_) => {
                    return self.fail(
                        ProxyError::Timeout(cluster.config().request_timeout),
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
                            || response.headers().contains_key("grpc-status"))
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
                        && retry::idempotent(&method)
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
                        tracing::debug!(upstream = %cluster.config().name, endpoint = %endpoint.addr, %status, attempt, "{why}");
                        drop(response);
                        drop(in_flight);
                        if !self.wait_backoff(attempt, deadline).await {
                            return self.fail(
                                ProxyError::Timeout(cluster.config().request_timeout),
                                grpc,
                                start,
                                log,
                                Some(endpoint.addr),
                                attempt,
                            );
                        }
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
                        (active, in_flight, connection),
                    );
                }
                Ok(Err(e)) => classify(&e, &endpoint),
            };
            let connect = matches!(
                error,
                ProxyError::ConnectFailure(_) | ProxyError::ConnectTimeout(..)
            );
            if !matches!(error, ProxyError::CircuitOpen(_)) {
                cluster.report(&endpoint, true);
            }
            let safe = (connect && policy.on.connect_failure)
                || (matches!(error, ProxyError::Reset(_))
                    && policy.on.reset
                    && retry::idempotent(&method));
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
                tracing::debug!(upstream = %cluster.config().name, endpoint = %endpoint.addr, error = %error, attempt, "retrying on another endpoint");
                retry_slot = slot;
                drop(in_flight);
                if self.wait_backoff(attempt, deadline).await {
                    continue;
                }
                return self.fail(
                    ProxyError::Timeout(cluster.config().request_timeout),
                    grpc,
                    start,
                    log,
                    Some(endpoint.addr),
                    attempt,
                );
            }
            tracing::debug!(upstream = %cluster.config().name, endpoint = %endpoint.addr, error = %error, attempt, retryable = can_retry && safe, "request failed");
            return self.fail(error, grpc, start, log, Some(endpoint.addr), attempt);
        }
    }

    /// Passes the upstream's response on, holding `guards` until its last
    /// byte; a 101 answer to an upgrade request splices the two upgraded
    /// connections instead.
    fn forward(
        &self,
        mut response: Response<Incoming>,
        downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
        guards: impl Send + 'static,
    ) -> Response<ProxyBody> {
        let upstream_upgrade = (response.status() == StatusCode::SWITCHING_PROTOCOLS)
            .then(|| hyper::upgrade::on(&mut response));
        let (mut head, body) = response.into_parts();
        head.version = Version::HTTP_11;
        if let (Some(down), Some(up)) = (downstream_upgrade, upstream_upgrade) {
            let name = self.cluster.config().name.clone();
            tokio::spawn(async move {
                let _guards = guards;
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
            return Response::from_parts(head, rescue::empty());
        }
        strip_hop_by_hop(&mut head.headers, false);
        if self.cluster.source == Source::Local {
            // Only a sidecar may say why it answered: an app's own
            // x-meshwork-error would make peers retry.
            head.headers.remove(rescue::ERROR_HEADER);
        }
        let body = Guarded {
            inner: body.map_err(BoxError::from).boxed_unsync(),
            _guards: Box::new(guards),
        };
        Response::from_parts(head, body.boxed_unsync())
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
    ) -> Response<ProxyBody> {
        let response = rescue::respond(&error, grpc);
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

/// Turns a client error into what went wrong, from hyper's error chain.
fn classify(error: &hyper_util::client::legacy::Error, endpoint: &EndpointState) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(c) = e.downcast_ref::<ConnectError>() {
            return match c {
                ConnectError::Timeout(addr, d) => ProxyError::ConnectTimeout(addr.to_string(), *d),
                ConnectError::Limit => ProxyError::CircuitOpen("max_connections"),
                other => ProxyError::ConnectFailure(other.to_string()),
            };
        }
        source = e.source();
    }
    if error.is_connect() {
        return ProxyError::ConnectFailure(endpoint.addr.to_string());
    }
    let mut text = error.to_string();
    if let Some(cause) = std::error::Error::source(error) {
        text = format!("{text}: {cause}");
    }
    ProxyError::Reset(text)
}

/// A response body that keeps the request's counters (in flight, the
/// cluster's active requests) until the last byte has gone.
struct Guarded {
    inner: ProxyBody,
    _guards: Box<dyn Send>,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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
    fn new<B>(req: &Request<B>) -> Self {
        let text = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        LogContext {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            protocol: match req.version() {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            request_id: text(REQUEST_ID),
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
