"""Child-process plumbing shared by the benchmark scripts (``run.py``, ``failover.py``, ``cluster_path.py``).

``Procs`` is the registry of one run's children: a temp dir, one log file per child in it, SIGTERM then
SIGKILL on ``stop``/``close``, and PR_SET_PDEATHSIG on every child so that nothing outlives the script even
when it is killed. ``start_nginx`` runs a single-process nginx on a config whose ``http {}`` body the caller
writes (``nginx_conf`` writes the boilerplate around it); ``start_agent`` runs ``python -m microenvoy run``
and waits for its admin address. The rest: free ports, a bounded wait on a condition, a TCP listening check,
a process's CPU seconds from ``/proc/PID/stat``, the agent's admin endpoints, and the skeleton of the agent
configs the scripts run (``agent_hcm``, ``agent_config``).

bench/ is not a package: a script imports this as ``import procs`` with bench/ on ``sys.path`` (Python puts
a script's own folder there; the scripts also insert it, like ``run.py`` does for ``h3load``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "ROOT",
    "Procs",
    "admin_get",
    "agent_config",
    "agent_hcm",
    "die_with_parent",
    "free_port",
    "listener_ports",
    "listening",
    "nginx_conf",
    "proc_cpu_seconds",
    "wait_for",
]

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (the agent's children get it on ``PYTHONPATH``)."""

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_T = "type.googleapis.com/envoy.extensions."


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when this script dies (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def free_port(*, udp: bool = False) -> int:
    """A TCP port free on 127.0.0.1 a moment ago (for peers that cannot bind port 0 and report it); with
    ``udp``, one whose UDP port was free too (an HTTP/3 server listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            if not udp:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def wait_for(
    cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``cond`` until true; fail early if ``proc`` exits, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout} s")
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)  # a bounded poll interval that also notices an early exit
        else:
            time.sleep(0.05)  # a bounded poll interval


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def nginx_conf(root: Path, http_body: str, *, worker_connections: int = 4096) -> Path:
    """Write ``root``/nginx.conf: pid, error log and temp paths under ``root``, no access log, keep-alive
    high enough that nginx sends no GOAWAY during a run, and ``http_body`` inside ``http {}``."""
    for sub in ("logs", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(f"""
pid {root}/nginx.pid;
error_log {root}/logs/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
{http_body}
}}
""")
    return conf


def agent_hcm(*, stat_prefix: str, codec_type: str, route: dict[str, Any]) -> dict[str, Any]:
    """The agent's ``http_connection_manager`` filter: virtual host ``bench`` for every domain, one route
    (prefix ``/``) whose action is ``route``, and the router filter."""
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _T + "filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": codec_type,
            "route_config": {
                "name": "bench",
                "virtual_hosts": [
                    {
                        "name": "bench",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": route}],
                    }
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": _T + "filters.http.router.v3.Router"},
                }
            ],
        },
    }


def agent_config(
    listener: dict[str, Any],
    cluster: str,
    ports: Sequence[int],
    *,
    lb_policy: str = "ROUND_ROBIN",
    **extra: Any,
) -> dict[str, Any]:
    """A whole agent bootstrap: node ``bench``, admin on 127.0.0.1 port 0, ``listener``, and one STATIC
    cluster named ``cluster`` of the endpoints 127.0.0.1:``ports`` (``extra``: more cluster fields)."""
    endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        for p in ports
    ]
    return {
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [listener],
            "clusters": [
                {
                    "name": cluster,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "lb_policy": lb_policy,
                    "load_assignment": {"cluster_name": cluster, "endpoints": [{"lb_endpoints": endpoints}]},
                    **extra,
                }
            ],
        },
    }


def admin_get(admin: str, path: str) -> str:
    """GET ``path`` from the agent's admin address ``admin`` (host:port); the body as text."""
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=5) as resp:
        return str(resp.read().decode())


def listener_ports(admin: str) -> dict[str, int]:
    """The agent's listeners by name -> the port each is bound to (from ``/listeners?format=json``)."""
    doc = json.loads(admin_get(admin, "/listeners?format=json"))
    return {
        s["name"]: int(s["local_address"]["socket_address"]["port_value"]) for s in doc["listener_statuses"]
    }


