//! One proxied TCP connection: choose a backend, connect (retrying others),
//! then copy both ways with half-close until both sides are done, the
//! connection idles out, or a drain deadline kills it.

use super::balancer::NoBackend;
use super::ServiceState;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Copy buffer per direction: 8 KiB (tokio's default) is the slowest path
/// for bulk transfers here; 64 KiB is several times faster.
const COPY_BUFFER: usize = 64 * 1024;

/// Milliseconds since the first call: the idle clock.
fn now_millis() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A stream that stamps the time of its last read, for the idle timeout.
struct Activity<'a> {
    stream: &'a mut TcpStream,
    last: &'a AtomicU64,
}

impl AsyncRead for Activity<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut *self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.store(now_millis(), Ordering::Relaxed);
        }
        result
    }
}

impl AsyncWrite for Activity<'_> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream).poll_shutdown(cx)
    }
}

/// Decrements a counter when dropped.
struct Held<'a>(&'a AtomicU64);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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
        let attempt = tokio::time::timeout(
            state.connect_timeout,
            TcpStream::connect((backend.host.as_str(), backend.port)),
        );
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
    mut client: TcpStream,
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
    let Some((index, mut upstream)) = connect(&state, peer).await else {
        gauge.decrement(1.0);
        return;
    };
    let backend = &state.backends.backends()[index];
    backend.stats.active.fetch_add(1, Ordering::Relaxed);
    let _backend_held = Held(&backend.stats.active);
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let last = AtomicU64::new(now_millis());
    let idle_limit = state.idle_timeout;
    let copy = async {
        let mut a = Activity {
            stream: &mut client,
            last: &last,
        };
        let mut b = Activity {
            stream: &mut upstream,
            last: &last,
        };
        tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUFFER, COPY_BUFFER).await
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
    tokio::select! {
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
