//! Consul `service-intentions` config entries: validated, compiled for one
//! destination and evaluated, as a pure library. Both binaries decide with
//! it: the registry (`/v1/connect/intentions/check` and `/match`,
//! `/v1/agent/connect/authorize`, and validation on write) and the sidecar
//! (every inbound connection and HTTP request before the app sees it), so
//! the two can never disagree.
//!
//! Owns: the meaning of an entry body and of a decision. Does not touch:
//! storage, ACLs, HTTP serving, certificates (who the source *is* comes from
//! the caller's verified peer identity), path normalisation (see
//! [`crate::http_path`]; callers normalise before deciding).
//!
//! # Using it
//!
//! ```
//! use meshwork_core::intentions::{IntentionSet, Request};
//! use serde_json::json;
//!
//! let entry = json!({"Sources": [
//!     {"Name": "web", "Permissions": [
//!         {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
//!         {"Action": "allow", "HTTP": {"Methods": ["GET"]}},
//!     ]},
//!     {"Name": "*", "Action": "deny"},
//! ]});
//! let body = entry.as_object().expect("an object");
//! let set = IntentionSet::compile("api", [("api", body)], false)?;
//!
//! let headers: &[(&str, &str)] = &[];
//! let get = Request::new("GET", "/orders", headers);
//! let decision = set.decide_request("web", &get);
//! assert!(decision.allow);
//! assert_eq!(decision.rule.to_string(), "web -> api permission #1");
//! assert!(!set.decide_connection("web").allow); // L7 intention at L4: deny
//! assert!(!set.decide_connection("db").allow);  // `*` -> api: deny
//! # Ok::<(), meshwork_core::intentions::IntentionError>(())
//! ```
//!
//! - [`validate_entry`] checks a body on write (the registry's PUT);
//! - [`IntentionSet::compile`] takes every stored entry (those for other
//!   destinations are skipped), once per change, and the result answers
//!   [`IntentionSet::decide_connection`] (L4) and
//!   [`IntentionSet::decide_request`] (L7) without allocating (one
//!   exception: a header sent more than once is joined with `,` for
//!   matching, as Envoy does);
//! - [`flatten`] lists every (destination, source) intention in Consul's
//!   order, for `/v1/connect/intentions/match` and listings.
//!
//! # Semantics (Consul's, checked against its source)
//!
//! - **Precedence** (`agent/structs/config_entry_intentions.go`,
//!   `computeIntentionPrecedence`; no namespaces, so the namespace is always
//!   exact): destination exact + source exact **9**, destination exact +
//!   source `*` **8**, destination `*` + source exact **6**, `*` + `*` **5**.
//!   The highest-precedence intention whose source matches decides; lower
//!   ones are never consulted (`IntentionDecision` in
//!   `agent/consul/state/intention.go` takes the first match of the sorted
//!   list; `agent/xds/rbac.go` subtracts higher sources from lower ones).
//! - **Equal precedence**: one entry cannot name a source twice, so two
//!   intentions of equal precedence can only meet when a caller passes two
//!   entries under one name; then deny wins, then an L7 intention, then
//!   allow.
//! - **L4 intention** (`Action`): its action, for connections and requests.
//! - **L7 intention** (`Permissions`), for a request: the permissions in
//!   order, the first that matches gives its action; when none matches, the
//!   *default* applies, not a lower-precedence intention (`rbac.go`:
//!   `removeSourcePrecedence` then `removePermissionPrecedence`, where every
//!   permission and intention equal to the default action is dropped to the
//!   catch-all).
//! - **L7 intention for a connection** (`decide_connection`): deny. Consul's
//!   `IntentionDecision` answers `Allowed = AllowPermissions`, false for
//!   connection checks ("we cannot know whether the L7 permission
//!   requirements will be met"), and `rbac.go` turns intentions with
//!   permissions into deny on a TCP listener. So a sidecar in front of an
//!   HTTP service must decide per request and not gate the connection
//!   with `decide_connection`; a TCP service uses `decide_connection`.
//! - **Matching** is Envoy's, as Consul configures it: paths exact, prefix
//!   or full-match regex, case-sensitive; methods exact; a header matcher
//!   on a missing header matches only when it is `Present` + `Invert`
//!   (Envoy `HeaderUtility::matchHeaders`); several values of one header
//!   are joined with `,`; `Invert` negates a present header's result.
//!   Regexes are RE2-style (the `regex` crate) and must match the whole
//!   value, as Envoy's `safe_regex`.
//!
//! # What is refused that Consul would accept
//!
//! Namespaces and partitions other than `default`, `Peer`,
//! `SamenessGroup`, and `JWT` requirements (entry or permission): Meshwork
//! cannot enforce them, and an intention silently enforced without them
//! would allow more than written. Header names `:path`/`:scheme` and other
//! pseudo-headers except `:authority` (read from `host`) and `:method`.
//! `Contains` is accepted on headers (Envoy's `contains_match`), which
//! Consul's struct does not have.
//!
//! Field names below the top level match without regard to case, `_` or
//! `-` (`PathPrefix`, `path_prefix`), as Consul's decoder does; a JSON
//! `null` is the field left out.

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

