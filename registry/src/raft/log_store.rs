//! The Raft log store: entries in our write-ahead log ([`crate::storage::wal`]),
//! the vote, committed index and purge point in the metadata file
//! ([`crate::storage::meta_file`], `raft-meta`), of which an in-memory copy
//! serves reads.
//!
//! Every append and vote is synced before openraft hears it is durable: an
//! acknowledged write is on disk on a quorum. A vote or purge point is
//! written whole into the metadata file's other slot and `fdatasync`ed
//! before the call returns, on a blocking thread (both are rare: a vote per
//! election, a purge point per snapshot).
//!
//! Group commit: `append` writes its entries to the WAL (page cache) and
//! hands its completion callback to one flusher thread; the flusher takes
//! every callback queued meanwhile and covers them all with one
//! `fdatasync`, so under load many appends share a sync.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, Vote};
use serde::{Deserialize, Serialize};

use super::{LogId, NodeId, StorageError, TypeConfig, storage_io_error};
use crate::storage::meta_file::MetaFile;
use crate::storage::wal::{DEFAULT_SEGMENT_SIZE, Wal};

type Entry = openraft::Entry<TypeConfig>;

/// The Raft metadata: the metadata file's payload (JSON). The field names
/// are the format: `storage::meta_check` reads `vote`, and
/// `storage::sled_migration` writes these three keys from an earlier
/// build's sled store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    #[serde(default)]
    vote: Option<Vote<NodeId>>,
    #[serde(default)]
    committed: Option<LogId>,
    #[serde(default)]
    last_purged: Option<LogId>,
}

/// The metadata file and the copy of what it holds.
#[derive(Debug)]
struct MetaStore {
    /// Held for a whole write (on a blocking thread), so writes go one at
    /// a time, each computed from the state the one before left.
    file: Mutex<MetaFile>,
    /// What the file holds, for reads without a disk read. Replaced whole
    /// once a write is durable; held only to copy or replace it.
    current: Mutex<Meta>,
}

/// A poisoned lock here is ignored: a panic while holding one leaves no
/// half-done state (`current` is replaced whole, after the file's write,
/// and a failed file write leaves the next one to the other slot as
/// before).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl MetaStore {
    /// Applies `change` to the metadata, durably (blocking I/O).
    fn update(&self, change: impl FnOnce(&mut Meta)) -> std::io::Result<()> {
        let mut file = lock(&self.file);
        let mut next = lock(&self.current).clone();
        change(&mut next);
        let bytes = serde_json::to_vec(&next).map_err(std::io::Error::other)?;
        file.write(&bytes)?;
        *lock(&self.current) = next;
        Ok(())
    }

    fn get(&self) -> Meta {
        lock(&self.current).clone()
    }
}

/// The log store. Cloning is cheap and clones share the same files.
#[derive(Debug, Clone)]
pub struct LogStore {
    meta: Arc<MetaStore>,
    wal: Arc<Wal>,
    /// Completion callbacks of appends waiting for the next sync.
    flusher: Arc<Flusher>,
    /// The committed index openraft last reported, not yet written: it is
    /// a hint, so it is not written on every commit, only with the next
    /// vote or purge point, and only once this server's own log holds it
    /// durably (a leader may commit on its followers' syncs before its
    /// own; a restart must not find a committed index past its log).
    committed: Arc<Mutex<Option<Option<LogId>>>>,
    /// The last index appended, and the last one known synced.
    appended: Arc<std::sync::atomic::AtomicU64>,
    durable: Arc<std::sync::atomic::AtomicU64>,
    /// Truncations so far (see `truncate`).
    cuts: Arc<std::sync::atomic::AtomicU64>,
}

type Flush = (LogFlushed<TypeConfig>, std::time::Instant);

