//! The agent binary serving traffic: etcd change → render → reload, static
//! mode following hand edits, and a bad table leaving the data plane alone.

mod common;

use common::{
    eventually_async, eventually_metrics, id_echo_backend as backend, read, unique_ip, Etcd, Loopmesh,
};
use std::net::SocketAddr;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Connects and returns the backend id that answered, if any.
async fn who_answers(addr: SocketAddr) -> Option<(BufReader<TcpStream>, String)> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let mut reader = BufReader::new(stream);
    let mut id = String::new();
    (reader.read_line(&mut id).await.ok()? > 0).then(|| (reader, id.trim().to_string()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_reaches_the_data_plane_as_that_services_route_alone() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::agent_config(dir.path(), &etcd, "");
    let agent = Loopmesh::spawn(&["agent", "--config", config.to_str().unwrap()], dir.path());
    let (one, two, other) = (backend("one").await, backend("two").await, backend("other").await);
    let (changing, quiet) = (service_addr(), service_addr());
    for (name, svc, id, at) in [
        ("changing", changing, "one", one),
        ("quiet", quiet, "other", other),
    ] {
        common::register_service(&mut client, name, svc, id, at).await;
    }
    eventually_async("changing to answer", || who_answers(changing)).await;
    eventually_async("quiet to answer", || who_answers(quiet)).await;

    // The other service's route file, spoiled behind the agent's back: a
    // change elsewhere must not read it (reading every route per change
    // refused the whole table here, and cost the size of the table).
    let spoiled = dir.path().join("state/routes/quiet.json");
    std::fs::write(&spoiled, "{not a route").unwrap();
    client
        .put("/loopmesh/instances/changing/two", instance(two), None)
        .await
        .unwrap();
    client
        .delete("/loopmesh/instances/changing/one", None)
        .await
        .unwrap();
    eventually_async("changing to move to two", || async {
        let (_, id) = who_answers(changing).await?;
        (id == "two").then_some(())
    })
    .await;
    let (_, id) = who_answers(quiet).await.expect("quiet still answers");
    assert_eq!(id, "other");
    assert!(
        !agent.log_text().contains("quiet.json"),
        "a change to another service read quiet's route:\n{}",
        agent.log_text()
    );
}

/// A service address owned by this test: a unique IP and a free port on it.
fn service_addr() -> SocketAddr {
    std::net::TcpListener::bind((unique_ip(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

fn instance(addr: SocketAddr) -> String {
    format!(r#"{{"host": "{}", "port": {}}}"#, addr.ip(), addr.port())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_written_to_etcd_is_reachable_and_a_removed_one_drains() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::agent_config(dir.path(), &etcd, "proxy: {drain_timeout: 30s}\n");
    let _agent = Loopmesh::spawn(&["agent", "--config", config.to_str().unwrap()], dir.path());

    let (one, two) = (backend("one").await, backend("two").await);
    let svc = service_addr();
    // Pin the address so this test owns it; the port is the service's.
    client
        .put("/loopmesh/addresses/api", svc.ip().to_string(), None)
        .await
        .unwrap();
    client
        .put("/loopmesh/services/api", format!("port: {}", svc.port()), None)
        .await
        .unwrap();
    client
        .put("/loopmesh/instances/api/one", instance(one), None)
        .await
        .unwrap();
    let (mut open, id) = eventually_async("api to answer through the proxy", || who_answers(svc)).await;
    assert_eq!(id, "one");

    // Backends change underneath: new connections follow, the open one stays.
    client
        .put("/loopmesh/instances/api/two", instance(two), None)
        .await
        .unwrap();
    client.delete("/loopmesh/instances/api/one", None).await.unwrap();
    eventually_async("traffic to move to two", || async {
        let (_, id) = who_answers(svc).await?;
        (id == "two").then_some(())
    })
    .await;
    open.get_mut().write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");

    // The service goes: its address stops accepting, the open connection lives on.
    client.delete("/loopmesh/services/api", None).await.unwrap();
    eventually_async("api to stop accepting", || async {
        TcpStream::connect(svc).await.is_err().then_some(())
    })
    .await;
    open.get_mut().write_all(b"pong").await.unwrap();
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"pong");
}

fn write_route(dir: &Path, service: &str, addr: SocketAddr, backends: &[(&str, SocketAddr)]) {
    let list: Vec<String> = backends
        .iter()
        .map(|(id, b)| format!(r#""{id}": {{"host": "{}", "port": {}}}"#, b.ip(), b.port()))
        .collect();
    let text = format!(
        r#"{{"service": "{service}", "address": "{}", "spec": {{"port": {}, "connect_timeout": "1s", "idle_timeout": "60s", "retries": 1}}, "backends": {{{}}}}}"#,
        addr.ip(),
        addr.port(),
        list.join(", ")
    );
    let staged = dir.join(format!(".{service}.tmp"));
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(staged, dir.join(format!("{service}.json"))).unwrap();
}

/// `rounds` echoes of a line each on a connection to a [`backend`].
async fn exchange(stream: &mut BufReader<TcpStream>, rounds: u32) {
    for round in 0..rounds {
        let message = format!("round {round}\n");
        stream.get_mut().write_all(message.as_bytes()).await.unwrap();
        let mut back = vec![0u8; message.len()];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, message.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn static_mode_follows_hand_edits_and_refuses_a_bad_table_whole() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let routes = state.join("routes");
    std::fs::create_dir_all(&routes).unwrap();
    let (one, two) = (backend("one").await, backend("two").await);
    let (svc, other) = (service_addr(), service_addr());
    write_route(&routes, "static-svc", svc, &[("one", one)]);
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        "proxy: {workers: 2, kernel_forwarding: true, kernel_forwarding_max_open: 2}\n",
    )
    .unwrap();
    let agent = Loopmesh::spawn(
        &[
            "agent",
            "--config",
            config.to_str().unwrap(),
            "--static",
            "--state-dir",
            state.to_str().unwrap(),
        ],
        dir.path(),
    );
    let (_, id) = eventually_async("the static route to answer", || who_answers(svc)).await;
    assert_eq!(id, "one");
    // The configured event loops are the proxy's own threads.
    assert_eq!(proxy_threads(agent.pid()), ["proxy-0", "proxy-1"]);
    // Kernel forwarding is on (the tests run as root), with its thread, and
    // a long-lived connection is handed over after two exchanges each way.
    agent.wait_log("connections are forwarded in the kernel");
    assert_eq!(threads_named(agent.pid(), "sockmap-"), ["sockmap-hangups"]);
    let (mut long, _) = who_answers(svc).await.unwrap();
    exchange(&mut long, 3).await;
    let admin = agent.admin.unwrap();
    eventually_metrics(
        admin,
        "the metrics to show it forwarded in the kernel",
        &[
            "loopmesh_proxy_kernel_forwarding 1",
            "loopmesh_proxy_kernel_connections 1",
        ],
    )
    .await;
    // Three open, kernel_forwarding_max_open 2: the two new ones stay in
    // user space once they are ready, and say so.
    let (mut a, _) = who_answers(svc).await.unwrap();
    let (mut b, _) = who_answers(svc).await.unwrap();
    exchange(&mut a, 3).await;
    exchange(&mut b, 3).await;
    eventually_metrics(
        admin,
        "the metrics to show two connections deferred",
        &[
            "loopmesh_proxy_kernel_deferred_total 2",
            "loopmesh_proxy_kernel_connections 1",
        ],
    )
    .await;
    drop((long, a, b));

    write_route(&routes, "static-svc", svc, &[("two", two)]);
    write_route(&routes, "other", other, &[("one", one)]);
    eventually_async("the edit to take effect", || async {
        let (_, id) = who_answers(svc).await?;
        (id == "two").then_some(())
    })
    .await;
    eventually_async("the new service to answer", || who_answers(other)).await;

    // A broken file refuses the whole table: nothing changes, it says why.
    std::fs::write(routes.join("broken.json"), r#"{"service": "broken", "port": 0}"#).unwrap();
    write_route(&routes, "static-svc", svc, &[("one", one)]);
    agent.wait_log("routing table refused");
    assert_eq!(
        who_answers(svc).await.unwrap().1,
        "two",
        "a refused table must not apply"
    );
    assert!(read(&routes.join("broken.json")).is_some());

    std::fs::remove_file(routes.join("broken.json")).unwrap();
    eventually_async("the fixed table to apply", || async {
        let (_, id) = who_answers(svc).await?;
        (id == "one").then_some(())
    })
    .await;
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn kernel_forwarding_needs_cap_bpf_and_cap_net_admin_and_without_them_the_proxy_still_serves() {
    use std::os::unix::fs::PermissionsExt;
    let one = backend("one").await;
    // As an unprivileged user (nobody) with exactly the capabilities the
    // unit drop-in grants, then with none.
    for (caps, said) in [
        ("+bpf,+net_admin", "connections are forwarded in the kernel"),
        (
            "-all",
            "kernel forwarding unavailable: creating the socket map failed",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let routes = state.join("routes");
        std::fs::create_dir_all(&routes).unwrap();
        let svc = service_addr();
        write_route(&routes, "caps", svc, &[("one", one)]);
        let config = dir.path().join("agent.yaml");
        std::fs::write(&config, "proxy: {kernel_forwarding: true}\n").unwrap();
        for path in [dir.path(), &state, &routes] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let (inheritable, ambient) = (format!("--inh-caps={caps}"), format!("--ambient-caps={caps}"));
        let agent = Loopmesh::spawn_wrapped(
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                &inheritable,
                &ambient,
            ],
            &[
                "agent",
                "--config",
                config.to_str().unwrap(),
                "--static",
                "--state-dir",
                state.to_str().unwrap(),
            ],
            dir.path(),
            &[],
        );
        agent.wait_log(said);
        let (_, id) = eventually_async("the route to answer", || who_answers(svc)).await;
        assert_eq!(id, "one");
        agent.stop();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_started_with_etcd_down_serves_its_last_routing_table() {
    let mut etcd = Etcd::start();
    let mut client = etcd.client().await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::agent_config(dir.path(), &etcd, "");
    let one = backend("one").await;
    let svc = service_addr();
    client
        .put("/loopmesh/addresses/lkg", svc.ip().to_string(), None)
        .await
        .unwrap();
    client
        .put("/loopmesh/services/lkg", format!("port: {}", svc.port()), None)
        .await
        .unwrap();
    client
        .put("/loopmesh/instances/lkg/one", instance(one), None)
        .await
        .unwrap();
    let agent = Loopmesh::spawn(&["agent", "--config", config.to_str().unwrap()], dir.path());
    eventually_async("lkg to answer", || who_answers(svc)).await;
    agent.stop();

    etcd.stop();
    let agent = Loopmesh::spawn(&["agent", "--config", config.to_str().unwrap()], dir.path());
    agent.wait_log("catalog unreachable");
    let (_, id) = eventually_async("lkg to answer from the files on disk", || who_answers(svc)).await;
    assert_eq!(id, "one");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_whose_port_was_taken_comes_up_once_it_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let routes = state.join("routes");
    std::fs::create_dir_all(&routes).unwrap();
    let one = backend("one").await;
    let (taken, free) = (service_addr(), service_addr());
    let squatter = std::net::TcpListener::bind(taken).unwrap();
    write_route(&routes, "taken", taken, &[("one", one)]);
    write_route(&routes, "free", free, &[("one", one)]);
    let agent = Loopmesh::spawn(
        &["agent", "--static", "--state-dir", state.to_str().unwrap()],
        dir.path(),
    );
    eventually_async("the free service to answer", || who_answers(free)).await;
    agent.wait_log(&format!("service taken not served: cannot listen on {taken}"));

    // Nothing in the table changes: the agent retries on its own.
    drop(squatter);
    let (_, id) = eventually_async("the taken service to come up", || who_answers(taken)).await;
    assert_eq!(id, "one");
    agent.wait_log("service taken is listening now that its address is free");
}

/// Names of the proxy event-loop threads of process `pid`, sorted.
fn proxy_threads(pid: u32) -> Vec<String> {
    threads_named(pid, "proxy-")
}

/// The sorted names of a process's threads that start with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_on_the_agents_own_admin_or_dns_address_is_refused_and_the_node_stays_ready() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::agent_config(dir.path(), &etcd, "");
    let agent = Loopmesh::spawn(&["agent", "--config", config.to_str().unwrap()], dir.path());
    let (admin, dns) = (agent.admin.unwrap(), agent.dns.unwrap());
    let svc = service_addr();
    client
        .put("/loopmesh/addresses/ok", svc.ip().to_string(), None)
        .await
        .unwrap();
    client
        .put("/loopmesh/services/ok", format!("port: {}", svc.port()), None)
        .await
        .unwrap();
    // One service pinned onto the admin API, one onto the DNS server.
    client
        .put("/loopmesh/addresses/on-admin", admin.ip().to_string(), None)
        .await
        .unwrap();
    client
        .put(
            "/loopmesh/services/on-admin",
            format!("port: {}", admin.port()),
            None,
        )
        .await
        .unwrap();
    client
        .put("/loopmesh/services/on-dns", format!("port: {}", dns.port()), None)
        .await
        .unwrap();
    client
        .put("/loopmesh/addresses/on-dns", dns.ip().to_string(), None)
        .await
        .unwrap();
    let state = dir.path().join("state");
    eventually_async("ok rendered", || async { read(&state.join("routes/ok.json")) }).await;
    // Whichever of the two keys arrives second is refused, naming itself
    // (a snapshot brings addresses/ before services/).
    let refused = |service: &str| {
        let log = agent.log_text();
        ["services", "addresses"]
            .iter()
            .map(|kind| format!("{kind}/{service}"))
            .find(|key| log.contains(&format!("invalid catalog value at {key}: ")))
    };
    let on_admin = eventually_async("the service on the admin API refused", || async {
        refused("on-admin")
    })
    .await;
    let on_dns = eventually_async("the service on the DNS server refused", || async {
        refused("on-dns")
    })
    .await;
    let log = agent.log_text();
    assert!(
        log.contains(&format!("{admin} is this agent's own admin API")),
        "{log}"
    );
    assert!(
        log.contains(&format!("{dns} is this agent's own DNS server")),
        "{log}"
    );
    assert_eq!(
        log.matches("is this agent's own").count(),
        2,
        "one line each: {log}"
    );
    assert!(read(&state.join("routes/on-admin.json")).is_none());
    assert!(read(&state.join("routes/on-dns.json")).is_none());
    // Ready once the table is applied, the refused services notwithstanding.
    eventually_async("the agent to be ready", || async {
        common::http_get(admin, "/ready")
            .await
            .filter(|(status, _)| *status == 200)
    })
    .await;
    // The log line is written as the key is judged; the admin API publishes
    // the pass once it is rendered and applied, a moment later.
    eventually_async("both refused keys listed by /catalog", || async {
        common::http_get(admin, "/catalog")
            .await
            .filter(|(_, catalog)| catalog.contains(&on_admin) && catalog.contains(&on_dns))
    })
    .await;
    agent.stop();
}
