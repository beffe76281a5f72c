//! Choosing a backend: policies, weights, zones, and passive outlier ejection.
//!
//! A [`BackendSet`] is immutable once built; the proxy swaps whole sets on
//! reload. Per-backend counters live in [`BackendStats`], shared by id
//! across sets, so a reload neither resets least-connection counts nor
//! forgives an ejected backend.

use crate::catalog::{Balance, InstanceState, Label, Outlier};
use crate::telemetry::Counter;
use std::cell::Cell;
use std::ffi::CString;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Nanoseconds since the first call: the proxy's monotonic clock, cheap to
/// keep in atomics (ejection deadlines, latency stamps, idle times).
pub fn now_nanos() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// What a failed connect to a backend is counted as, by kind.
pub const CONNECT_FAILURES: [&str; 6] = ["refused", "reset", "timeout", "denied", "unreachable", "other"];

/// Live counters of one backend, kept across reloads: the balancer's, and
/// its traffic, which `/metrics` and `/routes` show.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Connections open to it now (TCP), or requests in flight (HTTP).
    pub active: AtomicU64,
    /// Its traffic counters, allocated at its first use: a service's
    /// backends are compiled together at its first connection, and under a
    /// hash or zone policy many of them may never be dialed from this node
    /// (88 bytes of zeros each otherwise).
    traffic: OnceLock<Box<BackendTraffic>>,
    /// Peak-EWMA of connect latency, in nanoseconds (0: no sample yet).
    ewma_nanos: AtomicU64,
    ewma_stamp: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Ejected until this `now_nanos()` instant (0: not ejected).
    ejected_until: AtomicU64,
    /// Ejections in a row; sets the next ejection's length.
    ejections: AtomicU32,
    /// Upstream HTTP connections to it (unused by TCP services).
    pub pool: Arc<crate::proxy::http::pool::Pool>,
}

/// What went to and from one backend (read when asked, so the data path
/// pays an atomic add per event, nothing per byte).
#[derive(Debug, Default)]
pub struct BackendTraffic {
    /// Connections made to it: per client connection (TCP), or upstream
    /// connections opened (HTTP).
    pub connections: Counter,
    /// Failed connects, by kind ([`CONNECT_FAILURES`], in its order).
    pub connect_errors: [Counter; CONNECT_FAILURES.len()],
    /// Bytes copied to and from it (TCP services), counted as each
    /// connection ends.
    pub bytes_to_backend: Counter,
    pub bytes_to_client: Counter,
    /// HTTP requests sent to it, each attempt.
    pub requests: Counter,
    /// Times it was ejected.
    pub ejected: Counter,
}

/// The counters of a backend not used yet: all zero.
static UNUSED_TRAFFIC: std::sync::LazyLock<BackendTraffic> =
    std::sync::LazyLock::new(BackendTraffic::default);

/// Decay time of the latency EWMA.
const EWMA_DECAY: Duration = Duration::from_secs(10);

