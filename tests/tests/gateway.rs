//! The sidecar in gateway mode (issue 25, its first part): `[gateway]`
//! instead of `[service]`, registered as an `ingress-gateway` service, its
//! listeners opened and closed live from the `ingress-gateway` entry named
//! after it, each carrying outside clients' calls into the mesh as an
//! upstream does (mutual TLS to the services' sidecars, their discovery
//! chain), plain or terminating TLS with the certificate the client names
//! (SNI). Listeners it cannot open yet (routing by host) are reported, not
//! half-served. Real binaries (one registry server, service instances, the
//! gateway) and curl.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use meshwork_tests::http::http_client;
use meshwork_tests::meshctl_tls;
use meshwork_tests::sidecar::Mesh;
use meshwork_tests::wait_for;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn put_entry(mesh: &Mesh, entry: &Value) -> Result<(u16, String)> {
    let url = format!("{}/v1/config", mesh.cluster().servers[0].http());
    let r = http_client()?.put(url).json(entry).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.text().await?))
}

/// `GET url` as JSON, if it answers.
async fn get_json(url: &str) -> Option<Value> {
    http_client()
        .ok()?
        .get(url)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// The first word of the answer to `GET /` on `addr`, if any.
async fn answered_by(addr: &str) -> Option<String> {
    let r = http_client()
        .ok()?
        .get(format!("http://{addr}/"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    let body = r.text().await.ok()?;
    body.split_whitespace().next().map(str::to_owned)
}

/// One TCP exchange with `addr`: a byte, a half-close, the reply.
async fn tcp_reply(addr: &str) -> Option<String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(b"x").await.ok()?;
        stream.shutdown().await.ok()?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.ok()?;
        Some(reply)
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
        .filter(|r| !r.is_empty())
}

#[tokio::test]
async fn a_gateway_opens_the_listeners_of_its_ingress_entry_live() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    mesh.versioned_instance((20, 0), ("api", "api-1", "v1"))
        .await?;
    mesh.versioned_tcp_instance((21, 0), ("db", "db-1", "v1"))
        .await?;
    mesh.versioned_instance((22, 0), ("web", "web-1", "v1"))
        .await?;
    let ip = mesh.ip(100);
    let g = mesh.gateway(&ip, "edge", "").await?;
    let (http_addr, tcp_addr, tls_addr, hosts_addr) = (
        format!("{ip}:18080"),
        format!("{ip}:18081"),
        format!("{ip}:18082"),
        format!("{ip}:18083"),
    );

    // Registered as Consul registers an ingress gateway.
    let registry = mesh.cluster().servers[0].http();
    let catalog = wait_for(
        "the gateway registered",
        Duration::from_secs(10),
        || async {
            let c = get_json(&format!("{registry}/v1/catalog/service/edge")).await?;
            c.get(0).cloned()
        },
    )
    .await?;
    ensure!(
        catalog["ServiceKind"] == "ingress-gateway" && catalog["ServicePort"] == 8443,
        "{catalog}"
    );

    // An entry Consul would refuse is refused at PUT, naming the field.
    let (status, body) = put_entry(
        &mesh,
        &json!({"Kind": "ingress-gateway", "Name": "edge", "Listeners": [
            {"Port": 18081, "Protocol": "tcp", "Services": [{"Name": "db"}, {"Name": "api"}]}]}),
    )
    .await?;
    ensure!(
        status == 400 && body.contains("Listeners[0].Services"),
        "{status} {body}"
    );

    // An HTTP listener for api: open within a second of the PUT's send.
    let sent = Instant::now();
    let (status, body) = put_entry(
        &mesh,
        &json!({"Kind": "ingress-gateway", "Name": "edge", "Listeners": [
            {"Port": 18080, "Protocol": "http", "Services": [{"Name": "api"}]}]}),
    )
    .await?;
    ensure!(status == 200, "{status} {body}");
    wait_for("the http listener", Duration::from_secs(5), || async {
        (answered_by(&http_addr).await.as_deref() == Some("api-1")).then_some(())
    })
    .await?;
    let took = sent.elapsed();
    ensure!(took < Duration::from_secs(1), "applied after {took:?}");

    // A tcp listener for db added, and one routing by host between api
    // and web; a TLS listener on this gateway, which has no certificates,
    // is reported and not opened; the others stay.
    put_entry(
        &mesh,
        &json!({"Kind": "ingress-gateway", "Name": "edge", "Listeners": [
            {"Port": 18080, "Protocol": "http", "Services": [{"Name": "api"}]},
            {"Port": 18081, "Services": [{"Name": "db"}]},
            {"Port": 18082, "Protocol": "http", "TLS": {"Enabled": true},
             "Services": [{"Name": "api"}]},
            {"Port": 18083, "Protocol": "http", "Services": [
                {"Name": "api", "Hosts": ["api.example.com", "*.api.example.com"]},
                {"Name": "web"}]}]}),
    )
    .await?;
    let reply = wait_for("the tcp listener", Duration::from_secs(5), || async {
        tcp_reply(&tcp_addr).await
    })
    .await?;
    ensure!(reply.starts_with("db-1 got 1 bytes"), "{reply}");
    let by_host = |host: &'static str| {
        let addr = hosts_addr.clone();
        async move {
            let r = http_client()
                .ok()?
                .get(format!("http://{addr}/"))
                .header("host", host)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .ok()?;
            let status = r.status().as_u16();
            let error = r
                .headers()
                .get("x-meshwork-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = r.text().await.ok()?;
            Some((
                status,
                error,
                body.split_whitespace().next().unwrap_or("").to_owned(),
            ))
        }
    };
    wait_for(
        "the host-routing listener",
        Duration::from_secs(5),
        || async {
            let (status, _, who) = by_host("api.example.com").await?;
            (status == 200 && who == "api-1").then_some(())
        },
    )
    .await?;
    let cases = [
        ("v2.api.example.com:18083", 200, "api-1"),
        ("web.ingress.example.org", 200, "web-1"),
        ("WEB.ingress.mesh", 200, "web-1"),
    ];
    for (host, want_status, want_who) in cases {
        // Each service's cluster fills as its endpoints arrive.
        wait_for(
            &format!("{host} routed"),
            Duration::from_secs(5),
            || async {
                let (status, _, who) = by_host(host).await?;
                (status == want_status && who == want_who).then_some(())
            },
        )
        .await?;
    }
    let answer = by_host("other.example.com").await;
    ensure!(
        answer
            .as_ref()
            .is_some_and(|(s, e, _)| *s == 404 && e.as_deref() == Some("no-route")),
        "an unknown host: {answer:?}"
    );
    let refused = wait_for(
        "the TLS listener reported",
        Duration::from_secs(10),
        || async {
            let fleet = get_json(&format!("{registry}/v1/mesh/sidecars")).await?;
            let gateway = fleet["Sidecars"]
                .as_array()?
                .iter()
                .find(|s| s["Service"] == "edge")?
                .clone();
            let reasons = gateway["Refused"].to_string();
            (gateway["Mode"] == "gateway" && reasons.contains("port 18082")).then_some(reasons)
        },
    )
    .await?;
    ensure!(refused.contains("no [[gateway.certificates]]"), "{refused}");
    ensure!(
        tokio::net::TcpStream::connect(&tls_addr).await.is_err(),
        "the TLS listener without certificates is not open"
    );
    ensure!(answered_by(&http_addr).await.as_deref() == Some("api-1"));

    // The tcp listener removed: closed; the registry gone: the gateway
    // keeps serving what it has.
    put_entry(
        &mesh,
        &json!({"Kind": "ingress-gateway", "Name": "edge", "Listeners": [
            {"Port": 18080, "Protocol": "http", "Services": [{"Name": "api"}]}]}),
    )
    .await?;
    wait_for(
        "the tcp listener closed",
        Duration::from_secs(5),
        || async {
            tokio::net::TcpStream::connect(&tcp_addr)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await?;
    if let Some(cluster) = mesh.cluster.as_mut() {
        cluster.servers[0].kill().await?;
    }
    for _ in 0..5 {
        let who = answered_by(&http_addr).await;
        ensure!(
            who.as_deref() == Some("api-1"),
            "with the registry down: {who:?}"
        );
    }
    let config = mesh.sidecars[g].json("/config").await?;
    let listed = config["upstreams"].to_string();
    ensure!(listed.contains("18080"), "{listed}");
    mesh.done();
    Ok(())
}

/// `curl` over HTTPS to `https://<host>:<port>/` reaching `ip` (the name
/// sent as SNI), trusting `ca`: (exit code, HTTP version, body). Async:
/// the apps behind the gateway run on this test's runtime.
async fn curl_https(
    ca: &std::path::Path,
    host: &str,
    ip: &str,
    port: u16,
) -> Result<(i32, String, String)> {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "5", "--http2", "--cacert"])
        .arg(ca)
        .args([
            "--resolve",
            &format!("{host}:{port}:{ip}"),
            "-w",
            "\n%{http_version}",
            &format!("https://{host}:{port}/"),
        ])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, version) = text.rsplit_once('\n').unwrap_or((&text, ""));
    Ok((
        out.status.code().unwrap_or(-1),
        version.to_owned(),
        body.to_owned(),
    ))
}

