//! A service as the data plane runs it: made from its route once per
//! change, read by every new connection, swapped whole on the next change.
//!
//! The backend set is compiled at the service's first connection, not when
//! its route arrives: a node of a 10k-service fleet talks to a handful of
//! them, and 100k compiled backends would be most of the agent's memory.
//! Until then a service holds its policy and where its route is (the route
//! file, the data plane's truth, read back when needed).

use super::balance::{Backend, BackendSet, BackendStats};
use super::http::access_log::{AccessLog, Destination};
use super::http::route::Routes;
use super::http::RetryBudget;
use super::l4::sockmap::KernelForwarding;
use crate::catalog::ServiceSpec;
use crate::policy::TlsMode;
use crate::routing::{Route, RouteHead};
use crate::telemetry::{Counter, Gauge, Histogram};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::ffi::CString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

/// What outlives a service's reloads while it listens: counters, and its
/// metrics, allocated at its first use (an idle service costs no memory
/// and no series: every node's table lists every service of the fleet).
/// They are rendered at scrape time ([`super::ProxyView::render_metrics`])
/// and leave `/metrics` with the service.
#[derive(Debug)]
pub struct ServiceShared {
    pub name: Arc<str>,
    /// Open connections, for the circuit breaker (and the
    /// `loopmesh_proxy_connections_active` gauge).
    pub active: AtomicU64,
    /// HTTP requests in flight (`http.max_requests`).
    pub requests: AtomicU64,
    /// HTTP requests waiting for an upstream connection (`http.max_pending_requests`).
    pub pending: AtomicU64,
    /// HTTP retries allowed ([`RetryBudget`]); kept across reloads.
    pub retry_budget: RetryBudget,
    metrics: OnceLock<Box<ServiceMetrics>>,
    http_metrics: OnceLock<Box<HttpMetrics>>,
}

impl ServiceShared {
    pub fn new(name: &str) -> Self {
        ServiceShared {
            name: name.into(),
            active: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            retry_budget: RetryBudget::default(),
            metrics: OnceLock::new(),
            http_metrics: OnceLock::new(),
        }
    }

    /// The service's HTTP metrics, allocated on first use.
    pub fn http_metrics(&self) -> &HttpMetrics {
        self.http_metrics.get_or_init(Box::default)
    }

    /// The service's metrics, allocated on first use.
    pub fn metrics(&self) -> &ServiceMetrics {
        self.metrics.get_or_init(Box::default)
    }

    /// The metrics, if the service has been used on this node (a
    /// connection, a failure to bind): rendering must not allocate them.
    pub fn used(&self) -> Option<&ServiceMetrics> {
        self.metrics.get().map(|m| &**m)
    }

    /// The HTTP metrics as they are, zeros if no request came yet.
    pub fn http_metrics_now(&self) -> &HttpMetrics {
        static UNUSED: LazyLock<HttpMetrics> = LazyLock::new(HttpMetrics::default);
        self.http_metrics.get().map_or(&UNUSED, |m| m)
    }
}

/// A service's counters (its open connections are [`ServiceShared::active`]).
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    pub connections: Counter,
    pub connect_duration: Histogram,
    pub bytes_to_backend: Counter,
    pub bytes_to_client: Counter,
    pub refused_max_connections: Counter,
    pub refused_no_backend: Counter,
    pub refused_connect_failed: Counter,
    pub idle_timeouts: Counter,
    pub drain_kills: Counter,
    pub accept_errors: Counter,
    pub bind_failures: Counter,
    /// Streams from peers to this node's backends of the service (mTLS).
    pub inbound_streams: Counter,
    /// Inbound streams refused, by caller (rare: a lock will do).
    denied: Mutex<BTreeMap<String, u64>>,
}

impl ServiceMetrics {
    /// Counts a connection's bytes, for the service and for its backend.
    pub fn bytes(&self, backend: &BackendStats, to_backend: u64, to_client: u64) {
        self.bytes_to_backend.increment(to_backend);
        self.bytes_to_client.increment(to_client);
        let backend = backend.traffic();
        backend.bytes_to_backend.increment(to_backend);
        backend.bytes_to_client.increment(to_client);
    }

    /// Counts a refused inbound stream of `caller`; true the first time.
    pub fn deny(&self, caller: &str) -> bool {
        let mut denied = self.denied.lock().unwrap_or_else(|e| e.into_inner());
        match denied.get_mut(caller) {
            Some(count) => {
                *count += 1;
                false
            }
            None => {
                denied.insert(caller.to_string(), 1);
                true
            }
        }
    }

