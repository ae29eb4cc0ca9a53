//! `meshctl`: the operator's command line for a registry cluster, over
//! the REST API. Human tables by default, `--json` for scripts.
//!
//! With ACLs on, the token (`--token`, `--token-file`,
//! `MESHWORK_HTTP_TOKEN` or `CONSUL_HTTP_TOKEN`) goes with every request
//! as `X-Consul-Token`; it is never printed (not even by `Debug`).
//!
//! HTTPS, as Consul's CLI: `--http-addr https://HOST:8501` (or
//! `MESHWORK_HTTP_SSL=true` with a scheme-less address) and `--ca-file`;
//! `--client-cert`/`--client-key` for a registry with `verify_incoming`
//! (see the `https` module).
//!
//! `meshctl tls` makes a cluster's CA and certificates from local files
//! alone, as `consul tls` does; it sends no request.
//!
//! Exit codes: 0 done; 1 the registry refused or failed the request;
//! 2 bad usage (unknown flag, bad address, unreadable file, a `tls` file
//! that is already there or does not fit, HTTPS without a CA file, a TLS
//! handshake refused for certificates that do not fit, plain HTTP to an
//! HTTPS port); 3 not found
//! (key, service, server); 4 no registry answered; 5 the request was sent
//! but its answer was lost, so whether it took effect is unknown.

mod acl;
mod client;
mod https;
mod mesh;
mod tls;

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::{Parser, Subcommand};
use hyper::Method;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

pub use client::Client;

/// Characters kept as they are in a key path (`/` separates segments).
const KEY_CHARS: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// Characters kept as they are in a query value or path segment.
const SEGMENT_CHARS: &AsciiSet = &KEY_CHARS.add(b'/');

/// Why a command failed; each kind has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Server(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    OutcomeUnknown(String),
    /// `--wait`: not every sidecar applied the change in time.
    #[error("{0}")]
    Incomplete(String),
}

