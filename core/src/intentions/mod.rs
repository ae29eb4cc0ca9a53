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

// Where the parts live:
// - `error`: `IntentionError` and `Problem`, the field at fault and what is wrong;
// - `fields`: JSON fields read as Consul's decoder reads them;
// - `entry`: an entry and its sources read and checked (`validate_entry`);
// - `permission`: one L7 permission read and checked (HTTP, Header, Methods);
// - `matching`: permissions compiled, and how one matches a request;
// - `set`: `IntentionSet`, the compiled intentions of one destination, deciding;
// - `listing`: `flatten`, every intention in Consul's order.

mod entry;
mod error;
pub(crate) mod fields;
mod listing;
pub(crate) mod matching;
pub(crate) mod permission;
mod set;
#[cfg(test)]
mod test_support;

use std::fmt;
use std::sync::Arc;

pub use entry::validate_entry;
pub use error::{IntentionError, Problem};
pub use listing::{FlatIntention, flatten};
pub use matching::{MAX_REGEX_LEN, REGEX_SIZE_LIMIT};
pub use set::IntentionSet;

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
