//! Sidecars follow the discovery chain from the registry (issue 24): web's
//! sidecar calls `api`, whose instances are v1 ×2 and v2 ×1 (meta
//! `version`), and one `PUT /v1/config` at a time changes where its
//! requests go — resolver subsets, a 90/10 split, router matches on a
//! header and a path prefix (with a rewrite, to another service), and the
//! resolver's failover when every v2 instance is gone. Real binaries: one
//! registry server, four server sidecars, one client sidecar.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshwork_tests::http::http_client;
use meshwork_tests::sidecar::{Mesh, UPSTREAM_PORT};
use meshwork_tests::wait_for;
use serde_json::{Value, json};

/// The client sidecar on `client_ip` with an HTTP upstream `api`, ready
/// and knowing `endpoints` of api's instances.
async fn api_client(mesh: &mut Mesh, client_ip: &str, endpoints: usize) -> Result<usize> {
    let c = mesh
        .client_sidecar(client_ip, "name = \"api\"\nprotocol = \"http\"")
        .await?;
    mesh.sidecars[c].wait_endpoints(endpoints).await?;
    mesh.sidecars[c].wait_ready().await?;
    Ok(c)
}

async fn put_entry(mesh: &Mesh, entry: &Value) -> Result<()> {
    let url = format!("{}/v1/config", mesh.cluster().servers[0].http());
    let r = http_client()?.put(url).json(entry).send().await?;
    let status = r.status();
    let text = r.text().await?;
    ensure!(
        status == 200 && text == "true",
        "PUT {entry}: {status} {text}"
    );
    Ok(())
}

/// The client sidecar applies config entries up to `index` or later.
async fn applied(mesh: &Mesh, c: usize, at_least: u64) -> Result<()> {
    wait_for("the chain applied", Duration::from_secs(10), || async {
        let config = mesh.sidecars[c].json("/config").await.ok()?;
        let chain = config["chains"].get(0)?;
        (chain["index"].as_u64()? >= at_least && chain["loaded"] == true).then_some(())
    })
    .await
}

async fn entry_index(mesh: &Mesh, path: &str) -> Result<u64> {
    let url = format!("{}/v1/config/{path}", mesh.cluster().servers[0].http());
    let r: Value = http_client()?.get(url).send().await?.json().await?;
    r["ModifyIndex"].as_u64().context("ModifyIndex")
}

/// Sends `n` GETs to `path` (with `headers`) through the client sidecar;
/// counts the answering instance (the body's first word).
async fn spread(
    client_ip: &str,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> Result<HashMap<String, usize>> {
    let http = http_client()?;
    let mut seen = HashMap::new();
    for _ in 0..n {
        let mut request = http.get(format!("http://{client_ip}:{UPSTREAM_PORT}{path}"));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let r = request.send().await?;
        ensure!(r.status() == 200, "{path}: {}", r.status());
        let body = r.text().await?;
        let who = body.split_whitespace().next().unwrap_or("").to_owned();
        *seen.entry(who).or_default() += 1;
    }
    Ok(seen)
}

fn count(seen: &HashMap<String, usize>, prefix: &str) -> usize {
    seen.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, n)| n)
        .sum()
}

