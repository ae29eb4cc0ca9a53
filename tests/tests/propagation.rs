//! Propagation visibility (issue 24): every sidecar reports the config it
//! has applied to the registry server it uses; any server lists the whole
//! fleet (`/v1/mesh/sidecars`) and answers when a config index has reached
//! every sidecar (`/v1/mesh/propagation`), or who has not applied it and
//! why. Real binaries: three registry servers, a sidecar on each, a client
//! sidecar; `meshctl config apply --wait` and `meshctl mesh status`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use meshwork_tests::http::http_client;
use meshwork_tests::sidecar::{Mesh, UPSTREAM_PORT};
use meshwork_tests::{meshctl_bin, wait_for};
use serde_json::{Value, json};

/// `PUT /v1/config` through `server`: the write's index.
async fn put_entry(mesh: &Mesh, server: usize, entry: &Value) -> Result<u64> {
    let url = format!("{}/v1/config", mesh.cluster().servers[server].http());
    let r = http_client()?.put(url).json(entry).send().await?;
    let status = r.status();
    let index = r
        .headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let text = r.text().await?;
    ensure!(
        status == 200 && text == "true",
        "PUT {entry}: {status} {text}"
    );
    index.context("PUT /v1/config answers with the write's X-Consul-Index")
}

async fn get(mesh: &Mesh, server: usize, path: &str) -> Result<Value> {
    let url = format!("{}{path}", mesh.cluster().servers[server].http());
    let r = http_client()?.get(url).send().await?;
    ensure!(r.status() == 200, "GET {path}: {}", r.status());
    Ok(r.json().await?)
}

