//! The `leaf` watch topic: a leaf certificate for one service, pushed
//! again whenever it should be renewed — the active root changed, the
//! leaf TTL changed, or 60 % of its life (plus up to 10 % jitter) has
//! passed. Each new leaf is signed by the leader from the subscriber's
//! CSR (its key never leaves the subscriber). Unlike the other topics a
//! leaf is not replicated state: a stream always starts with a fresh leaf
//! (`since_index` is ignored) and ends with UNAVAILABLE when a renewal
//! cannot be signed, so the client subscribes again (elsewhere) while its
//! current leaf is still valid.
//!
//! The stream wakes only on changes of the CA roots topic (the hub's
//! shared feed), on its renewal time and on its heartbeat: no per-write
//! work for any number of leaf subscribers.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use meshwork_proto::v1::watch_event::Kind as EventKind;
use meshwork_proto::v1::{Change, LeafCert, LeafTopic, WatchEvent, change};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::codegen::http;

use crate::auth::{Kind, Need, Resolved};
use crate::cluster::RegistryNode;
use crate::connect::Leaf;
use crate::connect::sign::{LeafRequest, MAX_CSR, SignError, Signed};
use crate::watch::{Hub, Topic, grpc_frame};

/// What signs the leaves of this server's leaf streams.
#[derive(Clone)]
pub struct LeafSigner {
    pub node: Arc<RegistryNode>,
    /// In the SPIFFE IDs.
    pub datacenter: Arc<str>,
    /// Whether a token must be resolved as of the leader's state before a
    /// leaf is signed for it ([`crate::api::catch_up_for_write`]).
    pub acl: Arc<crate::auth::Acl>,
}

