//! Plumbing of the fault suite (`tests/tests/faults.rs`): its
//! prerequisites and lock, a runtime whose threads live in the lab's client
//! namespace, three servers started in the lab, and the after-healing
//! comparison of every server's state (check 6 of issue 8).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::fault_report::Findings;
use crate::lab_cluster::{Cluster, lock_suite};
use crate::linearizable::Outcome;
use crate::netns::Lab;
use crate::workload::{self, ClientLog, Shared};

/// Root, `ip netns` and the lock that runs the fault tests one at a time
/// (two clusters at once on two cores would make both tests about CPU
/// starvation). `None`: skip, with the reason printed — never under CI,
/// where a missing prerequisite is an error.
pub fn prerequisites() -> Result<Option<std::fs::File>> {
    if !Lab::available() {
        // Under CI a skip would pass with nothing proven: fail instead.
        anyhow::ensure!(
            std::env::var_os("CI").is_none(),
            "the fault suite cannot run under CI: it needs root and `ip netns`"
        );
        eprintln!("SKIPPED: the fault suite needs root and `ip netns` (CI runs it as root)");
        return Ok(None);
    }
    lock_suite().map(Some)
}

/// After healing: one leader all servers agree on (check 6a), a barrier
/// write, every server caught up to it with identical contents under
/// `prefixes` (check 6b), and final consistent reads of `keys` through
/// every server appended to the history (so that check 1 also covers
/// check 2: every acknowledged write present or overwritten, on every
/// server).
pub async fn settle_and_compare(
    cluster: &mut Cluster<'_>,
    shared: &Shared,
    keys: &[String],
    prefix: &str,
    log: &mut ClientLog,
    findings: &mut Findings,
) -> Result<()> {
    let leader = match cluster.wait_leader(Duration::from_secs(30)).await {
        Ok(l) => l,
        Err(e) => {
            findings.check("6. one leader after healing", false, e.to_string());
            return Ok(());
        }
    };
    // Every live server names the same leader, within 20 s of healing
    // (a server back from the minority may need an election round).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut leader = leader;
    let (agree, named) = loop {
        let mut named = Vec::new();
        let mut addrs = Vec::new();
        for n in cluster.nodes.iter().filter(|n| n.running()) {
            let url = format!("{}/v1/status/leader", n.http());
            let leader_addr = match cluster.http.get(url).send().await {
                Ok(r) => r.json::<String>().await.unwrap_or_default(),
                Err(e) => format!("error: {e}"),
            };
            named.push(format!("{} -> {leader_addr}", n.host));
            addrs.push(leader_addr);
        }
        let agree = addrs
            .iter()
            .all(|a| *a == cluster.nodes[leader].raft_addr());
        if agree || Instant::now() >= deadline {
            break (agree, named);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(now) = cluster.leader().await {
            leader = now;
        }
    };
    findings.check(
        "6. one leader after healing",
        agree,
        format!(
            "leader {}; {}",
            cluster.nodes[leader].host,
            named.join(", ")
        ),
    );
    // Barrier: a write everyone must reach.
    let barrier_key = format!("{prefix}barrier");
    let target = cluster.nodes[leader].target();
    let value = shared.next_value.fetch_add(1, Ordering::Relaxed);
    let mut barrier_index = 0;
    for _ in 0..20 {
        if workload::write(shared, 900, &target, &barrier_key, value, None, log).await
            == Outcome::Written
        {
            if let Some(Some(seen)) = workload::read(shared, 900, &target, &barrier_key, log).await
            {
                barrier_index = seen.modify_index;
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if barrier_index == 0 {
        findings.check(
            "6. identical state on every server",
            false,
            "the barrier write did not go through",
        );
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let live: Vec<usize> = (0..cluster.nodes.len())
        .filter(|i| cluster.nodes[*i].running())
        .collect();
    let mut dumps = Vec::new();
    loop {
        dumps.clear();
        for &i in &live {
            dumps.push(cluster.dump(i, prefix).await.ok());
        }
        let caught_up = dumps.iter().all(|d| {
            d.as_ref().is_some_and(|(_, entries)| {
                entries
                    .iter()
                    .any(|(k, _, idx)| *k == barrier_key && *idx >= barrier_index)
            })
        });
        if caught_up || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let first = dumps.first().cloned().flatten().map(|(_, e)| e);
    let same = dumps
        .iter()
        .all(|d| d.as_ref().map(|(_, e)| e) == first.as_ref() && d.is_some());
    let mut details = String::new();
    for (i, d) in live.iter().zip(&dumps) {
        let _ = writeln!(
            details,
            "  {}: {}",
            cluster.nodes[*i].host,
            match d {
                Some((idx, entries)) => format!(
                    "index {idx}, {}",
                    entries
                        .iter()
                        .map(|(k, v, m)| format!("{k}={v}@{m}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                None => "no answer".into(),
            }
        );
    }
    findings.check("6. identical state on every server", same, details);
    // Final consistent reads through every server.
    for &i in &live {
        let target = cluster.nodes[i].target();
        for key in keys {
            workload::read(shared, 1000 + i as u32, &target, key, log).await;
        }
    }
    Ok(())
}

/// Runs the test body on a runtime whose threads live in the lab's client
/// namespace.
pub fn in_lab<F, Fut>(hosts: &[&str], body: F) -> Result<()>
where
    F: FnOnce(Arc<Lab>) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let Some(_lock) = prerequisites()? else {
        return Ok(());
    };
    let lab = Arc::new(Lab::create(hosts)?);
    eprintln!(
        "lab {}: {}",
        lab.prefix,
        lab.hosts
            .iter()
            .map(|h| format!("{} {}", h.name, h.ip))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // This thread, and the runtime threads it spawns, open their sockets
    // in the client namespace: the test process itself never has a route
    // to the lab, only its client threads do.
    lab.enter("client")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(body(Arc::clone(&lab)));
    runtime.shutdown_timeout(Duration::from_secs(5));
    drop(lab);
    result
}

/// Servers n1..n3 of `lab` started and agreeing on a leader.
pub async fn three_servers<'a>(lab: &'a Lab, kind: &str, t0: Instant) -> Result<Cluster<'a>> {
    start_three(Cluster::new(lab, &run_name(kind), t0)?).await
}

/// As [`three_servers`], each server keeping the image a power loss would
/// leave of its data dir from its first start (see
/// [`Cluster::power_loss`]).
pub async fn three_servers_with_power_losses<'a>(
    lab: &'a Lab,
    kind: &str,
    t0: Instant,
) -> Result<Cluster<'a>> {
    let mut cluster = Cluster::new(lab, &run_name(kind), t0)?;
    cluster.keep_power_loss_images();
    start_three(cluster).await
}

async fn start_three(mut cluster: Cluster<'_>) -> Result<Cluster<'_>> {
    for i in 0..3 {
        cluster.start(i)?;
    }
    cluster.wait_leader(Duration::from_secs(30)).await?;
    cluster.bootstrap_acls().await?;
    cluster.note("cluster up");
    Ok(cluster)
}

/// `<kind>-<unix seconds>-<pid>`: a run's name, for its report dir.
pub fn run_name(kind: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{kind}-{secs}-{}", std::process::id())
}
