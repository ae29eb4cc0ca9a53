//! Proxy telemetry: per-cluster counters and latency histograms kept in
//! atomics (no lock on the request path), rendered as Prometheus text on
//! the admin listener's `/metrics`, and the optional JSON access log.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meshwork_core::prometheus::{self, Buckets, Histogram};
use serde::Serialize;

/// Why a request or connection ended as it did; the label `outcome`.
/// Everything but `Upstream` is an answer the proxy made itself (see
/// `http::rescue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream's own answer (whatever its status).
    Upstream,
    NoHealthyUpstream,
    ConnectFailure,
    ConnectTimeout,
    Reset,
    Timeout,
    CircuitOpen,
    BadRequest,
    Draining,
    /// The inbound listener's intentions refused the caller (403).
    IntentionDenied,
    /// The inbound listener has no intentions yet (503).
    IntentionsPending,
    /// An injected fault answered instead of the upstream.
    FaultAbort,
    /// The service's rate limit refused the request (429).
    RateLimited,
    /// A gateway listener has no service for the request's host (404).
    NoRoute,
    /// A gateway listener's authentication refused the request (401).
    Unauthenticated,
    /// A gateway listener does not serve the method (405: CONNECT).
    MethodNotAllowed,
    /// A gateway listener redirected the request to HTTPS (308).
    Redirect,
}

impl Outcome {
    pub const ALL: [Outcome; 17] = [
        Outcome::Upstream,
        Outcome::NoHealthyUpstream,
        Outcome::ConnectFailure,
        Outcome::ConnectTimeout,
        Outcome::Reset,
        Outcome::Timeout,
        Outcome::CircuitOpen,
        Outcome::BadRequest,
        Outcome::Draining,
        Outcome::IntentionDenied,
        Outcome::IntentionsPending,
        Outcome::FaultAbort,
        Outcome::RateLimited,
        Outcome::NoRoute,
        Outcome::Unauthenticated,
        Outcome::MethodNotAllowed,
        Outcome::Redirect,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Upstream => "upstream",
            Outcome::NoHealthyUpstream => "no-healthy-upstream",
            Outcome::ConnectFailure => "connect-failure",
            Outcome::ConnectTimeout => "connect-timeout",
            Outcome::Reset => "upstream-reset",
            Outcome::Timeout => "timeout",
            Outcome::CircuitOpen => "circuit-open",
            Outcome::BadRequest => "bad-request",
            Outcome::Draining => "draining",
            Outcome::IntentionDenied => "intention-denied",
            Outcome::IntentionsPending => "intentions-pending",
            Outcome::FaultAbort => "fault-abort",
            Outcome::RateLimited => "rate-limited",
            Outcome::NoRoute => "no-route",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::MethodNotAllowed => "method-not-allowed",
            Outcome::Redirect => "https-redirect",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The proxy's latency buckets: 1 ms to 30 s.
#[derive(Debug)]
pub struct Latency;

impl Buckets for Latency {
    const UPPER_MICROS: &'static [u64] = &[
        1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
        2_500_000, 5_000_000, 10_000_000, 30_000_000,
    ];
}

/// Status classes: 0 = no status (TCP, or the connection broke), 1..=5.
const CLASSES: usize = 6;
const OUTCOMES: usize = Outcome::ALL.len();

/// One cluster's counters.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    requests: [[AtomicU64; OUTCOMES]; CLASSES],
    /// Time to the response head (HTTP) or connection length (TCP).
    pub latency: Histogram<Latency>,
    pub retries: AtomicU64,
    pub retries_budget_exhausted: AtomicU64,
    pub ejections: AtomicU64,
    pub connections: AtomicU64,
    pub connect_failures: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Client connections refused at the listener's connection limit.
    pub downstream_refused: AtomicU64,
    /// Idle client connections closed to make room at that limit.
    pub downstream_evicted: AtomicU64,
}

impl ClusterMetrics {
    /// One request (or TCP connection) ended with `status` (0 = none).
    pub fn record(&self, status: u16, outcome: Outcome, latency: Duration) {
        let class = usize::from(status / 100).min(CLASSES - 1);
        self.requests[class][outcome.index()].fetch_add(1, Ordering::Relaxed);
        self.latency.observe(latency);
    }

