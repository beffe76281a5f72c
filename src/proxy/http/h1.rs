//! The HTTP/1.1 fast path: the common request (HTTP/1.1 both ways, a
//! body of known length that fits in memory, no upgrade, no `Expect`)
//! proxied without hyper. The head is parsed with httparse in the
//! connection's read buffer and forwarded as bytes, hop-by-hop headers
//! left out and the identity headers written in; the upstream connection
//! is a plain pooled stream driven by the request's own task; the
//! response head is rewritten the same way and its body relayed as it
//! comes, its end found from its framing (length, chunked, or close).
//!
//! The same semantics as the hyper path in [`super`]: routes, per-request
//! balancing and hashing, retries within the budget, timeouts, outlier
//! ejection, request limits, identity headers, metrics and access log, a
//! drain's `Connection: close`. Whatever else a connection asks for (HTTP/2,
//! HTTP/1.0, a chunked or large request body, an upgrade, `Expect`, a head
//! httparse refuses, an HTTP/2 upstream) hands the connection, with what
//! was read of it, to hyper for the rest of its life.

use super::body::ResponseBody;
use super::identity::{self, Identity};
use super::route::{Head, Target};
use super::{
    is_idempotent, record_failure, request_hash, Begun, Client, Exchange, Finish, Logged, OnBackend, Refusal,
    HEADER_READ_TIMEOUT, STALE_RETRIES,
};
use crate::policy::UpstreamProtocol;
use crate::proxy::balance::{BackendSet, NoBackend};
use crate::proxy::drain;
use crate::proxy::http::pool::{Pool, Raw, Want};
use crate::proxy::service::ServiceState;
use bytes::{Buf, BytesMut};
use hyper::Method;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest request head plus body the fast path holds in memory; a larger
/// one goes to hyper, which streams it.
const MAX_REQUEST: usize = 64 * 1024;

/// Largest response head read; a larger one is a bad response (502).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Headers per head the fast paths take (HTTP/2's direct path too); a
/// request with more goes the general way, a response with more is bad.
pub(super) const MAX_HEADERS: usize = 64;

/// What one read asks room for.
const READ_CHUNK: usize = 16 * 1024;

/// What the fast path leaves to hyper: the client connection, and the
/// bytes read from it that hyper must read first.
pub(super) struct Handover {
    pub client: TcpStream,
    pub read: BytesMut,
}

impl tokio::io::AsyncRead for Handover {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read.is_empty() {
            return std::pin::Pin::new(&mut this.client).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read[..n]);
        this.read.advance(n);
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Handover {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().client).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().client).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.client.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().client).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().client).poll_shutdown(cx)
    }
}

/// Serves a client connection's HTTP/1.1 requests until it closes (`None`)
/// or asks for something only hyper does (the connection, handed over).
pub(super) async fn serve(
    mut client: TcpStream,
    conn: &Client,
    drain: &mut drain::Watch,
) -> Option<Handover> {
    let probe = drain.probe();
    // Waited on across requests, registered once per connection.
    let (signaled, forced) = (probe.signaled(), probe.forced());
    tokio::pin!(signaled, forced);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut scratch = Scratch {
        up: Vec::with_capacity(1024),
        down: Vec::with_capacity(1024),
        forwarded_for: Vec::new(),
        forwarded: Vec::new(),
    };
    identity::write_forwarded_for(&mut scratch.forwarded_for, conn.peer.ip());
    identity::write_forwarded(&mut scratch.forwarded, conn.peer.ip());
    loop {
        if buf.is_empty() {
            if probe.is_signaled() {
                return None;
            }
            // Room for a whole head in one read (an emptied buffer takes
            // its space back here, without copying).
            buf.reserve(READ_CHUNK);
            tokio::select! {
                read = client.read_buf(&mut buf) => if !matches!(read, Ok(n) if n > 0) {
                    return None;
                },
                () = &mut signaled => return None,
            }
        }
        // Set when a head does not come whole in one read.
        let mut deadline = None;
        let request = loop {
            match Request::read(&buf, conn, &mut scratch) {
                Read::Complete(request) => break request,
                Read::Hyper => return Some(Handover { client, read: buf }),
                Read::Partial => {}
            }
            buf.reserve(READ_CHUNK);
            let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + HEADER_READ_TIMEOUT);
            match tokio::time::timeout_at(deadline, client.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        };
        buf.advance(request.len);
        let keep_alive = tokio::select! {
            keep_alive = forward(&mut client, request, &mut scratch, &probe) => keep_alive,
            () = &mut forced => {
                conn.cell.current().shared.metrics().drain_kills.increment(1);
                return None;
            }
        };
        if !keep_alive {
            return None;
        }
    }
}

/// Buffers a connection reuses from request to request, and what it
/// writes into every request's forwarding headers.
pub(super) struct Scratch {
    /// What goes upstream: the rewritten head and the body.
    pub up: Vec<u8>,
    /// What goes to the client: the rewritten response head and body bytes.
    pub down: Vec<u8>,
    /// This client's element of `x-forwarded-for` and of `forwarded`.
    forwarded_for: Vec<u8>,
    forwarded: Vec<u8>,
}

/// How far a request has been read.
enum Read {
    Complete(Request),
    Partial,
    Hyper,
}

/// A request read whole and made ready to forward.
struct Request {
    /// Bytes of the client's buffer it took (head and body).
    len: usize,
    state: Arc<ServiceState>,
    /// Where the route sends it (`None`: to a service this node does not know).
    target: Option<Arc<ServiceState>>,
    among: Option<Vec<usize>>,
    key: u64,
    method: Method,
    head_request: bool,
    bodiless: bool,
    /// The client said `Connection: close`.
    close: bool,
    logged: Option<Logged>,
    body_len: u64,
}

/// A request head as httparse gave it: what routing and hashing read.
struct Parsed<'a> {
    method: &'a str,
    path: &'a str,
    headers: &'a [httparse::Header<'a>],
}

impl Head for Parsed<'_> {
    fn method(&self) -> &str {
        self.method
    }

    fn path(&self) -> &str {
        self.path.split_once('?').map_or(self.path, |(path, _)| path)
    }

    fn any_header(&self, name: &str, test: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .any(|h| test(h.value))
    }
}

