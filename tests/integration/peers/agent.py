"""Run the real agent as a subprocess and talk to its admin server.

    a = Agent(config_dict, tmp_path).start()    # writes YAML, runs `python -m microenvoy run -c ...`
    port = a.port("ingress_h3")                 # bound port of a listener configured with port 0
    a.wait_stat("http.ingress.downstream_rq_2xx", lambda v: v >= 1)
    a.reload(new_config)                        # rewrite the file + SIGHUP, wait until it is live
    a.stop()                                    # SIGTERM, wait

Every wait polls a condition with a deadline; nothing sleeps a fixed time. While an agent runs it is listed in
``LIVE_AGENTS`` so the test harness can attach its log tail to a failing test's report.
"""

from __future__ import annotations

import asyncio
import copy
import http.client
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .common import async_wait_for, wait_for

__all__ = ["LIVE_AGENTS", "Agent", "AgentError"]

REPO_ROOT = Path(__file__).resolve().parents[3]
LIVE_AGENTS: set[Agent] = set()
_GENERATION_KEY = "microenvoy_test_generation"

Predicate = Callable[[int], bool] | int


class AgentError(RuntimeError):
    """The agent failed to start, exited early, or an admin call failed."""


def _predicate(p: Predicate) -> Callable[[int], bool]:
    if isinstance(p, int):
        n = p
        return lambda v: v >= n
    return p


