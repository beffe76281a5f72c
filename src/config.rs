//! Agent configuration: strict YAML, documented defaults, flags on top.
//!
//! Unknown fields are errors (a typo must not silently become a default).
//! Relative paths are resolved against the config file's directory, so a
//! config and its templates can travel together. Command-line flags override
//! the file, as in confd.

use crate::addresses::{AddressError, AddressPool};
pub use crate::catalog::KeyKind;
use crate::yaml::{self, YamlError};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config that cannot be read, parsed or accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {source}")]
    Parse { path: PathBuf, source: YamlError },
    #[error("config {origin}: {field}: {reason}")]
    Invalid {
        origin: String,
        field: String,
        reason: String,
    },
}

/// Where the catalog lives: etcd when endpoints are given, else a directory.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Key prefix under which the catalog lives (`/loopmesh`).
    pub prefix: String,
    /// etcd connection; absent means the file catalog.
    pub etcd: Option<EtcdConfig>,
    /// File catalog directory, used when `etcd` is absent. It must exist:
    /// a missing directory is far more often a typo than an empty fleet.
    pub catalog_dir: PathBuf,
    /// Create `catalog_dir` if it is missing and start with an empty
    /// catalog (off: a missing directory is an error at start).
    pub create_catalog_dir: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            prefix: "/loopmesh".into(),
            etcd: None,
            catalog_dir: PathBuf::from("/var/lib/loopmesh/catalog"),
            create_catalog_dir: false,
        }
    }
}

/// etcd endpoints, credentials and timeouts.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port`; all are tried.
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// File holding the password (preferred over `password` in the config).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: Option<EtcdTlsConfig>,
    /// Time allowed to establish a connection.
    #[serde(default = "default_dial_timeout", with = "crate::duration")]
    pub dial_timeout: Duration,
    /// Time allowed for one request (not the watch stream).
    #[serde(default = "default_request_timeout", with = "crate::duration")]
    pub request_timeout: Duration,
    /// Longest pause between reconnection attempts (backoff doubles up to it).
    #[serde(default = "default_retry_max", with = "crate::duration")]
    pub retry_max: Duration,
}

fn default_dial_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(5)
}

impl EtcdConfig {
    /// A config for these endpoints with every other setting at its default.
    pub fn with_endpoints(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            username: None,
            password: None,
            password_file: None,
            tls: None,
            dial_timeout: default_dial_timeout(),
            request_timeout: default_request_timeout(),
            retry_max: default_retry_max(),
        }
    }
}

/// Client TLS towards etcd.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsConfig {
    /// CA bundle that signs the etcd server certificates.
    pub ca_file: PathBuf,
    /// Client certificate and key, for etcd's client-cert auth.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Name expected in the server certificate, if not the endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Whether a template renders one file, or one file per service.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Each {
    /// One file from the whole catalog.
    #[default]
    Catalog,
    /// One file per service; `dest` holds `{service}`. A change re-renders
    /// only the services it touches.
    Service,
}

/// A built-in validator run on a staged file before it goes live.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinCheck {
    /// The file must parse and validate as a routing-table entry.
    Route,
}

/// confd's template resource: render `src` into `dest`, check, reload.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TemplateResource {
    /// Template name inside the templates directory.
    pub src: String,
    /// Output path; relative paths live under the state directory.
    pub dest: PathBuf,
    #[serde(default)]
    pub each: Each,
    /// Catalog parts the template reads; changes elsewhere skip it.
    #[serde(default = "all_keys")]
    pub keys: Vec<KeyKind>,
    /// Owner user and group names (default: unchanged, i.e. the agent's).
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    /// Octal permission string, like `"0644"`.
    #[serde(default)]
    pub mode: Option<String>,
    /// Run on the staged file (`{{src}}` is its path); non-zero keeps the old file.
    #[serde(default)]
    pub check_cmd: Option<String>,
    /// Run after the file (or any of its per-service files) changed.
    #[serde(default)]
    pub reload_cmd: Option<String>,
    /// Built-in validation of the staged file.
    #[serde(default)]
    pub check: Option<BuiltinCheck>,
}

fn all_keys() -> Vec<KeyKind> {
    vec![KeyKind::Services, KeyKind::Instances, KeyKind::Addresses]
}