/// The headers the fast path looks at, recognised once per header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Known {
    Other,
    ContentLength,
    TransferEncoding,
    Upgrade,
    Expect,
    Connection,
    Te,
    Trailer,
    Host,
    RequestId,
    Traceparent,
    Tracestate,
    ForwardedFor,
    Forwarded,
    /// `Keep-Alive` and the `Proxy-` ones: hop-by-hop both ways.
    HopByHop,
}

impl Known {
    /// What header `name` is (names compared without case, by length first).
    pub(super) fn of(name: &str) -> Known {
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        match name.len() {
            2 if is("te") => Known::Te,
            4 if is("host") => Known::Host,
            6 if is("expect") => Known::Expect,
            7 if is("upgrade") => Known::Upgrade,
            7 if is("trailer") => Known::Trailer,
            9 if is("forwarded") => Known::Forwarded,
            10 if is("connection") => Known::Connection,
            10 if is("keep-alive") => Known::HopByHop,
            10 if is("tracestate") => Known::Tracestate,
            11 if is("traceparent") => Known::Traceparent,
            12 if is("x-request-id") => Known::RequestId,
            14 if is("content-length") => Known::ContentLength,
            15 if is("x-forwarded-for") => Known::ForwardedFor,
            16 if is("proxy-connection") => Known::HopByHop,
            17 if is("transfer-encoding") => Known::TransferEncoding,
            18 if is("proxy-authenticate") => Known::HopByHop,
            19 if is("proxy-authorization") => Known::HopByHop,
            _ => Known::Other,
        }
    }

    /// Hop-by-hop in a request (RFC 9110 7.6.1): never forwarded.
    pub(super) fn hop_by_hop_in_request(self) -> bool {
        matches!(
            self,
            Known::Connection
                | Known::HopByHop
                | Known::Te
                | Known::Trailer
                | Known::TransferEncoding
                | Known::Upgrade
        )
    }

    /// Hop-by-hop in a response. `Transfer-Encoding` and `Trailer` stay: the
    /// body is relayed in the framing they describe.
    pub(super) fn hop_by_hop_in_response(self) -> bool {
        matches!(
            self,
            Known::Connection | Known::HopByHop | Known::Te | Known::Upgrade
        )
    }
}

/// A `Content-Length` value: digits only (RFC 9110 8.6; no sign, no
/// list), or `None`.
fn content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// Whether `Connection` names header `name` (as hop-by-hop).
fn named_by(connection: &[&[u8]], name: &str) -> bool {
    connection.iter().any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
}

fn header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes a request line for HTTP/1.1.
pub(super) fn request_line(out: &mut Vec<u8>, method: &str, path: &str) {
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

/// A request's target service and the backends among its own.
pub(super) type Routed = (Option<Arc<ServiceState>>, Option<Vec<usize>>);

/// Where a request the fast paths take goes: the route's target (`None`
/// inside: a service this node does not know) and the backends among its
/// own; `None` when the target's backends speak HTTP/2 (hyper's client
/// takes those).
pub(super) fn route_http1(state: &Arc<ServiceState>, head: &impl Head) -> Option<Routed> {
    let (target, among) = match state.routes().map(|routes| routes.choose(head)) {
        Some(Target::Service(name)) => (state.context.directory.find(name), None),
        Some(Target::Backends(among)) => (Some(state.clone()), among.clone()),
        None => (Some(state.clone()), None),
    };
    if target
        .as_ref()
        .is_some_and(|target| target.spec.http.upstream_protocol != UpstreamProtocol::Http1)
    {
        return None;
    }
    Some((target, among))
}

/// What [`write_fields`] adds to a request's own fields.
pub(super) struct Upstream<'a> {
    /// The request's authority (HTTP/2's `:authority`), for a Host it lacks.
    pub authority: Option<&'a [u8]>,
    /// The service's address: the Host of a request with neither.
    pub service: std::net::SocketAddr,
    /// The client accepts trailers (`te: trailers`).
    pub trailers: bool,
    /// This client's element of `x-forwarded-for` and of `forwarded`.
    pub forwarded_for: &'a [u8],
    pub forwarded: &'a [u8],
    /// The access log wants the request's identity.
    pub logging: bool,
}

/// Writes the fields of a request head going upstream, after its request
/// line, for both fast paths (HTTP/1.1 and HTTP/2 clients): the fields
/// less hop-by-hop ones, Host if the request had none, `te: trailers`,
/// then this hop's identity (x-request-id when absent, traceparent with a
/// new span, x-forwarded-for and forwarded with this client appended).
/// Returns the identity when `logging`.
pub(super) fn write_fields<'f>(
    bytes: &mut Vec<u8>,
    fields: impl Iterator<Item = (&'f str, &'f [u8], Known)> + Clone,
    upstream: Upstream<'_>,
) -> Option<Identity> {
    let (mut has_host, mut request_id, mut traceparent) = (false, None, None);
    for (_, value, kind) in fields.clone() {
        match kind {
            Known::Host => has_host = true,
            Known::RequestId if request_id.is_none() && !value.is_empty() => request_id = Some(value),
            Known::Traceparent => traceparent = Some(value),
            _ => {}
        }
    }
    let parent = identity::parent(traceparent);
    let continued = parent.is_some();
    for (name, value, kind) in fields.clone() {
        let forwarded = match kind {
            // Written below, with this hop's part.
            Known::Traceparent | Known::ForwardedFor | Known::Forwarded => false,
            Known::Tracestate => continued,
            Known::RequestId => request_id.is_some(),
            kind => !kind.hop_by_hop_in_request(),
        };
        if forwarded {
            header(bytes, name, value);
        }
    }
    if !has_host {
        match upstream.authority {
            Some(authority) => header(bytes, "host", authority),
            None => header(bytes, "host", upstream.service.to_string().as_bytes()),
        }
    }
    if upstream.trailers {
        header(bytes, "te", b"trailers");
    }
    let made_id = request_id.is_none().then(|| {
        bytes.extend_from_slice(b"x-request-id: ");
        let start = bytes.len();
        identity::write_request_id(bytes);
        let made = start..bytes.len();
        bytes.extend_from_slice(b"\r\n");
        made
    });
    bytes.extend_from_slice(b"traceparent: ");
    let start = bytes.len();
    identity::write_traceparent(bytes, parent);
    let traceparent_value = start..bytes.len();
    bytes.extend_from_slice(b"\r\n");
    for (name, this_hop, kind) in [
        ("x-forwarded-for", upstream.forwarded_for, Known::ForwardedFor),
        ("forwarded", upstream.forwarded, Known::Forwarded),
    ] {
        // The values it came with, then this hop's.
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(b": ");
        for (_, value, _) in fields.clone().filter(|field| field.2 == kind) {
            bytes.extend_from_slice(value);
            bytes.extend_from_slice(b", ");
        }
        bytes.extend_from_slice(this_hop);
        bytes.extend_from_slice(b"\r\n");
    }
    if !upstream.logging {
        return None;
    }
    let request_id = match (made_id, request_id) {
        (Some(made), _) => String::from_utf8_lossy(&bytes[made]).into_owned(),
        (None, id) => String::from_utf8_lossy(id.unwrap_or_default()).into_owned(),
    };
    Some(Identity {
        request_id,
        trace_id: identity::trace_id(&bytes[traceparent_value]).to_string(),
    })
}

