//! The Raft log store: entries in our write-ahead log ([`crate::storage::wal`]),
//! the vote, committed index and purge point in sled.
//!
//! Every append and vote is synced before openraft hears it is durable: an
//! acknowledged write is on disk on a quorum. sled 0.34's flush ends in
//! `sync_file_range`, which neither flushes the drive's write cache nor file
//! metadata, so every sled flush here is followed by `fdatasync` of sled's
//! data file.
//!
//! Group commit: `append` writes its entries to the WAL (page cache) and
//! hands its completion callback to one flusher thread; the flusher takes
//! every callback queued meanwhile and covers them all with one
//! `fdatasync`, so under load many appends share a sync.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{LogId, NodeId, StorageError, TypeConfig, storage_io_error};
use crate::storage::wal::{DEFAULT_SEGMENT_SIZE, Wal};

type Entry = openraft::Entry<TypeConfig>;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";
/// The sled tree that held log entries before they moved to the WAL; its
/// entries are moved over on open.
const OLD_LOG_TREE: &[u8] = b"log";

/// The log store. Cloning is cheap and clones share the same files.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: sled::Db,
    meta: sled::Tree,
    wal: Arc<Wal>,
    /// sled's data file, for `fdatasync` after each flush.
    data_file: Arc<SledFiles>,
    /// Completion callbacks of appends waiting for the next sync.
    flusher: Arc<Flusher>,
    /// The committed index openraft last reported, not yet written: it is
    /// a hint, so it is not written (to sled) on every commit, only with
    /// the next vote or purge point, and only once this server's own log
    /// holds it durably (a leader may commit on its followers' syncs
    /// before its own; a restart must not find a committed index past its
    /// log).
    committed: Arc<std::sync::Mutex<Option<Option<LogId>>>>,
    /// The last index appended, and the last one known synced.
    appended: Arc<std::sync::atomic::AtomicU64>,
    durable: Arc<std::sync::atomic::AtomicU64>,
    /// Truncations so far (see `truncate`).
    cuts: Arc<std::sync::atomic::AtomicU64>,
}

type Flush = (LogFlushed<TypeConfig>, std::time::Instant);

/// sled's directory and its data file.
#[derive(Debug)]
struct SledFiles {
    dir: std::path::PathBuf,
    db: Option<std::fs::File>,
}

impl SledFiles {
    /// After a sled flush: `fdatasync` of the data file, which makes the
    /// flushed state durable (sled's own flush ends in `sync_file_range`).
    fn sync(&self) -> std::io::Result<()> {
        crate::storage::durable::sync_store(self.db.as_ref(), &self.dir)
    }
}

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
    #[error("raft metadata (sled): {0}")]
    Meta(#[from] sled::Error),
    #[error("raft log {path}: {source}")]
    Wal {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("raft metadata: {0}")]
    Decode(String),
}

impl OpenError {
    /// The log is damaged (not an I/O failure): it was left unchanged, and
    /// the server can be rebuilt from the others.
    pub fn is_damage(&self) -> bool {
        matches!(self, OpenError::Wal { source, .. } if source.kind() == std::io::ErrorKind::InvalidData)
    }
}

impl LogStore {
    /// Opens the log: metadata in `db` (whose files live in `sled_dir`),
    /// entries in the WAL in `wal_dir`. Starts the flusher thread (it ends,
    /// and is waited for, when the last clone of the store is dropped).
    pub fn open(db: &sled::Db, sled_dir: &Path, wal_dir: &Path) -> Result<Self, OpenError> {
        Self::open_with_segment_size(db, sled_dir, wal_dir, DEFAULT_SEGMENT_SIZE)
    }

    pub fn open_with_segment_size(
        db: &sled::Db,
        sled_dir: &Path,
        wal_dir: &Path,
        segment_size: u64,
    ) -> Result<Self, OpenError> {
        let meta = db.open_tree("raft_meta")?;
        let purged: Option<LogId> = match meta.get(LAST_PURGED)? {
            Some(bytes) => {
                Some(serde_json::from_slice(&bytes).map_err(|e| OpenError::Decode(e.to_string()))?)
            }
            None => None,
        };
        // The committed index bounds what a torn tail may take away.
        let committed: Option<LogId> = match meta.get(COMMITTED)? {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| OpenError::Decode(e.to_string()))?
            }
            None => None,
        };
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
        let data_file = Arc::new(SledFiles {
            dir: sled_dir.to_owned(),
            db: std::fs::File::open(sled_dir.join("db")).ok(),
        });
        move_old_log(db, &wal, &data_file).map_err(wal_error)?;
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
            db: db.clone(),
            meta,
            wal,
            data_file,
            flusher,
            committed: Arc::default(),
            appended,
            durable,
            cuts,
        })
    }

    async fn flush_meta(&self, subject: ErrorSubject<NodeId>) -> Result<(), StorageError> {
        let pending = *self.committed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(committed) = pending {
            let durable = self.durable.load(std::sync::atomic::Ordering::Acquire);
            if committed.is_none_or(|c| c.index <= durable) {
                self.write_meta(COMMITTED, &committed, ErrorSubject::Store)?;
                let mut slot = self.committed.lock().unwrap_or_else(|e| e.into_inner());
                if *slot == pending {
                    *slot = None;
                }
            }
        }
        flush_durably(&self.db, &self.data_file)
            .await
            .map_err(|e| storage_io_error(subject, ErrorVerb::Write, e))
    }

    fn read_meta<T: DeserializeOwned>(
        &self,
        key: &[u8],
        subject: ErrorSubject<NodeId>,
    ) -> Result<Option<T>, StorageError> {
        let Some(bytes) = self
            .meta
            .get(key)
            .map_err(|e| storage_io_error(subject.clone(), ErrorVerb::Read, e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| storage_io_error(subject, ErrorVerb::Read, e))
    }

    fn write_meta<T: Serialize>(
        &self,
        key: &[u8],
        value: &T,
        subject: ErrorSubject<NodeId>,
    ) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| storage_io_error(subject.clone(), ErrorVerb::Write, e))?;
        self.meta
            .insert(key, bytes)
            .map(|_| ())
            .map_err(|e| storage_io_error(subject, ErrorVerb::Write, e))
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
        matches!(self.meta.get(VOTE), Ok(Some(_)))
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

