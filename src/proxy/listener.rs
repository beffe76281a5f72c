//! Listening sockets: bind, accept, and hand each connection to the path
//! its service's protocol takes.
//!
//! One acceptor per event loop serves every listener of that loop, the way
//! HAProxy's and nginx's loops do: the listeners sit in an epoll set of its
//! own, which the loop watches as one descriptor. A listener costs its
//! socket and a table entry, not a task and a reactor registration each
//! (10k services were 20 MiB of accept tasks). The proxy's connection
//! budget is global, so with every slot taken the acceptor waits and no
//! listener accepts until a connection ends: the rest wait in the backlog.

use super::drain;
use super::service::StateCell;
use super::{congestion, http, l4};
use crate::catalog::Protocol;
use crate::limits::ConnectionBudget;
use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot};

/// Binds with SO_REUSEADDR so a restart does not wait out TIME_WAIT, and
/// TCP_NODELAY and the loopback congestion control, which accepted sockets
/// inherit on Linux (setsockopts per connection saved): every client is on
/// this host. `shared` sets SO_REUSEPORT, for one listener per worker; the
/// kernel lets only sockets of the same user that all set it share a port,
/// so a port held by anything else still fails the bind. Non-blocking.
pub fn bind(addr: SocketAddr, congestion: Option<&CString>, shared: bool) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    if let Some(name) = congestion {
        congestion::apply(socket.as_raw_fd(), name);
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// What an accepted connection of one listener is served with.
pub struct Listening {
    pub state: Arc<StateCell>,
    /// Cloned into each connection; dropped when the listener is removed.
    pub drain: drain::Watch,
}

enum Command {
    Add(TcpListener, Listening),
    /// Stop accepting on it and close this process's copy; answered once
    /// closed.
    Remove(RawFd, oneshot::Sender<()>),
}

/// The handle to one event loop's acceptor.
#[derive(Clone)]
pub struct Acceptor {
    commands: mpsc::UnboundedSender<Command>,
}

/// Connections accepted from one ready listener before the others get a
/// turn.
const ACCEPTS_PER_TURN: usize = 64;

impl Acceptor {
    /// Starts the acceptor of the event loop this is called on.
    pub fn spawn(budget: ConnectionBudget) -> io::Result<Acceptor> {
        // SAFETY: epoll_create1 with a constant flag; the descriptor is
        // owned below.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: epoll_create1 returned a new descriptor we own.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        // SAFETY: the OwnedFd is open and stays the same descriptor until
        // the AsyncFd that owns it drops it.
        let epoll = unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }?;
        let (commands, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(epoll, receiver, budget));
        Ok(Acceptor { commands })
    }

    /// Accepts on `listener` (non-blocking) from now on.
    pub fn add(&self, listener: TcpListener, listening: Listening) {
        let _ = self.commands.send(Command::Add(listener, listening));
    }

    /// Stops accepting on `fd`; resolves once this process's copy of the
    /// listener is closed (a successor holding it accepts on).
    pub async fn remove(&self, fd: RawFd) {
        let (done, closed) = oneshot::channel();
        if self.commands.send(Command::Remove(fd, done)).is_ok() {
            let _ = closed.await;
        }
    }
}

/// The acceptor's loop: commands, and connections on ready listeners.
async fn run(
    epoll: AsyncFd<OwnedFd>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    budget: ConnectionBudget,
) {
    let mut listeners: HashMap<RawFd, (TcpListener, Listening)> = HashMap::new();
    let mut ready = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    loop {
        tokio::select! {
            biased;
            command = commands.recv() => match command {
                Some(Command::Add(listener, listening)) => {
                    let fd = listener.as_raw_fd();
                    match watch_fd(&epoll, fd, libc::EPOLL_CTL_ADD) {
                        Ok(()) => {
                            listeners.insert(fd, (listener, listening));
                        }
                        Err(err) => tracing::error!("proxy: cannot watch listener {fd}: {err}"),
                    }
                }
                Some(Command::Remove(fd, done)) => {
                    if listeners.remove(&fd).is_some() {
                        let _ = watch_fd(&epoll, fd, libc::EPOLL_CTL_DEL);
                    }
                    let _ = done.send(());
                }
                // The proxy is gone: its listeners close with this loop.
                None => return,
            },
            guard = epoll.readable() => {
                let Ok(mut guard) = guard else { return };
                // SAFETY: epoll_wait into a buffer of `ready.len()` events,
                // without blocking.
                let count = unsafe {
                    libc::epoll_wait(epoll.as_raw_fd(), ready.as_mut_ptr(), ready.len() as i32, 0)
                };
                if count <= 0 {
                    guard.clear_ready();
                    continue;
                }
                for event in &ready[..count as usize] {
                    let fd = event.u64 as RawFd;
                    if let Some((listener, listening)) = listeners.get(&fd) {
                        accept_ready(listener, listening, &budget).await;
                    }
                }
            }
        }
    }
}

/// Adds or removes `fd` in the acceptor's epoll set (level-triggered: a
/// listener left with connections is reported again next turn).
fn watch_fd(epoll: &AsyncFd<OwnedFd>, fd: RawFd, op: libc::c_int) -> io::Result<()> {
    let mut event = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: epoll_ctl on our epoll descriptor with a listener we hold.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut event) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Accepts what `listener` has, up to a turn's worth, each connection
/// served with a slot of the connection budget: at most one descriptor
/// over budget per acceptor, the rest waits in the backlog.
async fn accept_ready(listener: &TcpListener, listening: &Listening, budget: &ConnectionBudget) {
    for _ in 0..ACCEPTS_PER_TURN {
        let (client, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
            Err(err) => {
                // Out of file descriptors and the like: say so, back off briefly.
                let state = listening.state.current();
                tracing::warn!("service {}: accept failed: {err}", state.name());
                state.shared.metrics().accept_errors.increment(1);
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
        };
        let client = match client
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(client))
        {
            Ok(client) => client,
            Err(err) => {
                tracing::debug!("proxy: cannot serve a connection from {peer}: {err}");
                continue;
            }
        };
        // With every slot taken, the acceptor holds the connection it has
        // just accepted until one frees, and accepts no more meanwhile.
        let slot = budget.admit().await;
        let cell = listening.state.clone();
        let drain = listening.drain.clone();
        tokio::spawn(async move {
            dispatch(client, peer, cell, drain).await;
            drop(slot);
        });
    }
}

/// Serves one connection on the path of its service's protocol: a TCP
/// connection keeps the state it was accepted with; an HTTP one reads the
/// service's state at every request.
async fn dispatch(
    client: tokio::net::TcpStream,
    peer: SocketAddr,
    cell: Arc<StateCell>,
    drain: drain::Watch,
) {
    let state = cell.current();
    match state.spec.protocol {
        Protocol::Tcp => l4::serve(client, peer, state, drain).await,
        Protocol::Http => {
            drop(state);
            http::serve(client, peer, cell, drain).await
        }
    }
}
