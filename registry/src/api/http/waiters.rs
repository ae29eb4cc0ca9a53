//! Parked blocking queries, grouped by what their answer depends on.
//!
//! Waking every parked query on every applied write costs a task wake per
//! query per write: at 10,000 parked queries that is most of a core at a
//! hundred writes a second. Instead, queries that ask about the same thing
//! (one key, one prefix, one service, one node, a list) share a group, and
//! one task per server recomputes each group's index after every applied
//! change — a map lookup per distinct group — and wakes only the groups
//! whose index moved.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::raft::state_machine::SharedState;
use crate::state::State;

/// What a read's index (its `X-Consul-Index`) is computed from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IndexOf {
    /// One key: its ModifyIndex, or its deletion index.
    Key(String),
    /// Every key under a prefix, deletions included.
    Prefix(String),
    /// One service's instances, their checks and their nodes' checks.
    Service(String),
    /// One node, its services and checks.
    Node(String),
    /// The set of service names and their tags.
    ServiceList,
    /// The set of nodes.
    NodeList,
    /// Every check.
    Checks,
    /// The config entries of one kind.
    ConfigKind(String),
    /// Every session.
    Sessions,
    /// The ACL tables (tokens, policies, roles).
    Acl,
    /// The mesh CA (roots and configuration).
    CaRoots,
    /// Any service, instance, node or check (the UI's summaries).
    Catalog,
}

impl IndexOf {
    pub fn index(&self, state: &State) -> u64 {
        match self {
            IndexOf::Key(key) => state.kv.key_index(key),
            IndexOf::Prefix(prefix) => state.kv.prefix_index(prefix),
            IndexOf::Service(name) => state.catalog.service_index(name),
            IndexOf::Node(name) => state.catalog.node_index(name),
            IndexOf::ServiceList => state.catalog.services_list_index(),
            IndexOf::NodeList => state.catalog.nodes_index(),
            IndexOf::Checks => state.catalog.checks_index(),
            IndexOf::ConfigKind(kind) => state.config.kind_index(kind),
            IndexOf::Sessions => state.sessions.index(),
            IndexOf::Acl => state.acl.index(),
            IndexOf::CaRoots => state.ca.index,
            IndexOf::Catalog => state.catalog.catalog_index(),
        }
    }

    fn is_kv(&self) -> bool {
        matches!(self, IndexOf::Key(_) | IndexOf::Prefix(_))
    }
}

/// One group: its index as last computed, published to its waiters.
#[derive(Debug)]
struct Group {
    index: Arc<watch::Sender<u64>>,
}

/// Every group of parked queries of one server.
#[derive(Debug)]
pub struct Waiters {
    state: Arc<SharedState>,
    groups: Mutex<HashMap<IndexOf, Group>>,
}

impl Waiters {
    /// Creates the registry and starts its task (inside a runtime); the
    /// task ends with `shutdown`.
    pub fn start(state: Arc<SharedState>, shutdown: CancellationToken) -> Arc<Self> {
        let waiters = Arc::new(Self {
            state,
            groups: Mutex::default(),
        });
        let runner = Arc::clone(&waiters);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                tokio::select! {
                    () = runner.run() => {}
                    () = shutdown.cancelled() => {}
                }
            },
            tracing::info_span!("blocking_query_waiters"),
        ));
        waiters
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, HashMap<IndexOf, Group>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins (or starts) the group for `what`: the receiver holds the
    /// group's index, updated after every applied change that moves it.
    /// Subscribe before reading the state, so no change is missed between.
    pub fn subscribe(&self, what: &IndexOf) -> watch::Receiver<u64> {
        if let Some(group) = self.groups().get(what) {
            return group.index.subscribe();
        }
        // Computed without the groups lock held (lock order: never the
        // state under the groups). A change applied meanwhile is caught by
        // the caller's own look at the state, or by the next pass.
        let index = what.index(&self.state.read());
        self.groups()
            .entry(what.clone())
            .or_insert_with(|| Group {
                index: Arc::new(watch::channel(index).0),
            })
            .index
            .subscribe()
    }

    /// A waiter is done with `what`: its group goes when nobody else
    /// waits on it (so groups do not pile up on a quiet cluster).
    pub fn release(&self, what: &IndexOf, receiver: watch::Receiver<u64>) {
        drop(receiver);
        let mut groups = self.groups();
        if groups
            .get(what)
            .is_some_and(|g| g.index.receiver_count() == 0)
        {
            groups.remove(what);
        }
    }

    /// After each applied change: recompute every group's index; wake the
    /// groups whose index moved. The groups lock is held only to list
    /// them: computing an index (a prefix scan) happens outside it.
    async fn run(&self) {
        let mut applied = self.state.subscribe();
        let mut kv_seen = 0u64;
        loop {
            if applied.changed().await.is_err() {
                return;
            }
            // A copy (O(1): persistent maps), so apply never waits on us.
            let state = self.state.read().clone();
            // KV groups only need a look when some key changed.
            let kv_changed = state.kv.last_change() != kv_seen;
            kv_seen = state.kv.last_change();
            let due: Vec<(IndexOf, Arc<watch::Sender<u64>>)> = {
                let mut groups = self.groups();
                groups.retain(|_, group| group.index.receiver_count() > 0);
                groups
                    .iter()
                    .filter(|(what, _)| kv_changed || !what.is_kv())
                    .map(|(what, group)| (what.clone(), Arc::clone(&group.index)))
                    .collect()
            };
            for (what, sender) in due {
                let index = what.index(&state);
                sender.send_if_modified(|current| {
                    let moved = *current != index;
                    *current = index;
                    moved
                });
            }
        }
    }

    /// Groups alive right now (for tests and metrics).
    pub fn group_count(&self) -> usize {
        self.groups().len()
    }
}
