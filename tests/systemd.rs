//! The shipped systemd units: `systemd-analyze verify` accepts them (and
//! rejects a broken copy), they carry the hardening they promise, and the
//! binary speaks the notify protocol they rely on (READY=1, WATCHDOG=1,
//! STOPPING=1) to a real notify socket.

mod common;

use common::Loopmesh;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const UNITS: [&str; 2] = ["loopmesh-agent.service", "loopmesh-registrar.service"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Copies the units into `dir` with ExecStart pointing at the built binary
/// (verify insists the executable exists).
fn copy_units(dir: &Path) -> Vec<PathBuf> {
    UNITS
        .iter()
        .map(|unit| {
            let text = std::fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
            let path = dir.join(unit);
            std::fs::write(
                &path,
                text.replace("/usr/local/bin/loopmesh", env!("CARGO_BIN_EXE_loopmesh")),
            )
            .unwrap();
            path
        })
        .collect()
}

/// The kernel forwarding drop-in, beside its unit in `dir` as systemd reads it.
fn copy_dropin(dir: &Path) {
    let dropins = dir.join("loopmesh-agent.service.d");
    std::fs::create_dir_all(&dropins).unwrap();
    std::fs::copy(
        repo().join("systemd/loopmesh-agent.service.d/kernel-forwarding.conf"),
        dropins.join("kernel-forwarding.conf"),
    )
    .unwrap();
}

fn verify(units: &[PathBuf]) -> (bool, String) {
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units)
        .output()
        .expect("systemd-analyze runs (apt-get install systemd)");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success() && stderr.trim().is_empty(), stderr)
}

#[test]
fn systemd_analyze_verify_accepts_the_units_and_rejects_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let units = copy_units(dir.path());
    copy_dropin(dir.path());
    let (ok, complaints) = verify(&units);
    assert!(ok, "systemd-analyze verify: {complaints}");

    // The HAProxy recipe's reload pair (README, "Recipes").
    let haproxy: Vec<PathBuf> = ["loopmesh-haproxy-reload.path", "loopmesh-haproxy-reload.service"]
        .iter()
        .map(|unit| repo().join("systemd/haproxy").join(unit))
        .collect();
    let (ok, complaints) = verify(&haproxy);
    assert!(ok, "systemd-analyze verify on the HAProxy recipe: {complaints}");

    let broken = dir.path().join("loopmesh-broken.service");
    let text = std::fs::read_to_string(&units[0])
        .unwrap()
        .replace("Type=notify", "Type=notifyy");
    std::fs::write(&broken, text).unwrap();
    let (ok, complaints) = verify(&[broken]);
    assert!(!ok, "a unit with Type=notifyy passed verify");
    assert!(complaints.contains("notifyy"), "{complaints}");
}

