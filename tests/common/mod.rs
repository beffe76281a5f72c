//! Test harness: a real etcd on a loopback address of its own, the real
//! loopmesh binary, and waiting on conditions instead of sleeping.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long any awaited condition may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A loopback address no other test uses: 127.200-254.x.y, probed free.
pub fn unique_ip() -> Ipv4Addr {
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let seed = std::process::id()
            .wrapping_mul(2_654_435_761)
            .wrapping_add(n.wrapping_mul(40_503));
        let ip = Ipv4Addr::new(
            127,
            200 + (seed % 55) as u8,
            (seed >> 8) as u8,
            1 + (seed >> 16) as u8 % 254,
        );
        // Free if we can bind the ports etcd will use.
        if TcpListener::bind((ip, 2379)).is_ok() && TcpListener::bind((ip, 2380)).is_ok() {
            return ip;
        }
    }
}

/// Polls `check` every 5 ms until it returns `Some`, failing after PATIENCE.
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Async form of [`eventually`].
pub async fn eventually_async<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Certificates for an etcd serving client TLS, made with openssl.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// A CA, a server certificate for `ip`, and a client certificate.
    pub fn generate(dir: &Path, ip: Ipv4Addr) -> TlsFiles {
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=loopmesh-test-ca",
                ],
            ]
            .concat(),
        );
        for (name, ext) in [
            (
                "server",
                format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth,clientAuth\n"),
            ),
            ("client", "extendedKeyUsage=clientAuth\n".to_string()),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            let (key, csr, pem, extfile) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            openssl(
                &[
                    &["req"][..],
                    &ec,
                    &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={name}")],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "1",
                "-extfile",
                &extfile,
            ]);
        }
        TlsFiles {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }

    pub fn client_options(&self) -> etcd_client::ConnectOptions {
        let read = |p: &PathBuf| std::fs::read(p).unwrap();
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)))
            .identity(etcd_client::Identity::from_pem(
                read(&self.client_cert),
                read(&self.client_key),
            ));
        etcd_client::ConnectOptions::new().with_tls(tls)
    }
}

/// A single-member etcd cluster owned by one test.
pub struct Etcd {
    pub ip: Ipv4Addr,
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub tls: Option<TlsFiles>,
}

impl Etcd {
    pub fn start() -> Etcd {
        let mut etcd = Etcd {
            ip: unique_ip(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            tls: None,
        };
        etcd.launch();
        etcd
    }

    /// An etcd on `ip` (an address of this namespace other nodes can reach).
    pub fn start_on(ip: Ipv4Addr) -> Etcd {
        let mut etcd = Etcd {
            ip,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            tls: None,
        };
        etcd.launch();
        etcd
    }

    /// An etcd that serves clients over TLS and requires client certificates.
    pub fn start_tls() -> Etcd {
        let ip = unique_ip();
        let dir = tempfile::tempdir().unwrap();
        let tls = TlsFiles::generate(dir.path(), ip);
        let mut etcd = Etcd {
            ip,
            dir,
            child: None,
            tls: Some(tls),
        };
        etcd.launch();
        etcd
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:2379", self.ip)
    }

    fn connect_options(&self) -> Option<etcd_client::ConnectOptions> {
        self.tls.as_ref().map(TlsFiles::client_options)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 2379))
    }

    fn launch(&mut self) {
        let peer = format!("http://{}:2380", self.ip);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).unwrap();
        let mut command = Command::new("etcd");
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", "t"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.endpoint()])
            .args(["--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd binary (Debian package etcd-server) must be installed");
        self.child = Some(child);
        let endpoint = self.endpoint();
        let options = self.connect_options();
        // Its own thread and runtime, so callers may be sync or async.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(eventually_async("etcd to answer", || {
                let endpoint = endpoint.clone();
                let options = options.clone();
                async move {
                    let mut client = etcd_client::Client::connect([endpoint], options).await.ok()?;
                    client.get("probe", None).await.ok().map(drop)
                }
            }));
        })
        .join()
        .expect("etcd did not start");
    }

    /// Stops etcd (SIGKILL) keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same address and data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// The etcd process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], self.connect_options())
            .await
            .unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The loopmesh binary running as a child, with its stderr in a file.
pub struct Loopmesh {
    child: Child,
    pub log: PathBuf,
    /// Where an agent answers DNS: a loopback address of its own unless the
    /// arguments name one.
    pub dns: Option<SocketAddr>,
    /// Where an agent or registrar serves its admin API (likewise its own).
    pub admin: Option<SocketAddr>,
}

/// Waits until an admin API's `/metrics` holds every one of `lines`, and
/// gives the text it read last.
pub async fn eventually_metrics(admin: SocketAddr, what: &str, lines: &[&str]) -> String {
    eventually_async(what, || async {
        let (_, text) = http_get(admin, "/metrics").await?;
        lines.iter().all(|line| text.contains(line)).then_some(text)
    })
    .await
}

