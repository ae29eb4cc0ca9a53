//! Retry policy pieces shared by the HTTP and TCP proxies: the budget
//! (retries in flight at most `budget_percent` of requests in flight,
//! always at least 3, as Envoy) and exponential backoff with full jitter
//! (25 ms base, 250 ms cap). Which failures are retried is decided by the
//! callers, who know whether the request can be replayed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::Method;

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
}