/// The flusher thread's queue. When the last clone of the store drops, the
/// queue closes and the drop waits for the thread (which holds the WAL) to
/// finish, so a closed store leaves nothing running in its directory.
#[derive(Debug)]
struct Flusher {
    queue: Option<std::sync::mpsc::Sender<Flush>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Why the log store could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("raft metadata {path}: {source}")]
    Meta {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("raft log {path}: {source}")]
    Wal {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("raft metadata {path}: not what this build writes: {source}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

impl OpenError {
    /// The log or the metadata is damaged (not an I/O failure): it was
    /// left unchanged, and the server can be rebuilt from the others.
    pub fn is_damage(&self) -> bool {
        match self {
            OpenError::Wal { source, .. } | OpenError::Meta { source, .. } => {
                source.kind() == std::io::ErrorKind::InvalidData
            }
            OpenError::Decode { .. } => true,
        }
    }
}

impl LogStore {
    /// Opens the log: metadata in the file `meta_path` (created if there
    /// is none), entries in the WAL in `wal_dir`. Starts the flusher thread
    /// (it ends, and is waited for, when the last clone of the store is
    /// dropped).
    pub fn open(meta_path: &Path, wal_dir: &Path) -> Result<Self, OpenError> {
        Self::open_with_segment_size(meta_path, wal_dir, DEFAULT_SEGMENT_SIZE)
    }

    pub fn open_with_segment_size(
        meta_path: &Path,
        wal_dir: &Path,
        segment_size: u64,
    ) -> Result<Self, OpenError> {
        let path = || meta_path.display().to_string();
        let empty = serde_json::to_vec(&Meta::default()).map_err(|source| OpenError::Decode {
            path: path(),
            source,
        })?;
        let (file, payload) =
            MetaFile::open_or_create(meta_path, &empty).map_err(|source| OpenError::Meta {
                path: path(),
                source,
            })?;
        let meta: Meta = serde_json::from_slice(&payload).map_err(|source| OpenError::Decode {
            path: path(),
            source,
        })?;
        let purged = meta.last_purged;
        // The committed index bounds what a torn tail may take away.
        let committed = meta.committed;
        let wal_error = |source| OpenError::Wal {
            path: wal_dir.display().to_string(),
            source,
        };
        let (wal, recovery) = Wal::open(
            wal_dir,
            segment_size,
            purged.map(|p| p.index),
            committed.map(|c| c.index),
        )
        .map_err(wal_error)?;
        tracing::debug!(?recovery, "raft log opened");
        let wal = Arc::new(wal);
        // What the log holds now is durable from here on.
        wal.sync_current().map_err(wal_error)?;
        let last = wal.bounds().map_or(0, |(_, last)| last);
        let appended = Arc::new(std::sync::atomic::AtomicU64::new(last));
        let durable = Arc::new(std::sync::atomic::AtomicU64::new(last));
        let (queue, pending) = std::sync::mpsc::channel();
        let flush_wal = Arc::clone(&wal);
        let cuts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let progress = (
            Arc::clone(&appended),
            Arc::clone(&durable),
            Arc::clone(&cuts),
        );
        let thread = std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flush_appends(&flush_wal, &pending, &progress))
            .map_err(wal_error)?;
        let flusher = Arc::new(Flusher {
            queue: Some(queue),
            thread: Some(thread),
        });
        Ok(Self {
            meta: Arc::new(MetaStore {
                file: Mutex::new(file),
                current: Mutex::new(meta),
            }),
            wal,
            flusher,
            committed: Arc::default(),
            appended,
            durable,
            cuts,
        })
    }

    /// Applies `change` to the metadata, durable when this returns, with
    /// the pending committed index if this server's log holds it durably
    /// (see `committed`). On a blocking thread: it waits on the disk.
    async fn write_meta(
        &self,
        subject: ErrorSubject<NodeId>,
        change: impl FnOnce(&mut Meta) + Send + 'static,
    ) -> Result<(), StorageError> {
        let pending = *lock(&self.committed);
        let durable = self.durable.load(std::sync::atomic::Ordering::Acquire);
        let committed = pending.filter(|c| c.is_none_or(|c| c.index <= durable));
        let meta = Arc::clone(&self.meta);
        tokio::task::spawn_blocking(move || {
            meta.update(|m| {
                change(m);
                if let Some(committed) = committed {
                    m.committed = committed;
                }
            })
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|written| written)
        .map_err(|e| storage_io_error(subject, ErrorVerb::Write, e))?;
        if committed.is_some() {
            let mut slot = lock(&self.committed);
            if *slot == committed {
                *slot = None;
            }
        }
        Ok(())
    }

    fn decode_entry(bytes: &[u8]) -> Result<Entry, StorageError> {
        serde_json::from_slice(bytes)
            .map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Read, e))
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let Some((_, last)) = self.wal.bounds() else {
            return Ok(None);
        };
        let records = self
            .wal
            .read(last, last + 1)
            .map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        match records.first() {
            Some((_, bytes)) => Ok(Some(Self::decode_entry(bytes)?.log_id)),
            None => Ok(None),
        }
    }

    /// Number of entries currently kept in the log (for metrics and tests).
    /// Whether this server has ever voted (or recorded a leader's vote):
    /// false for a fresh data dir.
    pub fn has_vote(&self) -> bool {
        lock(&self.meta.current).vote.is_some()
    }

    pub fn len(&self) -> usize {
        self.wal
            .bounds()
            .map_or(0, |(first, last)| (last - first + 1) as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.wal.bounds().is_none()
    }
}

/// The flusher thread: one `fdatasync` per batch of queued appends. A
/// plain thread, because syncing blocks: no async worker waits on disk.
/// The last index appended, the last one known synced, and the number
/// of truncations so far.
type Progress = (
    Arc<std::sync::atomic::AtomicU64>,
    Arc<std::sync::atomic::AtomicU64>,
    Arc<std::sync::atomic::AtomicU64>,
);

fn flush_appends(
    wal: &Wal,
    pending: &std::sync::mpsc::Receiver<Flush>,
    (appended, durable, cuts): &Progress,
) {
    use std::sync::atomic::Ordering;
    while let Ok(first) = pending.recv() {
        let mut batch = vec![first];
        while let Ok(more) = pending.try_recv() {
            batch.push(more);
        }
        // Everything appended before this load is in the files taken next
        // (or in ones synced before).
        let cuts_before = cuts.load(Ordering::Acquire);
        let covered = appended.load(Ordering::Acquire);
        let result = wal
            .take_dirty()
            .iter()
            .try_for_each(|file| crate::storage::durable::sync_data(file));
        match &result {
            // Not when a truncation came in between: the next batch
            // covers what was appended after it.
            Ok(()) if cuts.load(Ordering::Acquire) == cuts_before => {
                durable.fetch_max(covered, Ordering::AcqRel);
            }
            Ok(()) => {}
            Err(e) => tracing::error!(error = %e, "raft log sync failed"),
        }
        for (callback, appended) in batch {
            crate::metrics::METRICS.raft_appended(appended.elapsed());
            callback.log_io_completed(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        let records = self
            .wal
            .read(start, end)
            .map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        records
            .iter()
            .map(|(_, bytes)| Self::decode_entry(bytes))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.meta.get().last_purged;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let vote = *vote;
        self.write_meta(ErrorSubject::Vote, move |m| m.vote = Some(vote))
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.meta.get().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Kept in memory, written with the next vote or purge point (see
        // `committed`): openraft treats it as a hint that speeds up a
        // restart, and losing the latest one is safe.
        *lock(&self.committed) = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        if let Some(pending) = *lock(&self.committed) {
            return Ok(pending);
        }
        Ok(self.meta.get().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // The append's duration counts from here: encoding and writing
        // (a segment roll-over included) as well as the sync.
        let started = std::time::Instant::now();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry)
                .map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            self.wal
                .append(entry.log_id.index, &bytes)
                .map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            self.appended
                .store(entry.log_id.index, std::sync::atomic::Ordering::Release);
        }
        // Durable once the flusher's next sync completes.
        self.flusher
            .queue
            .as_ref()
            .ok_or(())
            .and_then(|queue| queue.send((callback, started)).map_err(|_| ()))
            .map_err(|()| {
                storage_io_error(
                    ErrorSubject::Logs,
                    ErrorVerb::Write,
                    std::io::Error::other("the log flusher has stopped"),
                )
            })
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Synced before returning (rare: only when a new leader overrides
        // uncommitted entries).
        self.wal
            .truncate(log_id.index)
            .map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        // A sync that started before the cut must not raise `durable`
        // past it: the flusher raises it only when no cut came meanwhile.
        let kept = log_id.index.saturating_sub(1);
        self.cuts.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.durable
            .fetch_min(kept, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash between the two steps leaves
        // extra entries below it, which reads never reach.
        self.write_meta(ErrorSubject::Logs, move |m| m.last_purged = Some(log_id))
            .await?;
        self.wal
            .purge(log_id.index)
            .map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::power_loss::Powered;

    fn open_store(root: &Path) -> LogStore {
        LogStore::open_with_segment_size(&root.join("raft-meta"), &root.join("wal"), 4096)
            .expect("open")
    }

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(openraft::CommittedLeaderId::new(term, 1), index)
    }

    /// A saved vote, and a purge point with the segments it let go, are
    /// durable when the call returns: after a power loss the store opens
    /// with that vote (Raft's safety rests on it) and its log.
    #[tokio::test]
    async fn the_vote_and_the_purge_point_survive_a_power_loss() {
        let disk = Powered::new();
        let mut store = open_store(&disk.root);
        for i in 1..=200u64 {
            store
                .wal
                .append(i, format!("entry {i} {}", "x".repeat(60)).as_bytes())
                .expect("append");
        }
        for file in store.wal.take_dirty() {
            crate::storage::durable::sync_data(&file).expect("sync");
        }
        store
            .durable
            .store(200, std::sync::atomic::Ordering::Release);
        store
            .save_committed(Some(log_id(7, 180)))
            .await
            .expect("commit");
        let vote = Vote::new(7, 2);
        store.save_vote(&vote).await.expect("save vote");
        let purged = log_id(7, 150);
        store.purge(purged).await.expect("purge");
        drop(store);
        disk.power_loss();
        let mut store = open_store(&disk.root);
        assert_eq!(store.read_vote().await.expect("read vote"), Some(vote));
        assert_eq!(store.meta.get().last_purged, Some(purged));
        assert_eq!(
            store.read_committed().await.expect("committed"),
            Some(log_id(7, 180)),
            "the committed index went with the vote"
        );
        assert_eq!(store.wal.bounds(), Some((151, 200)));
    }

    /// The committed index is written only once the log holds it durably.
    #[tokio::test]
    async fn a_committed_index_past_the_synced_log_is_not_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open_store(dir.path());
        store
            .save_committed(Some(log_id(1, 5)))
            .await
            .expect("commit");
        store.save_vote(&Vote::new(1, 1)).await.expect("vote");
        drop(store);
        let mut store = open_store(dir.path());
        assert_eq!(store.read_committed().await.expect("committed"), None);
        assert_eq!(
            store.read_vote().await.expect("vote"),
            Some(Vote::new(1, 1))
        );
    }

    #[test]
    fn a_dropped_store_leaves_no_thread_at_work_in_its_directory() {
        // The WAL starts making a 64 MiB spare segment on open; the store's
        // drop waits for the flusher, which holds the WAL, which waits for
        // the spare. Without that, a reopen could race the spare's writer.
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = dir.path().join("raft-meta");
        let wal_dir = dir.path().join("wal");
        for _ in 0..2 {
            let store = LogStore::open_with_segment_size(&meta, &wal_dir, 64 << 20).expect("open");
            let clone = store.clone();
            drop(store);
            drop(clone);
            // Open started the spare; the drop waited for it to be done.
            assert!(
                !wal_dir.join(crate::storage::wal::SPARE_TMP).exists()
                    && wal_dir.join(crate::storage::wal::SPARE).exists(),
                "the spare is still being written after the store closed"
            );
        }
    }

    fn entry_json(term: u64, index: u64) -> Vec<u8> {
        let entry = Entry {
            log_id: log_id(term, index),
            payload: openraft::EntryPayload::Blank,
        };
        serde_json::to_vec(&entry).expect("encode")
    }

    /// A data dir of an earlier build (vote, committed index and purge
    /// point in sled, and entries in sled's old `log` tree) opens with all
    /// of them, durably (a power loss right after the move changes
    /// nothing); the sled store is set aside, and a second open does not
    /// move anything again.
    #[tokio::test]
    async fn an_earlier_builds_sled_store_is_moved_into_the_metadata_file() {
        use crate::storage::{datadir::DataDir, sled_migration};
        let disk = Powered::new();
        drop(DataDir::open(&disk.root, 1).expect("a new data dir"));
        let vote = Vote::new(4, 1);
        let old_log: Vec<(u64, Vec<u8>)> = (11..=20).map(|i| (i, entry_json(4, i))).collect();
        sled_migration::write_old_store(
            disk.root.as_path(),
            &[
                ("vote", serde_json::to_value(vote).expect("json")),
                (
                    "committed",
                    serde_json::to_value(Some(log_id(4, 18))).expect("json"),
                ),
                (
                    "last_purged",
                    serde_json::to_value(log_id(3, 10)).expect("json"),
                ),
            ],
            &old_log,
        )
        .expect("old store");
        disk.everything_durable_now();
        let root = disk.root.as_path();
        for round in 0..2 {
            // The power fails as soon as the move is done (before the log
            // store's open, which syncs what it finds, could cover for it).
            drop(DataDir::open(root, 1).expect("open"));
            disk.power_loss();
            let opened = DataDir::open(root, 1).expect("open after a power loss");
            // (The rename, undone by the power loss, is redone.)
            assert!(
                !root.join(sled_migration::OLD_DIR).exists()
                    && root.join(sled_migration::MIGRATED_DIR).join("db").exists(),
                "round {round}: the sled store was not set aside"
            );
            assert!(!root.join(sled_migration::CHECK_DIR).exists());
            let mut store = open_store_at(&opened);
            let vote_read = store.read_vote().await.expect("vote");
            assert_eq!(vote_read, Some(vote), "round {round}");
            let committed = store.read_committed().await.expect("committed");
            assert_eq!(committed, Some(log_id(4, 18)));
            let state = store.get_log_state().await.expect("state");
            assert_eq!(state.last_purged_log_id, Some(log_id(3, 10)));
            assert_eq!(state.last_log_id, Some(log_id(4, 20)));
            let entries = store.try_get_log_entries(11..=20).await.expect("entries");
            assert_eq!(entries.len(), 10, "round {round}");
        }
    }

    fn open_store_at(dir: &crate::storage::datadir::DataDir) -> LogStore {
        LogStore::open(
            &dir.meta_file,
            &dir.path.join(crate::storage::datadir::WAL_DIR),
        )
        .expect("open the log store")
    }

    /// An earlier build's sled store whose vote its own log proves stale is
    /// refused, with nothing moved or written.
    #[test]
    fn an_earlier_builds_stale_vote_is_refused_before_anything_moves() {
        use crate::storage::{datadir::DataDir, sled_migration};
        let dir = tempfile::tempdir().expect("tempdir");
        drop(DataDir::open(dir.path(), 1).expect("a new data dir"));
        sled_migration::write_old_store(
            dir.path(),
            &[("vote", serde_json::to_value(Vote::new(2, 1)).expect("json"))],
            &[(1, entry_json(3, 1))],
        )
        .expect("old store");
        let before = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect::<std::collections::BTreeSet<_>>();
        let err = DataDir::open(dir.path(), 1).expect_err("a stale vote");
        assert!(
            matches!(
                err,
                crate::storage::datadir::DataDirError::DamagedMeta { .. }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("term 2"), "{err}");
        let after = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect::<std::collections::BTreeSet<_>>();
        assert_eq!(before, after, "the refusal changed the data dir");
    }
}
