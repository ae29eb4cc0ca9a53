//! Phase 4, send: one attempt of the request to one endpoint, over the
//! HTTP/1.1 client with a streamed body or the endpoint's HTTP/2
//! connection (`HttpProxy::exchange`) — the HTTP/1.1 client with a body in
//! memory is awaited in the answering future itself — bounded by the
//! request's deadline; and what its result means (`HttpProxy::sent`,
//! `classify`).

use hyper::body::Body;
use hyper::{Request, Response, StatusCode, Uri, Version};
use tokio::time::error::Elapsed;

use super::capture::RequestBody;
use super::prepare::Prepared;
use super::rescue::ProxyError;
use super::{ClientBody, HttpProxy, OutgoingBody};
use crate::upstream::dial::ConnectError;
use crate::upstream::endpoint::EndpointState;
use crate::upstream::h1;
use crate::upstream::pool::SendError;

/// What became of one attempt. (Not boxed: it lives for one step of the
/// answering future, and a box would cost an allocation per request.)
#[allow(clippy::large_enum_variant)]
pub(super) enum Sent {
    /// The upstream answered (any status).
    Answer(Upstream),
    /// No answer; the error says whether another endpoint may be tried.
    Failed(ProxyError),
    /// No answer and no other attempt: the deadline passed.
    Final(ProxyError),
}

/// What one attempt's exchange gives: a response head, a failure, or the
/// deadline first.
pub(super) type Exchange = Result<Result<Upstream, SendError>, Elapsed>;

impl HttpProxy {
    /// One attempt over the endpoint's HTTP/2 connection, or over the
    /// HTTP/1.1 client with the client's body streamed (it cannot be kept
    /// for a retry: over 64 KiB, of unknown length, or retries are off),
    /// within the request's deadline. (The HTTP/1.1 client with a body in
    /// memory is awaited in the answering future itself: an `async fn` of
    /// its own would cost ~2 % of the instructions per HTTP/1.1 request;
    /// this one runs boxed, as its futures always were.)
    pub(super) async fn exchange(
        &self,
        leg: Leg,
        headers: &hyper::HeaderMap,
        request: &Prepared,
        endpoint: &EndpointState,
    ) -> Exchange {
        match leg {
            Leg::H2(outgoing) => {
                let (head, body) = outgoing.into_parts();
                let send = self
                    .pool
                    .send_h2(endpoint.addr, Request::from_parts(head, ()), body);
                tokio::time::timeout_at(request.deadline, send)
                    .await
                    .map(|r| r.map(Upstream::H2))
            }
            Leg::H1(body) => {
                let (exact, empty) = body.as_ref().map_or((Some(0), true), |b| {
                    (b.size_hint().exact(), b.is_end_stream())
                });
                let head = request.streamed_head(headers, exact, empty);
                let body = OutgoingBody::Streaming(body);
                let send = self
                    .pool
                    .send_stream(endpoint.addr, &endpoint.authority, &head, body);
                tokio::time::timeout_at(request.deadline, send)
                    .await
                    .map(|r| r.map(|(head, body)| Upstream::Inline(head, body)))
            }
        }
    }

    /// What an exchange's result means for the request.
    pub(super) fn sent(
        &self,
        result: Exchange,
        request: &Prepared,
        endpoint: &EndpointState,
    ) -> Sent {
        match result {
            Err(_) => {
                if request.version == Version::HTTP_2 {
                    // Maybe a dead connection that no FIN or RST told of:
                    // the next request gets a new one.
                    self.pool.retire_h2(endpoint.addr);
                }
                Sent::Final(ProxyError::Timeout(request.timeout))
            }
            Ok(Ok(response)) => Sent::Answer(response),
            Ok(Err(e)) => Sent::Failed(classify(e)),
        }
    }

