//! The routing table: one file per service under `<state_dir>/routes/`.
//!
//! This is what the data plane loads and what an operator reads to know
//! what the node does. The agent renders it from the catalog as pretty JSON
//! (which is YAML too), validating every file before it goes live; in static
//! mode an operator may write the files by hand, in JSON or YAML. Either way
//! they are parsed and validated here, and a table that fails validation is
//! refused as a whole. JSON is parsed with serde_json (about 2 µs a file)
//! rather than the YAML parser (30-100 µs), which matters at 10k services.

use crate::addresses::check_service_address;
use crate::catalog::{
    self, check_instance_id, check_service_name, check_service_settings, Balance, InstanceState, Outlier,
    Protocol, MAX_WEIGHT,
};
use crate::yaml;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Directory of the routing table inside the state directory.
pub const ROUTES_DIR: &str = "routes";

/// A routing table file or directory that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("route {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot read routing table {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("routing table {dir}: {first} and {second} both listen on {address}:{port}")]
    Clash {
        dir: PathBuf,
        first: String,
        second: String,
        address: Ipv4Addr,
        port: u16,
    },
}

/// One service's route: where it listens and where it forwards.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Who wrote the file (informational; the agent fills it in).
    #[serde(default)]
    pub rendered_by: Option<String>,
    pub service: String,
    pub address: Ipv4Addr,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default = "catalog::default_connect_timeout", with = "crate::duration")]
    pub connect_timeout: Duration,
    #[serde(default = "catalog::default_idle_timeout", with = "crate::duration")]
    pub idle_timeout: Duration,
    #[serde(default = "catalog::default_retries")]
    pub retries: u32,
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub outlier: Outlier,
    #[serde(default)]
    pub backends: Vec<Backend>,
}

/// One backend of a route.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub id: String,
    pub host: String,
    pub port: u16,
    #[serde(default = "catalog::default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub state: InstanceState,
}

impl Route {
    /// Parses and validates one route file's text (JSON or YAML).
    pub fn parse(text: &str) -> Result<Route, String> {
        let route: Route = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| e.to_string())?
        } else {
            yaml::from_str(text).map_err(|e| e.to_string())?
        };
        route.validate()?;
        Ok(route)
    }

    fn validate(&self) -> Result<(), String> {
        check_service_name(&self.service).map_err(|e| e.to_string())?;
        check_service_address(self.address).map_err(|e| e.to_string())?;
        check_service_settings(
            self.port,
            self.connect_timeout,
            self.idle_timeout,
            self.retries,
            self.max_connections,
            &self.outlier,
        )?;
        let mut ids = HashSet::new();
        for backend in &self.backends {
            check_instance_id(&backend.id).map_err(|e| e.to_string())?;
            if !ids.insert(backend.id.as_str()) {
                return Err(format!("backend id {} appears twice", backend.id));
            }
            if backend.host.is_empty() || backend.port == 0 {
                return Err(format!("backend {} needs a host and a port 1-65535", backend.id));
            }
            if backend.weight > MAX_WEIGHT {
                return Err(format!(
                    "backend {} weight {} exceeds {MAX_WEIGHT}",
                    backend.id, backend.weight
                ));
            }
        }
        Ok(())
    }
}

