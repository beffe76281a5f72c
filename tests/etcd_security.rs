//! The agent against an etcd that demands client TLS, or a user and password.

mod common;

use common::{read, run, Etcd, Loopmesh};
use std::path::Path;

fn config(dir: &Path, etcd_block: &str) -> std::path::PathBuf {
    let path = dir.join("agent.yaml");
    std::fs::write(&path, format!("store:\n  etcd:\n{etcd_block}state_dir: state\n")).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn client_tls_with_a_client_certificate() {
    let etcd = Etcd::start_tls();
    let tls = etcd.tls.as_ref().unwrap();
    let mut client = etcd.client().await;
    client
        .put("/loopmesh/services/secure", "port: 443", None)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let block = format!(
        "    endpoints: [{}]\n    tls: {{ca_file: {}, cert_file: {}, key_file: {}}}\n",
        etcd.endpoint(),
        tls.ca.display(),
        tls.client_cert.display(),
        tls.client_key.display()
    );
    let path = config(dir.path(), &block);
    let (ok, _, stderr) = run(&["render", "--once", "--config", path.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(read(&dir.path().join("state/routes/secure.json")).is_some());

    // Without the client certificate etcd refuses us, and we say so.
    let block = format!(
        "    endpoints: [{}]\n    tls: {{ca_file: {}}}\n",
        etcd.endpoint(),
        tls.ca.display()
    );
    let path = config(dir.path(), &block);
    let (ok, _, stderr) = run(&["render", "--once", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains(&etcd.endpoint()), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn user_and_password_from_a_file() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    client
        .put("/loopmesh/services/authed", "port: 80", None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    common::enable_root_password(&mut client, dir.path()).await;
    let block = format!(
        "    endpoints: [{}]\n    username: root\n    password_file: password\n",
        etcd.endpoint()
    );
    let path = config(dir.path(), &block);
    let agent = Loopmesh::spawn(&["agent", "--config", path.to_str().unwrap()], dir.path());
    common::eventually("route rendered with auth", || {
        read(&dir.path().join("state/routes/authed.json"))
    });
    agent.stop();

    let block = format!(
        "    endpoints: [{}]\n    username: root\n    password: wrong\n",
        etcd.endpoint()
    );
    let path = config(dir.path(), &block);
    let (ok, _, stderr) = run(&["render", "--once", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains(&etcd.endpoint()) && stderr.contains("authentication failed"),
        "{stderr}"
    );
}
