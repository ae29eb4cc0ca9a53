//! Patroni — the PostgreSQL HA manager, Debian's `patroni` with
//! PostgreSQL 15, unpatched — uses a three-server Meshwork cluster as its
//! Consul DCS: two members elect a primary and a streaming replica, a
//! stopped primary hands over, and a primary whose Patroni is killed with
//! SIGKILL is replaced once its session's TTL passes. The harness
//! (`tests/clients/patroni_check.py`, notes in `tests/clients/PATRONI.md`)
//! runs the same steps against etcd for comparison (`bench/patroni.sh`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use meshwork_tests::{Cluster, HTTP_PORT, host};
use serde_json::Value;

/// Patroni's `ttl`: it asks Consul for a session TTL of half, 10 s, which
/// Consul (and Meshwork) keep for twice that after the last renewal.
const TTL: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_elects_fails_over_and_survives_a_killed_primary() -> Result<()> {
    if host::missing(true, &["patroni", "setpriv"]).is_some() {
        return Ok(());
    }
    ensure!(
        Path::new("/usr/lib/postgresql/15/bin/postgres").exists(),
        "PostgreSQL 15 is missing: run scripts/install-test-deps.sh"
    );
    let cluster = Cluster::start(3, &[]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    // Through a follower: every write Patroni makes is forwarded.
    let follower = cluster.followers(leader)[0];
    let workdir = tempfile::Builder::new()
        .prefix("meshwork-patroni-")
        .tempdir_in("/tmp")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/patroni_check.py");
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .args(["--dcs", "consul", "--dcs-addr"])
        .arg(format!("{}:{HTTP_PORT}", cluster.servers[follower].ip))
        .arg("--workdir")
        .arg(workdir.path())
        .args(["--ttl", &TTL.to_string()])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .context("the Patroni harness did not finish within 240 s")?
        .context("cannot run python3")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!(
            "the Patroni harness failed ({}):\n{stdout}\n{stderr}",
            output.status
        );
    }
    let summary: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("no JSON summary from the harness:\n{stdout}\n{stderr}"))?;
    eprintln!("patroni on meshwork: {summary}");
    ensure!(summary["result"] == "pass", "{summary}");
    let seconds = |key: &str| {
        summary[key]
            .as_f64()
            .with_context(|| format!("{key} in {summary}"))
    };
    // A clean stop hands over at once (Patroni deletes its leader key).
    let stopped = seconds("failover1_sigterm_s")?;
    ensure!(stopped < 10.0, "failover after SIGTERM took {stopped} s");
    // A killed Patroni leaves its leader key until its session expires:
    // 2 x 10 s after the last renewal (Patroni renews every loop), so
    // about 20 s. Not before the session TTL, and not much after.
    let killed = seconds("failover2_kill9_s")?;
    ensure!(
        (TTL as f64 / 2.0..=TTL as f64 + 10.0).contains(&killed),
        "failover after kill -9 took {killed} s (session TTL {} s)",
        TTL / 2
    );
    cluster.done();
    Ok(())
}
