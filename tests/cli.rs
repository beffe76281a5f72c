//! The loopmesh binary's one-shot commands and the agent on the file catalog.

mod common;

use common::{eventually, read, run, Etcd, Loopmesh};
use std::path::Path;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Writes a file through a hidden temporary and a rename, as operators should.
fn write_atomic(path: &Path, text: &str) {
    let staged = path.with_file_name(format!(".{}.tmp", path.file_name().unwrap().to_string_lossy()));
    write(&staged, text);
    std::fs::rename(staged, path).unwrap();
}

#[test]
fn check_accepts_the_quickstart_example() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart/agent.yaml");
    let (ok, stdout, stderr) = run(&["check", "--config", config.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok: config, 5 template resource(s)"), "{stdout}");
}

#[test]
fn check_refuses_bad_configs_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.yaml");
    let cases = [
        ("state_dir: s\nstate_dri: t\n", "state_dri"),
        ("templates: [{src: missing.tera, dest: out}]\n", "missing.tera"),
        (
            "templates_dir: tpl\ntemplates: [{src: broken.tera, dest: out}]\n",
            "broken.tera",
        ),
        (
            "store: {etcd: {endpoints: [localhost:2379]}}\n",
            "store.etcd.endpoints",
        ),
        ("log_level: \"loopmesh=shouty\"\n", "log_level"),
    ];
    write(&dir.path().join("tpl/broken.tera"), "{% for x in %}");
    for (text, needle) in cases {
        write(&config, text);
        let (ok, _, stderr) = run(&["check", "--config", config.to_str().unwrap()]);
        assert!(!ok, "{text} was accepted");
        assert!(stderr.contains(needle), "{text}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line expected: {stderr}");
        assert!(
            stderr.contains("agent.yaml") || stderr.contains("templates") || stderr.contains("template"),
            "{stderr}"
        );
    }
    let (ok, _, stderr) = run(&["check", "--config", "/nonexistent/agent.yaml"]);
    assert!(!ok && stderr.contains("/nonexistent/agent.yaml"), "{stderr}");
}

#[test]
fn render_needs_once() {
    let (ok, _, stderr) = run(&["render"]);
    assert!(!ok && stderr.contains("--once"), "{stderr}");
}

#[test]
fn render_once_on_the_file_catalog_allocates_and_renders() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog");
    write(&catalog.join("services/pg.yaml"), "port: 5432\n");
    write(
        &catalog.join("instances/pg/a.yaml"),
        "{host: 10.0.0.1, port: 5432}\n",
    );
    let state = dir.path().join("state");
    let args = [
        "render",
        "--once",
        "--catalog-dir",
        catalog.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("rendered: 2 written"), "{stdout}");
    let route = read(&state.join("routes/pg.json")).unwrap();
    let address = read(&catalog.join("addresses/pg.yaml")).unwrap();
    assert!(
        route.contains(&format!(r#""address": "{}""#, address.trim())),
        "{route}"
    );
    // Again: nothing changes, the address stays.
    let (ok, stdout, _) = run(&args);
    assert!(
        ok && stdout.contains("0 written, 0 removed, 2 unchanged"),
        "{stdout}"
    );
    assert_eq!(read(&catalog.join("addresses/pg.yaml")).unwrap(), address);
}

#[tokio::test(flavor = "multi_thread")]
async fn render_once_against_etcd_and_a_clear_error_when_it_is_down() {
    let mut etcd = Etcd::start();
    let mut client = etcd.client().await;
    client
        .put("/loopmesh/services/pg", "port: 5432", None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let endpoint = etcd.endpoint();
    let args = [
        "render",
        "--once",
        "--etcd",
        &endpoint,
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let (ok, _, stderr) = run(&args);
    assert!(ok, "{stderr}");
    assert!(read(&state.join("routes/pg.json")).is_some());
    assert!(read(&state.join("mesh.zone"))
        .unwrap()
        .contains("pg IN A 127.100."));

    etcd.stop();
    let (ok, _, stderr) = run(&args);
    assert!(!ok);
    assert!(
        stderr.contains(&endpoint),
        "the error names the endpoint: {stderr}"
    );
    assert!(
        read(&state.join("routes/pg.json")).is_some(),
        "a failed render keeps the files"
    );
}

#[test]
fn agent_follows_file_catalog_edits() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog");
    let state = dir.path().join("state");
    write(&catalog.join("services/web.yaml"), "port: 8080\n");
    let agent = Loopmesh::spawn(
        &[
            "agent",
            "--catalog-dir",
            catalog.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
        dir.path(),
    );
    let route = state.join("routes/web.json");
    eventually("web route", || read(&route));

    write_atomic(
        &catalog.join("instances/web/w1.yaml"),
        "{host: 10.0.0.1, port: 8080}\n",
    );
    eventually("w1 in the route", || {
        read(&route).filter(|r| r.contains(r#""id": "w1""#))
    });
    write_atomic(
        &catalog.join("instances/web/w1.yaml"),
        "{host: 10.0.0.1, port: 8080, state: maintenance}\n",
    );
    eventually("w1 in maintenance", || {
        read(&route).filter(|r| r.contains(r#""state": "maintenance""#))
    });
    write_atomic(&catalog.join("services/web.yaml"), "port: [broken\n");
    agent.wait_log("invalid catalog value at services/web");
    assert!(
        read(&route).unwrap().contains(r#""port": 8080,"#),
        "the last good definition stays"
    );

    std::fs::remove_file(catalog.join("services/web.yaml")).unwrap();
    eventually("web route removed", || (!route.exists()).then_some(()));
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_config_sets_the_log_level_unless_rust_log_does() {
    let dir = tempfile::tempdir().unwrap();
    let log_with = |rust_log: Option<&'static str>| {
        let dir = dir.path().to_path_buf();
        async move {
            let admin = std::net::TcpListener::bind((common::unique_ip(), 0))
                .unwrap()
                .local_addr()
                .unwrap();
            let config = dir.join(format!("agent-{}.yaml", admin.ip()));
            write(
                &config,
                &format!("state_dir: state\nstatic: true\nlog_level: warn\nadmin: {{listen: \"{admin}\"}}\ndns: {{enabled: false}}\n"),
            );
            let log = dir.join(format!("agent-{}.log", admin.ip()));
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_loopmesh"));
            command
                .args(["agent", "--config", config.to_str().unwrap()])
                .env_remove("RUST_LOG")
                .stderr(std::fs::File::create(&log).unwrap());
            if let Some(filter) = rust_log {
                command.env("RUST_LOG", filter);
            }
            let mut child = command.spawn().unwrap();
            common::eventually_async("the agent to be live", || async {
                common::http_get(admin, "/live")
                    .await
                    .filter(|(status, _)| *status == 200)
            })
            .await;
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            assert!(child.wait().unwrap().success());
            read(&log).unwrap_or_default()
        }
    };
    let configured = log_with(None).await;
    assert!(
        !configured.contains(" INFO "),
        "log_level: warn hides info lines: {configured}"
    );
    let overridden = log_with(Some("info")).await;
    assert!(
        overridden.contains(" INFO "),
        "RUST_LOG wins over log_level: {overridden}"
    );
}
