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
/// A blocking query resolves the token again when it wakes
/// ([`Authz::refresh`]): a token revoked while it waited gets nothing. A
/// request that may change something (any method but `GET` and `HEAD`)
/// resolves it after [`crate::api::catch_up_for_write`].
#[derive(Debug, Clone)]
pub struct Authz {
    resolved: Resolved,
    /// What the request carried (`None`: it acts as the default or
    /// anonymous token).
    token: Option<crate::auth::Secret>,
    app: Option<AppState>,
}

impl std::ops::Deref for Authz {
    type Target = Resolved;
    fn deref(&self) -> &Resolved {
        &self.resolved
    }
}

impl Authz {
    /// Whether the request named a token itself.
    pub fn token_given(&self) -> bool {
        self.token.is_some()
    }

    /// The token's rights now (after a blocking wait), or the refusal if
    /// it no longer resolves.
    pub fn refresh(&self) -> Result<Resolved, ApiError> {
        match &self.app {
            None => Ok(self.resolved.clone()),
            Some(app) => crate::api::resolve(
                &app.acl,
                &app.node,
                self.token.as_ref().map(crate::auth::Secret::expose),
            )
            .map_err(ApiError::from),
        }
    }
}

impl FromRequestParts<AppState> for Authz {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        if !app.acl.enabled() {
            return Ok(Authz {
                resolved: Resolved::everything(),
                token: None,
                app: None,
            });
        }
        let query_token = parts.uri.query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        });
        let token = crate::auth::request_token(query_token.as_deref(), &parts.headers);
        if !matches!(
            parts.method,
            axum::http::Method::GET | axum::http::Method::HEAD
        ) {
            crate::api::catch_up_for_write(&app.acl, &app.node).await?;
        }
        let resolved = crate::api::resolve(&app.acl, &app.node, token)?;
        Ok(Authz {
            resolved,
            token: token.map(|t| crate::auth::Secret::new(t.to_owned())),
            app: Some(app.clone()),
        })
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
