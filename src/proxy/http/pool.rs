//! Upstream connections, pooled per backend: HTTP/1.1 keep-alive
//! connections reused one request at a time, or one HTTP/2 connection that
//! carries every request at once.
//!
//! A pool lives in its backend's [`BackendStats`](super::super::balance::BackendStats),
//! so it outlives reloads that keep the backend and goes with the backend:
//! once no set and no request holds it, its idle connections close, and
//! those still carrying a request close when it ends.

use super::body::UpstreamBody;
use crate::policy::UpstreamProtocol;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// A backend's upstream connections.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
    /// The shared HTTP/2 connection, with the number it was given (a
    /// request that finds it going away retires that one, not a newer one).
    h2: Mutex<Option<(u64, http2::SendRequest<UpstreamBody>)>>,
    h2_made: std::sync::atomic::AtomicU64,
    /// Connections open now (idle, busy, or upgraded).
    open: AtomicU32,
    /// Woken when a connection is returned or closes (a request waiting
    /// for a connection slot tries again).
    freed: Notify,
    sweeping: AtomicBool,
    /// Idle connections of the HTTP/1.1 fast path ([`super::h1`]): plain
    /// streams it reads and writes itself, without hyper.
    raw_idle: Mutex<Vec<RawIdle>>,
}

/// A connection the HTTP/1.1 fast path drives itself; counted open until
/// dropped (which closes it).
pub struct Raw {
    pub io: super::super::connect::Upstream,
    /// Bytes read past the end of the last response (none, on a healthy
    /// keep-alive connection), and the buffer the next one is read into.
    pub buf: bytes::BytesMut,
    /// Whether it came from the pool (a failure before any response byte
    /// may be the server having closed it meanwhile).
    pub reused: bool,
    _open: OpenGuard,
}

struct RawIdle {
    raw: Raw,
    since: Instant,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("open", &self.open.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

struct Idle {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

/// A connection to send one request on.
pub enum Sender {
    Http1(http1::SendRequest<UpstreamBody>),
    Http2(http2::SendRequest<UpstreamBody>),
}

/// A checked-out connection; [`Checkout::give_back`] returns an HTTP/1.1
/// connection to the pool once its response has been read to the end.
pub struct Checkout {
    pub sender: Sender,
    pool: Weak<Pool>,
    /// Whether it came from the pool (a failure on a reused connection may
    /// be the server having closed it meanwhile).
    pub reused: bool,
    /// Which shared HTTP/2 connection it is (0 for HTTP/1.1).
    h2_number: u64,
}

/// How a pool is asked for a connection.
pub struct Want<'a> {
    pub protocol: UpstreamProtocol,
    pub max_connections: u32,
    pub idle_timeout: Duration,
    /// A fresh HTTP/1.1 connection that may be upgraded (WebSocket); never pooled.
    pub upgrade: bool,
    pub connect: &'a (dyn Fn() -> ConnectFuture<'a> + Send + Sync),
    /// The service's gauge of upstream connections open.
    pub gauge: &'a crate::telemetry::Gauge,
}

/// Dials the backend: the stream, or why not. Boxed only when a
/// connection is made, not per request.
pub type ConnectFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<super::super::connect::Upstream, ConnectError>> + Send + 'a>,
>;

/// A connection to a backend as hyper drives it: TCP, or a mesh stream.
pub trait Io: hyper::rt::Read + hyper::rt::Write + Send + Unpin {}

impl<T: hyper::rt::Read + hyper::rt::Write + Send + Unpin> Io for T {}

/// The connection hyper drives for an upstream.
pub fn io(upstream: super::super::connect::Upstream) -> Box<dyn Io> {
    Box::new(TokioIo::new(upstream))
}

/// Why no upstream connection was had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    Refused,
    Timeout,
    Handshake,
}

