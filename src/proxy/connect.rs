//! Dialing a backend: pick one, connect with the service's timeout, try
//! others on failure (feeding each outcome to the balancer's outlier
//! detection). Directly over TCP, or through the mesh: a stream in the
//! mTLS tunnel to the backend's node.

use super::balance::{Backend, NoBackend, CONNECT_FAILURES};
use super::congestion;
use super::service::ServiceState;
use super::tunnel::Tunneled;
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

/// A connection to a backend.
pub enum Upstream {
    Tcp(TcpStream),
    /// A stream through the mesh to the backend's node.
    Tunnel(Tunneled),
}

impl tokio::io::AsyncRead for Upstream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(stream) => std::pin::Pin::new(stream).poll_read(cx, buf),
            Upstream::Tunnel(stream) => std::pin::Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Upstream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(stream) => std::pin::Pin::new(stream).poll_write(cx, buf),
            Upstream::Tunnel(stream) => std::pin::Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(stream) => std::pin::Pin::new(stream).poll_flush(cx),
            Upstream::Tunnel(stream) => std::pin::Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(stream) => std::pin::Pin::new(stream).poll_shutdown(cx),
            Upstream::Tunnel(stream) => std::pin::Pin::new(stream).poll_shutdown(cx),
        }
    }
}

/// Connects to `backend` of `state`'s service within its connect timeout,
/// through the mesh if the backend is reached that way; the outcome is
/// counted in the backend's stats.
pub(super) async fn dial(state: &ServiceState, backend: &Backend) -> io::Result<Upstream> {
    let dialed = dial_uncounted(state, backend).await;
    let stats = backend.stats.traffic();
    match &dialed {
        Ok(_) => stats.connections.increment(1),
        Err(err) => {
            let kind = failure_kind(err);
            let index = CONNECT_FAILURES
                .iter()
                .position(|k| *k == kind)
                .unwrap_or(CONNECT_FAILURES.len() - 1);
            stats.connect_errors[index].increment(1);
        }
    }
    dialed
}

async fn dial_uncounted(state: &ServiceState, backend: &Backend) -> io::Result<Upstream> {
    let timeout = state.spec.connect_timeout;
    if let (Some(peer), Some(mesh), Some(target), Some(node)) =
        (backend.mesh, &state.context.mesh, backend.addr, &backend.node)
    {
        return mesh
            .open(peer, node.as_str(), state.name(), target, timeout)
            .await
            .map(Upstream::Tunnel);
    }
    match tokio::time::timeout(timeout, connect_to(backend)).await {
        Ok(connected) => connected.map(Upstream::Tcp),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// A connect failure's kind, as the metrics label it (one of
/// [`CONNECT_FAILURES`]).
fn failure_kind(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::ConnectionReset => "reset",
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::PermissionDenied => "denied",
        // EHOSTUNREACH, ENETUNREACH
        _ if matches!(err.raw_os_error(), Some(113) | Some(101)) => "unreachable",
        _ => "other",
    }
}

/// Connects to a backend for `client`, trying others on failure; the
/// backend's index and the stream, or `None` if none answered.
pub async fn connect(state: &ServiceState, client: SocketAddr) -> Option<(usize, Upstream)> {
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
        let kind = match dial(state, backend).await {
            Ok(stream) => {
                let latency = started.elapsed();
                backend.stats.record_success(latency);
                metrics.connect_duration.record(latency.as_secs_f64());
                return Some((index, stream));
            }
            Err(err) => {
                if backend.mesh.is_some() {
                    tracing::debug!("service {service}: backend {}: {err}", backend.id);
                }
                failure_kind(&err)
            }
        };
        if backends.record_failure(index) {
            tracing::warn!(
                "service {service}: backend {} ejected after repeated connect failures ({kind})",
                backend.id
            );
        }
        tried.push(index);
    }
    tracing::debug!("service {service}: no backend answered for {client}");
    metrics.refused_connect_failed.increment(1);
    None
}
