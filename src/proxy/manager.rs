//! Keeping the listeners in line with the routing table.
//!
//! Two halves: [`plan`] is a pure function from what runs and what is
//! wanted to the steps between them (bind, swap, stop), tested as a table;
//! [`ProxyManager`] applies the steps. A change to one service costs that
//! service, not the table: [`ProxyManager::update`] takes only the routes
//! that changed.

use super::balance::BackendStats;
use super::drain;
use super::l4::sockmap::KernelForwarding;
use super::listener::{accept_loop, bind};
use super::service::{ServiceShared, ServiceState};
use super::view::{ProxyView, ServiceView};
use super::workers::Workers;
use super::{Error, ProxySettings};
use crate::catalog::Protocol;
use crate::limits::ConnectionBudget;
use crate::routing::Route;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Routes by service name.
pub type Table = BTreeMap<String, Arc<Route>>;

/// What one service needs, comparing what runs with what is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Not listening, wanted: bind its address.
    Bind,
    /// Listening on the address it keeps, with a new route: swap the state
    /// new connections read; open connections keep theirs.
    Swap,
    /// Listening, no longer wanted: stop accepting and drain.
    Stop,
    /// Listening elsewhere than wanted: stop (and drain) the old listener,
    /// bind the new address.
    Move,
}

/// The step for one service; `None` when nothing changes.
pub fn step(running: Option<&Route>, wanted: Option<&Route>) -> Option<Step> {
    match (running, wanted) {
        (None, None) => None,
        (None, Some(_)) => Some(Step::Bind),
        (Some(_), None) => Some(Step::Stop),
        (Some(old), Some(new)) if listen_addr(old) != listen_addr(new) => Some(Step::Move),
        (Some(old), Some(new)) if old != new => Some(Step::Swap),
        (Some(_), Some(_)) => None,
    }
}

/// The steps from `running` to `wanted` for the services named in `scope`
/// (every service of both when `scope` is `None`), by service name.
pub fn plan(
    running: &Table,
    wanted: &Table,
    scope: Option<&mut dyn Iterator<Item = &str>>,
) -> BTreeMap<String, Step> {
    let names: BTreeSet<&str> = match scope {
        Some(names) => names.collect(),
        None => running.keys().chain(wanted.keys()).map(String::as_str).collect(),
    };
    names
        .into_iter()
        .filter_map(|name| {
            let step = step(
                running.get(name).map(Arc::as_ref),
                wanted.get(name).map(Arc::as_ref),
            )?;
            Some((name.to_string(), step))
        })
        .collect()
}

/// The address a route listens on.
pub fn listen_addr(route: &Route) -> SocketAddr {
    SocketAddr::from((route.address, route.port()))
}

/// A listening service.
struct Running {
    route: Arc<Route>,
    state: watch::Sender<Arc<ServiceState>>,
    /// One per worker; each ends when the drain is signaled, closing its
    /// listener.
    accept: Vec<JoinHandle<()>>,
    drain: drain::Trigger,
    shared: Arc<ServiceShared>,
    /// Backend counters by id, kept across this service's reloads.
    stats: HashMap<String, Arc<BackendStats>>,
    /// The listening descriptors while the accept loops hold them, for a
    /// successor to take over.
    fds: Vec<RawFd>,
}

/// What one apply changed.
#[derive(Debug, Default, PartialEq)]
pub struct ApplyReport {
    pub added: Vec<String>,
    pub updated: Vec<String>,
    pub removed: Vec<String>,
    /// Services that could not listen, with why.
    pub failed: BTreeMap<String, String>,
    /// Changes refused (the service keeps its previous route), with why.
    pub refused: BTreeMap<String, String>,
}

impl ApplyReport {
    /// Whether anything started, changed or stopped.
    pub fn changed_anything(&self) -> bool {
        !(self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty())
    }
}

