//! Command line and config file → validated runtime [`Config`].
//!
//! Every setting can come from a flag or from the TOML file given with
//! `--config` (same names, with `_` for `-`); a flag wins over the file.
//! Unknown keys in the file are rejected, all of them at once, each with
//! its line. Validation reports every problem, not only the first.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use meshwork_core::config_file::{line_of_key, toml_error};
use serde::Deserialize;

/// Defaults, named so that docs and code agree.
pub mod defaults {
    pub const HTTP_ADDR: &str = "127.0.0.1:8500";
    pub const GRPC_ADDR: &str = "127.0.0.1:8502";
    pub const RAFT_ADDR: &str = "127.0.0.1:8300";
    pub const DNS_ADDR: &str = "127.0.0.1:8600";
    pub const DATACENTER: &str = "dc1";
    pub const DATA_DIR: &str = "/var/lib/meshwork";
    pub const SNAPSHOT_THRESHOLD: u64 = 8192;
    pub const SNAPSHOT_TRAILING_LOGS: u64 = 1024;
    pub const SNAPSHOT_INTERVAL_MS: u64 = 30_000;
    pub const WATCH_HEARTBEAT_MS: u64 = 10_000;
    pub const HEARTBEAT_MS: u64 = 100;
    pub const ELECTION_TIMEOUT_MS: u64 = 300;
    pub const LEADER_WAIT_MS: u64 = 5000;
}

