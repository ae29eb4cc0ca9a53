//! `meshwork.v1.Watch` by hand instead of through the generated server: the
//! generated one encodes every message for every subscriber, while a watch
//! change is encoded once per topic ([`crate::watch`]) and these bytes go
//! out as they are. The wire format is the generated `WatchEvent`, so the
//! generated client decodes it.
//!
//! The fan-out of one change to every subscriber is the hot path, so each
//! response body is a hand-written [`http_body`](hyper::body::Body): it hands
//! hyper the change's gRPC message (prefix included, built once per change
//! and shared by every subscriber) as a DATA frame without copying it, polls
//! its broadcast receiver through one reused future, and arms no timer per
//! message: the heartbeat timer is pushed back only when it fires early.
//! The end of the stream is its trailers (`grpc-status`).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use meshwork_proto::v1::SubscribeRequest;
use prost::Message;
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, ReusableBoxFuture};
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::auth::{Kind, Need, Refusal, Resolved};
use crate::watch::{Encoded, Hub, Processed, SubscribeError, Subscription, Topic};

/// Largest subscribe request accepted.
const MAX_REQUEST: usize = 64 * 1024;

/// Serves `meshwork.v1.Watch`.
#[derive(Clone)]
pub struct WatchServer {
    hub: Arc<Hub>,
    /// Refuses new subscriptions (UNAVAILABLE) once the server shuts down;
    /// open streams end (UNAVAILABLE, so clients resubscribe elsewhere)
    /// when the hub, stopping on the same token, closes their channels.
    shutdown: CancellationToken,
    /// What each subscriber's token may read.
    resolver: super::Resolver,
    /// This server's default intention, for the CA roots topic.
    default_intention_allow: bool,
    /// Signs the leaf topic's leaves (`None` with connect off).
    leaves: Option<super::leaf_watch::LeafSigner>,
}

impl std::fmt::Debug for WatchServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchServer").finish_non_exhaustive()
    }
}

impl WatchServer {
    /// A watch service that lets every subscriber read everything; see
    /// [`WatchServer::with_resolver`].
    pub fn new(hub: Arc<Hub>, shutdown: CancellationToken) -> Self {
        Self {
            hub,
            shutdown,
            resolver: super::allow_all(),
            default_intention_allow: true,
            leaves: None,
        }
    }

    /// What the CA roots topic tells sidecars to do when no intention
    /// matches.
    pub fn with_default_intention(mut self, allow: bool) -> Self {
        self.default_intention_allow = allow;
        self
    }

    /// Serves the leaf topic, signing with `signer`.
    pub fn with_leaf_signer(mut self, signer: super::leaf_watch::LeafSigner) -> Self {
        self.leaves = Some(signer);
        self
    }

    /// Resolves each subscriber's token: a topic it may not read is
    /// refused, one it may read in part is filtered for it.
    pub fn with_resolver(mut self, resolver: super::Resolver) -> Self {
        self.resolver = resolver;
        self
    }
}

impl NamedService for WatchServer {
    const NAME: &'static str = "meshwork.v1.Watch";
}

impl<B> Service<http::Request<B>> for WatchServer
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let hub = Arc::clone(&self.hub);
        let shutdown = self.shutdown.clone();
        let resolver = Arc::clone(&self.resolver);
        let default_allow = self.default_intention_allow;
        let leaves = self.leaves.clone();
        match request.uri().path() {
            "/meshwork.v1.Watch/Subscribe" => Box::pin(async move {
                Ok(
                    subscribe(hub, shutdown, &resolver, (default_allow, leaves), request)
                        .await
                        .unwrap_or_else(Status::into_http),
                )
            }),
            _ => Box::pin(async move {
                Ok(Status::unimplemented("no such method in meshwork.v1.Watch").into_http())
            }),
        }
    }
}

/// Puts [`WatchServer`] in front of tonic's router: `meshwork.v1.Watch`
/// calls go straight to it and everything else to the router.
///
/// Through the router every response body would be boxed three times over
/// (tonic's `Routes` runs an axum router, whose body type boxes it; tonic
/// boxes that again; the transport boxes once more on the way to hyper),
/// and every message of every subscriber would go through all those
/// dynamically dispatched layers, each moving a `Status`-sized result.
/// Here a watch body is boxed once (`tonic::body::Body::new`) and once
/// more by the transport.
#[derive(Debug, Clone)]
pub struct WatchLayer {
    watch: WatchServer,
}

