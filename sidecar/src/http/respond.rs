//! Phase 6, respond: the upstream's answer passed on (hop-by-hop fields
//! and an app's own `x-meshwork-error` dropped, an upgrade spliced), or the
//! proxy's own answer for an error ([`super::rescue`]); each counted and
//! logged ([`super::access_log`]).

use std::net::SocketAddr;
use std::time::Instant;

use hyper::{Response, StatusCode, Version};
use hyper_util::rt::TokioIo;

use super::access_log::LogContext;
use super::headers::strip_hop_by_hop;
use super::rescue::{self, ProxyError};
use super::send::Upstream;
use super::{Guards, HttpProxy, ResponseBody};
use crate::telemetry::Outcome;
use crate::upstream::cluster::Source;

/// What the access log says of an answered request: its log context, the
/// endpoint that answered, the attempts made, when it started.
pub(super) type Done = (Option<LogContext>, Option<SocketAddr>, u32, Instant);

impl HttpProxy {
    /// The upstream's answer, counted, logged and passed on.
    #[inline]
    pub(super) fn respond(
        &self,
        response: Upstream,
        downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
        guards: Guards,
        (log, endpoint, attempts, start): Done,
    ) -> Response<ResponseBody> {
        let status = response.status().as_u16();
        let outcome = Outcome::Upstream;
        self.cluster
            .metrics
            .record(status, outcome, start.elapsed());
        if let Some(log) = log {
            log.write(self, status, outcome, endpoint, attempts, start);
        }
        self.forward(response, downstream_upgrade, guards)
    }

    /// Passes the upstream's response on, holding `guards` until its last
    /// byte; a 101 answer to an upgrade request splices the two upgraded
    /// connections instead.
    fn forward(
        &self,
        response: Upstream,
        downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
        guards: Guards,
    ) -> Response<ResponseBody> {
        let (mut response, lease) = match response {
            Upstream::Inline(head, body) => {
                // The inline leg leaves hop-by-hop fields out as it parses.
                let mut headers = head.headers;
                self.strip_error_header(&mut headers);
                let mut response = Response::new(ResponseBody::inline(body, guards));
                *response.status_mut() = head.status;
                *response.headers_mut() = headers;
                return response;
            }
            Upstream::H2(response) => {
                let (mut head, body) = response.into_parts();
                head.version = Version::HTTP_11;
                self.strip_response_headers(&mut head.headers);
                return Response::from_parts(head, ResponseBody::h2(body, guards));
            }
            Upstream::Hyper(response, lease) => (response, lease),
        };
        let upstream_upgrade = (response.status() == StatusCode::SWITCHING_PROTOCOLS)
            .then(|| hyper::upgrade::on(&mut response));
        let (mut head, body) = response.into_parts();
        head.version = Version::HTTP_11;
        if let (Some(down), Some(up)) = (downstream_upgrade, upstream_upgrade) {
            let name = self.cluster.config().name.clone();
            tokio::spawn(async move {
                let _guards = guards;
                // The upstream connection is the splice's now.
                let _lease = lease;
                match tokio::join!(down, up) {
                    (Ok(down), Ok(up)) => {
                        let mut down = TokioIo::new(down);
                        let mut up = TokioIo::new(up);
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                    (d, u) => {
                        tracing::debug!(upstream = %name, down_ok = d.is_ok(), up_ok = u.is_ok(), "upgrade did not complete")
                    }
                }
            });
            return Response::from_parts(head, ResponseBody::Empty);
        }
        self.strip_response_headers(&mut head.headers);
        Response::from_parts(head, ResponseBody::upstream(body, lease, guards))
    }

    fn strip_response_headers(&self, headers: &mut hyper::HeaderMap) {
        strip_hop_by_hop(headers, false);
        self.strip_error_header(headers);
    }

    fn strip_error_header(&self, headers: &mut hyper::HeaderMap) {
        if self.cluster.source == Source::Local {
            // Only a sidecar may say why it answered: an app's own
            // x-meshwork-error would make peers retry.
            headers.remove(rescue::ERROR_HEADER);
        }
    }

    /// The proxy's own answer for `error`, counted and logged.
    pub(super) fn fail(
        &self,
        error: ProxyError,
        grpc: bool,
        start: Instant,
        log: Option<LogContext>,
        endpoint: Option<SocketAddr>,
        attempts: u32,
    ) -> Response<ResponseBody> {
        let response = rescue::respond(&error, grpc).map(ResponseBody::Own);
        let status = response.status().as_u16();
        self.cluster
            .metrics
            .record(status, error.outcome(), start.elapsed());
        if let Some(log) = log {
            log.write(self, status, error.outcome(), endpoint, attempts, start);
        }
        response
    }
}