class Agent:
    """One agent process with its config file, logs and admin address in ``workdir``."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        *,
        name: str = "agent",
        extra_args: tuple[str, ...] = (),
        log_level: str = "debug",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.config = copy.deepcopy(config)
        self.extra_args = extra_args
        self.log_level = log_level
        self.env = env
        self.config_path = workdir / f"{name}.yaml"
        self.admin_path = workdir / f"{name}.admin-address"
        self.stdout_path = workdir / f"{name}.stdout.log"
        self.stderr_path = workdir / f"{name}.stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin_host = ""
        self.admin_port = 0
        self.generation = ""
        self.ready = False
        """True once ``start()`` saw ``GET /ready`` answer 200."""
        self._ports: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle
    def _write_config(self, config: dict[str, Any]) -> str:
        """Write ``config`` plus a fresh generation marker (node.metadata) atomically; return the marker."""
        doc = copy.deepcopy(config)
        marker = f"gen-{uuid.uuid4().hex[:12]}"
        node = doc.setdefault("node", {})
        node.setdefault("id", f"test-{self.name}")
        node.setdefault("cluster", "integration-tests")
        node.setdefault("metadata", {})[_GENERATION_KEY] = marker
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, self.config_path)
        return marker

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "microenvoy",
            "run",
            "-c",
            str(self.config_path),
            "--admin-address-path",
            str(self.admin_path),
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]

    def start(self, timeout: float = 30.0) -> Agent:
        """Start the process; return once the admin address is known and ``GET /ready`` answers 200."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.generation = self._write_config(self.config)
        self.admin_path.unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env or {})
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=env
            )
        LIVE_AGENTS.add(self)

        def admin_known() -> bool:
            self._check_alive()
            text = self.admin_path.read_text().strip() if self.admin_path.exists() else ""
            if ":" not in text:
                return False
            host, _, port = text.rpartition(":")
            self.admin_host, self.admin_port = host.strip("[]"), int(port)
            return True

        try:
            wait_for(admin_known, timeout, interval=0.02, message=f"{self.name}: admin address file")
            wait_for(
                lambda: self._check_alive() or self.admin_get("/ready")[0] == 200,
                timeout,
                message=f"{self.name}: GET /ready == 200",
            )
        except (TimeoutError, AgentError) as exc:
            tail = self.log_tail()
            self.stop()
            raise AgentError(
                f"{self.name} did not become ready: {exc}\n--- agent log tail ---\n{tail}"
            ) from exc
        self.ready = True
        return self

    def _check_alive(self) -> bool:
        """Raise AgentError if the process has exited; returns False so it can be chained with ``or``."""
        if self.proc is None:
            raise AgentError(f"{self.name} is not running")
        rc = self.proc.poll()
        if rc is not None:
            raise AgentError(f"{self.name} exited with code {rc}")
        return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (the agent drains, then exits); SIGKILL after ``timeout``. Returns the exit code."""
        LIVE_AGENTS.discard(self)
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def log_text(self) -> str:
        parts = []
        for p in (self.stdout_path, self.stderr_path):
            if p.exists():
                parts.append(p.read_bytes().decode("utf-8", "replace"))
        return "\n".join(parts)

    def log_marks(self) -> dict[Path, int]:
        """Current sizes of the log files (pass to ``log_since``)."""
        return {p: p.stat().st_size for p in (self.stdout_path, self.stderr_path) if p.exists()}

    def log_since(self, marks: dict[Path, int]) -> str:
        """Log text written after ``marks`` was taken."""
        parts = []
        for p in (self.stdout_path, self.stderr_path):
            if p.exists():
                with open(p, "rb") as f:
                    f.seek(marks.get(p, 0))
                    parts.append(f.read().decode("utf-8", "replace"))
        return "\n".join(parts)

    def log_tail(self, lines: int = 60) -> str:
        out = []
        for p in (self.stdout_path, self.stderr_path):
            if p.exists():
                text = p.read_bytes()[-32768:].decode("utf-8", "replace").splitlines()[-lines:]
                out.append(f"[{p.name}]\n" + "\n".join(text))
        return "\n".join(out) if out else "(no log output)"

    # ------------------------------------------------------------------ admin
    def admin_request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 5.0
    ) -> tuple[int, bytes]:
        if not self.admin_port:
            raise AgentError(f"{self.name}: admin address not known yet")
        conn = http.client.HTTPConnection(self.admin_host, self.admin_port, timeout=timeout)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def admin_get(self, path: str) -> tuple[int, bytes]:
        return self.admin_request("GET", path)

    def admin_post(self, path: str) -> tuple[int, bytes]:
        return self.admin_request("POST", path, b"")

    def listeners(self) -> dict[str, tuple[str, int]]:
        """``GET /listeners?format=json`` -> ``{name: (address, port)}``."""
        status, body = self.admin_get("/listeners?format=json")
        if status != 200:
            raise AgentError(f"/listeners?format=json answered {status}: {body[:200]!r}")
        out = {}
        for entry in json.loads(body)["listener_statuses"]:
            sa = entry["local_address"]["socket_address"]
            out[entry["name"]] = (sa["address"], int(sa["port_value"]))
        return out

    def port(self, listener: str) -> int:
        """The bound port of listener ``listener`` (cached; reload keeps listeners on their ports)."""
        if listener not in self._ports:
            found = self.listeners()
            if listener not in found:
                raise AgentError(f"no listener named {listener!r}; have {sorted(found)}")
            self._ports[listener] = found[listener][1]
        return self._ports[listener]

    def stats(self) -> dict[str, int]:
        """``GET /stats?format=json`` -> ``{name: value}`` (counters and gauges)."""
        status, body = self.admin_get("/stats?format=json")
        if status != 200:
            raise AgentError(f"/stats?format=json answered {status}: {body[:200]!r}")
        out: dict[str, int] = {}
        for entry in json.loads(body).get("stats", []):
            if "name" in entry and "value" in entry:
                out[entry["name"]] = int(entry["value"])
        return out

    def stat(self, name: str, default: int = 0) -> int:
        return self.stats().get(name, default)

    def wait_stat(self, name: str, predicate: Predicate = 1, timeout: float = 10.0) -> int:
        """Poll ``/stats`` until ``predicate(value)`` holds (an int ``n`` means ``value >= n``)."""
        pred = _predicate(predicate)
        last: dict[str, int] = {}

        def check() -> int | bool:
            self._check_alive()
            last.update(self.stats())
            v = last.get(name, 0)
            return (v if v else True) if pred(v) else False

        try:
            wait_for(check, timeout, message=f"stat {name}")
        except TimeoutError as exc:
            prefix = name.rsplit(".", 1)[0] + "."
            near = dict(list({k: v for k, v in last.items() if k.startswith(prefix) and v}.items())[:25])
            raise TimeoutError(
                f"stat {name}={last.get(name)} never satisfied the predicate; related: {near}"
            ) from exc
        return last.get(name, 0)

    async def await_stat(self, name: str, predicate: Predicate = 1, within: float = 10.0) -> int:
        """``wait_stat`` for async tests (does not block the event loop)."""
        pred = _predicate(predicate)

        async def check() -> bool:
            return pred((await asyncio.to_thread(self.stats)).get(name, 0))

        await async_wait_for(check, within, message=f"stat {name}")
        return (await asyncio.to_thread(self.stats)).get(name, 0)

    def config_dump(self) -> str:
        status, body = self.admin_get("/config_dump")
        if status != 200:
            raise AgentError(f"/config_dump answered {status}")
        return body.decode("utf-8", "replace")

    # ------------------------------------------------------------------ reload
    def reload(
        self, config: dict[str, Any], *, expect_rejected: str | None = None, timeout: float = 15.0
    ) -> None:
        """Rewrite the config file and send SIGHUP; return once the outcome is visible.

        By default wait until ``server.reload_success`` grew and ``/config_dump`` shows the new file (its
        generation marker in node.metadata). With ``expect_rejected=TEXT`` wait instead until
        ``server.reload_rejected`` grew and the agent logged TEXT (the validation error), then check that the
        old config is still the live one.
        """
        old_generation = self.generation
        before = self.stats()
        log_mark = self.log_marks()
        marker = self._write_config(config)
        self.signal(signal.SIGHUP)
        if expect_rejected is None:
            wait_for(
                lambda: self._check_alive() or marker in self.config_dump(),
                timeout,
                message=f"{self.name}: reload to {marker} visible in /config_dump",
            )
            self.wait_stat("server.reload_success", before.get("server.reload_success", 0) + 1, timeout)
            self.generation = marker
            self.config = copy.deepcopy(config)
            self._ports.clear()
        else:
            self.wait_stat("server.reload_rejected", before.get("server.reload_rejected", 0) + 1, timeout)

            def logged() -> bool:
                self._check_alive()
                return expect_rejected in self.log_since(log_mark)

            wait_for(logged, timeout, message=f"{self.name}: rejection logged ({expect_rejected!r})")
            dump = self.config_dump()
            if marker in dump or old_generation not in dump:
                raise AgentError(f"{self.name}: a rejected config became live")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Agent {self.name} {state} admin={self.admin_host}:{self.admin_port} gen={self.generation}>"
