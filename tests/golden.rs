//! Golden files for every shipped template, rendered through the real
//! renderer from one fixed catalog. Set UPDATE_GOLDEN=1 to rewrite them
//! after an intended template change, and review the diff.
//!
//! Beyond byte equality, each output is checked by the tool that will
//! consume it: the routing table by loopmesh's own loader, the HAProxy
//! config by `haproxy -c`, the zone by `named-checkzone`.

use loopmesh::catalog::Catalog;
use loopmesh::config::AgentConfig;
use loopmesh::render::{Dirty, Renderer};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// A catalog exercising every template branch.
fn catalog() -> Catalog {
    let mut catalog = Catalog::default();
    let entries: &[(&str, &str)] = &[
        (
            "services/postgres",
            "{port: 5432, balance: least_connections, connect_timeout: 500ms, max_connections: 200}",
        ),
        ("addresses/postgres", "127.100.0.7"),
        (
            "instances/postgres/db-1",
            "{host: 10.0.0.5, port: 5432, zone: eu-1, node: node-a}",
        ),
        (
            "instances/postgres/db-2",
            "{host: 10.0.0.6, port: 5432, zone: eu-2, state: maintenance}",
        ),
        (
            "services/web",
            "{port: 8080, protocol: http, balance: consistent_hash, retries: 1, http: {request_timeout: 5s, retry: {attempts: 3, statuses: [503]}, hash_on: {header: x-user-id}, routes: [{match: {headers: {x-canary: '1'}}, to: [{tags: [canary]}]}]}}",
        ),
        ("addresses/web", "127.100.0.8"),
        (
            "instances/web/web-1",
            "{host: 10.0.1.1, port: 18080, weight: 300, tags: [canary]}",
        ),
        (
            "instances/web/web-2",
            "{host: 10.0.1.2, port: 18080, state: draining}",
        ),
        (
            "services/3scale",
            "{port: 9000, balance: peak_ewma, idle_timeout: 30s}",
        ),
        ("addresses/3scale", "127.100.0.9"),
        ("services/unaddressed", "{port: 1}"),
        ("services/clash", "{port: 2}"),
        ("addresses/clash", "127.100.0.7"),
    ];
    for (revision, (key, value)) in entries.iter().enumerate() {
        catalog.put(key, value.as_bytes(), revision as i64 + 1);
    }
    catalog.set_revision(42);
    catalog
}

fn render_all(state: &Path) {
    let text = format!(
        "node: golden\nstate_dir: {}\ntemplates_dir: {}\ntemplates:\n  - {{src: haproxy.cfg.tera, dest: haproxy.cfg}}\n  - {{src: hosts.tera, dest: hosts, keys: [services, addresses]}}\n  - {{src: env.tera, dest: mesh.env, keys: [services, addresses]}}\n",
        state.display(),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("templates").display()
    );
    let config: AgentConfig = loopmesh::yaml::from_str(&text).unwrap();
    let mut renderer = Renderer::new(&config, Ipv4Addr::new(127, 0, 0, 153)).unwrap();
    let report = renderer.render(&catalog(), &Dirty::everything());
    assert!(report.failures.is_empty(), "{:?}", report.failures);
}

const OUTPUTS: [&str; 7] = [
    "routes/postgres.json",
    "routes/web.json",
    "routes/3scale.json",
    "mesh.zone",
    "haproxy.cfg",
    "hosts",
    "mesh.env",
];

#[test]
fn shipped_templates_match_their_golden_files() {
    let state = tempfile::tempdir().unwrap();
    render_all(state.path());
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatched = Vec::new();
    for output in OUTPUTS {
        let rendered = std::fs::read_to_string(state.path().join(output)).unwrap();
        let golden_path = golden_dir().join(output.replace('/', "__"));
        if update {
            std::fs::write(&golden_path, &rendered).unwrap();
            continue;
        }
        let golden = std::fs::read_to_string(&golden_path).unwrap_or_default();
        if rendered != golden {
            mismatched.push(format!(
                "{output}:\n--- golden\n{golden}\n--- rendered\n{rendered}"
            ));
        }
    }
    assert!(
        mismatched.is_empty(),
        "golden mismatch (UPDATE_GOLDEN=1 to accept):\n{}",
        mismatched.join("\n")
    );
    // Services that are not served get no route.
    let routes: Vec<_> = std::fs::read_dir(state.path().join("routes")).unwrap().collect();
    assert_eq!(routes.len(), 3);
}

#[test]
fn rendered_routing_table_loads() {
    let state = tempfile::tempdir().unwrap();
    render_all(state.path());
    let table = loopmesh::routing::load_table(&state.path().join("routes")).unwrap();
    assert_eq!(table.keys().collect::<Vec<_>>(), ["3scale", "postgres", "web"]);
    assert_eq!(table["web"].backends.len(), 2);
}

#[test]
fn rendered_haproxy_config_passes_haproxy_check() {
    let state = tempfile::tempdir().unwrap();
    render_all(state.path());
    let output = Command::new("haproxy")
        .args(["-c", "-f"])
        .arg(state.path().join("haproxy.cfg"))
        .output()
        .expect("haproxy must be installed (Debian package haproxy)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn rendered_zone_passes_named_checkzone() {
    let state = tempfile::tempdir().unwrap();
    render_all(state.path());
    let output = Command::new("named-checkzone")
        .arg("mesh.internal.")
        .arg(state.path().join("mesh.zone"))
        .output()
        .expect("named-checkzone must be installed (Debian package bind9-utils)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("loaded serial 42"), "{stdout}");
}
