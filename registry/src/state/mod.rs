//! The replicated state: pure data, changed only by applying [`Command`]s in
//! log order. Nothing here knows about HTTP, gRPC, sled or clocks; every
//! object is stamped with the log index that created or changed it.

pub mod catalog;
pub mod config;
pub mod kv;

use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResponse};
pub use catalog::Catalog;
pub use kv::{KvEntry, KvStore};

/// Everything the registry replicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Index of the last log entry applied (commands and Raft's own entries).
    pub last_index: u64,
    /// Set once by the first leader; see [`Command::SetClusterId`].
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
            Command::CatalogRegister(registration) => {
                catalog_response(self.catalog.register(index, registration).map(|()| true))
            }
            Command::CatalogDeregister {
                node,
                service_id,
                check_id,
            } => catalog_response(
                self.catalog
                    .deregister(index, node, service_id.as_deref(), check_id.as_deref())
                    .map(|()| true),
            ),
            Command::CheckUpdate {
                node,
                check_id,
                status,
                output,
            } => catalog_response(
                self.catalog
                    .update_check(index, node, check_id, *status, output)
                    .map(|_| true),
            ),
            Command::Batch(commands) => {
                CommandResponse::Batch(commands.iter().map(|c| self.apply(index, c)).collect())
            }
            Command::Restore(backup) => {
                self.restore(index, backup);
                CommandResponse::Applied(true)
            }
            Command::RestorePart { id, part, data } => {
                let part_data = StagedPart(std::sync::Arc::from(data.as_slice()));
                match (&mut self.restoring, *part) {
                    (slot, 0) => {
                        *slot = Some(StagedRestore {
                            id: id.clone(),
                            parts: imbl::Vector::unit(part_data),
                        });
                        CommandResponse::Applied(true)
                    }
                    (Some(staged), n) if staged.id == *id && staged.parts.len() == n as usize => {
                        staged.parts.push_back(part_data);
                        CommandResponse::Applied(true)
                    }
                    _ => CommandResponse::Applied(false),
                }
            }
            Command::RestoreCommit { id, parts, crc } => {
                let staged = match &self.restoring {
                    Some(staged) if staged.id == *id => staged,
                    _ => return CommandResponse::Applied(false),
                };
                let complete = staged.parts.len() == *parts as usize;
                let mut bytes = Vec::with_capacity(staged.parts.iter().map(|p| p.0.len()).sum());
                for part in &staged.parts {
                    bytes.extend_from_slice(&part.0);
                }
                self.restoring = None;
                if !complete || crc32fast::hash(&bytes) != *crc {
                    return CommandResponse::Applied(false);
                }
                match serde_json::from_slice::<State>(&bytes) {
                    Ok(backup) => {
                        self.restore(index, &backup);
                        CommandResponse::Applied(true)
                    }
                    Err(_) => CommandResponse::Applied(false),
                }
            }
            Command::ConfigSet {
                kind,
                name,
                body,
                cas,
            } => CommandResponse::Applied(self.config.set(index, kind, name, body, *cas)),
            Command::ConfigDelete { kind, name, cas } => {
                CommandResponse::Applied(self.config.delete(index, kind, name, *cas))
            }
            Command::Reap { up_to } => {
                let reaped = self.kv.reap(*up_to) + self.catalog.reap(*up_to);
                CommandResponse::Applied(reaped > 0)
            }
            Command::SetClusterId { id } => {
                if self.cluster_id.is_some() {
                    CommandResponse::Applied(false)
                } else {
                    self.cluster_id = Some(id.clone());
                    CommandResponse::Applied(true)
                }
            }
        }
    }

    /// Replaces the data with a backup's as one write at `index`; the
    /// cluster keeps its own id.
    fn restore(&mut self, index: u64, backup: &State) {
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

fn catalog_response(result: Result<bool, catalog::CatalogError>) -> CommandResponse {
    match result {
        Ok(applied) => CommandResponse::Applied(applied),
        Err(e) => CommandResponse::CatalogRejected(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_applies_in_order_at_one_index() {
        let mut state = State::default();
        let set = |key: &str, cas: Option<u64>| Command::KvSet {
            key: key.into(),
            value: b"v".to_vec(),
            flags: 0,
            cas,
        };
        let batch = Command::Batch(vec![set("a", None), set("a", Some(0)), set("b", Some(0))]);
        let response = state.apply(7, &batch);
        assert_eq!(
            response,
            CommandResponse::Batch(vec![
                CommandResponse::Applied(true),
                CommandResponse::Applied(false),
                CommandResponse::Applied(true)
            ])
        );
        assert_eq!(state.kv.get("b").map(|e| e.modify_index), Some(7));
    }

    #[test]
    fn a_restore_replaces_data_as_one_write_and_keeps_the_cluster_id() {
        let set = |key: &str| Command::KvSet {
            key: key.into(),
            value: key.as_bytes().to_vec(),
            flags: 1,
            cas: None,
        };
        let mut backup = State::default();
        backup.apply(3, &set_cluster_id("old"));
        backup.apply(40, &set("kept"));
        backup.apply(41, &set("only-in-backup"));
        let mut state = State::default();
        state.apply(2, &set_cluster_id("new"));
        state.apply(5, &set("kept"));
        state.apply(6, &set("only-here"));
        let before = state.kv.prefix_index("only-here");
        assert_eq!(
            state.apply(9, &Command::Restore(Box::new(backup))),
            CommandResponse::Applied(true)
        );
        assert_eq!(state.cluster_id.as_deref(), Some("new"));
        assert!(state.kv.get("only-here").is_none());
        let kept = state.kv.get("kept").expect("restored");
        assert_eq!(
            (kept.create_index, kept.modify_index, kept.flags),
            (9, 9, 1)
        );
        assert!(state.kv.get("only-in-backup").is_some());
        // The deleted key's prefix moved forward, never back.
        assert!(state.kv.prefix_index("only-here") > before);
        assert_eq!(state.kv.last_change(), 9);
    }

    #[test]
    fn a_restore_in_pieces_applies_only_when_whole_and_intact() {
        let mut backup = State::default();
        backup.apply(
            4,
            &Command::KvSet {
                key: "from/backup".into(),
                value: vec![7; 3000],
                flags: 0,
                cas: None,
            },
        );
        let data = serde_json::to_vec(&backup).expect("encode");
        let pieces: Vec<&[u8]> = data.chunks(1000).collect();
        let part = |id: &str, n: usize| Command::RestorePart {
            id: id.into(),
            part: n as u32,
            data: pieces[n].to_vec(),
        };
        let commit = |id: &str, crc: u32| Command::RestoreCommit {
            id: id.into(),
            parts: pieces.len() as u32,
            crc,
        };
        let crc = crc32fast::hash(&data);
        let mut state = State::default();
        let mut index = 10;
        let mut apply = |state: &mut State, c: &Command| {
            index += 1;
            state.apply(index, c)
        };
        // Out of order: refused.
        assert_eq!(
            apply(&mut state, &part("a", 1)),
            CommandResponse::Applied(false)
        );
        // A second restore replaces the first; the first's pieces are refused.
        assert_eq!(
            apply(&mut state, &part("a", 0)),
            CommandResponse::Applied(true)
        );
        assert_eq!(
            apply(&mut state, &part("b", 0)),
            CommandResponse::Applied(true)
        );
        assert_eq!(
            apply(&mut state, &part("a", 1)),
            CommandResponse::Applied(false)
        );
        for n in 1..pieces.len() {
            assert_eq!(
                apply(&mut state, &part("b", n)),
                CommandResponse::Applied(true)
            );
        }
        // A bad checksum: nothing restored, the staging is gone.
        assert_eq!(
            apply(&mut state, &commit("b", crc ^ 1)),
            CommandResponse::Applied(false)
        );
        assert!(state.restoring.is_none() && state.kv.is_empty());
        // Whole and intact: restored at the commit's index.
        for n in 0..pieces.len() {
            assert_eq!(
                apply(&mut state, &part("c", n)),
                CommandResponse::Applied(true)
            );
        }
        assert_eq!(
            apply(&mut state, &commit("c", crc)),
            CommandResponse::Applied(true)
        );
        let entry = state.kv.get("from/backup").expect("restored");
        assert_eq!(entry.modify_index, state.last_index);
        assert!(state.restoring.is_none());
        assert_eq!(
            apply(&mut state, &commit("c", crc)),
            CommandResponse::Applied(false)
        );
    }

    fn set_cluster_id(id: &str) -> Command {
        Command::SetClusterId { id: id.into() }
    }

    #[test]
    fn cluster_id_is_set_once() {
        let mut state = State::default();
        let first = Command::SetClusterId { id: "a".into() };
        let second = Command::SetClusterId { id: "b".into() };
        assert_eq!(state.apply(3, &first), CommandResponse::Applied(true));
        assert_eq!(state.apply(4, &second), CommandResponse::Applied(false));
        assert_eq!(state.cluster_id.as_deref(), Some("a"));
        assert_eq!(state.last_index, 4);
    }
}
