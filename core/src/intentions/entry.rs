//! A `service-intentions` entry and its sources, read and checked as
//! Consul checks them on write (`validate_entry`), into the form the
//! compiled set and the listing are built from.
//!
//! Owns: the entry's and each source's fields, names, tenancy and the
//! choice between `Action` and `Permissions`. Does not touch: the fields of
//! one permission (`permission`), matching (`matching`), precedence
//! between intentions (`set`).

use serde_json::{Map, Value};

use super::Action;
use super::WILDCARD;
use super::error::{IntentionError, Problem, invalid};
use super::fields::{action, array, fields, join, nonempty_string, object, says_nothing, string};
use super::matching::Permission;
use super::permission::parse_permission;

/// Consul's `metaValueMaxLength`, which bounds `Description`.
const MAX_DESCRIPTION: usize = 512;

const ENTRY_FIELDS: [&str; 5] = ["Sources", "JWT", "Meta", "Namespace", "Partition"];
const SOURCE_FIELDS: [&str; 14] = [
    "Name",
    "Action",
    "Permissions",
    "Description",
    "Type",
    "Namespace",
    "Partition",
    "Peer",
    "SamenessGroup",
    "Precedence",
    "LegacyID",
    "LegacyMeta",
    "LegacyCreateTime",
    "LegacyUpdateTime",
];

/// `Name` of an entry or source: a service name or `*`, nothing between.
fn check_name(name: &str, path: &str) -> Result<(), IntentionError> {
    if name.is_empty() {
        return Err(IntentionError::new(path, Problem::Missing));
    }
    if name != WILDCARD && name.contains('*') {
        return Err(invalid(
            path,
            "wildcard character '*' cannot be used with partial values",
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid(path, "must not contain control characters"));
    }
    Ok(())
}

/// `Namespace`/`Partition`: Meshwork has only `default`.
fn check_tenancy(
    value: Option<&Value>,
    path: &str,
    what: &'static str,
) -> Result<(), IntentionError> {
    match string(value, path)? {
        None | Some("" | "default") => Ok(()),
        Some(_) => Err(IntentionError::new(path, Problem::NotSupported(what))),
    }
}

/// What a source intention does.
#[derive(Debug)]
pub(super) enum Verdict {
    Allow,
    Deny,
    Permissions(Box<[Permission]>),
}

impl Verdict {
    /// Order among intentions of equal precedence: deny, then L7, then allow.
    pub(super) fn strength(&self) -> u8 {
        match self {
            Verdict::Deny => 2,
            Verdict::Permissions(_) => 1,
            Verdict::Allow => 0,
        }
    }
}

pub(super) struct ParsedSource<'v> {
    pub(super) name: &'v str,
    pub(super) verdict: Verdict,
    pub(super) permissions: Option<&'v Value>,
    pub(super) description: Option<&'v str>,
}

pub(super) struct ParsedEntry<'v> {
    pub(super) meta: Option<&'v Value>,
    pub(super) sources: Vec<ParsedSource<'v>>,
}

pub(super) fn parse_entry<'v>(
    name: &str,
    body: &'v Map<String, Value>,
) -> Result<ParsedEntry<'v>, IntentionError> {
    check_name(name, "Name")?;
    let [sources, jwt, meta, namespace, partition] = fields(body, &ENTRY_FIELDS, "")?;
    check_tenancy(namespace, "Namespace", "namespaces other than \"default\"")?;
    check_tenancy(
        partition,
        "Partition",
        "admin partitions other than \"default\"",
    )?;
    if jwt.is_some_and(|j| !says_nothing(j)) {
        return Err(IntentionError::new(
            "JWT",
            Problem::NotSupported("JWT requirements (the sidecar does not verify JWTs)"),
        ));
    }
    if meta.is_some_and(|m| !m.is_object()) {
        return Err(IntentionError::new("Meta", Problem::WrongType("an object")));
    }
    let sources = array(sources, "Sources")?;
    if sources.is_empty() {
        return Err(invalid("Sources", "at least one source is required"));
    }
    let destination_is_wild = name == WILDCARD;
    let mut parsed: Vec<ParsedSource<'v>> = Vec::with_capacity(sources.len());
    for (i, source) in sources.iter().enumerate() {
        let path = format!("Sources[{i}]");
        let source = parse_source(object(source, &path)?, &path, destination_is_wild)?;
        if parsed.iter().any(|p| p.name == source.name) {
            return Err(invalid(
                path,
                format!("defines {:?} more than once", source.name),
            ));
        }
        parsed.push(source);
    }
    Ok(ParsedEntry {
        meta,
        sources: parsed,
    })
}

