//! The replicated state: pure data, changed only by applying
//! [`Command`](crate::command::Command)s ([`crate::command::apply`]) in
//! log order. Nothing here knows about HTTP, gRPC, sled or clocks; every
//! object is stamped with the log index that created or changed it.

pub mod catalog;
pub mod config;
pub mod kv;

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
}

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
    }

    /// Records that a log entry without a command (blank, membership) was
    /// applied, so indexes keep moving.
    pub fn apply_noop(&mut self, index: u64) {
        self.last_index = index;
    }
}
