//! Counters, gauges and histograms kept in the state of what they measure
//! (a service, a backend, a registrar's instance) instead of in the
//! Prometheus recorder: they are dropped with it, so its series leave
//! `/metrics` with it. The recorder has no way to forget one series.
//!
//! Each is a few atomics updated with relaxed ordering: as cheap on the
//! data path as the recorder's handles (a histogram sample is three adds
//! where the recorder queues every sample until its next upkeep).

use super::BUCKETS;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

/// A count that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn increment(&self, by: u64) {
        self.0.fetch_add(by, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A level that goes up and down; clones share it (a connection's guard
/// holds one until the connection ends).
#[derive(Debug, Default, Clone)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    pub fn increment(&self, by: i64) {
        self.0.fetch_add(by, Ordering::Relaxed);
    }

    pub fn decrement(&self, by: i64) {
        self.0.fetch_sub(by, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Durations in seconds over the admin API's buckets ([`BUCKETS`]).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Samples per bucket (not cumulative); the last one is past the
    /// largest bound (`+Inf`).
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// The sum of the samples, in nanoseconds (exact, where an f64 sum
    /// would need a compare-and-swap loop).
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one sample, in seconds.
    pub fn record(&self, seconds: f64) {
        let seconds = if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        };
        let bucket = BUCKETS.partition_point(|bound| *bound < seconds);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }

    /// The cumulative count at each bound of [`BUCKETS`], then the total
    /// count (`+Inf`), and the sum in seconds.
    pub fn snapshot(&self) -> ([u64; BUCKETS.len() + 1], f64) {
        let mut cumulative = [0; BUCKETS.len() + 1];
        let mut total = 0;
        for (slot, bucket) in cumulative.iter_mut().zip(&self.buckets) {
            total += bucket.load(Ordering::Relaxed);
            *slot = total;
        }
        (cumulative, self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_sample_in_its_bucket_and_every_one_above() {
        let histogram = Histogram::default();
        histogram.record(0.00005); // on the first bound: counts in it
        histogram.record(0.003);
        histogram.record(60.0); // past the last bound
        histogram.record(f64::NAN); // nonsense counts as zero
        let (cumulative, sum) = histogram.snapshot();
        assert_eq!(cumulative[0], 2);
        let at_5ms = BUCKETS.iter().position(|b| *b == 0.005).unwrap();
        assert_eq!(cumulative[at_5ms - 1], 2);
        assert_eq!(cumulative[at_5ms], 3);
        assert_eq!(cumulative[BUCKETS.len() - 1], 3);
        assert_eq!(cumulative[BUCKETS.len()], 4);
        assert!((sum - 60.00305).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn gauge_clones_share_one_level() {
        let gauge = Gauge::default();
        let held = gauge.clone();
        held.increment(2);
        gauge.decrement(1);
        assert_eq!(held.get(), 1);
    }
}
