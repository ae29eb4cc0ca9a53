//! Three (and four) real `meshwork-registry` processes on loopback:
//! replication, failover, restarts, snapshot catch-up, joins, quorum loss.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use meshwork_tests::{Cluster, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_on_follower_is_readable_on_every_server() -> Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let follower = cluster.followers(leader)[0];
    cluster.must_put(follower, "greeting", "hello").await?;

    // Default and consistent reads on any server see the write at once.
    for i in 0..3 {
        assert_eq!(
            cluster.get_raw(i, "greeting", "").await?.as_deref(),
            Some("hello"),
            "default read on {i}"
        );
        assert_eq!(
            cluster
                .get_raw(i, "greeting", "&consistent")
                .await?
                .as_deref(),
            Some("hello"),
            "consistent read on {i}"
        );
    }
    // Stale reads converge.
    for i in 0..3 {
        wait_for(
            "stale read to see the write",
            Duration::from_secs(5),
            || async {
                (cluster
                    .get_raw(i, "greeting", "&stale")
                    .await
                    .ok()?
                    .as_deref()
                    == Some("hello"))
                .then_some(())
            },
        )
        .await?;
    }
    // A stale read says who leads and how fresh it is.
    let resp = cluster
        .http
        .get(format!(
            "{}/v1/kv/greeting?stale",
            cluster.servers[follower].http()
        ))
        .send()
        .await?;
    assert_eq!(resp.headers()["x-consul-knownleader"], "true");
    let contact: u64 = resp.headers()["x-consul-lastcontact"].to_str()?.parse()?;
    assert!(contact < 5_000, "last contact {contact} ms");
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_another_and_loses_no_acknowledged_write() -> Result<()> {
    let mut cluster = Cluster::start(3, &[]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    for n in 0..40 {
        cluster
            .must_put(n % 3, &format!("k/{n}"), &format!("v{n}"))
            .await?;
    }
    cluster.servers[leader].kill().await?;
    let killed_at = Instant::now();
    let new_leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    assert_ne!(new_leader, leader);
    let elapsed = killed_at.elapsed();
    assert!(
        elapsed < Duration::from_secs(10),
        "failover took {elapsed:?}"
    );

    for i in cluster.followers(leader) {
        for n in 0..40 {
            let value = cluster.get_raw(i, &format!("k/{n}"), "&consistent").await?;
            assert_eq!(
                value,
                Some(format!("v{n}")),
                "key k/{n} on server {}",
                i + 1
            );
        }
    }
    // The survivors keep accepting writes, and the old leader catches up
    // when it comes back.
    let survivor = cluster.followers(leader)[0];
    cluster.must_put(survivor, "after", "failover").await?;
    cluster.servers[leader].start(&[])?;
    wait_for(
        "restarted old leader to catch up",
        Duration::from_secs(15),
        || async {
            (cluster
                .get_raw(leader, "after", "&stale")
                .await
                .ok()?
                .as_deref()
                == Some("failover"))
            .then_some(())
        },
    )
    .await?;
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_server_keeps_the_data() -> Result<()> {
    let mut cluster = Cluster::start(
        3,
        &[
            "--snapshot-threshold",
            "30",
            "--snapshot-interval-ms",
            "100",
        ],
    )
    .await?;
    for n in 0..60 {
        cluster
            .must_put(n % 3, &format!("r/{n}"), &format!("v{n}"))
            .await?;
    }
    cluster.must_put(0, "r/5", "overwritten").await?;
    let (status, _) = cluster.put(1, "r/6", b"", "").await?;
    ensure!(status == 200);
    let resp = cluster
        .http
        .delete(format!("{}/v1/kv/r/7", cluster.servers[2].http()))
        .send()
        .await?;
    ensure!(resp.status() == 200);

    for server in &mut cluster.servers {
        server.kill().await?;
    }
    for server in &mut cluster.servers {
        server.start(&[])?;
    }
    cluster.wait_leader(Duration::from_secs(20)).await?;
    for i in 0..3 {
        for n in 0..60 {
            let expected = match n {
                5 => Some("overwritten".to_owned()),
                6 => Some(String::new()),
                7 => None,
                n => Some(format!("v{n}")),
            };
            let got = cluster.get_raw(i, &format!("r/{n}"), "").await?;
            assert_eq!(got, expected, "r/{n} on server {}", i + 1);
        }
    }
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_missed_a_snapshot_catches_up_after_restart() -> Result<()> {
    let mut cluster = Cluster::start(
        3,
        &[
            "--snapshot-threshold",
            "50",
            "--snapshot-trailing-logs",
            "0",
            "--snapshot-interval-ms",
            "100",
        ],
    )
    .await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let lagging = cluster.followers(leader)[0];
    let lagging_index = cluster
        .metric(lagging, "meshwork_raft_last_log_index")
        .await?;
    cluster.servers[lagging].kill().await?;
    let writers: Vec<usize> = (0..3).filter(|i| *i != lagging).collect();
    for n in 0..300 {
        cluster
            .must_put(writers[n % 2], &format!("s/{n:03}"), &format!("v{n}"))
            .await?;
    }
    // Snapshots are checked every 100 ms: wait until the leader's covers
    // (and, with no trailing logs, purges) what the lagging server lacks.
    wait_for(
        "a snapshot past the lagging server's log",
        Duration::from_secs(20),
        || async {
            let snapshot = cluster
                .metric(leader, "meshwork_raft_snapshot_index")
                .await
                .ok()?;
            (snapshot > lagging_index + 1.0).then_some(())
        },
    )
    .await?;
    cluster.servers[lagging].start(&[])?;
    wait_for(
        "lagging server to have every key",
        Duration::from_secs(30),
        || async {
            let resp = cluster
                .http
                .get(format!(
                    "{}/v1/kv/s/?keys&stale",
                    cluster.servers[lagging].http()
                ))
                .send()
                .await
                .ok()?;
            let keys: Vec<String> = resp.json().await.ok()?;
            (keys.len() == 300).then_some(())
        },
    )
    .await?;
    assert_eq!(
        cluster
            .get_raw(lagging, "s/299", "&stale")
            .await?
            .as_deref(),
        Some("v299")
    );
    let log = std::fs::read_to_string(&cluster.servers[lagging].log_path)?;
    assert!(
        log.contains("snapshot installed"),
        "the lagging server caught up without a snapshot:\n{log}"
    );
    cluster.done();
    Ok(())
}

/// Waits until server `i` has `n` blocking queries parked (its
/// `meshwork_blocking_queries` gauge): a wake test proves the query was
/// waiting before it makes the change, instead of sleeping and hoping.
async fn parked(cluster: &Cluster, i: usize, n: f64) -> Result<()> {
    wait_for(
        &format!("{n} blocking queries parked on server {}", i + 1),
        Duration::from_secs(10),
        || async {
            let now = cluster.metric(i, "meshwork_blocking_queries").await.ok()?;
            (now >= n).then_some(())
        },
    )
    .await
}

/// A blocking GET of `url` run in the background.
fn blocking_get(
    cluster: &Cluster,
    url: String,
) -> tokio::task::JoinHandle<Result<(u16, u64, String, Duration)>> {
    let http = cluster.http.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let resp = http.get(&url).send().await?;
        let status = resp.status().as_u16();
        let index = resp
            .headers()
            .get("x-consul-index")
            .context("no index")?
            .to_str()?
            .parse()?;
        Ok((status, index, resp.text().await?, started.elapsed()))
    })
}

/// The index a read of `path` on server `i` reports.
async fn index_of(cluster: &Cluster, i: usize, path: &str) -> Result<u64> {
    let resp = cluster
        .http
        .get(format!("{}{path}", cluster.servers[i].http()))
        .send()
        .await?;
    Ok(resp.headers()["x-consul-index"].to_str()?.parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_queries_wake_on_change_and_time_out_without_one() -> Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    cluster.must_put(0, "watched", "one").await?;
    cluster.must_put(0, "elsewhere", "x").await?;
    let index = index_of(&cluster, 1, "/v1/kv/watched").await?;

    // A change elsewhere does not wake the query (parked first, proven by
    // the gauge); its wait ends it.
    let waiting = blocking_get(
        &cluster,
        format!(
            "{}/v1/kv/watched?index={index}&wait=2s",
            cluster.servers[1].http()
        ),
    );
    parked(&cluster, 1, 1.0).await?;
    cluster.must_put(2, "elsewhere", "y").await?;
    let (_, answered, _, elapsed) = waiting.await??;
    assert_eq!(answered, index, "woken by a change elsewhere");
    assert!(
        elapsed >= Duration::from_secs(2),
        "returned after {elapsed:?}, before its wait"
    );
    assert!(
        elapsed < Duration::from_secs(6),
        "returned after {elapsed:?}"
    );

    // A change to the key wakes it well before its 30 s wait.
    let waiting = blocking_get(
        &cluster,
        format!(
            "{}/v1/kv/watched?index={index}&wait=30s",
            cluster.servers[2].http()
        ),
    );
    parked(&cluster, 2, 1.0).await?;
    cluster.must_put(0, "watched", "two").await?;
    let (_, new_index, body, elapsed) = waiting.await??;
    assert!(new_index > index);
    let body: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(body[0]["Value"], "dHdv"); // "two"
    assert!(elapsed < Duration::from_secs(15), "woke after {elapsed:?}");

    // A prefix query wakes on a deletion under the prefix.
    cluster.must_put(0, "tree/a", "1").await?;
    let index = index_of(&cluster, 0, "/v1/kv/tree/?recurse").await?;
    let waiting = blocking_get(
        &cluster,
        format!(
            "{}/v1/kv/tree/?recurse&index={index}&wait=30s",
            cluster.servers[1].http()
        ),
    );
    parked(&cluster, 1, 1.0).await?;
    let deleted = cluster
        .http
        .delete(format!("{}/v1/kv/tree/a", cluster.servers[2].http()))
        .send()
        .await?;
    ensure!(deleted.status() == 200);
    let (status, new_index, _, _) = waiting.await??;
    assert_eq!(status, 404);
    assert!(new_index > index);
    cluster.done();
    Ok(())
}

/// The catalog's blocking queries cover one service each: a change to
/// `db` does not wake a query on `web`, a change to `web` does (each
/// query proven parked before the change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_query_wakes_for_its_service_only() -> Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    let register = |service: &str, id: &str, port: u16| {
        let body = serde_json::json!({
            "Node": "host-1", "Address": "10.0.0.1",
            "Service": {"Service": service, "ID": id, "Port": port}
        });
        cluster
            .http
            .put(format!("{}/v1/catalog/register", cluster.servers[0].http()))
            .json(&body)
            .send()
    };
    ensure!(register("web", "web-1", 80).await?.status() == 200);
    ensure!(register("db", "db-1", 5432).await?.status() == 200);
    let index = index_of(&cluster, 1, "/v1/health/service/web").await?;
    let url = format!(
        "{}/v1/health/service/web?index={index}&wait=2s",
        cluster.servers[1].http()
    );
    let waiting = blocking_get(&cluster, url.clone());
    parked(&cluster, 1, 1.0).await?;
    ensure!(register("db", "db-2", 5433).await?.status() == 200);
    let (_, answered, body, elapsed) = waiting.await??;
    ensure!(answered == index, "a change to db woke the web query");
    ensure!(
        elapsed >= Duration::from_secs(2),
        "returned after {elapsed:?}"
    );
    ensure!(body.contains("web-1") && !body.contains("db-2"), "{body}");
    // A change to web wakes it.
    let waiting = blocking_get(&cluster, url.replace("wait=2s", "wait=30s"));
    parked(&cluster, 1, 1.0).await?;
    ensure!(register("web", "web-2", 81).await?.status() == 200);
    let (_, answered, body, elapsed) = waiting.await??;
    ensure!(answered > index && body.contains("web-2"), "{body}");
    ensure!(elapsed < Duration::from_secs(15), "woke after {elapsed:?}");
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_adds_a_fourth_server_that_receives_all_data() -> Result<()> {
    let mut cluster = Cluster::start(
        3,
        &[
            "--snapshot-threshold",
            "40",
            "--snapshot-interval-ms",
            "100",
        ],
    )
    .await?;
    for n in 0..100 {
        cluster
            .must_put(n % 3, &format!("j/{n:03}"), &format!("v{n}"))
            .await?;
    }
    let fourth = cluster.add_joining_server(
        1,
        &[
            "--snapshot-threshold",
            "40",
            "--snapshot-interval-ms",
            "100",
        ],
    );
    cluster.servers[fourth].start(&[])?;
    wait_for("four voters", Duration::from_secs(30), || async {
        let resp = cluster
            .http
            .get(format!("{}/v1/status/peers", cluster.servers[0].http()))
            .send()
            .await
            .ok()?;
        let peers: Vec<String> = resp.json().await.ok()?;
        (peers.len() == 4).then_some(())
    })
    .await?;
    wait_for(
        "the new server to have every key",
        Duration::from_secs(20),
        || async {
            let resp = cluster
                .http
                .get(format!(
                    "{}/v1/kv/j/?keys&stale",
                    cluster.servers[fourth].http()
                ))
                .send()
                .await
                .ok()?;
            let keys: Vec<String> = resp.json().await.ok()?;
            (keys.len() == 100).then_some(())
        },
    )
    .await?;
    // It serves writes too, and survives a restart as a member.
    cluster.must_put(fourth, "from/fourth", "hi").await?;
    cluster.servers[fourth].kill().await?;
    cluster.servers[fourth].start(&[])?;
    wait_for(
        "restarted fourth server to serve",
        Duration::from_secs(20),
        || async {
            (cluster
                .get_raw(fourth, "from/fourth", "")
                .await
                .ok()?
                .as_deref()
                == Some("hi"))
            .then_some(())
        },
    )
    .await?;

    // Removing a server through the operator API shrinks the voter set.
    let resp = cluster
        .http
        .delete(format!(
            "{}/v1/operator/raft/peer?id=4",
            cluster.servers[0].http()
        ))
        .send()
        .await?;
    assert_eq!(resp.status(), 200, "{}", resp.text().await?);
    let config: serde_json::Value = cluster
        .http
        .get(format!(
            "{}/v1/operator/raft/configuration",
            cluster.servers[1].http()
        ))
        .send()
        .await?
        .json()
        .await?;
    let servers = config["Servers"].as_array().context("Servers")?;
    assert_eq!(servers.len(), 3, "{config}");
    assert_eq!(servers.iter().filter(|s| s["Leader"] == true).count(), 1);
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_writes_fail_fast_and_stale_reads_work() -> Result<()> {
    let mut cluster = Cluster::start(3, &["--leader-wait-ms", "2000"]).await?;
    cluster.must_put(0, "q", "before").await?;
    let survivor = 2;
    wait_for(
        "the write on every server",
        Duration::from_secs(5),
        || async {
            (cluster
                .get_raw(survivor, "q", "&stale")
                .await
                .ok()?
                .as_deref()
                == Some("before"))
            .then_some(())
        },
    )
    .await?;
    cluster.servers[0].kill().await?;
    cluster.servers[1].kill().await?;

    let started = Instant::now();
    let (status, body) = cluster.put(survivor, "q", b"after", "").await?;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("No cluster leader"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );

    let resp = cluster
        .http
        .get(format!(
            "{}/v1/kv/q?consistent",
            cluster.servers[survivor].http()
        ))
        .send()
        .await?;
    assert_eq!(resp.status(), 500);
    assert_eq!(
        cluster.get_raw(survivor, "q", "&stale").await?.as_deref(),
        Some("before")
    );
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_quorum_fails_writes_in_bounded_time() -> Result<()> {
    let mut cluster = Cluster::start(3, &["--leader-wait-ms", "2000"]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    cluster.must_put(leader, "q", "before").await?;
    for follower in cluster.followers(leader) {
        cluster.servers[follower].kill().await?;
    }
    let started = Instant::now();
    let (status, body) = cluster.put(leader, "q", b"after", "").await?;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("No cluster leader"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let resp = cluster
        .http
        .get(format!(
            "{}/v1/kv/q?consistent",
            cluster.servers[leader].http()
        ))
        .send()
        .await?;
    assert_eq!(resp.status(), 500);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        cluster.get_raw(leader, "q", "&stale").await?.as_deref(),
        Some("before")
    );
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_knows_the_others_by_name_and_version() -> Result<()> {
    let mut cluster = Cluster::new(3, &[])?;
    for (i, server) in cluster.servers.iter_mut().enumerate() {
        server.start(&["--node-name".into(), format!("reg-{}", ["a", "b", "c"][i])])?;
    }
    let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
    // Followers learn the others through the leader's heartbeats.
    for i in 0..3 {
        wait_for(
            &format!("names in server {i}'s raft configuration"),
            Duration::from_secs(10),
            || async {
                let config = cluster
                    .get_json(i, "/v1/operator/raft/configuration?stale")
                    .await?;
                let mut names: Vec<String> = config["Servers"]
                    .as_array()?
                    .iter()
                    .filter_map(|s| s["Node"].as_str().map(str::to_owned))
                    .collect();
                names.sort();
                (names == ["reg-a", "reg-b", "reg-c"]).then_some(())
            },
        )
        .await?;
    }
    let health = cluster
        .get_json(leader, "/v1/operator/autopilot/health")
        .await
        .context("autopilot health")?;
    let servers = health["Servers"].as_array().context("Servers")?;
    ensure!(servers.len() == 3, "{health}");
    for s in servers {
        let name = s["Name"].as_str().unwrap_or_default();
        ensure!(name.starts_with("reg-"), "{health}");
        ensure!(
            s["Version"] == env!("CARGO_PKG_VERSION"),
            "every server reports its version: {health}"
        );
    }
    cluster.done();
    Ok(())
}
