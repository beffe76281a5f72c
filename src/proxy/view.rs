//! What the data plane serves, for the admin API and `loopmesh routes`.
//!
//! Kept up to date per service as the manager applies changes, and shared
//! (not copied) with whoever shows it: publishing the agent's status after
//! every pass costs nothing per service, and a change costs its size.

use super::balance::now_nanos;
use super::service::{ServiceShared, ServiceState, StateCell};
use super::tls::NodeIdentity;
use crate::catalog::Protocol;
use crate::telemetry::{Counter, Exposition};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

/// Every wanted service, with its live state while it listens.
#[derive(Debug, Clone, Default)]
pub struct ProxyView {
    services: Arc<RwLock<BTreeMap<String, ServiceView>>>,
    /// Services that cannot listen, with why: read at every readiness
    /// check, so kept apart from the (large) table.
    failed: Arc<RwLock<BTreeMap<String, String>>>,
}

#[derive(Debug, Clone)]
pub(super) struct ServiceView {
    pub address: SocketAddr,
    pub protocol: Protocol,
    /// Its counters, listening or not.
    pub shared: Arc<ServiceShared>,
    pub error: Option<String>,
    /// The live state while listening.
    pub state: Option<Arc<StateCell>>,
}

impl ProxyView {
    /// Sets (or, with `None`, removes) one service's entry.
    pub(super) fn set(&self, name: &str, entry: Option<ServiceView>) {
        {
            let mut failed = self.failed.write().unwrap_or_else(|e| e.into_inner());
            match entry.as_ref().and_then(|entry| entry.error.clone()) {
                Some(error) => failed.insert(name.to_string(), error),
                None => failed.remove(name),
            };
        }
        let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
        match entry {
            Some(entry) => {
                services.insert(name.to_string(), entry);
            }
            None => {
                services.remove(name);
            }
        }
    }

    /// Services that failed to listen, with why.
    pub fn failed(&self) -> Vec<(String, String)> {
        let failed = self.failed.read().unwrap_or_else(|e| e.into_inner());
        failed
            .iter()
            .map(|(name, error)| (name.clone(), error.clone()))
            .collect()
    }

    /// The routes with their backends' live state, as JSON. A service that
    /// has had no connection yet shows its route's backends as they are on
    /// disk, with nothing live to report.
    pub fn to_json(&self) -> serde_json::Value {
        let now = now_nanos();
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        let services = services.iter().map(|(name, view)| {
            let backends: Vec<serde_json::Value> = view
                .state
                .as_ref()
                .and_then(|state| {
                    let state = state.current();
                    let trust_domain = state
                        .context
                        .mesh
                        .as_ref()
                        .map(|mesh| mesh.credentials.current().identity.trust_domain.clone());
                    state.with_backends(|set| {
                        set.backends()
                            .iter()
                            .map(|b| {
                                // Reached through the mesh: the peer node's
                                // inbound address and the identity it must show.
                                let peer = b.mesh.zip(trust_domain.as_deref()).zip(b.node.as_ref()).map(
                                    |((mesh, domain), node)| {
                                        (
                                            mesh.to_string(),
                                            NodeIdentity::new(domain, node.as_str()).to_string(),
                                        )
                                    },
                                );
                                serde_json::json!({
                                    "id": b.id, "host": b.host, "port": b.port, "weight": b.weight,
                                    "zone": b.zone, "state": b.state.as_str(),
                                    "ejected": b.stats.is_ejected(now),
                                    "active_connections": b.stats.active.load(Ordering::Relaxed),
                                    "connections_total": b.stats.traffic_now().connections.get(),
                                    "connect_errors": b.stats.traffic_now().connect_errors.iter().map(Counter::get).sum::<u64>(),
                                    "bytes_to_backend": b.stats.traffic_now().bytes_to_backend.get(),
                                    "bytes_to_client": b.stats.traffic_now().bytes_to_client.get(),
                                    "requests_total": (view.protocol == Protocol::Http).then(|| b.stats.traffic_now().requests.get()),
                                    "ejections_total": b.stats.traffic_now().ejected.get(),
                                    "mesh": peer.as_ref().map(|(mesh, _)| mesh),
                                    "peer": peer.as_ref().map(|(_, identity)| identity),
                                })
                            })
                            .collect()
                    })
                })
                .unwrap_or_default();
            serde_json::json!({
                "service": name,
                "address": view.address.ip().to_string(),
                "port": view.address.port(),
                "protocol": view.protocol,
                "listening": view.state.is_some(),
                "error": view.error,
                "backends": backends,
            })
        });
        serde_json::Value::Array(services.collect())
    }

    /// The series of every service (at zero until it is used) and of
    /// every backend of the services in use, for `/metrics`
    /// ([`super::scrape`]).
    pub fn render_metrics(&self, out: &mut Exposition<'_>) {
        let services: Vec<Scraped> = {
            let services = self.services.read().unwrap_or_else(|e| e.into_inner());
            services
                .iter()
                .map(|(name, view)| Scraped {
                    name: name.clone(),
                    protocol: view.protocol,
                    shared: view.shared.clone(),
                    state: view.state.as_ref().map(|cell| cell.current()),
                })
                .collect()
        };
        super::scrape::render(&services, out);
    }
}

/// One service as a scrape reads it.
pub(super) struct Scraped {
    pub name: String,
    pub protocol: Protocol,
    pub shared: Arc<ServiceShared>,
    /// Its state while it listens.
    pub state: Option<Arc<ServiceState>>,
}
