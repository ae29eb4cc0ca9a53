//! What the registry's config entries say about one upstream of one
//! service, as Consul reads them for its sidecars:
//!
//! - the caller's `service-defaults` `UpstreamConfig`: `Overrides` (by the
//!   upstream's `Name`) over `Defaults`, each with `ConnectTimeoutMs`,
//!   `Limits` (`MaxConnections`, `MaxPendingRequests`,
//!   `MaxConcurrentRequests`) and `PassiveHealthCheck` (`MaxFailures`,
//!   `EnforcingConsecutive5xx`, `MaxEjectionPercent`, `BaseEjectionTime`);
//!   `MeshGateway`, `BalanceOutboundConnections` and `Interval` are
//!   accepted and have no effect (Meshwork has no mesh gateways, ejection
//!   is checked on every answer, not on an interval);
//! - the upstream's own `service-defaults` `Protocol`, else the
//!   `proxy-defaults` entry `global`'s `Config.protocol`;
//! - `proxy-defaults` `global`'s `Config.connect_timeout_ms` under the
//!   above.
//!
//! For the service's own inbound listener ([`for_inbound`]): its
//! `service-defaults` `LocalConnectTimeoutMs`, `LocalRequestTimeoutMs` and
//! `MaxInboundConnections`, else the `proxy-defaults` entry `global`'s
//! `Config.local_connect_timeout_ms`, `local_request_timeout_ms` and
//! `max_inbound_connections` (0 is "not set", as in Consul;
//! `BalanceInboundConnections` is accepted and has no effect: one accept
//! loop hands connections to every worker thread).
//!
//! The sidecar applies these under its own TOML: a setting the file gives
//! wins. [`validate_service_defaults`] is the registry's check at `PUT`,
//! the same code.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::entries::Entries;
use crate::intentions::fields::{array, fields, join, nonempty_string, object};

/// The settings the entries give for one upstream (`None`: not given), and
/// where each came from (for the sidecar's `/config`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpstreamDefaults {
    pub protocol: Option<String>,
    pub connect_timeout: Option<Duration>,
    pub max_connections: Option<u32>,
    pub max_pending: Option<u32>,
    pub max_requests: Option<u32>,
    pub consecutive_5xx: Option<u32>,
    pub base_ejection: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
    /// By setting (`connect_timeout`, `limits.max_connections`, ...): the
    /// entry and field it came from.
    pub sources: BTreeMap<&'static str, String>,
}

/// The settings the entries give for the service's inbound listener
/// (`None`: not given), and where each came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InboundDefaults {
    /// Connecting to the local app.
    pub connect_timeout: Option<Duration>,
    /// A request to the local app, answer included.
    pub request_timeout: Option<Duration>,
    /// Client connections open on the inbound listener at once.
    pub max_connections: Option<u32>,
    /// By setting (`connect_timeout`, `request_timeout`,
    /// `max_connections`): the entry and field it came from.
    pub sources: BTreeMap<&'static str, String>,
}

/// The inbound settings: (setting, `service-defaults` field, `proxy-defaults`
/// `Config` key).
const INBOUND: [(&str, &str, &str); 3] = [
    (
        "connect_timeout",
        "LocalConnectTimeoutMs",
        "local_connect_timeout_ms",
    ),
    (
        "request_timeout",
        "LocalRequestTimeoutMs",
        "local_request_timeout_ms",
    ),
    (
        "max_connections",
        "MaxInboundConnections",
        "max_inbound_connections",
    ),
];

