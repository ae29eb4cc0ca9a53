//! "Find the leader, run there or forward, try again if it moved": the
//! one loop behind every leader-only operation (writes, read barriers,
//! membership changes). An attempt either runs on this server, when it
//! leads, or is forwarded to the leader's address; `WriteAttempt::Retry`
//! (nothing happened: no leader, or leadership moved) waits briefly and
//! asks again; anything else is the answer. Bounded by a deadline, after
//! which the caller gets `NoLeader`.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::{ClusterError, WriteAttempt};
use crate::raft::NodeId;

/// Where an attempt runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leader {
    /// This server leads.
    Here,
    /// Another server leads, at this (Raft/gRPC) address.
    There(String),
}

/// Who leads, as seen from this server.
pub trait Leadership {
    fn id(&self) -> NodeId;
    /// The leader's id and address, once one is known (`None` when the
    /// deadline passes first).
    fn wait_for_leader(&self, deadline: Instant) -> impl Future<Output = Option<(NodeId, String)>>;
}

/// How long one wait lasts before asking again after a `Retry`.
const PAUSE: Duration = Duration::from_millis(50);

/// Runs `attempt` where the leader is until it answers, each wait for a
/// leader bounded by `wait_each` and the whole by `deadline`.
pub async fn with_leader<L, T, F, Fut>(
    leadership: &L,
    deadline: Instant,
    wait_each: Duration,
    mut attempt: F,
) -> Result<T, ClusterError>
where
    L: Leadership,
    F: FnMut(Leader) -> Fut,
    Fut: Future<Output = Result<T, WriteAttempt>>,
{
    loop {
        let wait_until = deadline.min(Instant::now() + wait_each);
        let Some((id, addr)) = leadership.wait_for_leader(wait_until).await else {
            return Err(ClusterError::NoLeader);
        };
        let to = if id == leadership.id() {
            Leader::Here
        } else {
            Leader::There(addr)
        };
        match attempt(to).await {
            Ok(value) => return Ok(value),
            Err(WriteAttempt::Failed(e)) => return Err(e),
            Err(WriteAttempt::Retry) => {
                if !pause(deadline).await {
                    return Err(ClusterError::NoLeader);
                }
            }
        }
    }
}

/// A pause before asking again, bounded by the deadline; false once it
/// has passed.
pub async fn pause(deadline: Instant) -> bool {
    let now = Instant::now();
    if now >= deadline {
        return false;
    }
    tokio::time::sleep_until(deadline.min(now + PAUSE)).await;
    Instant::now() < deadline
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;

    use super::*;

    /// Leaders as a script: each ask takes the next entry (`None`: no
    /// leader known until the deadline).
    struct Script {
        leaders: RefCell<VecDeque<Option<NodeId>>>,
    }

    impl Script {
        fn new(leaders: &[Option<NodeId>]) -> Self {
            Script {
                leaders: RefCell::new(leaders.iter().copied().collect()),
            }
        }
    }

    impl Leadership for Script {
        fn id(&self) -> NodeId {
            1
        }

        async fn wait_for_leader(&self, deadline: Instant) -> Option<(NodeId, String)> {
            let next = self.leaders.borrow_mut().pop_front().flatten();
            match next {
                Some(id) => Some((id, format!("10.0.0.{id}:8300"))),
                None => {
                    tokio::time::sleep_until(deadline).await;
                    None
                }
            }
        }
    }

    type Outcome = Result<u32, WriteAttempt>;

    /// Runs the loop with scripted leaders and attempt results; returns
    /// the answer and where each attempt went.
    async fn run(
        leaders: &[Option<NodeId>],
        results: Vec<Outcome>,
        wait: Duration,
    ) -> (Result<u32, ClusterError>, Vec<Leader>) {
        let script = Script::new(leaders);
        let results = RefCell::new(VecDeque::from(results));
        let went = RefCell::new(Vec::new());
        let deadline = Instant::now() + wait;
        let answer = with_leader(&script, deadline, wait, |to| {
            went.borrow_mut().push(to);
            let next = results.borrow_mut().pop_front();
            async move { next.unwrap_or(Err(WriteAttempt::Retry)) }
        })
        .await;
        (answer, went.into_inner())
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn runs_here_when_leading_and_forwards_otherwise() {
        let (answer, went) = run(&[Some(1)], vec![Ok(7)], SECOND).await;
        assert_eq!((answer.ok(), went), (Some(7), vec![Leader::Here]));
        let (answer, went) = run(&[Some(2)], vec![Ok(8)], SECOND).await;
        assert_eq!(answer.ok(), Some(8));
        assert_eq!(went, vec![Leader::There("10.0.0.2:8300".into())]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_moved_leader_is_followed_and_a_failure_is_final() {
        // The leader moves from 2 to here between attempts.
        let (answer, went) = run(
            &[Some(2), Some(1)],
            vec![Err(WriteAttempt::Retry), Ok(9)],
            SECOND,
        )
        .await;
        assert_eq!(answer.ok(), Some(9));
        assert_eq!(
            went,
            vec![Leader::There("10.0.0.2:8300".into()), Leader::Here]
        );
        // A rule violation is the answer: not retried.
        let refused = ClusterError::Rejected("no".into());
        let (answer, went) = run(
            &[Some(1), Some(1)],
            vec![Err(WriteAttempt::Failed(refused)), Ok(1)],
            SECOND,
        )
        .await;
        assert!(matches!(answer, Err(ClusterError::Rejected(_))));
        assert_eq!(went.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_leader_or_endless_retries_end_at_the_deadline() {
        let started = Instant::now();
        let (answer, went) = run(&[None], vec![], SECOND).await;
        assert!(matches!(answer, Err(ClusterError::NoLeader)));
        assert!(went.is_empty());
        assert_eq!(started.elapsed(), SECOND);
        // Always "try again": bounded by the deadline, pausing between.
        let started = Instant::now();
        let leaders = vec![Some(2); 100];
        let (answer, went) = run(&leaders, vec![], SECOND).await;
        assert!(matches!(answer, Err(ClusterError::NoLeader)));
        assert_eq!(started.elapsed(), SECOND);
        assert_eq!(
            went.len(),
            (SECOND.as_millis() / PAUSE.as_millis()) as usize
        );
    }
}