impl WatchLayer {
    pub fn new(watch: WatchServer) -> Self {
        Self { watch }
    }
}

impl<S> tower::Layer<S> for WatchLayer {
    type Service = WithWatch<S>;

    fn layer(&self, inner: S) -> WithWatch<S> {
        WithWatch {
            watch: self.watch.clone(),
            inner,
        }
    }
}

/// See [`WatchLayer`].
#[derive(Debug, Clone)]
pub struct WithWatch<S> {
    watch: WatchServer,
    inner: S,
}

impl<S, B> Service<http::Request<B>> for WithWatch<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let is_watch = request
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(<WatchServer as NamedService>::NAME))
            .is_some_and(|p| p.starts_with('/'));
        if is_watch {
            self.watch.call(request)
        } else {
            Box::pin(self.inner.call(request))
        }
    }
}

/// One `Subscribe` call: reads the request, starts the subscription, and
/// answers with its event stream (or with a trailers-only error).
async fn subscribe<B>(
    hub: Arc<Hub>,
    shutdown: CancellationToken,
    resolver: &super::Resolver,
    (default_allow, leaves): (bool, Option<super::leaf_watch::LeafSigner>),
    request: http::Request<B>,
) -> Result<http::Response<tonic::body::Body>, Status>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    let token = super::call_token(request.headers()).map(str::to_owned);
    let authz = resolver(token.as_deref()).map_err(super::refusal_status)?;
    if let Some(encoding) = request.headers().get("grpc-encoding")
        && encoding.as_bytes() != b"identity"
    {
        return Err(Status::unimplemented(format!(
            "grpc-encoding {encoding:?} is not supported; send uncompressed requests"
        )));
    }
    let mut request = read_request(request.into_body()).await?;
    let leaf_topic = match request.topic.take() {
        Some(meshwork_proto::v1::subscribe_request::Topic::Leaf(leaf)) => Some(leaf),
        other => {
            request.topic = other;
            None
        }
    };
    if let Some(leaf) = leaf_topic {
        let Some(signer) = leaves else {
            return Err(Status::failed_precondition(
                "the mesh CA is off on this server (connect.enabled = false)",
            ));
        };
        if shutdown.is_cancelled() {
            return Err(status_of(SubscribeError::ShuttingDown));
        }
        let stream = super::leaf_watch::StreamAuth {
            resolver: Arc::clone(resolver),
            token,
            authz,
        };
        return super::leaf_watch::subscribe(hub, signer, shutdown, stream, leaf).await;
    }
    let topic = Topic::from_request(&request, default_allow).map_err(Status::invalid_argument)?;
    let filter = filter_for(&authz, &topic)
        .map_err(super::refusal_status)?
        .map(Arc::new);
    // With ACLs on, the stream's token is checked again before each
    // message: one revoked (or whose rights changed) stops the stream.
    let recheck = authz.accessor().is_some().then(|| Recheck {
        resolver: Arc::clone(resolver),
        token,
        topic: topic.clone(),
        acl_index: authz.acl_index(),
    });
    if shutdown.is_cancelled() {
        return Err(status_of(SubscribeError::ShuttingDown));
    }
    let subscription = hub
        .subscribe(topic, request.since_index)
        .await
        .map_err(status_of)?;
    let mut response = http::Response::new(tonic::body::Body::new(EventBody::new(
        subscription,
        filter,
        recheck,
    )));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// The gRPC status a subscription that cannot start ends with.
fn status_of(e: SubscribeError) -> Status {
    match e {
        SubscribeError::InvalidTopic(m) => Status::invalid_argument(m),
        e @ (SubscribeError::Behind { .. } | SubscribeError::ShuttingDown) => {
            Status::unavailable(e.to_string())
        }
    }
}

