//! Failover in under a second after a crash, and in one election round.
//!
//! Raft alone notices a lost leader only when a follower's election timer
//! runs out, and in openraft 0.9 that timer is the leader lease *plus* an
//! election timeout after the last heartbeat (900–1,200 ms at the default
//! 300 ms). Worse, the first follower to time out may hold a shorter log
//! than the other (an append in flight when the leader went): its campaign
//! is refused, and the election takes another round or two. This module
//! calls the election itself, early and from the right follower:
//!
//! - a follower that has not heard from its leader for 1.5 heartbeats
//!   tries a TCP connection to the leader's Raft port (a *refusal* means
//!   the process is gone: a crash, `kill -9`) and asks the other voters
//!   what they know (`FollowerState`: their leader, how long since they
//!   heard from it, the end of their log);
//! - it goes on only if the leader's port refused, or if every other
//!   follower that answered has lost the leader too and enough answered to
//!   win; a follower that still hears the leader (a partition of this
//!   server alone, a slow machine) vetoes it, as pre-vote would;
//! - the followers rank themselves by log (longest first, then id) and the
//!   first calls the election: when the leader's port refused, at the
//!   latest contact any of them had + the leader lease + a heartbeat (the
//!   voters refuse votes until their lease has run out, so an earlier call
//!   could only lose); when the leader may be alive, no sooner than Raft's
//!   own timer (lease + election timeout), so only the candidate is chosen
//!   and a live leader is never deposed earlier than Raft would; the others
//!   follow a heartbeat apart, each only if no leader emerged meanwhile,
//!   twice each (the second call's term beats a vote a failed candidate
//!   took meanwhile); a call that comes late (this process was stalled)
//!   is left to Raft, unless the port refused.
//!
//! Silence counts from when a leader's request *arrives*, not when it has
//! been processed: a follower slowed down by its own disk or a snapshot
//! build still hears a live leader.
//!
//! It changes nothing Raft guarantees: votes are still granted only by
//! voters whose own lease has ended and whose log the candidate's covers.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use meshwork_proto::v1::{FollowerStateReply, FollowerStateRequest};

use super::RegistryNode;
use crate::raft::NodeId;

/// The timings the watcher works with, from the Raft configuration.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The leader's heartbeat interval.
    pub heartbeat: Duration,
    /// How long a voter refuses votes after it last heard from a leader
    /// (openraft 0.9: the maximum election timeout).
    pub lease: Duration,
    /// The minimum election timeout: Raft's own timer fires no earlier
    /// than the lease plus this after the last heartbeat.
    pub election_timeout: Duration,
}

impl Timing {
    /// Silence after which the leader's port is probed.
    fn suspicion(self) -> Duration {
        self.heartbeat * 3 / 2
    }

    /// Added to the lease: a voter's lease runs from when it *processed*
    /// the leader's last heartbeat, a little after it arrived. A call that
    /// comes too early is refused, and a refused candidate's higher term
    /// would depose a leader that is in fact alive; a heartbeat is ample.
    fn margin(self) -> Duration {
        self.heartbeat
    }

    /// Between the calls of two ranks: a vote round (a round trip and a
    /// vote written to disk on each side) fits many times over.
    fn stagger(self) -> Duration {
        self.heartbeat
    }

    /// Between a follower's first and second call.
    fn second_call(self) -> Duration {
        self.heartbeat / 2
    }
}

/// A leader this server has stopped hearing from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Silent {
    leader: NodeId,
    addr: String,
    /// The other voters (not the leader, not this server), with their
    /// Raft addresses, by id.
    others: Vec<(NodeId, String)>,
    /// How many voters the configuration has (the leader included).
    voters: usize,
    /// When this server last heard from it.
    contact: std::time::Instant,
}

/// A follower's claim to be the next leader: the end of its log, then
/// its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Standing {
    id: NodeId,
    /// (term, index) of its last log entry.
    log: (u64, u64),
}

