//! Forwarding inside the kernel (sockmap): once a connection's two sockets
//! are joined, a BPF verdict program hands every segment that arrives on one
//! straight to the other's send path, so the proxy's thread is not woken per
//! request at all.
//!
//! Why: a user-space hop costs two wake-ups of the proxy per request, and on
//! a VM whose idle vCPUs halt that is most of the added latency at c=1
//! (BENCHMARKS.md, "the floor of a user-space hop": +22 µs for a bare C
//! relay, +100-180 µs across CPUs); redirected in the kernel the hop costs
//! +7-18 µs with the proxy on a CPU of its own, +14-18 µs on one CPU and
//! +16-24 µs unpinned (user space: +34-176, +16-22, +23-33). Opt-in
//! (`proxy.kernel_forwarding`): it needs `CAP_BPF` and `CAP_NET_ADMIN`, its
//! kernel workers spend ~10% more CPU per request under load, and a
//! connection forwarded here reports its bytes when it ends. Connections
//! come here after two exchanges each way (`tcp::copy`), so short ones never
//! pay for the join, and only while the proxy has few connections open
//! (`proxy.kernel_forwarding_max_open`): under load the user-space copy on
//! the proxy's own CPU serves more for less.
//!
//! How a connection stays whole:
//! - Joining: both sockets first get a receive low-water mark too high to
//!   reach, so arriving data waits in their receive queues instead of waking
//!   the verdict; then each gets a peer entry and joins the socket map, and
//!   only when both are in are the entries marked ready and the low-water
//!   mark set back to 1, which runs the verdict over whatever queued
//!   meanwhile, in order. A failure before that undoes every step and the
//!   connection is copied in user space instead, nothing lost.
//! - The program counts the bytes it redirects per socket. A half-close is
//!   passed on only once the other socket's send queue has taken them all
//!   (TCP_INFO bytes acked + SIOCOUTQ), since the kernel queues redirected
//!   data for a worker that user space cannot see.
//! - A socket's end (FIN, reset) is seen through an epoll set of our own
//!   that asks for hang-ups only, served by one thread: the sockets leave
//!   the proxy's event loop, which would otherwise be woken by every segment.
//!
//! The program is a handful of instructions, assembled here, so no BPF
//! toolchain or loader crate is needed.

use std::collections::HashMap;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

use crate::proxy::Held;

#[derive(Debug, thiserror::Error)]
pub enum SockmapError {
    #[error("kernel forwarding unavailable: {step} failed: {source} (it needs CAP_BPF and CAP_NET_ADMIN and a kernel with sockmap, 5.13 or later)")]
    Unavailable { step: &'static str, source: io::Error },
    #[error("kernel forwarding: {step} failed: {source}")]
    Join { step: &'static str, source: io::Error },
    #[error("kernel forwarding: {capacity} connections already joined")]
    Full { capacity: u32 },
}

/// Which socket of a connection.
pub const CLIENT: usize = 0;
pub const UPSTREAM: usize = 1;

// bpf(2) commands, map and program types, helpers: linux/bpf.h (stable ABI).
const BPF_MAP_CREATE: i32 = 0;
const BPF_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_MAP_UPDATE_ELEM: i32 = 2;
const BPF_MAP_DELETE_ELEM: i32 = 3;
const BPF_PROG_LOAD: i32 = 5;
const BPF_PROG_ATTACH: i32 = 8;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_PROG_TYPE_SK_SKB: u32 = 14;
const BPF_SK_SKB_VERDICT: u32 = 38;
const BPF_F_NO_PREALLOC: u32 = 1;
const FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const FUNC_GET_SOCKET_COOKIE: i32 = 46;
const FUNC_SK_REDIRECT_HASH: i32 = 72;
const SK_DROP: i32 = 0;
const SK_PASS: i32 = 1;
const SO_COOKIE: i32 = 57;
/// Offset of `tcpi_bytes_acked` in `struct tcp_info` (linux/tcp.h).
const TCPI_BYTES_ACKED: usize = 120;
/// A receive low-water mark no connection reaches while joining (the kernel
/// caps it at half the largest receive buffer).
const HOLD_LOWAT: i32 = i32::MAX / 2;

/// `union bpf_attr`, written field by field at its ABI offsets.
#[repr(C, align(8))]
struct Attr([u8; 144]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 144])
    }
    fn u32(mut self, offset: usize, value: u32) -> Attr {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }
    fn u64(mut self, offset: usize, value: u64) -> Attr {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }
}