    /// The request for the HTTP/2 leg: the last attempt takes the headers,
    /// earlier ones a copy.
    pub(super) fn outgoing_request(
        &self,
        body: &mut RequestBody,
        request: &Prepared,
        endpoint: &EndpointState,
        headers: &mut hyper::HeaderMap,
        can_retry: bool,
    ) -> Result<Request<OutgoingBody>, ProxyError> {
        let (version, method) = (request.version, &request.method);
        let outgoing_body = match body {
            RequestBody::Replayable(bytes, trailers) => {
                OutgoingBody::Full(Some(bytes.clone()), trailers.clone())
            }
            RequestBody::Streaming(b) => OutgoingBody::Streaming(b.take()),
        };
        let uri = target_uri(endpoint, &request.path)
            .map_err(|_| ProxyError::BadRequest("the request target is not a valid URI"))?;
        let mut outgoing = Request::new(outgoing_body);
        *outgoing.method_mut() = method.clone();
        *outgoing.uri_mut() = uri;
        *outgoing.version_mut() = version;
        *outgoing.headers_mut() = if can_retry {
            headers.clone()
        } else {
            std::mem::take(headers)
        };
        Ok(outgoing)
    }
}

/// What one boxed attempt sends: an HTTP/2 request, or an HTTP/1.1 one
/// whose body streams. (Not boxed: it is moved once, into the boxed
/// attempt's future.)
#[allow(clippy::large_enum_variant)]
pub(super) enum Leg {
    H2(Request<OutgoingBody>),
    H1(Option<ClientBody>),
}

/// An upstream's answer: from the HTTP/1.1 client or the HTTP/2 leg.
pub(super) enum Upstream {
    Inline(h1::Head, h1::Body),
    H2(Response<crate::upstream::h2c::Body>),
}

impl Upstream {
    pub fn status(&self) -> StatusCode {
        match self {
            Upstream::Inline(head, _) => head.status,
            Upstream::H2(r) => r.status(),
        }
    }

    pub fn headers(&self) -> &hyper::HeaderMap {
        match self {
            Upstream::Inline(head, _) => &head.headers,
            Upstream::H2(r) => r.headers(),
        }
    }
}

/// The HTTP/1.1 client builds an attempt's result in place.
impl h1::Outcome<ConnectError> for Result<Upstream, SendError> {
    fn answered(head: h1::Head, body: h1::Body) -> Self {
        Ok(Upstream::Inline(head, body))
    }

    fn failed(error: h1::SendError<ConnectError>) -> Self {
        Err(SendError::from(error))
    }
}

/// Turns a pool error into what went wrong.
pub(super) fn classify(error: SendError) -> ProxyError {
    match error {
        SendError::Connect(ConnectError::Timeout(addr, d)) => {
            ProxyError::ConnectTimeout(addr.to_string(), d)
        }
        SendError::Connect(ConnectError::Limit) => ProxyError::CircuitOpen("max_connections"),
        SendError::Connect(other) => ProxyError::ConnectFailure(other.to_string()),
        SendError::Handshake(..) => ProxyError::ConnectFailure(error.to_string()),
        // The client's body broke off: its failure, not the endpoint's.
        SendError::H1(h1::Error::BodyBroke) => ProxyError::BadRequest("the request body broke off"),
        SendError::H1(e) => ProxyError::Reset(e.to_string()),
        // Refused: the upstream did not process the stream (RFC 9113 §8.7),
        // as safe to send elsewhere as a failed connect.
        SendError::H2(e) if e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
            ProxyError::ConnectFailure(format!("the upstream refused the stream: {e}"))
        }
        // Reset by the sidecar itself: the client's request body broke off.
        SendError::H2(e) if e.is_reset() && !e.is_remote() && !e.is_library() => {
            ProxyError::BadRequest("the request body broke off")
        }
        SendError::H2(e) => ProxyError::Reset(e.to_string()),
    }
}

/// The request target sent over HTTP/2: the absolute URI (scheme and
/// `:authority`).
fn target_uri(
    endpoint: &EndpointState,
    path: &hyper::http::uri::PathAndQuery,
) -> Result<Uri, hyper::http::Error> {
    let mut target = hyper::http::uri::Parts::default();
    target.scheme = Some(hyper::http::uri::Scheme::HTTP);
    target.authority = Some(endpoint.authority.clone());
    target.path_and_query = Some(path.clone());
    Ok(Uri::from_parts(target)?)
}
