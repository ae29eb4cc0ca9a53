//! Rate limits in the destination's sidecar: the `RateLimits` of this
//! service's `service-defaults` entry (`meshwork_core::ratelimit`),
//! followed live and checked on every inbound HTTP request after the
//! intentions; a request over the limit is answered 429 with
//! `retry-after` (gRPC: RESOURCE_EXHAUSTED) and never reaches the app.
//!
//! A cluster-wide quota (`ServiceLevel`) is enforced with a bucket whose
//! rate is this instance's share, handed out by the registry in answer to
//! the agent's reports (which carry the demand seen here: every inbound
//! request checked against the quota, admitted or not). Until the first
//! share comes, the bucket holds the whole quota.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use meshwork_core::ratelimit::{Bucket, RateLimits};
use tokio_util::sync::CancellationToken;

use super::applied::AppliedConfig;
use crate::discovery::Discovery;

const KIND: &str = "service-defaults";

/// The limits applied now; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    current: RwLock<Option<Arc<RateLimits>>>,
    limited: AtomicU64,
    /// This instance's share of the service's quota (its rate set by
    /// [`Limits::set_quota_share`]).
    quota: Bucket,
    /// Requests checked against the quota since the agent last read it,
    /// and when it did.
    demand: AtomicU64,
    demand_since: std::sync::Mutex<Instant>,
    /// The share in force, requests a second, as f64 bits (for `/metrics`).
    share: AtomicU64,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            current: RwLock::default(),
            limited: AtomicU64::new(0),
            quota: Bucket::new(0.0, 1),
            demand: AtomicU64::new(0),
            demand_since: std::sync::Mutex::new(Instant::now()),
            share: AtomicU64::new(0),
        }
    }
}

impl Limits {
    /// Whether a request for `path` may go on; `Err(wait)` when its
    /// bucket is empty (counted).
    pub fn admit(&self, path: &str) -> Result<(), Duration> {
        let current = self
            .inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(limits) = current else {
            return Ok(());
        };
        let now = Instant::now();
        let quota = limits.service_quota().is_some();
        if quota {
            self.inner.demand.fetch_add(1, Ordering::Relaxed);
        }
        limits
            .admit(path, now)
            .and_then(|()| {
                if quota {
                    self.inner.quota.take(now)
                } else {
                    Ok(())
                }
            })
            .inspect_err(|_| {
                self.inner.limited.fetch_add(1, Ordering::Relaxed);
            })
    }

    pub fn install(&self, limits: Option<RateLimits>) {
        let new_quota = limits.as_ref().and_then(RateLimits::service_quota);
        let mut current = self
            .inner
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let old_quota = current.as_ref().and_then(|l| l.service_quota());
        if new_quota != old_quota
            && let Some(quota) = new_quota
        {
            // The whole quota until the registry hands out a share (its
            // answer to the report this change triggers).
            self.set_quota_share(quota);
        }
        *current = limits.map(Arc::new);
    }

    /// The service's cluster-wide quota, if one applies.
    pub fn quota(&self) -> Option<f64> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|l| l.service_quota())
    }

    /// Requests a second checked against the quota since the last call
    /// (the agent's report).
    pub fn take_demand(&self) -> f64 {
        let mut since = self
            .inner
            .demand_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(*since).as_secs_f64().max(0.001);
        *since = now;
        self.inner.demand.swap(0, Ordering::Relaxed) as f64 / elapsed
    }

    /// This instance's share of the quota, from the registry.
    pub fn set_quota_share(&self, rps: f64) {
        let rps = if rps.is_finite() { rps.max(0.0) } else { 0.0 };
        self.inner.quota.set_rate(rps, Instant::now());
        self.inner.share.store(rps.to_bits(), Ordering::Relaxed);
    }

    /// `/metrics` lines.
    pub fn render_metrics(&self) -> String {
        let mut text = format!(
            "# HELP meshwork_sidecar_rate_limited_total Inbound requests refused by the service's rate limits.\n# TYPE meshwork_sidecar_rate_limited_total counter\nmeshwork_sidecar_rate_limited_total {}\n",
            self.inner.limited.load(Ordering::Relaxed)
        );
        if self.quota().is_some() {
            text.push_str(&format!(
                "# HELP meshwork_sidecar_quota_share_rps This instance's share of its service's cluster-wide quota (requests a second).\n# TYPE meshwork_sidecar_quota_share_rps gauge\nmeshwork_sidecar_quota_share_rps {}\n",
                f64::from_bits(self.inner.share.load(Ordering::Relaxed))
            ));
        }
        text
    }
}

/// Follows `service`'s `service-defaults` entry until `shutdown`,
/// installing its limits on every change (none when it has none; a bad
/// one keeps the previous limits, logged).
pub async fn run(
    limits: Limits,
    service: String,
    discovery: Discovery,
    applied: AppliedConfig,
    shutdown: CancellationToken,
) {
    let mut entries = discovery.config_entries(KIND);
    let consumer = applied.consumer("rate limits", &[KIND]);
    loop {
        {
            let state = Arc::clone(&entries.borrow_and_update());
            if state.ready {
                let parsed = match state.value.get(&service) {
                    None => Ok(None),
                    Some(entry) => super::entry_body(entry)
                        .and_then(|body| RateLimits::from_service_defaults(&service, &body)),
                };
                match parsed {
                    Ok(parsed) => {
                        limits.install(parsed);
                        consumer.applied(&[(KIND, state.index)], None);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rate limits refused; keeping the previous ones");
                        consumer.applied(&[(KIND, state.index)], Some(e));
                    }
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = entries.changed() => if changed.is_err() { return },
        }
    }
}
