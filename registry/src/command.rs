//! The Raft log's contract: every change to the replicated state is one
//! [`Command`], and applying it yields one [`CommandResponse`].
//!
//! Rules (they keep old logs and snapshots readable by new binaries):
//! - variants are only ever appended, never reordered, renamed or changed in
//!   meaning; a field may be added only with `#[serde(default)]`;
//! - a command carries everything apply needs: apply reads no clock, no
//!   randomness and no I/O. The log index is the only "time" it sees.

use serde::{Deserialize, Serialize};

use crate::state::acl;
use crate::state::catalog::{CatalogError, HealthStatus, Registration};
use crate::state::session::invalid_session;
use crate::state::{StagedPart, StagedRestore, State, base64_bytes};

/// A change to the replicated state, as written to the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Set a key. With `cas`, only if the key's `ModifyIndex` equals it
    /// (`Some(0)`: only if the key does not exist).
    KvSet {
        key: String,
        #[serde(with = "base64_bytes")]
        value: Vec<u8>,
        flags: u64,
        cas: Option<u64>,
    },
    /// Delete one key. With `cas`, only if its `ModifyIndex` equals it.
    KvDelete {
        key: String,
        cas: Option<u64>,
    },
    /// Delete every key that starts with `prefix`.
    KvDeleteTree {
        prefix: String,
    },
    /// Names the cluster, once: the first leader proposes a random id and
    /// later proposals change nothing. Servers refuse Raft traffic from
    /// another cluster's id.
    SetClusterId {
        id: String,
    },
    /// Register a node, optionally a service on it, and checks.
    CatalogRegister(Box<Registration>),
    /// Remove a node (both ids absent), a service instance, or a check.
    CatalogDeregister {
        node: String,
        service_id: Option<String>,
        check_id: Option<String>,
    },
    /// Set a check's status and output (a no-op when unchanged).
    CheckUpdate {
        node: String,
        check_id: String,
        status: HealthStatus,
        output: String,
    },
    /// Several client writes in one log entry (group commit), applied in
    /// order at the same index.
    Batch(Vec<Command>),
    /// Replace the KV store, the catalog and the config entries with a
    /// backup's; the cluster keeps its own id. (Written by earlier
    /// versions; `PUT /v1/snapshot` now sends [`Command::RestorePart`]s
    /// and a [`Command::RestoreCommit`], so that no log entry is larger
    /// than what replicates within a heartbeat.)
    Restore(Box<crate::state::State>),
    /// Store a config entry (fields already validated and spelled as
    /// Consul); with `cas`, only if its ModifyIndex equals it (0: absent).
    ConfigSet {
        kind: String,
        name: String,
        body: serde_json::Map<String, serde_json::Value>,
        cas: Option<u64>,
    },
    /// Delete a config entry; with `cas`, only if its ModifyIndex equals it.
    ConfigDelete {
        kind: String,
        name: String,
        cas: Option<u64>,
    },
    /// One piece of a backup being restored, staged in the state until the
    /// commit. Piece 0 starts restore `id` (dropping any unfinished one);
    /// a piece out of order, or of a restore since replaced, is refused.
    RestorePart {
        id: String,
        part: u32,
        #[serde(with = "base64_bytes")]
        data: Vec<u8>,
    },
    /// Restores the staged backup `id` (the JSON of a `State`) when it has
    /// `parts` pieces whose CRC-32 is `crc`: [`Command::Restore`] at this
    /// index. Refused (nothing changes) otherwise.
    RestoreCommit {
        id: String,
        parts: u32,
        crc: u32,
    },
    /// Tombstone GC, proposed by the leader ([`crate::leader::gc`]): drops KV
    /// tombstones and the indexes of gone services and nodes whose last
    /// change is at or below `up_to`. Readers never see an index go back.
    Reap {
        up_to: u64,
    },
    /// Take `key`'s lock for `session` and set the key (Consul's
    /// `?acquire`); with `cas`, only if its ModifyIndex equals it.
    KvLock {
        key: String,
        #[serde(with = "base64_bytes")]
        value: Vec<u8>,
        flags: u64,
        session: String,
        cas: Option<u64>,
    },
    /// Release `key`'s lock held by `session` and set the key (Consul's
    /// `?release`); with `cas`, only if its ModifyIndex equals it.
    KvUnlock {
        key: String,
        #[serde(with = "base64_bytes")]
        value: Vec<u8>,
        flags: u64,
        session: String,
        cas: Option<u64>,
    },
    /// Create a session (its id chosen by the server that took the request).
    SessionCreate(Box<crate::state::session::SessionSpec>),
    /// End a session: destroyed by a client, expired (proposed by the
    /// leader's TTL clock) or invalidated; its locks are released or
    /// deleted per its behavior.
    SessionDestroy {
        id: String,
    },
    /// A transaction: every operation or none, at this entry's index.
    Txn(Vec<crate::state::txn::TxnOp>),
    /// The first ACL token, with the management policy; refused after the
    /// first (Consul's `/v1/acl/bootstrap`).
    AclBootstrap(Box<acl::Token>),
    /// Create or replace an ACL token (ids and secret chosen by the server
    /// that took the request).
    AclTokenSet(Box<acl::Token>),
    AclTokenDelete {
        accessor_id: String,
    },
    /// Create or replace an ACL policy (rules already parsed and checked).
    AclPolicySet(Box<acl::Policy>),
    AclPolicyDelete {
        id: String,
    },
    AclRoleSet(Box<acl::Role>),
    AclRoleDelete {
        id: String,
    },
    /// Make `root` the mesh CA's active root (the first one, or a
    /// rotation), when the active root is still `expect_active`; with
    /// `config`, the CA configuration changes with it. `now_unix` (the
    /// proposer's clock) stamps the old root's end.
    CaRotate {
        expect_active: Option<String>,
        root: Box<crate::state::ca::CaRoot>,
        config: Option<crate::state::ca::CaConfig>,
        now_unix: i64,
    },
    /// Change the CA configuration without a new root.
    CaSetConfig(crate::state::ca::CaConfig),
    /// Remove roots rotated out long enough ago that no leaf they signed
    /// is still valid (proposed by the leader).
    CaPrune {
        ids: Vec<String>,
    },
}

