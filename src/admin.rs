//! The admin HTTP server of the agent and the registrar, on a loopback
//! address: `/` (the endpoints, or a status page for a browser),
//! `/metrics` (Prometheus), `/live`, `/ready`, `/logging` (the log filter,
//! changed at run time as Envoy's `/logging` does) and JSON views of what
//! the process is doing (routes, catalog, rendered files, instances).
//!
//! Plain hyper HTTP/1.1; everything it shows is read when asked, from state
//! the daemon publishes (`Status`), so a scrape never waits on the daemon.

use crate::limits::{ConnectionBudget, ADMIN_CONNECTIONS};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
}

/// What a daemon shows through the admin API.
pub trait Status: Send + Sync + 'static {
    /// Whether it is ready, with a JSON body saying why (not).
    fn ready(&self) -> (bool, serde_json::Value);
    /// The JSON view at `path` (`/routes`, `/catalog`...), if there is one.
    fn view(&self, path: &str) -> Option<serde_json::Value>;
    /// The paths [`Status::view`] answers, each with what it shows, for
    /// the index.
    fn views(&self) -> &'static [(&'static str, &'static str)];
    /// Appends the series kept in the daemon's own state (per service,
    /// backend or instance) to `/metrics`.
    fn metrics(&self, _out: &mut crate::telemetry::Exposition<'_>) {}
}

/// The endpoints every daemon serves, with what they do, for the index.
const BUILT_IN: [(&str, &str); 5] = [
    ("/", "this list; for a browser (Accept: text/html), the status page"),
    ("/metrics", "Prometheus metrics"),
    ("/live", "200 while the process runs"),
    ("/ready", "200 once ready, else 503; the JSON body says why"),
    (
        "/logging",
        "the log filter; POST ?level=LEVEL, or a filter (RUST_LOG syntax) as the body, changes it (loopback peers only)",
    ),
];

/// The largest `/logging` body read: a filter is a line.
const LOGGING_BODY_LIMIT: usize = 4096;

