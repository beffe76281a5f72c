//! The file catalog: the etcd tree as YAML files in a directory.
//!
//! `services/<service>.yaml`, `instances/<service>/<id>.yaml` and
//! `addresses/<service>.yaml` map to the same keys as in etcd. Changes are
//! noticed with notify; each burst of file events triggers a rescan that is
//! diffed against the previous one, so a missed or coalesced inotify event
//! can never leave the catalog out of step with the files.

use super::{Change, Entry, Store, StoreError, StoreEvent};
use crate::addresses::{parse_service_address, AddressPool};
use notify::{RecursiveMode, Watcher};
use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Quiet time after a file event before rescanning, to batch an editor's writes.
const SETTLE: Duration = Duration::from_millis(5);

/// The catalog directories and how deep their keys go.
const TREE: [(&str, usize); 3] = [("services", 0), ("instances", 1), ("addresses", 0)];

/// A catalog kept as files under a directory.
pub struct FileStore {
    dir: PathBuf,
    /// The last revision a previous run served (0: none known); this run
    /// numbers its revisions above it.
    floor: std::sync::atomic::AtomicI64,
    /// Files in the tree that are not catalog values, each logged once.
    skipped: std::sync::Mutex<HashSet<PathBuf>>,
}

/// Content and creation order of each key, as last scanned.
type Scan = BTreeMap<String, Vec<u8>>;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl FileStore {
    pub fn new(dir: PathBuf) -> Self {
        FileStore {
            dir,
            floor: std::sync::atomic::AtomicI64::new(0),
            skipped: Default::default(),
        }
    }

    /// Says once per file that a file in the catalog tree is not read:
    /// only `.yaml` and `.yml` files are values (a `web.json` or `web.txt`
    /// would otherwise be ignored without a word).
    fn warn_skipped(&self, path: &Path) {
        let mut skipped = self.skipped.lock().unwrap_or_else(|e| e.into_inner());
        if skipped.insert(path.to_path_buf()) {
            tracing::warn!(
                "file catalog: {} is not read (catalog values are .yaml or .yml files); rename it to take effect",
                path.display()
            );
        }
    }

    /// Numbers this run's revisions above `revision`, the last one served
    /// from this catalog (the agent reads it from its state record).
    pub fn continue_after(&self, revision: i64) {
        self.floor.fetch_max(revision, Ordering::Relaxed);
    }

    /// The revision of this run's first snapshot. Files carry no revision,
    /// so the catalog's count starts at the clock (seconds since the
    /// epoch, BIND's customary zone serial, fits the SOA's 32 bits until
    /// 2106) and above the last one served: revisions and zone serials
    /// never go backwards across restarts or `render --once`.
    fn first_revision(&self) -> i64 {
        let now = crate::state::now_unix() as i64;
        now.max(self.floor.load(Ordering::Relaxed) + 1)
    }

    /// The catalog directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds a key.
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.yaml"))
    }

    /// Writes a key atomically (stage beside it, then rename).
    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let path = self.path_of(key);
        let staged = self.stage(&path, value)?;
        std::fs::rename(&staged, &path).map_err(|source| {
            let _ = std::fs::remove_file(&staged);
            StoreError::Write { path, source }
        })
    }

    /// Removes a key; absent keys are fine.
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of(key);
        match std::fs::remove_file(&path) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::Write { path, source })
            }
            _ => Ok(()),
        }
    }

    /// Writes `value` to a hidden file beside `path` (ignored by scans).
    fn stage(&self, path: &Path, value: &[u8]) -> Result<PathBuf, StoreError> {
        let parent = path.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent).map_err(|source| StoreError::Write {
            path: parent.to_path_buf(),
            source,
        })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let staged = parent.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&staged, value).map_err(|source| StoreError::Write {
            path: staged.clone(),
            source,
        })?;
        Ok(staged)
    }

    /// Reads every catalog file into a key -> value map.
    fn scan(&self) -> Result<Scan, StoreError> {
        // A catalog directory that is gone (unmounted, renamed, deleted) is
        // an unreadable catalog, never an empty one.
        if !self.dir.is_dir() {
            return Err(StoreError::Read {
                path: self.dir.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "the catalog directory is missing"),
            });
        }
        let mut scan = Scan::new();
        for (top, depth) in TREE {
            self.scan_dir(&self.dir.join(top), top, depth, &mut scan)?;
        }
        Ok(scan)
    }

    fn scan_dir(&self, dir: &Path, key: &str, depth: usize, scan: &mut Scan) -> Result<(), StoreError> {
        let read_err = |source| StoreError::Read {
            path: dir.to_path_buf(),
            source,
        };
        let listing = match std::fs::read_dir(dir) {
            Ok(listing) => listing,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(read_err(err)),
        };
        for item in listing {
            let item = item.map_err(read_err)?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = item.path();
            let is_dir = item.file_type().map_err(read_err)?.is_dir();
            if depth > 0 && is_dir {
                self.scan_dir(&path, &format!("{key}/{name}"), depth - 1, scan)?;
            } else if depth == 0 && !is_dir {
                let Some(stem) = name.strip_suffix(".yaml").or_else(|| name.strip_suffix(".yml")) else {
                    self.warn_skipped(&path);
                    continue;
                };
                match std::fs::read(&path) {
                    Ok(value) => {
                        scan.insert(format!("{key}/{stem}"), value);
                    }
                    // Removed between listing and reading: it is simply gone.
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(StoreError::Read { path, source }),
                }
            }
        }
        Ok(())
    }
}

