//! The sidecar's config reload (SIGHUP) end to end: upstreams changed,
//! added, moved and removed under load without a failed request, refused
//! reloads that change nothing, and new tags, checks and service id
//! registered without a gap (every state on the registry's watch stream).
//! Through
//! real `meshwork-registry` and `meshwork-sidecar` processes and demo
//! backends (hyper and tonic servers). Traffic goes app → client sidecar
//! (outbound listener) → server sidecar (inbound listener) → backend, as in
//! production.
//!
//! Every address is on the cluster's own `127.x.y.0/24`; every loop is
//! bounded in count and time. The harness (the mesh, its sidecars, the demo
//! backends and the clients) is in `meshwork_tests::{sidecar, apps, http}`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use meshwork_proto::v1::watch_client::WatchClient;
use meshwork_proto::v1::watch_event::Kind;
use meshwork_proto::v1::{
    Change, Health, ServiceTopic, SubscribeRequest, WatchEvent, change, subscribe_request,
};
use meshwork_tests::apps::http_backend;
use meshwork_tests::http::{Load, body_of, http_client};
use meshwork_tests::sidecar::{
    ADMIN_PORT, Mesh, Service, UPSTREAM_PORT, echo_behind_client, echo_instances,
};
use meshwork_tests::{wait_for, watch};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn a_reload_changes_upstreams_without_failing_a_request() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (_, client_ip, c) =
        echo_behind_client(&mut mesh, 2, "name = \"echo\"\nprotocol = \"http\"").await?;
    // A second service, not yet an upstream of the client.
    let other_ip = mesh.ip(30);
    let (other_app, _) = http_backend(&other_ip, "other-0").await?;
    mesh.server_sidecar(
        &other_ip,
        Service {
            name: "other",
            id: "other-0",
            app: other_app,
            protocol: "http",
        },
    )
    .await?;
    let path = mesh.sidecars[c].config.clone();
    let original = std::fs::read_to_string(&path)?;
    let echo_url = format!("http://{client_ip}:{UPSTREAM_PORT}/");
    let other_port = UPSTREAM_PORT + 1;
    let other_url = format!("http://{client_ip}:{other_port}/");
    let http = http_client()?;
    ensure!(
        TcpStream::connect(format!("{client_ip}:{other_port}"))
            .await
            .is_err(),
        "no listener for `other` yet"
    );
    let requests = |clusters: &serde_json::Value| -> u64 {
        clusters["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"] == "echo")
            .flat_map(|c| c["endpoints"].as_array().into_iter().flatten())
            .filter_map(|e| e["requests"].as_u64())
            .sum()
    };

    // Under load: the echo upstream's settings change in place and a new
    // upstream appears.
    let load = Load::start(&echo_url, false);
    wait_for("load flowing", Duration::from_secs(10), || async {
        (load.ok() > 50).then_some(())
    })
    .await?;
    let counted_before = requests(&mesh.sidecars[c].json("/clusters").await?);
    // A keep-alive connection opened before the reload (see below).
    let kept = http_client()?;
    ensure!(body_of(&kept, &echo_url).await?.starts_with("echo-"));
    let changed = original
        .replace(
            "name = \"echo\"\nprotocol = \"http\"",
            "name = \"echo\"\nprotocol = \"http\"\nbalance = \"random\"\nrequest_timeout = \"7s\"",
        )
        .replace("access_log = true", "access_log = false")
        + &format!(
            "\n[[upstreams]]\nname = \"other\"\nlisten = \"{client_ip}:{other_port}\"\nprotocol = \"http\"\n"
        );
    let status = mesh.reload(c, &changed).await?;
    ensure!(
        status["reloads"] == 1 && status["last_reload_error"].is_null(),
        "{status}"
    );
    wait_for(
        "`other` through its new listener",
        Duration::from_secs(10),
        || async {
            body_of(&http, &other_url)
                .await
                .ok()
                .filter(|b| b.starts_with("other-0"))
        },
    )
    .await?;
    let config = mesh.sidecars[c].json("/config").await?;
    let echo = config["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|u| u["upstream"]["name"] == "echo")
        .context("echo in /config")?;
    ensure!(
        echo["upstream"]["balance"] == "random" && echo["upstream"]["request_timeout"] == 7000,
        "{echo}"
    );
    // The same cluster carried on: its per-endpoint counters were kept.
    let counted_after = requests(&mesh.sidecars[c].json("/clusters").await?);
    ensure!(
        counted_after > counted_before,
        "endpoint counters kept across the reload: {counted_before} -> {counted_after}"
    );
    let seen = load.ok();
    wait_for("load after the reload", Duration::from_secs(10), || async {
        (load.ok() > seen + 50).then_some(())
    })
    .await?;
    let (ok, failures) = load.stop().await?;
    ensure!(
        failures == 0,
        "{failures} of {} requests failed",
        ok + failures
    );
    // The keep-alive connection opened before that reload (which changed
    // its route's access log) still serves echo ...
    ensure!(body_of(&kept, &echo_url).await?.starts_with("echo-"));

    // The echo upstream goes; `other` moves to its port (a replaced route).
    let moved = format!(
        "{}\n[[upstreams]]\nname = \"other\"\nlisten = \"{client_ip}:{UPSTREAM_PORT}\"\nprotocol = \"http\"\n",
        original
            .split("[[upstreams]]")
            .next()
            .context("config head")?
    );
    let status = mesh.reload(c, &moved).await?;
    ensure!(status["reloads"] == 2, "{status}");
    // ... is closed once idle and reopens onto the new route.
    wait_for(
        "the old keep-alive connection moved to the new route",
        Duration::from_secs(10),
        || async {
            body_of(&kept, &echo_url)
                .await
                .ok()
                .filter(|b| b.starts_with("other-0"))
        },
    )
    .await?;
    let fresh = http_client()?;
    ensure!(
        body_of(&fresh, &echo_url).await?.starts_with("other-0"),
        "port {UPSTREAM_PORT} now serves `other`"
    );
    wait_for(
        "the removed listener closed",
        Duration::from_secs(10),
        || async {
            TcpStream::connect(format!("{client_ip}:{other_port}"))
                .await
                .is_err()
                .then_some(())
        },
    )
    .await?;

    // Refused reloads change nothing: a bad file, a port already taken,
    // a new admin address.
    let bad = moved.replace("protocol = \"http\"\n", "protocol = \"http\"\nbogus = 1\n");
    let status = mesh.reload(c, &bad).await?;
    let error = status["last_reload_error"].as_str().unwrap_or_default();
    ensure!(
        status["reload_failures"] == 1 && error.contains("client.toml") && error.contains("bogus"),
        "{status}"
    );
    let taken = TcpListener::bind(format!("{client_ip}:0")).await?;
    let taken_addr = taken.local_addr()?;
    let clash = format!(
        "{moved}\n[[upstreams]]\nname = \"echo\"\nlisten = \"{taken_addr}\"\nprotocol = \"http\"\n"
    );
    let status = mesh.reload(c, &clash).await?;
    let error = status["last_reload_error"].as_str().unwrap_or_default();
    ensure!(
        status["reload_failures"] == 2 && error.contains(&taken_addr.to_string()),
        "{status}"
    );
    let admin_moved = moved.replace(
        &format!("{client_ip}:{ADMIN_PORT}"),
        &format!("{client_ip}:{}", ADMIN_PORT + 1),
    );
    let status = mesh.reload(c, &admin_moved).await?;
    let error = status["last_reload_error"].as_str().unwrap_or_default();
    ensure!(
        status["reload_failures"] == 3 && error.contains("admin.listen"),
        "{status}"
    );
    ensure!(
        body_of(&fresh, &echo_url).await?.starts_with("other-0"),
        "still serving after refused reloads"
    );
    let upstreams = mesh.sidecars[c].json("/config").await?["upstreams"]
        .as_array()
        .map(Vec::len);
    ensure!(upstreams == Some(1), "{upstreams:?}");
    let metrics = mesh.sidecars[c].metrics().await?;
    ensure!(
        metrics.contains("meshwork_sidecar_config_reloads_total{result=\"ok\"} 2")
            && metrics.contains("meshwork_sidecar_config_reloads_total{result=\"error\"} 3"),
        "{metrics}"
    );
    drop(taken);
    mesh.done();
    Ok(())
}

