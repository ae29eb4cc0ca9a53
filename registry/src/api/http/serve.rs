//! The HTTP/1.1 accept loop for the REST API.
//!
//! Our own instead of `axum::serve`, for what a registry holding thousands of
//! parked blocking queries needs: HTTP/1.1 only (Consul's API is HTTP/1.1;
//! no protocol sniffing and no HTTP/2 state in every connection's task),
//! `TCP_NODELAY` on every socket (replies are small; Nagle plus delayed ACK
//! would hold them back 40 ms), a header read timeout against clients that
//! open connections and never finish a request, and graceful shutdown that
//! stops accepting, lets in-flight requests finish and closes idle
//! keep-alive connections.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

/// A request's headers must arrive within this long (Go's net/http has no
/// default; hyper's is 30 s too).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// After shutdown, connections get this long to finish what they are doing.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` is cancelled, then drains.
pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) {
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
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut app = app.clone();
            async move {
                let mut response = app.call(request).await.unwrap_or_else(|e| match e {});
                if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    // The rest of the body was not read, so hyper closes the
                    // connection after this response: say so, or a client
                    // reuses it and its next request fails.
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response)
            }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
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
        });
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
