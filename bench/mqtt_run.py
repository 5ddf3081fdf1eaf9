"""The MQTT benchmark in one run: mosquitto and microenvoy on the same loads (``bench/mqttload.py``).

    .venv/bin/python bench/mqtt_run.py [--duration 10] [--warmup 2] [--rounds 1] [--markdown out.md]
    .venv/bin/python bench/mqtt_run.py --targets mosquitto,microenvoy,microenvoy-h2,microenvoy-h2-batch

Loads (``--loads``), each on a freshly started server:

* ``qos0``: local QoS 0 pub/sub, closed loop: ``--qos0-publishers`` publishers on ``devices/{conn}/telemetry``
  and ``--qos0-subscribers`` subscribers on ``devices/+/telemetry``; delivered msgs/s, e2e latency, loss;
* ``qos0-half``: the same at ``--half`` (0.5) of the delivered rate the target reached in ``qos0``;
* ``qos1``: QoS 1 publish, closed loop: ``--qos1-connections`` x ``--inflight`` unacknowledged; acked
  msgs/s and ack latency (no subscribers);
* ``qos1-half``: the same at half of the rate the target reached in ``qos1`` (latency at half load);
* ``idle``: ``--idle-connections`` (5,000) connections opened (CONNECT/CONNACK) and held; the server's
  RSS (``/proc/PID/status``) before and while they are held: memory per idle connection.

Targets (``--targets``; default ``mosquitto``): ``mosquitto`` (``/usr/sbin/mosquitto``, one process, its
defaults plus ``allow_anonymous true``, ``persistence false``, ``max_connections -1``; Nagle stays on as
by default unless ``--mosquitto-nodelay``) and
``microenvoy`` (its MQTT listener as a local broker) get qos0, qos0-half, qos1, qos1-half and idle;
``microenvoy-h2`` and ``microenvoy-h2-batch`` (QoS 1 -> HTTP/2 bridging to an nginx h2c upstream that
answers 200, without / with the route's batching) get qos1 and qos1-half. The microenvoy agent configs come
from ``microenvoy_mqtt_config`` below.

Everything binds 127.0.0.1; mosquitto and nginx get free ports picked by binding port 0, the agent binds
port 0 and its port is read back from the admin ``/listeners``. The soft RLIMIT_NOFILE is raised to the
hard limit first (the servers and the generator inherit it). Every child is killed when this script exits,
also on Ctrl-C or an error (and, through PR_SET_PDEATHSIG, if the script itself is killed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import mqttload  # noqa: E402
from procs import (  # noqa: E402
    Procs,
    agent_config,
    die_with_parent,
    free_port,
    interrupt,
    listener_ports,
    listening,
    machine_info,
    positive,
    wait_for,
)

__all__ = ["TARGETS", "Bench", "main", "markdown_tables", "microenvoy_mqtt_config"]

MOSQUITTO = "/usr/sbin/mosquitto"
LOADS = ("qos0", "qos0-half", "qos1", "qos1-half", "idle")
MQTT_LISTENER = "mqtt"
"""The name of the agent's MQTT listener (its port is read back from ``/listeners``)."""