impl Command {
    /// About how many bytes the command takes in a log entry (its large
    /// fields; cheap, no encoding): what the replication splits on.
    pub fn approx_size(&self) -> usize {
        const SMALL: usize = 256;
        match self {
            Command::KvSet { key, value, .. } => SMALL + key.len() + value.len() * 4 / 3,
            Command::RestorePart { data, .. } => SMALL + data.len() * 4 / 3,
            Command::Batch(commands) => commands.iter().map(Command::approx_size).sum(),
            Command::ConfigSet { body, .. } => {
                SMALL + serde_json::to_vec(body).map_or(0, |b| b.len())
            }
            Command::Restore(state) => serde_json::to_vec(state).map_or(usize::MAX, |b| b.len()),
            Command::CatalogRegister(_) => 4 * SMALL,
            Command::KvLock { key, value, .. } | Command::KvUnlock { key, value, .. } => {
                SMALL + key.len() + value.len() * 4 / 3
            }
            Command::Txn(ops) => ops.iter().map(crate::state::txn::TxnOp::approx_size).sum(),
            Command::KvDelete { .. }
            | Command::KvDeleteTree { .. }
            | Command::SetClusterId { .. }
            | Command::CatalogDeregister { .. }
            | Command::CheckUpdate { .. }
            | Command::ConfigDelete { .. }
            | Command::RestoreCommit { .. }
            | Command::Reap { .. }
            | Command::SessionCreate(_)
            | Command::SessionDestroy { .. }
            | Command::AclBootstrap(_)
            | Command::AclTokenSet(_)
            | Command::AclTokenDelete { .. }
            | Command::AclRoleSet(_)
            | Command::AclRoleDelete { .. }
            | Command::AclPolicyDelete { .. } => SMALL,
            Command::AclPolicySet(policy) => SMALL + policy.rules.len(),
            Command::CaRotate { root, .. } => {
                4 * SMALL
                    + root.root_cert_pem.len()
                    + root
                        .intermediate_cert_pems
                        .iter()
                        .map(String::len)
                        .sum::<usize>()
            }
            Command::CaSetConfig(_) | Command::CaPrune { .. } => SMALL,
        }
    }
}