/// The request body: exactly one uncompressed length-prefixed
/// `SubscribeRequest` (the client ends its side after it).
async fn read_request<B>(body: B) -> Result<SubscribeRequest, Status>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let e: StdError = e.into();
            Status::cancelled(format!("reading the request: {e}"))
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.remaining() > MAX_REQUEST + 5 {
                return Err(Status::out_of_range(format!(
                    "SubscribeRequest larger than {MAX_REQUEST} bytes"
                )));
            }
            buf.put(data);
        }
    }
    if buf.len() < 5 {
        return Err(Status::internal("missing request message"));
    }
    if buf[0] != 0 {
        return Err(Status::unimplemented(
            "compressed request messages are not supported",
        ));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_REQUEST {
        return Err(Status::out_of_range(format!(
            "SubscribeRequest larger than {MAX_REQUEST} bytes"
        )));
    }
    if buf.len() != 5 + len {
        return Err(Status::internal(
            "expected exactly one complete request message",
        ));
    }
    SubscribeRequest::decode(&buf[5..])
        .map_err(|e| Status::invalid_argument(format!("malformed SubscribeRequest: {e}")))
}

/// What a subscriber whose token may read only part of its topic is sent:
/// each message with the changes it may not read taken out (Consul's list
/// filtering). Subscribers that may read the whole topic, the usual case,
/// get the shared bytes untouched.
struct Filter {
    authz: Resolved,
    /// The kind of a config-entries topic (a removal names only the entry).
    config_kind: Option<String>,
}

/// The filter a subscriber needs, `None` when it may read the whole
/// topic, or the refusal when it may not watch it at all (a service it
/// may not read, as REST answers 403 for a single object).
fn filter_for(authz: &Resolved, topic: &Topic) -> Result<Option<Filter>, Refusal> {
    if authz.is_management() {
        return Ok(None);
    }
    let whole = match topic {
        Topic::Service { name, .. } => {
            authz.require(Kind::Service, name, Need::Read)?;
            authz.allows_prefix(Kind::Node, "", Need::Read)
        }
        Topic::Services => authz.allows_prefix(Kind::Service, "", Need::Read),
        Topic::KvPrefix(prefix) => authz.allows_prefix(Kind::Key, prefix, Need::Read),
        Topic::ConfigEntries(_) => false,
        // Roots are public (as Consul's /v1/connect/ca/roots).
        Topic::CaRoots { .. } => true,
    };
    Ok((!whole).then(|| Filter {
        authz: authz.clone(),
        config_kind: match topic {
            Topic::ConfigEntries(kind) => Some(kind.clone()),
            _ => None,
        },
    }))
}

impl Filter {
    fn visible(&self, change: &meshwork_proto::v1::Change) -> bool {
        use meshwork_proto::v1::change::Change as C;
        let a = &self.authz;
        let kind = self.config_kind.as_deref().unwrap_or_default();
        match &change.change {
            None => true,
            Some(C::Endpoint(e)) => {
                a.allows(Kind::Service, &e.service_name, Need::Read)
                    && a.allows(Kind::Node, &e.node, Need::Read)
            }
            Some(C::EndpointRemoved(key)) => {
                let node = key.split_once('/').map_or(key.as_str(), |(n, _)| n);
                a.allows(Kind::Node, node, Need::Read)
            }
            Some(C::Service(s)) => a.allows(Kind::Service, &s.name, Need::Read),
            Some(C::ServiceRemoved(name)) => a.allows(Kind::Service, name, Need::Read),
            Some(C::Kv(e)) => a.allows(Kind::Key, &e.key, Need::Read),
            Some(C::KvRemoved(key)) => a.allows(Kind::Key, key, Need::Read),
            Some(C::ConfigEntry(e)) => {
                crate::auth::config_entry_permission(a, &e.kind, &e.name, Need::Read).is_ok()
            }
            Some(C::ConfigEntryRemoved(name)) => {
                crate::auth::config_entry_permission(a, kind, name, Need::Read).is_ok()
            }
            Some(C::CaRoots(_)) => true,
            // Never on a hub topic.
            Some(C::Leaf(_)) => false,
        }
    }

