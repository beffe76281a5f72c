//! The registrar (Nerve's job in SmartStack): checks the backends on this
//! node and keeps exactly the healthy ones in the catalog.
//!
//! One task per backend runs its checks and reports only flips (rise/fall
//! reached). The main loop owns the registry and decides what each key
//! should hold: a healthy backend is registered with the state an operator
//! set by flag (`up`, `draining`, `maintenance`), an unhealthy one is not.
//! A backend is its key, `<service>/<id>`: an edit of anything else
//! (weight, tags, check settings, even host and port) goes to the running
//! checker and keeps the backend's health, so a registered backend stays
//! registered and its value is rewritten in place.
//! A store outage never flaps anything: checks go on, the lease outlives
//! short blips, and whatever could not be written is retried.

pub mod check;
pub mod config;
mod registry;
mod status;

use crate::catalog::InstanceState;
use crate::config::ConfigError;
use crate::store::StoreError;
use config::{read_flag, Backend, RegistrarConfig};
use registry::Registry;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum RegistrarError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A backend being checked, and what the registrar knows of it.
struct Running {
    backend: Backend,
    /// The checker's copy of the backend: edits are sent here rather than
    /// to a new checker, which would start down and deregister it.
    edits: watch::Sender<Backend>,
    checker: JoinHandle<()>,
    /// Tells this checker's flips from those of an earlier one of the key.
    generation: u64,
    healthy: bool,
    /// Its checks' counters, for `/metrics`.
    checks: Arc<check::CheckStats>,
}

/// Quiet time after a file event before re-reading (editors write in bursts).
const SETTLE: Duration = Duration::from_millis(50);

/// The registrar daemon.
pub struct Registrar {
    config: RegistrarConfig,
    registry: Registry,
    running: BTreeMap<String, Running>,
    /// The generation of the last checker started.
    generation: u64,
    /// Operators' flags by instance id.
    flags: HashMap<String, InstanceState>,
    flips_tx: mpsc::UnboundedSender<check::Flip>,
    flips: mpsc::UnboundedReceiver<check::Flip>,
    status: std::sync::Arc<status::RegistrarStatus>,
    /// Tells systemd READY=1 once.
    ready: crate::systemd::ReadyOnce,
}

impl Registrar {
    /// Validates everything that can be validated before running.
    pub fn new(config: RegistrarConfig) -> Result<Self, RegistrarError> {
        let registry = Registry::open(&config.store, config.lease_ttl)?;
        let (flips_tx, flips) = mpsc::unbounded_channel();
        Ok(Registrar {
            config,
            registry,
            running: BTreeMap::new(),
            generation: 0,
            flags: HashMap::new(),
            flips_tx,
            flips,
            status: Default::default(),
            ready: Default::default(),
        })
    }

