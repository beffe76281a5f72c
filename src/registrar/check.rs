//! Health checks of one local backend (TCP connect, HTTP GET, a command),
//! run on an interval with jitter, turned into up/down by rise and fall.

use super::config::{Backend, CheckKind, HttpCheck};
use crate::telemetry::{Counter, Histogram};
use http_body_util::{BodyExt, Limited};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// A backend turned healthy or unhealthy.
#[derive(Debug, Clone, PartialEq)]
pub struct Flip {
    pub key: String,
    /// Which checker of `key` sent it: a flip still queued from a checker
    /// that was stopped (its backend removed, maybe added again since)
    /// must not decide for the one running now.
    pub generation: u64,
    pub healthy: bool,
    /// The last check's result, for the log.
    pub detail: String,
}

/// Largest response body read when looking for the expected substring.
const MAX_BODY: usize = 64 * 1024;

/// Runs one check with the backend's timeout; `Err` says why it failed.
pub async fn check_once(backend: &Backend) -> Result<(), String> {
    let timeout = backend.check.timeout;
    let host = backend.instance.host.as_str();
    let port = backend.instance.port;
    let attempt = async {
        match backend.check.kind() {
            CheckKind::Tcp => TcpStream::connect((host, port))
                .await
                .map(drop)
                .map_err(|err| format!("tcp connect to {host}:{port}: {err}")),
            CheckKind::Http(http) => http_check(host, port, &http).await,
            CheckKind::Exec(exec) => exec_check(&exec.command, backend).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no result within the {timeout:?} timeout")),
    }
}

async fn http_check(host: &str, port: u16, http: &HttpCheck) -> Result<(), String> {
    let url = format!("http://{host}:{port}{}", http.path);
    let response = crate::http::get(host, port, &http.path, "loopmesh-registrar")
        .await
        .map_err(|err| format!("GET {url}: {err}"))?;
    let status = response.status().as_u16();
    if status != http.status {
        return Err(format!("GET {url}: status {status}, expected {}", http.status));
    }
    if let Some(expected) = &http.body {
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|err| format!("GET {url}: reading the body: {err}"))?
            .to_bytes();
        if !String::from_utf8_lossy(&body).contains(expected.as_str()) {
            return Err(format!("GET {url}: the body does not contain {expected:?}"));
        }
    }
    Ok(())
}

/// Runs `sh -c command` with the backend in its environment; exit 0 passes.
/// The child is killed if the timeout drops this future.
async fn exec_check(command: &str, backend: &Backend) -> Result<(), String> {
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("LOOPMESH_SERVICE", &backend.service)
        .env("LOOPMESH_INSTANCE", &backend.id)
        .env("LOOPMESH_HOST", &backend.instance.host)
        .env("LOOPMESH_PORT", backend.instance.port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|err| format!("cannot run {command:?}: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} exited with {status}"))
    }
}

/// Rise/fall bookkeeping: a backend changes state only after `rise` passes
/// or `fall` failures in a row.
#[derive(Debug)]
pub struct Health {
    rise: u32,
    fall: u32,
    healthy: bool,
    streak: u32,
}

impl Health {
    /// A backend never checked: down until `rise` passes.
    pub fn new(rise: u32, fall: u32) -> Self {
        Health::starting_at(rise, fall, false)
    }

