//! Demo backends for the end-to-end suites: the apps that sit behind
//! sidecars or are probed by health checks. An HTTP echo (HTTP/1.1, HTTP/2,
//! upgrades) whose failures the test switches on and off, a TCP byte
//! counter, a streaming gRPC service, a fixed-status HTTP responder and a
//! `grpc.health.v1` server.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What a demo HTTP backend does; changed by the test while it runs.
#[derive(Debug, Default)]
pub struct Behavior {
    /// Answer every request with this status (0 = normal answers).
    pub fail_with: AtomicU16,
    /// Requests answered.
    pub served: AtomicUsize,
    /// Requests held right now: `/hold` before its answer, `/hold-body`
    /// before the end of its body (see [`Behavior::release`]).
    pub holding: AtomicUsize,
    /// Bumped by [`Behavior::release`]: a request held since an earlier
    /// value goes on.
    releases: AtomicUsize,
    released: tokio::sync::Notify,
    /// Set (with `down`) when the backend has "crashed": it stops
    /// accepting and drops its connections.
    is_down: AtomicBool,
    down: tokio::sync::Notify,
}

impl Behavior {
    /// The app "crashes": it stops accepting and drops its connections.
    pub fn crash(&self) {
        self.is_down.store(true, Ordering::SeqCst);
        self.down.notify_waiters();
    }

    /// Lets every request held now go on (later ones are held again).
    pub fn release(&self) {
        self.releases.fetch_add(1, Ordering::SeqCst);
        self.released.notify_waiters();
    }

    /// Holds the caller until the next [`Behavior::release`] (at most
    /// [`HOLD_LIMIT`]), counted in `holding` meanwhile.
    async fn hold(&self) {
        struct Held<'a>(&'a AtomicUsize);
        impl Drop for Held<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let seen = self.releases.load(Ordering::SeqCst);
        self.holding.fetch_add(1, Ordering::SeqCst);
        let _held = Held(&self.holding);
        let released = async {
            loop {
                // Registered before the check: a release in between wakes it.
                let next = self.released.notified();
                if self.releases.load(Ordering::SeqCst) != seen {
                    return;
                }
                next.await;
            }
        };
        let _ = tokio::time::timeout(HOLD_LIMIT, released).await;
    }
}

/// The longest a demo backend holds a request (`/hold`, `/hold-body`).
pub const HOLD_LIMIT: Duration = Duration::from_secs(30);

/// A response body: `first`, then (once `rest` resolves) `last`.
struct HeldBody {
    first: Option<Bytes>,
    rest: Pin<Box<dyn Future<Output = ()> + Send>>,
    last: Option<Bytes>,
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        use std::task::Poll;
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(hyper::body::Frame::data(first))));
        }
        if self.last.is_none() {
            return Poll::Ready(None);
        }
        match self.rest.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                Poll::Ready(self.last.take().map(|b| Ok(hyper::body::Frame::data(b))))
            }
        }
    }
}

