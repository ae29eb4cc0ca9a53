//! Idle timeouts on accepted connections: [`Tracked`] wraps a socket and
//! notes when bytes last moved; [`Activity::idle`] resolves when the
//! connection has been quiet too long — no byte at all within the first
//! `first_byte` (a client that connects and says nothing, which would
//! otherwise sit in protocol detection forever), an HTTP/1 request head
//! begun but not finished within `first_byte` (slowloris), or nothing
//! moving for `idle` while no request is in flight.
//!
//! The head timer starts at the first byte of a head, not when the
//! connection falls idle (as hyper's own `header_read_timeout` does), so
//! idle keep-alive connections stay open for `idle` and clients reusing
//! them do not race a 10 s close.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
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
    /// Milliseconds after `start` that the first byte of a request head
    /// arrived while no request was in flight; `u64::MAX` for none.
    head_since_ms: AtomicU64,
    /// Watch request heads (HTTP/1 listeners; off for TCP and once the
    /// HTTP/2 preface is seen).
    heads: AtomicBool,
    /// The first read has been looked at.
    first_read: AtomicBool,
}

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Activity {
    /// `http`: the connection carries HTTP, so request heads are timed.
    pub fn new(http: bool) -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(u64::MAX),
            in_flight: AtomicUsize::new(0),
            head_since_ms: AtomicU64::new(u64::MAX),
            heads: AtomicBool::new(http),
            first_read: AtomicBool::new(false),
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
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Bytes arrived from the client.
    fn received(&self, bytes: &[u8]) {
        let now = self.now_ms();
        self.last_ms.store(now, Ordering::Relaxed);
        if !self.first_read.swap(true, Ordering::Relaxed) {
            let n = bytes.len().min(H2_PREFACE.len());
            if n > 0 && H2_PREFACE.starts_with(&bytes[..n]) {
                // HTTP/2 has no heads to time here (its own limits apply).
                self.heads.store(false, Ordering::Relaxed);
            }
        }
        if self.heads.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since_ms.load(Ordering::Relaxed) == u64::MAX
        {
            self.head_since_ms.store(now, Ordering::Relaxed);
        }
    }

    /// A request head was parsed: the request is in flight until the guard
    /// drops.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since_ms.store(u64::MAX, Ordering::Relaxed);
        self.touch();
        Busy(Arc::clone(self))
    }

    /// Resolves once the connection counts as idle.
    pub async fn idle(&self, first_byte: Duration, idle: Duration) {
        loop {
            let now = self.start.elapsed();
            let last = self.last_ms.load(Ordering::Relaxed);
            let head = self.head_since_ms.load(Ordering::Relaxed);
            if head != u64::MAX
                && self.in_flight.load(Ordering::Relaxed) == 0
                && now.saturating_sub(Duration::from_millis(head)) >= first_byte
            {
                tracing::debug!("closing a connection whose request head took over {first_byte:?}");
                return;
            }
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
                let mut wait = idle.saturating_sub(quiet);
                if head != u64::MAX {
                    wait = wait.min(Duration::from_millis(250));
                }
                wait.max(Duration::from_millis(100))
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A future polled only when its own waker has fired (and the first
/// time), not on every wake of the task that awaits it. A connection's
/// task is woken for each request; its idle timer and retirement token
/// change a few times in its life, and polling them at every wake cost
/// more than parsing the request.
pub struct OnOwnWake<F> {
    inner: Pin<Box<F>>,
    flag: Arc<WakeFlag>,
    waker: Waker,
}

struct WakeFlag {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            task.wake_by_ref();
        }
    }
}

impl<F: Future> OnOwnWake<F> {
    pub fn new(inner: F) -> Self {
        let flag = Arc::new(WakeFlag {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        OnOwnWake {
            inner: Box::pin(inner),
            waker: Waker::from(Arc::clone(&flag)),
            flag,
        }
    }
}

impl<F: Future> Future for OnOwnWake<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        {
            let mut task = self.flag.task.lock().unwrap_or_else(|e| e.into_inner());
            if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
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
            self.activity.received(&buf.filled()[before..]);
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
    async fn on_own_wake_polls_only_after_its_waker_fired() {
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&polls);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut rx = Some(rx);
        let mut guarded = OnOwnWake::new(std::future::poll_fn(move |cx| {
            counted.fetch_add(1, Ordering::Relaxed);
            match rx.as_mut().map(|r| Pin::new(r).poll(cx)) {
                Some(Poll::Ready(_)) => Poll::Ready(7),
                _ => Poll::Pending,
            }
        }));
        let noop = Waker::noop();
        let mut cx = Context::from_waker(noop);
        assert!(Pin::new(&mut guarded).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut guarded).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut guarded).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polled once until woken");
        tx.send(()).expect("send");
        assert_eq!(guarded.await, 7);
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn silent_and_idle_connections_are_noticed() {
        let ms = Duration::from_millis;
        let a = Arc::new(Activity::new(true));
        let t = Instant::now();
        a.idle(ms(100), ms(300)).await;
        assert!(t.elapsed() >= ms(100) && t.elapsed() < ms(300));
        let a = Arc::new(Activity::new(true));
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
        // Half a head: cut after `first_byte`, though `idle` is long.
        let a = Arc::new(Activity::new(true));
        a.received(b"GET / HTTP/1.1\r\n");
        let t = Instant::now();
        a.idle(ms(200), Duration::from_secs(60)).await;
        assert!(t.elapsed() < ms(600));
        // An idle keep-alive connection (a request done, nothing since)
        // stays open.
        let a = Arc::new(Activity::new(true));
        a.received(b"GET / HTTP/1.1\r\n\r\n");
        drop(a.busy());
        assert!(
            tokio::time::timeout(ms(600), a.idle(ms(200), Duration::from_secs(60)))
                .await
                .is_err()
        );
        // HTTP/2 and TCP connections have no heads to time.
        for (a, bytes) in [
            (Activity::new(true), H2_PREFACE),
            (Activity::new(false), &b"GET"[..]),
        ] {
            a.received(bytes);
            assert!(
                tokio::time::timeout(ms(600), a.idle(ms(200), Duration::from_secs(60)))
                    .await
                    .is_err()
            );
        }
    }
}
