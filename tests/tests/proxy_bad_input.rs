//! The sidecar's data plane end to end against hostile clients: request
//! smuggling, bad headers, oversized heads, slowloris and silent
//! connections, HTTP/2 rapid reset (and its limit of 20 resets) and
//! CONTINUATION floods, each refused
//! without harming other clients. Through
//! real `meshwork-registry` and `meshwork-sidecar` processes and demo
//! backends (hyper and tonic servers). Traffic goes app → client sidecar
//! (outbound listener) → server sidecar (inbound listener) → backend, as in
//! production.
//!
//! Every address is on the cluster's own `127.x.y.0/24`; every loop is
//! bounded in count and time. The harness (the mesh, its sidecars, the demo
//! backends and the clients) is in `meshwork_tests::{sidecar, apps, http}`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use meshwork_tests::http::{h2_client, h2_frame, http_client, raw_exchange};
use meshwork_tests::sidecar::{Mesh, UPSTREAM_PORT, echo_behind_client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn bad_input_is_refused_without_harming_others() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (instances, client_ip, _) =
        echo_behind_client(&mut mesh, 1, "name = \"echo\"\nprotocol = \"http\"").await?;
    let addr = format!("{client_ip}:{UPSTREAM_PORT}");
    let served = || instances[0].1.served.load(Ordering::Relaxed);

    // Smuggling: Content-Length and Transfer-Encoding together. The body
    // is read as chunked, and the connection is closed after the answer,
    // so the "hidden" request is never seen as a request.
    let before = served();
    let reply = raw_exchange(
        &addr,
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await?;
    let answers = reply.lines().filter(|l| l.starts_with("HTTP/1.1 ")).count();
    ensure!(answers <= 1, "one answer at most: {reply}");
    ensure!(
        reply.to_lowercase().contains("connection: close"),
        "closed after the answer: {reply}"
    );
    ensure!(
        served() - before <= 1,
        "no smuggled request reached the app"
    );
    // Two different Content-Lengths: 400.
    let reply = raw_exchange(
        &addr,
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 5\r\n\r\nabcde",
    )
    .await?;
    ensure!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    // NUL and bare CR in a header: 400.
    for bad in [&b"x-a: a\0b\r\n"[..], &b"x-a: a\rb\r\n"[..]] {
        let mut req = b"GET / HTTP/1.1\r\nhost: x\r\n".to_vec();
        req.extend_from_slice(bad);
        req.extend_from_slice(b"\r\n");
        let reply = raw_exchange(&addr, &req).await?;
        ensure!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    }
    // Host and the request target (RFC 9112 §3.2–3.3): two Hosts, an
    // HTTP/1.1 request without one, and an origin-form target without its
    // leading / are refused before anything goes upstream.
    let before = served();
    for bad in [
        &b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n"[..],
        &b"GET / HTTP/1.1\r\nx-a: b\r\n\r\n"[..],
        &b"GET c-noslash HTTP/1.1\r\nhost: x\r\n\r\n"[..],
    ] {
        let reply = raw_exchange(&addr, bad).await?;
        ensure!(reply.starts_with("HTTP/1.1 400"), "{bad:?}: {reply:?}");
    }
    ensure!(served() == before, "a refused request reached the app");
    // The absolute form's authority replaces Host on the way up.
    let reply = raw_exchange(
        &addr,
        b"GET http://real.example/x HTTP/1.1\r\nhost: fake.example\r\nconnection: close\r\n\r\n",
    )
    .await?;
    ensure!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    ensure!(
        reply
            .to_lowercase()
            .contains("x-seen-host: real.example\r\n"),
        "the app saw another Host: {reply:?}"
    );
    // Headers over 64 KiB: 431.
    let mut req = b"GET / HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..80 {
        req.extend_from_slice(format!("x-filler-{i}: {}\r\n", "a".repeat(1000)).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let reply = raw_exchange(&addr, &req).await?;
    ensure!(reply.starts_with("HTTP/1.1 431"), "{reply:?}");
    // A keep-alive connection used once, then idle past the 10 s head
    // timeout below: it stays open and serves the next request.
    let mut keep = TcpStream::connect(&addr).await?;
    let one = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    keep.write_all(one).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), keep.read(&mut buf)).await??;
    ensure!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // A client that connects and sends nothing is dropped as well.
    let mut silent = TcpStream::connect(&addr).await?;
    let silent_closed = tokio::spawn(async move {
        let mut buf = [0u8; 16];
        tokio::time::timeout(Duration::from_secs(14), silent.read(&mut buf))
            .await
            .is_ok()
    });
    // Slowloris: a head that never ends is cut after the header read
    // timeout (10 s); meanwhile others are served.
    let mut slow = TcpStream::connect(&addr).await?;
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await?;
    let http = http_client()?;
    let r = http.get(format!("http://{addr}/")).send().await?;
    ensure!(r.status() == 200, "others are served meanwhile");
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let mut closed = false;
    for _ in 0..30 {
        let _ = slow.write_all(b"x-drip: 1\r\n").await;
        match tokio::time::timeout(Duration::from_millis(500), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    ensure!(closed, "slowloris connection closed");
    ensure!(
        started.elapsed() < Duration::from_secs(14),
        "{:?}",
        started.elapsed()
    );
    ensure!(silent_closed.await?, "a silent connection is closed");
    keep.write_all(one).await?;
    let n = tokio::time::timeout(Duration::from_secs(5), keep.read(&mut buf)).await??;
    ensure!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "the idle keep-alive connection still serves: {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let r = http.get(format!("http://{addr}/")).send().await?;
    ensure!(r.status() == 200);

    // HTTP/2 rapid reset: streams opened and cancelled at once, by the
    // thousand, on one connection; a well-behaved client on another
    // connection is served throughout.
    let flood_addr = addr.clone();
    let flood = tokio::spawn(async move {
        let h2 = h2_client::<Full<Bytes>>();
        for _ in 0..2000 {
            let Ok(req) =
                Request::get(format!("http://{flood_addr}/slow")).body(Full::new(Bytes::new()))
            else {
                break;
            };
            // Polled once (HEADERS sent), then dropped (RST_STREAM).
            let _ = tokio::time::timeout(Duration::from_micros(200), h2.request(req)).await;
        }
    });
    let calm = h2_client::<Full<Bytes>>();
    for i in 0..20 {
        let req = Request::get(format!("http://{addr}/")).body(Full::new(Bytes::new()))?;
        let r = tokio::time::timeout(Duration::from_secs(5), calm.request(req)).await??;
        ensure!(r.status() == 200, "calm request {i}: {}", r.status());
    }
    flood.await?;
    let r = http.get(format!("http://{addr}/")).send().await?;
    ensure!(r.status() == 200, "served after the flood");
    mesh.done();
    Ok(())
}

#[tokio::test]
async fn an_http2_continuation_flood_is_cut_off() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (_, client_ip, _c) =
        echo_behind_client(&mut mesh, 1, "name = \"echo\"\nprotocol = \"http\"").await?;
    let addr = format!("{client_ip}:{UPSTREAM_PORT}");
    let mut s = TcpStream::connect(&addr).await?;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    s.write_all(&h2_frame(0x4, 0, 0, &[])).await?;
    // HEADERS (GET / http) without END_HEADERS, then CONTINUATION frames
    // that never end: about 1 MiB of header block in 100-byte literals.
    s.write_all(&h2_frame(0x1, 0x1, 1, &[0x82, 0x86, 0x84]))
        .await?;
    let mut literal = vec![0x00, 7];
    literal.extend_from_slice(b"x-flood");
    literal.push(100);
    literal.extend_from_slice(&[b'a'; 100]);
    let mut cut_off = false;
    for _ in 0..10_000 {
        if s.write_all(&h2_frame(0x9, 0, 1, &literal)).await.is_err() {
            cut_off = true;
            break;
        }
    }
    // The server gave up on this connection: a GOAWAY, or a reset/EOF.
    if !cut_off {
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    cut_off = true;
                    break;
                }
                Ok(Ok(n)) => {
                    // Look for a GOAWAY frame (type 7) among what came back.
                    let mut i = 0;
                    while i + 9 <= n {
                        let len = (usize::from(buf[i]) << 16)
                            | (usize::from(buf[i + 1]) << 8)
                            | usize::from(buf[i + 2]);
                        if buf[i + 3] == 0x7 {
                            cut_off = true;
                        }
                        i += 9 + len;
                    }
                    if cut_off {
                        break;
                    }
                }
                Err(_) => {}
            }
        }
    }
    ensure!(cut_off, "the flooding connection was not cut off");
    // Others are served as before.
    let r = http_client()?.get(format!("http://{addr}/")).send().await?;
    ensure!(r.status() == 200);
    mesh.done();
    Ok(())
}