/// Watches `dir` and sends on `wake` whenever something in it may have
/// changed (see [`is_change`]); keep the watcher alive as long as needed.
/// Shared by the file catalog and static mode.
pub fn watch_changes(
    dir: &Path,
    mode: RecursiveMode,
    wake: mpsc::UnboundedSender<()>,
) -> Result<notify::RecommendedWatcher, StoreError> {
    let notify_err = |source| StoreError::Notify {
        path: dir.to_path_buf(),
        source,
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if is_change(&event) {
            let _ = wake.send(());
        }
    })
    .map_err(notify_err)?;
    watcher.watch(dir, mode).map_err(notify_err)?;
    Ok(watcher)
}

/// Whether a notify event may mean a file changed. Opens and reads are not:
/// inotify reports the watcher's own scans as opens, and reacting to them
/// would rescan forever. Errors count, so a rescan settles any doubt.
fn is_change(event: &notify::Result<notify::Event>) -> bool {
    match event {
        Ok(event) => !matches!(
            event.kind,
            notify::EventKind::Access(notify::event::AccessKind::Open(_) | notify::event::AccessKind::Read)
                | notify::EventKind::Access(notify::event::AccessKind::Close(
                    notify::event::AccessMode::Read
                ))
        ),
        Err(_) => true,
    }
}

/// The changes that turn `old` into `new`, with creation revisions.
fn diff(old: &Scan, new: &Scan, created: &mut BTreeMap<String, i64>, revision: i64) -> Vec<Change> {
    let mut changes: Vec<Change> = old
        .keys()
        .filter(|key| !new.contains_key(*key))
        .map(|key| {
            created.remove(key);
            Change::Delete(key.clone())
        })
        .collect();
    for (key, value) in new {
        if old.get(key) != Some(value) {
            let create_revision = *created.entry(key.clone()).or_insert(revision);
            changes.push(Change::Put(Entry {
                key: key.clone(),
                value: value.clone(),
                create_revision,
            }));
        }
    }
    changes
}

