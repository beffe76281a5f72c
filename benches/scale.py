#!/usr/bin/env python3
"""Fleet-scale benchmark (issue 15): the real agent against a real etcd.

For each size (100, 1k and 10k services by default, 10 instances each) the
script starts an etcd of its own on 127.77.0.1 (free ports, data on tmpfs),
loads the catalog (every service pinned to an address in 127.120.0.0/16 and
up, so the script knows where each one listens; never 127.0.0.0/16), and then:

1. Starts: HAProxy and the agent interleaved, STARTS rounds. HAProxy runs the
   `haproxy.cfg` that `loopmesh render --once` renders from the same catalog
   (the shipped `haproxy.cfg.tera`; `maxconn 2000`, `nbthread 1`, as the
   open-file limit allows); start → its last frontend listening, read from
   /proc/net/tcp, so no backend is ever dialled; RSS/PSS then. The agent runs
   as operators run it (etcd store, proxy and DNS on, admin API, `log_level`
   info to a file) on a fresh state directory: start → `/ready` 200 (polled
   every 10 ms: every listener and the DNS server bound, the loaded revision
   applied) and → READY=1 on $NOTIFY_SOCKET (what systemd's Type=notify waits
   for); VmRSS, VmHWM and PSS (`/proc/<pid>/smaps_rollup`) and open fds 1 s
   after ready. The two never run at once: they bind the same addresses.
2. Write → traffic, CHANGES rounds on the last agent, each on a service
   drawn at random (seeded). Untimed preparation, one transaction: the
   service's 10 instances get `weight: 0` (no new connections) and an
   instance `probe-a` points at a live backend answering `old`; the script
   waits until the agent's log says it applied that revision (so no probe
   is ever sent on to a 10.x host; reading the log costs the agent nothing,
   while every /ready clones a view of every service), then until the
   service's address answers `old`. Timed, one transaction (one etcd
   revision): put `probe-b` pointing at a fresh backend (its own port,
   answering a fresh id) and delete `probe-a`, 50 ms after the preparation
   was applied (LOOPMESH_BENCH_ROUND_SETTLE_MS), so it finds the agent idle.
   Right after the put has answered the script connects to the service's
   address every ~1 ms (LOOPMESH_BENCH_PROBE_MS) and reads the id line
   until the fresh id answers; the figure is the time from just before the put. Then every
   new connection can only reach the new backend, and none could before.
   Untimed restore, one transaction: the 10 instances as loaded, `probe-b`
   deleted. Beside it, etcd's own put → watch event for the same
   transaction (a watch on the prefix through the gateway, in a thread of
   this script), and where the time goes, from the agent's log (`rendered
   revision N … in X ms` and the `data plane:` line after it, both
   wall-clock stamped) and the probes' own times.
3. 1000 instance value edits (weight, zone, tags, state: single puts, paced
   at ~5 ms, spread over random services); RSS after the rounds and after
   the edits, and the agent's CPU seconds per phase (`/proc/<pid>/stat`).
4. Where the memory goes: the agent again, once each with the proxy off,
   DNS off, and both off (the parts switched off are named in the table),
   memory after sync and CPU per edit over 200 edits.

Run from the repository root after `cargo build --release` (as root: it
binds many loopback addresses and raises the open-file limit):

    python3 benches/scale.py                      # unpinned
    LOOPMESH_BENCH_PIN=1 python3 benches/scale.py # etcd + this script on cpu0, agent/HAProxy on cpu1

Env: LOOPMESH_BENCH_SIZES (100,1000,10000), LOOPMESH_BENCH_INSTANCES (10),
LOOPMESH_BENCH_CHANGES (200), LOOPMESH_BENCH_EDITS (1000),
LOOPMESH_BENCH_STARTS (3), LOOPMESH_BENCH_PROBE_MS (1),
LOOPMESH_BENCH_ROUND_SETTLE_MS (50), LOOPMESH_BENCH_NET (120: service
addresses from 127.120.0.1 up; the run refuses to start if any is taken),
LOOPMESH_BENCH_TMP (/dev/shm: etcd data, state
dirs), LOOPMESH_BENCH_BIN (default: $CARGO_TARGET_DIR or ./target,
release/loopmesh), LOOPMESH_BENCH_BREAKDOWN (1; 0 skips the proxy-off /
DNS-off runs). Needs: etcd (Debian etcd-server, 3.4: the v3 JSON gateway),
haproxy.
"""

