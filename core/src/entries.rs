//! How config entries are looked up by the code that reads several at once
//! (the discovery chain, upstream defaults): the registry's stored state and
//! a sidecar's followed topics both answer it.

use serde_json::{Map, Value};

/// The config entries a chain is compiled from, by kind and name.
pub trait Entries {
    fn entry(&self, kind: &str, name: &str) -> Option<&Map<String, Value>>;
}
