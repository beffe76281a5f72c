//! mTLS between nodes, with nodes as network namespaces: each namespace
//! runs its own agent (the real binary), a bridge joins them, etcd listens
//! on the bridge where every node reaches it. Certificates come from
//! `loopmesh ca`. Needs root (CI runs as root), as `ip netns` does.

mod common;

use common::{eventually, Etcd, Loopmesh};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Runs a command; its stdout if it succeeded.
fn run(args: &[&str]) -> Result<String, String> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|err| format!("{args:?}: {err}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn must(args: &[&str]) -> String {
    run(args).unwrap_or_else(|err| panic!("{err}"))
}

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// A node: a namespace with one interface on the bridge.
struct Node {
    ns: String,
    ip: Ipv4Addr,
}

impl Node {
    /// `args` run inside the node.
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["ip", "netns", "exec", &self.ns];
        all.extend_from_slice(args);
        run(&all)
    }
}

/// Namespaces on a bridge of their own, removed when dropped.
struct Net {
    bridge: String,
    gateway: Ipv4Addr,
    nodes: Vec<Node>,
}

impl Net {
    fn create(count: usize) -> Net {
        assert_eq!(unsafe { libc::geteuid() }, 0, "network namespaces need root");
        // One at a time: a /24 is free until its bridge has its address.
        static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = CREATING.lock().unwrap_or_else(|e| e.into_inner());
        let tag = format!(
            "{:x}{:x}",
            std::process::id() % 0xffff,
            NEXT_NET.fetch_add(1, Ordering::Relaxed)
        );
        // A /24 nobody on this machine uses.
        let used = must(&["ip", "-o", "-4", "addr"]);
        let (a, b) = (0..4000u32)
            .map(|n| {
                (
                    200 + (std::process::id() + n) % 50,
                    (std::process::id() / 50 + n * 7) % 250,
                )
            })
            .find(|(a, b)| !used.contains(&format!(" 10.{a}.{b}.")))
            .expect("a free 10.x.y.0/24");
        let gateway = Ipv4Addr::new(10, a as u8, b as u8, 1);
        let bridge = format!("lmb{tag}");
        let mut net = Net {
            bridge: bridge.clone(),
            gateway,
            nodes: Vec::new(),
        };
        must(&["ip", "link", "add", &bridge, "type", "bridge"]);
        must(&["ip", "addr", "add", &format!("{gateway}/24"), "dev", &bridge]);
        must(&["ip", "link", "set", &bridge, "up"]);
        for i in 0..count {
            let ns = format!("lm{tag}n{i}");
            let veth = format!("lmv{tag}{i}");
            let ip = Ipv4Addr::new(10, a as u8, b as u8, 2 + i as u8);
            must(&["ip", "netns", "add", &ns]);
            net.nodes.push(Node { ns: ns.clone(), ip });
            must(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            must(&["ip", "link", "set", &veth, "master", &bridge, "up"]);
            must(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            must(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = run(&["ip", "netns", "del", &node.ns]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}

/// The mesh's certificates: a CA, and one certificate per node.
struct Certificates {
    dir: PathBuf,
    trust_domain: String,
}

impl Certificates {
    fn new(dir: &Path, trust_domain: &str, nodes: &[&str]) -> Certificates {
        let ca = dir.join("ca");
        let binary = env!("CARGO_BIN_EXE_loopmesh");
        must(&[
            binary,
            "ca",
            "init",
            "--trust-domain",
            trust_domain,
            "--out",
            ca.to_str().unwrap(),
        ]);
        for node in nodes {
            must(&[
                binary,
                "ca",
                "issue",
                "--node",
                node,
                "--ca",
                ca.to_str().unwrap(),
                "--out",
                dir.to_str().unwrap(),
            ]);
        }
        Certificates {
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
        }
    }

    fn cert(&self, node: &str) -> String {
        self.dir.join(format!("{node}.pem")).display().to_string()
    }

    fn key(&self, node: &str) -> String {
        self.dir.join(format!("{node}.key")).display().to_string()
    }

    fn bundle(&self) -> String {
        self.dir.join("bundle.pem").display().to_string()
    }

    fn identity(&self, node: &str) -> String {
        format!("spiffe://{}/node/{node}", self.trust_domain)
    }
}

/// A backend process in a node, on the node's 127.0.0.1 only (the echo
/// backend says its id on a line, then echoes).
struct EchoBackend {
    child: Child,
    port: u16,
}

const ECHO: &str = r#"
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(1024)
print(s.getsockname()[1], flush=True)
def serve(c):
    c.sendall(sys.argv[1].encode() + b"\n")
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

impl EchoBackend {
    fn start(node: &Node, id: &str) -> EchoBackend {
        EchoBackend::run(node, ECHO, id)
    }

    /// Runs `script` (a Python server that prints its port first) in `node`.
    fn run(node: &Node, script: &str, id: &str) -> EchoBackend {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node.ns, "python3", "-c", script, id])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        EchoBackend {
            port: line.trim().parse().expect("the backend's port"),
            child,
        }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client in a node: `count` connections to `host:port` one after the
/// other, each reading the id line and checking an echo; prints the ids
/// seen, one per connection ("-" for a connection that got nothing).
const CLIENT: &str = r#"
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    try:
        c = socket.create_connection((host, port), timeout=5)
        f = c.makefile("rb")
        ident = f.readline().decode().strip()
        if not ident:
            print("-"); continue
        msg = b"ping %d\n" % i
        c.sendall(msg)
        back = f.readline()
        print(ident if back == msg else "bad-echo:" + ident)
        c.close()
    except Exception as e:
        print("-")
"#;

fn connect_from(node: &Node, host: &str, port: u16, count: u32) -> Vec<String> {
    node.run(&[
        "python3",
        "-c",
        CLIENT,
        host,
        &port.to_string(),
        &count.to_string(),
    ])
    .unwrap()
    .lines()
    .map(str::to_string)
    .collect()
}

/// A CONNECT stream to the inbound listener at `inbound` (node B's) as
/// node A, from this test's own rustls and hyper client: `authority`, and
/// `service` in `x-loopmesh-service` when given. Says the status and then
/// the first line the target sent, or the refusal's reason.
async fn connect_stream(
    certs: &Certificates,
    inbound: std::net::SocketAddr,
    authority: &str,
    service: Option<&str>,
) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncBufReadExt;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(certs.bundle()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(certs.cert("node-a"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(certs.key("node-a")).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("node-b").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri(authority);
    if let Some(service) = service {
        request = request.header("x-loopmesh-service", service);
    }
    let request = request
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    if status != 200 {
        let reason = response
            .headers()
            .get("x-loopmesh-error")
            .map_or("", |v| v.to_str().unwrap());
        return format!("{status} {reason}");
    }
    let upgraded = hyper::upgrade::on(response).await.unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(hyper_util::rt::TokioIo::new(upgraded))
        .read_line(&mut line)
        .await
        .unwrap();
    format!("{status} {}", line.trim())
}

/// An agent of `node` named `name`, on `etcd`, with the mesh on.
/// `mesh_extra` is added to its `mesh` section (`idle_timeout: 1s, `).
fn agent(
    node: &Node,
    name: &str,
    etcd: &Etcd,
    certs: &Certificates,
    dir: &Path,
    mesh_extra: &str,
) -> Loopmesh {
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        format!(
            "node: {name}\nstore: {{etcd: {{endpoints: [{}], retry_max: 200ms}}}}\nstate_dir: {}\nmesh: {{{mesh_extra}listen: '{}:15008', cert: {}, key: {}, bundle: {}}}\n",
            etcd.endpoint(),
            dir.join(name).display(),
            node.ip,
            certs.cert(name),
            certs.key(name),
            certs.bundle()
        ),
    )
    .unwrap();
    Loopmesh::spawn_wrapped(
        &["ip", "netns", "exec", &node.ns],
        &["agent", "--config", config.to_str().unwrap()],
        dir,
        &[],
    )
}

/// The agent's metrics, read from inside its node.
fn metrics(node: &Node, agent: &Loopmesh) -> String {
    node.run(&["curl", "-s", &format!("http://{}/metrics", agent.admin.unwrap())])
        .unwrap_or_default()
}

fn metric_value(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Two nodes on a bridge, etcd on the bridge, the mesh's certificates, and
/// an agent on each (node B's inbound listener up).
struct TwoNodes {
    net: Net,
    etcd: Etcd,
    store: etcd_client::Client,
    dir: tempfile::TempDir,
    certs: Certificates,
    agent_a: Loopmesh,
    agent_b: Loopmesh,
}

impl TwoNodes {
    async fn start() -> TwoNodes {
        TwoNodes::start_with("").await
    }

    /// With `a_mesh_extra` in node A's `mesh` section.
    async fn start_with(a_mesh_extra: &str) -> TwoNodes {
        let net = Net::create(2);
        let etcd = Etcd::start_on(net.gateway);
        let store = etcd.client().await;
        let dir = tempfile::tempdir().unwrap();
        let certs = Certificates::new(&dir.path().join("certs"), "test.mesh", &["node-a", "node-b"]);
        let agent_a = agent(&net.nodes[0], "node-a", &etcd, &certs, dir.path(), a_mesh_extra);
        let agent_b = agent(&net.nodes[1], "node-b", &etcd, &certs, dir.path(), "");
        agent_b.wait_log("mesh: inbound listener on");
        TwoNodes {
            net,
            etcd,
            store,
            dir,
            certs,
            agent_a,
            agent_b,
        }
    }
}

/// Puts service `service` at `address` with `spec`, its instances the
/// given ports on node B's 127.0.0.1, reached through B's mesh address (the
/// service last, so the first render has every instance).
async fn register_on_b(
    b: &Node,
    store: &mut etcd_client::Client,
    service: &str,
    address: &str,
    spec: &str,
    instances: &[(&str, u16)],
) {
    store
        .put(format!("/loopmesh/addresses/{service}"), address, None)
        .await
        .unwrap();
    for (id, port) in instances {
        let instance = format!(
            "{{host: 127.0.0.1, port: {port}, node: node-b, mesh: '{}:15008'}}",
            b.ip
        );
        store
            .put(format!("/loopmesh/instances/{service}/{id}"), instance, None)
            .await
            .unwrap();
    }
    store
        .put(format!("/loopmesh/services/{service}"), spec, None)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_reaches_a_loopback_only_backend_of_another_node_through_one_mtls_tunnel() {
    let TwoNodes {
        net,
        etcd: _etcd,
        mut store,
        dir,
        certs,
        agent_a,
        agent_b,
    } = TwoNodes::start().await;
    let (a, b) = (&net.nodes[0], &net.nodes[1]);
    let backend = EchoBackend::start(b, "db-on-b");
    register_on_b(
        b,
        &mut store,
        "db",
        "127.100.9.9",
        "{port: 7000}",
        &[("b1", backend.port)],
    )
    .await;

    // The app in node A finds the service by name and reaches the backend
    // that listens on node B's loopback only.
    let dns = agent_a.dns.unwrap();
    let address = eventually("db.mesh.internal to resolve in node A", || {
        let answer = a
            .run(&[
                "dig",
                "+short",
                &format!("@{}", dns.ip()),
                "-p",
                &dns.port().to_string(),
                "db.mesh.internal",
            ])
            .ok()?;
        let address = answer.trim().to_string();
        (!address.is_empty()).then_some(address)
    });
    assert_eq!(address, "127.100.9.9");
    eventually("node A to reach db on node B", || {
        (connect_from(a, &address, 7000, 1) == ["db-on-b"]).then_some(())
    });
    // /ready names the node's identity and when its certificate ends.
    let ready = b
        .run(&["curl", "-s", &format!("http://{}/ready", agent_b.admin.unwrap())])
        .unwrap();
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(
        ready["mesh"]["identity"], "spiffe://test.mesh/node/node-b",
        "{ready}"
    );
    assert!(
        ready["mesh"]["certificate_expires"]
            .as_str()
            .unwrap()
            .ends_with(" UTC"),
        "{ready}"
    );
    assert_eq!(
        ready["mesh"]["warning"],
        serde_json::Value::Null,
        "90 days left: {ready}"
    );
    // The node's routes say how the backend is reached.
    let binary = env!("CARGO_BIN_EXE_loopmesh");
    let routes = a
        .run(&[binary, "routes", "--admin", &agent_a.admin.unwrap().to_string()])
        .unwrap();
    assert!(
        routes.contains(&format!(
            "b1=127.0.0.1:{}(up,via {}:15008 as spiffe://test.mesh/node/node-b)",
            backend.port, b.ip
        )),
        "{routes}"
    );
    // 200 more connections: streams in the one mTLS connection.
    let ids = connect_from(a, &address, 7000, 200);
    assert!(ids.iter().all(|id| id == "db-on-b"), "{ids:?}");
    let seen_by_b = metrics(b, &agent_b);
    assert_eq!(
        metric_value(&seen_by_b, "loopmesh_mesh_inbound_connections_total"),
        Some(1.0),
        "one TLS connection from A: {seen_by_b}"
    );
    assert_eq!(
        metric_value(&seen_by_b, "loopmesh_mesh_inbound_streams_total{service=\"db\"}"),
        Some(201.0)
    );
    assert_eq!(
        metric_value(&metrics(a, &agent_a), "loopmesh_mesh_peer_connections_total"),
        Some(1.0)
    );

    // B's inbound listener: plaintext, no certificate, or a certificate of
    // another CA get nothing; A's certificate gets an answer.
    let inbound = format!("{}:15008", b.ip);
    assert!(a
        .run(&[
            "curl",
            "-s",
            "--http2-prior-knowledge",
            &format!("http://{inbound}/")
        ])
        .is_err());
    assert!(
        a.run(&["curl", "-sk", &format!("https://{inbound}/")]).is_err(),
        "no client certificate"
    );
    let stranger = Certificates::new(&dir.path().join("other"), "test.mesh", &["node-a"]);
    let with_cert = |certs: &Certificates| {
        a.run(&[
            "curl",
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cert",
            &certs.cert("node-a"),
            "--key",
            &certs.key("node-a"),
            &format!("https://{inbound}/"),
        ])
    };
    assert!(with_cert(&stranger).is_err(), "a certificate of another CA");
    assert_eq!(
        with_cert(&certs).unwrap(),
        "405",
        "the mesh's own certificate: in, but only CONNECT is served"
    );
    // A CONNECT stream names its target as ip:port with the service in a
    // header (as the proxy dials) or as service:port; nothing this node
    // does not host is reachable.
    let inbound_addr = std::net::SocketAddr::from((b.ip, 15008));
    let target = format!("127.0.0.1:{}", backend.port);
    let by_name = format!("db:{}", backend.port);
    for (authority, service, answer) in [
        (target.as_str(), Some("db"), "200 db-on-b"),
        (by_name.as_str(), None, "200 db-on-b"),
        (by_name.as_str(), Some("db"), "200 db-on-b"),
        (target.as_str(), None, "400 no_service"),
        (by_name.as_str(), Some("web"), "400 bad_target"),
        ("db:1", None, "404 not_hosted_here"),
        ("127.0.0.1:22", Some("db"), "404 not_hosted_here"),
        ("nothing:7000", None, "404 not_hosted_here"),
    ] {
        assert_eq!(
            connect_stream(&certs, inbound_addr, authority, service).await,
            answer,
            "CONNECT {authority} ({service:?})"
        );
    }

    // An allow list without node A: refused at B, counted, said once.
    store
        .put(
            "/loopmesh/services/db",
            format!("{{port: 7000, allow: ['{}']}}", certs.identity("node-c")),
            None,
        )
        .await
        .unwrap();
    eventually("node A to be refused", || {
        (connect_from(a, &address, 7000, 1) == ["-"]).then_some(())
    });
    connect_from(a, &address, 7000, 3);
    let denied = format!(
        "loopmesh_mesh_denied_total{{service=\"db\",caller=\"{}\"}}",
        certs.identity("node-a")
    );
    assert!(metric_value(&metrics(b, &agent_b), &denied).is_some_and(|n| n >= 4.0));
    assert_eq!(
        agent_b
            .log_text()
            .matches("is not allowed to reach service db")
            .count(),
        1
    );
    // A glob that names it lets it in again.
    store
        .put(
            "/loopmesh/services/db",
            "{port: 7000, allow: ['spiffe://test.mesh/node/node-*']}",
            None,
        )
        .await
        .unwrap();
    eventually("node A to be let in", || {
        (connect_from(a, &address, 7000, 1) == ["db-on-b"]).then_some(())
    });
    agent_a.stop();
    agent_b.stop();
}

/// A long-lived connection from a node: reads the id line, then sends a
/// numbered line every 20 ms and checks its echo, until `stop` exists;
/// prints `intact N` (N lines echoed) or `broken: why`.
const STREAM: &str = r#"
import os, socket, sys, time
host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = socket.create_connection((host, port), timeout=5)
f = c.makefile("rb")
if not f.readline().strip():
    print("broken: no id"); sys.exit()
print("open", flush=True)
n = 0
try:
    while not os.path.exists(stop):
        msg = b"line %d\n" % n
        c.sendall(msg)
        if f.readline() != msg:
            print("broken: echo %d" % n); sys.exit()
        n += 1
        time.sleep(0.02)
    print("intact %d" % n)
except Exception as e:
    print("broken: %s" % e)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn rotated_certificates_keep_open_streams_and_new_streams_present_the_new_one() {
    let TwoNodes {
        net,
        etcd: _etcd,
        mut store,
        dir,
        certs,
        agent_a,
        agent_b,
    } = TwoNodes::start().await;
    let (a, b) = (&net.nodes[0], &net.nodes[1]);
    let _backend = db_on_b(a, b, &mut store, "127.100.9.9").await;
    // A stream opened on the first certificate.
    let stop = dir.path().join("stop");
    let mut stream = Command::new("ip")
        .args([
            "netns",
            "exec",
            &a.ns,
            "python3",
            "-c",
            STREAM,
            "127.100.9.9",
            "7000",
            stop.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut output = std::io::BufReader::new(stream.stdout.take().unwrap());
    let mut line = String::new();
    use std::io::BufRead;
    output.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "open");
    // Node A's certificate rotated: a short one, issued anew.
    let binary = env!("CARGO_BIN_EXE_loopmesh");
    let ca = certs.dir.join("ca");
    must(&[
        binary,
        "ca",
        "issue",
        "--node",
        "node-a",
        "--ca",
        ca.to_str().unwrap(),
        "--out",
        certs.dir.to_str().unwrap(),
        "--days",
        "5",
        "--force",
    ]);
    agent_a.wait_log("mesh: new credentials for spiffe://test.mesh/node/node-a loaded");
    // /ready warns that it ends soon.
    let ready = a
        .run(&["curl", "-s", &format!("http://{}/ready", agent_a.admin.unwrap())])
        .unwrap();
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert!(
        ready["mesh"]["warning"]
            .as_str()
            .is_some_and(|w| w.contains("expires in 4 day(s)")),
        "{ready}"
    );
    assert_eq!(ready["ready"], true, "a warning, not a reason");
    // New streams go over a new connection, which presents the new certificate.
    assert_eq!(connect_from(a, "127.100.9.9", 7000, 5), vec!["db-on-b"; 5]);
    let connections: Vec<String> = agent_b
        .log_text()
        .lines()
        .filter(|line| line.contains("mesh: connection from spiffe://test.mesh/node/node-a"))
        .map(|line| line.rsplit("valid until ").next().unwrap().to_string())
        .collect();
    assert_eq!(connections.len(), 2, "{connections:?}");
    assert_ne!(
        connections[0], connections[1],
        "the second connection presents the new certificate"
    );
    // A broken file keeps the credentials in force, said once.
    std::fs::write(certs.cert("node-a"), "not a certificate\n").unwrap();
    agent_a.wait_log("kept the previous credentials");
    assert_eq!(connect_from(a, "127.100.9.9", 7000, 1), ["db-on-b"]);
    assert_eq!(
        agent_a
            .log_text()
            .matches("kept the previous credentials")
            .count(),
        1
    );
    // The stream lived through all of it.
    std::fs::write(&stop, "").unwrap();
    let mut last = String::new();
    output.read_line(&mut last).unwrap();
    assert!(last.starts_with("intact "), "{last}");
    let _ = stream.wait();
    agent_a.stop();
    agent_b.stop();
}

/// An HTTP/1.1 backend on the node's 127.0.0.1 answering its id.
const HTTP_BACKEND: &str = r#"
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = (sys.argv[1] + "\n").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// Service `db` at `address` (port 7000), its instance an echo backend on
/// node B's loopback, once node A reaches it.
async fn db_on_b(a: &Node, b: &Node, store: &mut etcd_client::Client, address: &str) -> EchoBackend {
    let backend = EchoBackend::start(b, "db-on-b");
    register_on_b(b, store, "db", address, "{port: 7000}", &[("b1", backend.port)]).await;
    eventually("node A to reach db on node B", || {
        (connect_from(a, address, 7000, 1) == ["db-on-b"]).then_some(())
    });
    backend
}

/// A client in a node that holds one connection to `host:port` open for
/// 2 s (twice node A's idle timeout in the test below), opens a second one
/// then, and checks an echo on both; prints both ids.
const HOLDING_CLIENT: &str = r#"
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
def open_one():
    c = socket.create_connection((host, port), timeout=5)
    f = c.makefile("rb")
    return c, f, f.readline().decode().strip()
def echoes(c, f):
    c.sendall(b"ping\n")
    return f.readline() == b"ping\n"
held, held_f, first = open_one()
time.sleep(2)
other, other_f, second = open_one()
print(first if echoes(held, held_f) else "-", second if echoes(other, other_f) else "-")
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_connection_idle_past_its_timeout_is_closed_and_a_busy_one_is_kept() {
    let mut nodes = TwoNodes::start_with("idle_timeout: 1s, ").await;
    let (a, b) = (&nodes.net.nodes[0], &nodes.net.nodes[1]);
    let _backend = db_on_b(a, b, &mut nodes.store, "127.100.9.11").await;
    let agent_b = &nodes.agent_b;
    let inbound = |agent: &Loopmesh| {
        metric_value(&metrics(b, agent), "loopmesh_mesh_inbound_connections_total").unwrap_or(0.0)
    };
    let before = inbound(agent_b);
    // A stream held open past the idle timeout keeps its connection: a
    // second stream opened then rides the same one.
    let both = a
        .run(&["python3", "-c", HOLDING_CLIENT, "127.100.9.11", "7000"])
        .unwrap();
    assert_eq!(both.trim(), "db-on-b db-on-b");
    assert_eq!(
        inbound(agent_b),
        before,
        "no new TLS connection while a stream was open"
    );
    // Left without streams, A closes it (B sees no connection on 15008),
    // and the next stream makes a new one.
    eventually("node A to close the idle peer connection", || {
        b.run(&["ss", "-Htn", "state", "established", "( sport = :15008 )"])
            .ok()
            .filter(|sockets| sockets.trim().is_empty())
    });
    assert_eq!(connect_from(a, "127.100.9.11", 7000, 1), ["db-on-b"]);
    assert_eq!(inbound(agent_b), before + 1.0);
    nodes.agent_a.stop();
}

/// A client in a node that opens `count` connections to `host:port`, all
/// held at once (each has read its id line), then checks an echo on each;
/// prints how many answered.
const MANY_AT_ONCE: &str = r#"
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for i in range(count):
    c = socket.create_connection((host, port), timeout=10)
    f = c.makefile("rb")
    if f.readline().strip():
        held.append((c, f))
ok = 0
for c, f in held:
    c.sendall(b"ping\n")
    ok += f.readline() == b"ping\n"
print(ok)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn streams_past_a_connections_limit_go_on_a_second_connection() {
    let mut nodes = TwoNodes::start_with("max_streams_per_connection: 300, ").await;
    let (a, b) = (&nodes.net.nodes[0], &nodes.net.nodes[1]);
    let _backend = db_on_b(a, b, &mut nodes.store, "127.100.9.12").await;
    let agent_b = &nodes.agent_b;
    let inbound =
        || metric_value(&metrics(b, agent_b), "loopmesh_mesh_inbound_connections_total").unwrap_or(0.0);
    let before = inbound();
    // 450 at once: 300 on the first connection (more than the 200 streams
    // hyper's server takes by default), the rest on a second one.
    let answered = a
        .run(&["python3", "-c", MANY_AT_ONCE, "127.100.9.12", "7000", "450"])
        .unwrap();
    assert_eq!(answered.trim(), "450");
    assert_eq!(
        inbound(),
        before + 1.0,
        "one more TLS connection for the streams past 300"
    );
    nodes.agent_a.stop();
}

fn http_backend(node: &Node, id: &str) -> EchoBackend {
    EchoBackend::run(node, HTTP_BACKEND, id)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http_service_is_balanced_per_request_across_the_tunnel() {
    let TwoNodes {
        net,
        etcd: _etcd,
        mut store,
        dir,
        certs: _,
        agent_a,
        agent_b,
    } = TwoNodes::start().await;
    let (a, b) = (&net.nodes[0], &net.nodes[1]);
    let (one, two) = (http_backend(b, "one"), http_backend(b, "two"));
    let spec = "{port: 8080, protocol: http, balance: round_robin, http: {access_log: true, pool_idle_timeout: 500ms}}";
    register_on_b(
        b,
        &mut store,
        "web",
        "127.100.9.10",
        spec,
        &[("one", one.port), ("two", two.port)],
    )
    .await;
    // Node B serves the service before node A sends it anything (a stream
    // B refuses for a service it does not know yet counts as a failure of
    // the backend, and enough of them eject it).
    let b_log = agent_b.log.clone();
    let a_log = agent_a.log.clone();
    let _explain = Explain(vec![a_log, b_log]);
    eventually("node B to know web", || {
        b.run(&[
            "curl",
            "-sf",
            &format!("http://{}/routes", agent_b.admin.unwrap()),
        ])
        .ok()
        .filter(|routes| routes.contains("\"web\""))
    });
    let url = "http://127.100.9.10:8080/";
    eventually("node A to reach web on node B", || {
        a.run(&["curl", "-sf", url]).ok().filter(|body| !body.is_empty())
    });
    // Twenty requests on one keep-alive connection from the app.
    let urls = vec![url; 20];
    let mut args = vec!["curl", "-sf"];
    args.extend(urls);
    let bodies = a.run(&args).unwrap();
    let ones = bodies.lines().filter(|l| *l == "one").count();
    let twos = bodies.lines().filter(|l| *l == "two").count();
    assert_eq!((ones, twos), (10, 10), "{bodies}");
    let seen_by_b = metrics(b, &agent_b);
    assert_eq!(
        metric_value(&seen_by_b, "loopmesh_mesh_inbound_connections_total"),
        Some(1.0),
        "{seen_by_b}"
    );
    // Both ends log (to their stderr here): A each request, B each stream
    // (once it ends: A's pooled upstream connection idles out) with the
    // identity of the node that opened it.
    let stream = eventually("B to log the stream's end", || {
        std::fs::read_to_string(&agent_b.log)
            .unwrap()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| line["kind"] == "mesh_inbound")
    });
    assert_eq!(stream["service"], "web", "{stream}");
    assert_eq!(stream["caller"], "spiffe://test.mesh/node/node-a", "{stream}");
    assert!(stream["bytes_out"].as_u64().unwrap() > 0, "{stream}");
    let a_lines = std::fs::read_to_string(&agent_a.log).unwrap();
    assert!(
        a_lines
            .lines()
            .any(|line| line.contains("\"kind\":\"http\"") && line.contains("\"service\":\"web\"")),
        "{a_lines}"
    );
    // Node B's agent replaced by `loopmesh reload`: its successor takes the
    // inbound listening socket over (the same socket, so nothing waiting in
    // its backlog is lost), and A's next connection reaches web again.
    let listening = b.run(&["ss", "-Hltne", "sport = :15008"]).unwrap();
    let inode = listening
        .split_whitespace()
        .find_map(|field| field.strip_prefix("ino:"))
        .unwrap_or_else(|| panic!("B's inbound listener in ss: {listening}"))
        .to_string();
    let binary = env!("CARGO_BIN_EXE_loopmesh");
    let state = dir.path().join("node-b");
    let said = b
        .run(&[binary, "reload", "--state-dir", state.to_str().unwrap()])
        .unwrap();
    let successor = common::reloaded_pid(&said).unwrap_or_else(|| panic!("{said}"));
    let _successor = common::Adopted(successor);
    let socket = format!("socket:[{inode}]");
    let holds_it = std::fs::read_dir(format!("/proc/{successor}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .any(|target| target.to_str() == Some(socket.as_str()));
    assert!(holds_it, "the successor holds B's inbound listener ({socket})");
    eventually("node A to reach web through B's new agent", || {
        a.run(&["curl", "-sf", url])
            .ok()
            .filter(|body| body == "one\n" || body == "two\n")
    });
    agent_a.stop();
    drop(agent_b);
}

/// Prints the agents' logs if the test fails (panics) while it is held.
struct Explain(Vec<PathBuf>);

impl Drop for Explain {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in &self.0 {
                eprintln!(
                    "--- {}:\n{}",
                    log.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
    }
}
