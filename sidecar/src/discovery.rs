//! Discovery: follows `Watch.Subscribe` streams for the services the proxy
//! needs and keeps each one's latest endpoint set in a
//! `tokio::sync::watch` channel. On a broken stream it fails over to the
//! next registry server and resumes from the last index it fully received,
//! so it never misses or repeats a change; a fresh snapshot (the server
//! could not resume) replaces the set.
//!
//! Other topics (the mesh CA's roots; config entries) are followed the
//! same way by [`Discovery::follow_topic`], folding their changes into a
//! value of the caller's type ([`Fold`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshwork_core::backoff::Backoff;
use meshwork_proto::v1::watch_client::WatchClient;
use meshwork_proto::v1::watch_event::Kind;
use meshwork_proto::v1::{
    CaRoots, CaRootsTopic, ConfigEntriesTopic, ConfigEntry, Endpoint, ServiceTopic,
    SubscribeRequest, change, subscribe_request,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What ends the discovery tasks (re-exported so users need not depend
/// on tokio-util themselves).
pub type ShutdownToken = CancellationToken;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Without any message (heartbeats included) for this long, the stream is
/// considered dead and another server is tried.
const SILENCE: Duration = Duration::from_secs(45);

/// One service's endpoints as of `index`, by `<node>/<service id>`
/// (`value`).
pub type EndpointSet = TopicState<BTreeMap<String, Endpoint>>;

/// A followed service's endpoint set, always the latest.
pub type Endpoints = watch::Receiver<Arc<EndpointSet>>;

/// By (service, passing only): its channel and what stops its follower.
type Followed = HashMap<(String, bool), (Endpoints, CancellationToken)>;

/// The config entries of one kind, by name, always the latest.
pub type ConfigEntries = watch::Receiver<Arc<TopicState<BTreeMap<String, ConfigEntry>>>>;

/// Follows services; cheap to clone.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// The registry servers; a reload may change them.
    addresses: Arc<watch::Sender<Arc<Vec<String>>>>,
    /// Each followed service's channel and what stops its follower.
    services: Arc<Mutex<Followed>>,
    shutdown: CancellationToken,
    /// Streams connected to a registry server now (for metrics: when it
    /// is below the number of services followed, some endpoint sets are
    /// the last known ones).
    connected: Arc<AtomicUsize>,
    /// Topics other than services followed now (the CA roots, intentions).
    topics: Arc<AtomicUsize>,
    /// Each config entry kind followed: one stream per kind, shared by
    /// every user (the chain, intentions, rate limits), for the process's
    /// life.
    config_kinds: Arc<Mutex<HashMap<&'static str, ConfigEntries>>>,
    /// The ACL token the watches present when they connect (a reload may
    /// change it).
    token: Arc<watch::Sender<crate::RegistryAccess>>,
}

/// Counts a connected stream (or a followed topic) until dropped.
struct Connected(Arc<AtomicUsize>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Discovery {
    pub fn new(
        addresses: Vec<String>,
        token: crate::RegistryAccess,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            addresses: Arc::new(watch::Sender::new(Arc::new(addresses))),
            services: Arc::default(),
            shutdown,
            connected: Arc::default(),
            topics: Arc::default(),
            config_kinds: Arc::default(),
            token: Arc::new(watch::Sender::new(token)),
        }
    }

    /// The config entries of `kind`, kept current from now on (one stream
    /// per kind, however many ask).
    pub fn config_entries(&self, kind: &'static str) -> ConfigEntries {
        let mut kinds = self.config_kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds
            .entry(kind)
            .or_insert_with(|| {
                self.follow_topic::<BTreeMap<String, ConfigEntry>>(
                    subscribe_request::Topic::ConfigEntries(ConfigEntriesTopic {
                        kind: kind.into(),
                    }),
                    kind,
                )
            })
            .clone()
    }

    /// A new token for the streams that connect from now on (the server
    /// ends the open ones if it revokes the old token).
    pub fn set_token(&self, token: crate::RegistryAccess) {
        self.token.send_if_modified(|current| {
            let changed = *current != token;
            *current = token;
            changed
        });
    }

    /// The registry servers and the access the sidecar's calls present
    /// now (for calls other than watches: signing a leaf).
    pub(crate) fn registry(&self) -> (Arc<Vec<String>>, crate::RegistryAccess) {
        (
            Arc::clone(&self.addresses.borrow()),
            self.token.borrow().clone(),
        )
    }

    /// Follows `topic` until shutdown or until every receiver is gone,
    /// folding its changes into a `T` (see [`Fold`]); `what` names it in
    /// logs.
    pub fn follow_topic<T: Fold>(
        &self,
        topic: subscribe_request::Topic,
        what: &'static str,
    ) -> watch::Receiver<Arc<TopicState<T>>> {
        let (tx, rx) = watch::channel(Arc::new(TopicState::<T>::default()));
        let shutdown = self.shutdown.child_token();
        let addresses = self.addresses.subscribe();
        let token = self.token.subscribe();
        let connected = Arc::clone(&self.connected);
        self.topics.fetch_add(1, Ordering::Relaxed);
        let followed = Connected(Arc::clone(&self.topics));
        tokio::spawn(async move {
            follow_topic(
                addresses,
                topic,
                Arc::from(what),
                tx,
                shutdown,
                (connected, token),
            )
            .await;
            drop(followed);
        });
        rx
    }

    /// The mesh CA's roots (`None` until the first snapshot holds some).
    pub fn ca_roots(&self) -> watch::Receiver<Arc<TopicState<Option<CaRoots>>>> {
        self.follow_topic(
            subscribe_request::Topic::CaRoots(CaRootsTopic {}),
            "ca_roots",
        )
    }

    /// `(connected, followed)` watch streams.
    pub fn streams(&self) -> (usize, usize) {
        let followed = self.services.lock().map(|s| s.len()).unwrap_or(0)
            + self.topics.load(Ordering::Relaxed);
        (
            self.connected.load(Ordering::Relaxed).min(followed),
            followed,
        )
    }

    /// The endpoint set of `service` (only passing instances when
    /// `passing_only`), kept current from now on.
    pub fn service(&self, service: &str, passing_only: bool) -> Endpoints {
        let key = (service.to_owned(), passing_only);
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((rx, _)) = services.get(&key) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(Arc::new(EndpointSet::default()));
        let stop = self.shutdown.child_token();
        services.insert(key, (rx.clone(), stop.clone()));
        let topic = subscribe_request::Topic::Service(ServiceTopic {
            name: service.to_owned(),
            passing_only,
        });
        tokio::spawn(follow_topic(
            self.addresses.subscribe(),
            topic,
            Arc::from(service),
            tx,
            stop,
            (Arc::clone(&self.connected), self.token.subscribe()),
        ));
        rx
    }

    /// Uses `addresses` from now on (a config reload): streams on a server
    /// no longer listed move to a listed one, resuming where they were.
    pub fn set_addresses(&self, addresses: Vec<String>) {
        self.addresses.send_if_modified(|current| {
            if **current == addresses {
                return false;
            }
            *current = Arc::new(addresses);
            true
        });
    }

    /// Stops following the services for which `keep` is false (upstreams
    /// a reload removed); their channels end.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        services.retain(|(name, _), (_, stop)| {
            let kept = keep(name);
            if !kept {
                tracing::info!(service = %name, "no longer followed");
                stop.cancel();
            }
            kept
        });
    }
}

