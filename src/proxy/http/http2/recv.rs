//! What a connection does with the frames a client sends: settings,
//! flow control, new requests and their bodies, resets, and the errors
//! that end a stream or the connection (RFC 9113 5.4, 6).

use super::frame::{self, Head, Reason};
use super::message::{connect_refused, encode_response, trailer_map, RequestHead};
use super::recv_body::{Inbox, InboxState, RecvBody};
use super::{direct, hpack, Connection, ConnectionError, Continuing, Handling, Sending, Stream, StreamWaker};
use super::{
    CONNECTION_WINDOW, MAX_FRAME, MAX_HEADER_LIST, MAX_RESETS_PER_SECOND, MAX_STREAMS, STREAM_WINDOW,
};
use bytes::{Buf, Bytes};
use hyper::{Method, Request, Version};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::{Duration, Instant};

impl Connection {
    pub(super) fn handle_frames(&mut self) -> Result<(), ConnectionError> {
        if !self.preface_seen {
            let have = self.read.len().min(frame::PREFACE.len());
            if self.read[..have] != frame::PREFACE[..have] {
                return Err(ConnectionError(Reason::Protocol));
            }
            if have < frame::PREFACE.len() {
                return Ok(());
            }
            self.read.advance(frame::PREFACE.len());
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
                // Split off, not copied: `on_frame` needs `self` whole.
                let whole = self.read.split_to(frame::HEADER_LEN + head.len);
                self.on_frame(head, &whole[frame::HEADER_LEN..])?;
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
                let end_stream = head.flags & frame::END_STREAM != 0;
                if head.flags & frame::END_HEADERS != 0 {
                    self.on_header_block(head.stream, end_stream, block)?;
                } else {
                    self.continuing = Some(Continuing {
                        stream: head.stream,
                        end_stream,
                        block: block.to_vec(),
                    });
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
                    self.on_header_block(continuing.stream, continuing.end_stream, &continuing.block)?;
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
    pub(super) fn give_back(&mut self, len: usize) {
        self.unannounced += len as u32;
    }

    /// The client sent the end of its request.
    pub(super) fn end_recv(&mut self, id: u32) {
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.recv_open = false;
            if matches!(stream.sending, Sending::Done) {
                self.remove(id);
            }
        }
    }

    /// Resets a stream (a stream error) and forgets it.
    pub(super) fn reset(&mut self, id: u32, reason: Reason) {
        frame::rst_stream(&mut self.write, id, reason);
        self.remove(id);
    }

    pub(super) fn remove(&mut self, id: u32) {
        if let Some(stream) = self.streams.remove(&id) {
            self.release_stream(stream);
        }
    }

    /// A stream is gone: its request body ends broken if it was still
    /// coming, and what it held of the connection's window comes back.
    pub(super) fn release_stream(&mut self, stream: Stream) {
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
    fn on_header_block(&mut self, id: u32, end_stream: bool, block: &[u8]) -> Result<(), ConnectionError> {
        // Decoded whatever becomes of the stream: the table must follow.
        match self.decoder.decode(block, &mut self.fields, MAX_HEADER_LIST) {
            Ok(()) => {}
            Err(hpack::HpackError::TooLarge(_)) => return Err(ConnectionError(Reason::EnhanceYourCalm)),
            Err(_) => return Err(ConnectionError(Reason::Compression)),
        }
        if id <= self.last_stream {
            return self.on_trailers(id, end_stream);
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
        if end_stream {
            if let Some(prepared) =
                direct::prepare(&self.fields, &self.client, &self.forwarded_for, &self.forwarded)
            {
                self.open(id, Box::pin(direct::send(prepared)), None);
                return Ok(());
            }
        }
        let Ok(head) = RequestHead::from_fields(&self.fields, end_stream) else {
            frame::rst_stream(&mut self.write, id, Reason::Protocol);
            return Ok(());
        };
        let inbox = (!end_stream).then(|| {
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
            let mut request = Request::new(crate::proxy::http::body::RequestBody::Http2(body));
            *request.method_mut() = head.method;
            *request.uri_mut() = head.uri;
            *request.version_mut() = Version::HTTP_2;
            *request.headers_mut() = head.headers;
            let client = self.client.clone();
            Box::pin(async move { encode_response(crate::proxy::http::handle(request, &client).await) })
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
