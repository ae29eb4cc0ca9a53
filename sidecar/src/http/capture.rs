//! Phase 2, capture the body: a request body small enough (and with a
//! length) is read into memory so the request can be retried, with its
//! trailers; anything else is streamed, once.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body;

use super::ClientBody;
use super::headers::content_length;
use super::rescue::ProxyError;
use crate::config::Upstream;

/// Bodies up to this size are buffered so the request can be retried.
const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// The request body: kept (so it can be sent again), with its trailers if
/// it had any, or streamed once.
pub(super) enum RequestBody {
    Replayable(Bytes, Option<hyper::HeaderMap>),
    Streaming(Option<ClientBody>),
}

impl RequestBody {
    pub fn replayable(&self) -> bool {
        matches!(self, RequestBody::Replayable(..))
    }
}

/// Whether the body is kept or streamed: kept when it may be replayed
/// (retries are on, no upgrade, a `Content-Length` of at most
/// [`MAX_REPLAY_BODY`]; an empty body always). `Err`: the body is to be
/// read into memory first ([`read`]).
pub(super) fn plan(
    body: ClientBody,
    headers: &hyper::HeaderMap,
    config: &Upstream,
    upgrade: bool,
) -> Result<RequestBody, ClientBody> {
    if body.is_end_stream() {
        return Ok(RequestBody::Replayable(Bytes::new(), None));
    }
    if config.retries.attempts == 0
        || upgrade
        || content_length(headers).is_none_or(|n| n > MAX_REPLAY_BODY)
    {
        return Ok(RequestBody::Streaming(Some(body)));
    }
    Err(body)
}

/// Reads a body to keep, with its trailers, within the request's deadline
/// (`timeout` is what the deadline came from).
pub(super) async fn read(
    body: ClientBody,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<RequestBody, ProxyError> {
    match tokio::time::timeout_at(deadline, body.collect()).await {
        Ok(Ok(collected)) => {
            let trailers = collected.trailers().cloned();
            Ok(RequestBody::Replayable(collected.to_bytes(), trailers))
        }
        Ok(Err(_)) => Err(ProxyError::BadRequest("the request body broke off")),
        Err(_) => Err(ProxyError::Timeout(timeout)),
    }
}
