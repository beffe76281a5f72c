//! `/metrics` of a real agent and a real registrar, as Prometheus reads
//! it: `promtool check metrics` finds nothing to say (every metric has its
//! HELP), every metric of the README's table is there when the table says
//! it is, and the series of a deleted service, backend or instance go.

mod common;

use common::{eventually_async, http_get, unique_ip, Loopmesh};
use loopmesh::telemetry::families::{self, Daemon};
use std::net::SocketAddr;
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs `promtool check metrics` on `text`: its complaints, if any.
fn promtool(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (apt-get install prometheus)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool check metrics ({}): {said}", output.status))
    }
}

/// The README's metric table: each metric's name and when it is present,
/// with the daemon that exports it (from the table in the code, which a
/// unit test holds equal to the README's).
fn readme_metrics(daemon: Daemon) -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let rows: Vec<(String, String)> = readme
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let present = cells.get(4)?;
            ["counter", "gauge", "histogram"]
                .contains(cells.get(2)?)
                .then(|| (name.to_string(), present.to_string()))
        })
        .collect();
    assert!(rows.len() > 50, "the README's metric table is missing: {rows:?}");
    rows.into_iter()
        .filter(|(name, _)| {
            let family = families::ALL.iter().find(|f| f.name == name);
            family
                .unwrap_or_else(|| panic!("README lists {name}, unknown to the code"))
                .of(daemon)
        })
        .collect()
}

/// Whether `text` holds a sample of metric `name` (for a histogram, its count).
fn has_sample(text: &str, name: &str) -> bool {
    text.lines().any(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix("_count").or(Some(rest)))
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    })
}

/// The value of the sample `series` (name and labels, as rendered).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `/metrics`, once the admin API answers.
async fn scrape(admin: SocketAddr) -> String {
    eventually_async("/metrics", || async {
        let (status, text) = http_get(admin, "/metrics").await?;
        assert_eq!(status, 200, "{text}");
        Some(text)
    })
    .await
}

/// Writes a catalog file through a rename, so the agent never reads half.
fn put(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let staged = path.with_extension("tmp~");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(staged, path).unwrap();
}

