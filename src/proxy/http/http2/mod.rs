//! The HTTP/2 server side: a client connection that opened with the
//! HTTP/2 preface (prior knowledge, as plaintext gRPC does).
//!
//! One task per connection reads frames, decodes header blocks
//! ([`hpack`]), and drives each stream's request future and response body
//! itself, with a waker per stream that queues the stream's id: no task
//! per stream, no lock shared between streams, every frame of a turn
//! written in one `write`. Requests go to the same handler as hyper's
//! (`super::handle`), so routes, balancing, retries, identity, metrics
//! and the fast path's upstream connections apply alike.
//!
//! Flow control both ways: a response body is polled only while its
//! stream and the connection have send window; request bodies are
//! acknowledged (WINDOW_UPDATE) as the handler consumes them, so a
//! connection never buffers more than its receive window. Limits against
//! abusive clients: concurrent streams, header list size, the write
//! buffer (no reading while the client does not read), and resets
//! (the "rapid reset" pattern ends the connection).
//!
//! Here: the connection's loop, its streams and what it writes; [`recv`]
//! what it does with the frames it reads; [`recv_body`] request bodies;
//! [`message`] request heads checked for the general path, responses
//! encoded; [`direct`] the direct path; [`hpack`] and [`frame`] the wire.

mod direct;
mod frame;
pub mod hpack;
mod message;
mod recv;
mod recv_body;

use super::body::ResponseBody;
use super::Client;
use crate::proxy::drain;
use bytes::{Bytes, BytesMut};
use frame::Reason;
use hyper::body::Body;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub use frame::PREFACE;
use recv_body::Inbox;
pub use recv_body::RecvBody;

/// Streams a client may have open at once.
const MAX_STREAMS: u32 = 256;
/// Each stream's receive window, and the connection's.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// The default initial window of both sides (RFC 9113 6.9.2).
const DEFAULT_WINDOW: i64 = 65_535;
const MAX_FRAME: usize = 16_384;
const MAX_HEADER_LIST: usize = 64 * 1024;
const HEADER_TABLE: usize = 4096;
/// Above this much unwritten output the connection stops reading and
/// stops polling bodies until the client reads.
const WRITE_HIGH: usize = 256 * 1024;
/// Streams a client may reset within a second before the connection ends
/// (CVE-2023-44487).
const MAX_RESETS_PER_SECOND: u32 = 200;
/// Time a connection has to send its GOAWAY and the last of its output.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Rounds of reading, driving streams and writing in one poll.
const MAX_TURNS: u32 = 32;

/// Serves an HTTP/2 connection whose first bytes (the preface, or part of
/// it, and maybe more) are in `read`, until it closes or a drain ends it.
pub(super) async fn serve(io: TcpStream, read: BytesMut, client: Arc<Client>, drain: &mut drain::Watch) {
    let mut conn = Connection::new(io, read, client);
    // What came with the preface is handled before anything more is read.
    if let Err(ConnectionError(reason)) = conn.handle_frames() {
        conn.fail(reason);
    }
    let probe = drain.probe();
    let finished = tokio::select! {
        () = std::future::poll_fn(|cx| conn.poll(cx)) => true,
        () = probe.signaled() => false,
    };
    if !finished {
        conn.go_away(Reason::NoError);
        tokio::select! {
            () = std::future::poll_fn(|cx| conn.poll(cx)) => {}
            () = probe.forced() => {
                conn.client.cell.current().shared.metrics().drain_kills.increment(1);
            }
        }
    }
}

/// Hashes stream ids (unique integers, no adversary can pick them to
/// collide beyond what the stream limit allows) by one multiplication,
/// rather than SipHash.
#[derive(Default)]
struct StreamIdHasher(u64);

impl std::hash::Hasher for StreamIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type StreamMap = HashMap<u32, Stream, std::hash::BuildHasherDefault<StreamIdHasher>>;

/// Stream ids woken since the connection last looked, and the
/// connection task's waker.
#[derive(Default)]
struct Ready {
    inner: Mutex<ReadyInner>,
}

#[derive(Default)]
struct ReadyInner {
    ids: Vec<u32>,
    task: Option<Waker>,
}

impl Ready {
    fn push(&self, id: u32) {
        let task = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.ids.push(id);
            inner.task.take()
        };
        if let Some(task) = task {
            task.wake();
        }
    }
}

/// Wakes a stream: queues its id for the connection task.
struct StreamWaker {
    id: u32,
    ready: Arc<Ready>,
}

impl Wake for StreamWaker {
    fn wake(self: Arc<Self>) {
        self.ready.push(self.id);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.push(self.id);
    }
}

