//! Consul's sessions: a named lease on a node, bound to health checks and
//! optionally to a TTL, that KV locks are held under. Pure data: the TTL
//! clock runs on the leader ([`crate::leader::session_ttl`]), which
//! destroys an expired session through the log like any other write.
//!
//! A session ends — is *invalidated* — when it is destroyed, when its TTL
//! passes without a renewal, when one of its checks turns critical or goes
//! away, or when its node is deregistered. Its locks are then released or
//! the keys deleted, per its [`Behavior`] (see [`crate::state::State`]).

use imbl::{OrdMap, OrdSet};
use serde::{Deserialize, Serialize};

/// What happens to a session's locks when it is invalidated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Behavior {
    /// The keys stay; their lock is released.
    #[default]
    Release,
    /// The keys are deleted.
    Delete,
}

impl Behavior {
    /// Consul's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }
}

/// A session as created (indexes assigned on apply).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSpec {
    /// A UUID, chosen by the server that took the request.
    pub id: String,
    pub name: String,
    pub node: String,
    /// Node-level checks (by check id) the session depends on.
    pub node_checks: Vec<String>,
    /// Service checks (by check id, on the same node) it depends on.
    pub service_checks: Vec<String>,
    /// How long its locks cannot be taken again after it is invalidated.
    pub lock_delay_ns: u64,
    pub behavior: Behavior,
    /// The TTL as the client wrote it (`"30s"`), empty for none.
    pub ttl: String,
}

/// A stored session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub spec: SessionSpec,
    pub create_index: u64,
    pub modify_index: u64,
}

/// Why a session could not be created (Consul's messages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SessionError {
    #[error("Missing node registration")]
    MissingNode,
    #[error("Missing check '{0}' registration")]
    MissingCheck(String),
    #[error("Check '{0}' is in critical state")]
    CriticalCheck(String),
    #[error("Session ID {0:?} is already in use")]
    DuplicateId(String),
}

/// Consul's answer to a lock operation naming a session that does not exist.
pub fn invalid_session(id: &str) -> String {
    format!("invalid session {id:?}")
}

/// Every session, by id and by node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sessions {
    by_id: OrdMap<String, Session>,
    /// (node, session id): the sessions of one node, for invalidation when
    /// the node or its checks change.
    by_node: OrdSet<(String, String)>,
    /// Index of the last change to any session (Consul's table index,
    /// which every session read reports).
    index: u64,
}

impl Sessions {
    /// Stores a session whose preconditions the caller checked.
    pub(crate) fn insert(&mut self, index: u64, spec: &SessionSpec) -> Result<(), SessionError> {
        if self.by_id.contains_key(&spec.id) {
            return Err(SessionError::DuplicateId(spec.id.clone()));
        }
        self.by_node.insert((spec.node.clone(), spec.id.clone()));
        self.by_id.insert(
            spec.id.clone(),
            Session {
                spec: spec.clone(),
                create_index: index,
                modify_index: index,
            },
        );
        self.index = index;
        Ok(())
    }

    /// Removes a session; what it was, if it existed.
    pub(crate) fn remove(&mut self, index: u64, id: &str) -> Option<Session> {
        let session = self.by_id.remove(id)?;
        self.by_node
            .remove(&(session.spec.node.clone(), id.to_owned()));
        self.index = index;
        Some(session)
    }

    pub fn get(&self, id: &str) -> Option<&Session> {
        self.by_id.get(id)
    }

    /// Every session, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &Session> {
        self.by_id.values()
    }

    /// The sessions of one node, in id order.
    pub fn of_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Session> + 'a {
        self.by_node
            .range((node.to_owned(), String::new())..)
            .take_while(move |(n, _)| n == node)
            .filter_map(|(_, id)| self.by_id.get(id))
    }

    /// Index of the last change to any session.
    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Replaces every session with a backup's, as one change at `index`
    /// (the by-node index rebuilt, not trusted).
    pub(crate) fn restore(&mut self, index: u64, backup: &Sessions) {
        let mut restored = backup.clone();
        restored.by_node = backup
            .by_id
            .values()
            .map(|s| (s.spec.node.clone(), s.spec.id.clone()))
            .collect();
        restored.by_id = backup
            .by_id
            .iter()
            .map(|(id, session)| {
                let mut session = session.clone();
                session.create_index = index;
                session.modify_index = index;
                (id.clone(), session)
            })
            .collect();
        restored.index = index;
        *self = restored;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, node: &str) -> SessionSpec {
        SessionSpec {
            id: id.into(),
            node: node.into(),
            ..SessionSpec::default()
        }
    }

    #[test]
    fn sessions_are_found_by_id_and_node() {
        let mut sessions = Sessions::default();
        sessions.insert(3, &spec("b", "n1")).expect("insert");
        sessions.insert(4, &spec("a", "n2")).expect("insert");
        sessions.insert(5, &spec("c", "n1")).expect("insert");
        assert_eq!(
            sessions.insert(6, &spec("c", "n3")),
            Err(SessionError::DuplicateId("c".into()))
        );
        let on_n1: Vec<&str> = sessions.of_node("n1").map(|s| s.spec.id.as_str()).collect();
        assert_eq!(on_n1, ["b", "c"]);
        assert_eq!(sessions.of_node("n").count(), 0);
        assert_eq!(sessions.index(), 5);
        assert!(sessions.remove(7, "b").is_some());
        assert!(sessions.remove(8, "b").is_none());
        assert_eq!(sessions.index(), 7);
        assert_eq!(sessions.of_node("n1").count(), 1);
        assert_eq!(sessions.get("a").map(|s| s.create_index), Some(4));
    }
}