/// `meshwork-registry`: a Meshwork registry server.
#[derive(Debug, Default, Parser)]
#[command(name = "meshwork-registry", version, about, long_about = None)]
pub struct Cli {
    /// One server, data in a temp dir, every API on its default port.
    #[arg(long)]
    pub dev: bool,
    /// Check the flags and the configuration file, print the settings that
    /// would be used, and exit (0 when valid, 2 otherwise) without
    /// starting or touching the data dir.
    #[arg(long)]
    pub check_config: bool,
    /// TOML file with the same settings as the flags (flags win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This server's id, unique in the cluster (1, 2, 3, …).
    #[arg(long)]
    pub node_id: Option<u64>,
    /// This server's node name (default: `meshwork-<node-id>`).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Datacenter name reported to Consul clients.
    #[arg(long)]
    pub datacenter: Option<String>,
    /// Where the Raft log, snapshots and metadata live.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// REST API listen address (Consul-compatible HTTP API); "" turns the
    /// plain listener off (with TLS, HTTPS only).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub http_addr: Option<Listen>,
    /// Public gRPC listen address (watch and agent services); "" turns it
    /// off.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub grpc_addr: Option<Listen>,
    /// REST over HTTPS (Consul's 8501); on with TLS (default: the HTTP
    /// address's host, port 8501); "" turns it off.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub https_addr: Option<Listen>,
    /// Public gRPC over TLS (Consul's `grpc_tls`, 8503); on with TLS
    /// (default: the gRPC address's host, port 8503); "" turns it off.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub grpc_tls_addr: Option<Listen>,
    /// CA certificate(s), PEM: what server and client certificates must
    /// chain to. With --tls-cert and --tls-key it turns TLS on: mutual TLS
    /// between servers, HTTPS and gRPC over TLS for clients.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This server's certificate (chain), PEM.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key, PEM.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// HTTPS and gRPC-over-TLS clients must present a certificate the CA
    /// signed.
    #[arg(long)]
    pub tls_verify_incoming: bool,
    /// Servers must present `server.<datacenter>.meshwork` in their
    /// certificate (a client certificate cannot pass for a server).
    #[arg(long)]
    pub tls_verify_server_hostname: bool,
    /// Raft and internal gRPC listen address.
    #[arg(long, value_name = "ADDR")]
    pub raft_addr: Option<SocketAddr>,
    /// Raft address other servers use to reach this one (default: the
    /// entry for this node in --peers, else --raft-addr).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise_addr: Option<String>,
    /// DNS listen address (UDP and TCP).
    #[arg(long, value_name = "ADDR")]
    pub dns_addr: Option<SocketAddr>,
    /// Initial servers as `ID@HOST:PORT` Raft addresses, comma separated.
    /// Servers started with the same list form a cluster by themselves.
    #[arg(long, value_delimiter = ',', value_name = "ID@HOST:PORT,…")]
    pub peers: Option<Vec<String>>,
    /// Raft address of any server of a running cluster to join.
    #[arg(long, value_name = "HOST:PORT")]
    pub join: Option<String>,
    /// Take a snapshot after this many applied entries.
    #[arg(long)]
    pub snapshot_threshold: Option<u64>,
    /// Log entries kept behind a snapshot for slow followers.
    #[arg(long)]
    pub snapshot_trailing_logs: Option<u64>,
    /// How often to check whether a snapshot is due, in milliseconds.
    #[arg(long)]
    pub snapshot_interval_ms: Option<u64>,
    /// Leader heartbeat interval in milliseconds.
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Watch streams send a heartbeat after this many idle milliseconds.
    #[arg(long)]
    pub watch_heartbeat_ms: Option<u64>,
    /// Minimum election timeout in milliseconds (the maximum is twice it).
    #[arg(long)]
    pub election_timeout_ms: Option<u64>,
    /// How long a request waits for a leader before "No cluster leader".
    #[arg(long)]
    pub leader_wait_ms: Option<u64>,
    /// How long KV tombstones (and indexes of gone services and nodes) are
    /// kept before they are reaped (default 15 min, as Consul).
    #[arg(long)]
    pub tombstone_ttl_ms: Option<u64>,
    /// DNS domain served (default `mesh.`; `consul.` for drop-in use).
    #[arg(long)]
    pub dns_domain: Option<String>,
    /// TTL in seconds of node answers (default 0, as Consul).
    #[arg(long)]
    pub dns_node_ttl: Option<u32>,
    /// TTLs of service answers: `NAME=SECONDS,…`; `*` sets the default (0).
    #[arg(long, value_delimiter = ',')]
    pub dns_service_ttl: Option<Vec<String>>,
    /// Answer only with instances whose checks all pass (not warning).
    #[arg(long)]
    pub dns_only_passing: bool,
    /// At most this many A/AAAA records per answer (0: no limit).
    #[arg(long)]
    pub dns_a_record_limit: Option<usize>,
    /// Resolvers for names outside the domain (`IP:PORT`, comma separated);
    /// without them such names are refused.
    #[arg(long, value_delimiter = ',')]
    pub dns_recursors: Option<Vec<SocketAddr>>,
    /// Log format: `text` or `json`.
    #[arg(long)]
    pub log_format: Option<String>,
    /// JSON logs (the same as `--log-format json`).
    #[arg(long, conflicts_with = "log_format")]
    pub log_json: bool,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` also works.
    #[arg(long)]
    pub log_level: Option<String>,
    /// Enforce ACL tokens on every API (Consul's `acl.enabled`).
    #[arg(long)]
    pub acl_enabled: bool,
    /// What a token may do where no rule says: `deny` (the default) or
    /// `allow`.
    #[arg(long, value_name = "allow|deny")]
    pub acl_default_policy: Option<String>,
    /// What tokens may do while this server has no leader:
    /// `extend-cache` (the default: keep using this server's copy of the
    /// ACL tables), `async-cache`, `allow` or `deny`.
    #[arg(long, value_name = "POLICY")]
    pub acl_down_policy: Option<String>,
    /// Bootstrap the ACLs on the first start of a fresh cluster and write
    /// the management token's SecretID to this file (mode 0600; it must
    /// not exist yet). Without it, run `meshctl acl bootstrap`.
    #[arg(long, value_name = "FILE")]
    pub acl_bootstrap_file: Option<PathBuf>,
    /// Run ACLs across servers without TLS between them. Anyone who can
    /// reach a server's Raft port can then forge writes (tokens included)
    /// or join the cluster: only for a network no one else is on.
    #[arg(long)]
    pub acl_allow_plaintext_raft: bool,
    /// A mesh leaf certificate's lifetime (e.g. `72h`, the default) for a
    /// new cluster's CA; change it later with
    /// `PUT /v1/connect/ca/configuration`.
    #[arg(long, value_name = "DURATION")]
    pub connect_leaf_cert_ttl: Option<String>,
    /// What sidecars do when no intention matches: `allow` (the default
    /// without ACLs) or `deny` (the default with ACLs on and default deny).
    #[arg(long, value_name = "allow|deny")]
    pub connect_default_intention: Option<String>,
}

/// A listen address, or off (`""`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

impl Listen {
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::Off => None,
            Listen::At(a) => Some(a),
        }
    }
}

fn parse_listen(text: &str) -> Result<Listen, String> {
    if text.trim().is_empty() {
        return Ok(Listen::Off);
    }
    text.parse()
        .map(Listen::At)
        .map_err(|_| format!("{text:?} is not IP:PORT (or \"\" for off)"))
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_listen(&text).map_err(serde::de::Error::custom)
    }
}

/// The `[connect]` table of the config file (the mesh CA and intentions).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectFile {
    pub enabled: Option<bool>,
    pub leaf_cert_ttl: Option<String>,
    pub default_intention: Option<String>,
}

/// The mesh CA and intention settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectSettings {
    /// Off: no CA is made, leaves are refused, and sidecars cannot serve
    /// their inbound listeners.
    pub enabled: bool,
    /// The first leader's CA configuration takes it.
    pub leaf_cert_ttl: Duration,
    pub default_intention_allow: bool,
}

/// Shortest leaf lifetime accepted (Consul's floor is an hour; a second
/// lets the renewal be tested under load).
pub const MIN_LEAF_TTL: Duration = Duration::from_secs(2);

/// The `[tls]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub verify_incoming: Option<bool>,
    pub verify_server_hostname: Option<bool>,
}

