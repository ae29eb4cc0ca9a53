//! The bodies of the HTTP proxy: what it sends upstream (a buffered,
//! replayable body or the client's, streamed) and what it answers with
//! (the upstream's body holding the request's counters until the last
//! byte; its own; or none). Enums rather than boxed bodies, so a request
//! allocates none of them.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::http::idle::Busy;
use crate::upstream::cluster::OwnedGauge;
use crate::upstream::endpoint::InFlight;
use crate::upstream::{BoxError, ProxyBody};
use crate::upstream::{h1, h2c};

/// A client's request body: from the HTTP/1.1 server (hyper's) or the
/// HTTP/2 one (the `h2` crate's).
pub enum ClientBody {
    H1(Incoming),
    H2(h2c::Body),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::H1(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            ClientBody::H2(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::H1(body) => body.is_end_stream(),
            ClientBody::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::H1(body) => body.size_hint(),
            ClientBody::H2(body) => body.size_hint(),
        }
    }
}

/// The request body sent upstream: a buffered one (sent again on a retry)
/// or the client's, streamed once (none: it was taken by an earlier
/// attempt, or there is none).
pub enum OutgoingBody {
    /// The data, then the trailers if any.
    Full(Option<Bytes>, Option<HeaderMap>),
    Streaming(Option<ClientBody>),
}

impl Body for OutgoingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            OutgoingBody::Full(bytes, trailers) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            OutgoingBody::Streaming(Some(body)) => Pin::new(body).poll_frame(cx),
            OutgoingBody::Streaming(None) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutgoingBody::Full(bytes, trailers) => {
                bytes.as_ref().is_none_or(Bytes::is_empty) && trailers.is_none()
            }
            OutgoingBody::Streaming(body) => body.as_ref().is_none_or(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutgoingBody::Full(bytes, _) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            OutgoingBody::Streaming(Some(body)) => body.size_hint(),
            OutgoingBody::Streaming(None) => SizeHint::with_exact(0),
        }
    }
}

/// Every body the proxy answers with: the upstream's (streamed, holding
/// the request's counters), its own, or none (a spliced upgrade). An enum
/// rather than a boxed body: no allocation per response.
pub enum ResponseBody {
    /// From the HTTP/1.1 client, holding the request's guards.
    Inline(h1::Body, Guards),
    /// From the HTTP/2 leg, holding the request's guards.
    H2(h2c::Body, Guards),
    Own(ProxyBody),
    Empty,
}

impl ResponseBody {
    /// The inline leg's body, holding `guards` until it is dropped.
    pub fn inline(body: h1::Body, guards: Guards) -> Self {
        ResponseBody::Inline(body, guards)
    }

    /// The HTTP/2 leg's body, holding `guards` until it is dropped.
    pub fn h2(body: h2c::Body, guards: Guards) -> Self {
        ResponseBody::H2(body, guards)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Inline(body, _) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            ResponseBody::H2(body, _) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            ResponseBody::Own(body) => Pin::new(body).poll_frame(cx),
            ResponseBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Inline(body, _) => body.is_end_stream(),
            ResponseBody::H2(body, _) => body.is_end_stream(),
            ResponseBody::Own(body) => body.is_end_stream(),
            ResponseBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Inline(body, _) => body.size_hint(),
            ResponseBody::H2(body, _) => body.size_hint(),
            ResponseBody::Own(body) => body.size_hint(),
            ResponseBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// What a response holds until its last byte has gone: the cluster's
/// active-request slot, the endpoint's in-flight count, and the client
/// connection's busy mark.
pub struct Guards {
    _active: OwnedGauge,
    _in_flight: InFlight,
    _connection: Busy,
}

impl Guards {
    pub fn new(active: OwnedGauge, in_flight: InFlight, connection: Busy) -> Self {
        Guards {
            _active: active,
            _in_flight: in_flight,
            _connection: connection,
        }
    }
}
