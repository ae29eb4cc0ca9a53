//! Who the other servers are: their names, versions and protocol levels,
//! learned from internal RPCs rather than configured. Every internal
//! request and every AppendEntries answer carries the sender's entry and
//! what it knows of the others (a few hundred bytes), so the leader learns
//! every follower from their answers and every follower learns everyone
//! from the leader's heartbeats. What a server says of itself overrides
//! what others relay about it.
//!
//! Used for server names in the Raft configuration
//! (`/v1/operator/raft/configuration`, `meshctl members`) and autopilot
//! health, and
//! to hold back commands that older servers could not decode until every
//! voter speaks a protocol level that has them ([`PROTOCOL`]).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tonic::metadata::{BinaryMetadataValue, MetadataMap};

use super::NodeId;

/// gRPC binary metadata key carrying the directory (JSON).
pub const DIRECTORY_HEADER: &str = "x-meshwork-servers-bin";

/// The protocol level that added `Command::Reap`.
pub const PROTOCOL_REAP: u32 = 2;

/// The protocol level that added the mesh CA's commands
/// (`Command::CaRotate`, `CaSetConfig`, `CaPrune`).
pub const PROTOCOL_CA: u32 = 3;

/// The protocol level that added `RaftInternal.SignLeaf` (the leader
/// signs every leaf; a follower whose leader is older signs itself).
pub const PROTOCOL_SIGN_FORWARD: u32 = 4;

/// The internal protocol level this build speaks: the newest of the
/// levels above. (Servers that send no directory at all are level 1.)
pub const PROTOCOL: u32 = PROTOCOL_SIGN_FORWARD;

/// One server as the directory knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub id: NodeId,
    pub name: String,
    pub version: String,
    pub protocol: u32,
}

#[derive(Debug)]
pub struct Directory {
    me: ServerInfo,
    /// Everyone else, by id.
    others: Mutex<BTreeMap<NodeId, ServerInfo>>,
    /// What [`Directory::stamp`] sends, encoded once per change of `others`
    /// (it rides on every heartbeat); `None` after a change.
    encoded: Mutex<Option<BinaryMetadataValue>>,
    /// Payloads already absorbed: a peer sends the same bytes on every
    /// heartbeat until something changes, and they need no parsing again.
    seen: Mutex<std::collections::HashSet<bytes::Bytes>>,
}

/// Distinct payloads remembered as already absorbed (a handful of servers
/// each send one until something changes).
const SEEN_MAX: usize = 64;

/// What travels: the sender first, then the others it knows.
#[derive(Debug, Serialize, Deserialize)]
struct Wire(Vec<ServerInfo>);

impl Directory {
    pub fn new(id: NodeId, name: String) -> Self {
        Self {
            me: ServerInfo {
                id,
                name,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                protocol: PROTOCOL,
            },
            others: Mutex::default(),
            encoded: Mutex::default(),
            seen: Mutex::default(),
        }
    }

    fn others(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, ServerInfo>> {
        self.others.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What is known of server `id` (this one included).
    pub fn get(&self, id: NodeId) -> Option<ServerInfo> {
        if id == self.me.id {
            return Some(self.me.clone());
        }
        self.others().get(&id).cloned()
    }

    /// Adds this server's view to outgoing metadata.
    pub fn stamp(&self, metadata: &mut MetadataMap) {
        let mut encoded = self.encoded.lock().unwrap_or_else(|p| p.into_inner());
        if encoded.is_none() {
            let mut list = vec![self.me.clone()];
            list.extend(self.others().values().cloned());
            *encoded = serde_json::to_vec(&Wire(list))
                .ok()
                .map(|json| BinaryMetadataValue::from_bytes(&json));
        }
        if let Some(value) = &*encoded {
            metadata.insert_bin(DIRECTORY_HEADER, value.clone());
        }
    }

    /// Learns from incoming metadata (ignored when absent or malformed:
    /// an older server sends none).
    pub fn absorb(&self, metadata: &MetadataMap) {
        let Some(value) = metadata.get_bin(DIRECTORY_HEADER) else {
            return;
        };
        {
            // Looked up as sent (base64): nothing is decoded or allocated
            // for the usual heartbeat that repeats a known payload.
            let sent = value.as_encoded_bytes();
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.contains(sent) {
                return;
            }
            if seen.len() >= SEEN_MAX {
                seen.clear();
            }
            seen.insert(bytes::Bytes::copy_from_slice(sent));
        }
        let Ok(bytes) = value.to_bytes() else {
            return;
        };
        let Ok(Wire(list)) = serde_json::from_slice::<Wire>(&bytes) else {
            return;
        };
        let mut others = self.others();
        let mut changed = false;
        for (i, info) in list.into_iter().enumerate() {
            if info.id == self.me.id {
                continue;
            }
            // The sender speaks for itself; relayed entries only fill gaps.
            if (i == 0 || !others.contains_key(&info.id)) && others.get(&info.id) != Some(&info) {
                others.insert(info.id, info);
                changed = true;
            }
        }
        drop(others);
        if changed {
            *self.encoded.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Every one of `ids` is known to speak at least `level`.
    pub fn all_speak(&self, ids: impl IntoIterator<Item = NodeId>, level: u32) -> bool {
        ids.into_iter()
            .all(|id| self.get(id).is_some_and(|s| s.protocol >= level))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_learn_each_other_through_a_third() {
        let (a, b, c) = (
            Directory::new(1, "a".into()),
            Directory::new(2, "b".into()),
            Directory::new(3, "c".into()),
        );
        // b answers a; c answers a; then a's heartbeat reaches b.
        let mut m = MetadataMap::new();
        b.stamp(&mut m);
        a.absorb(&m);
        let mut m = MetadataMap::new();
        c.stamp(&mut m);
        a.absorb(&m);
        let mut m = MetadataMap::new();
        a.stamp(&mut m);
        b.absorb(&m);
        assert_eq!(b.get(3).map(|s| s.name), Some("c".into()));
        assert_eq!(b.get(1).map(|s| s.name), Some("a".into()));
        assert!(b.all_speak([1, 2, 3], PROTOCOL));
        assert!(!b.all_speak([1, 2, 3, 4], PROTOCOL), "4 is unknown");
        // A relayed entry does not override what a server said itself.
        let stale = Directory::new(9, "x".into());
        stale.others().insert(
            3,
            ServerInfo {
                id: 3,
                name: "old-c".into(),
                version: "0".into(),
                protocol: 1,
            },
        );
        let mut m = MetadataMap::new();
        stale.stamp(&mut m);
        b.absorb(&m);
        assert_eq!(b.get(3).map(|s| s.name), Some("c".into()));
        // Garbage is ignored.
        let mut m = MetadataMap::new();
        m.insert_bin(DIRECTORY_HEADER, BinaryMetadataValue::from_bytes(b"{nope"));
        b.absorb(&m);
        assert_eq!(b.get(3).map(|s| s.name), Some("c".into()));
    }
}