/// A demo HTTP backend (HTTP/1.1 and HTTP/2, upgrades). It answers
/// `<name> <body>` with the headers it saw echoed back as `x-seen-*`;
/// `/slow` waits 2 s; `/hold` waits for [`Behavior::release`] before it
/// answers, `/hold-body` answers at once but ends its body only then; an
/// `Upgrade` request gets 101 and an echo of bytes; CONNECT gets 200,
/// `hello\n` and then an echo.
pub async fn http_backend(ip: &str, name: &str) -> Result<(SocketAddr, Arc<Behavior>)> {
    let listener = TcpListener::bind(format!("{ip}:0")).await?;
    let addr = listener.local_addr()?;
    let behavior = Arc::new(Behavior::default());
    let served = Arc::clone(&behavior);
    let name: Arc<str> = Arc::from(name);
    tokio::spawn(async move {
        loop {
            let down = served.down.notified();
            if served.is_down.load(Ordering::SeqCst) {
                // The listener goes with this task: connects are refused.
                return;
            }
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => return,
                },
                () = down => return,
            };
            let behavior = Arc::clone(&served);
            let name = Arc::clone(&name);
            tokio::spawn(async move {
                let crashed = Arc::clone(&behavior);
                let down = crashed.down.notified();
                if crashed.is_down.load(Ordering::SeqCst) {
                    return;
                }
                let service = hyper::service::service_fn(move |req| {
                    let behavior = Arc::clone(&behavior);
                    let name = Arc::clone(&name);
                    async move { Ok::<_, Infallible>(answer(req, &name, behavior).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let connection =
                    builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                tokio::select! {
                    _ = connection => {}
                    () = down => {}
                }
            });
        }
    });
    Ok((addr, behavior))
}

/// What the demo backend answers with: a whole body, or one held open.
type DemoBody = http_body_util::Either<Full<Bytes>, HeldBody>;

async fn answer(req: Request<Incoming>, name: &str, behavior: Arc<Behavior>) -> Response<DemoBody> {
    if req.uri().path() == "/hold-body" && behavior.fail_with.load(Ordering::Relaxed) == 0 {
        behavior.served.fetch_add(1, Ordering::Relaxed);
        let held = Arc::clone(&behavior);
        let mut r = Response::new(DemoBody::Right(HeldBody {
            first: Some(Bytes::from(format!("{name} held "))),
            rest: Box::pin(async move { held.hold().await }),
            last: Some(Bytes::from_static(b"released")),
        }));
        r.headers_mut()
            .insert("x-backend", name.parse().expect("ascii"));
        return r;
    }
    answer_whole(req, name, &behavior).await.map(DemoBody::Left)
}

async fn answer_whole(
    mut req: Request<Incoming>,
    name: &str,
    behavior: &Behavior,
) -> Response<Full<Bytes>> {
    behavior.served.fetch_add(1, Ordering::Relaxed);
    let fail = behavior.fail_with.load(Ordering::Relaxed);
    if fail != 0 {
        let mut r = Response::new(Full::new(Bytes::from(format!("{name} failing"))));
        *r.status_mut() = StatusCode::from_u16(fail).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r.headers_mut()
            .insert("x-backend", name.parse().expect("ascii"));
        // An app must not be able to pass for a sidecar: its inbound
        // sidecar drops this, or peers would retry even POSTs.
        r.headers_mut().insert(
            "x-meshwork-error",
            "connect-failure".parse().expect("ascii"),
        );
        return r;
    }
    if req.uri().path() == "/slow" {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    if req.uri().path() == "/hold" {
        behavior.hold().await;
    }
    let connect = req.method() == hyper::Method::CONNECT;
    if req.headers().contains_key(hyper::header::UPGRADE) || connect {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                // A tunnel's far end speaks first (as a database would).
                if connect && io.write_all(b"hello\n").await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                for _ in 0..100 {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        if connect {
            // What the tunnel was asked to reach.
            let target = req.uri().authority().map_or("", |a| a.as_str());
            if let Ok(v) = target.parse() {
                r.headers_mut().insert("x-connect-target", v);
            }
            return r;
        }
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", "echo".parse().expect("ascii"));
        r.headers_mut()
            .insert("connection", "upgrade".parse().expect("ascii"));
        return r;
    }
    let version = format!("{:?}", req.version());
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let seen: Vec<(String, String)> = [
        "x-request-id",
        "traceparent",
        "host",
        // What a gateway passes on (or must not).
        "x-forwarded-for",
        "x-forwarded-proto",
        "forwarded",
        "authorization",
        "x-api-key",
        "x-user",
        "x-jwt-payload",
    ]
    .iter()
    .filter_map(|h| {
        req.headers()
            .get(*h)
            .and_then(|v| v.to_str().ok())
            .map(|v| (format!("x-seen-{h}"), v.to_owned()))
    })
    .collect();
    let collected = req.into_body().collect().await.ok();
    let trailers = collected.as_ref().and_then(|c| c.trailers()).map(|t| {
        t.iter()
            .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
            .collect::<Vec<_>>()
            .join(",")
    });
    let body = collected.map(|c| c.to_bytes()).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(format!(
        "{name} {}",
        String::from_utf8_lossy(&body)
    ))));
    let headers = r.headers_mut();
    headers.insert("x-backend", name.parse().expect("ascii"));
    headers.insert("x-seen-version", version.parse().expect("ascii"));
    if let Ok(path) = path.parse() {
        headers.insert("x-seen-path", path);
    }
    if let Some(Ok(trailers)) = trailers.map(|t| t.parse()) {
        headers.insert("x-seen-trailers", trailers);
    }
    for (k, v) in seen {
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            v.parse(),
        ) {
            headers.insert(k, v);
        }
    }
    r
}

/// A TCP backend: reads until the client half-closes, then answers
/// `<name> got <n> bytes` and closes.
pub async fn tcp_backend(ip: &str, name: &str) -> Result<SocketAddr> {
    let listener = TcpListener::bind(format!("{ip}:0")).await?;
    let addr = listener.local_addr()?;
    let name = name.to_owned();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                if stream.read_to_end(&mut all).await.is_ok() {
                    let reply = format!("{name} got {} bytes", all.len());
                    let _ = stream.write_all(reply.as_bytes()).await;
                }
            });
        }
    });
    Ok(addr)
}

