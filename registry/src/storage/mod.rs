//! What the registry keeps on disk, as files: the write-ahead log of Raft
//! entries ([`wal`]), the latest snapshot ([`snapshot_file`]) and the data
//! directory's identity and checks ([`datadir`]). Nothing here knows about
//! openraft or the state: `raft::log_store` adapts the WAL to openraft's
//! storage traits, and `raft::state_machine` writes snapshots through
//! [`snapshot_file`].

pub mod datadir;
pub mod snapshot_file;
pub mod wal;
