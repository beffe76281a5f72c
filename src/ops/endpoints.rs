//! Where the ops verbs find etcd, so they work from an operator's shell
//! against a secured cluster without repeating what the node's config
//! already says.
//!
//! Endpoints, first found wins: `--etcd`, `LOOPMESH_ETCD`,
//! `ETCDCTL_ENDPOINTS` (as etcdctl reads it: a `host:port` without a scheme
//! is `http://`, or `https://` when the config sets TLS), the `store.etcd`
//! section of `--config` (an agent's or a registrar's config). TLS,
//! credentials and timeouts come from that section whichever endpoints
//! win, as the daemons apply `--etcd` over their configs. The prefix:
//! `--prefix`, else the config's `store.prefix`, else `/loopmesh`.

use crate::config::{read_yaml, resolve_store_paths, validate_store, ConfigError, EtcdConfig, StoreConfig};
use serde::Deserialize;
use std::path::Path;

/// The environment variable naming etcd endpoints for the ops verbs.
pub const LOOPMESH_ETCD: &str = "LOOPMESH_ETCD";
/// etcdctl's variable, read when `LOOPMESH_ETCD` is unset.
pub const ETCDCTL_ENDPOINTS: &str = "ETCDCTL_ENDPOINTS";

#[derive(Debug, thiserror::Error)]
pub enum EndpointsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "no etcd endpoints: pass --etcd URL, set {LOOPMESH_ETCD} (or {ETCDCTL_ENDPOINTS}), or --config an agent or registrar config with a store.etcd section (ops verbs work on etcd; the file catalog is edited as files)"
    )]
    None,
    #[error("{config}: its store has no etcd section (a file catalog, edited as files); pass --etcd URL or set {LOOPMESH_ETCD}")]
    FileCatalog { config: String },
    #[error("{field} from {origin}: {reason}; nothing done")]
    Invalid {
        field: &'static str,
        origin: String,
        reason: String,
    },
}

/// An etcd to work on: connection settings, key prefix, and where the
/// endpoints came from (for messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub etcd: EtcdConfig,
    pub prefix: String,
    pub origin: String,
}

/// What the ops verbs were given: flags, the process environment, a config.
#[derive(Debug, Clone, Default)]
pub struct Given<'a> {
    pub etcd: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub config: Option<&'a Path>,
}

/// Only the `store` section of an agent or registrar config: the rest
/// (templates, checks...) is theirs to judge.
#[derive(Debug, Default, Deserialize)]
struct StoreSection {
    #[serde(default)]
    store: StoreConfig,
}

/// Endpoints from an environment variable's value: comma-separated,
/// blanks dropped; an unset or empty variable is no endpoints.
fn split(value: Option<String>) -> Option<Vec<String>> {
    let endpoints: Vec<String> = value?
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect();
    (!endpoints.is_empty()).then_some(endpoints)
}

