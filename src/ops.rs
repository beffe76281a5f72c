//! Operator verbs against the etcd catalog: services (put, get, list,
//! delete), instances (list, set-state) and a node's routes from its admin
//! API. Every write is validated with the same parser the agents use, so a
//! value an agent would refuse never reaches etcd; every listing judges each
//! key with that parser too, so what an operator sees as a service or an
//! instance is what the agents serve, and the rest is marked invalid.

use crate::catalog::{
    check_instance_id, check_service_name, parse_address, parse_instance, parse_service, CatalogError,
    Instance, InstanceState, Key,
};
use crate::config::EtcdConfig;
use crate::registrar::config::parse_state;
use crate::store::etcd::EtcdStore;
use crate::store::StoreError;
use etcd_client::{GetOptions, PutOptions};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(#[from] CatalogError),
    #[error("{what} refused: {reason}")]
    Refused { what: String, reason: String },
    #[error("{key} does not exist")]
    Missing { key: String },
    #[error(
        "{key} is registered by a registrar ({owner}), which rewrites it from its own state flags and would undo this change: on that node run: loopmesh set-state --config <registrar config> {id} {state}, or pass --force to write it anyway until the registrar's next write; nothing written"
    )]
    Registered {
        key: String,
        owner: String,
        id: String,
        state: &'static str,
    },
    #[error(
        "no etcd endpoints: pass --etcd URL (ops verbs work on etcd; the file catalog is edited as files)"
    )]
    NoEtcd,
    #[error("cannot read the routes from http://{addr}/routes: {reason}")]
    Admin {
        addr: std::net::SocketAddr,
        reason: String,
    },
}

/// One row of `service list`: a key under `services/` as the agents judge it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRow {
    /// The name as it appears in the key (possibly one agents refuse).
    pub service: String,
    /// The port of the definition agents would serve, or why they refuse
    /// the key (its name or its value).
    pub port: Result<u16, String>,
    /// The service's address key: absent, the address, or why agents refuse
    /// it. Always absent for a refused name: no key belongs to it.
    pub address: Option<Result<Ipv4Addr, String>>,
    /// Instances agents accept and refuse; `None` for a refused name.
    pub instances: Option<InstanceCount>,
}

/// How many instance keys of a service agents accept, and refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InstanceCount {
    pub valid: usize,
    pub invalid: usize,
}

/// One row of `instance list`: a key under `instances/` as the agents judge it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRow {
    /// The service and id as they appear in the key: a key nested too deep
    /// (`instances/web/a/b`) is the id `a/b`, as agents read it.
    pub service: String,
    pub id: String,
    /// The instance agents would use, or why they refuse the key.
    pub instance: Result<Instance, String>,
}

/// What `instance set-state` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct StateSet {
    pub key: String,
    pub state: InstanceState,
    /// Said when a registrar's instance was written anyway (`--force`).
    pub warning: Option<String>,
}

/// Judges an instance key (relative to the prefix, `instances/...`) and
/// its value exactly as the agent's catalog does.
fn judge_instance(key: &str, value: &[u8]) -> InstanceRow {
    let rest = key.strip_prefix("instances/").unwrap_or(key);
    let (service, id) = rest.split_once('/').unwrap_or((rest, ""));
    let instance = match Key::parse(key) {
        Some(Ok(Key::Instance(..))) => parse_instance(value).map_err(|err| err.to_string()),
        Some(Err(err)) => Err(err.to_string()),
        Some(Ok(_)) | None => Err(CatalogError::KeyShape.to_string()),
    };
    InstanceRow {
        service: service.to_string(),
        id: id.to_string(),
        instance,
    }
}

