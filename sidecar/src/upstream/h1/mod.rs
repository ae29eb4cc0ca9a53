//! The HTTP/1.1 upstream client, driven by the request that uses it: no
//! connection task, no channels, one pool ([`IdleConns`]) per upstream.
//! A request whose body is already in memory (empty, or buffered for
//! retries) is encoded straight from the client's header map into the
//! connection's write buffer, written in one go, and its response head
//! parsed from the connection's read buffer; the response body ([`Body`])
//! then reads the upstream socket itself from the client connection's
//! task, and puts the connection back in the pool the moment its last byte
//! is read.
//!
//! A request whose body streams ([`IdleConns::send_stream`]) has its head
//! written the same way; then a task pumps the body into the socket's
//! write half (see [`stream`]) while the response is read here, so an
//! upstream may answer before the upload ends. The halves are joined again
//! and the connection pooled when both directions ended cleanly. An
//! upgrade (101) or a CONNECT answered 2xx ends the exchange with the
//! connection handed over whole ([`Body::into_tunnel`]) for splicing.
//!
//! Responses are framed per RFC 9112 §6.3: no body after HEAD or for
//! 1xx/204/304; `Transfer-Encoding: chunked` (then any Content-Length is
//! ignored and the connection is not reused); one Content-Length value
//! (repeated values must agree); else the body runs to the connection's
//! close. Anything else — another transfer coding, a bad length, a bad
//! chunk, a head over 64 KiB or with over 100 fields, bytes after the
//! end — is an error, and the connection is closed rather than reused.
//!
//! A mesh connection made with a leaf that has since been renewed (or is
//! about to expire) is retired: no longer handed out, closed when put
//! back or swept (see [`crate::tls::expiry`]).

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::Method;
use hyper::body::{Frame, SizeHint};
use hyper::header::{self, HeaderMap};
use hyper::http::uri::Authority;
use tokio::io::AsyncWriteExt;

use crate::tls::MeshTls;
use crate::tls::expiry::LeafStamp;
use crate::upstream::dial::{AddrMap, Counted, spawn_sweeper};
use crate::upstream::{BoxError, MAX_HEADER_BYTES};

pub mod parse;
pub mod stream;

pub use parse::Head;
use parse::{Asked, Framing, Step, chunk_step, parse_head};
use stream::Split;

/// Reads ask for at least this much room.
const READ_CHUNK: usize = 8 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the request failed: {0}")]
    Write(#[source] io::Error),
    #[error("reading the response failed: {0}")]
    Read(#[source] io::Error),
    #[error("the connection closed before the response was complete")]
    Closed,
    #[error("invalid response from the upstream: {0}")]
    Protocol(&'static str),
    /// The client's request body broke off or was malformed (the
    /// client's failure, not the upstream's).
    #[error("the request body broke off")]
    BodyBroke,
}

/// A parse error as an exchange's error.
fn proto(e: parse::Error) -> Error {
    Error::Protocol(e.0)
}

impl Error {
    /// An I/O failure or EOF (not a bad response).
    fn broken(&self) -> bool {
        !matches!(self, Error::Protocol(_) | Error::BodyBroke)
    }
}

/// An upstream connection with its buffers; counted in the cluster's open
/// connections while it lives.
pub struct Conn {
    io: Io,
    /// Bytes read and not yet consumed.
    rbuf: BytesMut,
    /// The request being written.
    wbuf: Vec<u8>,
    /// Bytes came back during the current exchange.
    answered: bool,
    /// Mesh TLS: the leaf it was made with (kept here, beside the socket,
    /// so checking it costs no look into a split connection).
    leaf: Option<LeafStamp>,
}

impl Conn {
    pub fn new(io: Counted) -> Self {
        Conn {
            leaf: io.leaf(),
            io: Io::Whole(io),
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            answered: false,
        }
    }

    /// Reads what the socket has into the read buffer; 0 at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        match &mut self.io {
            Io::Whole(io) => {
                tokio_util::io::poll_read_buf(Pin::new(io.stream()), cx, &mut self.rbuf)
            }
            Io::Split(split) => split.poll_read_buf(cx, &mut self.rbuf),
        }
    }

    /// Reads until the buffer holds a complete response head, skipping
    /// interim ones.
    #[inline]
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        asked: Asked,
    ) -> Poll<Result<(Head, Framing, bool), Error>> {
        loop {
            // Nothing read yet (the usual first poll, and its wake-up):
            // nothing to parse.
            if !self.rbuf.is_empty()
                && let Some(parsed) = parse_head(&mut self.rbuf, asked).map_err(proto)?
            {
                return Poll::Ready(Ok(parsed));
            }
            if self.rbuf.len() > MAX_HEADER_BYTES {
                return Poll::Ready(Err(Error::Protocol("response head over 64 KiB")));
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => return Poll::Ready(Err(Error::Closed)),
                Ok(_) => self.answered = true,
                Err(e) => return Poll::Ready(Err(Error::Read(e))),
            }
        }
    }

    /// [`Conn::poll_fill`] for a body: more bytes, or why there are none.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        match ready!(self.poll_fill(cx)) {
            Ok(0) => Poll::Ready(Err(Error::Closed)),
            Ok(_) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(Error::Read(e))),
        }
    }

    /// Still usable after sitting idle: nothing arrived since (see
    /// [`crate::tls::stream::Stream::alive`]).
    fn alive(&mut self) -> bool {
        let Io::Whole(io) = &mut self.io else {
            return false;
        };
        if !self.rbuf.is_empty() {
            return false;
        }
        io.stream().alive()
    }
}

