//! Prometheus text exposition (format 0.0.4), shared by the registry's
//! `/metrics` and the sidecar's admin `/metrics`: HELP/TYPE lines, label
//! escaping, and a lock-free latency [`Histogram`] whose bucket bounds are
//! a type ([`Buckets`]), so each series family keeps one layout and an
//! observation is an index search and three relaxed atomic adds.
//!
//! Not `prometheus-client`: its registry wants every series registered
//! up front and encodes through `dyn` trait objects per sample, while our
//! series are created on first use (route, upstream) and rendered straight
//! into one `String`; what we share is ~150 lines, tested here.

use std::fmt::Write as _;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Most buckets a [`Buckets`] layout may have.
pub const MAX_BUCKETS: usize = 16;

/// A histogram's bucket layout: upper bounds in microseconds, ascending.
pub trait Buckets {
    const UPPER_MICROS: &'static [u64];
}

/// A latency histogram; buckets are stored per bucket and rendered
/// cumulative.
pub struct Histogram<B> {
    counts: [AtomicU64; MAX_BUCKETS],
    count: AtomicU64,
    sum_micros: AtomicU64,
    layout: PhantomData<fn() -> B>,
}

impl<B: Buckets> Default for Histogram<B> {
    fn default() -> Self {
        const {
            assert!(B::UPPER_MICROS.len() <= MAX_BUCKETS);
        }
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
            layout: PhantomData,
        }
    }
}

impl<B> std::fmt::Debug for Histogram<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<B: Buckets> Histogram<B> {
    pub fn observe(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = B::UPPER_MICROS.iter().position(|b| micros <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// (upper bound in microseconds, observations in that bucket — not
    /// cumulative), the last with bound `u64::MAX` for those above every
    /// bound.
    pub fn buckets(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = B::UPPER_MICROS
            .iter()
            .zip(&self.counts)
            .map(|(bound, n)| (*bound, n.load(Ordering::Relaxed)))
            .collect();
        let within: u64 = out.iter().map(|(_, n)| n).sum();
        out.push((u64::MAX, self.count().saturating_sub(within)));
        out
    }

    /// The sum of all observations, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Writes the series `name` with `labels` (already escaped, without
    /// braces, possibly empty): cumulative buckets, `+Inf`, sum, count.
    pub fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, n) in B::UPPER_MICROS.iter().zip(&self.counts) {
            cumulative += n.load(Ordering::Relaxed);
            let le = *bound as f64 / 1e6;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let count = self.count();
        let sum = self.sum_seconds();
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}\n{name}_sum{braces} {sum}\n{name}_count{braces} {count}"
        );
    }
}

/// The `# HELP` and `# TYPE` lines of a metric family.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value escaped for the text format (backslash, quote, newline).
pub fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Test;
    impl Buckets for Test {
        const UPPER_MICROS: &'static [u64] = &[500, 1_000, 5_000_000];
    }

    #[test]
    fn buckets_render_cumulative_with_inf_sum_and_count() {
        let h = Histogram::<Test>::default();
        h.observe(Duration::from_micros(400));
        h.observe(Duration::from_micros(1_000));
        h.observe(Duration::from_micros(1_001));
        h.observe(Duration::from_secs(9));
        let mut out = String::new();
        h.write(&mut out, "x_seconds", "a=\"b\"");
        assert_eq!(
            out,
            "x_seconds_bucket{a=\"b\",le=\"0.0005\"} 1\n\
             x_seconds_bucket{a=\"b\",le=\"0.001\"} 2\n\
             x_seconds_bucket{a=\"b\",le=\"5\"} 3\n\
             x_seconds_bucket{a=\"b\",le=\"+Inf\"} 4\n\
             x_seconds_sum{a=\"b\"} 9.002401\n\
             x_seconds_count{a=\"b\"} 4\n"
        );
        let mut bare = String::new();
        Histogram::<Test>::default().write(&mut bare, "y", "");
        assert!(
            bare.contains("y_bucket{le=\"+Inf\"} 0\ny_sum 0\ny_count 0\n"),
            "{bare}"
        );
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}
