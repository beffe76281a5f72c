//! The agent's control loop: store events in, rendered files out.
//!
//! One task owns the catalog. It applies store events as they come, asks the
//! store for addresses of new services, and renders once a burst of changes
//! has settled (debounce, bounded by max_delay). Nothing is rendered before
//! the first snapshot, so an agent that starts while the store is down keeps
//! the files it rendered last and says it is stale.

use crate::addresses::AddressPool;
use crate::admin::{AdminError, AdminServer};
use crate::agent_status::{AgentStatus, DnsStatus, Published};
use crate::catalog::Catalog;
use crate::config::{AgentConfig, ConfigError};
use crate::dns::{DnsError, DnsServer};
use crate::proxy::{ApplyReport, ProxyManager, ProxySettings};
use crate::render::{Dirty, RenderError, Renderer, Report};
use crate::routing::{RouteFile, RouteHead};
use crate::state::{self, LastKnownGood, StateError};
use crate::store::{AnyStore, Change, Store, StoreError, StoreEvent};
use crate::succession::{self, Listening, Succession};
use crate::takeover::{Handover, Inherited, Socket, TakeoverError};
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Pause before retrying failed renders or address allocations.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// The agent cannot start or cannot finish a one-shot render.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Proxy(#[from] crate::proxy::Error),
    #[error(transparent)]
    Takeover(#[from] TakeoverError),
    #[error("store.catalog_dir: {} does not exist; nothing was changed. Fix the path, create the directory, or set store.create_catalog_dir: true to start with an empty catalog", dir.display())]
    MissingCatalogDir { dir: PathBuf },
    #[error("{count} file(s) failed to render; see the errors above")]
    RenderFailures { count: usize },
}

/// The catalog, the renderer and the bookkeeping between them.
pub struct Pipeline {
    config: AgentConfig,
    store: Arc<AnyStore>,
    pool: AddressPool,
    catalog: Catalog,
    renderer: Renderer,
    dirty: Dirty,
    /// Services whose address we asked for and have not yet seen.
    requested: HashSet<String>,
    synced: bool,
    reachable: bool,
    /// The data plane, unless the config turns it off.
    proxy: Option<ProxyManager>,
    /// The DNS server, unless the config turns it off.
    dns: Option<DnsServer>,
    /// What the admin API shows.
    status: Arc<AgentStatus>,
    /// A routing table is applied (rendered, or the last one on disk).
    applied: bool,
    /// Tells systemd READY=1 once.
    ready: crate::systemd::ReadyOnce,
    render_failures: Vec<String>,
    /// When the files were last rendered (unix seconds; 0: never here).
    rendered_at: u64,
    /// The revision of the last known good files on disk, served until the
    /// first snapshot.
    disk_revision: i64,
    /// The catalog revision the last render pass rendered.
    rendered_revision: i64,
    /// What `state.json` says now (revision, stale, refused keys), so it
    /// is rewritten exactly when one of them changes.
    recorded: Option<(i64, bool, Vec<String>)>,
    /// An address allocation failed and was logged; cleared on success.
    allocation_failing: bool,
    /// "Serving last known good (stale)" was logged; cleared, with a line,
    /// when the store answers again.
    stale_logged: bool,
}

impl Pipeline {
    /// Prepares everything that can fail before touching the store.
    pub fn new(config: AgentConfig) -> Result<Self, AgentError> {
        let store = Arc::new(AnyStore::open(&config.store)?);
        if let AnyStore::File(files) = store.as_ref() {
            // Number revisions (and zone serials) above the last served.
            if let Ok(Some(record)) = state::load(&config.state_dir) {
                files.continue_after(record.revision);
            }
        }
        let pool = config.pool().map_err(|err| ConfigError::Invalid {
            origin: "config".into(),
            field: "address_pool".into(),
            reason: err.to_string(),
        })?;
        let renderer = Renderer::new(&config, *config.dns.listen.ip())?;
        let proxy = config.proxy.enabled.then(|| new_proxy(&config)).transpose()?;
        let dns = new_dns(&config)?;
        let status = Arc::new(AgentStatus::new(rendered_files(&config)));
        let mut catalog = Catalog::default();
        if config.admin.enabled {
            catalog.reserve(config.admin.listen, "admin API");
        }
        if config.dns.enabled {
            catalog.reserve(std::net::SocketAddr::V4(config.dns.listen), "DNS server");
        }
        Ok(Pipeline {
            config,
            store,
            pool,
            catalog,
            renderer,
            dirty: Dirty::default(),
            requested: HashSet::new(),
            synced: false,
            reachable: false,
            proxy,
            dns,
            status,
            applied: false,
            ready: Default::default(),
            render_failures: Vec::new(),
            rendered_at: 0,
            disk_revision: 0,
            rendered_revision: 0,
            recorded: None,
            allocation_failing: false,
            stale_logged: false,
        })
    }

