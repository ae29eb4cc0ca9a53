//! The fault suite's workload and its record: clients doing read / write /
//! compare-and-set on a few keys through the KV REST API of whichever
//! servers they are given, each operation logged with its invoke and
//! completion times and outcome as a [`linearizable::Operation`]; and a
//! watcher following a key prefix over the gRPC Watch API, checking that
//! it sees no gap, duplicate or index regression across reconnects.
//!
//! It knows nothing about faults or namespaces: the caller decides where
//! the sockets live (the fault suite runs it on threads moved into the
//! lab's client namespace) and when to stop.
//!
//! Outcomes follow what the client can know. A write or CAS answered with
//! a 5xx, a timeout or a lost connection is *unknown* (it may have been
//! committed); one refused with a 4xx, or that never got a connection, has
//! *failed* (no effect). A read that does not answer 200/404 has failed:
//! reads have no effect, so that loses nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use base64::Engine;
use meshwork_proto::v1::watch_client::WatchClient;
use meshwork_proto::v1::watch_event::Kind;
use meshwork_proto::v1::{KvPrefixTopic, SubscribeRequest, change, subscribe_request};

use crate::linearizable::{Call, Operation, Outcome};

/// A (key, value) seen with a `ModifyIndex`, by a read or the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub value: u64,
    pub modify_index: u64,
}

/// What every client shares.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The run's time origin: operation times are nanoseconds since it.
    pub t0: Instant,
    /// Source of unique values (each write writes a value of its own).
    pub next_value: Arc<AtomicU64>,
    /// Set to stop every client after its current operation.
    pub stop: Arc<AtomicBool>,
    /// Completion time of the latest acknowledged write or CAS: lets a
    /// fault loop wait for progress without reading the record.
    pub last_ack: Arc<AtomicU64>,
    pub http: reqwest::Client,
}

impl Shared {
    pub fn new(t0: Instant, op_timeout: Duration) -> Result<Self> {
        Ok(Shared {
            t0,
            next_value: Arc::new(AtomicU64::new(1)),
            stop: Arc::new(AtomicBool::new(false)),
            last_ack: Arc::new(AtomicU64::new(0)),
            http: reqwest::Client::builder()
                .timeout(op_timeout)
                .connect_timeout(op_timeout)
                .pool_idle_timeout(Duration::from_secs(5))
                .build()?,
        })
    }

    pub fn now(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn value(&self) -> u64 {
        self.next_value.fetch_add(1, Ordering::Relaxed)
    }
}

/// A server as the clients address it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Short name for the record, e.g. `n2`.
    pub name: String,
    /// `http://ip:port`
    pub http: String,
}

/// What one client did.
#[derive(Debug, Default)]
pub struct ClientLog {
    pub ops: Vec<Operation>,
    /// (key, observation) from every successful read.
    pub observed: Vec<(String, Observation)>,
}

/// The mix of operations a client does, in percent (the rest are CAS).
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub read: u32,
    pub write: u32,
}

/// The failover prober: writes a key of its own (`key`, outside what the
/// checks read) every `every`, each write with a `timeout` of its own,
/// trying the next server at once when one fails or does not answer in
/// time, as a client that can reach the majority would. Returns the
/// acknowledged writes as (invoke, complete) in ns since the run's start:
/// a leader loss's failover is the first of them invoked after it.
/// Unlike the workload clients (random server, the suite's long timeout),
/// it is not held up by an unreachable server, so it measures how long the
/// cluster cannot acknowledge a write.
pub async fn run_prober(
    shared: Shared,
    targets: Vec<Target>,
    key: String,
    every: Duration,
    timeout: Duration,
) -> Vec<(u64, u64)> {
    let mut acks = Vec::new();
    let mut next = 0usize;
    // Bounded by the stop flag and by a count (a day at 1 ms).
    for n in 0..86_400_000u64 {
        if shared.stop.load(Ordering::Relaxed) || targets.is_empty() {
            break;
        }
        let target = &targets[next % targets.len()];
        let invoke = shared.now();
        let url = format!("{}/v1/kv/{key}", target.http);
        let sent = shared
            .http
            .put(url)
            .body(n.to_string())
            .timeout(timeout)
            .send();
        let acked = match sent.await {
            Ok(resp) if resp.status() == 200 => {
                resp.text().await.is_ok_and(|body| body.trim() == "true")
            }
            _ => false,
        };
        if acked {
            acks.push((invoke, shared.now()));
            tokio::time::sleep(every).await;
        } else {
            next += 1;
            if next.is_multiple_of(targets.len()) {
                // Every server failed in turn: no busy loop.
                tokio::time::sleep(every).await;
            }
        }
    }
    acks
}

