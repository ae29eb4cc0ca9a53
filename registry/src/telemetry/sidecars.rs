//! The sidecars reporting to this server, and what they have applied of
//! the registry's config (`Agent.ReportApplied`).
//!
//! In memory only, per server: a report is sent by a sidecar when what it
//! applied changes and every [`REPORT_EVERY`], to whichever server it is
//! connected to; no Raft write. A cluster-wide view is this table merged
//! with the other servers' (`RaftInternal.LocalSidecars`), done by the
//! API. Consistency: a sidecar that moved to another server may be listed
//! by both for a while; the merge keeps its freshest report. A server that
//! restarts forgets its sidecars until their next report (at most
//! [`REPORT_EVERY`] later).
//!
//! [`pending_kinds`] is the one judgement of whether a sidecar has applied
//! a config index.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meshwork_proto::v1::SidecarReport;
use tokio::sync::watch;

/// How often a sidecar reports when nothing changed (its side of the
/// contract; the sidecar's `policy::applied` uses the same period).
pub const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Without a report for this long a sidecar is listed as disconnected,
/// and it no longer holds up `/v1/mesh/propagation`.
pub const DISCONNECTED_AFTER: Duration = Duration::from_secs(30);
/// ...and after this long it is forgotten.
pub const FORGOTTEN_AFTER: Duration = Duration::from_secs(300);
/// Reports kept at most (one per sidecar; a server with more sidecars than
/// this refuses new ones until old ones are forgotten).
pub const MAX_SIDECARS: usize = 50_000;

/// A sidecar's last report and when it came.
#[derive(Debug, Clone)]
struct Reported {
    report: SidecarReport,
    received: Instant,
}

/// The sidecars reporting to this server. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Sidecars {
    by_instance: Mutex<HashMap<(String, String), Reported>>,
    /// Their traffic, per edge ([`super::topology`]).
    topology: super::topology::Topology,
    /// Bumped when a report changes what is listed (not by a report that
    /// only says "still here"): what blocking queries wait on.
    generation: watch::Sender<u64>,
}

impl Default for Sidecars {
    fn default() -> Self {
        Self {
            by_instance: Mutex::default(),
            topology: super::topology::Topology::default(),
            generation: watch::Sender::new(0),
        }
    }
}

/// Why a report was not kept.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("too many sidecars reporting to this server ({MAX_SIDECARS})")]
    Full,
}

impl Sidecars {
    /// Keeps `report` as its instance's latest.
    pub fn record(&self, mut report: SidecarReport) -> Result<(), ReportError> {
        // The traffic counts go to the topology; what is listed is the
        // rest (counts that move every report are not a change).
        let traffic = std::mem::take(&mut report.traffic);
        self.topology
            .record(&report.node, &report.service_id, &report.service, &traffic);
        let key = (report.node.clone(), report.service_id.clone());
        let now = Instant::now();
        let mut table = self.lock();
        let changed = match table.get_mut(&key) {
            Some(known) => {
                // Coming back after being listed as disconnected changes
                // what is listed too.
                let changed = known.report != report
                    || now.duration_since(known.received) >= DISCONNECTED_AFTER;
                known.report = report;
                known.received = now;
                changed
            }
            None => {
                if table.len() >= MAX_SIDECARS {
                    forget_old(&mut table, now);
                    if table.len() >= MAX_SIDECARS {
                        return Err(ReportError::Full);
                    }
                }
                table.insert(
                    key,
                    Reported {
                        report,
                        received: now,
                    },
                );
                true
            }
        };
        drop(table);
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
        Ok(())
    }

    /// The traffic of the sidecars reporting here.
    pub fn topology(&self) -> &super::topology::Topology {
        &self.topology
    }

