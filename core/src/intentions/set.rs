//! [`IntentionSet`]: the intentions that apply to one destination,
//! compiled by precedence, deciding connections (L4) and requests (L7).
//!
//! Owns: precedence between intentions, the tie at equal precedence, and
//! what an L7 intention means for a connection or a request. Does not
//! touch: reading entries (`entry`), matching one permission (`matching`).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::entry::{Verdict, parse_entry};
use super::error::{IntentionError, invalid};
use super::{Action, DecidedBy, Decision, HeaderValues, Request, Rule, WILDCARD, precedence};

/// One source intention, compiled.
#[derive(Debug)]
struct Compiled {
    destination: Arc<str>,
    source: Arc<str>,
    precedence: u32,
    verdict: Verdict,
}

impl Compiled {
    fn rule(&self, by: DecidedBy) -> Rule {
        Rule::Intention {
            destination: Arc::clone(&self.destination),
            source: Arc::clone(&self.source),
            precedence: self.precedence,
            by,
        }
    }
}

/// The intentions that apply to one destination, compiled: build once per
/// change of the entries, share (it is `Send + Sync`), ask per connection
/// or request.
#[derive(Debug)]
pub struct IntentionSet {
    destination: Arc<str>,
    default_allow: bool,
    /// Precedence 9: the destination's entry, exact sources.
    exact: HashMap<Arc<str>, Compiled>,
    /// Precedence 8: the destination's entry, source `*`.
    exact_any: Option<Compiled>,
    /// Precedence 6: the `*` entry, exact sources.
    wild: HashMap<Arc<str>, Compiled>,
    /// Precedence 5: the `*` entry, source `*`.
    wild_any: Option<Compiled>,
}

/// Keeps the stronger of two intentions of equal precedence.
fn keep_stronger(slot: &mut Option<Compiled>, new: Compiled) {
    match slot {
        Some(old) if old.verdict.strength() >= new.verdict.strength() => {}
        _ => *slot = Some(new),
    }
}

fn insert_stronger(map: &mut HashMap<Arc<str>, Compiled>, new: Compiled) {
    match map.entry(Arc::clone(&new.source)) {
        Entry::Occupied(mut old) => {
            if new.verdict.strength() > old.get().verdict.strength() {
                old.insert(new);
            }
        }
        Entry::Vacant(slot) => {
            slot.insert(new);
        }
    }
}