/// The `[acl]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclFile {
    pub enabled: Option<bool>,
    pub default_policy: Option<String>,
    pub down_policy: Option<String>,
    pub bootstrap_file: Option<PathBuf>,
    pub allow_plaintext_raft: Option<bool>,
    /// Consul's `acl.tokens`: `default` (requests without a token) and
    /// `dns` (what DNS answers may show).
    pub tokens: Option<AclTokensFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclTokensFile {
    pub default: Option<String>,
    pub dns: Option<String>,
}

/// The config file: the same settings as [`Cli`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<u64>,
    pub node_name: Option<String>,
    pub datacenter: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub http_addr: Option<Listen>,
    pub grpc_addr: Option<Listen>,
    pub https_addr: Option<Listen>,
    pub grpc_tls_addr: Option<Listen>,
    pub raft_addr: Option<SocketAddr>,
    pub advertise_addr: Option<String>,
    pub dns_addr: Option<SocketAddr>,
    pub peers: Option<Vec<String>>,
    pub join: Option<String>,
    pub snapshot_threshold: Option<u64>,
    pub snapshot_trailing_logs: Option<u64>,
    pub snapshot_interval_ms: Option<u64>,
    pub heartbeat_ms: Option<u64>,
    pub watch_heartbeat_ms: Option<u64>,
    pub election_timeout_ms: Option<u64>,
    pub leader_wait_ms: Option<u64>,
    pub tombstone_ttl_ms: Option<u64>,
    pub dns_domain: Option<String>,
    pub dns_node_ttl: Option<u32>,
    pub dns_service_ttl: Option<std::collections::BTreeMap<String, u32>>,
    pub dns_only_passing: Option<bool>,
    pub dns_a_record_limit: Option<usize>,
    pub dns_recursors: Option<Vec<SocketAddr>>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub acl: Option<AclFile>,
    pub tls: Option<TlsFile>,
    pub connect: Option<ConnectFile>,
}

const FILE_KEYS: &[&str] = &[
    "node_id",
    "node_name",
    "datacenter",
    "data_dir",
    "http_addr",
    "grpc_addr",
    "https_addr",
    "grpc_tls_addr",
    "raft_addr",
    "advertise_addr",
    "dns_addr",
    "peers",
    "join",
    "snapshot_threshold",
    "snapshot_trailing_logs",
    "snapshot_interval_ms",
    "heartbeat_ms",
    "watch_heartbeat_ms",
    "election_timeout_ms",
    "leader_wait_ms",
    "tombstone_ttl_ms",
    "dns_domain",
    "dns_node_ttl",
    "dns_service_ttl",
    "dns_only_passing",
    "dns_a_record_limit",
    "dns_recursors",
    "log_format",
    "log_level",
    "acl",
    "tls",
    "connect",
];

impl Cli {
    /// Whether a flag gives the setting that file key `key` names.
    fn sets(&self, key: &str) -> bool {
        match key {
            "node_id" => self.node_id.is_some(),
            "node_name" => self.node_name.is_some(),
            "datacenter" => self.datacenter.is_some(),
            "data_dir" => self.data_dir.is_some(),
            "http_addr" => self.http_addr.is_some(),
            "grpc_addr" => self.grpc_addr.is_some(),
            "https_addr" => self.https_addr.is_some(),
            "grpc_tls_addr" => self.grpc_tls_addr.is_some(),
            "raft_addr" => self.raft_addr.is_some(),
            "advertise_addr" => self.advertise_addr.is_some(),
            "dns_addr" => self.dns_addr.is_some(),
            "peers" => self.peers.is_some(),
            "join" => self.join.is_some(),
            "snapshot_threshold" => self.snapshot_threshold.is_some(),
            "snapshot_trailing_logs" => self.snapshot_trailing_logs.is_some(),
            "snapshot_interval_ms" => self.snapshot_interval_ms.is_some(),
            "heartbeat_ms" => self.heartbeat_ms.is_some(),
            "watch_heartbeat_ms" => self.watch_heartbeat_ms.is_some(),
            "election_timeout_ms" => self.election_timeout_ms.is_some(),
            "leader_wait_ms" => self.leader_wait_ms.is_some(),
            "tombstone_ttl_ms" => self.tombstone_ttl_ms.is_some(),
            "dns_domain" => self.dns_domain.is_some(),
            "dns_node_ttl" => self.dns_node_ttl.is_some(),
            "dns_service_ttl" => self.dns_service_ttl.is_some(),
            "dns_only_passing" => self.dns_only_passing,
            "dns_a_record_limit" => self.dns_a_record_limit.is_some(),
            "dns_recursors" => self.dns_recursors.is_some(),
            "log_format" => self.log_format.is_some() || self.log_json,
            "log_level" => self.log_level.is_some(),
            _ => false,
        }
    }
}