#[tokio::test]
async fn a_reload_registers_new_tags_checks_and_id_without_a_gap() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let instances = echo_instances(&mut mesh, 1, "http").await?;
    let (app, _, s) = &instances[0];
    let catalog = || async {
        let list = mesh
            .cluster()
            .get_json(0, "/v1/health/service/echo")
            .await?;
        list.as_array().cloned()
    };
    let original = std::fs::read_to_string(&mesh.sidecars[*s].config)?;
    // New tags and a TCP check on the app.
    let port_line = format!("port = {}", app.port());
    let tagged = original.replace(
        &port_line,
        &format!(
            "{port_line}\ntags = [\"v2\"]\n\n[[service.checks]]\ntcp = \"{app}\"\ninterval = \"1s\""
        ),
    );
    ensure!(tagged != original, "the config was edited");
    let status = mesh.reload(*s, &tagged).await?;
    ensure!(status["reloads"] == 1, "{status}");
    wait_for(
        "new tags and check in the registry",
        Duration::from_secs(10),
        || async {
            let list = catalog().await?;
            let entry = list.first()?;
            let tags = entry["Service"]["Tags"].as_array()?;
            let checks = entry["Checks"].as_array()?;
            let service_checks: Vec<_> = checks
                .iter()
                .filter(|c| c["ServiceID"] == "echo-0")
                .collect();
            let passing = service_checks.len() == 1 && service_checks[0]["Status"] == "passing";
            (list.len() == 1 && tags.iter().any(|t| t == "v2") && passing).then_some(())
        },
    )
    .await?;
    ensure!(
        mesh.sidecars[*s]
            .http
            .get(mesh.sidecars[*s].admin("/ready"))
            .send()
            .await?
            .status()
            == 200,
        "ready throughout"
    );
    // A new service id: the new one is registered, then the old one goes.
    // Every state the registry passes through is on a watch of `echo`
    // (one CHANGE per Raft index): after each one a passing instance is
    // there (the check, renamed with the service id as default check ids
    // are, keeps its status), and the sidecar stays ready.
    let mut watch = watch_service(&mesh, "echo").await?;
    let mut instances = watch.snapshot().await?;
    ensure!(
        instances.get(&format!("node-{}/echo-0", mesh.ip(20))) == Some(&(Health::Passing as i32)),
        "echo-0 passing before the rename: {instances:?}"
    );
    let renamed = tagged.replace("id = \"echo-0\"", "id = \"echo-0b\"");
    let status = mesh.reload(*s, &renamed).await?;
    ensure!(status["reloads"] == 2, "{status}");
    let sidecar = &mesh.sidecars[*s];
    let mut states = Vec::new();
    for _ in 0..50 {
        let index = watch.apply_next_change(&mut instances).await?;
        let ready = sidecar
            .http
            .get(sidecar.admin("/ready"))
            .send()
            .await?
            .status();
        states.push(format!("{index}: {instances:?}"));
        let passing = instances.values().any(|h| *h == Health::Passing as i32);
        ensure!(
            passing && ready == 200,
            "no passing echo instance (or the sidecar not ready: {ready}) at index {index} during the rename (health {{key: 1 passing, 3 critical}}): {states:#?}"
        );
        if instances.len() == 1 && instances.keys().all(|k| k.ends_with("/echo-0b")) {
            break;
        }
    }
    ensure!(
        instances.len() == 1 && instances.keys().all(|k| k.ends_with("/echo-0b")),
        "only the new id registered in the end: {states:#?}"
    );
    let status = mesh.sidecars[*s].json("/status").await?;
    ensure!(
        status["service_id"] == "echo-0b" && status["registered"] == true,
        "{status}"
    );
    mesh.done();
    Ok(())
}

