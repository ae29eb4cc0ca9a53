//! A damaged snapshot file or Raft metadata file never destroys data
//! (issue 27): a server on a real data dir whose `snapshot/snapshot.bin` or
//! `raft-meta` was damaged (a flipped bit, a cut file, a zeroed 4 KiB
//! page) either starts with every acknowledged write and the same vote, or
//! exits non-zero naming the damaged file with every byte of its data dir
//! unchanged. A start that loses a write or the vote, or a panic, fails
//! the suite. (The Raft log's own damage cases are in
//! `storage/wal.rs`'s unit tests and `operations.rs`.)
//!
//! Each case is one start of the real binary on a fresh copy of a pristine
//! data dir, so the offsets are a deterministic sample spread over each
//! file (its first and last bytes always among them), not every byte: the
//! suite stays at a few dozen starts.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meshwork_registry::storage::meta_file::{self, MetaFile};
use meshwork_tests::damage::{self, Damage};
use meshwork_tests::{Cluster, wait_for};
use serde_json::Value;

/// Keys written before the snapshot (the snapshot holds them, the log
/// behind it is purged) and after it (only in the log).
const BEFORE_SNAPSHOT: usize = 30;
const AFTER_SNAPSHOT: usize = 10;

/// A stopped server's data dir with committed writes and a snapshot, and a
/// pristine copy of it that every case starts from.
struct Fixture {
    cluster: Cluster,
    /// The server whose data dir is damaged.
    victim: usize,
    pristine: PathBuf,
    /// Every acknowledged write: key → value.
    acked: Vec<(String, String)>,
    /// The Raft metadata the pristine data dir holds.
    meta: RaftMeta,
}

/// What the metadata file holds, as JSON (absent or null keys as `None`).
#[derive(Debug, Clone, PartialEq)]
struct RaftMeta {
    vote: Option<Value>,
    committed: Option<Value>,
    last_purged: Option<Value>,
}

/// Reads the Raft metadata file as the server would at its start (the
/// reader writes nothing): `Err` when the server must refuse it.
fn read_meta(meta_file: &Path) -> Result<RaftMeta> {
    let payload = MetaFile::read(meta_file)?.context("no metadata file")?;
    let meta: Value = serde_json::from_slice(&payload)?;
    let get = |key: &str| meta.get(key).filter(|v| !v.is_null()).cloned();
    Ok(RaftMeta {
        vote: get("vote"),
        committed: get("committed"),
        last_purged: get("last_purged"),
    })
}

impl Fixture {
    /// `servers` servers; writes, a snapshot on every server (its log
    /// purged behind it), more writes; every server stopped cleanly.
    async fn build(servers: u64) -> Result<Self> {
        let mut cluster = Cluster::start(servers, &["--snapshot-trailing-logs", "2"]).await?;
        let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
        let mut acked = Vec::new();
        for n in 0..BEFORE_SNAPSHOT + AFTER_SNAPSHOT {
            if n == BEFORE_SNAPSHOT {
                wait_replicated(&cluster, &acked).await?;
                for server in &cluster.servers {
                    let resp = cluster
                        .http
                        .put(format!("{}/v1/operator/raft/snapshot", server.http()))
                        .send()
                        .await?;
                    if resp.status().as_u16() != 200 {
                        bail!("snapshot on server {}: {}", server.id, resp.text().await?);
                    }
                }
            }
            let (key, value) = (format!("keep/{n:03}"), format!("value {n}"));
            cluster.must_put(leader, &key, &value).await?;
            acked.push((key, value));
        }
        wait_replicated(&cluster, &acked).await?;
        let victim = cluster.followers(leader).first().copied().unwrap_or(leader);
        for server in &mut cluster.servers {
            server.stop().await?;
        }
        let data_dir = cluster.servers[victim].data_dir.clone();
        for needed in ["snapshot/snapshot.bin", meta_file::FILE] {
            if !data_dir.join(needed).exists() {
                bail!("the data dir has no {needed}");
            }
        }
        let meta = read_meta(&data_dir.join(meta_file::FILE))?;
        if meta.vote.is_none() || meta.last_purged.is_none() {
            bail!("the pristine data dir lacks a vote or a purge point: {meta:?}");
        }
        let pristine = cluster.dir.path().join("pristine");
        damage::copy_dir(&data_dir, &pristine)?;
        Ok(Self {
            cluster,
            victim,
            pristine,
            acked,
            meta,
        })
    }

