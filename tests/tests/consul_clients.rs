//! Real Consul clients written by other people, unpatched, against a
//! three-server cluster: the PyPI `py-consul` package and the npm `consul`
//! package (installed by `scripts/install-test-deps.sh`) — the catalog,
//! KV and health, sessions, locks (held by separate processes) and
//! transactions, and ACLs (bootstrap, policies, tokens, refusals, filtered
//! lists).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meshwork_tests::{Cluster, HTTP_PORT};

async fn run_client(program: &str, script: &str, cluster: &Cluster) -> Result<()> {
    let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients");
    let addrs: Vec<String> = cluster
        .servers
        .iter()
        .map(|s| format!("{}:{HTTP_PORT}", s.ip))
        .collect();
    let run = tokio::process::Command::new(program)
        .arg(clients.join(script))
        .args(&addrs)
        .current_dir(&clients)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(150), run)
        .await
        .with_context(|| format!("{script} did not finish within 150 s"))?
        .with_context(|| format!("cannot run {program} (run scripts/install-test-deps.sh)"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("{script} failed ({}):\n{stdout}\n{stderr}", output.status);
    }
    assert!(stdout.contains("all checks passed"), "{stdout}\n{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_works_unchanged() -> Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    run_client("python3", "py_consul_check.py", &cluster).await?;
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_consul_works_unchanged() -> Result<()> {
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/node_modules/consul");
    assert!(
        modules.exists(),
        "{} is missing: run scripts/install-test-deps.sh",
        modules.display()
    );
    let cluster = Cluster::start(3, &[]).await?;
    run_client("node", "node_consul_check.js", &cluster).await?;
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_sessions_locks_and_transactions_work_unchanged() -> Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    run_client("python3", "py_consul_locks.py", &cluster).await?;
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_consul_sessions_locks_and_transactions_work_unchanged() -> Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    run_client("node", "node_consul_locks.js", &cluster).await?;
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_with_acls_gets_what_its_token_allows() -> Result<()> {
    let cluster = Cluster::start(3, &["--acl-enabled", "--acl-allow-plaintext-raft"]).await?;
    run_client("python3", "py_consul_acl.py", &cluster).await?;
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_consul_with_acls_gets_what_its_token_allows() -> Result<()> {
    let cluster = Cluster::start(3, &["--acl-enabled", "--acl-allow-plaintext-raft"]).await?;
    run_client("node", "node_consul_acl.js", &cluster).await?;
    cluster.done();
    Ok(())
}
