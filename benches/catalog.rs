//! Catalog → rendered files: propagation latency, full renders, the cost of
//! one change at scale, memory — beside etcd's own put→watch latency and
//! HAProxy holding the same table, measured in the same run.
//!
//! Run: `cargo bench --bench catalog` (add `LOOPMESH_BENCH_PIN=1` to pin
//! etcd and this driver to cpu0 and the agent to cpu1; `LOOPMESH_BENCH_WRITES`
//! sets the number of timed writes, default 500; `LOOPMESH_BENCH_QUICK=1`
//! skips the 10k/100k scenarios). Results are printed as Markdown rows for
//! BENCHMARKS.md.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{Etcd, Loopmesh};
use etcd_client::{Client, Txn, TxnOp, WatchOptions};
use loopmesh::catalog::Catalog;
use loopmesh::config::AgentConfig;
use loopmesh::render::{Dirty, Renderer};
use notify::Watcher;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PREFIX: &str = "/bench";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pinned() -> bool {
    std::env::var_os("LOOPMESH_BENCH_PIN").is_some()
}

/// Pins a running process (all its threads) to one CPU.
fn pin(pid: u32, cpu: u32) {
    let status = Command::new("taskset")
        .args(["-a", "-cp", &cpu.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("taskset (util-linux)");
    assert!(status.success(), "taskset failed for pid {pid}");
}

/// Median, p99 and max of samples, in milliseconds.
fn summary(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0;
    (at(0.5), at(0.99), at(1.0))
}

/// Resident and proportional memory of a process, in MiB.
fn memory_mib(pid: u32) -> (f64, f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    (
        field(&status, "VmRSS:"),
        field(&status, "VmHWM:"),
        field(&rollup, "Pss:"),
    )
}

/// One port for every service (each has its own address), picked free so a
/// wildcard listener elsewhere on the machine cannot collide with HAProxy's binds.
fn service_port() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(|| {
        std::net::TcpListener::bind("0.0.0.0:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    })
}

fn service_value(_i: usize) -> String {
    format!("{{port: {}, balance: round_robin}}", service_port())
}

fn instance_value(service: usize, instance: usize, marker: usize) -> String {
    format!(
        "{{host: 10.{}.{}.{}, port: {}, zone: z{}, weight: 1}}",
        service % 250,
        (service / 250) % 250,
        instance + 1,
        20000 + marker % 40000,
        instance % 3
    )
}

/// The address a service gets in the benchmark catalog (pre-allocated, as in
/// a running fleet where addresses already exist).
fn address_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        100 + (i / 65025) as u8,
        ((i / 255) % 255) as u8,
        (i % 255) as u8 + 1,
    )
}

/// Every key of a catalog with `services` × `instances`.
fn catalog_entries(services: usize, instances: usize, with_addresses: bool) -> Vec<(String, String)> {
    let mut entries = Vec::with_capacity(services * (instances + 2));
    for s in 0..services {
        entries.push((format!("services/s{s}"), service_value(s)));
        if with_addresses {
            entries.push((format!("addresses/s{s}"), address_of(s).to_string()));
        }
        for i in 0..instances {
            entries.push((format!("instances/s{s}/i{i}"), instance_value(s, i, 0)));
        }
    }
    entries
}

/// Deletes every address key of the benchmark catalog.
async fn delete_addresses(client: &mut Client) {
    let all = etcd_client::DeleteOptions::new().with_prefix();
    client
        .delete(format!("{PREFIX}/addresses/"), Some(all))
        .await
        .unwrap();
}

/// Writes entries to etcd as JSON values, as the registrar and `service put` do.
async fn load(client: &mut Client, entries: &[(String, String)]) -> i64 {
    let mut revision = 0;
    for chunk in entries.chunks(128) {
        let ops: Vec<_> = chunk
            .iter()
            .map(|(k, v)| TxnOp::put(format!("{PREFIX}/{k}"), to_json(v), None))
            .collect();
        let response = client.txn(Txn::new().and_then(ops)).await.unwrap();
        revision = response.header().unwrap().revision();
    }
    revision
}

/// An agent process on a fresh state directory.
struct Agent {
    dir: tempfile::TempDir,
    process: Loopmesh,
    spawned: Instant,
}

/// Writes a loopmesh config reading the benchmark's etcd, plus `extra` YAML.
fn write_config(dir: &Path, endpoint: &str, extra: &str) -> PathBuf {
    let config = dir.join("loopmesh.yaml");
    let store = format!("store: {{prefix: {PREFIX}, etcd: {{endpoints: [{endpoint}]}}}}\n");
    std::fs::write(&config, format!("node: bench\n{store}{extra}")).unwrap();
    config
}

impl Agent {
    fn start(endpoint: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        // The render pipeline alone: the data plane has its own benchmark (l4.py).
        let config = write_config(
            dir.path(),
            endpoint,
            "state_dir: state\nproxy: {enabled: false}\n",
        );
        let spawned = Instant::now();
        let process = Loopmesh::spawn(&["agent", "--config", config.to_str().unwrap()], dir.path());
        if pinned() {
            pin(process.pid(), 1);
        }
        Agent {
            dir,
            process,
            spawned,
        }
    }

    fn routes(&self) -> PathBuf {
        self.dir.path().join("state/routes")
    }

    /// Waits for the render of `revision` or later; returns (wall time since
    /// spawn, the render pass's own time in ms).
    fn wait_rendered(&self, revision: i64) -> (Duration, f64) {
        common::eventually("the agent to render the loaded catalog", || {
            let log = self.process.log_text();
            log.lines().find_map(|line| {
                let rest = line.split("rendered revision ").nth(1)?;
                let (rev, rest) = rest.split_once(':')?;
                if rev.parse::<i64>().ok()? < revision {
                    return None;
                }
                let ms = rest
                    .split(" in ")
                    .nth(1)?
                    .trim_end_matches(" ms")
                    .parse::<f64>()
                    .ok()?;
                Some((self.spawned.elapsed(), ms))
            })
        })
    }
}

/// Watches a directory with inotify and waits until `path` holds `needle`.
struct FileWaiter {
    _watcher: notify::RecommendedWatcher,
    events: mpsc::Receiver<()>,
}

impl FileWaiter {
    fn new(dir: &Path) -> FileWaiter {
        let (tx, events) = mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |_| {
            let _ = tx.send(());
        })
        .unwrap();
        watcher.watch(dir, notify::RecursiveMode::NonRecursive).unwrap();
        FileWaiter {
            _watcher: watcher,
            events,
        }
    }

    fn wait_for(&self, path: &Path, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::fs::read_to_string(path).is_ok_and(|text| text.contains(needle)) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{} never held {needle:?}", path.display());
            let _ = self.events.recv_timeout(left);
            while self.events.try_recv().is_ok() {}
        }
    }
}

