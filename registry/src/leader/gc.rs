//! Tombstone GC. A deleted KV key leaves a tombstone, and a gone service
//! or node leaves its last index, so that blocking queries see deletions
//! as changes; without a reaper they would pile up for ever under key or
//! instance churn (memory, snapshots, prefix scans). As Consul's tombstone
//! GC: every server notes which index was applied when; the leader, about
//! every TTL/4, proposes [`Command::Reap`] up to the index applied one TTL
//! ago (the same cut-off on every server, so the state stays
//! deterministic). Readers never see an index go back: a reaped key or
//! prefix reports at least the highest reaped index (see `KvStore::reaped`),
//! which wakes blocking queries below it once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::RegistryNode;
use crate::command::Command;
use crate::raft::directory::PROTOCOL_REAP;

/// Default tombstone TTL (Consul's `tombstone_ttl` is 15 min too).
pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);

/// Keeps `(when, applied index)` samples and answers "which index had been
/// applied `ttl` ago".
#[derive(Debug, Default)]
struct History {
    samples: VecDeque<(Instant, u64)>,
}

impl History {
    fn note(&mut self, now: Instant, index: u64) {
        self.samples.push_back((now, index));
    }

    /// The newest index applied at least `ttl` before `now`; older samples
    /// are dropped.
    fn cut_off(&mut self, now: Instant, ttl: Duration) -> Option<u64> {
        let old_enough = |at: &Instant| now.saturating_duration_since(*at) >= ttl;
        while self.samples.len() > 1 && self.samples.get(1).is_some_and(|(at, _)| old_enough(at)) {
            self.samples.pop_front();
        }
        self.samples
            .front()
            .filter(|(at, _)| old_enough(at))
            .map(|(_, index)| *index)
    }
}

/// Runs until `shutdown`: samples the applied index and, on the leader,
/// reaps what is older than `ttl`.
pub async fn run(node: Arc<RegistryNode>, ttl: Duration, shutdown: CancellationToken) {
    let every = (ttl / 4).max(Duration::from_millis(100));
    let mut history = History::default();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_reap = 0u64;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        history.note(now, node.state.applied_index());
        let Some(up_to) = history.cut_off(now, ttl) else {
            continue;
        };
        if up_to <= last_reap || !node.is_leader() {
            continue;
        }
        let (kv, catalog, tombstones) = {
            let state = node.state.read();
            (
                state.kv.reapable(up_to),
                state.catalog.reapable(up_to),
                state.kv.tombstones(),
            )
        };
        if !kv && !catalog {
            last_reap = up_to;
            continue;
        }
        // An older server could not decode the command (a rolling upgrade
        // in progress): wait until every voter speaks a level that has it.
        let voters = node.members().into_iter().filter(|m| m.voter).map(|m| m.id);
        if !node.channels.directory.all_speak(voters, PROTOCOL_REAP) {
            tracing::info!(
                "tombstone reap held back: not every server runs a version that has it yet"
            );
            continue;
        }
        match node.write(Command::Reap { up_to }).await {
            Ok(applied) => {
                last_reap = up_to;
                tracing::debug!(
                    up_to,
                    index = applied.index,
                    tombstones_before = tombstones,
                    "tombstones reaped"
                );
            }
            Err(e) => tracing::debug!(error = %e, "tombstone reap not written; next round"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cut_off_is_the_newest_index_at_least_a_ttl_old() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut h = History::default();
        h.note(t0, 5);
        assert_eq!(h.cut_off(t0, 10 * s), None, "nothing old enough yet");
        h.note(t0 + 4 * s, 9);
        h.note(t0 + 8 * s, 12);
        assert_eq!(h.cut_off(t0 + 10 * s, 10 * s), Some(5));
        assert_eq!(h.cut_off(t0 + 14 * s, 10 * s), Some(9));
        assert_eq!(h.samples.len(), 2, "samples older than the cut-off dropped");
        assert_eq!(h.cut_off(t0 + 30 * s, 10 * s), Some(12));
    }
}
