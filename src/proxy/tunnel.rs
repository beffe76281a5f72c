//! Outbound through the mesh: application connections to an instance of
//! another node ride HTTP/2 CONNECT streams inside one mTLS connection per
//! peer node, as ztunnel's HBONE (another past `max_streams_per_connection`
//! streams at once). A new application connection costs a stream, not a
//! handshake; a broken or closed peer connection is made again at the next
//! stream, and one without streams for `idle_timeout` closes.

use super::balance::now_nanos;
use super::inbound::SERVICE_HEADER;
use super::tls::{Credentials, Loaded};
use crate::policy::TlsMode;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::client::conn::http2;
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;

/// Buffer of each direction of a tunneled stream's copy: TLS records carry
/// up to 16 KiB, and a bulk stream moves in fewer, larger writes.
pub const COPY_BUFFER: usize = 64 * 1024;
/// Read buffer under a mesh connection's TLS: rustls reads 4 KiB a time
/// from what it is given, so a bulk stream would cost a syscall per 4 KiB.
pub const TLS_READ_BUFFER: usize = 64 * 1024;

/// How often an idle peer connection is checked with a PING.
const PEER_PING: Duration = Duration::from_secs(30);
/// How long a PING may go unanswered before the connection is given up.
const PEER_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The node's side of the mesh, shared by every service.
#[derive(Debug)]
pub struct Mesh {
    /// This node's name (instances it registered carry it).
    pub node: String,
    pub credentials: Arc<Credentials>,
    /// `tls.mode` of services that do not set it.
    pub default_mode: TlsMode,
    /// A peer connection without streams for this long is closed.
    idle_timeout: Duration,
    /// Streams one peer connection carries at once before another is made.
    max_streams: usize,
    peers: Mutex<HashMap<(SocketAddr, Box<str>), PeerSlot>>,
}

/// The most streams the inbound listener takes on one connection (hyper's
/// default, 200, would hold the 201st application connection of a peer).
pub const INBOUND_MAX_STREAMS: u32 = 4096;

/// A peer's connections, made by whoever needs one while the others wait.
type PeerSlot = Arc<tokio::sync::Mutex<Vec<Peer>>>;

/// What the admin API shows of the mesh, read when asked (a rotation
/// shows at once, with no pass of the agent's loop in between).
#[derive(Clone, Debug)]
pub struct MeshStatus {
    pub mesh: Arc<Mesh>,
    pub listen: Option<SocketAddr>,
}

impl MeshStatus {
    /// The node's identity and when its certificate expires, now.
    pub fn credentials(&self) -> (String, std::time::SystemTime) {
        let current = self.mesh.credentials.current();
        (current.identity.to_string(), current.expires)
    }
}

/// One peer node's connection.
#[derive(Debug)]
struct Peer {
    sender: http2::SendRequest<Empty<Bytes>>,
    /// The credentials it was made with: once they are replaced, new
    /// streams go over a new connection that presents the new certificate,
    /// while this one carries its open streams to their end.
    made_with: Arc<Loaded>,
    /// Its streams open now, and since when it has had none.
    streams: Arc<Streams>,
}

/// A peer connection's open streams.
#[derive(Debug, Default)]
struct Streams {
    open: std::sync::atomic::AtomicUsize,
    /// When the last stream ended, on the proxy's clock ([`now_nanos`]).
    idle_since: std::sync::atomic::AtomicU64,
}

impl Streams {
    fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// How long it has had no stream, if it has none now.
    fn idle_for(&self) -> Option<Duration> {
        (self.open() == 0).then(|| {
            Duration::from_nanos(now_nanos().saturating_sub(self.idle_since.load(Ordering::Acquire)))
        })
    }
}

/// Counts a stream open on its peer connection until dropped.
#[derive(Debug)]
struct OpenStream(Arc<Streams>);