    /// The refused inbound streams by caller.
    pub fn denied(&self) -> Vec<(String, u64)> {
        let denied = self.denied.lock().unwrap_or_else(|e| e.into_inner());
        denied.iter().map(|(caller, n)| (caller.clone(), *n)).collect()
    }
}

/// A service's HTTP counters.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// `loopmesh_http_requests_total` by code class, 1xx to 5xx.
    pub requests: [Counter; 5],
    pub duration: Histogram,
    pub retries: Counter,
    /// Upstream connections open (pooled, busy or upgraded).
    pub upstream_connections: Gauge,
    /// Requests the proxy answered itself, by reason
    /// ([`super::http::REFUSALS`], in its order).
    pub refused: [Counter; super::http::REFUSALS.len()],
}

/// A service's current state: what a new connection reads, replaced whole
/// by a change. A lock held for a pointer copy (a tokio watch channel cost
/// four times the memory, and 10k services each have one).
#[derive(Debug)]
pub struct StateCell(std::sync::RwLock<Arc<ServiceState>>);

impl StateCell {
    pub fn new(state: Arc<ServiceState>) -> Arc<StateCell> {
        Arc::new(StateCell(std::sync::RwLock::new(state)))
    }

    /// The state now.
    pub fn current(&self) -> Arc<ServiceState> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the state; connections already open keep theirs.
    pub fn replace(&self, state: Arc<ServiceState>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = state;
    }
}

/// Where a service's route is read from when its backends are compiled.
#[derive(Debug, Clone)]
pub enum RouteSource {
    /// Its route file: what the data plane serves is what the file says.
    File(PathBuf),
    /// A route handed over in memory (tests, callers without files).
    Memory(Arc<Route>),
}

impl RouteSource {
    /// The route, read back if it lives in a file.
    fn load(&self) -> Result<Arc<Route>, String> {
        match self {
            RouteSource::Memory(route) => Ok(route.clone()),
            RouteSource::File(path) => crate::routing::load_route(path)
                .map(Arc::new)
                .map_err(|err| err.to_string()),
        }
    }
}

/// What compiling backends needs from the proxy as a whole; one per proxy,
/// shared by every service.
#[derive(Debug)]
pub struct CompileContext {
    /// The node's zone, for zone preference.
    pub node_zone: Option<String>,
    /// Congestion control for backends on this host.
    pub loopback_congestion: Option<Arc<CString>>,
    /// Set when L4 connections are forwarded in the kernel.
    pub kernel: Option<Arc<KernelForwarding>>,
    /// The services listening, by name: HTTP routes may send to another,
    /// and the mesh's inbound listener finds its targets here.
    pub directory: Directory,
    /// mTLS between nodes, when configured: tunnels to peers.
    pub mesh: Option<Arc<super::tunnel::Mesh>>,
    /// Where access log lines go, once some service logs.
    pub access_log_to: Destination,
    /// Every HTTP service logs, whatever its own `http.access_log`.
    pub access_log_all: bool,
    access_log: OnceLock<Option<AccessLog>>,
}

impl CompileContext {
    pub fn new(
        node_zone: Option<String>,
        loopback_congestion: Option<Arc<CString>>,
        kernel: Option<Arc<KernelForwarding>>,
        access_log_to: Destination,
        access_log_all: bool,
        mesh: Option<Arc<super::tunnel::Mesh>>,
    ) -> CompileContext {
        CompileContext {
            node_zone,
            loopback_congestion,
            kernel,
            directory: Directory::default(),
            mesh,
            access_log_to,
            access_log_all,
            access_log: OnceLock::new(),
        }
    }

    /// The access log, opened at its first line; `None` if it cannot be
    /// (said once).
    pub fn access_log(&self) -> Option<&AccessLog> {
        self.access_log
            .get_or_init(|| match AccessLog::open(&self.access_log_to) {
                Ok(log) => Some(log),
                Err(err) => {
                    tracing::error!(
                        "cannot open the access log {:?}: {err}; requests are not logged",
                        self.access_log_to
                    );
                    None
                }
            })
            .as_ref()
    }
}

/// The services listening, by name.
#[derive(Debug, Default)]
pub struct Directory(std::sync::RwLock<HashMap<Arc<str>, Arc<StateCell>>>);

impl Directory {
    /// The current state of service `name`, if it listens.
    pub fn find(&self, name: &str) -> Option<Arc<ServiceState>> {
        let services = self.0.read().unwrap_or_else(|e| e.into_inner());
        services.get(name).map(|cell| cell.current())
    }

