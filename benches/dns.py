#!/usr/bin/env python3
"""DNS benchmark: the agent's DNS against dnsmasq and unbound, same names.

Each server answers the same service names (A records) on its own loopback
address: loopmesh `agent --static` from a zone file shaped like the rendered
one (A + SRV per service), dnsmasq from an --addn-hosts file, unbound
(1 thread) from local-data. dnsperf sends a query file with 90% existing
names and 10% NXDOMAIN, in interleaved rounds:

- max: dnsperf with 100 queries outstanding for SECONDS; queries/s, lost.
- moderate: a fixed rate (RATE q/s) with per-query latencies (dnsperf -v);
  p50 / p99.
- queries per CPU-second of the server (its /proc/<pid>/stat), the steadiest
  figure on 2 cores; RSS idle and after the run.

Run from the repository root after `cargo build --release`:
    python3 benches/dns.py                       # unpinned
    LOOPMESH_BENCH_PIN=1 python3 benches/dns.py  # dnsperf on cpu0, server on cpu1
Env: LOOPMESH_BENCH_ROUNDS (3), LOOPMESH_BENCH_SECONDS (8),
LOOPMESH_BENCH_NAMES (100,10000), LOOPMESH_BENCH_RATE (20000).
Needs: dnsperf dnsmasq unbound (apt-get install dnsperf dnsmasq unbound).
"""

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import PIN, pid_cpu_seconds, pid_rss_mib, pinned

BIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "loopmesh")
ROUNDS = int(os.environ.get("LOOPMESH_BENCH_ROUNDS", "3"))
SECONDS = int(os.environ.get("LOOPMESH_BENCH_SECONDS", "8"))
NAMES = [int(n) for n in os.environ.get("LOOPMESH_BENCH_NAMES", "100,10000").split(",")]
RATE = int(os.environ.get("LOOPMESH_BENCH_RATE", "20000"))
PORT = 5353
ADDRS = {"loopmesh": "127.211.0.1", "dnsmasq": "127.211.0.2", "unbound": "127.211.0.3"}


def address(i):
    return f"127.100.{i // 250}.{i % 250 + 1}"