impl Request {
    /// Parses what `buf` holds of the next request and, once it is whole
    /// and the fast path takes it, routes it and writes what goes upstream.
    fn read(buf: &[u8], conn: &Client, scratch: &mut Scratch) -> Read {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        let head_len = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => return Read::Partial,
            _ => return Read::Hyper,
        };
        let (Some(method), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version) else {
            return Read::Hyper;
        };
        let parsed = Parsed {
            method,
            path,
            headers: parsed.headers,
        };
        // What the fast path cannot take, and the framing of the body.
        let mut body_len: Option<u64> = None;
        let mut connection: Vec<&[u8]> = Vec::new();
        let (mut close, mut trailers) = (false, false);
        let mut kinds = [Known::Other; MAX_HEADERS];
        for (h, kind) in parsed.headers.iter().zip(kinds.iter_mut()) {
            *kind = Known::of(h.name);
            match *kind {
                Known::ContentLength => {
                    let Some(len) = content_length(h.value) else {
                        return Read::Hyper;
                    };
                    if body_len.is_some_and(|seen| seen != len) {
                        return Read::Hyper;
                    }
                    body_len = Some(len);
                }
                Known::TransferEncoding | Known::Upgrade | Known::Expect => return Read::Hyper,
                Known::Connection => {
                    for token in tokens(h.value) {
                        if token.eq_ignore_ascii_case(b"close") {
                            close = true;
                        } else if token.eq_ignore_ascii_case(b"upgrade") {
                            return Read::Hyper;
                        }
                        connection.push(token);
                    }
                }
                Known::Te => trailers |= tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"trailers")),
                _ => {}
            }
        }
        let body_len = body_len.unwrap_or(0);
        if method == "CONNECT" || !path.starts_with('/') {
            return Read::Hyper;
        }
        let Some(end) = usize::try_from(body_len)
            .ok()
            .and_then(|len| head_len.checked_add(len))
            .filter(|end| *end <= MAX_REQUEST)
        else {
            return Read::Hyper;
        };
        if buf.len() < end {
            return Read::Partial;
        }
        let state = conn.cell.current();
        let http = &state.spec.http;
        if http.upstream_protocol != UpstreamProtocol::Http1 {
            return Read::Hyper;
        }
        let Some((target, among)) = route_http1(&state, &parsed) else {
            return Read::Hyper;
        };
        let key = request_hash(http, &parsed, conn.peer);
        // The head that goes upstream.
        let bytes = &mut scratch.up;
        bytes.clear();
        request_line(bytes, method, path);
        let fields = parsed
            .headers
            .iter()
            .zip(kinds.iter().copied())
            .filter(|(h, _)| !named_by(&connection, h.name))
            .map(|(h, kind)| (h.name, h.value, kind));
        let logging = http.access_log || state.context.access_log_all;
        let identity = write_fields(
            bytes,
            fields,
            Upstream {
                authority: None,
                service: state.address,
                trailers,
                forwarded_for: &scratch.forwarded_for,
                forwarded: &scratch.forwarded,
                logging,
            },
        );
        bytes.extend_from_slice(b"\r\n");
        bytes.extend_from_slice(&buf[head_len..end]);
        let logged = identity.map(|identity| Logged {
            path: parsed.path().into(),
            identity,
        });
        let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
        Read::Complete(Request {
            len: end,
            head_request: method == Method::HEAD,
            bodiless: body_len == 0,
            close,
            logged,
            body_len,
            state,
            target,
            among,
            key,
            method,
        })
    }
}

/// Proxies one request and writes its response; says whether the client
/// connection may carry another.
async fn forward(
    client: &mut TcpStream,
    request: Request,
    scratch: &mut Scratch,
    drain: &drain::Probe,
) -> bool {
    let started = Instant::now();
    let state = request.state.clone();
    let close = request.close;
    let bytes_in = request
        .logged
        .is_some()
        .then(|| Arc::new(AtomicU64::new(request.body_len)));
    let mut exchange = match Exchange::begin(&state, request.method.clone(), request.logged, started) {
        Begun::Admitted(exchange) => exchange,
        Begun::OverMaxRequests(exchange) => {
            return refuse(client, Refusal::MaxRequests, exchange, close, drain).await
        }
    };
    exchange.bytes_in = bytes_in;
    let Some(target) = request.target.clone() else {
        return refuse(client, Refusal::NoSuchService, exchange, close, drain).await;
    };
    let Ok(backends) = target.backends() else {
        return refuse(client, Refusal::NoHealthyBackend, exchange, close, drain).await;
    };
    let tries = Tries {
        state: &state,
        target: &target,
        backends,
        among: request.among.as_deref(),
        key: request.key,
        method: &request.method,
        bodiless: request.bodiless,
        head_request: request.head_request,
        started,
    };
    match tries.run(scratch, &mut exchange).await {
        Decision::Answered(raw, response, pool) => {
            let close = close || drain.is_signaled() || response.framing == Framing::Close;
            relay(client, raw, response, &mut scratch.down, exchange, close, &pool).await
        }
        Decision::Refused(refusal) => refuse(client, refusal, exchange, close, drain).await,
    }
}

