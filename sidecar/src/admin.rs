//! The admin listener: `/live` (the process runs), `/ready` (registered
//! with the registry and, with a proxy, the mesh leaf and roots in hand and
//! every upstream's first endpoint set received), `/status` (JSON:
//! registration, checks, which registry server, last contact, the mesh
//! leaf and roots under `mesh`), and Consul's TTL check endpoints
//! (`PUT /v1/agent/check/pass|warn|fail/<check id>?note=...`) for the app;
//! `/metrics` (Prometheus text: the proxy's counters and config reloads),
//! `/clusters` and `/config` (JSON; empty without listeners).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, put};
use meshwork_core::health::HealthStatus;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::{SharedStatus, TtlReports};
use crate::listener::Proxy;

#[derive(Clone)]
struct Admin {
    status: SharedStatus,
    ttl: TtlReports,
    proxy: Arc<Proxy>,
}

pub async fn serve(
    listener: TcpListener,
    status: SharedStatus,
    ttl: TtlReports,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/status", get(status_json))
        .route("/v1/agent/check/{verb}/{check_id}", put(ttl_report))
        .route("/metrics", get(metrics))
        .route("/clusters", get(clusters))
        .route("/config", get(config))
        .with_state(Admin { status, ttl, proxy });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

async fn ready(State(admin): State<Admin>) -> Response {
    let registered = admin.status.lock().map(|s| s.registered).unwrap_or(false);
    if let Some(reason) = admin.proxy.mesh_not_ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response();
    }
    if admin.proxy.intentions_pending() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no intentions yet (waiting for the registry's service-intentions and ca_roots watches)\n",
        )
            .into_response();
    }
    if registered && !admin.proxy.ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "registered; waiting for the upstreams' first endpoint sets\n",
        )
            .into_response();
    }
    if registered {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not registered yet\n").into_response()
    }
}

async fn metrics(State(admin): State<Admin>) -> Response {
    let mut text = admin.proxy.metrics();
    text.push_str(&crate::reload::render_metrics(
        &crate::agent::lock(&admin.status).config,
    ));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn clusters(State(admin): State<Admin>) -> Response {
    Json(admin.proxy.clusters()).into_response()
}

async fn config(State(admin): State<Admin>) -> Response {
    Json(admin.proxy.config()).into_response()
}

async fn status_json(State(admin): State<Admin>) -> Response {
    let snapshot = admin.status.lock().map(|s| s.clone()).unwrap_or_default();
    let mut value = serde_json::to_value(snapshot).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.insert("mesh".into(), admin.proxy.mesh().status());
        object.insert(
            "intentions_loaded".into(),
            admin.proxy.intentions().loaded().into(),
        );
        let applied = admin.proxy.applied().summary();
        let refused: Vec<serde_json::Value> = applied
            .refused
            .iter()
            .map(|r| serde_json::json!({ "scope": r.scope, "reason": r.reason, "index": r.index }))
            .collect();
        object.insert(
            "applied_config".into(),
            serde_json::json!({ "kinds": applied.applied, "refused": refused }),
        );
    }
    Json(value).into_response()
}

async fn ttl_report(
    State(admin): State<Admin>,
    Path((verb, check_id)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let status = match verb.as_str() {
        "pass" => HealthStatus::Passing,
        "warn" => HealthStatus::Warning,
        "fail" => HealthStatus::Critical,
        other => {
            return (
                StatusCode::NOT_FOUND,
                format!("unknown verb {other:?} (use pass, warn or fail)\n"),
            )
                .into_response();
        }
    };
    let note = query.get("note").cloned().unwrap_or_default();
    match admin.ttl.report(&check_id, status, note) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) if e.starts_with("no TTL check") => {
            (StatusCode::NOT_FOUND, format!("{e}\n")).into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}