impl IntentionSet {
    /// Compiles the entries that apply to `destination`: its own entry and
    /// the `*` entry; entries for other names are skipped unread.
    /// `default_allow` is what applies when no intention matches (ACL
    /// default policy allow, or no ACLs).
    pub fn compile<'a>(
        destination: &str,
        entries: impl IntoIterator<Item = (&'a str, &'a Map<String, Value>)>,
        default_allow: bool,
    ) -> Result<Self, IntentionError> {
        if destination.is_empty() || destination.contains('*') {
            return Err(invalid(
                "destination",
                format!("{destination:?} is not a service name"),
            ));
        }
        let mut set = IntentionSet {
            destination: destination.into(),
            default_allow,
            exact: HashMap::new(),
            exact_any: None,
            wild: HashMap::new(),
            wild_any: None,
        };
        for (name, body) in entries {
            let wild = name == WILDCARD;
            if !wild && name != destination {
                continue;
            }
            let parsed = parse_entry(name, body).map_err(|e| e.in_entry(name))?;
            let entry_name: Arc<str> = if wild {
                WILDCARD.into()
            } else {
                Arc::clone(&set.destination)
            };
            for source in parsed.sources {
                let compiled = Compiled {
                    destination: Arc::clone(&entry_name),
                    source: source.name.into(),
                    precedence: precedence(name, source.name),
                    verdict: source.verdict,
                };
                match (wild, source.name == WILDCARD) {
                    (false, false) => insert_stronger(&mut set.exact, compiled),
                    (false, true) => keep_stronger(&mut set.exact_any, compiled),
                    (true, false) => insert_stronger(&mut set.wild, compiled),
                    (true, true) => keep_stronger(&mut set.wild_any, compiled),
                }
            }
        }
        Ok(set)
    }

    /// The destination this set decides for.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// What applies when no intention matches.
    pub fn default_allow(&self) -> bool {
        self.default_allow
    }

    /// True when some intention has L7 permissions, so requests must be
    /// parsed as HTTP and decided one by one.
    pub fn has_permissions(&self) -> bool {
        self.all()
            .any(|c| matches!(c.verdict, Verdict::Permissions(_)))
    }

    fn all(&self) -> impl Iterator<Item = &Compiled> {
        self.exact
            .values()
            .chain(&self.exact_any)
            .chain(self.wild.values())
            .chain(&self.wild_any)
    }

    /// The highest-precedence intention whose source matches `source`.
    fn find(&self, source: &str) -> Option<&Compiled> {
        self.exact
            .get(source)
            .or(self.exact_any.as_ref())
            .or_else(|| self.wild.get(source))
            .or(self.wild_any.as_ref())
    }

    fn default_decision(&self) -> Decision {
        Decision {
            allow: self.default_allow,
            rule: Rule::Default,
        }
    }

    /// The decision for a connection from `source` (L4; also
    /// `intentions/check` and `agent/connect/authorize`). An intention with
    /// permissions denies here, as in Consul.
    pub fn decide_connection(&self, source: &str) -> Decision {
        let Some(intention) = self.find(source) else {
            return self.default_decision();
        };
        let (allow, by) = match &intention.verdict {
            Verdict::Allow => (true, DecidedBy::Action),
            Verdict::Deny => (false, DecidedBy::Action),
            Verdict::Permissions(_) => (false, DecidedBy::PermissionsAtConnection),
        };
        Decision {
            allow,
            rule: intention.rule(by),
        }
    }

    /// The decision for one HTTP request from `source` (L7).
    pub fn decide_request<H: HeaderValues + ?Sized>(
        &self,
        source: &str,
        request: &Request<'_, H>,
    ) -> Decision {
        let Some(intention) = self.find(source) else {
            return self.default_decision();
        };
        let (allow, by) = match &intention.verdict {
            Verdict::Allow => (true, DecidedBy::Action),
            Verdict::Deny => (false, DecidedBy::Action),
            Verdict::Permissions(permissions) => {
                match permissions.iter().position(|p| p.matches(request)) {
                    Some(i) => (
                        permissions[i].action == Action::Allow,
                        DecidedBy::Permission(i),
                    ),
                    None => (self.default_allow, DecidedBy::NoPermission),
                }
            }
        };
        Decision {
            allow,
            rule: intention.rule(by),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::test_support::{NO_HEADERS, body, get, set};
    use super::super::{Decision, Request, Rule, precedence};
    use super::IntentionSet;

    #[test]
    fn precedence_values_are_consuls() {
        assert_eq!(precedence("api", "web"), 9);
        assert_eq!(precedence("api", "*"), 8);
        assert_eq!(precedence("*", "web"), 6);
        assert_eq!(precedence("*", "*"), 5);
    }

    #[test]
    fn exact_source_beats_wildcard_source() {
        let set = set(
            &[(
                "api",
                json!({"Sources": [
                    {"Name": "*", "Action": "deny"},
                    {"Name": "web", "Action": "allow"},
                ]}),
            )],
            true,
        );
        let web = set.decide_connection("web");
        assert!(web.allow);
        assert_eq!(web.rule.to_string(), "web -> api");
        let db = set.decide_connection("db");
        assert!(!db.allow);
        assert_eq!(db.rule.to_string(), "* -> api");
        assert!(matches!(db.rule, Rule::Intention { precedence: 8, .. }));
    }

    #[test]
    fn destination_entry_beats_wildcard_entry_and_others_are_ignored() {
        let entries = [
            (
                "*",
                json!({"Sources": [
                    {"Name": "web", "Action": "deny"},
                    {"Name": "*", "Action": "deny"},
                ]}),
            ),
            (
                "api",
                json!({"Sources": [{"Name": "*", "Action": "allow"}]}),
            ),
            // Another destination's entry: never consulted for api, even
            // an invalid one.
            (
                "billing",
                json!({"Sources": [{"Name": "web", "Action": "bogus"}]}),
            ),
        ];
        let set = set(&entries, false);
        // api/* (8) beats */web (6).
        let web = set.decide_connection("web");
        assert!(web.allow);
        assert!(matches!(web.rule, Rule::Intention { precedence: 8, .. }));

        let only_wild = self::set(&entries[..1], true);
        let web = only_wild.decide_connection("web");
        assert!(!web.allow);
        assert_eq!(web.rule.to_string(), "web -> *");
        assert!(matches!(web.rule, Rule::Intention { precedence: 6, .. }));
        let db = only_wild.decide_connection("db");
        assert!(!db.allow);
        assert!(matches!(db.rule, Rule::Intention { precedence: 5, .. }));

        let none = self::set(&[], true);
        assert_eq!(
            none.decide_connection("web"),
            Decision {
                allow: true,
                rule: Rule::Default
            }
        );
        let none = self::set(&[], false);
        assert!(!none.decide_connection("web").allow);
        assert_eq!(none.decide_connection("web").rule.to_string(), "default");
    }

    #[test]
    fn deny_wins_at_equal_precedence() {
        let set = set(
            &[
                (
                    "api",
                    json!({"Sources": [{"Name": "web", "Action": "allow"}, {"Name": "*", "Action": "allow"}]}),
                ),
                (
                    "api",
                    json!({"Sources": [{"Name": "web", "Action": "deny"}, {"Name": "*", "Action": "deny"}]}),
                ),
                (
                    "api",
                    json!({"Sources": [{"Name": "web", "Action": "allow"}, {"Name": "*", "Action": "allow"}]}),
                ),
            ],
            true,
        );
        assert!(!set.decide_connection("web").allow);
        assert!(!set.decide_connection("db").allow);
        assert!(!set.decide_request("web", &get("/")).allow);
    }

    #[test]
    fn l4_and_l7() {
        let set = set(
            &[
                (
                    "api",
                    json!({"Sources": [{"Name": "web", "Permissions": [
                        {"Action": "allow", "HTTP": {"PathPrefix": "/public"}},
                    ]}]}),
                ),
                ("*", json!({"Sources": [{"Name": "*", "Action": "allow"}]})),
            ],
            false,
        );
        assert!(set.has_permissions());
        // A connection from an L7 source: deny, as Consul's check/authorize.
        let conn = set.decide_connection("web");
        assert!(!conn.allow);
        assert_eq!(
            conn.rule.to_string(),
            "web -> api (L7 permissions: deny for a connection)"
        );
        // L4 intentions decide requests too.
        assert!(set.decide_request("db", &get("/anything")).allow);
        assert!(set.decide_connection("db").allow);

        let ok = set.decide_request("web", &get("/public/x"));
        assert!(ok.allow);
        assert_eq!(ok.rule.permission(), Some(0));
        // No permission matches: the default (deny), not the lower `*`
        // intention that would allow.
        let no = set.decide_request("web", &get("/private"));
        assert!(!no.allow);
        assert_eq!(
            no.rule.to_string(),
            "web -> api (no permission matched: default)"
        );

        let allowing = self::set(
            &[(
                "api",
                json!({"Sources": [{"Name": "web", "Permissions": [
                    {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
                ]}]}),
            )],
            true,
        );
        assert!(allowing.decide_request("web", &get("/x")).allow);
        assert!(!allowing.decide_request("web", &get("/admin")).allow);
        assert!(!allowing.decide_connection("web").allow);
        assert!(!self::set(&[], true).has_permissions());
    }

    #[test]
    fn permissions_apply_in_order() {
        let set = set(
            &[(
                "api",
                json!({"Sources": [{"Name": "web", "Permissions": [
                    {"Action": "deny", "HTTP": {"PathPrefix": "/v2/admin"}},
                    {"Action": "allow", "HTTP": {"PathPrefix": "/v2"}},
                    {"Action": "allow", "HTTP": {"PathExact": "/healthz", "Methods": ["GET"]}},
                    {"Action": "deny", "HTTP": {"PathPrefix": "/"}},
                ]}]}),
            )],
            true,
        );
        let cases = [
            ("GET", "/v2/admin/users", false, Some(0)),
            ("GET", "/v2/orders", true, Some(1)),
            ("GET", "/healthz", true, Some(2)),
            ("POST", "/healthz", false, Some(3)),
            ("GET", "/healthz/x", false, Some(3)),
        ];
        for (method, path, allow, permission) in cases {
            let d = set.decide_request("web", &Request::new(method, path, NO_HEADERS));
            assert_eq!(d.allow, allow, "{method} {path}");
            assert_eq!(d.rule.permission(), permission, "{method} {path}");
        }
        let d = set.decide_request("web", &get("/v2/admin"));
        assert_eq!(d.rule.to_string(), "web -> api permission #0");
    }

    #[test]
    fn compile_names_the_entry_at_fault() {
        let good = body(json!({"Sources": [{"Name": "web", "Action": "allow"}]}));
        let bad = body(json!({"Sources": [{"Name": "web", "Action": "maybe"}]}));
        let err = IntentionSet::compile("api", [("api", &good), ("*", &bad)], false)
            .expect_err("the * entry is bad");
        assert_eq!(err.entry(), Some("*"));
        assert_eq!(err.path(), "Sources[0].Action");
        assert_eq!(
            err.to_string(),
            "service-intentions entry \"*\": Sources[0].Action: must be \"allow\" or \"deny\", not \"maybe\""
        );
        let err =
            IntentionSet::compile("a*", [("api", &good)], false).expect_err("bad destination");
        assert_eq!(err.to_string(), "destination: \"a*\" is not a service name");
    }

    #[test]
    fn set_is_shareable() {
        fn shareable<T: Send + Sync>() {}
        shareable::<IntentionSet>();
        shareable::<Decision>();
    }
}