/// What another voter said (`None`: no answer in time, or an older
/// version without the call).
type PeerAnswer = (NodeId, Option<FollowerStateReply>);

/// Whether this server should call an election, and its rank (0 first)
/// among the followers that will: `None` when a leader is still heard or
/// known elsewhere, or when too few followers answered to win.
fn plan(
    me: Standing,
    silent: &Silent,
    crashed: bool,
    peers: &[PeerAnswer],
    timing: Timing,
) -> Option<u32> {
    let suspicion = timing.suspicion().as_millis() as u64;
    let answered: Vec<(NodeId, &FollowerStateReply)> = peers
        .iter()
        .filter_map(|(id, answer)| Some((*id, answer.as_ref()?)))
        .collect();
    for (_, peer) in &answered {
        // Another leader exists, or is being followed: nothing to do.
        if peer.leading || (peer.leader_id != 0 && peer.leader_id != silent.leader) {
            return None;
        }
        // Someone still hears our leader: unless its port refused (then
        // it is gone, whatever the timing), this server alone lost it.
        if !crashed && peer.leader_id == silent.leader && peer.silent_ms < suspicion {
            return None;
        }
    }
    let quorum = silent.voters / 2 + 1;
    if 1 + answered.len() < quorum {
        if !crashed {
            return None;
        }
        // The leader is gone but the others cannot say where their logs
        // end (an older version, a slow answer): rank by id.
        let rank = silent.others.iter().filter(|(id, _)| *id < me.id).count();
        return u32::try_from(rank).ok();
    }
    let ahead = answered
        .iter()
        .map(|(id, peer)| Standing {
            id: *id,
            log: (peer.last_log_term, peer.last_log_index),
        })
        .filter(|other| other.log > me.log || (other.log == me.log && other.id < me.id))
        .count();
    u32::try_from(ahead).ok()
}

/// The end of this server's log, as (term, index).
fn own_log(node: &RegistryNode) -> (u64, u64) {
    node.raft
        .data_metrics()
        .borrow()
        .last_log
        .map_or((0, 0), |l| (l.leader_id.term, l.index))
}

/// Asks every other voter for its `FollowerState`, each within `within`.
async fn ask_peers(node: &RegistryNode, silent: &Silent, within: Duration) -> Vec<PeerAnswer> {
    let asks = silent.others.iter().map(|(id, addr)| async move {
        let answer = async {
            let mut client = node.channels.client(addr).ok()?;
            let request = node.channels.request(FollowerStateRequest {});
            let reply = tokio::time::timeout(within, client.follower_state(request)).await;
            node.channels.outcome(addr, reply.is_ok());
            Some(reply.ok()?.ok()?.into_inner())
        };
        (*id, answer.await)
    });
    futures::future::join_all(asks).await
}

