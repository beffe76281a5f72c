//! Dialing a backend: pick one, connect with the service's timeout, try
//! others on failure (feeding each outcome to the balancer's outlier
//! detection). Plain TCP today; the mesh's tunnels will dial here too.

use super::balance::{Backend, NoBackend};
use super::congestion;
use super::service::ServiceState;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Instant;
use tokio::net::{TcpSocket, TcpStream};

/// Opens a connection to one backend, with TCP_NODELAY and, for a backend
/// on this host, the loopback congestion control set before the handshake.
pub(super) async fn connect_to(backend: &Backend) -> io::Result<TcpStream> {
    let Some(addr) = backend.addr else {
        let stream = TcpStream::connect((&*backend.host, backend.port)).await?;
        stream.set_nodelay(true)?;
        return Ok(stream);
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    if let Some(name) = &backend.congestion {
        congestion::apply(socket.as_raw_fd(), name);
    }
    socket.connect(addr).await
}

/// A connect failure's kind, as the metrics label it.
fn failure_kind(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::ConnectionReset => "reset",
        // EHOSTUNREACH, ENETUNREACH
        _ if matches!(err.raw_os_error(), Some(113) | Some(101)) => "unreachable",
        _ => "other",
    }
}

/// Connects to a backend for `client`, trying others on failure; the
/// backend's index and the stream, or `None` if none answered.
pub async fn connect(state: &ServiceState, client: SocketAddr) -> Option<(usize, TcpStream)> {
    let service = state.name();
    let metrics = state.shared.metrics();
    let spec = &state.spec;
    let Ok(backends) = state.backends() else {
        metrics.refused_no_backend.increment(1);
        return None;
    };
    let mut tried = Vec::new();
    for _ in 0..=spec.retries {
        let index = match backends.pick(client.ip(), &tried) {
            Ok(index) => index,
            Err(NoBackend::NoneUp) => {
                metrics.refused_no_backend.increment(1);
                return None;
            }
            Err(NoBackend::Exhausted) => break,
        };
        let backend = &backends.backends()[index];
        let started = Instant::now();
        let kind = match tokio::time::timeout(spec.connect_timeout, connect_to(backend)).await {
            Ok(Ok(stream)) => {
                let latency = started.elapsed();
                backend.stats.record_success(latency);
                metrics.connect_duration.record(latency.as_secs_f64());
                return Some((index, stream));
            }
            Ok(Err(err)) => failure_kind(&err),
            Err(_) => "timeout",
        };
        metrics::counter!(
            "loopmesh_proxy_connect_errors_total",
            "service" => service.to_string(),
            "backend" => backend.id.to_string(),
            "kind" => kind
        )
        .increment(1);
        if backends.record_failure(index) {
            tracing::warn!(
                "service {service}: backend {} ejected after repeated connect failures ({kind})",
                backend.id
            );
            metrics::counter!("loopmesh_proxy_ejections_total", "service" => service.to_string(), "backend" => backend.id.to_string())
                .increment(1);
        }
        tried.push(index);
    }
    tracing::debug!("service {service}: no backend answered for {client}");
    metrics.refused_connect_failed.increment(1);
    None
}
