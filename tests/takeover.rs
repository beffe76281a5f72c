//! Restarts that refuse nothing: the real binary taking its own sockets
//! over (`--takeover`), started by SIGHUP and by `loopmesh reload`, under
//! load: new connections in a loop, a long-lived stream carrying checked
//! data, and DNS queries over UDP and TCP in a loop.

mod common;

use common::{eventually, eventually_async, http_get, id_echo_backend, unique_ip, Etcd, Loopmesh};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A service address owned by this test: a unique IP and a free port on it.
fn service_addr() -> SocketAddr {
    std::net::TcpListener::bind((unique_ip(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An agent on etcd with fixed admin and DNS addresses (a successor takes
/// them over, so every process of the test is given the same ones).
struct Node {
    dir: tempfile::TempDir,
    config: PathBuf,
    admin: SocketAddr,
    dns: SocketAddr,
}

/// A failing test shows every agent's log of the node (a successor that
/// never serves says why there, if anywhere).
impl Drop for Node {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        for log in logs.iter().filter(|p| p.extension().is_some_and(|e| e == "log")) {
            eprintln!(
                "--- {}:\n{}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

impl Node {
    fn new(etcd: &Etcd, extra: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.yaml");
        let admin = std::net::TcpListener::bind((unique_ip(), 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let dns = common::dns_addr();
        let node = Node {
            dir,
            config,
            admin,
            dns,
        };
        node.write_config(etcd, extra);
        node
    }

    fn write_config(&self, etcd: &Etcd, extra: &str) {
        let text = format!(
            "store: {{etcd: {{endpoints: [{}], retry_max: 200ms}}}}\nstate_dir: state\nadmin: {{listen: \"{}\"}}\ndns: {{listen: \"{}\"}}\n{extra}",
            etcd.endpoint(),
            self.admin,
            self.dns
        );
        std::fs::write(&self.config, text).unwrap();
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn spawn(&self, takeover: bool) -> Loopmesh {
        let (admin, dns) = (self.admin.to_string(), self.dns.to_string());
        // The addresses as flags too, or the harness picks its own.
        let mut args = vec![
            "agent",
            "--config",
            self.config.to_str().unwrap(),
            "--admin-listen",
            &admin,
            "--dns-listen",
            &dns,
        ];
        if takeover {
            args.push("--takeover");
        }
        Loopmesh::spawn(&args, self.dir.path())
    }

    /// The pid answering `/ready` once it says ready.
    async fn ready_pid(&self) -> Option<u32> {
        let (status, body) = http_get(self.admin, "/ready").await?;
        let body: serde_json::Value = serde_json::from_str(&body).ok()?;
        (status == 200).then(|| body["pid"].as_u64().map(|pid| pid as u32))?
    }

    async fn wait_ready_as(&self, pid: u32) {
        eventually_async(&format!("pid {pid} to answer /ready"), || async {
            (self.ready_pid().await? == pid).then_some(())
        })
        .await;
    }
}

/// Registers service `name` on `svc` with one backend.
async fn register(etcd: &Etcd, name: &str, svc: SocketAddr, backend: SocketAddr) {
    common::register_service(&mut etcd.client().await, name, svc, "b1", backend).await;
}

/// A DNS A query for `name` in wire form, with `id`.
fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut query = id.to_be_bytes().to_vec();
    query.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        query.push(label.len() as u8);
        query.extend(label.as_bytes());
    }
    query.extend([0, 0, 1, 0, 1]);
    query
}

/// Whether `response` answers query `id` with NOERROR and at least one record.
fn answered(id: u16, response: &[u8]) -> bool {
    response.len() >= 12
        && response[..2] == id.to_be_bytes()
        && response[3] & 0x0f == 0
        && u16::from_be_bytes([response[6], response[7]]) > 0
}

/// One query over UDP or TCP; whether it was answered within 2 s.
async fn resolves(dns: SocketAddr, id: u16, tcp: bool) -> bool {
    let query = a_query(id, "web.mesh.internal");
    let attempt = async {
        if tcp {
            let mut stream = TcpStream::connect(dns).await.ok()?;
            let mut framed = (query.len() as u16).to_be_bytes().to_vec();
            framed.extend(&query);
            stream.write_all(&framed).await.ok()?;
            let length = stream.read_u16().await.ok()?;
            let mut response = vec![0u8; length as usize];
            stream.read_exact(&mut response).await.ok()?;
            Some(answered(id, &response))
        } else {
            let socket = tokio::net::UdpSocket::bind((dns.ip(), 0)).await.ok()?;
            socket.send_to(&query, dns).await.ok()?;
            let mut response = [0u8; 512];
            let (len, _) = socket.recv_from(&mut response).await.ok()?;
            Some(answered(id, &response[..len]))
        }
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

/// Traffic that must not notice a restart: what went wrong, counted.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    connections: AtomicU64,
    failed_connections: AtomicU64,
    stream_bytes: AtomicU64,
    stream_errors: AtomicU64,
    queries: AtomicU64,
    unanswered: AtomicU64,
}

impl Load {
    /// Starts the three loops against `svc` and `dns`.
    async fn start(svc: SocketAddr, dns: SocketAddr) -> (Arc<Load>, Vec<tokio::task::JoinHandle<()>>) {
        let load = Arc::new(Load::default());
        let mut tasks = Vec::new();
        // New connections, one after another: each must reach the backend.
        let connector = load.clone();
        tasks.push(tokio::spawn(async move {
            while !connector.stop.load(Ordering::Relaxed) {
                let ok = async {
                    let stream = TcpStream::connect(svc).await.ok()?;
                    let mut id = String::new();
                    BufReader::new(stream).read_line(&mut id).await.ok()?;
                    (id.trim() == "web").then_some(())
                };
                if ok.await.is_none() {
                    connector.failed_connections.fetch_add(1, Ordering::Relaxed);
                }
                connector.connections.fetch_add(1, Ordering::Relaxed);
            }
        }));
        // One long-lived stream: every chunk comes back intact.
        let streamer = load.clone();
        let stream = TcpStream::connect(svc).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut stream = BufReader::new(stream);
            let mut id = String::new();
            stream.read_line(&mut id).await.unwrap();
            let mut round: u64 = 0;
            while !streamer.stop.load(Ordering::Relaxed) {
                let chunk: Vec<u8> = (0..4096u64).map(|i| ((i * 31 + round * 7) % 251) as u8).collect();
                let mut back = vec![0u8; chunk.len()];
                let echoed = async {
                    stream.get_mut().write_all(&chunk).await.ok()?;
                    stream.read_exact(&mut back).await.ok()
                };
                match tokio::time::timeout(Duration::from_secs(5), echoed).await {
                    Ok(Some(_)) if back == chunk => {
                        streamer
                            .stream_bytes
                            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                    _ => {
                        streamer.stream_errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                round += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
        // DNS over UDP and TCP, alternately.
        let resolver = load.clone();
        tasks.push(tokio::spawn(async move {
            let mut id: u16 = 0;
            while !resolver.stop.load(Ordering::Relaxed) {
                id = id.wrapping_add(1);
                if !resolves(dns, id, id.is_multiple_of(2)).await {
                    resolver.unanswered.fetch_add(1, Ordering::Relaxed);
                }
                resolver.queries.fetch_add(1, Ordering::Relaxed);
            }
        }));
        (load, tasks)
    }

    async fn finish(load: &Load, tasks: Vec<tokio::task::JoinHandle<()>>) {
        load.stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.unwrap();
        }
    }

    fn assert_clean(&self) {
        let (connections, failed) = (
            self.connections.load(Ordering::Relaxed),
            self.failed_connections.load(Ordering::Relaxed),
        );
        let (queries, unanswered) = (
            self.queries.load(Ordering::Relaxed),
            self.unanswered.load(Ordering::Relaxed),
        );
        assert!(connections > 0 && queries > 0, "the load ran");
        assert_eq!(failed, 0, "{failed} of {connections} new connections failed");
        assert_eq!(
            self.stream_errors.load(Ordering::Relaxed),
            0,
            "the long-lived stream broke"
        );
        assert!(
            self.stream_bytes.load(Ordering::Relaxed) > 0,
            "the stream carried data"
        );
        assert_eq!(unanswered, 0, "{unanswered} of {queries} DNS queries unanswered");
    }
}

/// Waits until `old` has stepped aside after handing over.
fn stepped_aside(old: &Loopmesh) {
    old.wait_log("takeover: pid ");
    old.wait_log("agent handed over");
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_takeovers_under_load_refuse_nothing_and_lose_nothing() {
    let etcd = Etcd::start();
    // A long drain: the stream's connection lives in the first process
    // until the test ends.
    let node = Node::new(&etcd, "proxy: {drain_timeout: 5m}\n");
    let backend = id_echo_backend("web").await;
    let svc = service_addr();
    register(&etcd, "web", svc, backend).await;
    let first = node.spawn(false);
    node.wait_ready_as(first.pid()).await;
    eventually_async("web to resolve", || async {
        resolves(node.dns, 1, false).await.then_some(())
    })
    .await;
    eventually_async("web to answer", || async { TcpStream::connect(svc).await.ok() }).await;

    let (load, tasks) = Load::start(svc, node.dns).await;
    let mut agents = vec![first];
    for round in 0..20 {
        let before = load.connections.load(Ordering::Relaxed);
        let next = node.spawn(true);
        node.wait_ready_as(next.pid()).await;
        stepped_aside(agents.last().unwrap());
        // Traffic went on through this round before the next one starts.
        eventually_async(&format!("new connections after takeover {round}"), || async {
            (load.connections.load(Ordering::Relaxed) > before + 20).then_some(())
        })
        .await;
        agents.push(next);
    }
    Load::finish(&load, tasks).await;
    load.assert_clean();
    // Every process but the first (which still drains the stream) is gone
    // and the last one serves; none of them panicked.
    let last = agents.pop().unwrap();
    for agent in &agents {
        assert!(!agent.log_text().contains("panicked"), "{}", agent.log_text());
    }
    last.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_takes_over_with_the_new_config_and_reload_refuses_a_bad_one() {
    let etcd = Etcd::start();
    // A long drain: the stream's connection lives in the first process.
    let drain = "proxy: {drain_timeout: 5m}\n";
    let node = Node::new(&etcd, drain);
    let backend = id_echo_backend("web").await;
    let svc = service_addr();
    register(&etcd, "web", svc, backend).await;
    let mut first = node.spawn(false);
    node.wait_ready_as(first.pid()).await;
    eventually_async("web to resolve", || async {
        resolves(node.dns, 1, false).await.then_some(())
    })
    .await;
    let (load, tasks) = Load::start(svc, node.dns).await;

    // A changed config: one more template resource. SIGHUP starts a
    // successor that reads it and takes the sockets over.
    node.write_config(
        &etcd,
        &format!("{drain}templates:\n  - {{src: hosts.tera, dest: hosts}}\n"),
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(first.pid() as i32, libc::SIGHUP) };
    stepped_aside(&first);
    let first_pid = first.pid();
    let successor: u32 = eventually_async("a successor to answer /ready", || async {
        node.ready_pid().await.filter(|pid| *pid != first_pid)
    })
    .await;
    let _successor = common::Adopted(successor);
    eventually("the new config's template rendered", || {
        common::read(&node.state().join("hosts")).filter(|hosts| hosts.contains("web.mesh.internal"))
    });
    assert!(
        first.exited().is_none(),
        "the first agent drains the stream's connection"
    );

    // A broken config: `loopmesh reload` fails naming it, and the running
    // agent serves on.
    std::fs::write(&node.config, "proxy: {workers: 0}\n").unwrap();
    let (ok, _, stderr) = common::run(&["reload", "--state-dir", node.state().to_str().unwrap()]);
    assert!(!ok, "a reload onto a broken config succeeded");
    assert!(stderr.contains("proxy.workers"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert_eq!(
        node.ready_pid().await,
        Some(successor),
        "the running agent serves on: {:?}",
        http_get(node.admin, "/ready").await
    );

    // Fixed again: `loopmesh reload` answers with the pid that serves now.
    node.write_config(&etcd, drain);
    let pid = common::reload(&["--config", node.config.to_str().unwrap()])
        .unwrap_or_else(|err| panic!("{err}\n{}", first.log_text()));
    let _reloaded = common::Adopted(pid);
    assert_eq!(node.ready_pid().await, Some(pid));
    Load::finish(&load, tasks).await;
    load.assert_clean();
}

#[test]
fn reload_without_a_running_agent_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = common::run(&["reload", "--state-dir", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("no agent to take over from at"), "{stderr}");
    assert!(stderr.contains(&dir.path().join("agent.sock").display().to_string()));
    let state: &Path = dir.path();
    let (ok, _, stderr) = common::run(&[
        "agent",
        "--static",
        "--takeover",
        "--state-dir",
        state.to_str().unwrap(),
        "--dns-listen",
        &common::dns_addr().to_string(),
        "--admin-listen",
        &format!("{}:0", unique_ip()),
    ]);
    assert!(!ok);
    assert!(stderr.contains("no agent to take over from at"), "{stderr}");
}