impl FileStore {
    fn allocate_one(
        &self,
        service: &str,
        pool: &AddressPool,
        scan: &Scan,
        taken: &mut HashSet<Ipv4Addr>,
    ) -> Result<Ipv4Addr, StoreError> {
        let key = format!("addresses/{service}");
        let path = self.path_of(&key);
        let bad_value = || StoreError::BadAddressValue {
            service: service.to_string(),
            key: path.display().to_string(),
        };
        if let Some(value) = scan.get(&key) {
            return parse_service_address(&String::from_utf8_lossy(value)).map_err(|_| bad_value());
        }
        let candidate = pool.pick(service, taken).map_err(|source| StoreError::Address {
            service: service.to_string(),
            source,
        })?;
        // hard_link refuses to replace an existing file: create-if-absent.
        let staged = self.stage(&path, format!("{candidate}\n").as_bytes())?;
        let linked = std::fs::hard_link(&staged, &path);
        let _ = std::fs::remove_file(&staged);
        match linked {
            Ok(()) => {
                tracing::info!("allocated {candidate} to service {service} in {}", path.display());
                taken.insert(candidate);
                Ok(candidate)
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = std::fs::read_to_string(&path).map_err(|source| StoreError::Read {
                    path: path.clone(),
                    source,
                })?;
                parse_service_address(&text).map_err(|_| bad_value())
            }
            Err(source) => Err(StoreError::Write { path, source }),
        }
    }
}