/// A request being handled: it ends with the response head as an HPACK
/// block, and the body.
type Handling = Pin<Box<dyn Future<Output = (Vec<u8>, ResponseBody)> + Send>>;

/// Where a stream's response is. (One per stream, changed in place: the
/// body variant's size costs nothing a box would not.)
#[allow(clippy::large_enum_variant)]
enum Sending {
    Handling(Handling),
    Body {
        body: ResponseBody,
        /// Data the windows did not let out yet.
        held: Option<Bytes>,
        /// `held` is the body's last data.
        last: bool,
    },
    Done,
}

struct Stream {
    waker: Waker,
    sending: Sending,
    send_window: i64,
    /// The request body (`None`: the request had none).
    inbox: Option<Arc<Inbox>>,
    /// The client may still send some of it.
    recv_open: bool,
    /// What the client may still send before a WINDOW_UPDATE.
    recv_window: i64,
    /// Consumed bytes not yet given back to the client.
    unannounced: u32,
    /// Waiting for the connection's send window.
    conn_blocked: bool,
}

/// A header block still coming in CONTINUATION frames.
struct Continuing {
    stream: u32,
    end_stream: bool,
    block: Vec<u8>,
}

/// Why the connection ends early: a connection error to tell the client.
struct ConnectionError(Reason);

struct Connection {
    io: TcpStream,
    read: BytesMut,
    /// Output not yet written, from `written` on.
    write: Vec<u8>,
    written: usize,
    client: Arc<Client>,
    decoder: hpack::Decoder,
    fields: hpack::Fields,
    streams: StreamMap,
    ready: Arc<Ready>,
    /// Woken ids being handled (kept to reuse its allocation).
    turn: Vec<u32>,
    /// Streams waiting for the connection's send window.
    conn_blocked: Vec<u32>,
    /// Streams waiting for the client to read what was written.
    deferred: Vec<u32>,
    preface_seen: bool,
    settings_seen: bool,
    /// The highest stream id the client opened.
    last_stream: u32,
    continuing: Option<Continuing>,
    send_window: i64,
    /// The client's initial stream window and frame size.
    peer_window: i64,
    peer_max_frame: usize,
    /// Data received and not yet given back by WINDOW_UPDATE: the
    /// client may send `CONNECTION_WINDOW` less this.
    recv_outstanding: i64,
    /// Of that, what is consumed and can be given back.
    unannounced: u32,
    /// A reused buffer for encoding trailer blocks.
    block: Vec<u8>,
    /// This client's element of `x-forwarded-for` and of `forwarded`.
    forwarded_for: Vec<u8>,
    forwarded: Vec<u8>,
    /// The end of the runtime's current round, which output waits for.
    round: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// Set once the connection is over but output is still pending.
    closing: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A GOAWAY was sent: no new streams.
    going_away: bool,
    /// Reading is over (the client closed, or a connection error).
    read_closed: bool,
    resets: (Instant, u32),
}

