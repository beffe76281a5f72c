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
use crate::catalog::{check_instance_id, check_service_name, Instance, ServiceSpec};
use crate::yaml;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

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

/// One service's route: where it listens, its definition as the catalog
/// holds it, and its backends.
///
/// Nothing here is a second copy of the schema: `spec` is the catalog's
/// [`ServiceSpec`] and each backend the catalog's [`Instance`], keyed by
/// instance id; both are strict where they are defined.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Who wrote the file (informational; the agent fills it in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendered_by: Option<String>,
    pub service: String,
    pub address: Ipv4Addr,
    /// The service definition: port and traffic policy.
    pub spec: ServiceSpec,
    /// Instances by id.
    #[serde(default)]
    pub backends: BTreeMap<String, Instance>,
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
        self.spec.validate().map_err(|reason| format!("spec: {reason}"))?;
        for (id, instance) in &self.backends {
            check_instance_id(id).map_err(|e| e.to_string())?;
            instance
                .validate()
                .map_err(|reason| format!("backend {id}: {reason}"))?;
        }
        Ok(())
    }

    /// The port the service listens on.
    pub fn port(&self) -> u16 {
        self.spec.port
    }

    /// The route without its backends.
    pub fn head(&self) -> RouteHead {
        RouteHead {
            rendered_by: self.rendered_by.clone(),
            service: self.service.clone(),
            address: self.address,
            spec: self.spec.clone(),
            backends: serde::de::IgnoredAny,
        }
    }
}

/// A route without its backends: what the proxy keeps of a service until
/// the service is used (its backends are read back from the file then).
/// Parsing it skips the backends without building them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteHead {
    #[serde(default)]
    pub rendered_by: Option<String>,
    pub service: String,
    pub address: Ipv4Addr,
    pub spec: ServiceSpec,
    /// Skipped, not built: read back from the file when the service is used.
    #[serde(default)]
    #[allow(dead_code)]
    backends: serde::de::IgnoredAny,
}

impl RouteHead {
    /// The port the service listens on.
    pub fn port(&self) -> u16 {
        self.spec.port
    }
}

/// Where a route came from: its file, and a digest of the file's text
/// (two renders of the same route write the same text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFile {
    pub path: PathBuf,
    pub digest: u64,
}

/// A digest of a route file's text.
pub fn digest(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// Reads a route file's head (service, address, definition) and its
/// digest, without building its backends: for a file a render has just
/// written and checked whole.
pub fn load_route_head(path: &Path) -> Result<(RouteHead, RouteFile), RoutingError> {
    let text = read_route_text(path)?;
    let invalid = |reason: String| RoutingError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let head: RouteHead = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?
    } else {
        yaml::from_str(&text).map_err(|e| invalid(e.to_string()))?
    };
    check_service_name(&head.service).map_err(|e| invalid(e.to_string()))?;
    check_service_address(head.address).map_err(|e| invalid(e.to_string()))?;
    head.spec
        .validate()
        .map_err(|reason| invalid(format!("spec: {reason}")))?;
    check_file_name(path, &head.service)?;
    let file = RouteFile {
        path: path.to_path_buf(),
        digest: digest(&text),
    };
    Ok((head, file))
}

