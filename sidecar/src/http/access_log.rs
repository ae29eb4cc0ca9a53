//! The access log's view of a request: what it needs of the request,
//! taken before the request moves on, and the JSON line written once the
//! request is answered (`telemetry::AccessLog`).

use std::net::SocketAddr;
use std::time::Instant;

use hyper::Version;

use super::{HttpProxy, REQUEST_ID};
use crate::telemetry::{AccessLog, Outcome, unix_ms};

/// What the access log needs of the request, taken before it moves on.
pub struct LogContext {
    method: String,
    path: String,
    protocol: &'static str,
    pub request_id: Option<String>,
    traceparent: Option<String>,
    /// Inbound: the caller and the intention that decided.
    pub source: Option<std::sync::Arc<str>>,
    pub intention: Option<String>,
}

impl LogContext {
    pub fn new(req: &hyper::http::request::Parts) -> Self {
        let text = |name: &str| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        LogContext {
            method: req.method.to_string(),
            path: req.uri.path().to_owned(),
            protocol: match req.version {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            request_id: text(REQUEST_ID.as_str()),
            traceparent: text("traceparent"),
            source: None,
            intention: None,
        }
    }

    pub fn write(
        self,
        proxy: &HttpProxy,
        status: u16,
        outcome: Outcome,
        endpoint: Option<SocketAddr>,
        attempts: u32,
        start: Instant,
    ) {
        AccessLog {
            ts_unix_ms: unix_ms(),
            direction: proxy.direction,
            upstream: &proxy.cluster.config().name,
            method: &self.method,
            path: &self.path,
            protocol: self.protocol,
            status,
            outcome: outcome.as_str(),
            endpoint: endpoint.map(|e| e.to_string()),
            attempts,
            duration_ms: start.elapsed().as_secs_f64() * 1000.0,
            request_id: self.request_id.as_deref(),
            traceparent: self.traceparent.as_deref(),
            source: self.source.as_deref(),
            intention: self.intention.as_deref(),
        }
        .write();
    }
}
