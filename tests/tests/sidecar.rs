//! `meshwork-sidecar` as a real process next to a demo HTTP service, with a
//! real three-server registry: registration, a failing check, SIGTERM,
//! kill -9 (session expiry then removal), losing the registry leader, and
//! a bad config.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use meshwork_tests::apps::{grpc_health_backend, status_app};
use meshwork_tests::sidecar::{signal, spawn_sidecar, write_config};
use meshwork_tests::{Cluster, GRPC_PORT, HTTP_PORT, sidecar_bin};

/// A sidecar config listing every server, `first` first (the one it uses
/// until that fails).
fn sidecar_config(
    cluster: &Cluster,
    first: usize,
    ip: &str,
    app_port: u16,
    admin_port: u16,
) -> String {
    let n = cluster.servers.len();
    let addresses: Vec<String> = (0..n)
        .map(|k| &cluster.servers[(first + k) % n])
        .map(|s| format!("\"{}:{GRPC_PORT}\"", s.ip))
        .collect();
    format!(
        r#"
[registry]
addresses = [{}]

[service]
name = "web"
id = "web-1"
address = "{ip}"
port = {app_port}
tags = ["v1"]

[[service.checks]]
http = "http://{ip}:{app_port}/health"
interval = "500ms"
timeout = "1s"

[session]
node = "app-host-1"
ttl = "4s"
deregister_critical_after = "3s"

[admin]
listen = "{ip}:{admin_port}"
"#,
        addresses.join(", ")
    )
}