/// The name that stands for every service, as a destination or a source.
pub const WILDCARD: &str = "*";

/// Precedence of an exact destination with an exact source.
pub const PRECEDENCE_EXACT_EXACT: u32 = 9;
/// Precedence of an exact destination with the `*` source.
pub const PRECEDENCE_EXACT_WILDCARD: u32 = 8;
/// Precedence of the `*` destination with an exact source.
pub const PRECEDENCE_WILDCARD_EXACT: u32 = 6;
/// Precedence of the `*` destination with the `*` source.
pub const PRECEDENCE_WILDCARD_WILDCARD: u32 = 5;

/// Longest regex pattern accepted, in bytes (before compiling, so a huge
/// pattern costs nothing).
pub const MAX_REGEX_LEN: usize = 1024;
/// Largest compiled regex accepted, in bytes (`RegexBuilder::size_limit`):
/// bounds memory per matcher, like Envoy's RE2 program-size limit.
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;
/// Lazy-DFA cache per regex: enough for header and path values.
const REGEX_DFA_LIMIT: usize = 256 * 1024;
/// Consul's `metaValueMaxLength`, which bounds `Description`.
const MAX_DESCRIPTION: usize = 512;
/// Consul's `isValidHTTPMethod`.
const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
];

/// Consul's precedence of the intention `source -> destination`.
pub fn precedence(destination: &str, source: &str) -> u32 {
    match (destination == WILDCARD, source == WILDCARD) {
        (false, false) => PRECEDENCE_EXACT_EXACT,
        (false, true) => PRECEDENCE_EXACT_WILDCARD,
        (true, false) => PRECEDENCE_WILDCARD_EXACT,
        (true, true) => PRECEDENCE_WILDCARD_WILDCARD,
    }
}

/// What an intention or permission does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    /// `"allow"` or `"deny"`, as Consul writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------
// Errors

/// An entry that cannot be used, with the field at fault
/// (`Sources[1].Permissions[0].HTTP.PathRegex`).
#[derive(Debug)]
pub struct IntentionError {
    /// The entry's name, when several entries were read at once.
    entry: Option<Box<str>>,
    /// Where in the body: `Sources[1].Action`; empty for the entry itself.
    path: String,
    problem: Problem,
}

impl IntentionError {
    fn new(path: impl Into<String>, problem: Problem) -> Self {
        Self {
            entry: None,
            path: path.into(),
            problem,
        }
    }

    fn in_entry(mut self, name: &str) -> Self {
        self.entry = Some(name.into());
        self
    }

    /// The entry's name, when the error came from [`IntentionSet::compile`]
    /// or [`flatten`].
    pub fn entry(&self) -> Option<&str> {
        self.entry.as_deref()
    }

    /// The field at fault, e.g. `Sources[1].Permissions[0].HTTP.PathRegex`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }
}

impl fmt::Display for IntentionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(entry) = &self.entry {
            write!(f, "service-intentions entry {entry:?}: ")?;
        }
        if self.path.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{}: {}", self.path, self.problem)
        }
    }
}

impl std::error::Error for IntentionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.problem)
    }
}

/// What is wrong with a field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    #[error("unknown field {field:?} (known fields: {})", .known.join(", "))]
    UnknownField {
        field: String,
        known: &'static [&'static str],
    },
    #[error("given twice, as {first:?} and {second:?}")]
    DuplicateField { first: String, second: String },
    #[error("must be {0}")]
    WrongType(&'static str),
    #[error("is required")]
    Missing,
    /// A rule of Consul's broken; the text says which.
    #[error("{0}")]
    Invalid(String),
    #[error("not supported by Meshwork: {0}")]
    NotSupported(&'static str),
    #[error("invalid regex: {0}")]
    Regex(#[source] regex::Error),
    #[error("regex too large: its compiled form exceeds {limit} bytes")]
    RegexTooLarge { limit: usize },
    #[error("regex too large: {len} bytes, at most {max}")]
    RegexTooLong { len: usize, max: usize },
}

fn invalid(path: impl Into<String>, why: impl Into<String>) -> IntentionError {
    IntentionError::new(path, Problem::Invalid(why.into()))
}

// ---------------------------------------------------------------------------
// Reading fields as Consul's decoder does

/// `key` names `canonical` when they are equal ignoring ASCII case and
/// `_`/`-` (`path_prefix`, `PathPrefix`).
fn same_field(key: &str, canonical: &str) -> bool {
    let mut key = key.bytes().filter(|b| *b != b'_' && *b != b'-');
    let mut canonical = canonical.bytes();
    loop {
        match (key.next(), canonical.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a.eq_ignore_ascii_case(&b) => {}
            _ => return false,
        }
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// The fields of `object`, in the order of `known`; unknown and doubled
/// fields are errors, `null` counts as absent.
fn fields<'v, const N: usize>(
    object: &'v Map<String, Value>,
    known: &'static [&'static str; N],
    path: &str,
) -> Result<[Option<&'v Value>; N], IntentionError> {
    let mut found: [Option<(&'v str, &'v Value)>; N] = [None; N];
    for (key, value) in object {
        let Some(slot) = known.iter().position(|k| same_field(key, k)) else {
            return Err(IntentionError::new(
                path,
                Problem::UnknownField {
                    field: key.clone(),
                    known,
                },
            ));
        };
        if value.is_null() {
            continue;
        }
        if let Some((first, _)) = found[slot] {
            return Err(IntentionError::new(
                join(path, known[slot]),
                Problem::DuplicateField {
                    first: first.to_owned(),
                    second: key.clone(),
                },
            ));
        }
        found[slot] = Some((key, value));
    }
    Ok(found.map(|f| f.map(|(_, v)| v)))
}

fn string<'v>(value: Option<&'v Value>, path: &str) -> Result<Option<&'v str>, IntentionError> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(IntentionError::new(path, Problem::WrongType("a string"))),
    }
}

