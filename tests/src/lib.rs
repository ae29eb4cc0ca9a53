//! Helpers for the end-to-end suites: start real `meshwork-registry`
//! processes on loopback, talk to them over HTTP, kill and restart them.
//!
//! Every cluster gets its own random `127.x.y.0/24` addresses, so suites can
//! run in parallel without port races. Each server's stderr goes to a file
//! in the cluster's temp dir; the last lines are printed when a test fails.
//!
//! The suites' other plumbing lives here too, so that the files under
//! `tests/tests/` hold scenarios: [`sidecar`] (sidecar processes and the
//! proxy suites' mesh), [`apps`] (demo backends), [`http`] (clients, raw
//! exchanges, load), [`mesh_client`] (a mesh TLS client of the test's own), [`watch`] (watch streams), [`host`] and [`deploy`]
//! (commands, `deploy-vm/`), [`fault_suite`] with [`lab_cluster`],
//! [`netns`], [`workload`], [`linearizable`] and [`fault_report`] (the
//! fault suite). [`wait_for`] and [`eventually`] are the polling waits.

pub mod apps;
pub mod damage;
pub mod deploy;
pub mod fault_report;
pub mod fault_suite;
pub mod host;
pub mod http;
pub mod lab_cluster;
pub mod linearizable;
pub mod lock_client;
pub mod lock_history;
pub mod mesh_client;
pub mod netns;
pub mod sidecar;
pub mod watch;
pub mod webdriver;
pub mod workload;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tokio::process::{Child, Command};

/// HTTP, gRPC and Raft ports every test server uses on its own address.
pub const HTTP_PORT: u16 = 28500;
pub const GRPC_PORT: u16 = 28502;
pub const RAFT_PORT: u16 = 28300;

/// Path of the `meshwork-registry` binary under test.
pub fn registry_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MESHWORK_REGISTRY_BIN") {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let path = target.join("debug").join("meshwork-registry");
    assert!(
        path.exists(),
        "{} not found: build it first (`cargo build --bins`, which scripts/test.sh does)",
        path.display()
    );
    path
}

/// Path of the `meshwork-sidecar` binary under test (next to the registry's).
pub fn sidecar_bin() -> PathBuf {
    registry_bin().with_file_name("meshwork-sidecar")
}

/// Path of the `meshctl` binary under test (next to the registry's).
pub fn meshctl_bin() -> PathBuf {
    registry_bin().with_file_name("meshctl")
}

/// `meshctl tls …` in `dir` (certificates for tests); its stdout.
pub fn meshctl_tls(dir: &Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(meshctl_bin())
        .arg("tls")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()?;
    ensure!(
        out.status.success(),
        "meshctl tls {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` until it returns `Some`, at most `timeout` long.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` every 200 ms until it succeeds, at most `limit` long.
///
/// The blocking counterpart of [`wait_for`], for tests that drive
/// commands rather than async clients.
pub fn eventually<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => {
                bail!("{what}: still failing after {limit:?}: {e:#}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// One server and where it listens: a process of the real binary, or
/// (for API behaviour tests, where a process adds nothing) the same
/// server run in the test's own runtime through `server::run`, on the
/// same addresses and flags.
#[derive(Debug)]
pub struct Server {
    pub id: u64,
    pub ip: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// Flags every start of this server gets.
    pub args: Vec<String>,
    /// Started in this process rather than as a child process.
    in_process: bool,
    child: Option<Child>,
    task: Option<InProcess>,
}

/// A server running in the test's runtime.
#[derive(Debug)]
struct InProcess {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), meshwork_registry::server::ServerError>>,
}

/// Sends the in-process servers' logs to the test's captured output
/// (shown when a test fails), at the level a spawned server logs.
fn init_test_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "warn,openraft=error,meshwork_registry=info",
        ))
        .with_test_writer()
        .try_init();
}

impl Server {
    pub fn http(&self) -> String {
        format!("http://{}:{HTTP_PORT}", self.ip)
    }

    pub fn grpc(&self) -> String {
        format!("http://{}:{GRPC_PORT}", self.ip)
    }

    pub fn raft_addr(&self) -> String {
        format!("{}:{RAFT_PORT}", self.ip)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some() || self.task.as_ref().is_some_and(|t| !t.task.is_finished())
    }

