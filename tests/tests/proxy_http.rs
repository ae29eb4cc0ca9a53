//! The sidecar's data plane end to end, HTTP/1.1 and TCP: balancing,
//! headers, access log, streamed bodies, consistent hashing, registry
//! weights, upgrades, and TCP half-close with connect retries. Through
//! real `meshwork-registry` and `meshwork-sidecar` processes and demo
//! backends (hyper and tonic servers). Traffic goes app → client sidecar
//! (outbound listener) → server sidecar (inbound listener) → backend, as in
//! production.
//!
//! Every address is on the cluster's own `127.x.y.0/24`; every loop is
//! bounded in count and time. The harness (the mesh, its sidecars, the demo
//! backends and the clients) is in `meshwork_tests::{sidecar, apps, http}`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshwork_tests::apps::{http_backend, tcp_backend};
use meshwork_tests::http::{http_client, raw_exchange};
use meshwork_tests::sidecar::{INBOUND_PORT, Mesh, Service, UPSTREAM_PORT, echo_behind_client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn http1_through_two_sidecars_spreads_evenly_and_passes_headers() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (instances, client_ip, c) = echo_behind_client(
        &mut mesh,
        3,
        "name = \"echo\"\nprotocol = \"http\"\nbalance = \"round_robin\"",
    )
    .await?;
    // The endpoints are the sidecars' inbound listeners, not the apps.
    let endpoints = mesh.sidecars[c].endpoints().await?;
    for k in 0..3u8 {
        let inbound = format!("{}:{INBOUND_PORT}", mesh.ip(20 + k));
        ensure!(
            endpoints.iter().any(|e| e.0 == inbound),
            "{inbound} in {endpoints:?}"
        );
    }
    let http = http_client()?;
    let url = format!("http://{client_ip}:{UPSTREAM_PORT}");
    let mut counts = std::collections::HashMap::new();
    for i in 0..300 {
        let r = http
            .post(format!("{url}/hello"))
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .body(format!("n{i}"))
            .send()
            .await?;
        ensure!(r.status() == 200, "request {i}: {}", r.status());
        let backend = r.headers()["x-backend"].to_str()?.to_owned();
        ensure!(
            r.headers().contains_key("x-seen-x-request-id"),
            "x-request-id added"
        );
        ensure!(
            r.headers()["x-seen-traceparent"]
                == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "traceparent passed through"
        );
        let body = r.text().await?;
        ensure!(body == format!("{backend} n{i}"), "{body}");
        *counts.entry(backend).or_insert(0) += 1;
    }
    // Round robin over three: exactly even.
    ensure!(
        counts.len() == 3 && counts.values().all(|n| *n == 100),
        "{counts:?}"
    );
    for (_, behavior, _) in &instances {
        ensure!(behavior.served.load(Ordering::Relaxed) == 100);
    }
    // An x-request-id the app sent is kept.
    let r = http
        .get(&url)
        .header("x-request-id", "abc-123")
        .send()
        .await?;
    ensure!(r.headers()["x-seen-x-request-id"] == "abc-123");
    // Metrics count them, in both sidecars.
    let client_2xx = mesh.sidecars[c]
        .metric_sum("meshwork_proxy_requests_total{direction=\"outbound\",upstream=\"echo\",class=\"2xx\",outcome=\"upstream\"}")
        .await?;
    ensure!(client_2xx == 301.0, "client 2xx = {client_2xx}");
    let inbound_2xx = mesh.sidecars[instances[0].2]
        .metric_sum("meshwork_proxy_requests_total{direction=\"inbound\"")
        .await?;
    ensure!(inbound_2xx >= 100.0, "inbound = {inbound_2xx}");
    // The access log has a JSON line per request.
    let access = std::fs::read_to_string(&mesh.sidecars[c].access_log)?;
    let line: serde_json::Value =
        serde_json::from_str(access.lines().next().context("an access log line")?)?;
    ensure!(
        line["upstream"] == "echo" && line["status"] == 200,
        "{line}"
    );
    ensure!(
        line["method"] == "POST" && line["path"] == "/hello",
        "{line}"
    );
    ensure!(
        line["traceparent"].is_string() && line["request_id"].is_string(),
        "{line}"
    );
    // Bodies that cannot be kept for a retry are streamed after the head
    // rather than sent with it: one over 64 KiB, and a chunked one.
    let big = "b".repeat(200 * 1024);
    let r = http
        .post(format!("{url}/hello"))
        .body(big.clone())
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let body = r.text().await?;
    ensure!(
        body.ends_with(&big) && body.len() > big.len(),
        "{} bytes",
        body.len()
    );
    let reply = raw_exchange(
        &format!("{client_ip}:{UPSTREAM_PORT}"),
        b"POST /hello HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n6\r\nchunk \r\n4\r\nsent\r\n0\r\n\r\n",
    )
    .await?;
    ensure!(
        reply.starts_with("HTTP/1.1 200") && reply.ends_with(" chunk sent"),
        "{reply}"
    );
    // Consistent hashing on a header: one user, one backend.
    let c2_ip = mesh.ip(101);
    let c2 = mesh
        .client_sidecar(
            &c2_ip,
            "name = \"echo\"\nprotocol = \"http\"\nbalance = \"ring_hash\"\nhash_header = \"x-user\"",
        )
        .await?;
    mesh.sidecars[c2].wait_endpoints(3).await?;
    let mut seen_backends = std::collections::HashSet::new();
    for user in 0..12 {
        let mut backends = std::collections::HashSet::new();
        for _ in 0..5 {
            let r = http
                .get(format!("http://{c2_ip}:{UPSTREAM_PORT}/"))
                .header("x-user", format!("user-{user}"))
                .send()
                .await?;
            backends.insert(r.headers()["x-backend"].to_str()?.to_owned());
        }
        ensure!(backends.len() == 1, "user-{user} went to {backends:?}");
        seen_backends.extend(backends);
    }
    ensure!(
        seen_backends.len() >= 2,
        "users spread over backends: {seen_backends:?}"
    );
    let config = mesh.sidecars[c].json("/config").await?;
    ensure!(
        config["upstreams"][0]["upstream"]["name"] == "echo",
        "{config}"
    );
    ensure!(
        config["upstreams"][0]["endpoints"].as_array().map(Vec::len) == Some(3),
        "{config}"
    );
    mesh.done();
    Ok(())
}

