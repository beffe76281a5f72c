//! The registrar against a real etcd and real backends on loopback: health
//! flips, lease expiry on SIGKILL, draining on SIGTERM, a lost lease, an
//! etcd outage past the TTL, two nodes side by side, config reload, state
//! flags, and an agent rendering each of these changes.

mod common;

use common::{eventually_async, read, read_route, unique_ip, Etcd, Loopmesh};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A TCP backend that answers HTTP with `status` and `body`, until dropped.
struct Backend {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Backend {
    async fn start(addr: SocketAddr, status: &'static str, body: &'static str) -> Backend {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 1024];
                    let _ = stream.read(&mut request).await;
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        Backend { addr, task }
    }

    /// Closes the listener: connects are refused from now on.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn fresh_addr() -> SocketAddr {
    SocketAddr::from((unique_ip(), 18080))
}

/// Writes a registrar config (fast checks, a short lease) with `services`
/// YAML appended; returns its path.
fn registrar_config(dir: &Path, etcd: &Etcd, extra: &str) -> PathBuf {
    let path = dir.join(format!("registrar-{}.yaml", unique_ip()));
    let text = format!(
        "store: {{etcd: {{endpoints: [{}], retry_max: 200ms, request_timeout: 1s, dial_timeout: 500ms}}}}\nlease_ttl: 3s\ndrain_period: 0s\nstate_dir: state\n{extra}",
        etcd.endpoint()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts a healthy `web` backend and a registrar (node n1, `drain_period`)
/// checking it; returns them with the instance key and lease once registered.
async fn registered_web(etcd: &Etcd, dir: &Path, drain_period: &str) -> (Backend, Loopmesh, String, i64) {
    let backend = Backend::start(fresh_addr(), "200 OK", "ok").await;
    let services = format!("services:\n{}", service("web", backend.addr, ""));
    let config = registrar_config(dir, etcd, &services);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("drain_period: 0s", &format!("drain_period: {drain_period}")),
    )
    .unwrap();
    let registrar = registrar(&config, "n1", dir);
    let key = format!("/loopmesh/instances/web/n1-{}", backend.addr.port());
    let (_, lease) = wait_present(etcd, &key).await;
    (backend, registrar, key, lease)
}

fn service(name: &str, addr: SocketAddr, check: &str) -> String {
    format!(
        "  - service: {name}\n    host: {}\n    port: {}\n    tags: [blue]\n    weight: 5\n    zone: z1\n    check: {{interval: 100ms, timeout: 500ms, rise: 2, fall: 2{check}}}\n",
        addr.ip(),
        addr.port()
    )
}

fn registrar(config: &Path, node: &str, dir: &Path) -> Loopmesh {
    Loopmesh::spawn(
        &["registrar", "--config", config.to_str().unwrap(), "--node", node],
        dir,
    )
}

/// The value and lease of an etcd key, if present.
async fn get(etcd: &Etcd, key: &str) -> Option<(serde_json::Value, i64)> {
    let mut client = etcd.client().await;
    let response = client.get(key, None).await.ok()?;
    let kv = response.kvs().first()?;
    Some((serde_json::from_slice(kv.value()).unwrap(), kv.lease()))
}

async fn wait_present(etcd: &Etcd, key: &str) -> (serde_json::Value, i64) {
    eventually_async(&format!("{key} registered"), || get(etcd, key)).await
}

async fn wait_state(etcd: &Etcd, key: &str, state: &str) -> (serde_json::Value, i64) {
    eventually_async(&format!("{key} in state {state}"), || async {
        get(etcd, key).await.filter(|(value, _)| value["state"] == state)
    })
    .await
}

async fn wait_absent(etcd: &Etcd, key: &str) {
    eventually_async(&format!("{key} deregistered"), || async {
        get(etcd, key).await.is_none().then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_is_registered_while_healthy_and_the_agent_follows() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(fresh_addr(), "200 OK", "ok").await;
    let addr = backend.addr;
    let config = registrar_config(
        dir.path(),
        &etcd,
        &format!("services:\n{}", service("web", addr, "")),
    );
    let _registrar = registrar(&config, "n1", dir.path());
    let key = format!("/loopmesh/instances/web/n1-{}", addr.port());

    let (value, lease) = wait_present(&etcd, &key).await;
    assert_eq!(
        value,
        serde_json::json!({"host": addr.ip().to_string(), "port": addr.port(), "node": "n1", "zone": "z1",
                           "tags": ["blue"], "weight": 5, "state": "up"}),
        "the documented instance value"
    );
    assert_ne!(lease, 0, "registered under a lease");

    // An agent on the same etcd renders it.
    let agent_dir = tempfile::tempdir().unwrap();
    let agent_config = agent_dir.path().join("agent.yaml");
    std::fs::write(
        &agent_config,
        format!(
            "store: {{etcd: {{endpoints: [{}], retry_max: 200ms}}}}\nstate_dir: state\nproxy: {{enabled: false}}\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    etcd.client()
        .await
        .put("/loopmesh/services/web", "port: 8080", None)
        .await
        .unwrap();
    let _agent = Loopmesh::spawn(
        &["agent", "--config", agent_config.to_str().unwrap()],
        agent_dir.path(),
    );
    let route = agent_dir.path().join("state/routes/web.json");
    let id = format!("n1-{}", addr.port());
    common::eventually("the agent to render the backend", || {
        read_route(&route).filter(|r| r.backends.contains_key(&id))
    });

    // Killed: gone within fall × interval plus the check timeout and slack.
    let killed = Instant::now();
    backend.kill().await;
    wait_absent(&etcd, &key).await;
    let took = killed.elapsed();
    assert!(
        took < Duration::from_millis(2 * 100 + 500 + 2000),
        "deregistered after {took:?}, budget 200 ms of checks + 500 ms timeout + 2 s slack"
    );
    common::eventually("the agent to drop the backend", || {
        read_route(&route).filter(|r| !r.backends.contains_key(&id))
    });

    // Revived: back after rise passes.
    let _revived = Backend::start(addr, "200 OK", "ok").await;
    wait_present(&etcd, &key).await;
    common::eventually("the agent to render it again", || {
        read_route(&route).filter(|r| r.backends.contains_key(&id))
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn http_and_exec_checks_decide_registration() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let healthy = Backend::start(fresh_addr(), "200 OK", "all good").await;
    let wrong_status = Backend::start(fresh_addr(), "503 Service Unavailable", "all good").await;
    let wrong_body = Backend::start(fresh_addr(), "200 OK", "degraded").await;
    let marker = dir.path().join("healthy");
    let exec_addr = fresh_addr();
    let http = ", http: {path: /health, status: 200, body: good}";
    let exec = format!(", exec: {{command: \"test -e {}\"}}", marker.display());
    let services = [
        service("good", healthy.addr, http),
        service("status", wrong_status.addr, http),
        service("body", wrong_body.addr, http),
        service("cmd", exec_addr, &exec),
    ]
    .concat();
    let config = registrar_config(dir.path(), &etcd, &format!("services:\n{services}"));
    let registrar = registrar(&config, "n1", dir.path());

    wait_present(
        &etcd,
        &format!("/loopmesh/instances/good/n1-{}", healthy.addr.port()),
    )
    .await;
    let cmd_key = format!("/loopmesh/instances/cmd/n1-{}", exec_addr.port());
    assert!(
        get(&etcd, &cmd_key).await.is_none(),
        "the command fails until the marker exists"
    );
    std::fs::write(&marker, "").unwrap();
    wait_present(&etcd, &cmd_key).await;
    // By now every backend has been checked at least `rise` times since the
    // marker appeared (same interval): the failing ones stayed out.
    assert!(get(
        &etcd,
        &format!("/loopmesh/instances/status/n1-{}", wrong_status.addr.port())
    )
    .await
    .is_none());
    assert!(get(
        &etcd,
        &format!("/loopmesh/instances/body/n1-{}", wrong_body.addr.port())
    )
    .await
    .is_none());
    std::fs::remove_file(&marker).unwrap();
    wait_absent(&etcd, &cmd_key).await;
    registrar.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_lets_the_registration_expire_with_the_lease() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let (_backend, registrar, key, _) = registered_web(&etcd, dir.path(), "0s").await;
    let killed = Instant::now();
    drop(registrar); // SIGKILL
    wait_absent(&etcd, &key).await;
    assert!(
        killed.elapsed() > Duration::from_secs(1),
        "the key went before the lease could expire: {:?}",
        killed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_then_deletes_and_revokes() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let (_backend, registrar, key, lease) = registered_web(&etcd, dir.path(), "2s").await;

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(registrar.pid() as i32, libc::SIGTERM) };
    wait_state(&etcd, &key, "draining").await;
    wait_absent(&etcd, &key).await;
    registrar.wait_log("lease revoked");
    let mut client = etcd.client().await;
    let ttl = client.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(ttl.ttl(), -1, "the lease is revoked, not left to expire");
    registrar.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_lease_and_an_etcd_outage_past_the_ttl_end_registered() {
    let mut etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let (_backend, registrar, key, first_lease) = registered_web(&etcd, dir.path(), "0s").await;

    // The lease is revoked behind the registrar's back (as if it expired):
    // etcd deletes the key, the registrar takes a new lease and writes it again.
    etcd.client().await.lease_revoke(first_lease).await.unwrap();
    let (_, second_lease) = eventually_async("re-registration under a new lease", || async {
        get(&etcd, &key).await.filter(|(_, lease)| *lease != first_lease)
    })
    .await;
    registrar.wait_log("is gone (expired or revoked)");

    // etcd down for longer than the TTL (3 s): the outage itself is the
    // condition under test, so it is waited out.
    etcd.stop();
    registrar.wait_log("registrations are kept and retried");
    tokio::time::sleep(Duration::from_secs(4)).await;
    etcd.restart();
    let (value, lease) = wait_present(&etcd, &key).await;
    assert_eq!(value["state"], "up");
    assert_ne!(lease, 0, "registered under a lease");
    let _ = second_lease;
    // And it stays: the lease is kept alive again.
    registrar.wait_log("etcd answers again");
    let mut client = etcd.client().await;
    let ttl = client.lease_time_to_live(lease, None).await.unwrap();
    assert!(ttl.ttl() > 0, "the lease is alive");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_register_the_same_service_side_by_side() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let one = Backend::start(fresh_addr(), "200 OK", "ok").await;
    let two = Backend::start(fresh_addr(), "200 OK", "ok").await;
    let config_one = registrar_config(
        dir.path(),
        &etcd,
        &format!("services:\n{}", service("web", one.addr, "")),
    );
    let config_two = registrar_config(
        dir.path(),
        &etcd,
        &format!("services:\n{}", service("web", two.addr, "")),
    );
    let _a = registrar(&config_one, "node-a", dir.path());
    let _b = registrar(&config_two, "node-b", dir.path());
    let (a, lease_a) = wait_present(
        &etcd,
        &format!("/loopmesh/instances/web/node-a-{}", one.addr.port()),
    )
    .await;
    let (b, lease_b) = wait_present(
        &etcd,
        &format!("/loopmesh/instances/web/node-b-{}", two.addr.port()),
    )
    .await;
    assert_eq!(
        (a["node"].as_str(), b["node"].as_str()),
        (Some("node-a"), Some("node-b"))
    );
    assert_ne!(lease_a, lease_b, "each registrar holds its own lease");
}

#[tokio::test(flavor = "multi_thread")]
async fn service_files_reload_without_restart_and_flags_set_state() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("registrar.d");
    std::fs::create_dir_all(&services).unwrap();
    let web = Backend::start(fresh_addr(), "200 OK", "ok").await;
    let api = Backend::start(fresh_addr(), "200 OK", "ok").await;
    let file = |addr: SocketAddr, name: &str| {
        format!(
            "service: {name}\nhost: {}\nport: {}\ncheck: {{interval: 100ms, timeout: 500ms, rise: 1, fall: 1}}\n",
            addr.ip(),
            addr.port()
        )
    };
    std::fs::write(services.join("web.yaml"), file(web.addr, "web")).unwrap();
    let config = registrar_config(dir.path(), &etcd, "services_dir: registrar.d\n");
    let registrar = registrar(&config, "n1", dir.path());
    let web_key = format!("/loopmesh/instances/web/n1-{}", web.addr.port());
    let api_key = format!("/loopmesh/instances/api/n1-{}", api.addr.port());
    wait_present(&etcd, &web_key).await;

    // An invalid file changes nothing, and says so.
    std::fs::write(services.join("broken.yaml"), "service: api\nport: not-a-port\n").unwrap();
    registrar.wait_log("the previous 1 backend(s) stay");
    assert!(
        registrar.log_text().contains("broken.yaml"),
        "the error names the file"
    );
    assert!(get(&etcd, &web_key).await.is_some());

    // Fixed and added: registered; a file removed: deregistered.
    std::fs::remove_file(services.join("broken.yaml")).unwrap();
    std::fs::write(services.join("api.yaml"), file(api.addr, "api")).unwrap();
    wait_present(&etcd, &api_key).await;
    std::fs::remove_file(services.join("web.yaml")).unwrap();
    wait_absent(&etcd, &web_key).await;

    // An operator drains and puts back an instance through the CLI verb.
    let id = format!("n1-{}", api.addr.port());
    let set_state = |state: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_loopmesh"))
            .args([
                "set-state",
                "--config",
                config.to_str().unwrap(),
                "--node",
                "n1",
                &id,
                state,
            ])
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert!(set_state("maintenance").0);
    wait_state(&etcd, &api_key, "maintenance").await;
    assert!(set_state("draining").0);
    wait_state(&etcd, &api_key, "draining").await;
    assert!(set_state("up").0);
    wait_state(&etcd, &api_key, "up").await;
    let (ok, err) = set_state("sleeping");
    assert!(!ok, "an unknown state is refused");
    assert!(err.contains("not one of up, draining, maintenance"), "{err}");

    // SIGHUP (systemctl reload) re-reads, and the registrar goes on.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(registrar.pid() as i32, libc::SIGHUP) };
    registrar.wait_log("registrar: SIGHUP: re-reading the service files and flags");
    assert!(set_state("maintenance").0);
    wait_state(&etcd, &api_key, "maintenance").await;
    registrar.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_file_catalog_an_agent_renders_registrations_flags_and_draining() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog");
    std::fs::create_dir_all(catalog.join("services")).unwrap();
    std::fs::write(catalog.join("services/web.yaml"), "port: 8080\n").unwrap();
    let backend = Backend::start(fresh_addr(), "200 OK", "ok").await;
    let config = dir.path().join("registrar.yaml");
    std::fs::write(
        &config,
        format!(
            "store: {{catalog_dir: catalog}}\nlease_ttl: 3s\ndrain_period: 1s\nstate_dir: state\nservices:\n{}",
            service("web", backend.addr, "")
        ),
    )
    .unwrap();
    let registrar = registrar(&config, "n1", dir.path());
    let id = format!("n1-{}", backend.addr.port());
    let file = catalog.join(format!("instances/web/{id}.yaml"));
    let agent_dir = tempfile::tempdir().unwrap();
    let _agent = Loopmesh::spawn(
        &[
            "agent",
            "--catalog-dir",
            catalog.to_str().unwrap(),
            "--state-dir",
            agent_dir.path().join("state").to_str().unwrap(),
        ],
        agent_dir.path(),
    );
    let route = agent_dir.path().join("state/routes/web.json");
    // The backend as registered (weight 5) in `state`, in the route.
    let rendered_in = |state: &str| {
        read_route(&route).filter(|r| {
            r.backends.get(&id).is_some_and(|b| {
                (b.host.as_str(), b.port, b.weight, b.state.as_str())
                    == (
                        backend.addr.ip().to_string().as_str(),
                        backend.addr.port(),
                        5,
                        state,
                    )
            })
        })
    };

    // Registered as a file the agent reads back.
    common::eventually("the instance file", || read(&file));
    common::eventually("the agent to render it up", || rendered_in("up"));

    // A flag written by hand puts it in maintenance.
    std::fs::write(dir.path().join(format!("state/flags/{id}")), "maintenance\n").unwrap();
    common::eventually("maintenance rendered", || rendered_in("maintenance"));
    std::fs::remove_file(dir.path().join(format!("state/flags/{id}"))).unwrap();
    common::eventually("up again", || rendered_in("up"));

    // SIGTERM: draining for drain_period, then the file is removed.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(registrar.pid() as i32, libc::SIGTERM) };
    common::eventually("draining rendered", || rendered_in("draining"));
    common::eventually("the instance file removed", || (!file.exists()).then_some(()));
    common::eventually("the agent to drop it", || {
        read_route(&route).filter(|r| !r.backends.contains_key(&id))
    });
    registrar.stop();
}

/// One change under `/loopmesh/instances/` as a watch reports it.
#[derive(Debug)]
enum Change {
    Put {
        key: String,
        value: serde_json::Value,
        lease: i64,
        create_revision: i64,
    },
    Delete {
        key: String,
    },
}

/// Every change under `/loopmesh/instances/` after a revision, in order:
/// what the registrar wrote, not a sample of it.
struct Changes {
    stream: etcd_client::WatchStream,
    pending: std::collections::VecDeque<Change>,
    /// Kept so the watch lives as long as this.
    _client: etcd_client::Client,
}

impl Changes {
    async fn after(etcd: &Etcd, revision: i64) -> Changes {
        let mut client = etcd.client().await;
        let options = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let stream = client.watch("/loopmesh/instances/", Some(options)).await.unwrap();
        Changes {
            stream,
            pending: Default::default(),
            _client: client,
        }
    }

    /// The next change, failing the test after PATIENCE.
    async fn next(&mut self) -> Change {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return change;
            }
            let response = tokio::time::timeout(common::PATIENCE, self.stream.message())
                .await
                .expect("a change within PATIENCE")
                .unwrap()
                .expect("the watch stays open");
            for event in response.events() {
                let kv = event.kv().unwrap();
                let key = kv.key_str().unwrap().to_string();
                self.pending.push_back(match event.event_type() {
                    etcd_client::EventType::Put => Change::Put {
                        key,
                        value: serde_json::from_slice(kv.value()).unwrap(),
                        lease: kv.lease(),
                        create_revision: kv.create_revision(),
                    },
                    etcd_client::EventType::Delete => Change::Delete { key },
                });
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edited_service_file_updates_the_instance_in_place() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("registrar.d");
    std::fs::create_dir_all(&services).unwrap();
    let web = Backend::start(fresh_addr(), "200 OK", "ok").await;
    // Nothing listens here: configured, checked, never registered.
    let down = fresh_addr();
    let file = |name: &str, id: &str, addr: SocketAddr, weight: u32, interval: &str| {
        format!(
            "service: {name}\nid: {id}\nhost: {}\nport: {}\nweight: {weight}\ncheck: {{interval: {interval}, timeout: 500ms, rise: 2, fall: 2}}\n",
            addr.ip(),
            addr.port()
        )
    };
    let web_file = services.join("web.yaml");
    let down_file = services.join("down.yaml");
    std::fs::write(&web_file, file("web", "web-1", web.addr, 1, "100ms")).unwrap();
    std::fs::write(&down_file, file("down", "down-1", down, 1, "100ms")).unwrap();
    let config = registrar_config(dir.path(), &etcd, "services_dir: registrar.d\n");
    let registrar = registrar(&config, "n1", dir.path());
    let key = "/loopmesh/instances/web/web-1";
    wait_present(&etcd, key).await;
    let response = etcd.client().await.get(key, None).await.unwrap();
    let registered = response.kvs().first().unwrap();
    let (lease, created) = (registered.lease(), registered.create_revision());
    let mut changes = Changes::after(&etcd, registered.mod_revision()).await;

    // The canary recipe: only the weight changes. The next change in etcd
    // is the new value, put under the same lease on the key never deleted
    // (a delete would come first, and a re-put would have a new
    // create_revision).
    std::fs::write(&web_file, file("web", "web-1", web.addr, 5, "100ms")).unwrap();
    match changes.next().await {
        Change::Put {
            key: put,
            value,
            lease: put_lease,
            create_revision,
        } => {
            assert_eq!(put, key);
            assert_eq!(value["weight"], 5, "{value}");
            assert_eq!(value["state"], "up", "{value}");
            assert_eq!(put_lease, lease, "the same lease");
            assert_eq!(create_revision, created, "the key was never deleted");
        }
        other => panic!("expected the weight put on {key}, got {other:?}"),
    }
    registrar.wait_log("registrar: web/web-1 updated in place: weight 1 -> 5");

    // A check setting changes on the healthy one, the weight on the one
    // that is down: neither value in etcd changes, so nothing is written.
    std::fs::write(&web_file, file("web", "web-1", web.addr, 5, "150ms")).unwrap();
    std::fs::write(&down_file, file("down", "down-1", down, 3, "100ms")).unwrap();
    registrar.wait_log("registrar: web/web-1 updated in place: check.interval 100ms -> 150ms");
    registrar.wait_log("registrar: down/down-1 updated in place: weight 1 -> 3");
    // A marker written by the registrar after it applied those edits: the
    // next change must be this one, so the edits wrote nothing (no delete,
    // no second put of the weight) and the key is still the same one.
    std::fs::write(dir.path().join("state/flags/web-1"), "draining\n").unwrap();
    match changes.next().await {
        Change::Put {
            key: put,
            value,
            lease: put_lease,
            create_revision,
        } => {
            assert_eq!(put, key);
            assert_eq!(value["state"], "draining", "the flag is the next write: {value}");
            assert_eq!(value["weight"], 5, "{value}");
            assert_eq!(put_lease, lease, "the same lease");
            assert_eq!(create_revision, created, "the key was never deleted");
        }
        other => panic!("expected the flag's put on {key}, got {other:?}"),
    }

    // A new id is a new instance: the old key goes, the new one comes once
    // its checks pass.
    std::fs::write(&web_file, file("web", "web-2", web.addr, 5, "150ms")).unwrap();
    match changes.next().await {
        Change::Delete { key: deleted } => assert_eq!(deleted, key),
        other => panic!("expected {key} deleted, got {other:?}"),
    }
    match changes.next().await {
        Change::Put { key: put, value, .. } => {
            assert_eq!(put, "/loopmesh/instances/web/web-2");
            assert_eq!(value["state"], "up", "web-2 has no flag: {value}");
        }
        other => panic!("expected web/web-2 registered, got {other:?}"),
    }
    registrar.wait_log("registrar: web/web-1 is no longer configured");
    registrar.stop();
}

#[test]
fn set_state_refuses_an_id_the_registrar_does_not_know() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("registrar.d")).unwrap();
    std::fs::write(
        dir.path().join("registrar.d/api.yaml"),
        "service: api\nport: 9001\n",
    )
    .unwrap();
    let config = dir.path().join("registrar.yaml");
    std::fs::write(
        &config,
        "node: n1\nstore: {catalog_dir: catalog}\nstate_dir: state\nservices_dir: registrar.d\nservices:\n  - {service: web, port: 8080}\n  - {service: web, port: 8081, id: web-blue}\n",
    )
    .unwrap();
    let empty = dir.path().join("empty.yaml");
    std::fs::write(
        &empty,
        "node: n1\nstore: {catalog_dir: catalog}\nstate_dir: state\n",
    )
    .unwrap();
    let set_state = |config: &Path, id: &str, state: &str| {
        common::run(&["set-state", "--config", config.to_str().unwrap(), id, state])
    };
    let flags = dir.path().join("state/flags");

    for state in ["maintenance", "up"] {
        let (ok, out, err) = set_state(&config, "n1-9999", state);
        assert!(!ok, "an unknown id was accepted: {out}");
        assert!(
            err.contains(&format!(
                "instance id \"n1-9999\" is not one of the backends of {} on node n1 (known ids: n1-8080, web-blue, n1-9001); no flag written",
                config.display()
            )),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(!flags.join("n1-9999").exists(), "no flag file written");
    }
    let (ok, _, err) = set_state(&empty, "n1-8080", "draining");
    assert!(!ok);
    assert!(
        err.contains("is not one of the backends of") && err.contains("(it has no backends)"),
        "{err}"
    );
    assert!(!flags.join("n1-8080").exists(), "no flag file written");

    // Default ids follow the node name, which --node sets as for the registrar.
    let (ok, _, err) = common::run(&[
        "set-state",
        "--config",
        config.to_str().unwrap(),
        "--node",
        "n2",
        "n1-8080",
        "draining",
    ]);
    assert!(
        !ok && err.contains("on node n2 (known ids: n2-8080, web-blue, n2-9001)"),
        "{err}"
    );
    let (ok, _, err) = common::run(&[
        "set-state",
        "--config",
        config.to_str().unwrap(),
        "--node",
        "n2",
        "n2-8080",
        "draining",
    ]);
    assert!(ok, "{err}");
    assert_eq!(read(&flags.join("n2-8080")).as_deref(), Some("draining\n"));

    // A known id, from the config or from services_dir, is flagged.
    for id in ["web-blue", "n1-9001"] {
        let (ok, out, err) = set_state(&config, id, "maintenance");
        assert!(ok, "{err}");
        assert_eq!(out, format!("{id}: maintenance (flag in {})\n", flags.display()));
        assert_eq!(read(&flags.join(id)).as_deref(), Some("maintenance\n"));
    }
}
