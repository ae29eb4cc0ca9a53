//! The token of a REST request and what it may do: every handler that
//! touches data takes an [`Authz`] and asks it before acting.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;
use crate::auth::Resolved;

/// The resolved rights of the request's token (`?token=`,
/// `X-Consul-Token` or `Authorization: Bearer`). An unknown or expired
/// token is refused here, before the handler runs: 403 "ACL not found".
#[derive(Debug, Clone)]
pub struct Authz(pub Resolved);

impl std::ops::Deref for Authz {
    type Target = Resolved;
    fn deref(&self) -> &Resolved {
        &self.0
    }
}

impl FromRequestParts<AppState> for Authz {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        if !app.acl.enabled() {
            return Ok(Authz(Resolved::everything()));
        }
        let query_token = parts.uri.query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        });
        let token = crate::auth::request_token(query_token.as_deref(), &parts.headers);
        crate::api::resolve(&app.acl, &app.node, token)
            .map(Authz)
            .map_err(ApiError::from)
    }
}

/// Says that a list lost entries the token may not read (Consul's
/// header; absent otherwise).
pub fn mark_filtered(headers: &mut axum::http::HeaderMap, filtered: bool) {
    if filtered {
        headers.insert(
            "X-Consul-Results-Filtered-By-ACLs",
            axum::http::HeaderValue::from_static("true"),
        );
    }
}