# ---------------------------------------------------------------------------------------------- microenvoy
def microenvoy_mqtt_config(
    *, mode: str, nginx_port: int = 0, batching: bool = False, receive_maximum: int = 64
) -> dict[str, Any]:
    """The agent bootstrap for a microenvoy target (``Procs.start_agent`` writes it and starts the agent).

    Requirements (the runner relies on them):

    * admin on 127.0.0.1 port 0 (``procs.agent_config`` does that);
    * one TCP listener named ``MQTT_LISTENER`` ("mqtt") on 127.0.0.1 port 0 whose filter chain holds
      ``microenvoy.filters.network.mqtt_proxy``, anonymous clients allowed, no ACL, MQTT 3.1.1 and 5,
      a ``receive_maximum`` of at least ``receive_maximum`` (the generator's ``--inflight``), and no cap
      that stops 5,000 idle connections;
    * ``mode="local"``: no bridge routes (the local broker: QoS 0 pub/sub and QoS 1 publish acked locally);
    * ``mode="bridge"``: one bridge route for the topic filter ``devices/{device}/telemetry`` (the
      generator publishes ``devices/<n>/telemetry``) to a cluster of the h2c endpoint 127.0.0.1:
      ``nginx_port`` (nginx answers every request 200), QoS 1 acknowledged after the upstream's 2xx;
      ``batching``: the route's ``batch`` (e.g. ``max_messages`` 64, ``max_delay`` 5 ms).
    """
    mqtt: dict[str, Any] = {
        "@type": "type.googleapis.com/microenvoy.extensions.filters.network.mqtt_proxy.v1.MqttProxy",
        "stat_prefix": "bench",
        "receive_maximum": max(64, receive_maximum),
        "max_inflight_messages": 1024,
        "max_queued_messages": 100000,
    }
    if mode == "bridge":
        route: dict[str, Any] = {"cluster": "upstream", "path": "/v1/{device}", "timeout": "10s"}
        if batching:
            # Batches group messages by request path: one ingest path (the topics travel in the body) lets
            # every device's messages share a batch.
            route["path"] = "/v1/telemetry"
            route["batch"] = {"max_messages": 64, "max_delay": "0.005s"}
        mqtt["routes"] = [
            {"name": "telemetry", "match": {"topic_filter": "devices/{device}/telemetry"}, "route": route}
        ]
    elif mode != "local":
        raise ValueError(f"unknown mode {mode!r}")
    listener = {
        "name": MQTT_LISTENER,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {"filters": [{"name": "microenvoy.filters.network.mqtt_proxy", "typed_config": mqtt}]}
        ],
    }
    h2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    ports = [nginx_port] if mode == "bridge" else [1]
    return agent_config(listener, "upstream", ports, typed_extension_protocol_options=h2)


# ---------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True, slots=True)
class Target:
    """A server to measure: its label, the loads it gets and how it is started."""

    name: str
    """``--targets`` name."""
    label: str
    """Row label in the tables."""
    loads: tuple[str, ...]
    """The loads it gets (a subset of ``LOADS``)."""
    start: Callable[[Bench], tuple[int, int]]
    """Start it; (pid of the process to watch, MQTT port)."""
    nginx: bool = False
    """Needs the nginx h2c upstream."""


def _start_mosquitto(bench: Bench) -> tuple[int, int]:
    port = free_port()
    conf = bench.tmp / "mosquitto.conf"
    conf.write_text(f"""# microenvoy bench: mosquitto as a local broker: defaults + what a benchmark needs
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
set_tcp_nodelay {"true" if bench.args.mosquitto_nodelay else "false"}
log_dest stderr
log_type error
log_type warning
connection_messages false
""")
    exe = shutil.which("mosquitto") or MOSQUITTO
    proc = bench.spawn("server", [exe, "-c", str(conf)])
    bench.server_log = "server"
    wait_for(lambda: listening(port), 10, "mosquitto", proc)
    return proc.pid, port


def _agent_starter(mode: str, batching: bool) -> Callable[[Bench], tuple[int, int]]:
    def start(bench: Bench) -> tuple[int, int]:
        config = microenvoy_mqtt_config(
            mode=mode, nginx_port=bench.nginx_port, batching=batching, receive_maximum=bench.args.inflight
        )
        proc, admin = bench.start_agent(config, bench.args.agent_log_level)
        # start_agent registers the agent (and its log) as "microenvoy"; the runner stops "server".
        bench.procs["server"] = bench.procs.pop("microenvoy")
        bench.server_log = "microenvoy"
        return proc.pid, listener_ports(admin)[MQTT_LISTENER]

    return start


_LOCAL = ("qos0", "qos0-half", "qos1", "qos1-half", "idle")
_BRIDGE = ("qos1", "qos1-half")
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("mosquitto", "mosquitto", _LOCAL, _start_mosquitto),
        Target("microenvoy", "microenvoy (local broker)", _LOCAL, _agent_starter("local", False)),
        Target("microenvoy-h2", "microenvoy → h2c nginx", _BRIDGE, _agent_starter("bridge", False), True),
        Target(
            "microenvoy-h2-batch",
            "microenvoy → h2c nginx, batching",
            _BRIDGE,
            _agent_starter("bridge", True),
            True,
        ),
    )
}


