//! Mesh identity end to end: the registry's CA signs every sidecar's leaf,
//! sidecars speak mutual TLS to each other with SPIFFE identities, and the
//! destination's sidecar enforces intentions (L4 and L7) before the app
//! sees a byte. Real `meshwork-registry` and `meshwork-sidecar` processes,
//! real TLS, `curl` and `openssl s_client` as outside clients. (Every
//! other proxy suite now runs over the same mTLS hop too: HTTP/1.1,
//! HTTP/2, gRPC, WebSocket and TCP.)
//!
//! Every address is on the cluster's own `127.x.y.0/24`; every loop is
//! bounded in count and time.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use meshwork_tests::apps::{http_backend, tcp_backend};
use meshwork_tests::http::{Load, http_client, raw_exchange};
use meshwork_tests::mesh_client::{self, AgentLeaf};
use meshwork_tests::sidecar::{INBOUND_PORT, Mesh, Service, UPSTREAM_PORT, echo_behind_client};
use meshwork_tests::wait_for;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `curl` with `args`: (exit code, stdout).
fn curl(args: &[&str]) -> Result<(i32, String)> {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .args(args)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// A leaf and key for `service` from the registry's agent endpoint,
/// written as `dir/<service>.pem` and `dir/<service>-key.pem`.
async fn agent_leaf(mesh: &Mesh, dir: &Path, service: &str) -> Result<Value> {
    let leaf = mesh
        .cluster()
        .get_json(0, &format!("/v1/agent/connect/ca/leaf/{service}"))
        .await
        .context("leaf")?;
    std::fs::write(
        dir.join(format!("{service}.pem")),
        leaf["CertPEM"].as_str().context("CertPEM")?,
    )?;
    std::fs::write(
        dir.join(format!("{service}-key.pem")),
        leaf["PrivateKeyPEM"].as_str().context("key")?,
    )?;
    Ok(leaf)
}

async fn put_config(mesh: &Mesh, entry: &Value) -> Result<()> {
    let url = format!("{}/v1/config", mesh.cluster().servers[0].http());
    let r = http_client()?.put(url).json(entry).send().await?;
    let status = r.status();
    let body = r.text().await?;
    ensure!(status == 200 && body.trim() == "true", "{status} {body}");
    Ok(())
}

/// A raw HTTP/1.1 request for `target` through the client sidecar: the
/// status line's code and the path the app saw (if it was reached).
async fn through(addr: &str, method: &str, target: &str, extra: &str) -> Result<(u16, String)> {
    let host = if extra.to_ascii_lowercase().contains("host:") {
        ""
    } else {
        "Host: echo\r\n"
    };
    let request = format!("{method} {target} HTTP/1.1\r\n{host}{extra}Connection: close\r\n\r\n");
    let answer = raw_exchange(addr, request.as_bytes()).await?;
    let code = answer
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{method} {target}: no status in {answer:?}"))?;
    let seen = answer
        .lines()
        .find_map(|l| l.strip_prefix("x-seen-path: "))
        .unwrap_or_default()
        .to_owned();
    if code == 403 {
        ensure!(
            answer.contains("x-meshwork-error: intention-denied"),
            "a denial says so: {answer}"
        );
    }
    Ok((code, seen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_speak_mtls_with_spiffe_identities_and_refuse_outsiders() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (_instances, client_ip, c) = echo_behind_client(&mut mesh, 1, "name = \"echo\"").await?;
    let server = 0;
    let inbound = format!("{}:{INBOUND_PORT}", mesh.ip(20));

    // The hop between the sidecars is mesh TLS, and works.
    let clusters = mesh.sidecars[c].json("/clusters").await?.to_string();
    ensure!(clusters.contains(r#""tls":"mesh""#), "{clusters}");
    let url = format!("http://{client_ip}:{UPSTREAM_PORT}/hello");
    let r = http_client()?.get(&url).send().await?;
    ensure!(r.status() == 200, "{}", r.status());

    // Each sidecar shows its leaf: the SPIFFE ID of its service, from
    // the registry's trust domain.
    let roots = mesh
        .cluster()
        .get_json(0, "/v1/connect/ca/roots")
        .await
        .context("roots")?;
    let td = roots["TrustDomain"].as_str().context("trust domain")?;
    ensure!(td.ends_with(".meshwork"), "{td}");
    let status = mesh.sidecars[server].json("/status").await?;
    ensure!(
        status["mesh"]["leaf"]["spiffe_id"]
            == json!(format!("spiffe://{td}/ns/default/dc/dc1/svc/echo")),
        "{}",
        status["mesh"]
    );
    ensure!(status["mesh"]["leaf"]["root_id"] == roots["ActiveRootID"]);

    // Outsiders: plain HTTP, no certificate, a self-signed one.
    let answer = raw_exchange(&inbound, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    ensure!(
        !answer.contains("200 OK") && !answer.contains("echo-0"),
        "{answer:?}"
    );
    let certs = tempfile::tempdir()?;
    let dir = certs.path();
    let https = format!("https://{inbound}/hello");
    let (code, body) = curl(&["-k", &https])?;
    ensure!(
        code != 0 && !body.contains("echo-0"),
        "no client certificate: {code} {body}"
    );
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-subj", "/CN=web", "-days", "1"])
        .args([
            "-addext",
            &format!("subjectAltName=URI:spiffe://{td}/ns/default/dc/dc1/svc/client"),
        ])
        .arg("-keyout")
        .arg(dir.join("self-key.pem"))
        .arg("-out")
        .arg(dir.join("self.pem"))
        .output()?;
    ensure!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let self_cert = dir.join("self.pem").display().to_string();
    let self_key = dir.join("self-key.pem").display().to_string();
    let (code, body) = curl(&["-k", "--cert", &self_cert, "--key", &self_key, &https])?;
    ensure!(
        code != 0 && !body.contains("echo-0"),
        "self-signed: {code} {body}"
    );

    // A leaf of the mesh CA (made by the registry for "client") gets in,
    // and the server presents its own SPIFFE ID.
    agent_leaf(&mesh, dir, "client").await?;
    let leaf = dir.join("client.pem").display().to_string();
    let key = dir.join("client-key.pem").display().to_string();
    let (code, body) = curl(&["-k", "--cert", &leaf, "--key", &key, &https])?;
    ensure!(
        code == 0 && body.starts_with("echo-0"),
        "mesh leaf: {code} {body}"
    );
    let shown = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {inbound} -cert {leaf} -key {key} </dev/null 2>/dev/null \
             | openssl x509 -noout -ext subjectAltName"
        ))
        .output()?;
    let san = String::from_utf8_lossy(&shown.stdout);
    ensure!(
        san.contains(&format!("URI:spiffe://{td}/ns/default/dc/dc1/svc/echo")),
        "s_client shows the server's SPIFFE ID: {san:?}"
    );
    let failures = mesh.sidecars[server]
        .metric_sum("meshwork_sidecar_tls_handshake_failures_total")
        .await?;
    ensure!(failures >= 3.0, "refused handshakes counted: {failures}");
    let expiry = mesh.sidecars[server]
        .metric_sum("meshwork_sidecar_leaf_expiry_seconds")
        .await?;
    ensure!(expiry > 3600.0, "leaf expiry gauge: {expiry}");

    // A TLS session resumed after its client's leaf expired is refused:
    // the leaf is checked again, not trusted for the ticket's life.
    // (Leaves of 2 s from now on; the sidecars keep their 72 h ones.)
    let ca_url = format!(
        "{}/v1/connect/ca/configuration",
        mesh.cluster().servers[0].http()
    );
    let r = http_client()?
        .put(ca_url)
        .json(&json!({"Provider": "consul", "Config": {"LeafCertTTL": "2s"}}))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent_leaf(&mesh, dir, "short-lived").await?;
    let s_client = |session: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {} && printf 'GET /resumed HTTP/1.1\\r\\nHost: echo\\r\\nConnection: close\\r\\n\\r\\n' \
                 | timeout 5 openssl s_client -connect {inbound} -cert short-lived.pem -key short-lived-key.pem \
                   -tls1_3 -ign_eof {session} 2>&1",
                dir.display()
            ))
            .output()
    };
    let first = String::from_utf8_lossy(&s_client("-sess_out sess.pem")?.stdout).into_owned();
    ensure!(first.contains("echo-"), "a fresh leaf is served: {first}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let resumed = String::from_utf8_lossy(&s_client("-sess_in sess.pem")?.stdout).into_owned();
    ensure!(
        resumed.contains("Reused"),
        "the session was resumed: {resumed}"
    );
    ensure!(
        !resumed.contains("echo-"),
        "an expired leaf's session is refused: {resumed}"
    );
    // The registry goes away: the leaves and roots the sidecars hold keep
    // working, for new connections too.
    mesh.cluster.as_mut().context("cluster")?.servers[0]
        .kill()
        .await?;
    for i in 0..20 {
        let http = http_client()?;
        let r = http.get(&url).send().await?;
        ensure!(
            r.status() == 200,
            "request {i} without a registry: {}",
            r.status()
        );
    }
    mesh.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intentions_decide_at_the_destination_within_a_second() -> Result<()> {
    // Installed clusters deny by default; so does this one.
    let mut mesh = Mesh::start_with(&["--connect-default-intention", "deny"]).await?;
    let (_instances, client_ip, _c) = echo_behind_client(&mut mesh, 1, "name = \"echo\"").await?;
    let addr = format!("{client_ip}:{UPSTREAM_PORT}");
    let (code, _) = through(&addr, "GET", "/hello", "").await?;
    ensure!(code == 403, "default deny: {code}");

    // An allow applies to the next requests within a second of its write.
    let allow = json!({"Kind": "service-intentions", "Name": "echo",
        "Sources": [{"Name": "client", "Action": "allow"}]});
    let written = Instant::now();
    put_config(&mesh, &allow).await?;
    let took = wait_for("the allow applied", Duration::from_secs(3), || async {
        let (code, _) = through(&addr, "GET", "/hello", "").await.ok()?;
        (code == 200).then(|| written.elapsed())
    })
    .await?;
    ensure!(took < Duration::from_secs(1), "allow took {took:?}");
    // And a deny as fast, without reconnecting.
    let deny = json!({"Kind": "service-intentions", "Name": "echo",
        "Sources": [{"Name": "client", "Action": "deny"}]});
    let written = Instant::now();
    put_config(&mesh, &deny).await?;
    let took = wait_for("the deny applied", Duration::from_secs(3), || async {
        let (code, _) = through(&addr, "GET", "/hello", "").await.ok()?;
        (code == 403).then(|| written.elapsed())
    })
    .await?;
    ensure!(took < Duration::from_secs(1), "deny took {took:?}");

    // L7: only GET under /public/, and /admin for the admin role.
    let l7 = json!({"Kind": "service-intentions", "Name": "echo", "Sources": [{
    "Name": "client",
    "Permissions": [
        {"Action": "allow", "HTTP": {"PathPrefix": "/public/", "Methods": ["GET", "HEAD"]}},
        {"Action": "allow", "HTTP": {"PathExact": "/admin",
            "Header": [{"Name": "x-role", "Exact": "admin"}]}},
        {"Action": "allow", "HTTP": {"PathPrefix": "/hosted/",
            "Header": [{"Name": "host", "Exact": "public.example"}]}},
        {"Action": "allow", "HTTP": {"PathExact": "/"}}
    ]}]});
    put_config(&mesh, &l7).await?;
    wait_for("the L7 rules applied", Duration::from_secs(3), || async {
        let (code, _) = through(&addr, "GET", "/public/a", "").await.ok()?;
        (code == 200).then_some(())
    })
    .await?;
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        ("GET", "/public/a", "", 200, "/public/a"),
        ("GET", "/public/a?x=1", "", 200, "/public/a?x=1"),
        ("POST", "/public/a", "Content-Length: 0\r\n", 403, ""),
        ("GET", "/admin", "", 403, ""),
        ("GET", "/admin", "x-role: user\r\n", 403, ""),
        ("GET", "/admin", "x-role: admin\r\n", 200, "/admin"),
        ("GET", "/public/../admin", "", 403, ""),
        ("GET", "/public/%2e%2e/admin", "", 403, ""),
        ("GET", "/public/%2E%2E/admin", "", 403, ""),
        ("GET", "/public/./a", "", 200, "/public/a"),
        ("GET", "//public//a", "", 200, "/public/a"),
        ("GET", "/PUBLIC/a", "", 403, ""),
        ("GET", "/public/%7Euser", "", 200, "/public/~user"),
        // What an application might read as a separator or a dot segment
        // is refused rather than guessed at.
        ("GET", "/public/%2e%2e%2fadmin", "", 400, ""),
        ("GET", "/public/..%2Fadmin", "", 400, ""),
        ("GET", "/public/..%5cadmin", "", 400, ""),
        ("GET", "/public/..;/admin", "", 400, ""),
        ("GET", "/public/%c0%ae%c0%ae/admin", "", 400, ""),
        ("GET", "/admin;x", "", 400, ""),
        ("GET", "/public/a;jsessionid=1", "", 400, ""),
        ("GET", "/public/%252e%252e/admin", "", 400, ""),
        // A method in lower case (read as upper case by some frameworks).
        ("delete", "/public/a", "", 400, ""),
        // A header the client names in Connection is gone before the
        // decision, as it is before the app.
        (
            "GET",
            "/admin",
            "x-role: admin\r\nConnection: x-role\r\n",
            403,
            "",
        ),
        // Userinfo in the authority.
        (
            "GET",
            "http://u@public.example/hosted/x",
            "Host: public.example\r\n",
            400,
            "",
        ),
        // Host rules judge the host the app gets: an absolute-form
        // target's authority, not the Host header beside it.
        (
            "GET",
            "/hosted/x",
            "Host: public.example\r\n",
            200,
            "/hosted/x",
        ),
        (
            "GET",
            "http://admin.internal/hosted/x",
            "Host: public.example\r\n",
            403,
            "",
        ),
        (
            "GET",
            "http://public.example/hosted/x",
            "Host: admin.internal\r\n",
            200,
            "/hosted/x",
        ),
        // No tunnel under L7 rules: a CONNECT that "/" would allow is
        // refused, as is a WebSocket upgrade with a second protocol...
        ("CONNECT", "echo:80", "", 403, ""),
        (
            "GET",
            "/public/a",
            "Connection: Upgrade\r\nUpgrade: websocket\r\nUpgrade: SPDY/3.1\r\n",
            403,
            "",
        ),
    ];
    for (method, target, extra, want, seen_want) in cases {
        let (code, seen) = through(&addr, method, target, extra).await?;
        ensure!(code == *want, "{method} {target}: {code}, want {want}");
        ensure!(
            seen == *seen_want,
            "{method} {target}: the app saw {seen:?}, want {seen_want:?}"
        );
    }
    // ...and an h2c upgrade is dropped: the request is answered as the
    // HTTP/1.1 request it also is, and the next one on the connection is
    // judged like any other (no HTTP/2 smuggled past the rules).
    let smuggle = "GET /public/a HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                   Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n\
                   GET /admin HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(&addr, smuggle.as_bytes()).await?;
    ensure!(
        answer.starts_with("HTTP/1.1 200") && !answer.contains(" 101 "),
        "h2c offer: {answer}"
    );
    ensure!(
        answer.contains("HTTP/1.1 403") && answer.contains("intention-denied"),
        "the request after it is judged: {answer}"
    );
    let denied = mesh.sidecars[0]
        .metric_sum("meshwork_sidecar_intention_decisions_total{decision=\"deny\"")
        .await?;
    ensure!(denied >= 8.0, "denials counted: {denied}");
    // The access log names the caller and the rule, allowed or denied.
    let log = std::fs::read_to_string(&mesh.sidecars[0].access_log)?;
    for want in [
        r#""outcome":"intention-denied""#,
        r#""source":"client","intention":"client -> echo""#,
        r#""intention":"client -> echo permission #1""#,
        r#""intention":"client -> echo permission #3 (L7 permissions: no tunnels)""#,
        r#""intention":"default""#,
    ] {
        ensure!(log.contains(want), "{want} in the access log:\n{log}");
    }

    // The registry answers the same question the same way.
    let check = mesh
        .cluster()
        .get_json(
            0,
            "/v1/connect/intentions/check?source=client&destination=echo",
        )
        .await
        .context("check")?;
    ensure!(
        check == json!({"Allowed": false}),
        "L7 intentions are deny for L4: {check}"
    );

    // TCP: decided on the connection.
    let tcp_ip = mesh.ip(30);
    let app = tcp_backend(&tcp_ip, "tcp-0").await?;
    mesh.server_sidecar(
        &tcp_ip,
        Service {
            name: "db",
            id: "db-0",
            app,
            protocol: "tcp",
        },
    )
    .await?;
    let db_client_ip = mesh.ip(101);
    let dbc = mesh
        .client_sidecar(&db_client_ip, "name = \"db\"\nprotocol = \"tcp\"")
        .await?;
    mesh.sidecars[dbc].wait_endpoints(1).await?;
    let db = format!("{db_client_ip}:{UPSTREAM_PORT}");
    let exchange = |db: String| async move {
        let mut s = tokio::net::TcpStream::connect(&db).await?;
        s.write_all(b"hello").await?;
        s.shutdown().await?;
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut out)).await;
        anyhow::Ok(out)
    };
    let out = exchange(db.clone()).await?;
    ensure!(!out.contains("got"), "TCP denied by default: {out:?}");
    put_config(
        &mesh,
        &json!({"Kind": "service-intentions", "Name": "db",
            "Sources": [{"Name": "client", "Action": "allow"}]}),
    )
    .await?;
    wait_for("TCP allowed", Duration::from_secs(3), || {
        let db = db.clone();
        async move {
            let out = exchange(db).await.ok()?;
            (out == "tcp-0 got 5 bytes").then_some(())
        }
    })
    .await?;
    mesh.done();
    Ok(())
}

