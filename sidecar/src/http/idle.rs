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
    /// HTTP/2: a header block (HEADERS or PUSH_PROMISE without
    /// END_HEADERS) has begun and its last CONTINUATION has not come.
    /// Timed like an HTTP/1 head, whatever else is in flight: the `h2`
    /// crate holds a block in memory until it ends.
    block_pending: AtomicBool,
    /// Header blocks are watched (an HTTP/2 connection).
    watch_blocks: AtomicBool,
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
            block_pending: AtomicBool::new(false),
            watch_blocks: AtomicBool::new(false),
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

    /// The connection speaks HTTP/2: no HTTP/1 heads to time from here on
    /// (the preface counted as one until the server recognised it); its
    /// header blocks are timed instead (see [`Tracked::watch_h2_frames`]).
    pub fn http2(&self) {
        self.heads.store(false, Ordering::Relaxed);
        self.head_pending.store(false, Ordering::Relaxed);
        self.watch_blocks.store(true, Ordering::Relaxed);
    }

    /// Nothing in flight and no request head or header block begun: a
    /// kept-alive connection waiting for its next request.
    pub fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && !self.head_pending.load(Ordering::Relaxed)
            && !self.block_pending.load(Ordering::Relaxed)
    }

    /// An HTTP/2 header block began (`true`) or ended.
    fn header_block(&self, pending: bool) {
        if self.block_pending.swap(pending, Ordering::Relaxed) != pending
            && pending
            && self.watcher_asleep.swap(false, Ordering::Relaxed)
        {
            self.head_started.notify_one();
        }
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
            let block = self.block_pending.load(Ordering::Relaxed);
            let pending = self.head_pending.load(Ordering::Relaxed);
            if (pending && !in_flight) || block {
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
            let long = wait > glance
                && (self.heads.load(Ordering::Relaxed)
                    || self.watch_blocks.load(Ordering::Relaxed));
            self.watcher_asleep.store(long, Ordering::Relaxed);
            if long
                && ((!pending && self.head_pending.load(Ordering::Relaxed))
                    || (!block && self.block_pending.load(Ordering::Relaxed)))
            {
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
    /// HTTP/2: where the client's frames begin and end.
    frames: Option<FrameWatch>,
}

/// Follows the frame boundaries of what an HTTP/2 client sends (after the
/// 24-byte preface), to see when a header block begins and ends. Reads
/// only the 9-byte frame headers; payloads are skipped by length.
#[derive(Debug)]
struct FrameWatch {
    /// Preface bytes still to skip.
    preface: usize,
    header: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    payload: usize,
}

impl FrameWatch {
    const HEADERS: u8 = 0x1;
    const PUSH_PROMISE: u8 = 0x5;
    const CONTINUATION: u8 = 0x9;
    const END_HEADERS: u8 = 0x4;

    fn new() -> Self {
        FrameWatch {
            preface: 24,
            header: [0; 9],
            have: 0,
            payload: 0,
        }
    }

    /// Feeds bytes the client sent; calls `block(true)` when a header
    /// block begins and `block(false)` when it ends.
    fn feed(&mut self, mut bytes: &[u8], block: impl Fn(bool)) {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                bytes = &bytes[n..];
            } else if self.payload > 0 {
                let n = self.payload.min(bytes.len());
                self.payload -= n;
                bytes = &bytes[n..];
            } else {
                let n = (9 - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == 9 {
                    self.have = 0;
                    let h = &self.header;
                    self.payload =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    let ends = flags & Self::END_HEADERS != 0;
                    match kind {
                        Self::HEADERS | Self::PUSH_PROMISE => block(!ends),
                        Self::CONTINUATION if ends => block(false),
                        _ => {}
                    }
                }
            }
        }
    }
}

impl<T> Tracked<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Tracked {
            inner,
            activity,
            unread: Bytes::new(),
            frames: None,
        }
    }

    /// The connection speaks HTTP/2 (its preface is the next thing read,
    /// from [`Tracked::unread`] or the socket): time its header blocks.
    pub fn watch_h2_frames(&mut self) {
        self.activity.http2();
        self.frames = Some(FrameWatch::new());
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
            let this = &mut *self;
            if let Some(frames) = &mut this.frames {
                let activity = &this.activity;
                frames.feed(&this.unread[..n], |b| activity.header_block(b));
            }
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
            let this = &mut *self;
            if let Some(frames) = &mut this.frames {
                let activity = &this.activity;
                frames.feed(&buf.filled()[before..], |b| activity.header_block(b));
            }
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
        // An HTTP/2 header block left unfinished is cut after
        // `first_byte`, even with a request in flight on the connection.
        let a = Arc::new(Activity::new(true));
        a.received();
        a.http2();
        let busy = a.busy();
        a.header_block(true);
        let t = Instant::now();
        tokio::time::timeout(ms(1000), a.idle(ms(200), Duration::from_secs(60)))
            .await
            .expect("an unfinished header block is cut");
        assert!(t.elapsed() >= ms(150), "{:?}", t.elapsed());
        drop(busy);
        // A block that ends in time stops the clock.
        let a = Arc::new(Activity::new(true));
        a.received();
        a.http2();
        let busy = a.busy();
        let watch = a.idle(ms(200), Duration::from_secs(60));
        tokio::pin!(watch);
        a.header_block(true);
        assert!(tokio::time::timeout(ms(100), watch.as_mut()).await.is_err());
        a.header_block(false);
        assert!(tokio::time::timeout(ms(600), watch.as_mut()).await.is_err());
        drop(busy);
        // HTTP/2 (once the server has recognised it) and TCP connections
        // have no HTTP/1 heads to time.
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

    #[test]
    fn header_blocks_are_followed_across_any_split() {
        let frame = |kind: u8, flags: u8, payload: &[u8]| {
            let len = payload.len();
            let mut f = vec![
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                kind,
                flags,
                0,
                0,
                0,
                1,
            ];
            f.extend_from_slice(payload);
            f
        };
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(0x4, 0, &[0; 6])); // SETTINGS
        wire.extend(frame(0x1, 0x1, &[7; 40])); // HEADERS, END_STREAM, no END_HEADERS
        wire.extend(frame(0x9, 0, &[8; 30])); // CONTINUATION
        let open_at = wire.len();
        wire.extend(frame(0x9, 0x4, &[9; 20])); // CONTINUATION, END_HEADERS
        let closed_at = wire.len();
        wire.extend(frame(0x1, 0x4 | 0x1, &[1; 10])); // a whole HEADERS
        for split in 1..wire.len() {
            let events = std::cell::RefCell::new(Vec::new());
            let mut watch = FrameWatch::new();
            for chunk in [&wire[..split], &wire[split..]] {
                watch.feed(chunk, |b| events.borrow_mut().push(b));
            }
            assert_eq!(*events.borrow(), [true, false, false], "split at {split}");
        }
        // Byte by byte, the block is open exactly between its first and
        // last frame.
        let open = std::cell::Cell::new(false);
        let mut watch = FrameWatch::new();
        for (i, byte) in wire.iter().enumerate() {
            watch.feed(std::slice::from_ref(byte), |b| open.set(b));
            if i + 1 >= closed_at {
                assert!(!open.get(), "closed after byte {i}");
            } else if i >= 24 + 15 + 9 && i < open_at {
                assert!(open.get(), "open at byte {i}");
            }
        }
    }
}
