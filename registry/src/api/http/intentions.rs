//! Intentions in Consul's shapes, read from and written to the
//! `service-intentions` config entries (as Consul ≥ 1.9 stores them):
//! `GET /v1/connect/intentions`, `GET|PUT|DELETE
//! /v1/connect/intentions/exact`, `GET /v1/connect/intentions/match`,
//! `GET /v1/connect/intentions/check` and
//! `POST /v1/agent/connect/authorize`. Decisions come from
//! [`meshwork_core::intentions`], the same code the sidecars enforce with.

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use meshwork_core::intentions::{self, FlatIntention, IntentionSet};
use serde_json::{Map, Value, json};

use super::AppState;
use super::authz::Authz;
use super::error::ApiError;
use super::query::Params;
use super::waiters::IndexOf;
use crate::auth::{Kind, Need};
use crate::command::{Command, CommandResponse};
use crate::state::State as RegistryState;

const KIND: &str = "service-intentions";

/// Every `service-intentions` entry: (destination, body).
fn entries(state: &RegistryState) -> Vec<(&str, &Map<String, Value>)> {
    state
        .config
        .list(KIND)
        .map(|(name, entry)| (name.as_str(), &entry.body))
        .collect()
}

fn flat(state: &RegistryState) -> Result<Vec<FlatIntention>, ApiError> {
    // Entries were validated when written; an error here is a bug or an
    // entry written by an older version, reported rather than skipped.
    intentions::flatten(entries(state)).map_err(|e| ApiError::Internal(e.to_string()))
}

fn intention_json(state: &RegistryState, i: &FlatIntention) -> Value {
    let (create, modify) = state
        .config
        .get(KIND, &i.destination)
        .map_or((0, 0), |e| (e.create_index, e.modify_index));
    json!({
        "ID": "",
        "Description": i.description.clone().unwrap_or_default(),
        "SourceNS": "default",
        "SourceName": i.source,
        "DestinationNS": "default",
        "DestinationName": i.destination,
        "SourcePartition": "default",
        "DestinationPartition": "default",
        "SourceType": "consul",
        "Action": i.action.map(|a| a.as_str()),
        "Permissions": i.permissions.clone(),
        "Meta": i.meta.clone().unwrap_or_else(|| json!({})),
        "Precedence": i.precedence,
        "CreateIndex": create,
        "ModifyIndex": modify,
    })
}

fn required<'a>(params: &'a Params, name: &str) -> Result<&'a str, ApiError> {
    params
        .get(name)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("required query parameter '{name}' not set")))
}

/// The `?source=&destination=` pair of an exact request, after checking
/// the token may `need` the destination's intentions.
fn pair(query: Option<&str>, authz: &Authz, need: Need) -> Result<(String, String), ApiError> {
    let params = Params::parse(query);
    let source = required(&params, "source")?.to_owned();
    let destination = required(&params, "destination")?.to_owned();
    authz.require(Kind::Intention, &destination, need)?;
    Ok((source, destination))
}

/// `GET /v1/connect/intentions` (blocking-capable): every intention the
/// token may read (`intentions:read` on the destination).
pub async fn list(
    State(app): State<AppState>,
    authz: Authz,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    super::catalog::json_read(
        &app,
        &authz,
        uri,
        query,
        IndexOf::ConfigKind(KIND.into()),
        |state, _, authz| {
            let mut filtered = false;
            let list: Vec<Value> = match flat(state) {
                Ok(list) => list
                    .iter()
                    .filter(|i| {
                        let sees = authz.allows(Kind::Intention, &i.destination, Need::Read);
                        filtered |= !sees;
                        sees
                    })
                    .map(|i| intention_json(state, i))
                    .collect(),
                Err(e) => {
                    tracing::error!(error = %e, "stored intentions do not compile");
                    Vec::new()
                }
            };
            (Value::Array(list), filtered)
        },
    )
    .await
}