/// A client's own broken request is the client's failure: a malformed
/// chunked body, or an upload cut off half way, gets a 400 (or just a
/// closed connection) and never counts against the upstream — twelve of
/// them used to eject a healthy instance.
#[tokio::test]
async fn a_clients_broken_body_never_ejects_a_healthy_upstream() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (_instances, client_ip, c) = echo_behind_client(
        &mut mesh,
        2,
        "name = \"echo\"\nprotocol = \"http\"\noutlier = { consecutive_5xx = 3 }",
    )
    .await?;
    let addr = format!("{client_ip}:{UPSTREAM_PORT}");
    for i in 0..12 {
        // A chunk size that is not hex.
        let reply = raw_exchange(
            &addr,
            b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        )
        .await?;
        ensure!(
            reply.is_empty() || reply.starts_with("HTTP/1.1 400"),
            "bad chunk {i}: {reply:?}"
        );
        // An upload that stops half way and hangs up.
        let mut s = TcpStream::connect(&addr).await?;
        s.write_all(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\npartial")
            .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let clusters = mesh.sidecars[c].json("/clusters").await?;
    let endpoints = clusters["clusters"][0]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(endpoints.len() == 2, "{clusters}");
    for e in &endpoints {
        ensure!(e["ejected"] == false && e["ejections"] == 0, "ejected: {e}");
    }
    let ejections = mesh.sidecars[c]
        .metric_sum("meshwork_proxy_ejections_total")
        .await?;
    ensure!(ejections == 0.0, "{ejections} ejections");
    // And the upstream still answers.
    let reply = raw_exchange(
        &addr,
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await?;
    ensure!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    mesh.done();
    Ok(())
}

/// A listener keeps at most `limits.max_downstream_connections` client
/// connections: at the limit the oldest idle keep-alive connection is
/// closed to make room, and with none idle (heads half sent) a new
/// connection is refused — counted, and never at the cost of a request
/// in progress.
#[tokio::test]
async fn a_listener_caps_client_connections_closing_the_oldest_idle_first() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (_instances, client_ip, c) = echo_behind_client(
        &mut mesh,
        1,
        "name = \"echo\"\nprotocol = \"http\"\nlimits = { max_downstream_connections = 4 }",
    )
    .await?;
    let addr = format!("{client_ip}:{UPSTREAM_PORT}");
    // Reads one answer head (and what follows it in the same read).
    async fn ask(s: &mut TcpStream) -> Result<String> {
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await?;
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
    // Four kept-alive connections, each served once, now idle.
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(&addr).await?;
        ensure!(ask(&mut s).await?.starts_with("HTTP/1.1 200"));
        idle.push(s);
    }
    // A fifth is served; the oldest idle one is closed for it.
    let mut fifth = TcpStream::connect(&addr).await?;
    ensure!(ask(&mut fifth).await?.starts_with("HTTP/1.1 200"));
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut buf)).await??;
    ensure!(n == 0, "the oldest idle connection is still open");
    // The others still serve.
    ensure!(ask(&mut idle[1]).await?.starts_with("HTTP/1.1 200"));
    // Four connections each in the middle of a request head: none idle, so
    // a new connection is refused (closed before any answer).
    drop(idle);
    drop(fifth);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut busy = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(&addr).await?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await?;
        busy.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut refused = TcpStream::connect(&addr).await?;
    let _ = refused
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let n = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut buf))
        .await?
        .unwrap_or(0);
    ensure!(n == 0, "a connection past the limit was served");
    // The heads in progress complete and are answered.
    for s in &mut busy {
        s.write_all(b"\r\n").await?;
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
        ensure!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "a request in progress was cut"
        );
    }
    let evicted = mesh.sidecars[c]
        .metric_sum("meshwork_proxy_downstream_evicted_total")
        .await?;
    let refused = mesh.sidecars[c]
        .metric_sum("meshwork_proxy_downstream_refused_total")
        .await?;
    ensure!(
        evicted >= 1.0 && refused >= 1.0,
        "evicted {evicted}, refused {refused}"
    );
    mesh.done();
    Ok(())
}

