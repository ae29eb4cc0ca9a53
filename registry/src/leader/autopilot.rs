//! Server health as the leader sees it (Consul's autopilot health): each
//! server's replication progress, last contact and whether it keeps up.
//! Asked on a follower, the question goes to the leader.

use meshwork_proto::v1::{ErrorKind, ServerHealthRequest};
use openraft::ServerState;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::cluster::with_leader::{Leader, with_leader};
use crate::cluster::{ClusterError, RegistryNode, WriteAttempt};
use crate::raft::NodeId;

/// A server that trails the leader's log by more than this is unhealthy
/// (Consul's autopilot `MaxTrailingLogs`).
pub const MAX_TRAILING_LOGS: u64 = 250;

/// One server, as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHealth {
    pub id: NodeId,
    pub raft_addr: String,
    pub voter: bool,
    pub leader: bool,
    /// Highest log index known to be on the server.
    pub last_index: u64,
    /// Term of that entry.
    pub last_term: u64,
    /// Since the server last answered the leader (`None`: never).
    pub last_contact_ms: Option<u64>,
    pub healthy: bool,
    /// Its node name and version when the leader has heard them (absent
    /// from older leaders' answers).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
}

impl RegistryNode {
    /// Every server's health, from the leader (asked over the internal
    /// service when this server does not lead).
    pub async fn server_health(&self) -> Result<Vec<ServerHealth>, ClusterError> {
        let deadline = Instant::now() + self.leader_wait;
        with_leader(self, deadline, self.leader_wait, |to| async move {
            match to {
                Leader::Here => self.server_health_local(),
                Leader::There(addr) => self.server_health_remote(&addr, deadline).await,
            }
        })
        .await
    }

    /// On the leader: its own metrics plus its replication state.
    pub(crate) fn server_health_local(&self) -> Result<Vec<ServerHealth>, WriteAttempt> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            return Err(WriteAttempt::Retry);
        }
        let leader_last = metrics.last_log_index.unwrap_or(0);
        // A follower that has not answered for two election timeouts is
        // as good as gone.
        let contact_limit = self.election_timeout * 2;
        let replication = metrics.replication.unwrap_or_default();
        let servers = self
            .members()
            .into_iter()
            .map(|m| {
                // `members()` has the name from the directory already.
                let name = m.name.clone();
                let version = self.channels.directory.get(m.id).map(|s| s.version);
                if m.id == self.id {
                    return ServerHealth {
                        id: m.id,
                        raft_addr: m.raft_addr,
                        voter: m.voter,
                        leader: true,
                        last_index: leader_last,
                        last_term: metrics.current_term,
                        last_contact_ms: Some(0),
                        healthy: true,
                        name,
                        version,
                    };
                }
                let matched = replication.get(&m.id).copied().flatten();
                let contact = self.channels.last_contact(m.id);
                let last_index = matched.map_or(0, |l| l.index);
                let healthy = contact.is_some_and(|c| c <= contact_limit)
                    && leader_last.saturating_sub(last_index) <= MAX_TRAILING_LOGS;
                ServerHealth {
                    id: m.id,
                    raft_addr: m.raft_addr,
                    voter: m.voter,
                    leader: false,
                    last_index,
                    last_term: matched.map_or(0, |l| l.leader_id.term),
                    last_contact_ms: contact.map(|c| c.as_millis() as u64),
                    healthy,
                    name,
                    version,
                }
            })
            .collect();
        Ok(servers)
    }

    async fn server_health_remote(
        &self,
        leader_addr: &str,
        deadline: Instant,
    ) -> Result<Vec<ServerHealth>, WriteAttempt> {
        let mut client = self.leader_client(leader_addr)?;
        let mut request = self.channels.request(ServerHealthRequest {});
        request.set_timeout(crate::cluster::time_left(deadline));
        let Ok(answer) = self
            .unless_replaced(leader_addr, client.server_health(request))
            .await
        else {
            return Err(WriteAttempt::Retry);
        };
        match answer {
            Ok(reply) => {
                let reply = reply.into_inner();
                match reply.kind() {
                    ErrorKind::None => serde_json::from_slice(&reply.servers).map_err(|e| {
                        WriteAttempt::Failed(ClusterError::Internal(format!(
                            "leader's server health: {e}"
                        )))
                    }),
                    ErrorKind::NoLeader | ErrorKind::NotLeader => Err(WriteAttempt::Retry),
                    _ => Err(WriteAttempt::Failed(ClusterError::Internal(reply.error))),
                }
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                Err(WriteAttempt::Failed(ClusterError::Internal(
                    "the leader runs an older Meshwork without server health; upgrade it".into(),
                )))
            }
            // No side effect: any other failure is worth another try.
            Err(_) => Err(WriteAttempt::Retry),
        }
    }
}