fn parse_source<'v>(
    source: &'v Map<String, Value>,
    path: &str,
    destination_is_wild: bool,
) -> Result<ParsedSource<'v>, IntentionError> {
    let [
        name,
        action_field,
        permissions,
        description,
        kind,
        namespace,
        partition,
        peer,
        sameness_group,
        precedence,
        legacy_id,
        legacy_meta,
        legacy_create,
        legacy_update,
    ] = fields(source, &SOURCE_FIELDS, path)?;

    let name_path = join(path, "Name");
    let name = string(name, &name_path)?.unwrap_or_default();
    check_name(name, &name_path)?;

    check_tenancy(
        namespace,
        &join(path, "Namespace"),
        "namespaces other than \"default\"",
    )?;
    check_tenancy(
        partition,
        &join(path, "Partition"),
        "admin partitions other than \"default\"",
    )?;
    if nonempty_string(peer, &join(path, "Peer"))?.is_some() {
        return Err(IntentionError::new(
            join(path, "Peer"),
            Problem::NotSupported("sources in cluster peers"),
        ));
    }
    if nonempty_string(sameness_group, &join(path, "SamenessGroup"))?.is_some() {
        return Err(IntentionError::new(
            join(path, "SamenessGroup"),
            Problem::NotSupported("sameness groups"),
        ));
    }
    match nonempty_string(kind, &join(path, "Type"))? {
        None | Some("consul") => {}
        Some(other) => {
            return Err(invalid(
                join(path, "Type"),
                format!("must be \"consul\", not {other:?}"),
            ));
        }
    }
    let description = string(description, &join(path, "Description"))?;
    if description.is_some_and(|d| d.len() > MAX_DESCRIPTION) {
        return Err(invalid(
            join(path, "Description"),
            format!("exceeds maximum length {MAX_DESCRIPTION}"),
        ));
    }
    // Read-only or legacy bookkeeping: Consul recomputes or clears them.
    if precedence.is_some_and(|p| !p.is_number()) {
        return Err(IntentionError::new(
            join(path, "Precedence"),
            Problem::WrongType("a number"),
        ));
    }
    string(legacy_id, &join(path, "LegacyID"))?;
    if legacy_meta.is_some_and(|m| !m.is_object()) {
        return Err(IntentionError::new(
            join(path, "LegacyMeta"),
            Problem::WrongType("an object"),
        ));
    }
    string(legacy_create, &join(path, "LegacyCreateTime"))?;
    string(legacy_update, &join(path, "LegacyUpdateTime"))?;

    let action_path = join(path, "Action");
    let action_value = action(action_field, &action_path)?;
    let permissions_path = join(path, "Permissions");
    let permission_items = array(permissions, &permissions_path)?;
    let verdict = match (action_value, permission_items.is_empty()) {
        (Some(_), false) => {
            return Err(invalid(
                action_path,
                "must be omitted if Permissions are specified",
            ));
        }
        (None, true) => {
            return Err(invalid(
                action_path,
                "must be set to \"allow\" or \"deny\" (or give Permissions)",
            ));
        }
        (Some(Action::Allow), true) => Verdict::Allow,
        (Some(Action::Deny), true) => Verdict::Deny,
        (None, false) => {
            if destination_is_wild {
                return Err(invalid(
                    permissions_path,
                    "cannot be specified on intentions with wildcarded destinations",
                ));
            }
            let compiled = permission_items
                .iter()
                .enumerate()
                .map(|(j, p)| {
                    let path = format!("{permissions_path}[{j}]");
                    parse_permission(object(p, &path)?, &path)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Verdict::Permissions(compiled.into_boxed_slice())
        }
    };
    Ok(ParsedSource {
        name,
        verdict,
        permissions: permissions.filter(|_| !permission_items.is_empty()),
        description: description.filter(|d| !d.is_empty()),
    })
}

/// Checks a `service-intentions` entry as the registry's PUT receives it:
/// `name` is the destination (or `*`), `body` its fields below Kind and
/// Name. The error names the field (`Sources[1].Permissions[0].HTTP.PathRegex:
/// regex too large: ...`).
pub fn validate_entry(name: &str, body: &Map<String, Value>) -> Result<(), IntentionError> {
    parse_entry(name, body).map(|_| ())
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::test_support::{body, error};
    use super::validate_entry;

    #[test]
    fn accepted_and_ignored_fields() {
        let entry = json!({
            "Meta": {"owner": "team"},
            "Namespace": "default",
            "Partition": "",
            "JWT": {"Providers": []},
            "Sources": [{
                "Name": "web", "Action": "allow", "Description": "the web tier",
                "Type": "consul", "Namespace": "default", "Partition": "default",
                "Peer": "", "SamenessGroup": null, "Precedence": 9,
                "LegacyID": "2a1b", "LegacyMeta": {}, "LegacyCreateTime": "2020-01-01T00:00:00Z",
                "LegacyUpdateTime": "2020-01-01T00:00:00Z",
            }],
        });
        validate_entry("api", &body(entry)).expect("valid");
    }

    #[test]
    fn bad_entries_say_what_and_where() {
        let web_l7 = |http: Value| json!({"Sources": [{"Name": "web", "Permissions": [{"Action": "allow", "HTTP": http}]}]});
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "",
                json!({"Sources": [{"Name": "web", "Action": "allow"}]}),
                "Name: is required",
            ),
            (
                "api*",
                json!({"Sources": [{"Name": "web", "Action": "allow"}]}),
                "Name: wildcard character '*' cannot be used with partial values",
            ),
            ("api", json!({}), "Sources: at least one source is required"),
            (
                "api",
                json!({"Sources": []}),
                "Sources: at least one source is required",
            ),
            ("api", json!({"Sources": {}}), "Sources: must be a list"),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Action": "allow"}], "Kind": "x"}),
                "unknown field \"Kind\" (known fields: Sources, JWT, Meta, Namespace, Partition)",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Action": "allow"}], "Namespace": "team"}),
                "Namespace: not supported by Meshwork: namespaces other than \"default\"",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Action": "allow"}], "JWT": {"Providers": [{"Name": "okta"}]}}),
                "JWT: not supported by Meshwork: JWT requirements (the sidecar does not verify JWTs)",
            ),
            (
                "api",
                json!({"Sources": ["web"]}),
                "Sources[0]: must be an object",
            ),
            (
                "api",
                json!({"Sources": [{"Action": "allow"}]}),
                "Sources[0].Name: is required",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "w*", "Action": "allow"}]}),
                "Sources[0].Name: wildcard character '*' cannot be used with partial values",
            ),
            (
                "api",
                json!({"Sources": [{"Name": 7, "Action": "allow"}]}),
                "Sources[0].Name: must be a string",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Action": "allow", "Colour": "red"}]}),
                "Sources[0]: unknown field \"Colour\" (known fields: Name, Action, Permissions, Description, Type, Namespace, Partition, Peer, SamenessGroup, Precedence, LegacyID, LegacyMeta, LegacyCreateTime, LegacyUpdateTime)",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "name": "db", "Action": "allow"}]}),
                "Sources[0].Name: given twice, as \"Name\" and \"name\"",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Action": "allow"}, {"Name": "web", "Action": "deny"}]}),
                "Sources[1]: defines \"web\" more than once",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web"}]}),
                "Sources[0].Action: must be set to \"allow\" or \"deny\" (or give Permissions)",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Action": "Allow"}]}),
                "Sources[0].Action: must be \"allow\" or \"deny\", not \"Allow\"",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Action": "allow", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}]}),
                "Sources[0].Action: must be omitted if Permissions are specified",
            ),
            (
                "*",
                json!({"Sources": [{"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}]}),
                "Sources[0].Permissions: cannot be specified on intentions with wildcarded destinations",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Action": "allow", "Type": "external"}]}),
                "Sources[0].Type: must be \"consul\", not \"external\"",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Action": "allow", "Peer": "east"}]}),
                "Sources[0].Peer: not supported by Meshwork: sources in cluster peers",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Action": "allow", "SamenessGroup": "g"}]}),
                "Sources[0].SamenessGroup: not supported by Meshwork: sameness groups",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Action": "allow", "Partition": "p1"}]}),
                "Sources[0].Partition: not supported by Meshwork: admin partitions other than \"default\"",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Action": "allow", "Description": "x".repeat(513)}]}),
                "Sources[0].Description: exceeds maximum length 512",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Permissions": [{"HTTP": {"PathPrefix": "/"}}]}]}),
                "Sources[0].Permissions[0].Action: must be set to \"allow\" or \"deny\"",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Permissions": [{"Action": "allow"}]}]}),
                "Sources[0].Permissions[0].HTTP: is required",
            ),
            (
                "api",
                json!({"Sources": [{"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}, "JWT": {"Providers": [{"Name": "okta"}]}}]}]}),
                "Sources[0].Permissions[0].JWT: not supported by Meshwork: JWT requirements (the sidecar does not verify JWTs)",
            ),
            (
                "api",
                web_l7(json!({})),
                "Sources[0].Permissions[0].HTTP: should not be empty",
            ),
            (
                "api",
                web_l7(json!({"PathExact": "", "Methods": []})),
                "Sources[0].Permissions[0].HTTP: should not be empty",
            ),
            (
                "api",
                web_l7(json!({"PathExact": "/a", "PathPrefix": "/b"})),
                "Sources[0].Permissions[0].HTTP: should only contain at most one of PathExact, PathPrefix, or PathRegex",
            ),
            (
                "api",
                web_l7(json!({"PathExact": "a"})),
                "Sources[0].Permissions[0].HTTP.PathExact: doesn't start with '/': \"a\"",
            ),
            (
                "api",
                web_l7(json!({"PathPrefix": "a"})),
                "Sources[0].Permissions[0].HTTP.PathPrefix: doesn't start with '/': \"a\"",
            ),
            (
                "api",
                web_l7(json!({"Paths": "/a"})),
                "Sources[0].Permissions[0].HTTP: unknown field \"Paths\" (known fields: PathExact, PathPrefix, PathRegex, Header, Methods)",
            ),
            (
                "api",
                web_l7(json!({"Methods": ["FETCH"]})),
                "Sources[0].Permissions[0].HTTP.Methods: contains an invalid method \"FETCH\" (use GET, HEAD, POST, PUT, PATCH, DELETE, CONNECT, OPTIONS, TRACE)",
            ),
            (
                "api",
                web_l7(json!({"Methods": ["GET", "get"]})),
                "Sources[0].Permissions[0].HTTP.Methods: contains \"GET\" more than once",
            ),
            (
                "api",
                web_l7(json!({"Methods": [1]})),
                "Sources[0].Permissions[0].HTTP.Methods[0]: must be a string",
            ),
            (
                "api",
                web_l7(json!({"Header": [{"Exact": "x"}]})),
                "Sources[0].Permissions[0].HTTP.Header[0].Name: is required",
            ),
            (
                "api",
                web_l7(json!({"Header": [{"Name": "x"}]})),
                "Sources[0].Permissions[0].HTTP.Header[0]: should only contain one of Present, Exact, Prefix, Suffix, Contains, or Regex",
            ),
            (
                "api",
                web_l7(json!({"Header": [{"Name": "x", "Exact": "a", "Prefix": "b"}]})),
                "Sources[0].Permissions[0].HTTP.Header[0]: should only contain one of Present, Exact, Prefix, Suffix, Contains, or Regex",
            ),
            (
                "api",
                web_l7(json!({"Header": [{"Name": "x", "Present": "yes"}]})),
                "Sources[0].Permissions[0].HTTP.Header[0].Present: must be true or false",
            ),
            (
                "api",
                web_l7(json!({"Header": [{"Name": "bad name", "Present": true}]})),
                "Sources[0].Permissions[0].HTTP.Header[0].Name: \"bad name\" is not a valid header name",
            ),
            (
                "api",
                web_l7(json!({"Header": [{"Name": ":path", "Prefix": "/"}]})),
                "Sources[0].Permissions[0].HTTP.Header[0].Name: not supported by Meshwork: pseudo-headers other than :authority and :method (match the path with PathExact, PathPrefix or PathRegex)",
            ),
        ];
        for (name, value, want) in cases {
            assert_eq!(error(name, value.clone()), want, "entry {name:?}: {value}");
        }
    }
}