/// A request's tries at its backends: what they need to know of it.
pub(super) struct Tries<'a> {
    /// The service the request came to (its HTTP policy applies).
    pub state: &'a Arc<ServiceState>,
    /// The service its route sends it to.
    pub target: &'a Arc<ServiceState>,
    pub backends: &'a BackendSet,
    pub among: Option<&'a [usize]>,
    pub key: u64,
    pub method: &'a Method,
    pub bodiless: bool,
    pub head_request: bool,
    pub started: Instant,
}

/// How a request's tries ended.
pub(super) enum Decision {
    /// A response head to pass on, its connection, and that connection's pool.
    Answered(Raw, Response, Arc<Pool>),
    Refused(Refusal),
}

impl Tries<'_> {
    /// Sends the request (`scratch.up`) to the backends until one answers
    /// for good, within the retry policy and budget.
    pub(super) async fn run(&self, scratch: &mut Scratch, exchange: &mut Exchange) -> Decision {
        let http = &self.state.spec.http;
        let backends = self.backends;
        let retryable = self.bodiless && http.retry.attempts > 0 && is_idempotent(self.method);
        let deadline = self.started + http.request_timeout;
        let per_try = http.per_try_timeout.unwrap_or(http.request_timeout);
        let mut tried: Vec<usize> = Vec::new();
        let mut last = Refusal::NoHealthyBackend;
        loop {
            let index = match backends.pick_among(self.key, &tried, self.among) {
                Ok(index) => index,
                Err(NoBackend::NoneUp) => return Decision::Refused(Refusal::NoHealthyBackend),
                Err(NoBackend::Exhausted) => return Decision::Refused(last),
            };
            // The first try leaves when the request came in.
            let sent_at = if tried.is_empty() {
                self.started
            } else {
                Instant::now()
            };
            let remaining = deadline.saturating_duration_since(sent_at);
            if remaining.is_zero() {
                return Decision::Refused(Refusal::RequestTimeout);
            }
            let backend = &backends.backends()[index];
            backend.stats.active.fetch_add(1, Ordering::Relaxed);
            backend.stats.traffic().requests.increment(1);
            let on_backend = OnBackend(backend.stats.clone());
            let outcome = attempt(
                self.target,
                backends,
                index,
                scratch,
                self.head_request,
                self.bodiless && is_idempotent(self.method),
                per_try.min(remaining),
            )
            .await;
            tried.push(index);
            let may_retry = |exchange: &Exchange, tried: &[usize]| {
                exchange.retries < http.retry.attempts
                    && backends.pick_among(self.key, tried, self.among).is_ok()
            };
            match outcome {
                Outcome::Answered(raw, response) => {
                    let failed = response.status >= 500;
                    if failed {
                        record_failure(self.target, backends, index, &response.status.to_string());
                    } else {
                        backend.stats.record_success(sent_at.elapsed());
                    }
                    if http.retry.statuses.contains(&response.status)
                        && retryable
                        && may_retry(exchange, &tried)
                        && exchange.within_retry_budget()
                    {
                        // The answer nobody will see: its connection closes.
                        drop(raw);
                        exchange.count_retry();
                        super::backoff(http, exchange.retries, deadline).await;
                        continue;
                    }
                    exchange.status = response.status;
                    exchange.upstream = Some(backend.id.clone());
                    exchange._on_backend = Some(on_backend);
                    return Decision::Answered(raw, response, backend.stats.pool.clone());
                }
                Outcome::NotSent(refusal) => {
                    if refusal == Refusal::MaxPendingRequests {
                        return Decision::Refused(refusal);
                    }
                    record_failure(self.target, backends, index, refusal.reason());
                    last = refusal;
                    // It never reached a backend: safe to send elsewhere, whatever the method.
                    if may_retry(exchange, &tried) && exchange.within_retry_budget() {
                        exchange.count_retry();
                        continue;
                    }
                    return Decision::Refused(refusal);
                }
                Outcome::Failed(refusal) => {
                    record_failure(self.target, backends, index, refusal.reason());
                    last = refusal.as_reported(deadline);
                    if retryable && may_retry(exchange, &tried) && exchange.within_retry_budget() {
                        exchange.count_retry();
                        super::backoff(http, exchange.retries, deadline).await;
                        continue;
                    }
                    return Decision::Refused(last);
                }
            }
        }
    }
}

/// Sends a bodiless request that came through hyper (an HTTP/2 client's
/// with a body-less stream the direct path did not take, or one on a
/// connection handed to hyper) on the fast path's upstream connections:
/// the head written once as bytes (sent again as they are on a retry), no
/// hyper client, no connection task. The answer goes back to hyper, its
/// body as it comes ([`RawBody`]).
pub(super) async fn send_bodiless<B>(
    request: &hyper::Request<B>,
    tries: Tries<'_>,
    exchange: Exchange,
) -> hyper::Response<ResponseBody> {
    let mut up = Vec::with_capacity(512);
    request_line(
        &mut up,
        request.method().as_str(),
        request.uri().path_and_query().map_or("/", |path| path.as_str()),
    );
    match (
        request.headers().get(hyper::header::HOST),
        request.uri().authority(),
    ) {
        (Some(host), _) => header(&mut up, "host", host.as_bytes()),
        (None, Some(authority)) => header(&mut up, "host", authority.as_str().as_bytes()),
        (None, None) => header(&mut up, "host", tries.state.address.to_string().as_bytes()),
    }
    for (name, value) in request.headers() {
        if name != hyper::header::HOST {
            header(&mut up, name.as_str(), value.as_bytes());
        }
    }
    up.extend_from_slice(b"\r\n");
    let answer = exchange_bodiless(tries, up, exchange, |status, fields| {
        let mut response = hyper::Response::new(());
        *response.status_mut() =
            hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
        *response.headers_mut() = header_map(fields);
        // Unframed here: hyper frames a body again for its client.
        response.headers_mut().remove(hyper::header::TRANSFER_ENCODING);
        response
    })
    .await;
    match answer {
        Bodiless::Answered(head, body) => head.map(|()| body),
        Bodiless::Refused(response) => response,
    }
}

