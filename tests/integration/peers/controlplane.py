"""Run the real ``controlplane-lite serve`` as a subprocess (temp ``--dir`` and ``--data``) for e2e tests.

    cp = ControlPlaneProcess(tmp_path / "cp").start()      # resources in cp.resources, store in cp.data
    cp.write("edge.yaml", [cluster_doc("api", port), listener_doc("edge", [route_to("/", "api")])])
    a = agent(agent_bootstrap(cp.port, cp.public_key(), tmp_path / "cache"))
    cp.wait_acked("test-agent1", LISTENER, "edge")       # the store's per-agent view (what `status` shows)
    cp.kill()                                              # SIGKILL; cp.start(port=cp.port) brings it back

The port is read back from ``DATA/serve.port`` (``--listen 127.0.0.1:0``). Resource files are written
atomically (a hidden temp file, then ``os.replace``) because the control plane polls the directory and skips
hidden files, so it never sees half a file. Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import configs as C
from .common import wait_for

__all__ = [
    "ControlPlaneError",
    "ControlPlaneProcess",
    "agent_bootstrap",
    "cluster_doc",
    "doc_version",
    "listener_doc",
]

REPO_ROOT = Path(__file__).resolve().parents[3]


class ControlPlaneError(RuntimeError):
    """controlplane-lite failed to start, exited early, or a CLI command failed."""


class ControlPlaneProcess:
    """One ``controlplane-lite serve`` process with its resource directory, data directory and logs."""

    def __init__(self, workdir: Path, *, poll_interval: float | None = None, name: str = "cp") -> None:
        self.workdir = workdir
        self.name = name
        self.resources = workdir / "resources"
        """The watched resource directory (``--dir``)."""
        self.data = workdir / "data"
        """``--data``: store.sqlite, signing-key.pem, serve.port."""
        self.poll_interval = poll_interval
        """``--poll-interval`` (None = the CLI's default, 0.5 s)."""
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_path = workdir / f"{name}.stdout.log"
        self.stderr_path = workdir / f"{name}.stderr.log"
        self.resources.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ControlPlaneProcess {self.name} {state} port={self.port}>"

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, port: int = 0, timeout: float = 30.0) -> ControlPlaneProcess:
        """Start ``serve``; return once ``DATA/serve.port`` names the bound port. ``port`` != 0 binds that
        port (a restart on the address agents already know)."""
        port_file = self.data / "serve.port"
        port_file.unlink(missing_ok=True)
        argv = [
            "serve",
            "--dir",
            str(self.resources),
            "--listen",
            f"127.0.0.1:{port}",
            "--log-level",
            "debug",
        ]
        if self.poll_interval is not None:
            argv += ["--poll-interval", str(self.poll_interval)]
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.command(*argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO_ROOT
            )

        def bound() -> bool:
            self._check_alive()
            text = port_file.read_text().strip() if port_file.exists() else ""
            if not text.isdigit():
                return False
            self.port = int(text)
            return True

        try:
            wait_for(bound, timeout, interval=0.02, message=f"{self.name}: {port_file}")
        except (TimeoutError, ControlPlaneError) as exc:
            self.kill()
            raise ControlPlaneError(f"{self.name} did not start: {exc}\n{self.log_tail()}") from exc
        return self

    def command(self, *args: str) -> list[str]:
        """``python -m controlplane_lite <args> --data DATA``."""
        return [sys.executable, "-m", "controlplane_lite", *args, "--data", str(self.data)]

    def _check_alive(self) -> None:
        if self.proc is None:
            raise ControlPlaneError(f"{self.name} is not running")
        rc = self.proc.poll()
        if rc is not None:
            raise ControlPlaneError(f"{self.name} exited with code {rc}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (no goodbye to the agents) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log_text(self) -> str:
        return "\n".join(
            p.read_bytes().decode("utf-8", "replace")
            for p in (self.stdout_path, self.stderr_path)
            if p.exists()
        )

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log output)"

    # ------------------------------------------------------------------ CLI
    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one CLI command against the same data directory."""
        done = subprocess.run(
            self.command(*args), capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=False
        )
        if check and done.returncode != 0:
            raise ControlPlaneError(f"controlplane-lite {' '.join(args)} -> {done.returncode}: {done.stderr}")
        return done

    def public_key(self) -> str:
        """``controlplane-lite keys``: the signing public key to pin in agent bootstraps."""
        return self.cli("keys").stdout.strip()

    def status(self, verbose: bool = False) -> str:
        """``controlplane-lite status [-v]`` output."""
        return self.cli("status", *(["-v"] if verbose else [])).stdout

    # ------------------------------------------------------------------ resources
    def write(self, filename: str, docs: Sequence[dict[str, Any]]) -> dict[tuple[str, str], str]:
        """Write a resource file atomically (YAML documents, one resource each); the content-hash version
        each resource will have, ``(type_url, name) -> version`` (to wait for exactly this change)."""
        path = self.resources / filename
        tmp = self.resources / f".{filename}.tmp"
        tmp.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
        os.replace(tmp, path)
        return {key: version for key, version in map(doc_version, docs)}

    def write_text(self, filename: str, text: str) -> None:
        """Write raw text as a resource file atomically (for files that must not parse)."""
        tmp = self.resources / f".{filename}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.resources / filename)

    def remove(self, filename: str) -> None:
        (self.resources / filename).unlink()

    # ------------------------------------------------------------------ the store's view
    def agent_resources(self, node_id: str) -> dict[tuple[str, str], Any]:
        """``(type_url, name) -> AgentResourceStatus`` for ``node_id`` (read from the SQLite store)."""
        from controlplane_lite.store import Store

        store = Store(str(self.data / "store.sqlite"))
        try:
            return {(r.type_url, r.name): r for r in store.agent_resources(node_id)}
        finally:
            store.close()

    def current_version(self, type_url: str, name: str) -> str | None:
        """The stored (current) version of a resource, None if there is none."""
        from controlplane_lite.store import Store

        store = Store(str(self.data / "store.sqlite"))
        try:
            r = store.get(type_url, name)
            return None if r is None else r.version
        finally:
            store.close()

    def wait_agent(
        self, node_id: str, predicate: Callable[[dict[tuple[str, str], Any]], bool], timeout: float = 15.0
    ) -> dict[tuple[str, str], Any]:
        """Poll the store until ``predicate(agent_resources(node_id))`` holds; the rows."""
        last: dict[tuple[str, str], Any] = {}

        def check() -> bool:
            last.clear()
            last.update(self.agent_resources(node_id))
            return predicate(last)

        try:
            wait_for(check, timeout, message=f"{self.name}: agent {node_id}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; rows: {list(last.values())}\n{self.log_tail()}") from exc
        return dict(last)

    def wait_acked(
        self, node_id: str, type_url: str, name: str, version: str | None = None, timeout: float = 15.0
    ) -> str:
        """Wait until ``node_id`` ACKed ``version`` of ``(type_url, name)`` (default: the stored one; pass the
        version ``write`` returned to wait for a change the control plane may not have read yet)."""
        want: list[str] = []

        def acked(rows: dict[tuple[str, str], Any]) -> bool:
            target = version or self.current_version(type_url, name)
            row = rows.get((type_url, name))
            want[:] = [target or ""]
            return target is not None and row is not None and row.acked_version == target

        self.wait_agent(node_id, acked, timeout)
        return want[0]


# ------------------------------------------------------------------------------------ resource documents
def doc_version(doc: dict[str, Any]) -> tuple[tuple[str, str], str]:
    """``((type_url, name), version)`` of a resource-file document, as the control plane computes it."""
    from controlplane_lite.versions import TYPE_URLS, resource_version

    type_url = TYPE_URLS[doc["type"]]
    resource = {**doc["resource"], "@type": type_url}
    name = doc.get("name") or resource.get("name") or resource.get("cluster_name", "")
    return (type_url, str(name)), resource_version(resource)


def _without_type(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "@type"}


def cluster_doc(name: str, port: int | Sequence[int], **extra: Any) -> dict[str, Any]:
    """A resource-file document: an h2c STATIC cluster on loopback ``port``."""
    return {"type": "cluster", "resource": _without_type(C.cluster(name, port, http2=True, **extra))}


def listener_doc(
    name: str, routes: Iterable[dict[str, Any]], *, port: int = 0, stat_prefix: str | None = None
) -> dict[str, Any]:
    """A resource-file document: a TCP listener on ``127.0.0.1:port`` with an HCM holding ``routes``."""
    listener = C.tcp_listener(name, C.hcm(stat_prefix or name, routes), port=port)
    return {"type": "listener", "resource": listener}


def agent_bootstrap(
    cp_port: int,
    trusted_keys: str | Sequence[str],
    cache_dir: Path | None,
    *,
    fetch_timeout: str = "10s",
    listeners: Sequence[dict[str, Any]] = (),
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An agent bootstrap whose ``dynamic_resources`` point at a control plane on ``127.0.0.1:cp_port``
    (the static h2c cluster ``xds_cluster``), trusting ``trusted_keys``, caching under ``cache_dir``."""
    keys = [trusted_keys] if isinstance(trusted_keys, str) else list(trusted_keys)
    doc = C.bootstrap(list(listeners), [C.cluster("xds_cluster", cp_port, http2=True)])
    micro: dict[str, Any] = {"trusted_keys": keys}
    if cache_dir is not None:
        micro["cache_dir"] = str(cache_dir)
    doc["dynamic_resources"] = {
        "ads_config": {
            "api_type": "DELTA_GRPC",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
        },
        "cds_config": {"ads": {}, "initial_fetch_timeout": fetch_timeout},
        "lds_config": {"ads": {}, "initial_fetch_timeout": fetch_timeout},
        "microenvoy": micro,
    }
    if metadata:
        doc["node"] = {"metadata": dict(metadata)}
    return doc