#[test]
fn the_units_carry_the_promised_hardening() {
    for unit in UNITS {
        let text = std::fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
        for line in [
            "Type=notify",
            "Restart=on-failure",
            "WatchdogSec=",
            "User=loopmesh",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "StateDirectory=loopmesh",
            "ConfigurationDirectory=loopmesh",
            "PrivateMounts=yes",
            "RemoveIPC=yes",
            "SystemCallFilter=@system-service\n",
            "SystemCallFilter=~@privileged @resources\n",
            "SystemCallErrorNumber=EPERM",
        ] {
            let found = match line.strip_suffix('\n') {
                Some(whole) => text.lines().any(|l| l == whole),
                None => text.lines().any(|l| l.starts_with(line)),
            };
            assert!(found, "{unit} lacks {line}");
        }
    }
    let agent = std::fs::read_to_string(repo().join("systemd/loopmesh-agent.service")).unwrap();
    assert!(
        agent.contains("\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n"),
        "DNS on port 53 and nothing else"
    );
    let dropin =
        std::fs::read_to_string(repo().join("systemd/loopmesh-agent.service.d/kernel-forwarding.conf"))
            .unwrap();
    for line in [
        "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN",
        "SystemCallFilter=bpf",
    ] {
        assert!(
            dropin.lines().any(|l| l == line),
            "the kernel forwarding drop-in lacks {line}"
        );
    }
    let registrar = std::fs::read_to_string(repo().join("systemd/loopmesh-registrar.service")).unwrap();
    assert!(
        registrar.contains("\nCapabilityBoundingSet=\n"),
        "the registrar needs no capability"
    );
    for line in ["ProtectProc=invisible", "ProcSubset=pid"] {
        assert!(registrar.lines().any(|l| l == line), "the registrar lacks {line}");
    }
    // On the file catalog the registrar writes its instances there.
    let catalog = loopmesh::config::StoreConfig::default().catalog_dir;
    let writable = format!("ReadWritePaths=-{}", catalog.display());
    assert!(
        registrar.lines().any(|l| l == writable),
        "the registrar lacks {writable}"
    );
    assert!(
        !registrar.contains("SystemCallFilter=@chown"),
        "only the agent chowns (template resources)"
    );
    let resolved = std::fs::read_to_string(repo().join("systemd/resolved.conf.d/loopmesh.conf")).unwrap();
    let defaults = loopmesh::config::DnsConfig::default();
    assert!(
        resolved.contains(&format!("DNS={}\n", defaults.listen.ip())),
        "the drop-in points at the default DNS address"
    );
    assert!(resolved.contains(&format!("Domains=~{}\n", defaults.zone.trim_end_matches('.'))));
}

/// The overall exposure `systemd-analyze security --offline=yes` gives a
/// unit file (0 to 10, lower is better).
fn exposure(unit: &Path) -> f64 {
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit)
        .current_dir(unit.parent().unwrap())
        .output()
        .expect("systemd-analyze runs (apt-get install systemd)");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|line| line.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure for {}: {text}", unit.display()));
    let figure = line
        .rsplit(':')
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    figure.parse().unwrap_or_else(|_| panic!("{line}"))
}

#[test]
fn the_units_are_no_more_exposed_than_the_readme_records() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for unit in copy_units(dir.path()) {
        let name = unit.file_name().unwrap().to_string_lossy().into_owned();
        let needle = format!("| `{name}` | ");
        let recorded: f64 = readme
            .lines()
            .filter_map(|line| line.strip_prefix(&needle))
            .find_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("README records no exposure for {name} (a line starting {needle:?})"));
        let measured = exposure(&unit);
        assert!(
            measured <= recorded,
            "{name}: systemd-analyze security says {measured}, the README {recorded}"
        );
    }
}

/// Receives notify messages until one contains `wanted`.
fn wait_message(socket: &UnixDatagram, wanted: &str) -> String {
    let mut buf = [0u8; 512];
    loop {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|err| panic!("no {wanted} from the agent: {err}"));
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        if message.contains(wanted) {
            return message;
        }
    }
}

#[test]
fn the_agent_tells_systemd_it_is_ready_pings_the_watchdog_and_says_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(common::PATIENCE)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("routes")).unwrap();
    let watchdog = Duration::from_millis(200).as_micros().to_string();
    let agent = Loopmesh::spawn_with_env(
        &["agent", "--static", "--state-dir", state.to_str().unwrap()],
        dir.path(),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", &watchdog),
        ],
    );

    wait_message(&socket, "READY=1");
    wait_message(&socket, "WATCHDOG=1");

    // A reload: the old process names the new main pid, then the new one
    // is ready and pings the watchdog itself (WATCHDOG_PID is not passed on).
    let successor = common::reload(&["--state-dir", state.to_str().unwrap()]).expect("the reload");
    let _successor = common::Adopted(successor);
    wait_message(&socket, &format!("MAINPID={successor}"));
    wait_message(&socket, "READY=1");
    wait_message(&socket, "WATCHDOG=1");
    agent.wait_log("agent handed over");

    // A stop asks for the drain's time (30 s + 10 s).
    // SAFETY: kill(2) on a process this test caused to exist.
    unsafe { libc::kill(successor as i32, libc::SIGTERM) };
    wait_message(&socket, "STOPPING=1\nEXTEND_TIMEOUT_USEC=40000000");
    agent.stop();
}
