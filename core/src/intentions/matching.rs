//! Permissions compiled, and how one matches a request: Envoy's matching as
//! Consul configures it. Paths exact, prefix or full-match regex,
//! case-sensitive; methods exact; header values compared byte-wise, several
//! values of one header joined with `,`; regexes RE2-style, anchored, and
//! bounded in size.
//!
//! Owns: the compiled matchers and the regex limits. Does not touch: reading
//! an entry (`entry`, `permission`), which intention applies (`set`).

use std::borrow::Cow;

use super::error::{IntentionError, Problem};
use super::{Action, HeaderValues, Request};

/// Longest regex pattern accepted, in bytes (before compiling, so a huge
/// pattern costs nothing).
pub const MAX_REGEX_LEN: usize = 1024;
/// Largest compiled regex accepted, in bytes (`RegexBuilder::size_limit`):
/// bounds memory per matcher, like Envoy's RE2 program-size limit.
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;
/// Lazy-DFA cache per regex: enough for header and path values.
const REGEX_DFA_LIMIT: usize = 256 * 1024;

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

pub(crate) fn path_regex(pattern: &str, path: &str) -> Result<regex::Regex, IntentionError> {
    regex::RegexBuilder::new(&anchored(pattern, path)?)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_LIMIT)
        .build()
        .map_err(|e| regex_error(e, path))
}

pub(crate) fn header_regex(
    pattern: &str,
    path: &str,
) -> Result<regex::bytes::Regex, IntentionError> {
    regex::bytes::RegexBuilder::new(&anchored(pattern, path)?)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_LIMIT)
        .build()
        .map_err(|e| regex_error(e, path))
}

/// One L7 permission, ready to match.
#[derive(Debug)]
pub(crate) struct Permission {
    pub(super) action: Action,
    /// Upper-case (Consul upper-cases on write); empty = any method.
    pub(super) methods: Box<[Box<str>]>,
    pub(super) path: Option<PathTest>,
    /// All must match.
    pub(super) headers: Box<[HeaderMatch]>,
}

#[derive(Debug)]
pub(super) enum PathTest {
    Exact(Box<str>),
    Prefix(Box<str>),
    Regex(regex::Regex),
}

#[derive(Debug)]
pub(super) struct HeaderMatch {
    pub(super) target: HeaderTarget,
    pub(super) test: HeaderTest,
    pub(super) invert: bool,
}

#[derive(Debug)]
pub(super) enum HeaderTarget {
    /// A header, by its lower-case name.
    Name(Box<str>),
    /// `:method`, read from [`Request::method`].
    Method,
}

/// Byte-wise, as Envoy compares header values (a value need not be UTF-8).
#[derive(Debug)]
pub(super) enum HeaderTest {
    Present,
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    Suffix(Box<[u8]>),
    Contains(Box<[u8]>),
    Regex(regex::bytes::Regex),
}

impl Permission {
    pub(crate) fn matches<H: HeaderValues + ?Sized>(&self, request: &Request<'_, H>) -> bool {
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::IntentionSet;
    use super::super::test_support::{NO_HEADERS, get, set};
    use super::Request;

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
}
