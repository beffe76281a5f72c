//! Where registrations go: etcd under one lease, or the file catalog.
//!
//! Both keep the desired set (key → value) and make the store match it,
//! retrying what failed on the next tick, so a store outage delays
//! registrations but never loses one. In etcd every key lives under the
//! registrar's lease: if the registrar, its node or its network dies, the
//! lease expires and the keys vanish on their own. If the lease is lost
//! (expired during an outage, or revoked), a new one is taken and every
//! desired key is written again.

use crate::config::StoreConfig;
use crate::store::etcd::EtcdStore;
use crate::store::file::FileStore;
use crate::store::StoreError;
use etcd_client::{LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The registrar's view of its store.
pub enum Registry {
    Etcd(Box<EtcdRegistry>),
    File(FileRegistry),
}

impl Registry {
    /// A registry for `store`; nothing is contacted yet.
    pub fn open(store: &StoreConfig, lease_ttl: Duration) -> Result<Registry, StoreError> {
        Ok(match &store.etcd {
            Some(etcd) => Registry::Etcd(Box::new(EtcdRegistry {
                store: EtcdStore::new(etcd.clone(), &store.prefix)?,
                ttl: lease_ttl,
                lease: None,
                keeper: None,
                desired: BTreeMap::new(),
                dirty: BTreeSet::new(),
                failing: false,
            })),
            None => Registry::File(FileRegistry {
                store: FileStore::new(store.catalog_dir.clone()),
                desired: BTreeMap::new(),
                dirty: BTreeSet::new(),
            }),
        })
    }

    /// Describes the store for logs.
    pub fn describe(&self) -> String {
        match self {
            Registry::Etcd(etcd) => format!("etcd, lease TTL {:?}", etcd.ttl),
            Registry::File(file) => format!("file catalog {}", file.store.dir().display()),
        }
    }

    /// Wants `key` (`<service>/<id>`) to hold `value`, or to be gone.
    /// Applied at once if the store answers, else on a later tick. Wanting
    /// what is already wanted writes nothing: an edit that leaves the value
    /// alone (a check setting, an unregistered backend) is no store event.
    pub async fn set(&mut self, key: &str, value: Option<Vec<u8>>) {
        let (desired, dirty) = match self {
            Registry::Etcd(etcd) => (&mut etcd.desired, &mut etcd.dirty),
            Registry::File(file) => (&mut file.desired, &mut file.dirty),
        };
        if desired.get(key) != value.as_ref() {
            match value {
                Some(value) => desired.insert(key.to_string(), value),
                None => desired.remove(key),
            };
            dirty.insert(key.to_string());
        }
        self.flush().await;
    }

    /// Keeps the lease alive (taking a new one if it was lost) and retries
    /// whatever is not yet applied.
    pub async fn tick(&mut self) {
        if let Registry::Etcd(etcd) = self {
            etcd.keep_alive().await;
        }
        self.flush().await;
    }

    /// Whether every desired key is in the store.
    pub fn is_settled(&self) -> bool {
        match self {
            Registry::Etcd(etcd) => etcd.dirty.is_empty() && !etcd.failing,
            Registry::File(file) => file.dirty.is_empty(),
        }
    }

    async fn flush(&mut self) {
        match self {
            Registry::Etcd(etcd) => etcd.flush().await,
            Registry::File(file) => file.flush(),
        }
    }

    /// Deletes every registration and lets go of the lease.
    pub async fn close(&mut self) {
        let keys: Vec<String> = match self {
            Registry::Etcd(etcd) => etcd.desired.keys().cloned().collect(),
            Registry::File(file) => file.desired.keys().cloned().collect(),
        };
        for key in keys {
            self.set(&key, None).await;
        }
        if let Registry::Etcd(etcd) = self {
            etcd.revoke().await;
        }
    }
}

/// Registrations in etcd under one lease.
pub struct EtcdRegistry {
    store: EtcdStore,
    ttl: Duration,
    lease: Option<i64>,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    desired: BTreeMap<String, Vec<u8>>,
    /// Keys whose desired state (value or absence) etcd may not have yet.
    dirty: BTreeSet<String>,
    /// Whether the last call failed (to log an outage once, and its end).
    failing: bool,
}

impl EtcdRegistry {
    fn full_key(&self, key: &str) -> String {
        self.store.full_key(&format!("instances/{key}"))
    }

    /// Notes a failed call: logged once per outage, counted every time.
    async fn failed(&mut self, what: &str, err: StoreError) {
        metrics::counter!("loopmesh_registrar_store_errors_total").increment(1);
        if !self.failing {
            tracing::warn!("registrar: {what}: {err}; registrations are kept and retried");
        }
        self.failing = true;
        self.keeper = None;
        self.store.reset().await;
    }

    fn succeeded(&mut self) {
        if self.failing {
            tracing::info!("registrar: etcd answers again");
        }
        self.failing = false;
    }

    /// The lease, granted if there is none; a new lease marks every key dirty.
    async fn lease(&mut self) -> Option<i64> {
        if self.lease.is_some() {
            return self.lease;
        }
        let client = match self.store.client().await {
            Ok(client) => client,
            Err(err) => {
                self.failed("cannot connect", err).await;
                return None;
            }
        };
        let ttl = self.ttl.as_secs().max(1) as i64;
        let mut leases = client.lease_client();
        match self.store.timed(leases.grant(ttl, None)).await {
            Ok(granted) => {
                self.succeeded();
                self.lease = Some(granted.id());
                metrics::counter!("loopmesh_registrar_lease_grants_total").increment(1);
                tracing::info!(
                    "registrar: holding lease {:x} (TTL {ttl}s) for {} instance(s)",
                    granted.id(),
                    self.desired.len()
                );
                self.dirty.extend(self.desired.keys().cloned());
                self.lease
            }
            Err(err) => {
                self.failed("cannot take a lease", err).await;
                None
            }
        }
    }

    /// One keep-alive round trip. An answer with TTL 0 means the lease is
    /// gone (it expired while etcd was unreachable, or was revoked): a new
    /// one is taken and every instance registered again.
    async fn keep_alive(&mut self) {
        let Some(lease) = self.lease else {
            self.lease().await;
            return;
        };
        if self.keeper.is_none() {
            let client = match self.store.client().await {
                Ok(client) => client,
                Err(err) => return self.failed("cannot connect", err).await,
            };
            let mut leases = client.lease_client();
            match self.store.timed(leases.keep_alive(lease)).await {
                Ok(keeper) => self.keeper = Some(keeper),
                Err(err) if is_lease_lost(&err) => return self.replace_lost_lease(lease).await,
                Err(err) => return self.failed("cannot keep the lease alive", err).await,
            }
        }
        let Some((keeper, stream)) = &mut self.keeper else {
            return;
        };
        let round_trip = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        match self.store.timed(round_trip).await {
            Ok(Some(answer)) if answer.ttl() > 0 => self.succeeded(),
            Ok(_) => {
                self.succeeded();
                self.replace_lost_lease(lease).await;
            }
            Err(err) if is_lease_lost(&err) => {
                self.succeeded();
                self.replace_lost_lease(lease).await;
            }
            Err(err) => {
                metrics::counter!("loopmesh_registrar_keepalive_failures_total").increment(1);
                self.failed("lease keep-alive failed", err).await;
            }
        }
    }

    /// The lease is gone: take a new one and write every instance again.
    async fn replace_lost_lease(&mut self, lease: i64) {
        metrics::counter!("loopmesh_registrar_leases_lost_total").increment(1);
        tracing::warn!(
            "registrar: lease {lease:x} is gone (expired or revoked); registering {} instance(s) again under a new one",
            self.desired.len()
        );
        self.lease = None;
        self.keeper = None;
        self.lease().await;
    }

    async fn flush(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let Some(lease) = self.lease().await else { return };
        let client = match self.store.client().await {
            Ok(client) => client,
            Err(err) => return self.failed("cannot connect", err).await,
        };
        let mut kv = client.kv_client();
        while let Some(key) = self.dirty.first().cloned() {
            let full = self.full_key(&key);
            let result = match self.desired.get(&key) {
                Some(value) => self
                    .store
                    .timed(kv.put(full, value.clone(), Some(PutOptions::new().with_lease(lease))))
                    .await
                    .map(drop),
                None => self.store.timed(kv.delete(full, None)).await.map(drop),
            };
            match result {
                Ok(()) => {
                    self.succeeded();
                    self.dirty.remove(&key);
                }
                Err(err) if is_lease_lost(&err) => {
                    // Gone between keep-alives: take a new one, write all again.
                    self.replace_lost_lease(lease).await;
                    return;
                }
                Err(err) => return self.failed(&format!("cannot write {key}"), err).await,
            }
        }
    }

    async fn revoke(&mut self) {
        let Some(lease) = self.lease.take() else { return };
        self.keeper = None;
        if let Ok(client) = self.store.client().await {
            let mut leases = client.lease_client();
            if let Err(err) = self.store.timed(leases.revoke(lease)).await {
                tracing::warn!("registrar: cannot revoke lease {lease:x}: {err}; it expires with its TTL");
            }
        }
    }
}

/// Whether etcd said the lease no longer exists (expired or revoked).
fn is_lease_lost(err: &StoreError) -> bool {
    err.to_string().contains("lease not found")
}

/// Registrations as files of the file catalog, through its own atomic
/// put and delete.
pub struct FileRegistry {
    store: FileStore,
    desired: BTreeMap<String, Vec<u8>>,
    dirty: BTreeSet<String>,
}

impl FileRegistry {
    fn flush(&mut self) {
        let keys: Vec<String> = self.dirty.iter().cloned().collect();
        for key in keys {
            let catalog_key = format!("instances/{key}");
            let result = match self.desired.get(&key) {
                Some(value) => self.store.put(&catalog_key, value),
                None => self.store.delete(&catalog_key),
            };
            match result {
                Ok(()) => {
                    self.dirty.remove(&key);
                }
                Err(err) => {
                    metrics::counter!("loopmesh_registrar_store_errors_total").increment(1);
                    tracing::warn!("registrar: {err}; retrying");
                }
            }
        }
    }
}
