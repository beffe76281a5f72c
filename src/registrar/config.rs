//! The registrar's configuration: the store, the lease, and the local
//! backends to check, inline or one file each in a conf.d-style directory.

use crate::catalog::{check_instance_id, check_service_name, parse_instance, Instance, InstanceState, Label};
use crate::config::{
    read_yaml, resolve, resolve_store_paths, validate_store, AdminConfig, ConfigError, Overrides, StoreConfig,
};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why an operator's state flag was not written.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    #[error("cannot check {id} against the backends of {config}: {source}; no flag written")]
    Backends {
        id: String,
        config: String,
        source: ConfigError,
    },
    #[error(
        "instance id {id:?} is not one of the backends of {config} on node {node} ({known}); no flag written"
    )]
    UnknownId {
        id: String,
        config: String,
        node: String,
        known: String,
    },
    #[error("cannot write the flag for {id} in {dir}: {source}")]
    Write {
        id: String,
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// `registrar.yaml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrarConfig {
    /// Node name written into every instance (default: hostname).
    pub node: Option<String>,
    /// The node's zone, the default zone of its instances.
    pub zone: Option<String>,
    /// The node agent's mesh (mTLS) inbound address (its `mesh.listen`):
    /// written into the instances of backends that listen on loopback, so
    /// other nodes reach them through the mesh.
    pub mesh: Option<std::net::SocketAddr>,
    pub store: StoreConfig,
    /// TTL of the etcd lease all registrations live under: how long they
    /// outlive a registrar, node or network that died.
    #[serde(with = "crate::duration")]
    pub lease_ttl: Duration,
    /// On SIGTERM, how long instances stay registered as draining before
    /// they are deleted.
    #[serde(with = "crate::duration")]
    pub drain_period: Duration,
    /// A directory of service files (`*.yaml`, `*.yml`, `*.json`), one
    /// backend each, followed without a restart.
    pub services_dir: Option<PathBuf>,
    /// Backends listed in this file.
    pub services: Vec<ServiceCheck>,
    /// Where operators' state flags live (`flags/<instance-id>`).
    pub state_dir: PathBuf,
    /// /metrics, /live, /ready and /instances (default 127.0.0.1:9902).
    pub admin: AdminConfig,
    /// Log level or filter (`debug`); RUST_LOG wins.
    pub log_level: Option<String>,
}

/// The registrar's admin port (next to the agent's).
pub const REGISTRAR_ADMIN_PORT: u16 = 9902;

impl Default for RegistrarConfig {
    fn default() -> Self {
        RegistrarConfig {
            node: None,
            zone: None,
            mesh: None,
            store: StoreConfig::default(),
            lease_ttl: Duration::from_secs(10),
            drain_period: Duration::from_secs(10),
            services_dir: None,
            services: Vec::new(),
            state_dir: PathBuf::from("/var/lib/loopmesh/registrar"),
            admin: AdminConfig::on_port(REGISTRAR_ADMIN_PORT),
            log_level: None,
        }
    }
}

/// One local backend and how to check it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceCheck {
    pub service: String,
    #[serde(default = "default_host")]
    pub host: String,
    pub port: u16,
    /// Instance id (default `<node>-<port>`).
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Default: the registrar's zone.
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub check: CheckConfig,
}

fn default_host() -> String {
    "127.0.0.1".into()
}

fn default_weight() -> u32 {
    1
}

/// How and how often a backend is checked. With no kind given, a TCP connect.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckConfig {
    pub tcp: Option<TcpCheck>,
    pub http: Option<HttpCheck>,
    pub exec: Option<ExecCheck>,
    #[serde(with = "crate::duration")]
    pub interval: Duration,
    #[serde(with = "crate::duration")]
    pub timeout: Duration,
    /// Passes in a row that make a backend healthy (and registered).
    pub rise: u32,
    /// Failures in a row that make it unhealthy (and deregistered).
    pub fall: u32,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            tcp: None,
            http: None,
            exec: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    #[serde(default = "default_path")]
    pub path: String,
    /// Expected status (default 200).
    #[serde(default = "default_status")]
    pub status: u16,
    /// A substring the body must contain.
    #[serde(default)]
    pub body: Option<String>,
}

fn default_path() -> String {
    "/".into()
}

fn default_status() -> u16 {
    200
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecCheck {
    /// Run with `sh -c`; exit 0 is healthy.
    pub command: String,
}

/// The kind of check, resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    Tcp,
    Http(HttpCheck),
    Exec(ExecCheck),
}

