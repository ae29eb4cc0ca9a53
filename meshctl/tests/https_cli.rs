//! `meshctl` over HTTPS as an operator runs it, against a tiny HTTPS
//! server in the test (tokio-rustls, a hand-written HTTP/1.1 answer) with
//! certificates from `meshctl tls`: the leader printed with the right CA,
//! one clear line and the right exit code otherwise, and never a key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every variable meshctl reads for its address, TLS and token.
const VARS: &[&str] = &[
    "MESHWORK_HTTP_ADDR",
    "CONSUL_HTTP_ADDR",
    "MESHWORK_HTTP_SSL",
    "CONSUL_HTTP_SSL",
    "MESHWORK_CACERT",
    "CONSUL_CACERT",
    "MESHWORK_CLIENT_CERT",
    "CONSUL_CLIENT_CERT",
    "MESHWORK_CLIENT_KEY",
    "CONSUL_CLIENT_KEY",
    "MESHWORK_TLS_SERVER_NAME",
    "CONSUL_TLS_SERVER_NAME",
    "MESHWORK_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN",
];

fn meshctl(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    command.args(["--timeout", "20s"]).args(args);
    for name in VARS {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    command.output().expect("meshctl runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The exit code and the one line on standard error of a failed run.
fn failed(output: &Output) -> (Option<i32>, String) {
    let stderr = text(&output.stderr);
    assert!(output.stdout.is_empty(), "{}", text(&output.stdout));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("meshctl: "), "{stderr}");
    assert_nothing_secret(output);
    (output.status.code(), stderr)
}

fn assert_nothing_secret(output: &Output) {
    for stream in [&output.stdout, &output.stderr] {
        let stream = text(stream);
        assert!(!stream.contains("PRIVATE KEY"), "{stream}");
        assert!(!stream.contains("-----BEGIN"), "{stream}");
    }
}

fn assert_leader(output: &Output) {
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "127.0.0.1:8300\n");
    assert!(output.stderr.is_empty(), "{}", text(&output.stderr));
    assert_nothing_secret(output);
}

/// A CA and a server and a client certificate from `meshctl tls`.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_str().expect("UTF-8 temp dir").to_owned();
        for args in [
            &["tls", "ca", "create", "--dir", &path][..],
            &["tls", "cert", "create", "--server", "--dir", &path],
            &["tls", "cert", "create", "--client", "--dir", &path],
        ] {
            let output = meshctl(args, &[]);
            assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
        }
        let file = |name: &str| dir.path().join(name);
        Self {
            ca: file("meshwork-agent-ca.pem"),
            server_cert: file("dc1-server-meshwork-0.pem"),
            server_key: file("dc1-server-meshwork-0-key.pem"),
            client_cert: file("dc1-client-meshwork-0.pem"),
            client_key: file("dc1-client-meshwork-0-key.pem"),
            _dir: dir,
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[allow(deprecated)] // ring: no aws-lc build (as meshctl itself).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: `pki`'s server certificate; with `clients_from`, a
/// client certificate from that CA is required.
fn server_config(pki: &Pki, clients_from: Option<&Path>) -> Arc<rustls::ServerConfig> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.server_cert)
        .expect("open cert")
        .collect::<Result<_, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(&pki.server_key).expect("key");
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match clients_from {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).expect("open CA") {
                roots.add(cert.expect("CA cert")).expect("add CA");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).expect("server cert");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Runs `serve` on each connection of a loopback listener, in a thread
/// of its own; returns the listener's address.
fn listen<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(stream));
            }
        });
    });
    addr
}

