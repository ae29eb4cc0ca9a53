//! Watch streams: every topic somebody follows has one feed, kept current
//! by one task that follows the applied index. A change is diffed and
//! encoded once per topic and the same bytes go to every subscriber;
//! applying to the state machine never waits on a subscriber (the feed
//! task only takes the state's read lock, and subscribers read from a
//! bounded broadcast channel: one that falls behind is cut off with
//! RESOURCE_EXHAUSTED and resumes from its last index).
//!
//! A subscriber reconnecting with `since_index` gets only what it missed:
//! from the feed's own history of changes (up to [`HubConfig::history`]) when
//! the feed has it, else as one CHANGE diffed against the state at that
//! index, which every server keeps for its last applied entries (so a
//! client can resume on another server). Past both, a fresh snapshot.

pub mod topic;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshwork_proto::v1::watch_event::Kind;
use meshwork_proto::v1::{Change, WatchEvent};
use prost::Message;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::raft::state_machine::SharedState;
use crate::state::State;
use topic::Contents;
pub use topic::Topic;

/// Tunables of the watch hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Changes kept per topic for resuming subscribers.
    pub history: usize,
    /// Changes a subscriber may fall behind before it is cut off.
    pub lag_limit: usize,
    /// A heartbeat goes out after this long without a change.
    pub heartbeat: Duration,
    /// Items per SNAPSHOT message.
    pub snapshot_chunk: usize,
    /// A feed without subscribers is dropped after this long.
    pub idle_feed_ttl: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            history: 1024,
            lag_limit: 1024,
            heartbeat: Duration::from_secs(10),
            snapshot_chunk: 256,
            idle_feed_ttl: Duration::from_secs(60),
        }
    }
}

/// `event` as one gRPC length-prefixed message (the 5-byte prefix, then
/// the encoded `WatchEvent`): what goes into a DATA frame as it is, so every
/// subscriber sends the same bytes without copying them.
pub fn grpc_frame(event: &WatchEvent) -> Bytes {
    let len = event.encoded_len();
    let mut buf = Vec::with_capacity(5 + len);
    buf.push(0); // not compressed
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    event.encode_raw(&mut buf);
    Bytes::from(buf)
}

/// One encoded `WatchEvent` and the index it carries.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub index: u64,
    /// The event as a gRPC message, prefix included ([`grpc_frame`]).
    pub frame: Bytes,
}

impl Encoded {
    fn new(event: &WatchEvent) -> Arc<Self> {
        Arc::new(Self {
            index: event.index,
            frame: grpc_frame(event),
        })
    }
}

#[derive(Debug)]
struct FeedInner {
    /// Index of the last change to the topic that the feed has seen.
    index: u64,
    contents: Contents,
    history: VecDeque<Arc<Encoded>>,
    /// Changes after this index are all in `history`.
    floor: u64,
    idle_since: Option<Instant>,
    /// The SNAPSHOT messages of `contents` at `index`, encoded once and
    /// shared by every new subscriber until the topic changes.
    snapshot: Option<Arc<[Bytes]>>,
}

impl FeedInner {
    fn snapshot(&mut self, chunk: usize) -> Arc<[Bytes]> {
        if let Some(snapshot) = &self.snapshot {
            return Arc::clone(snapshot);
        }
        let items: Vec<&Change> = self.contents.values().collect();
        let mut encoded: Vec<Bytes> = items
            .chunks(chunk.max(1))
            .enumerate()
            .map(|(i, part)| {
                grpc_frame(&WatchEvent {
                    kind: Kind::Snapshot as i32,
                    index: self.index,
                    reset: i == 0,
                    resumed: false,
                    changes: part.iter().map(|c| (*c).clone()).collect(),
                })
            })
            .collect();
        if encoded.is_empty() {
            // An empty topic still resets the client.
            encoded.push(grpc_frame(&WatchEvent {
                kind: Kind::Snapshot as i32,
                index: self.index,
                reset: true,
                ..Default::default()
            }));
        }
        let snapshot: Arc<[Bytes]> = encoded.into();
        self.snapshot = Some(Arc::clone(&snapshot));
        snapshot
    }
}

