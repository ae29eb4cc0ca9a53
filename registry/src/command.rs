//! The Raft log's contract: every change to the replicated state is one
//! [`Command`], and applying it yields one [`CommandResponse`].
//!
//! Rules (they keep old logs and snapshots readable by new binaries):
//! - variants are only ever appended, never reordered, renamed or changed in
//!   meaning; a field may be added only with `#[serde(default)]`;
//! - a command carries everything apply needs: apply reads no clock, no
//!   randomness and no I/O. The log index is the only "time" it sees.

use serde::{Deserialize, Serialize};

use crate::state::catalog::{CatalogError, HealthStatus, Registration};

/// A change to the replicated state, as written to the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Set a key. With `cas`, only if the key's `ModifyIndex` equals it
    /// (`Some(0)`: only if the key does not exist).
    KvSet {
        key: String,
        #[serde(with = "base64_bytes")]
        value: Vec<u8>,
        flags: u64,
        cas: Option<u64>,
    },
    /// Delete one key. With `cas`, only if its `ModifyIndex` equals it.
    KvDelete { key: String, cas: Option<u64> },
    /// Delete every key that starts with `prefix`.
    KvDeleteTree { prefix: String },
    /// Names the cluster, once: the first leader proposes a random id and
    /// later proposals change nothing. Servers refuse Raft traffic from
    /// another cluster's id.
    SetClusterId { id: String },
    /// Register a node, optionally a service on it, and checks.
    CatalogRegister(Box<Registration>),
    /// Remove a node (both ids absent), a service instance, or a check.
    CatalogDeregister {
        node: String,
        service_id: Option<String>,
        check_id: Option<String>,
    },
    /// Set a check's status and output (a no-op when unchanged).
    CheckUpdate {
        node: String,
        check_id: String,
        status: HealthStatus,
        output: String,
    },
    /// Several client writes in one log entry (group commit), applied in
    /// order at the same index.
    Batch(Vec<Command>),
    /// Replace the KV store, the catalog and the config entries with a
    /// backup's; the cluster keeps its own id. (Written by earlier
    /// versions; `PUT /v1/snapshot` now sends [`Command::RestorePart`]s
    /// and a [`Command::RestoreCommit`], so that no log entry is larger
    /// than what replicates within a heartbeat.)
    Restore(Box<crate::state::State>),
    /// Store a config entry (fields already validated and spelled as
    /// Consul); with `cas`, only if its ModifyIndex equals it (0: absent).
    ConfigSet {
        kind: String,
        name: String,
        body: serde_json::Map<String, serde_json::Value>,
        cas: Option<u64>,
    },
    /// Delete a config entry; with `cas`, only if its ModifyIndex equals it.
    ConfigDelete {
        kind: String,
        name: String,
        cas: Option<u64>,
    },
    /// One piece of a backup being restored, staged in the state until the
    /// commit. Piece 0 starts restore `id` (dropping any unfinished one);
    /// a piece out of order, or of a restore since replaced, is refused.
    RestorePart {
        id: String,
        part: u32,
        #[serde(with = "base64_bytes")]
        data: Vec<u8>,
    },
    /// Restores the staged backup `id` (the JSON of a `State`) when it has
    /// `parts` pieces whose CRC-32 is `crc`: [`Command::Restore`] at this
    /// index. Refused (nothing changes) otherwise.
    RestoreCommit { id: String, parts: u32, crc: u32 },
    /// Tombstone GC, proposed by the leader ([`crate::gc`]): drops KV
    /// tombstones and the indexes of gone services and nodes whose last
    /// change is at or below `up_to`. Readers never see an index go back.
    Reap { up_to: u64 },
}

impl Command {
    /// About how many bytes the command takes in a log entry (its large
    /// fields; cheap, no encoding): what the replication splits on.
    pub fn approx_size(&self) -> usize {
        const SMALL: usize = 256;
        match self {
            Command::KvSet { key, value, .. } => SMALL + key.len() + value.len() * 4 / 3,
            Command::RestorePart { data, .. } => SMALL + data.len() * 4 / 3,
            Command::Batch(commands) => commands.iter().map(Command::approx_size).sum(),
            Command::ConfigSet { body, .. } => {
                SMALL + serde_json::to_vec(body).map_or(0, |b| b.len())
            }
            Command::Restore(state) => serde_json::to_vec(state).map_or(usize::MAX, |b| b.len()),
            Command::CatalogRegister(_) => 4 * SMALL,
            Command::KvDelete { .. }
            | Command::KvDeleteTree { .. }
            | Command::SetClusterId { .. }
            | Command::CatalogDeregister { .. }
            | Command::CheckUpdate { .. }
            | Command::ConfigDelete { .. }
            | Command::RestoreCommit { .. }
            | Command::Reap { .. } => SMALL,
        }
    }
}

/// What applying a command produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// Log entries that carry no command (blank, membership) answer this.
    #[default]
    Empty,
    /// The command was applied (`true`) or its precondition failed (`false`).
    Applied(bool),
    /// A catalog change refused as invalid (nothing changed).
    CatalogRejected(CatalogError),
    /// One response per command of a [`Command::Batch`].
    Batch(Vec<CommandResponse>),
}

impl CommandResponse {
    /// The `true`/`false` a Consul-style write endpoint answers with.
    pub fn succeeded(&self) -> bool {
        matches!(
            self,
            CommandResponse::Applied(true) | CommandResponse::Empty
        )
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_encoding_is_stable() {
        let cmd = Command::KvSet {
            key: "a/b".into(),
            value: b"hi".to_vec(),
            flags: 7,
            cas: None,
        };
        let json = serde_json::to_string(&cmd).expect("encode");
        assert_eq!(
            json,
            r#"{"KvSet":{"key":"a/b","value":"aGk=","flags":7,"cas":null}}"#
        );
        let back: Command = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, cmd);
    }
}
