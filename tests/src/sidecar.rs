//! `meshwork-sidecar` processes for the end-to-end suites: starting one
//! from a config file, signalling it, and [`Mesh`], a one-server registry
//! with the server and client sidecars of a proxy test, whose admin API
//! ([`Sidecar`]) the tests read.
//!
//! Every sidecar of a [`Mesh`] has its own address on the cluster's
//! `127.x.y.0/24`, so the ports below are the same for all of them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tokio::process::{Child, Command};

use crate::apps::{Behavior, http_backend};
use crate::{Cluster, GRPC_PORT, sidecar_bin, wait_for};

/// The admin port every test sidecar uses on its own address.
pub const ADMIN_PORT: u16 = 19000;
/// The inbound port every server sidecar uses on its own address.
pub const INBOUND_PORT: u16 = 21000;
/// The outbound port the client sidecar gives its upstream.
pub const UPSTREAM_PORT: u16 = 9191;

/// Writes `body` as `dir/name`; its path.
pub fn write_config(dir: &Path, name: &str, body: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, body)?;
    Ok(path)
}

/// Spawns `meshwork-sidecar --config <config>` (killed when dropped), its
/// stderr to `log` and its stdout (the JSON access log when enabled) to
/// `stdout` or nowhere. `rust_log` sets `RUST_LOG`; without it the test's
/// own environment applies.
pub fn spawn_sidecar(
    config: &Path,
    log: &Path,
    stdout: Option<&Path>,
    rust_log: Option<&str>,
) -> Result<Child> {
    let mut command = Command::new(sidecar_bin());
    command.arg("--config").arg(config);
    if let Some(filter) = rust_log {
        command.env("RUST_LOG", filter);
    }
    let stdout = match stdout {
        Some(path) => Stdio::from(std::fs::File::create(path)?),
        None => Stdio::null(),
    };
    command
        .stdout(stdout)
        .stderr(std::fs::File::create(log)?)
        .kill_on_drop(true)
        .spawn()
        .context("spawn meshwork-sidecar")
}

/// `kill -<sig>` to a sidecar process.
pub fn signal(child: &Child, sig: &str) -> Result<()> {
    let pid = child.id().context("sidecar already reaped")?;
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    ensure!(status.success(), "kill -{sig} {pid} failed");
    Ok(())
}

/// One sidecar process.
pub struct Sidecar {
    pub ip: String,
    /// `None` once the test has reaped or killed it.
    pub child: Option<Child>,
    /// Its config file (a reload rewrites it).
    pub config: PathBuf,
    pub log: PathBuf,
    /// Its stdout: the JSON access log when `[proxy] access_log = true`.
    pub access_log: PathBuf,
    /// A client for its admin API (10 s timeout).
    pub http: reqwest::Client,
}

impl Sidecar {
    /// The URL of `path` on its admin listener.
    pub fn admin(&self, path: &str) -> String {
        format!("http://{}:{ADMIN_PORT}{path}", self.ip)
    }

    /// `GET <admin>/<path>` as JSON.
    pub async fn json(&self, path: &str) -> Result<serde_json::Value> {
        Ok(self.http.get(self.admin(path)).send().await?.json().await?)
    }

