//! The loopmesh binary's one-shot commands and the agent on the file catalog.

mod common;

use common::{eventually, read, run, Etcd, Loopmesh};
use loopmesh::catalog::InstanceState;
use loopmesh::routing::Route;
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
    // Copied out of the repository alone, it renders with the built-in
    // templates (no path back into the source tree).
    let copy = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(config.parent().unwrap())
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success());
    let copied = copy.path().join("quickstart/agent.yaml");
    let (ok, stdout, stderr) = run(&["render", "--once", "--config", copied.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("rendered:"), "{stdout}");
    assert!(read(&copy.path().join("quickstart/state/haproxy.cfg")).is_some());
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
    // Again: the route stays as it was, the address too; only the zone's
    // serial moves on (file catalog revisions start at the clock, above
    // the last one served: they never go backwards).
    let zone = read(&state.join("mesh.zone")).unwrap();
    let (ok, stdout, _) = run(&args);
    assert!(
        ok && stdout.contains("1 written, 0 removed, 1 unchanged"),
        "{stdout}"
    );
    assert_eq!(read(&state.join("routes/pg.json")).unwrap(), route);
    assert_ne!(read(&state.join("mesh.zone")).unwrap(), zone);
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
    let agent = agent_on_file_catalog(dir.path());
    let route = state.join("routes/web.json");
    eventually("web route", || read(&route));

    write_atomic(
        &catalog.join("instances/web/w1.yaml"),
        "{host: 10.0.0.1, port: 8080}\n",
    );
    let parsed = |path: &Path| read(path).and_then(|text| Route::parse(&text).ok());
    eventually("w1 in the route", || {
        parsed(&route).filter(|r| r.backends.contains_key("w1"))
    });
    write_atomic(
        &catalog.join("instances/web/w1.yaml"),
        "{host: 10.0.0.1, port: 8080, state: maintenance}\n",
    );
    eventually("w1 in maintenance", || {
        parsed(&route).filter(|r| r.backends["w1"].state == InstanceState::Maintenance)
    });
    write_atomic(&catalog.join("services/web.yaml"), "port: [broken\n");
    agent.wait_log("invalid catalog value at services/web");
    assert!(
        parsed(&route).unwrap().port() == 8080,
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

/// An agent on the file catalog `dir/catalog`, rendering into `dir/state`.
fn agent_on_file_catalog(dir: &Path) -> Loopmesh {
    let (catalog, state) = (dir.join("catalog"), dir.join("state"));
    Loopmesh::spawn(
        &[
            "agent",
            "--catalog-dir",
            catalog.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
        dir,
    )
}

/// The SOA serial of a rendered zone.
fn zone_serial(state: &Path) -> u64 {
    let zone = read(&state.join("mesh.zone")).unwrap();
    let soa = zone.lines().find(|l| l.contains(" SOA ")).unwrap();
    soa.split('(')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The revision in a state directory's state.json.
fn state_revision(state: &Path) -> i64 {
    let record: serde_json::Value = serde_json::from_str(&read(&state.join("state.json")).unwrap()).unwrap();
    record["revision"].as_i64().unwrap()
}

#[test]
fn a_missing_catalog_dir_is_an_error_unless_an_empty_one_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("catlog");
    let state = dir.path().join("state");
    // check validates the config (the directory may come later, as with
    // a role that creates it) and says the agent would refuse it.
    let (ok, _, stderr) = run(&[
        "check",
        "--catalog-dir",
        missing.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("note: store.catalog_dir") && stderr.contains(missing.to_str().unwrap()),
        "{stderr}"
    );
    for verb in [&["agent"][..], &["render", "--once"]] {
        let mut args = verb.to_vec();
        args.extend([
            "--catalog-dir",
            missing.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ]);
        let (ok, _, stderr) = run(&args);
        assert!(!ok, "{verb:?} must refuse a missing catalog: {stderr}");
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with("loopmesh:")).count(),
            1,
            "one error line: {stderr}"
        );
        assert!(
            stderr.contains("store.catalog_dir") && stderr.contains(missing.to_str().unwrap()),
            "{verb:?}: {stderr}"
        );
        assert!(
            stderr.contains("create_catalog_dir"),
            "the way out is named: {stderr}"
        );
        assert!(!missing.exists(), "{verb:?} created the directory");
        assert!(!state.join("routes").exists(), "{verb:?} rendered something");
    }
    let config = dir.path().join("agent.yaml");
    write(
        &config,
        &format!(
            "store: {{catalog_dir: {}, create_catalog_dir: true}}\n",
            missing.display()
        ),
    );
    let (ok, stdout, stderr) = run(&[
        "render",
        "--once",
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("rendered:"), "{stdout}");
    assert!(missing.is_dir());
}

#[test]
fn a_catalog_dir_that_vanishes_keeps_the_routes_and_is_followed_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog");
    let state = dir.path().join("state");
    write(&catalog.join("services/web.yaml"), "port: 8080\n");
    let agent = agent_on_file_catalog(dir.path());
    let route = state.join("routes/web.json");
    eventually("web route", || read(&route));
    let away = dir.path().join("catalog.away");
    std::fs::rename(&catalog, &away).unwrap();
    agent.wait_log("file catalog scan failed");
    eventually("state.json to say stale", || {
        read(&state.join("state.json")).filter(|s| s.contains("\"stale\": true"))
    });
    assert!(
        read(&route).is_some(),
        "the route stays while the catalog is unreadable"
    );
    std::fs::rename(&away, &catalog).unwrap();
    agent.wait_log("readable again");
    // Followed again: an edit after the return reaches the routes.
    write_atomic(&catalog.join("services/api.yaml"), "port: 9090\n");
    eventually("api route after the catalog returned", || {
        read(&state.join("routes/api.json"))
    });
    assert_eq!(agent.log_text().matches("file catalog scan failed").count(), 1);
    agent.stop();
}

#[test]
fn file_catalog_revisions_and_zone_serials_never_go_backwards_and_render_once_leaves_a_running_agent_alone() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog");
    let state = dir.path().join("state");
    write(&catalog.join("services/web.yaml"), "port: 8080\n");
    let flags = [
        "--catalog-dir",
        catalog.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let render_once = || run(&[&["render", "--once"][..], &flags].concat());
    let (ok, _, stderr) = render_once();
    assert!(ok, "{stderr}");
    let (first_revision, first_serial) = (state_revision(&state), zone_serial(&state));
    assert_eq!(first_serial, first_revision as u64 % (1 << 32));

    let agent = Loopmesh::spawn(&[&["agent"][..], &flags].concat(), dir.path());
    let after_start = eventually("the agent's first render", || {
        read(&state.join("state.json"))?;
        let revision = state_revision(&state);
        (revision > first_revision).then_some(revision)
    });
    assert!(
        zone_serial(&state) > first_serial,
        "the serial went on from the last one"
    );
    write_atomic(&catalog.join("services/api.yaml"), "port: 9090\n");
    // Settled: api is in the zone, and state.json records the zone's pass.
    eventually("api rendered and recorded", || {
        let zone = read(&state.join("mesh.zone"))?;
        (zone.contains("api IN A") && zone_serial(&state) == state_revision(&state) as u64 % (1 << 32))
            .then_some(())
    });
    let after_edit = state_revision(&state);
    assert!(after_edit > after_start);
    let zone = read(&state.join("mesh.zone")).unwrap();

    // Beside the running agent, render --once refuses and touches nothing.
    let (ok, _, stderr) = render_once();
    assert!(!ok, "render --once ran beside the agent");
    assert!(
        stderr.contains("in use by a running agent") && stderr.contains(&format!("pid {}", agent.pid())),
        "{stderr}"
    );
    assert_eq!(read(&state.join("mesh.zone")).unwrap(), zone);
    assert_eq!(state_revision(&state), after_edit);
    agent.stop();

    // After it stopped, on from the last revision again.
    let (ok, _, stderr) = render_once();
    assert!(ok, "{stderr}");
    assert!(state_revision(&state) > after_edit);
    assert!(zone_serial(&state) > after_edit as u64 % (1 << 32));
}

#[test]
fn yml_catalog_files_are_read_and_other_files_are_named_once() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog");
    let state = dir.path().join("state");
    write(&catalog.join("services/web.yml"), "port: 8080\n");
    write(&catalog.join("services/api.json"), "{\"port\": 9090}\n");
    let agent = agent_on_file_catalog(dir.path());
    eventually("web route from web.yml", || read(&state.join("routes/web.json")));
    agent.wait_log("api.json is not read");
    // Later rescans do not repeat it.
    write_atomic(&catalog.join("services/db.yaml"), "port: 5432\n");
    eventually("db route", || read(&state.join("routes/db.json")));
    assert_eq!(agent.log_text().matches("api.json is not read").count(), 1);
    assert!(read(&state.join("routes/api.json")).is_none());
    agent.stop();
}

#[test]
fn a_value_out_of_range_is_refused_naming_field_value_and_rule() {
    // Refused before any store is asked (none listens at this endpoint).
    let (ok, _, stderr) = run(&[
        "service",
        "put",
        "x",
        "{port: 70000}",
        "--etcd",
        "http://127.0.0.1:9",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("port: 70000 is not valid: a whole number from 0 to 65535"),
        "{stderr}"
    );
}

#[test]
fn a_duplicate_instance_id_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("registrar.yaml");
    write(
        &config,
        "node: n1\nstore: {catalog_dir: catalog}\nservices_dir: registrar.d\n",
    );
    let backend = "service: web\nhost: 127.0.0.1\nport: 8081\ncheck: {tcp: {}}\n";
    write(&dir.path().join("registrar.d/a.yaml"), backend);
    write(&dir.path().join("registrar.d/b.yaml"), backend);
    let (ok, _, stderr) = run(&["registrar", "--check", "--config", config.to_str().unwrap()]);
    assert!(!ok, "a duplicate was accepted");
    assert!(
        stderr.contains("registrar.d/a.yaml")
            && stderr.contains("registrar.d/b.yaml")
            && stderr.contains("n1-8081"),
        "{stderr}"
    );
}

/// `<device>:<inode>` of a file, as systemd names the journal stream.
fn stream_identity(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    format!("{}:{}", meta.dev(), meta.ino())
}

/// Whether `line` holds an RFC 3339 date (`2024-05-01T`), as the plain
/// format's timestamp starts.
fn has_timestamp(line: &str) -> bool {
    let bytes = line.as_bytes();
    bytes.windows(11).any(|w| {
        w.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            10 => *b == b'T',
            _ => b.is_ascii_digit(),
        })
    })
}