impl CheckConfig {
    pub fn kind(&self) -> CheckKind {
        match (&self.http, &self.exec) {
            (Some(http), _) => CheckKind::Http(http.clone()),
            (None, Some(exec)) => CheckKind::Exec(exec.clone()),
            (None, None) => CheckKind::Tcp,
        }
    }
}

/// A backend as the registrar runs it: where it is registered and what.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub service: String,
    pub id: String,
    /// The instance as registered while up (state set per flags).
    pub instance: Instance,
    pub check: CheckConfig,
}

impl Backend {
    /// `<service>/<id>`, the key below `<prefix>/instances/`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.service, self.id)
    }

    /// The instance with `state`.
    pub fn with_state(&self, state: InstanceState) -> Instance {
        Instance {
            state,
            ..self.instance.clone()
        }
    }

    /// What an edit changed from `old` to this, one `field old -> new` each,
    /// for the log line that says a backend was updated in place.
    pub fn changes_from(&self, old: &Backend) -> Vec<String> {
        fn join(tags: &[Label]) -> String {
            tags.iter().map(Label::as_str).collect::<Vec<_>>().join(", ")
        }
        fn optional(value: &Option<Label>) -> String {
            value.as_deref().unwrap_or("none").to_string()
        }
        let (was, now) = (&old.instance, &self.instance);
        let (was_check, now_check) = (&old.check, &self.check);
        let fields = [
            ("host", was.host.clone(), now.host.clone()),
            ("port", was.port.to_string(), now.port.to_string()),
            ("node", optional(&was.node), optional(&now.node)),
            ("zone", optional(&was.zone), optional(&now.zone)),
            (
                "tags",
                format!("[{}]", join(&was.tags)),
                format!("[{}]", join(&now.tags)),
            ),
            ("weight", was.weight.to_string(), now.weight.to_string()),
            (
                "check",
                was_check.kind().to_string(),
                now_check.kind().to_string(),
            ),
            (
                "check.interval",
                crate::duration::format(was_check.interval),
                crate::duration::format(now_check.interval),
            ),
            (
                "check.timeout",
                crate::duration::format(was_check.timeout),
                crate::duration::format(now_check.timeout),
            ),
            (
                "check.rise",
                was_check.rise.to_string(),
                now_check.rise.to_string(),
            ),
            (
                "check.fall",
                was_check.fall.to_string(),
                now_check.fall.to_string(),
            ),
        ];
        fields
            .into_iter()
            .filter(|(_, before, after)| before != after)
            .map(|(field, before, after)| format!("{field} {before} -> {after}"))
            .collect()
    }
}

/// How a check reads in a log line: `tcp`, `http /health 200 body "ok"`,
/// `exec "pg_isready -q"`.
impl std::fmt::Display for CheckKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckKind::Tcp => write!(f, "tcp"),
            CheckKind::Http(http) => {
                write!(f, "http {} {}", http.path, http.status)?;
                match &http.body {
                    Some(body) => write!(f, " body {body:?}"),
                    None => Ok(()),
                }
            }
            CheckKind::Exec(exec) => write!(f, "exec {:?}", exec.command),
        }
    }
}