/// What the entries say for `service`'s own inbound listener (see the
/// module's doc): its `service-defaults` over `proxy-defaults` `global`.
pub fn for_inbound(service: &str, entries: &dyn Entries) -> Result<InboundDefaults, String> {
    let own = entries.entry("service-defaults", service);
    let global = entries
        .entry("proxy-defaults", "global")
        .and_then(|g| field(g, "Config"))
        .and_then(Value::as_object);
    let mut out = InboundDefaults::default();
    for (setting, own_field, global_key) in INBOUND {
        let own_at = format!("service-defaults {service:?}.{own_field}");
        let global_at = format!("proxy-defaults \"global\".Config.{global_key}");
        let from_own = count(own.and_then(|b| field(b, own_field)), &own_at)?.filter(|n| *n > 0);
        let from_global = count(
            global
                .and_then(|c| c.get(global_key))
                .filter(|v| !v.is_null()),
            &global_at,
        )?
        .filter(|n| *n > 0);
        let (n, at) = match (from_own, from_global) {
            (Some(n), _) => (n, own_at),
            (None, Some(n)) => (n, global_at),
            (None, None) => continue,
        };
        match setting {
            "connect_timeout" => {
                out.connect_timeout = Some(Duration::from_millis(u64::from(n)));
            }
            "request_timeout" => {
                out.request_timeout = Some(Duration::from_millis(u64::from(n)));
            }
            _ => out.max_connections = Some(n),
        }
        out.sources.insert(setting, at);
    }
    Ok(out)
}

const PROTOCOLS: [&str; 4] = ["tcp", "http", "http2", "grpc"];

fn text(e: crate::intentions::IntentionError) -> String {
    e.to_string()
}

/// A field looked up the way Consul decodes entries (any case,
/// `snake_case` too).
fn field<'v>(body: &'v Map<String, Value>, name: &str) -> Option<&'v Value> {
    body.iter()
        .find(|(k, _)| k.replace('_', "").eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .filter(|v| !v.is_null())
}

fn count(value: Option<&Value>, at: &str) -> Result<Option<u32>, String> {
    match value {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| format!("{at}: must be a whole number from 0")),
    }
}

/// A duration given as Consul writes them: `"30s"`, or nanoseconds.
fn duration(value: Option<&Value>, at: &str) -> Result<Option<Duration>, String> {
    match value {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|ns| Some(Duration::from_nanos(ns)))
            .ok_or_else(|| format!("{at}: must be a duration (\"30s\") or nanoseconds")),
        Some(v) => {
            let s = nonempty_string(Some(v), at).map_err(text)?;
            match s {
                None => Ok(None),
                Some(s) => crate::duration::parse_duration(s)
                    .map(Some)
                    .ok_or_else(|| format!("{at}: {s:?} is not a duration (e.g. \"30s\")")),
            }
        }
    }
}

