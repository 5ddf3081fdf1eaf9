"""Cost of the whole cluster path per request, per load balancer, against nginx round robin.

    .venv/bin/python bench/cluster_path.py [-d 8] [-c 4] [--policies ROUND_ROBIN,MAGLEV,...] [--no-nginx]
                                           [--h1] [--markdown out.md] [--json out.json]

(The cost of one pick in isolation is ``bench/lb_pick.py``.)

Three nginx backends (one nginx process, three ``server`` blocks answering ``return 200``) sit behind the
proxy, loaded with ``h2load -c C -m 1`` over h2c (closed loop, C connections, one request in flight each:
"sequential-ish"; ``--h1`` for HTTP/1.1), after a short unmeasured warm-up. Targets:

* ``microenvoy <POLICY>``: HTTP/1.1 + h2c listener -> route (``hash_policy`` on header ``x-user`` for
  RING_HASH and MAGLEV) -> cluster of the three backends (HTTP/1.1) with that ``lb_policy``;
* ``microenvoy 1 host``: the same with a single-endpoint cluster (no choice to make: the baseline);
* ``nginx round robin``: a second nginx process proxying to the same backends (``keepalive 64``).

Reported: req/s, mean latency, errors, the proxy's CPU µs per request (``/proc/PID/stat`` around the
measured run) and, for microenvoy, how the requests spread over the hosts (``/clusters`` ``rq_total``).
h2load sends the same ``x-user`` on every request, so the hash policies send everything to one host: this
measures their cost, not their spread (tests/integration/test_cluster_resilience.py checks the spread).
With ``--rounds N`` the targets are measured N times, interleaved; the table shows each target's median
round by CPU per request (the machine is noisy; CPU per request moves less than req/s).

Every child is killed when the script exits (also on Ctrl-C). Process helpers come from ``procs.py``, the
agent and nginx proxy configs from ``failover.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from failover import microenvoy_config, new_procs, nginx_proxy_config, start_http_agent  # noqa: E402
from procs import Procs, admin_get, free_port, proc_cpu_seconds  # noqa: E402

__all__ = ["main", "measure_target", "run_h2load"]

POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV")
HASHED = ("RING_HASH", "MAGLEV")
_RATE = re.compile(r"finished in [\d.]+\w+,\s+([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests:\s+(\d+) total,\s+(\d+) started,\s+(\d+) done,\s+(\d+) succeeded,\s+(\d+) failed"
)
_TIME = re.compile(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)")


# ================================================================================================ whole path
def run_h2load(url: str, args: Sequence[str], timeout: float) -> dict[str, Any]:
    exe = shutil.which("h2load")
    if exe is None:
        raise FileNotFoundError("h2load not found (Debian package nghttp2-client)")
    proc = subprocess.run([exe, *args, url], capture_output=True, text=True, timeout=timeout, check=False)
    out = proc.stdout + proc.stderr
    rq, rate = _REQUESTS.search(out), _RATE.search(out)
    if rq is None or rate is None:
        raise RuntimeError(f"cannot parse h2load output (exit {proc.returncode}):\n{out}")
    tm = _TIME.search(out)
    return {
        "done": int(rq.group(3)),
        "succeeded": int(rq.group(4)),
        "failed": int(rq.group(5)),
        "rps": float(rate.group(1)),
        "mean_latency": tm.group(3) if tm else "?",
        "output": out,
    }


def _to_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


def _host_spread(admin: str) -> str:
    totals = []
    for line in admin_get(admin, "/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "svc" and parts[2] == "rq_total":
            totals.append(int(parts[3]))
    whole = sum(totals) or 1
    return " / ".join(f"{100 * t / whole:.0f} %" for t in totals)


def measure_target(
    procs: Procs, name: str, backend_ports: Sequence[int], args: argparse.Namespace
) -> dict[str, Any]:
    admin = ""
    if name.startswith("nginx"):
        port = free_port()
        conf = nginx_proxy_config(port, backend_ports, failover=False, http2=not args.h1)
        pid = procs.start_nginx("nginx-proxy", conf, [port])
        proc_name = "nginx-proxy"
    else:
        policy = name.split(" ", 1)[1]
        if policy == "1 host":
            config = microenvoy_config(backend_ports[:1], route_extra={"timeout": "15s"})
        else:
            route_extra: dict[str, Any] = {"timeout": "15s"}
            if policy in HASHED:
                route_extra["hash_policy"] = [{"header": {"header_name": "x-user"}}]
            config = microenvoy_config(backend_ports, lb_policy=policy, route_extra=route_extra)
        pid, admin, port = start_http_agent(procs, config, args.agent_log_level)
        proc_name = "microenvoy"
    url = f"http://127.0.0.1:{port}/"
    proto = ["--h1"] if args.h1 else ["-m", "1"]  # h2c prior knowledge, one stream in flight per connection
    common = [*proto, "-c", str(args.connections), "-H", "x-user: bench-user-42"]
    try:
        run_h2load(url, [*common, "-n", str(args.warmup_requests)], 120)  # warm-up: pools, caches, tables
        cpu0, t0 = proc_cpu_seconds(pid), time.perf_counter()
        rep = run_h2load(url, [*common, "-D", str(args.duration)], args.duration + 120)
        cpu, wall = proc_cpu_seconds(pid) - cpu0, time.perf_counter() - t0
        spread = _host_spread(admin) if admin else "-"
    finally:
        procs.stop(proc_name)
    ok = rep["succeeded"]
    if not ok:
        raise RuntimeError(f"{name}: no successful request:\n{rep['output'][-1500:]}")
    return {
        "target": name,
        "rps": rep["rps"],
        "requests": rep["done"],
        "errors": rep["failed"] + (rep["done"] - ok),
        "mean_ms": _to_ms(rep["mean_latency"]),
        "proxy_cpu_us_per_req": cpu / max(1, ok) * 1e6,
        "proxy_cpu_pct": 100 * cpu / wall,
        "spread": spread,
    }


def path_table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["target"] == "microenvoy ROUND_ROBIN"), None)
    out = [
        "| target | req/s | mean ms | errors | proxy CPU µs/req | proxy CPU % | µs/req vs microenvoy RR "
        "| host spread |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rel = f"{r['proxy_cpu_us_per_req'] - base['proxy_cpu_us_per_req']:+.0f}" if base else "-"
        out.append(
            f"| {r['target']} | {r['rps']:.0f} | {r['mean_ms']:.2f} | {r['errors']} "
            f"| {r['proxy_cpu_us_per_req']:.0f} | {r['proxy_cpu_pct']:.0f} | {rel} | {r['spread']} |"
        )
    return "\n".join(out)


def backends_config(ports: Sequence[int]) -> str:
    """Three nginx ``server`` blocks answering ``return 200`` (HTTP/1.1), one per port."""
    body = 'location / { default_type text/plain; return 200 "ok\\n"; }'
    return "\n".join(f"    server {{ listen 127.0.0.1:{p}; {body} }}" for p in ports)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("-d", "--duration", type=int, default=8, help="measured seconds per target")
    p.add_argument("-c", "--connections", type=int, default=4, help="h2load connections (1 request each)")
    p.add_argument("--warmup-requests", type=int, default=2000)
    p.add_argument(
        "--h1",
        action="store_true",
        help="HTTP/1.1 downstream instead of h2c (h2load 1.52 counts a status line without reason phrase,"
        " as microenvoy sends it, as failed)",
    )
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--rounds", type=int, default=1, help="measure every target N times, interleaved")
    p.add_argument("--no-nginx", action="store_true", help="skip the nginx round-robin proxy")
    p.add_argument("--no-baseline", action="store_true", help="skip the single-host microenvoy run")
    p.add_argument("--agent-log-level", default="warning")
    p.add_argument("--markdown", help="also write the tables to this file")
    p.add_argument("--json", dest="json_out", help="write the figures to this file")
    p.add_argument("--keep-tmp", action="store_true")
    args = p.parse_args(argv)
    policies = [x.strip().upper() for x in args.policies.split(",") if x.strip()]
    for policy in policies:
        if policy not in POLICIES:
            p.error(f"unknown policy {policy!r}")
    targets = [f"microenvoy {x}" for x in policies]
    if not args.no_baseline:
        targets.insert(0, "microenvoy 1 host")
    if not args.no_nginx:
        targets.append("nginx round robin")
    procs = new_procs(args.keep_tmp)
    rows = []
    try:
        ports = [free_port() for _ in range(3)]
        procs.start_nginx("backends", backends_config(ports), ports)
        for rnd in range(args.rounds):
            for name in targets:
                print(f"round {rnd + 1}: {name} ...", flush=True)
                r = measure_target(procs, name, ports, args)
                r["round"] = rnd + 1
                rows.append(r)
                print(f"  {r['rps']:.0f} req/s, {r['proxy_cpu_us_per_req']:.0f} µs/req, errors {r['errors']}")
    finally:
        procs.close()
    load = f"h2load {'--h1' if args.h1 else 'h2c -m 1'} -c {args.connections}, {args.duration} s per target"
    medians = []
    for name in targets:
        runs = sorted((r for r in rows if r["target"] == name), key=lambda r: r["proxy_cpu_us_per_req"])
        medians.append(runs[(len(runs) - 1) // 2])
    rounds = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
    table = f"Whole cluster path ({load}{rounds}):\n\n" + path_table(medians)
    cmdline = " ".join(["bench/cluster_path.py", *(argv if argv is not None else sys.argv[1:])])
    text = f"Command: `{cmdline}`\n\n{table}\n"
    print()
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