    /// The process id while it runs (to send it signals).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Starts the server (with its fixed flags plus `extra`).
    pub fn start(&mut self, extra: &[String]) -> Result<()> {
        assert!(
            self.child.is_none() && self.task.is_none(),
            "server {} already running",
            self.id
        );
        if self.in_process {
            return self.start_in_process(extra);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("open server log")?;
        let child = Command::new(registry_bin())
            .args(&self.args)
            .args(extra)
            .env("RUST_LOG", "warn,openraft=error,meshwork_registry=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawn meshwork-registry")?;
        self.child = Some(child);
        Ok(())
    }

    /// Parses the same flags the binary would get and runs the server as
    /// a task of the current runtime.
    fn start_in_process(&mut self, extra: &[String]) -> Result<()> {
        use clap::Parser;
        use meshwork_registry::config::{Cli, Config, DataDir};
        init_test_logging();
        let argv = std::iter::once("meshwork-registry".to_owned())
            .chain(self.args.iter().cloned())
            .chain(extra.iter().cloned());
        let cli = Cli::try_parse_from(argv).context("registry flags")?;
        let config = Config::load(cli).map_err(|e| anyhow::anyhow!("registry config: {e}"))?;
        let DataDir::Path(data_dir) = config.data_dir.clone() else {
            bail!("an in-process server needs --data-dir");
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            let listeners = meshwork_registry::server::Listeners::bind(&config)
                .await
                .map_err(|e| {
                    meshwork_registry::server::ServerError::Serve("bind", e.to_string())
                })?;
            meshwork_registry::server::run(config, &data_dir, listeners, token).await
        });
        self.task = Some(InProcess { shutdown, task });
        Ok(())
    }

    /// The exit status, if the process has exited (it is then reaped).
    pub fn try_exit_status(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// `kill -9`: no chance to flush anything. (An in-process server's
    /// task is aborted: its open files close, but no shutdown runs.)
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("kill")?;
        }
        if let Some(server) = self.task.take() {
            server.task.abort();
            let _ = server.task.await;
        }
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit. (In process: cancels the
    /// server's shutdown token; a clean stop is exit status 0.)
    pub async fn stop(&mut self) -> Result<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        if let Some(server) = self.task.take() {
            server.shutdown.cancel();
            let stopped = tokio::time::timeout(Duration::from_secs(20), server.task).await;
            return match stopped {
                Ok(Ok(Ok(()))) => Ok(std::process::ExitStatus::from_raw(0)),
                Ok(Ok(Err(e))) => bail!("server {} stopped with an error: {e}", self.id),
                Ok(Err(e)) => bail!("server {} task failed: {e}", self.id),
                Err(_) => bail!("server {} did not stop within 20s of shutdown", self.id),
            };
        }
        let Some(mut child) = self.child.take() else {
            bail!("server {} is not running", self.id);
        };
        if let Some(pid) = child.id() {
            std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .context("kill -TERM")?;
        }
        match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                child.kill().await?;
                bail!("server {} did not exit within 20s of SIGTERM", self.id)
            }
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A set of servers with their data in one temp dir.
#[derive(Debug)]
pub struct Cluster {
    pub servers: Vec<Server>,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    pub base_ip: String,
    /// Servers run in the test's runtime ([`Cluster::start_in_process`]).
    in_process: bool,
    /// Set by [`Cluster::done`]; a cluster dropped without it (an error or
    /// a panic) prints its servers' logs.
    done: bool,
}

/// Continues the servers named when dropped (also when a test fails
/// while they are stopped).
pub struct Resume<'a>(pub &'a Cluster, pub Vec<usize>);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        for i in &self.1 {
            let _ = self.0.signal(*i, "CONT");
        }
    }
}

impl Cluster {
    /// Creates (but does not start) `n` servers forming one cluster via
    /// `--peers`, each also given `extra` flags.
    pub fn new(n: u64, extra: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let base_ip = format!("127.{}.{}", 10 + rand_u8() % 200, rand_u8());
        let peers: Vec<String> = (1..=n)
            .map(|i| format!("{i}@{base_ip}.{i}:{RAFT_PORT}"))
            .collect();
        let mut cluster = Cluster {
            servers: Vec::new(),
            dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            base_ip,
            in_process: false,
            done: false,
        };
        for id in 1..=n {
            let mut args = cluster.base_args(id);
            args.push("--peers".into());
            args.push(peers.join(","));
            args.extend(extra.iter().map(|s| s.to_string()));
            cluster.push_server(id, args);
        }
        Ok(cluster)
    }