/// A plain HTTP/1.1 GET: the status code and body, if the server answered.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let (status, _, body) = http_request(addr, "GET", path, &[], "").await?;
    Some((status, body))
}

/// A plain HTTP/1.1 request with extra headers and a body: the status
/// code, the response head (status line and headers) and the body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((status, head.to_string(), body.to_string()))
}

/// A UDP port free on a fresh loopback address (so TCP is free there too).
pub fn dns_addr() -> SocketAddr {
    std::net::UdpSocket::bind((unique_ip(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

impl Loopmesh {
    pub fn spawn(args: &[&str], log_dir: &Path) -> Loopmesh {
        Loopmesh::spawn_with_env(args, log_dir, &[])
    }

    /// [`Loopmesh::spawn`] with extra environment variables.
    pub fn spawn_with_env(args: &[&str], log_dir: &Path, env: &[(&str, &str)]) -> Loopmesh {
        Loopmesh::spawn_wrapped(&[], args, log_dir, env)
    }

    /// Runs the binary through `wrapper` (a command that execs it, such as
    /// setpriv with its options), so the process is still the binary.
    pub fn spawn_wrapped(wrapper: &[&str], args: &[&str], log_dir: &Path, env: &[(&str, &str)]) -> Loopmesh {
        let log = log_dir.join(format!("loopmesh-{}.log", NEXT.fetch_add(1, Ordering::Relaxed)));
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut dns = None;
        let mut admin = None;
        if args.first().is_some_and(|a| a == "agent" || a == "registrar") {
            match args.iter().position(|a| a == "--admin-listen") {
                Some(at) => admin = args.get(at + 1).and_then(|a| a.parse().ok()),
                None => {
                    let addr = std::net::TcpListener::bind((unique_ip(), 0))
                        .unwrap()
                        .local_addr()
                        .unwrap();
                    args.extend(["--admin-listen".to_string(), addr.to_string()]);
                    admin = Some(addr);
                }
            }
        }
        if args.first().is_some_and(|a| a == "agent") {
            match args.iter().position(|a| a == "--dns-listen") {
                Some(at) => dns = args.get(at + 1).and_then(|a| a.parse().ok()),
                None => {
                    let addr = dns_addr();
                    args.extend(["--dns-listen".to_string(), addr.to_string()]);
                    dns = Some(addr);
                }
            }
        }
        let binary = env!("CARGO_BIN_EXE_loopmesh");
        let mut command = match wrapper.split_first() {
            Some((program, options)) => {
                let mut command = Command::new(program);
                command.args(options).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let child = command
            .args(&args)
            .env("RUST_LOG", "info,hickory_server=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Loopmesh {
            child,
            log,
            dns,
            admin,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the process ended, if it has.
    #[allow(dead_code)]
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str) {
        eventually(
            &format!("log line containing {needle:?} in {}", self.log.display()),
            || self.log_text().contains(needle).then_some(()),
        );
    }

    /// Sends SIGTERM and waits for a clean exit: status 0 and no thread
    /// panicked on the way (a panic off the main thread leaves the exit
    /// status alone, so the log is the only witness).
    pub fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        let log = self.log_text();
        assert!(status.success(), "loopmesh exited with {status}: {log}");
        assert!(!log.contains("panicked"), "a loopmesh thread panicked: {log}");
    }
}

impl Drop for Loopmesh {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process this test did not start itself (an agent's successor, which
/// the agent starts): stopped with SIGTERM when dropped, and waited for
/// until it is gone (or a zombie of a parent that exited).
#[allow(dead_code)]
pub struct Adopted(pub u32);

impl Drop for Adopted {
    fn drop(&mut self) {
        let stat = format!("/proc/{}/stat", self.0);
        // SAFETY: kill(2) on a process this test caused to exist.
        unsafe { libc::kill(self.0 as i32, libc::SIGTERM) };
        let gone = || {
            std::fs::read_to_string(&stat)
                .map(|text| {
                    text.rsplit(')')
                        .next()
                        .is_some_and(|rest| rest.trim_start().starts_with('Z'))
                })
                .unwrap_or(true)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !gone() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A TCP forwarder that can cut every connection, to simulate a partition
/// between the agent and etcd without touching either.
pub struct Cutter {
    pub addr: SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    streams: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Cutter {
    pub fn start(upstream: SocketAddr) -> Cutter {
        let listener = TcpListener::bind((unique_ip(), 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let streams = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (cut2, streams2) = (cut.clone(), streams.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if cut2.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let mut list = streams2.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Cutter { addr, cut, streams }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Breaks every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Reads a file if it exists.
pub fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A route file parsed as the agent parses it, if it is there and whole.
#[allow(dead_code)]
pub fn read_route(path: &Path) -> Option<loopmesh::routing::Route> {
    loopmesh::routing::Route::parse(&read(path)?).ok()
}

/// Runs a one-shot loopmesh command and returns (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_loopmesh"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Puts service `name` into etcd at `svc` (its address pinned, its port
/// the service's) with one instance `id` at `backend`.
#[allow(dead_code)]
pub async fn register_service(
    client: &mut etcd_client::Client,
    name: &str,
    svc: SocketAddr,
    id: &str,
    backend: SocketAddr,
) {
    client
        .put(format!("/loopmesh/addresses/{name}"), svc.ip().to_string(), None)
        .await
        .unwrap();
    client
        .put(
            format!("/loopmesh/services/{name}"),
            format!("port: {}", svc.port()),
            None,
        )
        .await
        .unwrap();
    client
        .put(
            format!("/loopmesh/instances/{name}/{id}"),
            format!(r#"{{"host": "{}", "port": {}}}"#, backend.ip(), backend.port()),
            None,
        )
        .await
        .unwrap();
}

/// Turns etcd's authentication on with the user `root`, whose password
/// is [`ROOT_PASSWORD`], also written to `dir/password` for a config's
/// `password_file`. The client is spent: etcd wants credentials from now.
pub async fn enable_root_password(client: &mut etcd_client::Client, dir: &Path) {
    client.user_add("root", ROOT_PASSWORD, None).await.unwrap();
    client.user_grant_role("root", "root").await.unwrap();
    client.auth_enable().await.unwrap();
    std::fs::write(dir.join("password"), format!("{ROOT_PASSWORD}\n")).unwrap();
}

/// The password of [`enable_root_password`].
pub const ROOT_PASSWORD: &str = "root-secret";

/// Runs `loopmesh reload <args>`: the pid that serves now, or the error.
#[allow(dead_code)]
pub fn reload(args: &[&str]) -> Result<u32, String> {
    let mut full = vec!["reload"];
    full.extend_from_slice(args);
    let (ok, stdout, stderr) = run(&full);
    if !ok {
        return Err(stderr);
    }
    reloaded_pid(&stdout).ok_or(stdout)
}

/// An agent config on `etcd` in `dir` (state in `dir/state`), plus `extra` YAML.
pub fn agent_config(dir: &Path, etcd: &Etcd, extra: &str) -> PathBuf {
    let config = dir.join("agent.yaml");
    let store = format!(
        "store: {{etcd: {{endpoints: [{}], retry_max: 200ms}}}}\n",
        etcd.endpoint()
    );
    std::fs::write(&config, format!("{store}state_dir: state\n{extra}")).unwrap();
    config
}

/// The successor's pid in what `loopmesh reload` printed.
pub fn reloaded_pid(said: &str) -> Option<u32> {
    said.trim()
        .strip_prefix("reloaded: pid ")
        .and_then(|rest| rest.strip_suffix(" serves now"))
        .and_then(|pid| pid.parse().ok())
}

/// A TCP backend on a fresh loopback address that writes `id` and a
/// newline to each connection, then echoes what it receives.
pub async fn id_echo_backend(id: &str) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind((unique_ip(), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let id = id.to_string();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let id = id.clone();
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = write.write_all(format!("{id}\n").as_bytes()).await;
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// The path of `tool` on PATH; fails the test naming the Debian package
/// that provides it (CI installs it: a test never passes without its tool).
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{tool} is not installed: apt-get install -y {package}"))
}

/// Runs a command, failing the test with its output unless it succeeds.
pub fn ok(command: &mut Command) -> std::process::Output {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("{command:?} does not run: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// What a command printed on stdout, as text.
pub fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The Debian package as operators build it: systemd/deb/build-deb (the
/// README's command) on this test's own binary, Debian revision
/// `revision`, into `out` (emptied first). Compressed with gzip (`--fast`):
/// the debug binary is large. Fails the test naming the apt package of a
/// missing tool.
pub fn build_deb(out: &Path, revision: u32) -> PathBuf {
    for (tool, package) in [
        ("dpkg-deb", "dpkg"),
        ("dpkg-shlibdeps", "dpkg-dev"),
        ("strip", "binutils"),
        ("gzip", "gzip"),
    ] {
        require_tool(tool, package);
    }
    let _ = std::fs::remove_dir_all(out);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/deb/build-deb");
    let built = ok(Command::new(script)
        .args(["--fast", "--binary", env!("CARGO_BIN_EXE_loopmesh")])
        .arg("--revision")
        .arg(revision.to_string())
        .arg("--out")
        .arg(out));
    let deb = PathBuf::from(stdout(&built).trim());
    let arch = stdout(&ok(Command::new("dpkg").arg("--print-architecture")));
    let name = format!(
        "loopmesh_{}-{revision}_{}.deb",
        env!("CARGO_PKG_VERSION"),
        arch.trim()
    );
    assert_eq!(deb, out.join(name), "the script names the package as Debian does");
    deb
}

/// A unit as the package installs it: the repository's (systemd/), which
/// runs /usr/local/bin/loopmesh, running the packaged /usr/bin/loopmesh.
pub fn packaged_unit(unit: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd").join(unit);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        .replace("/usr/local/bin/loopmesh", "/usr/bin/loopmesh")
}
