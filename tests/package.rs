//! The Debian package as operators get it: built by systemd/deb/build-deb
//! (the README's command) from this test's own binary, then its contents
//! and control data checked, lintian run on it, and it installed into a
//! scratch root with `dpkg --root`, upgraded, removed and purged. dpkg runs
//! the maintainer scripts outside a chroot with DPKG_ROOT set, as for any
//! install into another root, so the user and directories they create are
//! real. systemd cannot run on the test machine: what the scripts ask of
//! it is checked in a mount namespace that shows /run/systemd/system, with
//! systemctl and deb-systemd-invoke replaced by scripts that record their
//! arguments.

mod common;

use common::{build_deb, ok, packaged_unit, require_tool, run, stdout};
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The package, built once for every test here (with gzip: the debug
/// binary is large). It lives in cargo's tmp dir for integration tests.
fn package() -> &'static Path {
    static PACKAGE: OnceLock<PathBuf> = OnceLock::new();
    PACKAGE.get_or_init(|| build_deb(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("package-test"), 1))
}

/// `dpkg-deb --contents`: path (without the leading `.`) to mode string
/// and owner.
fn contents(deb: &Path) -> Vec<(String, String, String)> {
    stdout(&ok(Command::new("dpkg-deb").arg("--contents").arg(deb)))
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let path = fields[5]
                .trim_start_matches('.')
                .trim_end_matches('/')
                .to_string();
            (path, fields[0].to_string(), fields[1].to_string())
        })
        .collect()
}

/// The man pages `loopmesh man` writes: one per subcommand (tests/manual.rs
/// checks that against the clap tree).
fn man_pages() -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    let (success, _, stderr) = run(&["man", "--out", dir.path().to_str().unwrap()]);
    assert!(success, "{stderr}");
    std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn the_package_holds_every_file_where_debian_expects_it() {
    let deb = package();
    let listed = contents(deb);
    let files: std::collections::BTreeMap<&str, &str> = listed
        .iter()
        .map(|(path, mode, owner)| {
            assert_eq!(owner, "root/root", "{path} is owned by root");
            (path.as_str(), mode.as_str())
        })
        .collect();
    let doc = "/usr/share/doc/loopmesh";
    let mut expected: Vec<(String, &str)> = [
        ("/usr/bin/loopmesh", "-rwxr-xr-x"),
        ("/usr/lib/systemd/system/loopmesh-agent.service", "-rw-r--r--"),
        ("/usr/lib/systemd/system/loopmesh-registrar.service", "-rw-r--r--"),
        ("/usr/lib/sysusers.d/loopmesh.conf", "-rw-r--r--"),
        ("/usr/lib/tmpfiles.d/loopmesh.conf", "-rw-r--r--"),
        ("/etc/loopmesh/agent.yaml", "-rw-r--r--"),
        ("/etc/loopmesh/registrar.yaml", "-rw-r--r--"),
        ("/etc/loopmesh/registrar.d", "drwxr-xr-x"),
        ("/usr/share/bash-completion/completions/loopmesh", "-rw-r--r--"),
        ("/usr/share/zsh/vendor-completions/_loopmesh", "-rw-r--r--"),
        ("/usr/share/fish/vendor_completions.d/loopmesh.fish", "-rw-r--r--"),
    ]
    .into_iter()
    .map(|(path, mode)| (path.to_string(), mode))
    .collect();
    for file in [
        "README.md",
        "copyright",
        "changelog.Debian.gz",
        "examples/resolved.conf.d/loopmesh.conf",
        "examples/loopmesh-agent.service.d/kernel-forwarding.conf",
        "examples/haproxy/haproxy.service.d/loopmesh.conf",
        "examples/haproxy/loopmesh-haproxy-reload.path",
        "examples/haproxy/loopmesh-haproxy-reload.service",
    ] {
        expected.push((format!("{doc}/{file}"), "-rw-r--r--"));
    }
    let pages = man_pages();
    assert!(
        pages.contains("loopmesh.1") && pages.contains("loopmesh-agent.1"),
        "{pages:?}"
    );
    for page in &pages {
        expected.push((format!("/usr/share/man/man1/{page}.gz"), "-rw-r--r--"));
    }
    for (path, mode) in &expected {
        assert_eq!(
            files.get(path.as_str()),
            Some(mode),
            "{path} with mode {mode} in the package"
        );
    }
    let packaged_pages: BTreeSet<&str> = files
        .keys()
        .filter_map(|path| path.strip_prefix("/usr/share/man/man1/"))
        .filter(|name| !name.is_empty())
        .collect();
    assert_eq!(
        packaged_pages.len(),
        pages.len(),
        "no other man page: {packaged_pages:?}"
    );

    let root = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()));
    let binary = root.path().join("usr/bin/loopmesh");
    let sections = stdout(&ok(Command::new("objdump").arg("-h").arg(&binary)));
    for section in [".symtab", ".debug_info", ".debug_line", ".comment"] {
        assert!(
            !sections.contains(&format!(" {section} ")),
            "the binary keeps {section}: stripped?"
        );
    }
    let version = stdout(&ok(Command::new(&binary).arg("--version")));
    assert_eq!(
        version,
        run(&["--version"]).1,
        "the packaged binary is this build"
    );

    // Each unit runs the packaged binary, and every page or file its
    // Documentation= names is in the package.
    for unit in ["loopmesh-agent.service", "loopmesh-registrar.service"] {
        let text = std::fs::read_to_string(root.path().join("usr/lib/systemd/system").join(unit)).unwrap();
        assert!(
            text.contains("ExecStart=/usr/bin/loopmesh ") && !text.contains("/usr/local"),
            "{unit}: {text}"
        );
        assert_eq!(text, packaged_unit(unit), "{unit} as in systemd/");
        let documentation: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("Documentation="))
            .flat_map(str::split_whitespace)
            .collect();
        assert!(
            documentation.len() >= 2,
            "{unit} documents itself: {documentation:?}"
        );
        for target in documentation {
            let path = match (target.strip_prefix("man:"), target.strip_prefix("file://")) {
                (Some(page), _) => {
                    let (name, section) = page.trim_end_matches(')').split_once('(').unwrap();
                    format!("/usr/share/man/man{section}/{name}.{section}.gz")
                }
                (_, Some(file)) => file.to_string(),
                _ => panic!("{unit}: Documentation={target} is neither man: nor file://"),
            };
            assert!(
                files.contains_key(path.as_str()),
                "{unit}: Documentation={target} is not installed"
            );
        }
    }
}

