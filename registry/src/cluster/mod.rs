//! One registry server's view of the cluster: the Raft handle, the shared
//! state, and the operations every API needs — writes from any server
//! (forwarded to the leader), read barriers for the three consistency
//! modes, and membership changes. Callers never need to know who leads.
//! [`forward`] is the internal gRPC service that answers the other
//! servers: Raft RPCs, and what followers forward to the leader.

pub mod failover;
pub mod forward;
pub mod with_leader;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshwork_proto::v1::{
    ErrorKind, ForwardWriteRequest, JoinRequest, ReadIndexRequest, RemoveServerRequest,
    RenewSessionRequest,
};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use tokio::time::Instant;

use crate::command::{Command, CommandResponse};
use crate::raft::network::PeerChannels;
use crate::raft::state_machine::SharedState;
use crate::raft::{NodeId, Raft};
use with_leader::{Leader, Leadership, with_leader};

/// How a read may be served (Consul's three modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// From the leader's state (a follower first catches up to it).
    #[default]
    Default,
    /// As default, after the leader confirms leadership with a quorum.
    Consistent,
    /// From this server's state, however old.
    Stale,
}

/// Why a cluster operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    /// No leader could be reached within the wait bound.
    #[error("No cluster leader")]
    NoLeader,
    /// The write was sent but its fate is unknown (connection lost).
    #[error("write outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The cluster refused the request as invalid.
    #[error("{0}")]
    Rejected(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A command's result once it is committed and applied.
#[derive(Debug, Clone)]
pub struct Applied {
    pub index: u64,
    pub response: CommandResponse,
}

/// A server in the Raft configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    pub raft_addr: String,
    pub voter: bool,
    /// Its node name, once this server has heard of it
    /// ([`crate::raft::directory`]).
    pub name: Option<String>,
}

impl Member {
    /// Its name, or `meshwork-<id>` while unknown.
    pub fn display_name(&self) -> String {
        display_name(self.id, self.name.as_deref())
    }
}

/// A server's name, or `meshwork-<id>` while unknown.
pub fn display_name(id: NodeId, name: Option<&str>) -> String {
    name.map_or_else(|| format!("meshwork-{id}"), str::to_owned)
}

/// Handle shared by every API of one server.
pub struct RegistryNode {
    pub id: NodeId,
    pub raft: Raft,
    pub state: Arc<SharedState>,
    pub channels: PeerChannels,
    /// How long an operation waits for a leader before "No cluster leader".
    pub leader_wait: Duration,
    /// Raft's (minimum) election timeout.
    pub election_timeout: Duration,
    /// When this follower last heard from a leader (AppendEntries).
    last_contact: Mutex<Option<std::time::Instant>>,
    /// When an AppendEntries or snapshot piece last *arrived* (before it
    /// is processed: a follower slowed down by its own disk or a snapshot
    /// build still hears a live leader). What the failover watcher goes by.
    last_heard: Mutex<Option<std::time::Instant>>,
    /// The known leader, changed only when it changes (cheaper to wait on
    /// than Raft's metrics, which change with every entry).
    leader_now: tokio::sync::watch::Sender<Option<NodeId>>,
    /// Set on a server that starts with no vote recorded and joins a
    /// running cluster (a new server, or one rebuilt after its data dir
    /// was set aside): it grants no vote until a leader has reached it.
    /// A rebuilt server has forgotten which candidate it voted for in its
    /// last term; granting a second vote in that term could elect two
    /// leaders. Hearing from a leader moves it to the current term, where
    /// that cannot happen.
    withholding_votes: std::sync::atomic::AtomicBool,
    /// Queue of writes proposed on this server, batched into log entries.
    batcher: tokio::sync::mpsc::Sender<BatchItem>,
    /// On the leader: (term, index) — the last log index when this process
    /// first served a read as leader of that term. Reads wait for it: a
    /// leader restarted from its data dir resumes its term without an
    /// election (openraft keeps its own vote), and the committed index it
    /// restored may trail entries it had committed (and acknowledged)
    /// before the crash; those are all in its log, so a read index at or
    /// past its log's end as of leadership covers them.
    read_floor: Mutex<(u64, u64)>,
    /// On the leader: when each TTL check was last updated by a client.
    /// In memory only: a new leader gives every TTL a full period.
    ttl_touches: Mutex<HashMap<(String, String), tokio::time::Instant>>,
    /// On the leader: when each Consul session was last renewed. In memory
    /// only: a new leader gives every session a full TTL.
    session_renewals: Mutex<SessionClock>,
    /// On the leader: (term, when) of the last confirmation that a quorum
    /// still follows it, which session renewals rely on (a leader cut off
    /// from its quorum must not keep confirming renewals while the other
    /// side elects a leader that expires them)...
    quorum_seen: Mutex<Option<(u64, std::time::Instant)>>,
    /// ...and one confirmation at a time, shared by the renewals waiting.
    quorum_check: tokio::sync::Mutex<()>,
}