/// What applying a command produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// Log entries that carry no command (blank, membership) answer this.
    #[default]
    Empty,
    /// The command was applied (`true`) or its precondition failed (`false`).
    Applied(bool),
    /// A catalog change refused as invalid (nothing changed).
    CatalogRejected(CatalogError),
    /// One response per command of a [`Command::Batch`].
    Batch(Vec<CommandResponse>),
    /// Refused, with Consul's message (nothing changed): a session that
    /// does not exist, a check that is missing or critical.
    Refused(String),
    /// A transaction's results, or why it was rolled back.
    Txn(crate::state::txn::TxnOutcome),
}

impl CommandResponse {
    /// The `true`/`false` a Consul-style write endpoint answers with.
    pub fn succeeded(&self) -> bool {
        matches!(
            self,
            CommandResponse::Applied(true) | CommandResponse::Empty
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_encoding_is_stable() {
        let cmd = Command::KvSet {
            key: "a/b".into(),
            value: b"hi".to_vec(),
            flags: 7,
            cas: None,
        };
        let json = serde_json::to_string(&cmd).expect("encode");
        assert_eq!(
            json,
            r#"{"KvSet":{"key":"a/b","value":"aGk=","flags":7,"cas":null}}"#
        );
        let back: Command = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, cmd);
    }
}

/// An ACL write's answer: applied (or found, for a delete), or refused
/// with Consul's message.
fn acl_outcome(result: Result<bool, acl::AclError>) -> CommandResponse {
    match result {
        Ok(done) => CommandResponse::Applied(done),
        Err(e) => CommandResponse::Refused(e.to_string()),
    }
}

/// Applies one command to the state at log index `index`: the only place
/// the log's contract meets the state (Consul's FSM dispatch). Deterministic:
/// the same commands at the same indexes give the same state on every
/// server; a rule violation is a typed response, never a panic.
pub fn apply(state: &mut State, index: u64, command: &Command) -> CommandResponse {
    state.last_index = index;
    match command {
        Command::KvSet {
            key,
            value,
            flags,
            cas,
        } => CommandResponse::Applied(state.kv.set(index, key, value, *flags, *cas)),
        Command::KvDelete { key, cas } => {
            CommandResponse::Applied(state.kv.delete(index, key, *cas))
        }
        Command::KvDeleteTree { prefix } => {
            state.kv.delete_tree(index, prefix);
            CommandResponse::Applied(true)
        }
        Command::CatalogRegister(registration) => {
            let result = state.catalog.register(index, registration);
            if result.is_ok() {
                state.sessions_follow_catalog(index, &registration.node);
            }
            catalog_response(result.map(|()| true))
        }
        Command::CatalogDeregister {
            node,
            service_id,
            check_id,
        } => {
            let result =
                state
                    .catalog
                    .deregister(index, node, service_id.as_deref(), check_id.as_deref());
            if result.is_ok() {
                state.sessions_follow_catalog(index, node);
            }
            catalog_response(result.map(|()| true))
        }
        Command::CheckUpdate {
            node,
            check_id,
            status,
            output,
        } => {
            let result = state
                .catalog
                .update_check(index, node, check_id, *status, output);
            if result.as_ref().is_ok_and(|changed| *changed) {
                state.sessions_follow_catalog(index, node);
            }
            catalog_response(result.map(|_| true))
        }
        Command::KvLock {
            key,
            value,
            flags,
            session,
            cas,
        }
        | Command::KvUnlock {
            key,
            value,
            flags,
            session,
            cas,
        } => {
            if state.sessions.get(session).is_none() {
                return CommandResponse::Refused(invalid_session(session));
            }
            let kv = &mut state.kv;
            CommandResponse::Applied(if matches!(command, Command::KvLock { .. }) {
                kv.acquire(index, key, value, *flags, session, *cas)
            } else {
                kv.release(index, key, value, *flags, session, *cas)
            })
        }
        Command::SessionCreate(spec) => match state.create_session(index, spec) {
            Ok(()) => CommandResponse::Applied(true),
            Err(e) => CommandResponse::Refused(e.to_string()),
        },
        Command::SessionDestroy { id } => {
            CommandResponse::Applied(state.destroy_session(index, id))
        }
        Command::Txn(ops) => CommandResponse::Txn(crate::state::txn::run(state, index, ops)),
        Command::AclBootstrap(token) => {
            acl_outcome(state.acl.bootstrap(index, token).map(|()| true))
        }
        Command::AclTokenSet(token) => {
            acl_outcome(state.acl.set_token(index, token).map(|()| true))
        }
        Command::AclTokenDelete { accessor_id } => {
            acl_outcome(state.acl.delete_token(index, accessor_id))
        }
        Command::AclPolicySet(policy) => {
            acl_outcome(state.acl.set_policy(index, policy).map(|()| true))
        }
        Command::AclPolicyDelete { id } => acl_outcome(state.acl.delete_policy(index, id)),
        Command::AclRoleSet(role) => acl_outcome(state.acl.set_role(index, role).map(|()| true)),
        Command::AclRoleDelete { id } => CommandResponse::Applied(state.acl.delete_role(index, id)),
        Command::CaRotate {
            expect_active,
            root,
            config,
            now_unix,
        } => CommandResponse::Applied(state.ca.rotate(
            index,
            expect_active.as_deref(),
            root,
            config.as_ref(),
            *now_unix,
        )),
        Command::CaSetConfig(config) => {
            state.ca.set_config(index, config);
            CommandResponse::Applied(true)
        }
        Command::CaPrune { ids } => CommandResponse::Applied(state.ca.prune(index, ids)),
        Command::Batch(commands) => {
            CommandResponse::Batch(commands.iter().map(|c| apply(state, index, c)).collect())
        }
        Command::Restore(backup) => {
            state.restore(index, backup);
            CommandResponse::Applied(true)
        }
        Command::RestorePart { id, part, data } => {
            let part_data = StagedPart(std::sync::Arc::from(data.as_slice()));
            match (&mut state.restoring, *part) {
                (slot, 0) => {
                    *slot = Some(StagedRestore {
                        id: id.clone(),
                        parts: imbl::Vector::unit(part_data),
                    });
                    CommandResponse::Applied(true)
                }
                (Some(staged), n) if staged.id == *id && staged.parts.len() == n as usize => {
                    staged.parts.push_back(part_data);
                    CommandResponse::Applied(true)
                }
                _ => CommandResponse::Applied(false),
            }
        }
        Command::RestoreCommit { id, parts, crc } => {
            let staged = match &state.restoring {
                Some(staged) if staged.id == *id => staged,
                _ => return CommandResponse::Applied(false),
            };
            let complete = staged.parts.len() == *parts as usize;
            let mut bytes = Vec::with_capacity(staged.parts.iter().map(|p| p.0.len()).sum());
            for part in &staged.parts {
                bytes.extend_from_slice(&part.0);
            }
            state.restoring = None;
            if !complete || crc32fast::hash(&bytes) != *crc {
                return CommandResponse::Applied(false);
            }
            match serde_json::from_slice::<State>(&bytes) {
                Ok(backup) => {
                    state.restore(index, &backup);
                    CommandResponse::Applied(true)
                }
                Err(_) => CommandResponse::Applied(false),
            }
        }
        Command::ConfigSet {
            kind,
            name,
            body,
            cas,
        } => CommandResponse::Applied(state.config.set(index, kind, name, body, *cas)),
        Command::ConfigDelete { kind, name, cas } => {
            CommandResponse::Applied(state.config.delete(index, kind, name, *cas))
        }
        Command::Reap { up_to } => {
            let reaped = state.kv.reap(*up_to) + state.catalog.reap(*up_to);
            CommandResponse::Applied(reaped > 0)
        }
        Command::SetClusterId { id } => {
            if state.cluster_id.is_some() {
                CommandResponse::Applied(false)
            } else {
                state.cluster_id = Some(id.clone());
                CommandResponse::Applied(true)
            }
        }
    }
}

fn catalog_response(result: Result<bool, CatalogError>) -> CommandResponse {
    match result {
        Ok(applied) => CommandResponse::Applied(applied),
        Err(e) => CommandResponse::CatalogRejected(e),
    }
}

#[cfg(test)]
mod apply_tests {
    use super::*;

