//! Configuration entries (Consul's `/v1/config`): service defaults,
//! routers, splitters, resolvers, intentions and the rest, stored per kind
//! and name with `CreateIndex`/`ModifyIndex`, replicated and watched like
//! everything else.
//!
//! The top level of an entry is checked against its kind's fields (names
//! are matched without regard to case or underscores, as Consul's decoder
//! does, and stored under Consul's spelling); what lies below a field is
//! kept as given.

use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One stored entry: its fields (without Kind, Name and the indexes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigEntry {
    pub body: Map<String, Value>,
    pub create_index: u64,
    pub modify_index: u64,
}

/// Every entry, by kind and name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigStore {
    entries: OrdMap<String, OrdMap<String, ConfigEntry>>,
    /// kind → index of the last change to an entry of that kind (kept
    /// after deletions, so a blocking list sees them).
    kind_index: OrdMap<String, u64>,
}

/// Fields every kind has (besides Kind and Name).
const COMMON_FIELDS: &[&str] = &["Namespace", "Partition", "Meta"];

/// The kinds Meshwork stores, with their top-level fields (Consul's).
const KINDS: &[(&str, &[&str])] = &[
    (
        "service-defaults",
        &[
            "Protocol",
            "Mode",
            "TransparentProxy",
            "MutualTLSMode",
            "UpstreamConfig",
            "Destination",
            "MaxInboundConnections",
            "LocalConnectTimeoutMs",
            "LocalRequestTimeoutMs",
            "MeshGateway",
            "ExternalSNI",
            "Expose",
            "EnvoyExtensions",
            "BalanceInboundConnections",
            "RateLimits",
            // Meshwork's: fault injection on calls to the service.
            "Fault",
        ],
    ),
    (
        "proxy-defaults",
        &[
            "Config",
            "Mode",
            "TransparentProxy",
            "MutualTLSMode",
            "MeshGateway",
            "Expose",
            "AccessLogs",
            "EnvoyExtensions",
            "FailoverPolicy",
            "PrioritizeByLocality",
        ],
    ),
    ("service-router", &["Routes"]),
    ("service-splitter", &["Splits"]),
    (
        "service-resolver",
        &[
            "DefaultSubset",
            "Subsets",
            "Redirect",
            "Failover",
            "ConnectTimeout",
            "RequestTimeout",
            "LoadBalancer",
            "PrioritizeByLocality",
        ],
    ),
    ("service-intentions", &["Sources", "JWT"]),
    (
        "mesh",
        &[
            "TransparentProxy",
            "AllowEnablingPermissiveMutualTLS",
            "TLS",
            "HTTP",
            "Peering",
            // Meshwork's: what applies when no intention matches.
            "DefaultIntention",
        ],
    ),
    ("exported-services", &["Services"]),
    ("ingress-gateway", &["TLS", "Listeners", "Defaults"]),
    ("terminating-gateway", &["Services"]),
    (
        meshwork_core::jwt_provider::KIND,
        &meshwork_core::jwt_provider::FIELDS,
    ),
];

/// Longest entry name accepted.
const MAX_NAME: usize = 256;

fn fold(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// The kinds Meshwork accepts, for error messages.
pub fn known_kinds() -> Vec<&'static str> {
    KINDS.iter().map(|(k, _)| *k).collect()
}

/// Checks a kind name; says which kinds exist otherwise.
pub fn check_kind(kind: &str) -> Result<(), String> {
    if KINDS.iter().any(|(k, _)| *k == kind) {
        Ok(())
    } else {
        Err(format!(
            "invalid config entry kind {kind:?}: use one of {}",
            known_kinds().join(", ")
        ))
    }
}

