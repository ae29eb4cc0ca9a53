//! TLS on a real server with certificates from `meshctl tls`: HTTPS with
//! and without a client certificate under `verify_incoming`, garbage and
//! plain HTTP on the TLS port, a bad certificate refused at start with a
//! clear reason, and certificates reloaded on SIGHUP without dropping an
//! open connection.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshwork_tests::{Cluster, meshctl_tls, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `curl` over HTTPS: its exit code and body.
fn curl(url: &str, extra: &[&str]) -> Result<(i32, String)> {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .args(extra)
        .arg(url)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_client_certificates_garbage_and_reload() -> Result<()> {
    let certs = tempfile::tempdir()?;
    let dir = certs.path();
    meshctl_tls(dir, &["ca", "create"])?;
    meshctl_tls(dir, &["cert", "create", "--server"])?;
    meshctl_tls(dir, &["cert", "create", "--client"])?;
    // The server reads its certificate from files a reload replaces.
    std::fs::copy(
        dir.join("dc1-server-meshwork-0.pem"),
        dir.join("server.pem"),
    )?;
    std::fs::copy(
        dir.join("dc1-server-meshwork-0-key.pem"),
        dir.join("server-key.pem"),
    )?;
    std::fs::copy(dir.join("meshwork-agent-ca.pem"), dir.join("ca.pem"))?;
    let flags = [
        "--tls-ca".to_owned(),
        path(dir, "ca.pem"),
        "--tls-cert".to_owned(),
        path(dir, "server.pem"),
        "--tls-key".to_owned(),
        path(dir, "server-key.pem"),
        "--tls-verify-incoming".to_owned(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cluster = Cluster::start(1, &flags).await?;
    let ip = cluster.servers[0].ip.clone();
    let url = format!("https://{ip}:8501/v1/status/leader");
    // The server certificate names 127.0.0.1, not this loopback address:
    // curl is told the name with --resolve.
    let resolve = format!("localhost:8501:{ip}");
    let local = "https://localhost:8501/v1/status/leader";
    let ca = path(dir, "meshwork-agent-ca.pem");

    // verify_incoming: no client certificate, no answer; with one, the
    // answer.
    let (code, _) = curl(local, &["--resolve", &resolve, "--cacert", &ca])?;
    ensure!(code != 0, "a client without a certificate was served");
    let client = [
        "--resolve",
        &resolve,
        "--cacert",
        &ca,
        "--cert",
        &path(dir, "dc1-client-meshwork-0.pem"),
        "--key",
        &path(dir, "dc1-client-meshwork-0-key.pem"),
    ];
    let (code, body) = curl(local, &client)?;
    ensure!(
        code == 0 && body.contains(":28300"),
        "with a client certificate: {code} {body}"
    );

    // A client certificate from another CA is refused like none.
    let other = tempfile::tempdir()?;
    meshctl_tls(other.path(), &["ca", "create"])?;
    meshctl_tls(other.path(), &["cert", "create", "--client"])?;
    let (code, _) = curl(
        local,
        &[
            "--resolve",
            &resolve,
            "--cacert",
            &ca,
            "--cert",
            &path(other.path(), "dc1-client-meshwork-0.pem"),
            "--key",
            &path(other.path(), "dc1-client-meshwork-0-key.pem"),
        ],
    )?;
    ensure!(
        code != 0,
        "a client certificate from another CA was accepted"
    );
    // Garbage, then plain HTTP, on the TLS port: refused, and the server
    // goes on serving.
    let mut garbage = tokio::net::TcpStream::connect((ip.as_str(), 8501)).await?;
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7])
        .await?;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut sink)).await;
    let plain = cluster
        .http
        .get(format!("http://{ip}:8501/v1/status/leader"))
        .send()
        .await?;
    ensure!(plain.status().as_u16() == 400);
    let _ = url;

    // An open HTTPS connection (a blocking query parked on it) outlives a
    // reload to a certificate from a new CA; new connections get the new
    // certificate at once.
    let parked = tokio::spawn({
        let client = client.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        async move {
            tokio::task::spawn_blocking(move || {
                let refs: Vec<&str> = client.iter().map(String::as_str).collect();
                let mut args = vec!["--max-time", "20"];
                args.extend(refs);
                curl(
                    "https://localhost:8501/v1/kv/parked?index=1000000&wait=3s",
                    &args,
                )
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let next = tempfile::tempdir()?;
    meshctl_tls(next.path(), &["ca", "create"])?;
    meshctl_tls(next.path(), &["cert", "create", "--server"])?;
    meshctl_tls(next.path(), &["cert", "create", "--client"])?;
    // The new CA, and the old one too (clients still holding old client
    // certificates keep working while they are replaced).
    let both = std::fs::read_to_string(next.path().join("meshwork-agent-ca.pem"))?
        + &std::fs::read_to_string(dir.join("meshwork-agent-ca.pem"))?;
    std::fs::write(dir.join("ca.pem"), both)?;
    std::fs::copy(
        next.path().join("dc1-server-meshwork-0.pem"),
        dir.join("server.pem"),
    )?;
    std::fs::copy(
        next.path().join("dc1-server-meshwork-0-key.pem"),
        dir.join("server-key.pem"),
    )?;
    let pid = cluster.servers[0].pid().context("server pid")?;
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    ensure!(status.success());
    let new_ca = path(next.path(), "meshwork-agent-ca.pem");
    wait_for(
        "the new certificate served",
        Duration::from_secs(5),
        || async {
            let mut args = client.to_vec();
            args[3] = new_ca.as_str();
            let (code, _) = curl(local, &args).ok()?;
            (code == 0).then_some(())
        },
    )
    .await?;
    let (code, _) = curl(local, &client)?;
    ensure!(
        code == 60,
        "the old CA still verifies the new certificate: {code}"
    );
    let (code, body) = parked.await???;
    ensure!(
        code == 0,
        "the parked request was dropped by the reload: {code} {body}"
    );
    ensure!(
        cluster.servers[0]
            .log_tail(50)
            .contains("TLS certificate, key and CA reloaded"),
        "{}",
        cluster.servers[0].log_tail(50)
    );
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_stops_the_start_with_its_reason() -> Result<()> {
    let a = tempfile::tempdir()?;
    let b = tempfile::tempdir()?;
    meshctl_tls(a.path(), &["ca", "create"])?;
    meshctl_tls(b.path(), &["ca", "create"])?;
    meshctl_tls(b.path(), &["cert", "create", "--server"])?;
    let data = tempfile::tempdir()?;
    let out = Command::new(meshwork_tests::registry_bin())
        .args(["--dev", "--data-dir"])
        .arg(data.path())
        .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .args(["--raft-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0"])
        .args([
            "--https-addr",
            "127.0.0.1:0",
            "--grpc-tls-addr",
            "127.0.0.1:0",
        ])
        .arg("--tls-ca")
        .arg(a.path().join("meshwork-agent-ca.pem"))
        .arg("--tls-cert")
        .arg(b.path().join("dc1-server-meshwork-0.pem"))
        .arg("--tls-key")
        .arg(b.path().join("dc1-server-meshwork-0-key.pem"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "started with a foreign certificate");
    ensure!(
        stderr.contains("is not a valid certificate from the CA"),
        "{stderr}"
    );
    // Half the files: a configuration error (exit 2).
    let out = Command::new(meshwork_tests::registry_bin())
        .args(["--check-config", "--tls-ca"])
        .arg(a.path().join("meshwork-agent-ca.pem"))
        .output()?;
    ensure!(out.status.code() == Some(2), "{out:?}");
    ensure!(
        String::from_utf8_lossy(&out.stderr)
            .contains("give the CA, the certificate and the key together"),
        "{out:?}"
    );
    Ok(())
}
