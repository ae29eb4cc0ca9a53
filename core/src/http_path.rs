//! HTTP request paths put in the one form that L7 intentions match
//! against: what Envoy's `normalize_path` + `merge_slashes` do, the two
//! options Consul turns on for every listener that enforces L7 intentions.
//!
//! Owns only the text of a path: no routing, no query parsing beyond
//! [`split_query`], no HTTP types. The sidecar normalises every inbound
//! path with [`normalize`] *before* it asks [`crate::intentions`] for a
//! decision and forwards the normalised form, so the permission that was
//! checked is the path the application sees. A path that cannot be put in
//! that form (a malformed escape, a control character) is refused rather
//! than guessed at: an attacker gains nothing from an ambiguity the proxy
//! and the application would resolve differently.
//!
//! What [`normalize`] does, in order:
//!
//! 1. refuses a path that does not start with `/`;
//! 2. decodes percent-escapes of *unreserved* characters only (RFC 3986
//!    §2.3: `A-Z a-z 0-9 - . _ ~`), so `%2e%2e` becomes `..`, and writes the
//!    hex of every other escape in upper case (`%3f` → `%3F`);
//! 3. refuses a malformed escape (`%zz`, a truncated `%4`), a NUL or other
//!    control character (raw or decoded), an encoded separator (`%2F`,
//!    `%5C`: many applications decode it before resolving `..`, so
//!    `/public/..%2Fadmin` would walk out of a `/public/` rule — Envoy's
//!    `path_with_escaped_slashes_action: REJECT_REQUEST`), escapes that do
//!    not decode to UTF-8 (`%c0%ae`, an overlong `.`), a double-encoded
//!    escape (`%252e`, which applications that decode twice read as `.`),
//!    and path parameters (`;`: servlet containers and Spring drop them,
//!    so `/admin;x` would be served as `/admin` past a `PathExact` rule,
//!    and `..;` as `..`);
//! 4. turns a raw `\` into `/` (Envoy's path canonicaliser, from Chromium,
//!    does the same; several application servers would otherwise);
//! 5. merges repeated `/`;
//! 6. removes `.` and `..` segments (RFC 3986 §5.2.4): `/a/../b` → `/b`,
//!    `/..` → `/`, `/a/.` → `/a/`.
//!
//! It never changes case: `/PUBLIC` stays `/PUBLIC` (Envoy's matchers are
//! case-sensitive too). It borrows when the path is already normal, the
//! common case, so the per-request cost is one scan of the bytes.

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Origin-form request targets start with `/`; anything else
    /// (`*`, an absolute URI, an empty path) is not a path to match.
    #[error("path must start with '/'")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("malformed percent-escape at byte {at}")]
    MalformedEscape {
        /// Byte offset of the `%`.
        at: usize,
    },
    /// A NUL or other control character (U+0000–U+001F, U+007F), raw or
    /// percent-encoded.
    #[error("control character {byte:#04x} at byte {at}")]
    ControlCharacter {
        /// The character.
        byte: u8,
        /// Byte offset where it (or its escape) starts.
        at: usize,
    },
    /// `%2F` or `%5C`: a separator the application may decode.
    #[error("encoded '/' or '\\' at byte {at}")]
    EncodedSeparator {
        /// Byte offset of the `%`.
        at: usize,
    },
    /// Percent-escapes that do not decode to UTF-8 (e.g. an overlong
    /// encoding of `.`).
    #[error("percent-escapes that are not UTF-8")]
    NotUtf8,
    /// `;` path parameters.
    #[error("path parameters (';') at byte {at}")]
    Parameters {
        /// Byte offset of the `;`.
        at: usize,
    },
    /// `%25` followed by two hex digits: an escape escaped again.
    #[error("a double-encoded escape at byte {at}")]
    DoubleEncoded {
        /// Byte offset of the `%`.
        at: usize,
    },
}

/// Splits a request target into its path and its query (without the `?`).
pub fn split_query(target: &str) -> (&str, Option<&str>) {
    match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    }
}

/// The normal form of `path` (the path part only: strip the query first
/// with [`split_query`]). Borrows when nothing changes.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)?))
}

/// RFC 3986 §2.3 unreserved characters: the only escapes we decode.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// True when [`normalize`] would return `path` unchanged. Conservative:
/// anything unusual (even an error) sends the path down the slow path,
/// which decides.
fn is_normal(path: &[u8]) -> bool {
    let mut i = 0;
    // Start of the current segment (just after its '/').
    let mut segment_start = 0;
    while i < path.len() {
        let b = path[i];
        match b {
            b'/' => {
                if i > 0 && !segment_is_normal(&path[segment_start..i]) {
                    return false;
                }
                segment_start = i + 1;
                // An empty segment that is not the last one: `//`.
                if path.get(i + 1) == Some(&b'/') {
                    return false;
                }
            }
            b'%' => {
                let (Some(&h), Some(&l)) = (path.get(i + 1), path.get(i + 2)) else {
                    return false;
                };
                let (Some(hv), Some(lv)) = (hex_value(h), hex_value(l)) else {
                    return false;
                };
                let value = hv << 4 | lv;
                if h.is_ascii_lowercase()
                    || l.is_ascii_lowercase()
                    || is_unreserved(value)
                    || is_control(value)
                    || is_separator(value)
                    || value == b'%'
                    || value >= 0x80
                {
                    return false;
                }
                i += 2;
            }
            b'\\' | b';' => return false,
            _ if is_control(b) => return false,
            _ => {}
        }
        i += 1;
    }
    segment_is_normal(&path[segment_start..])
}

