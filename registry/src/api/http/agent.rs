//! `/v1/agent/*`: every registry server acts as the Consul agent of its own
//! node; services and checks registered here live on that node.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use super::AppState;
use super::authz::Authz;
use super::consul_json::{self, Fields};
use super::error::ApiError;
use super::query::Params;
use crate::auth::{Kind, Need};
use crate::cluster::Consistency;
use crate::command::Command;
use crate::state::catalog::{CheckSpec, HealthStatus, Registration};

/// The registration of this server's own node, carrying `service` and `checks`.
fn agent_registration(app: &AppState) -> Registration {
    Registration {
        node: app.node_name.to_string(),
        node_id: app.node_uuid.to_string(),
        address: app.agent_address.to_string(),
        datacenter: app.datacenter.to_string(),
        ..Registration::default()
    }
}

/// The write a check on this server's node needs: its service's, or the
/// node's for a node check (unknown checks: the node's).
fn require_check_write(app: &AppState, authz: &Authz, check_id: &str) -> Result<(), ApiError> {
    let state = app.node.state.read();
    let owner = state
        .catalog
        .node_checks(&app.node_name)
        .find(|c| c.check_id == check_id && !c.service_id.is_empty())
        .map(|c| c.service_name.clone());
    match owner {
        Some(service) => authz.require(Kind::Service, &service, Need::Write)?,
        None => authz.require(Kind::Node, &app.node_name, Need::Write)?,
    }
    Ok(())
}

/// The write a service instance of this node needs (its name's).
fn require_service_write(app: &AppState, authz: &Authz, id: &str) -> Result<(), ApiError> {
    let name = app
        .node
        .state
        .read()
        .catalog
        .service(&app.node_name, id)
        .map(|s| s.name.clone())
        .ok_or_else(|| ApiError::NotFound(format!("Unknown service ID {id:?}")))?;
    authz.require(Kind::Service, &name, Need::Write)?;
    Ok(())
}

/// `PUT /v1/agent/service/register`: needs the service's write (the
/// agent's node is this server's own).
pub async fn register_service(
    State(app): State<AppState>,
    authz: Authz,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (service, checks) = consul_json::decode_agent_service(&body)?;
    authz.require(Kind::Service, &service.name, Need::Write)?;
    if let Some(old) = app
        .node
        .state
        .read()
        .catalog
        .service(&app.node_name, &service.id)
        .filter(|old| old.name != service.name)
    {
        authz.require(Kind::Service, &old.name, Need::Write)?;
    }
    {
        let state = app.node.state.read();
        for check in &checks {
            super::catalog::require_check_owner(&authz, &state, &app.node_name, &check.check_id)?;
        }
    }
    let mut reg = agent_registration(&app);
    reg.service = Some(service);
    reg.checks = checks;
    app.write_catalog(Command::CatalogRegister(Box::new(reg)))
        .await?;
    Ok(().into_response())
}

/// `PUT /v1/agent/service/deregister/:id`.
pub async fn deregister_service(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    app.node.read_barrier(Consistency::Default).await?;
    require_service_write(&app, &authz, &id)?;
    app.write_catalog(Command::CatalogDeregister {
        node: app.node_name.to_string(),
        service_id: Some(id),
        check_id: None,
    })
    .await?;
    Ok(().into_response())
}

/// `GET /v1/agent/services`: this node's services by id.
pub async fn services(State(app): State<AppState>, authz: Authz) -> Json<Value> {
    let state = app.node.state.read();
    let map: Map<String, Value> = state
        .catalog
        .node_services(&app.node_name)
        .filter(|s| authz.allows(Kind::Service, &s.name, Need::Read))
        .map(|s| {
            (
                s.id.clone(),
                consul_json::agent_service_json(s, &app.datacenter),
            )
        })
        .collect();
    Json(Value::Object(map))
}

/// `GET /v1/agent/service/:id`.
pub async fn service(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let state = app.node.state.read();
    let service = state
        .catalog
        .service(&app.node_name, &id)
        .ok_or_else(|| ApiError::NotFound(format!("unknown service ID: {id}")))?;
    authz.require(Kind::Service, &service.name, Need::Read)?;
    Ok(Json(consul_json::agent_service_json(
        service,
        &app.datacenter,
    )))
}

/// `GET /v1/agent/checks`: this node's checks by id.
pub async fn checks(State(app): State<AppState>, authz: Authz) -> Json<Value> {
    let state = app.node.state.read();
    let map: Map<String, Value> = state
        .catalog
        .node_checks(&app.node_name)
        .filter(|c| super::catalog::sees_check(&authz, c))
        .map(|c| (c.check_id.clone(), consul_json::check_json(c)))
        .collect();
    Json(Value::Object(map))
}

