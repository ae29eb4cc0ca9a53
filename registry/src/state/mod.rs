//! The replicated state: pure data, changed only by applying
//! [`Command`](crate::command::Command)s ([`crate::command::apply`]) in
//! log order. Nothing here knows about HTTP, gRPC, sled or clocks; every
//! object is stamped with the log index that created or changed it.

pub mod acl;
pub mod ca;
pub mod catalog;
pub mod config;
pub mod kv;
pub mod session;
pub mod txn;

use serde::{Deserialize, Serialize};

pub use catalog::Catalog;
pub use kv::{KvEntry, KvStore};

/// Everything the registry replicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Index of the last log entry applied (commands and Raft's own entries).
    pub last_index: u64,
    /// Set once by the first leader; see `Command::SetClusterId`.
    #[serde(default)]
    pub cluster_id: Option<String>,
    pub kv: KvStore,
    #[serde(default)]
    pub catalog: Catalog,
    #[serde(default)]
    pub config: config::ConfigStore,
    /// A backup being restored piece by piece (`PUT /v1/snapshot`).
    #[serde(default)]
    pub restoring: Option<StagedRestore>,
    /// Consul sessions (KV locks live in `kv`).
    #[serde(default)]
    pub sessions: session::Sessions,
    /// ACL tokens, policies and roles.
    #[serde(default)]
    pub acl: acl::AclStore,
    /// The mesh CA: roots (with their keys) and configuration. Like the
    /// cluster id, it is the cluster's own: a restore keeps it.
    #[serde(default)]
    pub ca: ca::CaStore,
    /// Locks whose lock-delay began with the entry being applied: (key,
    /// delay in ns). Not replicated state: the state machine adapter takes
    /// them after each entry and starts each delay on its own clock, as a
    /// Consul server does when it applies a session's invalidation.
    #[serde(skip)]
    pub lock_delays_begun: Transient<Vec<(String, u64)>>,
}

/// Byte strings travel as base64 text in the JSON log, so a 256-byte value
/// costs 344 bytes instead of a ~900-byte array of numbers.
pub(crate) mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// The longest lock-delay applied, whatever a session asked for.
pub const MAX_LOCK_DELAY_NS: u64 = 60_000_000_000;

/// A value carried beside the state but not part of it: never compared,
/// never encoded.
#[derive(Debug, Clone, Default)]
pub struct Transient<T>(pub T);

impl<T> PartialEq for Transient<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> Eq for Transient<T> {}

/// The pieces of a backup received so far, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedRestore {
    pub id: String,
    pub parts: imbl::Vector<StagedPart>,
}

/// One piece (shared, so copies of the state stay cheap).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedPart(#[serde(with = "kv::arc_bytes")] pub std::sync::Arc<[u8]>);

impl State {
    /// Replaces the data with a backup's as one write at `index`; the
    /// cluster keeps its own id.
    pub(crate) fn restore(&mut self, index: u64, backup: &State) {
        self.kv.restore(index, &backup.kv);
        self.catalog.restore(index, &backup.catalog);
        self.config.restore(index, &backup.config);
        self.sessions.restore(index, &backup.sessions);
        self.acl.restore(index, &backup.acl);
        // Locks and sessions checked against each other and the catalog,
        // not trusted: a key locked by a session the backup lacks is
        // released, and a session whose node or checks are gone ends.
        let sessions = &self.sessions;
        self.kv
            .rebuild_locks(index, |id| sessions.get(id).is_some());
        let nodes: std::collections::BTreeSet<String> =
            self.sessions.iter().map(|s| s.spec.node.clone()).collect();
        for node in nodes {
            self.sessions_follow_catalog(index, &node);
        }
    }

    /// Creates a session after checking Consul's preconditions: its node
    /// is registered, and each of its checks exists on that node and is
    /// not critical.
    pub fn create_session(
        &mut self,
        index: u64,
        spec: &session::SessionSpec,
    ) -> Result<(), session::SessionError> {
        use session::SessionError;
        if self.catalog.node(&spec.node).is_none() {
            return Err(SessionError::MissingNode);
        }
        for check_id in spec.node_checks.iter().chain(&spec.service_checks) {
            let check = self
                .catalog
                .node_checks(&spec.node)
                .find(|c| c.check_id == *check_id)
                .ok_or_else(|| SessionError::MissingCheck(check_id.clone()))?;
            if check.status == catalog::HealthStatus::Critical {
                return Err(SessionError::CriticalCheck(check_id.clone()));
            }
        }
        self.sessions.insert(index, spec)
    }

    /// Ends a session: its locks are released or their keys deleted (per
    /// its behavior) and their lock-delay begins. False when it did not
    /// exist.
    pub fn destroy_session(&mut self, index: u64, id: &str) -> bool {
        let Some(session) = self.sessions.remove(index, id) else {
            return false;
        };
        let delete = session.spec.behavior == session::Behavior::Delete;
        let keys = self.kv.drop_session(index, id, delete);
        // Consul caps the delay at a minute (`MaxLockDelay`).
        let delay = session.spec.lock_delay_ns.min(MAX_LOCK_DELAY_NS);
        if delay > 0 {
            self.lock_delays_begun
                .0
                .extend(keys.into_iter().map(|k| (k, delay)));
        }
        true
    }

    /// After a change to `node` in the catalog: invalidates the node's
    /// sessions whose node is gone or one of whose checks is gone or
    /// critical.
    pub(crate) fn sessions_follow_catalog(&mut self, index: u64, node: &str) {
        let node_exists = self.catalog.node(node).is_some();
        let doomed: Vec<String> = self
            .sessions
            .of_node(node)
            .filter(|s| {
                !node_exists
                    || s.spec
                        .node_checks
                        .iter()
                        .chain(&s.spec.service_checks)
                        .any(|id| {
                            self.catalog
                                .node_checks(node)
                                .find(|c| c.check_id == *id)
                                .is_none_or(|c| c.status == catalog::HealthStatus::Critical)
                        })
            })
            .map(|s| s.spec.id.clone())
            .collect();
        for id in doomed {
            self.destroy_session(index, &id);
        }
    }

    /// Records that a log entry without a command (blank, membership) was
    /// applied, so indexes keep moving.
    pub fn apply_noop(&mut self, index: u64) {
        self.last_index = index;
    }
}
