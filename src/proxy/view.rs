//! What the data plane serves, for the admin API and `loopmesh routes`.

use super::balance::now_nanos;
use super::manager::listen_addr;
use super::service::ServiceState;
use crate::routing::Route;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::watch;

/// Every wanted service, with its live state while it listens.
#[derive(Debug, Clone, Default)]
pub struct ProxyView {
    services: Vec<ServiceView>,
}

#[derive(Debug, Clone)]
pub(super) struct ServiceView {
    pub route: Arc<Route>,
    pub error: Option<String>,
    /// The live state while listening.
    pub state: Option<watch::Receiver<Arc<ServiceState>>>,
}

impl ProxyView {
    pub(super) fn new(services: Vec<ServiceView>) -> Self {
        ProxyView { services }
    }

    /// Services that failed to listen, with why.
    pub fn failed(&self) -> Vec<(String, String)> {
        self.services
            .iter()
            .filter_map(|s| s.error.clone().map(|e| (s.route.service.clone(), e)))
            .collect()
    }

    /// The routes with their backends' live state, as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let now = now_nanos();
        let services = self.services.iter().map(|view| {
            let backends: Vec<serde_json::Value> = match &view.state {
                Some(state) => {
                    let state = state.borrow().clone();
                    state
                        .backends
                        .backends()
                        .iter()
                        .map(|b| {
                            serde_json::json!({
                                "id": b.id, "host": b.host, "port": b.port, "weight": b.weight,
                                "zone": b.zone, "state": b.state.as_str(),
                                "ejected": b.stats.is_ejected(now),
                                "active_connections": b.stats.active.load(Ordering::Relaxed),
                            })
                        })
                        .collect()
                }
                None => Vec::new(),
            };
            let addr = listen_addr(&view.route);
            serde_json::json!({
                "service": view.route.service,
                "address": addr.ip().to_string(),
                "port": addr.port(),
                "protocol": view.route.spec.protocol,
                "listening": view.state.is_some(),
                "error": view.error,
                "backends": backends,
            })
        });
        serde_json::Value::Array(services.collect())
    }
}
