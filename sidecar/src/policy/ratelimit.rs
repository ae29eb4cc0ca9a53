//! Rate limits in the destination's sidecar: the `RateLimits` of this
//! service's `service-defaults` entry (`meshwork_core::ratelimit`),
//! followed live and checked on every inbound HTTP request after the
//! intentions; a request over the limit is answered 429 with
//! `retry-after` (gRPC: RESOURCE_EXHAUSTED) and never reaches the app.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use meshwork_core::ratelimit::RateLimits;
use tokio_util::sync::CancellationToken;

use super::applied::AppliedConfig;
use crate::discovery::Discovery;

const KIND: &str = "service-defaults";

/// The limits applied now; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    current: RwLock<Option<Arc<RateLimits>>>,
    limited: AtomicU64,
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
        limits.admit(path, Instant::now()).inspect_err(|_| {
            self.inner.limited.fetch_add(1, Ordering::Relaxed);
        })
    }

    pub fn install(&self, limits: Option<RateLimits>) {
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = limits.map(Arc::new);
    }

    /// `/metrics` lines.
    pub fn render_metrics(&self) -> String {
        format!(
            "# HELP meshwork_sidecar_rate_limited_total Inbound requests refused by the service's rate limits.\n# TYPE meshwork_sidecar_rate_limited_total counter\nmeshwork_sidecar_rate_limited_total {}\n",
            self.inner.limited.load(Ordering::Relaxed)
        )
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
