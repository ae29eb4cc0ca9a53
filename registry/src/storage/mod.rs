//! What the registry keeps on disk, as files: the write-ahead log of Raft
//! entries ([`wal`]), the vote, committed index and purge point
//! ([`meta_file`]), the latest snapshot ([`snapshot_file`]) and the data
//! directory's identity and checks ([`datadir`], [`meta_check`], and the
//! one-time move from an earlier build's sled store, [`sled_migration`]);
//! every sync goes through [`durable`], which is also the power-loss seam of
//! the tests.
//! Nothing here knows about openraft or the state: `raft::log_store` adapts
//! the WAL to openraft's storage traits, and `raft::state_machine` writes
//! snapshots through [`snapshot_file`].

pub mod datadir;
pub mod durable;
pub mod meta_check;
pub mod meta_file;
pub mod sled_migration;
pub mod snapshot_file;
pub mod wal;

#[cfg(test)]
pub(crate) mod power_loss;

/// Drops a synced file's pages from the page cache. Zero-filling (or
/// reading) a file in large chunks leaves it cached in large folios, and a
/// small append then dirties a whole folio: measured on ext4 with this
/// kernel, every 500-byte append + `fdatasync` wrote 1 MiB to the disk. With
/// the cache dropped, appends build page-sized folios again (4 KiB each).
/// A snapshot is read back only at a restart, so its hundreds of cached
/// megabytes would only push out what the server does use.
pub(crate) fn drop_cache(file: &std::fs::File) {
    if let Err(e) = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed) {
        tracing::debug!(error = %e, "fadvise(DONTNEED) failed");
    }
}

/// The nice value of threads doing bulk background writes (snapshots,
/// spare log segments); 19 is the lowest priority.
const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority, for bulk background
/// writes, so that the async workers and the Raft log's syncs go first.
/// On Linux a nice value belongs to a thread, and
/// `setpriority(PRIO_PROCESS, 0)` sets the caller's. Best effort: a
/// failure only costs latency.
pub(crate) fn lower_this_threads_priority() {
    if let Err(e) = rustix::process::setpriority_process(None, BACKGROUND_NICE) {
        tracing::debug!(error = %e, "could not lower a background writer's priority");
    }
}
