//! The etcd store: revision-pinned snapshot, then a watch from revision+1.
//!
//! confd's etcd backend can lose updates between its read and its watch;
//! here the watch starts exactly one revision after the snapshot, resumes
//! from the last delivered revision after any disconnect, and falls back to
//! a fresh snapshot only when etcd has compacted the history it needs.

use super::{Backoff, Change, Entry, Store, StoreError, StoreEvent};
use crate::addresses::{parse_service_address, AddressPool};
use crate::config::EtcdConfig;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};

/// Most allocation transactions lost in a row before giving up for now.
const ALLOCATION_ATTEMPTS: u32 = 8;

/// Services allocated per transaction (etcd allows 128 operations).
const ALLOCATION_BATCH: usize = 100;

/// Keys per snapshot page.
const SNAPSHOT_PAGE: i64 = 2000;

/// Largest gRPC message accepted: one watch response can carry a whole
/// revision, e.g. a prefix delete of every instance of a big service.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A catalog kept in etcd under a prefix.
pub struct EtcdStore {
    config: EtcdConfig,
    /// The prefix with a trailing '/', as keys are matched.
    prefix: String,
    endpoints: String,
    client: Mutex<Option<Client>>,
}

/// How one connected stretch of watching ended.
enum WatchEnd {
    /// The receiver went away: stop.
    Closed,
    /// The history we needed is compacted: take a fresh snapshot now.
    Compacted,
}

impl EtcdStore {
    /// A store for these endpoints and prefix; no connection is made yet.
    pub fn new(config: EtcdConfig, prefix: &str) -> Result<Self, StoreError> {
        Ok(EtcdStore {
            endpoints: config.endpoints.join(","),
            prefix: format!("{}/", prefix.trim_end_matches('/')),
            config,
            client: Mutex::new(None),
        })
    }

    /// The full key for a key relative to the prefix.
    pub fn full_key(&self, relative: &str) -> String {
        format!("{}{relative}", self.prefix)
    }