    /// One message (a length-prefixed `WatchEvent`) as this subscriber
    /// may see it; `None` if it does not decode (never for the hub's own
    /// messages), which ends the stream rather than pass it on unread.
    fn apply(&self, frame: &Bytes) -> Option<Bytes> {
        let mut event = meshwork_proto::v1::WatchEvent::decode(frame.get(5..)?).ok()?;
        let before = event.changes.len();
        event.changes.retain(|c| self.visible(c));
        if event.changes.len() == before {
            return Some(frame.clone());
        }
        let len = event.encoded_len();
        let mut out = BytesMut::with_capacity(5 + len);
        out.put_u8(0);
        out.put_u32(u32::try_from(len).ok()?);
        event.encode(&mut out).ok()?;
        Some(out.freeze())
    }
}

/// What an open stream needs to check its token again.
struct Recheck {
    resolver: super::Resolver,
    token: Option<String>,
    topic: Topic,
    /// The ACL tables' index the current filter was made at.
    acl_index: u64,
}

impl Recheck {
    /// The filter to use now, or why the stream must end. Cheap when the
    /// ACL tables did not change (a cached resolution).
    fn refresh(&mut self, filter: &mut Option<Arc<Filter>>) -> Result<(), Status> {
        let authz = (self.resolver)(self.token.as_deref()).map_err(super::refusal_status)?;
        if authz.acl_index() != self.acl_index {
            *filter = filter_for(&authz, &self.topic)
                .map_err(super::refusal_status)?
                .map(Arc::new);
            self.acl_index = authz.acl_index();
        }
        Ok(())
    }
}

/// The response body of one subscriber: the snapshot (or the missed
/// changes), then live changes and heartbeats, then trailers.
struct EventBody {
    initial: std::vec::IntoIter<Bytes>,
    /// `None` once the trailers went out.
    tail: Option<Tail>,
    filter: Option<Arc<Filter>>,
    recheck: Option<Recheck>,
}

impl EventBody {
    fn new(
        subscription: Subscription,
        filter: Option<Arc<Filter>>,
        recheck: Option<Recheck>,
    ) -> Self {
        let Subscription {
            initial,
            index,
            live,
            heartbeat,
            processed,
        } = subscription;
        Self {
            initial: initial.into_iter(),
            tail: Some(Tail::new(index, live, heartbeat, processed)),
            filter,
            recheck,
        }
    }
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let next = match this.initial.next() {
            Some(message) => Poll::Ready(Ok(message)),
            None => match this.tail.as_mut() {
                None => return Poll::Ready(None),
                Some(tail) => tail.poll_next(cx),
            },
        };
        let next = match (next, &mut this.recheck) {
            (Poll::Ready(Ok(message)), Some(recheck)) => {
                Poll::Ready(recheck.refresh(&mut this.filter).map(|()| message))
            }
            (next, _) => next,
        };
        let next = match (next, &this.filter) {
            (Poll::Ready(Ok(message)), Some(filter)) => Poll::Ready(
                filter
                    .apply(&message)
                    .ok_or_else(|| Status::internal("a watch message did not decode")),
            ),
            (next, _) => next,
        };
        match next {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(message)) => Poll::Ready(Some(Ok(Frame::data(message)))),
            Poll::Ready(Err(status)) => {
                this.initial = Vec::new().into_iter();
                this.tail = None;
                let mut trailers = http::HeaderMap::new();
                // Cannot fail: the message is percent-encoded and these
                // statuses carry no details or metadata.
                let _ = status.add_header(&mut trailers);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.tail.is_none() && self.initial.len() == 0
    }
}

type Received = (Result<Arc<Encoded>, RecvError>, Receiver<Arc<Encoded>>);

async fn recv(mut live: Receiver<Arc<Encoded>>) -> Received {
    let received = live.recv().await;
    (received, live)
}

/// The live part of one stream.
struct Tail {
    /// Counts the stream as open until it is dropped.
    _open: crate::metrics::GaugeGuard,
    processed: Processed,
    /// The next `recv` of the live channel (which it owns meanwhile); one
    /// allocation reused for every message.
    next: ReusableBoxFuture<'static, Received>,
    /// Index of the last event sent: nothing at or below it is sent again.
    last: u64,
    heartbeat: Duration,
    /// When the last message went out.
    sent_at: Instant,
    /// Fires at `sent_at + heartbeat` or earlier; pushed back when early.
    timer: Pin<Box<Sleep>>,
}

