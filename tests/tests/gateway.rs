//! The sidecar in gateway mode (issue 25): `[gateway]`
//! instead of `[service]`, registered as an `ingress-gateway` service, its
//! listeners opened and closed live from the `ingress-gateway` entry named
//! after it, each carrying outside clients' calls into the mesh as an
//! upstream does (mutual TLS to the services' sidecars, their discovery
//! chain), plain or terminating TLS with the certificate the client names
//! (SNI), routing by host; and its edge: JWTs and API keys, per-client
//! rate limits, forwarding headers, the HTTPS redirect and HSTS. Listeners
//! it cannot open (TLS without certificates) are reported, not
//! half-served. Real binaries (one registry server, service instances, the
//! gateway), curl and openssl.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use meshwork_tests::http::http_client;
use meshwork_tests::meshctl_tls;
use meshwork_tests::sidecar::Mesh;
use meshwork_tests::wait_for;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server certificate for `host` from the test CA in `dir` (meshctl
/// numbers the files: `dc1-server-meshwork-<n>.pem`).
fn server_cert(dir: &std::path::Path, host: &str) -> Result<()> {
    meshctl_tls(
        dir,
        &["cert", "create", "--server", "--additional-dnsname", host],
    )?;
    Ok(())
}

async fn put_entry(mesh: &Mesh, entry: &Value) -> Result<(u16, String)> {
    let url = format!("{}/v1/config", mesh.cluster().servers[0].http());
    let r = http_client()?.put(url).json(entry).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.text().await?))
}

/// `GET url` as JSON, if it answers.
async fn get_json(url: &str) -> Option<Value> {
    meshwork_tests::http::get_json(&http_client().ok()?, url).await
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
    server_cert(certs.path(), "shop.example.com")?;
    server_cert(certs.path(), "*.api.example.com")?;
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
    let g = mesh.gateway(&ip, "edge", &extra).await?;
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
    // TLS garbage: the connection is closed, nothing answered, counted.
    let mut raw = tokio::net::TcpStream::connect(format!("{ip}:18443")).await?;
    raw.write_all(b"\x16\x03\x01\x00\x05garbage that is no ClientHello\r\n\r\n")
        .await?;
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut reply)).await;
    ensure!(
        read.is_ok() && !String::from_utf8_lossy(&reply).contains("HTTP/"),
        "garbage got {reply:?}"
    );
    let refused = mesh.sidecars[g]
        .metric_sum("meshwork_gateway_tls_handshake_failures_total{reason=\"refused\"}")
        .await?;
    ensure!(refused >= 3.0, "{refused} refused handshakes counted");
    let answer = curl_https(&ca, "shop.example.com", &ip, 18443).await?;
    ensure!(answer.0 == 0, "after the garbage: {answer:?}");

    // A returning client resumes its TLS session (a ticket), no full
    // handshake: openssl saves the session, then offers it.
    let session = certs.path().join("session.pem");
    let s_client = |extra: &'static str| {
        let (ip, ca, session) = (ip.clone(), ca.clone(), session.clone());
        async move {
            // A request read to its end: the tickets come after the
            // handshake, before the answer.
            let mut child = tokio::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-ign_eof",
                    "-connect",
                    &format!("{ip}:18443"),
                    "-servername",
                    "shop.example.com",
                ])
                .arg("-CAfile")
                .arg(&ca)
                .arg(extra)
                .arg(&session)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(
                        b"GET / HTTP/1.1\r\nhost: shop.example.com\r\nconnection: close\r\n\r\n",
                    )
                    .await?;
            }
            let out =
                tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await??;
            anyhow::Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    let first = s_client("-sess_out").await?;
    ensure!(first.contains("New, TLSv1.3"), "{first}");
    let again = s_client("-sess_in").await?;
    ensure!(
        again.contains("Reused, TLSv1.3"),
        "the session was not resumed:\n{again}"
    );

    // Certificate rotation: the files replaced on disk (no SIGHUP) are
    // served to new connections within seconds; a connection opened
    // before keeps working.
    let ca_file = ca.clone();
    let connect = move || {
        let ca = ca_file.clone();
        let addr = format!("{ip}:18443");
        async move {
            use rustls_pki_types::pem::PemObject as _;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pki_types::CertificateDer::pem_file_iter(&ca)? {
                roots.add(cert?)?;
            }
            let config = rustls::ClientConfig::builder_with_provider(
                meshwork_tests::mesh_client::provider(),
            )
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect("shop.example.com".try_into()?, tcp)
                .await?;
            let served = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec())
                .unwrap_or_default();
            let (send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            anyhow::Ok((served, send))
        }
    };
    let get = |mut send: hyper::client::conn::http1::SendRequest<
        http_body_util::Empty<bytes::Bytes>,
    >| async move {
        let request = hyper::Request::get("/")
            .header("host", "shop.example.com")
            .body(http_body_util::Empty::new())?;
        let response =
            tokio::time::timeout(Duration::from_secs(5), send.send_request(request)).await??;
        anyhow::Ok((response.status().as_u16(), send))
    };
    let (before, open) = connect().await?;
    let (status, open) = get(open).await?;
    ensure!(status == 200, "before the rotation: {status}");
    server_cert(certs.path(), "shop.example.com")?;
    for (from, to) in [
        (
            "dc1-server-meshwork-2-key.pem",
            "dc1-server-meshwork-0-key.pem",
        ),
        ("dc1-server-meshwork-2.pem", "dc1-server-meshwork-0.pem"),
    ] {
        // Put in place whole (a rename), as a deploy tool does.
        let staged = certs.path().join(format!("{to}.new"));
        std::fs::copy(certs.path().join(from), &staged)?;
        std::fs::rename(&staged, certs.path().join(to))?;
    }
    wait_for(
        "the rotated certificate served",
        Duration::from_secs(10),
        || async {
            let (served, _) = connect().await.ok()?;
            (served != before).then_some(())
        },
    )
    .await?;
    let (status, _) = get(open).await?;
    ensure!(
        status == 200,
        "the connection opened before the rotation: {status}"
    );
    mesh.done();
    Ok(())
}

