//! Two-phase drain, in the manner of ztunnel's `drain.rs`: first a signal
//! (stop taking new work, finish what is open), then, at a deadline, force
//! (close whatever is still open).
//!
//! Listeners stop accepting at the signal; an L4 connection has nothing to
//! say at the signal and runs on until it ends or is forced; an HTTP server
//! answers the signal with GOAWAY or `Connection: close`, and upstream pools
//! stop handing out connections. Each of them holds a [`Watch`]; the drain is
//! over when every watch has been dropped.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Where a drain stands.
const RUNNING: u8 = 0;
/// Stop taking new work; finish what is open.
const DRAINING: u8 = 1;
/// The deadline passed: close now.
const FORCED: u8 = 2;

/// What a trigger and its watches share: a phase, how many watches are
/// held, and a wake-up for both directions. About a hundred bytes: every
/// service has one (a tokio watch channel was four times that).
#[derive(Debug)]
struct Shared {
    phase: AtomicU8,
    watches: AtomicUsize,
    changed: Notify,
}

/// Starts a drain; held by whoever owns the work (a service, the proxy).
#[derive(Debug)]
pub struct Trigger {
    shared: Arc<Shared>,
}

/// Held by each piece of work for as long as it runs.
#[derive(Debug)]
pub struct Watch {
    shared: Arc<Shared>,
}

impl Clone for Watch {
    fn clone(&self) -> Self {
        self.shared.watches.fetch_add(1, Ordering::AcqRel);
        Watch {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.shared.watches.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.changed.notify_waiters();
        }
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything finished before the deadline.
    Finished,
    /// This many were still open at the deadline and were forced to close.
    Forced(usize),
}

/// A trigger and the first watch of a new drain.
pub fn channel() -> (Trigger, Watch) {
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(RUNNING),
        watches: AtomicUsize::new(1),
        changed: Notify::new(),
    });
    (
        Trigger {
            shared: shared.clone(),
        },
        Watch { shared },
    )
}

impl Shared {
    /// Waits until `done` holds, re-checked at every change.
    async fn wait_until(&self, done: impl Fn(&Shared) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so no change between the two is missed.
            changed.as_mut().enable();
            if done(self) {
                return;
            }
            changed.await;
        }
    }

    fn enter(&self, phase: u8) -> bool {
        let moved = self.phase.fetch_max(phase, Ordering::AcqRel) < phase;
        if moved {
            self.changed.notify_waiters();
        }
        moved
    }
}

impl Trigger {
    /// Phase one: every watch's [`Watch::signaled`] resolves. Idempotent.
    pub fn signal(&self) {
        self.shared.enter(DRAINING);
    }

    /// Watches still held (work still open).
    pub fn open(&self) -> usize {
        self.shared.watches.load(Ordering::Acquire)
    }

    /// Signals, waits up to `deadline` for every watch to be dropped, then
    /// forces the rest and waits for them to go.
    pub async fn drain(self, deadline: Duration) -> Outcome {
        self.signal();
        let closed = |shared: &Shared| shared.watches.load(Ordering::Acquire) == 0;
        if tokio::time::timeout(deadline, self.shared.wait_until(closed))
            .await
            .is_ok()
        {
            return Outcome::Finished;
        }
        let open = self.open();
        self.shared.enter(FORCED);
        self.shared.wait_until(closed).await;
        Outcome::Forced(open)
    }
}

impl Watch {
    /// Resolves once the drain has started (at once if it already has).
    pub async fn signaled(&mut self) {
        self.shared
            .wait_until(|shared| shared.phase.load(Ordering::Acquire) >= DRAINING)
            .await;
    }

    /// Resolves once the deadline has forced the drain.
    pub async fn forced(&mut self) {
        self.shared
            .wait_until(|shared| shared.phase.load(Ordering::Acquire) == FORCED)
            .await;
    }

    /// Whether the drain has started.
    pub fn is_signaled(&self) -> bool {
        self.shared.phase.load(Ordering::Acquire) >= DRAINING
    }

    /// A look at the drain's phase that does not hold the work open (for
    /// code that cannot borrow the watch while it waits on it).
    pub fn probe(&self) -> Probe {
        Probe {
            shared: self.shared.clone(),
        }
    }
}

/// Whether a drain has started, without being a [`Watch`].
#[derive(Debug, Clone)]
pub struct Probe {
    shared: Arc<Shared>,
}

impl Probe {
    /// Whether the drain has started.
    pub fn is_signaled(&self) -> bool {
        self.shared.phase.load(Ordering::Acquire) >= DRAINING
    }

    /// Resolves once the drain has started, as [`Watch::signaled`].
    pub async fn signaled(&self) {
        self.shared
            .wait_until(|shared| shared.phase.load(Ordering::Acquire) >= DRAINING)
            .await;
    }

    /// Resolves once the deadline has forced the drain, as [`Watch::forced`].
    pub async fn forced(&self) {
        self.shared
            .wait_until(|shared| shared.phase.load(Ordering::Acquire) == FORCED)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_with_nothing_open_finishes_at_once() {
        let (trigger, watch) = channel();
        drop(watch);
        assert_eq!(trigger.drain(Duration::from_secs(3600)).await, Outcome::Finished);
    }

    #[tokio::test]
    async fn work_sees_the_signal_and_the_drain_waits_for_it() {
        let (trigger, mut watch) = channel();
        let work = tokio::spawn(async move {
            watch.signaled().await;
            // Finishing up after the signal; the drain waits for this.
            tokio::task::yield_now().await;
            assert!(watch.is_signaled());
        });
        assert_eq!(trigger.drain(Duration::from_secs(3600)).await, Outcome::Finished);
        work.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn work_still_open_at_the_deadline_is_forced() {
        let (trigger, watch) = channel();
        let mut stubborn = watch.clone();
        let mut polite = watch;
        let closes_on_signal = tokio::spawn(async move { polite.signaled().await });
        let waits_for_force = tokio::spawn(async move { stubborn.forced().await });
        assert_eq!(trigger.open(), 2);
        assert_eq!(trigger.drain(Duration::from_secs(30)).await, Outcome::Forced(1));
        closes_on_signal.await.unwrap();
        waits_for_force.await.unwrap();
    }

    #[tokio::test]
    async fn a_signal_is_seen_by_watches_cloned_after_it() {
        let (trigger, watch) = channel();
        trigger.signal();
        trigger.signal();
        let mut late = watch.clone();
        late.signaled().await;
        assert!(late.is_signaled());
    }
}
