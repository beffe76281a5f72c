#!/usr/bin/env python3
"""Restart / upgrade benchmark (issue 15): what a client sees while the proxy
is restarted again and again under load.

Targets, each on its own loopback address, each restarted RESTARTS times per
round (one every ~INTERVAL s), interleaved over ROUNDS rounds; every target is
started fresh at the start of its turn and stopped at its end:

- `loopmesh reload`: the agent in static mode (a routes dir with the two
  services; DNS and admin on, on the target's own address, so they are
  handed over too; RUST_LOG=info to a file), `loopmesh reload --state-dir
  DIR` (the takeover: the new process
  receives every listening socket, then the old one stops accepting, drains
  and exits);
- `loopmesh stop+start`: SIGTERM, *wait for the old process to exit* (its
  drain; it holds the state directory's lock, and `systemctl restart` waits
  the same way), then start it again: the reference of what the takeover
  avoids;
- `HAProxy -W reload`: master-worker, `expose-fd listeners` on the stats
  socket (the new worker receives the listeners from the old one: the
  seamless reload), SIGUSR2 to the master, `mode tcp`;
- `nginx upgrade`: the stream module; the documented binary upgrade: SIGUSR2
  to the master (a new master starts on the inherited listeners), then
  SIGWINCH and SIGQUIT to the old master. nginx ignores SIGUSR2 in a master
  whose parent, an old master, is still alive, so before each upgrade the
  script waits until the previous old master has exited (reported as a
  wait, not as restart time);
- `nginx HUP`: `nginx -s reload` (SIGHUP: new workers, old ones quit).

nginx runs daemonized (`daemon on`: in the foreground its master ignores
SIGUSR2, its parent being the one that started it) and with `user root`
(so /proc/<worker>/fd is readable as for the others); the script is a
child subreaper, so daemons and loopmesh successors whose parent exited are
reparented to it and reaped.

Every proxy runs one worker (HAProxy nbthread 1, nginx worker_processes 1,
loopmesh proxy.workers 1), forwards to the same backends on 127.0.0.1 and
gives its open connections the same deadline after a restart, DRAIN seconds:
loopmesh proxy.drain_timeout, HAProxy hard-stop-after, nginx
worker_shutdown_timeout.

Load, all three at once during the whole phase (LEAD s before the first
restart, TAIL s after the last):
(a) keep-alive HTTP: wrk -t1 -c50 (--timeout 2s) through the proxy to an
    nginx backend that closes a connection after KEEPALIVE_REQUESTS requests
    (as nginx's own keepalive_requests does), so wrk keeps opening new
    connections through the proxy during the restarts; at L4 a proxy cannot
    end a keep-alive connection between requests, so with endless keep-alive
    no connection would ever reach a new process;
(b) churn: a client process opening a new connection per request
    (`Connection: close`), one at a time, from 8 source addresses; connect
    timeout 3 s (longer than the first SYN retransmission, so a dropped SYN
    shows up as a gap), read timeout 3 s. Errors: refused, reset, closed (the
    proxy accepted and closed without an answer), timeout. The longest gap
    is the longest time between two successful requests' ends, from the
    first restart until TAIL after the last; the baseline is the same over
    the LEAD before the first restart;
(c) one long-lived stream through the proxy to an echo backend: 4 KiB every
    5 ms, every echoed byte compared with what was sent (and SHA-256 of both
    at the end); a break is not reconnected. The stream is opened before the
    first restart and closed by the client after the phase, so it lives on
    the first process (old worker) across every later restart, up to DRAIN.

"New process serving": the time from the restart command until a process of
the new generation holds the listening socket (polled every ~1 ms in
/proc/<pid>/fd; it is the same socket across a takeover, an HAProxy seamless
reload and nginx's upgrade or HUP): loopmesh's successor once it has
received the sockets (and executed: a forked child holds its parent's
descriptors until exec), HAProxy's new worker once it has fetched them from
the old worker (the master holds none), nginx's new worker once forked (its
master holds the listeners). Each then enters its event loop within about a
millisecond. For `loopmesh stop+start`: until a connection to the service
succeeds (and, within it, SIGTERM → the old process exited). For `loopmesh
reload` also: until the `loopmesh reload` command returned (once the new
process serves and the old one stopped accepting).

Run from the repository root as root (after a release build):

    python3 benches/restart.py                        # unpinned
    LOOPMESH_BENCH_PIN=1 python3 benches/restart.py   # proxies on cpu1; load, backends, this script on cpu0

Env: LOOPMESH_BENCH_ROUNDS (3), LOOPMESH_BENCH_RESTARTS (10),
LOOPMESH_BENCH_INTERVAL (0.75 s between restart commands),
LOOPMESH_BENCH_DRAIN (15 s), LOOPMESH_BENCH_LEAD (1.5 s),
LOOPMESH_BENCH_TAIL (1 s), LOOPMESH_BENCH_KEEPALIVE_REQUESTS (100),
LOOPMESH_BENCH_TARGETS (a subset of lm-reload,lm-restart,haproxy,
nginx-upgrade,nginx-hup), LOOPMESH_BENCH_BIN (default: $CARGO_TARGET_DIR or
./target, release/loopmesh), LOOPMESH_BENCH_OUT (raw results as JSON;
default /tmp/loopmesh-restart-<time>.json), LOOPMESH_BENCH_KEEP=1 keeps the
work directory (configs and the proxies' logs).

Needs: wrk, haproxy, nginx-light, libnginx-mod-stream (Debian).
"""