/// The active root of the CA and each sidecar's leaf (serial, root).
async fn leaves(mesh: &Mesh) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for s in &mesh.sidecars {
        let status = s.json("/status").await?;
        let leaf = &status["mesh"]["leaf"];
        out.push((
            leaf["serial"].as_str().unwrap_or_default().to_owned(),
            leaf["root_id"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_leaves_renew_and_the_root_rotates_under_load_failing_nothing() -> Result<()> {
    let mut mesh = Mesh::start_with(&["--connect-leaf-cert-ttl", "4s"]).await?;
    // HTTP between the sidecars: its pooled connections move to each new
    // leaf. (An L4 upstream splices the client's own kept-alive connection,
    // which cannot move: the server sidecar cuts it when the leaf it was
    // made with expires.)
    let (_instances, client_ip, _c) =
        echo_behind_client(&mut mesh, 2, "name = \"echo\"\nprotocol = \"http\"").await?;
    let load = Load::start(&format!("http://{client_ip}:{UPSTREAM_PORT}/x"), true);
    let before = leaves(&mesh).await?;
    let old_root = before[0].1.clone();

    // Leaves of 4 s renew at about 2.4 s: wait for every sidecar to have
    // renewed at least twice.
    wait_for(
        "two renewals everywhere",
        Duration::from_secs(15),
        || async {
            let mut all = true;
            for s in &mesh.sidecars {
                let ok = s
                    .metric_sum("meshwork_sidecar_leaf_renewals_total{result=\"ok\"")
                    .await
                    .ok()?;
                all &= ok >= 3.0;
            }
            all.then_some(())
        },
    )
    .await?;

    // Rotate the root: every sidecar moves to a leaf of the new root.
    let url = format!(
        "{}/v1/connect/ca/configuration",
        mesh.cluster().servers[0].http()
    );
    let r = http_client()?
        .put(url)
        .json(&json!({"Provider": "consul", "Config": {"RotateRoot": true, "LeafCertTTL": "4s"}}))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let roots = mesh
        .cluster()
        .get_json(0, "/v1/connect/ca/roots")
        .await
        .context("roots")?;
    let new_root = roots["ActiveRootID"].as_str().context("active")?.to_owned();
    ensure!(new_root != old_root);
    ensure!(
        roots["Roots"].as_array().map(Vec::len) == Some(2),
        "{roots}"
    );
    wait_for(
        "leaves of the new root",
        Duration::from_secs(10),
        || async {
            let now = leaves(&mesh).await.ok()?;
            now.iter().all(|(_, root)| *root == new_root).then_some(())
        },
    )
    .await?;
    // Keep the load on through a few more renewals.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok, failed) = load.stop().await?;
    ensure!(ok > 200, "the load ran: {ok}");
    ensure!(failed == 0, "{failed} of {} requests failed", ok + failed);
    // Renewed on schedule, not in a loop: about one per 2.4 s each.
    for s in &mesh.sidecars {
        let renewals = s
            .metric_sum("meshwork_sidecar_leaf_renewals_total{result=\"ok\"")
            .await?;
        ensure!(renewals <= 12.0, "{} renewed {renewals} times", s.ip);
    }

    mesh.done();
    Ok(())
}

/// Where in the server sidecar's access log a path shows, and how each
/// request for it ended (`outcome`).
fn outcomes_for(log: &str, path: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["path"] == path)
        .map(|e| e["outcome"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_connections_follow_leaf_expiry_failing_nothing() -> Result<()> {
    // Leaves of 3 s, renewed at about 1.8 s.
    let mut mesh = Mesh::start_with(&["--connect-leaf-cert-ttl", "3s"]).await?;
    let (instances, h1_client, c1) =
        echo_behind_client(&mut mesh, 1, "name = \"echo\"\nprotocol = \"http\"").await?;
    let server = instances[0].2;
    // The same over HTTP/2 between the sidecars.
    let h2_ip = mesh.ip(30);
    let (h2_app, _) = http_backend(&h2_ip, "h2echo-0").await?;
    mesh.server_sidecar(
        &h2_ip,
        Service {
            name: "h2echo",
            id: "h2echo-0",
            app: h2_app,
            protocol: "http2",
        },
    )
    .await?;
    let h2_client = mesh.ip(101);
    let c2 = mesh
        .client_sidecar(&h2_client, "name = \"h2echo\"\nprotocol = \"http2\"")
        .await?;
    mesh.sidecars[c2].wait_endpoints(1).await?;
    let started = Instant::now();
    // Kept-alive connections all along: the client sidecars' pools.
    let h1_load = Load::start(&format!("http://{h1_client}:{UPSTREAM_PORT}/x"), true);
    let h2_load = Load::start(&format!("http://{h2_client}:{UPSTREAM_PORT}/x"), true);

    // A caller with a leaf it never renews, on two kept-alive connections.
    let leaf = mesh
        .cluster()
        .get_json(0, "/v1/agent/connect/ca/leaf/raw")
        .await
        .context("leaf")?;
    let leaf = AgentLeaf::from_json(&leaf)?;
    ensure!(
        leaf.expires_in() <= Duration::from_secs(3),
        "a 3 s leaf: {leaf:?}"
    );
    let connector = leaf.connector()?;
    let inbound = format!("{}:{INBOUND_PORT}", mesh.ip(20));
    let get = |path: &str, close: bool| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: echo\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        )
    };
    let mut idle = mesh_client::connect(&connector, &inbound).await?;
    let mut busy = mesh_client::connect(&connector, &inbound).await?;
    for (conn, path) in [(&mut idle, "/raw-idle"), (&mut busy, "/raw-busy")] {
        conn.write_all(get(path, false).as_bytes()).await?;
        let answer = mesh_client::read_response(conn, Duration::from_secs(3)).await?;
        ensure!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("x-seen-path: "),
            "served before the expiry: {answer}"
        );
    }
    // A second before the expiry, a slow request and one behind it
    // (pipelined): the first is in flight at the expiry and is answered;
    // the connection then closes and the second never reaches the app.
    tokio::time::sleep(leaf.expires_in().saturating_sub(Duration::from_secs(1))).await;
    let pipelined = get("/slow", false) + &get("/after-busy", true);
    busy.write_all(pipelined.as_bytes()).await?;
    let (answers, closed) = mesh_client::read_until_close(&mut busy, Duration::from_secs(6)).await;
    ensure!(closed, "the connection closed after its expiry: {answers}");
    ensure!(
        answers.starts_with("HTTP/1.1 200") && answers.matches("HTTP/1.1 ").count() == 1,
        "the request in flight was answered, and only it: {answers}"
    );
    // The idle connection was closed at the expiry; a request on it now
    // gets nothing from the app (closed, or refused with 421).
    tokio::time::sleep(leaf.expires_in() + Duration::from_millis(500)).await;
    let _ = idle.write_all(get("/after-idle", true).as_bytes()).await;
    let (answer, closed) = mesh_client::read_until_close(&mut idle, Duration::from_secs(3)).await;
    ensure!(
        closed && (answer.is_empty() || answer.starts_with("HTTP/1.1 421")),
        "the expired caller is cut off: closed={closed} {answer:?}"
    );
    // A new connection with the expired leaf is refused at the handshake.
    let again = match mesh_client::connect(&connector, &inbound).await {
        Ok(mut conn) => {
            let _ = conn.write_all(get("/after-new", true).as_bytes()).await;
            mesh_client::read_until_close(&mut conn, Duration::from_secs(3))
                .await
                .0
        }
        Err(_) => String::new(),
    };
    ensure!(!again.contains("200"), "an expired leaf connects: {again}");

    // The load goes on for more than three leaf lifetimes, and each
    // client sidecar renews its leaf and retires its old connections.
    wait_for(
        "three renewals and retired connections",
        Duration::from_secs(30),
        || async {
            let mut all = started.elapsed() >= Duration::from_secs(10);
            for s in [c1, c2] {
                let sidecar = &mesh.sidecars[s];
                let renewed = sidecar
                    .metric_sum("meshwork_sidecar_leaf_renewals_total{result=\"ok\"")
                    .await
                    .ok()?;
                let retired = sidecar
                    .metric_sum("meshwork_sidecar_tls_connections_retired_total")
                    .await
                    .ok()?;
                all &= renewed >= 4.0 && retired >= 1.0;
            }
            all.then_some(())
        },
    )
    .await?;
    for (what, load) in [("HTTP/1.1", h1_load), ("HTTP/2", h2_load)] {
        let (ok, failed) = load.stop().await?;
        ensure!(ok > 100, "{what}: the load ran: {ok}");
        ensure!(
            failed == 0,
            "{what}: {failed} of {} requests failed",
            ok + failed
        );
    }
    // What the server sidecar saw: the requests after the expiry never
    // reached the app, the one in flight did; both connections counted.
    let log = std::fs::read_to_string(&mesh.sidecars[server].access_log)?;
    ensure!(
        outcomes_for(&log, "/slow") == ["upstream"],
        "the request in flight was served: {:?}",
        outcomes_for(&log, "/slow")
    );
    for path in ["/after-busy", "/after-idle", "/after-new"] {
        let seen = outcomes_for(&log, path);
        ensure!(
            seen.iter().all(|o| o == "peer-certificate-expired"),
            "{path} did not reach the app: {seen:?}"
        );
    }
    let cut = mesh.sidecars[server]
        .metric_sum("meshwork_sidecar_tls_peer_expired_total")
        .await?;
    ensure!(cut >= 2.0, "the raw caller's connections counted: {cut}");
    let expired_handshakes = mesh.sidecars[server]
        .metric_sum("meshwork_sidecar_tls_handshake_failures_total{direction=\"inbound\",reason=\"expired\"")
        .await?;
    ensure!(
        expired_handshakes >= 1.0,
        "the expired leaf's new connection refused: {expired_handshakes}"
    );
    mesh.done();
    Ok(())
}