/// `PUT /v1/agent/check/register`.
pub async fn register_check(
    State(app): State<AppState>,
    authz: Authz,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut check = consul_json::decode_check(Fields::from_body("check", &body)?)?;
    if check.name.is_empty() {
        return Err(ApiError::bad_request("Missing check name"));
    }
    if check.service_id.is_empty() {
        authz.require(Kind::Node, &app.node_name, Need::Write)?;
    } else {
        require_service_write(&app, &authz, &check.service_id)?;
    }
    super::catalog::require_check_owner(
        &authz,
        &app.node.state.read(),
        &app.node_name,
        if check.check_id.is_empty() {
            &check.name
        } else {
            &check.check_id
        },
    )?;
    if check.check_id.is_empty() {
        check.check_id.clone_from(&check.name);
    }
    let mut reg = agent_registration(&app);
    reg.checks = vec![check];
    app.write_catalog(Command::CatalogRegister(Box::new(reg)))
        .await?;
    Ok(().into_response())
}

/// `PUT /v1/agent/check/deregister/:id`.
pub async fn deregister_check(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    app.node.read_barrier(Consistency::Default).await?;
    require_check_write(&app, &authz, &id)?;
    let known = app
        .node
        .state
        .read()
        .catalog
        .node_checks(&app.node_name)
        .any(|c| c.check_id == id);
    if !known {
        return Err(ApiError::NotFound(format!("Unknown check ID {id:?}")));
    }
    app.write_catalog(Command::CatalogDeregister {
        node: app.node_name.to_string(),
        service_id: None,
        check_id: Some(id),
    })
    .await?;
    Ok(().into_response())
}

/// `PUT /v1/agent/check/{pass,warn,fail}/:id?note=`.
pub async fn ttl_update(
    app: AppState,
    authz: Authz,
    id: String,
    status: HealthStatus,
    query: Option<String>,
) -> Result<Response, ApiError> {
    app.node.read_barrier(Consistency::Default).await?;
    require_check_write(&app, &authz, &id)?;
    let note = Params::parse(query.as_deref())
        .get("note")
        .unwrap_or_default()
        .to_owned();
    update_ttl_check(&app, id, status, note).await
}

pub async fn pass(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    ttl_update(app, authz, id, HealthStatus::Passing, q).await
}

pub async fn warn(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    ttl_update(app, authz, id, HealthStatus::Warning, q).await
}

pub async fn fail(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    ttl_update(app, authz, id, HealthStatus::Critical, q).await
}

/// `PUT /v1/agent/check/update/:id` with `{"Status": …, "Output": …}`.
pub async fn update(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    app.node.read_barrier(Consistency::Default).await?;
    require_check_write(&app, &authz, &id)?;
    let mut f = Fields::from_body("check update", &body)?;
    let status_text = f.string("status")?;
    let output = f.string("output")?;
    f.finish()?;
    let status = HealthStatus::parse(&status_text).ok_or_else(|| {
        ApiError::bad_request(format!(
            "Invalid check status {status_text:?}: use passing, warning or critical"
        ))
    })?;
    update_ttl_check(&app, id, status, output).await
}

async fn update_ttl_check(
    app: &AppState,
    id: String,
    status: HealthStatus,
    output: String,
) -> Result<Response, ApiError> {
    // The callers passed the read barrier and checked the token.
    {
        let state = app.node.state.read();
        let check = state
            .catalog
            .node_checks(&app.node_name)
            .find(|c| c.check_id == id)
            .ok_or_else(|| ApiError::NotFound(format!("Unknown check ID {id:?}")))?;
        if check.definition.ttl_ms.is_none() {
            return Err(ApiError::bad_request(format!(
                "CheckID {id:?} does not have associated TTL"
            )));
        }
    }
    app.write_catalog(Command::CheckUpdate {
        node: app.node_name.to_string(),
        check_id: id,
        status,
        output,
    })
    .await?;
    Ok(().into_response())
}

/// `PUT /v1/agent/service/maintenance/:id?enable=true&reason=`.
pub async fn maintenance(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(q.as_deref());
    let enable = match params.get("enable") {
        Some("true") => true,
        Some("false") => false,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Invalid value for enable: {other:?}"
            )));
        }
        None => return Err(ApiError::bad_request("Missing value for enable")),
    };
    require_service_write(&app, &authz, &id)?;
    let check_id = format!("_service_maintenance:{id}");
    if enable {
        let reason = params
            .get("reason")
            .filter(|r| !r.is_empty())
            .unwrap_or("Maintenance mode is enabled for this service, but no reason was provided. This is a default message.");
        let mut reg = agent_registration(&app);
        reg.skip_node_update = true;
        reg.checks = vec![CheckSpec {
            check_id,
            name: "Service Maintenance Mode".into(),
            status: HealthStatus::Critical,
            notes: reason.to_owned(),
            service_id: id,
            ..CheckSpec::default()
        }];
        app.write_catalog(Command::CatalogRegister(Box::new(reg)))
            .await?;
    } else {
        let present = app
            .node
            .state
            .read()
            .catalog
            .node_checks(&app.node_name)
            .any(|c| c.check_id == check_id);
        if present {
            app.write_catalog(Command::CatalogDeregister {
                node: app.node_name.to_string(),
                service_id: None,
                check_id: Some(check_id),
            })
            .await?;
        }
    }
    Ok(().into_response())
}