/// How a bodiless request sent on the fast path's connections ended.
pub(super) enum Bodiless<H> {
    /// What the caller made of the backend's response head, and its body.
    Answered(H, ResponseBody),
    /// The proxy's own answer.
    Refused(hyper::Response<ResponseBody>),
}

/// Sends a bodiless request (its head `up`, ready to go) to the backends
/// within the retry policy; the response head's status and fields go to
/// `head` (hop-by-hop ones already left out), its body comes unframed.
pub(super) async fn exchange_bodiless<H>(
    tries: Tries<'_>,
    up: Vec<u8>,
    mut exchange: Exchange,
    head: impl FnOnce(u16, &[httparse::Header<'_>]) -> H,
) -> Bodiless<H> {
    let mut scratch = Scratch {
        up,
        down: Vec::with_capacity(512),
        forwarded_for: Vec::new(),
        forwarded: Vec::new(),
    };
    match tries.run(&mut scratch, &mut exchange).await {
        Decision::Answered(raw, response, pool) => {
            let idle_timeout = tries.state.spec.http.pool_idle_timeout;
            scratch.down.extend_from_slice(b"\r\n");
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut fields);
            let _ = parsed.parse(&scratch.down);
            let head = head(response.status, parsed.headers);
            let body = RawBody::new(raw, &response, pool, idle_timeout);
            Bodiless::Answered(head, ResponseBody::raw(body, Box::new(exchange)))
        }
        Decision::Refused(refusal) => Bodiless::Refused(super::refuse(refusal, Some(exchange))),
    }
}

/// A response body read from a fast-path upstream connection, for hyper to
/// send on: the data without its HTTP/1.1 framing, then its trailers. The
/// connection goes back to its pool when the body was read to its end.
pub(super) struct RawBody {
    raw: Option<Raw>,
    end: End,
    pool: Arc<Pool>,
    idle_timeout: Duration,
    keep_alive: bool,
}

impl RawBody {
    fn new(raw: Raw, response: &Response, pool: Arc<Pool>, idle_timeout: Duration) -> RawBody {
        let mut body = RawBody {
            raw: Some(raw),
            end: End::new(response.framing, true),
            pool,
            idle_timeout,
            keep_alive: response.keep_alive,
        };
        if matches!(body.end, End::Length(0)) {
            body.finish();
        }
        body
    }

    /// Whether the body has ended.
    pub fn is_end_stream(&self) -> bool {
        self.raw.is_none()
    }

    /// Bytes still to come, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match (&self.raw, &self.end) {
            (None, _) => Some(0),
            (Some(_), End::Length(left)) => Some(*left),
            _ => None,
        }
    }

    /// The body has ended: its connection goes back to its pool if it can
    /// carry another request.
    fn finish(&mut self) {
        if let Some(raw) = self.raw.take() {
            if self.keep_alive && raw.buf.is_empty() {
                self.pool.give_back_raw(raw, self.idle_timeout);
            }
        }
    }

    pub fn poll_frame(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::io::Result<hyper::body::Frame<bytes::Bytes>>>> {
        use hyper::body::Frame;
        use std::task::Poll;
        loop {
            let Some(raw) = self.raw.as_mut() else {
                return Poll::Ready(None);
            };
            if !raw.buf.is_empty() {
                let (frame, ended) = match &mut self.end {
                    End::Length(left) => {
                        let take = (*left).min(raw.buf.len() as u64);
                        *left -= take;
                        (
                            Some(Frame::data(raw.buf.split_to(take as usize).freeze())),
                            *left == 0,
                        )
                    }
                    End::Close => (Some(Frame::data(raw.buf.split().freeze())), false),
                    End::Chunked(chunked) => {
                        let Ok(step) = chunked.step(&raw.buf) else {
                            self.keep_alive = false;
                            self.finish();
                            return Poll::Ready(Some(Err(std::io::ErrorKind::InvalidData.into())));
                        };
                        let passed = raw.buf.split_to(step.consumed).freeze();
                        match step.data {
                            Some(data) if !data.is_empty() => (Some(Frame::data(passed.slice(data))), false),
                            _ if step.end => (chunked.trailers().map(Frame::trailers), true),
                            _ => (None, false),
                        }
                    }
                };
                if ended {
                    self.finish();
                }
                match frame {
                    Some(frame) => return Poll::Ready(Some(Ok(frame))),
                    None if ended => return Poll::Ready(None),
                    None => continue,
                }
            }
            raw.buf.reserve(READ_CHUNK);
            let read = std::pin::pin!(raw.io.read_buf(&mut raw.buf)).poll(cx);
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(n)) if n > 0 => {}
                Poll::Ready(result) => {
                    // The end of the connection: of a close-delimited body, or too early.
                    self.keep_alive = false;
                    self.finish();
                    if matches!(self.end, End::Close) {
                        return Poll::Ready(None);
                    }
                    let err = result
                        .err()
                        .unwrap_or_else(|| std::io::ErrorKind::UnexpectedEof.into());
                    return Poll::Ready(Some(Err(err)));
                }
            }
        }
    }
}

/// How a response's body ends (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    /// At the end of the connection.
    Close,
}

/// A response head read from a backend (rewritten for the client into a
/// buffer of its own, without the final blank line: `Connection: close`
/// may still be added).
pub(super) struct Response {
    status: u16,
    framing: Framing,
    /// Whether the backend keeps the connection open after it.
    keep_alive: bool,
}

/// How one attempt went.
enum Outcome {
    Answered(Raw, Response),
    /// Never reached the backend.
    NotSent(Refusal),
    Failed(Refusal),
}

