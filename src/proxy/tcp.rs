//! One proxied TCP connection: choose a backend, connect (retrying others),
//! then copy both ways with half-close until both sides are done, the
//! connection idles out, or a drain deadline kills it.

use super::balancer::{Backend, NoBackend};
use super::ServiceState;
use super::{congestion, splice};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// Milliseconds on the coarse monotonic clock: the idle clock. It is read
/// after every read of every connection, and idle timeouts are seconds, so a
/// few milliseconds of resolution do; CLOCK_MONOTONIC_COARSE is a plain
/// memory read in the vDSO where the precise clock reads the TSC (about 1%
/// of the proxy's CPU at 60k requests/s, measured with perf).
fn now_millis() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    now.tv_sec as u64 * 1000 + now.tv_nsec as u64 / 1_000_000
}

/// Decrements a counter when dropped.
struct Held<'a>(&'a AtomicU64);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Opens a connection to one backend, with TCP_NODELAY and, for a backend
/// on this host, the loopback congestion control set before the handshake.
async fn connect_to(backend: &Backend) -> io::Result<TcpStream> {
    let Some(addr) = backend.addr else {
        let stream = TcpStream::connect((backend.host.as_str(), backend.port)).await?;
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

/// Connects to a backend, trying others on failure; `None` if none answered.
async fn connect(state: &ServiceState, client: SocketAddr) -> Option<(usize, TcpStream)> {
    let service = state.name.as_str();
    let mut tried = Vec::new();
    for _ in 0..=state.retries {
        let index = match state.backends.pick(client.ip(), &tried) {
            Ok(index) => index,
            Err(NoBackend::NoneUp) => {
                state.metrics.refused_no_backend.increment(1);
                return None;
            }
            Err(NoBackend::Exhausted) => break,
        };
        let backend = &state.backends.backends()[index];
        let started = Instant::now();
        let attempt = tokio::time::timeout(state.connect_timeout, connect_to(backend));
        let kind = match attempt.await {
            Ok(Ok(stream)) => {
                let latency = started.elapsed();
                backend.stats.record_success(latency);
                state.metrics.connect_duration.record(latency.as_secs_f64());
                return Some((index, stream));
            }
            Ok(Err(err)) => match err.kind() {
                io::ErrorKind::ConnectionRefused => "refused",
                io::ErrorKind::ConnectionReset => "reset",
                _ if err.raw_os_error() == Some(113) || err.raw_os_error() == Some(101) => "unreachable",
                _ => "other",
            },
            Err(_) => "timeout",
        };
        metrics::counter!(
            "loopmesh_proxy_connect_errors_total",
            "service" => service.to_string(),
            "backend" => backend.id.clone(),
            "kind" => kind
        )
        .increment(1);
        if state.backends.record_failure(index) {
            tracing::warn!(
                "service {service}: backend {} ejected after repeated connect failures ({kind})",
                backend.id
            );
            metrics::counter!("loopmesh_proxy_ejections_total", "service" => service.to_string(), "backend" => backend.id.clone())
                .increment(1);
        }
        tried.push(index);
    }
    tracing::debug!("service {service}: no backend answered for {client}");
    state.metrics.refused_connect_failed.increment(1);
    None
}

/// Serves one accepted connection to the end.
pub async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    state: Arc<ServiceState>,
    mut kill: watch::Receiver<bool>,
) {
    let metrics = &state.metrics;
    let active = state.shared.active.fetch_add(1, Ordering::Relaxed) + 1;
    let _held = Held(&state.shared.active);
    if state.max_connections.is_some_and(|max| active > u64::from(max)) {
        metrics.refused_max_connections.increment(1);
        return;
    }
    metrics.connections.increment(1);
    let gauge = &metrics.active;
    gauge.increment(1.0);
    let Some((index, upstream)) = connect(&state, peer).await else {
        gauge.decrement(1.0);
        return;
    };
    let backend = &state.backends.backends()[index];
    backend.stats.active.fetch_add(1, Ordering::Relaxed);
    let _backend_held = Held(&backend.stats.active);
    // The client socket inherited TCP_NODELAY from the listener; the
    // upstream got it in connect_to.

    let last = AtomicU64::new(now_millis());
    let touch = || last.store(now_millis(), Ordering::Relaxed);
    let idle_limit = state.idle_timeout;
    // Both directions at once; the first error ends both.
    let ended = AtomicU8::new(0);
    let copy = async {
        tokio::try_join!(
            splice::relay(&client, &upstream, &ended, touch),
            splice::relay(&upstream, &client, &ended, touch)
        )
    };
    let idle = async {
        loop {
            let quiet = Duration::from_millis(now_millis().saturating_sub(last.load(Ordering::Relaxed)));
            if quiet >= idle_limit {
                return;
            }
            tokio::time::sleep(idle_limit - quiet).await;
        }
    };
    // The copy first, and no random branch order to draw at every wake-up:
    // idle and kill are polled whenever the copy is pending.
    tokio::select! {
        biased;
        result = copy => {
            if let Ok((to_backend, to_client)) = result {
                metrics.bytes_to_backend.increment(to_backend);
                metrics.bytes_to_client.increment(to_client);
            }
        }
        () = idle => metrics.idle_timeouts.increment(1),
        _ = kill.wait_for(|killed| *killed) => metrics.drain_kills.increment(1),
    }
    gauge.decrement(1.0);
}
