//! Forwarding one direction of a connection: a small user-space copy for
//! request/response traffic, switching to zero-copy splice(2) (socket →
//! pipe → socket) once the stream shows it is bulk.
//!
//! Why both: a 64 KiB user-space copy reached only 0.5-0.65× a direct
//! connection for bulk transfers here, and splice 0.8× (both measured while
//! the loopback legs still paced, see `congestion`); but for small messages
//! splice costs more than read/write and hurt requests/s. A 16 KiB
//! buffer also keeps memory per connection low. Pipes are pooled, so a
//! connection that turns bulk does not pay pipe creation.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes asked of one splice call.
const CHUNK: usize = 256 * 1024;

/// Pipes kept for reuse.
const POOL_LIMIT: usize = 256;

/// An empty pipe (read end, write end).
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

impl Pipe {
    /// A pooled pipe, or a new non-blocking one sized for bulk transfers.
    pub fn take() -> io::Result<Pipe> {
        if let Some(pipe) = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(pipe);
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two fds on success; we own them from here on.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned by nothing else.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // A bigger pipe means fewer syscalls per megabyte; the default works too.
        // SAFETY: fcntl on a pipe fd we own.
        unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        Ok(pipe)
    }

    /// Returns an empty pipe to the pool (a pipe with data in it is closed).
    pub fn give_back(self, empty: bool) {
        if empty {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < POOL_LIMIT {
                pool.push(self);
            }
        }
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: plain syscall on fds that stay open for the call; null offsets.
    let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// User-space buffer of the copy phase.
const COPY_BUFFER: usize = 16 * 1024;

/// Copy buffers kept for reuse per thread (at most 512 KiB).
const SPARE_BUFFERS: usize = 32;

thread_local! {
    static SPARES: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A copy buffer from this thread's spares, going back to them when
/// dropped. Why: a short connection would otherwise allocate and zero two
/// 16 KiB buffers and free them, and the freed top of the heap is handed
/// back to the kernel (madvise) and faulted in again by the next ones. A
/// proxy thread's connections never leave it, so the spares need no lock.
struct CopyBuffer(Box<[u8]>);

impl CopyBuffer {
    fn take() -> CopyBuffer {
        let spare = SPARES.try_with(|spares| spares.borrow_mut().pop()).ok().flatten();
        CopyBuffer(spare.unwrap_or_else(|| vec![0u8; COPY_BUFFER].into_boxed_slice()))
    }
}

impl Drop for CopyBuffer {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.0);
        // The thread may be exiting (its spares gone); then it is freed.
        let _ = SPARES.try_with(|spares| {
            let mut spares = spares.borrow_mut();
            if spares.len() < SPARE_BUFFERS {
                spares.push(buffer);
            }
        });
    }
}

/// What one direction's relay shows of itself while it runs, so that the
/// connection can be handed to the kernel ([`super::sockmap`]) at a moment
/// when no byte is held in user space.
#[derive(Debug, Default)]
pub struct RelayWatch {
    /// Reads forwarded in the copy phase.
    pub chunks: AtomicU32,
    /// Bytes forwarded.
    pub bytes: AtomicU64,
    /// Waiting for data with an empty buffer.
    pub waiting: AtomicBool,
    /// Moved to splice (a bulk stream stays in user space).
    pub spliced: AtomicBool,
}

/// Full buffers in a row that make a stream bulk (then it is spliced).
const BULK_AFTER: u32 = 4;

/// Forwards `from` to `to` until EOF (then half-closes `to`), copying through
/// a small buffer and moving to splice when reads keep filling it.
/// `ended` counts the directions of this connection that reached EOF (see
/// [`pass_on_eof`]). `on_data` is called after each read. Returns the bytes
/// forwarded.
pub async fn relay(
    from: &TcpStream,
    to: &TcpStream,
    ended: &AtomicU8,
    mut on_data: impl FnMut(),
    watch: &RelayWatch,
) -> io::Result<u64> {
    let mut buf = CopyBuffer::take();
    let mut total = 0u64;
    let mut full_in_a_row = 0;
    // With no pipe to be had (out of file descriptors), keep copying.
    let mut pipe = None;
    while pipe.is_none() {
        watch.waiting.store(true, Ordering::Relaxed);
        let read = read_some(from, &mut buf.0).await;
        watch.waiting.store(false, Ordering::Relaxed);
        let n = read?;
        if n == 0 {
            pass_on_eof(to, ended);
            return Ok(total);
        }
        on_data();
        write_all(to, &buf.0[..n]).await?;
        total += n as u64;
        watch.bytes.fetch_add(n as u64, Ordering::Relaxed);
        watch.chunks.fetch_add(1, Ordering::Relaxed);
        full_in_a_row = if n == buf.0.len() { full_in_a_row + 1 } else { 0 };
        if full_in_a_row >= BULK_AFTER {
            pipe = Pipe::take().ok();
        }
    }
    drop(buf);
    watch.spliced.store(true, Ordering::Relaxed);
    let pipe = pipe.expect("the loop ends with a pipe");
    let spliced = forward(from, to, &pipe, ended, on_data).await;
    if spliced.is_ok() {
        pipe.give_back(true);
    }
    spliced.map(|rest| total + rest)
}

/// Waits until `stream` may be readable, through its single reader waker
/// slot (as `poll_read` does) rather than `readable()`'s list of waiters:
/// each direction has exactly one reader and one writer.
async fn read_ready(stream: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await
}

/// Waits until `stream` may be writable, through its single writer waker slot.
async fn write_ready(stream: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| stream.poll_write_ready(cx)).await
}

