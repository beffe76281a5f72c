//! A request body as an HTTP/2 connection receives it: the data frames
//! queued for the handler, which gives the flow-control window back as it
//! takes them (the connection turns that into WINDOW_UPDATE frames).

use crate::proxy::http::body::BodyError;
use bytes::Bytes;
use hyper::body::{Body, Frame};
use hyper::header::HeaderMap;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

/// A request body's data as the connection received it, for the handler.
#[derive(Default)]
pub(super) struct Inbox {
    pub(super) state: Mutex<InboxState>,
}

#[derive(Default)]
pub(super) struct InboxState {
    pub(super) data: VecDeque<Bytes>,
    pub(super) trailers: Option<HeaderMap>,
    pub(super) ended: bool,
    /// The stream was reset or the connection lost.
    pub(super) broken: bool,
    /// The handler dropped the body: what comes is consumed at once.
    pub(super) dropped: bool,
    /// Bytes the handler took since the connection last looked.
    pub(super) released: usize,
    /// `content-length`, counted down as data comes.
    pub(super) expected: Option<u64>,
    pub(super) waker: Option<Waker>,
}

impl InboxState {
    pub(super) fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// The body of a request from an HTTP/2 client.
pub struct RecvBody {
    pub(super) inbox: Option<std::sync::Arc<Inbox>>,
    /// The stream's waker: the connection gives consumed bytes back.
    pub(super) stream: Waker,
}

impl RecvBody {
    pub(super) fn lock(inbox: &Inbox) -> std::sync::MutexGuard<'_, InboxState> {
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