impl CtlError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Server(_) => 1,
            CtlError::Usage(_) => 2,
            CtlError::NotFound(_) => 3,
            CtlError::Unreachable(_) => 4,
            CtlError::OutcomeUnknown(_) => 5,
            CtlError::Incomplete(_) => 6,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Operate a Meshwork registry cluster over its REST API, and make its TLS certificates",
    after_help = "HTTPS (a registry's TLS port, 8501): --http-addr https://HOST:PORT --ca-file CA.pem, \
                  plus --client-cert and --client-key if it verifies clients; or set MESHWORK_HTTP_ADDR, \
                  MESHWORK_CACERT, ... (CONSUL_HTTP_ADDR, CONSUL_HTTP_SSL, CONSUL_CACERT, CONSUL_CLIENT_CERT, \
                  CONSUL_CLIENT_KEY and CONSUL_TLS_SERVER_NAME are read too).\n\n\
                  Exit codes: 0 ok, 1 request failed, 2 bad usage (for tls: bad input, or a file already there; \
                  for HTTPS: no CA file, certificates that do not fit, plain HTTP to an HTTPS port), 3 not found, \
                  4 registry unreachable, 5 request sent but outcome unknown, 6 (config --wait) not every sidecar applied \
                  the change in time."
)]
pub struct Cli {
    /// The registry's REST address: HOST:PORT or http://HOST:PORT, or
    /// https://HOST:PORT for its HTTPS port (then give --ca-file). Without
    /// it: MESHWORK_HTTP_ADDR, then CONSUL_HTTP_ADDR [default:
    /// 127.0.0.1:8500]. MESHWORK_HTTP_SSL=true (or CONSUL_HTTP_SSL) makes
    /// an address without a scheme HTTPS.
    #[arg(
        long,
        global = true,
        value_name = "ADDR",
        help_heading = "Global options"
    )]
    http_addr: Option<String>,
    /// HTTPS: the PEM file of the CA (one or more certificates) that
    /// signed the registry's certificate; no system roots are used.
    /// Without it: MESHWORK_CACERT, then CONSUL_CACERT.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        help_heading = "Global options"
    )]
    ca_file: Option<std::ffi::OsString>,
    /// HTTPS: this client's PEM certificate, for a registry with
    /// verify_incoming (e.g. from `meshctl tls cert create --client`).
    /// Without it: MESHWORK_CLIENT_CERT, then CONSUL_CLIENT_CERT.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        help_heading = "Global options"
    )]
    client_cert: Option<std::ffi::OsString>,
    /// HTTPS: the PEM private key of --client-cert (never printed).
    /// Without it: MESHWORK_CLIENT_KEY, then CONSUL_CLIENT_KEY.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        help_heading = "Global options"
    )]
    client_key: Option<std::ffi::OsString>,
    /// HTTPS: the name the registry's certificate must carry (e.g.
    /// server.dc1.meshwork) [default: the address's host]. Without it:
    /// MESHWORK_TLS_SERVER_NAME, then CONSUL_TLS_SERVER_NAME.
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        help_heading = "Global options"
    )]
    tls_server_name: Option<String>,
    /// ACL token (its SecretID), sent as X-Consul-Token with every
    /// request. Without it: --token-file, then the environment's
    /// MESHWORK_HTTP_TOKEN, then CONSUL_HTTP_TOKEN.
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        help_heading = "Global options"
    )]
    token: Option<Secret>,
    /// Read the ACL token from FILE (surrounding whitespace dropped), so
    /// that it shows in no process listing.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        conflicts_with = "token",
        help_heading = "Global options"
    )]
    token_file: Option<std::path::PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,
    /// How long to wait for an answer (e.g. 10s, 500ms) [default: 30s;
    /// 10m for snapshot and server commands, which can take long].
    #[arg(long, global = true, help_heading = "Global options")]
    timeout: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The registry servers: role, term, last index, health.
    Members,
    /// The current leader's Raft address.
    Leader,
    /// Read and change keys.
    #[command(subcommand)]
    Kv(KvCommand),
    /// The registered services and their tags.
    Services,
    /// Look at one service.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Save or restore the whole state.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Add or remove registry servers.
    #[command(subcommand)]
    Server(ServerCommand),
    /// This meshctl's version and the registry's.
    Version,
    /// Manage ACLs, as `consul acl` does: bootstrap, tokens, policies.
    #[command(subcommand)]
    Acl(acl::AclCommand),
    /// Read and write config entries, as `consul config` does; `apply
    /// --wait` returns once every sidecar has applied the change.
    #[command(subcommand)]
    Config(mesh::ConfigCommand),
    /// The sidecars: which config each has applied.
    #[command(subcommand)]
    Mesh(mesh::MeshCommand),
    /// Make the cluster's TLS CA and certificates, as `consul tls` does.
    ///
    /// `meshctl tls ca create` once, then `meshctl tls cert create
    /// --server` for each server and `--client` for clients. Local files
    /// only: no OpenSSL needed, no registry contacted.
    #[command(subcommand)]
    Tls(tls::TlsCommand),
}

/// A token's secret: kept out of `Debug` output and error messages.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the request header only.
    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Secret(text)
    }
}

