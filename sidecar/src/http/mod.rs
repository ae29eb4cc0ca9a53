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
//!
//! `HttpProxy::answer` reads as the request's phases, each in its own
//! file: [`prepare`] (headers, target, hash key) → [`capture`] (keep the
//! body for retries or stream it) → pick (the cluster's balancer) →
//! [`send`] (one attempt) → [`retry::decide`] (a pure function) →
//! [`respond`] (pass the answer on, or the proxy's own via [`rescue`]).

pub mod access_log;
pub mod authorize;
pub mod body;
pub mod capture;
pub mod headers;
pub mod idle;
pub mod prepare;
pub mod rescue;
pub mod respond;
pub mod retry;
pub mod send;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hyper::header::HeaderName;
use hyper::{Request, Response, StatusCode, Version};

pub use body::{ClientBody, Guards, OutgoingBody, ResponseBody};

use crate::config::{Protocol, Upstream as UpstreamConfig};
use crate::policy::intentions::Caller;
use crate::upstream::cluster::{Cluster, OwnedGauge, Source, acquire_owned};
use crate::upstream::endpoint::EndpointState;
use crate::upstream::pool::Pool;
use access_log::LogContext;
use capture::RequestBody;
use headers::{is_grpc, is_upgrade};
use idle::Busy;
use prepare::Prepared;
use rescue::ProxyError;
use retry::{Attempt, Verdict};
use send::{Leg, Sent, Upstream};

/// What follows an attempt.
enum Next {
    /// Another endpoint, holding a retry budget slot when it spends one.
    Retry {
        slot: Option<OwnedGauge>,
        why: &'static str,
    },
    /// This attempt's answer (or error) goes to the client.
    Answer,
}

/// How long a request waits for its cluster's first endpoint set.
const FIRST_SET_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// One listener's HTTP proxy: its cluster and pooled client.
#[derive(Debug)]
pub struct HttpProxy {
    pub cluster: Arc<Cluster>,
    pub direction: &'static str,
    pool: Pool,
    protocol: Protocol,
    access_log: bool,
    /// Outbound: the discovery chain (routes, splits, subsets, failover)
    /// in front of `cluster`, which serves what no entry changes.
    pub routing: Option<Arc<crate::policy::chain::Routing<HttpProxy>>>,
    /// A gateway listener for several services: the proxy of each, by
    /// host (first match wins).
    pub hosts: Option<Arc<HostTable>>,
    /// A gateway listener: what it asks of outside clients before
    /// routing (`crate::gateway::edge`).
    pub edge: Option<Arc<crate::gateway::edge::Edge>>,
}

/// A gateway listener's services by host, each with its own proxy (first
/// match wins).
pub type HostTable = Vec<(crate::config::HostRoute, Arc<HttpProxy>)>;

