//! The shipped dashboards and alert rules (issue 26), against a real
//! Prometheus (Debian's) scraping a running registry and sidecars: the
//! rules pass `promtool check rules`, the example config `promtool check
//! config`; every PromQL expression of `deploy-vm/grafana/*.json` returns
//! data while traffic flows, and every alert rule loads and evaluates
//! without error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use meshwork_tests::sidecar::{ADMIN_PORT, Mesh, UPSTREAM_PORT};
use meshwork_tests::wait_for;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn promtool(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("promtool")
        .args(args)
        .output()
        .context("promtool (Debian's prometheus; scripts/install-test-deps.sh installs it)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?}: {text}");
    Ok(text)
}

/// Every `expr` of a dashboard's panels.
fn dashboard_exprs(path: &Path) -> Result<Vec<(String, String)>> {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().context("targets")? {
            out.push((
                panel["title"].as_str().unwrap_or("").to_owned(),
                target["expr"].as_str().context("expr")?.to_owned(),
            ));
        }
    }
    Ok(out)
}

async fn query(http: &reqwest::Client, prometheus: &str, expr: &str) -> Result<Vec<Value>> {
    let r: Value = http
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await?
        .json()
        .await?;
    if r["status"] != "success" {
        bail!("{expr}: {}", r["error"]);
    }
    Ok(r["data"]["result"].as_array().cloned().unwrap_or_default())
}

#[tokio::test]
async fn dashboards_and_alerts_hold_against_a_live_prometheus() -> Result<()> {
    let rules = repo().join("deploy-vm/prometheus/alerts.yml");
    let checked = promtool(&["check", "rules", &rules.display().to_string()])?;
    ensure!(checked.contains("SUCCESS: 8 rules found"), "{checked}");

    // A registry, an api instance and a client calling it, with traffic
    // and a DNS question.
    let mut mesh = Mesh::start().await?;
    let api = mesh
        .versioned_instance((20, 0), ("api", "api-1", "v1"))
        .await?;
    let client_ip = mesh.ip(100);
    let client = mesh
        .client_sidecar(&client_ip, "name = \"api\"\nprotocol = \"http\"")
        .await?;
    mesh.sidecars[client].wait_endpoints(1).await?;
    let registry_ip = mesh.cluster().servers[0].ip.clone();
    let dig = tokio::process::Command::new("dig")
        .args([
            "+short",
            "-p",
            "28600",
            &format!("@{registry_ip}"),
            "api.service.consul",
        ])
        .output()
        .await?;
    ensure!(dig.status.success(), "dig: {dig:?}");
    let traffic_url = format!("http://{client_ip}:{UPSTREAM_PORT}/");
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = {
        let stop = stop.clone();
        let http = meshwork_tests::http::http_client()?;
        tokio::spawn(async move {
            // Bounded: at most 2,000 requests (about 100 s).
            for _ in 0..2000 {
                if stop.is_cancelled() {
                    return;
                }
                let _ = http.get(&traffic_url).send().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // Prometheus: the shipped config's jobs with this run's targets,
    // scraped every second, the shipped rules.
    let dir = tempfile::tempdir()?;
    let sd = dir.path().join("sidecars.json");
    let api_ip = mesh.sidecars[api].ip.clone();
    std::fs::write(
        &sd,
        serde_json::json!([
            {"targets": [format!("{api_ip}:{ADMIN_PORT}")], "labels": {"service": "api"}},
            {"targets": [format!("{client_ip}:{ADMIN_PORT}")], "labels": {"service": "client"}}
        ])
        .to_string(),
    )?;
    let shipped = std::fs::read_to_string(repo().join("deploy-vm/prometheus/prometheus.yml"))?;
    let config = shipped
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
        .replace("  - alerts.yml", &format!("  - {}", rules.display()))
        .replace(
            r#"["10.0.0.11:8500", "10.0.0.12:8500", "10.0.0.13:8500"]"#,
            &format!(r#"["{registry_ip}:28500"]"#),
        )
        .replace(
            "/etc/prometheus/meshwork-sidecars/*.json",
            &sd.display().to_string(),
        )
        .replace("refresh_interval: 1m", "refresh_interval: 1s");
    ensure!(
        config != shipped && config.contains(&registry_ip),
        "the shipped config changed shape"
    );
    let config_file = dir.path().join("prometheus.yml");
    std::fs::write(&config_file, &config)?;
    promtool(&["check", "config", &config_file.display().to_string()])?;
    let prom_ip = mesh.ip(200);
    // A free port (a Prometheus installed as a service may hold 9090 on
    // every address).
    let prom_port = std::net::TcpListener::bind(format!("{prom_ip}:0"))?
        .local_addr()?
        .port();
    let prometheus = format!("http://{prom_ip}:{prom_port}");
    let mut server = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config_file.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={prom_ip}:{prom_port}"))
        .arg("--log.level=warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log"))?)
        .kill_on_drop(true)
        .spawn()
        .context("prometheus")?;
    let http = meshwork_tests::http::http_client()?;
    wait_for("every target scraped", Duration::from_secs(30), || async {
        let up = query(&http, &prometheus, "up").await.ok()?;
        (up.len() == 3 && up.iter().all(|s| s["value"][1] == "1")).then_some(())
    })
    .await?;
    // A few scrapes of traffic, so that every rate has two samples.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let mut empty = Vec::new();
    let mut checked = 0;
    for file in ["registry.json", "mesh.json"] {
        for (title, expr) in dashboard_exprs(&repo().join("deploy-vm/grafana").join(file))? {
            let expr = expr.replace("$__rate_interval", "15s");
            let result = query(&http, &prometheus, &expr).await?;
            checked += 1;
            if result.is_empty() {
                empty.push(format!("{file}: {title}: {expr}"));
            }
        }
    }
    ensure!(checked >= 20, "{checked} expressions");
    ensure!(empty.is_empty(), "no data for:\n{}", empty.join("\n"));

    // Every rule loaded and evaluated without error.
    let rules_state = wait_for("the rules evaluated", Duration::from_secs(10), || async {
        let r =
            meshwork_tests::http::get_json(&http, &format!("{prometheus}/api/v1/rules")).await?;
        let rules: Vec<Value> = r["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        (rules.len() == 8
            && rules.iter().all(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            }))
        .then_some(rules)
    })
    .await?;
    for rule in &rules_state {
        ensure!(
            rule["health"] == "ok",
            "{} is {}: {}",
            rule["name"],
            rule["health"],
            rule["lastError"]
        );
    }
    // Healthy cluster: no alert fires.
    let firing: Vec<&Value> = rules_state
        .iter()
        .filter(|r| r["state"] == "firing")
        .collect();
    ensure!(firing.is_empty(), "firing on a healthy mesh: {firing:?}");

    // And a rule's expression finds what it is for: a sidecar gone is
    // the `MeshworkSidecarDown` series (the alert itself waits a minute).
    let down_expr = rules_state
        .iter()
        .find(|r| r["name"] == "MeshworkSidecarDown")
        .and_then(|r| r["query"].as_str())
        .context("MeshworkSidecarDown")?
        .to_owned();
    stop.cancel();
    let _ = traffic.await;
    mesh.sidecars[client].kill().await?;
    let down = wait_for(
        "the stopped sidecar found by the rule",
        Duration::from_secs(15),
        || async {
            let found = query(&http, &prometheus, &down_expr).await.ok()?;
            (found.len() == 1).then_some(found)
        },
    )
    .await?;
    ensure!(down[0]["metric"]["service"] == "client", "{down:?}");
    let _ = server.kill().await;
    mesh.done();
    Ok(())
}
