//! The in-process proxy: one listener per service on its loopback address.
//!
//! The layout, bottom up:
//! - [`drain`]: the two-phase drain (signal, then force at a deadline) that
//!   listeners and connections watch.
//! - [`balance`]: backend sets, policies, outlier ejection, fed by the
//!   outcome of every connection.
//! - [`tls`]: the node's mesh credentials and identities, allow lists.
//! - [`tunnel`]: outbound through the mesh: CONNECT streams in pooled mTLS
//!   connections per peer node (one, more past a stream limit; closed idle).
//! - [`connect`]: dial a backend with a timeout, directly or through a
//!   tunnel, trying others on failure.
//! - [`l4`]: the TCP relay and its plaintext fast paths (splice, kernel
//!   forwarding), which only TCP services take.
//! - [`service`]: a service's state, compiled from its route.
//! - [`http`]: L7 for `protocol: http` services: per-request routing,
//!   balancing, pooled upstream connections, retries, access log; the
//!   common HTTP/1.1 request on a fast path of its own, HTTP/2 clients on
//!   the proxy's own HTTP/2 server, the rest on hyper.
//! - [`listener`]: bind, accept, dispatch on the service's protocol.
//! - [`inbound`]: the mesh's listener, where other nodes' tunnels arrive.
//! - [`manager`]: the pure [`plan`] from running to wanted, and
//!   [`ProxyManager`], which applies it per change.
//! - [`view`] and [`scrape`]: what the admin API shows of it (`/routes`,
//!   and the per-service and per-backend series of `/metrics`).
//!
//! Connections run on the proxy's own event loops ([`workers`]), each
//! service listening once per loop.

pub mod balance;
pub mod congestion;
mod connect;
pub mod drain;
pub mod http;
pub mod inbound;
pub mod l4;
mod listener;
pub mod manager;
mod scrape;
mod service;
pub mod tls;
pub mod tunnel;
mod view;
pub mod workers;

pub use manager::{plan, step, ApplyReport, ProxyManager, Step, Table};
pub use view::ProxyView;

use std::ffi::CString;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// What the proxy cannot do, as its callers see it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start proxy worker {index}: {source}")]
    Worker { index: usize, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("mesh: {0}; fix the files named in the config's mesh: section")]
    Credentials(#[from] tls::CredentialsError),
}

/// Settings of the proxy as a whole.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// How long a removed listener's connections may take to finish.
    pub drain_timeout: Duration,
    /// The node's zone, for zone preference.
    pub node_zone: Option<String>,
    /// Congestion control for legs to this host ([`congestion`]); `None`
    /// leaves sockets at the system default.
    pub loopback_congestion: Option<Arc<CString>>,
    /// Event loops to run connections on.
    pub workers: usize,
    /// Forward long-lived TCP connections inside the kernel ([`l4::sockmap`]).
    pub kernel_forwarding: bool,
    /// Connections forwarded in the kernel at once; more are copied in user
    /// space ([`DEFAULT_KERNEL_CONNECTIONS`] unless a test needs fewer).
    pub kernel_connections: u32,
    /// Connections are handed to the kernel only while the proxy has at most
    /// this many open ([`l4::sockmap::KernelForwarding::busy`]).
    pub kernel_forwarding_max_open: u32,
    /// Connections open at once across every service (the proxy's share of
    /// the descriptors, [`crate::limits`]); past it listeners stop
    /// accepting until one ends.
    pub max_open_connections: u32,
    /// Where HTTP access log lines go (stderr unless a file is named).
    pub access_log_to: http::access_log::Destination,
    /// Every HTTP service writes the access log, not only those whose
    /// `http.access_log` says so.
    pub access_log_all: bool,
    /// mTLS between nodes: credentials and tunnels (none: every backend is
    /// dialed directly).
    pub mesh: Option<Arc<tunnel::Mesh>>,
    /// The mesh's inbound listener address (with `mesh`).
    pub mesh_listen: Option<SocketAddr>,
}

/// Connections forwarded in the kernel at once by default.
pub const DEFAULT_KERNEL_CONNECTIONS: u32 = crate::config::KERNEL_CONNECTIONS;

impl Default for ProxySettings {
    /// The agent's defaults: one event loop, user-space copy, a 30 s drain,
    /// the connection budget of the process's open-file limit.
    fn default() -> Self {
        ProxySettings {
            drain_timeout: Duration::from_secs(30),
            node_zone: None,
            loopback_congestion: None,
            workers: 1,
            kernel_forwarding: false,
            kernel_connections: DEFAULT_KERNEL_CONNECTIONS,
            kernel_forwarding_max_open: crate::config::DEFAULT_KERNEL_FORWARDING_MAX_OPEN,
            max_open_connections: crate::limits::default_proxy_connections(crate::limits::raise_open_files()),
            access_log_to: http::access_log::Destination::Stderr,
            access_log_all: false,
            mesh: None,
            mesh_listen: None,
        }
    }
}

/// One connection counted in a counter while it lives: added when made,
/// taken off when dropped.
pub struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    /// Counts one more in `counter`; gives the guard and the new count.
    pub fn count(counter: &'a AtomicU64) -> (Held<'a>, u64) {
        let now = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        (Held(counter), now)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