/// A table cell: control characters (a tab or newline in a key or an error)
/// would break the table's lines and columns, so they become spaces.
fn cell(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The `service list` table.
pub fn services_table(rows: &[ServiceRow]) -> String {
    let mut out = String::from("SERVICE\tPORT\tADDRESS\tINSTANCES\n");
    for row in rows {
        let port = match &row.port {
            Ok(port) => port.to_string(),
            Err(reason) => format!("invalid: {reason}"),
        };
        let address = match &row.address {
            None => "-".to_string(),
            Some(Ok(addr)) => addr.to_string(),
            Some(Err(reason)) => format!("invalid: {reason}"),
        };
        let instances = match row.instances {
            None => "-".to_string(),
            Some(InstanceCount { valid, invalid: 0 }) => valid.to_string(),
            Some(InstanceCount { valid, invalid }) => format!("{valid} (+{invalid} invalid)"),
        };
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{instances}",
            cell(&row.service),
            cell(&port),
            cell(&address)
        );
    }
    out
}

/// The `instance list` table; a refused key says why in the ADDRESS column
/// and has `-` in the others, so every line has the same columns.
pub fn instances_table(rows: &[InstanceRow]) -> String {
    let mut out = String::from("SERVICE\tINSTANCE\tADDRESS\tNODE\tZONE\tWEIGHT\tSTATE\tMESH\n");
    for row in rows {
        let (service, id) = (cell(&row.service), cell(&row.id));
        let _ = match &row.instance {
            Ok(i) => writeln!(
                out,
                "{service}\t{id}\t{}:{}\t{}\t{}\t{}\t{}\t{}",
                i.host,
                i.port,
                i.node.as_deref().unwrap_or("-"),
                i.zone.as_deref().unwrap_or("-"),
                i.weight,
                i.state.as_str(),
                // Reached through the mesh at its node's inbound address.
                i.mesh.map_or_else(|| "-".to_string(), |mesh| mesh.to_string())
            ),
            Err(reason) => writeln!(
                out,
                "{service}\t{id}\t{}\t-\t-\t-\t-\t-",
                cell(&format!("invalid: {reason}"))
            ),
        };
    }
    out
}

/// The catalog in etcd, for operators.
pub struct Ops {
    store: EtcdStore,
}

impl Ops {
    pub fn new(endpoints: Option<Vec<String>>, prefix: &str) -> Result<Ops, OpsError> {
        let endpoints = endpoints.filter(|e| !e.is_empty()).ok_or(OpsError::NoEtcd)?;
        Ok(Ops {
            store: EtcdStore::new(EtcdConfig::with_endpoints(endpoints), prefix)?,
        })
    }

    async fn get_raw(&self, relative: &str) -> Result<Option<(Vec<u8>, i64)>, OpsError> {
        let mut kv = self.store.client().await?.kv_client();
        let response = self
            .store
            .timed(kv.get(self.store.full_key(relative), None))
            .await?;
        Ok(response.kvs().first().map(|kv| (kv.value().to_vec(), kv.lease())))
    }