    /// A connected client, reusing the last one until it fails.
    pub async fn client(&self) -> Result<Client, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.config.dial_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if let Some(user) = &self.config.username {
            let password = match (&self.config.password, &self.config.password_file) {
                (Some(password), _) => password.clone(),
                (None, Some(path)) => std::fs::read_to_string(path)
                    .map(|text| text.trim_end().to_string())
                    .map_err(|source| StoreError::Credentials {
                        path: path.clone(),
                        source,
                    })?,
                (None, None) => String::new(),
            };
            options = options.with_user(user.clone(), password);
        }
        if let Some(tls) = &self.config.tls {
            options = options.with_tls(self.tls_options(tls)?);
        }
        let client = self
            .timed(Client::connect(&self.config.endpoints, Some(options)))
            .await?;
        *slot = Some(client.clone());
        Ok(client)
    }

    fn tls_options(&self, tls: &crate::config::EtcdTlsConfig) -> Result<etcd_client::TlsOptions, StoreError> {
        let read = |path: &std::path::PathBuf| {
            std::fs::read(path).map_err(|source| StoreError::Credentials {
                path: path.clone(),
                source,
            })
        };
        let mut options = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca_file)?));
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            options = options.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &tls.server_name {
            options = options.domain_name(name.clone());
        }
        Ok(options)
    }

    /// Forgets the client so the next call reconnects.
    pub async fn reset(&self) {
        *self.client.lock().await = None;
    }

    /// Runs an etcd call with the request timeout, naming the endpoints on error.
    pub async fn timed<T>(
        &self,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.config.request_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(self.etcd_error(&err)),
            Err(_) => Err(StoreError::Timeout {
                endpoints: self.endpoints.clone(),
                timeout: self.config.request_timeout,
            }),
        }
    }

    fn etcd_error(&self, err: &etcd_client::Error) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints.clone(),
            reason: describe_etcd_error(err),
        }
    }

    fn watch_error(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Watch {
            endpoints: self.endpoints.clone(),
            reason: reason.into(),
        }
    }

    /// Strips the prefix; `None` for a key that is not valid UTF-8.
    fn relative(&self, key: &[u8]) -> Option<String> {
        let text = std::str::from_utf8(key).ok()?;
        text.strip_prefix(&self.prefix).map(str::to_string)
    }

    /// Watches from `*resume + 1`, sending changes and advancing `*resume`.
    async fn watch_from(
        &self,
        resume: &mut i64,
        events: &mpsc::Sender<StoreEvent>,
        backoff: &mut Backoff,
        reachable: &mut bool,
    ) -> Result<WatchEnd, StoreError> {
        let mut client = self.client().await?;
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(*resume + 1)
            .with_progress_notify();
        let stream = self
            .timed(client.watch(self.prefix.as_str(), Some(options)))
            .await?;
        let (_requests, mut responses) = stream.split();
        loop {
            let message = tokio::select! {
                message = responses.message() => message,
                () = events.closed() => return Ok(WatchEnd::Closed),
            };
            let response = message
                .map_err(|err| self.etcd_error(&err))?
                .ok_or_else(|| self.watch_error("watch stream closed by the server"))?;
            if response.compact_revision() > 0 {
                tracing::warn!(
                    "etcd compacted revision {} before the watch resumed at {}; taking a fresh snapshot",
                    response.compact_revision(),
                    *resume + 1
                );
                metrics::counter!("loopmesh_store_resyncs_total", "reason" => "compacted").increment(1);
                return Ok(WatchEnd::Compacted);
            }
            if response.canceled() {
                return Err(self.watch_error(format!("watch canceled: {}", response.cancel_reason())));
            }
            if response.created() {
                backoff.reset();
                if !*reachable {
                    tracing::info!(
                        "catalog reachable again ({}); resuming at revision {}",
                        self.describe(),
                        *resume + 1
                    );
                }
                *reachable = true;
                if events.send(StoreEvent::Reachable).await.is_err() {
                    return Ok(WatchEnd::Closed);
                }
            }
            for (revision, changes) in self.group_by_revision(response.events()) {
                *resume = revision;
                if events
                    .send(StoreEvent::Changes { revision, changes })
                    .await
                    .is_err()
                {
                    return Ok(WatchEnd::Closed);
                }
            }
        }
    }

    /// Splits a watch response into per-revision batches, in order.
    fn group_by_revision(&self, events: &[etcd_client::Event]) -> Vec<(i64, Vec<Change>)> {
        let mut batches: Vec<(i64, Vec<Change>)> = Vec::new();
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let revision = kv.mod_revision();
            let Some(key) = self.relative(kv.key()) else {
                tracing::warn!("skipping etcd key that is not UTF-8 under {}", self.prefix);
                continue;
            };
            let change = match event.event_type() {
                EventType::Put => Change::Put(Entry {
                    key,
                    value: kv.value().to_vec(),
                    create_revision: kv.create_revision(),
                }),
                EventType::Delete => Change::Delete(key),
            };
            match batches.last_mut() {
                Some((last, changes)) if *last == revision => changes.push(change),
                _ => batches.push((revision, vec![change])),
            }
        }
        batches
    }
}

/// An etcd client error in one short line: the gRPC message and, when there
/// is one, the operating system's reason (connection refused, timed out...).
fn describe_etcd_error(err: &etcd_client::Error) -> String {
    let head = match err {
        etcd_client::Error::GRpcStatus(status) => status.message().to_string(),
        other => other.to_string(),
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return format!("{head}: {io}");
        }
        cause = current.source();
    }
    head
}

