//! Keeping the listeners in line with the routing table.
//!
//! Two halves: [`plan`] is a pure function from what runs and what is
//! wanted to the steps between them (bind, swap, stop), tested as a table;
//! [`ProxyManager`] applies the steps. A change to one service costs that
//! service, not the table: [`ProxyManager::update`] takes only the routes
//! that changed.

use super::drain;
use super::l4::sockmap::KernelForwarding;
use super::listener::{bind, Acceptor, Listening};
use super::service::{CompileContext, RouteSource, ServiceShared, ServiceState, StateCell};
use super::tls::Credentials;
use super::tunnel::Mesh;
use super::view::{ProxyView, ServiceView};
use super::workers::Workers;
use super::{Error, ProxySettings};
use crate::limits::ConnectionBudget;
use crate::routing::{Route, RouteFile, RouteHead};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use tokio::task::JoinHandle;

/// What the plan compares of a route: where it listens, and a digest of
/// the rest (the proxy keeps no copy of the routes it serves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteKey {
    pub addr: SocketAddr,
    pub digest: u64,
}

impl RouteKey {
    /// The key of a route held in memory: a digest of its serialized form.
    pub fn of(route: &Route) -> RouteKey {
        RouteKey {
            addr: listen_addr(route),
            digest: crate::routing::digest(&serde_json::to_string(route).unwrap_or_default()),
        }
    }

    /// The key of a route read from `file`: the digest of its text.
    pub fn of_file(head: &RouteHead, file: &RouteFile) -> RouteKey {
        RouteKey {
            addr: SocketAddr::from((head.address, head.port())),
            digest: file.digest,
        }
    }
}

/// Route keys by service name.
pub type Table = BTreeMap<String, RouteKey>;

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
pub fn step(running: Option<&RouteKey>, wanted: Option<&RouteKey>) -> Option<Step> {
    match (running, wanted) {
        (None, None) => None,
        (None, Some(_)) => Some(Step::Bind),
        (Some(_), None) => Some(Step::Stop),
        (Some(old), Some(new)) if old.addr != new.addr => Some(Step::Move),
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
        .filter_map(|name| Some((name.to_string(), step(running.get(name), wanted.get(name))?)))
        .collect()
}

/// The address a route listens on.
pub fn listen_addr(route: &Route) -> SocketAddr {
    SocketAddr::from((route.address, route.port()))
}

/// A route as it comes in: its head, its key, and where its backends are.
type Incoming = (RouteHead, RouteKey, RouteSource);

/// A service the table wants: its key, and its state ready to serve.
struct Wanted {
    key: RouteKey,
    state: Arc<ServiceState>,
}

/// A listening service.
struct Running {
    key: RouteKey,
    state: Arc<StateCell>,
    /// Its listening descriptors (one per worker) and the worker whose
    /// acceptor holds each, while they accept.
    listeners: Vec<(usize, RawFd)>,
    drain: drain::Trigger,
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
    kernel: Option<Arc<KernelForwarding>>,
    /// What compiling a service's backends needs, shared by all.
    context: Arc<CompileContext>,
    /// One per worker: accepts on every listener of that worker.
    acceptors: Vec<Acceptor>,
    running: HashMap<String, Running>,
    /// Every route applied, listening or not.
    wanted: BTreeMap<String, Wanted>,
    /// What the admin API shows, kept per service as it changes.
    view: ProxyView,
    /// Which service each wanted address belongs to.
    addresses: HashMap<SocketAddr, String>,
    /// Wanted services that could not listen, with why.
    failed: BTreeMap<String, String>,
    /// Listeners handed over by a predecessor, used instead of binding.
    inherited: HashMap<SocketAddr, Vec<std::net::TcpListener>>,
    /// The mesh's inbound listener and credential watch, when configured.
    mesh: Option<MeshRunning>,
    /// The inbound listener handed over by a predecessor, used instead of binding.
    inherited_inbound: Option<TcpListener>,
}

/// The mesh's moving parts: the inbound listener (draining with the rest
/// at shutdown) and the watch that reloads the credentials.
struct MeshRunning {
    inbound: Option<(SocketAddr, drain::Trigger)>,
    /// The inbound listener's descriptor, for a successor.
    inbound_fd: Option<RawFd>,
    _watchers: Vec<notify::RecommendedWatcher>,
}

impl MeshRunning {
    /// Binds the inbound listener (or takes the one a predecessor handed
    /// over) and starts watching the credential files.
    fn start(
        mesh: &Arc<Mesh>,
        listen: Option<SocketAddr>,
        inherited: Option<TcpListener>,
        context: &Arc<CompileContext>,
    ) -> Result<MeshRunning, Error> {
        let mut inbound_fd = None;
        let inbound = match listen {
            Some(addr) => {
                // The predecessor's socket, so no peer finds the port closed
                // or loses a connection waiting in its backlog; else a new
                // one, shared (SO_REUSEPORT) so that it can also start
                // beside an agent that does not hand this socket over.
                let inherited = inherited.filter(|listener| listener.local_addr().is_ok_and(|at| at == addr));
                let listener = match inherited {
                    Some(listener) => Ok(listener),
                    None => bind(addr, None, true),
                }
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|source| Error::Bind { addr, source })?;
                inbound_fd = Some(listener.as_raw_fd());
                let (trigger, watch) = drain::channel();
                tokio::spawn(super::inbound::serve(
                    listener,
                    mesh.credentials.clone(),
                    context.clone(),
                    watch,
                ));
                tracing::info!(
                    "mesh: inbound listener on {addr} as {}",
                    mesh.credentials.current().identity
                );
                Some((addr, trigger))
            }
            None => None,
        };
        let watchers = watch_credentials(mesh.credentials.clone());
        Ok(MeshRunning {
            inbound,
            inbound_fd,
            _watchers: watchers,
        })
    }
}