impl RegistrarConfig {
    /// Loads the file, applies flags, resolves paths and validates the store
    /// and the inline services.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config: RegistrarConfig = read_yaml(path)?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        resolve_store_paths(&mut config.store, &base);
        config.state_dir = resolve(&base, &config.state_dir);
        config.services_dir = config.services_dir.as_deref().map(|dir| resolve(&base, dir));
        overrides.apply_store(&mut config.store);
        if let Some(node) = &overrides.node {
            config.node = Some(node.clone());
        }
        if let Some(listen) = overrides.admin_listen {
            config.admin.listen = listen;
        }
        let origin = path.display().to_string();
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            origin: origin.clone(),
            field: field.into(),
            reason,
        };
        validate_store(&config.store).map_err(|(field, reason)| invalid(field, reason))?;
        crate::config::validate_log_level(config.log_level.as_deref())
            .map_err(|reason| invalid("log_level", reason))?;
        if config.lease_ttl < Duration::from_secs(2) {
            return Err(invalid(
                "lease_ttl",
                "must be at least 2s (etcd's minimum is about 1s, keep-alives go at a third)".into(),
            ));
        }
        for (index, service) in config.services.iter().enumerate() {
            config
                .backend(service)
                .map_err(|reason| invalid(&format!("services[{index}]"), reason))?;
        }
        Ok(config)
    }

    /// The node name: configured, or the machine's hostname.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(crate::config::hostname)
    }

    /// Where operators' state flags live.
    pub fn flags_dir(&self) -> PathBuf {
        self.state_dir.join("flags")
    }

    /// Validates one service entry into the backend the registrar runs.
    pub fn backend(&self, service: &ServiceCheck) -> Result<Backend, String> {
        check_service_name(&service.service).map_err(|err| err.to_string())?;
        let id = service
            .id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", self.node_name(), service.port));
        check_instance_id(&id).map_err(|err| err.to_string())?;
        let check = &service.check;
        let kinds = [check.tcp.is_some(), check.http.is_some(), check.exec.is_some()];
        if kinds.iter().filter(|k| **k).count() > 1 {
            return Err("check: give one of tcp, http or exec".into());
        }
        if check.interval.is_zero() || check.timeout.is_zero() {
            return Err("check: interval and timeout must be more than 0".into());
        }
        if check.rise == 0 || check.fall == 0 {
            return Err("check: rise and fall must be at least 1".into());
        }
        if let Some(http) = &check.http {
            if !http.path.starts_with('/') {
                return Err(format!("check.http.path {:?} must start with /", http.path));
            }
        }
        let instance = Instance {
            host: service.host.clone(),
            port: service.port,
            node: Some(Label::new(&self.node_name())),
            zone: service.zone.as_deref().or(self.zone.as_deref()).map(Label::new),
            tags: service.tags.iter().map(|tag| Label::new(tag)).collect(),
            weight: service.weight,
            state: InstanceState::Up,
            mesh: self.mesh.filter(|_| {
                service
                    .host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
            }),
        };
        // The same validation the agents apply when they read it back.
        let value = serde_json::to_vec(&instance).map_err(|err| err.to_string())?;
        parse_instance(&value).map_err(|err| err.to_string())?;
        Ok(Backend {
            service: service.service.clone(),
            id,
            instance,
            check: check.clone(),
        })
    }

    /// Every backend: inline ones, then one per file of `services_dir`
    /// (sorted by name). The first invalid entry fails the whole set, naming
    /// its file, so a bad edit never removes the good ones.
    pub fn backends(&self) -> Result<Vec<Backend>, ConfigError> {
        let mut backends = Vec::new();
        // Where each backend is defined, to name both places of a duplicate.
        let mut origins = Vec::new();
        for (index, service) in self.services.iter().enumerate() {
            origins.push(format!("the registrar config's services[{index}]"));
            backends.push(self.backend(service).map_err(|reason| ConfigError::Invalid {
                origin: "registrar config".into(),
                field: format!("services ({})", service.service),
                reason,
            })?);
        }
        if let Some(dir) = &self.services_dir {
            // A directory not made yet holds no services (the registrar
            // creates it to watch it).
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => Some(entries),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: dir.clone(),
                        source,
                    })
                }
            };
            let mut files: Vec<PathBuf> = entries
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| {
                    let hidden = path
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                    let ext = path.extension().and_then(|e| e.to_str());
                    !hidden && matches!(ext, Some("yaml" | "yml" | "json"))
                })
                .collect();
            files.sort();
            for file in files {
                let service: ServiceCheck = read_yaml(&file)?;
                origins.push(file.display().to_string());
                backends.push(self.backend(&service).map_err(|reason| ConfigError::Invalid {
                    origin: file.display().to_string(),
                    field: "service".into(),
                    reason,
                })?);
            }
        }
        let mut seen = HashMap::new();
        for (backend, origin) in backends.iter().zip(&origins) {
            if let Some(first) = seen.insert(backend.key(), origin) {
                return Err(ConfigError::Invalid {
                    origin: "registrar services".into(),
                    field: backend.key(),
                    reason: format!(
                        "defined in both {first} and {origin}: the same instance id twice; give one of them an `id`"
                    ),
                });
            }
        }
        Ok(backends)
    }
}