/// An HTTP/2 client that starts a header block and never finishes it is
/// cut off after the head timeout (10 s), as a slow HTTP/1.1 head is: the
/// `h2` crate would hold the block in memory for as long as it lasts.
#[tokio::test]
async fn an_unfinished_http2_header_block_is_cut_off() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (_instances, client_ip, _c) =
        echo_behind_client(&mut mesh, 1, "name = \"echo\"\nprotocol = \"http\"").await?;
    let addr = format!("{client_ip}:{UPSTREAM_PORT}");
    let mut s = TcpStream::connect(&addr).await?;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    s.write_all(&h2_frame(0x4, 0, 0, &[])).await?; // SETTINGS
    // HEADERS without END_HEADERS: a block that never ends (the server
    // answers the SETTINGS meanwhile; that is all that moves).
    s.write_all(&h2_frame(0x1, 0x1, 1, &[0x82, 0x84, 0x86]))
        .await?;
    // Then nothing: any other frame inside a block is a protocol error
    // that closes the connection at once.
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let mut closed = false;
    for _ in 0..1000 {
        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {}
            Err(_) => break,
        }
    }
    let took = started.elapsed();
    ensure!(closed, "the connection stayed open for {took:?}");
    ensure!(
        took >= Duration::from_secs(9) && took <= Duration::from_secs(16),
        "closed after {took:?}, not after the 10 s head timeout"
    );
    mesh.done();
    Ok(())
}