    /// The catalog as applied so far.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Applies one store event.
    pub fn apply(&mut self, event: StoreEvent) {
        match event {
            StoreEvent::Snapshot { revision, entries } => {
                let before = self.catalog.entries().len();
                self.catalog.replace(
                    entries
                        .iter()
                        .map(|e| (e.key.as_str(), e.value.as_slice(), e.create_revision)),
                );
                drop(entries);
                crate::memory::release_freed();
                self.catalog.set_revision(revision);
                self.dirty.mark_all();
                self.requested.clear();
                self.synced = true;
                self.set_reachable(true);
                tracing::info!(
                    "catalog snapshot at revision {revision}: {} services, {} invalid keys",
                    self.catalog.entries().len(),
                    self.catalog.invalid().len()
                );
                self.warn_if_emptied(before);
            }
            StoreEvent::Changes { revision, changes } => {
                let before = self.catalog.entries().len();
                for change in changes {
                    let touched = match &change {
                        Change::Put(entry) => {
                            self.catalog.put(&entry.key, &entry.value, entry.create_revision)
                        }
                        Change::Delete(key) => self.catalog.delete(key),
                    };
                    self.dirty.touch(touched);
                }
                self.catalog.set_revision(revision);
                self.warn_if_emptied(before);
            }
            StoreEvent::Reachable => self.set_reachable(true),
            StoreEvent::Unreachable { reason } => {
                // Once when it starts; each of the store's retries comes
                // back here and is counted, not logged.
                if !self.stale_logged {
                    tracing::warn!("serving last known good files (stale): {reason}");
                    self.stale_logged = true;
                }
                metrics::counter!("loopmesh_store_unreachable_total").increment(1);
                self.set_reachable(false);
            }
        }
        metrics::gauge!("loopmesh_catalog_revision").set(self.catalog.revision() as f64);
        metrics::gauge!("loopmesh_catalog_invalid_keys").set(self.catalog.invalid().len() as f64);
    }

    fn set_reachable(&mut self, reachable: bool) {
        self.reachable = reachable;
        if reachable && self.synced && self.stale_logged {
            tracing::info!(
                "catalog reachable again ({}); serving revision {}",
                self.store.describe(),
                self.catalog.revision()
            );
            self.stale_logged = false;
        }
        metrics::gauge!("loopmesh_catalog_stale").set(if self.is_stale() { 1.0 } else { 0.0 });
        self.record_state_if_changed();
    }

    /// Says loudly when a catalog that held services suddenly holds none:
    /// the usual cause is a wrong `catalog_dir` or prefix, not an operator
    /// removing the fleet.
    fn warn_if_emptied(&self, before: usize) {
        if before > 0 && self.catalog.entries().is_empty() {
            tracing::warn!(
                "the catalog went from {before} services to none ({}); every route and listener is removed. If that was not meant, check store.prefix and store.catalog_dir",
                self.store.describe()
            );
            metrics::counter!("loopmesh_catalog_emptied_total").increment(1);
        }
    }

    /// The revision the node's files reflect: the files on disk before the
    /// first snapshot; after it, the catalog's once nothing is left to
    /// render (a change that renders nothing, such as a refused value, is
    /// reflected at once), else the one the last render pass saw.
    pub fn revision(&self) -> i64 {
        if !self.synced {
            self.disk_revision
        } else if self.dirty.is_empty() {
            self.catalog.revision()
        } else {
            self.rendered_revision
        }
    }

    /// True until the first snapshot, and while the store is unreachable.
    pub fn is_stale(&self) -> bool {
        !self.synced || !self.reachable
    }