impl Conn {
    /// The connection whole again, if its request body has gone out
    /// (`None`: it still streams or failed, and closes after).
    #[cold]
    #[inline(never)]
    fn rejoin(self) -> Option<Conn> {
        let (io, buffers) = self.into_parts();
        let io = match io {
            Io::Whole(io) => io,
            Io::Split(split) => match split.rejoin() {
                Ok(io) => io,
                Err(Some(mut split)) => {
                    split.detach();
                    return None;
                }
                Err(None) => return None,
            },
        };
        Some(Conn::from_parts(Io::Whole(io), buffers))
    }

    /// Starts pumping `body` into the connection (see [`stream`]).
    fn start_pump<B>(self, body: B, length: Length) -> Conn
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let (io, buffers) = self.into_parts();
        let io = match io {
            Io::Whole(io) => Io::Split(stream::start(io, body, length)),
            split @ Io::Split(_) => split,
        };
        Conn::from_parts(io, buffers)
    }

    /// The socket apart from the buffers, to change one and keep the other.
    fn into_parts(self) -> (Io, Buffers) {
        let Conn {
            io,
            rbuf,
            wbuf,
            answered,
            leaf,
        } = self;
        (io, (rbuf, wbuf, answered, leaf))
    }

    fn from_parts(io: Io, (rbuf, wbuf, answered, leaf): Buffers) -> Conn {
        Conn {
            io,
            rbuf,
            wbuf,
            answered,
            leaf,
        }
    }
}

/// What [`Conn::into_parts`] keeps beside the socket.
type Buffers = (BytesMut, Vec<u8>, bool, Option<LeafStamp>);

/// A connection's socket: whole, or split while a task still pumps a
/// streamed request body into its write half.
enum Io {
    Whole(Counted),
    Split(Split),
}

/// How a request body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// No body, and no field saying so.
    None,
    /// `Content-Length` (kept even when 0, as the client sent it).
    Exact(u64),
    /// `Transfer-Encoding: chunked` (a streamed body of unknown length).
    Chunked,
}

/// What a request sends: borrowed from the request being answered, so a
/// retry encodes it again without a copy being kept.
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// Origin form (`/path?query`), or authority form for CONNECT.
    pub target: &'a str,
    pub headers: &'a HeaderMap,
    /// The body when it is in memory (empty when it streams).
    pub body: &'a Bytes,
    pub length: Length,
    /// The client asked to switch protocols (`Connection: upgrade`).
    pub upgrade: bool,
}