/// What came back on a raw HTTP/2 connection.
#[derive(Debug, PartialEq, Eq)]
enum H2Outcome {
    /// A HEADERS frame on the probe stream whose first field is
    /// `:status: 200` (HPACK static index 8).
    Served,
    /// A GOAWAY frame with this error code.
    GoAway(u32),
    /// Closed, or nothing within the time, without either.
    Nothing,
}

/// Opens an HTTP/2 connection to `addr` and sends, in one write, `resets`
/// requests each reset (RST_STREAM CANCEL) straight after its HEADERS,
/// then a last request on its own: whether the last one is answered or
/// the connection goes away.
async fn reset_streams_then_ask(addr: &str, resets: u32) -> Result<H2Outcome> {
    // GET http://x/: :method GET, :scheme http, :path / (static table),
    // :authority "x" (a literal, not indexed: the same bytes each time).
    const REQUEST: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x01, b'x'];
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    for i in 0..resets {
        let stream = 2 * i + 1;
        // HEADERS, END_STREAM | END_HEADERS; RST_STREAM CANCEL (0x8).
        out.extend(h2_frame(0x1, 0x5, stream, REQUEST));
        out.extend(h2_frame(0x3, 0, stream, &8u32.to_be_bytes()));
    }
    let probe = 2 * resets + 1;
    out.extend(h2_frame(0x1, 0x5, probe, REQUEST));
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&out).await?;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let n = match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_) => continue,
        };
        got.extend_from_slice(&buf[..n]);
        let mut i = 0;
        while i + 9 <= got.len() {
            let len = (usize::from(got[i]) << 16)
                | (usize::from(got[i + 1]) << 8)
                | usize::from(got[i + 2]);
            let Some(payload) = got.get(i + 9..i + 9 + len) else {
                break;
            };
            let (kind, stream) = (
                got[i + 3],
                u32::from_be_bytes([got[i + 5], got[i + 6], got[i + 7], got[i + 8]]) & 0x7fff_ffff,
            );
            if kind == 0x7 && payload.len() >= 8 {
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                return Ok(H2Outcome::GoAway(code));
            }
            if kind == 0x1 && stream == probe && payload.first() == Some(&0x88) {
                return Ok(H2Outcome::Served);
            }
            i += 9 + len;
        }
    }
    Ok(H2Outcome::Nothing)
}

/// docs/proxy.md: at most 20 HTTP/2 streams reset by the client before
/// they are served (rapid reset, CVE-2023-44487). Twenty such streams in
/// one burst are borne and the next request on the connection is
/// answered; a 21st gets the connection a GOAWAY ENHANCE_YOUR_CALM (0xb).
#[tokio::test]
async fn the_21st_http2_stream_reset_before_it_is_served_gets_a_goaway() -> Result<()> {
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let mut mesh = Mesh::start().await?;
    let (_, client_ip, _) =
        echo_behind_client(&mut mesh, 1, "name = \"echo\"\nprotocol = \"http\"").await?;
    let addr = format!("{client_ip}:{UPSTREAM_PORT}");
    let twenty = reset_streams_then_ask(&addr, 20).await?;
    ensure!(
        twenty == H2Outcome::Served,
        "20 streams reset before they were served: the next request should be answered, got {twenty:?}"
    );
    let twenty_one = reset_streams_then_ask(&addr, 21).await?;
    ensure!(
        twenty_one == H2Outcome::GoAway(ENHANCE_YOUR_CALM),
        "21 streams reset before they were served: wanted GOAWAY ENHANCE_YOUR_CALM, got {twenty_one:?}"
    );
    // Other connections are served as before.
    let r = http_client()?.get(format!("http://{addr}/")).send().await?;
    ensure!(r.status() == 200, "served after the GOAWAY: {}", r.status());
    mesh.done();
    Ok(())
}
