//! Consul's transactions (`/v1/txn`): a list of operations applied all or
//! none, at one index. The operations run in order against a copy of the
//! state (cheap: the maps are persistent); the first that fails discards
//! the copy, so a failed transaction changes nothing.

use serde::{Deserialize, Serialize};

use super::State;
use super::catalog::{CheckSpec, HealthCheck, Node, Registration, ServiceInstance, ServiceSpec};
use super::kv::KvEntry;

/// Consul's limit on operations per transaction (128 since Consul 1.14;
/// 64 before).
pub const MAX_OPS: usize = 128;

/// A KV verb of a transaction (Consul's names in [`KvVerb::parse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvVerb {
    Set,
    Cas,
    Lock,
    Unlock,
    Get,
    GetOrEmpty,
    GetTree,
    CheckIndex,
    CheckSession,
    CheckNotExists,
    Delete,
    DeleteTree,
    DeleteCas,
}

impl KvVerb {
    /// The verb from Consul's spelling.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "set" => KvVerb::Set,
            "cas" => KvVerb::Cas,
            "lock" => KvVerb::Lock,
            "unlock" => KvVerb::Unlock,
            "get" => KvVerb::Get,
            "get-or-empty" => KvVerb::GetOrEmpty,
            "get-tree" => KvVerb::GetTree,
            "check-index" => KvVerb::CheckIndex,
            "check-session" => KvVerb::CheckSession,
            "check-not-exists" => KvVerb::CheckNotExists,
            "delete" => KvVerb::Delete,
            "delete-tree" => KvVerb::DeleteTree,
            "delete-cas" => KvVerb::DeleteCas,
            _ => return None,
        })
    }

    /// Whether the verb only reads (a transaction of such verbs needs no
    /// log entry).
    pub fn reads_only(self) -> bool {
        matches!(
            self,
            KvVerb::Get
                | KvVerb::GetOrEmpty
                | KvVerb::GetTree
                | KvVerb::CheckIndex
                | KvVerb::CheckSession
                | KvVerb::CheckNotExists
        )
    }
}

/// One KV operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvOp {
    pub verb: KvVerb,
    pub key: String,
    #[serde(with = "crate::state::base64_bytes")]
    pub value: Vec<u8>,
    pub flags: u64,
    /// The ModifyIndex a `cas`, `check-index` or `delete-cas` expects.
    pub index: u64,
    /// The session of a `lock`, `unlock` or `check-session` (empty: none).
    pub session: String,
}

/// A verb of a Node, Service or Check operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CatalogVerb {
    Get,
    Set,
    Cas,
    Delete,
    DeleteCas,
}

impl CatalogVerb {
    /// The verb from Consul's spelling.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "get" => CatalogVerb::Get,
            "set" => CatalogVerb::Set,
            "cas" => CatalogVerb::Cas,
            "delete" => CatalogVerb::Delete,
            "delete-cas" => CatalogVerb::DeleteCas,
            _ => return None,
        })
    }
}

/// A Node operation: the node's fields as a registration (no service, no
/// checks); `index` is the ModifyIndex a `cas` or `delete-cas` expects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeOp {
    pub verb: CatalogVerb,
    pub node: Registration,
    pub index: u64,
}

/// A Service operation on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceOp {
    pub verb: CatalogVerb,
    pub node: String,
    pub service: ServiceSpec,
    pub index: u64,
}

/// A Check operation on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckOp {
    pub verb: CatalogVerb,
    pub node: String,
    pub check: CheckSpec,
    pub index: u64,
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    Kv(KvOp),
    Node(NodeOp),
    Service(ServiceOp),
    Check(CheckOp),
}

impl TxnOp {
    pub fn reads_only(&self) -> bool {
        match self {
            TxnOp::Kv(op) => op.verb.reads_only(),
            TxnOp::Node(NodeOp { verb, .. })
            | TxnOp::Service(ServiceOp { verb, .. })
            | TxnOp::Check(CheckOp { verb, .. }) => *verb == CatalogVerb::Get,
        }
    }

    /// About how many bytes it takes in a log entry.
    pub fn approx_size(&self) -> usize {
        const SMALL: usize = 256;
        match self {
            TxnOp::Kv(op) => SMALL + op.key.len() + op.value.len() * 4 / 3,
            TxnOp::Node(_) | TxnOp::Service(_) | TxnOp::Check(_) => 4 * SMALL,
        }
    }
}

/// What one operation returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnResult {
    /// A KV entry; `with_value` false for writes (Consul blanks the value
    /// of what a write returns).
    Kv {
        key: String,
        entry: KvEntry,
        with_value: bool,
    },
    Node(Box<Node>),
    Service(Box<ServiceInstance>),
    Check(Box<HealthCheck>),
}