/// A string where `""` means absent, as Go's zero value does.
fn nonempty_string<'v>(
    value: Option<&'v Value>,
    path: &str,
) -> Result<Option<&'v str>, IntentionError> {
    Ok(string(value, path)?.filter(|s| !s.is_empty()))
}

fn boolean(value: Option<&Value>, path: &str) -> Result<bool, IntentionError> {
    match value {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(IntentionError::new(
            path,
            Problem::WrongType("true or false"),
        )),
    }
}

fn array<'v>(value: Option<&'v Value>, path: &str) -> Result<&'v [Value], IntentionError> {
    match value {
        None => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(IntentionError::new(path, Problem::WrongType("a list"))),
    }
}

fn object<'v>(value: &'v Value, path: &str) -> Result<&'v Map<String, Value>, IntentionError> {
    value
        .as_object()
        .ok_or_else(|| IntentionError::new(path, Problem::WrongType("an object")))
}

/// Null, `{}`, `[]`, or objects and lists of nothing else: a field given
/// but saying nothing (`"JWT": {"Providers": []}`).
fn says_nothing(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.values().all(says_nothing),
        Value::Array(items) => items.iter().all(says_nothing),
        _ => false,
    }
}

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

fn action(value: Option<&Value>, path: &str) -> Result<Option<Action>, IntentionError> {
    match nonempty_string(value, path)? {
        None => Ok(None),
        Some("allow") => Ok(Some(Action::Allow)),
        Some("deny") => Ok(Some(Action::Deny)),
        Some(other) => Err(invalid(
            path,
            format!("must be \"allow\" or \"deny\", not {other:?}"),
        )),
    }
}

// ---------------------------------------------------------------------------
// Regexes

/// `\A(?:pattern)\z` compiled with our limits: Envoy's safe_regex matches
/// the whole value, so `/a.*` does not match `/b/a`.
fn anchored(pattern: &str, path: &str) -> Result<String, IntentionError> {
    if pattern.len() > MAX_REGEX_LEN {
        return Err(IntentionError::new(
            path,
            Problem::RegexTooLong {
                len: pattern.len(),
                max: MAX_REGEX_LEN,
            },
        ));
    }
    Ok(format!(r"\A(?:{pattern})\z"))
}

fn regex_error(error: regex::Error, path: &str) -> IntentionError {
    match error {
        regex::Error::CompiledTooBig(limit) => {
            IntentionError::new(path, Problem::RegexTooLarge { limit })
        }
        other => IntentionError::new(path, Problem::Regex(other)),
    }
}

fn path_regex(pattern: &str, path: &str) -> Result<regex::Regex, IntentionError> {
    regex::RegexBuilder::new(&anchored(pattern, path)?)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_LIMIT)
        .build()
        .map_err(|e| regex_error(e, path))
}

fn header_regex(pattern: &str, path: &str) -> Result<regex::bytes::Regex, IntentionError> {
    regex::bytes::RegexBuilder::new(&anchored(pattern, path)?)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_LIMIT)
        .build()
        .map_err(|e| regex_error(e, path))
}

// ---------------------------------------------------------------------------
// Compiled permissions

/// One L7 permission, ready to match.
#[derive(Debug)]
struct Permission {
    action: Action,
    /// Upper-case (Consul upper-cases on write); empty = any method.
    methods: Box<[Box<str>]>,
    path: Option<PathTest>,
    /// All must match.
    headers: Box<[HeaderMatch]>,
}

#[derive(Debug)]
enum PathTest {
    Exact(Box<str>),
    Prefix(Box<str>),
    Regex(regex::Regex),
}

#[derive(Debug)]
struct HeaderMatch {
    target: HeaderTarget,
    test: HeaderTest,
    invert: bool,
}

#[derive(Debug)]
enum HeaderTarget {
    /// A header, by its lower-case name.
    Name(Box<str>),
    /// `:method`, read from [`Request::method`].
    Method,
}

/// Byte-wise, as Envoy compares header values (a value need not be UTF-8).
#[derive(Debug)]
enum HeaderTest {
    Present,
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    Suffix(Box<[u8]>),
    Contains(Box<[u8]>),
    Regex(regex::bytes::Regex),
}