def dnsperf(addr, queries, extra):
    cmd = pinned(["dnsperf", "-s", addr, "-p", str(PORT), "-d", queries, *extra], 0)
    run = subprocess.run(cmd, capture_output=True, text=True)
    if "Queries per second" not in run.stdout:
        sys.exit(f"dnsperf against {addr} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    return run.stdout


def wait_answering(addr, name):
    deadline = time.time() + 20
    while time.time() < deadline:
        out = subprocess.run(
            ["dig", f"@{addr}", "-p", str(PORT), "+short", "+time=1", "+tries=1", name, "A"],
            capture_output=True, text=True,
        ).stdout.strip()
        if out:
            return
        time.sleep(0.1)
    sys.exit(f"{addr} never answered {name}")


class Servers:
    def __init__(self, names):
        self.dir = tempfile.mkdtemp(prefix="loopmesh-dns-")
        self.procs = {}
        state = os.path.join(self.dir, "state")
        os.makedirs(state)
        with open(os.path.join(state, "mesh.zone"), "w") as f:
            f.write("$ORIGIN mesh.internal.\n$TTL 300\n")
            f.write("@ IN SOA ns.mesh.internal. hostmaster.mesh.internal. ( 1 3600 600 86400 30 )\n")
            f.write(f"@ IN NS ns.mesh.internal.\nns IN A {ADDRS['loopmesh']}\n")
            for i in range(names):
                f.write(f"svc{i} IN A {address(i)}\n_svc{i}._tcp IN SRV 0 0 8080 svc{i}.mesh.internal.\n")
        hosts = os.path.join(self.dir, "hosts")
        with open(hosts, "w") as f:
            for i in range(names):
                f.write(f"{address(i)} svc{i}.mesh.internal\n")
        unbound = os.path.join(self.dir, "unbound.conf")
        with open(unbound, "w") as f:
            f.write(f"""server:
  interface: {ADDRS['unbound']}@{PORT}
  num-threads: 1
  do-daemonize: no
  use-syslog: no
  logfile: ""
  chroot: ""
  username: ""
  directory: "{self.dir}"
  pidfile: "{self.dir}/unbound.pid"
  access-control: 127.0.0.0/8 allow
  local-zone: "mesh.internal." static
""")
            for i in range(names):
                f.write(f'  local-data: "svc{i}.mesh.internal. 300 IN A {address(i)}"\n')
        env = dict(os.environ, RUST_LOG="warn")
        self.spawn("loopmesh", [BIN, "agent", "--static", "--state-dir", state,
                                "--dns-listen", f"{ADDRS['loopmesh']}:{PORT}"], env=env)
        self.spawn("dnsmasq", ["dnsmasq", "-k", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}",
                               "--local=/mesh.internal/", f"--listen-address={ADDRS['dnsmasq']}",
                               "--bind-interfaces", f"--port={PORT}", "--pid-file=", "--user=root",
                               "--cache-size=10000", "--log-facility=-"])
        self.spawn("unbound", ["unbound", "-d", "-c", unbound])
        for name, addr in ADDRS.items():
            wait_answering(addr, "svc0.mesh.internal")
        queries = os.path.join(self.dir, "queries")
        with open(queries, "w") as f:
            for i in range(10000):
                if i % 10 == 9:
                    f.write(f"nope{i}.mesh.internal A\n")
                else:
                    f.write(f"svc{(i * 7919) % names}.mesh.internal A\n")
        self.queries = queries

    def spawn(self, name, cmd, **kw):
        self.procs[name] = subprocess.Popen(pinned(cmd, 1), stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, **kw)

    def stop(self):
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def measure(names):
    servers = Servers(names)
    results = {name: {} for name in ADDRS}

    def record(name, key, value):
        results[name].setdefault(key, []).append(value)

    try:
        for name, proc in servers.procs.items():
            record(name, "rss_idle", pid_rss_mib(proc.pid))
        # Warm-up, not recorded: lets every server (and unbound's start-up
        # work on the same CPU) settle before the first measured round.
        for addr in ADDRS.values():
            dnsperf(addr, servers.queries, ["-l", "2", "-q", "100", "-c", "4"])
        for rnd in range(ROUNDS):
            for name, addr in ADDRS.items():
                pid = servers.procs[name].pid
                before = pid_cpu_seconds(pid)
                out = dnsperf(addr, servers.queries, ["-l", str(SECONDS), "-q", "100", "-c", "4"])
                cpu = pid_cpu_seconds(pid) - before
                qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
                done = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))
                record(name, "qps", qps)
                lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))
                print(f"  round {rnd + 1} {name}: {qps:.0f} q/s, lost {lost}", file=sys.stderr)
                record(name, "lost", int(re.search(r"Queries lost:\s+(\d+)", out).group(1)))
                record(name, "per_cpu", done / max(cpu, 1e-9))
                out = dnsperf(addr, servers.queries, ["-l", str(max(3, SECONDS // 2)), "-Q", str(RATE), "-v"])
                latencies = sorted(float(m) for m in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M))
                record(name, "lost", int(re.search(r"Queries lost:\s+(\d+)", out).group(1)))
                if latencies:
                    record(name, "p50", latencies[len(latencies) // 2] * 1e3)
                    record(name, "p99", latencies[int(len(latencies) * 0.99)] * 1e3)
                record(name, "rss_loaded", pid_rss_mib(pid))
            print(f"{names} names: round {rnd + 1}/{ROUNDS} done", file=sys.stderr)
    finally:
        servers.stop()
    return results


def main():
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    for tool in ("dnsperf", "dnsmasq", "unbound", "dig", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install dnsperf dnsmasq unbound bind9-dnsutils")
    layout = "dnsperf on cpu0, server on cpu1" if PIN else "unpinned"
    for names in NAMES:
        results = measure(names)
        med = lambda n, k: statistics.median(results[n][k]) if results[n].get(k) else float("nan")
        rng = lambda n, k: (min(results[n][k]), max(results[n][k]))
        print(f"\nDNS, {names} names (90% hits, 10% NXDOMAIN), {ROUNDS} rounds of {SECONDS}s, layout: {layout}\n")
        print(f"| server | queries/s (range) | ×dnsmasq | p50 / p99 at {RATE} q/s | queries per CPU-s | lost | RSS idle / loaded MiB |")
        print("|---|---|---|---|---|---|---|")
        for name in ADDRS:
            lo, hi = rng(name, "qps")
            print(
                f"| {name} | {med(name, 'qps'):.0f} ({lo:.0f}-{hi:.0f}) | {med(name, 'qps') / med('dnsmasq', 'qps'):.2f} "
                f"| {med(name, 'p50'):.3f} / {med(name, 'p99'):.3f} ms | {med(name, 'per_cpu'):.0f} "
                f"| {sum(results[name]['lost'])} | {med(name, 'rss_idle'):.1f} / {med(name, 'rss_loaded'):.1f} |"
            )


if __name__ == "__main__":
    main()
