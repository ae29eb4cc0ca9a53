//! The server side of the internal gRPC service (on the Raft address):
//! Raft RPCs into openraft, and the leader-only operations that followers
//! forward (writes, read indexes, membership changes).

use std::sync::Arc;
use std::time::Duration;

use meshwork_proto::v1::raft_internal_server::RaftInternal;
use meshwork_proto::v1::{
    ErrorKind, FollowerStateReply, FollowerStateRequest, ForwardSignLeafReply,
    ForwardSignLeafRequest, ForwardWriteReply, ForwardWriteRequest, JoinReply, JoinRequest,
    LocalSidecarsReply, LocalSidecarsRequest, LocalTopologyReply, LocalTopologyRequest,
    RaftPayload, ReadIndexReply, ReadIndexRequest, RemoveServerRequest, RenewSessionReply,
    RenewSessionRequest, ReportedSidecar, ServerHealthReply, ServerHealthRequest,
    TouchSessionsReply, TouchSessionsRequest,
};
use openraft::raft::AppendEntriesResponse;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use crate::cluster::{RegistryNode, WriteAttempt};
use crate::command::Command;

/// Serves `meshwork.v1.RaftInternal` for one server.
#[derive(Debug, Clone)]
pub struct InternalService {
    node: Arc<RegistryNode>,
    /// What the sidecars connected to this server report, and this
    /// server's name (for `LocalSidecars`).
    sidecars: Arc<crate::telemetry::sidecars::Sidecars>,
    name: String,
}

impl InternalService {
    pub fn new(
        node: Arc<RegistryNode>,
        sidecars: Arc<crate::telemetry::sidecars::Sidecars>,
        name: String,
    ) -> Self {
        Self {
            node,
            sidecars,
            name,
        }
    }
}

fn decode<T: DeserializeOwned>(payload: &RaftPayload) -> Result<T, Status> {
    serde_json::from_slice(&payload.data)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft payload: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    serde_json::to_vec(value)
        .map(|data| Response::new(RaftPayload { data }))
        .map_err(|e| Status::internal(format!("cannot encode raft reply: {e}")))
}

