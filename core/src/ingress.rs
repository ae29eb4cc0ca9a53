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
    /// Empty only for a listener that redirects to HTTPS.
    pub services: Vec<Service>,
    /// The listener terminates TLS (its own `TLS.Enabled`, else the
    /// entry's).
    pub tls: bool,
    /// What the listener asks of outside clients (Meshwork's fields).
    pub edge: Edge,
}

/// A listener's edge policy (Meshwork's extension of the entry, HTTP
/// listeners only): authentication, per-client rate limits, the HTTPS
/// redirect and HSTS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Edge {
    /// `JWT.Providers` (Consul's API-gateway shape): a token verified by
    /// one of them passes.
    pub jwt: Vec<JwtRequirement>,
    /// `APIKeys.Header`: a key of the gateway's `[[gateway.api_keys]]` in
    /// this header passes (as a token would).
    pub api_key_header: Option<String>,
    pub rate_limit: Option<ClientLimit>,
    /// `HTTPSRedirect.Port`: every request is answered `308` to
    /// `https://<host>:<port><path>` (a plain listener without services).
    pub https_redirect: Option<u16>,
    /// `HSTS`: the `Strict-Transport-Security` value added to every
    /// answer (TLS listeners).
    pub hsts: Option<String>,
}

impl Edge {
    /// Whether requests must authenticate.
    pub fn authenticates(&self) -> bool {
        !self.jwt.is_empty() || self.api_key_header.is_some()
    }
}

/// A provider a listener accepts tokens of, and the claims it demands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtRequirement {
    pub provider: String,
    /// `VerifyClaims`: the claim at `Path` must be `Value` (or, a list,
    /// hold it).
    pub claims: Vec<(Vec<String>, String)>,
}

/// A token bucket per client (and per route, for a path `Routes`
/// names).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientLimit {
    /// The listener-wide bucket; `None`: only the routes are limited.
    pub rate: Option<f64>,
    pub burst: u32,
    /// Paths with a bucket of their own per client (the first match; a
    /// request no route matches draws from the listener-wide bucket).
    pub routes: Vec<RouteLimit>,
    pub by: LimitBy,
    /// Clients tracked at most (least recently seen dropped first).
    pub max_clients: usize,
}

/// One `RateLimit.Routes` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteLimit {
    pub path: crate::ratelimit::PathMatch,
    pub rate: f64,
    pub burst: u32,
}

// The rates are finite and above 0 (checked when read): no NaN to break
// equality's reflexivity.
impl Eq for ClientLimit {}
impl Eq for RouteLimit {}

/// What a client is, for its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitBy {
    /// The client's address (after trusted hops).
    ClientIp,
    /// The verified token's `sub`, or the API key's name; the address
    /// when the request carries neither.
    Subject,
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

/// A rate: 0.001 a second (one in about 17 minutes) to 10 million.
fn positive(value: Option<&Value>, at: &str) -> Result<Option<f64>, String> {
    value
        .map(|v| {
            v.as_f64()
                .filter(|r| (0.001..=1e7).contains(r))
                .ok_or_else(|| format!("{at}: a number from 0.001 to 10000000"))
        })
        .transpose()
}