/// Parses one route file, naming it on error.
pub fn load_route(path: &Path) -> Result<Route, RoutingError> {
    let text = std::fs::read_to_string(path).map_err(|source| RoutingError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let route = Route::parse(&text).map_err(|reason| RoutingError::Invalid {
        path: path.to_path_buf(),
        reason,
    })?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    if stem.as_deref() != Some(route.service.as_str()) {
        let extension = path.extension().map_or("yaml".into(), |e| e.to_string_lossy());
        return Err(RoutingError::Invalid {
            path: path.to_path_buf(),
            reason: format!(
                "file name must be {}.{extension} for service {}",
                route.service, route.service
            ),
        });
    }
    Ok(route)
}

/// Loads and validates a whole routing table directory; any error refuses it.
pub fn load_table(dir: &Path) -> Result<BTreeMap<String, Route>, RoutingError> {
    let read_err = |source| RoutingError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut table = BTreeMap::new();
    let listing = match std::fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(table),
        Err(err) => return Err(read_err(err)),
    };
    for item in listing {
        let path = item.map_err(read_err)?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let is_route = [".json", ".yaml", ".yml"].iter().any(|ext| name.ends_with(ext));
        if name.starts_with('.') || !is_route {
            continue;
        }
        let route = load_route(&path)?;
        table.insert(route.service.clone(), route);
    }
    let mut listeners: HashMap<(Ipv4Addr, u16), &str> = HashMap::new();
    for route in table.values() {
        if let Some(first) = listeners.insert((route.address, route.port), &route.service) {
            return Err(RoutingError::Clash {
                dir: dir.to_path_buf(),
                first: first.to_string(),
                second: route.service.clone(),
                address: route.address,
                port: route.port,
            });
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_minimal_hand_written_route_takes_the_catalogs_defaults() {
        let route = super::Route::parse(
            "service: web\naddress: 127.100.0.8\nport: 8080\nbackends:\n  - {id: a, host: 10.0.0.1, port: 8080}\n",
        )
        .unwrap();
        let spec = crate::catalog::parse_service(b"port: 8080").unwrap();
        assert_eq!(route.connect_timeout, spec.connect_timeout);
        assert_eq!(route.idle_timeout, spec.idle_timeout);
        assert_eq!(route.retries, spec.retries);
        assert_eq!((route.balance, route.protocol), (spec.balance, spec.protocol));
        assert_eq!(route.backends[0].weight, 1);
    }

    use super::*;

    const ROUTE: &str = "service: pg\naddress: 127.100.0.7\nport: 5432\nconnect_timeout: 1s\nidle_timeout: 600s\nretries: 2\nbackends:\n  - {id: a, host: 10.0.0.1, port: 5432}\n";

    #[test]
    fn parses_a_route() {
        let route = Route::parse(ROUTE).unwrap();
        assert_eq!(route.backends[0].weight, 1);
        assert_eq!(route.backends[0].state, InstanceState::Up);
    }

    #[test]
    fn refuses_bad_routes() {
        assert!(Route::parse(&ROUTE.replace("127.100.0.7", "127.0.0.1")).is_err());
        assert!(Route::parse(&ROUTE.replace("port: 5432\nconnect", "port: 0\nconnect")).is_err());
        assert!(Route::parse(&format!("{ROUTE}  - {{id: a, host: h, port: 1}}\n")).is_err());
        assert!(Route::parse(&format!("{ROUTE}extra: 1\n")).is_err());
        assert!(Route::parse(&ROUTE.replace("retries: 2", "retries: 17")).is_err());
    }

    #[test]
    fn json_and_yaml_parse_alike() {
        let json = r#"{"service": "pg", "address": "127.100.0.7", "port": 5432, "connect_timeout": "1s",
            "idle_timeout": "600s", "retries": 2, "backends": [{"id": "a", "host": "10.0.0.1", "port": 5432}]}"#;
        assert_eq!(Route::parse(json).unwrap(), Route::parse(ROUTE).unwrap());
        let err = Route::parse(&json.replace("\"retries\"", "\"retires\"")).unwrap_err();
        assert!(err.contains("retires"), "{err}");
    }

    #[test]
    fn table_refuses_two_services_on_one_listener() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pg.yaml"), ROUTE).unwrap();
        std::fs::write(
            dir.path().join("pg2.yaml"),
            ROUTE.replace("service: pg", "service: pg2"),
        )
        .unwrap();
        assert!(matches!(load_table(dir.path()), Err(RoutingError::Clash { .. })));
        std::fs::remove_file(dir.path().join("pg2.yaml")).unwrap();
        assert_eq!(load_table(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn file_name_must_match_service() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("other.yaml"), ROUTE).unwrap();
        assert!(load_table(dir.path()).is_err());
        // The fix it names keeps the file's own extension.
        let json = dir.path().join("other.json");
        std::fs::write(&json, ROUTE).unwrap();
        let err = load_route(&json).unwrap_err().to_string();
        assert!(err.contains("file name must be pg.json for service pg"), "{err}");
    }
}