/// How a server comes into a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// Form a cluster of these servers (a single server in dev mode).
    Peers(Vec<(u64, String)>),
    /// Ask a running cluster, through this server, to add us.
    Join(String),
    /// Neither: restart from the data dir only.
    None,
}

/// Where the data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDir {
    Path(PathBuf),
    /// Dev mode: a temp dir removed at exit.
    Temporary,
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub dev: bool,
    pub node_id: u64,
    pub node_name: String,
    pub datacenter: String,
    pub data_dir: DataDir,
    /// `None`: that listener is off.
    pub http_addr: Option<SocketAddr>,
    pub grpc_addr: Option<SocketAddr>,
    pub https_addr: Option<SocketAddr>,
    pub grpc_tls_addr: Option<SocketAddr>,
    pub raft_addr: SocketAddr,
    pub advertise_addr: String,
    pub dns_addr: SocketAddr,
    pub bootstrap: Bootstrap,
    pub snapshot_threshold: u64,
    pub snapshot_trailing_logs: u64,
    pub snapshot_interval: Duration,
    pub heartbeat: Duration,
    pub election_timeout: Duration,
    pub leader_wait: Duration,
    /// KV tombstones older than this are reaped ([`crate::leader::gc`]).
    pub tombstone_ttl: Duration,
    pub dns: DnsSettings,
    pub watch: crate::watch::HubConfig,
    pub log_json: bool,
    pub log_level: Option<String>,
    pub acl: crate::auth::AclSettings,
    /// Where the first leader writes the management token it bootstraps.
    pub acl_bootstrap_file: Option<PathBuf>,
    /// TLS, when the CA, certificate and key are given.
    pub tls: Option<crate::tls::TlsSettings>,
    pub connect: ConnectSettings,
}

/// DNS settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Lower-case, with the trailing dot.
    pub domain: String,
    pub node_ttl: u32,
    pub service_ttl: std::collections::BTreeMap<String, u32>,
    pub only_passing: bool,
    pub a_record_limit: usize,
    pub recursors: Vec<SocketAddr>,
}

/// Every problem found in the configuration, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

impl Config {
    /// Raft's maximum election timeout, which openraft 0.9 also uses as
    /// the leader lease: how long a voter refuses votes after it last
    /// heard from a leader.
    pub fn election_timeout_max(&self) -> Duration {
        self.election_timeout * 2
    }

    /// Reads the file named by `--config` (if any) and merges the flags.
    pub fn load(cli: Cli) -> Result<Self, ConfigError> {
        let Some(path) = cli.config.clone() else {
            return Self::merge(cli, FileConfig::default());
        };
        let file = read_file(&path)?;
        // A bad value set in the file is reported with the file and line
        // that set it (a value a flag gave has neither).
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let from_flags: Vec<&str> = FILE_KEYS
            .iter()
            .copied()
            .filter(|key| cli.sets(key))
            .collect();
        Self::merge(cli, file).map_err(|ConfigError(errors)| {
            ConfigError(
                errors
                    .into_iter()
                    .map(|e| match e.split_once(": ") {
                        Some((key, _))
                            if FILE_KEYS.contains(&key) && !from_flags.contains(&key) =>
                        {
                            match line_of_key(&text, key) {
                                Some(line) => format!("{}: line {line}: {e}", path.display()),
                                None => e,
                            }
                        }
                        _ => e,
                    })
                    .collect(),
            )
        })
    }