#[tokio::test]
async fn routes_splits_subsets_and_failover_apply_live_from_the_registry() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    mesh.versioned_instance((20, 0), ("api", "api-v1-a", "v1"))
        .await?;
    mesh.versioned_instance((21, 0), ("api", "api-v1-b", "v1"))
        .await?;
    let v2 = mesh
        .versioned_instance((22, 0), ("api", "api-v2-a", "v2"))
        .await?;
    mesh.versioned_instance((23, 0), ("admin", "admin-a", "v1"))
        .await?;
    let client_ip = mesh.ip(100);
    let c = api_client(&mut mesh, &client_ip, 3).await?;

    // No entries: all three instances share the traffic.
    let seen = spread(&client_ip, "/", &[], 60).await?;
    ensure!(
        count(&seen, "api-v2") > 0 && count(&seen, "api-v1") > 0,
        "{seen:?}"
    );

    // A resolver whose default subset is v1: only v1 answers.
    put_entry(
        &mesh,
        &json!({
            "Kind": "service-resolver", "Name": "api",
            "DefaultSubset": "v1",
            "Subsets": {
                "v1": {"Filter": "Service.Meta.version == v1"},
                "v2": {"Filter": "Service.Meta.version == v2"}
            },
            "Failover": {"v2": {"ServiceSubset": "v1"}}
        }),
    )
    .await?;
    applied(&mesh, c, entry_index(&mesh, "service-resolver/api").await?).await?;
    let seen = spread(&client_ip, "/", &[], 40).await?;
    ensure!(count(&seen, "api-v1") == 40, "default subset v1: {seen:?}");

    // A 90/10 split between the subsets, over 2,000 requests.
    put_entry(
        &mesh,
        &json!({
            "Kind": "service-splitter", "Name": "api",
            "Splits": [
                {"Weight": 90, "ServiceSubset": "v1"},
                {"Weight": 10, "ServiceSubset": "v2", "ResponseHeaders": {"Set": {"x-split": "v2"}}}
            ]
        }),
    )
    .await?;
    applied(&mesh, c, entry_index(&mesh, "service-splitter/api").await?).await?;
    let seen = spread(&client_ip, "/", &[], 2_000).await?;
    let share = count(&seen, "api-v2") as f64 / 2_000.0;
    ensure!(
        (0.07..=0.13).contains(&share),
        "v2's share {share} of 2,000 (want 10 % ± 3): {seen:?}"
    );
    ensure!(
        count(&seen, "api-v1") + count(&seen, "api-v2") == 2_000,
        "{seen:?}"
    );
    // Each target is a cluster of its own, in /metrics and /clusters.
    let served = |target: &str| {
        format!(
            "meshwork_proxy_requests_total{{direction=\"outbound\",upstream=\"api\",target=\"{target}\",route=\"default\",class=\"2xx\""
        )
    };
    for (target, prefix) in [("v2.api", "api-v2"), ("v1.api", "api-v1")] {
        let counted = mesh.sidecars[c].metric_sum(&served(target)).await?;
        ensure!(
            counted as usize == count(&seen, prefix),
            "/metrics counts {counted} for {target}, {} seen: {seen:?}",
            count(&seen, prefix)
        );
    }
    let clusters = mesh.sidecars[c].json("/clusters").await?;
    let v2_cluster = clusters["clusters"]
        .as_array()
        .context("clusters")?
        .iter()
        .find(|c| c["target"] == "v2.api")
        .context("the v2.api target's cluster in /clusters")?;
    ensure!(
        v2_cluster["upstream"] == "api"
            && v2_cluster["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == 1),
        "{v2_cluster}"
    );

    // A router: `x-canary: 1` always to v2; `/admin` to the admin service
    // with the prefix rewritten to `/`.
    put_entry(
        &mesh,
        &json!({
            "Kind": "service-router", "Name": "api",
            "Routes": [
                {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}},
                 "Destination": {"ServiceSubset": "v2"}},
                {"Match": {"HTTP": {"PathPrefix": "/admin"}},
                 "Destination": {"Service": "admin", "PrefixRewrite": "/"}},
                {"Match": {"HTTP": {"PathPrefix": "/faulty"}},
                 "Destination": {"ServiceSubset": "v1",
                                 "Fault": {"Abort": {"Percent": 50, "HTTPStatus": 503}}}}
            ]
        }),
    )
    .await?;
    applied(&mesh, c, entry_index(&mesh, "service-router/api").await?).await?;
    let seen = spread(&client_ip, "/", &[("x-canary", "1")], 50).await?;
    ensure!(count(&seen, "api-v2") == 50, "x-canary: {seen:?}");
    let http = http_client()?;
    let r = http
        .get(format!(
            "http://{client_ip}:{UPSTREAM_PORT}/admin/users?x=1"
        ))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let path = r
        .headers()
        .get("x-seen-path")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = r.text().await?;
    ensure!(body.starts_with("admin-a"), "/admin went to {body}");
    ensure!(
        path == "/users?x=1" || path == "/users",
        "the admin app saw {path:?}"
    );
    // The split's response header, on the default route's v2 share.
    let mut marked = false;
    for _ in 0..200 {
        let r = http
            .get(format!("http://{client_ip}:{UPSTREAM_PORT}/"))
            .send()
            .await?;
        let header = r.headers().get("x-split").is_some();
        let body = r.text().await?;
        ensure!(header == body.starts_with("api-v2"), "x-split on {body}");
        marked |= header;
        if marked {
            break;
        }
    }
    ensure!(marked, "no v2 answer in 200 requests");

    // Fault injection: the /faulty route aborts half its requests (503,
    // marked), and a service-defaults entry delays a tenth of the calls
    // to admin by 200 ms (marked; the route's fault would win over it).
    let (mut aborted, mut passed) = (0, 0);
    for _ in 0..400 {
        let r = http
            .get(format!("http://{client_ip}:{UPSTREAM_PORT}/faulty"))
            .send()
            .await?;
        let marked = r
            .headers()
            .get("x-meshwork-fault")
            .map(|v| v.as_bytes().to_vec());
        match r.status().as_u16() {
            503 => {
                ensure!(
                    marked.as_deref() == Some(&b"abort"[..]),
                    "an abort unmarked: {marked:?}"
                );
                aborted += 1;
            }
            200 => {
                ensure!(marked.is_none(), "a request served marked {marked:?}");
                passed += 1;
            }
            other => anyhow::bail!("/faulty: {other}"),
        }
    }
    // 400 draws at 50 %: 200 ± 5 standard deviations (10 each).
    ensure!(
        (150..=250).contains(&aborted),
        "{aborted} of 400 aborted ({passed} passed)"
    );
    let counted = mesh.sidecars[c]
        .metric_sum("meshwork_sidecar_faults_injected_total{kind=\"abort\"")
        .await?;
    ensure!(
        counted as usize == aborted,
        "/metrics counts {counted} aborts, {aborted} seen"
    );
    put_entry(
        &mesh,
        &json!({"Kind": "service-defaults", "Name": "admin", "Protocol": "http",
                "Fault": {"Delay": {"Percent": 10, "Duration": "200ms"}}}),
    )
    .await?;
    applied(
        &mesh,
        c,
        entry_index(&mesh, "service-defaults/admin").await?,
    )
    .await?;
    let mut delayed = 0;
    for _ in 0..200 {
        let sent = std::time::Instant::now();
        let r = http
            .get(format!("http://{client_ip}:{UPSTREAM_PORT}/admin/x"))
            .send()
            .await?;
        let took = sent.elapsed();
        ensure!(r.status() == 200, "{}", r.status());
        if r.headers()
            .get("x-meshwork-fault")
            .is_some_and(|v| v == "delay")
        {
            ensure!(
                took >= Duration::from_millis(200),
                "a delayed request took {took:?}"
            );
            delayed += 1;
        }
    }
    // 200 draws at 10 %: 20 ± 5 standard deviations (4.2 each).
    ensure!((1..=42).contains(&delayed), "{delayed} of 200 delayed");

    // Every v2 instance gone: the canary route fails over to v1.
    mesh.sidecars[v2].kill().await?;
    wait_for(
        "v2 gone, canary served by v1",
        Duration::from_secs(15),
        || async {
            let seen = spread(&client_ip, "/", &[("x-canary", "1")], 5)
                .await
                .ok()?;
            (count(&seen, "api-v1") == 5).then_some(())
        },
    )
    .await?;
    let config = mesh.sidecars[c].json("/config").await?;
    let targets = config["chains"][0]["targets"].clone();
    let listed = targets.to_string();
    ensure!(
        listed.contains("v2.api") && listed.contains("v1.api"),
        "{listed}"
    );
    let index = config["chains"][0]["index"].as_u64().context("index")?;

    // The registry goes away: the sidecar keeps routing with the chain it
    // has (static stability). It comes back from its data dir with every
    // entry: the sidecar re-syncs to the same chain, nothing lost.
    if let Some(cluster) = mesh.cluster.as_mut() {
        cluster.servers[0].kill().await?;
    }
    let seen = spread(&client_ip, "/admin/x", &[], 10).await?;
    ensure!(
        count(&seen, "admin-a") == 10,
        "registry down, /admin: {seen:?}"
    );
    let seen = spread(&client_ip, "/", &[("x-canary", "1")], 10).await?;
    ensure!(
        count(&seen, "api-v1") == 10,
        "registry down, canary: {seen:?}"
    );
    if let Some(cluster) = mesh.cluster.as_mut() {
        cluster.servers[0].start(&[])?;
    }
    wait_for("the registry back", Duration::from_secs(20), || async {
        let url = format!(
            "{}/v1/config/service-router/api",
            mesh.cluster().servers[0].http()
        );
        let r = http_client().ok()?.get(url).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await?;
    applied(&mesh, c, index).await?;
    let config = mesh.sidecars[c].json("/config").await?;
    ensure!(
        config["chains"][0]["targets"] == targets,
        "after the registry's restart: {}",
        config["chains"][0]
    );
    let seen = spread(&client_ip, "/admin/x", &[], 5).await?;
    ensure!(
        count(&seen, "admin-a") == 5,
        "after the restart, /admin: {seen:?}"
    );
    // And the sidecar follows the restarted registry: the router deleted,
    // /admin goes to api like any path (v2 is dead: its share fails over).
    let url = format!(
        "{}/v1/config/service-router/api",
        mesh.cluster().servers[0].http()
    );
    let r = http_client()?.delete(url).send().await?;
    ensure!(r.status() == 200, "DELETE: {}", r.status());
    wait_for("the router gone", Duration::from_secs(20), || async {
        let seen = spread(&client_ip, "/admin/x", &[], 5).await.ok()?;
        (count(&seen, "api-v1") == 5).then_some(())
    })
    .await?;
    mesh.done();
    Ok(())
}

/// `service-defaults` `RateLimits`, enforced in the destination's sidecar:
/// over the instance's rate (and a route's own), requests get 429 with
/// `retry-after` and never reach the app; the count is in `/metrics`.
#[tokio::test]
async fn rate_limits_from_service_defaults_apply_in_the_destination_sidecar() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let api = mesh
        .versioned_instance((20, 0), ("api", "api-1", "v1"))
        .await?;
    let client_ip = mesh.ip(100);
    api_client(&mut mesh, &client_ip, 1).await?;
    put_entry(
        &mesh,
        &json!({"Kind": "service-defaults", "Name": "api", "Protocol": "http",
        "RateLimits": {"InstanceLevel": {
            "RequestsPerSecond": 20, "RequestsMaxBurst": 20,
            "Routes": [{"PathPrefix": "/search", "RequestsPerSecond": 2, "RequestsMaxBurst": 2}]
        }}}),
    )
    .await?;
    let http = http_client()?;
    // Applied once the sidecar refuses something: until then, nothing is
    // limited (bounded: 10 s).
    wait_for("the limits applied", Duration::from_secs(10), || async {
        for _ in 0..30 {
            let r = http
                .get(format!("http://{client_ip}:{UPSTREAM_PORT}/search"))
                .send()
                .await
                .ok()?;
            if r.status() == 429 {
                return Some(());
            }
        }
        None
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1_100)).await; // the buckets refill
    let started = std::time::Instant::now();
    let (mut ok, mut limited) = (0u32, 0u32);
    for _ in 0..200 {
        let r = http
            .get(format!("http://{client_ip}:{UPSTREAM_PORT}/"))
            .send()
            .await?;
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                let retry = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                ensure!(retry == "1", "retry-after {retry:?}");
                let why = r
                    .headers()
                    .get("x-meshwork-error")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                ensure!(why == "rate-limited", "x-meshwork-error {why:?}");
                limited += 1;
            }
            other => anyhow::bail!("status {other}"),
        }
    }
    let took = started.elapsed().as_secs_f64();
    // The burst, plus 20 a second while it ran (a margin of two).
    let most = 20.0 + 20.0 * took + 2.0;
    ensure!(
        f64::from(ok) <= most && ok >= 20 && limited > 0,
        "{ok} passed and {limited} limited in {took:.2} s (at most {most:.0} may pass)"
    );
    // The route's own bucket: 2 a second.
    let started = std::time::Instant::now();
    let mut search_ok = 0u32;
    for _ in 0..20 {
        let r = http
            .get(format!("http://{client_ip}:{UPSTREAM_PORT}/search"))
            .send()
            .await?;
        search_ok += u32::from(r.status() == 200);
    }
    let most = 2.0 + 2.0 * started.elapsed().as_secs_f64() + 1.0;
    ensure!(
        f64::from(search_ok) <= most,
        "{search_ok} /search requests passed"
    );
    let counted = mesh.sidecars[api]
        .metric_sum("meshwork_sidecar_rate_limited_total")
        .await?;
    ensure!(
        counted >= f64::from(limited),
        "/metrics counts {counted}, {limited} seen"
    );
    mesh.done();
    Ok(())
}

