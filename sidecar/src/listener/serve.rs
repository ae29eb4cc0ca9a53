//! Serving one accepted HTTP connection: HTTP/2 with prior knowledge when
//! the client opens with the connection preface, HTTP/1.1 otherwise.
//!
//! HTTP/1.1 goes to hyper's server (with upgrades). HTTP/2 is served on
//! the `h2` crate directly: each stream gets a task that runs the proxy's
//! answer and sends the response on the stream, with none of the layers
//! hyper's HTTP/2 server puts around it (its body and I/O adapters, a
//! second pass over the headers, a ping recorder per body). The limits
//! are the same: header list size, concurrent streams, resets a client may
//! cause (rapid reset) or provoke, and keep-alive PINGs that close a
//! connection whose peer has gone silent.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{Ping, PingPong, Reason, RecvStream};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::http::headers::content_length;
use crate::http::idle::{OnOwnWake, Tracked};
use crate::http::{ClientBody, ResponseBody};
use crate::listener::{
    H2_MAX_LOCAL_RESETS, H2_MAX_PENDING_RESETS, H2_MAX_STREAMS, HEADER_READ_TIMEOUT,
};
use crate::tls::stream::ServerStream;
use crate::upstream::{MAX_HEADER_BYTES, h2c};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// What is read to tell the protocols apart (the rest goes to the server).
const FIRST_READ: usize = 8 * 1024;
/// Flow-control windows granted to a client (hyper's server defaults).
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Bytes a response stream may have buffered before sending waits.
const MAX_SEND_BUFFER: usize = 400 * 1024;
/// A PING this often to an HTTP/2 client; no answer within the timeout
/// closes the connection (a client that vanished without FIN or RST).
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP/1.1 server's settings for every connection.
pub fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Heads are timed by `idle::Activity` from their first byte;
        // hyper's timer would also close idle keep-alive connections.
        .header_read_timeout(None)
        // The head limit, checked on the parsed head: the buffer limit
        // alone is soft (one read may fill the buffer past it, and a head
        // that then parses whole gets through).
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    builder
}

/// Serves the connection until it closes, or until `shutdown` fires and
/// what is in flight has been answered (new requests are then refused:
/// HTTP/2 GOAWAY, HTTP/1.1 `Connection: close`). `service` answers a
/// request (it cannot fail: the `Result` is what hyper's servers take, so
/// its future goes to hyper as it is).
pub async fn connection<S, F>(
    mut io: Tracked<ServerStream>,
    h1: &http1::Builder,
    service: S,
    shutdown: CancellationToken,
) -> Result<(), ServeError>
where
    S: Fn(Request<ClientBody>) -> F + Clone + Send + 'static,
    F: Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static,
{
    let mut first = BytesMut::with_capacity(FIRST_READ);
    // A client that starts the preface and stalls is cut off like a slow
    // HTTP/1.1 head (which `idle::Activity` times once this is decided).
    let sniff = async {
        loop {
            if io.read_buf(&mut first).await? == 0 {
                return Ok(None); // closed before a request
            }
            let n = first.len().min(PREFACE.len());
            if !PREFACE.starts_with(&first[..n]) {
                return Ok(Some(false));
            }
            if n == PREFACE.len() {
                return Ok(Some(true));
            }
        }
    };
    let mut shutdown = pin!(OnOwnWake::new(shutdown.cancelled_owned()));
    let sniffed = tokio::select! {
        biased;
        sniffed = tokio::time::timeout(HEADER_READ_TIMEOUT, sniff) => sniffed,
        // Retired before it said anything: nothing to finish.
        () = shutdown.as_mut() => return Ok(()),
    };
    let http2 = match sniffed {
        Ok(Ok(Some(http2))) => http2,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(ServeError::Io(e)),
        Err(_) => return Err(ServeError::Slow),
    };
    if http2 {
        // No HTTP/1 heads from here on; HTTP/2 header blocks are timed.
        io.watch_h2_frames();
    }
    io.unread(first.freeze());
    if http2 {
        return serve_h2(io, service, shutdown).await;
    }
    let service =
        hyper::service::service_fn(move |req: Request<Incoming>| service(req.map(ClientBody::H1)));
    let mut conn = pin!(
        h1.serve_connection(TokioIo::new(io), service)
            .with_upgrades()
    );
    tokio::select! {
        biased;
        result = conn.as_mut() => return result.map_err(ServeError::Http1),
        () = shutdown.as_mut() => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await.map_err(ServeError::Http1)
}

/// How a connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Io(io::Error),
    #[error(transparent)]
    Http1(hyper::Error),
    #[error(transparent)]
    H2(h2::Error),
    /// Nothing, part of the HTTP/2 preface, or no HTTP/2 handshake.
    #[error("the client did not start a request within {HEADER_READ_TIMEOUT:?}")]
    Slow,
}

