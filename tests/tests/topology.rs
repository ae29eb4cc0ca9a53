//! Who calls whom (issue 26): sidecars report their traffic per edge to
//! the server they are connected to; `/v1/mesh/topology` on any server
//! merges every server's, with requests a second, error rate and latency.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Result, ensure};
use meshwork_tests::apps::http_backend;
use meshwork_tests::http::get_json;
use meshwork_tests::sidecar::{Mesh, Service, UPSTREAM_PORT};
use meshwork_tests::wait_for;
use serde_json::Value;

#[tokio::test]
async fn the_topology_shows_who_calls_whom_from_any_server() -> Result<()> {
    // api's sidecar reports to server 2, the client's to server 1; the
    // topology is asked of server 3.
    let mut mesh = Mesh::start_servers(3, &[]).await?;
    let ip = mesh.ip(20);
    let (app, behavior) = http_backend(&ip, "api-1").await?;
    mesh.server_sidecar_on(
        &ip,
        1,
        Service {
            name: "api",
            id: "api-1",
            app,
            protocol: "http",
        },
    )
    .await?;
    let client_ip = mesh.ip(100);
    let c = mesh
        .client_sidecar(&client_ip, "name = \"api\"\nprotocol = \"http\"")
        .await?;
    mesh.sidecars[c].wait_endpoints(1).await?;
    let http = meshwork_tests::http::http_client()?;
    let url = format!("http://{client_ip}:{UPSTREAM_PORT}/");
    for _ in 0..90 {
        let r = http.get(&url).send().await?;
        ensure!(r.status() == 200, "{}", r.status());
    }
    // Ten answered 500 by the app (POST: not retried).
    behavior.fail_with.store(500, Ordering::SeqCst);
    for _ in 0..10 {
        let r = http.post(&url).body("x").send().await?;
        ensure!(r.status() == 500, "{}", r.status());
    }
    behavior.fail_with.store(0, Ordering::SeqCst);

    let server = mesh.cluster().servers[2].http();
    let bad = http
        .get(format!("{server}/v1/mesh/topology?window=1h"))
        .send()
        .await?;
    ensure!(
        bad.status() == 400,
        "a window past 15 minutes: {}",
        bad.status()
    );
    // Reports come every 10 s, the first a baseline: within 25 s.
    let topology: Value = wait_for(
        "the edge client -> api",
        Duration::from_secs(25),
        || async {
            let t = get_json(&http, &format!("{server}/v1/mesh/topology?window=1m")).await?;
            let edge = t["Edges"]
                .as_array()?
                .iter()
                .find(|e| e["Source"] == "client" && e["Destination"] == "api")?;
            (edge["Requests"] == 100).then(|| t.clone())
        },
    )
    .await?;
    let edge = topology["Edges"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["Destination"] == "api"))
        .cloned()
        .unwrap_or_default();
    let rate = edge["RequestsPerSecond"].as_f64().unwrap_or(0.0);
    ensure!(rate > 0.0, "{edge}");
    ensure!(edge["ErrorRate"] == 0.1, "{edge}");
    ensure!(
        edge["P50Ms"].as_f64().is_some_and(|p| p > 0.0) && edge["P99Ms"].as_f64().is_some(),
        "{edge}"
    );
    ensure!(
        topology["Unreachable"] == serde_json::json!([]),
        "{topology}"
    );
    // api's inbound, from its own sidecar on another server.
    let api = wait_for("api's inbound", Duration::from_secs(25), || async {
        let t = get_json(&http, &format!("{server}/v1/mesh/topology")).await?;
        let s = t["Services"]
            .as_array()?
            .iter()
            .find(|s| s["Name"] == "api")?
            .clone();
        (s["Requests"] == 100).then_some(s)
    })
    .await?;
    ensure!(api["ErrorRate"] == 0.1, "{api}");
    // The table's size, in /metrics of the server the client reports to.
    let metrics = http
        .get(format!("{}/metrics", mesh.cluster().servers[0].http()))
        .send()
        .await?
        .text()
        .await?;
    let edges = metrics
        .lines()
        .find_map(|l| l.strip_prefix("meshwork_topology_edges "))
        .and_then(|v| v.parse::<u64>().ok());
    ensure!(edges.is_some_and(|e| e >= 1), "{edges:?}");
    ensure!(
        metrics.contains("meshwork_topology_dropped_edges_total 0"),
        "{metrics}"
    );
    mesh.done();
    Ok(())
}
