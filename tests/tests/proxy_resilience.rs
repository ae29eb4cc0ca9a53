//! The sidecar's data plane end to end when things fail: instances killed,
//! crashed or stopped under load, outlier ejection, timeouts, retries and
//! circuit limits, new instances and a vanished registry, and draining on
//! SIGTERM. Through
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

use anyhow::{Context, Result, ensure};
use meshwork_tests::apps::http_backend;
use meshwork_tests::http::{Load, http_client};
use meshwork_tests::sidecar::{INBOUND_PORT, Mesh, Service, UPSTREAM_PORT, echo_behind_client};
use meshwork_tests::wait_for;
use tokio::net::TcpStream;

#[tokio::test]
async fn an_instance_killed_mid_load_fails_no_idempotent_request() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (instances, client_ip, _) = echo_behind_client(&mut mesh, 3, "name = \"echo\"\nprotocol = \"http\"\nbalance = \"least_request\"\nretries = { attempts = 2, on = [\"connect-failure\", \"reset\", \"gateway-error\"] }").await?;
    let url = format!("http://{client_ip}:{UPSTREAM_PORT}/load");
    let load = Load::start(&url, false);
    tokio::time::sleep(Duration::from_millis(700)).await;
    // kill -9 the sidecar of instance 1: its connections reset, its port
    // refuses, and the registry only notices after the session TTL.
    let victim = instances[1].2;
    mesh.sidecars[victim].kill().await?;
    let before = load.ok();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (after, failures) = load.stop().await?;
    ensure!(
        after > before + 50,
        "traffic kept flowing: {before} -> {after}"
    );
    ensure!(failures == 0, "{} failed requests", failures);
    mesh.done();
    Ok(())
}

#[tokio::test]
async fn a_flaky_instance_is_ejected_and_later_readmitted() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (instances, client_ip, c) = echo_behind_client(&mut mesh, 2, "name = \"echo\"\nprotocol = \"http\"\nretries = { attempts = 0 }\noutlier = { consecutive_5xx = 3, base_ejection = \"8s\", max_ejection_percent = 50 }").await?;
    let flaky = &instances[0].1;
    flaky.fail_with.store(500, Ordering::Relaxed);
    let http = http_client()?;
    let url = format!("http://{client_ip}:{UPSTREAM_PORT}/");
    for _ in 0..20 {
        http.get(&url).send().await?;
    }
    let flaky_inbound = format!("{}:{INBOUND_PORT}", mesh.ip(20));
    let endpoints = mesh.sidecars[c].endpoints().await?;
    ensure!(
        endpoints.iter().any(|e| e.0 == flaky_inbound && e.2),
        "flaky endpoint ejected: {endpoints:?}"
    );
    let ejections = mesh.sidecars[c]
        .metric_sum("meshwork_proxy_ejections_total{direction=\"outbound\"")
        .await?;
    ensure!(ejections == 1.0, "ejections = {ejections}");
    // While ejected it gets nothing.
    let served = flaky.served.load(Ordering::Relaxed);
    for _ in 0..20 {
        let r = http.get(&url).send().await?;
        ensure!(r.status() == 200);
    }
    ensure!(flaky.served.load(Ordering::Relaxed) == served);
    // Fixed, and after the ejection time it is back in the rotation.
    flaky.fail_with.store(0, Ordering::Relaxed);
    // (8 s: long enough that the checks above, on a busy machine, all fall
    // inside the first ejection.)
    wait_for("readmitted", Duration::from_secs(15), || async {
        let list = mesh.sidecars[c].endpoints().await.ok()?;
        list.iter().all(|e| !e.2).then_some(())
    })
    .await?;
    for _ in 0..20 {
        let r = http.get(&url).send().await?;
        ensure!(r.status() == 200);
    }
    ensure!(
        flaky.served.load(Ordering::Relaxed) >= served + 5,
        "it receives traffic again"
    );
    mesh.done();
    Ok(())
}