/// The token to send: `--token` (even empty: none), else `--token-file`,
/// else `MESHWORK_HTTP_TOKEN`, else `CONSUL_HTTP_TOKEN` (empty variables
/// count as unset).
fn resolve_token(
    flag: Option<Secret>,
    file: Option<&std::path::Path>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, CtlError> {
    if flag.is_some() {
        return Ok(flag);
    }
    if let Some(path) = file {
        // The file's content never goes into a message: it is a secret.
        let bytes = std::fs::read(path).map_err(|e| {
            CtlError::Usage(format!("cannot read --token-file {}: {e}", path.display()))
        })?;
        let text = String::from_utf8(bytes).map_err(|_| {
            CtlError::Usage(format!(
                "--token-file {} does not hold a text token",
                path.display()
            ))
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(CtlError::Usage(format!(
                "--token-file {} is empty",
                path.display()
            )));
        }
        return Ok(Some(Secret(token.to_owned())));
    }
    Ok(["MESHWORK_HTTP_TOKEN", "CONSUL_HTTP_TOKEN"]
        .into_iter()
        .filter_map(env)
        .find(|value| !value.is_empty())
        .map(Secret))
}

#[derive(Debug, Subcommand)]
enum KvCommand {
    /// Print a key's value (or, with --recurse, every key under a prefix).
    Get {
        key: String,
        #[arg(long)]
        recurse: bool,
    },
    /// Set a key. VALUE "-" reads standard input, "@FILE" reads a file.
    Put {
        key: String,
        value: String,
        #[arg(long, default_value_t = 0)]
        flags: u64,
        /// Only if the key's ModifyIndex is this (0: only if absent).
        #[arg(long)]
        cas: Option<u64>,
    },
    /// Delete a key (or, with --recurse, every key under a prefix).
    Delete {
        key: String,
        #[arg(long)]
        recurse: bool,
        /// Only if the key's ModifyIndex is this.
        #[arg(long)]
        cas: Option<u64>,
    },
    /// List keys under a prefix, one level deep unless --recurse.
    Ls {
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long)]
        recurse: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// A service's instances with their health and checks.
    Show { name: String },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Write a consistent snapshot of the whole state to FILE.
    Save { file: std::path::PathBuf },
    /// Replace the cluster's data with the snapshot in FILE.
    Restore {
        file: std::path::PathBuf,
        /// Also restore a snapshot taken from another cluster.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ServerCommand {
    /// Add the server with this ID and Raft address (HOST:PORT).
    Add { id: u64, addr: String },
    /// Remove the server with this ID.
    Remove { id: u64 },
}

/// Runs meshctl with the process's arguments; returns the exit code.
pub fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print and succeed; the rest is usage.
            let _ = e.print();
            return std::process::ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("meshctl: cannot start: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let mut out = std::io::stdout().lock();
    match runtime.block_on(run(cli, &mut out)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let _ = out.flush();
            eprintln!("meshctl: {e}");
            std::process::ExitCode::from(e.exit_code())
        }
    }
}

/// Runs one parsed command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CtlError> {
    let write_err = |e: std::io::Error| CtlError::Server(format!("cannot write output: {e}"));
    // Local files only: no address, token or timeout is read, so a broken
    // MESHWORK_HTTP_ADDR or token setting does not get in the way.
    if let Command::Tls(cmd) = cli.command {
        return tls::run(cmd, cli.json, out).and_then(|()| out.flush().map_err(write_err));
    }
    let slow = matches!(cli.command, Command::Snapshot(_) | Command::Server(_));
    // `config --wait D`: the request that waits must outlast D.
    let waits = match &cli.command {
        Command::Config(cmd) => cmd
            .wait()
            .map(mesh::wait_duration)
            .transpose()?
            .map(|d| d + Duration::from_secs(5)),
        _ => None,
    };
    let timeout = match &cli.timeout {
        None if slow => Duration::from_secs(600),
        None if waits.is_some() => waits.unwrap_or_default().max(Duration::from_secs(30)),
        None => Duration::from_secs(30),
        Some(text) => meshwork_core::duration::parse_duration(text)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                CtlError::Usage(format!(
                    "invalid --timeout {text:?}: want a duration such as 10s or 500ms"
                ))
            })?,
    };
    let env = |name: &str| std::env::var(name).ok();
    let endpoint = https::resolve(
        https::Flags {
            http_addr: cli.http_addr,
            // OsString rather than PathBuf: an empty flag (clap refuses an
            // empty path) means "none", over the environment.
            ca_file: cli.ca_file.map(Into::into),
            client_cert: cli.client_cert.map(Into::into),
            client_key: cli.client_key.map(Into::into),
            tls_server_name: cli.tls_server_name,
        },
        env,
    )?;
    let token = resolve_token(cli.token, cli.token_file.as_deref(), env)?;
    let client = Client::connect(&endpoint, token.as_ref().map(Secret::expose), timeout)?;
    let ctl = Ctl {
        client,
        json: cli.json,
        timeout,
    };
    match cli.command {
        Command::Members => ctl.members(out).await,
        Command::Leader => ctl.leader(out).await,
        Command::Kv(cmd) => ctl.kv(cmd, out).await,
        Command::Services => ctl.services(out).await,
        Command::Service(ServiceCommand::Show { name }) => ctl.service_show(&name, out).await,
        Command::Snapshot(cmd) => ctl.snapshot(cmd, out).await,
        Command::Server(cmd) => ctl.server(cmd, out).await,
        Command::Version => ctl.version(out).await,
        Command::Acl(cmd) => ctl.acl(cmd, out).await,
        Command::Config(cmd) => ctl.config(cmd, out).await,
        Command::Mesh(cmd) => ctl.mesh(cmd, out).await,
        Command::Tls(cmd) => tls::run(cmd, ctl.json, out),
    }
    .and_then(|()| out.flush().map_err(write_err))
}

struct Ctl {
    client: Client,
    json: bool,
    timeout: Duration,
}

fn io_err(e: std::io::Error) -> CtlError {
    CtlError::Server(format!("cannot write output: {e}"))
}

