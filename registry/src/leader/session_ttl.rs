//! The TTL clock of Consul sessions, run by the leader. A renewal
//! (`PUT /v1/session/renew/:id`, on any server) only restarts the clock in
//! the leader's memory — no log write — and a session whose clock runs
//! out is destroyed through the log, which releases or deletes its locks.
//!
//! As Consul, a session lives for twice its TTL after its last renewal
//! (clients renew at about half the TTL, and a renewal may be late), and
//! a new leader, which cannot know when the old one last saw a renewal,
//! gives every session that grace from the moment it takes over.

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

/// Expiries written at once, at most (the rest wait for the next pass).
const MAX_EXPIRING: usize = 256;

/// Runs the clock whenever this server leads, until shutdown; afresh at
/// each term it leads.
pub async fn supervise(node: Arc<RegistryNode>, shutdown: CancellationToken) {
    let mut metrics = node.raft.metrics();
    loop {
        let leading = {
            let m = metrics.borrow_and_update();
            (m.state == openraft::ServerState::Leader).then_some(m.current_term)
        };
        if let Some(term) = leading {
            lead(&node, term, &shutdown).await;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}

/// The clock for one term of leadership.
async fn lead(node: &Arc<RegistryNode>, term: u64, shutdown: &CancellationToken) {
    // A new leader cannot know when the last one saw a renewal: every
    // session's clock starts now (what this server recorded when it last
    // led is stale).
    node.with_session_clock(|clock| {
        clock.last.clear();
        clock.expiring.clear();
    });
    let mut writes: JoinSet<String> = JoinSet::new();
    let mut metrics = node.raft.metrics();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = metrics.changed() => {
                let still = {
                    let m = metrics.borrow_and_update();
                    m.state == openraft::ServerState::Leader && m.current_term == term
                };
                if changed.is_err() || !still {
                    break;
                }
            }
            Some(done) = writes.join_next() => {
                if let Ok(id) = done {
                    node.with_session_clock(|clock| clock.expiring.remove(&id));
                }
            }
            _ = tick.tick() => {
                for id in expired(node, writes.len()) {
                    let node = Arc::clone(node);
                    writes.spawn(async move {
                        tracing::info!(session = %id, "session TTL expired: destroying it");
                        // Proposed here only: a decision taken on this
                        // leader's clock is not forwarded to another one
                        // (which may have seen renewals since).
                        match node.write_local(Command::SessionDestroy { id: id.clone() }).await {
                            Ok(_) => {}
                            Err(crate::cluster::WriteAttempt::Retry) => {
                                tracing::debug!(session = %id, "no longer leading: the next leader keeps the session's clock");
                            }
                            Err(crate::cluster::WriteAttempt::Failed(e)) => {
                                tracing::warn!(session = %id, error = %e, "expired session not destroyed; trying again");
                            }
                        }
                        id
                    });
                }
            }
        }
    }
    writes.abort_all();
}

/// The sessions whose TTL ran out, now marked as expiring (renewals find
/// them gone). A session this leader has not seen before starts its clock
/// now; the clock of a session that is gone is dropped. At most
/// `MAX_EXPIRING` expiries are in flight.
fn expired(node: &RegistryNode, in_flight: usize) -> Vec<String> {
    let now = Instant::now();
    // A copy (cheap: persistent maps), so that applying entries never
    // waits for this pass; the TTLs are parsed before the clock is locked
    // (renewals take that lock).
    let state = node.state.read().clone();
    let ttls: Vec<(&String, Duration)> = state
        .sessions
        .iter()
        .filter_map(|s| Some((&s.spec.id, parse_duration(&s.spec.ttl)?)))
        .collect();
    node.with_session_clock(|clock| {
        if clock.last.len() > state.sessions.len() {
            clock.last.retain(|id, _| state.sessions.get(id).is_some());
        }
        let mut due = Vec::new();
        for (id, ttl) in ttls {
            let last = match clock.last.get(id) {
                Some(last) => *last,
                None => {
                    clock.last.insert(id.clone(), now);
                    now
                }
            };
            // Checked: a TTL from a restored backup is not re-validated,
            // and a huge one must mean "never", not a panic.
            let expires = ttl
                .checked_mul(TTL_MULTIPLIER)
                .and_then(|grace| last.checked_add(grace));
            if expires.is_some_and(|at| now >= at)
                && !clock.expiring.contains(id)
                && in_flight + due.len() < MAX_EXPIRING
            {
                clock.expiring.insert(id.clone());
                due.push(id.clone());
            }
        }
        due
    })
}
