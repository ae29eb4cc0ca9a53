//! The public gRPC services (port 8502). For now `Registry.Status`; the
//! watch and agent services for sidecars join it here.

pub mod agent;
pub mod metrics;
pub mod watch;

use std::sync::Arc;

use meshwork_proto::v1::registry_server::Registry;
use meshwork_proto::v1::{Server, StatusReply, StatusRequest};
use tonic::{Request, Response, Status};

use crate::cluster::RegistryNode;

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