fn meshctl(mesh: &Mesh, server: usize, args: &[&str]) -> Result<(i32, String)> {
    let out = std::process::Command::new(meshctl_bin())
        .arg("--http-addr")
        .arg(mesh.cluster().servers[server].http())
        .args(args)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

#[tokio::test]
async fn every_server_sees_which_config_each_sidecar_applied_and_when_all_have() -> Result<()> {
    let mut mesh = Mesh::start_servers(3, &[]).await?;
    mesh.versioned_instance((20, 0), ("api", "api-v1", "v1"))
        .await?;
    mesh.versioned_instance((21, 1), ("api", "api-v2", "v2"))
        .await?;
    mesh.versioned_instance((22, 2), ("admin", "admin-a", "v1"))
        .await?;
    let client_ip = mesh.ip(100);
    let c = mesh
        .client_sidecar(&client_ip, "name = \"api\"\nprotocol = \"http\"")
        .await?;
    mesh.sidecars[c].wait_endpoints(2).await?;

    // Any server lists all four, each with the server it reports to.
    let fleet = wait_for(
        "four sidecars listed by server 3",
        Duration::from_secs(20),
        || async {
            let fleet = get(&mesh, 2, "/v1/mesh/sidecars").await.ok()?;
            (fleet["Sidecars"].as_array()?.len() == 4).then_some(fleet)
        },
    )
    .await?;
    let servers: Vec<(&str, &str)> = fleet["Sidecars"]
        .as_array()
        .context("Sidecars")?
        .iter()
        .map(|s| {
            (
                s["ServiceID"].as_str().unwrap_or(""),
                s["Server"].as_str().unwrap_or(""),
            )
        })
        .collect();
    for (id, server) in [
        ("api-v1", "meshwork-1"),
        ("api-v2", "meshwork-2"),
        ("admin-a", "meshwork-3"),
        ("client-1", "meshwork-1"),
    ] {
        ensure!(
            servers.contains(&(id, server)),
            "{id} via {server}: {fleet}"
        );
    }
    for s in fleet["Sidecars"].as_array().context("Sidecars")? {
        ensure!(s["Connected"] == true, "{s}");
        ensure!(s["Refused"].as_array().is_some_and(Vec::is_empty), "{s}");
        ensure!(
            s["Applied"]["service-intentions"].is_u64(),
            "kinds reported: {s}"
        );
        ensure!(
            s["ConfigDigest"].as_str().is_some_and(|d| d.len() == 16),
            "{s}"
        );
    }
    let client = fleet["Sidecars"]
        .as_array()
        .context("Sidecars")?
        .iter()
        .find(|s| s["ServiceID"] == "client-1")
        .context("client-1")?;
    ensure!(
        client["Applied"]["service-router"].is_u64(),
        "the client follows the discovery chain's kinds: {client}"
    );
    ensure!(
        client["Address"]
            .as_str()
            .is_some_and(|a| a.starts_with(&client_ip)),
        "{client}"
    );

    // One write through server 2, its propagation asked of server 1: every
    // sidecar has it within a second of the PUT being sent.
    let resolver = json!({
        "Kind": "service-resolver", "Name": "api",
        "Subsets": {
            "v1": {"Filter": "Service.Meta.version == v1"},
            "v2": {"Filter": "Service.Meta.version == v2"}
        }
    });
    let sent = Instant::now();
    let index = put_entry(&mesh, 1, &resolver).await?;
    let answer = get(
        &mesh,
        0,
        &format!("/v1/mesh/propagation?index={index}&wait=10s"),
    )
    .await?;
    let took = sent.elapsed();
    ensure!(answer["Complete"] == true, "{answer}");
    ensure!(
        answer["Sidecars"] == 4 && answer["Applied"] == 4,
        "{answer}"
    );
    println!("propagation of index {index}: {took:?} from the PUT's send to the answer ({answer})");
    ensure!(
        took < Duration::from_secs(1),
        "every sidecar applied the change {took:?} after the PUT was sent (want < 1 s): {answer}"
    );
    // An index not reached yet: incomplete after the wait, with who waits.
    let ahead = get(
        &mesh,
        2,
        &format!("/v1/mesh/propagation?index={}&wait=300ms", index + 1000),
    )
    .await?;
    ensure!(ahead["Complete"] == false, "{ahead}");

    // A change the registry cannot refuse at PUT (admin's resolver loses the
    // subset api's router sends /admin to) is refused by the client's
    // sidecar, which keeps its previous chain and says why.
    let admin_resolver =
        |subsets: Value| json!({"Kind": "service-resolver", "Name": "admin", "Subsets": subsets});
    put_entry(
        &mesh,
        0,
        &admin_resolver(json!({"v1": {"Filter": "Service.Meta.version == v1"}})),
    )
    .await?;
    let router = json!({
        "Kind": "service-router", "Name": "api",
        "Routes": [{"Match": {"HTTP": {"PathPrefix": "/admin"}},
                    "Destination": {"Service": "admin", "ServiceSubset": "v1", "PrefixRewrite": "/"}}]
    });
    let index = put_entry(&mesh, 0, &router).await?;
    let answer = get(
        &mesh,
        1,
        &format!("/v1/mesh/propagation?index={index}&wait=10s"),
    )
    .await?;
    ensure!(answer["Complete"] == true, "{answer}");
    let dir = mesh.cluster().dir.path().to_owned();
    let broken = dir.join("admin-resolver.json");
    std::fs::write(
        &broken,
        admin_resolver(json!({"v9": {"Filter": "Service.Meta.version == v9"}})).to_string(),
    )?;
    let broken_arg = broken.display().to_string();
    let (code, text) = meshctl(&mesh, 2, &["config", "apply", &broken_arg, "--wait", "3s"])?;
    ensure!(
        code == 6,
        "meshctl exit {code} (want 6, not applied everywhere): {text}"
    );
    ensure!(
        text.contains("refused: client-1") && text.contains("upstream api"),
        "meshctl names the sidecar and what it refused: {text}"
    );
    let fleet = get(&mesh, 0, "/v1/mesh/sidecars").await?;
    let client = fleet["Sidecars"]
        .as_array()
        .context("Sidecars")?
        .iter()
        .find(|s| s["ServiceID"] == "client-1")
        .context("client-1")?
        .clone();
    ensure!(
        client["Refused"][0]["Scope"] == "upstream api"
            && client["Refused"][0]["Reason"]
                .as_str()
                .is_some_and(|r| r.contains("v1")),
        "{client}"
    );
    // The previous chain still routes /admin to admin.
    let r = http_client()?
        .get(format!("http://{client_ip}:{UPSTREAM_PORT}/admin"))
        .send()
        .await?;
    let body = r.text().await?;
    ensure!(body.starts_with("admin-a"), "previous chain kept: {body}");

    // Fixed with meshctl: applied everywhere, the refusal gone.
    let fixed = dir.join("admin-resolver-fixed.json");
    std::fs::write(
        &fixed,
        admin_resolver(json!({
            "v1": {"Filter": "Service.Meta.version == v1"},
            "v9": {"Filter": "Service.Meta.version == v9"}
        }))
        .to_string(),
    )?;
    let fixed_arg = fixed.display().to_string();
    let (code, text) = meshctl(&mesh, 2, &["config", "apply", &fixed_arg, "--wait", "10s"])?;
    ensure!(code == 0, "meshctl exit {code}: {text}");
    ensure!(text.contains("applied by 4/4 sidecars"), "{text}");
    let (code, text) = meshctl(&mesh, 1, &["mesh", "status"])?;
    ensure!(code == 0, "meshctl mesh status exit {code}: {text}");
    for id in ["api-v1", "api-v2", "admin-a", "client-1"] {
        ensure!(text.contains(id), "mesh status lists {id}: {text}");
    }
    ensure!(
        text.contains("(current)") && !text.contains("upstream api"),
        "{text}"
    );

    // A sidecar killed without a goodbye leaves the listing once the
    // registry removes its instance (session TTL 2 s, then 2 s critical),
    // and does not hold up propagations meanwhile for longer than that.
    let v2 = mesh
        .sidecars
        .iter()
        .position(|s| s.config.display().to_string().contains("api-v2"))
        .context("api-v2's sidecar")?;
    mesh.sidecars[v2].kill().await?;
    wait_for(
        "api-v2 gone from the listing",
        Duration::from_secs(20),
        || async {
            let fleet = get(&mesh, 0, "/v1/mesh/sidecars").await.ok()?;
            let ids: Vec<&str> = fleet["Sidecars"]
                .as_array()?
                .iter()
                .filter_map(|s| s["ServiceID"].as_str())
                .collect();
            (!ids.contains(&"api-v2") && ids.len() == 3).then_some(())
        },
    )
    .await?;
    mesh.done();
    Ok(())
}
