//! The check that the Raft metadata store (sled, in `raft/`) still holds
//! the vote the log and the snapshot prove was recorded, made before the
//! store is opened for real. Owns only that judgement: it writes nothing in
//! the store (it reads a copy) and knows of the records only the fields it
//! compares.
//!
//! Why: sled reads a record that fails its checksum as the end of its log
//! and opens on what came before it, silently: a flipped bit in `raft/db`
//! can take the vote away (measured: a bit flipped in the first segment's
//! header opens an empty store). A server that lost its vote may vote twice
//! in one term. And sled writes on open (it re-stamps its log and writes a
//! snapshot of its page table on close), so a refusal decided after the
//! real open would not leave the data dir as it was: the copy is opened
//! instead, then removed.
//!
//! What it cannot see: a store rolled back to an earlier vote that no log
//! entry or snapshot contradicts (a vote for a term that has no entry yet).

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Where the copy of the store is opened (inside the data dir: the store
/// is as private as the rest of it); removed after the check, and when a
/// crash left it, before the next.
pub const CHECK_DIR: &str = "raft.check";

/// The metadata tree and key of the vote (as `raft::log_store` writes it).
const META_TREE: &str = "raft_meta";
const VOTE: &str = "vote";

/// What the log and the snapshot prove about the vote.
#[derive(Debug, Default)]
pub struct Evidence {
    /// The last log record: (index, payload, a JSON `Entry`).
    pub last_record: Option<(u64, Vec<u8>)>,
    /// The snapshot's metadata (JSON `SnapshotMeta`), if there is one.
    pub snapshot_meta: Option<Vec<u8>>,
}

/// Why the store is refused: what is wrong, for the message.
#[derive(Debug)]
pub struct Refusal(pub String);

/// Opens a copy of the store in `raft_dir` (made in `data_dir`) and judges
/// its vote against `evidence`. `Ok(())` when the store holds a vote at
/// least as recent as any log entry or snapshot (or there is nothing for
/// it to answer for); an I/O error when the copy cannot be made.
pub fn check(
    data_dir: &Path,
    raft_dir: &Path,
    evidence: &Evidence,
    config: impl FnOnce(&Path) -> sled::Config,
) -> std::io::Result<Result<(), Refusal>> {
    let copy = data_dir.join(CHECK_DIR);
    remove(&copy)?;
    if !raft_dir.exists() {
        return Ok(judge(None, evidence));
    }
    let _remove = RemoveOnDrop(copy.clone());
    copy_dir(raft_dir, &copy)?;
    let db = match config(&copy).open() {
        Ok(db) => db,
        Err(e) => return Ok(Err(Refusal(format!("sled cannot open it: {e}")))),
    };
    let vote = db
        .open_tree(META_TREE)
        .and_then(|tree| tree.get(VOTE))
        .map(|v| v.map(|bytes| serde_json::from_slice::<Value>(&bytes)));
    drop(db);
    Ok(match vote {
        Err(e) => Err(Refusal(format!("sled cannot read it: {e}"))),
        Ok(Some(Err(e))) => Err(Refusal(format!("its vote is not JSON: {e}"))),
        Ok(Some(Ok(vote))) => judge(Some(&vote), evidence),
        Ok(None) => judge(None, evidence),
    })
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
    let why = "the store lost records (sled reads a damaged record as the end of its log)";
    match vote.map(|v| term(v, &[])) {
        None => Err(Refusal(format!("it holds no vote, but {proof}: {why}"))),
        Some(None) => Err(Refusal("its vote has no term".to_owned())),
        Some(Some(term)) if term < needed => Err(Refusal(format!(
            "its vote is for term {term}, but {proof}: {why}"
        ))),
        Some(Some(_)) => Ok(()),
    }
}

fn remove(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes the copy however the check ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot remove the metadata check's copy");
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
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
    fn the_check_reads_a_copy_and_leaves_no_trace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raft = dir.path().join("raft");
        let config = |p: &Path| sled::Config::new().path(p);
        {
            let db = config(&raft).open().expect("sled");
            let tree = db.open_tree(META_TREE).expect("tree");
            tree.insert(VOTE, vote(3).to_string().as_bytes())
                .expect("insert");
            db.flush().expect("flush");
        }
        let before: Vec<_> = std::fs::read_dir(&raft)
            .expect("ls")
            .map(|e| {
                let path = e.expect("entry").path();
                (path.clone(), std::fs::read(&path).unwrap_or_default())
            })
            .collect();
        let checked = check(dir.path(), &raft, &evidence(Some(4), None), config).expect("io");
        assert!(checked.expect_err("stale").0.contains("term 3"));
        let checked = check(dir.path(), &raft, &evidence(Some(3), None), config).expect("io");
        assert!(checked.is_ok());
        assert!(!dir.path().join(CHECK_DIR).exists(), "the copy was left");
        for (path, bytes) in before {
            assert_eq!(
                std::fs::read(&path).unwrap_or_default(),
                bytes,
                "{}",
                path.display()
            );
        }
    }
}
