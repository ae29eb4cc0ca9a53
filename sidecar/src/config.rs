//! `meshwork-sidecar --config FILE`: the TOML file, validated. Unknown keys
//! and type errors name the file, line and key; a bad file exits with 64
//! (EX_USAGE).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshwork_core::config_file::toml_error;
use meshwork_core::duration::parse_duration;
use serde::Deserialize;

pub mod edge;
mod traffic;

pub use traffic::{
    Balance, DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, Explicit, HostRoute, Inbound,
    InboundExplicit, Limits, MAX_EJECTION, NO_REQUEST_TIMEOUT, OutlierPolicy, Protocol,
    ProxySettings, RetryOn, RetryPolicy, Upstream, gateway_upstream,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    registry: RegistrySection,
    service: Option<ServiceSection>,
    /// Gateway mode, instead of `[service]`, `[inbound]` and `[[upstreams]]`.
    gateway: Option<GatewaySection>,
    #[serde(default)]
    admin: AdminSection,
    #[serde(default)]
    session: SessionSection,
    inbound: Option<InboundSection>,
    #[serde(default)]
    upstreams: Vec<UpstreamSection>,
    #[serde(default)]
    proxy: ProxySection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InboundSection {
    listen: Option<String>,
    protocol: Option<String>,
    /// Where the local app listens; default `service.address:service.port`.
    app: Option<String>,
    /// Client connections open on the inbound listener at once.
    max_connections: Option<u32>,
    /// Connecting to the app; default 5 s.
    connect_timeout: Option<String>,
    /// A request to the app (HTTP), answer included; default none (the
    /// caller's sidecar has its own).
    request_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamSection {
    name: String,
    listen: String,
    protocol: Option<String>,
    tag: Option<String>,
    balance: Option<String>,
    /// `ring_hash` only: the request header hashed (HTTP); without it the
    /// client's IP address is hashed.
    hash_header: Option<String>,
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    idle_timeout: Option<String>,
    retries: Option<RetriesSection>,
    outlier: Option<OutlierSection>,
    limits: Option<LimitsSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetriesSection {
    attempts: Option<u32>,
    on: Option<Vec<String>>,
    budget_percent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutlierSection {
    consecutive_5xx: Option<u32>,
    base_ejection: Option<String>,
    max_ejection_percent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    max_connections: Option<u32>,
    max_pending: Option<u32>,
    max_requests: Option<u32>,
    /// Client connections open on the listener at once.
    max_downstream_connections: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ProxySection {
    /// How long in-flight requests may finish after SIGTERM.
    drain: Option<String>,
    /// One JSON line per request or connection on stdout.
    access_log: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistrySection {
    addresses: Vec<String>,
    /// The ACL token for registration and watches (its SecretID).
    #[serde(default)]
    token: Option<String>,
    /// A file holding the token instead (kept out of the config file).
    #[serde(default)]
    token_file: Option<PathBuf>,
    /// Reach the registry's gRPC TLS port (8503) over TLS.
    #[serde(default)]
    tls: bool,
    /// The CA the registry's certificate must chain to.
    #[serde(default)]
    ca_file: Option<PathBuf>,
    /// A client certificate and key, for a registry with verify_incoming.
    #[serde(default)]
    cert_file: Option<PathBuf>,
    #[serde(default)]
    key_file: Option<PathBuf>,
    /// The name the registry's certificate must carry (default
    /// `server.dc1.meshwork`).
    #[serde(default)]
    server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSection {
    name: String,
    id: Option<String>,
    address: Option<String>,
    port: u32,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
    #[serde(default)]
    checks: Vec<CheckSection>,
}

/// `[gateway]`: the sidecar as an ingress gateway.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewaySection {
    /// Its service name; its listeners come from the `ingress-gateway`
    /// entry of this name.
    name: String,
    id: Option<String>,
    /// The address the listeners bind (default all: `0.0.0.0`).
    address: Option<String>,
    /// The port registered for it (what DNS and the catalog tell
    /// clients); default 443.
    port: Option<u32>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
    /// What its TLS listeners present, picked by the name the client asks
    /// for (SNI).
    #[serde(default)]
    certificates: Vec<CertificateSection>,
    /// Proxies in front of the gateway whose `X-Forwarded-For` entries
    /// are believed (default 0: only the peer's address).
    trusted_hops: Option<u8>,
    /// Address blocks of those proxies: only a peer (then an entry) within
    /// them is believed (default: any).
    #[serde(default)]
    trusted_proxies: Vec<String>,
    /// Keys a listener with `APIKeys` accepts.
    #[serde(default)]
    api_keys: Vec<ApiKeySection>,
}

/// `[[gateway.api_keys]]`: a client's name and the SHA-256 (hex) of its
/// key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeySection {
    name: String,
    sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateSection {
    hosts: Vec<String>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckSection {
    id: Option<String>,
    name: Option<String>,
    http: Option<String>,
    tcp: Option<String>,
    grpc: Option<String>,
    ttl: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    deregister_critical_after: Option<String>,
    success_before_passing: Option<u32>,
    failures_before_critical: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AdminSection {
    listen: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SessionSection {
    node: Option<String>,
    ttl: Option<String>,
    deregister_critical_after: Option<String>,
}

/// What a check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Http(String),
    Tcp(String),
    /// `HOST:PORT` and the service name to ask about ("" = the server).
    Grpc(String, String),
    /// Passing while the app reports in time through the admin API.
    Ttl(Duration),
}

impl Probe {
    pub fn target(&self) -> String {
        match self {
            Probe::Http(url) => url.clone(),
            Probe::Tcp(addr) => format!("tcp://{addr}"),
            Probe::Grpc(addr, service) if service.is_empty() => format!("grpc://{addr}"),
            Probe::Grpc(addr, service) => format!("grpc://{addr}/{service}"),
            Probe::Ttl(ttl) => format!("ttl {}ms", ttl.as_millis()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Check {
    pub id: String,
    pub name: String,
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub deregister_critical_after: Option<Duration>,
    pub success_before_passing: u32,
    pub failures_before_critical: u32,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub registry: Vec<String>,
    /// The ACL token sent with every registry call.
    pub registry_token: crate::RegistryAccess,
    pub node: String,
    pub node_address: String,
    pub service_name: String,
    pub service_id: String,
    pub service_address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub checks: Vec<Check>,
    pub admin: SocketAddr,
    pub session_ttl: Duration,
    pub deregister_critical_after: Option<Duration>,
    /// The inbound listener in front of the app, when the file has `[inbound]`.
    pub inbound: Option<Inbound>,
    /// One outbound listener each.
    pub upstreams: Vec<Upstream>,
    /// Gateway mode: the listeners come from its `ingress-gateway` entry
    /// (`crate::gateway`), the service registers as `ingress-gateway`.
    pub gateway: Option<Gateway>,
    pub proxy: ProxySettings,
    /// The first 16 hex digits of the file's SHA-256: which file is in use
    /// (reported to the registry; it says nothing of the file's secrets).
    pub digest: String,
}

/// `[gateway]`, validated.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// The `ingress-gateway` entry it follows (its service name).
    pub name: String,
    /// Where its listeners bind.
    pub bind: std::net::IpAddr,
    /// Its certificates, read (`None`: none configured; a listener with
    /// TLS is then not opened).
    pub tls: Option<crate::tls::edge::EdgeTls>,
    /// The certificate files (watched for changes).
    pub certificates: Vec<crate::tls::edge::EdgeCert>,
    /// `X-Forwarded-For` entries believed (proxies in front of it).
    pub trusted_hops: u8,
    pub trusted_proxies: std::sync::Arc<Vec<edge::Cidr>>,
    pub api_keys: std::sync::Arc<Vec<edge::ApiKey>>,
}

/// A configuration error: one line per problem, each naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// `<file>: <path>: why` as `<file>: line N: <path>: why`, when the
/// path's line can be found (not for a value left to its default).
fn with_line(file: &str, text: &str, error: String) -> String {
    let Some(rest) = error.strip_prefix(file).and_then(|r| r.strip_prefix(": ")) else {
        return error;
    };
    let Some((path, _)) = rest.split_once(": ") else {
        return error;
    };
    if path.contains(' ') {
        return error;
    }
    match meshwork_core::config_file::line_of_path(text, path) {
        Some(line) => format!("{file}: line {line}: {rest}"),
        None => error,
    }
}

fn duration(
    file: &str,
    key: &str,
    text: Option<&str>,
    default: Duration,
) -> Result<Duration, String> {
    match text {
        None => Ok(default),
        Some(t) => parse_duration(t).filter(|d| !d.is_zero()).ok_or_else(|| {
            format!("{file}: {key}: {t:?} is not a duration like \"5s\" or \"250ms\"")
        }),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The address this host reaches `peer` from (a UDP "connect" sends
/// nothing; it only picks the route).
fn primary_address(peer: &str) -> Option<String> {
    use std::net::ToSocketAddrs;
    let target = peer.to_socket_addrs().ok()?.next()?;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip().to_string())
}

/// The first 16 hex digits of `text`'s SHA-256.
fn digest(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file_name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{file_name}: cannot read: {e}")))?;
        Self::parse(&file_name, &text)
    }

    pub fn parse(file_name: &str, text: &str) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text)
            .map_err(|e| ConfigError(format!("{file_name}: {}", toml_error(text, &e))))?;
        let mut errors = Vec::new();
        let f = file_name;
        if file.registry.addresses.is_empty() {
            errors.push(format!("{f}: registry.addresses: list at least one registry server (HOST:PORT of its gRPC port)"));
        }
        for a in &file.registry.addresses {
            if a.rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
            {
                errors.push(format!("{f}: registry.addresses: {a:?} is not HOST:PORT"));
            }
        }
        let registry_token = match (file.registry.token.as_deref(), &file.registry.token_file) {
            (Some(_), Some(_)) => {
                errors.push(format!(
                    "{f}: registry.token_file: give the token or a token_file, not both"
                ));
                crate::RegistryAccess::default()
            }
            (Some(secret), None) => crate::RegistryAccess::new(secret).unwrap_or_else(|e| {
                errors.push(format!("{f}: registry.token: {e}"));
                crate::RegistryAccess::default()
            }),
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(text) => crate::RegistryAccess::new(&text).unwrap_or_else(|e| {
                    errors.push(format!("{f}: registry.token_file: {}: {e}", path.display()));
                    crate::RegistryAccess::default()
                }),
                Err(e) => {
                    errors.push(format!(
                        "{f}: registry.token_file: cannot read {}: {e}",
                        path.display()
                    ));
                    crate::RegistryAccess::default()
                }
            },
            (None, None) => crate::RegistryAccess::default(),
        };
        let registry = &file.registry;
        let registry_tls = match (registry.tls, &registry.ca_file) {
            (false, None) if registry.cert_file.is_none() && registry.key_file.is_none() => None,
            (false, _) => {
                errors.push(format!(
                    "{f}: registry.tls: ca_file, cert_file and key_file are used only with tls = true"
                ));
                None
            }
            (true, None) => {
                errors.push(format!(
                    "{f}: registry.ca_file: tls = true needs the CA the registry's certificate chains to"
                ));
                None
            }
            (true, Some(ca)) => {
                let client = match (&registry.cert_file, &registry.key_file) {
                    (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                    (None, None) => None,
                    _ => {
                        errors.push(format!(
                            "{f}: registry.cert_file: give cert_file and key_file together"
                        ));
                        None
                    }
                };
                let settings = crate::tls::RegistryTlsSettings {
                    ca_file: ca.clone(),
                    client,
                    server_name: registry
                        .server_name
                        .clone()
                        .unwrap_or_else(|| "server.dc1.meshwork".to_owned()),
                };
                match crate::tls::RegistryTls::load(settings) {
                    Ok(tls) => Some(std::sync::Arc::new(tls)),
                    Err(e) => {
                        errors.push(format!("{f}: registry.tls: {e}"));
                        None
                    }
                }
            }
        };
        let registry_token = registry_token.with_tls(registry_tls);
        let (service, gateway) = match (file.service, file.gateway) {
            (Some(service), None) => (service, None),
            (None, Some(g)) => {
                if file.inbound.is_some() || !file.upstreams.is_empty() {
                    errors.push(format!(
                        "{f}: gateway: a gateway's listeners come from its ingress-gateway entry: remove [inbound] and [[upstreams]]"
                    ));
                }
                let bind = match g.address.as_deref().unwrap_or("0.0.0.0").parse() {
                    Ok(ip) => ip,
                    Err(_) => {
                        errors.push(format!(
                            "{f}: gateway.address: {:?} is not an IP address",
                            g.address.as_deref().unwrap_or_default()
                        ));
                        std::net::IpAddr::from([0, 0, 0, 0])
                    }
                };
                let mut certs = Vec::new();
                for (i, c) in g.certificates.iter().enumerate() {
                    let at = format!("{f}: gateway.certificates[{i}]");
                    if c.hosts.is_empty() {
                        errors.push(format!("{at}.hosts: list the host names it is for"));
                    }
                    let mut hosts = Vec::new();
                    for h in &c.hosts {
                        let h = h.to_ascii_lowercase();
                        let name = h.strip_prefix("*.").unwrap_or(&h);
                        if name.is_empty()
                            || name.contains('*')
                            || !name.split('.').all(|l| {
                                !l.is_empty()
                                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                            })
                        {
                            errors.push(format!(
                                "{at}.hosts: {h:?} is not a host name (a leading \"*.\" for a wildcard)"
                            ));
                        }
                        hosts.push(h);
                    }
                    certs.push(crate::tls::edge::EdgeCert {
                        hosts,
                        cert_file: c.cert_file.clone(),
                        key_file: c.key_file.clone(),
                    });
                }
                let tls = if certs.is_empty() {
                    None
                } else {
                    match crate::tls::edge::EdgeTls::load(&certs) {
                        Ok(tls) => Some(tls),
                        Err(e) => {
                            errors.push(format!("{f}: gateway.certificates: {e}"));
                            None
                        }
                    }
                };
                let mut api_keys: Vec<edge::ApiKey> = Vec::new();
                for (i, k) in g.api_keys.iter().enumerate() {
                    let at = format!("{f}: gateway.api_keys[{i}]");
                    let hex = k.sha256.trim().to_ascii_lowercase();
                    let mut sha256 = [0u8; 32];
                    let ok = hex.len() == 64
                        && hex.is_ascii()
                        && sha256.iter_mut().enumerate().all(|(j, byte)| {
                            u8::from_str_radix(&hex[2 * j..2 * j + 2], 16)
                                .map(|b| *byte = b)
                                .is_ok()
                        });
                    if !ok {
                        errors.push(format!(
                            "{at}.sha256: the SHA-256 of the key as 64 hex digits (printf %s \"$KEY\" | sha256sum); the key itself never goes in the file"
                        ));
                    }
                    if k.name.is_empty() || api_keys.iter().any(|o| o.name == k.name) {
                        errors.push(format!("{at}.name: a name of its own is required"));
                    }
                    if api_keys.iter().any(|o| o.sha256 == sha256) {
                        errors.push(format!("{at}.sha256: the same key as another entry"));
                    }
                    api_keys.push(edge::ApiKey {
                        name: k.name.clone(),
                        sha256,
                    });
                }
                let mut proxies = Vec::new();
                for (i, p) in g.trusted_proxies.iter().enumerate() {
                    match edge::Cidr::parse(p) {
                        Ok(c) => proxies.push(c),
                        Err(e) => errors.push(format!("{f}: gateway.trusted_proxies[{i}]: {e}")),
                    }
                }
                if !proxies.is_empty() && g.trusted_hops.unwrap_or(0) == 0 {
                    errors.push(format!(
                        "{f}: gateway.trusted_proxies: set trusted_hops too (how many of them are in front)"
                    ));
                }
                let gateway = Gateway {
                    name: g.name.clone(),
                    bind,
                    tls,
                    certificates: certs,
                    trusted_hops: g.trusted_hops.unwrap_or(0),
                    trusted_proxies: std::sync::Arc::new(proxies),
                    api_keys: std::sync::Arc::new(api_keys),
                };
                let service = ServiceSection {
                    id: Some(g.id.unwrap_or_else(|| g.name.clone())),
                    name: g.name,
                    address: None,
                    port: g.port.unwrap_or(443),
                    tags: g.tags,
                    meta: g.meta,
                    checks: Vec::new(),
                };
                (service, Some(gateway))
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError(format!(
                    "{f}: gateway: give [service] (a sidecar) or [gateway] (a gateway), not both"
                )));
            }
            (None, None) => {
                return Err(ConfigError(format!(
                    "{f}: service: the [service] table is required (or [gateway] for a gateway)"
                )));
            }
        };
        if service.name.trim().is_empty() {
            errors.push(format!("{f}: service.name: must not be empty"));
        }
        let port = match u16::try_from(service.port) {
            Ok(p) if p > 0 => p,
            _ => {
                errors.push(format!(
                    "{f}: service.port: {} is not a port (1-65535)",
                    service.port
                ));
                0
            }
        };
        let node = file.session.node.unwrap_or_else(hostname);
        let service_id = service
            .id
            .unwrap_or_else(|| format!("{}-{node}", service.name));
        let mut checks = Vec::new();
        for (i, c) in service.checks.into_iter().enumerate() {
            let key = format!("service.checks[{i}]");
            let probe = match (&c.http, &c.tcp, &c.grpc, &c.ttl) {
                (Some(url), None, None, None) => {
                    if !url.starts_with("http://") {
                        errors.push(format!("{f}: {key}.http: {url:?} must start with http:// (https checks are not supported yet)"));
                    }
                    Probe::Http(url.clone())
                }
                (None, Some(addr), None, None) => Probe::Tcp(addr.clone()),
                (None, None, Some(target), None) => {
                    // Consul's form: HOST:PORT or HOST:PORT/service.
                    let (addr, service) = target.split_once('/').unwrap_or((target.as_str(), ""));
                    if addr
                        .rsplit_once(':')
                        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
                    {
                        errors.push(format!(
                            "{f}: {key}.grpc: {target:?} is not HOST:PORT or HOST:PORT/service"
                        ));
                    }
                    Probe::Grpc(addr.to_owned(), service.to_owned())
                }
                (None, None, None, Some(ttl)) => {
                    match duration(f, &format!("{key}.ttl"), Some(ttl), Duration::ZERO) {
                        Ok(ttl) => Probe::Ttl(ttl),
                        Err(e) => {
                            errors.push(e);
                            continue;
                        }
                    }
                }
                _ => {
                    errors.push(format!(
                        "{f}: {key}: set exactly one of http, tcp, grpc, ttl"
                    ));
                    continue;
                }
            };
            let parsed = (|| -> Result<Check, String> {
                Ok(Check {
                    id: c
                        .id
                        .clone()
                        .unwrap_or_else(|| format!("{service_id}:check-{}", i + 1)),
                    name: c
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("{} check {}", service.name, i + 1)),
                    interval: duration(
                        f,
                        &format!("{key}.interval"),
                        c.interval.as_deref(),
                        Duration::from_secs(10),
                    )?,
                    timeout: duration(
                        f,
                        &format!("{key}.timeout"),
                        c.timeout.as_deref(),
                        Duration::from_secs(1),
                    )?,
                    deregister_critical_after: c
                        .deregister_critical_after
                        .as_deref()
                        .map(|t| {
                            duration(
                                f,
                                &format!("{key}.deregister_critical_after"),
                                Some(t),
                                Duration::ZERO,
                            )
                        })
                        .transpose()?,
                    success_before_passing: c.success_before_passing.unwrap_or(1).max(1),
                    failures_before_critical: c.failures_before_critical.unwrap_or(1).max(1),
                    probe,
                })
            })();
            match parsed {
                Ok(check) => checks.push(check),
                Err(e) => errors.push(e),
            }
        }
        let admin = file
            .admin
            .listen
            .unwrap_or_else(|| "127.0.0.1:19000".into());
        let admin = match admin.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                errors.push(format!("{f}: admin.listen: {admin:?} is not IP:PORT"));
                SocketAddr::from(([127, 0, 0, 1], 19000))
            }
        };
        let session_ttl = match duration(
            f,
            "session.ttl",
            file.session.ttl.as_deref(),
            Duration::from_secs(15),
        ) {
            Ok(d) => d,
            Err(e) => {
                errors.push(e);
                Duration::from_secs(15)
            }
        };
        let deregister_critical_after = match file.session.deregister_critical_after.as_deref() {
            None => None,
            Some(t) => match duration(
                f,
                "session.deregister_critical_after",
                Some(t),
                Duration::ZERO,
            ) {
                Ok(d) => Some(d),
                Err(e) => {
                    errors.push(e);
                    None
                }
            },
        };
        let app_default = format!(
            "{}:{port}",
            service.address.as_deref().unwrap_or("127.0.0.1")
        )
        .parse::<SocketAddr>()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], port)));
        let inbound = file
            .inbound
            .map(|raw| traffic::inbound(f, raw, app_default, &mut errors));
        let upstreams = traffic::upstreams(f, file.upstreams, &mut errors);
        if let Some(inbound) = &inbound {
            if inbound.listen.port() == 0 {
                errors.push(format!(
                    "{f}: inbound.listen: needs a fixed port (other sidecars dial it)"
                ));
            }
            if inbound.listen == admin || upstreams.iter().any(|u| u.listen == inbound.listen) {
                errors.push(format!(
                    "{f}: inbound.listen: {} is also used by another listener",
                    inbound.listen
                ));
            }
        }
        for (i, u) in upstreams.iter().enumerate() {
            if u.listen == admin {
                errors.push(format!(
                    "{f}: upstreams[{i}].listen: {} is the admin listener",
                    u.listen
                ));
            }
        }
        let proxy = traffic::proxy(f, file.proxy, &mut errors);
        if !errors.is_empty() {
            let errors: Vec<String> = errors
                .into_iter()
                .map(|e| with_line(file_name, text, e))
                .collect();
            return Err(ConfigError(errors.join("\n")));
        }
        let node_address = file
            .registry
            .addresses
            .first()
            .and_then(|a| primary_address(a))
            .unwrap_or_else(|| "127.0.0.1".into());
        // A check's deregister_critical_after also bounds how long the
        // instance stays once the sidecar is gone; the shortest one wins.
        let deregister_critical_after = deregister_critical_after.or_else(|| {
            checks
                .iter()
                .filter_map(|c| c.deregister_critical_after)
                .min()
        });
        Ok(Config {
            registry: file.registry.addresses,
            registry_token,
            service_address: service.address.unwrap_or_else(|| node_address.clone()),
            node,
            node_address,
            service_name: service.name,
            service_id,
            port,
            tags: service.tags,
            meta: service.meta,
            checks,
            admin,
            session_ttl,
            deregister_critical_after,
            inbound,
            upstreams,
            gateway,
            proxy,
            digest: digest(text),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[registry]
addresses = ["127.0.0.1:8502"]

[service]
name = "web"
id = "web-1"
address = "10.0.0.21"
port = 8080
tags = ["v1"]
meta = { version = "1.4.2" }

[[service.checks]]
http = "http://127.0.0.1:8080/health"
interval = "5s"
timeout = "1s"
deregister_critical_after = "5m"

[admin]
listen = "127.0.0.1:19000"
"#;

    #[test]
    fn the_issue_example_parses() {
        let c = Config::parse("s.toml", GOOD).expect("valid");
        assert_eq!(c.service_id, "web-1");
        assert_eq!(c.port, 8080);
        assert_eq!(c.checks.len(), 1);
        assert_eq!(c.checks[0].interval, Duration::from_secs(5));
        assert_eq!(c.deregister_critical_after, Some(Duration::from_secs(300)));
        assert_eq!(c.session_ttl, Duration::from_secs(15));
    }

    #[test]
    fn unknown_keys_name_file_line_and_key() {
        let text = GOOD.replace("tags = [\"v1\"]", "tags = [\"v1\"]\nwieght = 3");
        let err = Config::parse("s.toml", &text)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("s.toml"), "{err}");
        assert!(err.contains("line 11"), "{err}");
        assert!(err.contains("wieght"), "{err}");
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let text = GOOD
            .replace("port = 8080", "port = 70000")
            .replace("interval = \"5s\"", "interval = \"soon\"");
        let err = Config::parse("s.toml", &text)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("service.port"), "{err}");
        assert!(err.contains("service.checks[0].interval"), "{err}");
    }

    const TRAFFIC: &str = r#"
[inbound]
listen = "0.0.0.0:21000"
protocol = "http"

[[upstreams]]
name = "api"
listen = "127.0.0.1:9191"
protocol = "http"
tag = "v2"
balance = "least_request"
connect_timeout = "5s"
request_timeout = "15s"
retries = { attempts = 2, on = ["connect-failure", "reset", "503"], budget_percent = 20 }
outlier = { consecutive_5xx = 5, base_ejection = "30s", max_ejection_percent = 50 }
limits = { max_connections = 1024, max_pending = 1024, max_requests = 1024 }

[[upstreams]]
name = "db"
listen = "127.0.0.1:9192"
"#;

    #[test]
    fn a_gateway_is_given_instead_of_a_service_and_alone() {
        let gateway = r#"
[registry]
addresses = ["127.0.0.1:8502"]

[gateway]
name = "edge"
address = "10.0.0.5"
"#;
        let c = Config::parse("g.toml", gateway).expect("valid");
        let g = c.gateway.as_ref().expect("gateway mode");
        assert_eq!(g.name, "edge");
        assert_eq!(g.bind, "10.0.0.5".parse::<std::net::IpAddr>().expect("ip"));
        assert_eq!(
            (c.service_name.as_str(), c.service_id.as_str()),
            ("edge", "edge")
        );
        assert_eq!(c.port, 443);
        assert!(c.upstreams.is_empty() && c.inbound.is_none());
        for (text, says) in [
            (
                format!("{gateway}[inbound]\nlisten = \"0.0.0.0:21000\"\n"),
                "remove [inbound]",
            ),
            (
                gateway.replace("address = \"10.0.0.5\"", "address = \"somewhere\""),
                "gateway.address",
            ),
            (format!("{GOOD}\n[gateway]\nname = \"edge\"\n"), "not both"),
            (
                "[registry]\naddresses = [\"127.0.0.1:8502\"]\n".to_owned(),
                "[service] table is required",
            ),
        ] {
            let err = Config::parse("g.toml", &text)
                .expect_err("refused")
                .to_string();
            assert!(err.contains(says), "{err} (want {says})");
        }
    }

    #[test]
    fn the_registrys_inbound_settings_apply_where_the_file_says_nothing() {
        use meshwork_core::upstream_defaults::InboundDefaults;
        let text = format!("{GOOD}{TRAFFIC}")
            .replace("[inbound]\n", "[inbound]\nrequest_timeout = \"20s\"\n");
        let c = Config::parse("s.toml", &text).expect("valid");
        let inbound = c.inbound.expect("inbound");
        assert_eq!(inbound.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        let mut d = InboundDefaults {
            connect_timeout: Some(Duration::from_millis(700)),
            request_timeout: Some(Duration::from_millis(300)),
            max_connections: Some(50),
            ..InboundDefaults::default()
        };
        d.sources.insert(
            "connect_timeout",
            "service-defaults \"web\".LocalConnectTimeoutMs".into(),
        );
        let applied = inbound.with_defaults(&d);
        // The file's request timeout wins; the rest come from the registry.
        assert_eq!(applied.request_timeout, Some(Duration::from_secs(20)));
        assert_eq!(applied.connect_timeout, Duration::from_millis(700));
        assert_eq!(applied.max_connections, 50);
        assert_eq!(
            applied
                .from_registry
                .get("inbound.connect_timeout")
                .map(String::as_str),
            Some("service-defaults \"web\".LocalConnectTimeoutMs")
        );
        // Defaults gone: the file's and built-in values (the registry's
        // are always applied to what the file says).
        assert_eq!(inbound.with_defaults(&InboundDefaults::default()), inbound);
        let bad = format!("{GOOD}{TRAFFIC}")
            .replace("[inbound]\n", "[inbound]\nconnect_timeout = \"soon\"\n");
        let err = Config::parse("s.toml", &bad)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("inbound.connect_timeout"), "{err}");
    }

    #[test]
    fn the_proxy_example_parses_with_defaults_filled_in() {
        let text = format!("{GOOD}{TRAFFIC}");
        let c = Config::parse("s.toml", &text).expect("valid");
        let inbound = c.inbound.expect("inbound");
        assert_eq!(inbound.listen, "0.0.0.0:21000".parse().expect("addr"));
        assert_eq!(inbound.protocol, Protocol::Http);
        assert_eq!(inbound.app, "10.0.0.21:8080".parse().expect("addr"));
        assert_eq!(c.upstreams.len(), 2);
        let api = &c.upstreams[0];
        assert_eq!(api.name, "api");
        assert_eq!(api.tag.as_deref(), Some("v2"));
        assert_eq!(api.balance, Balance::LeastRequest);
        assert_eq!(api.request_timeout, Duration::from_secs(15));
        assert_eq!(api.retries.attempts, 2);
        assert!(api.retries.on.connect_failure && api.retries.on.reset);
        assert!(api.retries.on.status(503) && !api.retries.on.status(500));
        assert_eq!(api.outlier.consecutive_5xx, 5);
        assert_eq!(api.outlier.base_ejection, Duration::from_secs(30));
        assert_eq!(api.limits.max_pending, 1024);
        let db = &c.upstreams[1];
        assert_eq!(db.protocol, Protocol::Tcp);
        assert_eq!(db.balance, Balance::RoundRobin);
        assert_eq!(db.connect_timeout, Duration::from_secs(5));
        assert_eq!(db.idle_timeout, Duration::from_secs(3600));
        assert!(db.retries.on.connect_failure && !db.retries.on.reset, "tcp");
        let c = Config::parse(
            "s.toml",
            &text.replace("name = \"db\"", "name = \"db\"\nprotocol = \"http\""),
        )
        .expect("valid");
        let on = &c.upstreams[1].retries.on;
        assert!(on.connect_failure && on.reset && !on.any_5xx, "http");
        assert_eq!(c.proxy.drain, Duration::from_secs(5));
        assert!(!c.proxy.access_log);
    }

    #[test]
    fn no_proxy_sections_means_agent_only() {
        let c = Config::parse("s.toml", GOOD).expect("valid");
        assert!(c.inbound.is_none());
        assert!(c.upstreams.is_empty());
    }

    #[test]
    fn unknown_upstream_keys_name_their_line() {
        let text =
            format!("{GOOD}{TRAFFIC}").replace("tag = \"v2\"", "tag = \"v2\"\ntimeout = \"1s\"");
        let err = Config::parse("s.toml", &text)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("timeout"), "{err}");
        assert!(err.contains("line 31"), "{err}");
        let text = format!("{GOOD}{TRAFFIC}").replace("attempts = 2,", "attempts = 2, tries = 3,");
        let err = Config::parse("s.toml", &text)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("tries"), "{err}");
    }

    #[test]
    fn bad_proxy_values_are_all_reported() {
        let text = format!("{GOOD}{TRAFFIC}")
            .replace("protocol = \"http\"\ntag", "protocol = \"quic\"\ntag")
            .replace("least_request", "fastest")
            .replace("\"503\"", "\"404\"")
            .replace("max_ejection_percent = 50", "max_ejection_percent = 150")
            .replace("base_ejection = \"30s\"", "base_ejection = \"6m\"")
            .replace("max_pending = 1024", "max_pending = 0")
            .replace("request_timeout = \"15s\"", "request_timeout = \"later\"")
            .replace("127.0.0.1:9192", "127.0.0.1:9191");
        let err = Config::parse("s.toml", &text)
            .expect_err("refused")
            .to_string();
        for key in [
            "upstreams[0].protocol",
            "upstreams[0].balance",
            "upstreams[0].retries.on",
            "upstreams[0].outlier.max_ejection_percent",
            "upstreams[0].outlier.base_ejection",
            "upstreams[0].limits.max_pending",
            "upstreams[0].request_timeout",
            "upstreams[1].listen",
        ] {
            assert!(err.contains(key), "{key} missing in: {err}");
        }
    }

    #[test]
    fn tcp_upstreams_only_retry_connect_failures_and_hash_addresses() {
        let text = format!(
            "{GOOD}\n[[upstreams]]\nname = \"db\"\nlisten = \"127.0.0.1:5432\"\nretries = {{ on = [\"5xx\"] }}\nbalance = \"ring_hash\"\nhash_header = \"x-user\"\n"
        );
        let err = Config::parse("s.toml", &text)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("upstreams[0].retries.on"), "{err}");
        assert!(err.contains("upstreams[0].hash_header"), "{err}");
    }

    #[test]
    fn listeners_must_not_collide() {
        let text = format!("{GOOD}{TRAFFIC}").replace("127.0.0.1:9192", "127.0.0.1:19000");
        let err = Config::parse("s.toml", &text)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("upstreams[1].listen"), "{err}");
    }
}