/// Runs until `token` is cancelled.
pub async fn watch_leader(node: Arc<RegistryNode>, timing: Timing, token: CancellationToken) {
    let mut tick = tokio::time::interval(timing.heartbeat / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(silent) = silent_leader(&node, timing) else {
            continue;
        };
        let (crashed, peers) = tokio::join!(
            refuses_connections(&silent.addr, timing.heartbeat),
            ask_peers(&node, &silent, timing.heartbeat),
        );
        let me = Standing {
            id: node.id,
            log: own_log(&node),
        };
        let Some(rank) = plan(me, &silent, crashed, &peers, timing) else {
            continue;
        };
        tracing::info!(
            leader = silent.leader,
            rank,
            crashed,
            "the leader is gone: calling an election when the leader lease ends"
        );
        // The lease runs from the latest contact any of the voters had
        // with a leader (this server's may be older: a connection that
        // stalled), mapped onto tokio's clock.
        let since = peers
            .iter()
            .filter_map(|(_, answer)| answer.as_ref())
            .map(|peer| Duration::from_millis(peer.silent_ms))
            .fold(silent.contact.elapsed(), Duration::min);
        // A crashed leader is replaced as soon as the voters allow; one
        // that may be alive (cut off, paused, slow) no sooner than Raft's
        // own timer would: this module only picks the candidate then.
        let wait = if crashed {
            timing.lease + timing.margin()
        } else {
            timing.lease + timing.election_timeout.max(timing.margin())
        };
        let first = Instant::now()
            .checked_sub(since)
            .unwrap_or_else(Instant::now)
            + wait
            + timing.stagger() * rank;
        for call in [first, first + timing.second_call()] {
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep_until(call) => {}
            }
            if !still_leaderless(&node, &silent) {
                break;
            }
            // Late by more than a heartbeat: this process was itself
            // stalled (starved of CPU, paused), and its idea of the
            // leader's silence may be its own. Unless the leader's port
            // refused, Raft's own timer decides.
            if !crashed && Instant::now() > call + timing.heartbeat {
                tracing::info!("too late to call an election: leaving it to Raft's timer");
                break;
            }
            if let Err(e) = node.raft.trigger().elect().await {
                tracing::warn!(error = %e, "cannot call an election");
                break;
            }
            crate::metrics::METRICS
                .fast_elections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // No new probe until a leader is known again (`silent_leader`
        // needs one): until then Raft's election timers are in charge.
    }
}

/// The leader this follower has not heard from for a while, if any.
fn silent_leader(node: &RegistryNode, timing: Timing) -> Option<Silent> {
    let contact = node.last_leader_heard()?;
    if contact.elapsed() < timing.suspicion() {
        return None;
    }
    let metrics = node.raft.metrics();
    let m = metrics.borrow();
    if m.state != ServerState::Follower {
        return None;
    }
    let leader = m.current_leader?;
    let membership = m.membership_config.membership();
    let addr = membership.get_node(&leader)?.addr.clone();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    if !voters.contains(&node.id) {
        return None;
    }
    let mut others: Vec<(NodeId, String)> = voters
        .iter()
        .filter(|id| **id != leader && **id != node.id)
        .filter_map(|id| Some((*id, membership.get_node(id)?.addr.clone())))
        .collect();
    others.sort_unstable();
    Some(Silent {
        leader,
        addr,
        others,
        voters: voters.len(),
        contact,
    })
}

/// Whether nothing has changed since the leader fell silent: no new
/// contact, no other leader, this server not leading.
fn still_leaderless(node: &RegistryNode, silent: &Silent) -> bool {
    if node.last_leader_heard() != Some(silent.contact) {
        return false;
    }
    let metrics = node.raft.metrics();
    let m = metrics.borrow();
    m.state != ServerState::Leader && m.current_leader.is_none_or(|l| l == silent.leader)
}

