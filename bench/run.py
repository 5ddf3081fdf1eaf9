"""The HTTP/3 benchmark, three-way, in one run: bare aioquic vs microenvoy vs Caddy.

    .venv/bin/python bench/run.py [--duration 15] [--warmup 3] [-c 4 -m 8] [--markdown out.md]

Targets, measured one after the other with the same load (``bench/h3load.py``: ``-c`` connections x
``-m`` concurrent streams, GET ``/``):

* ``bare aioquic``: ``bench/bare_h3_server.py``, 200 with a fixed 25-byte body (the limit);
* ``microenvoy``: ``python -m microenvoy run`` (uvloop, ``--log-level warning``), HTTP/3 listener ->
  router -> h2c cluster -> nginx;
* ``caddy``: Caddy's HTTP/3 server (``tls internal``) with ``reverse_proxy h2c://`` -> nginx.

nginx (one process: ``master_process off``) answers ``return 200`` with the same body on an h2c listener.
Before each measurement one probe request checks that the target answers over HTTP/3 (ALPN ``h3``) with
nginx's body. CPU per request is read from ``/proc/PID/stat`` at the edges of the measured window: the
server process (agent / Caddy / bare server) and nginx, separately. The generator's own CPU is reported too.

Everything runs on 127.0.0.1: the agent and the bare server bind port 0 (ports are read back); nginx and
Caddy get free ports picked by binding port 0. Every child is killed when this script exits, also on Ctrl-C
or an error (and, through PR_SET_PDEATHSIG, if the script itself is killed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

import h3load  # noqa: E402
from procs import (  # noqa: E402
    Procs,
    agent_config,
    agent_hcm,
    die_with_parent,
    free_port,
    interrupt,
    listener_ports,
    machine_info,
    positive,
    wait_for,
)

from microenvoy.demo import self_signed_certificate  # noqa: E402

__all__ = ["Bench", "main", "markdown_table"]

BODY = b"hello from the benchmark\n"  # bare_h3_server.BODY; nginx returns the same bytes
NGINX_BODY = BODY.decode().replace("\n", "\\n")
"""``BODY`` as an nginx ``return`` string."""
TARGETS = ("bare", "microenvoy", "caddy")
_T = "type.googleapis.com/envoy.extensions."
LABELS = {
    "bare": "bare aioquic (limit)",
    "microenvoy": "microenvoy → h2c → nginx",
    "caddy": "Caddy → h2c → nginx",
}


class Bench(Procs):
    """One benchmark run: a temp dir, the child processes (``Procs``), the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(prefix="microenvoy-bench-", keep_tmp=args.keep_tmp, append_logs=False)
        self.args = args
        self.cert = ""
        self.key = ""

    # -- nginx ------------------------------------------------------------------------------------
    # -- targets ----------------------------------------------------------------------------------
    def start_bare(self) -> tuple[int, int]:
        port_file = self.tmp / "bare.port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(HERE / "bare_h3_server.py"), "--port-file", str(port_file),
               "--cert", self.cert, "--key", self.key]  # fmt: skip
        proc = self.spawn("bare", cmd)
        wait_for(port_file.exists, 20, "bare aioquic server", proc)
        return proc.pid, int(port_file.read_text())

    def microenvoy_config(self) -> dict[str, Any]:
        tls = {
            "common_tls_context": {
                "tls_certificates": [
                    {"certificate_chain": {"filename": self.cert}, "private_key": {"filename": self.key}}
                ]
            }
        }
        hcm = agent_hcm(
            stat_prefix="bench_h3", codec_type="HTTP3", route={"cluster": "nginx", "timeout": "15s"}
        )
        listener = {
            "name": "h3",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0, "protocol": "UDP"}},
            "udp_listener_config": {"quic_options": {}},
            "filter_chains": [
                {
                    "filters": [hcm],
                    "transport_socket": {
                        "name": "envoy.transport_sockets.quic",
                        "typed_config": {
                            "@type": _T + "transport_sockets.quic.v3.QuicDownstreamTransport",
                            "downstream_tls_context": tls,
                        },
                    },
                }
            ],
        }
        h2 = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
        return agent_config(listener, "nginx", [self.nginx_port], typed_extension_protocol_options=h2)

    def start_microenvoy(self) -> tuple[int, int]:
        proc, admin = self.start_agent(self.microenvoy_config(), self.args.agent_log_level)
        return proc.pid, listener_ports(admin)["h3"]

    def start_caddy(self) -> tuple[int, int]:
        caddy = shutil.which("caddy")
        if caddy is None:
            raise RuntimeError("caddy is not installed")
        port = free_port(udp=True)
        home = self.tmp / "caddy-home"
        home.mkdir(exist_ok=True)
        caddyfile = self.tmp / "Caddyfile"
        caddyfile.write_text(f"""{{
	admin off
	auto_https disable_redirects
	skip_install_trust
	storage file_system {home}/storage
	servers {{
		protocols h1 h2 h3
	}}
}}

https://127.0.0.1:{port} {{
	bind 127.0.0.1
	tls internal
	reverse_proxy h2c://127.0.0.1:{self.nginx_port}
}}
""")
        env = dict(os.environ, HOME=str(home), XDG_DATA_HOME=str(home / "data"),
                   XDG_CONFIG_HOME=str(home / "config"))  # fmt: skip
        proc = self.spawn(
            "caddy", [caddy, "run", "--config", str(caddyfile), "--adapter", "caddyfile"], env=env
        )
        return proc.pid, port

    # -- measuring --------------------------------------------------------------------------------
    def check_h3(self, name: str, port: int) -> h3load.ProbeResult:
        """Wait (bounded) until one HTTP/3 GET through ``name`` returns 200 with the expected body."""
        url = f"https://127.0.0.1:{port}/"
        deadline = time.monotonic() + 20
        last: str = ""
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited: {self.log_tail(name)}")
            try:
                res: h3load.ProbeResult = _run_coro(h3load.probe(url, 2.0))
            except Exception as exc:
                last = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.procs[name].wait(timeout=0.2)
                continue
            if res.alpn != "h3" or res.status != 200 or res.body != BODY:
                raise RuntimeError(f"{name}: unexpected probe answer {res}")
            return res
        raise TimeoutError(f"{name}: no HTTP/3 answer on {url} ({last}); log:\n{self.log_tail(name)}")

    def measure(self, name: str, server_pid: int, port: int) -> dict[str, Any]:
        a = self.args
        cmd = [sys.executable, str(HERE / "h3load.py"), f"https://127.0.0.1:{port}{a.path}",
               "-c", str(a.connections), "-m", str(a.streams), "-d", str(a.duration), "-w", str(a.warmup),
               "-p", str(a.processes), "--json", "--watch-pid", f"server={server_pid}"]  # fmt: skip
        if a.body_size:
            cmd += ["--body-size", str(a.body_size)]
        if name != "bare":
            cmd += ["--watch-pid", f"nginx={self.procs['nginx'].pid}"]
        spy = None
        if a.py_spy and name in ("microenvoy", "bare"):
            # Sample the server for the warm-up + window (raw = collapsed stacks, one line per stack).
            seconds = str(int(a.warmup + a.duration + 2))
            spy_cmd = [a.py_spy_bin, "record", "-p", str(server_pid), "-r", "250", "--nonblocking",
                       "-d", seconds, "-f", "raw", "-o", f"{a.py_spy}.{name}.txt"]  # fmt: skip
            spy = self.procs["py-spy"] = subprocess.Popen(
                spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent
            )
        # Registered in self.procs: on Ctrl-C or an error, close() terminates it (h3load then kills its
        # workers, which also die with it through PR_SET_PDEATHSIG).
        load = self.procs["h3load"] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=die_with_parent
        )
        stdout, stderr = load.communicate(timeout=a.warmup + a.duration + 120)
        self.procs.pop("h3load")
        if spy is not None:
            spy.wait(timeout=30)
            self.procs.pop("py-spy")
        if not stdout.strip():
            raise RuntimeError(f"h3load failed on {name}: {stderr.decode(errors='replace')[-2000:]}")
        rep: dict[str, Any] = json.loads(stdout)
        return rep

    def run_target(self, name: str) -> dict[str, Any]:
        start = {"bare": self.start_bare, "microenvoy": self.start_microenvoy, "caddy": self.start_caddy}[
            name
        ]
        try:
            pid, port = start()
            probe = self.check_h3(name, port)
            server_hdr = next((v for k, v in probe.headers if k == "server"), "?")
            print(f"  {name}: pid {pid}, udp port {port}, probe OK (h3, server: {server_hdr})", flush=True)
            rep = self.measure(name, pid, port)
        finally:
            self.stop(name)
        print("    " + h3load.format_report(rep).replace("\n", "\n    "), flush=True)
        return rep


