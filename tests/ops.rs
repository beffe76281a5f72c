//! The operator verbs against a real etcd: services put, get, list and
//! delete (invalid definitions refused, nothing written), instances listed
//! and set to maintenance, routes and status shown from a running agent's
//! admin API; tables aligned, JSON parsed; endpoints from the environment
//! and from a config's store section against an etcd with TLS and
//! passwords; exit statuses.

mod common;

use common::{eventually, unique_ip, Etcd, Loopmesh};
use serde_json::Value;
use std::process::Command;

/// What a run of the binary gave: exit status, stdout, stderr.
struct Ran {
    code: Option<i32>,
    out: String,
    err: String,
}

/// Runs `loopmesh <args>` with `env` added and the ops variables removed
/// (so the caller's shell cannot change what a test sees).
fn loopmesh(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let output = Command::new(env!("CARGO_BIN_EXE_loopmesh"))
        .args(args)
        .env_remove("LOOPMESH_ETCD")
        .env_remove("ETCDCTL_ENDPOINTS")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Ran {
        code: output.status.code(),
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        err: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `loopmesh <args> --etcd <etcd>`: success, stdout, stderr.
fn ops(etcd: &Etcd, args: &[&str]) -> (bool, String, String) {
    let ran = loopmesh(&[args, &["--etcd", &etcd.endpoint()]].concat(), &[]);
    (ran.code == Some(0), ran.out, ran.err)
}

/// [`ops`] with `-o json`, parsed.
fn ops_json(etcd: &Etcd, args: &[&str]) -> Value {
    let (ok, out, err) = ops(etcd, &[args, &["-o", "json"]].concat());
    assert!(ok, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} -o json: {e}: {out}"))
}

/// An aligned table's cells, row by row (the header first), checking the
/// alignment on the way: every column starts at the header's offset on
/// every line, right after a space, with something in it (`-` when
/// empty), and the last column runs to the end of the line.
fn cells(table: &str) -> Vec<Vec<String>> {
    let lines: Vec<Vec<char>> = table.lines().map(|line| line.chars().collect()).collect();
    let header = &lines[0];
    let starts: Vec<usize> = (0..header.len())
        .filter(|&i| header[i] != ' ' && (i == 0 || header[i - 1] == ' '))
        .collect();
    lines
        .iter()
        .map(|line| {
            starts
                .iter()
                .enumerate()
                .map(|(column, &start)| {
                    assert!(
                        start < line.len() && line[start] != ' ' && (start == 0 || line[start - 1] == ' '),
                        "column {column} does not start at offset {start} in {:?}:\n{table}",
                        line.iter().collect::<String>()
                    );
                    let end = starts
                        .get(column + 1)
                        .map_or(line.len(), |&next| next.min(line.len()));
                    line[start..end].iter().collect::<String>().trim_end().to_string()
                })
                .collect()
        })
        .collect()
}

/// The rows (as cells) of a table whose first column is `first`.
fn rows(table: &str, first: &str) -> Vec<Vec<String>> {
    cells(table).into_iter().filter(|row| row[0] == first).collect()
}

/// Cells from string literals, to compare with [`rows`].
fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
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
    // As stored (what `put --file` takes back), its row, or JSON.
    let (ok, out, _) = ops(&etcd, &["service", "get", "postgres"]);
    assert!(ok);
    assert_eq!(out, "{port: 5432, balance: least_connections}\n");
    let (ok, out, _) = ops(&etcd, &["service", "get", "postgres", "-o", "table"]);
    assert!(ok);
    assert_eq!(
        cells(&out),
        [
            row(&["SERVICE", "PORT", "ADDRESS", "INSTANCES"]),
            row(&["postgres", "5432", "-", "0"])
        ],
        "{out}"
    );
    let got = ops_json(&etcd, &["service", "get", "postgres"]);
    assert_eq!(got["service"], "postgres");
    assert_eq!(got["key"], "/loopmesh/services/postgres");
    assert_eq!(got["value"], "{port: 5432, balance: least_connections}");
    assert_eq!(got["port"], 5432);
    assert_eq!(got["error"], Value::Null);
    assert_eq!(got["instances"], 0);
    assert_eq!(got["definition"]["balance"], "least_connections");
    assert_eq!(
        got["definition"]["connect_timeout"], "1s",
        "the definition with its defaults: {got}"
    );

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
    let missing = loopmesh(&["service", "get", "web", "--etcd", &etcd.endpoint()], &[]);
    assert!(
        missing.err.contains("/loopmesh/services/web does not exist"),
        "{}",
        missing.err
    );
    assert_eq!(missing.code, Some(3), "exit status 3: not found");

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
    assert_eq!(
        cells(&out),
        [
            row(&["SERVICE", "PORT", "ADDRESS", "INSTANCES"]),
            row(&["postgres", "5432", "-", "0"]),
            row(&["web", "8080", "-", "0"]),
        ],
        "{out}"
    );
    let listed = ops_json(&etcd, &["service", "list"]);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["postgres", "web"], "{listed}");
    assert_eq!(listed[1]["port"], 8080);

    let (ok, out, _) = ops(&etcd, &["service", "delete", "web"]);
    assert!(ok);
    assert_eq!(out, "deleted /loopmesh/services/web\n");
    let (ok, _, err) = ops(&etcd, &["service", "delete", "web"]);
    assert!(!ok && err.contains("does not exist"), "{err}");

    let nowhere = loopmesh(&["service", "list"], &[]);
    assert!(nowhere.err.contains("no etcd endpoints"), "{}", nowhere.err);
    assert_eq!(nowhere.code, Some(2), "exit status 2: usage");
    // An etcd that does not answer.
    let down = format!("http://{}:2379", unique_ip());
    let unreachable = loopmesh(&["service", "list"], &[("LOOPMESH_ETCD", &down)]);
    assert!(unreachable.err.contains(&down), "{}", unreachable.err);
    assert_eq!(unreachable.code, Some(4), "exit status 4: unavailable");
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
    assert_eq!(
        rows(&out, "api"),
        [row(&[
            "api",
            "b1",
            &backend_addr.to_string(),
            "n1",
            "-",
            "1",
            "up",
            "-"
        ])],
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
    let listed = ops_json(&etcd, &["instance", "list", "api"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let b1 = &listed[0];
    assert_eq!(
        (&b1["service"], &b1["id"], &b1["state"], &b1["node"]),
        (&"api".into(), &"b1".into(), &"maintenance".into(), &"n1".into()),
        "{listed}"
    );
    assert_eq!(b1["host"], backend_addr.ip().to_string());
    assert_eq!(b1["port"], backend_addr.port());
    assert_eq!((&b1["weight"], &b1["error"]), (&1.into(), &Value::Null));
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
        let ran = loopmesh(&["routes", "--admin", &admin], &[]);
        (ran.code == Some(0) && ran.out.contains("maintenance")).then_some(ran.out)
    });
    let listen = format!("{service_ip}:9000");
    let b1 = format!("b1={backend_addr}(maintenance)");
    assert_eq!(
        cells(&shown),
        [
            row(&["SERVICE", "LISTEN", "STATUS", "BACKENDS"]),
            row(&["api", &listen, "listening", &b1])
        ],
        "{shown}"
    );
    let ran = loopmesh(&["routes", "--admin", &admin, "-o", "json"], &[]);
    let routes: Value = serde_json::from_str(&ran.out).unwrap_or_else(|e| panic!("{e}: {}", ran.out));
    assert_eq!(routes[0]["service"], "api", "{routes}");
    assert_eq!(routes[0]["port"], 9000);
    assert_eq!(routes[0]["listening"], true);
    assert_eq!(routes[0]["backends"][0]["id"], "b1");
    assert_eq!(routes[0]["backends"][0]["state"], "maintenance");

    // Its status: readiness, then a row per backend.
    let ran = loopmesh(&["status", "--admin", &admin], &[]);
    assert_eq!(ran.code, Some(0), "{}", ran.err);
    let (summary, table) = ran.out.split_once("\n\n").unwrap();
    assert!(summary.starts_with("ready, pid "), "{}", ran.out);
    let table = cells(table);
    assert_eq!(
        table[0][..6],
        row(&["SERVICE", "LISTEN", "BACKEND", "ADDRESS", "STATE", "ACTIVE"]),
        "{}",
        ran.out
    );
    assert_eq!(
        table[1][..6],
        row(&[
            "api",
            &listen,
            "b1",
            &backend_addr.to_string(),
            "maintenance",
            "0"
        ]),
        "{}",
        ran.out
    );
    let ran = loopmesh(&["status", "--admin", &admin, "-o", "json"], &[]);
    let status: Value = serde_json::from_str(&ran.out).unwrap_or_else(|e| panic!("{e}: {}", ran.out));
    assert_eq!(status["ready"]["ready"], true, "{status}");
    assert_eq!(status["ready"]["pid"], agent.pid());
    assert_eq!(status["routes"][0]["backends"][0]["id"], "b1", "{status}");
    drop(backend);

    let nowhere = format!("{}:1", unique_ip());
    let ran = loopmesh(&["routes", "--admin", &nowhere], &[]);
    assert!(
        ran.err.contains(&format!("cannot read http://{nowhere}/routes")),
        "{}",
        ran.err
    );
    assert_eq!(ran.code, Some(4), "exit status 4: unavailable");
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
    let table = cells(&out);
    assert_eq!(
        table[0],
        row(&["SERVICE", "PORT", "ADDRESS", "INSTANCES"]),
        "{out}"
    );
    assert!(
        table.iter().all(|cells| cells.len() == 4),
        "four columns on every line: {out}"
    );
    // Instances the agent would refuse are not counted as instances.
    assert_eq!(
        rows(&out, "web"),
        [row(&["web", "8080", "127.100.0.7", "2 (+2 invalid)"])],
        "{out}"
    );
    let not_a_label = |name: &str| {
        format!("service name {name:?} is not a DNS label ([a-z0-9-], 1-63 characters, no leading or trailing '-')")
    };
    for name in ["Upper", "a/b"] {
        let reason = format!("invalid: {}", not_a_label(name));
        assert_eq!(rows(&out, name), [row(&[name, &reason, "-", "-"])], "{out}");
    }
    let db = rows(&out, "db");
    assert_eq!(db.len(), 1, "{out}");
    assert!(
        db[0][1].starts_with("invalid: ")
            && db[0][2].starts_with("invalid: service address 10.0.0.1 must lie inside 127.0.0.0/8")
            && db[0][3] == "0",
        "{out}"
    );
    // The same judgement as JSON, each refusal in its field.
    let listed = ops_json(&etcd, &["service", "list"]);
    let by_name = |name: &str| -> Value {
        let found = listed.as_array().unwrap().iter().find(|s| s["service"] == name);
        found.cloned().unwrap_or_else(|| panic!("{name} not in {listed}"))
    };
    let web = by_name("web");
    assert_eq!(
        (
            &web["port"],
            &web["error"],
            &web["address"],
            &web["address_error"]
        ),
        (&8080.into(), &Value::Null, &"127.100.0.7".into(), &Value::Null),
        "{web}"
    );
    assert_eq!(
        (&web["instances"], &web["invalid_instances"]),
        (&2.into(), &2.into())
    );
    let upper = by_name("Upper");
    assert_eq!(upper["error"], not_a_label("Upper"), "{upper}");
    assert_eq!(
        (&upper["port"], &upper["instances"]),
        (&Value::Null, &Value::Null)
    );
    let db = by_name("db");
    assert!(db["error"].is_string() && db["port"].is_null(), "{db}");
    assert!(
        db["address_error"]
            .as_str()
            .unwrap()
            .starts_with("service address 10.0.0.1 must lie inside 127.0.0.0/8"),
        "{db}"
    );

    let (ok, out, err) = ops(&etcd, &["instance", "list"]);
    assert!(ok, "{err}");
    let table = cells(&out);
    assert_eq!(
        table[0],
        row(&["SERVICE", "INSTANCE", "ADDRESS", "NODE", "ZONE", "WEIGHT", "STATE", "MESH"]),
        "{out}"
    );
    assert!(
        table.iter().all(|cells| cells.len() == 8),
        "eight columns on every line: {out}"
    );
    let web = rows(&out, "web");
    assert!(
        web.contains(&row(&["web", "w1", "127.0.0.1:1", "-", "-", "1", "up", "-"])),
        "{out}"
    );
    assert!(
        web.contains(&row(&["web", "Node-A", "127.0.0.1:2", "-", "-", "1", "up", "-"])),
        "an id may have capitals: {out}"
    );
    let dashes = ["-"; 5];
    let refused = |service: &str, id: &str, reason: &str| -> Vec<String> {
        [&[service, id, reason][..], &dashes]
            .concat()
            .iter()
            .map(|c| c.to_string())
            .collect()
    };
    assert!(
        web.contains(&refused(
            "web",
            "a/b",
            "invalid: instance id \"a/b\" must be 1-253 characters of [A-Za-z0-9._:-]"
        )),
        "a nested key is the invalid id a/b: {out}"
    );
    assert!(
        web.contains(&refused("web", "w3", "invalid: port must be 1-65535")),
        "{out}"
    );
    assert_eq!(
        rows(&out, "Upper"),
        [refused(
            "Upper",
            "u1",
            &format!("invalid: {}", not_a_label("Upper"))
        )],
        "{out}"
    );
    let listed = ops_json(&etcd, &["instance", "list"]);
    let w3 = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "w3")
        .unwrap();
    assert_eq!(w3["error"], "port must be 1-65535", "{listed}");
    assert!(w3["host"].is_null() && w3["state"].is_null(), "{w3}");

    // One service's instances: the same judgement, nothing of the others.
    let (ok, out, err) = ops(&etcd, &["instance", "list", "web"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 5, "header and web's four keys: {out}");
    assert!(
        rows(&out, "web")
            .iter()
            .any(|r| r[1] == "a/b" && r[2].starts_with("invalid: instance id")),
        "{out}"
    );
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
    assert_eq!(
        rows(&out, "db"),
        [row(&[
            "db",
            "rds-1",
            "10.1.2.3:5432",
            "-",
            "-",
            "1",
            "draining",
            "-"
        ])],
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

/// The ops verbs against an etcd that wants a client certificate and a
/// password: all of it from an agent's config (`--config`), or the
/// endpoints from LOOPMESH_ETCD or ETCDCTL_ENDPOINTS with the TLS files
/// and credentials of a registrar's config; refused without them.
#[tokio::test(flavor = "multi_thread")]
async fn a_config_store_section_reaches_an_etcd_with_tls_and_a_password() {
    let etcd = Etcd::start_tls();
    let tls = etcd.tls.as_ref().unwrap();
    let mut client = etcd.client().await;
    client
        .put("/mesh/services/secure", "port: 443", None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    common::enable_root_password(&mut client, dir.path()).await;
    let store = |endpoint: &str, password: &str| {
        format!(
            "store:\n  prefix: /mesh\n  etcd:\n    endpoints: [{endpoint}]\n    username: root\n    {password}\n    tls: {{ca_file: {}, cert_file: {}, key_file: {}}}\n",
            tls.ca.display(),
            tls.client_cert.display(),
            tls.client_key.display()
        )
    };
    let agent = dir.path().join("agent.yaml");
    std::fs::write(
        &agent,
        format!(
            "{}state_dir: state\n",
            store(&etcd.endpoint(), "password_file: password")
        ),
    )
    .unwrap();
    let agent = agent.to_str().unwrap();
    // A registrar's config naming an etcd that is not there.
    let elsewhere = format!("https://{}:2379", unique_ip());
    let registrar = dir.path().join("registrar.yaml");
    std::fs::write(
        &registrar,
        format!(
            "{}lease_ttl: 5s\nservices: []\n",
            store(&elsewhere, "password_file: password")
        ),
    )
    .unwrap();
    let registrar = registrar.to_str().unwrap();

    let secure = |ran: Ran| {
        assert_eq!(ran.code, Some(0), "{}", ran.err);
        let listed: Value = serde_json::from_str(&ran.out).unwrap_or_else(|e| panic!("{e}: {}", ran.out));
        assert_eq!(listed[0]["service"], "secure", "{listed}");
        assert_eq!(listed[0]["port"], 443, "{listed}");
    };
    secure(loopmesh(
        &["service", "list", "--config", agent, "-o", "json"],
        &[],
    ));
    // The environment's endpoints win over the config's; its TLS and
    // credentials still apply (etcdctl's bare host:port is https then).
    let list = ["service", "list", "--config", registrar, "-o", "json"];
    secure(loopmesh(&list, &[("LOOPMESH_ETCD", &etcd.endpoint())]));
    let bare = etcd.addr().to_string();
    secure(loopmesh(&list, &[("ETCDCTL_ENDPOINTS", &bare)]));
    let ran = loopmesh(
        &list,
        &[("ETCDCTL_ENDPOINTS", &bare), ("LOOPMESH_ETCD", &elsewhere)],
    );
    assert_eq!(ran.code, Some(4), "LOOPMESH_ETCD comes first: {}", ran.out);
    assert!(ran.err.contains(&elsewhere), "{}", ran.err);

    // Writes go through the same way, under the config's prefix.
    let ran = loopmesh(&["service", "put", "web", "port: 80", "--config", agent], &[]);
    assert_eq!(ran.code, Some(0), "{}", ran.err);
    assert_eq!(ran.out, "put /mesh/services/web\n");

    // No TLS files, or the wrong password: etcd refuses, exit status 4.
    let ran = loopmesh(
        &["service", "list", "--prefix", "/mesh"],
        &[("LOOPMESH_ETCD", &etcd.endpoint())],
    );
    assert_eq!(ran.code, Some(4), "{}{}", ran.out, ran.err);
    assert!(ran.err.contains(&etcd.endpoint()), "{}", ran.err);
    let wrong = dir.path().join("wrong.yaml");
    std::fs::write(&wrong, store(&etcd.endpoint(), "password: wrong")).unwrap();
    let ran = loopmesh(&["service", "list", "--config", wrong.to_str().unwrap()], &[]);
    assert_eq!(ran.code, Some(4), "{}{}", ran.out, ran.err);
    assert!(ran.err.contains("authentication failed"), "{}", ran.err);
    assert_eq!(ran.err.trim().lines().count(), 1, "one line: {}", ran.err);
}