/// The leader's clock of Consul sessions.
#[derive(Debug, Default)]
pub struct SessionClock {
    /// When each session was last renewed through this leader, or first
    /// seen by it.
    pub last: HashMap<String, tokio::time::Instant>,
    /// Sessions whose expiry was decided and is being written: a renewal
    /// arriving now finds them gone (404), not renewed.
    pub expiring: std::collections::HashSet<String>,
}

impl std::fmt::Debug for BatchItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchItem").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RegistryNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryNode")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl RegistryNode {
    /// Creates the handle and starts its write batcher (inside a runtime).
    pub fn new(
        id: NodeId,
        raft: Raft,
        state: Arc<SharedState>,
        channels: PeerChannels,
        leader_wait: Duration,
        election_timeout: Duration,
    ) -> Self {
        let (batcher, queue) = tokio::sync::mpsc::channel(4096);
        tokio::spawn(run_batcher(raft.clone(), queue, leader_wait));
        let leader_now = tokio::sync::watch::Sender::new(raft.metrics().borrow().current_leader);
        tokio::spawn(follow_leader(raft.metrics(), leader_now.clone()));
        Self {
            id,
            raft,
            state,
            channels,
            leader_wait,
            election_timeout,
            last_contact: Mutex::new(None),
            last_heard: Mutex::new(None),
            leader_now,
            withholding_votes: std::sync::atomic::AtomicBool::new(false),
            read_floor: Mutex::new((0, 0)),
            ttl_touches: Mutex::new(HashMap::new()),
            session_renewals: Mutex::default(),
            quorum_seen: Mutex::new(None),
            quorum_check: tokio::sync::Mutex::new(()),
            batcher,
        }
    }