/// One leaf subscription, validated and with its first leaf signed: the
/// response whose body streams it.
pub(super) async fn subscribe(
    hub: Arc<Hub>,
    signer: LeafSigner,
    shutdown: CancellationToken,
    stream: StreamAuth,
    topic: LeafTopic,
) -> Result<http::Response<tonic::body::Body>, Status> {
    crate::connect::valid_service_name(&topic.service).map_err(Status::invalid_argument)?;
    // Signing is a write: the token as of the leader's state (a follower
    // that has not applied its revocation must not sign for it).
    let mut stream = stream;
    stream.recheck_fresh(&signer, &topic.service).await?;
    if topic.csr_pem.trim().is_empty() || topic.csr_pem.len() > MAX_CSR {
        return Err(Status::invalid_argument(format!(
            "the leaf topic needs csr_pem: a PEM CSR of at most {MAX_CSR} bytes"
        )));
    }
    let first = sign(&signer, &topic).await?;
    // The CA roots feed says when to look again (shared with the roots
    // topic's subscribers; `default_allow` does not matter here).
    let roots = hub
        .subscribe(
            Topic::CaRoots {
                default_allow: true,
            },
            0,
        )
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(4);
    let task = LeafStream {
        signer,
        topic,
        stream,
        tx,
        heartbeat: roots.heartbeat.max(Duration::from_millis(10)),
        shutdown,
    };
    tokio::spawn(task.run(first, roots.live));
    let mut response = http::Response::new(tonic::body::Body::new(ChannelBody {
        rx,
        done: false,
        _open: crate::metrics::GaugeGuard::new(&crate::metrics::METRICS.watch_subscribers),
    }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// A stream's token, checked again before each renewal (a revoked token
/// or a lost `service:write` ends the stream).
pub(super) struct StreamAuth {
    pub resolver: super::Resolver,
    pub token: Option<String>,
    pub authz: Resolved,
}

impl StreamAuth {
    fn check(&self, service: &str) -> Result<(), Status> {
        self.authz
            .require(Kind::Service, service, Need::Write)
            .map_err(super::refusal_status)
    }

    /// The token resolved again after catching up with the leader.
    async fn recheck_fresh(&mut self, signer: &LeafSigner, service: &str) -> Result<(), Status> {
        crate::api::catch_up_for_write(&signer.acl, &signer.node)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.authz = (self.resolver)(self.token.as_deref()).map_err(super::refusal_status)?;
        self.check(service)
    }
}

async fn sign(signer: &LeafSigner, topic: &LeafTopic) -> Result<Signed, Status> {
    signer
        .node
        .sign_leaf(LeafRequest {
            datacenter: &signer.datacenter,
            service: &topic.service,
            csr_pem: &topic.csr_pem,
        })
        .await
        .map_err(|e| match e {
            SignError::Ca(e) => super::ca_status(e),
            // Another server may do better: the client subscribes again.
            SignError::Cluster(e) => Status::unavailable(e.to_string()),
        })
}

/// The task behind one leaf stream.
struct LeafStream {
    signer: LeafSigner,
    topic: LeafTopic,
    stream: StreamAuth,
    tx: mpsc::Sender<Result<Bytes, Status>>,
    heartbeat: Duration,
    shutdown: CancellationToken,
}

/// How long after receiving `leaf` (at `now_unix`) to renew it: at 60 % of
/// what is left of its life plus up to 10 % jitter (drawn once per leaf,
/// so that leaves signed together are not renewed together), at least a
/// second; `None` when a new leaf would end no later (it ends with its
/// root: only a new root helps).
fn renew_after(
    leaf: &Leaf,
    root_not_after: Option<i64>,
    now_unix: i64,
    jitter: f64,
) -> Option<Duration> {
    if root_not_after.is_some_and(|end| leaf.valid_before_unix >= end) {
        return None;
    }
    let left = (leaf.valid_before_unix - now_unix).max(0) as f64;
    let secs = left * (0.6 + 0.1 * jitter.clamp(0.0, 1.0));
    Some(Duration::from_secs_f64(secs).max(Duration::from_secs(1)))
}

/// A pause before re-signing after a rotation, so that every stream of a
/// server does not ask the leader in the same instant.
fn spread() -> Duration {
    Duration::from_millis(rand::random_range(0..3000))
}

/// Whether the CA changed in a way that calls for a new leaf.
fn stale(leaf: &Leaf, leaf_ttl_secs: u64, ca: &crate::state::ca::CaStore) -> bool {
    ca.active().is_some_and(|root| root.id != leaf.root_id)
        || ca.config.leaf_cert_ttl_secs != leaf_ttl_secs
}

fn event(kind: EventKind, index: u64, reset: bool, leaf: Option<&Leaf>) -> Bytes {
    grpc_frame(&WatchEvent {
        kind: kind as i32,
        index,
        reset,
        changes: leaf
            .map(|leaf| Change {
                change: Some(change::Change::Leaf(LeafCert {
                    service: leaf.service.clone(),
                    cert_chain_pem: leaf.chain_pem.clone(),
                    spiffe_id: leaf.spiffe_id.clone(),
                    serial: leaf.serial.clone(),
                    valid_after_unix: leaf.valid_after_unix,
                    valid_before_unix: leaf.valid_before_unix,
                    root_id: leaf.root_id.clone(),
                })),
            })
            .into_iter()
            .collect(),
        ..Default::default()
    })
}

impl LeafStream {
    async fn send(&self, message: Result<Bytes, Status>) -> bool {
        self.tx.send(message).await.is_ok()
    }

    async fn run(
        mut self,
        (mut leaf, index): Signed,
        mut roots: tokio::sync::broadcast::Receiver<Arc<crate::watch::Encoded>>,
    ) {
        let state = Arc::clone(&self.signer.node.state);
        let mut ttl = state.read().ca.config.leaf_cert_ttl_secs;
        let mut last = index.max(state.applied_index());
        if !self
            .send(Ok(event(EventKind::Snapshot, last, true, Some(&leaf))))
            .await
            || !self
                .send(Ok(event(EventKind::EndOfSnapshot, last, false, None)))
                .await
        {
            return;
        }
        let due_for = |leaf: &Leaf| {
            let root_end = state
                .read()
                .ca
                .roots
                .iter()
                .find(|r| r.id == leaf.root_id)
                .map(|r| r.not_after_unix);
            renew_after(
                leaf,
                root_end,
                crate::connect::now_unix(),
                rand::random::<f64>(),
            )
            .map(|after| tokio::time::Instant::now() + after)
        };
        let mut due = due_for(&leaf);
        // A rotation applied between the first signature and the feed's
        // subscription is seen here.
        if stale(&leaf, ttl, &state.read().ca) {
            due = Some(tokio::time::Instant::now() + spread());
        }
        loop {
            let renew_in = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let heartbeat = tokio::time::sleep(self.heartbeat);
            let renew = tokio::select! {
                () = self.tx.closed() => return,
                () = self.shutdown.cancelled() => {
                    self.send(Err(Status::unavailable("server shutting down; resubscribe elsewhere"))).await;
                    return;
                }
                () = renew_in => true,
                () = heartbeat => {
                    last = last.max(state.applied_index());
                    if !self.send(Ok(event(EventKind::Heartbeat, last, false, None))).await {
                        return;
                    }
                    false
                }
                received = roots.recv() => match received {
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        if stale(&leaf, ttl, &state.read().ca) {
                            due = Some(tokio::time::Instant::now() + spread());
                        }
                        false
                    }
                    Err(RecvError::Closed) => {
                        self.send(Err(Status::unavailable("server shutting down; resubscribe elsewhere"))).await;
                        return;
                    }
                },
            };
            if !renew {
                continue;
            }
            if let Err(status) = self
                .stream
                .recheck_fresh(&self.signer, &self.topic.service)
                .await
            {
                self.send(Err(status)).await;
                return;
            }
            ttl = state.read().ca.config.leaf_cert_ttl_secs;
            match sign(&self.signer, &self.topic).await {
                Ok((renewed, index)) => {
                    leaf = renewed;
                    due = due_for(&leaf);
                    last = last.max(index).max(state.applied_index());
                    if !self
                        .send(Ok(event(EventKind::Change, last, false, Some(&leaf))))
                        .await
                    {
                        return;
                    }
                }
                Err(status) => {
                    self.send(Err(status)).await;
                    return;
                }
            }
        }
    }
}

/// A stream's body: the task's messages as DATA frames, then its ending
/// status as trailers.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, Status>>,
    done: bool,
    /// Counted with the other watch streams while open.
    _open: crate::metrics::GaugeGuard,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let status = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(message))) => return Poll::Ready(Some(Ok(Frame::data(message)))),
            Poll::Ready(Some(Err(status))) => status,
            Poll::Ready(None) => Status::unavailable("the leaf stream ended; subscribe again"),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        // Cannot fail: the message is percent-encoded and these statuses
        // carry no details or metadata.
        let _ = status.add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(after: i64, before: i64, root: &str) -> Leaf {
        Leaf {
            cert_pem: String::new(),
            chain_pem: String::new(),
            serial: "01".into(),
            spiffe_id: String::new(),
            service: "api".into(),
            valid_after_unix: after,
            valid_before_unix: before,
            root_id: root.into(),
            private_key_pem: None,
        }
    }

    #[test]
    fn renewal_comes_at_sixty_to_seventy_percent_of_what_is_left() {
        // Signed now (valid from a minute ago, clock skew), 100 s left.
        let l = leaf(940, 1100, "r");
        let at = |jitter| renew_after(&l, Some(5000), 1000, jitter).map(|d| d.as_secs());
        assert_eq!(at(0.0), Some(60));
        assert_eq!(at(1.0), Some(70));
        assert_eq!(at(7.0), Some(70));
        // Short or spent leaves wait at least a second: never a busy loop.
        let short = leaf(940, 1001, "r");
        assert_eq!(
            renew_after(&short, Some(5000), 1000, 0.0),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            renew_after(&short, Some(5000), 2000, 0.0),
            Some(Duration::from_secs(1))
        );
        // A leaf that ends with its root: only a new root helps.
        assert_eq!(renew_after(&l, Some(1100), 1000, 0.5), None);
    }

    #[test]
    fn a_new_active_root_or_ttl_makes_the_leaf_stale() {
        use crate::state::ca::CaStore;
        let ca = CaStore::default();
        // No root at all: nothing to renew with.
        assert!(!stale(&leaf(0, 1, "r"), ca.config.leaf_cert_ttl_secs, &ca));
        assert!(stale(
            &leaf(0, 1, "r"),
            ca.config.leaf_cert_ttl_secs + 1,
            &ca
        ));
    }
}