impl OpenStream {
    fn new(streams: &Arc<Streams>) -> OpenStream {
        streams.open.fetch_add(1, Ordering::AcqRel);
        OpenStream(streams.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.idle_since.store(now_nanos(), Ordering::Release);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A stream to a backend through the mesh, counted on its peer connection
/// while it is open.
#[derive(Debug)]
pub struct Tunneled {
    io: TokioIo<Upgraded>,
    _open: OpenStream,
}

impl tokio::io::AsyncRead for Tunneled {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tunneled {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn failed(reason: impl std::fmt::Display) -> io::Error {
    io::Error::other(reason.to_string())
}

impl Mesh {
    pub fn new(
        node: &str,
        credentials: Arc<Credentials>,
        default_mode: TlsMode,
        idle_timeout: Duration,
        max_streams: u32,
    ) -> Mesh {
        Mesh {
            node: node.to_string(),
            credentials,
            default_mode,
            idle_timeout,
            max_streams: max_streams.max(1) as usize,
            peers: Mutex::default(),
        }
    }

    /// Opens a stream to `target` (an instance of `service` that `node`
    /// hosts) through `node`'s inbound listener at `peer`, within `timeout`
    /// (connection and handshake included when one is needed).
    pub async fn open(
        &self,
        peer: SocketAddr,
        node: &str,
        service: &str,
        target: SocketAddr,
        timeout: Duration,
    ) -> io::Result<Tunneled> {
        tokio::time::timeout(timeout, self.open_stream(peer, node, service, target))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("mesh: no stream to {node} at {peer} within {timeout:?}"),
                )
            })?
    }

    async fn open_stream(
        &self,
        peer: SocketAddr,
        node: &str,
        service: &str,
        target: SocketAddr,
    ) -> io::Result<Tunneled> {
        let slot = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((peer, node.into()))
            .or_default()
            .clone();
        let (mut sender, open) = {
            // Streams go on the first connection with room; whoever finds
            // none makes one while the others wait for it. Connections
            // made with replaced credentials leave the list (new streams
            // present the new certificate) and carry their streams to the end.
            let watched = Arc::downgrade(&slot);
            let mut peers = slot.lock().await;
            let credentials = self.credentials.current();
            peers.retain(|p| !p.sender.is_closed() && Arc::ptr_eq(&p.made_with, &credentials));
            let usable = peers.iter().find(|p| p.streams.open() < self.max_streams);
            match usable {
                Some(existing) => (existing.sender.clone(), OpenStream::new(&existing.streams)),
                None => {
                    let sender = self.connect(peer, node, &credentials).await?;
                    let streams = Arc::new(Streams {
                        idle_since: now_nanos().into(),
                        ..Streams::default()
                    });
                    let open = OpenStream::new(&streams);
                    tokio::spawn(close_when_idle(watched, streams.clone(), self.idle_timeout));
                    peers.push(Peer {
                        sender: sender.clone(),
                        made_with: credentials,
                        streams,
                    });
                    (sender, open)
                }
            }
        };
        sender.ready().await.map_err(failed)?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(SERVICE_HEADER, service)
            .body(Empty::new())
            .map_err(failed)?;
        let response = sender.send_request(request).await.map_err(failed)?;
        if response.status() != StatusCode::OK {
            let reason = response
                .headers()
                .get("x-loopmesh-error")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let kind = if response.status() == StatusCode::FORBIDDEN {
                io::ErrorKind::PermissionDenied
            } else {
                io::ErrorKind::ConnectionRefused
            };
            return Err(io::Error::new(
                kind,
                format!(
                    "mesh: {node} refused the stream to {target}: {} {reason}",
                    response.status()
                ),
            ));
        }
        let upgraded = hyper::upgrade::on(response).await.map_err(failed)?;
        Ok(Tunneled {
            io: TokioIo::new(upgraded),
            _open: open,
        })
    }

    /// A new mTLS connection to a peer node, verified to be `node`.
    async fn connect(
        &self,
        peer: SocketAddr,
        node: &str,
        credentials: &Loaded,
    ) -> io::Result<http2::SendRequest<Empty<Bytes>>> {
        let stream = TcpStream::connect(peer).await?;
        stream.set_nodelay(true)?;
        let name = ServerName::try_from(node.to_string())
            .map_err(|_| failed(format!("mesh: node name {node:?} is not a DNS name")))?;
        let connector = tokio_rustls::TlsConnector::from(credentials.client.clone());
        let tls = connector
            .connect(name, tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, stream))
            .await
            .map_err(|err| failed(format!("mesh: TLS with {node} at {peer}: {err}")))?;
        // PINGs while idle: a peer that went away (a node lost without a
        // FIN) closes the connection within a minute, and the next stream
        // makes a new one.
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(PEER_PING)
            .keep_alive_timeout(PEER_PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(failed)?;
        metrics::counter!("loopmesh_mesh_peer_connections_total").increment(1);
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}

/// Closes a peer connection once it has carried no stream for
/// `idle_timeout` (its slot lets go of it: the connection ends when no
/// sender is left), unless it left the slot or closed meanwhile.
async fn close_when_idle(
    slot: std::sync::Weak<tokio::sync::Mutex<Vec<Peer>>>,
    streams: Arc<Streams>,
    idle_timeout: Duration,
) {
    let period = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::time::sleep(period).await;
        let Some(slot) = slot.upgrade() else { return };
        let mut peers = slot.lock().await;
        let Some(at) = peers.iter().position(|peer| Arc::ptr_eq(&peer.streams, &streams)) else {
            return;
        };
        if peers[at].sender.is_closed() {
            return;
        }
        if streams.idle_for().is_some_and(|idle| idle >= idle_timeout) {
            peers.swap_remove(at);
            return;
        }
    }
}
