//! The little HTTP/1.1 client meshctl needs: one request per connection
//! to the registry's REST API, with a deadline and the token header.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use super::CtlError;

/// Where and how to reach the registry.
#[derive(Debug, Clone)]
pub struct Client {
    /// `host:port`.
    addr: String,
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
    /// `addr` may be `host:port` or `http://host:port` (as in
    /// `CONSUL_HTTP_ADDR`).
    pub fn new(addr: &str, token: Option<&str>, timeout: Duration) -> Result<Self, CtlError> {
        let trimmed = addr.trim().trim_end_matches('/');
        if trimmed.starts_with("https://") {
            return Err(CtlError::Usage(format!(
                "{addr}: HTTPS is not supported by the registry's REST API yet; use http://HOST:PORT"
            )));
        }
        let bare = trimmed.strip_prefix("http://").unwrap_or(trimmed);
        let valid = bare
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            && !bare.contains('/');
        if !valid {
            return Err(CtlError::Usage(format!(
                "invalid HTTP address {addr:?}: want HOST:PORT, e.g. 127.0.0.1:8500 (--http-addr or MESHWORK_HTTP_ADDR)"
            )));
        }
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
        Ok(Self {
            addr: bare.to_owned(),
            token,
            timeout,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends one request; connection trouble and timeouts are
    /// [`CtlError::Unreachable`], any answer is returned as it is.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
    ) -> Result<Reply, CtlError> {
        let sent = std::sync::atomic::AtomicBool::new(false);
        match tokio::time::timeout(
            self.timeout,
            self.exchange(method, path_and_query, body, &sent),
        )
        .await
        {
            Ok(result) => result,
            Err(_) if sent.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(CtlError::OutcomeUnknown(format!(
                    "{} took the request but did not answer within {:?}; it may still take effect: \
                     check (e.g. `meshctl members`, `meshctl kv get`) or raise --timeout",
                    self.addr, self.timeout
                )))
            }
            Err(_) => Err(CtlError::Unreachable(format!(
                "no answer from {} within {:?}; is the registry up and is --http-addr right?",
                self.addr, self.timeout
            ))),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
        sent: &std::sync::atomic::AtomicBool,
    ) -> Result<Reply, CtlError> {
        let lost = |e: &dyn std::fmt::Display| {
            CtlError::OutcomeUnknown(format!(
                "the request reached {} but its answer was lost ({e}); it may have taken effect: check before retrying",
                self.addr
            ))
        };
        let unreachable = |e: &dyn std::fmt::Display| {
            CtlError::Unreachable(format!(
                "cannot reach the registry at {}: {e}; is it running, and is --http-addr (or MESHWORK_HTTP_ADDR) right?",
                self.addr
            ))
        };
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| unreachable(&e))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
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
