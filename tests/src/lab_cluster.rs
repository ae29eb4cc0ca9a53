//! Real `meshwork-registry` servers in a [`Lab`]'s namespaces, for the
//! fault suite (`tests/tests/faults.rs`): start, kill -9, SIGSTOP/SIGCONT,
//! restart on the same data, find the leader, read the Raft configuration,
//! dump a KV prefix, and a timeline of what was done. It does not inject
//! network faults (that is [`Lab`]) nor judge histories (that is
//! [`crate::fault_report`]).
//!
//! Each server listens on the default ports on its own address. Data dirs
//! live in a temp dir removed at the end; logs stay in the run's directory
//! under `target/faults/`, next to its report.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::Child;

use crate::netns::Lab;
use crate::registry_bin;
use crate::workload::Target;

pub const HTTP_PORT: u16 = 8500;
pub const GRPC_PORT: u16 = 8502;
pub const RAFT_PORT: u16 = 8300;
pub const DNS_PORT: u16 = 8600;
/// Election timeout the servers run with (minimum; the maximum is twice):
/// the registry's default, with its default heartbeat of 100 ms, so that
/// the failover the suite measures is the one users get.
pub const ELECTION_TIMEOUT_MS: u64 = 300;

/// The workspace's target dir.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
            manifest.parent().unwrap_or(manifest).join("target")
        })
}

/// The lock that runs this target's tests one at a time.
pub fn lock_suite() -> Result<std::fs::File> {
    let dir = target_dir().join("faults");
    std::fs::create_dir_all(&dir)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .context("lock target/faults/.lock")?;
    Ok(lock)
}

/// One registry server in its namespace.
#[derive(Debug)]
pub struct Node {
    pub id: u64,
    pub host: String,
    pub ip: Ipv4Addr,
    pub log_path: PathBuf,
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub paused: bool,
    pub data_dir: PathBuf,
    /// Where the server keeps the image a power loss would leave of its
    /// data dir, when the cluster simulates power losses.
    pub image_dir: Option<PathBuf>,
}

impl Node {
    pub fn http(&self) -> String {
        format!("http://{}:{HTTP_PORT}", self.ip)
    }
    pub fn grpc(&self) -> String {
        format!("http://{}:{GRPC_PORT}", self.ip)
    }
    pub fn raft_addr(&self) -> String {
        format!("{}:{RAFT_PORT}", self.ip)
    }
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }
    pub fn target(&self) -> Target {
        Target {
            name: self.host.clone(),
            http: self.http(),
        }
    }
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// What happened, when (ms since the run's start).
#[derive(Debug, Default)]
pub struct Timeline {
    pub lines: Vec<(u64, String)>,
}

/// The servers of one run and its record.
pub struct Cluster<'a> {
    /// Dropped first: each child is killed on drop.
    pub nodes: Vec<Node>,
    pub lab: &'a Lab,
    pub http: reqwest::Client,
    t0: Instant,
    pub timeline: Timeline,
    pub run_dir: PathBuf,
    /// Data dirs (removed at the end; logs stay in `run_dir`).
    pub _data: tempfile::TempDir,
    pub done: bool,
    /// The flags that turn on TLS between servers and ACLs (empty when
    /// `MESHWORK_FAULTS_PLAIN=1`), given to every server, joiners too.
    secure_args: Vec<String>,
    /// The management token's secret the cluster is bootstrapped with;
    /// also every server's `acl.tokens.default`, so the workload's
    /// requests (which carry no token) resolve to it through the ACL
    /// machinery on every request.
    pub management: Option<String>,
}

/// Whether the suite runs its servers as installed clusters do: mutual
/// TLS between servers (names checked) and ACLs with default deny.
pub fn secure() -> bool {
    std::env::var("MESHWORK_FAULTS_PLAIN").map_or(true, |v| v != "1")
}

/// A CA and a server certificate (`meshctl tls`) in `dir`, and an ACL
/// config whose default token is `secret`: the flags that use them.
fn secure_flags(dir: &Path, secret: &str) -> Result<Vec<String>> {
    let meshctl = target_dir().join("debug").join("meshctl");
    for args in [&["ca", "create"][..], &["cert", "create", "--server"][..]] {
        let out = std::process::Command::new(&meshctl)
            .arg("tls")
            .args(args)
            .arg("--dir")
            .arg(dir)
            .output()
            .with_context(|| format!("run {}", meshctl.display()))?;
        anyhow::ensure!(out.status.success(), "meshctl tls {args:?}: {out:?}");
    }
    let config = dir.join("acl.toml");
    std::fs::write(
        &config,
        format!(
            "[acl]\nenabled = true\ndefault_policy = \"deny\"\n\n[acl.tokens]\ndefault = \"{secret}\"\n"
        ),
    )?;
    let path = |name: &str| dir.join(name).display().to_string();
    Ok(vec![
        "--config".into(),
        config.display().to_string(),
        "--tls-ca".into(),
        path("meshwork-agent-ca.pem"),
        "--tls-cert".into(),
        path("dc1-server-meshwork-0.pem"),
        "--tls-key".into(),
        path("dc1-server-meshwork-0-key.pem"),
        "--tls-verify-server-hostname".into(),
    ])
}

