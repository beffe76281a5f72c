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

mod direct;
mod frame;
pub mod hpack;

use super::body::{BodyError, ResponseBody};
use super::Client;
use crate::proxy::drain;
use bytes::{Buf, Bytes, BytesMut};
use frame::{Head, Reason};
use hyper::body::{Body, Frame};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub use frame::PREFACE;

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

/// A request body's data as the connection received it, for the handler.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
}

#[derive(Default)]
struct InboxState {
    data: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// The stream was reset or the connection lost.
    broken: bool,
    /// The handler dropped the body: what comes is consumed at once.
    dropped: bool,
    /// Bytes the handler took since the connection last looked.
    released: usize,
    /// `content-length`, counted down as data comes.
    expected: Option<u64>,
    waker: Option<Waker>,
}

impl InboxState {
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// The body of a request from an HTTP/2 client.
pub struct RecvBody {
    inbox: Option<Arc<Inbox>>,
    /// The stream's waker: the connection gives consumed bytes back.
    stream: Waker,
}

impl RecvBody {
    fn lock(inbox: &Inbox) -> std::sync::MutexGuard<'_, InboxState> {
        inbox.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(inbox) = &this.inbox else {
            return Poll::Ready(None);
        };
        let mut state = RecvBody::lock(inbox);
        if let Some(data) = state.data.pop_front() {
            state.released += data.len();
            drop(state);
            this.stream.wake_by_ref();
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = state.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if state.broken {
            return Poll::Ready(Some(Err("http2 request body: stream reset".into())));
        }
        if state.ended {
            return Poll::Ready(None);
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inbox.as_ref().is_none_or(|inbox| {
            let state = RecvBody::lock(inbox);
            state.ended && state.data.is_empty() && state.trailers.is_none()
        })
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        if let Some(inbox) = &self.inbox {
            let mut state = RecvBody::lock(inbox);
            state.dropped = true;
            let buffered: usize = state.data.drain(..).map(|d| d.len()).sum();
            state.released += buffered;
            drop(state);
            self.stream.wake_by_ref();
        }
    }
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

    fn handle_frames(&mut self) -> Result<(), ConnectionError> {
        if !self.preface_seen {
            let have = self.read.len().min(PREFACE.len());
            if self.read[..have] != PREFACE[..have] {
                return Err(ConnectionError(Reason::Protocol));
            }
            if have < PREFACE.len() {
                return Ok(());
            }
            self.read.advance(PREFACE.len());
            self.preface_seen = true;
        }
        while self.read.len() >= frame::HEADER_LEN && !self.read_closed {
            let head = Head::parse(self.read[..frame::HEADER_LEN].try_into().unwrap_or(&[0; 9]));
            if head.len > MAX_FRAME {
                return Err(ConnectionError(Reason::FrameSize));
            }
            if self.read.len() < frame::HEADER_LEN + head.len {
                break;
            }
            if !self.settings_seen && (head.kind != frame::SETTINGS || head.flags & frame::ACK != 0) {
                return Err(ConnectionError(Reason::Protocol));
            }
            if self.continuing.is_some() && head.kind != frame::CONTINUATION {
                return Err(ConnectionError(Reason::Protocol));
            }
            if head.kind == frame::DATA {
                let whole = self.read.split_to(frame::HEADER_LEN + head.len).freeze();
                self.on_data(head, whole.slice(frame::HEADER_LEN..))?;
            } else {
                let payload = self.read[frame::HEADER_LEN..frame::HEADER_LEN + head.len].to_vec();
                self.read.advance(frame::HEADER_LEN + head.len);
                self.on_frame(head, &payload)?;
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnectionError> {
        let protocol = Err(ConnectionError(Reason::Protocol));
        match head.kind {
            frame::HEADERS => {
                if head.stream == 0 {
                    return protocol;
                }
                let mut block = unpad(head.flags, payload)?;
                if head.flags & frame::PRIORITY_FLAG != 0 {
                    block = block.get(5..).ok_or(ConnectionError(Reason::Protocol))?;
                }
                let continuing = Continuing {
                    stream: head.stream,
                    end_stream: head.flags & frame::END_STREAM != 0,
                    block: block.to_vec(),
                };
                if head.flags & frame::END_HEADERS != 0 {
                    self.on_header_block(continuing)?;
                } else {
                    self.continuing = Some(continuing);
                }
            }
            frame::CONTINUATION => {
                let Some(mut continuing) = self.continuing.take() else {
                    return protocol;
                };
                if continuing.stream != head.stream {
                    return protocol;
                }
                if continuing.block.len() + payload.len() > MAX_HEADER_LIST {
                    return Err(ConnectionError(Reason::EnhanceYourCalm));
                }
                continuing.block.extend_from_slice(payload);
                if head.flags & frame::END_HEADERS != 0 {
                    self.on_header_block(continuing)?;
                } else {
                    self.continuing = Some(continuing);
                }
            }
            frame::PRIORITY => {
                if head.stream == 0 {
                    return protocol;
                }
                if payload.len() != 5 {
                    frame::rst_stream(&mut self.write, head.stream, Reason::FrameSize);
                }
            }
            frame::RST_STREAM => {
                if head.stream == 0 || payload.len() != 4 {
                    return Err(ConnectionError(if head.stream == 0 {
                        Reason::Protocol
                    } else {
                        Reason::FrameSize
                    }));
                }
                if head.stream > self.last_stream {
                    return protocol;
                }
                if let Some(stream) = self.streams.remove(&head.stream) {
                    self.release_stream(stream);
                    self.count_reset()?;
                }
            }
            frame::SETTINGS => self.on_settings(head, payload)?,
            frame::PUSH_PROMISE => return protocol,
            frame::PING => {
                if head.stream != 0 {
                    return protocol;
                }
                if payload.len() != 8 {
                    return Err(ConnectionError(Reason::FrameSize));
                }
                if head.flags & frame::ACK == 0 {
                    frame::ping_ack(&mut self.write, payload);
                }
            }
            frame::GOAWAY => {
                if head.stream != 0 {
                    return protocol;
                }
                // The client opens no more streams: those open finish.
                self.going_away = true;
            }
            frame::WINDOW_UPDATE => self.on_window_update(head, payload)?,
            // Unknown frame types are ignored (RFC 9113 4.1).
            _ => {}
        }
        Ok(())
    }

    fn on_settings(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnectionError> {
        if head.stream != 0 {
            return Err(ConnectionError(Reason::Protocol));
        }
        if head.flags & frame::ACK != 0 {
            return if payload.is_empty() {
                Ok(())
            } else {
                Err(ConnectionError(Reason::FrameSize))
            };
        }
        if !payload.len().is_multiple_of(6) {
            return Err(ConnectionError(Reason::FrameSize));
        }
        self.settings_seen = true;
        for setting in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            match id {
                frame::SETTINGS_ENABLE_PUSH if value > 1 => return Err(ConnectionError(Reason::Protocol)),
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    let value = i64::from(value);
                    if value > frame::MAX_WINDOW {
                        return Err(ConnectionError(Reason::FlowControl));
                    }
                    let delta = value - self.peer_window;
                    self.peer_window = value;
                    for (&id, stream) in self.streams.iter_mut() {
                        stream.send_window += delta;
                        if stream.send_window > frame::MAX_WINDOW {
                            return Err(ConnectionError(Reason::FlowControl));
                        }
                        if delta > 0 {
                            self.turn.push(id);
                        }
                    }
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(16_384..=16_777_215).contains(&value) {
                        return Err(ConnectionError(Reason::Protocol));
                    }
                    self.peer_max_frame = value as usize;
                }
                // The table size only bounds an encoder's dynamic table, which
                // ours never uses; the others concern pushes and clients.
                frame::SETTINGS_HEADER_TABLE_SIZE
                | frame::SETTINGS_MAX_CONCURRENT_STREAMS
                | frame::SETTINGS_MAX_HEADER_LIST_SIZE => {}
                _ => {}
            }
        }
        frame::settings_ack(&mut self.write);
        Ok(())
    }

    fn on_window_update(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnectionError> {
        if payload.len() != 4 {
            return Err(ConnectionError(Reason::FrameSize));
        }
        let increment =
            i64::from(u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff);
        if head.stream == 0 {
            if increment == 0 {
                return Err(ConnectionError(Reason::Protocol));
            }
            self.send_window += increment;
            if self.send_window > frame::MAX_WINDOW {
                return Err(ConnectionError(Reason::FlowControl));
            }
            let blocked = std::mem::take(&mut self.conn_blocked);
            for id in blocked {
                if let Some(stream) = self.streams.get_mut(&id) {
                    stream.conn_blocked = false;
                    self.turn.push(id);
                }
            }
            return Ok(());
        }
        if head.stream > self.last_stream {
            return Err(ConnectionError(Reason::Protocol));
        }
        let Some(stream) = self.streams.get_mut(&head.stream) else {
            return Ok(());
        };
        if increment == 0 {
            self.reset(head.stream, Reason::Protocol);
            return Ok(());
        }
        stream.send_window += increment;
        if stream.send_window > frame::MAX_WINDOW {
            self.reset(head.stream, Reason::FlowControl);
            return Ok(());
        }
        self.turn.push(head.stream);
        Ok(())
    }

    fn on_data(&mut self, head: Head, payload: Bytes) -> Result<(), ConnectionError> {
        if head.stream == 0 || head.stream > self.last_stream {
            return Err(ConnectionError(Reason::Protocol));
        }
        // Flow control counts the whole payload, padding included.
        let len = payload.len();
        if self.recv_outstanding + len as i64 > i64::from(CONNECTION_WINDOW) {
            return Err(ConnectionError(Reason::FlowControl));
        }
        self.recv_outstanding += len as i64;
        let data = payload.slice_ref(unpad(head.flags, &payload)?);
        let Some(stream) = self.streams.get_mut(&head.stream) else {
            // A stream already closed: its data is dropped, the window given back.
            self.give_back(len);
            return Ok(());
        };
        let inbox = match &stream.inbox {
            Some(inbox) if stream.recv_open => inbox.clone(),
            _ => {
                self.give_back(len);
                self.reset(head.stream, Reason::StreamClosed);
                return Ok(());
            }
        };
        stream.recv_window -= len as i64;
        if stream.recv_window < 0 {
            self.give_back(len);
            self.reset(head.stream, Reason::FlowControl);
            return Ok(());
        }
        // Padding is consumed as it comes.
        let padding = len - data.len();
        stream.unannounced += padding as u32;
        self.unannounced += padding as u32;
        let end = head.flags & frame::END_STREAM != 0;
        let mut state = RecvBody::lock(&inbox);
        let wrong_length = match &mut state.expected {
            Some(left) => {
                let over = (data.len() as u64) > *left;
                *left = left.saturating_sub(data.len() as u64);
                over || (end && *left > 0)
            }
            None => false,
        };
        if state.dropped {
            state.released += data.len();
        } else if !data.is_empty() {
            state.data.push_back(data);
        }
        state.ended |= end;
        state.wake();
        drop(state);
        if wrong_length {
            // The body is not the length it said (RFC 9113 8.1.1).
            self.reset(head.stream, Reason::Protocol);
            return Ok(());
        }
        if end {
            self.end_recv(head.stream);
        }
        self.turn.push(head.stream);
        Ok(())
    }

    /// Received bytes nobody will read: the connection's window back.
    fn give_back(&mut self, len: usize) {
        self.unannounced += len as u32;
    }

    /// The client sent the end of its request.
    fn end_recv(&mut self, id: u32) {
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.recv_open = false;
            if matches!(stream.sending, Sending::Done) {
                self.remove(id);
            }
        }
    }

    /// Resets a stream (a stream error) and forgets it.
    fn reset(&mut self, id: u32, reason: Reason) {
        frame::rst_stream(&mut self.write, id, reason);
        self.remove(id);
    }

    fn remove(&mut self, id: u32) {
        if let Some(stream) = self.streams.remove(&id) {
            self.release_stream(stream);
        }
    }

    /// A stream is gone: its request body ends broken if it was still
    /// coming, and what it held of the connection's window comes back.
    fn release_stream(&mut self, stream: Stream) {
        let Some(inbox) = &stream.inbox else {
            return;
        };
        let mut state = RecvBody::lock(inbox);
        let buffered: usize = state.data.drain(..).map(|d| d.len()).sum();
        let released = std::mem::take(&mut state.released);
        state.dropped = true;
        if stream.recv_open {
            state.broken = true;
        }
        state.wake();
        drop(state);
        self.give_back(buffered + released);
    }

    /// A client reset a stream: too many in a second end the connection.
    fn count_reset(&mut self) -> Result<(), ConnectionError> {
        let (since, count) = &mut self.resets;
        if since.elapsed() > Duration::from_secs(1) {
            *since = Instant::now();
            *count = 0;
        }
        *count += 1;
        if *count > MAX_RESETS_PER_SECOND {
            return Err(ConnectionError(Reason::EnhanceYourCalm));
        }
        Ok(())
    }

    /// A whole header block: a new request, or a request's trailers.
    fn on_header_block(&mut self, block: Continuing) -> Result<(), ConnectionError> {
        let id = block.stream;
        // Decoded whatever becomes of the stream: the table must follow.
        match self
            .decoder
            .decode(&block.block, &mut self.fields, MAX_HEADER_LIST)
        {
            Ok(()) => {}
            Err(hpack::HpackError::TooLarge(_)) => return Err(ConnectionError(Reason::EnhanceYourCalm)),
            Err(_) => return Err(ConnectionError(Reason::Compression)),
        }
        if id <= self.last_stream {
            return self.on_trailers(id, block.end_stream);
        }
        if id.is_multiple_of(2) {
            return Err(ConnectionError(Reason::Protocol));
        }
        self.last_stream = id;
        if self.going_away {
            // Past the GOAWAY's last stream: the client sends it elsewhere.
            return Ok(());
        }
        if self.streams.len() >= MAX_STREAMS as usize {
            frame::rst_stream(&mut self.write, id, Reason::RefusedStream);
            return Ok(());
        }
        if block.end_stream {
            if let Some(prepared) =
                direct::prepare(&self.fields, &self.client, &self.forwarded_for, &self.forwarded)
            {
                self.open(id, Box::pin(direct::send(prepared)), None);
                return Ok(());
            }
        }
        let Ok(head) = RequestHead::from_fields(&self.fields, block.end_stream) else {
            frame::rst_stream(&mut self.write, id, Reason::Protocol);
            return Ok(());
        };
        let inbox = (!block.end_stream).then(|| {
            Arc::new(Inbox {
                state: Mutex::new(InboxState {
                    expected: head.content_length,
                    ..InboxState::default()
                }),
            })
        });
        let opened = self.open(id, Box::pin(std::future::pending()), inbox.clone());
        let body = RecvBody {
            inbox,
            stream: opened,
        };
        let handling: Handling = if head.method == Method::CONNECT {
            // Tunnels over HTTP/2 are not offered (no extended CONNECT).
            Box::pin(std::future::ready(encode_response(connect_refused())))
        } else {
            let mut request = Request::new(super::body::RequestBody::Http2(body));
            *request.method_mut() = head.method;
            *request.uri_mut() = head.uri;
            *request.version_mut() = Version::HTTP_2;
            *request.headers_mut() = head.headers;
            let client = self.client.clone();
            Box::pin(async move { encode_response(super::handle(request, &client).await) })
        };
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.sending = Sending::Handling(handling);
        }
        Ok(())
    }

    /// Opens stream `id`, its request being `handling`; returns its waker.
    fn open(&mut self, id: u32, handling: Handling, inbox: Option<Arc<Inbox>>) -> Waker {
        let waker = Waker::from(Arc::new(StreamWaker {
            id,
            ready: self.ready.clone(),
        }));
        self.streams.insert(
            id,
            Stream {
                waker: waker.clone(),
                sending: Sending::Handling(handling),
                send_window: self.peer_window,
                recv_open: inbox.is_some(),
                inbox,
                recv_window: i64::from(STREAM_WINDOW),
                unannounced: 0,
                conn_blocked: false,
            },
        );
        self.turn.push(id);
        waker
    }

    fn on_trailers(&mut self, id: u32, end_stream: bool) -> Result<(), ConnectionError> {
        let Some(stream) = self.streams.get(&id) else {
            // A stream already closed.
            return Ok(());
        };
        let inbox = match &stream.inbox {
            Some(inbox) if stream.recv_open => inbox.clone(),
            _ => {
                self.reset(id, Reason::StreamClosed);
                return Ok(());
            }
        };
        let Some(trailers) = end_stream.then(|| trailer_map(&self.fields)).flatten() else {
            self.reset(id, Reason::Protocol);
            return Ok(());
        };
        let mut state = RecvBody::lock(&inbox);
        if state.expected.is_some_and(|left| left > 0) {
            drop(state);
            self.reset(id, Reason::Protocol);
            return Ok(());
        }
        if !state.dropped {
            state.trailers = Some(trailers);
        }
        state.ended = true;
        state.wake();
        drop(state);
        self.end_recv(id);
        Ok(())
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

/// A response's head as an HPACK block (connection-specific fields left
/// out), and its body.
fn encode_response(response: Response<ResponseBody>) -> (Vec<u8>, ResponseBody) {
    let (parts, body) = response.into_parts();
    let mut block = Vec::with_capacity(128);
    hpack::encode_status(&mut block, parts.status.as_u16());
    for (name, value) in &parts.headers {
        if !connection_specific(name) {
            hpack::encode_field(&mut block, name.as_str(), value.as_bytes());
        }
    }
    (block, body)
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

/// Headers HTTP/2 forbids (RFC 9113 8.2.2): they concern one connection.
fn connection_specific(name: &HeaderName) -> bool {
    use hyper::header;
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// What a request's header block says.
struct RequestHead {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    content_length: Option<u64>,
}

/// A request the proxy does not take.
struct Malformed;

impl RequestHead {
    /// Reads and checks a request's fields (RFC 9113 8.3.1): pseudo-headers
    /// first and once each, names lowercase, no connection-specific ones.
    fn from_fields(fields: &hpack::Fields, end_stream: bool) -> Result<RequestHead, Malformed> {
        let (mut method, mut scheme, mut authority, mut path) = (None, None, None, None);
        let mut headers = HeaderMap::with_capacity(fields.fields.len());
        let mut cookies: Option<Vec<u8>> = None;
        let mut content_length = None;
        let mut regular = false;
        for (name, value) in fields.iter() {
            if let Some(pseudo) = name.strip_prefix(b":") {
                let slot = match pseudo {
                    _ if regular => return Err(Malformed),
                    b"method" => &mut method,
                    b"scheme" => &mut scheme,
                    b"authority" => &mut authority,
                    b"path" => &mut path,
                    _ => return Err(Malformed),
                };
                if slot.replace(value).is_some() {
                    return Err(Malformed);
                }
                continue;
            }
            regular = true;
            let name = HeaderName::from_lowercase(name).map_err(|_| Malformed)?;
            if connection_specific(&name) {
                return Err(Malformed);
            }
            if name == hyper::header::TE && value != b"trailers" {
                return Err(Malformed);
            }
            if name == hyper::header::COOKIE {
                // Split by the client; one header again for HTTP/1.1 (RFC 9113 8.2.3).
                let joined = cookies.get_or_insert_with(Vec::new);
                if !joined.is_empty() {
                    joined.extend_from_slice(b"; ");
                }
                joined.extend_from_slice(value);
                continue;
            }
            if name == hyper::header::CONTENT_LENGTH {
                let len = std::str::from_utf8(value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or(Malformed)?;
                if content_length.is_some_and(|seen| seen != len) || (end_stream && len != 0) {
                    return Err(Malformed);
                }
                content_length = Some(len);
            }
            let value = HeaderValue::from_bytes(value).map_err(|_| Malformed)?;
            headers.append(name, value);
        }
        if let Some(cookies) = cookies {
            let value = HeaderValue::from_bytes(&cookies).map_err(|_| Malformed)?;
            headers.insert(hyper::header::COOKIE, value);
        }
        let method = Method::from_bytes(method.ok_or(Malformed)?).map_err(|_| Malformed)?;
        let authority = authority
            .map(|a| Authority::try_from(a).map_err(|_| Malformed))
            .transpose()?;
        let uri = if method == Method::CONNECT {
            if scheme.is_some() || path.is_some() {
                return Err(Malformed);
            }
            let mut parts = hyper::http::uri::Parts::default();
            parts.authority = Some(authority.ok_or(Malformed)?);
            Uri::from_parts(parts).map_err(|_| Malformed)?
        } else {
            let path = path.filter(|p| !p.is_empty()).ok_or(Malformed)?;
            let scheme = match scheme.ok_or(Malformed)? {
                b"http" => Scheme::HTTP,
                b"https" => Scheme::HTTPS,
                other => Scheme::try_from(other).map_err(|_| Malformed)?,
            };
            let mut parts = hyper::http::uri::Parts::default();
            parts.path_and_query = Some(PathAndQuery::try_from(path).map_err(|_| Malformed)?);
            if let Some(authority) = authority {
                parts.scheme = Some(scheme);
                parts.authority = Some(authority);
            }
            Uri::from_parts(parts).map_err(|_| Malformed)?
        };
        Ok(RequestHead {
            method,
            uri,
            headers,
            content_length: if end_stream { None } else { content_length },
        })
    }
}

/// A trailer block's fields as headers: no pseudo-headers, names lowercase.
fn trailer_map(fields: &hpack::Fields) -> Option<HeaderMap> {
    let mut trailers = HeaderMap::with_capacity(fields.fields.len());
    for (name, value) in fields.iter() {
        let name = HeaderName::from_lowercase(name).ok()?;
        if connection_specific(&name) {
            return None;
        }
        trailers.append(name, HeaderValue::from_bytes(value).ok()?);
    }
    Some(trailers)
}

/// The answer to an HTTP/2 CONNECT.
fn connect_refused() -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::local("", None));
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response.headers_mut().insert(
        &super::ERROR_HEADER,
        HeaderValue::from_static("connect-not-supported"),
    );
    response
}

/// The payload of a frame without its padding (RFC 9113 6.1).
fn unpad(flags: u8, payload: &[u8]) -> Result<&[u8], ConnectionError> {
    if flags & frame::PADDED == 0 {
        return Ok(payload);
    }
    let (&pad, rest) = payload.split_first().ok_or(ConnectionError(Reason::Protocol))?;
    rest.len()
        .checked_sub(usize::from(pad))
        .map(|len| &rest[..len])
        .ok_or(ConnectionError(Reason::Protocol))
}
