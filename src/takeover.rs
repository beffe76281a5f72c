//! Restarts and upgrades that refuse nothing: a new agent process takes the
//! listening sockets over from the running one.
//!
//! The model is HAProxy's master-worker reload with `expose-fd listeners`,
//! Envoy's hot restart and nginx's USR2 binary upgrade. The running agent
//! listens on a unix socket in its state directory ([`SOCKET_FILE`]). A new
//! process started with `--takeover` connects and receives every listening
//! socket (proxy listeners, the mesh's inbound listener, DNS over UDP and TCP,
//! admin) and the state
//! directory's lock as descriptors (SCM_RIGHTS), starts serving on them, and
//! says so. Only then does the old process stop accepting: both accept from
//! the same sockets in between, so no connection finds the port closed and
//! none waiting in a backlog is lost. The old one then drains its open
//! connections and exits.
//!
//! The same socket takes `loopmesh reload` (systemd's `ExecReload`): the
//! running agent starts its successor from the binary on disk with the
//! same arguments plus `--takeover`, and answers once the successor serves
//! (or failed, with why). SIGHUP does the same without anyone waiting.
//!
//! Messages are JSON, one per SOCK_SEQPACKET datagram, so boundaries hold
//! and each batch of descriptors travels with the message naming them.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The control socket's file name in the state directory.
pub const SOCKET_FILE: &str = "agent.sock";

/// Most descriptors sent with one message (the kernel's SCM_MAX_FD is 253).
const FDS_PER_MESSAGE: usize = 200;

/// Largest message: a batch of socket names.
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("no agent to take over from at {}: {source} (is one running on this state directory?)", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("control socket {}: {source}", path.display())]
    Socket { path: PathBuf, source: io::Error },
    #[error("control socket path {} is longer than a unix socket allows (107 bytes); use a shorter state_dir", path.display())]
    PathTooLong { path: PathBuf },
    #[error("takeover: {0}")]
    Io(#[from] io::Error),
    #[error("takeover: unexpected message {got} (expected {expected})")]
    Unexpected { got: String, expected: &'static str },
    #[error("takeover: the other side closed the control connection")]
    Closed,
    #[error("takeover: no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Refused(String),
}

/// One socket handed over, as the message that carries it names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Socket {
    /// A proxy listener (one per event loop of the old process).
    Proxy {
        addr: SocketAddr,
    },
    DnsUdp,
    DnsTcp,
    Admin,
    /// The mesh's inbound listener (`mesh.listen`).
    MeshInbound,
    /// The state directory's lock file (flock is held by the open file,
    /// which both processes then share).
    Lock,
}

/// The control protocol.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "snake_case")]
enum Message {
    /// New agent → running one: hand me your sockets.
    Takeover { pid: u32 },
    /// `loopmesh reload` → running agent: start your successor.
    Reload,
    /// Running → new: these sockets, descriptors attached in this order.
    Sockets { sockets: Vec<Socket> },
    /// Running → new: that was all.
    Done,
    /// New → running: I accept on every socket now.
    Serving,
    /// Running → new: I stopped accepting; the sockets are yours.
    Released,
    /// Running → `loopmesh reload`: the successor serves.
    Reloaded { pid: u32 },
    /// Either way: it did not work, and why.
    Failed { reason: String },
}

impl Message {
    fn name(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_default()
    }
}

/// One end of a control connection.
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
}

impl Channel {
    fn new(fd: OwnedFd) -> io::Result<Channel> {
        Ok(Channel {
            fd: register(fd, Interest::READABLE | Interest::WRITABLE)?,
        })
    }

