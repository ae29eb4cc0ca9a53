//! The registry's public interfaces: REST (Consul-compatible) and gRPC.

pub mod fleet;
pub mod grpc;
pub mod http;

use crate::auth::{Acl, Refusal, Resolved};
use crate::cluster::RegistryNode;

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