/// A listener's edge fields (`JWT`, `APIKeys`, `RateLimit`,
/// `HTTPSRedirect`, `HSTS`).
fn edge(
    at: &str,
    protocol: &str,
    tls: bool,
    [jwt, api_keys, rate_limit, redirect, hsts]: [Option<&Value>; 5],
) -> Result<Edge, String> {
    let mut out = Edge::default();
    let given = [
        (jwt, "JWT"),
        (api_keys, "APIKeys"),
        (rate_limit, "RateLimit"),
        (redirect, "HTTPSRedirect"),
        (hsts, "HSTS"),
    ];
    if protocol == "tcp" {
        if let Some((_, f)) = given.iter().find(|(v, _)| v.is_some()) {
            return Err(format!(
                "{at}.{f}: only for HTTP listeners (http, http2, grpc): a tcp listener carries bytes"
            ));
        }
        return Ok(out);
    }
    if let Some(jwt) = jwt {
        let j_at = join(at, "JWT");
        let jwt = object(jwt, &j_at).map_err(text)?;
        let [providers] = fields(jwt, &["Providers"], &j_at).map_err(text)?;
        for (i, p) in array(providers, &join(&j_at, "Providers"))
            .map_err(text)?
            .iter()
            .enumerate()
        {
            let p_at = format!("{j_at}.Providers[{i}]");
            let p = object(p, &p_at).map_err(text)?;
            let [name, verify] = fields(p, &["Name", "VerifyClaims"], &p_at).map_err(text)?;
            let name = nonempty_string(name, &join(&p_at, "Name"))
                .map_err(text)?
                .ok_or_else(|| format!("{p_at}.Name: the jwt-provider entry is required"))?;
            let mut claims = Vec::new();
            for (k, c) in array(verify, &join(&p_at, "VerifyClaims"))
                .map_err(text)?
                .iter()
                .enumerate()
            {
                let c_at = format!("{p_at}.VerifyClaims[{k}]");
                let c = object(c, &c_at).map_err(text)?;
                let [path, value] = fields(c, &["Path", "Value"], &c_at).map_err(text)?;
                let path: Vec<String> = array(path, &join(&c_at, "Path"))
                    .map_err(text)?
                    .iter()
                    .map(|p| p.as_str().filter(|p| !p.is_empty()).map(str::to_owned))
                    .collect::<Option<_>>()
                    .filter(|p: &Vec<String>| !p.is_empty())
                    .ok_or_else(|| {
                        format!(
                            "{c_at}.Path: a list of claim names (\"role\" or [\"org\", \"id\"])"
                        )
                    })?;
                let value = nonempty_string(value, &join(&c_at, "Value"))
                    .map_err(text)?
                    .ok_or_else(|| format!("{c_at}.Value: required"))?;
                claims.push((path, value.to_owned()));
            }
            if out.jwt.iter().any(|r| r.provider == name) {
                return Err(format!("{p_at}.Name: {name:?} is listed twice"));
            }
            out.jwt.push(JwtRequirement {
                provider: name.to_owned(),
                claims,
            });
        }
        if out.jwt.is_empty() {
            // An empty list would leave the listener open while it reads
            // as protected.
            return Err(format!(
                "{j_at}.Providers: name at least one jwt-provider (or leave JWT out)"
            ));
        }
    }
    if let Some(keys) = api_keys {
        let k_at = join(at, "APIKeys");
        let keys = object(keys, &k_at).map_err(text)?;
        let [header] = fields(keys, &["Header"], &k_at).map_err(text)?;
        let header = nonempty_string(header, &join(&k_at, "Header"))
            .map_err(text)?
            .unwrap_or("x-api-key");
        out.api_key_header = Some(crate::jwt_provider::check_header_name(
            header,
            &join(&k_at, "Header"),
        )?);
    }
    if let Some(limit) = rate_limit {
        let r_at = join(at, "RateLimit");
        let limit = object(limit, &r_at).map_err(text)?;
        let [rps, burst, by, max, routes] = fields(
            limit,
            &[
                "RequestsPerSecond",
                "RequestsMaxBurst",
                "By",
                "MaxClients",
                "Routes",
            ],
            &r_at,
        )
        .map_err(text)?;
        let burst_of = |rate: f64, burst: Option<&Value>, at: &str| match burst {
            None => Ok(rate.ceil().max(1.0) as u32),
            Some(b) => b
                .as_u64()
                .and_then(|b| u32::try_from(b).ok())
                .filter(|b| *b > 0)
                .ok_or_else(|| format!("{at}.RequestsMaxBurst: a whole number above 0")),
        };
        let mut route_limits = Vec::new();
        for (i, route) in array(routes, &join(&r_at, "Routes"))
            .map_err(text)?
            .iter()
            .enumerate()
        {
            let ro_at = format!("{r_at}.Routes[{i}]");
            let (path, r_rps, r_burst) = crate::ratelimit::route_entry(route, &ro_at)?;
            let rate = positive(r_rps, &join(&ro_at, "RequestsPerSecond"))?
                .ok_or_else(|| format!("{ro_at}.RequestsPerSecond: required, a number above 0"))?;
            route_limits.push(RouteLimit {
                path,
                rate,
                burst: burst_of(rate, r_burst, &ro_at)?,
            });
        }
        let rate = positive(rps, &join(&r_at, "RequestsPerSecond"))?;
        if rate.is_none() && route_limits.is_empty() {
            return Err(format!(
                "{r_at}.RequestsPerSecond: required (or Routes), a number above 0"
            ));
        }
        let burst = burst_of(rate.unwrap_or(1.0), burst, &r_at)?;
        let by = match nonempty_string(by, &join(&r_at, "By")).map_err(text)? {
            None | Some("client-ip") => LimitBy::ClientIp,
            Some("subject") => LimitBy::Subject,
            Some(other) => {
                return Err(format!(
                    "{r_at}.By: {other:?}: \"client-ip\" (the default) or \"subject\" (the token's sub or the API key's name)"
                ));
            }
        };
        let max_clients = match max {
            None => 100_000,
            Some(m) => m
                .as_u64()
                .filter(|m| (1..=1_000_000).contains(m))
                .map(|m| m as usize)
                .ok_or_else(|| format!("{r_at}.MaxClients: 1 to 1000000"))?,
        };
        out.rate_limit = Some(ClientLimit {
            rate,
            burst,
            routes: route_limits,
            by,
            max_clients,
        });
    }
    if let Some(redirect) = redirect {
        let r_at = join(at, "HTTPSRedirect");
        if tls || protocol != "http" {
            return Err(format!("{r_at}: only on a plain (not TLS) http listener"));
        }
        let redirect = object(redirect, &r_at).map_err(text)?;
        let [port] = fields(redirect, &["Port"], &r_at).map_err(text)?;
        let port = match port {
            None => 443,
            Some(p) => p
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{r_at}.Port: a port from 1 to 65535"))?,
        };
        if out.authenticates() || out.rate_limit.is_some() {
            return Err(format!(
                "{r_at}: a redirecting listener forwards nothing; authentication and limits belong on the HTTPS listener"
            ));
        }
        out.https_redirect = Some(port);
    }
    if let Some(hsts) = hsts {
        let h_at = join(at, "HSTS");
        if !tls {
            return Err(format!(
                "{h_at}: only on a listener with TLS enabled (browsers ignore it over plain HTTP)"
            ));
        }
        let hsts = object(hsts, &h_at).map_err(text)?;
        let [age, subdomains, preload] = fields(
            hsts,
            &["MaxAgeSeconds", "IncludeSubdomains", "Preload"],
            &h_at,
        )
        .map_err(text)?;
        let age = age.and_then(Value::as_u64).ok_or_else(|| {
            format!("{h_at}.MaxAgeSeconds: required, seconds (31536000 is a year)")
        })?;
        let mut value = format!("max-age={age}");
        if boolean(subdomains, &join(&h_at, "IncludeSubdomains")).map_err(text)? {
            value.push_str("; includeSubDomains");
        }
        if boolean(preload, &join(&h_at, "Preload")).map_err(text)? {
            value.push_str("; preload");
        }
        out.hsts = Some(value);
    }
    Ok(out)
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
        let [
            port,
            protocol,
            services,
            tls,
            jwt,
            api_keys,
            rate_limit,
            redirect,
            hsts,
        ] = fields(
            l,
            &[
                "Port",
                "Protocol",
                "Services",
                "TLS",
                "JWT",
                "APIKeys",
                "RateLimit",
                "HTTPSRedirect",
                "HSTS",
            ],
            &at,
        )
        .map_err(text)?;
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
        let tls = listener_tls.unwrap_or(entry_tls);
        let edge = edge(
            &at,
            protocol,
            tls,
            [jwt, api_keys, rate_limit, redirect, hsts],
        )?;
        if edge.https_redirect.is_some() {
            if !parsed.is_empty() {
                return Err(format!(
                    "{at}.Services: a listener that redirects to HTTPS forwards nothing: leave Services out"
                ));
            }
        } else if parsed.is_empty() {
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
            tls,
            edge,
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

    #[test]
    fn edge_fields_are_read_and_misplaced_ones_refused() {
        let entry = body(json!({"Listeners": [
            {"Port": 8443, "Protocol": "http", "TLS": {"Enabled": true},
             "JWT": {"Providers": [{"Name": "okta", "VerifyClaims": [{"Path": ["role"], "Value": "admin"}]}]},
             "APIKeys": {},
             "RateLimit": {"RequestsPerSecond": 20, "By": "subject",
                           "Routes": [{"PathPrefix": "/login", "RequestsPerSecond": 0.5}]},
             "HSTS": {"MaxAgeSeconds": 600, "Preload": true},
             "Services": [{"Name": "api"}]},
            {"Port": 8080, "Protocol": "http", "HTTPSRedirect": {"Port": 8443}}]}));
        let l = parse("edge", &entry).expect("valid");
        let edge = &l[0].edge;
        assert_eq!(edge.jwt[0].provider, "okta");
        assert_eq!(
            edge.jwt[0].claims,
            vec![(vec!["role".to_owned()], "admin".to_owned())]
        );
        assert_eq!(edge.api_key_header.as_deref(), Some("x-api-key"));
        let limit = edge.rate_limit.as_ref().expect("limit");
        assert_eq!(
            (limit.rate, limit.burst, limit.by),
            (Some(20.0), 20, LimitBy::Subject)
        );
        assert_eq!(limit.routes[0].burst, 1);
        assert_eq!(edge.hsts.as_deref(), Some("max-age=600; preload"));
        assert_eq!(l[1].edge.https_redirect, Some(8443));
        assert!(l[1].services.is_empty());
        for (listener, says) in [
            (
                json!({"Port": 1, "Protocol": "tcp", "JWT": {"Providers": []}, "Services": [{"Name": "db"}]}),
                "only for HTTP listeners",
            ),
            (
                json!({"Port": 1, "Protocol": "http", "HSTS": {"MaxAgeSeconds": 1}, "Services": [{"Name": "a"}]}),
                "only on a listener with TLS",
            ),
            (
                json!({"Port": 1, "Protocol": "http", "HTTPSRedirect": {}, "Services": [{"Name": "a"}]}),
                "forwards nothing",
            ),
            (
                json!({"Port": 1, "Protocol": "http", "TLS": {"Enabled": true}, "HTTPSRedirect": {}}),
                "only on a plain",
            ),
            (
                json!({"Port": 1, "Protocol": "http", "HTTPSRedirect": {}, "APIKeys": {}}),
                "authentication and limits belong",
            ),
            (
                json!({"Port": 1, "Protocol": "http", "RateLimit": {"By": "ip"}, "Services": [{"Name": "a"}]}),
                "RateLimit.RequestsPerSecond",
            ),
            (
                json!({"Port": 1, "Protocol": "http", "RateLimit": {"RequestsPerSecond": 1, "By": "ip"}, "Services": [{"Name": "a"}]}),
                "RateLimit.By",
            ),
            (
                json!({"Port": 1, "Protocol": "http", "RateLimit": {"Routes": [{"PathPrefix": "/a", "PathExact": "/b", "RequestsPerSecond": 1}]}, "Services": [{"Name": "a"}]}),
                "exactly one of PathExact",
            ),
            (
                json!({"Port": 1, "Protocol": "http", "APIKeys": {"Header": "Host"}, "Services": [{"Name": "a"}]}),
                "a header the proxy owns",
            ),
            (
                json!({"Port": 1, "Protocol": "http", "JWT": {"Providers": [{"Name": "a"}, {"Name": "a"}]}, "Services": [{"Name": "a"}]}),
                "listed twice",
            ),
            (
                json!({"Port": 1, "Protocol": "http", "JWT": {"Providers": [{"Name": "a", "VerifyClaims": [{"Path": [], "Value": "x"}]}]}, "Services": [{"Name": "a"}]}),
                "VerifyClaims[0].Path",
            ),
        ] {
            let entry = body(json!({"Listeners": [listener.clone()]}));
            let err = parse("edge", &entry).expect_err(&listener.to_string());
            assert!(err.contains(says), "{err} (want {says})");
        }
    }
}