    /// Sends `message` with `fds` attached.
    async fn send(&self, message: &Message, fds: &[RawFd]) -> Result<(), TakeoverError> {
        let payload = serde_json::to_vec(message).map_err(io::Error::other)?;
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| send_with_fds(fd.get_ref().as_raw_fd(), &payload, fds)) {
                Ok(result) => return result.map_err(TakeoverError::from),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next message and the descriptors that came with it.
    async fn recv(&self) -> Result<(Message, Vec<OwnedFd>), TakeoverError> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv_with_fds(fd.get_ref().as_raw_fd())) {
                Ok(Ok(None)) => return Err(TakeoverError::Closed),
                Ok(Ok(Some((payload, fds)))) => {
                    let message = serde_json::from_slice(&payload).map_err(io::Error::other)?;
                    return Ok((message, fds));
                }
                Ok(Err(err)) => return Err(err.into()),
                Err(_would_block) => continue,
            }
        }
    }

    /// Says it did not work, and why; best effort.
    async fn fail(&self, reason: &str) {
        let message = Message::Failed {
            reason: reason.to_string(),
        };
        let _ = self.send(&message, &[]).await;
    }

    /// [`Channel::recv`] within `limit`.
    async fn recv_within(&self, limit: Duration) -> Result<(Message, Vec<OwnedFd>), TakeoverError> {
        tokio::time::timeout(limit, self.recv())
            .await
            .map_err(|_| TakeoverError::Timeout(limit))?
    }
}

/// The running agent's end: listens for successors and reload requests.
pub struct ControlListener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

/// What came in on the control socket.
pub enum Request {
    /// A new agent (pid) asks for the sockets.
    Takeover { pid: u32, session: Session },
    /// `loopmesh reload` asks for a successor; answer through the session.
    Reload { session: Session },
    /// A successor could not start (its config, say), and says why.
    SuccessorFailed { reason: String },
}

/// A control connection the running agent answers.
pub struct Session {
    channel: Channel,
}

impl ControlListener {
    /// Listens on `<state_dir>/agent.sock`, replacing a stale socket file
    /// (the caller holds the state directory's lock, so no live agent owns
    /// it).
    pub fn bind(state_dir: &Path) -> Result<ControlListener, TakeoverError> {
        let path = state_dir.join(SOCKET_FILE);
        let socket_error = |source| TakeoverError::Socket {
            path: path.clone(),
            source,
        };
        let addr = unix_addr(&path)?;
        match std::fs::remove_file(&path) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(socket_error(err)),
            _ => {}
        }
        let fd = seqpacket_socket().map_err(socket_error)?;
        // SAFETY: bind(2) and listen(2) on a socket we own, with an address
        // built by unix_addr.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            ) == 0
                && libc::listen(fd.as_raw_fd(), 8) == 0
        };
        if !bound {
            return Err(socket_error(io::Error::last_os_error()));
        }
        Ok(ControlListener {
            fd: register(fd, Interest::READABLE).map_err(socket_error)?,
            path,
        })
    }

    /// The next request.
    pub async fn accept(&self) -> Result<Request, TakeoverError> {
        let fd = loop {
            let mut guard = self.fd.readable().await?;
            let accepted = guard.try_io(|listener| {
                // SAFETY: accept4(2) on a listening socket we own; the new
                // descriptor is owned by the OwnedFd below.
                let fd = unsafe {
                    libc::accept4(
                        listener.get_ref().as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                };
                if fd < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    // SAFETY: accept4 returned a new descriptor we own.
                    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
                }
            });
            match accepted {
                Ok(result) => break result?,
                Err(_would_block) => continue,
            }
        };
        let channel = Channel::new(fd)?;
        let (message, _) = channel.recv_within(Duration::from_secs(10)).await?;
        let session = Session { channel };
        match message {
            Message::Takeover { pid } => Ok(Request::Takeover { pid, session }),
            Message::Reload => Ok(Request::Reload { session }),
            Message::Failed { reason } => Ok(Request::SuccessorFailed { reason }),
            other => Err(TakeoverError::Unexpected {
                got: other.name(),
                expected: "takeover or reload",
            }),
        }
    }

    /// The socket file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts requests for as long as `requests` is open, each read whole
    /// before it is passed on (so the receiving loop can select on the
    /// channel without losing a half-read request). A connection that
    /// fails is logged and dropped.
    pub async fn serve(self, requests: tokio::sync::mpsc::Sender<Request>) {
        loop {
            let request = tokio::select! {
                request = self.accept() => request,
                () = requests.closed() => return,
            };
            match request {
                Ok(request) => {
                    if requests.send(request).await.is_err() {
                        return;
                    }
                }
                Err(err) => tracing::warn!("control socket {}: {err}", self.path.display()),
            }
        }
    }
}

