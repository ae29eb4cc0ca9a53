//! The Raft log, vote and committed index in sled.
//!
//! Trees: `log` (big-endian index → JSON entry) and `meta` (vote, committed,
//! last purged log id). sled only writes back in the background unless told
//! to, so every append and vote is flushed before openraft hears it is
//! durable: an acknowledged write is on disk on a quorum.
//!
//! Durability: sled 0.34's flush ends in `sync_file_range`, which neither
//! flushes the drive's write cache nor file metadata; every flush here is
//! followed by `fdatasync` of sled's data file.
//!
//! Group commit: `append` hands its completion callback to one flusher
//! task and returns; the flusher takes every callback queued meanwhile and
//! covers them all with one flush, so under load many appends share an
//! fsync.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{LogId, NodeId, StorageError, TypeConfig, storage_io_error};

type Entry = openraft::Entry<TypeConfig>;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// The log store. Cloning is cheap and clones share the same trees.
#[derive(Debug, Clone)]
pub struct SledLogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    /// sled's data file, for `fdatasync` after each flush.
    data_file: Arc<Option<std::fs::File>>,
    /// Completion callbacks of appends waiting for the next flush.
    flusher: std::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
}

impl SledLogStore {
    /// Opens the log in `db`, whose files live in `dir`, and starts the
    /// flusher thread (it ends when the last clone of the store is dropped).
    pub fn open(db: &sled::Db, dir: &Path) -> Result<Self, sled::Error> {
        let data_file = Arc::new(std::fs::File::open(dir.join("db")).ok());
        let (flusher, pending) = std::sync::mpsc::channel();
        let (flush_db, flush_file) = (db.clone(), Arc::clone(&data_file));
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flush_appends(&flush_db, &flush_file, &pending))
            .map_err(|e| sled::Error::Io(std::io::Error::other(e.to_string())))?;
        Ok(Self {
            db: db.clone(),
            log: db.open_tree("log")?,
            meta: db.open_tree("raft_meta")?,
            data_file,
            flusher,
        })
    }

    async fn flush(&self, subject: ErrorSubject<NodeId>) -> Result<(), StorageError> {
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
        match self
            .log
            .last()
            .map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Read, e))?
        {
            Some((_, bytes)) => Ok(Some(Self::decode_entry(&bytes)?.log_id)),
            None => Ok(None),
        }
    }

    /// Number of entries currently kept in the log (for metrics and tests).
    pub fn len(&self) -> usize {
        self.log.len()
    }

    pub fn is_empty(&self) -> bool {
        self.log.is_empty()
    }
}

/// sled flush, then `fdatasync` of its data file.
async fn flush_durably(
    db: &sled::Db,
    data_file: &Arc<Option<std::fs::File>>,
) -> std::io::Result<()> {
    db.flush_async().await.map_err(std::io::Error::other)?;
    let file = Arc::clone(data_file);
    tokio::task::spawn_blocking(move || match file.as_ref() {
        Some(file) => file.sync_data(),
        None => Ok(()),
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The flusher thread: one durable flush per batch of queued appends. A
/// plain thread, because flushing blocks: no async worker waits on disk.
fn flush_appends(
    db: &sled::Db,
    data_file: &Option<std::fs::File>,
    pending: &std::sync::mpsc::Receiver<LogFlushed<TypeConfig>>,
) {
    while let Ok(first) = pending.recv() {
        let mut batch = vec![first];
        while let Ok(more) = pending.try_recv() {
            batch.push(more);
        }
        let result = db
            .flush()
            .map(|_| ())
            .map_err(std::io::Error::other)
            .and_then(|()| data_file.as_ref().map_or(Ok(()), std::fs::File::sync_data));
        if let Err(e) = &result {
            tracing::error!(error = %e, "raft log flush failed");
        }
        for callback in batch {
            callback.log_io_completed(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl RaftLogReader<TypeConfig> for SledLogStore {
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
        let mut out = Vec::new();
        for item in self.log.range(index_key(start)..) {
            let (key, bytes) =
                item.map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            let mut index_bytes = [0u8; 8];
            index_bytes.copy_from_slice(&key);
            let index = u64::from_be_bytes(index_bytes);
            if !range.contains(&index) {
                break;
            }
            out.push(Self::decode_entry(&bytes)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for SledLogStore {
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
        self.flush(ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.read_meta(VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed: openraft treats the committed index as a hint that
        // speeds up restart; losing the latest one is safe.
        self.write_meta(COMMITTED, &committed, ErrorSubject::Store)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
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
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry)
                .map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            batch.insert(&index_key(entry.log_id.index), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        // Durable once the flusher's next flush completes.
        self.flusher.send(callback).map_err(|_| {
            storage_io_error(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                std::io::Error::other("the log flusher has stopped"),
            )
        })
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(index_key(log_id.index)..) {
            let (key, _) =
                item.map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
            batch.remove(key);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        self.flush(ErrorSubject::Logs).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash between the two steps leaves
        // extra entries below it, which reads never reach.
        self.write_meta(LAST_PURGED, &log_id, ErrorSubject::Logs)?;
        self.flush(ErrorSubject::Logs).await?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=index_key(log_id.index)) {
            let (key, _) =
                item.map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
            batch.remove(key);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| storage_io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}
