//! What the agent shows through its admin API: readiness and JSON views of
//! its routes, catalog and rendered files. The control loop publishes into
//! it after every pass; the admin server reads it whenever asked.

use crate::admin::Status;
use crate::proxy::tunnel::MeshStatus;
use crate::proxy::ProxyView;
use std::path::PathBuf;
use std::sync::Mutex;

/// The agent's published state.
pub struct AgentStatus {
    inner: Mutex<Published>,
    /// Files the agent renders (the routes directory counts as one).
    files: Vec<PathBuf>,
}

/// One pass's worth of state, replaced as the control loop moves on.
#[derive(Clone, Default)]
pub struct Published {
    pub node: String,
    pub store: String,
    /// A routing table is applied: rendered, or the last known good on
    /// disk at start (stale until the store answers).
    pub applied: bool,
    pub stale: bool,
    pub revision: i64,
    pub services: usize,
    pub invalid_keys: Vec<String>,
    /// Render failures of the last pass, one line each.
    pub render_failures: Vec<String>,
    /// The data plane, when the proxy is on.
    pub proxy: Option<ProxyView>,
    /// The DNS server, when on.
    pub dns: Option<DnsStatus>,
    /// mTLS between nodes, when configured.
    pub mesh: Option<MeshStatus>,
}

/// A certificate closer than this to its end is named in `/ready`.
const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(14 * 86_400);

#[derive(Clone, Debug)]
pub struct DnsStatus {
    pub listen: std::net::SocketAddr,
    pub listening: bool,
    pub serial: Option<u32>,
    pub records: usize,
}

impl AgentStatus {
    pub fn new(files: Vec<PathBuf>) -> Self {
        AgentStatus {
            inner: Mutex::new(Published::default()),
            files,
        }
    }

    /// Replaces what is shown.
    pub fn publish(&self, published: Published) {
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = published;
    }

    fn current(&self) -> Published {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn files_json(&self) -> serde_json::Value {
        let mut files = Vec::new();
        for path in &self.files {
            let entries: Vec<PathBuf> = if path.is_dir() {
                let mut inside: Vec<PathBuf> = std::fs::read_dir(path)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|entry| entry.path())
                    .filter(|p| {
                        !p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                    })
                    .collect();
                inside.sort();
                inside
            } else {
                vec![path.clone()]
            };
            for file in entries {
                let meta = std::fs::metadata(&file).ok();
                let modified = meta
                    .as_ref()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs());
                files.push(serde_json::json!({
                    "path": file.display().to_string(),
                    "exists": meta.is_some(),
                    "bytes": meta.as_ref().map(|m| m.len()),
                    "modified_unix": modified,
                }));
            }
        }
        serde_json::Value::Array(files)
    }
}

impl Status for AgentStatus {
    fn ready(&self) -> (bool, serde_json::Value) {
        let now = self.current();
        let failed: serde_json::Map<String, serde_json::Value> = now
            .proxy
            .as_ref()
            .map(ProxyView::failed)
            .unwrap_or_default()
            .into_iter()
            .map(|(service, error)| (service, error.into()))
            .collect();
        let dns_ok = now.dns.as_ref().is_none_or(|dns| dns.listening);
        let mut reasons = Vec::new();
        if !now.applied {
            reasons.push("no routing table applied yet (waiting for the first render)".to_string());
        }
        if !failed.is_empty() {
            reasons.push(format!("{} service(s) cannot listen", failed.len()));
        }
        if !dns_ok {
            reasons.push("the DNS server cannot listen".to_string());
        }
        let mesh = now.mesh.as_ref().map(|mesh| {
            let (identity, expires) = mesh.credentials();
            let until = crate::proxy::tls::identity::format_utc(expires);
            let left = expires
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            let warning = if left.is_zero() {
                reasons.push(format!("the mesh certificate of {identity} expired at {until}"));
                Some("expired: issue a new certificate".to_string())
            } else if left < EXPIRY_WARNING {
                Some(format!(
                    "the certificate expires in {} day(s): issue a new one (it is reloaded without a restart)",
                    left.as_secs() / 86_400
                ))
            } else {
                None
            };
            serde_json::json!({
                "identity": identity,
                "listen": mesh.listen.map(|l| l.to_string()),
                "certificate_expires": until,
                "warning": warning,
            })
        });
        let ready = reasons.is_empty();
        let body = serde_json::json!({
            "ready": ready,
            // Which process answers: a takeover moves the admin socket to a
            // new one (`loopmesh reload`, the ansible role wait on it).
            "pid": std::process::id(),
            "reasons": reasons,
            "stale": now.stale,
            "revision": now.revision,
            "store": now.store,
            "failed_listeners": failed,
            "dns": now.dns.as_ref().map(|dns| serde_json::json!({
                "listen": dns.listen.to_string(), "listening": dns.listening, "serial": dns.serial,
            })),
            "mesh": mesh,
        });
        (ready, body)
    }

    fn view(&self, path: &str) -> Option<serde_json::Value> {
        let now = self.current();
        match path {
            "/routes" => Some(
                now.proxy
                    .as_ref()
                    .map_or(serde_json::json!([]), ProxyView::to_json),
            ),
            "/catalog" => Some(serde_json::json!({
                "node": now.node,
                "store": now.store,
                "revision": now.revision,
                "stale": now.stale,
                "services": now.services,
                "invalid_keys": now.invalid_keys,
                "dns": now.dns.as_ref().map(|dns| serde_json::json!({
                    "listen": dns.listen.to_string(), "listening": dns.listening,
                    "serial": dns.serial, "records": dns.records,
                })),
            })),
            "/files" => Some(serde_json::json!({
                "files": self.files_json(),
                "render_failures": now.render_failures,
            })),
            _ => None,
        }
    }

    fn views(&self) -> &'static [(&'static str, &'static str)] {
        &[
            (
                "/routes",
                "every service: address, listener, backends with state and traffic (JSON)",
            ),
            (
                "/catalog",
                "node, store, revision, stale, refused keys, the zone served (JSON)",
            ),
            (
                "/files",
                "the rendered files and the last render's failures (JSON)",
            ),
        ]
    }

    fn metrics(&self, out: &mut crate::telemetry::Exposition<'_>) {
        if let Some(proxy) = self.current().proxy {
            proxy.render_metrics(out);
        }
    }
}