    /// Merges flags over file settings over defaults, and validates.
    pub fn merge(cli: Cli, file: FileConfig) -> Result<Self, ConfigError> {
        let mut errors = Vec::new();
        let addr = |flag: Option<SocketAddr>, file: Option<SocketAddr>, default: &str| {
            flag.or(file).unwrap_or_else(|| {
                default
                    .parse()
                    .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
            })
        };
        let listen = |flag: Option<Listen>, file: Option<Listen>, default: &str| {
            flag.or(file)
                .unwrap_or_else(|| parse_listen(default).unwrap_or(Listen::Off))
                .addr()
        };
        let http_addr = listen(cli.http_addr, file.http_addr, defaults::HTTP_ADDR);
        let grpc_addr = listen(cli.grpc_addr, file.grpc_addr, defaults::GRPC_ADDR);
        let raft_addr = addr(cli.raft_addr, file.raft_addr, defaults::RAFT_ADDR);
        let dns_addr = addr(cli.dns_addr, file.dns_addr, defaults::DNS_ADDR);

        let node_id = cli.node_id.or(file.node_id).unwrap_or(1);
        if node_id == 0 {
            errors.push("node_id: must be at least 1".to_owned());
        }
        let peers_raw = cli.peers.or(file.peers).unwrap_or_default();
        let mut peers = Vec::new();
        for entry in peers_raw.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            match parse_peer(entry) {
                Ok(peer) => peers.push(peer),
                Err(e) => errors.push(format!("peers: {e}")),
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (id, _) in &peers {
            if !seen.insert(*id) {
                errors.push(format!("peers: node id {id} appears twice"));
            }
        }
        let join = cli.join.or(file.join);
        if let Some(j) = &join
            && let Err(e) = check_host_port(j)
        {
            errors.push(format!("join: {e}"));
        }
        if cli.dev && (!peers.is_empty() || join.is_some()) {
            errors
                .push("--dev runs a single server: it takes neither --peers nor --join".to_owned());
        }
        if !peers.is_empty() && join.is_some() {
            errors.push("--peers and --join exclude each other: --peers forms a new cluster, --join enters a running one".to_owned());
        }
        if !peers.is_empty() && !peers.iter().any(|(id, _)| *id == node_id) {
            errors.push(format!(
                "peers: this server's node id {node_id} is not in the list"
            ));
        }

        let advertise_addr = match cli.advertise_addr.or(file.advertise_addr) {
            Some(a) => a,
            None => match peers.iter().find(|(id, _)| *id == node_id) {
                Some((_, a)) => a.clone(),
                None => {
                    if raft_addr.ip().is_unspecified() {
                        errors.push(format!(
                            "advertise_addr: raft_addr {raft_addr} is not an address other servers can dial; set --advertise-addr"
                        ));
                    }
                    raft_addr.to_string()
                }
            },
        };

        let data_dir = match (cli.dev, cli.data_dir.or(file.data_dir)) {
            (_, Some(dir)) => DataDir::Path(dir),
            (true, None) => DataDir::Temporary,
            (false, None) => DataDir::Path(PathBuf::from(defaults::DATA_DIR)),
        };

        let snapshot_threshold = cli
            .snapshot_threshold
            .or(file.snapshot_threshold)
            .unwrap_or(defaults::SNAPSHOT_THRESHOLD);
        if snapshot_threshold == 0 {
            errors.push("snapshot_threshold: must be at least 1".to_owned());
        }
        let snapshot_trailing_logs = cli
            .snapshot_trailing_logs
            .or(file.snapshot_trailing_logs)
            .unwrap_or(defaults::SNAPSHOT_TRAILING_LOGS);
        let snapshot_interval_ms = cli
            .snapshot_interval_ms
            .or(file.snapshot_interval_ms)
            .unwrap_or(defaults::SNAPSHOT_INTERVAL_MS)
            .max(10);
        let watch_heartbeat_ms = cli
            .watch_heartbeat_ms
            .or(file.watch_heartbeat_ms)
            .unwrap_or(defaults::WATCH_HEARTBEAT_MS);
        if watch_heartbeat_ms == 0 {
            errors.push("watch_heartbeat_ms: must be at least 1".to_owned());
        }
        let tombstone_ttl_ms = cli
            .tombstone_ttl_ms
            .or(file.tombstone_ttl_ms)
            .unwrap_or(crate::leader::gc::DEFAULT_TTL.as_millis() as u64);
        if tombstone_ttl_ms < 100 {
            errors.push("tombstone_ttl_ms: must be at least 100".to_owned());
        }
        let heartbeat_ms = cli
            .heartbeat_ms
            .or(file.heartbeat_ms)
            .unwrap_or(defaults::HEARTBEAT_MS);
        let election_ms = cli
            .election_timeout_ms
            .or(file.election_timeout_ms)
            .unwrap_or(defaults::ELECTION_TIMEOUT_MS);
        if heartbeat_ms == 0 || election_ms <= heartbeat_ms {
            errors.push(format!(
                "election_timeout_ms ({election_ms}) must be greater than heartbeat_ms ({heartbeat_ms}), which must be at least 1"
            ));
        }
        let leader_wait_ms = cli
            .leader_wait_ms
            .or(file.leader_wait_ms)
            .unwrap_or(defaults::LEADER_WAIT_MS);
        let mut domain = cli
            .dns_domain
            .or(file.dns_domain)
            .unwrap_or_else(|| "mesh.".to_owned())
            .to_ascii_lowercase();
        if !domain.ends_with('.') {
            domain.push('.');
        }
        let domain_ok = domain.len() > 1
            && domain.len() <= 200
            && domain.trim_end_matches('.').split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !domain_ok {
            errors.push(format!("dns_domain: {domain:?} is not a valid domain name"));
        }
        let mut service_ttl = file.dns_service_ttl.unwrap_or_default();
        for entry in cli.dns_service_ttl.unwrap_or_default() {
            match entry
                .split_once('=')
                .map(|(n, t)| (n.trim(), t.trim().parse::<u32>()))
            {
                Some((name, Ok(ttl))) if !name.is_empty() => {
                    service_ttl.insert(name.to_owned(), ttl);
                }
                _ => errors.push(format!("dns_service_ttl: {entry:?} is not NAME=SECONDS")),
            }
        }
        let dns = DnsSettings {
            domain,
            node_ttl: cli.dns_node_ttl.or(file.dns_node_ttl).unwrap_or(0),
            service_ttl,
            only_passing: cli.dns_only_passing || file.dns_only_passing.unwrap_or(false),
            a_record_limit: cli
                .dns_a_record_limit
                .or(file.dns_a_record_limit)
                .unwrap_or(0),
            recursors: cli.dns_recursors.or(file.dns_recursors).unwrap_or_default(),
        };
        let log_format = match cli.log_json {
            true => Some("json".to_owned()),
            false => cli.log_format.or(file.log_format),
        };
        let log_json = match log_format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                errors.push(format!(
                    "log_format: {other:?} is neither \"text\" nor \"json\""
                ));
                false
            }
        };
        let log_level = cli.log_level.or(file.log_level);
        if let Some(level) = &log_level
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(
                meshwork_core::log_level::within_build(level).0,
            )
        {
            errors.push(format!(
                "log_level: {level:?} is not a valid filter ({e}); e.g. \"info\" or \"warn,meshwork_registry=debug\""
            ));
        }
        let datacenter = cli
            .datacenter
            .or(file.datacenter)
            .unwrap_or_else(|| defaults::DATACENTER.to_owned());
        let tls_file = file.tls.unwrap_or_default();
        let tls = match (
            cli.tls_ca.or(tls_file.ca_file),
            cli.tls_cert.or(tls_file.cert_file),
            cli.tls_key.or(tls_file.key_file),
        ) {
            (None, None, None) => None,
            (Some(ca_file), Some(cert_file), Some(key_file)) => Some(crate::tls::TlsSettings {
                ca_file,
                cert_file,
                key_file,
                verify_incoming: cli.tls_verify_incoming
                    || tls_file.verify_incoming.unwrap_or(false),
                verify_server_hostname: cli.tls_verify_server_hostname
                    || tls_file.verify_server_hostname.unwrap_or(false),
                server_name: format!("server.{}.meshwork", datacenter.to_ascii_lowercase()),
            }),
            _ => {
                errors.push(
                    "tls: give the CA, the certificate and the key together (--tls-ca, --tls-cert, --tls-key)"
                        .to_owned(),
                );
                None
            }
        };
        let tls_only = |flag: Option<Listen>,
                        file: Option<Listen>,
                        beside: Option<SocketAddr>,
                        port: u16,
                        name: &str,
                        errors: &mut Vec<String>| {
            match (flag.or(file), &tls) {
                (Some(Listen::At(_)), None) => {
                    errors.push(format!(
                        "{name}: needs TLS (--tls-ca, --tls-cert, --tls-key)"
                    ));
                    None
                }
                (Some(l), Some(_)) => l.addr(),
                (None, Some(_)) => Some(SocketAddr::new(
                    beside.map_or(std::net::IpAddr::from([127, 0, 0, 1]), |a| a.ip()),
                    port,
                )),
                (_, None) => None,
            }
        };
        let https_addr = tls_only(
            cli.https_addr,
            file.https_addr,
            http_addr,
            8501,
            "https_addr",
            &mut errors,
        );
        let grpc_tls_addr = tls_only(
            cli.grpc_tls_addr,
            file.grpc_tls_addr,
            grpc_addr,
            8503,
            "grpc_tls_addr",
            &mut errors,
        );
        if http_addr.is_none() && https_addr.is_none() {
            errors.push(
                "http_addr and https_addr are both off: the REST API would be unreachable"
                    .to_owned(),
            );
        }
        let acl_file = file.acl.unwrap_or_default();
        let acl_tokens = acl_file.tokens.unwrap_or_default();
        let mut acl = crate::auth::AclSettings::disabled(&datacenter);
        acl.enabled = cli.acl_enabled || acl_file.enabled.unwrap_or(false);
        match cli
            .acl_default_policy
            .or(acl_file.default_policy)
            .as_deref()
        {
            None | Some("deny") => acl.default_policy = crate::auth::Fallback::Deny,
            Some("allow") => acl.default_policy = crate::auth::Fallback::Allow,
            Some(other) => errors.push(format!(
                "acl.default_policy: {other:?} is neither \"allow\" nor \"deny\""
            )),
        }
        if let Some(text) = cli.acl_down_policy.or(acl_file.down_policy) {
            match crate::auth::DownPolicy::parse(&text) {
                Some(policy) => acl.down_policy = policy,
                None => errors.push(format!(
                    "acl.down_policy: {text:?} is not one of extend-cache, async-cache, allow, deny"
                )),
            }
        }
        acl.default_token = acl_tokens
            .default
            .filter(|t| !t.is_empty())
            .map(crate::auth::Secret::new);
        acl.dns_token = acl_tokens
            .dns
            .filter(|t| !t.is_empty())
            .map(crate::auth::Secret::new);
        // A minute without a leader, as Consul's token_ttl of 30 s doubled:
        // a normal election never reaches it.
        acl.down_after = Duration::from_secs(60);
        let acl_bootstrap_file = cli.acl_bootstrap_file.or(acl_file.bootstrap_file);
        if acl_bootstrap_file.is_some() && !acl.enabled {
            errors
                .push("acl.bootstrap_file: set only with ACLs enabled (--acl-enabled)".to_owned());
        }

