//! Phase 5, decide on a retry: [`decide`], a pure function from what
//! became of an attempt to whether another endpoint is tried, and the
//! pieces shared with the TCP proxy: the budget (retries in flight at most
//! `budget_percent` of requests in flight, always at least 3, as Envoy)
//! and exponential backoff with full jitter (25 ms base, 250 ms cap).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::Method;

use super::rescue::ProxyError;
use crate::config::RetryOn;
use crate::upstream::cluster::{Cluster, OwnedGauge, acquire_owned};

const BASE: Duration = Duration::from_millis(25);
const CAP: Duration = Duration::from_millis(250);
/// Retries always allowed in flight, whatever the budget says.
const MIN_RETRY_CONCURRENCY: usize = 3;

/// A slot in the retry budget, or `None` (counted) when it is used up.
pub fn budget(cluster: &Arc<Cluster>) -> Option<OwnedGauge> {
    let active = cluster.gauges.requests.load(Ordering::Relaxed);
    let allowed = (active * cluster.config().retries.budget_percent as usize / 100)
        .max(MIN_RETRY_CONCURRENCY);
    let slot = acquire_owned(cluster, |g| &g.retries, allowed);
    if slot.is_none() {
        cluster
            .metrics
            .retries_budget_exhausted
            .fetch_add(1, Ordering::Relaxed);
    }
    slot
}

/// How long to wait before retry number `retry` (1-based).
pub fn backoff(retry: u32) -> Duration {
    meshwork_core::backoff::full_jitter(BASE, CAP, retry)
}

/// Methods that may be sent twice (RFC 9110 §9.2.2).
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// What became of one attempt, as far as a retry is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The upstream answered with `status`. `unreached`: the answer came
    /// from the endpoint's sidecar, which says its app never saw the
    /// request (`x-meshwork-error`: a 503 it could not pass on, or a 421
    /// for a connection made with a leaf that has expired since), so
    /// nothing was processed.
    Answered { status: u16, unreached: bool },
    /// No connection was made (refused, timed out, an HTTP/2 stream the
    /// upstream refused): the upstream saw nothing.
    ConnectFailed,
    /// The connection broke before an answer: the upstream may have seen
    /// the request.
    Reset,
    /// Failed on this side (a full circuit, the client's broken body):
    /// another endpoint would fare no better.
    Refused,
}

impl Attempt {
    /// How a failed send is seen.
    pub fn failed(error: &ProxyError) -> Self {
        match error {
            ProxyError::ConnectFailure(_) | ProxyError::ConnectTimeout(..) => {
                Attempt::ConnectFailed
            }
            ProxyError::Reset(_) => Attempt::Reset,
            _ => Attempt::Refused,
        }
    }
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try another endpoint; `spends_budget` unless the upstream saw
    /// nothing (a connect failure costs it nothing).
    Retry {
        spends_budget: bool,
        why: &'static str,
    },
    /// Answer with what this attempt gave.
    Final,
}

const ANOTHER: &str = "retrying on another endpoint";
const UNREACHED: &str = "the endpoint's sidecar could not reach its app; trying another endpoint";

