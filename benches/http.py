#!/usr/bin/env python3
"""L7 (HTTP) proxy benchmark: direct vs loopmesh vs HAProxy (mode http) vs
nginx (proxy_pass), issue 16.

Every proxy runs one worker: loopmesh `proxy.workers: 1`, HAProxy
`nbthread 1` with `http-reuse always`, nginx `worker_processes 1` with an
upstream `keepalive` pool. The backend is one nginx worker answering
`200 ok` from memory (keep-alive, HTTP/1.1 on one port, h2c on another).
Each proxy gets its own loopback address; loopmesh runs as the agent in
static mode, its services written as route files (`protocol: http`).

Each round runs every target one after another (interleaved), so the
noisy 2-core machine moves them together; the report gives medians over
rounds, ranges, and ratios to direct and to HAProxy taken within each
round. A round whose direct figure moved more than 10% from the median of
direct is left out of that figure (and said so).

Measured per round and target:
  rps   HTTP/1.1 keep-alive, wrk -t1 -c50: req/s, p99, and requests per
        CPU-second of the proxy process(es) (utime+stime from
        /proc/<pid>/stat before and after the run), and that CPU per
        request split into user and kernel time
  c1    wrk -t1 -c1: p50/p99; the added latency is p50 minus direct's
  h2    h2load -c10 -m10 -t1 (HTTP/2 prior knowledge, h2c): req/s and
        requests per CPU-second; the proxies speak HTTP/1.1 to the backend
        (nginx cannot proxy_pass over h2). Extra rows: loopmesh with
        `upstream_protocol: http2` and HAProxy with `server ... proto h2`,
        both to the backend's h2c port
  open  an open loop at a fixed rate below saturation: oha -q RATE with
        --latency-correction (coordinated omission corrected), 50
        connections; p50/p99/p99.9. RATE is LOOPMESH_BENCH_RATE, or half
        the slowest proxy's req/s in a short calibration run first
  reload (after the rounds) wrk -c50 for 10 s while loopmesh's route file
        of a split service is rewritten 10 times a second, alternating a
        50/50 and a 95/5 split between two tagged backend sets (v1, v2);
        non-2xx and socket errors; then the split is set to 95/5 and 2000
        requests on one keep-alive connection check v1's share (and
        loopmesh's /metrics say how many table changes it applied). For
        reference HAProxy (-W reload, SIGUSR2) and nginx (HUP) get the same
        weight changes as config reloads.

The machine is shared: the report gives the load average before and after
and the CPU time other processes (not this run's, not kernel threads)
took during the run, sampled from /proc twice a second. Re-run when it is
more than a few percent of the machine.

Needs: wrk, haproxy, nginx (with http_v2), h2load (Debian nghttp2-client),
oha (cargo install oha) and `cargo build --release`. Run from the
repository root, as root (pinning, file limits):

    python3 benches/http.py                        # unpinned
    LOOPMESH_BENCH_PIN=1 python3 benches/http.py   # load + backend on cpu0, proxies on cpu1

Environment: LOOPMESH_BENCH_BIN (the loopmesh binary; default
target/release/loopmesh, or $CARGO_TARGET_DIR/release/loopmesh),
LOOPMESH_BENCH_ROUNDS (3), LOOPMESH_BENCH_SECONDS (8, c=1 and open loop
half of it but at least 4), LOOPMESH_BENCH_ONLY (any of
rps,c1,h2,open,reload; default all), LOOPMESH_BENCH_RATE (open-loop
req/s), LOOPMESH_BENCH_OHA (path of oha), LOOPMESH_BENCH_LD_PRELOAD (an
experiment: LD_PRELOAD for the loopmesh agent only, e.g. another malloc).
"""

import os
import sys

# This file is named like the standard library's `http` package, which
# urllib needs: keep its own directory off the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import http.client  # noqa: E402
import urllib.request  # noqa: E402

# The shared helpers (benches/benchlib.py): this directory on the path just
# for that import, after `http` and `urllib` are the standard library's.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    PIN, TICKS, children, cpu_seconds, cpu_ticks, free_port, parse_wrk as _parse_wrk, pinned, rss_mib, stop_procs, wait_port,
    write_atomically,
)
del sys.path[0]

