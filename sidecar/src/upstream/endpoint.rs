//! One endpoint of a cluster as a request sees it ([`EndpointState`]:
//! address, weight, health) and the counters kept for it across table
//! updates ([`EndpointStats`]: in flight, failures, ejection), which the
//! balancer reads and passive health writes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use hyper::http::uri::Authority;

/// The instant endpoint timestamps count from (milliseconds in atomics).
pub(super) fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub(super) fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// Counters of one endpoint, kept across table updates.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub(super) in_flight: AtomicUsize,
    pub(super) consecutive_failures: AtomicU32,
    /// Milliseconds since [`epoch`]; 0 = not ejected.
    pub(super) ejected_until_ms: AtomicU64,
    pub(super) ejections: AtomicU32,
    pub(super) requests: AtomicU64,
    pub(super) failures: AtomicU64,
}

/// One endpoint in a table.
#[derive(Debug)]
pub struct EndpointState {
    /// `<node>/<service id>`.
    pub key: String,
    /// Where it is dialled: its sidecar's inbound port when it has one.
    pub addr: SocketAddr,
    /// `addr` as a URI authority (made once, cloned per request).
    pub authority: Authority,
    pub weight: u32,
    /// Passing or warning.
    pub healthy: bool,
    pub health: &'static str,
    /// It has a sidecar in front (it advertises an inbound port), whose
    /// `x-meshwork-error` answers can be trusted.
    pub sidecar: bool,
    pub(super) stats: Arc<EndpointStats>,
}

/// Counts a request in flight on an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EndpointState {
    pub fn new(key: String, addr: SocketAddr, weight: u32, healthy: bool) -> Self {
        EndpointState {
            key,
            authority: authority_of(addr),
            addr,
            weight: weight.max(1),
            healthy,
            health: if healthy { "passing" } else { "critical" },
            sidecar: false,
            stats: Arc::default(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.stats.in_flight.load(Ordering::Relaxed)
    }

    pub fn start_request(&self) -> InFlight {
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(&self.stats))
    }

    pub(super) fn ejected_at(&self, now: u64) -> bool {
        let until = self.stats.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && now < until
    }

    pub fn ejected(&self) -> bool {
        self.ejected_at(now_ms())
    }
}

pub(super) fn authority_of(addr: SocketAddr) -> Authority {
    // A socket address always makes a valid authority.
    Authority::try_from(addr.to_string().as_str())
        .unwrap_or_else(|_| Authority::from_static("0.0.0.0:0"))
}
