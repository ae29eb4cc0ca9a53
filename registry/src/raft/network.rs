//! The client side of the internal gRPC service: openraft's network seam
//! and the channel pool that forwarding to the leader reuses.
//!
//! openraft's requests and responses travel as JSON inside protobuf `bytes`
//! (see `proto/meshwork/v1/raft.proto` for why).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshwork_proto::v1::RaftPayload;
use meshwork_proto::v1::raft_internal_client::RaftInternalClient;
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use super::directory::Directory;
use super::identity::ClusterIdentity;
use super::{NodeId, TypeConfig};

/// Largest internal message: append batches and snapshot chunks. Internal
/// peers only; public services keep tonic's 4 MiB default.
pub const MAX_INTERNAL_MESSAGE: usize = 256 * 1024 * 1024;

/// What one AppendEntries carries at most (by the entries' approximate
/// sizes), beyond its first entry.
const MAX_APPEND_BYTES: usize = 512 * 1024;

/// Calls to one address that ended without an answer in a row, past which
/// its connection counts as stalled and is replaced.
const STALLED_AFTER: u32 = 3;

/// At most one replacement per address this often.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Unanswered calls to one address in a row, and when its channel was
/// last replaced.
type Stall = (u32, Option<std::time::Instant>);

/// Lazily connected channels to other servers, keyed by Raft address.
/// A channel reconnects by itself when its connection closes; one that
/// stalls instead (a partition healed while TCP backs off its
/// retransmissions: seconds with nothing delivered) is replaced after
/// [`STALLED_AFTER`] calls in a row went unanswered (see [`Self::outcome`]).
#[derive(Debug, Clone)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Per address: unanswered calls in a row, and the last replacement.
    stalls: Arc<Mutex<HashMap<String, Stall>>>,
    /// When each peer last answered an AppendEntries (on the leader).
    contacts: Arc<Mutex<HashMap<NodeId, std::time::Instant>>>,
    /// Stamped on every request; checked by the receiving server.
    pub identity: Arc<ClusterIdentity>,
    /// The servers' names and versions, exchanged on every request.
    pub directory: Arc<Directory>,
    /// Mutual TLS to other servers, when configured.
    tls: Option<Arc<crate::tls::Tls>>,
}

impl PeerChannels {
    pub fn new(
        identity: Arc<ClusterIdentity>,
        directory: Arc<Directory>,
        tls: Option<Arc<crate::tls::Tls>>,
    ) -> Self {
        Self {
            channels: Arc::default(),
            stalls: Arc::default(),
            contacts: Arc::default(),
            identity,
            directory,
            tls,
        }
    }

    /// Checks an incoming internal request (cluster id) and learns the
    /// sender's directory.
    pub fn accept<T>(&self, request: &tonic::Request<T>) -> Result<(), tonic::Status> {
        self.identity.check(request)?;
        self.directory.absorb(request.metadata());
        Ok(())
    }

    /// How long ago `peer` last answered an AppendEntries from this server.
    pub fn last_contact(&self, peer: NodeId) -> Option<Duration> {
        let contacts = self.contacts.lock().unwrap_or_else(|p| p.into_inner());
        contacts.get(&peer).map(|at| at.elapsed())
    }

    /// Records how a call to `addr` ended: answered (whatever the answer)
    /// or not (a timeout, a dropped call). After [`STALLED_AFTER`]
    /// unanswered calls in a row the address's channel is dropped, so the
    /// next call opens a new connection (at most every
    /// [`RECONNECT_EVERY`]).
    pub fn outcome(&self, addr: &str, answered: bool) {
        let mut stalls = self.stalls.lock().unwrap_or_else(|p| p.into_inner());
        if answered {
            if let Some(entry) = stalls.get_mut(addr) {
                entry.0 = 0;
            }
            return;
        }
        let entry = stalls.entry(addr.to_owned()).or_insert((0, None));
        entry.0 += 1;
        let due = entry.1.is_none_or(|at| at.elapsed() >= RECONNECT_EVERY);
        if entry.0 >= STALLED_AFTER && due {
            *entry = (0, Some(std::time::Instant::now()));
            drop(stalls);
            self.channels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(addr);
            tracing::info!(
                peer = addr,
                "no answer from a server for {STALLED_AFTER} calls in a row: reconnecting"
            );
        }
    }

