//! The ansible role and rollout playbook, run by the real ansible-core on
//! this machine with everything staged into a temporary root
//! (`loopmesh_root`, `loopmesh_manage_services: false`): nothing here
//! touches the machine's /etc, packages or services.
//!
//! What this proves: the role lints clean (production profile); a
//! check-mode run on a fresh root passes and writes nothing; applied, it
//! installs the package's files and every file of its own, writes configs
//! the binary accepts (with etcd TLS and a password, the agent's config
//! renders from a real etcd that demands both), and changes nothing the
//! second time; a new package is applied to the agent by reload, a new unit
//! by restart; booleans given as the text "false" by an INI inventory turn
//! their steps off; and every use of a boolean variable goes through
//! `| bool` (ansible-core 2.19 refuses text in a conditional).
//!
//! The package is the real one: systemd/deb/build-deb (the README's
//! command) run on this test's own binary, at Debian revisions 1 and 2; an
//! upgrade that changes the agent's unit and its default config installs a
//! package derived from the real one (see `altered_release`). Into a
//! staged root the role installs it with `dpkg --root` (the root's own
//! database, conffiles kept on upgrade as on a node) and the package's own
//! maintainer scripts run with DPKG_ROOT set, creating the `loopmesh` user
//! and its directories in the root; the `ansible.builtin.apt` step a real
//! node runs and the systemd steps are linted but not run. Without services
//! the handlers are skipped, so the tests read the reload-or-restart
//! decision they would act on from the run's output.

mod common;

use common::ok;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

fn ansible_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ansible")
}