impl Pool {
    /// Connections open now.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Relaxed)
    }

    /// Idle HTTP/1.1 connections now.
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// A connection: an idle one that is still open, the shared HTTP/2 one,
    /// or a new one if the backend has a free connection slot; otherwise
    /// waits for one to be returned or to close.
    pub async fn checkout(self: &Arc<Self>, want: &Want<'_>) -> Result<Checkout, ConnectError> {
        loop {
            if want.upgrade {
                return self.connect_http1(want, true).await;
            }
            if want.protocol == UpstreamProtocol::Http2 {
                let shared = self.h2.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some((number, mut sender)) = shared.filter(|(_, s)| !s.is_closed()) {
                    if sender.ready().await.is_ok() {
                        return Ok(self.checked_out(Sender::Http2(sender), true).numbered(number));
                    }
                }
                let mut sender = self.connect_http2(want).await?;
                // The last to connect is shared; a racing earlier one serves
                // its own requests and closes when done.
                let number = self.h2_made.fetch_add(1, Ordering::Relaxed) + 1;
                *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some((number, sender.clone()));
                let _ = sender.ready().await;
                return Ok(self.checked_out(Sender::Http2(sender), false).numbered(number));
            }
            while let Some(mut idle) = self.take_idle(want.idle_timeout) {
                if idle.sender.ready().await.is_ok() {
                    return Ok(self.checked_out(Sender::Http1(idle.sender), true));
                }
            }
            if self.open() < want.max_connections.max(1) {
                return self.connect_http1(want, false).await;
            }
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.idle() > 0 || self.open() < want.max_connections.max(1) {
                continue;
            }
            // Every slot taken: an idle connection of the fast path's gives
            // its slot up (closed now: `open` drops as it goes).
            if self
                .raw_idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()
                .is_some()
            {
                continue;
            }
            freed.await;
        }
    }

    /// A connection for the HTTP/1.1 fast path: an idle one still open, or
    /// a new one if the backend has a free connection slot; otherwise waits
    /// for one to be returned or to close.
    pub async fn checkout_raw(self: &Arc<Self>, want: &Want<'_>) -> Result<Raw, ConnectError> {
        loop {
            if let Some(raw) = self.take_raw_idle(want.idle_timeout) {
                return Ok(raw);
            }
            if self.open() < want.max_connections.max(1) {
                let open = OpenGuard::new(self, want.gauge);
                let io = (want.connect)().await?;
                return Ok(Raw {
                    io,
                    buf: bytes::BytesMut::new(),
                    reused: false,
                    _open: open,
                });
            }
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if !self.raw_idle.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
                || self.open() < want.max_connections.max(1)
            {
                continue;
            }
            // Every slot taken: an idle connection of hyper's side gives
            // its slot up (it closes, and says so through `freed`).
            drop(self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop());
            freed.await;
        }
    }

    /// Returns a fast-path connection whose exchange is complete.
    pub fn give_back_raw(self: &Arc<Self>, mut raw: Raw, idle_timeout: Duration) {
        raw.reused = true;
        self.raw_idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(RawIdle {
                raw,
                since: Instant::now(),
            });
        self.now_idle(idle_timeout);
    }

    /// A connection has just gone idle: a request waiting for one tries
    /// again, and idle connections are swept from now on.
    fn now_idle(self: &Arc<Self>, idle_timeout: Duration) {
        self.freed.notify_one();
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(self), idle_timeout));
        }
    }

    /// The most recently returned idle fast-path connection that is still
    /// open: one the backend closed meanwhile reads as closed at once.
    fn take_raw_idle(&self, idle_timeout: Duration) -> Option<Raw> {
        let mut idle = self.raw_idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = idle.pop() {
            let mut raw = conn.raw;
            if conn.since.elapsed() < idle_timeout && still_open(&mut raw.io) {
                return Some(raw);
            }
        }
        None
    }

    fn take_idle(&self, idle_timeout: Duration) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|conn| conn.since.elapsed() < idle_timeout && !conn.sender.is_closed());
        idle.pop()
    }

    fn checked_out(self: &Arc<Self>, sender: Sender, reused: bool) -> Checkout {
        Checkout {
            sender,
            pool: Arc::downgrade(self),
            reused,
            h2_number: 0,
        }
    }

    async fn connect_http1(
        self: &Arc<Self>,
        want: &Want<'_>,
        upgrade: bool,
    ) -> Result<Checkout, ConnectError> {
        let stream = io((want.connect)().await?);
        let (sender, connection) = http1::Builder::new()
            .handshake(stream)
            .await
            .map_err(|_| ConnectError::Handshake)?;
        let open = OpenGuard::new(self, want.gauge);
        tokio::spawn(async move {
            let _open = open;
            let _ = if upgrade {
                connection.with_upgrades().await
            } else {
                connection.await
            };
        });
        Ok(self.checked_out(Sender::Http1(sender), false))
    }

    async fn connect_http2(
        self: &Arc<Self>,
        want: &Want<'_>,
    ) -> Result<http2::SendRequest<UpstreamBody>, ConnectError> {
        let stream = io((want.connect)().await?);
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .handshake(stream)
            .await
            .map_err(|_| ConnectError::Handshake)?;
        let open = OpenGuard::new(self, want.gauge);
        tokio::spawn(async move {
            let _open = open;
            let _ = connection.await;
        });
        Ok(sender)
    }

    fn put_idle(self: &Arc<Self>, sender: http1::SendRequest<UpstreamBody>, idle_timeout: Duration) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(Idle {
            sender,
            since: Instant::now(),
        });
        self.now_idle(idle_timeout);
    }
}