/// Validates an entry as a client sent it (a JSON object with Kind and
/// Name) and returns (kind, name, fields under Consul's spelling).
pub fn normalize(entry: Value) -> Result<(String, String, Map<String, Value>), String> {
    let Value::Object(object) = entry else {
        return Err("a config entry must be a JSON object".into());
    };
    let mut kind = None;
    let mut name = None;
    let mut rest = Vec::new();
    for (key, value) in object {
        match fold(&key).as_str() {
            "kind" => kind = Some(value),
            "name" => name = Some(value),
            // Output-only fields: ignored on input, as Consul does.
            "createindex" | "modifyindex" | "hash" => {}
            _ => rest.push((key, value)),
        }
    }
    let kind = match kind {
        Some(Value::String(kind)) => kind,
        Some(_) => return Err("Kind must be a string".into()),
        None => return Err("missing Kind: say what kind of config entry this is".into()),
    };
    check_kind(&kind)?;
    let name = match name {
        Some(Value::String(name)) => name,
        Some(_) => return Err("Name must be a string".into()),
        None => return Err(format!("missing Name for the {kind} config entry")),
    };
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(|c| c.is_control()) {
        return Err(format!(
            "invalid Name {name:?}: 1 to {MAX_NAME} characters, no control characters"
        ));
    }
    match kind.as_str() {
        "proxy-defaults" if name != "global" => {
            return Err(format!(
                "invalid Name {name:?}: the proxy-defaults entry must be named \"global\""
            ));
        }
        "mesh" if name != "mesh" => {
            return Err(format!(
                "invalid Name {name:?}: the mesh entry must be named \"mesh\""
            ));
        }
        _ => {}
    }
    let fields = KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or(&[][..], |(_, f)| *f);
    let mut body = Map::new();
    for (key, value) in rest {
        let folded = fold(&key);
        let Some(canonical) = COMMON_FIELDS
            .iter()
            .chain(fields)
            .find(|f| fold(f) == folded)
        else {
            return Err(format!(
                "unknown field {key:?} in a {kind} config entry (its fields: Kind, Name, {})",
                COMMON_FIELDS
                    .iter()
                    .chain(fields)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        check_field(&kind, canonical, &value)?;
        if body.insert((*canonical).to_owned(), value).is_some() {
            return Err(format!("field {canonical} is given twice"));
        }
    }
    Ok((kind, name, body))
}

/// Type checks of the fields whose shape is plain.
fn check_field(kind: &str, field: &str, value: &Value) -> Result<(), String> {
    let bad = |want: &str| Err(format!("{field} in a {kind} config entry must be {want}"));
    match field {
        "Protocol" => match value.as_str() {
            Some("tcp" | "http" | "http2" | "grpc") => Ok(()),
            _ => bad("one of \"tcp\", \"http\", \"http2\", \"grpc\""),
        },
        "Meta" => match value.as_object() {
            Some(map) if map.values().all(Value::is_string) => Ok(()),
            _ => bad("an object of strings"),
        },
        "DefaultIntention" => match value.as_str() {
            Some("allow" | "deny") => Ok(()),
            _ => bad("\"allow\" or \"deny\""),
        },
        "Namespace" | "Partition" | "DefaultSubset" | "ConnectTimeout" | "RequestTimeout"
        | "Mode" | "MutualTLSMode" | "ExternalSNI" => match value {
            Value::String(_) => Ok(()),
            _ => bad("a string"),
        },
        "MaxInboundConnections" | "LocalConnectTimeoutMs" | "LocalRequestTimeoutMs" => {
            match value.as_u64() {
                Some(_) => Ok(()),
                None => bad("a non-negative integer"),
            }
        }
        "Routes" | "Splits" | "Sources" | "Services" | "Listeners" | "EnvoyExtensions" => {
            match value {
                Value::Array(_) => Ok(()),
                _ => bad("a list"),
            }
        }
        "Subsets" | "Failover" | "Config" | "Redirect" | "LoadBalancer" | "UpstreamConfig"
        | "TransparentProxy" | "MeshGateway" | "Expose" | "TLS" | "HTTP" | "Peering"
        | "AccessLogs" => match value {
            Value::Object(_) => Ok(()),
            _ => bad("an object"),
        },
        _ => Ok(()),
    }
}

impl ConfigStore {
    /// Stores an entry; with `cas`, only if its ModifyIndex equals it (0:
    /// only if absent). An unchanged body keeps its indexes, as Consul.
    pub fn set(
        &mut self,
        index: u64,
        kind: &str,
        name: &str,
        body: &Map<String, Value>,
        cas: Option<u64>,
    ) -> bool {
        let existing = self.get(kind, name);
        if let Some(cas) = cas
            && existing.map_or(0, |e| e.modify_index) != cas
        {
            return false;
        }
        if existing.is_some_and(|e| &e.body == body) {
            return true;
        }
        let create_index = existing.map_or(index, |e| e.create_index);
        let mut of_kind = self.entries.get(kind).cloned().unwrap_or_default();
        of_kind.insert(
            name.to_owned(),
            ConfigEntry {
                body: body.clone(),
                create_index,
                modify_index: index,
            },
        );
        self.entries.insert(kind.to_owned(), of_kind);
        self.kind_index.insert(kind.to_owned(), index);
        true
    }

    /// Deletes an entry; with `cas`, only if its ModifyIndex equals it.
    /// Deleting a missing entry succeeds, unless it is a check-and-set.
    pub fn delete(&mut self, index: u64, kind: &str, name: &str, cas: Option<u64>) -> bool {
        let Some(existing) = self.get(kind, name) else {
            // As Consul: a check-and-set delete of nothing fails.
            return cas.is_none();
        };
        if cas.is_some_and(|cas| cas != existing.modify_index) {
            return false;
        }
        if let Some(mut of_kind) = self.entries.get(kind).cloned() {
            of_kind.remove(name);
            if of_kind.is_empty() {
                self.entries.remove(kind);
            } else {
                self.entries.insert(kind.to_owned(), of_kind);
            }
        }
        self.kind_index.insert(kind.to_owned(), index);
        true
    }

    /// What applies when no intention matches: the `mesh` entry's
    /// `DefaultIntention` when it says, else `configured` (the server's
    /// `connect.default_intention`).
    pub fn default_intention_allow(&self, configured: bool) -> bool {
        match self
            .get("mesh", "mesh")
            .and_then(|mesh| mesh.body.get("DefaultIntention"))
            .and_then(Value::as_str)
        {
            Some("allow") => true,
            Some("deny") => false,
            _ => configured,
        }
    }

    pub fn get(&self, kind: &str, name: &str) -> Option<&ConfigEntry> {
        self.entries.get(kind).and_then(|e| e.get(name))
    }

    /// The entries of one kind, by name.
    pub fn list<'a>(&'a self, kind: &str) -> impl Iterator<Item = (&'a String, &'a ConfigEntry)> {
        self.entries.get(kind).into_iter().flat_map(|e| e.iter())
    }

    /// The kinds that have entries.
    pub fn kinds(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    /// Index of the last change to an entry of `kind` (deletions included).
    pub fn kind_index(&self, kind: &str) -> u64 {
        self.kind_index.get(kind).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.entries.values().map(|e| e.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Replaces every entry with `backup`'s as one write at `index` (see
    /// the KV store's restore).
    pub fn restore(&mut self, index: u64, backup: &ConfigStore) {
        let mut kind_index = self.kind_index.clone();
        for kind in self.entries.keys().chain(backup.entries.keys()) {
            kind_index.insert(kind.clone(), index);
        }
        self.entries = backup
            .entries
            .iter()
            .map(|(kind, of_kind)| {
                let of_kind: OrdMap<String, ConfigEntry> = of_kind
                    .iter()
                    .map(|(name, e)| {
                        let mut e = e.clone();
                        e.create_index = index;
                        e.modify_index = index;
                        (name.clone(), e)
                    })
                    .collect();
                (kind.clone(), of_kind)
            })
            .collect();
        self.kind_index = kind_index;
    }
}

/// An entry as the API shows it: Kind, Name, its fields, the indexes.
pub fn entry_json(kind: &str, name: &str, entry: &ConfigEntry) -> Value {
    let mut out = Map::new();
    out.insert("Kind".into(), Value::String(kind.to_owned()));
    out.insert("Name".into(), Value::String(name.to_owned()));
    for (k, v) in &entry.body {
        out.insert(k.clone(), v.clone());
    }
    out.insert("CreateIndex".into(), entry.create_index.into());
    out.insert("ModifyIndex".into(), entry.modify_index.into());
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_mesh_entry_can_set_the_default_intention() {
        let mut store = ConfigStore::default();
        assert!(store.default_intention_allow(true));
        assert!(!store.default_intention_allow(false));
        let (kind, name, body) = normalize(json!({
            "Kind": "mesh", "Name": "mesh", "default_intention": "deny"
        }))
        .expect("valid");
        assert_eq!(body.get("DefaultIntention"), Some(&json!("deny")));
        assert!(store.set(3, &kind, &name, &body, None));
        assert!(!store.default_intention_allow(true));
        let (_, _, body) =
            normalize(json!({"Kind": "mesh", "Name": "mesh", "DefaultIntention": "allow"}))
                .expect("valid");
        assert!(store.set(4, "mesh", "mesh", &body, None));
        assert!(store.default_intention_allow(false));
        // Without the field the server's setting applies again.
        assert!(store.set(5, "mesh", "mesh", &Map::new(), None));
        assert!(!store.default_intention_allow(false));
        let refused =
            normalize(json!({"Kind": "mesh", "Name": "mesh", "DefaultIntention": "Allow"}))
                .expect_err("only allow or deny");
        assert!(refused.contains("\"allow\" or \"deny\""), "{refused}");
    }

    #[test]
    fn entries_are_checked_and_spelled_as_consul() {
        let (kind, name, body) = normalize(json!({
            "kind": "service-defaults", "name": "web", "protocol": "http",
            "max_inbound_connections": 100, "ModifyIndex": 99
        }))
        .expect("valid");
        assert_eq!((kind.as_str(), name.as_str()), ("service-defaults", "web"));
        assert_eq!(
            Value::Object(body),
            json!({"Protocol": "http", "MaxInboundConnections": 100})
        );
        let err = |v: Value| normalize(v).expect_err("must be refused");
        assert!(
            err(json!({"Kind": "service-defaults", "Name": "web", "Protocl": "http"}))
                .contains("unknown field \"Protocl\"")
        );
        assert!(err(json!({"Kind": "nope", "Name": "x"})).contains("service-defaults"));
        assert!(err(json!({"Name": "x"})).contains("missing Kind"));
        assert!(err(json!({"Kind": "service-router"})).contains("missing Name"));
        assert!(err(json!({"Kind": "proxy-defaults", "Name": "web"})).contains("global"));
        assert!(
            err(json!({"Kind": "service-defaults", "Name": "web", "Protocol": "udp"}))
                .contains("Protocol")
        );
        assert!(
            err(json!({"Kind": "service-router", "Name": "web", "Routes": {}})).contains("a list")
        );
        assert!(err(json!(["not", "an", "object"])).contains("JSON object"));
        assert!(err(json!({"Kind": "service-defaults", "Name": ""})).contains("invalid Name"));
    }

    #[test]
    fn set_delete_cas_and_kind_index() {
        let mut store = ConfigStore::default();
        let body = |p: &str| {
            let Value::Object(m) = json!({ "Protocol": p }) else {
                unreachable!()
            };
            m
        };
        assert!(store.set(5, "service-defaults", "web", &body("http"), Some(0)));
        assert!(!store.set(6, "service-defaults", "web", &body("grpc"), Some(0)));
        assert!(store.set(7, "service-defaults", "web", &body("grpc"), Some(5)));
        let e = store.get("service-defaults", "web").expect("stored");
        assert_eq!((e.create_index, e.modify_index), (5, 7));
        // The same body again changes nothing.
        assert!(store.set(8, "service-defaults", "web", &body("grpc"), None));
        assert_eq!(store.kind_index("service-defaults"), 7);
        assert!(!store.delete(9, "service-defaults", "web", Some(5)));
        assert!(store.delete(10, "service-defaults", "web", Some(7)));
        assert!(store.is_empty());
        assert_eq!(store.kind_index("service-defaults"), 10);
        assert!(store.delete(11, "service-defaults", "web", None));
        assert!(!store.delete(12, "service-defaults", "web", Some(10)));
    }
}