/// One `UpstreamConfig` block (`Defaults` or one of `Overrides`), applied
/// over `into` where it says something; `name_allowed` for `Overrides`.
fn upstream_block(
    value: &Value,
    at: &str,
    name_allowed: bool,
    into: &mut UpstreamDefaults,
) -> Result<Option<String>, String> {
    let block = object(value, at).map_err(text)?;
    let [
        name,
        namespace,
        partition,
        peer,
        connect_ms,
        protocol,
        limits,
        passive,
        _mesh_gateway,
        _balance,
    ] = fields(
        block,
        &[
            "Name",
            "Namespace",
            "Partition",
            "Peer",
            "ConnectTimeoutMs",
            "Protocol",
            "Limits",
            "PassiveHealthCheck",
            "MeshGateway",
            "BalanceOutboundConnections",
        ],
        at,
    )
    .map_err(text)?;
    let name = nonempty_string(name, &join(at, "Name")).map_err(text)?;
    if !name_allowed && name.is_some() {
        return Err(format!(
            "{at}.Name: Defaults apply to every upstream; name one in Overrides"
        ));
    }
    if name_allowed && name.is_none() {
        return Err(format!("{at}.Name: an override names the upstream service"));
    }
    for (value, field) in [(namespace, "Namespace"), (partition, "Partition")] {
        if let Some(v) = nonempty_string(value, &join(at, field)).map_err(text)?
            && v != "default"
        {
            return Err(format!(
                "{at}.{field}: {v:?}: namespaces and partitions are Consul Enterprise features; Meshwork has the default one only"
            ));
        }
    }
    if let Some(p) = nonempty_string(peer, &join(at, "Peer")).map_err(text)? {
        return Err(format!(
            "{at}.Peer: {p:?}: cluster peering is not supported"
        ));
    }
    let source = |field: &str| format!("{at}.{field}");
    if let Some(ms) = count(connect_ms, &join(at, "ConnectTimeoutMs"))?.filter(|ms| *ms > 0) {
        into.connect_timeout = Some(Duration::from_millis(u64::from(ms)));
        into.sources
            .insert("connect_timeout", source("ConnectTimeoutMs"));
    }
    if let Some(p) = nonempty_string(protocol, &join(at, "Protocol")).map_err(text)?
        && !PROTOCOLS.contains(&p)
    {
        return Err(format!(
            "{at}.Protocol: {p:?}: one of tcp, http, http2, grpc (the upstream's own service-defaults Protocol decides)"
        ));
    }
    if let Some(limits) = limits {
        let l_at = join(at, "Limits");
        let limits = object(limits, &l_at).map_err(text)?;
        let [max_conn, max_pending, max_requests] = fields(
            limits,
            &[
                "MaxConnections",
                "MaxPendingRequests",
                "MaxConcurrentRequests",
            ],
            &l_at,
        )
        .map_err(text)?;
        let set = [
            (max_conn, "MaxConnections", "limits.max_connections"),
            (max_pending, "MaxPendingRequests", "limits.max_pending"),
            (max_requests, "MaxConcurrentRequests", "limits.max_requests"),
        ];
        for (value, field, setting) in set {
            // 0 is Consul's "not set".
            if let Some(n) = count(value, &join(&l_at, field))?.filter(|n| *n > 0) {
                match setting {
                    "limits.max_connections" => into.max_connections = Some(n),
                    "limits.max_pending" => into.max_pending = Some(n),
                    _ => into.max_requests = Some(n),
                }
                into.sources.insert(setting, format!("{l_at}.{field}"));
            }
        }
    }
    if let Some(passive) = passive {
        let p_at = join(at, "PassiveHealthCheck");
        let passive = object(passive, &p_at).map_err(text)?;
        let [_interval, max_failures, enforcing, max_percent, base] = fields(
            passive,
            &[
                "Interval",
                "MaxFailures",
                "EnforcingConsecutive5xx",
                "MaxEjectionPercent",
                "BaseEjectionTime",
            ],
            &p_at,
        )
        .map_err(text)?;
        duration(_interval, &join(&p_at, "Interval"))?;
        let enforcing = count(enforcing, &join(&p_at, "EnforcingConsecutive5xx"))?;
        if let Some(n) = count(max_failures, &join(&p_at, "MaxFailures"))? {
            // EnforcingConsecutive5xx 0 turns ejection off, as in Envoy.
            let n = if enforcing == Some(0) { 0 } else { n };
            into.consecutive_5xx = Some(n);
            into.sources
                .insert("outlier.consecutive_5xx", format!("{p_at}.MaxFailures"));
        } else if enforcing == Some(0) {
            into.consecutive_5xx = Some(0);
            into.sources.insert(
                "outlier.consecutive_5xx",
                format!("{p_at}.EnforcingConsecutive5xx"),
            );
        }
        if let Some(p) = count(max_percent, &join(&p_at, "MaxEjectionPercent"))? {
            if p > 100 {
                return Err(format!("{p_at}.MaxEjectionPercent: at most 100"));
            }
            into.max_ejection_percent = Some(p);
            into.sources.insert(
                "outlier.max_ejection_percent",
                format!("{p_at}.MaxEjectionPercent"),
            );
        }
        if let Some(d) = duration(base, &join(&p_at, "BaseEjectionTime"))? {
            if d > Duration::from_secs(300) || d.is_zero() {
                return Err(format!(
                    "{p_at}.BaseEjectionTime: from 1ms to 5m (no ejection lasts longer than 5 minutes)"
                ));
            }
            into.base_ejection = Some(d);
            into.sources
                .insert("outlier.base_ejection", format!("{p_at}.BaseEjectionTime"));
        }
    }
    Ok(name.map(str::to_owned))
}