fn bpf(cmd: i32, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: bpf(2) reads (and for some commands writes) the attr buffer,
    // which is as large as the kernel's union; pointers inside it point to
    // memory that outlives the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

fn create_map(kind: u32, key: u32, value: u32, entries: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new()
        .u32(0, kind)
        .u32(4, key)
        .u32(8, value)
        .u32(12, entries)
        .u32(16, flags);
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_ptr() as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

fn map_lookup(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut attr = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(drop)
}

fn map_delete(map: &OwnedFd, key: &[u8]) {
    let mut attr = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64);
    // Absent already (the socket closed first) is fine.
    let _ = bpf(BPF_MAP_DELETE_ELEM, &mut attr);
}

/// One BPF instruction.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// Instruction classes and modes (linux/bpf_common.h, linux/bpf.h).
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const STX: u8 = 0x03;
const JMP: u8 = 0x05;
const ALU64: u8 = 0x07;
const W: u8 = 0x00;
const DW: u8 = 0x18;
const IMM: u8 = 0x00;
const MEM: u8 = 0x60;
const ATOMIC: u8 = 0xc0;
const K: u8 = 0x00;
const X: u8 = 0x08;
const ADD: u8 = 0x00;
const MOV: u8 = 0xb0;
const JEQ: u8 = 0x10;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;
const PSEUDO_MAP_FD: u8 = 1;

/// Peer entry offsets: { peer cookie: u64, bytes redirected: u64, ready: u64 }.
const PEER_SIZE: usize = 24;

/// The verdict program, for each segment arriving on a joined socket:
///
/// ```text
/// if skb.len == 0: return SK_DROP
/// peer = peers[cookie(skb)]; if !peer || !peer.ready: return SK_PASS
/// peer.bytes += skb.len (atomic); return sk_redirect_hash(skb, sockets, &peer.cookie, 0)
/// ```
///
/// A segment without data is the FIN (TCP has already marked the socket
/// closed for reading, which user space sees): redirected, the kernel's
/// sender would take its zero length for a broken pipe on the other socket.
/// `SK_PASS` leaves data for the socket's reader (user space), which never
/// happens to a joined connection but loses nothing if it does.
fn program(peers: RawFd, sockets: RawFd) -> Vec<Insn> {
    let (r0, r1, r2, r3, r4, r6, r7, r10) = (0, 1, 2, 3, 4, 6, 7, 10);
    let mut p = vec![
        insn(ALU64 | MOV | X, r6, r1, 0, 0),               // r6 = skb
        insn(LDX | MEM | W, r1, r6, 0, 0),                 // r1 = skb.len
        insn(JMP | JEQ | K, r1, 0, 0, 0),                  // -> drop (patched)
        insn(ALU64 | MOV | X, r1, r6, 0, 0),               // r1 = skb
        insn(JMP | CALL, 0, 0, 0, FUNC_GET_SOCKET_COOKIE), // r0 = cookie(skb)
        insn(STX | MEM | DW, r10, r0, -8, 0),              // stack[-8] = cookie
        insn(LD | IMM | DW, r1, PSEUDO_MAP_FD, 0, peers),  // r1 = peers
        insn(0, 0, 0, 0, 0),
        insn(ALU64 | MOV | X, r2, r10, 0, 0), // r2 = &stack[-8]
        insn(ALU64 | ADD | K, r2, 0, 0, -8),
        insn(JMP | CALL, 0, 0, 0, FUNC_MAP_LOOKUP_ELEM), // r0 = &peer or null
        insn(JMP | JEQ | K, r0, 0, 0, 0),                // -> pass (patched)
        insn(LDX | MEM | DW, r1, r0, 16, 0),             // r1 = peer.ready
        insn(JMP | JEQ | K, r1, 0, 0, 0),                // -> pass (patched)
        insn(ALU64 | MOV | X, r7, r0, 0, 0),             // r7 = &peer
        insn(LDX | MEM | W, r1, r6, 0, 0),               // r1 = skb.len
        insn(STX | ATOMIC | DW, r7, r1, 8, ADD as i32),  // peer.bytes += r1
        insn(LDX | MEM | DW, r1, r7, 0, 0),              // stack[-16] = peer.cookie
        insn(STX | MEM | DW, r10, r1, -16, 0),
        insn(ALU64 | MOV | X, r1, r6, 0, 0), // r1 = skb
        insn(LD | IMM | DW, r2, PSEUDO_MAP_FD, 0, sockets),
        insn(0, 0, 0, 0, 0),
        insn(ALU64 | MOV | X, r3, r10, 0, 0), // r3 = &stack[-16]
        insn(ALU64 | ADD | K, r3, 0, 0, -16),
        insn(ALU64 | MOV | K, r4, 0, 0, 0),
        insn(JMP | CALL, 0, 0, 0, FUNC_SK_REDIRECT_HASH),
        insn(JMP | EXIT, 0, 0, 0, 0),
    ];
    let pass = p.len() as i16;
    p.push(insn(ALU64 | MOV | K, r0, 0, 0, SK_PASS));
    p.push(insn(JMP | EXIT, 0, 0, 0, 0));
    let drop = p.len() as i16;
    p.push(insn(ALU64 | MOV | K, r0, 0, 0, SK_DROP));
    p.push(insn(JMP | EXIT, 0, 0, 0, 0));
    for (at, to) in [(2, drop), (11, pass), (13, pass)] {
        p[at].off = to - at as i16 - 1;
    }
    p
}

fn load_program(peers: &OwnedFd, sockets: &OwnedFd) -> io::Result<OwnedFd> {
    let insns = program(peers.as_raw_fd(), sockets.as_raw_fd());
    let license = c"GPL";
    let mut log = vec![0u8; 16 * 1024];
    let mut attr = Attr::new()
        .u32(0, BPF_PROG_TYPE_SK_SKB)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .u32(68, BPF_SK_SKB_VERDICT);
    bpf(BPF_PROG_LOAD, &mut attr).map(owned).map_err(|err| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let verifier = String::from_utf8_lossy(&log[..end]);
        match verifier.trim().lines().last() {
            Some(last) => io::Error::new(err.kind(), format!("{err}; verifier: {last}")),
            None => err,
        }
    })
}

