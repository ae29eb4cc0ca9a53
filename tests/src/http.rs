//! Clients for the end-to-end suites: a reqwest client with the suites'
//! timeout, HTTP/1.1 and HTTP/2 (prior knowledge) hyper clients, raw HTTP/1.1 and
//! HTTP/2 bytes on a socket, a request body with trailers, and a load
//! generator that counts answers and failures.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use bytes::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A reqwest client with a 10 s timeout per request.
pub fn http_client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// `GET url` with `client`, as JSON, if it answers (for bounded waits).
pub async fn get_json(client: &reqwest::Client, url: &str) -> Option<serde_json::Value> {
    client.get(url).send().await.ok()?.json().await.ok()
}

/// A hyper client speaking HTTP/2 only (prior knowledge, no TLS), sending
/// bodies of type `B`.
pub fn h2_client<B>() -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<B>()
}

/// A hyper client speaking HTTP/1.1 only, sending bodies of type `B` (a
/// body with no exact size goes chunked).
pub fn h1_client<B>() -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new()).build_http::<B>()
}

/// A raw HTTP/1.1 exchange: writes `request`, reads until the server
/// closes or 2 s pass.
pub async fn raw_exchange(addr: &str, request: &[u8]) -> Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The body of `GET url`, or why not.
pub async fn body_of(http: &reqwest::Client, url: &str) -> Result<String> {
    let r = http.get(url).send().await?;
    ensure!(r.status() == 200, "{url}: {}", r.status());
    Ok(r.text().await?)
}

/// One HTTP/2 frame: 9-byte header and payload.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// One 64 KiB frame of a streamed [`Trailed`] body.
pub const CHUNK: &[u8] = &[b'z'; 64 * 1024];

/// A request body: `left - 1` frames of `chunk`, then an `x-sum: done`
/// trailer. It declares no length (a request may say one in its head).
pub struct Trailed {
    pub chunk: &'static [u8],
    pub left: usize,
}

impl hyper::body::Body for Trailed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        use hyper::body::Frame;
        let frame = match self.left {
            0 => None,
            1 => {
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("x-sum", hyper::header::HeaderValue::from_static("done"));
                Some(Ok(Frame::trailers(trailers)))
            }
            _ => Some(Ok(Frame::data(Bytes::from_static(self.chunk)))),
        };
        self.left = self.left.saturating_sub(1);
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

/// Four workers sending requests to `url` until stopped (GETs, or GETs
/// and POSTs in turn), counting 200 answers and failures.
pub struct Load {
    ok: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(url: &str, with_posts: bool) -> Self {
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..4)
            .map(|w| {
                let (url, failures, ok, stop) = (
                    url.to_owned(),
                    Arc::clone(&failures),
                    Arc::clone(&ok),
                    Arc::clone(&stop),
                );
                tokio::spawn(async move {
                    let http = http_client().expect("client");
                    for i in 0..100_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        // POSTs too: a request that never reached an app
                        // is safe to send to another whatever its method.
                        let request = if !with_posts || (w + i) % 2 == 0 {
                            http.get(&url)
                        } else {
                            http.post(&url).body(format!("order {w}-{i}"))
                        };
                        match request.send().await {
                            Ok(r) if r.status() == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => {
                                eprintln!(
                                    "failed: {} {:?}",
                                    r.status(),
                                    r.headers().get("x-meshwork-error")
                                );
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                eprintln!("failed: {e}");
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            ok,
            failures,
            stop,
            workers,
        }
    }

    /// Requests answered 200 so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the workers; (answered 200, failed).
    pub async fn stop(self) -> Result<(usize, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await?;
        }
        Ok((
            self.ok.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        ))
    }
}