#[test]
fn the_control_data_name_the_version_dependencies_conffiles_and_scripts() {
    let deb = package();
    let field = |name: &str| stdout(&ok(Command::new("dpkg-deb").arg("--field").arg(deb).arg(name)));
    assert_eq!(field("Package").trim(), "loopmesh");
    assert_eq!(
        field("Version").trim(),
        format!("{}-1", env!("CARGO_PKG_VERSION"))
    );
    let arch = stdout(&ok(Command::new("dpkg").arg("--print-architecture")));
    assert_eq!(field("Architecture").trim(), arch.trim());
    let depends = field("Depends");
    assert!(depends.contains("libc6 (>= "), "from dpkg-shlibdeps: {depends}");
    assert!(
        depends.contains("systemd | systemd-standalone-sysusers"),
        "{depends}"
    );

    let control = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb")
        .arg("--control")
        .arg(deb)
        .arg(control.path()));
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert_eq!(
        conffiles,
        "/etc/loopmesh/agent.yaml\n/etc/loopmesh/registrar.yaml\n"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let mode = std::fs::metadata(control.path().join(script)).unwrap().mode();
        assert_eq!(mode & 0o777, 0o755, "{script} is executable");
    }
    let md5sums = std::fs::read_to_string(control.path().join("md5sums")).unwrap();
    assert!(md5sums.contains("  usr/bin/loopmesh\n"), "{md5sums}");
}