/// Why a stream ended.
enum Ended {
    Shutdown,
    Broken(String),
    /// A reload took this server off the list: go on to the next at once.
    Moved,
}

/// How a topic's changes make up the value followed.
pub trait Fold: Clone + Default + Send + Sync + 'static {
    /// A fresh snapshot starts: forget everything.
    fn reset(&mut self);
    /// One change of the topic.
    fn apply(&mut self, change: change::Change);
}

/// Config entries of one kind by name; removals by name.
impl Fold for BTreeMap<String, ConfigEntry> {
    fn reset(&mut self) {
        self.clear();
    }

    fn apply(&mut self, change: change::Change) {
        match change {
            change::Change::ConfigEntry(entry) => {
                self.insert(entry.name.clone(), entry);
            }
            change::Change::ConfigEntryRemoved(name) => {
                self.remove(&name);
            }
            _ => {}
        }
    }
}

/// A service's endpoints, by key.
impl Fold for BTreeMap<String, Endpoint> {
    fn reset(&mut self) {
        self.clear();
    }

    fn apply(&mut self, change: change::Change) {
        match change {
            change::Change::Endpoint(e) => {
                self.insert(e.key.clone(), e);
            }
            change::Change::EndpointRemoved(key) => {
                self.remove(&key);
            }
            _ => {}
        }
    }
}

/// The CA roots topic carries the whole set each time: keep the last.
impl Fold for Option<CaRoots> {
    fn reset(&mut self) {
        *self = None;
    }

    fn apply(&mut self, change: change::Change) {
        if let change::Change::CaRoots(roots) = change {
            *self = Some(roots);
        }
    }
}