/// A backend answering every HTTP/1.1 request on a connection with `ok`.
async fn http_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((unique_ip(), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buffer = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buffer).await {
                    seen.extend_from_slice(&buffer[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// One DNS query over UDP (`name` A, recursion desired), answered.
async fn dns_query(server: SocketAddr, name: &str) {
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let socket = tokio::net::UdpSocket::bind((server.ip(), 0)).await.unwrap();
    socket.send_to(&query, server).await.unwrap();
    let mut answer = [0u8; 512];
    let (n, _) = tokio::time::timeout(common::PATIENCE, socket.recv_from(&mut answer))
        .await
        .expect("the agent answers DNS")
        .unwrap();
    assert!(n >= 12 && answer[..2] == query[..2], "not an answer to the query");
}

/// The service `name` in the file catalog under `catalog`, on `addr`.
fn put_service(catalog: &Path, name: &str, addr: SocketAddr, protocol: &str) {
    put(
        &catalog.join(format!("addresses/{name}.yaml")),
        &addr.ip().to_string(),
    );
    put(
        &catalog.join(format!("services/{name}.yaml")),
        &format!("port: {}\nprotocol: {protocol}\n", addr.port()),
    );
}

fn put_instance(catalog: &Path, service: &str, id: &str, addr: SocketAddr) {
    put(
        &catalog.join(format!("instances/{service}/{id}.yaml")),
        &format!("host: {}\nport: {}\n", addr.ip(), addr.port()),
    );
}

/// Waits until `/routes` lists exactly `services` as listening.
async fn wait_listening(admin: SocketAddr, services: &[&str]) {
    eventually_async(&format!("{services:?} listening, alone"), || async {
        let (_, body) = http_get(admin, "/routes").await?;
        let routes: serde_json::Value = serde_json::from_str(&body).ok()?;
        let listening: Vec<&str> = routes
            .as_array()?
            .iter()
            .filter(|route| route["listening"] == true)
            .filter_map(|route| route["service"].as_str())
            .collect();
        (listening == services).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agents_metrics_pass_promtool_are_there_from_the_start_and_leave_with_their_service() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog");
    std::fs::create_dir_all(&catalog).unwrap();
    let agent = Loopmesh::spawn(
        &[
            "agent",
            "--catalog-dir",
            catalog.to_str().unwrap(),
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
        ],
        dir.path(),
    );
    let admin = agent.admin.unwrap();
    let listed = readme_metrics(Daemon::Agent);

    // At the start, with no service yet: every metric said to be there
    // from the start has a sample; the others are listed with their HELP.
    let text = eventually_async("the first render", || async {
        let text = scrape(admin).await;
        (value(&text, "loopmesh_render_passes_total") >= Some(1.0)).then_some(text)
    })
    .await;
    for (name, present) in &listed {
        match present.as_str() {
            "start" | "with the DNS server" | "with its listener" => {
                assert!(
                    has_sample(&text, name),
                    "{name} ({present}) has no sample at start:\n{text}"
                )
            }
            "with mTLS configured" => assert!(!has_sample(&text, name), "{name} without mTLS:\n{text}"),
            _ => assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} is not listed:\n{text}"
            ),
        }
    }
    assert_eq!(
        value(&text, "loopmesh_proxy_connections_total{service=\"db\"}"),
        None
    );
    let version = format!(
        "loopmesh_build_info{{version=\"{}\",commit=\"",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains(&version), "{text}");
    assert!(
        value(&text, "process_resident_memory_bytes") > Some(0.0),
        "{text}"
    );
    promtool(&text).unwrap();

    // Two services appear, a TCP and an HTTP one. Unused yet, they have
    // no series (every node lists every service of the fleet).
    let db = SocketAddr::from((unique_ip(), 5432));
    let web = SocketAddr::from((unique_ip(), 8080));
    let db_backend = common::id_echo_backend("b1").await;
    let web_backend = http_backend().await;
    put_instance(&catalog, "db", "b1", db_backend);
    put_instance(&catalog, "web", "w1", web_backend);
    put_service(&catalog, "db", db, "tcp");
    put_service(&catalog, "web", web, "http");
    wait_listening(admin, &["db", "web"]).await;
    let text = scrape(admin).await;
    assert!(
        !text.contains("service=\"db\"") && !text.contains("service=\"web\""),
        "series of services never used:\n{text}"
    );
    promtool(&text).unwrap();

    // Traffic: a TCP connection, an HTTP request, a DNS query.
    let mut stream = tokio::net::TcpStream::connect(db).await.unwrap();
    let mut greeting = [0u8; 3];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"b1\n");
    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).await.unwrap();
    drop(stream);
    let (status, body) = http_get(web, "/").await.expect("web answers");
    assert_eq!((status, body.as_str()), (200, "ok"));
    dns_query(agent.dns.unwrap(), "db.mesh.internal").await;
    let b1 = "{service=\"db\",backend=\"b1\"";
    let text = eventually_async("the connection and the query counted", || async {
        let text = scrape(admin).await;
        let queries: f64 = text
            .lines()
            .filter(|line| line.starts_with("loopmesh_dns_queries_total{transport=\"udp\",type=\"A\","))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let bytes = value(
            &text,
            &format!("loopmesh_backend_bytes_total{b1},direction=\"to_client\"}}"),
        );
        (bytes == Some(7.0) && queries >= 1.0).then_some(text)
    })
    .await;
    // Used, a service has all of its series, those of events that did
    // not happen at zero.
    for (name, present) in &listed {
        let service = match present.as_str() {
            "per service" => "db",
            "per HTTP service" => "web",
            _ => continue,
        };
        if name == "loopmesh_mesh_denied_total" {
            continue; // a series per caller, from its first refusal
        }
        assert!(
            text.lines()
                .any(|line| line.starts_with(name.as_str())
                    && line.contains(&format!("service=\"{service}\""))),
            "{name} ({present}) has no series for {service}:\n{text}"
        );
    }
    assert_eq!(
        value(
            &text,
            "loopmesh_proxy_refused_total{service=\"db\",reason=\"no_backend\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&text, &format!("loopmesh_backend_connections_total{b1}}}")),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            &format!("loopmesh_backend_bytes_total{b1},direction=\"to_backend\"}}")
        ),
        Some(4.0)
    );
    assert_eq!(
        value(
            &text,
            &format!("loopmesh_backend_connect_errors_total{b1},kind=\"refused\"}}")
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &text,
            "loopmesh_backend_requests_total{service=\"web\",backend=\"w1\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "loopmesh_http_requests_total{service=\"web\",code_class=\"2xx\"}"
        ),
        Some(1.0)
    );
    for (name, present) in &listed {
        if present.starts_with("per") && present.ends_with("backend") {
            assert!(
                has_sample(&text, name),
                "{name} ({present}) after a connection:\n{text}"
            );
        }
    }
    promtool(&text).unwrap();
    // /routes shows the same counters.
    let (_, routes) = http_get(admin, "/routes").await.unwrap();
    let routes: serde_json::Value = serde_json::from_str(&routes).unwrap();
    let b1_route = &routes[0]["backends"][0];
    assert_eq!(
        (routes[0]["service"].as_str(), b1_route["id"].as_str()),
        (Some("db"), Some("b1"))
    );
    assert_eq!(b1_route["connections_total"], 1, "{b1_route}");
    assert_eq!(
        (
            b1_route["bytes_to_backend"].as_u64(),
            b1_route["bytes_to_client"].as_u64()
        ),
        (Some(4), Some(7))
    );
    assert_eq!(routes[1]["backends"][0]["requests_total"], 1, "{routes}");

    // web's backend w1 is replaced by w2; db is deleted. Their series go.
    put_instance(&catalog, "web", "w2", web_backend);
    std::fs::remove_file(catalog.join("instances/web/w1.yaml")).unwrap();
    std::fs::remove_file(catalog.join("services/db.yaml")).unwrap();
    wait_listening(admin, &["web"]).await;
    let text = eventually_async("db's and w1's series gone, w2's there", || async {
        let text = scrape(admin).await;
        let gone = !text.contains("service=\"db\"") && !text.contains("backend=\"w1\"");
        (gone && text.contains("backend=\"w2\"")).then_some(text)
    })
    .await;
    assert_eq!(
        value(
            &text,
            "loopmesh_backend_requests_total{service=\"web\",backend=\"w2\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &text,
            "loopmesh_http_requests_total{service=\"web\",code_class=\"2xx\"}"
        ),
        Some(1.0),
        "the service's own counters live on"
    );
    promtool(&text).unwrap();
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_registrars_metrics_pass_promtool_and_an_instance_leaves_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("registrar.d");
    std::fs::create_dir_all(&services).unwrap();
    let backend = tokio::net::TcpListener::bind((unique_ip(), 0)).await.unwrap();
    let addr = backend.local_addr().unwrap();
    tokio::spawn(async move { while backend.accept().await.is_ok() {} });
    let file = services.join("web.yaml");
    put(
        &file,
        &format!(
            "service: web\nid: web-1\nhost: {}\nport: {}\ncheck: {{interval: 100ms, rise: 1, fall: 1}}\n",
            addr.ip(),
            addr.port()
        ),
    );
    let config = dir.path().join("registrar.yaml");
    std::fs::write(
        &config,
        "store: {catalog_dir: catalog}\nstate_dir: state\nservices_dir: registrar.d\n",
    )
    .unwrap();
    let registrar = Loopmesh::spawn(
        &["registrar", "--config", config.to_str().unwrap(), "--node", "n1"],
        dir.path(),
    );
    let admin = registrar.admin.unwrap();
    let web = "{service=\"web\",instance=\"web-1\"";
    let text = eventually_async("web-1 registered", || async {
        let text = scrape(admin).await;
        (value(&text, &format!("loopmesh_registrar_registered{web}}}")) == Some(1.0)).then_some(text)
    })
    .await;
    for (name, present) in readme_metrics(Daemon::Registrar) {
        assert!(
            has_sample(&text, &name),
            "{name} ({present}) has no sample:\n{text}"
        );
    }
    assert!(
        value(
            &text,
            &format!("loopmesh_registrar_checks_total{web},result=\"pass\"}}")
        ) >= Some(1.0)
    );
    promtool(&text).unwrap();

    std::fs::remove_file(&file).unwrap();
    let text = eventually_async("web-1's series gone", || async {
        let text = scrape(admin).await;
        (!text.contains("instance=\"web-1\"")).then_some(text)
    })
    .await;
    assert!(text.contains("# HELP loopmesh_registrar_checks_total "), "{text}");
    promtool(&text).unwrap();
    registrar.stop();
}
