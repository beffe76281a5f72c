//! The admin API over real HTTP: readiness, routes, catalog, files and
//! Prometheus metrics of a running agent, and the registrar's instances;
//! the index and the status page; the log filter changed at run time.

mod common;

use common::{eventually_async, eventually_metrics, http_get, http_request, unique_ip, Etcd, Loopmesh};
use std::net::{Ipv4Addr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
            "store: {{etcd: {{endpoints: [{}], request_timeout: 500ms, dial_timeout: 500ms}}}}\nlease_ttl: 3s\ndrain_period: 0s\nstate_dir: state\nmesh: 10.0.0.5:15008\nservices:\n  - {{service: web, host: {}, port: {}, check: {{interval: 100ms, rise: 1, fall: 1}}}}\n",
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
    assert_eq!(
        instances[0]["mesh"], "10.0.0.5:15008",
        "a loopback backend is reached through the node's mesh address"
    );
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
    // Its index and status page show its instances.
    let (_, index) = http_get(admin, "/").await.unwrap();
    assert!(
        index.lines().any(|line| line.starts_with("/instances ")),
        "{index}"
    );
    let (_, _, page) = http_request(admin, "GET", "/", &[("accept", "text/html")], "")
        .await
        .unwrap();
    assert!(
        page.contains("<h2>Instances</h2>") && page.contains(&format!("n1-{}", addr.port())),
        "{page}"
    );

    // etcd gone: the registrar is not ready (its registration lives on in the lease).
    etcd.stop();
    let (_, unready) = eventually_async("unready without etcd", || async {
        get_json(admin, "/ready").await.filter(|(s, _)| *s == 503)
    })
    .await;
    assert_eq!(unready["ready"], false);
}

/// Connects to a proxied service and reads until the proxy closes.
async fn connect_and_wait_for_close(service: SocketAddr) {
    let mut stream = tokio::net::TcpStream::connect(service).await.unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
}

