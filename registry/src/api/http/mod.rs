//! The REST API (axum), compatible with Consul's HTTP API for the parts
//! clients use. Handlers parse and validate, then call [`RegistryNode`];
//! errors map to responses in `error.rs` only.

pub mod acl;
pub mod agent;
pub mod authz;
pub mod catalog;
pub mod config;
pub mod connect;
pub mod consul_json;
pub mod error;
pub mod intentions;
pub mod kv;
pub mod mesh;
pub mod query;
pub mod serve;
pub mod session;
pub mod snapshot;
pub mod status;
pub mod txn;
pub mod ui;
pub mod waiters;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::Uri;
use axum::routing::{any, delete, get, post, put};
use tokio_util::sync::CancellationToken;

use crate::cluster::RegistryNode;
use crate::command::{Command, CommandResponse};
use crate::state::catalog::CatalogError;
use error::ApiError;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub node: Arc<RegistryNode>,
    /// Ends blocking queries early on shutdown.
    pub shutdown: CancellationToken,
    pub node_name: Arc<str>,
    pub node_uuid: Arc<str>,
    pub node_raft_addr: String,
    /// The address this server's node registers with (its advertise host).
    pub agent_address: Arc<str>,
    pub datacenter: Arc<str>,
    /// Read results shared by concurrent waiters.
    pub shared_reads: Arc<query::SharedReads>,
    /// Parked blocking queries, woken by what they wait on.
    pub waiters: Arc<waiters::Waiters>,
    /// The data dir (where an uploaded backup is spilled while checked).
    pub data_dir: Arc<std::path::Path>,
    /// ACL token resolution (everything allowed when ACLs are off).
    pub acl: Arc<crate::auth::Acl>,
    /// Leaves made for `/v1/agent/connect/ca/leaf`.
    pub leaves: Arc<connect::LeafCache>,
    /// What applies when no intention matches (`connect.default_intention`).
    pub default_intention_allow: bool,
    /// What the sidecars connected to this server have applied.
    pub sidecars: Arc<crate::telemetry::sidecars::Sidecars>,
}

impl AppState {
    /// Writes a catalog command; a refusal becomes 400 or 404.
    pub async fn write_catalog(&self, command: Command) -> Result<(), ApiError> {
        let applied = self.node.write(command).await?;
        match applied.response {
            CommandResponse::CatalogRejected(e) => Err(match e {
                CatalogError::Invalid(_) => ApiError::BadRequest(e.to_string()),
                _ => ApiError::NotFound(e.to_string()),
            }),
            _ => Ok(()),
        }
    }
}