/// Why a transaction was rolled back: the failing operation (0-based) and
/// Consul's message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnError {
    pub op_index: usize,
    pub what: String,
}

/// A transaction's outcome: results when it applied, errors when not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnOutcome {
    pub results: Vec<TxnResult>,
    pub errors: Vec<TxnError>,
}

/// Runs `ops` against `state` at `index`: all of them, or (on the first
/// failure) none. A read-only transaction may run against a copy of the
/// state without a log entry (the index is then unused).
pub fn run(state: &mut State, index: u64, ops: &[TxnOp]) -> TxnOutcome {
    let mut work = state.clone();
    let mut results = Vec::new();
    for (op_index, op) in ops.iter().enumerate() {
        let step = match op {
            TxnOp::Kv(op) => kv(&mut work, index, op, &mut results),
            TxnOp::Node(op) => node(&mut work, index, op, &mut results),
            TxnOp::Service(op) => service(&mut work, index, op, &mut results),
            TxnOp::Check(op) => check(&mut work, index, op, &mut results),
        };
        if let Err(what) = step {
            return TxnOutcome {
                results: Vec::new(),
                errors: vec![TxnError { op_index, what }],
            };
        }
    }
    *state = work;
    TxnOutcome {
        results,
        errors: Vec::new(),
    }
}

fn kv(
    state: &mut State,
    index: u64,
    op: &KvOp,
    results: &mut Vec<TxnResult>,
) -> Result<(), String> {
    let key = op.key.as_str();
    let wrote = |state: &State, results: &mut Vec<TxnResult>| {
        if let Some(entry) = state.kv.get(key) {
            results.push(TxnResult::Kv {
                key: key.to_owned(),
                entry: entry.clone(),
                with_value: false,
            });
        }
    };
    let modify_index = |state: &State| state.kv.get(key).map(|e| e.modify_index);
    let session = || (!op.session.is_empty()).then_some(op.session.as_str());
    match op.verb {
        KvVerb::Set => {
            state.kv.set(index, key, &op.value, op.flags, None);
            wrote(state, results);
        }
        KvVerb::Cas => {
            if !state
                .kv
                .set(index, key, &op.value, op.flags, Some(op.index))
            {
                return Err(format!("failed to set key {key:?}, index is stale"));
            }
            wrote(state, results);
        }
        KvVerb::Lock => {
            let id = session().ok_or_else(|| "missing session".to_owned())?;
            if state.sessions.get(id).is_none() {
                return Err(super::session::invalid_session(id));
            }
            if !state.kv.acquire(index, key, &op.value, op.flags, id, None) {
                return Err(format!("failed to lock key {key:?}, lock is already held"));
            }
            wrote(state, results);
        }
        KvVerb::Unlock => {
            let id = session().ok_or_else(|| "missing session".to_owned())?;
            if !state.kv.release(index, key, &op.value, op.flags, id, None) {
                return Err(format!(
                    "failed to unlock key {key:?}, lock isn't held, or is held by another session"
                ));
            }
            wrote(state, results);
        }
        KvVerb::Get => {
            let entry = state
                .kv
                .get(key)
                .ok_or_else(|| format!("key {key:?} doesn't exist"))?;
            results.push(TxnResult::Kv {
                key: key.to_owned(),
                entry: entry.clone(),
                with_value: true,
            });
        }
        KvVerb::GetOrEmpty => {
            let entry = state.kv.get(key).cloned().unwrap_or_else(|| KvEntry {
                value: std::sync::Arc::from(&[][..]),
                flags: op.flags,
                create_index: 0,
                modify_index: 0,
                lock_index: 0,
                session: None,
            });
            results.push(TxnResult::Kv {
                key: key.to_owned(),
                entry,
                with_value: true,
            });
        }
        KvVerb::GetTree => {
            results.extend(state.kv.prefix_range(key).map(|(k, e)| TxnResult::Kv {
                key: k.clone(),
                entry: e.clone(),
                with_value: true,
            }));
        }
        KvVerb::CheckIndex => match modify_index(state) {
            None => return Err(format!("failed to check index, key {key:?} doesn't exist")),
            Some(current) if current != op.index => {
                return Err(format!(
                    "failed index check for key {key:?}, current modify index {current} != {}",
                    op.index
                ));
            }
            Some(_) => wrote(state, results),
        },
        KvVerb::CheckSession => {
            let entry = state
                .kv
                .get(key)
                .ok_or_else(|| format!("failed to check session, key {key:?} doesn't exist"))?;
            let current = entry.session.as_deref().unwrap_or("");
            if current != op.session {
                return Err(format!(
                    "failed session check for key {key:?}, current session {current:?} != {:?}",
                    op.session
                ));
            }
            wrote(state, results);
        }
        KvVerb::CheckNotExists => {
            if state.kv.get(key).is_some() {
                return Err(format!("key {key:?} exists"));
            }
        }
        KvVerb::Delete => {
            state.kv.delete(index, key, None);
        }
        KvVerb::DeleteTree => state.kv.delete_tree(index, key),
        KvVerb::DeleteCas => {
            if !state.kv.delete(index, key, Some(op.index)) {
                return Err(format!("failed to delete key {key:?}, index is stale"));
            }
        }
    }
    Ok(())
}