        let connect_file = file.connect.unwrap_or_default();
        let leaf_cert_ttl = match cli
            .connect_leaf_cert_ttl
            .or(connect_file.leaf_cert_ttl)
            .as_deref()
            .map(meshwork_core::duration::parse_duration)
        {
            None => Duration::from_secs(72 * 3600),
            Some(Some(ttl)) if ttl >= MIN_LEAF_TTL => ttl,
            Some(Some(ttl)) => {
                errors.push(format!(
                    "connect.leaf_cert_ttl: {ttl:?} is shorter than {MIN_LEAF_TTL:?}"
                ));
                MIN_LEAF_TTL
            }
            Some(None) => {
                errors.push(
                    "connect.leaf_cert_ttl: not a duration (e.g. \"72h\", \"30m\")".to_owned(),
                );
                MIN_LEAF_TTL
            }
        };
        let default_intention_allow = match cli
            .connect_default_intention
            .or(connect_file.default_intention)
            .as_deref()
        {
            // As Consul: the ACL default policy decides.
            None => !(acl.enabled && acl.default_policy == crate::auth::Fallback::Deny),
            Some("allow") => true,
            Some("deny") => false,
            Some(other) => {
                errors.push(format!(
                    "connect.default_intention: {other:?} is neither \"allow\" nor \"deny\""
                ));
                false
            }
        };
        let connect = ConnectSettings {
            enabled: connect_file.enabled.unwrap_or(true),
            leaf_cert_ttl,
            default_intention_allow,
        };