impl RegistrarConfig {
    /// Writes an operator's state flag for one of this registrar's backends
    /// (`origin`: the config file, to name it); returns the flags directory.
    ///
    /// An id that is none of them is refused: the registrar reads flags only
    /// for its backends, so such a flag would change nothing, silently.
    pub fn set_flag(&self, origin: &Path, id: &str, state: InstanceState) -> Result<PathBuf, FlagError> {
        let config = origin.display().to_string();
        let backends = self.backends().map_err(|source| FlagError::Backends {
            id: id.to_string(),
            config: config.clone(),
            source,
        })?;
        if !backends.iter().any(|backend| backend.id == id) {
            let known = if backends.is_empty() {
                "it has no backends".to_string()
            } else {
                // An id may serve two services (one flag for both): name it once.
                let mut ids: Vec<&str> = Vec::new();
                for backend in &backends {
                    if !ids.contains(&backend.id.as_str()) {
                        ids.push(&backend.id);
                    }
                }
                format!("known ids: {}", ids.join(", "))
            };
            return Err(FlagError::UnknownId {
                id: id.to_string(),
                config,
                node: self.node_name(),
                known,
            });
        }
        let dir = self.flags_dir();
        write_flag(&dir, id, state).map_err(|source| FlagError::Write {
            id: id.to_string(),
            dir: dir.clone(),
            source,
        })?;
        Ok(dir)
    }
}

/// Reads an operator's state flag for an instance: `maintenance` or
/// `draining` in `<flags_dir>/<id>`; no file is `up`.
pub fn read_flag(flags_dir: &Path, id: &str) -> Result<InstanceState, String> {
    let path = flags_dir.join(id);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            parse_state(text.trim()).map_err(|reason| format!("flag file {}: {reason}", path.display()))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(InstanceState::Up),
        Err(err) => Err(format!("cannot read flag file {}: {err}", path.display())),
    }
}

/// Parses `up`, `draining` or `maintenance`.
pub fn parse_state(text: &str) -> Result<InstanceState, String> {
    match text {
        "up" => Ok(InstanceState::Up),
        "draining" => Ok(InstanceState::Draining),
        "maintenance" => Ok(InstanceState::Maintenance),
        other => Err(format!("state {other:?} is not one of up, draining, maintenance")),
    }
}

/// Writes (or for `up`, removes) an instance's flag file, atomically.
pub fn write_flag(flags_dir: &Path, id: &str, state: InstanceState) -> std::io::Result<()> {
    std::fs::create_dir_all(flags_dir)?;
    let path = flags_dir.join(id);
    let word = match state {
        InstanceState::Up => {
            return match std::fs::remove_file(&path) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
                _ => Ok(()),
            }
        }
        InstanceState::Draining => "draining",
        InstanceState::Maintenance => "maintenance",
    };
    let staged = flags_dir.join(format!(".{id}.tmp"));
    std::fs::write(&staged, format!("{word}\n"))?;
    std::fs::rename(&staged, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(config: &RegistrarConfig, yaml: &str) -> Backend {
        let service: ServiceCheck = crate::yaml::from_str(yaml).unwrap();
        config.backend(&service).unwrap()
    }

    #[test]
    fn changes_name_each_edited_field() {
        let config = RegistrarConfig {
            node: Some("n1".into()),
            ..RegistrarConfig::default()
        };
        let old = backend(&config, "service: web\nport: 8080\ntags: [blue]\n");
        assert_eq!(old.changes_from(&old), Vec::<String>::new());
        let new = backend(
            &config,
            "service: web\nport: 8080\ntags: [blue, canary]\nweight: 5\nzone: z1\ncheck: {http: {path: /health}, interval: 500ms, fall: 1}\n",
        );
        assert_eq!(
            new.changes_from(&old),
            [
                "zone none -> z1",
                "tags [blue] -> [blue, canary]",
                "weight 1 -> 5",
                "check tcp -> http /health 200",
                "check.interval 2s -> 500ms",
                "check.fall 3 -> 1",
            ]
        );
    }

    #[test]
    fn a_loopback_backend_is_announced_with_the_nodes_mesh_address() {
        let config = RegistrarConfig {
            node: Some("n1".into()),
            mesh: Some("10.0.0.5:15008".parse().unwrap()),
            ..RegistrarConfig::default()
        };
        let local = backend(&config, "service: db\nhost: 127.0.0.1\nport: 5432\n");
        assert_eq!(local.instance.mesh, Some("10.0.0.5:15008".parse().unwrap()));
        let routable = backend(&config, "service: db\nhost: 10.0.0.5\nport: 5432\n");
        assert_eq!(routable.instance.mesh, None, "reached directly");
    }
}
