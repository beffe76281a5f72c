//! The typed catalog: services, their instances and their addresses.
//!
//! Pure data, no I/O. The store feeds it key/value changes; it parses and
//! validates each value, keeps the last good value of a key whose new value
//! is bad (and says so, naming the key), and reports which services each
//! change touched so rendering can redo only those.

use crate::addresses::parse_service_address;
pub use crate::names::Label;
use crate::names::NameError;
pub use crate::policy::MAX_RETRIES;
use crate::policy::{HttpPolicy, TlsPolicy};
use crate::yaml;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

/// A catalog key or value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CatalogError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("key is not services/<service>, instances/<service>/<id> or addresses/<service>")]
    KeyShape,
    #[error("value is not UTF-8")]
    NotUtf8,
    #[error("{0}")]
    Value(String),
    #[error("{addr}:{port} is this agent's own {what}; give the service another port or address")]
    Reserved { addr: Ipv4Addr, port: u16, what: String },
}

/// Which part of the catalog a change touched, or a template reads
/// (confd's `keys`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    Services,
    Instances,
    Addresses,
}

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Http,
}

/// How a service spreads connections over its instances.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConnections,
    PeakEwma,
    ConsistentHash,
}

/// A service definition, as operators write it under `services/<name>`:
/// its port and its whole traffic policy.
///
/// The one schema of a service: the catalog value parses into it, the
/// rendered route file carries it as `spec` (rendered with `json_encode`),
/// and the proxy compiles it. A new setting is a new field here, nowhere
/// else; unknown fields are refused here, for every path in.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Port the service is reached on, at its own address.
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub balance: Balance,
    /// Time allowed to connect to one backend.
    #[serde(default = "default_connect_timeout", with = "crate::duration")]
    pub connect_timeout: Duration,
    /// A connection idle this long in both directions is closed.
    #[serde(default = "default_idle_timeout", with = "crate::duration")]
    pub idle_timeout: Duration,
    /// Other backends tried after a failed connect.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Concurrent connections allowed; the excess is refused at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Passive outlier detection.
    #[serde(default)]
    pub outlier: Outlier,
    /// How HTTP requests are handled (`protocol: http`).
    #[serde(default, skip_serializing_if = "HttpPolicy::is_default")]
    pub http: HttpPolicy,
    /// mTLS between nodes for this service.
    #[serde(default, skip_serializing_if = "TlsPolicy::is_default")]
    pub tls: TlsPolicy,
    /// Callers allowed through the mesh (SPIFFE IDs, exact or `*` globs);
    /// empty: every node of the mesh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
}

/// Passive outlier detection: connect failures in a row eject a backend for
/// a while, growing with each ejection in a row, never past a share of the set.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Outlier {
    /// Connect failures in a row that eject a backend.
    pub consecutive_failures: u32,
    /// First ejection length; doubles with each ejection in a row.
    #[serde(with = "crate::duration")]
    pub base_ejection: Duration,
    /// Longest ejection.
    #[serde(with = "crate::duration")]
    pub max_ejection: Duration,
    /// Most backends ejected at once, as a percentage of the set.
    pub max_ejected_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

impl Outlier {
    /// Checks the settings; shared by the catalog and the routing table.
    pub fn validate(&self) -> Result<(), String> {
        if self.consecutive_failures == 0 {
            return Err("outlier.consecutive_failures must be at least 1".into());
        }
        if self.base_ejection.is_zero() || self.max_ejection < self.base_ejection {
            return Err("outlier ejections must be positive, max_ejection at least base_ejection".into());
        }
        if self.max_ejected_percent > 100 {
            return Err(format!(
                "outlier.max_ejected_percent {} exceeds 100",
                self.max_ejected_percent
            ));
        }
        Ok(())
    }
}

// The defaults of a service's settings, shared with the routing table so
// that a hand-written route means what the same catalog value means.

/// `connect_timeout` when unset.
pub fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
/// `idle_timeout` when unset.
pub fn default_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
/// `retries` when unset.
pub fn default_retries() -> u32 {
    2
}

