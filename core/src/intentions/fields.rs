//! Reading fields as Consul's decoder does: field names below the top level
//! match without regard to case, `_` or `-` (`PathPrefix`, `path_prefix`),
//! a JSON `null` is the field left out, `""` is Go's zero value; unknown
//! and doubled fields are errors naming the field.
//!
//! Owns: getting typed values out of JSON objects, with the path of each
//! field for errors. Does not touch: what an entry means (`entry`,
//! `permission`).

use serde_json::{Map, Value};

use super::Action;
use super::error::{IntentionError, Problem, invalid};

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

pub(crate) fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// The fields of `object`, in the order of `known`; unknown and doubled
/// fields are errors, `null` counts as absent.
pub(crate) fn fields<'v, const N: usize>(
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

pub(crate) fn string<'v>(
    value: Option<&'v Value>,
    path: &str,
) -> Result<Option<&'v str>, IntentionError> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(IntentionError::new(path, Problem::WrongType("a string"))),
    }
}

/// A string where `""` means absent, as Go's zero value does.
pub(crate) fn nonempty_string<'v>(
    value: Option<&'v Value>,
    path: &str,
) -> Result<Option<&'v str>, IntentionError> {
    Ok(string(value, path)?.filter(|s| !s.is_empty()))
}

pub(crate) fn boolean(value: Option<&Value>, path: &str) -> Result<bool, IntentionError> {
    match value {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(IntentionError::new(
            path,
            Problem::WrongType("true or false"),
        )),
    }
}

pub(crate) fn array<'v>(
    value: Option<&'v Value>,
    path: &str,
) -> Result<&'v [Value], IntentionError> {
    match value {
        None => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(IntentionError::new(path, Problem::WrongType("a list"))),
    }
}

pub(crate) fn object<'v>(
    value: &'v Value,
    path: &str,
) -> Result<&'v Map<String, Value>, IntentionError> {
    value
        .as_object()
        .ok_or_else(|| IntentionError::new(path, Problem::WrongType("an object")))
}

/// Null, `{}`, `[]`, or objects and lists of nothing else: a field given
/// but saying nothing (`"JWT": {"Providers": []}`).
pub(crate) fn says_nothing(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.values().all(says_nothing),
        Value::Array(items) => items.iter().all(says_nothing),
        _ => false,
    }
}

pub(crate) fn action(value: Option<&Value>, path: &str) -> Result<Option<Action>, IntentionError> {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::test_support::set;
    use super::super::{IntentionSet, Request};

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
}
