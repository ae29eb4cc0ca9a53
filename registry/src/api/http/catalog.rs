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
use super::authz::{Authz, mark_filtered};
use super::consul_json::{self, Fields};
use super::error::ApiError;
use super::query::{Params, ReadOptions, read_headers, run_read, shared_read_key};
use super::waiters::IndexOf;
use crate::auth::{Kind, Need, Resolved};
use crate::command::Command;
use crate::state::State as RegistryState;
use crate::state::catalog::{HealthCheck, HealthStatus, Node, Registration, ServiceInstance};

/// Runs a blocking-capable read whose result is JSON: `compute` answers
/// what the token may see, and says whether it left anything out. The
/// answer for each applied change is computed and encoded once and shared
/// by every request asking the same question with the same view.
pub(super) async fn json_read(
    app: &AppState,
    authz: &Authz,
    uri: Uri,
    query: Option<String>,
    what: IndexOf,
    compute: impl Fn(&RegistryState, &Params, &Resolved) -> (Value, bool),
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    let options = ReadOptions::from_params(&params)?;
    let question = shared_read_key(uri.path(), query.as_deref());
    // The URI points into hyper's read buffer; holding it across a blocking
    // wait would pin 8 KiB per parked request.
    drop(uri);
    let result = run_read(
        &app.node,
        &app.waiters,
        options,
        &app.shutdown,
        (&what, authz),
        |state, rights| {
            // Keyed by the token's view as it is when computed (a blocking
            // query may wake to changed rights).
            let key = match rights.view_key() {
                Some(view) => format!("{question}\u{2}{view}"),
                None => question.clone(),
            };
            app.shared_reads.get_or_compute(&key, state, |state| {
                let (value, filtered) = compute(state, &params, rights);
                (
                    Bytes::from(serde_json::to_vec(&value).unwrap_or_else(|_| b"null".to_vec())),
                    filtered,
                )
            })
        },
    )
    .await?;
    let (body, filtered) = result.value;
    let mut headers = read_headers(&app.node, result.index, options.consistency);
    mark_filtered(&mut headers, filtered);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok((headers, body).into_response())
}

/// Whether the token may see a service instance: the service and its
/// node (Consul's filter for catalog and health lists).
pub(super) fn sees_instance(authz: &Resolved, node: &Node, s: &ServiceInstance) -> bool {
    authz.allows(Kind::Service, &s.name, Need::Read)
        && authz.allows(Kind::Node, &node.name, Need::Read)
}

/// Whether the token may see a check: its node's read, and for a service
/// check its service's too (a node the token may not see stays hidden in
/// every list).
pub(super) fn sees_check(authz: &Resolved, check: &HealthCheck) -> bool {
    authz.allows(Kind::Node, &check.node, Need::Read)
        && (check.service_id.is_empty()
            || authz.allows(Kind::Service, &check.service_name, Need::Read))
}

/// The write permissions a catalog registration needs (Consul's
/// `vetRegisterWithACL`): `node:write` when it creates or changes the
/// node or adds a node check, `service:write` for its service and for
/// each service check's service.
fn vet_registration(
    authz: &Authz,
    state: &RegistryState,
    reg: &Registration,
) -> Result<(), ApiError> {
    // As applied: a missing node is created (SkipNodeUpdate or not), and
    // an existing one takes the registration's address, tagged addresses
    // and meta as given (left out: emptied).
    let node_changes = match state.catalog.node(&reg.node) {
        None => true,
        Some(_) if reg.skip_node_update => false,
        Some(n) => {
            n.address != reg.address
                || (!reg.node_id.is_empty() && n.id != reg.node_id)
                || n.tagged_addresses != reg.tagged_addresses
                || n.meta != reg.node_meta
        }
    };
    if node_changes {
        authz.require(Kind::Node, &reg.node, Need::Write)?;
    }
    if let Some(service) = &reg.service {
        authz.require(Kind::Service, &service.name, Need::Write)?;
        // Taking over an instance id registered under another name needs
        // that name's write too.
        if let Some(old) = state.catalog.service(&reg.node, &service.id)
            && old.name != service.name
        {
            authz.require(Kind::Service, &old.name, Need::Write)?;
        }
    }
    for check in &reg.checks {
        let service_name = if check.service_id.is_empty() {
            None
        } else if let Some(s) = reg.service.as_ref().filter(|s| s.id == check.service_id) {
            Some(s.name.clone())
        } else {
            state
                .catalog
                .service(&reg.node, &check.service_id)
                .map(|s| s.name.clone())
        };
        match service_name {
            Some(name) => authz.require(Kind::Service, &name, Need::Write)?,
            None => authz.require(Kind::Node, &reg.node, Need::Write)?,
        }
        require_check_owner(authz, state, &reg.node, &check.check_id)?;
    }
    Ok(())
}

