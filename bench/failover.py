"""Failover benchmark: one of three upstreams is SIGKILLed in the middle of a closed-loop run.

    .venv/bin/python bench/failover.py [-d 10] [--kill-at 5] [-c 16] [--targets microenvoy,nginx]
                                       [--rounds 1] [--markdown out.md] [--json out.json]

Three counting upstreams (``tests/integration/peers/counting_upstream.py``, HTTP/1.1) sit behind the proxy:

* ``microenvoy``: HTTP/1.1 listener -> router with ``retry_policy`` (``connect-failure,reset,5xx``, 3
  retries, Envoy's 25 ms backoff) -> ROUND_ROBIN cluster with ``outlier_detection`` (``consecutive_5xx`` 3,
  ``interval`` 1 s, ``base_ejection_time`` 30 s, ``max_ejection_percent`` 50) and
  ``circuit_breakers.max_retries`` 100 (Envoy's default of 3 concurrent retries would fail the burst of
  retries at the kill);
* ``nginx`` (single process): ``upstream`` with ``max_fails=1 fail_timeout=30s``, ``keepalive``,
  ``proxy_next_upstream error timeout http_502 http_503`` (its passive failover, the closest equivalent).

The load generator lives in this process (asyncio, uvloop): ``-c`` HTTP/1.1 keep-alive connections, each
sending its next GET as soon as the previous answer arrived, recording per request its start time, latency
and outcome (status, or a transport error). At ``--kill-at`` seconds upstream ``b`` gets SIGKILL (it stays
dead). Reported per target: requests, req/s, client-visible errors (anything but 200), p50/p99 of the whole
run, and p99/max/request count in the window [kill, kill + ``--window``] (2 s by default). For microenvoy the
retry and ejection counters are read from the admin ``/stats``.

Every child is killed when the script exits (also on Ctrl-C, and through PR_SET_PDEATHSIG if it is killed).
Process helpers come from ``bench/procs.py``; ``bench/cluster_path.py`` imports the configs from here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from procs import (  # noqa: E402
    Procs,
    admin_get,
    agent_config,
    agent_hcm,
    free_port,
    listener_ports,
    proc_cpu_seconds,
    wait_for,
)

UPSTREAM_SCRIPT = ROOT / "tests" / "integration" / "peers" / "counting_upstream.py"

__all__ = [
    "LoadResult",
    "admin_stats",
    "main",
    "microenvoy_config",
    "new_procs",
    "nginx_proxy_config",
    "percentile",
    "run_h1_load",
    "start_http_agent",
    "start_upstream",
]


# ================================================================================================ processes
def new_procs(keep_tmp: bool) -> Procs:
    """The registry for one run of this script or ``cluster_path.py``."""
    return Procs(prefix="microenvoy-cluster-bench-", keep_tmp=keep_tmp)


def start_upstream(procs: Procs, ident: str) -> int:
    """A counting upstream ``ident`` on a free port; returns the port."""
    port_file = procs.tmp / f"upstream-{ident}.port"
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(UPSTREAM_SCRIPT), "--id", ident, "--port-file", str(port_file)]
    proc = procs.spawn(f"upstream-{ident}", cmd)
    wait_for(port_file.exists, 15, f"upstream {ident}", proc)
    return int(port_file.read_text())


def start_http_agent(
    procs: Procs, config: dict[str, Any], log_level: str = "warning"
) -> tuple[int, str, int]:
    """The agent on ``config``, ready; returns (pid, admin address, port of listener ``http``)."""
    proc, admin = procs.start_agent(config, log_level, wait_ready=True)
    return proc.pid, admin, listener_ports(admin)["http"]


def admin_stats(admin: str, prefix: str) -> dict[str, int]:
    doc = json.loads(admin_get(admin, "/stats?format=json"))
    return {s["name"]: int(s["value"]) for s in doc.get("stats", []) if s.get("name", "").startswith(prefix)}


# ================================================================================================ configs
def microenvoy_config(
    upstream_ports: Sequence[int],
    *,
    lb_policy: str = "ROUND_ROBIN",
    route_extra: dict[str, Any] | None = None,
    cluster_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Agent config: HTTP/1.1 + h2c listener ``http`` -> route ``/`` -> cluster ``svc`` (HTTP/1.1)."""
    hcm = agent_hcm(stat_prefix="bench", codec_type="AUTO", route={"cluster": "svc", **(route_extra or {})})
    listener = {
        "name": "http",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [hcm]}],
    }
    return agent_config(listener, "svc", upstream_ports, lb_policy=lb_policy, **(cluster_extra or {}))