impl Permission {
    fn matches<H: HeaderValues + ?Sized>(&self, request: &Request<'_, H>) -> bool {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| **m == *request.method) {
            return false;
        }
        let path_ok = match &self.path {
            None => true,
            Some(PathTest::Exact(p)) => request.path == &**p,
            Some(PathTest::Prefix(p)) => request.path.starts_with(&**p),
            Some(PathTest::Regex(r)) => r.is_match(request.path),
        };
        path_ok && self.headers.iter().all(|h| h.matches(request))
    }
}

impl HeaderMatch {
    fn matches<H: HeaderValues + ?Sized>(&self, request: &Request<'_, H>) -> bool {
        let value = match &self.target {
            HeaderTarget::Method => Some(Cow::Borrowed(request.method.as_bytes())),
            HeaderTarget::Name(name) => joined(request.headers.values(name)),
        };
        let Some(value) = value else {
            // Envoy: a missing header matches only an inverted presence test.
            return self.invert && matches!(self.test, HeaderTest::Present);
        };
        let value: &[u8] = &value;
        let matched = match &self.test {
            HeaderTest::Present => true,
            HeaderTest::Exact(want) => value == &**want,
            HeaderTest::Prefix(want) => value.starts_with(want),
            HeaderTest::Suffix(want) => value.ends_with(want),
            HeaderTest::Contains(want) => value.windows(want.len()).any(|w| w == &**want),
            HeaderTest::Regex(r) => r.is_match(value),
        };
        matched != self.invert
    }
}

/// All values of one header joined with `,` (Envoy's
/// `getAllOfHeaderAsString`); borrows when there is one.
fn joined<'s>(mut values: impl Iterator<Item = &'s [u8]>) -> Option<Cow<'s, [u8]>> {
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(Cow::Borrowed(first));
    };
    let mut all = Vec::with_capacity(first.len() + 1 + second.len());
    all.extend_from_slice(first);
    all.push(b',');
    all.extend_from_slice(second);
    for value in values {
        all.push(b',');
        all.extend_from_slice(value);
    }
    Some(Cow::Owned(all))
}

// ---------------------------------------------------------------------------
// Parsing an entry

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
const PERMISSION_FIELDS: [&str; 3] = ["Action", "HTTP", "JWT"];
const HTTP_FIELDS: [&str; 5] = ["PathExact", "PathPrefix", "PathRegex", "Header", "Methods"];
const HEADER_FIELDS: [&str; 8] = [
    "Name", "Present", "Exact", "Prefix", "Suffix", "Contains", "Regex", "Invert",
];

/// What a source intention does.
#[derive(Debug)]
enum Verdict {
    Allow,
    Deny,
    Permissions(Box<[Permission]>),
}

impl Verdict {
    /// Order among intentions of equal precedence: deny, then L7, then allow.
    fn strength(&self) -> u8 {
        match self {
            Verdict::Deny => 2,
            Verdict::Permissions(_) => 1,
            Verdict::Allow => 0,
        }
    }
}

struct ParsedSource<'v> {
    name: &'v str,
    verdict: Verdict,
    permissions: Option<&'v Value>,
    description: Option<&'v str>,
}

struct ParsedEntry<'v> {
    meta: Option<&'v Value>,
    sources: Vec<ParsedSource<'v>>,
}

fn parse_entry<'v>(
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

fn parse_permission(
    permission: &Map<String, Value>,
    path: &str,
) -> Result<Permission, IntentionError> {
    let [action_field, http, jwt] = fields(permission, &PERMISSION_FIELDS, path)?;
    let action_path = join(path, "Action");
    let Some(action) = action(action_field, &action_path)? else {
        return Err(invalid(action_path, "must be set to \"allow\" or \"deny\""));
    };
    if jwt.is_some_and(|j| !says_nothing(j)) {
        return Err(IntentionError::new(
            join(path, "JWT"),
            Problem::NotSupported("JWT requirements (the sidecar does not verify JWTs)"),
        ));
    }
    let http_path = join(path, "HTTP");
    let Some(http) = http else {
        return Err(IntentionError::new(http_path, Problem::Missing));
    };
    let [exact, prefix, regex, header, methods] =
        fields(object(http, &http_path)?, &HTTP_FIELDS, &http_path)?;

    let exact = nonempty_string(exact, &join(&http_path, "PathExact"))?;
    let prefix = nonempty_string(prefix, &join(&http_path, "PathPrefix"))?;
    let regex = nonempty_string(regex, &join(&http_path, "PathRegex"))?;
    let given = [exact, prefix, regex].iter().flatten().count();
    if given > 1 {
        return Err(invalid(
            http_path,
            "should only contain at most one of PathExact, PathPrefix, or PathRegex",
        ));
    }
    let path_test = if let Some(exact) = exact {
        if !exact.starts_with('/') {
            return Err(invalid(
                join(&http_path, "PathExact"),
                format!("doesn't start with '/': {exact:?}"),
            ));
        }
        Some(PathTest::Exact(exact.into()))
    } else if let Some(prefix) = prefix {
        if !prefix.starts_with('/') {
            return Err(invalid(
                join(&http_path, "PathPrefix"),
                format!("doesn't start with '/': {prefix:?}"),
            ));
        }
        Some(PathTest::Prefix(prefix.into()))
    } else if let Some(regex) = regex {
        Some(PathTest::Regex(path_regex(
            regex,
            &join(&http_path, "PathRegex"),
        )?))
    } else {
        None
    };

    let header_path = join(&http_path, "Header");
    let headers = array(header, &header_path)?
        .iter()
        .enumerate()
        .map(|(k, h)| {
            let path = format!("{header_path}[{k}]");
            parse_header(object(h, &path)?, &path)
        })
        .collect::<Result<Vec<_>, _>>()?;

    let methods_path = join(&http_path, "Methods");
    let mut upper: Vec<Box<str>> = Vec::new();
    for (m, method) in array(methods, &methods_path)?.iter().enumerate() {
        let Some(method) = method.as_str() else {
            return Err(IntentionError::new(
                format!("{methods_path}[{m}]"),
                Problem::WrongType("a string"),
            ));
        };
        // Consul upper-cases methods before validating them.
        let method = method.to_ascii_uppercase();
        if !HTTP_METHODS.contains(&method.as_str()) {
            return Err(invalid(
                methods_path,
                format!(
                    "contains an invalid method {method:?} (use {})",
                    HTTP_METHODS.join(", ")
                ),
            ));
        }
        if upper.iter().any(|u| **u == *method) {
            return Err(invalid(
                methods_path,
                format!("contains {method:?} more than once"),
            ));
        }
        upper.push(method.into());
    }

    if path_test.is_none() && headers.is_empty() && upper.is_empty() {
        return Err(invalid(http_path, "should not be empty"));
    }
    Ok(Permission {
        action,
        methods: upper.into_boxed_slice(),
        path: path_test,
        headers: headers.into_boxed_slice(),
    })
}