fn getsockopt_buf(fd: RawFd, level: i32, name: i32, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the buffer it is given.
    let ret = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &mut len) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len as usize)
}

fn cookie(fd: RawFd) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    getsockopt_buf(fd, libc::SOL_SOCKET, SO_COOKIE, &mut buf)?;
    Ok(u64::from_ne_bytes(buf))
}

fn set_rcvlowat(fd: RawFd, value: i32) -> io::Result<()> {
    // SAFETY: setsockopt reads one int from the pointer given.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes ever queued for sending on a TCP socket: acknowledged plus still
/// in its send queue. Read in that order, an ACK in between only makes the
/// sum smaller, so it never claims bytes that are not there yet.
pub fn queued_total(fd: RawFd) -> io::Result<u64> {
    let mut info = [0u8; 256];
    let len = getsockopt_buf(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)?;
    if len < TCPI_BYTES_ACKED + 8 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "tcp_info without bytes_acked",
        ));
    }
    let acked = u64::from_ne_bytes(
        info[TCPI_BYTES_ACKED..TCPI_BYTES_ACKED + 8]
            .try_into()
            .expect("8 bytes"),
    );
    let mut outq: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + outq.max(0) as u64)
}

/// What a joined connection hears about its sockets: (which, epoll bits).
pub type Hangup = (usize, u32);

type Listeners = Arc<Mutex<HashMap<u64, (usize, mpsc::UnboundedSender<Hangup>)>>>;