/// Checks a `service-defaults` entry's `UpstreamConfig` and `Protocol`;
/// errors name the field.
pub fn validate_service_defaults(name: &str, body: &Map<String, Value>) -> Result<(), String> {
    let at = format!("service-defaults {name:?}");
    if let Some(p) = field(body, "Protocol") {
        let p = nonempty_string(Some(p), &format!("{at}.Protocol")).map_err(text)?;
        if let Some(p) = p
            && !PROTOCOLS.contains(&p)
        {
            return Err(format!(
                "{at}.Protocol: {p:?}: one of tcp, http, http2, grpc"
            ));
        }
    }
    for (_, own_field, _) in INBOUND {
        count(field(body, own_field), &format!("{at}.{own_field}"))?;
    }
    if let Some(b) = field(body, "BalanceInboundConnections") {
        match b.as_str() {
            Some("" | "exact_balance") => {}
            _ => {
                return Err(format!(
                    "{at}.BalanceInboundConnections: \"exact_balance\" or empty"
                ));
            }
        }
    }
    upstream_config(name, body, None).map(|_| ())
}

/// Checks what sidecars read of a `proxy-defaults` entry: `Config`'s
/// `protocol` and `connect_timeout_ms` (the rest of `Config` is opaque, as
/// in Consul).
pub fn validate_proxy_defaults(name: &str, body: &Map<String, Value>) -> Result<(), String> {
    let Some(config) = field(body, "Config") else {
        return Ok(());
    };
    let at = format!("proxy-defaults {name:?}.Config");
    let config = object(config, &at).map_err(text)?;
    if let Some(p) = config.get("protocol").filter(|p| !p.is_null()) {
        match p.as_str() {
            Some("") => {}
            Some(p) => check_protocol(p, &format!("{at}.protocol"))?,
            None => return Err(format!("{at}.protocol: must be a string")),
        }
    }
    if let Some(ms) = config.get("connect_timeout_ms").filter(|v| !v.is_null())
        && ms.as_u64().is_none()
    {
        return Err(format!(
            "{at}.connect_timeout_ms: must be a whole number of milliseconds"
        ));
    }
    for (_, _, key) in INBOUND {
        count(
            config.get(key).filter(|v| !v.is_null()),
            &format!("{at}.{key}"),
        )?;
    }
    Ok(())
}

/// The `UpstreamConfig` of `service`'s defaults for `upstream` (`None`:
/// only check every block).
fn upstream_config(
    service: &str,
    body: &Map<String, Value>,
    upstream: Option<&str>,
) -> Result<UpstreamDefaults, String> {
    let mut out = UpstreamDefaults::default();
    let Some(config) = field(body, "UpstreamConfig") else {
        return Ok(out);
    };
    let at = format!("service-defaults {service:?}.UpstreamConfig");
    let config = object(config, &at).map_err(text)?;
    let [defaults, overrides] = fields(config, &["Defaults", "Overrides"], &at).map_err(text)?;
    if let Some(defaults) = defaults {
        upstream_block(defaults, &join(&at, "Defaults"), false, &mut out)?;
    }
    let mut seen = std::collections::HashSet::new();
    for (i, o) in array(overrides, &join(&at, "Overrides"))
        .map_err(text)?
        .iter()
        .enumerate()
    {
        let o_at = format!("{at}.Overrides[{i}]");
        // Checked whole; applied only for the upstream it names.
        let mut scratch = UpstreamDefaults::default();
        let name = upstream_block(o, &o_at, true, &mut scratch)?.unwrap_or_default();
        if !seen.insert(name.clone()) {
            return Err(format!("{o_at}.Name: {name:?} is overridden twice"));
        }
        if upstream == Some(name.as_str()) {
            upstream_block(o, &o_at, true, &mut out)?;
        }
    }
    Ok(out)
}