    /// Damages `file` (relative to the data dir) of a fresh copy of the
    /// pristine data dir, starts the server on it, and judges the outcome.
    /// The other servers (if any) stay stopped: the victim decides alone
    /// whether its own data is sound.
    async fn case(&mut self, file: &str, damage: Damage) -> Result<Outcome> {
        self.case_of(file, &[damage]).await
    }

    /// [`Fixture::case`] with several damages to the same file.
    async fn case_of(&mut self, file: &str, damages: &[Damage]) -> Result<Outcome> {
        let server = &mut self.cluster.servers[self.victim];
        let data_dir = server.data_dir.clone();
        damage::reset_dir(&self.pristine, &data_dir)?;
        let path = data_dir.join(file);
        for damage in damages {
            damage.apply(&path)?;
        }
        let before = damage::files(&data_dir)?;
        // What the server's metadata will answer.
        let meta = read_meta(&data_dir.join(meta_file::FILE));
        let log_from = std::fs::metadata(&server.log_path).map_or(0, |m| m.len() as usize);
        server.start(&[])?;
        let started = self.exit_or_serve(Duration::from_secs(20)).await;
        let server = &mut self.cluster.servers[self.victim];
        let log = std::fs::read_to_string(&server.log_path)
            .unwrap_or_default()
            .get(log_from..)
            .unwrap_or_default()
            .to_owned();
        let what = format!("{file} with {damages:?}");
        match started.with_context(|| format!("{what}:\n{log}"))? {
            Err(status) => {
                if status.code() == Some(101) || log.contains("panicked") {
                    bail!("{what}: the server panicked:\n{log}");
                }
                if status.success() {
                    bail!("{what}: the server exited 0:\n{log}");
                }
                let named = path.display().to_string();
                if !log.contains(&named) {
                    bail!("{what}: the refusal does not name {named}:\n{log}");
                }
                let changed = damage::changed(&before, &damage::files(&data_dir)?);
                if !changed.is_empty() {
                    bail!("{what}: refusing to start changed the data dir: {changed:?}\n{log}");
                }
                Ok(Outcome::Refused)
            }
            Ok(()) => {
                let meta = meta.with_context(|| {
                    format!("{what}: the server started, though its metadata file is unreadable")
                })?;
                // Every acknowledged write, once the server has caught up
                // on its log (a bounded wait: it may still be applying).
                let mut missing = Vec::new();
                for _ in 0..100 {
                    missing.clear();
                    for (key, value) in &self.acked {
                        let got = self.cluster.get_raw(self.victim, key, "&stale").await?;
                        if got.as_deref() != Some(value.as_str()) {
                            missing.push(format!("{key}={got:?}"));
                        }
                    }
                    if missing.is_empty() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let server = &mut self.cluster.servers[self.victim];
                server.stop().await?;
                if !missing.is_empty() {
                    bail!("{what}: started but lost acknowledged writes: {missing:?}\n{log}");
                }
                // The vote (term and candidate) must be the one recorded.
                // The committed index may lag, as after a crash (it is
                // written unsynced: a hint for openraft), and so may the
                // purge point (the log still holds what lies past the older
                // one): the writes above show whether anything was lost.
                let leader_id = |m: &RaftMeta| m.vote.as_ref().map(|v| v["leader_id"].clone());
                if leader_id(&meta) != leader_id(&self.meta) {
                    bail!(
                        "{what}: started on changed Raft metadata {meta:?}, recorded {:?}\n{log}",
                        self.meta
                    );
                }
                Ok(Outcome::Started)
            }
        }
    }
}

impl Fixture {
    /// Waits until the victim exits (`Err` with its status) or serves
    /// reads (`Ok`), at most `within` long.
    async fn exit_or_serve(&mut self, within: Duration) -> Result<Result<(), ExitStatus>> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let server = &mut self.cluster.servers[self.victim];
            if let Some(status) = server.try_exit_status() {
                return Ok(Err(status));
            }
            // A single server leads; one of several answers stale reads
            // once it has loaded its data.
            let url = format!("{}/v1/kv/keep/000?stale", server.http());
            if let Ok(resp) = self.cluster.http.get(url).send().await
                && resp.status().is_success()
            {
                return Ok(Ok(()));
            }
            if std::time::Instant::now() >= deadline {
                bail!("the server neither exited nor served within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits until every running server holds every acknowledged write.
async fn wait_replicated(cluster: &Cluster, acked: &[(String, String)]) -> Result<()> {
    let Some((key, value)) = acked.last() else {
        return Ok(());
    };
    for i in 0..cluster.servers.len() {
        wait_for(
            "every server to hold the last write",
            Duration::from_secs(10),
            || async {
                let got = cluster.get_raw(i, key, "&stale").await.ok()?;
                (got.as_deref() == Some(value.as_str())).then_some(())
            },
        )
        .await?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Started,
    Refused,
}

/// Every kind of damage to `file` of the pristine data dir: bit flips at
/// `flips` offsets spread over it, cuts at a few lengths, a zeroed page at
/// its start, middle and end.
fn damages(fixture: &Fixture, file: &str, flips: u64) -> Result<Vec<Damage>> {
    let len = std::fs::metadata(fixture.pristine.join(file))?.len();
    let mut out: Vec<Damage> = damage::spread(len, flips)
        .into_iter()
        .map(Damage::Flip)
        .collect();
    for cut in [
        0,
        1,
        8,
        20,
        len / 3,
        len / 2,
        len.saturating_sub(4),
        len - 1,
    ] {
        out.push(Damage::Truncate(cut));
    }
    for page in [0, len / 2, len - 1] {
        out.push(Damage::ZeroPage(page));
    }
    out.dedup();
    Ok(out)
}

/// Runs every case on `file`; returns how many started and how many were
/// refused.
async fn run_cases(fixture: &mut Fixture, file: &str, flips: u64) -> Result<(usize, usize)> {
    let (mut started, mut refused) = (0, 0);
    for damage in damages(fixture, file, flips)? {
        match fixture.case(file, damage).await? {
            Outcome::Started => started += 1,
            Outcome::Refused => refused += 1,
        }
    }
    eprintln!("{file}: {started} damaged copies started intact, {refused} refused unchanged");
    Ok((started, refused))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_file_is_refused_with_the_data_dir_unchanged() -> Result<()> {
    let mut fixture = Fixture::build(1).await?;
    let (started, _) = run_cases(&mut fixture, "snapshot/snapshot.bin", 24).await?;
    // A checksummed frame: no damage goes unnoticed.
    assert_eq!(started, 0, "a damaged snapshot was loaded");
    fixture.cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_raft_metadata_file_starts_intact_or_is_refused_unchanged() -> Result<()> {
    let mut fixture = Fixture::build(1).await?;
    let file = meta_file::FILE;
    let (started, refused) = run_cases(&mut fixture, file, 24).await?;
    // A cut to a few bytes leaves no slot; a bit flipped in padding
    // changes nothing.
    assert!(
        started > 0 && refused > 0,
        "{started} started, {refused} refused"
    );
    // One slot damaged: the other one is read (the pristine file's last
    // two writes hold the same vote); both damaged: refused.
    let in_slot = |slot: u64| Damage::Flip(slot * meta_file::SLOT as u64 + 9);
    for slot in [0, 1] {
        let outcome = fixture.case(file, in_slot(slot)).await?;
        assert_eq!(outcome, Outcome::Started, "slot {slot} damaged");
    }
    let outcome = fixture.case_of(file, &[in_slot(0), in_slot(1)]).await?;
    assert_eq!(outcome, Outcome::Refused, "both slots damaged");
    fixture.cluster.done();
    Ok(())
}
