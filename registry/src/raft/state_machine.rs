//! The state machine adapter: applies committed entries to the in-memory
//! [`State`], builds and installs snapshots, and persists the latest
//! snapshot in a file ([`SnapshotFile`]) so a restart rebuilds the state
//! from it plus the log after it.

use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    BasicNode, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{LogId, NodeId, StorageError, TypeConfig, storage_io_error};
use crate::command::CommandResponse;
use crate::state::State;
use crate::storage::snapshot_file::SnapshotFile;

type Entry = openraft::Entry<TypeConfig>;
type Membership = StoredMembership<NodeId, BasicNode>;

/// The state as readers see it, shared between the state machine (the only
/// writer) and the APIs.
///
/// Lock rule: the `RwLock` is held only for in-memory work, never across an
/// `.await` or I/O; readers copy out what they need.
#[derive(Debug)]
pub struct SharedState {
    state: RwLock<State>,
    /// Index of the last applied entry: blocking queries wait on it.
    applied: watch::Sender<u64>,
    /// The state after each of the last applied entries, oldest first
    /// (cheap: the maps are persistent and share what did not change).
    /// Watch streams diff against them to resume a client on any server.
    versions: std::sync::Mutex<std::collections::VecDeque<(Instant, State)>>,
    /// key → until when its lock cannot be acquired (lock-delay), on this
    /// server's clock: started when the invalidation that released the
    /// lock was applied here. Only the leader consults it.
    lock_delays: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
}

/// Past this many lock-delays, expired ones are swept when one is added.
const LOCK_DELAY_SWEEP: usize = 1024;

/// At most this many recent versions are kept...
const MAX_VERSIONS: usize = 256;
/// ...and none older than this.
const MAX_VERSION_AGE: Duration = Duration::from_secs(120);

impl SharedState {
    pub(crate) fn new(state: State) -> Self {
        let index = state.last_index;
        Self {
            state: RwLock::new(state),
            applied: watch::Sender::new(index),
            versions: std::sync::Mutex::new(std::collections::VecDeque::new()),
            lock_delays: std::sync::Mutex::default(),
        }
    }

    /// Until when `key`'s lock may not be acquired, if a lock-delay runs.
    pub fn lock_delay(&self, key: &str) -> Option<Instant> {
        let delays = self.lock_delays.lock().unwrap_or_else(|e| e.into_inner());
        delays
            .get(key)
            .copied()
            .filter(|until| *until > Instant::now())
    }

    /// Starts the lock-delays that the entry just applied began.
    fn begin_lock_delays(&self, begun: Vec<(String, u64)>) {
        if begun.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut delays = self.lock_delays.lock().unwrap_or_else(|e| e.into_inner());
        if delays.len() > LOCK_DELAY_SWEEP {
            delays.retain(|_, until| *until > now);
        }
        for (key, nanos) in begun {
            delays.insert(key, now + Duration::from_nanos(nanos));
        }
    }

    fn versions(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(Instant, State)>> {
        self.versions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `state` as the version after its last applied entry.
    fn record_version(&self, state: &State) {
        let now = Instant::now();
        let mut versions = self.versions();
        versions.push_back((now, state.clone()));
        while versions.len() > MAX_VERSIONS
            || versions
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > MAX_VERSION_AGE)
        {
            versions.pop_front();
        }
    }

    /// The state as it was right after entry `index` was applied, if this
    /// server still keeps that version.
    pub fn version_at(&self, index: u64) -> Option<State> {
        let versions = self.versions();
        let pos = versions
            .binary_search_by_key(&index, |(_, s)| s.last_index)
            .ok()?;
        versions.get(pos).map(|(_, s)| s.clone())
    }

    /// Read access to the state. A poisoned lock means a panic while
    /// applying, after which nothing is trustworthy: propagate it.
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The index of the last applied entry.
    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// A receiver that changes whenever an entry is applied.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn replace(&self, state: State) {
        let index = state.last_index;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
        self.versions().clear();
        self.applied.send_replace(index);
    }
}

/// What a snapshot holds: the state plus Raft's bookkeeping at its index.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotPayload {
    last_applied: Option<LogId>,
    last_membership: Membership,
    state: State,
}

/// openraft's state machine, backed by [`SharedState`].
#[derive(Debug)]
pub struct StateMachineStore {
    shared: Arc<SharedState>,
    last_applied: Option<LogId>,
    last_membership: Membership,
    snapshots: SnapshotFile,
    /// Distinguishes snapshots built at the same index.
    snapshot_seq: u64,
}

impl StateMachineStore {
    /// Opens the state machine, loading the last persisted snapshot.
    pub fn open(snapshot_dir: &Path) -> Result<Self, StorageError> {
        let snapshots = SnapshotFile::new(snapshot_dir)
            .map_err(|e| storage_io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
        let mut store = Self {
            shared: Arc::new(SharedState::new(State::default())),
            last_applied: None,
            last_membership: Membership::default(),
            snapshots,
            snapshot_seq: 0,
        };
        if let Some(snapshot) = store.read_snapshot()? {
            let payload = decode_payload(snapshot.snapshot.get_ref())?;
            store.last_applied = payload.last_applied;
            store.last_membership = payload.last_membership;
            store.shared.replace(payload.state);
        }
        Ok(store)
    }

    pub fn shared(&self) -> Arc<SharedState> {
        Arc::clone(&self.shared)
    }

    fn read_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let read_err =
            |e: std::io::Error| storage_io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e);
        let Some((meta, data)) = self.snapshots.read().map_err(read_err)? else {
            return Ok(None);
        };
        let meta: SnapshotMeta<NodeId, BasicNode> = serde_json::from_slice(&meta)
            .map_err(|e| storage_io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }

