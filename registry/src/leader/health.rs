//! Leader-only health duties: runs the HTTP and TCP checks registered
//! over REST, expires TTL checks that were not updated in time, and removes
//! service instances whose `DeregisterCriticalServiceAfter` has passed.
//!
//! Only the leader does this, so every check has exactly one runner; a new
//! leader starts every probe within one interval (jittered, so a fleet is
//! not probed in lockstep) and gives every TTL and deregistration timer a
//! full period of grace, since it cannot know when the old leader last saw
//! them. Only changes go through Raft: a status change at once, an
//! output-only change at most every [`OUTPUT_REFRESH`] (as Consul's
//! `check_update_interval`).

use meshwork_core::health::probe;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::RegistryNode;
use crate::command::Command;
use crate::state::catalog::{CheckDefinition, HealthStatus};
use probe::ProbeResult;

/// How often output-only changes are written.
pub const OUTPUT_REFRESH: Duration = Duration::from_secs(300);
/// How often TTL and deregistration timers are looked at.
const TICK: Duration = Duration::from_millis(250);

/// A check's identity: (node, check id).
pub type CheckKey = (String, String);

/// Runs the leader duties whenever this server leads, until shutdown.
pub async fn supervise(node: Arc<RegistryNode>, shutdown: CancellationToken) {
    let mut metrics = node.raft.metrics();
    loop {
        if node.is_leader() {
            tracing::info!("leading: running health checks");
            lead(&node, &shutdown).await;
            tracing::info!("no longer leading: health checks stopped");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}

struct RunningProbe {
    definition: CheckDefinition,
    task: tokio::task::AbortHandle,
}

async fn lead(node: &Arc<RegistryNode>, shutdown: &CancellationToken) {
    let started = Instant::now();
    let mut probes: HashMap<CheckKey, RunningProbe> = HashMap::new();
    let mut probe_tasks: JoinSet<()> = JoinSet::new();
    let mut writes: JoinSet<()> = JoinSet::new();
    let (results_tx, mut results) = mpsc::channel::<(CheckKey, ProbeResult)>(1024);
    let mut critical_since: HashMap<CheckKey, Instant> = HashMap::new();
    let mut output_written: HashMap<CheckKey, Instant> = HashMap::new();
    let mut deregistering: HashSet<CheckKey> = HashSet::new();
    let mut valve_logged: Option<Instant> = None;
    let mut seen_checks_index = None;
    let mut applied = node.state.subscribe();
    let mut metrics = node.raft.metrics();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        let checks_index = node.state.read().catalog.checks_index();
        if seen_checks_index != Some(checks_index) {
            seen_checks_index = Some(checks_index);
            reconcile(node, &mut probes, &mut probe_tasks, &results_tx);
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = metrics.changed() => {
                if changed.is_err() || !node.is_leader() {
                    break;
                }
            }
            _ = applied.changed() => {}
            Some((key, result)) = results.recv() => {
                if let Some(command) = probe_update(node, &key, result, &mut output_written) {
                    spawn_write(&mut writes, node, command);
                }
            }
            _ = tick.tick() => {
                for command in timers(
                    node,
                    started,
                    &mut critical_since,
                    &mut deregistering,
                    &mut valve_logged,
                ) {
                    spawn_write(&mut writes, node, command);
                }
            }
            Some(_) = writes.join_next() => {}
        }
    }
    probe_tasks.abort_all();
    writes.abort_all();
}

/// Starts probes for new or changed HTTP/TCP checks, stops removed ones.
fn reconcile(
    node: &RegistryNode,
    probes: &mut HashMap<CheckKey, RunningProbe>,
    tasks: &mut JoinSet<()>,
    results: &mpsc::Sender<(CheckKey, ProbeResult)>,
) {
    let wanted: HashMap<CheckKey, CheckDefinition> = {
        let state = node.state.read();
        state
            .catalog
            .all_checks()
            .filter(|c| c.definition.http.is_some() || c.definition.tcp.is_some())
            .map(|c| ((c.node.clone(), c.check_id.clone()), c.definition.clone()))
            .collect()
    };
    probes.retain(|key, probe| {
        let keep = wanted.get(key) == Some(&probe.definition);
        if !keep {
            probe.task.abort();
        }
        keep
    });
    for (key, definition) in wanted {
        if probes.contains_key(&key) {
            continue;
        }
        let interval = Duration::from_millis(definition.interval_ms.unwrap_or(10_000).max(100));
        let task = tasks.spawn(run_probe(
            key.clone(),
            definition.clone(),
            interval,
            results.clone(),
        ));
        probes.insert(key, RunningProbe { definition, task });
    }
}

/// Probes one check forever: a random first delay within one interval,
/// then once per interval.
async fn run_probe(
    key: CheckKey,
    definition: CheckDefinition,
    interval: Duration,
    results: mpsc::Sender<(CheckKey, ProbeResult)>,
) {
    let first = rand::rng().random_range(0..=interval.as_millis() as u64);
    tokio::time::sleep(Duration::from_millis(first)).await;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(result) = probe::run(&definition).await else {
            return;
        };
        if results.send((key.clone(), result)).await.is_err() {
            return;
        }
    }
}

/// The write a probe result calls for, if any.
fn probe_update(
    node: &RegistryNode,
    key: &CheckKey,
    result: ProbeResult,
    output_written: &mut HashMap<CheckKey, Instant>,
) -> Option<Command> {
    let state = node.state.read();
    let check = state
        .catalog
        .node_checks(&key.0)
        .find(|c| c.check_id == key.1)?;
    let status_changed = check.status != result.status;
    let output_due = check.output != result.output
        && output_written
            .get(key)
            .is_none_or(|t| t.elapsed() >= OUTPUT_REFRESH);
    if !status_changed && !output_due {
        return None;
    }
    if status_changed {
        tracing::info!(node = %key.0, check = %key.1, from = check.status.as_str(), to = result.status.as_str(), "check status changed");
    }
    output_written.insert(key.clone(), Instant::now());
    Some(Command::CheckUpdate {
        node: key.0.clone(),
        check_id: key.1.clone(),
        status: result.status,
        output: result.output,
    })
}