/// etcd write → agent's rendered file, interleaved with etcd put → watch event.
async fn propagation(
    etcd: &Etcd,
    agent: &Agent,
    services: usize,
    writes: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let mut client = etcd.client().await;
    let mut peer_client = etcd.client().await;
    let mut peer_stream = peer_client
        .watch("/peer/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let waiter = FileWaiter::new(&agent.routes());
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for n in 1..=writes {
        // Peer: etcd's own put → watch event.
        let started = Instant::now();
        client.put("/peer/k", n.to_string(), None).await.unwrap();
        loop {
            let message = peer_stream.message().await.unwrap().unwrap();
            if message
                .events()
                .iter()
                .any(|e| e.kv().is_some_and(|kv| kv.value() == n.to_string().as_bytes()))
            {
                break;
            }
        }
        peer.push(started.elapsed());

        // loopmesh: the same kind of write → the route file on disk.
        let service = n % services;
        let marker = 100_000 + n;
        let needle = format!("\"port\": {},", 20000 + marker % 40000);
        let started = Instant::now();
        client
            .put(
                format!("{PREFIX}/instances/s{service}/i0"),
                instance_value(service, 0, marker),
                None,
            )
            .await
            .unwrap();
        waiter.wait_for(&agent.routes().join(format!("s{service}.json")), &needle);
        ours.push(started.elapsed());
    }
    (ours, peer)
}

thread_local! {
    static JSON_BUILD: std::cell::Cell<Duration> = const { std::cell::Cell::new(Duration::ZERO) };
}

/// The same value as JSON (what the registrar writes): quote the flow map's keys
/// and string values.
fn to_json(flow: &str) -> String {
    if !flow.starts_with('{') {
        return flow.to_string();
    }
    let body = flow.trim_start_matches('{').trim_end_matches('}');
    let fields: Vec<String> = body
        .split(", ")
        .map(|pair| {
            let (key, value) = pair.split_once(": ").unwrap();
            let value = if value.parse::<f64>().is_ok() {
                value.to_string()
            } else {
                format!("\"{value}\"")
            };
            format!("\"{key}\": {value}")
        })
        .collect();
    format!("{{{}}}", fields.join(", "))
}

/// In-process render costs: cold full render, warm full render, one change.
fn render_costs(
    services: usize,
    instances: usize,
    base: &Path,
) -> (Duration, Duration, Duration, Vec<Duration>) {
    let dir = tempfile::tempdir_in(base).unwrap();
    let text = format!("node: bench\nstate_dir: {}\n", dir.path().display());
    let config: AgentConfig = loopmesh::yaml::from_str(&text).unwrap();
    let mut renderer = Renderer::new(&config, Ipv4Addr::new(127, 0, 0, 153)).unwrap();
    let entries = catalog_entries(services, instances, true);
    let started = Instant::now();
    let mut catalog = Catalog::default();
    catalog.replace(entries.iter().map(|(k, v)| (k.as_str(), v.as_bytes(), 1)));
    let build = started.elapsed();
    let as_json: Vec<(String, String)> = entries.iter().map(|(k, v)| (k.clone(), to_json(v))).collect();
    let started = Instant::now();
    let mut from_json = Catalog::default();
    from_json.replace(as_json.iter().map(|(k, v)| (k.as_str(), v.as_bytes(), 1)));
    JSON_BUILD.with(|cell| cell.set(started.elapsed()));
    assert_eq!(from_json.entries().len(), catalog.entries().len());
    let started = Instant::now();
    let report = renderer.render(&catalog, &Dirty::everything());
    let cold = started.elapsed();
    assert!(report.failures.is_empty());
    let started = Instant::now();
    renderer.render(&catalog, &Dirty::everything());
    let warm = started.elapsed();
    let mut one = Vec::new();
    for n in 0..200 {
        let service = (n * 7919) % services;
        let started = Instant::now();
        let mut dirty = Dirty::default();
        let key = format!("instances/s{service}/i1");
        dirty.touch(catalog.put(&key, instance_value(service, 1, n + 1).as_bytes(), 1));
        let report = renderer.render(&catalog, &dirty);
        one.push(started.elapsed());
        assert_eq!(report.written.len(), 1);
    }
    (build, cold, warm, one)
}

/// The filesystem's own floor: create and rename `files` small files, the
/// minimum any atomic per-file writer pays.
fn create_rename_floor(files: usize, base: &Path) -> Duration {
    let dir = tempfile::tempdir_in(base).unwrap();
    let body = vec![b'x'; 400];
    let started = Instant::now();
    for i in 0..files {
        let staged = dir.path().join(format!(".s{i}.tmp"));
        std::fs::write(&staged, &body).unwrap();
        std::fs::rename(&staged, dir.path().join(format!("s{i}.yaml"))).unwrap();
    }
    started.elapsed()
}

/// HAProxy loading the same table: time until its last frontend accepts, and RSS.
fn haproxy_peer(endpoint: &str, services: usize) -> Option<(Duration, (f64, f64, f64))> {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        endpoint,
        "state_dir: out\ntemplates: [{src: haproxy.cfg.tera, dest: haproxy.cfg}]\n",
    );
    let (ok, _, stderr) = common::run(&["render", "--once", "--config", config.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let cfg_path = dir.path().join("out/haproxy.cfg");
    // 10k listeners and the open-file limit here (20000) leave room for few connections.
    let cfg = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("maxconn 20000", "maxconn 2000\n    nbthread 1");
    std::fs::write(&cfg_path, cfg).unwrap();
    let started = Instant::now();
    let mut child = Command::new("haproxy")
        .args(["-db", "-q", "-f"])
        .arg(&cfg_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    if pinned() {
        pin(child.id(), 1);
    }
    let last = address_of(services - 1);
    common::eventually("haproxy to accept on its last frontend", || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "haproxy exited with {status}; run it by hand on {}",
                cfg_path.display()
            );
        }
        std::net::TcpStream::connect_timeout(&(last, service_port()).into(), Duration::from_millis(50)).ok()
    });
    let serving = started.elapsed();
    let memory = memory_mib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    Some((serving, memory))
}