/// One thread waiting on an epoll set that asks only for hang-ups
/// (EPOLLRDHUP; errors and full hang-ups always come), edge-triggered, and
/// passing each on to its connection.
struct Watcher {
    epoll: Arc<OwnedFd>,
    stop: Arc<OwnedFd>,
    listeners: Listeners,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The epoll token of the stop eventfd (socket cookies start at 1).
const STOP_TOKEN: u64 = 0;

impl Watcher {
    fn start() -> io::Result<Watcher> {
        // SAFETY: plain syscalls creating fds we then own.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        let epoll = Arc::new(owned(epoll as i64));
        // SAFETY: as above.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop < 0 {
            return Err(io::Error::last_os_error());
        }
        let stop = Arc::new(owned(stop as i64));
        epoll_ctl(
            &epoll,
            libc::EPOLL_CTL_ADD,
            stop.as_raw_fd(),
            libc::EPOLLIN as u32,
            STOP_TOKEN,
        )?;
        let listeners: Listeners = Arc::default();
        let thread = {
            let (epoll, listeners) = (epoll.clone(), listeners.clone());
            std::thread::Builder::new()
                .name("sockmap-hangups".into())
                .spawn(move || watch(&epoll, &listeners))?
        };
        Ok(Watcher {
            epoll,
            stop,
            listeners,
            thread: Some(thread),
        })
    }

    fn add(&self, fd: RawFd, cookie: u64, which: usize, to: mpsc::UnboundedSender<Hangup>) -> io::Result<()> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cookie, (which, to));
        let bits = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        epoll_ctl(&self.epoll, libc::EPOLL_CTL_ADD, fd, bits, cookie).inspect_err(|_| {
            self.listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&cookie);
        })
    }

    fn remove(&self, fd: RawFd, cookie: u64) {
        let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, fd, 0, cookie);
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&cookie);
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn epoll_ctl(epoll: &OwnedFd, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: epoll_ctl reads the event struct given.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut event) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn watch(epoll: &OwnedFd, listeners: &Listeners) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
    loop {
        // SAFETY: epoll_wait fills at most `events.len()` entries.
        let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(
                "kernel forwarding: epoll_wait failed: {}",
                io::Error::last_os_error()
            );
            return;
        }
        let listeners = listeners.lock().unwrap_or_else(|e| e.into_inner());
        for event in &events[..n as usize] {
            let (token, bits) = (event.u64, event.events);
            if token == STOP_TOKEN {
                return;
            }
            if let Some((which, to)) = listeners.get(&token) {
                let _ = to.send((*which, bits));
            }
        }
    }
}

/// The maps, the program and the hang-up watcher, shared by all connections.
pub struct KernelForwarding {
    sockets: OwnedFd,
    peers: OwnedFd,
    _program: OwnedFd,
    watcher: Watcher,
    capacity: u32,
    joined: AtomicU32,
    /// The proxy's open connections, in user space or here: connections
    /// are handed over only while there are at most `max_open`.
    open: AtomicU64,
    max_open: u64,
    /// Connections that were ready for the kernel while the proxy was busy.
    deferred: AtomicU64,
    /// `loopmesh_proxy_kernel_connections`: connections forwarded here now.
    gauge: metrics::Gauge,
    /// `loopmesh_proxy_kernel_deferred_total`: `deferred`, exported.
    deferred_total: metrics::Counter,
}

impl std::fmt::Debug for KernelForwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelForwarding")
            .field("capacity", &self.capacity)
            .field("joined", &self.joined.load(Ordering::Relaxed))
            .field("open", &self.open.load(Ordering::Relaxed))
            .field("max_open", &self.max_open)
            .finish()
    }
}

impl KernelForwarding {
    /// Sets up forwarding for up to `capacity` connections at once (more are
    /// copied in user space), handed over while the proxy has at most
    /// `max_open` connections open (see [`KernelForwarding::busy`]).
    pub fn new(capacity: u32, max_open: u32) -> Result<Arc<KernelForwarding>, SockmapError> {
        let unavailable = |step| move |source| SockmapError::Unavailable { step, source };
        let entries = capacity.saturating_mul(2);
        let sockets = create_map(BPF_MAP_TYPE_SOCKHASH, 8, 8, entries, 0)
            .map_err(unavailable("creating the socket map"))?;
        let peers = create_map(BPF_MAP_TYPE_HASH, 8, PEER_SIZE as u32, entries, BPF_F_NO_PREALLOC)
            .map_err(unavailable("creating the peer map"))?;
        let program = load_program(&peers, &sockets).map_err(unavailable("loading the verdict program"))?;
        let mut attr = Attr::new()
            .u32(0, sockets.as_raw_fd() as u32)
            .u32(4, program.as_raw_fd() as u32)
            .u32(8, BPF_SK_SKB_VERDICT);
        bpf(BPF_PROG_ATTACH, &mut attr).map_err(unavailable("attaching the verdict program"))?;
        let watcher = Watcher::start().map_err(unavailable("starting the hang-up watcher"))?;
        Ok(Arc::new(KernelForwarding {
            sockets,
            peers,
            _program: program,
            watcher,
            capacity,
            joined: AtomicU32::new(0),
            open: AtomicU64::new(0),
            max_open: u64::from(max_open),
            deferred: AtomicU64::new(0),
            gauge: metrics::gauge!("loopmesh_proxy_kernel_connections"),
            deferred_total: metrics::counter!("loopmesh_proxy_kernel_deferred_total"),
        }))
    }