impl TemplateResource {
    /// The permission bits from `mode`, if set.
    pub fn mode_bits(&self) -> Result<Option<u32>, String> {
        match &self.mode {
            None => Ok(None),
            Some(text) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
                .ok()
                .filter(|bits| *bits <= 0o7777)
                .map(Some)
                .ok_or_else(|| format!("mode {text:?} is not an octal permission like \"0644\"")),
        }
    }
}

/// The DNS zone the agent renders (and, later, serves).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Serve the zone (off: render mesh.zone only, e.g. for another server).
    pub enabled: bool,
    /// Zone apex, fully qualified (`mesh.internal.`).
    pub zone: String,
    /// TTL of the A and SRV records. Addresses never move, so long is safe.
    pub ttl: u32,
    /// Address the agent's DNS server listens on (also the zone's NS glue).
    pub listen: std::net::SocketAddrV4,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: true,
            zone: "mesh.internal.".into(),
            ttl: 300,
            listen: std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(127, 0, 0, 153), 53),
        }
    }
}

/// Rendering cadence and command limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RenderConfig {
    /// Quiet time after a change before rendering. 0 (the default) renders
    /// at once, batching whatever arrives during a render into the next one;
    /// raise it when check_cmd or reload_cmd are expensive.
    #[serde(with = "crate::duration")]
    pub debounce: Duration,
    /// Longest a burst may hold a render back.
    #[serde(with = "crate::duration")]
    pub max_delay: Duration,
    /// Time allowed for one check_cmd or reload_cmd.
    #[serde(with = "crate::duration")]
    pub command_timeout: Duration,
}

impl Default for RenderConfig {
    fn default() -> Self {
        RenderConfig {
            debounce: Duration::ZERO,
            max_delay: Duration::from_millis(100),
            command_timeout: Duration::from_secs(30),
        }
    }
}

/// Everything `loopmesh agent` needs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// This node's name (default: the hostname).
    pub node: Option<String>,
    /// This node's locality zone, offered to templates for zone preference.
    pub node_zone: Option<String>,
    pub store: StoreConfig,
    /// Rendered files and last-known-good state.
    pub state_dir: PathBuf,
    /// Directory of tera templates; absent uses the ones built into the binary.
    pub templates_dir: Option<PathBuf>,
    /// Extra template resources, rendered beside the routing table and zone.
    pub templates: Vec<TemplateResource>,
    /// Pool the service addresses come from.
    pub address_pool: String,
    pub dns: DnsConfig,
    pub render: RenderConfig,
    pub proxy: ProxyConfig,
    /// mTLS between nodes (absent: every backend is dialed directly).
    pub mesh: Option<MeshConfig>,
    pub admin: AdminConfig,
    /// Log level or filter (`debug`, `info,loopmesh::dns=debug`); RUST_LOG wins.
    pub log_level: Option<String>,
    /// Static mode: no catalog; the routing table files under
    /// `<state_dir>/routes/`, written by hand, drive the data plane.
    #[serde(rename = "static")]
    pub static_mode: bool,
}

/// The admin HTTP server (/metrics, /live, /ready, JSON views).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub enabled: bool,
    /// Keep it on loopback: it is unauthenticated.
    pub listen: std::net::SocketAddr,
}

impl AdminConfig {
    /// The default for a daemon listening on `port` of 127.0.0.1.
    pub fn on_port(port: u16) -> Self {
        AdminConfig {
            enabled: true,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

/// The agent's admin port (Envoy's admin default).
pub const AGENT_ADMIN_PORT: u16 = 9901;

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig::on_port(AGENT_ADMIN_PORT)
    }
}

/// The in-process L4 proxy.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Serve the routing table (off: render files only, e.g. for HAProxy).
    pub enabled: bool,
    /// How long a removed service's open connections may take to finish.
    #[serde(with = "crate::duration")]
    pub drain_timeout: Duration,
    /// Congestion control of the proxy's legs to this host (clients, and
    /// backends on loopback addresses): `cubic` by default, because a pacing
    /// default such as BBR only slows loopback down; `system` keeps the
    /// kernel's default. See `proxy::congestion`.
    pub loopback_congestion: String,
    /// Event loops the proxy runs connections on (threads); one serves
    /// ~60k requests/s here at the least CPU per request. See `proxy::workers`.
    pub workers: usize,
    /// Forward connections inside the kernel (sockmap): lower latency per
    /// request, needs CAP_BPF and CAP_NET_ADMIN; without them the proxy
    /// says why once and copies in user space. See `proxy::sockmap`.
    pub kernel_forwarding: bool,
    /// With `kernel_forwarding`, connections are handed to the kernel only
    /// while the proxy has at most this many open: past it the user-space
    /// copy serves more per CPU (BENCHMARKS.md has the sweep).
    pub kernel_forwarding_max_open: u32,
    /// Connections open at once across every service; past it listeners
    /// stop accepting until one ends (new ones wait in the backlog). Unset:
    /// three quarters of the open-file limit, two descriptors a connection
    /// (see `limits`), so that the admin API, DNS and the store always have
    /// descriptors left.
    pub max_open_connections: Option<u32>,
    /// The HTTP access log: one JSON line per request of the services whose
    /// `http.access_log` is on, or of every HTTP service.
    pub access_log: AccessLogConfig,
}

