//! Every answer the proxy makes itself, in one place: a [`ProxyError`]
//! becomes a 502/503/504/400 with `x-meshwork-error: <code>` and a one-line
//! body, or, for a gRPC caller, a trailers-only response with the matching
//! `grpc-status`. Nothing else in the proxy builds error responses.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Response, StatusCode};

use crate::telemetry::Outcome;
use crate::upstream::ProxyBody;

/// The header naming why the proxy answered instead of the upstream.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-meshwork-error");

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("no healthy endpoint for upstream {0:?}")]
    NoHealthyUpstream(String),
    #[error("connect failed: {0}")]
    ConnectFailure(String),
    #[error("connecting to {0} took longer than {1:?}")]
    ConnectTimeout(String, Duration),
    #[error("the upstream closed or reset the connection before answering: {0}")]
    Reset(String),
    #[error("no answer within the request timeout of {0:?}")]
    Timeout(Duration),
    #[error("circuit open: {0} limit reached")]
    CircuitOpen(&'static str),
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("the sidecar is shutting down")]
    Draining,
    /// An intention refuses the caller (the rule that decided).
    #[error("denied by intention {0}")]
    IntentionDenied(String),
    /// No intentions have arrived from the registry yet.
    #[error("intentions not loaded yet")]
    IntentionsPending,
    /// The service's rate limit: the next token comes after this long.
    #[error("rate limited: retry after {0:?}")]
    RateLimited(Duration),
    /// A gateway listener routes no service for this host.
    #[error("no route for host {0:?} on this listener")]
    NoRoute(String),
    /// A gateway listener's authentication failed; the
    /// `WWW-Authenticate` challenge.
    #[error("authentication required: no valid credentials")]
    Unauthenticated(String),
    /// A method the gateway does not serve.
    #[error("method not allowed: {0}")]
    MethodNotAllowed(&'static str),
}