    async fn persist_snapshot(
        files: &SnapshotFile,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, StorageError> {
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let meta_bytes = serde_json::to_vec(meta)
            .map_err(|e| storage_io_error(subject.clone(), ErrorVerb::Write, e))?;
        let files = files.clone();
        // File I/O off the async workers.
        tokio::task::spawn_blocking(move || files.write(&meta_bytes, &data).map(|()| data))
            .await
            .map_err(|e| {
                storage_io_error(
                    subject.clone(),
                    ErrorVerb::Write,
                    std::io::Error::other(e.to_string()),
                )
            })?
            .map_err(|e| storage_io_error(subject, ErrorVerb::Write, e))
    }
}

fn decode_payload(bytes: &[u8]) -> Result<SnapshotPayload, StorageError> {
    serde_json::from_slice(bytes)
        .map_err(|e| storage_io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))
}

/// Builds a snapshot from a copy of the state taken under a short read lock.
#[derive(Debug)]
pub struct SnapshotBuilder {
    payload: SnapshotPayload,
    snapshots: SnapshotFile,
    snapshot_id: String,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let meta = SnapshotMeta {
            last_log_id: self.payload.last_applied,
            last_membership: self.payload.last_membership.clone(),
            snapshot_id: self.snapshot_id.clone(),
        };
        let write_err = |e: std::io::Error| {
            storage_io_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                e,
            )
        };
        let meta_bytes = serde_json::to_vec(&meta).map_err(|e| write_err(e.into()))?;
        let started = Instant::now();
        let payload = std::mem::replace(
            &mut self.payload,
            SnapshotPayload {
                last_applied: None,
                last_membership: Membership::default(),
                state: State::default(),
            },
        );
        // Encoding a large state is seconds of CPU and hundreds of megabytes
        // of disk writes: done on a thread of its own at a low priority,
        // streamed into the file, so that the async workers carrying
        // heartbeats and client writes, and the Raft log's syncs, go first.
        let files = self.snapshots.clone();
        let (done, result) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("raft-snapshot".into())
            .spawn(move || {
                crate::storage::lower_this_threads_priority();
                let written = files.write_with(&meta_bytes, |out| {
                    serde_json::to_writer(out, &payload).map_err(std::io::Error::from)
                });
                let _ = done.send(written);
            })
            .map_err(write_err)?;
        let bytes = result
            .await
            .map_err(|_| write_err(std::io::Error::other("the snapshot thread stopped")))?
            .map_err(write_err)?;
        crate::metrics::METRICS.snapshot_built(bytes as usize, started.elapsed());
        tracing::info!(
            snapshot = %meta.snapshot_id,
            bytes,
            took_ms = started.elapsed().as_millis() as u64,
            "snapshot built"
        );
        // openraft 0.9 keeps only the meta of a snapshot it asked for (its
        // state machine worker drops the data); when a follower needs the
        // snapshot it asks `get_current_snapshot`, which reads the file.
        // So the data is not read back into memory here.
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let started = Instant::now();
        let mut responses = Vec::new();
        let mut last_index = None;
        {
            let mut state = self.shared.state.write().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                let index = entry.log_id.index;
                self.last_applied = Some(entry.log_id);
                last_index = Some(index);
                let response = match entry.payload {
                    EntryPayload::Blank => {
                        state.apply_noop(index);
                        CommandResponse::Empty
                    }
                    EntryPayload::Normal(ref command) => {
                        crate::command::apply(&mut state, index, command)
                    }
                    EntryPayload::Membership(ref membership) => {
                        self.last_membership =
                            StoredMembership::new(Some(entry.log_id), membership.clone());
                        state.apply_noop(index);
                        CommandResponse::Empty
                    }
                };
                self.shared
                    .begin_lock_delays(std::mem::take(&mut state.lock_delays_begun.0));
                self.shared.record_version(&state);
                responses.push(response);
            }
        }
        if let Some(index) = last_index {
            self.shared.applied.send_replace(index);
        }
        crate::metrics::METRICS.raft_applied(started.elapsed());
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        let state = self.shared.read().clone();
        let snapshot_id = match self.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, self.snapshot_seq),
            None => format!("0-0-{}", self.snapshot_seq),
        };
        SnapshotBuilder {
            payload: SnapshotPayload {
                last_applied: self.last_applied,
                last_membership: self.last_membership.clone(),
                state,
            },
            snapshots: self.snapshots.clone(),
            snapshot_id,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let payload = decode_payload(&data)?;
        let data = Self::persist_snapshot(&self.snapshots, meta, data).await?;
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        let mut state = payload.state;
        if let Some(id) = meta.last_log_id {
            state.last_index = state.last_index.max(id.index);
        }
        self.shared.replace(state);
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        self.read_snapshot()
    }
}
