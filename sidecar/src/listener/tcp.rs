//! L4: a connection accepted on a TCP listener is spliced to an endpoint
//! of its cluster. A failed connect is tried again on another endpoint
//! (when `retries.on` has `connect-failure`); then bytes flow both ways
//! until both sides have finished, a half-close (FIN) on one side passed
//! on to the other while the reverse direction keeps flowing. A
//! connection idle for the upstream's `idle_timeout` is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::http::idle::{Activity, Tracked};
use crate::http::rescue::ProxyError;
use crate::http::retry;
use crate::listener::Downstream;
use crate::policy::intentions::Authz;
use crate::telemetry::{AccessLog, Outcome, unix_ms};
use crate::tls::stream::{ServerStream, Stream};
use crate::upstream::balance::hash_of;
use crate::upstream::cluster::{Cluster, acquire_owned};
use crate::upstream::dial::{ConnectError, connect};

/// The cluster of one discovery-chain target of a tcp upstream (its
/// connections follow the resolver: `policy::chain::Routing`).
#[derive(Debug)]
pub struct TcpTarget(pub Arc<Cluster>);

impl crate::policy::chain::TargetProxy for TcpTarget {
    fn has_healthy(&self) -> bool {
        self.0.has_healthy()
    }
}

/// Says once per listener when a `tcp` upstream is being spoken HTTP to:
/// the default protocol is `tcp`, which carries bytes only (no retries on
/// 503, no `x-request-id`, no per-request metrics), and nothing else would
/// tell. Looks only at what the client has already sent (a peek that does
/// not wait), so protocols where the server speaks first are untouched.
fn warn_if_http(client: &ServerStream, cluster: &Cluster, upstream: &str) {
    // A mesh client is a sidecar, which warns on its own side.
    let Stream::Plain(client) = client else {
        return;
    };
    if cluster.http_on_tcp_warned.load(Ordering::Relaxed) {
        return;
    }
    let mut first = [0u8; 24];
    let mut buf = tokio::io::ReadBuf::new(&mut first);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if !matches!(
        client.poll_peek(&mut cx, &mut buf),
        std::task::Poll::Ready(Ok(_))
    ) {
        return;
    }
    if looks_like_http(buf.filled()) && !cluster.http_on_tcp_warned.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            upstream = %upstream,
            "this upstream's protocol is tcp, but its client speaks HTTP: set protocol = \"http\" \
             (or http2, grpc) for retries, x-request-id and per-request metrics"
        );
    }
}

/// The start of an HTTP/1.x request line or the HTTP/2 preface.
fn looks_like_http(bytes: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"PRI * HTTP/2",
    ];
    METHODS.iter().any(|m| bytes.starts_with(m))
}

