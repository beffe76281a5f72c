//! Where the catalog comes from: etcd, or a directory of YAML files.
//!
//! Both stores speak one protocol to the agent: a full [`StoreEvent::Snapshot`]
//! pinned to one revision, then [`StoreEvent::Changes`] in revision order with
//! nothing missed, and another snapshot whenever continuity is lost (etcd
//! compacted the history the watch needed). Reachability changes are events
//! too, so the agent can say it is serving stale data.

pub mod etcd;
pub mod file;

use crate::addresses::{AddressError, AddressPool};
use crate::config::StoreConfig;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd {endpoints}: {reason}")]
    Etcd { endpoints: String, reason: String },
    #[error("etcd {endpoints}: no answer within {timeout:?}")]
    Timeout { endpoints: String, timeout: Duration },
    #[error("etcd {endpoints}: {reason}")]
    Watch { endpoints: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot watch {path}: {source}")]
    Notify { path: PathBuf, source: notify::Error },
    #[error("address for {service}: {source}")]
    Address { service: String, source: AddressError },
    #[error("address for {service}: {key} holds a value that is not a usable address; fix or delete it")]
    BadAddressValue { service: String, key: String },
    #[error("address for {service}: other writers changed the address keys during {attempts} allocation attempts in a row; will retry")]
    Contended { service: String, attempts: u32 },
    #[error("cannot read etcd credentials {path}: {source}")]
    Credentials { path: PathBuf, source: std::io::Error },
}

/// One key and its value, relative to the store prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision at which the key was created (orders address clashes).
    pub create_revision: i64,
}

/// One change inside a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Entry),
    Delete(String),
}

/// What a store tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// Everything under the prefix at `revision`; replaces all prior state.
    Snapshot { revision: i64, entries: Vec<Entry> },
    /// The changes committed at `revision`, in order.
    Changes { revision: i64, changes: Vec<Change> },
    /// The store answers again (after a start or an outage).
    Reachable,
    /// The store cannot be reached; the agent keeps what it has.
    Unreachable { reason: String },
}

/// A catalog source. Implementations: [`etcd::EtcdStore`], [`file::FileStore`].
pub trait Store: Send + Sync {
    /// Streams the catalog into `events` until the receiver is dropped:
    /// a snapshot, then changes; reconnects and resyncs on its own.
    fn sync(&self, events: mpsc::Sender<StoreEvent>) -> impl Future<Output = ()> + Send;

    /// One consistent read of everything under the prefix.
    fn snapshot(&self) -> impl Future<Output = Result<(i64, Vec<Entry>), StoreError>> + Send;

    /// Gives each service an address from `pool` unless it already has one,
    /// create-if-absent, so agents racing on it agree. Returns the address in
    /// force afterwards for each (an operator-pinned one wins); a service
    /// whose stored address is unusable is left out and logged.
    fn allocate_addresses(
        &self,
        services: &[String],
        pool: &AddressPool,
    ) -> impl Future<Output = Result<BTreeMap<String, Ipv4Addr>, StoreError>> + Send;

    /// [`Store::allocate_addresses`] for one service.
    fn allocate_address(
        &self,
        service: &str,
        pool: &AddressPool,
    ) -> impl Future<Output = Result<Ipv4Addr, StoreError>> + Send
    where
        Self: Sync,
    {
        async move {
            let services = [service.to_string()];
            self.allocate_addresses(&services, pool)
                .await?
                .remove(service)
                .ok_or_else(|| StoreError::BadAddressValue {
                    service: service.to_string(),
                    key: format!("addresses/{service}"),
                })
        }
    }

    /// A short description for logs (`etcd http://...` or `file catalog /dir`).
    fn describe(&self) -> String;
}

/// The store a config names: etcd if endpoints are set, else the file catalog.
pub enum AnyStore {
    Etcd(Box<etcd::EtcdStore>),
    File(file::FileStore),
}

impl AnyStore {
    /// Builds the store; connecting happens lazily, with retries, in `sync`.
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        Ok(match &config.etcd {
            Some(etcd) => AnyStore::Etcd(Box::new(etcd::EtcdStore::new(etcd.clone(), &config.prefix)?)),
            None => AnyStore::File(file::FileStore::new(config.catalog_dir.clone())),
        })
    }
}

impl Store for AnyStore {
    async fn sync(&self, events: mpsc::Sender<StoreEvent>) {
        match self {
            AnyStore::Etcd(store) => store.sync(events).await,
            AnyStore::File(store) => store.sync(events).await,
        }
    }

    async fn snapshot(&self) -> Result<(i64, Vec<Entry>), StoreError> {
        match self {
            AnyStore::Etcd(store) => store.snapshot().await,
            AnyStore::File(store) => store.snapshot().await,
        }
    }

    async fn allocate_addresses(
        &self,
        services: &[String],
        pool: &AddressPool,
    ) -> Result<BTreeMap<String, Ipv4Addr>, StoreError> {
        match self {
            AnyStore::Etcd(store) => store.allocate_addresses(services, pool).await,
            AnyStore::File(store) => store.allocate_addresses(services, pool).await,
        }
    }

    fn describe(&self) -> String {
        match self {
            AnyStore::Etcd(store) => store.describe(),
            AnyStore::File(store) => store.describe(),
        }
    }
}

/// Exponential backoff with jitter, so a fleet does not reconnect in step.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The pause before the next attempt; doubles up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = base.mul_f64(f64::from(nanos % 1000) / 4000.0);
        base + jitter
    }

    /// Back to the shortest pause after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_max_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<_> = (0..4).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(125));
        assert!(delays[1] >= Duration::from_millis(200));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(500));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(125));
    }
}