impl crate::policy::chain::TargetProxy for HttpProxy {
    fn has_healthy(&self) -> bool {
        self.cluster.has_healthy()
    }
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
            routing: None,
            hosts: None,
            edge: None,
        }
    }

    /// The same proxy with a gateway listener's edge in front.
    pub fn with_edge(mut self, edge: Arc<crate::gateway::edge::Edge>) -> Self {
        self.edge = Some(edge);
        self
    }

    /// The same proxy routing each request by host to one of `hosts`.
    pub fn with_hosts(mut self, hosts: HostTable) -> Self {
        self.hosts = Some(Arc::new(hosts));
        self
    }

    /// The same proxy with the discovery chain in front.
    pub fn with_routing(mut self, routing: Arc<crate::policy::chain::Routing<HttpProxy>>) -> Self {
        self.routing = Some(routing);
        self
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
            routing: self.routing.clone(),
            hosts: self.hosts.clone(),
            edge: self.edge.clone(),
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
    /// `caller` is the service the client's verified mesh certificate
    /// names (inbound listener only).
    pub fn handle(
        &self,
        mut req: Request<ClientBody>,
        peer: SocketAddr,
        caller: Option<Arc<Caller>>,
        connection: Busy,
    ) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send + '_>> {
        // A gateway listener: the edge's checks first; its own answer, or
        // the request goes on (HSTS added to the answer).
        if let Some(edge) = &self.edge {
            use crate::gateway::edge::EdgeAnswer;
            let answer = match edge.admit(&mut req, peer) {
                Ok(admitted) => {
                    let inner = self.route(req, peer, caller, connection);
                    return match admitted.hsts {
                        None => inner,
                        Some(hsts) => Box::pin(async move {
                            let mut response = inner.await;
                            response
                                .headers_mut()
                                .insert(hyper::header::STRICT_TRANSPORT_SECURITY, hsts);
                            response
                        }),
                    };
                }
                Err(EdgeAnswer::Error(error)) => {
                    let grpc = is_grpc(req.headers());
                    let response = rescue::respond(&error, grpc);
                    self.edge_answered(&req, response.status().as_u16(), error.outcome());
                    response
                }
                Err(EdgeAnswer::Redirect(location)) => {
                    let response = rescue::redirect(&location);
                    let outcome = crate::telemetry::Outcome::Redirect;
                    self.edge_answered(&req, response.status().as_u16(), outcome);
                    response
                }
            };
            let mut answer = answer;
            if let Some(hsts) = edge.hsts() {
                answer
                    .headers_mut()
                    .insert(hyper::header::STRICT_TRANSPORT_SECURITY, hsts);
            }
            return Box::pin(std::future::ready(answer.map(ResponseBody::Own)));
        }
        self.route(req, peer, caller, connection)
    }

    /// Counts (and logs, with the access log on) an answer the gateway's
    /// edge gave itself.
    fn edge_answered<B>(&self, req: &Request<B>, status: u16, outcome: crate::telemetry::Outcome) {
        self.cluster
            .metrics
            .record(status, outcome, std::time::Duration::ZERO);
        if self.access_log {
            let mut head = Request::new(());
            *head.method_mut() = req.method().clone();
            *head.uri_mut() = req.uri().clone();
            *head.version_mut() = req.version();
            if let Some(id) = req.headers().get(REQUEST_ID) {
                head.headers_mut().insert(REQUEST_ID, id.clone());
            }
            let (parts, ()) = head.into_parts();
            LogContext::new(&parts).write(self, status, outcome, None, 0, Instant::now());
        }
    }

    /// [`HttpProxy::handle`] past the edge: by host, through the chain, or
    /// to the cluster.
    fn route(
        &self,
        mut req: Request<ClientBody>,
        peer: SocketAddr,
        caller: Option<Arc<Caller>>,
        connection: Busy,
    ) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send + '_>> {
        // A gateway listener for several services: the one for the
        // request's host answers; a host none has gets 404 (counted on the
        // listener's own cluster, the first service's).
        if let Some(hosts) = &self.hosts {
            let host = headers::request_host(&req);
            // The most specific match (exact, longest suffix, longest
            // prefix); among equals, the first service.
            let mut best: Option<((u8, usize), &Arc<HttpProxy>)> = None;
            for (route, proxy) in hosts.iter() {
                if let Some(rank) = route.rank(&host)
                    && best.as_ref().is_none_or(|(b, _)| rank > *b)
                {
                    best = Some((rank, proxy));
                }
            }
            return match best {
                Some((_, proxy)) => proxy.handle(req, peer, caller, connection),
                None => {
                    let grpc = is_grpc(req.headers());
                    let error = ProxyError::NoRoute(host);
                    self.cluster.metrics.record(
                        error.status().as_u16(),
                        error.outcome(),
                        std::time::Duration::ZERO,
                    );
                    let response = rescue::respond(&error, grpc).map(ResponseBody::Own);
                    Box::pin(std::future::ready(response))
                }
            };
        }
        // Outbound, through the discovery chain: the target's own proxy
        // answers (the request already rewritten), then the response's
        // header changes.
        if let Some(routing) = &self.routing
            && let Some(chosen) = routing.choose(&mut req)
        {
            return Box::pin(async move {
                let proxy = Arc::clone(&chosen.proxy);
                let mut delayed = false;
                if let Some(fault) = &chosen.fault {
                    use std::sync::atomic::Ordering::Relaxed;
                    let hit = |per_10k: u32| rand::random_range(0..10_000u32) < per_10k;
                    if let Some(delay) = fault.delay.as_ref().filter(|d| hit(d.per_10k)) {
                        crate::policy::chain::FAULTS_DELAYED.fetch_add(1, Relaxed);
                        tokio::time::sleep(delay.duration).await;
                        delayed = true;
                    }
                    if let Some(abort) = fault.abort.as_ref().filter(|a| hit(a.per_10k)) {
                        crate::policy::chain::FAULTS_ABORTED.fetch_add(1, Relaxed);
                        let grpc = is_grpc(req.headers());
                        let mut response =
                            rescue::fault_abort(abort.http_status, abort.grpc_status, grpc)
                                .map(ResponseBody::Own);
                        proxy.cluster.metrics.record(
                            response.status().as_u16(),
                            crate::telemetry::Outcome::FaultAbort,
                            std::time::Duration::ZERO,
                        );
                        chosen.change_response(response.headers_mut());
                        return response;
                    }
                }
                // The target's answering future is boxed on its own: inlined
                // here it would make this future over a KiB larger, and
                // copying that costs more than the allocation (measured
                // with bench/proxy-cost.sh: ~700 instructions per request
                // more over HTTP/1.1).
                let mut response = proxy.handle(req, peer, caller, connection).await;
                chosen.change_response(response.headers_mut());
                if delayed {
                    response.headers_mut().insert(
                        rescue::FAULT_HEADER,
                        hyper::header::HeaderValue::from_static("delay"),
                    );
                }
                response
            });
        }
        // Inbound, an upgrade to h2c would turn the connection into HTTP/2
        // requests that no intention sees (h2c smuggling): the request is
        // answered as the plain HTTP/1.1 request it also is.
        if caller.is_some() {
            headers::drop_h2c_upgrade(req.headers_mut());
        }
        // Upgrades and CONNECT tunnels need an HTTP/1.1 hop all the way
        // (HTTP/2 has no Upgrade; its extended CONNECT is not supported yet).
        let downstream_upgrade = (self.protocol == Protocol::Http
            && (is_upgrade(&req) || req.method() == hyper::Method::CONNECT))
            .then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        Box::pin(self.answer(parts, body, downstream_upgrade, (peer, caller), connection))
    }
}

