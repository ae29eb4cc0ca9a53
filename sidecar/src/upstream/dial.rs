//! Opening upstream connections: a connect timeout, `TCP_NODELAY`, the
//! cluster's `max_connections` limit, counters, and the I/O wrapper
//! ([`Counted`]) that keeps a connection counted while it lives. Used by
//! the HTTP/1.1 and HTTP/2 connections ([`crate::upstream::h1`], [`crate::upstream::h2c`]), the
//! HTTP proxy's pool ([`crate::upstream::pool`]) and the TCP proxy; it knows none of
//! them.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::upstream::cluster::{Cluster, OwnedGauge, acquire_owned};

/// A map keyed by endpoint address, hashed cheaply: it is looked up on
/// every request, and its keys come from the registry, not from clients
/// (SipHash's flooding resistance buys nothing here).
pub type AddrMap<V> = HashMap<SocketAddr, V, std::hash::BuildHasherDefault<AddrHasher>>;

/// FxHash's mixing step per word written.
#[derive(Debug, Default, Clone, Copy)]
pub struct AddrHasher(u64);

impl AddrHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

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

    /// The connection again from [`Counted::into_parts`].
    pub fn from_parts(stream: TcpStream, slot: OwnedGauge) -> Self {
        Counted {
            stream,
            _slot: slot,
        }
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
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

/// Runs `sweep` on the pool every `every`, until the pool (the listener's
/// proxy) is gone or `sweep` says nothing is left. False when there is no
/// runtime to run it on (a body dropped while the runtime shuts down):
/// nothing is swept then.
pub fn spawn_sweeper<T: Send + Sync + 'static>(
    pool: Weak<T>,
    every: Duration,
    upstream: &str,
    sweep: fn(&T) -> bool,
) -> bool {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return false;
    };
    let span = tracing::debug_span!("upstream pool", upstream = %upstream);
    runtime.spawn(
        async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = pool.upgrade() else { return };
                if !sweep(&pool) {
                    return;
                }
            }
        }
        .instrument(span),
    );
    true
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
