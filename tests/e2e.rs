//! End to end, as an operator deploys it: etcd, a registrar checking a real
//! backend, and an agent from the built binary. An app on the node resolves
//! `web.mesh.internal` through the agent's DNS and reaches the backend
//! through the agent's proxy; when the backend dies the mesh stops routing
//! to it.

mod common;

use common::{eventually_async, unique_ip, Etcd, Loopmesh};
use hickory_server::net::client::{Client, ClientHandle};
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::net::udp::UdpClientStream;
use hickory_server::proto::rr::{DNSClass, Name, RData, RecordType};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Resolves `name` A through the DNS server at `dns`.
async fn resolve(dns: SocketAddr, name: &str) -> Option<Ipv4Addr> {
    let stream = UdpClientStream::builder(dns, TokioRuntimeProvider::new())
        .with_timeout(Some(Duration::from_secs(1)))
        .build();
    let (mut client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
    tokio::spawn(background);
    let response = client
        .query(Name::from_ascii(name).ok()?, DNSClass::IN, RecordType::A)
        .await
        .ok()?;
    response.answers.iter().find_map(|record| match &record.data {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

/// Sends a line and reads the echo back, through whatever `addr` is.
async fn echo(addr: SocketAddr, line: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream.write_all(line.as_bytes()).await.ok()?;
    let mut reply = vec![0u8; line.len()];
    stream.read_exact(&mut reply).await.ok()?;
    String::from_utf8(reply).ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_reaches_a_registered_backend_by_name_through_the_proxy() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();

    // The backend: an echo server on this node.
    let backend = tokio::net::TcpListener::bind((unique_ip(), 0)).await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = backend.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });

    // The operator defines the service (its address pinned to one this test owns).
    let mut client = etcd.client().await;
    let service_ip = unique_ip();
    client
        .put("/loopmesh/addresses/web", service_ip.to_string(), None)
        .await
        .unwrap();
    client
        .put(
            "/loopmesh/services/web",
            "{port: 8080, connect_timeout: 500ms}",
            None,
        )
        .await
        .unwrap();

    // The registrar announces the backend once healthy.
    let registrar_config = dir.path().join("registrar.yaml");
    std::fs::write(
        &registrar_config,
        format!(
            "store: {{etcd: {{endpoints: [{}]}}}}\nlease_ttl: 3s\ndrain_period: 0s\nstate_dir: registrar\nservices:\n  - {{service: web, host: {}, port: {}, check: {{interval: 100ms, rise: 1, fall: 1}}}}\n",
            etcd.endpoint(),
            backend_addr.ip(),
            backend_addr.port()
        ),
    )
    .unwrap();
    let _registrar = Loopmesh::spawn(
        &[
            "registrar",
            "--config",
            registrar_config.to_str().unwrap(),
            "--node",
            "node-1",
        ],
        dir.path(),
    );

    // The agent serves it by name.
    let agent_config = dir.path().join("agent.yaml");
    std::fs::write(
        &agent_config,
        format!(
            "store: {{etcd: {{endpoints: [{}]}}}}\nstate_dir: agent\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    let agent = Loopmesh::spawn(
        &[
            "agent",
            "--config",
            agent_config.to_str().unwrap(),
            "--node",
            "node-1",
        ],
        dir.path(),
    );
    let dns = agent.dns.unwrap();

    let address = eventually_async("web.mesh.internal to resolve", || {
        resolve(dns, "web.mesh.internal.")
    })
    .await;
    assert_eq!(
        address, service_ip,
        "the name resolves to the service's own loopback address"
    );
    let service = SocketAddr::from((address, 8080));
    let reply = eventually_async("the backend through the proxy", || echo(service, "hello mesh\n")).await;
    assert_eq!(reply, "hello mesh\n");

    // The backend dies: the registrar deregisters it, the agent's routes
    // drop it, and a new connection is closed at once instead of hanging.
    server.abort();
    let _ = server.await;
    let admin = agent.admin.unwrap();
    eventually_async("the agent to drop the dead backend", || async {
        let (_, body) = common::http_get(admin, "/routes").await?;
        let routes: serde_json::Value = serde_json::from_str(&body).ok()?;
        let web = routes.as_array()?.iter().find(|r| r["service"] == "web")?.clone();
        web["backends"].as_array()?.is_empty().then_some(())
    })
    .await;
    let mut probe = tokio::net::TcpStream::connect(service).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), probe.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed at once, not left hanging: {read:?}"
    );
}
