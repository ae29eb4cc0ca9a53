//! Helpers shared by the intentions' unit tests: entries from `json!`,
//! a compiled set for `api`, requests without headers, error texts.

use serde_json::{Map, Value};

use super::{IntentionSet, Request, validate_entry};

pub(super) fn body(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

pub(super) fn set(entries: &[(&str, Value)], default_allow: bool) -> IntentionSet {
    let bodies: Vec<(&str, Map<String, Value>)> = entries
        .iter()
        .map(|(name, value)| (*name, body(value.clone())))
        .collect();
    IntentionSet::compile("api", bodies.iter().map(|(n, b)| (*n, b)), default_allow)
        .expect("entries compile")
}

pub(super) const NO_HEADERS: &[(&str, &str)] = &[];

pub(super) fn get(path: &str) -> Request<'_, [(&'static str, &'static str)]> {
    Request::new("GET", path, NO_HEADERS)
}

pub(super) fn error(name: &str, value: Value) -> String {
    match validate_entry(name, &body(value)) {
        Ok(()) => panic!("entry {name:?} was accepted"),
        Err(e) => e.to_string(),
    }
}