async fn scale(services: usize, instances: usize, writes: usize) {
    println!(
        "\n### {services} services × {instances} instances ({} keys)\n",
        services * (instances + 2)
    );
    let disk = std::env::temp_dir();
    let (build, cold, warm, mut one) = render_costs(services, instances, &disk);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "| in-process catalog build, values as YAML flow maps | {:.0} ms |",
        ms(build)
    );
    println!(
        "| in-process catalog build, values as JSON (as the registrar writes) | {:.0} ms |",
        ms(JSON_BUILD.with(|cell| cell.get()))
    );
    let (p50, p99, max) = summary(&mut one);
    println!(
        "| in-process full render, cold (empty state dir on {}) | {:.0} ms |",
        disk.display(),
        ms(cold)
    );
    println!(
        "| filesystem floor (peer): create + rename {} files on {} | {:.0} ms |",
        services + 1,
        disk.display(),
        ms(create_rename_floor(services + 1, &disk))
    );
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let (_, cold_shm, _, _) = render_costs(services, instances, shm);
        println!(
            "| in-process full render, cold, state dir on tmpfs (/dev/shm) | {:.0} ms |",
            ms(cold_shm)
        );
        println!(
            "| filesystem floor (peer): create + rename {} files on tmpfs | {:.0} ms |",
            services + 1,
            ms(create_rename_floor(services + 1, shm))
        );
    }
    println!(
        "| in-process full render, warm (all unchanged) | {:.0} ms |",
        ms(warm)
    );
    println!("| in-process one instance change → file | p50 {p50:.3} ms, p99 {p99:.3} ms, max {max:.3} ms |");
    if std::env::var_os("LOOPMESH_BENCH_RENDER_ONLY").is_some() {
        return;
    }

    let etcd = Etcd::start();
    if pinned() {
        pin(etcd.pid().unwrap(), 0);
    }
    let mut client = etcd.client().await;
    let revision = load(&mut client, &catalog_entries(services, instances, true)).await;
    let agent = Agent::start(&etcd.endpoint());
    let (to_rendered, render_ms) = agent.wait_rendered(revision);
    let idle = memory_mib(agent.process.pid());
    println!(
        "| agent cold start → snapshot → every file rendered | {:.0} ms (render pass {render_ms:.0} ms) |",
        to_rendered.as_secs_f64() * 1000.0
    );
    let (mut ours, mut peer) = propagation(&etcd, &agent, services, writes).await;
    let loaded = memory_mib(agent.process.pid());
    let (o50, o99, omax) = summary(&mut ours);
    let (p50, p99, pmax) = summary(&mut peer);
    println!(
        "| etcd put → watch event (peer, same run) | p50 {p50:.2} ms, p99 {p99:.2} ms, max {pmax:.2} ms |"
    );
    println!(
        "| etcd write → route file on disk, {writes} writes | p50 {o50:.2} ms, p99 {o99:.2} ms, max {omax:.2} ms |"
    );
    println!(
        "| agent memory after sync: RSS / peak RSS / PSS | {:.1} / {:.1} / {:.1} MiB |",
        idle.0, idle.1, idle.2
    );
    println!(
        "| agent memory after the writes: RSS / peak RSS / PSS | {:.1} / {:.1} / {:.1} MiB |",
        loaded.0, loaded.1, loaded.2
    );
    drop(agent);

    // First allocation of every address (a bulk import), from the same store.
    delete_addresses(&mut client).await;
    let agent = Agent::start(&etcd.endpoint());
    let expected = services;
    common::eventually("every service to be addressed and rendered", || {
        let log = agent.process.log_text();
        (log.contains("rendered revision") && std::fs::read_dir(agent.routes()).ok()?.count() == expected)
            .then_some(())
    });
    println!(
        "| agent cold start with no addresses: allocate {services} addresses, render all | {:.0} ms |",
        agent.spawned.elapsed().as_secs_f64() * 1000.0
    );
    drop(agent);

    if services >= 1000 {
        // Restore the pinned addresses HAProxy's check uses.
        delete_addresses(&mut client).await;
        let addresses: Vec<_> = (0..services)
            .map(|s| (format!("addresses/s{s}"), address_of(s).to_string()))
            .collect();
        load(&mut client, &addresses).await;
        match haproxy_peer(&etcd.endpoint(), services) {
            Some((serving, memory)) => println!(
                "| HAProxy 2.6 (peer) loading the same table: start → last frontend accepts; RSS / peak / PSS | {:.0} ms; {:.1} / {:.1} / {:.1} MiB |",
                serving.as_secs_f64() * 1000.0,
                memory.0,
                memory.1,
                memory.2
            ),
            None => println!("| HAProxy (peer) | not installed |"),
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else is parsed.
    let writes = env_usize("LOOPMESH_BENCH_WRITES", 500);
    let quick = std::env::var_os("LOOPMESH_BENCH_QUICK").is_some();
    if pinned() {
        // SAFETY: sched_setaffinity on this process with a valid cpu set.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    println!(
        "loopmesh catalog benchmark: {} CPUs, pinning: {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        if pinned() {
            "etcd + driver on cpu0, agent (and HAProxy) on cpu1"
        } else {
            "none"
        }
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let only_large = std::env::var_os("LOOPMESH_BENCH_LARGE_ONLY").is_some();
        if !only_large {
            scale(100, 10, writes).await;
        }
        if !quick {
            if !only_large {
                scale(1_000, 10, writes / 5).await;
            }
            scale(10_000, 10, writes / 5).await;
        }
    });
}