/// Owns the listeners and swaps their state as the routing table changes.
pub struct ProxyManager {
    settings: ProxySettings,
    workers: Workers,
    /// Slots for open connections, shared by every listener.
    budget: ConnectionBudget,
    kernel: Option<Arc<KernelForwarding>>,
    running: HashMap<String, Running>,
    /// The table wanted: every route applied, listening or not.
    wanted: Table,
    /// Which service each wanted address belongs to.
    addresses: HashMap<SocketAddr, String>,
    /// Wanted services that could not listen, with why.
    failed: BTreeMap<String, String>,
    /// HTTP services relayed as TCP, said once each.
    http_as_tcp: BTreeSet<String>,
    /// Listeners handed over by a predecessor, used instead of binding.
    inherited: HashMap<SocketAddr, Vec<std::net::TcpListener>>,
}

impl ProxyManager {
    /// Starts the proxy's event loops; no service listens yet.
    pub fn new(settings: ProxySettings) -> Result<Self, Error> {
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
            wanted: Table::new(),
            addresses: HashMap::new(),
            failed: BTreeMap::new(),
            http_as_tcp: BTreeSet::new(),
            inherited: HashMap::new(),
        })
    }

    /// Takes a predecessor's listeners: a service bound on one of their
    /// addresses accepts on them rather than binding anew, so no connection
    /// finds its port closed during a restart.
    pub fn adopt(&mut self, listeners: HashMap<SocketAddr, Vec<OwnedFd>>) {
        for (addr, fds) in listeners {
            let listeners = fds
                .into_iter()
                .map(std::net::TcpListener::from)
                .filter(|listener| listener.set_nonblocking(true).is_ok());
            self.inherited.entry(addr).or_default().extend(listeners);
        }
    }

    /// Closes inherited listeners no wanted service took (a service the
    /// predecessor served and this table lacks); says how many.
    pub fn close_unused_inherited(&mut self) {
        let unused: Vec<SocketAddr> = self.inherited.keys().copied().collect();
        if !unused.is_empty() {
            tracing::info!(
                "takeover: {} inherited listener address(es) not in the routing table closed: {}",
                unused.len(),
                unused
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        self.inherited.clear();
    }

    /// Every listening descriptor, by address, for a successor.
    pub fn listener_fds(&self) -> Vec<(SocketAddr, RawFd)> {
        self.running
            .values()
            .flat_map(|running| {
                let addr = listen_addr(&running.route);
                running.fds.iter().map(move |fd| (addr, *fd))
            })
            .collect()
    }

    /// Stops accepting on every listener (they are closed in this process
    /// when this returns; a successor holding them accepts on), leaving
    /// open connections to finish: the first half of a handover or a stop.
    pub async fn stop_accepting(&mut self) {
        for running in self.running.values() {
            running.drain.signal();
        }
        for running in self.running.values_mut() {
            running.fds.clear();
            for accept in std::mem::take(&mut running.accept) {
                let _ = accept.await;
            }
        }
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

    /// Services that failed to listen, with why.
    pub fn failed(&self) -> &BTreeMap<String, String> {
        &self.failed
    }

    /// Services listening now, by name.
    pub fn listening(&self) -> Vec<String> {
        let mut names: Vec<String> = self.running.keys().cloned().collect();
        names.sort();
        names
    }

    /// Each backend of a service: id, whether ejected now, open connections.
    pub fn backend_status(&self, service: &str) -> Vec<(String, bool, u64)> {
        let Some(running) = self.running.get(service) else {
            return Vec::new();
        };
        let state = running.state.borrow().clone();
        let now = super::balance::now_nanos();
        state
            .backends
            .backends()
            .iter()
            .map(|b| {
                (
                    b.id.clone(),
                    b.stats.is_ejected(now),
                    b.stats.active.load(std::sync::atomic::Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// A live view of every wanted service, for the admin API: its counters
    /// are read when the view is rendered.
    pub fn view(&self) -> ProxyView {
        let services = self
            .wanted
            .iter()
            .map(|(name, route)| ServiceView {
                route: route.clone(),
                error: self.failed.get(name).cloned(),
                state: self.running.get(name).map(|running| running.state.subscribe()),
            })
            .collect();
        ProxyView::new(services)
    }

    /// Makes the listeners match `table`, a whole routing table already
    /// validated as one (start, static mode). Costs the size of the table.
    pub async fn apply(&mut self, table: &BTreeMap<String, Route>) -> ApplyReport {
        let mut changes: BTreeMap<String, Option<Route>> =
            self.wanted.keys().map(|name| (name.clone(), None)).collect();
        changes.extend(
            table
                .iter()
                .map(|(name, route)| (name.clone(), Some(route.clone()))),
        );
        self.update(changes).await
    }

    /// Applies the routes of the services that changed (`None`: removed).
    /// Costs the size of the change. A route whose address another service
    /// holds is refused, naming both, and its service keeps what it had.
    pub async fn update(&mut self, changes: BTreeMap<String, Option<Route>>) -> ApplyReport {
        let mut report = ApplyReport::default();
        // Removals first, so an address freed in this change can be taken
        // in the same change.
        let (removals, puts): (Vec<_>, Vec<_>) = changes.into_iter().partition(|(_, route)| route.is_none());
        let mut scope = Vec::new();
        for (name, _) in removals {
            if let Some(old) = self.wanted.remove(&name) {
                self.addresses.remove(&listen_addr(&old));
            }
            scope.push(name);
        }
        for (name, route) in puts {
            let Some(route) = route else { continue };
            let addr = listen_addr(&route);
            match self.addresses.get(&addr) {
                Some(holder) if *holder != name => {
                    let reason = format!("{addr} is {holder}'s address; {name} keeps its previous route");
                    tracing::error!("route of service {name} refused: {reason}");
                    metrics::counter!("loopmesh_proxy_route_refusals_total").increment(1);
                    report.refused.insert(name, reason);
                    continue;
                }
                _ => {}
            }
            if let Some(old) = self.wanted.insert(name.clone(), Arc::new(route)) {
                self.addresses.remove(&listen_addr(&old));
            }
            self.addresses.insert(addr, name.clone());
            scope.push(name);
        }
        self.failed.retain(|name, _| self.wanted.contains_key(name));
        self.execute(&scope, &mut report).await;
        report
    }

    /// Tries again to bind the services that failed to (a port freed since
    /// then comes up without a change).
    pub async fn retry_failed(&mut self) -> ApplyReport {
        let mut report = ApplyReport::default();
        let scope: Vec<String> = self.failed.keys().cloned().collect();
        self.execute(&scope, &mut report).await;
        report
    }

    /// Plans and applies the steps for the services in `scope`.
    async fn execute(&mut self, scope: &[String], report: &mut ApplyReport) {
        let running: Table = scope
            .iter()
            .filter_map(|name| Some((name.clone(), self.running.get(name)?.route.clone())))
            .collect();
        let wanted: Table = scope
            .iter()
            .filter_map(|name| Some((name.clone(), self.wanted.get(name)?.clone())))
            .collect();
        let steps = plan(&running, &wanted, None);
        // Stops first: a moved service's old listener, or a removed one,
        // frees its address before anything binds.
        for (name, step) in &steps {
            if matches!(step, Step::Stop | Step::Move) {
                if let Some(running) = self.running.remove(name) {
                    // The drain goes on in the background; the listener is closed now.
                    drop(self.stop(name, running).await);
                }
                if *step == Step::Stop {
                    self.http_as_tcp.remove(name);
                    report.removed.push(name.clone());
                }
            }
        }
        for (name, step) in steps {
            let route = wanted.get(&name).cloned();
            match (step, route) {
                (Step::Swap, Some(route)) => {
                    self.say_if_http_as_tcp(&route);
                    let Some(running) = self.running.get_mut(&name) else {
                        continue;
                    };
                    let state = ServiceState::compile(
                        route.clone(),
                        &self.settings,
                        &self.kernel,
                        &mut running.stats,
                        running.shared.clone(),
                    );
                    running.state.send_replace(Arc::new(state));
                    running.route = route;
                    report.updated.push(name);
                }
                (Step::Bind | Step::Move, Some(route)) => self.bind(&name, route, report),
                _ => {}
            }
        }
        metrics::gauge!("loopmesh_proxy_listeners").set(self.running.len() as f64);
        metrics::gauge!("loopmesh_proxy_listeners_failed").set(self.failed.len() as f64);
        report.failed = self.failed.clone();
    }

    /// Starts a service's listeners, or records why it cannot.
    fn bind(&mut self, name: &str, route: Arc<Route>, report: &mut ApplyReport) {
        self.say_if_http_as_tcp(&route);
        match self.start(route.clone()) {
            Ok(running) => {
                self.running.insert(name.to_string(), running);
                if self.failed.remove(name).is_some() {
                    tracing::info!("service {name} now listens on {}", listen_addr(&route));
                }
                report.added.push(name.to_string());
            }
            Err(err) => {
                let reason = err.to_string();
                if self.failed.get(name) != Some(&reason) {
                    tracing::error!("service {name} not served: {reason}; the other services are unaffected");
                }
                metrics::counter!("loopmesh_proxy_bind_failures_total", "service" => name.to_string())
                    .increment(1);
                self.failed.insert(name.to_string(), reason);
            }
        }
    }

    /// Until the HTTP proxy lands, an HTTP service is relayed as TCP: said
    /// once per service (log and gauge), never silently.
    fn say_if_http_as_tcp(&mut self, route: &Route) {
        let name = &route.service;
        if route.spec.protocol == Protocol::Http {
            if self.http_as_tcp.insert(name.clone()) {
                tracing::warn!(
                    "service {name}: protocol http is served as TCP for now (connections are relayed unchanged, without per-request balancing)"
                );
            }
        } else {
            self.http_as_tcp.remove(name);
        }
        metrics::gauge!("loopmesh_proxy_http_served_as_tcp").set(self.http_as_tcp.len() as f64);
    }

    fn start(&mut self, route: Arc<Route>) -> Result<Running, Error> {
        let addr = listen_addr(&route);
        let count = self.workers.count();
        let listeners = self.listeners_for(addr)?;
        let fds = listeners
            .iter()
            .map(|(_, listener)| listener.as_raw_fd())
            .collect();
        let shared = Arc::new(ServiceShared::new(&route.service));
        let mut stats = HashMap::new();
        let state = ServiceState::compile(
            route.clone(),
            &self.settings,
            &self.kernel,
            &mut stats,
            shared.clone(),
        );
        let (state_tx, state_rx) = watch::channel(Arc::new(state));
        let (trigger, watch) = drain::channel();
        let accept = listeners
            .into_iter()
            .map(|(worker, listener)| {
                let task = accept_loop(listener, state_rx.clone(), watch.clone(), self.budget.clone());
                self.workers.spawn(worker % count, task)
            })
            .collect();
        Ok(Running {
            route,
            state: state_tx,
            accept,
            drain: trigger,
            shared,
            stats,
            fds,
        })
    }

    /// The listeners of `addr`, each with the worker to run it on: one per
    /// worker, each registered with that worker's loop. Inherited ones come
    /// first; every inherited one is used, even past the worker count (with
    /// SO_REUSEPORT the kernel spreads connections over all of them, so one
    /// nobody accepts on would strand its share). A failure drops (closes)
    /// the ones already bound.
    fn listeners_for(&mut self, addr: SocketAddr) -> Result<Vec<(usize, TcpListener)>, Error> {
        let count = self.workers.count();
        let inherited = self.inherited.remove(&addr).unwrap_or_default();
        let adopted = inherited.len();
        let mut listeners = Vec::with_capacity(count.max(adopted));
        for (index, listener) in inherited.into_iter().enumerate() {
            let _on_worker = self.workers.enter(index % count);
            let listener = TcpListener::from_std(listener).map_err(|source| Error::Bind { addr, source })?;
            listeners.push((index, listener));
        }
        for index in adopted..count {
            let _on_worker = self.workers.enter(index);
            match bind(addr, self.settings.loopback_congestion.as_deref(), count > 1) {
                Ok(listener) => listeners.push((index, listener)),
                // The predecessor's listener lacks SO_REUSEPORT (it ran one
                // loop): the inherited ones serve alone.
                Err(_) if adopted > 0 => break,
                Err(source) => return Err(Error::Bind { addr, source }),
            }
        }
        Ok(listeners)
    }

    /// Stops accepting now (the listeners are closed when this returns),
    /// then lets open connections finish in the background, forcing what
    /// remains at the drain deadline.
    async fn stop(&self, name: &str, running: Running) -> JoinHandle<()> {
        running.drain.signal();
        for accept in running.accept {
            let _ = accept.await;
        }
        let name = name.to_string();
        let deadline = self.settings.drain_timeout;
        let trigger = running.drain;
        tokio::spawn(async move {
            if let drain::Outcome::Forced(open) = trigger.drain(deadline).await {
                tracing::warn!("service {name}: {open} connection(s) still open after the {deadline:?} drain; closed them");
            }
        })
    }

    /// Stops every listener and waits for their connections to drain, all
    /// at once, so shutdown takes one drain deadline at most.
    pub async fn shutdown(&mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for running in self.running.values() {
            running.drain.signal();
        }
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

/// Sets up forwarding in the kernel, or says in one line why the proxy
/// copies in user space instead.
fn kernel_forwarding(capacity: u32, max_open: u32) -> Option<Arc<KernelForwarding>> {
    let kernel = KernelForwarding::new(capacity, max_open);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn route(service: &str, address: [u8; 4], port: u16, backends: &[&str]) -> Arc<Route> {
        let backends = backends
            .iter()
            .map(|id| format!("\"{id}\": {{\"host\": \"10.0.0.1\", \"port\": 80}}"))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            "{{\"service\": \"{service}\", \"address\": \"{}\", \"spec\": {{\"port\": {port}}}, \"backends\": {{{backends}}}}}",
            std::net::Ipv4Addr::from(address)
        );
        Arc::new(Route::parse(&text).unwrap())
    }

    #[test]
    fn one_step_per_case() {
        let a = route("a", [127, 100, 0, 1], 80, &["x"]);
        let a_more = route("a", [127, 100, 0, 1], 80, &["x", "y"]);
        let a_port = route("a", [127, 100, 0, 1], 81, &["x"]);
        let a_addr = route("a", [127, 100, 0, 2], 80, &["x"]);
        let cases: [(Option<&Route>, Option<&Route>, Option<Step>); 7] = [
            (None, None, None),
            (None, Some(&a), Some(Step::Bind)),
            (Some(&a), None, Some(Step::Stop)),
            (Some(&a), Some(&a), None),
            (Some(&a), Some(&a_more), Some(Step::Swap)),
            (Some(&a), Some(&a_port), Some(Step::Move)),
            (Some(&a), Some(&a_addr), Some(Step::Move)),
        ];
        for (running, wanted, expected) in cases {
            assert_eq!(step(running, wanted), expected, "{running:?} -> {wanted:?}");
        }
    }

    #[test]
    fn a_plan_covers_both_tables_or_only_the_scope() {
        let table = |routes: &[&Arc<Route>]| -> Table {
            routes
                .iter()
                .map(|r| (r.service.clone(), Arc::clone(r)))
                .collect()
        };
        let a = route("a", [127, 100, 0, 1], 80, &["x"]);
        let b = route("b", [127, 100, 0, 2], 80, &["x"]);
        let b2 = route("b", [127, 100, 0, 2], 80, &["y"]);
        let c = route("c", [127, 100, 0, 3], 80, &["x"]);
        let running = table(&[&a, &b]);
        let wanted = table(&[&b2, &c]);
        let expected: BTreeMap<String, Step> = [
            ("a".to_string(), Step::Stop),
            ("b".to_string(), Step::Swap),
            ("c".to_string(), Step::Bind),
        ]
        .into();
        assert_eq!(plan(&running, &wanted, None), expected);
        // Only the named services are looked at: a change costs its size.
        let only_c = plan(&running, &wanted, Some(&mut ["c"].into_iter()));
        assert_eq!(only_c, [("c".to_string(), Step::Bind)].into());
        assert!(plan(&running, &running, None).is_empty());
    }
}