#[tonic::async_trait]
impl RaftInternal for InternalService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.node.channels.accept(&request)?;
        self.node.heard_from_leader();
        let req = decode(request.get_ref())?;
        let result = self.node.raft.append_entries(req).await;
        if matches!(&result, Ok(resp) if !matches!(resp, AppendEntriesResponse::HigherVote(_))) {
            self.node.touch_leader_contact();
        }
        // The leader learns its followers' directory from their answers.
        let mut response = encode(&result)?;
        self.node.channels.directory.stamp(response.metadata_mut());
        Ok(response)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.node.channels.accept(&request)?;
        if !self.node.grants_votes() {
            return Err(Status::unavailable(
                "this server has no vote recorded and has not heard from a leader yet: it grants no vote",
            ));
        }
        let req = decode(request.get_ref())?;
        encode(&self.node.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.node.channels.accept(&request)?;
        self.node.heard_from_leader();
        let req = decode(request.get_ref())?;
        let result = self.node.raft.install_snapshot(req).await;
        if result.is_ok() {
            self.node.touch_leader_contact();
        }
        encode(&result)
    }

    async fn forward_write(
        &self,
        request: Request<ForwardWriteRequest>,
    ) -> Result<Response<ForwardWriteReply>, Status> {
        self.node.channels.accept(&request)?;
        let command: Command = serde_json::from_slice(&request.get_ref().command)
            .map_err(|e| Status::invalid_argument(format!("undecodable command: {e}")))?;
        let reply = match self.node.write_local(command).await {
            Ok(applied) => ForwardWriteReply {
                response: serde_json::to_vec(&applied.response)
                    .map_err(|e| Status::internal(e.to_string()))?,
                index: applied.index,
                error: String::new(),
                kind: ErrorKind::None.into(),
            },
            Err(attempt) => {
                let (kind, error) = attempt.to_wire();
                ForwardWriteReply {
                    response: Vec::new(),
                    index: 0,
                    error,
                    kind: kind.into(),
                }
            }
        };
        Ok(Response::new(reply))
    }

    async fn read_index(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexReply>, Status> {
        self.node.channels.accept(&request)?;
        let deadline = tokio::time::Instant::now() + self.node.leader_wait;
        let reply = match self
            .node
            .read_index_local(request.get_ref().linearizable, deadline)
            .await
        {
            Ok(index) => ReadIndexReply {
                index,
                error: String::new(),
                kind: ErrorKind::None.into(),
            },
            Err(attempt) => {
                let (kind, error) = attempt.to_wire();
                ReadIndexReply {
                    index: 0,
                    error,
                    kind: kind.into(),
                }
            }
        };
        Ok(Response::new(reply))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        self.node.channels.accept(&request)?;
        // Any server takes a join: it forwards to the leader if need be.
        let req = request.into_inner();
        let result = self.node.add_server(req.node_id, req.raft_addr).await;
        Ok(Response::new(membership_reply(
            result.map_err(WriteAttempt::Failed),
        )))
    }

    async fn remove_server(
        &self,
        request: Request<RemoveServerRequest>,
    ) -> Result<Response<JoinReply>, Status> {
        self.node.channels.accept(&request)?;
        let result = self.node.remove_server(request.get_ref().node_id).await;
        Ok(Response::new(membership_reply(
            result.map_err(WriteAttempt::Failed),
        )))
    }

    async fn touch_sessions(
        &self,
        request: Request<TouchSessionsRequest>,
    ) -> Result<Response<TouchSessionsReply>, Status> {
        self.node.channels.accept(&request)?;
        let leader = self.node.is_leader();
        if leader {
            for name in request.into_inner().nodes {
                self.node
                    .touch((name, crate::state::catalog::SESSION_CHECK_ID.to_owned()));
            }
        }
        Ok(Response::new(TouchSessionsReply { leader }))
    }

    async fn renew_session(
        &self,
        request: Request<RenewSessionRequest>,
    ) -> Result<Response<RenewSessionReply>, Status> {
        self.node.channels.accept(&request)?;
        let id = request.into_inner().id;
        let reply = match self.node.renew_session_local(&id).await {
            Ok(found) => RenewSessionReply {
                found,
                error: String::new(),
                kind: ErrorKind::None.into(),
            },
            Err(attempt) => {
                let (kind, error) = attempt.to_wire();
                RenewSessionReply {
                    found: false,
                    error,
                    kind: kind.into(),
                }
            }
        };
        Ok(Response::new(reply))
    }

    async fn sign_leaf(
        &self,
        request: Request<ForwardSignLeafRequest>,
    ) -> Result<Response<ForwardSignLeafReply>, Status> {
        self.node.channels.accept(&request)?;
        let req = request.into_inner();
        // Only the leader signs: a follower forwarding again could loop.
        let result = self
            .node
            .sign_leaf_local(crate::connect::sign::LeafRequest {
                datacenter: &req.datacenter,
                service: &req.service,
                csr_pem: &req.csr_pem,
            })
            .await;
        Ok(Response::new(crate::connect::sign::leaf_reply(result)))
    }

    async fn follower_state(
        &self,
        request: Request<FollowerStateRequest>,
    ) -> Result<Response<FollowerStateReply>, Status> {
        self.node.channels.accept(&request)?;
        Ok(Response::new(self.node.follower_state()))
    }

    async fn local_sidecars(
        &self,
        request: Request<LocalSidecarsRequest>,
    ) -> Result<Response<LocalSidecarsReply>, Status> {
        self.node.channels.accept(&request)?;
        let sidecars = self
            .sidecars
            .local()
            .into_iter()
            .map(|(report, age)| ReportedSidecar {
                report: Some(report),
                age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
            })
            .collect();
        Ok(Response::new(LocalSidecarsReply {
            sidecars,
            server: self.name.clone(),
            generation: *self.sidecars.changes().borrow(),
        }))
    }

    async fn local_topology(
        &self,
        request: Request<LocalTopologyRequest>,
    ) -> Result<Response<LocalTopologyReply>, Status> {
        self.node.channels.accept(&request)?;
        let window = Duration::from_millis(request.into_inner().window_ms);
        let (edges, covered_seconds) = self.sidecars.topology().window(window);
        Ok(Response::new(LocalTopologyReply {
            edges,
            covered_seconds,
        }))
    }

    async fn server_health(
        &self,
        request: Request<ServerHealthRequest>,
    ) -> Result<Response<ServerHealthReply>, Status> {
        self.node.channels.accept(&request)?;
        // Only the leader answers: a follower forwarding again could loop.
        Ok(Response::new(server_health_reply(
            self.node.server_health_local(),
        )))
    }
}

fn server_health_reply(
    result: Result<Vec<crate::leader::autopilot::ServerHealth>, WriteAttempt>,
) -> ServerHealthReply {
    let encoded = result.and_then(|servers| {
        serde_json::to_vec(&servers).map_err(|e| {
            WriteAttempt::Failed(crate::cluster::ClusterError::Internal(e.to_string()))
        })
    });
    match encoded {
        Ok(servers) => ServerHealthReply {
            servers,
            error: String::new(),
            kind: ErrorKind::None.into(),
        },
        Err(attempt) => {
            let (kind, error) = attempt.to_wire();
            ServerHealthReply {
                servers: Vec::new(),
                error,
                kind: kind.into(),
            }
        }
    }
}

fn membership_reply(result: Result<(), WriteAttempt>) -> JoinReply {
    match result {
        Ok(()) => JoinReply {
            error: String::new(),
            kind: ErrorKind::None.into(),
        },
        Err(attempt) => {
            let (kind, error) = attempt.to_wire();
            JoinReply {
                error,
                kind: kind.into(),
            }
        }
    }
}
