//! Who calls whom, how often, how fast and how often it fails: the
//! sidecars' traffic, kept per server in memory (no Raft write).
//!
//! Each sidecar's report (every 10 s) carries its cumulative counts per
//! edge (`TrafficEdge`); this server keeps each sidecar's previous counts
//! and adds the difference into the edge's 10-second slot. An edge is
//! (caller service, direction, called service); the last 15 minutes of
//! slots are kept, so memory grows with the edges (service pairs), not
//! with the sidecars: a slot is a few dozen counters. A sidecar whose
//! counts went back (it restarted, or a listener was replaced) counts
//! nothing for that report. At most [`MAX_EDGES`] edges are kept; a new
//! one beyond is dropped and counted.
//!
//! `/v1/mesh/topology` sums every server's slots over the window asked
//! (`RaftInternal.LocalTopology`). A sidecar reports to one server at a
//! time; after it moves, its first report to the new server counts
//! nothing (no previous counts there).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshwork_proto::v1::{TopologyEdge, TrafficEdge};

/// The width of a slot.
pub const SLOT: Duration = Duration::from_secs(10);
/// How far back slots are kept (and the longest window).
pub const KEPT: Duration = Duration::from_secs(15 * 60);
/// Edges kept at most.
pub const MAX_EDGES: usize = 20_000;
/// Sidecars whose previous counts are kept at most.
const MAX_SIDECARS: usize = 50_000;

/// (caller service, direction, called service).
type EdgeKey = (String, String, String);

/// One slot's counts of one edge.
#[derive(Debug, Clone, Default)]
struct Counts {
    by_class: Vec<u64>,
    latency_le_us: Vec<u64>,
    latency_counts: Vec<u64>,
}

impl Counts {
    fn add(&mut self, by_class: &[u64], le: &[u64], counts: &[u64]) {
        add_into(&mut self.by_class, by_class);
        if self.latency_le_us.is_empty() {
            self.latency_le_us = le.to_vec();
        }
        // Buckets of another layout (another sidecar version) are not mixed.
        if self.latency_le_us == le {
            add_into(&mut self.latency_counts, counts);
        }
    }
}

fn add_into(sum: &mut Vec<u64>, more: &[u64]) {
    if sum.len() < more.len() {
        sum.resize(more.len(), 0);
    }
    for (s, m) in sum.iter_mut().zip(more) {
        *s = s.saturating_add(*m);
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Per sidecar (node, service id): its service and last cumulative
    /// counts per (direction, service).
    previous: HashMap<(String, String), HashMap<(String, String), TrafficEdge>>,
    /// Per edge: (slot number, counts), oldest first.
    slots: HashMap<EdgeKey, VecDeque<(u64, Counts)>>,
}

/// This server's traffic table.
#[derive(Debug, Default)]
pub struct Topology {
    inner: std::sync::Mutex<Inner>,
    /// When the table started (covered time is at most since then).
    started: std::sync::OnceLock<SystemTime>,
    pub dropped_edges: AtomicU64,
}

fn slot_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) / SLOT.as_secs()
}

/// `now - then` per element; `None` when any went back (a restart).
fn delta(now: &[u64], then: &[u64]) -> Option<Vec<u64>> {
    if then.len() > now.len() {
        return None;
    }
    now.iter()
        .enumerate()
        .map(|(i, n)| n.checked_sub(then.get(i).copied().unwrap_or(0)))
        .collect()
}

impl Topology {
    /// Takes a sidecar's report of `traffic` (its service `service`).
    pub fn record(&self, node: &str, service_id: &str, service: &str, traffic: &[TrafficEdge]) {
        self.record_at(SystemTime::now(), node, service_id, service, traffic);
    }