impl Tail {
    fn new(
        index: u64,
        live: Receiver<Arc<Encoded>>,
        heartbeat: Duration,
        processed: Processed,
    ) -> Self {
        let heartbeat = heartbeat.max(Duration::from_millis(10));
        let now = Instant::now();
        Self {
            _open: crate::metrics::GaugeGuard::new(&crate::metrics::METRICS.watch_subscribers),
            last: index,
            next: ReusableBoxFuture::new(recv(live)),
            processed,
            heartbeat,
            sent_at: now,
            timer: Box::pin(tokio::time::sleep_until(now + heartbeat)),
        }
    }

    fn sent(&mut self, message: Bytes) -> Poll<Result<Bytes, Status>> {
        self.sent_at = Instant::now();
        Poll::Ready(Ok(message))
    }

    /// The next message, or the status that ends the stream.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Bytes, Status>> {
        // Set when idle for a heartbeat: the published index, read before
        // finding the channel empty.
        let mut idle_at: Option<u64> = None;
        loop {
            if let Poll::Ready((received, live)) = self.next.poll(cx) {
                self.next.set(recv(live));
                match received {
                    Ok(event) if event.index <= self.last => continue,
                    Ok(event) => {
                        self.last = event.index;
                        return self.sent(event.frame.clone());
                    }
                    Err(RecvError::Lagged(n)) => {
                        return Poll::Ready(Err(Status::new(
                            Code::ResourceExhausted,
                            format!(
                                "subscriber fell {n} changes behind; resubscribe with since_index={}",
                                self.last
                            ),
                        )));
                    }
                    Err(RecvError::Closed) => {
                        return Poll::Ready(Err(Status::unavailable(format!(
                            "server shutting down; resubscribe elsewhere with since_index={}",
                            self.last
                        ))));
                    }
                }
            }
            if let Some(processed) = idle_at {
                // Every change up to `processed` was received and sent.
                self.last = self.last.max(processed);
                return self.sent(Subscription::heartbeat_event(self.last));
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.sent_at + self.heartbeat;
            if due > Instant::now() {
                // Something went out since the timer was set.
                self.timer.as_mut().reset(due);
                continue;
            }
            self.timer.as_mut().reset(Instant::now() + self.heartbeat);
            idle_at = Some(self.processed.get());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::state_machine::SharedState;
    use crate::state::State;
    use crate::watch::HubConfig;
    use tower::{Layer, ServiceExt};

    /// Stands in for tonic's router: answers every call with a marker.
    #[derive(Debug, Clone)]
    struct Router;

    impl<B> Service<http::Request<B>> for Router {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: http::Request<B>) -> Self::Future {
            let mut response = http::Response::new(tonic::body::Body::empty());
            response
                .headers_mut()
                .insert("x-router", http::HeaderValue::from_static("yes"));
            std::future::ready(Ok(response))
        }
    }

    async fn route(path: &str) -> http::Response<tonic::body::Body> {
        let hub = Hub::new(
            Arc::new(SharedState::new(State::default())),
            HubConfig::default(),
        );
        let service =
            WatchLayer::new(WatchServer::new(hub, CancellationToken::new())).layer(Router);
        let request = http::Request::builder()
            .method("POST")
            .uri(path)
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("a valid request");
        match service.oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }

    #[tokio::test]
    async fn watch_calls_skip_the_router_and_everything_else_reaches_it() {
        // A method the watch service does not have: its own UNIMPLEMENTED,
        // not the router's answer.
        let response = route("/meshwork.v1.Watch/Nope").await;
        assert!(response.headers().get("x-router").is_none());
        assert_eq!(
            response.headers().get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"12"[..])
        );
        for path in [
            "/meshwork.v1.WatchX/Subscribe",
            "/meshwork.v1.Registry/Get",
            "/meshwork.v1.Watch",
            "/",
        ] {
            let response = route(path).await;
            assert_eq!(
                response.headers().get("x-router").map(|v| v.as_bytes()),
                Some(&b"yes"[..]),
                "{path} should reach the router"
            );
        }
    }
}
