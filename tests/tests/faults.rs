//! The fault suite (issue 8): three real `meshwork-registry` processes in
//! network namespaces (hosts in 198.18.0.0/15 on a bridge of their own; a
//! client namespace drives the workload), faults injected and healed, and
//! the recorded history checked.
//!
//! Three tests, run one after the other (a lock file, and a nextest test
//! group). The servers are driven by `meshwork_tests::lab_cluster`, the
//! network by `meshwork_tests::netns`, the workload and watcher by
//! `meshwork_tests::workload`, the verdicts and report by
//! `meshwork_tests::fault_report`, and the suite's plumbing (prerequisites,
//! the lab runtime, the after-healing comparison) is in
//! `meshwork_tests::fault_suite`:
//!
//! - `partitions_pauses_crashes_and_membership_changes`: random faults
//!   (leader isolated, majority/minority splits with the client still
//!   reaching both sides, one-way loss, kill -9 of the leader / a follower
//!   / all three, SIGSTOP of the leader past the election timeout, a server
//!   added and removed while a follower is down; Raft snapshots forced
//!   every few dozen entries throughout) under clients doing read / write /
//!   CAS through every server and a watcher on the key prefix. Checks 1, 2,
//!   4 (samples), 5 and 6 of the issue.
//! - `kill_9_loop_loses_no_acknowledged_write`: cycles of kill -9 mid-write
//!   (every tenth all three; every fourth the leader, kept down until
//!   another server acknowledges a write: a failover sample; two cycles
//!   later the leader, restarted at once; otherwise a random follower),
//!   restarted on the same data; a third of the cycles, and every other
//!   all-three one, are power losses instead: the servers keep the image a
//!   power loss would leave of their data dirs (each file as of its last
//!   sync, each directory as of its last sync: the registry's
//!   `storage::durable` seam, debug builds) and the cycle puts it in place
//!   before the restart; checks 3, 4, 1, 6.
//!
//! Both also run three lock contenders (`meshwork_tests::lock_client`):
//! sessions with a 10 s TTL, acquire, hold, release on one key, recreating
//! a session that is gone. Check 7 (issue 20) holds their history to
//! mutual exclusion — no two holders' safe intervals overlap, from an
//! acquire's completion to the release's invocation or the session's TTL
//! bound — and the lock's Session and LockIndex read back to the
//! acquisitions (`meshwork_tests::lock_history`).
//! - `restarted_leader_serves_no_stale_consistent_read`: the stale read the
//!   kill -9 loop finds, on its own (loopback, no root needed).
//!
//! Each run writes `target/faults/<run>/report.txt` (path printed) with the
//! faults, operation counts, anomalies with minimal histories, and failover
//! times; the full history and the server logs sit next to it.
//!
//! The servers run as installed clusters do: mutual TLS between them
//! (certificates from `meshctl tls`, server names checked) and ACLs with
//! default deny, every request of the workload resolved through the ACL
//! tables (their default token is the bootstrapped management token);
//! `MESHWORK_FAULTS_PLAIN=1` runs them without either.
//!
//! Quick mode by default; `MESHWORK_FAULTS_LONG=1` for a soak run,
//! `MESHWORK_FAULTS_SECS` / `MESHWORK_FAULTS_COUNT` (at least that long and
//! that many faults) and `MESHWORK_FAULTS_CYCLES` (kill -9 cycles) to set
//! the length,
//! `MESHWORK_FAULTS_KINDS=IsolateLeader,…` to inject only some kinds (to
//! measure one kind's failover over many episodes; refused under CI),
//! `MESHWORK_FAULTS_RUST_LOG` for the servers' log filter, and
//! `MESHWORK_REGISTRY_BIN` to run a release build. The report gives the
//! failover distribution per kind of leader loss. Without root the tests
//! skip and say so (under `CI` they fail instead).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meshwork_tests::fault_report::{
    Findings, check_failover_target, check_linearizable, check_locks, conclude, failover_from_acks,
    failover_samples, write_report,
};
use meshwork_tests::fault_suite::{
    in_lab, settle_and_compare, three_servers, three_servers_with_power_losses,
};
use meshwork_tests::lab_cluster::{Cluster, ELECTION_TIMEOUT_MS, Node, lock_suite};
use meshwork_tests::linearizable::{Call, Outcome};
use meshwork_tests::lock_client::{self, LockSettings};
use meshwork_tests::lock_history::LockOp;
use meshwork_tests::workload::{self, ClientLog, Mix, Observation, Shared, SplitMix, WatchLog};

/// Client per-request timeout: past it a write is unknown.
const OP_TIMEOUT: Duration = Duration::from_millis(2000);

/// The failover prober's key (outside the keys the checks read), how
/// often it writes, and how long it waits for one server before the next
/// (see `workload::run_prober`).
const PROBE_KEY: &str = "probe/failover";
const PROBE_EVERY: Duration = Duration::from_millis(10);
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// Starts the failover prober on every server of `cluster`.
fn spawn_prober(
    shared: &Shared,
    cluster: &Cluster<'_>,
) -> tokio::task::JoinHandle<Vec<(u64, u64)>> {
    tokio::spawn(workload::run_prober(
        shared.clone(),
        cluster.targets(),
        PROBE_KEY.into(),
        PROBE_EVERY,
        PROBE_TIMEOUT,
    ))
}