ROUNDS = int(os.environ.get("LOOPMESH_BENCH_ROUNDS", "3"))
# A section run while other processes took more than this share of the
# machine is left out and run again, up to MAX_ROUNDS rounds in all.
MAX_FOREIGN = float(os.environ.get("LOOPMESH_BENCH_MAX_FOREIGN", "0.05"))
MAX_ROUNDS = int(os.environ.get("LOOPMESH_BENCH_MAX_ROUNDS", str(2 * ROUNDS)))
SECONDS = int(os.environ.get("LOOPMESH_BENCH_SECONDS", "8"))
ONLY = set(filter(None, os.environ.get("LOOPMESH_BENCH_ONLY", "rps,c1,h2,open,reload").split(",")))
RATE = int(os.environ.get("LOOPMESH_BENCH_RATE", "0"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_target_dir = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.environ.get("LOOPMESH_BENCH_BIN", os.path.join(_target_dir, "release", "loopmesh"))
OHA = os.environ.get("LOOPMESH_BENCH_OHA") or shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha")
# An experiment: another malloc for loopmesh alone, e.g. /usr/lib/x86_64-linux-gnu/libjemalloc.so.2.
PRELOAD = os.environ.get("LOOPMESH_BENCH_LD_PRELOAD", "")

# Each proxy listens on its own loopback address; the backend on 127.0.0.1.
ADDRS = {"loopmesh": "127.100.250.10", "haproxy": "127.100.250.11", "nginx": "127.100.250.12"}
H1_PORT = 8080  # HTTP/1.1 (loopmesh: HTTP/1.1 and HTTP/2, detected per connection)
H2_PORT = 8081  # HTTP/2 prior knowledge (HAProxy `proto h2`, nginx `http2`); loopmesh: same service as 8080
H2UP_PORT = 8082  # HTTP/2 to the proxy and from the proxy to the backend (loopmesh, HAProxy)
SPLIT_PORT = 8090  # the service whose split changes 10 times a second


def write_route(routes, name, addr, port, backends, http=None):
    """A `protocol: http` route file (as tests/http_proxy.rs writes them):
    `backends` maps an id to (port on 127.0.0.1, tags)."""
    spec = {"port": port, "protocol": "http", "balance": "round_robin", "connect_timeout": "1s"}
    if http:
        spec["http"] = http
    route = {
        "service": name,
        "address": addr,
        "spec": spec,
        "backends": {bid: {"host": "127.0.0.1", "port": p, "tags": tags} for bid, (p, tags) in backends.items()},
    }
    write_atomically(os.path.join(routes, f"{name}.json"), json.dumps(route))


def split_http(v1_weight):
    """The split service's policy: v1 gets `v1_weight`%, v2 the rest."""
    return {"routes": [{"to": [{"tags": ["v1"], "weight": v1_weight}, {"tags": ["v2"], "weight": 100 - v1_weight}]}]}


class Setup:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="loopmesh-http-")
        self.procs = []
        self.h1_port = free_port()  # backend, HTTP/1.1
        self.h2_port = free_port()  # backend, h2c
        self.split_ports = {name: free_port() for name in ("v1a", "v1b", "v2a", "v2b")}
        self.admin_port = free_port()

    def spawn(self, cmd, cpu, **kw):
        proc = subprocess.Popen(pinned(cmd, cpu), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        self.procs.append(proc)
        return proc

    def start_backend(self):
        conf = os.path.join(self.dir, "backend.conf")
        splits = "".join(
            f'  server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ return 200 "{name[:2]}\\n"; }} }}\n'
            for name, port in self.split_ports.items()
        )
        with open(conf, "w") as f:
            f.write(f"""
daemon off; worker_processes 1; pid {self.dir}/backend.pid; error_log /dev/null;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 600s;
  server {{ listen 127.0.0.1:{self.h1_port} reuseport backlog=4096; location / {{ return 200 "ok\\n"; }} }}
  server {{ listen 127.0.0.1:{self.h2_port} http2 backlog=4096; location / {{ return 200 "ok\\n"; }} }}
{splits}}}
""")
        proc = self.spawn(["nginx", "-c", conf, "-p", self.dir], 0)
        for port in (self.h1_port, self.h2_port, *self.split_ports.values()):
            wait_port("127.0.0.1", port)
        time.sleep(0.2)
        return [proc.pid] + children(proc.pid)

    # --- loopmesh ---------------------------------------------------------

    def split_backends(self):
        return {
            "v1a": (self.split_ports["v1a"], ["v1"]),
            "v1b": (self.split_ports["v1b"], ["v1"]),
            "v2a": (self.split_ports["v2a"], ["v2"]),
            "v2b": (self.split_ports["v2b"], ["v2"]),
        }

    def write_split_route(self, v1_weight):
        write_route(self.routes, "bench-split", ADDRS["loopmesh"], SPLIT_PORT, self.split_backends(), split_http(v1_weight))

    def start_loopmesh(self):
        state = os.path.join(self.dir, "state")
        routes = os.path.join(state, "routes")
        os.makedirs(routes)
        self.routes = routes
        a = ADDRS["loopmesh"]
        write_route(routes, "bench-http", a, H1_PORT, {"b1": (self.h1_port, [])})
        write_route(routes, "bench-h2up", a, H2UP_PORT, {"b1": (self.h2_port, [])}, {"upstream_protocol": "http2"})
        self.write_split_route(50)
        config = os.path.join(self.dir, "agent.yaml")
        with open(config, "w") as f:
            f.write(
                "proxy: {workers: 1}\n"
                "dns: {enabled: false}\n"
                f"admin: {{enabled: true, listen: '127.0.0.1:{self.admin_port}'}}\n"
            )
        env = dict(os.environ, RUST_LOG="warn")
        if PRELOAD:
            env["LD_PRELOAD"] = PRELOAD
        cmd = [BIN, "agent", "--config", config, "--static", "--state-dir", state]
        proc = self.spawn(cmd, 1, env=env)
        for port in (H1_PORT, H2UP_PORT, SPLIT_PORT):
            wait_port(a, port)
        return [proc.pid]

    def loopmesh_metrics(self):
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5).read().decode()
        except OSError:
            return ""

    # --- HAProxy ----------------------------------------------------------

    def write_haproxy(self, v1_weight=50):
        conf = os.path.join(self.dir, "haproxy.cfg")
        a = ADDRS["haproxy"]
        p = self.split_ports
        text = f"""
global
    nbthread 1
    maxconn 4000
    stats socket {self.dir}/haproxy.sock mode 600 level admin expose-fd listeners
defaults
    mode http
    http-reuse always
    timeout connect 1s
    timeout client 600s
    timeout server 600s
    timeout http-keep-alive 600s
listen http
    bind {a}:{H1_PORT}
    bind {a}:{H2_PORT} proto h2
    server b1 127.0.0.1:{self.h1_port}
listen h2up
    bind {a}:{H2UP_PORT} proto h2
    server b1 127.0.0.1:{self.h2_port} proto h2
listen split
    bind {a}:{SPLIT_PORT}
    balance roundrobin
    server v1a 127.0.0.1:{p['v1a']} weight {v1_weight}
    server v1b 127.0.0.1:{p['v1b']} weight {v1_weight}
    server v2a 127.0.0.1:{p['v2a']} weight {100 - v1_weight}
    server v2b 127.0.0.1:{p['v2b']} weight {100 - v1_weight}
"""
        write_atomically(conf, text)
        return conf

    def start_haproxy(self):
        conf = self.write_haproxy()
        # Master-worker, so reloads (SIGUSR2) hand the listeners over seamlessly.
        proc = self.spawn(["haproxy", "-W", "-db", "-f", conf], 1)
        self.haproxy_master = proc.pid
        for port in (H1_PORT, H2_PORT, H2UP_PORT, SPLIT_PORT):
            wait_port(ADDRS["haproxy"], port)
        time.sleep(0.2)
        return [proc.pid] + children(proc.pid)

    # --- nginx ------------------------------------------------------------

    def write_nginx(self, v1_weight=50):
        conf = os.path.join(self.dir, "nginx-proxy.conf")
        a = ADDRS["nginx"]
        p = self.split_ports
        proxy = 'proxy_http_version 1.1; proxy_set_header Connection "";'
        text = f"""
daemon off; worker_processes 1; pid {self.dir}/proxy.pid; error_log /dev/null;
worker_rlimit_nofile 16384;
events {{ worker_connections 8000; }}
http {{
  access_log off; keepalive_requests 1000000; keepalive_timeout 600s;
  upstream backend {{ server 127.0.0.1:{self.h1_port}; keepalive 64; keepalive_requests 1000000; keepalive_timeout 600s; }}
  upstream split {{
    server 127.0.0.1:{p['v1a']} weight={v1_weight}; server 127.0.0.1:{p['v1b']} weight={v1_weight};
    server 127.0.0.1:{p['v2a']} weight={100 - v1_weight}; server 127.0.0.1:{p['v2b']} weight={100 - v1_weight};
    keepalive 64; keepalive_requests 1000000; keepalive_timeout 600s;
  }}
  server {{ listen {a}:{H1_PORT}; location / {{ proxy_pass http://backend; {proxy} }} }}
  server {{ listen {a}:{H2_PORT} http2; location / {{ proxy_pass http://backend; {proxy} }} }}
  server {{ listen {a}:{SPLIT_PORT}; location / {{ proxy_pass http://split; {proxy} }} }}
}}
"""
        write_atomically(conf, text)
        return conf

    def start_nginx(self):
        conf = self.write_nginx()
        proc = self.spawn(["nginx", "-c", conf, "-p", self.dir], 1)
        self.nginx_master = proc.pid
        for port in (H1_PORT, H2_PORT, SPLIT_PORT):
            wait_port(ADDRS["nginx"], port)
        time.sleep(0.2)  # let the master fork its worker before we read its pid
        return [proc.pid] + children(proc.pid)

    def stop(self):
        stop_procs(self.procs)
        shutil.rmtree(self.dir, ignore_errors=True)


class NoiseMonitor:
    """Samples every process twice a second and adds up the CPU time of
    those that are neither this run's (descendants of this script) nor
    kernel threads: another engineer's compiler shows up here. Processes
    that end between two samples lose their last half second."""

    def __init__(self):
        self.ticks = {}  # pid -> (start time, ticks at the last sample)
        self.total = 0  # foreign ticks since the first sample
        self.by_comm = {}
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.started = time.time()
        self.first = True
        self.last_mark = (self.started, 0)
        self.sample()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def sample(self):
        procs = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                head, tail = open(f"/proc/{entry}/stat").read().rsplit(")", 1)
            except OSError:
                continue
            fields = tail.split()
            comm = head.split("(", 1)[1]
            procs[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]), fields[19], comm)
        me = os.getpid()
        with self.lock:
            for pid, (ppid, ticks, start, comm) in procs.items():
                ancestor, hops = pid, 0
                while ancestor not in (0, 1, 2, me) and hops < 64:
                    ancestor, hops = procs.get(ancestor, (0,))[0], hops + 1
                if ancestor in (2, me) or pid in (me, 2):
                    continue
                seen = self.ticks.get(pid)
                if seen and seen[0] == start:
                    grew = ticks - seen[1]
                else:
                    # Started since the first sample: all its CPU counts.
                    grew = 0 if self.first else ticks
                self.ticks[pid] = (start, ticks)
                self.total += grew
                self.by_comm[comm] = self.by_comm.get(comm, 0) + grew
            self.first = False

    def run(self):
        while not self.stop_flag.wait(0.5):
            self.sample()

    def mark(self):
        """The share of the machine other processes took since the last mark."""
        self.sample()
        with self.lock:
            now, total = time.time(), self.total
            then, before = self.last_mark
            self.last_mark = (now, total)
        return (total - before) / TICKS / max(now - then, 1e-3) / os.cpu_count()

    def stop(self):
        """(foreign CPU-seconds, wall seconds, the busiest foreign commands)."""
        self.stop_flag.set()
        self.thread.join()
        self.sample()
        busy = sorted(((v / TICKS, k) for k, v in self.by_comm.items() if v / TICKS >= 0.5), reverse=True)[:4]
        return self.total / TICKS, time.time() - self.started, busy