def _run_coro(coro: Any) -> Any:
    import asyncio

    def quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # A probe that times out during the handshake leaves aioquic's connected-waiter failing later.
        if not isinstance(context.get("exception"), ConnectionError):
            loop.default_exception_handler(context)

    async def run() -> Any:
        asyncio.get_running_loop().set_exception_handler(quiet)
        return await coro

    return asyncio.run(run())


# ---------------------------------------------------------------------------------------------- report


def _median_rep(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median req/s (the table shows real rounds, not averaged numbers)."""
    ordered = sorted(reps, key=lambda r: r["rps"])
    return ordered[(len(ordered) - 1) // 2]


def markdown_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """The results as a markdown table (one row per target; the median round if there were several)."""
    bare = _median_rep(results["bare"])["rps"] if results.get("bare") else None
    rows = [
        "| target | req/s | p50 ms | p99 ms | errors | server CPU µs/req | nginx CPU µs/req "
        "| server CPU % | generator CPU % | datagrams/req rx, tx | req/s vs bare aioquic |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in TARGETS:
        if not results.get(name):
            continue
        r = _median_rep(results[name])
        srv = r["watched"]["server"]
        ngx = r["watched"].get("nginx")
        ratio = f"{r['rps'] / bare * 100:.0f} %" if bare else "n/a"
        ngx_us = f"{ngx['cpu_us_per_req']:.0f}" if ngx else "-"
        rows.append(
            f"| {LABELS[name]} | {r['rps']:.0f} | {r['latency_ms']['p50']:.2f} | {r['latency_ms']['p99']:.2f}"
            f" | {r['errors']} | {srv['cpu_us_per_req']:.0f} | {ngx_us}"
            f" | {srv['cpu_pct']:.0f} | {r['generator']['cpu_pct']:.0f}"
            f" | {r['datagrams_per_req']['in']:.2f}, {r['datagrams_per_req']['out']:.2f} | {ratio} |"
        )
    rounds = max(len(v) for v in results.values()) if results else 0
    if rounds > 1:
        rows += ["", "req/s of every round (the table above shows each target's median round):", ""]
        rows += ["| target | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " |",
                 "|---|" + "---:|" * rounds]  # fmt: skip
        for name in TARGETS:
            if results.get(name):
                rows.append(
                    f"| {LABELS[name]} | " + " | ".join(f"{r['rps']:.0f}" for r in results[name]) + " |"
                )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--duration", type=positive(float), default=15.0, help="measured seconds per target")
    p.add_argument("-w", "--warmup", type=float, default=3.0, help="warm-up seconds per target")
    p.add_argument("-c", "--connections", type=positive(int), default=4)
    p.add_argument("-m", "--streams", type=positive(int), default=8, help="concurrent streams per connection")
    p.add_argument("-p", "--processes", type=positive(int), default=1, help="load generator processes")
    p.add_argument("--path", default="/")
    p.add_argument("--body-size", type=int, default=0, help="POST bodies of this size instead of GET")
    p.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated subset of " + ",".join(TARGETS)
    )
    p.add_argument(
        "--rounds",
        type=positive(int),
        default=1,
        help="measure every target this many times, interleaved; the table shows the median round",
    )
    p.add_argument("--agent-log-level", default="warning")
    p.add_argument("--markdown", help="also write the table (with machine info) to this file")
    p.add_argument("--json", dest="json_out", help="write every raw report to this file")
    p.add_argument(
        "--py-spy",
        metavar="PREFIX",
        help="profile the agent and the bare server with py-spy: PREFIX.<target>.txt (collapsed stacks)",
    )
    p.add_argument("--py-spy-bin", default=str(Path(sys.executable).parent / "py-spy"))
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")  # fmt: skip
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(targets) - set(TARGETS):
        p.error(f"unknown targets: {sorted(unknown)}")
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    bench = Bench(args)
    info = machine_info(
        ("aioquic", "uvloop", "h2"),
        {"nginx": [shutil.which("nginx") or "/usr/sbin/nginx", "-v"], "caddy": ["caddy", "version"]},
    )
    cmdline = " ".join([".venv/bin/python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"$ {cmdline}")
    for k, v in info.items():
        print(f"  {k:<8} {v}")
    concurrency = args.connections * args.streams
    print(
        f"load: {args.connections} connections x {args.streams} streams = {concurrency} concurrent streams,"
        f" {args.warmup:g} s warm-up + {args.duration:g} s measured per target, tmp {bench.tmp}",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    try:
        bench.cert, bench.key = self_signed_certificate(str(bench.tmp))
        if {"microenvoy", "caddy"} & set(targets):
            nginx_pid = bench.start_nginx_h2c(NGINX_BODY, port=free_port(udp=True))  # free for TCP and UDP
            print(f"  nginx: pid {nginx_pid}, h2c port {bench.nginx_port}", flush=True)
        for rnd in range(args.rounds):
            if args.rounds > 1:
                print(f"round {rnd + 1}/{args.rounds}", flush=True)
            for name in targets:
                results[name].append(bench.run_target(name))
    except KeyboardInterrupt:
        print("interrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        if "nginx" in bench.procs and bench.procs["nginx"].poll() is not None:
            print(f"nginx died: {bench.log_tail('nginx')}", file=sys.stderr)
        bench.close()
    table = markdown_table(results)
    if results.get("bare") and results.get("microenvoy"):
        ratio = _median_rep(results["microenvoy"])["rps"] / _median_rep(results["bare"])["rps"]
        verdict = "met" if ratio >= 0.6 else "NOT met"
        table += (
            f"\n\nmicroenvoy / bare aioquic = {ratio * 100:.0f} % of req/s"
            f" at {concurrency} concurrent streams (goal >= 60 %: {verdict})"
        )
    print()
    print(table)
    if args.markdown:
        lines = [f"Command: `{cmdline}`", "", *(f"- {k}: {v}" for k, v in info.items()), "", table, ""]
        Path(args.markdown).write_text("\n".join(lines))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