/// Moves entries left in sled's `log` tree by an earlier build into the
/// WAL (synced), then drops the tree.
fn move_old_log(db: &sled::Db, wal: &Wal, data_file: &SledFiles) -> std::io::Result<()> {
    let names = db.tree_names();
    if !names.iter().any(|n| n.as_ref() == OLD_LOG_TREE) {
        return Ok(());
    }
    let tree = db.open_tree(OLD_LOG_TREE).map_err(std::io::Error::other)?;
    if tree.is_empty() {
        return Ok(());
    }
    if wal.bounds().is_some() {
        return Err(std::io::Error::other(
            "log entries both in sled and in the WAL; refusing to guess which is right",
        ));
    }
    let mut moved = 0usize;
    for item in tree.iter() {
        let (key, bytes) = item.map_err(std::io::Error::other)?;
        let mut index = [0u8; 8];
        if key.len() != 8 {
            return Err(std::io::Error::other("bad key in the old sled log"));
        }
        index.copy_from_slice(&key);
        wal.append(u64::from_be_bytes(index), &bytes)?;
        moved += 1;
    }
    for file in wal.take_dirty() {
        crate::storage::durable::sync_data(&file)?;
    }
    db.drop_tree(OLD_LOG_TREE).map_err(std::io::Error::other)?;
    db.flush().map_err(std::io::Error::other)?;
    data_file.sync()?;
    tracing::info!(entries = moved, "moved the raft log from sled to the WAL");
    Ok(())
}

/// sled flush, then `fdatasync` of its data file.
async fn flush_durably(db: &sled::Db, data_file: &Arc<SledFiles>) -> std::io::Result<()> {
    db.flush_async().await.map_err(std::io::Error::other)?;
    let files = Arc::clone(data_file);
    tokio::task::spawn_blocking(move || files.sync())
        .await
        .map_err(std::io::Error::other)?
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
        let last_purged_log_id: Option<LogId> = self.read_meta(LAST_PURGED, ErrorSubject::Logs)?;
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
        self.write_meta(VOTE, vote, ErrorSubject::Vote)?;
        self.flush_meta(ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.read_meta(VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Kept in memory, written with the next vote or purge point (see
        // `committed`): openraft treats it as a hint that speeds up a
        // restart, and losing the latest one is safe.
        *self.committed.lock().unwrap_or_else(|e| e.into_inner()) = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        if let Some(pending) = *self.committed.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(pending);
        }
        Ok(self
            .read_meta::<Option<LogId>>(COMMITTED, ErrorSubject::Store)?
            .flatten())
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
        self.write_meta(LAST_PURGED, &log_id, ErrorSubject::Logs)?;
        self.flush_meta(ErrorSubject::Logs).await?;
        self.wal
            .purge(log_id.index)
            .map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::power_loss::Powered;

    fn open_store(root: &Path) -> (sled::Db, LogStore) {
        let sled_dir = root.join("raft");
        let db = sled::Config::new()
            .path(&sled_dir)
            .flush_every_ms(None)
            .open()
            .expect("sled");
        let store = LogStore::open_with_segment_size(&db, &sled_dir, &root.join("wal"), 4096)
            .expect("open");
        (db, store)
    }

    /// A saved vote, and a purge point with the segments it let go, are
    /// durable when the call returns: after a power loss the store opens
    /// with that vote (Raft's safety rests on it) and its log.
    #[tokio::test]
    async fn the_vote_and_the_purge_point_survive_a_power_loss() {
        let disk = Powered::new();
        let (db, mut store) = open_store(&disk.root);
        for i in 1..=200u64 {
            store
                .wal
                .append(i, format!("entry {i} {}", "x".repeat(60)).as_bytes())
                .expect("append");
        }
        for file in store.wal.take_dirty() {
            crate::storage::durable::sync_data(&file).expect("sync");
        }
        let vote = Vote::new(7, 2);
        store.save_vote(&vote).await.expect("save vote");
        let purged = LogId::new(openraft::CommittedLeaderId::new(7, 2), 150);
        store.purge(purged).await.expect("purge");
        drop(store);
        drop(db);
        disk.power_loss();
        let (_db, mut store) = open_store(&disk.root);
        assert_eq!(store.read_vote().await.expect("read vote"), Some(vote));
        let read: Option<LogId> = store
            .read_meta(LAST_PURGED, ErrorSubject::Logs)
            .expect("read purge point");
        assert_eq!(read, Some(purged));
        assert_eq!(store.wal.bounds(), Some((151, 200)));
    }

    #[test]
    fn a_dropped_store_leaves_no_thread_at_work_in_its_directory() {
        // The WAL starts making a 64 MiB spare segment on open; the store's
        // drop waits for the flusher, which holds the WAL, which waits for
        // the spare. Without that, a reopen could race the spare's writer.
        let dir = tempfile::tempdir().expect("tempdir");
        let sled_dir = dir.path().join("sled");
        let wal_dir = dir.path().join("wal");
        for _ in 0..2 {
            let db = sled::open(&sled_dir).expect("sled");
            let store =
                LogStore::open_with_segment_size(&db, &sled_dir, &wal_dir, 64 << 20).expect("open");
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
}
