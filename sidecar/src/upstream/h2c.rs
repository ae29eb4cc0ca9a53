//! The HTTP/2 upstream leg (cleartext, prior knowledge) on the `h2` crate
//! directly rather than through hyper's client.
//!
//! hyper's HTTP/2 client hands every request to the connection's task over
//! a channel, spawns a task per request to await the response and sends it
//! back over a oneshot: two hand-offs, a task and its allocation per
//! request, on top of the protocol work. Here the request's own task opens
//! the stream and awaits the response head on it; the connection's task
//! only reads and writes frames. A request body that cannot go out at once
//! (a streamed one, or one waiting for flow-control window) is piped by a
//! task of its own, as hyper does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::{Request, Response};
use tracing::Instrument;

use crate::http::headers::content_length;
use crate::tls::expiry::LeafStamp;
use crate::upstream::BoxError;
use crate::upstream::dial::Counted;

/// Stream window per request and connection window (hyper's defaults, so
/// a large body is not held up by a small window).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// Bytes a stream may have buffered for sending before `send_data` waits.
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// The largest response head accepted from an upstream: as large as the
/// request heads the listeners accept.
const MAX_HEADER_LIST: u32 = crate::upstream::MAX_HEADER_BYTES as u32;
/// Streams opened before the upstream's SETTINGS say how many it allows.
const INITIAL_MAX_STREAMS: usize = 100;

/// One HTTP/2 connection to an endpoint, shared by every request to it.
#[derive(Clone)]
pub struct Conn {
    sender: SendRequest<Bytes>,
    /// Set once the connection's task has ended (closed, failed, or gone
    /// away): no new stream can open on it.
    closed: Arc<AtomicBool>,
    /// Mesh TLS: the leaf it was made with; the pool stops sharing it
    /// once that leaf is renewed (`None`: plain).
    leaf: Option<LeafStamp>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// The HTTP/2 handshake on a new connection (the client preface and
    /// SETTINGS); the connection's frames are then read and written by a
    /// task of its own until it closes.
    pub async fn handshake(io: Counted, span: tracing::Span) -> Result<Conn, h2::Error> {
        let leaf = io.leaf();
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .initial_max_send_streams(INITIAL_MAX_STREAMS)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = Arc::clone(&closed);
        // The connection ends by itself once every handle and stream on it
        // is gone (the pool drops its handle when the connection idles out,
        // or when a request on it timed out: see `Pool::retire_h2`). No
        // keep-alive PINGs: gRPC servers (grpc-go, grpc-java) answer PINGs
        // more often than every 5 minutes, or on a connection without
        // streams, with GOAWAY `too_many_pings`.
        tokio::spawn(
            async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
                ended.store(true, Ordering::Release);
            }
            .instrument(span),
        );
        Ok(Conn {
            sender,
            closed,
            leaf,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The leaf a mesh connection was made with (`None`: plain).
    pub fn leaf(&self) -> Option<LeafStamp> {
        self.leaf
    }

    /// The same connection (not another one to the same endpoint).
    pub fn same(&self, other: &Conn) -> bool {
        Arc::ptr_eq(&self.closed, &other.closed)
    }

    /// A handle to open a stream with; an error when the connection can
    /// take none (closed or going away: nothing was sent). Streams beyond
    /// the upstream's `MAX_CONCURRENT_STREAMS` wait inside h2 until others
    /// end (bounded by the cluster's `max_requests` and the request timeout).
    pub async fn ready(&self) -> Result<Ready, h2::Error> {
        let sender = self.sender.clone().ready().await?;
        Ok(Ready { sender })
    }
}

/// A connection handle ready to open a stream.
pub struct Ready {
    sender: SendRequest<Bytes>,
}

impl Ready {
    /// Opens a stream for `head` and sends `body` on it; the response head.
    /// `head`'s URI carries the scheme and authority (`:scheme`,
    /// `:authority`); its headers must hold no connection-specific field
    /// (RFC 9113 §8.2.2).
    pub async fn send<B>(mut self, head: Request<()>, body: B) -> Result<Response<Body>, h2::Error>
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let end = body.is_end_stream();
        let (response, stream) = self.sender.send_request(head, end)?;
        drop(self);
        let mut abandon = None;
        if !end {
            let mut pipe = Pipe::new(body, stream, Reason::CANCEL);
            // Most bodies (a buffered one within the window) go out at once;
            // only one that must wait gets a task. Polled here without a
            // waker: the task's first poll registers its own, and no await
            // keeps the pipe in this future.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if Pin::new(&mut pipe).poll(&mut cx).is_pending() {
                // The task stops (and resets the stream) once nobody waits
                // for this exchange: this future dropped before the answer
                // (timed out, the client gone), or the answer's body.
                let (guard, watch) = Abandon::new();
                pipe.abandon = Some(watch);
                abandon = Some(guard);
                tokio::spawn(pipe.in_current_span());
            }
        }
        let response = response.await?;
        let (parts, recv) = response.into_parts();
        let length = content_length(&parts.headers);
        let mut body = Body::new(recv, length);
        body.abandon = abandon;
        if body.recv.is_end_stream() {
            // A head-only answer is complete as it comes.
            body.complete();
        }
        Ok(Response::from_parts(parts, body))
    }
}