class Procs:
    """One run's child processes and temp dir; ``close()`` stops them all (the last started first)."""

    def __init__(
        self, *, prefix: str = "microenvoy-bench-", keep_tmp: bool = False, append_logs: bool = True
    ) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        """Configs, certificates and one ``<name>.log`` per child; removed by ``close`` unless keep_tmp."""
        self.keep_tmp = keep_tmp
        self.append_logs = append_logs
        """A child started again under the same name appends to its log (else it starts it afresh)."""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        """The running children by name, in start order."""
        self.nginx_port = 0
        """The h2c port of the nginx ``start_nginx_h2c`` started."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} tmp={self.tmp} running={sorted(self.procs)}>"

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in the temp dir, stdout and stderr to ``<name>.log``, and register it as ``name``."""
        log = open(self.tmp / f"{name}.log", "ab" if self.append_logs else "wb")  # the child owns it
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=self.tmp, preexec_fn=die_with_parent)  # fmt: skip
        log.close()
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> None:
        """Unregister ``name``; SIGTERM it if it still runs, SIGKILL after 5 s."""
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def kill(self, name: str) -> None:
        """SIGKILL (a failover event); the process stays registered until ``stop``."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.kill()

    def close(self) -> None:
        """Stop every child, the last started first; remove the temp dir unless ``keep_tmp``."""
        for name in reversed(list(self.procs)):
            self.stop(name)
        if not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last ``lines`` lines of ``name``'s log ("" if there is none)."""
        try:
            text = (self.tmp / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start_nginx(
        self, name: str, http_body: str, ports: Sequence[int], *, worker_connections: int = 4096
    ) -> int:
        """nginx (one process, config in ``<tmp>/<name>/``) with ``http_body`` inside ``http {}``; waits
        until every one of ``ports`` listens and returns the pid."""
        r = self.tmp / name
        conf = nginx_conf(r, http_body, worker_connections=worker_connections)
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        proc = self.spawn(name, [exe, "-p", str(r), "-c", str(conf), "-e", str(r / "logs/error.log"),
                                 "-g", "daemon off; master_process off;"])  # fmt: skip
        wait_for(lambda: all(listening(p) for p in ports), 10, name, proc)
        return proc.pid

    def start_nginx_h2c(self, body: str = "ok\\n", *, port: int | None = None) -> int:
        """nginx answering every request ``return 200 "<body>"`` (text/plain) on an h2c listener on ``port``
        (default: a free one), kept in ``nginx_port``; its pid."""
        self.nginx_port = free_port() if port is None else port
        server = f"""    client_max_body_size 64m;
    server {{
        listen 127.0.0.1:{self.nginx_port} http2;
        location / {{ default_type text/plain; return 200 "{body}"; }}
    }}"""
        return self.start_nginx("nginx", server, [self.nginx_port], worker_connections=1024)

    def probe_until(self, attempt: Callable[[], dict[str, Any]], what: str, *, server: str = "server",
                    limit: float = 20.0) -> dict[str, Any]:  # fmt: skip
        """Call ``attempt`` (one probe of the running ``server`` child) until it returns, for at most
        ``limit`` seconds; fail early, with the server's log, if the server exits."""
        deadline = time.monotonic() + limit
        last = ""
        proc = self.procs[server]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{server} exited: {self.log_tail(server)}")
            try:
                return attempt()
            except Exception as exc:
                last = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.2)  # a bounded pause that also notices an exit
        raise TimeoutError(f"no answer from {what} ({last}); log:\n{self.log_tail(server)}")

    def start_agent(
        self, config: dict[str, Any], log_level: str = "warning", *, wait_ready: bool = False
    ) -> tuple[subprocess.Popen[bytes], str]:
        """``python -m microenvoy run`` on ``config`` (written as JSON), registered as ``microenvoy``; waits
        for its admin address (and, with ``wait_ready``, for ``/ready`` to answer 200). Returns the process
        and the admin address (host:port)."""
        conf = self.tmp / "microenvoy.json"
        conf.write_text(json.dumps(config, indent=2))
        addr_file = self.tmp / "microenvoy.admin"
        addr_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "microenvoy", "run", "-c", str(conf), "--admin-address-path",
               str(addr_file), "--log-level", log_level]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        proc = self.spawn("microenvoy", cmd, env=env)
        wait_for(lambda: addr_file.exists() and addr_file.stat().st_size > 0, 20, "microenvoy admin", proc)
        admin = addr_file.read_text().strip()

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://{admin}/ready", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        if wait_ready:
            wait_for(ready, 20, "microenvoy /ready", proc)
        return proc, admin


# ---------------------------------------------------------------------------------- shared by the scripts
def interrupt(signum: int, frame: Any) -> None:
    """SIGTERM handler: unwind like Ctrl-C so every child is stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` accepting only values > 0."""

    def parse(text: str) -> Any:
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError("must be > 0")
        return v

    return parse


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty)."""
    if not sorted_values:
        return math.nan
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[i])


def self_cpu() -> float:
    """User + system CPU seconds of this process."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (what the agent uses), else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _package_version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    lines = (out.stdout + out.stderr).decode(errors="replace").strip().splitlines()
    return lines[0] if lines else "?"


def machine_info(packages: Sequence[str], tools: dict[str, list[str]], **extra: str) -> dict[str, str]:
    """What a result table is printed with: CPU, kernel, Python, the ``packages``' versions, the first line
    the ``tools`` print of their version, ``extra`` facts, and the load average."""
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    info.update({pkg: _package_version(pkg) for pkg in packages})
    info.update({name: _tool_version(cmd) for name, cmd in tools.items()})
    info.update(extra)
    info["loadavg"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return info