/// TTL expiries and critical-too-long deregistrations due now.
fn timers(
    node: &RegistryNode,
    leader_since: Instant,
    critical_since: &mut HashMap<CheckKey, Instant>,
    deregistering: &mut HashSet<CheckKey>,
    valve_logged: &mut Option<Instant>,
) -> Vec<Command> {
    let now = Instant::now();
    let mut commands = Vec::new();
    let state = node.state.read();
    let mut still_critical = HashSet::new();
    let mut sessions = 0usize;
    let mut expiring = Vec::new();
    // Sessions that missed more than half their TTL. Sidecars renew every
    // TTL/3 at phases of their own, so when a network problem silences
    // many at once their expiries still come spread over a third of the
    // TTL; by the time the first one expires, all of them have been
    // silent for over half of it. Counting these (not only the ones that
    // expire in this very pass) is what lets the valve see them together.
    let mut going_silent = 0usize;
    for check in state.catalog.all_checks() {
        let key = (check.node.clone(), check.check_id.clone());
        if let Some(ttl) = check.definition.session_ttl_ms {
            sessions += 1;
            let ttl = Duration::from_millis(ttl);
            let renewed = node.ttl_touched(&key);
            let last = renewed.map_or(leader_since, |t| t.max(leader_since));
            if check.status != HealthStatus::Critical {
                let silent = now.duration_since(last);
                if silent > ttl / 2 {
                    going_silent += 1;
                }
                if silent >= ttl {
                    expiring.push(Command::CheckUpdate {
                        node: check.node.clone(),
                        check_id: check.check_id.clone(),
                        status: HealthStatus::Critical,
                        output: format!(
                            "session expired: no heartbeat from the sidecar within {}",
                            humantime(ttl.as_millis() as u64)
                        ),
                    });
                }
                continue;
            }
            if renewed.is_some_and(|t| now.duration_since(t) < ttl) {
                commands.push(Command::CheckUpdate {
                    node: check.node.clone(),
                    check_id: check.check_id.clone(),
                    status: HealthStatus::Passing,
                    output: "session renewed".into(),
                });
                continue;
            }
            if let Some(after) = check.definition.deregister_critical_after_ms {
                still_critical.insert(key.clone());
                let since = *critical_since.entry(key.clone()).or_insert(now);
                if now.duration_since(since) >= Duration::from_millis(after)
                    && deregistering.insert(key.clone())
                {
                    tracing::info!(node = %check.node, "session expired too long ago: removing the node and its services");
                    commands.push(Command::CatalogDeregister {
                        node: check.node.clone(),
                        service_id: None,
                        check_id: None,
                    });
                }
            }
            continue;
        }
        if let Some(ttl) = check.definition.ttl_ms
            && check.status != HealthStatus::Critical
        {
            let touched = node
                .ttl_touched(&key)
                .map_or(leader_since, |t| t.max(leader_since));
            if now.duration_since(touched) >= Duration::from_millis(ttl) {
                commands.push(Command::CheckUpdate {
                    node: check.node.clone(),
                    check_id: check.check_id.clone(),
                    status: HealthStatus::Critical,
                    output: format!("TTL expired (no update within {})", humantime(ttl)),
                });
            }
        }
        if let Some(after) = check.definition.deregister_critical_after_ms
            && check.status == HealthStatus::Critical
            && !check.service_id.is_empty()
        {
            still_critical.insert(key.clone());
            let since = *critical_since.entry(key.clone()).or_insert(now);
            if now.duration_since(since) >= Duration::from_millis(after)
                && deregistering.insert(key.clone())
            {
                tracing::info!(node = %check.node, service = %check.service_id, check = %check.check_id, "critical too long: deregistering the service instance");
                commands.push(Command::CatalogDeregister {
                    node: check.node.clone(),
                    service_id: Some(check.service_id.clone()),
                    check_id: None,
                });
            }
        }
    }
    critical_since.retain(|k, _| still_critical.contains(k));
    deregistering.retain(|k| still_critical.contains(k));
    // Safety valve (as Eureka's self-preservation): when an unusual share
    // of sessions goes silent at once, the likelier cause is a network
    // problem near the registry, not that many sidecars died; expiring
    // them all would take healthy services out of every load balancer.
    if !expiring.is_empty()
        && going_silent >= VALVE_MIN_SESSIONS
        && going_silent as f64 > VALVE_SHARE * sessions as f64
    {
        if valve_logged.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(30)) {
            *valve_logged = Some(now);
            tracing::error!(
                silent = going_silent,
                expired_now = expiring.len(),
                sessions,
                "safety valve: {} of {} sidecar sessions went silent at once; NOT expiring them \
                 (check the network between the sidecars and the registry)",
                going_silent,
                sessions
            );
        }
    } else {
        commands.extend(expiring);
    }
    commands
}

/// The safety valve holds expiries when more than this share of all
/// sessions has been silent for over half its TTL...
const VALVE_SHARE: f64 = 0.4;
/// ...and at least this many.
const VALVE_MIN_SESSIONS: usize = 3;

fn humantime(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn spawn_write(writes: &mut JoinSet<()>, node: &Arc<RegistryNode>, command: Command) {
    let node = Arc::clone(node);
    writes.spawn(async move {
        if let Err(e) = node.write(command).await {
            tracing::warn!(error = %e, "health update not written");
        }
    });
}