impl Checkout {
    fn numbered(mut self, h2_number: u64) -> Checkout {
        self.h2_number = h2_number;
        self
    }

    /// Stops sharing this HTTP/2 connection (the backend is going away from
    /// it: a GOAWAY or a refused stream), so the next request opens a new
    /// one while the streams it still carries finish.
    pub fn retire(&self) {
        let Some(pool) = self.pool.upgrade() else { return };
        let mut shared = pool.h2.lock().unwrap_or_else(|e| e.into_inner());
        if shared
            .as_ref()
            .is_some_and(|(number, _)| *number == self.h2_number)
        {
            *shared = None;
        }
    }

    /// Returns an HTTP/1.1 connection whose exchange is complete to the
    /// pool (an HTTP/2 one is shared and needs nothing).
    pub fn give_back(self, idle_timeout: Duration) {
        if let (Sender::Http1(sender), Some(pool)) = (self.sender, self.pool.upgrade()) {
            if !sender.is_closed() {
                pool.put_idle(sender, idle_timeout);
            }
        }
    }
}

/// Whether an idle connection is still open: reading it without waiting
/// finds nothing yet. End of stream, an error, or bytes nobody asked for
/// all mean it cannot carry another request.
fn still_open(io: &mut super::super::connect::Upstream) -> bool {
    use tokio::io::AsyncRead;
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    std::pin::Pin::new(io).poll_read(&mut cx, &mut buf).is_pending()
}

/// Closes idle connections past the idle timeout, while the pool lives and
/// has idle connections.
async fn sweep(pool: Weak<Pool>, idle_timeout: Duration) {
    let period = (idle_timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|conn| conn.since.elapsed() < idle_timeout && !conn.sender.is_closed());
        let mut raw = pool.raw_idle.lock().unwrap_or_else(|e| e.into_inner());
        raw.retain(|conn| conn.since.elapsed() < idle_timeout);
        if idle.is_empty() && raw.is_empty() {
            pool.sweeping.store(false, Ordering::Release);
            return;
        }
    }
}

/// Counts an open connection until its connection task ends.
struct OpenGuard(Weak<Pool>, crate::telemetry::Gauge);

impl OpenGuard {
    fn new(pool: &Arc<Pool>, gauge: &crate::telemetry::Gauge) -> OpenGuard {
        pool.open.fetch_add(1, Ordering::Relaxed);
        gauge.increment(1);
        OpenGuard(Arc::downgrade(pool), gauge.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.1.decrement(1);
        if let Some(pool) = self.0.upgrade() {
            pool.open.fetch_sub(1, Ordering::Relaxed);
            pool.freed.notify_one();
        }
    }
}