async fn serve_h2<S, F, W>(
    io: Tracked<ServerStream>,
    service: S,
    mut shutdown: Pin<&mut OnOwnWake<W>>,
) -> Result<(), ServeError>
where
    S: Fn(Request<ClientBody>) -> F + Clone + Send + 'static,
    F: Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static,
    W: Future<Output = ()>,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(Some(H2_MAX_LOCAL_RESETS))
        .handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(HEADER_READ_TIMEOUT, handshake).await {
        Ok(conn) => conn.map_err(ServeError::H2)?,
        Err(_) => return Err(ServeError::Slow),
    };
    let mut keep_alive = pin!(OnOwnWake::new(keep_alive(conn.ping_pong())));
    let mut closing = false;
    loop {
        tokio::select! {
            biased;
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    // Boxed: the stream's future is large, and the runtime
                    // would copy it into its task and again at each stage.
                    tokio::spawn(Box::pin(stream(service.clone(), req, respond)));
                }
                Some(Err(e)) => return Err(ServeError::H2(e)),
                // Closed, or gone away with every stream done.
                None => return Ok(()),
            },
            () = shutdown.as_mut(), if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            () = keep_alive.as_mut() => {
                tracing::debug!("the client did not answer a PING in time; closing");
                conn.abrupt_shutdown(Reason::NO_ERROR);
                // Flush the GOAWAY, at most as long as a PING was given.
                let _ = tokio::time::timeout(KEEP_ALIVE_TIMEOUT, poll_fn(|cx| conn.poll_closed(cx))).await;
                return Ok(());
            }
        }
    }
}

/// Resolves when a PING went unanswered for [`KEEP_ALIVE_TIMEOUT`]; never
/// when there is no PING handle or the connection is closing anyway.
async fn keep_alive(pinger: Option<PingPong>) {
    let Some(mut pinger) = pinger else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEP_ALIVE_INTERVAL).await;
        if pinger.send_ping(Ping::opaque()).is_err() {
            return std::future::pending().await;
        }
        match tokio::time::timeout(KEEP_ALIVE_TIMEOUT, poll_fn(|cx| pinger.poll_pong(cx))).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// One request stream: the proxy's answer, cancelled should the client
/// reset the stream first, then the response and its body.
async fn stream<S, F>(service: S, req: Request<RecvStream>, mut respond: SendResponse<Bytes>)
where
    S: Fn(Request<ClientBody>) -> F,
    F: Future<Output = Result<Response<ResponseBody>, Infallible>>,
{
    let (parts, recv) = req.into_parts();
    let length = content_length(&parts.headers);
    let body = ClientBody::H2(h2c::Body::new(recv, length));
    let mut answer = pin!(service(Request::from_parts(parts, body)));
    let response = tokio::select! {
        biased;
        response = answer.as_mut() => match response {
            Ok(response) => response,
            Err(never) => match never {},
        },
        reset = poll_fn(|cx| respond.poll_reset(cx)) => {
            tracing::debug!(reason = ?reset.ok(), "the client reset the stream before the answer");
            return;
        }
    };
    let (mut head, body) = response.into_parts();
    if !head.headers.contains_key(header::DATE) {
        head.headers.insert(header::DATE, date());
    }
    let end = body.is_end_stream();
    if !end
        && let Some(n) = body.size_hint().exact()
        && !head.headers.contains_key(header::CONTENT_LENGTH)
    {
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    match respond.send_response(Response::from_parts(head, ()), end) {
        Ok(sending) if !end => h2c::Pipe::new(body, sending, Reason::INTERNAL_ERROR).await,
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(error = %e, "the response could not be sent");
            respond.send_reset(Reason::INTERNAL_ERROR);
        }
    }
}