    /// Its Prometheus text.
    pub async fn metrics(&self) -> Result<String> {
        Ok(self
            .http
            .get(self.admin("/metrics"))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Sum of the metric lines starting with `prefix` (name and labels).
    pub async fn metric_sum(&self, prefix: &str) -> Result<f64> {
        let text = self.metrics().await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Endpoints of the first outbound cluster as `(address, health, ejected)`.
    pub async fn endpoints(&self) -> Result<Vec<(String, String, bool)>> {
        let clusters = self.json("/clusters").await?;
        let list = clusters["clusters"]
            .as_array()
            .context("clusters")?
            .iter()
            .find(|c| c["direction"] == "outbound")
            .context("an outbound cluster")?["endpoints"]
            .as_array()
            .context("endpoints")?
            .iter()
            .map(|e| {
                (
                    e["address"].as_str().unwrap_or_default().to_owned(),
                    e["health"].as_str().unwrap_or_default().to_owned(),
                    e["ejected"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        Ok(list)
    }

    /// Waits (at most 15 s) for `/ready`: registered, with the proxy its
    /// mesh leaf, roots, intentions and first endpoint sets. Before it, a
    /// request may fail for want of a leaf (a connect failure that counts
    /// against the endpoint).
    pub async fn wait_ready(&self) -> Result<()> {
        wait_for("the sidecar ready", Duration::from_secs(15), || async {
            let r = self.http.get(self.admin("/ready")).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await
    }

    pub async fn wait_endpoints(&self, n: usize) -> Result<()> {
        wait_for(
            &format!("{n} passing endpoints"),
            Duration::from_secs(15),
            || async {
                let list = self.endpoints().await.ok()?;
                (list.iter().filter(|e| e.1 == "passing").count() == n).then_some(())
            },
        )
        .await
    }

    /// `kill -<sig>` to the running process.
    pub fn signal(&self, sig: &str) -> Result<()> {
        signal(self.child.as_ref().context("sidecar not running")?, sig)
    }

    /// Waits (at most `limit`) for the process to exit and reaps it.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("child")?;
        let status = tokio::time::timeout(limit, child.wait()).await??;
        self.child = None;
        Ok(status)
    }

    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// A registry and the sidecars of one test; prints the sidecars' logs when
/// dropped without [`Mesh::done`].
pub struct Mesh {
    /// The registry (one server); `None` only once [`Mesh::done`] ran.
    pub cluster: Option<Cluster>,
    /// `127.x.y`: the cluster's own /24.
    net: String,
    pub sidecars: Vec<Sidecar>,
    /// The ACL token the next sidecars present (`[registry] token`).
    pub registry_token: Option<String>,
    /// The CA the next sidecars trust to reach the registry's gRPC TLS
    /// port (8503) instead of the plain one.
    pub registry_ca: Option<PathBuf>,
    done: bool,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if !self.done {
            for s in &self.sidecars {
                eprintln!("--- sidecar {} log ---\n{}", s.ip, s.log_tail());
            }
        }
    }
}

/// A server sidecar's service.
pub struct Service<'a> {
    pub name: &'a str,
    pub id: &'a str,
    pub app: SocketAddr,
    /// The inbound listener's protocol.
    pub protocol: &'a str,
}

impl Mesh {
    /// A one-server registry on a fresh `127.x.y.0/24`, no sidecars yet.
    pub async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// [`Mesh::start`] with `extra` flags for the registry server.
    pub async fn start_with(extra: &[&str]) -> Result<Self> {
        Self::start_servers(1, extra).await
    }

    /// A registry of `servers` servers; sidecars use the first unless
    /// their config says otherwise ([`Mesh::registry_section_on`]).
    pub async fn start_servers(servers: u64, extra: &[&str]) -> Result<Self> {
        let cluster = Cluster::start(servers, extra).await?;
        let ip = cluster.servers[0].ip.clone();
        let net = ip
            .rsplit_once('.')
            .map(|(net, _)| net.to_owned())
            .context("cluster ip")?;
        Ok(Mesh {
            cluster: Some(cluster),
            net,
            sidecars: Vec::new(),
            registry_token: None,
            registry_ca: None,
            done: false,
        })
    }

    pub fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().expect("cluster kept until drop")
    }

    /// `127.x.y.<host>` on the mesh's own /24.
    pub fn ip(&self, host: u8) -> String {
        format!("{}.{host}", self.net)
    }

    /// Starts a sidecar on `ip` with `config` as `<name>.toml` in the
    /// cluster's dir (its log and access log next to it); its index.
    pub fn spawn(&mut self, ip: &str, name: &str, config: &str) -> Result<usize> {
        let dir = self.cluster().dir.path().to_owned();
        let path = write_config(&dir, &format!("{name}.toml"), config)?;
        let log = dir.join(format!("{name}.log"));
        let access_log = dir.join(format!("{name}.access.log"));
        let child = spawn_sidecar(
            &path,
            &log,
            Some(&access_log),
            Some("warn,meshwork_sidecar=debug"),
        )?;
        self.sidecars.push(Sidecar {
            ip: ip.to_owned(),
            child: Some(child),
            config: path,
            log,
            access_log,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        });
        Ok(self.sidecars.len() - 1)
    }

    /// The `[registry]` table the next sidecar gets.
    pub fn registry_section(&self) -> String {
        self.registry_section_on(0)
    }

    /// The `[registry]` table of a sidecar that uses server `server`.
    pub fn registry_section_on(&self, server: usize) -> String {
        let token = self
            .registry_token
            .as_ref()
            .map(|t| format!("token = \"{t}\"\n"))
            .unwrap_or_default();
        let (port, tls) = match &self.registry_ca {
            Some(ca) => (
                8503,
                format!("tls = true\nca_file = \"{}\"\n", ca.display()),
            ),
            None => (GRPC_PORT, String::new()),
        };
        format!(
            "[registry]\naddresses = [\"{}:{port}\"]\n{token}{tls}",
            self.cluster().servers[server].ip
        )
    }

    /// Starts an instance of `service` (`id`, meta `version`) on host
    /// `host`: an HTTP app (answering with its id first) and its server
    /// sidecar, which uses registry server `server`; ready when returned.
    pub async fn versioned_instance(
        &mut self,
        (host, server): (u8, usize),
        (service, id, version): (&str, &str, &str),
    ) -> Result<usize> {
        let ip = self.ip(host);
        let (app, _) = http_backend(&ip, id).await?;
        let config = self.instance_config(
            &ip,
            server,
            &Service {
                name: service,
                id,
                app,
                protocol: "http",
            },
            Some(version),
        );
        self.spawn_ready(&ip, id, &config).await
    }

    /// [`Mesh::versioned_instance`] with a TCP app ([`tcp_backend`]:
    /// answers `<id> got <n> bytes`) and a tcp inbound listener.
    pub async fn versioned_tcp_instance(
        &mut self,
        (host, server): (u8, usize),
        (service, id, version): (&str, &str, &str),
    ) -> Result<usize> {
        let ip = self.ip(host);
        let app = crate::apps::tcp_backend(&ip, id).await?;
        let config = self.instance_config(
            &ip,
            server,
            &Service {
                name: service,
                id,
                app,
                protocol: "tcp",
            },
            Some(version),
        );
        self.spawn_ready(&ip, id, &config).await
    }

    /// Starts a server sidecar on `ip` in front of `service.app`.
    pub async fn server_sidecar(&mut self, ip: &str, service: Service<'_>) -> Result<usize> {
        let config = self.instance_config(ip, 0, &service, None);
        self.spawn_ready(ip, service.id, &config).await
    }

    /// [`Mesh::server_sidecar`] reporting to registry server `server`.
    pub async fn server_sidecar_on(
        &mut self,
        ip: &str,
        server: usize,
        service: Service<'_>,
    ) -> Result<usize> {
        let config = self.instance_config(ip, server, &service, None);
        self.spawn_ready(ip, service.id, &config).await
    }

    async fn spawn_ready(&mut self, ip: &str, id: &str, config: &str) -> Result<usize> {
        let i = self.spawn(ip, id, config)?;
        self.sidecars[i].wait_ready().await?;
        Ok(i)
    }

    /// The config of a server sidecar on `ip` (registry server `server`)
    /// in front of `service.app`, with meta `version` when given.
    fn instance_config(
        &self,
        ip: &str,
        server: usize,
        service: &Service<'_>,
        version: Option<&str>,
    ) -> String {
        let meta = version
            .map(|v| format!("meta = {{ version = \"{v}\" }}\n"))
            .unwrap_or_default();
        format!(
            r#"{}
[service]
name = "{}"
id = "{}"
address = "{}"
port = {}
{meta}
[session]
node = "node-{ip}"
ttl = "2s"
deregister_critical_after = "2s"

[inbound]
listen = "{ip}:{INBOUND_PORT}"
protocol = "{}"

[proxy]
drain = "3s"
access_log = true

[admin]
listen = "{ip}:{ADMIN_PORT}"
"#,
            self.registry_section_on(server),
            service.name,
            service.id,
            service.app.ip(),
            service.app.port(),
            service.protocol,
        )
    }

    /// Starts a sidecar in gateway mode on `ip`: `[gateway] name`, its
    /// listeners bound on `ip` (from the `ingress-gateway` entry `name`),
    /// `extra` TOML inside `[gateway]` (its keys, then its tables:
    /// `[[gateway.certificates]]`, `[[gateway.api_keys]]`).
    /// Returned once its admin listener answers.
    pub async fn gateway(&mut self, ip: &str, name: &str, extra: &str) -> Result<usize> {
        let config = format!(
            r#"{}
[gateway]
name = "{name}"
address = "{ip}"
port = 8443
{extra}

[session]
node = "node-{ip}"
ttl = "2s"

[proxy]
drain = "3s"
access_log = true

[admin]
listen = "{ip}:{ADMIN_PORT}"
"#,
            self.registry_section()
        );
        self.spawn_live(ip, name, &config).await
    }

    /// Spawns a sidecar and waits (bounded) until its admin listener
    /// answers `/live`.
    async fn spawn_live(&mut self, ip: &str, id: &str, config: &str) -> Result<usize> {
        let i = self.spawn(ip, id, config)?;
        wait_for("sidecar admin", Duration::from_secs(15), || async {
            self.sidecars[i]
                .http
                .get(self.sidecars[i].admin("/live"))
                .send()
                .await
                .ok()?;
            Some(())
        })
        .await?;
        Ok(i)
    }

    /// Starts the client sidecar on `ip` with one upstream, given as the
    /// body of its `[[upstreams]]` table (listen is added).
    pub async fn client_sidecar(&mut self, ip: &str, upstream: &str) -> Result<usize> {
        let config = format!(
            r#"{}
[service]
name = "client"
id = "client-1"
address = "{ip}"
port = 8080

[session]
node = "node-{ip}"
ttl = "2s"

[proxy]
drain = "3s"
access_log = true

[admin]
listen = "{ip}:{ADMIN_PORT}"

[[upstreams]]
listen = "{ip}:{UPSTREAM_PORT}"
{upstream}
"#,
            self.registry_section()
        );
        self.spawn_live(ip, "client", &config).await
    }

    pub fn done(mut self) {
        self.done = true;
        if let Some(c) = self.cluster.take() {
            c.done();
        }
    }
}

/// One echo instance: its app's address, its behaviour, and the index of
/// its server sidecar in [`Mesh::sidecars`].
pub type Instance = (SocketAddr, Arc<Behavior>, usize);

/// `n` HTTP echo instances with their sidecars, and a client sidecar on
/// the mesh's client address (`.100`) whose one upstream is `upstream`
/// (TOML), once it sees all `n` endpoints and is ready: (instances, client
/// address, its index).
pub async fn echo_behind_client(
    mesh: &mut Mesh,
    n: u8,
    upstream: &str,
) -> Result<(Vec<Instance>, String, usize)> {
    let instances = echo_instances(mesh, n, "http").await?;
    let client_ip = mesh.ip(100);
    let c = mesh.client_sidecar(&client_ip, upstream).await?;
    mesh.sidecars[c].wait_endpoints(usize::from(n)).await?;
    mesh.sidecars[c].wait_ready().await?;
    Ok((instances, client_ip, c))
}

/// `n` HTTP backends (`echo-0`, …) with server sidecars for service
/// `echo`, on hosts `.20`, `.21`, …, the inbound listeners speaking
/// `protocol`.
pub async fn echo_instances(mesh: &mut Mesh, n: u8, protocol: &str) -> Result<Vec<Instance>> {
    let mut out = Vec::new();
    for k in 0..n {
        let ip = mesh.ip(20 + k);
        let name = format!("echo-{k}");
        let (app, behavior) = http_backend(&ip, &name).await?;
        let i = mesh
            .server_sidecar(
                &ip,
                Service {
                    name: "echo",
                    id: &name,
                    app,
                    protocol,
                },
            )
            .await?;
        out.push((app, behavior, i));
    }
    Ok(out)
}

// ---------------------------------------------------------------- reload

impl Mesh {
    /// Writes `text` as sidecar `i`'s config, sends SIGHUP and waits until
    /// the reload is done; the `/status` config section.
    pub async fn reload(&self, i: usize, text: &str) -> Result<serde_json::Value> {
        let sidecar = &self.sidecars[i];
        let before = sidecar.json("/status").await?["config"].clone();
        let done = |c: &serde_json::Value| {
            c["reloads"].as_u64().unwrap_or(0) + c["reload_failures"].as_u64().unwrap_or(0)
        };
        std::fs::write(&sidecar.config, text)?;
        sidecar.signal("HUP")?;
        wait_for("the reload", Duration::from_secs(10), || async {
            let now = sidecar.json("/status").await.ok()?["config"].clone();
            (done(&now) > done(&before)).then_some(now)
        })
        .await
    }
}