impl Connection {
    fn new(io: TcpStream, read: BytesMut, client: Arc<Client>) -> Connection {
        let (mut forwarded_for, mut forwarded) = (Vec::new(), Vec::new());
        super::identity::write_forwarded_for(&mut forwarded_for, client.peer.ip());
        super::identity::write_forwarded(&mut forwarded, client.peer.ip());
        let mut write = Vec::with_capacity(16 * 1024);
        frame::settings(
            &mut write,
            &[
                (frame::SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (frame::SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST as u32),
            ],
        );
        frame::window_update(&mut write, 0, CONNECTION_WINDOW - DEFAULT_WINDOW as u32);
        Connection {
            io,
            read,
            write,
            written: 0,
            client,
            decoder: hpack::Decoder::new(HEADER_TABLE),
            fields: hpack::Fields::default(),
            streams: StreamMap::default(),
            ready: Arc::default(),
            turn: Vec::new(),
            conn_blocked: Vec::new(),
            deferred: Vec::new(),
            preface_seen: false,
            settings_seen: false,
            last_stream: 0,
            continuing: None,
            send_window: DEFAULT_WINDOW,
            peer_window: DEFAULT_WINDOW,
            peer_max_frame: MAX_FRAME,
            recv_outstanding: 0,
            unannounced: 0,
            block: Vec::with_capacity(256),
            forwarded_for,
            forwarded,
            closing: None,
            round: None,
            going_away: false,
            read_closed: false,
            resets: (Instant::now(), 0),
        }
    }

    /// Sends GOAWAY: the streams open finish, no new ones start.
    fn go_away(&mut self, reason: Reason) {
        if !self.going_away {
            self.going_away = true;
            frame::goaway(&mut self.write, self.last_stream, reason);
        }
    }

    /// Ends the connection on a connection error: GOAWAY with the reason,
    /// every stream dropped, what is written flushed.
    fn fail(&mut self, reason: Reason) {
        if !self.going_away {
            self.going_away = true;
            frame::goaway(&mut self.write, self.last_stream, reason);
        }
        self.read_closed = true;
        self.close_streams();
    }

    fn close_streams(&mut self) {
        for (_, stream) in self.streams.drain() {
            if let Some(inbox) = &stream.inbox {
                let mut state = RecvBody::lock(inbox);
                state.broken = true;
                state.wake();
            }
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut turns = 0;
        loop {
            let mut progress = false;
            if !self.read_closed && self.pending_write() < WRITE_HIGH {
                match self.poll_read(cx) {
                    Poll::Ready(Ok(())) => progress = true,
                    Poll::Ready(Err(ConnectionError(reason))) => {
                        self.fail(reason);
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }
            progress |= self.run_ready(cx);
            if self.pending_write() > 0 && !self.read_closed {
                // Output waits for the rest of this round of the runtime:
                // the other streams' answers ready by then leave in the
                // same write (as an event loop writes after its events).
                let round = self
                    .round
                    .get_or_insert_with(|| Box::pin(tokio::task::yield_now()));
                if round.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.round = None;
            }
            match self.poll_flush(cx) {
                Poll::Ready(Ok(true)) => progress = true,
                Poll::Ready(Ok(false)) | Poll::Pending => {}
                Poll::Ready(Err(())) => {
                    self.close_streams();
                    return Poll::Ready(());
                }
            }
            let idle = self.streams.is_empty() && self.pending_write() == 0;
            if idle && (self.read_closed || self.going_away) {
                return Poll::Ready(());
            }
            if self.read_closed && self.streams.is_empty() {
                // Only output is left: it gets a moment, not forever.
                let closing = self
                    .closing
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_TIMEOUT)));
                if closing.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            if !progress {
                return Poll::Pending;
            }
            turns += 1;
            if turns == MAX_TURNS {
                // Busy: let the other tasks of this thread run, then go on.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }

    fn pending_write(&self) -> usize {
        self.write.len() - self.written
    }

    /// Writes what is pending; `Ok(true)` when some was written.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, ()>> {
        let mut wrote = false;
        while self.written < self.write.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.write[self.written..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
                Poll::Ready(Ok(n)) => {
                    self.written += n;
                    wrote = true;
                }
                Poll::Pending => break,
            }
        }
        if self.written == self.write.len() {
            self.write.clear();
            self.written = 0;
            if !self.deferred.is_empty() {
                let ready = std::mem::take(&mut self.deferred);
                let mut inner = self.ready.inner.lock().unwrap_or_else(|e| e.into_inner());
                inner.ids.extend(ready);
                wrote = true;
            }
        }
        if wrote {
            Poll::Ready(Ok(true))
        } else {
            Poll::Pending
        }
    }

    /// Reads what the socket has and handles every whole frame in it.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectionError>> {
        if self.read.capacity() - self.read.len() < MAX_FRAME + frame::HEADER_LEN {
            self.read.reserve(MAX_FRAME + frame::HEADER_LEN);
        }
        let before = self.read.len();
        let spare = self.read.spare_capacity_mut();
        let mut buf = ReadBuf::uninit(spare);
        match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => {
                self.read_closed = true;
                self.close_streams();
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n == 0 {
                    // The client closed: nobody is left to answer.
                    self.read_closed = true;
                    self.close_streams();
                    return Poll::Ready(Ok(()));
                }
                // SAFETY: `poll_read` initialised these `n` bytes.
                unsafe { self.read.set_len(before + n) };
            }
        }
        self.handle_frames()?;
        Poll::Ready(Ok(()))
    }

    /// Drives the streams woken since the last turn; says whether any were.
    fn run_ready(&mut self, cx: &mut Context<'_>) -> bool {
        {
            let mut inner = self.ready.inner.lock().unwrap_or_else(|e| e.into_inner());
            if !inner.task.as_ref().is_some_and(|task| task.will_wake(cx.waker())) {
                inner.task = Some(cx.waker().clone());
            }
            self.turn.append(&mut inner.ids);
        }
        if self.turn.is_empty() {
            return false;
        }
        let mut turn = std::mem::take(&mut self.turn);
        for id in turn.drain(..) {
            self.drive(id);
        }
        if self.turn.is_empty() {
            self.turn = turn;
        }
        if self.unannounced >= CONNECTION_WINDOW / 4 {
            frame::window_update(&mut self.write, 0, self.unannounced);
            self.recv_outstanding -= i64::from(self.unannounced);
            self.unannounced = 0;
        }
        true
    }

    /// Moves one stream on: its consumed request body given back, its
    /// response head or body written as far as the windows let it.
    fn drive(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if let Some(inbox) = &stream.inbox {
            let released = std::mem::take(&mut RecvBody::lock(inbox).released) as u32;
            stream.unannounced += released;
            self.unannounced += released;
            if stream.recv_open && stream.unannounced >= STREAM_WINDOW / 4 {
                frame::window_update(&mut self.write, id, stream.unannounced);
                stream.recv_window += i64::from(stream.unannounced);
                stream.unannounced = 0;
            }
        }
        let waker = stream.waker.clone();
        let mut cx = Context::from_waker(&waker);
        loop {
            let Some(stream) = self.streams.get_mut(&id) else {
                return;
            };
            match &mut stream.sending {
                Sending::Handling(handling) => match handling.as_mut().poll(&mut cx) {
                    Poll::Pending => return,
                    Poll::Ready(response) => self.write_head(id, response),
                },
                Sending::Body { body, held, last } => {
                    if let Some(mut data) = held.take() {
                        let last = *last;
                        let windows = (stream.send_window, self.send_window);
                        let sent =
                            send_data(&mut self.write, id, &mut data, windows, self.peer_max_frame, last);
                        stream.send_window -= sent as i64;
                        self.send_window -= sent as i64;
                        if !data.is_empty() {
                            *held = Some(data);
                            if self.send_window <= 0 && !stream.conn_blocked {
                                stream.conn_blocked = true;
                                self.conn_blocked.push(id);
                            }
                            return;
                        }
                        if last {
                            stream.sending = Sending::Done;
                        }
                        continue;
                    }
                    if self.write.len() - self.written >= WRITE_HIGH {
                        self.deferred.push(id);
                        return;
                    }
                    match Pin::new(&mut *body).poll_frame(&mut cx) {
                        Poll::Pending => return,
                        Poll::Ready(None) => {
                            frame::head(&mut self.write, 0, frame::DATA, frame::END_STREAM, id);
                            stream.sending = Sending::Done;
                        }
                        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                            Ok(data) => {
                                *last = body.is_end_stream();
                                *held = Some(data);
                            }
                            Err(frame) => {
                                let trailers = frame.into_trailers().unwrap_or_default();
                                self.block.clear();
                                for (name, value) in &trailers {
                                    hpack::encode_field(&mut self.block, name.as_str(), value.as_bytes());
                                }
                                frame::header_block(
                                    &mut self.write,
                                    id,
                                    &self.block,
                                    true,
                                    self.peer_max_frame,
                                );
                                stream.sending = Sending::Done;
                            }
                        },
                        Poll::Ready(Some(Err(_))) => {
                            self.reset(id, Reason::Internal);
                            return;
                        }
                    }
                }
                Sending::Done => {
                    if stream.recv_open {
                        // The response is whole: the rest of the request is not needed.
                        self.reset(id, Reason::NoError);
                    } else {
                        self.remove(id);
                    }
                    return;
                }
            }
        }
    }

