//! The in-process L4 proxy: one listener per service on its loopback address.
//!
//! [`ProxyManager::apply`] takes a validated routing table and changes only
//! what differs: a new service gets a listener; a removed (or moved) one
//! stops accepting at once and its open connections drain, killed only at
//! the drain deadline; a changed one gets a new backend set swapped in
//! through a watch channel, which established connections never look at
//! again. A service whose address cannot be bound fails alone, loudly, and
//! is retried on the next apply.
//!
//! Connections run on the proxy's own event loops ([`workers`]), each
//! service listening once per loop.

pub mod balancer;
pub mod congestion;
pub mod sockmap;
pub mod splice;
pub mod tcp;
pub mod workers;

use crate::limits::ConnectionBudget;
use crate::routing::Route;
use balancer::{Backend, BackendSet, BackendStats};
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use workers::{WorkerError, Workers};

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
    /// Forward long-lived connections inside the kernel ([`sockmap`]).
    pub kernel_forwarding: bool,
    /// Connections forwarded in the kernel at once; more are copied in user
    /// space ([`DEFAULT_KERNEL_CONNECTIONS`] unless a test needs fewer).
    pub kernel_connections: u32,
    /// Connections are handed to the kernel only while the proxy has at most
    /// this many open ([`sockmap::KernelForwarding::busy`]).
    pub kernel_forwarding_max_open: u32,
    /// Connections open at once across every service (the proxy's share of
    /// the descriptors, [`crate::limits`]); past it listeners stop
    /// accepting until one ends.
    pub max_open_connections: u32,
}

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
            kernel_forwarding_max_open: DEFAULT_KERNEL_FORWARDING_MAX_OPEN,
            max_open_connections: crate::limits::default_proxy_connections(crate::limits::raise_open_files()),
        }
    }
}

/// Connections open in the proxy up to which new ones are handed to the
/// kernel by default: the concurrency sweep in BENCHMARKS.md, where the
/// kernel stops beating the user-space copy.
pub const DEFAULT_KERNEL_FORWARDING_MAX_OPEN: u32 = 8;

/// Connections forwarded in the kernel at once by default (two socket map
/// entries each; the maps allocate per entry in use).
pub const DEFAULT_KERNEL_CONNECTIONS: u32 = 32 * 1024;

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

/// Counters of one service that outlive reloads.
#[derive(Debug, Default)]
pub struct ServiceShared {
    /// Open connections, for the circuit breaker.
    pub active: AtomicU64,
}

/// A service's metric handles, registered once per reload rather than per
/// connection (label strings and registry lookups cost more than the copy
/// itself for short connections).
#[derive(Debug)]
pub struct ServiceMetrics {
    pub connections: metrics::Counter,
    pub active: metrics::Gauge,
    pub connect_duration: metrics::Histogram,
    pub bytes_to_backend: metrics::Counter,
    pub bytes_to_client: metrics::Counter,
    pub refused_max_connections: metrics::Counter,
    pub refused_no_backend: metrics::Counter,
    pub refused_connect_failed: metrics::Counter,
    pub idle_timeouts: metrics::Counter,
    pub drain_kills: metrics::Counter,
}

impl ServiceMetrics {
    fn new(service: &str) -> Self {
        let s = service.to_string();
        let refused = |reason: &'static str| metrics::counter!("loopmesh_proxy_refused_total", "service" => s.clone(), "reason" => reason);
        ServiceMetrics {
            connections: metrics::counter!("loopmesh_proxy_connections_total", "service" => s.clone()),
            active: metrics::gauge!("loopmesh_proxy_connections_active", "service" => s.clone()),
            connect_duration: metrics::histogram!("loopmesh_proxy_connect_duration_seconds", "service" => s.clone()),
            bytes_to_backend: metrics::counter!("loopmesh_proxy_bytes_total", "service" => s.clone(), "direction" => "to_backend"),
            bytes_to_client: metrics::counter!("loopmesh_proxy_bytes_total", "service" => s.clone(), "direction" => "to_client"),
            refused_max_connections: refused("max_connections"),
            refused_no_backend: refused("no_backend"),
            refused_connect_failed: refused("connect_failed"),
            idle_timeouts: metrics::counter!("loopmesh_proxy_idle_timeouts_total", "service" => s.clone()),
            drain_kills: metrics::counter!("loopmesh_proxy_drain_kills_total", "service" => s),
        }
    }
}

