//! The admin API over real HTTP: readiness, routes, catalog, files and
//! Prometheus metrics of a running agent, and the registrar's instances.

mod common;

use common::{eventually_async, eventually_metrics, http_get, unique_ip, Etcd, Loopmesh};
use std::net::SocketAddr;
use tokio::io::AsyncWriteExt;

async fn get_json(addr: SocketAddr, path: &str) -> Option<(u16, serde_json::Value)> {
    let (status, body) = http_get(addr, path).await?;
    Some((status, serde_json::from_str(&body).ok()?))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_reports_readiness_routes_catalog_files_and_metrics() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let backend = tokio::net::TcpListener::bind((unique_ip(), 0)).await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = backend.accept().await {
            let _ = stream.write_all(b"hi\n").await;
        }
    });
    let api = SocketAddr::from((unique_ip(), 7000));
    client
        .put("/loopmesh/addresses/api", api.ip().to_string(), None)
        .await
        .unwrap();
    client
        .put("/loopmesh/services/api", "port: 7000", None)
        .await
        .unwrap();
    let instance = format!(
        r#"{{"host": "{}", "port": {}}}"#,
        backend_addr.ip(),
        backend_addr.port()
    );
    client
        .put("/loopmesh/instances/api/b1", instance, None)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = common::agent_config(dir.path(), &etcd, "");
    let agent = Loopmesh::spawn(&["agent", "--config", config.to_str().unwrap()], dir.path());
    let admin = agent.admin.unwrap();

    let (_, ready) = eventually_async("the agent to be ready", || async {
        get_json(admin, "/ready")
            .await
            .filter(|(status, _)| *status == 200)
    })
    .await;
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["stale"], false);
    assert_eq!(ready["dns"]["listening"], true);
    assert_eq!(http_get(admin, "/live").await.unwrap(), (200, "ok\n".to_string()));

    let (_, routes) = get_json(admin, "/routes").await.unwrap();
    let route = &routes.as_array().unwrap()[0];
    assert_eq!(route["service"], "api");
    assert_eq!(route["address"], api.ip().to_string());
    assert_eq!(route["listening"], true);
    assert_eq!(route["backends"][0]["id"], "b1");
    assert_eq!(route["backends"][0]["ejected"], false);

    let (_, catalog) = get_json(admin, "/catalog").await.unwrap();
    assert!(catalog["revision"].as_i64().unwrap() > 0);
    assert_eq!(catalog["services"], 1);
    assert_eq!(catalog["dns"]["records"].as_u64().map(|n| n > 0), Some(true));
    let (_, files) = get_json(admin, "/files").await.unwrap();
    let listed = files["files"].to_string();
    assert!(
        listed.contains("routes/api.json") && listed.contains("mesh.zone"),
        "{listed}"
    );

    // One connection through the proxy shows up in the metrics.
    let mut stream = tokio::net::TcpStream::connect(api).await.unwrap();
    let mut greeting = [0u8; 3];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut greeting)
        .await
        .unwrap();
    drop(stream);
    let metrics = eventually_metrics(
        admin,
        "the connection counted",
        &["loopmesh_proxy_connections_total{service=\"api\"} 1"],
    )
    .await;
    for name in [
        "loopmesh_render_passes_total",
        "loopmesh_render_duration_seconds_bucket",
        "loopmesh_proxy_connect_duration_seconds_bucket{service=\"api\"",
        "loopmesh_dns_zone_records",
        "# TYPE loopmesh_proxy_connections_total counter",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    let (status, missing) = get_json(admin, "/nope").await.unwrap();
    assert_eq!(status, 404);
    assert!(missing["endpoints"].to_string().contains("/routes"));

    // A service whose port is taken makes the agent unready, saying which.
    let taken = std::net::TcpListener::bind((unique_ip(), 7100)).unwrap();
    let taken_addr = taken.local_addr().unwrap();
    client
        .put("/loopmesh/addresses/web", taken_addr.ip().to_string(), None)
        .await
        .unwrap();
    client
        .put("/loopmesh/services/web", "port: 7100", None)
        .await
        .unwrap();
    let (_, unready) = eventually_async("unready over the taken port", || async {
        get_json(admin, "/ready")
            .await
            .filter(|(status, _)| *status == 503)
    })
    .await;
    assert!(
        unready["failed_listeners"]["web"]
            .as_str()
            .unwrap()
            .contains("7100"),
        "{unready}"
    );
    drop(taken);
    eventually_async("ready again once the port is free", || async {
        get_json(admin, "/ready")
            .await
            .filter(|(status, _)| *status == 200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_registrar_reports_its_instances_and_check_metrics() {
    let mut etcd = Etcd::start();
    let backend = tokio::net::TcpListener::bind((unique_ip(), 0)).await.unwrap();
    let addr = backend.local_addr().unwrap();
    tokio::spawn(async move { while backend.accept().await.is_ok() {} });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("registrar.yaml");
    std::fs::write(
        &config,
        format!(
            "store: {{etcd: {{endpoints: [{}], request_timeout: 500ms, dial_timeout: 500ms}}}}\nlease_ttl: 3s\ndrain_period: 0s\nstate_dir: state\nservices:\n  - {{service: web, host: {}, port: {}, check: {{interval: 100ms, rise: 1, fall: 1}}}}\n",
            etcd.endpoint(),
            addr.ip(),
            addr.port()
        ),
    )
    .unwrap();
    let registrar = Loopmesh::spawn(
        &["registrar", "--config", config.to_str().unwrap(), "--node", "n1"],
        dir.path(),
    );
    let admin = registrar.admin.unwrap();
    let (_, instances) = eventually_async("the instance healthy", || async {
        get_json(admin, "/instances")
            .await
            .filter(|(_, v)| v[0]["healthy"] == true)
    })
    .await;
    assert_eq!(instances[0]["key"], format!("web/n1-{}", addr.port()));
    assert_eq!(instances[0]["state"], "up");
    eventually_async("ready", || async {
        get_json(admin, "/ready").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let (_, metrics) = http_get(admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains(&format!(
            "loopmesh_registrar_checks_total{{service=\"web\",instance=\"n1-{}\",result=\"pass\"}}",
            addr.port()
        )),
        "{metrics}"
    );
    assert!(metrics.contains("loopmesh_registrar_lease_grants_total 1"));

    // etcd gone: the registrar is not ready (its registration lives on in the lease).
    etcd.stop();
    let (_, unready) = eventually_async("unready without etcd", || async {
        get_json(admin, "/ready").await.filter(|(s, _)| *s == 503)
    })
    .await;
    assert_eq!(unready["ready"], false);
}
