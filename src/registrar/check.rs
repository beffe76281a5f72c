//! Health checks of one local backend (TCP connect, HTTP GET, a command),
//! run on an interval with jitter, turned into up/down by rise and fall.

use super::config::{Backend, CheckKind, HttpCheck};
use http_body_util::{BodyExt, Limited};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A backend turned healthy or unhealthy.
#[derive(Debug, Clone, PartialEq)]
pub struct Flip {
    pub key: String,
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

/// Rise/fall bookkeeping: a backend starts down and changes state only
/// after `rise` passes or `fall` failures in a row.
#[derive(Debug)]
pub struct Health {
    rise: u32,
    fall: u32,
    healthy: bool,
    streak: u32,
}

impl Health {
    pub fn new(rise: u32, fall: u32) -> Self {
        Health {
            rise,
            fall,
            healthy: false,
            streak: 0,
        }
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

/// Checks `backend` forever, sending a [`Flip`] whenever its health
/// changes. The first check runs after a random part of one interval; the
/// rest every interval ±10%.
pub async fn run(backend: Backend, flips: mpsc::UnboundedSender<Flip>) {
    let key = backend.key();
    let interval = backend.check.interval;
    let mut jitter = Jitter::new(&key);
    let mut health = Health::new(backend.check.rise, backend.check.fall);
    let result_counter = |result: &'static str| metrics::counter!("loopmesh_registrar_checks_total", "service" => backend.service.clone(), "instance" => backend.id.clone(), "result" => result);
    let (passed_total, failed_total) = (result_counter("pass"), result_counter("fail"));
    let duration = metrics::histogram!("loopmesh_registrar_check_duration_seconds", "service" => backend.service.clone(), "instance" => backend.id.clone());
    tokio::time::sleep(interval.mul_f64(jitter.next())).await;
    loop {
        let started = Instant::now();
        let result = check_once(&backend).await;
        duration.record(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => passed_total.increment(1),
            Err(reason) => {
                failed_total.increment(1);
                tracing::debug!("{key}: check failed: {reason}");
            }
        }
        if let Some(healthy) = health.record(result.is_ok()) {
            let detail = result.err().unwrap_or_else(|| "check passed".into());
            if flips
                .send(Flip {
                    key: key.clone(),
                    healthy,
                    detail,
                })
                .is_err()
            {
                return;
            }
        }
        let next = interval.mul_f64(0.9 + 0.2 * jitter.next());
        tokio::time::sleep(
            next.saturating_sub(started.elapsed())
                .max(Duration::from_millis(1)),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn jitter_spreads_over_the_interval() {
        let mut jitter = Jitter::new("web/web-1");
        let draws: Vec<f64> = (0..1000).map(|_| jitter.next()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let low = draws.iter().filter(|d| **d < 0.5).count();
        assert!((400..600).contains(&low), "{low} of 1000 below one half");
    }
}