/// mTLS between nodes: the node's inbound listener and credentials.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// The node's routable inbound address (port 15008 by convention);
    /// absent: this node only dials out.
    pub listen: Option<std::net::SocketAddr>,
    /// The node's certificate chain (PEM), naming
    /// `spiffe://<trust_domain>/node/<node>`.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The mesh's trust bundle (PEM).
    pub bundle: PathBuf,
    /// `tls.mode` of services that do not set one.
    #[serde(default)]
    pub default_mode: crate::policy::TlsMode,
    /// A connection to a peer node that carries no stream for this long is
    /// closed (the next stream makes a new one).
    #[serde(default = "default_mesh_idle_timeout", with = "crate::duration")]
    pub idle_timeout: Duration,
}

fn default_mesh_idle_timeout() -> Duration {
    Duration::from_secs(600)
}

/// Where the HTTP access log goes and for which services.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// `stderr` (the journal, under systemd) or a file, appended to.
    pub to: String,
    /// Log every HTTP service's requests, not only those that ask.
    pub all_services: bool,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            to: "stderr".into(),
            all_services: false,
        }
    }
}

/// Most proxy event loops a config may ask for: more threads than that
/// buys nothing.
pub const MAX_PROXY_WORKERS: usize = 256;

/// Connections forwarded in the kernel at once (two socket map entries
/// each; the maps allocate per entry in use); `kernel_forwarding_max_open`
/// cannot exceed it.
pub const KERNEL_CONNECTIONS: u32 = 32 * 1024;

/// Connections open in the proxy up to which new ones are handed to the
/// kernel by default: the concurrency sweep in BENCHMARKS.md, where the
/// kernel stops beating the user-space copy.
pub const DEFAULT_KERNEL_FORWARDING_MAX_OPEN: u32 = 8;

/// The value of `proxy.loopback_congestion` that keeps the system default.
pub const LOOPBACK_CONGESTION_SYSTEM: &str = "system";

/// Checks a configured congestion control name (the kernel allows 15
/// bytes).
pub fn validate_congestion_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() < 16
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a congestion control name (like cubic or reno, or {LOOPBACK_CONGESTION_SYSTEM:?} for the kernel's default)"
        ))
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            enabled: true,
            drain_timeout: Duration::from_secs(30),
            loopback_congestion: "cubic".into(),
            workers: 1,
            kernel_forwarding: false,
            kernel_forwarding_max_open: DEFAULT_KERNEL_FORWARDING_MAX_OPEN,
            max_open_connections: None,
            access_log: AccessLogConfig::default(),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node: None,
            node_zone: None,
            store: StoreConfig::default(),
            state_dir: PathBuf::from("/var/lib/loopmesh"),
            templates_dir: None,
            templates: Vec::new(),
            address_pool: "127.100.0.0/16".into(),
            dns: DnsConfig::default(),
            render: RenderConfig::default(),
            proxy: ProxyConfig::default(),
            mesh: None,
            admin: AdminConfig::default(),
            log_level: None,
            static_mode: false,
        }
    }
}

/// Command-line values that override the config file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub etcd: Option<Vec<String>>,
    pub catalog_dir: Option<PathBuf>,
    pub prefix: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub node: Option<String>,
    pub dns_listen: Option<std::net::SocketAddrV4>,
    pub admin_listen: Option<std::net::SocketAddr>,
    pub static_mode: bool,
}