    /// Called by the internal service on every AppendEntries from a leader.
    pub fn touch_leader_contact(&self) {
        *self.last_contact.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now());
        if self
            .withholding_votes
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!("a leader reached this server: it grants votes again");
        }
    }

    /// When this server last heard from a leader (AppendEntries or a
    /// snapshot, once processed), if ever since it started.
    pub fn last_leader_contact(&self) -> Option<std::time::Instant> {
        *self.last_contact.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by the internal service when an AppendEntries or a snapshot
    /// piece arrives, before it is processed.
    pub fn heard_from_leader(&self) {
        *self.last_heard.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now());
    }

    /// When a leader's request last arrived (processed or not), or was
    /// last processed, whichever is later: how long a leader has really
    /// been silent.
    pub fn last_leader_heard(&self) -> Option<std::time::Instant> {
        let heard = *self.last_heard.lock().unwrap_or_else(|p| p.into_inner());
        heard.max(self.last_leader_contact())
    }

    /// What this server knows of its leader and the end of its log (the
    /// internal `FollowerState` call; see [`failover`]).
    pub fn follower_state(&self) -> meshwork_proto::v1::FollowerStateReply {
        let (leader_id, leading) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            (
                m.current_leader.unwrap_or(0),
                m.state == ServerState::Leader,
            )
        };
        let last_log = self.raft.data_metrics().borrow().last_log;
        meshwork_proto::v1::FollowerStateReply {
            leader_id,
            leading,
            silent_ms: self
                .last_leader_heard()
                .map_or(u64::MAX, |t| t.elapsed().as_millis() as u64),
            last_log_term: last_log.map_or(0, |l| l.leader_id.term),
            last_log_index: last_log.map_or(0, |l| l.index),
        }
    }

    /// Grants no vote until a leader has reached this server (see
    /// `withholding_votes`).
    pub fn withhold_votes_until_leader(&self) {
        self.withholding_votes
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("no vote recorded: this server grants no vote until a leader reaches it");
    }

    /// Whether a vote request may be answered.
    pub fn grants_votes(&self) -> bool {
        !self
            .withholding_votes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether this server knows a leader, and how long ago it heard from
    /// it (0 on the leader), as Consul's `X-Consul-KnownLeader` and
    /// `X-Consul-LastContact`.
    pub fn leader_contact(&self) -> (bool, Duration) {
        // Borrowed, not cloned: this runs on every read's answer, and the
        // metrics carry the membership and replication maps.
        let (leading, known) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            (m.state == ServerState::Leader, m.current_leader.is_some())
        };
        if leading {
            return (true, Duration::ZERO);
        }
        let since = self
            .last_contact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(Duration::ZERO, |t| t.elapsed());
        (known, since)
    }

    /// What `/metrics` reports of this node: Raft progress, leadership
    /// and the size of the state.
    pub fn readings(&self) -> crate::metrics::NodeReadings {
        let m = self.raft.metrics().borrow().clone();
        let state = self.state.read();
        crate::metrics::NodeReadings {
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            is_leader: self.is_leader(),
            services: state.catalog.service_names().len(),
            nodes: state.catalog.nodes().count(),
            keys: state.kv.len(),
            tombstones: state.kv.tombstones(),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// The leader's id and Raft address, as this server believes.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        // Borrowed, not cloned: every write and read barrier asks.
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    /// The servers in the current Raft configuration.
    pub fn members(&self) -> Vec<Member> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                raft_addr: node.addr.clone(),
                voter: voters.contains(id),
                name: self.channels.directory.get(*id).map(|s| s.name),
            })
            .collect()
    }

    /// Index of the configuration entry (for `/v1/operator/raft/configuration`).
    pub fn membership_index(&self) -> u64 {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .log_id()
            .map_or(0, |l| l.index)
    }

    /// Proposes `command` and answers once it is committed and applied,
    /// forwarding to the leader when this server does not lead.
    pub async fn write(&self, command: Command) -> Result<Applied, ClusterError> {
        let applied = self.write_anywhere(command).await?;
        // Read-your-writes on this server: answer once its own state has
        // applied the write too (bounded; the write is committed either way).
        let mut local = self.state.subscribe();
        let _ =
            tokio::time::timeout(self.leader_wait, local.wait_for(|i| *i >= applied.index)).await;
        Ok(applied)
    }

    async fn write_anywhere(&self, command: Command) -> Result<Applied, ClusterError> {
        let deadline = Instant::now() + self.leader_wait;
        let command = &command;
        with_leader(self, deadline, self.leader_wait, |to| async move {
            match to {
                Leader::Here => self.write_local(command.clone()).await,
                Leader::There(addr) => self.forward_write(&addr, command).await,
            }
        })
        .await
    }

    /// Proposes on this server, which believes it leads.
    /// When a client last updated the TTL check `key` through this leader.
    pub fn ttl_touched(&self, key: &(String, String)) -> Option<tokio::time::Instant> {
        self.ttl_touches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
    }

    /// Records, on the leader, that `key`'s TTL or session was renewed now.
    pub fn touch(&self, key: (String, String)) {
        self.ttl_touches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, tokio::time::Instant::now());
    }

    pub(crate) async fn write_local(&self, command: Command) -> Result<Applied, WriteAttempt> {
        // A status update renews a TTL check. Not a session: only the
        // sidecar's heartbeats renew those (and the leader's own expiry
        // write must not count as one).
        if let Command::CheckUpdate { node, check_id, .. } = &command
            && check_id != crate::state::catalog::SESSION_CHECK_ID
        {
            self.ttl_touches
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    (node.clone(), check_id.clone()),
                    tokio::time::Instant::now(),
                );
        }
        // Lock-delay is wall-clock time, so it is enforced here, on the
        // leader, before the write is proposed (as Consul does).
        if let Command::KvLock { key, .. } = &command
            && let Some(until) = self.state.lock_delay(key)
        {
            tracing::warn!(
                key = %key,
                remaining_ms = until.saturating_duration_since(std::time::Instant::now()).as_millis() as u64,
                "refusing a lock acquisition: the key's lock-delay runs"
            );
            return Ok(Applied {
                index: self.state.applied_index(),
                response: CommandResponse::Applied(false),
            });
        }
        if let Command::Txn(ops) = &command
            && let Some(refused) = self.txn_lock_delayed(ops)
        {
            return Ok(Applied {
                index: self.state.applied_index(),
                response: CommandResponse::Txn(refused),
            });
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let proposed = std::time::Instant::now();
        if self
            .batcher
            .send(BatchItem { command, reply })
            .await
            .is_err()
        {
            return Err(WriteAttempt::Failed(ClusterError::Internal(
                "the write batcher has stopped".into(),
            )));
        }
        let outcome = answer.await.unwrap_or_else(|_| {
            Err(WriteAttempt::Failed(ClusterError::Internal(
                "the write batcher dropped a write".into(),
            )))
        });
        if outcome.is_ok() {
            crate::metrics::METRICS.raft_written(proposed.elapsed());
        }
        outcome
    }

    /// A transaction refused because one of its lock operations names a
    /// key whose lock-delay runs (Consul's message).
    fn txn_lock_delayed(
        &self,
        ops: &[crate::state::txn::TxnOp],
    ) -> Option<crate::state::txn::TxnOutcome> {
        use crate::state::txn::{KvVerb, TxnError, TxnOp, TxnOutcome};
        ops.iter().enumerate().find_map(|(op_index, op)| match op {
            TxnOp::Kv(kv)
                if kv.verb == KvVerb::Lock && self.state.lock_delay(&kv.key).is_some() =>
            {
                Some(TxnOutcome {
                    results: Vec::new(),
                    errors: vec![TxnError {
                        op_index,
                        what: format!("failed to lock key {:?} due to lock delay", kv.key),
                    }],
                })
            }
            _ => None,
        })
    }

    /// Runs `call`, a request to the leader at `leader_addr`, unless that
    /// is not the leader this server knows (`Replaced::Before`: nothing was
    /// sent), and gives up on it once another leader is known
    /// (`Replaced::During`): a leader that crashed, was cut off or paused
    /// may never answer, and waiting out the call's timeout would hold the
    /// client past the failover.
    pub(crate) async fn unless_replaced<T>(
        &self,
        leader_addr: &str,
        call: impl std::future::Future<Output = T>,
    ) -> Result<T, Replaced> {
        let mut leader_now = self.leader_now.subscribe();
        let known = *leader_now.borrow_and_update();
        let Some(sent_to) = known.filter(|id| {
            self.leader()
                .is_some_and(|(l, a)| l == *id && a == leader_addr)
        }) else {
            return Err(Replaced::Before);
        };
        let replaced = leader_now.wait_for(|now| now.is_some_and(|id| id != sent_to));
        tokio::select! {
            answer = call => Ok(answer),
            _ = replaced => Err(Replaced::During),
        }
    }

    /// A client of the internal service on the leader at `leader_addr`.
    pub(crate) fn leader_client(
        &self,
        leader_addr: &str,
    ) -> Result<
        meshwork_proto::v1::raft_internal_client::RaftInternalClient<tonic::transport::Channel>,
        WriteAttempt,
    > {
        self.channels
            .client(leader_addr)
            .map_err(|e| WriteAttempt::Failed(ClusterError::Internal(e.to_string())))
    }

    async fn forward_write(
        &self,
        leader_addr: &str,
        command: &Command,
    ) -> Result<Applied, WriteAttempt> {
        let bytes = serde_json::to_vec(command)
            .map_err(|e| WriteAttempt::Failed(ClusterError::Internal(e.to_string())))?;
        let mut client = self.leader_client(leader_addr)?;
        let mut request = self
            .channels
            .request(ForwardWriteRequest { command: bytes });
        request.set_timeout(self.leader_wait + Duration::from_secs(5));
        // A leader that another one has replaced (it crashed, was cut off
        // or paused) may never answer: once a new leader is known, the
        // caller learns at once that the outcome is unknown instead of
        // waiting out the timeout. (Not retried: the old leader may have
        // replicated the write before it went.)
        let answer = match self
            .unless_replaced(leader_addr, client.forward_write(request))
            .await
        {
            Ok(answer) => answer,
            Err(Replaced::Before) => return Err(WriteAttempt::Retry),
            Err(Replaced::During) => {
                return Err(WriteAttempt::Failed(ClusterError::OutcomeUnknown(format!(
                    "the leader at {leader_addr} was replaced while it had the write: it may or may not have been applied"
                ))));
            }
        };
        let reply = match answer {
            Ok(reply) => reply.into_inner(),
            Err(status) if is_connect_failure(&status) => return Err(WriteAttempt::Retry),
            Err(status) => {
                return Err(WriteAttempt::Failed(ClusterError::OutcomeUnknown(format!(
                    "forwarding to the leader at {leader_addr} failed: {}",
                    status.message()
                ))));
            }
        };
        match reply.kind() {
            ErrorKind::None => {
                let response = serde_json::from_slice(&reply.response)
                    .map_err(|e| WriteAttempt::Failed(ClusterError::Internal(e.to_string())))?;
                Ok(Applied {
                    index: reply.index,
                    response,
                })
            }
            ErrorKind::NoLeader | ErrorKind::NotLeader => Err(WriteAttempt::Retry),
            ErrorKind::OutcomeUnknown => Err(WriteAttempt::Failed(ClusterError::OutcomeUnknown(
                reply.error,
            ))),
            ErrorKind::Other => Err(WriteAttempt::Failed(ClusterError::Rejected(reply.error))),
        }
    }

    /// Returns once this server may answer a read in `mode`: at once for
    /// stale reads; otherwise after it has applied everything the leader
    /// had applied (default) or committed after a quorum round (consistent).
    pub async fn read_barrier(&self, mode: Consistency) -> Result<(), ClusterError> {
        if mode == Consistency::Stale {
            return Ok(());
        }
        let linearizable = mode == Consistency::Consistent;
        let deadline = Instant::now() + self.leader_wait;
        let index = with_leader(self, deadline, self.leader_wait, |to| async move {
            match to {
                Leader::Here => self.read_index_local(linearizable, deadline).await,
                Leader::There(addr) => self.read_index_remote(&addr, linearizable, deadline).await,
            }
        })
        .await?;
        self.wait_applied(index, deadline).await
    }

    /// On the leader: the index a read must wait for.
    pub(crate) async fn read_index_local(
        &self,
        linearizable: bool,
        deadline: Instant,
    ) -> Result<u64, WriteAttempt> {
        let index = if linearizable {
            match tokio::time::timeout_at(deadline, self.raft.ensure_linearizable()).await {
                Err(_) => return Err(WriteAttempt::Failed(ClusterError::NoLeader)),
                Ok(Ok(log_id)) => log_id.map_or(0, |l| l.index),
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => {
                    return Err(WriteAttempt::Retry);
                }
                Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {
                    return Err(WriteAttempt::Retry);
                }
                Ok(Err(RaftError::Fatal(e))) => {
                    return Err(WriteAttempt::Failed(ClusterError::Internal(e.to_string())));
                }
            }
        } else {
            // The leader's state answers default reads, but only once it
            // has applied an entry of its own term: until then, entries
            // committed under the previous leader may not be applied yet.
            let mut metrics = self.raft.metrics();
            let ready = tokio::time::timeout_at(
                deadline,
                metrics.wait_for(|m| {
                    m.state != ServerState::Leader
                        || m.last_applied
                            .is_some_and(|l| l.leader_id.term >= m.current_term)
                }),
            )
            .await;
            match ready {
                Ok(Ok(m)) if m.state == ServerState::Leader => self.state.applied_index(),
                Ok(_) => return Err(WriteAttempt::Retry),
                Err(_) => return Err(WriteAttempt::Failed(ClusterError::NoLeader)),
            }
        };
        let floor = self.read_floor().ok_or(WriteAttempt::Retry)?;
        Ok(index.max(floor))
    }

    /// The [`RegistryNode::read_floor`] of the current term, set at the
    /// first read of the term; `None` when this server does not lead.
    fn read_floor(&self) -> Option<u64> {
        let (state, term, last_log) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.state, m.current_term, m.last_log_index.unwrap_or(0))
        };
        if state != ServerState::Leader {
            return None;
        }
        let mut floor = self.read_floor.lock().unwrap_or_else(|p| p.into_inner());
        if floor.0 != term {
            *floor = (term, last_log);
        }
        Some(floor.1)
    }

    async fn read_index_remote(
        &self,
        leader_addr: &str,
        linearizable: bool,
        deadline: Instant,
    ) -> Result<u64, WriteAttempt> {
        let mut client = self.leader_client(leader_addr)?;
        let mut request = self.channels.request(ReadIndexRequest { linearizable });
        request.set_timeout(time_left(deadline));
        // A leader replaced meanwhile may never answer; the new one will.
        match self
            .unless_replaced(leader_addr, client.read_index(request))
            .await
            .unwrap_or_else(|_| Err(tonic::Status::unavailable("the leader was replaced")))
        {
            Ok(reply) => {
                let reply = reply.into_inner();
                answered(reply.kind(), reply.error).map(|()| reply.index)
            }
            // A read has no side effect: any failure is worth another try.
            Err(_) => Err(WriteAttempt::Retry),
        }
    }

    /// Renews a Consul session's TTL on the leader, from any server: false
    /// when the session does not exist.
    pub async fn renew_session(&self, id: &str) -> Result<bool, ClusterError> {
        let deadline = Instant::now() + self.leader_wait;
        with_leader(self, deadline, self.leader_wait, |to| async move {
            match to {
                Leader::Here => self.renew_session_local(id).await,
                Leader::There(addr) => self.renew_session_remote(&addr, id, deadline).await,
            }
        })
        .await
    }

    /// On the leader: restarts the session's TTL clock, once this server's
    /// state is current (the session may have just been created) and a
    /// quorum has confirmed its leadership lately.
    pub(crate) async fn renew_session_local(&self, id: &str) -> Result<bool, WriteAttempt> {
        let deadline = Instant::now() + self.leader_wait;
        self.confirm_leadership(deadline).await?;
        self.wait_current_as_leader(deadline).await?;
        if self.state.read().sessions.get(id).is_none() {
            return Ok(false);
        }
        let mut clock = self
            .session_renewals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if clock.expiring.contains(id) {
            return Ok(false);
        }
        clock
            .last
            .insert(id.to_owned(), tokio::time::Instant::now());
        Ok(true)
    }

    /// On the leader: returns once this server's state holds everything
    /// committed before now (what it reads is what the cluster has).
    pub(crate) async fn wait_current_as_leader(
        &self,
        deadline: Instant,
    ) -> Result<(), WriteAttempt> {
        // The common case costs no wait (and no timer): a leader that has
        // applied an entry of its term and everything up to its read floor.
        let current = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            m.state == ServerState::Leader
                && m.last_applied
                    .is_some_and(|l| l.leader_id.term >= m.current_term)
        } && self
            .read_floor()
            .is_some_and(|floor| self.state.applied_index() >= floor);
        if !current {
            let index = self.read_index_local(false, deadline).await?;
            self.wait_applied(index, deadline)
                .await
                .map_err(WriteAttempt::Failed)?;
        }
        Ok(())
    }

    /// Returns once a quorum has confirmed this leader within half an
    /// election timeout (the confirmation is shared: at most about two
    /// quorum rounds a second however many renewals arrive). A leader cut
    /// off from its quorum fails here instead of confirming renewals the
    /// other side will not honour: no follower can start an election
    /// within an election timeout of the heartbeat a quorum acknowledged.
    pub(crate) async fn confirm_leadership(&self, deadline: Instant) -> Result<(), WriteAttempt> {
        let fresh = self.election_timeout / 2;
        let term = self.raft.metrics().borrow().current_term;
        let confirmed = |seen: &Mutex<Option<(u64, std::time::Instant)>>| {
            seen.lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|(t, at)| t == term && at.elapsed() < fresh)
        };
        if confirmed(&self.quorum_seen) {
            return Ok(());
        }
        let _one = tokio::time::timeout_at(deadline, self.quorum_check.lock())
            .await
            .map_err(|_| WriteAttempt::Failed(ClusterError::NoLeader))?;
        if confirmed(&self.quorum_seen) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.read_index_local(true, deadline).await?;
        *self.quorum_seen.lock().unwrap_or_else(|p| p.into_inner()) = Some((term, started));
        Ok(())
    }

    async fn renew_session_remote(
        &self,
        leader_addr: &str,
        id: &str,
        deadline: Instant,
    ) -> Result<bool, WriteAttempt> {
        let mut client = self.leader_client(leader_addr)?;
        let mut request = self
            .channels
            .request(RenewSessionRequest { id: id.to_owned() });
        request.set_timeout(time_left(deadline));
        match self
            .unless_replaced(leader_addr, client.renew_session(request))
            .await
            .unwrap_or_else(|_| Err(tonic::Status::unavailable("the leader was replaced")))
        {
            Ok(reply) => {
                let reply = reply.into_inner();
                answered(reply.kind(), reply.error).map(|()| reply.found)
            }
            // A renewal is idempotent: any failure is worth another try.
            Err(_) => Err(WriteAttempt::Retry),
        }
    }

    /// Runs `f` on the session clock. The leader's TTL task reads and
    /// prunes it in place; nothing is copied.
    pub fn with_session_clock<T>(&self, f: impl FnOnce(&mut SessionClock) -> T) -> T {
        f(&mut self
            .session_renewals
            .lock()
            .unwrap_or_else(|p| p.into_inner()))
    }

    /// Waits until this server has applied `index`.
    async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<(), ClusterError> {
        let mut applied = self.state.subscribe();
        let caught_up = tokio::time::timeout_at(deadline, applied.wait_for(|i| *i >= index)).await;
        match caught_up {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(ClusterError::Internal("state machine stopped".into())),
            Err(_) => Err(ClusterError::Internal(format!(
                "timed out catching up with the leader (index {index}, applied {})",
                self.state.applied_index()
            ))),
        }
    }

    /// Adds a server: learner first (it catches up), then voter.
    pub async fn add_server(&self, id: NodeId, raft_addr: String) -> Result<(), ClusterError> {
        let request = JoinRequest {
            node_id: id,
            raft_addr,
        };
        self.membership_op(MembershipOp::Join(request)).await
    }

    /// Removes a server from the configuration.
    pub async fn remove_server(&self, id: NodeId) -> Result<(), ClusterError> {
        if !self.members().iter().any(|m| m.id == id) {
            return Err(ClusterError::Rejected(format!(
                "server {id} is not in the Raft configuration"
            )));
        }
        self.membership_op(MembershipOp::Remove(id)).await
    }

    async fn membership_op(&self, op: MembershipOp) -> Result<(), ClusterError> {
        // Adding a learner waits until it has caught up: allow longer.
        let deadline = Instant::now() + self.leader_wait + Duration::from_secs(60);
        let op = &op;
        with_leader(self, deadline, self.leader_wait, |to| async move {
            match to {
                Leader::Here => self.membership_local(op).await,
                Leader::There(addr) => self.membership_remote(&addr, op, deadline).await,
            }
        })
        .await
    }

    /// On the leader: applies a membership change.
    pub(crate) async fn membership_local(&self, op: &MembershipOp) -> Result<(), WriteAttempt> {
        let map = |e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => WriteAttempt::Retry,
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                WriteAttempt::Failed(ClusterError::Rejected(e.to_string()))
            }
            RaftError::Fatal(e) => WriteAttempt::Failed(ClusterError::Internal(e.to_string())),
        };
        match op {
            MembershipOp::Join(req) => {
                let already_voter = self
                    .members()
                    .iter()
                    .any(|m| m.id == req.node_id && m.voter);
                if already_voter {
                    return Ok(());
                }
                if let Some(m) = self.members().iter().find(|m| m.id == req.node_id)
                    && m.raft_addr != req.raft_addr
                {
                    return Err(WriteAttempt::Failed(ClusterError::Rejected(format!(
                        "server {} is already a member at {}, not {}",
                        req.node_id, m.raft_addr, req.raft_addr
                    ))));
                }
                tracing::info!(node = req.node_id, addr = %req.raft_addr, "adding server as learner");
                self.raft
                    .add_learner(req.node_id, BasicNode::new(&req.raft_addr), true)
                    .await
                    .map_err(map)?;
                tracing::info!(node = req.node_id, "promoting server to voter");
                self.raft
                    .change_membership(
                        ChangeMembers::AddVoterIds(BTreeSet::from([req.node_id])),
                        false,
                    )
                    .await
                    .map_err(map)?;
                Ok(())
            }
            MembershipOp::Remove(id) => {
                tracing::info!(node = id, "removing server");
                self.raft
                    .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([*id])), false)
                    .await
                    .map_err(map)?;
                Ok(())
            }
        }
    }

    async fn membership_remote(
        &self,
        leader_addr: &str,
        op: &MembershipOp,
        deadline: Instant,
    ) -> Result<(), WriteAttempt> {
        let mut client = self.leader_client(leader_addr)?;
        let timeout = time_left(deadline);
        let reply = match op {
            MembershipOp::Join(req) => {
                let mut request = self.channels.request(req.clone());
                request.set_timeout(timeout);
                client.join(request).await
            }
            MembershipOp::Remove(id) => {
                let mut request = self.channels.request(RemoveServerRequest { node_id: *id });
                request.set_timeout(timeout);
                client.remove_server(request).await
            }
        };
        match reply {
            Ok(reply) => {
                let reply = reply.into_inner();
                match reply.kind() {
                    ErrorKind::None => Ok(()),
                    ErrorKind::NoLeader | ErrorKind::NotLeader => Err(WriteAttempt::Retry),
                    _ => Err(WriteAttempt::Failed(ClusterError::Rejected(reply.error))),
                }
            }
            // Membership changes are idempotent here: retrying is safe.
            Err(_) => Err(WriteAttempt::Retry),
        }
    }

    /// Forms a new cluster from `members` when this server's store is
    /// pristine; a server that already holds a configuration keeps it.
    pub async fn bootstrap(
        &self,
        members: BTreeMap<NodeId, BasicNode>,
    ) -> Result<(), ClusterError> {
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| ClusterError::Internal(e.to_string()))?;
        if initialized {
            return Ok(());
        }
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ClusterError::Internal(e.to_string())),
        }
    }
}