    pub fn insert(&self, name: &str, cell: Arc<StateCell>) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), cell);
    }

    pub fn remove(&self, name: &str) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).remove(name);
    }
}

/// Everything a new connection to a service needs; replaced whole on reload.
#[derive(Debug)]
pub struct ServiceState {
    pub address: SocketAddr,
    /// The service's definition: port and traffic policy.
    pub spec: ServiceSpec,
    pub shared: Arc<ServiceShared>,
    pub context: Arc<CompileContext>,
    source: RouteSource,
    /// Compiled at the first connection (or at once, for a service that
    /// already had one); an error if its route could not be read back.
    backends: OnceLock<Result<BackendSet, String>>,
    /// HTTP routes over the backends, compiled with them.
    routes: OnceLock<Routes>,
}

impl ServiceState {
    /// A service from its route's head; backends are compiled when first
    /// needed, from `source`.
    pub fn new(
        head: &RouteHead,
        source: RouteSource,
        shared: Arc<ServiceShared>,
        context: Arc<CompileContext>,
    ) -> ServiceState {
        ServiceState {
            address: SocketAddr::from((head.address, head.port())),
            spec: head.spec.clone(),
            shared,
            context,
            source,
            backends: OnceLock::new(),
            routes: OnceLock::new(),
        }
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Forwarding in the kernel, if on.
    pub fn kernel(&self) -> Option<&Arc<KernelForwarding>> {
        self.context.kernel.as_ref()
    }

    /// Whether the backends are compiled.
    pub fn is_compiled(&self) -> bool {
        self.backends.get().is_some()
    }

    /// The backends if they are compiled (for views, which must not
    /// compile them).
    pub fn compiled_backends(&self) -> Option<&BackendSet> {
        self.backends.get()?.as_ref().ok()
    }

    /// The backends, compiled now if this is the first need. An error says
    /// why the route could not be read back (said once per state).
    pub fn backends(&self) -> Result<&BackendSet, &str> {
        self.backends
            .get_or_init(|| {
                let compiled = self
                    .source
                    .load()
                    .map(|route| compile(&route, &self.context, &HashMap::new()));
                if let Err(reason) = &compiled {
                    tracing::error!(
                        "service {}: cannot read its route back: {reason}; its connections are refused until the next change",
                        self.name()
                    );
                }
                compiled
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// The HTTP routes over the backends (`None` if those cannot be had).
    pub fn routes(&self) -> Option<&Routes> {
        let backends = self.backends().ok()?;
        Some(self.routes.get_or_init(|| Routes::new(&self.spec.http, backends)))
    }

    /// Compiles the backends now, carrying over the counters of
    /// `previous`'s backends by id (a reload neither resets connection
    /// counts nor forgives an ejection).
    pub fn compile_now(&self, previous: &ServiceState) {
        let stats: HashMap<&str, &Arc<BackendStats>> = match previous.backends.get() {
            Some(Ok(set)) => set.backends().iter().map(|b| (&*b.id, &b.stats)).collect(),
            _ => HashMap::new(),
        };
        let compiled = self
            .source
            .load()
            .map(|route| compile(&route, &self.context, &stats));
        let _ = self.backends.set(compiled);
    }

    /// Calls `f` with the backends without keeping them compiled if they
    /// are not (for views: looking must not cost the memory of using).
    pub fn with_backends<R>(&self, f: impl FnOnce(&BackendSet) -> R) -> Option<R> {
        match self.backends.get() {
            Some(Ok(set)) => Some(f(set)),
            Some(Err(_)) => None,
            None => {
                let route = self.source.load().ok()?;
                Some(f(&compile(&route, &self.context, &HashMap::new())))
            }
        }
    }
}

/// A route's backends, as the balancer sees them. With the mesh on, an
/// instance of another node that carries its node's mesh address is
/// reached through a tunnel (unless the service's `tls.mode` is `off`);
/// with `required`, instances without one are left out.
fn compile(route: &Route, context: &CompileContext, stats: &HashMap<&str, &Arc<BackendStats>>) -> BackendSet {
    let mode = route
        .spec
        .tls
        .mode
        .unwrap_or(context.mesh.as_ref().map_or(TlsMode::Off, |m| m.default_mode));
    let backends = route
        .backends
        .iter()
        .filter_map(|(id, instance)| {
            let local_node = context.mesh.as_ref().map(|mesh| mesh.node.as_str());
            let elsewhere = instance.node.as_ref().map(|n| n.as_str()) != local_node;
            let mesh = match (mode, instance.mesh, &context.mesh) {
                (TlsMode::Off, _, _) | (_, None, _) | (_, _, None) => None,
                (_, Some(peer), Some(_)) => Some(peer).filter(|_| elsewhere),
            };
            if mode == TlsMode::Required && mesh.is_none() && elsewhere {
                return None;
            }
            let addr = instance
                .host
                .parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, instance.port));
            // A backend on this host is a loopback address; names are not
            // resolved here and count as remote.
            let on_this_host = mesh.is_none() && addr.is_some_and(|addr| addr.ip().is_loopback());
            Some(Backend {
                id: id.as_str().into(),
                host: instance.host.as_str().into(),
                port: instance.port,
                addr,
                congestion: context.loopback_congestion.clone().filter(|_| on_this_host),
                weight: instance.weight,
                zone: instance.zone.as_deref().map(Into::into),
                tags: instance.tags.clone().into_boxed_slice(),
                node: instance.node.clone(),
                mesh,
                state: instance.state,
                stats: stats
                    .get(id.as_str())
                    .map_or_else(Default::default, |s| Arc::clone(s)),
            })
        })
        .collect();
    let spec = &route.spec;
    BackendSet::new(backends, spec.balance, spec.outlier, context.node_zone.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::tls::{CredentialFiles, Credentials};
    use crate::proxy::tunnel::Mesh;

    /// A proxy's context on node-a, with the mesh on in `mode` (`None`: off).
    fn context(dir: &std::path::Path, mode: Option<TlsMode>) -> CompileContext {
        let mesh = mode.map(|mode| {
            crate::ca::init("test.mesh", &dir.join("ca"), 30, false).unwrap();
            crate::ca::issue(&dir.join("ca"), "node-a", dir, 30, false).unwrap();
            let files = CredentialFiles {
                cert: dir.join("node-a.pem"),
                key: dir.join("node-a.key"),
                bundle: dir.join("bundle.pem"),
            };
            Arc::new(Mesh::new(
                "node-a",
                Arc::new(Credentials::load(files, "node-a").unwrap()),
                mode,
                std::time::Duration::from_secs(600),
                1000,
            ))
        });
        CompileContext::new(None, None, None, Destination::Stderr, false, mesh)
    }

    /// The backends of a route with three instances: node-b's through the
    /// mesh, node-b's without a mesh address, and one of this node.
    fn compiled(context: &CompileContext, tls: &str) -> Vec<(String, Option<SocketAddr>)> {
        let route: Route = serde_json::from_str(&format!(
            r#"{{"service": "db", "address": "127.100.0.1", "spec": {{"port": 5432 {tls}}}, "backends": {{
                "meshed": {{"host": "127.0.0.1", "port": 1, "node": "node-b", "mesh": "10.0.0.2:15008"}},
                "direct": {{"host": "10.0.0.2", "port": 2, "node": "node-b"}},
                "local": {{"host": "127.0.0.1", "port": 3, "node": "node-a", "mesh": "10.0.0.1:15008"}}}}}}"#
        ))
        .unwrap();
        compile(&route, context, &HashMap::new())
            .backends()
            .iter()
            .map(|b| (b.id.to_string(), b.mesh))
            .collect()
    }

    #[test]
    fn the_mode_decides_which_backends_ride_the_mesh() {
        let peer: SocketAddr = "10.0.0.2:15008".parse().unwrap();
        let owned = |list: &[(&str, Option<SocketAddr>)]| -> Vec<(String, Option<SocketAddr>)> {
            list.iter().map(|(id, mesh)| (id.to_string(), *mesh)).collect()
        };
        let dir = tempfile::tempdir().unwrap();
        let permissive = context(dir.path(), Some(TlsMode::Permissive));
        // Another node's instance with a mesh address goes through it; one
        // without goes directly; this node's own never tunnels to itself.
        let expected = owned(&[("direct", None), ("local", None), ("meshed", Some(peer))]);
        assert_eq!(compiled(&permissive, ""), expected);
        // required: another node's instance without a mesh address is left out.
        assert_eq!(
            compiled(&permissive, r#", "tls": {"mode": "required"}"#),
            owned(&[("local", None), ("meshed", Some(peer))])
        );
        // off: everything directly.
        let direct = owned(&[("direct", None), ("local", None), ("meshed", None)]);
        assert_eq!(compiled(&permissive, r#", "tls": {"mode": "off"}"#), direct);
        // Without the mesh configured on this node, nothing tunnels.
        let plain = context(dir.path(), None);
        assert_eq!(compiled(&plain, ""), direct);
    }
}