    /// Asks the store for an address for every defined service lacking one.
    /// Returns true if some allocation failed (retry later).
    pub async fn allocate_addresses(&mut self) -> bool {
        self.requested.retain(|service| {
            self.catalog
                .entry(service)
                .is_some_and(|entry| entry.spec.is_some() && entry.address.is_none())
        });
        let wanted: Vec<String> = self
            .catalog
            .services_without_address()
            .into_iter()
            .filter(|service| !self.requested.contains(service))
            .collect();
        if wanted.is_empty() {
            return false;
        }
        match self.store.allocate_addresses(&wanted, &self.pool).await {
            Ok(allocated) => {
                self.requested.extend(allocated.into_keys());
                if std::mem::take(&mut self.allocation_failing) {
                    tracing::info!("address allocation works again");
                }
                false
            }
            Err(err) => {
                // Once when it starts failing; each retry is counted.
                if !std::mem::replace(&mut self.allocation_failing, true) {
                    tracing::warn!(
                        "cannot allocate addresses yet: {err}; retrying every {}s",
                        RETRY_AFTER.as_secs()
                    );
                }
                metrics::counter!("loopmesh_address_allocation_failures_total").increment(1);
                true
            }
        }
    }

    /// Renders what changed since the last pass and records the state.
    pub fn render(&mut self) -> Report {
        let dirty = std::mem::take(&mut self.dirty);
        let full = dirty.is_full();
        self.rendered_revision = self.catalog.revision();
        let report = blocking(|| self.renderer.render(&self.catalog, &dirty));
        if full {
            crate::memory::release_freed();
        }
        for failure in &report.failures {
            tracing::error!("{failure}");
        }
        self.render_failures = report.failures.iter().map(ToString::to_string).collect();
        metrics::counter!("loopmesh_render_passes_total").increment(1);
        metrics::counter!("loopmesh_render_failures_total").increment(report.failures.len() as u64);
        metrics::histogram!("loopmesh_render_duration_seconds").record(report.elapsed.as_secs_f64());
        if !report.written.is_empty() || !report.removed.is_empty() {
            tracing::info!(
                "rendered revision {}: {} written, {} removed, {} unchanged in {:.1} ms",
                self.catalog.revision(),
                report.written.len(),
                report.removed.len(),
                report.unchanged,
                report.elapsed.as_secs_f64() * 1000.0
            );
        }
        self.dirty.merge(report.retry.clone());
        self.rendered_at = state::now_unix();
        self.recorded = None;
        self.record_state_if_changed();
        report
    }

    /// Renders, then hands the data plane the routes that changed (only
    /// those: a change to one service costs one service) and reloads the
    /// DNS server if the zone changed.
    pub async fn render_and_apply(&mut self) -> Report {
        let report = self.render();
        self.applied = true;
        if let Some(proxy) = &mut self.proxy {
            let changes = changed_routes(&routes_dir(&self.config), &report);
            if !changes.is_empty() {
                apply_routes(proxy, changes).await;
            }
        }
        let zone = zone_path(&self.config);
        if report
            .written
            .iter()
            .chain(&report.removed)
            .any(|path| *path == zone)
        {
            if let Some(dns) = &self.dns {
                dns.reload_or_keep();
            }
        }
        report
    }

    /// Writes `state.json` if what it says (revision, staleness, refused
    /// keys) differs from what the agent knows; the one record that
    /// `/ready`, the metrics and the file all agree with. Nothing is written
    /// before the files on disk were rendered once or announced.
    fn record_state_if_changed(&mut self) {
        if !self.synced && self.rendered_at == 0 {
            return;
        }
        let now = (
            self.revision(),
            self.is_stale(),
            self.catalog.invalid().keys().cloned().collect::<Vec<_>>(),
        );
        if self.recorded.as_ref() == Some(&now) {
            return;
        }
        let record = LastKnownGood {
            revision: now.0,
            rendered_at: self.rendered_at,
            store: self.store.describe(),
            stale: now.1,
            invalid_keys: now.2.clone(),
        };
        match state::save(&self.config.state_dir, &record) {
            Ok(()) => self.recorded = Some(now),
            Err(err) => tracing::error!("{err}"),
        }
    }

    /// Reports what the last run left on disk, before the store answers.
    /// The record is marked stale until the store answers.
    fn announce_last_known_good(&mut self) {
        match state::load(&self.config.state_dir) {
            Ok(Some(mut record)) => {
                self.disk_revision = record.revision;
                self.rendered_revision = record.revision;
                self.rendered_at = record.rendered_at;
                tracing::info!(
                    "last known good: revision {} from {} rendered at {} (unix); serving it (stale) until the catalog answers",
                    record.revision,
                    record.store,
                    record.rendered_at
                );
                record.stale = true;
                match state::save(&self.config.state_dir, &record) {
                    Ok(()) => self.recorded = Some((record.revision, true, record.invalid_keys)),
                    Err(err) => tracing::error!("{err}"),
                }
            }
            Ok(None) => tracing::info!("no previous state in {}", self.config.state_dir.display()),
            Err(err) => tracing::warn!("{err}; the rendered files stay as they are"),
        }
    }

