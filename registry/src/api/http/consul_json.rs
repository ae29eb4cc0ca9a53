//! Consul's JSON shapes for the catalog: decoding registration bodies
//! (case-insensitive keys, as Go's decoder, and the snake_case spellings
//! Consul's agent translates, such as `enable_tag_override`) into catalog
//! specs, and
//! encoding catalog objects the way Consul answers.
//!
//! Unknown keys are refused with their name, except the Consul fields that
//! clients commonly send and Meshwork does not use (listed below), which are
//! accepted and ignored so that Consul clients work unchanged.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::error::ApiError;
use crate::state::catalog::{
    CheckDefinition, CheckSpec, HealthCheck, HealthStatus, Node, SERVICE_KINDS, ServiceInstance,
    ServiceSpec, Weights,
};
use meshwork_core::duration::parse_duration;

/// A JSON object with its field names folded (lower case, underscores
/// dropped: `DeregisterCriticalServiceAfter`, `deregistercriticalserviceafter`
/// and `deregister_critical_service_after` are one field; user maps such as
/// `Meta` keep their keys), consumed field by field so that whatever is
/// left over can be reported.
pub struct Fields {
    what: &'static str,
    map: Map<String, Value>,
}

/// A field name as [`Fields`] matches it.
fn fold(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

impl Fields {
    /// Parses a request body that must be a JSON object.
    pub fn from_body(what: &'static str, body: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("Request decode failed: {e}")))?;
        Self::from_value(what, value)
    }

    pub fn from_value(what: &'static str, value: Value) -> Result<Self, ApiError> {
        match value {
            Value::Object(map) => Ok(Fields {
                what,
                map: map.into_iter().map(|(k, v)| (fold(&k), v)).collect(),
            }),
            Value::Null => Ok(Fields {
                what,
                map: Map::new(),
            }),
            other => Err(ApiError::bad_request(format!(
                "Request decode failed: {what} must be a JSON object, not {}",
                type_name(&other)
            ))),
        }
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    pub fn string(&mut self, key: &str) -> Result<String, ApiError> {
        match self.take(key) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(self.wrong(key, "a string", &other)),
        }
    }

    pub fn bool(&mut self, key: &str) -> Result<bool, ApiError> {
        match self.take(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(b),
            Some(other) => Err(self.wrong(key, "true or false", &other)),
        }
    }

    pub fn strings(&mut self, key: &str) -> Result<Vec<String>, ApiError> {
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(self.wrong(key, "a list of strings", &other)),
                })
                .collect(),
            Some(other) => Err(self.wrong(key, "a list of strings", &other)),
        }
    }

    pub fn string_map(&mut self, key: &str) -> Result<BTreeMap<String, String>, ApiError> {
        match self.take(key) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(map)) => map
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k, s)),
                    other => Err(self.wrong(key, "an object of strings", &other)),
                })
                .collect(),
            Some(other) => Err(self.wrong(key, "an object of strings", &other)),
        }
    }

    /// A port: an integer from 0 to 65535.
    pub fn port(&mut self, key: &str) -> Result<u16, ApiError> {
        match self.take(key) {
            None => Ok(0),
            Some(Value::Number(n)) => {
                n.as_i64()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "Invalid {} port {n}: must be from 0 to 65535",
                            self.what
                        ))
                    })
            }
            Some(other) => Err(self.wrong(key, "a number", &other)),
        }
    }

    pub fn u32(&mut self, key: &str, default: u32) -> Result<u32, ApiError> {
        match self.take(key) {
            None => Ok(default),
            Some(Value::Number(n)) => {
                n.as_u64()
                    .and_then(|p| u32::try_from(p).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("Invalid {} field {key}: {n}", self.what))
                    })
            }
            Some(other) => Err(self.wrong(key, "a non-negative number", &other)),
        }
    }

    /// An unsigned integer (0 when absent).
    pub fn u64(&mut self, key: &str) -> Result<u64, ApiError> {
        match self.take(key) {
            None => Ok(0),
            Some(Value::Number(n)) => n.as_u64().ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Invalid {} field {key}: {n} is not an unsigned integer",
                    self.what
                ))
            }),
            Some(other) => Err(self.wrong(key, "a non-negative number", &other)),
        }
    }

    /// A Go duration string (`"10s"`) or a number of nanoseconds.
    pub fn duration(&mut self, key: &str) -> Result<Option<Duration>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => parse_duration(&s).map(Some).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Invalid {} {key} {s:?}: not a duration like \"10s\"",
                    self.what
                ))
            }),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|ns| Some(Duration::from_nanos(ns)))
                .ok_or_else(|| ApiError::bad_request(format!("Invalid {} {key}: {n}", self.what))),
            Some(other) => Err(self.wrong(key, "a duration string", &other)),
        }
    }

    pub fn object(&mut self, key: &str, what: &'static str) -> Result<Option<Fields>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => Fields::from_value(what, v).map(Some),
            Some(other) => Err(self.wrong(key, "an object", &other)),
        }
    }

    pub fn objects(&mut self, key: &str, what: &'static str) -> Result<Vec<Fields>, ApiError> {
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| Fields::from_value(what, v))
                .collect(),
            Some(other) => Err(self.wrong(key, "a list of objects", &other)),
        }
    }

    /// Moves `other`'s fields into these (theirs win): a nested object
    /// read as if its fields were at this level.
    pub fn absorb(&mut self, other: Fields) {
        self.map.extend(other.map);
    }

    /// The field's text when it is a string (left in place).
    pub fn string_value(&self, key: &str) -> Option<&str> {
        self.map.get(key).and_then(Value::as_str)
    }

    /// Whether the field was given at all, `null` included.
    pub fn given(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub fn has(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|v| !v.is_null())
    }

    /// Drops the given Consul fields that Meshwork accepts and ignores.
    pub fn ignore(&mut self, keys: &[&str]) {
        for key in keys {
            self.map.remove(*key);
        }
    }

    /// Refuses whatever is left.
    pub fn finish(self) -> Result<(), ApiError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(key) => Err(ApiError::bad_request(format!(
                "Request decode failed: unknown field {key:?} in {}",
                self.what
            ))),
        }
    }

    fn wrong(&self, key: &str, expected: &str, got: &Value) -> ApiError {
        ApiError::bad_request(format!(
            "Request decode failed: {}.{key} must be {expected}, not {}",
            self.what,
            type_name(got)
        ))
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Consul service fields accepted and ignored.
const IGNORED_SERVICE_FIELDS: &[&str] = &[
    "proxy",
    "connect",
    "taggedaddresses",
    "socketpath",
    "namespace",
    "partition",
    "peer",
    "locality",
    "replaceexistingchecks",
];

/// Consul check fields accepted and ignored.
const IGNORED_CHECK_FIELDS: &[&str] = &[
    "namespace",
    "partition",
    "failuresbeforecritical",
    "successbeforepassing",
    "failuresbeforewarning",
    "outputmaxsize",
    "body",
    "disableredirects",
    "tlsservername",
    "type",
    "definition",
    "exposedport",
    "createindex",
    "modifyindex",
    "node",
    "servicename",
    "servicetags",
    "tcpusetls",
];

/// Check kinds Meshwork refuses, with why.
const REFUSED_CHECK_KINDS: &[(&str, &str)] = &[
    (
        "args",
        "script checks are never run by Meshwork (remote code execution)",
    ),
    (
        "scriptargs",
        "script checks are never run by Meshwork (remote code execution)",
    ),
    (
        "script",
        "script checks are never run by Meshwork (remote code execution)",
    ),
    ("dockercontainerid", "docker checks are not supported"),
    (
        "shell",
        "script checks are never run by Meshwork (remote code execution)",
    ),
    (
        "grpc",
        "gRPC checks are run by the sidecar, not the registry; use an HTTP, TCP or TTL check",
    ),
    (
        "grpcusetls",
        "gRPC checks are run by the sidecar, not the registry",
    ),
    ("h2ping", "h2ping checks are not supported"),
    ("h2pingusetls", "h2ping checks are not supported"),
    ("aliasnode", "alias checks are not supported"),
    ("aliasservice", "alias checks are not supported"),
    ("osservice", "OS service checks are not supported"),
    ("udp", "UDP checks are not supported"),
];

/// Default check timeout (Consul's).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Decodes a check definition (an agent `Check`, a catalog `Check`, or the
/// body of `/v1/agent/check/register`).
pub fn decode_check(mut f: Fields) -> Result<CheckSpec, ApiError> {
    for (key, why) in REFUSED_CHECK_KINDS {
        if f.has(key) {
            return Err(ApiError::bad_request(format!(
                "Unsupported check type: {why}"
            )));
        }
    }
    let mut check_id = f.string("checkid")?;
    let id = f.string("id")?;
    if check_id.is_empty() {
        check_id = id;
    }
    let name = f.string("name")?;
    printable("check ID", &check_id)?;
    printable("check name", &name)?;
    let notes = f.string("notes")?;
    let output = f.string("output")?;
    let service_id = f.string("serviceid")?;
    let status_text = f.string("status")?;
    let status = if status_text.is_empty() {
        HealthStatus::Critical
    } else {
        HealthStatus::parse(&status_text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "Invalid check status {status_text:?}: use passing, warning or critical"
            ))
        })?
    };
    let http = Some(f.string("http")?).filter(|s| !s.is_empty());
    let method = Some(f.string("method")?).filter(|s| !s.is_empty());
    let header = match f.take("header") {
        None => BTreeMap::new(),
        Some(Value::Object(map)) => map
            .into_iter()
            .map(|(k, v)| match v {
                Value::Array(items) => items
                    .into_iter()
                    .map(|i| match i {
                        Value::String(s) => Ok(s),
                        _ => Err(ApiError::bad_request(
                            "Invalid check Header: values must be lists of strings",
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(|vals| (k, vals)),
                Value::String(s) => Ok((k, vec![s])),
                _ => Err(ApiError::bad_request(
                    "Invalid check Header: values must be lists of strings",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::bad_request(
                "Invalid check Header: must be an object",
            ));
        }
    };
    let tls_skip_verify = f.bool("tlsskipverify")?;
    let tcp = Some(f.string("tcp")?).filter(|s| !s.is_empty());
    let ttl = f.duration("ttl")?;
    let interval = f.duration("interval")?;
    let timeout = f.duration("timeout")?;
    let deregister_after = f.duration("deregistercriticalserviceafter")?;
    f.ignore(IGNORED_CHECK_FIELDS);
    f.finish()?;

    let kinds = [http.is_some(), tcp.is_some(), ttl.is_some()]
        .iter()
        .filter(|k| **k)
        .count();
    if kinds > 1 {
        return Err(ApiError::bad_request(
            "A check has exactly one of HTTP, TCP or TTL",
        ));
    }
    if let Some(url) = &http
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(ApiError::bad_request(format!(
            "Invalid HTTP check URL {url:?}: must start with http:// or https://"
        )));
    }
    if let Some(addr) = &tcp
        && !addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    {
        return Err(ApiError::bad_request(format!(
            "Invalid TCP check address {addr:?}: use HOST:PORT"
        )));
    }
    if (http.is_some() || tcp.is_some()) && interval.is_none_or(|i| i.is_zero()) {
        return Err(ApiError::bad_request(
            "Interval must be > 0 for HTTP or TCP checks",
        ));
    }
    if ttl.is_some_and(|t| t.is_zero()) {
        return Err(ApiError::bad_request("TTL must be > 0 for TTL checks"));
    }
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
    let timeout = if http.is_some() || tcp.is_some() {
        Some(timeout.unwrap_or(DEFAULT_TIMEOUT))
    } else {
        timeout
    };
    Ok(CheckSpec {
        check_id,
        name,
        status,
        notes,
        output,
        service_id,
        definition: CheckDefinition {
            http,
            method,
            header,
            tls_skip_verify,
            tcp,
            ttl_ms: ms(ttl),
            interval_ms: ms(interval),
            timeout_ms: ms(timeout),
            deregister_critical_after_ms: ms(deregister_after),
            session_ttl_ms: None,
            sidecar: None,
        },
    })
}

/// Decodes an agent service registration: the service and its checks with
/// Consul's default check ids and names.
pub fn decode_agent_service(body: &[u8]) -> Result<(ServiceSpec, Vec<CheckSpec>), ApiError> {
    let mut f = Fields::from_body("service", body)?;
    let check = f.object("check", "check")?;
    let checks = f.objects("checks", "check")?;
    let spec = decode_service_fields(&mut f, true)?;
    f.finish()?;
    let mut out = Vec::new();
    // Consul numbers default ids only when there is more than one check.
    let single = usize::from(check.is_some()) + checks.len() == 1;
    for (n, fields) in check.into_iter().chain(checks).enumerate() {
        let mut c = decode_check(fields)?;
        if c.check_id.is_empty() {
            c.check_id = if single {
                format!("service:{}", spec.id)
            } else {
                format!("service:{}:{}", spec.id, n + 1)
            };
        }
        if c.name.is_empty() {
            c.name = format!("Service '{}' check", spec.name);
        }
        c.service_id.clone_from(&spec.id);
        out.push(c);
    }
    Ok((spec, out))
}

/// Refuses a name with control characters (CR, LF, NUL, …): it would end up
/// in DNS answers, logs and headers. (KV keys keep Consul's own rules.)
pub fn printable(what: &str, value: &str) -> Result<(), ApiError> {
    match value.chars().find(|c| c.is_control()) {
        Some(c) => Err(ApiError::bad_request(format!(
            "{what} {value:?} contains the control character {c:?}"
        ))),
        None => Ok(()),
    }
}

/// The service fields shared by agent and catalog registrations. Agent
/// bodies call the name `Name`; catalog bodies `Service`.
pub fn decode_service_fields(f: &mut Fields, agent: bool) -> Result<ServiceSpec, ApiError> {
    let mut name = f.string("name")?;
    if name.is_empty() && !agent {
        name = f.string("service")?;
    }
    if name.is_empty() {
        return Err(ApiError::bad_request("Missing service name"));
    }
    let mut id = f.string("id")?;
    if id.is_empty() {
        id.clone_from(&name);
    }
    printable("service name", &name)?;
    printable("service ID", &id)?;
    let kind = match f.string("kind")?.as_str() {
        "" | "typical" => String::new(),
        k if SERVICE_KINDS.contains(&k) => k.to_owned(),
        k => {
            return Err(ApiError::bad_request(format!(
                "Invalid service kind: {k:?} (one of typical, {})",
                SERVICE_KINDS.join(", ")
            )));
        }
    };
    let tags = f.strings("tags")?;
    let address = f.string("address")?;
    let port = f.port("port")?;
    let meta = f.string_map("meta")?;
    let enable_tag_override = f.bool("enabletagoverride")?;
    let weights = match f.object("weights", "weights")? {
        None => Weights::default(),
        Some(mut w) => {
            let weights = Weights {
                passing: w.u32("passing", 1)?,
                warning: w.u32("warning", 1)?,
            };
            w.finish()?;
            weights
        }
    };
    if weights.passing == 0 {
        return Err(ApiError::bad_request("Passing must be greater than 0"));
    }
    f.ignore(IGNORED_SERVICE_FIELDS);
    if !is_dns_label(&name) {
        tracing::warn!(service = %name, "service name is not a valid DNS label: it will not be resolvable over DNS");
    }
    Ok(ServiceSpec {
        id,
        name,
        kind,
        tags,
        address,
        port,
        meta,
        weights,
        enable_tag_override,
    })
}

/// Whether `name` can be a DNS label (letters, digits, hyphens, ≤ 63).
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

// ---- encoding ----

fn go_duration(ms: Option<u64>) -> String {
    match ms {
        None | Some(0) => String::new(),
        Some(ms) if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        Some(ms) => format!("{ms}ms"),
    }
}

pub fn node_json(node: &Node) -> Value {
    json!({
        "ID": node.id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter,
        "TaggedAddresses": node.tagged_addresses,
        "Meta": node.meta,
        "CreateIndex": node.create_index,
        "ModifyIndex": node.modify_index,
    })
}

pub fn weights_json(w: Weights) -> Value {
    json!({ "Passing": w.passing, "Warning": w.warning })
}

/// A service as `/v1/health/service` and `/v1/catalog/node` show it.
pub fn service_json(s: &ServiceInstance) -> Value {
    json!({
        "Kind": s.kind,
        "ID": s.id,
        "Service": s.name,
        "Tags": s.tags,
        "Address": s.address,
        "Meta": s.meta,
        "Port": s.port,
        "Weights": weights_json(s.weights),
        "EnableTagOverride": s.enable_tag_override,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

/// A service as `/v1/agent/services` shows it.
pub fn agent_service_json(s: &ServiceInstance, datacenter: &str) -> Value {
    let mut out = json!({
        "ID": s.id,
        "Service": s.name,
        "Tags": s.tags,
        "Meta": s.meta,
        "Port": s.port,
        "Address": s.address,
        "Weights": weights_json(s.weights),
        "EnableTagOverride": s.enable_tag_override,
        "Datacenter": datacenter,
    });
    // Consul leaves it out for a typical service here.
    if !s.kind.is_empty()
        && let Some(map) = out.as_object_mut()
    {
        map.insert("Kind".into(), Value::from(s.kind.clone()));
    }
    out
}

/// An entry of `/v1/catalog/service/:name`.
pub fn catalog_service_json(node: &Node, s: &ServiceInstance) -> Value {
    json!({
        "ID": node.id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter,
        "TaggedAddresses": node.tagged_addresses,
        "NodeMeta": node.meta,
        "ServiceKind": s.kind,
        "ServiceID": s.id,
        "ServiceName": s.name,
        "ServiceTags": s.tags,
        "ServiceAddress": s.address,
        "ServiceWeights": weights_json(s.weights),
        "ServiceMeta": s.meta,
        "ServicePort": s.port,
        "ServiceEnableTagOverride": s.enable_tag_override,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

pub fn check_json(c: &HealthCheck) -> Value {
    let d = &c.definition;
    json!({
        "Node": c.node,
        "CheckID": c.check_id,
        "Name": c.name,
        "Status": c.status.as_str(),
        "Notes": c.notes,
        "Output": c.output,
        "ServiceID": c.service_id,
        "ServiceName": c.service_name,
        "ServiceTags": c.service_tags,
        "Type": d.kind(),
        "Interval": go_duration(d.interval_ms),
        "Timeout": go_duration(d.timeout_ms),
        "ExposedPort": 0,
        "Definition": {
            "HTTP": d.http.clone().unwrap_or_default(),
            "TCP": d.tcp.clone().unwrap_or_default(),
            "TTL": go_duration(d.ttl_ms),
            "Interval": go_duration(d.interval_ms),
            "Timeout": go_duration(d.timeout_ms),
            "DeregisterCriticalServiceAfter": go_duration(d.deregister_critical_after_ms),
        },
        "CreateIndex": c.create_index,
        "ModifyIndex": c.modify_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_service_with_lowercase_keys_and_defaults() {
        let body = br#"{"name":"web","port":8080,"tags":["v1"],"check":{"http":"http://127.0.0.1:8080/h","interval":"5s"},"Meta":{"Version":"1"}}"#;
        let (svc, checks) = decode_agent_service(body).expect("valid");
        assert_eq!(
            (svc.id.as_str(), svc.name.as_str(), svc.port),
            ("web", "web", 8080)
        );
        assert_eq!(svc.meta["Version"], "1");
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].check_id, "service:web");
        assert_eq!(checks[0].name, "Service 'web' check");
        assert_eq!(checks[0].status, HealthStatus::Critical);
        assert_eq!(checks[0].definition.interval_ms, Some(5000));
        assert_eq!(checks[0].definition.timeout_ms, Some(10_000));
    }

    #[test]
    fn snake_case_fields_are_consuls_fields() {
        let body = br#"{"name":"web","id":"web-1","port":80,"enable_tag_override":true,
            "check":{"check_id":"web-alive","tcp":"127.0.0.1:80","interval":"10s",
            "deregister_critical_service_after":"1m"},"meta":{"some_key":"v"}}"#;
        let (svc, checks) = decode_agent_service(body).expect("valid");
        assert_eq!(svc.id, "web-1");
        assert_eq!(svc.meta["some_key"], "v", "user keys are kept as given");
        assert_eq!(checks[0].check_id, "web-alive");
        assert_eq!(
            checks[0].definition.deregister_critical_after_ms,
            Some(60_000)
        );
    }

    #[test]
    fn names_with_control_characters_are_refused() {
        for body in [
            &br#"{"Name":"crlf\r\nx","Port":80}"#[..],
            br#"{"Name":"web","ID":"a\u0000b","Port":80}"#,
            br#"{"Name":"web","Check":{"CheckID":"c\nd","TTL":"10s"}}"#,
        ] {
            let err = decode_agent_service(body).expect_err("refused");
            assert!(
                err.to_string().contains("control character"),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn bad_bodies_are_refused_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"{not json", "Request decode failed"),
            (b"[1]", "must be a JSON object"),
            (br#"{"Name":"a","Port":70000}"#, "must be from 0 to 65535"),
            (br#"{"Name":"a","Port":-1}"#, "must be from 0 to 65535"),
            (br#"{"Name":"a","Port":"80"}"#, "must be a number"),
            (br#"{"Port":80}"#, "Missing service name"),
            (br#"{"Name":"a","Bogus":1}"#, "unknown field \"bogus\""),
            (
                br#"{"Name":"a","Check":{"Args":["rm"],"Interval":"1s"}}"#,
                "script checks",
            ),
            (
                br#"{"Name":"a","Check":{"GRPC":"x:1","Interval":"1s"}}"#,
                "gRPC checks",
            ),
            (
                br#"{"Name":"a","Check":{"HTTP":"http://x"}}"#,
                "Interval must be > 0",
            ),
            (
                br#"{"Name":"a","Check":{"TCP":"nohostport","Interval":"1s"}}"#,
                "HOST:PORT",
            ),
            (br#"{"Name":"a","Check":{"TTL":"soon"}}"#, "not a duration"),
            (
                br#"{"Name":"a","Check":{"TTL":"5s","Status":"ok"}}"#,
                "Invalid check status",
            ),
            (br#"{"Name":"a","Tags":"v1"}"#, "list of strings"),
        ];
        for (body, want) in cases {
            let err = decode_agent_service(body).expect_err("must fail");
            assert!(
                err.to_string().contains(want),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn multiple_checks_get_numbered_ids() {
        let body = br#"{"ID":"web-1","Name":"web","Checks":[{"TTL":"10s"},{"CheckID":"mine","TCP":"127.0.0.1:1","Interval":"1s"}]}"#;
        let (_, checks) = decode_agent_service(body).expect("valid");
        assert_eq!(checks[0].check_id, "service:web-1:1");
        assert_eq!(checks[1].check_id, "mine");
        assert!(checks.iter().all(|c| c.service_id == "web-1"));
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("web-api"));
        assert!(!is_dns_label("web_api"));
        assert!(!is_dns_label("-x"));
    }
}