    /// Keys starting with `relative`, relative to the store's prefix (as the
    /// agents see them), in key order. A key that is not UTF-8 is read
    /// lossily: no name or id check accepts the replacement character, so
    /// it is shown refused rather than hidden.
    async fn list_raw(&self, relative: &str) -> Result<Vec<(String, Vec<u8>)>, OpsError> {
        let mut kv = self.store.client().await?.kv_client();
        let base = self.store.full_key("");
        let response = self
            .store
            .timed(kv.get(
                self.store.full_key(relative),
                Some(GetOptions::new().with_prefix()),
            ))
            .await?;
        Ok(response
            .kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                let relative = key.strip_prefix(base.as_str()).unwrap_or(&key).to_string();
                (relative, kv.value().to_vec())
            })
            .collect())
    }

    /// Validates and writes a service definition.
    pub async fn put_service(&self, name: &str, value: &str) -> Result<String, OpsError> {
        check_service_name(name)?;
        parse_service(value.as_bytes()).map_err(|err| OpsError::Refused {
            what: format!("service {name}"),
            reason: err.to_string(),
        })?;
        let mut kv = self.store.client().await?.kv_client();
        let key = self.store.full_key(&format!("services/{name}"));
        self.store.timed(kv.put(key.clone(), value, None)).await?;
        Ok(key)
    }

    /// A service's definition as stored.
    pub async fn get_service(&self, name: &str) -> Result<String, OpsError> {
        check_service_name(name)?;
        let key = format!("services/{name}");
        match self.get_raw(&key).await? {
            Some((value, _)) => Ok(String::from_utf8_lossy(&value).into_owned()),
            None => Err(OpsError::Missing {
                key: self.store.full_key(&key),
            }),
        }
    }

    /// Every key under `services/`, judged as the agents judge it, with its
    /// address and how many of its instances they accept.
    pub async fn service_rows(&self) -> Result<Vec<ServiceRow>, OpsError> {
        let services = self.list_raw("services/").await?;
        let addresses = self.list_raw("addresses/").await?;
        let instances: Vec<InstanceRow> = self
            .list_raw("instances/")
            .await?
            .iter()
            .map(|(key, value)| judge_instance(key, value))
            .collect();
        let rows = services.into_iter().map(|(key, value)| {
            let name = key.strip_prefix("services/").unwrap_or(&key).to_string();
            let refused = match Key::parse(&key) {
                Some(Ok(Key::Service(_))) => None,
                Some(Err(err)) => Some(err.to_string()),
                Some(Ok(_)) | None => Some(CatalogError::KeyShape.to_string()),
            };
            if let Some(reason) = refused {
                // No address or instance key belongs to a name agents refuse.
                return ServiceRow {
                    service: name,
                    port: Err(reason),
                    address: None,
                    instances: None,
                };
            }
            let address_key = format!("addresses/{name}");
            let address = addresses
                .iter()
                .find(|(k, _)| *k == address_key)
                .map(|(_, v)| parse_address(v).map_err(|err| err.to_string()));
            let mut count = InstanceCount::default();
            for row in instances.iter().filter(|row| row.service == name) {
                match row.instance {
                    Ok(_) => count.valid += 1,
                    Err(_) => count.invalid += 1,
                }
            }
            ServiceRow {
                port: parse_service(&value)
                    .map(|spec| spec.port)
                    .map_err(|err| err.to_string()),
                service: name,
                address,
                instances: Some(count),
            }
        });
        Ok(rows.collect())
    }

    /// Every service with its port, address and instance count, as a table.
    pub async fn list_services(&self) -> Result<String, OpsError> {
        Ok(services_table(&self.service_rows().await?))
    }

    /// Deletes a service definition (its instances and address stay).
    pub async fn delete_service(&self, name: &str) -> Result<String, OpsError> {
        check_service_name(name)?;
        let mut kv = self.store.client().await?.kv_client();
        let key = self.store.full_key(&format!("services/{name}"));
        let deleted = self.store.timed(kv.delete(key.clone(), None)).await?;
        if deleted.deleted() == 0 {
            return Err(OpsError::Missing { key });
        }
        Ok(key)
    }

    /// Every key under `instances/` (of one service, or all), judged as the
    /// agents judge it.
    pub async fn instance_rows(&self, service: Option<&str>) -> Result<Vec<InstanceRow>, OpsError> {
        if let Some(name) = service {
            check_service_name(name)?;
        }
        let prefix = service.map_or("instances/".to_string(), |s| format!("instances/{s}/"));
        Ok(self
            .list_raw(&prefix)
            .await?
            .iter()
            .map(|(key, value)| judge_instance(key, value))
            .collect())
    }

    /// Instances (of one service, or all) with their state, as a table.
    pub async fn list_instances(&self, service: Option<&str>) -> Result<String, OpsError> {
        Ok(instances_table(&self.instance_rows(service).await?))
    }

    /// Sets an instance's state in place, keeping its lease.
    ///
    /// An instance under a lease is a registrar's: it writes its instances
    /// from its own state flags, so a change made here would be undone at
    /// its next write (a health flip, a flag, a new lease). That quiet
    /// divergence is refused, pointing at `loopmesh set-state` on the node,
    /// unless `force` asks to write anyway (then a warning says so).
    pub async fn set_instance_state(
        &self,
        service: &str,
        id: &str,
        state: &str,
        force: bool,
    ) -> Result<StateSet, OpsError> {
        check_service_name(service)?;
        check_instance_id(id)?;
        let state: InstanceState = parse_state(state).map_err(|reason| OpsError::Refused {
            what: format!("state for {service}/{id}"),
            reason,
        })?;
        let relative = format!("instances/{service}/{id}");
        let key = self.store.full_key(&relative);
        let Some((value, lease)) = self.get_raw(&relative).await? else {
            return Err(OpsError::Missing { key });
        };
        let mut instance = parse_instance(&value).map_err(|err| OpsError::Refused {
            what: format!("the stored value of {key}"),
            reason: err.to_string(),
        })?;
        let mut warning = None;
        if lease != 0 {
            let owner = match &instance.node {
                Some(node) => format!("node {node}, lease {lease:x}"),
                None => format!("lease {lease:x}"),
            };
            if !force {
                return Err(OpsError::Registered {
                    key,
                    owner,
                    id: id.to_string(),
                    state: state.as_str(),
                });
            }
            warning = Some(format!(
                "warning: {key} is registered by a registrar ({owner}); written because of --force, but the registrar's flag wins at its next write (on that node: loopmesh set-state --config <registrar config> {id} {})",
                state.as_str()
            ));
        }
        instance.state = state;
        let value = serde_json::to_vec(&instance).map_err(|err| OpsError::Refused {
            what: format!("the new value of {key}"),
            reason: err.to_string(),
        })?;
        let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let mut kv = self.store.client().await?.kv_client();
        self.store.timed(kv.put(key.clone(), value, options)).await?;
        Ok(StateSet { key, state, warning })
    }
}