fn segment_is_normal(segment: &[u8]) -> bool {
    segment != b"." && segment != b".."
}

fn is_separator(b: u8) -> bool {
    b == b'/' || b == b'\\'
}

/// Step 2–4: escapes decoded or upper-cased, controls refused, `\` → `/`.
fn decode(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    // Every escape decoded, to check that the path is UTF-8 as the
    // application will read it.
    let mut all_decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hv = bytes.get(i + 1).copied().and_then(hex_value);
                let lv = bytes.get(i + 2).copied().and_then(hex_value);
                let (Some(hv), Some(lv)) = (hv, lv) else {
                    return Err(PathError::MalformedEscape { at: i });
                };
                let value = hv << 4 | lv;
                if is_control(value) {
                    return Err(PathError::ControlCharacter { byte: value, at: i });
                }
                if is_separator(value) {
                    return Err(PathError::EncodedSeparator { at: i });
                }

                all_decoded.push(value);
                if is_unreserved(value) {
                    out.push(value);
                } else {
                    out.push(b'%');
                    out.push(bytes[i + 1].to_ascii_uppercase());
                    out.push(bytes[i + 2].to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
            b'\\' => {
                out.push(b'/');
                all_decoded.push(b'/');
            }
            _ if is_control(b) => return Err(PathError::ControlCharacter { byte: b, at: i }),
            b';' => return Err(PathError::Parameters { at: i }),
            _ => {
                out.push(b);
                all_decoded.push(b);
            }
        }
        i += 1;
    }
    if std::str::from_utf8(&all_decoded).is_err() {
        return Err(PathError::NotUtf8);
    }
    // In the result (escapes upper-cased, unreserved ones decoded), so
    // that `%25B%41` → `%25BA` is caught as well as `%252e`.
    if let Some(at) = out.windows(5).position(|w| {
        w.starts_with(b"%25") && hex_value(w[3]).is_some() && hex_value(w[4]).is_some()
    }) {
        return Err(PathError::DoubleEncoded { at });
    }
    // Only ASCII bytes were added or replaced by ASCII, and multi-byte
    // characters were copied whole, so this cannot fail; map it anyway
    // rather than unwrap on input.
    String::from_utf8(out).map_err(|_| PathError::MalformedEscape { at: 0 })
}

