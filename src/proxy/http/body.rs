//! The bodies the HTTP proxy streams: a request's on its way to a backend,
//! a response's on its way to the client (or one of the proxy's own short
//! answers). Frames pass through as they come: nothing is buffered whole.
//! Each counts its bytes; the response body also says when the exchange
//! is over, which returns the upstream connection to its pool and writes
//! the request's metrics and access log line.

use hyper::body::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// A request body sent upstream: the client's, streamed, or none (a
/// retried request without a body).
pub enum UpstreamBody {
    Streamed {
        inner: RequestBody,
        /// Bytes sent, when the access log wants them.
        counted: Option<Arc<AtomicU64>>,
    },
    Empty,
}

/// A request's body as the client sent it: through hyper's server, or
/// this proxy's own HTTP/2 server.
pub enum RequestBody {
    Hyper(Incoming),
    Http2(super::http2::RecvBody),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Hyper(inner) => Pin::new(inner)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError::from))),
            RequestBody::Http2(inner) => Pin::new(inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(inner) => inner.is_end_stream(),
            RequestBody::Http2(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Hyper(inner) => inner.size_hint(),
            RequestBody::Http2(inner) => inner.size_hint(),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Streamed { inner, counted } => {
                let polled = Pin::new(inner).poll_frame(cx);
                if let (Poll::Ready(Some(Ok(frame))), Some(counted)) = (&polled, counted) {
                    if let Some(data) = frame.data_ref() {
                        counted.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                }
                polled
            }
            UpstreamBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Streamed { inner, .. } => inner.is_end_stream(),
            UpstreamBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Streamed { inner, .. } => inner.size_hint(),
            UpstreamBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// What happens when a response body ends: `complete` is true if it was
/// read to the end, false if the client went away or the backend broke off.
pub trait Finish: Send + 'static {
    fn finish(self: Box<Self>, complete: bool, bytes: u64);
}

/// A response body for the client.
pub struct ResponseBody {
    source: Source,
    bytes: u64,
    finish: Option<Box<dyn Finish>>,
}

enum Source {
    Upstream(Incoming),
    /// From a fast-path upstream connection ([`super::h1::RawBody`]).
    Raw(super::h1::RawBody),
    Local(Option<Bytes>),
}

/// Why a response body broke off.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl ResponseBody {
    /// A backend's response body; `finish` runs once it ends or is dropped.
    pub fn upstream(inner: Incoming, finish: Box<dyn Finish>) -> ResponseBody {
        ResponseBody::streamed(Source::Upstream(inner), finish)
    }

    /// A backend's response body from a fast-path connection.
    pub fn raw(inner: super::h1::RawBody, finish: Box<dyn Finish>) -> ResponseBody {
        ResponseBody::streamed(Source::Raw(inner), finish)
    }

    /// A body read from a backend: an empty one has ended already.
    fn streamed(source: Source, finish: Box<dyn Finish>) -> ResponseBody {
        let mut body = ResponseBody {
            source,
            bytes: 0,
            finish: Some(finish),
        };
        if body.is_end_stream() {
            body.end(true);
        }
        body
    }

    /// One of the proxy's own answers.
    pub fn local(text: impl Into<Bytes>, finish: Option<Box<dyn Finish>>) -> ResponseBody {
        let text = text.into();
        let bytes = text.len() as u64;
        let mut body = ResponseBody {
            source: Source::Local(Some(text).filter(|t| !t.is_empty())),
            bytes,
            finish,
        };
        // Sent whole with the head: the exchange is over as far as the proxy goes.
        body.end(true);
        body
    }

    fn end(&mut self, complete: bool) {
        if let Some(finish) = self.finish.take() {
            finish.finish(complete, self.bytes);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let (polled, ended) = match &mut this.source {
            Source::Local(text) => return Poll::Ready(text.take().map(|text| Ok(Frame::data(text)))),
            Source::Raw(inner) => {
                let polled = inner.poll_frame(cx);
                (
                    polled.map(|f| f.map(|r| r.map_err(BodyError::from))),
                    inner.is_end_stream(),
                )
            }
            Source::Upstream(inner) => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                (
                    polled.map(|f| f.map(|r| r.map_err(BodyError::from))),
                    inner.is_end_stream(),
                )
            }
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                if ended {
                    this.end(true);
                }
            }
            Poll::Ready(None) => this.end(true),
            Poll::Ready(Some(Err(_))) => this.end(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Upstream(inner) => inner.is_end_stream(),
            Source::Raw(inner) => inner.is_end_stream(),
            Source::Local(text) => text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Upstream(inner) => inner.size_hint(),
            Source::Raw(inner) => inner
                .remaining()
                .map_or_else(SizeHint::default, SizeHint::with_exact),
            Source::Local(text) => SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64)),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.end(false);
    }
}
