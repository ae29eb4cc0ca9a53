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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// What a connection did. No clock is read per read or write: I/O bumps
/// a counter, and [`Activity::idle`] notes the time when it sees the
/// counter move.
#[derive(Debug)]
pub struct Activity {
    /// Bumped whenever bytes move or a request starts; 0 until the first.
    moved: AtomicU64,
    /// Requests being answered on this connection.
    in_flight: AtomicUsize,
    /// A request head has begun (while no request was in flight) and is
    /// not complete yet.
    head_pending: AtomicBool,
    /// Watch request heads (HTTP/1 listeners; off for TCP and once the
    /// server has seen the HTTP/2 preface).
    heads: AtomicBool,
    /// The watcher sleeps longer than a quarter of the head timeout: a
    /// head that begins must wake it (see `received`).
    watcher_asleep: AtomicBool,
    head_started: Notify,
}

impl Activity {
    /// `http`: the connection carries HTTP, so request heads are timed.
    pub fn new(http: bool) -> Self {
        Activity {
            moved: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            head_pending: AtomicBool::new(false),
            heads: AtomicBool::new(http),
            watcher_asleep: AtomicBool::new(false),
            head_started: Notify::new(),
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
        self.moved.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes arrived from the client.
    fn received(&self) {
        self.touch();
        if self.heads.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && !self.head_pending.swap(true, Ordering::Relaxed)
            && self.watcher_asleep.swap(false, Ordering::Relaxed)
        {
            // At most once per long sleep of the watcher, not per request.
            self.head_started.notify_one();
        }
    }

    /// The connection speaks HTTP/2: no heads to time from here on (the
    /// preface counted as one until the server recognised it).
    pub fn http2(&self) {
        self.heads.store(false, Ordering::Relaxed);
        self.head_pending.store(false, Ordering::Relaxed);
    }

    /// A request head was parsed: the request is in flight until the guard
    /// drops.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_pending.store(false, Ordering::Relaxed);
        self.touch();
        Busy(Arc::clone(self))
    }

    /// Resolves once the connection counts as idle: no byte within
    /// `first_byte` of the start, a request head (fresh or on a kept-alive
    /// connection) unfinished `first_byte` (and up to a quarter more on a
    /// busy connection) after its first byte, or
    /// nothing moving for `idle` (up to a quarter more) while no request is
    /// in flight.
    pub async fn idle(&self, first_byte: Duration, idle: Duration) {
        let start = Instant::now();
        let mut seen = 0;
        let mut active_at = start;
        let mut head_at: Option<Instant> = None;
        let mut head_woke: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let moved = self.moved.load(Ordering::Relaxed);
            if moved != seen {
                seen = moved;
                active_at = now;
            }
            let in_flight = self.in_flight.load(Ordering::Relaxed) > 0;
            let mut wait = if seen == 0 {
                let waited = now - start;
                if waited >= first_byte {
                    tracing::debug!("closing a connection that sent nothing for {first_byte:?}");
                    return;
                }
                first_byte - waited
            } else {
                let quiet = now - active_at;
                if quiet >= idle && !in_flight {
                    tracing::debug!("closing a connection idle for {idle:?}");
                    return;
                }
                idle.saturating_sub(quiet).min(idle / 4)
            };
            let pending = self.head_pending.load(Ordering::Relaxed);
            if pending && !in_flight {
                let since = *head_at.get_or_insert(now);
                if now - since >= first_byte {
                    tracing::debug!(
                        "closing a connection whose request head took over {first_byte:?}"
                    );
                    return;
                }
                wait = wait.min(first_byte - (now - since));
            } else {
                head_at = None;
            }
            let mut wait = wait.max(Duration::from_millis(50));
            // Sleeps longer than this need a beginning head to wake the
            // watcher, so the head is timed from its first byte.
            let glance = first_byte / 4;
            if head_woke.is_some_and(|t| now - t < first_byte) {
                // A head woke the watcher lately: glance again soon
                // rather than sleeping long, so a busy connection wakes it
                // once per `first_byte`, not per request. A head begun
                // meanwhile is cut within `first_byte` and a glance.
                wait = wait.min(glance);
            }
            let long = wait > glance && self.heads.load(Ordering::Relaxed);
            self.watcher_asleep.store(long, Ordering::Relaxed);
            if long && !pending && self.head_pending.load(Ordering::Relaxed) {
                // A head began between the look above and now: look again
                // (once; a head already seen is timed by `wait`, and looking
                // again for it would spin until its deadline).
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.head_started.notified(), if long => head_woke = Some(Instant::now()),
            }
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
    /// The awaiting task (lock-free: registered at every poll).
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> OnOwnWake<F> {
    pub fn new(inner: F) -> Self {
        let flag = Arc::new(WakeFlag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
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
        self.flag.task.register(cx.waker());
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
    /// Bytes already read (to tell the protocols apart), read again first.
    unread: Bytes,
}

impl<T> Tracked<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Tracked {
            inner,
            activity,
            unread: Bytes::new(),
        }
    }

    /// The activity this socket records.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Puts `bytes` (read from this socket) back in front of what it gives
    /// next; they were counted as activity when first read.
    pub fn unread(&mut self, bytes: Bytes) {
        self.unread = bytes;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread[..n]);
            self.unread.advance(n);
            if self.unread.is_empty() {
                // Freed: an idle connection keeps only what its server holds.
                self.unread = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.received();
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

    /// On tokio's paused clock, so the bounds below are exact and not at
    /// the mercy of a busy machine. A watcher that spins instead of sleeping
    /// never lets that clock move: the real-time limit turns it into a
    /// failure rather than a hang.
    #[test]
    fn silent_and_idle_connections_are_noticed() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("runtime");
            rt.block_on(silent_and_idle_connections_are_noticed_on_paused_time());
            let _ = done.send(());
        });
        match finished.recv_timeout(Duration::from_secs(30)) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("the idle watcher spun: paused time never advanced")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the checks failed (see the panic above)")
            }
        }
    }

    async fn silent_and_idle_connections_are_noticed_on_paused_time() {
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
        a.received();
        let t = Instant::now();
        a.idle(ms(200), Duration::from_secs(60)).await;
        assert!(t.elapsed() < ms(600));
        // Half a head arriving after the watcher started on a fresh
        // connection: timed from its first byte.
        let a = Arc::new(Activity::new(true));
        let watch = a.idle(ms(400), Duration::from_secs(60));
        tokio::pin!(watch);
        assert!(tokio::time::timeout(ms(100), watch.as_mut()).await.is_err());
        a.received();
        let t = Instant::now();
        tokio::time::timeout(ms(600), watch)
            .await
            .expect("timed from the first byte, not from the watcher's next look");
        assert!(t.elapsed() >= ms(350), "{:?}", t.elapsed());
        // Half a head on a kept-alive connection, after the watcher went
        // to sleep for the long idle timeout: cut after `first_byte` too.
        let a = Arc::new(Activity::new(true));
        a.received();
        drop(a.busy());
        let watch = a.idle(ms(200), Duration::from_secs(60));
        tokio::pin!(watch);
        assert!(tokio::time::timeout(ms(300), watch.as_mut()).await.is_err());
        a.received();
        let t = Instant::now();
        tokio::time::timeout(ms(1000), watch)
            .await
            .expect("a slow head on a kept-alive connection is cut");
        assert!(t.elapsed() >= ms(150), "{:?}", t.elapsed());
        // An idle keep-alive connection (a request done, nothing since)
        // stays open.
        let a = Arc::new(Activity::new(true));
        a.received();
        drop(a.busy());
        assert!(
            tokio::time::timeout(ms(600), a.idle(ms(200), Duration::from_secs(60)))
                .await
                .is_err()
        );
        // HTTP/2 (once the server has recognised it) and TCP connections
        // have no heads to time.
        let h2 = Activity::new(true);
        h2.received();
        h2.http2();
        let tcp = Activity::new(false);
        tcp.received();
        for a in [h2, tcp] {
            assert!(
                tokio::time::timeout(ms(600), a.idle(ms(200), Duration::from_secs(60)))
                    .await
                    .is_err()
            );
        }
    }
}
