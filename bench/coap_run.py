"""The CoAP benchmark in one run: a bare aiocoap server and microenvoy CoAP -> HTTP/2 -> nginx, side by side.

    .venv/bin/python bench/coap_run.py [-d 10] [-w 2] [-c 16] [--sockets 4] [--rounds 3] [--markdown out.md]
    .venv/bin/python bench/coap_run.py --memory [-n 1000000] [--sample-every 100000] --targets microenvoy
    .venv/bin/python bench/coap_run.py --memory --requests 300000 --targets aiocoap

Targets (``--targets``, default both):

* ``aiocoap``: ``bench/coap_bare.py`` in its own process (aiocoap 0.4.x, ``udp6`` transport, one
  ``resource.Site`` resource answering GET with 3 bytes): the limit;
* ``microenvoy``: the agent (``python -m microenvoy run``) with a UDP listener whose filter chain is
  ``microenvoy.filters.network.coap_proxy``, one route (prefix ``/``) to a cluster of one nginx endpoint
  speaking h2c; nginx (one process) answers every request 200 with ``ok\\n`` (``microenvoy_coap_config``).

Default mode: every target is started afresh for each round, probed (one GET), loaded with ``coapload.py``
(``--concurrency`` confirmable GETs in flight over ``--sockets`` sockets for ``--warmup`` + ``--duration``
seconds) and stopped. The table shows req/s, latency p50/p99, the server's CPU µs per request (and nginx's
for microenvoy), the server's RSS before and after the load, and microenvoy / aiocoap (issue goal: >= 60 %).

``--memory``: each target gets ``--requests`` requests (default 1,000,000) in one go while the generator
samples the server's VmRSS (``/proc/PID/status``) every ``--sample-every`` requests; the series is printed,
and the growth between the first sample at or after 100k requests and the end is checked against the goal
(flat within 10 %).

Everything binds 127.0.0.1; the ports are picked free (bind port 0, close, reuse). Every child is killed
when this script exits, also on Ctrl-C or an error (PR_SET_PDEATHSIG, see ``procs.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import coapload  # noqa: E402
from mqttload import proc_rss_kib  # noqa: E402
from procs import (  # noqa: E402
    Procs,
    agent_config,
    die_with_parent,
    free_port,
    interrupt,
    machine_info,
    positive,
    wait_for,
)

__all__ = ["TARGETS", "Bench", "main", "markdown_memory", "markdown_table", "microenvoy_coap_config"]

COAP_LISTENER = "coap"
PATH = "/bench"


def microenvoy_coap_config(*, coap_port: int, nginx_port: int) -> dict[str, Any]:
    """The agent bootstrap: admin on 127.0.0.1 port 0, the CoAP listener on 127.0.0.1:``coap_port`` (UDP),
    one coap_proxy route (prefix ``/``, timeout 5 s) to the cluster ``nginx`` (h2c on ``nginx_port``)."""
    coap = {
        "@type": "type.googleapis.com/microenvoy.extensions.filters.network.coap_proxy.v1.CoapProxy",
        "stat_prefix": "coap",
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "nginx", "timeout": "5s"}}],
    }
    listener = {
        "name": COAP_LISTENER,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": coap_port, "protocol": "UDP"}},
        "filter_chains": [
            {"filters": [{"name": "microenvoy.filters.network.coap_proxy", "typed_config": coap}]}
        ],
    }
    h2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return agent_config(listener, "nginx", [nginx_port], typed_extension_protocol_options=h2)


@dataclass(frozen=True, slots=True)
class Target:
    """A CoAP server to measure."""

    name: str
    """``--targets`` name."""
    label: str
    """Row label in the tables."""
    start: Callable[[Bench], tuple[int, int]]
    """Start it; (pid of the server process, CoAP port)."""
    nginx: bool = False
    """Needs the nginx h2c upstream."""


def _start_aiocoap(bench: Bench) -> tuple[int, int]:
    args = [sys.executable, str(HERE / "coap_bare.py"), "--port", "0", "--path", PATH.strip("/")]
    args += bench.args.bare_arg
    proc = bench.spawn("server", args)
    bench.server_log = "server"
    log = bench.tmp / "server.log"
    found: dict[str, Any] = {}

    def listening() -> bool:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"listening"' in line:
                found.update(json.loads(line))
                return True
        return False

    wait_for(listening, 20, "coap_bare.py", proc)
    return proc.pid, int(found["port"])


def _start_microenvoy(bench: Bench) -> tuple[int, int]:
    port = free_port(udp=True)
    config = microenvoy_coap_config(coap_port=port, nginx_port=bench.nginx_port)
    proc, _admin = bench.start_agent(config, bench.args.agent_log_level)
    bench.procs["server"] = bench.procs.pop("microenvoy")  # the runner stops "server"
    bench.server_log = "microenvoy"
    return proc.pid, port


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("aiocoap", "bare aiocoap (limit)", _start_aiocoap),
        Target("microenvoy", "microenvoy CoAP → h2c nginx", _start_microenvoy, nginx=True),
    )
}


class Bench(Procs):
    """One benchmark run: a temp dir, the child processes (``Procs``), the arguments."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(prefix="microenvoy-coap-bench-", keep_tmp=args.keep_tmp, append_logs=False)
        self.args = args
        self.server_log = "server"

    def probe(self, port: int) -> dict[str, Any]:
        """Wait (bounded) until one GET through the server is answered."""
        return self.probe_until(
            lambda: asyncio.run(coapload.probe("127.0.0.1", port, PATH, 2.0)), f"CoAP port {port}"
        )

    def load(self, port: int, extra: list[str], timeout: float) -> dict[str, Any]:
        a = self.args
        cmd = [sys.executable, str(HERE / "coapload.py"), f"127.0.0.1:{port}", "--path", PATH,
               "-c", str(a.concurrency), "--sockets", str(a.sockets), "--json", *extra]  # fmt: skip
        # Registered: on Ctrl-C or an error close() terminates it. Its stderr (progress, errors) is ours.
        self.procs["coapload"] = proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, preexec_fn=die_with_parent
        )
        stdout, _ = proc.communicate(timeout=timeout)
        self.procs.pop("coapload")
        if not stdout.strip():
            raise RuntimeError(f"coapload failed with exit code {proc.returncode} (its stderr is above)")
        rep: dict[str, Any] = json.loads(stdout)
        return rep

    def measure(self, target: Target) -> dict[str, Any]:
        """Start ``target`` afresh, probe it, load it for the window, stop it; the report."""
        a = self.args
        try:
            pid, port = target.start(self)
            probe = self.probe(port)
            rss0 = proc_rss_kib(pid)
            extra = ["-d", str(a.duration), "-w", str(a.warmup), "--watch-pid", f"server={pid}"]
            if target.nginx:
                extra += ["--watch-pid", f"nginx={self.procs['nginx'].pid}"]
            rep = self.load(port, extra, a.warmup + a.duration + 120)
            if self.procs["server"].poll() is not None:
                raise RuntimeError(f"{target.name} died: {self.log_tail(self.server_log)}")
            rep.update(probe=probe, rss_start_kib=rss0, rss_end_kib=proc_rss_kib(pid))
            return rep
        finally:
            self.stop("server")

    def memory(self, target: Target) -> dict[str, Any]:
        """``--requests`` requests at full speed, the server's RSS sampled every ``--sample-every``."""
        a = self.args
        try:
            pid, port = target.start(self)
            self.probe(port)
            extra = ["--requests", str(a.requests), "--rss-pid", str(pid), "--rss-every", str(a.sample_every),
                     "--progress", "--watch-pid", f"server={pid}"]  # fmt: skip
            rep = self.load(port, extra, a.requests / 100 + 600)
            if self.procs["server"].poll() is not None:
                raise RuntimeError(f"{target.name} died: {self.log_tail(self.server_log)}")
            return rep
        finally:
            self.stop("server")