impl Overrides {
    /// Applies the flags to a store config.
    pub fn apply_store(&self, store: &mut StoreConfig) {
        if let Some(endpoints) = &self.etcd {
            match &mut store.etcd {
                Some(etcd) => etcd.endpoints = endpoints.clone(),
                None => store.etcd = Some(EtcdConfig::with_endpoints(endpoints.clone())),
            }
        }
        if let Some(dir) = &self.catalog_dir {
            store.catalog_dir = dir.clone();
        }
        if let Some(prefix) = &self.prefix {
            store.prefix = prefix.clone();
        }
    }
}

/// Checks a log level or filter directive as tracing reads it.
pub fn validate_log_level(level: Option<&str>) -> Result<(), String> {
    match level {
        Some(level) => tracing_subscriber::EnvFilter::try_new(level)
            .map(drop)
            .map_err(|err| format!("{level:?} is not a log level or filter: {err}")),
        None => Ok(()),
    }
}

/// Reads a YAML config file of any config type, naming the file on error.
pub fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    yaml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Resolves `path` against `base` unless it is absolute.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// Resolves the store's paths (catalog directory, etcd credentials and
/// TLS files) against `base`, for every config that has a store.
pub fn resolve_store_paths(store: &mut StoreConfig, base: &Path) {
    store.catalog_dir = resolve(base, &store.catalog_dir);
    if let Some(etcd) = &mut store.etcd {
        etcd.password_file = etcd.password_file.as_deref().map(|p| resolve(base, p));
        if let Some(tls) = &mut etcd.tls {
            tls.ca_file = resolve(base, &tls.ca_file);
            tls.cert_file = tls.cert_file.as_deref().map(|p| resolve(base, p));
            tls.key_file = tls.key_file.as_deref().map(|p| resolve(base, p));
        }
    }
}