/// Reloads the credentials when their files change (a rotation writes
/// them anew); a bad set keeps the previous one, said once per change.
fn watch_credentials(credentials: Arc<Credentials>) -> Vec<notify::RecommendedWatcher> {
    let files = credentials.files().clone();
    let (wake, mut woken) = tokio::sync::mpsc::unbounded_channel();
    let mut dirs: Vec<&std::path::Path> = [&files.cert, &files.key, &files.bundle]
        .iter()
        .filter_map(|path| path.parent())
        .map(|dir| {
            if dir.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                dir
            }
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    let watchers = dirs
        .into_iter()
        .filter_map(|dir| {
            crate::store::file::watch_changes(dir, notify::RecursiveMode::NonRecursive, wake.clone())
                .map_err(|err| {
                    tracing::warn!("mesh: cannot watch {} for new credentials: {err}", dir.display())
                })
                .ok()
        })
        .collect();
    record_expiry(&credentials.current());
    tokio::spawn(async move {
        while woken.recv().await.is_some() {
            // A rotation writes several files: let it finish.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            while woken.try_recv().is_ok() {}
            let before = credentials.current();
            match credentials.reload() {
                Ok(now) if now.expires != before.expires || now.identity != before.identity => {
                    tracing::info!(
                        "mesh: new credentials for {} loaded; open tunnels keep theirs",
                        now.identity
                    );
                    record_expiry(&now);
                }
                Ok(_) => {}
                Err(err) => tracing::error!("mesh: {err}; kept the previous credentials"),
            }
        }
    });
    watchers
}

fn record_expiry(loaded: &crate::proxy::tls::Loaded) {
    let expires = loaded
        .expires
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    metrics::gauge!("loopmesh_mesh_cert_expiry_timestamp_seconds").set(expires.as_secs_f64());
}

impl ProxyManager {
    /// Starts the proxy's event loops; no service listens yet.
    pub fn new(settings: ProxySettings) -> Result<Self, Error> {
        let workers = Workers::start(settings.workers)?;
        let kernel = settings
            .kernel_forwarding
            .then(|| kernel_forwarding(settings.kernel_connections, settings.kernel_forwarding_max_open))
            .flatten();
        // Slots for open connections, shared by every listener.
        let budget = ConnectionBudget::new("proxy", settings.max_open_connections as usize);
        let context = Arc::new(CompileContext::new(
            settings.node_zone.clone(),
            settings.loopback_congestion.clone(),
            kernel.clone(),
            settings.access_log_to.clone(),
            settings.access_log_all,
            settings.mesh.clone(),
        ));
        let acceptors = (0..workers.count())
            .map(|index| {
                let _on_worker = workers.enter(index);
                Acceptor::spawn(budget.clone()).map_err(|source| Error::Worker { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ProxyManager {
            settings,
            workers,
            kernel,
            context,
            acceptors,
            mesh: None,
            running: HashMap::new(),
            wanted: BTreeMap::new(),
            view: ProxyView::default(),
            addresses: HashMap::new(),
            failed: BTreeMap::new(),
            inherited: HashMap::new(),
            inherited_inbound: None,
        })
    }

    /// Starts the mesh's inbound listener and the watch of its credential
    /// files (apart from [`ProxyManager::new`], so that `loopmesh check`
    /// reads the credentials without binding anything).
    pub fn start_mesh(&mut self) -> Result<(), Error> {
        let Some(mesh) = self.settings.mesh.clone() else {
            return Ok(());
        };
        if self.mesh.is_none() {
            let _on_worker = self.workers.enter(0);
            self.mesh = Some(MeshRunning::start(
                &mesh,
                self.settings.mesh_listen,
                self.inherited_inbound.take(),
                &self.context,
            )?);
        }
        Ok(())
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

    /// Takes a predecessor's mesh inbound listener, for [`ProxyManager::start_mesh`].
    pub fn adopt_mesh_inbound(&mut self, fd: Option<OwnedFd>) {
        self.inherited_inbound = fd
            .map(std::net::TcpListener::from)
            .filter(|listener| listener.set_nonblocking(true).is_ok());
    }

    /// The mesh inbound listener's descriptor, for a successor.
    pub fn mesh_inbound_fd(&self) -> Option<RawFd> {
        self.mesh.as_ref().and_then(|mesh| mesh.inbound_fd)
    }

    /// Every listening descriptor, by address, for a successor.
    pub fn listener_fds(&self) -> Vec<(SocketAddr, RawFd)> {
        self.running
            .values()
            .flat_map(|running| {
                let addr = running.key.addr;
                running.listeners.iter().map(move |(_, fd)| (addr, *fd))
            })
            .collect()
    }

    /// Stops accepting on every listener (they are closed in this process
    /// when this returns; a successor holding them accepts on), leaving
    /// open connections to finish: the first half of a handover or a stop.
    pub async fn stop_accepting(&mut self) {
        if let Some((_, inbound)) = self.mesh.as_ref().and_then(|mesh| mesh.inbound.as_ref()) {
            inbound.signal();
        }
        for running in self.running.values() {
            running.drain.signal();
        }
        for running in self.running.values_mut() {
            for (worker, fd) in std::mem::take(&mut running.listeners) {
                self.acceptors[worker].remove(fd).await;
            }
        }
    }

    /// The mesh's identity, inbound address and certificate end, when on.
    pub fn mesh_status(&self) -> Option<super::tunnel::MeshStatus> {
        Some(super::tunnel::MeshStatus {
            mesh: self.context.mesh.clone()?,
            listen: self.settings.mesh_listen,
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

    /// Services that failed to listen, with why.
    pub fn failed(&self) -> &BTreeMap<String, String> {
        &self.failed
    }

    /// How many services listen now.
    pub fn listening_count(&self) -> usize {
        self.running.len()
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
        let state = running.state.current();
        let now = super::balance::now_nanos();
        state
            .with_backends(|set| {
                set.backends()
                    .iter()
                    .map(|b| {
                        (
                            b.id.to_string(),
                            b.stats.is_ejected(now),
                            b.stats.active.load(std::sync::atomic::Ordering::Relaxed),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Services whose backends are compiled (they had a connection).
    pub fn compiled(&self) -> usize {
        self.running
            .values()
            .filter(|running| running.state.current().is_compiled())
            .count()
    }

    /// A live view of every wanted service, for the admin API: cheap to
    /// take (it is kept up to date per change), read when rendered.
    pub fn view(&self) -> ProxyView {
        self.view.clone()
    }

    /// Makes the listeners match `table`, a whole routing table already
    /// validated as one, held in memory (tests). Costs the size of the table.
    pub async fn apply(&mut self, table: &BTreeMap<String, Route>) -> ApplyReport {
        let routes = table
            .iter()
            .map(|(name, route)| {
                let incoming = (
                    route.head(),
                    RouteKey::of(route),
                    RouteSource::Memory(Arc::new(route.clone())),
                );
                (name.clone(), incoming)
            })
            .collect();
        self.apply_sources(routes).await
    }

    /// [`ProxyManager::apply`] for routes read from their files, which the
    /// proxy reads back when it compiles a service rather than keeping them.
    pub async fn apply_files(&mut self, table: BTreeMap<String, (Route, RouteFile)>) -> ApplyReport {
        let routes = table
            .into_iter()
            .map(|(name, (route, file))| {
                let head = route.head();
                let key = RouteKey::of_file(&head, &file);
                (name, (head, key, RouteSource::File(file.path)))
            })
            .collect();
        self.apply_sources(routes).await
    }

    async fn apply_sources(&mut self, table: BTreeMap<String, Incoming>) -> ApplyReport {
        let mut changes: BTreeMap<String, Option<Incoming>> =
            self.wanted.keys().map(|name| (name.clone(), None)).collect();
        changes.extend(table.into_iter().map(|(name, change)| (name, Some(change))));
        self.update_sources(changes).await
    }

    /// Applies the routes of the services that changed (`None`: removed),
    /// each given by its head and its file, which is read back when the
    /// service needs its backends. Costs the size of the change. A route
    /// whose address another service holds is refused, naming both, and
    /// its service keeps what it had.
    pub async fn update(&mut self, changes: BTreeMap<String, Option<(RouteHead, RouteFile)>>) -> ApplyReport {
        let changes = changes
            .into_iter()
            .map(|(name, change)| {
                let incoming = change.map(|(head, file)| {
                    let key = RouteKey::of_file(&head, &file);
                    (head, key, RouteSource::File(file.path))
                });
                (name, incoming)
            })
            .collect();
        self.update_sources(changes).await
    }

    async fn update_sources(&mut self, changes: BTreeMap<String, Option<Incoming>>) -> ApplyReport {
        let mut report = ApplyReport::default();
        // Removals first, so an address freed in this change can be taken
        // in the same change.
        let (removals, puts): (Vec<_>, Vec<_>) =
            changes.into_iter().partition(|(_, change)| change.is_none());
        let mut scope = Vec::new();
        for (name, _) in removals {
            if let Some(old) = self.wanted.remove(&name) {
                self.addresses.remove(&old.key.addr);
            }
            scope.push(name);
        }
        for (name, change) in puts {
            let Some((head, key, source)) = change else {
                continue;
            };
            match self.addresses.get(&key.addr) {
                Some(holder) if *holder != name => {
                    let reason = format!(
                        "{} is {holder}'s address; {name} keeps its previous route",
                        key.addr
                    );
                    tracing::error!("route of service {name} refused: {reason}");
                    metrics::counter!("loopmesh_proxy_route_refusals_total").increment(1);
                    report.refused.insert(name, reason);
                    continue;
                }
                _ => {}
            }
            if self.wanted.get(&name).is_some_and(|wanted| wanted.key == key) {
                // Unchanged; tried again if it could not listen.
                if !self.running.contains_key(&name) {
                    scope.push(name);
                }
                continue;
            }
            let state = self.prepare(&name, &head, source);
            if let Some(old) = self.wanted.insert(name.clone(), Wanted { key, state }) {
                self.addresses.remove(&old.key.addr);
            }
            self.addresses.insert(key.addr, name.clone());
            scope.push(name);
        }
        self.failed.retain(|name, _| self.wanted.contains_key(name));
        self.execute(&scope, &mut report).await;
        report
    }

    /// The state a new route of `name` serves with: sharing the service's
    /// counters if it runs, and compiled at once if its current one is (a
    /// service in use stays warm; an idle one compiles at first use).
    fn prepare(&self, name: &str, head: &RouteHead, source: RouteSource) -> Arc<ServiceState> {
        let running = self.running.get(name).map(|running| running.state.current());
        // A service that cannot listen keeps its counters too (its bind failures).
        let shared = running
            .as_ref()
            .map(|state| state.shared.clone())
            .or_else(|| self.wanted.get(name).map(|wanted| wanted.state.shared.clone()))
            .unwrap_or_else(|| Arc::new(ServiceShared::new(name)));
        let state = ServiceState::new(head, source, shared, self.context.clone());
        if let Some(previous) = running.filter(|state| state.is_compiled()) {
            state.compile_now(&previous);
        }
        Arc::new(state)
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
            .filter_map(|name| Some((name.clone(), self.running.get(name)?.key)))
            .collect();
        let wanted: Table = scope
            .iter()
            .filter_map(|name| Some((name.clone(), self.wanted.get(name)?.key)))
            .collect();
        let steps = plan(&running, &wanted, None);
        // Stops first: a moved service's old listener, or a removed one,
        // frees its address before anything binds.
        for (name, step) in &steps {
            if matches!(step, Step::Stop | Step::Move) {
                if let Some(running) = self.running.remove(name) {
                    self.context.directory.remove(name);
                    // The drain goes on in the background; the listener is closed now.
                    drop(self.stop(name, running).await);
                }
                if *step == Step::Stop {
                    report.removed.push(name.clone());
                }
            }
        }
        for (name, step) in steps {
            let Some((key, state)) = self.wanted.get(&name).map(|w| (w.key, w.state.clone())) else {
                continue;
            };
            match step {
                Step::Swap => {
                    let Some(running) = self.running.get_mut(&name) else {
                        continue;
                    };
                    running.state.replace(state);
                    running.key = key;
                    report.updated.push(name);
                }
                Step::Bind | Step::Move => self.bind(&name, key, state, report),
                Step::Stop => {}
            }
        }
        for name in scope {
            self.refresh_view(name);
        }
        metrics::gauge!("loopmesh_proxy_listeners").set(self.running.len() as f64);
        metrics::gauge!("loopmesh_proxy_listeners_failed").set(self.failed.len() as f64);
        report.failed = self.failed.clone();
    }

    /// Brings the admin view of `name` in line with what it is now.
    fn refresh_view(&self, name: &str) {
        let entry = self.wanted.get(name).map(|wanted| ServiceView {
            address: wanted.key.addr,
            protocol: wanted.state.spec.protocol,
            shared: wanted.state.shared.clone(),
            error: self.failed.get(name).cloned(),
            state: self.running.get(name).map(|running| running.state.clone()),
        });
        self.view.set(name, entry);
    }

    /// Starts a service's listeners, or records why it cannot.
    fn bind(&mut self, name: &str, key: RouteKey, state: Arc<ServiceState>, report: &mut ApplyReport) {
        let shared = state.shared.clone();
        match self.start(key, state) {
            Ok(running) => {
                self.context.directory.insert(name, running.state.clone());
                self.running.insert(name.to_string(), running);
                if self.failed.remove(name).is_some() {
                    tracing::info!("service {name} now listens on {}", key.addr);
                }
                report.added.push(name.to_string());
            }
            Err(err) => {
                let reason = err.to_string();
                if self.failed.get(name) != Some(&reason) {
                    tracing::error!("service {name} not served: {reason}; the other services are unaffected");
                }
                shared.metrics().bind_failures.increment(1);
                self.failed.insert(name.to_string(), reason);
            }
        }
    }

    fn start(&mut self, key: RouteKey, state: Arc<ServiceState>) -> Result<Running, Error> {
        let listeners = self.listeners_for(key.addr)?;
        let cell = StateCell::new(state);
        let (trigger, watch) = drain::channel();
        let listeners = listeners
            .into_iter()
            .map(|(worker, listener)| {
                let fd = listener.as_raw_fd();
                let listening = Listening {
                    state: cell.clone(),
                    drain: watch.clone(),
                };
                self.acceptors[worker].add(listener, listening);
                (worker, fd)
            })
            .collect();
        Ok(Running {
            key,
            state: cell,
            listeners,
            drain: trigger,
        })
    }

    /// The listeners of `addr`, each with the worker to run it on: one per
    /// worker. Inherited ones come first; every inherited one is used, even
    /// past the worker count (with SO_REUSEPORT the kernel spreads
    /// connections over all of them, so one nobody accepts on would strand
    /// its share). A failure drops (closes) the ones already bound.
    fn listeners_for(&mut self, addr: SocketAddr) -> Result<Vec<(usize, TcpListener)>, Error> {
        let count = self.workers.count();
        let inherited = self.inherited.remove(&addr).unwrap_or_default();
        let adopted = inherited.len();
        let mut listeners: Vec<(usize, TcpListener)> = inherited
            .into_iter()
            .enumerate()
            .map(|(index, listener)| (index % count, listener))
            .collect();
        for index in adopted..count {
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
        for (worker, fd) in running.listeners {
            self.acceptors[worker].remove(fd).await;
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
        let inbound = self.mesh.as_mut().and_then(|mesh| mesh.inbound.take());
        let deadline = self.settings.drain_timeout;
        let inbound_drain =
            inbound.map(|(_, trigger)| tokio::spawn(async move { trigger.drain(deadline).await }));
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
        if let Some(drained) = inbound_drain {
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

    fn key(service: &str, address: [u8; 4], port: u16, backends: &[&str]) -> RouteKey {
        let backends = backends
            .iter()
            .map(|id| format!("\"{id}\": {{\"host\": \"10.0.0.1\", \"port\": 80}}"))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            "{{\"service\": \"{service}\", \"address\": \"{}\", \"spec\": {{\"port\": {port}}}, \"backends\": {{{backends}}}}}",
            std::net::Ipv4Addr::from(address)
        );
        RouteKey::of(&Route::parse(&text).unwrap())
    }

    #[test]
    fn one_step_per_case() {
        let a = key("a", [127, 100, 0, 1], 80, &["x"]);
        let a_more = key("a", [127, 100, 0, 1], 80, &["x", "y"]);
        let a_port = key("a", [127, 100, 0, 1], 81, &["x"]);
        let a_addr = key("a", [127, 100, 0, 2], 80, &["x"]);
        assert_eq!(
            key("a", [127, 100, 0, 1], 80, &["x"]),
            a,
            "the same route, the same key"
        );
        let cases: [(Option<&RouteKey>, Option<&RouteKey>, Option<Step>); 7] = [
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
        let a = key("a", [127, 100, 0, 1], 80, &["x"]);
        let b = key("b", [127, 100, 0, 2], 80, &["x"]);
        let b2 = key("b", [127, 100, 0, 2], 80, &["y"]);
        let c = key("c", [127, 100, 0, 3], 80, &["x"]);
        let running: Table = [("a".to_string(), a), ("b".to_string(), b)].into();
        let wanted: Table = [("b".to_string(), b2), ("c".to_string(), c)].into();
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
