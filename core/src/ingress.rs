//! Consul's `ingress-gateway` config entry, read: the listeners a gateway
//! named after the entry opens for outside clients, and the mesh services
//! behind each. The registry checks an entry with [`parse`] at `PUT`; a
//! sidecar in gateway mode reads its own entry with it.
//!
//! As Consul has it: `Listeners` with `Port` (unique within the entry),
//! `Protocol` (`tcp`, the default, `http`, `http2`, `grpc`) and `Services`
//! (`Name`, optional `Hosts`); a `tcp` listener has exactly one service and
//! no hosts; `Hosts` are names or `*.`-prefixed wildcards, each once per
//! listener. `TLS` (entry-wide and per listener) says whether the
//! listener terminates TLS. What Meshwork cannot serve (the `*` service,
//! namespaces and partitions, SDS) is refused, not ignored.

use serde_json::{Map, Value};

use crate::intentions::fields::{
    array, boolean, fields, join, nonempty_string, object, says_nothing,
};

/// One listener of the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub port: u16,
    /// `tcp`, `http`, `http2` or `grpc`.
    pub protocol: String,
    pub services: Vec<Service>,
    /// The listener terminates TLS (its own `TLS.Enabled`, else the
    /// entry's).
    pub tls: bool,
}

/// A mesh service behind a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    /// The `Host` values routed to it (HTTP listeners); empty: Consul's
    /// default, `<name>.ingress.*`.
    pub hosts: Vec<String>,
}

const PROTOCOLS: [&str; 4] = ["tcp", "http", "http2", "grpc"];

fn text(e: crate::intentions::IntentionError) -> String {
    e.to_string()
}

/// `TLS.Enabled` of a `TLS` block (the rest of Consul's block is checked
/// for what Meshwork cannot do).
fn tls_enabled(value: Option<&Value>, at: &str) -> Result<Option<bool>, String> {
    let Some(value) = value else {
        return Ok(None);
    };
    let block = object(value, at).map_err(text)?;
    let [enabled, sds, min, max, suites] = fields(
        block,
        &[
            "Enabled",
            "SDS",
            "TLSMinVersion",
            "TLSMaxVersion",
            "CipherSuites",
        ],
        at,
    )
    .map_err(text)?;
    if sds.is_some() {
        return Err(format!(
            "{at}.SDS: certificates come from the gateway's own files ([[gateway.certificates]]), not SDS"
        ));
    }
    // The gateway offers TLS 1.2 and 1.3 with rustls's modern suites:
    // a setting that would narrow that is refused, not ignored.
    if let Some(v) = nonempty_string(min, &join(at, "TLSMinVersion")).map_err(text)?
        && !matches!(v, "TLSv1_2" | "TLS_AUTO")
    {
        return Err(format!(
            "{at}.TLSMinVersion: {v:?}: the gateway offers TLS 1.2 and 1.3 (TLSv1_2 or TLS_AUTO); other minimums are not supported yet"
        ));
    }
    if let Some(v) = nonempty_string(max, &join(at, "TLSMaxVersion")).map_err(text)?
        && !matches!(v, "TLSv1_3" | "TLS_AUTO")
    {
        return Err(format!(
            "{at}.TLSMaxVersion: {v:?}: the gateway offers TLS 1.2 and 1.3 (TLSv1_3 or TLS_AUTO); other maximums are not supported yet"
        ));
    }
    if !array(suites, &join(at, "CipherSuites"))
        .map_err(text)?
        .is_empty()
    {
        return Err(format!(
            "{at}.CipherSuites: choosing suites is not supported yet (rustls's modern suites only are offered)"
        ));
    }
    Ok(Some(boolean(enabled, &join(at, "Enabled")).map_err(text)?))
}

/// A host a listener routes: a DNS name, or `*.` and a DNS name.
fn check_host(host: &str, at: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{at}: {host:?} is not a host name (letters, digits and hyphens in dot-separated labels; a leading \"*.\" for a wildcard)"
        ));
    }
    Ok(())
}