/// Whether to retry: only when another attempt is possible at all
/// (`can_retry`: the body is in memory and attempts are left), and then
/// only what is safe to send twice — a request the upstream never saw
/// (a failed connect, or a peer sidecar that never reached its app: any
/// method, as a connect failure), or, for an idempotent method, a reset
/// or a status the policy names.
pub fn decide(attempt: Attempt, can_retry: bool, idempotent: bool, on: &RetryOn) -> Verdict {
    if !can_retry {
        return Verdict::Final;
    }
    let retry = |spends_budget, why| Verdict::Retry { spends_budget, why };
    match attempt {
        Attempt::Answered {
            unreached: true, ..
        } if on.connect_failure => retry(false, UNREACHED),
        Attempt::Answered { status, .. }
            if (500..600).contains(&status) && idempotent && on.status(status) =>
        {
            retry(true, ANOTHER)
        }
        Attempt::ConnectFailed if on.connect_failure => retry(false, ANOTHER),
        Attempt::Reset if on.reset && idempotent => retry(true, ANOTHER),
        _ => Verdict::Final,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for retry in 1..20 {
            let ceiling = meshwork_core::backoff::ceiling(BASE, CAP, retry);
            assert!(ceiling <= CAP);
            for _ in 0..20 {
                assert!(backoff(retry) <= ceiling);
            }
        }
        assert!(!idempotent(&Method::POST));
        assert!(idempotent(&Method::PUT));
    }

    /// Full jitter spreads the waits over [0, ceiling]: a retry does wait
    /// (the waits reach the upper half of the ceiling) and retries spread
    /// out (some land in the lower half). 200 samples each: the chance of
    /// a false failure is 2^-199.
    #[test]
    fn backoff_waits_and_spreads() {
        for retry in [1, 2, 4] {
            let ceiling = meshwork_core::backoff::ceiling(BASE, CAP, retry);
            assert!(ceiling > Duration::ZERO);
            let waits: Vec<Duration> = (0..200).map(|_| backoff(retry)).collect();
            let max = waits.iter().max().copied().unwrap_or_default();
            let min = waits.iter().min().copied().unwrap_or_default();
            assert!(
                max >= ceiling / 2,
                "retry {retry}: longest wait {max:?} of {ceiling:?}"
            );
            assert!(
                min < ceiling / 2,
                "retry {retry}: shortest wait {min:?} of {ceiling:?}"
            );
        }
        // Later retries may wait longer.
        assert!(
            meshwork_core::backoff::ceiling(BASE, CAP, 3)
                > meshwork_core::backoff::ceiling(BASE, CAP, 1)
        );
    }

    fn on(connect_failure: bool, reset: bool, any_5xx: bool, statuses: &[u16]) -> RetryOn {
        RetryOn {
            connect_failure,
            reset,
            any_5xx,
            statuses: statuses.to_vec(),
        }
    }

    #[test]
    fn only_what_is_safe_to_send_twice_is_retried() {
        use Attempt::*;
        let answered = |status| Answered {
            status,
            unreached: false,
        };
        let unreached = Answered {
            status: 503,
            unreached: true,
        };
        let default = on(true, true, false, &[502, 503, 504]);
        let budget = Verdict::Retry {
            spends_budget: true,
            why: ANOTHER,
        };
        let free = Verdict::Retry {
            spends_budget: false,
            why: ANOTHER,
        };
        let free_unreached = Verdict::Retry {
            spends_budget: false,
            why: UNREACHED,
        };
        // (attempt, can_retry, idempotent, policy) -> verdict
        let table = [
            // A listed status, idempotent: retried within the budget.
            (answered(503), true, true, &default, budget),
            (answered(502), true, true, &default, budget),
            // Not for POST, not for an unlisted or a non-5xx status.
            (answered(503), true, false, &default, Verdict::Final),
            (answered(500), true, true, &default, Verdict::Final),
            (answered(200), true, true, &default, Verdict::Final),
            (
                answered(429),
                true,
                true,
                &on(true, true, false, &[429]),
                Verdict::Final,
            ),
            // any_5xx takes every 5xx.
            (
                answered(500),
                true,
                true,
                &on(true, true, true, &[]),
                budget,
            ),
            // A peer sidecar that never reached its app: any method, free.
            (unreached, true, false, &default, free_unreached),
            // A peer sidecar refusing the connection a request came on (its
            // client certificate expired): the same, whatever the method.
            (
                Answered {
                    status: 421,
                    unreached: true,
                },
                true,
                false,
                &default,
                free_unreached,
            ),
            // An app's own 421 is its answer.
            (answered(421), true, true, &default, Verdict::Final),
            (
                unreached,
                true,
                true,
                &on(false, true, false, &[]),
                Verdict::Final,
            ),
            // ... and with connect failures off, a listed status still counts.
            (
                unreached,
                true,
                true,
                &on(false, true, false, &[503]),
                budget,
            ),
            // Connect failures: any method, no budget.
            (ConnectFailed, true, false, &default, free),
            (
                ConnectFailed,
                true,
                true,
                &on(false, true, true, &[]),
                Verdict::Final,
            ),
            // Resets: idempotent only, within the budget.
            (Reset, true, true, &default, budget),
            (Reset, true, false, &default, Verdict::Final),
            (
                Reset,
                true,
                true,
                &on(true, false, true, &[]),
                Verdict::Final,
            ),
            // Refused on this side: never.
            (Refused, true, true, &default, Verdict::Final),
            // No attempt left or a streamed body: nothing is retried.
            (ConnectFailed, false, true, &default, Verdict::Final),
            (answered(503), false, true, &default, Verdict::Final),
            (unreached, false, false, &default, Verdict::Final),
        ];
        for (i, (attempt, can_retry, idempotent, policy, want)) in table.into_iter().enumerate() {
            assert_eq!(
                decide(attempt, can_retry, idempotent, policy),
                want,
                "row {i}: {attempt:?} can_retry={can_retry} idempotent={idempotent}"
            );
        }
    }

    #[test]
    fn failures_are_seen_as_what_the_upstream_saw() {
        use std::time::Duration;
        let cases = [
            (
                ProxyError::ConnectFailure("x".into()),
                Attempt::ConnectFailed,
            ),
            (
                ProxyError::ConnectTimeout("x".into(), Duration::from_secs(1)),
                Attempt::ConnectFailed,
            ),
            (ProxyError::Reset("x".into()), Attempt::Reset),
            (ProxyError::CircuitOpen("max_connections"), Attempt::Refused),
            (ProxyError::BadRequest("broke off"), Attempt::Refused),
        ];
        for (error, want) in cases {
            assert_eq!(Attempt::failed(&error), want, "{error}");
        }
    }
}