    #[test]
    fn a_batch_applies_in_order_at_one_index() {
        let mut state = State::default();
        let set = |key: &str, cas: Option<u64>| Command::KvSet {
            key: key.into(),
            value: b"v".to_vec(),
            flags: 0,
            cas,
        };
        let batch = Command::Batch(vec![set("a", None), set("a", Some(0)), set("b", Some(0))]);
        let response = apply(&mut state, 7, &batch);
        assert_eq!(
            response,
            CommandResponse::Batch(vec![
                CommandResponse::Applied(true),
                CommandResponse::Applied(false),
                CommandResponse::Applied(true)
            ])
        );
        assert_eq!(state.kv.get("b").map(|e| e.modify_index), Some(7));
    }

    #[test]
    fn a_restore_replaces_data_as_one_write_and_keeps_the_cluster_id() {
        let set = |key: &str| Command::KvSet {
            key: key.into(),
            value: key.as_bytes().to_vec(),
            flags: 1,
            cas: None,
        };
        let mut backup = State::default();
        apply(&mut backup, 3, &set_cluster_id("old"));
        apply(&mut backup, 40, &set("kept"));
        apply(&mut backup, 41, &set("only-in-backup"));
        let mut state = State::default();
        apply(&mut state, 2, &set_cluster_id("new"));
        apply(&mut state, 5, &set("kept"));
        apply(&mut state, 6, &set("only-here"));
        let before = state.kv.prefix_index("only-here");
        assert_eq!(
            apply(&mut state, 9, &Command::Restore(Box::new(backup))),
            CommandResponse::Applied(true)
        );
        assert_eq!(state.cluster_id.as_deref(), Some("new"));
        assert!(state.kv.get("only-here").is_none());
        let kept = state.kv.get("kept").expect("restored");
        assert_eq!(
            (kept.create_index, kept.modify_index, kept.flags),
            (9, 9, 1)
        );
        assert!(state.kv.get("only-in-backup").is_some());
        // The deleted key's prefix moved forward, never back.
        assert!(state.kv.prefix_index("only-here") > before);
        assert_eq!(state.kv.last_change(), 9);
    }

