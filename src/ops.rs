//! Operator verbs against the etcd catalog: services (put, get, list,
//! delete), instances (list, set-state) and a node's routes from its admin
//! API. Every write is validated with the same parser the agents use, so a
//! value an agent would refuse never reaches etcd.

use crate::catalog::{
    check_instance_id, check_service_name, parse_instance, parse_service, CatalogError, InstanceState,
};
use crate::config::EtcdConfig;
use crate::registrar::config::parse_state;
use crate::store::etcd::EtcdStore;
use crate::store::StoreError;
use etcd_client::{GetOptions, PutOptions};
use std::fmt::Write as _;

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
        "no etcd endpoints: pass --etcd URL (ops verbs work on etcd; the file catalog is edited as files)"
    )]
    NoEtcd,
    #[error("cannot read the routes from http://{addr}/routes: {reason}")]
    Admin {
        addr: std::net::SocketAddr,
        reason: String,
    },
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

    async fn list_raw(&self, relative: &str) -> Result<Vec<(String, Vec<u8>)>, OpsError> {
        let mut kv = self.store.client().await?.kv_client();
        let prefix = self.store.full_key(relative);
        let response = self
            .store
            .timed(kv.get(prefix.clone(), Some(GetOptions::new().with_prefix())))
            .await?;
        Ok(response
            .kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                (key[prefix.len()..].to_string(), kv.value().to_vec())
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

    /// Every service with its port, address and instance count.
    pub async fn list_services(&self) -> Result<String, OpsError> {
        let services = self.list_raw("services/").await?;
        let addresses = self.list_raw("addresses/").await?;
        let instances = self.list_raw("instances/").await?;
        let mut out = String::from("SERVICE\tPORT\tADDRESS\tINSTANCES\n");
        for (name, value) in services {
            let port =
                parse_service(&value).map_or_else(|err| format!("invalid: {err}"), |s| s.port.to_string());
            let address = addresses
                .iter()
                .find(|(n, _)| *n == name)
                .map_or("-".into(), |(_, v)| String::from_utf8_lossy(v).trim().to_string());
            let count = instances
                .iter()
                .filter(|(k, _)| k.split('/').next() == Some(&name))
                .count();
            let _ = writeln!(out, "{name}\t{port}\t{address}\t{count}");
        }
        Ok(out)
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

    /// Instances (of one service, or all) with their state.
    pub async fn list_instances(&self, service: Option<&str>) -> Result<String, OpsError> {
        if let Some(name) = service {
            check_service_name(name)?;
        }
        let prefix = service.map_or("instances/".to_string(), |s| format!("instances/{s}/"));
        let mut out = String::from("SERVICE\tINSTANCE\tADDRESS\tNODE\tZONE\tWEIGHT\tSTATE\n");
        for (key, value) in self.list_raw(&prefix).await? {
            let key = key.trim_start_matches('/');
            let full = format!("{prefix}{key}");
            let (service, id) = full["instances/".len()..].split_once('/').unwrap_or((&full, ""));
            match parse_instance(&value) {
                Ok(i) => {
                    let _ = writeln!(
                        out,
                        "{service}\t{id}\t{}:{}\t{}\t{}\t{}\t{}",
                        i.host,
                        i.port,
                        i.node.as_deref().unwrap_or("-"),
                        i.zone.as_deref().unwrap_or("-"),
                        i.weight,
                        i.state.as_str()
                    );
                }
                Err(err) => {
                    let _ = writeln!(out, "{service}\t{id}\tinvalid: {err}");
                }
            }
        }
        Ok(out)
    }

    /// Sets an instance's state in place, keeping its lease (a registrar's
    /// instance stays under the registrar's lease; the registrar's own flag,
    /// `loopmesh set-state`, is what survives its next write).
    pub async fn set_instance_state(&self, service: &str, id: &str, state: &str) -> Result<String, OpsError> {
        check_service_name(service)?;
        check_instance_id(id)?;
        let state: InstanceState = parse_state(state).map_err(|reason| OpsError::Refused {
            what: format!("state for {service}/{id}"),
            reason,
        })?;
        let relative = format!("instances/{service}/{id}");
        let Some((value, lease)) = self.get_raw(&relative).await? else {
            return Err(OpsError::Missing {
                key: self.store.full_key(&relative),
            });
        };
        let mut instance = parse_instance(&value).map_err(|err| OpsError::Refused {
            what: format!("the stored value of {relative}"),
            reason: err.to_string(),
        })?;
        instance.state = state;
        let value = serde_json::to_vec(&instance).expect("instances serialize");
        let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let mut kv = self.store.client().await?.kv_client();
        let key = self.store.full_key(&relative);
        self.store.timed(kv.put(key.clone(), value, options)).await?;
        Ok(format!("{key}: {}", state.as_str()))
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
                format!(
                    "{}={}:{}({}{ejected})",
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
