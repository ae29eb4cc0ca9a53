//! Idle timeouts on accepted connections: [`Tracked`] wraps a socket and
//! notes when bytes last moved; [`Activity::idle`] resolves when the
//! connection has been quiet too long — no byte at all within the first
//! `first_byte` (a client that connects and says nothing, which would
//! otherwise sit in protocol detection forever), or nothing moving for
//! `idle` while no request is in flight.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// What a connection did and when.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds after `start` that bytes last moved; `u64::MAX` until
    /// the first byte arrives.
    last_ms: AtomicU64,
    /// Requests being answered on this connection.
    in_flight: AtomicUsize,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(u64::MAX),
            in_flight: AtomicUsize::new(0),
        }
    }
}

/// Counts a request in flight on a connection until dropped.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(Arc::clone(self))
    }

    /// Resolves once the connection counts as idle.
    pub async fn idle(&self, first_byte: Duration, idle: Duration) {
        loop {
            let now = self.start.elapsed();
            let last = self.last_ms.load(Ordering::Relaxed);
            let wait = if last == u64::MAX {
                if now >= first_byte {
                    tracing::debug!("closing a connection that sent nothing for {first_byte:?}");
                    return;
                }
                first_byte - now
            } else {
                let quiet = now.saturating_sub(Duration::from_millis(last));
                if quiet >= idle && self.in_flight.load(Ordering::Relaxed) == 0 {
                    tracing::debug!("closing a connection idle for {idle:?}");
                    return;
                }
                idle.saturating_sub(quiet).max(Duration::from_millis(100))
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A socket that records activity on every read and write.
#[derive(Debug)]
pub struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Tracked<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Tracked { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn silent_and_idle_connections_are_noticed() {
        let ms = Duration::from_millis;
        let a = Arc::new(Activity::default());
        let t = Instant::now();
        a.idle(ms(100), ms(300)).await;
        assert!(t.elapsed() >= ms(100) && t.elapsed() < ms(300));
        let a = Arc::new(Activity::default());
        let busy = a.busy();
        let idle = a.idle(ms(100), ms(300));
        tokio::pin!(idle);
        assert!(
            tokio::time::timeout(ms(700), idle.as_mut()).await.is_err(),
            "a request in flight keeps it open"
        );
        drop(busy);
        tokio::time::timeout(ms(500), idle)
            .await
            .expect("idle once the request is done");
    }
}