fn parse_header(header: &Map<String, Value>, path: &str) -> Result<HeaderMatch, IntentionError> {
    let [
        name,
        present,
        exact,
        prefix,
        suffix,
        contains,
        regex,
        invert,
    ] = fields(header, &HEADER_FIELDS, path)?;
    let name_path = join(path, "Name");
    let Some(name) = nonempty_string(name, &name_path)? else {
        return Err(IntentionError::new(name_path, Problem::Missing));
    };
    let target = match name.to_ascii_lowercase().as_str() {
        ":method" => HeaderTarget::Method,
        // HTTP/1's Host is HTTP/2's :authority.
        ":authority" | "host" => HeaderTarget::Name("host".into()),
        pseudo if pseudo.starts_with(':') => {
            return Err(IntentionError::new(
                name_path,
                Problem::NotSupported(
                    "pseudo-headers other than :authority and :method (match the path with PathExact, PathPrefix or PathRegex)",
                ),
            ));
        }
        lower => match http::HeaderName::from_bytes(lower.as_bytes()) {
            Ok(valid) => HeaderTarget::Name(valid.as_str().into()),
            Err(_) => {
                return Err(invalid(
                    name_path,
                    format!("{name:?} is not a valid header name"),
                ));
            }
        },
    };
    let invert = boolean(invert, &join(path, "Invert"))?;
    let present = boolean(present, &join(path, "Present"))?;
    let exact = nonempty_string(exact, &join(path, "Exact"))?;
    let prefix = nonempty_string(prefix, &join(path, "Prefix"))?;
    let suffix = nonempty_string(suffix, &join(path, "Suffix"))?;
    let contains = nonempty_string(contains, &join(path, "Contains"))?;
    let regex = nonempty_string(regex, &join(path, "Regex"))?;
    let given = usize::from(present)
        + [exact, prefix, suffix, contains, regex]
            .iter()
            .flatten()
            .count();
    if given != 1 {
        return Err(invalid(
            path,
            "should only contain one of Present, Exact, Prefix, Suffix, Contains, or Regex",
        ));
    }
    let bytes = |s: &str| -> Box<[u8]> { s.as_bytes().into() };
    let test = if present {
        HeaderTest::Present
    } else if let Some(s) = exact {
        HeaderTest::Exact(bytes(s))
    } else if let Some(s) = prefix {
        HeaderTest::Prefix(bytes(s))
    } else if let Some(s) = suffix {
        HeaderTest::Suffix(bytes(s))
    } else if let Some(s) = contains {
        HeaderTest::Contains(bytes(s))
    } else if let Some(s) = regex {
        HeaderTest::Regex(header_regex(s, &join(path, "Regex"))?)
    } else {
        // `given == 1` above: one of the branches was taken.
        return Err(invalid(path, "no matcher"));
    };
    Ok(HeaderMatch {
        target,
        test,
        invert,
    })
}

/// Checks a `service-intentions` entry as the registry's PUT receives it:
/// `name` is the destination (or `*`), `body` its fields below Kind and
/// Name. The error names the field (`Sources[1].Permissions[0].HTTP.PathRegex:
/// regex too large: ...`).
pub fn validate_entry(name: &str, body: &Map<String, Value>) -> Result<(), IntentionError> {
    parse_entry(name, body).map(|_| ())
}

// ---------------------------------------------------------------------------
// Requests and decisions