/// Proxies one accepted connection; returns when it is done or `stop`
/// (the end of the drain period) fires. On the inbound listener the client
/// is a sidecar over mutual TLS and `downstream.caller` its service.
pub async fn proxy_connection(
    client: ServerStream,
    downstream: Downstream,
    cluster: Arc<Cluster>,
    direction: &'static str,
    access_log: bool,
    stop: CancellationToken,
) {
    let start = Instant::now();
    let peer = downstream.peer;
    if let Stream::Plain(client) = &client {
        let _ = client.set_nodelay(true);
    }
    // The settings this connection runs under, whatever a reload does.
    let config = cluster.config();
    // Inbound: the verified caller against the intentions (L4); a
    // connection it may not open is closed before an upstream is dialled.
    let mut decided: Option<(Arc<str>, String)> = None;
    let log = |status_outcome: Outcome,
               endpoint: Option<SocketAddr>,
               attempts: u32,
               decided: &Option<(Arc<str>, String)>| {
        AccessLog {
            ts_unix_ms: unix_ms(),
            direction,
            upstream: &config.name,
            method: "",
            path: "",
            protocol: "tcp",
            status: 0,
            outcome: status_outcome.as_str(),
            endpoint: endpoint.map(|e| e.to_string()),
            attempts,
            duration_ms: start.elapsed().as_secs_f64() * 1000.0,
            request_id: None,
            traceparent: None,
            source: decided.as_ref().map(|(s, _)| &**s),
            intention: decided.as_ref().map(|(_, r)| r.as_str()),
        }
        .write();
    };
    if let Some(caller) = downstream.caller {
        let source = Arc::clone(&caller.service);
        match caller.intentions.decide_connection(&caller.service) {
            Authz::Allow(rule) | Authz::AllowL7(rule) => {
                decided = access_log.then(|| (source, rule.to_string()));
            }
            Authz::Deny(rule) => {
                tracing::debug!(source = %caller.service, %rule, %peer, "connection denied by intention");
                cluster
                    .metrics
                    .record(0, Outcome::IntentionDenied, start.elapsed());
                if access_log {
                    log(Outcome::IntentionDenied, None, 0, &Some((source, rule)));
                }
                return;
            }
            Authz::Pending => {
                tracing::debug!(source = %caller.service, %peer, "no intentions yet: connection refused");
                cluster
                    .metrics
                    .record(0, Outcome::IntentionsPending, start.elapsed());
                if access_log {
                    log(
                        Outcome::IntentionsPending,
                        None,
                        0,
                        &Some((source, String::new())),
                    );
                }
                return;
            }
        }
    }
    let finish = |status_outcome: Outcome, endpoint: Option<SocketAddr>, attempts: u32| {
        cluster.metrics.record(0, status_outcome, start.elapsed());
        if access_log {
            log(status_outcome, endpoint, attempts, &decided);
        }
    };
    let Some(_active) = acquire_owned(&cluster, |g| &g.requests, usize::MAX) else {
        return;
    };
    let policy = &config.retries;
    let max_attempts = 1 + if policy.on.connect_failure {
        policy.attempts
    } else {
        0
    };
    let hash = (config.balance == crate::config::Balance::RingHash).then(|| hash_of(&peer.ip()));
    let mut tried = Vec::new();
    let mut attempts = 0;
    let (upstream, endpoint) = loop {
        attempts += 1;
        let Some(endpoint) = cluster.pick(&config, hash, &tried) else {
            let e = ProxyError::NoHealthyUpstream(config.name.clone());
            tracing::warn!(upstream = %config.name, %peer, "{e}");
            finish(e.outcome(), None, attempts);
            return;
        };
        tried.push(endpoint.addr);
        match connect(&cluster, endpoint.addr).await {
            Ok(upstream) => break (upstream, endpoint),
            Err(ConnectError::Limit) => {
                let e = ProxyError::CircuitOpen("max_connections");
                tracing::warn!(upstream = %config.name, %peer, "{e}");
                finish(e.outcome(), Some(endpoint.addr), attempts);
                return;
            }
            Err(e) => {
                cluster.report(&endpoint, true);
                let outcome = match e {
                    ConnectError::Timeout(..) => Outcome::ConnectTimeout,
                    _ => Outcome::ConnectFailure,
                };
                // Connect failures cost the upstream nothing: no budget.
                if attempts < max_attempts {
                    tracing::debug!(upstream = %config.name, error = %e, "connect failed; trying another endpoint");
                    cluster.metrics.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(retry::backoff(attempts)).await;
                    continue;
                }
                tracing::warn!(upstream = %config.name, error = %e, "connect failed");
                finish(outcome, Some(endpoint.addr), attempts);
                return;
            }
        }
    };
    cluster.report(&endpoint, false);
    warn_if_http(&client, &cluster, &config.name);
    let _in_flight = endpoint.start_request();
    let (mut upstream, _slot, _) = upstream.into_parts();
    let activity = Arc::new(Activity::new(false));
    let mut client = Tracked::new(client, Arc::clone(&activity));
    let idle = config.idle_timeout;
    // The connection is busy while it lasts; only silence counts.
    let idle_watch = activity.idle(idle, idle);
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            match result {
                Ok((sent, received)) => {
                    cluster.metrics.bytes_in.fetch_add(sent, Ordering::Relaxed);
                    cluster.metrics.bytes_out.fetch_add(received, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(upstream = %config.name, error = %e, "tcp splice ended with an error"),
            }
        }
        () = idle_watch => {
            tracing::debug!(upstream = %config.name, %peer, "closing a connection idle for {idle:?}");
        }
        () = stop.cancelled() => {}
    }
    finish(Outcome::Upstream, Some(endpoint.addr), attempts);
}

#[cfg(test)]
mod tests {
    use super::looks_like_http;

    #[test]
    fn http_request_starts_are_recognised() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM"));
        assert!(!looks_like_http(b"\x16\x03\x01"), "TLS");
        assert!(!looks_like_http(b"\0\0\0\x08\x04\xd2\x16/"), "PostgreSQL");
        assert!(!looks_like_http(b"GE"), "too short to tell");
    }
}
