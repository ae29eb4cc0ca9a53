//! Opening upstream connections: a connect timeout, `TCP_NODELAY`, the
//! cluster's `max_connections` limit, and counters; plus the I/O wrapper
//! that keeps the connection counted while it lives. Used both by the
//! pooled HTTP client (as its connector) and by the TCP proxy.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::cluster::{Cluster, OwnedGauge, acquire_owned};

/// Why a connection was not made; found again in hyper's error chain.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out after {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error("{0}: {1}")]
    Io(SocketAddr, #[source] io::Error),
    #[error("max_connections reached")]
    Limit,
    #[error("bad upstream authority {0:?}")]
    BadAddress(String),
}

/// A TCP connection counted in its cluster's open connections.
#[derive(Debug)]
pub struct Counted {
    stream: TcpStream,
    _slot: OwnedGauge,
}

impl Counted {
    pub fn into_parts(self) -> (TcpStream, OwnedGauge) {
        (self.stream, self._slot)
    }
}

/// Connects to `addr` for `cluster`, within its limits and timeout.
pub async fn connect(cluster: &Arc<Cluster>, addr: SocketAddr) -> Result<Counted, ConnectError> {
    let slot = acquire_owned(
        cluster,
        |g| &g.connections,
        cluster.config().limits.max_connections,
    )
    .ok_or(ConnectError::Limit)?;
    let timeout = cluster.config().connect_timeout;
    let attempt = tokio::time::timeout(timeout, TcpStream::connect(addr)).await;
    let stream = match attempt {
        Err(_) => {
            cluster
                .metrics
                .connect_failures
                .fetch_add(1, Ordering::Relaxed);
            return Err(ConnectError::Timeout(addr, timeout));
        }
        Ok(Err(e)) => {
            cluster
                .metrics
                .connect_failures
                .fetch_add(1, Ordering::Relaxed);
            return Err(ConnectError::Io(addr, e));
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    cluster.metrics.connections.fetch_add(1, Ordering::Relaxed);
    Ok(Counted {
        stream,
        _slot: slot,
    })
}

/// The pooled HTTP client's connector: the URI's authority is the
/// endpoint's `IP:PORT`.
#[derive(Debug, Clone)]
pub struct Connector {
    pub cluster: Arc<Cluster>,
}

impl tower::Service<Uri> for Connector {
    type Response = PooledIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<PooledIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let cluster = Arc::clone(&self.cluster);
        Box::pin(async move {
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
            let addr: SocketAddr = authority
                .parse()
                .map_err(|_| ConnectError::BadAddress(authority.to_owned()))?;
            let counted = connect(&cluster, addr).await?;
            Ok(PooledIo(TokioIo::new(counted)))
        })
    }
}

/// hyper's view of a counted connection.
#[derive(Debug)]
pub struct PooledIo(TokioIo<Counted>);

impl Connection for PooledIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for PooledIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PooledIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
}