    /// Counts a connection of the proxy's as open while the guard lives.
    pub fn open(&self) -> Held<'_> {
        Held::count(&self.open).0
    }

    /// Whether the proxy has too many connections open to hand another
    /// over. Under load the kernel's workers cost more CPU per request than
    /// the user-space copy and run on the CPUs the segments arrive on (the
    /// apps'), so a busy proxy's own CPU would idle while theirs saturate
    /// (BENCHMARKS.md); at low concurrency the kernel saves the proxy's
    /// wake-ups, most of a hop's latency.
    pub fn busy(&self) -> bool {
        self.open.load(Ordering::Relaxed) > self.max_open
    }

    /// Records a connection that was ready to be handed over but found the
    /// proxy [busy](KernelForwarding::busy) (once per connection).
    pub fn defer(&self) {
        self.deferred.fetch_add(1, Ordering::Relaxed);
        self.deferred_total.increment(1);
    }

    /// Connections deferred so far.
    pub fn deferred(&self) -> u64 {
        self.deferred.load(Ordering::Relaxed)
    }

    /// Connections joined now.
    pub fn joined(&self) -> u32 {
        self.joined.load(Ordering::Relaxed)
    }

    /// Joins a connection's two sockets (see the module doc). On error
    /// nothing of the join is left and the sockets are as they were.
    pub fn join(self: &Arc<Self>, client: &TcpStream, upstream: &TcpStream) -> Result<Joined, SockmapError> {
        if self.joined.fetch_add(1, Ordering::Relaxed) >= self.capacity {
            self.joined.fetch_sub(1, Ordering::Relaxed);
            return Err(SockmapError::Full {
                capacity: self.capacity,
            });
        }
        let fds = [client.as_raw_fd(), upstream.as_raw_fd()];
        let (events, hangups) = mpsc::unbounded_channel();
        let mut joined = Joined {
            forwarding: self.clone(),
            fds,
            cookies: [0; 2],
            base: [0; 2],
            hangups,
            steps: 0,
        };
        let fail = |step| move |source| SockmapError::Join { step, source };
        for which in [CLIENT, UPSTREAM] {
            joined.cookies[which] = cookie(fds[which]).map_err(fail("reading a socket cookie"))?;
            joined.base[which] = queued_total(fds[which]).map_err(fail("reading TCP_INFO"))?;
        }
        joined.steps = HELD;
        for fd in fds {
            set_rcvlowat(fd, HOLD_LOWAT).map_err(fail("holding received data"))?;
        }
        joined.steps = PEERED;
        for which in [CLIENT, UPSTREAM] {
            map_update(
                &self.peers,
                &joined.cookies[which].to_ne_bytes(),
                &joined.peer_entry(which, false),
            )
            .map_err(fail("adding a peer entry"))?;
        }
        joined.steps = MAPPED;
        for which in [CLIENT, UPSTREAM] {
            let fd = fds[which] as u64;
            map_update(
                &self.sockets,
                &joined.cookies[which].to_ne_bytes(),
                &fd.to_ne_bytes(),
            )
            .map_err(fail("adding a socket to the socket map"))?;
        }
        joined.steps = WATCHED;
        for which in [CLIENT, UPSTREAM] {
            self.watcher
                .add(fds[which], joined.cookies[which], which, events.clone())
                .map_err(fail("watching for hang-ups"))?;
        }
        for which in [CLIENT, UPSTREAM] {
            map_update(
                &self.peers,
                &joined.cookies[which].to_ne_bytes(),
                &joined.peer_entry(which, true),
            )
            .map_err(fail("marking a peer entry ready"))?;
        }
        // From here on the kernel forwards; releasing the hold runs the
        // verdict over what queued while joining. It cannot be undone.
        joined.steps = FORWARDING;
        self.gauge.increment(1.0);
        for fd in fds {
            if let Err(err) = set_rcvlowat(fd, 1) {
                tracing::warn!(
                    "kernel forwarding: releasing held data failed: {err}; it goes on with the next segment"
                );
            }
        }
        Ok(joined)
    }
}

