//! The binary refuses bad configs and unusable data dirs with a message
//! and a non-zero exit, and never touches the data.

use std::time::Duration;

use anyhow::{Context, Result};
use meshwork_tests::{Cluster, registry_bin};

fn run_registry(args: &[&str]) -> Result<std::process::Output> {
    let mut child = std::process::Command::new(registry_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // A refusal is immediate; a server that starts is killed after 10 s.
    for _ in 0..100 {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill()?;
    Ok(child.wait_with_output()?)
}

fn ports(ip: &str) -> Vec<String> {
    vec![
        "--http-addr".into(),
        format!("{ip}:28500"),
        "--grpc-addr".into(),
        format!("{ip}:28502"),
        "--raft-addr".into(),
        format!("{ip}:28300"),
    ]
}

#[test]
fn config_file_with_unknown_keys_is_refused_with_their_lines() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("registry.toml");
    std::fs::write(
        &file,
        "node_id = 1\nnodeid = 2\n\nhttp_adr = \"127.0.0.1:1\"\n",
    )?;
    let out = run_registry(&["--config", file.to_str().unwrap_or_default()])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("line 2: unknown key `nodeid`"), "{stderr}");
    assert!(
        stderr.contains("line 4: unknown key `http_adr`"),
        "{stderr}"
    );

    let out = run_registry(&["--peers", "1@a:1,zz", "--node-id", "3"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is not ID@HOST:PORT") && stderr.contains("node id 3 is not in the list"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_data_dirs_are_refused_and_left_alone() -> Result<()> {
    // A real data dir of node 1, with data in it.
    let mut cluster = Cluster::start(1, &[]).await?;
    cluster.must_put(0, "precious", "data").await?;
    cluster.servers[0].stop().await?;
    let data_dir = cluster.servers[0].data_dir.clone();
    let dir = data_dir.to_str().unwrap_or_default().to_owned();
    let ip = cluster.servers[0].ip.clone();

    // Started as another node.
    let mut args = vec![
        "--node-id",
        "2",
        "--data-dir",
        &dir,
        "--peers",
        "2@127.0.0.1:1",
    ];
    let extra = ports(&ip);
    args.extend(extra.iter().map(String::as_str));
    let out = run_registry(&args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Refused on its data: 3, which the unit does not restart (a crash is 1).
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("belongs to node 1"), "{stderr}");

    // A corrupt marker.
    let marker = data_dir.join("meshwork.json");
    let saved = std::fs::read(&marker)?;
    std::fs::write(&marker, b"garbage")?;
    let mut args = vec!["--node-id", "1", "--data-dir", &dir];
    args.extend(extra.iter().map(String::as_str));
    let out = run_registry(&args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("corrupt"), "{stderr}");
    std::fs::write(&marker, &saved)?;

    // An unreadable data dir (a file where the dir should be).
    let file = cluster.dir.path().join("not-a-dir");
    std::fs::write(&file, b"x")?;
    let file_arg = file.to_str().unwrap_or_default().to_owned();
    let mut args = vec!["--node-id", "1", "--data-dir", &file_arg];
    args.extend(extra.iter().map(String::as_str));
    let out = run_registry(&args)?;
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot create data dir"));

    // The original data is intact.
    cluster.servers[0].start(&[])?;
    cluster.wait_leader(Duration::from_secs(20)).await?;
    assert_eq!(
        cluster.get_raw(0, "precious", "").await?.as_deref(),
        Some("data")
    );
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_from_another_cluster_is_refused() -> Result<()> {
    let mut a = Cluster::start(1, &[]).await?;
    a.must_put(0, "from", "a").await?;
    // The cluster names itself and every server records the name.
    let marker = a.servers[0].data_dir.join("meshwork.json");
    meshwork_tests::wait_for(
        "the cluster id in the marker",
        Duration::from_secs(10),
        || async {
            std::fs::read_to_string(&marker)
                .ok()?
                .contains("cluster_id")
                .then_some(())
        },
    )
    .await?;
    a.servers[0].stop().await?;

    // Cluster B's server 1, started on a copy of A's data.
    let mut b = Cluster::new(1, &[])?;
    meshwork_tests::damage::copy_dir(&a.servers[0].data_dir, &b.servers[0].data_dir)?;
    b.servers[0].start(&[])?;
    let mut status = None;
    for _ in 0..200 {
        status = b.servers[0].try_exit_status();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.context("the server did not exit within 20 s")?;
    assert!(!status.success());
    let log = std::fs::read_to_string(&b.servers[0].log_path)?;
    assert!(log.contains("belongs to another cluster"), "{log}");
    // A's own server still starts on its data.
    a.servers[0].start(&[])?;
    a.wait_leader(Duration::from_secs(20)).await?;
    assert_eq!(a.get_raw(0, "from", "").await?.as_deref(), Some("a"));
    a.done();
    b.done();
    Ok(())
}

#[tokio::test]
async fn sighup_reloads_the_log_level_and_survives_a_bad_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("registry.toml");
    std::fs::write(&path, "log_level = \"warn\"\n")?;
    let path_arg = path.display().to_string();
    let mut cluster = Cluster::new(1, &["--config", &path_arg])?;
    cluster.servers[0].start(&[])?;
    cluster.wait_leader(Duration::from_secs(20)).await?;
    let hangup = |pid: u32| {
        std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
    };
    let log_has = |text: &'static str| {
        let log = cluster.servers[0].log_path.clone();
        move || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .ok()
                    .filter(|l| l.contains(text))
                    .map(|_| ())
            }
        }
    };

    // An info event on demand: a snapshot taken through the API logs
    // "snapshot built" at info. At `warn` it is not written...
    let snapshot = || {
        cluster
            .http
            .put(format!(
                "{}/v1/operator/raft/snapshot",
                cluster.servers[0].http()
            ))
            .send()
    };
    cluster.must_put(0, "first/snapshot", "x").await?;
    assert!(snapshot().await?.status().is_success());
    let log_now = || std::fs::read_to_string(&cluster.servers[0].log_path).unwrap_or_default();
    assert!(
        !log_now().contains("snapshot built"),
        "an info line written at log_level warn"
    );

    std::fs::write(&path, "log_level = \"info,meshwork_registry=debug\"\n")?;
    let pid = cluster.servers[0].pid().context("pid")?;
    assert!(hangup(pid)?.success());
    meshwork_tests::wait_for(
        "the reload to be logged",
        Duration::from_secs(10),
        log_has("configuration reloaded"),
    )
    .await?;
    // ...and after the reload it is: the level really changed (a write
    // first, so that there is a new snapshot to build).
    cluster.must_put(0, "before/snapshot", "x").await?;
    assert!(snapshot().await?.status().is_success());
    meshwork_tests::wait_for(
        "an info line at the reloaded level",
        Duration::from_secs(10),
        log_has("snapshot built"),
    )
    .await?;

    // A broken file changes nothing and the server keeps serving.
    std::fs::write(&path, "log_level = \"warn\"\nno_such_key = 1\n")?;
    assert!(hangup(pid)?.success());
    meshwork_tests::wait_for(
        "the failed reload to be logged",
        Duration::from_secs(10),
        log_has("reload failed"),
    )
    .await?;
    assert!(
        cluster.servers[0].try_exit_status().is_none(),
        "SIGHUP ended the server"
    );
    cluster.must_put(0, "still/serving", "yes").await?;
    cluster.done();
    Ok(())
}

