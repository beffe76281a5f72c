//! L7: the HTTP proxy of `protocol: http` services.
//!
//! A client connection speaks HTTP/1.1 or HTTP/2 (prior knowledge, as
//! plaintext gRPC does), detected from its first bytes. Each request reads
//! the service's state afresh (a route or split change applies to the next
//! request, open connections untouched), is matched against the service's
//! routes, balanced over the chosen backends on its own, and sent on a
//! pooled upstream connection ([`pool`]). Failures are retried on another
//! backend within the retry policy and the service's retry budget
//! ([`budget`]); the proxy's own answers say why in `x-loopmesh-error`.
//! Bodies stream both ways ([`body`]); upgrades (WebSocket) become a plain
//! relay after the 101.
//!
//! The common HTTP/1.1 request takes a fast path without hyper ([`h1`]);
//! a connection that asks for anything else (an upgrade, a streamed
//! upload, HTTP/1.0) is handed to hyper. HTTP/2 clients are served by the
//! proxy's own HTTP/2 server ([`http2`]), whose bodiless requests to
//! HTTP/1.1 backends take the same raw upstream connections and the same
//! head writer as the HTTP/1.1 fast path; other requests go through
//! [`handle`] and hyper's clients.
//!
//! At a drain, HTTP/2 clients get a GOAWAY and HTTP/1.1 ones a
//! `Connection: close` on their next response; requests in flight finish,
//! up to the deadline.

pub mod access_log;
mod body;
mod budget;
mod h1;
mod http2;
mod identity;
pub mod pool;
pub mod route;

pub use budget::RetryBudget;

use super::balance::{hash_key, random, BackendSet, BackendStats, NoBackend};
use super::drain;
use super::service::{ServiceState, StateCell};
use crate::policy::{HashOn, HttpPolicy, UpstreamProtocol};
use body::{Finish, RequestBody, ResponseBody, UpstreamBody};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use identity::Identity;
use pool::{Checkout, ConnectError, Sender, Want};
use route::Target;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Time a client has to send a request's head once it has started one.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Pooled connections found closed by the backend that one attempt may
/// skip before it counts as a failure.
const STALE_RETRIES: u32 = 3;

/// Times one request is sent again to a backend that did not process it
/// (HTTP/2 GOAWAY or REFUSED_STREAM) before that counts as a failure.
const UNPROCESSED_RESENDS: u32 = 3;

/// The header that says why the proxy answered a request itself.
pub static ERROR_HEADER: HeaderName = HeaderName::from_static("x-loopmesh-error");

/// Serves one client connection until it closes, or until a drain: then
/// GOAWAY / `Connection: close`, the requests in flight finish, and the
/// deadline cuts what is left.
pub async fn serve(client: TcpStream, peer: SocketAddr, cell: Arc<StateCell>, mut drain: drain::Watch) {
    let state = cell.current();
    let shared = state.shared.clone();
    let metrics = shared.metrics();
    let (_held, open) = super::Held::count(&shared.active);
    if state
        .spec
        .max_connections
        .is_some_and(|max| open > u64::from(max))
    {
        metrics.refused_max_connections.increment(1);
        return;
    }
    drop(state);
    metrics.connections.increment(1);
    let conn = Arc::new(Client { cell, peer });
    let Some(handover) = h1::serve(client, &conn, &mut drain).await else {
        return;
    };
    let preface = &http2::PREFACE[..handover.read.len().min(http2::PREFACE.len())];
    if !preface.is_empty() && handover.read.starts_with(preface) {
        return http2::serve(handover.client, handover.read, conn, &mut drain).await;
    }
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let conn = conn.clone();
        // Boxed: hyper moves each request's future, and a pointer moves
        // cheaper than `handle`'s whole state machine.
        Box::pin(async move { Ok::<_, Infallible>(handle(request.map(RequestBody::Hyper), &conn).await) })
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(handover), service);
    tokio::pin!(connection);
    let finished = tokio::select! {
        _ = connection.as_mut() => true,
        () = drain.signaled() => false,
    };
    if !finished {
        connection.as_mut().graceful_shutdown();
        tokio::select! {
            _ = connection => {}
            () = drain.forced() => metrics.drain_kills.increment(1),
        }
    }
}