/// The environment variable that tells a successor where its predecessor
/// listens, so that it can say why it failed even when its config does not
/// load (and so names no state directory).
pub const SOCKET_ENV: &str = "LOOPMESH_TAKEOVER_SOCKET";

/// Tells the predecessor listening at `path` that this successor cannot
/// start, and why; best effort.
pub async fn report_failure(path: &Path, reason: &str) {
    let Some(dir) = path.parent() else { return };
    if path.file_name() != Some(std::ffi::OsStr::new(SOCKET_FILE)) {
        return;
    }
    if let Ok(channel) = connect(dir).await {
        channel.fail(reason).await;
    }
}

/// How long a successor may take from receiving the sockets to serving on
/// them (it loads the whole routing table from disk first).
pub const SERVING_WITHIN: Duration = Duration::from_secs(120);

impl Session {
    /// Sends `sockets` (name and descriptor), in batches, then waits until
    /// the successor serves on them.
    pub async fn offer(&self, sockets: &[(Socket, RawFd)]) -> Result<(), TakeoverError> {
        for batch in sockets.chunks(FDS_PER_MESSAGE) {
            let names = batch.iter().map(|(socket, _)| *socket).collect();
            let fds: Vec<RawFd> = batch.iter().map(|(_, fd)| *fd).collect();
            self.channel
                .send(&Message::Sockets { sockets: names }, &fds)
                .await?;
        }
        self.channel.send(&Message::Done, &[]).await?;
        match self.channel.recv_within(SERVING_WITHIN).await?.0 {
            Message::Serving => Ok(()),
            Message::Failed { reason } => Err(TakeoverError::Refused(reason)),
            other => Err(TakeoverError::Unexpected {
                got: other.name(),
                expected: "serving",
            }),
        }
    }

    /// Tells the successor the sockets are its alone now.
    pub async fn release(&self) -> Result<(), TakeoverError> {
        self.channel.send(&Message::Released, &[]).await
    }

    /// Answers a reload request: the successor's pid, or why there is none.
    pub async fn answer_reload(&self, outcome: Result<u32, String>) {
        let message = match outcome {
            Ok(pid) => Message::Reloaded { pid },
            Err(reason) => Message::Failed { reason },
        };
        let _ = self.channel.send(&message, &[]).await;
    }

    /// Refuses a request, saying why.
    pub async fn refuse(&self, reason: &str) {
        self.channel.fail(reason).await;
    }
}

/// The sockets a successor received, by what they are.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: HashMap<Socket, Vec<OwnedFd>>,
}

impl Inherited {
    /// Takes the descriptors handed over as `socket` (several for a proxy
    /// listener of a process with several event loops).
    pub fn take(&mut self, socket: Socket) -> Vec<OwnedFd> {
        self.sockets.remove(&socket).unwrap_or_default()
    }

    /// Takes every proxy listener, by address.
    pub fn take_proxy(&mut self) -> HashMap<SocketAddr, Vec<OwnedFd>> {
        let addrs: Vec<SocketAddr> = self
            .sockets
            .keys()
            .filter_map(|socket| match socket {
                Socket::Proxy { addr } => Some(*addr),
                _ => None,
            })
            .collect();
        addrs
            .into_iter()
            .map(|addr| (addr, self.take(Socket::Proxy { addr })))
            .collect()
    }