fn read_route_text(path: &Path) -> Result<String, RoutingError> {
    std::fs::read_to_string(path).map_err(|source| RoutingError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A route file must be named after its service.
fn check_file_name(path: &Path, service: &str) -> Result<(), RoutingError> {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    if stem.as_deref() == Some(service) {
        return Ok(());
    }
    let extension = path.extension().map_or("yaml".into(), |e| e.to_string_lossy());
    Err(RoutingError::Invalid {
        path: path.to_path_buf(),
        reason: format!("file name must be {service}.{extension} for service {service}"),
    })
}

/// Parses one route file, naming it on error.
pub fn load_route(path: &Path) -> Result<Route, RoutingError> {
    Ok(load_route_file(path)?.0)
}

/// [`load_route`], with the file and its digest.
pub fn load_route_file(path: &Path) -> Result<(Route, RouteFile), RoutingError> {
    let text = read_route_text(path)?;
    let route = Route::parse(&text).map_err(|reason| RoutingError::Invalid {
        path: path.to_path_buf(),
        reason,
    })?;
    check_file_name(path, &route.service)?;
    let file = RouteFile {
        path: path.to_path_buf(),
        digest: digest(&text),
    };
    Ok((route, file))
}

/// Loads and validates a whole routing table directory; any error refuses it.
pub fn load_table(dir: &Path) -> Result<BTreeMap<String, Route>, RoutingError> {
    Ok(load_table_files(dir)?
        .into_iter()
        .map(|(name, (route, _))| (name, route))
        .collect())
}

/// [`load_table`], each route with the file it came from.
pub fn load_table_files(dir: &Path) -> Result<BTreeMap<String, (Route, RouteFile)>, RoutingError> {
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
        let (route, file) = load_route_file(&path)?;
        table.insert(route.service.clone(), (route, file));
    }
    let mut listeners: HashMap<(Ipv4Addr, u16), &str> = HashMap::new();
    for (route, _) in table.values() {
        if let Some(first) = listeners.insert((route.address, route.port()), &route.service) {
            return Err(RoutingError::Clash {
                dir: dir.to_path_buf(),
                first: first.to_string(),
                second: route.service.clone(),
                address: route.address,
                port: route.port(),
            });
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::InstanceState;

    const ROUTE: &str = "service: pg\naddress: 127.100.0.7\nspec: {port: 5432, connect_timeout: 1s, retries: 2}\nbackends:\n  a: {host: 10.0.0.1, port: 5432}\n";

    #[test]
    fn a_minimal_hand_written_route_takes_the_catalogs_defaults() {
        let route = Route::parse(
            "service: web\naddress: 127.100.0.8\nspec: {port: 8080}\nbackends:\n  a: {host: 10.0.0.1, port: 8080}\n",
        )
        .unwrap();
        let spec = crate::catalog::parse_service(b"port: 8080").unwrap();
        assert_eq!(route.spec, spec);
        assert_eq!(route.backends["a"].weight, 1);
    }

    #[test]
    fn parses_a_route() {
        let route = Route::parse(ROUTE).unwrap();
        assert_eq!(route.backends["a"].weight, 1);
        assert_eq!(route.backends["a"].state, InstanceState::Up);
        assert_eq!(route.port(), 5432);
    }

    #[test]
    fn refuses_bad_routes() {
        for (bad, reason) in [
            (ROUTE.replace("127.100.0.7", "127.0.0.1"), "127.0.0.1"),
            (ROUTE.replace("port: 5432,", "port: 0,"), "port must be 1-65535"),
            (
                format!("{ROUTE}  b: {{host: 'h h', port: 1}}\n"),
                "backend b: host",
            ),
            (format!("{ROUTE}extra: 1\n"), "extra"),
            (ROUTE.replace("retries: 2", "retries: 17"), "retries 17"),
            (ROUTE.replace("retries: 2", "retires: 2"), "retires"),
            (ROUTE.replace("port: 5432}", "port: 5432, wieght: 1}"), "wieght"),
            (ROUTE.replace("  a:", "  'a/b':"), "a/b"),
        ] {
            let err = Route::parse(&bad).expect_err(&bad);
            assert!(err.contains(reason), "{bad}: {err}");
        }
    }

    #[test]
    fn the_rendered_form_round_trips_and_json_and_yaml_parse_alike() {
        let route = Route::parse(ROUTE).unwrap();
        let json = serde_json::to_string_pretty(&route).unwrap();
        assert_eq!(Route::parse(&json).unwrap(), route);
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
    fn a_head_is_read_without_its_backends_and_names_the_file_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pg.yaml");
        std::fs::write(&path, ROUTE).unwrap();
        let (head, file) = load_route_head(&path).unwrap();
        assert_eq!((head.service.as_str(), head.port()), ("pg", 5432));
        assert_eq!(file.digest, digest(ROUTE));
        let (_, whole) = load_route_file(&path).unwrap();
        assert_eq!(whole, file, "the same file, the same digest");
        std::fs::write(&path, ROUTE.replace("retries: 2", "retires: 2")).unwrap();
        let err = load_route_head(&path).unwrap_err().to_string();
        assert!(err.contains("pg.yaml") && err.contains("retires"), "{err}");
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