/// A JWT signer of the suite: the key, its algorithm and `kid`.
struct Signer {
    key: jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
    kid: String,
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Signer {
    /// An Ed25519 key and its JWK.
    fn ed25519(kid: &str) -> Result<(Self, Value)> {
        use ring::signature::KeyPair as _;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| anyhow::anyhow!("ed25519 key"))?;
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|_| anyhow::anyhow!("ed25519 key"))?;
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig",
            "x": b64url(pair.public_key().as_ref())});
        Ok((
            Signer {
                key: jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref()),
                alg: jsonwebtoken::Algorithm::EdDSA,
                kid: kid.into(),
            },
            jwk,
        ))
    }

    /// A P-256 key (ES256) and its JWK.
    fn p256(kid: &str) -> Result<(Self, Value)> {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("p256 key"))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| anyhow::anyhow!("p256 key"))?;
        // The uncompressed point: 0x04, x, y.
        let point = pair.public_key().as_ref();
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
            "x": b64url(&point[1..33]), "y": b64url(&point[33..65])});
        Ok((
            Signer {
                key: jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
                alg: jsonwebtoken::Algorithm::ES256,
                kid: kid.into(),
            },
            jwk,
        ))
    }

    /// An RSA key (RS256, made by openssl: ring makes none) and its JWK.
    fn rsa(dir: &std::path::Path, kid: &str) -> Result<(Self, Value)> {
        let pem = dir.join(format!("{kid}.pem"));
        let run = |args: &[&str]| -> Result<Vec<u8>> {
            let out = std::process::Command::new("openssl").args(args).output()?;
            ensure!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(out.stdout)
        };
        let pem_s = pem.display().to_string();
        run(&["genrsa", "-traditional", "-out", &pem_s, "2048"])?;
        let der = run(&["rsa", "-traditional", "-in", &pem_s, "-outform", "DER"])?;
        let modulus = String::from_utf8(run(&["rsa", "-in", &pem_s, "-noout", "-modulus"])?)?;
        let hex = modulus.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<Result<_, _>>()?;
        let jwk = json!({"kty": "RSA", "kid": kid, "alg": "RS256", "n": b64url(&n), "e": "AQAB"});
        Ok((
            Signer {
                key: jsonwebtoken::EncodingKey::from_rsa_der(&der),
                alg: jsonwebtoken::Algorithm::RS256,
                kid: kid.into(),
            },
            jwk,
        ))
    }

    fn sign(&self, claims: &Value) -> Result<String> {
        let mut header = jsonwebtoken::Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.key)?)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A request's answer: status, the headers that matter, and the body's
