//! L4: one proxied TCP connection: choose a backend, connect (retrying others),
//! then copy both ways with half-close until both sides are done, the
//! connection idles out, or a drain deadline kills it.

pub mod sockmap;
pub mod splice;

use super::balance::BackendStats;
use super::connect::{connect, Upstream};
use super::drain;
use super::service::ServiceState;
use super::tunnel::{Tunneled, COPY_BUFFER};
use super::Held;
use sockmap::{Joined, KernelForwarding};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

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

/// Resolves once `last` (a [`now_millis`] stamp, moved on by the copy) is
/// `limit` in the past: the idle clock of both copies.
async fn idle_for(last: &AtomicU64, limit: Duration) {
    loop {
        let quiet = Duration::from_millis(now_millis().saturating_sub(last.load(Ordering::Relaxed)));
        if quiet >= limit {
            return;
        }
        tokio::time::sleep(limit - quiet).await;
    }
}

/// Serves one accepted connection to the end. L4 has nothing to say when a
/// drain is signaled: the connection runs on until it ends by itself or the
/// drain's deadline forces it closed.
pub async fn serve(client: TcpStream, peer: SocketAddr, state: Arc<ServiceState>, mut drain: drain::Watch) {
    let metrics = state.shared.metrics();
    let (_held, active) = Held::count(&state.shared.active);
    if state
        .spec
        .max_connections
        .is_some_and(|max| active > u64::from(max))
    {
        metrics.refused_max_connections.increment(1);
        return;
    }
    metrics.connections.increment(1);
    let _open = state.kernel().map(|kernel| KernelForwarding::open(kernel));
    let Some((index, upstream)) = connect(&state, peer).await else {
        return;
    };
    let Ok(backends) = state.backends() else { return };
    let backend = &backends.backends()[index];
    let (_backend_held, _) = Held::count(&backend.stats.active);
    // The client socket inherited TCP_NODELAY from the listener; the
    // upstream got it when it was dialed.
    match upstream {
        Upstream::Tcp(upstream) => copy(client, upstream, &state, &backend.stats, &mut drain).await,
        // Through the mesh: no splice or kernel forwarding into TLS.
        Upstream::Tunnel(tunnel) => copy_tunneled(client, tunnel, &state, &backend.stats, &mut drain).await,
    }
}

/// Copies between a client and a stream through the mesh until both are
/// done, the connection idles out, or the drain deadline forces it.
async fn copy_tunneled(
    mut client: TcpStream,
    tunnel: Tunneled,
    state: &ServiceState,
    stats: &BackendStats,
    drain: &mut drain::Watch,
) {
    let metrics = state.shared.metrics();
    let last = Arc::new(AtomicU64::new(now_millis()));
    let mut tunnel = Touched {
        inner: tunnel,
        last: last.clone(),
    };
    let idle = idle_for(&last, state.spec.idle_timeout);
    tokio::select! {
        result = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut tunnel, COPY_BUFFER, COPY_BUFFER) => {
            if let Ok((to_backend, to_client)) = result {
                metrics.bytes(stats, to_backend, to_client);
            }
        }
        () = idle => metrics.idle_timeouts.increment(1),
        () = drain.forced() => metrics.drain_kills.increment(1),
    }
}

