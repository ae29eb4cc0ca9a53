//! The admin listener: `/live` (the process runs), `/ready` (registered
//! with the registry), `/status` (JSON: registration, checks, which
//! registry server, last contact).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::SharedStatus;

pub async fn serve(listener: TcpListener, status: SharedStatus, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/status", get(status_json))
        .with_state(status);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

async fn ready(State(status): State<SharedStatus>) -> Response {
    let registered = status.lock().map(|s| s.registered).unwrap_or(false);
    if registered {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not registered yet\n").into_response()
    }
}

async fn status_json(State(status): State<SharedStatus>) -> Response {
    let snapshot = status.lock().map(|s| s.clone()).unwrap_or_default();
    Json(snapshot).into_response()
}