/// Runs an ansible tool in `ansible/` with all its state kept in `home`.
fn ansible(tool: &str, args: &[&str], home: &Path) -> Run {
    let output = Command::new(tool)
        .args(args)
        .current_dir(ansible_dir())
        .env("ANSIBLE_HOME", home)
        .env("ANSIBLE_LOCAL_TEMP", home.join("tmp"))
        .env("ANSIBLE_REMOTE_TEMP", home.join("remote-tmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
        .env("ANSIBLE_ROLES_PATH", ansible_dir().join("roles"))
        .output()
        .unwrap_or_else(|err| panic!("{tool} runs (apt-get install ansible-core ansible-lint): {err}"));
    Run {
        ok: output.status.success(),
        out: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// What an ansible run printed (the default callback).
struct Run {
    ok: bool,
    out: String,
}

impl Run {
    /// `changed=N` of the play recap.
    fn changed(&self) -> u32 {
        let at = self.out.rfind("changed=").expect("a play recap");
        self.out[at + 8..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The output of the task or handler `name` (without the role's
    /// prefix), if it ran at all.
    fn block(&self, name: &str) -> Option<&str> {
        let mut blocks = self
            .out
            .split("\nTASK [")
            .flat_map(|b| b.split("\nRUNNING HANDLER ["));
        blocks.find(|block| {
            let header = block.lines().next().unwrap_or_default();
            let title = header.rsplit_once(']').map_or(header, |(title, _)| title);
            title.strip_prefix("loopmesh : ").unwrap_or(title) == name
        })
    }

    /// The statuses (`ok`, `changed`, `skipping`, `fatal`...) task `name`
    /// printed; empty if it did not run.
    fn statuses(&self, name: &str) -> Vec<&str> {
        self.block(name)
            .into_iter()
            .flat_map(str::lines)
            .filter_map(|line| line.split_once(": [").map(|(status, _)| status))
            .filter(|status| !status.contains(' '))
            .collect()
    }

    /// Asserts task `name` ran and was skipped every time.
    fn assert_skipped(&self, name: &str) {
        let statuses = self.statuses(name);
        assert!(
            !statuses.is_empty() && statuses.iter().all(|s| *s == "skipping"),
            "{name:?} should have run and been skipped, got {statuses:?}: {}",
            self.out
        );
    }

    /// How the agent would take this run's changes (`reloaded` or
    /// `restarted`), as decided for its handler (printed with -v).
    fn agent_apply(&self) -> &'static str {
        let block = self
            .block("Decide how the agent takes its changes")
            .unwrap_or_else(|| panic!("no decision in: {}", self.out));
        ["reloaded", "restarted"]
            .into_iter()
            .find(|way| block.contains(&format!("\"loopmesh__agent_apply\": \"{way}\"")))
            .unwrap_or_else(|| panic!("no decision in: {block}"))
    }
}

/// Applies site.yml with `inventory` and extra vars (`--check` etc. in `more`).
fn play(home: &Path, inventory: &Path, vars: &serde_json::Value, more: &[&str]) -> Run {
    let vars = vars.to_string();
    let mut args = vec!["-v", "-i", inventory.to_str().unwrap(), "-e", &vars];
    args.extend_from_slice(more);
    args.push("site.yml");
    ansible("ansible-playbook", &args, home)
}

/// An inventory of this machine (local connection) plus `vars` as an INI
/// `[loopmesh:vars]` section, where every value is text.
fn inventory(home: &Path, vars: &str) -> PathBuf {
    let path = home.join("inventory.ini");
    std::fs::write(
        &path,
        format!(
            "[loopmesh]\nlocalhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3\n\n[loopmesh:vars]\n{vars}"
        ),
    )
    .unwrap();
    path
}

/// The real package at Debian revision `revision`, built once per run of
/// these tests (in cargo's tmp dir for integration tests).
fn release(revision: u32) -> PathBuf {
    static BUILT: Mutex<BTreeMap<u32, PathBuf>> = Mutex::new(BTreeMap::new());
    // The package's postinst, run by the role's dpkg, creates the user.
    common::require_tool("systemd-sysusers", "systemd");
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    built
        .entry(revision)
        .or_insert_with(|| {
            let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join("ansible-test")
                .join(format!("revision-{revision}"));
            common::build_deb(&out, revision)
        })
        .clone()
}

/// `VERSION-revision`, the version build-deb gives revision `revision`.
fn version(revision: u32) -> String {
    format!("{}-{revision}", env!("CARGO_PKG_VERSION"))
}

/// What this release's agent unit and default agent config end with.
fn altered(revision: u32) -> String {
    format!("# changed in {}\n", version(revision))
}

/// Revision `revision`, derived from the real package of revision 2
/// (`dpkg-deb -R`, edit, `dpkg-deb -b`) with [`altered`] appended to the
/// agent's unit and to its default config, and its md5sums redone. Hand
/// altered because build-deb packages the repository as it is, and the
/// upgrade where a new unit means a restart and a new default config must
/// not replace the role's needs a release in which both differ.
fn altered_release(dir: &Path, revision: u32) -> PathBuf {
    let tree = dir.join(format!("loopmesh-{}", version(revision)));
    ok(Command::new("dpkg-deb").arg("-R").arg(release(2)).arg(&tree));
    let edit = |file: &str, change: &dyn Fn(String) -> String| {
        let path = tree.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, change(text)).unwrap();
    };
    edit("DEBIAN/control", &|control| {
        control.replace(
            &format!("\nVersion: {}\n", version(2)),
            &format!("\nVersion: {}\n", version(revision)),
        )
    });
    for file in [
        "usr/lib/systemd/system/loopmesh-agent.service",
        "etc/loopmesh/agent.yaml",
    ] {
        edit(file, &|text| text + &altered(revision));
    }
    ok(Command::new("sh")
        .arg("-c")
        .arg(r#"cd "$1" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum >DEBIAN/md5sums"#)
        .arg("sh")
        .arg(&tree));
    let deb = dir.join(format!("loopmesh_{}.deb", version(revision)));
    ok(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "-z1", "--build"])
        .arg(&tree)
        .arg(&deb));
    let field = ok(Command::new("dpkg-deb").arg("--field").arg(&deb).arg("Version"));
    assert_eq!(
        common::stdout(&field).trim(),
        version(revision),
        "the altered control"
    );
    deb
}

fn mode(path: &Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions()) & 0o777
}

/// `loopmesh ca init` and `ca issue` for `node` into `dir`: the node's
/// mesh certificate, key and the bundle, as an operator makes them.
fn mesh_credentials(dir: &Path, node: &str) {
    let ca = dir.join("ca");
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
            node,
            "--ca",
            ca.to_str().unwrap(),
            "--out",
            dir.to_str().unwrap(),
        ],
    ] {
        let (ok, _, stderr) = common::run(&args);
        assert!(ok, "loopmesh {args:?}: {stderr}");
    }
}

#[test]
fn the_role_lints_clean_with_the_production_profile() {
    let home = tempfile::tempdir().unwrap();
    let lint = ansible(
        "ansible-lint",
        &[
            "--offline",
            "--nocolor",
            "--profile",
            "production",
            "site.yml",
            "roles/loopmesh",
        ],
        home.path(),
    );
    assert!(lint.ok, "ansible-lint: {}", lint.out);
    let inventory = inventory(home.path(), "");
    let syntax = ansible(
        "ansible-playbook",
        &["--syntax-check", "-i", inventory.to_str().unwrap(), "site.yml"],
        home.path(),
    );
    assert!(syntax.ok, "syntax check: {}", syntax.out);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_role_installs_the_package_and_applies_idempotently_into_a_temporary_root() {
    // An etcd that demands a client certificate and a password.
    let etcd = common::Etcd::start_tls();
    let tls = etcd.tls.as_ref().unwrap();
    let mut client = etcd.client().await;
    client
        .put("/loopmesh/services/web", "port: 8080", None)
        .await
        .unwrap();
    let password = "s3cret-for-the-role";
    client.user_add("root", password, None).await.unwrap();
    client.user_grant_role("root", "root").await.unwrap();
    client.auth_enable().await.unwrap();

    let home = tempfile::tempdir().unwrap();
    let certs = home.path().join("certs");
    mesh_credentials(&certs, "node-1");
    let deb = release(1);
    let root = tempfile::tempdir().unwrap();
    let inventory = inventory(home.path(), "");
    let vars = serde_json::json!({
        "loopmesh_root": root.path(),
        "loopmesh_manage_services": false,
        "loopmesh_deb_file": deb,
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
        "loopmesh_etcd_endpoints": [etcd.endpoint()],
        "loopmesh_etcd_ca_src": tls.ca,
        "loopmesh_etcd_cert_src": tls.client_cert,
        "loopmesh_etcd_key_src": tls.client_key,
        "loopmesh_etcd_username": "root",
        "loopmesh_etcd_password": password,
    });

    let check = play(home.path(), &inventory, &vars, &["--check", "--diff"]);
    assert!(check.ok, "check mode on a fresh root: {}", check.out);
    assert!(
        std::fs::read_dir(root.path()).unwrap().next().is_none(),
        "check mode wrote into the root"
    );

    let first = play(home.path(), &inventory, &vars, &["--diff"]);
    assert!(first.ok, "first apply: {}", first.out);
    assert!(first.changed() > 0, "the first apply installs: {}", first.out);
    let second = play(home.path(), &inventory, &vars, &["--diff"]);
    assert!(second.ok, "second apply: {}", second.out);
    assert_eq!(
        second.changed(),
        0,
        "the second apply changes nothing: {}",
        second.out
    );
    for run in [&check, &first, &second] {
        assert!(
            !run.out.contains(password),
            "the etcd password in the output: {}",
            run.out
        );
    }

    let path = |file: &str| root.path().join(file);
    // The package's files, installed by dpkg; the units come from it, none
    // from the role.
    assert_eq!(mode(&path("usr/bin/loopmesh")), 0o755);
    for unit in ["loopmesh-agent.service", "loopmesh-registrar.service"] {
        assert_eq!(
            std::fs::read_to_string(path(&format!("usr/lib/systemd/system/{unit}"))).unwrap(),
            common::packaged_unit(unit)
        );
        assert!(
            !path(&format!("etc/systemd/system/{unit}")).exists(),
            "{unit} installed by the role"
        );
    }
    // The package's postinst ran under DPKG_ROOT: the loopmesh user
    // (systemd-sysusers) and its directories (systemd-tmpfiles) are in the
    // staged root.
    let passwd = std::fs::read_to_string(path("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|line| line.starts_with("loopmesh:"))
        .unwrap_or_else(|| panic!("no loopmesh user in the staged root: {passwd}"));
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    for dir in ["var/lib/loopmesh/catalog", "var/lib/loopmesh/registrar"] {
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(path(dir)).unwrap());
        assert_eq!(owner, uid, "{dir} belongs to {user}");
    }
    for file in [
        "etc/loopmesh/agent.yaml",
        "etc/loopmesh/registrar.yaml",
        "etc/systemd/resolved.conf.d/loopmesh.conf",
        "etc/systemd/system/loopmesh-agent.service.d/kernel-forwarding.conf",
        "etc/loopmesh/mesh/node.pem",
        "etc/loopmesh/mesh/bundle.pem",
        "etc/loopmesh/etcd/ca.pem",
        "etc/loopmesh/etcd/client.pem",
    ] {
        assert!(path(file).is_file(), "{file} not installed");
    }
    let resolved = std::fs::read_to_string(path("etc/systemd/resolved.conf.d/loopmesh.conf")).unwrap();
    assert!(
        resolved.contains("DNS=127.0.0.153\n") && resolved.contains("Domains=~mesh.internal\n"),
        "{resolved}"
    );
    // Keys and the password readable by the daemons' group only.
    for secret in [
        "etc/loopmesh/mesh/node.key",
        "etc/loopmesh/etcd/client.key",
        "etc/loopmesh/etcd/password",
    ] {
        assert_eq!(mode(&path(secret)), 0o640, "{secret}");
    }
    assert_eq!(
        std::fs::read_to_string(path("etc/loopmesh/etcd/password")).unwrap(),
        password
    );

    // The configs it wrote are ones the binary accepts, with the settings given.
    let overrides = loopmesh::config::Overrides::default();
    let agent =
        loopmesh::config::AgentConfig::load(Some(&path("etc/loopmesh/agent.yaml")), &overrides).unwrap();
    assert_eq!(agent.proxy.workers, 3);
    assert!(agent.proxy.kernel_forwarding);
    assert_eq!(agent.proxy.kernel_forwarding_max_open, 12);
    assert_eq!(agent.proxy.loopback_congestion, "cubic");
    let mesh = agent.mesh.as_ref().expect("the mesh section, given credentials");
    assert_eq!(mesh.listen, Some("10.0.0.5:15008".parse().unwrap()));
    assert_eq!(mesh.cert, path("etc/loopmesh/mesh/node.pem"));
    let etcd_config = agent.store.etcd.as_ref().expect("the etcd section");
    assert_eq!(etcd_config.endpoints, vec![etcd.endpoint()]);
    assert_eq!(etcd_config.username.as_deref(), Some("root"));
    assert_eq!(etcd_config.password, None, "the password stays out of the config");
    assert_eq!(
        etcd_config.password_file,
        Some(path("etc/loopmesh/etcd/password"))
    );
    let etcd_tls = etcd_config.tls.as_ref().expect("etcd TLS");
    assert_eq!(etcd_tls.ca_file, path("etc/loopmesh/etcd/ca.pem"));
    assert_eq!(etcd_tls.cert_file, Some(path("etc/loopmesh/etcd/client.pem")));
    assert_eq!(etcd_tls.key_file, Some(path("etc/loopmesh/etcd/client.key")));
    // The files installed are credentials the agent accepts for this node.
    let installed = loopmesh::proxy::tls::CredentialFiles {
        cert: path("etc/loopmesh/mesh/node.pem"),
        key: path("etc/loopmesh/mesh/node.key"),
        bundle: path("etc/loopmesh/mesh/bundle.pem"),
    };
    loopmesh::proxy::tls::Credentials::load(installed, "node-1").unwrap();
    let registrar = path("etc/loopmesh/registrar.yaml");
    let (ok, _, stderr) = common::run(&["registrar", "--check", "--config", registrar.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let registrar = loopmesh::registrar::config::RegistrarConfig::load(&registrar, &overrides).unwrap();
    assert_eq!(registrar.store, agent.store, "both daemons reach the same store");
    assert_eq!(registrar.mesh, Some("10.0.0.5:15008".parse().unwrap()));

    // The installed etcd credentials work: the agent's config renders the
    // catalog of the etcd that demands them.
    let state = home.path().join("state");
    let config = path("etc/loopmesh/agent.yaml");
    let (ok, _, stderr) = common::run(&[
        "render",
        "--once",
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(ok, "render with the installed etcd credentials: {stderr}");
    assert!(state.join("routes/web.json").is_file());
}

#[test]
fn a_new_package_reloads_the_agent_and_a_new_unit_restarts_it() {
    let home = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let inventory = inventory(home.path(), "");
    let apply = |deb: &Path| {
        let vars = serde_json::json!({
            "loopmesh_root": root.path(),
            "loopmesh_manage_services": false,
            "loopmesh_deb_file": deb,
        });
        let run = play(home.path(), &inventory, &vars, &[]);
        assert!(run.ok, "apply {}: {}", deb.display(), run.out);
        run
    };
    // The version the staged root's own dpkg database records.
    let installed = || {
        let admindir = format!("--admindir={}/var/lib/dpkg", root.path().display());
        let query = Command::new("dpkg-query")
            .args([admindir.as_str(), "--show", "--showformat=${Version}", "loopmesh"])
            .output()
            .expect("dpkg-query runs (apt-get install dpkg)");
        String::from_utf8_lossy(&query.stdout).into_owned()
    };
    let agent_config = root.path().join("etc/loopmesh/agent.yaml");

    // A node from before the package: the role's own binary and unit, which
    // would shadow the package's (PATH, /etc over /usr/lib), go; the agent's
    // unit changes with them, so it restarts.
    for legacy in [
        "usr/local/bin/loopmesh",
        "etc/systemd/system/loopmesh-agent.service",
    ] {
        let legacy = root.path().join(legacy);
        std::fs::create_dir_all(legacy.parent().unwrap()).unwrap();
        std::fs::write(legacy, "from the role before the package").unwrap();
    }
    let first = apply(&release(1));
    assert_eq!(installed(), version(1));
    assert!(!root.path().join("usr/local/bin/loopmesh").exists());
    assert!(!root
        .path()
        .join("etc/systemd/system/loopmesh-agent.service")
        .exists());
    assert_eq!(first.agent_apply(), "restarted");
    first.assert_skipped("Reload or restart loopmesh-agent");

    // A new revision with the same units and defaults: a reload, the
    // takeover that refuses nothing; the role's config stays as it was.
    let config = std::fs::read_to_string(&agent_config).unwrap();
    let config_kept = |upgrade: &Run| {
        assert_eq!(
            upgrade.statuses("Write the agent config (validated by the binary first)"),
            ["ok"],
            "the role had nothing to rewrite: {}",
            upgrade.out
        );
        assert_eq!(std::fs::read_to_string(&agent_config).unwrap(), config);
    };
    let upgrade = apply(&release(2));
    assert_eq!(installed(), version(2));
    assert!(upgrade.changed() > 0, "{}", upgrade.out);
    config_kept(&upgrade);
    assert_eq!(upgrade.agent_apply(), "reloaded");
    upgrade.assert_skipped("Reload or restart loopmesh-agent");
    upgrade.assert_skipped("Restart loopmesh-registrar");

    // A new revision whose agent unit changed: a restart. Its default
    // config changed too, but dpkg kept the role's (the role had nothing to
    // rewrite) and put the new default beside it.
    let new_unit = altered_release(home.path(), 3);
    let upgrade = apply(&new_unit);
    assert_eq!(installed(), version(3));
    assert_eq!(upgrade.agent_apply(), "restarted");
    upgrade.assert_skipped("Reload or restart loopmesh-agent");
    assert!(
        std::fs::read_to_string(root.path().join("usr/lib/systemd/system/loopmesh-agent.service"))
            .unwrap()
            .ends_with(&altered(3)),
        "the new unit installed"
    );
    config_kept(&upgrade);
    let dist = std::fs::read_to_string(root.path().join("etc/loopmesh/agent.yaml.dpkg-dist"))
        .unwrap_or_else(|err| panic!("the new default beside the role's config: {err}\n{}", upgrade.out));
    assert!(dist.ends_with(&altered(3)), "{dist}");

    // The same package again: nothing to apply, no handler.
    let again = apply(&new_unit);
    assert_eq!(again.changed(), 0, "{}", again.out);
    assert!(
        again.block("Reload or restart loopmesh-agent").is_none(),
        "{}",
        again.out
    );
}

#[test]
fn booleans_given_as_false_by_an_ini_inventory_turn_their_steps_off() {
    let home = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let deb = release(1);
    // Everything as text, as an INI inventory's [group:vars] gives it.
    let inventory = inventory(
        home.path(),
        &format!(
            "loopmesh_root={}\nloopmesh_deb_file={}\nloopmesh_manage_services=false\nloopmesh_resolved_dropin=false\nloopmesh_registrar_enabled=false\nloopmesh_proxy_kernel_forwarding=false\nloopmesh_agent_enabled=true\nloopmesh_etcd_endpoints=[\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]\n",
            root.path().display(),
            deb.display()
        ),
    );
    let run = play(home.path(), &inventory, &serde_json::json!({}), &[]);
    assert!(run.ok, "{}", run.out);
    // No service touched: every step and handler that would was skipped.
    for step in [
        "Enable the agent",
        "Start the agent",
        "Enable the registrar",
        "Start the registrar",
        "Reload or restart loopmesh-agent",
        "Restart loopmesh-registrar",
        "Wait until the agent is ready",
        "Write the registrar config (validated by the binary first)",
        "Send the mesh zone to the agent through systemd-resolved",
        "Grant the agent what forwarding in the kernel needs (unit drop-in)",
    ] {
        run.assert_skipped(step);
    }
    assert!(run.block("Restart systemd-resolved").is_none(), "{}", run.out);
    let path = |file: &str| root.path().join(file);
    assert!(!path("etc/systemd/resolved.conf.d/loopmesh.conf").exists());
    assert!(!path("etc/systemd/system/loopmesh-agent.service.d/kernel-forwarding.conf").exists());
    assert_eq!(
        std::fs::read_to_string(path("etc/loopmesh/registrar.yaml")).unwrap(),
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd/deb/registrar.yaml"))
            .unwrap(),
        "the registrar's config is the package's"
    );
    // The agent (true) is configured, with the endpoints the text lists.
    let agent = loopmesh::config::AgentConfig::load(
        Some(&path("etc/loopmesh/agent.yaml")),
        &loopmesh::config::Overrides::default(),
    )
    .unwrap();
    assert!(!agent.proxy.kernel_forwarding);
    assert_eq!(
        agent.store.etcd.expect("etcd").endpoints,
        vec!["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    );
}

/// Every boolean the argument spec declares is used through `| bool`:
/// an INI inventory gives booleans as text, which is true whatever it says
/// and which ansible-core 2.19 refuses in a conditional. Mentions in
/// comments and as `name=`/`name:` (messages, settings) are not uses.
#[test]
fn every_boolean_variable_is_used_through_the_bool_filter() {
    let role = ansible_dir().join("roles/loopmesh");
    let specs = std::fs::read_to_string(role.join("meta/argument_specs.yml")).unwrap();
    let specs: serde_json::Value = serde_saphyr::from_str(&specs).unwrap();
    let options = specs["argument_specs"]["main"]["options"].as_object().unwrap();
    let booleans: Vec<&String> = options
        .iter()
        .filter(|(_, spec)| spec["type"] == "bool")
        .map(|(name, _)| name)
        .collect();
    assert!(booleans.len() >= 5, "{booleans:?}");

    let mut files = vec![ansible_dir().join("site.yml")];
    for dir in ["tasks", "handlers", "templates", "vars"] {
        for entry in std::fs::read_dir(role.join(dir)).unwrap() {
            files.push(entry.unwrap().path());
        }
    }
    let mut uses = 0;
    let mut wrong = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (number, line) in text.lines().enumerate() {
            if line.trim_start().starts_with('#') {
                continue;
            }
            for name in &booleans {
                for (at, _) in line.match_indices(name.as_str()) {
                    let before = line[..at].chars().next_back();
                    let after = &line[at + name.len()..];
                    let whole = !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                        && !after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
                    if !whole || after.starts_with(['=', ':']) {
                        continue;
                    }
                    uses += 1;
                    if !after.trim_start().starts_with("| bool") {
                        wrong.push(format!("{}:{}: {}", file.display(), number + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(uses > 10, "only {uses} uses found: the scan is broken");
    assert!(
        wrong.is_empty(),
        "booleans used without | bool:\n{}",
        wrong.join("\n")
    );
}

/// The role carries its own copy of the kernel forwarding drop-in (a
/// package's /usr/share/doc may be left out of an image); it grants what
/// the repository's does.
#[test]
fn the_roles_kernel_forwarding_drop_in_grants_what_the_repositorys_does() {
    let settings = |path: PathBuf| -> Vec<String> {
        std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
            .lines()
            .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    let ours = settings(ansible_dir().join("roles/loopmesh/files/kernel-forwarding.conf"));
    let repository = settings(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("systemd/loopmesh-agent.service.d/kernel-forwarding.conf"),
    );
    assert!(ours.len() > 1, "{ours:?}");
    assert_eq!(ours, repository);
}