/// Sends GETs to `/` through the client sidecar as fast as they come back
/// for `window`; (answered 200, answered 429).
async fn drive(client_ip: &str, window: Duration) -> Result<(u32, u32)> {
    let http = http_client()?;
    let started = std::time::Instant::now();
    let (mut ok, mut limited) = (0u32, 0u32);
    // Bounded: at most 200,000 requests, however fast they come back.
    for _ in 0..200_000 {
        if started.elapsed() >= window {
            break;
        }
        let r = http
            .get(format!("http://{client_ip}:{UPSTREAM_PORT}/"))
            .send()
            .await?;
        match r.status().as_u16() {
            200 => ok += 1,
            429 => limited += 1,
            other => anyhow::bail!("status {other}"),
        }
    }
    Ok((ok, limited))
}

/// A sidecar's quota share (`meshwork_sidecar_quota_share_rps`).
async fn share(mesh: &Mesh, i: usize) -> Result<f64> {
    mesh.sidecars[i]
        .metric_sum("meshwork_sidecar_quota_share_rps")
        .await
}

/// Meshwork's cluster-wide quota (`RateLimits.ServiceLevel`): 30 requests
/// a second across api's three instances, shared out by the registry in
/// proportion to the traffic each sees — evenly while the client spreads
/// its calls, then almost all to the one instance left in the resolver's
/// default subset, so the service still takes about 30 a second, not a
/// third of it.
#[tokio::test]
async fn a_cluster_wide_quota_is_shared_out_by_traffic() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let a = mesh
        .versioned_instance((20, 0), ("api", "api-v1-a", "v1"))
        .await?;
    let b = mesh
        .versioned_instance((21, 0), ("api", "api-v1-b", "v1"))
        .await?;
    let v2 = mesh
        .versioned_instance((22, 0), ("api", "api-v2-a", "v2"))
        .await?;
    let client_ip = mesh.ip(100);
    let c = api_client(&mut mesh, &client_ip, 3).await?;
    put_entry(
        &mesh,
        &json!({"Kind": "service-defaults", "Name": "api", "Protocol": "http",
                "RateLimits": {"ServiceLevel": {"RequestsPerSecond": 30}}}),
    )
    .await?;
    wait_for(
        "every instance enforcing a share",
        Duration::from_secs(10),
        || async {
            for i in [a, b, v2] {
                if share(&mesh, i).await.ok()? <= 0.0 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await?;

    // Spread over three: a third each, about 30 a second in all.
    drive(&client_ip, Duration::from_secs(3)).await?; // two reports to settle
    let window = Duration::from_secs(4);
    let (ok, limited) = drive(&client_ip, window).await?;
    let rate = f64::from(ok) / window.as_secs_f64();
    let shares = [
        share(&mesh, a).await?,
        share(&mesh, b).await?,
        share(&mesh, v2).await?,
    ];
    println!("spread: {rate:.1}/s admitted, {limited} limited, shares {shares:?}");
    ensure!(limited > 0, "the load exceeds the quota");
    ensure!(
        (20.0..=42.0).contains(&rate),
        "{rate:.1} a second admitted across the three (quota 30; shares {shares:?})"
    );
    ensure!(
        shares.iter().all(|s| (5.0..=15.0).contains(s)),
        "even traffic, even shares: {shares:?}"
    );

    // All traffic to v2: its share grows to most of the quota.
    put_entry(
        &mesh,
        &json!({"Kind": "service-resolver", "Name": "api", "DefaultSubset": "v2",
                "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                            "v2": {"Filter": "Service.Meta.version == v2"}}}),
    )
    .await?;
    applied(&mesh, c, entry_index(&mesh, "service-resolver/api").await?).await?;
    drive(&client_ip, Duration::from_secs(4)).await?;
    let (ok, limited) = drive(&client_ip, window).await?;
    let rate = f64::from(ok) / window.as_secs_f64();
    let shares = [
        share(&mesh, a).await?,
        share(&mesh, b).await?,
        share(&mesh, v2).await?,
    ];
    println!("one instance: {rate:.1}/s admitted, {limited} limited, shares {shares:?}");
    ensure!(
        (20.0..=42.0).contains(&rate),
        "{rate:.1} a second admitted by v2 alone (quota 30, not a third of it; shares {shares:?})"
    );
    ensure!(
        shares[2] >= 25.0 && shares[0] < 5.0 && shares[1] < 5.0,
        "the busy instance holds most of the quota: {shares:?}"
    );
    mesh.done();
    Ok(())
}

/// The client sidecar's `/config` entry for its upstream `name`.
async fn upstream_config(mesh: &Mesh, c: usize, name: &str) -> Option<Value> {
    let config = mesh.sidecars[c].json("/config").await.ok()?;
    config["upstreams"]
        .as_array()?
        .iter()
        .map(|u| u["upstream"].clone())
        .find(|u| u["name"] == name)
}

/// Consul's `service-defaults` `UpstreamConfig` (of the caller), the
/// upstream's own `Protocol` and `proxy-defaults`, applied by the caller's
/// sidecar under its file: what the file gives wins, the rest follows the
/// registry live, and `/config` says where each setting came from.
#[tokio::test]
async fn upstream_defaults_from_the_registry_apply_under_the_file() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    let api = mesh
        .versioned_instance((20, 0), ("api", "api-1", "v1"))
        .await?;
    let client_ip = mesh.ip(100);
    // No protocol in the file (tcp by default), its own connect timeout.
    let c = mesh
        .client_sidecar(&client_ip, "name = \"api\"\nconnect_timeout = \"3s\"")
        .await?;
    mesh.sidecars[c].wait_endpoints(1).await?;
    let before = upstream_config(&mesh, c, "api")
        .await
        .context("api upstream")?;
    ensure!(before["protocol"] == "tcp", "{before}");

    // A bad UpstreamConfig is refused at PUT, naming the field.
    let url = format!("{}/v1/config", mesh.cluster().servers[0].http());
    let r = http_client()?
        .put(&url)
        .json(&json!({"Kind": "service-defaults", "Name": "client",
            "UpstreamConfig": {"Defaults": {"Limits": {"MaxConnections": "many"}}}}))
        .send()
        .await?;
    let status = r.status();
    let text = r.text().await?;
    ensure!(
        status == 400 && text.contains("Limits.MaxConnections"),
        "{status} {text}"
    );

    put_entry(
        &mesh,
        &json!({"Kind": "service-defaults", "Name": "api", "Protocol": "http"}),
    )
    .await?;
    put_entry(
        &mesh,
        &json!({"Kind": "service-defaults", "Name": "client", "UpstreamConfig": {
            "Defaults": {"ConnectTimeoutMs": 250, "Limits": {"MaxConnections": 64}},
            "Overrides": [{"Name": "api", "Limits": {"MaxConcurrentRequests": 7},
                           "PassiveHealthCheck": {"MaxFailures": 9, "BaseEjectionTime": "12s"}}]}}),
    )
    .await?;
    let after = wait_for(
        "the registry's defaults applied",
        Duration::from_secs(10),
        || async {
            let u = upstream_config(&mesh, c, "api").await?;
            (u["limits"]["max_requests"] == 7 && u["protocol"] == "http").then_some(u)
        },
    )
    .await?;
    ensure!(
        after["connect_timeout"] == 3000,
        "the file's connect timeout wins: {after}"
    );
    ensure!(after["limits"]["max_connections"] == 64, "{after}");
    ensure!(after["outlier"]["consecutive_5xx"] == 9, "{after}");
    ensure!(after["outlier"]["base_ejection"] == 12_000, "{after}");
    let sources = &after["from_registry"];
    ensure!(
        sources["protocol"]
            .as_str()
            .is_some_and(|s| s.contains("service-defaults \"api\""))
            && sources["limits.max_requests"]
                .as_str()
                .is_some_and(|s| s.contains("Overrides[0]"))
            && sources.get("connect_timeout").is_none(),
        "where each setting came from: {sources}"
    );
    // Proxied as HTTP now.
    let r = http_client()?
        .get(format!("http://{client_ip}:{UPSTREAM_PORT}/"))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(
        r.text().await?.starts_with("api-1"),
        "the HTTP listener reaches api"
    );

    // The destination's own settings for its inbound listener: api's
    // sidecar gives its app 300 ms per request and 50 client connections.
    put_entry(
        &mesh,
        &json!({"Kind": "service-defaults", "Name": "api", "Protocol": "http",
                "LocalRequestTimeoutMs": 300, "LocalConnectTimeoutMs": 800,
                "MaxInboundConnections": 50}),
    )
    .await?;
    let inbound = wait_for(
        "api's inbound settings applied",
        Duration::from_secs(10),
        || async {
            let config = mesh.sidecars[api].json("/config").await.ok()?;
            let inbound = config["inbound"].clone();
            (inbound["request_timeout"] == 300).then_some(inbound)
        },
    )
    .await?;
    ensure!(
        inbound["connect_timeout"] == 800
            && inbound["max_connections"] == 50
            && inbound["from_registry"]["inbound.request_timeout"]
                .as_str()
                .is_some_and(|s| s.contains("LocalRequestTimeoutMs")),
        "{inbound}"
    );
    // The app's 2 s answer is cut by api's sidecar at 300 ms.
    let started = std::time::Instant::now();
    let r = http_client()?
        .get(format!("http://{client_ip}:{UPSTREAM_PORT}/slow"))
        .send()
        .await?;
    let took = started.elapsed();
    ensure!(
        r.status() == 504 && took < Duration::from_millis(1500),
        "a slow answer past LocalRequestTimeoutMs: {} after {took:?}",
        r.status()
    );

    // The caller's entry removed: back to the file's and built-in values.
    let url = format!(
        "{}/v1/config/service-defaults/client",
        mesh.cluster().servers[0].http()
    );
    let r = http_client()?.delete(url).send().await?;
    ensure!(r.status() == 200, "DELETE: {}", r.status());
    let reverted = wait_for("the defaults gone", Duration::from_secs(10), || async {
        let u = upstream_config(&mesh, c, "api").await?;
        (u["limits"]["max_requests"] == 1024).then_some(u)
    })
    .await?;
    ensure!(
        reverted["outlier"]["consecutive_5xx"] == 5 && reverted["protocol"] == "http",
        "{reverted}"
    );
    mesh.done();
    Ok(())
}

/// The instances answering `n` GETs of `path` with `headers`.
async fn answered_by(
    client_ip: &str,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> Result<std::collections::BTreeSet<String>> {
    Ok(spread(client_ip, path, headers, n)
        .await?
        .into_keys()
        .collect())
}

/// A resolver's `LoadBalancer` hash policies: a query parameter, and a
/// cookie the sidecar sets for a client that has none (`CookieConfig`
/// with a `TTL`), each keeping a client on one instance while different
/// clients spread over all three.
#[tokio::test]
async fn hash_policies_keep_a_client_on_one_instance() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    for (host, id) in [(20, "api-a"), (21, "api-b"), (22, "api-c")] {
        mesh.versioned_instance((host, 0), ("api", id, "v1"))
            .await?;
    }
    let client_ip = mesh.ip(100);
    let c = api_client(&mut mesh, &client_ip, 3).await?;
    put_entry(
        &mesh,
        &json!({"Kind": "service-resolver", "Name": "api", "LoadBalancer": {
            "Policy": "ring_hash",
            "HashPolicies": [
                {"Field": "cookie", "FieldValue": "sid", "CookieConfig": {"TTL": "1h", "Path": "/"}, "Terminal": true},
                {"Field": "query_parameter", "FieldValue": "user"}
            ]}}),
    )
    .await?;
    applied(&mesh, c, entry_index(&mesh, "service-resolver/api").await?).await?;

    // No cookie: one is set, and requests carrying it stay on one instance.
    let r = http_client()?
        .get(format!("http://{client_ip}:{UPSTREAM_PORT}/"))
        .send()
        .await?;
    let set = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .context("a set-cookie for a client without one")?
        .to_owned();
    ensure!(
        set.starts_with("sid=") && set.contains("Max-Age=3600") && set.contains("HttpOnly"),
        "{set}"
    );
    let first = r.text().await?;
    let sid = set.split(';').next().context("cookie pair")?.to_owned();
    let seen = answered_by(&client_ip, "/", &[("cookie", &sid)], 20).await?;
    let who = first.split_whitespace().next().unwrap_or("").to_owned();
    ensure!(
        seen.len() == 1 && seen.contains(&who),
        "the cookie's instance {who} answers every time: {seen:?}"
    );
    let r = http_client()?
        .get(format!("http://{client_ip}:{UPSTREAM_PORT}/"))
        .header("cookie", &sid)
        .send()
        .await?;
    ensure!(
        r.headers().get("set-cookie").is_none(),
        "no new cookie once it has one"
    );

    // Different cookies spread over the instances.
    let mut all = std::collections::BTreeSet::new();
    for i in 0..40 {
        let cookie = format!("sid=client-{i}");
        all.extend(answered_by(&client_ip, "/", &[("cookie", &cookie)], 1).await?);
    }
    ensure!(all.len() == 3, "40 clients over three instances: {all:?}");

    // A query parameter: one user, one instance; users spread.
    put_entry(
        &mesh,
        &json!({"Kind": "service-resolver", "Name": "api", "LoadBalancer": {
            "Policy": "maglev",
            "HashPolicies": [{"Field": "query_parameter", "FieldValue": "user"}]}}),
    )
    .await?;
    applied(&mesh, c, entry_index(&mesh, "service-resolver/api").await?).await?;
    let mut all = std::collections::BTreeSet::new();
    for i in 0..30 {
        let seen = answered_by(&client_ip, &format!("/?user=u{i}&x={i}"), &[], 5).await?;
        ensure!(seen.len() == 1, "user u{i}: {seen:?}");
        all.extend(seen);
    }
    ensure!(all.len() == 3, "30 users over three instances: {all:?}");
    mesh.done();
    Ok(())
}

/// `n` TCP connections through the client sidecar's upstream: each sends
/// a byte and half-closes; counts the answering instance (the reply's
/// first word).
async fn tcp_spread(client_ip: &str, n: usize) -> Result<HashMap<String, usize>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut seen = HashMap::new();
    for _ in 0..n {
        let mut stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(format!("{client_ip}:{UPSTREAM_PORT}")),
        )
        .await??;
        stream.write_all(b"x").await?;
        stream.shutdown().await?;
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut reply)).await??;
        let who = reply.split_whitespace().next().unwrap_or("").to_owned();
        *seen.entry(who).or_default() += 1;
    }
    Ok(seen)
}

