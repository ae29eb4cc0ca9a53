//! Exponential backoff, the one implementation both binaries use: the
//! sidecar's registration and watch loops step through a [`Backoff`]
//! (doubling, capped, "equal jitter": half to all of the step, so a fleet
//! that lost its registry at once does not return in lockstep), and the
//! proxy's retries wait a [`full_jitter`] delay (anywhere from zero to the
//! step, as Envoy and the AWS architecture note recommend for request
//! retries, where spreading matters more than a floor).

use std::time::Duration;

use rand::Rng;

/// Doubling steps from `min` to `max`, each waited with equal jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub const fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            step: min,
        }
    }

    /// The wait before the next attempt (half to all of the current step);
    /// the step then doubles, up to `max`.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.step.mul_f64(rand::rng().random_range(0.5..=1.0));
        self.step = self.step.saturating_mul(2).min(self.max);
        wait
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

/// The largest wait before retry number `retry` (1-based): `base` doubled
/// per retry, at most `cap`.
pub fn ceiling(base: Duration, cap: Duration, retry: u32) -> Duration {
    base.saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(cap)
}

/// A wait before retry number `retry`: anywhere from zero to its
/// [`ceiling`] ("full jitter").
pub fn full_jitter(base: Duration, cap: Duration, retry: u32) -> Duration {
    ceiling(base, cap, retry).mul_f64(rand::rng().random_range(0.0..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn steps_double_up_to_the_cap_with_equal_jitter_and_reset() {
        let mut b = Backoff::new(100 * MS, 800 * MS);
        for step in [100, 200, 400, 800, 800, 800] {
            let wait = b.next_wait();
            assert!(
                wait >= step * MS / 2 && wait <= step * MS,
                "{wait:?} for {step}"
            );
        }
        b.reset();
        assert!(b.next_wait() <= 100 * MS);
    }

    #[test]
    fn full_jitter_stays_under_a_capped_ceiling() {
        assert_eq!(ceiling(25 * MS, 250 * MS, 1), 25 * MS);
        assert_eq!(ceiling(25 * MS, 250 * MS, 3), 100 * MS);
        assert_eq!(ceiling(25 * MS, 250 * MS, 5), 250 * MS);
        assert_eq!(ceiling(25 * MS, 250 * MS, u32::MAX), 250 * MS);
        for retry in 1..40 {
            for _ in 0..20 {
                assert!(full_jitter(25 * MS, 250 * MS, retry) <= ceiling(25 * MS, 250 * MS, retry));
            }
        }
    }
}
