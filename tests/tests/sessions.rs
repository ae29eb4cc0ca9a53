//! Consul sessions and locks on a three-server cluster of real processes:
//! they survive the leader's death and a full restart, a silent holder
//! loses its lock exactly once when its TTL runs out across a leader
//! change, and contending clients never hold one lock at the same time
//! while leaders are killed under them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use meshwork_tests::{Cluster, wait_for};
use serde_json::{Value, json};

/// Creates a session through server `i`; its ID.
async fn create_session(cluster: &Cluster, i: usize, body: Value) -> Result<String> {
    let url = format!("{}/v1/session/create", cluster.servers[i].http());
    let resp = cluster.http.put(url).json(&body).send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    ensure!(
        status.is_success(),
        "session create answered {status}: {text}"
    );
    let value: Value = serde_json::from_str(&text)?;
    value["ID"]
        .as_str()
        .map(str::to_owned)
        .context("no ID in the answer")
}

/// `PUT /v1/session/renew/<id>` through server `i`: its status.
async fn renew(cluster: &Cluster, i: usize, id: &str) -> Result<u16> {
    let url = format!("{}/v1/session/renew/{id}", cluster.servers[i].http());
    Ok(cluster.http.put(url).send().await?.status().as_u16())
}

/// The key's entry as server `i` reads it (`None` when absent).
async fn entry(cluster: &Cluster, i: usize, key: &str) -> Result<Option<Value>> {
    let url = format!("{}/v1/kv/{key}", cluster.servers[i].http());
    let resp = cluster.http.get(url).send().await?;
    match resp.status().as_u16() {
        404 => Ok(None),
        200 => Ok(resp.json::<Vec<Value>>().await?.into_iter().next()),
        other => bail!("GET {key} answered {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_survives_the_leader_and_a_silent_holder_loses_it_exactly_once() -> Result<()> {
    let mut cluster = Cluster::start(3, &[]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let follower = cluster.followers(leader)[0];
    let sid = create_session(
        &cluster,
        follower,
        json!({"Name": "holder", "TTL": "10s", "LockDelay": "0s"}),
    )
    .await?;
    let (status, body) = cluster
        .put(follower, "svc/leader", b"A", &format!("?acquire={sid}"))
        .await?;
    ensure!(
        (status, body.trim()) == (200, "true"),
        "acquire: {status} {body}"
    );
    // A renewal through a follower reaches the leader's clock.
    ensure!(renew(&cluster, follower, &sid).await? == 200);

    cluster.servers[leader].kill().await?;
    let new_leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let watcher_server = cluster.followers(leader)[0];
    for i in cluster.followers(leader) {
        let held = entry(&cluster, i, "svc/leader")
            .await?
            .context("key gone")?;
        ensure!(held["Session"] == sid.as_str(), "server {i}: {held}");
        ensure!(held["LockIndex"] == 1, "{held}");
    }
    // The new leader knows the session: a renewal works there, then the
    // holder falls silent.
    ensure!(renew(&cluster, new_leader, &sid).await? == 200);
    let last_renewal = Instant::now();

    // Watch every change of the key through blocking queries, from before
    // the expiry to after it.
    let watch_url = format!(
        "{}/v1/kv/svc/leader",
        cluster.servers[watcher_server].http()
    );
    let http = cluster.http.clone();
    let watcher = tokio::spawn(async move {
        let mut seen: Vec<Value> = Vec::new();
        let mut index = 0u64;
        let deadline = Instant::now() + Duration::from_secs(45);
        while Instant::now() < deadline && seen.len() < 50 {
            let Ok(resp) = http
                .get(format!("{watch_url}?index={index}&wait=5s"))
                .send()
                .await
            else {
                continue;
            };
            let next: u64 = resp
                .headers()
                .get("x-consul-index")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(index);
            let body: Vec<Value> = resp.json().await.unwrap_or_default();
            if next != index {
                seen.extend(body);
                index = next;
            }
            if seen.last().is_some_and(|e| e.get("Session").is_none()) {
                // Released: one more wait, to catch a second release.
                if let Ok(resp) = http
                    .get(format!("{watch_url}?index={index}&wait=3s"))
                    .send()
                    .await
                {
                    let moved = resp
                        .headers()
                        .get("x-consul-index")
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .is_some_and(|next| next != index);
                    if moved {
                        seen.extend(resp.json::<Vec<Value>>().await.unwrap_or_default());
                    }
                }
                break;
            }
        }
        seen
    });

    // Past its TTL the session still lives (Consul's 2x grace)...
    tokio::time::sleep_until((last_renewal + Duration::from_secs(13)).into()).await;
    let held = entry(&cluster, new_leader, "svc/leader")
        .await?
        .context("key gone")?;
    ensure!(
        held["Session"] == sid.as_str(),
        "the lock went before twice the TTL: {held}"
    );
    // ...and well before four TTLs it is gone, the key kept (release).
    let released = wait_for(
        "the silent holder's lock to go",
        Duration::from_secs(25),
        || async {
            let e = entry(&cluster, new_leader, "svc/leader").await.ok()??;
            e.get("Session").is_none().then_some(e)
        },
    )
    .await?;
    let after = last_renewal.elapsed();
    ensure!(
        after <= Duration::from_secs(30),
        "released {after:?} after the last renewal"
    );
    ensure!(
        released["LockIndex"] == 1 && released["Value"] == "QQ==",
        "{released}"
    );
    ensure!(
        renew(&cluster, new_leader, &sid).await? == 404,
        "an expired session renewed"
    );

    let seen = watcher.await?;
    let releases = seen
        .windows(2)
        .filter(|w| w[0].get("Session").is_some() && w[1].get("Session").is_none())
        .count()
        + usize::from(seen.first().is_some_and(|e| e.get("Session").is_none()));
    ensure!(
        releases == 1,
        "the lock was released {releases} times: {seen:?}"
    );
    ensure!(
        seen.iter().all(|e| e["LockIndex"] == 1),
        "the lock was taken again: {seen:?}"
    );
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_locks_survive_a_snapshot_and_a_full_restart() -> Result<()> {
    let mut cluster = Cluster::start(3, &[]).await?;
    let sid = create_session(&cluster, 0, json!({"Name": "durable", "LockDelay": "0s"})).await?;
    let (status, body) = cluster
        .put(1, "durable/lock", b"v", &format!("?acquire={sid}"))
        .await?;
    ensure!(
        (status, body.trim()) == (200, "true"),
        "acquire: {status} {body}"
    );
    for i in 0..3 {
        let url = format!("{}/v1/operator/raft/snapshot", cluster.servers[i].http());
        let resp = cluster.http.put(url).send().await?;
        ensure!(
            resp.status().is_success(),
            "snapshot on {i}: {}",
            resp.status()
        );
    }
    for server in &mut cluster.servers {
        server.kill().await?;
    }
    for server in &mut cluster.servers {
        server.start(&[])?;
    }
    cluster.wait_leader(Duration::from_secs(20)).await?;
    for i in 0..3 {
        let held = wait_for(
            "the lock after restart",
            Duration::from_secs(10),
            || async { entry(&cluster, i, "durable/lock").await.ok()? },
        )
        .await?;
        ensure!(
            held["Session"] == sid.as_str() && held["LockIndex"] == 1,
            "{held}"
        );
        let info = cluster
            .get_json(i, &format!("/v1/session/info/{sid}"))
            .await
            .context("session info")?;
        ensure!(info[0]["Name"] == "durable", "{info}");
    }
    // The restored session still governs its lock.
    let url = format!("{}/v1/session/destroy/{sid}", cluster.servers[2].http());
    ensure!(cluster.http.put(url).send().await?.status().is_success());
    let held = entry(&cluster, 2, "durable/lock")
        .await?
        .context("key gone")?;
    ensure!(held.get("Session").is_none(), "{held}");
    cluster.done();
    Ok(())
}

/// One client's view of holding the lock: from the acknowledged acquire
/// to the moment it sent its release.
#[derive(Debug, Clone, Copy)]
struct Held {
    client: usize,
    from: Instant,
    to: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contending_clients_never_hold_one_lock_together_while_leaders_die() -> Result<()> {
    const CLIENTS: usize = 4;
    let mut cluster = Cluster::start(3, &[]).await?;
    let mut sessions = Vec::new();
    for c in 0..CLIENTS {
        sessions.push(
            create_session(
                &cluster,
                c % 3,
                json!({"Name": format!("contender-{c}"), "LockDelay": "0s"}),
            )
            .await?,
        );
    }
    let urls: Arc<Vec<String>> = Arc::new(cluster.servers.iter().map(|s| s.http()).collect());
    let stop_at = Instant::now() + Duration::from_secs(20);
    let mut clients = tokio::task::JoinSet::new();
    for (c, sid) in sessions.into_iter().enumerate() {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()?;
        let urls = Arc::clone(&urls);
        clients.spawn(async move {
            let mut held: Vec<Held> = Vec::new();
            let mut attempt = c;
            for _ in 0..10_000 {
                if Instant::now() >= stop_at {
                    break;
                }
                attempt += 1;
                let base = &urls[attempt % urls.len()];
                let acquired = http
                    .put(format!("{base}/v1/kv/contended?acquire={sid}"))
                    .body(format!("client {c}"))
                    .send()
                    .await;
                let Ok(resp) = acquired else { continue };
                if resp.text().await.ok().as_deref().map(str::trim) != Some("true") {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let from = Instant::now();
                tokio::time::sleep(Duration::from_millis(20)).await;
                let to = Instant::now();
                held.push(Held {
                    client: c,
                    from,
                    to,
                });
                // Release until it is acknowledged (the lock stays this
                // client's meanwhile, so nobody else may take it).
                for _ in 0..100 {
                    let base = &urls[attempt % urls.len()];
                    attempt += 1;
                    let released = http
                        .put(format!("{base}/v1/kv/contended?release={sid}"))
                        .send()
                        .await;
                    if let Ok(resp) = released
                        && resp.text().await.ok().as_deref().map(str::trim) == Some("true")
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            held
        });
    }
    // Kill the leader twice under them, restarting it each time.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
        cluster.servers[leader].kill().await?;
        cluster.wait_leader(Duration::from_secs(10)).await?;
        cluster.servers[leader].start(&[])?;
    }
    let mut all: Vec<Held> = Vec::new();
    while let Some(held) = clients.join_next().await {
        all.extend(held?);
    }
    all.sort_by_key(|h| h.from);
    ensure!(all.len() >= 20, "only {} acquisitions in 20 s", all.len());
    let holders: std::collections::BTreeSet<usize> = all.iter().map(|h| h.client).collect();
    ensure!(holders.len() > 1, "one client took every turn: {holders:?}");
    for pair in all.windows(2) {
        ensure!(
            pair[1].from >= pair[0].to,
            "clients {} and {} held the lock together: {pair:?}",
            pair[0].client,
            pair[1].client
        );
    }
    cluster.done();
    Ok(())
}

/// A leader whose followers stop answering keeps no session alive on its
/// own say-so: once a quorum has not confirmed it for half an election
/// timeout, renewals fail (while the majority side, in a real partition,
/// would elect a leader that expires them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_quorum_stops_confirming_renewals() -> Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let sid = create_session(&cluster, leader, json!({"TTL": "10s", "LockDelay": "0s"})).await?;
    ensure!(renew(&cluster, leader, &sid).await? == 200);
    let followers = cluster.followers(leader);
    for f in &followers {
        cluster.signal(*f, "STOP")?;
    }
    let resume = meshwork_tests::Resume(&cluster, followers);
    let stopped = Instant::now();
    let refused = wait_for("a renewal refused", Duration::from_secs(20), || async {
        let status = renew(&cluster, leader, &sid).await.ok()?;
        (status != 200).then_some(status)
    })
    .await?;
    let took = stopped.elapsed();
    ensure!(refused >= 500, "renewal answered {refused}");
    // Bounded by the leader wait (a renewal waits that long for a quorum
    // before it fails), well inside the 10 s TTL.
    ensure!(
        took < Duration::from_secs(10),
        "renewals kept succeeding for {took:?}"
    );
    drop(resume);
    // The quorum back, renewals succeed again (through whoever leads).
    let any = cluster.wait_leader(Duration::from_secs(10)).await?;
    wait_for(
        "renewals to work again",
        Duration::from_secs(20),
        || async { (renew(&cluster, any, &sid).await.ok()? == 200).then_some(()) },
    )
    .await?;
    cluster.done();
    Ok(())
}
