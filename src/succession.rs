//! The agent's side of a takeover ([`crate::takeover`]): what it listens
//! on, how it hands that to a successor and steps aside, and how it starts
//! one (`loopmesh reload`, SIGHUP).

use crate::admin::AdminServer;
use crate::dns::DnsServer;
use crate::proxy::ProxyManager;
use crate::signal::Hangups;
use crate::state::StateLock;
use crate::takeover::{self, ControlListener, Handover, Inherited, Request, Session, Socket};
use std::os::fd::RawFd;
use std::path::Path;
use tokio::sync::mpsc;

/// Everything the agent listens on, and the state directory's lock, as
/// the control loop lends them.
pub struct Listening<'a> {
    pub proxy: Option<&'a mut ProxyManager>,
    pub dns: Option<&'a mut DnsServer>,
    pub admin: &'a mut Option<AdminServer>,
    pub lock: &'a StateLock,
}

impl Listening<'_> {
    /// Every socket a successor takes over, with its descriptor.
    fn offer(&self) -> Vec<(Socket, RawFd)> {
        let mut sockets = vec![(Socket::Lock, self.lock.fd())];
        if let Some(proxy) = self.proxy.as_deref() {
            sockets.extend(
                proxy
                    .listener_fds()
                    .into_iter()
                    .map(|(addr, fd)| (Socket::Proxy { addr }, fd)),
            );
            sockets.extend(proxy.mesh_inbound_fd().map(|fd| (Socket::MeshInbound, fd)));
        }
        if let Some((udp, tcp)) = self.dns.as_deref().and_then(DnsServer::fds) {
            sockets.extend([(Socket::DnsUdp, udp), (Socket::DnsTcp, tcp)]);
        }
        if let Some(fd) = self.admin.as_ref().and_then(AdminServer::fd) {
            sockets.push((Socket::Admin, fd));
        }
        sockets
    }

    /// Stops accepting anywhere (a successor accepts on the same sockets);
    /// connections already open carry on.
    async fn step_aside(&mut self) {
        if let Some(proxy) = self.proxy.as_deref_mut() {
            proxy.stop_accepting().await;
        }
        if let Some(dns) = self.dns.as_deref_mut() {
            dns.release().await;
        }
        if let Some(admin) = self.admin.take() {
            admin.stop_accepting().await;
        }
    }

    /// The way out: stops answering DNS (unless handed over, when the
    /// sockets are the successor's) and drains the proxy's connections.
    pub async fn finish(mut self, handed_over: bool) {
        if let Some(admin) = self.admin.take() {
            admin.stop_accepting().await;
        }
        if let Some(dns) = self.dns.as_deref_mut() {
            if handed_over {
                dns.release().await;
            } else {
                dns.shutdown().await;
            }
        }
        if let Some(proxy) = self.proxy.as_deref_mut() {
            proxy.shutdown().await;
        }
    }
}

/// Hands a predecessor's sockets to what this process is about to start.
pub fn adopt(inherited: &mut Inherited, proxy: Option<&mut ProxyManager>, dns: Option<&mut DnsServer>) {
    if let Some(proxy) = proxy {
        proxy.adopt(inherited.take_proxy());
        proxy.adopt_mesh_inbound(inherited.take(Socket::MeshInbound).pop());
    }
    if let Some(dns) = dns {
        if let (Some(udp), Some(tcp)) = (
            inherited.take(Socket::DnsUdp).pop(),
            inherited.take(Socket::DnsTcp).pop(),
        ) {
            dns.adopt(udp, tcp);
        }
    }
}

/// Takes the state directory's lock: the predecessor's when taking over,
/// else a fresh one.
pub fn lock(state_dir: &Path, inherited: &mut Inherited) -> Result<StateLock, crate::state::StateError> {
    match inherited.take(Socket::Lock).pop() {
        Some(fd) => crate::state::adopt_lock(state_dir, fd),
        None => crate::state::lock(state_dir),
    }
}

/// Once this process serves on the inherited sockets: tells the
/// predecessor, which stops accepting. Whatever happens, this process
/// serves on.
pub async fn serving(handover: Option<Handover>) {
    let Some(handover) = handover else { return };
    match handover.serving().await {
        Ok(()) => tracing::info!("takeover: the previous agent stopped accepting; this one serves alone"),
        Err(err) => tracing::warn!("takeover: {err}; serving anyway"),
    }
}

/// A successor being started, and who waits for it.
struct Pending {
    pid: u32,
    /// A `loopmesh reload` waiting for the outcome (none after SIGHUP).
    session: Option<Session>,
    /// It exited (how, and until when its own report of why is awaited:
    /// the report and the exit race).
    exited: Option<(String, tokio::time::Instant)>,
}

/// How long after a successor's exit its report of why is waited for.
const REPORT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The running agent's control socket, SIGHUP, and the successor it starts.
pub struct Succession {
    requests: mpsc::Receiver<Request>,
    hangups: Hangups,
    exits: mpsc::UnboundedReceiver<(u32, String)>,
    exits_tx: mpsc::UnboundedSender<(u32, String)>,
    pending: Option<Pending>,
    socket: std::path::PathBuf,
}

/// What needs the agent's attention.
pub enum Event {
    Request(Request),
    Hangup,
    /// A successor exited (pid, how) before or after taking over.
    Exited(u32, String),
    /// A successor exited without saying why, and the wait for its report
    /// is over.
    Silent,
}

