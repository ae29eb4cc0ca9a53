//! `meshctl` against a live three-server cluster: every subcommand, its
//! `--json` output parsed, and the exit codes scripts rely on.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use meshwork_tests::{Cluster, meshctl_bin, wait_for};
use serde_json::Value;

/// What one meshctl run did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("meshctl printed no JSON: {self:?}"))
    }
}

async fn meshctl(addr: &str, args: &[&str]) -> Result<Run> {
    let output = tokio::process::Command::new(meshctl_bin())
        .args(args)
        .env("MESHWORK_HTTP_ADDR", addr)
        .env_remove("CONSUL_HTTP_ADDR")
        .env_remove("MESHWORK_HTTP_TOKEN")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .context("meshctl did not finish within 60 s")??;
    Ok(Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// A run that must succeed.
async fn ok(addr: &str, args: &[&str]) -> Result<Run> {
    let run = meshctl(addr, args).await?;
    if run.code != 0 {
        bail!("meshctl {args:?} failed: {run:?}");
    }
    Ok(run)
}

/// A run that must fail with `code` and one line on stderr.
async fn fails(addr: &str, args: &[&str], code: i32) -> Result<Run> {
    let run = meshctl(addr, args).await?;
    if run.code != code {
        bail!("meshctl {args:?}: wanted exit {code}, got {run:?}");
    }
    let first = run.stderr.lines().next().unwrap_or("");
    if first.trim().is_empty() {
        bail!("meshctl {args:?}: no error message: {run:?}");
    }
    Ok(run)
}

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

/// Voters in `members --json` once all of them are healthy.
async fn healthy_members(addr: &str, want: usize) -> Result<Vec<Value>> {
    wait_for(
        &format!("{want} healthy servers in meshctl members"),
        Duration::from_secs(30),
        || async {
            let run = meshctl(addr, &["members", "--json"]).await.ok()?;
            let report = run.json().ok()?;
            let servers = report["Servers"].as_array()?.clone();
            let healthy = servers
                .iter()
                .all(|s| s["Healthy"] == Value::Bool(true) && s["Voter"] == Value::Bool(true));
            (run.code == 0 && healthy && servers.len() == want).then_some(servers)
        },
    )
    .await
}

#[tokio::test]
async fn meshctl_drives_a_live_cluster() -> Result<()> {
    let mut cluster = Cluster::start(3, &[]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
    // Talk to a follower: meshctl must not need the leader.
    let follower = cluster.followers(leader)[0];
    let addr = host_port(&cluster.servers[follower].http());

    // members / leader.
    let servers = healthy_members(&addr, 3).await?;
    let leaders: Vec<&Value> = servers
        .iter()
        .filter(|s| s["Leader"] == Value::Bool(true))
        .collect();
    assert_eq!(leaders.len(), 1, "{servers:?}");
    assert!(servers.iter().all(|s| s["LastIndex"].as_u64() > Some(0)));
    let table = ok(&addr, &["members"]).await?;
    assert!(table.stdout.starts_with("ID"), "{table:?}");
    assert_eq!(table.stdout.matches("healthy").count(), 3, "{table:?}");
    let lead = ok(&addr, &["leader"]).await?;
    assert_eq!(lead.stdout.trim(), cluster.servers[leader].raft_addr());
    let lead = ok(&addr, &["leader", "--json"]).await?.json()?;
    assert_eq!(lead["Leader"], cluster.servers[leader].raft_addr());

    // kv.
    ok(&addr, &["kv", "put", "app/db/url", "postgres://db:5432"]).await?;
    ok(&addr, &["kv", "put", "app/name", "shop", "--flags", "7"]).await?;
    let get = ok(&addr, &["kv", "get", "app/db/url"]).await?;
    assert_eq!(get.stdout.trim(), "postgres://db:5432");
    let entries = ok(&addr, &["kv", "get", "app", "--recurse", "--json"])
        .await?
        .json()?;
    let keys: Vec<&str> = entries
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["Key"].as_str())
        .collect();
    assert_eq!(keys, ["app/db/url", "app/name"]);
    assert_eq!(entries[1]["Flags"], 7);
    let ls = ok(&addr, &["kv", "ls", "app/"]).await?;
    assert_eq!(ls.stdout, "app/db/\napp/name\n");
    let ls = ok(&addr, &["kv", "ls", "app/", "--recurse", "--json"])
        .await?
        .json()?;
    assert_eq!(ls, serde_json::json!(["app/db/url", "app/name"]));
    // A failed check-and-set is an error, and says why.
    let index = entries[1]["ModifyIndex"].as_u64().context("index")?;
    let cas = fails(&addr, &["kv", "put", "app/name", "x", "--cas", "1"], 1).await?;
    assert!(cas.stderr.contains("check-and-set"), "{cas:?}");
    ok(
        &addr,
        &[
            "kv",
            "put",
            "app/name",
            "shop2",
            "--cas",
            &index.to_string(),
        ],
    )
    .await?;
    ok(&addr, &["kv", "delete", "app/db/url"]).await?;
    fails(&addr, &["kv", "get", "app/db/url"], 3).await?;
    ok(&addr, &["kv", "delete", "app", "--recurse"]).await?;
    let empty = ok(&addr, &["kv", "ls", "--recurse", "--json"])
        .await?
        .json()?;
    assert_eq!(empty, serde_json::json!([]));

    // services.
    let registration = serde_json::json!({
        "Node": "vm-7", "Address": "10.1.2.7",
        "Service": {"ID": "web-1", "Service": "web", "Tags": ["v1"], "Port": 8080},
        "Check": {"CheckID": "web-alive", "Name": "alive", "Status": "passing", "ServiceID": "web-1"},
    });
    let resp = cluster
        .http
        .put(format!(
            "{}/v1/catalog/register",
            cluster.servers[follower].http()
        ))
        .json(&registration)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.text().await);
    let services = ok(&addr, &["services", "--json"]).await?.json()?;
    assert_eq!(services["web"], serde_json::json!(["v1"]));
    let table = ok(&addr, &["services"]).await?;
    assert!(table.stdout.contains("web") && table.stdout.contains("v1"));
    let show = ok(&addr, &["service", "show", "web", "--json"])
        .await?
        .json()?;
    assert_eq!(show[0]["Service"]["ID"], "web-1");
    assert_eq!(show[0]["Checks"][0]["CheckID"], "web-alive");
    let show = ok(&addr, &["service", "show", "web"]).await?;
    assert!(
        show.stdout.contains("10.1.2.7:8080") && show.stdout.contains("passing"),
        "{show:?}"
    );
    fails(&addr, &["service", "show", "nope"], 3).await?;

    // server add / remove: a fourth server with an empty data dir waits
    // until meshctl adds it.
    let fourth = cluster.add_idle_server(&[]);
    cluster.servers[fourth].start(&[])?;
    let raft4 = cluster.servers[fourth].raft_addr();
    ok(&addr, &["server", "add", "4", &raft4]).await?;
    healthy_members(&addr, 4).await?;
    let removed = ok(&addr, &["server", "remove", "4", "--json"])
        .await?
        .json()?;
    assert!(removed["Done"].as_str().is_some(), "{removed:?}");
    healthy_members(&addr, 3).await?;
    cluster.servers[fourth].stop().await?;
    fails(&addr, &["server", "remove", "9"], 3).await?;
    fails(&addr, &["server", "add", "5", "not-an-address"], 1).await?;

    // snapshot save / restore through meshctl.
    ok(&addr, &["kv", "put", "saved/key", "before"]).await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("backup.snap");
    let file_arg = file.display().to_string();
    let saved = ok(&addr, &["snapshot", "save", &file_arg, "--json"])
        .await?
        .json()?;
    assert!(saved["Bytes"].as_u64() > Some(0), "{saved}");
    ok(&addr, &["kv", "put", "saved/key", "after"]).await?;
    let restored = ok(&addr, &["snapshot", "restore", &file_arg, "--json"])
        .await?
        .json()?;
    assert_eq!(restored["Restored"], true, "{restored}");
    let value = ok(&addr, &["kv", "get", "saved/key"]).await?;
    assert_eq!(value.stdout.trim(), "before");
    // A truncated file is refused before anything is sent.
    let bytes = std::fs::read(&file)?;
    let cut = dir.path().join("cut.snap");
    std::fs::write(&cut, &bytes[..bytes.len() / 2])?;
    let refused = fails(
        &addr,
        &["snapshot", "restore", &cut.display().to_string()],
        2,
    )
    .await?;
    assert!(refused.stderr.contains("truncated"), "{refused:?}");
    let value = ok(&addr, &["kv", "get", "saved/key"]).await?;
    assert_eq!(value.stdout.trim(), "before");

    // version.
    let version = ok(&addr, &["version", "--json"]).await?.json()?;
    assert_eq!(version["Meshctl"], version["Registry"]);

    // Bad usage and an unreachable server: one clear line, scriptable codes.
    let unreachable = fails("127.0.0.1:1", &["leader"], 4).await?;
    assert!(
        unreachable.stderr.contains("cannot reach the registry"),
        "{unreachable:?}"
    );
    fails(&addr, &["kv", "get"], 2).await?;
    fails(&addr, &["members", "--no-such-flag"], 2).await?;
    fails("not an address", &["leader"], 2).await?;
    fails(&addr, &["--token", "bad\ntoken", "leader"], 2).await?;
    fails(&addr, &["--timeout", "soon", "leader"], 2).await?;
    let missing = fails(&addr, &["snapshot", "restore", "/no/such/file"], 2).await?;
    assert!(missing.stderr.contains("/no/such/file"), "{missing:?}");
    fails(&addr, &["kv", "put", "k", "@/no/such/file"], 2).await?;
    // CONSUL_HTTP_ADDR works when MESHWORK_HTTP_ADDR is not set.
    let output = tokio::process::Command::new(meshctl_bin())
        .arg("leader")
        .env_remove("MESHWORK_HTTP_ADDR")
        .env("CONSUL_HTTP_ADDR", format!("http://{addr}"))
        .output()
        .await?;
    assert!(output.status.success(), "{output:?}");

    cluster.done();
    Ok(())
}
