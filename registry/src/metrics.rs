//! Process-wide metrics, rendered as Prometheus text at `/metrics` and
//! `/v1/agent/metrics?format=prometheus` (and as Consul-shaped JSON at
//! `/v1/agent/metrics`). Counters are plain atomics or small maps behind a
//! mutex touched once per request; nothing here blocks a request on I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use crate::node::RegistryNode;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
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
    raft_append: Mutex<Histogram>,
    /// State machine: one call applying a batch of committed entries.
    raft_apply: Mutex<Histogram>,
    pub blocking_queries: AtomicI64,
    pub watch_subscribers: AtomicI64,
    pub leader_changes: AtomicU64,
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
        by_route
            .entry((method, status))
            .or_default()
            .observe(took.as_secs_f64());
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
            .observe(took.as_secs_f64());
    }

    /// A batch of log entries became durable `took` after its append.
    pub fn raft_appended(&self, took: Duration) {
        lock(&self.raft_append).observe(took.as_secs_f64());
    }

    /// The state machine applied a batch of entries in `took`.
    pub fn raft_applied(&self, took: Duration) {
        lock(&self.raft_apply).observe(took.as_secs_f64());
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
    fn gauges(&self, node: &RegistryNode) -> Vec<(&'static str, &'static str, f64)> {
        let m = node.raft.metrics().borrow().clone();
        let (services, nodes, keys, tombstones) = {
            let state = node.state.read();
            (
                state.catalog.service_names().len(),
                state.catalog.nodes().count(),
                state.kv.len(),
                state.kv.tombstones(),
            )
        };
        vec![
            (
                "meshwork_raft_term",
                "Current Raft term.",
                m.current_term as f64,
            ),
            (
                "meshwork_raft_last_log_index",
                "Index of the last entry in this server's log.",
                m.last_log_index.unwrap_or(0) as f64,
            ),
            (
                "meshwork_raft_applied_index",
                "Index of the last entry applied to the state machine.",
                m.last_applied.map_or(0, |l| l.index) as f64,
            ),
            (
                "meshwork_raft_snapshot_index",
                "Index covered by the latest snapshot.",
                m.snapshot.map_or(0, |l| l.index) as f64,
            ),
            (
                "meshwork_raft_is_leader",
                "1 when this server leads.",
                f64::from(u8::from(node.is_leader())),
            ),
            (
                "meshwork_raft_leader_changes_total",
                "Times the known leader changed since start.",
                self.leader_changes.load(Ordering::Relaxed) as f64,
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
                services as f64,
            ),
            (
                "meshwork_catalog_nodes",
                "Nodes in the catalog.",
                nodes as f64,
            ),
            ("meshwork_kv_keys", "Keys in the KV store.", keys as f64),
            (
                "meshwork_kv_tombstones",
                "Deleted keys still remembered (reaped after tombstone_ttl_ms).",
                tombstones as f64,
            ),
        ]
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn prometheus(&self, node: &RegistryNode) -> String {
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
            write_histogram(
                &mut out,
                "meshwork_http_request_duration_seconds",
                &labels,
                h,
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshwork_grpc_request_duration_seconds Public gRPC calls by method and status code (time to response headers).\n\
             # TYPE meshwork_grpc_request_duration_seconds histogram"
        );
        for (method, codes) in lock(&self.grpc).iter() {
            for (code, h) in codes {
                let labels = format!("method=\"{}\",code=\"{}\"", escape(method), escape(code));
                write_histogram(
                    &mut out,
                    "meshwork_grpc_request_duration_seconds",
                    &labels,
                    h,
                );
            }
        }
        for (name, help, h) in [
            (
                "meshwork_raft_append_duration_seconds",
                "Raft log appends, from append to durable (fdatasync).",
                lock(&self.raft_append).clone(),
            ),
            (
                "meshwork_raft_apply_duration_seconds",
                "State machine apply calls (a batch of committed entries each).",
                lock(&self.raft_apply).clone(),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            write_histogram(&mut out, name, "", &h);
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
    pub fn consul_json(&self, node: &RegistryNode) -> serde_json::Value {
        let gauges: Vec<serde_json::Value> = self
            .gauges(node)
            .into_iter()
            .map(|(name, _, value)| serde_json::json!({"Name": name, "Value": value, "Labels": {}}))
            .collect();
        let counters: Vec<serde_json::Value> = lock(&self.http)
            .iter()
            .flat_map(|(route, m)| m.iter().map(move |(k, h)| (route.clone(), *k, h.clone())))
            .map(|(route, (method, status), h)| {
                serde_json::json!({
                    "Name": "meshwork_http_requests",
                    "Count": h.count,
                    "Sum": h.sum,
                    "Labels": {"route": route, "method": method, "status": status.to_string()},
                })
            })
            .collect();
        serde_json::json!({"Gauges": gauges, "Counters": counters, "Samples": []})
    }
}

/// One histogram series (`labels` without braces, possibly empty).
fn write_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (bound, count) in BUCKETS.iter().zip(h.counts) {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
    }
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}\n{name}_sum{braces} {}\n{name}_count{braces} {}",
        h.count, h.sum, h.count
    );
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(0.0004);
        h.observe(0.02);
        h.observe(9.0);
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[5], 2);
        assert_eq!(h.counts[BUCKETS.len() - 1], 2);
        assert_eq!(h.count, 3);
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}
