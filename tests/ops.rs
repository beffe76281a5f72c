//! The operator verbs against a real etcd: services put, get, list and
//! delete (invalid definitions refused, nothing written), instances listed
//! and set to maintenance, routes shown from a running agent's admin API.

mod common;

use common::{eventually, unique_ip, Etcd, Loopmesh};
use std::process::Command;

/// Runs `loopmesh <args> --etcd <etcd>`: success, stdout, stderr.
fn ops(etcd: &Etcd, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_loopmesh"))
        .args(args)
        .args(["--etcd", &etcd.endpoint()])
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn service_verbs_validate_before_they_write() {
    let etcd = Etcd::start();
    let (ok, out, err) = ops(
        &etcd,
        &[
            "service",
            "put",
            "postgres",
            "{port: 5432, balance: least_connections}",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "put /loopmesh/services/postgres\n");
    let (ok, out, _) = ops(&etcd, &["service", "get", "postgres"]);
    assert!(ok);
    assert_eq!(out, "{port: 5432, balance: least_connections}\n");

    // Refused, with the reason, and nothing written.
    for (name, value, reason) in [
        ("web", "{port: not-a-port}", "invalid u16 at line 1, column 8"),
        ("web", "{port: 80, balance: random}", "unknown variant `random`"),
        ("web", "{port: 80, retries: 99}", "retries"),
        ("Bad_Name", "{port: 80}", "Bad_Name"),
    ] {
        let (ok, out, err) = ops(&etcd, &["service", "put", name, value]);
        assert!(!ok, "{value} was accepted: {out}");
        assert!(err.contains(reason), "{value}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    let (ok, _, err) = ops(&etcd, &["service", "get", "web"]);
    assert!(
        !ok && err.contains("/loopmesh/services/web does not exist"),
        "{err}"
    );

    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "port: 8080\nprotocol: http\n").unwrap();
    let (ok, _, err) = ops(
        &etcd,
        &["service", "put", "web", "--file", file.path().to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let (ok, out, _) = ops(&etcd, &["service", "list"]);
    assert!(ok);
    assert!(out.starts_with("SERVICE\tPORT\tADDRESS\tINSTANCES\n"), "{out}");
    assert!(
        out.contains("postgres\t5432\t") && out.contains("web\t8080\t"),
        "{out}"
    );

    let (ok, out, _) = ops(&etcd, &["service", "delete", "web"]);
    assert!(ok);
    assert_eq!(out, "deleted /loopmesh/services/web\n");
    let (ok, _, err) = ops(&etcd, &["service", "delete", "web"]);
    assert!(!ok && err.contains("does not exist"), "{err}");

    let output = Command::new(env!("CARGO_BIN_EXE_loopmesh"))
        .args(["service", "list"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no etcd endpoints"));
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_are_listed_and_set_to_maintenance_and_routes_shown() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let backend = std::net::TcpListener::bind((unique_ip(), 0)).unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let service_ip = unique_ip();
    client
        .put("/loopmesh/addresses/api", service_ip.to_string(), None)
        .await
        .unwrap();
    client
        .put("/loopmesh/services/api", "port: 9000", None)
        .await
        .unwrap();
    let lease = client.lease_grant(60, None).await.unwrap().id();
    let instance = format!(
        r#"{{"host": "{}", "port": {}, "node": "n1"}}"#,
        backend_addr.ip(),
        backend_addr.port()
    );
    client
        .put(
            "/loopmesh/instances/api/b1",
            instance,
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();

    let (ok, out, _) = ops(&etcd, &["instance", "list"]);
    assert!(ok);
    assert!(
        out.contains(&format!("api\tb1\t{backend_addr}\tn1\t-\t1\tup")),
        "{out}"
    );
    let (ok, out, err) = ops(&etcd, &["instance", "set-state", "api", "b1", "maintenance"]);
    assert!(ok, "{err}");
    assert_eq!(out, "/loopmesh/instances/api/b1: maintenance\n");
    let (_, out, _) = ops(&etcd, &["instance", "list", "api"]);
    assert!(out.contains("\tmaintenance"), "{out}");
    let stored = client.get("/loopmesh/instances/api/b1", None).await.unwrap();
    assert_eq!(stored.kvs()[0].lease(), lease, "the instance keeps its lease");

    let (ok, _, err) = ops(&etcd, &["instance", "set-state", "api", "b1", "asleep"]);
    assert!(
        !ok && err.contains("not one of up, draining, maintenance"),
        "{err}"
    );
    let (ok, _, err) = ops(&etcd, &["instance", "set-state", "api", "nope", "up"]);
    assert!(!ok && err.contains("does not exist"), "{err}");

    // A node's routes, from its agent.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "store: {{etcd: {{endpoints: [{}]}}}}\nstate_dir: state\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    let agent = Loopmesh::spawn(&["agent", "--config", config.to_str().unwrap()], dir.path());
    let admin = agent.admin.unwrap().to_string();
    let shown = eventually("the agent's routes", || {
        let output = Command::new(env!("CARGO_BIN_EXE_loopmesh"))
            .args(["routes", "--admin", &admin])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        (output.status.success() && text.contains("maintenance")).then_some(text)
    });
    assert!(
        shown.contains(&format!(
            "api\t{service_ip}:9000\tlistening\tb1={}:{}(maintenance)",
            backend_addr.ip(),
            backend_addr.port()
        )),
        "{shown}"
    );
    drop(backend);

    let output = Command::new(env!("CARGO_BIN_EXE_loopmesh"))
        .args(["routes", "--admin", &format!("{}:1", unique_ip())])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read the routes"));
}
