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

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::http::idle::{Activity, Tracked};
use crate::http::rescue::ProxyError;
use crate::http::retry;
use crate::telemetry::{AccessLog, Outcome, unix_ms};
use crate::upstream::balance::hash_of;
use crate::upstream::cluster::{Cluster, acquire_owned};
use crate::upstream::dial::{ConnectError, connect};

/// Proxies one accepted connection; returns when it is done or `stop`
/// (the end of the drain period) fires.
pub async fn proxy_connection(
    client: TcpStream,
    peer: SocketAddr,
    cluster: Arc<Cluster>,
    direction: &'static str,
    access_log: bool,
    stop: CancellationToken,
) {
    let start = Instant::now();
    let _ = client.set_nodelay(true);
    // The settings this connection runs under, whatever a reload does.
    let config = cluster.config();
    let finish = |status_outcome: Outcome, endpoint: Option<SocketAddr>, attempts: u32| {
        cluster.metrics.record(0, status_outcome, start.elapsed());
        if access_log {
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
            }
            .write();
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
    let _in_flight = endpoint.start_request();
    let (mut upstream, _slot) = upstream.into_parts();
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