impl Store for FileStore {
    async fn sync(&self, events: mpsc::Sender<StoreEvent>) {
        let (wake_tx, mut wake) = mpsc::unbounded_channel();
        // Keep the watcher alive for the whole sync; without it, rescans on a timer.
        let watch = || match watch_changes(&self.dir, RecursiveMode::Recursive, wake_tx.clone()) {
            Ok(watcher) => Some(watcher),
            Err(err) => {
                tracing::error!("{err}; rescanning the file catalog every second instead");
                None
            }
        };
        let mut _watcher = if self.dir.is_dir() { watch() } else { None };
        let mut revision = self.first_revision() - 1;
        let mut current: Option<Scan> = None;
        let mut created = BTreeMap::new();
        // The last scan failed: rescan every second (a directory that comes
        // back is not watched by the watcher set up on the one that went).
        let mut failing = false;
        loop {
            match self.scan() {
                Ok(scan) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("file catalog {} readable again", self.dir.display());
                        // The directory may be a new one: watch it afresh.
                        _watcher = watch();
                    }
                    let event = match &current {
                        None => {
                            revision += 1;
                            created = scan.keys().map(|k| (k.clone(), revision)).collect();
                            let entries = scan
                                .iter()
                                .map(|(key, value)| Entry {
                                    key: key.clone(),
                                    value: value.clone(),
                                    create_revision: revision,
                                })
                                .collect();
                            Some(StoreEvent::Snapshot { revision, entries })
                        }
                        Some(old) => {
                            let changes = diff(old, &scan, &mut created, revision + 1);
                            (!changes.is_empty()).then(|| {
                                revision += 1;
                                StoreEvent::Changes { revision, changes }
                            })
                        }
                    };
                    current = Some(scan);
                    if let Some(event) = event {
                        if events.send(event).await.is_err() {
                            return;
                        }
                    }
                }
                Err(err) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!("file catalog scan failed: {err}; keeping the previous catalog, rescanning every second");
                    }
                    let reason = err.to_string();
                    if events.send(StoreEvent::Unreachable { reason }).await.is_err() {
                        return;
                    }
                }
            }
            // Wait for a file event (or a timer if notify is unavailable), then settle.
            let woke = tokio::select! {
                woke = wake.recv() => woke.is_some(),
                () = tokio::time::sleep(Duration::from_secs(1)), if _watcher.is_none() || failing => true,
                () = events.closed() => return,
            };
            if !woke {
                return;
            }
            tokio::time::sleep(SETTLE).await;
            while wake.try_recv().is_ok() {}
        }
    }

    async fn snapshot(&self) -> Result<(i64, Vec<Entry>), StoreError> {
        let entries = self
            .scan()?
            .into_iter()
            .map(|(key, value)| Entry {
                key,
                value,
                create_revision: 1,
            })
            .collect();
        Ok((self.first_revision(), entries))
    }

    async fn allocate_addresses(
        &self,
        services: &[String],
        pool: &AddressPool,
    ) -> Result<BTreeMap<String, Ipv4Addr>, StoreError> {
        let mut scan = Scan::new();
        self.scan_dir(&self.dir.join("addresses"), "addresses", 0, &mut scan)?;
        let mut taken: HashSet<Ipv4Addr> = scan
            .values()
            .filter_map(|value| parse_service_address(&String::from_utf8_lossy(value)).ok())
            .collect();
        let mut allocated = BTreeMap::new();
        for service in services {
            match self.allocate_one(service, pool, &scan, &mut taken) {
                Ok(addr) => {
                    allocated.insert(service.clone(), addr);
                }
                Err(err @ StoreError::BadAddressValue { .. }) => tracing::warn!("{err}"),
                Err(err) => return Err(err),
            }
        }
        Ok(allocated)
    }

    fn describe(&self) -> String {
        format!("file catalog {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next(rx: &mut mpsc::Receiver<StoreEvent>) -> StoreEvent {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("store event within 10s")
            .expect("store still running")
    }

    #[tokio::test]
    async fn snapshot_then_changes_follow_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(FileStore::new(dir.path().to_path_buf()));
        store.put("services/pg", b"port: 5432\n").unwrap();
        std::fs::write(dir.path().join("services/notes.txt"), "ignored").unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let runner = store.clone();
        let task = tokio::spawn(async move { runner.sync(tx).await });

        match next(&mut rx).await {
            StoreEvent::Snapshot { entries, .. } => {
                assert_eq!(entries.len(), 1);
                assert_eq!(entries[0].key, "services/pg");
            }
            other => panic!("expected a snapshot, got {other:?}"),
        }
        store
            .put("instances/pg/a", b"{host: 10.0.0.1, port: 5432}")
            .unwrap();
        match next(&mut rx).await {
            StoreEvent::Changes { changes, .. } => {
                assert!(matches!(&changes[..], [Change::Put(e)] if e.key == "instances/pg/a"));
            }
            other => panic!("expected changes, got {other:?}"),
        }
        store.delete("services/pg").unwrap();
        match next(&mut rx).await {
            StoreEvent::Changes { changes, .. } => {
                assert_eq!(changes, vec![Change::Delete("services/pg".into())]);
            }
            other => panic!("expected changes, got {other:?}"),
        }
        drop(rx);
        store.put("services/x", b"port: 1").unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn own_reads_are_not_changes() {
        use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
        use notify::{Event, EventKind};
        let event = |kind| Ok(Event::new(kind));
        assert!(!is_change(&event(EventKind::Access(AccessKind::Open(
            AccessMode::Any
        )))));
        assert!(!is_change(&event(EventKind::Access(AccessKind::Close(
            AccessMode::Read
        )))));
        assert!(is_change(&event(EventKind::Access(AccessKind::Close(
            AccessMode::Write
        )))));
        assert!(is_change(&event(EventKind::Create(CreateKind::File))));
        assert!(is_change(&event(EventKind::Modify(ModifyKind::Any))));
        assert!(is_change(&Err(notify::Error::generic("queue overflow"))));
    }

    #[tokio::test]
    async fn allocation_is_create_if_absent() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().to_path_buf());
        let pool = AddressPool::parse("127.100.0.0/24").unwrap();
        let first = store.allocate_address("pg", &pool).await.unwrap();
        assert_eq!(store.allocate_address("pg", &pool).await.unwrap(), first);
        let other = store.allocate_address("redis", &pool).await.unwrap();
        assert_ne!(first, other);
        store.put("addresses/pinned", b"127.100.0.200").unwrap();
        assert_eq!(
            store.allocate_address("pinned", &pool).await.unwrap(),
            Ipv4Addr::new(127, 100, 0, 200)
        );
    }
}