        // ACLs guard the APIs; between servers only TLS does. Without it
        // the Raft port takes forged writes from anyone who reaches it, so
        // a cluster reachable beyond this host must say it accepts that.
        let allow_plaintext_raft =
            cli.acl_allow_plaintext_raft || acl_file.allow_plaintext_raft.unwrap_or(false);
        let several_servers = peers.len() > 1 || join.is_some() || !raft_addr.ip().is_loopback();
        if acl.enabled && tls.is_none() && several_servers && !allow_plaintext_raft && !cli.dev {
            errors.push(
                "acl: ACLs without TLS between servers protect nothing from whoever reaches the Raft port \
                 (they could forge writes, tokens included, or join the cluster): give --tls-ca, --tls-cert and \
                 --tls-key (meshctl tls ca create / cert create --server), or --acl-allow-plaintext-raft for a \
                 network no one else is on"
                    .to_owned(),
            );
        }

        if !errors.is_empty() {
            return Err(ConfigError(errors));
        }
        let bootstrap = if cli.dev {
            Bootstrap::Peers(vec![(node_id, advertise_addr.clone())])
        } else if let Some(join) = join {
            Bootstrap::Join(join)
        } else if !peers.is_empty() {
            Bootstrap::Peers(peers)
        } else {
            Bootstrap::None
        };
        Ok(Config {
            dev: cli.dev,
            node_id,
            node_name: cli
                .node_name
                .or(file.node_name)
                .unwrap_or_else(|| format!("meshwork-{node_id}")),
            datacenter,
            data_dir,
            http_addr,
            grpc_addr,
            https_addr,
            grpc_tls_addr,
            raft_addr,
            advertise_addr,
            dns_addr,
            bootstrap,
            snapshot_threshold,
            snapshot_trailing_logs,
            snapshot_interval: Duration::from_millis(snapshot_interval_ms),
            heartbeat: Duration::from_millis(heartbeat_ms),
            election_timeout: Duration::from_millis(election_ms),
            leader_wait: Duration::from_millis(leader_wait_ms),
            tombstone_ttl: Duration::from_millis(tombstone_ttl_ms),
            dns,
            watch: crate::watch::HubConfig {
                heartbeat: Duration::from_millis(watch_heartbeat_ms),
                ..Default::default()
            },
            log_json,
            log_level,
            acl,
            connect,
            acl_bootstrap_file,
            tls,
        })
    }
}