impl ServiceSpec {
    /// Checks what serde cannot: ranges and relations between fields.
    /// Shared by the catalog and the route file, so a hand-written route
    /// (static mode) is held to the catalog's rules.
    pub fn validate(&self) -> Result<(), String> {
        if self.port == 0 {
            return Err("port must be 1-65535".into());
        }
        if self.connect_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err("timeouts must be greater than zero".into());
        }
        if self.retries > MAX_RETRIES {
            return Err(format!(
                "retries {} exceeds the limit of {MAX_RETRIES}",
                self.retries
            ));
        }
        if self.max_connections == Some(0) {
            return Err("max_connections must be at least 1 (omit it for no limit)".into());
        }
        self.outlier.validate()?;
        for pattern in &self.allow {
            crate::policy::check_allow_pattern(pattern)?;
        }
        self.http.validate()
    }
}

/// Whether an instance takes new connections.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    #[default]
    Up,
    /// Finishing its connections; gets no new ones.
    Draining,
    /// Out of rotation by an operator.
    Maintenance,
}

impl InstanceState {
    /// The word as written in the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Up => "up",
            InstanceState::Draining => "draining",
            InstanceState::Maintenance => "maintenance",
        }
    }
}

/// One backend of a service, under `instances/<service>/<id>`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub host: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Label>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<Label>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<Label>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub state: InstanceState,
    /// Its node's mesh (mTLS) inbound address, for a backend reached
    /// through the mesh rather than directly (one that listens on its
    /// node's loopback only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<std::net::SocketAddr>,
}

/// An instance's `weight` when unset.
pub fn default_weight() -> u32 {
    1
}

/// Checks a node name, zone or tag: 1-253 characters of `[A-Za-z0-9._:/-]`,
/// so every template (YAML, HAProxy, env files) can print it unquoted.
fn check_label(field: &str, value: &str) -> Result<(), String> {
    let ok = (1..=253).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field} {value:?} must be 1-253 characters of [A-Za-z0-9._:/-]"
        ))
    }
}

/// Highest instance weight accepted.
pub const MAX_WEIGHT: u32 = 10_000;

