//! `meshwork-sidecar --config FILE`: the TOML file, validated. Unknown keys
//! and type errors name the file, line and key; a bad file exits with 64
//! (EX_USAGE).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use meshwork_registry::api::http::query::parse_duration;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    registry: RegistrySection,
    service: ServiceSection,
    #[serde(default)]
    admin: AdminSection,
    #[serde(default)]
    session: SessionSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistrySection {
    addresses: Vec<String>,
    /// Reserved for ACLs; accepted so configs can carry it already.
    #[serde(default)]
    token: Option<String>,
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
}

/// A configuration error: one line per problem, each naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

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

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file_name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{file_name}: cannot read: {e}")))?;
        Self::parse(&file_name, &text)
    }

    pub fn parse(file_name: &str, text: &str) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text)
            .map_err(|e| ConfigError(format!("{file_name}: {}", e.to_string().trim_end())))?;
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
        let _ = file.registry.token;
        let service = file.service;
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
        if !errors.is_empty() {
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
}