# --- load generators ------------------------------------------------------


def parse_wrk(out):
    """wrk's figures; a percentile wrk did not print is NaN."""
    return _parse_wrk(out, missing_percentile_nan=True)


def wrk(url, conns, seconds):
    cmd = pinned(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", url], 0)
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    return parse_wrk(out)


def h2load(url, seconds, clients=10, streams=10):
    cmd = pinned(["h2load", "-t1", f"-c{clients}", f"-m{streams}", "-D", str(seconds), url], 0)
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    lat = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    if not (m and req):
        raise RuntimeError(f"h2load failed on {url}:\n{out}")
    unit = lambda v, u: float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[u]
    return {
        "rps": float(m.group(1)),
        "requests": int(req.group(3)),
        # "failed" counts every request without a 2xx/3xx answer (errored
        # and timed out ones included).
        "errors": int(req.group(5)),
        "mean": unit(lat.group(5), lat.group(6)) if lat else float("nan"),
    }


def oha(url, seconds, rate, conns=50):
    """Open loop: `rate` req/s whatever the answers, latency measured from
    when each request was due (--latency-correction)."""
    cmd = pinned(
        [OHA, "--no-tui", "--output-format", "json", "-z", f"{seconds}s", "-q", str(rate), "-c", str(conns), "--latency-correction", url],
        0,
    )
    for attempt in range(3):
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
        data = json.loads(out)
        pct = data["latencyPercentiles"]
        if pct.get("p50") is not None:
            break
        # No request answered at all: say what oha saw, and measure again.
        print(f"oha {url}: no answer measured ({data.get('errorDistribution')}), again", file=sys.stderr)
    else:
        raise SystemExit(f"oha {url}: no answer measured in 3 runs")
    summary = data["summary"]
    codes = data.get("statusCodeDistribution", {})
    ok = sum(n for code, n in codes.items() if code.startswith("2"))
    # Requests still in flight when the duration ends are aborted: not failures.
    failed = {k: n for k, n in data.get("errorDistribution", {}).items() if "deadline" not in k}
    errors = sum(failed.values()) + sum(n for code, n in codes.items() if not code.startswith("2"))
    return {
        "rps": summary["requestsPerSec"],
        "p50": pct["p50"] * 1e3,
        "p99": pct["p99"] * 1e3,
        "p999": pct["p99.9"] * 1e3,
        "requests": ok,
        "errors": errors,
    }


# --- the run --------------------------------------------------------------


def main():
    # A plain kill (or the end of a session) still stops the servers started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    if not os.path.exists(BIN):
        sys.exit(f"no loopmesh binary at {BIN}: cargo build --release (or set LOOPMESH_BENCH_BIN)")
    for tool in ("wrk", "haproxy", "nginx", "taskset") + (("h2load",) if "h2" in ONLY else ()):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install wrk haproxy nginx-light nghttp2-client")
    if "open" in ONLY and not os.path.exists(OHA):
        sys.exit("missing oha: cargo install oha (or LOOPMESH_BENCH_OHA, or leave `open` out of LOOPMESH_BENCH_ONLY)")
    load_before = os.getloadavg()
    monitor = NoiseMonitor()
    setup = Setup()
    try:
        setup.start_backend()
        pids = {
            "direct": [],
            "loopmesh": setup.start_loopmesh(),
            "haproxy": setup.start_haproxy(),
            "nginx": setup.start_nginx(),
        }
        h1 = {"direct": f"http://127.0.0.1:{setup.h1_port}/", **{n: f"http://{a}:{H1_PORT}/" for n, a in ADDRS.items()}}
        h2 = {
            "direct": f"http://127.0.0.1:{setup.h2_port}/",
            "loopmesh": f"http://{ADDRS['loopmesh']}:{H1_PORT}/",
            "haproxy": f"http://{ADDRS['haproxy']}:{H2_PORT}/",
            "nginx": f"http://{ADDRS['nginx']}:{H2_PORT}/",
            "loopmesh h2→h2": f"http://{ADDRS['loopmesh']}:{H2UP_PORT}/",
            "haproxy h2→h2": f"http://{ADDRS['haproxy']}:{H2UP_PORT}/",
        }
        pids["loopmesh h2→h2"] = pids["loopmesh"]
        pids["haproxy h2→h2"] = pids["haproxy"]
        # Idle: each proxy having served one request.
        for name in ADDRS:
            urllib.request.urlopen(h1[name], timeout=5).read()
        time.sleep(1)
        idle_rss = {name: rss_mib(pids[name]) for name in ADDRS}
        # Warm-up: pools filled, caches warm.
        for name in h1:
            wrk(h1[name], 50, 2)

        rate = RATE
        if "open" in ONLY and not rate:
            calib = {name: wrk(h1[name], 50, 3)["rps"] for name in ADDRS}
            rate = int(min(calib.values()) * 0.5 / 1000) * 1000 or 1000
            print(f"open-loop rate: {rate} req/s (half the slowest proxy's {min(calib.values()):.0f} in a 3 s calibration)", file=sys.stderr)

        results = {name: {} for name in h2}

        # Sections (HTTP/1.1, HTTP/2) during which other processes took more
        # than MAX_FOREIGN of the machine are left out and run again.
        clean = {"h1": 0, "h2": 0}
        wanted = {"h1": ROUNDS if ONLY & {"rps", "c1", "open"} else 0, "h2": ROUNDS if "h2" in ONLY else 0}
        noisy = {"h1": [], "h2": []}
        shares = {"h1": [], "h2": []}
        results_all = {name: {} for name in h2}
        attempt = 0
        while any(clean[k] < wanted[k] for k in clean) and attempt < MAX_ROUNDS:
            attempt += 1
            for section in ("h1", "h2"):
                if clean[section] >= wanted[section]:
                    continue
                pending = {name: {} for name in results}

                def record(name, key, value):
                    pending[name].setdefault(key, []).append(value)

                monitor.mark()
                if section == "h1":
                    run_h1_section(h1, pids, rate, record)
                else:
                    run_h2_section(h2, pids, record)
                foreign = monitor.mark()
                for name, values in pending.items():
                    for key, v in values.items():
                        results_all[name].setdefault(key, []).extend(v)
                shares[section].append(foreign)
                if foreign > MAX_FOREIGN:
                    noisy[section].append(foreign)
                    print(f"{section} section of round {attempt}: other processes took {100 * foreign:.0f}% of the machine, left out", file=sys.stderr)
                    continue
                clean[section] += 1
                for name, values in pending.items():
                    for key, v in values.items():
                        results[name].setdefault(key, []).extend(v)
            print(f"round {attempt} done (clean: HTTP/1.1 {clean['h1']}/{wanted['h1']}, HTTP/2 {clean['h2']}/{wanted['h2']})", file=sys.stderr)

        reloads = {}
        if "reload" in ONLY:
            for name in ADDRS:
                monitor.mark()
                reloads[name] = split_under_load(setup, name)
                reloads[name]["foreign"] = monitor.mark()
            metrics = setup.loopmesh_metrics()
        else:
            metrics = ""
    finally:
        setup.stop()
    load_after = os.getloadavg()
    noise = monitor.stop()
    # A section with fewer clean rounds than asked for is reported over all
    # its rounds, and said so.
    fallback = [section for section in clean if clean[section] < wanted[section]]
    h2_keys = ("h2_rps", "h2_mean", "h2_errors", "h2_req_per_cpu_s")
    for name in results:
        for key, values in results_all[name].items():
            if ("h2" if key in h2_keys else "h1") in fallback:
                results[name][key] = values
    args = (results, idle_rss, reloads, metrics, rate, load_before, load_after, noise, noisy, attempt, shares, fallback)
    # The raw figures, so that a report can be made again from them.
    raw = os.path.join(tempfile.gettempdir(), f"loopmesh-http-bench-{os.getpid()}.json")
    with open(raw, "w") as f:
        json.dump(args, f)
    print(f"raw figures: {raw} (report(*json.load(f)) prints the tables again)", file=sys.stderr)
    report(*args)


def run_h1_section(h1, pids, rate, record):
    for name in h1:
        if "rps" in ONLY:
            before = cpu_ticks(pids[name])
            r = wrk(h1[name], 50, SECONDS)
            after = cpu_ticks(pids[name])
            user, system = ((after[i] - before[i]) / TICKS for i in (0, 1))
            cpu = user + system
            record(name, "rps50", r["rps"])
            record(name, "p99_50", r["p99"])
            record(name, "errors", r["errors"])
            if pids[name]:
                record(name, "cpu50", cpu / SECONDS)
                record(name, "req_per_cpu_s", r["requests"] / cpu if cpu > 0 else float("nan"))
                # Where a request's CPU goes: user space against the kernel
                # (the four syscalls of a proxied request cost the same to all).
                record(name, "user_us", 1e6 * user / r["requests"] if r["requests"] else float("nan"))
                record(name, "kernel_us", 1e6 * system / r["requests"] if r["requests"] else float("nan"))
                record(name, "rss_loaded", rss_mib(pids[name]))
        if "c1" in ONLY:
            r1 = wrk(h1[name], 1, max(4, SECONDS // 2))
            record(name, "p50_1", r1["p50"])
            record(name, "p99_1", r1["p99"])
            record(name, "errors", r1["errors"])
        if "open" in ONLY:
            o = oha(h1[name], max(4, SECONDS // 2), rate)
            record(name, "open_p50", o["p50"])
            record(name, "open_p99", o["p99"])
            record(name, "open_p999", o["p999"])
            record(name, "open_rps", o["rps"])
            record(name, "errors", o["errors"])


def run_h2_section(h2, pids, record):
    for name in h2:
        before = cpu_seconds(pids[name])
        r = h2load(h2[name], SECONDS)
        cpu = cpu_seconds(pids[name]) - before
        record(name, "h2_rps", r["rps"])
        record(name, "h2_mean", r["mean"])
        record(name, "h2_errors", r["errors"])
        if pids[name]:
            record(name, "h2_req_per_cpu_s", r["requests"] / cpu if cpu > 0 else float("nan"))


def split_under_load(setup, name):
    """wrk -c50 for 10 s on the split service while its split changes 100
    times at 10/s (50/50 ↔ 95/5 between v1 and v2)."""
    url = f"http://{ADDRS[name]}:{SPLIT_PORT}/"
    wrk_proc = subprocess.Popen(pinned(["wrk", "-t1", "-c50", "-d10s", "--latency", url], 0), stdout=subprocess.PIPE, text=True)
    time.sleep(0.2)
    changes = 0
    for n in range(100):
        weight = 95 if n % 2 == 0 else 50
        if name == "loopmesh":
            setup.write_split_route(weight)
        elif name == "haproxy":
            setup.write_haproxy(v1_weight=weight)
            os.kill(setup.haproxy_master, signal.SIGUSR2)
        else:
            setup.write_nginx(v1_weight=weight)
            os.kill(setup.nginx_master, signal.SIGHUP)
        changes += 1
        time.sleep(0.1)
    out = wrk_proc.communicate()[0]
    r = parse_wrk(out)
    r["changes"] = changes
    # Then check the last split holds: 95/5, 2000 requests on one keep-alive connection.
    if name == "loopmesh":
        setup.write_split_route(95)
    elif name == "haproxy":
        setup.write_haproxy(v1_weight=95)
        os.kill(setup.haproxy_master, signal.SIGUSR2)
    else:
        setup.write_nginx(v1_weight=95)
        os.kill(setup.nginx_master, signal.SIGHUP)
    time.sleep(2)
    r["v1_share"] = v1_share(ADDRS[name], SPLIT_PORT, 2000)
    return r


def v1_share(host, port, n):
    """The share of `n` requests on one keep-alive connection that v1 answered."""
    conn = http.client.HTTPConnection(host, port, timeout=5)
    v1 = 0
    for _ in range(n):
        conn.request("GET", "/")
        v1 += conn.getresponse().read().startswith(b"v1")
    conn.close()
    return v1 / n


def report(results, idle_rss, reloads, metrics, rate, load_before, load_after, noise, noisy, attempts, shares, fallback):
    names = [n for n in results if results[n]]

    def kept(name, key):
        """Values of `key` for `name`, leaving out the rounds where direct's
        figure moved more than 10% from its median."""
        values = results[name].get(key, [])
        anchor = {"rps50": "rps50", "req_per_cpu_s": "rps50", "cpu50": "rps50", "h2_rps": "h2_rps", "h2_req_per_cpu_s": "h2_rps"}.get(key)
        direct = results["direct"].get(anchor, []) if anchor else []
        if len(direct) != len(values) or len(direct) < 3:
            return values
        mid = statistics.median(direct)
        return [v for v, d in zip(values, direct) if abs(d - mid) <= 0.1 * mid]

    def med(name, key):
        v = [x for x in kept(name, key) if x == x]
        return statistics.median(v) if v else float("nan")

    def rng(name, key):
        v = kept(name, key)
        return (min(v), max(v)) if v else (float("nan"), float("nan"))

    def ratio(name, key, to):
        """Median over rounds of name/to within each round (the protocol's ratio)."""
        pairs = [(a, b) for a, b in zip(results[name].get(key, []), results[to].get(key, [])) if b and a == a and b == b]
        return statistics.median(a / b for a, b in pairs) if pairs else float("nan")

    def fmt(x, spec):
        return "—" if x != x else format(x, spec)

    layout = ("load generators + backend on cpu0, proxies on cpu1" if PIN else "unpinned") + (f", loopmesh with LD_PRELOAD={PRELOAD}" if PRELOAD else "")
    print(f"\nL7 HTTP benchmark, {ROUNDS} clean interleaved rounds of {SECONDS}s wanted ({attempts} run), layout: {layout}, one worker per proxy")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    foreign, wall, busiest = noise
    print(
        f"other processes' CPU during the run: {foreign:.1f} CPU-s over {wall:.0f} s "
        f"({100 * foreign / wall / os.cpu_count():.1f}% of the machine)"
        + (": " + ", ".join(f"{comm} {cpu:.1f}" for cpu, comm in busiest) if busiest else "")
    )
    for section in ("h1", "h2"):
        if shares[section]:
            what = "ALL rounds kept (too few clean ones)" if section in fallback else f"{len(noisy[section])} left out (over {100 * MAX_FOREIGN:.0f}%)"
            print(f"{section} sections, other processes' share of the machine per round: {', '.join(f'{100 * x:.0f}%' for x in shares[section])}; {what}")
    for key in ("rps50", "h2_rps"):
        d = results["direct"].get(key, [])
        if len(d) >= 3:
            mid = statistics.median(d)
            dropped = sum(1 for x in d if abs(x - mid) > 0.1 * mid)
            print(f"direct {key} per round: {', '.join(f'{x:.0f}' for x in d)} ({dropped} round(s) left out of medians)")
    print("Ratios are medians of the per-round ratios.\n")

    h1names = [n for n in ("direct", "loopmesh", "haproxy", "nginx") if n in names]
    if results["direct"].get("rps50") or results["direct"].get("p50_1"):
        print("HTTP/1.1 keep-alive (wrk -t1)\n")
        print("| target | req/s c=50 (range) | ×direct | ×HAProxy | p99 c=50 ms | proxy CPU (cores) | req per CPU-s | ×HAProxy | c=1 p50 / p99 ms | added c=1 p50 µs | ×HAProxy added | RSS idle / loaded MiB | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        added_h = (med("haproxy", "p50_1") - med("direct", "p50_1")) * 1000
        for name in h1names:
            lo, hi = rng(name, "rps50")
            added = (med(name, "p50_1") - med("direct", "p50_1")) * 1000
            print(
                f"| {name} | {fmt(med(name, 'rps50'), '.0f')} ({fmt(lo, '.0f')}-{fmt(hi, '.0f')}) "
                f"| {fmt(ratio(name, 'rps50', 'direct'), '.2f')} | {fmt(ratio(name, 'rps50', 'haproxy'), '.2f')} "
                f"| {fmt(med(name, 'p99_50'), '.2f')} | {fmt(med(name, 'cpu50'), '.2f')} "
                f"| {fmt(med(name, 'req_per_cpu_s'), '.0f')} | {fmt(ratio(name, 'req_per_cpu_s', 'haproxy'), '.2f')} "
                f"| {fmt(med(name, 'p50_1'), '.3f')} / {fmt(med(name, 'p99_1'), '.3f')} "
                f"| {'—' if name == 'direct' else fmt(added, '+.0f')} | {'—' if name == 'direct' else fmt(added / added_h if added_h else float('nan'), '.2f')} "
                f"| {fmt(idle_rss.get(name, float('nan')), '.1f')} / {fmt(med(name, 'rss_loaded'), '.1f')} "
                f"| {sum(results[name].get('errors', []))} |"
            )
        print("\nCPU per request at c=50, user / kernel µs (median): " + "; ".join(
            f"{n} {fmt(med(n, 'user_us'), '.1f')} / {fmt(med(n, 'kernel_us'), '.1f')}" for n in h1names if results[n].get("user_us")))
        print("\nc=1 per round, p50 ms: " + "; ".join(f"{n} {', '.join(f'{x:.3f}' for x in results[n].get('p50_1', []))}" for n in h1names))
    if results["direct"].get("open_p99"):
        print(f"\nOpen loop at {rate} req/s (oha -c50 -q {rate} --latency-correction)\n")
        print("| target | achieved req/s | p50 ms | p99 ms (range) | p99.9 ms | p99 ×HAProxy | errors |")
        print("|---|---|---|---|---|---|---|")
        for name in h1names:
            lo, hi = rng(name, "open_p99")
            print(
                f"| {name} | {fmt(med(name, 'open_rps'), '.0f')} | {fmt(med(name, 'open_p50'), '.3f')} "
                f"| {fmt(med(name, 'open_p99'), '.3f')} ({fmt(lo, '.3f')}-{fmt(hi, '.3f')}) | {fmt(med(name, 'open_p999'), '.3f')} "
                f"| {fmt(ratio(name, 'open_p99', 'haproxy'), '.2f')} | {sum(results[name].get('errors', []))} |"
            )
    if results["direct"].get("h2_rps"):
        print("\nHTTP/2 prior knowledge (h2load -t1 -c10 -m10); proxies → backend over HTTP/1.1 unless marked h2→h2\n")
        print("| target | req/s (range) | ×direct | ×HAProxy | mean latency ms | req per CPU-s | ×HAProxy | errors |")
        print("|---|---|---|---|---|---|---|---|")
        for name in [n for n in results if results[n].get("h2_rps")]:
            lo, hi = rng(name, "h2_rps")
            peer = "haproxy h2→h2" if "h2→h2" in name else "haproxy"
            print(
                f"| {name} | {fmt(med(name, 'h2_rps'), '.0f')} ({fmt(lo, '.0f')}-{fmt(hi, '.0f')}) "
                f"| {fmt(ratio(name, 'h2_rps', 'direct'), '.2f')} | {fmt(ratio(name, 'h2_rps', peer), '.2f')} "
                f"| {fmt(med(name, 'h2_mean'), '.2f')} | {fmt(med(name, 'h2_req_per_cpu_s'), '.0f')} "
                f"| {fmt(ratio(name, 'h2_req_per_cpu_s', peer), '.2f')} | {sum(results[name].get('h2_errors', []))} |"
            )
    if reloads:
        print("\nSplit changes under keep-alive load: wrk -t1 -c50 for 10 s, 100 changes at 10/s (v1 95% ↔ 50%)\n")
        print("| target | how the split changes | changes | requests | req/s | socket errors | non-2xx | v1 share after, 95/5 set | others' CPU |")
        print("|---|---|---|---|---|---|---|---|---|")
        how = {"loopmesh": "route file rewritten (static mode)", "haproxy": "config rewritten + SIGUSR2 (-W reload)", "nginx": "config rewritten + HUP"}
        for name, r in reloads.items():
            print(f"| {name} | {how[name]} | {r['changes']} | {r['requests']} | {r['rps']:.0f} | {r['socket_errors']} | {r['non2xx']} | {100 * r['v1_share']:.1f}% | {100 * r['foreign']:.0f}% |")
        wanted = ("loopmesh_http_requests_total", "loopmesh_http_retries_total", "loopmesh_http_refused_total", "loopmesh_backend_ejections_total", "loopmesh_proxy_reloads_total")
        counts = [line for line in metrics.splitlines() if line.startswith(wanted) and not line.endswith(" 0")]
        if counts:
            print("\nloopmesh /metrics at the end (non-zero counters):\n")
            for line in counts:
                print(f"    {line}")


if __name__ == "__main__":
    main()
