//! Consul's filter expressions (go-bexpr), as `service-resolver` subsets
//! use them: `Service.Meta.version == v2`, `"canary" in Service.Tags`,
//! `Service.Tags contains canary and not (Node.Node == n3)`.
//!
//! Parsed once (an unknown selector or a syntax error is an error naming
//! the place, so the registry refuses the entry at `PUT`), evaluated per
//! instance against a [`Fields`] view, without allocating.
//!
//! Grammar (go-bexpr's):
//!
//! ```text
//! expr     := and ("or" and)*
//! and      := unary ("and" unary)*
//! unary    := "not" unary | "(" expr ")" | match
//! match    := selector ("==" | "!=") value
//!           | selector ("contains" | "not contains") value
//!           | selector ("matches" | "not matches") value
//!           | selector "is" ["not"] "empty"
//!           | value ["not"] "in" selector
//! selector := name ("." name | "[" quoted "]")*
//! value    := quoted ("..." or `...`) | a bare word (v2, 8080, true)
//! ```
//!
//! Selectors: `Service.ID`, `Service.Service` (also `Service.Name`),
//! `Service.Address`, `Service.Port`, `Service.Tags`, `Service.Meta.<key>`,
//! `Node.Node` (also `Node.Name`), `Node.Address`. `==` on a list is false
//! (as in bexpr: compare an element with `in`); a missing meta key is
//! empty.

use std::fmt;

/// A parsed filter.
#[derive(Debug, Clone)]
pub struct Filter {
    expr: Expr,
    text: String,
}

/// One instance as a filter sees it.
pub trait Fields {
    fn service_id(&self) -> &str;
    fn service_name(&self) -> &str;
    fn address(&self) -> &str;
    fn port(&self) -> u32;
    fn tags(&self) -> &[String];
    fn meta(&self, key: &str) -> Option<&str>;
    fn meta_is_empty(&self) -> bool;
    fn node(&self) -> &str;
    fn node_address(&self) -> &str;
}

/// A filter that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter {text:?}: {why} (at character {at})")]
pub struct FilterError {
    pub text: String,
    pub at: usize,
    pub why: String,
}

#[derive(Debug, Clone)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Match(Selector, Op, String),
    /// `matches` (true) or `not matches` (false), compiled once.
    Regex(Selector, bool, regex::Regex),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Equal,
    NotEqual,
    Contains,
    NotContains,
    Empty,
    NotEmpty,
    In,
    NotIn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    ServiceId,
    ServiceName,
    Address,
    Port,
    Tags,
    Meta(String),
    /// `Service.Meta` itself (for `is empty`, `"k" in Service.Meta`).
    MetaMap,
    Node,
    NodeAddress,
}

