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
        (
            "web",
            "{port: 80, protocol: http, http: {routes: [{to: [{tags: [v2], weight: 0}]}]}}",
            "http.routes[0]: to: the weights add up to 0",
        ),
        (
            "web",
            "{port: 80, protocol: http, http: {retry: {attemps: 3}}}",
            "attemps",
        ),
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
    std::fs::write(
        file.path(),
        "port: 8080\nprotocol: http\nhttp: {routes: [{to: [{tags: [v1], weight: 95}, {tags: [v2], weight: 5}]}]}\n",
    )
    .unwrap();
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
    // b1 is a registrar's (under a lease): its flag would undo the change at
    // the registrar's next write, so the verb refuses and says what to do.
    let (ok, out, err) = ops(&etcd, &["instance", "set-state", "api", "b1", "maintenance"]);
    assert!(!ok, "a registrar's instance was changed quietly: {out}");
    for part in [
        "/loopmesh/instances/api/b1",
        "registered by a registrar",
        "node n1",
        &format!("lease {lease:x}"),
        "on that node run: loopmesh set-state --config <registrar config> b1 maintenance",
        "--force",
        "nothing written",
    ] {
        assert!(err.contains(part), "missing {part:?}: {err}");
    }
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let stored = client.get("/loopmesh/instances/api/b1", None).await.unwrap();
    assert!(
        String::from_utf8_lossy(stored.kvs()[0].value()).contains("\"node\": \"n1\"}"),
        "nothing written"
    );
    // --force writes it anyway, warning that the registrar's flag wins.
    let (ok, out, err) = ops(
        &etcd,
        &["instance", "set-state", "api", "b1", "maintenance", "--force"],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "/loopmesh/instances/api/b1: maintenance\n");
    assert!(
        err.contains("warning: /loopmesh/instances/api/b1 is registered by a registrar")
            && err.contains("the registrar's flag wins at its next write"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
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
    let config = common::agent_config(dir.path(), &etcd, "");
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

/// The lines of a listing whose first column is `first`.
fn rows<'a>(out: &'a str, first: &str) -> Vec<&'a str> {
    out.lines()
        .filter(|line| line.split('\t').next() == Some(first))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn listings_judge_keys_as_the_agent_does() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let instance = |port: u16| format!(r#"{{"host": "127.0.0.1", "port": {port}}}"#);
    for (key, value) in [
        ("services/web", "port: 8080".to_string()),
        ("addresses/web", "127.100.0.7".to_string()),
        ("services/Upper", "port: 80".to_string()),
        ("services/a/b", "port: 81".to_string()),
        ("services/db", "port: [nope".to_string()),
        ("addresses/db", "10.0.0.1".to_string()),
        ("instances/web/w1", instance(1)),
        ("instances/web/Node-A", instance(2)),
        ("instances/web/a/b", instance(3)),
        ("instances/web/w3", instance(0)),
        ("instances/Upper/u1", instance(4)),
    ] {
        client.put(format!("/loopmesh/{key}"), value, None).await.unwrap();
    }

    let (ok, out, err) = ops(&etcd, &["service", "list"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("SERVICE\tPORT\tADDRESS\tINSTANCES\n"), "{out}");
    assert!(
        out.lines().all(|line| line.split('\t').count() == 4),
        "four columns on every line: {out}"
    );
    // Instances the agent would refuse are not counted as instances.
    assert_eq!(
        rows(&out, "web"),
        ["web\t8080\t127.100.0.7\t2 (+2 invalid)"],
        "{out}"
    );
    for name in ["Upper", "a/b"] {
        assert_eq!(
            rows(&out, name),
            [format!(
                "{name}\tinvalid: service name {name:?} is not a DNS label ([a-z0-9-], 1-63 characters, no leading or trailing '-')\t-\t-"
            )],
            "{out}"
        );
    }
    let db = rows(&out, "db");
    assert_eq!(db.len(), 1, "{out}");
    assert!(
        db[0].starts_with("db\tinvalid: ")
            && db[0].contains("\tinvalid: service address 10.0.0.1 must lie inside 127.0.0.0/8")
            && db[0].ends_with("\t0"),
        "{out}"
    );

    let (ok, out, err) = ops(&etcd, &["instance", "list"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("SERVICE\tINSTANCE\tADDRESS\tNODE\tZONE\tWEIGHT\tSTATE\tMESH\n"),
        "{out}"
    );
    assert!(
        out.lines().all(|line| line.split('\t').count() == 8),
        "eight columns on every line: {out}"
    );
    let web = rows(&out, "web");
    assert!(web.contains(&"web\tw1\t127.0.0.1:1\t-\t-\t1\tup\t-"), "{out}");
    assert!(
        web.contains(&"web\tNode-A\t127.0.0.1:2\t-\t-\t1\tup\t-"),
        "an id may have capitals: {out}"
    );
    assert!(
        web.contains(
            &"web\ta/b\tinvalid: instance id \"a/b\" must be 1-253 characters of [A-Za-z0-9._:-]\t-\t-\t-\t-\t-"
        ),
        "a nested key is the invalid id a/b: {out}"
    );
    assert!(
        web.contains(&"web\tw3\tinvalid: port must be 1-65535\t-\t-\t-\t-\t-"),
        "{out}"
    );
    assert_eq!(
        rows(&out, "Upper"),
        ["Upper\tu1\tinvalid: service name \"Upper\" is not a DNS label ([a-z0-9-], 1-63 characters, no leading or trailing '-')\t-\t-\t-\t-\t-"],
        "{out}"
    );

    // One service's instances: the same judgement, nothing of the others.
    let (ok, out, err) = ops(&etcd, &["instance", "list", "web"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 5, "header and web's four keys: {out}");
    assert!(out.contains("web\ta/b\tinvalid: instance id"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn set_state_on_a_static_instance_and_on_unknown_ids() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    client
        .put(
            "/loopmesh/instances/db/rds-1",
            "{host: 10.1.2.3, port: 5432}",
            None,
        )
        .await
        .unwrap();

    // No lease, no registrar: written as asked, no warning.
    let (ok, out, err) = ops(&etcd, &["instance", "set-state", "db", "rds-1", "draining"]);
    assert!(ok, "{err}");
    assert_eq!(out, "/loopmesh/instances/db/rds-1: draining\n");
    assert_eq!(err, "", "no warning for a static instance");
    let (_, out, _) = ops(&etcd, &["instance", "list", "db"]);
    assert!(
        out.contains("db\trds-1\t10.1.2.3:5432\t-\t-\t1\tdraining"),
        "{out}"
    );

    for (service, id, expected) in [
        ("db", "rds-2", "/loopmesh/instances/db/rds-2 does not exist"),
        (
            "nosuch",
            "rds-1",
            "/loopmesh/instances/nosuch/rds-1 does not exist",
        ),
        ("db", "a/b", "instance id \"a/b\" must be"),
        ("Upper", "rds-1", "service name \"Upper\" is not a DNS label"),
    ] {
        let (ok, out, err) = ops(&etcd, &["instance", "set-state", service, id, "up"]);
        assert!(!ok, "{service}/{id} accepted: {out}");
        assert!(err.contains(expected), "{service}/{id}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    let listed = client
        .get(
            "/loopmesh/instances/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(listed.kvs().len(), 1, "nothing else was written");
}