/// The lock the lock contenders take turns at (outside the prefixes the
/// other checks read), how many contend, and the fewest acquisitions a
/// run must check under CI: quick runs checked 23-45 in the partition test
/// and about 150 in the kill loop on a quiet machine, but a CI run sharing
/// the 2 cores with a build checked 4 (45 acquire calls of unknown outcome
/// while servers were cut off). The floor only proves the check ran on a
/// real history (its power to fail is in `lock_history`'s unit tests).
const LOCK_KEY: &str = "locks/leader";
const LOCK_CONTENDERS: u32 = 3;
const MIN_LOCK_HOLDINGS: usize = 3;

/// Starts the lock contenders (clients 500..) on every server of
/// `cluster`: sessions with a 10 s TTL (Consul's shortest) renewed every
/// 2 s and no lock-delay, holds of 50-300 ms.
fn spawn_lock_clients(shared: &Shared, cluster: &Cluster<'_>) -> tokio::task::JoinSet<Vec<LockOp>> {
    let mut contenders = tokio::task::JoinSet::new();
    for c in 0..LOCK_CONTENDERS {
        contenders.spawn(lock_client::run_lock_client(
            shared.clone(),
            500 + c,
            cluster.targets(),
            LockSettings {
                key: LOCK_KEY.into(),
                ttl: Duration::from_secs(10),
                renew_every: Duration::from_secs(2),
                hold: (Duration::from_millis(50), Duration::from_millis(300)),
                max_ops: 100_000,
            },
        ));
    }
    contenders
}

/// Once the contenders have stopped and the cluster has settled: their
/// history with final reads through every server, checked (issue 20).
async fn check_lock_contenders(
    contenders: tokio::task::JoinSet<Vec<LockOp>>,
    shared: &Shared,
    cluster: &Cluster<'_>,
    findings: &mut Findings,
) -> Result<()> {
    let mut contenders = contenders;
    let mut ops = Vec::new();
    while let Some(joined) = contenders.join_next().await {
        ops.extend(joined.context("lock contender task")?);
    }
    let final_from = shared.now();
    ops.extend(lock_client::final_reads(shared, &cluster.targets(), LOCK_KEY).await);
    check_locks(
        &ops,
        final_from,
        MIN_LOCK_HOLDINGS,
        cluster,
        findings,
        "7. locks: never two holders at once; Session and LockIndex read back agree with the acquisitions",
    );
    Ok(())
}

/// The run's settings, for the report's header.
fn setup(mode: Mode) -> String {
    format!(
        "mode: {} ; election timeout {ELECTION_TIMEOUT_MS} ms, heartbeat 100 ms, client timeout {OP_TIMEOUT:?} ; failover prober: a write every {PROBE_EVERY:?}, {PROBE_TIMEOUT:?} per server before the next",
        if mode.long { "long" } else { "quick" }
    )
}

/// How much to do.
#[derive(Debug, Clone, Copy)]
struct Mode {
    long: bool,
    /// Seconds of random faults in the partition test...
    fault_secs: u64,
    /// ...and at least this many faults.
    fault_count: u64,
    kill_cycles: u32,
}

fn mode() -> Mode {
    let mut mode = if std::env::var("MESHWORK_FAULTS_LONG").is_ok_and(|v| v == "1") {
        Mode {
            long: true,
            fault_secs: 480,
            fault_count: 500,
            kill_cycles: 1000,
        }
    } else {
        Mode {
            long: false,
            fault_secs: 60,
            fault_count: 0,
            kill_cycles: 200,
        }
    };
    // Overrides, for tuning and for reproducing a failure quickly.
    let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(secs) = number("MESHWORK_FAULTS_SECS") {
        mode.fault_secs = secs;
    }
    if let Some(count) = number("MESHWORK_FAULTS_COUNT") {
        mode.fault_count = count;
    }
    if let Some(cycles) = number("MESHWORK_FAULTS_CYCLES") {
        mode.kill_cycles = cycles as u32;
    }
    mode
}