    fn base_args(&self, id: u64) -> Vec<String> {
        let ip = format!("{}.{id}", self.base_ip);
        vec![
            "--node-id".into(),
            id.to_string(),
            "--data-dir".into(),
            self.dir.path().join(format!("n{id}")).display().to_string(),
            "--http-addr".into(),
            format!("{ip}:{HTTP_PORT}"),
            "--grpc-addr".into(),
            format!("{ip}:{GRPC_PORT}"),
            "--raft-addr".into(),
            format!("{ip}:{RAFT_PORT}"),
            "--dns-addr".into(),
            format!("{ip}:28600"),
            "--heartbeat-ms".into(),
            "100".into(),
            "--election-timeout-ms".into(),
            "600".into(),
        ]
    }

    fn push_server(&mut self, id: u64, args: Vec<String>) {
        self.servers.push(Server {
            id,
            ip: format!("{}.{id}", self.base_ip),
            data_dir: self.dir.path().join(format!("n{id}")),
            log_path: self.dir.path().join(format!("n{id}.log")),
            args,
            in_process: self.in_process,
            child: None,
            task: None,
        });
    }

    /// Adds a server that joins through server `via` (index), with `extra` flags.
    pub fn add_joining_server(&mut self, via: usize, extra: &[&str]) -> usize {
        let id = self.servers.len() as u64 + 1;
        let mut args = self.base_args(id);
        args.push("--join".into());
        args.push(self.servers[via].raft_addr());
        args.extend(extra.iter().map(|s| s.to_string()));
        self.push_server(id, args);
        self.servers.len() - 1
    }

    /// Adds a server with an empty data dir and neither `--peers` nor
    /// `--join`: it waits for a leader to add it (`meshctl server add`).
    pub fn add_idle_server(&mut self, extra: &[&str]) -> usize {
        let id = self.servers.len() as u64 + 1;
        let mut args = self.base_args(id);
        args.extend(extra.iter().map(|s| s.to_string()));
        self.push_server(id, args);
        self.servers.len() - 1
    }

    /// Starts `n` servers and waits until they agree on a leader.
    pub async fn start(n: u64, extra: &[&str]) -> Result<Self> {
        Self::start_with(n, extra, false).await
    }

    /// [`Cluster::start`], the servers run in this process (faster to start,
    /// no process to schedule): for API behaviour, not for crashes and
    /// signals. The whole process shares one metrics registry, so a suite
    /// that reads metrics runs a single server this way.
    pub async fn start_in_process(n: u64, extra: &[&str]) -> Result<Self> {
        Self::start_with(n, extra, true).await
    }