/// `GET /v1/connect/intentions/match?by=source|destination&name=…`: for
/// each name, the intentions that apply to it, highest precedence first
/// (as Consul: by destination, those whose destination is the name or
/// `*`; by source, likewise for the source).
pub async fn matches(
    State(app): State<AppState>,
    authz: Authz,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    let by_source = match required(&params, "by")? {
        "source" => true,
        "destination" => false,
        other => {
            return Err(ApiError::bad_request(format!(
                "'by' must be 'source' or 'destination', not {other:?}"
            )));
        }
    };
    let names: Vec<String> = params.get_all("name").map(str::to_owned).collect();
    if names.is_empty() {
        return Err(ApiError::bad_request(
            "required query parameter 'name' not set",
        ));
    }
    super::catalog::json_read(
        &app,
        &authz,
        uri,
        query,
        IndexOf::ConfigKind(KIND.into()),
        move |state, _, authz| {
            let all = flat(state).unwrap_or_default();
            let mut filtered = false;
            let mut out = Map::new();
            for name in &names {
                let list: Vec<Value> = all
                    .iter()
                    .filter(|i| {
                        let side = if by_source { &i.source } else { &i.destination };
                        side == name || side == intentions::WILDCARD
                    })
                    .filter(|i| {
                        let sees = authz.allows(Kind::Intention, &i.destination, Need::Read);
                        filtered |= !sees;
                        sees
                    })
                    .map(|i| intention_json(state, i))
                    .collect();
                out.insert(name.clone(), Value::Array(list));
            }
            (Value::Object(out), filtered)
        },
    )
    .await
}

/// The decision for a connection from `source` to `destination` with the
/// intentions of `state`, and its reason in Consul's words.
fn decide(
    state: &RegistryState,
    source: &str,
    destination: &str,
    configured_default_allow: bool,
) -> Result<(bool, String), ApiError> {
    let default_allow = state
        .config
        .default_intention_allow(configured_default_allow);
    let set = IntentionSet::compile(destination, entries(state), default_allow)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let decision = set.decide_connection(source);
    let by_mesh = state
        .config
        .get("mesh", "mesh")
        .is_some_and(|m| m.body.contains_key("DefaultIntention"));
    let reason = match &decision.rule {
        intentions::Rule::Default => format!(
            "Default behavior configured by {} ({})",
            if by_mesh {
                "the mesh config entry's DefaultIntention"
            } else {
                "connect.default_intention"
            },
            if default_allow { "allow" } else { "deny" }
        ),
        rule => format!(
            "Matched intention: {rule} ({})",
            if decision.allow { "allow" } else { "deny" }
        ),
    };
    Ok((decision.allow, reason))
}

/// `GET /v1/connect/intentions/check?source=&destination=`:
/// `{"Allowed": bool}` for a connection (an intention with L7
/// permissions counts as deny here, as in Consul).
pub async fn check(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (source, destination) = pair(query.as_deref(), &authz, Need::Read)?;
    let state = app.node.state.read().clone();
    let (allowed, _) = decide(&state, &source, &destination, app.default_intention_allow)?;
    Ok(axum::Json(json!({ "Allowed": allowed })).into_response())
}

/// The service a SPIFFE ID names, if it is one of this trust domain's.
fn service_of<'a>(uri: &'a str, trust_domain: &str) -> Option<&'a str> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (domain, path) = rest.split_once('/')?;
    if !domain.eq_ignore_ascii_case(trust_domain) {
        return None;
    }
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["ns", "default", "dc", dc, "svc", service] if !dc.is_empty() && !service.is_empty() => {
            Some(service)
        }
        _ => None,
    }
}

/// A JSON object field, matched as Consul's decoder does.
fn field<'a>(body: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    body.iter()
        .find(|(k, _)| k.replace('_', "").eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request(
            "Request decode failed: want a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(format!("Request decode failed: {e}"))),
    }
}