    #[test]
    fn a_restore_in_pieces_applies_only_when_whole_and_intact() {
        let mut backup = State::default();
        apply(
            &mut backup,
            4,
            &Command::KvSet {
                key: "from/backup".into(),
                value: vec![7; 3000],
                flags: 0,
                cas: None,
            },
        );
        let data = serde_json::to_vec(&backup).expect("encode");
        let pieces: Vec<&[u8]> = data.chunks(1000).collect();
        let part = |id: &str, n: usize| Command::RestorePart {
            id: id.into(),
            part: n as u32,
            data: pieces[n].to_vec(),
        };
        let commit = |id: &str, crc: u32| Command::RestoreCommit {
            id: id.into(),
            parts: pieces.len() as u32,
            crc,
        };
        let crc = crc32fast::hash(&data);
        let mut state = State::default();
        let mut index = 10;
        let mut step = |state: &mut State, c: &Command| {
            index += 1;
            apply(state, index, c)
        };
        // Out of order: refused.
        assert_eq!(
            step(&mut state, &part("a", 1)),
            CommandResponse::Applied(false)
        );
        // A second restore replaces the first; the first's pieces are refused.
        assert_eq!(
            step(&mut state, &part("a", 0)),
            CommandResponse::Applied(true)
        );
        assert_eq!(
            step(&mut state, &part("b", 0)),
            CommandResponse::Applied(true)
        );
        assert_eq!(
            step(&mut state, &part("a", 1)),
            CommandResponse::Applied(false)
        );
        for n in 1..pieces.len() {
            assert_eq!(
                step(&mut state, &part("b", n)),
                CommandResponse::Applied(true)
            );
        }
        // A bad checksum: nothing restored, the staging is gone.
        assert_eq!(
            step(&mut state, &commit("b", crc ^ 1)),
            CommandResponse::Applied(false)
        );
        assert!(state.restoring.is_none() && state.kv.is_empty());
        // Whole and intact: restored at the commit's index.
        for n in 0..pieces.len() {
            assert_eq!(
                step(&mut state, &part("c", n)),
                CommandResponse::Applied(true)
            );
        }
        assert_eq!(
            step(&mut state, &commit("c", crc)),
            CommandResponse::Applied(true)
        );
        let entry = state.kv.get("from/backup").expect("restored");
        assert_eq!(entry.modify_index, state.last_index);
        assert!(state.restoring.is_none());
        assert_eq!(
            step(&mut state, &commit("c", crc)),
            CommandResponse::Applied(false)
        );
    }