/// What the entries say for `service`'s upstream `upstream` (see the
/// module's doc).
pub fn for_upstream(
    service: &str,
    upstream: &str,
    entries: &dyn Entries,
) -> Result<UpstreamDefaults, String> {
    let mut out = match entries.entry("service-defaults", service) {
        Some(body) => upstream_config(service, body, Some(upstream))?,
        None => UpstreamDefaults::default(),
    };
    let global = entries.entry("proxy-defaults", "global");
    let global_config = global
        .and_then(|g| field(g, "Config"))
        .and_then(Value::as_object);
    // The upstream's protocol: its own service-defaults, else the global.
    let own = entries
        .entry("service-defaults", upstream)
        .and_then(|b| field(b, "Protocol"))
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty());
    let global_protocol = global_config
        .and_then(|c| c.get("protocol"))
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty());
    match (own, global_protocol) {
        (Some(p), _) => {
            check_protocol(p, &format!("service-defaults {upstream:?}.Protocol"))?;
            out.protocol = Some(p.to_owned());
            out.sources.insert(
                "protocol",
                format!("service-defaults {upstream:?}.Protocol"),
            );
        }
        (None, Some(p)) => {
            check_protocol(p, "proxy-defaults \"global\".Config.protocol")?;
            out.protocol = Some(p.to_owned());
            out.sources.insert(
                "protocol",
                "proxy-defaults \"global\".Config.protocol".into(),
            );
        }
        (None, None) => {}
    }
    if out.connect_timeout.is_none()
        && let Some(ms) = global_config
            .and_then(|c| c.get("connect_timeout_ms"))
            .and_then(Value::as_u64)
            .filter(|ms| *ms > 0)
    {
        out.connect_timeout = Some(Duration::from_millis(ms));
        out.sources.insert(
            "connect_timeout",
            "proxy-defaults \"global\".Config.connect_timeout_ms".into(),
        );
    }
    Ok(out)
}