    fn record_at(
        &self,
        now: SystemTime,
        node: &str,
        service_id: &str,
        service: &str,
        traffic: &[TrafficEdge],
    ) {
        self.started.get_or_init(|| now);
        let slot = slot_of(now);
        let oldest = slot.saturating_sub(KEPT.as_secs() / SLOT.as_secs());
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (node.to_owned(), service_id.to_owned());
        if !inner.previous.contains_key(&key) && inner.previous.len() >= MAX_SIDECARS {
            return;
        }
        let current: HashMap<(String, String), TrafficEdge> = traffic
            .iter()
            .map(|e| ((e.direction.clone(), e.service.clone()), e.clone()))
            .collect();
        let previous = inner.previous.insert(key, current).unwrap_or_default();
        for edge in traffic {
            let Some(before) = previous.get(&(edge.direction.clone(), edge.service.clone())) else {
                // Its first report here: the counts so far are not this
                // slot's.
                continue;
            };
            let (Some(classes), Some(latency)) = (
                delta(&edge.by_class, &before.by_class),
                delta(&edge.latency_counts, &before.latency_counts),
            ) else {
                continue;
            };
            if classes.iter().all(|n| *n == 0) {
                continue;
            }
            let source = if edge.direction == "outbound" {
                service.to_owned()
            } else {
                String::new()
            };
            let edge_key = (source, edge.direction.clone(), edge.service.clone());
            if !inner.slots.contains_key(&edge_key) && inner.slots.len() >= MAX_EDGES {
                self.dropped_edges.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let ring = inner.slots.entry(edge_key).or_default();
            while ring.front().is_some_and(|(s, _)| *s < oldest) {
                ring.pop_front();
            }
            if ring.back().is_none_or(|(s, _)| *s != slot) {
                ring.push_back((slot, Counts::default()));
            }
            if let Some((_, counts)) = ring.back_mut() {
                counts.add(&classes, &edge.latency_le_us, &latency);
            }
        }
    }

    /// A sidecar that left: its previous counts go.
    pub fn forget(&self, node: &str, service_id: &str) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .previous
            .remove(&(node.to_owned(), service_id.to_owned()));
    }

    /// Every edge's counts over the last `window` (whole slots, the
    /// current one included), and the seconds that covers.
    pub fn window(&self, window: Duration) -> (Vec<TopologyEdge>, f64) {
        self.window_at(SystemTime::now(), window)
    }

    fn window_at(&self, now: SystemTime, window: Duration) -> (Vec<TopologyEdge>, f64) {
        let window = window.clamp(SLOT, KEPT);
        let slot = slot_of(now);
        let slots = window.as_secs().div_ceil(SLOT.as_secs());
        let first = slot.saturating_sub(slots.saturating_sub(1));
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = slot.saturating_sub(KEPT.as_secs() / SLOT.as_secs());
        inner.slots.retain(|_, ring| {
            while ring.front().is_some_and(|(s, _)| *s < oldest) {
                ring.pop_front();
            }
            !ring.is_empty()
        });
        let mut out = Vec::new();
        for ((source, direction, service), ring) in &inner.slots {
            let mut sum = Counts::default();
            for (_, counts) in ring.iter().filter(|(s, _)| *s >= first) {
                sum.add(
                    &counts.by_class,
                    &counts.latency_le_us,
                    &counts.latency_counts,
                );
            }
            if sum.by_class.iter().all(|n| *n == 0) {
                continue;
            }
            out.push(TopologyEdge {
                source: source.clone(),
                direction: direction.clone(),
                service: service.clone(),
                by_class: sum.by_class,
                latency_le_us: sum.latency_le_us,
                latency_counts: sum.latency_counts,
            });
        }
        // The window's span: from the first slot's start to now, no more
        // than the table has been filling.
        let into_slot = now
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() % SLOT.as_secs_f64());
        let span = (slots - 1) as f64 * SLOT.as_secs_f64() + into_slot;
        let up = self
            .started
            .get()
            .and_then(|s| now.duration_since(*s).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        (out, span.min(up).max(1.0))
    }

    /// `/metrics` lines: edges kept, their approximate memory, edges
    /// dropped at the bound.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let edges = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .slots
            .len();
        let _ = write!(
            out,
            "# HELP meshwork_topology_edges Traffic edges this server keeps (its sidecars' calls, per caller and service).\n# TYPE meshwork_topology_edges gauge\nmeshwork_topology_edges {edges}\n# HELP meshwork_topology_bytes Approximate memory of the traffic table.\n# TYPE meshwork_topology_bytes gauge\nmeshwork_topology_bytes {}\n# HELP meshwork_topology_dropped_edges_total Edges not kept: the table was at its bound.\n# TYPE meshwork_topology_dropped_edges_total counter\nmeshwork_topology_dropped_edges_total {}\n",
            self.approximate_bytes(),
            self.dropped_edges.load(Ordering::Relaxed)
        );
    }

    /// Bytes the table holds, roughly (for the cost measurement).
    pub fn approximate_bytes(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let counters =
            |c: &Counts| (c.by_class.len() + c.latency_le_us.len() + c.latency_counts.len()) * 8;
        let slots: usize = inner
            .slots
            .iter()
            .map(|(k, ring)| {
                k.0.len()
                    + k.1.len()
                    + k.2.len()
                    + ring.iter().map(|(_, c)| 16 + counters(c)).sum::<usize>()
            })
            .sum();
        let previous: usize = inner
            .previous
            .values()
            .map(|edges| {
                edges
                    .values()
                    .map(|e| {
                        64 + (e.by_class.len() + e.latency_le_us.len() + e.latency_counts.len()) * 8
                    })
                    .sum::<usize>()
            })
            .sum();
        slots + previous
    }
}