/// The listeners of the `ingress-gateway` entry `name`; errors name the
/// field.
pub fn parse(name: &str, body: &Map<String, Value>) -> Result<Vec<Listener>, String> {
    let path = format!("ingress-gateway {name:?}");
    // The envelope (Kind, Name, Meta) is the registry's; the rest is read.
    let body: Map<String, Value> = body
        .iter()
        .filter(|(k, _)| !matches!(k.to_ascii_lowercase().as_str(), "kind" | "name" | "meta"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let [tls, listeners, defaults] =
        fields(&body, &["TLS", "Listeners", "Defaults"], &path).map_err(text)?;
    let entry_tls = tls_enabled(tls, &join(&path, "TLS"))?.unwrap_or(false);
    if let Some(d) = defaults {
        // Upstream limits for every service; Meshwork's come from
        // service-defaults and proxy-defaults.
        object(d, &join(&path, "Defaults")).map_err(text)?;
    }
    let mut out: Vec<Listener> = Vec::new();
    for (i, l) in array(listeners, &join(&path, "Listeners"))
        .map_err(text)?
        .iter()
        .enumerate()
    {
        let at = format!("{path}.Listeners[{i}]");
        let l = object(l, &at).map_err(text)?;
        let [port, protocol, services, tls] =
            fields(l, &["Port", "Protocol", "Services", "TLS"], &at).map_err(text)?;
        let port = port
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{at}.Port: a port from 1 to 65535 is required"))?;
        if out.iter().any(|o| o.port == port) {
            return Err(format!("{at}.Port: {port} is used by another listener"));
        }
        let protocol = nonempty_string(protocol, &join(&at, "Protocol"))
            .map_err(text)?
            .unwrap_or("tcp");
        if !PROTOCOLS.contains(&protocol) {
            return Err(format!(
                "{at}.Protocol: {protocol:?}: one of tcp, http, http2, grpc"
            ));
        }
        let listener_tls = tls_enabled(tls, &join(&at, "TLS"))?;
        let mut parsed = Vec::new();
        let mut all_hosts: Vec<String> = Vec::new();
        for (j, s) in array(services, &join(&at, "Services"))
            .map_err(text)?
            .iter()
            .enumerate()
        {
            let s_at = format!("{at}.Services[{j}]");
            let s = object(s, &s_at).map_err(text)?;
            let [
                name,
                hosts,
                namespace,
                partition,
                request_headers,
                response_headers,
                max_connections,
                max_pending,
                max_concurrent,
                service_tls,
            ] = fields(
                s,
                &[
                    "Name",
                    "Hosts",
                    "Namespace",
                    "Partition",
                    "RequestHeaders",
                    "ResponseHeaders",
                    "MaxConnections",
                    "MaxPendingRequests",
                    "MaxConcurrentRequests",
                    "TLS",
                ],
                &s_at,
            )
            .map_err(text)?;
            // Accepted by Consul, not applied by the gateway yet: refused
            // rather than ignored (a header meant to be stripped from
            // outside clients would reach the service).
            for (v, f) in [
                (request_headers, "RequestHeaders"),
                (response_headers, "ResponseHeaders"),
                (max_connections, "MaxConnections"),
                (max_pending, "MaxPendingRequests"),
                (max_concurrent, "MaxConcurrentRequests"),
                (service_tls, "TLS"),
            ] {
                if v.is_some_and(|v| !says_nothing(v) && v.as_u64() != Some(0)) {
                    return Err(format!(
                        "{s_at}.{f}: not supported by the gateway yet (limits come from service-defaults and proxy-defaults; TLS from the listener and [[gateway.certificates]])"
                    ));
                }
            }
            for (v, f) in [(namespace, "Namespace"), (partition, "Partition")] {
                if let Some(v) = nonempty_string(v, &join(&s_at, f)).map_err(text)?
                    && v != "default"
                {
                    return Err(format!(
                        "{s_at}.{f}: {v:?}: namespaces and partitions are Consul Enterprise features"
                    ));
                }
            }
            let name = nonempty_string(name, &join(&s_at, "Name"))
                .map_err(text)?
                .ok_or_else(|| format!("{s_at}.Name: the service is required"))?;
            if name == "*" {
                return Err(format!(
                    "{s_at}.Name: the \"*\" wildcard service is not supported; name each service"
                ));
            }
            let mut host_list = Vec::new();
            for (k, h) in array(hosts, &join(&s_at, "Hosts"))
                .map_err(text)?
                .iter()
                .enumerate()
            {
                let h_at = format!("{s_at}.Hosts[{k}]");
                let h = h
                    .as_str()
                    .ok_or_else(|| format!("{h_at}: must be a string"))?
                    .to_ascii_lowercase();
                check_host(&h, &h_at)?;
                if all_hosts.contains(&h) {
                    return Err(format!(
                        "{h_at}: {h:?} is routed to another service of this listener"
                    ));
                }
                all_hosts.push(h.clone());
                host_list.push(h);
            }
            parsed.push(Service {
                name: name.to_owned(),
                hosts: host_list,
            });
        }
        if parsed.is_empty() {
            return Err(format!(
                "{at}.Services: a listener needs at least one service"
            ));
        }
        if protocol == "tcp" {
            if parsed.len() > 1 {
                return Err(format!(
                    "{at}.Services: a tcp listener has exactly one service (bytes carry no host to route by)"
                ));
            }
            if !parsed[0].hosts.is_empty() {
                return Err(format!(
                    "{at}.Services[0].Hosts: a tcp listener has no hosts"
                ));
            }
        }
        out.push(Listener {
            port,
            protocol: protocol.to_owned(),
            services: parsed,
            tls: listener_tls.unwrap_or(entry_tls),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn listeners_are_read_as_consul_writes_them() {
        let entry = body(json!({
            "Kind": "ingress-gateway", "Name": "edge",
            "TLS": {"Enabled": true},
            "Listeners": [
                {"Port": 8080, "Protocol": "http", "TLS": {"Enabled": false},
                 "Services": [{"Name": "api", "Hosts": ["API.example.com", "*.api.example.com"]},
                              {"Name": "web"}]},
                {"Port": 5432, "Services": [{"Name": "db"}]}
            ]
        }));
        let listeners = parse("edge", &entry).expect("valid");
        assert_eq!(listeners.len(), 2);
        assert_eq!(listeners[0].protocol, "http");
        assert!(!listeners[0].tls, "the listener's own TLS wins");
        assert_eq!(
            listeners[0].services[0].hosts,
            ["api.example.com", "*.api.example.com"]
        );
        assert_eq!(listeners[1].protocol, "tcp");
        assert!(listeners[1].tls, "the entry's TLS applies");
    }

    #[test]
    fn what_cannot_be_served_is_refused_naming_the_field() {
        for (listeners, says) in [
            (json!([{"Port": 0, "Services": [{"Name": "a"}]}]), "Port"),
            (
                json!([{"Port": 1, "Services": [{"Name": "a"}]}, {"Port": 1, "Services": [{"Name": "b"}]}]),
                "used by another listener",
            ),
            (
                json!([{"Port": 1, "Protocol": "udp", "Services": [{"Name": "a"}]}]),
                "Protocol",
            ),
            (json!([{"Port": 1, "Services": []}]), "at least one service"),
            (
                json!([{"Port": 1, "Services": [{"Name": "a"}, {"Name": "b"}]}]),
                "exactly one service",
            ),
            (
                json!([{"Port": 1, "Services": [{"Name": "a", "Hosts": ["a.example"]}]}]),
                "no hosts",
            ),
            (
                json!([{"Port": 1, "Protocol": "http", "Services": [{"Name": "*"}]}]),
                "wildcard service",
            ),
            (
                json!([{"Port": 1, "Protocol": "http", "Services": [{"Name": "a", "Hosts": ["bad host"]}]}]),
                "Hosts[0]",
            ),
            (
                json!([{"Port": 1, "Protocol": "http", "Services": [
                    {"Name": "a", "Hosts": ["x.example"]}, {"Name": "b", "Hosts": ["X.example"]}]}]),
                "routed to another service",
            ),
            (
                json!([{"Port": 1, "Services": [{"Name": "a", "Namespace": "team"}]}]),
                "Namespace",
            ),
            (
                json!([{"Port": 1, "TLS": {"SDS": {}}, "Services": [{"Name": "a"}]}]),
                "SDS",
            ),
            (json!([{"Port": 1, "Services": [{"Nmae": "a"}]}]), "Nmae"),
            (
                json!([{"Port": 1, "Services": [{"Name": "a", "RequestHeaders": {"Remove": ["x-user"]}}]}]),
                "RequestHeaders",
            ),
            (
                json!([{"Port": 1, "TLS": {"Enabled": true, "TLSMinVersion": "TLSv1_3"}, "Services": [{"Name": "a"}]}]),
                "TLSMinVersion",
            ),
            (
                json!([{"Port": 1, "TLS": {"CipherSuites": ["TLS_AES_128_GCM_SHA256"]}, "Services": [{"Name": "a"}]}]),
                "CipherSuites",
            ),
        ] {
            let entry = body(json!({"Listeners": listeners}));
            let err = parse("edge", &entry).expect_err("refused");
            assert!(err.contains(says), "{err} (want {says})");
        }
    }
}