// How far a join got, for undoing it.
const HELD: u8 = 1;
const PEERED: u8 = 2;
const MAPPED: u8 = 3;
const WATCHED: u8 = 4;
const FORWARDING: u8 = 5;

/// A connection forwarded in the kernel. Dropping it takes the sockets out
/// of the maps; the caller closes them after.
pub struct Joined {
    forwarding: Arc<KernelForwarding>,
    fds: [RawFd; 2],
    cookies: [u64; 2],
    /// Bytes queued on each socket before the join (user space wrote them).
    base: [u64; 2],
    /// Hang-ups and errors of either socket.
    pub hangups: mpsc::UnboundedReceiver<Hangup>,
    steps: u8,
}

impl Joined {
    fn peer_entry(&self, which: usize, ready: bool) -> [u8; PEER_SIZE] {
        let mut entry = [0u8; PEER_SIZE];
        entry[..8].copy_from_slice(&self.cookies[1 - which].to_ne_bytes());
        entry[16..].copy_from_slice(&u64::from(ready).to_ne_bytes());
        entry
    }

    /// Bytes the kernel has taken from socket `which` and redirected.
    pub fn forwarded(&self, which: usize) -> io::Result<u64> {
        let mut entry = [0u8; PEER_SIZE];
        map_lookup(
            &self.forwarding.peers,
            &self.cookies[which].to_ne_bytes(),
            &mut entry,
        )?;
        Ok(u64::from_ne_bytes(entry[8..16].try_into().expect("8 bytes")))
    }

    /// Bytes queued for sending on socket `which` since the join.
    pub fn sent(&self, which: usize) -> io::Result<u64> {
        Ok(queued_total(self.fds[which])?.saturating_sub(self.base[which]))
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        let forwarding = &self.forwarding;
        for which in [CLIENT, UPSTREAM] {
            let key = self.cookies[which].to_ne_bytes();
            if self.steps >= WATCHED {
                forwarding.watcher.remove(self.fds[which], self.cookies[which]);
            }
            if self.steps >= MAPPED {
                map_delete(&forwarding.sockets, &key);
            }
            if self.steps >= PEERED {
                map_delete(&forwarding.peers, &key);
            }
            if (HELD..FORWARDING).contains(&self.steps) {
                let _ = set_rcvlowat(self.fds[which], 1);
            }
        }
        if self.steps == FORWARDING {
            forwarding.gauge.decrement(1.0);
        }
        forwarding.joined.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Two connected sockets on loopback: (the one we write to, the one the
    /// proxy holds).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let outer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (inner, _) = listener.accept().unwrap();
        (outer, inner)
    }

    #[test]
    fn joined_sockets_forward_in_the_kernel_and_capacity_is_kept() {
        // Needs root (CAP_BPF, CAP_NET_ADMIN), as proxy.kernel_forwarding does.
        let kernel = KernelForwarding::new(1, u32::MAX).expect("kernel forwarding: run the tests as root");
        let (mut client, client_side) = pair();
        let (upstream_side, mut backend) = pair();
        // Sent before the join: held, then forwarded in order.
        client.write_all(b"early ").unwrap();
        let joined = kernel.join(&client_side, &upstream_side).unwrap();
        client.write_all(b"and late").unwrap();
        let mut got = [0u8; 14];
        backend.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"early and late");
        backend.write_all(b"reply").unwrap();
        let mut reply = [0u8; 5];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"reply");
        assert_eq!(joined.forwarded(UPSTREAM).unwrap(), 5);

        let (_other_client, other_side) = pair();
        let (other_upstream, _other_backend) = pair();
        let full = kernel.join(&other_side, &other_upstream).map(drop);
        assert!(
            matches!(full, Err(SockmapError::Full { capacity: 1 })),
            "{full:?}"
        );
        assert_eq!(kernel.joined(), 1);
        drop(joined);
        assert_eq!(kernel.joined(), 0);
    }
}