/// One client connection, as its requests see it.
struct Client {
    cell: Arc<StateCell>,
    peer: SocketAddr,
}

/// Removes the hop-by-hop headers, and those `Connection` names; an upgrade
/// keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // The common case, and HTTP/2's always (it forbids them but `TE:
    // trailers`): none there, found in one pass over the names without
    // hashing any.
    let hop_by_hop = |name: &HeaderName| h1::Known::of(name.as_str()).hop_by_hop_in_request();
    if !headers.keys().any(hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(upgrade && name == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    // `TE: trailers` is the one TE value HTTP/2 allows, and gRPC servers
    // insist on it: kept, alone.
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("trailers"));
    // `Upgrade` is decided below.
    let listed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| hop_by_hop(name) && *name != header::UPGRADE)
        .cloned()
        .collect();
    for name in listed {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Whether an HTTP/1.1 request asks to switch protocols (WebSocket).
fn wants_upgrade<B>(request: &Request<B>) -> bool {
    request.version() <= Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Methods a retry cannot make happen twice (RFC 9110, 9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The value of cookie `name` in one `Cookie` header's value.
fn cookie<'a>(value: &'a [u8], name: &str) -> Option<&'a [u8]> {
    value
        .split(|&b| b == b';')
        .map(<[u8]>::trim_ascii)
        .filter_map(|pair| {
            let at = pair.iter().position(|&b| b == b'=')?;
            Some((&pair[..at], &pair[at + 1..]))
        })
        .find(|(key, _)| *key == name.as_bytes())
        .map(|(_, value)| value)
}

/// What consistent hashing keeps together for this request.
fn request_hash(policy: &HttpPolicy, request: &impl route::Head, client: SocketAddr) -> u64 {
    let mut keyed = None;
    match &policy.hash_on {
        Some(HashOn::Header(name)) => {
            request.any_header(name.as_str(), &mut |value| {
                keyed = Some(hash_key(value));
                true
            });
        }
        Some(HashOn::Cookie(name)) => {
            request.any_header("cookie", &mut |value| {
                keyed = cookie(value, name).map(hash_key);
                keyed.is_some()
            });
        }
        None => {}
    }
    keyed.unwrap_or_else(|| hash_key(&client.ip()))
}

/// Why the proxy answered a request itself, as the `x-loopmesh-error`
/// header and the metrics say it; in the order of [`Refusal`].
pub const REFUSALS: [&str; 8] = [
    "no_healthy_backend",
    "no_such_service",
    "max_requests",
    "max_pending_requests",
    "connect_failed",
    "upstream_reset",
    "request_timeout",
    "per_try_timeout",
];

/// Why the proxy answered a request itself: status and `x-loopmesh-error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    NoHealthyBackend,
    NoSuchService,
    MaxRequests,
    MaxPendingRequests,
    ConnectFailed,
    UpstreamReset,
    RequestTimeout,
    PerTryTimeout,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Refusal::NoHealthyBackend
            | Refusal::NoSuchService
            | Refusal::MaxRequests
            | Refusal::MaxPendingRequests => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::ConnectFailed | Refusal::UpstreamReset => StatusCode::BAD_GATEWAY,
            Refusal::RequestTimeout | Refusal::PerTryTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn reason(self) -> &'static str {
        REFUSALS[self as usize]
    }

    /// What a failed try is answered as: a per-try timeout that ran into
    /// the request's deadline is the request's timeout.
    fn as_reported(self, deadline: Instant) -> Refusal {
        if self == Refusal::PerTryTimeout && Instant::now() >= deadline {
            Refusal::RequestTimeout
        } else {
            self
        }
    }
}

