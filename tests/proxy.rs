//! The L4 proxy with real sockets: backends that name themselves and echo,
//! clients on loopback, routing tables applied the way the agent applies them.

mod common;

use common::{eventually_async, unique_ip};
use loopmesh::catalog::{parse_service, Balance, Instance, InstanceState};
use loopmesh::proxy::{congestion, ProxyManager, ProxySettings};
use loopmesh::routing::Route;

/// A backend of a route: its id and instance.
type Backend = (String, Instance);
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A backend that writes its id and a newline, then echoes until EOF.
struct EchoBackend {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl EchoBackend {
    async fn start(id: &str) -> EchoBackend {
        let listener = TcpListener::bind((unique_ip(), 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let id = id.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let id = id.clone();
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    if write.write_all(format!("{id}\n").as_bytes()).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                });
            }
        });
        EchoBackend { addr, task }
    }

    fn backend(&self, id: &str, weight: u32) -> Backend {
        backend_at(id, self.addr, weight)
    }

    /// Stops accepting: new connects are refused.
    fn kill(&self) {
        self.task.abort();
    }
}

/// A backend `id` at `addr`, up.
fn backend_at(id: &str, addr: SocketAddr, weight: u32) -> Backend {
    let instance = Instance {
        host: addr.ip().to_string(),
        port: addr.port(),
        node: None,
        zone: None,
        tags: Vec::new(),
        weight,
        state: InstanceState::Up,
        mesh: None,
    };
    (id.to_string(), instance)
}