#[derive(Debug)]
struct Feed {
    topic: Topic,
    inner: Mutex<FeedInner>,
    tx: broadcast::Sender<Arc<Encoded>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Feed {
    fn new(topic: Topic, state: &State, lag_limit: usize) -> Self {
        let index = topic.index(state);
        let (tx, _) = broadcast::channel(lag_limit.max(1));
        Self {
            inner: Mutex::new(FeedInner {
                index,
                contents: topic.contents(state),
                history: VecDeque::new(),
                floor: index,
                idle_since: None,
                snapshot: None,
            }),
            topic,
            tx,
        }
    }

    /// Catches up with `state`; publishes one CHANGE if the topic changed.
    fn update(&self, state: &State, history: usize) {
        let mut inner = lock(&self.inner);
        if !self.topic.may_have_changed(state, inner.index) {
            return;
        }
        let index = self.topic.index(state);
        if index == inner.index {
            return;
        }
        let contents = self.topic.contents(state);
        let changes = self.topic.diff(&inner.contents, &contents);
        inner.contents = contents;
        inner.snapshot = None;
        let index = if index > inner.index {
            index
        } else {
            // Only a restored snapshot can move a topic back; subscribers
            // must not see an index regression, so report the change at
            // the applied index instead.
            tracing::warn!(topic = ?self.topic, from = inner.index, to = index, "topic index went back");
            state.last_index.max(inner.index + 1)
        };
        inner.index = index;
        if changes.is_empty() {
            return;
        }
        let event = Encoded::new(&WatchEvent {
            kind: Kind::Change as i32,
            index,
            reset: false,
            resumed: false,
            changes,
        });
        inner.history.push_back(Arc::clone(&event));
        while inner.history.len() > history {
            if let Some(old) = inner.history.pop_front() {
                inner.floor = old.index;
            }
        }
        // No receivers is fine: the history still serves resumes.
        let _ = self.tx.send(event);
    }
}

/// Why a subscription could not start.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("{0}")]
    InvalidTopic(String),
    #[error(
        "this server has applied up to index {applied}, behind since_index {since}; retry or use another server"
    )]
    Behind { applied: u64, since: u64 },
    #[error("server shutting down; subscribe elsewhere")]
    ShuttingDown,
}

/// A started subscription: what to send first, then the live feed. Every
/// `Bytes` here is a whole gRPC message, prefix included ([`grpc_frame`]).
/// The live channel closes when the server shuts down.
#[derive(Debug)]
pub struct Subscription {
    pub initial: Vec<Bytes>,
    /// Index of the last event in `initial`.
    pub index: u64,
    pub live: broadcast::Receiver<Arc<Encoded>>,
    pub heartbeat: Duration,
    pub processed: Processed,
}

/// The applied index up to which the hub has published every change.
#[derive(Debug, Clone)]
pub struct Processed(Arc<AtomicU64>);

impl Processed {
    /// Read it *before* finding the live channel empty: then every change
    /// up to it has been received.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

impl Subscription {
    /// A heartbeat: nothing changed in the topic up to `index`.
    pub fn heartbeat_event(index: u64) -> Bytes {
        grpc_frame(&WatchEvent {
            kind: Kind::Heartbeat as i32,
            index,
            ..Default::default()
        })
    }
}

/// All feeds of one server.
#[derive(Debug)]
pub struct Hub {
    state: Arc<SharedState>,
    /// The applied index the feeds were last brought up to.
    processed: Arc<AtomicU64>,
    /// `None` once the hub has shut down: dropping the feeds closed every
    /// subscriber's channel, and no new subscription starts.
    feeds: Mutex<Option<HashMap<Topic, Arc<Feed>>>>,
    config: HubConfig,
}

impl Hub {
    pub fn new(state: Arc<SharedState>, config: HubConfig) -> Arc<Self> {
        Arc::new(Self {
            processed: Arc::new(AtomicU64::new(state.applied_index())),
            state,
            feeds: Mutex::new(Some(HashMap::new())),
            config,
        })
    }

    /// Number of topics with a feed (for metrics and tests).
    pub fn feeds(&self) -> usize {
        lock(&self.feeds).as_ref().map_or(0, HashMap::len)
    }