fn node(
    state: &mut State,
    index: u64,
    op: &NodeOp,
    results: &mut Vec<TxnResult>,
) -> Result<(), String> {
    let name = op.node.node.as_str();
    let current = state.catalog.node(name).map(|n| n.modify_index);
    match op.verb {
        CatalogVerb::Get => {}
        CatalogVerb::Set | CatalogVerb::Cas => {
            if op.verb == CatalogVerb::Cas && current.unwrap_or(0) != op.index {
                return Err(format!("failed to set node {name:?}, index is stale"));
            }
            state
                .catalog
                .register(index, &op.node)
                .map_err(|e| e.to_string())?;
        }
        CatalogVerb::Delete | CatalogVerb::DeleteCas => {
            if op.verb == CatalogVerb::DeleteCas && current != Some(op.index) {
                return Err(format!("failed to delete node {name:?}, index is stale"));
            }
            state
                .catalog
                .deregister(index, name, None, None)
                .map_err(|e| e.to_string())?;
            state.sessions_follow_catalog(index, name);
            return Ok(());
        }
    }
    state.sessions_follow_catalog(index, name);
    let node = state
        .catalog
        .node(name)
        .ok_or_else(|| format!("node {name:?} doesn't exist"))?;
    results.push(TxnResult::Node(Box::new(node.clone())));
    Ok(())
}

fn service(
    state: &mut State,
    index: u64,
    op: &ServiceOp,
    results: &mut Vec<TxnResult>,
) -> Result<(), String> {
    let (node, id) = (op.node.as_str(), op.service.id.as_str());
    let current = state.catalog.service(node, id).map(|s| s.modify_index);
    let missing = || format!("service {id:?} on node {node:?} doesn't exist");
    match op.verb {
        CatalogVerb::Get => {}
        CatalogVerb::Set | CatalogVerb::Cas => {
            if op.verb == CatalogVerb::Cas && current.unwrap_or(0) != op.index {
                return Err(format!(
                    "failed to set service {id:?} on node {node:?}, index is stale"
                ));
            }
            if state.catalog.node(node).is_none() {
                return Err("Missing node registration".into());
            }
            let registration = Registration {
                node: node.to_owned(),
                skip_node_update: true,
                service: Some(op.service.clone()),
                ..Registration::default()
            };
            state
                .catalog
                .register(index, &registration)
                .map_err(|e| e.to_string())?;
        }
        CatalogVerb::Delete | CatalogVerb::DeleteCas => {
            if op.verb == CatalogVerb::DeleteCas && current != Some(op.index) {
                return Err(format!(
                    "failed to delete service {id:?} on node {node:?}, index is stale"
                ));
            }
            // Deleting what is not there succeeds, as Consul.
            if current.is_some() {
                state
                    .catalog
                    .deregister(index, node, Some(id), None)
                    .map_err(|e| e.to_string())?;
                state.sessions_follow_catalog(index, node);
            }
            return Ok(());
        }
    }
    let instance = state.catalog.service(node, id).ok_or_else(missing)?;
    results.push(TxnResult::Service(Box::new(instance.clone())));
    Ok(())
}