/// A stream that notes the time of every read or write (the idle clock).
struct Touched<T> {
    inner: T,
    last: Arc<AtomicU64>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Touched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_ready() {
            self.last.store(now_millis(), Ordering::Relaxed);
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Touched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if polled.is_ready() {
            self.last.store(now_millis(), Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Exchanges each way after which a connection is handed to the kernel,
/// when it forwards: a short connection (one request, one response) never
/// pays for the join, a long-lived one stops waking the proxy.
const HANDOVER_AFTER: u32 = 2;

/// Copies both ways in user space until both sides are done, the
/// connection idles out, or it is killed; or, with forwarding in the
/// kernel, until the connection has shown it lives long and the proxy is not
/// busy, then hands it over. A connection held back by a busy proxy goes at
/// its next exchange after the load has fallen.
async fn copy(
    mut client: TcpStream,
    mut upstream: TcpStream,
    state: &ServiceState,
    stats: &BackendStats,
    drain: &mut drain::Watch,
) {
    let metrics = state.shared.metrics();
    let mut kernel = state.kernel().cloned();
    let mut deferred = false;
    loop {
        let last = AtomicU64::new(now_millis());
        let touch = || last.store(now_millis(), Ordering::Relaxed);
        let idle_limit = state.spec.idle_timeout;
        // Both directions at once; the first error ends both.
        let ended = AtomicU8::new(0);
        let watches = [splice::RelayWatch::default(), splice::RelayWatch::default()];
        let copy = async {
            tokio::try_join!(
                splice::relay(&client, &upstream, &ended, touch, &watches[0]),
                splice::relay(&upstream, &client, &ended, touch, &watches[1])
            )
        };
        let idle = idle_for(&last, idle_limit);
        // Ready when both directions wait for data with nothing held and
        // have carried enough, and the proxy is not busy; the relays change
        // that only when this task polls them, so it needs no waker of its
        // own (nor does the load: it is looked at again at the next poll).
        let ready_to_hand_over = std::future::poll_fn(|_| {
            let Some(forwarding) = &kernel else {
                return std::task::Poll::Pending;
            };
            let quiet = watches.iter().all(|w| {
                w.waiting.load(Ordering::Relaxed)
                    && !w.spliced.load(Ordering::Relaxed)
                    && w.chunks.load(Ordering::Relaxed) >= HANDOVER_AFTER
            });
            if !quiet {
                return std::task::Poll::Pending;
            }
            if forwarding.busy() {
                if !deferred {
                    deferred = true;
                    forwarding.defer();
                }
                return std::task::Poll::Pending;
            }
            std::task::Poll::Ready(())
        });
        // The copy first, and no random branch order to draw at every
        // wake-up: the others are polled whenever the copy is pending.
        let long_lived = tokio::select! {
            biased;
            result = copy => {
                if let Ok((to_backend, to_client)) = result {
                    metrics.bytes(stats, to_backend, to_client);
                }
                false
            }
            () = idle => {
                metrics.idle_timeouts.increment(1);
                false
            }
            () = drain.forced() => {
                metrics.drain_kills.increment(1);
                false
            }
            () = ready_to_hand_over => true,
        };
        let Some(forwarding) = kernel.take().filter(|_| long_lived) else {
            return;
        };
        // Dropping the copy mid-wait left every byte not yet read in the
        // sockets, where the join picks it up.
        metrics.bytes(
            stats,
            watches[0].bytes.load(Ordering::Relaxed),
            watches[1].bytes.load(Ordering::Relaxed),
        );
        match hand_over(&forwarding, client, upstream) {
            Handover::Joined(sockets, joined) => {
                return forward_in_kernel(sockets, joined, state, stats, drain).await
            }
            // Copied in user space to the end (no second try).
            Handover::Declined(again_client, again_upstream) => {
                (client, upstream) = (again_client, again_upstream)
            }
            Handover::Lost => return,
        }
    }
}

type Sockets = [std::net::TcpStream; 2];

/// How a hand-over to the kernel went.
enum Handover {
    /// Forwarded in the kernel from now on.
    Joined(Sockets, Joined),
    /// Not joined (full, or a step failed and was undone): the sockets are
    /// back in the event loop for the user-space copy.
    Declined(TcpStream, TcpStream),
    /// The sockets could not be moved between the event loop and the
    /// kernel; the connection is closed.
    Lost,
}

/// Takes a connection out of the event loop and joins it for forwarding in
/// the kernel.
fn hand_over(kernel: &Arc<KernelForwarding>, client: TcpStream, upstream: TcpStream) -> Handover {
    let (Ok(client), Ok(upstream)) = (client.into_std(), upstream.into_std()) else {
        return Handover::Lost;
    };
    match kernel.join(&client, &upstream) {
        Ok(joined) => Handover::Joined([client, upstream], joined),
        Err(err) => {
            tracing::debug!("{err}; copying this connection in user space");
            match (TcpStream::from_std(client), TcpStream::from_std(upstream)) {
                (Ok(client), Ok(upstream)) => Handover::Declined(client, upstream),
                _ => Handover::Lost,
            }
        }
    }
}

/// Watches a connection the kernel forwards: passes each side's end on once
/// its bytes are through, and ends it on error, idleness or the drain kill.
async fn forward_in_kernel(
    sockets: Sockets,
    mut joined: Joined,
    state: &ServiceState,
    stats: &BackendStats,
    drain: &mut drain::Watch,
) {
    let metrics = state.shared.metrics();
    let idle_limit = state.spec.idle_timeout;
    let traffic = |joined: &Joined| {
        joined.forwarded(sockmap::CLIENT).unwrap_or(0) + joined.forwarded(sockmap::UPSTREAM).unwrap_or(0)
    };
    let mut seen = traffic(&joined);
    let mut quiet_since = Instant::now();
    // Bytes written to each socket from user space (data the kernel left
    // for a reader: none, normally).
    let mut written = [0u64; 2];
    let mut ended = [false; 2];
    loop {
        tokio::select! {
            biased;
            hangup = joined.hangups.recv() => {
                let Some((which, bits)) = hangup else { break };
                if bits & libc::EPOLLERR as u32 != 0 {
                    break;
                }
                if ended[which] {
                    continue;
                }
                let other = 1 - which;
                if let Err(err) = pass_on_end(&sockets, &joined, which, &mut written, idle_limit).await {
                    tracing::debug!("service {}: ending a kernel-forwarded connection: {err}", state.name());
                    break;
                }
                ended[which] = true;
                if ended[other] {
                    // close(2) sends the other FIN.
                    break;
                }
                // SAFETY: shutdown(2) of the write side of a socket we hold.
                unsafe { libc::shutdown(sockets[other].as_raw_fd(), libc::SHUT_WR) };
            }
            () = tokio::time::sleep(idle_limit / 4) => {
                let now = traffic(&joined);
                if now != seen {
                    (seen, quiet_since) = (now, Instant::now());
                } else if quiet_since.elapsed() >= idle_limit {
                    metrics.idle_timeouts.increment(1);
                    break;
                }
            }
            () = drain.forced() => {
                metrics.drain_kills.increment(1);
                break;
            }
        }
    }
    let to_backend = joined.forwarded(sockmap::CLIENT).unwrap_or(0) + written[sockmap::UPSTREAM];
    let to_client = joined.forwarded(sockmap::UPSTREAM).unwrap_or(0) + written[sockmap::CLIENT];
    metrics.bytes(stats, to_backend, to_client);
    // Out of the maps first, then closed.
    drop(joined);
    drop(sockets);
}

/// Socket `which` has ended (FIN): forwards anything the kernel left for a
/// reader, then waits until the other socket's send queue has taken every
/// byte redirected to it, so a half-close never overtakes data. Fails if
/// the other socket errs or nothing moves for `patience`.
async fn pass_on_end(
    sockets: &Sockets,
    joined: &Joined,
    which: usize,
    written: &mut [u64; 2],
    patience: Duration,
) -> io::Result<()> {
    let other = 1 - which;
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: read(2) into a buffer we own, on a socket we hold.
        let n = unsafe { libc::read(sockets[which].as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                break;
            }
            return Err(err);
        }
        if n == 0 {
            break;
        }
        send_all(&sockets[other], &buf[..n as usize], patience).await?;
        written[other] += n as u64;
    }
    let mut last_progress = Instant::now();
    let mut last_sent = 0;
    loop {
        let sent = joined.sent(other)?;
        if sent >= joined.forwarded(which)? + written[other] {
            return Ok(());
        }
        if let Some(err) = sockets[other].take_error()? {
            return Err(err);
        }
        if sent != last_sent {
            (last_sent, last_progress) = (sent, Instant::now());
        } else if last_progress.elapsed() >= patience {
            return Err(io::ErrorKind::TimedOut.into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Writes all of `data` to a non-blocking socket outside the event loop,
/// retrying every millisecond while it is full (a rare path: see
/// [`pass_on_end`]).
async fn send_all(socket: &std::net::TcpStream, mut data: &[u8], patience: Duration) -> io::Result<()> {
    let started = Instant::now();
    while !data.is_empty() {
        // SAFETY: send(2) from a buffer we own, on a socket we hold.
        let n = unsafe {
            libc::send(
                socket.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            data = &data[n as usize..];
            continue;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::WouldBlock || started.elapsed() >= patience {
            return Err(err);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}
