//! A service's listening sockets: bind, accept, and hand each connection
//! to the path its protocol takes.

use super::drain;
use super::service::ServiceState;
use super::{congestion, l4};
use crate::catalog::Protocol;
use crate::limits::ConnectionBudget;
use std::ffi::CString;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

/// Binds with SO_REUSEADDR so a restart does not wait out TIME_WAIT, and
/// TCP_NODELAY and the loopback congestion control, which accepted sockets
/// inherit on Linux (setsockopts per connection saved): every client is on
/// this host. `shared` sets SO_REUSEPORT, for one listener per worker; the
/// kernel lets only sockets of the same user that all set it share a port,
/// so a port held by anything else still fails the bind.
pub fn bind(addr: SocketAddr, congestion: Option<&CString>, shared: bool) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    if shared {
        socket.set_reuseport(true)?;
    }
    socket.set_nodelay(true)?;
    if let Some(name) = congestion {
        congestion::apply(socket.as_raw_fd(), name);
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts a service's connections until its drain is signaled, each
/// served with a slot of the proxy's connection budget. With none free,
/// the loop holds the connection it has just accepted until a slot frees
/// and accepts no more meanwhile: at most one descriptor over budget per
/// listener, the rest waits in the backlog.
pub async fn accept_loop(
    listener: TcpListener,
    state: watch::Receiver<Arc<ServiceState>>,
    mut drain: drain::Watch,
    budget: ConnectionBudget,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            accepted = listener.accept() => accepted,
            () = drain.signaled() => return,
        };
        match accepted {
            Ok((client, peer)) => {
                // A connection accepted is served, even if the drain starts
                // while it waits for a slot (then without one: at most one
                // over budget, and the loop ends).
                let slot = tokio::select! {
                    slot = budget.admit() => Some(slot),
                    () = drain.signaled() => None,
                };
                let current = state.borrow().clone();
                let connection = drain.clone();
                tokio::spawn(async move {
                    dispatch(client, peer, current, connection).await;
                    drop(slot);
                });
            }
            Err(err) => {
                // Out of file descriptors and the like: say so, back off briefly.
                let service = state.borrow().name().to_string();
                tracing::warn!("service {service}: accept failed: {err}");
                metrics::counter!("loopmesh_proxy_accept_errors_total", "service" => service).increment(1);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one connection on the path of its service's protocol.
async fn dispatch(
    client: tokio::net::TcpStream,
    peer: SocketAddr,
    state: Arc<ServiceState>,
    drain: drain::Watch,
) {
    match state.route.spec.protocol {
        Protocol::Tcp => l4::serve(client, peer, state, drain).await,
        // Until the HTTP proxy lands: relayed as TCP, which the manager
        // says once per service when it starts serving it.
        Protocol::Http => l4::serve(client, peer, state, drain).await,
    }
}