    /// Runs until `shutdown` completes.
    /// Runs until `shutdown` completes, or until a successor has taken the
    /// sockets over. With `handover`, starts on a predecessor's sockets
    /// (`--takeover`) and tells it once this process serves.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
        mut handover: Option<Handover>,
    ) -> Result<(), AgentError> {
        ensure_catalog_dir(&self.config)?;
        let mut inherited = handover
            .as_mut()
            .map(|handover| std::mem::take(&mut handover.inherited))
            .unwrap_or_default();
        let lock = succession::lock(&self.config.state_dir, &mut inherited)?;
        tracing::info!(
            "agent {} starting: {}, state in {}{}",
            self.config.node_name(),
            self.store.describe(),
            self.config.state_dir.display(),
            if handover.is_some() {
                format!(", taking over {} socket(s)", inherited.len() + 1)
            } else {
                String::new()
            }
        );
        self.announce_last_known_good();
        let taking_over = handover.is_some();
        // A fresh agent answers /ready (503, with why) while it starts; a
        // successor opens the admin socket only once it serves, so /ready
        // never says "not ready" during a takeover.
        let mut admin = (self.config.admin.enabled && !taking_over)
            .then(|| start_admin(&self.config, &mut inherited, self.status.clone()))
            .transpose()?;
        succession::adopt(&mut inherited, self.proxy.as_mut(), self.dns.as_mut());
        if let Some(proxy) = &mut self.proxy {
            reload_data_plane(proxy, &routes_dir(&self.config)).await;
            proxy.close_unused_inherited();
            proxy.start_mesh()?;
            // The last known good table on disk counts as applied (stale).
            self.applied = proxy.listening_count() > 0 || !proxy.failed().is_empty();
        }
        if let Some(dns) = &mut self.dns {
            start_dns(dns).await;
        }
        if taking_over {
            self.ready.hold();
            self.publish_status();
            if self.config.admin.enabled {
                admin = Some(start_admin(&self.config, &mut inherited, self.status.clone())?);
            }
        }
        succession::serving(handover).await;
        self.ready.release();
        let mut succession = Succession::start(&self.config.state_dir)?;
        self.publish_status();
        let mut watchdog = crate::systemd::Watchdog::new();
        let (tx, mut rx) = mpsc::channel(1024);
        let store = self.store.clone();
        let sync = tokio::spawn(async move { store.sync(tx).await });
        tokio::pin!(shutdown);
        let debounce = self.config.render.debounce;
        let max_delay = self.config.render.max_delay;
        let mut first_change: Option<Instant> = None;
        let mut last_change = Instant::now();
        let mut retry_at: Option<Instant> = None;
        let mut bind_retry = tokio::time::interval(BIND_RETRY);
        let mut handed_over = false;
        loop {
            let deadline = match (first_change, retry_at) {
                (Some(first), _) => Some((last_change + debounce).min(first + max_delay)),
                (None, retry) => retry,
            };
            tokio::select! {
                event = rx.recv() => {
                    let Some(event) = event else { break };
                    self.apply(event);
                    while let Ok(event) = rx.try_recv() {
                        self.apply(event);
                    }
                    if self.synced && self.allocate_addresses().await {
                        retry_at.get_or_insert_with(|| Instant::now() + RETRY_AFTER);
                    }
                    if self.synced && !self.dirty.is_empty() {
                        if debounce.is_zero() {
                            // Leading edge: render now; whatever arrives
                            // meanwhile is batched into the next pass.
                            if !self.render_and_apply().await.failures.is_empty() {
                                retry_at = Some(Instant::now() + RETRY_AFTER);
                            }
                        } else {
                            last_change = Instant::now();
                            first_change.get_or_insert(last_change);
                        }
                    }
                }
                () = sleep_until(deadline) => {
                    first_change = None;
                    retry_at = None;
                    if self.synced && self.allocate_addresses().await {
                        retry_at = Some(Instant::now() + RETRY_AFTER);
                    }
                    let report = self.render_and_apply().await;
                    if !report.failures.is_empty() {
                        retry_at = Some(Instant::now() + RETRY_AFTER);
                    }
                }
                _ = bind_retry.tick() => {
                    if let Some(proxy) = &mut self.proxy {
                        retry_binds(proxy).await;
                    }
                    if let Some(dns) = &mut self.dns {
                        retry_dns_bind(dns).await;
                    }
                }
                // Pinged from this loop, so a stuck loop stops the pings.
                () = watchdog.ping() => {}
                event = succession.next() => {
                    let listening = Listening {
                        proxy: self.proxy.as_mut(),
                        dns: self.dns.as_mut(),
                        admin: &mut admin,
                        lock: &lock,
                    };
                    if succession.handle(event, listening).await {
                        handed_over = true;
                        break;
                    }
                }
                () = &mut shutdown => break,
            }
            self.publish_status();
        }
        sync.abort();
        if handed_over {
            tracing::info!("agent handed over; draining its open connections");
        } else {
            stopping(&self.config);
            succession.close();
            tracing::info!("agent stopping; rendered files stay in place");
        }
        let listening = Listening {
            proxy: self.proxy.as_mut(),
            dns: self.dns.as_mut(),
            admin: &mut admin,
            lock: &lock,
        };
        listening.finish(handed_over).await;
        Ok(())
    }
}

