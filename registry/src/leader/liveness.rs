//! Sidecar heartbeat sessions. A sidecar's node carries one node check,
//! [`SESSION_CHECK_ID`], whose definition holds the session TTL. Heartbeats
//! never go through Raft: the leader keeps when each session was last
//! renewed in memory (a follower batches the heartbeats it receives and
//! forwards them); the leader's health duties (see [`crate::leader::health`]) mark
//! a silent session critical — which makes every service on that node
//! critical — and later remove the node. A new leader gives every session
//! a full TTL of grace.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use meshwork_proto::v1::TouchSessionsRequest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cluster::RegistryNode;

pub use crate::state::catalog::SESSION_CHECK_ID;
/// Session TTL when the sidecar asks for none.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(15);
/// Heartbeats received on a follower are forwarded this often.
const FORWARD_EVERY: Duration = Duration::from_millis(500);
/// Heartbeats waiting to be forwarded; beyond this they are dropped (the
/// sidecar sends several per TTL).
const QUEUE: usize = 16 * 1024;

/// Where a server's API handlers report session heartbeats.
#[derive(Debug, Clone)]
pub struct Sessions {
    node: Arc<RegistryNode>,
    forward: mpsc::Sender<String>,
}

impl Sessions {
    /// The handle, and the task that forwards heartbeats to the leader.
    pub fn new(
        node: Arc<RegistryNode>,
        shutdown: CancellationToken,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (forward, pending) = mpsc::channel(QUEUE);
        let task = forward_to_leader(Arc::clone(&node), pending, shutdown);
        (Self { node, forward }, task)
    }

    /// Renews `node_name`'s session.
    pub fn touch(&self, node_name: &str) {
        if self.node.is_leader() {
            self.node
                .touch((node_name.to_owned(), SESSION_CHECK_ID.to_owned()));
        } else if self.forward.try_send(node_name.to_owned()).is_err() {
            tracing::debug!(
                node = node_name,
                "session heartbeat queue full; dropped one"
            );
        }
    }
}

async fn forward_to_leader(
    node: Arc<RegistryNode>,
    mut pending: mpsc::Receiver<String>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            first = pending.recv() => match first {
                Some(first) => first,
                None => return,
            },
        };
        // Gather what arrives within one period, then send it in one call.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(FORWARD_EVERY) => {}
        }
        let mut nodes: HashSet<String> = HashSet::from([first]);
        while let Ok(more) = pending.try_recv() {
            nodes.insert(more);
        }
        if node.is_leader() {
            for name in nodes {
                node.touch((name, SESSION_CHECK_ID.to_owned()));
            }
            continue;
        }
        let Some((_, leader_addr)) = node.leader() else {
            tracing::debug!(
                sessions = nodes.len(),
                "no leader: session heartbeats dropped"
            );
            continue;
        };
        let mut client = match node.channels.client(&leader_addr) {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!(error = %e, "no channel to the leader for session heartbeats");
                continue;
            }
        };
        let mut request = node.channels.request(TouchSessionsRequest {
            nodes: nodes.into_iter().collect(),
        });
        request.set_timeout(Duration::from_secs(2));
        if let Err(e) = client.touch_sessions(request).await {
            tracing::debug!(error = %e, "forwarding session heartbeats failed");
        }
    }
}
