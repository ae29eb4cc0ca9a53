//! The replicated state: pure data, changed only by applying [`Command`]s in
//! log order. Nothing here knows about HTTP, gRPC, sled or clocks; every
//! object is stamped with the log index that created or changed it.

pub mod kv;

use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResponse};
pub use kv::{KvEntry, KvStore};

/// Everything the registry replicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Index of the last log entry applied (commands and Raft's own entries).
    pub last_index: u64,
    pub kv: KvStore,
}

impl State {
    /// Applies one command at log index `index`. Deterministic: the same
    /// commands at the same indexes give the same state on every server.
    pub fn apply(&mut self, index: u64, command: &Command) -> CommandResponse {
        self.last_index = index;
        match command {
            Command::KvSet {
                key,
                value,
                flags,
                cas,
            } => CommandResponse::Applied(self.kv.set(index, key, value, *flags, *cas)),
            Command::KvDelete { key, cas } => {
                CommandResponse::Applied(self.kv.delete(index, key, *cas))
            }
            Command::KvDeleteTree { prefix } => {
                self.kv.delete_tree(index, prefix);
                CommandResponse::Applied(true)
            }
        }
    }

    /// Records that a log entry without a command (blank, membership) was
    /// applied, so indexes keep moving.
    pub fn apply_noop(&mut self, index: u64) {
        self.last_index = index;
    }
}