/// Resolves `given` with `env` as the environment (a function, so the
/// precedence is testable without touching the process environment).
pub fn resolve(given: &Given, env: impl Fn(&str) -> Option<String>) -> Result<Target, EndpointsError> {
    let (mut store, config_origin) = match given.config {
        Some(path) => {
            let mut section: StoreSection = read_yaml(path)?;
            let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
            resolve_store_paths(&mut section.store, &base);
            (section.store, Some(path.display().to_string()))
        }
        None => (StoreConfig::default(), None),
    };
    let tls = store.etcd.as_ref().is_some_and(|etcd| etcd.tls.is_some());
    let chosen = given
        .etcd
        .clone()
        .filter(|endpoints| !endpoints.is_empty())
        .map(|endpoints| (endpoints, "--etcd".to_string()))
        .or_else(|| split(env(LOOPMESH_ETCD)).map(|e| (e, LOOPMESH_ETCD.to_string())))
        .or_else(|| {
            split(env(ETCDCTL_ENDPOINTS)).map(|endpoints| {
                let scheme = if tls { "https://" } else { "http://" };
                let endpoints = endpoints
                    .into_iter()
                    .map(|e| {
                        if e.contains("://") {
                            e
                        } else {
                            format!("{scheme}{e}")
                        }
                    })
                    .collect();
                (endpoints, ETCDCTL_ENDPOINTS.to_string())
            })
        });
    let origin = match (chosen, &store.etcd, config_origin) {
        (Some((endpoints, origin)), Some(_), _) => {
            if let Some(etcd) = &mut store.etcd {
                etcd.endpoints = endpoints;
            }
            origin
        }
        (Some((endpoints, origin)), None, _) => {
            store.etcd = Some(EtcdConfig::with_endpoints(endpoints));
            origin
        }
        (None, Some(_), Some(config)) => config,
        (None, None, Some(config)) => return Err(EndpointsError::FileCatalog { config }),
        (None, _, None) => return Err(EndpointsError::None),
    };
    if let Some(prefix) = &given.prefix {
        store.prefix = prefix.clone();
    }
    validate_store(&store).map_err(|(field, reason)| EndpointsError::Invalid {
        field,
        origin: match field {
            "store.etcd.endpoints" => origin.clone(),
            "store.prefix" if given.prefix.is_some() => "--prefix".to_string(),
            _ => given
                .config
                .map_or_else(|| origin.clone(), |p| p.display().to_string()),
        },
        reason,
    })?;
    let etcd = store.etcd.ok_or(EndpointsError::None)?;
    Ok(Target {
        etcd,
        prefix: store.prefix,
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
    }

    /// A directory holding `agent.yaml` with `text`, and that file's path.
    fn config(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    /// `--config path` and nothing else.
    fn only(path: &Path) -> Given<'_> {
        Given {
            config: Some(path),
            ..Given::default()
        }
    }

    #[test]
    fn the_flag_wins_then_loopmesh_etcd_then_etcdctl_endpoints_then_the_config() {
        let (_dir, path) = config("store: {prefix: /mesh, etcd: {endpoints: [\"http://10.0.0.9:2379\"], username: u, password: p}}\nstate_dir: state\ntemplates: []\n");
        let both = env(&[
            (LOOPMESH_ETCD, "http://10.0.0.1:2379, http://10.0.0.2:2379"),
            (ETCDCTL_ENDPOINTS, "10.0.0.3:2379"),
        ]);
        let flag = Given {
            etcd: Some(vec!["http://10.0.0.4:2379".into()]),
            prefix: None,
            config: Some(&path),
        };
        let target = resolve(&flag, &both).unwrap();
        assert_eq!(target.etcd.endpoints, ["http://10.0.0.4:2379"]);
        assert_eq!(target.origin, "--etcd");
        assert_eq!(
            target.etcd.username.as_deref(),
            Some("u"),
            "credentials from the config"
        );
        assert_eq!(target.prefix, "/mesh", "the prefix from the config");

        let no_flag = only(&path);
        let target = resolve(&no_flag, &both).unwrap();
        assert_eq!(
            target.etcd.endpoints,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(target.origin, LOOPMESH_ETCD);

        let target = resolve(&no_flag, env(&[(ETCDCTL_ENDPOINTS, "10.0.0.3:2379")])).unwrap();
        assert_eq!(
            target.etcd.endpoints,
            ["http://10.0.0.3:2379"],
            "etcdctl's bare host:port"
        );
        assert_eq!(target.origin, ETCDCTL_ENDPOINTS);

        let target = resolve(&no_flag, env(&[(LOOPMESH_ETCD, " ")])).unwrap();
        assert_eq!(
            target.etcd.endpoints,
            ["http://10.0.0.9:2379"],
            "an empty variable is unset"
        );
        assert_eq!(target.origin, path.display().to_string());

        let prefix = Given {
            prefix: Some("/other".into()),
            ..no_flag
        };
        assert_eq!(resolve(&prefix, env(&[])).unwrap().prefix, "/other");
    }

    #[test]
    fn config_paths_resolve_against_its_directory_and_tls_makes_bare_endpoints_https() {
        let (dir, path) =
            config("store: {etcd: {endpoints: [\"https://e:2379\"], tls: {ca_file: ca.pem}}}\n");
        let given = only(&path);
        let target = resolve(&given, env(&[(ETCDCTL_ENDPOINTS, "e2:2379")])).unwrap();
        assert_eq!(target.etcd.endpoints, ["https://e2:2379"]);
        assert_eq!(target.etcd.tls.unwrap().ca_file, dir.path().join("ca.pem"));
        assert_eq!(target.prefix, "/loopmesh");
    }

    #[test]
    fn nothing_a_file_catalog_or_a_bad_endpoint_is_one_clear_line() {
        let err = resolve(&Given::default(), env(&[])).unwrap_err().to_string();
        assert!(
            err.starts_with("no etcd endpoints: pass --etcd URL, set LOOPMESH_ETCD"),
            "{err}"
        );

        let (_dir, path) = config("store: {catalog_dir: catalog}\n");
        let given = only(&path);
        let err = resolve(&given, env(&[])).unwrap_err().to_string();
        assert!(err.contains("agent.yaml: its store has no etcd section"), "{err}");

        let err = resolve(&Given::default(), env(&[(LOOPMESH_ETCD, "10.0.0.1:2379")]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "store.etcd.endpoints from LOOPMESH_ETCD: \"10.0.0.1:2379\" is not a URL like http://127.0.0.1:2379; nothing done"
        );

        let (_dir, path) = config("store: {etcd: {endpoints: [\"http://e:2379\"], bogus: 1}}\n");
        let given = only(&path);
        let err = resolve(&given, env(&[])).unwrap_err().to_string();
        assert!(err.contains("agent.yaml") && err.contains("bogus"), "{err}");
    }
}