/// Sends the request (`scratch.up`) to backend `index` and reads its
/// response head (rewritten into `scratch.down`), within
/// `limit`. A pooled connection the backend closed before answering (the
/// keep-alive race) is replaced by a new one for a request that can be
/// sent twice (`replayable`).
async fn attempt(
    state: &ServiceState,
    backends: &BackendSet,
    index: usize,
    scratch: &mut Scratch,
    head_request: bool,
    replayable: bool,
    limit: Duration,
) -> Outcome {
    let http = &state.spec.http;
    let backend = &backends.backends()[index];
    let connect = move || super::dial(state, backend);
    let want = Want {
        protocol: UpstreamProtocol::Http1,
        max_connections: http.max_connections_per_backend,
        idle_timeout: http.pool_idle_timeout,
        upgrade: false,
        connect: &connect,
        gauge: &state.shared.http_metrics().upstream_connections,
    };
    let pool = &backend.stats.pool;
    let (bytes, head) = (&scratch.up, &mut scratch.down);
    let exchange = async {
        let mut stale = 0;
        loop {
            let pending = &state.shared.pending;
            let (counted, waiting) = crate::proxy::Held::count(pending);
            if http
                .max_pending_requests
                .is_some_and(|max| waiting > u64::from(max))
            {
                return Outcome::NotSent(Refusal::MaxPendingRequests);
            }
            let raw = pool.checkout_raw(&want).await;
            drop(counted);
            let Ok(mut raw) = raw else {
                return Outcome::NotSent(Refusal::ConnectFailed);
            };
            if raw.io.write_all(bytes).await.is_err() {
                if raw.reused && stale < STALE_RETRIES {
                    stale += 1;
                    continue;
                }
                return Outcome::Failed(Refusal::UpstreamReset);
            }
            match read_response(&mut raw, head, head_request).await {
                Ok(response) => return Outcome::Answered(raw, response),
                Err(Nothing) if raw.reused && replayable && stale < STALE_RETRIES => stale += 1,
                Err(_) => return Outcome::Failed(Refusal::UpstreamReset),
            }
        }
    };
    match tokio::time::timeout(limit, exchange).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Failed(Refusal::PerTryTimeout),
    }
}

/// Why no response head was read.
#[derive(Debug, PartialEq, Eq)]
enum BadResponse {
    /// The connection ended before any byte of a response.
    Nothing,
    /// It ended part way, or what came is not HTTP/1.x.
    Broken,
}
use BadResponse::Nothing;

/// Reads a response head into `raw.buf` (skipping interim 1xx responses)
/// and rewrites it for the client; `raw.buf` keeps what follows the head.
async fn read_response(
    raw: &mut Raw,
    head: &mut Vec<u8>,
    head_request: bool,
) -> Result<Response, BadResponse> {
    let mut any = false;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        match parsed.parse(&raw.buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = parsed.code.unwrap_or(0);
                if (100..200).contains(&status) {
                    if status == 101 {
                        return Err(BadResponse::Broken);
                    }
                    raw.buf.advance(len);
                    continue;
                }
                let response = rewrite(&parsed, head, head_request).ok_or(BadResponse::Broken)?;
                raw.buf.advance(len);
                return Ok(response);
            }
            Ok(httparse::Status::Partial) if raw.buf.len() < MAX_RESPONSE_HEAD => {}
            _ => return Err(BadResponse::Broken),
        }
        raw.buf.reserve(READ_CHUNK);
        match raw.io.read_buf(&mut raw.buf).await {
            Ok(n) if n > 0 => any = true,
            _ if any || !raw.buf.is_empty() => return Err(BadResponse::Broken),
            _ => return Err(Nothing),
        }
    }
}

/// The client's copy of a response head, and how its body ends; `None`
/// for a head that cannot be relayed (conflicting lengths).
fn rewrite(parsed: &httparse::Response<'_, '_>, head: &mut Vec<u8>, head_request: bool) -> Option<Response> {
    let status = parsed.code?;
    let mut connection: Vec<&[u8]> = Vec::new();
    let mut keep_alive = parsed.version == Some(1);
    let (mut length, mut chunked, mut encoded) = (None, false, false);
    let mut kinds = [Known::Other; MAX_HEADERS];
    for (h, kind) in parsed.headers.iter().zip(kinds.iter_mut()) {
        *kind = Known::of(h.name);
        match *kind {
            Known::Connection => {
                for token in tokens(h.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    }
                    connection.push(token);
                }
            }
            Known::ContentLength => {
                let len = content_length(h.value)?;
                if length.is_some_and(|seen| seen != len) {
                    return None;
                }
                length = Some(len);
            }
            Known::TransferEncoding => {
                encoded = true;
                chunked = tokens(h.value)
                    .last()
                    .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
            }
            _ => {}
        }
    }
    let framing = if head_request || status == 204 || status == 304 {
        Framing::Length(0)
    } else if encoded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        length.map_or(Framing::Close, Framing::Length)
    };
    if !(100..1000).contains(&status) {
        return None;
    }
    head.clear();
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend([100, 10, 1].map(|unit| b'0' + (status / unit % 10) as u8));
    head.push(b' ');
    head.extend_from_slice(parsed.reason.unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (h, kind) in parsed.headers.iter().zip(kinds) {
        let relayed = match kind {
            // A length beside a transfer coding is wrong and not what frames it.
            Known::ContentLength => !encoded,
            kind => !kind.hop_by_hop_in_response(),
        };
        if relayed && !named_by(&connection, h.name) {
            header(head, h.name, h.value);
        }
    }
    Some(Response {
        status,
        framing,
        keep_alive: keep_alive && framing != Framing::Close,
    })
}

/// Writes the response to the client and relays its body to its end; the
/// upstream connection goes back to its pool when it can carry another
/// request. Says whether the client connection may.
async fn relay(
    client: &mut TcpStream,
    mut raw: Raw,
    response: Response,
    out: &mut Vec<u8>,
    exchange: Exchange,
    close: bool,
    pool: &Arc<Pool>,
) -> bool {
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let mut end = End::new(response.framing, false);
    let mut sent = 0u64;
    let mut complete = false;
    let mut written = true;
    loop {
        let (take, done) = end.feed(&raw.buf);
        let Some(take) = take else { break };
        // The head goes out with the body bytes read with it, in one write;
        // later body bytes straight from the read buffer.
        let write = if out.is_empty() {
            client.write_all(&raw.buf[..take]).await
        } else {
            out.extend_from_slice(&raw.buf[..take]);
            let write = client.write_all(out).await;
            out.clear();
            write
        };
        raw.buf.advance(take);
        sent += take as u64;
        if write.is_err() {
            written = false;
            break;
        }
        if done {
            complete = true;
            break;
        }
        raw.buf.reserve(READ_CHUNK);
        match raw.io.read_buf(&mut raw.buf).await {
            Ok(n) if n > 0 => {}
            // The end of a close-delimited body; any other ends early.
            _ => {
                complete = response.framing == Framing::Close;
                break;
            }
        }
    }
    let idle_timeout = exchange.state.spec.http.pool_idle_timeout;
    if complete && response.keep_alive && raw.buf.is_empty() {
        pool.give_back_raw(raw, idle_timeout);
    }
    Box::new(exchange).finish(complete, sent);
    complete && written && !close
}

