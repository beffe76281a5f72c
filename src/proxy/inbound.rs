//! The mesh's inbound listener (`mesh.listen`, port 15008 by convention,
//! as ztunnel's HBONE): TLS 1.3 with a client certificate chained to the
//! mesh's trust bundle, then HTTP/2, each CONNECT stream one application
//! connection to a backend this node hosts.
//!
//! A stream names its target as `ip:port` with its service in
//! `x-loopmesh-service` (as this proxy dials), or as `service:port`, the
//! instance on that port; only an instance of that service registered by
//! this node (its `node` is this node) is reachable (never an arbitrary
//! address: the listener is no open relay), and a service with an `allow`
//! list admits only the callers it names.

use super::drain;
use super::http::access_log::StreamLine;
use super::service::CompileContext;
use super::tls::identity::allowed;
use super::tls::{credentials::peer_identity, Credentials, NodeIdentity};
use super::tunnel::{COPY_BUFFER, INBOUND_MAX_STREAMS, TLS_READ_BUFFER};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Time a peer has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The header naming the service a tunneled stream is for.
pub const SERVICE_HEADER: &str = "x-loopmesh-service";

/// Time to connect to a local backend.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What the listener shares with its connections.
struct Shared {
    credentials: Arc<Credentials>,
    context: Arc<CompileContext>,
    /// This node's name, as its instances carry it.
    node: String,
}

/// Accepts mesh connections until the drain; then stops accepting, sends
/// GOAWAY on each connection and lets streams finish up to the deadline.
pub async fn serve(
    listener: TcpListener,
    credentials: Arc<Credentials>,
    context: Arc<CompileContext>,
    mut drain: drain::Watch,
) {
    let node = credentials.current().identity.node.clone();
    let shared = Arc::new(Shared {
        credentials,
        context,
        node,
    });
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = drain.signaled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!("mesh: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, peer, shared.clone(), drain.clone()));
    }
}

/// One peer's connection: handshake, identity, then its streams.
async fn connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, mut drain: drain::Watch) {
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.credentials.current().server.clone());
    let stream = tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, stream);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            tracing::debug!("mesh: handshake with {peer} failed: {err}");
            metrics::counter!("loopmesh_mesh_handshake_failures_total").increment(1);
            return;
        }
        Err(_) => {
            metrics::counter!("loopmesh_mesh_handshake_failures_total").increment(1);
            return;
        }
    };
    let Some(caller) = peer_identity(tls.get_ref().1.peer_certificates()) else {
        metrics::counter!("loopmesh_mesh_handshake_failures_total").increment(1);
        return;
    };
    metrics::counter!("loopmesh_mesh_inbound_connections_total").increment(1);
    // One line per peer connection (rare: connections are pooled), with
    // the certificate's end, which shows a rotation reaching the peers.
    let until = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| super::tls::identity::not_after(chain.first()?))
        .map(super::tls::identity::format_utc)
        .unwrap_or_default();
    tracing::info!("mesh: connection from {caller} at {peer} (certificate valid until {until})");
    let caller = Arc::new(caller);
    let service = {
        let shared = shared.clone();
        hyper::service::service_fn(move |request| {
            let (shared, caller) = (shared.clone(), caller.clone());
            async move {
                Ok::<_, std::convert::Infallible>(stream_to_target(request, &shared, &caller, peer).await)
            }
        })
    };
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_streams(INBOUND_MAX_STREAMS)
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);
    let finished = tokio::select! {
        _ = connection.as_mut() => true,
        () = drain.signaled() => false,
    };
    if !finished {
        connection.as_mut().graceful_shutdown();
        tokio::select! {
            _ = connection => {}
            () = drain.forced() => {}
        }
    }
}

/// What a CONNECT stream asks for, among this node's instances of its service.
#[derive(Clone, Copy)]
enum Target {
    /// `ip:port`, with the service in `x-loopmesh-service`.
    Address(SocketAddr),
    /// `service:port`: the instance on that port.
    Port(u16),
}