    pub fn requests(&self, class: usize, outcome: Outcome) -> u64 {
        self.requests[class][outcome.index()].load(Ordering::Relaxed)
    }

    /// Requests by status class (`[0]`: none), every outcome.
    pub fn by_class(&self) -> [u64; CLASSES] {
        std::array::from_fn(|class| Outcome::ALL.iter().map(|o| self.requests(class, *o)).sum())
    }
}

/// Gauges read at render time.
#[derive(Debug)]
pub struct ClusterGauges {
    pub requests_active: usize,
    pub pending: usize,
    pub connections_active: usize,
    pub downstream_active: usize,
    pub endpoints: usize,
    pub endpoints_healthy: usize,
    pub endpoints_ejected: usize,
}

/// The labels of a cluster's series: its listener's direction and
/// upstream, and for a discovery-chain target (a service or a subset the
/// upstream's routes, splits or failover send requests to) the target's
/// id (`v2.api`) and the route (`default`, or the router's route number).
pub fn cluster_labels(direction: &str, upstream: &str, target: Option<(&str, &str)>) -> String {
    let mut labels = format!(
        "direction=\"{direction}\",upstream=\"{}\"",
        escape(upstream)
    );
    if let Some((target, route)) = target {
        labels.push_str(&format!(
            ",target=\"{}\",route=\"{}\"",
            escape(target),
            escape(route)
        ));
    }
    labels
}

/// A label value as Prometheus text wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A counter's name, help text and where it lives.
type CounterRow = (
    &'static str,
    &'static str,
    fn(&ClusterMetrics) -> &AtomicU64,
);
/// A gauge's name, help text and how to read it.
type GaugeRow = (&'static str, &'static str, fn(&ClusterGauges) -> usize);