fn check(
    state: &mut State,
    index: u64,
    op: &CheckOp,
    results: &mut Vec<TxnResult>,
) -> Result<(), String> {
    let (node, id) = (op.node.as_str(), op.check.check_id.as_str());
    let find = |state: &State| {
        state
            .catalog
            .node_checks(node)
            .find(|c| c.check_id == id)
            .cloned()
    };
    let current = find(state).map(|c| c.modify_index);
    match op.verb {
        CatalogVerb::Get => {}
        CatalogVerb::Set | CatalogVerb::Cas => {
            if op.verb == CatalogVerb::Cas && current.unwrap_or(0) != op.index {
                return Err(format!(
                    "failed to set check {id:?} on node {node:?}, index is stale"
                ));
            }
            if state.catalog.node(node).is_none() {
                return Err("Missing node registration".into());
            }
            let registration = Registration {
                node: node.to_owned(),
                skip_node_update: true,
                checks: vec![op.check.clone()],
                ..Registration::default()
            };
            state
                .catalog
                .register(index, &registration)
                .map_err(|e| e.to_string())?;
            state.sessions_follow_catalog(index, node);
        }
        CatalogVerb::Delete | CatalogVerb::DeleteCas => {
            if op.verb == CatalogVerb::DeleteCas && current != Some(op.index) {
                return Err(format!(
                    "failed to delete check {id:?} on node {node:?}, index is stale"
                ));
            }
            if current.is_some() {
                state
                    .catalog
                    .deregister(index, node, None, Some(id))
                    .map_err(|e| e.to_string())?;
                state.sessions_follow_catalog(index, node);
            }
            return Ok(());
        }
    }
    let check =
        find(state).ok_or_else(|| format!("check {id:?} on node {node:?} doesn't exist"))?;
    results.push(TxnResult::Check(Box::new(check)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(verb: KvVerb, key: &str, value: &str, index: u64) -> TxnOp {
        TxnOp::Kv(KvOp {
            verb,
            key: key.into(),
            value: value.as_bytes().to_vec(),
            flags: 0,
            index,
            session: String::new(),
        })
    }

    #[test]
    fn a_transaction_applies_whole_or_not_at_all() {
        let mut state = State::default();
        let ten: Vec<TxnOp> = (0..10)
            .map(|i| op(KvVerb::Set, &format!("t/{i}"), "v", 0))
            .collect();
        let outcome = run(&mut state, 5, &ten);
        assert!(outcome.errors.is_empty());
        assert_eq!(outcome.results.len(), 10);
        assert_eq!(state.kv.len(), 10);
        // A stale check-index in the middle: nothing of it is written.
        let ops = vec![
            op(KvVerb::Set, "t/new", "x", 0),
            op(KvVerb::Delete, "t/0", "", 0),
            op(KvVerb::CheckIndex, "t/1", "", 4),
            op(KvVerb::Set, "t/after", "x", 0),
        ];
        let before = state.clone();
        let outcome = run(&mut state, 6, &ops);
        assert_eq!(
            outcome.errors,
            vec![TxnError {
                op_index: 2,
                what: "failed index check for key \"t/1\", current modify index 5 != 4".into()
            }]
        );
        assert!(outcome.results.is_empty());
        assert_eq!(state, before);
        // Reads see the transaction's own earlier writes.
        let ops = vec![
            op(KvVerb::CheckNotExists, "u/a", "", 0),
            op(KvVerb::Set, "u/a", "1", 0),
            op(KvVerb::Cas, "u/a", "2", 7),
            op(KvVerb::GetTree, "u/", "", 0),
        ];
        let outcome = run(&mut state, 7, &ops);
        assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
        match outcome.results.last() {
            Some(TxnResult::Kv {
                entry, with_value, ..
            }) => assert!(*with_value && &*entry.value == b"2"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn catalog_operations_join_the_transaction() {
        let mut state = State::default();
        let node_op = TxnOp::Node(NodeOp {
            verb: CatalogVerb::Set,
            node: Registration {
                node: "db1".into(),
                address: "10.0.0.9".into(),
                ..Registration::default()
            },
            index: 0,
        });
        let service_on = |node: &str| {
            TxnOp::Service(ServiceOp {
                verb: CatalogVerb::Set,
                node: node.into(),
                service: ServiceSpec {
                    id: "pg-1".into(),
                    name: "pg".into(),
                    ..ServiceSpec::default()
                },
                index: 0,
            })
        };
        // A service on a node that does not exist fails the whole
        // transaction: the node registered before it is gone too.
        let outcome = run(&mut state, 3, &[node_op.clone(), service_on("db2")]);
        assert_eq!(outcome.errors[0].what, "Missing node registration");
        assert!(state.catalog.node("db1").is_none());
        let outcome = run(&mut state, 4, &[node_op, service_on("db1")]);
        assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
        assert_eq!(outcome.results.len(), 2);
        assert!(state.catalog.service("db1", "pg-1").is_some());
        // delete-cas with a stale index changes nothing.
        let delete = TxnOp::Node(NodeOp {
            verb: CatalogVerb::DeleteCas,
            node: Registration {
                node: "db1".into(),
                ..Registration::default()
            },
            index: 3,
        });
        let outcome = run(&mut state, 5, &[delete]);
        assert_eq!(
            outcome.errors[0].what,
            "failed to delete node \"db1\", index is stale"
        );
        assert!(state.catalog.node("db1").is_some());
    }
}
