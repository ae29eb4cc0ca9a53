//! Outlier ejection: passive health from the results of real requests.
//! `consecutive_5xx` failures in a row (5xx, resets, connect failures) take
//! an endpoint out of rotation for `base_ejection` times its number of
//! ejections (at most 5 minutes), never more than `max_ejection_percent`
//! of the endpoints at once (one may always go, as in Envoy). Readmission
//! is by time: an ejected endpoint is skipped until its time is up.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::upstream::cluster::Cluster;
use crate::upstream::endpoint::EndpointState;
use crate::upstream::endpoint::now_ms;

/// Ejections never last longer than this (Envoy's max_ejection_time).
const MAX_EJECTION: Duration = Duration::from_secs(300);

impl Cluster {
    /// Passive health: a failed (5xx, reset, connect failure) or
    /// successful exchange with `endpoint`.
    pub fn report(&self, endpoint: &EndpointState, failed: bool) {
        let stats = &endpoint.stats;
        if !failed {
            stats.consecutive_failures.store(0, Ordering::Relaxed);
            return;
        }
        stats.failures.fetch_add(1, Ordering::Relaxed);
        let config = self.config();
        let policy = &config.outlier;
        if policy.consecutive_5xx == 0 {
            return;
        }
        let n = stats.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < policy.consecutive_5xx {
            return;
        }
        let now = now_ms();
        if endpoint.ejected_at(now) {
            return;
        }
        let table = self.table();
        let total = table.endpoints.len();
        let ejected = table.endpoints.iter().filter(|e| e.ejected_at(now)).count();
        // At least one may always go (as Envoy), the rest within the share.
        if ejected > 0 && (ejected + 1) * 100 > total * policy.max_ejection_percent as usize {
            return;
        }
        let times = stats.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let for_ = (policy.base_ejection * times).min(MAX_EJECTION.max(policy.base_ejection));
        stats
            .ejected_until_ms
            .store(now + for_.as_millis() as u64, Ordering::Relaxed);
        stats.consecutive_failures.store(0, Ordering::Relaxed);
        self.metrics.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(upstream = %config.name, endpoint = %endpoint.key, address = %endpoint.addr, failures = n, ejected_ms = for_.as_millis() as u64, "endpoint ejected after consecutive failures");
    }
}
