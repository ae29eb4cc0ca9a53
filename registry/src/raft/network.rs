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

/// Lazily connected channels to other servers, keyed by Raft address.
/// A channel reconnects by itself, so one per address is kept for the life
/// of the process.
#[derive(Debug, Clone)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
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
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5));
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
            client: self.channels.client(&node.addr).map_err(|e| e.to_string()),
            channels: self.channels.clone(),
        }
    }
}

/// A connection to one other server.
#[derive(Debug)]
pub struct PeerClient {
    target: NodeId,
    addr: String,
    /// An address that is not a valid URI fails every call (and says so).
    client: Result<RaftInternalClient<Channel>, String>,
    /// For the identity and directory stamps and the contact times.
    channels: PeerChannels,
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
        let client = match &mut self.client {
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
        let reply = match method {
            Method::AppendEntries => client.append_entries(request).await,
            Method::Vote => client.vote(request).await,
            Method::InstallSnapshot => client.install_snapshot(request).await,
        };
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
        let reply = self.call(Method::AppendEntries, &rpc, &option).await;
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