impl<'a> Cluster<'a> {
    /// Three servers `n1`..`n3` forming a cluster by `--peers`.
    pub fn new(lab: &'a Lab, run: &str, t0: Instant) -> Result<Self> {
        let run_dir = target_dir().join("faults").join(run);
        std::fs::create_dir_all(&run_dir)?;
        let data = tempfile::tempdir()?;
        let (secure_args, management) = if secure() {
            let dir = data.path().join("secure");
            std::fs::create_dir_all(&dir)?;
            let secret = "5ec0e000-0000-4000-8000-00000000f001".to_owned();
            (secure_flags(&dir, &secret)?, Some(secret))
        } else {
            (Vec::new(), None)
        };
        let mut cluster = Cluster {
            nodes: Vec::new(),
            lab,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
            t0,
            timeline: Timeline::default(),
            run_dir,
            _data: data,
            done: false,
            secure_args,
            management,
        };
        let peers: Vec<String> = (1..=3)
            .map(|i| {
                let ip = lab.host(&format!("n{i}")).map(|h| h.ip)?;
                Ok(format!("{i}@{ip}:{RAFT_PORT}"))
            })
            .collect::<Result<_>>()?;
        for id in 1..=3 {
            let host = format!("n{id}");
            let extra = ["--peers".to_owned(), peers.join(",")];
            cluster.add_node(id, &host, &extra)?;
        }
        Ok(cluster)
    }

    pub fn add_node(&mut self, id: u64, host: &str, extra: &[String]) -> Result<usize> {
        let ip = self.lab.host(host)?.ip;
        let data_dir = self._data.path().join(format!("node{id}"));
        let mut args: Vec<String> = [
            "--node-id",
            &id.to_string(),
            "--data-dir",
            &data_dir.display().to_string(),
            "--http-addr",
            &format!("{ip}:{HTTP_PORT}"),
            "--grpc-addr",
            &format!("{ip}:{GRPC_PORT}"),
            "--raft-addr",
            &format!("{ip}:{RAFT_PORT}"),
            "--dns-addr",
            &format!("{ip}:{DNS_PORT}"),
            "--heartbeat-ms",
            "100",
            "--election-timeout-ms",
            &ELECTION_TIMEOUT_MS.to_string(),
            "--leader-wait-ms",
            "1500",
            "--watch-heartbeat-ms",
            "500",
            // Snapshots (and log purges) every few dozen entries, all the
            // time: the registry has no trigger API, so this is how the
            // suite forces snapshots during faults.
            "--snapshot-threshold",
            "64",
            "--snapshot-trailing-logs",
            "32",
            "--snapshot-interval-ms",
            "250",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.secure_args.iter().cloned());
        args.extend(extra.iter().cloned());
        self.nodes.push(Node {
            id,
            host: host.to_owned(),
            ip,
            log_path: self.run_dir.join(format!("node{id}.log")),
            args,
            child: None,
            paused: false,
            data_dir,
            image_dir: None,
        });
        Ok(self.nodes.len() - 1)
    }

