//! Consul's ACL rule language, in HCL or JSON:
//!
//! ```hcl
//! key_prefix "app/" { policy = "write" }
//! service "web" { policy = "write" intentions = "read" }
//! operator = "read"
//! ```
//!
//! Parsed into [`Rules`]; a rule that does not parse is an error with its
//! line and column, never skipped.

use std::fmt;

use hcl_edit::Span;
use hcl_edit::expr::{Expression, ObjectKey};
use hcl_edit::structure::{BlockLabel, Body, Structure};
use serde_json::Value;

/// What a rule grants. Ordered by precedence when two policies give the
/// same name a rule: deny, then the most permissive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    Read,
    List,
    Write,
    Deny,
}

impl Access {
    fn parse(text: &str) -> Option<Access> {
        Some(match text {
            "read" => Access::Read,
            "list" => Access::List,
            "write" => Access::Write,
            "deny" => Access::Deny,
            _ => return None,
        })
    }

    /// Whether this grants `need`.
    pub fn grants(self, need: Need) -> bool {
        match (self, need) {
            (Access::Deny, _) => false,
            (Access::Write, _) => true,
            (Access::List, Need::Read | Need::List) => true,
            (Access::Read, Need::Read) => true,
            _ => false,
        }
    }

    /// The rule to keep when two policies both give one: deny wins, then
    /// the more permissive.
    pub fn merge(self, other: Access) -> Access {
        self.max(other)
    }
}

/// The permission an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Need {
    Read,
    List,
    Write,
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Need::Read => "read",
            Need::List => "list",
            Need::Write => "write",
        })
    }
}

/// Resources whose rules are per name (exact or by prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Key,
    Service,
    Node,
    Session,
    Agent,
    Event,
    Query,
    /// A service's `intentions` (as the destination).
    Intention,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Key,
        Kind::Service,
        Kind::Node,
        Kind::Session,
        Kind::Agent,
        Kind::Event,
        Kind::Query,
        Kind::Intention,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Key => "key",
            Kind::Service => "service",
            Kind::Node => "node",
            Kind::Session => "session",
            Kind::Agent => "agent",
            Kind::Event => "event",
            Kind::Query => "query",
            Kind::Intention => "intention",
        }
    }

    fn from_rule(word: &str) -> Option<(Kind, bool)> {
        let (base, prefix) = match word.strip_suffix("_prefix") {
            Some(base) => (base, true),
            None => (word, false),
        };
        let kind = Kind::ALL
            .into_iter()
            .find(|k| *k != Kind::Intention && k.name() == base)?;
        Some((kind, prefix))
    }
}

/// Resources with one rule each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Single {
    Acl,
    Operator,
    Mesh,
    Keyring,
    Peering,
}

impl Single {
    pub const ALL: [Single; 5] = [
        Single::Acl,
        Single::Operator,
        Single::Mesh,
        Single::Keyring,
        Single::Peering,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Single::Acl => "acl",
            Single::Operator => "operator",
            Single::Mesh => "mesh",
            Single::Keyring => "keyring",
            Single::Peering => "peering",
        }
    }
}

/// One per-name rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub kind: Kind,
    pub name: String,
    /// A `*_prefix` rule: it covers every name starting with `name`.
    pub prefix: bool,
    pub access: Access,
}

/// A policy's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub rules: Vec<Rule>,
    pub singles: Vec<(Single, Access)>,
}

/// Why rules did not parse: a message, and where when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesError {
    pub message: String,
    /// 1-based line and column.
    pub at: Option<(usize, usize)>,
}

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((line, column)) => write!(
                f,
                "Failed to parse ACL rules: line {line}, column {column}: {}",
                self.message
            ),
            None => write!(f, "Failed to parse ACL rules: {}", self.message),
        }
    }
}

/// The most rules one policy may hold (each is checked on requests).
pub const MAX_RULES: usize = 4096;

/// Parses rules in HCL or, when the text starts with `{`, JSON.
pub fn parse(text: &str) -> Result<Rules, RulesError> {
    let mut rules = if text.trim_start().starts_with('{') {
        parse_json(text)?
    } else {
        parse_hcl(text)?
    };
    if rules.rules.len() > MAX_RULES {
        return Err(RulesError {
            message: format!("a policy may hold at most {MAX_RULES} rules"),
            at: None,
        });
    }
    // One order whatever the notation (JSON objects come sorted).
    rules.rules.sort_by(|a, b| {
        (a.kind.name(), a.prefix, &a.name).cmp(&(b.kind.name(), b.prefix, &b.name))
    });
    rules.singles.sort_by_key(|(s, _)| s.name());
    rules.rules.shrink_to_fit();
    Ok(rules)
}