    async fn start_with(n: u64, extra: &[&str], in_process: bool) -> Result<Self> {
        let mut cluster = Self::new(n, extra)?;
        cluster.in_process = in_process;
        for server in &mut cluster.servers {
            server.in_process = in_process;
        }
        for server in &mut cluster.servers {
            server.start(&[])?;
        }
        cluster.wait_leader(Duration::from_secs(20)).await?;
        Ok(cluster)
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to server `i`'s process.
    pub fn signal(&self, i: usize, signal: &str) -> Result<()> {
        let pid = self.servers[i].pid().context("server not running")?;
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()?;
        ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    /// The leader's index in `servers`, once every running server names
    /// the same leader.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        wait_for("a leader all running servers agree on", timeout, || async {
            let mut leader = None;
            for server in self.servers.iter().filter(|s| s.is_running()) {
                let addr = self.status_leader(server).await?;
                if addr.is_empty() || leader.as_ref().is_some_and(|l| *l != addr) {
                    return None;
                }
                leader = Some(addr);
            }
            let addr = leader?;
            self.servers
                .iter()
                .position(|s| s.raft_addr() == addr && s.is_running())
        })
        .await
    }

    async fn status_leader(&self, server: &Server) -> Option<String> {
        let resp = self
            .http
            .get(format!("{}/v1/status/leader", server.http()))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        resp.json::<String>().await.ok()
    }

    /// Indexes of running servers other than `leader`.
    pub fn followers(&self, leader: usize) -> Vec<usize> {
        (0..self.servers.len())
            .filter(|i| *i != leader && self.servers[*i].is_running())
            .collect()
    }

    /// `PUT /v1/kv/<key>` on server `i`; returns the status and body.
    pub async fn put(
        &self,
        i: usize,
        key: &str,
        value: &[u8],
        query: &str,
    ) -> Result<(u16, String)> {
        let url = format!("{}/v1/kv/{key}{query}", self.servers[i].http());
        let resp = self.http.put(url).body(value.to_vec()).send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }

    /// A PUT that must succeed.
    pub async fn must_put(&self, i: usize, key: &str, value: &str) -> Result<()> {
        let (status, body) = self.put(i, key, value.as_bytes(), "").await?;
        if status != 200 || body.trim() != "true" {
            bail!("PUT {key} on server {} answered {status} {body:?}", i + 1);
        }
        Ok(())
    }

    /// `GET /v1/kv/<key>?raw&<query>` on server `i`: the value, `None` on 404.
    pub async fn get_raw(&self, i: usize, key: &str, query: &str) -> Result<Option<String>> {
        let url = format!("{}/v1/kv/{key}?raw{query}", self.servers[i].http());
        let resp = self.http.get(url).send().await?;
        match resp.status().as_u16() {
            200 => Ok(Some(resp.text().await?)),
            404 => Ok(None),
            other => bail!(
                "GET {key} on server {} answered {other}: {}",
                i + 1,
                resp.text().await?
            ),
        }
    }

    /// `GET <path>` on server `i` as JSON; `None` when it cannot be had
    /// (for polling in [`wait_for`]).
    pub async fn get_json(&self, i: usize, path: &str) -> Option<serde_json::Value> {
        let url = format!("{}{path}", self.servers[i].http());
        self.http.get(url).send().await.ok()?.json().await.ok()
    }

    /// A metric without labels from server `i`'s Prometheus text.
    pub async fn metric(&self, i: usize, name: &str) -> Result<f64> {
        let url = format!(
            "{}/v1/agent/metrics?format=prometheus",
            self.servers[i].http()
        );
        let text = self.http.get(url).send().await?.text().await?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no {name} from server {}: {text}", i + 1))
    }

    /// `service`'s instances as server `i` reports them in
    /// `/v1/health/service/<service>`: (service ID, worst check status),
    /// sorted.
    pub async fn instance_health(&self, i: usize, service: &str) -> Result<Vec<(String, String)>> {
        let url = format!("{}/v1/health/service/{service}", self.servers[i].http());
        let body: serde_json::Value = self.http.get(url).send().await?.json().await?;
        let mut out = Vec::new();
        for entry in body.as_array().into_iter().flatten() {
            let id = entry["Service"]["ID"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let statuses: Vec<&str> = entry["Checks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["Status"].as_str())
                .collect();
            let worst = ["critical", "warning"]
                .into_iter()
                .find(|s| statuses.contains(s))
                .unwrap_or("passing");
            out.push((id, worst.to_owned()));
        }
        out.sort();
        Ok(out)
    }

    /// Polls [`Cluster::instance_health`] until it is `want`, at most
    /// `within` long.
    pub async fn wait_instance_health(
        &self,
        i: usize,
        service: &str,
        want: &[(&str, &str)],
        within: Duration,
    ) -> Result<()> {
        let mut want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect();
        want.sort();
        let deadline = Instant::now() + within;
        let mut last = Vec::new();
        loop {
            if let Ok(now) = self.instance_health(i, service).await {
                if now == want {
                    return Ok(());
                }
                last = now;
            }
            if Instant::now() >= deadline {
                bail!(
                    "server {} shows {service} as {last:?}, wanted {want:?} within {within:?}",
                    i + 1
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every server's log tail, for failure messages.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("--- server {} ---\n{}", s.id, s.log_tail(40)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Cluster {
    /// Marks the test as passed, so that dropping the cluster stays quiet.
    pub fn done(mut self) {
        self.done = true;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.done || std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

fn rand_u8() -> u8 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.write_u32(std::process::id());
    (hasher.finish() % 251) as u8
}