/// Overwriting a check that exists needs its current owner's write too
/// (its service's, or the node's): a check ID is no way into another
/// service's health.
pub(super) fn require_check_owner(
    authz: &Resolved,
    state: &RegistryState,
    node: &str,
    check_id: &str,
) -> Result<(), ApiError> {
    let Some(existing) = state
        .catalog
        .node_checks(node)
        .find(|c| c.check_id == check_id)
    else {
        return Ok(());
    };
    if existing.service_id.is_empty() {
        authz.require(Kind::Node, node, Need::Write)?;
    } else {
        authz.require(Kind::Service, &existing.service_name, Need::Write)?;
    }
    Ok(())
}

/// Whether an instance carries every tag asked for with `?tag=`.
fn has_tags(tags: &[String], params: &Params) -> bool {
    params
        .get_all("tag")
        .all(|t| tags.iter().any(|have| have == t))
}

/// `PUT /v1/catalog/register`.
pub async fn register(
    State(app): State<AppState>,
    authz: Authz,
    body: Bytes,
) -> Result<Response, ApiError> {
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
    vet_registration(&authz, &app.node.state.read(), &reg)?;
    app.write_catalog(Command::CatalogRegister(Box::new(reg)))
        .await?;
    Ok(Json(true).into_response())
}

/// `PUT /v1/catalog/deregister` with `{Node, ServiceID?, CheckID?}`.
pub async fn deregister(
    State(app): State<AppState>,
    authz: Authz,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut f = Fields::from_body("deregistration", &body)?;
    let node = f.string("node")?;
    let service_id = Some(f.string("serviceid")?).filter(|s| !s.is_empty());
    let check_id = Some(f.string("checkid")?).filter(|s| !s.is_empty());
    f.ignore(&["datacenter", "partition", "namespace"]);
    f.finish()?;
    if node.is_empty() {
        return Err(ApiError::bad_request("Must provide node"));
    }
    {
        // A service (or its check) needs its service's write; the node or
        // a node check, the node's (Consul's `vetDeregisterWithACL`).
        let state = app.node.state.read();
        let catalog = &state.catalog;
        let service_of = |id: &str| catalog.service(&node, id).map(|s| s.name.clone());
        let owner = match (&service_id, &check_id) {
            (Some(id), _) => service_of(id),
            (None, Some(check)) => catalog
                .node_checks(&node)
                .find(|c| c.check_id == *check && !c.service_id.is_empty())
                .map(|c| c.service_name.clone()),
            (None, None) => None,
        };
        match owner {
            Some(name) => authz.require(Kind::Service, &name, Need::Write)?,
            None => authz.require(Kind::Node, &node, Need::Write)?,
        }
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
    authz: Authz,
    uri: Uri,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    json_read(
        &app,
        &authz,
        uri,
        q,
        IndexOf::ServiceList,
        |state, _, authz| {
            let all = state.catalog.service_names();
            let total = all.len();
            let names: BTreeMap<&str, Vec<&str>> = all
                .into_iter()
                .filter(|(name, _)| authz.allows(Kind::Service, name, Need::Read))
                .map(|(name, tags)| (name, tags.into_iter().collect()))
                .collect();
            let filtered = names.len() != total;
            (json!(names), filtered)
        },
    )
    .await
}

/// `GET /v1/internal/ui/services`: every service with its instance and
/// check counts (Consul's UI endpoint, the same shape), as the token may
/// see them; blocking on any catalog change.
pub async fn ui_services(
    State(app): State<AppState>,
    authz: Authz,
    uri: Uri,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    json_read(&app, &authz, uri, q, IndexOf::Catalog, |state, _, authz| {
        let catalog = &state.catalog;
        let mut filtered = false;
        let mut out = Vec::new();
        for (name, tags) in catalog.service_names() {
            let mut instances = 0u64;
            let mut counts = [0u64; 3];
            let mut nodes = std::collections::BTreeSet::new();
            let mut kind = "";
            for (node, s) in catalog.instances(name) {
                if !sees_instance(authz, node, s) {
                    filtered = true;
                    continue;
                }
                instances += 1;
                kind = &s.kind;
                nodes.insert(node.name.as_str());
                for check in catalog.instance_checks(&node.name, &s.id) {
                    if sees_check(authz, check) {
                        counts[check.status as usize] += 1;
                    }
                }
            }
            if instances == 0 {
                continue;
            }
            out.push(json!({
                "Name": name,
                "Kind": kind,
                "Tags": tags,
                "InstanceCount": instances,
                "ChecksPassing": counts[HealthStatus::Passing as usize],
                "ChecksWarning": counts[HealthStatus::Warning as usize],
                "ChecksCritical": counts[HealthStatus::Critical as usize],
                "Nodes": nodes,
            }));
        }
        (Value::Array(out), filtered)
    })
    .await
}

/// `GET /v1/catalog/service/:name?tag=`.
pub async fn service(
    State(app): State<AppState>,
    authz: Authz,
    uri: Uri,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    json_read(
        &app,
        &authz,
        uri,
        q,
        IndexOf::Service(name.clone()),
        |state, params, authz| {
            let mut filtered = false;
            let list: Vec<Value> = state
                .catalog
                .instances(&name)
                .filter(|(_, s)| has_tags(&s.tags, params))
                .filter(|(n, s)| {
                    let sees = sees_instance(authz, n, s);
                    filtered |= !sees;
                    sees
                })
                .map(|(n, s)| consul_json::catalog_service_json(n, s))
                .collect();
            (Value::Array(list), filtered)
        },
    )
    .await
}

/// `GET /v1/catalog/nodes`.
pub async fn nodes(
    State(app): State<AppState>,
    authz: Authz,
    uri: Uri,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    json_read(
        &app,
        &authz,
        uri,
        q,
        IndexOf::NodeList,
        |state, _, authz| {
            let mut filtered = false;
            let list: Vec<Value> = state
                .catalog
                .nodes()
                .filter(|n| {
                    let sees = authz.allows(Kind::Node, &n.name, Need::Read);
                    filtered |= !sees;
                    sees
                })
                .map(consul_json::node_json)
                .collect();
            (Value::Array(list), filtered)
        },
    )
    .await
}

/// `GET /v1/catalog/node/:node`: the node and its services (`null` if unknown).
pub async fn node(
    State(app): State<AppState>,
    authz: Authz,
    uri: Uri,
    Path(node): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    json_read(
        &app,
        &authz,
        uri,
        q,
        IndexOf::Node(node.clone()),
        |state, _, authz| match state.catalog.node(&node) {
            None => (Value::Null, false),
            // A node the token may not read is answered as unknown.
            Some(_) if !authz.allows(Kind::Node, &node, Need::Read) => (Value::Null, true),
            Some(n) => {
                let mut filtered = false;
                let services: Map<String, Value> = state
                    .catalog
                    .node_services(&node)
                    .filter(|s| {
                        let sees = authz.allows(Kind::Service, &s.name, Need::Read);
                        filtered |= !sees;
                        sees
                    })
                    .map(|s| (s.id.clone(), consul_json::service_json(s)))
                    .collect();
                (
                    json!({ "Node": consul_json::node_json(n), "Services": services }),
                    filtered,
                )
            }
        },
    )
    .await
}

/// `GET /v1/health/service/:name?passing&tag=`.
pub async fn health_service(
    State(app): State<AppState>,
    authz: Authz,
    uri: Uri,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(q.as_deref());
    let passing_only = params.flag("passing")?;
    json_read(
        &app,
        &authz,
        uri,
        q,
        IndexOf::Service(name.clone()),
        |state, params, authz| {
            let catalog = &state.catalog;
            let mut filtered = false;
            let list: Vec<Value> = catalog
                .instances(&name)
                .filter(|(_, s)| has_tags(&s.tags, params))
                .filter(|(n, s)| {
                    let sees = sees_instance(authz, n, s);
                    filtered |= !sees;
                    sees
                })
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
            (Value::Array(list), filtered)
        },
    )
    .await
}

/// `GET /v1/health/checks/:service`.
pub async fn health_checks(
    State(app): State<AppState>,
    authz: Authz,
    uri: Uri,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    json_read(
        &app,
        &authz,
        uri,
        q,
        IndexOf::Service(name.clone()),
        |state, _, authz| {
            checks_seen(
                authz,
                state
                    .catalog
                    .all_checks()
                    .filter(|c| c.service_name == name),
            )
        },
    )
    .await
}

/// The checks the token may see, as JSON, and whether any were left out.
fn checks_seen<'a>(
    authz: &Resolved,
    checks: impl Iterator<Item = &'a HealthCheck>,
) -> (Value, bool) {
    let mut filtered = false;
    let list: Vec<Value> = checks
        .filter(|c| {
            let sees = sees_check(authz, c);
            filtered |= !sees;
            sees
        })
        .map(consul_json::check_json)
        .collect();
    (Value::Array(list), filtered)
}

/// `GET /v1/health/node/:node`.
pub async fn health_node(
    State(app): State<AppState>,
    authz: Authz,
    uri: Uri,
    Path(node): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    json_read(
        &app,
        &authz,
        uri,
        q,
        IndexOf::Node(node.clone()),
        |state, _, authz| checks_seen(authz, state.catalog.node_checks(&node)),
    )
    .await
}

/// `GET /v1/health/state/:state` (`any`, `passing`, `warning`, `critical`).
pub async fn health_state(
    State(app): State<AppState>,
    authz: Authz,
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
    json_read(&app, &authz, uri, q, IndexOf::Checks, |state, _, authz| {
        checks_seen(
            authz,
            state
                .catalog
                .all_checks()
                .filter(|c| filter.is_none_or(|f| c.status == f)),
        )
    })
    .await
}
