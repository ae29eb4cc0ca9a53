//! The little HTTP/1.1 client meshctl needs: one request per connection
//! to the registry's REST API, plain or over TLS, with a deadline and the
//! token header.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::CtlError;
use super::https::{Endpoint, Tls};

/// What an HTTPS port answers a plain HTTP request with (Go's servers and
/// the registry alike).
const PLAIN_TO_HTTPS: &str = "Client sent an HTTP request to an HTTPS server";

/// Where and how to reach the registry.
#[derive(Debug, Clone)]
pub struct Client {
    /// `host:port`.
    addr: String,
    /// `None`: plain HTTP.
    tls: Option<Arc<Tls>>,
    token: Option<HeaderValue>,
    timeout: Duration,
}

/// An answer: status, `X-Consul-Index`, body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub index: Option<u64>,
    pub body: Bytes,
}

impl Client {
    /// Plain HTTP: `addr` may be `host:port` or `http://host:port` (as in
    /// `CONSUL_HTTP_ADDR`); `https://host:port` needs [`Client::connect`]
    /// and a CA file.
    pub fn new(addr: &str, token: Option<&str>, timeout: Duration) -> Result<Self, CtlError> {
        Self::connect(&Endpoint::parse(addr, || Ok(false))?, token, timeout)
    }

    /// A client of `endpoint`; its TLS files, if any, are read now.
    pub fn connect(
        endpoint: &Endpoint,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, CtlError> {
        let token = match token {
            None | Some("") => None,
            Some(t) => {
                // Never echoed: the token is a secret.
                let mut value = HeaderValue::from_str(t).map_err(|_| {
                    CtlError::Usage(
                        "invalid token: it must be printable ASCII without line breaks \
                         (--token, --token-file, MESHWORK_HTTP_TOKEN or CONSUL_HTTP_TOKEN)"
                            .into(),
                    )
                })?;
                // Shown as "Sensitive" by Debug.
                value.set_sensitive(true);
                Some(value)
            }
        };
        let tls = match &endpoint.tls {
            None => None,
            Some(files) => Some(Arc::new(Tls::load(files, endpoint)?)),
        };
        Ok(Self {
            addr: endpoint.addr.clone(),
            tls,
            token,
            timeout,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends one request; connection trouble and timeouts are
    /// [`CtlError::Unreachable`], any answer is returned as it is (but a
    /// plain request to an HTTPS port is bad usage).
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
    ) -> Result<Reply, CtlError> {
        let sent = std::sync::atomic::AtomicBool::new(false);
        let reply = match tokio::time::timeout(
            self.timeout,
            self.exchange(method, path_and_query, body, &sent),
        )
        .await
        {
            Ok(result) => result?,
            Err(_) if sent.load(std::sync::atomic::Ordering::Relaxed) => {
                return Err(CtlError::OutcomeUnknown(format!(
                    "{} took the request but did not answer within {:?}; it may still take effect: \
                     check (e.g. `meshctl members`, `meshctl kv get`) or raise --timeout",
                    self.addr, self.timeout
                )));
            }
            Err(_) => {
                return Err(CtlError::Unreachable(format!(
                    "no answer from {} within {:?}; is the registry up and is --http-addr right?",
                    self.addr, self.timeout
                )));
            }
        };
        if self.tls.is_none() && reply.status == StatusCode::BAD_REQUEST {
            let text = String::from_utf8_lossy(&reply.body);
            let text = text.trim();
            if text.starts_with(PLAIN_TO_HTTPS) {
                return Err(CtlError::Usage(format!(
                    "{} answered 400 \"{text}\": it is an HTTPS port; use --http-addr https://{} \
                     with --ca-file (or MESHWORK_HTTP_SSL=true)",
                    self.addr, self.addr
                )));
            }
        }
        Ok(reply)
    }

    /// Connects (and for HTTPS, completes the handshake), then sends.
    async fn exchange(
        &self,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
        sent: &std::sync::atomic::AtomicBool,
    ) -> Result<Reply, CtlError> {
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| self.unreachable(&e))?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => {
                self.request(stream, method, path_and_query, body, sent)
                    .await
            }
            Some(tls) => {
                let stream = tls
                    .connect(stream)
                    .await
                    .map_err(|e| tls.handshake_error(&self.addr, &e))?;
                self.request(stream, method, path_and_query, body, sent)
                    .await
            }
        }
    }

    fn unreachable(&self, e: &dyn std::fmt::Display) -> CtlError {
        CtlError::Unreachable(format!(
            "cannot reach the registry at {}: {e}; is it running, and is --http-addr (or MESHWORK_HTTP_ADDR) right?",
            self.addr
        ))
    }

    /// One request and its answer over `stream`.
    async fn request<S>(
        &self,
        stream: S,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
        sent: &std::sync::atomic::AtomicBool,
    ) -> Result<Reply, CtlError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let lost = |e: &(dyn std::error::Error + 'static)| {
            // A registry refusing our certificate (TLS 1.3: after our side
            // of the handshake) read no request: that is no lost answer.
            if let Some(refused) = self.tls.as_ref().and_then(|tls| tls.refusal(&self.addr, e)) {
                return refused;
            }
            CtlError::OutcomeUnknown(format!(
                "the request reached {} but its answer was lost ({e}); it may have taken effect: check before retrying",
                self.addr
            ))
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(&e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(HOST, self.addr.as_str())
            .header(CONTENT_TYPE, "application/octet-stream");
        if let Some(token) = &self.token {
            request = request.header("X-Consul-Token", token.clone());
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CtlError::Usage(format!("bad request {path_and_query:?}: {e}")))?;
        sent.store(true, std::sync::atomic::Ordering::Relaxed);
        let response = sender.send_request(request).await.map_err(|e| lost(&e))?;
        let status = response.status();
        let index = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| lost(&e))?
            .to_bytes();
        Ok(Reply {
            status,
            index,
            body,
        })
    }
}

impl Reply {
    /// The body when the status is a success; otherwise the server's
    /// message as an error (404 as [`CtlError::NotFound`]).
    pub fn ok(self) -> Result<Bytes, CtlError> {
        if self.status.is_success() {
            return Ok(self.body);
        }
        let message = String::from_utf8_lossy(&self.body).trim().to_owned();
        let message = if message.is_empty() {
            self.status.to_string()
        } else {
            message
        };
        Err(match self.status {
            StatusCode::NOT_FOUND => CtlError::NotFound(message),
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => CtlError::Server(format!(
                "{message} (check --token, --token-file or MESHWORK_HTTP_TOKEN)"
            )),
            status => CtlError::Server(format!("{}: {message}", status.as_u16())),
        })
    }

    /// The body parsed as JSON, after [`Reply::ok`].
    pub fn json(self) -> Result<serde_json::Value, CtlError> {
        let body = self.ok()?;
        serde_json::from_slice(&body)
            .map_err(|e| CtlError::Server(format!("the registry sent invalid JSON: {e}")))
    }
}