/// A static agent with no zone (it logs an error about it) whose stderr is
/// `log`, with JOURNAL_STREAM naming `stream`'s file; its log once the
/// error is in it and it stopped.
fn static_agent_log(dir: &Path, log: &Path, stream: &Path) -> String {
    let stderr = std::fs::File::create(log).unwrap();
    let admin = std::net::TcpListener::bind((common::unique_ip(), 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let state = dir.join(format!("state-{}", admin.ip()));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_loopmesh"))
        .args(["agent", "--static", "--state-dir", state.to_str().unwrap()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--dns-listen", &common::dns_addr().to_string()])
        .env_remove("RUST_LOG")
        .env("JOURNAL_STREAM", stream_identity(stream))
        .stderr(stderr)
        .spawn()
        .unwrap();
    eventually("the missing zone logged", || {
        read(log).filter(|text| text.contains("cannot read zone file"))
    });
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    read(log).unwrap_or_default()
}

#[test]
fn lines_for_the_journal_carry_their_priority_and_no_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal.log");
    let text = static_agent_log(dir.path(), &journal, &journal);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<3>ERROR dns: cannot read zone file")),
        "an error at priority 3: {text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>INFO agent ") && l.contains("in static mode")),
        "info at priority 6: {text}"
    );
    assert!(
        lines.iter().all(|l| {
            let priority = l.strip_prefix('<').and_then(|rest| rest.split_once('>'));
            priority.is_some_and(|(n, _)| n.parse::<u8>().is_ok_and(|n| n <= 7))
        }),
        "every line has a priority: {text}"
    );
    assert!(
        !lines.iter().any(|l| has_timestamp(l)),
        "journald stamps lines itself: {text}"
    );

    // JOURNAL_STREAM inherited by a process whose stderr goes elsewhere:
    // the plain format.
    let elsewhere = dir.path().join("elsewhere.log");
    let text = static_agent_log(dir.path(), &elsewhere, &journal);
    assert!(
        text.lines().all(|l| has_timestamp(l) && !l.starts_with('<')),
        "{text}"
    );
    assert!(text.contains(" ERROR dns: cannot read zone file"), "{text}");

    // A command's last line, its error, too.
    let log = dir.path().join("command.log");
    let stderr = std::fs::File::create(&log).unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_loopmesh"))
        .args(["service", "list"])
        .env_remove("LOOPMESH_ETCD")
        .env_remove("ETCDCTL_ENDPOINTS")
        .env("JOURNAL_STREAM", stream_identity(&log))
        .stderr(stderr)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    let said = read(&log).unwrap();
    assert!(said.starts_with("<3>loopmesh: no etcd endpoints"), "{said}");
}