impl Leadership for RegistryNode {
    fn id(&self) -> NodeId {
        self.id
    }

    /// Waits until a leader is known, or the deadline passes.
    async fn wait_for_leader(&self, deadline: Instant) -> Option<(NodeId, String)> {
        let mut metrics = self.raft.metrics();
        loop {
            if let Some(leader) = self.leader() {
                return Some(leader);
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }
}

/// A membership change request, as carried over the internal service.
#[derive(Debug, Clone)]
pub enum MembershipOp {
    Join(JoinRequest),
    Remove(NodeId),
}

/// Why [`RegistryNode::unless_replaced`] did not run a call to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replaced {
    /// The leader had moved before the call: nothing was sent.
    Before,
    /// Another leader became known while the call was waiting.
    During,
}

/// The outcome of one attempt at a leader-only operation.
#[derive(Debug)]
pub enum WriteAttempt {
    /// Nothing was applied (no leader, or it moved): try again.
    Retry,
    Failed(ClusterError),
}

impl WriteAttempt {
    /// The wire form of a failed attempt.
    pub fn to_wire(&self) -> (ErrorKind, String) {
        match self {
            WriteAttempt::Retry => (ErrorKind::NotLeader, "not the leader".into()),
            WriteAttempt::Failed(ClusterError::NoLeader) => {
                (ErrorKind::NoLeader, "No cluster leader".into())
            }
            WriteAttempt::Failed(e @ ClusterError::OutcomeUnknown(_)) => {
                (ErrorKind::OutcomeUnknown, e.to_string())
            }
            WriteAttempt::Failed(e) => (ErrorKind::Other, e.to_string()),
        }
    }
}

/// Publishes the known leader on `leader_now` whenever it changes (and
/// counts the changes, a metric), until Raft stops.
async fn follow_leader(
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, BasicNode>>,
    leader_now: tokio::sync::watch::Sender<Option<NodeId>>,
) {
    while metrics.changed().await.is_ok() {
        let (now, term) = {
            let m = metrics.borrow();
            (m.current_leader, m.current_term)
        };
        let changed = leader_now.send_if_modified(|known| {
            let changed = *known != now;
            *known = now;
            changed
        });
        if changed {
            match now {
                Some(leader) => tracing::info!(leader, term, "leader known"),
                None => tracing::info!(term, "no leader known"),
            }
            crate::metrics::METRICS
                .leader_changes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// What is left until `deadline`, as a call's timeout (at least 10 ms).
pub(crate) fn time_left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(10))
}

/// A leader-only call's answer from another server: done, try again (no
/// leader there), or failed with its error.
pub(crate) fn answered(kind: ErrorKind, error: String) -> Result<(), WriteAttempt> {
    match kind {
        ErrorKind::None => Ok(()),
        ErrorKind::NoLeader | ErrorKind::NotLeader => Err(WriteAttempt::Retry),
        _ => Err(WriteAttempt::Failed(ClusterError::Internal(error))),
    }
}

/// Whether a gRPC failure happened before the request left this server
/// (connection refused or no route), so that no write can have happened.
fn is_connect_failure(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            )
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// A write waiting to be proposed.
struct BatchItem {
    command: Command,
    reply: tokio::sync::oneshot::Sender<Result<Applied, WriteAttempt>>,
}

/// Most commands in one log entry.
const MAX_BATCH: usize = 256;

/// Group commit: proposes the queued writes as one log entry (one fsync on
/// each server for all of them), waits for it to commit, then takes
/// whatever queued up meanwhile. A lone write goes as itself.
async fn run_batcher(
    raft: Raft,
    mut queue: tokio::sync::mpsc::Receiver<BatchItem>,
    leader_wait: Duration,
) {
    while let Some(first) = queue.recv().await {
        let mut items = vec![first];
        while items.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        let (commands, replies): (Vec<Command>, Vec<_>) =
            items.into_iter().map(|i| (i.command, i.reply)).unzip();
        let count = commands.len();
        let entry = if count == 1 {
            commands
                .into_iter()
                .next()
                .unwrap_or(Command::Batch(Vec::new()))
        } else {
            Command::Batch(commands)
        };
        // A leader cut off from its quorum would wait forever; the entry
        // may still commit if the quorum comes back, so its fate is unknown.
        let written = tokio::time::timeout(leader_wait, raft.client_write(entry)).await;
        let outcome: Result<(u64, Vec<CommandResponse>), WriteAttempt> = match written {
            Err(_) => Err(WriteAttempt::Failed(ClusterError::OutcomeUnknown(format!(
                "no quorum committed the write within {leader_wait:?} (No cluster leader?); it may still be applied if the cluster recovers"
            )))),
            Ok(Ok(resp)) => {
                let index = resp.log_id.index;
                match resp.data {
                    CommandResponse::Batch(responses) if count > 1 => Ok((index, responses)),
                    single => Ok((index, vec![single])),
                }
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                Err(WriteAttempt::Retry)
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(WriteAttempt::Failed(ClusterError::Rejected(e.to_string())))
            }
            Ok(Err(RaftError::Fatal(e))) => {
                Err(WriteAttempt::Failed(ClusterError::Internal(e.to_string())))
            }
        };
        match outcome {
            Ok((index, responses)) => {
                for (reply, response) in replies.into_iter().zip(responses) {
                    let _ = reply.send(Ok(Applied { index, response }));
                }
            }
            Err(attempt) => {
                for reply in replies {
                    let copy = match &attempt {
                        WriteAttempt::Retry => WriteAttempt::Retry,
                        WriteAttempt::Failed(e) => WriteAttempt::Failed(e.clone()),
                    };
                    let _ = reply.send(Err(copy));
                }
            }
        }
    }
}
