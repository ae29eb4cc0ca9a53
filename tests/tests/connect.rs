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
    // Server 0 signs with the TTL once it has applied the change (read
    // from its own state, not the leader's).
    wait_for(
        "server 0 to have applied the 2 s leaf TTL",
        Duration::from_secs(10),
        || async {
            let config = mesh
                .cluster()
                .get_json(0, "/v1/connect/ca/configuration?stale")
                .await?;
            (config["Config"]["LeafCertTTL"] == "2s").then_some(())
        },
    )
    .await?;
    let leaf = agent_leaf(&mesh, dir, "short-lived").await?;
    let valid_before = leaf["ValidBefore"]
        .as_str()
        .and_then(meshwork_core::timestamp::parse_rfc3339)
        .context("ValidBefore")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    ensure!(
        valid_before < now + 60_000_000_000,
        "the leaf signed after the change is not short-lived: {leaf}"
    );
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

    // The mesh config entry's DefaultIntention overrides the server's
    // setting for the whole cluster, as fast as an intention; without the
    // field the server's setting applies again.
    const CHECK: &str = "/v1/connect/intentions/check?source=client&destination=echo";
    let written = Instant::now();
    put_config(
        &mesh,
        &json!({"Kind": "mesh", "Name": "mesh", "DefaultIntention": "allow"}),
    )
    .await?;
    let took = wait_for(
        "the mesh default applied",
        Duration::from_secs(3),
        || async {
            let (code, _) = through(&addr, "GET", "/hello", "").await.ok()?;
            (code == 200).then(|| written.elapsed())
        },
    )
    .await?;
    ensure!(took < Duration::from_secs(1), "mesh default took {took:?}");
    let allowed = mesh.cluster().get_json(0, CHECK).await.context("check")?;
    ensure!(allowed["Allowed"] == json!(true), "{allowed}");
    put_config(&mesh, &json!({"Kind": "mesh", "Name": "mesh"})).await?;
    wait_for(
        "the server default again",
        Duration::from_secs(3),
        || async {
            let (code, _) = through(&addr, "GET", "/hello", "").await.ok()?;
            (code == 403).then_some(())
        },
    )
    .await?;
    let allowed = mesh.cluster().get_json(0, CHECK).await.context("check")?;
    ensure!(allowed["Allowed"] == json!(false), "{allowed}");

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
    // An L4 (tcp) upstream: the load's own kept-alive connections are
    // spliced through, made with one leaf and kept open across renewals
    // and the rotation (open connections finish).
    let (_instances, client_ip, _c) = echo_behind_client(&mut mesh, 2, "name = \"echo\"").await?;
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

/// A P-256 key and a CSR for it, made by `openssl` in `dir`: (key path, CSR PEM).
fn openssl_csr(dir: &Path, name: &str) -> Result<(std::path::PathBuf, String)> {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-subj", "/CN=ignored", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .output()?;
    ensure!(out.status.success(), "openssl req: {out:?}");
    Ok((key, std::fs::read_to_string(csr)?))
}