/// A value as a selector yields it.
enum Value<'a> {
    Text(std::borrow::Cow<'a, str>),
    List(&'a [String]),
    Map,
}

impl Filter {
    /// Parses `text`; `Err` names what is wrong and where.
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        let tokens = tokenize(text)?;
        let mut parser = Parser {
            text,
            tokens: &tokens,
            pos: 0,
        };
        let expr = parser.or()?;
        if let Some(token) = parser.tokens.get(parser.pos) {
            return Err(parser.error(token.at, format!("unexpected {:?}", token.text)));
        }
        Ok(Self {
            expr,
            text: text.to_owned(),
        })
    }

    /// Whether `fields` passes.
    pub fn matches(&self, fields: &dyn Fields) -> bool {
        eval(&self.expr, fields)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn eval(expr: &Expr, fields: &dyn Fields) -> bool {
    match expr {
        Expr::Or(a, b) => eval(a, fields) || eval(b, fields),
        Expr::And(a, b) => eval(a, fields) && eval(b, fields),
        Expr::Not(a) => !eval(a, fields),
        Expr::Match(selector, op, value) => {
            let field = select(selector, fields);
            match op {
                Op::Equal => matches!(&field, Value::Text(t) if t == value),
                Op::NotEqual => !matches!(&field, Value::Text(t) if t == value),
                Op::Contains | Op::In => contains(&field, selector, fields, value),
                Op::NotContains | Op::NotIn => !contains(&field, selector, fields, value),
                Op::Empty => is_empty(&field, fields),
                Op::NotEmpty => !is_empty(&field, fields),
            }
        }
        Expr::Regex(selector, wanted, regex) => {
            let hit = matches!(select(selector, fields), Value::Text(t) if regex.is_match(&t));
            hit == *wanted
        }
    }
}

fn contains(field: &Value<'_>, selector: &Selector, fields: &dyn Fields, value: &str) -> bool {
    match field {
        Value::Text(t) => t.contains(value),
        Value::List(list) => list.iter().any(|v| v == value),
        Value::Map => matches!(selector, Selector::MetaMap) && fields.meta(value).is_some(),
    }
}

fn is_empty(field: &Value<'_>, fields: &dyn Fields) -> bool {
    match field {
        Value::Text(t) => t.is_empty(),
        Value::List(list) => list.is_empty(),
        Value::Map => fields.meta_is_empty(),
    }
}

fn select<'a>(selector: &Selector, fields: &'a dyn Fields) -> Value<'a> {
    use std::borrow::Cow;
    match selector {
        Selector::ServiceId => Value::Text(Cow::Borrowed(fields.service_id())),
        Selector::ServiceName => Value::Text(Cow::Borrowed(fields.service_name())),
        Selector::Address => Value::Text(Cow::Borrowed(fields.address())),
        Selector::Port => Value::Text(Cow::Owned(fields.port().to_string())),
        Selector::Tags => Value::List(fields.tags()),
        Selector::Meta(key) => Value::Text(Cow::Borrowed(fields.meta(key).unwrap_or(""))),
        Selector::MetaMap => Value::Map,
        Selector::Node => Value::Text(Cow::Borrowed(fields.node())),
        Selector::NodeAddress => Value::Text(Cow::Borrowed(fields.node_address())),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    text: String,
    /// A quoted string (never an operator or keyword).
    quoted: bool,
    at: usize,
}

fn tokenize(text: &str) -> Result<Vec<Token>, FilterError> {
    let error = |at: usize, why: &str| FilterError {
        text: text.to_owned(),
        at,
        why: why.to_owned(),
    };
    let mut tokens = Vec::new();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' || c == '`' {
            let mut value = String::new();
            let mut j = i + 1;
            let mut closed = false;
            while j < chars.len() {
                let (_, d) = chars[j];
                if d == c {
                    closed = true;
                    break;
                }
                if d == '\\' && c == '"' && j + 1 < chars.len() {
                    j += 1;
                    value.push(chars[j].1);
                } else {
                    value.push(d);
                }
                j += 1;
            }
            if !closed {
                return Err(error(at, "unterminated string"));
            }
            tokens.push(Token {
                text: value,
                quoted: true,
                at,
            });
            i = j + 1;
        } else if matches!(c, '(' | ')' | '[' | ']' | '.') {
            tokens.push(Token {
                text: c.to_string(),
                quoted: false,
                at,
            });
            i += 1;
        } else if c == '=' || c == '!' {
            if chars.get(i + 1).map(|(_, d)| *d) != Some('=') {
                return Err(error(at, "expected == or !="));
            }
            tokens.push(Token {
                text: format!("{c}="),
                quoted: false,
                at,
            });
            i += 2;
        } else {
            let mut j = i;
            while j < chars.len()
                && !chars[j].1.is_whitespace()
                && !matches!(
                    chars[j].1,
                    '(' | ')' | '[' | ']' | '.' | '=' | '!' | '"' | '`'
                )
            {
                j += 1;
            }
            let end = chars.get(j).map_or(text.len(), |(at, _)| *at);
            tokens.push(Token {
                text: text[at..end].to_owned(),
                quoted: false,
                at,
            });
            i = j;
        }
    }
    Ok(tokens)
}

