//! The retry budget: retries may add at most a share of the requests of
//! the last second, plus a small floor per second, so a failing backend
//! cannot multiply a service's load (linkerd2-proxy's and Envoy's model).
//! Kept per service across reloads.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counts of the current and previous one-second windows; the last second
/// is estimated by weighting the previous window by how much of it is still
/// within a second (a sliding window without per-event storage).
#[derive(Debug)]
pub struct RetryBudget(Mutex<Windows>);

#[derive(Debug)]
struct Windows {
    start: Instant,
    requests: u64,
    retries: u64,
    previous_requests: u64,
    previous_retries: u64,
}

const WINDOW: Duration = Duration::from_secs(1);

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget(Mutex::new(Windows {
            start: Instant::now(),
            requests: 0,
            retries: 0,
            previous_requests: 0,
            previous_retries: 0,
        }))
    }
}

impl Windows {
    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed < WINDOW {
            return;
        }
        if elapsed < WINDOW * 2 {
            self.previous_requests = self.requests;
            self.previous_retries = self.retries;
        } else {
            self.previous_requests = 0;
            self.previous_retries = 0;
        }
        self.requests = 0;
        self.retries = 0;
        self.start = now - Duration::from_nanos((elapsed.as_nanos() % WINDOW.as_nanos()) as u64);
    }

    /// Estimated count over the last second.
    fn last_second(&self, now: Instant, current: u64, previous: u64) -> f64 {
        let into = now.saturating_duration_since(self.start).as_secs_f64() / WINDOW.as_secs_f64();
        current as f64 + previous as f64 * (1.0 - into.min(1.0))
    }
}

impl RetryBudget {
    /// Counts a request (its first attempt).
    pub fn request(&self) {
        let mut windows = self.0.lock().unwrap_or_else(|e| e.into_inner());
        windows.roll(Instant::now());
        windows.requests += 1;
    }

    /// Takes one retry from the budget if there is room: retries over the
    /// last second stay within `percent` of its requests plus `floor`.
    pub fn try_retry(&self, percent: u32, floor: u32) -> bool {
        let now = Instant::now();
        let mut windows = self.0.lock().unwrap_or_else(|e| e.into_inner());
        windows.roll(now);
        let requests = windows.last_second(now, windows.requests, windows.previous_requests);
        let retries = windows.last_second(now, windows.retries, windows.previous_retries);
        let allowed = f64::from(floor) + requests * f64::from(percent) / 100.0;
        if retries + 1.0 > allowed {
            return false;
        }
        windows.retries += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_the_share_plus_the_floor() {
        let budget = RetryBudget::default();
        for _ in 0..1000 {
            budget.request();
        }
        let granted = (0..1000).filter(|_| budget.try_retry(20, 10)).count();
        // Within one window: 20% of 1000 plus 10 (the test runs well within a second).
        assert_eq!(granted, 210);
    }

    #[test]
    fn without_traffic_only_the_floor_is_allowed() {
        let budget = RetryBudget::default();
        assert_eq!((0..100).filter(|_| budget.try_retry(20, 3)).count(), 3);
        assert_eq!((0..100).filter(|_| budget.try_retry(0, 0)).count(), 0);
    }
}