/// Whether a TCP connection to `addr` is refused (the host answers, no
/// process listens). A connection made, a timeout or any other error is
/// not a refusal.
async fn refuses_connections(addr: &str, within: Duration) -> bool {
    match tokio::time::timeout(within, tokio::net::TcpStream::connect(addr)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Ok(Ok(_)) | Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_refusal_counts() {
        // A port nothing listens on: refused.
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = free.local_addr().expect("addr").to_string();
        drop(free);
        assert!(refuses_connections(&addr, Duration::from_secs(1)).await);
        // A port something listens on: not refused.
        let open = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = open.local_addr().expect("addr").to_string();
        assert!(!refuses_connections(&addr, Duration::from_secs(1)).await);
        // An address that does not parse or resolve: not a refusal.
        assert!(!refuses_connections("no port here", Duration::from_secs(1)).await);
    }

    const T: Timing = Timing {
        heartbeat: Duration::from_millis(100),
        lease: Duration::from_millis(600),
        election_timeout: Duration::from_millis(300),
    };

    /// Leader 1 silent, seen from server `me` of voters 1..=3.
    fn silent(me: NodeId) -> Silent {
        Silent {
            leader: 1,
            addr: "10.0.0.1:8300".into(),
            others: [2, 3]
                .into_iter()
                .filter(|id| *id != me)
                .map(|id| (id, format!("10.0.0.{id}:8300")))
                .collect(),
            voters: 3,
            contact: std::time::Instant::now(),
        }
    }

    fn peer(leader_id: NodeId, silent_ms: u64, log: (u64, u64)) -> Option<FollowerStateReply> {
        Some(FollowerStateReply {
            leader_id,
            leading: false,
            silent_ms,
            last_log_term: log.0,
            last_log_index: log.1,
        })
    }

    fn me(id: NodeId, log: (u64, u64)) -> Standing {
        Standing { id, log }
    }

    #[test]
    fn the_longest_log_goes_first() {
        // Server 2 is behind server 3 by one entry: 3 first, 2 second,
        // whatever their ids.
        let from_2 = plan(
            me(2, (5, 40)),
            &silent(2),
            false,
            &[(3, peer(1, 400, (5, 41)))],
            T,
        );
        let from_3 = plan(
            me(3, (5, 41)),
            &silent(3),
            false,
            &[(2, peer(1, 400, (5, 40)))],
            T,
        );
        assert_eq!((from_2, from_3), (Some(1), Some(0)));
        // A later term beats a longer log.
        let from_2 = plan(
            me(2, (6, 10)),
            &silent(2),
            false,
            &[(3, peer(1, 400, (5, 41)))],
            T,
        );
        assert_eq!(from_2, Some(0));
        // Equal logs: the lower id first.
        let from_3 = plan(
            me(3, (5, 41)),
            &silent(3),
            false,
            &[(2, peer(1, 400, (5, 41)))],
            T,
        );
        assert_eq!(from_3, Some(1));
    }

    #[test]
    fn a_follower_that_still_hears_the_leader_vetoes() {
        // Server 3 heard leader 1 40 ms ago: server 2 alone lost it.
        assert_eq!(
            plan(
                me(2, (5, 40)),
                &silent(2),
                false,
                &[(3, peer(1, 40, (5, 40)))],
                T
            ),
            None
        );
        // Unless the leader's port refused: it is gone.
        assert_eq!(
            plan(
                me(2, (5, 40)),
                &silent(2),
                true,
                &[(3, peer(1, 40, (5, 40)))],
                T
            ),
            Some(0)
        );
        // Another leader is known, or the peer leads: nothing to do.
        assert_eq!(
            plan(
                me(2, (5, 40)),
                &silent(2),
                true,
                &[(3, peer(3, 0, (6, 41)))],
                T
            ),
            None
        );
        let mut leading = peer(1, 0, (6, 41));
        if let Some(p) = leading.as_mut() {
            p.leading = true;
        }
        assert_eq!(
            plan(me(2, (5, 40)), &silent(2), true, &[(3, leading)], T),
            None
        );
        // A peer that knows no leader any more has lost it too.
        assert_eq!(
            plan(
                me(2, (5, 40)),
                &silent(2),
                false,
                &[(3, peer(0, 10, (5, 40)))],
                T
            ),
            Some(0)
        );
    }

    #[test]
    fn without_answers_only_a_refusal_counts() {
        // No answer: no quorum to be sure of, so no early election...
        assert_eq!(
            plan(me(2, (5, 40)), &silent(2), false, &[(3, None)], T),
            None
        );
        // ...unless the leader's port refused: then rank by id.
        assert_eq!(
            plan(me(2, (5, 40)), &silent(2), true, &[(3, None)], T),
            Some(0)
        );
        assert_eq!(
            plan(me(3, (5, 40)), &silent(3), true, &[(2, None)], T),
            Some(1)
        );
    }

    #[test]
    fn calls_are_ordered_after_the_lease() {
        let t = T;
        assert!(t.suspicion() > t.heartbeat);
        // Rank 1's first call comes after rank 0's second.
        assert!(t.stagger() > t.second_call());
        assert!(t.margin() <= t.heartbeat);
        assert!(t.election_timeout > t.margin());
    }
}