# ---------------------------------------------------------------------------------------------- the run
class Bench(Procs):
    """One benchmark run: a temp dir, the child processes (``Procs``), the arguments."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(prefix="microenvoy-mqtt-bench-", keep_tmp=args.keep_tmp, append_logs=True)
        self.args = args
        self.server_log = "server"
        """The log of the running server (``log_tail``)."""

    def probe(self, port: int) -> dict[str, Any]:
        """Wait (bounded) until a subscribe + QoS 1 publish round trip through the server works."""
        return self.probe_until(
            lambda: asyncio.run(mqttload.probe("127.0.0.1", port, self.version, 2.0)), f"MQTT port {port}"
        )

    @property
    def version(self) -> int:
        return 5 if self.args.mqtt_version == "5" else 4

    def load_cmd(self, load: str, port: int, rate: float) -> list[str]:
        a = self.args
        cmd = [sys.executable, str(HERE / "mqttload.py"), f"127.0.0.1:{port}", "-V", a.mqtt_version,
               "-d", str(a.duration), "-w", str(a.warmup), "-s", str(a.payload), "-p", str(a.processes),
               "--json"]  # fmt: skip
        if load.startswith("qos0"):
            cmd += ["-q", "0", "-c", str(a.qos0_publishers), "--subscribers", str(a.qos0_subscribers)]
        else:
            cmd += ["-q", "1", "-c", str(a.qos1_connections), "--inflight", str(a.inflight)]
        if load.endswith("-half"):
            cmd += ["--rate", f"{rate:.0f}"]
        return cmd

    def measure(self, target: Target, load: str, rate: float) -> dict[str, Any]:
        """Start ``target`` afresh, probe it, run one load against it, stop it; the report."""
        try:
            pid, port = target.start(self)
            self.probe(port)
            if load == "idle":
                return self.measure_idle(pid, port)
            cmd = [*self.load_cmd(load, port, rate), "--watch-pid", f"server={pid}"]
            if target.nginx:
                cmd += ["--watch-pid", f"nginx={self.procs['nginx'].pid}"]
            # Registered: on Ctrl-C or an error close() terminates it (its workers die with it).
            self.procs["mqttload"] = load_proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=die_with_parent
            )
            a = self.args
            stdout, stderr = load_proc.communicate(timeout=a.warmup + a.duration + 120)
            self.procs.pop("mqttload")
            if not stdout.strip():
                raise RuntimeError(f"mqttload failed: {stderr.decode(errors='replace')[-2000:]}")
            rep: dict[str, Any] = json.loads(stdout)
            if self.procs["server"].poll() is not None:
                raise RuntimeError(f"{target.name} died during {load}: {self.log_tail(self.server_log)}")
            return rep
        finally:
            self.stop("server")

    def measure_idle(self, pid: int, port: int) -> dict[str, Any]:
        """RSS of ``pid`` before and while ``--idle-connections`` connections are held."""
        n = self.args.idle_connections
        time.sleep(0.5)  # let the probe's connections go
        rss0 = mqttload.proc_rss_kib(pid)
        cmd = [sys.executable, str(HERE / "mqttload.py"), f"127.0.0.1:{port}", "-V", self.args.mqtt_version,
               "--idle-connections", str(n), "--connect-timeout", "60", "--json"]  # fmt: skip
        self.procs["mqttload"] = load_proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        assert load_proc.stdout is not None
        assert load_proc.stdin is not None
        try:
            line = load_proc.stdout.readline()  # the "connected" event (mqttload bounds its connect time)
            if not line:
                err = load_proc.stderr.read() if load_proc.stderr else b""
                raise RuntimeError(f"mqttload (idle) failed: {err.decode(errors='replace')[-2000:]}")
            event = json.loads(line)
            rss1 = _settled_rss(pid)
            stdout, _ = load_proc.communicate(input=b"\n", timeout=60)  # a line on stdin: let them go
        finally:
            self.procs.pop("mqttload", None)
            if load_proc.poll() is None:
                load_proc.kill()
        rep: dict[str, Any] = json.loads(stdout)
        connected = int(event["connected"])
        rep.update(
            rss_before_kib=rss0,
            rss_held_kib=rss1,
            kib_per_connection=round((rss1 - rss0) / connected, 2) if connected else float("nan"),
        )
        return rep


def _settled_rss(pid: int, *, quiet: float = 1.0, limit: float = 10.0) -> int:
    """The RSS of ``pid`` once it has not changed for ``quiet`` seconds (at most ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    last = mqttload.proc_rss_kib(pid)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)  # a bounded poll interval: RSS has no change notification
        now = mqttload.proc_rss_kib(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


# ---------------------------------------------------------------------------------------------- report


def _rate(rep: dict[str, Any], load: str) -> float:
    """The figure a load is judged by: delivered msgs/s (pub/sub) or acked msgs/s (QoS 1)."""
    return float(rep["delivered_rate"] if load.startswith("qos0") else rep["published_rate"])


def _median(reps: list[dict[str, Any]], load: str) -> dict[str, Any]:
    """The round with the median figure (the tables show real rounds, not averaged numbers)."""
    if load == "idle":
        ordered = sorted(reps, key=lambda r: r["kib_per_connection"])
    else:
        ordered = sorted(reps, key=lambda r: _rate(r, load))
    return ordered[(len(ordered) - 1) // 2]


def _load_label(load: str, rep: dict[str, Any], args: argparse.Namespace) -> str:
    s = rep["spec"]
    rate = f" at {s['rate']:.0f} msgs/s" if s["rate"] > 0 else ", closed loop"
    if load.startswith("qos0"):
        return f"QoS 0 pub/sub, {s['connections']} pub → {s['subscribers']} sub{rate}"
    return f"QoS 1 publish, {s['connections']} conn x {s['inflight']} inflight{rate}"


def _f(v: Any, fmt: str = ".0f") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return format(v, fmt)


def markdown_tables(results: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace) -> str:
    """The results (load -> target -> rounds) as markdown: the throughput/latency table, the memory table
    and, with several rounds, the figure of every round."""
    rows = [
        "| load | target | msgs/s | delivered msgs/s | p50 ms | p99 ms | max ms | lost | errors "
        "| server CPU µs/msg | nginx CPU µs/msg | server CPU % | generator CPU % | microenvoy / mosquitto |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for load in LOADS:
        if load == "idle" or not results.get(load):
            continue
        base = results[load].get("mosquitto")
        for name, reps in results[load].items():
            r = _median(reps, load)
            lat = r["e2e_latency_ms"] if load.startswith("qos0") else r["ack_latency_ms"]
            srv = r["watched"].get("server", {})
            ngx = r["watched"].get("nginx")
            ratio = "-"
            if name == "microenvoy" and base and not load.endswith("-half"):
                ratio = f"{_rate(r, load) / _rate(_median(base, load), load) * 100:.0f} %"
            delivered = _f(r["delivered_rate"]) if r["spec"]["subscribers"] else "-"
            lost = str(r["lost"]) if r["spec"]["subscribers"] else "-"
            errors = r["errors"] + r["unacked"]
            rows.append(
                f"| {_load_label(load, r, args)} | {TARGETS[name].label} | {_f(r['published_rate'])}"
                f" | {delivered} | {_f(lat['p50'], '.2f')} | {_f(lat['p99'], '.2f')}"
                f" | {_f(lat['max'], '.2f')}"
                f" | {lost} | {errors} | {_f(srv.get('cpu_us_per_msg'), '.1f')}"
                f" | {_f(ngx['cpu_us_per_msg'], '.1f') if ngx else '-'} | {_f(srv.get('cpu_pct'))}"
                f" | {_f(r['generator']['cpu_pct'])} | {ratio} |"
            )
    out = "\n".join(rows) if len(rows) > 2 else ""
    if results.get("idle"):
        base = results["idle"].get("mosquitto")
        mem = [
            "| target | idle connections | RSS before MiB | RSS held MiB | KiB per connection "
            "| microenvoy / mosquitto |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, reps in results["idle"].items():
            r = _median(reps, "idle")
            ratio = "-"
            if name == "microenvoy" and base:
                ratio = f"{r['kib_per_connection'] / _median(base, 'idle')['kib_per_connection']:.1f} x"
            mem.append(
                f"| {TARGETS[name].label} | {r['connected']} | {r['rss_before_kib'] / 1024:.1f}"
                f" | {r['rss_held_kib'] / 1024:.1f} | {r['kib_per_connection']:.2f} | {ratio} |"
            )
        out = (out + "\n\n" if out else "") + "\n".join(mem)
    rounds = max((len(v) for per in results.values() for v in per.values()), default=0)
    if rounds > 1:
        out += (
            "\n\nEvery round (msgs/s; idle: KiB per connection); the tables above show the median round:\n\n"
        )
        lines = ["| load | target | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " |",
                 "|---|---|" + "---:|" * rounds]  # fmt: skip
        for load, per in results.items():
            for name, reps in per.items():
                vals = [
                    f"{r['kib_per_connection']:.2f}" if load == "idle" else f"{_rate(r, load):.0f}"
                    for r in reps
                ]
                lines.append(f"| {load} | {TARGETS[name].label} | " + " | ".join(vals) + " |")
        out += "\n".join(lines)
    return out


def goals(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    """The issue's goals, checked where both sides were measured."""
    out: list[str] = []

    def med(load: str, name: str) -> dict[str, Any] | None:
        reps = results.get(load, {}).get(name)
        return _median(reps, load) if reps else None

    mq, me = med("qos1", "mosquitto"), med("qos1", "microenvoy")
    if mq and me:
        ratio = me["published_rate"] / mq["published_rate"]
        out.append(
            f"local QoS 1 ingest: microenvoy {me['published_rate']:.0f}"
            f" / mosquitto {mq['published_rate']:.0f} msgs/s = {ratio * 100:.0f} %"
            f" (goal >= 25 %: {'met' if ratio >= 0.25 else 'NOT met'})"
        )
    batch, batch_half = med("qos1", "microenvoy-h2-batch"), med("qos1-half", "microenvoy-h2-batch")
    if batch:
        ok = batch["published_rate"] >= 10000
        out.append(
            f"QoS 1 → HTTP/2 with batching: {batch['published_rate']:.0f} msgs/s"
            f" (goal >= 10000: {'met' if ok else 'NOT met'})"
        )
    if batch_half:
        p99 = batch_half["ack_latency_ms"]["p99"]
        out.append(
            f"QoS 1 → HTTP/2 with batching at {batch_half['spec']['rate']:.0f} msgs/s: p99 ack {p99:.2f} ms"
            f" (goal < 20 ms: {'met' if p99 < 20 else 'NOT met'})"
        )
    idle = med("idle", "microenvoy")
    if idle:
        kib = idle["kib_per_connection"]
        out.append(
            f"memory per idle MQTT connection: {kib:.2f} KiB with {idle['connected']} connections"
            f" (goal <= 8 KiB: {'met' if kib <= 8 else 'NOT met'})"
        )
    return out


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--duration", type=positive(float), default=10.0, help="measured seconds per load")
    p.add_argument("-w", "--warmup", type=float, default=2.0, help="warm-up seconds per load")
    p.add_argument("-V", "--mqtt-version", choices=("311", "5"), default="5")
    p.add_argument("-s", "--payload", type=int, default=64, help="payload bytes (>= 20)")
    p.add_argument("-p", "--processes", type=positive(int), default=1, help="generator processes")
    p.add_argument("--qos0-publishers", type=positive(int), default=4)
    p.add_argument("--qos0-subscribers", type=positive(int), default=1)
    p.add_argument("--qos1-connections", type=positive(int), default=8)
    p.add_argument("--inflight", type=positive(int), default=16, help="QoS 1 window per connection")
    p.add_argument("--half", type=positive(float), default=0.5, help="rate of the -half loads (fraction)")
    p.add_argument("--idle-connections", type=positive(int), default=5000)
    p.add_argument("--targets", default="mosquitto", help="comma-separated subset of " + ",".join(TARGETS))
    p.add_argument("--loads", default=",".join(LOADS), help="comma-separated subset of " + ",".join(LOADS))
    p.add_argument(
        "--rounds", type=positive(int), default=1, help="measure everything N times; tables show the median"
    )
    p.add_argument(
        "--mosquitto-nodelay",
        action="store_true",
        help="set_tcp_nodelay true (default: mosquitto's default, false: Nagle coalesces its acks)",
    )
    p.add_argument("--agent-log-level", default="warning")
    p.add_argument("--markdown", help="also write the tables (with machine info) to this file")
    p.add_argument("--json", dest="json_out", help="write every raw report to this file")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    if unknown := set(targets) - set(TARGETS):
        p.error(f"unknown targets: {sorted(unknown)}")
    if unknown := set(loads) - set(LOADS):
        p.error(f"unknown loads: {sorted(unknown)}")
    for name in targets:
        if name != "mosquitto":
            try:
                microenvoy_mqtt_config(mode="local", nginx_port=1, receive_maximum=args.inflight)
            except NotImplementedError as exc:
                p.error(str(exc))
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    nofile = mqttload.raise_nofile_limit()  # before any child starts: they inherit it
    if "idle" in loads and nofile < args.idle_connections + 256:
        p.error(f"RLIMIT_NOFILE hard limit {nofile} is too low for {args.idle_connections} idle connections")
    info = machine_info(
        ("uvloop",),
        {
            "mosquitto": [shutil.which("mosquitto") or MOSQUITTO, "-h"],
            "nginx": [shutil.which("nginx") or "/usr/sbin/nginx", "-v"],
        },
        RLIMIT_NOFILE=str(mqttload.raise_nofile_limit()),
    )
    cmdline = " ".join(
        [".venv/bin/python", "bench/mqtt_run.py", *(argv if argv is not None else sys.argv[1:])]
    )
    print(f"$ {cmdline}")
    for k, v in info.items():
        print(f"  {k:<14} {v}")
    bench = Bench(args)
    print(f"  tmp            {bench.tmp}", flush=True)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        if any(TARGETS[t].nginx for t in targets):
            print(f"  nginx: pid {bench.start_nginx_h2c()}, h2c port {bench.nginx_port}", flush=True)
        for rnd in range(args.rounds):
            if args.rounds > 1:
                print(f"round {rnd + 1}/{args.rounds}", flush=True)
            for load in loads:
                for name in targets:
                    target = TARGETS[name]
                    if load not in target.loads:
                        continue
                    rate = 0.0
                    if load.endswith("-half"):
                        full = load.removesuffix("-half")
                        prior = results.get(full, {}).get(name)
                        if not prior:
                            print(f"  {load}: skipped for {name} (needs {full} first)", flush=True)
                            continue
                        rep = prior[-1]
                        rate = args.half * _rate(rep, full) / max(1, rep["spec"]["subscribers"])
                    print(f"  {load} / {name} ...", flush=True)
                    rep = bench.measure(target, load, rate)
                    results.setdefault(load, {}).setdefault(name, []).append(rep)
                    text = mqttload.format_report(rep)
                    if load == "idle":
                        text += (
                            f"\nRSS {rep['rss_before_kib']} -> {rep['rss_held_kib']} KiB:"
                            f" {rep['kib_per_connection']:.2f} KiB per connection"
                        )
                    print("    " + text.replace("\n", "\n    "), flush=True)
    except KeyboardInterrupt:
        print("interrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        if "nginx" in bench.procs and bench.procs["nginx"].poll() is not None:
            print(f"nginx died: {bench.log_tail('nginx')}", file=sys.stderr)
        bench.close()
    table = markdown_tables(results, args)
    verdicts = goals(results)
    if verdicts:
        table += "\n\n" + "\n".join(f"- {v}" for v in verdicts)
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
