//! The data plane: one outbound listener per upstream (`127.0.0.1:<port>`
//! for the local app) and one inbound listener in front of the app. This
//! module binds the listeners, assembles each one's stack (TCP splice or
//! the HTTP proxy over a [`cluster::Cluster`]) and owns every connection
//! task, so that shutdown can stop accepting, let in-flight requests
//! finish for the drain period, then cut what is left. It reads endpoint
//! sets from [`crate::discovery`] and never talks to the registry itself.

pub mod balance;
pub mod cluster;
pub mod connect;
pub mod headers;
pub mod http;
pub mod idle;
pub mod rescue;
pub mod retry;
pub mod tcp;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{
    Balance, Config, Inbound, Limits, OutlierPolicy, ProxySettings, RetryOn, RetryPolicy, Upstream,
};
use crate::discovery::Discovery;
use crate::telemetry::{self, ClusterGauges};
use cluster::Cluster;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends (upstream's, buffered, or its own).
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Request headers larger than this get 431 (HTTP/1.1) or a stream
/// error (HTTP/2).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// A client must send a request's whole head within this (slowloris), and
/// its first byte within this of connecting.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 streams a client may reset before the server answers, per
/// connection (rapid reset, CVE-2023-44487).
const H2_MAX_PENDING_RESETS: usize = 20;
/// HTTP/2 streams the server may reset for protocol errors before it
/// closes the connection.
const H2_MAX_LOCAL_RESETS: usize = 256;
const H2_MAX_STREAMS: u32 = 1024;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({key}): {source}")]
pub struct BindError {
    key: String,
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// One bound listener and what it serves.
#[derive(Debug)]
struct Listener {
    socket: TcpListener,
    cluster: Arc<Cluster>,
    direction: &'static str,
}

/// The running data plane.
#[derive(Debug)]
pub struct Proxy {
    /// `(direction, cluster)` in config order, inbound first.
    clusters: Vec<(&'static str, Arc<Cluster>)>,
    listeners: std::sync::Mutex<Vec<Listener>>,
    settings: ProxySettings,
    inbound: Option<Inbound>,
    discovery: Discovery,
    draining: AtomicBool,
    /// Every accept loop and connection task.
    tasks: TaskTracker,
    /// Stops accepting (and starts graceful shutdown of connections).
    stop_accepting: CancellationToken,
    /// The end of the drain period: cut whatever is still open.
    stop_now: CancellationToken,
}

/// The inbound listener's cluster: the local app, no retries but connect
/// failures, no ejection, long timeout (the caller's sidecar has its own).
fn inbound_upstream(config: &Config, inbound: &Inbound) -> Upstream {
    Upstream {
        name: config.service_name.clone(),
        listen: inbound.listen,
        protocol: inbound.protocol,
        tag: None,
        balance: Balance::RoundRobin,
        hash_header: None,
        connect_timeout: crate::config::DEFAULT_CONNECT_TIMEOUT,
        request_timeout: Duration::from_secs(24 * 3600),
        idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
        // Once more on a fresh connection when a pooled one to the app
        // turns out closed (idempotent requests only).
        retries: RetryPolicy {
            attempts: 1,
            on: RetryOn {
                connect_failure: true,
                reset: inbound.protocol.is_http(),
                ..RetryOn::default()
            },
            budget_percent: 20,
        },
        outlier: OutlierPolicy {
            consecutive_5xx: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 0,
        },
        limits: Limits {
            max_connections: 1024,
            max_pending: 1024,
            max_requests: 1024,
        },
    }
}

impl Proxy {
    /// Binds every listener of `config` and starts following the
    /// upstreams' endpoints (nothing is accepted until [`Proxy::run`]).
    pub async fn bind(
        config: &Config,
        discovery: Discovery,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, BindError> {
        let mut clusters = Vec::new();
        let mut listeners = Vec::new();
        let bind = |key: String, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| BindError { key, addr, source })
        };
        if let Some(inbound) = &config.inbound {
            let cluster = Cluster::local(inbound_upstream(config, inbound), inbound.app);
            let socket = bind("inbound.listen".into(), inbound.listen).await?;
            clusters.push(("inbound", Arc::clone(&cluster)));
            listeners.push(Listener {
                socket,
                cluster,
                direction: "inbound",
            });
        }
        for (i, upstream) in config.upstreams.iter().enumerate() {
            let socket = bind(format!("upstreams[{i}].listen"), upstream.listen).await?;
            // All instances with their health: the balancer needs the
            // unhealthy ones for the panic threshold.
            let endpoints = discovery.service(&upstream.name, false);
            let cluster = Cluster::follow(upstream.clone(), endpoints, shutdown.clone());
            clusters.push(("outbound", Arc::clone(&cluster)));
            listeners.push(Listener {
                socket,
                cluster,
                direction: "outbound",
            });
        }
        Ok(Arc::new(Proxy {
            clusters,
            listeners: std::sync::Mutex::new(listeners),
            settings: config.proxy.clone(),
            inbound: config.inbound.clone(),
            discovery,
            draining: AtomicBool::new(false),
            tasks: TaskTracker::new(),
            stop_accepting: CancellationToken::new(),
            stop_now: CancellationToken::new(),
        }))
    }

    /// The addresses actually bound (tests bind port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .lock()
            .map(|l| {
                l.iter()
                    .filter_map(|l| l.socket.local_addr().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Starts accepting on every listener.
    pub fn run(self: &Arc<Self>) {
        let listeners =
            std::mem::take(&mut *self.listeners.lock().unwrap_or_else(|e| e.into_inner()));
        for listener in listeners {
            let proxy = Arc::clone(self);
            let span = tracing::info_span!("listener", direction = listener.direction, upstream = %listener.cluster.config.name);
            tracing::info!(parent: &span, address = ?listener.socket.local_addr().ok(), protocol = %listener.cluster.config.protocol, "listening");
            self.tasks.spawn(tracing::Instrument::instrument(
                proxy.accept_loop(listener),
                span,
            ));
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: Listener) {
        let Listener {
            socket,
            cluster,
            direction,
        } = listener;
        let http = cluster.config.protocol.is_http().then(|| {
            Arc::new(http::HttpProxy::new(
                Arc::clone(&cluster),
                direction,
                self.settings.access_log,
            ))
        });
        let server = server_builder();
        loop {
            let (stream, peer) = tokio::select! {
                () = self.stop_accepting.cancelled() => return,
                accepted = socket.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off
                        // instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(open) = cluster::acquire_owned(&cluster, |g| &g.downstream, usize::MAX) else {
                continue;
            };
            match &http {
                None => {
                    let stream_task = tcp::proxy_connection(
                        stream,
                        peer,
                        Arc::clone(&cluster),
                        direction,
                        self.settings.access_log,
                        self.stop_now.clone(),
                    );
                    self.tasks.spawn(async move {
                        stream_task.await;
                        drop(open);
                    });
                }
                Some(http) => {
                    let _ = stream.set_nodelay(true);
                    let http = Arc::clone(http);
                    let activity = Arc::new(idle::Activity::new(true));
                    let busy = Arc::clone(&activity);
                    let service = hyper::service::service_fn(move |req| {
                        let http = Arc::clone(&http);
                        let busy = busy.busy();
                        async move { Ok::<_, Infallible>(http.handle(req, peer, busy).await) }
                    });
                    let io = idle::Tracked::new(stream, Arc::clone(&activity));
                    let connection = server
                        .serve_connection_with_upgrades(TokioIo::new(io), service)
                        .into_owned();
                    let graceful = self.stop_accepting.clone();
                    let stop_now = self.stop_now.clone();
                    let idle_timeout = cluster.config.idle_timeout;
                    self.tasks.spawn(async move {
                        let _open = open;
                        tokio::pin!(connection);
                        tokio::select! {
                            result = connection.as_mut() => {
                                if let Err(e) = result {
                                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                                }
                                return;
                            }
                            () = activity.idle(HEADER_READ_TIMEOUT, idle_timeout) => return,
                            () = graceful.cancelled() => {}
                        }
                        // Finish what is in flight, refuse new requests.
                        connection.as_mut().graceful_shutdown();
                        tokio::select! {
                            _ = connection.as_mut() => {}
                            () = stop_now.cancelled() => {}
                        }
                    });
                }
            }
        }
    }

    /// Stops accepting, lets in-flight requests finish within the drain
    /// period, then cuts what is left.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.stop_accepting.cancel();
        self.tasks.close();
        let grace = self.settings.drain;
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.tasks.len(),
                "drain period of {grace:?} over; closing what is still open"
            );
            self.stop_now.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), self.tasks.wait()).await;
        } else {
            tracing::info!("drained");
        }
    }

    /// Every upstream has received its first endpoint set.
    pub fn ready(&self) -> bool {
        self.clusters.iter().all(|(_, c)| c.table().ready)
    }

    /// Prometheus text for `/metrics`.
    pub fn metrics(&self) -> String {
        let rows = self.clusters.iter().map(|(direction, c)| {
            let table = c.table();
            let gauges = ClusterGauges {
                requests_active: c.gauges.requests.load(Ordering::Relaxed),
                pending: c.gauges.pending.load(Ordering::Relaxed),
                connections_active: c.gauges.connections.load(Ordering::Relaxed),
                downstream_active: c.gauges.downstream.load(Ordering::Relaxed),
                endpoints: table.endpoints.len(),
                endpoints_healthy: table.endpoints.iter().filter(|e| e.healthy).count(),
                endpoints_ejected: table.endpoints.iter().filter(|e| e.ejected()).count(),
            };
            (*direction, c.config.name.as_str(), &c.metrics, gauges)
        });
        telemetry::render(
            rows,
            self.discovery.streams(),
            self.draining.load(Ordering::Relaxed),
        )
    }

    /// `/clusters`: every cluster's endpoints and their state.
    pub fn clusters(&self) -> serde_json::Value {
        let list: Vec<_> = self
            .clusters
            .iter()
            .map(|(direction, c)| {
                let table = c.table();
                json!({
                    "name": c.config.name,
                    "direction": direction,
                    "source": c.source,
                    "protocol": c.config.protocol,
                    "balance": c.config.balance,
                    "ready": table.ready,
                    "index": table.index,
                    "panic": c.panicking(),
                    "requests_active": c.gauges.requests.load(Ordering::Relaxed),
                    "pending": c.gauges.pending.load(Ordering::Relaxed),
                    "connections_active": c.gauges.connections.load(Ordering::Relaxed),
                    "downstream_connections_active": c.gauges.downstream.load(Ordering::Relaxed),
                    "endpoints": c.view(),
                })
            })
            .collect();
        let (up, total) = self.discovery.streams();
        json!({
            "registry_connected": up == total,
            "draining": self.draining.load(Ordering::Relaxed),
            "clusters": list,
        })
    }

    /// `/config`: the listeners, their settings and the routing table now.
    pub fn config(&self) -> serde_json::Value {
        let upstreams: Vec<_> = self
            .clusters
            .iter()
            .filter(|(direction, _)| *direction == "outbound")
            .map(|(_, c)| {
                let table = c.table();
                json!({
                    "upstream": c.config,
                    "index": table.index,
                    "endpoints": table
                        .endpoints
                        .iter()
                        .map(|e| json!({"key": e.key, "address": e.addr.to_string(), "weight": e.weight, "health": e.health}))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "inbound": self.inbound,
            "upstreams": upstreams,
            "proxy": self.settings,
        })
    }
}

/// The listener's HTTP server: HTTP/1.1 and HTTP/2 (prior knowledge)
/// with the bad-input limits.
fn server_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Heads are timed by `idle::Activity` from their first byte;
        // hyper's timer would also close idle keep-alive connections.
        .header_read_timeout(None)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}