/// Reads one request's head; answers the leader, or 404.
async fn answer<S>(stream: &mut S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let (status, body) = if head.starts_with(b"GET /v1/status/leader ") {
        ("200 OK", "\"127.0.0.1:8300\"")
    } else {
        ("404 Not Found", "no such path")
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// An HTTPS server answering `GET /v1/status/leader`; plain HTTP is told
/// it reached an HTTPS port, as the registry (and Go's servers) do.
fn https_server(config: Arc<rustls::ServerConfig>) -> SocketAddr {
    listen(move |mut tcp| {
        let config = Arc::clone(&config);
        async move {
            let mut first = [0u8; 1];
            if tcp.peek(&mut first).await.is_ok() && first[0].is_ascii_uppercase() {
                let _ = tcp
                    .write_all(
                        b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
                          Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n",
                    )
                    .await;
                let _ = tcp.shutdown().await;
                return;
            }
            if let Ok(mut tls) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
                answer(&mut tls).await;
            }
        }
    })
}

/// A plain HTTP server; what is not HTTP (a TLS handshake) is answered
/// 400, as hyper does.
fn http_server() -> SocketAddr {
    listen(|mut tcp| async move {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await.is_ok() && !first[0].is_ascii_uppercase() {
            let _ = tcp
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
            let _ = tcp.shutdown().await;
            return;
        }
        answer(&mut tcp).await
    })
}

#[test]
fn the_leader_over_https_with_the_registry_ca() {
    let pki = Pki::new();
    let addr = https_server(server_config(&pki, None));
    let port = addr.port();
    let ca = path(&pki.ca);
    // The IP SAN and the DNS name localhost, each checked by default.
    for url in [
        format!("https://127.0.0.1:{port}"),
        format!("https://localhost:{port}/"),
    ] {
        assert_leader(&meshctl(
            &["--http-addr", &url, "--ca-file", ca, "leader"],
            &[],
        ));
    }
    let json = meshctl(
        &[
            "leader",
            "--json",
            "--http-addr",
            &format!("https://127.0.0.1:{port}"),
            "--ca-file",
            ca,
        ],
        &[],
    );
    assert_eq!(json.status.code(), Some(0), "{}", text(&json.stderr));
    assert!(text(&json.stdout).contains("\"Leader\": \"127.0.0.1:8300\""));

    // The server name the registry's certificates carry, checked on an IP.
    assert_leader(&meshctl(
        &[
            "--http-addr",
            &format!("https://127.0.0.1:{port}"),
            "--ca-file",
            ca,
            "--tls-server-name",
            "server.dc1.meshwork",
            "leader",
        ],
        &[],
    ));

    // The environment, as Consul's CLI reads it.
    let host_port = format!("127.0.0.1:{port}");
    let https_url = format!("https://{host_port}");
    for env in [
        &[
            ("MESHWORK_HTTP_ADDR", https_url.as_str()),
            ("MESHWORK_CACERT", ca),
        ][..],
        &[
            ("CONSUL_HTTP_ADDR", https_url.as_str()),
            ("CONSUL_CACERT", ca),
        ],
        &[
            ("MESHWORK_HTTP_ADDR", host_port.as_str()),
            ("MESHWORK_HTTP_SSL", "true"),
            ("MESHWORK_CACERT", ca),
        ],
        &[
            ("CONSUL_HTTP_ADDR", host_port.as_str()),
            ("CONSUL_HTTP_SSL", "true"),
            ("CONSUL_CACERT", ca),
            ("CONSUL_TLS_SERVER_NAME", "localhost"),
        ],
        // MESHWORK_ wins over a wrong CONSUL_ setting.
        &[
            ("MESHWORK_HTTP_ADDR", https_url.as_str()),
            ("CONSUL_HTTP_ADDR", "127.0.0.1:1"),
            ("MESHWORK_CACERT", ca),
            ("CONSUL_CACERT", "/no/such/ca.pem"),
        ],
    ] {
        assert_leader(&meshctl(&["leader"], env));
    }
}

#[test]
fn https_without_a_ca_file_is_refused_with_a_clear_line() {
    let pki = Pki::new();
    let addr = https_server(server_config(&pki, None));
    let url = format!("https://{addr}");
    for (args, env) in [
        (&["--http-addr", url.as_str(), "leader"][..], &[][..]),
        (&["leader"], &[("CONSUL_HTTP_ADDR", url.as_str())]),
        // An empty flag unsets the variable.
        (
            &["--http-addr", url.as_str(), "--ca-file", "", "leader"],
            &[("MESHWORK_CACERT", path(&pki.ca))],
        ),
    ] {
        let (code, stderr) = failed(&meshctl(args, env));
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("HTTPS to {addr} needs")),
            "{stderr}"
        );
        assert!(stderr.contains("pass --ca-file FILE"), "{stderr}");
    }
    let (code, stderr) = failed(&meshctl(
        &[
            "--http-addr",
            &url,
            "--ca-file",
            "/no/such/ca.pem",
            "leader",
        ],
        &[],
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("/no/such/ca.pem"), "{stderr}");
    // A key given as the CA: refused, and not shown.
    let (code, stderr) = failed(&meshctl(
        &[
            "--http-addr",
            &url,
            "--ca-file",
            path(&pki.server_key),
            "leader",
        ],
        &[],
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("holds no certificate"), "{stderr}");
}

#[test]
fn a_registry_certificate_from_another_ca_fails_the_handshake() {
    let pki = Pki::new();
    let other = Pki::new();
    let addr = https_server(server_config(&pki, None));
    let output = meshctl(
        &[
            "--http-addr",
            &format!("https://{addr}"),
            "--ca-file",
            path(&other.ca),
            "leader",
        ],
        &[],
    );
    let (code, stderr) = failed(&output);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "meshctl: TLS handshake with {addr} failed: invalid peer certificate: UnknownIssuer \
             (is --ca-file the registry's CA?)\n"
        )
    );

    // The right CA but a name the certificate does not carry.
    let output = meshctl(
        &[
            "--http-addr",
            &format!("https://{addr}"),
            "--ca-file",
            path(&pki.ca),
            "--tls-server-name",
            "server.dc2.meshwork",
            "leader",
        ],
        &[],
    );
    let (code, stderr) = failed(&output);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("certificate not valid for name \"server.dc2.meshwork\""),
        "{stderr}"
    );
    assert!(stderr.contains("--tls-server-name"), "{stderr}");
}