/// A request in flight, counted in the service's `requests` until dropped.
struct InFlight(Arc<super::service::ServiceShared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request on a backend, counted in its `active` (least requests) until
/// its response ends.
struct OnBackend(Arc<BackendStats>);

impl Drop for OnBackend {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What only the access log needs: copied out of a request only when it
/// will be written.
struct Logged {
    path: Box<str>,
    identity: Identity,
}

/// How a request's exchange began.
enum Begun {
    Admitted(Exchange),
    /// To be refused (its exchange records that).
    OverMaxRequests(Exchange),
}

/// Everything recorded when a request's exchange ends.
struct Exchange {
    state: Arc<ServiceState>,
    started: Instant,
    method: Method,
    /// What the access log says of the request, when it is written.
    logged: Option<Logged>,
    status: u16,
    upstream: Option<Box<str>>,
    retries: u32,
    /// Request body bytes sent upstream (counted for the access log only).
    bytes_in: Option<Arc<AtomicU64>>,
    /// Returned to its pool when the response was read to the end.
    checkout: Option<Checkout>,
    _on_backend: Option<OnBackend>,
    _in_flight: InFlight,
}

impl Exchange {
    /// A request's exchange begins: counted in flight, and in the retry
    /// budget's requests, unless the service already has `max_requests`
    /// in flight.
    fn begin(state: &Arc<ServiceState>, method: Method, logged: Option<Logged>, started: Instant) -> Begun {
        let shared = &state.shared;
        let in_flight = shared.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let exchange = Exchange {
            state: state.clone(),
            started,
            method,
            logged,
            status: 0,
            upstream: None,
            retries: 0,
            bytes_in: None,
            checkout: None,
            _on_backend: None,
            _in_flight: InFlight(shared.clone()),
        };
        if state
            .spec
            .http
            .max_requests
            .is_some_and(|max| in_flight > u64::from(max))
        {
            return Begun::OverMaxRequests(exchange);
        }
        shared.retry_budget.request();
        Begun::Admitted(exchange)
    }

    /// Whether the retry budget of the request's service allows one more
    /// retry now (taking it if so).
    fn within_retry_budget(&self) -> bool {
        let retry = &self.state.spec.http.retry;
        self.state
            .shared
            .retry_budget
            .try_retry(retry.budget_percent, retry.min_per_second)
    }

    /// Counts a retry about to be made, on the request and in the metrics.
    fn count_retry(&mut self) {
        self.retries += 1;
        self.state.shared.http_metrics().retries.increment(1);
    }
}

impl Finish for Exchange {
    fn finish(self: Box<Self>, complete: bool, bytes_out: u64) {
        let http = &self.state.spec.http;
        if let Some(checkout) = self.checkout {
            if complete {
                checkout.give_back(http.pool_idle_timeout);
            }
        }
        let elapsed = self.started.elapsed();
        let metrics = self.state.shared.http_metrics();
        metrics.requests[usize::from(self.status / 100).clamp(1, 5) - 1].increment(1);
        metrics.duration.record(elapsed.as_secs_f64());
        if let Some(logged) = &self.logged {
            if let Some(log) = self.state.context.access_log() {
                log.write(access_log::Line {
                    service: self.state.name(),
                    method: self.method.as_str(),
                    path: &logged.path,
                    status: self.status,
                    duration: elapsed,
                    upstream: self.upstream.as_deref(),
                    bytes_in: self.bytes_in.as_ref().map_or(0, |n| n.load(Ordering::Relaxed)),
                    bytes_out,
                    complete,
                    retries: self.retries,
                    request_id: &logged.identity.request_id,
                    trace_id: &logged.identity.trace_id,
                });
            }
        }
    }
}

/// A request made ready to send upstream, and how to send it again.
struct Outgoing {
    request: Option<Request<UpstreamBody>>,
    /// The head of a request without a body, kept to make it again: for a
    /// retry, or for a stream an HTTP/2 backend did not process.
    replay: Option<(Method, Uri, Version, HeaderMap)>,
    /// Whether a failure after sending may be retried (idempotent, no body,
    /// retries allowed).
    retryable: bool,
}

impl Outgoing {
    fn take(&mut self) -> Option<Request<UpstreamBody>> {
        self.request.take().or_else(|| {
            let (method, uri, version, headers) = self.replay.clone()?;
            let mut request = Request::new(UpstreamBody::Empty);
            *request.method_mut() = method;
            *request.uri_mut() = uri;
            *request.version_mut() = version;
            *request.headers_mut() = headers;
            Some(request)
        })
    }
}

/// Shapes the request for the backends' protocol: origin-form with `Host`
/// for HTTP/1.1, absolute with `:authority` for HTTP/2.
fn fit_to_upstream(request: &mut Request<UpstreamBody>, protocol: UpstreamProtocol, service: SocketAddr) {
    if protocol == UpstreamProtocol::Http1 && request.headers().contains_key(header::HOST) {
        // Already what an HTTP/1.1 backend wants but for the target's form.
        if request.uri().authority().is_some() || request.uri().path_and_query().is_none() {
            let path = request
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *request.uri_mut() = Uri::from(path);
        }
        *request.version_mut() = Version::HTTP_11;
        return;
    }
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.parse::<Authority>().ok())
        .or_else(|| request.uri().authority().cloned())
        .unwrap_or_else(|| {
            Authority::try_from(service.to_string().as_str()).expect("an address is an authority")
        });
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    match protocol {
        UpstreamProtocol::Http1 => {
            if !request.headers().contains_key(header::HOST) {
                if let Ok(value) = HeaderValue::from_str(host.as_str()) {
                    request.headers_mut().insert(header::HOST, value);
                }
            }
            *request.uri_mut() = Uri::from(path);
            *request.version_mut() = Version::HTTP_11;
        }
        UpstreamProtocol::Http2 => {
            let mut parts = hyper::http::uri::Parts::default();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(host);
            parts.path_and_query = Some(path);
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
            request.headers_mut().remove(header::HOST);
            *request.version_mut() = Version::HTTP_2;
        }
    }
}

/// The proxy's own answer.
fn refuse(refusal: Refusal, exchange: Option<Exchange>) -> Response<ResponseBody> {
    let finish = exchange.map(|mut exchange| {
        exchange.status = refusal.status().as_u16();
        let metrics = exchange.state.shared.http_metrics();
        metrics.refused[refusal as usize].increment(1);
        Box::new(exchange) as Box<dyn Finish>
    });
    let mut response = Response::new(ResponseBody::local(format!("{}\n", refusal.reason()), finish));
    *response.status_mut() = refusal.status();
    let headers = response.headers_mut();
    headers.insert(ERROR_HEADER.clone(), HeaderValue::from_static(refusal.reason()));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// How one attempt went.
enum Attempt {
    Answered(Response<Incoming>, Checkout),
    /// Never reached the backend: the request comes back to be sent elsewhere.
    NotSent(Option<Request<UpstreamBody>>, Refusal),
    Failed(Refusal),
}

/// Whether an upstream HTTP/2 stream failed before the backend processed
/// it (RFC 9113 §8.7): beyond the last stream of a graceful GOAWAY (as
/// nginx sends after `keepalive_requests`), or reset with REFUSED_STREAM.
/// A GOAWAY carrying an error is left out: when the connection then closes,
/// the streams it may have processed fail with that same error.
fn never_processed(err: &hyper::Error) -> bool {
    let Some(h2) = std::error::Error::source(err).and_then(|source| source.downcast_ref::<h2::Error>())
    else {
        return false;
    };
    h2.is_remote()
        && match h2.reason() {
            Some(h2::Reason::NO_ERROR) => h2.is_go_away(),
            Some(h2::Reason::REFUSED_STREAM) => h2.is_reset(),
            _ => false,
        }
}

/// Dials `backend` of `state`'s service for its pool.
fn dial<'a>(state: &'a ServiceState, backend: &'a super::balance::Backend) -> pool::ConnectFuture<'a> {
    Box::pin(async move {
        match super::connect::dial(state, backend).await {
            Ok(upstream) => Ok(upstream),
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => Err(ConnectError::Timeout),
            Err(_) => Err(ConnectError::Refused),
        }
    })
}

/// Sends `request` to `backend` within `limit`. A stream the backend did
/// not process (GOAWAY, REFUSED_STREAM) is not its failure: the request,
/// made again from `outgoing` if it can be, goes to the same backend on a
/// new connection, a few times at most.
async fn attempt(
    state: &ServiceState,
    backends: &BackendSet,
    index: usize,
    request: Request<UpstreamBody>,
    outgoing: &mut Outgoing,
    upgrade: bool,
    limit: Duration,
) -> Attempt {
    let http = &state.spec.http;
    let backend = &backends.backends()[index];
    let connect = move || dial(state, backend);
    let want = Want {
        protocol: http.upstream_protocol,
        max_connections: http.max_connections_per_backend,
        idle_timeout: http.pool_idle_timeout,
        upgrade,
        connect: &connect,
        gauge: &state.shared.http_metrics().upstream_connections,
    };
    let pool = backend.stats.pool.clone();
    let exchange = async move {
        let pending = &state.shared.pending;
        let mut request = request;
        let mut stale = 0;
        let mut unprocessed = 0;
        loop {
            // Pending while it waits for a connection (a free slot, a dial).
            let (counted, waiting) = super::Held::count(pending);
            if http
                .max_pending_requests
                .is_some_and(|max| waiting > u64::from(max))
            {
                return Attempt::NotSent(Some(request), Refusal::MaxPendingRequests);
            }
            let checkout = pool.checkout(&want).await;
            drop(counted);
            let Ok(mut checkout) = checkout else {
                return Attempt::NotSent(Some(request), Refusal::ConnectFailed);
            };
            let sent = match &mut checkout.sender {
                Sender::Http1(sender) => sender.try_send_request(request).await,
                Sender::Http2(sender) => sender.try_send_request(request).await,
            };
            match sent {
                Ok(response) => return Attempt::Answered(response, checkout),
                Err(mut err) => match err.take_message() {
                    // A pooled connection the backend closed meanwhile (the
                    // keep-alive race): not the backend's fault, and the
                    // request never left; another connection to the same
                    // backend, a few times at most.
                    Some(unsent) if checkout.reused && stale < STALE_RETRIES => {
                        stale += 1;
                        request = unsent;
                    }
                    Some(unsent) => return Attempt::NotSent(Some(unsent), Refusal::UpstreamReset),
                    None if unprocessed < UNPROCESSED_RESENDS && never_processed(err.error()) => {
                        checkout.retire();
                        let Some(again) = outgoing.take() else {
                            return Attempt::Failed(Refusal::UpstreamReset);
                        };
                        unprocessed += 1;
                        request = again;
                    }
                    None => return Attempt::Failed(Refusal::UpstreamReset),
                },
            }
        }
    };
    match tokio::time::timeout(limit, exchange).await {
        Ok(attempt) => attempt,
        Err(_) => Attempt::Failed(Refusal::PerTryTimeout),
    }
}

/// Says once when a backend is ejected for repeated failures.
fn record_failure(state: &ServiceState, backends: &BackendSet, index: usize, why: &str) {
    if backends.record_failure(index) {
        let backend = &backends.backends()[index];
        tracing::warn!(
            "service {}: backend {} ejected after repeated failures ({why})",
            state.name(),
            backend.id
        );
    }
}

/// Proxies one request: route, balance, send, retry, answer.
async fn handle(mut request: Request<RequestBody>, client: &Client) -> Response<ResponseBody> {
    let started = Instant::now();
    let state = client.cell.current();
    let http = &state.spec.http;
    let upgrade = wants_upgrade(&request);
    let headers = request.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    let logging = http.access_log || state.context.access_log_all;
    let identity = identity::stamp(headers, client.peer.ip(), logging);
    let logged = identity.map(|identity| Logged {
        path: request.uri().path().into(),
        identity,
    });
    let bytes_in = logging.then(|| Arc::new(AtomicU64::new(0)));
    let mut exchange = match Exchange::begin(&state, request.method().clone(), logged, started) {
        Begun::Admitted(exchange) => exchange,
        Begun::OverMaxRequests(exchange) => return refuse(Refusal::MaxRequests, Some(exchange)),
    };
    exchange.bytes_in = bytes_in.clone();
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    // Where it goes: this service's backends (all, or a tagged subset), or
    // another service's.
    let routes = state.routes();
    let (target, among) = match routes.map(|routes| routes.choose(&request)) {
        Some(Target::Service(name)) => match state.context.directory.find(name) {
            Some(other) => (other, None),
            None => return refuse(Refusal::NoSuchService, Some(exchange)),
        },
        Some(Target::Backends(among)) => (state.clone(), among.as_deref()),
        None => (state.clone(), None),
    };
    let Ok(backends) = target.backends() else {
        return refuse(Refusal::NoHealthyBackend, Some(exchange));
    };
    let key = request_hash(http, &request, client.peer);
    let bodiless = !upgrade && request.body().is_end_stream();
    let retryable = bodiless && http.retry.attempts > 0 && is_idempotent(request.method());
    // An HTTP/2 backend may refuse a stream it never processed (GOAWAY):
    // any bodiless request can then be made again.
    let replayable = retryable || (bodiless && http.upstream_protocol == UpstreamProtocol::Http2);
    if bodiless
        && !upgrade
        && http.upstream_protocol == UpstreamProtocol::Http1
        && target.spec.http.upstream_protocol == UpstreamProtocol::Http1
    {
        let tries = h1::Tries {
            state: &state,
            target: &target,
            backends,
            among,
            key,
            method: request.method(),
            bodiless,
            head_request: request.method() == Method::HEAD,
            started,
        };
        return h1::send_bodiless(&request, tries, exchange).await;
    }
    let (parts, body) = request.into_parts();
    let mut upstream = Request::from_parts(
        parts,
        UpstreamBody::Streamed {
            inner: body,
            counted: bytes_in,
        },
    );
    fit_to_upstream(
        &mut upstream,
        if upgrade {
            UpstreamProtocol::Http1
        } else {
            http.upstream_protocol
        },
        state.address,
    );
    let replay = replayable.then(|| {
        (
            upstream.method().clone(),
            upstream.uri().clone(),
            upstream.version(),
            upstream.headers().clone(),
        )
    });
    let mut outgoing = Outgoing {
        request: Some(upstream),
        replay,
        retryable,
    };
    let deadline = started + http.request_timeout;
    let per_try = http.per_try_timeout.unwrap_or(http.request_timeout);
    let mut tried: Vec<usize> = Vec::new();
    let mut last = Refusal::NoHealthyBackend;
    loop {
        let index = match backends.pick_among(key, &tried, among) {
            Ok(index) => index,
            Err(NoBackend::NoneUp) => return refuse(Refusal::NoHealthyBackend, Some(exchange)),
            Err(NoBackend::Exhausted) => return refuse(last, Some(exchange)),
        };
        let Some(request) = outgoing.take() else {
            return refuse(last, Some(exchange));
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return refuse(Refusal::RequestTimeout, Some(exchange));
        }
        let backend = &backends.backends()[index];
        backend.stats.active.fetch_add(1, Ordering::Relaxed);
        backend.stats.traffic().requests.increment(1);
        let on_backend = OnBackend(backend.stats.clone());
        let sent_at = Instant::now();
        let outcome = attempt(
            &target,
            backends,
            index,
            request,
            &mut outgoing,
            upgrade,
            per_try.min(remaining),
        )
        .await;
        tried.push(index);
        let retry_statuses = &http.retry.statuses;
        // A retry needs attempts left and another backend to send to; only
        // then is it taken from the budget and counted.
        let may_retry = |exchange: &Exchange, tried: &[usize]| {
            exchange.retries < http.retry.attempts && backends.pick_among(key, tried, among).is_ok()
        };
        match outcome {
            Attempt::Answered(response, checkout) => {
                let status = response.status();
                let failed = status.is_server_error();
                if failed {
                    record_failure(&target, backends, index, status.as_str());
                } else {
                    backend.stats.record_success(sent_at.elapsed());
                }
                if retry_statuses.contains(&status.as_u16())
                    && outgoing.retryable
                    && may_retry(&exchange, &tried)
                    && exchange.within_retry_budget()
                {
                    // Read to the end in the background, so the connection goes back to its pool.
                    drain_response(response, checkout, http.pool_idle_timeout);
                    exchange.count_retry();
                    backoff(http, exchange.retries, deadline).await;
                    continue;
                }
                exchange.status = status.as_u16();
                exchange.upstream = Some(backend.id.clone());
                exchange._on_backend = Some(on_backend);
                return answer(response, checkout, exchange, client_upgrade);
            }
            Attempt::NotSent(request, refusal) => {
                if refusal == Refusal::MaxPendingRequests {
                    return refuse(refusal, Some(exchange));
                }
                record_failure(&target, backends, index, refusal.reason());
                last = refusal;
                outgoing.request = request;
                // It never reached a backend: safe to send elsewhere, whatever the method.
                if may_retry(&exchange, &tried) && exchange.within_retry_budget() {
                    exchange.count_retry();
                    continue;
                }
                return refuse(refusal, Some(exchange));
            }
            Attempt::Failed(refusal) => {
                record_failure(&target, backends, index, refusal.reason());
                last = refusal.as_reported(deadline);
                if outgoing.retryable && may_retry(&exchange, &tried) && exchange.within_retry_budget() {
                    exchange.count_retry();
                    backoff(http, exchange.retries, deadline).await;
                    continue;
                }
                return refuse(last, Some(exchange));
            }
        }
    }
}

/// Waits before retry number `retry`: the policy's backoff doubled per
/// retry, with full jitter, never past the deadline.
async fn backoff(http: &HttpPolicy, retry: u32, deadline: Instant) {
    let base = http
        .retry
        .backoff
        .saturating_mul(1 << retry.saturating_sub(1).min(10));
    if base.is_zero() {
        return;
    }
    let jittered = Duration::from_nanos(random() % (base.as_nanos() as u64).max(1));
    tokio::time::sleep_until(
        tokio::time::Instant::from_std(deadline).min(tokio::time::Instant::now() + jittered),
    )
    .await;
}

/// Reads a response nobody will see to its end, so its connection can be
/// reused, or drops it if that takes long.
fn drain_response(response: Response<Incoming>, checkout: Checkout, idle_timeout: Duration) {
    use http_body_util::BodyExt;
    tokio::spawn(async move {
        let read = tokio::time::timeout(Duration::from_secs(1), response.into_body().collect()).await;
        if matches!(read, Ok(Ok(_))) {
            checkout.give_back(idle_timeout);
        }
    });
}

/// The backend's response, on its way to the client: hop-by-hop headers
/// removed, the body streamed; a 101 turns the two connections into a relay.
fn answer(
    mut response: Response<Incoming>,
    checkout: Checkout,
    mut exchange: Exchange,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<ResponseBody> {
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(response.headers_mut(), switching);
    if switching {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await) else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(upstream))
                    .await;
                drop(checkout);
            });
            let (parts, body) = response.into_parts();
            return Response::from_parts(parts, ResponseBody::upstream(body, Box::new(exchange)));
        }
    }
    exchange.checkout = Some(checkout);
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, ResponseBody::upstream(body, Box::new(exchange)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use route::Head;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn a_cookie_is_found_among_several_headers_and_pairs() {
        let mut request = Request::new(());
        *request.headers_mut() = headers(&[("cookie", "a=1; session=abc"), ("cookie", "b=2")]);
        let found = |name: &str| {
            let mut found = None;
            request.any_header("cookie", &mut |value| {
                found = cookie(value, name).map(<[u8]>::to_vec);
                found.is_some()
            });
            found
        };
        assert_eq!(found("session").as_deref(), Some(&b"abc"[..]));
        assert_eq!(found("b").as_deref(), Some(&b"2"[..]));
        assert_eq!(found("sess"), None);
    }

    #[test]
    fn requests_hash_on_the_named_cookie_or_else_the_client() {
        let mut policy = HttpPolicy {
            hash_on: Some(HashOn::Cookie("session".into())),
            ..HttpPolicy::default()
        };
        let (one, two): (SocketAddr, SocketAddr) =
            ("127.0.0.1:1".parse().unwrap(), "127.0.0.2:1".parse().unwrap());
        let mut with = Request::new(());
        *with.headers_mut() = headers(&[("cookie", "session=abc")]);
        assert_eq!(
            request_hash(&policy, &with, one),
            request_hash(&policy, &with, two)
        );
        let without = Request::new(());
        assert_ne!(
            request_hash(&policy, &without, one),
            request_hash(&policy, &without, two)
        );
        policy.hash_on = None;
        assert_ne!(
            request_hash(&policy, &with, one),
            request_hash(&policy, &with, two)
        );
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers, deflate"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(h["te"], "trailers");
        let mut upgrade = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut upgrade, true);
        assert_eq!(upgrade["connection"], "upgrade");
        assert_eq!(upgrade["upgrade"], "websocket");
    }
}