    /// Runs until `shutdown`, then drains: every registered instance is
    /// marked draining, stays so for `drain_period`, then is deleted and
    /// the lease revoked.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), RegistrarError> {
        let backends = self.config.backends()?;
        tracing::info!(
            "registrar {} starting: {} backend(s), {}",
            self.config.node_name(),
            backends.len(),
            self.registry.describe()
        );
        let flags_dir = self.config.flags_dir();
        std::fs::create_dir_all(&flags_dir).map_err(|source| StoreError::Write {
            path: flags_dir.clone(),
            source,
        })?;
        let (wake_tx, mut wake) = mpsc::unbounded_channel();
        let _flags_watcher = crate::store::file::watch_changes(
            &flags_dir,
            notify::RecursiveMode::NonRecursive,
            wake_tx.clone(),
        )?;
        if let Some(dir) = &self.config.services_dir {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Write {
                path: dir.clone(),
                source,
            })?;
        }
        let _services_watcher = match &self.config.services_dir {
            Some(dir) => Some(crate::store::file::watch_changes(
                dir,
                notify::RecursiveMode::NonRecursive,
                wake_tx,
            )?),
            None => None,
        };
        if self.config.admin.enabled {
            let metrics = crate::admin::install_recorder()?;
            crate::telemetry::register(crate::telemetry::Daemon::Registrar);
            let shown: std::sync::Arc<dyn crate::admin::Status> = self.status.clone();
            tokio::spawn(crate::admin::serve(self.config.admin.listen, metrics, shown));
        }
        self.read_flags();
        self.apply_backends(backends).await;
        self.registry.tick().await;
        self.publish_status();
        let mut watchdog = crate::systemd::Watchdog::new();
        let mut tick = tokio::time::interval(self.config.lease_ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        // SIGHUP re-reads the service files and flags now (they are also
        // followed as they change); it must not end the registrar.
        let mut hangups = crate::signal::Hangups::new();
        loop {
            tokio::select! {
                () = hangups.next() => {
                    tracing::info!("registrar: SIGHUP: re-reading the service files and flags");
                    self.reload().await;
                }
                Some(flip) = self.flips.recv() => self.on_flip(flip).await,
                _ = tick.tick() => self.registry.tick().await,
                Some(()) = wake.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while wake.try_recv().is_ok() {}
                    self.reload().await;
                }
                () = watchdog.ping() => {}
                () = &mut shutdown => break,
            }
            self.publish_status();
        }
        crate::systemd::notify("STOPPING=1");
        self.drain().await;
        Ok(())
    }

    /// Publishes the state for the admin API; tells systemd the first time
    /// it is ready.
    fn publish_status(&mut self) {
        let instances = self
            .running
            .values()
            .map(|running| {
                let backend = &running.backend;
                let state = self.flags.get(&backend.id).copied().unwrap_or_default();
                serde_json::json!({
                    "key": backend.key(), "service": backend.service, "id": backend.id,
                    "host": backend.instance.host, "port": backend.instance.port,
                    "mesh": backend.instance.mesh,
                    "healthy": running.healthy, "state": state.as_str(), "registered": running.healthy,
                })
            })
            .collect();
        let checks = self
            .running
            .values()
            .map(|running| status::Checked {
                service: running.backend.service.clone(),
                instance: running.backend.id.clone(),
                registered: running.healthy,
                checks: running.checks.clone(),
            })
            .collect();
        self.status.publish(status::Published {
            node: self.config.node_name(),
            store: self.registry.describe(),
            settled: self.registry.is_settled(),
            instances,
            checks,
        });
        self.ready.announce(self.registry.is_settled());
    }

    /// A backend crossed rise or fall.
    async fn on_flip(&mut self, flip: check::Flip) {
        let Some(running) = self
            .running
            .get_mut(&flip.key)
            .filter(|running| running.generation == flip.generation)
        else {
            return; // from a checker stopped since
        };
        running.healthy = flip.healthy;
        let (checks, word) = if flip.healthy {
            (running.backend.check.rise, "passed")
        } else {
            (running.backend.check.fall, "failed")
        };
        tracing::info!(
            "registrar: {} is {} after {checks} check(s) {word} ({})",
            flip.key,
            if flip.healthy { "healthy" } else { "unhealthy" },
            flip.detail
        );
        self.publish(&flip.key).await;
    }

    /// Makes the registry hold what `key` should: its instance with the
    /// flagged state while healthy, nothing otherwise.
    async fn publish(&mut self, key: &str) {
        let value = self.running.get(key).and_then(|running| {
            let state = self.flags.get(&running.backend.id).copied().unwrap_or_default();
            running
                .healthy
                .then(|| serde_json::to_vec(&running.backend.with_state(state)).expect("instances serialize"))
        });
        self.registry.set(key, value).await;
    }

    /// Re-reads the services and the flags after a file event.
    async fn reload(&mut self) {
        let flags_before = self.flags.clone();
        self.read_flags();
        if self.flags != flags_before {
            let keys: Vec<String> = self.running.keys().cloned().collect();
            for key in keys {
                self.publish(&key).await;
            }
        }
        if self.config.services_dir.is_some() {
            match self.config.backends() {
                Ok(backends) => self.apply_backends(backends).await,
                Err(err) => {
                    metrics::counter!("loopmesh_registrar_config_errors_total").increment(1);
                    tracing::error!(
                        "registrar: {err}; the previous {} backend(s) stay",
                        self.running.len()
                    );
                }
            }
        }
    }

    /// Reads every flag file; an unreadable or invalid one is reported and
    /// leaves that instance's state as it was.
    fn read_flags(&mut self) {
        let dir = self.config.flags_dir();
        let mut flags = HashMap::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if id.starts_with('.') {
                continue;
            }
            match read_flag(&dir, &id) {
                Ok(state) => {
                    flags.insert(id, state);
                }
                Err(err) => {
                    tracing::error!("registrar: {err}; instance {id} keeps its state");
                    if let Some(previous) = self.flags.get(&id) {
                        flags.insert(id, *previous);
                    }
                }
            }
        }
        for (id, state) in &flags {
            if self.flags.get(id) != Some(state) {
                tracing::info!("registrar: instance {id} set to {} by flag", state.as_str());
            }
        }
        for id in self.flags.keys().filter(|id| !flags.contains_key(*id)) {
            tracing::info!("registrar: instance {id} flag removed: up");
        }
        self.flags = flags;
    }

    /// Makes the running backends the configured ones, by key
    /// (`<service>/<id>`): a key no longer configured is deregistered and
    /// its checker stopped; a new one gets a checker and is down until
    /// `rise` passes; a key still configured but edited is updated in
    /// place, keeping its checker and its health, so a registered backend
    /// is rewritten once under the same lease (or not at all if its value
    /// did not change) and an unregistered one stays out.
    async fn apply_backends(&mut self, backends: Vec<Backend>) {
        let wanted: BTreeMap<String, Backend> = backends.into_iter().map(|b| (b.key(), b)).collect();
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|key| !wanted.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            if let Some(running) = self.running.remove(&key) {
                running.checker.abort();
                tracing::info!("registrar: {key} is no longer configured; deregistering it");
                self.registry.set(&key, None).await;
            }
        }
        for (key, backend) in wanted {
            if let Some(running) = self.running.get_mut(&key) {
                if running.backend != backend {
                    tracing::info!(
                        "registrar: {key} updated in place: {}",
                        backend.changes_from(&running.backend).join(", ")
                    );
                    running.edits.send_replace(backend.clone());
                    running.backend = backend;
                    self.publish(&key).await;
                }
                continue;
            }
            tracing::info!(
                "registrar: checking {key} at {}:{} every {:?}",
                backend.instance.host,
                backend.instance.port,
                backend.check.interval
            );
            let (edits, checked) = watch::channel(backend.clone());
            self.generation += 1;
            let checks = Arc::new(check::CheckStats::default());
            let checker = tokio::spawn(check::run(
                checked,
                self.generation,
                self.flips_tx.clone(),
                checks.clone(),
            ));
            self.running.insert(
                key,
                Running {
                    backend,
                    edits,
                    checker,
                    generation: self.generation,
                    healthy: false,
                    checks,
                },
            );
        }
    }

    /// SIGTERM: mark every registered instance draining, wait the drain
    /// period, then delete them all and revoke the lease.
    async fn drain(&mut self) {
        for running in self.running.values() {
            running.checker.abort();
        }
        let registered: Vec<String> = self
            .running
            .iter()
            .filter(|(_, running)| running.healthy)
            .map(|(key, _)| key.clone())
            .collect();
        if !registered.is_empty() && !self.config.drain_period.is_zero() {
            tracing::info!(
                "registrar stopping: {} instance(s) draining for {:?}",
                registered.len(),
                self.config.drain_period
            );
            for key in &registered {
                let backend = &self.running[key].backend;
                let value = serde_json::to_vec(&backend.with_state(InstanceState::Draining))
                    .expect("instances serialize");
                self.registry.set(key, Some(value)).await;
            }
            tokio::time::sleep(self.config.drain_period).await;
        }
        self.registry.close().await;
        if self.registry.is_settled() {
            let how = match self.registry {
                Registry::Etcd(_) => "instances deregistered, lease revoked",
                Registry::File(_) => "instance files removed",
            };
            tracing::info!("registrar stopped: {how}");
        } else {
            tracing::warn!(
                "registrar stopped without reaching the store; its registrations expire with the lease"
            );
        }
    }
}