#[test]
fn plain_http_to_the_https_port_shows_the_answer_and_says_https() {
    let pki = Pki::new();
    let addr = https_server(server_config(&pki, None));
    for addr_arg in [format!("http://{addr}"), addr.to_string()] {
        let (code, stderr) = failed(&meshctl(&["--http-addr", &addr_arg, "leader"], &[]));
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.contains("Client sent an HTTP request to an HTTPS server."),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("use --http-addr https://{addr}")),
            "{stderr}"
        );
    }
}

#[test]
fn https_to_a_plain_port_or_to_nothing() {
    let pki = Pki::new();
    let plain = http_server();
    let (code, stderr) = failed(&meshctl(
        &[
            "--http-addr",
            &format!("https://{plain}"),
            "--ca-file",
            path(&pki.ca),
            "leader",
        ],
        &[],
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("TLS handshake with {plain} failed")),
        "{stderr}"
    );
    assert!(stderr.contains("http://"), "{stderr}");
    // The plain server does answer plain HTTP.
    assert_leader(&meshctl(
        &["--http-addr", &format!("http://{plain}"), "leader"],
        &[],
    ));

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let (code, stderr) = failed(&meshctl(
        &[
            "--http-addr",
            &format!("https://{closed}"),
            "--ca-file",
            path(&pki.ca),
            "leader",
        ],
        &[],
    ));
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("cannot reach the registry"), "{stderr}");
}

#[test]
fn a_registry_that_verifies_clients_takes_a_client_certificate_from_its_ca() {
    let pki = Pki::new();
    let other = Pki::new();
    let addr = https_server(server_config(&pki, Some(&pki.ca)));
    let url = format!("https://{addr}");
    let ca = path(&pki.ca);
    assert_leader(&meshctl(
        &[
            "--http-addr",
            &url,
            "--ca-file",
            ca,
            "--client-cert",
            path(&pki.client_cert),
            "--client-key",
            path(&pki.client_key),
            "leader",
        ],
        &[],
    ));
    for prefix in ["MESHWORK", "CONSUL"] {
        let cert = format!("{prefix}_CLIENT_CERT");
        let key = format!("{prefix}_CLIENT_KEY");
        assert_leader(&meshctl(
            &["--http-addr", &url, "--ca-file", ca, "leader"],
            &[
                (cert.as_str(), path(&pki.client_cert)),
                (key.as_str(), path(&pki.client_key)),
            ],
        ));
    }

    // No client certificate.
    let (code, stderr) = failed(&meshctl(
        &["--http-addr", &url, "--ca-file", ca, "leader"],
        &[],
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("TLS handshake with {addr} failed")),
        "{stderr}"
    );
    assert!(
        stderr.contains("pass --client-cert and --client-key"),
        "{stderr}"
    );

    // One from another CA.
    let (code, stderr) = failed(&meshctl(
        &[
            "--http-addr",
            &url,
            "--ca-file",
            ca,
            "--client-cert",
            path(&other.client_cert),
            "--client-key",
            path(&other.client_key),
            "leader",
        ],
        &[],
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("refused the client certificate"),
        "{stderr}"
    );

    // A certificate without its key, and a key that is not its own.
    let (code, stderr) = failed(&meshctl(
        &[
            "--http-addr",
            &url,
            "--ca-file",
            ca,
            "--client-cert",
            path(&pki.client_cert),
            "leader",
        ],
        &[],
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--client-key"), "{stderr}");
    let (code, stderr) = failed(&meshctl(
        &[
            "--http-addr",
            &url,
            "--ca-file",
            ca,
            "--client-cert",
            path(&pki.client_cert),
            "--client-key",
            path(&other.client_key),
            "leader",
        ],
        &[],
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("do not go together"), "{stderr}");
}

#[test]
fn help_describes_https() {
    let output = meshctl(&["--help"], &[]);
    assert_eq!(output.status.code(), Some(0));
    let help = text(&output.stdout);
    for want in [
        "https://HOST:PORT",
        "--ca-file",
        "--client-cert",
        "--client-key",
        "--tls-server-name",
        "MESHWORK_CACERT",
        "CONSUL_CACERT",
        "MESHWORK_HTTP_SSL",
    ] {
        assert!(help.contains(want), "{want}\n{help}");
    }
}
