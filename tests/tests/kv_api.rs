//! The KV REST API against one real server: Consul's shapes, semantics and
//! answers to bad input.

use std::time::Duration;

use anyhow::Result;
use base64::Engine;
use meshwork_tests::Cluster;
use serde_json::Value;

async fn status_body(resp: reqwest::Response) -> Result<(u16, String)> {
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_semantics_match_consul() -> Result<()> {
    let cluster = Cluster::start_in_process(1, &[]).await?;
    let base = cluster.servers[0].http();
    let http = &cluster.http;

    // PUT with flags, GET in Consul's JSON shape.
    let (status, body) = cluster
        .put(0, "app/config", b"{\"a\":1}", "?flags=42")
        .await?;
    assert_eq!((status, body.trim()), (200, "true"));
    let resp = http.get(format!("{base}/v1/kv/app/config")).send().await?;
    assert_eq!(resp.status(), 200);
    let index: u64 = resp.headers()["x-consul-index"].to_str()?.parse()?;
    let body: Value = resp.json().await?;
    let entry = &body[0];
    assert_eq!(entry["Key"], "app/config");
    assert_eq!(entry["Flags"], 42);
    assert_eq!(entry["LockIndex"], 0);
    assert_eq!(entry["CreateIndex"], entry["ModifyIndex"]);
    assert_eq!(entry["ModifyIndex"].as_u64(), Some(index));
    let value = base64::engine::general_purpose::STANDARD
        .decode(entry["Value"].as_str().unwrap_or_default())?;
    assert_eq!(value, b"{\"a\":1}");

    // Missing key: 404 with an index.
    let resp = http.get(format!("{base}/v1/kv/missing")).send().await?;
    assert_eq!(resp.status(), 404);
    assert!(resp.headers().contains_key("x-consul-index"));

    // Empty value reads back as null (Consul) and as an empty raw body.
    cluster.put(0, "app/empty", b"", "").await?;
    let body: Value = http
        .get(format!("{base}/v1/kv/app/empty"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(body[0]["Value"], Value::Null);
    assert_eq!(
        cluster.get_raw(0, "app/empty", "").await?.as_deref(),
        Some("")
    );

    // CAS: 0 creates only when absent; otherwise the ModifyIndex must match.
    assert_eq!(
        cluster.put(0, "lock", b"a", "?cas=0").await?.1.trim(),
        "true"
    );
    assert_eq!(
        cluster.put(0, "lock", b"b", "?cas=0").await?.1.trim(),
        "false"
    );
    let body: Value = http
        .get(format!("{base}/v1/kv/lock"))
        .send()
        .await?
        .json()
        .await?;
    let modify = body[0]["ModifyIndex"].as_u64().unwrap_or_default();
    assert_eq!(
        cluster
            .put(0, "lock", b"c", &format!("?cas={}", modify + 100))
            .await?
            .1
            .trim(),
        "false"
    );
    assert_eq!(
        cluster
            .put(0, "lock", b"c", &format!("?cas={modify}"))
            .await?
            .1
            .trim(),
        "true"
    );
    assert_eq!(cluster.get_raw(0, "lock", "").await?.as_deref(), Some("c"));

    // Delete with a stale cas fails, with the right one succeeds.
    let body: Value = http
        .get(format!("{base}/v1/kv/lock"))
        .send()
        .await?
        .json()
        .await?;
    let modify = body[0]["ModifyIndex"].as_u64().unwrap_or_default();
    let (_, body) = status_body(
        http.delete(format!("{base}/v1/kv/lock?cas={}", modify - 1))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(body.trim(), "false");
    let (_, body) = status_body(
        http.delete(format!("{base}/v1/kv/lock?cas={modify}"))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(body.trim(), "true");
    assert_eq!(cluster.get_raw(0, "lock", "").await?, None);

    // Recurse, keys, separator.
    for key in ["web/a", "web/sub/x", "web/sub/y", "web/z", "webx"] {
        cluster.must_put(0, key, key).await?;
    }
    let body: Value = http
        .get(format!("{base}/v1/kv/web/?recurse"))
        .send()
        .await?
        .json()
        .await?;
    let keys: Vec<&str> = body
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["Key"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(keys, ["web/a", "web/sub/x", "web/sub/y", "web/z"]);
    let keys: Vec<String> = http
        .get(format!("{base}/v1/kv/web/?keys&separator=/"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(keys, ["web/a", "web/sub/", "web/z"]);
    let keys: Vec<String> = http
        .get(format!("{base}/v1/kv/?keys"))
        .send()
        .await?
        .json()
        .await?;
    assert!(keys.contains(&"webx".to_owned()) && keys.contains(&"app/config".to_owned()));
    assert_eq!(
        http.get(format!("{base}/v1/kv/nothing/?recurse"))
            .send()
            .await?
            .status(),
        404
    );
    assert_eq!(
        http.get(format!("{base}/v1/kv/nothing/?keys"))
            .send()
            .await?
            .status(),
        404
    );

    // Delete a tree.
    let (_, body) = status_body(
        http.delete(format!("{base}/v1/kv/web/?recurse"))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(body.trim(), "true");
    assert_eq!(
        http.get(format!("{base}/v1/kv/web/?recurse"))
            .send()
            .await?
            .status(),
        404
    );
    assert_eq!(
        cluster.get_raw(0, "webx", "").await?.as_deref(),
        Some("webx")
    );

    // Keys with characters that need escaping round-trip.
    cluster.must_put(0, "sp%20ace/%C3%A9", "ok").await?;
    let keys: Vec<String> = http
        .get(format!("{base}/v1/kv/sp?keys"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(keys, ["sp ace/é"]);
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx() -> Result<()> {
    let cluster = Cluster::start_in_process(1, &[]).await?;
    let base = cluster.servers[0].http();
    let http = &cluster.http;
    let long_key = "k".repeat(513);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            http.put(format!("{base}/v1/kv/")).body("x"),
            400,
            "Missing key name",
        ),
        (
            http.put(format!("{base}/v1/kv/{long_key}")).body("x"),
            400,
            "limit is 512",
        ),
        (
            http.put(format!("{base}/v1/kv/bad%FFkey")).body("x"),
            400,
            "not valid UTF-8",
        ),
        (
            http.put(format!("{base}/v1/kv/k?cas=abc")).body("x"),
            400,
            "Invalid cas",
        ),
        (
            http.put(format!("{base}/v1/kv/k?flags=-1")).body("x"),
            400,
            "Invalid flags",
        ),
        // Consul's answers: a session that does not exist is a server
        // error; ?acquire with ?cas is a conflict of flags.
        (
            http.put(format!("{base}/v1/kv/k?acquire=abc")).body("x"),
            500,
            "invalid session \"abc\"",
        ),
        (
            http.put(format!("{base}/v1/kv/k?acquire=abc&cas=0"))
                .body("x"),
            400,
            "Conflicting flags: acquire=abc&cas=0",
        ),
        (
            http.get(format!("{base}/v1/kv/k?index=xyz")),
            400,
            "Invalid index",
        ),
        (
            http.get(format!("{base}/v1/kv/k?index=1&wait=forever")),
            400,
            "Invalid wait",
        ),
        (
            http.get(format!("{base}/v1/kv/k?stale&consistent")),
            400,
            "conflicting",
        ),
        // Consul reads ?recurse by presence: any value recurses (here:
        // nothing under the prefix, so 404), never a 400.
        (http.get(format!("{base}/v1/kv/k?recurse=maybe")), 404, ""),
        (
            http.get(format!("{base}/v1/health/service/web?passing=maybe")),
            400,
            "Invalid value for ?passing",
        ),
        (
            http.delete(format!("{base}/v1/kv/k?cas=1&recurse")),
            400,
            "cas",
        ),
        (
            http.delete(format!("{base}/v1/kv/")),
            400,
            "Missing key name",
        ),
        (http.patch(format!("{base}/v1/kv/k")), 405, "not allowed"),
        (
            http.put(format!("{base}/v1/kv/k"))
                .body(vec![b'x'; 512 * 1024 + 1]),
            413,
            "too large",
        ),
        (http.get(format!("{base}/v1/nope")), 404, "no such endpoint"),
        (
            http.delete(format!("{base}/v1/operator/raft/peer")),
            400,
            "Must specify",
        ),
        (
            http.delete(format!("{base}/v1/operator/raft/peer?id=x")),
            400,
            "Invalid id",
        ),
        (
            http.delete(format!("{base}/v1/operator/raft/peer?id=9")),
            400,
            "not in the Raft configuration",
        ),
    ];
    for (request, want_status, want_text) in cases {
        let request = request.build()?;
        let what = format!("{} {}", request.method(), request.url());
        let (status, body) = status_body(http.execute(request).await?).await?;
        assert_eq!(status, want_status, "{what}: {body}");
        assert!(
            body.contains(want_text),
            "{what}: {body:?} lacks {want_text:?}"
        );
        assert!(
            body.trim().lines().count() <= 1,
            "{what}: multi-line error {body:?}"
        );
    }
    // A value of exactly 512 KiB is accepted, also without Content-Length.
    let (status, _) = cluster.put(0, "big", &vec![b'y'; 512 * 1024], "").await?;
    assert_eq!(status, 200);
    let status_line = put_chunked(
        &format!("{}:{}", cluster.servers[0].ip, meshwork_tests::HTTP_PORT),
        9,
        64 * 1024,
    )
    .await?;
    assert!(status_line.starts_with("HTTP/1.1 413"), "{status_line}");
    // A body over the limit that the client goes on sending after the
    // server has answered 413 (as most clients do, reading only once they
    // have sent everything): the server lingers and takes it, so the
    // client finishes and reads the answer rather than a broken pipe.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = format!("{}:{}", cluster.servers[0].ip, meshwork_tests::HTTP_PORT);
        let size = 8 << 20;
        let mut stream = tokio::net::TcpStream::connect(&addr).await?;
        let head =
            format!("PUT /v1/kv/huge HTTP/1.1\r\nHost: test\r\nContent-Length: {size}\r\n\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&vec![b'x'; 64 * 1024]).await?;
        // The answer comes first...
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        for _ in 0..4096 {
            tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut byte)).await??;
            answer.push(byte[0]);
            if answer.ends_with(b"\r\n\r\n") {
                break;
            }
        }
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        // ...the server has closed its side meanwhile; the rest still goes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        stream
            .write_all(&vec![b'x'; size - 64 * 1024])
            .await
            .map_err(|e| anyhow::anyhow!("sending the rest of the body after the 413: {e}"))?;
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
            .await?
            .map_err(|e| anyhow::anyhow!("reading to the end after the 413: {e}"))?;
    }
    // The server is still fine.
    cluster.must_put(0, "still", "alive").await?;
    cluster.done();
    Ok(())
}

/// Sends a chunked PUT (no Content-Length) by hand; returns the status line.
async fn put_chunked(addr: &str, chunks: usize, chunk_size: usize) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"PUT /v1/kv/chunked HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await?;
    let chunk = vec![b'z'; chunk_size];
    for _ in 0..chunks {
        let head = format!("{chunk_size:x}\r\n");
        // The server may answer and close before every chunk is sent.
        if stream.write_all(head.as_bytes()).await.is_err()
            || stream.write_all(&chunk).await.is_err()
            || stream.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_agent_self_have_consul_shapes() -> Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    let base = cluster.servers[1].http();
    let leader: String = cluster
        .http
        .get(format!("{base}/v1/status/leader"))
        .send()
        .await?
        .json()
        .await?;
    assert!(leader.ends_with(":28300"), "{leader}");
    let peers: Vec<String> = cluster
        .http
        .get(format!("{base}/v1/status/peers"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(peers.len(), 3);
    let me: Value = cluster
        .http
        .get(format!("{base}/v1/agent/self"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(me["Config"]["Datacenter"], "dc1");
    assert_eq!(me["Config"]["NodeName"], "meshwork-2");
    assert_eq!(me["Config"]["NodeID"].as_str().map(str::len), Some(36));
    assert_eq!(me["Member"]["Name"], "meshwork-2");
    let config: Value = cluster
        .http
        .get(format!("{base}/v1/operator/raft/configuration"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(config["Servers"].as_array().map(Vec::len), Some(3));
    assert!(cluster.wait_leader(Duration::from_secs(5)).await.is_ok());
    cluster.done();
    Ok(())
}

/// `meshwork_kv_tombstones` on every server.
async fn tombstones(cluster: &Cluster) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for i in 0..cluster.servers.len() {
        out.push(cluster.metric(i, "meshwork_kv_tombstones").await? as u64);
    }
    Ok(out)
}

async fn index_of(resp: reqwest::Response) -> Result<u64> {
    Ok(resp
        .headers()
        .get("x-consul-index")
        .ok_or_else(|| anyhow::anyhow!("no X-Consul-Index"))?
        .to_str()?
        .parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_keys_are_reaped_after_the_tombstone_ttl_and_indexes_never_go_back() -> Result<()> {
    let cluster = Cluster::start(3, &["--tombstone-ttl-ms", "3000"]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let base = cluster.servers[leader].http();
    let http = &cluster.http;
    cluster.must_put(leader, "app/a", "1").await?;
    cluster.must_put(leader, "app/b", "2").await?;
    let resp = http.delete(format!("{base}/v1/kv/app/b")).send().await?;
    assert_eq!(resp.status(), 200);
    let seen = index_of(
        http.get(format!("{base}/v1/kv/app/?recurse"))
            .send()
            .await?,
    )
    .await?;
    let seen_key = index_of(http.get(format!("{base}/v1/kv/app/b")).send().await?).await?;
    assert_eq!(seen, seen_key, "the prefix's index is the deletion's");
    // (Followers apply the deletion a moment later; the TTL is long enough
    // that a stalled poll cannot miss the moment all three hold it.)
    meshwork_tests::wait_for(
        "one tombstone everywhere",
        Duration::from_secs(5),
        || async {
            let counts = tombstones(&cluster).await.ok()?;
            counts.iter().all(|n| *n == 1).then_some(())
        },
    )
    .await?;

    // Past the TTL the leader reaps it, through Raft: gone on every server.
    meshwork_tests::wait_for("tombstones reaped", Duration::from_secs(20), || async {
        let counts = tombstones(&cluster).await.ok()?;
        counts.iter().all(|n| *n == 0).then_some(())
    })
    .await?;
    for s in &cluster.servers {
        let at = s.http();
        let prefix = index_of(http.get(format!("{at}/v1/kv/app/?recurse")).send().await?).await?;
        let key = http.get(format!("{at}/v1/kv/app/b")).send().await?;
        assert_eq!(key.status(), 404);
        let key = index_of(key).await?;
        assert!(
            prefix >= seen && key >= seen,
            "indexes went back after the reap on {at}: prefix {prefix}, key {key}, seen {seen}"
        );
    }
    // The remaining key is untouched and the prefix still blocks and wakes.
    assert_eq!(
        cluster.get_raw(leader, "app/a", "").await?.as_deref(),
        Some("1")
    );
    let now = index_of(
        http.get(format!("{base}/v1/kv/app/?recurse"))
            .send()
            .await?,
    )
    .await?;
    let blocked = tokio::spawn({
        let (http, url) = (
            http.clone(),
            format!("{base}/v1/kv/app/?recurse&index={now}&wait=10s"),
        );
        async move { http.get(url).send().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.must_put(leader, "app/c", "3").await?;
    let woke = tokio::time::timeout(Duration::from_secs(5), blocked).await???;
    assert!(index_of(woke).await? > now);
    cluster.done();
    Ok(())
}