/// Tells systemd the agent is stopping, and that the stop may take as long
/// as the proxy's drain (so `TimeoutStopSec` follows `proxy.drain_timeout`).
fn stopping(config: &AgentConfig) {
    let extend = (config.proxy.drain_timeout + STOP_SLACK).as_micros();
    crate::systemd::notify(&format!("STOPPING=1\nEXTEND_TIMEOUT_USEC={extend}"));
}

/// Time allowed past the drain for the rest of a stop.
const STOP_SLACK: Duration = Duration::from_secs(10);

/// Starts the admin API, on the predecessor's socket when taking over.
fn start_admin(
    config: &AgentConfig,
    inherited: &mut Inherited,
    status: Arc<AgentStatus>,
) -> Result<AdminServer, AgentError> {
    let metrics = crate::admin::install_recorder()?;
    crate::telemetry::register(crate::telemetry::Daemon::Agent);
    let status: Arc<dyn crate::admin::Status> = status;
    let socket = inherited.take(Socket::Admin).pop();
    Ok(AdminServer::start(config.admin.listen, socket, metrics, status))
}

/// A note for `loopmesh check`: a config whose file catalog directory does
/// not exist (yet) is valid, but the agent will refuse to start on it.
pub fn catalog_dir_note(config: &AgentConfig) -> Option<String> {
    match ensure_catalog_dir_exists(config) {
        Err(err) => Some(err.to_string()),
        Ok(()) => None,
    }
}

fn ensure_catalog_dir_exists(config: &AgentConfig) -> Result<(), AgentError> {
    let store = &config.store;
    if store.etcd.is_some() || config.static_mode || store.create_catalog_dir || store.catalog_dir.is_dir() {
        return Ok(());
    }
    Err(AgentError::MissingCatalogDir {
        dir: store.catalog_dir.clone(),
    })
}

/// On the file catalog, the directory must exist (or be asked for with
/// `store.create_catalog_dir`): a mistyped path would otherwise read as an
/// empty catalog and remove every route on the node.
fn ensure_catalog_dir(config: &AgentConfig) -> Result<(), AgentError> {
    ensure_catalog_dir_exists(config)?;
    let store = &config.store;
    let dir = &store.catalog_dir;
    if store.etcd.is_none() && !config.static_mode && !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Write {
            path: dir.clone(),
            source,
        })?;
        tracing::info!(
            "created the empty file catalog {} (store.create_catalog_dir)",
            dir.display()
        );
    }
    Ok(())
}

/// The routing table directory of a config.
pub fn routes_dir(config: &AgentConfig) -> PathBuf {
    config.state_dir.join(crate::routing::ROUTES_DIR)
}

impl Pipeline {
    /// Publishes the state for the admin API, and tells systemd the agent
    /// is ready the first time it is.
    fn publish_status(&mut self) {
        self.record_state_if_changed();
        let published = Published {
            node: self.config.node_name(),
            store: self.store.describe(),
            applied: self.applied,
            stale: self.is_stale(),
            revision: self.revision(),
            services: self.catalog.entries().len(),
            invalid_keys: self.catalog.invalid().keys().cloned().collect(),
            render_failures: self.render_failures.clone(),
            proxy: self.proxy.as_ref().map(ProxyManager::view),
            dns: self.dns.as_ref().map(dns_status),
            mesh: self.proxy.as_ref().and_then(ProxyManager::mesh_status),
        };
        self.status.publish(published);
        if self
            .ready
            .announce(crate::admin::Status::ready(self.status.as_ref()).0)
        {
            tracing::info!("agent ready: routing table applied, every listener bound");
        }
    }
}