def _f(v: Any, fmt: str = ".0f") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return format(v, fmt)


def _median(reps: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(reps, key=lambda r: r["rate"])[(len(reps) - 1) // 2]


def markdown_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Throughput/latency/CPU/RSS per target (the median round) and the microenvoy / aiocoap ratio."""
    rows = [
        "| target | req/s | p50 ms | p99 ms | errors | retransmissions | server CPU µs/req "
        "| nginx CPU µs/req | generator CPU % | RSS before MiB | RSS after MiB | vs bare aiocoap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = _median(results["aiocoap"])["rate"] if results.get("aiocoap") else None
    for name, reps in results.items():
        r = _median(reps)
        srv, ngx = r["watched"].get("server", {}), r["watched"].get("nginx")
        ratio = f"{r['rate'] / base * 100:.0f} %" if base else "-"
        rows.append(
            f"| {TARGETS[name].label} | {_f(r['rate'])} | {_f(r['latency_ms']['p50'], '.2f')}"
            f" | {_f(r['latency_ms']['p99'], '.2f')} | {r['errors']} | {r['retransmissions']}"
            f" | {_f(srv.get('cpu_us_per_req'), '.0f')} | {_f(ngx['cpu_us_per_req'], '.0f') if ngx else '-'}"
            f" | {_f(r['generator']['cpu_pct'])} | {r['rss_start_kib'] / 1024:.1f}"
            f" | {r['rss_end_kib'] / 1024:.1f} | {ratio} |"
        )
    out = "\n".join(rows)
    rounds = max(len(v) for v in results.values())
    if rounds > 1:
        out += "\n\nreq/s of every round (the table shows the median round):\n\n"
        out += "| target | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " |\n"
        out += "|---|" + "---:|" * rounds + "\n"
        out += "\n".join(
            f"| {TARGETS[n].label} | " + " | ".join(_f(r["rate"]) for r in reps) + " |"
            for n, reps in results.items()
        )
    return out


def memory_verdict(rep: dict[str, Any], at: int = 100000) -> tuple[int, int, float] | None:
    """(RSS KiB at the first sample >= ``at`` requests, RSS KiB at the end, growth in %), if sampled."""
    series = [s for s in rep["rss_series"] if s["requests"] >= at and s["rss_kib"] > 0]
    if len(series) < 2:
        return None
    first, last = series[0]["rss_kib"], series[-1]["rss_kib"]
    return first, last, (last - first) / first * 100


def markdown_memory(results: dict[str, dict[str, Any]]) -> str:
    """The RSS series of every target and the flatness verdict."""
    samples = sorted({s["requests"] for r in results.values() for s in r["rss_series"]})
    rows = [
        "| target | req/s | errors | " + " | ".join(f"{n // 1000}k" for n in samples) + " | 100k → end |",
        "|---|---:|---:|" + "---:|" * len(samples) + "---:|",
    ]
    for name, r in results.items():
        by_n = {s["requests"]: s["rss_kib"] for s in r["rss_series"]}
        cells = [f"{by_n[n] / 1024:.1f}" if n in by_n else "-" for n in samples]
        v = memory_verdict(r)
        verdict = f"{v[2]:+.1f} %" if v else "-"
        rows.append(
            f"| {TARGETS[name].label} | {_f(r['rate'])} | {r['errors']} | "
            + " | ".join(cells)
            + f" | {verdict} |"
        )
    return "RSS in MiB after N requests:\n\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--duration", type=positive(float), default=10.0, help="measured seconds")
    p.add_argument("-w", "--warmup", type=float, default=2.0, help="warm-up seconds")
    p.add_argument("-c", "--concurrency", type=positive(int), default=16, help="requests in flight")
    p.add_argument("--sockets", type=positive(int), default=4, help="client UDP sockets")
    p.add_argument(
        "--rounds", type=positive(int), default=1, help="measure N times; the table shows the median"
    )
    p.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated subset of " + ",".join(TARGETS)
    )
    p.add_argument("--memory", action="store_true", help="the memory run instead of the throughput run")
    p.add_argument("-n", "--requests", type=positive(int), default=1000000, help="--memory: requests")
    p.add_argument("--sample-every", type=positive(int), default=100000, help="--memory: RSS sample period")
    p.add_argument(
        "--bare-arg", action="append", default=[], help="extra argument for coap_bare.py (repeatable)"
    )
    p.add_argument("--agent-log-level", default="warning")
    p.add_argument("--markdown", help="also write the tables (with machine info) to this file")
    p.add_argument("--json", dest="json_out", help="write every raw report to this file")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(targets) - set(TARGETS):
        p.error(f"unknown targets: {sorted(unknown)}")
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    info = machine_info(("uvloop", "aiocoap"), {"nginx": [shutil.which("nginx") or "/usr/sbin/nginx", "-v"]})
    cmdline = " ".join(
        [".venv/bin/python", "bench/coap_run.py", *(argv if argv is not None else sys.argv[1:])]
    )
    print(f"$ {cmdline}")
    for k, v in info.items():
        print(f"  {k:<14} {v}")
    bench = Bench(args)
    print(f"  tmp            {bench.tmp}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {}
    memory: dict[str, dict[str, Any]] = {}
    try:
        if any(TARGETS[t].nginx for t in targets):
            print(f"  nginx: pid {bench.start_nginx_h2c()}, h2c port {bench.nginx_port}", flush=True)
        if args.memory:
            for name in targets:
                print(f"  memory / {name}: {args.requests} requests ...", flush=True)
                rep = bench.memory(TARGETS[name])
                memory[name] = rep
                print("    " + coapload.format_report(rep).replace("\n", "\n    "), flush=True)
        else:
            for rnd in range(args.rounds):
                if args.rounds > 1:
                    print(f"round {rnd + 1}/{args.rounds}", flush=True)
                for name in targets:
                    print(f"  {name} ...", flush=True)
                    rep = bench.measure(TARGETS[name])
                    results.setdefault(name, []).append(rep)
                    print("    " + coapload.format_report(rep).replace("\n", "\n    "), flush=True)
    except KeyboardInterrupt:
        print("interrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        if "nginx" in bench.procs and bench.procs["nginx"].poll() is not None:
            print(f"nginx died: {bench.log_tail('nginx')}", file=sys.stderr)
        with contextlib.suppress(Exception):
            bench.close()
    if args.memory:
        table = markdown_memory(memory)
        verdicts = []
        for name, rep in memory.items():
            v = memory_verdict(rep)
            if v:
                ok = "met" if abs(v[2]) <= 10 else "NOT met"
                verdicts.append(
                    f"{TARGETS[name].label}: RSS {v[0] / 1024:.1f} MiB at 100k"
                    f" → {v[1] / 1024:.1f} MiB at the end"
                    f" ({v[2]:+.1f} %; goal: flat within 10 %: {ok})"
                )
    else:
        table = markdown_table(results)
        verdicts = []
        if results.get("aiocoap") and results.get("microenvoy"):
            ratio = _median(results["microenvoy"])["rate"] / _median(results["aiocoap"])["rate"]
            verdicts.append(
                f"microenvoy / bare aiocoap = {ratio * 100:.0f} %"
                f" (goal >= 60 %: {'met' if ratio >= 0.6 else 'NOT met'})"
            )
    if verdicts:
        table += "\n\n" + "\n".join(f"- {v}" for v in verdicts)
    print()
    print(table)
    if args.markdown:
        lines = [f"Command: `{cmdline}`", "", *(f"- {k}: {v}" for k, v in info.items()), "", table, ""]
        Path(args.markdown).write_text("\n".join(lines))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": info, "results": results or memory}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