/// Renders the metrics of every cluster: `(labels, metrics, gauges)`, the
/// labels as Prometheus text without braces (see [`cluster_labels`]).
pub fn render<'a>(
    clusters: impl Iterator<Item = (String, &'a ClusterMetrics, ClusterGauges)>,
    registry_streams: (usize, usize),
    draining: bool,
) -> String {
    let clusters: Vec<_> = clusters.collect();
    let mut out = String::with_capacity(4096);
    let help = prometheus::header;
    help(
        &mut out,
        "meshwork_proxy_requests_total",
        "counter",
        "Requests (TCP: connections) by upstream, status class and outcome.",
    );
    for (labels, m, _) in &clusters {
        for (class, row) in m.requests.iter().enumerate() {
            for outcome in Outcome::ALL {
                let n = row[outcome.index()].load(Ordering::Relaxed);
                if n == 0 {
                    continue;
                }
                let class = if class == 0 {
                    "none".to_owned()
                } else {
                    format!("{class}xx")
                };
                let _ = writeln!(
                    out,
                    "meshwork_proxy_requests_total{{{labels},class=\"{class}\",outcome=\"{}\"}} {n}",
                    outcome.as_str()
                );
            }
        }
    }
    help(
        &mut out,
        "meshwork_proxy_request_duration_seconds",
        "histogram",
        "Time to the response head (TCP: connection lifetime).",
    );
    for (labels, m, _) in &clusters {
        m.latency
            .write(&mut out, "meshwork_proxy_request_duration_seconds", labels);
    }
    let counters: [CounterRow; 9] = [
        ("meshwork_proxy_retries_total", "Retries sent.", |m| {
            &m.retries
        }),
        (
            "meshwork_proxy_retries_budget_exhausted_total",
            "Retries not sent because the retry budget was used up.",
            |m| &m.retries_budget_exhausted,
        ),
        (
            "meshwork_proxy_ejections_total",
            "Endpoints ejected by outlier detection.",
            |m| &m.ejections,
        ),
        (
            "meshwork_proxy_upstream_connections_total",
            "Upstream connections opened.",
            |m| &m.connections,
        ),
        (
            "meshwork_proxy_connect_failures_total",
            "Upstream connection attempts that failed.",
            |m| &m.connect_failures,
        ),
        (
            "meshwork_proxy_tcp_received_bytes_total",
            "TCP bytes from the downstream client.",
            |m| &m.bytes_in,
        ),
        (
            "meshwork_proxy_tcp_sent_bytes_total",
            "TCP bytes to the downstream client.",
            |m| &m.bytes_out,
        ),
        (
            "meshwork_proxy_downstream_refused_total",
            "Client connections refused at the listener's connection limit.",
            |m| &m.downstream_refused,
        ),
        (
            "meshwork_proxy_downstream_evicted_total",
            "Idle client connections closed to make room at the listener's connection limit.",
            |m| &m.downstream_evicted,
        ),
    ];
    for (metric, text, get) in counters {
        help(&mut out, metric, "counter", text);
        for (labels, m, _) in &clusters {
            let _ = writeln!(
                out,
                "{metric}{{{labels}}} {}",
                get(m).load(Ordering::Relaxed)
            );
        }
    }
    let gauges: [GaugeRow; 7] = [
        (
            "meshwork_proxy_requests_active",
            "Requests (TCP: connections) in flight.",
            |g| g.requests_active,
        ),
        (
            "meshwork_proxy_requests_pending",
            "Requests waiting for the upstream's response head.",
            |g| g.pending,
        ),
        (
            "meshwork_proxy_upstream_connections_active",
            "Upstream connections open.",
            |g| g.connections_active,
        ),
        (
            "meshwork_proxy_downstream_connections_active",
            "Client connections open on the listener.",
            |g| g.downstream_active,
        ),
        ("meshwork_proxy_endpoints", "Endpoints known.", |g| {
            g.endpoints
        }),
        (
            "meshwork_proxy_endpoints_healthy",
            "Endpoints passing or warning.",
            |g| g.endpoints_healthy,
        ),
        (
            "meshwork_proxy_endpoints_ejected",
            "Endpoints ejected now.",
            |g| g.endpoints_ejected,
        ),
    ];
    for (metric, text, get) in gauges {
        help(&mut out, metric, "gauge", text);
        for (labels, _, g) in &clusters {
            let _ = writeln!(out, "{metric}{{{labels}}} {}", get(g));
        }
    }
    help(
        &mut out,
        "meshwork_sidecar_registry_streams",
        "gauge",
        "Discovery watch streams by state (connected to a registry server or not).",
    );
    let (up, total) = registry_streams;
    let _ = writeln!(
        out,
        "meshwork_sidecar_registry_streams{{state=\"connected\"}} {up}\nmeshwork_sidecar_registry_streams{{state=\"disconnected\"}} {}",
        total.saturating_sub(up)
    );
    help(
        &mut out,
        "meshwork_sidecar_registry_connected",
        "gauge",
        "1 when every discovery stream is connected (0: routing on last known endpoints).",
    );
    let _ = writeln!(
        out,
        "meshwork_sidecar_registry_connected {}",
        u8::from(up == total)
    );
    help(
        &mut out,
        "meshwork_proxy_draining",
        "gauge",
        "1 after SIGTERM while in-flight requests finish.",
    );
    let _ = writeln!(out, "meshwork_proxy_draining {}", u8::from(draining));
    out
}

/// One access-log line (JSON on stdout).
#[derive(Debug, Serialize)]
pub struct AccessLog<'a> {
    pub ts_unix_ms: u64,
    pub direction: &'a str,
    pub upstream: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    pub outcome: &'static str,
    pub endpoint: Option<String>,
    pub attempts: u32,
    pub duration_ms: f64,
    pub request_id: Option<&'a str>,
    pub traceparent: Option<&'a str>,
    /// Inbound: the caller's service, from its mesh certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<&'a str>,
    /// Inbound: the intention that decided (e.g. `web -> api`,
    /// `default`), allowed or denied as `outcome` says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intention: Option<&'a str>,
}

impl AccessLog<'_> {
    pub fn write(&self) {
        if let Ok(line) = serde_json::to_string(self) {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
        }
    }
}

pub fn unix_secs() -> u64 {
    unix_ms() / 1000
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
