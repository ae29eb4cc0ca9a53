//! The TTL clock of Consul sessions, run by the leader. A renewal
//! (`PUT /v1/session/renew/:id`, on any server) only restarts the clock in
//! the leader's memory — no log write — and a session whose clock runs
//! out is destroyed through the log, which releases or deletes its locks.
//!
//! As Consul, a session lives for twice its TTL after its last renewal
//! (clients renew at about half the TTL, and a renewal may be late), and
//! a new leader, which cannot know when the old one last saw a renewal,
//! gives every session that grace from the moment it takes over.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::RegistryNode;
use crate::command::Command;
use meshwork_core::duration::parse_duration;

/// How long past its last renewal a session lives, in TTLs (Consul's
/// `SessionTTLMultiplier`).
pub const TTL_MULTIPLIER: u32 = 2;
/// How often the clocks are looked at (a TTL is at least 10 s).
const TICK: Duration = Duration::from_millis(500);

/// Runs the clock whenever this server leads, until shutdown.
pub async fn supervise(node: Arc<RegistryNode>, shutdown: CancellationToken) {
    let mut metrics = node.raft.metrics();
    loop {
        if node.is_leader() {
            lead(&node, &shutdown).await;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}

async fn lead(node: &Arc<RegistryNode>, shutdown: &CancellationToken) {
    // A new leader cannot know when the last one saw a renewal: every
    // session's clock starts now (what this server recorded when it last
    // led is stale).
    node.with_session_clock(HashMap::clear);
    // Expiries proposed and not yet answered.
    let mut expiring: HashSet<String> = HashSet::new();
    let mut writes: JoinSet<String> = JoinSet::new();
    let mut metrics = node.raft.metrics();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = metrics.changed() => {
                if changed.is_err() || !node.is_leader() {
                    break;
                }
            }
            Some(done) = writes.join_next() => {
                if let Ok(id) = done {
                    expiring.remove(&id);
                }
            }
            _ = tick.tick() => {
                for id in expired(node, &expiring) {
                    expiring.insert(id.clone());
                    let node = Arc::clone(node);
                    writes.spawn(async move {
                        tracing::info!(session = %id, "session TTL expired: destroying it");
                        if let Err(e) = node.write(Command::SessionDestroy { id: id.clone() }).await {
                            tracing::warn!(session = %id, error = %e, "expired session not destroyed; trying again");
                        }
                        id
                    });
                }
            }
        }
    }
    writes.abort_all();
}

/// The sessions whose TTL ran out, not already being expired. A session
/// this leader has not seen before starts its clock now; the clock of a
/// session that is gone is dropped. Costs a look-up per session per tick
/// and no allocation for a session that is neither new nor due.
fn expired(node: &RegistryNode, expiring: &HashSet<String>) -> Vec<String> {
    let now = Instant::now();
    // A copy (cheap: persistent maps), so that applying entries never
    // waits for this pass.
    let state = node.state.read().clone();
    node.with_session_clock(|clock| {
        if clock.len() > state.sessions.len() {
            clock.retain(|id, _| state.sessions.get(id).is_some());
        }
        let mut due = Vec::new();
        for session in state.sessions.iter() {
            let Some(ttl) = parse_duration(&session.spec.ttl) else {
                continue;
            };
            let id = &session.spec.id;
            let last = match clock.get(id) {
                Some(last) => *last,
                None => {
                    clock.insert(id.clone(), now);
                    now
                }
            };
            // Checked: a TTL from a restored backup is not re-validated,
            // and a huge one must mean "never", not a panic.
            let expires = ttl
                .checked_mul(TTL_MULTIPLIER)
                .and_then(|grace| last.checked_add(grace));
            if expires.is_some_and(|at| now >= at) && !expiring.contains(id) {
                due.push(id.clone());
            }
        }
        due
    })
}