/// A followed topic's value as of `index`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopicState<T> {
    /// The last index fully applied; 0 until the first snapshot.
    pub index: u64,
    /// True once a snapshot has been received.
    pub ready: bool,
    pub value: T,
}

type TopicSender<T> = watch::Sender<Arc<TopicState<T>>>;
type Addresses = watch::Receiver<Arc<Vec<String>>>;

/// Follows `topic` (named `what` in logs) until `shutdown` or until
/// nobody reads `tx`, failing over between the registry servers and
/// resuming from the last index fully received.
async fn follow_topic<T: Fold>(
    mut addresses: watch::Receiver<Arc<Vec<String>>>,
    topic: subscribe_request::Topic,
    what: Arc<str>,
    tx: watch::Sender<Arc<TopicState<T>>>,
    shutdown: CancellationToken,
    (connected, token): (Arc<AtomicUsize>, watch::Receiver<crate::RegistryAccess>),
) {
    let mut state = TopicState::<T>::default();
    let mut server = 0usize;
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    loop {
        let list = Arc::clone(&addresses.borrow_and_update());
        // Config validation refuses an empty list.
        let addr = &list[server % list.len()];
        let current_token = token.borrow().clone();
        let ended = tokio::select! {
            // Nobody follows it any more.
            () = tx.closed() => return,
            ended = topic_once(addr, &topic, &mut state, (&tx, &mut addresses), &shutdown, (&connected, &current_token)) => ended,
        };
        match ended {
            Ended::Shutdown => return,
            Ended::Moved => {
                tracing::info!(topic = %what, registry = %addr, "registry server no longer listed; following the new list");
                server += 1;
                continue;
            }
            Ended::Broken(reason) => {
                tracing::warn!(topic = %what, registry = %addr, reason, resume_from = state.index, "watch stream broken; trying the next registry server");
            }
        }
        server += 1;
        let wait = backoff.next_wait();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        if state.ready {
            backoff.reset();
        }
    }
}

async fn topic_once<T: Fold>(
    addr: &str,
    topic: &subscribe_request::Topic,
    state: &mut TopicState<T>,
    (tx, addresses): (&TopicSender<T>, &mut Addresses),
    shutdown: &CancellationToken,
    (connected, token): (&Arc<AtomicUsize>, &crate::RegistryAccess),
) -> Ended {
    let channel = match token.channel(addr, None).await {
        Ok(c) => c,
        Err(e) => return Ended::Broken(e),
    };
    let request = SubscribeRequest {
        topic: Some(topic.clone()),
        since_index: state.index,
    };
    let mut stream = match WatchClient::with_interceptor(channel, token.clone())
        .subscribe(request)
        .await
    {
        Ok(s) => s.into_inner(),
        Err(status) => return Ended::Broken(format!("{}: {}", status.code(), status.message())),
    };
    connected.fetch_add(1, Ordering::Relaxed);
    let _connected = Connected(Arc::clone(connected));
    // Changes before END_OF_SNAPSHOT go to a copy: a half-received
    // snapshot never shows.
    let mut pending: Option<TopicState<T>> = Some(state.clone());
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            Ok(()) = addresses.changed() => {
                if addresses.borrow_and_update().iter().any(|a| a == addr) {
                    continue;
                }
                return Ended::Moved;
            }
            m = tokio::time::timeout(SILENCE, stream.message()) => m,
        };
        let event = match message {
            Err(_) => return Ended::Broken(format!("nothing received for {SILENCE:?}")),
            Ok(Err(status)) => {
                return Ended::Broken(format!("{}: {}", status.code(), status.message()));
            }
            Ok(Ok(None)) => return Ended::Broken("the server ended the stream".into()),
            Ok(Ok(Some(event))) => event,
        };
        let target = pending.as_mut().unwrap_or(state);
        if event.reset {
            target.value.reset();
        }
        for c in event.changes {
            if let Some(c) = c.change {
                target.value.apply(c);
            }
        }
        match Kind::try_from(event.kind) {
            Ok(Kind::EndOfSnapshot) => {
                if let Some(mut done) = pending.take() {
                    done.index = done.index.max(event.index);
                    done.ready = true;
                    *state = done;
                    tx.send_replace(Arc::new(state.clone()));
                }
            }
            Ok(Kind::Change) if pending.is_none() => {
                state.index = state.index.max(event.index);
                tx.send_replace(Arc::new(state.clone()));
            }
            Ok(Kind::Heartbeat) if pending.is_none() => {
                state.index = state.index.max(event.index);
            }
            _ => {}
        }
    }
}