/// Everything a new connection to a service needs; replaced whole on reload.
#[derive(Debug)]
pub struct ServiceState {
    pub metrics: ServiceMetrics,
    pub name: String,
    pub backends: BackendSet,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub retries: u32,
    pub max_connections: Option<u32>,
    pub shared: Arc<ServiceShared>,
    /// Set when connections are forwarded in the kernel.
    pub kernel: Option<Arc<sockmap::KernelForwarding>>,
}

/// A listening service.
struct Running {
    route: Route,
    state: watch::Sender<Arc<ServiceState>>,
    /// One per worker; aborting them closes the listeners.
    accept: Vec<JoinHandle<()>>,
    /// Flipped to true at the drain deadline; dropped receivers mean done.
    kill: watch::Sender<bool>,
    shared: Arc<ServiceShared>,
}

/// What one apply changed.
#[derive(Debug, Default, PartialEq)]
pub struct ApplyReport {
    pub added: Vec<String>,
    pub updated: Vec<String>,
    pub removed: Vec<String>,
    /// Services that could not listen, with why.
    pub failed: BTreeMap<String, String>,
}

/// What the data plane serves, for the admin API (see [`ProxyManager::view`]).
#[derive(Debug, Clone, Default)]
pub struct ProxyView {
    services: Vec<ServiceView>,
}

#[derive(Debug, Clone)]
struct ServiceView {
    service: String,
    address: std::net::Ipv4Addr,
    port: u16,
    error: Option<String>,
    /// The live state while listening.
    state: Option<watch::Receiver<Arc<ServiceState>>>,
}

impl ProxyView {
    /// Services that failed to listen, with why.
    pub fn failed(&self) -> Vec<(String, String)> {
        self.services
            .iter()
            .filter_map(|s| s.error.clone().map(|e| (s.service.clone(), e)))
            .collect()
    }

    /// The routes with their backends' live state, as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let now = balancer::now_nanos();
        let services = self.services.iter().map(|view| {
            let backends: Vec<serde_json::Value> = match &view.state {
                Some(state) => {
                    let state = state.borrow().clone();
                    state
                        .backends
                        .backends()
                        .iter()
                        .map(|b| {
                            serde_json::json!({
                                "id": b.id, "host": b.host, "port": b.port, "weight": b.weight,
                                "zone": b.zone, "state": b.state.as_str(),
                                "ejected": b.stats.is_ejected(now),
                                "active_connections": b.stats.active.load(std::sync::atomic::Ordering::Relaxed),
                            })
                        })
                        .collect()
                }
                None => Vec::new(),
            };
            serde_json::json!({
                "service": view.service,
                "address": view.address.to_string(),
                "port": view.port,
                "listening": view.state.is_some(),
                "error": view.error,
                "backends": backends,
            })
        });
        serde_json::Value::Array(services.collect())
    }
}

/// Owns the listeners and swaps their state as the routing table changes.
pub struct ProxyManager {
    settings: ProxySettings,
    workers: Workers,
    /// Slots for open connections, shared by every listener.
    budget: ConnectionBudget,
    kernel: Option<Arc<sockmap::KernelForwarding>>,
    running: HashMap<String, Running>,
    /// Backend counters by (service, backend id), kept across reloads.
    stats: HashMap<(String, String), Arc<BackendStats>>,
    failed: BTreeMap<String, String>,
    /// The table last applied, to retry failed binds against.
    table: BTreeMap<String, Route>,
}

