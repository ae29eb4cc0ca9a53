//! Policy from the registry's config entries, compiled for this sidecar
//! and applied live: [`intentions`] (who may call this service),
//! [`ratelimit`] (how often) and [`chain`] (where its outbound HTTP calls go: routes, splits, subsets,
//! failover); [`defaults`] (the registry's settings for its upstreams); [`applied`] keeps
//! what each has applied, for the registry. Decisions themselves are `meshwork_core`'s pure functions,
//! the same the registry validates and answers with.

pub mod applied;
pub mod chain;
pub mod defaults;
pub mod intentions;
pub mod ratelimit;

use meshwork_proto::v1::ConfigEntry;

/// An entry's fields as its watch event carries them: the JSON of
/// `GET /v1/config/<kind>/<name>`, the envelope (Kind, Name, indexes)
/// removed.
pub fn entry_body(
    entry: &ConfigEntry,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str::<serde_json::Value>(&entry.json) {
        Ok(serde_json::Value::Object(mut body)) => {
            for envelope in ["Kind", "Name", "CreateIndex", "ModifyIndex"] {
                body.remove(envelope);
            }
            Ok(body)
        }
        _ => Err(format!(
            "{} {:?} is not a JSON object",
            entry.kind, entry.name
        )),
    }
}
