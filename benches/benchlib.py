"""Helpers shared by the benchmark scripts in benches/ (http.py, l4.py,
l4_ab.py, mesh.py, restart.py, scale.py, dns.py).

Not a package: the scripts run as `python3 benches/NAME.py`, so this file
is found through sys.path[0] (http.py, which keeps its own directory off
the path, imports it by inserting that directory for a moment).

Import it before `urllib` or `http.client`: benches/http.py, first on the
path of every script here, would otherwise stand in for the standard
library's `http` package (which urllib needs); importing this loads the real
one first.
"""

import ctypes
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time


def _load_stdlib_http():
    """The standard library's `http` package into sys.modules, this directory
    off the path for that moment (benches/http.py is named like it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        importlib.import_module("http.client")
    finally:
        sys.path[:] = saved


_load_stdlib_http()

# LOOPMESH_BENCH_PIN, read the same way by every script: pin with taskset.
PIN = bool(os.environ.get("LOOPMESH_BENCH_PIN"))
TICKS = os.sysconf("SC_CLK_TCK")

# Processes started with spawn() (scale.py, restart.py), for their clean-up.
PROCS = []

PR_SET_PDEATHSIG = 1
libc = ctypes.CDLL(None, use_errno=True)


# ---------------------------------------------------------------- processes


def pinned(cmd, cpu):
    """`cmd` run on `cpu` (taskset, which execs it: the pid is the command's)
    when LOOPMESH_BENCH_PIN is set; `cmd` unchanged otherwise."""
    return ["taskset", "-c", str(cpu), *cmd] if PIN else cmd


def die_with_parent():
    """Child side of spawn(): SIGKILL when this script dies, even by SIGKILL."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(cmd, cpu, **kw):
    """Start `cmd` (pinned to `cpu`), output to /dev/null unless `kw` says
    otherwise, killed with this script (die_with_parent), and kept in PROCS."""
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen(pinned(cmd, cpu), preexec_fn=die_with_parent, **kw)
    PROCS.append(proc)
    return proc


def stop_procs(procs, timeout=10):
    """SIGTERM to every process of `procs` still running, then wait for each
    up to `timeout` s; one that is still there is killed (and reaped)."""
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)  # a no-op on one already reaped
        except OSError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def children(pid):
    """The pids of `pid`'s direct children (pgrep -P); [] without pgrep."""
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]
    except OSError:
        return []


# ---------------------------------------------------------------- ports


def free_port(host="127.0.0.1"):
    """A TCP port free on `host` now (bound and released at once)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host, port, timeout=20.0, step=0.02):
    """Until host:port accepts a connection, trying every `step` s; the
    time.monotonic() it did. RuntimeError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return time.monotonic()
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{host}:{port} never accepted")
        time.sleep(step)


# ---------------------------------------------------------------- /proc


def _stat_fields(pid):
    """The fields of /proc/<pid>/stat after the command name (state first)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_ticks(pids):
    """(user, system) clock ticks of `pids` (a gone process counts nothing)."""
    user = system = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
            user += int(fields[11])
            system += int(fields[12])
        except OSError:
            pass
    return user, system


def cpu_seconds(pids):
    """CPU (user + system) of `pids`, all their threads, in seconds (a gone
    process counts nothing)."""
    return sum(cpu_ticks(pids)) / TICKS


def pid_cpu_seconds(pid):
    """CPU (user + system) of one process, in seconds; OSError if it is gone."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy_ticks():
    """Clock ticks all CPUs spent busy (not idle or waiting on I/O): the
    whole cost of a request, the load generator, backend, proxy and the
    kernel's own threads (where forwarding in the kernel runs) together."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    return sum(fields[:8]) - idle - iowait


def _vmrss_mib(pid):
    """VmRSS of `pid` in MiB (0.0 without the line); OSError if it is gone."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mib(pids):
    """Summed VmRSS of `pids`, MiB (a gone process counts nothing)."""
    total = 0.0
    for pid in pids:
        try:
            total += _vmrss_mib(pid)
        except OSError:
            pass
    return total


def pid_rss_mib(pid):
    """VmRSS of one process, MiB; OSError if it is gone."""
    return _vmrss_mib(pid)


# ---------------------------------------------------------------- files


def write_atomically(path, text):
    """Write `text` to `path` through a staged file beside it and a rename,
    so that a watcher (the agent's routes dir) never reads half a file."""
    staged = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(staged, "w") as f:
        f.write(text)
    os.rename(staged, path)


def write_tcp_route(routes, name, addr, port, backend):
    """A loopmesh route file for static mode (in the `routes` dir): TCP
    service `name` on addr:port (connect timeout 1 s, idle 600 s, one retry)
    to one backend `b1`, `backend` being its JSON object (host, port, ...)."""
    route = {
        "service": name, "address": addr,
        "spec": {"port": port, "connect_timeout": "1s", "idle_timeout": "600s", "retries": 1},
        "backends": {"b1": backend},
    }
    with open(os.path.join(routes, f"{name}.json"), "w") as f:
        json.dump(route, f)


# ---------------------------------------------------------------- wrk


def parse_wrk(out, missing_percentile_nan=False):
    """wrk's output (run with --latency for p50/p99, in ms) as a dict: rps,
    p50, p99, requests, socket_errors, non2xx and errors (their sum).
    A percentile wrk did not print is NaN with `missing_percentile_nan`,
    an error (AttributeError) without."""
    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        if not m and missing_percentile_nan:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50, p99 = pct(50), pct(99)
    socket_errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        socket_errors = sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(m.group(1)) if m else 0
    return {
        "rps": rps,
        "p50": p50,
        "p99": p99,
        "socket_errors": socket_errors,
        "non2xx": non2xx,
        "errors": socket_errors + non2xx,
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
    }