struct Parser<'a> {
    text: &'a str,
    tokens: &'a [Token],
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, at: usize, why: String) -> FilterError {
        FilterError {
            text: self.text.to_owned(),
            at,
            why,
        }
    }

    fn end(&self) -> usize {
        self.text.len()
    }

    fn peek_word(&self, word: &str) -> bool {
        self.tokens
            .get(self.pos)
            .is_some_and(|t| !t.quoted && t.text == word)
    }

    fn peek_word_at(&self, offset: usize, word: &str) -> bool {
        self.tokens
            .get(self.pos + offset)
            .is_some_and(|t| !t.quoted && t.text == word)
    }

    fn next(&mut self, what: &str) -> Result<&Token, FilterError> {
        let token = self
            .tokens
            .get(self.pos)
            .ok_or_else(|| self.error(self.end(), format!("expected {what} at the end")))?;
        self.pos += 1;
        Ok(token)
    }

    fn or(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.and()?;
        while self.peek_word("or") {
            self.pos += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.unary()?;
        while self.peek_word("and") {
            self.pos += 1;
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, FilterError> {
        if self.peek_word("not") {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.peek_word("(") {
            self.pos += 1;
            let inner = self.or()?;
            let close = self.next("')'")?;
            if close.quoted || close.text != ")" {
                let at = close.at;
                return Err(self.error(at, "expected ')'".into()));
            }
            return Ok(inner);
        }
        self.matching()
    }

    fn matching(&mut self) -> Result<Expr, FilterError> {
        // `value [not] in selector`: a value then `in` or `not in`.
        if self.peek_word_at(1, "in") || (self.peek_word_at(1, "not") && self.peek_word_at(2, "in"))
        {
            let value = self.next("a value")?.text.clone();
            let op = if self.peek_word("not") {
                self.pos += 2;
                Op::NotIn
            } else {
                self.pos += 1;
                Op::In
            };
            let selector = self.selector()?;
            return Ok(Expr::Match(selector, op, value));
        }
        let selector = self.selector()?;
        let token = self.next("an operator")?;
        let (at, word) = (token.at, token.text.clone());
        let op = match word.as_str() {
            "==" => Op::Equal,
            "!=" => Op::NotEqual,
            "contains" => Op::Contains,
            "matches" => return self.regex(selector, true),
            "is" => {
                let negated = self.peek_word("not");
                if negated {
                    self.pos += 1;
                }
                let empty = self.next("'empty'")?;
                if empty.quoted || empty.text != "empty" {
                    let at = empty.at;
                    return Err(self.error(at, "expected 'empty' after 'is'".into()));
                }
                let op = if negated { Op::NotEmpty } else { Op::Empty };
                return Ok(Expr::Match(selector, op, String::new()));
            }
            "not" => {
                let next = self.next("'contains' or 'matches'")?;
                match (next.quoted, next.text.as_str()) {
                    (false, "contains") => Op::NotContains,
                    (false, "matches") => return self.regex(selector, false),
                    _ => {
                        let at = next.at;
                        return Err(self.error(at, "expected 'contains' or 'matches'".into()));
                    }
                }
            }
            _ => return Err(self.error(at, format!("expected an operator, found {word:?}"))),
        };
        let value = self.next("a value")?;
        if !value.quoted
            && matches!(
                value.text.as_str(),
                "(" | ")" | "[" | "]" | "." | "==" | "!="
            )
        {
            let at = value.at;
            return Err(self.error(at, "expected a value".into()));
        }
        let value = value.text.clone();
        Ok(Expr::Match(selector, op, value))
    }

    /// The pattern after `matches`, compiled (RE2 syntax, as Go's).
    fn regex(&mut self, selector: Selector, wanted: bool) -> Result<Expr, FilterError> {
        let token = self.next("a pattern")?;
        let (at, pattern) = (token.at, token.text.clone());
        match regex::Regex::new(&pattern) {
            Ok(regex) => Ok(Expr::Regex(selector, wanted, regex)),
            Err(e) => Err(self.error(at, format!("bad regular expression {pattern:?}: {e}"))),
        }
    }

    /// `Name(.Name | ["key"])*`, checked against the known selectors.
    fn selector(&mut self) -> Result<Selector, FilterError> {
        let first = self.next("a selector")?;
        let at = first.at;
        if first.quoted {
            return Err(self.error(at, "expected a selector, found a string".into()));
        }
        let mut parts = vec![first.text.clone()];
        loop {
            if self.peek_word(".") {
                self.pos += 1;
                let part = self.next("a field name")?;
                parts.push(part.text.clone());
            } else if self.peek_word("[") {
                self.pos += 1;
                let key = self.next("a quoted key")?;
                if !key.quoted {
                    let at = key.at;
                    return Err(self.error(at, "expected a quoted key in [...]".into()));
                }
                parts.push(key.text.clone());
                let close = self.next("']'")?;
                if close.quoted || close.text != "]" {
                    let at = close.at;
                    return Err(self.error(at, "expected ']'".into()));
                }
            } else {
                break;
            }
        }
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        Ok(match parts.as_slice() {
            ["Service", "ID"] => Selector::ServiceId,
            ["Service", "Service" | "Name"] => Selector::ServiceName,
            ["Service", "Address"] => Selector::Address,
            ["Service", "Port"] => Selector::Port,
            ["Service", "Tags"] => Selector::Tags,
            ["Service", "Meta"] => Selector::MetaMap,
            ["Service", "Meta", key] => Selector::Meta((*key).to_owned()),
            ["Node", "Node" | "Name"] => Selector::Node,
            ["Node", "Address"] => Selector::NodeAddress,
            _ => {
                return Err(self.error(
                    at,
                    format!(
                        "unknown selector {:?}: use Service.ID, Service.Service, Service.Address, \
                         Service.Port, Service.Tags, Service.Meta.<key>, Node.Node or Node.Address",
                        parts.join(".")
                    ),
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Instance {
        id: &'static str,
        tags: Vec<String>,
        meta: Vec<(&'static str, &'static str)>,
        node: &'static str,
    }

    impl Fields for Instance {
        fn service_id(&self) -> &str {
            self.id
        }
        fn service_name(&self) -> &str {
            "api"
        }
        fn address(&self) -> &str {
            "10.0.0.5"
        }
        fn port(&self) -> u32 {
            8080
        }
        fn tags(&self) -> &[String] {
            &self.tags
        }
        fn meta(&self, key: &str) -> Option<&str> {
            self.meta.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
        }
        fn meta_is_empty(&self) -> bool {
            self.meta.is_empty()
        }
        fn node(&self) -> &str {
            self.node
        }
        fn node_address(&self) -> &str {
            "10.0.0.1"
        }
    }

    fn v(version: &'static str, tags: &[&str]) -> Instance {
        Instance {
            id: "api-1",
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            meta: vec![("version", version)],
            node: "n1",
        }
    }

    fn passes(filter: &str, instance: &Instance) -> bool {
        Filter::parse(filter)
            .unwrap_or_else(|e| panic!("{e}"))
            .matches(instance)
    }

    #[test]
    fn consul_subset_filters_select_as_consul_does() {
        let v1 = v("v1", &["blue"]);
        let v2 = v("v2", &["canary", "blue"]);
        for (filter, want1, want2) in [
            ("Service.Meta.version == v2", false, true),
            ("Service.Meta.version == \"v1\"", true, false),
            ("Service.Meta[\"version\"] != v1", false, true),
            ("\"canary\" in Service.Tags", false, true),
            ("canary not in Service.Tags", true, false),
            ("Service.Tags contains blue", true, true),
            ("Service.Tags not contains canary", true, false),
            ("Service.Meta.version matches `^v[2-9]$`", false, true),
            ("Service.Meta.version not matches \"1\"", false, true),
            ("Service.Meta.zone is empty", true, true),
            ("Service.Tags is not empty", true, true),
            ("Service.Port == 8080 and Node.Node == n1", true, true),
            (
                "not (Service.Meta.version == v1) or Service.ID == x",
                false,
                true,
            ),
            (
                "Service.Meta.version == v1 or Service.Meta.version == v2 and Service.ID == nope",
                true,
                false,
            ),
            ("version in Service.Meta", true, true),
            ("Service.Tags == blue", false, false),
        ] {
            assert_eq!(passes(filter, &v1), want1, "{filter} on v1");
            assert_eq!(passes(filter, &v2), want2, "{filter} on v2");
        }
    }

    #[test]
    fn bad_filters_are_refused_with_the_place() {
        for (filter, says) in [
            ("Service.Meta.version = v2", "expected == or !="),
            (
                "Service.Version == v2",
                "unknown selector \"Service.Version\"",
            ),
            ("Service.Meta.version ==", "expected a value at the end"),
            ("(Service.ID == a", "expected ')' at the end"),
            ("Service.ID == a b", "unexpected \"b\""),
            ("Service.ID == \"a", "unterminated string"),
            ("Service.ID matches \"(\"", "bad regular expression"),
            ("Service.ID is full", "expected 'empty'"),
            ("", "expected a selector at the end"),
        ] {
            let err = Filter::parse(filter).expect_err(filter).to_string();
            assert!(err.contains(says), "{filter}: {err}");
        }
    }
}
