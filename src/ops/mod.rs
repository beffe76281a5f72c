//! Operator verbs against the etcd catalog: services (put, get, list,
//! delete), instances (list, set-state) and a node's routes and status from
//! its agent's admin API. Every write is validated with the same parser the
//! agents use, so a value an agent would refuse never reaches etcd; every
//! listing judges each key with that parser too, so what an operator sees
//! as a service or an instance is what the agents serve, and the rest is
//! marked invalid.
//!
//! [`endpoints`] finds etcd (flags, environment, a daemon's config),
//! [`output`] prints rows as an aligned [`table`] or JSON, [`node`] reads
//! an agent's admin API.

pub mod endpoints;
pub mod node;
pub mod output;
pub mod table;

use crate::catalog::{
    check_instance_id, check_service_name, parse_address, parse_instance, parse_service, CatalogError,
    Instance, InstanceState, Key, ServiceSpec,
};
use crate::registrar::config::parse_state;
use crate::store::etcd::EtcdStore;
use crate::store::StoreError;
use endpoints::{EndpointsError, Target};
use etcd_client::{GetOptions, PutOptions};
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
    #[error(transparent)]
    Endpoints(#[from] EndpointsError),
    #[error("cannot read http://{addr}{path} (the agent's admin API): {reason}")]
    Admin {
        addr: std::net::SocketAddr,
        path: &'static str,
        reason: String,
    },
}

/// One row of `service list`: a key under `services/` as the agents judge it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRow {
    /// The name as it appears in the key (possibly one agents refuse).
    pub service: String,
    /// The definition agents would serve, or why they refuse the key (its
    /// name or its value).
    pub definition: Result<ServiceSpec, String>,
    /// The service's address key: absent, the address, or why agents refuse
    /// it. Always absent for a refused name: no key belongs to it.
    pub address: Option<Result<Ipv4Addr, String>>,
    /// Instances agents accept and refuse; `None` for a refused name.
    pub instances: Option<InstanceCount>,
}

/// `service get`: the key, its value as stored (what `put --file` takes
/// back), and the key judged as in `service list`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceDetail {
    pub key: String,
    pub value: String,
    pub row: ServiceRow,
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

/// Judges a service key (relative to the prefix, `services/...`), its
/// value, its address key's value and the judged instance keys (of every
/// service, or its own) exactly as the agent's catalog does.
fn judge_service(key: &str, value: &[u8], address: Option<&[u8]>, instances: &[InstanceRow]) -> ServiceRow {
    let name = key.strip_prefix("services/").unwrap_or(key).to_string();
    let refused = match Key::parse(key) {
        Some(Ok(Key::Service(_))) => None,
        Some(Err(err)) => Some(err.to_string()),
        Some(Ok(_)) | None => Some(CatalogError::KeyShape.to_string()),
    };
    if let Some(reason) = refused {
        // No address or instance key belongs to a name agents refuse.
        return ServiceRow {
            service: name,
            definition: Err(reason),
            address: None,
            instances: None,
        };
    }
    let mut count = InstanceCount::default();
    for row in instances.iter().filter(|row| row.service == name) {
        match row.instance {
            Ok(_) => count.valid += 1,
            Err(_) => count.invalid += 1,
        }
    }
    ServiceRow {
        definition: parse_service(value).map_err(|err| err.to_string()),
        service: name,
        address: address.map(|v| parse_address(v).map_err(|err| err.to_string())),
        instances: Some(count),
    }
}

/// The catalog in etcd, for operators.
pub struct Ops {
    store: EtcdStore,
}

impl Ops {
    /// Works on `target` (see [`endpoints::resolve`]); connects at the first call.
    pub fn new(target: Target) -> Result<Ops, OpsError> {
        Ok(Ops {
            store: EtcdStore::new(target.etcd, &target.prefix)?,
        })
    }

    /// The full key of a key relative to the prefix.
    pub fn full_key(&self, relative: &str) -> String {
        self.store.full_key(relative)
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

    /// A service's definition as stored, judged as in `service list`.
    pub async fn get_service(&self, name: &str) -> Result<ServiceDetail, OpsError> {
        check_service_name(name)?;
        let relative = format!("services/{name}");
        let key = self.store.full_key(&relative);
        let Some((value, _)) = self.get_raw(&relative).await? else {
            return Err(OpsError::Missing { key });
        };
        let address = self.get_raw(&format!("addresses/{name}")).await?;
        let instances: Vec<InstanceRow> = self
            .list_raw(&format!("instances/{name}/"))
            .await?
            .iter()
            .map(|(key, value)| judge_instance(key, value))
            .collect();
        let row = judge_service(&relative, &value, address.map(|(v, _)| v).as_deref(), &instances);
        Ok(ServiceDetail {
            key,
            value: String::from_utf8_lossy(&value).into_owned(),
            row,
        })
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
        let rows = services.iter().map(|(key, value)| {
            let name = key.strip_prefix("services/").unwrap_or(key);
            let address_key = format!("addresses/{name}");
            let address = addresses
                .iter()
                .find(|(k, _)| *k == address_key)
                .map(|(_, v)| v.as_slice());
            judge_service(key, value, address, &instances)
        });
        Ok(rows.collect())
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