#[tokio::test]
async fn tcp_through_two_sidecars_half_closes_and_retries_connects() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    for k in 0..2u8 {
        let ip = mesh.ip(20 + k);
        let name = format!("tcp-{k}");
        let app = tcp_backend(&ip, &name).await?;
        mesh.server_sidecar(
            &ip,
            Service {
                name: "blob",
                id: &name,
                app,
                protocol: "tcp",
            },
        )
        .await?;
    }
    // A third instance registered over REST (no sidecar) whose port is
    // closed: connects to it fail and go to another endpoint.
    let dead = mesh.ip(30);
    let registry = mesh.cluster().servers[0].http();
    let r = mesh
        .cluster()
        .http
        .put(format!("{registry}/v1/agent/service/register"))
        .json(&serde_json::json!({"Name": "blob", "ID": "blob-dead", "Address": dead, "Port": 1}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "register: {}", r.status());
    let client_ip = mesh.ip(100);
    let c = mesh
        .client_sidecar(
            &client_ip,
            "name = \"blob\"\nprotocol = \"tcp\"\nretries = { attempts = 2, on = [\"connect-failure\"] }",
        )
        .await?;
    mesh.sidecars[c].wait_endpoints(3).await?;
    let payload = vec![7u8; 200_000];
    for i in 0..30 {
        let mut s = TcpStream::connect(format!("{client_ip}:{UPSTREAM_PORT}")).await?;
        s.write_all(&payload).await?;
        // Half-close: the backend answers only after it sees our FIN, and
        // its answer must still reach us.
        s.shutdown().await?;
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut reply))
            .await
            .context("reply in time")??;
        ensure!(
            reply.ends_with("got 200000 bytes"),
            "connection {i}: {reply:?}"
        );
    }
    let failures = mesh.sidecars[c]
        .metric_sum("meshwork_proxy_connect_failures_total{direction=\"outbound\"")
        .await?;
    ensure!(failures >= 1.0, "the dead endpoint was tried: {failures}");
    // Bytes are bytes; but HTTP on a tcp upstream is said once (the
    // default protocol would silently give up retries and request ids).
    const WARNING: &str = "its client speaks HTTP";
    ensure!(
        !mesh.sidecars[c].log_tail().contains(WARNING),
        "warned without HTTP"
    );
    let mut warned = false;
    for _ in 0..20 {
        let mut s = TcpStream::connect(format!("{client_ip}:{UPSTREAM_PORT}")).await?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: blob\r\n\r\n").await?;
        s.shutdown().await?;
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut reply))
            .await
            .context("reply in time")??;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if mesh.sidecars[c].log_tail().contains(WARNING) {
            warned = true;
            break;
        }
    }
    ensure!(warned, "no warning: {}", mesh.sidecars[c].log_tail());
    mesh.done();
    Ok(())
}