/// The DNS server's state for the admin API.
fn dns_status(dns: &DnsServer) -> DnsStatus {
    let served = dns.current();
    DnsStatus {
        listen: dns.listen_addr(),
        listening: dns.is_listening(),
        serial: served.serial(),
        records: served.records(),
    }
}

/// The files an agent renders, for the admin API's `/files`.
fn rendered_files(config: &AgentConfig) -> Vec<PathBuf> {
    let mut files = vec![routes_dir(config), zone_path(config)];
    files.extend(config.templates.iter().map(|resource| config.dest_path(resource)));
    files
}

/// The rendered DNS zone of a config.
pub fn zone_path(config: &AgentConfig) -> PathBuf {
    config.state_dir.join(crate::render::ZONE_FILE)
}

/// The DNS server a config asks for (none if `dns.enabled` is off).
fn new_dns(config: &AgentConfig) -> Result<Option<DnsServer>, DnsError> {
    if !config.dns.enabled {
        return Ok(None);
    }
    let listen = std::net::SocketAddr::V4(config.dns.listen);
    DnsServer::new(&config.dns.zone, &zone_path(config), listen).map(Some)
}

/// Loads the zone on disk (the last one rendered, if any) and binds.
async fn start_dns(dns: &mut DnsServer) {
    let zone = dns.zone_path().to_path_buf();
    if zone.exists() {
        dns.reload_or_keep();
    } else {
        tracing::info!(
            "dns: no zone at {} yet; in-zone names get SERVFAIL until the first render",
            zone.display()
        );
    }
    retry_dns_bind(dns).await;
}

/// Binds the DNS server if it is not listening; a failure is logged (and
/// counted) with the retry that follows, the rest of the agent serves on.
async fn retry_dns_bind(dns: &mut DnsServer) {
    if dns.is_listening() {
        return;
    }
    let first = !dns.has_tried_to_bind();
    match dns.start().await {
        Ok(()) if !first => tracing::info!("dns: listening on {} now that it is free", dns.listen_addr()),
        Ok(()) => {}
        Err(err) => {
            metrics::counter!("loopmesh_dns_bind_failures_total").increment(1);
            if first {
                tracing::error!(
                    "dns: {err}; the proxy and rendering go on, DNS is retried every {}s (port 53 needs CAP_NET_BIND_SERVICE)",
                    BIND_RETRY.as_secs()
                );
            }
        }
    }
}

fn new_proxy(config: &AgentConfig) -> Result<ProxyManager, crate::proxy::Error> {
    let mesh = match &config.mesh {
        Some(mesh) => {
            let files = crate::proxy::tls::CredentialFiles {
                cert: mesh.cert.clone(),
                key: mesh.key.clone(),
                bundle: mesh.bundle.clone(),
            };
            let node = config.node_name();
            let credentials = crate::proxy::tls::Credentials::load(files, &node)?;
            Some(Arc::new(crate::proxy::tunnel::Mesh::new(
                &node,
                Arc::new(credentials),
                mesh.default_mode,
                mesh.idle_timeout,
                mesh.max_streams_per_connection,
            )))
        }
        None => None,
    };
    let open_files = crate::limits::raise_open_files();
    let max_open_connections = config
        .proxy
        .max_open_connections
        .unwrap_or_else(|| crate::limits::default_proxy_connections(open_files));
    let proxy = ProxyManager::new(ProxySettings {
        drain_timeout: config.proxy.drain_timeout,
        node_zone: config.node_zone.clone(),
        loopback_congestion: crate::proxy::congestion::resolve(&config.proxy.loopback_congestion)
            .map(Arc::new),
        workers: config.proxy.workers,
        kernel_forwarding: config.proxy.kernel_forwarding,
        kernel_connections: crate::proxy::DEFAULT_KERNEL_CONNECTIONS,
        kernel_forwarding_max_open: config.proxy.kernel_forwarding_max_open,
        max_open_connections,
        access_log_to: crate::proxy::http::access_log::Destination::parse(&config.proxy.access_log.to),
        access_log_all: config.proxy.access_log.all_services,
        mesh,
        mesh_listen: config.mesh.as_ref().and_then(|mesh| mesh.listen),
    })?;
    tracing::info!(
        "proxy: {} event loop(s), up to {max_open_connections} connections open at once (open-file limit {open_files})",
        proxy.worker_count()
    );
    Ok(proxy)
}

