//! Process-wide metrics, rendered as Prometheus text at `/metrics` and
//! `/v1/agent/metrics?format=prometheus` (and as Consul-shaped JSON at
//! `/v1/agent/metrics`). Counters are plain atomics or small maps behind a
//! mutex touched once per request; nothing here blocks a request on I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use meshwork_core::prometheus::{self, Buckets, escape};

/// The registry's latency buckets: 0.1 ms to 5 s (a write's stages take
/// tenths of a millisecond each).
#[derive(Debug)]
pub struct Latency;

impl Buckets for Latency {
    const UPPER_MICROS: &'static [u64] = &[
        100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
        1_000_000, 5_000_000,
    ];
}

type Histogram = prometheus::Histogram<Latency>;

/// What the node reports of itself at a scrape (read by
/// [`crate::cluster::RegistryNode::readings`]; metrics itself is a leaf and
/// knows nothing of the node).
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeReadings {
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub is_leader: bool,
    pub services: usize,
    pub nodes: usize,
    pub keys: usize,
    pub tombstones: usize,
}

/// (method, status) -> latency histogram.
type ByMethodStatus = BTreeMap<(&'static str, u16), Histogram>;

/// Everything counted.
#[derive(Debug, Default)]
pub struct Metrics {
    /// route -> (method, status) -> latency histogram (its count is the
    /// count). Two levels so that a request allocates nothing once its
    /// series exists.
    http: Mutex<BTreeMap<String, ByMethodStatus>>,
    /// (query type, rcode) -> answers.
    dns: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// gRPC method -> status code name -> latency histogram (public
    /// services; time until the response headers, so a stream counts its
    /// setup, and a status sent later in its trailers is not seen).
    grpc: Mutex<BTreeMap<&'static str, BTreeMap<&'static str, Histogram>>>,
    /// Raft log appends: from the append to the sync that made it durable.
    raft_append: Histogram,
    /// State machine: one call applying a batch of committed entries.
    raft_apply: Histogram,
    /// A write proposed on the leader, until it was committed and applied.
    raft_write: Histogram,
    /// AppendEntries with entries, leader to one follower and back (the
    /// follower's append and sync included).
    raft_replicate: Histogram,
    pub blocking_queries: AtomicI64,
    pub watch_subscribers: AtomicI64,
    pub leader_changes: AtomicU64,
    /// Elections this server called because its leader's port refused
    /// connections (see `cluster::failover`).
    pub fast_elections: AtomicU64,
    /// Mesh leaf certificates signed by this server.
    pub leaves_signed: AtomicU64,
    /// DNS answers sent from the answer cache, made anew, and the
    /// cache's size.
    pub dns_cache_hits: AtomicU64,
    pub dns_cache_misses: AtomicU64,
    pub dns_cache_bytes: AtomicU64,
    snapshot_bytes: AtomicU64,
    snapshot_millis: AtomicU64,
    snapshots: AtomicU64,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Decrements a gauge when dropped.
#[derive(Debug)]
pub struct GaugeGuard(&'static AtomicI64);

impl GaugeGuard {
    pub fn new(gauge: &'static AtomicI64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn http_request(&self, route: &str, method: &str, status: u16, took: Duration) {
        let method = match method {
            "GET" => "GET",
            "PUT" => "PUT",
            "POST" => "POST",
            "DELETE" => "DELETE",
            "HEAD" => "HEAD",
            "PATCH" => "PATCH",
            "OPTIONS" => "OPTIONS",
            _ => "OTHER",
        };
        let mut http = lock(&self.http);
        let by_route = match http.get_mut(route) {
            Some(m) => m,
            None => http.entry(route.to_owned()).or_default(),
        };
        by_route.entry((method, status)).or_default().observe(took);
    }

    /// A public gRPC call: `path` is `/package.Service/Method`, `code` the
    /// gRPC status code number from the response headers (absent: OK).
    pub fn grpc_request(&self, path: &str, code: Option<&str>, took: Duration) {
        // Only the methods we serve get their own series: a peer sending
        // random paths must not grow the map.
        const METHODS: [&str; 6] = [
            "/meshwork.v1.Watch/Subscribe",
            "/meshwork.v1.Agent/Register",
            "/meshwork.v1.Agent/UpdateCheck",
            "/meshwork.v1.Agent/Deregister",
            "/meshwork.v1.Agent/Heartbeat",
            "/meshwork.v1.Registry/Status",
        ];
        let method = METHODS.into_iter().find(|m| *m == path).unwrap_or("other");
        const CODES: [&str; 17] = [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ];
        let code = match code {
            None => "OK",
            Some(c) => c
                .parse::<usize>()
                .ok()
                .and_then(|c| CODES.get(c).copied())
                .unwrap_or("UNKNOWN"),
        };
        lock(&self.grpc)
            .entry(method)
            .or_default()
            .entry(code)
            .or_default()
            .observe(took);
    }

    /// A batch of log entries became durable `took` after its append.
    pub fn raft_appended(&self, took: Duration) {
        self.raft_append.observe(took);
    }

    /// The state machine applied a batch of entries in `took`.
    pub fn raft_applied(&self, took: Duration) {
        self.raft_apply.observe(took);
    }

    /// A write proposed on this leader was committed and applied `took`
    /// after it was handed to the write batcher.
    pub fn raft_written(&self, took: Duration) {
        self.raft_write.observe(took);
    }

    /// An AppendEntries carrying entries was answered `took` after it was
    /// sent.
    pub fn raft_replicated(&self, took: Duration) {
        self.raft_replicate.observe(took);
    }

    /// An answer from the DNS answer cache (`hit`) or made anew.
    pub fn dns_cache(&self, hit: bool) {
        if hit {
            self.dns_cache_hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.dns_cache_misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn dns_cache_bytes(&self, bytes: usize) {
        self.dns_cache_bytes.store(bytes as u64, Ordering::Relaxed);
    }

    pub fn dns_answer(&self, qtype: &'static str, rcode: &'static str) {
        *lock(&self.dns).entry((qtype, rcode)).or_default() += 1;
    }

    pub fn snapshot_built(&self, bytes: usize, took: Duration) {
        self.snapshot_bytes.store(bytes as u64, Ordering::Relaxed);
        self.snapshot_millis
            .store(took.as_millis() as u64, Ordering::Relaxed);
        self.snapshots.fetch_add(1, Ordering::Relaxed);
    }

    /// The gauges that describe the node, as (name, help, value).
    fn gauges(&self, node: &NodeReadings) -> Vec<(&'static str, &'static str, f64)> {
        vec![
            ("meshwork_raft_term", "Current Raft term.", node.term as f64),
            (
                "meshwork_raft_last_log_index",
                "Index of the last entry in this server's log.",
                node.last_log_index as f64,
            ),
            (
                "meshwork_raft_applied_index",
                "Index of the last entry applied to the state machine.",
                node.applied_index as f64,
            ),
            (
                "meshwork_raft_snapshot_index",
                "Index covered by the latest snapshot.",
                node.snapshot_index as f64,
            ),
            (
                "meshwork_raft_is_leader",
                "1 when this server leads.",
                f64::from(u8::from(node.is_leader)),
            ),
            (
                "meshwork_raft_leader_changes_total",
                "Times the known leader changed since start.",
                self.leader_changes.load(Ordering::Relaxed) as f64,
            ),
            (
                "meshwork_raft_fast_elections_total",
                "Elections this server called because its leader's port refused connections.",
                self.fast_elections.load(Ordering::Relaxed) as f64,
            ),
            (
                "meshwork_connect_leaves_signed_total",
                "Mesh leaf certificates this server signed since start.",
                self.leaves_signed.load(Ordering::Relaxed) as f64,
            ),
            (
                "meshwork_dns_cache_hits_total",
                "DNS answers sent from the answer cache.",
                self.dns_cache_hits.load(Ordering::Relaxed) as f64,
            ),
            (
                "meshwork_dns_cache_misses_total",
                "DNS answers made anew (not in the answer cache, or out of date).",
                self.dns_cache_misses.load(Ordering::Relaxed) as f64,
            ),
            (
                "meshwork_dns_cache_bytes",
                "Bytes of answers kept by the DNS answer cache.",
                self.dns_cache_bytes.load(Ordering::Relaxed) as f64,
            ),
            (
                "meshwork_snapshots_total",
                "Snapshots built since start.",
                self.snapshots.load(Ordering::Relaxed) as f64,
            ),
            (
                "meshwork_snapshot_last_bytes",
                "Size of the last snapshot built.",
                self.snapshot_bytes.load(Ordering::Relaxed) as f64,
            ),
            (
                "meshwork_snapshot_last_seconds",
                "How long the last snapshot took to build.",
                self.snapshot_millis.load(Ordering::Relaxed) as f64 / 1000.0,
            ),
            (
                "meshwork_blocking_queries",
                "REST blocking queries parked right now.",
                self.blocking_queries.load(Ordering::Relaxed) as f64,
            ),
            (
                "meshwork_watch_subscribers",
                "gRPC watch streams open right now.",
                self.watch_subscribers.load(Ordering::Relaxed) as f64,
            ),
            (
                "meshwork_catalog_services",
                "Service names in the catalog.",
                node.services as f64,
            ),
            (
                "meshwork_catalog_nodes",
                "Nodes in the catalog.",
                node.nodes as f64,
            ),
            (
                "meshwork_kv_keys",
                "Keys in the KV store.",
                node.keys as f64,
            ),
            (
                "meshwork_kv_tombstones",
                "Deleted keys still remembered (reaped after tombstone_ttl_ms).",
                node.tombstones as f64,
            ),
        ]
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn prometheus(&self, node: &NodeReadings) -> String {
        let mut out = String::new();
        for (name, help, value) in self.gauges(node) {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshwork_http_request_duration_seconds REST requests by route, method and status.\n\
             # TYPE meshwork_http_request_duration_seconds histogram"
        );
        let http = lock(&self.http);
        let series = http.iter().flat_map(|(route, m)| {
            m.iter()
                .map(move |((method, status), h)| (route, method, status, h))
        });
        for (route, method, status, h) in series {
            let labels = format!(
                "route=\"{}\",method=\"{}\",status=\"{status}\"",
                escape(route),
                escape(method)
            );
            h.write(&mut out, "meshwork_http_request_duration_seconds", &labels);
        }
        let _ = writeln!(
            out,
            "# HELP meshwork_grpc_request_duration_seconds Public gRPC calls by method and status code (time to response headers).\n\
             # TYPE meshwork_grpc_request_duration_seconds histogram"
        );
        for (method, codes) in lock(&self.grpc).iter() {
            for (code, h) in codes {
                let labels = format!("method=\"{}\",code=\"{}\"", escape(method), escape(code));
                h.write(&mut out, "meshwork_grpc_request_duration_seconds", &labels);
            }
        }
        for (name, help, h) in [
            (
                "meshwork_raft_append_duration_seconds",
                "Raft log appends, from append to durable (fdatasync).",
                &self.raft_append,
            ),
            (
                "meshwork_raft_apply_duration_seconds",
                "State machine apply calls (a batch of committed entries each).",
                &self.raft_apply,
            ),
            (
                "meshwork_raft_write_duration_seconds",
                "Writes proposed on this leader, until committed and applied.",
                &self.raft_write,
            ),
            (
                "meshwork_raft_replicate_duration_seconds",
                "AppendEntries carrying entries, leader to a follower and back.",
                &self.raft_replicate,
            ),
        ] {
            prometheus::header(&mut out, name, "histogram", help);
            h.write(&mut out, name, "");
        }
        let _ = writeln!(
            out,
            "# HELP meshwork_dns_answers_total DNS answers by query type and rcode.\n\
             # TYPE meshwork_dns_answers_total counter"
        );
        for ((qtype, rcode), n) in lock(&self.dns).iter() {
            let _ = writeln!(
                out,
                "meshwork_dns_answers_total{{qtype=\"{}\",rcode=\"{}\"}} {n}",
                escape(qtype),
                escape(rcode)
            );
        }
        out
    }

    /// Consul's `/v1/agent/metrics` JSON shape (gauges and counters).
    pub fn consul_json(&self, node: &NodeReadings) -> serde_json::Value {
        let gauges: Vec<serde_json::Value> = self
            .gauges(node)
            .into_iter()
            .map(|(name, _, value)| serde_json::json!({"Name": name, "Value": value, "Labels": {}}))
            .collect();
        let counters: Vec<serde_json::Value> = lock(&self.http)
            .iter()
            .flat_map(|(route, m)| {
                m.iter()
                    .map(move |(k, h)| (route.clone(), *k, h.count(), h.sum_seconds()))
            })
            .map(|(route, (method, status), count, sum)| {
                serde_json::json!({
                    "Name": "meshwork_http_requests",
                    "Count": count,
                    "Sum": sum,
                    "Labels": {"route": route, "method": method, "status": status.to_string()},
                })
            })
            .collect();
        serde_json::json!({"Gauges": gauges, "Counters": counters, "Samples": []})
    }
}