/// The REST router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(ui::to_ui))
        .route("/ui", get(ui::to_ui))
        .route("/ui/", get(ui::index))
        .route("/ui/app.js", get(ui::app_js))
        .route("/ui/app.css", get(ui::app_css))
        .route("/v1/internal/ui/services", get(catalog::ui_services))
        .route("/v1/kv", any(kv::handle))
        .route("/v1/kv/", any(kv::handle))
        .route("/v1/kv/{*key}", any(kv::handle))
        .route("/v1/status/leader", get(status::leader))
        .route("/v1/status/peers", get(status::peers))
        .route(
            "/v1/operator/raft/configuration",
            get(status::raft_configuration),
        )
        .route(
            "/v1/operator/raft/peer",
            delete(status::remove_peer).put(status::add_peer),
        )
        .route("/v1/operator/raft/snapshot", put(status::take_snapshot))
        .route(
            "/v1/operator/autopilot/health",
            get(status::autopilot_health),
        )
        .route("/v1/agent/self", get(status::agent_self))
        .route("/v1/agent/members", get(status::agent_members))
        .route("/v1/agent/services", get(agent::services))
        .route("/v1/agent/service/{*id}", get(agent::service))
        .route("/v1/agent/checks", get(agent::checks))
        .route("/v1/agent/service/register", put(agent::register_service))
        .route(
            "/v1/agent/service/deregister/{*id}",
            put(agent::deregister_service),
        )
        .route(
            "/v1/agent/service/maintenance/{*id}",
            put(agent::maintenance),
        )
        .route("/v1/agent/check/register", put(agent::register_check))
        .route(
            "/v1/agent/check/deregister/{*id}",
            put(agent::deregister_check),
        )
        .route("/v1/agent/check/pass/{*id}", put(agent::pass))
        .route("/v1/agent/check/warn/{*id}", put(agent::warn))
        .route("/v1/agent/check/fail/{*id}", put(agent::fail))
        .route("/v1/agent/check/update/{*id}", put(agent::update))
        .route("/v1/catalog/register", put(catalog::register))
        .route("/v1/catalog/deregister", put(catalog::deregister))
        .route("/v1/catalog/datacenters", get(catalog::datacenters))
        .route("/v1/catalog/services", get(catalog::services))
        .route("/v1/catalog/service/{name}", get(catalog::service))
        .route("/v1/catalog/nodes", get(catalog::nodes))
        .route("/v1/catalog/node/{node}", get(catalog::node))
        .route("/v1/health/service/{name}", get(catalog::health_service))
        .route("/v1/health/checks/{name}", get(catalog::health_checks))
        .route("/v1/health/node/{node}", get(catalog::health_node))
        .route("/v1/health/state/{state}", get(catalog::health_state))
        .route(
            "/v1/snapshot",
            get(snapshot::save)
                .put(snapshot::restore)
                .layer(DefaultBodyLimit::max(snapshot::MAX_BACKUP_BYTES)),
        )
        .route("/v1/config", put(config::apply))
        .route("/v1/mesh/sidecars", get(mesh::sidecars))
        .route("/v1/mesh/propagation", get(mesh::propagation))
        .route("/v1/mesh/topology", get(mesh::topology))
        .route("/v1/config/{kind}", get(config::list))
        .route(
            "/v1/config/{kind}/{name}",
            get(config::get).delete(config::delete),
        )
        .route("/v1/txn", put(txn::handle))
        .route("/v1/session/create", put(session::create))
        .route("/v1/session/destroy/{id}", put(session::destroy))
        .route("/v1/session/renew/{id}", put(session::renew))
        .route("/v1/session/info/{id}", get(session::info))
        .route("/v1/session/node/{node}", get(session::node))
        .route("/v1/session/list", get(session::list))
        .route("/v1/acl/bootstrap", put(acl::bootstrap))
        .route("/v1/acl/token", put(acl::token_create))
        .route("/v1/acl/token/self", get(acl::token_self))
        .route(
            "/v1/acl/token/{id}",
            get(acl::token_read)
                .put(acl::token_update)
                .delete(acl::token_delete),
        )
        .route("/v1/acl/token/{id}/clone", put(acl::token_clone))
        .route("/v1/acl/tokens", get(acl::token_list))
        .route("/v1/acl/policy", put(acl::policy_create))
        .route(
            "/v1/acl/policy/{id}",
            get(acl::policy_read)
                .put(acl::policy_update)
                .delete(acl::policy_delete),
        )
        .route("/v1/acl/policy/name/{name}", get(acl::policy_read_by_name))
        .route("/v1/acl/policies", get(acl::policy_list))
        .route("/v1/acl/role", put(acl::role_create))
        .route(
            "/v1/acl/role/{id}",
            get(acl::role_read)
                .put(acl::role_update)
                .delete(acl::role_delete),
        )
        .route("/v1/acl/role/name/{name}", get(acl::role_read_by_name))
        .route("/v1/acl/roles", get(acl::role_list))
        .route("/v1/connect/ca/roots", get(connect::roots))
        .route("/v1/agent/connect/ca/roots", get(connect::roots))
        .route(
            "/v1/connect/ca/configuration",
            get(connect::configuration).put(connect::set_configuration),
        )
        .route("/v1/agent/connect/ca/leaf/{service}", get(connect::leaf))
        .route("/v1/agent/connect/authorize", post(intentions::authorize))
        .route("/v1/connect/intentions", get(intentions::list))
        .route(
            "/v1/connect/intentions/exact",
            get(intentions::exact_get)
                .put(intentions::exact_put)
                .delete(intentions::exact_delete),
        )
        .route("/v1/connect/intentions/match", get(intentions::matches))
        .route("/v1/connect/intentions/check", get(intentions::check))
        .route("/metrics", get(metrics_prometheus))
        .route("/v1/agent/metrics", get(metrics))
        // Scopes and filters Meshwork does not have are refused up front:
        // ignored, they would answer another question than the one asked.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            refuse_unsupported_scope,
        ))
        // Counted by matched route, so ids in paths do not explode labels.
        .route_layer(axum::middleware::from_fn(count_request))
        .fallback(not_found)
        // The KV handler enforces its own limit with a clearer message;
        // this bounds every other body.
        .layer(DefaultBodyLimit::max(kv::MAX_VALUE_BYTES))
        .with_state(state)
}