/// The routes a render pass wrote or removed, read back from disk (what
/// the data plane serves is what the files say), by service; `None` for a
/// removed one. A file that does not read back (it passed the render's
/// check, so only a hand edit in between does that) is left out with one
/// line: its service keeps the route it has.
fn changed_routes(routes: &Path, report: &Report) -> BTreeMap<String, Option<(RouteHead, RouteFile)>> {
    let in_table = |path: &&PathBuf| path.parent() == Some(routes);
    let service_of = |path: &Path| path.file_stem().map(|stem| stem.to_string_lossy().into_owned());
    let mut changes = BTreeMap::new();
    for path in report.removed.iter().filter(in_table) {
        if let Some(service) = service_of(path) {
            changes.insert(service, None);
        }
    }
    for path in report.written.iter().filter(in_table) {
        // Only the head: the render checked the whole file, and the proxy
        // reads the backends back when the service is used.
        match crate::routing::load_route_head(path) {
            Ok((head, file)) => {
                changes.insert(head.service.clone(), Some((head, file)));
            }
            Err(err) => {
                tracing::error!("{err}; the service keeps the route it has");
                metrics::counter!("loopmesh_proxy_table_refusals_total").increment(1);
            }
        }
    }
    changes
}

/// Hands the data plane the routes that changed; says what changed.
async fn apply_routes(proxy: &mut ProxyManager, changes: BTreeMap<String, Option<(RouteHead, RouteFile)>>) {
    let report = proxy.update(changes).await;
    log_apply(proxy, &report);
}

/// Counts an apply, and logs it if it changed anything.
fn log_apply(proxy: &ProxyManager, report: &ApplyReport) {
    metrics::counter!("loopmesh_proxy_reloads_total").increment(1);
    if report.changed_anything() {
        tracing::info!(
            "data plane: {} listening ({} added, {} updated, {} removed), {} failed",
            proxy.listening_count(),
            report.added.len(),
            report.updated.len(),
            report.removed.len(),
            report.failed.len()
        );
    }
}

/// Loads the whole routing table from disk and applies it (start, static
/// mode); a table that fails validation is refused as a whole and the
/// running one stays.
pub async fn reload_data_plane(proxy: &mut ProxyManager, routes: &Path) {
    let table = match blocking(|| crate::routing::load_table_files(routes)) {
        Ok(table) => table,
        Err(err) => {
            tracing::error!("routing table refused: {err}; the running data plane stays as it was");
            metrics::counter!("loopmesh_proxy_table_refusals_total").increment(1);
            return;
        }
    };
    let report = proxy.apply_files(table).await;
    log_apply(proxy, &report);
}