    /// A request stamped with this server's cluster id and directory.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = self.identity.request(message);
        self.directory.stamp(request.metadata_mut());
        request
    }

    /// The client for the server at `addr` (`host:port`).
    pub fn client(
        &self,
        addr: &str,
    ) -> Result<RaftInternalClient<Channel>, tonic::transport::Error> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(addr) {
            Some(channel) => channel.clone(),
            None => {
                let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
                    .connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    // A connection that stops delivering (a peer cut
                    // off) is found within 2 s even when idle.
                    .http2_keep_alive_interval(Duration::from_secs(1))
                    .keep_alive_while_idle(true)
                    .keep_alive_timeout(Duration::from_secs(1));
                let channel = match &self.tls {
                    Some(tls) => endpoint
                        .connect_with_connector_lazy(crate::tls::io::connector(Arc::clone(tls))),
                    None => endpoint.connect_lazy(),
                };
                channels.insert(addr.to_owned(), channel.clone());
                channel
            }
        };
        Ok(RaftInternalClient::new(channel)
            .max_decoding_message_size(MAX_INTERNAL_MESSAGE)
            .max_encoding_message_size(MAX_INTERNAL_MESSAGE))
    }
}

/// openraft's network factory: one [`PeerClient`] per target.
#[derive(Debug, Clone)]
pub struct NetworkFactory {
    pub channels: PeerChannels,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient {
            target,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
            in_flight: false,
        }
    }
}

/// A connection to one other server.
#[derive(Debug)]
pub struct PeerClient {
    target: NodeId,
    addr: String,
    /// For the channel, the identity and directory stamps and the contact
    /// times.
    channels: PeerChannels,
    /// Set while a call runs: still set when the next one starts, the
    /// previous call was dropped by openraft's own timeout (unanswered).
    in_flight: bool,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        method: Method,
        req: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        if self.in_flight {
            self.channels.outcome(&self.addr, false);
        }
        let mut client = match self.channels.client(&self.addr) {
            Ok(client) => client,
            Err(e) => {
                let err = std::io::Error::other(format!(
                    "bad address {:?} of node {}: {e}",
                    self.addr, self.target
                ));
                return Err(RPCError::Unreachable(Unreachable::new(&err)));
            }
        };
        let data = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = self.channels.request(RaftPayload { data });
        request.set_timeout(option.hard_ttl());
        self.in_flight = true;
        let reply = match method {
            Method::AppendEntries => client.append_entries(request).await,
            Method::Vote => client.vote(request).await,
            Method::InstallSnapshot => client.install_snapshot(request).await,
        };
        self.in_flight = false;
        let answered = !matches!(
            &reply,
            Err(status) if matches!(status.code(), tonic::Code::Cancelled | tonic::Code::DeadlineExceeded)
        );
        self.channels.outcome(&self.addr, answered);
        let reply = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
            tonic::Code::FailedPrecondition => {
                tracing::error!(target_node = self.target, addr = %self.addr, error = status.message(), "peer refused Raft traffic");
                RPCError::Unreachable(Unreachable::new(&status))
            }
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        self.channels.directory.absorb(reply.metadata());
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&reply.into_inner().data)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Debug, Clone, Copy)]
enum Method {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        // openraft gives one AppendEntries a heartbeat interval and may
        // batch up to 256 entries: a follower catching up on large entries
        // (512 KiB values, restore pieces) would time out for ever. Send a
        // prefix within the budget and report it as a partial success;
        // openraft sends the rest next.
        let mut rpc = rpc;
        let mut budget = MAX_APPEND_BYTES;
        let keep = rpc
            .entries
            .iter()
            .position(|entry| {
                let size = match &entry.payload {
                    openraft::EntryPayload::Normal(command) => command.approx_size(),
                    _ => 256,
                };
                let over = size > budget;
                budget = budget.saturating_sub(size);
                over
            })
            // Always at least one entry, however large.
            .map(|over_at| over_at.max(1));
        let truncated_to = match keep {
            Some(n) if n < rpc.entries.len() => {
                rpc.entries.truncate(n);
                rpc.entries.last().map(|e| e.log_id)
            }
            _ => None,
        };
        let sent = (!rpc.entries.is_empty()).then(std::time::Instant::now);
        let reply = self.call(Method::AppendEntries, &rpc, &option).await;
        if let (Ok(_), Some(sent)) = (&reply, sent) {
            crate::metrics::METRICS.raft_replicated(sent.elapsed());
        }
        if reply.is_ok() {
            let mut contacts = self
                .channels
                .contacts
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            contacts.insert(self.target, std::time::Instant::now());
        }
        match (reply, truncated_to) {
            (Ok(AppendEntriesResponse::Success), Some(last)) => {
                Ok(AppendEntriesResponse::PartialSuccess(Some(last)))
            }
            (reply, _) => reply,
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(Method::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(Method::Vote, &rpc, &option).await
    }
}