#[test]
fn check_config_validates_without_starting() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "node_id = 2\ndata_dir = \"{}\"\npeers = [\"1@127.0.0.1:8300\", \"2@127.0.0.2:8300\"]\n",
            data.display()
        ),
    )?;
    let good_arg = good.display().to_string();
    let out = run_registry(&["--config", &good_arg, "--check-config"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    assert!(
        !data.exists(),
        "--check-config must not create the data dir"
    );
    // Into a pipe whose reader has gone (as `| head -1`), the answer is
    // still the exit code, not a panic (101) on the broken pipe.
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let closed = std::process::Command::new(meshwork_tests::registry_bin())
        .args(["--config", &good_arg, "--check-config"])
        .stdout(writer)
        .output()?;
    assert_eq!(closed.status.code(), Some(0), "{closed:?}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "node_id = 0\nnot_a_key = 1\n")?;
    let bad_arg = bad.display().to_string();
    let out = run_registry(&["--config", &bad_arg, "--check-config"])?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not_a_key"), "{stderr}");

    // A bad value names the file and line that set it.
    std::fs::write(&bad, "node_id = 1\n\nsnapshot_threshold = 0\n")?;
    let out = run_registry(&["--config", &bad_arg, "--check-config"])?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{bad_arg}: line 3: snapshot_threshold: must be at least 1"
        )),
        "{stderr}"
    );

    // A log filter that does not parse is an error too, not a silent default.
    std::fs::write(&bad, "log_level = \"info,meshwork=loud\"\n")?;
    let out = run_registry(&["--config", &bad_arg, "--check-config"])?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("log_level"), "{stderr}");
    Ok(())
}