/// first word (who answered).
#[derive(Debug)]
struct Seen {
    status: u16,
    headers: reqwest::header::HeaderMap,
    who: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn call(client: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Result<Seen> {
    let mut request = client.get(url).timeout(Duration::from_secs(5));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let r = request.send().await?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.text().await?;
    Ok(Seen {
        status,
        headers,
        who: body.split_whitespace().next().unwrap_or("").to_owned(),
    })
}

/// A key server: the JWKS over HTTPS at `/jwks` with the certificate
/// `cert`/`key`; counts what it served. Aborting the task stops it.
async fn key_server(
    ip: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
    jwks: String,
) -> Result<(
    u16,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
)> {
    use rustls_pki_types::pem::PemObject as _;
    let chain =
        rustls_pki_types::CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)?;
    let config =
        rustls::ServerConfig::builder_with_provider(meshwork_tests::mesh_client::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0")).await?;
    let port = listener.local_addr()?.port();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&served);
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, jwks, count) = (
                acceptor.clone(),
                jwks.clone(),
                std::sync::Arc::clone(&count),
            );
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks}",
                    jwks.len()
                );
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    Ok((port, served, task))
}

/// The gateway's edge: JWTs (EdDSA, ES256, RS256; keys from a file and
/// from an HTTPS key server), API keys, per-client rate limits,
/// forwarding headers, CONNECT refused, the HTTPS redirect and HSTS —
/// each refusal a 401/405/429 with the headers clients expect, counted.
#[tokio::test]
async fn a_gateway_authenticates_limits_and_forwards_outside_clients() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ed, ed_jwk) = Signer::ed25519("ed-1")?;
    let (es, es_jwk) = Signer::p256("es-1")?;
    let (rs, rs_jwk) = Signer::rsa(dir.path(), "rs-1")?;
    let (remote_signer, remote_jwk) = Signer::ed25519("remote-1")?;
    let keys_file = dir.path().join("jwks.json");
    std::fs::write(
        &keys_file,
        json!({"keys": [ed_jwk, es_jwk, rs_jwk]}).to_string(),
    )?;
    // Certificates: the gateway's (for its TLS listener) and the key
    // server's, from one CA.
    meshctl_tls(dir.path(), &["ca", "create"])?;
    server_cert(dir.path(), "shop.example.com")?;
    let file = |name: &str| dir.path().join(name).display().to_string();
    let ca = file("meshwork-agent-ca.pem");
    // The API key "k-partner-secret" of "partner", by its SHA-256.
    let api_key = "k-partner-secret";
    let digest = ring::digest::digest(&ring::digest::SHA256, api_key.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let extra = format!(
        r#"[[gateway.certificates]]
hosts = ["shop.example.com"]
cert_file = "{}"
key_file = "{}"

[[gateway.api_keys]]
name = "partner"
sha256 = "{hex}"
"#,
        file("dc1-server-meshwork-0.pem"),
        file("dc1-server-meshwork-0-key.pem"),
    );

    let mut mesh = Mesh::start().await?;
    mesh.versioned_instance((20, 0), ("api", "api-1", "v1"))
        .await?;
    let ip = mesh.ip(100);
    let (key_port, key_fetches, key_task) = key_server(
        "127.0.0.1",
        std::path::Path::new(&file("dc1-server-meshwork-0.pem")),
        std::path::Path::new(&file("dc1-server-meshwork-0-key.pem")),
        json!({"keys": [remote_jwk]}).to_string(),
    )
    .await?;
    let g = mesh.gateway(&ip, "edge", &extra).await?;

    // Providers Consul's way; bad ones refused at PUT, naming the field.
    let (status, body) = put_entry(
        &mesh,
        &json!({"Kind": "jwt-provider", "Name": "bad",
            "JSONWebKeySet": {"Remote": {"URI": "http://keys.example.com/jwks"}}}),
    )
    .await?;
    ensure!(
        status == 400 && body.contains("HTTPS only"),
        "{status} {body}"
    );
    for provider in [
        json!({"Kind": "jwt-provider", "Name": "idp",
            "Issuer": "https://idp.test", "Audiences": ["shop"],
            "JSONWebKeySet": {"Local": {"Filename": keys_file.display().to_string()}},
            "ClaimToHeaders": [{"Claim": "sub", "HeaderName": "x-user"}]}),
        json!({"Kind": "jwt-provider", "Name": "remote",
            "Issuer": "https://idp.test",
            "JSONWebKeySet": {"Remote": {"URI": format!("https://localhost:{key_port}/jwks"),
                "CacheDuration": "1s",
                "JWKSCluster": {"TLSCertificates": {"TrustedCA": {"Filename": ca}}}}},
            "Forwarding": {"HeaderName": "x-jwt-payload"}}),
    ] {
        let (status, body) = put_entry(&mesh, &provider).await?;
        ensure!(status == 200, "{provider}: {status} {body}");
    }
    let (status, body) = put_entry(
        &mesh,
        &json!({"Kind": "ingress-gateway", "Name": "edge", "Listeners": [
            {"Port": 18090, "Protocol": "http", "HSTS": {"MaxAgeSeconds": 60},
             "Services": [{"Name": "api"}]}]}),
    )
    .await?;
    ensure!(
        status == 400 && body.contains("HSTS"),
        "HSTS on plain HTTP: {status} {body}"
    );
    let (status, body) = put_entry(
        &mesh,
        &json!({"Kind": "ingress-gateway", "Name": "edge", "Listeners": [
            {"Port": 18090, "Protocol": "http",
             "JWT": {"Providers": [{"Name": "idp"}]},
             "APIKeys": {"Header": "x-api-key"},
             "RateLimit": {"RequestsPerSecond": 20, "RequestsMaxBurst": 20},
             "Services": [{"Name": "api"}]},
            {"Port": 18091, "Protocol": "http", "HTTPSRedirect": {"Port": 18443}},
            {"Port": 18092, "Protocol": "http",
             "JWT": {"Providers": [{"Name": "remote", "VerifyClaims": [{"Path": ["role"], "Value": "admin"}]}]},
             "Services": [{"Name": "api"}]},
            {"Port": 18443, "Protocol": "http", "TLS": {"Enabled": true},
             "HSTS": {"MaxAgeSeconds": 31536000, "IncludeSubdomains": true},
             "Services": [{"Name": "api"}]}]}),
    )
    .await?;
    ensure!(status == 200, "{status} {body}");

    let client = http_client()?;
    let url = format!("http://{ip}:18090/");
    let claims =
        json!({"iss": "https://idp.test", "aud": "shop", "sub": "ann", "exp": unix_now() + 300});
    let bearer = |t: &str| format!("Bearer {t}");
    let good = ed.sign(&claims)?;
    let seen = wait_for(
        "the authenticated listener",
        Duration::from_secs(10),
        || async {
            let seen = call(&client, &url, &[("authorization", &bearer(&good))])
                .await
                .ok()?;
            (seen.status == 200).then_some(seen)
        },
    )
    .await?;
    // The claim as a header, the token not passed on, the forwarding
    // headers the gateway's own.
    ensure!(seen.who == "api-1", "{seen:?}");
    ensure!(seen.header("x-seen-x-user") == Some("ann"), "{seen:?}");
    ensure!(seen.header("x-seen-authorization").is_none(), "{seen:?}");
    ensure!(
        seen.header("x-seen-x-forwarded-proto") == Some("http"),
        "{seen:?}"
    );
    // Every algorithm the issue names; a spoofed claim header and
    // X-Forwarded-For are replaced.
    for signer in [&es, &rs] {
        let seen = call(
            &client,
            &url,
            &[
                ("authorization", &bearer(&signer.sign(&claims)?)),
                ("x-user", "root"),
                ("x-forwarded-for", "203.0.113.9"),
            ],
        )
        .await?;
        ensure!(seen.status == 200, "{:?}: {seen:?}", signer.alg);
        ensure!(seen.header("x-seen-x-user") == Some("ann"), "{seen:?}");
        let xff = seen.header("x-seen-x-forwarded-for").unwrap_or_default();
        ensure!(
            !xff.contains("203.0.113.9") && xff.starts_with("127."),
            "{seen:?}"
        );
        ensure!(
            seen.header("x-seen-forwarded")
                .is_some_and(|f| f.starts_with("for=127.")),
            "{seen:?}"
        );
    }

    // What gets 401, with the challenge.
    let with = |k: &str, v: Value| {
        let mut c = claims.clone();
        c[k] = v;
        c
    };
    let body_b64 = b64url(claims.to_string().as_bytes());
    let (other, _) = Signer::ed25519("ed-1")?;
    let cases: Vec<(&str, String)> = vec![
        ("expired", ed.sign(&with("exp", json!(unix_now() - 600)))?),
        (
            "wrong issuer",
            ed.sign(&with("iss", json!("https://evil.test")))?,
        ),
        ("wrong audience", ed.sign(&with("aud", json!("other")))?),
        ("bad signature", other.sign(&claims)?),
        (
            "alg none",
            format!("{}.{body_b64}.", b64url(br#"{"alg":"none","kid":"ed-1"}"#)),
        ),
        (
            "oversized",
            ed.sign(&with("pad", json!("x".repeat(9 * 1024))))?,
        ),
        (
            "CR/LF in a claim",
            ed.sign(&with("sub", json!("ann\r\nx-admin: 1")))?,
        ),
    ];
    for (what, token) in &cases {
        let seen = call(&client, &url, &[("authorization", &bearer(token))]).await?;
        ensure!(seen.status == 401, "{what}: {seen:?}");
        let challenge = seen.header("www-authenticate").unwrap_or_default();
        ensure!(
            challenge.starts_with("Bearer ") && challenge.contains("error=\"invalid_token\""),
            "{what}: {challenge}"
        );
    }
    let seen = call(&client, &url, &[]).await?;
    ensure!(
        seen.status == 401
            && seen
                .header("www-authenticate")
                .is_some_and(|c| !c.contains("error=")),
        "no credentials: {seen:?}"
    );
    // API keys: the right one passes (and is not passed on), another not.
    let seen = call(&client, &url, &[("x-api-key", api_key), ("x-user", "root")]).await?;
    ensure!(seen.status == 200, "{seen:?}");
    ensure!(
        seen.header("x-seen-x-api-key").is_none() && seen.header("x-seen-x-user").is_none(),
        "{seen:?}"
    );
    let seen = call(&client, &url, &[("x-api-key", "k-guess")]).await?;
    ensure!(seen.status == 401, "{seen:?}");

    // CONNECT: 405.
    let mut raw = tokio::net::TcpStream::connect(format!("{ip}:18090")).await?;
    raw.write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nhost: db.internal:5432\r\n\r\n")
        .await?;
    let mut reply = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut reply)).await??;
    let reply = String::from_utf8_lossy(&reply[..n]).into_owned();
    ensure!(reply.starts_with("HTTP/1.1 405"), "{reply}");

    // 20 requests a second per client: one client's flood gets 429s with
    // retry-after, another client is not affected.
    let from = |last: u8| -> Result<reqwest::Client> {
        let ip: std::net::IpAddr = mesh.ip(last).parse()?;
        Ok(reqwest::Client::builder()
            .local_address(ip)
            .timeout(Duration::from_secs(5))
            .build()?)
    };
    let (flood, quiet) = (from(201)?, from(202)?);
    let (mut ok, mut limited, mut retry_after) = (0, 0, None);
    let started = Instant::now();
    for _ in 0..60 {
        let seen = call(&flood, &url, &[("x-api-key", api_key)]).await?;
        match seen.status {
            200 => ok += 1,
            429 => {
                limited += 1;
                retry_after = seen.header("retry-after").map(str::to_owned);
            }
            other => anyhow::bail!("flood: {other} {seen:?}"),
        }
    }
    let took = started.elapsed().as_secs_f64();
    let allowed = 20.0 + 20.0 * took;
    ensure!(
        f64::from(ok) <= allowed + 1.0
            && limited >= 60 - (allowed.ceil() as i32) - 1
            && limited > 0,
        "{ok} passed, {limited} limited in {took:.2}s (at most {allowed:.0} may pass)"
    );
    ensure!(retry_after.as_deref() == Some("1"), "{retry_after:?}");
    for _ in 0..5 {
        let seen = call(&quiet, &url, &[("x-api-key", api_key)]).await?;
        ensure!(seen.status == 200, "another client: {seen:?}");
    }

    // The redirect listener: 308 to the same host and path over HTTPS.
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(5))
        .build()?;
    let seen = call(
        &no_follow,
        &format!("http://{ip}:18091/cart?item=7"),
        &[("host", "shop.example.com")],
    )
    .await?;
    ensure!(
        seen.status == 308
            && seen.header("location") == Some("https://shop.example.com:18443/cart?item=7"),
        "{seen:?}"
    );
    // HSTS on the TLS listener's answers.
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--max-time",
            "5",
            "--cacert",
            &ca,
        ])
        .args([
            "--resolve",
            &format!("shop.example.com:18443:{ip}"),
            "https://shop.example.com:18443/",
        ])
        .output()
        .await?;
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    ensure!(
        head.contains("strict-transport-security: max-age=31536000; includesubdomains"),
        "{head}"
    );
    ensure!(head.contains("x-seen-x-forwarded-proto: https"), "{head}");

    // Keys from the HTTPS key server: the claim the listener demands; the
    // payload forwarded; the server gone, the last good keys kept.
    let remote_url = format!("http://{ip}:18092/");
    let admin = remote_signer.sign(&with("role", json!("admin")))?;
    let seen = wait_for("the remote key set", Duration::from_secs(10), || async {
        let seen = call(&client, &remote_url, &[("authorization", &bearer(&admin))])
            .await
            .ok()?;
        (seen.status == 200).then_some(seen)
    })
    .await?;
    ensure!(seen.header("x-seen-x-jwt-payload").is_some(), "{seen:?}");
    let user = remote_signer.sign(&with("role", json!("user")))?;
    let seen = call(&client, &remote_url, &[("authorization", &bearer(&user))]).await?;
    ensure!(seen.status == 401, "a claim the listener demands: {seen:?}");
    ensure!(
        key_fetches.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the key server was asked"
    );
    key_task.abort();
    let metrics = wait_for(
        "a failed key fetch counted",
        Duration::from_secs(10),
        || async {
            let text = mesh.sidecars[g].metrics().await.ok()?;
            text.lines()
                .any(|l| {
                    l.starts_with("meshwork_gateway_jwks_fetch_failures_total{provider=\"remote\"}")
                        && !l.ends_with(" 0")
                })
                .then_some(text)
        },
    )
    .await?;
    let seen = call(&client, &remote_url, &[("authorization", &bearer(&admin))]).await?;
    ensure!(seen.status == 200, "the last good keys: {seen:?}");
    for line in [
        "meshwork_gateway_refused_total{listener=\"18090\",reason=\"expired\"} 1",
        "meshwork_gateway_refused_total{listener=\"18090\",reason=\"method\"} 1",
        "meshwork_gateway_jwt_keys{provider=\"idp\"} 3",
    ] {
        ensure!(metrics.contains(line), "{line} not in /metrics:\n{metrics}");
    }
    ensure!(
        metrics.contains(&format!(
            "meshwork_gateway_rate_limited_total{{listener=\"18090\"}} {limited}"
        )),
        "{metrics}"
    );
    // The refusals are in the access log, and no credential is.
    let log = std::fs::read_to_string(&mesh.sidecars[g].access_log)?;
    ensure!(
        log.lines()
            .any(|l| l.contains("\"outcome\":\"unauthenticated\"") && l.contains("\"status\":401")),
        "no 401 in the access log"
    );
    ensure!(
        !log.contains(api_key) && !log.contains(&good),
        "a credential in the access log"
    );
    mesh.done();
    Ok(())
}