/// A rule being collected, with its place for error messages.
struct Collector<'t> {
    text: &'t str,
    rules: Rules,
}

impl Collector<'_> {
    fn error(&self, span: Option<std::ops::Range<usize>>, message: String) -> RulesError {
        RulesError {
            message,
            at: span.map(|s| line_column(self.text, s.start)),
        }
    }

    fn single(&mut self, single: Single, access: Access) -> Result<(), String> {
        if access == Access::List {
            return Err(format!(
                "{}: \"list\" is not a policy for it (use read, write or deny)",
                single.name()
            ));
        }
        if self.rules.singles.iter().any(|(s, _)| *s == single) {
            return Err(format!("{} is given more than once", single.name()));
        }
        self.rules.singles.push((single, access));
        Ok(())
    }

    /// A named rule's fields: `policy` (required) and, for services,
    /// `intentions`.
    fn named(&mut self, word: &str, name: &str, fields: &[(String, String)]) -> Result<(), String> {
        let (kind, prefix) = Kind::from_rule(word).ok_or_else(|| unknown(word))?;
        let mut policy = None;
        let mut intentions = None;
        for (field, value) in fields {
            let access = Access::parse(value).ok_or_else(|| {
                format!(
                    "{word} {name:?}: invalid {field} {value:?} (use read, write, list or deny)"
                )
            })?;
            match field.as_str() {
                "policy" => policy = Some(access),
                "intentions" if kind == Kind::Service => intentions = Some(access),
                other => {
                    return Err(format!("{word} {name:?}: unknown field {other:?}"));
                }
            }
        }
        let policy = policy.ok_or_else(|| format!("{word} {name:?}: policy is missing"))?;
        if policy == Access::List && kind != Kind::Key {
            return Err(format!(
                "{word} {name:?}: \"list\" is a policy for keys only"
            ));
        }
        if self
            .rules
            .rules
            .iter()
            .any(|r| r.kind == kind && r.prefix == prefix && r.name == name)
        {
            return Err(format!("{word} {name:?} is given more than once"));
        }
        self.rules.rules.push(Rule {
            kind,
            name: name.to_owned(),
            prefix,
            access: policy,
        });
        // A service's read implies reading its intentions, and its deny
        // denies them (as Consul).
        let intentions = intentions.or(match (kind, policy) {
            (Kind::Service, Access::Read | Access::Write) => Some(Access::Read),
            (Kind::Service, Access::Deny) => Some(Access::Deny),
            _ => None,
        });
        if let Some(access) = intentions {
            self.rules.rules.push(Rule {
                kind: Kind::Intention,
                name: name.to_owned(),
                prefix,
                access,
            });
        }
        Ok(())
    }
}

fn unknown(word: &str) -> String {
    format!(
        "unknown rule type {word:?} (known: key, service, node, session, agent, event, query \
         and their _prefix forms; acl, operator, mesh, keyring, peering)"
    )
}