/// Reads what is there. A short read means the socket buffer is drained,
/// so the read readiness is dropped right away (as HAProxy does) instead of
/// paying one more recv that would only say EAGAIN. tokio keeps any edge
/// that arrived meanwhile, so no wake-up is lost.
async fn read_some(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        read_ready(from).await?;
        let mut short = 0;
        let result = from.try_io(Interest::READABLE, || {
            // SAFETY: read(2) into a buffer we own, on a socket we hold.
            let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            if n > 0 && n < buf.len() {
                short = n;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match result {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock && short > 0 => return Ok(short),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        write_ready(to).await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Passes an EOF on: the first direction to end shuts down the write side
/// of `to` (the half-close); the second skips it, because the connection is
/// closed right after and close(2) sends that FIN (its receive queue is empty,
/// having just read EOF), which saves a syscall per connection.
fn pass_on_eof(to: &TcpStream, ended: &AtomicU8) {
    if ended.fetch_add(1, Ordering::Relaxed) == 0 {
        // SAFETY: shutdown(2) of the write side of a socket we hold.
        unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
    }
}

/// Forwards `from` to `to` until `from` reaches EOF, then passes the EOF on
/// ([`pass_on_eof`]). `on_data` is called after each chunk read.
/// Returns the bytes forwarded; on `Ok` the pipe is empty again.
pub async fn forward(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    ended: &AtomicU8,
    mut on_data: impl FnMut(),
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut in_pipe = 0usize;
    {
        loop {
            // Fill the pipe from the socket (the pipe is empty here).
            let n = loop {
                read_ready(from).await?;
                match from.try_io(Interest::READABLE, || {
                    splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
                }) {
                    Ok(n) => break n,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(err) => return Err(err),
                }
            };
            if n == 0 {
                pass_on_eof(to, ended);
                return Ok(total);
            }
            in_pipe += n;
            on_data();
            // Drain it into the other socket.
            while in_pipe > 0 {
                write_ready(to).await?;
                match to.try_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), to.as_raw_fd(), in_pipe)
                }) {
                    Ok(n) => {
                        in_pipe -= n;
                        total += n as u64;
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(err) => return Err(err),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    #[test]
    fn copy_buffers_are_reused_on_their_thread() {
        let first = CopyBuffer::take();
        let address = first.0.as_ptr();
        assert_eq!(first.0.len(), COPY_BUFFER);
        drop(first);
        assert_eq!(CopyBuffer::take().0.as_ptr(), address, "the spare was not reused");
        // Past the limit, buffers are freed rather than kept.
        let many: Vec<CopyBuffer> = (0..SPARE_BUFFERS + 8).map(|_| CopyBuffer::take()).collect();
        drop(many);
        assert_eq!(SPARES.with(|spares| spares.borrow().len()), SPARE_BUFFERS);
    }

    #[tokio::test]
    async fn relay_copies_small_traffic_and_splices_bulk_intact() {
        let (mut source, from) = pair().await;
        let (to, mut sink) = pair().await;
        // Small writes first (copy phase), then a bulk tail (spliced).
        let mut data: Vec<u8> = b"hello ".repeat(10);
        data.extend((0..4_000_000u32).map(|i| (i % 253) as u8));
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            source.write_all(&sent[..60]).await.unwrap();
            source.write_all(&sent[60..]).await.unwrap();
            source.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        let ended = AtomicU8::new(0);
        let watch = RelayWatch::default();
        let (relayed, read) = tokio::join!(
            relay(&from, &to, &ended, || {}, &watch),
            sink.read_to_end(&mut received)
        );
        assert!(
            watch.spliced.load(Ordering::Relaxed),
            "the bulk tail was not spliced"
        );
        assert_eq!(relayed.unwrap(), data.len() as u64);
        read.unwrap();
        assert_eq!(received, data, "bytes changed in flight");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn forwards_every_byte_then_half_closes() {
        let (mut source, from) = pair().await;
        let (to, mut sink) = pair().await;
        let pipe = Pipe::take().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            source.write_all(&sent).await.unwrap();
            source.shutdown().await.unwrap();
            source
        });
        let mut chunks = 0;
        let ended = AtomicU8::new(0);
        let forwarding = forward(&from, &to, &pipe, &ended, || chunks += 1);
        let mut received = Vec::new();
        let (forwarded, read) = tokio::join!(forwarding, sink.read_to_end(&mut received));
        assert_eq!(forwarded.unwrap(), data.len() as u64);
        read.unwrap();
        assert_eq!(received, data, "bytes changed in flight");
        assert!(chunks > 0);
        writer.await.unwrap();
        pipe.give_back(true);
    }
}