/// A gRPC backend serving `meshwork.v1.Watch/Subscribe` (server
/// streaming): three events for any topic, then OK; for the service name
/// `fail`, one event then NOT_FOUND in the trailers.
pub async fn grpc_backend(ip: &str) -> Result<SocketAddr> {
    use meshwork_proto::v1::watch_server::{Watch, WatchServer};
    use meshwork_proto::v1::{SubscribeRequest, WatchEvent, subscribe_request};
    use tonic::codegen::tokio_stream;

    struct Demo;

    #[tonic::async_trait]
    impl Watch for Demo {
        type SubscribeStream =
            tokio_stream::Iter<std::vec::IntoIter<Result<WatchEvent, tonic::Status>>>;

        async fn subscribe(
            &self,
            request: tonic::Request<SubscribeRequest>,
        ) -> Result<tonic::Response<Self::SubscribeStream>, tonic::Status> {
            let name = match request.into_inner().topic {
                Some(subscribe_request::Topic::Service(s)) => s.name,
                _ => String::new(),
            };
            let event = |index| {
                Ok(WatchEvent {
                    kind: 3,
                    index,
                    ..WatchEvent::default()
                })
            };
            let events = if name == "fail" {
                vec![
                    event(1),
                    Err(tonic::Status::not_found("no such demo topic")),
                ]
            } else {
                vec![event(1), event(2), event(3)]
            };
            Ok(tonic::Response::new(tokio_stream::iter(events)))
        }
    }

    let listener = TcpListener::bind(format!("{ip}:0")).await?;
    let addr = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WatchServer::new(Demo))
            .serve_with_incoming(incoming),
    );
    Ok(addr)
}

/// A tiny HTTP/1.1 server on `ip` (port chosen by the system) answering
/// every request with the status currently in `status` and the body
/// `body(status)`, then closing the connection.
pub async fn status_app(
    ip: &str,
    status: Arc<AtomicU16>,
    body: fn(u16) -> String,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind(format!("{ip}:0")).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let status = status.load(Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = socket.read(&mut buf).await;
                let body = body(status);
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// Serves `grpc.health.v1.Health` on `ip`, answering SERVING while the
/// flag is set: (port, flag).
pub async fn grpc_health_backend(ip: &str) -> Result<(u16, Arc<AtomicBool>)> {
    use meshwork_proto::grpc_health::health_check_response::ServingStatus;
    use meshwork_proto::grpc_health::health_server::{Health, HealthServer};
    use meshwork_proto::grpc_health::{HealthCheckRequest, HealthCheckResponse};
    use tonic::{Request, Response, Status};

    struct Demo(Arc<AtomicBool>);

    #[tonic::async_trait]
    impl Health for Demo {
        async fn check(
            &self,
            _request: Request<HealthCheckRequest>,
        ) -> Result<Response<HealthCheckResponse>, Status> {
            let status = if self.0.load(Ordering::Relaxed) {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            Ok(Response::new(HealthCheckResponse {
                status: status as i32,
            }))
        }
    }

    let listener = TcpListener::bind(format!("{ip}:0")).await?;
    let port = listener.local_addr()?.port();
    let serving = Arc::new(AtomicBool::new(true));
    let service = HealthServer::new(Demo(Arc::clone(&serving)));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    Ok((port, serving))
}
