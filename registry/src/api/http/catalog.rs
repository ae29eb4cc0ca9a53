//! `/v1/catalog/*` and `/v1/health/*`: Consul's catalog and health views,
//! every read blocking-capable and indexed by what it covers.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::AppState;
use super::consul_json::{self, Fields};
use super::error::ApiError;
use super::query::{Params, ReadOptions, read_headers, run_read, shared_read_key};
use super::waiters::IndexOf;
use crate::command::Command;
use crate::state::State as RegistryState;
use crate::state::catalog::{HealthStatus, Registration};

/// Runs a blocking-capable read whose result is JSON. The answer for each
/// applied change is computed and encoded once and shared by every
/// request asking the same question.
pub(super) async fn json_read(
    app: &AppState,
    uri: Uri,
    query: Option<String>,
    what: IndexOf,
    compute: impl Fn(&RegistryState, &Params) -> Value,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    let options = ReadOptions::from_params(&params)?;
    let key = shared_read_key(uri.path(), query.as_deref());
    // The URI points into hyper's read buffer; holding it across a blocking
    // wait would pin 8 KiB per parked request.
    drop(uri);
    let result = run_read(
        &app.node,
        &app.waiters,
        options,
        &app.shutdown,
        &what,
        |state| {
            app.shared_reads.get_or_compute(&key, state, |state| {
                let value = compute(state, &params);
                Bytes::from(serde_json::to_vec(&value).unwrap_or_else(|_| b"null".to_vec()))
            })
        },
    )
    .await?;
    let mut headers = read_headers(&app.node, result.index, options.consistency);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok((headers, result.value).into_response())
}

/// Whether an instance carries every tag asked for with `?tag=`.
fn has_tags(tags: &[String], params: &Params) -> bool {
    params
        .get_all("tag")
        .all(|t| tags.iter().any(|have| have == t))
}

/// `PUT /v1/catalog/register`.
pub async fn register(State(app): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let mut f = Fields::from_body("registration", &body)?;
    let node = f.string("node")?;
    if node.is_empty() {
        return Err(ApiError::bad_request("Must provide node"));
    }
    super::consul_json::printable("node name", &node)?;
    let address = f.string("address")?;
    let skip_node_update = f.bool("skipnodeupdate")?;
    if address.is_empty() && !skip_node_update {
        return Err(ApiError::bad_request("Must provide address"));
    }
    let datacenter = f.string("datacenter")?;
    if !datacenter.is_empty() && datacenter != *app.datacenter {
        return Err(ApiError::bad_request(format!(
            "No path to datacenter {datacenter:?}"
        )));
    }
    let mut reg = Registration {
        node_id: f.string("id")?,
        address,
        datacenter: app.datacenter.to_string(),
        tagged_addresses: f.string_map("taggedaddresses")?,
        node_meta: f.string_map("nodemeta")?,
        skip_node_update,
        node,
        ..Registration::default()
    };
    let service = match f.object("service", "service")? {
        Some(mut s) => {
            let spec = consul_json::decode_service_fields(&mut s, false)?;
            s.finish()?;
            Some(spec)
        }
        None => None,
    };
    let check = f.object("check", "check")?;
    let checks = f.objects("checks", "check")?;
    f.ignore(&[
        "partition",
        "namespace",
        "enabletagoverride",
        "locality",
        "peername",
    ]);
    f.finish()?;
    for fields in check.into_iter().chain(checks) {
        let mut c = consul_json::decode_check(fields)?;
        if c.check_id.is_empty() {
            c.check_id.clone_from(&c.name);
        }
        if c.check_id.is_empty() {
            return Err(ApiError::bad_request("Missing check ID or name"));
        }
        reg.checks.push(c);
    }
    reg.service = service;
    app.write_catalog(Command::CatalogRegister(Box::new(reg)))
        .await?;
    Ok(Json(true).into_response())
}

/// `PUT /v1/catalog/deregister` with `{Node, ServiceID?, CheckID?}`.
pub async fn deregister(State(app): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let mut f = Fields::from_body("deregistration", &body)?;
    let node = f.string("node")?;
    let service_id = Some(f.string("serviceid")?).filter(|s| !s.is_empty());
    let check_id = Some(f.string("checkid")?).filter(|s| !s.is_empty());
    f.ignore(&["datacenter", "partition", "namespace"]);
    f.finish()?;
    if node.is_empty() {
        return Err(ApiError::bad_request("Must provide node"));
    }
    app.write_catalog(Command::CatalogDeregister {
        node,
        service_id,
        check_id,
    })
    .await?;
    Ok(Json(true).into_response())
}

/// `GET /v1/catalog/datacenters`.
pub async fn datacenters(State(app): State<AppState>) -> Json<Value> {
    Json(json!([app.datacenter.as_ref()]))
}