FAILOVER_ROUTE = {
    "timeout": "15s",
    "retry_policy": {"retry_on": "connect-failure,reset,5xx", "num_retries": 3},
}
FAILOVER_CLUSTER = {
    "outlier_detection": {
        "consecutive_5xx": 3,
        "interval": "1s",
        "base_ejection_time": "30s",
        "max_ejection_percent": 50,
    },
    "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_retries": 100}]},
}


def nginx_proxy_config(
    port: int, upstream_ports: Sequence[int], *, balance: str = "", failover: bool = True, http2: bool = False
) -> str:
    """``http {}`` body: a proxy on ``port`` (h2c with ``http2``) to ``upstream_ports`` over HTTP/1.1
    (round robin unless ``balance`` is set, e.g. ``least_conn;``)."""
    fails = " max_fails=1 fail_timeout=30s" if failover else " max_fails=0"
    servers = "\n".join(f"        server 127.0.0.1:{p}{fails};" for p in upstream_ports)
    next_upstream = "error timeout http_502 http_503" if failover else "off"
    return f"""
    upstream backends {{
        {balance}
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port}{" http2" if http2 else ""} backlog=4096;
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 1s;
            proxy_next_upstream {next_upstream};
            proxy_next_upstream_tries 4;
        }}
    }}
"""


# ================================================================================================ load
@dataclass
class LoadResult:
    """Every request of one run: start (s since the run began), latency (s), status (0: transport error)."""

    starts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    duration: float = 0.0
    t0: float = 0.0
    """``time.perf_counter()`` at the start."""

    def __repr__(self) -> str:
        n, e = len(self.statuses), len(self.errors)
        return f"<LoadResult requests={n} errors={e} duration={self.duration:.1f}>"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


async def _h1_client(
    port: int,
    path: str,
    t0: float,
    stop_at: float,
    res: LoadResult,
    headers: Callable[[int], bytes],
    n: int,
) -> None:
    clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution
    i = 0
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while clock() < stop_at:
        start = clock()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert reader is not None
            i += 1
            writer.write(
                b"GET %s?c=%d&i=%d HTTP/1.1\r\nhost: bench\r\n%s\r\n" % (path.encode(), n, i, headers(i))
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            status = int(head[9:12])
            length, chunked, close = 0, False, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and b"close" in value.lower():
                    close = True
            if chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            elif length:
                await reader.readexactly(length)
            if close:
                writer.close()
                writer = None
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ValueError,
        ) as exc:
            status = 0
            res.errors.append(f"{start - t0:.3f}s client {n}: {type(exc).__name__}: {exc}")
            if writer is not None:
                writer.close()
            writer = None
        end = clock()
        res.starts.append(start - t0)
        res.latencies.append(end - start)
        res.statuses.append(status)
        if status != 200 and status != 0:
            res.errors.append(f"{start - t0:.3f}s client {n}: status {status}")
    if writer is not None:
        writer.close()


async def run_h1_load(
    port: int,
    *,
    connections: int,
    duration: float,
    path: str = "/work",
    events: Sequence[tuple[float, Callable[[], None]]] = (),
    headers: Callable[[int], bytes] = lambda i: b"",
) -> LoadResult:
    """Closed-loop HTTP/1.1 load; ``events`` are ``(seconds after start, callback)`` run on the loop."""
    loop = asyncio.get_running_loop()
    res = LoadResult()
    t0 = res.t0 = time.perf_counter()
    for at, callback in events:
        loop.call_later(at, callback)
    await asyncio.gather(
        *(_h1_client(port, path, t0, t0 + duration, res, headers, n) for n in range(connections))
    )
    res.duration = time.perf_counter() - t0
    return res


