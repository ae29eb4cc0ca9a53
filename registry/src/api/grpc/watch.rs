//! `meshwork.v1.Watch` by hand instead of through the generated server: the
//! generated one encodes every message for every subscriber, while a watch
//! change is encoded once per topic ([`crate::watch`]) and these bytes go
//! out as they are. The wire format is the generated `WatchEvent`, so the
//! generated client decodes it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use futures::Stream;
use meshwork_proto::v1::SubscribeRequest;
use prost::Message;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::{Code, Request, Response, Status};

use crate::watch::{Hub, SubscribeError, Subscription, Topic};

/// Largest subscribe request accepted.
const MAX_REQUEST: usize = 64 * 1024;

/// Serves `meshwork.v1.Watch`.
#[derive(Debug, Clone)]
pub struct WatchServer {
    hub: Arc<Hub>,
    /// Ends every stream (UNAVAILABLE, so clients resubscribe elsewhere)
    /// when the server shuts down, instead of holding shutdown up.
    shutdown: CancellationToken,
}

impl WatchServer {
    pub fn new(hub: Arc<Hub>, shutdown: CancellationToken) -> Self {
        Self { hub, shutdown }
    }
}

impl NamedService for WatchServer {
    const NAME: &'static str = "meshwork.v1.Watch";
}

/// Writes pre-encoded messages; reads `SubscribeRequest`s.
#[derive(Debug, Default, Clone, Copy)]
struct PreEncodedCodec;

#[derive(Debug, Default, Clone, Copy)]
struct PreEncoded;

#[derive(Debug, Default, Clone, Copy)]
struct RequestDecoder;

impl Encoder for PreEncoded {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RequestDecoder {
    type Item = SubscribeRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<SubscribeRequest>, Status> {
        SubscribeRequest::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed SubscribeRequest: {e}")))
    }
}

impl Codec for PreEncodedCodec {
    type Encode = Bytes;
    type Decode = SubscribeRequest;
    type Encoder = PreEncoded;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> PreEncoded {
        PreEncoded
    }

    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder
    }
}

type EventStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

struct SubscribeSvc(Arc<Hub>, CancellationToken);

impl ServerStreamingService<SubscribeRequest> for SubscribeSvc {
    type Response = Bytes;
    type ResponseStream = EventStream;
    type Future = BoxFuture<Response<EventStream>, Status>;

    fn call(&mut self, request: Request<SubscribeRequest>) -> Self::Future {
        let hub = Arc::clone(&self.0);
        let shutdown = self.1.clone();
        Box::pin(async move {
            let request = request.into_inner();
            let topic = Topic::from_request(&request).map_err(Status::invalid_argument)?;
            let subscription =
                hub.subscribe(topic, request.since_index)
                    .await
                    .map_err(|e| match e {
                        SubscribeError::InvalidTopic(m) => Status::invalid_argument(m),
                        e @ SubscribeError::Behind { .. } => Status::unavailable(e.to_string()),
                    })?;
            Ok(Response::new(event_stream(subscription, shutdown)))
        })
    }
}

/// The snapshot (or the missed changes), then live changes and heartbeats.
fn event_stream(subscription: Subscription, shutdown: CancellationToken) -> EventStream {
    let initial: Vec<Result<Bytes, Status>> =
        subscription.initial.iter().cloned().map(Ok).collect();
    let tail = Tail {
        _open: crate::metrics::GaugeGuard::new(&crate::metrics::METRICS.watch_subscribers),
        last: subscription.index,
        heartbeat: subscription.heartbeat.max(Duration::from_millis(10)),
        subscription,
        shutdown,
        done: false,
    };
    let live = futures::stream::unfold(tail, |mut tail| async move {
        if tail.done {
            return None;
        }
        let item = tail.next().await?;
        Some((item, tail))
    });
    Box::pin(futures::stream::StreamExt::chain(
        futures::stream::iter(initial),
        live,
    ))
}

struct Tail {
    /// Counts the stream as open until it is dropped.
    _open: crate::metrics::GaugeGuard,
    subscription: Subscription,
    /// Index of the last event sent: nothing at or below it is sent again.
    last: u64,
    heartbeat: Duration,
    shutdown: CancellationToken,
    done: bool,
}

impl Tail {
    async fn next(&mut self) -> Option<Result<Bytes, Status>> {
        loop {
            let next = tokio::select! {
                () = self.shutdown.cancelled() => {
                    self.done = true;
                    return Some(Err(Status::unavailable(format!(
                        "server shutting down; resubscribe elsewhere with since_index={}",
                        self.last
                    ))));
                }
                next = tokio::time::timeout(self.heartbeat, self.subscription.live.recv()) => next,
            };
            let received = match next {
                Ok(received) => received,
                Err(_) => {
                    // Idle: if the channel is still empty after reading
                    // the published index, every change up to it was sent.
                    let processed = self.subscription.processed();
                    match self.subscription.live.try_recv() {
                        Ok(event) => Ok(event),
                        Err(TryRecvError::Empty) => {
                            self.last = self.last.max(processed);
                            return Some(Ok(Subscription::heartbeat_event(self.last)));
                        }
                        Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                        Err(TryRecvError::Closed) => Err(RecvError::Closed),
                    }
                }
            };
            match received {
                Ok(event) if event.index <= self.last => continue,
                Ok(event) => {
                    self.last = event.index;
                    return Some(Ok(event.bytes.clone()));
                }
                Err(RecvError::Lagged(n)) => {
                    self.done = true;
                    return Some(Err(Status::new(
                        Code::ResourceExhausted,
                        format!(
                            "subscriber fell {n} changes behind; resubscribe with since_index={}",
                            self.last
                        ),
                    )));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

impl<B> Service<http::Request<B>> for WatchServer
where
    B: Body + Send + 'static,
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
        match request.uri().path() {
            "/meshwork.v1.Watch/Subscribe" => Box::pin(async move {
                let mut grpc = Grpc::new(PreEncodedCodec)
                    .apply_max_message_size_config(Some(MAX_REQUEST), None);
                Ok(grpc
                    .server_streaming(SubscribeSvc(hub, shutdown), request)
                    .await)
            }),
            _ => Box::pin(async move {
                Ok(Status::unimplemented("no such method in meshwork.v1.Watch").into_http())
            }),
        }
    }
}