fn parse_peer(entry: &str) -> Result<(u64, String), String> {
    let (id, addr) = entry
        .split_once('@')
        .ok_or_else(|| format!("{entry:?} is not ID@HOST:PORT"))?;
    let id: u64 = id
        .parse()
        .map_err(|_| format!("{entry:?}: node id {id:?} is not a positive integer"))?;
    if id == 0 {
        return Err(format!("{entry:?}: node ids start at 1"));
    }
    check_host_port(addr).map_err(|e| format!("{entry:?}: {e}"))?;
    Ok((id, addr.to_owned()))
}

fn check_host_port(addr: &str) -> Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} has no port (HOST:PORT)"))?;
    if host.is_empty() {
        return Err(format!("{addr:?} has no host"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("{addr:?}: port {port:?} is not a number from 0 to 65535"))?;
    Ok(())
}

/// Reads and checks a TOML config file.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(vec![format!(
            "cannot read config file {}: {e}",
            path.display()
        )])
    })?;
    parse_file(&text).map_err(|ConfigError(errors)| {
        ConfigError(
            errors
                .into_iter()
                .map(|e| format!("{}: {e}", path.display()))
                .collect(),
        )
    })
}

/// Parses config file text, reporting every unknown key with its line.
pub fn parse_file(text: &str) -> Result<FileConfig, ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError(vec![toml_error(text, &e)]))?;
    let mut unknown: Vec<(usize, String)> = table
        .keys()
        .filter(|k| !FILE_KEYS.contains(&k.as_str()))
        .map(|k| match line_of_key(text, k) {
            Some(line) => (line, format!("line {line}: unknown key `{k}`")),
            None => (usize::MAX, format!("unknown key `{k}`")),
        })
        .collect();
    unknown.sort();
    let unknown: Vec<String> = unknown.into_iter().map(|(_, message)| message).collect();
    if !unknown.is_empty() {
        return Err(ConfigError(unknown));
    }
    toml::from_str(text).map_err(|e: toml::de::Error| ConfigError(vec![toml_error(text, &e)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_all_reported_with_lines() {
        let text = "node_id = 2\nbogus = 1\nhttp_addr = \"127.0.0.1:1\"\nalso_bad = \"x\"\n";
        let err = parse_file(text).expect_err("must fail");
        assert_eq!(
            err.0,
            [
                "line 2: unknown key `bogus`",
                "line 4: unknown key `also_bad`"
            ]
        );
    }

    #[test]
    fn type_errors_name_the_line() {
        let err = parse_file("node_id = \"one\"\n").expect_err("must fail");
        assert!(err.0[0].contains("line 1"), "{err}");
    }

    #[test]
    fn flags_win_over_file_and_peers_give_advertise() {
        let file = parse_file("node_id = 2\npeers = [\"1@127.0.0.1:9001\", \"2@127.0.0.1:9002\"]\ndata_dir = \"/x\"\n")
            .expect("parse");
        let cli = Cli {
            data_dir: Some("/y".into()),
            ..Cli::default()
        };
        let config = Config::merge(cli, file).expect("valid");
        assert_eq!(config.node_id, 2);
        assert_eq!(config.advertise_addr, "127.0.0.1:9002");
        assert_eq!(config.data_dir, DataDir::Path("/y".into()));
        assert!(matches!(config.bootstrap, Bootstrap::Peers(ref p) if p.len() == 2));
    }

    #[test]
    fn every_problem_is_reported() {
        let cli = Cli {
            node_id: Some(4),
            peers: Some(vec!["1@a:1".into(), "x@b:2".into(), "1@c:notaport".into()]),
            join: Some("nohost".into()),
            log_format: Some("yaml".into()),
            ..Cli::default()
        };
        let err = Config::merge(cli, FileConfig::default()).expect_err("invalid");
        assert!(err.0.len() >= 5, "{err}");
    }

    #[test]
    fn dev_is_a_single_server_cluster() {
        let cli = Cli {
            dev: true,
            ..Cli::default()
        };
        let config = Config::merge(cli, FileConfig::default()).expect("valid");
        assert_eq!(config.data_dir, DataDir::Temporary);
        assert_eq!(
            config.bootstrap,
            Bootstrap::Peers(vec![(1, "127.0.0.1:8300".into())])
        );
    }
}