impl HttpProxy {
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
        (peer, caller): (SocketAddr, Option<Arc<Caller>>),
        connection: Busy,
    ) -> impl Future<Output = Response<ResponseBody>> + Send + '_ {
        async move {
            let start = Instant::now();
            let grpc = is_grpc(&parts.headers);
            let mut log = self.access_log.then(|| LogContext::new(&parts));
            // Inbound: the verified caller against the intentions, on the
            // normalised path (which is what the app gets), before
            // anything is sent on.
            // The target, `Host` and hop-by-hop fields first: intentions
            // judge what the app will be sent (an absolute-form target's
            // authority is the host, HTTP/2's `:authority` wins over
            // `host`, a header the client names in `Connection` is gone).
            if caller.is_some() {
                let upgrade =
                    downstream_upgrade.is_some() && parts.method != hyper::Method::CONNECT;
                headers::strip_hop_by_hop(&mut parts.headers, upgrade);
            }
            if let Err(e) = prepare::check_target(&mut parts) {
                return self.fail(e, grpc, start, log, None, 0);
            }
            if let Some(caller) = caller {
                let decided = authorize::request(&caller, &mut parts);
                if let Some(log) = log.as_mut() {
                    log.source = Some(Arc::clone(&caller.service));
                    log.intention = match &decided {
                        Ok(rule) => Some(rule.to_string()),
                        Err(ProxyError::IntentionDenied(rule)) => Some(rule.clone()),
                        Err(_) => None,
                    };
                }
                if let Err(e) = decided {
                    return self.fail(e, grpc, start, log, None, 0);
                }
                if let Err(wait) = caller.limits.admit(parts.uri.path()) {
                    return self.fail(ProxyError::RateLimited(wait), grpc, start, log, None, 0);
                }
            }
            prepare::ensure_request_id(&mut parts.headers, log.as_mut());
            let cluster = &self.cluster;
            // The settings this request runs under, whatever a reload does meanwhile.
            let config = cluster.config();
            let fail = |error, log, endpoint, attempt| {
                self.fail(error, grpc, start, log, endpoint, attempt)
            };
            let Some(active) = acquire_owned(cluster, |g| &g.requests, config.limits.max_requests)
            else {
                return fail(ProxyError::CircuitOpen("max_requests"), log, None, 0);
            };
            let tunnel = downstream_upgrade.is_some();
            let upgrade = tunnel && parts.method != hyper::Method::CONNECT;
            let version = self.upstream_version();
            let deadline = tokio::time::Instant::from_std(start) + config.request_timeout;
            let request = prepare::prepare(&mut parts, &config, version, peer, upgrade, deadline);
            let mut body = match capture::plan(body, &parts.headers, &config, tunnel) {
                Ok(body) => body,
                // Boxed: only requests with a body to keep get here.
                Err(body) => match Box::pin(capture::read(body, deadline, request.timeout)).await {
                    Ok(body) => body,
                    Err(e) => return fail(e, log, None, 0),
                },
            };
            // An HTTP/1.1 upstream: the inline client (see `h1`), with the
            // body from memory or streamed. (A message with a length carries
            // no trailers in HTTP/1.1: a kept body's are for an HTTP/2
            // upstream.)
            let h1 = version == Version::HTTP_11;
            let max_attempts = 1 + config.retries.attempts;
            // Endpoints already tried (filled only when retrying, so the usual
            // single attempt allocates nothing).
            let mut tried: Vec<SocketAddr> = Vec::new();
            let mut attempt = 0u32;
            let mut retry_slot = None;
            // The endpoint that just failed, when the next attempt waits
            // first: waited for here, at the top, so that nothing of the
            // failed attempt is kept across the wait in this future.
            let mut backoff_after: Option<SocketAddr> = None;
            loop {
                if let Some(failed) = backoff_after.take()
                    && !Box::pin(self.wait_backoff(attempt, deadline)).await
                {
                    let timeout = ProxyError::Timeout(config.request_timeout);
                    return fail(timeout, log, Some(failed), attempt);
                }
                attempt += 1;
                let mut picked = cluster.pick(&config, request.hash, &tried);
                if picked.is_none() && attempt == 1 && !cluster.table().ready {
                    // Before discovery's first answer (a listener just
                    // opened): wait for it, within the request's time.
                    let limit = deadline
                        .saturating_duration_since(tokio::time::Instant::now())
                        .min(FIRST_SET_WAIT);
                    if Box::pin(cluster.first_set(limit)).await {
                        picked = cluster.pick(&config, request.hash, &tried);
                    }
                }
                let Some(endpoint) = picked else {
                    let none = ProxyError::NoHealthyUpstream(config.name.clone());
                    return fail(none, log, None, attempt);
                };
                let in_flight = endpoint.start_request();
                let can_retry = body.replayable() && attempt < max_attempts;
                let Some(pending) =
                    acquire_owned(cluster, |g| &g.pending, config.limits.max_pending)
                else {
                    let full = ProxyError::CircuitOpen("max_pending");
                    return fail(full, log, Some(endpoint.addr), attempt);
                };
                let exchange = match (&mut body, h1) {
                    (RequestBody::Replayable(bytes, _), true) => {
                        let head = request.inline_head(&parts.headers, bytes);
                        let (addr, authority) = (endpoint.addr, &endpoint.authority);
                        let idempotent = request.idempotent;
                        // Built in place: bound to a name first, the future
                        // would be stored twice in this one.
                        tokio::time::timeout_at(
                            deadline,
                            self.pool.send_inline(addr, authority, &head, idempotent),
                        )
                        .await
                    }
                    (body, _) => {
                        let leg = match body {
                            RequestBody::Streaming(streamed) if h1 => Leg::H1(streamed.take()),
                            body => {
                                let headers = &mut parts.headers;
                                match self
                                    .outgoing_request(body, &request, &endpoint, headers, can_retry)
                                {
                                    Ok(outgoing) => Leg::H2(outgoing),
                                    Err(e) => return fail(e, log, Some(endpoint.addr), attempt),
                                }
                            }
                        };
                        let headers = &parts.headers;
                        Box::pin(self.exchange(leg, headers, &request, &endpoint)).await
                    }
                };
                let sent = self.sent(exchange, &request, &endpoint);
                drop(pending);
                drop(retry_slot.take());
                let next = self.decide(&sent, &endpoint, can_retry, &request, &config);
                if let Next::Retry { slot, why } = next {
                    tracing::debug!(upstream = %config.name, endpoint = %endpoint.addr, attempt, "{why}");
                    retry_slot = slot;
                    drop((sent, in_flight));
                    tried.push(endpoint.addr);
                    backoff_after = Some(endpoint.addr);
                    continue;
                }
                let response = match sent {
                    Sent::Answer(response) => response,
                    Sent::Failed(error) | Sent::Final(error) => {
                        tracing::debug!(upstream = %config.name, endpoint = %endpoint.addr, error = %error, attempt, "request failed");
                        return fail(error, log, Some(endpoint.addr), attempt);
                    }
                };
                let done = (log, Some(endpoint.addr), attempt, start);
                let guards = Guards::new(active, in_flight, connection);
                return self.respond(response, downstream_upgrade, guards, done);
            }
        }
    }

    /// Phase 5: after an attempt, whether to try another endpoint
    /// ([`retry::decide`], then the retry budget when it is spent), and
    /// the endpoint's passive health told what the attempt showed.
    fn decide(
        &self,
        sent: &Sent,
        endpoint: &EndpointState,
        can_retry: bool,
        request: &Prepared,
        config: &UpstreamConfig,
    ) -> Next {
        let cluster = &self.cluster;
        let (seen, endpoint_failed) = match sent {
            Sent::Final(_) => (Attempt::Refused, None),
            Sent::Answer(response) => {
                let status = response.status();
                let unreached = self.unreached(endpoint, response);
                let seen = Attempt::Answered {
                    status: status.as_u16(),
                    unreached,
                };
                (seen, Some(status.is_server_error()))
            }
            // Neither a full circuit nor a client's broken body is the
            // endpoint's failure.
            Sent::Failed(e) => {
                let seen = Attempt::failed(e);
                (seen, (seen != Attempt::Refused).then_some(true))
            }
        };
        if let Verdict::Retry { spends_budget, why } =
            retry::decide(seen, can_retry, request.idempotent, &config.retries.on)
            && let Some(slot) = if spends_budget {
                retry::budget(cluster).map(Some)
            } else {
                Some(None)
            }
        {
            cluster.report(endpoint, true);
            return Next::Retry { slot, why };
        }
        if let Some(failed) = endpoint_failed {
            cluster.report(endpoint, failed);
        }
        Next::Answer
    }

    /// The answer came from the endpoint's sidecar, which could not reach
    /// its app: the request went no further than that sidecar, so it is as
    /// safe to send elsewhere as a failed connect.
    fn unreached(&self, endpoint: &EndpointState, response: &Upstream) -> bool {
        self.cluster.source == Source::Registry
            && endpoint.sidecar
            && (response.status() == StatusCode::SERVICE_UNAVAILABLE
                || response.headers().contains_key(GRPC_STATUS))
            && rescue::never_reached_app(response.headers())
    }

    /// What the upstream speaks.
    fn upstream_version(&self) -> Version {
        match self.protocol {
            Protocol::Http2 | Protocol::Grpc => Version::HTTP_2,
            _ => Version::HTTP_11,
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
        let handle = |req| proxy.handle(req, peer, None, activity.busy());
        assert!(size_of_output(&handle) <= 16);
        // What goes into that box, copied whole per request: 2.9 KiB
        // before the large send futures were boxed and the arguments no
        // longer stored twice; some 1.5 KiB since.
        fn size_of_answer<F: Fn(hyper::http::request::Parts, ClientBody) -> R, R>(_: &F) -> usize {
            std::mem::size_of::<R>()
        }
        let answer = |parts, body| proxy.answer(parts, body, None, (peer, None), activity.busy());
        let size = size_of_answer(&answer);
        assert!(size <= 2048, "the answering future grew to {size} bytes");
        let id = |headers: &mut hyper::HeaderMap| {
            prepare::ensure_request_id(headers, None);
            headers[REQUEST_ID].clone()
        };
        let mut headers = hyper::HeaderMap::new();
        let first = id(&mut headers);
        assert_eq!(first.len(), 32);
        assert_eq!(id(&mut headers), first, "an id present is kept");
        assert_ne!(id(&mut hyper::HeaderMap::new()), first);
    }
}
