//! The agent binary against a real etcd: writes in etcd become rendered files.

mod common;

use common::{eventually_async, read, Cutter, Etcd, Loopmesh};
use etcd_client::{Client, CompactionOptions};
use loopmesh::catalog::InstanceState;
use loopmesh::routing::Route;
use std::path::{Path, PathBuf};

const PREFIX: &str = "/lm";

struct Node {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Node {
    /// An agent config pointing at `endpoint`, with `extra` YAML appended.
    fn new(endpoint: &str, name: &str, extra: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.yaml");
        std::fs::write(
            &config,
            format!(
                "node: {name}\nstore:\n  prefix: {PREFIX}\n  etcd: {{endpoints: [{endpoint}], retry_max: 200ms, dial_timeout: 1s, request_timeout: 2s}}\nstate_dir: state\nproxy: {{enabled: false}}\n{extra}"
            ),
        )
        .unwrap();
        Node { dir, config }
    }

    fn spawn(&self) -> Loopmesh {
        Loopmesh::spawn(
            &["agent", "--config", self.config.to_str().unwrap()],
            self.dir.path(),
        )
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The service's rendered route, parsed as the data plane parses it.
    fn route(&self, service: &str) -> Option<Route> {
        let text = read(&self.state().join(format!("routes/{service}.json")))?;
        Some(Route::parse(&text).unwrap_or_else(|err| panic!("route {service} does not parse: {err}")))
    }

    fn zone(&self) -> String {
        read(&self.state().join("mesh.zone")).unwrap_or_default()
    }

    async fn until(&self, what: &str, check: impl Fn(&Node) -> bool) {
        eventually_async(what, || async { check(self).then_some(()) }).await;
    }
}

async fn put(client: &mut Client, key: &str, value: &str) {
    client.put(format!("{PREFIX}/{key}"), value, None).await.unwrap();
}

async fn delete(client: &mut Client, key: &str) {
    client.delete(format!("{PREFIX}/{key}"), None).await.unwrap();
}

/// Whether a route has a backend with this id.
fn has(route: &Route, id: &str) -> bool {
    route.backends.contains_key(id)
}

/// The address a route says its service listens on.
fn route_address(route: &Route) -> String {
    route.address.to_string()
}

fn state_json(node: &Node) -> serde_json::Value {
    serde_json::from_str(&read(&node.state().join("state.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn puts_and_deletes_reach_the_rendered_files() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let node = Node::new(&etcd.endpoint(), "a", "");
    let _agent = node.spawn();

    put(&mut client, "services/pg", "port: 5432").await;
    put(
        &mut client,
        "instances/pg/db-1",
        "{host: 10.0.0.1, port: 5432, zone: z1}",
    )
    .await;
    put(
        &mut client,
        "instances/pg/db-2",
        "host: 10.0.0.2\nport: 5433\nstate: draining\n",
    )
    .await;
    node.until("pg route with two backends", |n| {
        n.route("pg").is_some_and(|r| has(&r, "db-1") && has(&r, "db-2"))
    })
    .await;
    let route = node.route("pg").unwrap();
    assert!(
        route
            .backends
            .get("db-2")
            .is_some_and(|b| b.state == InstanceState::Draining)
            && route
                .backends
                .get("db-1")
                .is_some_and(|b| b.zone.as_deref() == Some("z1")),
        "{route:?}"
    );
    let address = route_address(&route);
    // The zone is written in the same pass, after the route files.
    node.until("pg in the zone", |n| {
        n.zone().contains(&format!("pg IN A {address}"))
    })
    .await;
    assert!(node.zone().contains("_pg._tcp IN SRV 0 0 5432 pg.mesh.internal."));
    // The address is in etcd for every other node to see.
    let stored = client.get(format!("{PREFIX}/addresses/pg"), None).await.unwrap();
    assert_eq!(stored.kvs()[0].value_str().unwrap(), address);

    delete(&mut client, "instances/pg/db-1").await;
    node.until("db-1 gone from the route", |n| {
        n.route("pg").is_some_and(|r| !has(&r, "db-1"))
    })
    .await;

    delete(&mut client, "services/pg").await;
    node.until("pg route removed", |n| n.route("pg").is_none()).await;
    node.until("pg gone from the zone", |n| !n.zone().contains("pg IN A"))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_value_is_skipped_and_the_rest_renders() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let node = Node::new(&etcd.endpoint(), "a", "");
    let agent = node.spawn();

    put(&mut client, "services/good", "port: 80").await;
    put(&mut client, "services/broken", "port: [80").await;
    put(
        &mut client,
        "instances/good/x",
        "{host: 10.0.0.1, port: 80, weight: -1}",
    )
    .await;
    put(&mut client, "instances/good/y", "{host: 10.0.0.2, port: 80}").await;
    node.until("good route with y", |n| {
        n.route("good").is_some_and(|r| has(&r, "y"))
    })
    .await;
    assert!(node.route("broken").is_none());
    assert!(!has(&node.route("good").unwrap(), "x"));
    agent.wait_log("invalid catalog value at services/broken");
    agent.wait_log("invalid catalog value at instances/good/x");
    let invalid = state_json(&node)["invalid_keys"].clone();
    assert_eq!(
        invalid,
        serde_json::json!(["instances/good/x", "services/broken"])
    );

    // A bad update to a good service keeps its last good definition.
    put(&mut client, "services/good", "port: 81\nbalance: random\n").await;
    put(&mut client, "instances/good/z", "{host: 10.0.0.3, port: 80}").await;
    node.until("z added", |n| n.route("good").is_some_and(|r| has(&r, "z")))
        .await;
    assert_eq!(node.route("good").unwrap().port(), 80);
    agent.wait_log("invalid catalog value at services/good");
    agent.wait_log("keeping its previous value");
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_while_the_agent_is_cut_off_forces_a_correct_resync() {
    let etcd = Etcd::start();
    let cutter = Cutter::start(etcd.addr());
    let mut client = etcd.client().await;
    let node = Node::new(&cutter.endpoint(), "a", "");
    let agent = node.spawn();

    put(&mut client, "services/old", "port: 1").await;
    put(&mut client, "services/kept", "port: 2").await;
    node.until("old and kept rendered", |n| {
        n.route("old").is_some() && n.route("kept").is_some()
    })
    .await;

    cutter.cut();
    agent.wait_log("catalog unreachable");
    delete(&mut client, "services/old").await;
    put(&mut client, "services/new", "port: 3").await;
    put(&mut client, "instances/kept/k", "{host: 10.0.0.9, port: 2}").await;
    let revision = client.get("x", None).await.unwrap().header().unwrap().revision();
    client
        .compact(revision, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    cutter.restore();

    agent.wait_log("taking a fresh snapshot");
    node.until("resynced files", |n| {
        n.route("old").is_none() && n.route("new").is_some() && n.route("kept").is_some_and(|r| has(&r, "k"))
    })
    .await;
    node.until("stale cleared", |n| state_json(n)["stale"] == false)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_restart_mid_watch_loses_no_update() {
    let mut etcd = Etcd::start();
    let node = Node::new(&etcd.endpoint(), "a", "");
    let agent = node.spawn();
    {
        let mut client = etcd.client().await;
        put(&mut client, "services/a", "port: 1").await;
    }
    node.until("a rendered", |n| n.route("a").is_some()).await;

    etcd.restart();
    agent.wait_log("catalog unreachable");
    // A burst right after the restart, likely before the agent is back:
    // it must resume from its revision and see every write, in order.
    let mut client = etcd.client().await;
    for i in 0..20 {
        put(
            &mut client,
            &format!("instances/a/i{i}"),
            &format!("{{host: 10.0.1.{i}, port: 1}}"),
        )
        .await;
    }
    delete(&mut client, "instances/a/i3").await;
    put(&mut client, "instances/a/i4", "{host: 10.0.2.4, port: 1}").await;
    node.until("all 20 writes, the delete and the update", |n| {
        n.route("a").is_some_and(|r| {
            r.backends.len() == 19 && !has(&r, "i3") && r.backends.values().any(|b| b.host == "10.0.2.4")
        })
    })
    .await;
    agent.wait_log("catalog reachable again");
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_agents_agree_on_addresses() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let a = Node::new(&etcd.endpoint(), "a", "");
    let b = Node::new(&etcd.endpoint(), "b", "");
    let _agent_a = a.spawn();
    let _agent_b = b.spawn();
    // Both agents must be watching before the services appear.
    a.until("a synced", |n| n.state().join("state.json").exists())
        .await;
    b.until("b synced", |n| n.state().join("state.json").exists())
        .await;

    let names: Vec<String> = (0..30).map(|i| format!("svc-{i}")).collect();
    let ops: Vec<_> = names
        .iter()
        .map(|n| etcd_client::TxnOp::put(format!("{PREFIX}/services/{n}"), "port: 80", None))
        .collect();
    client.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();

    let all_rendered = |n: &Node| names.iter().all(|s| n.route(s).is_some());
    a.until("a renders all", all_rendered).await;
    b.until("b renders all", all_rendered).await;
    let mut seen = std::collections::HashSet::new();
    for service in &names {
        let on_a = route_address(&a.route(service).unwrap());
        let on_b = route_address(&b.route(service).unwrap());
        assert_eq!(on_a, on_b, "{service} has different addresses on the two nodes");
        assert!(seen.insert(on_a.clone()), "{on_a} handed to two services");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_pinned_address_wins_and_a_clash_serves_only_the_first() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let node = Node::new(&etcd.endpoint(), "a", "");
    let agent = node.spawn();
    put(&mut client, "addresses/pinned", "127.100.9.9").await;
    put(&mut client, "services/pinned", "port: 80").await;
    node.until("pinned rendered", |n| n.route("pinned").is_some())
        .await;
    assert_eq!(route_address(&node.route("pinned").unwrap()), "127.100.9.9");

    put(&mut client, "addresses/late", "127.100.9.9").await;
    put(&mut client, "services/late", "port: 81").await;
    put(&mut client, "services/marker", "port: 82").await;
    node.until("marker rendered", |n| n.route("marker").is_some())
        .await;
    assert!(
        node.route("late").is_none(),
        "the later claimant must not be served"
    );
    agent.wait_log("address 127.100.9.9 is claimed by pinned first and also by late");

    // Once the first claimant goes, the second is served on that address.
    delete(&mut client, "services/pinned").await;
    delete(&mut client, "addresses/pinned").await;
    node.until("late served", |n| n.route("late").is_some()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_check_cmd_keeps_the_old_file() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    // Also exercises the debounced render path (the default renders at once).
    let extra = "render: {debounce: 5ms, max_delay: 50ms}\ntemplates:\n  - {src: hosts.tera, dest: hosts, keys: [services, addresses], check_cmd: \"! grep -q forbidden {{src}}\"}\n";
    let node = Node::new(&etcd.endpoint(), "a", extra);
    let agent = node.spawn();
    let hosts = node.state().join("hosts");

    put(&mut client, "services/fine", "port: 80").await;
    node.until("hosts has fine", |_| {
        read(&hosts).is_some_and(|h| h.contains("fine.mesh.internal"))
    })
    .await;
    let before = read(&hosts).unwrap();

    put(&mut client, "services/forbidden", "port: 81").await;
    agent.wait_log("check_cmd `! grep -q forbidden");
    node.until("forbidden's route still renders", |n| {
        n.route("forbidden").is_some()
    })
    .await;
    assert_eq!(
        read(&hosts).unwrap(),
        before,
        "a failed check must leave the old file"
    );
    // The refused render's staged file (state.json, written by the agent
    // as it goes, may be caught mid-write: not this check's business).
    let leftovers: Vec<_> = std::fs::read_dir(node.state())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".tmp") && name.contains("hosts")
        })
        .collect();
    assert!(leftovers.is_empty(), "staged files left behind: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_started_with_etcd_down_keeps_its_last_files() {
    let mut etcd = Etcd::start();
    let mut client = etcd.client().await;
    let node = Node::new(&etcd.endpoint(), "a", "");
    let agent = node.spawn();
    put(&mut client, "services/a", "port: 1").await;
    put(&mut client, "instances/a/x", "{host: 10.0.0.1, port: 1}").await;
    node.until("a rendered", |n| n.route("a").is_some_and(|r| has(&r, "x")))
        .await;
    agent.stop();
    let files_before = snapshot_dir(&node.state().join("routes"));
    let zone_before = node.zone();

    etcd.stop();
    let agent = node.spawn();
    agent.wait_log("serving it (stale)");
    agent.wait_log("catalog unreachable");
    node.until("state says stale", |n| state_json(n)["stale"] == true)
        .await;
    assert_eq!(snapshot_dir(&node.state().join("routes")), files_before);
    assert_eq!(node.zone(), zone_before);

    // When etcd returns, the agent catches up and is no longer stale.
    etcd.restart();
    let mut client = etcd.client().await;
    put(&mut client, "instances/a/y", "{host: 10.0.0.2, port: 1}").await;
    node.until("y rendered", |n| n.route("a").is_some_and(|r| has(&r, "y")))
        .await;
    node.until("stale cleared", |n| state_json(n)["stale"] == false)
        .await;
}

fn snapshot_dir(dir: &Path) -> Vec<(String, String)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// `/ready`'s JSON body from the agent's admin API.
async fn ready_body(agent: &Loopmesh) -> serde_json::Value {
    let (_, body) = eventually_async("an answer from the admin API", || {
        common::http_get(agent.admin.unwrap(), "/ready")
    })
    .await;
    serde_json::from_str(&body).unwrap()
}

/// How many log lines of `agent` contain `needle`.
fn log_lines(agent: &Loopmesh, needle: &str) -> usize {
    agent
        .log_text()
        .lines()
        .filter(|line| line.contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn state_json_follows_outages_and_refused_keys_and_each_condition_is_logged_once() {
    let mut etcd = Etcd::start();
    let mut client = etcd.client().await;
    let node = Node::new(&etcd.endpoint(), "a", "");
    let agent = node.spawn();
    put(&mut client, "services/a", "port: 1").await;
    // An address key an operator got wrong, for a defined service.
    put(&mut client, "addresses/b", "not-an-address").await;
    put(&mut client, "services/b", "port: 2").await;
    node.until("a rendered", |n| n.route("a").is_some()).await;
    // Many changes later, the bad key was still logged once (when written).
    for n in 0..20 {
        put(
            &mut client,
            &format!("instances/a/i{n}"),
            "{host: 10.0.0.1, port: 1}",
        )
        .await;
    }
    node.until("the last instance rendered", |n| {
        n.route("a").is_some_and(|r| has(&r, "i19"))
    })
    .await;
    assert_eq!(log_lines(&agent, "addresses/b"), 1, "{}", agent.log_text());

    // An invalid-only change is recorded, with its revision.
    let revision = client
        .put(format!("{PREFIX}/services/c"), "{port: nope}", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    node.until("state.json lists the refused key at its revision", |n| {
        let state = state_json(n);
        state["revision"] == revision
            && state["invalid_keys"]
                .as_array()
                .is_some_and(|keys| keys.iter().any(|k| k == "services/c"))
    })
    .await;

    // An outage: state.json, /ready and the metric all say stale (each as
    // soon as it is written or published: state.json may lead /ready by a
    // moment), and the condition is logged once however often the store is
    // retried.
    etcd.stop();
    node.until("state.json says stale during the outage", |n| {
        state_json(n)["stale"] == true
    })
    .await;
    eventually_async("/ready says stale", || async {
        (ready_body(&agent).await["stale"] == true).then_some(())
    })
    .await;
    common::eventually_metrics(
        agent.admin.unwrap(),
        "stale in the metrics",
        &["loopmesh_catalog_stale 1"],
    )
    .await;
    eventually_async("several reconnection attempts", || async {
        let (_, metrics) = common::http_get(agent.admin.unwrap(), "/metrics").await?;
        let attempts: f64 = metrics
            .lines()
            .find(|l| l.starts_with("loopmesh_store_unreachable_total"))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()?;
        (attempts >= 5.0).then_some(())
    })
    .await;
    assert_eq!(
        log_lines(&agent, "serving last known good files (stale)"),
        1,
        "{}",
        agent.log_text()
    );
    etcd.restart();
    node.until("state.json no longer stale", |n| state_json(n)["stale"] == false)
        .await;
    agent.wait_log("catalog reachable again");
    let served = state_json(&node)["revision"].clone();
    agent.stop();

    // Restarted with etcd down: /ready serves the revision on disk, stale.
    etcd.stop();
    let agent = node.spawn();
    agent.wait_log("serving it (stale)");
    eventually_async("/ready to report the revision on disk", || async {
        let body = ready_body(&agent).await;
        (body["revision"] == served && body["stale"] == true).then_some(())
    })
    .await;
    assert_eq!(state_json(&node)["revision"], served);
    assert_eq!(state_json(&node)["stale"], true);
}