impl RequestHead<'_> {
    /// The request in HTTP/1.1 wire form; `authority` names the endpoint
    /// when the client sent no Host (HTTP/1.0). Header values cannot hold
    /// CR or LF (`HeaderValue` refuses them), so nothing can be injected.
    fn encode(&self, out: &mut Vec<u8>, authority: &Authority) {
        out.clear();
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in self.headers {
            // Framing is the proxy's own (the body is sent whole).
            if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
                continue;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !self.headers.contains_key(header::HOST) {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(authority.as_str().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        match self.length {
            Length::None => {}
            Length::Exact(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa(n, &mut [0u8; 20]));
                out.extend_from_slice(b"\r\n");
            }
            Length::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(self.body);
    }

    /// What the response may be, given what was asked.
    fn asked(&self) -> Asked {
        Asked {
            head: self.method == Method::HEAD,
            upgrade: self.upgrade,
            connect: self.method == Method::CONNECT,
        }
    }
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Sends `req` on `conn` and reads the response head; the body is left
/// in `conn` for a [`Body`] to read. 1xx interim responses are skipped.
async fn exchange(
    conn: &mut Conn,
    req: &RequestHead<'_>,
    authority: &Authority,
) -> Result<(Head, Framing, bool), Error> {
    conn.answered = false;
    req.encode(&mut conn.wbuf, authority);
    let Io::Whole(io) = &mut conn.io else {
        return Err(Error::Protocol("the connection is still sending a request"));
    };
    io.stream()
        .write_all(&conn.wbuf)
        .await
        .map_err(Error::Write)?;
    let asked = req.asked();
    poll_fn(|cx| conn.poll_head(cx, asked)).await
}

/// A response body read from the upstream connection as the client
/// takes it; the connection goes back to the pool once the body is
/// complete, or closes if it cannot be reused.
pub struct Body {
    conn: Option<Conn>,
    framing: Framing,
    reusable: bool,
    addr: SocketAddr,
    pool: Weak<IdleConns>,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("addr", &self.addr)
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

impl Body {
    /// The end of the body: the connection is reused when the exchange
    /// left it clean (a request body still streaming is left to finish,
    /// and the connection closes after it).
    fn finish(&mut self) {
        self.framing = Framing::Done;
        let Some(conn) = self.conn.take() else {
            return;
        };
        if let Io::Split(_) = conn.io {
            if let Some(whole) = conn.rejoin() {
                self.keep(whole);
            }
            return;
        }
        self.keep(conn);
    }

    /// Puts `conn` back in the pool if the exchange left it clean.
    #[inline(always)]
    fn keep(&self, conn: Conn) {
        if self.reusable
            && conn.rbuf.is_empty()
            && let Some(pool) = self.pool.upgrade()
        {
            pool.put(self.addr, conn);
        }
    }

    /// The answer switched protocols (101) or opened a CONNECT tunnel.
    pub fn is_tunnel(&self) -> bool {
        self.framing == Framing::Tunnel
    }

    /// A tunnel's connection, for the splice: the socket once any request
    /// body has gone out, and the bytes that came after the head.
    pub async fn into_tunnel(mut self) -> Option<(Counted, BytesMut)> {
        if self.framing != Framing::Tunnel {
            return None;
        }
        let Conn { io, rbuf, .. } = self.conn.take()?;
        let io = match io {
            Io::Whole(io) => io,
            Io::Split(split) => split.finished().await?,
        };
        Some((io, rbuf))
    }

    fn fail(&mut self, error: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.framing = Framing::Done;
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.framing {
                Framing::Done => {
                    this.finish();
                    return Poll::Ready(None);
                }
                // Not a body: the connection is the splice's (see
                // `into_tunnel`); read as one, it ends here.
                Framing::Tunnel => {
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if conn.rbuf.is_empty()
                        && let Err(e) = ready!(conn.poll_more(cx))
                    {
                        return this.fail(e);
                    }
                    let n = (conn.rbuf.len() as u64).min(left) as usize;
                    let data = conn.rbuf.split_to(n).freeze();
                    this.framing = Framing::Length(left - n as u64);
                    if left == n as u64 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close => {
                    if conn.rbuf.is_empty() {
                        match ready!(conn.poll_more(cx)) {
                            Ok(()) => {}
                            // The close is the end of this body.
                            Err(Error::Closed) => {
                                this.reusable = false;
                                this.finish();
                                return Poll::Ready(None);
                            }
                            Err(e) => return this.fail(e),
                        }
                    }
                    let data = conn.rbuf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) => match chunk_step(&mut conn.rbuf, state).map_err(proto) {
                    Ok(Step::Next(next)) => this.framing = Framing::Chunked(next),
                    Ok(Step::Data(data, next)) => {
                        this.framing = Framing::Chunked(next);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Step::End(trailers)) => {
                        this.finish();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Ok(Step::More) => {
                        if let Err(e) = ready!(conn.poll_more(cx)) {
                            return this.fail(e);
                        }
                    }
                    Err(e) => return this.fail(e),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Tunnel)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done | Framing::Tunnel => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// Idle inline connections of one listener's cluster, by endpoint.
pub struct IdleConns {
    /// Lock rule: held only to take or put a connection.
    conns: Mutex<Idle>,
    /// Sweeps happen this often while connections are kept...
    sweep_every: Duration,
    /// ...and a connection put back this many sweeps ago has idled out.
    /// Ages are counted in sweeps so taking and putting back a connection
    /// read no clock.
    max_age: u64,
    upstream: String,
    /// The mesh identity, for which leaf pooled mesh connections must
    /// have been made with (`None`: no mesh, nothing retired).
    mesh: Option<MeshTls>,
}

struct Idle {
    /// Connections with the sweep count when they were put back.
    by_endpoint: AddrMap<Vec<(Conn, u64)>>,
    sweeps: u64,
    sweeping: bool,
}

impl IdleConns {
    pub fn new(idle_timeout: Duration, upstream: String, mesh: Option<MeshTls>) -> Arc<Self> {
        let sweep_every = (idle_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        Arc::new(IdleConns {
            conns: Mutex::new(Idle {
                by_endpoint: AddrMap::default(),
                sweeps: 0,
                sweeping: false,
            }),
            sweep_every,
            max_age: idle_timeout
                .as_nanos()
                .div_ceil(sweep_every.as_nanos().max(1))
                .max(1) as u64,
            upstream,
            mesh,
        })
    }

    /// Whether `conn` may take a request: plain, or made with the leaf in
    /// use (one atomic load). A connection that may not is counted here,
    /// once: the caller drops it.
    #[inline]
    fn current(&self, conn: &Conn) -> bool {
        let (Some(leaf), Some(mesh)) = (conn.leaf, &self.mesh) else {
            return true;
        };
        let usable = mesh.usable(leaf);
        if !usable {
            mesh.count_retired();
        }
        usable
    }

    /// The most recently used live connection to `addr`; stale ones met
    /// on the way are closed.
    #[inline]
    fn take(&self, addr: SocketAddr) -> Option<Conn> {
        let mut idle = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let now = idle.sweeps;
        let list = idle.by_endpoint.get_mut(&addr)?;
        while let Some((mut conn, since)) = list.pop() {
            if now - since < self.max_age && self.current(&conn) && conn.alive() {
                return Some(conn);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, addr: SocketAddr, conn: Conn) {
        // Made with a leaf renewed meanwhile: its last request is done,
        // and it closes here.
        if !self.current(&conn) {
            return;
        }
        let mut idle = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let now = idle.sweeps;
        idle.by_endpoint.entry(addr).or_default().push((conn, now));
        if !idle.sweeping {
            idle.sweeping = spawn_sweeper(
                Arc::downgrade(self),
                self.sweep_every,
                &self.upstream,
                Self::sweep,
            );
        }
    }

    /// Every quarter idle timeout (1 s to 60 s) while connections are
    /// kept: closes those idle past the timeout, closed by the upstream or
    /// made with a renewed leaf; false once none is left.
    fn sweep(&self) -> bool {
        let mut idle = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        idle.sweeps += 1;
        let (now, limit) = (idle.sweeps, self.max_age);
        idle.by_endpoint.retain(|_, list| {
            list.retain_mut(|(conn, since)| {
                now - *since < limit && self.current(conn) && conn.alive()
            });
            !list.is_empty()
        });
        idle.sweeping = !idle.by_endpoint.is_empty();
        idle.sweeping
    }

    /// Sends `req` to `addr` on an idle connection or one from `connect`,
    /// and returns the response head and body. A reused connection that
    /// the upstream had closed meanwhile (nothing came back, or the write
    /// failed) is dropped and the request sent again on another, when
    /// that is safe: the request is idempotent or was never written.
    pub async fn send<O, F, Fut, E>(
        self: &Arc<Self>,
        addr: SocketAddr,
        authority: &Authority,
        req: &RequestHead<'_>,
        idempotent: bool,
        connect: F,
    ) -> O
    where
        O: Outcome<E>,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Conn, E>>,
    {
        loop {
            let (mut conn, reused) = match self.take(addr) {
                Some(conn) => (conn, true),
                // Boxed: connecting is rare, and its future would make
                // every request's future that much larger.
                None => match Box::pin(connect()).await {
                    Ok(conn) => (conn, false),
                    Err(e) => return O::failed(SendError::Connect(e)),
                },
            };
            match exchange(&mut conn, req, authority).await {
                Ok((head, framing, reusable)) => {
                    return O::answered(head, self.body(addr, conn, framing, reusable));
                }
                Err(e)
                    if reused
                        && e.broken()
                        && !conn.answered
                        && (idempotent || matches!(e, Error::Write(_))) =>
                {
                    tracing::debug!(endpoint = %addr, error = %e, "pooled connection was closed; sending on another");
                }
                Err(e) => return O::failed(SendError::Exchange(e)),
            }
        }
    }
}

/// What the caller of [`IdleConns::send`] builds from an exchange, in
/// place: its own type for the answer (head and body) or the failure.
/// (Returning `(Head, Body)` for the caller to wrap would copy the
/// ~300-byte answer once more per layer, on every request.)
pub trait Outcome<E> {
    fn answered(head: Head, body: Body) -> Self;
    fn failed(error: SendError<E>) -> Self;
}

impl<E> Outcome<E> for Result<(Head, Body), SendError<E>> {
    fn answered(head: Head, body: Body) -> Self {
        Ok((head, body))
    }

    fn failed(error: SendError<E>) -> Self {
        Err(error)
    }
}

impl IdleConns {
    /// Sends `req`, whose body streams from `body`, to `addr` on an idle
    /// connection or one from `connect`, and returns the response head and
    /// body (see [`stream`]). Once the head is written the request cannot
    /// be sent again (its body is being taken); before that, a reused
    /// connection that fails the write is dropped for another.
    pub async fn send_stream<B, F, Fut, E>(
        self: &Arc<Self>,
        addr: SocketAddr,
        authority: &Authority,
        req: &RequestHead<'_>,
        body: B,
        connect: F,
    ) -> Result<(Head, Body), SendError<E>>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Conn, E>>,
    {
        let mut conn = loop {
            let (mut conn, reused) = match self.take(addr) {
                Some(conn) => (conn, true),
                None => (connect().await.map_err(SendError::Connect)?, false),
            };
            conn.answered = false;
            req.encode(&mut conn.wbuf, authority);
            let Io::Whole(io) = &mut conn.io else {
                return Err(SendError::Exchange(Error::Protocol(
                    "the connection is still sending a request",
                )));
            };
            match io.stream().write_all(&conn.wbuf).await {
                Ok(()) => break conn,
                Err(e) if reused => {
                    tracing::debug!(endpoint = %addr, error = %e, "pooled connection was closed; sending on another");
                }
                Err(e) => return Err(SendError::Exchange(Error::Write(e))),
            }
        };
        let asked = req.asked();
        let head = if req.length == Length::None {
            poll_fn(|cx| conn.poll_head(cx, asked)).await
        } else {
            conn = conn.start_pump(body, req.length);
            let Io::Split(split) = &conn.io else {
                return Err(SendError::Exchange(Error::Protocol(
                    "the body pump did not start",
                )));
            };
            let shared = split.shared();
            let head = tokio::select! {
                biased;
                head = poll_fn(|cx| conn.poll_head(cx, asked)) => head,
                () = stream::client_broke(&shared) => Err(Error::BodyBroke),
            };
            // The upstream may have closed on the cut-short request before
            // the pump's word came: still the client's failure.
            match head {
                Err(e) if e.broken() && stream::client_failed(&shared) => Err(Error::BodyBroke),
                head => head,
            }
        };
        match head {
            Ok((head, framing, reusable)) => Ok((head, self.body(addr, conn, framing, reusable))),
            Err(e) => Err(SendError::Exchange(e)),
        }
    }

    /// The response body over `conn`; already finished (and the
    /// connection pooled) when there is none.
    #[inline]
    fn body(
        self: &Arc<Self>,
        addr: SocketAddr,
        conn: Conn,
        framing: Framing,
        reusable: bool,
    ) -> Body {
        let mut body = Body {
            conn: Some(conn),
            framing,
            reusable,
            addr,
            pool: Arc::downgrade(self),
        };
        if framing == Framing::Done {
            body.finish();
        }
        body
    }
}

/// Why [`IdleConns::send`] got no response head.
#[derive(Debug)]
pub enum SendError<E> {
    /// No connection was made (nothing sent).
    Connect(E),
    Exchange(Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::StatusCode;
    use hyper::header::HeaderValue;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    fn cluster() -> Arc<crate::upstream::cluster::Cluster> {
        let text = "[registry]\naddresses = [\"127.0.0.1:8502\"]\n[service]\nname = \"web\"\nport = 8080\n[[upstreams]]\nname = \"api\"\nlisten = \"127.0.0.1:9191\"\nprotocol = \"http\"\n";
        let mut config = crate::config::Config::parse("t.toml", text).expect("valid");
        crate::upstream::cluster::Cluster::local(
            config.upstreams.remove(0),
            "127.0.0.1:1".parse().expect("addr"),
        )
    }

    /// A server that reads one request head per answer in `answers` and
    /// writes the answer (raw bytes) on the same connection; a new
    /// connection for each element of `connections`. Returns what it read.
    async fn server(
        connections: Vec<Vec<&'static [u8]>>,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            for answers in connections {
                let (mut socket, _) = listener.accept().await.expect("accept");
                let mut pending = Vec::new();
                for answer in answers {
                    loop {
                        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&pending[..end + 4]).into_owned();
                            let body_len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: "))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            if pending.len() >= end + 4 + body_len {
                                pending.drain(..end + 4 + body_len);
                                seen.push(head);
                                break;
                            }
                        }
                        let mut chunk = [0u8; 4096];
                        let n = socket.read(&mut chunk).await.expect("read");
                        assert!(n > 0, "client closed early");
                        pending.extend_from_slice(&chunk[..n]);
                    }
                    socket.write_all(answer).await.expect("write");
                }
                // Linger so the client sees no EOF before it is done.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        });
        (addr, task)
    }

    async fn connector(addr: SocketAddr) -> Result<Conn, crate::upstream::dial::ConnectError> {
        crate::upstream::dial::connect(&cluster(), addr)
            .await
            .map(Conn::new)
    }

    async fn get(
        pool: &Arc<IdleConns>,
        addr: SocketAddr,
        method: Method,
    ) -> Result<(StatusCode, HeaderMap, Bytes, Option<HeaderMap>), String> {
        let headers = HeaderMap::new();
        let body = Bytes::new();
        let req = RequestHead {
            method: &method,
            target: "/x?y=1",
            headers: &headers,
            body: &body,
            length: Length::None,
            upgrade: false,
        };
        let authority = Authority::from_static("up.example:80");
        let sent: Result<(Head, Body), SendError<_>> = pool
            .send(addr, &authority, &req, true, || connector(addr))
            .await;
        let (head, body) = sent.map_err(|e| match e {
            SendError::Connect(e) => e.to_string(),
            SendError::Exchange(e) => e.to_string(),
        })?;
        let collected = body.collect().await.map_err(|e| e.to_string())?;
        let trailers = collected.trailers().cloned();
        Ok((head.status, head.headers, collected.to_bytes(), trailers))
    }

    #[tokio::test]
    async fn bodies_of_every_framing_are_read_and_the_connection_reused() {
        let (addr, seen) = server(vec![
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nGrpc-Status: 0\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nxyz",
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            ],
            vec![b"HTTP/1.0 200 OK\r\n\r\nuntil close"],
        ])
        .await;
        let pool = IdleConns::new(Duration::from_secs(60), "api".into(), None);
        let (status, headers, body, _) = get(&pool, addr, Method::GET).await.expect("length");
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
        assert_eq!(headers.get("x-a").expect("x-a"), "1");
        let (status, _, body, trailers) = get(&pool, addr, Method::GET).await.expect("chunked");
        assert_eq!((status, &body[..]), (StatusCode::CREATED, &b"abcde"[..]));
        assert_eq!(
            trailers
                .expect("trailers")
                .get("grpc-status")
                .expect("status"),
            "0"
        );
        let (status, _, body, _) = get(&pool, addr, Method::GET).await.expect("204");
        assert_eq!((status, body.len()), (StatusCode::NO_CONTENT, 0));
        let (_, headers, body, _) = get(&pool, addr, Method::HEAD).await.expect("head");
        assert_eq!(
            (headers.get("content-length").expect("cl"), body.len()),
            (&"7".parse::<HeaderValue>().expect("v"), 0)
        );
        let (_, _, body, _) = get(&pool, addr, Method::GET)
            .await
            .expect("repeated length");
        assert_eq!(&body[..], b"xyz");
        let (_, _, body, _) = get(&pool, addr, Method::GET).await.expect("close");
        assert_eq!(&body[..], b"ok");
        // `Connection: close`: the next request takes a new connection,
        // whose HTTP/1.0 body runs to EOF.
        let (_, _, body, _) = get(&pool, addr, Method::GET).await.expect("until close");
        assert_eq!(&body[..], b"until close");
        let seen = seen.await.expect("server");
        assert_eq!(seen.len(), 7);
        assert!(
            seen[0].starts_with("GET /x?y=1 HTTP/1.1\r\nhost: up.example:80\r\n"),
            "{}",
            seen[0]
        );
        assert!(seen[3].starts_with("HEAD /x?y=1 HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn connections_made_with_a_renewed_leaf_finish_their_request_and_close() {
        use crate::tls::mesh::Alpn;
        let ca = crate::tls::trust::tests::TestCa::new("mesh");
        let td = "c0ffee.meshwork";
        let mesh = MeshTls::new("web");
        let trust = || crate::tls::trust::Trust::from_roots(&ca.roots(td)).expect("trust");
        mesh.install_for_tests(crate::tls::leaf::tests::signed(&ca, td, "web"), trust());
        let ok = |body: &'static [u8]| -> &'static [u8] { body };
        let (addr, seen) = server(vec![
            vec![
                ok(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"),
                ok(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"),
            ],
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nc"],
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nd"],
        ])
        .await;
        // Connections stamped with the leaf in use when they are made, as
        // `dial::connect` does for a mesh endpoint (plain TCP here).
        let dial = || {
            let mesh = mesh.clone();
            async move {
                let (_, stamp) = mesh.dial_config("api", Alpn::Http1).expect("ready");
                let (stream, slot, _) = crate::upstream::dial::connect(&cluster(), addr)
                    .await?
                    .into_parts();
                Ok::<_, crate::upstream::dial::ConnectError>(Conn::new(Counted::from_parts(
                    stream,
                    slot,
                    Some(stamp),
                )))
            }
        };
        let pool = IdleConns::new(Duration::from_secs(60), "api".into(), Some(mesh.clone()));
        let (headers, empty) = (HeaderMap::new(), Bytes::new());
        let req = RequestHead {
            method: &Method::GET,
            target: "/",
            headers: &headers,
            body: &empty,
            length: Length::None,
            upgrade: false,
        };
        let authority = Authority::from_static("api");
        let send = || async {
            let sent: Result<(Head, Body), SendError<_>> =
                pool.send(addr, &authority, &req, true, dial).await;
            sent.map_err(|_| "no answer")
        };
        let text = |body: Body| async move {
            let bytes = body.collect().await.expect("body").to_bytes();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        let retired = || {
            mesh.render_metrics()
                .lines()
                .find_map(|l| {
                    l.strip_prefix(
                        "meshwork_sidecar_tls_connections_retired_total{direction=\"outbound\"} ",
                    )
                    .map(str::to_owned)
                })
                .unwrap_or_default()
        };
        let (_, body) = send().await.expect("first");
        assert_eq!(text(body).await, "a");
        // A request in flight when the leaf is renewed...
        let (_, body) = send().await.expect("second, on the same connection");
        mesh.install_for_tests(crate::tls::leaf::tests::signed(&ca, td, "web"), trust());
        // ...finishes, and its connection closes instead of being pooled.
        assert_eq!(text(body).await, "b");
        assert_eq!(retired(), "1");
        assert!(pool.take(addr).is_none(), "nothing pooled");
        let (_, body) = send().await.expect("third, on a new connection");
        assert_eq!(text(body).await, "c");
        // A leaf about to expire (no renewal came): its connections are
        // handed out no more either.
        let (_, stamp) = mesh.dial_config("api", Alpn::Http1).expect("ready");
        mesh.leaf_expiring_for_tests(stamp);
        let (_, body) = send().await.expect("fourth, on a third connection");
        assert_eq!(text(body).await, "d");
        // (That third one, made with the same leaf for want of another,
        // carried its request and is not kept either.)
        assert_eq!(retired(), "3");
        assert_eq!(seen.await.expect("server").len(), 4);
    }

    #[tokio::test]
    async fn bad_responses_are_errors() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            let (addr, _) = server(vec![vec![answer]]).await;
            let pool = IdleConns::new(Duration::from_secs(60), "api".into(), None);
            let got = get(&pool, addr, Method::GET).await;
            assert!(
                got.is_err(),
                "{:?} gave {got:?}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_by_the_upstream_is_replaced() {
        // The first connection answers once and closes; the request after
        // it must go out on a second connection without an error.
        let (addr, seen) = server(vec![
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"],
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"],
        ])
        .await;
        let pool = IdleConns::new(Duration::from_secs(60), "api".into(), None);
        let (_, _, body, _) = get(&pool, addr, Method::GET).await.expect("first");
        assert_eq!(&body[..], b"a");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, _, body, _) = get(&pool, addr, Method::GET).await.expect("second");
        assert_eq!(&body[..], b"b");
        assert_eq!(seen.await.expect("server").len(), 2);
    }

    #[tokio::test]
    async fn a_pooled_connection_with_unsolicited_bytes_is_not_reused() {
        // The first connection answers, then 300 ms later sends an extra
        // response nobody asked for; the second connection answers right.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            let (mut first, _) = listener.accept().await.expect("accept");
            let _ = first.read(&mut chunk).await.expect("read");
            first
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
                .await
                .expect("write");
            tokio::time::sleep(Duration::from_millis(300)).await;
            first
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
                .await
                .expect("write");
            let (mut second, _) = listener.accept().await.expect("accept");
            let _ = second.read(&mut chunk).await.expect("read");
            second
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
                .await
                .expect("write");
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(first);
        });
        let pool = IdleConns::new(Duration::from_secs(60), "api".into(), None);
        let (_, _, body, _) = get(&pool, addr, Method::GET).await.expect("first");
        assert_eq!(&body[..], b"first");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, _, body, _) = get(&pool, addr, Method::GET).await.expect("second");
        assert_eq!(
            &body[..],
            b"second",
            "the stray bytes went to the next request"
        );
        server.await.expect("server");
    }

    #[test]
    fn requests_are_encoded_with_the_proxy_framing() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("svc"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        headers.append("x-b", HeaderValue::from_static("1"));
        headers.append("x-b", HeaderValue::from_static("2"));
        let body = Bytes::from_static(b"data");
        let req = RequestHead {
            method: &Method::POST,
            target: "/p",
            headers: &headers,
            body: &body,
            length: Length::Exact(4),
            upgrade: false,
        };
        let mut out = Vec::new();
        req.encode(&mut out, &Authority::from_static("ignored:1"));
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "POST /p HTTP/1.1\r\nhost: svc\r\nx-b: 1\r\nx-b: 2\r\ncontent-length: 4\r\n\r\ndata"
        );
    }
}
