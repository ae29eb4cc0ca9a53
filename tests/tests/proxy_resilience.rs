//! The sidecar's data plane end to end when things fail: instances killed,
//! crashed or stopped under load, outlier ejection (and its growth),
//! timeouts, retries (which bodies are replayed, the retry budget) and
//! circuit limits (`max_requests`, `max_pending`, `max_connections`), new
//! instances and a vanished registry, and draining on SIGTERM. Through
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
use bytes::Bytes;
use http_body_util::Full;
use meshwork_tests::apps::{Behavior, http_backend, tcp_backend};
use meshwork_tests::http::{Load, Trailed, h1_client, h2_client, http_client};
use meshwork_tests::sidecar::{
    INBOUND_PORT, Mesh, Service, Sidecar, UPSTREAM_PORT, echo_behind_client,
};
use meshwork_tests::wait_for;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// The outbound endpoint at `address` as the sidecar's `/clusters` shows
/// it.
async fn endpoint_view(sidecar: &Sidecar, address: &str) -> Result<serde_json::Value> {
    let clusters = sidecar.json("/clusters").await?;
    clusters["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["direction"] == "outbound")
        .flat_map(|c| c["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["address"] == address)
        .cloned()
        .with_context(|| format!("{address} in /clusters: {clusters}"))
}

/// docs/proxy.md: an endpoint is ejected for `base_ejection` × its number
/// of ejections. Each ejection's time left is read from `/clusters` right
/// after the request that caused it, and the endpoint is back once that
/// time is up. (The 5-minute cap is a unit test beside the code,
/// `upstream::outlier`: five minutes of waiting has no place here.)
#[tokio::test]
async fn each_ejection_lasts_base_ejection_times_its_number() -> Result<()> {
    const BASE: Duration = Duration::from_secs(2);
    let mut mesh = Mesh::start().await?;
    let (instances, client_ip, c) = echo_behind_client(&mut mesh, 2, "name = \"echo\"\nprotocol = \"http\"\nretries = { attempts = 0 }\noutlier = { consecutive_5xx = 1, base_ejection = \"2s\", max_ejection_percent = 50 }").await?;
    instances[0].1.fail_with.store(500, Ordering::Relaxed);
    let flaky = format!("{}:{INBOUND_PORT}", mesh.ip(20));
    let http = http_client()?;
    let url = format!("http://{client_ip}:{UPSTREAM_PORT}/");
    let sidecar = &mesh.sidecars[c];
    for n in 1..=3u32 {
        // Requests until the flaky endpoint gets one (round robin: the
        // first or the second) and is ejected for the n-th time.
        let mut ejected = None;
        for _ in 0..10 {
            let sent = Instant::now();
            http.get(&url).send().await?;
            let view = endpoint_view(sidecar, &flaky).await?;
            if view["ejections"].as_u64() == Some(u64::from(n)) {
                ejected = Some((view, sent.elapsed()));
                break;
            }
        }
        let (view, took) = ejected.with_context(|| format!("ejection {n} within 10 requests"))?;
        ensure!(
            took < BASE / 2,
            "reading /clusters took {took:?}: too slow to tell {BASE:?} steps apart"
        );
        // Read within `took` of the ejection: between want - took and want left.
        let left = Duration::from_millis(view["ejected_for_ms"].as_u64().unwrap_or(0));
        let want = BASE * n;
        ensure!(
            view["ejected"] == true
                && left <= want
                && left + took + Duration::from_millis(5) >= want,
            "ejection {n} has {left:?} left, read within {took:?} of it: it should last {want:?} (base_ejection × {n}): {view}"
        );
        if n == 3 {
            break;
        }
        wait_for(
            &format!("readmission {left:?} after ejection {n}"),
            left + Duration::from_secs(3),
            || async {
                let view = endpoint_view(sidecar, &flaky).await.ok()?;
                (view["ejected"] == false).then_some(())
            },
        )
        .await?;
    }
    mesh.done();
    Ok(())
}

/// docs/proxy.md: a request is retried only when it can be replayed — no
/// body, or one of at most 64 KiB with a Content-Length. A PUT (idempotent)
/// whose first attempt meets a 503 listed in `retries.on` is sent to the
/// other instance with 64 KiB and a length, and answered with the 503
/// with 64 KiB + 1, or with a body of unknown length (chunked; over
/// HTTP/2, no content-length). From HTTP/1.1 and HTTP/2 clients.
#[tokio::test]
async fn only_bodies_of_at_most_64_kib_with_a_length_are_retried() -> Result<()> {
    #[derive(Debug, Clone, Copy)]
    enum Sent {
        Empty,
        Length(usize),
        Chunked,
        /// Over HTTP/2 (prior knowledge), with a content-length.
        H2Length(usize),
        /// Over HTTP/2, DATA frames and no content-length.
        H2NoLength,
    }
    let mut mesh = Mesh::start().await?;
    let (instances, client_ip, c) = echo_behind_client(&mut mesh, 2, "name = \"echo\"\nprotocol = \"http\"\nretries = { attempts = 1, on = [\"503\"] }\noutlier = { consecutive_5xx = 0 }").await?;
    let failing = &instances[0].1;
    failing.fail_with.store(503, Ordering::Relaxed);
    let url = format!("http://{client_ip}:{UPSTREAM_PORT}/put");
    let http = http_client()?;
    let chunked = h1_client::<Trailed>();
    let (h2_full, h2_streamed) = (h2_client::<Full<Bytes>>(), h2_client::<Trailed>());
    let sidecar = &mesh.sidecars[c];
    let retries = || sidecar.metric_sum("meshwork_proxy_retries_total{direction=\"outbound\"");
    for (sent, replayable) in [
        (Sent::Empty, true),
        (Sent::Length(5), true),
        (Sent::Length(64 * 1024), true),
        (Sent::Length(64 * 1024 + 1), false),
        (Sent::Chunked, false),
        (Sent::H2Length(64 * 1024), true),
        (Sent::H2Length(64 * 1024 + 1), false),
        (Sent::H2NoLength, false),
    ] {
        // Round robin: the first or the second request starts on the
        // failing instance.
        let mut seen = None;
        for _ in 0..6 {
            let (served, retried) = (failing.served.load(Ordering::SeqCst), retries().await?);
            let (status, backend) = match sent {
                Sent::Empty => {
                    let r = http.put(&url).send().await?;
                    (r.status().as_u16(), r.headers().get("x-backend").cloned())
                }
                Sent::Length(n) => {
                    let r = http.put(&url).body(vec![b'b'; n]).send().await?;
                    (r.status().as_u16(), r.headers().get("x-backend").cloned())
                }
                Sent::Chunked => {
                    let req = hyper::Request::put(&url).body(Trailed {
                        chunk: b"no length",
                        left: 2,
                    })?;
                    let r = tokio::time::timeout(Duration::from_secs(10), chunked.request(req))
                        .await??;
                    (r.status().as_u16(), r.headers().get("x-backend").cloned())
                }
                Sent::H2Length(n) => {
                    let req = hyper::Request::put(&url)
                        .header("content-length", n)
                        .body(Full::new(Bytes::from(vec![b'b'; n])))?;
                    let r = tokio::time::timeout(Duration::from_secs(10), h2_full.request(req))
                        .await??;
                    (r.status().as_u16(), r.headers().get("x-backend").cloned())
                }
                Sent::H2NoLength => {
                    let req = hyper::Request::put(&url).body(Trailed {
                        chunk: b"no length",
                        left: 2,
                    })?;
                    let r = tokio::time::timeout(Duration::from_secs(10), h2_streamed.request(req))
                        .await??;
                    (r.status().as_u16(), r.headers().get("x-backend").cloned())
                }
            };
            if failing.served.load(Ordering::SeqCst) > served {
                seen = Some((status, backend, retries().await? - retried));
                break;
            }
        }
        let (status, backend, retried) =
            seen.with_context(|| format!("{sent:?}: no request started on the failing instance"))?;
        let backend = backend.as_ref().and_then(|v| v.to_str().ok());
        if replayable {
            ensure!(
                status == 200 && backend == Some("echo-1") && retried == 1.0,
                "{sent:?} can be replayed: retried on echo-1, but got {status} from {backend:?} after {retried} retries"
            );
        } else {
            ensure!(
                status == 503 && backend == Some("echo-0") && retried == 0.0,
                "{sent:?} cannot be replayed: echo-0's 503 answered, but got {status} from {backend:?} after {retried} retries"
            );
        }
    }
    mesh.done();
    Ok(())
}

/// A request sent in a task of its own (held at an instance).
type HeldRequest = tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>;

/// Requests to the failing instance's key until one is refused a retry:
/// how many retries the budget admitted (held, in `held`).
async fn retries_admitted(
    sidecar: &Sidecar,
    http: &reqwest::Client,
    url: &str,
    key: &str,
    holder: &Behavior,
    held: &mut Vec<HeldRequest>,
) -> Result<usize> {
    for j in 0..30 {
        match retried_or_refused(sidecar, http, url, key, holder).await? {
            Ok(task) => held.push(task),
            Err(answer) => {
                let want = "503 from Some(\"echo-0\")";
                ensure!(
                    answer == want,
                    "refused a retry: wanted {want}, got {answer}"
                );
                return Ok(j);
            }
        }
    }
    anyhow::bail!("30 retries admitted: no budget at all")
}

/// One request to the failing instance's key, whose retry (if the budget
/// allows it) is held at the holding instance: `Ok(task)` when retried
/// (the task holds the request), `Err(what came back)` when answered at
/// once for want of budget (which the exhausted counter must show).
async fn retried_or_refused(
    sidecar: &Sidecar,
    http: &reqwest::Client,
    url: &str,
    key: &str,
    holder: &Behavior,
) -> Result<Result<HeldRequest, String>> {
    let exhausted = || {
        sidecar.metric_sum("meshwork_proxy_retries_budget_exhausted_total{direction=\"outbound\"")
    };
    let (before, held) = (exhausted().await?, holder.holding.load(Ordering::SeqCst));
    let request = http.get(format!("{url}/hold")).header("x-user", key);
    let task = tokio::spawn(request.send());
    let retried = wait_for(
        "the request retried or answered",
        Duration::from_secs(10),
        || async {
            if holder.holding.load(Ordering::SeqCst) > held {
                return Some(true);
            }
            task.is_finished().then_some(false)
        },
    )
    .await?;
    if retried {
        return Ok(Ok(task));
    }
    let r = task.await??;
    let answer = format!(
        "{} from {:?}",
        r.status().as_u16(),
        r.headers().get("x-backend")
    );
    let after = exhausted().await?;
    ensure!(
        after == before + 1.0,
        "a request answered at once ({answer}) without a refused retry counted: {before} -> {after}"
    );
    Ok(Err(answer))
}

/// docs/proxy.md: retries in flight are at most `budget_percent` of the
/// requests in flight, at least 3, and connect failures are not counted.
/// Ring hashing on `x-user` sends each request first to the instance its
/// key names: `echo-0` answers 503 (retried on `echo-1`), `echo-1` holds
/// what it gets until released, so every admitted retry stays in flight.
#[tokio::test]
async fn retries_in_flight_stay_within_budget_percent() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (instances, client_ip, c) = echo_behind_client(&mut mesh, 2, "name = \"echo\"\nprotocol = \"http\"\nbalance = \"ring_hash\"\nhash_header = \"x-user\"\nrequest_timeout = \"30s\"\nretries = { attempts = 1, on = [\"connect-failure\", \"503\"], budget_percent = 50 }\noutlier = { consecutive_5xx = 0 }").await?;
    let (failing, holder) = (&instances[0].1, &instances[1].1);
    let url = format!("http://{client_ip}:{UPSTREAM_PORT}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()?;
    // A key the ring sends to each instance.
    let mut keys = std::collections::HashMap::new();
    for k in 0..64 {
        let key = format!("user-{k}");
        let r = http
            .get(format!("{url}/"))
            .header("x-user", &key)
            .send()
            .await?;
        if let Some(b) = r.headers().get("x-backend").and_then(|v| v.to_str().ok()) {
            keys.entry(b.to_owned()).or_insert(key);
        }
        if keys.len() == 2 {
            break;
        }
    }
    let to_failing = keys.get("echo-0").context("a key for echo-0")?.clone();
    let to_holder = keys.get("echo-1").context("a key for echo-1")?.clone();
    failing.fail_with.store(503, Ordering::Relaxed);
    let sidecar = &mesh.sidecars[c];
    let mut held = Vec::new();
    // `n` more requests in flight, held at echo-1.
    let fill = |n: usize, held: &mut Vec<_>| {
        for _ in 0..n {
            let request = http.get(format!("{url}/hold")).header("x-user", &to_holder);
            held.push(tokio::spawn(request.send()));
        }
    };
    // Lets them all go; each must have been answered by echo-1.
    let release = |held: Vec<HeldRequest>| async move {
        holder.release();
        for task in held {
            let r = task.await??;
            ensure!(r.status() == 200, "a held request: {}", r.status());
        }
        anyhow::Ok(())
    };

    // 50 %, 10 requests held: the j-th retry is admitted while
    // j < (10 + j + 1) × 50 % (its own request counts): 10 of them.
    fill(10, &mut held);
    wait_for("10 requests held", Duration::from_secs(10), || async {
        (holder.holding.load(Ordering::SeqCst) == 10).then_some(())
    })
    .await?;
    let retries = retries_admitted(sidecar, &http, &url, &to_failing, holder, &mut held).await?;
    ensure!(
        retries == 10,
        "budget_percent = 50 with 10 held requests admitted {retries} retries, not 10"
    );
    release(std::mem::take(&mut held)).await?;

    // 20 %: (10 + j + 1) × 20 % is 2 for the first retries, so the floor
    // of 3 rules.
    let path = mesh.sidecars[c].config.clone();
    let text =
        std::fs::read_to_string(&path)?.replace("budget_percent = 50", "budget_percent = 20");
    let status = mesh.reload(c, &text).await?;
    ensure!(
        status["reloads"] == 1 && status["last_reload_error"].is_null(),
        "{status}"
    );
    wait_for("nothing held", Duration::from_secs(10), || async {
        (holder.holding.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await?;
    fill(10, &mut held);
    wait_for("10 requests held", Duration::from_secs(10), || async {
        (holder.holding.load(Ordering::SeqCst) == 10).then_some(())
    })
    .await?;
    let retries = retries_admitted(sidecar, &http, &url, &to_failing, holder, &mut held).await?;
    ensure!(
        retries == 3,
        "budget_percent = 20 with 10 held requests admitted {retries} retries, not the floor of 3"
    );

    // The budget is spent; echo-0's app dies, and its sidecar's 503
    // (connect-failure) is retried whatever the budget: it cost nothing.
    failing.crash();
    for i in 0..4 {
        match retried_or_refused(sidecar, &http, &url, &to_failing, holder).await? {
            Ok(task) => held.push(task),
            Err(answer) => anyhow::bail!(
                "connect failure {i} was refused a retry ({answer}): the budget counted it"
            ),
        }
    }
    release(held).await?;
    mesh.done();
    Ok(())
}

/// docs/proxy.md: `max_pending` caps the requests waiting for a response
/// head (one whose head has come, its body still streaming, no longer
/// counts), `max_connections` the upstream connections (a request that
/// would need one more is refused; the pooled one is reused). Both
/// answer 503 `circuit-open` naming the limit. On a tcp upstream
/// `max_connections` caps the proxied connections.
#[tokio::test]
async fn max_pending_and_max_connections_open_the_circuit() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let (instances, client_ip, c) = echo_behind_client(&mut mesh, 1, "name = \"echo\"\nprotocol = \"http\"\nrequest_timeout = \"30s\"\nretries = { attempts = 0 }\nlimits = { max_pending = 2 }").await?;
    let holder = &instances[0].1;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()?;
    let url = format!("http://{client_ip}:{UPSTREAM_PORT}");
    let refused = |r: reqwest::Response, limit: &'static str| async move {
        let status = r.status();
        let error = r.headers().get("x-meshwork-error").cloned();
        let body = r.text().await?;
        ensure!(
            status == 503
                && error.as_ref().is_some_and(|e| e == "circuit-open")
                && body.contains(limit),
            "{limit}: wanted 503 circuit-open naming it, got {status} {error:?} {body:?}"
        );
        anyhow::Ok(())
    };
    let held = |n: usize| async move {
        wait_for(
            &format!("{n} requests held"),
            Duration::from_secs(10),
            || async { (holder.holding.load(Ordering::SeqCst) == n).then_some(()) },
        )
        .await
    };

    // Two requests waiting for their heads: a third is refused.
    let spawn = |path: &str| tokio::spawn(http.get(format!("{url}{path}")).send());
    let waiting = [spawn("/hold"), spawn("/hold")];
    held(2).await?;
    refused(http.get(format!("{url}/")).send().await?, "max_pending").await?;
    holder.release();
    for task in waiting {
        let status = task.await??.status();
        ensure!(status == 200, "a released request: {status}");
    }
    held(0).await?;
    // Two whose heads have come (bodies held): not pending any more.
    let streaming = [spawn("/hold-body"), spawn("/hold-body")];
    let mut bodies = Vec::new();
    for task in streaming {
        let r = task.await??;
        ensure!(r.status() == 200, "{}", r.status());
        bodies.push(r);
    }
    held(2).await?;
    let in_flight = endpoint_view(
        &mesh.sidecars[c],
        &format!("{}:{INBOUND_PORT}", mesh.ip(20)),
    )
    .await?["in_flight"]
        .as_u64();
    ensure!(
        in_flight == Some(2),
        "two responses still streaming: {in_flight:?}"
    );
    let r = http.get(format!("{url}/")).send().await?;
    ensure!(
        r.status() == 200,
        "max_pending = 2 with two responses streaming (heads received) refused a request: {} {:?}",
        r.status(),
        r.headers().get("x-meshwork-error")
    );
    holder.release();
    for r in bodies {
        let body = r.text().await?;
        ensure!(body.ends_with("released"), "a held body: {body:?}");
    }

    // A second client sidecar allowed one upstream connection: a request
    // while it is busy is refused; once it is free it serves the next.
    let c2_ip = mesh.ip(101);
    let c2 = mesh
        .client_sidecar(&c2_ip, "name = \"echo\"\nprotocol = \"http\"\nrequest_timeout = \"30s\"\nretries = { attempts = 0 }\nlimits = { max_connections = 1 }")
        .await?;
    mesh.sidecars[c2].wait_endpoints(1).await?;
    mesh.sidecars[c2].wait_ready().await?;
    let url2 = format!("http://{c2_ip}:{UPSTREAM_PORT}");
    held(0).await?;
    let busy = tokio::spawn(http.get(format!("{url2}/hold")).send());
    held(1).await?;
    refused(
        http.get(format!("{url2}/")).send().await?,
        "max_connections",
    )
    .await?;
    holder.release();
    let status = busy.await??.status();
    ensure!(status == 200, "the request on the one connection: {status}");
    wait_for(
        "a request on the pooled connection",
        Duration::from_secs(5),
        || async {
            let r = http.get(format!("{url2}/")).send().await.ok()?;
            (r.status() == 200).then_some(())
        },
    )
    .await?;
    let opened = mesh.sidecars[c2]
        .metric_sum("meshwork_proxy_upstream_connections_total{direction=\"outbound\"")
        .await?;
    ensure!(
        opened == 1.0,
        "one upstream connection ever opened, not {opened}"
    );

    // A tcp upstream: max_connections caps the proxied connections. While
    // one is open, the next is closed with nothing sent on (and counted).
    let tcp_ip = mesh.ip(30);
    let app = tcp_backend(&tcp_ip, "bytes-0").await?;
    mesh.server_sidecar(
        &tcp_ip,
        Service {
            name: "bytes",
            id: "bytes-0",
            app,
            protocol: "tcp",
        },
    )
    .await?;
    let c3_ip = mesh.ip(102);
    let c3 = mesh
        .client_sidecar(
            &c3_ip,
            "name = \"bytes\"\nprotocol = \"tcp\"\nlimits = { max_connections = 1 }",
        )
        .await?;
    mesh.sidecars[c3].wait_endpoints(1).await?;
    mesh.sidecars[c3].wait_ready().await?;
    let tcp = format!("{c3_ip}:{UPSTREAM_PORT}");
    let exchange = |mut s: TcpStream| async move {
        s.write_all(b"four").await?;
        s.shutdown().await?;
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut reply)).await??;
        anyhow::Ok(reply)
    };
    let mut open = TcpStream::connect(&tcp).await?;
    open.write_all(b"one").await?;
    let sidecar = &mesh.sidecars[c3];
    wait_for(
        "the first connection proxied",
        Duration::from_secs(10),
        || async {
            let active = sidecar
                .metric_sum("meshwork_proxy_upstream_connections_active{direction=\"outbound\"")
                .await
                .ok()?;
            (active == 1.0).then_some(())
        },
    )
    .await?;
    // Closed at once: nothing read, or (our bytes unread) a reset.
    let refused = exchange(TcpStream::connect(&tcp).await?).await;
    let closed = match &refused {
        Ok(reply) => reply.is_empty(),
        Err(e) => e.downcast_ref::<std::io::Error>().is_some(),
    };
    ensure!(
        closed,
        "a second tcp connection with max_connections = 1 was not closed at once: {refused:?}"
    );
    let counted = sidecar
        .metric_sum("meshwork_proxy_requests_total{direction=\"outbound\",upstream=\"bytes\",class=\"none\",outcome=\"circuit-open\"}")
        .await?;
    ensure!(
        counted == 1.0,
        "the refused connection counted as circuit-open: {counted}"
    );
    let first = exchange(open).await?;
    ensure!(first == "bytes-0 got 7 bytes", "{first:?}");
    wait_for(
        "a connection proxied once the first closed",
        Duration::from_secs(10),
        || async {
            let reply = exchange(TcpStream::connect(&tcp).await.ok()?).await.ok()?;
            (reply == "bytes-0 got 4 bytes").then_some(())
        },
    )
    .await?;
    mesh.done();
    Ok(())
}
