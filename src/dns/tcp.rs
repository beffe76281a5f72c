//! DNS over TCP (RFC 7766): two-byte length framing, answered from the same
//! precomputed bytes as UDP ([`super::wire`]), several queries per
//! connection, answered in order.
//!
//! Stopping has two halves, as the proxy's: the listener stops accepting
//! at once (after a takeover the successor accepts on the same socket),
//! while connections already open answer what they are sent until the
//! client goes quiet, then close; a deadline closes the rest.

use super::wire::{self, Transport};
use super::{QueryMetrics, ZoneCell};
use crate::limits::ConnectionBudget;
use crate::proxy::drain;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A connection silent this long between queries is closed.
const IDLE: Duration = Duration::from_secs(10);

/// Once stopping: a connection silent this long is closed (its client has
/// had its answers; a new query would go to the successor).
const IDLE_WHILE_STOPPING: Duration = Duration::from_millis(500);

/// Connections closed at this point after the listener stopped.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Connections served at once; more wait in the backlog (DNS over TCP is
/// the rare path: truncated answers).
const MAX_CONNECTIONS: usize = 256;

/// The TCP side of the DNS server.
pub struct TcpServer {
    stop: drain::Trigger,
    accept: JoinHandle<()>,
    fd: RawFd,
}

impl TcpServer {
    /// Serves queries on `listener` from the zone in `cell`.
    pub fn start(listener: TcpListener, cell: Arc<ZoneCell>, metrics: Arc<QueryMetrics>) -> TcpServer {
        let (stop, watch) = drain::channel();
        let fd = listener.as_raw_fd();
        let accept = tokio::spawn(accept_loop(listener, cell, metrics, watch));
        TcpServer { stop, accept, fd }
    }

    /// The listening descriptor, for a successor.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Stops accepting (the listener is closed in this process when this
    /// returns), then lets open connections finish, up to a deadline.
    pub async fn stop(self) {
        self.stop.signal();
        let _ = self.accept.await;
        self.stop.drain(DRAIN_DEADLINE).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    cell: Arc<ZoneCell>,
    metrics: Arc<QueryMetrics>,
    mut stop: drain::Watch,
) {
    let budget = ConnectionBudget::new("dns-tcp", MAX_CONNECTIONS);
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.signaled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors and the like: back off, do not spin.
                tracing::debug!("dns: tcp accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A connection accepted is served, even if the stop comes while it
        // waits for a slot.
        let slot = tokio::select! {
            slot = budget.admit() => Some(slot),
            () = stop.signaled() => None,
        };
        let (cell, metrics, watch) = (cell.clone(), metrics.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(err) = serve(stream, &cell, &metrics, watch).await {
                tracing::debug!("dns: tcp connection from {peer}: {err}");
            }
            drop(slot);
        });
    }
}

/// Answers one connection's queries until it closes, goes quiet, or the
/// drain forces it.
async fn serve(
    mut stream: TcpStream,
    cell: &ZoneCell,
    metrics: &QueryMetrics,
    mut drain: drain::Watch,
) -> std::io::Result<()> {
    let mut query = Vec::with_capacity(512);
    let mut response = Vec::with_capacity(512);
    loop {
        let idle = if drain.is_signaled() {
            IDLE_WHILE_STOPPING
        } else {
            IDLE
        };
        let length = tokio::select! {
            length = tokio::time::timeout(idle, stream.read_u16()) => match length {
                Ok(Ok(length)) => usize::from(length),
                // Closed by the client (EOF), or quiet too long.
                Ok(Err(_)) | Err(_) => return Ok(()),
            },
            () = drain.forced() => return Ok(()),
        };
        query.resize(length, 0);
        let read = tokio::time::timeout(IDLE, stream.read_exact(&mut query));
        match read.await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => return Err(err),
            Err(_) => return Ok(()),
        }
        let started = Instant::now();
        let served = cell.current();
        let Some(answered) = wire::respond(&served, &query, &mut response, Transport::Tcp) else {
            continue;
        };
        let mut framed = Vec::with_capacity(2 + response.len());
        framed.extend_from_slice(&(response.len() as u16).to_be_bytes());
        framed.extend_from_slice(&response);
        stream.write_all(&framed).await?;
        metrics.record(answered, "tcp", Some(started.elapsed()));
    }
}
