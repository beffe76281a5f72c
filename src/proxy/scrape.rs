//! The proxy's series in `/metrics`, read at scrape time from the
//! counters each service and backend keeps ([`super::service::ServiceMetrics`],
//! [`super::balance::BackendStats`]): a service deleted from the view, or a
//! backend from its set, has no series to render. A service has its series
//! from its first use on this node (its first connection, or failure to
//! bind), all at once, at zero; its backends from when they are compiled
//! (at that first connection too).

use super::balance::{BackendTraffic, CONNECT_FAILURES};
use super::service::ServiceMetrics;
use super::view::Scraped;
use crate::catalog::Protocol;
use crate::telemetry::families::{self as f, Family};
use crate::telemetry::{Counter, Exposition};
use std::sync::atomic::Ordering;

/// A family of plain counters, and where each thing keeps its count.
type Counted<T> = (&'static Family, fn(&T) -> &Counter);

/// Renders the per-service families, then the per-backend ones.
pub(super) fn render(services: &[Scraped], out: &mut Exposition<'_>) {
    // Only the services used on this node: every node's table lists every
    // service of the fleet, and most are never used on a given node.
    let used = || services.iter().filter_map(|s| Some((s, s.shared.used()?)));
    let all = || used().map(|(s, metrics)| (s.name.as_str(), metrics));
    let http = || {
        used()
            .filter(|(s, _)| s.protocol == Protocol::Http)
            .map(|(s, _)| (s.name.as_str(), s.shared.http_metrics_now()))
    };
    let mut family = out.family(&f::PROXY_CONNECTIONS_TOTAL);
    for (name, metrics) in all() {
        family.value(&[name], metrics.connections.get());
    }
    let mut family = out.family(&f::PROXY_CONNECTIONS_ACTIVE);
    for (s, _) in used() {
        family.value(&[&s.name], s.shared.active.load(Ordering::Relaxed));
    }
    let mut family = out.family(&f::PROXY_CONNECT_DURATION_SECONDS);
    for (name, metrics) in all() {
        family.histogram(&[name], &metrics.connect_duration);
    }
    let mut family = out.family(&f::PROXY_BYTES_TOTAL);
    for (name, metrics) in all() {
        family.value(&[name, "to_backend"], metrics.bytes_to_backend.get());
        family.value(&[name, "to_client"], metrics.bytes_to_client.get());
    }
    let mut family = out.family(&f::PROXY_REFUSED_TOTAL);
    for (name, metrics) in all() {
        family.value(&[name, "max_connections"], metrics.refused_max_connections.get());
        family.value(&[name, "no_backend"], metrics.refused_no_backend.get());
        family.value(&[name, "connect_failed"], metrics.refused_connect_failed.get());
    }
    let counters: [Counted<ServiceMetrics>; 5] = [
        (&f::PROXY_IDLE_TIMEOUTS_TOTAL, |m| &m.idle_timeouts),
        (&f::PROXY_DRAIN_KILLS_TOTAL, |m| &m.drain_kills),
        (&f::PROXY_ACCEPT_ERRORS_TOTAL, |m| &m.accept_errors),
        (&f::PROXY_BIND_FAILURES_TOTAL, |m| &m.bind_failures),
        (&f::MESH_INBOUND_STREAMS_TOTAL, |m| &m.inbound_streams),
    ];
    for (family, counter) in counters {
        let mut family = out.family(family);
        for (name, metrics) in all() {
            family.value(&[name], counter(metrics).get());
        }
    }
    let mut family = out.family(&f::MESH_DENIED_TOTAL);
    for (name, metrics) in all() {
        for (caller, count) in metrics.denied() {
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
    render_backends(out, services);
}

/// The per-backend families, for the services whose backends are compiled.
fn render_backends(out: &mut Exposition<'_>, services: &[Scraped]) {
    let backends = || {
        services.iter().flat_map(|s| {
            let set = s.state.as_ref().and_then(|state| state.compiled_backends());
            set.into_iter()
                .flat_map(|set| set.backends())
                .map(move |backend| (s.name.as_str(), s.protocol, &*backend.id, &*backend.stats))
        })
    };
    let counters: [Counted<BackendTraffic>; 2] = [
        (&f::BACKEND_CONNECTIONS_TOTAL, |s| &s.connections),
        (&f::BACKEND_EJECTIONS_TOTAL, |s| &s.ejected),
    ];
    for (family, counter) in counters {
        let mut family = out.family(family);
        for (service, _, id, stats) in backends() {
            family.value(&[service, id], counter(stats.traffic_now()).get());
        }
    }
    let mut family = out.family(&f::BACKEND_ACTIVE);
    for (service, _, id, stats) in backends() {
        family.value(&[service, id], stats.active.load(Ordering::Relaxed));
    }
    let mut family = out.family(&f::BACKEND_BYTES_TOTAL);
    for (service, protocol, id, stats) in backends() {
        if protocol == Protocol::Tcp {
            let traffic = stats.traffic_now();
            family.value(&[service, id, "to_backend"], traffic.bytes_to_backend.get());
            family.value(&[service, id, "to_client"], traffic.bytes_to_client.get());
        }
    }
    let mut family = out.family(&f::BACKEND_CONNECT_ERRORS_TOTAL);
    for (service, _, id, stats) in backends() {
        for (kind, counter) in CONNECT_FAILURES.iter().zip(&stats.traffic_now().connect_errors) {
            family.value(&[service, id, kind], counter.get());
        }
    }
    let mut family = out.family(&f::BACKEND_REQUESTS_TOTAL);
    for (service, protocol, id, stats) in backends() {
        if protocol == Protocol::Http {
            family.value(&[service, id], stats.traffic_now().requests.get());
        }
    }
}
