#!/usr/bin/env python3
"""L4 proxy benchmark: direct vs loopmesh vs HAProxy (mode tcp) vs nginx (stream).

Each round runs every target one after another (interleaved), so the noisy
2-core machine moves them together; the report gives medians over rounds and
ratios to direct and to HAProxy from the same rounds.

Needs: wrk, iperf3, haproxy, nginx with libnginx-mod-stream (Debian packages),
and `cargo build --release`. Run from the repository root:

    python3 benches/l4.py                 # unpinned
    LOOPMESH_BENCH_PIN=1 python3 benches/l4.py   # load + backend on cpu0, proxies on cpu1

Every proxy runs the same number of workers, one unless
LOOPMESH_BENCH_WORKERS says otherwise: HAProxy nbthread, nginx
worker_processes, loopmesh proxy.workers (event loops). Pinned, they all
share cpu1. LOOPMESH_BENCH_KERNEL=1 runs loopmesh with
proxy.kernel_forwarding (needs root).
"""

# First: benchlib loads the standard library's `http`, which benches/http.py
# (on this script's path) is named like.
from benchlib import (PIN, children, cpu_seconds, free_port, parse_wrk, pinned, rss_mib, stop_procs, wait_port,
                      write_atomically, write_tcp_route)

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROUNDS = int(os.environ.get("LOOPMESH_BENCH_ROUNDS", "3"))
SECONDS = int(os.environ.get("LOOPMESH_BENCH_SECONDS", "8"))
WORKERS = int(os.environ.get("LOOPMESH_BENCH_WORKERS", "1"))
KERNEL = bool(os.environ.get("LOOPMESH_BENCH_KERNEL"))
# A subset for quick iterations: any of rps,c1,churn,bulk,reload (default all).
ONLY = set(filter(None, os.environ.get("LOOPMESH_BENCH_ONLY", "rps,c1,churn,bulk,reload").split(",")))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Another build to compare, e.g. the previous commit's (default: this tree's release build).
BIN = os.environ.get("LOOPMESH_BENCH_BIN", os.path.join(ROOT, "target", "release", "loopmesh"))

# Each target listens on its own loopback address; backends on 127.0.0.1.
ADDRS = {"loopmesh": "127.100.250.10", "haproxy": "127.100.250.11", "nginx": "127.100.250.12"}
# Services each proxy holds besides the two measured, so that RSS is that of
# a 100-service table; they point at the HTTP backend and stay idle.
IDLE_SERVICES = 98


def idle_addrs(target):
    """The loopback addresses of `target`'s idle services (port 8080)."""
    net = 101 + list(ADDRS).index(target)
    return [f"127.{net}.{i // 250}.{i % 250 + 1}" for i in range(IDLE_SERVICES)]


def write_route(routes, name, addr, port, backend_port):
    """A loopmesh route file: `name` on addr:port to one backend on 127.0.0.1."""
    write_tcp_route(routes, name, addr, port, {"host": "127.0.0.1", "port": backend_port})


def write_agent_config(path, workers, kernel=False, max_open=None):
    """An agent config; `max_open`: proxy.kernel_forwarding_max_open (None: the default)."""
    settings = f"workers: {workers}, kernel_forwarding: {'true' if kernel else 'false'}"
    if max_open is not None:
        settings += f", kernel_forwarding_max_open: {max_open}"
    with open(path, "w") as f:
        f.write(f"proxy: {{{settings}}}\n")


