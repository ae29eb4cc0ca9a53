//! Phase 6, respond: the upstream's answer passed on (hop-by-hop fields
//! and an app's own `x-meshwork-error` dropped, an upgrade spliced), or the
//! proxy's own answer for an error ([`super::rescue`]); each counted and
//! logged ([`super::access_log`]).

use std::net::SocketAddr;
use std::time::Instant;

use hyper::{Response, Version};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::access_log::LogContext;
use super::headers::strip_hop_by_hop;
use super::rescue::{self, ProxyError};
use super::send::Upstream;
use super::{Guards, HttpProxy, ResponseBody};
use crate::telemetry::Outcome;
use crate::upstream::cluster::Source;
use crate::upstream::h1;

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
    /// byte; a 101 answer to an upgrade request, or a 2xx to CONNECT,
    /// splices the two connections instead.
    fn forward(
        &self,
        response: Upstream,
        downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
        guards: Guards,
    ) -> Response<ResponseBody> {
        match response {
            Upstream::Inline(head, body) => {
                // The HTTP/1.1 client leaves hop-by-hop fields out as it
                // parses (but a 101's `Connection` and `Upgrade`).
                let mut headers = head.headers;
                self.strip_error_header(&mut headers);
                let mut response = if body.is_tunnel() {
                    self.splice(body, downstream_upgrade, guards);
                    Response::new(ResponseBody::Empty)
                } else {
                    Response::new(ResponseBody::inline(body, guards))
                };
                *response.status_mut() = head.status;
                *response.headers_mut() = headers;
                response
            }
            Upstream::H2(response) => {
                let (mut head, body) = response.into_parts();
                head.version = Version::HTTP_11;
                strip_hop_by_hop(&mut head.headers, false);
                self.strip_error_header(&mut head.headers);
                Response::from_parts(head, ResponseBody::h2(body, guards))
            }
        }
    }

    /// Joins the client's upgraded connection (once hyper has sent it the
    /// answer) and the upstream's, byte for byte both ways, until either
    /// side closes; `guards` are held meanwhile.
    fn splice(
        &self,
        body: h1::Body,
        downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
        guards: Guards,
    ) {
        let name = self.cluster.config().name.clone();
        tokio::spawn(async move {
            let _guards = guards;
            // Only asked-for switches are read as tunnels, and only a
            // client's upgrade or CONNECT asks.
            let Some(down) = downstream_upgrade else {
                tracing::debug!(upstream = %name, "a tunnel answer to a request that asked none");
                return;
            };
            let (down, up) = tokio::join!(down, body.into_tunnel());
            let (Ok(down), Some((mut up, early))) = (down, up) else {
                tracing::debug!(upstream = %name, "upgrade did not complete");
                return;
            };
            let mut down = TokioIo::new(down);
            // What the upstream sent right behind its answer.
            if !early.is_empty() && down.write_all(&early).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
        });
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