    /// With ACLs on: bootstraps them (through any server that answers)
    /// with the default token's secret, so the workload's requests act as
    /// management from here on. Bounded: 30 attempts, 10 s.
    pub async fn bootstrap_acls(&mut self) -> Result<()> {
        let Some(secret) = self.management.clone() else {
            return Ok(());
        };
        let body = serde_json::json!({ "BootstrapSecret": secret }).to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        for _ in 0..30 {
            for node in self.nodes.iter().filter(|n| n.running()) {
                let url = format!("{}/v1/acl/bootstrap", node.http());
                let Ok(resp) = self.http.put(url).body(body.clone()).send().await else {
                    continue;
                };
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                // Done, or done by an earlier attempt whose answer was lost.
                if status == 200 || text.contains("no longer allowed") {
                    self.note("ACLs bootstrapped (TLS between servers, default deny)");
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        anyhow::bail!("cannot bootstrap the ACLs within 10 s")
    }

    pub fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    pub fn note(&mut self, what: impl Into<String>) {
        let what = what.into();
        let at = self.now_ms();
        eprintln!("[{:>8.3}s] {what}", at as f64 / 1000.0);
        self.timeline.lines.push((at, what));
    }

    /// From the next start on, every server keeps the image a power loss
    /// would leave of its data dir (the registry's power-loss seam, debug
    /// builds), so that [`Cluster::power_loss`] can put it in place.
    pub fn keep_power_loss_images(&mut self) {
        for node in &mut self.nodes {
            node.image_dir = Some(self._data.path().join(format!("node{}.image", node.id)));
        }
    }

    /// A power loss: kill -9, then everything the server had not made
    /// durable (synced) is gone from its data dir — the Raft log, the
    /// metadata file (vote, committed index, purge point), the snapshot
    /// and the marker, all written by the registry's own code through the
    /// seam.
    pub async fn power_loss(&mut self, i: usize) -> Result<()> {
        self.kill(i).await?;
        let node = &self.nodes[i];
        let image = node
            .image_dir
            .as_ref()
            .context("power losses need keep_power_loss_images")?;
        meshwork_registry::storage::durable::restore_image(image, &node.data_dir)
            .with_context(|| format!("restoring the power-loss image of {}", node.host))
    }

    pub fn start(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        if node.child.is_some() {
            bail!("{} already running", node.host);
        }
        let image_env = node.image_dir.as_ref().map(|dir| {
            (
                meshwork_registry::storage::durable::IMAGE_ENV,
                dir.display().to_string(),
            )
        });
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .context("open server log")?;
        let child = self
            .lab
            .command(&node.host, &registry_bin())?
            .args(&node.args)
            // `MESHWORK_FAULTS_RUST_LOG` for a diagnosis (e.g. adding
            // `openraft=info` shows every vote and why it was refused).
            .env(
                "RUST_LOG",
                std::env::var("MESHWORK_FAULTS_RUST_LOG")
                    .unwrap_or_else(|_| "warn,openraft=error,meshwork_registry=info".into()),
            )
            .envs(image_env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawn meshwork-registry")?;
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    /// kill -9 and reap.
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        if let Some(mut child) = node.child.take() {
            child.start_kill().context("kill -9")?;
            tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .context("reaping a killed server")??;
        }
        node.paused = false;
        Ok(())
    }

    pub fn signal(&mut self, i: usize, signal: &str) -> Result<()> {
        let Some(pid) = self.nodes[i].pid() else {
            bail!("{} is not running", self.nodes[i].host);
        };
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill {signal} {pid} failed");
        }
        self.nodes[i].paused = signal == "-STOP";
        Ok(())
    }

    /// The leader most live servers name (index in `nodes`), if any.
    pub async fn leader(&self) -> Option<usize> {
        let asks = self
            .nodes
            .iter()
            .filter(|n| n.running() && !n.paused)
            .map(|n| {
                let http = self.http.clone();
                let url = format!("{}/v1/status/leader", n.http());
                async move {
                    let resp = http
                        .get(url)
                        .timeout(Duration::from_millis(800))
                        .send()
                        .await
                        .ok()?;
                    resp.json::<String>().await.ok()
                }
            });
        let answers = futures_join_all(asks).await;
        let mut votes: HashMap<String, usize> = HashMap::new();
        for addr in answers.into_iter().flatten().filter(|a| !a.is_empty()) {
            *votes.entry(addr).or_default() += 1;
        }
        let (addr, count) = votes.into_iter().max_by_key(|(_, c)| *c)?;
        if count < 2 {
            return None;
        }
        self.nodes
            .iter()
            .position(|n| n.raft_addr() == addr && n.running() && !n.paused)
    }

    pub async fn wait_leader(&self, within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(leader) = self.leader().await {
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                bail!("no leader within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn targets(&self) -> Vec<Target> {
        self.nodes.iter().take(3).map(Node::target).collect()
    }

    /// Voters in the leader's Raft configuration.
    pub async fn voters(&self, via: usize) -> Option<Vec<u64>> {
        let url = format!("{}/v1/operator/raft/configuration", self.nodes[via].http());
        let body: serde_json::Value = self.http.get(url).send().await.ok()?.json().await.ok()?;
        let mut ids: Vec<u64> = body["Servers"]
            .as_array()?
            .iter()
            .filter(|s| s["Voter"] == true)
            .filter_map(|s| s["ID"].as_str()?.parse().ok())
            .collect();
        ids.sort_unstable();
        Some(ids)
    }

    /// `?recurse&stale` of `prefix` on server `i`: key → (value, index).
    pub async fn dump(&self, i: usize, prefix: &str) -> Result<(u64, Vec<(String, String, u64)>)> {
        let url = format!("{}/v1/kv/{prefix}?recurse&stale", self.nodes[i].http());
        let resp = self.http.get(url).send().await?;
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if resp.status() == 404 {
            return Ok((index, Vec::new()));
        }
        let body: serde_json::Value = resp.json().await?;
        let mut out = Vec::new();
        for e in body.as_array().into_iter().flatten() {
            out.push((
                e["Key"].as_str().unwrap_or_default().to_owned(),
                e["Value"].as_str().unwrap_or_default().to_owned(),
                e["ModifyIndex"].as_u64().unwrap_or(0),
            ));
        }
        out.sort();
        Ok((index, out))
    }

    pub async fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let url = format!("{}/metrics", self.nodes[i].http());
        let text = self.http.get(url).send().await.ok()?.text().await.ok()?;
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    }

    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {} (node {}) ---\n{}", n.host, n.id, n.log_tail(30)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        if !self.done || std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// `join_all` without the futures crate: the futures are few and short.
pub async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        if let Ok(v) = handle.await {
            out.push(v);
        }
    }
    out
}
