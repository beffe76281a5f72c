//! A service as the data plane runs it: compiled from its route once per
//! change, read by every new connection, swapped whole on the next change.

use super::balance::{Backend, BackendSet, BackendStats};
use super::l4::sockmap::KernelForwarding;
use super::ProxySettings;
use crate::routing::Route;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

/// What outlives a service's reloads while it listens: counters, and the
/// metric handles, registered at its first connection (an idle service
/// costs no series; 10k idle services would otherwise cost 100k).
#[derive(Debug)]
pub struct ServiceShared {
    pub name: Arc<str>,
    /// Open connections, for the circuit breaker.
    pub active: AtomicU64,
    metrics: OnceLock<ServiceMetrics>,
}

impl ServiceShared {
    pub fn new(name: &str) -> Self {
        ServiceShared {
            name: name.into(),
            active: AtomicU64::new(0),
            metrics: OnceLock::new(),
        }
    }

    /// The service's metric handles, registered on first use.
    pub fn metrics(&self) -> &ServiceMetrics {
        self.metrics.get_or_init(|| ServiceMetrics::new(&self.name))
    }
}

/// A service's metric handles, registered once rather than per connection
/// (label strings and registry lookups cost more than the copy itself for
/// short connections).
#[derive(Debug)]
pub struct ServiceMetrics {
    pub connections: metrics::Counter,
    pub active: metrics::Gauge,
    pub connect_duration: metrics::Histogram,
    pub bytes_to_backend: metrics::Counter,
    pub bytes_to_client: metrics::Counter,
    pub refused_max_connections: metrics::Counter,
    pub refused_no_backend: metrics::Counter,
    pub refused_connect_failed: metrics::Counter,
    pub idle_timeouts: metrics::Counter,
    pub drain_kills: metrics::Counter,
}

impl ServiceMetrics {
    fn new(service: &str) -> Self {
        let s = service.to_string();
        let refused = |reason: &'static str| metrics::counter!("loopmesh_proxy_refused_total", "service" => s.clone(), "reason" => reason);
        ServiceMetrics {
            connections: metrics::counter!("loopmesh_proxy_connections_total", "service" => s.clone()),
            active: metrics::gauge!("loopmesh_proxy_connections_active", "service" => s.clone()),
            connect_duration: metrics::histogram!("loopmesh_proxy_connect_duration_seconds", "service" => s.clone()),
            bytes_to_backend: metrics::counter!("loopmesh_proxy_bytes_total", "service" => s.clone(), "direction" => "to_backend"),
            bytes_to_client: metrics::counter!("loopmesh_proxy_bytes_total", "service" => s.clone(), "direction" => "to_client"),
            refused_max_connections: refused("max_connections"),
            refused_no_backend: refused("no_backend"),
            refused_connect_failed: refused("connect_failed"),
            idle_timeouts: metrics::counter!("loopmesh_proxy_idle_timeouts_total", "service" => s.clone()),
            drain_kills: metrics::counter!("loopmesh_proxy_drain_kills_total", "service" => s),
        }
    }
}

/// Everything a new connection to a service needs; replaced whole on reload.
#[derive(Debug)]
pub struct ServiceState {
    /// The route this was compiled from (its spec is the service's policy).
    pub route: Arc<Route>,
    pub backends: BackendSet,
    pub shared: Arc<ServiceShared>,
    /// Set when L4 connections are forwarded in the kernel.
    pub kernel: Option<Arc<KernelForwarding>>,
}

impl ServiceState {
    /// The service's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Compiles `route`; backend counters are taken from `stats` by id, so a
    /// reload neither resets connection counts nor forgives an ejection.
    pub fn compile(
        route: Arc<Route>,
        settings: &ProxySettings,
        kernel: &Option<Arc<KernelForwarding>>,
        stats: &mut HashMap<String, Arc<BackendStats>>,
        shared: Arc<ServiceShared>,
    ) -> ServiceState {
        let backends = route
            .backends
            .iter()
            .map(|(id, instance)| {
                let addr = instance
                    .host
                    .parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, instance.port));
                // A backend on this host is a loopback address; names are
                // not resolved here and count as remote.
                let on_this_host = addr.is_some_and(|addr| addr.ip().is_loopback());
                Backend {
                    id: id.clone(),
                    host: instance.host.clone(),
                    port: instance.port,
                    addr,
                    congestion: settings.loopback_congestion.clone().filter(|_| on_this_host),
                    weight: instance.weight,
                    zone: instance.zone.clone(),
                    state: instance.state,
                    stats: stats.entry(id.clone()).or_default().clone(),
                }
            })
            .collect();
        stats.retain(|id, _| route.backends.contains_key(id));
        let spec = &route.spec;
        let backends = BackendSet::new(backends, spec.balance, spec.outlier, settings.node_zone.clone());
        ServiceState {
            route,
            backends,
            shared,
            kernel: kernel.clone(),
        }
    }
}