/// A node's routes from its admin API, as a table.
pub async fn show_routes(addr: std::net::SocketAddr) -> Result<String, OpsError> {
    let admin_error = |reason: String| OpsError::Admin { addr, reason };
    let body = http_get(addr, "/routes").await.map_err(admin_error)?;
    let routes: serde_json::Value =
        serde_json::from_str(&body).map_err(|err| admin_error(err.to_string()))?;
    let mut out = String::from("SERVICE\tLISTEN\tSTATUS\tBACKENDS\n");
    for route in routes.as_array().into_iter().flatten() {
        let status = if route["listening"] == true {
            "listening".to_string()
        } else {
            format!("not listening: {}", route["error"].as_str().unwrap_or("?"))
        };
        let backends: Vec<String> = route["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                let ejected = if b["ejected"] == true { ",ejected" } else { "" };
                // Through the mesh: via which node, and the identity it must show.
                let peer = match (b["mesh"].as_str(), b["peer"].as_str()) {
                    (Some(mesh), Some(peer)) => format!(",via {mesh} as {peer}"),
                    _ => String::new(),
                };
                format!(
                    "{}={}:{}({}{ejected}{peer})",
                    b["id"].as_str().unwrap_or("?"),
                    b["host"].as_str().unwrap_or("?"),
                    b["port"],
                    b["state"].as_str().unwrap_or("?")
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "{}\t{}:{}\t{status}\t{}",
            route["service"].as_str().unwrap_or("?"),
            route["address"].as_str().unwrap_or("?"),
            route["port"],
            if backends.is_empty() {
                "-".to_string()
            } else {
                backends.join(" ")
            }
        );
    }
    Ok(out)
}

/// The body of a GET on the admin API, if it answers 200 within 5 s.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String, String> {
    use http_body_util::BodyExt;
    let exchange = async {
        let response = crate::http::get(&addr.ip().to_string(), addr.port(), path, "loopmesh").await?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| err.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("status {status}"));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5s".to_string())?
}