/// Header values by name, for [`IntentionSet::decide_request`].
///
/// Implemented for `http::HeaderMap` and for a slice of `(name, value)`
/// pairs (names compared without regard to case). HTTP/2 callers put the
/// `:authority` in `host`, as HTTP/1 sends it.
pub trait HeaderValues {
    /// Every value of the header `name` (given in lower case), in order.
    fn values<'s>(&'s self, name: &str) -> impl Iterator<Item = &'s [u8]>;
}

impl HeaderValues for http::HeaderMap {
    fn values<'s>(&'s self, name: &str) -> impl Iterator<Item = &'s [u8]> {
        self.get_all(name).iter().map(http::HeaderValue::as_bytes)
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>> HeaderValues for [(N, V)] {
    fn values<'s>(&'s self, name: &str) -> impl Iterator<Item = &'s [u8]> {
        self.iter()
            .filter(move |(n, _)| n.as_ref().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    }
}

/// One HTTP request, as an L7 intention sees it.
pub struct Request<'a, H: ?Sized> {
    /// `GET`, `POST`, ... (compared exactly, as Envoy does).
    pub method: &'a str,
    /// The path already normalised by [`crate::http_path::normalize`],
    /// without the query.
    pub path: &'a str,
    pub headers: &'a H,
}

impl<'a, H: ?Sized> Request<'a, H> {
    pub fn new(method: &'a str, path: &'a str, headers: &'a H) -> Self {
        Self {
            method,
            path,
            headers,
        }
    }
}

/// Whether to let a connection or request through, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    /// The rule that decided, for logs and `Reason` texts.
    pub rule: Rule,
}

/// What decided a [`Decision`]. Displays as `default`, `web -> api`,
/// `web -> api permission #2` (the index into `Permissions`, from 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// No intention's source matched: the configured default.
    Default,
    Intention {
        /// The entry's name: the destination or `*`.
        destination: Arc<str>,
        /// The intention's source: a service or `*`.
        source: Arc<str>,
        /// Consul's precedence (9, 8, 6 or 5).
        precedence: u32,
        /// Which part of the intention decided.
        by: DecidedBy,
    },
}

/// Which part of a matching intention decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// Its `Action` (an L4 intention).
    Action,
    /// The permission at this index of its `Permissions`.
    Permission(usize),
    /// An L7 intention none of whose permissions matched the request: the
    /// default applied.
    NoPermission,
    /// An L7 intention asked about a connection: deny.
    PermissionsAtConnection,
}