import collections
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

import benchlib
from benchlib import PIN, PROCS, free_port, pinned, spawn, stop_procs, write_tcp_route

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("LOOPMESH_BENCH_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "loopmesh")
ROUNDS = int(os.environ.get("LOOPMESH_BENCH_ROUNDS", "3"))
RESTARTS = int(os.environ.get("LOOPMESH_BENCH_RESTARTS", "10"))
INTERVAL = float(os.environ.get("LOOPMESH_BENCH_INTERVAL", "0.75"))
DRAIN = int(os.environ.get("LOOPMESH_BENCH_DRAIN", "15"))
LEAD = float(os.environ.get("LOOPMESH_BENCH_LEAD", "1.5"))
TAIL = float(os.environ.get("LOOPMESH_BENCH_TAIL", "1"))
KEEPALIVE_REQUESTS = int(os.environ.get("LOOPMESH_BENCH_KEEPALIVE_REQUESTS", "100"))
KEEP = bool(os.environ.get("LOOPMESH_BENCH_KEEP"))
ALL_TARGETS = ["lm-reload", "lm-restart", "haproxy", "nginx-upgrade", "nginx-hup"]
TARGETS = [t for t in os.environ.get("LOOPMESH_BENCH_TARGETS", ",".join(ALL_TARGETS)).split(",") if t]
OUT = os.environ.get("LOOPMESH_BENCH_OUT") or f"/tmp/loopmesh-restart-{time.strftime('%Y%m%d-%H%M%S')}.json"

LABELS = {
    "lm-reload": "loopmesh reload (takeover)",
    "lm-restart": "loopmesh stop+start",
    "haproxy": "HAProxy -W reload (expose-fd)",
    "nginx-upgrade": "nginx binary upgrade",
    "nginx-hup": "nginx HUP reload",
}
# Each target on its own address (no TIME_WAIT shared between them).
ADDRS = {name: f"127.100.252.{10 + i}" for i, name in enumerate(ALL_TARGETS)}
HTTP_PORT, ECHO_PORT = 8080, 9000  # the services' ports on the proxies
CHURN_SOURCES = [f"127.0.60.{i}" for i in range(1, 9)]
IP_BIND_ADDRESS_NO_PORT = 24
CONNECT_TIMEOUT = READ_TIMEOUT = 3.0
STREAM_CHUNK, STREAM_PERIOD = 4096, 0.005
CPU_LOAD, CPU_PROXY = 0, 1

PR_SET_CHILD_SUBREAPER = 36


def now():
    return time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process


# ---------------------------------------------------------------- clients
# Run as `restart.py --churn HOST PORT`, `--stream HOST PORT`, `--echo PORT`:
# processes of their own (no GIL shared with the driver), pinned with the load.

def wait_stop_line(stop):
    sys.stdin.readline()
    stop.set()


def churn_client(host, port):
    stop = threading.Event()
    threading.Thread(target=wait_stop_line, args=(stop,), daemon=True).start()
    request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    ok, errors = [], []
    announced = False
    i = 0
    while not stop.is_set():
        start = now()
        kind = None
        stage = "connect"
        s = socket.socket()
        try:
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((CHURN_SOURCES[i % len(CHURN_SOURCES)], 0))
            i += 1
            s.settimeout(CONNECT_TIMEOUT)
            s.connect((host, port))
            stage = "read"
            s.settimeout(READ_TIMEOUT)
            s.sendall(request)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            if data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok\n"):
                ok.append(now())
                if not announced:
                    print("ready", flush=True)
                    announced = True
            else:
                kind = "closed" if not data else "bad"
        except ConnectionRefusedError:
            kind = "refused"
        except (ConnectionResetError, BrokenPipeError):
            kind = "reset"
        except socket.timeout:
            kind = "timeout"
        except OSError as err:
            kind = f"errno {err.errno}"
        finally:
            s.close()
        if kind:
            errors.append((start, now(), kind, stage))
            if kind == "refused":
                time.sleep(0.001)  # no hot loop on a closed port
    print(json.dumps({"ok": ok, "errors": errors}), flush=True)


def stream_client(host, port):
    """One connection echoing pseudo-random data; every byte checked."""
    stop = threading.Event()
    threading.Thread(target=wait_stop_line, args=(stop,), daemon=True).start()
    rng = random.Random(15)
    pending = collections.deque()  # sent chunks not yet fully echoed
    lock = threading.Lock()
    state = {"sent": 0, "received": 0, "mismatch": 0, "broken": None, "closed_clean": False}
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    sock = socket.create_connection((host, port), timeout=5)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    done_sending = threading.Event()

    def breaks(kind):
        with lock:
            if state["broken"] is None:
                state["broken"] = {"at": now(), "kind": kind}

    def receiver():
        offset = 0  # into pending[0]
        while True:
            try:
                data = sock.recv(65536)
            except OSError as err:
                breaks(f"recv: {err.__class__.__name__}")
                return
            if not data:
                with lock:
                    clean = done_sending.is_set() and not pending
                if clean:
                    state["closed_clean"] = True
                else:
                    breaks("recv: EOF")
                return
            recv_hash.update(data)
            view = memoryview(data)
            while view:
                with lock:
                    if not pending:
                        state["mismatch"] += len(view)
                        break
                    head = pending[0]
                take = min(len(view), len(head) - offset)
                if bytes(view[:take]) != head[offset:offset + take]:
                    state["mismatch"] += take
                offset += take
                view = view[take:]
                with lock:
                    state["received"] += take
                    if offset == len(head):
                        pending.popleft()
                        offset = 0

    rx = threading.Thread(target=receiver, daemon=True)
    rx.start()
    announced = False
    next_send = now()
    while not stop.is_set() and state["broken"] is None:
        chunk = rng.randbytes(STREAM_CHUNK)
        with lock:
            pending.append(chunk)
        try:
            sock.sendall(chunk)
        except OSError as err:
            breaks(f"send: {err.__class__.__name__}")
            break
        sent_hash.update(chunk)
        state["sent"] += len(chunk)
        if not announced and state["received"] > 0:
            print("ready", flush=True)
            announced = True
        next_send += STREAM_PERIOD
        time.sleep(max(0.0, next_send - now()))
    done_sending.set()
    # Wait for the echo of everything sent, then close our side and expect EOF.
    deadline = now() + 10
    while state["broken"] is None and state["received"] < state["sent"] and now() < deadline:
        time.sleep(0.01)
    if state["broken"] is None:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as err:
            breaks(f"shutdown: {err.__class__.__name__}")
        rx.join(timeout=5)
    sock.close()
    state["sha256_equal"] = state["broken"] is None and sent_hash.digest() == recv_hash.digest()
    state["intact"] = (state["broken"] is None and state["mismatch"] == 0
                       and state["received"] == state["sent"] and state["sha256_equal"]
                       and state["closed_clean"])
    print(json.dumps(state), flush=True)


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.request.sendall(data)


class EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def echo_server(port):
    with EchoServer(("127.0.0.1", port), EchoHandler) as server:
        server.serve_forever()


# ---------------------------------------------------------------- processes

# PROCS (benchlib): the Popen objects started by the driver, with spawn().
PIDS = set()  # every proxy process seen, for the clean-up


def alive(pid):
    """Running (not gone, not a zombie); reaps it if it is our zombie."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid, timeout):
    deadline = now() + timeout
    while now() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.005)
    return not alive(pid)


def kill_pids(pids, sig=signal.SIGTERM, timeout=10):
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    for pid in pids:
        if not wait_gone(pid, timeout):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_gone(pid, 5)


def reap_adopted():
    """Orphans reparented to this script (a subreaper) that have exited."""
    me = os.getpid()
    for pid in children_of(me):
        alive(pid)


def children_of(pid):
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(p) for p in f.read().split())
    except OSError:
        pass
    return kids


def holds(pid, inode):
    target = f"socket:[{inode}]"
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return True
            except OSError:
                pass
    except OSError:
        pass
    return False


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def listen_inode(addr, port):
    key = "%08X:%04X" % (struct.unpack("<I", socket.inet_aton(addr))[0], port)
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == key and fields[3] == "0A":
                return fields[9]
    return None


def wait_for(pred, timeout, step=0.001):
    deadline = now() + timeout
    while True:
        value = pred()
        if value:
            return value
        if now() >= deadline:
            return None
        time.sleep(step)


def wait_port(host, port, timeout=20.0):
    """Until host:port accepts, tried every 2 ms; now() when it did."""
    return benchlib.wait_port(host, port, timeout, step=0.002)


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- targets

class Target:
    """A proxy on `addr` forwarding HTTP_PORT to the HTTP backend and
    ECHO_PORT to the echo backend; start(), restart() -> record, stop()."""

    def __init__(self, name, bench, rnd):
        self.name = name
        self.addr = ADDRS[name]
        self.bench = bench
        self.dir = os.path.join(bench.dir, f"{name}-r{rnd}")
        os.makedirs(self.dir)
        self.log = open(os.path.join(self.dir, "stderr.log"), "wb")
        self.inode = None

    def find_inode(self):
        self.inode = listen_inode(self.addr, HTTP_PORT)

    def await_new_holder(self, parents, old, timeout=10, give_up=lambda: False, is_new=lambda pid: True):
        """First child of `parents()` not in `old` holding the listener
        (and passing `is_new`: a child forked but not yet executed holds
        its parent's descriptors)."""
        def found():
            if give_up():
                return -1
            for parent in parents():
                for kid in children_of(parent):
                    if kid not in old and holds(kid, self.inode) and is_new(kid):
                        return kid
            return None
        pid = wait_for(found, timeout)
        return None if pid in (None, -1) else pid

    def new_worker_on(self, sig):
        """`sig` to the master (HAProxy, nginx), then until a new worker of
        it holds the listener: the restart's record."""
        old = set(children_of(self.master)) | self.workers
        issued = now()
        os.kill(self.master, sig)
        new = self.await_new_holder(lambda: [self.master], old)
        serving = now() if new else None
        rec = {"issued": issued, "serving": serving, "done": serving or now(), "ok": bool(new)}
        if new:
            self.workers.add(new)
            PIDS.add(new)
        else:
            rec["note"] = "no new worker holding the listener within 10 s"
        return rec


class Loopmesh(Target):
    def __init__(self, name, bench, rnd, takeover):
        super().__init__(name, bench, rnd)
        self.takeover = takeover
        self.state = os.path.join(self.dir, "state")
        routes = os.path.join(self.state, "routes")
        os.makedirs(routes)
        for service, port, backend in (("bench-http", HTTP_PORT, bench.http_port),
                                       ("bench-echo", ECHO_PORT, bench.echo_port)):
            write_tcp_route(routes, service, self.addr, port, {"host": "127.0.0.1", "port": backend})
        self.config = os.path.join(self.dir, "agent.yaml")
        with open(self.config, "w") as f:
            f.write(f"proxy: {{workers: 1, drain_timeout: {DRAIN}s, kernel_forwarding: false}}\n")
        self.cmd = [BIN, "agent", "--config", self.config, "--static", "--state-dir", self.state,
                    "--dns-listen", f"{self.addr}:53", "--admin-listen", f"{self.addr}:9901"]
        self.env = dict(os.environ, RUST_LOG="info")

    def start(self):
        proc = spawn(self.cmd, CPU_PROXY, env=self.env, stderr=self.log)
        self.pid = proc.pid
        PIDS.add(self.pid)
        self.generations = [self.pid]
        wait_port(self.addr, HTTP_PORT)
        wait_port(self.addr, ECHO_PORT)
        self.find_inode()

    def restart(self):
        return self.reload() if self.takeover else self.stop_start()

    def reload(self):
        old = self.pid
        issued = now()
        cli = subprocess.Popen(pinned([BIN, "reload", "--state-dir", self.state], CPU_PROXY),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The successor is the old process's child, or this script's once
        # the old one has exited (a subreaper adopts it).
        known = set(self.generations) | {cli.pid}
        new = self.await_new_holder(lambda: [old, os.getpid()], known, give_up=lambda: cli.poll() is not None
                                    and cli.returncode != 0, is_new=lambda pid: b"--takeover" in cmdline(pid))
        serving = now() if new else None
        out, err = cli.communicate(timeout=60)
        returned = now()
        m = re.search(r"reloaded: pid (\d+) serves now", out)
        rec = {"issued": issued, "serving": serving, "returned": returned, "done": returned,
               "ok": cli.returncode == 0 and bool(m)}
        if rec["ok"]:
            self.pid = int(m.group(1))
            PIDS.add(self.pid)
            self.generations.append(self.pid)
            if new and new != self.pid:
                rec["note"] = f"listener first seen in pid {new}, reload named pid {self.pid}"
        else:
            rec["note"] = f"reload exit {cli.returncode}: {out.strip()} {err.strip()}"[:500]
        return rec

    def stop_start(self):
        old = self.pid
        issued = now()
        os.kill(old, signal.SIGTERM)
        exited_ok = wait_gone(old, DRAIN + 15)
        exited = now()
        proc = spawn(self.cmd, CPU_PROXY, env=self.env, stderr=self.log)
        self.pid = proc.pid
        PIDS.add(self.pid)
        self.generations.append(self.pid)
        serving = wait_port(self.addr, HTTP_PORT)
        rec = {"issued": issued, "exited": exited, "serving": serving, "done": serving, "ok": exited_ok}
        if not exited_ok:
            rec["note"] = "old process did not exit"
        return rec

    def processes(self):
        return [p for p in self.generations if alive(p)]

    def stop(self):
        kill_pids([p for p in self.generations if alive(p)], timeout=DRAIN + 15)


class HAProxy(Target):
    def start(self):
        conf = os.path.join(self.dir, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(f"""
global
    nbthread 1
    maxconn 4000
    hard-stop-after {DRAIN}s
    stats socket {self.dir}/haproxy.sock mode 600 level admin expose-fd listeners
defaults
    mode tcp
    timeout connect 1s
    timeout client 600s
    timeout server 600s
listen http
    bind {self.addr}:{HTTP_PORT}
    server b1 127.0.0.1:{self.bench.http_port}
listen echo
    bind {self.addr}:{ECHO_PORT}
    server b1 127.0.0.1:{self.bench.echo_port}
""")
        # Master-worker; the master re-executes itself on SIGUSR2 and its new
        # worker fetches the listeners from the old one (-x, automatic with
        # expose-fd listeners).
        proc = spawn(["haproxy", "-W", "-db", "-f", conf, "-S", f"{self.dir}/master.sock"], CPU_PROXY,
                     stdout=self.log, stderr=self.log)
        self.master = proc.pid
        PIDS.add(self.master)
        wait_port(self.addr, HTTP_PORT)
        wait_port(self.addr, ECHO_PORT)
        self.find_inode()
        self.workers = set(children_of(self.master))
        PIDS.update(self.workers)

    def restart(self):
        return self.new_worker_on(signal.SIGUSR2)

    def processes(self):
        return [self.master] + children_of(self.master)

    def stop(self):
        workers = set(children_of(self.master)) | self.workers
        kill_pids([self.master], timeout=10)
        kill_pids([p for p in workers if alive(p)], timeout=5)


class Nginx(Target):
    def __init__(self, name, bench, rnd, upgrade):
        super().__init__(name, bench, rnd)
        self.upgrade = upgrade
        self.pidfile = os.path.join(self.dir, "nginx.pid")

    def start(self):
        conf = os.path.join(self.dir, "nginx.conf")
        # daemon on: with daemon off nginx ignores SIGUSR2 (its parent is
        # still the one that started it). Workers run as root here, so
        # /proc/<worker>/fd is readable like the others'.
        with open(conf, "w") as f:
            f.write(f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
user root;
daemon on; worker_processes 1; pid {self.pidfile};
error_log {self.dir}/error.log notice;
worker_shutdown_timeout {DRAIN}s;
events {{ worker_connections 8000; }}
stream {{
  server {{ listen {self.addr}:{HTTP_PORT}; proxy_pass 127.0.0.1:{self.bench.http_port}; }}
  server {{ listen {self.addr}:{ECHO_PORT}; proxy_pass 127.0.0.1:{self.bench.echo_port}; }}
}}
""")
        self.conf = conf
        # An absolute path: the upgrade executes argv[0] again.
        starter = subprocess.Popen(pinned([shutil.which("nginx"), "-c", conf, "-p", self.dir], CPU_PROXY),
                                   stdout=self.log, stderr=self.log)
        starter.wait(timeout=20)
        self.master = wait_for(lambda: read_pid(self.pidfile), 20)
        PIDS.add(self.master)
        self.masters = [self.master]
        wait_port(self.addr, HTTP_PORT)
        wait_port(self.addr, ECHO_PORT)
        self.find_inode()
        self.workers = set(children_of(self.master))
        PIDS.update(self.workers)
        self.waits = []

    def restart(self):
        return self.binary_upgrade() if self.upgrade else self.hup()

    def hup(self):
        return self.new_worker_on(signal.SIGHUP)

    def binary_upgrade(self):
        old = self.master
        # nginx ignores SIGUSR2 in a master whose parent (the master it was
        # upgraded from) is still alive: wait for that one first.
        waited_from = now()
        previous = [m for m in self.masters[:-1] if alive(m)]
        for m in previous:
            wait_gone(m, DRAIN + 15)
        waited = now() - waited_from
        issued = now()
        os.kill(old, signal.SIGUSR2)
        new_master = wait_for(lambda: (lambda p: p if p and p != old else None)(read_pid(self.pidfile)), 10)
        new = None
        if new_master:
            new = self.await_new_holder(lambda: [new_master], set())
        serving = now() if new else None
        rec = {"issued": issued, "serving": serving, "waited": waited, "ok": bool(new)}
        if new:
            os.kill(old, signal.SIGWINCH)
            os.kill(old, signal.SIGQUIT)
            self.master = new_master
            self.masters.append(new_master)
            PIDS.update([new_master, new])
            self.workers.add(new)
        else:
            rec["note"] = f"no new master/worker within 10 s (pid file says {read_pid(self.pidfile)})"
        rec["done"] = now()
        return rec

    def processes(self):
        masters = [m for m in self.masters if alive(m)]
        return masters + [w for m in masters for w in children_of(m)]

    def stop(self):
        workers = set(self.workers)
        for m in self.masters:
            workers.update(children_of(m))
        kill_pids([m for m in self.masters if alive(m)], timeout=10)
        kill_pids([p for p in workers if alive(p)], timeout=5)


# ---------------------------------------------------------------- the run

class Bench:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="loopmesh-restart-")
        self.http_port = free_port()
        self.echo_port = free_port()

    def start_backends(self):
        conf = os.path.join(self.dir, "backend.conf")
        with open(conf, "w") as f:
            f.write(f"""
daemon off; worker_processes 1; pid {self.dir}/backend.pid; error_log /dev/null;
events {{ worker_connections 8000; }}
http {{ access_log off; keepalive_requests {KEEPALIVE_REQUESTS};
  server {{ listen 127.0.0.1:{self.http_port} reuseport backlog=4096; location / {{ return 200 "ok\\n"; }} }} }}
""")
        spawn(["nginx", "-c", conf, "-p", self.dir], CPU_LOAD)
        spawn([sys.executable, os.path.abspath(__file__), "--echo", str(self.echo_port)], CPU_LOAD)
        wait_port("127.0.0.1", self.http_port)
        wait_port("127.0.0.1", self.echo_port)


def client(mode, host, port):
    proc = spawn([sys.executable, os.path.abspath(__file__), mode, host, str(port)], CPU_LOAD,
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"{mode} client: {line!r}")
    return proc


def client_result(proc):
    out, _ = proc.communicate("stop\n", timeout=30)
    PROCS.remove(proc)
    return json.loads(out.strip().splitlines()[-1])


def parse_wrk(out):
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    connect, read, write, timeout = (int(x) for x in m.groups()) if m else (0, 0, 0, 0)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    req = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    return {
        "requests": int(req.group(1)) if req else 0,
        "connect": connect, "read": read, "write": write, "timeout": timeout,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "raw": out,
    }


def longest_gap(times, lo, hi):
    """Longest time between consecutive successes, over those spans that
    reach into [lo, hi] (a span still open at hi counts up to hi)."""
    best = 0.0
    for a, b in zip(times, times[1:]):
        if b >= lo and a <= hi:
            best = max(best, b - a)
    return best


def run_phase(bench, name, rnd):
    target = {
        "lm-reload": lambda: Loopmesh(name, bench, rnd, takeover=True),
        "lm-restart": lambda: Loopmesh(name, bench, rnd, takeover=False),
        "haproxy": lambda: HAProxy(name, bench, rnd),
        "nginx-upgrade": lambda: Nginx(name, bench, rnd, upgrade=True),
        "nginx-hup": lambda: Nginx(name, bench, rnd, upgrade=False),
    }[name]()
    target.start()
    loads = []
    try:
        stream = client("--stream", target.addr, ECHO_PORT)
        loads.append(stream)
        churn = client("--churn", target.addr, HTTP_PORT)
        loads.append(churn)
        wrk = spawn(["wrk", "-t1", "-c50", "-d600s", "--timeout", "2s", f"http://{target.addr}:{HTTP_PORT}/"],
                    CPU_LOAD, stdout=subprocess.PIPE, text=True)
        loads.append(wrk)
        phase_start = now()
        time.sleep(LEAD)
        restarts = []
        next_at = now()
        for _ in range(RESTARTS):
            time.sleep(max(0.0, next_at - now()))
            rec = target.restart()
            restarts.append(rec)
            next_at = max(rec["issued"] + INTERVAL, now() + 0.05)
            reap_adopted()
        time.sleep(TAIL)
        phase_end = now()
        wrk.send_signal(signal.SIGINT)
        wrk_out, _ = wrk.communicate(timeout=30)
        PROCS.remove(wrk)
        churn_r = client_result(churn)
        stream_r = client_result(stream)
        loads.clear()
        # Old generations should be gone once their connections are.
        time.sleep(0.5)
        left = target.processes()
    finally:
        for proc in loads:
            proc.kill()
            proc.wait()
            PROCS.remove(proc)
        target.stop()
        target.log.close()
        reap_adopted()

    ok = churn_r["ok"]
    first = restarts[0]["issued"]
    last = max(r["done"] for r in restarts)
    errors = collections.Counter(kind for _, _, kind, _ in churn_r["errors"])
    # Per restart: the longest gap around it (from its command to 0.3 s after it was done).
    per_restart_gap = [longest_gap(ok, r["issued"], r["done"] + 0.3) for r in restarts]
    result = {
        "target": name, "round": rnd,
        "restarts": restarts,
        "restarts_ok": sum(r["ok"] for r in restarts),
        "wrk": parse_wrk(wrk_out),
        "phase_s": phase_end - phase_start,
        "churn_ok": len(ok),
        "churn_errors": dict(errors),
        "churn_error_events": churn_r["errors"],
        "churn_errors_in_lead": sum(1 for s, _, _, _ in churn_r["errors"] if s < first),
        "gap_ms": longest_gap(ok, first, last + TAIL) * 1000,
        "baseline_gap_ms": longest_gap(ok, phase_start + 0.3, first) * 1000,
        "per_restart_gap_ms": [g * 1000 for g in per_restart_gap],
        "stream": stream_r,
        "processes_after_load": len(left),
        "stop_ms": [(r["exited"] - r["issued"]) * 1000 for r in restarts if r.get("exited")],
        "wrk_rps": float(re.search(r"Requests/sec:\s+([\d.]+)", wrk_out).group(1)) if "Requests/sec" in wrk_out else 0.0,
        "serving_ms": [(r["serving"] - r["issued"]) * 1000 for r in restarts if r.get("serving")],
        "returned_ms": [(r["returned"] - r["issued"]) * 1000 for r in restarts if r.get("returned")],
        "waited_s": [r["waited"] for r in restarts if "waited" in r],
        "stream_broken_after_first_restart_s": (
            stream_r["broken"]["at"] - first if stream_r.get("broken") else None),
    }
    if KEEP:
        result["dir"] = target.dir
    return result


def versions():
    def run(cmd):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    commit = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    return {
        "loopmesh": run([BIN, "--version"]) + f" (tree at {commit})",
        "haproxy": run(["haproxy", "-v"]),
        "nginx": run(["nginx", "-v"]),
        "wrk": run(["wrk", "--version"]),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
    }


def med_range(values, fmt="{:.0f}"):
    if not values:
        return "—"
    m = statistics.median(values)
    lo, hi = min(values), max(values)
    if lo == hi:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(lo)}-{fmt.format(hi)})"


def report(results, layout, elapsed):
    by = collections.defaultdict(list)
    for r in results:
        by[r["target"]].append(r)
    rows = [(name, by[name]) for name in TARGETS if by.get(name)]
    print(f"\nRestarts under load, {ROUNDS} interleaved rounds, {RESTARTS} restarts per target per round "
          f"(one every ≥{INTERVAL}s), drain deadline {DRAIN}s for all, backend keepalive_requests "
          f"{KEEPALIVE_REQUESTS}, layout: {layout}; run took {elapsed:.0f} s\n")
    print("What the clients saw. Medians over rounds (range); error kinds are totals over all rounds. "
          "wrk retries a refused connection at once and counts each try (as a write error).\n")
    print("| target | restarts done | keep-alive (wrk -c50): requests (req/s) | wrk errors: total per round; connect / read / write / timeout / non-2xx over all rounds | churn: connections | churn errors: refused / reset / closed / timeout | long-lived stream intact |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in rows:
        done = sum(r["restarts_ok"] for r in rs)
        kinds = ("connect", "read", "write", "timeout", "non2xx")
        wrk_tot = {k: sum(r["wrk"][k] for r in rs) for k in kinds}
        wrk_err = [sum(r["wrk"][k] for k in kinds) for r in rs]
        ce = collections.Counter()
        for r in rs:
            ce.update(r["churn_errors"])
        other = sum(v for k, v in ce.items() if k not in ("refused", "reset", "closed", "timeout"))
        churn_err = f"{ce['refused']} / {ce['reset']} / {ce['closed']} / {ce['timeout']}" + (f" (+{other} other)" if other else "")
        intact = sum(1 for r in rs if r["stream"]["intact"])
        broken = [r for r in rs if r["stream"].get("broken")]
        stream_s = f"{intact}/{len(rs)}"
        if broken:
            kinds_b = sorted(set(r["stream"]["broken"]["kind"] for r in broken))
            after = [r["stream_broken_after_first_restart_s"] for r in broken]
            stream_s += f" (cut: {', '.join(kinds_b)}, {min(after):.1f}-{max(after):.1f} s after the first restart)"
        print(
            f"| {LABELS[name]} | {done}/{RESTARTS * len(rs)} "
            f"| {med_range([r['wrk']['requests'] for r in rs])} ({med_range([r['wrk_rps'] for r in rs])}) "
            f"| {med_range(wrk_err)}; {' / '.join(str(wrk_tot[k]) for k in kinds)} "
            f"| {med_range([r['churn_ok'] for r in rs])} | {churn_err} | {stream_s} |"
        )
    print("\nHow long. Restart times are over every restart of every round: median (max); gaps are the churn "
          "client's longest time between two successful requests, median over rounds (range).\n")
    print("| target | restart → new process serving, ms | also | longest gap, ms | baseline gap before the first restart, ms | gap around each restart, ms: median (max) | proxy processes left 0.5 s after the load ended |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in rows:
        serving = [v for r in rs for v in r["serving_ms"]]
        serving_s = f"{statistics.median(serving):.1f} ({max(serving):.1f})" if serving else "—"
        also = []
        returned = [v for r in rs for v in r["returned_ms"]]
        if returned:
            also.append(f"`loopmesh reload` returned after {statistics.median(returned):.1f} ({max(returned):.1f}) ms")
        stops = [v for r in rs for v in r["stop_ms"]]
        if stops:
            also.append(f"of which SIGTERM → old process exited {statistics.median(stops):.1f} ({max(stops):.1f}) ms")
        waited = [v for r in rs for v in r["waited_s"] if v > 0.05]
        if waited:
            also.append(f"before {len(waited)} of the upgrades the previous old master had to exit first: "
                        f"waited up to {max(waited):.1f} s")
        gaps = [g for r in rs for g in r["per_restart_gap_ms"]]
        print(
            f"| {LABELS[name]} | {serving_s} | {'; '.join(also) or '—'} "
            f"| {med_range([r['gap_ms'] for r in rs], '{:.1f}')} "
            f"| {med_range([r['baseline_gap_ms'] for r in rs], '{:.1f}')} "
            f"| {statistics.median(gaps):.1f} ({max(gaps):.1f}) "
            f"| {med_range([r['processes_after_load'] for r in rs])} |"
        )
    notes = [(r["target"], r["round"], rec["note"]) for r in results for rec in r["restarts"] if rec.get("note")]
    for name, rnd, note in notes:
        print(f"\nnote: {name} round {rnd + 1}: {note}")


def main():
    if os.geteuid() != 0:
        sys.exit("run as root (nginx binds, /proc/<pid>/fd of the proxies)")
    if not os.path.exists(BIN):
        sys.exit(f"build first: cargo build --release ({BIN} missing)")
    for tool in ("wrk", "haproxy", "nginx", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install wrk haproxy nginx-light libnginx-mod-stream")
    unknown = set(TARGETS) - set(ALL_TARGETS)
    if unknown:
        sys.exit(f"unknown targets {unknown}; choose from {ALL_TARGETS}")
    # Orphans (a loopmesh successor after its parent exits, nginx's masters)
    # are reparented here, so they can be waited for and reaped.
    benchlib.libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    if PIN:
        os.sched_setaffinity(0, {CPU_LOAD})
    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(KeyboardInterrupt(f"signal {s}")))
    layout = ("pinned: proxies on cpu1; wrk, churn and stream clients, backends and this script on cpu0"
              if PIN else "unpinned")
    info = versions()
    print(json.dumps(info), file=sys.stderr)
    bench = Bench()
    results = []
    started = now()
    try:
        bench.start_backends()
        for rnd in range(ROUNDS):
            for name in TARGETS:
                r = run_phase(bench, name, rnd)
                results.append(r)
                print(f"round {rnd + 1}/{ROUNDS} {name}: restarts {r['restarts_ok']}/{RESTARTS}, "
                      f"wrk {r['wrk']['requests']} req, errors c/r/w/t {r['wrk']['connect']}/{r['wrk']['read']}/"
                      f"{r['wrk']['write']}/{r['wrk']['timeout']} non2xx {r['wrk']['non2xx']}; churn {r['churn_ok']} ok, "
                      f"errors {r['churn_errors']}; gap {r['gap_ms']:.1f} ms (baseline {r['baseline_gap_ms']:.1f}); "
                      f"stream {'intact' if r['stream']['intact'] else 'BROKEN ' + json.dumps(r['stream'].get('broken'))}; "
                      f"serving ms {[round(v, 1) for v in r['serving_ms']]}; "
                      f"processes left 0.5 s after the load: {r['processes_after_load']}", file=sys.stderr)
    finally:
        stop_procs(PROCS, timeout=10)
        kill_pids([p for p in PIDS if alive(p)], signal.SIGKILL, timeout=5)
        reap_adopted()
        if not KEEP:
            shutil.rmtree(bench.dir, ignore_errors=True)
        else:
            print(f"work directory kept: {bench.dir}", file=sys.stderr)
    elapsed = now() - started
    with open(OUT, "w") as f:
        json.dump({"versions": info, "layout": layout, "rounds": ROUNDS, "restarts": RESTARTS,
                   "interval": INTERVAL, "drain": DRAIN, "keepalive_requests": KEEPALIVE_REQUESTS,
                   "elapsed_s": elapsed, "results": results}, f, indent=1)
    print(f"raw results: {OUT}", file=sys.stderr)
    print(f"versions: {json.dumps(info)}")
    report(results, layout, elapsed)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--churn":
        churn_client(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--stream":
        stream_client(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--echo":
        echo_server(int(sys.argv[2]))
    else:
        main()