# First: benchlib loads the standard library's `http`, which benches/http.py
# (on this script's path) is named like.
from benchlib import PIN, PROCS, free_port, pid_cpu_seconds, spawn, stop_procs

import base64
import datetime
import http.client
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("LOOPMESH_BENCH_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "loopmesh")
SIZES = [int(n) for n in os.environ.get("LOOPMESH_BENCH_SIZES", "100,1000,10000").split(",") if n]
INSTANCES = int(os.environ.get("LOOPMESH_BENCH_INSTANCES", "10"))
CHANGES = int(os.environ.get("LOOPMESH_BENCH_CHANGES", "200"))
EDITS = int(os.environ.get("LOOPMESH_BENCH_EDITS", "1000"))
STARTS = max(1, int(os.environ.get("LOOPMESH_BENCH_STARTS", "3")))
TMP = os.environ.get("LOOPMESH_BENCH_TMP", "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
BREAKDOWN = os.environ.get("LOOPMESH_BENCH_BREAKDOWN", "1") != "0"
PART_EDITS = 200  # edits on each agent with parts switched off (CPU per edit)
PREFIX = "/loopmesh/"
PORT = 8080
TXN_OPS = 5000  # operations per load transaction (etcd runs with --max-txn-ops above it)
SETTLE = 1.0  # seconds between ready and reading memory
# Pause after the preparation is applied, so that the timed change finds the
# agent idle: after applying a change it still does bookkeeping over every
# service (status for the admin API), ~10 ms at 10k services.
ROUND_SETTLE = float(os.environ.get("LOOPMESH_BENCH_ROUND_SETTLE_MS", "50")) / 1000
PROBE_INTERVAL = float(os.environ.get("LOOPMESH_BENCH_PROBE_MS", "1")) / 1000
# Services get addresses from 127.NET.0.0 up (40 /16s at most).
NET = int(os.environ.get("LOOPMESH_BENCH_NET", "120"))
ETCD_IP, DNS_IP, ADMIN_IP = "127.77.0.1", "127.77.0.2", "127.77.0.3"

# Everything started (spawn() keeps the processes in PROCS), for the
# clean-up (also on failure and Ctrl-C).
DIRS = []


def cleanup():
    stop_procs(PROCS, timeout=15)
    PROCS.clear()
    for d in DIRS:
        shutil.rmtree(d, ignore_errors=True)
    DIRS.clear()


def on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def stop(proc, timeout=60):
    """SIGTERM and wait; returns seconds until it exited."""
    start = time.perf_counter()
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in PROCS:
        PROCS.remove(proc)
    return time.perf_counter() - start


def mkdtemp(tag):
    d = tempfile.mkdtemp(prefix=f"loopmesh-scale-{tag}-", dir=TMP)
    DIRS.append(d)
    return d


def b64(s):
    return base64.b64encode(s.encode()).decode()


def prefix_end(prefix):
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def name_of(i):
    return f"svc-{i:05d}"


def address_of(i):
    """Service i's pinned address: 127.NET.0.1 upwards, 250 per /24, outside 127.0.0.0/16."""
    return f"127.{NET + i // (250 * 256)}.{(i // 250) % 256}.{i % 250 + 1}"


def pool_in_use():
    """Listening sockets inside this run's address pool (127.NET.0.0 to 127.NET+39.255.255)."""
    taken = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            local, state = line.split()[1], line.split()[3]
            ip = socket.inet_ntoa(struct.pack("<I", int(local.split(":")[0], 16)))
            octets = [int(o) for o in ip.split(".")]
            if state == "0A" and octets[0] == 127 and NET <= octets[1] < NET + 40:
                taken.append(f"{ip}:{int(local.split(':')[1], 16)}")
    return taken


def host_of(i, j):
    """Instance j of service i: a 10.x host that is never dialled."""
    return f"10.{(i >> 8) & 255}.{i & 255}.{j + 1}"


def instance_value(i, j, **extra):
    return json.dumps({"host": host_of(i, j), "port": PORT, **extra}, separators=(",", ":"))


def memory(pid):
    """VmRSS, VmHWM (peak) and PSS of `pid`, MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1]) / 1024
    return {"rss": out["VmRSS"], "hwm": out["VmHWM"], "pss": out["Pss"]}


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def listening(ip, port):
    """Whether ip:port is a listening TCP socket (/proc/net/tcp; no connection made)."""
    needle = "%08X:%04X 00000000:0000 0A" % (struct.unpack("<I", socket.inet_aton(ip))[0], port)
    with open("/proc/net/tcp") as f:
        return needle in f.read()


def pct(values, p):
    v = sorted(values)
    if not v:
        return float("nan")
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


# ---------------------------------------------------------------- etcd


class Etcd:
    """A single-member etcd of our own, spoken to through its v3 JSON gateway."""

    def __init__(self):
        self.dir = mkdtemp("etcd")
        self.port = free_port(ETCD_IP)
        peer_port = free_port(ETCD_IP)
        self.url = f"http://{ETCD_IP}:{self.port}"
        peer = f"http://{ETCD_IP}:{peer_port}"
        self.log = open(os.path.join(self.dir, "etcd.log"), "w")
        self.proc = spawn([
            "etcd", "--name", "bench", "--data-dir", os.path.join(self.dir, "data"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"bench={peer}",
            "--max-txn-ops", str(TXN_OPS * 2), "--max-request-bytes", str(16 << 20),
            "--quota-backend-bytes", str(4 << 30),
            "--logger", "zap", "--log-level", "error",
        ], 0, stderr=self.log)
        self.conn = None
        deadline = time.time() + 30
        while True:
            try:
                self.call("/v3/kv/range", {"key": b64("probe")})
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"etcd did not start; see {self.dir}/etcd.log")
                time.sleep(0.05)

    def call(self, path, body):
        """POST to the gateway over a kept-alive connection; the JSON answer."""
        data = json.dumps(body)
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(ETCD_IP, self.port, timeout=60)
            try:
                self.conn.request("POST", path, data, {"Content-Type": "application/json"})
                resp = self.conn.getresponse()
                out = json.loads(resp.read() or b"{}")
                if resp.status != 200:
                    raise RuntimeError(f"etcd {path}: {resp.status} {out}")
                return out
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError

    def txn(self, puts=(), deletes=()):
        """One transaction (one revision); returns its revision."""
        ops = [{"requestPut": {"key": b64(k), "value": b64(v)}} for k, v in puts]
        ops += [{"requestDeleteRange": {"key": b64(k)}} for k in deletes]
        out = self.call("/v3/kv/txn", {"success": ops})
        return int(out["header"]["revision"])

    def put(self, key, value):
        out = self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})
        return int(out["header"]["revision"])

    def load(self, entries):
        rev = 0
        for k in range(0, len(entries), TXN_OPS):
            rev = self.txn(entries[k:k + TXN_OPS])
        return rev

    def count(self, prefix):
        out = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix)), "count_only": True})
        return int(out.get("count", 0))


class Watch(threading.Thread):
    """A watch on the prefix through the gateway: arrival time of each revision."""

    def __init__(self, etcd):
        super().__init__(daemon=True)
        self.arrived = {}
        self.cond = threading.Condition()
        self.conn = http.client.HTTPConnection(ETCD_IP, etcd.port)
        body = json.dumps({"create_request": {"key": b64(PREFIX), "range_end": b64(prefix_end(PREFIX))}})
        self.conn.request("POST", "/v3/watch", body, {"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        created = json.loads(self.resp.readline())
        if not created.get("result", {}).get("created"):
            raise RuntimeError(f"etcd watch not created: {created}")
        self.start()

    def run(self):
        try:
            while True:
                line = self.resp.readline()
                now = time.perf_counter()
                if not line:
                    return
                result = json.loads(line).get("result", {})
                if result.get("events"):
                    with self.cond:
                        self.arrived[int(result["header"]["revision"])] = now
                        self.cond.notify_all()
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            return  # closed by close() (http.client then trips over its own fp)

    def wait(self, rev, timeout=5.0):
        with self.cond:
            self.cond.wait_for(lambda: rev in self.arrived, timeout)
            return self.arrived.get(rev)

    def close(self):
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()


# ---------------------------------------------------------------- backends


class IdBackend(threading.Thread):
    """A TCP server on 127.0.0.1 that writes `<id>\\n` to every connection and closes it."""

    def __init__(self, ident):
        super().__init__(daemon=True)
        self.id = ident.encode() + b"\n"
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.start()

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.sendall(self.id)
            except OSError:
                pass
            conn.close()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def ask(addr, timeout=1.0):
    """Connect to addr:PORT and read the id line; None on any failure."""
    try:
        with socket.create_connection((addr, PORT), timeout=timeout) as s:
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(64)
                if not chunk:
                    return None
                buf += chunk
            return buf.strip().decode()
    except OSError:
        return None


def probe_until(addr, want, timeout=10.0):
    """Probe every PROBE_INTERVAL until `want` answers. Returns perf_counter
    times: when the answering probe started and answered, when the last probe
    that got another answer started (the change landed in between), and the
    counts of failed probes and other answers."""
    deadline = time.perf_counter() + timeout
    out = {"hit": None, "hit_start": None, "other_start": None, "failed": 0, "other": 0}
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        got = ask(addr)
        now = time.perf_counter()
        if got == want:
            out.update(hit=now, hit_start=start)
            return out
        if got is None:
            out["failed"] += 1
        else:
            out["other"] += 1
            out["other_start"] = start
        time.sleep(PROBE_INTERVAL)
    return out


# ---------------------------------------------------------------- agent


class Agent:
    def __init__(self, etcd, tag, proxy=True, dns=True):
        self.dir = mkdtemp(f"agent-{tag}")
        self.state = os.path.join(self.dir, "state")
        self.admin = (ADMIN_IP, free_port(ADMIN_IP))
        dns_port = free_port(DNS_IP)
        self.config = os.path.join(self.dir, "agent.yaml")
        with open(self.config, "w") as f:
            f.write(
                f"node: bench\n"
                f"store: {{prefix: {PREFIX.rstrip('/')}, etcd: {{endpoints: [{etcd.url}]}}}}\n"
                f"state_dir: {self.state}\n"
                f"dns: {{enabled: {str(dns).lower()}, listen: {DNS_IP}:{dns_port}}}\n"
                f"admin: {{listen: {self.admin[0]}:{self.admin[1]}}}\n"
                f"proxy: {{enabled: {str(proxy).lower()}}}\n"
                f"log_level: info\n"
            )
        check = subprocess.run([BIN, "check", "--config", self.config], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"loopmesh check --config {self.config} failed: {check.stdout}{check.stderr}")
        self.log_path = os.path.join(self.dir, "agent.log")
        self.proc = None

    def start(self, revision):
        """Start; wait for /ready 200 at `revision` or later. Returns seconds
        to /ready 200 (polled every 10 ms) and to READY=1 on $NOTIFY_SOCKET
        (what systemd's Type=notify waits for; exact, no polling)."""
        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        notify_path = os.path.join(self.dir, "notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        env["NOTIFY_SOCKET"] = notify_path
        self.log = open(self.log_path, "w")
        self.tail = open(self.log_path, errors="replace")
        self.tail_buf = ""
        self.applied_rev = 0
        self.last_rendered = None
        notified = None
        started = time.perf_counter()
        self.proc = spawn([BIN, "agent", "--config", self.config], 1, stderr=self.log, env=env)
        deadline = started + 300
        try:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"agent exited with {self.proc.returncode}; see {self.log_path}")
                if notified is None and select.select([notify], [], [], 0.01)[0]:
                    if b"READY=1" in notify.recv(4096):
                        notified = time.perf_counter() - started
                elif notified is not None:
                    time.sleep(0.01)
                body = self.ready()
                if body and body.get("ready") and int(body.get("revision", 0)) >= revision:
                    ready = time.perf_counter() - started
                    # READY=1 follows the publication /ready reads by a hair.
                    if notified is None and select.select([notify], [], [], 5)[0]:
                        if b"READY=1" in notify.recv(4096):
                            notified = time.perf_counter() - started
                    return ready, notified
        finally:
            notify.close()
        raise RuntimeError(f"agent not ready after 300 s; see {self.log_path}")

    def wait_applied(self, revision, timeout=30):
        """Until the agent's log says it rendered `revision` (or later) and
        then applied it to the data plane. Reads the log file only, so the
        wait costs the agent nothing (/ready builds a view of every service)."""
        deadline = time.time() + timeout
        while self.applied_rev < revision:
            chunk = self.tail.read()
            if not chunk:
                if time.time() > deadline:
                    raise RuntimeError(f"agent never applied revision {revision}; see {self.log_path}")
                time.sleep(0.001)
                continue
            self.tail_buf += chunk
            *lines, self.tail_buf = self.tail_buf.split("\n")
            for line in lines:
                m = re.search(r"INFO\s+rendered revision (\d+):", line)
                if m:
                    self.last_rendered = int(m.group(1))
                elif " INFO data plane:" in line and self.last_rendered is not None:
                    self.applied_rev = max(self.applied_rev, self.last_rendered)

    def ready(self):
        try:
            with urllib.request.urlopen(f"http://{self.admin[0]}:{self.admin[1]}/ready", timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:
            try:
                return json.loads(err.read())
            except ValueError:
                return None
        except (OSError, ValueError):
            return None

    def wait_revision(self, revision, timeout=120, interval=0.05):
        """Until /ready says `revision` (published after it is rendered and applied)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            body = self.ready()
            if body and int(body.get("revision", 0)) >= revision:
                return
            time.sleep(interval)
        raise RuntimeError(f"agent never reached revision {revision}")

    @property
    def pid(self):
        """The agent's pid (taskset execs it, so the same pid)."""
        return self.proc.pid

    def stop(self):
        took = stop(self.proc)
        self.log.close()
        self.tail.close()
        return took

    def log_times(self):
        """From the agent's log: {revision: (wall time rendered, render ms, wall time applied)}."""
        out = {}
        last = None
        stamp = lambda s: datetime.datetime.fromisoformat(s[:26] + "+00:00").timestamp()
        with open(self.log_path, errors="replace") as f:
            for line in f:
                m = re.match(r"(\S+)Z\s+INFO\s+rendered revision (\d+): .* in ([\d.]+) ms", line)
                if m:
                    last = int(m.group(2))
                    out[last] = [stamp(m.group(1)), float(m.group(3)), None]
                    continue
                m = re.match(r"(\S+)Z\s+INFO\s+data plane:", line)
                if m and last in out and out[last][2] is None:
                    out[last][2] = stamp(m.group(1))
        return out


# ---------------------------------------------------------------- HAProxy


def haproxy_config(etcd, n):
    """haproxy.cfg as the agent's shipped template renders it from the same catalog."""
    d = mkdtemp("haproxy")
    config = os.path.join(d, "render.yaml")
    with open(config, "w") as f:
        f.write(
            f"store: {{prefix: {PREFIX.rstrip('/')}, etcd: {{endpoints: [{etcd.url}]}}}}\n"
            f"state_dir: {d}/out\n"
            "dns: {enabled: false}\n"
            "templates: [{src: haproxy.cfg.tera, dest: haproxy.cfg}]\n"
        )
    run = subprocess.run([BIN, "render", "--once", "--config", config], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"render --once failed: {run.stderr}")
    path = os.path.join(d, "out", "haproxy.cfg")
    with open(path) as f:
        cfg = f.read()
    if cfg.count("\nfrontend ") != n:
        raise RuntimeError(f"{path}: expected {n} frontends")
    # 10k listeners and an open-file limit of ~20000 leave room for 2000 connections.
    cfg = cfg.replace("maxconn 20000", "maxconn 2000\n    nbthread 1")
    with open(path, "w") as f:
        f.write(cfg)
    check = subprocess.run(["haproxy", "-c", "-q", "-f", path], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy -c {path}: {check.stdout}{check.stderr}")
    return path


def haproxy_start(path, n):
    """Start HAProxy; seconds until its last frontend listens, memory then; stopped again."""
    last = address_of(n - 1)
    started = time.perf_counter()
    proc = spawn(["haproxy", "-db", "-q", "-f", path], 1)
    while not listening(last, PORT):
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {proc.returncode} on {path}")
        if time.perf_counter() - started > 120:
            raise RuntimeError("haproxy never listened on its last frontend")
        time.sleep(0.005)
    took = time.perf_counter() - started
    time.sleep(SETTLE)
    mem = memory(proc.pid)
    stop(proc)
    return took, mem


def wait_unbound(addr):
    deadline = time.time() + 60
    while listening(addr, PORT):
        if time.time() > deadline:
            raise RuntimeError(f"{addr}:{PORT} still bound")
        time.sleep(0.05)


# ---------------------------------------------------------------- one size


def edit(etcd, agent, rng, n, count):
    """`count` instance value edits (weight, zone, tags, state), single puts
    ~5 ms apart over random services; waits until the agent has them.
    Returns the agent's CPU seconds meanwhile, the seconds taken, the last revision."""
    cpu_before = pid_cpu_seconds(agent.pid)
    t = time.perf_counter()
    last_rev = 0
    for e in range(count):
        i, j = rng.randrange(n), rng.randrange(INSTANCES)
        extra = {"weight": 1 + e % 100}
        if e % 3 == 1:
            extra["zone"] = f"z{e % 4}"
        if e % 5 == 2:
            extra["tags"] = [f"t{e % 7}", "bench"]
        if e % 11 == 3:
            extra["state"] = "draining"
        last_rev = etcd.put(f"{PREFIX}instances/{name_of(i)}/i{j}", instance_value(i, j, **extra))
        time.sleep(0.005)
    agent.wait_revision(last_rev)
    return pid_cpu_seconds(agent.pid) - cpu_before, time.perf_counter() - t, last_rev


def measure(n):
    rng = random.Random(15 + n)
    r = {"n": n}
    etcd = Etcd()
    t = time.perf_counter()
    entries = []
    for i in range(n):
        entries.append((f"{PREFIX}addresses/{name_of(i)}", address_of(i)))
        entries.append((f"{PREFIX}services/{name_of(i)}", json.dumps({"port": PORT})))
        for j in range(INSTANCES):
            entries.append((f"{PREFIX}instances/{name_of(i)}/i{j}", instance_value(i, j)))
    rev = etcd.load(entries)
    r["keys"] = etcd.count(PREFIX)
    r["load_s"] = time.perf_counter() - t
    print(f"[{n}] loaded {r['keys']} keys in {r['load_s']:.1f} s (revision {rev})", file=sys.stderr)

    hcfg = haproxy_config(etcd, n)
    last_addr = address_of(n - 1)
    starts, notifies, cpu_sync, mems, hstarts, hmems = [], [], [], [], [], []
    agent = None
    for rnd in range(STARTS):
        wait_unbound(last_addr)
        took, mem = haproxy_start(hcfg, n)
        hstarts.append(took)
        hmems.append(mem)
        wait_unbound(last_addr)
        agent = Agent(etcd, f"{n}-{rnd}")
        ready, notified = agent.start(rev)
        starts.append(ready)
        notifies.append(notified)
        time.sleep(SETTLE)
        mems.append(memory(agent.pid))
        r["fds"] = fds(agent.pid)
        cpu_sync.append(pid_cpu_seconds(agent.pid))
        print(f"[{n}] start {rnd + 1}/{STARTS}: agent ready in {ready:.2f} s (READY=1 {notified or float('nan'):.2f} s), RSS {mems[-1]['rss']:.1f} MiB; "
              f"HAProxy {took:.2f} s, RSS {mem['rss']:.1f} MiB", file=sys.stderr)
        if rnd < STARTS - 1:
            agent.stop()
    r["start"], r["notify"], r["cpu_sync"] = starts, notifies, statistics.median(cpu_sync)
    r["mem_sync"], r["haproxy_start"], r["haproxy_mem"] = mems, hstarts, hmems

    # Write → traffic.
    old = IdBackend("old")
    watch = Watch(etcd)
    cpu_before = pid_cpu_seconds(agent.pid)
    rounds = []
    try:
        for k in range(CHANGES):
            i = rng.randrange(n)
            name, addr = name_of(i), address_of(i)
            inst = f"{PREFIX}instances/{name}/"
            prep = [(f"{inst}i{j}", instance_value(i, j, weight=0)) for j in range(INSTANCES)]
            prep.append((f"{inst}probe-a", json.dumps({"host": "127.0.0.1", "port": old.port})))
            # Probe only once the agent serves the preparation: before it, a
            # connection would be sent to the 10.x hosts.
            agent.wait_applied(etcd.txn(prep))
            if probe_until(addr, "old")["hit"] is None:
                raise RuntimeError(f"{name} never answered from the old backend")
            time.sleep(ROUND_SETTLE)
            fresh = IdBackend(f"new-{k}")
            value = json.dumps({"host": "127.0.0.1", "port": fresh.port})
            wall0 = time.time()
            t0 = time.perf_counter()
            rev_k = etcd.txn([(f"{inst}probe-b", value)], [f"{inst}probe-a"])
            t_put = time.perf_counter()
            probe = probe_until(addr, f"new-{k}")
            t_watch = watch.wait(rev_k)
            since = lambda t: None if t is None else t - t0
            rounds.append({
                "rev": rev_k, "wall0": wall0, "put": t_put - t0,
                "traffic": since(probe["hit"]), "hit_start": since(probe["hit_start"]),
                "old_start": since(probe["other_start"]), "watch": since(t_watch),
                "failed": probe["failed"], "old": probe["other"],
            })
            etcd.txn([(f"{inst}i{j}", instance_value(i, j)) for j in range(INSTANCES)], [f"{inst}probe-b"])
            fresh.close()
        last_rev = etcd.put(f"{PREFIX}instances/{name_of(0)}/i0", instance_value(0, 0))
        agent.wait_revision(last_rev)
    finally:
        watch.close()
        old.close()
    r["cpu_rounds"] = pid_cpu_seconds(agent.pid) - cpu_before
    time.sleep(SETTLE)
    r["mem_rounds"] = memory(agent.pid)

    # 1000 instance value edits, paced.
    r["cpu_edits"], r["edits_s"], last_rev = edit(etcd, agent, rng, n, EDITS)
    time.sleep(SETTLE)
    r["mem_edits"] = memory(agent.pid)
    r["fds_end"] = fds(agent.pid)
    r["cpu_total"] = pid_cpu_seconds(agent.pid)
    r["stop_s"] = agent.stop()

    logged = agent.log_times()
    for rd in rounds:
        got = logged.get(rd["rev"])
        if got:
            rendered, render_ms, applied = got
            rd["rendered"] = rendered - rd["wall0"]
            rd["received"] = rd["rendered"] - render_ms / 1000
            rd["render_ms"] = render_ms
            rd["applied"] = None if applied is None else applied - rd["wall0"]
    r["rounds"] = rounds
    print(f"[{n}] {CHANGES} rounds, {EDITS} edits done; RSS {r['mem_edits']['rss']:.1f} MiB", file=sys.stderr)

    # Where the memory goes: parts switched off.
    r["parts"] = {}
    if BREAKDOWN:
        for label, proxy, dns in (("proxy off", False, True), ("DNS off", True, False), ("proxy and DNS off", False, False)):
            wait_unbound(last_addr)
            a = Agent(etcd, f"{n}-{label.replace(' ', '-')}", proxy=proxy, dns=dns)
            took, _ = a.start(last_rev)
            time.sleep(SETTLE)
            r["parts"][label] = {"start": took, "mem": memory(a.pid), "fds": fds(a.pid)}
            cpu, _, last_rev = edit(etcd, a, rng, n, PART_EDITS)
            r["parts"][label]["cpu_edit"] = cpu / max(1, PART_EDITS)
            a.stop()
    stop(etcd.proc)
    return r


# ---------------------------------------------------------------- report


def ms(v):
    return v * 1000


def report(results):
    layout = "etcd + this script (probes, backends) on cpu0, agent and HAProxy on cpu1" if PIN else "unpinned"
    med = statistics.median
    print(f"\nFleet scale: {INSTANCES} instances per service, {CHANGES} write → traffic changes, "
          f"{EDITS} edits, {STARTS} interleaved starts; layout: {layout}; etcd data and state dirs in {TMP}; "
          f"probes every {PROBE_INTERVAL * 1000:g} ms, {ROUND_SETTLE * 1000:g} ms pause before each timed change\n")
    print(f"| services | keys | agent start → /ready 200 s (range) | → READY=1 s | RSS after sync MiB (PSS; peak) "
          f"| RSS after the {CHANGES} rounds / after {EDITS} edits MiB "
          "| fds after sync | write → traffic p50 / p99 ms | etcd put → watch p50 / p99 ms | HAProxy start → last frontend listening s (range) | HAProxy RSS MiB (PSS) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        traffic = [ms(x["traffic"]) for x in r["rounds"] if x["traffic"] is not None]
        watch = [ms(x["watch"]) for x in r["rounds"] if x["watch"] is not None]
        rss = med(m["rss"] for m in r["mem_sync"])
        pss = med(m["pss"] for m in r["mem_sync"])
        hwm = med(m["hwm"] for m in r["mem_sync"])
        print(
            f"| {r['n']} | {r['keys']} | {med(r['start']):.2f} ({min(r['start']):.2f}-{max(r['start']):.2f}) "
            f"| {med([x for x in r['notify'] if x is not None] or [float('nan')]):.2f} | {rss:.1f} ({pss:.1f}; {hwm:.1f}) | {r['mem_rounds']['rss']:.1f} / {r['mem_edits']['rss']:.1f} "
            f"| {r['fds']} | {pct(traffic, 50):.2f} / {pct(traffic, 99):.2f} | {pct(watch, 50):.2f} / {pct(watch, 99):.2f} "
            f"| {med(r['haproxy_start']):.2f} ({min(r['haproxy_start']):.2f}-{max(r['haproxy_start']):.2f}) | {med(m['rss'] for m in r['haproxy_mem']):.1f} ({med(m['pss'] for m in r['haproxy_mem']):.1f}) |"
        )
    print("\nWhere write → traffic goes: medians over the rounds, ms from just before the put. "
          "`agent had the event` is its render line's time less the render's own duration (agent log, wall clock); "
          f"probes start every {PROBE_INTERVAL * 1000:g} ms after the put has answered.\n")
    print("| services | put answered | gateway watch event | agent had the event | agent rendered (render ms p50 / p99) "
          "| `data plane:` log line | last probe answered old, started | first new, started | first new answered (write → traffic) "
          "| traffic p90 / max | failed probes / timeouts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rounds = r["rounds"]
        col = lambda key: [ms(x[key]) for x in rounds if x.get(key) is not None]
        renders = [x["render_ms"] for x in rounds if "render_ms" in x]
        traffic = col("traffic")
        print(
            f"| {r['n']} | {pct(col('put'), 50):.2f} | {pct(col('watch'), 50):.2f} | {pct(col('received'), 50):.2f} "
            f"| {pct(col('rendered'), 50):.2f} ({pct(renders, 50):.2f} / {pct(renders, 99):.2f}) "
            f"| {pct(col('applied'), 50):.2f} | {pct(col('old_start'), 50):.2f} | {pct(col('hit_start'), 50):.2f} "
            f"| {pct(traffic, 50):.2f} | {pct(traffic, 90):.2f} / {max(traffic or [float('nan')]):.2f} "
            f"| {sum(x['failed'] for x in rounds)} / {sum(1 for x in rounds if x['traffic'] is None)} |"
        )
    print("\nAgent CPU seconds (/proc/<pid>/stat, user + system, all threads):\n")
    print("| services | start → ready | the change rounds (3 transactions each) | per round ms | the edits | per edit ms | edits took s | whole run | fds at end | stop s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['n']} | {r['cpu_sync']:.2f} | {r['cpu_rounds']:.2f} | {ms(r['cpu_rounds']) / max(1, CHANGES):.2f} "
            f"| {r['cpu_edits']:.2f} | {ms(r['cpu_edits']) / max(1, EDITS):.2f} | {r['edits_s']:.1f} "
            f"| {r['cpu_total']:.2f} | {r['fds_end']} | {r['stop_s']:.2f} |"
        )
    if any(r["parts"] for r in results):
        print("\nWhere the memory goes: the agent after sync with parts switched off (one start each; "
              "the full agent's figure is the median above):\n")
        print(f"| services | full: RSS / PSS MiB | proxy off | DNS off | proxy and DNS off | proxy's share | DNS's share "
              f"| agent CPU ms per edit: full / proxy off / DNS off / both off ({PART_EDITS} edits each; full: the {EDITS} above) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            if not r["parts"]:
                continue
            full = med(m["rss"] for m in r["mem_sync"])
            full_pss = med(m["pss"] for m in r["mem_sync"])
            p = {k: v["mem"] for k, v in r["parts"].items()}
            cell = lambda k: f"{p[k]['rss']:.1f} / {p[k]['pss']:.1f}"
            print(
                f"| {r['n']} | {full:.1f} / {full_pss:.1f} | {cell('proxy off')} | {cell('DNS off')} | {cell('proxy and DNS off')} "
                f"| {full - p['proxy off']['rss']:.1f} | {full - p['DNS off']['rss']:.1f} "
                f"| {ms(r['cpu_edits']) / max(1, EDITS):.2f} / {ms(r['parts']['proxy off']['cpu_edit']):.2f} "
                f"/ {ms(r['parts']['DNS off']['cpu_edit']):.2f} / {ms(r['parts']['proxy and DNS off']['cpu_edit']):.2f} |"
            )


def main():
    if not os.path.exists(BIN):
        sys.exit(f"build first: cargo build --release (no {BIN})")
    for tool in ("etcd", "haproxy", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install etcd-server haproxy util-linux")
    taken = pool_in_use()
    if taken:
        sys.exit(f"{len(taken)} sockets already listen in 127.{NET}.0.0-127.{NET + 39}.255.255 "
                 f"(e.g. {taken[0]}): another run? Pick another pool with LOOPMESH_BENCH_NET.")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    if PIN:
        os.sched_setaffinity(0, {0})
    results = []
    t = time.time()
    try:
        for n in SIZES:
            results.append(measure(n))
            cleanup()
    finally:
        cleanup()
    print(f"\nbinary {BIN}; open-file limit {hard}; run took {time.time() - t:.0f} s", file=sys.stderr)
    report(results)


if __name__ == "__main__":
    main()