fn print_json(out: &mut dyn Write, value: &Value) -> Result<(), CtlError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CtlError::Server(format!("cannot encode JSON: {e}")))?;
    writeln!(out, "{text}").map_err(io_err)
}

/// Prints rows as columns aligned under their headers.
fn print_table(
    out: &mut dyn Write,
    headers: &[&str],
    rows: &[Vec<String>],
) -> Result<(), CtlError> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  ", w = *w));
            }
        }
        text.trim_end().to_owned()
    };
    writeln!(out, "{}", line(headers.to_vec())).map_err(io_err)?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect())).map_err(io_err)?;
    }
    Ok(())
}

fn str_field<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or("")
}

fn num_field(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_u64)
        .map_or_else(String::new, |n| n.to_string())
}

fn encode_key(key: &str) -> String {
    utf8_percent_encode(key.trim_start_matches('/'), KEY_CHARS).to_string()
}

fn encode_segment(text: &str) -> String {
    utf8_percent_encode(text, SEGMENT_CHARS).to_string()
}

impl Ctl {
    async fn get_json(&self, path: &str) -> Result<Value, CtlError> {
        self.client
            .send(Method::GET, path, Vec::new())
            .await?
            .json()
    }

    async fn members(&self, out: &mut dyn Write) -> Result<(), CtlError> {
        let health = self
            .client
            .send(Method::GET, "/v1/operator/autopilot/health", Vec::new())
            .await?;
        // 429 means "unhealthy" and still carries the report.
        let health = if health.status.as_u16() == 429 {
            serde_json::from_slice(&health.body)
                .map_err(|e| CtlError::Server(format!("the registry sent invalid JSON: {e}")))?
        } else {
            health.json()?
        };
        if self.json {
            return print_json(out, &health);
        }
        let servers = health
            .get("Servers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let rows: Vec<Vec<String>> = servers
            .iter()
            .map(|s| {
                let voter = s.get("Voter").and_then(Value::as_bool).unwrap_or(false);
                let leader = s.get("Leader").and_then(Value::as_bool).unwrap_or(false);
                let role = match (leader, voter) {
                    (true, _) => "leader",
                    (false, true) => "follower",
                    (false, false) => "learner",
                };
                let healthy = s.get("Healthy").and_then(Value::as_bool).unwrap_or(false);
                vec![
                    str_field(s, "ID").to_owned(),
                    str_field(s, "Name").to_owned(),
                    str_field(s, "Address").to_owned(),
                    role.to_owned(),
                    num_field(s, "LastTerm"),
                    num_field(s, "LastIndex"),
                    match str_field(s, "LastContact") {
                        "-1ns" => "never".to_owned(),
                        other => other.to_owned(),
                    },
                    if healthy { "healthy" } else { "UNHEALTHY" }.to_owned(),
                ]
            })
            .collect();
        print_table(
            out,
            &[
                "ID",
                "NAME",
                "ADDRESS",
                "ROLE",
                "TERM",
                "LAST INDEX",
                "LAST CONTACT",
                "HEALTH",
            ],
            &rows,
        )?;
        let tolerance = health
            .get("FailureTolerance")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        writeln!(out, "\nfailure tolerance: {tolerance} server(s)").map_err(io_err)
    }

    async fn leader(&self, out: &mut dyn Write) -> Result<(), CtlError> {
        let leader = self.get_json("/v1/status/leader").await?;
        let addr = leader.as_str().unwrap_or("");
        if addr.is_empty() {
            return Err(CtlError::Server(
                "the cluster has no leader right now (is a majority of servers up?)".into(),
            ));
        }
        if self.json {
            return print_json(out, &serde_json::json!({ "Leader": addr }));
        }
        writeln!(out, "{addr}").map_err(io_err)
    }

    async fn kv(&self, cmd: KvCommand, out: &mut dyn Write) -> Result<(), CtlError> {
        match cmd {
            KvCommand::Get { key, recurse } => {
                let mut path = format!("/v1/kv/{}", encode_key(&key));
                if recurse {
                    path.push_str("?recurse");
                }
                let entries = self.get_json(&path).await.map_err(|e| match e {
                    CtlError::NotFound(_) => CtlError::NotFound(format!(
                        "no key {key:?}{}",
                        if recurse { " or keys under it" } else { "" }
                    )),
                    e => e,
                })?;
                if self.json {
                    return print_json(out, &entries);
                }
                let entries = entries.as_array().cloned().unwrap_or_default();
                for entry in &entries {
                    let value = match entry.get("Value").and_then(Value::as_str) {
                        Some(b64) => STANDARD.decode(b64).map_err(|e| {
                            CtlError::Server(format!("the registry sent a bad value: {e}"))
                        })?,
                        None => Vec::new(),
                    };
                    if recurse {
                        write!(out, "{}:", str_field(entry, "Key")).map_err(io_err)?;
                    }
                    out.write_all(&value).map_err(io_err)?;
                    if recurse || !value.ends_with(b"\n") {
                        writeln!(out).map_err(io_err)?;
                    }
                }
                Ok(())
            }
            KvCommand::Put {
                key,
                value,
                flags,
                cas,
            } => {
                let body = read_value(&value)?;
                let mut path = format!("/v1/kv/{}?flags={flags}", encode_key(&key));
                if let Some(cas) = cas {
                    path.push_str(&format!("&cas={cas}"));
                }
                let reply = self.client.send(Method::PUT, &path, body).await?.json()?;
                if reply != Value::Bool(true) {
                    return Err(CtlError::Server(format!(
                        "key {key:?} not written: its ModifyIndex is not {} (check-and-set failed)",
                        cas.unwrap_or(0)
                    )));
                }
                if self.json {
                    return print_json(out, &serde_json::json!({ "Key": key, "Written": true }));
                }
                writeln!(out, "wrote {key}").map_err(io_err)
            }
            KvCommand::Delete { key, recurse, cas } => {
                let mut path = format!("/v1/kv/{}", encode_key(&key));
                let mut sep = '?';
                if recurse {
                    path.push_str("?recurse");
                    sep = '&';
                }
                if let Some(cas) = cas {
                    path.push_str(&format!("{sep}cas={cas}"));
                }
                let reply = self
                    .client
                    .send(Method::DELETE, &path, Vec::new())
                    .await?
                    .json()?;
                if reply != Value::Bool(true) {
                    return Err(CtlError::Server(format!(
                        "key {key:?} not deleted: its ModifyIndex is not {} (check-and-set failed)",
                        cas.unwrap_or(0)
                    )));
                }
                if self.json {
                    return print_json(out, &serde_json::json!({ "Key": key, "Deleted": true }));
                }
                writeln!(
                    out,
                    "deleted {key}{}",
                    if recurse { " (recursively)" } else { "" }
                )
                .map_err(io_err)
            }
            KvCommand::Ls { prefix, recurse } => {
                let mut path = format!("/v1/kv/{}?keys", encode_key(&prefix));
                if !recurse {
                    path.push_str("&separator=/");
                }
                let keys = match self.get_json(&path).await {
                    Ok(keys) => keys,
                    // No keys under the prefix: an empty listing.
                    Err(CtlError::NotFound(_)) => Value::Array(Vec::new()),
                    Err(e) => return Err(e),
                };
                if self.json {
                    return print_json(out, &keys);
                }
                for key in keys.as_array().into_iter().flatten() {
                    writeln!(out, "{}", key.as_str().unwrap_or("")).map_err(io_err)?;
                }
                Ok(())
            }
        }
    }

    async fn services(&self, out: &mut dyn Write) -> Result<(), CtlError> {
        let services = self.get_json("/v1/catalog/services").await?;
        if self.json {
            return print_json(out, &services);
        }
        let rows: Vec<Vec<String>> = services
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, tags)| {
                let tags: Vec<&str> = tags
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                vec![name.clone(), tags.join(",")]
            })
            .collect();
        print_table(out, &["SERVICE", "TAGS"], &rows)
    }

    async fn service_show(&self, name: &str, out: &mut dyn Write) -> Result<(), CtlError> {
        let path = format!("/v1/health/service/{}", encode_segment(name));
        let instances = self.get_json(&path).await?;
        let instances = instances.as_array().cloned().unwrap_or_default();
        if instances.is_empty() {
            return Err(CtlError::NotFound(format!(
                "no service {name:?} is registered (see `meshctl services`)"
            )));
        }
        if self.json {
            return print_json(out, &Value::Array(instances));
        }
        let mut rows = Vec::new();
        let mut check_rows = Vec::new();
        for entry in &instances {
            let node = entry.get("Node").cloned().unwrap_or(Value::Null);
            let service = entry.get("Service").cloned().unwrap_or(Value::Null);
            let checks = entry
                .get("Checks")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let worst = checks
                .iter()
                .map(|c| str_field(c, "Status"))
                .max_by_key(|s| match *s {
                    "critical" => 3,
                    "warning" => 2,
                    "passing" => 1,
                    _ => 0,
                })
                .unwrap_or("passing");
            let address = match str_field(&service, "Address") {
                "" => str_field(&node, "Address"),
                a => a,
            };
            let tags: Vec<&str> = service
                .get("Tags")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            rows.push(vec![
                str_field(&service, "ID").to_owned(),
                str_field(&node, "Node").to_owned(),
                format!("{address}:{}", num_field(&service, "Port")),
                tags.join(","),
                worst.to_owned(),
            ]);
            for check in &checks {
                check_rows.push(vec![
                    str_field(&service, "ID").to_owned(),
                    str_field(check, "CheckID").to_owned(),
                    str_field(check, "Name").to_owned(),
                    str_field(check, "Status").to_owned(),
                    str_field(check, "Output")
                        .lines()
                        .next()
                        .unwrap_or("")
                        .chars()
                        .take(60)
                        .collect(),
                ]);
            }
        }
        print_table(out, &["ID", "NODE", "ADDRESS", "TAGS", "STATUS"], &rows)?;
        if !check_rows.is_empty() {
            writeln!(out).map_err(io_err)?;
            print_table(
                out,
                &["INSTANCE", "CHECK", "NAME", "STATUS", "OUTPUT"],
                &check_rows,
            )?;
        }
        Ok(())
    }

    async fn snapshot(&self, cmd: SnapshotCommand, out: &mut dyn Write) -> Result<(), CtlError> {
        match cmd {
            SnapshotCommand::Save { file } => {
                let reply = self
                    .client
                    .send(Method::GET, "/v1/snapshot", Vec::new())
                    .await?;
                let index = reply.index;
                let bytes = reply.ok()?;
                // Checked before it is kept: a damaged download is no backup.
                let (header, _) = meshwork_core::backup::decode(&bytes).map_err(|e| {
                    CtlError::Server(format!("the snapshot received is damaged: {e}"))
                })?;
                write_atomically(&file, &bytes)?;
                if self.json {
                    return print_json(
                        out,
                        &serde_json::json!({
                            "File": file.display().to_string(),
                            "Bytes": bytes.len(),
                            "Index": index.unwrap_or(header.index),
                            "ClusterID": header.cluster_id,
                        }),
                    );
                }
                writeln!(
                    out,
                    "saved snapshot at index {} ({} bytes, {} keys, {} nodes) to {}",
                    header.index,
                    bytes.len(),
                    header.kv_entries,
                    header.nodes,
                    file.display()
                )
                .map_err(io_err)
            }
            SnapshotCommand::Restore { file, force } => {
                let bytes = std::fs::read(&file).map_err(|e| {
                    CtlError::Usage(format!("cannot read snapshot {}: {e}", file.display()))
                })?;
                // Refuse what is plainly not a snapshot before sending it.
                let (header, _) = meshwork_core::backup::decode(&bytes).map_err(|e| {
                    CtlError::Usage(format!("{}: {e}; nothing was changed", file.display()))
                })?;
                let path = if force {
                    "/v1/snapshot?force"
                } else {
                    "/v1/snapshot"
                };
                let reply = self.client.send(Method::PUT, path, bytes).await?;
                let index = reply.index;
                reply.ok()?;
                if self.json {
                    return print_json(
                        out,
                        &serde_json::json!({
                            "File": file.display().to_string(),
                            "Restored": true,
                            "Index": index,
                            "FromIndex": header.index,
                        }),
                    );
                }
                writeln!(
                    out,
                    "restored snapshot {} (taken at index {}) as index {}",
                    file.display(),
                    header.index,
                    index.map_or_else(|| "?".to_owned(), |i| i.to_string())
                )
                .map_err(io_err)
            }
        }
    }

    async fn server(&self, cmd: ServerCommand, out: &mut dyn Write) -> Result<(), CtlError> {
        let (path, method, done) = match &cmd {
            ServerCommand::Add { id, addr } => (
                format!(
                    "/v1/operator/raft/peer?id={id}&address={}",
                    encode_segment(addr)
                ),
                Method::PUT,
                format!("added server {id} at {addr}"),
            ),
            ServerCommand::Remove { id } => (
                format!("/v1/operator/raft/peer?id={id}"),
                Method::DELETE,
                format!("removed server {id}"),
            ),
        };
        let reply = self.client.send(method, &path, Vec::new()).await?;
        match reply.ok() {
            Ok(_) => {}
            Err(CtlError::Server(m)) if m.contains("not in the Raft configuration") => {
                return Err(CtlError::NotFound(m));
            }
            Err(e) => return Err(e),
        }
        if self.json {
            return print_json(out, &serde_json::json!({ "Done": done }));
        }
        writeln!(out, "{done}").map_err(io_err)
    }

    async fn version(&self, out: &mut dyn Write) -> Result<(), CtlError> {
        let ours = env!("CARGO_PKG_VERSION");
        let theirs = self.get_json("/v1/agent/self").await.map(|s| {
            s.pointer("/Config/Version")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        });
        let theirs = match theirs {
            Ok(v) => Some(v),
            // The version of meshctl itself is still worth printing.
            Err(CtlError::Unreachable(e)) => {
                eprintln!("meshctl: {e}");
                None
            }
            Err(e) => return Err(e),
        };
        if self.json {
            return print_json(
                out,
                &serde_json::json!({ "Meshctl": ours, "Registry": theirs, "Address": self.client.addr() }),
            );
        }
        writeln!(out, "meshctl {ours}").map_err(io_err)?;
        match theirs {
            Some(v) => writeln!(out, "registry {v} at {}", self.client.addr()).map_err(io_err),
            None => Err(CtlError::Unreachable(format!(
                "registry at {} did not answer within {:?}",
                self.client.addr(),
                self.timeout
            ))),
        }
    }
}