/// An answer without a body, with why.
fn refuse(status: StatusCode, reason: &'static str) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = status;
    response.headers_mut().insert(
        "x-loopmesh-error",
        hyper::header::HeaderValue::from_static(reason),
    );
    response
}

/// One CONNECT stream: checked, connected to its local target, relayed.
async fn stream_to_target(
    mut request: Request<Incoming>,
    shared: &Shared,
    caller: &NodeIdentity,
    peer: SocketAddr,
) -> Response<Empty<Bytes>> {
    if request.method() != Method::CONNECT {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "connect_only");
    }
    let named = request
        .headers()
        .get(SERVICE_HEADER)
        .map(|v| v.to_str().unwrap_or_default());
    let Some(authority) = request.uri().authority() else {
        return refuse(StatusCode::BAD_REQUEST, "bad_target");
    };
    let (service, wanted) = match (authority.as_str().parse::<SocketAddr>(), named) {
        (Ok(addr), Some(service)) => (service, Target::Address(addr)),
        (Ok(_), None) => return refuse(StatusCode::BAD_REQUEST, "no_service"),
        (Err(_), named) => match authority.port_u16() {
            Some(port) if named.is_none_or(|named| named == authority.host()) => {
                (authority.host(), Target::Port(port))
            }
            _ => return refuse(StatusCode::BAD_REQUEST, "bad_target"),
        },
    };
    let Some(state) = shared.context.directory.find(service) else {
        return refuse(StatusCode::NOT_FOUND, "not_hosted_here");
    };
    let hosted = state.backends().ok().and_then(|set| {
        set.backends()
            .iter()
            .filter(|b| b.node.as_ref().is_some_and(|n| n.as_str() == shared.node))
            .filter_map(|b| b.addr)
            .find(|addr| match wanted {
                Target::Address(wanted) => *addr == wanted,
                Target::Port(port) => addr.port() == port,
            })
    });
    let Some(target) = hosted else {
        return refuse(StatusCode::NOT_FOUND, "not_hosted_here");
    };
    let caller_id = caller.to_string();
    let allow = &state.spec.allow;
    if !allow.is_empty() && !allow.iter().any(|pattern| allowed(pattern, &caller_id)) {
        if state.shared.metrics().deny(&caller_id) {
            tracing::warn!(
                "mesh: {caller_id} is not allowed to reach service {} (allow: {}); refused, and counted from now on",
                state.name(),
                allow.join(", ")
            );
        }
        return refuse(StatusCode::FORBIDDEN, "not_allowed");
    }
    let backend = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        _ => return refuse(StatusCode::BAD_GATEWAY, "connect_failed"),
    };
    let _ = backend.set_nodelay(true);
    let upgrade = hyper::upgrade::on(&mut request);
    let logged = (state.spec.http.access_log || state.context.access_log_all).then(|| caller_id.clone());
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        state.shared.metrics().inbound_streams.increment(1);
        let started = std::time::Instant::now();
        let mut backend = Counted {
            inner: backend,
            written: 0,
            read: 0,
        };
        // Counted on the way, not from the copy's result: a stream the
        // caller resets (its pooled connection closing) ends in an error.
        let _ = tokio::io::copy_bidirectional_with_sizes(
            &mut TokioIo::new(upgraded),
            &mut backend,
            COPY_BUFFER,
            COPY_BUFFER,
        )
        .await;
        if let (Some(caller), Some(log)) = (logged, state.context.access_log()) {
            let (bytes_in, bytes_out) = (backend.written, backend.read);
            log.write_stream(StreamLine {
                service: state.name(),
                caller: &caller,
                peer,
                target,
                duration: started.elapsed(),
                bytes_in,
                bytes_out,
            });
        }
    });
    Response::new(Empty::new())
}

/// A backend connection that counts the bytes through it.
struct Counted {
    inner: TcpStream,
    written: u64,
    read: u64,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        polled
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(written)) = polled {
            self.written += written as u64;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
