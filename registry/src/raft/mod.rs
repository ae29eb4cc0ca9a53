//! Consensus: openraft's type configuration and the three seams it needs —
//! the log store (over our own WAL, [`crate::storage::wal`]), the
//! in-memory state machine with persisted snapshots, and the gRPC network
//! between servers (with what rides on it: the server directory and the
//! cluster identity). Forwarded writes and leader routing live one floor
//! up, in [`crate::cluster`].

// openraft's `StorageError` is large, and its storage traits dictate it.
#![allow(clippy::result_large_err)]

pub mod directory;
pub mod identity;
pub mod log_store;
pub mod network;
pub mod state_machine;

use std::io::Cursor;

use crate::command::{Command, CommandResponse};

openraft::declare_raft_types!(
    /// Meshwork's Raft types: commands in, command responses out, nodes
    /// addressed by their Raft (internal gRPC) address.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A running Raft node.
pub type Raft = openraft::Raft<TypeConfig>;
pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;

/// Wraps an I/O or decoding failure as openraft's storage error.
pub(crate) fn storage_io_error(
    subject: openraft::ErrorSubject<NodeId>,
    verb: openraft::ErrorVerb,
    err: impl std::error::Error + 'static,
) -> StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(&err)).into()
}
