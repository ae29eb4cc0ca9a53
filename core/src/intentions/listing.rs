//! [`flatten`]: every (destination, source) intention of a set of entries,
//! validated, in Consul's order, for `/v1/connect/intentions/match` and
//! listings.
//!
//! Owns: the listed form and its order. Does not touch: deciding (`set`).

use serde_json::{Map, Value};

use super::entry::{Verdict, parse_entry};
use super::error::IntentionError;
use super::{Action, precedence};

/// One (destination, source) intention as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatIntention {
    /// The entry's name (a service or `*`).
    pub destination: String,
    pub source: String,
    pub precedence: u32,
    /// `None` for an L7 intention.
    pub action: Option<Action>,
    /// `Permissions` as given, for an L7 intention.
    pub permissions: Option<Value>,
    pub description: Option<String>,
    /// The entry's `Meta` as given.
    pub meta: Option<Value>,
}

/// Every intention in `entries`, validated, in Consul's order: precedence
/// (highest first), then source name, then destination name
/// (`IntentionPrecedenceSorter`).
pub fn flatten<'a>(
    entries: impl IntoIterator<Item = (&'a str, &'a Map<String, Value>)>,
) -> Result<Vec<FlatIntention>, IntentionError> {
    let mut out = Vec::new();
    for (name, body) in entries {
        let parsed = parse_entry(name, body).map_err(|e| e.in_entry(name))?;
        for source in parsed.sources {
            out.push(FlatIntention {
                destination: name.to_owned(),
                source: source.name.to_owned(),
                precedence: precedence(name, source.name),
                action: match source.verdict {
                    Verdict::Allow => Some(Action::Allow),
                    Verdict::Deny => Some(Action::Deny),
                    Verdict::Permissions(_) => None,
                },
                permissions: source.permissions.cloned(),
                description: source.description.map(str::to_owned),
                meta: parsed.meta.cloned(),
            });
        }
    }
    out.sort_by(|a, b| {
        b.precedence
            .cmp(&a.precedence)
            .then_with(|| a.source.cmp(&b.source))
            .then_with(|| a.destination.cmp(&b.destination))
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::Action;
    use super::super::test_support::body;
    use super::flatten;

    #[test]
    fn flatten_lists_in_consul_order() {
        let api = body(json!({"Meta": {"k": "v"}, "Sources": [
            {"Name": "*", "Action": "deny"},
            {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]},
            {"Name": "admin", "Action": "allow", "Description": "ops"},
        ]}));
        let wild = body(json!({"Sources": [
            {"Name": "*", "Action": "allow"},
            {"Name": "web", "Action": "deny"},
        ]}));
        let billing = body(json!({"Sources": [{"Name": "web", "Action": "allow"}]}));
        let flat = flatten([("api", &api), ("*", &wild), ("billing", &billing)]).expect("valid");
        let order: Vec<(u32, &str, &str)> = flat
            .iter()
            .map(|f| (f.precedence, f.source.as_str(), f.destination.as_str()))
            .collect();
        assert_eq!(
            order,
            vec![
                (9, "admin", "api"),
                (9, "web", "api"),
                (9, "web", "billing"),
                (8, "*", "api"),
                (6, "web", "*"),
                (5, "*", "*"),
            ]
        );
        assert_eq!(flat[0].action, Some(Action::Allow));
        assert_eq!(flat[0].description.as_deref(), Some("ops"));
        assert_eq!(flat[0].meta, Some(json!({"k": "v"})));
        assert_eq!(flat[1].action, None);
        assert_eq!(
            flat[1].permissions,
            Some(json!([{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]))
        );
        assert_eq!(flat[3].action, Some(Action::Deny));
        assert_eq!(flat[4].meta, None);
    }
}