impl ProxyManager {
    /// Starts the proxy's event loops; no service listens yet.
    pub fn new(settings: ProxySettings) -> Result<Self, WorkerError> {
        let workers = Workers::start(settings.workers)?;
        let kernel = settings
            .kernel_forwarding
            .then(|| kernel_forwarding(settings.kernel_connections, settings.kernel_forwarding_max_open))
            .flatten();
        let budget = ConnectionBudget::new("proxy", settings.max_open_connections as usize);
        Ok(ProxyManager {
            settings,
            workers,
            budget,
            kernel,
            running: HashMap::new(),
            stats: HashMap::new(),
            failed: BTreeMap::new(),
            table: BTreeMap::new(),
        })
    }

    /// Whether connections are forwarded in the kernel (asked for and
    /// available).
    pub fn kernel_forwarding(&self) -> bool {
        self.kernel.is_some()
    }

    /// Connections forwarded in the kernel now.
    pub fn kernel_joined(&self) -> u32 {
        self.kernel.as_ref().map_or(0, |kernel| kernel.joined())
    }

    /// Connections that were ready for the kernel but found the proxy busy.
    pub fn kernel_deferred(&self) -> u64 {
        self.kernel.as_ref().map_or(0, |kernel| kernel.deferred())
    }

    /// How many event loops serve connections.
    pub fn worker_count(&self) -> usize {
        self.workers.count()
    }

    /// Tries again to bind the services that failed to, against the table
    /// last applied (a port freed since then comes up without a reload).
    pub async fn retry_failed(&mut self) -> ApplyReport {
        let table = std::mem::take(&mut self.table);
        let report = self.apply(&table).await;
        self.table = table;
        report
    }

    /// Services that failed to listen, with why.
    pub fn failed(&self) -> &BTreeMap<String, String> {
        &self.failed
    }