/// The `Date` of a response that has none (RFC 9110 §6.6.1): formatted
/// once a second per thread.
fn date() -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<(u64, HeaderValue)> =
            const { std::cell::RefCell::new((0, HeaderValue::from_static(""))) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LAST.with_borrow_mut(|(at, value)| {
        if *at != secs {
            // An HTTP date is always a valid header value.
            if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(now)) {
                *value = v;
                *at = secs;
            }
        }
        value.clone()
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use http_body_util::{BodyExt, Full};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::http::idle::Activity;
    use crate::tls::stream::Stream;
    use tokio::net::TcpStream;

    /// Serves one connection on a fresh listener with a service that
    /// answers every request with its path.
    async fn one_connection() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            let io = Tracked::new(Stream::Plain(socket), Arc::new(Activity::new(true)));
            let service = |req: Request<ClientBody>| async move {
                let body = Full::new(Bytes::from(req.uri().path().to_owned()))
                    .map_err(|never| match never {})
                    .boxed_unsync();
                Ok(Response::new(ResponseBody::Own(body)))
            };
            let _ = connection(io, &http1_builder(), service, CancellationToken::new()).await;
        });
        addr
    }

    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await;
        String::from_utf8_lossy(&reply).into_owned()
    }

    /// An HTTP/2 client connection to `addr`, driven by a task of its own.
    async fn h2_client(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
        let socket = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = h2::client::handshake(socket).await.expect("handshake");
        tokio::spawn(conn);
        sender
    }

    fn get(path: &str) -> Request<()> {
        Request::get(format!("http://x{path}"))
            .body(())
            .expect("request")
    }

    #[tokio::test]
    async fn http2_streams_are_answered_on_the_connection() {
        let addr = one_connection().await;
        let mut client = h2_client(addr).await;
        for path in ["/one", "/two"] {
            let (response, _) = client.send_request(get(path), true).expect("send");
            let response = response.await.expect("response");
            assert_eq!(response.status(), 200);
            assert!(response.headers().contains_key(header::DATE));
            assert_eq!(
                response.headers()[header::CONTENT_LENGTH],
                path.len().to_string()
            );
            let mut body = response.into_body();
            let mut got = Vec::new();
            while let Some(chunk) = body.data().await {
                got.extend_from_slice(&chunk.expect("data"));
            }
            assert_eq!(got, path.as_bytes());
        }
    }

    #[tokio::test]
    async fn http2_drain_finishes_streams_in_flight_then_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let drain = CancellationToken::new();
        let (started_tx, started) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (reset_tx, mut reset) = tokio::sync::mpsc::unbounded_channel::<()>();
        let token = drain.clone();
        let served = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            let io = Tracked::new(Stream::Plain(socket), Arc::new(Activity::new(true)));
            let service = move |req: Request<ClientBody>| {
                let (started, reset) = (started_tx.clone(), reset_tx.clone());
                async move {
                    // Told when this answer is dropped unfinished.
                    struct OnDrop(tokio::sync::mpsc::UnboundedSender<()>, bool);
                    impl Drop for OnDrop {
                        fn drop(&mut self) {
                            if !self.1 {
                                let _ = self.0.send(());
                            }
                        }
                    }
                    let mut guard = OnDrop(reset, false);
                    let _ = started.send(());
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    guard.1 = true;
                    let body = Full::new(Bytes::from(req.uri().path().to_owned()))
                        .map_err(|never| match never {})
                        .boxed_unsync();
                    Ok(Response::new(ResponseBody::Own(body)))
                }
            };
            connection(io, &http1_builder(), service, token).await
        });
        let mut started = started;
        let mut client = h2_client(addr).await;
        // A stream the client resets: its answer is dropped, not finished.
        let (abandoned, mut abandoned_stream) =
            client.send_request(get("/gone"), false).expect("send");
        started.recv().await.expect("started");
        abandoned_stream.send_reset(Reason::CANCEL);
        drop(abandoned);
        tokio::time::timeout(Duration::from_secs(5), reset.recv())
            .await
            .expect("the answer was cancelled")
            .expect("signal");
        // A stream in flight when the drain starts is still answered.
        let (response, _) = client.send_request(get("/kept"), true).expect("send");
        started.recv().await.expect("started");
        drain.cancel();
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("in time")
            .expect("answered");
        assert_eq!(response.status(), 200);
        // Then the connection closes by itself.
        let ended = tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the connection closed")
            .expect("joined");
        assert!(ended.is_ok(), "{ended:?}");
    }

    /// Serves one connection on which the client writes `sent` and then
    /// nothing; how the serving ended.
    async fn silent_after(sent: &'static [u8]) -> Result<(), ServeError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let served = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            let io = Tracked::new(Stream::Plain(socket), Arc::new(Activity::new(true)));
            let service = |_: Request<ClientBody>| async { Ok(Response::new(ResponseBody::Empty)) };
            connection(io, &http1_builder(), service, CancellationToken::new()).await
        });
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(sent).await.expect("write");
        // Paused time moves on while everything waits on the sockets.
        let ended = served.await.expect("joined");
        drop(client);
        ended
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_http2_clients_are_cut_off() {
        // Half a preface: cut off like a slow head.
        let ended = silent_after(b"PRI * HTTP/2.0\r\n").await;
        assert!(matches!(ended, Err(ServeError::Slow)), "{ended:?}");
        // The preface and then silence (no SETTINGS, no PING answer): closed
        // by the keep-alive.
        let start = tokio::time::Instant::now();
        let ended = silent_after(PREFACE).await;
        assert!(ended.is_ok(), "{ended:?}");
        assert!(start.elapsed() <= KEEP_ALIVE_INTERVAL + 2 * KEEP_ALIVE_TIMEOUT);
    }

    #[tokio::test]
    async fn http1_after_sniffing_keeps_the_head_limit() {
        let addr = one_connection().await;
        let reply = exchange(
            addr,
            b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with("/a"), "{reply}");
        let addr = one_connection().await;
        let mut req = b"GET / HTTP/1.1\r\nhost: x\r\n".to_vec();
        for i in 0..80 {
            req.extend_from_slice(format!("x-filler-{i}: {}\r\n", "a".repeat(1000)).as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        let reply = exchange(addr, &req).await;
        assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    }
}
