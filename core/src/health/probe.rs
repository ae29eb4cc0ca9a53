//! One probe run of an HTTP or TCP check, as Consul runs them: HTTP 2xx is
//! passing, 429 warning, anything else critical, and redirects are not
//! followed; TCP passes when a connection opens. Each run is bounded by the
//! check's timeout.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{CheckDefinition, HealthStatus};

/// How much of an HTTP check's body goes into its output.
const BODY_HEAD: usize = 4 * 1024;

/// A probe's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub status: HealthStatus,
    pub output: String,
}

impl ProbeResult {
    fn critical(output: String) -> Self {
        ProbeResult {
            status: HealthStatus::Critical,
            output,
        }
    }
}

/// Runs the check once. `None` for checks the registry does not probe (TTL).
pub async fn run(def: &CheckDefinition) -> Option<ProbeResult> {
    let timeout = Duration::from_millis(def.timeout_ms.unwrap_or(10_000));
    if let Some(url) = &def.http {
        let method = def.method.as_deref().unwrap_or("GET");
        let result = tokio::time::timeout(timeout, http_probe(url, method, def)).await;
        return Some(result.unwrap_or_else(|_| {
            ProbeResult::critical(format!("Get {url:?}: timed out after {timeout:?}"))
        }));
    }
    if let Some(addr) = &def.tcp {
        let result = tokio::time::timeout(timeout, TcpStream::connect(addr)).await;
        return Some(match result {
            Ok(Ok(_)) => ProbeResult {
                status: HealthStatus::Passing,
                output: format!("TCP connect {addr}: Success"),
            },
            Ok(Err(e)) => ProbeResult::critical(format!("dial tcp {addr}: {e}")),
            Err(_) => {
                ProbeResult::critical(format!("dial tcp {addr}: i/o timeout after {timeout:?}"))
            }
        });
    }
    None
}

async fn http_probe(url: &str, method: &str, def: &CheckDefinition) -> ProbeResult {
    match http_request(url, method, def).await {
        Ok((code, reason, body)) => {
            let status = match code {
                200..=299 => HealthStatus::Passing,
                429 => HealthStatus::Warning,
                _ => HealthStatus::Critical,
            };
            ProbeResult {
                status,
                output: format!("HTTP {method} {url}: {code} {reason} Output: {body}"),
            }
        }
        Err(e) => ProbeResult::critical(format!("{method} {url:?}: {e}")),
    }
}

async fn http_request(
    url: &str,
    method: &str,
    def: &CheckDefinition,
) -> Result<(u16, String, String), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("invalid URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// checks are run by the registry".into());
    }
    let host = uri.host().ok_or("URL has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let stream = TcpStream::connect((host.trim_matches(|c| c == '[' || c == ']'), port))
        .await
        .map_err(|e| format!("dial tcp {authority}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "Meshwork Health Check")
        .header(hyper::header::ACCEPT, "text/plain, text/*, */*");
    for (name, values) in &def.header {
        for value in values {
            request = request.header(name.as_str(), value.as_str());
        }
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let code = response.status();
        let reason = code.canonical_reason().unwrap_or("").to_owned();
        // Read at most the head of the body; the rest is not needed.
        let mut body = Limited::new(response.into_body(), usize::MAX);
        let mut head = Vec::new();
        while head.len() < BODY_HEAD {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        head.extend_from_slice(data);
                    }
                }
                _ => break,
            }
        }
        head.truncate(BODY_HEAD);
        Ok((
            code.as_u16(),
            reason,
            String::from_utf8_lossy(&head).into_owned(),
        ))
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn serve_once(response: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(response.as_bytes()).await;
            }
        });
        format!("http://{addr}/health")
    }

    fn http_def(url: String) -> CheckDefinition {
        CheckDefinition {
            http: Some(url),
            timeout_ms: Some(2000),
            interval_ms: Some(1000),
            ..CheckDefinition::default()
        }
    }

    #[tokio::test]
    async fn http_status_classes() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                HealthStatus::Passing,
            ),
            (
                "HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n",
                HealthStatus::Warning,
            ),
            (
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
                HealthStatus::Critical,
            ),
            (
                "HTTP/1.1 302 Found\r\nlocation: /x\r\ncontent-length: 0\r\n\r\n",
                HealthStatus::Critical,
            ),
        ];
        for (response, want) in cases {
            let url = serve_once(response).await;
            let result = run(&http_def(url)).await.expect("probed");
            assert_eq!(result.status, want, "{}", result.output);
        }
        let url = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
        let result = run(&http_def(url)).await.expect("probed");
        assert!(
            result.output.contains("200 OK Output: hello"),
            "{}",
            result.output
        );
    }

    #[tokio::test]
    async fn unreachable_and_tcp() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let result = run(&http_def(format!("http://{open}/")))
            .await
            .expect("probed");
        assert_eq!(result.status, HealthStatus::Critical);
        let def = CheckDefinition {
            tcp: Some(open.clone()),
            timeout_ms: Some(1000),
            ..CheckDefinition::default()
        };
        assert_eq!(
            run(&def).await.map(|r| r.status),
            Some(HealthStatus::Critical)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let def = CheckDefinition {
            tcp: Some(listener.local_addr().expect("addr").to_string()),
            timeout_ms: Some(1000),
            ..CheckDefinition::default()
        };
        assert_eq!(
            run(&def).await.map(|r| r.status),
            Some(HealthStatus::Passing)
        );
        let ttl = CheckDefinition {
            ttl_ms: Some(1000),
            ..CheckDefinition::default()
        };
        assert_eq!(run(&ttl).await, None);
    }
}