    fn set_cluster_id(id: &str) -> Command {
        Command::SetClusterId { id: id.into() }
    }

    #[test]
    fn cluster_id_is_set_once() {
        let mut state = State::default();
        let first = Command::SetClusterId { id: "a".into() };
        let second = Command::SetClusterId { id: "b".into() };
        assert_eq!(apply(&mut state, 3, &first), CommandResponse::Applied(true));
        assert_eq!(
            apply(&mut state, 4, &second),
            CommandResponse::Applied(false)
        );
        assert_eq!(state.cluster_id.as_deref(), Some("a"));
        assert_eq!(state.last_index, 4);
    }
}

#[cfg(test)]
mod session_tests {
    use super::*;
    use crate::state::catalog::{CheckSpec, Registration};
    use crate::state::session::{Behavior, SessionSpec};

    fn node_with_check(node: &str, check: &str, status: HealthStatus) -> Command {
        Command::CatalogRegister(Box::new(Registration {
            node: node.into(),
            address: "10.0.0.1".into(),
            checks: vec![CheckSpec {
                check_id: check.into(),
                name: check.into(),
                status,
                ..CheckSpec::default()
            }],
            ..Registration::default()
        }))
    }

    fn create(id: &str, node: &str, checks: &[&str], behavior: Behavior) -> Command {
        Command::SessionCreate(Box::new(SessionSpec {
            id: id.into(),
            node: node.into(),
            node_checks: checks.iter().map(|c| (*c).to_owned()).collect(),
            lock_delay_ns: 15_000_000_000,
            behavior,
            ..SessionSpec::default()
        }))
    }

    fn lock(key: &str, session: &str, value: &str) -> Command {
        Command::KvLock {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            flags: 0,
            session: session.into(),
            cas: None,
        }
    }

    fn unlock(key: &str, session: &str) -> Command {
        Command::KvUnlock {
            key: key.into(),
            value: b"released".to_vec(),
            flags: 3,
            session: session.into(),
            cas: None,
        }
    }

    /// Applies commands at consecutive indexes from 10.
    fn run(state: &mut State, commands: &[Command]) -> Vec<CommandResponse> {
        commands
            .iter()
            .map(|c| {
                let index = state.last_index.max(9) + 1;
                apply(state, index, c)
            })
            .collect()
    }