impl Rule {
    /// The permission index, when a permission decided.
    pub fn permission(&self) -> Option<usize> {
        match self {
            Rule::Intention {
                by: DecidedBy::Permission(i),
                ..
            } => Some(*i),
            _ => None,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Default => f.write_str("default"),
            Rule::Intention {
                destination,
                source,
                by,
                ..
            } => {
                write!(f, "{source} -> {destination}")?;
                match by {
                    DecidedBy::Action => Ok(()),
                    DecidedBy::Permission(i) => write!(f, " permission #{i}"),
                    DecidedBy::NoPermission => f.write_str(" (no permission matched: default)"),
                    DecidedBy::PermissionsAtConnection => {
                        f.write_str(" (L7 permissions: deny for a connection)")
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The compiled set

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

// ---------------------------------------------------------------------------
// Listing

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
    use super::*;
    use serde_json::json;

    fn body(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn set(entries: &[(&str, Value)], default_allow: bool) -> IntentionSet {
        let bodies: Vec<(&str, Map<String, Value>)> = entries
            .iter()
            .map(|(name, value)| (*name, body(value.clone())))
            .collect();
        IntentionSet::compile("api", bodies.iter().map(|(n, b)| (*n, b)), default_allow)
            .expect("entries compile")
    }

    const NO_HEADERS: &[(&str, &str)] = &[];

    fn get(path: &str) -> Request<'_, [(&'static str, &'static str)]> {
        Request::new("GET", path, NO_HEADERS)
    }

    fn error(name: &str, value: Value) -> String {
        match validate_entry(name, &body(value)) {
            Ok(()) => panic!("entry {name:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

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

    fn header_set(header: Value) -> IntentionSet {
        set(
            &[(
                "api",
                json!({"Sources": [{"Name": "web", "Permissions": [
                    {"Action": "allow", "HTTP": {"Header": [header]}},
                ]}]}),
            )],
            false,
        )
    }

    fn allowed_with(set: &IntentionSet, headers: &[(&str, &str)]) -> bool {
        set.decide_request("web", &Request::new("GET", "/", headers))
            .allow
    }

    #[test]
    fn header_matchers() {
        // (matcher, headers, allowed)
        type Headers = &'static [(&'static str, &'static str)];
        let cases: &[(Value, Headers, bool)] = &[
            (
                json!({"Name": "x-user", "Exact": "bob"}),
                &[("x-user", "bob")],
                true,
            ),
            (
                json!({"Name": "x-user", "Exact": "bob"}),
                &[("X-User", "bob")],
                true,
            ),
            (
                json!({"Name": "X-User", "Exact": "bob"}),
                &[("x-user", "bob")],
                true,
            ),
            (
                json!({"Name": "x-user", "Exact": "bob"}),
                &[("x-user", "Bob")],
                false,
            ),
            (json!({"Name": "x-user", "Exact": "bob"}), &[], false),
            (
                json!({"Name": "x-user", "Exact": "bob", "Invert": true}),
                &[("x-user", "eve")],
                true,
            ),
            (
                json!({"Name": "x-user", "Exact": "bob", "Invert": true}),
                &[("x-user", "bob")],
                false,
            ),
            // Envoy: a missing header matches no inverted value test.
            (
                json!({"Name": "x-user", "Exact": "bob", "Invert": true}),
                &[],
                false,
            ),
            (
                json!({"Name": "x-user", "Prefix": "bo"}),
                &[("x-user", "bob")],
                true,
            ),
            (
                json!({"Name": "x-user", "Prefix": "ob"}),
                &[("x-user", "bob")],
                false,
            ),
            (
                json!({"Name": "x-user", "Suffix": "ob"}),
                &[("x-user", "bob")],
                true,
            ),
            (
                json!({"Name": "x-user", "Suffix": "bo"}),
                &[("x-user", "bob")],
                false,
            ),
            (
                json!({"Name": "x-user", "Contains": "o"}),
                &[("x-user", "bob")],
                true,
            ),
            (
                json!({"Name": "x-user", "Contains": "x"}),
                &[("x-user", "bob")],
                false,
            ),
            (
                json!({"Name": "x-user", "Contains": "x", "Invert": true}),
                &[("x-user", "bob")],
                true,
            ),
            (
                json!({"Name": "x-user", "Regex": "b.b"}),
                &[("x-user", "bob")],
                true,
            ),
            // Anchored: the whole value must match.
            (
                json!({"Name": "x-user", "Regex": "o"}),
                &[("x-user", "bob")],
                false,
            ),
            (
                json!({"Name": "x-user", "Regex": "b.*"}),
                &[("x-user", "abob")],
                false,
            ),
            (
                json!({"Name": "x-user", "Present": true}),
                &[("x-user", "")],
                true,
            ),
            (json!({"Name": "x-user", "Present": true}), &[], false),
            (
                json!({"Name": "x-user", "Present": true, "Invert": true}),
                &[],
                true,
            ),
            (
                json!({"Name": "x-user", "Present": true, "Invert": true}),
                &[("x-user", "a")],
                false,
            ),
            // Several values are joined with ',' (Envoy).
            (
                json!({"Name": "x-user", "Exact": "a,b"}),
                &[("x-user", "a"), ("x-user", "b")],
                true,
            ),
            (
                json!({"Name": "x-user", "Exact": "a"}),
                &[("x-user", "a"), ("x-user", "b")],
                false,
            ),
            (json!({"Name": ":method", "Exact": "GET"}), &[], true),
            (json!({"Name": ":method", "Exact": "PUT"}), &[], false),
            (
                json!({"Name": ":authority", "Suffix": ".internal"}),
                &[("host", "api.internal")],
                true,
            ),
            (
                json!({"Name": ":authority", "Suffix": ".internal"}),
                &[("host", "api.example")],
                false,
            ),
        ];
        for (matcher, headers, allowed) in cases {
            let set = header_set(matcher.clone());
            assert_eq!(
                allowed_with(&set, headers),
                *allowed,
                "{matcher} with {headers:?}"
            );
        }
    }

    #[test]
    fn several_headers_must_all_match() {
        let set = set(
            &[(
                "api",
                json!({"Sources": [{"Name": "web", "Permissions": [
                    {"Action": "allow", "HTTP": {"PathPrefix": "/", "Header": [
                        {"Name": "x-a", "Exact": "1"},
                        {"Name": "x-b", "Present": true},
                    ]}},
                ]}]}),
            )],
            false,
        );
        assert!(allowed_with(&set, &[("x-a", "1"), ("x-b", "")]));
        assert!(!allowed_with(&set, &[("x-a", "1")]));
        assert!(!allowed_with(&set, &[("x-b", "1")]));
    }

    #[test]
    fn header_map_is_a_header_source() {
        let set = header_set(json!({"Name": "x-user", "Regex": "bob|eve"}));
        let mut headers = http::HeaderMap::new();
        let request = |h: &http::HeaderMap| {
            set.decide_request("web", &Request::new("GET", "/", h))
                .allow
        };
        assert!(!request(&headers));
        headers.insert("x-user", http::HeaderValue::from_static("eve"));
        assert!(request(&headers));
        headers.append("x-user", http::HeaderValue::from_static("bob"));
        assert!(!request(&headers), "joined as \"eve,bob\"");
        // A value that is not UTF-8 is compared as bytes.
        let mut binary = http::HeaderMap::new();
        let value = http::HeaderValue::from_bytes(b"bob\xff").expect("obs-text is allowed");
        binary.insert("x-user", value);
        let prefix = header_set(json!({"Name": "x-user", "Prefix": "bob"}));
        assert!(
            prefix
                .decide_request("web", &Request::new("GET", "/", &binary))
                .allow
        );
    }

    #[test]
    fn methods() {
        let set = set(
            &[(
                "api",
                json!({"Sources": [{"Name": "web", "Permissions": [
                    {"Action": "allow", "HTTP": {"Methods": ["get", "Head"]}},
                ]}]}),
            )],
            false,
        );
        assert!(
            set.decide_request("web", &Request::new("GET", "/x", NO_HEADERS))
                .allow
        );
        assert!(
            set.decide_request("web", &Request::new("HEAD", "/x", NO_HEADERS))
                .allow
        );
        assert!(
            !set.decide_request("web", &Request::new("POST", "/x", NO_HEADERS))
                .allow
        );
        // Methods are case-sensitive on the wire, as Envoy's `:method`.
        assert!(
            !set.decide_request("web", &Request::new("get", "/x", NO_HEADERS))
                .allow
        );
    }

    #[test]
    fn paths() {
        let cases: &[(Value, &str, bool)] = &[
            (json!({"PathExact": "/a"}), "/a", true),
            (json!({"PathExact": "/a"}), "/a/", false),
            (json!({"PathExact": "/a"}), "/A", false),
            (json!({"PathPrefix": "/a"}), "/ab", true),
            (json!({"PathPrefix": "/a/"}), "/a", false),
            (json!({"PathRegex": "/a.*"}), "/a/b", true),
            (json!({"PathRegex": "/a.*"}), "/b/a", false),
            (json!({"PathRegex": "/a"}), "/a/b", false),
            (json!({"PathRegex": "/(x|y)/[0-9]+"}), "/y/42", true),
            (json!({"path_regex": "/(x|y)/[0-9]+"}), "/y/42x", false),
        ];
        for (http, path, allowed) in cases {
            let set = set(
                &[(
                    "api",
                    json!({"Sources": [{"Name": "web", "Permissions": [
                        {"Action": "allow", "HTTP": http},
                    ]}]}),
                )],
                false,
            );
            assert_eq!(
                set.decide_request("web", &get(path)).allow,
                *allowed,
                "{http} on {path}"
            );
        }
    }

    #[test]
    fn field_names_ignore_case_and_separators() {
        let entry = json!({"Sources": [{"name": "web", "permissions": [
            {"action": "allow", "http": {"path_prefix": "/p", "methods": ["GET"],
             "header": [{"NAME": "x-a", "prefix": "1", "in-vert": false}]}},
        ]}, {"NAME": "*", "ACTION": "deny", "legacy_id": "", "sameness_group": ""}]});
        let set = set(&[("api", entry)], false);
        assert!(allowed_with_path(&set, "/p/x", &[("x-a", "12")]));
        assert!(!allowed_with_path(&set, "/q", &[("x-a", "12")]));
    }

    fn allowed_with_path(set: &IntentionSet, path: &str, headers: &[(&str, &str)]) -> bool {
        set.decide_request("web", &Request::new("GET", path, headers))
            .allow
    }

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
    fn regexes_are_bounded() {
        let long = "a".repeat(MAX_REGEX_LEN + 1);
        let e = error(
            "api",
            json!({"Sources": [{"Name": "web", "Permissions": [
                {"Action": "allow", "HTTP": {"PathRegex": long}},
            ]}]}),
        );
        assert_eq!(
            e,
            format!(
                "Sources[0].Permissions[0].HTTP.PathRegex: regex too large: {} bytes, at most {MAX_REGEX_LEN}",
                MAX_REGEX_LEN + 1
            )
        );
        // Short pattern, huge program: Unicode classes repeated.
        let e = error(
            "api",
            json!({"Sources": [
                {"Name": "db", "Action": "deny"},
                {"Name": "web", "Permissions": [
                    {"Action": "allow", "HTTP": {"PathPrefix": "/"}},
                    {"Action": "allow", "HTTP": {"PathRegex": r"\w{1000}"}},
                ]},
            ]}),
        );
        assert!(
            e.starts_with("Sources[1].Permissions[1].HTTP.PathRegex: regex too large"),
            "{e}"
        );
        let e = error(
            "api",
            json!({"Sources": [{"Name": "web", "Permissions": [
                {"Action": "allow", "HTTP": {"Header": [{"Name": "x", "Regex": r"\w{1000}"}]}},
            ]}]}),
        );
        assert!(
            e.starts_with("Sources[0].Permissions[0].HTTP.Header[0].Regex: regex too large"),
            "{e}"
        );
        let e = error(
            "api",
            json!({"Sources": [{"Name": "web", "Permissions": [
                {"Action": "allow", "HTTP": {"PathRegex": "/(a"}},
            ]}]}),
        );
        assert!(
            e.starts_with("Sources[0].Permissions[0].HTTP.PathRegex: invalid regex: "),
            "{e}"
        );
        // Backreferences are not RE2.
        let e = error(
            "api",
            json!({"Sources": [{"Name": "web", "Permissions": [
                {"Action": "allow", "HTTP": {"PathRegex": r"/(a)\1"}},
            ]}]}),
        );
        assert!(e.contains("invalid regex"), "{e}");
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

    #[test]
    fn set_is_shareable() {
        fn shareable<T: Send + Sync>() {}
        shareable::<IntentionSet>();
        shareable::<Decision>();
    }
}