    /// How many descriptors were received.
    pub fn len(&self) -> usize {
        self.sockets.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A successor between receiving the sockets and owning them alone.
pub struct Handover {
    channel: Channel,
    pub inherited: Inherited,
}

/// Connects to the agent running on `state_dir` and receives its sockets.
pub async fn take_over(state_dir: &Path) -> Result<Handover, TakeoverError> {
    let channel = connect(state_dir).await?;
    channel
        .send(
            &Message::Takeover {
                pid: std::process::id(),
            },
            &[],
        )
        .await?;
    let mut inherited = Inherited::default();
    loop {
        match channel.recv_within(Duration::from_secs(30)).await? {
            (Message::Sockets { sockets }, fds) => {
                if sockets.len() != fds.len() {
                    return Err(TakeoverError::Refused(format!(
                        "takeover: {} sockets named but {} descriptors received (is the open-file limit too low?)",
                        sockets.len(),
                        fds.len()
                    )));
                }
                for (socket, fd) in sockets.into_iter().zip(fds) {
                    inherited.sockets.entry(socket).or_default().push(fd);
                }
            }
            (Message::Done, _) => break,
            (Message::Failed { reason }, _) => return Err(TakeoverError::Refused(reason)),
            (other, _) => {
                return Err(TakeoverError::Unexpected {
                    got: other.name(),
                    expected: "sockets or done",
                })
            }
        }
    }
    Ok(Handover { channel, inherited })
}

impl Handover {
    /// Says this process serves on every socket, and waits until the old
    /// one has stopped accepting. An old process that went away meanwhile
    /// has released them too.
    pub async fn serving(self) -> Result<(), TakeoverError> {
        self.channel.send(&Message::Serving, &[]).await?;
        match self.channel.recv_within(Duration::from_secs(30)).await {
            Ok((Message::Released, _)) | Err(TakeoverError::Closed) => Ok(()),
            Ok((other, _)) => Err(TakeoverError::Unexpected {
                got: other.name(),
                expected: "released",
            }),
            Err(err) => Err(err),
        }
    }
}

/// Asks the agent running on `state_dir` to start its successor; the
/// successor's pid once it serves.
pub async fn request_reload(state_dir: &Path, limit: Duration) -> Result<u32, TakeoverError> {
    let channel = connect(state_dir).await?;
    channel.send(&Message::Reload, &[]).await?;
    match channel.recv_within(limit).await?.0 {
        Message::Reloaded { pid } => Ok(pid),
        Message::Failed { reason } => Err(TakeoverError::Refused(reason)),
        other => Err(TakeoverError::Unexpected {
            got: other.name(),
            expected: "reloaded",
        }),
    }
}

async fn connect(state_dir: &Path) -> Result<Channel, TakeoverError> {
    let path = state_dir.join(SOCKET_FILE);
    let addr = unix_addr(&path)?;
    let connect_error = |source| TakeoverError::Connect {
        path: path.clone(),
        source,
    };
    let fd = seqpacket_socket().map_err(connect_error)?;
    // SAFETY: connect(2) on a socket we own, with an address built by
    // unix_addr. A unix socket connects at once or fails (EAGAIN only when
    // the listener's backlog is full, reported as an error).
    let result = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(connect_error(io::Error::last_os_error()));
    }
    Ok(Channel::new(fd)?)
}

/// Registers a socket this process owns with the runtime's reactor.
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is open and stays the same descriptor until the
    // AsyncFd that owns it drops it.
    Ok(unsafe { AsyncFd::register_with_interest(fd, interest) }?)
}

/// A non-blocking, close-on-exec SOCK_SEQPACKET unix socket.
fn seqpacket_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket(2) returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn unix_addr(path: &Path) -> Result<libc::sockaddr_un, TakeoverError> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(TakeoverError::PathTooLong {
            path: path.to_path_buf(),
        });
    }
    for (slot, byte) in addr.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    Ok(addr)
}

/// sendmsg(2) of one datagram carrying `fds` as SCM_RIGHTS.
fn send_with_fds(socket: RawFd, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    // SAFETY: msghdr is plain data; all zeroes is a valid empty header.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if !fds.is_empty() {
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = space;
        // SAFETY: the control buffer holds CMSG_SPACE(fd_bytes) bytes, so
        // the first header and its data fit; we write exactly fd_bytes.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), fd_bytes);
        }
    }
    // SAFETY: sendmsg(2) with a header whose buffers outlive the call.
    let sent = unsafe { libc::sendmsg(socket, &header, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != payload.len() {
        return Err(io::Error::other("a control message was cut short"));
    }
    Ok(())
}

/// recvmsg(2) of one datagram and the descriptors it carries; `None` at
/// the end of the connection.
fn recv_with_fds(socket: RawFd) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut payload = vec![0u8; MAX_MESSAGE];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((253 * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; all zeroes is a valid empty header.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = space;
    // SAFETY: recvmsg(2) into buffers that outlive the call; received
    // descriptors are close-on-exec.
    let received = unsafe { libc::recvmsg(socket, &mut header, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages recvmsg filled in, within
    // msg_controllen; each SCM_RIGHTS payload is an array of descriptors
    // now owned by this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let bytes = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for index in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(index));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    if header.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(
            "descriptors were dropped on the way (is the open-file limit too low?)",
        ));
    }
    if received == 0 && fds.is_empty() {
        return Ok(None);
    }
    payload.truncate(received as usize);
    Ok(Some((payload, fds)))
}

/// The program and arguments this process was started with, captured at
/// start: a successor runs the binary now at that path (after an upgrade,
/// the new one) with the same arguments.
struct CommandLine {
    program: PathBuf,
    args: Vec<OsString>,
}

static COMMAND_LINE: OnceLock<CommandLine> = OnceLock::new();

/// Records how this process was started; call once, early in `main`.
pub fn remember_command_line() {
    COMMAND_LINE.get_or_init(|| CommandLine {
        program: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("loopmesh")),
        args: std::env::args_os().skip(1).collect(),
    });
}