/// The public key (PEM) of a certificate or a private key, by `openssl`.
fn public_key(pem_file: &Path, of_cert: bool) -> Result<String> {
    let out = if of_cert {
        Command::new("openssl")
            .args(["x509", "-noout", "-pubkey", "-in"])
            .arg(pem_file)
            .output()?
    } else {
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(pem_file)
            .output()?
    };
    ensure!(out.status.success(), "openssl: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The next message of a leaf stream, within `within`.
async fn next_event(
    stream: &mut tonic::Streaming<meshwork_proto::v1::WatchEvent>,
    within: Duration,
) -> Result<meshwork_proto::v1::WatchEvent> {
    tokio::time::timeout(within, stream.message())
        .await
        .context("no message in time")??
        .context("the stream ended")
}

fn leaf_of(event: &meshwork_proto::v1::WatchEvent) -> Option<meshwork_proto::v1::LeafCert> {
    event.changes.iter().find_map(|c| match &c.change {
        Some(meshwork_proto::v1::change::Change::Leaf(leaf)) => Some(leaf.clone()),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_signs_every_leaf_and_leaves_stream_as_a_topic() -> Result<()> {
    use meshwork_proto::v1::watch_client::WatchClient;
    use meshwork_proto::v1::watch_event::Kind;
    use meshwork_proto::v1::{LeafTopic, SubscribeRequest, subscribe_request};

    let mut cluster = meshwork_tests::Cluster::start(3, &[]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let follower = cluster.followers(leader)[0];
    const SIGNED: &str = "meshwork_connect_leaves_signed_total";

    // A leaf asked of a follower is signed by the leader (the follower's
    // key and CSR, the leader's signature).
    let leaf = wait_for("a leaf from a follower", Duration::from_secs(5), || async {
        let leaf = cluster
            .get_json(follower, "/v1/agent/connect/ca/leaf/api")
            .await?;
        leaf["CertPEM"].as_str().is_some().then_some(leaf)
    })
    .await?;
    ensure!(
        leaf["PrivateKeyPEM"]
            .as_str()
            .is_some_and(|k| k.contains("PRIVATE KEY")),
        "{leaf}"
    );
    ensure!(cluster.metric(leader, SIGNED).await? >= 1.0);
    ensure!(cluster.metric(follower, SIGNED).await? == 0.0);

    // The leaf topic, on a follower: a leaf for the subscriber's own key.
    let dir = tempfile::tempdir()?;
    let (key, csr) = openssl_csr(dir.path(), "api")?;
    let channel = tonic::transport::Endpoint::from_shared(cluster.servers[follower].grpc())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let mut client = WatchClient::new(channel);
    let subscribe = |service: &str, csr: &str| SubscribeRequest {
        topic: Some(subscribe_request::Topic::Leaf(LeafTopic {
            service: service.into(),
            csr_pem: csr.into(),
        })),
        since_index: 0,
    };
    let mut stream = client.subscribe(subscribe("api", &csr)).await?.into_inner();
    let first = next_event(&mut stream, Duration::from_secs(5)).await?;
    ensure!(first.kind() == Kind::Snapshot && first.reset, "{first:?}");
    let first_leaf = leaf_of(&first).context("a leaf in the snapshot")?;
    ensure!(
        first_leaf.spiffe_id.ends_with("/ns/default/dc/dc1/svc/api"),
        "{first_leaf:?}"
    );
    let cert = dir.path().join("api.pem");
    std::fs::write(&cert, &first_leaf.cert_chain_pem)?;
    ensure!(
        public_key(&cert, true)? == public_key(&key, false)?,
        "the leaf is for the subscriber's key"
    );
    let marker = next_event(&mut stream, Duration::from_secs(5)).await?;
    ensure!(marker.kind() == Kind::EndOfSnapshot, "{marker:?}");

    // A root rotation (asked of the follower, written through the
    // leader) pushes a leaf from the new root on the same stream.
    let url = format!(
        "{}/v1/connect/ca/configuration",
        cluster.servers[follower].http()
    );
    let r = http_client()?
        .put(url)
        .json(&json!({"Provider": "consul", "Config": {"RotateRoot": true}}))
        .send()
        .await?;
    ensure!(r.status() == 200, "rotation: {}", r.status());
    let rotated = Instant::now();
    let renewed = loop {
        ensure!(
            rotated.elapsed() < Duration::from_secs(5),
            "no leaf after the rotation"
        );
        let event = next_event(&mut stream, Duration::from_secs(5)).await?;
        if let Some(leaf) = leaf_of(&event) {
            ensure!(event.kind() == Kind::Change, "{event:?}");
            break leaf;
        }
    };
    let roots = cluster
        .get_json(follower, "/v1/connect/ca/roots")
        .await
        .context("roots")?;
    ensure!(
        Some(renewed.root_id.as_str()) == roots["ActiveRootID"].as_str()
            && renewed.root_id != first_leaf.root_id
            && renewed.serial != first_leaf.serial,
        "the new leaf is from the new root: {renewed:?} {roots}"
    );

    // An operator's own root (made by openssl) is cross-signed by the
    // current one: a leaf of the new root verifies, through the chain it
    // carries, for a peer that knows only the old root.
    let old_root = roots["Roots"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["Active"] == json!(true)))
        .and_then(|r| r["RootCert"].as_str())
        .context("the active root")?
        .to_owned();
    let operator_root = |name: &str, subject: &str| -> Result<(String, String)> {
        let (key, cert) = (
            dir.path().join(format!("{name}.key")),
            dir.path().join(format!("{name}.pem")),
        );
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "30", "-subj", subject])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()?;
        ensure!(out.status.success(), "openssl req -x509: {out:?}");
        Ok((
            std::fs::read_to_string(cert)?,
            std::fs::read_to_string(key)?,
        ))
    };
    let put_root = |cert: String, key: String| {
        let url = format!(
            "{}/v1/connect/ca/configuration",
            cluster.servers[follower].http()
        );
        async move {
            let r = http_client()?
                .put(url)
                .json(&json!({"Provider": "consul",
                    "Config": {"RootCert": cert, "PrivateKey": key}}))
                .send()
                .await?;
            Ok::<_, anyhow::Error>((r.status().as_u16(), r.text().await?))
        }
    };
    // Two attributes of one type cannot be written back as an issuer
    // name: refused, with the reason.
    let (cert, key) = operator_root("dup", "/OU=a/OU=b/CN=Dup Root")?;
    let (code, body) = put_root(cert, key).await?;
    ensure!(
        code == 400 && body.contains("written back"),
        "{code} {body}"
    );
    let (cert, key) = operator_root("ours", "/C=DE/O=Example Corp/CN=Example Mesh Root")?;
    let (code, body) = put_root(cert, key).await?;
    ensure!(code == 200, "operator root: {code} {body}");
    let imported = loop {
        ensure!(
            rotated.elapsed() < Duration::from_secs(15),
            "no leaf of the operator's root"
        );
        let event = next_event(&mut stream, Duration::from_secs(5)).await?;
        if let Some(leaf) = leaf_of(&event).filter(|l| l.root_id != renewed.root_id) {
            break leaf;
        }
    };
    let split = imported
        .cert_chain_pem
        .find("-----END CERTIFICATE-----")
        .map(|i| i + "-----END CERTIFICATE-----\n".len())
        .context("a PEM chain")?;
    let (leaf_pem, cross_pem) = imported.cert_chain_pem.split_at(split);
    ensure!(
        cross_pem.contains("BEGIN CERTIFICATE"),
        "the chain has the cross-signed root"
    );
    for (name, text) in [
        ("old-root.pem", old_root.as_str()),
        ("leaf.pem", leaf_pem),
        ("cross.pem", cross_pem),
    ] {
        std::fs::write(dir.path().join(name), text)?;
    }
    let verify = |untrusted: bool| -> Result<bool> {
        let mut cmd = Command::new("openssl");
        cmd.current_dir(dir.path())
            .args(["verify", "-CAfile", "old-root.pem"]);
        if untrusted {
            cmd.args(["-untrusted", "cross.pem"]);
        }
        Ok(cmd.arg("leaf.pem").output()?.status.success())
    };
    ensure!(
        verify(true)?,
        "the leaf verifies against the old root through the cross-signature"
    );
    ensure!(!verify(false)?, "and not without it");

    // Bad subscriptions get a clear INVALID_ARGUMENT.
    for (service, csr, says) in [
        ("api", "junk", "CSR"),
        ("api", "", "csr_pem"),
        ("a/b", csr.as_str(), "SPIFFE"),
    ] {
        let status = match client.subscribe(subscribe(service, csr)).await {
            Ok(mut s) => match s.get_mut().message().await {
                Err(status) => status,
                Ok(m) => anyhow::bail!("{service} {csr:?} was accepted: {m:?}"),
            },
            Err(status) => status,
        };
        ensure!(
            status.code() == tonic::Code::InvalidArgument && status.message().contains(says),
            "{service} {csr:?}: {status:?}"
        );
    }

    // The leader goes: the next leader signs (and the stream on the
    // follower carries on, or ends UNAVAILABLE for the client to come
    // back).
    cluster.servers[leader].kill().await?;
    let asked = cluster.followers(leader)[1];
    wait_for(
        "a leaf after the leader died",
        Duration::from_secs(10),
        || async {
            let leaf = cluster
                .get_json(asked, "/v1/agent/connect/ca/leaf/web")
                .await?;
            leaf["CertPEM"].as_str().is_some().then_some(())
        },
    )
    .await?;
    cluster.done();
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
    // A second before the expiry, a slow request and two behind it
    // (pipelined): the first is in flight at the expiry and is answered;
    // the next one, read after the expiry, is the connection's last (it is
    // answered with `Connection: close`); the third never reaches the app.
    tokio::time::sleep(leaf.expires_in().saturating_sub(Duration::from_secs(1))).await;
    let pipelined = get("/slow", false) + &get("/after-busy", false) + &get("/after-busy-2", false);
    busy.write_all(pipelined.as_bytes()).await?;
    let (answers, closed) = mesh_client::read_until_close(&mut busy, Duration::from_secs(6)).await;
    ensure!(closed, "the connection closed after its expiry: {answers}");
    ensure!(
        answers.starts_with("HTTP/1.1 200")
            && answers.matches("HTTP/1.1 200").count() == 2
            && answers.matches("HTTP/1.1 ").count() == 2
            && answers.to_ascii_lowercase().contains("connection: close"),
        "the request in flight and the next were answered, the last closing: {answers}"
    );
    // The idle connection stayed open through the expiry (closing it
    // could fail a client about to send); its next request is its last.
    tokio::time::sleep(leaf.expires_in() + Duration::from_millis(500)).await;
    idle.write_all((get("/after-idle", false) + &get("/after-idle-2", false)).as_bytes())
        .await?;
    let (answer, closed) = mesh_client::read_until_close(&mut idle, Duration::from_secs(3)).await;
    ensure!(
        closed
            && answer.matches("HTTP/1.1 ").count() == 1
            && answer.starts_with("HTTP/1.1 200")
            && answer.to_ascii_lowercase().contains("connection: close"),
        "the expired caller's idle connection takes one more request: closed={closed} {answer:?}"
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
    // What the server sidecar saw: the request in flight and each
    // connection's last request were served; nothing after them reached
    // the app, nor did the new connection's; both connections counted.
    let log = std::fs::read_to_string(&mesh.sidecars[server].access_log)?;
    for path in ["/slow", "/after-busy", "/after-idle"] {
        let seen = outcomes_for(&log, path);
        ensure!(seen == ["upstream"], "{path} was served once: {seen:?}");
    }
    for path in ["/after-busy-2", "/after-idle-2", "/after-new"] {
        let seen = outcomes_for(&log, path);
        ensure!(seen.is_empty(), "{path} did not reach the app: {seen:?}");
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