/// Histogram buckets in seconds: 50 µs to 10 s, for connect, DNS, render
/// and check latencies alike.
pub const BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder behind the `metrics` facade (once per
/// process) and keeps its histograms trimmed.
pub fn install_recorder() -> Result<PrometheusHandle, AdminError> {
    if let Some(handle) = RECORDER.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(&BUCKETS)
        .map_err(|err| AdminError::Recorder(err.to_string()))?
        .install_recorder()
        .map_err(|err| AdminError::Recorder(err.to_string()))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(RECORDER.get_or_init(|| handle).clone())
}

/// How often a taken admin address is tried again.
const BIND_RETRY: Duration = Duration::from_secs(2);

/// How long a client may take to send a request's headers (and, between
/// requests on a kept-alive connection, to start the next): a client that
/// sends half a request is closed then instead of holding its descriptor.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the admin API on `addr` until the process ends (the registrar's
/// way; the agent keeps an [`AdminServer`] to hand its socket over).
pub async fn serve(addr: SocketAddr, metrics: PrometheusHandle, status: Arc<dyn Status>) {
    let (_never_stopped, watch) = crate::proxy::drain::channel();
    run(addr, None, metrics, status, watch, Arc::new(AtomicI32::new(-1))).await;
}

/// A running admin API whose listening socket can be handed to a successor.
pub struct AdminServer {
    stop: crate::proxy::drain::Trigger,
    task: tokio::task::JoinHandle<()>,
    /// The listening descriptor once bound (-1 before).
    fd: Arc<AtomicI32>,
}

impl AdminServer {
    /// Starts serving on `addr`, or on `inherited` (a predecessor's socket).
    pub fn start(
        addr: SocketAddr,
        inherited: Option<OwnedFd>,
        metrics: PrometheusHandle,
        status: Arc<dyn Status>,
    ) -> AdminServer {
        let (stop, watch) = crate::proxy::drain::channel();
        let fd = Arc::new(AtomicI32::new(-1));
        let inherited = inherited.map(std::net::TcpListener::from);
        let task = tokio::spawn(run(addr, inherited, metrics, status, watch, fd.clone()));
        AdminServer { stop, task, fd }
    }

    /// The listening descriptor, if bound.
    pub fn fd(&self) -> Option<RawFd> {
        Some(self.fd.load(Ordering::Acquire)).filter(|fd| *fd >= 0)
    }

    /// Stops accepting (the listener is closed in this process when this
    /// returns); requests in progress finish.
    pub async fn stop_accepting(self) {
        self.stop.signal();
        let _ = self.task.await;
    }
}

/// Binds (retrying a taken address, logged once) or adopts the listener,
/// then serves until `stop` is signaled. At most [`ADMIN_CONNECTIONS`] are
/// served at once (the admin's share of the descriptors,
/// [`crate::limits`]), each bound by [`HEADER_READ_TIMEOUT`]. The daemon
/// keeps doing its job without its admin API meanwhile.
async fn run(
    addr: SocketAddr,
    inherited: Option<std::net::TcpListener>,
    metrics: PrometheusHandle,
    status: Arc<dyn Status>,
    mut stop: crate::proxy::drain::Watch,
    fd: Arc<AtomicI32>,
) {
    let budget = ConnectionBudget::new("admin", ADMIN_CONNECTIONS);
    let mut logged = false;
    let mut inherited = inherited.filter(|listener| listener.set_nonblocking(true).is_ok());
    let listener = loop {
        let bound = match inherited.take() {
            Some(listener) => TcpListener::from_std(listener),
            None => TcpListener::bind(addr).await,
        };
        match bound {
            Ok(listener) => break listener,
            Err(err) => {
                if !logged {
                    tracing::error!(
                        "admin: cannot listen on {addr}: {err}; no /metrics or /ready until it is free (retried every {}s)",
                        BIND_RETRY.as_secs()
                    );
                    logged = true;
                }
                tokio::select! {
                    () = tokio::time::sleep(BIND_RETRY) => {}
                    () = stop.signaled() => return,
                }
            }
        }
    };
    fd.store(listener.as_raw_fd(), Ordering::Release);
    let paths: Vec<&str> = endpoints(status.as_ref()).iter().map(|(path, _)| *path).collect();
    tracing::info!("admin: listening on http://{addr} ({})", paths.join(" "));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.signaled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and the like: back off, do not spin.
                tracing::warn!("admin: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // With every slot taken this waits, and the listener accepts no
        // more until a connection ends.
        // A connection accepted is served, even if the stop comes while it
        // waits for a slot.
        let slot = tokio::select! {
            slot = budget.admit() => Some(slot),
            () = stop.signaled() => None,
        };
        let (metrics, status) = (metrics.clone(), status.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (metrics, status) = (metrics.clone(), status.clone());
                async move { Ok::<_, Infallible>(respond(request, peer, &metrics, status.as_ref()).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
    fd.store(-1, Ordering::Release);
}

/// Every endpoint of a daemon with what it does: the built-in ones, then
/// its views.
fn endpoints(status: &dyn Status) -> Vec<(&'static str, &'static str)> {
    let mut all = BUILT_IN.to_vec();
    all.extend_from_slice(status.views());
    all
}

async fn respond(
    request: Request<Incoming>,
    peer: SocketAddr,
    metrics: &PrometheusHandle,
    status: &dyn Status,
) -> Response<Full<Bytes>> {
    if request.uri().path() == "/logging" {
        return logging(request, peer).await;
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match request.uri().path() {
        "/" if accepts_html(&request) => {
            let mut response = text(
                StatusCode::OK,
                crate::status_page::render(status, &endpoints(status)),
            );
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            response
        }
        "/" => {
            let all = endpoints(status);
            let width = all.iter().map(|(path, _)| path.len()).max().unwrap_or(0);
            let index: String = all
                .iter()
                .map(|(path, what)| format!("{path:width$}  {what}\n"))
                .collect();
            text(StatusCode::OK, index)
        }
        "/metrics" => {
            let body = crate::telemetry::scrape(metrics, |out| status.metrics(out));
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/live" => text(StatusCode::OK, "ok\n".into()),
        "/ready" => {
            let (ready, body) = status.ready();
            let code = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(code, &body)
        }
        path => match status.view(path) {
            Some(body) => json(StatusCode::OK, &body),
            None => {
                let endpoints: Vec<&str> = endpoints(status).iter().map(|(path, _)| *path).collect();
                json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": format!("no endpoint {path}"), "endpoints": endpoints}),
                )
            }
        },
    }
}

/// Whether the client asked for HTML (a browser does; curl does not).
fn accepts_html(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .any(|value| value.to_str().is_ok_and(|v| v.contains("text/html")))
}

/// `/logging`: GET gives the filter in force; POST or PUT sets it from
/// `?level=LEVEL` or from the body (a filter in RUST_LOG syntax, or
/// `level=LEVEL`). Only from loopback: the admin address may be bound
/// wider for `/metrics`, but the log level is the node operator's. A bad
/// level or filter is refused (400, one line) and the old one stays.
async fn logging(request: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    if !peer.ip().to_canonical().is_loopback() {
        return text(
            StatusCode::FORBIDDEN,
            format!("/logging answers loopback peers only, not {}\n", peer.ip()),
        );
    }
    let answer = |result: Result<String, crate::logging::LoggingError>| match result {
        Ok(filter) => text(StatusCode::OK, format!("{filter}\n")),
        Err(err @ crate::logging::LoggingError::NotSetUp) => {
            text(StatusCode::SERVICE_UNAVAILABLE, format!("{err}\n"))
        }
        Err(err) => text(StatusCode::BAD_REQUEST, format!("{err}\n")),
    };
    match *request.method() {
        Method::GET | Method::HEAD => return answer(crate::logging::filter()),
        Method::POST | Method::PUT => {}
        _ => return text(StatusCode::METHOD_NOT_ALLOWED, "only GET, POST or PUT\n".into()),
    }
    let level = request
        .uri()
        .query()
        .into_iter()
        .flat_map(|query| query.split('&'))
        .find_map(|pair| pair.strip_prefix("level="))
        .map(String::from);
    let body = match Limited::new(request.into_body(), LOGGING_BODY_LIMIT)
        .collect()
        .await
    {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).trim().to_string(),
        Err(err) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "cannot read the filter (at most {LOGGING_BODY_LIMIT} bytes): {err}; the filter stays\n"
                ),
            )
        }
    };
    let before = crate::logging::filter().unwrap_or_default();
    let result = match (level, body.strip_prefix("level=")) {
        (Some(level), _) => crate::logging::set_level(&level),
        (None, Some(level)) => crate::logging::set_level(level.trim()),
        (None, None) if body.is_empty() => Err(crate::logging::LoggingError::Filter {
            filter: String::new(),
            reason: "give ?level=LEVEL or a filter as the body".to_string(),
            current: before.clone(),
        }),
        (None, None) => crate::logging::set_filter(&body),
    };
    if let Ok(now) = &result {
        // At warn, so the change is seen unless the new filter hides warnings.
        tracing::warn!("admin: log filter changed from {before:?} to {now:?} by {peer}");
    }
    answer(result)
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json(code: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_string_pretty(body).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