/// Where a response body ends in the bytes read of it: for the relay to
/// the client, and for [`RawBody`], which passes its data on unframed.
enum End {
    Length(u64),
    Chunked(Chunked),
    Close,
}

impl End {
    /// Where a body of `framing` ends; a chunked one's trailers are kept
    /// if `keep_trailers` (to pass them on as fields, not bytes).
    fn new(framing: Framing, keep_trailers: bool) -> End {
        match framing {
            Framing::Length(n) => End::Length(n),
            Framing::Chunked if keep_trailers => End::Chunked(Chunked::keeping_trailers()),
            Framing::Chunked => End::Chunked(Chunked::default()),
            Framing::Close => End::Close,
        }
    }

    /// How many of `bytes` belong to the body, and whether they end it;
    /// `None` for a body that cannot be framed (a broken chunk).
    fn feed(&mut self, bytes: &[u8]) -> (Option<usize>, bool) {
        match self {
            End::Length(left) => {
                let take = (*left).min(bytes.len() as u64);
                *left -= take;
                (Some(take as usize), *left == 0)
            }
            End::Chunked(chunked) => match chunked.feed(bytes) {
                Ok(Some(end)) => (Some(end), true),
                Ok(None) => (Some(bytes.len()), false),
                Err(()) => (None, false),
            },
            End::Close => (Some(bytes.len()), false),
        }
    }
}

/// Finds the end of a chunked body (RFC 9112 7.1) in bytes fed as they
/// come, and, stepping through it, its data and trailers.
#[derive(Default)]
struct Chunked {
    state: ChunkState,
    size: u64,
    /// The trailer section's lines, when they are kept ([`Chunked::keeping_trailers`]).
    trailers: Option<Vec<u8>>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    EndLf,
}

/// Largest trailer section kept.
const MAX_TRAILERS: usize = 16 * 1024;

/// One step through a chunked body.
#[derive(Debug, PartialEq, Eq)]
struct Step {
    /// Bytes of the input the step went through.
    consumed: usize,
    /// Where in them a run of chunk data is.
    data: Option<std::ops::Range<usize>>,
    /// Whether the body ended with them.
    end: bool,
}

impl Chunked {
    /// A decoder that keeps the trailer section, for [`Chunked::trailers`].
    fn keeping_trailers() -> Chunked {
        Chunked {
            trailers: Some(Vec::new()),
            ..Chunked::default()
        }
    }

    /// Feeds the next bytes: `Some(n)` when the body ends after the first
    /// `n` of them, an error for bytes that are not chunked framing.
    fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, ()> {
        let mut at = 0;
        while at < bytes.len() {
            let step = self.step(&bytes[at..])?;
            at += step.consumed;
            if step.end {
                return Ok(Some(at));
            }
        }
        Ok(None)
    }

    /// Goes through `bytes` up to the end of the next run of data, or the
    /// end of the body, or of `bytes`, whichever comes first.
    fn step(&mut self, bytes: &[u8]) -> Result<Step, ()> {
        let mut at = 0;
        while at < bytes.len() {
            let b = bytes[at];
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = (b as char).to_digit(16).ok_or(())? as u64;
                        self.size = self.size.checked_mul(16).ok_or(())? + digit;
                    }
                    b';' | b' ' | b'\t' => self.state = ChunkState::Extension,
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => self.sized(),
                    _ => return Err(()),
                },
                ChunkState::Extension => match b {
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => self.sized(),
                    _ => {}
                },
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.sized();
                }
                ChunkState::Data => {
                    let take = self.size.min((bytes.len() - at) as u64) as usize;
                    self.size -= take as u64;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    return Ok(Step {
                        consumed: at + take,
                        data: Some(at..at + take),
                        end: false,
                    });
                }
                ChunkState::DataCr => match b {
                    b'\r' => self.state = ChunkState::DataLf,
                    b'\n' => self.state = ChunkState::Size,
                    _ => return Err(()),
                },
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::TrailerStart => match b {
                    b'\r' => self.state = ChunkState::EndLf,
                    b'\n' => return Ok(Step::ended(at + 1)),
                    _ => {
                        self.keep(b)?;
                        self.state = ChunkState::TrailerLine;
                    }
                },
                ChunkState::TrailerLine => {
                    self.keep(b)?;
                    if b == b'\n' {
                        self.state = ChunkState::TrailerStart;
                    }
                }
                ChunkState::EndLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    return Ok(Step::ended(at + 1));
                }
            }
            at += 1;
        }
        Ok(Step {
            consumed: at,
            data: None,
            end: false,
        })
    }

    /// Keeps a byte of the trailer section, if trailers are kept.
    fn keep(&mut self, b: u8) -> Result<(), ()> {
        if let Some(trailers) = &mut self.trailers {
            if trailers.len() >= MAX_TRAILERS {
                return Err(());
            }
            trailers.push(b);
        }
        Ok(())
    }

    /// The trailer fields kept, once the body has ended (`None`: none).
    fn trailers(&self) -> Option<hyper::HeaderMap> {
        let mut section = self.trailers.clone().filter(|t| !t.is_empty())?;
        section.extend_from_slice(b"\r\n");
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let Ok(httparse::Status::Complete((_, fields))) = httparse::parse_headers(&section, &mut fields)
        else {
            return None;
        };
        Some(header_map(fields))
    }

    /// A chunk's size line has ended: its data, or the trailers of the last.
    fn sized(&mut self) {
        self.state = if self.size == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data
        };
    }
}

