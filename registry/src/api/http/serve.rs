//! The HTTP/1.1 accept loop for the REST API.
//!
//! Our own instead of `axum::serve`, for what a registry holding thousands of
//! parked blocking queries needs: HTTP/1.1 only (Consul's API is HTTP/1.1;
//! no protocol sniffing and no HTTP/2 state in every connection's task),
//! `TCP_NODELAY` on every socket (replies are small; Nagle plus delayed ACK
//! would hold them back 40 ms), a header read timeout against clients that
//! open connections and never finish a request, and graceful shutdown that
//! stops accepting, lets in-flight requests finish and closes idle
//! keep-alive connections. A connection closed after an early refusal (a
//! 413 while the client is still sending its body) lingers: the rest of
//! what the client sends is read and dropped, bounded in bytes and time,
//! so the client reads the answer instead of a reset.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

/// A request's headers must arrive within this long (Go's net/http has no
/// default; hyper's is 30 s too).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// After shutdown, connections get this long to finish what they are doing.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A lingering close reads and drops at most this much, for at most this
/// long (a refused body is at most a few MiB in flight).
const LINGER_BYTES: usize = 16 << 20;
const LINGER_TIME: Duration = Duration::from_secs(5);

/// The client's socket as hyper drives it; when hyper lets go of it after
/// an early refusal, it is handed to [`linger`] instead of being closed
/// with unread bytes (which sends a reset that can overtake the answer).
struct Lingering {
    stream: Option<TcpStream>,
    /// Set by the service when it answers before reading the body.
    refused_early: Arc<AtomicBool>,
}

impl Drop for Lingering {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take()
            && self.refused_early.load(Ordering::Relaxed)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(linger(stream));
        }
    }
}

/// Finishes sending, then reads and drops what the client still sends
/// until it closes, [`LINGER_BYTES`] or [`LINGER_TIME`].
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_write(cx, data),
            None => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// One connection until it ends, or until shutdown asks it to finish what
/// it is doing.
async fn serve_connection<IO, S>(
    builder: hyper::server::conn::http1::Builder,
    io: IO,
    service: S,
    shutdown: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming> + Send + 'static,
    S::Future: Send,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::trace!(error = %e, "HTTP connection ended with an error");
            }
            return;
        }
        () = shutdown.cancelled() => connection.as_mut().graceful_shutdown(),
    }
    if let Err(e) = connection.await {
        tracing::trace!(error = %e, "HTTP connection ended with an error");
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then drains.
/// With `tls`, each connection first finishes a TLS handshake (HTTPS).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: the listener stays
                // good, so back off briefly instead of spinning.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY failed");
        }
        let app = app.clone();
        let refused_early = Arc::new(AtomicBool::new(false));
        let refused = Arc::clone(&refused_early);
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut app = app.clone();
            let refused = Arc::clone(&refused);
            async move {
                let mut response = app.call(request).await.unwrap_or_else(|e| match e {});
                if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    // The rest of the body was not read, so hyper closes the
                    // connection after this response: say so, or a client
                    // reuses it and its next request fails; and linger, so
                    // the client reads this answer rather than a reset.
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    refused.store(true, Ordering::Relaxed);
                }
                Ok::<_, Infallible>(response)
            }
        });
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        match tls.clone() {
            None => {
                let io = Lingering {
                    stream: Some(stream),
                    refused_early,
                };
                connections.spawn(serve_connection(builder, io, service, shutdown));
            }
            Some(config) => {
                connections.spawn(async move {
                    // The handshake runs in the connection's own task: a
                    // slow or silent client holds up no one else.
                    match crate::tls::io::accept(stream, config).await {
                        Ok(io) => serve_connection(builder, io, service, shutdown).await,
                        Err(e) => tracing::debug!(error = %e, "HTTPS handshake failed"),
                    }
                });
            }
        }
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "HTTP connections still open after the drain timeout; closing them"
        );
    }
}