/// The command that starts this process's successor: same binary path, same
/// arguments, plus `--takeover`. systemd's watchdog pid is left out so the
/// successor pings once it is the main process.
pub fn successor_command() -> std::process::Command {
    remember_command_line();
    let line = COMMAND_LINE.get().expect("recorded just above");
    let mut command = std::process::Command::new(&line.program);
    command.args(&line.args);
    if !line.args.iter().any(|arg| arg == "--takeover") {
        command.arg("--takeover");
    }
    command
        .env_remove("WATCHDOG_PID")
        .stdin(std::process::Stdio::null());
    command
}

/// The socket a failing successor reports to ([`SOCKET_ENV`]), if this
/// process is one.
pub fn predecessor_socket() -> Option<PathBuf> {
    std::env::var_os(SOCKET_ENV).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn sockets_travel_with_their_names_and_the_handover_completes() {
        let dir = tempfile::tempdir().unwrap();
        let control = ControlListener::bind(dir.path()).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // More than one batch of descriptors.
        let extra: Vec<std::net::UdpSocket> = (0..FDS_PER_MESSAGE + 5)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let old = tokio::spawn(async move {
            let Request::Takeover { pid, session } = control.accept().await.unwrap() else {
                panic!("expected a takeover");
            };
            assert_eq!(pid, std::process::id());
            let mut offered = vec![(Socket::Proxy { addr }, listener.as_raw_fd())];
            offered.extend(extra.iter().map(|s| (Socket::DnsUdp, s.as_raw_fd())));
            session.offer(&offered).await.unwrap();
            session.release().await.unwrap();
            // The old process closes its copies; the successor's stay open.
            drop(listener);
        });
        let mut handover = take_over(dir.path()).await.unwrap();
        assert_eq!(handover.inherited.len(), FDS_PER_MESSAGE + 6);
        let mut proxy = handover.inherited.take_proxy();
        let fd = proxy.remove(&addr).unwrap().pop().unwrap();
        assert_eq!(handover.inherited.take(Socket::DnsUdp).len(), FDS_PER_MESSAGE + 5);
        handover.serving().await.unwrap();
        old.await.unwrap();
        // The received descriptor is the same listening socket.
        let inherited = std::net::TcpListener::from(fd);
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let (mut served, _) = inherited.accept().unwrap();
        client.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        served.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
    }

    #[tokio::test]
    async fn a_reload_request_gets_the_answer_the_agent_gives() {
        let dir = tempfile::tempdir().unwrap();
        let control = ControlListener::bind(dir.path()).unwrap();
        let old = tokio::spawn(async move {
            for outcome in [Ok(42), Err("config agent.yaml: bad".to_string())] {
                let Request::Reload { session } = control.accept().await.unwrap() else {
                    panic!("expected a reload");
                };
                session.answer_reload(outcome).await;
            }
        });
        let limit = Duration::from_secs(5);
        assert_eq!(request_reload(dir.path(), limit).await.unwrap(), 42);
        let err = request_reload(dir.path(), limit).await.unwrap_err();
        assert_eq!(err.to_string(), "config agent.yaml: bad");
        old.await.unwrap();
    }

    #[tokio::test]
    async fn no_agent_running_is_said_plainly() {
        let dir = tempfile::tempdir().unwrap();
        let err = take_over(dir.path()).await.err().unwrap();
        assert!(
            err.to_string().starts_with("no agent to take over from at"),
            "{err}"
        );
    }
}
