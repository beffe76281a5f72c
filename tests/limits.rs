//! The descriptor budget of the real agent: half-sent admin requests are
//! closed and cannot starve the proxy; the proxy stops accepting at its own
//! budget and leaves the admin API answering.

mod common;

use common::{
    eventually_async, eventually_metrics, http_get, id_echo_backend as backend, unique_ip, Loopmesh,
};
use std::net::SocketAddr;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Reads the backend's id line from a proxied connection.
async fn id_line(stream: &mut BufReader<TcpStream>) -> Option<String> {
    let mut id = String::new();
    (stream.read_line(&mut id).await.ok()? > 0).then(|| id.trim().to_string())
}

/// A static-mode agent serving one service at a fresh address, with
/// `config` as its YAML config; the agent and the service's address.
async fn static_agent(dir: &Path, config: &str, wrapper: &[&str]) -> (Loopmesh, SocketAddr) {
    let state = dir.join("state");
    let routes = state.join("routes");
    std::fs::create_dir_all(&routes).unwrap();
    let svc = std::net::TcpListener::bind((unique_ip(), 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let one = backend("one").await;
    // The smallest hand-written route (README, static mode): every setting
    // left out takes the catalog's default.
    std::fs::write(
        routes.join("svc.yaml"),
        format!(
            "service: svc\naddress: {}\nspec: {{port: {}}}\nbackends:\n  one: {{host: {}, port: {}}}\n",
            svc.ip(),
            svc.port(),
            one.ip(),
            one.port()
        ),
    )
    .unwrap();
    let config_path = dir.join("agent.yaml");
    std::fs::write(&config_path, config).unwrap();
    let agent = Loopmesh::spawn_wrapped(
        wrapper,
        &[
            "agent",
            "--config",
            config_path.to_str().unwrap(),
            "--static",
            "--state-dir",
            state.to_str().unwrap(),
        ],
        dir,
        &[],
    );
    eventually_async("the agent to be ready", || async {
        http_get(agent.admin.unwrap(), "/ready")
            .await
            .filter(|(status, _)| *status == 200)
    })
    .await;
    (agent, svc)
}

/// The value of the first sample of `name` with `label` in a metrics text.
fn sample(metrics: &str, name: &str, label: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(name) && line.contains(label))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn half_sent_admin_requests_are_closed_and_cannot_starve_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    // 200 descriptors: 150 half-sent requests would have taken most of them.
    let (agent, svc) = static_agent(
        dir.path(),
        "log_level: info\n",
        &["prlimit", "--nofile=200:200", "--"],
    )
    .await;
    agent.wait_log("up to 75 connections open at once (open-file limit 200)");
    let admin = agent.admin.unwrap();
    let mut slow = Vec::new();
    for _ in 0..150 {
        let mut stream = TcpStream::connect(admin).await.unwrap();
        stream.write_all(b"GET /live HTTP/1.1\r\n").await.unwrap();
        slow.push(stream);
    }
    // The data plane goes on while the admin's share is held.
    let mut proxied = BufReader::new(TcpStream::connect(svc).await.unwrap());
    assert_eq!(id_line(&mut proxied).await.as_deref(), Some("one"));
    // Every half-sent request is closed by the agent (after the header read
    // timeout; those beyond the admin's 64 slots once they are accepted).
    for (index, stream) in slow.iter_mut().enumerate() {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(common::PATIENCE, stream.read_to_end(&mut rest)).await;
        assert!(
            read.is_ok(),
            "half-sent admin request {index} still open after {:?}",
            common::PATIENCE
        );
    }
    let metrics = eventually_metrics(
        admin,
        "the admin budget gauge",
        &["loopmesh_connection_budget{purpose=\"admin\"} 64"],
    )
    .await;
    let exhausted = sample(
        &metrics,
        "loopmesh_connection_budget_exhausted_total",
        "purpose=\"admin\"",
    );
    assert!(
        exhausted.is_some_and(|n| n >= 1.0),
        "admin budget hit is counted: {metrics}"
    );
    // Still proxying on the connection opened meanwhile.
    proxied.get_mut().write_all(b"ping\n").await.unwrap();
    assert_eq!(id_line(&mut proxied).await.as_deref(), Some("ping"));
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_stops_accepting_at_its_budget_and_serves_the_backlog_when_a_slot_frees() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, svc) = static_agent(dir.path(), "proxy: {max_open_connections: 3}\n", &[]).await;
    let admin = agent.admin.unwrap();
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = BufReader::new(TcpStream::connect(svc).await.unwrap());
        assert_eq!(id_line(&mut stream).await.as_deref(), Some("one"));
        open.push(stream);
    }
    // The fourth is taken by the kernel's backlog, and the proxy, at its
    // budget, waits with it instead of serving it.
    let mut fourth = BufReader::new(TcpStream::connect(svc).await.unwrap());
    eventually_metrics(
        admin,
        "the proxy's budget to be counted as exhausted",
        &[
            "loopmesh_connection_budget{purpose=\"proxy\"} 3",
            "loopmesh_connection_budget_exhausted_total{purpose=\"proxy\"} 1",
        ],
    )
    .await;
    // The admin API has descriptors of its own and answers.
    let (status, _) = http_get(admin, "/ready").await.unwrap();
    assert_eq!(status, 200);
    // A slot frees: the waiting connection is served.
    drop(open.pop());
    assert_eq!(id_line(&mut fourth).await.as_deref(), Some("one"));
    agent.stop();
}