    /// Writes a response's head; the stream goes on to its body.
    fn write_head(&mut self, id: u32, (block, body): (Vec<u8>, ResponseBody)) {
        let end = body.is_end_stream();
        frame::header_block(&mut self.write, id, &block, end, self.peer_max_frame);
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.sending = if end {
                Sending::Done
            } else {
                Sending::Body {
                    body,
                    held: None,
                    last: false,
                }
            };
        }
    }
}

/// Sends what the windows allow of `data` as DATA frames, the last one
/// ending the stream when `last` and all of it went; returns the bytes sent.
fn send_data(
    out: &mut Vec<u8>,
    id: u32,
    data: &mut Bytes,
    (stream_window, conn_window): (i64, i64),
    max_frame: usize,
    last: bool,
) -> usize {
    let allowed = stream_window.min(conn_window).max(0) as usize;
    if data.is_empty() {
        if last {
            frame::head(out, 0, frame::DATA, frame::END_STREAM, id);
        }
        return 0;
    }
    let mut sent = 0;
    while !data.is_empty() && sent < allowed {
        let n = data.len().min(max_frame).min(allowed - sent);
        let chunk = data.split_to(n);
        let flags = if last && data.is_empty() {
            frame::END_STREAM
        } else {
            0
        };
        frame::head(out, n, frame::DATA, flags, id);
        out.extend_from_slice(&chunk);
        sent += n;
    }
    sent
}