#[tokio::test]
async fn timeouts_retries_and_limits_are_answered_and_counted() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (instances, client_ip, c) = echo_behind_client(&mut mesh, 2, "name = \"echo\"\nprotocol = \"http\"\nrequest_timeout = \"1000ms\"\nretries = { attempts = 1, on = [\"503\"] }\noutlier = { consecutive_5xx = 0 }\nlimits = { max_requests = 2 }").await?;
    let http = http_client()?;
    let url = format!("http://{client_ip}:{UPSTREAM_PORT}");
    // A slow answer: 504 from the proxy, saying why.
    let r = http.get(format!("{url}/slow")).send().await?;
    ensure!(r.status() == 504, "{}", r.status());
    ensure!(r.headers()["x-meshwork-error"] == "timeout");
    // One instance answers 503: GETs are retried on the other one.
    instances[0].1.fail_with.store(503, Ordering::Relaxed);
    for _ in 0..10 {
        let r = http.get(format!("{url}/")).send().await?;
        ensure!(r.status() == 200, "{}", r.status());
    }
    // ... but a POST is not (not idempotent).
    let mut posts = Vec::new();
    for _ in 0..4 {
        posts.push(
            http.post(format!("{url}/"))
                .body("x")
                .send()
                .await?
                .status()
                .as_u16(),
        );
    }
    ensure!(posts.contains(&503), "{posts:?}");
    let mut refused = None;
    for _ in 0..4 {
        let r = http.post(format!("{url}/")).body("x").send().await?;
        if r.status() == 503 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.context("a POST answered 503 by the failing instance")?;
    ensure!(
        !r.headers().contains_key("x-meshwork-error"),
        "the app's own x-meshwork-error was dropped by its sidecar"
    );
    let retries = mesh.sidecars[c]
        .metric_sum("meshwork_proxy_retries_total{direction=\"outbound\"")
        .await?;
    ensure!(retries >= 5.0, "retries = {retries}");
    let timeouts = mesh.sidecars[c]
        .metric_sum("meshwork_proxy_requests_total{direction=\"outbound\",upstream=\"echo\",class=\"5xx\",outcome=\"timeout\"}")
        .await?;
    ensure!(timeouts == 1.0, "timeouts = {timeouts}");
    instances[0].1.fail_with.store(0, Ordering::Relaxed);
    // max_requests = 2: a third concurrent request is refused at once.
    let slow = |http: reqwest::Client, url: String| async move {
        http.get(format!("{url}/slow")).send().await
    };
    let a = tokio::spawn(slow(http.clone(), url.clone()));
    let b = tokio::spawn(slow(http.clone(), url.clone()));
    // Both held (1 s before they time out, 1 s before /slow answers)
    // before the third is sent.
    let sidecar = &mesh.sidecars[c];
    wait_for("two requests in flight", Duration::from_secs(5), || async {
        let clusters = sidecar.json("/clusters").await.ok()?;
        let in_flight: u64 = clusters["clusters"]
            .as_array()?
            .iter()
            .filter(|c| c["name"] == "echo" && c["direction"] == "outbound")
            .flat_map(|c| c["endpoints"].as_array().into_iter().flatten())
            .filter_map(|e| e["in_flight"].as_u64())
            .sum();
        (in_flight == 2).then_some(())
    })
    .await?;
    let r = http.get(format!("{url}/")).send().await?;
    ensure!(r.status() == 503, "{}", r.status());
    ensure!(r.headers()["x-meshwork-error"] == "circuit-open");
    // The held requests: 1 s timeout, /slow answers after 2 s: 504.
    for held in [a.await??, b.await??] {
        ensure!(held.status() == 504, "a held request got {}", held.status());
        ensure!(held.headers()["x-meshwork-error"] == "timeout");
    }
    // No instance at all: 503 no-healthy-upstream.
    let c2_ip = mesh.ip(101);
    let c2 = mesh
        .client_sidecar(&c2_ip, "name = \"nobody\"\nprotocol = \"http\"")
        .await?;
    let r = mesh.sidecars[c2]
        .http
        .get(format!("http://{c2_ip}:{UPSTREAM_PORT}/"))
        .send()
        .await?;
    ensure!(r.status() == 503);
    ensure!(r.headers()["x-meshwork-error"] == "no-healthy-upstream");
    mesh.done();
    Ok(())
}