impl Instance {
    /// Checks host, port, labels and weight; shared by the catalog and the
    /// route file.
    pub fn validate(&self) -> Result<(), String> {
        let host_ok = !self.host.is_empty()
            && self.host.len() <= 253
            && self
                .host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:_".contains(&b));
        if !host_ok {
            return Err(format!("host {:?} is not an IP address or host name", self.host));
        }
        if self.port == 0 {
            return Err("port must be 1-65535".into());
        }
        let labels = self
            .node
            .iter()
            .map(|n| ("node", n))
            .chain(self.zone.iter().map(|z| ("zone", z)));
        for (field, value) in labels.chain(self.tags.iter().map(|t| ("tag", t))) {
            check_label(field, value.as_str())?;
        }
        if self.weight > MAX_WEIGHT {
            return Err(format!("weight {} exceeds {MAX_WEIGHT}", self.weight));
        }
        if let Some(mesh) = self.mesh {
            if mesh.ip().is_loopback() || mesh.ip().is_unspecified() || mesh.port() == 0 {
                return Err(format!(
                    "mesh {mesh} must be the node's routable inbound address (like 10.0.0.5:15008)"
                ));
            }
            if self.node.is_none() {
                return Err(
                    "an instance with a mesh address needs its node (the identity its certificate names)"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

/// Checks a service name: a DNS label.
pub fn check_service_name(name: &str) -> Result<(), CatalogError> {
    Ok(crate::names::check_service_name(name)?)
}

/// Checks an instance id.
pub fn check_instance_id(id: &str) -> Result<(), CatalogError> {
    Ok(crate::names::check_instance_id(id)?)
}

/// A catalog key, relative to the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Service(String),
    Instance(String, String),
    Address(String),
}

impl Key {
    /// Parses `services/x`, `instances/x/id` or `addresses/x`; `None` for keys
    /// outside those directories (left for future use, ignored).
    pub fn parse(key: &str) -> Option<Result<Key, CatalogError>> {
        let (dir, rest) = key.split_once('/')?;
        let parsed = match dir {
            "services" => check_service_name(rest).map(|()| Key::Service(rest.to_string())),
            "addresses" => check_service_name(rest).map(|()| Key::Address(rest.to_string())),
            "instances" => match rest.split_once('/') {
                Some((service, id)) => check_service_name(service)
                    .and_then(|()| check_instance_id(id))
                    .map(|()| Key::Instance(service.to_string(), id.to_string())),
                None => Err(CatalogError::KeyShape),
            },
            _ => return None,
        };
        Some(parsed)
    }

    /// The key's path relative to the prefix.
    pub fn path(&self) -> String {
        match self {
            Key::Service(s) => format!("services/{s}"),
            Key::Instance(s, id) => format!("instances/{s}/{id}"),
            Key::Address(s) => format!("addresses/{s}"),
        }
    }

    fn service(&self) -> &str {
        match self {
            Key::Service(s) | Key::Instance(s, _) | Key::Address(s) => s,
        }
    }

    fn kind(&self) -> KeyKind {
        match self {
            Key::Service(_) => KeyKind::Services,
            Key::Instance(..) => KeyKind::Instances,
            Key::Address(_) => KeyKind::Addresses,
        }
    }
}

/// Parses a catalog value: YAML, with a fast path for JSON objects (what
/// the registrar and most tools write), which serde_json reads several
/// times faster. Anything JSON refuses is read as YAML, whose error wins.
fn parse_value<T: serde::de::DeserializeOwned>(value: &[u8]) -> Result<T, CatalogError> {
    let text = std::str::from_utf8(value).map_err(|_| CatalogError::NotUtf8)?;
    if text.trim_start().starts_with('{') {
        if let Ok(parsed) = serde_json::from_str(text) {
            return Ok(parsed);
        }
    }
    yaml::from_str(text).map_err(|e| CatalogError::Value(e.to_string()))
}

/// Parses a service definition value.
pub fn parse_service(value: &[u8]) -> Result<ServiceSpec, CatalogError> {
    let spec: ServiceSpec = parse_value(value)?;
    spec.validate().map_err(CatalogError::Value)?;
    Ok(spec)
}

/// Parses an instance value.
pub fn parse_instance(value: &[u8]) -> Result<Instance, CatalogError> {
    let instance: Instance = parse_value(value)?;
    instance.validate().map_err(CatalogError::Value)?;
    Ok(instance)
}

/// Parses an address value (`addresses/<service>`), before the agent's own
/// checks against its listeners; shared with the ops verbs so they judge
/// the value as agents do.
pub fn parse_address(value: &[u8]) -> Result<Ipv4Addr, CatalogError> {
    let text = std::str::from_utf8(value).map_err(|_| CatalogError::NotUtf8)?;
    parse_service_address(text).map_err(|e| CatalogError::Value(e.to_string()))
}

/// A service's address and when its key was created (earlier wins a clash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressClaim {
    pub addr: Ipv4Addr,
    pub create_revision: i64,
}

/// Everything the catalog holds for one service name.
#[derive(Debug, Clone, Default)]
pub struct ServiceEntry {
    pub spec: Option<Arc<ServiceSpec>>,
    pub instances: BTreeMap<String, Instance>,
    pub address: Option<AddressClaim>,
}

impl ServiceEntry {
    fn is_empty(&self) -> bool {
        self.spec.is_none() && self.instances.is_empty() && self.address.is_none()
    }
}

/// A part of one service that a change touched.
pub type Touch = (String, KeyKind);

/// Why a service is defined but not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unserved {
    /// No address yet (the agent allocates one).
    NoAddress,
    /// Its address is claimed earlier by another service.
    AddressTaken { addr: Ipv4Addr, by: String },
}

/// The typed catalog at one store revision.
#[derive(Debug, Default)]
pub struct Catalog {
    services: BTreeMap<String, ServiceEntry>,
    /// Address -> claimants ordered by (create revision, name); first wins.
    claims: HashMap<Ipv4Addr, BTreeSet<(i64, String)>>,
    /// Keys whose current value is bad, with the reason.
    invalid: BTreeMap<String, String>,
    /// The agent's own listeners (admin API, DNS): a service on one of them
    /// could never bind and would keep the node not ready.
    reserved: Vec<(std::net::SocketAddr, String)>,
    revision: i64,
}

impl Catalog {
    /// The store revision this catalog reflects.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Records the revision the applied changes brought the catalog to.
    pub fn set_revision(&mut self, revision: i64) {
        self.revision = revision;
    }

    /// Keys whose latest value was refused, with why.
    pub fn invalid(&self) -> &BTreeMap<String, String> {
        &self.invalid
    }

    /// All service names known in any form.
    pub fn entries(&self) -> &BTreeMap<String, ServiceEntry> {
        &self.services
    }

    /// One service's entry.
    pub fn entry(&self, service: &str) -> Option<&ServiceEntry> {
        self.services.get(service)
    }

    /// Every address currently claimed by any service.
    pub fn claimed_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.claims.keys().copied()
    }

    /// Defined services that have no address key yet.
    ///
    /// A service whose address key holds a value that was refused is not
    /// among them: allocating cannot overwrite an operator's key (the
    /// transaction requires it absent), so asking again would only repeat
    /// the refusal; the key is logged once, when it is written.
    pub fn services_without_address(&self) -> Vec<String> {
        self.services
            .iter()
            .filter(|(_, entry)| entry.spec.is_some() && entry.address.is_none())
            .filter(|(name, _)| !self.invalid.contains_key(&format!("addresses/{name}")))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Whether a defined service is served, and if not, why.
    pub fn serving_state(&self, service: &str) -> Result<(Arc<ServiceSpec>, Ipv4Addr), Unserved> {
        let entry = self.services.get(service).ok_or(Unserved::NoAddress)?;
        let spec = entry.spec.clone().ok_or(Unserved::NoAddress)?;
        let claim = entry.address.ok_or(Unserved::NoAddress)?;
        let winner = self
            .claims
            .get(&claim.addr)
            .and_then(|set| set.first())
            .map(|(_, name)| name.as_str());
        match winner {
            Some(name) if name != service => Err(Unserved::AddressTaken {
                addr: claim.addr,
                by: name.to_string(),
            }),
            _ => Ok((spec, claim.addr)),
        }
    }

    /// Drops everything and loads `entries` (a full snapshot).
    pub fn replace<'a>(&mut self, entries: impl IntoIterator<Item = (&'a str, &'a [u8], i64)>) {
        *self = Catalog {
            reserved: std::mem::take(&mut self.reserved),
            ..Catalog::default()
        };
        for (key, value, create_revision) in entries {
            self.put(key, value, create_revision);
        }
        Label::prune();
    }

    /// Marks `addr` as one of the agent's own listeners (`what`: "admin
    /// API"): a service value or address that would put a service there is
    /// refused like a bad value, naming its key.
    pub fn reserve(&mut self, addr: std::net::SocketAddr, what: &str) {
        self.reserved.push((addr, what.to_string()));
    }

    /// Refuses `addr:port` if one of the agent's listeners is there (an
    /// unspecified listen address holds the port on every address).
    fn check_reserved(&self, addr: Option<Ipv4Addr>, port: Option<u16>) -> Result<(), CatalogError> {
        let (Some(addr), Some(port)) = (addr, port) else {
            return Ok(());
        };
        match self.reserved.iter().find(|(listen, _)| {
            listen.port() == port && (listen.ip() == addr || listen.ip().is_unspecified())
        }) {
            Some((_, what)) => Err(CatalogError::Reserved {
                addr,
                port,
                what: what.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Applies a put of `value` at `key`; returns what it touched.
    ///
    /// A bad value is recorded in [`Catalog::invalid`] and the key's previous
    /// good value, if any, stays in force.
    pub fn put(&mut self, key: &str, value: &[u8], create_revision: i64) -> Vec<Touch> {
        let parsed = match Key::parse(key) {
            None => return Vec::new(),
            Some(Err(err)) => {
                self.refuse(key, err);
                return Vec::new();
            }
            Some(Ok(parsed)) => parsed,
        };
        let result = match &parsed {
            Key::Service(service) => parse_service(value)
                .and_then(|spec| {
                    let addr = self.entry(service).and_then(|e| e.address).map(|c| c.addr);
                    self.check_reserved(addr, Some(spec.port)).map(|()| spec)
                })
                .map(|spec| {
                    self.entry_mut(service).spec = Some(Arc::new(spec));
                    Vec::new()
                }),
            Key::Instance(service, id) => parse_instance(value).map(|instance| {
                self.entry_mut(service).instances.insert(id.clone(), instance);
                Vec::new()
            }),
            Key::Address(service) => parse_address(value)
                .and_then(|addr| {
                    let port = self
                        .entry(service)
                        .and_then(|e| e.spec.as_ref())
                        .map(|spec| spec.port);
                    self.check_reserved(Some(addr), port).map(|()| addr)
                })
                .map(|addr| {
                    self.set_address(
                        service,
                        Some(AddressClaim {
                            addr,
                            create_revision,
                        }),
                    )
                }),
        };
        match result {
            Ok(mut touched) => {
                self.invalid.remove(key);
                touched.push((parsed.service().to_string(), parsed.kind()));
                touched
            }
            Err(err) => {
                self.refuse(key, err);
                Vec::new()
            }
        }
    }

    /// Applies a delete of `key`; returns what it touched.
    pub fn delete(&mut self, key: &str) -> Vec<Touch> {
        self.invalid.remove(key);
        let Some(Ok(parsed)) = Key::parse(key) else {
            return Vec::new();
        };
        let service = parsed.service().to_string();
        let mut touched = match &parsed {
            Key::Service(_) => {
                self.entry_mut(&service).spec = None;
                Vec::new()
            }
            Key::Instance(_, id) => {
                self.entry_mut(&service).instances.remove(id);
                Vec::new()
            }
            Key::Address(_) => self.set_address(&service, None),
        };
        if self.services.get(&service).is_some_and(ServiceEntry::is_empty) {
            self.services.remove(&service);
        }
        touched.push((service, parsed.kind()));
        touched
    }

    fn entry_mut(&mut self, service: &str) -> &mut ServiceEntry {
        self.services.entry(service.to_string()).or_default()
    }

    /// Moves a service's claim; returns the other services whose serving
    /// state changed because a clash appeared or went away.
    fn set_address(&mut self, service: &str, claim: Option<AddressClaim>) -> Vec<Touch> {
        let mut touched = Vec::new();
        let old = std::mem::replace(&mut self.entry_mut(service).address, claim);
        if let Some(old) = old {
            if let Some(set) = self.claims.get_mut(&old.addr) {
                set.remove(&(old.create_revision, service.to_string()));
                touched.extend(set.iter().map(|(_, name)| (name.clone(), KeyKind::Addresses)));
                if set.is_empty() {
                    self.claims.remove(&old.addr);
                }
            }
        }
        if let Some(new) = claim {
            let set = self.claims.entry(new.addr).or_default();
            touched.extend(set.iter().map(|(_, name)| (name.clone(), KeyKind::Addresses)));
            set.insert((new.create_revision, service.to_string()));
            if set.len() > 1 {
                let (_, winner) = set.first().expect("set has two members");
                let losers: Vec<&str> = set.iter().skip(1).map(|(_, n)| n.as_str()).collect();
                tracing::warn!(
                    address = %new.addr,
                    "address {} is claimed by {winner} first and also by {}; only {winner} is served",
                    new.addr,
                    losers.join(", ")
                );
                metrics::counter!("loopmesh_catalog_address_conflicts_total").increment(1);
            }
        }
        touched
    }

    fn refuse(&mut self, key: &str, err: CatalogError) {
        let kept = match Key::parse(key) {
            Some(Ok(Key::Service(s))) if self.entry(&s).is_some_and(|e| e.spec.is_some()) => {
                "keeping its previous value"
            }
            Some(Ok(Key::Instance(s, id)))
                if self.entry(&s).is_some_and(|e| e.instances.contains_key(&id)) =>
            {
                "keeping its previous value"
            }
            Some(Ok(Key::Address(s))) if self.entry(&s).is_some_and(|e| e.address.is_some()) => {
                "keeping its previous value"
            }
            _ => "skipped",
        };
        tracing::warn!(key, "invalid catalog value at {key}: {err}; {kept}");
        metrics::counter!("loopmesh_catalog_invalid_values_total").increment(1);
        self.invalid.insert(key.to_string(), err.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG: &[u8] = b"port: 5432\n";

    #[test]
    fn keys_parse_and_refuse() {
        assert_eq!(Key::parse("services/pg"), Some(Ok(Key::Service("pg".into()))));
        assert_eq!(
            Key::parse("instances/pg/node-a:5432"),
            Some(Ok(Key::Instance("pg".into(), "node-a:5432".into())))
        );
        assert_eq!(Key::parse("other/thing"), None);
        assert!(matches!(
            Key::parse("services/Bad_Name"),
            Some(Err(CatalogError::Name(NameError::ServiceName(_))))
        ));
        assert!(matches!(
            Key::parse("instances/pg"),
            Some(Err(CatalogError::KeyShape))
        ));
        assert!(matches!(
            Key::parse("instances/pg/a/b"),
            Some(Err(CatalogError::Name(NameError::InstanceId(_))))
        ));
    }

    #[test]
    fn service_defaults_and_strictness() {
        let spec = parse_service(PG).unwrap();
        assert_eq!(spec.protocol, Protocol::Tcp);
        assert_eq!(spec.balance, Balance::RoundRobin);
        assert_eq!(spec.connect_timeout, Duration::from_secs(1));
        assert!(parse_service(b"port: 5432\nprotcol: http\n").is_err());
        assert!(parse_service(b"port: 0\n").is_err());
        assert!(parse_service(b"port: 70000\n").is_err());
        assert!(parse_service(b"port: 1\nbalance: random\n").is_err());
        assert!(parse_service(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn json_and_yaml_values_parse_alike() {
        let json = br#"{"host": "10.0.0.1", "port": 5432, "tags": ["a"], "state": "draining"}"#;
        let yaml = b"host: 10.0.0.1\nport: 5432\ntags: [a]\nstate: draining\n";
        assert_eq!(parse_instance(json).unwrap(), parse_instance(yaml).unwrap());
        let err = parse_instance(br#"{"host": "h", "port": 1, "wieght": 2}"#).unwrap_err();
        assert!(err.to_string().contains("wieght"), "{err}");
    }

    #[test]
    fn instance_labels_must_be_template_safe() {
        assert!(
            parse_instance(b"{host: h, port: 1, zone: eu-1a, node: n1.example, tags: [v2, canary]}").is_ok()
        );
        assert!(parse_instance(b"{host: h, port: 1, zone: 'a: b'}").is_err());
        assert!(parse_instance(b"{host: h, port: 1, tags: ['has space']}").is_err());
        assert!(parse_instance(b"{host: h, port: 1, node: ''}").is_err());
        assert!(parse_instance(b"{host: 'h\n', port: 1}").is_err());
    }

    #[test]
    fn labels_are_shared_and_pruned_once_unused() {
        let a = parse_instance(b"{host: h, port: 1, node: n-shared-1, zone: z1}").unwrap();
        let b = parse_instance(br#"{"host": "h", "port": 2, "node": "n-shared-1", "zone": "z1"}"#).unwrap();
        let (na, nb) = (a.node.clone().unwrap(), b.node.clone().unwrap());
        assert!(na.shares_with(&nb), "one allocation for one node name");
        assert_eq!(serde_json::to_value(&a).unwrap()["node"], "n-shared-1");
        drop((a, b, na, nb));
        Label::prune();
        assert!(!crate::names::label_is_interned("n-shared-1"));
    }

    #[test]
    fn bad_value_is_skipped_and_the_rest_stays() {
        let mut catalog = Catalog::default();
        catalog.put("services/pg", PG, 1);
        catalog.put("services/redis", b"port: [nope", 2);
        assert!(catalog.entry("pg").unwrap().spec.is_some());
        assert!(catalog.entry("redis").is_none());
        assert!(catalog.invalid().contains_key("services/redis"));
    }

    #[test]
    fn bad_update_keeps_previous_good_value_until_fixed_or_deleted() {
        let mut catalog = Catalog::default();
        catalog.put("services/pg", PG, 1);
        assert!(catalog.put("services/pg", b"port: nope", 1).is_empty());
        assert_eq!(catalog.entry("pg").unwrap().spec.as_ref().unwrap().port, 5432);
        assert!(catalog.invalid().contains_key("services/pg"));
        catalog.put("services/pg", b"port: 6432", 1);
        assert_eq!(catalog.entry("pg").unwrap().spec.as_ref().unwrap().port, 6432);
        assert!(catalog.invalid().is_empty());
        catalog.delete("services/pg");
        assert!(catalog.entry("pg").is_none());
    }

    #[test]
    fn earlier_address_claim_wins_and_loser_is_served_when_freed() {
        let mut catalog = Catalog::default();
        catalog.put("services/a", PG, 1);
        catalog.put("services/b", PG, 2);
        catalog.put("addresses/a", b"127.100.0.9", 5);
        let touched = catalog.put("addresses/b", b"127.100.0.9", 7);
        assert!(touched.contains(&("a".to_string(), KeyKind::Addresses)));
        assert!(catalog.serving_state("a").is_ok());
        assert_eq!(
            catalog.serving_state("b"),
            Err(Unserved::AddressTaken {
                addr: Ipv4Addr::new(127, 100, 0, 9),
                by: "a".into()
            })
        );
        let touched = catalog.delete("addresses/a");
        assert!(touched.contains(&("b".to_string(), KeyKind::Addresses)));
        assert!(catalog.serving_state("b").is_ok());
    }

    #[test]
    fn replace_rebuilds_from_scratch() {
        let mut catalog = Catalog::default();
        catalog.put("services/old", PG, 1);
        catalog.replace([("services/new", PG, 2), ("addresses/new", &b"127.100.0.3"[..], 2)]);
        assert!(catalog.entry("old").is_none());
        assert!(catalog.serving_state("new").is_ok());
        assert_eq!(catalog.services_without_address(), Vec::<String>::new());
    }

    #[test]
    fn mesh_settings_parse_and_bad_ones_are_refused() {
        let spec =
            parse_service(b"{port: 80, tls: {mode: required}, allow: ['spiffe://prod.mesh/node/web-*']}")
                .unwrap();
        assert_eq!(spec.tls.mode, Some(crate::policy::TlsMode::Required));
        assert_eq!(spec.allow, ["spiffe://prod.mesh/node/web-*"]);
        let err = parse_service(b"{port: 80, allow: [web-1]}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be a SPIFFE ID"), "{err}");
        assert!(parse_service(b"{port: 80, tls: {mode: sometimes}}").is_err());
        let instance =
            parse_instance(b"{host: 127.0.0.1, port: 5432, node: b, mesh: '10.0.0.5:15008'}").unwrap();
        assert_eq!(instance.mesh, Some("10.0.0.5:15008".parse().unwrap()));
        for (value, reason) in [
            (
                "{host: 127.0.0.1, port: 1, node: b, mesh: '127.0.0.1:15008'}",
                "routable",
            ),
            (
                "{host: 127.0.0.1, port: 1, mesh: '10.0.0.5:15008'}",
                "needs its node",
            ),
        ] {
            let err = parse_instance(value.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(reason), "{value}: {err}");
        }
    }
}