class Setup:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="loopmesh-l4-")
        self.procs = []
        self.http_port = free_port()
        self.iperf_port = free_port()
        self.svc_port = 8080
        self.iperf_svc_port = 5201

    def spawn(self, cmd, cpu, **kw):
        proc = subprocess.Popen(pinned(cmd, cpu), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        self.procs.append(proc)
        return proc

    def start_backends(self):
        conf = os.path.join(self.dir, "backend.conf")
        with open(conf, "w") as f:
            f.write(f"""
daemon off; worker_processes 1; pid {self.dir}/backend.pid; error_log /dev/null;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{self.http_port} reuseport backlog=4096; location / {{ return 200 "ok\\n"; }} }} }}
""")
        self.spawn(["nginx", "-c", conf, "-p", self.dir], 0)
        self.spawn(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.iperf_port)], 0)
        wait_port("127.0.0.1", self.http_port)
        wait_port("127.0.0.1", self.iperf_port)

    def start_loopmesh(self):
        routes = os.path.join(self.dir, "state", "routes")
        os.makedirs(routes)
        for name, port, backend in (("bench-http", self.svc_port, self.http_port), ("bench-iperf", self.iperf_svc_port, self.iperf_port)):
            write_route(routes, name, ADDRS["loopmesh"], port, backend)
        for i, addr in enumerate(idle_addrs("loopmesh")):
            write_route(routes, f"idle-{i}", addr, 8080, self.http_port)
        self.routes = routes
        env = dict(os.environ, RUST_LOG="warn")
        config = os.path.join(self.dir, "agent.yaml")
        write_agent_config(config, WORKERS, KERNEL)
        cmd = [BIN, "agent", "--config", config, "--static", "--state-dir", os.path.join(self.dir, "state")]
        proc = self.spawn(cmd, 1, env=env)
        wait_port(ADDRS["loopmesh"], self.svc_port)
        return [proc.pid]

    def write_haproxy(self, weight=1):
        conf = os.path.join(self.dir, "haproxy.cfg")
        a = ADDRS["haproxy"]
        with open(conf + ".tmp", "w") as f:
            f.write(f"""
global
    nbthread {WORKERS}
    maxconn 4000
    stats socket {self.dir}/haproxy.sock mode 600 level admin expose-fd listeners
defaults
    mode tcp
    timeout connect 1s
    timeout client 600s
    timeout server 600s
listen http
    bind {a}:{self.svc_port}
    server b1 127.0.0.1:{self.http_port} weight {weight}
listen iperf
    bind {a}:{self.iperf_svc_port}
    server b1 127.0.0.1:{self.iperf_port}
""")
            for i, addr in enumerate(idle_addrs("haproxy")):
                f.write(f"listen idle-{i}\n    bind {addr}:8080\n    server b1 127.0.0.1:{self.http_port}\n")
        os.rename(conf + ".tmp", conf)
        return conf

    def start_haproxy(self):
        conf = self.write_haproxy()
        # Master-worker, so reloads (SIGUSR2) hand the listeners over seamlessly.
        proc = self.spawn(["haproxy", "-W", "-db", "-f", conf], 1)
        self.haproxy_master = proc.pid
        wait_port(ADDRS["haproxy"], self.svc_port)
        time.sleep(0.2)
        return [proc.pid] + children(proc.pid)

    def write_nginx(self, weight=1):
        conf = os.path.join(self.dir, "nginx-stream.conf")
        a = ADDRS["nginx"]
        with open(conf + ".tmp", "w") as f:
            f.write(f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off; worker_processes {WORKERS}; pid {self.dir}/stream.pid; error_log /dev/null;
events {{ worker_connections 8000; }}
stream {{
  upstream http_backend {{ server 127.0.0.1:{self.http_port} weight={weight}; }}
  server {{ listen {a}:{self.svc_port}; proxy_pass http_backend; }}
  server {{ listen {a}:{self.iperf_svc_port}; proxy_pass 127.0.0.1:{self.iperf_port}; }}
""")
            for addr in idle_addrs("nginx"):
                f.write(f"  server {{ listen {addr}:8080; proxy_pass http_backend; }}\n")
            f.write("}\n")
        os.rename(conf + ".tmp", conf)
        return conf

    def start_nginx(self):
        conf = self.write_nginx()
        proc = self.spawn(["nginx", "-c", conf, "-p", self.dir], 1)
        self.nginx_master = proc.pid
        wait_port(ADDRS["nginx"], self.svc_port)
        time.sleep(0.2)  # let the master fork its worker before we read its pid
        return [proc.pid] + children(proc.pid)

    def stop(self):
        stop_procs(self.procs)
        shutil.rmtree(self.dir, ignore_errors=True)


def wrk(url, conns, seconds, extra=()):
    cmd = pinned(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", *extra, url], 0)
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    r = parse_wrk(out)
    return {key: r[key] for key in ("rps", "p50", "p99", "errors", "requests")}


def iperf(host, port, seconds, streams):
    cmd = pinned(["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"], 0)
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def main():
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    for tool in ("wrk", "iperf3", "haproxy", "nginx", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install wrk iperf3 haproxy nginx-light libnginx-mod-stream")
    setup = Setup()
    try:
        setup.start_backends()
        pids = {
            "direct": [],
            "loopmesh": setup.start_loopmesh(),
            "haproxy": setup.start_haproxy(),
            "nginx": setup.start_nginx(),
        }
        # Idle: 100 services, each proxy having served one request.
        for name in ADDRS:
            urllib.request.urlopen(f"http://{ADDRS[name]}:{setup.svc_port}/", timeout=5).read()
        time.sleep(1)
        idle_rss = {name: rss_mib(p) for name, p in pids.items() if p}
        target = {
            "direct": ("127.0.0.1", setup.http_port, setup.iperf_port),
            **{name: (ADDRS[name], setup.svc_port, setup.iperf_svc_port) for name in ADDRS},
        }
        results = {name: {} for name in target}

        def record(name, key, value):
            results[name].setdefault(key, []).append(value)

        for rnd in range(ROUNDS):
            for name, (host, port, iport) in target.items():
                url = f"http://{host}:{port}/"
                if "rps" in ONLY:
                    before = cpu_seconds(pids[name])
                    r = wrk(url, 50, SECONDS)
                    cpu = cpu_seconds(pids[name]) - before
                    record(name, "rps50", r["rps"])
                    record(name, "p99_50", r["p99"])
                    record(name, "errors", r["errors"])
                    # A proxy forwarding in the kernel is charged next to nothing.
                    if pids[name] and cpu >= 0.1:
                        record(name, "req_per_cpu_s", r["requests"] / cpu)
                        record(name, "rss_loaded", rss_mib(pids[name]))
                if "c1" in ONLY:
                    r1 = wrk(url, 1, max(3, SECONDS // 2))
                    record(name, "p50_1", r1["p50"])
                    record(name, "p99_1", r1["p99"])
                if "churn" in ONLY:
                    churn = wrk(url, 20, max(3, SECONDS // 2), ("-H", "Connection: close"))
                    record(name, "churn", churn["rps"])
                    record(name, "errors", churn["errors"])
                if "bulk" in ONLY:
                    record(name, "bulk1", iperf(host, iport, max(3, SECONDS // 2), 1))
                    record(name, "bulk4", iperf(host, iport, max(3, SECONDS // 2), 4))
            print(f"round {rnd + 1}/{ROUNDS} done", file=sys.stderr)

        # Reload under load: 100 real table changes at 10/s, keep-alive and churn.
        reloads = {}
        for name in ("loopmesh", "haproxy", "nginx") if "reload" in ONLY else ():
            for mode, extra in (("keep-alive", ()), ("churn", ("-H", "Connection: close"))):
                reloads[(name, mode)] = reload_under_load(setup, name, target[name], extra)
    finally:
        setup.stop()

    med = lambda name, key: statistics.median(results[name][key]) if results[name].get(key) else float("nan")
    rng = lambda name, key: (min(results[name][key]), max(results[name][key])) if results[name].get(key) else (0, 0)

    def ratio(name, key, to):
        """Median over rounds of name/to within each round (the protocol's ratio)."""
        pairs = list(zip(results[name].get(key, []), results[to].get(key, [])))
        return statistics.median(a / b for a, b in pairs) if pairs else float("nan")

    layout = ("load generator + backends on cpu0, proxy on cpu1" if PIN else "unpinned") + f", {WORKERS} worker(s) per proxy" + (", loopmesh forwarding in the kernel" if KERNEL else "")
    print(f"\nL4 benchmark, {ROUNDS} interleaved rounds of {SECONDS}s, layout: {layout}\n")
    print("Ratios are medians of the per-round ratios.\n")
    print("| target | req/s c=50 (range) | ×direct | ×HAProxy | p99 c=50 ms | c=1 p50 / p99 ms | added c=1 p50 µs | conn/s (close) | ×HAProxy | bulk 1 / 4 streams Gb/s | bulk 1 ×direct | req per CPU-s | ×HAProxy | RSS idle / loaded MiB | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in target:
        lo, hi = rng(name, "rps50")
        added = (med(name, "p50_1") - med("direct", "p50_1")) * 1000
        rpc = med(name, "req_per_cpu_s")
        print(
            f"| {name} | {med(name, 'rps50'):.0f} ({lo:.0f}-{hi:.0f}) | {ratio(name, 'rps50', 'direct'):.2f} "
            f"| {ratio(name, 'rps50', 'haproxy'):.2f} | {med(name, 'p99_50'):.2f} "
            f"| {med(name, 'p50_1'):.3f} / {med(name, 'p99_1'):.3f} | {added:+.0f} | {med(name, 'churn'):.0f} "
            f"| {ratio(name, 'churn', 'haproxy'):.2f} | {med(name, 'bulk1'):.1f} / {med(name, 'bulk4'):.1f} "
            f"| {ratio(name, 'bulk1', 'direct'):.2f} | {'—' if rpc != rpc else f'{rpc:.0f}'} "
            f"| {ratio(name, 'req_per_cpu_s', 'haproxy'):.2f} "
            f"| {idle_rss.get(name, 0):.1f} / {med(name, 'rss_loaded') if name != 'direct' else 0:.1f} | {sum(results[name].get('errors', []))} |"
        )
    print("\nReload under load: wrk for 10 s while the table changes 100 times (10/s)\n")
    print("| target | load | requests | req/s | socket errors | non-2xx |")
    print("|---|---|---|---|---|---|")
    for (name, mode), r in reloads.items():
        print(f"| {name} | {mode} | {r['requests']} | {r['rps']:.0f} | {r['socket_errors']} | {r['non2xx']} |")


def reload_under_load(setup, name, target, extra):
    """wrk for 10 s while `name`'s table changes 100 times at 10/s."""
    host, port, _ = target
    conns = "-c20" if extra else "-c50"
    wrk_proc = subprocess.Popen(
        pinned(["wrk", "-t1", conns, "-d10s", *extra, f"http://{host}:{port}/"], 0), stdout=subprocess.PIPE, text=True
    )
    time.sleep(0.2)
    for n in range(100):
        # A real change each time: weights move (and for loopmesh, the backend set).
        if name == "loopmesh":
            path = os.path.join(setup.routes, "bench-http.json")
            route = json.load(open(path))
            route["backends"] = {
                "b1": {"host": "127.0.0.1", "port": setup.http_port, "weight": 1 + n % 7},
                **({"b2": {"host": "127.0.0.1", "port": setup.http_port}} if n % 2 else {}),
            }
            write_atomically(path, json.dumps(route))
        elif name == "haproxy":
            setup.write_haproxy(weight=1 + n % 7)
            os.kill(setup.haproxy_master, signal.SIGUSR2)
        else:
            setup.write_nginx(weight=1 + n % 7)
            os.kill(setup.nginx_master, signal.SIGHUP)
        time.sleep(0.1)
    out = wrk_proc.communicate()[0]
    # Without --latency: no percentiles.
    r = parse_wrk(out, missing_percentile_nan=True)
    return {key: r[key] for key in ("requests", "rps", "socket_errors", "non2xx")}


if __name__ == "__main__":
    main()