/// A tcp upstream follows the service's resolver, as Consul applies it to
/// L4 upstreams: `DefaultSubset`, `Redirect` and `Failover`, chosen per
/// connection; a router for the service is refused for it (it needs
/// requests), reported in `/config`, the resolver kept.
#[tokio::test]
async fn a_tcp_upstream_follows_the_resolver() -> Result<()> {
    let mut mesh = Mesh::start().await?;
    mesh.versioned_tcp_instance((20, 0), ("db", "db-1", "v1"))
        .await?;
    let v2 = mesh
        .versioned_tcp_instance((21, 0), ("db", "db-2", "v2"))
        .await?;
    mesh.versioned_tcp_instance((22, 0), ("db-replica", "replica-1", "v1"))
        .await?;
    let client_ip = mesh.ip(100);
    // No protocol: tcp.
    let c = mesh.client_sidecar(&client_ip, "name = \"db\"").await?;
    mesh.sidecars[c].wait_endpoints(2).await?;
    mesh.sidecars[c].wait_ready().await?;
    let seen = tcp_spread(&client_ip, 20).await?;
    ensure!(
        count(&seen, "db-1") > 0 && count(&seen, "db-2") > 0,
        "no entry: both instances: {seen:?}"
    );

    // The default subset: v2 only.
    put_entry(
        &mesh,
        &json!({"Kind": "service-resolver", "Name": "db", "DefaultSubset": "v2",
            "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                        "v2": {"Filter": "Service.Meta.version == v2"}},
            "Failover": {"v2": {"Service": "db-replica"}}}),
    )
    .await?;
    applied(&mesh, c, entry_index(&mesh, "service-resolver/db").await?).await?;
    let seen = tcp_spread(&client_ip, 20).await?;
    ensure!(count(&seen, "db-2") == 20, "DefaultSubset v2: {seen:?}");

    // A router for db: refused for this tcp upstream, the resolver kept.
    put_entry(
        &mesh,
        &json!({"Kind": "service-router", "Name": "db",
            "Routes": [{"Match": {"HTTP": {"PathPrefix": "/admin"}},
                        "Destination": {"ServiceSubset": "v1"}}]}),
    )
    .await?;
    let refused = wait_for("the router refused", Duration::from_secs(10), || async {
        let config = mesh.sidecars[c].json("/config").await.ok()?;
        let why = config["chains"][0]["refused"].as_str()?.to_owned();
        Some(why)
    })
    .await?;
    ensure!(
        refused.contains("service-router \"db\"") && refused.contains("tcp"),
        "{refused}"
    );
    let seen = tcp_spread(&client_ip, 10).await?;
    ensure!(count(&seen, "db-2") == 10, "the resolver kept: {seen:?}");
    let url = format!(
        "{}/v1/config/service-router/db",
        mesh.cluster().servers[0].http()
    );
    let r = http_client()?.delete(url).send().await?;
    ensure!(r.status() == 200, "DELETE: {}", r.status());

    // v2 gone: its connections fail over to db-replica.
    mesh.sidecars[v2].kill().await?;
    wait_for(
        "v2 gone, db-replica answering",
        Duration::from_secs(15),
        || async {
            let seen = tcp_spread(&client_ip, 5).await.ok()?;
            (count(&seen, "replica-1") == 5).then_some(())
        },
    )
    .await?;

    // A redirect: every connection to db goes to db-replica.
    put_entry(
        &mesh,
        &json!({"Kind": "service-resolver", "Name": "db",
            "Redirect": {"Service": "db-replica"}}),
    )
    .await?;
    applied(&mesh, c, entry_index(&mesh, "service-resolver/db").await?).await?;
    let seen = tcp_spread(&client_ip, 10).await?;
    ensure!(count(&seen, "replica-1") == 10, "Redirect: {seen:?}");

    // A reload of the client's proxy (proxy-defaults changes its connect
    // timeout; the chain itself is unchanged) keeps following the
    // redirect's service: an instance of it that arrives afterwards gets
    // connections.
    put_entry(
        &mesh,
        &json!({"Kind": "proxy-defaults", "Name": "global",
            "Config": {"connect_timeout_ms": 4000}}),
    )
    .await?;
    wait_for("the reload", Duration::from_secs(10), || async {
        let u = upstream_config(&mesh, c, "db").await?;
        (u["connect_timeout"] == 4000).then_some(())
    })
    .await?;
    mesh.versioned_tcp_instance((23, 0), ("db-replica", "replica-2", "v1"))
        .await?;
    wait_for(
        "the new db-replica instance reached",
        Duration::from_secs(10),
        || async {
            let seen = tcp_spread(&client_ip, 10).await.ok()?;
            (count(&seen, "replica-2") > 0).then_some(())
        },
    )
    .await?;
    let metrics = mesh.sidecars[c].metrics().await?;
    ensure!(
        metrics.contains("target=\"db-replica\""),
        "per-target series for the tcp upstream"
    );
    mesh.done();
    Ok(())
}