/// The fault kinds to inject: all of them, or (for measuring one kind
/// over many episodes) those named in `MESHWORK_FAULTS_KINDS`, e.g.
/// `IsolateLeader,SplitLeaderFromFollowers`. Refused under CI: CI runs
/// every kind.
fn fault_kinds() -> Result<Vec<Fault>> {
    let Ok(names) = std::env::var("MESHWORK_FAULTS_KINDS") else {
        return Ok(FAULTS.to_vec());
    };
    anyhow::ensure!(
        std::env::var_os("CI").is_none(),
        "MESHWORK_FAULTS_KINDS is for measurements; under CI every fault kind runs"
    );
    names
        .split(',')
        .map(|name| {
            FAULTS
                .iter()
                .copied()
                .find(|f| format!("{f:?}") == name.trim())
                .with_context(|| {
                    format!(
                        "MESHWORK_FAULTS_KINDS: no fault kind {name:?}; the kinds are {FAULTS:?}"
                    )
                })
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    IsolateLeader,
    SplitLeaderFromFollowers,
    SplitFollowerFromRest,
    OneWayLeaderDeaf,
    OneWayLeaderMute,
    KillLeader,
    KillFollower,
    KillAll,
    PauseLeader,
    MembershipDuringFollowerCrash,
    SnapshotWhileFollowerCut,
}

const FAULTS: [Fault; 11] = [
    Fault::IsolateLeader,
    Fault::SplitLeaderFromFollowers,
    Fault::SplitFollowerFromRest,
    Fault::OneWayLeaderDeaf,
    Fault::OneWayLeaderMute,
    Fault::KillLeader,
    Fault::KillFollower,
    Fault::KillAll,
    Fault::PauseLeader,
    Fault::MembershipDuringFollowerCrash,
    Fault::SnapshotWhileFollowerCut,
];

impl Fault {
    /// Whether the leader is lost (a failover sample).
    fn loses_leader(self) -> bool {
        matches!(
            self,
            Fault::IsolateLeader
                | Fault::SplitLeaderFromFollowers
                | Fault::KillLeader
                | Fault::KillAll
                | Fault::PauseLeader
        )
    }
}

/// Injects `fault`, holds it for `hold`, heals. Returns the time (ms) the
/// leader was lost, for failover samples.
async fn inject(
    cluster: &mut Cluster<'_>,
    fault: Fault,
    hold: Duration,
    rng: &mut SplitMix,
    next_id: &mut u64,
) -> Result<Option<u64>> {
    let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let follower = followers[rng.below(2) as usize];
    let lab = cluster.lab;
    let name = |i: usize| format!("n{}", i + 1);
    let (l, f1, f2) = (name(leader), name(followers[0]), name(followers[1]));
    // The loss counts from when the fault is in place, not from before
    // the command that puts it there.
    let mut at = cluster.now_ms();
    match fault {
        Fault::IsolateLeader => {
            lab.isolate(&l)?;
            at = cluster.now_ms();
            cluster.note(format!("isolate leader {l} (link down) for {hold:?}"));
            tokio::time::sleep(hold).await;
        }
        Fault::SplitLeaderFromFollowers => {
            lab.split(&[&l], &[&f1, &f2])?;
            at = cluster.now_ms();
            cluster.note(format!(
                "split {{{l}}} | {{{f1}, {f2}}} (leader in the minority; the client reaches both) for {hold:?}"
            ));
            tokio::time::sleep(hold).await;
        }
        Fault::SplitFollowerFromRest => {
            let f = name(follower);
            let others: Vec<String> = (0..3).filter(|i| *i != follower).map(name).collect();
            lab.split(&[&f], &[&others[0], &others[1]])?;
            cluster.note(format!(
                "split {{{f}}} | {{{}, {}}} (follower in the minority) for {hold:?}",
                others[0], others[1]
            ));
            tokio::time::sleep(hold).await;
        }
        Fault::OneWayLeaderDeaf => {
            lab.drop_from(&f1, &l)?;
            lab.drop_from(&f2, &l)?;
            cluster.note(format!(
                "one-way loss: leader {l} drops everything from {f1} and {f2} for {hold:?}"
            ));
            tokio::time::sleep(hold).await;
        }
        Fault::OneWayLeaderMute => {
            lab.drop_from(&l, &f1)?;
            lab.drop_from(&l, &f2)?;
            cluster.note(format!(
                "one-way loss: {f1} and {f2} drop everything from leader {l} for {hold:?}"
            ));
            tokio::time::sleep(hold).await;
        }
        Fault::KillLeader => {
            cluster.kill(leader).await?;
            at = cluster.now_ms();
            cluster.note(format!("kill -9 leader {l}; down for {hold:?}"));
            tokio::time::sleep(hold).await;
            cluster.start(leader)?;
            cluster.note(format!("restart {l}"));
        }
        Fault::KillFollower => {
            let f = name(follower);
            cluster.kill(follower).await?;
            cluster.note(format!("kill -9 follower {f}; down for {hold:?}"));
            tokio::time::sleep(hold).await;
            cluster.start(follower)?;
            cluster.note(format!("restart {f}"));
        }
        Fault::KillAll => {
            for i in 0..3 {
                cluster.kill(i).await?;
            }
            at = cluster.now_ms();
            cluster.note(format!("kill -9 all three; down for {hold:?}"));
            tokio::time::sleep(hold).await;
            for i in 0..3 {
                cluster.start(i)?;
            }
            cluster.note("restart all three");
        }
        Fault::PauseLeader => {
            cluster.signal(leader, "-STOP")?;
            at = cluster.now_ms();
            cluster.note(format!(
                "SIGSTOP leader {l} for {hold:?} (election timeout {ELECTION_TIMEOUT_MS} ms)"
            ));
            tokio::time::sleep(hold).await;
            cluster.signal(leader, "-CONT")?;
            cluster.note(format!("SIGCONT {l}"));
        }
        Fault::MembershipDuringFollowerCrash => {
            membership_change(cluster, leader, follower, next_id).await?;
        }
        Fault::SnapshotWhileFollowerCut => {
            // The cut follower falls behind a snapshot and a purged log:
            // after the heal it catches up by InstallSnapshot.
            let f = name(follower);
            lab.isolate(&f)?;
            cluster.note(format!(
                "isolate follower {f}; forced Raft snapshots on the other two; hold {hold:?}"
            ));
            tokio::time::sleep(hold / 2).await;
            for i in (0..3).filter(|i| *i != follower) {
                let url = format!("{}/v1/operator/raft/snapshot", cluster.nodes[i].http());
                let answer = match cluster.http.put(url).send().await {
                    Ok(resp) => format!(
                        "{} {}",
                        resp.status(),
                        resp.text().await.unwrap_or_default()
                    ),
                    Err(e) => format!("failed: {e}"),
                };
                cluster.note(format!("snapshot on {}: {}", name(i), answer.trim()));
            }
            tokio::time::sleep(hold / 2).await;
        }
    }
    lab.heal()?;
    if !matches!(
        fault,
        Fault::KillLeader
            | Fault::KillFollower
            | Fault::KillAll
            | Fault::PauseLeader
            | Fault::MembershipDuringFollowerCrash
    ) {
        cluster.note("heal");
    }
    Ok(fault.loses_leader().then_some(at))
}

/// A follower is killed; meanwhile a new server joins (learner, then
/// voter) and, once the follower is back, is removed again.
async fn membership_change(
    cluster: &mut Cluster<'_>,
    leader: usize,
    follower: usize,
    next_id: &mut u64,
) -> Result<()> {
    let f = format!("n{}", follower + 1);
    cluster.kill(follower).await?;
    cluster.note(format!("membership: kill -9 follower {f}"));
    let id = *next_id;
    *next_id += 1;
    let join = ["--join".to_owned(), cluster.nodes[leader].raft_addr()];
    let new = cluster.add_node(id, "n4", &join)?;
    cluster.start(new)?;
    cluster.note(format!(
        "membership: server {id} on n4 joins via {} while {f} is down",
        cluster.nodes[leader].host
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut added = false;
    while Instant::now() < deadline {
        if let Some(l) = cluster.leader().await
            && cluster.voters(l).await.is_some_and(|v| v.contains(&id))
        {
            added = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.note(format!(
        "membership: server {id} {}",
        if added {
            "is a voter"
        } else {
            "did NOT become a voter within 30 s"
        }
    ));
    cluster.start(follower)?;
    cluster.note(format!("membership: restart {f}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut removed = false;
    while Instant::now() < deadline {
        if let Some(l) = cluster.leader().await {
            let url = format!("{}/v1/operator/raft/peer?id={id}", cluster.nodes[l].http());
            let ok = cluster
                .http
                .delete(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok && cluster.voters(l).await.is_some_and(|v| !v.contains(&id)) {
                removed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    cluster.note(format!(
        "membership: server {id} {}",
        if removed {
            "removed"
        } else {
            "NOT removed within 30 s"
        }
    ));
    cluster.kill(new).await?;
    if !added || !removed {
        bail!("membership change did not complete (added {added}, removed {removed})");
    }
    Ok(())
}

/// Issue 8, checks 1, 2, 4, 5, 6 under random faults.
#[test]
fn partitions_pauses_crashes_and_membership_changes() -> Result<()> {
    in_lab(&["n1", "n2", "n3", "n4", "client"], |lab| async move {
        let mode = mode();
        let t0 = Instant::now();
        let mut cluster = three_servers(&lab, "partitions", t0).await?;
        let mut findings = Findings::default();
        let shared = Shared::new(t0, OP_TIMEOUT)?;
        let keys: Vec<String> = (0..4).map(|k| format!("f/k{k}")).collect();
        let mut clients = tokio::task::JoinSet::new();
        let prober = spawn_prober(&shared, &cluster);
        let contenders = spawn_lock_clients(&shared, &cluster);
        for c in 0..5 {
            clients.spawn(workload::run_client(
                shared.clone(),
                c,
                cluster.targets(),
                keys.clone(),
                Mix {
                    read: 40,
                    write: 30,
                },
                Duration::from_millis(20),
                200_000,
            ));
        }
        let watcher_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher_at = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let watcher = tokio::spawn(workload::run_watcher(
            cluster.nodes.iter().take(3).map(Node::grpc).collect(),
            "f/".into(),
            Duration::from_secs(2),
            Arc::clone(&watcher_stop),
            Arc::clone(&watcher_at),
        ));

        // Faults: every kind once (in random order), then random ones
        // until the time is up; each held for 1.5-4 s, then healed.
        let mut rng = SplitMix(t0.elapsed().as_nanos() as u64 ^ u64::from(std::process::id()));
        let mut order: Vec<Fault> = fault_kinds()?;
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        if !lab.iptables {
            // Under CI every fault kind must run: a kind left out would
            // pass unproven.
            anyhow::ensure!(
                std::env::var_os("CI").is_none(),
                "iptables is not available under CI: splits and one-way loss (4 of the fault kinds) cannot run"
            );
            order.retain(|f| {
                !matches!(
                    f,
                    Fault::SplitLeaderFromFollowers
                        | Fault::SplitFollowerFromRest
                        | Fault::OneWayLeaderDeaf
                        | Fault::OneWayLeaderMute
                )
            });
            findings
                .notes
                .push("iptables not available: splits and one-way loss skipped".into());
        }
        let budget = Duration::from_secs(mode.fault_secs);
        let mut losses = Vec::new();
        let mut injected = 0;
        let mut next_id = 4;
        let mut fault_errors = Vec::new();
        for n in 0..10_000 {
            if n >= order.len() && t0.elapsed() >= budget && n as u64 >= mode.fault_count {
                break;
            }
            let fault = if n < order.len() {
                order[n]
            } else {
                order[rng.below(order.len() as u64) as usize]
            };
            let hold = Duration::from_millis(1500 + rng.below(2500));
            match inject(&mut cluster, fault, hold, &mut rng, &mut next_id).await {
                Ok(loss) => losses.extend(loss.map(|at| (fault, at))),
                Err(e) => {
                    cluster.note(format!("fault {fault:?} went wrong: {e:#}"));
                    fault_errors.push(format!("{fault:?}: {e:#}"));
                    let _ = lab.heal();
                }
            }
            injected += 1;
            // Recover, then a moment of calm with the workload running.
            if let Err(e) = cluster.wait_leader(Duration::from_secs(20)).await {
                fault_errors.push(format!("after {fault:?}: {e:#}"));
            }
            tokio::time::sleep(Duration::from_millis(500 + rng.below(1000))).await;
        }
        cluster.note(format!("{injected} faults injected; stopping the workload"));
        shared.stop.store(true, Ordering::Relaxed);
        let probes = prober.await.context("prober task")?;
        let mut log = ClientLog::default();
        while let Some(joined) = clients.join_next().await {
            let mut one = joined.context("client task")?;
            log.ops.append(&mut one.ops);
            log.observed.append(&mut one.observed);
        }
        lab.heal()?;
        settle_and_compare(&mut cluster, &shared, &keys, "f/", &mut log, &mut findings).await?;
        check_lock_contenders(contenders, &shared, &cluster, &mut findings).await?;

        // Let the watcher catch up with what the reads saw (at most 30 s;
        // check 5 fails if it did not), then stop it.
        let target_index = log
            .observed
            .iter()
            .map(|(_, o)| o.modify_index)
            .max()
            .unwrap_or(0);
        let caught_up = Instant::now() + Duration::from_secs(30);
        while watcher_at.load(Ordering::Relaxed) < target_index && Instant::now() < caught_up {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        watcher_stop.store(true, Ordering::Relaxed);
        let watch: WatchLog = tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .context("watcher did not stop")??;

        findings.check(
            "faults injected and healed",
            fault_errors.is_empty(),
            if fault_errors.is_empty() {
                format!("{injected} faults")
            } else {
                fault_errors.join("\n")
            },
        );
        check_linearizable(
            &log.ops,
            &cluster.timeline,
            &mut findings,
            "1+2. linearizable per key, final reads on every server included",
        );
        let mut all_obs = log.observed.clone();
        all_obs.extend(watch.seen.iter().cloned());
        let conflicts = workload::index_value_conflicts(&all_obs);
        findings.check(
            "1. ModifyIndex <-> value one to one (no write applied twice)",
            conflicts.is_empty(),
            conflicts.join("\n"),
        );
        check_watch(&watch, &log.observed, target_index, &cluster, &mut findings).await;
        for kind in FAULTS.iter().filter(|f| f.loses_leader()) {
            let at: Vec<u64> = losses
                .iter()
                .filter(|(f, _)| f == kind)
                .map(|(_, at)| *at)
                .collect();
            if at.is_empty() {
                continue;
            }
            let probed = failover_from_acks(probes.clone(), &at);
            match kind {
                Fault::KillLeader => check_failover_target(
                    &mut findings,
                    "kill -9 of the leader",
                    &probed,
                    1000,
                    100,
                ),
                Fault::IsolateLeader => check_failover_target(
                    &mut findings,
                    "the leader's isolation",
                    &probed,
                    2000,
                    100,
                ),
                _ => {}
            }
            findings
                .failover
                .push((format!("{kind:?}, prober"), probed));
            findings.failover.push((
                format!("{kind:?}, workload clients"),
                failover_samples(&log.ops, &at),
            ));
        }
        let mut snapshots = Vec::new();
        for i in 0..3 {
            let taken = cluster.metric(i, "meshwork_snapshots_total").await;
            let index = cluster.metric(i, "meshwork_raft_snapshot_index").await;
            snapshots.push(format!(
                "n{}: {taken:?} taken since its last start, latest at index {index:?}",
                i + 1
            ));
        }
        findings.notes.push(format!(
            "snapshots forced by --snapshot-threshold 64 and PUT /v1/operator/raft/snapshot: {}",
            snapshots.join("; ")
        ));
        let path = write_report(
            &cluster,
            "Fault suite: partitions, pauses, crashes, membership",
            &setup(mode),
            &findings,
            &log.ops,
            "",
        )?;
        cluster.done = true;
        conclude(&path, &findings)
    })
}

async fn check_watch(
    watch: &WatchLog,
    reads: &[(String, Observation)],
    target_index: u64,
    cluster: &Cluster<'_>,
    findings: &mut Findings,
) {
    let gaps = workload::watch_gaps(watch, reads);
    let mut details = format!(
        "{} connects ({} resumed, of which {} by one diffed CHANGE; {} fresh snapshots), {} events ({} live CHANGEs folded several Raft indexes into one), {} changes seen, last index {} (reads saw up to {target_index}); covered {:?}\n",
        watch.connects,
        watch.resumed,
        watch.coalesced,
        watch.resets,
        watch.events,
        watch.coalesced_live,
        watch.seen.len(),
        watch.last_index,
        watch.covered
    );
    for a in watch.anomalies.iter().take(20) {
        let _ = writeln!(details, "  anomaly: {a}");
    }
    for g in &gaps {
        let _ = writeln!(details, "  gap: {g}");
    }
    // The watcher caught up with everything the reads saw.
    let caught_up = watch.last_index >= target_index;
    if !caught_up {
        let _ = writeln!(
            details,
            "  the watcher stopped at index {} before {target_index}, the highest the reads saw",
            watch.last_index
        );
    }
    // The watcher's final view against the servers' state (a dump that
    // fails is a failure, not a skipped comparison).
    let mut state_ok = true;
    let dump = cluster.dump(0, "f/").await;
    if let Err(e) = &dump {
        state_ok = false;
        let _ = writeln!(details, "  final view not compared: the dump failed: {e:#}");
    }
    if let Ok((_, entries)) = dump {
        let server: HashMap<String, u64> =
            entries.iter().map(|(k, _, m)| (k.clone(), *m)).collect();
        let watcher: HashMap<String, u64> = watch
            .state
            .iter()
            .map(|(k, o)| (k.clone(), o.modify_index))
            .collect();
        if server != watcher {
            state_ok = false;
            let _ = writeln!(
                details,
                "  final view differs: server {server:?} watcher {watcher:?}"
            );
        }
    }
    if watch.coalesced_live > 0 {
        findings.notes.push(format!(
            "watch: {} live CHANGE events carried several Raft indexes at once (the feed diffs whenever it catches up: registry/src/watch Feed::update), while watch.proto says one CHANGE per Raft index; watchers miss intermediate values but not the final state. Accepted by check 5; a proto wording or registry decision",
            watch.coalesced_live
        ));
    }
    findings.check(
        "5. watch: no gap, duplicate or index regression across reconnects",
        watch.anomalies.is_empty()
            && gaps.is_empty()
            && state_ok
            && caught_up
            && watch.connects > 0,
        details,
    );
}

/// Issue 8, checks 3 and 4: kill -9 loop.
#[test]
fn kill_9_loop_loses_no_acknowledged_write() -> Result<()> {
    in_lab(&["n1", "n2", "n3", "client"], |lab| async move {
        let mode = mode();
        let t0 = Instant::now();
        // Power losses as well as kill -9: a kill leaves the page cache to
        // the kernel, so only a power loss shows a missing sync (the
        // servers keep the image a power loss would leave; see
        // `storage::durable` in the registry).
        let mut cluster = three_servers_with_power_losses(&lab, "kill9", t0).await?;
        let mut findings = Findings::default();
        let shared = Shared::new(t0, OP_TIMEOUT)?;
        // One key per client, so each key has one sequential writer whose
        // values only grow: the last acknowledged one must survive (check
        // 3). And two keys shared by three concurrent clients each, doing
        // reads, writes and CAS, for the linearizability check (check 1)
        // on overlapping histories through the kills.
        let single: Vec<String> = (0..3).map(|k| format!("kl/c{k}")).collect();
        let shared_keys: Vec<String> = (0..2).map(|k| format!("kl/s{k}")).collect();
        let keys: Vec<String> = single.iter().chain(&shared_keys).cloned().collect();
        let mut clients = tokio::task::JoinSet::new();
        let prober = spawn_prober(&shared, &cluster);
        let contenders = spawn_lock_clients(&shared, &cluster);
        // (client id, key, mix, think time) of each workload client.
        let single_writers = single.iter().enumerate().map(|(c, key)| {
            let mix = Mix {
                read: 20,
                write: 80,
            };
            (c as u32, key, mix, Duration::from_millis(10))
        });
        let sharers = shared_keys.iter().enumerate().flat_map(|(k, key)| {
            (0..3).map(move |c| {
                let mix = Mix {
                    read: 40,
                    write: 30,
                };
                ((10 + 3 * k + c) as u32, key, mix, Duration::from_millis(20))
            })
        });
        for (client, key, mix, think) in single_writers.chain(sharers) {
            clients.spawn(workload::run_client(
                shared.clone(),
                client,
                cluster.targets(),
                vec![key.clone()],
                mix,
                think,
                1_000_000,
            ));
        }
        let mut rng = SplitMix(t0.elapsed().as_nanos() as u64 ^ 0x5eed);
        let mut leader_losses = Vec::new();
        let mut stalls = Vec::new();
        let (mut all_kills, mut leader_down, mut leader_restarts, mut follower_kills) =
            (0, 0, 0, 0);
        let (mut power_losses, mut all_power_losses) = (0, 0);
        let loop_started = Instant::now();
        for cycle in 0..mode.kill_cycles {
            tokio::time::sleep(Duration::from_millis(50 + rng.below(150))).await;
            let leader = cluster.leader().await;
            // Every tenth cycle all three; every fourth the leader, kept
            // down until another server acknowledges a write (a failover
            // sample); two cycles later the leader again, restarted at
            // once (it comes back as leader of the same term: see the
            // report); otherwise a random follower, restarted at once.
            let (victims, keep_down): (Vec<usize>, bool) = match (cycle % 10, cycle % 4, leader) {
                (9, _, _) => {
                    all_kills += 1;
                    (vec![0, 1, 2], false)
                }
                (_, 0, Some(l)) => {
                    leader_down += 1;
                    (vec![l], true)
                }
                (_, 2, Some(l)) => {
                    leader_restarts += 1;
                    (vec![l], false)
                }
                _ => {
                    follower_kills += 1;
                    let others: Vec<usize> = (0..3).filter(|i| Some(*i) != leader).collect();
                    (vec![others[rng.below(others.len() as u64) as usize]], false)
                }
            };
            // Every other all-three cycle, and a third of the others, a
            // power loss instead of kill -9.
            let power = if victims.len() == 3 {
                cycle % 20 == 19
            } else {
                rng.below(3) == 0
            };
            for &v in &victims {
                if power {
                    cluster.power_loss(v).await?;
                } else {
                    cluster.kill(v).await?;
                }
            }
            if power {
                power_losses += 1;
                all_power_losses += u32::from(victims.len() == 3);
            }
            // The loss counts from when the kill is done.
            let at = cluster.now_ms();
            if keep_down {
                leader_losses.push(at);
            } else {
                for &v in &victims {
                    cluster.start(v)?;
                }
            }
            let names: Vec<String> = victims.iter().map(|v| format!("n{}", v + 1)).collect();
            cluster.timeline.lines.push((
                at,
                format!(
                    "cycle {cycle}: {} {names:?}{}; the leader was {}",
                    if power { "power loss of" } else { "kill -9" },
                    if keep_down {
                        " (kept down until a write is acknowledged)"
                    } else {
                        ""
                    },
                    leader.map_or("unknown".to_owned(), |l| format!("n{}", l + 1))
                ),
            ));
            // Progress before the next kill: an acknowledged write.
            let kill_ns = at * 1_000_000;
            let deadline = Instant::now() + Duration::from_secs(20);
            while shared.last_ack.load(Ordering::Relaxed) <= kill_ns {
                if Instant::now() >= deadline {
                    stalls.push(format!(
                        "cycle {cycle}: no acknowledged write within 20 s of the kill"
                    ));
                    cluster.note(format!(
                        "cycle {cycle}: STALL, no acknowledged write within 20 s"
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if keep_down {
                for &v in &victims {
                    cluster.start(v)?;
                }
            }
            if cycle % 20 == 19 {
                eprintln!(
                    "[{:>8.3}s] {} cycles done",
                    cluster.now_ms() as f64 / 1000.0,
                    cycle + 1
                );
            }
        }
        let loop_took = loop_started.elapsed();
        cluster.note(format!(
            "{} cycles in {:.1} s ({leader_down} leader kept down, {leader_restarts} leader restarted at once, {follower_kills} follower, {all_kills} all three; {power_losses} of them power losses, {all_power_losses} of all three)",
            mode.kill_cycles,
            loop_took.as_secs_f64()
        ));
        shared.stop.store(true, Ordering::Relaxed);
        let probes = prober.await.context("prober task")?;
        let mut log = ClientLog::default();
        while let Some(joined) = clients.join_next().await {
            let mut one = joined.context("client task")?;
            log.ops.append(&mut one.ops);
            log.observed.append(&mut one.observed);
        }
        settle_and_compare(&mut cluster, &shared, &keys, "kl/", &mut log, &mut findings).await?;
        check_lock_contenders(contenders, &shared, &cluster, &mut findings).await?;

        // Check 3: per key, the final value is the last acknowledged write
        // or a later (unknown) one: values of one writer only grow.
        let mut lost = Vec::new();
        for key in &single {
            let last_ack = log
                .ops
                .iter()
                .filter(|o| &o.key == key && o.client < 900 && o.outcome == Outcome::Written)
                .filter_map(|o| match o.call {
                    Call::Write { value } => Some(value),
                    _ => None,
                })
                .max();
            let finals: Vec<Option<u64>> = log
                .ops
                .iter()
                .filter(|o| &o.key == key && o.client >= 1000)
                .filter_map(|o| match o.outcome {
                    Outcome::Read(v) => Some(v),
                    _ => None,
                })
                .collect();
            for f in &finals {
                if last_ack.is_some_and(|a| f.is_none_or(|f| f < a)) {
                    lost.push(format!(
                        "{key}: last acknowledged write {last_ack:?}, a server's final value {f:?}"
                    ));
                }
            }
            if finals.is_empty() {
                lost.push(format!("{key}: no final read succeeded"));
            }
        }
        findings.check(
            &format!(
                "3. kill -9 loop ({} cycles): no acknowledged write lost",
                mode.kill_cycles
            ),
            lost.is_empty() && stalls.is_empty(),
            format!("{}\n{}", lost.join("\n"), stalls.join("\n")),
        );
        check_linearizable(
            &log.ops,
            &cluster.timeline,
            &mut findings,
            "1. linearizable per key through the kill loop, final reads included",
        );
        let conflicts = workload::index_value_conflicts(&log.observed);
        findings.check(
            "1. ModifyIndex <-> value one to one (no write applied twice)",
            conflicts.is_empty(),
            conflicts.join("\n"),
        );
        let probed = failover_from_acks(probes, &leader_losses);
        findings.check(
            "4. failover time measured over at least 30 leader losses",
            probed.len() >= 30,
            format!("{} samples", probed.len()),
        );
        check_failover_target(&mut findings, "kill -9 of the leader", &probed, 1000, 100);
        findings
            .failover
            .push(("kill -9 of the leader, kept down; prober".into(), probed));
        findings.failover.push((
            "kill -9 of the leader, kept down; workload clients".into(),
            failover_samples(&log.ops, &leader_losses),
        ));
        let extra = format!(
            "\n## Kill loop\n{} cycles in {:.1} s: {leader_down} of the leader kept down until failover, {leader_restarts} of the leader restarted at once, {follower_kills} of a follower, {all_kills} of all three",
            mode.kill_cycles,
            loop_took.as_secs_f64()
        );
        let path = write_report(
            &cluster,
            "Fault suite: kill -9 loop",
            &setup(mode),
            &findings,
            &log.ops,
            &extra,
        )?;
        cluster.done = true;
        conclude(&path, &findings)
    })
}

/// A case the kill -9 loop once found, on its own: a leader killed right
/// after acknowledging writes, restarted with the others, must not answer
/// a `?consistent` read from a state without its last acknowledged write.
///
/// Diagnosis (see the fault suite report): openraft 0.9 restores a server
/// whose persisted vote is its own committed vote as leader of the same
/// term at startup, without an election; its read index
/// (`Raft::ensure_linearizable`, `LeaderHandler::get_read_log_id`) is
/// max(first entry of its term, committed), and the committed index it
/// restarted with is the one last persisted (the log store writes it
/// without a flush), which lags what it had acknowledged, so the read
/// waited for nothing and was served from the older state. Fixed by the
/// leader's read floor (`RegistryNode::read_floor`: a read index of at least
/// the last log index it held when it first served as leader of its term);
/// this test keeps it fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_leader_serves_no_stale_consistent_read() -> Result<()> {
    let _lock = lock_suite()?;
    let flags = [
        "--snapshot-threshold",
        "64",
        "--snapshot-trailing-logs",
        "32",
        "--snapshot-interval-ms",
        "250",
    ];
    let mut cluster = meshwork_tests::Cluster::start(3, &flags).await?;
    let mut stale = Vec::new();
    let rounds = 10;
    for round in 0..rounds {
        let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
        let key = format!("restart/{round}");
        let mut last = String::new();
        for n in 0..40 {
            last = format!("v{n}");
            cluster.must_put(n % 3, &key, &last).await?;
        }
        // Only the leader: the followers stay up, so it comes back as
        // leader of the same term and answers at once.
        cluster.servers[leader].kill().await?;
        cluster.servers[leader].start(&[])?;
        let url = format!(
            "{}/v1/kv/{key}?raw&consistent",
            cluster.servers[leader].http()
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        let seen = loop {
            let answer = cluster
                .http
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            match answer {
                Ok(resp) if resp.status() == 200 => break Some(resp.text().await?),
                Ok(resp) if resp.status() == 404 => break None,
                _ if Instant::now() >= deadline => bail!("no consistent read within 15 s"),
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        };
        if seen.as_deref() != Some(last.as_str()) {
            stale.push(format!(
                "round {round}: wrote v0..{last} through server {} (all acknowledged), kill -9 it, restart; its first ?consistent read answered {seen:?}",
                leader + 1
            ));
        }
    }
    if !stale.is_empty() {
        // The logs go with the failure (Cluster prints them on drop).
        bail!(
            "{} of {rounds} rounds read a stale value:\n{}",
            stale.len(),
            stale.join("\n")
        );
    }
    cluster.done();
    Ok(())
}