    /// A backend whose state is already known, when its check settings
    /// change: a healthy one stays registered until `fall` failures, an
    /// unhealthy one stays out until `rise` passes.
    pub fn starting_at(rise: u32, fall: u32, healthy: bool) -> Self {
        Health {
            rise,
            fall,
            healthy,
            streak: 0,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy
    }

    /// Records a result; `Some(healthy)` when the state flips.
    pub fn record(&mut self, passed: bool) -> Option<bool> {
        if passed == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if passed { self.rise } else { self.fall };
        if self.streak >= needed {
            self.healthy = passed;
            self.streak = 0;
            Some(passed)
        } else {
            None
        }
    }
}

/// A small xorshift generator for jitter; seeded per backend so a fleet
/// started at once does not probe in lockstep.
struct Jitter(u64);

impl Jitter {
    fn new(key: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = key.bytes().fold(nanos ^ 0x9e37_79b9_7f4a_7c15, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Jitter(seed | 1)
    }

    /// A fraction in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Whether `new` is checked differently from `old`: another address or
/// other check settings. Instance fields the checks do not use (weight,
/// tags, zone, node) leave the checks as they are.
fn checked_differently(old: &Backend, new: &Backend) -> bool {
    old.check != new.check || old.instance.host != new.instance.host || old.instance.port != new.instance.port
}

/// One instance's check counters, kept by its checker and shown in the
/// registrar's `/metrics` while the instance is configured.
#[derive(Debug, Default)]
pub struct CheckStats {
    pub passed: Counter,
    pub failed: Counter,
    pub duration: Histogram,
}

/// Checks the backend in `backends` until its sender is dropped, sending a
/// [`Flip`] whenever its health changes. The first check runs after a
/// random part of one interval; the rest every interval ±10%.
///
/// An edit of the backend arrives through `backends` rather than as a new
/// checker, so its health is never lost: one the checks do not use is
/// simply seen by the next check; new check settings or a new address
/// restart the schedule (and the rise/fall streak) with the new settings,
/// starting from the health known so far.
pub async fn run(
    mut backends: watch::Receiver<Backend>,
    generation: u64,
    flips: mpsc::UnboundedSender<Flip>,
    stats: Arc<CheckStats>,
) {
    let mut backend = backends.borrow_and_update().clone();
    let key = backend.key();
    let mut jitter = Jitter::new(&key);
    let mut health = Health::new(backend.check.rise, backend.check.fall);
    let mut next_check = Instant::now() + backend.check.interval.mul_f64(jitter.next());
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next_check) => {}
            changed = backends.changed() => {
                if changed.is_err() {
                    return; // no longer configured
                }
                let edited = backends.borrow_and_update().clone();
                if checked_differently(&backend, &edited) {
                    health = Health::starting_at(edited.check.rise, edited.check.fall, health.is_healthy());
                    next_check = Instant::now() + edited.check.interval.mul_f64(jitter.next());
                }
                backend = edited;
                continue;
            }
        }
        let started = Instant::now();
        let result = check_once(&backend).await;
        stats.duration.record(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => stats.passed.increment(1),
            Err(reason) => {
                stats.failed.increment(1);
                tracing::debug!("{key}: check failed: {reason}");
            }
        }
        if let Some(healthy) = health.record(result.is_ok()) {
            let detail = result.err().unwrap_or_else(|| "check passed".into());
            if flips
                .send(Flip {
                    key: key.clone(),
                    generation,
                    healthy,
                    detail,
                })
                .is_err()
            {
                return;
            }
        }
        let next = backend.check.interval.mul_f64(0.9 + 0.2 * jitter.next());
        next_check = (started + next).max(Instant::now() + Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{CheckConfig, ExecCheck};
    use super::*;
    use crate::catalog::{Instance, InstanceState};

    #[test]
    fn rise_and_fall_need_results_in_a_row() {
        let mut health = Health::new(2, 3);
        assert_eq!(health.record(true), None);
        assert_eq!(health.record(false), None, "a failure breaks the rising streak");
        assert_eq!(health.record(true), None);
        assert_eq!(health.record(true), Some(true));
        assert_eq!(health.record(false), None);
        assert_eq!(health.record(false), None);
        assert_eq!(health.record(true), None, "a pass breaks the falling streak");
        assert_eq!(health.record(false), None);
        assert_eq!(health.record(false), None);
        assert_eq!(health.record(false), Some(false));
        assert_eq!(health.record(false), None);
    }

    #[test]
    fn a_known_state_holds_until_fall_or_rise() {
        let mut health = Health::starting_at(2, 3, true);
        assert!(health.is_healthy());
        assert_eq!(health.record(true), None, "already healthy: no flip");
        assert_eq!(health.record(false), None);
        assert_eq!(health.record(false), None);
        assert_eq!(health.record(false), Some(false), "down after fall failures");
        let mut health = Health::starting_at(2, 3, false);
        assert!(!health.is_healthy());
        assert_eq!(health.record(false), None, "already down: no flip");
        assert_eq!(health.record(true), None);
        assert_eq!(health.record(true), Some(true), "up after rise passes");
        assert!(!Health::new(2, 3).is_healthy(), "a new backend starts down");
    }

    fn exec_backend(command: &str, rise: u32, fall: u32) -> Backend {
        Backend {
            service: "web".into(),
            id: "web-1".into(),
            instance: Instance {
                host: "127.0.0.1".into(),
                port: 8080,
                node: None,
                zone: None,
                tags: Vec::new(),
                weight: 1,
                state: InstanceState::Up,
                mesh: None,
            },
            check: CheckConfig {
                exec: Some(ExecCheck {
                    command: command.into(),
                }),
                interval: Duration::from_millis(10),
                rise,
                fall,
                ..Default::default()
            },
        }
    }

    #[tokio::test]
    async fn new_check_settings_keep_the_health_known() {
        let dir = tempfile::tempdir().unwrap();
        let (edits, backends) = watch::channel(exec_backend("true", 1, 1));
        let (flips_tx, mut flips) = mpsc::unbounded_channel();
        let stats = Arc::new(CheckStats::default());
        let checker = tokio::spawn(run(backends, 7, flips_tx, stats.clone()));
        let patience = Duration::from_secs(30);
        let mut next_flip = async move || {
            tokio::time::timeout(patience, flips.recv())
                .await
                .unwrap()
                .unwrap()
        };
        let flip = next_flip().await;
        assert!(flip.healthy);
        assert_eq!((flip.key.as_str(), flip.generation), ("web/web-1", 7));

        // Another command that passes, and leaves a mark once it ran: a
        // checker that forgot the health would flip to healthy again at
        // that first pass (rise 1), before it sees the next edit.
        let marker = dir.path().join("ran");
        let mut edited = exec_backend(&format!("touch {}", marker.display()), 1, 1);
        edited.instance.weight = 5;
        edits.send_replace(edited);
        let ran = async {
            while !marker.exists() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(patience, ran).await.unwrap();
        edits.send_replace(exec_backend("false", 1, 1));
        let flip = next_flip().await;
        assert!(
            !flip.healthy,
            "the next flip is the failure, not a second rise: {flip:?}"
        );

        drop(edits);
        checker.await.unwrap();
        // Counted for /metrics: the first command and the marker passed,
        // the last one failed.
        assert!(stats.passed.get() >= 2 && stats.failed.get() >= 1, "{stats:?}");
        let (buckets, _) = stats.duration.snapshot();
        assert_eq!(
            buckets[buckets.len() - 1],
            stats.passed.get() + stats.failed.get()
        );
    }

    #[test]
    fn jitter_spreads_over_the_interval() {
        let mut jitter = Jitter::new("web/web-1");
        let draws: Vec<f64> = (0..1000).map(|_| jitter.next()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let low = draws.iter().filter(|d| **d < 0.5).count();
        assert!((400..600).contains(&low), "{low} of 1000 below one half");
    }
}