    /// Each backend of a service: id, whether ejected now, open connections.
    pub fn backend_status(&self, service: &str) -> Vec<(String, bool, u64)> {
        let Some(running) = self.running.get(service) else {
            return Vec::new();
        };
        let state = running.state.borrow().clone();
        state
            .backends
            .backends()
            .iter()
            .map(|b| {
                let ejected = b.stats.is_ejected(balancer::now_nanos());
                (
                    b.id.clone(),
                    ejected,
                    b.stats.active.load(std::sync::atomic::Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// A live view of every service of the table last applied, for the
    /// admin API: its counters are read when the view is rendered.
    pub fn view(&self) -> ProxyView {
        let services = self
            .table
            .iter()
            .map(|(name, route)| ServiceView {
                service: name.clone(),
                address: route.address,
                port: route.port,
                error: self.failed.get(name).cloned(),
                state: self.running.get(name).map(|running| running.state.subscribe()),
            })
            .collect();
        ProxyView { services }
    }

    /// Services listening now.
    pub fn listening(&self) -> Vec<String> {
        let mut names: Vec<String> = self.running.keys().cloned().collect();
        names.sort();
        names
    }

    /// Makes the listeners match `table` (already validated as a whole).
    pub async fn apply(&mut self, table: &BTreeMap<String, Route>) -> ApplyReport {
        let mut report = ApplyReport::default();
        let moved_or_gone: Vec<String> = self
            .running
            .iter()
            .filter(|(name, running)| {
                table
                    .get(*name)
                    .is_none_or(|route| listen_addr(route) != listen_addr(&running.route))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in moved_or_gone {
            if let Some(running) = self.running.remove(&name) {
                // The drain goes on in the background; the listener is closed now.
                drop(self.stop(&name, running).await);
                if !table.contains_key(&name) {
                    report.removed.push(name);
                }
            }
        }
        self.failed.retain(|name, _| table.contains_key(name));
        self.stats.retain(|(service, _), _| table.contains_key(service));
        for (name, route) in table {
            match self.running.get_mut(name) {
                Some(running) if running.route == *route => {}
                Some(running) => {
                    let state = build_state(
                        route,
                        &self.settings,
                        &self.kernel,
                        &mut self.stats,
                        running.shared.clone(),
                    );
                    running.state.send_replace(Arc::new(state));
                    running.route = route.clone();
                    report.updated.push(name.clone());
                }
                None => match self.start(route).await {
                    Ok(running) => {
                        self.running.insert(name.clone(), running);
                        if self.failed.remove(name).is_some() {
                            tracing::info!("service {name} now listens on {}", listen_addr(route));
                        }
                        report.added.push(name.clone());
                    }
                    Err(reason) => {
                        if self.failed.get(name) != Some(&reason) {
                            tracing::error!(
                                "service {name} not served: {reason}; the other services are unaffected"
                            );
                        }
                        metrics::counter!("loopmesh_proxy_bind_failures_total", "service" => name.clone())
                            .increment(1);
                        self.failed.insert(name.clone(), reason);
                    }
                },
            }
        }
        metrics::gauge!("loopmesh_proxy_listeners").set(self.running.len() as f64);
        metrics::gauge!("loopmesh_proxy_listeners_failed").set(self.failed.len() as f64);
        report.failed = self.failed.clone();
        self.table = table.clone();
        report
    }

    async fn start(&mut self, route: &Route) -> Result<Running, String> {
        let addr = listen_addr(route);
        let count = self.workers.count();
        // One listener per worker, each registered with that worker's loop;
        // a failure drops (closes) the ones already bound.
        let listeners = (0..count)
            .map(|index| {
                let _on_worker = self.workers.enter(index);
                bind(addr, self.settings.loopback_congestion.as_deref(), count > 1)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| format!("cannot listen on {addr}: {err}"))?;
        let shared = Arc::new(ServiceShared::default());
        let state = build_state(
            route,
            &self.settings,
            &self.kernel,
            &mut self.stats,
            shared.clone(),
        );
        let (state_tx, state_rx) = watch::channel(Arc::new(state));
        let (kill_tx, kill_rx) = watch::channel(false);
        let accept = listeners
            .into_iter()
            .enumerate()
            .map(|(index, listener)| {
                let task = accept_loop(
                    route.service.clone(),
                    listener,
                    state_rx.clone(),
                    kill_rx.clone(),
                    self.budget.clone(),
                );
                self.workers.spawn(index, task)
            })
            .collect();
        Ok(Running {
            route: route.clone(),
            state: state_tx,
            accept,
            kill: kill_tx,
            shared,
        })
    }

    /// Stops accepting now (the listener is closed when this returns), then
    /// lets open connections finish, killing what remains at the deadline.
    async fn stop(&self, name: &str, running: Running) -> JoinHandle<()> {
        for accept in &running.accept {
            accept.abort();
        }
        for accept in running.accept {
            let _ = accept.await;
        }
        tokio::spawn(drain(name.to_string(), running.kill, self.settings.drain_timeout))
    }

    /// Stops every listener and waits for their connections to drain, all
    /// at once, so shutdown takes one drain deadline at most (shutdown).
    pub async fn shutdown(&mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        let mut drains = Vec::new();
        for name in names {
            if let Some(running) = self.running.remove(&name) {
                drains.push(self.stop(&name, running).await);
            }
        }
        for drained in drains {
            let _ = drained.await;
        }
    }
}

/// Lets a stopped listener's connections finish, closing what is left at
/// the deadline. Done when every connection holding `kill` has ended.
async fn drain(name: String, kill: watch::Sender<bool>, deadline: Duration) {
    if tokio::time::timeout(deadline, kill.closed()).await.is_err() {
        tracing::warn!(
            "service {name}: {} connection(s) still open after the {deadline:?} drain; closing them",
            kill.receiver_count()
        );
        kill.send_replace(true);
        kill.closed().await;
    }
}

/// The address a route listens on.
pub fn listen_addr(route: &Route) -> SocketAddr {
    SocketAddr::from((route.address, route.port))
}

/// Binds with SO_REUSEADDR so a restart does not wait out TIME_WAIT, and
/// TCP_NODELAY and the loopback congestion control, which accepted sockets
/// inherit on Linux (setsockopts per connection saved): every client is on
/// this host. `shared` sets SO_REUSEPORT, for one listener per worker; the
/// kernel lets only sockets of the same user that all set it share a port,
/// so a port held by anything else still fails the bind.
fn bind(addr: SocketAddr, congestion: Option<&CString>, shared: bool) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    if shared {
        socket.set_reuseport(true)?;
    }
    socket.set_nodelay(true)?;
    if let Some(name) = congestion {
        congestion::apply(socket.as_raw_fd(), name);
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

fn build_state(
    route: &Route,
    settings: &ProxySettings,
    kernel: &Option<Arc<sockmap::KernelForwarding>>,
    stats: &mut HashMap<(String, String), Arc<BackendStats>>,
    shared: Arc<ServiceShared>,
) -> ServiceState {
    let backends = route
        .backends
        .iter()
        .map(|b| {
            let addr = b
                .host
                .parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, b.port));
            // A backend on this host is a loopback address; names are not
            // resolved here and count as remote.
            let on_this_host = addr.is_some_and(|addr| addr.ip().is_loopback());
            Backend {
                id: b.id.clone(),
                host: b.host.clone(),
                port: b.port,
                addr,
                congestion: settings.loopback_congestion.clone().filter(|_| on_this_host),
                weight: b.weight,
                zone: b.zone.clone(),
                state: b.state,
                stats: stats
                    .entry((route.service.clone(), b.id.clone()))
                    .or_default()
                    .clone(),
            }
        })
        .collect();
    ServiceState {
        metrics: ServiceMetrics::new(&route.service),
        name: route.service.clone(),
        backends: BackendSet::new(backends, route.balance, route.outlier, settings.node_zone.clone()),
        connect_timeout: route.connect_timeout,
        idle_timeout: route.idle_timeout,
        retries: route.retries,
        max_connections: route.max_connections,
        shared,
        kernel: kernel.clone(),
    }
}

/// Sets up forwarding in the kernel, or says in one line why the proxy
/// copies in user space instead.
fn kernel_forwarding(capacity: u32, max_open: u32) -> Option<Arc<sockmap::KernelForwarding>> {
    let kernel = sockmap::KernelForwarding::new(capacity, max_open);
    metrics::gauge!("loopmesh_proxy_kernel_forwarding").set(if kernel.is_ok() { 1.0 } else { 0.0 });
    match kernel {
        Ok(kernel) => {
            tracing::info!("proxy.kernel_forwarding: connections are forwarded in the kernel (sockmap)");
            Some(kernel)
        }
        Err(err) => {
            tracing::warn!("proxy.kernel_forwarding: {err}; connections are copied in user space");
            None
        }
    }
}

/// Accepts a service's connections, each served with a slot of the proxy's
/// connection budget. With none free, the loop holds the connection it has
/// just accepted until a slot frees and accepts no more meanwhile: at most
/// one descriptor over budget per listener, the rest waits in the backlog.
async fn accept_loop(
    service: String,
    listener: TcpListener,
    state: watch::Receiver<Arc<ServiceState>>,
    kill: watch::Receiver<bool>,
    budget: ConnectionBudget,
) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let slot = budget.admit().await;
                let current = state.borrow().clone();
                let kill = kill.clone();
                tokio::spawn(async move {
                    tcp::serve(client, peer, current, kill).await;
                    drop(slot);
                });
            }
            Err(err) => {
                // Out of file descriptors and the like: say so, back off briefly.
                tracing::warn!("service {service}: accept failed: {err}");
                metrics::counter!("loopmesh_proxy_accept_errors_total", "service" => service.clone())
                    .increment(1);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