/// `GET /v1/catalog/services`: name → tags.
pub async fn services(
    State(app): State<AppState>,
    uri: Uri,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    json_read(&app, uri, q, IndexOf::ServiceList, |state, _| {
        let names: BTreeMap<&str, Vec<&str>> = state
            .catalog
            .service_names()
            .into_iter()
            .map(|(name, tags)| (name, tags.into_iter().collect()))
            .collect();
        json!(names)
    })
    .await
}

/// `GET /v1/catalog/service/:name?tag=`.
pub async fn service(
    State(app): State<AppState>,
    uri: Uri,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    json_read(
        &app,
        uri,
        q,
        IndexOf::Service(name.clone()),
        |state, params| {
            let list: Vec<Value> = state
                .catalog
                .instances(&name)
                .filter(|(_, s)| has_tags(&s.tags, params))
                .map(|(n, s)| consul_json::catalog_service_json(n, s))
                .collect();
            Value::Array(list)
        },
    )
    .await
}

/// `GET /v1/catalog/nodes`.
pub async fn nodes(
    State(app): State<AppState>,
    uri: Uri,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    json_read(&app, uri, q, IndexOf::NodeList, |state, _| {
        let list: Vec<Value> = state.catalog.nodes().map(consul_json::node_json).collect();
        Value::Array(list)
    })
    .await
}

/// `GET /v1/catalog/node/:node`: the node and its services (`null` if unknown).
pub async fn node(
    State(app): State<AppState>,
    uri: Uri,
    Path(node): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    json_read(
        &app,
        uri,
        q,
        IndexOf::Node(node.clone()),
        |state, _| match state.catalog.node(&node) {
            None => Value::Null,
            Some(n) => {
                let services: Map<String, Value> = state
                    .catalog
                    .node_services(&node)
                    .map(|s| (s.id.clone(), consul_json::service_json(s)))
                    .collect();
                json!({ "Node": consul_json::node_json(n), "Services": services })
            }
        },
    )
    .await
}

/// `GET /v1/health/service/:name?passing&tag=`.
pub async fn health_service(
    State(app): State<AppState>,
    uri: Uri,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(q.as_deref());
    let passing_only = params.flag("passing")?;
    json_read(
        &app,
        uri,
        q,
        IndexOf::Service(name.clone()),
        |state, params| {
            let catalog = &state.catalog;
            let list: Vec<Value> = catalog
                .instances(&name)
                .filter(|(_, s)| has_tags(&s.tags, params))
                .filter(|(n, s)| {
                    !passing_only
                        || catalog.instance_status(&n.name, &s.id) == HealthStatus::Passing
                })
                .map(|(n, s)| {
                    let checks: Vec<Value> = catalog
                        .instance_checks(&n.name, &s.id)
                        .map(consul_json::check_json)
                        .collect();
                    json!({
                        "Node": consul_json::node_json(n),
                        "Service": consul_json::service_json(s),
                        "Checks": checks,
                    })
                })
                .collect();
            Value::Array(list)
        },
    )
    .await
}

/// `GET /v1/health/checks/:service`.
pub async fn health_checks(
    State(app): State<AppState>,
    uri: Uri,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    json_read(&app, uri, q, IndexOf::Service(name.clone()), |state, _| {
        let list: Vec<Value> = state
            .catalog
            .all_checks()
            .filter(|c| c.service_name == name)
            .map(consul_json::check_json)
            .collect();
        Value::Array(list)
    })
    .await
}

/// `GET /v1/health/node/:node`.
pub async fn health_node(
    State(app): State<AppState>,
    uri: Uri,
    Path(node): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    json_read(&app, uri, q, IndexOf::Node(node.clone()), |state, _| {
        let list: Vec<Value> = state
            .catalog
            .node_checks(&node)
            .map(consul_json::check_json)
            .collect();
        Value::Array(list)
    })
    .await
}

/// `GET /v1/health/state/:state` (`any`, `passing`, `warning`, `critical`).
pub async fn health_state(
    State(app): State<AppState>,
    uri: Uri,
    Path(wanted): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let filter = match wanted.as_str() {
        "any" => None,
        other => Some(HealthStatus::parse(other).ok_or_else(|| {
            ApiError::bad_request(format!(
                "Invalid check state {other:?}: use any, passing, warning or critical"
            ))
        })?),
    };
    json_read(&app, uri, q, IndexOf::Checks, |state, _| {
        let list: Vec<Value> = state
            .catalog
            .all_checks()
            .filter(|c| filter.is_none_or(|f| c.status == f))
            .map(consul_json::check_json)
            .collect();
        Value::Array(list)
    })
    .await
}
