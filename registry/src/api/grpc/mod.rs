//! The public gRPC services (port 8502). For now `Registry.Status`; the
//! watch and agent services for sidecars join it here.

pub mod agent;
pub mod leaf_watch;
pub mod metrics;
pub mod watch;

use std::sync::Arc;

use meshwork_proto::v1::registry_server::Registry;
use meshwork_proto::v1::{Server, StatusReply, StatusRequest};
use tonic::{Request, Response, Status};

use crate::auth::{Acl, Refusal, Resolved};
use crate::cluster::RegistryNode;

/// Resolves a call's token (`None`: the default or anonymous token) to
/// its rights: every public gRPC call goes through one.
pub type Resolver = Arc<dyn Fn(Option<&str>) -> Result<Resolved, Refusal> + Send + Sync>;

/// The resolver of a server: its ACL settings over its own replica.
pub fn resolver(acl: Arc<Acl>, node: Arc<RegistryNode>) -> Resolver {
    Arc::new(move |token| crate::api::resolve(&acl, &node, token))
}

/// Everything allowed (ACLs off; tests).
pub fn allow_all() -> Resolver {
    Arc::new(|_| Ok(Resolved::everything()))
}

/// The token of a call: `x-consul-token` or `authorization: Bearer`
/// metadata, as the REST headers.
pub fn call_token(headers: &tonic::codegen::http::HeaderMap) -> Option<&str> {
    crate::auth::request_token(None, headers)
}

/// A refusal as a gRPC status: an unknown token is UNAUTHENTICATED, a
/// missing permission PERMISSION_DENIED, with the REST API's message.
pub fn refusal_status(refusal: Refusal) -> Status {
    match refusal {
        Refusal::TokenNotFound => Status::unauthenticated(refusal.to_string()),
        Refusal::Denied { .. } => Status::permission_denied(refusal.to_string()),
    }
}

/// The gRPC status for a certificate the mesh CA would not make: a bad
/// CSR or name is the caller's, no root yet is worth a retry, the rest is
/// ours.
pub(crate) fn ca_status(e: crate::connect::CaError) -> Status {
    use crate::connect::CaError;
    match e {
        CaError::Csr(_) => Status::invalid_argument(e.to_string()),
        CaError::NotReady => Status::unavailable(e.to_string()),
        CaError::Root(_) | CaError::Sign(_) => Status::internal(e.to_string()),
    }
}

/// Serves `meshwork.v1.Registry`.
#[derive(Debug, Clone)]
pub struct RegistryService {
    pub node: Arc<RegistryNode>,
}

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let metrics = self.node.raft.metrics().borrow().clone();
        let leader = self.node.leader();
        Ok(Response::new(StatusReply {
            node_id: self.node.id,
            leader_addr: leader.as_ref().map(|(_, a)| a.clone()).unwrap_or_default(),
            leader_id: leader.map_or(0, |(id, _)| id),
            term: metrics.current_term,
            last_applied_index: self.node.state.applied_index(),
            servers: self
                .node
                .members()
                .into_iter()
                .map(|m| Server {
                    id: m.id,
                    raft_addr: m.raft_addr,
                    voter: m.voter,
                })
                .collect(),
        }))
    }
}
