//! The HTTP proxy's [`Pool`] of upstream connections per endpoint: idle
//! HTTP/1.1 keep-alive connections (driven inline, see [`h1`]) and one
//! shared HTTP/2 connection (see [`h2c`]). Connections are opened by
//! [`crate::upstream::dial`].
//!
//! The pool is ours rather than hyper-util's legacy `Client` because that
//! one costs a boxed future, a pool-key hash and clone of both protocol
//! builders per request, and per HTTP/1 response a spawned task or
//! `DelayEof` channel to return the connection; here a request takes an
//! idle connection under a short lock and its response body gives it back
//! when its last byte has been read.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Request;
use hyper::Response;
use hyper::body::Body;
use hyper::http::uri::Authority;

use crate::upstream::BoxError;
use crate::upstream::cluster::Cluster;
use crate::upstream::dial::{AddrMap, ConnectError, connect};
use crate::upstream::{h1, h2c};

/// Why a pooled request got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection (a request sent nowhere: safe to send elsewhere).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The HTTP/2 handshake on a new connection failed (nothing was sent).
    #[error("HTTP/2 handshake with {0} failed: {1}")]
    Handshake(SocketAddr, #[source] h2::Error),
    /// The exchange failed on an HTTP/2 connection (the upstream may have
    /// seen the request).
    #[error("HTTP/2 stream to the upstream failed: {0}")]
    H2(#[source] h2::Error),
    /// The same, on an HTTP/1.1 connection.
    #[error(transparent)]
    H1(h1::Error),
}

impl<E: Into<ConnectError>> From<h1::SendError<E>> for SendError {
    fn from(e: h1::SendError<E>) -> Self {
        match e {
            h1::SendError::Connect(e) => SendError::Connect(e.into()),
            h1::SendError::Exchange(e) => SendError::H1(e),
        }
    }
}

/// Idle HTTP/1.1 connections and shared HTTP/2 connections of one
/// listener's cluster, by endpoint address.
#[derive(Clone)]
pub struct Pool {
    cluster: Arc<Cluster>,
    shared: Arc<Shared>,
    /// HTTP/1.1 connections driven by their requests (see [`h1`]).
    h1: Arc<h1::IdleConns>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("upstream", &self.cluster.config().name)
            .finish_non_exhaustive()
    }
}

/// The HTTP/2 side's state, reached by the sweeper.
struct Shared {
    /// Lock rule: held only to take or put an entry, never across an await.
    idle: Mutex<Idle>,
    /// Connections unused this long are closed.
    idle_timeout: Duration,
    upstream: String,
    /// The mesh identity: which leaf shared connections must have been
    /// made with (`None`: no mesh).
    mesh: Option<crate::tls::MeshTls>,
}

struct Idle {
    /// The HTTP/2 connection of each endpoint, with when it was last used.
    h2: AddrMap<(h2c::Conn, Instant)>,
    /// One HTTP/2 connect at a time per endpoint, so a burst of first
    /// requests opens one connection rather than one each (and a slow
    /// endpoint holds up no other).
    h2_connecting: AddrMap<Arc<tokio::sync::Mutex<()>>>,
    /// The sweeper task is running.
    sweeping: bool,
}

impl Shared {
    fn start_sweeper(self: &Arc<Self>, idle: &mut Idle) {
        if !idle.sweeping {
            let every =
                (self.idle_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
            idle.sweeping = crate::upstream::dial::spawn_sweeper(
                Arc::downgrade(self),
                every,
                &self.upstream,
                Self::sweep,
            );
        }
    }

    /// Whether `conn` may take new streams: plain, or made with the leaf
    /// in use (counted when not: the caller lets go of it).
    fn current(&self, conn: &h2c::Conn) -> bool {
        let (Some(leaf), Some(mesh)) = (conn.leaf(), &self.mesh) else {
            return true;
        };
        let usable = mesh.usable(leaf);
        if !usable {
            mesh.count_retired();
        }
        usable
    }

    /// Closes what has idled out, been closed or was made with a renewed
    /// leaf; false once nothing is left.
    fn sweep(&self) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let limit = self.idle_timeout;
        idle.h2
            .retain(|_, (s, used)| !s.is_closed() && used.elapsed() < limit && self.current(s));
        idle.h2_connecting
            .retain(|_, turn| Arc::strong_count(turn) > 1);
        idle.sweeping = !idle.h2.is_empty();
        idle.sweeping
    }
}