impl Store for EtcdStore {
    async fn sync(&self, events: mpsc::Sender<StoreEvent>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.config.retry_max);
        // The last revision delivered; None until a snapshot went out.
        let mut resume: Option<i64> = None;
        let mut reachable = true;
        loop {
            let outcome = match resume {
                None => match self.snapshot().await {
                    Ok((revision, entries)) => {
                        resume = Some(revision);
                        if events
                            .send(StoreEvent::Snapshot { revision, entries })
                            .await
                            .is_err()
                        {
                            return;
                        }
                        continue;
                    }
                    Err(err) => Err(err),
                },
                Some(ref mut revision) => {
                    self.watch_from(revision, &events, &mut backoff, &mut reachable)
                        .await
                }
            };
            match outcome {
                Ok(WatchEnd::Closed) => return,
                Ok(WatchEnd::Compacted) => resume = None,
                Err(err) => {
                    let reason = err.to_string();
                    if reachable {
                        tracing::warn!(
                            "catalog unreachable: {reason}; keeping the last known good state and retrying"
                        );
                    }
                    reachable = false;
                    metrics::counter!("loopmesh_store_errors_total").increment(1);
                    self.reset().await;
                    if events.send(StoreEvent::Unreachable { reason }).await.is_err() {
                        return;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                        () = events.closed() => return,
                    }
                }
            }
        }
    }

    async fn snapshot(&self) -> Result<(i64, Vec<Entry>), StoreError> {
        // Paged reads pinned to the first page's revision: one consistent
        // view, without one response holding the whole catalog.
        let mut kv = self
            .client()
            .await?
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let end = prefix_end(self.prefix.as_bytes());
        let mut start = self.prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut entries = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(SNAPSHOT_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let page = self.timed(kv.get(start.clone(), Some(options))).await?;
            if revision == 0 {
                revision = page.header().map(|h| h.revision()).unwrap_or_default();
            }
            entries.extend(page.kvs().iter().filter_map(|kv| {
                Some(Entry {
                    key: self.relative(kv.key())?,
                    value: kv.value().to_vec(),
                    create_revision: kv.create_revision(),
                })
            }));
            match page.kvs().last() {
                Some(last) if page.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok((revision, entries)),
            }
        }
    }

    async fn allocate_addresses(
        &self,
        services: &[String],
        pool: &AddressPool,
    ) -> Result<BTreeMap<String, Ipv4Addr>, StoreError> {
        let dir = self.full_key("addresses/");
        let mut allocated = BTreeMap::new();
        for chunk in services.chunks(ALLOCATION_BATCH) {
            let mut attempts = 0;
            loop {
                let mut kv = self
                    .client()
                    .await?
                    .kv_client()
                    .max_decoding_message_size(MAX_MESSAGE);
                let current = self
                    .timed(kv.get(dir.as_str(), Some(GetOptions::new().with_prefix())))
                    .await?;
                let revision = current.header().map(|h| h.revision()).unwrap_or_default();
                let mut existing = HashMap::new();
                let mut taken = HashSet::new();
                for kv in current.kvs() {
                    let value = String::from_utf8_lossy(kv.value());
                    let parsed = parse_service_address(&value);
                    taken.extend(parsed.as_ref().ok().copied());
                    existing.insert(kv.key().to_vec(), parsed);
                }
                let mut compares =
                    vec![Compare::mod_revision(dir.as_str(), CompareOp::Less, revision + 1).with_prefix()];
                let mut puts = Vec::new();
                let mut picked = Vec::new();
                for service in chunk {
                    let key = format!("{dir}{service}");
                    match existing.get(key.as_bytes()) {
                        Some(Ok(addr)) => {
                            allocated.insert(service.clone(), *addr);
                        }
                        Some(Err(_)) => {
                            tracing::warn!(
                                "{}",
                                StoreError::BadAddressValue {
                                    service: service.clone(),
                                    key
                                }
                            );
                        }
                        None => {
                            let candidate =
                                pool.pick(service, &taken).map_err(|source| StoreError::Address {
                                    service: service.clone(),
                                    source,
                                })?;
                            taken.insert(candidate);
                            compares.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
                            puts.push(TxnOp::put(key.as_str(), candidate.to_string(), None));
                            picked.push((service.clone(), candidate));
                        }
                    }
                }
                if puts.is_empty() {
                    break;
                }
                // Commit only if every key is still absent and no address key
                // changed since our read: then nobody took a candidate meanwhile.
                let txn = Txn::new().when(compares).and_then(puts);
                if self.timed(kv.txn(txn)).await?.succeeded() {
                    for (service, candidate) in picked {
                        tracing::info!("allocated {candidate} to service {service}");
                        allocated.insert(service, candidate);
                    }
                    break;
                }
                metrics::counter!("loopmesh_address_allocation_retries_total").increment(1);
                attempts += 1;
                if attempts >= ALLOCATION_ATTEMPTS {
                    return Err(StoreError::Contended {
                        service: chunk.join(", "),
                        attempts,
                    });
                }
            }
        }
        Ok(allocated)
    }

    fn describe(&self) -> String {
        format!(
            "etcd {} prefix {}",
            self.endpoints,
            self.prefix.trim_end_matches('/')
        )
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/lm/"), b"/lm0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