impl Succession {
    /// Listens on the state directory's control socket.
    pub fn start(state_dir: &Path) -> Result<Succession, takeover::TakeoverError> {
        let control = ControlListener::bind(state_dir)?;
        let socket = control.path().to_path_buf();
        let (tx, requests) = mpsc::channel(4);
        tokio::spawn(control.serve(tx));
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let hangups = Hangups::new();
        Ok(Succession {
            requests,
            hangups,
            exits,
            exits_tx,
            pending: None,
            socket,
        })
    }

    /// Removes the control socket (a stop with no successor).
    pub fn close(self) {
        let _ = std::fs::remove_file(&self.socket);
    }

    /// The next event; cancel-safe.
    pub async fn next(&mut self) -> Event {
        let silent_at = self
            .pending
            .as_ref()
            .and_then(|p| p.exited.as_ref().map(|(_, at)| *at));
        let silent = async {
            match silent_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(request) = self.requests.recv() => Event::Request(request),
            () = self.hangups.next() => Event::Hangup,
            Some((pid, how)) = self.exits.recv() => Event::Exited(pid, how),
            () = silent => Event::Silent,
        }
    }

    /// Acts on `event`; true once the sockets are handed over and this
    /// process should drain and exit.
    pub async fn handle(&mut self, event: Event, mut listening: Listening<'_>) -> bool {
        match event {
            Event::Request(Request::Takeover { pid, session }) => {
                return self.hand_over(pid, session, &mut listening).await;
            }
            Event::Request(Request::Reload { session }) => self.start_successor(Some(session)).await,
            Event::Hangup => {
                tracing::info!(
                    "SIGHUP: starting a successor to take over with the config and binary on disk"
                );
                self.start_successor(None).await;
            }
            Event::Request(Request::SuccessorFailed { reason }) => {
                tracing::error!("takeover: the new agent cannot start: {reason}; this one serves on");
                self.fail_pending(reason).await;
            }
            Event::Exited(pid, how) => {
                if let Some(pending) = self.pending.as_mut().filter(|pending| pending.pid == pid) {
                    pending.exited = Some((how, tokio::time::Instant::now() + REPORT_GRACE));
                }
            }
            Event::Silent => {
                let how = self
                    .pending
                    .as_ref()
                    .and_then(|pending| Some((pending.pid, pending.exited.clone()?.0)));
                if let Some((pid, how)) = how {
                    let reason = format!("the new agent (pid {pid}) {how} before taking over; see its log");
                    tracing::error!("takeover: {reason}; this one serves on");
                    self.fail_pending(reason).await;
                }
            }
        }
        false
    }

    /// Gives `pid` every socket; once it serves, stops accepting here.
    async fn hand_over(&mut self, pid: u32, session: Session, listening: &mut Listening<'_>) -> bool {
        let offered = listening.offer();
        tracing::info!(
            "takeover: pid {pid} asks for the sockets; handing over {}",
            offered.len()
        );
        if let Err(err) = session.offer(&offered).await {
            tracing::error!("takeover by pid {pid} failed: {err}; this one serves on");
            if self.pending.as_ref().is_some_and(|pending| pending.pid == pid) {
                self.fail_pending(err.to_string()).await;
            }
            return false;
        }
        // systemd follows the new main process from now on (its READY=1
        // and watchdog pings come after this, once it is told below).
        crate::systemd::notify(&format!("MAINPID={pid}"));
        listening.step_aside().await;
        if let Err(err) = session.release().await {
            tracing::warn!("takeover: cannot tell pid {pid} it serves alone: {err}");
        }
        metrics::counter!("loopmesh_takeovers_total").increment(1);
        tracing::info!(
            "takeover: pid {pid} serves now; this process stopped accepting and drains its open connections"
        );
        if let Some(pending) = self.pending.take() {
            if let Some(session) = pending.session {
                session.answer_reload(Ok(pid)).await;
            }
        }
        true
    }

    /// Starts the binary on disk with this process's arguments plus
    /// `--takeover`; it connects back and takes the sockets over.
    async fn start_successor(&mut self, session: Option<Session>) {
        if let Some(pending) = &self.pending {
            let reason = format!("a successor (pid {}) is already starting", pending.pid);
            if let Some(session) = session {
                session.refuse(&reason).await;
            }
            return;
        }
        let mut command = tokio::process::Command::from(takeover::successor_command());
        command.env(takeover::SOCKET_ENV, &self.socket);
        match command.spawn() {
            Ok(mut child) => {
                let pid = child.id().unwrap_or_default();
                tracing::info!("takeover: started pid {pid} to take over");
                let exits = self.exits_tx.clone();
                tokio::spawn(async move {
                    let how = match child.wait().await {
                        Ok(status) => format!("exited with {status}"),
                        Err(err) => format!("could not be waited for ({err})"),
                    };
                    let _ = exits.send((pid, how));
                });
                self.pending = Some(Pending {
                    pid,
                    session,
                    exited: None,
                });
            }
            Err(err) => {
                let reason = format!("cannot start the new agent: {err}");
                tracing::error!("takeover: {reason}; this one serves on");
                if let Some(session) = session {
                    session.answer_reload(Err(reason)).await;
                }
            }
        }
    }

    async fn fail_pending(&mut self, reason: String) {
        if let Some(pending) = self.pending.take() {
            if let Some(session) = pending.session {
                session.answer_reload(Err(reason)).await;
            }
        }
    }
}