/// A TLS listener: the certificate is the one for the name the client
/// sends (SNI: an exact host, or a `*.` wildcard), HTTP/2 by ALPN; a name
/// no certificate covers, or none, fails the handshake.
#[tokio::test]
async fn a_gateway_terminates_tls_with_the_certificate_the_client_names() -> Result<()> {
    let certs = tempfile::tempdir()?;
    meshctl_tls(certs.path(), &["ca", "create"])?;
    meshctl_tls(
        certs.path(),
        &[
            "cert",
            "create",
            "--server",
            "--additional-dnsname",
            "shop.example.com",
        ],
    )?;
    meshctl_tls(
        certs.path(),
        &[
            "cert",
            "create",
            "--server",
            "--additional-dnsname",
            "*.api.example.com",
        ],
    )?;
    let file = |name: &str| certs.path().join(name).display().to_string();
    let extra = format!(
        r#"[[gateway.certificates]]
hosts = ["shop.example.com"]
cert_file = "{}"
key_file = "{}"

[[gateway.certificates]]
hosts = ["*.api.example.com"]
cert_file = "{}"
key_file = "{}"
"#,
        file("dc1-server-meshwork-0.pem"),
        file("dc1-server-meshwork-0-key.pem"),
        file("dc1-server-meshwork-1.pem"),
        file("dc1-server-meshwork-1-key.pem"),
    );
    let mut mesh = Mesh::start().await?;
    mesh.versioned_instance((20, 0), ("api", "api-1", "v1"))
        .await?;
    let ip = mesh.ip(100);
    mesh.gateway(&ip, "edge", &extra).await?;
    let (status, body) = put_entry(
        &mesh,
        &json!({"Kind": "ingress-gateway", "Name": "edge", "TLS": {"Enabled": true},
            "Listeners": [{"Port": 18443, "Protocol": "http", "Services": [{"Name": "api"}]}]}),
    )
    .await?;
    ensure!(status == 200, "{status} {body}");
    let ca = certs.path().join("meshwork-agent-ca.pem");
    let answer = wait_for("the TLS listener", Duration::from_secs(10), || async {
        let answer = curl_https(&ca, "shop.example.com", &ip, 18443).await.ok()?;
        (answer.0 == 0).then_some(answer)
    })
    .await?;
    ensure!(
        answer.1 == "2" && answer.2.starts_with("api-1"),
        "shop.example.com: {answer:?}"
    );
    // The wildcard certificate for a name under api.example.com.
    let answer = curl_https(&ca, "v1.api.example.com", &ip, 18443).await?;
    ensure!(
        answer.0 == 0 && answer.2.starts_with("api-1"),
        "v1.api.example.com: {answer:?}"
    );
    // No certificate for the name: the handshake fails (curl 35), and
    // none is shown to a client that names no host.
    let answer = curl_https(&ca, "other.example.com", &ip, 18443).await?;
    ensure!(answer.0 == 35, "other.example.com: {answer:?}");
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-k", "--max-time", "5"])
        .arg(format!("https://{ip}:18443/"))
        .output()
        .await?;
    ensure!(
        out.status.code() == Some(35),
        "no SNI: curl exit {:?}",
        out.status.code()
    );
    mesh.done();
    Ok(())
}
