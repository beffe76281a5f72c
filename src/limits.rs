//! The file-descriptor budget, split by purpose, so that no one kind of
//! connection can starve the others.
//!
//! Every open connection costs descriptors, and a process that runs out of
//! them fails everywhere at once: the proxy stops accepting, the store's
//! reconnects fail, the admin API goes dark. So each purpose that accepts
//! connections from outside (the admin API, the proxy's listeners) holds a
//! [`ConnectionBudget`]: a connection is served only with a slot of its
//! purpose's budget, and while none is free that listener stops accepting,
//! leaving new connections in the kernel's backlog, where they cost no
//! descriptor (HAProxy's `maxconn`, nginx's `worker_connections`). Hitting
//! a limit is counted in `loopmesh_connection_budget_exhausted_total`.
//!
//! The budgets are sized from `RLIMIT_NOFILE`, which [`raise_open_files`]
//! first lifts to its hard limit, as nginx and the Go runtime do: the soft
//! default of 1024 is a relic of `select(2)`.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections the admin API serves at once: scrapes and probes are short;
/// a slow client holds a slot only until its header read times out.
pub const ADMIN_CONNECTIONS: usize = 64;

/// Descriptors per proxied connection: the client's and the upstream's
/// sockets (a pipe for splicing bulk data is optional: without one the
/// proxy copies).
const FDS_PER_PROXY_CONNECTION: u64 = 2;

/// Share of the open-file limit the proxy's connections may use, in
/// eighths: the rest is for listeners (one per service and worker), the
/// admin API, DNS, the store, rendered files and splice pipes.
const PROXY_SHARE_EIGHTHS: u64 = 6;

/// Raises the soft open-file limit to the hard one and returns the soft
/// limit in force afterwards (the old one if raising it was refused).
pub fn raise_open_files() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    limit.rlim_cur
}

/// Proxied connections open at once by default under an open-file limit of
/// `open_files`: three quarters of the descriptors, two per connection.
pub fn default_proxy_connections(open_files: u64) -> u32 {
    let connections = open_files.saturating_mul(PROXY_SHARE_EIGHTHS) / 8 / FDS_PER_PROXY_CONNECTION;
    connections.clamp(1, u64::from(u32::MAX)) as u32
}

/// The connections one purpose may hold open at once.
#[derive(Debug, Clone)]
pub struct ConnectionBudget {
    purpose: &'static str,
    slots: Arc<Semaphore>,
    exhausted: metrics::Counter,
}

impl ConnectionBudget {
    /// A budget of `capacity` connections for `purpose` (a metric label:
    /// `admin`, `proxy`), published as `loopmesh_connection_budget`.
    pub fn new(purpose: &'static str, capacity: usize) -> Self {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        metrics::gauge!("loopmesh_connection_budget", "purpose" => purpose).set(capacity as f64);
        ConnectionBudget {
            purpose,
            slots: Arc::new(Semaphore::new(capacity)),
            exhausted: metrics::counter!("loopmesh_connection_budget_exhausted_total", "purpose" => purpose),
        }
    }

    /// A slot for one accepted connection, held until the connection ends.
    /// With none free, this waits for one, and the caller, which stops
    /// accepting meanwhile, leaves the next connections in the backlog.
    /// Each wait is counted, and logged at debug.
    pub async fn admit(&self) -> OwnedSemaphorePermit {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return slot;
        }
        self.exhausted.increment(1);
        tracing::debug!(
            "{}: every connection slot is taken; new connections wait in the backlog",
            self.purpose
        );
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the budget's semaphore is never closed")
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_gets_three_quarters_of_the_descriptors_two_per_connection() {
        assert_eq!(default_proxy_connections(1024), 384);
        assert_eq!(default_proxy_connections(1_048_576), 393_216);
        assert_eq!(default_proxy_connections(0), 1);
    }

    #[test]
    fn raising_leaves_the_soft_limit_at_the_hard_one() {
        let soft = raise_open_files();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit with a valid pointer.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        assert_eq!(soft, limit.rlim_cur);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }

    #[tokio::test]
    async fn a_full_budget_waits_until_a_slot_is_given_back() {
        let budget = ConnectionBudget::new("test", 2);
        let first = budget.admit().await;
        let _second = budget.admit().await;
        assert_eq!(budget.available(), 0);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.admit().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no slot is free");
        drop(first);
        let third = waiting.await.unwrap();
        assert_eq!(budget.available(), 0);
        drop(third);
        assert_eq!(budget.available(), 1);
    }
}
