//! One L7 permission of a source, read and checked as Consul checks it:
//! its `Action`, its `HTTP` (one of `PathExact`, `PathPrefix`, `PathRegex`;
//! `Header` matchers; `Methods`), compiled into a [`Permission`].
//!
//! Owns: the rules a permission's fields must follow. Does not touch: how
//! a compiled permission matches a request (`matching`).

use serde_json::{Map, Value};

use super::error::{IntentionError, Problem, invalid};
use super::fields::{action, array, boolean, fields, join, nonempty_string, object, says_nothing};
use super::matching::{
    HeaderMatch, HeaderTarget, HeaderTest, PathTest, Permission, header_regex, path_regex,
};

/// Consul's `isValidHTTPMethod`.
const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
];

const PERMISSION_FIELDS: [&str; 3] = ["Action", "HTTP", "JWT"];
const HTTP_FIELDS: [&str; 5] = ["PathExact", "PathPrefix", "PathRegex", "Header", "Methods"];
const HEADER_FIELDS: [&str; 8] = [
    "Name", "Present", "Exact", "Prefix", "Suffix", "Contains", "Regex", "Invert",
];

pub(crate) fn parse_permission(
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::MAX_REGEX_LEN;
    use super::super::test_support::error;

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
}