fn single_of(word: &str) -> Option<Single> {
    Single::ALL.into_iter().find(|s| s.name() == word)
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

fn parse_hcl(text: &str) -> Result<Rules, RulesError> {
    let body = hcl_edit::parser::parse_body(text).map_err(|e| RulesError {
        message: e.message().to_owned(),
        at: Some((e.location().line(), e.location().column())),
    })?;
    let mut c = Collector {
        text,
        rules: Rules::default(),
    };
    for structure in body.iter() {
        match structure {
            Structure::Attribute(attr) => {
                let word = attr.key.as_str();
                let span = attr.span();
                if let Some(single) = single_of(word) {
                    let access =
                        string_of(&attr.value)
                            .and_then(Access::parse)
                            .ok_or_else(|| {
                                c.error(
                                    span.clone(),
                                    format!(
                                        "{word}: policy must be \"read\", \"write\" or \"deny\""
                                    ),
                                )
                            })?;
                    c.single(single, access).map_err(|m| c.error(span, m))?;
                } else if Kind::from_rule(word).is_some() {
                    // `key_prefix = { "app/" = { policy = "read" } }`
                    let Expression::Object(object) = &attr.value else {
                        return Err(c.error(span, format!("{word}: expected a block")));
                    };
                    for (key, value) in object.iter() {
                        let name = match key {
                            ObjectKey::Ident(i) => i.as_str().to_owned(),
                            ObjectKey::Expression(e) => string_of(e)
                                .ok_or_else(|| {
                                    c.error(span.clone(), format!("{word}: names are strings"))
                                })?
                                .to_owned(),
                        };
                        let Expression::Object(inner) = value.expr() else {
                            return Err(c.error(span, format!("{word} {name:?}: expected a block")));
                        };
                        let mut fields = Vec::new();
                        for (k, v) in inner.iter() {
                            let field = match k {
                                ObjectKey::Ident(i) => i.as_str().to_owned(),
                                ObjectKey::Expression(e) => {
                                    string_of(e).unwrap_or_default().to_owned()
                                }
                            };
                            let value = string_of(v.expr()).ok_or_else(|| {
                                c.error(
                                    span.clone(),
                                    format!("{word} {name:?}: {field} must be a string"),
                                )
                            })?;
                            fields.push((field, value.to_owned()));
                        }
                        c.named(word, &name, &fields)
                            .map_err(|m| c.error(span.clone(), m))?;
                    }
                } else {
                    return Err(c.error(span, unknown(word)));
                }
            }
            Structure::Block(block) => {
                let word = block.ident.as_str();
                let span = block.span();
                if single_of(word).is_some() {
                    return Err(
                        c.error(span, format!("{word} takes a policy, as {word} = \"read\""))
                    );
                }
                let [label] = block.labels.as_slice() else {
                    return Err(c.error(
                        span,
                        format!("{word} takes exactly one name, as {word} \"name\" {{ ... }}"),
                    ));
                };
                let name = match label {
                    BlockLabel::String(s) => s.as_str(),
                    BlockLabel::Ident(i) => i.as_str(),
                };
                let fields = block_fields(&c, &block.body, word, name)?;
                c.named(word, name, &fields).map_err(|m| c.error(span, m))?;
            }
        }
    }
    Ok(c.rules)
}

fn block_fields(
    c: &Collector<'_>,
    body: &Body,
    word: &str,
    name: &str,
) -> Result<Vec<(String, String)>, RulesError> {
    let mut fields = Vec::new();
    for structure in body.iter() {
        match structure {
            Structure::Attribute(attr) => {
                let value = string_of(&attr.value).ok_or_else(|| {
                    c.error(
                        attr.span(),
                        format!("{word} {name:?}: {} must be a string", attr.key.as_str()),
                    )
                })?;
                fields.push((attr.key.as_str().to_owned(), value.to_owned()));
            }
            Structure::Block(inner) => {
                return Err(c.error(
                    inner.span(),
                    format!(
                        "{word} {name:?}: unexpected block {:?}",
                        inner.ident.as_str()
                    ),
                ));
            }
        }
    }
    Ok(fields)
}

fn string_of(expr: &Expression) -> Option<&str> {
    match expr {
        Expression::String(s) => Some(s.as_str()),
        _ => None,
    }
}

/// JSON that refuses a key given twice in one object (serde_json would
/// keep the last silently, and a later `read` could undo an earlier
/// `deny`).
struct NoDuplicates(Value);

impl<'de> serde::Deserialize<'de> for NoDuplicates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
                Ok(Value::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
                Ok(Value::from(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
                Ok(Value::from(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
                Ok(Value::from(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Value, E> {
                Ok(Value::String(v.to_owned()))
            }
            fn visit_unit<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_none<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Value, A::Error> {
                let mut items = Vec::new();
                while let Some(NoDuplicates(v)) = seq.next_element()? {
                    items.push(v);
                }
                Ok(Value::Array(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Value, A::Error> {
                let mut object = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    if object.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!(
                            "{key:?} is given more than once"
                        )));
                    }
                    let NoDuplicates(value) = map.next_value()?;
                    object.insert(key, value);
                }
                Ok(Value::Object(object))
            }
        }
        d.deserialize_any(Visit).map(NoDuplicates)
    }
}

fn parse_json(text: &str) -> Result<Rules, RulesError> {
    let NoDuplicates(value) = serde_json::from_str(text).map_err(|e| RulesError {
        message: e.to_string(),
        at: Some((e.line(), e.column())),
    })?;
    let mut c = Collector {
        text,
        rules: Rules::default(),
    };
    let plain = |message: String| RulesError { message, at: None };
    let Value::Object(top) = value else {
        return Err(plain("rules must be an object".into()));
    };
    for (word, value) in top {
        if let Some(single) = single_of(&word) {
            let access = value.as_str().and_then(Access::parse).ok_or_else(|| {
                plain(format!(
                    "{word}: policy must be \"read\", \"write\" or \"deny\""
                ))
            })?;
            c.single(single, access).map_err(plain)?;
            continue;
        }
        if Kind::from_rule(&word).is_none() {
            return Err(plain(unknown(&word)));
        }
        // `{"key_prefix": {"app/": {"policy": "read"}}}`, or HCL1's list
        // of such objects.
        let objects = match value {
            Value::Object(o) => vec![o],
            Value::Array(items) => items
                .into_iter()
                .map(|i| match i {
                    Value::Object(o) => Ok(o),
                    _ => Err(plain(format!("{word}: expected objects"))),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(plain(format!("{word}: expected an object"))),
        };
        for object in objects {
            for (name, fields) in object {
                let Value::Object(fields) = fields else {
                    return Err(plain(format!("{word} {name:?}: expected an object")));
                };
                let mut pairs = Vec::new();
                for (field, v) in fields {
                    let v = v.as_str().ok_or_else(|| {
                        plain(format!("{word} {name:?}: {field} must be a string"))
                    })?;
                    pairs.push((field, v.to_owned()));
                }
                c.named(&word, &name, &pairs).map_err(plain)?;
            }
        }
    }
    Ok(c.rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hcl_and_json_say_the_same() {
        let hcl = r#"
# app keys
key_prefix "app/" {
  policy = "write"
}
key "app/secret" { policy = "deny" }
service "web" {
  policy = "write"
  intentions = "write"
}
operator = "read"
"#;
        let json = r#"{"key_prefix": {"app/": {"policy": "write"}},
            "key": {"app/secret": {"policy": "deny"}},
            "service": {"web": {"policy": "write", "intentions": "write"}},
            "operator": "read"}"#;
        let a = parse(hcl).expect("hcl");
        let b = parse(json).expect("json");
        assert_eq!(a, b);
        assert_eq!(a.rules.len(), 4, "{a:?}");
        assert_eq!(a.singles, vec![(Single::Operator, Access::Read)]);
    }

    #[test]
    fn errors_say_where() {
        let err = parse("key_prefix \"a\" {\n  policy = \"wrtie\"\n}\n").expect_err("bad");
        assert!(
            err.to_string().contains("invalid policy \"wrtie\""),
            "{err}"
        );
        assert_eq!(err.at, Some((1, 1)));
        let err = parse("key_prefix \"a\" {\n  policy = \n").expect_err("syntax");
        assert!(err.at.is_some_and(|(line, _)| line >= 2), "{err}");
        let err = parse("\n\nkye \"a\" { policy = \"read\" }").expect_err("unknown");
        assert_eq!(err.at, Some((3, 1)));
        assert!(
            err.to_string().contains("unknown rule type \"kye\""),
            "{err}"
        );
        let err = parse("{\"key\": 3}").expect_err("json");
        assert!(err.to_string().contains("expected an object"), "{err}");
        let err = parse("{\"key\": ").expect_err("json syntax");
        assert!(err.at.is_some(), "{err}");
        assert!(parse("service \"a\" { policy = \"list\" }").is_err());
        assert!(parse("operator = \"list\"").is_err());
        assert!(parse("key \"a\" {}").is_err(), "policy is required");
        assert!(parse("key \"a\" \"b\" { policy = \"read\" }").is_err());
        assert!(parse("operator = \"read\"\noperator = \"write\"").is_err());
        let err = parse(r#"{"key": {"a": {"policy": "deny"}}, "key": {"a": {"policy": "read"}}}"#)
            .expect_err("a JSON key twice");
        assert!(err.to_string().contains("given more than once"), "{err}");
        let denied = parse(r#"service "db" { policy = "deny" }"#).expect("deny");
        assert!(
            denied
                .rules
                .iter()
                .any(|r| r.kind == Kind::Intention && r.access == Access::Deny),
            "a denied service denies its intentions"
        );
    }

    #[test]
    fn empty_rules_grant_nothing() {
        assert_eq!(parse("").expect("empty"), Rules::default());
        assert_eq!(parse("  {}  ").expect("empty json"), Rules::default());
    }
}