/// Steps 5–6 over a decoded path that starts with `/`.
fn remove_dot_segments(path: &str) -> Result<String, PathError> {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    let rest = path.strip_prefix('/').unwrap_or(path);
    let mut parts = rest.split('/').peekable();
    while let Some(segment) = parts.next() {
        let last = parts.peek().is_none();
        match segment {
            "" => {}
            "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
        // `/a/`, `/a/.` and `/a/b/..` all end in a directory.
        trailing_slash = last && matches!(segment, "" | "." | "..");
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if segments.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn table() {
        let cases: &[(&str, &str)] = &[
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E%2E/admin", "/admin"),
            ("/public/.%2e/admin", "/admin"),
            ("//public//x", "/public/x"),
            ("///", "/"),
            ("/PUBLIC", "/PUBLIC"),
            ("/public/./x", "/public/x"),
            ("/a/.", "/a/"),
            ("/a/./", "/a/"),
            ("/a/b/..", "/a/"),
            ("/a/b/../", "/a/"),
            ("/..", "/"),
            ("/../..", "/"),
            ("/../a", "/a"),
            ("/a/../../b", "/b"),
            ("/.a/..b/...", "/.a/..b/..."),
            ("/%7Euser", "/~user"),
            ("/%41%62c", "/Abc"),
            ("/a%20b", "/a%20b"),
            ("/a%c3%a9", "/a%C3%A9"),
            ("/caf\u{e9}", "/caf\u{e9}"),
            ("/a\\..\\b", "/b"),
            ("/a%3f", "/a%3F"),
        ];
        for (input, want) in cases {
            assert_eq!(
                normalize(input).as_deref(),
                Ok(*want),
                "normalize({input:?})"
            );
        }
    }

    #[test]
    fn borrows_when_already_normal() {
        for path in ["/", "/a/b", "/a/b/", "/a%20b", "/~x/.y", "/a%3Fb"] {
            assert!(
                matches!(normalize(path), Ok(Cow::Borrowed(_))),
                "{path:?} should borrow"
            );
        }
        for path in ["//a", "/a/./b", "/a/..", "/%7e", "/a%3fb", "/a\\b"] {
            assert!(
                matches!(normalize(path), Ok(Cow::Owned(_))),
                "{path:?} should change"
            );
        }
    }

    #[test]
    fn refusals() {
        let cases: &[(&str, PathError, &str)] = &[
            ("", PathError::NotAbsolute, "path must start with '/'"),
            ("a/b", PathError::NotAbsolute, "path must start with '/'"),
            ("*", PathError::NotAbsolute, "path must start with '/'"),
            (
                "/a%zz",
                PathError::MalformedEscape { at: 2 },
                "malformed percent-escape at byte 2",
            ),
            (
                "/a%4",
                PathError::MalformedEscape { at: 2 },
                "malformed percent-escape at byte 2",
            ),
            (
                "/a%",
                PathError::MalformedEscape { at: 2 },
                "malformed percent-escape at byte 2",
            ),
            (
                "/a%00b",
                PathError::ControlCharacter { byte: 0, at: 2 },
                "control character 0x00 at byte 2",
            ),
            (
                "/a\0b",
                PathError::ControlCharacter { byte: 0, at: 2 },
                "control character 0x00 at byte 2",
            ),
            (
                "/a%0Ab",
                PathError::ControlCharacter { byte: 10, at: 2 },
                "control character 0x0a at byte 2",
            ),
            (
                "/a\tb",
                PathError::ControlCharacter { byte: 9, at: 2 },
                "control character 0x09 at byte 2",
            ),
            (
                "/a%7f",
                PathError::ControlCharacter { byte: 0x7f, at: 2 },
                "control character 0x7f at byte 2",
            ),
            (
                "/public/..%2Fadmin",
                PathError::EncodedSeparator { at: 10 },
                "encoded '/' or '\\' at byte 10",
            ),
            (
                "/public/%2e%2e%2fadmin",
                PathError::EncodedSeparator { at: 14 },
                "encoded '/' or '\\' at byte 14",
            ),
            (
                "/public/..%5cadmin",
                PathError::EncodedSeparator { at: 10 },
                "encoded '/' or '\\' at byte 10",
            ),
            (
                "/public/%c0%ae%c0%ae/admin",
                PathError::NotUtf8,
                "percent-escapes that are not UTF-8",
            ),
            (
                "/public/..;/admin",
                PathError::Parameters { at: 10 },
                "path parameters (';') at byte 10",
            ),
            (
                "/admin;jsessionid=1/secret",
                PathError::Parameters { at: 6 },
                "path parameters (';') at byte 6",
            ),
            (
                "/public/%252e%252e/admin",
                PathError::DoubleEncoded { at: 8 },
                "a double-encoded escape at byte 8",
            ),
        ];
        for (input, error, message) in cases {
            let got = normalize(input);
            assert_eq!(got.as_ref().err(), Some(error), "normalize({input:?})");
            assert_eq!(got.err().map(|e| e.to_string()).as_deref(), Some(*message));
        }
    }

    #[test]
    fn split_query_cases() {
        assert_eq!(split_query("/a?b=c"), ("/a", Some("b=c")));
        assert_eq!(split_query("/a"), ("/a", None));
        assert_eq!(split_query("/a?"), ("/a", Some("")));
        assert_eq!(split_query("/a?b?c"), ("/a", Some("b?c")));
    }

    /// normalize(normalize(p)) == normalize(p), and the result is a fixed
    /// point that borrows, over paths built from the pieces that matter.
    #[test]
    fn idempotent_over_generated_paths() {
        const PIECES: &[&str] = &[
            "/", "//", "a", "B", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", "%7e", "%41",
            "%20", "%c3%a9", "é", "x.y", "%25", "-", "~", "%3F",
        ];
        let mut rng = StdRng::seed_from_u64(0x1e7_5eed);
        for _ in 0..20_000 {
            let mut path = String::from("/");
            for _ in 0..rng.random_range(0..12) {
                path.push_str(PIECES[rng.random_range(0..PIECES.len())]);
            }
            let Ok(once) = normalize(&path) else {
                continue;
            };
            let twice = normalize(&once);
            assert_eq!(twice.as_deref(), Ok(&*once), "not idempotent for {path:?}");
            // Escapes of non-ASCII bytes and of `%` take the slow path
            // (UTF-8 and double encoding are checked there); everything
            // else normal borrows.
            let non_ascii_escape = once.match_indices('%').any(|(i, _)| {
                once.as_bytes().get(i + 1).is_some_and(|h| *h >= b'8')
                    || once.get(i + 1..i + 3) == Some("25")
            });
            assert!(
                non_ascii_escape || matches!(twice, Ok(Cow::Borrowed(_))),
                "normal form {once:?} of {path:?} does not borrow"
            );
            assert!(!once.contains("//"), "{path:?} → {once:?}");
            assert!(
                !once.split('/').any(|s| s == "." || s == ".."),
                "{path:?} → {once:?}"
            );
        }
    }
}