impl AgentConfig {
    /// Loads the file (if any), applies flags, resolves paths and validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let (mut config, origin, base) = match path {
            Some(path) => {
                let config: AgentConfig = read_yaml(path)?;
                let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
                (config, path.display().to_string(), base)
            }
            None => (
                AgentConfig::default(),
                "defaults and flags".to_string(),
                PathBuf::new(),
            ),
        };
        config.resolve_paths(&base);
        overrides.apply_store(&mut config.store);
        if let Some(dir) = &overrides.state_dir {
            config.state_dir = dir.clone();
        }
        if let Some(node) = &overrides.node {
            config.node = Some(node.clone());
        }
        if let Some(listen) = overrides.dns_listen {
            config.dns.listen = listen;
        }
        if let Some(listen) = overrides.admin_listen {
            config.admin.listen = listen;
        }
        config.static_mode |= overrides.static_mode;
        config.validate(&origin)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        resolve_store_paths(&mut self.store, base);
        self.state_dir = resolve(base, &self.state_dir);
        self.templates_dir = self.templates_dir.as_deref().map(|dir| resolve(base, dir));
    }

    /// The node name: configured, or the machine's hostname.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(hostname)
    }

    /// The parsed address pool (validated by [`AgentConfig::load`]).
    pub fn pool(&self) -> Result<AddressPool, AddressError> {
        AddressPool::parse(&self.address_pool)
    }

    /// Where a template resource's output goes.
    pub fn dest_path(&self, resource: &TemplateResource) -> PathBuf {
        resolve(&self.state_dir, &resource.dest)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            origin: origin.to_string(),
            field: field.to_string(),
            reason,
        };
        validate_store(&self.store).map_err(|(field, reason)| invalid(field, reason))?;
        self.pool()
            .map_err(|err| invalid("address_pool", err.to_string()))?;
        validate_zone_name(&self.dns.zone).map_err(|reason| invalid("dns.zone", reason))?;
        validate_log_level(self.log_level.as_deref()).map_err(|reason| invalid("log_level", reason))?;
        validate_congestion_name(&self.proxy.loopback_congestion)
            .map_err(|reason| invalid("proxy.loopback_congestion", reason))?;
        let max_workers = MAX_PROXY_WORKERS;
        if !(1..=max_workers).contains(&self.proxy.workers) {
            return Err(invalid(
                "proxy.workers",
                format!("{} workers; give 1 to {max_workers}", self.proxy.workers),
            ));
        }
        let max_open = self.proxy.kernel_forwarding_max_open;
        let capacity = KERNEL_CONNECTIONS;
        if !(1..=capacity).contains(&max_open) {
            return Err(invalid(
                "proxy.kernel_forwarding_max_open",
                format!(
                    "{max_open} connections; give 1 to {capacity} (kernel_forwarding: false turns it off)"
                ),
            ));
        }
        if self.proxy.max_open_connections == Some(0) {
            return Err(invalid(
                "proxy.max_open_connections",
                "0 connections would serve nothing; give at least 1, or leave it out for the default".into(),
            ));
        }
        if self.static_mode && !self.proxy.enabled {
            return Err(invalid(
                "static",
                "static mode serves the routing table; it needs proxy.enabled".into(),
            ));
        }
        if let Some(node) = &self.node {
            if node.is_empty() || node.contains('/') || node.chars().any(char::is_whitespace) {
                return Err(invalid(
                    "node",
                    format!("{node:?} must be non-empty without '/' or spaces"),
                ));
            }
        }
        for (index, resource) in self.templates.iter().enumerate() {
            let field = format!("templates[{index}] ({})", resource.src);
            validate_resource(resource).map_err(|reason| invalid(&field, reason))?;
        }
        if let Some(mesh) = &self.mesh {
            // The node's certificate names it, and peers dial it by that name.
            crate::names::check_node_name(&self.node_name())
                .map_err(|err| invalid("node", format!("{err} (the mesh names nodes in certificates)")))?;
            if let Some(listen) = mesh.listen {
                if listen.ip().is_loopback() || listen.port() == 0 {
                    return Err(invalid(
                        "mesh.listen",
                        format!(
                            "{listen} must be the node's routable address with a port, like 10.0.0.5:15008"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Checks the store section; shared by the agent and registrar configs.
pub fn validate_store(store: &StoreConfig) -> Result<(), (&'static str, String)> {
    let prefix = &store.prefix;
    if !prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains("//") {
        return Err((
            "store.prefix",
            format!("{prefix:?} must start with '/' and not end with '/', like /loopmesh"),
        ));
    }
    if let Some(etcd) = &store.etcd {
        if etcd.endpoints.is_empty() {
            return Err(("store.etcd.endpoints", "at least one endpoint is needed".into()));
        }
        for endpoint in &etcd.endpoints {
            let ok = ["http://", "https://"].iter().any(|scheme| {
                endpoint
                    .strip_prefix(scheme)
                    .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
            });
            if !ok {
                return Err((
                    "store.etcd.endpoints",
                    format!("{endpoint:?} is not a URL like http://127.0.0.1:2379"),
                ));
            }
        }
        if etcd.password.is_some() && etcd.password_file.is_some() {
            return Err((
                "store.etcd.password",
                "set password or password_file, not both".into(),
            ));
        }
        if etcd.username.is_none() && (etcd.password.is_some() || etcd.password_file.is_some()) {
            return Err(("store.etcd.username", "a password needs a username".into()));
        }
        if let Some(tls) = &etcd.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return Err(("store.etcd.tls", "cert_file and key_file go together".into()));
            }
        }
    }
    Ok(())
}

fn validate_resource(resource: &TemplateResource) -> Result<(), String> {
    let dest = resource.dest.to_string_lossy();
    let per_service = dest.contains("{service}");
    match resource.each {
        Each::Service if !per_service => {
            return Err(format!("each: service needs {{service}} in dest, got {dest:?}"));
        }
        Each::Catalog if per_service => {
            return Err(format!("dest {dest:?} holds {{service}} but each is not service"));
        }
        _ => {}
    }
    let in_file_name = resource
        .dest
        .file_name()
        .is_some_and(|name| name.to_string_lossy().contains("{service}"));
    if per_service && (!in_file_name || dest.matches("{service}").count() != 1) {
        return Err(format!(
            "{{service}} must appear once, in the file name of dest {dest:?}"
        ));
    }
    if resource.keys.is_empty() {
        return Err("keys must name at least one of services, instances, addresses".into());
    }
    resource.mode_bits()?;
    Ok(())
}

/// Checks a DNS zone apex like `mesh.internal.`.
pub fn validate_zone_name(zone: &str) -> Result<(), String> {
    let Some(body) = zone.strip_suffix('.') else {
        return Err(format!("{zone:?} must be fully qualified (end with '.')"));
    };
    let ok = !body.is_empty()
        && body.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{zone:?} is not a valid DNS name"))
    }
}

/// The machine's hostname, or `localhost` if it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, text).unwrap();
        AgentConfig::load(Some(&path), &Overrides::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let config = parse("{}").unwrap();
        assert_eq!(config.store.prefix, "/loopmesh");
        assert!(config.store.etcd.is_none());
        assert_eq!(config.dns.zone, "mesh.internal.");
        assert_eq!(config.address_pool, "127.100.0.0/16");
    }

    #[test]
    fn unknown_fields_are_errors_naming_the_file() {
        let err = parse("stor: {}\n").unwrap_err();
        assert!(err.contains("agent.yaml") && err.contains("stor"), "{err}");
        let err = parse("store:\n  etcd:\n    endpoints: [http://a:1]\n    passwrd: x\n").unwrap_err();
        assert!(err.contains("passwrd"), "{err}");
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, "state_dir: state\nstore: {catalog_dir: catalog}\n").unwrap();
        let config = AgentConfig::load(Some(&path), &Overrides::default()).unwrap();
        assert_eq!(config.state_dir, dir.path().join("state"));
        assert_eq!(config.store.catalog_dir, dir.path().join("catalog"));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(
            &path,
            "store: {prefix: /a, etcd: {endpoints: [http://x:1], retry_max: 1s}}\n",
        )
        .unwrap();
        let overrides = Overrides {
            etcd: Some(vec!["http://127.0.0.1:2379".into()]),
            prefix: Some("/b".into()),
            node: Some("n1".into()),
            ..Overrides::default()
        };
        let config = AgentConfig::load(Some(&path), &overrides).unwrap();
        let etcd = config.store.etcd.unwrap();
        assert_eq!(etcd.endpoints, vec!["http://127.0.0.1:2379".to_string()]);
        assert_eq!(etcd.retry_max, Duration::from_secs(1));
        assert_eq!(config.store.prefix, "/b");
        assert_eq!(config.node.as_deref(), Some("n1"));
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases = [
            ("store: {prefix: loopmesh}", "store.prefix"),
            ("store: {etcd: {endpoints: []}}", "store.etcd.endpoints"),
            (
                "store: {etcd: {endpoints: [127.0.0.1:2379]}}",
                "store.etcd.endpoints",
            ),
            ("address_pool: 127.0.0.0/16", "address_pool"),
            ("dns: {zone: mesh.internal}", "dns.zone"),
            ("templates: [{src: a, dest: 'x/{service}.conf'}]", "templates[0]"),
            ("templates: [{src: a, dest: x, each: service}]", "templates[0]"),
            ("templates: [{src: a, dest: x, mode: '999'}]", "templates[0]"),
            (
                "templates: [{src: a, dest: '{service}/x', each: service}]",
                "templates[0]",
            ),
            ("render: {debounce: 5}", "invalid duration \"5\""),
            ("proxy: {loopback_congestion: BBR}", "proxy.loopback_congestion"),
            ("proxy: {workers: 0}", "proxy.workers"),
            ("proxy: {workers: 100000}", "proxy.workers"),
            (
                "proxy: {kernel_forwarding_max_open: 0}",
                "proxy.kernel_forwarding_max_open",
            ),
            (
                "proxy: {kernel_forwarding_max_open: 40000}",
                "proxy.kernel_forwarding_max_open",
            ),
        ];
        for (text, field) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(field), "{text} -> {err}");
        }
    }

    #[test]
    fn congestion_names_are_checked() {
        assert!(validate_congestion_name("cubic").is_ok());
        assert!(validate_congestion_name("bbr").is_ok());
        assert!(validate_congestion_name("").is_err());
        assert!(validate_congestion_name("Cubic").is_err());
        assert!(validate_congestion_name("a_name_that_is_too_long").is_err());
        assert!(validate_congestion_name("cu bic").is_err());
    }

    #[test]
    fn mode_bits_parse_octal() {
        let resource: TemplateResource = yaml::from_str("{src: a, dest: b, mode: '0640'}").unwrap();
        assert_eq!(resource.mode_bits(), Ok(Some(0o640)));
    }
}