#[tokio::test]
async fn sidecar_registers_checks_survives_leader_loss_and_leaves() -> Result<()> {
    let mut cluster = Cluster::start(3, &[]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let ip = cluster.servers[0].ip.clone();
    // A demo service whose `/health` answers with the status in `code`.
    let code = Arc::new(AtomicU16::new(200));
    let app_port = status_app(&ip, Arc::clone(&code), |_| "ok".to_owned())
        .await?
        .port();
    let config = write_config(
        cluster.dir.path(),
        "web.toml",
        &sidecar_config(&cluster, leader, &ip, app_port, 29000),
    )?;
    let log = cluster.dir.path().join("sidecar.log");
    let mut sidecar = spawn_sidecar(&config, &log, None, None)?;
    let result = async {
        // Registered and, after its first check, passing on every server.
        for i in 0..3 {
            cluster
                .wait_instance_health(i, "web", &[("web-1", "passing")], Duration::from_secs(10))
                .await?;
        }
        let ready = cluster
            .http
            .get(format!("http://{ip}:29000/ready"))
            .send()
            .await?;
        assert_eq!(ready.status().as_u16(), 200);
        let status: serde_json::Value = cluster
            .http
            .get(format!("http://{ip}:29000/status"))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(status["registered"], true, "{status}");
        assert_eq!(status["checks"][0]["status"], "passing", "{status}");

        // Visible over DNS too.
        let dig = std::process::Command::new("dig")
            .arg(format!("@{}", cluster.servers[leader].ip))
            .args([
                "-p",
                "28600",
                "+time=3",
                "+tries=1",
                "+short",
                "web.service.mesh",
            ])
            .output()
            .context("run dig (install dnsutils: scripts/install-test-deps.sh)")?;
        let answer = String::from_utf8_lossy(&dig.stdout);
        assert_eq!(answer.trim(), ip, "dig web.service.mesh");

        // The registry loses the instance (say, an operator removed it):
        // the sidecar registers it again within a heartbeat or two (seen
        // as a new CreateIndex).
        let create_index = |cluster: &Cluster| {
            let url = format!("{}/v1/catalog/service/web", cluster.servers[leader].http());
            let http = cluster.http.clone();
            async move {
                let body: serde_json::Value = http.get(url).send().await.ok()?.json().await.ok()?;
                body[0]["CreateIndex"].as_u64()
            }
        };
        let before = create_index(&cluster)
            .await
            .context("web-1 has a CreateIndex")?;
        let resp = cluster
            .http
            .put(format!(
                "{}/v1/catalog/deregister",
                cluster.servers[leader].http()
            ))
            .json(&serde_json::json!({"Node": "app-host-1", "ServiceID": "web-1"}))
            .send()
            .await?;
        assert!(resp.status().is_success());
        let mut again = None;
        for _ in 0..200 {
            if let Some(index) = create_index(&cluster).await
                && index > before
            {
                again = Some(index);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        again.context("the sidecar did not register again within 10 s")?;
        cluster
            .wait_instance_health(
                leader,
                "web",
                &[("web-1", "passing")],
                Duration::from_secs(5),
            )
            .await?;

        // The app fails its health check: critical within an interval or so.
        code.store(500, Ordering::Relaxed);
        cluster
            .wait_instance_health(
                leader,
                "web",
                &[("web-1", "critical")],
                Duration::from_secs(3),
            )
            .await?;
        code.store(200, Ordering::Relaxed);
        cluster
            .wait_instance_health(
                leader,
                "web",
                &[("web-1", "passing")],
                Duration::from_secs(3),
            )
            .await?;

        // Kill the registry leader: the instance stays registered and
        // passing on the survivors. The new leader gives every session a
        // full TTL (4 s here) of grace from its takeover, so a sidecar
        // whose heartbeats no longer reached it would turn critical within
        // that: watched for twice the TTL after the new leader is known,
        // every answer must be there and passing (an error or an empty
        // answer fails; only while there is no leader may reads fail).
        cluster.servers[leader].kill().await?;
        let survivor = (leader + 1) % 3;
        cluster.wait_leader(Duration::from_secs(10)).await?;
        let until = Instant::now() + Duration::from_secs(9);
        for _ in 0..100 {
            if Instant::now() >= until {
                break;
            }
            let now = cluster.instance_health(survivor, "web").await?;
            assert_eq!(
                now,
                [("web-1".to_owned(), "passing".to_owned())],
                "after the leader change"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ensure!(
            Instant::now() >= until,
            "watched for less than twice the TTL"
        );
        // It streamed from the dead leader; it now talks to a survivor.
        let dead = format!("{}:{GRPC_PORT}", cluster.servers[leader].ip);
        let mut now_using = String::new();
        for _ in 0..100 {
            let status: serde_json::Value = cluster
                .http
                .get(format!("http://{ip}:29000/status"))
                .send()
                .await?
                .json()
                .await?;
            now_using = status["registry"].as_str().unwrap_or_default().to_owned();
            if !now_using.is_empty() && now_using != dead && status["last_error"].is_null() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_ne!(
            now_using, dead,
            "the sidecar moved to another registry server"
        );
        cluster
            .wait_instance_health(
                survivor,
                "web",
                &[("web-1", "passing")],
                Duration::from_secs(5),
            )
            .await?;

        // SIGTERM: deregistered at once.
        signal(&sidecar, "TERM")?;
        let exit = tokio::time::timeout(Duration::from_secs(10), sidecar.wait()).await??;
        assert!(exit.success(), "sidecar exit {exit:?}");
        cluster
            .wait_instance_health(survivor, "web", &[], Duration::from_secs(2))
            .await?;

        // kill -9: critical within the session TTL, gone after
        // deregister_critical_after.
        let mut again = spawn_sidecar(&config, &log, None, None)?;
        cluster
            .wait_instance_health(
                survivor,
                "web",
                &[("web-1", "passing")],
                Duration::from_secs(10),
            )
            .await?;
        signal(&again, "KILL")?;
        let _ = again.wait().await;
        cluster
            .wait_instance_health(
                survivor,
                "web",
                &[("web-1", "critical")],
                Duration::from_secs(10),
            )
            .await?;
        cluster
            .wait_instance_health(survivor, "web", &[], Duration::from_secs(10))
            .await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = &result {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        eprintln!("--- sidecar ---\n{tail}\n{}", cluster.logs());
        bail!("{e:#}");
    }
    cluster.done();
    Ok(())
}

#[tokio::test]
async fn a_bad_config_exits_64_naming_file_line_and_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(
        dir.path(),
        "bad.toml",
        "[registry]\naddresses = [\"127.0.0.1:8502\"]\n\n[service]\nname = \"web\"\nport = 80\nprot = 81\n",
    )?;
    let out = std::process::Command::new(sidecar_bin())
        .arg("--config")
        .arg(&config)
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml"), "{stderr}");
    assert!(stderr.contains("line 7"), "{stderr}");
    assert!(stderr.contains("prot"), "{stderr}");
    // --check-config says the same without starting anything, and passes a
    // good file (what to run before `systemctl reload`).
    let out = std::process::Command::new(sidecar_bin())
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 7"));
    let good = write_config(
        dir.path(),
        "good.toml",
        "[registry]\naddresses = [\"127.0.0.1:8502\"]\n\n[service]\nname = \"web\"\nport = 80\n",
    )?;
    let out = std::process::Command::new(sidecar_bin())
        .arg("--config")
        .arg(&good)
        .arg("--check-config")
        .output()?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("valid") && stdout.contains("web"),
        "{stdout}"
    );
    Ok(())
}

/// Reports the TTL check `app-ttl` as passing `times` times, 250 ms apart.
async fn keep_reporting(cluster: &Cluster, admin: &str, times: usize) -> Result<()> {
    for _ in 0..times {
        cluster
            .http
            .put(format!("{admin}/v1/agent/check/pass/app-ttl"))
            .send()
            .await?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// Waits (3 s at most) for `web-ttl` to be `status` while the TTL check
/// keeps being reported, so a stall of the test cannot let the TTL lapse.
async fn seen_while_reporting(cluster: &Cluster, admin: &str, status: &str) -> Result<()> {
    let want = [("web-ttl", status)];
    let (reported, seen) = tokio::join!(
        keep_reporting(cluster, admin, 12),
        cluster.wait_instance_health(0, "web", &want, Duration::from_secs(3))
    );
    reported?;
    seen
}

#[tokio::test]
async fn ttl_checks_via_the_admin_api_and_grpc_health_checks() -> Result<()> {
    let cluster = Cluster::start(1, &[]).await?;
    cluster.wait_leader(Duration::from_secs(10)).await?;
    let ip = cluster.servers[0].ip.clone();
    let (grpc_port, serving) = grpc_health_backend(&ip).await?;
    let config = format!(
        r#"
[registry]
addresses = ["{ip}:{GRPC_PORT}"]

[service]
name = "web"
id = "web-ttl"
port = 8080

[[service.checks]]
grpc = "{ip}:{grpc_port}"
interval = "300ms"

[[service.checks]]
id = "app-ttl"
ttl = "1s"

[session]
node = "app-host-ttl"

[admin]
listen = "{ip}:29001"
"#
    );
    let config = write_config(cluster.dir.path(), "ttl.toml", &config)?;
    let log = cluster.dir.path().join("sidecar-ttl.log");
    let mut sidecar = spawn_sidecar(&config, &log, None, None)?;
    let admin = format!("http://{ip}:29001");
    let result = async {
        // The TTL check has had no report yet: critical.
        cluster
            .wait_instance_health(
                0,
                "web",
                &[("web-ttl", "critical")],
                Duration::from_secs(10),
            )
            .await?;
        let pass = cluster
            .http
            .put(format!("{admin}/v1/agent/check/pass/app-ttl?note=fine"))
            .send()
            .await?;
        assert_eq!(pass.status().as_u16(), 200);
        cluster
            .wait_instance_health(0, "web", &[("web-ttl", "passing")], Duration::from_secs(3))
            .await?;
        // No report within the TTL: critical again.
        cluster
            .wait_instance_health(0, "web", &[("web-ttl", "critical")], Duration::from_secs(4))
            .await?;
        // Reports keep it passing; then the gRPC service stops serving.
        seen_while_reporting(&cluster, &admin, "passing").await?;
        serving.store(false, Ordering::Relaxed);
        seen_while_reporting(&cluster, &admin, "critical").await?;
        let unknown = cluster
            .http
            .put(format!("{admin}/v1/agent/check/pass/no-such-check"))
            .send()
            .await?;
        assert_eq!(unknown.status().as_u16(), 404);
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = &result {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        eprintln!("--- sidecar ---\n{tail}\n{}", cluster.logs());
        bail!("{e:#}");
    }
    signal(&sidecar, "TERM")?;
    let _ = tokio::time::timeout(Duration::from_secs(10), sidecar.wait()).await;
    cluster.done();
    Ok(())
}

#[tokio::test]
async fn a_registry_address_that_is_the_rest_port_is_named_as_such() -> Result<()> {
    let cluster = Cluster::start_in_process(1, &[]).await?;
    let ip = cluster.servers[0].ip.clone();
    // The REST port where the gRPC port belongs: the most common slip.
    let config = format!(
        "[registry]\naddresses = [\"{ip}:{HTTP_PORT}\"]\n[service]\nname = \"web\"\nport = 8080\n\
         [admin]\nlisten = \"{ip}:29011\"\n"
    );
    let config = write_config(cluster.dir.path(), "rest-port.toml", &config)?;
    let log = cluster.dir.path().join("sidecar-rest-port.log");
    let mut sidecar = spawn_sidecar(&config, &log, None, None)?;
    let said = meshwork_tests::wait_for(
        "the sidecar to say the address is a REST port",
        Duration::from_secs(15),
        || async {
            let text = std::fs::read_to_string(&log).ok()?;
            text.contains(
                "answers HTTP/1.1, not gRPC: registry.addresses lists the registry's gRPC ports",
            )
            .then_some(())
        },
    )
    .await;
    let _ = sidecar.kill().await;
    said?;
    cluster.done();
    Ok(())
}
