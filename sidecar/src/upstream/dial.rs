//! Opening upstream connections: a connect timeout, `TCP_NODELAY`, the
//! cluster's `max_connections` limit, mutual TLS to endpoints that have a
//! sidecar in front (the mesh leaf presented, the server's chain and
//! SPIFFE ID checked: see [`crate::tls::trust`]), counters, and the I/O wrapper
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

use crate::tls::expiry::LeafStamp;
use crate::tls::mesh::{Alpn, NotReady};
use crate::tls::stream::{ClientStream, Stream};
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
    /// The endpoint's sidecar cannot be dialled yet: no leaf or roots.
    #[error("{0}")]
    MeshNotReady(#[source] NotReady),
    /// The TLS handshake with the endpoint's sidecar failed.
    #[error("mesh TLS handshake with {0} failed: {1}")]
    Tls(SocketAddr, #[source] io::Error),
}

/// A connection (plain, or TLS to a sidecar) counted in its cluster's
/// open connections.
#[derive(Debug)]
pub struct Counted {
    stream: ClientStream,
    _slot: OwnedGauge,
    /// Mesh TLS: the leaf it presented, so that the pool retires it once
    /// that leaf is renewed (see [`crate::tls::expiry`]). `None`: plain.
    leaf: Option<LeafStamp>,
}

impl Counted {
    pub fn into_parts(self) -> (ClientStream, OwnedGauge, Option<LeafStamp>) {
        (self.stream, self._slot, self.leaf)
    }

    /// The connection again from [`Counted::into_parts`].
    pub fn from_parts(stream: ClientStream, slot: OwnedGauge, leaf: Option<LeafStamp>) -> Self {
        Counted {
            stream,
            _slot: slot,
            leaf,
        }
    }

    /// The leaf a mesh connection was made with (`None`: plain).
    pub fn leaf(&self) -> Option<LeafStamp> {
        self.leaf
    }

    pub fn stream(&mut self) -> &mut ClientStream {
        &mut self.stream
    }
}

/// Connects to `addr` for `cluster`, within its limits and timeout; an
/// endpoint with a sidecar in front gets mutual TLS (the handshake within
/// the same timeout).
pub async fn connect(cluster: &Arc<Cluster>, addr: SocketAddr) -> Result<Counted, ConnectError> {
    // The mesh config first: without a leaf, no connection is made at all.
    let tls = match &cluster.mesh {
        Some(mesh) if cluster.table().is_sidecar(addr) => {
            let config = cluster.config();
            let client = mesh
                .dial_config(&config.name, Alpn::of(config.protocol))
                .map_err(ConnectError::MeshNotReady)?;
            Some((mesh, client))
        }
        _ => None,
    };
    let slot = acquire_owned(
        cluster,
        |g| &g.connections,
        cluster.config().limits.max_connections,
    )
    .ok_or(ConnectError::Limit)?;
    let timeout = cluster.config().connect_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let attempt = tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await;
    let failed = |e| {
        cluster
            .metrics
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
        Err(e)
    };
    let stream = match attempt {
        Err(_) => return failed(ConnectError::Timeout(addr, timeout)),
        Ok(Err(e)) => return failed(ConnectError::Io(addr, e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let leaf = tls.as_ref().map(|(_, (_, stamp))| *stamp);
    let stream = match tls {
        None => Stream::Plain(stream),
        Some((mesh, (client, _))) => {
            // No SNI (an IP address); the server is known by its SPIFFE ID.
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            let handshake = tokio_rustls::TlsConnector::from(client).connect(name, stream);
            match tokio::time::timeout_at(deadline, handshake).await {
                Err(_) => return failed(ConnectError::Timeout(addr, timeout)),
                Ok(Err(e)) => {
                    mesh.handshake_failed("outbound", &e);
                    tracing::debug!(upstream = %cluster.config().name, endpoint = %addr, error = %e, "mesh TLS handshake failed");
                    return failed(ConnectError::Tls(addr, e));
                }
                Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
            }
        }
    };
    cluster.metrics.connections.fetch_add(1, Ordering::Relaxed);
    Ok(Counted {
        stream,
        _slot: slot,
        leaf,
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