/// POSTs to `/logging`: status and body.
async fn post_logging(admin: SocketAddr, query: &str, body: &str) -> (u16, String) {
    let (status, _, body) = http_request(admin, "POST", &format!("/logging{query}"), &[], body)
        .await
        .unwrap();
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_index_the_status_page_and_the_log_filter_changed_at_run_time() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let backend = tokio::net::TcpListener::bind((unique_ip(), 0)).await.unwrap();
    let up = backend.local_addr().unwrap();
    tokio::spawn(async move { while backend.accept().await.is_ok() {} });
    // A backend nothing listens on: connections to its service fail.
    let down = std::net::TcpListener::bind((unique_ip(), 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let (api, gone) = (
        SocketAddr::from((unique_ip(), 7300)),
        SocketAddr::from((unique_ip(), 7301)),
    );
    for (name, service, id, backend) in [("api", api, "b1", up), ("gone", gone, "g1", down)] {
        common::register_service(&mut client, name, service, id, backend).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = common::agent_config(dir.path(), &etcd, "");
    let agent = Loopmesh::spawn(&["agent", "--config", config.to_str().unwrap()], dir.path());
    let admin = agent.admin.unwrap();
    eventually_async("the agent to be ready", || async {
        http_get(admin, "/ready")
            .await
            .filter(|(status, _)| *status == 200)
    })
    .await;

    // The index: a line per endpoint, with what it does.
    let (status, head, index) = http_request(admin, "GET", "/", &[], "").await.unwrap();
    assert_eq!(status, 200);
    assert!(head.to_lowercase().contains("content-type: text/plain"), "{head}");
    for path in [
        "/metrics", "/live", "/ready", "/logging", "/routes", "/catalog", "/files",
    ] {
        assert!(
            index
                .lines()
                .any(|line| line.starts_with(&format!("{path} ")) && line.len() > path.len() + 8),
            "{path} with a description: {index}"
        );
    }
    // For a browser, the status page: each service with its backends.
    let (status, head, page) = http_request(admin, "GET", "/", &[("accept", "text/html,*/*;q=0.8")], "")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(head.to_lowercase().contains("content-type: text/html"), "{head}");
    assert!(page.contains("<b>ready</b>"), "{page}");
    for part in [
        format!("api &mdash; {}:7300 tcp &mdash; listening", api.ip()),
        format!("<tr class=\"up\"><td>b1</td><td>{up}</td>"),
        format!("gone &mdash; {}:7301", gone.ip()),
        format!("<td>g1</td><td>{down}</td>"),
        "<a href=\"/logging\">/logging</a>".to_string(),
    ] {
        assert!(page.contains(&part), "{part:?} not in {page}");
    }

    // The filter in force, then debug: a failed connection is logged at
    // debug only after the change.
    let (status, filter) = http_get(admin, "/logging").await.unwrap();
    assert_eq!(status, 200);
    assert!(filter.contains("info") && !filter.contains("debug"), "{filter}");
    let failed = "DEBUG service gone: no backend answered";
    connect_and_wait_for_close(gone).await;
    assert!(!agent.log_text().contains(failed), "debug before the change");
    let (status, now) = post_logging(admin, "?level=debug", "").await;
    assert_eq!(status, 200, "{now}");
    assert!(now.contains("debug"), "{now}");
    agent.wait_log("log filter changed from");
    connect_and_wait_for_close(gone).await;
    agent.wait_log(failed);

    // Refused, with the reason on one line, and the filter kept.
    for (query, body, reason) in [
        ("", "loopmesh=loud", "is not a log filter"),
        ("?level=verbose", "", "\"verbose\" is not a log level"),
        ("", "verbose", "\"verbose\" is neither a level nor TARGET=LEVEL"),
        ("", "", "give ?level=LEVEL or a filter as the body"),
    ] {
        let (status, said) = post_logging(admin, query, body).await;
        assert_eq!(status, 400, "{query} {body}: {said}");
        assert!(said.contains(reason), "{query} {body}: {said}");
        assert_eq!(said.trim().lines().count(), 1, "one line: {said}");
        assert_eq!(
            http_get(admin, "/logging").await.unwrap().1,
            now,
            "the filter stays"
        );
    }
    // A filter in RUST_LOG syntax, and the level as a form body.
    let (status, said) = post_logging(admin, "", "warn,loopmesh::proxy=debug").await;
    assert_eq!(status, 200, "{said}");
    assert!(
        said.contains("loopmesh::proxy=debug") && said.contains("warn"),
        "{said}"
    );
    let (status, said) = post_logging(admin, "", "level=error").await;
    assert_eq!(status, 200, "{said}");
    assert!(said.trim().ends_with("error"), "{said}");
    let (status, _, _) = http_request(admin, "DELETE", "/logging", &[], "").await.unwrap();
    assert_eq!(status, 405);
}

/// An IPv4 address of this machine on an interface other than loopback.
fn non_loopback_ip() -> Ipv4Addr {
    let mut found = None;
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs(3) fills `list`, walked read-only until its end
    // and freed once.
    unsafe {
        assert_eq!(libc::getifaddrs(&mut list), 0, "getifaddrs failed");
        let mut at = list;
        while !at.is_null() && found.is_none() {
            let addr = (*at).ifa_addr;
            if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                let inet = &*(addr as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(inet.sin_addr.s_addr));
                found = (!ip.is_loopback()).then_some(ip);
            }
            at = (*at).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found.expect(
        "this test needs an IPv4 address on an interface other than loopback, to reach the admin API from a peer that is not loopback",
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_filter_answers_loopback_peers_only() {
    let ip = non_loopback_ip();
    let admin = std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let agent = Loopmesh::spawn(
        &[
            "agent",
            "--static",
            "--state-dir",
            state.to_str().unwrap(),
            "--admin-listen",
            &admin.to_string(),
        ],
        dir.path(),
    );
    // Reached at a non-loopback address, the peer is that address.
    eventually_async("the admin API", || async {
        http_get(admin, "/live")
            .await
            .filter(|(status, _)| *status == 200)
    })
    .await;
    for method in ["GET", "POST"] {
        let (status, _, said) = http_request(admin, method, "/logging?level=debug", &[], "")
            .await
            .unwrap();
        assert_eq!(status, 403, "{method}: {said}");
        assert!(
            said.contains(&format!("/logging answers loopback peers only, not {ip}")),
            "{said}"
        );
    }
    assert!(!agent.log_text().contains("log filter changed"));
    assert_eq!(http_get(admin, "/metrics").await.map(|(s, _)| s), Some(200));
    agent.stop();
}