/// Reads a `kv put` value: literal, `-` for stdin, `@FILE` for a file.
fn read_value(value: &str) -> Result<Vec<u8>, CtlError> {
    if value == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
            .map_err(|e| CtlError::Usage(format!("cannot read the value from stdin: {e}")))?;
        return Ok(bytes);
    }
    if let Some(path) = value.strip_prefix('@') {
        return std::fs::read(path)
            .map_err(|e| CtlError::Usage(format!("cannot read the value from {path}: {e}")));
    }
    Ok(value.as_bytes().to_vec())
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// failed save never leaves half a snapshot under the name.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<(), CtlError> {
    let fail = |e: std::io::Error| CtlError::Usage(format!("cannot write {}: {e}", path.display()));
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(fail)?;
    tmp.write_all(bytes).map_err(fail)?;
    tmp.as_file().sync_all().map_err(fail)?;
    tmp.persist(path).map_err(|e| fail(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("meshctl").chain(args.iter().copied()))
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_token_flag_is_global_and_never_shown_by_debug() {
        let cli = parse(&["acl", "token", "list", "--token", "s3cr3t-value"]).expect("parses");
        assert_eq!(cli.token, Some(Secret("s3cr3t-value".into())));
        let debug = format!("{cli:?}");
        assert!(!debug.contains("s3cr3t-value"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
        let cli = parse(&["--token", "t", "members"]).expect("parses");
        assert_eq!(cli.token, Some(Secret("t".into())));
    }

    #[test]
    fn the_https_flags_are_global_and_may_be_empty() {
        let cli = parse(&[
            "leader",
            "--http-addr",
            "https://localhost:8501",
            "--ca-file",
            "ca.pem",
            "--client-cert",
            "",
            "--client-key",
            "",
            "--tls-server-name",
            "server.dc1.meshwork",
        ])
        .expect("parses");
        assert_eq!(cli.http_addr.as_deref(), Some("https://localhost:8501"));
        assert_eq!(cli.ca_file.as_deref(), Some("ca.pem".as_ref()));
        assert_eq!(cli.client_cert.as_deref(), Some("".as_ref()));
        assert_eq!(cli.client_key.as_deref(), Some("".as_ref()));
        assert_eq!(cli.tls_server_name.as_deref(), Some("server.dc1.meshwork"));
        let cli = parse(&["--ca-file", "", "kv", "get", "k"]).expect("parses");
        assert_eq!(cli.ca_file.as_deref(), Some("".as_ref()));
    }

    #[test]
    fn token_and_token_file_exclude_each_other() {
        let e = parse(&["--token", "t", "--token-file", "/tmp/x", "members"])
            .expect_err("both refused");
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn the_flag_wins_then_the_file_then_meshwork_then_consul() {
        let env = |name: &str| match name {
            "MESHWORK_HTTP_TOKEN" => Some("from-meshwork".to_owned()),
            "CONSUL_HTTP_TOKEN" => Some("from-consul".to_owned()),
            _ => None,
        };
        let consul_only = |name: &str| (name == "CONSUL_HTTP_TOKEN").then(|| "from-consul".into());
        let empty_meshwork = |name: &str| match name {
            "MESHWORK_HTTP_TOKEN" => Some(String::new()),
            _ => consul_only(name),
        };
        let secret = |s: &str| Some(Secret(s.to_owned()));
        assert_eq!(
            resolve_token(secret("flag"), None, env).ok(),
            Some(secret("flag"))
        );
        assert_eq!(
            resolve_token(None, None, env).ok(),
            Some(secret("from-meshwork"))
        );
        assert_eq!(
            resolve_token(None, None, consul_only).ok(),
            Some(secret("from-consul"))
        );
        assert_eq!(
            resolve_token(None, None, empty_meshwork).ok(),
            Some(secret("from-consul"))
        );
        assert_eq!(resolve_token(None, None, no_env).ok(), Some(None));

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "  from-file \n").expect("write");
        assert_eq!(
            resolve_token(None, Some(&file), env).ok(),
            Some(secret("from-file"))
        );
    }

    #[test]
    fn a_bad_token_file_is_a_usage_error_that_hides_its_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing");
        let e = resolve_token(None, Some(&missing), no_env).expect_err("missing file");
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("missing"), "{e}");

        let blank = dir.path().join("blank");
        std::fs::write(&blank, "\n \n").expect("write");
        let e = resolve_token(None, Some(&blank), no_env).expect_err("empty file");
        assert!(e.to_string().ends_with("is empty"), "{e}");

        // A secret with a line break inside cannot be a header; the
        // message must not repeat it.
        let broken = dir.path().join("broken");
        std::fs::write(&broken, "abc\ndef-secret").expect("write");
        let token = resolve_token(None, Some(&broken), no_env).expect("read");
        let e = Client::new(
            "127.0.0.1:8500",
            token.as_ref().map(Secret::expose),
            Duration::from_secs(1),
        )
        .expect_err("refused");
        assert!(!e.to_string().contains("def-secret"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn the_client_never_shows_its_token() {
        let client =
            Client::new("127.0.0.1:8500", Some("s3cr3t"), Duration::from_secs(1)).expect("client");
        let debug = format!("{client:?}");
        assert!(!debug.contains("s3cr3t"), "{debug}");
    }

    /// One request to a loopback listener: the raw request it received.
    fn exchange(token: Option<&str>, answer: &'static str) -> (String, Result<Value, CtlError>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr").to_string();
            let server = tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.expect("accept");
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buf).await.expect("read");
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                stream.write_all(answer.as_bytes()).await.expect("write");
                String::from_utf8_lossy(&seen).into_owned()
            });
            let client = Client::new(&addr, token, Duration::from_secs(5)).expect("client");
            let reply = client
                .send(Method::GET, "/v1/acl/token/self", Vec::new())
                .await
                .and_then(client::Reply::json);
            (server.await.expect("server"), reply)
        })
    }

    #[test]
    fn every_request_carries_the_token_header() {
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
        let (request, reply) = exchange(Some("tok-123"), ok);
        assert!(reply.is_ok());
        let lower = request.to_ascii_lowercase();
        assert!(
            lower.contains("\r\nx-consul-token: tok-123\r\n"),
            "{request}"
        );

        let (request, _) = exchange(None, ok);
        assert!(
            !request.to_ascii_lowercase().contains("x-consul-token"),
            "{request}"
        );
    }

    #[test]
    fn acl_commands_parse() {
        let cli = parse(&["acl", "bootstrap", "--json"]).expect("parses");
        assert!(cli.json);
        assert!(matches!(
            cli.command,
            Command::Acl(acl::AclCommand::Bootstrap)
        ));
        for args in [
            &["acl", "token", "read"][..],
            &["acl", "token", "read", "--id", "a", "--self"],
            &["acl", "token", "delete"],
            &["acl", "policy", "create", "--name", "p"],
            &[
                "acl",
                "policy",
                "create",
                "--name",
                "p",
                "--rules",
                "x",
                "--rules-file",
                "f",
            ],
            &["acl", "token", "create", "--node-identity", "just-a-node"],
            &["acl", "token", "create", "--expires-ttl", "later"],
            &["acl", "token", "create", "--policy-name", ""],
        ] {
            let e = parse(args).expect_err("refused");
            assert!(e.use_stderr(), "{args:?}");
        }
    }
}
