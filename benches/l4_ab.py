#!/usr/bin/env python3
"""A/B of loopmesh builds or settings beside HAProxy and a direct connection.

The full `l4.py` run takes minutes per layout; a change to the data path is
judged faster and on more rounds here: every variant serves the same nginx
backend on its own loopback address, and each round runs wrk against direct,
HAProxy (nbthread 1) and every variant in turn (interleaved). Reports medians
of requests/s, requests per CPU-second of the proxy, and the share of that CPU
spent in user space, with ratios to HAProxy from the same rounds, and the
latency each adds to direct (p50, per round).

    python3 benches/l4_ab.py new=target/release/loopmesh old=/tmp/loopmesh-old
    python3 benches/l4_ab.py one=target/release/loopmesh:workers=1 two=target/release/loopmesh:workers=2

A variant is `name=binary[:workers=N][,kernel=1][,max_open=N][,ENV=value...]`
(kernel=1: proxy.kernel_forwarding, needs root; max_open:
proxy.kernel_forwarding_max_open). Environment:
LOOPMESH_BENCH_PIN=1 (wrk + backend on cpu0, proxies on cpu1),
LOOPMESH_AB_ROUNDS (7), LOOPMESH_AB_SECONDS (4), LOOPMESH_AB_CONNS (50),
LOOPMESH_AB_CLOSE=1 (Connection: close, i.e. connection churn),
LOOPMESH_AB_FLOOR=1 (also the floor: benches/floor_relay.c, a blocking
thread-per-direction relay in C, the least a user-space hop can cost).
"""

import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import l4  # noqa: E402  (the setup, wrk, route and agent config)
from benchlib import PIN, TICKS, cpu_ticks, machine_busy_ticks, wait_port  # noqa: E402

ROUNDS = int(os.environ.get("LOOPMESH_AB_ROUNDS", "7"))
SECONDS = int(os.environ.get("LOOPMESH_AB_SECONDS", "4"))
CONNS = int(os.environ.get("LOOPMESH_AB_CONNS", "50"))
EXTRA = ("-H", "Connection: close") if os.environ.get("LOOPMESH_AB_CLOSE") else ()
FLOOR = bool(os.environ.get("LOOPMESH_AB_FLOOR"))


def start_variant(setup, index, spec):
    name, _, rest = spec.partition("=")
    binary, _, options = rest.partition(":")
    if not name or not os.path.exists(binary):
        sys.exit(f"bad variant {spec!r}: give name=binary[:workers=N][,kernel=1][,max_open=N][,ENV=value...]")
    home = os.path.join(setup.dir, f"variant-{index}")
    routes = os.path.join(home, "state", "routes")
    os.makedirs(routes)
    env = dict(os.environ, RUST_LOG="warn")
    workers, kernel, max_open = 1, False, None
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key == "workers":
            workers = int(value)
        elif key == "kernel":
            kernel = value == "1"
        elif key == "max_open":
            max_open = int(value)
        else:
            env[key] = value
    config = os.path.join(home, "agent.yaml")
    l4.write_agent_config(config, workers, kernel, max_open)
    addr = f"127.100.252.{10 + index}"
    l4.write_route(routes, "bench-http", addr, 8080, setup.http_port)
    cmd = [binary, "agent", "--config", config, "--static", "--state-dir", os.path.join(home, "state"),
           "--admin-listen", f"{addr}:9901", "--dns-listen", f"{addr}:5353"]
    proc = setup.spawn(cmd, 1, env=env)
    wait_port(addr, 8080)
    return name, (f"{addr}:8080", [proc.pid])


def start_floor(setup):
    """Builds and starts benches/floor_relay.c on the proxies' cpu."""
    binary = os.path.join(setup.dir, "floor_relay")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor_relay.c")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", binary, source], check=True)
    addr = "127.100.252.99"
    proc = setup.spawn([binary, addr, "8080", "127.0.0.1", str(setup.http_port)], 1)
    wait_port(addr, 8080)
    return f"{addr}:8080", [proc.pid]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    setup = l4.Setup()
    try:
        setup.start_backends()
        targets = {
            "direct": (f"127.0.0.1:{setup.http_port}", []),
            "haproxy": (f"{l4.ADDRS['haproxy']}:{setup.svc_port}", setup.start_haproxy()),
        }
        if FLOOR:
            targets["floor-relay"] = start_floor(setup)
        for index, spec in enumerate(sys.argv[1:]):
            name, target = start_variant(setup, index, spec)
            targets[name] = target
        results = {name: {"rps": [], "per_cpu": [], "user": [], "p50": [], "machine": []} for name in targets}
        for rnd in range(ROUNDS):
            for name, (addr, pids) in targets.items():
                before, busy = cpu_ticks(pids), machine_busy_ticks()
                run = l4.wrk(f"http://{addr}/", CONNS, SECONDS, EXTRA)
                busy = machine_busy_ticks() - busy
                user, system = (a - b for a, b in zip(cpu_ticks(pids), before))
                result = results[name]
                result["rps"].append(run["rps"])
                result["p50"].append(run["p50"])
                result["machine"].append(busy / TICKS / max(run["requests"], 1) * 1e6)
                # A proxy forwarding in the kernel spends next to nothing itself.
                if pids and user + system >= 10:
                    result["per_cpu"].append(run["requests"] / max((user + system) / TICKS, 1e-9))
                    result["user"].append(user / max(user + system, 1))
            print(f"round {rnd + 1}/{ROUNDS} done", file=sys.stderr)
        layout = "wrk + backend on cpu0, proxies on cpu1" if PIN else "unpinned"
        print(f"\n{ROUNDS} interleaved rounds of {SECONDS}s, c={CONNS}{' (close)' if EXTRA else ''}, {layout}\n")
        print("| target | req/s | ×HAProxy | req per CPU-s | ×HAProxy | user share | machine CPU µs/req | p50 ms | added p50 µs |")
        print("|---|---|---|---|---|---|---|---|---|")
        ha = results["haproxy"]
        for name, r in results.items():
            rps_ratio = statistics.median(a / b for a, b in zip(r["rps"], ha["rps"]))
            cpu = f"{statistics.median(r['per_cpu']):.0f}" if r["per_cpu"] else "—"
            cpu_ratio = (
                f"{statistics.median(a / b for a, b in zip(r['per_cpu'], ha['per_cpu'])):.3f}" if r["per_cpu"] else "—"
            )
            user = f"{statistics.median(r['user']):.3f}" if r["user"] else "—"
            # Per round, against direct in the same round.
            added = statistics.median((a - b) * 1000 for a, b in zip(r["p50"], results["direct"]["p50"]))
            machine = statistics.median(r["machine"])
            print(f"| {name} | {statistics.median(r['rps']):.0f} | {rps_ratio:.3f} | {cpu} | {cpu_ratio} | {user} | {machine:.1f} | "
                  f"{statistics.median(r['p50']):.3f} | {added:+.0f} |")
    finally:
        setup.stop()


if __name__ == "__main__":
    main()