impl Step {
    fn ended(consumed: usize) -> Step {
        Step {
            consumed,
            data: None,
            end: true,
        }
    }
}

/// Header fields as hyper keeps them; fields hyper would refuse are left out.
fn header_map(fields: &[httparse::Header<'_>]) -> hyper::HeaderMap {
    let mut map = hyper::HeaderMap::with_capacity(fields.len());
    for field in fields {
        if let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(field.name.as_bytes()),
            hyper::header::HeaderValue::from_bytes(field.value),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// The proxy's own answer on the fast path. Says whether the client
/// connection may carry another request.
async fn refuse(
    client: &mut TcpStream,
    refusal: Refusal,
    mut exchange: Exchange,
    close: bool,
    drain: &drain::Probe,
) -> bool {
    let close = close || drain.is_signaled();
    exchange.status = refusal.status().as_u16();
    exchange.state.shared.http_metrics().refused[refusal as usize].increment(1);
    let reason = refusal.reason();
    let status = refusal.status();
    let mut out = Vec::with_capacity(200);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    header(&mut out, "content-type", b"text/plain");
    header(&mut out, super::ERROR_HEADER.as_str(), reason.as_bytes());
    header(
        &mut out,
        "content-length",
        (reason.len() + 1).to_string().as_bytes(),
    );
    if close {
        header(&mut out, "connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(reason.as_bytes());
    out.push(b'\n');
    let written = client.write_all(&out).await.is_ok();
    Box::new(exchange).finish(written, reason.len() as u64 + 1);
    written && !close
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end_of(chunks: &[&[u8]]) -> Result<Option<usize>, ()> {
        let mut chunked = Chunked::default();
        let mut offset = 0;
        for bytes in chunks {
            if let Some(end) = chunked.feed(bytes)? {
                return Ok(Some(offset + end));
            }
            offset += bytes.len();
        }
        Ok(None)
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers() {
        let body: &[u8] = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\nNEXT";
        assert_eq!(end_of(&[body]), Ok(Some(body.len() - 4)));
        let trailers: &[u8] = b"3\r\nabc\r\n0\r\nx-checksum: 1\r\nx-more: 2\r\n\r\n";
        assert_eq!(end_of(&[trailers]), Ok(Some(trailers.len())));
        // Byte by byte, as the network may hand it over.
        let bytes: Vec<&[u8]> = trailers.chunks(1).collect();
        assert_eq!(end_of(&bytes), Ok(Some(trailers.len())));
        assert_eq!(end_of(&[b"5\r\nhel"]), Ok(None));
        assert_eq!(end_of(&[b"zz\r\n"]), Err(()));
        assert_eq!(end_of(&[b"5\r\nhelloXX"]), Err(()));
        assert_eq!(end_of(&[b"ffffffffffffffffff\r\n"]), Err(()));
    }

    #[test]
    fn stepping_through_a_chunked_body_gives_its_data_and_trailers() {
        let body: &[u8] = b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-sum: 11\r\nx-more: 2\r\n\r\nNEXT";
        // Fed in pieces of 4 bytes, as reads may come.
        let mut chunked = Chunked::keeping_trailers();
        let (mut data, mut ended_at, mut offset) = (Vec::new(), None, 0);
        for piece in body.chunks(4) {
            let mut at = 0;
            while at < piece.len() && ended_at.is_none() {
                let step = chunked.step(&piece[at..]).unwrap();
                if let Some(range) = step.data {
                    data.extend_from_slice(&piece[at..][range]);
                }
                at += step.consumed;
                if step.end {
                    ended_at = Some(offset + at);
                }
            }
            offset += piece.len();
        }
        assert_eq!(data, b"hello world");
        assert_eq!(ended_at, Some(body.len() - 4));
        let trailers = chunked.trailers().unwrap();
        assert_eq!(
            (trailers["x-sum"].as_bytes(), trailers["x-more"].as_bytes()),
            (&b"11"[..], &b"2"[..])
        );
        // No trailer section: none kept.
        let mut plain = Chunked::keeping_trailers();
        assert_eq!(plain.feed(b"0\r\n\r\n"), Ok(Some(5)));
        assert!(plain.trailers().is_none());
    }

    #[test]
    fn a_content_length_is_digits_only() {
        assert_eq!(content_length(b" 42 "), Some(42));
        assert_eq!(content_length(b"0"), Some(0));
        for bad in [
            &b"+5"[..],
            b"-1",
            b"5, 5",
            b"",
            b"0x10",
            b"99999999999999999999999",
        ] {
            assert_eq!(content_length(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn header_names_are_recognised_whatever_their_case() {
        assert_eq!(Known::of("Content-Length"), Known::ContentLength);
        assert_eq!(Known::of("X-Forwarded-For"), Known::ForwardedFor);
        assert_eq!(Known::of("TRAILER"), Known::Trailer);
        assert_eq!(Known::of("proxy-authorization"), Known::HopByHop);
        assert_eq!(Known::of("content-type"), Known::Other);
        assert_eq!(Known::of("x-request-ids"), Known::Other);
        assert!(Known::Trailer.hop_by_hop_in_request() && !Known::Trailer.hop_by_hop_in_response());
        assert!(Known::TransferEncoding.hop_by_hop_in_request());
        assert!(!Known::TransferEncoding.hop_by_hop_in_response());
    }

    #[test]
    fn a_response_head_is_rewritten_with_its_framing() {
        let head = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 5\r\nX-Kept: 1\r\n\r\n";
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        parsed.parse(head).unwrap();
        let mut out = Vec::new();
        let response = rewrite(&parsed, &mut out, false).unwrap();
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Kept: 1\r\n"
        );
        assert_eq!(response.framing, Framing::Length(5));
        assert!(response.keep_alive);
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\nConnection: close\r\n\r\n";
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        parsed.parse(head).unwrap();
        let response = rewrite(&parsed, &mut out, false).unwrap();
        assert_eq!(response.framing, Framing::Chunked);
        assert!(!response.keep_alive);
        assert!(!String::from_utf8(out.clone()).unwrap().contains("Content-Length"));
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        parsed.parse(head).unwrap();
        assert!(rewrite(&parsed, &mut out, false).is_none());
    }
}