#[test]
fn lintian_reports_no_errors() {
    let lintian = require_tool("lintian", "lintian");
    let output = Command::new(lintian)
        .args(["--tag-display-limit", "0"])
        .arg(package())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    let errors: Vec<&str> = report.lines().filter(|line| line.starts_with("E: ")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    // Exit status 2 is lintian itself failing (a bad invocation, a crash).
    assert_ne!(
        output.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// dpkg on the scratch root, scripts run by the host's shell with
/// DPKG_ROOT; the root has no libc6 or systemd packages to satisfy
/// Depends, hence --force-depends.
fn dpkg(root: &Path, args: &[&str]) -> Output {
    ok(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-script-chrootless", "--force-depends", "--log=/dev/null"])
        .args(args)
        .env_remove("DPKG_ROOT"))
}

fn status(root: &Path) -> String {
    let output = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--status", "loopmesh"])
        .output()
        .unwrap();
    stdout(&output)
}

#[test]
fn it_installs_upgrades_removes_and_purges_in_a_scratch_root() {
    let deb = package();
    require_tool("systemd-sysusers", "systemd");
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    std::fs::create_dir_all(root.join("var/lib/dpkg/info")).unwrap();
    std::fs::create_dir_all(root.join("var/lib/dpkg/updates")).unwrap();
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();

    dpkg(root, &["--install", deb.to_str().unwrap()]);
    let installed = status(root);
    assert!(installed.contains("Status: install ok installed"), "{installed}");
    for conffile in ["/etc/loopmesh/agent.yaml ", "/etc/loopmesh/registrar.yaml "] {
        assert!(
            installed.contains(conffile),
            "dpkg tracks {conffile} as a conffile: {installed}"
        );
    }

    // postinst made the user (systemd-sysusers) and its directories
    // (systemd-tmpfiles), in the scratch root only.
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|line| line.starts_with("loopmesh:"))
        .unwrap_or_else(|| panic!("no loopmesh user: {passwd}"));
    let fields: Vec<&str> = user.split(':').collect();
    assert_eq!(&fields[5..], ["/var/lib/loopmesh", "/usr/sbin/nologin"], "{user}");
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system uid: {user}");
    for dir in [
        "var/lib/loopmesh",
        "var/lib/loopmesh/catalog",
        "var/lib/loopmesh/registrar",
    ] {
        let meta = std::fs::metadata(root.join(dir)).unwrap_or_else(|err| panic!("{dir}: {err}"));
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (uid, 0o755), "{dir}");
    }

    // The installed binary runs and accepts the installed configs.
    let binary = root.join("usr/bin/loopmesh");
    let state = tempfile::tempdir().unwrap();
    let agent_yaml = root.join("etc/loopmesh/agent.yaml");
    let checked = ok(Command::new(&binary)
        .arg("check")
        .arg("--config")
        .arg(&agent_yaml)
        .arg("--catalog-dir")
        .arg(root.join("var/lib/loopmesh/catalog"))
        .arg("--state-dir")
        .arg(state.path()));
    assert!(stdout(&checked).starts_with("ok: "), "{}", stdout(&checked));
    let checked = ok(Command::new(&binary)
        .args(["registrar", "--check", "--config"])
        .arg(root.join("etc/loopmesh/registrar.yaml")));
    assert!(stdout(&checked).starts_with("ok: "), "{}", stdout(&checked));

    // An upgrade (the same package again) keeps the operator's edit.
    let mut edited = std::fs::read_to_string(&agent_yaml).unwrap();
    edited.push_str("log_level: debug\n");
    std::fs::write(&agent_yaml, &edited).unwrap();
    dpkg(root, &["--install", deb.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(&agent_yaml).unwrap(),
        edited,
        "the edited conffile is kept"
    );

    // As `systemctl enable` would have linked it.
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/usr/lib/systemd/system/loopmesh-agent.service",
        wants.join("loopmesh-agent.service"),
    )
    .unwrap();

    dpkg(root, &["--remove", "loopmesh"]);
    assert!(!binary.exists(), "remove takes the binary");
    assert!(
        status(root).contains("Status: deinstall ok config-files"),
        "{}",
        status(root)
    );
    assert_eq!(
        std::fs::read_to_string(&agent_yaml).unwrap(),
        edited,
        "remove keeps conffiles"
    );

    dpkg(root, &["--purge", "loopmesh"]);
    assert!(
        !agent_yaml.exists() && !root.join("etc/loopmesh/registrar.yaml").exists(),
        "purge takes conffiles"
    );
    assert!(
        wants.join("loopmesh-agent.service").symlink_metadata().is_err(),
        "purge removes the enablement link"
    );
    assert!(
        root.join("var/lib/loopmesh/catalog").is_dir(),
        "the file catalog is the operator's"
    );
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(passwd.contains("loopmesh:"), "the system user stays");
}

/// Runs a maintainer script as dpkg would on a system booted with systemd
/// (a private /run holding systemd/system), the commands it calls recorded
/// instead of run; returns them, one line each.
fn script_calls(control: &Path, script: &str, args: &[&str]) -> Vec<String> {
    let unshare = require_tool("unshare", "util-linux");
    let dir = tempfile::tempdir().unwrap();
    let stubs = dir.path().join("bin");
    std::fs::create_dir(&stubs).unwrap();
    let calls = dir.path().join("calls");
    for tool in [
        "systemctl",
        "deb-systemd-invoke",
        "deb-systemd-helper",
        "systemd-sysusers",
        "systemd-tmpfiles",
    ] {
        let stub = stubs.join(tool);
        std::fs::write(&stub, "#!/bin/sh\necho \"$(basename \"$0\") $*\" >>\"$CALLS\"\n").unwrap();
        std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        stubs.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    ok(Command::new(unshare)
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec \"$@\"")
        .arg("sh")
        .arg(control.join(script))
        .args(args)
        .env("PATH", path)
        .env("CALLS", &calls)
        .env_remove("DPKG_ROOT"));
    std::fs::read_to_string(&calls)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_maintainer_scripts_reload_what_runs_and_start_nothing() {
    let control = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb")
        .arg("--control")
        .arg(package())
        .arg(control.path()));
    let control = control.path();
    let setup = [
        "systemd-sysusers loopmesh.conf",
        "systemd-tmpfiles --create loopmesh.conf",
        "systemctl --system daemon-reload",
    ];

    assert_eq!(
        script_calls(control, "postinst", &["configure"]),
        setup,
        "a fresh install"
    );
    let upgrade = script_calls(control, "postinst", &["configure", "0.0.9-1"]);
    let mut expected: Vec<&str> = setup.to_vec();
    expected.extend([
        "deb-systemd-invoke try-reload-or-restart loopmesh-agent.service",
        "deb-systemd-invoke try-restart loopmesh-registrar.service",
    ]);
    assert_eq!(
        upgrade, expected,
        "an upgrade reloads the agent (takeover) only if it runs"
    );

    assert!(
        script_calls(control, "prerm", &["upgrade", "0.1.1-1"]).is_empty(),
        "an upgrade stops nothing"
    );
    assert_eq!(
        script_calls(control, "prerm", &["remove"]),
        ["deb-systemd-invoke stop loopmesh-agent.service loopmesh-registrar.service"]
    );
    assert_eq!(
        script_calls(control, "postrm", &["remove"]),
        ["systemctl --system daemon-reload"]
    );
    assert!(script_calls(control, "postinst", &["abort-upgrade", "0.1.0-1"]).is_empty());
}

/// The config with every `#key: value` line uncommented (prose comments,
/// `# Text`, stay): the settings and examples the shipped file shows.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| {
            let prose = line == "#" || (line.starts_with("# ") && !line[2..].starts_with(' '));
            match line.strip_prefix('#') {
                Some(setting) if !prose => setting,
                _ => line,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_default_configs_load_and_every_setting_they_show_is_valid() {
    use loopmesh::config::{AgentConfig, Overrides};
    use loopmesh::registrar::config::RegistrarConfig;
    let dir = tempfile::tempdir().unwrap();
    let overrides = Overrides::default();
    let agent = repo().join("systemd/deb/agent.yaml");
    let shipped = AgentConfig::load(Some(&agent), &overrides).unwrap();
    assert_eq!(
        shipped,
        AgentConfig::load(None, &overrides).unwrap(),
        "every setting commented out"
    );
    let text = uncommented(&std::fs::read_to_string(&agent).unwrap());
    assert!(text.contains("\nstore:\n  prefix: /loopmesh\n"), "{text}");
    let path = dir.path().join("agent.yaml");
    std::fs::write(&path, &text).unwrap();
    let all = AgentConfig::load(Some(&path), &overrides).unwrap_or_else(|err| panic!("{err}\n{text}"));
    assert_eq!(all.templates.len(), 1, "the HAProxy example");
    assert!(all.store.etcd.is_some(), "the etcd example");
    assert_eq!(
        (all.dns, all.admin),
        (shipped.dns, shipped.admin),
        "shown at their defaults"
    );

    let registrar = repo().join("systemd/deb/registrar.yaml");
    let shipped = RegistrarConfig::load(&registrar, &overrides).unwrap();
    assert_eq!(
        shipped.services_dir.as_deref(),
        Some(Path::new("/etc/loopmesh/registrar.d"))
    );
    assert_eq!(shipped.store, loopmesh::config::StoreConfig::default());
    let text = uncommented(&std::fs::read_to_string(&registrar).unwrap());
    let path = dir.path().join("registrar.yaml");
    std::fs::write(&path, &text).unwrap();
    let all = RegistrarConfig::load(&path, &overrides).unwrap_or_else(|err| panic!("{err}\n{text}"));
    assert_eq!(all.services.len(), 1, "the inline example");
    assert_eq!(
        (all.lease_ttl, all.drain_period),
        (shipped.lease_ttl, shipped.drain_period)
    );
}