    /// Forgets an instance (it deregistered).
    pub fn remove(&self, node: &str, service_id: &str) {
        self.topology.forget(node, service_id);
        let removed = self
            .lock()
            .remove(&(node.to_owned(), service_id.to_owned()))
            .is_some();
        if removed {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Every sidecar known here with the time since its last report
    /// (those past [`FORGOTTEN_AFTER`] are dropped on the way).
    pub fn local(&self) -> Vec<(SidecarReport, Duration)> {
        self.local_matching(|_| true)
    }

    /// [`Sidecars::local`], only the reports `keep` wants (the others are
    /// not copied).
    pub fn local_matching(
        &self,
        keep: impl Fn(&SidecarReport) -> bool,
    ) -> Vec<(SidecarReport, Duration)> {
        let now = Instant::now();
        let mut table = self.lock();
        forget_old(&mut table, now);
        table
            .values()
            .filter(|r| keep(&r.report))
            .map(|r| (r.report.clone(), now.duration_since(r.received)))
            .collect()
    }

    /// Changes when what [`Sidecars::local`] lists changes (a sidecar
    /// reporting something new, arriving or leaving). A sidecar going
    /// quiet is not a change here: a waiter also wakes on its own clock.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Reported>> {
        self.by_instance.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn forget_old(table: &mut HashMap<(String, String), Reported>, now: Instant) {
    table.retain(|_, r| now.duration_since(r.received) < FORGOTTEN_AFTER);
}

/// The config kinds `report` has not applied index `index` of: those whose
/// applied index is below `index` and below the kind's last change
/// (`kind_index`, from a state at or past `index`). A kind that has not
/// changed since the sidecar applied it needs nothing; a kind changed
/// after `index` needs at least `index` (the sidecar may already be past
/// it). Kinds the sidecar does not follow do not concern it.
pub fn pending_kinds(
    report: &SidecarReport,
    index: u64,
    kind_index: impl Fn(&str) -> u64,
) -> Vec<String> {
    let mut pending: Vec<String> = report
        .applied
        .iter()
        .filter(|(kind, applied)| **applied < index.min(kind_index(kind)))
        .map(|(kind, _)| kind.clone())
        .collect();
    pending.sort();
    pending
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, applied: &[(&str, u64)]) -> SidecarReport {
        SidecarReport {
            node: node.into(),
            service_id: "web-1".into(),
            service: "web".into(),
            applied: applied.iter().map(|(k, i)| ((*k).into(), *i)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_kind_is_pending_until_applied_as_of_its_last_change_or_the_index() {
        let kinds = |kind: &str| match kind {
            "service-router" => 40,
            "service-splitter" => 55,
            _ => 0,
        };
        let r = report("n1", &[("service-router", 40), ("service-splitter", 50)]);
        // Index 45: the splitter changed after it, at 55; 50 ≥ 45 covers it.
        assert!(pending_kinds(&r, 45, kinds).is_empty());
        // Index 55: the splitter's change at 55 is not applied yet.
        assert_eq!(pending_kinds(&r, 55, kinds), ["service-splitter"]);
        // Index 60: the router has not changed since 40, which it has.
        assert_eq!(pending_kinds(&r, 60, kinds), ["service-splitter"]);
        let r = report("n1", &[("service-router", 40), ("service-splitter", 55)]);
        assert!(pending_kinds(&r, 60, kinds).is_empty());
        // A kind that never had an entry (index 0) needs nothing.
        let r = report("n1", &[("service-resolver", 0)]);
        assert!(pending_kinds(&r, 60, kinds).is_empty());
    }

    #[test]
    fn only_a_changed_report_is_a_change() {
        let sidecars = Sidecars::default();
        let changes = sidecars.changes();
        sidecars.record(report("n1", &[("a", 1)])).expect("kept");
        assert_eq!(*changes.borrow(), 1);
        sidecars.record(report("n1", &[("a", 1)])).expect("kept");
        assert_eq!(*changes.borrow(), 1, "the same report again");
        sidecars.record(report("n1", &[("a", 2)])).expect("kept");
        assert_eq!(*changes.borrow(), 2);
        assert_eq!(sidecars.local().len(), 1);
        sidecars.remove("n1", "web-1");
        assert_eq!(*changes.borrow(), 3);
        assert!(sidecars.local().is_empty());
        sidecars.remove("n1", "web-1");
        assert_eq!(*changes.borrow(), 3, "nothing to remove");
    }
}
