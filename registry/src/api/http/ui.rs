//! The web admin UI: three static files built into the binary (plain
//! JavaScript, no build step, nothing fetched from elsewhere), served at
//! `/ui/` by every server; `GET /` redirects there. The page reads the
//! same HTTP API as any client, with the token the user gives it.
//!
//! Every answer carries a strict Content-Security-Policy (scripts, styles
//! and requests only from this server, no inline script, no framing), so
//! a value that slipped into the page as markup could not run.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

const INDEX: &str = include_str!("../../../ui/index.html");
const APP_JS: &str = include_str!("../../../ui/app.js");
const APP_CSS: &str = include_str!("../../../ui/app.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn file(body: &'static str, content_type: &'static str) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Small, and new with every binary: revalidated each time.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /` and `GET /ui`: to the UI.
pub async fn to_ui() -> Redirect {
    Redirect::to("/ui/")
}

/// `GET /ui/`.
pub async fn index() -> Response {
    file(INDEX, "text/html; charset=utf-8")
}

/// `GET /ui/app.js`.
pub async fn app_js() -> Response {
    file(APP_JS, "text/javascript; charset=utf-8")
}

/// `GET /ui/app.css`.
pub async fn app_css() -> Response {
    file(APP_CSS, "text/css; charset=utf-8")
}