/// `POST /v1/agent/connect/authorize` (service:write on the target):
/// whether a client certificate's service may connect to `Target`.
pub async fn authorize(
    State(app): State<AppState>,
    authz: Authz,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = json_object(&body)?;
    let text = |name: &str| {
        field(&body, name)
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    let target = text("Target");
    let uri = text("ClientCertURI");
    if target.is_empty() {
        return Err(ApiError::bad_request("Target service must be specified"));
    }
    if uri.is_empty() {
        return Err(ApiError::bad_request("ClientCertURI must be specified"));
    }
    authz.require(Kind::Service, target, Need::Write)?;
    let state = app.node.state.read().clone();
    let trust_domain = state
        .cluster_id
        .as_deref()
        .map(crate::connect::trust_domain)
        .unwrap_or_default();
    let Some(source) = service_of(uri, &trust_domain) else {
        return Ok(axum::Json(json!({
            "Authorized": false,
            "Reason": format!("Client ID {uri:?} is not a service of trust domain {trust_domain:?}"),
        }))
        .into_response());
    };
    let (allowed, reason) = decide(&state, source, target, app.default_intention_allow)?;
    Ok(axum::Json(json!({ "Authorized": allowed, "Reason": reason })).into_response())
}

/// `GET /v1/connect/intentions/exact?source=&destination=`.
pub async fn exact_get(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (source, destination) = pair(query.as_deref(), &authz, Need::Read)?;
    let state = app.node.state.read().clone();
    let found = flat(&state)?
        .into_iter()
        .find(|i| i.source == source && i.destination == destination);
    match found {
        Some(i) => Ok(axum::Json(intention_json(&state, &i)).into_response()),
        None => Err(ApiError::NotFound("Intention not found".into())),
    }
}

/// A source's name in a stored entry.
fn source_name(source: &Value) -> Option<&str> {
    source
        .as_object()
        .and_then(|o| field(o, "Name"))
        .and_then(Value::as_str)
}

/// Changes the destination's entry with `edit` (its `Sources` list),
/// under a check-and-set on the entry, retried when a concurrent write
/// won; the entry goes when no source is left.
async fn edit_entry(
    app: &AppState,
    destination: &str,
    edit: impl Fn(&mut Vec<Value>),
) -> Result<(), ApiError> {
    for _ in 0..8 {
        let current = app.node.state.read().config.get(KIND, destination).cloned();
        let (mut body, cas) = match current {
            Some(entry) => (entry.body, entry.modify_index),
            None => (Map::new(), 0),
        };
        let mut sources = match body.remove("Sources") {
            Some(Value::Array(list)) => list,
            _ => Vec::new(),
        };
        edit(&mut sources);
        let command = if sources.is_empty() {
            if cas == 0 {
                return Ok(());
            }
            Command::ConfigDelete {
                kind: KIND.into(),
                name: destination.into(),
                cas: Some(cas),
            }
        } else {
            body.insert("Sources".into(), Value::Array(sources));
            intentions::validate_entry(destination, &body)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            Command::ConfigSet {
                kind: KIND.into(),
                name: destination.into(),
                body,
                cas: Some(cas),
            }
        };
        if app.node.write(command).await?.response == CommandResponse::Applied(true) {
            return Ok(());
        }
    }
    Err(ApiError::Conflict(format!(
        "the intentions of {destination:?} kept changing under this write; try again"
    )))
}

/// `PUT /v1/connect/intentions/exact?source=&destination=` with an
/// intention (`Action` or `Permissions`, `Description`, `Meta`):
/// creates or replaces that source in the destination's entry.
pub async fn exact_put(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (source, destination) = pair(query.as_deref(), &authz, Need::Write)?;
    crate::connect::valid_service_name(&destination)
        .or_else(|e| if destination == "*" { Ok(()) } else { Err(e) })
        .map_err(ApiError::bad_request)?;
    let body = json_object(&body)?;
    for (name, want) in [("SourceName", &source), ("DestinationName", &destination)] {
        if let Some(given) = field(&body, name).and_then(Value::as_str)
            && !given.is_empty()
            && given != want
        {
            return Err(ApiError::bad_request(format!(
                "{name} {given:?} differs from the query's {want:?}"
            )));
        }
    }
    let mut new_source = Map::new();
    new_source.insert("Name".into(), json!(source));
    for (from, to) in [
        ("Action", "Action"),
        ("Permissions", "Permissions"),
        ("Description", "Description"),
    ] {
        if let Some(value) = field(&body, from).filter(|v| !v.is_null()) {
            new_source.insert(to.into(), value.clone());
        }
    }
    if let Some(Value::String(t)) = field(&body, "SourceType")
        && t != "consul"
    {
        return Err(ApiError::bad_request(format!(
            "SourceType {t:?}: only \"consul\" is supported"
        )));
    }
    let new_source = Value::Object(new_source);
    edit_entry(&app, &destination, |sources| {
        sources.retain(|s| source_name(s) != Some(source.as_str()));
        sources.push(new_source.clone());
    })
    .await?;
    Ok(axum::Json(true).into_response())
}

/// `DELETE /v1/connect/intentions/exact?source=&destination=`: `true`
/// (also when there was no such intention).
pub async fn exact_delete(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (source, destination) = pair(query.as_deref(), &authz, Need::Write)?;
    edit_entry(&app, &destination, |sources| {
        sources.retain(|s| source_name(s) != Some(source.as_str()));
    })
    .await?;
    Ok(axum::Json(true).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_trust_domains_service_ids_name_a_service() {
        let td = "c1.meshwork";
        assert_eq!(
            service_of("spiffe://c1.meshwork/ns/default/dc/dc1/svc/web", td),
            Some("web")
        );
        for bad in [
            "spiffe://c2.meshwork/ns/default/dc/dc1/svc/web",
            "spiffe://c1.meshwork/ns/other/dc/dc1/svc/web",
            "spiffe://c1.meshwork/ns/default/dc/dc1/svc/web/extra",
            "spiffe://c1.meshwork/ns/default/dc/dc1/svc/",
            "https://c1.meshwork/ns/default/dc/dc1/svc/web",
            "",
        ] {
            assert_eq!(service_of(bad, td), None, "{bad}");
        }
    }
}