impl Pool {
    /// Connections are opened as requests need them: HTTP/1.1 by
    /// [`Pool::send_inline`] and [`Pool::send_stream`], HTTP/2 by
    /// [`Pool::send_h2`].
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Pool {
            shared: Arc::new(Shared {
                idle: Mutex::new(Idle {
                    h2: AddrMap::default(),
                    h2_connecting: AddrMap::default(),
                    sweeping: false,
                }),
                idle_timeout: cluster.config().idle_timeout,
                upstream: cluster.config().name.clone(),
                mesh: cluster.mesh.clone(),
            }),
            h1: h1::IdleConns::new(
                cluster.config().idle_timeout,
                cluster.config().name.clone(),
                cluster.mesh.clone(),
            ),
            cluster,
        }
    }

    /// Sends a request whose body is in memory over an HTTP/1.1
    /// connection (see [`h1`]): the response head, and the body that reads
    /// the rest from the connection and then gives it back to the pool, as
    /// the caller's `O` (see [`h1::Outcome`]).
    pub async fn send_inline<O: h1::Outcome<ConnectError>>(
        &self,
        addr: SocketAddr,
        authority: &Authority,
        req: &h1::RequestHead<'_>,
        idempotent: bool,
    ) -> O {
        let connect = || async move { connect(&self.cluster, addr).await.map(h1::Conn::new) };
        self.h1
            .send(addr, authority, req, idempotent, connect)
            .await
    }

    /// Sends a request whose body streams from `body` over an HTTP/1.1
    /// connection (see [`h1::stream`]).
    pub async fn send_stream<B>(
        &self,
        addr: SocketAddr,
        authority: &Authority,
        req: &h1::RequestHead<'_>,
        body: B,
    ) -> Result<(h1::Head, h1::Body), SendError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let connect = || async move { connect(&self.cluster, addr).await.map(h1::Conn::new) };
        Ok(self
            .h1
            .send_stream(addr, authority, req, body, connect)
            .await?)
    }

    /// Sends `head` and `body` to `addr` on its HTTP/2 connection (opened
    /// if there is none) and returns the response head. A request that a
    /// reused connection could not take (closed, or going away) goes out
    /// on a new one.
    pub async fn send_h2<R>(
        &self,
        addr: SocketAddr,
        head: Request<()>,
        body: R,
    ) -> Result<Response<h2c::Body>, SendError>
    where
        R: Body<Data = Bytes> + Send + Unpin + 'static,
        R::Error: Into<BoxError>,
    {
        loop {
            let (conn, reused) = match self.shared_h2(addr) {
                Some(conn) => (conn, true),
                // Boxed: rare, and large (see `send`).
                None => Box::pin(self.connect_h2_once(addr)).await?,
            };
            match conn.ready().await {
                Ok(ready) => return ready.send(head, body).await.map_err(SendError::H2),
                Err(e) if reused => {
                    tracing::debug!(error = %e, endpoint = %addr, "shared HTTP/2 connection is gone; opening another");
                    self.forget_h2(addr, &conn);
                }
                Err(e) => return Err(SendError::H2(e)),
            }
        }
    }

    /// Connects unless another request did so while this one waited its
    /// turn; true when the connection is a reused one.
    async fn connect_h2_once(&self, addr: SocketAddr) -> Result<(h2c::Conn, bool), SendError> {
        let turn = {
            let mut idle = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(idle.h2_connecting.entry(addr).or_default())
        };
        let _one = turn.lock().await;
        match self.shared_h2(addr) {
            Some(conn) => Ok((conn, true)),
            None => Ok((self.connect_h2(addr).await?, false)),
        }
    }

    /// The endpoint's open HTTP/2 connection, if any. One made with a
    /// leaf that has since been renewed (or is about to expire) is shared
    /// no more: its streams finish, and it closes once they have (the
    /// connection ends when its last handle and stream are gone).
    fn shared_h2(&self, addr: SocketAddr) -> Option<h2c::Conn> {
        let mut idle = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        let (conn, used) = idle.h2.get_mut(&addr)?;
        if !self.shared.current(conn) {
            tracing::debug!(endpoint = %addr, "the mesh leaf was renewed: the shared HTTP/2 connection made with the old one is retired");
            idle.h2.remove(&addr);
            return None;
        }
        if conn.is_closed() || used.elapsed() >= self.shared.idle_timeout {
            idle.h2.remove(&addr);
            return None;
        }
        *used = Instant::now();
        Some(conn.clone())
    }

    /// Stops sharing the endpoint's HTTP/2 connection: a request on it got
    /// no answer within its timeout, and the connection may be dead without
    /// a FIN or RST (a host gone, a partition). Streams on it go on; the
    /// next request opens a new connection.
    pub fn retire_h2(&self, addr: SocketAddr) {
        let mut idle = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.h2.remove(&addr).is_some() {
            tracing::debug!(endpoint = %addr, "a request timed out: the shared HTTP/2 connection is retired");
        }
    }

    fn forget_h2(&self, addr: SocketAddr, conn: &h2c::Conn) {
        let mut idle = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.h2.get(&addr).is_some_and(|(c, _)| c.same(conn)) {
            idle.h2.remove(&addr);
        }
    }

    async fn connect_h2(&self, addr: SocketAddr) -> Result<h2c::Conn, SendError> {
        let io = connect(&self.cluster, addr).await?;
        let span = tracing::debug_span!("upstream connection", upstream = %self.cluster.config().name, endpoint = %addr);
        let conn = h2c::Conn::handshake(io, span)
            .await
            .map_err(|e| SendError::Handshake(addr, e))?;
        let mut idle = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.h2.insert(addr, (conn.clone(), Instant::now()));
        self.shared.start_sweeper(&mut idle);
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    use std::sync::atomic::Ordering;

    /// An HTTP/1.1 server answering "ok"; it closes every connection it
    /// holds when `close` changes.
    async fn server(close: tokio::sync::watch::Receiver<u32>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"ok"),
                    )))
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                let mut close = close.clone();
                // Only a change from now on closes this one.
                close.borrow_and_update();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = connection => {}
                        _ = close.changed() => {}
                    }
                });
            }
        });
        addr
    }

    fn cluster(app: SocketAddr) -> Arc<Cluster> {
        let text = "[registry]\naddresses = [\"127.0.0.1:8502\"]\n[service]\nname = \"web\"\nport = 8080\n[[upstreams]]\nname = \"api\"\nlisten = \"127.0.0.1:9191\"\nprotocol = \"http\"\n";
        let mut config = crate::config::Config::parse("t.toml", text).expect("valid");
        Cluster::local(config.upstreams.remove(0), app)
    }

    async fn get(pool: &Pool, addr: SocketAddr) -> h1::Body {
        let (headers, body) = (hyper::HeaderMap::new(), Bytes::new());
        let req = h1::RequestHead {
            method: &hyper::Method::GET,
            target: "/",
            headers: &headers,
            body: &body,
            length: h1::Length::None,
            upgrade: false,
        };
        let authority = Authority::from_static("test");
        let sent: Result<(h1::Head, h1::Body), h1::SendError<ConnectError>> =
            pool.send_inline(addr, &authority, &req, true).await;
        let (head, body) = sent.expect("response");
        assert_eq!(head.status, 200);
        body
    }

    async fn get_ok(pool: &Pool, addr: SocketAddr) {
        let body = get(pool, addr).await.collect().await.expect("body");
        assert_eq!(body.to_bytes(), "ok");
    }

    #[tokio::test]
    async fn idle_connections_are_reused_and_closed_ones_replaced() {
        let (close, closed) = tokio::sync::watch::channel(0);
        let addr = server(closed).await;
        let cluster = cluster(addr);
        let pool = Pool::new(Arc::clone(&cluster));
        let opened = || cluster.metrics.connections.load(Ordering::Relaxed);
        get_ok(&pool, addr).await;
        get_ok(&pool, addr).await;
        get_ok(&pool, addr).await;
        assert_eq!(opened(), 1, "one connection, kept alive");
        // The server drops it: a new one, no error.
        close.send_modify(|n| *n += 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        get_ok(&pool, addr).await;
        assert_eq!(opened(), 2);
        // A body dropped unread leaves its connection unfit: not reused.
        drop(get(&pool, addr).await);
        get_ok(&pool, addr).await;
        assert_eq!(opened(), 3);
    }

    #[tokio::test]
    async fn a_retired_http2_connection_is_replaced_for_the_next_request() {
        // A peer that takes every byte and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let cluster = cluster(addr);
        let pool = Pool::new(Arc::clone(&cluster));
        let opened = || cluster.metrics.connections.load(Ordering::Relaxed);
        let head = || {
            Request::get(format!("http://{addr}/"))
                .body(())
                .expect("request")
        };
        let silent = tokio::time::timeout(
            Duration::from_millis(200),
            pool.send_h2(addr, head(), Empty::<bytes::Bytes>::new()),
        );
        assert!(silent.await.is_err(), "no answer from a silent upstream");
        assert_eq!(opened(), 1);
        // Still shared: the next request would go to the same connection...
        let again = tokio::time::timeout(
            Duration::from_millis(50),
            pool.send_h2(addr, head(), Empty::<bytes::Bytes>::new()),
        );
        assert!(again.await.is_err());
        assert_eq!(opened(), 1);
        // ...until a timed-out request retires it.
        pool.retire_h2(addr);
        let fresh = tokio::time::timeout(
            Duration::from_millis(50),
            pool.send_h2(addr, head(), Empty::<bytes::Bytes>::new()),
        );
        assert!(fresh.await.is_err());
        assert_eq!(opened(), 2, "a new connection after the retirement");
    }

    /// A request body fed by the test, chunk by chunk.
    struct ChannelBody(tokio::sync::mpsc::Receiver<bytes::Bytes>);

    impl Body for ChannelBody {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>>
        {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(hyper::body::Frame::data(c))))
        }
    }

    /// An HTTP/2 upstream on loopback that takes one connection and hands
    /// its first request to `serve` (the connection's frames go on being
    /// read meanwhile).
    async fn h2_upstream<F, Fut>(serve: F) -> SocketAddr
    where
        F: FnOnce(Request<h2::RecvStream>, h2::server::SendResponse<bytes::Bytes>) -> Fut
            + Send
            + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut connection) = h2::server::handshake(socket).await else {
                return;
            };
            let Some(Ok((request, respond))) = connection.accept().await else {
                return;
            };
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            serve(request, respond).await;
        });
        addr
    }

    /// A pool for `addr`, and an upload to it whose body the test feeds
    /// (`first` already queued): the request head, the body and its feed.
    async fn upload(
        addr: SocketAddr,
        first: &'static [u8],
    ) -> (
        Pool,
        Request<()>,
        ChannelBody,
        tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) {
        let pool = Pool::new(cluster(addr));
        let (chunks, rx) = tokio::sync::mpsc::channel(4);
        chunks
            .send(bytes::Bytes::from_static(first))
            .await
            .expect("queued");
        let head = Request::post(format!("http://{addr}/upload"))
            .body(())
            .expect("request");
        (pool, head, ChannelBody(rx), chunks)
    }

    /// Reads a received body's next chunk, giving its window back.
    async fn next_chunk(body: &mut h2::RecvStream) -> Option<Result<bytes::Bytes, h2::Error>> {
        let chunk = body.data().await;
        if let Some(Ok(chunk)) = &chunk {
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        chunk
    }

    #[tokio::test]
    async fn an_abandoned_http2_exchange_stops_streaming_its_request_body() {
        // An HTTP/2 upstream that reads the request body and never answers;
        // it reports the first chunk, then how the body ended.
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let (end_tx, end_rx) = tokio::sync::oneshot::channel();
        let addr = h2_upstream(|request, _respond| async move {
            let mut body = request.into_body();
            let _ = first_tx.send(next_chunk(&mut body).await.and_then(Result::ok));
            let end = match body.data().await {
                Some(Err(e)) => Some(e.reason()),
                _ => None,
            };
            let _ = end_tx.send(end);
            // `_respond` lives until here: the request stays unanswered.
        })
        .await;
        let (pool, head, body, chunks) = upload(addr, b"first chunk").await;
        let exchange = pool.send_h2(addr, head, body);
        // Given up on (a request timeout, a client gone) once the upstream
        // has the first chunk; the client's body is still open.
        let gave_up = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::select! {
                _ = exchange => panic!("the upstream never answers"),
                first = first_rx => first,
            }
        })
        .await
        .expect("the upstream got the first chunk in time")
        .expect("reported");
        assert_eq!(gave_up.as_deref(), Some(&b"first chunk"[..]));
        let end = tokio::time::timeout(Duration::from_secs(5), end_rx)
            .await
            .expect("the request stream was cancelled, not left streaming")
            .expect("reported");
        assert_eq!(end, Some(Some(h2::Reason::CANCEL)));
        assert!(chunks.is_closed(), "the client's body was let go of");
    }

    #[tokio::test]
    async fn an_upstream_that_answers_early_still_gets_the_rest_of_the_body() {
        // An HTTP/2 upstream that answers (completely) after the first
        // chunk, without resetting the stream, and then reads on.
        let (rest_tx, rest_rx) = tokio::sync::oneshot::channel();
        let addr = h2_upstream(|request, mut respond| async move {
            let mut body = request.into_body();
            let mut got = Vec::new();
            if let Some(Ok(first)) = next_chunk(&mut body).await {
                got.extend_from_slice(&first);
            }
            let Ok(mut stream) = respond.send_response(Response::new(()), false) else {
                return;
            };
            let _ = stream.send_data(bytes::Bytes::from_static(b"early"), true);
            while let Some(Ok(chunk)) = next_chunk(&mut body).await {
                got.extend_from_slice(&chunk);
            }
            let _ = rest_tx.send((got, body.is_end_stream()));
        })
        .await;
        let (pool, head, body, chunks) = upload(addr, b"one ").await;
        let response = tokio::time::timeout(Duration::from_secs(5), pool.send_h2(addr, head, body))
            .await
            .expect("answered in time")
            .expect("answered");
        let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
            .await
            .expect("read in time")
            .expect("read")
            .to_bytes();
        assert_eq!(&body[..], b"early");
        // The answer is read and gone; the upload goes on to its end.
        chunks
            .send(bytes::Bytes::from_static(b"two"))
            .await
            .expect("the pipe still reads the client's body");
        drop(chunks);
        let (got, ended) = tokio::time::timeout(Duration::from_secs(5), rest_rx)
            .await
            .expect("the upstream got the whole body in time")
            .expect("reported");
        assert_eq!(got, b"one two");
        assert!(ended, "the body ended normally, not with a reset");
    }

    /// A request body fed by the test frame by frame, errors included.
    struct Feed(tokio::sync::mpsc::Receiver<Result<hyper::body::Frame<Bytes>, std::io::Error>>);

    impl Body for Feed {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx)
        }
    }

    type FeedTx = tokio::sync::mpsc::Sender<Result<hyper::body::Frame<Bytes>, std::io::Error>>;

    fn feed() -> (FeedTx, Feed) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        (tx, Feed(rx))
    }

    /// An HTTP/1.1 upstream that answers each request with what it
    /// received: `<framing> <body> <trailer x-t>`.
    async fn echo_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let framing = if req.headers().contains_key("transfer-encoding") {
                            "chunked".to_owned()
                        } else {
                            format!("length={:?}", req.headers().get("content-length"))
                        };
                        let body = req.into_body().collect().await?;
                        let trailer = body
                            .trailers()
                            .and_then(|t| t.get("x-t"))
                            .map(|v| v.to_str().unwrap_or("?").to_owned())
                            .unwrap_or_default();
                        let text = format!(
                            "{framing} {} {trailer}",
                            String::from_utf8_lossy(&body.to_bytes())
                        );
                        Ok::<_, hyper::Error>(Response::new(http_body_util::Full::new(
                            Bytes::from(text),
                        )))
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    fn streamed(headers: &hyper::HeaderMap, length: h1::Length) -> h1::RequestHead<'_> {
        static EMPTY: Bytes = Bytes::from_static(b"");
        h1::RequestHead {
            method: &hyper::Method::POST,
            target: "/up",
            headers,
            body: &EMPTY,
            length,
            upgrade: false,
        }
    }

    async fn text(body: h1::Body) -> String {
        let bytes = body.collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn streamed_bodies_go_out_chunked_or_with_their_length_and_the_connection_is_reused() {
        let addr = echo_server().await;
        let cluster = cluster(addr);
        let pool = Pool::new(Arc::clone(&cluster));
        let authority = Authority::from_static("test");
        let headers = hyper::HeaderMap::new();
        // Unknown length: chunked, trailers included.
        let (tx, body) = feed();
        let chunked = streamed(&headers, h1::Length::Chunked);
        let send = pool.send_stream(addr, &authority, &chunked, body);
        let feeding = async {
            for part in ["one ", "two"] {
                tx.send(Ok(hyper::body::Frame::data(Bytes::from(part))))
                    .await
                    .expect("fed");
            }
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("x-t", hyper::header::HeaderValue::from_static("end"));
            tx.send(Ok(hyper::body::Frame::trailers(trailers)))
                .await
                .expect("fed");
            drop(tx);
        };
        let (sent, ()) = tokio::join!(send, feeding);
        let (head, body) = sent.expect("answered");
        assert_eq!(head.status, 200);
        assert_eq!(text(body).await, "chunked one two end");
        // A declared length is kept.
        let (tx, body) = feed();
        tx.send(Ok(hyper::body::Frame::data(Bytes::from("12345"))))
            .await
            .expect("fed");
        drop(tx);
        let (_, body) = pool
            .send_stream(
                addr,
                &authority,
                &streamed(&headers, h1::Length::Exact(5)),
                body,
            )
            .await
            .expect("answered");
        assert_eq!(text(body).await, "length=Some(\"5\") 12345 ");
        // Both went over one connection, which a request from memory reuses.
        let body = get(&pool, addr).await.collect().await.expect("body");
        assert_eq!(body.to_bytes(), "length=None  ");
        assert_eq!(cluster.metrics.connections.load(Ordering::Relaxed), 1);
        // A body longer than it declared is the client's fault.
        let (tx, body) = feed();
        tx.send(Ok(hyper::body::Frame::data(Bytes::from("123456"))))
            .await
            .expect("fed");
        drop(tx);
        let short = streamed(&headers, h1::Length::Exact(5));
        let got = pool.send_stream(addr, &authority, &short, body).await;
        assert!(
            matches!(got, Err(SendError::H1(h1::Error::BodyBroke))),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn a_broken_client_body_ends_the_exchange_as_the_clients_failure() {
        let addr = echo_server().await;
        let pool = Pool::new(cluster(addr));
        let authority = Authority::from_static("test");
        let headers = hyper::HeaderMap::new();
        let (tx, body) = feed();
        tx.send(Ok(hyper::body::Frame::data(Bytes::from("part"))))
            .await
            .expect("fed");
        tx.send(Err(std::io::Error::other("client went away")))
            .await
            .expect("fed");
        // The upstream would wait for the rest for ever: the exchange must
        // not.
        let got = tokio::time::timeout(
            Duration::from_secs(5),
            pool.send_stream(
                addr,
                &authority,
                &streamed(&headers, h1::Length::Chunked),
                body,
            ),
        )
        .await
        .expect("ended at once");
        assert!(
            matches!(got, Err(SendError::H1(h1::Error::BodyBroke))),
            "{got:?}"
        );
    }

    /// An upstream that answers `answer` as soon as it has a request head,
    /// then reads (and counts) what follows until the client closes.
    async fn early_server(
        answer: &'static [u8],
    ) -> (SocketAddr, tokio::sync::oneshot::Receiver<usize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (done, read) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut chunk = [0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut chunk).await.expect("read");
                assert!(n > 0, "closed before the head");
                seen.extend_from_slice(&chunk[..n]);
            }
            socket.write_all(answer).await.expect("write");
            loop {
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = done.send(seen.len());
        });
        (addr, read)
    }

    #[tokio::test]
    async fn an_early_answer_arrives_while_the_body_streams_and_the_upload_goes_on() {
        let (addr, upstream_read) =
            early_server(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\n\r\nbig!").await;
        let pool = Pool::new(cluster(addr));
        let authority = Authority::from_static("test");
        let headers = hyper::HeaderMap::new();
        let (tx, body) = feed();
        tx.send(Ok(hyper::body::Frame::data(Bytes::from("first"))))
            .await
            .expect("fed");
        let (head, body) = tokio::time::timeout(
            Duration::from_secs(5),
            pool.send_stream(
                addr,
                &authority,
                &streamed(&headers, h1::Length::Chunked),
                body,
            ),
        )
        .await
        .expect("answered before the body ended")
        .expect("answered");
        assert_eq!(head.status, 413);
        assert_eq!(text(body).await, "big!");
        // The response is complete; the body still goes out to its end.
        tx.send(Ok(hyper::body::Frame::data(Bytes::from("second"))))
            .await
            .expect("the pump still takes the body");
        drop(tx);
        let read = tokio::time::timeout(Duration::from_secs(5), upstream_read)
            .await
            .expect("the upload ended and the connection closed")
            .expect("count");
        assert!(read > 40, "the upstream got the rest: {read} bytes");
    }

    #[tokio::test]
    async fn an_abandoned_exchange_stops_pumping_its_body() {
        let (addr, upstream_read) =
            early_server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nmore").await;
        let pool = Pool::new(cluster(addr));
        let authority = Authority::from_static("test");
        let headers = hyper::HeaderMap::new();
        let (tx, body) = feed();
        tx.send(Ok(hyper::body::Frame::data(Bytes::from("first"))))
            .await
            .expect("fed");
        let (_, body) = pool
            .send_stream(
                addr,
                &authority,
                &streamed(&headers, h1::Length::Chunked),
                body,
            )
            .await
            .expect("answered");
        // The client goes away half way through the response.
        drop(body);
        tokio::time::timeout(Duration::from_secs(5), tx.closed())
            .await
            .expect("the pump let go of the client's body");
        tokio::time::timeout(Duration::from_secs(5), upstream_read)
            .await
            .expect("the upstream connection closed")
            .expect("count");
    }
}
