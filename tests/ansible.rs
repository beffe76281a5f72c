//! The ansible role and rollout playbook: ansible-lint and a syntax check
//! pass, and applying the role to this machine into a temporary root (the
//! service steps off) installs everything, then changes nothing the second
//! time.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ansible_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ansible")
}

/// Runs an ansible tool in `ansible/` with its state kept in `home`.
fn ansible(tool: &str, args: &[&str], home: &Path) -> (bool, String) {
    let output = Command::new(tool)
        .args(args)
        .current_dir(ansible_dir())
        .env("ANSIBLE_HOME", home)
        .env("ANSIBLE_LOCAL_TEMP", home.join("tmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
        .env("ANSIBLE_ROLES_PATH", ansible_dir().join("roles"))
        .output()
        .unwrap_or_else(|err| panic!("{tool} runs (apt-get install ansible-core ansible-lint): {err}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// `changed=N` of the play recap.
fn changed(recap: &str) -> u32 {
    let at = recap.rfind("changed=").expect("a play recap");
    recap[at + 8..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn the_role_lints_and_applies_idempotently_into_a_temporary_root() {
    let home = tempfile::tempdir().unwrap();
    let (ok, out) = ansible(
        "ansible-lint",
        &["--offline", "site.yml", "roles/loopmesh"],
        home.path(),
    );
    assert!(ok, "ansible-lint: {out}");

    let root = tempfile::tempdir().unwrap();
    // Mesh credentials on the controller, as `loopmesh ca` makes them.
    let certs = home.path().join("certs");
    let ca = certs.join("ca");
    for args in [
        vec![
            "ca",
            "init",
            "--trust-domain",
            "test.mesh",
            "--out",
            ca.to_str().unwrap(),
        ],
        vec![
            "ca",
            "issue",
            "--node",
            "node-1",
            "--ca",
            ca.to_str().unwrap(),
            "--out",
            certs.to_str().unwrap(),
        ],
    ] {
        let made = Command::new(env!("CARGO_BIN_EXE_loopmesh"))
            .args(&args)
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    }
    let inventory = home.path().join("inventory.ini");
    std::fs::write(
        &inventory,
        "[loopmesh]\nlocalhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3\n",
    )
    .unwrap();
    let vars = serde_json::json!({
        "loopmesh_root": root.path(),
        "loopmesh_manage_services": false,
        "loopmesh_binary_src": env!("CARGO_BIN_EXE_loopmesh"),
        "loopmesh_registrar_enabled": true,
        "loopmesh_proxy_workers": 3,
        "loopmesh_proxy_kernel_forwarding": true,
        "loopmesh_proxy_kernel_forwarding_max_open": 12,
        "loopmesh_registrar_services": [{"service": "web", "port": 8080, "check": {"http": {"path": "/health"}}}],
        "loopmesh_node": "node-1",
        "loopmesh_mesh_cert_src": certs.join("node-1.pem"),
        "loopmesh_mesh_key_src": certs.join("node-1.key"),
        "loopmesh_mesh_bundle_src": certs.join("bundle.pem"),
        "loopmesh_mesh_listen": "10.0.0.5:15008",
    })
    .to_string();
    let inventory = inventory.to_str().unwrap();
    let (ok, out) = ansible(
        "ansible-playbook",
        &["--syntax-check", "-i", inventory, "site.yml"],
        home.path(),
    );
    assert!(ok, "syntax check: {out}");

    let apply = || {
        ansible(
            "ansible-playbook",
            &["-i", inventory, "-e", &vars, "site.yml"],
            home.path(),
        )
    };
    let (ok, first) = apply();
    assert!(ok, "first apply: {first}");
    assert!(changed(&first) > 0, "the first apply installs: {first}");
    let (ok, second) = apply();
    assert!(ok, "second apply: {second}");
    assert_eq!(changed(&second), 0, "the second apply changes nothing: {second}");

    let binary = root.path().join("usr/local/bin/loopmesh");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&binary).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o755);
    for file in [
        "etc/loopmesh/agent.yaml",
        "etc/loopmesh/registrar.yaml",
        "etc/systemd/system/loopmesh-agent.service",
        "etc/systemd/system/loopmesh-registrar.service",
        "etc/systemd/resolved.conf.d/loopmesh.conf",
        "etc/systemd/system/loopmesh-agent.service.d/kernel-forwarding.conf",
        "etc/loopmesh/mesh/node.pem",
        "etc/loopmesh/mesh/node.key",
        "etc/loopmesh/mesh/bundle.pem",
    ] {
        assert!(root.path().join(file).is_file(), "{file} not installed");
    }
    let resolved =
        std::fs::read_to_string(root.path().join("etc/systemd/resolved.conf.d/loopmesh.conf")).unwrap();
    assert!(
        resolved.contains("DNS=127.0.0.153\n") && resolved.contains("Domains=~mesh.internal\n"),
        "{resolved}"
    );
    // The configs it wrote are ones the binary accepts, with the settings given.
    let agent = loopmesh::config::AgentConfig::load(
        Some(&root.path().join("etc/loopmesh/agent.yaml")),
        &loopmesh::config::Overrides::default(),
    )
    .unwrap();
    assert_eq!(agent.proxy.workers, 3);
    assert!(agent.proxy.kernel_forwarding);
    assert_eq!(agent.proxy.kernel_forwarding_max_open, 12);
    assert_eq!(agent.proxy.loopback_congestion, "cubic");
    let mesh = agent.mesh.expect("the mesh section, given credentials");
    assert_eq!(mesh.listen, Some("10.0.0.5:15008".parse().unwrap()));
    assert_eq!(mesh.cert, root.path().join("etc/loopmesh/mesh/node.pem"));
    let key = root.path().join("etc/loopmesh/mesh/node.key");
    let key_mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(
        key_mode & 0o777,
        0o640,
        "the key readable by the agent's group only"
    );
    // The files installed are credentials the agent accepts for this node.
    let installed = loopmesh::proxy::tls::CredentialFiles {
        cert: root.path().join("etc/loopmesh/mesh/node.pem"),
        key,
        bundle: root.path().join("etc/loopmesh/mesh/bundle.pem"),
    };
    loopmesh::proxy::tls::Credentials::load(installed, "node-1").unwrap();
    let registrar = root.path().join("etc/loopmesh/registrar.yaml");
    let check = Command::new(env!("CARGO_BIN_EXE_loopmesh"))
        .args(["registrar", "--check", "--config", registrar.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}
