#!/usr/bin/env python3
"""mTLS between nodes (issue 17): loopmesh's mesh vs HAProxy → HAProxy with
mTLS vs an stunnel4 pair vs loopmesh plain vs direct, in one run.

Two nodes are two network namespaces on a bridge of their own (no traffic
leaves the machine, the bridge has no address on the host). The path is

    app (in A) → proxy A → [mTLS over the bridge] → proxy B → backend (in B, 127.0.0.1)

targets, each round one after another (interleaved):

- direct: the app in A to the backend on B's bridge address, no proxy;
- loopmesh-plain: agent A alone, its L4 proxy dialing the backend on B's
  bridge address (no TLS, and one proxy hop, not two);
- loopmesh-mtls: agent A → agent B, one pooled HTTP/2 CONNECT tunnel
  (TLS 1.3, rustls) carrying every application connection;
- haproxy-mtls: HAProxy (mode tcp, nbthread 1) in A, its server line
  `ssl crt … ca-file … verify required verifyhost node-b`, → HAProxy in
  B, `bind … ssl crt … ca-file … verify required`: one TLS connection
  per application connection (TLS session resumption as HAProxy does by
  default);
- stunnel-mtls: stunnel4 client in A (verify 2, checkHost node-b) →
  stunnel4 server in B (verify 2), likewise one TLS connection per
  application connection (its session cache on, the default).

Every TLS peer uses the same certificates (`loopmesh ca`, ECDSA P-256)
and TLS 1.3 only. Measures, per target and round: wrk requests/s at c=50
(keep-alive, nginx answering "ok"), wrk c=1 latency (added vs direct),
new connections/s with one request each (`Connection: close`, c=20),
iperf3 bulk (1 stream), and the CPU the proxies of both nodes spent (from
/proc/<pid>/stat), per request, per new connection and per GB.

Needs root (`ip netns`), wrk, iperf3, haproxy, nginx, stunnel4, and
`cargo build --release`. Run from the repository root:

    python3 benches/mesh.py                        # unpinned
    LOOPMESH_BENCH_PIN=1 python3 benches/mesh.py   # load + backends cpu0, the proxies of both nodes cpu1

LOOPMESH_BENCH_ROUNDS (3), LOOPMESH_BENCH_SECONDS (8: the c=50 run; the
others take half), LOOPMESH_BENCH_ONLY (rps,c1,churn,bulk),
LOOPMESH_BENCH_OUT (a file for the raw per-round results, JSON),
LOOPMESH_BENCH_BIN (the loopmesh binary), LOOPMESH_BENCH_PERF=DIR (after
the rounds, `perf record -g` both agents under c=50 and under churn load,
into DIR). Namespaces and the bridge are removed at the end, also on
failure or SIGINT/SIGTERM.

House rules built in: no measurement while another benchmark
(benches/{http,l4,scale,restart,dns}.py) or build (rustc) runs — the
script waits, polling every 30 s, and throws away and repeats a round
during which one was seen;
a round where direct (c=50) moved more than 10% from its median is left
out of the medians (the raw output keeps every round).
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import PIN, cpu_seconds, parse_wrk, rss_mib, stop_procs, write_tcp_route

ROUNDS = int(os.environ.get("LOOPMESH_BENCH_ROUNDS", "3"))
SECONDS = int(os.environ.get("LOOPMESH_BENCH_SECONDS", "8"))
ONLY = set(filter(None, os.environ.get("LOOPMESH_BENCH_ONLY", "rps,c1,churn,bulk").split(",")))
PERF_DIR = os.environ.get("LOOPMESH_BENCH_PERF")
OUT = os.environ.get("LOOPMESH_BENCH_OUT")  # a file for the raw per-round results (JSON)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("LOOPMESH_BENCH_BIN", os.path.join(ROOT, "target", "release", "loopmesh"))
OTHER_BENCHES = r"benches/(http|l4|scale|restart|dns)\.py"

TARGETS = ["direct", "loopmesh-plain", "loopmesh-mtls", "haproxy-mtls", "stunnel-mtls"]
PROXIES = ["loopmesh-mtls", "haproxy-mtls", "stunnel-mtls"]  # the two-hop mTLS peers
# Where the app in A connects, per target (in A's namespace); direct and
# the ports of B are filled in from the bridge's subnet.
FRONT = {
    "loopmesh-plain": "127.100.250.20",
    "loopmesh-mtls": "127.100.250.10",
    "haproxy-mtls": "127.100.250.11",
    "stunnel-mtls": "127.100.250.12",
}
HTTP_PORT, IPERF_PORT = 8081, 5201      # the backends in B
SVC_HTTP, SVC_IPERF = 8080, 5202        # the proxies' fronts in A
MESH_PORT = 15008                       # loopmesh B's inbound listener
HAPROXY_B = (15101, 15102)              # HAProxy B's TLS frontends (http, iperf)
STUNNEL_B = (15201, 15202)              # stunnel B's TLS services (http, iperf)


def run(cmd, check=True):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{cmd}: {out.stdout}{out.stderr}")
    return out.stdout


def other_benchmark_running():
    """Another benchmark, or a build (rustc), running on the machine."""
    return any(subprocess.run(cmd, capture_output=True).returncode == 0
               for cmd in (["pgrep", "-f", OTHER_BENCHES], ["pgrep", "-x", "rustc"]))


def wait_for_other_benchmarks():
    """The house rule: no measurement while another benchmark (or a build) runs."""
    said = False
    while other_benchmark_running():
        if not said:
            print(f"another benchmark (or a build) is running; waiting, polling every 30 s ({uptime()})", file=sys.stderr)
            said = True
        time.sleep(30)


def uptime():
    return run(["uptime"]).strip()


class Net:
    """Two namespaces (nodes A and B) on a bridge of their own."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"lmbb{tag}"
        self.ns = {"a": f"lmbench-a-{tag}", "b": f"lmbench-b-{tag}"}
        self.veth = {"a": f"lmbva{tag}", "b": f"lmbvb{tag}"}
        used = run(["ip", "-o", "-4", "addr"]) + run(["ip", "-4", "route"])
        subnet = next(f"10.{a}.{b}" for a in range(180, 200) for b in range(0, 250) if f"10.{a}.{b}." not in used)
        self.ip = {"a": f"{subnet}.2", "b": f"{subnet}.3"}
        self.made = []

    def create(self):
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self.made.append(("link", self.bridge))
        run(["ip", "link", "set", self.bridge, "up"])
        for node in ("a", "b"):
            ns, veth = self.ns[node], self.veth[node]
            run(["ip", "netns", "add", ns])
            self.made.append(("netns", ns))
            run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            run(["ip", "link", "set", veth, "master", self.bridge, "up"])
            run(["ip", "-n", ns, "addr", "add", f"{self.ip[node]}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # Connection churn: many ports, TIME_WAIT reused (per namespace,
            # the same for every target).
            self.exec(node, ["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000",
                             "net.ipv4.tcp_tw_reuse=1", "net.core.somaxconn=4096",
                             "net.ipv4.tcp_max_syn_backlog=4096"])

    def exec(self, node, cmd):
        return run(["ip", "netns", "exec", self.ns[node]] + cmd)

    def wrap(self, node, cmd, cpu):
        """`cmd` in `node`, on `cpu` when pinned (taskset and ip exec: the pid is the command's)."""
        pin = ["taskset", "-c", str(cpu)] if PIN else []
        return pin + ["ip", "netns", "exec", self.ns[node]] + cmd

    def destroy(self):
        for kind, name in reversed(self.made):
            if kind == "netns":
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            else:
                subprocess.run(["ip", "link", "del", name], capture_output=True)
        self.made = []


class Setup:
    def __init__(self, net):
        self.net = net
        self.dir = tempfile.mkdtemp(prefix="loopmesh-mesh-")
        os.chmod(self.dir, 0o755)
        self.procs = []
        self.pids = {}
        b = net.ip["b"]
        # (http host, http port, iperf host, iperf port) the app in A uses.
        self.target = {
            "direct": (b, HTTP_PORT, b, IPERF_PORT),
            **{name: (addr, SVC_HTTP, addr, SVC_IPERF) for name, addr in FRONT.items()},
        }

    def spawn(self, node, cmd, cpu, log=None, **kw):
        out = open(os.path.join(self.dir, log), "w") if log else subprocess.DEVNULL
        proc = subprocess.Popen(self.net.wrap(node, cmd, cpu), stdout=out, stderr=out, **kw)
        self.procs.append(proc)
        return proc

    def wait_port(self, node, host, port, timeout=20.0):
        probe = f"import socket,sys,time\nd=time.time()+{timeout}\nwhile time.time()<d:\n try:\n  socket.create_connection(('{host}',{port}),timeout=0.2).close(); sys.exit(0)\n except OSError: time.sleep(0.02)\nsys.exit(1)"
        if subprocess.run(["ip", "netns", "exec", self.net.ns[node], "python3", "-c", probe]).returncode:
            raise RuntimeError(f"{host}:{port} in node {node} never accepted")

    def certificates(self):
        ca, certs = os.path.join(self.dir, "ca"), os.path.join(self.dir, "certs")
        run([BIN, "ca", "init", "--trust-domain", "bench.mesh", "--out", ca])
        for node in ("node-a", "node-b"):
            run([BIN, "ca", "issue", "--ca", ca, "--node", node, "--out", certs])
            # HAProxy wants the chain and the key in one file.
            with open(os.path.join(certs, f"{node}.haproxy.pem"), "w") as f:
                f.write(open(os.path.join(certs, f"{node}.pem")).read())
                f.write(open(os.path.join(certs, f"{node}.key")).read())
        self.certs = certs

    def cert(self, node, kind="pem"):
        return os.path.join(self.certs, f"{node}.{kind}")

    @property
    def bundle(self):
        return os.path.join(self.certs, "bundle.pem")

    def start_backends(self):
        """nginx and iperf3 in B: on 127.0.0.1 (behind the proxies of B) and
        on B's bridge address (direct, loopmesh plain)."""
        b = self.net.ip["b"]
        conf = os.path.join(self.dir, "backend.conf")
        with open(conf, "w") as f:
            f.write(f"""
daemon off; worker_processes 1; pid {self.dir}/backend.pid; error_log /dev/null;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{HTTP_PORT} backlog=4096; listen {b}:{HTTP_PORT} backlog=4096;
    location / {{ return 200 "ok\\n"; }} }} }}
""")
        self.spawn("b", ["nginx", "-c", conf, "-p", self.dir], 0)
        for host in ("127.0.0.1", b):
            self.spawn("b", ["iperf3", "-s", "-B", host, "-p", str(IPERF_PORT)], 0)
        for host in ("127.0.0.1", b):
            self.wait_port("b", host, HTTP_PORT)
            self.wait_port("b", host, IPERF_PORT)

    def start_loopmesh(self):
        b = self.net.ip["b"]
        mesh_at = f"{b}:{MESH_PORT}"
        pids = []
        for node, name in (("b", "node-b"), ("a", "node-a")):
            state = os.path.join(self.dir, f"state-{node}")
            routes = os.path.join(state, "routes")
            os.makedirs(routes)
            # Both nodes hold the mesh services: A dials through the tunnel,
            # B's inbound listener admits only instances of services it
            # knows that are its own.
            addr = FRONT["loopmesh-mtls"]
            write_tcp_route(routes, "bench-http", addr, SVC_HTTP,
                            {"host": "127.0.0.1", "port": HTTP_PORT, "node": "node-b", "mesh": mesh_at})
            write_tcp_route(routes, "bench-iperf", addr, SVC_IPERF,
                            {"host": "127.0.0.1", "port": IPERF_PORT, "node": "node-b", "mesh": mesh_at})
            if node == "a":
                # Plain: the backend on B's bridge address, no mesh address: dialed directly.
                addr = FRONT["loopmesh-plain"]
                write_tcp_route(routes, "plain-http", addr, SVC_HTTP, {"host": b, "port": HTTP_PORT})
                write_tcp_route(routes, "plain-iperf", addr, SVC_IPERF, {"host": b, "port": IPERF_PORT})
            listen = f"listen: '{mesh_at}', " if node == "b" else ""
            config = os.path.join(self.dir, f"agent-{node}.yaml")
            with open(config, "w") as f:
                f.write(f"node: {name}\nproxy: {{workers: 1}}\n"
                        f"mesh: {{{listen}cert: {self.cert(name)}, key: {self.cert(name, 'key')}, bundle: {self.bundle}}}\n")
            cmd = [BIN, "agent", "--config", config, "--static", "--state-dir", state]
            proc = self.spawn(node, cmd, 1, log=f"agent-{node}.log", env=dict(os.environ, RUST_LOG="warn"))
            pids.append(proc.pid)
            if node == "b":
                self.wait_port("b", b, MESH_PORT)
        self.wait_port("a", FRONT["loopmesh-mtls"], SVC_HTTP)
        self.wait_port("a", FRONT["loopmesh-plain"], SVC_HTTP)
        self.pids["loopmesh-mtls"] = {"a": pids[1], "b": pids[0]}
        self.pids["loopmesh-plain"] = {"a": pids[1]}  # agent A alone carries it

    def start_haproxy(self):
        a, b = FRONT["haproxy-mtls"], self.net.ip["b"]
        common = """
global
    nbthread 1
    maxconn 4000
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode tcp
    timeout connect 1s
    timeout client 600s
    timeout server 600s
"""
        conf_b = os.path.join(self.dir, "haproxy-b.cfg")
        with open(conf_b, "w") as f:
            f.write(common)
            for port, backend in zip(HAPROXY_B, (HTTP_PORT, IPERF_PORT)):
                f.write(f"listen in-{port}\n    bind {b}:{port} ssl crt {self.cert('node-b', 'haproxy.pem')} "
                        f"ca-file {self.bundle} verify required\n    server local 127.0.0.1:{backend}\n")
        conf_a = os.path.join(self.dir, "haproxy-a.cfg")
        with open(conf_a, "w") as f:
            f.write(common)
            for front, port in zip((SVC_HTTP, SVC_IPERF), HAPROXY_B):
                f.write(f"listen out-{front}\n    bind {a}:{front}\n    server node-b {b}:{port} ssl "
                        f"crt {self.cert('node-a', 'haproxy.pem')} ca-file {self.bundle} verify required verifyhost node-b\n")
        pb = self.spawn("b", ["haproxy", "-db", "-f", conf_b], 1, log="haproxy-b.log")
        self.wait_port("b", b, HAPROXY_B[0])
        pa = self.spawn("a", ["haproxy", "-db", "-f", conf_a], 1, log="haproxy-a.log")
        self.wait_port("a", a, SVC_HTTP)
        self.pids["haproxy-mtls"] = {"a": pa.pid, "b": pb.pid}

    def start_stunnel(self):
        a, b = FRONT["stunnel-mtls"], self.net.ip["b"]
        common = ("foreground = yes\npid =\ndebug = 3\n"
                  "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n")
        conf_b = os.path.join(self.dir, "stunnel-b.conf")
        with open(conf_b, "w") as f:
            f.write(common)
            for port, backend in zip(STUNNEL_B, (HTTP_PORT, IPERF_PORT)):
                f.write(f"[in-{port}]\naccept = {b}:{port}\nconnect = 127.0.0.1:{backend}\n"
                        f"cert = {self.cert('node-b')}\nkey = {self.cert('node-b', 'key')}\n"
                        f"CAfile = {self.bundle}\nverify = 2\nsslVersionMin = TLSv1.3\n")
        conf_a = os.path.join(self.dir, "stunnel-a.conf")
        with open(conf_a, "w") as f:
            f.write(common)
            for front, port in zip((SVC_HTTP, SVC_IPERF), STUNNEL_B):
                f.write(f"[out-{front}]\nclient = yes\naccept = {a}:{front}\nconnect = {b}:{port}\n"
                        f"cert = {self.cert('node-a')}\nkey = {self.cert('node-a', 'key')}\n"
                        f"CAfile = {self.bundle}\nverify = 2\ncheckHost = node-b\nsslVersionMin = TLSv1.3\n")
        pb = self.spawn("b", ["stunnel4", conf_b], 1, log="stunnel-b.log")
        self.wait_port("b", b, STUNNEL_B[0])
        pa = self.spawn("a", ["stunnel4", conf_a], 1, log="stunnel-a.log")
        self.wait_port("a", a, SVC_HTTP)
        self.pids["stunnel-mtls"] = {"a": pa.pid, "b": pb.pid}

    def check_paths(self):
        """One request through every path, answered by the backend in B."""
        for name, (host, port, _, _) in self.target.items():
            out = self.net.exec("a", ["curl", "-s", "--max-time", "5", f"http://{host}:{port}/"])
            if out != "ok\n":
                logs = {f: open(os.path.join(self.dir, f)).read()[-2000:] for f in os.listdir(self.dir) if f.endswith(".log")}
                raise RuntimeError(f"{name}: got {out!r} through http://{host}:{port}/; logs: {logs}")

    def stop(self):
        stop_procs(self.procs)
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)


def wrk(net, url, conns, seconds, extra=()):
    out = run(net.wrap("a", ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", *extra, url], 0), check=False)
    r = parse_wrk(out)
    return {key: r[key] for key in ("rps", "p50", "p99", "errors", "requests")}


def iperf(net, host, port, seconds):
    out = run(net.wrap("a", ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J"], 0), check=False)
    end = json.loads(out)["end"]["sum_received"]
    return end["bits_per_second"] / 1e9, end["bytes"]


def measure(net, setup, rounds):
    """`rounds` clean rounds: a round during which another benchmark was
    seen running (before any target or at its end) is thrown away and run
    again once the other has finished."""
    results = {name: {} for name in TARGETS}
    short = max(3, SECONDS // 2)
    done = attempts = 0
    while done < rounds:
        attempts += 1
        if attempts > 4 * rounds:
            print(f"stopping after {done} clean rounds: too many disturbed by other benchmarks", file=sys.stderr)
            break
        wait_for_other_benchmarks()
        this = {name: {} for name in TARGETS}
        disturbed = False

        def record(name, key, value):
            this[name][key] = this[name].get(key, 0) + value if key == "errors" else value

        for name in TARGETS:
            if other_benchmark_running():
                disturbed = True
                break
            host, port, ihost, iport = setup.target[name]
            sides = setup.pids.get(name, {})
            pids = list(sides.values())
            url = f"http://{host}:{port}/"
            if "rps" in ONLY:
                wrk(net, url, 50, 1)  # warm-up (and the tunnel's streams)
                before = {side: cpu_seconds([p]) for side, p in sides.items()}
                r = wrk(net, url, 50, SECONDS)
                spent = {side: cpu_seconds([p]) - before[side] for side, p in sides.items()}
                record(name, "rps50", r["rps"])
                record(name, "p99_50", r["p99"])
                record(name, "errors", r["errors"])
                if sides:
                    record(name, "req_per_cpu_s", r["requests"] / max(sum(spent.values()), 1e-9))
                    for side, cpu in spent.items():
                        record(name, f"cpu_{side}_us", cpu * 1e6 / r["requests"])
                    record(name, "rss_loaded", rss_mib(pids))
            if "c1" in ONLY:
                r1 = wrk(net, url, 1, short)
                record(name, "p50_1", r1["p50"])
                record(name, "p99_1", r1["p99"])
                record(name, "errors", r1["errors"])
            if "churn" in ONLY:
                before = cpu_seconds(pids)
                churn = wrk(net, url, 20, short, ("-H", "Connection: close"))
                spent = cpu_seconds(pids) - before
                record(name, "churn", churn["rps"])
                record(name, "churn_errors", churn["errors"])
                if pids:
                    record(name, "conn_per_cpu_s", churn["requests"] / max(spent, 1e-9))
            if "bulk" in ONLY:
                before = cpu_seconds(pids)
                gbps, nbytes = iperf(net, ihost, iport, short)
                spent = cpu_seconds(pids) - before
                record(name, "bulk1", gbps)
                if pids:
                    record(name, "cpu_s_per_gb", spent / (nbytes / 1e9))
        if disturbed or other_benchmark_running():
            print(f"round thrown away: another benchmark ran during it ({uptime()})", file=sys.stderr)
            continue
        done += 1
        for name in TARGETS:
            for key, value in this[name].items():
                results[name].setdefault(key, []).append(value)
        print(f"round {done}/{rounds} done ({uptime()})", file=sys.stderr)
    return results


def keep_steady_rounds(results):
    """The protocol: drop a round where direct (c=50 req/s) moved more than
    10% from its median over rounds. Returns the kept results and a note."""
    direct = results["direct"].get("rps50", [])
    if len(direct) < 3:
        return results, "no round dropped"
    mid = statistics.median(direct)
    keep = [i for i, v in enumerate(direct) if abs(v - mid) <= 0.10 * mid]
    dropped = [i + 1 for i in range(len(direct)) if i not in keep]
    kept = {name: {key: [v[i] for i in keep] for key, v in keys.items()} for name, keys in results.items()}
    note = f"dropped round(s) {dropped}: direct c=50 more than 10% from its median" if dropped else "no round dropped"
    return kept, note


def profile(net, setup, out_dir):
    """perf record -g of both agents under keep-alive c=50, churn and bulk."""
    os.makedirs(out_dir, exist_ok=True)
    host, port, ihost, iport = setup.target["loopmesh-mtls"]
    sides = setup.pids["loopmesh-mtls"]
    url = f"http://{host}:{port}/"
    loads = {
        "c50": lambda: wrk(net, url, 50, SECONDS),
        "churn": lambda: wrk(net, url, 20, SECONDS, ("-H", "Connection: close")),
        "bulk": lambda: iperf(net, ihost, iport, SECONDS),
    }
    for load, go in loads.items():
        perfs = [subprocess.Popen(["perf", "record", "-g", "-F", "999", "-p", str(pid), "-o",
                                   os.path.join(out_dir, f"{load}-{node}.data"), "--", "sleep", str(SECONDS)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for node, pid in sides.items()]
        go()
        for p in perfs:
            p.wait()
    print(f"perf data in {out_dir} (perf report -i {out_dir}/c50-a.data --no-children)", file=sys.stderr)


def report(all_results, started, ended):
    results, note = keep_steady_rounds(all_results)
    def values(name, key):
        return results[name].get(key, [])

    def med(name, key):
        v = values(name, key)
        return statistics.median(v) if v else float("nan")

    def rng(name, key):
        v = values(name, key)
        return (min(v), max(v)) if v else (float("nan"), float("nan"))

    def ratio(name, key, to):
        pairs = [(a, b) for a, b in zip(values(name, key), values(to, key)) if b]
        return statistics.median(a / b for a, b in pairs) if pairs else float("nan")

    def fmt(x, spec):
        return "—" if x != x else format(x, spec)

    layout = "load generator + backends on cpu0, the proxies of both nodes on cpu1" if PIN else "unpinned"
    rounds = len(values("direct", "rps50") or values("direct", "p50_1") or values("direct", "churn"))
    print(f"\nmTLS between nodes, {rounds} interleaved rounds, c=50 runs of {SECONDS}s (others {max(3, SECONDS // 2)}s), layout: {layout}")
    print(f"uptime before: {started}\nuptime after:  {ended}\n")
    d = values("direct", "rps50")
    if d:
        spread = (max(d) - min(d)) / statistics.median(d)
        print(f"direct c=50 moved {spread * 100:.0f}% across the kept rounds (min-max over median); {note}\n")
    print("Medians over rounds (range); ratios are medians of the per-round ratios. CPU: the proxy processes of both nodes"
          " (loopmesh-plain: agent A alone, one proxy hop).\n")
    print("| target | req/s c=50 (range) | ×direct | ×HAProxy | p99 c=50 ms | req per CPU-s (range) | ×HAProxy | CPU µs/req A / B |")
    print("|---|---|---|---|---|---|---|---|")
    for name in TARGETS:
        lo, hi = rng(name, "rps50")
        rlo, rhi = rng(name, "req_per_cpu_s")
        rpc = f"{fmt(med(name, 'req_per_cpu_s'), '.0f')} ({fmt(rlo, '.0f')}-{fmt(rhi, '.0f')})" if values(name, "req_per_cpu_s") else "—"
        split = f"{fmt(med(name, 'cpu_a_us'), '.1f')} / {fmt(med(name, 'cpu_b_us'), '.1f')}" if values(name, "cpu_a_us") else "—"
        split = split.replace(" / —", " / (none)")
        print(f"| {name} | {fmt(med(name, 'rps50'), '.0f')} ({fmt(lo, '.0f')}-{fmt(hi, '.0f')}) | {fmt(ratio(name, 'rps50', 'direct'), '.2f')} "
              f"| {fmt(ratio(name, 'rps50', 'haproxy-mtls'), '.2f')} | {fmt(med(name, 'p99_50'), '.2f')} | {rpc} "
              f"| {fmt(ratio(name, 'req_per_cpu_s', 'haproxy-mtls'), '.2f')} | {split} |")
    print("\n| target | c=1 p50 / p99 ms | added c=1 p50 µs (range) | new conn/s, 1 req each (range) | ×HAProxy | conn per CPU-s | ×HAProxy | errors (churn) | bulk 1 stream Gb/s (range) | ×direct | proxy CPU-s per GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in TARGETS:
        added = [(a - b) * 1000 for a, b in zip(values(name, "p50_1"), values("direct", "p50_1"))]
        added_s = f"{statistics.median(added):+.0f} ({min(added):+.0f}…{max(added):+.0f})" if added and name != "direct" else "—"
        clo, chi = rng(name, "churn")
        blo, bhi = rng(name, "bulk1")
        print(f"| {name} | {fmt(med(name, 'p50_1'), '.3f')} / {fmt(med(name, 'p99_1'), '.3f')} | {added_s} "
              f"| {fmt(med(name, 'churn'), '.0f')} ({fmt(clo, '.0f')}-{fmt(chi, '.0f')}) | {fmt(ratio(name, 'churn', 'haproxy-mtls'), '.2f')} "
              f"| {fmt(med(name, 'conn_per_cpu_s'), '.0f')} | {fmt(ratio(name, 'conn_per_cpu_s', 'haproxy-mtls'), '.2f')} "
              f"| {sum(values(name, 'churn_errors'))} | {fmt(med(name, 'bulk1'), '.2f')} ({fmt(blo, '.2f')}-{fmt(bhi, '.2f')}) "
              f"| {fmt(ratio(name, 'bulk1', 'direct'), '.2f')} | {fmt(med(name, 'cpu_s_per_gb'), '.2f')} |")
    print("\nraw per-round values (every round, dropped ones too):")
    print(json.dumps(all_results, indent=None, sort_keys=True))


def main():
    if os.geteuid() != 0:
        sys.exit("needs root (ip netns)")
    if not os.path.exists(BIN):
        sys.exit(f"build first: cargo build --release ({BIN})")
    for tool in ("wrk", "iperf3", "haproxy", "nginx", "stunnel4", "taskset", "curl"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install wrk iperf3 haproxy nginx-light stunnel4 curl")
    net = Net()
    setup = None

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        net.create()
        setup = Setup(net)
        setup.certificates()
        setup.start_backends()
        setup.start_loopmesh()
        setup.start_haproxy()
        setup.start_stunnel()
        setup.check_paths()
        time.sleep(0.5)
        wait_for_other_benchmarks()
        started = uptime()
        results = measure(net, setup, ROUNDS)
        ended = uptime()
        if PERF_DIR:
            wait_for_other_benchmarks()
            profile(net, setup, PERF_DIR)
    finally:
        if setup:
            setup.stop()
        net.destroy()
    if OUT:
        with open(OUT, "w") as f:
            json.dump({"pinned": PIN, "seconds": SECONDS, "started": started, "ended": ended, "results": results}, f)
    report(results, started, ended)


if __name__ == "__main__":
    main()