/// Refuses what would otherwise be silently ignored: another datacenter
/// (`?dc=`, as Consul's "No path to datacenter"), a non-default namespace
/// or partition (Consul Enterprise), and `?filter` / `?node-meta`
/// (not implemented): a client asking for them must not get an answer to
/// a different question.
async fn refuse_unsupported_scope(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    // Most requests carry no query: nothing to parse.
    let Some(query) = request.uri().query() else {
        return next.run(request).await;
    };
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let refusal = match key.as_ref() {
            "dc" if !value.is_empty() && *value != *state.datacenter => {
                format!("No path to datacenter {value:?}")
            }
            "ns" | "partition" if !value.is_empty() && value != "default" => format!(
                "?{key}={value}: namespaces and partitions are Consul Enterprise features; \
                 Meshwork has the default one only"
            ),
            "filter" | "node-meta" => format!(
                "?{key} is not supported by Meshwork; ask without it and filter the answer yourself"
            ),
            _ => continue,
        };
        return ApiError::bad_request(refusal).into_response();
    }
    next.run(request).await
}

async fn count_request(
    route: Option<axum::extract::MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let response = next.run(request).await;
    let route = route.as_ref().map_or("unmatched", |r| r.as_str());
    crate::metrics::METRICS.http_request(
        route,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

fn prometheus_text(app: &AppState) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            let mut text = crate::metrics::METRICS.prometheus(&app.node.readings());
            app.sidecars.topology().render_metrics(&mut text);
            text
        },
    )
        .into_response()
}

/// `GET /metrics`: Prometheus text (with ACLs, `agent:read` on this
/// server's node, as Consul's metrics endpoint).
async fn metrics_prometheus(
    axum::extract::State(app): axum::extract::State<AppState>,
    authz: authz::Authz,
) -> Result<axum::response::Response, ApiError> {
    authz.require(
        crate::auth::Kind::Agent,
        &app.node_name,
        crate::auth::Need::Read,
    )?;
    Ok(prometheus_text(&app))
}

/// `GET /v1/agent/metrics`: Consul's JSON, or Prometheus text with
/// `?format=prometheus`.
async fn metrics(
    axum::extract::State(app): axum::extract::State<AppState>,
    authz: authz::Authz,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Err(refusal) = authz.require(
        crate::auth::Kind::Agent,
        &app.node_name,
        crate::auth::Need::Read,
    ) {
        return ApiError::from(refusal).into_response();
    }
    let params = query::Params::parse(query.as_deref());
    match params.get("format") {
        Some("prometheus") => prometheus_text(&app),
        Some(other) => ApiError::bad_request(format!(
            "unknown format {other:?} (use prometheus, or leave it out for JSON)"
        ))
        .into_response(),
        None => {
            axum::Json(crate::metrics::METRICS.consul_json(&app.node.readings())).into_response()
        }
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no such endpoint: {}", uri.path()))
}