# ================================================================================================ failover
def run_failover(target: str, args: argparse.Namespace) -> dict[str, Any]:
    procs = new_procs(args.keep_tmp)
    try:
        ups = [start_upstream(procs, i) for i in ("a", "b", "c")]
        admin = ""
        if target == "microenvoy":
            config = microenvoy_config(ups, route_extra=FAILOVER_ROUTE, cluster_extra=FAILOVER_CLUSTER)
            pid, admin, port = start_http_agent(procs, config, args.agent_log_level)
        else:
            port = free_port()
            pid = procs.start_nginx("nginx", nginx_proxy_config(port, ups), [port])
        killed_at: list[float] = []

        def kill() -> None:
            procs.kill("upstream-b")
            killed_at.append(time.perf_counter())

        cpu0 = proc_cpu_seconds(pid)
        load = run_h1_load(
            port, connections=args.connections, duration=args.duration, events=[(args.kill_at, kill)]
        )
        res: LoadResult = _run_loop(load)
        cpu = proc_cpu_seconds(pid) - cpu0
        stats = admin_stats(admin, "cluster.svc.") if admin else {}
    finally:
        procs.close()
    w0 = (killed_at[0] - res.t0) if killed_at else args.kill_at
    w1 = w0 + args.window
    window = [lat for s, lat in zip(res.starts, res.latencies, strict=True) if w0 <= s < w1]
    ok = sum(1 for s in res.statuses if s == 200)
    return {
        "target": target,
        "requests": len(res.statuses),
        "ok": ok,
        "errors": len(res.statuses) - ok,
        "error_samples": res.errors[:10],
        "rps": ok / res.duration,
        "p50_ms": percentile(res.latencies, 50) * 1000,
        "p99_ms": percentile(res.latencies, 99) * 1000,
        "max_ms": max(res.latencies, default=float("nan")) * 1000,
        "window_requests": len(window),
        "window_p99_ms": percentile(window, 99) * 1000,
        "window_max_ms": max(window, default=float("nan")) * 1000,
        "proxy_cpu_us_per_req": cpu / max(1, ok) * 1e6,
        "retries": stats.get("cluster.svc.upstream_rq_retry"),
        "ejections": stats.get("cluster.svc.outlier_detection.ejections_enforced_total"),
    }


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    w = f"[kill, kill+{args.window:g} s]"
    out = [
        f"| proxy | requests | req/s | client errors | p50 ms | p99 ms | max ms | requests in {w} "
        f"| p99 ms in {w} | max ms in {w} | proxy CPU µs/req | retries | ejections |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['target']} | {r['requests']} | {r['rps']:.0f} | {r['errors']} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {r['max_ms']:.1f} | {r['window_requests']} | {r['window_p99_ms']:.2f} "
            f"| {r['window_max_ms']:.1f} | {r['proxy_cpu_us_per_req']:.0f} "
            f"| {_dash(r['retries'])} | {_dash(r['ejections'])} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("-d", "--duration", type=float, default=10.0, help="seconds of load per target")
    p.add_argument("--kill-at", type=float, default=5.0, help="SIGKILL upstream b this many seconds in")
    p.add_argument("--window", type=float, default=2.0, help="the failover window after the kill, seconds")
    p.add_argument("-c", "--connections", type=int, default=16, help="concurrent HTTP/1.1 connections")
    p.add_argument("--targets", default="microenvoy,nginx", help="comma-separated: microenvoy, nginx")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--agent-log-level", default="warning")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--json", dest="json_out", help="write every round's figures to this file")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    if args.kill_at >= args.duration:
        p.error("--kill-at must be inside the run")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        if t not in ("microenvoy", "nginx"):
            p.error(f"unknown target {t!r}")
    if "nginx" in targets and not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        print("nginx not found: measuring microenvoy only", file=sys.stderr)
        targets.remove("nginx")
    rows: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        for t in targets:
            print(f"round {rnd + 1}: {t} ...", flush=True)
            row = run_failover(t, args)
            row["round"] = rnd + 1
            rows.append(row)
            print(
                f"  {row['requests']} requests, {row['errors']} errors,"
                f" p99 in window {row['window_p99_ms']:.1f} ms"
            )
            for sample in row["error_samples"]:
                print(f"    {sample}")
    table = markdown(rows, args)
    cmdline = " ".join(["bench/failover.py", *(argv if argv is not None else sys.argv[1:])])
    print()
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(f"Command: `{cmdline}`\n\n{table}\n")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    errors = sum(r["errors"] for r in rows if r["target"] == "microenvoy")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