/// One client: random operations on random `keys` through random
/// `targets` until [`Shared::stop`] is set or `max_ops` are done, with a
/// pause of up to `think` between operations.
pub async fn run_client(
    shared: Shared,
    client: u32,
    targets: Vec<Target>,
    keys: Vec<String>,
    mix: Mix,
    think: Duration,
    max_ops: usize,
) -> ClientLog {
    let mut log = ClientLog::default();
    let mut rng = SplitMix(u64::from(client).wrapping_mul(0x2545_F491_4F6C_DD1D) ^ shared.now());
    while !shared.stop.load(Ordering::Relaxed) && log.ops.len() < max_ops {
        if targets.is_empty() || keys.is_empty() {
            break;
        }
        let target = &targets[rng.below(targets.len() as u64) as usize];
        let key = &keys[rng.below(keys.len() as u64) as usize];
        let roll = rng.below(100) as u32;
        if roll < mix.read {
            read(&shared, client, target, key, &mut log).await;
        } else if roll < mix.read + mix.write {
            let value = shared.value();
            write(&shared, client, target, key, value, None, &mut log).await;
        } else {
            // Consul-style CAS: read the index, then PUT ?cas=index.
            if let Some(seen) = read(&shared, client, target, key, &mut log).await {
                let value = shared.value();
                write(&shared, client, target, key, value, Some(seen), &mut log).await;
            }
        }
        if !think.is_zero() {
            let pause = rng.below(think.as_millis() as u64 + 1);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
    log
}

/// A `?consistent` read. Returns what it saw (`Some(None)`: absent), or
/// `None` when it failed.
pub async fn read(
    shared: &Shared,
    client: u32,
    target: &Target,
    key: &str,
    log: &mut ClientLog,
) -> Option<Option<Observation>> {
    let invoke = shared.now();
    let url = format!("{}/v1/kv/{key}?consistent", target.http);
    let result = match shared.http.get(url).send().await {
        Ok(resp) if resp.status() == 404 => Some(None),
        Ok(resp) if resp.status() == 200 => match resp.json::<serde_json::Value>().await {
            Ok(body) => parse_entry(&body).map(Some),
            Err(_) => None,
        },
        _ => None,
    };
    let complete = shared.now();
    let outcome = match result {
        Some(seen) => Outcome::Read(seen.map(|o| o.value)),
        None => Outcome::Failed,
    };
    if let Some(Some(seen)) = result {
        log.observed.push((key.to_owned(), seen));
    }
    log.ops.push(Operation {
        client,
        key: key.to_owned(),
        call: Call::Read,
        outcome,
        invoke,
        complete: Some(complete),
        via: target.name.clone(),
    });
    result
}

/// `[{"Value": base64, "ModifyIndex": n}]` → the value and index, `None`
/// when the body is not that shape or the value is not one of ours.
pub fn parse_entry(body: &serde_json::Value) -> Option<Observation> {
    let entry = body.as_array()?.first()?;
    let modify_index = entry.get("ModifyIndex")?.as_u64()?;
    let encoded = entry.get("Value")?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let value = std::str::from_utf8(&bytes).ok()?.parse().ok()?;
    Some(Observation {
        value,
        modify_index,
    })
}

/// A plain PUT, or with `cas` a PUT `?cas=<index seen>` (0 when absent).
pub async fn write(
    shared: &Shared,
    client: u32,
    target: &Target,
    key: &str,
    value: u64,
    cas: Option<Option<Observation>>,
    log: &mut ClientLog,
) -> Outcome {
    let query = match cas {
        None => String::new(),
        Some(seen) => format!("?cas={}", seen.map_or(0, |o| o.modify_index)),
    };
    let invoke = shared.now();
    let url = format!("{}/v1/kv/{key}{query}", target.http);
    let outcome = match shared.http.put(url).body(value.to_string()).send().await {
        Ok(resp) if resp.status() == 200 => match resp.text().await {
            Ok(body) => match (body.trim(), cas.is_some()) {
                ("true", false) => Outcome::Written,
                ("true", true) => Outcome::Cas(true),
                ("false", true) => Outcome::Cas(false),
                // A plain PUT answered false, or a garbled body: the
                // request was taken, so its fate is unknown.
                _ => Outcome::Unknown,
            },
            // The answer was lost on the way: unknown.
            Err(_) => Outcome::Unknown,
        },
        Ok(resp) if resp.status().is_client_error() => Outcome::Failed,
        Ok(_) => Outcome::Unknown,
        // Never connected: the request was never sent.
        Err(e) if e.is_connect() => Outcome::Failed,
        Err(_) => Outcome::Unknown,
    };
    let complete = (outcome != Outcome::Unknown).then(|| shared.now());
    if let (Outcome::Written | Outcome::Cas(true), Some(at)) = (outcome, complete) {
        shared.last_ack.fetch_max(at, Ordering::Relaxed);
    }
    let call = match cas {
        None => Call::Write { value },
        Some(seen) => Call::Cas {
            expected: seen.map(|o| o.value),
            new: value,
        },
    };
    log.ops.push(Operation {
        client,
        key: key.to_owned(),
        call,
        outcome,
        invoke,
        complete,
        via: target.name.clone(),
    });
    outcome
}

/// A small deterministic generator (splitmix64): enough for picking keys
/// and servers, no dependency.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0; 0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

/// What the watcher saw and what it found wrong.
#[derive(Debug, Default)]
pub struct WatchLog {
    /// `last_index`, shared while the watcher runs (to wait for it to
    /// catch up with an index instead of sleeping).
    pub progress: Arc<std::sync::atomic::AtomicU64>,
    /// Every key's entry as the watcher last knew it.
    pub state: HashMap<String, Observation>,
    /// (key, observation) for every entry in a CHANGE.
    pub seen: Vec<(String, Observation)>,
    /// For every entry in a CHANGE: (key, its ModifyIndex, the index the
    /// watcher had before the event, the event's index). An entry whose
    /// ModifyIndex is below the event's index stands for every change to
    /// that key in between (the event was coalesced).
    pub spans: Vec<(String, u64, u64, u64)>,
    /// Live CHANGE events that carried entries modified at earlier
    /// indexes (several Raft indexes folded into one event).
    pub coalesced_live: u32,
    /// Index ranges `(from, to]` the watcher followed without a fresh
    /// snapshot in between: every change to the prefix inside them must
    /// have reached it.
    pub covered: Vec<(u64, u64)>,
    /// The last index it fully received.
    pub last_index: u64,
    pub connects: u32,
    /// Reconnects that resumed (no snapshot).
    pub resumed: u32,
    /// Reconnects that got a fresh snapshot.
    pub resets: u32,
    /// Resumes answered with one diffed CHANGE instead of each change.
    pub coalesced: u32,
    pub events: u64,
    /// Duplicates, index regressions and malformed events.
    pub anomalies: Vec<String>,
}

impl WatchLog {
    fn extend_coverage(&mut self, to: u64) {
        if let Some(last) = self.covered.last_mut() {
            last.1 = last.1.max(to);
        }
    }
}

/// Follows `prefix` through the servers' gRPC Watch API, moving to the
/// next server (resuming from its last index) whenever a stream fails or
/// goes quiet for `quiet`, until `stop` is set.
pub async fn run_watcher(
    grpc: Vec<String>,
    prefix: String,
    quiet: Duration,
    stop: Arc<AtomicBool>,
    progress: Arc<std::sync::atomic::AtomicU64>,
) -> WatchLog {
    let mut log = WatchLog {
        progress,
        ..WatchLog::default()
    };
    let mut server = 0usize;
    // Bounded: at most this many reconnects (about one a second is usual
    // under faults), besides `stop`.
    let max_connects = 100_000usize;
    while !stop.load(Ordering::Relaxed) && !grpc.is_empty() && server < max_connects {
        let url = grpc[server % grpc.len()].clone();
        server += 1;
        if let Err(e) = follow_once(&url, &prefix, quiet, &stop, &mut log).await {
            // Expected under faults; the next server carries on.
            let _ = e;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log
}

async fn follow_once(
    url: &str,
    prefix: &str,
    quiet: Duration,
    stop: &AtomicBool,
    log: &mut WatchLog,
) -> Result<()> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(1));
    let channel = tokio::time::timeout(Duration::from_secs(2), endpoint.connect()).await??;
    let mut client = WatchClient::new(channel);
    let request = SubscribeRequest {
        topic: Some(subscribe_request::Topic::KvPrefix(KvPrefixTopic {
            prefix: prefix.to_owned(),
        })),
        since_index: log.last_index,
    };
    let mut stream = tokio::time::timeout(quiet, client.subscribe(request))
        .await??
        .into_inner();
    log.connects += 1;
    let since = log.last_index;
    // Within the initial part: a fresh snapshot replaces the state.
    let mut in_snapshot = true;
    let mut fresh = false;
    // The resumed part held a diff rather than every change.
    let mut coalesced = false;
    let mut max_messages = 1_000_000u32;
    while !stop.load(Ordering::Relaxed) && max_messages > 0 {
        max_messages -= 1;
        let Some(event) = tokio::time::timeout(quiet, stream.message()).await?? else {
            return Ok(());
        };
        log.events += 1;
        let kind = Kind::try_from(event.kind).unwrap_or(Kind::Unspecified);
        match kind {
            Kind::Snapshot => {
                if !in_snapshot {
                    log.anomalies
                        .push(format!("{url}: SNAPSHOT after END_OF_SNAPSHOT: {event:?}"));
                }
                if event.reset {
                    fresh = true;
                    log.state.clear();
                }
                apply_changes(&event.changes, None, since, url, log);
                if event.index < log.last_index && since > 0 {
                    log.anomalies.push(format!(
                        "{url}: index regression: a snapshot at {} after the watcher had {} (resumed from {since})",
                        event.index, log.last_index
                    ));
                }
            }
            Kind::EndOfSnapshot => {
                in_snapshot = false;
                if fresh == event.resumed {
                    log.anomalies.push(format!(
                        "{url}: END_OF_SNAPSHOT resumed={} after {} snapshot",
                        event.resumed,
                        if fresh { "a fresh" } else { "no" }
                    ));
                }
                if event.resumed && !coalesced {
                    log.resumed += u32::from(since > 0);
                    log.extend_coverage(event.index);
                } else if event.resumed {
                    // Caught up by a diff: the state is whole again, but
                    // the changes in between were not each delivered.
                    log.resumed += u32::from(since > 0);
                    log.coalesced += 1;
                    log.covered.push((event.index, event.index));
                } else {
                    log.resets += u32::from(since > 0);
                    if event.index < log.last_index {
                        log.anomalies.push(format!(
                            "{url}: index regression: fresh snapshot at {} after the watcher had {}",
                            event.index, log.last_index
                        ));
                    }
                    log.covered.push((event.index, event.index));
                }
                log.last_index = log.last_index.max(event.index);
                log.progress.store(log.last_index, Ordering::Relaxed);
            }
            Kind::Change => {
                if event.index <= log.last_index {
                    log.anomalies.push(format!(
                        "{url}: {} at index {} after the watcher had {} (resumed from {since})",
                        if event.index == log.last_index {
                            "duplicate change"
                        } else {
                            "index regression"
                        },
                        event.index,
                        log.last_index
                    ));
                }
                if log.covered.is_empty() {
                    log.covered.push((since, since));
                }
                // watch.proto promises one CHANGE per Raft index, but the
                // registry's feeds diff the topic whenever they catch up
                // (registry/src/watch: Feed::update), and a resume on
                // another server is one CHANGE diffed against the state at
                // `since`: entries may carry any ModifyIndex in
                // (what the watcher had, the event's index]. Counted, and
                // the gap check accepts an event that jumps over an index.
                let live = !in_snapshot;
                let before = log.last_index;
                let folded = apply_changes(&event.changes, Some(event.index), before, url, log);
                if live {
                    log.coalesced_live += u32::from(folded);
                } else {
                    coalesced |= folded;
                }
                log.last_index = log.last_index.max(event.index);
                log.progress.store(log.last_index, Ordering::Relaxed);
                if !in_snapshot {
                    log.extend_coverage(event.index);
                }
            }
            Kind::Heartbeat | Kind::Unspecified => {}
        }
    }
    Ok(())
}

/// Applies one event's changes to the watcher's view; returns whether
/// they were coalesced (an entry modified before the event's index).
/// Every entry of a CHANGE must have been modified after `before` (what
/// the watcher already had) and no later than the event's index.
fn apply_changes(
    changes: &[meshwork_proto::v1::Change],
    index: Option<u64>,
    before: u64,
    url: &str,
    log: &mut WatchLog,
) -> bool {
    let mut coalesced = false;
    for c in changes {
        match &c.change {
            Some(change::Change::Kv(entry)) => {
                let value = std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok());
                let Some(value) = value else {
                    log.anomalies
                        .push(format!("{url}: a value that is not ours: {entry:?}"));
                    continue;
                };
                if let Some(index) = index {
                    if entry.modify_index <= before || entry.modify_index > index {
                        log.anomalies.push(format!(
                            "{url}: change at index {index} (watcher had {before}) carries {} with ModifyIndex {}",
                            entry.key, entry.modify_index
                        ));
                    }
                    coalesced |= entry.modify_index != index;
                    log.spans
                        .push((entry.key.clone(), entry.modify_index, before, index));
                }
                let seen = Observation {
                    value,
                    modify_index: entry.modify_index,
                };
                if index.is_some() {
                    log.seen.push((entry.key.clone(), seen));
                }
                log.state.insert(entry.key.clone(), seen);
            }
            Some(change::Change::KvRemoved(key)) => {
                log.state.remove(key);
            }
            other => log
                .anomalies
                .push(format!("{url}: not a KV change: {other:?}")),
        }
    }
    coalesced
}

/// Checks index ↔ value over every observation (reads and watcher): one
/// index must always carry the same value (else two writes shared an
/// index), and one value must always carry the same index (else a write
/// was applied twice). Returns one line per conflict.
pub fn index_value_conflicts(observations: &[(String, Observation)]) -> Vec<String> {
    let mut by_index: HashMap<(&str, u64), u64> = HashMap::new();
    let mut by_value: HashMap<u64, (&str, u64)> = HashMap::new();
    let mut problems = Vec::new();
    for (key, o) in observations {
        if let Some(v) = by_index.insert((key, o.modify_index), o.value)
            && v != o.value
            && problems.len() < 20
        {
            problems.push(format!(
                "{key}: ModifyIndex {} seen with values {v} and {}",
                o.modify_index, o.value
            ));
        }
        if let Some((k, i)) = by_value.insert(o.value, (key, o.modify_index))
            && (k != key || i != o.modify_index)
            && problems.len() < 20
        {
            problems.push(format!(
                "value {} seen as {k}@{i} and {key}@{} (a write applied twice?)",
                o.value, o.modify_index
            ));
        }
    }
    problems
}

/// Gaps: a change a read saw at an index the watcher followed without a
/// break, that reached the watcher neither as itself nor folded into a
/// later change of the same key (an event that jumped over its index).
pub fn watch_gaps(watch: &WatchLog, reads: &[(String, Observation)]) -> Vec<String> {
    let mut by_key: HashMap<&str, Vec<(u64, u64, u64)>> = HashMap::new();
    for (key, modify_index, before, index) in &watch.spans {
        by_key
            .entry(key.as_str())
            .or_default()
            .push((*modify_index, *before, *index));
    }
    let mut gaps = Vec::new();
    let mut reported = std::collections::HashSet::new();
    for (key, o) in reads {
        let m = o.modify_index;
        let covered = watch.covered.iter().any(|(from, to)| m > *from && m <= *to);
        if !covered {
            continue;
        }
        let reached = by_key.get(key.as_str()).is_some_and(|spans| {
            spans.iter().any(|(modify_index, before, index)| {
                *modify_index == m || (*before < m && m <= *index && *modify_index >= m)
            })
        });
        if !reached && reported.insert((key.as_str(), m)) && gaps.len() < 20 {
            gaps.push(format!(
                "{key}@{m} (value {}) was read but never reached the watcher, which followed that index range",
                o.value
            ));
        }
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(value: u64, modify_index: u64) -> Observation {
        Observation {
            value,
            modify_index,
        }
    }

    #[test]
    fn parse_entry_reads_consul_json() {
        let body = serde_json::json!([{"Key": "k", "Value": "NDI=", "ModifyIndex": 7}]);
        assert_eq!(parse_entry(&body), Some(obs(42, 7)));
        assert_eq!(
            parse_entry(&serde_json::json!([{"Value": null, "ModifyIndex": 7}])),
            None
        );
        assert_eq!(parse_entry(&serde_json::json!({"Value": "NDI="})), None);
    }

    #[test]
    fn index_value_conflicts_find_double_applies_and_shared_indexes() {
        let k = |s: &str| s.to_owned();
        assert!(index_value_conflicts(&[(k("a"), obs(1, 5)), (k("a"), obs(1, 5))]).is_empty());
        let twice = index_value_conflicts(&[(k("a"), obs(1, 5)), (k("a"), obs(1, 9))]);
        assert!(
            twice.iter().any(|p| p.contains("applied twice")),
            "{twice:?}"
        );
        let shared = index_value_conflicts(&[(k("a"), obs(1, 5)), (k("a"), obs(2, 5))]);
        assert!(
            shared.iter().any(|p| p.contains("ModifyIndex 5")),
            "{shared:?}"
        );
    }

    #[test]
    fn watch_gaps_accept_folded_changes_and_catch_missing_ones() {
        let mut watch = WatchLog {
            covered: vec![(10, 30)],
            ..WatchLog::default()
        };
        // Key a: changes at 12 and 20 each delivered; at 25 and 27 folded
        // into one event at 28 (watcher had 24).
        watch.spans.push(("a".into(), 12, 10, 12));
        watch.spans.push(("a".into(), 20, 12, 20));
        watch.spans.push(("a".into(), 27, 24, 28));
        let reads = vec![
            ("a".to_owned(), obs(1, 12)),
            ("a".to_owned(), obs(2, 20)),
            ("a".to_owned(), obs(3, 25)),
            // Outside what the watcher followed: not its business.
            ("a".to_owned(), obs(4, 5)),
        ];
        assert!(watch_gaps(&watch, &reads).is_empty());
        // A change at 22 that never arrived: the watcher went from 20 to
        // 24 with nothing for `a` (the event at 28 only covers 25..=28).
        let missing = watch_gaps(&watch, &[("a".to_owned(), obs(9, 22))]);
        assert_eq!(missing.len(), 1, "{missing:?}");
    }

    #[test]
    fn splitmix_below_stays_in_range() {
        let mut rng = SplitMix(7);
        assert!((0..1000).all(|_| rng.below(3) < 3));
        assert_eq!(rng.below(0), 0);
    }
}