impl BackendStats {
    /// Whether the backend is ejected at `now`.
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// Records a successful connect and its latency (peak-EWMA: a slower
    /// sample counts at once, faster ones decay in).
    pub fn record_success(&self, latency: Duration) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
        let now = now_nanos();
        let sample = latency.as_nanos().max(1) as u64;
        let previous = self.ewma_nanos.load(Ordering::Relaxed);
        let stamp = self.ewma_stamp.swap(now, Ordering::Relaxed);
        let next = if previous == 0 || sample > previous {
            sample
        } else {
            let elapsed = now.saturating_sub(stamp) as f64;
            let weight = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            (previous as f64 * weight + sample as f64 * (1.0 - weight)) as u64
        };
        self.ewma_nanos.store(next.max(1), Ordering::Relaxed);
    }

    /// Records a failed connect; returns the ejection length if this failure
    /// should eject the backend (the caller checks the ejection cap).
    fn record_failure(&self, policy: &Outlier) -> Option<Duration> {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < policy.consecutive_failures {
            return None;
        }
        let ejections = self.ejections.load(Ordering::Relaxed).min(16);
        let length = policy
            .base_ejection
            .saturating_mul(1 << ejections)
            .min(policy.max_ejection);
        Some(length)
    }

    /// Its traffic counters, to count with (allocated now if need be).
    pub fn traffic(&self) -> &BackendTraffic {
        self.traffic.get_or_init(Box::default)
    }

    /// Its traffic counters as they are, to read (zeros if never used).
    pub fn traffic_now(&self) -> &BackendTraffic {
        self.traffic.get().map_or(&UNUSED_TRAFFIC, |t| t)
    }

    fn eject(&self, length: Duration) {
        self.traffic().ejected.increment(1);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.ejected_until
            .store(now_nanos() + length.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Connect latency estimate used by peak-EWMA (unknown backends look fast,
    /// so new backends get tried).
    fn latency_estimate(&self) -> f64 {
        self.ewma_nanos.load(Ordering::Relaxed) as f64
    }
}

/// One backend as the balancer sees it.
#[derive(Debug, Clone)]
pub struct Backend {
    pub id: Box<str>,
    pub host: Box<str>,
    pub port: u16,
    /// `host` and `port` when the host is an IP address (no lookup per connect).
    pub addr: Option<SocketAddr>,
    /// Congestion control to set before connecting (a backend on this host,
    /// see [`super::congestion`]).
    pub congestion: Option<Arc<CString>>,
    pub weight: u32,
    pub zone: Option<Box<str>>,
    /// The instance's tags (HTTP splits select backends by them).
    pub tags: Box<[Label]>,
    /// The node that registered it.
    pub node: Option<Label>,
    /// Its node's mesh inbound address, when it is reached through the
    /// mesh (an mTLS tunnel) rather than directly.
    pub mesh: Option<SocketAddr>,
    pub state: InstanceState,
    pub stats: Arc<BackendStats>,
}

/// The backends of one service and how to choose among them.
#[derive(Debug)]
pub struct BackendSet {
    backends: Vec<Backend>,
    policy: Balance,
    outlier: Outlier,
    /// The node's zone: prefer backends there when any is usable.
    local_zone: Option<String>,
    cursor: AtomicU64,
}

/// Why no backend could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend {
    /// None is up (all draining, in maintenance, weight 0, or none at all).
    NoneUp,
    /// Every usable backend was already tried for this connection.
    Exhausted,
}

impl BackendSet {
    pub fn new(
        backends: Vec<Backend>,
        policy: Balance,
        outlier: Outlier,
        local_zone: Option<String>,
    ) -> Self {
        BackendSet {
            backends,
            policy,
            outlier,
            local_zone,
            cursor: AtomicU64::new(0),
        }
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Chooses a backend for a connection from `client`, skipping `tried`
    /// (indices already attempted for this connection).
    pub fn pick(&self, client: IpAddr, tried: &[usize]) -> Result<usize, NoBackend> {
        self.pick_among(hash_key(&client), tried, None)
    }

    /// Chooses a backend among `among` (indices; `None`: all), skipping
    /// `tried`; `key` is what consistent hashing keeps together (a client
    /// address, a header's value: see [`hash_key`]).
    pub fn pick_among(&self, key: u64, tried: &[usize], among: Option<&[usize]>) -> Result<usize, NoBackend> {
        let now = now_nanos();
        let mut any_up = false;
        let mut best_tier = u8::MAX;
        let mut candidates = Vec::with_capacity(self.backends.len());
        let (listed, all) = match among {
            Some(among) => (among, 0..0),
            None => (&[][..], 0..self.backends.len()),
        };
        for i in listed.iter().copied().chain(all) {
            let Some(backend) = self.backends.get(i) else {
                continue;
            };
            if backend.state != InstanceState::Up || backend.weight == 0 {
                continue;
            }
            any_up = true;
            if tried.contains(&i) {
                continue;
            }
            // Lower tiers win: healthy before ejected (trying an ejected
            // backend beats refusing the connection), then the node's zone.
            let ejected = backend.stats.is_ejected(now);
            let remote = self
                .local_zone
                .as_deref()
                .is_some_and(|zone| backend.zone.as_deref() != Some(zone));
            let tier = (u8::from(ejected) << 1) | u8::from(remote);
            if tier < best_tier {
                best_tier = tier;
                candidates.clear();
            }
            if tier == best_tier {
                candidates.push(i);
            }
        }
        if !any_up {
            return Err(NoBackend::NoneUp);
        }
        if candidates.is_empty() {
            return Err(NoBackend::Exhausted);
        }
        Ok(match self.policy {
            Balance::RoundRobin => self.weighted_round_robin(&candidates),
            Balance::LeastConnections => self.least_connections(&candidates),
            Balance::PeakEwma => self.power_of_two(&candidates),
            Balance::ConsistentHash => self.rendezvous(&candidates, key),
        })
    }

    fn weight(&self, index: usize) -> u64 {
        u64::from(self.backends[index].weight)
    }

    /// Each backend gets turns in proportion to its weight.
    fn weighted_round_robin(&self, candidates: &[usize]) -> usize {
        self.by_ticket(candidates, self.cursor.fetch_add(1, Ordering::Relaxed))
    }

    /// The candidate whose share of the total weight holds `ticket`
    /// (taken modulo the total): the weighted pick shared by the policies.
    fn by_ticket(&self, candidates: &[usize], ticket: u64) -> usize {
        let total: u64 = candidates.iter().map(|&i| self.weight(i)).sum();
        let mut ticket = ticket % total;
        for &i in candidates {
            let weight = self.weight(i);
            if ticket < weight {
                return i;
            }
            ticket -= weight;
        }
        candidates[0]
    }

    /// Fewest open connections per unit of weight; ties rotate.
    fn least_connections(&self, candidates: &[usize]) -> usize {
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) as usize;
        let load =
            |i: usize| self.backends[i].stats.active.load(Ordering::Relaxed) as f64 / self.weight(i) as f64;
        (0..candidates.len())
            .map(|k| candidates[(start + k) % candidates.len()])
            .min_by(|&a, &b| load(a).total_cmp(&load(b)))
            .expect("candidates is not empty")
    }

    /// Power of two choices over latency × load / weight: two backends drawn
    /// at random (by weight), the cheaper wins. Faster backends get more.
    fn power_of_two(&self, candidates: &[usize]) -> usize {
        if candidates.len() == 1 {
            return candidates[0];
        }
        let a = self.draw_weighted(candidates);
        let mut b = self.draw_weighted(candidates);
        for _ in 0..4 {
            if b != a {
                break;
            }
            b = self.draw_weighted(candidates);
        }
        let cost = |i: usize| {
            let stats = &self.backends[i].stats;
            let active = stats.active.load(Ordering::Relaxed) as f64;
            (stats.latency_estimate() + 1.0) * (active + 1.0) / self.weight(i) as f64
        };
        if cost(a) <= cost(b) {
            a
        } else {
            b
        }
    }

    fn draw_weighted(&self, candidates: &[usize]) -> usize {
        self.by_ticket(candidates, random())
    }

    /// Weighted rendezvous hashing on the key: the same client (or header
    /// value) keeps its backend, and a backend leaving moves only its own.
    fn rendezvous(&self, candidates: &[usize], key: u64) -> usize {
        let score = |i: usize| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut hasher);
            self.backends[i].id.hash(&mut hasher);
            // Map the hash to (0, 1] and weight it: -w / ln(u) is largest for the winner.
            let unit = ((hasher.finish() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            -(self.weight(i) as f64) / unit.ln()
        };
        candidates
            .iter()
            .copied()
            .max_by(|&a, &b| score(a).total_cmp(&score(b)))
            .expect("candidates is not empty")
    }

    /// Records a failed connect to backend `index`; returns true if it was ejected.
    pub fn record_failure(&self, index: usize) -> bool {
        let stats = &self.backends[index].stats;
        let Some(length) = stats.record_failure(&self.outlier) else {
            return false;
        };
        let now = now_nanos();
        let ejected = self.backends.iter().filter(|b| b.stats.is_ejected(now)).count();
        let cap = (self.backends.len() * self.outlier.max_ejected_percent as usize) / 100;
        if ejected >= cap {
            return false;
        }
        stats.eject(length);
        true
    }
}

/// The consistent-hashing key of anything hashable (a client address, a
/// header's value).
pub fn hash_key(value: &(impl Hash + ?Sized)) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// A fast per-thread xorshift generator; balancing needs spread, not secrecy.
pub fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let seed = now_nanos() ^ (std::process::id() as u64).rotate_left(32);
            let local = 0u8;
            seed ^ (&local as *const u8 as u64) | 1
        });
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn backend(id: &str, weight: u32, zone: Option<&str>, state: InstanceState) -> Backend {
        Backend {
            id: id.into(),
            host: "127.0.0.1".into(),
            port: 1,
            addr: None,
            congestion: None,
            weight,
            zone: zone.map(Into::into),
            tags: Box::new([]),
            node: None,
            mesh: None,
            state,
            stats: Arc::new(BackendStats::default()),
        }
    }

    /// A set of up backends without zones, by (id, weight).
    fn up_set(policy: Balance, backends: &[(&str, u32)]) -> BackendSet {
        let list = backends
            .iter()
            .map(|(id, w)| backend(id, *w, None, InstanceState::Up))
            .collect();
        BackendSet::new(list, policy, Outlier::default(), None)
    }

    fn counts(set: &BackendSet, picks: usize) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for n in 0..picks {
            let client = IpAddr::from([10, 0, (n / 256) as u8, (n % 256) as u8]);
            let i = set.pick(client, &[]).unwrap();
            *counts.entry(set.backends()[i].id.to_string()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn round_robin_follows_weights_exactly() {
        let set = up_set(Balance::RoundRobin, &[("a", 1), ("b", 3)]);
        let counts = counts(&set, 400);
        assert_eq!((counts["a"], counts["b"]), (100, 300));
    }

    #[test]
    fn draining_maintenance_and_zero_weight_get_nothing() {
        let set = BackendSet::new(
            vec![
                backend("up", 1, None, InstanceState::Up),
                backend("drain", 1, None, InstanceState::Draining),
                backend("maint", 1, None, InstanceState::Maintenance),
                backend("zero", 0, None, InstanceState::Up),
            ],
            Balance::RoundRobin,
            Outlier::default(),
            None,
        );
        assert_eq!(counts(&set, 50)["up"], 50);
        let none = BackendSet::new(vec![], Balance::RoundRobin, Outlier::default(), None);
        assert_eq!(none.pick(IpAddr::from([1, 1, 1, 1]), &[]), Err(NoBackend::NoneUp));
    }

    #[test]
    fn zone_preference_until_the_zone_has_nothing_up() {
        let mut backends = vec![
            backend("near", 1, Some("z1"), InstanceState::Up),
            backend("far", 1, Some("z2"), InstanceState::Up),
        ];
        let set = BackendSet::new(
            backends.clone(),
            Balance::RoundRobin,
            Outlier::default(),
            Some("z1".into()),
        );
        assert_eq!(counts(&set, 20)["near"], 20);
        backends[0].state = InstanceState::Maintenance;
        let set = BackendSet::new(
            backends,
            Balance::RoundRobin,
            Outlier::default(),
            Some("z1".into()),
        );
        assert_eq!(counts(&set, 20)["far"], 20);
    }

    #[test]
    fn least_connections_prefers_the_idle_backend() {
        let set = up_set(Balance::LeastConnections, &[("busy", 1), ("idle", 1)]);
        set.backends()[0].stats.active.store(5, Ordering::Relaxed);
        assert_eq!(counts(&set, 20)["idle"], 20);
    }

    #[test]
    fn peak_ewma_sends_more_to_the_faster_backend() {
        let set = up_set(Balance::PeakEwma, &[("slow", 1), ("fast", 1)]);
        set.backends()[0].stats.record_success(Duration::from_millis(20));
        set.backends()[1].stats.record_success(Duration::from_millis(1));
        let counts = counts(&set, 1000);
        assert!(counts["fast"] > 700, "{counts:?}");
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_only_the_leavers_clients() {
        let ids = ["a", "b", "c", "d"];
        let all: Vec<_> = ids
            .iter()
            .map(|id| backend(id, 1, None, InstanceState::Up))
            .collect();
        let set = BackendSet::new(all.clone(), Balance::ConsistentHash, Outlier::default(), None);
        let without_d = BackendSet::new(
            all[..3].to_vec(),
            Balance::ConsistentHash,
            Outlier::default(),
            None,
        );
        let mut spread = HashMap::new();
        for n in 0..2000u32 {
            let client = IpAddr::from(n.to_be_bytes());
            let before = &set.backends()[set.pick(client, &[]).unwrap()].id;
            assert_eq!(
                before,
                &set.backends()[set.pick(client, &[]).unwrap()].id,
                "sticky"
            );
            let after = &without_d.backends()[without_d.pick(client, &[]).unwrap()].id;
            if &**before != "d" {
                assert_eq!(before, after, "a client of a remaining backend moved");
            }
            *spread.entry(before.clone()).or_insert(0) += 1;
        }
        assert!(spread.values().all(|&n| n > 350), "{spread:?}");
    }

    #[test]
    fn failures_eject_with_growing_length_but_never_past_the_cap() {
        let outlier = Outlier {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 50,
        };
        let set = BackendSet::new(
            vec![
                backend("a", 1, None, InstanceState::Up),
                backend("b", 1, None, InstanceState::Up),
            ],
            Balance::RoundRobin,
            outlier,
            None,
        );
        assert!(!set.record_failure(0));
        assert!(set.record_failure(0));
        assert_eq!(
            counts(&set, 10)["b"],
            10,
            "an ejected backend gets no connections"
        );
        // The cap (50% of 2 = 1) keeps b in service however it fails.
        assert!(!set.record_failure(1));
        assert!(!set.record_failure(1));
        assert!(!set.backends()[1].stats.is_ejected(now_nanos()));
        // A second ejection in a row is twice as long.
        let stats = &set.backends()[0].stats;
        assert_eq!(stats.record_failure(&outlier), None);
        assert_eq!(stats.record_failure(&outlier), Some(Duration::from_secs(20)));
    }

    #[test]
    fn when_every_backend_is_ejected_they_are_still_tried_local_zone_first() {
        let outlier = Outlier {
            consecutive_failures: 1,
            max_ejected_percent: 100,
            ..Outlier::default()
        };
        let set = BackendSet::new(
            vec![
                backend("far", 1, Some("z2"), InstanceState::Up),
                backend("near", 1, Some("z1"), InstanceState::Up),
            ],
            Balance::RoundRobin,
            outlier,
            Some("z1".into()),
        );
        assert!(set.record_failure(0) && set.record_failure(1));
        assert_eq!(counts(&set, 10)["near"], 10);
    }

    #[test]
    fn retries_skip_backends_already_tried() {
        let set = up_set(Balance::RoundRobin, &[("a", 1), ("b", 1)]);
        let first = set.pick(IpAddr::from([1, 1, 1, 1]), &[]).unwrap();
        let second = set.pick(IpAddr::from([1, 1, 1, 1]), &[first]).unwrap();
        assert_ne!(first, second);
        assert_eq!(
            set.pick(IpAddr::from([1, 1, 1, 1]), &[first, second]),
            Err(NoBackend::Exhausted)
        );
    }
}