/// A watch of one service on the registry: its instances (key → health)
/// as the registry's changes come, one Raft index at a time.
struct ServiceWatch(tonic::Streaming<WatchEvent>);

async fn watch_service(mesh: &Mesh, name: &str) -> Result<ServiceWatch> {
    let mut client = WatchClient::connect(mesh.cluster().servers[0].grpc()).await?;
    let request = SubscribeRequest {
        topic: Some(subscribe_request::Topic::Service(ServiceTopic {
            name: name.to_owned(),
            passing_only: false,
        })),
        since_index: 0,
    };
    Ok(ServiceWatch(client.subscribe(request).await?.into_inner()))
}

impl ServiceWatch {
    /// The instances in the stream's snapshot.
    async fn snapshot(&mut self) -> Result<BTreeMap<String, i32>> {
        let mut instances = BTreeMap::new();
        for _ in 0..1000 {
            let event = watch::next(&mut self.0).await?;
            if event.kind == Kind::EndOfSnapshot as i32 {
                return Ok(instances);
            }
            apply(&mut instances, &event.changes)?;
        }
        bail!("no END_OF_SNAPSHOT")
    }

    /// Applies the next change to `instances`; its index. A fresh
    /// snapshot in the middle (a lagging watcher) would hide the states
    /// in between: that fails.
    async fn apply_next_change(&mut self, instances: &mut BTreeMap<String, i32>) -> Result<u64> {
        let event = watch::next_change(&mut self.0).await?;
        ensure!(
            event.kind == Kind::Change as i32,
            "a CHANGE, not {event:?} (a fresh snapshot would hide the states in between)"
        );
        apply(instances, &event.changes)?;
        Ok(event.index)
    }
}

fn apply(instances: &mut BTreeMap<String, i32>, changes: &[Change]) -> Result<()> {
    for c in changes {
        match &c.change {
            Some(change::Change::Endpoint(e)) => {
                instances.insert(e.key.clone(), e.health);
            }
            Some(change::Change::EndpointRemoved(key)) => {
                instances.remove(key);
            }
            other => bail!("not a service change: {other:?}"),
        }
    }
    Ok(())
}
