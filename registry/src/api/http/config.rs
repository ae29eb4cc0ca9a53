//! Configuration entries in Consul's shapes: `PUT /v1/config`,
//! `GET /v1/config/:kind`, `GET|DELETE /v1/config/:kind/:name`.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::AppState;
use super::authz::Authz;
use super::error::ApiError;
use super::query::{Params, ReadOptions, read_headers, run_read};
use super::waiters::IndexOf;
use crate::auth::{Need, config_entry_permission as entry_permission};
use crate::command::{Command, CommandResponse};
use crate::state::config::{check_kind, entry_json, normalize};

fn cas(params: &Params) -> Result<Option<u64>, ApiError> {
    params
        .get("cas")
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!(
                    "Invalid cas {v:?}: want a ModifyIndex (0 = create only)"
                ))
            })
        })
        .transpose()
}

/// The query of a request about one kind, once the kind is known to be
/// valid. (Another datacenter and `?filter` are refused for every endpoint
/// by the router: `refuse_unsupported_scope`.)
fn kind_request(kind: &str, query: Option<&str>) -> Result<Params, ApiError> {
    let params = Params::parse(query);
    check_kind(kind).map_err(ApiError::bad_request)?;
    Ok(params)
}

/// `PUT /v1/config[?cas=N]`: creates or replaces an entry; `true`, or
/// `false` when the check-and-set failed; the write's index in
/// `X-Consul-Index`.
pub async fn apply(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    let cas = cas(&params)?;
    let entry: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("Request decode failed: {e}")))?;
    let (kind, name, body) = normalize(entry).map_err(ApiError::bad_request)?;
    entry_permission(&authz, &kind, &name, Need::Write)?;
    if kind == "service-intentions" {
        // Sidecars compile these with the same code: refuse what they could
        // not enforce (bad regexes, unknown matchers) here, with the field.
        meshwork_core::intentions::validate_entry(&name, &body)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    // Routers, splitters and resolvers: the chain of the service they
    // name must compile with the entries stored (a filter that does not
    // parse, a subset that does not exist, a redirect loop, weights not
    // adding up to 100), as the sidecars will compile it.
    {
        let state = app.node.state.read();
        let stored = StoredEntries(&state.config);
        meshwork_core::chain::validate_entry(&kind, &name, &body, &stored)
            .map_err(ApiError::bad_request)?;
    }
    let applied = app
        .node
        .write(Command::ConfigSet {
            kind,
            name,
            body,
            cas,
        })
        .await?;
    let mut response =
        axum::Json(applied.response == CommandResponse::Applied(true)).into_response();
    written_at(&mut response, applied.index);
    Ok(response)
}

/// The write's index in `X-Consul-Index` (Meshwork's addition: what
/// `/v1/mesh/propagation?index=` waits for).
fn written_at(response: &mut Response, index: u64) {
    response
        .headers_mut()
        .insert("X-Consul-Index", axum::http::HeaderValue::from(index));
}

/// `GET /v1/config/:kind`: every entry of the kind (blocking-capable).
pub async fn list(
    State(app): State<AppState>,
    authz: Authz,
    uri: Uri,
    Path(kind): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    kind_request(&kind, query.as_deref())?;
    super::catalog::json_read(
        &app,
        &authz,
        uri,
        query,
        IndexOf::ConfigKind(kind.clone()),
        |state, _, authz| {
            let mut filtered = false;
            let list = state
                .config
                .list(&kind)
                .filter(|(name, _)| {
                    let sees = entry_permission(authz, &kind, name, Need::Read).is_ok();
                    filtered |= !sees;
                    sees
                })
                .map(|(name, entry)| entry_json(&kind, name, entry))
                .collect();
            (Value::Array(list), filtered)
        },
    )
    .await
}

/// `GET /v1/config/:kind/:name` (blocking-capable): the entry, or 404.
pub async fn get(
    State(app): State<AppState>,
    authz: Authz,
    Path((kind, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = kind_request(&kind, query.as_deref())?;
    entry_permission(&authz, &kind, &name, Need::Read)?;
    let options = ReadOptions::from_params(&params)?;
    let result = run_read(
        &app.node,
        &app.waiters,
        options,
        &app.shutdown,
        (&IndexOf::ConfigKind(kind.clone()), &authz),
        |state, rights| {
            // Again after a blocking wait: the token's rights may have changed.
            entry_permission(rights, &kind, &name, Need::Read)?;
            Ok::<_, crate::auth::Refusal>(
                state
                    .config
                    .get(&kind, &name)
                    .map(|entry| entry_json(&kind, &name, entry)),
            )
        },
    )
    .await?;
    let mut headers = read_headers(&app.node, result.index, options.consistency);
    match result.value? {
        Some(entry) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok((headers, axum::Json(entry)).into_response())
        }
        None => Ok((
            StatusCode::NOT_FOUND,
            headers,
            format!("Config entry not found for {kind:?} / {name:?}\n"),
        )
            .into_response()),
    }
}

/// `DELETE /v1/config/:kind/:name[?cas=N]`: `{}` (as Consul), or with
/// `cas` whether the entry was deleted.
pub async fn delete(
    State(app): State<AppState>,
    authz: Authz,
    Path((kind, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = kind_request(&kind, query.as_deref())?;
    entry_permission(&authz, &kind, &name, Need::Write)?;
    let cas = cas(&params)?;
    let applied = app
        .node
        .write(Command::ConfigDelete { kind, name, cas })
        .await?;
    let deleted = applied.response == CommandResponse::Applied(true);
    let mut response = match cas {
        Some(_) => axum::Json(Value::Bool(deleted)).into_response(),
        None => axum::Json(serde_json::json!({})).into_response(),
    };
    written_at(&mut response, applied.index);
    Ok(response)
}

/// The stored entries as the chain compiler reads them.
struct StoredEntries<'a>(&'a crate::state::config::ConfigStore);

impl meshwork_core::chain::Entries for StoredEntries<'_> {
    fn entry(&self, kind: &str, name: &str) -> Option<&serde_json::Map<String, Value>> {
        self.0.get(kind, name).map(|e| &e.body)
    }
}