/// Held by whoever waits for an exchange whose request body a task pipes
/// upstream; dropped, it stops that task ([`Pipe`] resets the stream with
/// CANCEL and lets go of the client's body) rather than letting it stream
/// the rest of a body nobody will get an answer for. Disarmed once the
/// answer has been read to its end: an upstream may answer before it has
/// read the whole request, and then still reads the rest (RFC 9113 §8.1;
/// one that wants no more resets the stream with NO_ERROR, which ends the
/// pipe by itself).
struct Abandon(Option<Arc<Abandoned>>);

#[derive(Default)]
struct Abandoned {
    done: AtomicBool,
    task: AtomicWaker,
}

impl Abandon {
    /// The guard, and what the pipe watches.
    fn new() -> (Abandon, Arc<Abandoned>) {
        let shared = Arc::new(Abandoned::default());
        (Abandon(Some(Arc::clone(&shared))), shared)
    }

    /// The answer is complete: the pipe goes on by itself.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.done.store(true, Ordering::Release);
            shared.task.wake();
        }
    }
}

/// Sends a body on its stream (a request's upstream, a response's
/// downstream): data as the peer's window allows, then trailers or the end
/// of the stream. A stream the peer resets ends the pipe; a body that
/// fails resets the stream with `on_error`; so does an abandoned exchange
/// (see [`Abandon`]), with CANCEL.
pub struct Pipe<B> {
    body: B,
    stream: SendStream<Bytes>,
    /// A chunk read from the body, waiting for window.
    held: Option<(Bytes, bool)>,
    on_error: Reason,
    abandon: Option<Arc<Abandoned>>,
}

impl<B> Pipe<B> {
    pub fn new(body: B, stream: SendStream<Bytes>, on_error: Reason) -> Self {
        Pipe {
            body,
            stream,
            held: None,
            on_error,
            abandon: None,
        }
    }
}

impl<B> Future for Pipe<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let me = &mut *self;
        if let Some(abandon) = &me.abandon {
            abandon.task.register(cx.waker());
            if abandon.done.load(Ordering::Acquire) {
                tracing::debug!("nobody waits for the exchange any more; cancelling its stream");
                me.stream.send_reset(Reason::CANCEL);
                return Poll::Ready(());
            }
        }
        loop {
            // Woken should the upstream reset the stream meanwhile.
            if let Poll::Ready(reset) = me.stream.poll_reset(cx) {
                tracing::debug!(reason = ?reset.ok(), "upstream reset the request stream");
                return Poll::Ready(());
            }
            if let Some((chunk, end)) = me.held.take() {
                if me.stream.capacity() == 0 {
                    match me.stream.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                        Poll::Pending => {
                            me.held = Some((chunk, end));
                            return Poll::Pending;
                        }
                    }
                    if me.stream.capacity() == 0 {
                        me.held = Some((chunk, end));
                        continue;
                    }
                }
                if me.stream.send_data(chunk, end).is_err() || end {
                    return Poll::Ready(());
                }
                continue;
            }
            match ready!(Pin::new(&mut me.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let end = me.body.is_end_stream();
                        if chunk.is_empty() {
                            if me.stream.send_data(chunk, end).is_err() || end {
                                return Poll::Ready(());
                            }
                            continue;
                        }
                        // A minimal claim on the window: h2 raises it to
                        // what is buffered once the chunk is sent (claiming
                        // the whole chunk up front would pin window that
                        // other streams could use).
                        me.stream.reserve_capacity(1);
                        me.held = Some((chunk, end));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            me.stream.reserve_capacity(0);
                            let _ = me.stream.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    tracing::debug!(error = %e, "the body broke off");
                    // An HTTP/2 reset behind the failure (the upstream's
                    // CANCEL, REFUSED_STREAM, …) is passed on as it was.
                    let reason = reset_reason(&*e).unwrap_or(me.on_error);
                    me.stream.send_reset(reason);
                    return Poll::Ready(());
                }
                None => {
                    let _ = me.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// The reason of the HTTP/2 reset somewhere in `error`'s chain of causes.
pub fn reset_reason(error: &(dyn std::error::Error + 'static)) -> Option<Reason> {
    let mut cause = Some(error);
    for _ in 0..8 {
        let e = cause?;
        if let Some(reason) = e.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return Some(reason);
        }
        cause = e.source();
    }
    None
}

/// The body of a received HTTP/2 message (an upstream's response, a
/// client's request): data frames (each one's window given back as it is
/// read), then trailers.
pub struct Body {
    recv: RecvStream,
    /// What `content-length` says is left to read, if the response gave
    /// one (h2 checks the data against it).
    remaining: Option<u64>,
    data_done: bool,
    /// A response's: stops the task still piping its request's body once
    /// this body is dropped.
    abandon: Option<Abandon>,
}

impl Body {
    /// `length`: the message's `content-length`, if any.
    pub fn new(recv: RecvStream, length: Option<u64>) -> Self {
        Body {
            recv,
            remaining: length,
            data_done: false,
            abandon: None,
        }
    }

    /// Read to its end: a request body still being piped goes on.
    fn complete(&mut self) {
        if let Some(abandon) = &mut self.abandon {
            abandon.disarm();
        }
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let me = &mut *self;
        if !me.data_done {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Only fails once the stream is gone: nothing to give back then.
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    if let Some(left) = &mut me.remaining {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    // The last frame: whoever reads this may stop here.
                    if me.recv.is_end_stream() {
                        me.complete();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => me.data_done = true,
            }
        }
        let frame = match ready!(me.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => return Poll::Ready(Some(Err(e))),
        };
        me.complete();
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}
