//! Picking one endpoint out of a cluster's candidates: round robin, least
//! request (power of two choices), random, and a consistent-hash ring, all
//! honouring weights. Pure functions over slices, so they are tested
//! without sockets; the cluster decides which endpoints are candidates.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use rand::Rng;

use crate::config::Balance;
use crate::upstream::endpoint::EndpointState;

/// Virtual nodes per unit of weight on the hash ring.
const RING_POINTS_PER_WEIGHT: u32 = 64;
/// At most this many points on a ring, however large the weights.
const RING_MAX_POINTS: usize = 64 * 1024;

/// A stable 64-bit hash (SipHash with fixed keys, so every sidecar built
/// from the same source agrees).
pub fn hash_of<T: Hash + ?Sized>(value: &T) -> u64 {
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0x6d65_7368, 0x776f_726b);
    value.hash(&mut h);
    h.finish()
}

/// A consistent-hash ring over a table's endpoints (by index).
#[derive(Debug, Default)]
pub struct Ring {
    points: Vec<(u64, usize)>,
}

impl Ring {
    pub fn build(endpoints: &[Arc<EndpointState>]) -> Self {
        let total: u64 = endpoints.iter().map(|e| u64::from(e.weight)).sum();
        let scale = if total * u64::from(RING_POINTS_PER_WEIGHT) > RING_MAX_POINTS as u64 {
            RING_MAX_POINTS as f64 / (total as f64 * f64::from(RING_POINTS_PER_WEIGHT))
        } else {
            1.0
        };
        let mut points = Vec::new();
        for (i, e) in endpoints.iter().enumerate() {
            let n = ((f64::from(e.weight * RING_POINTS_PER_WEIGHT) * scale) as u32).max(1);
            for v in 0..n {
                points.push((hash_of(&(e.key.as_str(), v)), i));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// Endpoint indexes in ring order starting at `hash`.
    fn walk(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|(h, _)| *h < hash);
        self.points[start..]
            .iter()
            .chain(self.points[..start].iter())
            .map(|(_, i)| *i)
    }
}

/// Picks among `candidates` (indexes into `all`); `None` only when there
/// are none. `counter` is the cluster's round-robin position.
pub fn pick(
    balance: Balance,
    all: &[Arc<EndpointState>],
    candidates: &[usize],
    counter: usize,
    ring: Option<&Ring>,
    hash: Option<u64>,
) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    if candidates.len() == 1 {
        return Some(candidates[0]);
    }
    let weight = |i: usize| u64::from(all[i].weight.max(1));
    let total: u64 = candidates.iter().map(|&i| weight(i)).sum();
    let by_point = |point: u64| {
        let mut point = point % total;
        for &i in candidates {
            let w = weight(i);
            if point < w {
                return i;
            }
            point -= w;
        }
        candidates[candidates.len() - 1]
    };
    match balance {
        Balance::RoundRobin => Some(by_point(counter as u64)),
        Balance::Random => Some(by_point(rand::rng().random_range(0..total))),
        Balance::LeastRequest => {
            let mut rng = rand::rng();
            let a = by_point(rng.random_range(0..total));
            let mut b = by_point(rng.random_range(0..total));
            if a == b {
                // Two draws of the same endpoint: take the other one at
                // random so the choice stays a choice.
                let others: Vec<usize> = candidates.iter().copied().filter(|&i| i != a).collect();
                b = others[rng.random_range(0..others.len())];
            }
            // Fewer requests per unit of weight wins.
            let load = |i: usize| all[i].in_flight() as u64 * 1000 / weight(i);
            Some(if load(b) < load(a) { b } else { a })
        }
        Balance::RingHash => {
            let (Some(ring), Some(hash)) = (ring, hash) else {
                return Some(by_point(rand::rng().random_range(0..total)));
            };
            ring.walk(hash)
                .find(|i| candidates.contains(i))
                .or(Some(candidates[0]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn endpoints(weights: &[u32]) -> Vec<Arc<EndpointState>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Arc::new(EndpointState::new(
                    format!("n{i}/web-{i}"),
                    format!("127.0.0.{}:80", i + 1).parse().expect("addr"),
                    w,
                    true,
                ))
            })
            .collect()
    }

    fn spread(balance: Balance, weights: &[u32], n: usize) -> HashMap<usize, usize> {
        let all = endpoints(weights);
        let candidates: Vec<usize> = (0..all.len()).collect();
        let ring = Ring::build(&all);
        let mut counts = HashMap::new();
        for k in 0..n {
            let i = pick(
                balance,
                &all,
                &candidates,
                k,
                Some(&ring),
                Some(hash_of(&k)),
            )
            .expect("picked");
            *counts.entry(i).or_default() += 1;
        }
        counts
    }

    #[test]
    fn round_robin_is_even_and_weighted() {
        let even = spread(Balance::RoundRobin, &[1, 1, 1], 300);
        assert_eq!(even.values().copied().collect::<Vec<_>>(), vec![100; 3]);
        let weighted = spread(Balance::RoundRobin, &[3, 1], 400);
        assert_eq!(weighted[&0], 300);
        assert_eq!(weighted[&1], 100);
    }

    #[test]
    fn random_and_ring_roughly_follow_weights() {
        for balance in [Balance::Random, Balance::RingHash, Balance::LeastRequest] {
            let counts = spread(balance, &[2, 1, 1], 8000);
            let share = counts[&0] as f64 / 8000.0;
            assert!((0.35..0.65).contains(&share), "{balance:?}: {counts:?}");
        }
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let all = endpoints(&[1, 1]);
        let _busy: Vec<_> = (0..10).map(|_| all[0].start_request()).collect();
        for k in 0..50 {
            assert_eq!(
                pick(Balance::LeastRequest, &all, &[0, 1], k, None, None),
                Some(1)
            );
        }
    }

    #[test]
    fn ring_hash_is_sticky_and_moves_little_when_an_endpoint_goes() {
        let all = endpoints(&[1, 1, 1, 1]);
        let ring = Ring::build(&all);
        let every: Vec<usize> = (0..4).collect();
        let without_3: Vec<usize> = (0..3).collect();
        let mut moved = 0;
        for k in 0..1000u32 {
            let h = hash_of(&k);
            let a = pick(Balance::RingHash, &all, &every, 0, Some(&ring), Some(h));
            let again = pick(Balance::RingHash, &all, &every, 7, Some(&ring), Some(h));
            assert_eq!(a, again);
            let b = pick(Balance::RingHash, &all, &without_3, 0, Some(&ring), Some(h));
            if a != Some(3) && a != b {
                moved += 1;
            }
        }
        assert_eq!(moved, 0, "keys of the remaining endpoints stay put");
    }

    #[test]
    fn candidates_limit_the_choice() {
        let all = endpoints(&[1, 1, 1]);
        for balance in [
            Balance::RoundRobin,
            Balance::Random,
            Balance::LeastRequest,
            Balance::RingHash,
        ] {
            for k in 0..20 {
                let i = pick(balance, &all, &[2], k, None, Some(k as u64));
                assert_eq!(i, Some(2));
            }
            assert_eq!(pick(balance, &all, &[], 0, None, None), None);
        }
    }
}