#[tokio::test]
async fn upgrades_are_passed_through() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (_, client_ip, _c) =
        echo_behind_client(&mut mesh, 1, "name = \"echo\"\nprotocol = \"http\"").await?;
    let mut s = TcpStream::connect(format!("{client_ip}:{UPSTREAM_PORT}")).await?;
    s.write_all(b"GET /ws HTTP/1.1\r\nhost: echo\r\nconnection: Upgrade\r\nupgrade: echo\r\n\r\n")
        .await?;
    let head = read_head(&mut s).await?;
    ensure!(head.starts_with("http/1.1 101"), "{head}");
    ensure!(head.contains("upgrade: echo"), "{head}");
    echo_frames(&mut s).await?;
    // CONNECT: a tunnel through both sidecars to what the client named,
    // opened by a 2xx; the far end's first bytes come through too.
    let mut s = TcpStream::connect(format!("{client_ip}:{UPSTREAM_PORT}")).await?;
    s.write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nhost: db.internal:5432\r\n\r\n")
        .await?;
    let head = read_head(&mut s).await?;
    ensure!(head.starts_with("http/1.1 200"), "{head}");
    ensure!(
        head.contains("x-connect-target: db.internal:5432"),
        "{head}"
    );
    let mut hello = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut hello)).await??;
    ensure!(
        &hello == b"hello\n",
        "{:?}",
        String::from_utf8_lossy(&hello)
    );
    echo_frames(&mut s).await?;
    mesh.done();
    Ok(())
}

/// A response head read byte by byte (nothing after it), lowercased.
async fn read_head(s: &mut TcpStream) -> Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    for _ in 0..4096 {
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut byte)).await??;
        head.push(byte[0]);
        if head.ends_with(b"\r\n\r\n") {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&head).to_lowercase())
}

/// Five messages echoed over an upgraded connection or tunnel.
async fn echo_frames(s: &mut TcpStream) -> Result<()> {
    for i in 0..5 {
        let msg = format!("frame {i}");
        s.write_all(msg.as_bytes()).await?;
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await??;
        ensure!(
            back == msg.as_bytes(),
            "echoed over the upgraded connection"
        );
    }
    Ok(())
}

#[tokio::test]
async fn registry_weights_shape_the_spread() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    // Two instances registered over REST (no sidecars: dialled directly)
    // with Consul weights 3 and 1.
    let registry = mesh.cluster().servers[0].http();
    let mut behaviors = Vec::new();
    for (k, weight) in [(0u8, 3u32), (1, 1)] {
        let ip = mesh.ip(40 + k);
        let (app, behavior) = http_backend(&ip, &format!("weighted-{k}")).await?;
        let r = mesh
            .cluster()
            .http
            .put(format!("{registry}/v1/agent/service/register"))
            .json(&serde_json::json!({
                "Name": "weighted",
                "ID": format!("weighted-{k}"),
                "Address": ip,
                "Port": app.port(),
                "Weights": {"Passing": weight, "Warning": 1},
            }))
            .send()
            .await?;
        ensure!(r.status().is_success(), "register: {}", r.status());
        behaviors.push(behavior);
    }
    let client_ip = mesh.ip(100);
    let c = mesh
        .client_sidecar(&client_ip, "name = \"weighted\"\nprotocol = \"http\"")
        .await?;
    mesh.sidecars[c].wait_endpoints(2).await?;
    let http = http_client()?;
    for _ in 0..200 {
        let r = http
            .get(format!("http://{client_ip}:{UPSTREAM_PORT}/"))
            .send()
            .await?;
        ensure!(r.status() == 200);
    }
    let (heavy, light) = (
        behaviors[0].served.load(Ordering::Relaxed),
        behaviors[1].served.load(Ordering::Relaxed),
    );
    ensure!(
        heavy == 150 && light == 50,
        "weights 3:1 gave {heavy}:{light}"
    );
    mesh.done();
    Ok(())
}