    /// Starts a subscription to `topic` after `since_index` (0 = none).
    pub async fn subscribe(
        &self,
        topic: Topic,
        since_index: u64,
    ) -> Result<Subscription, SubscribeError> {
        if since_index > self.state.applied_index() {
            // The client saw more than this server has applied: wait a
            // little for it to catch up rather than show an older state.
            let mut applied = self.state.subscribe();
            let caught_up = tokio::time::timeout(
                Duration::from_secs(5),
                applied.wait_for(|i| *i >= since_index),
            )
            .await;
            if !matches!(caught_up, Ok(Ok(_))) {
                return Err(SubscribeError::Behind {
                    applied: self.state.applied_index(),
                    since: since_index,
                });
            }
        }
        let feed = {
            let mut feeds = lock(&self.feeds);
            let Some(feeds) = feeds.as_mut() else {
                return Err(SubscribeError::ShuttingDown);
            };
            match feeds.get(&topic) {
                Some(feed) => Arc::clone(feed),
                None => {
                    let state = self.state.read();
                    let feed = Arc::new(Feed::new(topic.clone(), &state, self.config.lag_limit));
                    drop(state);
                    feeds.insert(topic, Arc::clone(&feed));
                    feed
                }
            }
        };
        // A client resuming from an index this feed has no history for (it
        // was subscribed elsewhere): diff against the state at that index.
        let past = (since_index > 0)
            .then(|| self.state.version_at(since_index))
            .flatten();
        let mut inner = lock(&feed.inner);
        // Subscribing under the feed's lock: no change can fall between
        // what `initial` covers and what `live` delivers.
        let live = feed.tx.subscribe();
        inner.idle_since = None;
        let mut initial = Vec::new();
        // Everything after `floor` is in the history, and (waited for above)
        // this server has applied at least `since_index`.
        let from_history = since_index > 0 && since_index >= inner.floor;
        let resumable = from_history || past.is_some();
        if from_history {
            initial.extend(
                inner
                    .history
                    .iter()
                    .filter(|e| e.index > since_index)
                    .map(|e| e.frame.clone()),
            );
        } else if let Some(past) = &past {
            // One CHANGE with everything that differs, at the topic's index.
            let changes = feed.topic.diff(&feed.topic.contents(past), &inner.contents);
            if !changes.is_empty() {
                initial.push(grpc_frame(&WatchEvent {
                    kind: Kind::Change as i32,
                    index: inner.index.max(since_index + 1),
                    reset: false,
                    resumed: false,
                    changes,
                }));
            }
        } else {
            initial.extend(inner.snapshot(self.config.snapshot_chunk).iter().cloned());
        }
        let index = if resumable {
            inner.index.max(since_index)
        } else {
            inner.index
        };
        initial.push(grpc_frame(&WatchEvent {
            kind: Kind::EndOfSnapshot as i32,
            index,
            reset: false,
            resumed: resumable,
            changes: Vec::new(),
        }));
        Ok(Subscription {
            initial,
            index,
            live,
            heartbeat: self.config.heartbeat,
            processed: Processed(Arc::clone(&self.processed)),
        })
    }

    /// Keeps every feed current until `shutdown`. Runs on its own task; it
    /// only ever takes the state's read lock. When it returns, every feed
    /// is dropped, which closes every subscriber's channel (their streams
    /// end with UNAVAILABLE), and no new subscription starts.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        self.follow(shutdown).await;
        let feeds = lock(&self.feeds).take();
        drop(feeds);
    }

    async fn follow(&self, shutdown: CancellationToken) {
        let mut applied = self.state.subscribe();
        loop {
            tokio::select! {
                changed = applied.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep(self.config.idle_feed_ttl) => {}
                () = shutdown.cancelled() => return,
            }
            applied.borrow_and_update();
            let feeds: Vec<Arc<Feed>> = match lock(&self.feeds).as_ref() {
                Some(feeds) => feeds.values().cloned().collect(),
                None => return,
            };
            {
                let state = self.state.read();
                for feed in &feeds {
                    feed.update(&state, self.config.history);
                }
                self.processed.store(state.last_index, Ordering::Release);
            }
            self.drop_idle_feeds();
        }
    }

    fn drop_idle_feeds(&self) {
        let now = Instant::now();
        let ttl = self.config.idle_feed_ttl;
        let mut feeds = lock(&self.feeds);
        let Some(feeds) = feeds.as_mut() else {
            return;
        };
        feeds.retain(|_, feed| {
            if feed.tx.receiver_count() > 0 {
                return true;
            }
            let mut inner = lock(&feed.inner);
            let since = *inner.idle_since.get_or_insert(now);
            now.duration_since(since) < ttl
        });
    }
}