/// A service address of this test's own, with a port free on it.
fn service_addr() -> SocketAddr {
    let ip = unique_ip();
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

fn route(name: &str, addr: SocketAddr, balance: Balance, backends: Vec<Backend>) -> Route {
    Route {
        rendered_by: None,
        service: name.into(),
        address: match addr.ip() {
            std::net::IpAddr::V4(v4) => v4,
            std::net::IpAddr::V6(_) => unreachable!("test addresses are IPv4"),
        },
        spec: {
            let mut spec =
                parse_service(format!("{{port: {}, idle_timeout: 60s}}", addr.port()).as_bytes()).unwrap();
            spec.balance = balance;
            spec
        },
        backends: backends.into_iter().collect(),
    }
}

fn table(routes: &[&Route]) -> BTreeMap<String, Route> {
    routes.iter().map(|r| (r.service.clone(), (*r).clone())).collect()
}

fn manager(drain: Duration) -> ProxyManager {
    ProxyManager::new(ProxySettings {
        drain_timeout: drain,
        node_zone: None,
        loopback_congestion: None,
        // Two loops whatever the machine, so that listeners share their port.
        workers: 2,
        ..ProxySettings::default()
    })
    .unwrap()
}

/// A manager forwarding in the kernel; these tests need root (CAP_BPF,
/// CAP_NET_ADMIN), as the agent does for `proxy.kernel_forwarding`.
fn kernel_manager(drain: Duration) -> ProxyManager {
    kernel_manager_for(drain, loopmesh::proxy::DEFAULT_KERNEL_CONNECTIONS, u32::MAX)
}

/// A manager forwarding at most `kernel_connections` in the kernel, handed
/// over while at most `max_open` are open.
fn kernel_manager_for(drain: Duration, kernel_connections: u32, max_open: u32) -> ProxyManager {
    let proxy = ProxyManager::new(ProxySettings {
        drain_timeout: drain,
        node_zone: None,
        loopback_congestion: None,
        workers: 2,
        kernel_forwarding: true,
        kernel_connections,
        kernel_forwarding_max_open: max_open,
        ..ProxySettings::default()
    })
    .unwrap();
    assert!(
        proxy.kernel_forwarding(),
        "kernel forwarding unavailable (see the warning above): run as root on Linux 5.13 or later"
    );
    proxy
}

/// Three echo backends a, b, c behind one service with `balance`, applied.
async fn three_backend_service(name: &str, balance: Balance) -> ([EchoBackend; 3], SocketAddr, ProxyManager) {
    let backends = [
        EchoBackend::start("a").await,
        EchoBackend::start("b").await,
        EchoBackend::start("c").await,
    ];
    let addr = service_addr();
    let list = backends
        .iter()
        .zip(["a", "b", "c"])
        .map(|(b, id)| b.backend(id, 1))
        .collect();
    let mut proxy = manager(Duration::from_secs(5));
    proxy.apply(&table(&[&route(name, addr, balance, list)])).await;
    (backends, addr, proxy)
}

/// Applies a table of one round-robin service `name` on `addr` with one backend.
async fn serve_one(proxy: &mut ProxyManager, name: &str, addr: SocketAddr, backend: Backend) {
    proxy
        .apply(&table(&[&route(name, addr, Balance::RoundRobin, vec![backend])]))
        .await;
}

/// Connects through the proxy and returns the stream and the backend's id.
async fn connect(addr: SocketAddr) -> (BufReader<TcpStream>, String) {
    let stream = TcpStream::connect(addr).await.expect("the proxy accepts");
    let mut reader = BufReader::new(stream);
    let mut id = String::new();
    reader.read_line(&mut id).await.unwrap();
    (reader, id.trim().to_string())
}

/// Sends `data` and reads the same bytes back.
async fn echo(stream: &mut BufReader<TcpStream>, data: &[u8]) {
    stream.get_mut().write_all(data).await.unwrap();
    let mut back = vec![0; data.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data, "bytes changed in flight");
}

/// True once the connection is closed by the other side.
async fn closed(stream: &mut BufReader<TcpStream>) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(common::PATIENCE, stream.read_to_end(&mut rest)).await,
        Ok(Ok(_)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn weighted_round_robin_splits_connections_by_weight() {
    let (a, b) = (EchoBackend::start("a").await, EchoBackend::start("b").await);
    let addr = service_addr();
    let svc = route(
        "web",
        addr,
        Balance::RoundRobin,
        vec![a.backend("a", 1), b.backend("b", 3)],
    );
    let mut proxy = manager(Duration::from_secs(5));
    let report = proxy.apply(&table(&[&svc])).await;
    assert_eq!(report.added, vec!["web".to_string()]);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..200 {
        let (_, id) = connect(addr).await;
        *counts.entry(id).or_default() += 1;
    }
    assert_eq!((counts["a"], counts["b"]), (50, 150));
}

#[tokio::test(flavor = "multi_thread")]
async fn consistent_hash_keeps_a_client_on_one_backend() {
    let (_backends, addr, _proxy) = three_backend_service("sticky", Balance::ConsistentHash).await;
    let (_, first) = connect(addr).await;
    for _ in 0..20 {
        assert_eq!(connect(addr).await.1, first);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_backend_is_ejected_and_traffic_continues() {
    let (backends, addr, proxy) = three_backend_service("db", Balance::RoundRobin).await;
    backends[1].kill();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..60 {
        let (_, id) = connect(addr).await;
        *counts.entry(id).or_default() += 1;
    }
    assert!(!counts.contains_key("b"), "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 60, "every connection was served");
    let status = proxy.backend_status("db");
    assert!(
        status.iter().any(|(id, ejected, _)| id == "b" && *ejected),
        "{status:?}"
    );
    assert!(
        status.iter().all(|(id, ejected, _)| id == "b" || !ejected),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn long_lived_connections_survive_hundreds_of_reloads_with_bytes_intact() {
    let (a, b, c) = (
        EchoBackend::start("a").await,
        EchoBackend::start("b").await,
        EchoBackend::start("c").await,
    );
    let addr = service_addr();
    let other_addr = service_addr();
    let mut proxy = manager(Duration::from_secs(5));
    let base = route(
        "stream",
        addr,
        Balance::RoundRobin,
        vec![a.backend("a", 1), b.backend("b", 1)],
    );
    proxy.apply(&table(&[&base])).await;
    let mut open = Vec::new();
    for _ in 0..6 {
        open.push(connect(addr).await.0);
    }
    for round in 0..300u32 {
        // Real changes every time: weights, backends in and out, policies,
        // and another service coming and going beside it.
        let mut next = base.clone();
        next.backends.get_mut("a").unwrap().weight = 1 + round % 5;
        if round % 2 == 0 {
            next.backends.extend([c.backend("c", 2)]);
        }
        if round % 3 == 0 {
            next.spec.balance = Balance::LeastConnections;
        }
        let other = route("other", other_addr, Balance::RoundRobin, vec![c.backend("c", 1)]);
        let tables = if round % 4 == 0 {
            table(&[&next, &other])
        } else {
            table(&[&next])
        };
        let report = proxy.apply(&tables).await;
        assert!(report.failed.is_empty(), "{report:?}");
        for (n, stream) in open.iter_mut().enumerate() {
            let chunk = format!(
                "round {round} stream {n} {}\n",
                "x".repeat((round as usize * 7 + n) % 300)
            );
            echo(stream, chunk.as_bytes()).await;
        }
    }
    // New connections still flow after all that.
    let (mut fresh, _) = connect(addr).await;
    echo(&mut fresh, b"after the reloads").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_service_stops_accepting_while_open_connections_finish() {
    let a = EchoBackend::start("a").await;
    let addr = service_addr();
    let svc = route("gone", addr, Balance::RoundRobin, vec![a.backend("a", 1)]);
    let mut proxy = manager(Duration::from_secs(30));
    proxy.apply(&table(&[&svc])).await;
    let (mut open, _) = connect(addr).await;

    let report = proxy.apply(&BTreeMap::new()).await;
    assert_eq!(report.removed, vec!["gone".to_string()]);
    let refused = TcpStream::connect(addr).await;
    assert!(refused.is_err(), "a removed listener must not accept");
    echo(&mut open, b"still here").await;
    open.get_mut().shutdown().await.unwrap();
    assert!(closed(&mut open).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_drain_deadline_closes_stragglers() {
    let a = EchoBackend::start("a").await;
    let addr = service_addr();
    let svc = route("slow", addr, Balance::RoundRobin, vec![a.backend("a", 1)]);
    let mut proxy = manager(Duration::from_millis(200));
    proxy.apply(&table(&[&svc])).await;
    let (mut open, _) = connect(addr).await;
    proxy.apply(&BTreeMap::new()).await;
    assert!(closed(&mut open).await, "the straggler is closed at the deadline");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taken_port_fails_only_its_service_until_it_is_free() {
    let a = EchoBackend::start("a").await;
    let (taken_addr, free_addr) = (service_addr(), service_addr());
    let squatter = std::net::TcpListener::bind(taken_addr).unwrap();
    let taken = route("taken", taken_addr, Balance::RoundRobin, vec![a.backend("a", 1)]);
    let fine = route("fine", free_addr, Balance::RoundRobin, vec![a.backend("a", 1)]);
    let mut proxy = manager(Duration::from_secs(5));
    let report = proxy.apply(&table(&[&taken, &fine])).await;
    assert_eq!(report.added, vec!["fine".to_string()]);
    let reason = &report.failed["taken"];
    assert!(
        reason.contains(&taken_addr.to_string()) && reason.contains("in use"),
        "{reason}"
    );
    assert_eq!(connect(free_addr).await.1, "a");

    drop(squatter);
    let report = proxy.apply(&table(&[&taken, &fine])).await;
    assert_eq!(report.added, vec!["taken".to_string()]);
    assert!(report.failed.is_empty());
    assert_eq!(connect(taken_addr).await.1, "a");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_circuit_breaker_refuses_the_excess_at_once() {
    let a = EchoBackend::start("a").await;
    let addr = service_addr();
    let mut svc = route("limited", addr, Balance::RoundRobin, vec![a.backend("a", 1)]);
    svc.spec.max_connections = Some(2);
    let mut proxy = manager(Duration::from_secs(5));
    proxy.apply(&table(&[&svc])).await;
    let (_held1, _) = connect(addr).await;
    let (_held2, _) = connect(addr).await;
    let mut third = BufReader::new(TcpStream::connect(addr).await.unwrap());
    let mut line = String::new();
    let read = tokio::time::timeout(common::PATIENCE, third.read_line(&mut line))
        .await
        .unwrap();
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the third connection must be closed, got {line:?}"
    );
    drop(_held1);
    let (_, id) = eventually_async("a slot to free up", || async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let mut reader = BufReader::new(stream);
        let mut id = String::new();
        (reader.read_line(&mut id).await.ok()? > 0).then_some((reader, id))
    })
    .await;
    assert_eq!(id.trim(), "a");
}

#[tokio::test(flavor = "multi_thread")]
async fn half_close_passes_through_and_idle_connections_time_out() {
    let a = EchoBackend::start("a").await;
    let addr = service_addr();
    let mut svc = route("half", addr, Balance::RoundRobin, vec![a.backend("a", 1)]);
    svc.spec.idle_timeout = Duration::from_millis(300);
    let mut proxy = manager(Duration::from_secs(5));
    proxy.apply(&table(&[&svc])).await;

    // Client sends, then closes its write side; it still gets the whole echo.
    let (mut stream, _) = connect(addr).await;
    stream.get_mut().write_all(b"last words").await.unwrap();
    stream.get_mut().shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"last words");

    // A connection nobody speaks on is closed after idle_timeout.
    let (mut quiet, _) = connect(addr).await;
    assert!(closed(&mut quiet).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn draining_backends_get_no_new_connections_but_keep_theirs() {
    let (a, b) = (EchoBackend::start("a").await, EchoBackend::start("b").await);
    let addr = service_addr();
    let svc = route(
        "drain",
        addr,
        Balance::RoundRobin,
        vec![a.backend("a", 1), b.backend("b", 1)],
    );
    let mut proxy = manager(Duration::from_secs(5));
    proxy.apply(&table(&[&svc])).await;
    let mut on_b = None;
    for _ in 0..2 {
        let (stream, id) = connect(addr).await;
        if id == "b" {
            on_b = Some(stream);
        }
    }
    let mut on_b = on_b.expect("round robin reached b");
    let mut draining = svc.clone();
    draining.backends.get_mut("b").unwrap().state = InstanceState::Draining;
    assert_eq!(
        proxy.apply(&table(&[&draining])).await.updated,
        vec!["drain".to_string()]
    );
    for _ in 0..10 {
        assert_eq!(connect(addr).await.1, "a");
    }
    echo(&mut on_b, b"b keeps its connection").await;
}

/// An IPv4 socket address from a getsockname/getpeername-style call on `fd`.
fn socket_addr(
    fd: i32,
    call: unsafe extern "C" fn(i32, *mut libc::sockaddr, *mut libc::socklen_t) -> i32,
) -> Option<SocketAddr> {
    // SAFETY: a zeroed sockaddr_in is valid; the call writes at most `len` bytes.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let rc = unsafe { call(fd, (&mut addr as *mut libc::sockaddr_in).cast(), &mut len) };
    if rc != 0 || i32::from(addr.sin_family) != libc::AF_INET {
        return None;
    }
    let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Some(SocketAddr::from((ip, u16::from_be(addr.sin_port))))
}

/// This process's open file descriptors: the proxy runs in-process, so its
/// sockets are among them.
fn own_fds() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_string_lossy().parse::<i32>().ok())
}

/// This process's connected IPv4 TCP sockets as (fd, local, peer).
fn connected_sockets() -> Vec<(i32, SocketAddr, SocketAddr)> {
    own_fds()
        .filter_map(|fd| {
            Some((
                fd,
                socket_addr(fd, libc::getsockname)?,
                socket_addr(fd, libc::getpeername)?,
            ))
        })
        .collect()
}

/// The congestion control of this process's socket from `local` to `peer`.
fn congestion_of(local: SocketAddr, peer: SocketAddr) -> Option<String> {
    let (fd, _, _) = connected_sockets()
        .into_iter()
        .find(|&(_, l, p)| l == local && p == peer)?;
    congestion::of_socket(fd).ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn loopback_legs_get_the_configured_congestion_control() {
    let backend = EchoBackend::start("a").await;
    let addr = service_addr();
    // An algorithm other than the system default, so that the test can tell
    // them apart: reno is built into every kernel; cubic, its usual default.
    let default = congestion::system_default().unwrap();
    let wanted = if default == "reno" { "cubic" } else { "reno" };
    let mut proxy = ProxyManager::new(ProxySettings {
        drain_timeout: Duration::from_secs(5),
        node_zone: None,
        loopback_congestion: Some(std::sync::Arc::new(std::ffi::CString::new(wanted).unwrap())),
        workers: 2,
        ..ProxySettings::default()
    })
    .unwrap();
    serve_one(&mut proxy, "cc", addr, backend.backend("a", 1)).await;
    let (mut client, id) = connect(addr).await;
    assert_eq!(id, "a");
    echo(&mut client, b"ping").await;
    let client_addr = client.get_ref().local_addr().unwrap();
    // The client's leg: the socket the proxy accepted (inherited from the listener).
    assert_eq!(congestion_of(addr, client_addr).as_deref(), Some(wanted));
    // The backend's leg: the proxy's socket whose peer is the backend.
    let upstream = connected_sockets()
        .into_iter()
        .filter(|&(_, _, peer)| peer == backend.addr)
        .map(|(_, local, _)| local)
        .collect::<Vec<_>>();
    assert_eq!(
        upstream.len(),
        1,
        "one proxied connection to the backend: {upstream:?}"
    );
    assert_eq!(congestion_of(upstream[0], backend.addr).as_deref(), Some(wanted));
    // The test's own client socket keeps the system default.
    assert_eq!(
        congestion_of(client_addr, addr).as_deref(),
        Some(default.as_str())
    );
}

/// This process's TCP listeners on `addr`.
fn listeners_on(addr: SocketAddr) -> usize {
    own_fds()
        .filter(|&fd| socket_addr(fd, libc::getsockname) == Some(addr))
        .filter(|&fd| {
            let mut listening: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: SO_ACCEPTCONN writes one int into the buffer given.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_ACCEPTCONN,
                    (&mut listening as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            rc == 0 && listening == 1
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_worker_listens_on_the_service_port_and_removal_closes_them_all() {
    let a = EchoBackend::start("a").await;
    let addr = service_addr();
    let svc = route("spread", addr, Balance::RoundRobin, vec![a.backend("a", 1)]);
    let mut proxy = manager(Duration::from_secs(5));
    assert_eq!(proxy.worker_count(), 2);
    assert_eq!(
        proxy.apply(&table(&[&svc])).await.added,
        vec!["spread".to_string()]
    );
    assert_eq!(listeners_on(addr), 2, "one listener per worker, sharing the port");
    // Whichever listener the kernel hands a connection to serves it.
    let mut open = Vec::new();
    for i in 0..40 {
        let (mut stream, id) = connect(addr).await;
        assert_eq!(id, "a");
        echo(&mut stream, format!("connection {i}\n").as_bytes()).await;
        open.push(stream);
    }
    let report = proxy.apply(&BTreeMap::new()).await;
    assert_eq!(report.removed, vec!["spread".to_string()]);
    assert_eq!(listeners_on(addr), 0, "every worker's listener is closed");
    let refused = TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    // The open connections drain on their workers.
    for stream in &mut open {
        echo(stream, b"still here\n").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kernel_forwarded_connections_echo_through_reloads_and_pass_half_close() {
    let (a, b) = (EchoBackend::start("a").await, EchoBackend::start("b").await);
    let addr = service_addr();
    let mut proxy = kernel_manager(Duration::from_secs(5));
    let base = route(
        "inkernel",
        addr,
        Balance::RoundRobin,
        vec![a.backend("a", 1), b.backend("b", 1)],
    );
    proxy.apply(&table(&[&base])).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let (stream, id) = connect(addr).await;
        assert!(id == "a" || id == "b", "{id}");
        open.push(stream);
    }
    // A connection is handed to the kernel after two exchanges each way
    // (the id line was the first from the backend).
    for stream in &mut open {
        echo(stream, b"one").await;
        assert_eq!(proxy.kernel_joined(), 0, "joined before its second exchange");
    }
    for stream in &mut open {
        echo(stream, b"two").await;
    }
    eventually_async("every connection is forwarded in the kernel", || async {
        (proxy.kernel_joined() == 4).then_some(())
    })
    .await;
    for round in 0..50u32 {
        let mut next = base.clone();
        next.backends.values_mut().next().unwrap().weight = 1 + round % 3;
        proxy.apply(&table(&[&next])).await;
        for (n, stream) in open.iter_mut().enumerate() {
            let chunk = format!(
                "round {round} stream {n} {}\n",
                "y".repeat((round as usize * 13 + n) % 900)
            );
            echo(stream, chunk.as_bytes()).await;
        }
    }
    // Half-close: the client's FIN reaches the backend after its last
    // bytes, and the echo of them still comes back.
    for stream in &mut open {
        stream.get_mut().write_all(b"last words").await.unwrap();
        stream.get_mut().shutdown().await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"last words");
    }
    eventually_async("closed connections leave the kernel maps", || async {
        (proxy.kernel_joined() == 0).then_some(())
    })
    .await;
}

/// A backend that answers three pings, then reads until EOF, reports what
/// it got, answers with `reply` bytes and closes.
async fn sink_then_reply(reply: Vec<u8>) -> (SocketAddr, tokio::sync::oneshot::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind((unique_ip(), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (report, received) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        for _ in 0..3 {
            let mut ping = [0u8; 5];
            stream.read_exact(&mut ping).await.unwrap();
            assert_eq!(&ping, b"ping\n");
            stream.write_all(b"pong\n").await.unwrap();
        }
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        let _ = report.send(got);
        stream.write_all(&reply).await.unwrap();
        stream.shutdown().await.unwrap();
    });
    (addr, received)
}

#[tokio::test(flavor = "multi_thread")]
async fn kernel_forwarding_carries_bulk_both_ways_after_the_handover() {
    let request: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    let reply: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
    let (backend, received) = sink_then_reply(reply.clone()).await;
    let addr = service_addr();
    let mut proxy = kernel_manager(Duration::from_secs(5));
    let backend = backend_at("sink", backend, 1);
    serve_one(&mut proxy, "bulk", addr, backend).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    for _ in 0..3 {
        stream.write_all(b"ping\n").await.unwrap();
        let mut pong = [0u8; 5];
        stream.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong\n");
    }
    eventually_async("the connection is forwarded in the kernel", || async {
        (proxy.kernel_joined() == 1).then_some(())
    })
    .await;
    // The bulk goes through the kernel both ways, with the half-close.
    let (mut read, mut write) = stream.split();
    let sent = request.clone();
    let writing = async move {
        write.write_all(&sent).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let reading = read.read_to_end(&mut back);
    let ((), read_result) = tokio::join!(writing, reading);
    read_result.unwrap();
    let got = received.await.unwrap();
    assert_eq!(got.len(), request.len(), "the backend got every byte");
    assert!(got == request, "bytes changed on the way to the backend");
    assert_eq!(back.len(), reply.len(), "the client got every byte");
    assert!(back == reply, "bytes changed on the way to the client");
}

#[tokio::test(flavor = "multi_thread")]
async fn kernel_forwarded_connections_idle_out_and_are_killed_at_the_drain_deadline() {
    let a = EchoBackend::start("a").await;
    let (idle_addr, drain_addr) = (service_addr(), service_addr());
    let mut quiet = route("quiet", idle_addr, Balance::RoundRobin, vec![a.backend("a", 1)]);
    quiet.spec.idle_timeout = Duration::from_millis(300);
    let draining = route(
        "draining",
        drain_addr,
        Balance::RoundRobin,
        vec![a.backend("a", 1)],
    );
    let mut proxy = kernel_manager(Duration::from_millis(300));
    proxy.apply(&table(&[&quiet, &draining])).await;

    let (mut idle, _) = connect(idle_addr).await;
    echo(&mut idle, b"once").await;
    echo(&mut idle, b"twice").await;
    let (mut straggler, _) = connect(drain_addr).await;
    echo(&mut straggler, b"before").await;
    echo(&mut straggler, b"the removal").await;
    eventually_async("both connections are forwarded in the kernel", || async {
        (proxy.kernel_joined() == 2).then_some(())
    })
    .await;
    assert!(closed(&mut idle).await, "an idle connection is closed");

    proxy.apply(&table(&[&quiet])).await;
    echo(&mut straggler, b"while draining").await;
    assert!(
        closed(&mut straggler).await,
        "the straggler is closed at the deadline"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_kernel_capacity_connections_stay_in_user_space_intact() {
    let a = EchoBackend::start("a").await;
    let addr = service_addr();
    let mut proxy = kernel_manager_for(Duration::from_secs(5), 1, u32::MAX);
    serve_one(&mut proxy, "cap", addr, a.backend("a", 1)).await;
    let (mut first, _) = connect(addr).await;
    echo(&mut first, b"one").await;
    echo(&mut first, b"two").await;
    eventually_async("the first connection is forwarded in the kernel", || async {
        (proxy.kernel_joined() == 1).then_some(())
    })
    .await;
    // The second finds the maps full: its hand-over fails, undone, and it
    // goes on in user space with every byte.
    let (mut second, _) = connect(addr).await;
    for round in 0..20u32 {
        echo(&mut second, format!("second {round}\n").as_bytes()).await;
        echo(&mut first, format!("first {round}\n").as_bytes()).await;
    }
    assert_eq!(proxy.kernel_joined(), 1);
    second.get_mut().shutdown().await.unwrap();
    assert!(closed(&mut second).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_proxy_keeps_connections_in_user_space_until_the_load_falls() {
    let a = EchoBackend::start("a").await;
    let addr = service_addr();
    let mut proxy = kernel_manager_for(
        Duration::from_secs(5),
        loopmesh::proxy::DEFAULT_KERNEL_CONNECTIONS,
        2,
    );
    serve_one(&mut proxy, "busy", addr, a.backend("a", 1)).await;
    // Three open, two allowed: each is ready after its second exchange and
    // is held back.
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(connect(addr).await.0);
    }
    for stream in &mut open {
        echo(stream, b"one").await;
        echo(stream, b"two").await;
    }
    eventually_async("every connection is deferred once", || async {
        (proxy.kernel_deferred() == 3).then_some(())
    })
    .await;
    for round in 0..20u32 {
        for stream in &mut open {
            echo(stream, format!("busy {round}\n").as_bytes()).await;
        }
    }
    assert_eq!(proxy.kernel_joined(), 0, "handed over while busy");
    assert_eq!(proxy.kernel_deferred(), 3, "deferred more than once each");
    // One closes: two left, each goes to the kernel at its next exchange.
    let mut gone = open.pop().unwrap();
    gone.get_mut().shutdown().await.unwrap();
    assert!(closed(&mut gone).await);
    drop(gone);
    // (The closed one counts until its task ends, just after its FIN.)
    let deadline = std::time::Instant::now() + common::PATIENCE;
    while proxy.kernel_joined() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the two left were never forwarded in the kernel"
        );
        for stream in &mut open {
            echo(stream, b"calm\n").await;
        }
    }
    for round in 0..20u32 {
        for stream in &mut open {
            echo(stream, format!("in kernel {round}\n").as_bytes()).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reset_on_a_kernel_forwarded_connection_closes_the_other_side() {
    // A backend that answers two pings, then resets the connection.
    let listener = TcpListener::bind((unique_ip(), 0)).await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let (reset_now, reset) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        for _ in 0..2 {
            let mut ping = [0u8; 5];
            stream.read_exact(&mut ping).await.unwrap();
            stream.write_all(b"pong\n").await.unwrap();
        }
        let _ = reset.await;
        stream.set_zero_linger().unwrap();
        drop(stream);
    });
    let addr = service_addr();
    let mut proxy = kernel_manager(Duration::from_secs(5));
    let backend = backend_at("resets", backend_addr, 1);
    serve_one(&mut proxy, "reset", addr, backend).await;
    let mut client = BufReader::new(TcpStream::connect(addr).await.unwrap());
    for _ in 0..2 {
        client.get_mut().write_all(b"ping\n").await.unwrap();
        let mut pong = [0u8; 5];
        client.read_exact(&mut pong).await.unwrap();
    }
    eventually_async("the connection is forwarded in the kernel", || async {
        (proxy.kernel_joined() == 1).then_some(())
    })
    .await;
    reset_now.send(()).unwrap();
    assert!(
        closed(&mut client).await,
        "the client's side is closed after the reset"
    );
    eventually_async("the reset connection leaves the kernel maps", || async {
        (proxy.kernel_joined() == 0).then_some(())
    })
    .await;
}
