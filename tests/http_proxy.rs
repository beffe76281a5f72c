//! L7: the agent (the real binary, static mode: route files written by the
//! test) serving `protocol: http` services to curl and a hyper client, in
//! front of hyper backends that say who they are and what they saw.

mod common;

use common::{eventually_async, unique_ip, Loopmesh};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// A hyper backend (HTTP/1.1 and HTTP/2) that answers with its id.
#[derive(Clone)]
struct Backend {
    id: String,
    addr: SocketAddr,
    /// Requests it answered, by method.
    hits: Arc<Mutex<HashMap<String, u64>>>,
    /// The status it answers with.
    status: Arc<AtomicU16>,
    /// `/slow` responses send their second half once this is notified.
    release: Arc<Notify>,
    /// `/slow` requests that have sent their first half.
    slow_started: Arc<AtomicU64>,
    /// Close each connection after its first response.
    one_request_per_connection: Arc<std::sync::atomic::AtomicBool>,
}

impl Backend {
    async fn start(id: &str) -> Backend {
        let listener = TcpListener::bind((unique_ip(), 0)).await.unwrap();
        let backend = Backend {
            id: id.to_string(),
            addr: listener.local_addr().unwrap(),
            hits: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
            release: Arc::default(),
            slow_started: Arc::default(),
            one_request_per_connection: Arc::default(),
        };
        let serving = backend.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let backend = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let backend = backend.clone();
                        async move { Ok::<_, Infallible>(backend.answer(request).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        backend
    }

    fn hits(&self, method: &str) -> u64 {
        self.hits.lock().unwrap().get(method).copied().unwrap_or(0)
    }

    fn forget_hits(&self) {
        self.hits.lock().unwrap().clear();
    }

    fn total_hits(&self) -> u64 {
        self.hits.lock().unwrap().values().sum()
    }

    async fn answer(
        &self,
        mut request: Request<Incoming>,
    ) -> Response<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
        *self
            .hits
            .lock()
            .unwrap()
            .entry(request.method().to_string())
            .or_default() += 1;
        let seen = |name: &str| {
            request
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap_or("").to_string())
                .unwrap_or_default()
        };
        let mut builder = Response::builder()
            .header("x-backend", &self.id)
            .header("x-seen-version", format!("{:?}", request.version()))
            .header("x-seen-host", seen("host"))
            .header("x-seen-request-id", seen("x-request-id"))
            .header("x-seen-traceparent", seen("traceparent"))
            .header("x-seen-tracestate", seen("tracestate"))
            .header("x-seen-forwarded-for", seen("x-forwarded-for"))
            .header("x-seen-forwarded", seen("forwarded"))
            .header("x-seen-connection", seen("connection"))
            .header("x-seen-cookie", seen("cookie"));
        if request.uri().path() == "/ws" {
            let upgraded = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgraded.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buffer).await {
                        if n == 0 || io.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            return builder
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "echo")
                .body(Full::new(Bytes::new()).boxed())
                .unwrap();
        }
        if request.uri().path() == "/grpc" {
            // A gRPC-like answer: data, then trailers.
            let te = seen("te");
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let frames = vec![
                hyper::body::Frame::data(Bytes::from("message")),
                hyper::body::Frame::trailers(trailers),
            ];
            return builder
                .header("x-seen-te", te)
                .body(BodyExt::boxed(FramesBody(frames.into())))
                .unwrap();
        }
        if request.uri().path() == "/echo" {
            // The request body back, whole.
            let body = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return builder.body(Full::new(body).boxed()).unwrap();
        }
        if request.uri().path() == "/hang-on-slow" && self.id == "slow" {
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        }
        if request.uri().path() == "/hang" {
            // A backend that takes longer than any timeout of these tests.
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        }
        if request.uri().path() == "/slow" {
            // Half now, half once released: a request in flight.
            let (sender, body) = tokio::sync::mpsc::channel::<Bytes>(2);
            let (release, started) = (self.release.clone(), self.slow_started.clone());
            tokio::spawn(async move {
                let released = release.notified();
                let _ = sender.send(Bytes::from("first half;")).await;
                started.fetch_add(1, Ordering::SeqCst);
                released.await;
                let _ = sender.send(Bytes::from("second half")).await;
            });
            return builder.body(BodyExt::boxed(ChannelBody(body))).unwrap();
        }
        let received = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().len())
            .unwrap_or(0);
        builder = builder.header("x-seen-body-bytes", received.to_string());
        builder
            .status(self.status.load(Ordering::SeqCst))
            .body(Full::new(Bytes::from(format!("{}\n", self.id))).boxed())
            .unwrap()
    }
}

/// A body of the frames given.
struct FramesBody(std::collections::VecDeque<hyper::body::Frame<Bytes>>);

impl hyper::body::Body for FramesBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// A body of the chunks sent on a channel, streamed as they come.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|data| Ok(hyper::body::Frame::data(data))))
    }
}

/// An agent in static mode and the directory its routes are written to.
struct Mesh {
    agent: Loopmesh,
    routes: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mesh {
    /// An agent with `config` (YAML) as its config file.
    fn start(config: &str) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let routes = state.join("routes");
        std::fs::create_dir_all(&routes).unwrap();
        let config_path = dir.path().join("agent.yaml");
        std::fs::write(&config_path, config).unwrap();
        let agent = Loopmesh::spawn(
            &[
                "agent",
                "--config",
                config_path.to_str().unwrap(),
                "--static",
                "--state-dir",
                state.to_str().unwrap(),
            ],
            dir.path(),
        );
        Mesh {
            agent,
            routes,
            _dir: dir,
        }
    }

    /// Writes service `name`'s route (see [`write_route`]).
    fn route(&self, name: &str, addr: SocketAddr, spec: Value, backends: &[(&Backend, &[&str])]) {
        write_route(&self.routes, name, addr, spec, backends);
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.routes.join(format!("{name}.json"))).unwrap();
    }
}

/// Writes service `name`'s route into `routes`: `spec` (JSON; port and
/// protocol are added) and its backends with their tags.
fn write_route(routes: &Path, name: &str, addr: SocketAddr, spec: Value, backends: &[(&Backend, &[&str])]) {
    let mut spec = spec;
    spec["port"] = json!(addr.port());
    spec["protocol"] = json!("http");
    let backends: serde_json::Map<String, Value> = backends
        .iter()
        .map(|(backend, tags)| {
            (
                backend.id.clone(),
                json!({"host": backend.addr.ip().to_string(), "port": backend.addr.port(), "tags": tags}),
            )
        })
        .collect();
    let route =
        json!({"service": name, "address": addr.ip().to_string(), "spec": spec, "backends": backends});
    write_atomically(&routes.join(format!("{name}.json")), &route.to_string());
}

fn write_atomically(path: &Path, text: &str) {
    let staged = path.with_extension("tmp");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(staged, path).unwrap();
}

