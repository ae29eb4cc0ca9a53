//! Phase 0 on the inbound listener, authorize: the request's path
//! normalised (`meshwork_core::http_path`; the app gets the normal form,
//! so what was decided is what is served; a path that cannot be
//! normalised is a 400) and the verified caller's service decided against
//! the intentions (denied: 403 `x-meshwork-error: intention-denied`, or
//! gRPC PERMISSION_DENIED, via [`super::rescue`]; no intentions yet: 503).

use std::borrow::Cow;

use hyper::Uri;
use hyper::http::request::Parts;
use hyper::http::uri::PathAndQuery;
use meshwork_core::http_path;

use super::rescue::ProxyError;
use crate::policy::intentions::{Authz, Caller};
use meshwork_core::intentions::Rule;

/// Lets the request through (its path rewritten to the normal form when
/// it was not), with the rule that allowed it, or says why not.
pub fn request(caller: &Caller, parts: &mut Parts) -> Result<Rule, ProxyError> {
    // Methods are case-sensitive, but some frameworks upper-case them:
    // `delete` would pass a `DELETE` rule and be served as one.
    if parts
        .method
        .as_str()
        .bytes()
        .any(|b| b.is_ascii_lowercase())
    {
        return Err(ProxyError::BadRequest("a method in lower case"));
    }
    let target = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let (path, query) = http_path::split_query(target);
    // CONNECT's authority form has no path to decide on: the root stands in.
    let path = if parts.method == hyper::Method::CONNECT {
        Cow::Borrowed("/")
    } else {
        http_path::normalize(path)
            .map_err(|_| ProxyError::BadRequest("the request path cannot be normalised"))?
    };
    // Header rules about the host see the authority the app will get:
    // HTTP/2 carries it as `:authority`, which the upstream request keeps
    // in the URI (no `host` header), so it stands in as `host` here.
    let lent_host = parts.version == hyper::Version::HTTP_2
        && !parts.headers.contains_key(hyper::header::HOST)
        && parts
            .uri
            .authority()
            .and_then(|a| hyper::header::HeaderValue::from_str(a.as_str()).ok())
            .map(|host| parts.headers.insert(hyper::header::HOST, host))
            .is_some();
    let decision = caller.intentions.decide_request(
        &caller.service,
        parts.method.as_str(),
        &path,
        &parts.headers,
    );
    if lent_host {
        parts.headers.remove(hyper::header::HOST);
    }
    // A tunnel (CONNECT, or an upgrade to anything but WebSocket) carries
    // whatever the caller sends next, which no L7 rule sees: only an L4
    // intention (or the default) may open one. (`Upgrade: h2c` never
    // gets here: the inbound listener drops it.)
    let mut upgrades = parts.headers.get_all(hyper::header::UPGRADE).iter();
    let websocket_only = match (upgrades.next(), upgrades.next()) {
        (None, _) => true,
        (Some(one), None) => one
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"websocket"),
        _ => false,
    };
    let tunnel = parts.method == hyper::Method::CONNECT || !websocket_only;
    let decision = match decision {
        Authz::AllowL7(rule) if tunnel => {
            Authz::Deny(format!("{rule} (L7 permissions: no tunnels)"))
        }
        other => other,
    };
    let allowed_by = match decision {
        Authz::Allow(rule) | Authz::AllowL7(rule) => rule,
        Authz::Deny(rule) => {
            tracing::debug!(source = %caller.service, method = %parts.method, path = %path, %rule, "request denied by intention");
            return Err(ProxyError::IntentionDenied(rule));
        }
        Authz::Pending => return Err(ProxyError::IntentionsPending),
    };
    if let Cow::Owned(normal) = path {
        let target = match query {
            Some(q) => format!("{normal}?{q}"),
            None => normal,
        };
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.path_and_query = Some(
            PathAndQuery::try_from(target)
                .map_err(|_| ProxyError::BadRequest("the request path cannot be normalised"))?,
        );
        parts.uri = Uri::from_parts(uri)
            .map_err(|_| ProxyError::BadRequest("the request target is not a valid URI"))?;
    }
    Ok(allowed_by)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::policy::intentions::{Intentions, compile};
    use meshwork_proto::v1::ConfigEntry;

    fn caller(json: Option<&str>) -> Caller {
        let intentions = Intentions::default();
        if let Some(json) = json {
            let entries: BTreeMap<String, ConfigEntry> = [(
                "api".to_owned(),
                ConfigEntry {
                    kind: "service-intentions".into(),
                    name: "api".into(),
                    json: json.into(),
                    create_index: 1,
                    modify_index: 1,
                },
            )]
            .into_iter()
            .collect();
            intentions.install(compile("api", &entries, true).expect("compiled"));
        }
        Caller::new(Arc::from("web"), (intentions, Default::default()), None)
    }

    fn parts(target: &str) -> Parts {
        hyper::Request::get(target)
            .body(())
            .expect("request")
            .into_parts()
            .0
    }

    #[test]
    fn paths_are_normalised_before_deciding_and_sent_on_normal() {
        let web = caller(Some(
            r#"{"Sources":[{"Name":"web","Permissions":[{"Action":"deny","HTTP":{"PathPrefix":"/admin"}}]}]}"#,
        ));
        let mut p = parts("/a/../admin/x?y=1");
        assert!(matches!(
            request(&web, &mut p),
            Err(ProxyError::IntentionDenied(_))
        ));
        let mut p = parts("/a//b/./c?y=1");
        request(&web, &mut p).expect("allowed");
        assert_eq!(
            p.uri.path_and_query().map(|p| p.as_str()),
            Some("/a/b/c?y=1")
        );
        let mut p = parts("/a%00b");
        assert!(matches!(
            request(&web, &mut p),
            Err(ProxyError::BadRequest(_))
        ));
        let denied = super::super::rescue::respond(&ProxyError::IntentionDenied("x".into()), false);
        assert_eq!(denied.status(), 403);
        assert_eq!(denied.headers()["x-meshwork-error"], "intention-denied");
        let grpc = super::super::rescue::respond(&ProxyError::IntentionDenied("x".into()), true);
        assert_eq!(grpc.headers()["grpc-status"], "7");
    }

    #[test]
    fn nothing_passes_before_the_first_intentions() {
        let mut p = parts("/");
        assert!(matches!(
            request(&caller(None), &mut p),
            Err(ProxyError::IntentionsPending)
        ));
    }
}
