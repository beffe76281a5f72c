//! What the data plane serves, for the admin API and `loopmesh routes`.
//!
//! Kept up to date per service as the manager applies changes, and shared
//! (not copied) with whoever shows it: publishing the agent's status after
//! every pass costs nothing per service, and a change costs its size.

use super::balance::{now_nanos, BackendStats, CONNECT_FAILURES};
use super::service::{ServiceMetrics, ServiceShared, ServiceState, StateCell};
use super::tls::NodeIdentity;
use crate::catalog::Protocol;
use crate::telemetry::families as f;
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
                                    "connections_total": b.stats.connections.get(),
                                    "connect_errors": b.stats.connect_errors.iter().map(Counter::get).sum::<u64>(),
                                    "bytes_to_backend": b.stats.bytes_to_backend.get(),
                                    "bytes_to_client": b.stats.bytes_to_client.get(),
                                    "requests_total": (view.protocol == Protocol::Http).then(|| b.stats.requests.get()),
                                    "ejections_total": b.stats.ejected.get(),
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
    /// every backend of the services in use, for `/metrics`. Read from the
    /// services' own counters, so a deleted service or backend has none.
    pub fn render_metrics(&self, out: &mut Exposition<'_>) {
        let services: Vec<(String, Protocol, Arc<ServiceShared>, Option<Arc<ServiceState>>)> = {
            let services = self.services.read().unwrap_or_else(|e| e.into_inner());
            services
                .iter()
                .map(|(name, view)| {
                    let state = view.state.as_ref().map(|cell| cell.current());
                    (name.clone(), view.protocol, view.shared.clone(), state)
                })
                .collect()
        };
        let all = || {
            services
                .iter()
                .map(|(name, _, shared, _)| (name.as_str(), shared.as_ref()))
        };
        let http = || {
            services
                .iter()
                .filter(|(_, protocol, _, _)| *protocol == Protocol::Http)
                .map(|(name, _, shared, _)| (name.as_str(), shared.http_metrics_now()))
        };
        let mut family = out.family(&f::PROXY_CONNECTIONS_TOTAL);
        for (name, shared) in all() {
            family.value(&[name], shared.metrics_now().connections.get());
        }
        let mut family = out.family(&f::PROXY_CONNECTIONS_ACTIVE);
        for (name, shared) in all() {
            family.value(&[name], shared.active.load(Ordering::Relaxed));
        }
        let mut family = out.family(&f::PROXY_CONNECT_DURATION_SECONDS);
        for (name, shared) in all() {
            family.histogram(&[name], &shared.metrics_now().connect_duration);
        }
        let mut family = out.family(&f::PROXY_BYTES_TOTAL);
        for (name, shared) in all() {
            let metrics = shared.metrics_now();
            family.value(&[name, "to_backend"], metrics.bytes_to_backend.get());
            family.value(&[name, "to_client"], metrics.bytes_to_client.get());
        }
        let mut family = out.family(&f::PROXY_REFUSED_TOTAL);
        for (name, shared) in all() {
            let metrics = shared.metrics_now();
            family.value(&[name, "max_connections"], metrics.refused_max_connections.get());
            family.value(&[name, "no_backend"], metrics.refused_no_backend.get());
            family.value(&[name, "connect_failed"], metrics.refused_connect_failed.get());
        }
        let counters: [(&'static f::Family, fn(&ServiceMetrics) -> &Counter); 5] = [
            (&f::PROXY_IDLE_TIMEOUTS_TOTAL, |m| &m.idle_timeouts),
            (&f::PROXY_DRAIN_KILLS_TOTAL, |m| &m.drain_kills),
            (&f::PROXY_ACCEPT_ERRORS_TOTAL, |m| &m.accept_errors),
            (&f::PROXY_BIND_FAILURES_TOTAL, |m| &m.bind_failures),
            (&f::MESH_INBOUND_STREAMS_TOTAL, |m| &m.inbound_streams),
        ];
        for (family, counter) in counters {
            let mut family = out.family(family);
            for (name, shared) in all() {
                family.value(&[name], counter(shared.metrics_now()).get());
            }
        }
        let mut family = out.family(&f::MESH_DENIED_TOTAL);
        for (name, shared) in all() {
            for (caller, count) in shared.metrics_now().denied() {
                family.value(&[name, &caller], count);
            }
        }
        let mut family = out.family(&f::HTTP_REQUESTS_TOTAL);
        for (name, metrics) in http() {
            for (class, counter) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().zip(&metrics.requests) {
                family.value(&[name, class], counter.get());
            }
        }
        let mut family = out.family(&f::HTTP_REQUEST_DURATION_SECONDS);
        for (name, metrics) in http() {
            family.histogram(&[name], &metrics.duration);
        }
        let mut family = out.family(&f::HTTP_RETRIES_TOTAL);
        for (name, metrics) in http() {
            family.value(&[name], metrics.retries.get());
        }
        let mut family = out.family(&f::HTTP_REFUSED_TOTAL);
        for (name, metrics) in http() {
            for (reason, counter) in super::http::REFUSALS.iter().zip(&metrics.refused) {
                family.value(&[name, reason], counter.get());
            }
        }
        let mut family = out.family(&f::HTTP_UPSTREAM_CONNECTIONS);
        for (name, metrics) in http() {
            family.value(&[name], metrics.upstream_connections.get());
        }
        render_backends(out, &services);
    }
}

/// The per-backend families, for the services whose backends are compiled.
fn render_backends(
    out: &mut Exposition<'_>,
    services: &[(String, Protocol, Arc<ServiceShared>, Option<Arc<ServiceState>>)],
) {
    let backends = || {
        services.iter().flat_map(|(name, protocol, _, state)| {
            let set = state.as_ref().and_then(|state| state.compiled_backends());
            set.into_iter()
                .flat_map(|set| set.backends())
                .map(move |backend| (name.as_str(), *protocol, &*backend.id, &*backend.stats))
        })
    };
    let counters: [(&'static f::Family, fn(&BackendStats) -> &Counter); 2] = [
        (&f::BACKEND_CONNECTIONS_TOTAL, |s| &s.connections),
        (&f::BACKEND_EJECTIONS_TOTAL, |s| &s.ejected),
    ];
    for (family, counter) in counters {
        let mut family = out.family(family);
        for (service, _, id, stats) in backends() {
            family.value(&[service, id], counter(stats).get());
        }
    }
    let mut family = out.family(&f::BACKEND_ACTIVE);
    for (service, _, id, stats) in backends() {
        family.value(&[service, id], stats.active.load(Ordering::Relaxed));
    }
    let mut family = out.family(&f::BACKEND_BYTES_TOTAL);
    for (service, protocol, id, stats) in backends() {
        if protocol == Protocol::Tcp {
            family.value(&[service, id, "to_backend"], stats.bytes_to_backend.get());
            family.value(&[service, id, "to_client"], stats.bytes_to_client.get());
        }
    }
    let mut family = out.family(&f::BACKEND_CONNECT_ERRORS_TOTAL);
    for (service, _, id, stats) in backends() {
        for (kind, counter) in CONNECT_FAILURES.iter().zip(&stats.connect_errors) {
            family.value(&[service, id, kind], counter.get());
        }
    }
    let mut family = out.family(&f::BACKEND_REQUESTS_TOTAL);
    for (service, protocol, id, stats) in backends() {
        if protocol == Protocol::Http {
            family.value(&[service, id], stats.requests.get());
        }
    }
}