    const YES: CommandResponse = CommandResponse::Applied(true);
    const NO: CommandResponse = CommandResponse::Applied(false);

    #[test]
    fn a_session_needs_its_node_and_healthy_checks() {
        let mut state = State::default();
        let answers = run(
            &mut state,
            &[
                create("s0", "n1", &[], Behavior::Release),
                node_with_check("n1", "alive", HealthStatus::Passing),
                create("s1", "n1", &["missing"], Behavior::Release),
                node_with_check("n2", "down", HealthStatus::Critical),
                create("s2", "n2", &["down"], Behavior::Release),
                create("s3", "n1", &["alive"], Behavior::Release),
                create("s3", "n1", &[], Behavior::Release),
            ],
        );
        assert_eq!(
            answers,
            [
                CommandResponse::Refused("Missing node registration".into()),
                YES,
                CommandResponse::Refused("Missing check 'missing' registration".into()),
                YES,
                CommandResponse::Refused("Check 'down' is in critical state".into()),
                YES,
                CommandResponse::Refused("Session ID \"s3\" is already in use".into()),
            ]
        );
        assert_eq!(state.sessions.len(), 1);
    }

    #[test]
    fn locks_are_held_by_one_session_and_count_acquisitions() {
        let mut state = State::default();
        let answers = run(
            &mut state,
            &[
                node_with_check("n1", "alive", HealthStatus::Passing),
                create("a", "n1", &[], Behavior::Release),
                create("b", "n1", &[], Behavior::Release),
                lock("k", "a", "one"),
                lock("k", "b", "two"),
                lock("k", "a", "again"),
                lock("k", "gone", "x"),
                unlock("k", "b"),
                unlock("k", "a"),
                lock("k", "b", "two"),
            ],
        );
        assert_eq!(
            answers[3..],
            [
                YES,
                NO,
                YES,
                CommandResponse::Refused(invalid_session("gone")),
                NO,
                YES,
                YES,
            ]
        );
        let entry = state.kv.get("k").expect("key");
        // Two acquisitions (the holder's second acquire is not one).
        assert_eq!(entry.lock_index, 2);
        assert_eq!(entry.session.as_deref(), Some("b"));
        // A plain write keeps the lock, as Consul.
        run(
            &mut state,
            &[Command::KvSet {
                key: "k".into(),
                value: b"plain".to_vec(),
                flags: 0,
                cas: None,
            }],
        );
        assert_eq!(
            state.kv.get("k").and_then(|e| e.session.as_deref()),
            Some("b")
        );
        assert_eq!(state.kv.held_by("b").count(), 1);
        // Deleting a locked key drops the lock with it.
        run(
            &mut state,
            &[Command::KvDelete {
                key: "k".into(),
                cas: None,
            }],
        );
        assert_eq!(state.kv.held_by("b").count(), 0);
    }

    #[test]
    fn invalidation_releases_or_deletes_and_starts_the_lock_delay() {
        let mut state = State::default();
        run(
            &mut state,
            &[
                node_with_check("n1", "alive", HealthStatus::Passing),
                create("rel", "n1", &["alive"], Behavior::Release),
                create("del", "n1", &[], Behavior::Delete),
                lock("r/1", "rel", "v"),
                lock("r/2", "rel", "v"),
                lock("d/1", "del", "v"),
            ],
        );
        state.lock_delays_begun.0.clear();
        // The check the release session names turns critical.
        let answers = run(
            &mut state,
            &[Command::CheckUpdate {
                node: "n1".into(),
                check_id: "alive".into(),
                status: HealthStatus::Critical,
                output: String::new(),
            }],
        );
        assert_eq!(answers, [YES]);
        assert!(state.sessions.get("rel").is_none());
        let r1 = state.kv.get("r/1").expect("kept");
        assert_eq!((r1.session.as_deref(), &*r1.value), (None, &b"v"[..]));
        assert_eq!(r1.modify_index, state.last_index);
        assert_eq!(
            state.lock_delays_begun.0,
            [
                ("r/1".to_owned(), 15_000_000_000),
                ("r/2".to_owned(), 15_000_000_000)
            ]
        );
        // The node goes: its other session ends, deleting its key.
        run(
            &mut state,
            &[Command::CatalogDeregister {
                node: "n1".into(),
                service_id: None,
                check_id: None,
            }],
        );
        assert!(state.sessions.is_empty());
        assert!(state.kv.get("d/1").is_none());
        assert_eq!(state.kv.key_index("d/1"), state.last_index);
        // Destroying what is gone changes nothing.
        assert_eq!(
            run(&mut state, &[Command::SessionDestroy { id: "del".into() }]),
            [NO]
        );
    }