/// A service address of this test's own, with a port free on it.
fn service_addr() -> SocketAddr {
    std::net::TcpListener::bind((unique_ip(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

type Answer = Response<Bytes>;

/// One keep-alive HTTP/1.1 (or HTTP/2) connection, requests one at a time.
enum Client {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Client {
    async fn http1(addr: SocketAddr) -> Option<Client> {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(connection);
        Some(Client::Http1(sender))
    }

    async fn http2(addr: SocketAddr) -> Option<Client> {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(connection);
        Some(Client::Http2(sender))
    }

    /// Sends `request`; the response with its whole body.
    async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<Answer, hyper::Error> {
        let response = match self {
            Client::Http1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
            Client::Http2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
        };
        let (parts, body) = response.into_parts();
        Ok(Response::from_parts(parts, body.collect().await?.to_bytes()))
    }

    async fn get(&mut self, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
        let uri = match self {
            Client::Http1(_) => path.to_string(),
            Client::Http2(_) => format!("http://{addr}{path}"),
        };
        let mut request = Request::get(uri);
        if matches!(self, Client::Http1(_)) {
            request = request.header("host", addr.to_string());
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.send(request.body(Full::default()).unwrap()).await.unwrap()
    }
}

fn header<'a>(answer: &'a Answer, name: &str) -> &'a str {
    answer.headers().get(name).map_or("", |v| v.to_str().unwrap())
}

/// A client once the service answers at L7 (its listener is up).
async fn connected(addr: SocketAddr) -> Client {
    eventually_async("the service to answer HTTP", || async {
        let mut client = Client::http1(addr).await?;
        let request = Request::get("/")
            .header("host", addr.to_string())
            .body(Full::default())
            .unwrap();
        client
            .send(request)
            .await
            .ok()
            .filter(|answer| answer.status() != 502)
            .map(|_| client)
    })
    .await
}

/// curl with `args`: status line and headers, then the body.
fn curl(args: &[&str]) -> (String, String) {
    let output = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-D", "-"])
        .args(args)
        .output()
        .expect("curl runs");
    assert!(
        output.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_lowercase(), body.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keep_alive_client_is_balanced_per_request_over_every_backend() {
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    ];
    let listed: Vec<(&Backend, &[&str])> = backends.iter().map(|b| (b, &[][..])).collect();
    let (web, grpc) = (service_addr(), service_addr());
    let mesh = Mesh::start("");
    mesh.route("web", web, json!({"balance": "round_robin"}), &listed);
    mesh.route(
        "grpc",
        grpc,
        json!({"balance": "round_robin", "http": {"upstream_protocol": "http2"}}),
        &listed,
    );
    let mut h1 = connected(web).await;
    connected(grpc).await;
    backends.iter().for_each(Backend::forget_hits);
    // One HTTP/1.1 connection, one HTTP/2 connection: each request balanced on its own.
    let mut h2 = Client::http2(web).await.unwrap();
    for client in [&mut h1, &mut h2] {
        for _ in 0..30 {
            let answer = client.get(web, "/", &[]).await;
            assert_eq!(answer.status(), 200);
            assert_eq!(
                header(&answer, "x-seen-version"),
                "HTTP/1.1",
                "the backends speak HTTP/1.1"
            );
        }
    }
    for backend in &backends {
        assert_eq!(
            backend.hits("GET"),
            20,
            "round robin: 60 requests over 3 backends"
        );
    }
    // Over pooled connections, reused for requests one at a time: one a
    // backend, for both clients' requests (bodiless: the fast path's
    // connections, from HTTP/2 clients too).
    let metrics = common::eventually_metrics(
        mesh.agent.admin.unwrap(),
        "the requests counted",
        &["loopmesh_http_requests_total{service=\"web\",code_class=\"2xx\"} 61"],
    )
    .await;
    assert!(
        metrics.contains("loopmesh_http_upstream_connections{service=\"web\"} 3\n"),
        "{metrics}"
    );
    // Backends that speak HTTP/2: one multiplexed connection each.
    backends.iter().for_each(Backend::forget_hits);
    let mut h1 = Client::http1(grpc).await.unwrap();
    for _ in 0..30 {
        let answer = h1.get(grpc, "/", &[]).await;
        assert_eq!(header(&answer, "x-seen-version"), "HTTP/2.0");
    }
    assert!(backends.iter().all(|b| b.hits("GET") == 10));
    // curl, both ways in: Host and the body reach the backend unchanged.
    let url = format!("http://{web}/upload");
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let (head, body) = curl(&[
            version,
            "-H",
            "host: web.mesh.internal",
            "--data-binary",
            "0123456789",
            &url,
        ]);
        assert!(
            head.starts_with("http/1.1 200") || head.starts_with("http/2 200"),
            "{head}"
        );
        assert!(head.contains("x-seen-host: web.mesh.internal"), "{head}");
        assert!(head.contains("x-seen-body-bytes: 10"), "{head}");
        assert!(["a\n", "b\n", "c\n"].contains(&body.as_str()), "{body}");
    }
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_503_is_retried_on_another_backend_and_a_post_is_not() {
    let (bad, good) = (Backend::start("bad").await, Backend::start("good").await);
    let web = service_addr();
    let mesh = Mesh::start("");
    mesh.route(
        "web",
        web,
        json!({"balance": "round_robin", "outlier": {"consecutive_failures": 1000}}),
        &[(&bad, &[]), (&good, &[])],
    );
    let mut client = connected(web).await;
    bad.status.store(503, Ordering::SeqCst);
    for _ in 0..20 {
        let answer = client.get(web, "/", &[]).await;
        assert_eq!(
            answer.status(),
            200,
            "a GET that met the 503 was retried on the other backend"
        );
        assert_eq!(header(&answer, "x-backend"), "good");
    }
    assert!(
        bad.hits("GET") >= 5,
        "round robin sent GETs to the failing backend too"
    );
    let mut failed = 0;
    for _ in 0..20 {
        let request = Request::post("/")
            .header("host", web.to_string())
            .body(Full::new(Bytes::from("x")))
            .unwrap();
        let answer = client.send(request).await.unwrap();
        if answer.status() == 503 {
            assert_eq!(
                header(&answer, "x-backend"),
                "bad",
                "the backend's own 503, passed on"
            );
            failed += 1;
        }
    }
    assert!(
        failed >= 5,
        "POSTs that met the 503 are not retried ({failed} of 20 failed)"
    );
    assert_eq!(
        bad.hits("POST") + good.hits("POST"),
        20,
        "each POST was sent once"
    );
    assert_eq!(bad.hits("POST"), failed);
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxys_own_answers_say_why() {
    let web = service_addr();
    let (empty, refusing) = (service_addr(), service_addr());
    let closed = Backend {
        addr: service_addr(),
        ..Backend::start("closed").await
    };
    let slow = Backend::start("slow").await;
    let mesh = Mesh::start("");
    mesh.route("empty", empty, json!({}), &[]);
    mesh.route("refusing", refusing, json!({}), &[(&closed, &[])]);
    mesh.route(
        "web",
        web,
        json!({"http": {"request_timeout": "300ms"}}),
        &[(&slow, &[])],
    );
    connected(web).await;
    let expect = |addr: SocketAddr, path: &str, status: u16, reason: &str| {
        let (head, body) = curl(&[&format!("http://{addr}{path}")]);
        assert!(head.starts_with(&format!("http/1.1 {status}")), "{head}");
        assert!(head.contains(&format!("x-loopmesh-error: {reason}")), "{head}");
        assert_eq!(body.trim(), reason);
    };
    expect(empty, "/", 503, "no_healthy_backend");
    expect(refusing, "/", 502, "connect_failed");
    expect(web, "/hang", 504, "request_timeout");
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_retry_budget_caps_retries_under_a_failing_backend() {
    let backends = [
        Backend::start("x").await,
        Backend::start("y").await,
        Backend::start("z").await,
    ];
    let listed: Vec<(&Backend, &[&str])> = backends.iter().map(|b| (b, &[][..])).collect();
    let web = service_addr();
    let mesh = Mesh::start("");
    let retry = json!({"attempts": 2, "budget_percent": 10, "min_per_second": 2, "backoff": "0s"});
    mesh.route(
        "web",
        web,
        json!({"outlier": {"consecutive_failures": 1000000}, "http": {"retry": retry}}),
        &listed,
    );
    let mut client = connected(web).await;
    backends.iter().for_each(|b| {
        b.forget_hits();
        b.status.store(503, Ordering::SeqCst);
    });
    let requests = 400;
    let started = std::time::Instant::now();
    for _ in 0..requests {
        assert_eq!(client.get(web, "/", &[]).await.status(), 503);
    }
    let seconds = started.elapsed().as_secs_f64().ceil() + 1.0;
    let sent: u64 = backends.iter().map(Backend::total_hits).sum();
    let retries = sent - requests;
    // Without a budget: two retries each, 1200 sends. With it: 10% of the
    // requests of each second, plus 2 a second.
    let allowed = (requests as f64 * 0.10 + 2.0 * seconds).ceil() as u64;
    assert!(
        retries <= allowed,
        "{retries} retries for {requests} requests in {seconds} s; budget {allowed}"
    );
    assert!(
        retries >= requests / 20,
        "the budget allows some retries: {retries}"
    );
    common::eventually_metrics(
        mesh.agent.admin.unwrap(),
        "the retries counted",
        &[&format!(
            "loopmesh_http_retries_total{{service=\"web\"}} {retries}"
        )],
    )
    .await;
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn splits_go_by_weight_a_header_route_wins_and_changes_apply_to_the_next_request() {
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let web = service_addr();
    let mesh = Mesh::start("");
    let routes = json!([
        {"match": {"headers": {"x-canary": "yes"}}, "to": [{"tags": ["v2"]}]},
        {"to": [{"tags": ["v1"], "weight": 95}, {"tags": ["v2"], "weight": 5}]}
    ]);
    let backends: [(&Backend, &[&str]); 2] = [(&v1, &["v1"]), (&v2, &["v2"])];
    mesh.route("web", web, json!({"http": {"routes": routes}}), &backends);
    connected(web).await;
    v1.forget_hits();
    v2.forget_hits();
    // A few thousand requests over 8 keep-alive connections.
    let (clients, each) = (8, 500);
    let mut runs = Vec::new();
    for _ in 0..clients {
        runs.push(tokio::spawn(async move {
            let mut client = Client::http1(web).await.unwrap();
            for _ in 0..each {
                assert_eq!(client.get(web, "/", &[]).await.status(), 200);
            }
        }));
    }
    for run in runs {
        run.await.unwrap();
    }
    let total = clients * each;
    let canary = v2.hits("GET");
    assert_eq!(v1.hits("GET") + canary, total);
    // 5% of 4000 is 200, one standard deviation ~13.8: five either way.
    assert!((131..=269).contains(&canary), "{canary} of {total} to the canary");
    let mut client = Client::http1(web).await.unwrap();
    for _ in 0..50 {
        let answer = client.get(web, "/", &[("x-canary", "yes")]).await;
        assert_eq!(header(&answer, "x-backend"), "v2", "the header route comes first");
    }
    // All to v1 from now on: the same connection's next requests follow,
    // and none fails while the routes change ten times a second.
    let changing = tokio::spawn({
        let routes_dir = mesh.routes.clone();
        let (v1, v2) = (v1.clone(), v2.clone());
        async move {
            for round in 0..20 {
                let weight = if round % 2 == 0 { 50 } else { 95 };
                let to =
                    json!([{"tags": ["v1"], "weight": weight}, {"tags": ["v2"], "weight": 100 - weight}]);
                let backends: [(&Backend, &[&str]); 2] = [(&v1, &["v1"]), (&v2, &["v2"])];
                write_route(
                    &routes_dir,
                    "web",
                    web,
                    json!({"http": {"routes": [{"to": to}]}}),
                    &backends,
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let backends: [(&Backend, &[&str]); 2] = [(&v1, &["v1"]), (&v2, &["v2"])];
            write_route(
                &routes_dir,
                "web",
                web,
                json!({"http": {"routes": [{"to": [{"tags": ["v1"]}]}]}}),
                &backends,
            );
        }
    });
    let mut answered = 0;
    while !changing.is_finished() {
        assert_eq!(
            client.get(web, "/", &[]).await.status(),
            200,
            "no request fails while routes change"
        );
        answered += 1;
    }
    assert!(answered > 20);
    // The last change went to the agent before the loop ended; the open
    // connection follows it as soon as the agent has applied it.
    let mut last = Vec::new();
    for _ in 0..200 {
        last = futures_join(&mut client, web, 200).await;
        if last.iter().all(|id| id == "v1") {
            break;
        }
    }
    assert!(last.iter().all(|id| id == "v1"), "{last:?}");
    mesh.agent.stop();
}

/// The backends that answered `count` requests on `client`.
async fn futures_join(client: &mut Client, addr: SocketAddr, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..count {
        ids.push(header(&client.get(addr, "/", &[]).await, "x-backend").to_string());
    }
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_requests_identity_reaches_the_backend() {
    let backend = Backend::start("b").await;
    let web = service_addr();
    let mesh = Mesh::start("");
    mesh.route("web", web, json!({}), &[(&backend, &[])]);
    let mut client = connected(web).await;
    // Nothing given: an id and a new trace are made.
    let answer = client
        .get(web, "/", &[("connection", "keep-alive, x-hop"), ("x-hop", "1")])
        .await;
    let request_id = header(&answer, "x-seen-request-id");
    assert_eq!(request_id.len(), 36, "a UUID: {request_id}");
    let traceparent: Vec<&str> = header(&answer, "x-seen-traceparent").split('-').collect();
    assert_eq!(traceparent.len(), 4, "{traceparent:?}");
    assert_eq!(
        (traceparent[0], traceparent[1].len(), traceparent[2].len()),
        ("00", 32, 16)
    );
    let local_ip = header(&answer, "x-seen-forwarded-for").to_string();
    assert!(local_ip.parse::<std::net::Ipv4Addr>().is_ok(), "{local_ip}");
    assert_eq!(
        header(&answer, "x-seen-forwarded"),
        format!("for={local_ip};proto=http")
    );
    assert_eq!(
        header(&answer, "x-seen-connection"),
        "",
        "hop-by-hop headers stay on their hop"
    );
    // Given: the id passes unchanged, the trace goes on with a new span.
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let answer = client
        .get(
            web,
            "/",
            &[
                ("x-request-id", "req-42"),
                ("traceparent", parent),
                ("tracestate", "vendor=1"),
                ("x-forwarded-for", "10.1.2.3"),
            ],
        )
        .await;
    assert_eq!(header(&answer, "x-seen-request-id"), "req-42");
    let seen = header(&answer, "x-seen-traceparent");
    assert!(
        seen.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && seen.ends_with("-01"),
        "{seen}"
    );
    assert_ne!(seen, parent, "a span of this hop");
    assert_eq!(header(&answer, "x-seen-tracestate"), "vendor=1");
    assert_eq!(
        header(&answer, "x-seen-forwarded-for"),
        format!("10.1.2.3, {local_ip}")
    );
    // The same from an HTTP/2 client, whose bodiless requests go out as
    // bytes written from the decoded header block: Host from :authority,
    // the split cookie one header again.
    let mut h2 = Client::http2(web).await.unwrap();
    let answer = h2.get(web, "/", &[]).await;
    assert_eq!(header(&answer, "x-seen-request-id").len(), 36);
    assert_eq!(header(&answer, "x-seen-host"), web.to_string());
    assert_eq!(header(&answer, "x-seen-forwarded-for"), local_ip);
    assert_eq!(header(&answer, "x-seen-version"), "HTTP/1.1");
    let answer = h2
        .get(
            web,
            "/",
            &[
                ("x-request-id", "req-43"),
                ("traceparent", parent),
                ("tracestate", "vendor=1"),
                ("x-forwarded-for", "10.1.2.3"),
                ("cookie", "a=1"),
                ("cookie", "b=2"),
            ],
        )
        .await;
    assert_eq!(header(&answer, "x-seen-request-id"), "req-43");
    let seen = header(&answer, "x-seen-traceparent");
    assert!(
        seen.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && seen != parent,
        "{seen}"
    );
    assert_eq!(header(&answer, "x-seen-tracestate"), "vendor=1");
    assert_eq!(
        header(&answer, "x-seen-forwarded-for"),
        format!("10.1.2.3, {local_ip}")
    );
    assert_eq!(header(&answer, "x-seen-cookie"), "a=1; b=2");
    // A trace without a valid parent starts anew, its tracestate dropped.
    let answer = h2
        .get(
            web,
            "/",
            &[("traceparent", "garbage"), ("tracestate", "vendor=1")],
        )
        .await;
    assert_eq!(header(&answer, "x-seen-tracestate"), "");
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgraded_connection_is_relayed_both_ways() {
    let backend = Backend::start("b").await;
    let web = service_addr();
    let mesh = Mesh::start("");
    mesh.route("web", web, json!({}), &[(&backend, &[])]);
    connected(web).await;
    let mut stream = TcpStream::connect(web).await.unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nhost: web\r\nconnection: Upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "{}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for message in ["hello", "through the proxy", "and back"] {
        stream.write_all(message.as_bytes()).await.unwrap();
        let mut back = vec![0u8; message.len()];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, message.as_bytes());
    }
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_removed_mid_request_finishes_its_requests_in_flight() {
    let backend = Backend::start("b").await;
    let web = service_addr();
    let mesh = Mesh::start("proxy: {drain_timeout: 60s}\n");
    mesh.route("web", web, json!({}), &[(&backend, &[])]);
    // An idle keep-alive connection: closed at the drain's signal.
    let idle = connected(web).await;
    let mut h1 = Client::http1(web).await.unwrap();
    let mut h2 = Client::http2(web).await.unwrap();
    let in_flight = [
        tokio::spawn(async move { h1.get(web, "/slow", &[]).await }),
        tokio::spawn(async move { h2.get(web, "/slow", &[]).await }),
    ];
    eventually_async("both requests in flight", || async {
        (backend.slow_started.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    mesh.remove("web");
    eventually_async("the listener to close", || async {
        TcpStream::connect(web).await.is_err().then_some(())
    })
    .await;
    let Client::Http1(idle) = idle else { unreachable!() };
    eventually_async("the idle connection to be closed", || async {
        idle.is_closed().then_some(())
    })
    .await;
    backend.release.notify_waiters();
    for request in in_flight {
        let answer = request.await.unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.body().as_ref(), b"first half;second half");
    }
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_access_log_has_one_json_line_per_request() {
    let (ok, failing) = (Backend::start("ok").await, Backend::start("failing").await);
    let (logged, quiet) = (service_addr(), service_addr());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let mesh = Mesh::start(&format!("proxy: {{access_log: {{to: {}}}}}\n", log.display()));
    failing.status.store(500, Ordering::SeqCst);
    let spec = json!({"balance": "round_robin", "http": {"access_log": true, "retry": {"attempts": 0}}});
    mesh.route("logged", logged, spec, &[(&ok, &[]), (&failing, &[])]);
    mesh.route("quiet", quiet, json!({}), &[(&ok, &[])]);
    let mut client = connected(logged).await;
    let mut h2 = Client::http2(logged).await.unwrap();
    let mut quiet_client = connected(quiet).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        // HTTP/1.1 and HTTP/2 clients' requests alike.
        let client = if i % 2 == 0 { &mut client } else { &mut h2 };
        let answer = client.get(logged, &format!("/item/{i}"), &[]).await;
        ids.push((
            header(&answer, "x-seen-request-id").to_string(),
            answer.status().as_u16(),
        ));
        quiet_client.get(quiet, "/", &[]).await;
    }
    let lines = eventually_async("the access log to hold every request", || async {
        let text = std::fs::read_to_string(&log).ok()?;
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        // The connecting request, then the 20.
        (lines.len() >= 21).then_some(lines)
    })
    .await;
    assert_eq!(lines.len(), 21, "one line per request of the logged service only");
    for (line, (id, status)) in lines[1..].iter().zip(&ids) {
        assert_eq!(line["service"], "logged");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["request_id"], id.as_str());
        assert_eq!(line["status"], *status);
        assert_eq!(line["trace_id"].as_str().unwrap().len(), 32);
        assert!(
            ["ok", "failing"].contains(&line["upstream"].as_str().unwrap()),
            "{line}"
        );
        assert!(line["duration_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(
            line["bytes_out"].as_u64().unwrap() as usize,
            line["upstream"].as_str().unwrap().len() + 1
        );
    }
    let paths: Vec<&str> = lines[1..].iter().map(|l| l["path"].as_str().unwrap()).collect();
    assert_eq!(paths, (0..20).map(|i| format!("/item/{i}")).collect::<Vec<_>>());
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn hashing_on_a_header_keeps_each_user_on_one_backend() {
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    ];
    let listed: Vec<(&Backend, &[&str])> = backends.iter().map(|b| (b, &[][..])).collect();
    let web = service_addr();
    let mesh = Mesh::start("");
    let spec = json!({"balance": "consistent_hash", "http": {"hash_on": {"header": "x-user-id"}}});
    mesh.route("web", web, spec, &listed);
    let mut client = connected(web).await;
    let mut chosen = std::collections::BTreeSet::new();
    for user in 0..20 {
        let user = format!("user-{user}");
        let ids = {
            let mut ids = std::collections::BTreeSet::new();
            for _ in 0..10 {
                let answer = client.get(web, "/", &[("x-user-id", &user)]).await;
                ids.insert(header(&answer, "x-backend").to_string());
            }
            ids
        };
        assert_eq!(ids.len(), 1, "{user} went to {ids:?}");
        chosen.extend(ids);
    }
    assert!(chosen.len() > 1, "20 users all hashed to {chosen:?}");
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_answering_5xx_is_ejected_and_a_full_service_sheds_requests() {
    let (sick, well) = (Backend::start("sick").await, Backend::start("well").await);
    let web = service_addr();
    let mesh = Mesh::start("");
    let spec = json!({
        "balance": "round_robin",
        "outlier": {"consecutive_failures": 3, "base_ejection": "5m", "max_ejection": "10m"},
        "http": {"max_requests": 2, "retry": {"attempts": 0}}
    });
    mesh.route("web", web, spec, &[(&sick, &[]), (&well, &[])]);
    let mut client = connected(web).await;
    sick.forget_hits();
    sick.status.store(500, Ordering::SeqCst);
    for _ in 0..30 {
        client.get(web, "/", &[]).await;
    }
    assert_eq!(sick.hits("GET"), 3, "ejected after three 500s in a row");
    common::eventually_metrics(
        mesh.agent.admin.unwrap(),
        "the ejection counted",
        &["loopmesh_backend_ejections_total{service=\"web\",backend=\"sick\"} 1"],
    )
    .await;
    // Two requests in flight fill the service; a third is shed at once.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut client = Client::http1(web).await.unwrap();
        slow.push(tokio::spawn(async move { client.get(web, "/slow", &[]).await }));
    }
    eventually_async("two requests in flight", || async {
        (well.slow_started.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    let answer = client.get(web, "/", &[]).await;
    assert_eq!(answer.status(), 503);
    assert_eq!(header(&answer, "x-loopmesh-error"), "max_requests");
    well.release.notify_waiters();
    for request in slow {
        assert_eq!(request.await.unwrap().status(), 200);
    }
    assert_eq!(client.get(web, "/", &[]).await.status(), 200, "room again");
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn backends_closing_their_connections_lose_no_request() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let web = service_addr();
    let mesh = Mesh::start("");
    // No retries: a request sent on a connection the backend had closed
    // must be caught before it leaves, not retried after.
    let spec = json!({"outlier": {"consecutive_failures": 1}, "http": {"retry": {"attempts": 0}}});
    mesh.route("web", web, spec, &[(&a, &[]), (&b, &[])]);
    let mut client = connected(web).await;
    for backend in [&a, &b] {
        backend.one_request_per_connection.store(true, Ordering::SeqCst);
        backend.forget_hits();
    }
    for _ in 0..300 {
        let answer = client.get(web, "/", &[]).await;
        assert_eq!(answer.status(), 200, "{:?}", answer.headers());
    }
    assert!(
        a.hits("GET") > 50 && b.hits("GET") > 50,
        "neither backend was ejected"
    );
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_over_http2_keeps_te_trailers_and_gets_its_trailers() {
    let backend = Backend::start("b").await;
    let grpc = service_addr();
    let mesh = Mesh::start("");
    mesh.route(
        "grpc",
        grpc,
        json!({"http": {"upstream_protocol": "http2"}}),
        &[(&backend, &[])],
    );
    connected(grpc).await;
    let mut client = Client::http2(grpc).await.unwrap();
    let Client::Http2(sender) = &mut client else {
        unreachable!()
    };
    let request = Request::post(format!("http://{grpc}/grpc"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from("call")))
        .unwrap();
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(header_of(response.headers(), "x-seen-te"), "trailers");
    assert_eq!(header_of(response.headers(), "x-seen-version"), "HTTP/2.0");
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers reach the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes().as_ref(), b"message");
    mesh.agent.stop();
}

fn header_of<'a>(headers: &'a hyper::HeaderMap, name: &str) -> &'a str {
    headers.get(name).map_or("", |v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http_policy_written_to_etcd_routes_requests() {
    let etcd = common::Etcd::start();
    let mut store = etcd.client().await;
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let web = service_addr();
    let dir = tempfile::tempdir().unwrap();
    let config = common::agent_config(dir.path(), &etcd, "");
    let agent = Loopmesh::spawn(&["agent", "--config", config.to_str().unwrap()], dir.path());
    store
        .put("/loopmesh/addresses/web", web.ip().to_string(), None)
        .await
        .unwrap();
    for (backend, tag) in [(&v1, "v1"), (&v2, "v2")] {
        let instance = format!(
            "{{host: {}, port: {}, tags: [{tag}]}}",
            backend.addr.ip(),
            backend.addr.port()
        );
        store
            .put(format!("/loopmesh/instances/web/{tag}"), instance, None)
            .await
            .unwrap();
    }
    let service = format!(
        "{{port: {}, protocol: http, http: {{routes: [{{match: {{headers: {{x-canary: '1'}}}}, to: [{{tags: [v2]}}]}}, {{to: [{{tags: [v1]}}]}}]}}}}",
        web.port()
    );
    store.put("/loopmesh/services/web", service, None).await.unwrap();
    let mut client = connected(web).await;
    for _ in 0..20 {
        assert_eq!(header(&client.get(web, "/", &[]).await, "x-backend"), "v1");
        assert_eq!(
            header(&client.get(web, "/", &[("x-canary", "1")]).await, "x-backend"),
            "v2"
        );
    }
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_may_send_to_another_service_and_a_slow_try_is_retried() {
    let (home, api, slow, quick) = (
        Backend::start("home").await,
        Backend::start("api").await,
        Backend::start("slow").await,
        Backend::start("quick").await,
    );
    let (web, api_addr, timed) = (service_addr(), service_addr(), service_addr());
    let mesh = Mesh::start("");
    let routes = json!([{"match": {"path_prefix": "/api/"}, "to": [{"service": "api"}]}]);
    mesh.route("web", web, json!({"http": {"routes": routes}}), &[(&home, &[])]);
    mesh.route("api", api_addr, json!({}), &[(&api, &[])]);
    let per_try =
        json!({"balance": "round_robin", "http": {"per_try_timeout": "200ms", "request_timeout": "5s"}});
    mesh.route("timed", timed, per_try, &[(&slow, &[]), (&quick, &[])]);
    let mut client = connected(web).await;
    connected(api_addr).await;
    assert_eq!(
        header(&client.get(web, "/api/users", &[]).await, "x-backend"),
        "api"
    );
    assert_eq!(header(&client.get(web, "/home", &[]).await, "x-backend"), "home");
    // A service that does not listen (removed): said, not hung.
    mesh.remove("api");
    eventually_async("the other service to be gone", || async {
        let answer = Client::http1(web).await?.get(web, "/api/users", &[]).await;
        (header(&answer, "x-loopmesh-error") == "no_such_service").then_some(())
    })
    .await;
    // The slow backend hangs on /hang: each try there is cut at 200 ms and
    // the request retried on the quick one, which answers at once.
    let mut client = connected(timed).await;
    quick.forget_hits();
    slow.forget_hits();
    for _ in 0..4 {
        let answer = client.get(timed, "/hang-on-slow", &[]).await;
        assert_eq!(answer.status(), 200);
        assert_eq!(header(&answer, "x-backend"), "quick");
    }
    assert!(slow.hits("GET") >= 1, "round robin tried the slow backend");
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_with_no_other_backend_left_is_neither_made_nor_counted() {
    let only = Backend::start("only").await;
    let web = service_addr();
    let mesh = Mesh::start("");
    mesh.route("web", web, json!({}), &[(&only, &[])]);
    let mut client = connected(web).await;
    only.forget_hits();
    only.status.store(503, Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(client.get(web, "/", &[]).await.status(), 503);
    }
    assert_eq!(only.hits("GET"), 10, "each request sent once");
    common::eventually_metrics(
        mesh.agent.admin.unwrap(),
        "the 503s counted, no retry",
        &[
            "loopmesh_http_requests_total{service=\"web\",code_class=\"5xx\"} 10",
            "loopmesh_http_retries_total{service=\"web\"} 0",
        ],
    )
    .await;
    mesh.agent.stop();
}

/// An HTTP/2 backend written frame by frame, to say exactly which streams
/// it processed: on its first connection it answers the first stream, then
/// waits for two more, sends a graceful GOAWAY naming the first of those as
/// the last it processes, answers it with `kept` and closes; every later
/// connection answers each stream with `fresh`. Returns its address and
/// the connections it accepted.
async fn goaway_backend() -> (SocketAddr, Arc<AtomicU64>) {
    const HEADERS: u8 = 1;
    const SETTINGS: u8 = 4;
    const PING: u8 = 6;
    const GOAWAY: u8 = 7;
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        frame
    }
    /// `:status: 200` (HPACK static index 8), then the body, ending the stream.
    fn answer(stream: u32, body: &str) -> Vec<u8> {
        let mut bytes = frame(HEADERS, 0x4, stream, &[0x88]);
        bytes.extend(frame(0, 0x1, stream, body.as_bytes()));
        bytes
    }
    /// Reads frames, answering SETTINGS and PING, until a new stream's HEADERS.
    async fn next_stream(socket: &mut TcpStream) -> Option<u32> {
        loop {
            let mut head = [0u8; 9];
            socket.read_exact(&mut head).await.ok()?;
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; length];
            socket.read_exact(&mut payload).await.ok()?;
            match kind {
                SETTINGS if flags & 0x1 == 0 => socket.write_all(&frame(SETTINGS, 0x1, 0, &[])).await.ok()?,
                PING if flags & 0x1 == 0 => socket.write_all(&frame(PING, 0x1, 0, &payload)).await.ok()?,
                HEADERS => return Some(stream),
                _ => {}
            }
        }
    }
    let listener = TcpListener::bind((unique_ip(), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let counting = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let first = counting.fetch_add(1, Ordering::SeqCst) == 0;
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                socket.read_exact(&mut preface).await.ok()?;
                socket.write_all(&frame(SETTINGS, 0, 0, &[])).await.ok()?;
                if !first {
                    while let Some(stream) = next_stream(&mut socket).await {
                        socket.write_all(&answer(stream, "fresh")).await.ok()?;
                    }
                    return None;
                }
                let warm = next_stream(&mut socket).await?;
                socket.write_all(&answer(warm, "warm")).await.ok()?;
                let kept = next_stream(&mut socket).await?;
                let _refused = next_stream(&mut socket).await?;
                let mut goaway = kept.to_be_bytes().to_vec();
                goaway.extend(0u32.to_be_bytes());
                socket.write_all(&frame(GOAWAY, 0, 0, &goaway)).await.ok()?;
                socket.write_all(&answer(kept, "kept")).await.ok()?;
                // Close once the client has read it all (closing with unread
                // bytes would reset the connection).
                socket.shutdown().await.ok()?;
                while socket.read(&mut [0u8; 1024]).await.ok()? > 0 {}
                Some(())
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_beyond_an_http2_backends_goaway_is_sent_again_on_a_new_connection() {
    let (backend, connections) = goaway_backend().await;
    let grpc = service_addr();
    let mesh = Mesh::start("");
    let route = json!({
        "service": "grpc",
        "address": grpc.ip().to_string(),
        "spec": {"port": grpc.port(), "protocol": "http", "http": {"upstream_protocol": "http2"}},
        "backends": {"only": {"host": backend.ip().to_string(), "port": backend.port()}},
    });
    write_atomically(&mesh.routes.join("grpc.json"), &route.to_string());
    // The first request (the warm one) opens the shared upstream connection.
    let mut first = connected(grpc).await;
    let mut second = Client::http1(grpc).await.unwrap();
    // Both go on that connection at once; the backend processes one.
    let (a, b) = tokio::join!(first.get(grpc, "/a", &[]), second.get(grpc, "/b", &[]));
    let mut bodies = vec![a.body().clone(), b.body().clone()];
    bodies.sort();
    assert_eq!(
        (a.status(), b.status()),
        (StatusCode::OK, StatusCode::OK),
        "{a:?} {b:?}"
    );
    assert_eq!(
        bodies,
        ["fresh", "kept"],
        "the refused stream was answered on a new connection"
    );
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    common::eventually_metrics(
        mesh.agent.admin.unwrap(),
        "no failure, no retry: the backend never processed it",
        &[
            "loopmesh_http_requests_total{service=\"grpc\",code_class=\"2xx\"} 3",
            "loopmesh_http_retries_total{service=\"grpc\"} 0",
        ],
    )
    .await;
    mesh.agent.stop();
}

/// A backend written byte by byte, for what a hyper backend never sends:
/// each path answers with a framing of its own. Counts its connections.
async fn scripted_backend() -> (Backend, Arc<AtomicU64>) {
    let listener = TcpListener::bind((unique_ip(), 0)).await.unwrap();
    let backend = Backend {
        id: "scripted".into(),
        addr: listener.local_addr().unwrap(),
        hits: Arc::default(),
        status: Arc::new(AtomicU16::new(200)),
        release: Arc::default(),
        slow_started: Arc::default(),
        one_request_per_connection: Arc::default(),
    };
    let connections = Arc::new(AtomicU64::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut read = Vec::new();
                loop {
                    let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&read[..end]).into_owned();
                    read.drain(..end + 4);
                    let line = head.lines().next().unwrap_or("").to_string();
                    let (method, path) = line.split_once(' ').unwrap_or(("", ""));
                    let path = path.split(' ').next().unwrap_or("");
                    let answer: Vec<&[u8]> = match (method, path) {
                        (_, "/chunked") => vec![
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n5\r\nhel",
                            b"lo\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
                        ],
                        (_, "/early-hints") => vec![
                            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n",
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                        ],
                        ("HEAD", "/length") => vec![b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"],
                        (_, "/close") => {
                            let _ = stream
                                .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
                                .await;
                            return;
                        }
                        _ => {
                            let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}", path.len());
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            vec![]
                        }
                    };
                    for part in answer {
                        if stream.write_all(part).await.is_err() {
                            return;
                        }
                        stream.flush().await.unwrap();
                    }
                }
            });
        }
    });
    (backend, connections)
}

/// Writes `request` on `stream`, then reads as [`read_until`] does.
async fn ask(stream: &mut TcpStream, request: &[u8], end: &str) -> String {
    stream.write_all(request).await.unwrap();
    read_until(stream, end).await
}

/// Reads from `stream` until what was read ends with `end` (or the
/// connection closes, when `end` is empty): everything read.
async fn read_until(stream: &mut TcpStream, end: &str) -> String {
    let mut read = Vec::new();
    let reading = async {
        loop {
            if !end.is_empty() && read.ends_with(end.as_bytes()) {
                return;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read.extend_from_slice(&chunk[..n]),
            }
        }
    };
    // A bound on a test gone wrong, not a synchronisation.
    tokio::time::timeout(std::time::Duration::from_secs(20), reading)
        .await
        .expect("the answer within 20 s");
    String::from_utf8_lossy(&read).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_response_framing_is_relayed_on_one_client_connection_over_one_upstream_connection() {
    let (backend, connections) = scripted_backend().await;
    let web = service_addr();
    let mesh = Mesh::start("");
    mesh.route("web", web, json!({}), &[(&backend, &[])]);
    connected(web).await;
    connections.store(0, Ordering::SeqCst);
    let mut client = TcpStream::connect(web).await.unwrap();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: web\r\n\r\n");

    // Chunked, in two writes, with a trailer: relayed as it came.
    let chunked = ask(&mut client, get("/chunked").as_bytes(), "0\r\nx-sum: 11\r\n\r\n").await;
    assert!(chunked.starts_with("HTTP/1.1 200 OK\r\n"), "{chunked}");
    assert!(chunked.contains("Transfer-Encoding: chunked\r\n"), "{chunked}");
    assert!(
        chunked.ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n"),
        "{chunked}"
    );

    // An interim 103 is not relayed; the final answer is.
    let hinted = ask(&mut client, get("/early-hints").as_bytes(), "\r\n\r\nok").await;
    assert!(hinted.starts_with("HTTP/1.1 200 OK\r\n"), "{hinted}");

    // A HEAD answer's Content-Length frames no body: the next answer is
    // read right after its head.
    let head = ask(
        &mut client,
        b"HEAD /length HTTP/1.1\r\nHost: web\r\n\r\n",
        "\r\n\r\n",
    )
    .await;
    assert!(head.contains("Content-Length: 100\r\n"), "{head}");
    let after = ask(&mut client, get("/after-head").as_bytes(), "/after-head").await;
    assert!(after.starts_with("HTTP/1.1 200 OK\r\n"), "{after}");

    // Two requests in one write: answered in order.
    let both = ask(
        &mut client,
        format!("{}{}", get("/first"), get("/second")).as_bytes(),
        "/second",
    )
    .await;
    let (first, second) = (both.find("/first").unwrap(), both.find("/second").unwrap());
    assert!(first < second, "{both}");
    assert_eq!(both.matches("HTTP/1.1 200 OK").count(), 2, "{both}");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "every answer so far came over the upstream connection pooled before them"
    );

    // A body that ends with the backend's connection: the client's ends too.
    let closed = ask(&mut client, get("/close").as_bytes(), "").await;
    assert!(
        closed.to_lowercase().contains("\r\nconnection: close\r\n"),
        "{closed}"
    );
    assert!(closed.ends_with("\r\n\r\nuntil the end"), "{closed}");
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_the_fast_path_does_not_take_is_handed_to_hyper_with_what_was_read() {
    let backend = Backend::start("a").await;
    let web = service_addr();
    let mesh = Mesh::start("");
    mesh.route("web", web, json!({}), &[(&backend, &[])]);
    connected(web).await;
    backend.forget_hits();
    let mut client = TcpStream::connect(web).await.unwrap();
    // Fast path, then a chunked upload (hyper's), then more on the same
    // connection: the upload arrives whole, the next request after it.
    let fast = ask(&mut client, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n", "a\n").await;
    assert!(fast.starts_with("HTTP/1.1 200 OK\r\n"), "{fast}");
    let both = ask(&mut client, b"POST /upload HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: web\r\n\r\n", "a\n").await;
    let both = if both.matches("HTTP/1.1 200 OK").count() < 2 {
        both + &read_until(&mut client, "a\n").await
    } else {
        both
    };
    assert!(
        both.to_lowercase().contains("x-seen-body-bytes: 11\r\n"),
        "{both}"
    );
    assert_eq!(both.matches("HTTP/1.1 200 OK").count(), 2, "{both}");
    assert_eq!((backend.hits("GET"), backend.hits("POST")), (2, 1));
    // HTTP/1.0 goes to hyper from the first request.
    let mut old = TcpStream::connect(web).await.unwrap();
    let answer = ask(&mut old, b"GET / HTTP/1.0\r\nHost: web\r\n\r\n", "").await;
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(
        answer.to_lowercase().contains("x-seen-version: http/1.1\r\n"),
        "{answer}"
    );
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backends_one_connection_slot_passes_between_the_fast_path_and_hyper() {
    let backend = Backend::start("a").await;
    let web = service_addr();
    let mesh = Mesh::start("");
    // One upstream connection at most; a request that cannot get it within
    // 5 s would come back 504.
    let spec = json!({"http": {"max_connections_per_backend": 1, "request_timeout": "5s"}});
    mesh.route("web", web, spec, &[(&backend, &[])]);
    let mut h1 = connected(web).await;
    let mut h2 = Client::http2(web).await.unwrap();
    // A request with a body from an HTTP/2 client goes through hyper's
    // client and pool, a GET through the fast path's: each turn, the idle
    // connection the other side pooled gives its slot up.
    for turn in 0..3 {
        let upload = Request::post(format!("http://{web}/upload"))
            .body(Full::new(Bytes::from("hello")))
            .unwrap();
        let answer = h2.send(upload).await.unwrap();
        assert_eq!(
            (answer.status(), header(&answer, "x-seen-body-bytes")),
            (StatusCode::OK, "5"),
            "HTTP/2 upload, turn {turn}: {:?}",
            answer.headers()
        );
        let answer = h1.get(web, "/", &[]).await;
        assert_eq!(
            answer.status(),
            200,
            "HTTP/1.1 GET, turn {turn}: {:?}",
            answer.headers()
        );
    }
    mesh.agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_clients_bodiless_requests_get_every_http1_framing_unframed() {
    let (backend, _connections) = scripted_backend().await;
    let web = service_addr();
    let mesh = Mesh::start("");
    mesh.route("web", web, json!({}), &[(&backend, &[])]);
    connected(web).await;
    let Some(Client::Http2(mut h2)) = Client::http2(web).await else {
        panic!("an HTTP/2 connection to {web}");
    };
    let mut ask = |method: &str, path: &str| {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{web}{path}"))
            .body(Full::<Bytes>::default())
            .unwrap();
        // One request at a time: the connection is ready for each.
        h2.send_request(request)
    };
    // Chunked, with a trailer: the data alone, then the trailer as trailers.
    let response = ask("GET", "/chunked").await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers().get("transfer-encoding").is_none(),
        "{:?}",
        response.headers()
    );
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("the trailers");
    assert_eq!(trailers["x-sum"], "11");
    assert_eq!(collected.to_bytes(), "hello world");
    // After an interim 103, the final answer; a HEAD's length frames no
    // body; a body that ends with the backend's connection.
    let response = ask("GET", "/early-hints").await.unwrap();
    assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "ok");
    let response = ask("HEAD", "/length").await.unwrap();
    assert_eq!(response.headers()["content-length"], "100");
    assert!(response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .is_empty());
    let response = ask("GET", "/close").await.unwrap();
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "until the end"
    );
    let response = ask("GET", "/plain").await.unwrap();
    assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "/plain");
    mesh.agent.stop();
}

/// An agent serving service `web` from one backend `b1`, once it answers.
async fn one_backend_service() -> (Backend, SocketAddr, Mesh) {
    let backend = Backend::start("b1").await;
    let web = service_addr();
    let mesh = Mesh::start("");
    mesh.route("web", web, json!({}), &[(&backend, &[])]);
    connected(web).await;
    (backend, web, mesh)
}

/// An HTTP/2 client with a 1 KiB stream window sends and gets back 1 MiB
/// bodies, three at once on one connection: both sides' flow control (the
/// proxy's 256 KiB stream and 1 MiB connection windows given back as the
/// upload is forwarded; its sending held to the client's window).
#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_move_both_ways_under_http2_flow_control() {
    let (_backend, web, mesh) = one_backend_service().await;
    let stream = TcpStream::connect(web).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(1024)
        .initial_connection_window_size(65_535)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let echoes = (0..3u8).map(|n| {
        let mut sender = sender.clone();
        async move {
            let body: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8 ^ n).collect();
            let request = Request::post(format!("http://{web}/echo"))
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap();
            sender.ready().await.unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            let got = response.into_body().collect().await.unwrap().to_bytes();
            assert!(
                got == body,
                "echo {n}: {} bytes back of {}",
                got.len(),
                body.len()
            );
        }
    });
    futures_join_all(echoes).await;
    mesh.agent.stop();
}

async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// More requests at once than the proxy's 256 streams per connection: the
/// client waits for room (SETTINGS_MAX_CONCURRENT_STREAMS) and every one is
/// answered.
#[tokio::test(flavor = "multi_thread")]
async fn more_requests_at_once_than_streams_allowed_are_all_answered() {
    let (_backend, web, mesh) = one_backend_service().await;
    let Some(Client::Http2(sender)) = Client::http2(web).await else {
        panic!("an HTTP/2 connection to {web}");
    };
    let answered = Arc::new(AtomicU64::new(0));
    let requests = (0..600).map(|i| {
        let (mut sender, answered) = (sender.clone(), answered.clone());
        async move {
            let request = Request::get(format!("http://{web}/n/{i}"))
                .body(Full::default())
                .unwrap();
            sender.ready().await.unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "b1\n");
            answered.fetch_add(1, Ordering::SeqCst);
        }
    });
    futures_join_all(requests).await;
    assert_eq!(answered.load(Ordering::SeqCst), 600);
    mesh.agent.stop();
}

/// Raw HTTP/2 frames, for what a well-behaved client never sends.
mod raw_h2 {
    use super::*;

    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const GOAWAY: u8 = 7;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        frame
    }

    /// `:method GET` or `POST`, `:scheme http`, `:path` as given (all HPACK
    /// literals without indexing, or static indices), then `extra` fields.
    pub fn request(method: &str, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
        let mut block = vec![if method == "POST" { 0x83 } else { 0x82 }, 0x86];
        block.extend([0x04, path.len() as u8]);
        block.extend(path.as_bytes());
        for (name, value) in extra {
            block.extend([0x00, name.len() as u8]);
            block.extend(name.as_bytes());
            block.push(value.len() as u8);
            block.extend(value.as_bytes());
        }
        block
    }

    pub async fn connect(addr: SocketAddr) -> TcpStream {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        send(&mut socket, SETTINGS, 0, 0, &[]).await;
        socket
    }

    /// Writes one frame.
    pub async fn send(socket: &mut TcpStream, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        socket
            .write_all(&frame(kind, flags, stream, payload))
            .await
            .unwrap();
    }

    /// The next frame that is not SETTINGS, WINDOW_UPDATE or PING: kind,
    /// flags, stream, payload; `None` at the end of the connection. Fails
    /// the test when nothing comes for 10 s.
    pub async fn next(socket: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
        tokio::time::timeout(std::time::Duration::from_secs(10), next_frame(socket))
            .await
            .expect("a frame or the end of the connection within 10 s")
    }

    async fn next_frame(socket: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
        loop {
            let mut head = [0u8; 9];
            socket.read_exact(&mut head).await.ok()?;
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; length];
            socket.read_exact(&mut payload).await.ok()?;
            if !matches!(head[3], SETTINGS | 6 | 8) {
                return Some((head[3], head[4], stream, payload));
            }
        }
    }

    pub fn code(payload: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(payload[at..at + 4].try_into().unwrap())
    }
}

/// A malformed request (an uppercase header name) and a body shorter than
/// its content-length get their stream reset, a client's own reset cancels
/// its request, and the connection carries on; a stream id a client may
/// not use ends the connection with a GOAWAY naming the last stream.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_breaking_the_protocol_gets_a_reset_or_a_goaway() {
    use raw_h2::*;
    let (_backend, web, mesh) = one_backend_service().await;
    let mut socket = connect(web).await;
    let bad = request("GET", "/", &[("X-Upper", "1")]);
    send(&mut socket, HEADERS, END_HEADERS | END_STREAM, 1, &bad).await;
    let (kind, _, stream, payload) = next(&mut socket).await.unwrap();
    assert_eq!(
        (kind, stream, code(&payload, 0)),
        (RST_STREAM, 1, 1),
        "PROTOCOL_ERROR on stream 1"
    );
    // A request whose client gives up on it: nothing comes for it.
    let hanging = request("GET", "/hang", &[]);
    send(&mut socket, HEADERS, END_HEADERS | END_STREAM, 3, &hanging).await;
    send(&mut socket, RST_STREAM, 0, 3, &8u32.to_be_bytes()).await;
    // Five bytes promised, three sent.
    let short = request("POST", "/", &[("content-length", "5")]);
    send(&mut socket, HEADERS, END_HEADERS, 5, &short).await;
    send(&mut socket, DATA, END_STREAM, 5, b"abc").await;
    let (kind, _, stream, payload) = next(&mut socket).await.unwrap();
    assert_eq!(
        (kind, stream, code(&payload, 0)),
        (RST_STREAM, 5, 1),
        "PROTOCOL_ERROR on stream 5"
    );
    // The connection still serves.
    let good = request("GET", "/", &[]);
    send(&mut socket, HEADERS, END_HEADERS | END_STREAM, 7, &good).await;
    let (kind, _, stream, payload) = next(&mut socket).await.unwrap();
    assert_eq!(
        (kind, stream, payload[0]),
        (HEADERS, 7, 0x88),
        ":status 200 on stream 7"
    );
    let (kind, flags, stream, payload) = next(&mut socket).await.unwrap();
    assert_eq!(
        (kind, flags, stream, &payload[..]),
        (DATA, END_STREAM, 7, &b"b1\n"[..])
    );
    // Stream ids from a client are odd.
    send(&mut socket, HEADERS, END_HEADERS | END_STREAM, 8, &good).await;
    let (kind, _, _, payload) = next(&mut socket).await.unwrap();
    assert_eq!(
        (kind, code(&payload, 0), code(&payload, 4)),
        (GOAWAY, 7, 1),
        "GOAWAY, last stream 7, PROTOCOL_ERROR"
    );
    assert!(
        next(&mut socket).await.is_none(),
        "the connection closes after its GOAWAY"
    );
    mesh.agent.stop();
}

/// Requests opened and reset at once, by the hundred (the "rapid reset"
/// attack, CVE-2023-44487), end the connection with ENHANCE_YOUR_CALM.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_reset_streams_ends_the_connection() {
    use raw_h2::*;
    let (_backend, web, mesh) = one_backend_service().await;
    let mut socket = connect(web).await;
    let hanging = request("GET", "/hang", &[]);
    let mut flood = Vec::new();
    for stream in (1..1000u32).step_by(2) {
        flood.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream, &hanging));
        flood.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
    }
    // The proxy may close before reading it all.
    let _ = socket.write_all(&flood).await;
    let (kind, _, _, payload) = next(&mut socket).await.expect("a GOAWAY");
    assert_eq!(
        (kind, code(&payload, 4)),
        (GOAWAY, 0xb),
        "GOAWAY with ENHANCE_YOUR_CALM"
    );
    mesh.agent.stop();
}

/// Hundreds of connections of random frames (any type, flags and stream,
/// random payloads, half of the header blocks well-formed requests) never
/// take the proxy down: a proper request is answered after them, and the
/// agent is still running.
#[tokio::test(flavor = "multi_thread")]
async fn random_http2_frames_never_take_the_proxy_down() {
    use raw_h2::*;
    let (_backend, web, mut mesh) = one_backend_service().await;
    // xorshift: reproducible, no dependency.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let good = request("GET", "/", &[("x-a", "1")]);
    for _ in 0..300 {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        if next() % 8 != 0 {
            bytes.extend(frame(SETTINGS, 0, 0, &[]));
        }
        for _ in 0..(next() % 24) {
            let kind = (next() % 11) as u8;
            let flags = (next() % 64) as u8;
            let stream = (next() % 12) as u32;
            let payload: Vec<u8> = if kind == HEADERS && next() % 2 == 0 {
                good.clone()
            } else {
                (0..next() % 48).map(|_| next() as u8).collect()
            };
            bytes.extend(frame(kind, flags, stream, &payload));
        }
        let mut socket = TcpStream::connect(web).await.unwrap();
        // The proxy may have closed already: what it read was enough.
        let _ = socket.write_all(&bytes).await;
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            socket.read(&mut [0u8; 4096]),
        )
        .await;
    }
    let Some(Client::Http2(mut h2)) = Client::http2(web).await else {
        panic!("an HTTP/2 connection to {web}");
    };
    let request = Request::get(format!("http://{web}/"))
        .body(Full::default())
        .unwrap();
    let response = h2.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(mesh.agent.exited().is_none(), "the agent survived");
    let log = mesh.agent.log_text();
    assert!(!log.contains("panicked"), "no task panicked:\n{log}");
    mesh.agent.stop();
}

/// What well-behaved clients may send but curl and hyper rarely do: a
/// header block split over HEADERS (padded, with a priority) and
/// CONTINUATION frames, a padded DATA frame, trailers after the body; and
/// a CONNECT, which the proxy does not tunnel over HTTP/2.
#[tokio::test(flavor = "multi_thread")]
async fn continuations_padding_and_request_trailers_are_understood() {
    use raw_h2::*;
    const CONTINUATION: u8 = 9;
    const PADDED: u8 = 0x8;
    const PRIORITY: u8 = 0x20;
    let (_backend, web, mesh) = one_backend_service().await;
    let mut socket = connect(web).await;
    // POST /echo, its block in three pieces: HEADERS (3 bytes of padding,
    // 5 of priority), then two CONTINUATIONs.
    let block = request("POST", "/echo", &[("x-long", &"v".repeat(40))]);
    let (first, rest) = block.split_at(5);
    let (second, third) = rest.split_at(rest.len() / 2);
    let mut headers = vec![3u8];
    headers.extend([0, 0, 0, 0, 16]);
    headers.extend(first);
    headers.extend([0, 0, 0]);
    send(&mut socket, HEADERS, PADDED | PRIORITY, 1, &headers).await;
    send(&mut socket, CONTINUATION, 0, 1, second).await;
    send(&mut socket, CONTINUATION, END_HEADERS, 1, third).await;
    // "hello" with 4 bytes of padding, then " world", then trailers.
    let mut padded = vec![4u8];
    padded.extend(b"hello");
    padded.extend([0; 4]);
    send(&mut socket, DATA, PADDED, 1, &padded).await;
    send(&mut socket, DATA, 0, 1, b" world").await;
    let trailers = [0x00, 0x05, b'x', b'-', b's', b'u', b'm', 0x02, b'1', b'1'];
    send(&mut socket, HEADERS, END_HEADERS | END_STREAM, 1, &trailers).await;
    let (kind, _, stream, payload) = next(&mut socket).await.unwrap();
    assert_eq!((kind, stream, payload[0]), (HEADERS, 1, 0x88), ":status 200");
    let mut body = Vec::new();
    loop {
        let (kind, flags, stream, payload) = next(&mut socket).await.unwrap();
        assert_eq!((kind, stream), (DATA, 1));
        body.extend(payload);
        if flags & END_STREAM != 0 {
            break;
        }
    }
    assert_eq!(body, b"hello world", "the body without its padding");
    // CONNECT (only :method and :authority): 405, saying why.
    let mut connect_block = vec![0x02, 0x07];
    connect_block.extend(b"CONNECT");
    connect_block.extend([0x01, 0x0e]);
    connect_block.extend(b"example.com:80");
    send(&mut socket, HEADERS, END_HEADERS, 3, &connect_block).await;
    let (kind, _, stream, payload) = next(&mut socket).await.unwrap();
    assert_eq!((kind, stream), (HEADERS, 3));
    // `:status 405`: a literal with the name of static entry 8; the error
    // header a literal with a new name (the proxy's encoder never indexes).
    assert_eq!(&payload[..5], &[0x08, 0x03, b'4', b'0', b'5']);
    let text = String::from_utf8_lossy(&payload);
    assert!(
        text.contains("x-loopmesh-error") && text.contains("connect-not-supported"),
        "{text:?}"
    );
    mesh.agent.stop();
}