/// What an edge's counts say: requests a second, the share of 5xx (of
/// answers with a status; a connection or proxy failure without one
/// counts as an error too), p50 and p99 latency in milliseconds (the
/// upper bound of the bucket the quantile falls in).
pub fn summary(edge: &TopologyEdge, seconds: f64) -> (f64, f64, Option<f64>, Option<f64>) {
    let total: u64 = edge.by_class.iter().sum();
    let errors =
        edge.by_class.get(5).copied().unwrap_or(0) + edge.by_class.first().copied().unwrap_or(0);
    let rate = total as f64 / seconds.max(1.0);
    let error_rate = if total == 0 {
        0.0
    } else {
        errors as f64 / total as f64
    };
    let quantile = |q: f64| {
        let n: u64 = edge.latency_counts.iter().sum();
        if n == 0 {
            return None;
        }
        let want = (q * n as f64).ceil() as u64;
        let mut seen = 0;
        for (le, c) in edge.latency_le_us.iter().zip(&edge.latency_counts) {
            seen += c;
            if seen >= want {
                return Some(if *le == u64::MAX {
                    f64::INFINITY
                } else {
                    *le as f64 / 1000.0
                });
            }
        }
        None
    };
    (rate, error_rate, quantile(0.5), quantile(0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(
        direction: &str,
        service: &str,
        ok: u64,
        failed: u64,
        fast: u64,
        slow: u64,
    ) -> TrafficEdge {
        TrafficEdge {
            direction: direction.into(),
            service: service.into(),
            by_class: vec![0, 0, ok, 0, 0, failed],
            latency_le_us: vec![1_000, 100_000, u64::MAX],
            latency_counts: vec![fast, slow, 0],
        }
    }

    #[test]
    fn reports_become_per_edge_slots_and_windows() {
        let t = Topology::default();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Two web sidecars calling api; the first report is a baseline.
        for id in ["web-1", "web-2"] {
            t.record_at(
                at(0),
                "n",
                id,
                "web",
                &[edge("outbound", "api", 100, 0, 100, 0)],
            );
        }
        t.record_at(
            at(10),
            "n",
            "web-1",
            "web",
            &[edge("outbound", "api", 190, 10, 190, 10)],
        );
        t.record_at(
            at(10),
            "n",
            "web-2",
            "web",
            &[edge("outbound", "api", 200, 0, 150, 50)],
        );
        let (edges, seconds) = t.window_at(at(15), Duration::from_secs(60));
        assert_eq!(edges.len(), 1);
        let e = &edges[0];
        assert_eq!(
            (e.source.as_str(), e.direction.as_str(), e.service.as_str()),
            ("web", "outbound", "api")
        );
        assert_eq!(e.by_class, vec![0, 0, 190, 0, 0, 10]);
        assert_eq!(seconds, 15.0, "only as long as the table has filled");
        let (rate, errors, p50, p99) = summary(e, seconds);
        assert!((rate - 200.0 / 15.0).abs() < 1e-9);
        assert!((errors - 0.05).abs() < 1e-9);
        assert_eq!((p50, p99), (Some(1.0), Some(100.0)));
        // A restart (counts back to small): nothing for that report.
        t.record_at(
            at(20),
            "n",
            "web-1",
            "web",
            &[edge("outbound", "api", 5, 0, 5, 0)],
        );
        let (edges, _) = t.window_at(at(25), Duration::from_secs(60));
        assert_eq!(edges[0].by_class[2], 190);
        // Out of the window: gone from it; out of 15 minutes: gone.
        let (edges, _) = t.window_at(at(200), Duration::from_secs(60));
        assert!(edges.is_empty());
        let (edges, _) = t.window_at(at(200), Duration::from_secs(900));
        assert_eq!(edges.len(), 1);
        let (edges, _) = t.window_at(at(1000), Duration::from_secs(900));
        assert!(edges.is_empty());
        assert!(t.approximate_bytes() > 0);
    }
}