#[tokio::test]
async fn new_instances_get_traffic_within_a_second_and_the_registry_can_vanish() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (_, client_ip, c) =
        echo_behind_client(&mut mesh, 1, "name = \"echo\"\nprotocol = \"http\"").await?;
    let http = http_client()?;
    let url = format!("http://{client_ip}:{UPSTREAM_PORT}/");
    // A second instance: as soon as its sidecar is registered, the client
    // sends it traffic within a second.
    let ip = mesh.ip(21);
    let (app, behavior) = http_backend(&ip, "echo-new").await?;
    mesh.server_sidecar(
        &ip,
        Service {
            name: "echo",
            id: "echo-new",
            app,
            protocol: "http",
        },
    )
    .await?;
    // The claim is a second. Measured here: 56 ms in each of six runs on
    // the 2-core box with a CI run beside it (the watch stream delivers
    // the change; bench/watch.sh measures tens of ms at p99 to 10,000
    // subscribers), so a second holds with a wide margin even loaded.
    let registered = Instant::now();
    wait_for(
        "traffic on the new instance",
        Duration::from_secs(5),
        || async {
            http.get(&url).send().await.ok()?;
            (behavior.served.load(Ordering::Relaxed) > 0).then_some(())
        },
    )
    .await?;
    let took = registered.elapsed();
    ensure!(
        took < Duration::from_secs(1),
        "the new instance got traffic {took:?} after it registered"
    );
    // The registry goes away entirely: traffic keeps flowing to what was
    // known last, and the metrics say the registry is unreachable.
    if let Some(cluster) = mesh.cluster.as_mut() {
        cluster.servers[0].kill().await?;
    }
    wait_for(
        "registry disconnected in metrics",
        Duration::from_secs(10),
        || async {
            let m = mesh.sidecars[c].metrics().await.ok()?;
            m.contains("meshwork_sidecar_registry_connected 0")
                .then_some(())
        },
    )
    .await?;
    for i in 0..50 {
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

#[tokio::test]
async fn sigterm_drains_in_flight_requests() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (_, client_ip, c) =
        echo_behind_client(&mut mesh, 1, "name = \"echo\"\nprotocol = \"http\"").await?;
    let http = http_client()?;
    let url = format!("http://{client_ip}:{UPSTREAM_PORT}/slow");
    let in_flight = tokio::spawn({
        let http = http.clone();
        let url = url.clone();
        async move { http.get(url).send().await }
    });
    // The request is in flight in the sidecar before the signal.
    let sidecar = &mesh.sidecars[c];
    wait_for("the request in flight", Duration::from_secs(10), || async {
        let active = sidecar
            .metric_sum("meshwork_proxy_requests_active")
            .await
            .ok()?;
        (active >= 1.0).then_some(())
    })
    .await?;
    mesh.sidecars[c].signal("TERM")?;
    let r = in_flight.await??;
    ensure!(
        r.status() == 200,
        "the in-flight request finished: {}",
        r.status()
    );
    let status = mesh.sidecars[c].wait_exit(Duration::from_secs(10)).await?;
    ensure!(status.success(), "{status}");
    ensure!(
        TcpStream::connect(format!("{client_ip}:{UPSTREAM_PORT}"))
            .await
            .is_err(),
        "no longer accepting"
    );
    mesh.done();
    Ok(())
}

#[tokio::test]
async fn an_app_crashing_behind_its_sidecar_fails_no_request() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (instances, client_ip, c) =
        echo_behind_client(&mut mesh, 3, "name = \"echo\"\nprotocol = \"http\"").await?;
    let url = format!("http://{client_ip}:{UPSTREAM_PORT}/load");
    // Traffic reaches all three, then the app behind instance 1 dies; its
    // sidecar (and its registration, which has no check) stays, so every
    // request sent there comes back as 503 connect-failure from that
    // sidecar and must be sent elsewhere. (The crash comes between
    // requests: a POST the app was answering when it died may not be
    // retried, and that is right.)
    let http = http_client()?;
    for _ in 0..9 {
        ensure!(http.get(&url).send().await?.status() == 200);
    }
    instances[1].1.crash();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let load = Load::start(&url, true);
    let before = 0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, failures) = load.stop().await?;
    ensure!(
        after > before + 50,
        "traffic kept flowing: {before} -> {after}"
    );
    ensure!(failures == 0, "{} failed requests", failures);
    // Passive health took the instance out.
    let endpoints = mesh.sidecars[c].endpoints().await?;
    let dead = format!("{}:{INBOUND_PORT}", mesh.ip(21));
    ensure!(
        endpoints.iter().any(|e| e.0 == dead && e.2),
        "ejected: {endpoints:?}"
    );
    mesh.done();
    Ok(())
}

#[tokio::test]
async fn a_server_sidecar_stopped_with_sigterm_fails_no_request() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (instances, client_ip, c) =
        echo_behind_client(&mut mesh, 3, "name = \"echo\"\nprotocol = \"http\"").await?;
    let url = format!("http://{client_ip}:{UPSTREAM_PORT}/load");
    let load = Load::start(&url, true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A rolling restart: instance 1's sidecar gets SIGTERM. It deregisters
    // (peers stop picking it), then drains: what it is answering finishes,
    // new connections are refused (and sent elsewhere).
    let victim = instances[1].2;
    mesh.sidecars[victim].signal("TERM")?;
    let status = mesh.sidecars[victim]
        .wait_exit(Duration::from_secs(10))
        .await?;
    ensure!(status.success(), "{status}");
    let before = load.ok();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (after, failures) = load.stop().await?;
    ensure!(after > before + 20, "traffic kept flowing");
    ensure!(failures == 0, "{} failed requests", failures);
    wait_for("2 endpoints left", Duration::from_secs(5), || async {
        let list = mesh.sidecars[c].endpoints().await.ok()?;
        (list.len() == 2).then_some(())
    })
    .await?;
    mesh.done();
    Ok(())
}