/// Through the gateway as through a sidecar: gRPC (a server stream, its
/// trailers, and the edge's refusal as a gRPC status), HTTP/2 with prior
/// knowledge, and the service's router (a path prefix to another
/// service, rewritten).
#[tokio::test]
async fn a_gateway_carries_grpc_http2_and_the_services_routes() -> Result<()> {
    use meshwork_proto::v1::watch_client::WatchClient;
    use meshwork_proto::v1::{ServiceTopic, SubscribeRequest, subscribe_request};
    use meshwork_tests::sidecar::Service;

    let mut mesh = Mesh::start().await?;
    let grpc_ip = mesh.ip(30);
    let app = meshwork_tests::apps::grpc_backend(&grpc_ip).await?;
    mesh.server_sidecar(
        &grpc_ip,
        Service {
            name: "streamer",
            id: "streamer-1",
            app,
            protocol: "grpc",
        },
    )
    .await?;
    mesh.versioned_instance((20, 0), ("api", "api-1", "v1"))
        .await?;
    mesh.versioned_instance((21, 0), ("admin", "admin-a", "v1"))
        .await?;
    let ip = mesh.ip(100);
    let api_key = "k-grpc";
    let digest = ring::digest::digest(&ring::digest::SHA256, api_key.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    mesh.gateway(
        &ip,
        "edge",
        &format!("[[gateway.api_keys]]\nname = \"partner\"\nsha256 = \"{hex}\"\n"),
    )
    .await?;
    for entry in [
        json!({"Kind": "service-router", "Name": "api", "Routes": [
            {"Match": {"HTTP": {"PathPrefix": "/admin"}},
             "Destination": {"Service": "admin", "PrefixRewrite": "/"}}]}),
        json!({"Kind": "ingress-gateway", "Name": "edge", "Listeners": [
            {"Port": 18100, "Protocol": "grpc", "Services": [{"Name": "streamer"}]},
            {"Port": 18101, "Protocol": "grpc", "APIKeys": {}, "Services": [{"Name": "streamer"}]},
            {"Port": 18102, "Protocol": "http", "Services": [{"Name": "api"}]}]}),
    ] {
        let (status, body) = put_entry(&mesh, &entry).await?;
        ensure!(status == 200, "{entry}: {status} {body}");
    }

    // gRPC: a server stream with its end-of-stream status, and a status
    // in the trailers after a message.
    let request = |name: &str| SubscribeRequest {
        topic: Some(subscribe_request::Topic::Service(ServiceTopic {
            name: name.to_owned(),
            passing_only: false,
        })),
        since_index: 0,
    };
    let indexes = wait_for(
        "gRPC through the gateway",
        Duration::from_secs(10),
        || async {
            let mut client = WatchClient::connect(format!("http://{ip}:18100"))
                .await
                .ok()?;
            let mut stream = client.subscribe(request("ok")).await.ok()?.into_inner();
            let mut indexes = Vec::new();
            for _ in 0..10 {
                match stream.message().await {
                    Ok(Some(e)) => indexes.push(e.index),
                    Ok(None) => break,
                    Err(_) => return None,
                }
            }
            Some(indexes)
        },
    )
    .await?;
    ensure!(indexes == vec![1, 2, 3], "{indexes:?}");
    let mut client = WatchClient::connect(format!("http://{ip}:18100")).await?;
    let mut stream = client.subscribe(request("fail")).await?.into_inner();
    ensure!(stream.message().await?.map(|e| e.index) == Some(1));
    match stream.message().await {
        Err(status) => ensure!(status.code() == tonic::Code::NotFound, "{status:?}"),
        Ok(m) => anyhow::bail!("expected NOT_FOUND in the trailers, got {m:?}"),
    }
    // The edge's refusal, as gRPC clients read it; the key lets it pass.
    let mut keyed = WatchClient::connect(format!("http://{ip}:18101")).await?;
    match keyed.subscribe(request("ok")).await {
        Err(status) => ensure!(status.code() == tonic::Code::Unauthenticated, "{status:?}"),
        Ok(_) => anyhow::bail!("a call without the API key passed"),
    }
    let mut with_key = tonic::Request::new(request("ok"));
    with_key
        .metadata_mut()
        .insert("x-api-key", api_key.parse()?);
    let mut stream = keyed.subscribe(with_key).await?.into_inner();
    ensure!(stream.message().await?.map(|e| e.index) == Some(1));

    // HTTP/2 with prior knowledge on an http listener, and the service's
    // router: /admin goes to admin, rewritten.
    let h2 = meshwork_tests::http::h2_client::<http_body_util::Empty<bytes::Bytes>>();
    let routed = wait_for(
        "the router through the gateway",
        Duration::from_secs(10),
        || async {
            let request = hyper::Request::get(format!("http://{ip}:18102/admin/users?x=1"))
                .body(http_body_util::Empty::new())
                .ok()?;
            let response = h2.request(request).await.ok()?;
            let version = response.version();
            let path = response
                .headers()
                .get("x-seen-path")?
                .to_str()
                .ok()?
                .to_owned();
            let seen_version = response
                .headers()
                .get("x-seen-version")?
                .to_str()
                .ok()?
                .to_owned();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .ok()?
                .to_bytes();
            let body = String::from_utf8_lossy(&body).into_owned();
            body.starts_with("admin-a")
                .then_some((version, path, seen_version))
        },
    )
    .await?;
    ensure!(
        routed.0 == hyper::Version::HTTP_2 && routed.1 == "/users?x=1",
        "{routed:?}"
    );
    ensure!(answered_by(&format!("{ip}:18102")).await.as_deref() == Some("api-1"));
    mesh.done();
    Ok(())
}
