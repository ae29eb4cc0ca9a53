//! Checks run by the registry (HTTP, TCP, TTL), deregistration of instances
//! that stay critical, leader failover of the check runner, and blocking
//! health queries — against real processes and a real HTTP target.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshwork_tests::apps::status_app;
use meshwork_tests::{Cluster, wait_for};
use serde_json::{Value, json};

async fn check_status(
    cluster: &Cluster,
    server: usize,
    service: &str,
    check_id: &str,
) -> Option<String> {
    let url = format!(
        "{}/v1/health/checks/{service}?stale",
        cluster.servers[server].http()
    );
    let checks: Value = cluster.http.get(url).send().await.ok()?.json().await.ok()?;
    checks
        .as_array()?
        .iter()
        .find(|c| c["CheckID"] == check_id)
        .and_then(|c| c["Status"].as_str().map(str::to_owned))
}

async fn wait_status(
    cluster: &Cluster,
    server: usize,
    service: &str,
    check_id: &str,
    want: &str,
    timeout: Duration,
) -> Result<()> {
    wait_for(&format!("{check_id} to be {want}"), timeout, || async {
        (check_status(cluster, server, service, check_id)
            .await
            .as_deref()
            == Some(want))
        .then_some(())
    })
    .await
}

async fn register(cluster: &Cluster, server: usize, body: Value) -> Result<()> {
    let resp = cluster
        .http
        .put(format!(
            "{}/v1/agent/service/register",
            cluster.servers[server].http()
        ))
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    ensure!(
        status == 200,
        "register answered {status}: {}",
        resp.text().await?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_tcp_checks_follow_the_target_and_survive_failover() -> Result<()> {
    let mut cluster = Cluster::start(3, &[]).await?;
    let status = Arc::new(AtomicU16::new(200));
    // A tiny HTTP server answering every request with the current status.
    let target = status_app("127.0.0.1", Arc::clone(&status), |s| format!("status {s}")).await?;
    let url = format!("http://{target}/health");
    let tcp_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tcp_addr = tcp_listener.local_addr()?.to_string();
    register(
        &cluster,
        1,
        json!({"Name": "web", "ID": "web-1", "Port": 80, "Checks": [
            {"CheckID": "web-http", "HTTP": url, "Interval": "300ms", "Timeout": "1s"},
            {"CheckID": "web-tcp", "TCP": tcp_addr, "Interval": "300ms", "Timeout": "1s"}
        ]}),
    )
    .await?;
    let t = Duration::from_secs(10);
    wait_status(&cluster, 0, "web", "web-http", "passing", t).await?;
    wait_status(&cluster, 2, "web", "web-tcp", "passing", t).await?;

    // A blocking query on the service wakes when its health changes.
    let resp = cluster
        .http
        .get(format!(
            "{}/v1/health/service/web",
            cluster.servers[2].http()
        ))
        .send()
        .await?;
    let index: u64 = resp.headers()["x-consul-index"].to_str()?.parse()?;
    status.store(429, Ordering::SeqCst);
    let resp = cluster
        .http
        .get(format!(
            "{}/v1/health/service/web?index={index}&wait=20s",
            cluster.servers[2].http()
        ))
        .send()
        .await?;
    assert!(resp.headers()["x-consul-index"].to_str()?.parse::<u64>()? > index);
    wait_status(&cluster, 0, "web", "web-http", "warning", t).await?;
    let entries: Value = cluster
        .http
        .get(format!(
            "{}/v1/health/service/web?passing",
            cluster.servers[0].http()
        ))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(entries.as_array().map(Vec::len), Some(0), "{entries}");

    status.store(503, Ordering::SeqCst);
    wait_status(&cluster, 0, "web", "web-http", "critical", t).await?;
    drop(tcp_listener);
    wait_status(&cluster, 0, "web", "web-tcp", "critical", t).await?;

    // The new leader takes the checks over.
    let leader = cluster.wait_leader(t).await?;
    cluster.servers[leader].kill().await?;
    let new_leader = cluster.wait_leader(t).await?;
    status.store(200, Ordering::SeqCst);
    wait_status(
        &cluster,
        new_leader,
        "web",
        "web-http",
        "passing",
        Duration::from_secs(15),
    )
    .await?;
    let checks: Value = cluster
        .http
        .get(format!(
            "{}/v1/health/checks/web",
            cluster.servers[new_leader].http()
        ))
        .send()
        .await?
        .json()
        .await?;
    let http = checks
        .as_array()
        .and_then(|a| a.iter().find(|c| c["CheckID"] == "web-http"))
        .context("web-http")?;
    assert!(
        http["Output"].as_str().unwrap_or_default().contains("200"),
        "{http}"
    );
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_checks_expire_and_critical_instances_are_deregistered() -> Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    register(
        &cluster,
        2,
        json!({"Name": "job", "ID": "job-1", "Check": {"TTL": "2s"}}),
    )
    .await?;
    let pass = cluster
        .http
        .put(format!(
            "{}/v1/agent/check/pass/service:job-1?note=alive",
            cluster.servers[2].http()
        ))
        .send()
        .await?;
    ensure!(pass.status() == 200, "pass answered {}", pass.status());
    wait_status(
        &cluster,
        0,
        "job",
        "service:job-1",
        "passing",
        Duration::from_secs(5),
    )
    .await?;
    // Kept alive by updates…
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let resp = cluster
            .http
            .put(format!(
                "{}/v1/agent/check/pass/service:job-1",
                cluster.servers[2].http()
            ))
            .send()
            .await?;
        ensure!(resp.status() == 200);
    }
    assert_eq!(
        check_status(&cluster, 0, "job", "service:job-1")
            .await
            .as_deref(),
        Some("passing")
    );
    // …and critical once they stop.
    wait_status(
        &cluster,
        1,
        "job",
        "service:job-1",
        "critical",
        Duration::from_secs(10),
    )
    .await?;

    // An instance that stays critical is removed after its deadline.
    register(
        &cluster,
        0,
        json!({"Name": "flaky", "ID": "flaky-1", "Check": {
            "TCP": "127.0.0.1:1", "Interval": "300ms", "Timeout": "500ms",
            "DeregisterCriticalServiceAfter": "2s"
        }}),
    )
    .await?;
    wait_for(
        "flaky-1 to be deregistered",
        Duration::from_secs(20),
        || async {
            let url = format!("{}/v1/catalog/service/flaky", cluster.servers[1].http());
            let list: Value = cluster.http.get(url).send().await.ok()?.json().await.ok()?;
            (list.as_array()?.is_empty()).then_some(())
        },
    )
    .await?;
    // The TTL'd job is still registered: it has no deregistration deadline.
    let list: Value = cluster
        .http
        .get(format!(
            "{}/v1/catalog/service/job",
            cluster.servers[1].http()
        ))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_catalog_bad_input_gets_consul_status_codes() -> Result<()> {
    let cluster = Cluster::start_in_process(1, &[]).await?;
    let base = cluster.servers[0].http();
    let http = &cluster.http;
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            http.put(format!("{base}/v1/agent/service/register"))
                .body("{nope"),
            400,
            "Request decode failed",
        ),
        (
            http.put(format!("{base}/v1/agent/service/register"))
                .body(r#"{"Name":"a","Port":65536}"#),
            400,
            "65535",
        ),
        (
            http.put(format!("{base}/v1/agent/service/register"))
                .body(r#"{"Name":"a","Port":-5}"#),
            400,
            "65535",
        ),
        (
            http.put(format!("{base}/v1/agent/service/register"))
                .body(r#"{"Name":"a","Tags":[1]}"#),
            400,
            "list of strings",
        ),
        (
            http.put(format!("{base}/v1/agent/service/register"))
                .body(r#"{"Name":"a","Check":{"Args":["/bin/true"],"Interval":"1s"}}"#),
            400,
            "script checks",
        ),
        (
            http.put(format!("{base}/v1/agent/service/deregister/ghost")),
            404,
            "Unknown service ID",
        ),
        // Scopes and filters Meshwork does not have are refused, never
        // ignored (the answer would be to another question).
        (
            http.get(format!("{base}/v1/catalog/services?dc=dc2")),
            400,
            "No path to datacenter \"dc2\"",
        ),
        (
            http.get(format!(
                "{base}/v1/health/service/web?filter=Service.Port%3D%3D80"
            )),
            400,
            "?filter is not supported",
        ),
        (
            http.get(format!("{base}/v1/catalog/nodes?node-meta=rack:r1")),
            400,
            "?node-meta is not supported",
        ),
        (
            http.get(format!("{base}/v1/kv/x?ns=team-a")),
            400,
            "Consul Enterprise",
        ),
        (
            http.get(format!("{base}/v1/catalog/services?dc=dc1&ns=default")),
            200,
            "{",
        ),
        (
            http.put(format!("{base}/v1/agent/check/pass/ghost")),
            404,
            "Unknown check ID",
        ),
        (
            http.put(format!("{base}/v1/agent/check/update/ghost"))
                .body(r#"{"Status":"passing"}"#),
            404,
            "Unknown check ID",
        ),
        (
            http.put(format!("{base}/v1/agent/check/deregister/ghost")),
            404,
            "Unknown check ID",
        ),
        (
            http.put(format!("{base}/v1/agent/check/register"))
                .body(r#"{"TTL":"5s"}"#),
            400,
            "Missing check name",
        ),
        (
            http.put(format!("{base}/v1/agent/check/register"))
                .body(r#"{"Name":"c","TTL":"5s","ServiceID":"ghost"}"#),
            404,
            "Unknown service ID",
        ),
        (
            http.put(format!(
                "{base}/v1/agent/service/maintenance/ghost?enable=true"
            )),
            404,
            "Unknown service ID",
        ),
        (
            http.put(format!("{base}/v1/catalog/register"))
                .body(r#"{"Address":"1.2.3.4"}"#),
            400,
            "Must provide node",
        ),
        (
            http.put(format!("{base}/v1/catalog/register"))
                .body(r#"{"Node":"n"}"#),
            400,
            "Must provide address",
        ),
        (
            http.put(format!("{base}/v1/catalog/deregister"))
                .body(r#"{}"#),
            400,
            "Must provide node",
        ),
        (
            http.get(format!("{base}/v1/health/state/sick")),
            400,
            "Invalid check state",
        ),
        (
            http.put(format!("{base}/v1/agent/service/register"))
                .body(r#"{"Name":"a","Kind":"sidecar"}"#),
            400,
            "Invalid service kind",
        ),
    ];
    for (request, want_status, want_text) in cases {
        let request = request.build()?;
        let what = format!("{} {}", request.method(), request.url());
        let resp = http.execute(request).await?;
        let status = resp.status().as_u16();
        let body = resp.text().await?;
        assert_eq!(status, want_status, "{what}: {body}");
        assert!(
            body.contains(want_text),
            "{what}: {body:?} lacks {want_text:?}"
        );
    }
    // A TTL update on a non-TTL check is refused.
    register(
        &cluster,
        0,
        json!({"Name": "w", "Check": {"TCP": "127.0.0.1:1", "Interval": "10s"}}),
    )
    .await?;
    let resp = http
        .put(format!("{base}/v1/agent/check/pass/service:w"))
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    // Maintenance mode adds and removes a critical check.
    let resp = http
        .put(format!(
            "{base}/v1/agent/service/maintenance/w?enable=true&reason=upgrade"
        ))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let checks: Value = http
        .get(format!("{base}/v1/agent/checks"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(checks["_service_maintenance:w"]["Notes"], "upgrade");
    let resp = http
        .put(format!(
            "{base}/v1/agent/service/maintenance/w?enable=false"
        ))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let checks: Value = http
        .get(format!("{base}/v1/agent/checks"))
        .send()
        .await?
        .json()
        .await?;
    assert!(checks.get("_service_maintenance:w").is_none());
    cluster.done();
    Ok(())
}

/// A service's `Kind` is kept and shown as Consul shows it: `ServiceKind`
/// in the catalog, `Kind` in health answers (empty for a typical service)
/// and in the agent's list (left out for a typical service).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_kind_is_kept_and_shown_where_consul_shows_it() -> Result<()> {
    let cluster = Cluster::start_in_process(1, &[]).await?;
    let base = cluster.servers[0].http();
    let http = &cluster.http;
    register(
        &cluster,
        0,
        json!({"Name": "edge", "Kind": "ingress-gateway", "Port": 8443}),
    )
    .await?;
    register(
        &cluster,
        0,
        json!({"Name": "web", "Kind": "typical", "Port": 80}),
    )
    .await?;
    let catalog: Value = http
        .get(format!("{base}/v1/catalog/service/edge"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(catalog[0]["ServiceKind"], "ingress-gateway", "{catalog}");
    let health: Value = http
        .get(format!("{base}/v1/health/service/edge"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(health[0]["Service"]["Kind"], "ingress-gateway", "{health}");
    let web: Value = http
        .get(format!("{base}/v1/health/service/web"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(web[0]["Service"]["Kind"], "", "{web}");
    let agent: Value = http
        .get(format!("{base}/v1/agent/services"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(agent["edge"]["Kind"], "ingress-gateway", "{agent}");
    assert!(agent["web"].get("Kind").is_none(), "{agent}");
    cluster.done();
    Ok(())
}
