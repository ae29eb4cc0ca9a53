//! Outlier ejection: passive health from the results of real requests.
//! `consecutive_5xx` failures in a row (5xx, resets, connect failures) take
//! an endpoint out of rotation for `base_ejection` times its number of
//! ejections (at most 5 minutes), never more than `max_ejection_percent`
//! of the endpoints at once (one may always go, as in Envoy). Readmission
//! is by time: an ejected endpoint is skipped until its time is up.

use std::sync::atomic::Ordering;

use crate::config::MAX_EJECTION;
use crate::upstream::cluster::Cluster;
use crate::upstream::endpoint::EndpointState;
use crate::upstream::endpoint::now_ms;

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
        // (The config refuses a base over the cap.)
        let for_ = policy.base_ejection.saturating_mul(times).min(MAX_EJECTION);
        stats
            .ejected_until_ms
            .store(now + for_.as_millis() as u64, Ordering::Relaxed);
        stats.consecutive_failures.store(0, Ordering::Relaxed);
        self.metrics.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(upstream = %config.name, endpoint = %endpoint.key, address = %endpoint.addr, failures = n, ejected_ms = for_.as_millis() as u64, "endpoint ejected after consecutive failures");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use crate::config::{Config, MAX_EJECTION};
    use crate::upstream::cluster::Cluster;
    use crate::upstream::endpoint::now_ms;

    /// A cluster of one endpoint that one failure ejects, `base` at a time.
    fn cluster(base: &str) -> std::sync::Arc<Cluster> {
        let text = format!(
            "[registry]\naddresses = [\"127.0.0.1:8502\"]\n[service]\nname = \"web\"\nport = 8080\n[[upstreams]]\nname = \"api\"\nlisten = \"127.0.0.1:9191\"\nprotocol = \"http\"\noutlier = {{ consecutive_5xx = 1, base_ejection = \"{base}\" }}\n"
        );
        let mut config = Config::parse("t.toml", &text).expect("valid");
        Cluster::local(
            config.upstreams.remove(0),
            "127.0.0.1:1".parse().expect("addr"),
        )
    }

    /// Ejection `n` lasts `base_ejection` × n, and never more than five
    /// minutes: with a 1 min base, 1, 2, 3, 4, 5, 5, 5 … minutes.
    #[test]
    fn ejections_grow_with_their_count_up_to_five_minutes() {
        assert_eq!(MAX_EJECTION, Duration::from_secs(300));
        for (base, secs) in [("1m", 60u64), ("70s", 70), ("5m", 300)] {
            let c = cluster(base);
            let table = c.table();
            let endpoint = &table.endpoints[0];
            for n in 1..=12u64 {
                c.report(endpoint, true);
                let view = &c.view()[0];
                let want = Duration::from_secs((secs * n).min(300));
                let left = Duration::from_millis(view.ejected_for_ms);
                assert!(
                    view.ejected,
                    "base {base}: ejection {n} took the endpoint out"
                );
                assert_eq!(u64::from(view.ejections), n, "base {base}");
                assert!(
                    left <= want && left + Duration::from_secs(1) > want,
                    "base {base}: ejection {n} lasts {left:?}, not {want:?} (base × count, at most 5 min)"
                );
                // Its time is up: readmitted, as if `left` had passed.
                endpoint
                    .stats
                    .ejected_until_ms
                    .store(now_ms(), Ordering::Relaxed);
                assert!(!endpoint.ejected(), "base {base}: readmitted");
            }
        }
    }

    /// An ejected endpoint is not ejected again (its time does not grow
    /// while it is out).
    #[test]
    fn failures_while_ejected_do_not_stretch_the_ejection() {
        let c = cluster("30s");
        let table = c.table();
        let endpoint = &table.endpoints[0];
        c.report(endpoint, true);
        for _ in 0..10 {
            c.report(endpoint, true);
        }
        let view = &c.view()[0];
        assert_eq!(view.ejections, 1);
        assert!(view.ejected_for_ms <= 30_000, "{}", view.ejected_for_ms);
    }
}
