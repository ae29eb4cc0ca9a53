//! What this sidecar has applied of the registry's config entries, for
//! the report the agent sends (`Agent.ReportApplied`, see
//! `agent::report_applied`): each user of entries (an upstream's discovery
//! chain, the intentions, the rate limits) is a [`Consumer`] that says,
//! each time it installs new tables, the index of every kind's entries it
//! compiled them from, and what it refused.
//!
//! The sidecar's applied index of a kind is the lowest among its
//! consumers: a change counts as applied once every table that depends on
//! it has been rebuilt. A consumer starts at 0 for each of its kinds, so a
//! sidecar still waiting for its first entries is behind, not current.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use meshwork_proto::v1::RefusedEntry;
use tokio::sync::watch;

/// Every consumer's latest; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppliedConfig {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    consumers: Mutex<BTreeMap<u64, State>>,
    next_id: AtomicU64,
    /// Bumped on every change of what [`AppliedConfig::summary`] returns.
    changed: watch::Sender<u64>,
}

#[derive(Debug, Clone)]
struct State {
    scope: String,
    kinds: BTreeMap<&'static str, u64>,
    refused: Option<(String, u64)>,
}

impl Default for AppliedConfig {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                consumers: Mutex::default(),
                next_id: AtomicU64::new(0),
                changed: watch::Sender::new(0),
            }),
        }
    }
}

/// The sidecar as a whole: the lowest applied index of each kind, and
/// every consumer's refusal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub applied: BTreeMap<String, u64>,
    pub refused: Vec<RefusedEntry>,
}

impl AppliedConfig {
    /// A new consumer of `kinds`, named `scope` in refusals (e.g.
    /// "upstream api"); it counts until dropped.
    pub fn consumer(&self, scope: impl Into<String>, kinds: &[&'static str]) -> Consumer {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let state = State {
            scope: scope.into(),
            kinds: kinds.iter().map(|k| (*k, 0)).collect(),
            refused: None,
        };
        self.lock().insert(id, state);
        self.bump();
        Consumer {
            config: self.clone(),
            id,
        }
    }

    pub fn summary(&self) -> Summary {
        let consumers = self.lock();
        let mut applied: BTreeMap<String, u64> = BTreeMap::new();
        for state in consumers.values() {
            for (kind, index) in &state.kinds {
                applied
                    .entry((*kind).to_owned())
                    .and_modify(|i| *i = (*i).min(*index))
                    .or_insert(*index);
            }
        }
        let refused = consumers
            .values()
            .filter_map(|s| {
                let (reason, index) = s.refused.as_ref()?;
                Some(RefusedEntry {
                    scope: s.scope.clone(),
                    reason: reason.clone(),
                    index: *index,
                })
            })
            .collect();
        Summary { applied, refused }
    }

    /// Changes whenever the summary may have.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, State>> {
        self.inner
            .consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.inner.changed.send_modify(|g| *g = g.wrapping_add(1));
    }
}

/// One user of config entries (see the module's doc).
#[derive(Debug)]
pub struct Consumer {
    config: AppliedConfig,
    id: u64,
}

impl Consumer {
    /// Its tables now reflect the entries of each kind as of the index
    /// given; `refused` says why the latest were not installed (the
    /// previous tables stay), `None` once they are.
    pub fn applied(&self, indexes: &[(&'static str, u64)], refused: Option<String>) {
        {
            let mut consumers = self.config.lock();
            let Some(state) = consumers.get_mut(&self.id) else {
                return;
            };
            for (kind, index) in indexes {
                state.kinds.insert(kind, *index);
            }
            let at = indexes.iter().map(|(_, i)| *i).max().unwrap_or(0);
            state.refused = refused.map(|why| (why, at));
        }
        self.config.bump();
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.config.lock().remove(&self.id);
        self.config.bump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_is_applied_as_far_as_its_slowest_consumer() {
        let config = AppliedConfig::default();
        let a = config.consumer("upstream api", &["service-router", "service-resolver"]);
        let b = config.consumer("intentions", &["service-intentions"]);
        let summary = config.summary();
        assert_eq!(summary.applied["service-router"], 0, "nothing applied yet");
        a.applied(&[("service-router", 12), ("service-resolver", 9)], None);
        b.applied(&[("service-intentions", 14)], None);
        let c = config.consumer("upstream db", &["service-router"]);
        assert_eq!(config.summary().applied["service-router"], 0);
        c.applied(&[("service-router", 12)], None);
        let summary = config.summary();
        assert_eq!(summary.applied["service-router"], 12);
        assert_eq!(summary.applied["service-resolver"], 9);
        assert_eq!(summary.applied["service-intentions"], 14);
        assert!(summary.refused.is_empty());
        c.applied(&[("service-router", 15)], Some("no subset v3".into()));
        let summary = config.summary();
        assert_eq!(summary.refused.len(), 1);
        assert_eq!(summary.refused[0].scope, "upstream db");
        assert_eq!(summary.refused[0].index, 15);
        drop(c);
        assert!(
            config.summary().refused.is_empty(),
            "gone with its consumer"
        );
    }

    #[test]
    fn every_change_is_signalled() {
        let config = AppliedConfig::default();
        let mut changes = config.changes();
        changes.borrow_and_update();
        let a = config.consumer("rate limits", &["service-defaults"]);
        assert!(changes.has_changed().expect("open"));
        changes.borrow_and_update();
        a.applied(&[("service-defaults", 3)], None);
        assert!(changes.has_changed().expect("open"));
        changes.borrow_and_update();
        drop(a);
        assert!(changes.has_changed().expect("open"));
    }
}
