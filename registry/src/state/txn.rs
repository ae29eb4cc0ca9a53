//! Consul's transactions (`/v1/txn`): a list of operations applied all or
//! none, at one index. The operations run in order against a copy of the
//! state (cheap: the maps are persistent); the first that fails discards
//! the copy, so a failed transaction changes nothing.

use serde::{Deserialize, Serialize};

use super::State;
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
    #[serde(with = "crate::command::base64_bytes")]
    pub value: Vec<u8>,
    pub flags: u64,
    /// The ModifyIndex a `cas`, `check-index` or `delete-cas` expects.
    pub index: u64,
    /// The session of a `lock`, `unlock` or `check-session` (empty: none).
    pub session: String,
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    Kv(KvOp),
}

impl TxnOp {
    pub fn reads_only(&self) -> bool {
        match self {
            TxnOp::Kv(op) => op.verb.reads_only(),
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
                return Err(crate::command::invalid_session(id));
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
}
