//! The registry's public interfaces: REST (Consul-compatible) and gRPC.

pub mod fleet;
pub mod grpc;
pub mod http;

use crate::auth::{Acl, Refusal, Resolved};
use crate::cluster::{ClusterError, Consistency, RegistryNode};

/// Before a request that changes something (or signs a certificate) is
/// authorized: brings this server's replica up to what the leader had
/// applied when the request arrived, so that the token is resolved as of
/// now. A token revoked through another server a moment earlier, whose
/// revocation this follower had not applied yet, is then refused instead
/// of having its write accepted here and forwarded (Consul resolves
/// write tokens on the leader). Free with ACLs off; on the leader only the
/// check that it applied an entry of its own term; on a follower one
/// round trip to the leader.
pub async fn catch_up_for_write(acl: &Acl, node: &RegistryNode) -> Result<(), ClusterError> {
    if !acl.enabled() {
        return Ok(());
    }
    Box::pin(node.read_barrier(Consistency::Default)).await
}

/// The rights of a request carrying `token` (none: the default or
/// anonymous token), from this server's replica of the ACL tables.
pub fn resolve(acl: &Acl, node: &RegistryNode, token: Option<&str>) -> Result<Resolved, Refusal> {
    if !acl.enabled() {
        return Ok(Resolved::everything());
    }
    let (_, since_contact) = node.leader_contact();
    let leader_lost = since_contact > acl.settings().down_after;
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    // A copy of the tables (persistent maps: O(1)), so that compiling a
    // token's rules never holds the state's lock.
    let tables = node.state.read().acl.clone();
    acl.resolve(&tables, token, now_ns, leader_lost)
}
