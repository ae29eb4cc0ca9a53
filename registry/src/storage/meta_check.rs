//! The check that the Raft metadata ([`super::meta_file`]) still holds the
//! vote the log and the snapshot prove was recorded, made before the log
//! store opens. Owns only that judgement: it reads the payload it is given
//! and knows of the records only the fields it compares.
//!
//! Why: a server that lost its vote may vote twice in one term. The
//! metadata file refuses damage it can see (both slots invalid), but a
//! rolled-back file (a backup put in place, a damaged latest slot beside a
//! valid older one, a metadata file from an older copy of the data dir)
//! opens on an older vote; when the log or the snapshot holds an entry of
//! a later term, that older vote is proven stale and the start refused.
//!
//! What it cannot see: a file rolled back to an earlier vote that no log
//! entry or snapshot contradicts (a vote for a term that has no entry yet).

use serde_json::Value;

/// The key of the vote in the metadata payload (as `raft::log_store`
/// writes it: a JSON object).
const VOTE: &str = "vote";

/// What the log and the snapshot prove about the vote.
#[derive(Debug, Default)]
pub struct Evidence {
    /// The last log record: (index, payload, a JSON `Entry`).
    pub last_record: Option<(u64, Vec<u8>)>,
    /// The snapshot's metadata (JSON `SnapshotMeta`), if there is one.
    pub snapshot_meta: Option<Vec<u8>>,
}

/// Why the metadata is refused: what is wrong, for the message.
#[derive(Debug)]
pub struct Refusal(pub String);

/// Judges the vote in `stored` (the metadata payload, `None` when the
/// data dir has none yet) against `evidence`. `Ok(())` when it holds a
/// vote at least as recent as any log entry or snapshot (or there is
/// nothing for it to answer for).
pub fn check(stored: Option<&[u8]>, evidence: &Evidence) -> Result<(), Refusal> {
    let Some(bytes) = stored else {
        return judge(None, evidence);
    };
    let meta: Value = serde_json::from_slice(bytes)
        .map_err(|e| Refusal(format!("its content is not JSON: {e}")))?;
    match meta.get(VOTE) {
        None | Some(Value::Null) => judge(None, evidence),
        Some(vote) => judge(Some(vote), evidence),
    }
}

/// The term of a `leader_id` in `value` (under `path`).
fn term(value: &Value, path: &[&str]) -> Option<u64> {
    path.iter()
        .try_fold(value, |v, key| v.get(key))?
        .get("leader_id")?
        .get("term")?
        .as_u64()
}

/// A vote is saved before this server appends an entry or installs a
/// snapshot of its leader's term, so its term is at least theirs.
fn judge(vote: Option<&Value>, evidence: &Evidence) -> Result<(), Refusal> {
    let mut proofs = Vec::new();
    if let Some((index, payload)) = &evidence.last_record {
        let entry: Value = serde_json::from_slice(payload).map_err(|e| {
            Refusal(format!(
                "the raft log's last record {index} is not an entry: {e}"
            ))
        })?;
        let term = term(&entry, &["log_id"])
            .ok_or_else(|| Refusal(format!("the raft log's last record {index} has no term")))?;
        proofs.push((
            term,
            format!("the raft log holds entry {index} of term {term}"),
        ));
    }
    if let Some(meta) = &evidence.snapshot_meta {
        let meta: Value = serde_json::from_slice(meta)
            .map_err(|e| Refusal(format!("the snapshot's metadata is not JSON: {e}")))?;
        if let Some(term) = term(&meta, &["last_log_id"]) {
            proofs.push((term, format!("the snapshot holds entries of term {term}")));
        }
    }
    let Some((needed, proof)) = proofs.into_iter().max_by_key(|(t, _)| *t) else {
        return Ok(());
    };
    let why = "the metadata was rolled back or lost";
    match vote.map(|v| term(v, &[])) {
        None => Err(Refusal(format!("it holds no vote, but {proof}: {why}"))),
        Some(None) => Err(Refusal("its vote has no term".to_owned())),
        Some(Some(term)) if term < needed => Err(Refusal(format!(
            "its vote is for term {term}, but {proof}: {why}"
        ))),
        Some(Some(_)) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(entry_term: Option<u64>, snapshot_term: Option<u64>) -> Evidence {
        Evidence {
            last_record: entry_term.map(|t| {
                let entry = serde_json::json!({"log_id": {"leader_id": {"term": t, "node_id": 1}, "index": 9}});
                (9, entry.to_string().into_bytes())
            }),
            snapshot_meta: snapshot_term.map(|t| {
                serde_json::json!({"last_log_id": {"leader_id": {"term": t, "node_id": 1}, "index": 5}})
                    .to_string()
                    .into_bytes()
            }),
        }
    }

    fn vote(term: u64) -> Value {
        serde_json::json!({"leader_id": {"term": term, "node_id": 2}, "committed": true})
    }

    #[test]
    fn a_vote_older_than_the_log_or_the_snapshot_is_refused() {
        assert!(judge(None, &evidence(None, None)).is_ok(), "a new server");
        assert!(judge(Some(&vote(3)), &evidence(Some(3), Some(2))).is_ok());
        assert!(judge(Some(&vote(4)), &evidence(Some(3), None)).is_ok());
        let refused = |v: Option<Value>, e| judge(v.as_ref(), &e).expect_err("refused").0;
        assert!(refused(None, evidence(Some(1), None)).contains("holds no vote"));
        assert!(refused(None, evidence(None, Some(1))).contains("snapshot"));
        assert!(refused(Some(vote(2)), evidence(Some(3), None)).contains("term 2"));
        assert!(refused(Some(vote(2)), evidence(Some(1), Some(3))).contains("snapshot"));
    }

    #[test]
    fn the_check_reads_the_vote_from_the_metadata_payload() {
        let payload = |vote: Value| {
            serde_json::json!({"vote": vote, "committed": null, "last_purged": null})
                .to_string()
                .into_bytes()
        };
        assert!(check(None, &evidence(None, None)).is_ok(), "a new data dir");
        let missing = check(None, &evidence(Some(1), None)).expect_err("no metadata");
        assert!(missing.0.contains("holds no vote"), "{}", missing.0);
        let stale = check(Some(&payload(vote(3))), &evidence(Some(4), None));
        assert!(stale.expect_err("stale").0.contains("term 3"));
        assert!(check(Some(&payload(vote(3))), &evidence(Some(3), None)).is_ok());
        let null = check(Some(&payload(Value::Null)), &evidence(Some(1), None));
        assert!(null.expect_err("no vote").0.contains("holds no vote"));
        let garbage = check(Some(b"{not json"), &evidence(None, None));
        assert!(garbage.expect_err("garbage").0.contains("not JSON"));
    }
}