    #[test]
    fn sessions_and_locks_survive_a_snapshot_round_trip() {
        let mut state = State::default();
        run(
            &mut state,
            &[
                node_with_check("n1", "alive", HealthStatus::Passing),
                create("a", "n1", &["alive"], Behavior::Release),
                lock("k", "a", "v"),
            ],
        );
        let bytes = serde_json::to_vec(&state).expect("encode");
        let mut back: State = serde_json::from_slice(&bytes).expect("decode");
        assert_eq!(back, state);
        // The lock index survives: destroying the session still releases.
        run(&mut back, &[Command::SessionDestroy { id: "a".into() }]);
        assert_eq!(back.kv.get("k").and_then(|e| e.session.clone()), None);
    }

    #[test]
    fn a_restore_trusts_no_lock_the_backup_claims() {
        // A backup whose key names a session it does not have, and whose
        // other session's node is gone from its catalog.
        let mut backup = State::default();
        run(
            &mut backup,
            &[
                node_with_check("n1", "alive", HealthStatus::Passing),
                create("a", "n1", &[], Behavior::Release),
                create("gone", "n1", &[], Behavior::Release),
                lock("k", "a", "v"),
                lock("ghost", "gone", "v"),
            ],
        );
        backup.sessions.remove(99, "gone");
        let mut state = State::default();
        run(&mut state, &[Command::Restore(Box::new(backup))]);
        let ghost = state.kv.get("ghost").expect("kept");
        assert_eq!(
            ghost.session, None,
            "a lock of a missing session is released"
        );
        assert_eq!(
            state.kv.get("k").and_then(|e| e.session.as_deref()),
            Some("a")
        );
        assert_eq!(state.kv.held_by("a").count(), 1);
        // The rebuilt lock index governs: destroying `a` releases `k`.
        run(&mut state, &[Command::SessionDestroy { id: "a".into() }]);
        assert_eq!(state.kv.get("k").and_then(|e| e.session.clone()), None);
        // And anyone may take the ghost key now.
        run(
            &mut state,
            &[
                node_with_check("n1", "alive", HealthStatus::Passing),
                create("b", "n1", &[], Behavior::Release),
            ],
        );
        assert_eq!(run(&mut state, &[lock("ghost", "b", "w")]), [YES]);
    }

    #[test]
    fn the_holder_acquiring_again_unchanged_writes_nothing() {
        let mut state = State::default();
        run(
            &mut state,
            &[
                node_with_check("n1", "alive", HealthStatus::Passing),
                create("a", "n1", &[], Behavior::Release),
                lock("k", "a", "v"),
            ],
        );
        let before = state.kv.get("k").map(|e| e.modify_index);
        assert_eq!(run(&mut state, &[lock("k", "a", "v")]), [YES]);
        assert_eq!(state.kv.get("k").map(|e| e.modify_index), before);
        assert_eq!(run(&mut state, &[lock("k", "a", "changed")]), [YES]);
        assert!(state.kv.get("k").map(|e| e.modify_index) > before);
        assert_eq!(state.kv.get("k").map(|e| e.lock_index), Some(1));
    }
}