fn check_protocol(p: &str, at: &str) -> Result<(), String> {
    if PROTOCOLS.contains(&p) {
        Ok(())
    } else {
        Err(format!("{at}: {p:?}: one of tcp, http, http2, grpc"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Stored(Vec<(&'static str, &'static str, Value)>);

    impl Entries for Stored {
        fn entry(&self, kind: &str, name: &str) -> Option<&Map<String, Value>> {
            self.0
                .iter()
                .find(|(k, n, _)| *k == kind && *n == name)
                .and_then(|(_, _, v)| v.as_object())
        }
    }

    #[test]
    fn overrides_beat_defaults_and_the_upstreams_protocol_beats_the_global() {
        let stored = Stored(vec![
            (
                "service-defaults",
                "web",
                json!({"UpstreamConfig": {
                    "Defaults": {"ConnectTimeoutMs": 2500, "Limits": {"MaxConnections": 50},
                                 "PassiveHealthCheck": {"MaxFailures": 3, "BaseEjectionTime": "10s", "Interval": "5s"}},
                    "Overrides": [{"Name": "api", "ConnectTimeoutMs": 500,
                                   "Limits": {"MaxPendingRequests": 7, "MaxConcurrentRequests": 9}}]
                }}),
            ),
            ("service-defaults", "api", json!({"Protocol": "http2"})),
            (
                "proxy-defaults",
                "global",
                json!({"Config": {"protocol": "http", "connect_timeout_ms": 4000}}),
            ),
        ]);
        let api = for_upstream("web", "api", &stored).expect("valid");
        assert_eq!(api.connect_timeout, Some(Duration::from_millis(500)));
        assert_eq!(api.max_connections, Some(50));
        assert_eq!((api.max_pending, api.max_requests), (Some(7), Some(9)));
        assert_eq!(api.consecutive_5xx, Some(3));
        assert_eq!(api.base_ejection, Some(Duration::from_secs(10)));
        assert_eq!(api.protocol.as_deref(), Some("http2"));
        assert!(
            api.sources["connect_timeout"].contains("Overrides[0]"),
            "{:?}",
            api.sources
        );
        assert!(api.sources["protocol"].contains("\"api\""));
        let db = for_upstream("web", "db", &stored).expect("valid");
        assert_eq!(db.connect_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(db.max_pending, None);
        assert_eq!(db.protocol.as_deref(), Some("http"), "the global's");
        let other = for_upstream("shop", "db", &stored).expect("valid");
        assert_eq!(other.connect_timeout, Some(Duration::from_millis(4000)));
        assert_eq!(other.max_connections, None);
    }

    #[test]
    fn bad_upstream_config_is_refused_naming_the_field() {
        for (body, says) in [
            (json!({"Protocol": "udp"}), "Protocol: \"udp\""),
            (
                json!({"UpstreamConfig": {"Defaults": {"Name": "api"}}}),
                "Defaults.Name",
            ),
            (
                json!({"UpstreamConfig": {"Overrides": [{"ConnectTimeoutMs": 5}]}}),
                "Overrides[0].Name",
            ),
            (
                json!({"UpstreamConfig": {"Overrides": [{"Name": "a"}, {"Name": "a"}]}}),
                "overridden twice",
            ),
            (
                json!({"UpstreamConfig": {"Defaults": {"Limits": {"MaxConnections": -1}}}}),
                "MaxConnections",
            ),
            (
                json!({"UpstreamConfig": {"Defaults": {"PassiveHealthCheck": {"BaseEjectionTime": "1h"}}}}),
                "BaseEjectionTime",
            ),
            (
                json!({"UpstreamConfig": {"Defaults": {"Peer": "east"}}}),
                "Peer",
            ),
            (
                json!({"UpstreamConfig": {"Defaults": {"Timeout": 5}}}),
                "Timeout",
            ),
            (
                json!({"LocalRequestTimeoutMs": "5s"}),
                "LocalRequestTimeoutMs",
            ),
            (
                json!({"MaxInboundConnections": -3}),
                "MaxInboundConnections",
            ),
            (
                json!({"BalanceInboundConnections": "round_robin"}),
                "BalanceInboundConnections",
            ),
        ] {
            let body = body.as_object().cloned().unwrap_or_default();
            let err = validate_service_defaults("web", &body).expect_err("refused");
            assert!(err.contains(says), "{err} (want {says})");
        }
        let good = json!({"Protocol": "http", "UpstreamConfig": {"Defaults": {"MeshGateway": {"Mode": "local"}}}});
        validate_service_defaults("web", good.as_object().expect("object")).expect("accepted");
    }

    #[test]
    fn the_inbound_settings_come_from_the_services_defaults_over_the_global_ones() {
        let stored = Stored(vec![
            (
                "service-defaults",
                "api",
                json!({"LocalRequestTimeoutMs": 2500, "MaxInboundConnections": 0,
                       "BalanceInboundConnections": "exact_balance"}),
            ),
            (
                "proxy-defaults",
                "global",
                json!({"Config": {"local_request_timeout_ms": 9000,
                                  "local_connect_timeout_ms": 700,
                                  "max_inbound_connections": 64}}),
            ),
        ]);
        let d = for_inbound("api", &stored).expect("valid");
        assert_eq!(d.request_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(d.connect_timeout, Some(Duration::from_millis(700)));
        // 0 in the service's entry is "not set": the global one applies.
        assert_eq!(d.max_connections, Some(64));
        assert_eq!(
            d.sources.get("request_timeout").map(String::as_str),
            Some("service-defaults \"api\".LocalRequestTimeoutMs")
        );
        assert_eq!(
            d.sources.get("max_connections").map(String::as_str),
            Some("proxy-defaults \"global\".Config.max_inbound_connections")
        );
        // Another service gets the global settings only; none without them.
        let web = for_inbound("web", &stored).expect("valid");
        assert_eq!(web.request_timeout, Some(Duration::from_millis(9000)));
        assert_eq!(
            for_inbound("web", &Stored(Vec::new())).expect("valid"),
            InboundDefaults::default()
        );
        let bad = json!({"Config": {"local_connect_timeout_ms": "1s"}});
        let err = validate_proxy_defaults("global", bad.as_object().expect("object"))
            .expect_err("refused");
        assert!(err.contains("local_connect_timeout_ms"), "{err}");
    }
}
