//! systemd's notify protocol (`Type=notify`): READY=1 once serving,
//! WATCHDOG=1 pings from the control loop, STOPPING=1 on the way out.
//!
//! A datagram to `$NOTIFY_SOCKET` is the whole protocol, so no library:
//! outside systemd the variable is unset and every call does nothing.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends `state` (e.g. `READY=1`) to systemd, if it is listening.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        // An abstract socket (systemd's default).
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    if let Err(err) = sent {
        tracing::warn!("cannot notify systemd ({path}): {err}");
    }
}

/// Sends READY=1 the first time a daemon is ready, and only then.
#[derive(Debug, Default)]
pub struct ReadyOnce {
    sent: bool,
    held: bool,
}

impl ReadyOnce {
    /// Holds READY=1 back until [`ReadyOnce::release`]: a successor taking
    /// over is not systemd's main process until its predecessor says so,
    /// and systemd ignores anyone else's READY=1.
    pub fn hold(&mut self) {
        self.held = true;
    }

    pub fn release(&mut self) {
        self.held = false;
    }

    /// Tells systemd if `ready` holds for the first time; true when it did.
    pub fn announce(&mut self, ready: bool) -> bool {
        if self.sent || !ready || self.held {
            return false;
        }
        self.sent = true;
        notify("READY=1");
        true
    }
}

/// The watchdog pings of a daemon's control loop: an interval at half of
/// `WatchdogSec` when systemd set one for this process.
pub struct Watchdog(Option<tokio::time::Interval>);

impl Watchdog {
    pub fn new() -> Self {
        Watchdog(watchdog_interval().map(tokio::time::interval))
    }

    /// Waits for the next ping and sends it; never completes without a
    /// watchdog. Awaited from the control loop, so a stuck loop stops pinging.
    pub async fn ping(&mut self) {
        match &mut self.0 {
            Some(interval) => {
                interval.tick().await;
                notify("WATCHDOG=1");
            }
            None => std::future::pending().await,
        }
    }
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog::new()
    }
}

/// How often to ping the watchdog: half of `WatchdogSec`, if it is set for
/// this process.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