/// Static mode: serve the hand-written routing table, reloading it whenever
/// a file in it changes. No catalog, no rendering.
pub async fn run_static(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
    mut handover: Option<Handover>,
) -> Result<(), AgentError> {
    let mut inherited = handover
        .as_mut()
        .map(|handover| std::mem::take(&mut handover.inherited))
        .unwrap_or_default();
    let lock = succession::lock(&config.state_dir, &mut inherited)?;
    let routes = routes_dir(&config);
    std::fs::create_dir_all(&routes).map_err(|source| StoreError::Write {
        path: routes.clone(),
        source,
    })?;
    let (wake_tx, mut wake) = mpsc::unbounded_channel();
    let _watcher = crate::store::file::watch_changes(&routes, notify::RecursiveMode::NonRecursive, wake_tx)?;
    tracing::info!(
        "agent {} in static mode: serving {}",
        config.node_name(),
        routes.display()
    );
    let status = Arc::new(AgentStatus::new(vec![routes.clone(), zone_path(&config)]));
    let taking_over = handover.is_some();
    // As in the catalog agent: a successor opens the admin socket once it
    // serves, so /ready never says "not ready" during a takeover.
    let mut admin = (config.admin.enabled && !taking_over)
        .then(|| start_admin(&config, &mut inherited, status.clone()))
        .transpose()?;
    let mut proxy = new_proxy(&config)?;
    // The zone next to the routes is served too, and followed the same way.
    let mut dns = new_dns(&config)?;
    succession::adopt(&mut inherited, Some(&mut proxy), dns.as_mut());
    reload_data_plane(&mut proxy, &routes).await;
    proxy.close_unused_inherited();
    proxy.start_mesh()?;
    let (zone_tx, mut zone_wake) = mpsc::unbounded_channel();
    let _zone_watcher = match &mut dns {
        Some(dns) => {
            start_dns(dns).await;
            Some(crate::store::file::watch_changes(
                &config.state_dir,
                notify::RecursiveMode::NonRecursive,
                zone_tx,
            )?)
        }
        None => None,
    };
    let mut ready = crate::systemd::ReadyOnce::default();
    if taking_over {
        ready.hold();
    }
    let publish = |proxy: &ProxyManager, dns: &Option<DnsServer>, ready: &mut crate::systemd::ReadyOnce| {
        status.publish(Published {
            node: config.node_name(),
            store: format!("static files in {}", config.state_dir.display()),
            // The hand-written table is the table: applied from the start.
            applied: true,
            proxy: Some(proxy.view()),
            dns: dns.as_ref().map(dns_status),
            mesh: proxy.mesh_status(),
            ..Published::default()
        });
        ready.announce(crate::admin::Status::ready(status.as_ref()).0);
    };
    if taking_over {
        publish(&proxy, &dns, &mut ready);
        if config.admin.enabled {
            admin = Some(start_admin(&config, &mut inherited, status.clone())?);
        }
    }
    succession::serving(handover).await;
    let mut succession = Succession::start(&config.state_dir)?;
    ready.release();
    publish(&proxy, &dns, &mut ready);
    let mut watchdog = crate::systemd::Watchdog::new();
    tokio::pin!(shutdown);
    let mut bind_retry = tokio::time::interval(BIND_RETRY);
    let mut handed_over = false;
    loop {
        tokio::select! {
            () = watchdog.ping() => {}
            _ = bind_retry.tick() => {
                retry_binds(&mut proxy).await;
                if let Some(dns) = &mut dns {
                    retry_dns_bind(dns).await;
                }
            }
            Some(()) = zone_wake.recv() => {
                tokio::time::sleep(STATIC_SETTLE).await;
                while zone_wake.try_recv().is_ok() {}
                if let Some(dns) = &dns {
                    dns.reload_or_keep();
                }
            }
            woke = wake.recv() => {
                if woke.is_none() {
                    break;
                }
                // Let an editor's burst of writes settle, then reload once.
                tokio::time::sleep(STATIC_SETTLE).await;
                while wake.try_recv().is_ok() {}
                reload_data_plane(&mut proxy, &routes).await;
            }
            event = succession.next() => {
                let listening = Listening {
                    proxy: Some(&mut proxy),
                    dns: dns.as_mut(),
                    admin: &mut admin,
                    lock: &lock,
                };
                if succession.handle(event, listening).await {
                    handed_over = true;
                    break;
                }
            }
            () = &mut shutdown => break,
        }
        publish(&proxy, &dns, &mut ready);
    }
    if handed_over {
        tracing::info!("agent handed over; draining its open connections");
    } else {
        stopping(&config);
        succession.close();
        tracing::info!("agent stopping; draining connections");
    }
    let listening = Listening {
        proxy: Some(&mut proxy),
        dns: dns.as_mut(),
        admin: &mut admin,
        lock: &lock,
    };
    listening.finish(handed_over).await;
    Ok(())
}

/// How often services whose address could not be bound are tried again.
const BIND_RETRY: Duration = Duration::from_secs(2);

/// Retries failed binds, if any; says so when one comes up.
async fn retry_binds(proxy: &mut ProxyManager) {
    if proxy.failed().is_empty() {
        return;
    }
    let report = proxy.retry_failed().await;
    for service in &report.added {
        tracing::info!("service {service} is listening now that its address is free");
    }
}

/// Quiet time after a routing file event in static mode.
const STATIC_SETTLE: Duration = Duration::from_millis(20);

/// Sleeps until `deadline`, or forever if there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Runs blocking work without stalling other tasks on a multi-thread runtime.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

/// confd's -onetime: snapshot, allocate missing addresses, render, exit.
///
/// Refused while an agent runs on the same state directory: the files it
/// serves are its own.
pub async fn render_once(config: AgentConfig) -> Result<Report, AgentError> {
    ensure_catalog_dir(&config)?;
    let _lock = state::lock(&config.state_dir)?;
    let mut pipeline = Pipeline::new(config)?;
    let (revision, entries) = pipeline.store.snapshot().await?;
    pipeline.apply(StoreEvent::Snapshot { revision, entries });
    let needed = pipeline.catalog.services_without_address();
    if !needed.is_empty() {
        pipeline.store.allocate_addresses(&needed, &pipeline.pool).await?;
        let (revision, entries) = pipeline.store.snapshot().await?;
        pipeline.apply(StoreEvent::Snapshot { revision, entries });
    }
    let report = pipeline.render();
    match report.failures.len() {
        0 => Ok(report),
        count => Err(AgentError::RenderFailures { count }),
    }
}