impl ProxyError {
    pub fn outcome(&self) -> Outcome {
        match self {
            ProxyError::NoHealthyUpstream(_) => Outcome::NoHealthyUpstream,
            ProxyError::ConnectFailure(_) => Outcome::ConnectFailure,
            ProxyError::ConnectTimeout(..) => Outcome::ConnectTimeout,
            ProxyError::Reset(_) => Outcome::Reset,
            ProxyError::Timeout(_) => Outcome::Timeout,
            ProxyError::CircuitOpen(_) => Outcome::CircuitOpen,
            ProxyError::BadRequest(_) => Outcome::BadRequest,
            ProxyError::Draining => Outcome::Draining,
            ProxyError::IntentionDenied(_) => Outcome::IntentionDenied,
            ProxyError::IntentionsPending => Outcome::IntentionsPending,
            ProxyError::RateLimited(_) => Outcome::RateLimited,
            ProxyError::NoRoute(_) => Outcome::NoRoute,
            ProxyError::Unauthenticated(_) => Outcome::Unauthenticated,
            ProxyError::MethodNotAllowed(_) => Outcome::MethodNotAllowed,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoHealthyUpstream(_)
            | ProxyError::ConnectFailure(_)
            | ProxyError::ConnectTimeout(..)
            | ProxyError::CircuitOpen(_)
            | ProxyError::Draining
            | ProxyError::IntentionsPending => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::IntentionDenied(_) => StatusCode::FORBIDDEN,
            ProxyError::Reset(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::NoRoute(_) => StatusCode::NOT_FOUND,
            ProxyError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The gRPC status code for the same failure.
    fn grpc_status(&self) -> u8 {
        match self {
            ProxyError::Timeout(_) => 4,           // DEADLINE_EXCEEDED
            ProxyError::BadRequest(_) => 13,       // INTERNAL
            ProxyError::CircuitOpen(_) => 14,      // UNAVAILABLE
            ProxyError::IntentionDenied(_) => 7,   // PERMISSION_DENIED
            ProxyError::RateLimited(_) => 8,       // RESOURCE_EXHAUSTED
            ProxyError::NoRoute(_) => 12,          // UNIMPLEMENTED
            ProxyError::Unauthenticated(_) => 16,  // UNAUTHENTICATED
            ProxyError::MethodNotAllowed(_) => 12, // UNIMPLEMENTED
            _ => 14,                               // UNAVAILABLE
        }
    }
}

/// True when `headers` (of a 503 from a peer sidecar) say the request
/// never reached that sidecar's app: it could not connect, had nothing to
/// send to, was at a limit, or was shutting down.
pub fn never_reached_app(headers: &hyper::HeaderMap) -> bool {
    headers.get(ERROR_HEADER).is_some_and(|v| {
        [
            Outcome::ConnectFailure,
            Outcome::ConnectTimeout,
            Outcome::NoHealthyUpstream,
            Outcome::CircuitOpen,
            Outcome::Draining,
            Outcome::IntentionsPending,
        ]
        .iter()
        .any(|o| v.as_bytes() == o.as_str().as_bytes())
    })
}

/// The response for `error`; `grpc` when the caller speaks gRPC.
pub fn respond(error: &ProxyError, grpc: bool) -> Response<ProxyBody> {
    let mut response = respond_without_wait(error, grpc);
    if let ProxyError::Unauthenticated(challenge) = error
        && let Ok(v) = HeaderValue::from_str(challenge)
    {
        response
            .headers_mut()
            .insert(hyper::header::WWW_AUTHENTICATE, v);
    }
    if let ProxyError::MethodNotAllowed(_) = error {
        response.headers_mut().insert(
            hyper::header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
    }
    if let ProxyError::RateLimited(wait) = error {
        // Whole seconds, rounded up (RFC 9110 §10.2.3).
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    response
}

fn respond_without_wait(error: &ProxyError, grpc: bool) -> Response<ProxyBody> {
    let code = HeaderValue::from_static(error.outcome().as_str());
    let message = error.to_string();
    if grpc {
        // Trailers-only: the status travels in the headers of a 200.
        let mut response = Response::new(empty());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(
            "grpc-status",
            HeaderValue::from(u16::from(error.grpc_status())),
        );
        if let Ok(v) = HeaderValue::from_str(&grpc_message(&message)) {
            headers.insert("grpc-message", v);
        }
        headers.insert(ERROR_HEADER, code);
        return response;
    }
    let mut response = Response::new(full(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = error.status();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(ERROR_HEADER, code);
    response
}

/// A gateway listener's redirect to HTTPS: `308` to `location` (the
/// method and body are kept by the client, RFC 9110 §15.4.9).
pub fn redirect(location: &str) -> Response<ProxyBody> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(location) {
        response.headers_mut().insert(hyper::header::LOCATION, v);
    }
    response.headers_mut().insert(
        ERROR_HEADER,
        HeaderValue::from_static(Outcome::Redirect.as_str()),
    );
    // Made from the client's own Host: not for a shared cache to keep.
    response.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

/// The header marking a response an injected fault changed: `abort` or
/// `delay`.
pub const FAULT_HEADER: HeaderName = HeaderName::from_static("x-meshwork-fault");

/// The answer of an injected abort: `status` (HTTP) or `grpc_status`
/// (a gRPC caller), marked `x-meshwork-fault: abort`.
pub fn fault_abort(status: u16, grpc_status: u8, grpc: bool) -> Response<ProxyBody> {
    let code = HeaderValue::from_static(Outcome::FaultAbort.as_str());
    let mut response = if grpc {
        let mut response = Response::new(empty());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(u16::from(grpc_status)));
        headers.insert("grpc-message", HeaderValue::from_static("fault%20injected"));
        response
    } else {
        let mut response = Response::new(full(Bytes::from_static(b"fault injected\n")));
        *response.status_mut() =
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    response.headers_mut().insert(ERROR_HEADER, code);
    response
        .headers_mut()
        .insert(FAULT_HEADER, HeaderValue::from_static("abort"));
    response
}

/// gRPC's percent-encoding of `grpc-message` (everything outside
/// printable ASCII, and `%`).
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_the_header_and_the_right_status() {
        let r = respond(&ProxyError::Timeout(Duration::from_secs(1)), false);
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(r.headers()[ERROR_HEADER], "timeout");
        let r = respond(&ProxyError::CircuitOpen("max_requests"), false);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[ERROR_HEADER], "circuit-open");
        let r = respond(&ProxyError::NoHealthyUpstream("api".into()), true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()[ERROR_HEADER], "no-healthy-upstream");
        assert_eq!(grpc_message("a%b é"), "a%25b %C3%A9");
        let r = respond(&ProxyError::ConnectFailure("app".into()), false);
        assert!(never_reached_app(r.headers()));
        let r = respond(&ProxyError::Reset("app".into()), false);
        assert!(!never_reached_app(r.headers()));
    }
}
