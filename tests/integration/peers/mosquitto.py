"""A real mosquitto 2.0 broker on loopback for the MQTT tests (a reference peer and an upstream cluster).

    broker = MosquittoBroker(tmp_path).start()          # or: with MosquittoBroker(tmp_path) as broker: ...
    broker.port                                         # plain MQTT listener on 127.0.0.1
    broker.tls_port                                     # TLS listener (tls=CertBundle), 0 if none
    broker.log_text()                                   # everything mosquitto logged so far (log_type all)
    broker.stop()

Options: ``users={"alice": "pw"}`` writes a password file with ``mosquitto_passwd -b`` (so the file is in
mosquitto's own ``$7$`` format, which ``microenvoy.mqtt.auth`` also reads: ``broker.password_file``);
``acl="user alice\\ntopic readwrite alice/#\\n"`` writes an ACL file (``broker.acl_file``);
``allow_anonymous`` (default True without ``users``, False with); ``tls=certs`` (peers/certs.py) adds a TLS
listener with the test server certificate, ``require_certificate=True`` asks clients for one signed by the
test CA and ``use_identity_as_username=True`` makes its CN the username; ``extra_config`` is appended to
the generated mosquitto.conf (per-listener settings apply to the TLS listener, which comes last).

mosquitto cannot bind port 0 for TCP (``listener 0`` means a unix socket), so free ports are picked by binding
port 0 and closing the socket; if mosquitto then fails with "Address already in use" it is restarted on new
ports (a few times). ``start()`` returns once every port accepts TCP connections (polled, with a deadline).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from peers.certs import CertBundle

__all__ = ["MOSQUITTO", "MosquittoBroker", "free_port", "mosquitto_available"]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def mosquitto_available() -> bool:
    """mosquitto and its clients (mosquitto_pub, mosquitto_sub, mosquitto_passwd) are installed."""
    return Path(MOSQUITTO).exists() and all(
        shutil.which(tool) for tool in ("mosquitto_pub", "mosquitto_sub", "mosquitto_passwd")
    )


def free_port() -> int:
    """A port that was free a moment ago (bind 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MosquittoBroker:
    """One mosquitto process with a generated config in its own directory under ``tmp_path``."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        allow_anonymous: bool | None = None,
        tls: CertBundle | None = None,
        require_certificate: bool = False,
        use_identity_as_username: bool = False,
        extra_config: str = "",
        startup_timeout: float = 10.0,
    ) -> None:
        self.root = Path(tmp_path) / f"mosquitto-{os.getpid()}-{id(self):x}"
        self.users = dict(users or {})
        self.acl = acl
        self.allow_anonymous = (not self.users) if allow_anonymous is None else allow_anonymous
        self.tls = tls
        self.require_certificate = require_certificate
        self.use_identity_as_username = use_identity_as_username
        self.extra_config = extra_config
        self.startup_timeout = startup_timeout
        self.port = 0
        self.tls_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # -- paths ------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.root / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.root / "mosquitto.log"

    @property
    def password_file(self) -> Path | None:
        return self.root / "passwd" if self.users else None

    @property
    def acl_file(self) -> Path | None:
        return self.root / "acl" if self.acl is not None else None

    @property
    def output_file(self) -> Path:
        return self.root / "mosquitto.out"

    def log_text(self) -> str:
        """mosquitto's log so far (its log file, flushed per line, then its stdout/stderr)."""
        text = ""
        for path in (self.log_file, self.output_file):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        return text

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> MosquittoBroker:
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_auth_files()
        last_error = ""
        for _attempt in range(5):
            self.port = free_port()
            self.tls_port = free_port() if self.tls is not None else 0
            if self.port == self.tls_port:
                continue
            self.config_file.write_text(self._config())
            for path in (self.log_file, self.output_file):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            with self.output_file.open("wb") as log:
                self.proc = subprocess.Popen(
                    [MOSQUITTO, "-c", str(self.config_file)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if self._wait_ready():
                return self
            self._stop_proc()
            last_error = self.log_text()
            if "Address already in use" not in last_error:
                break
        raise RuntimeError(f"mosquitto did not start:\n{last_error}")

    def _write_auth_files(self) -> None:
        pw = self.password_file
        if pw is not None:
            pw.write_text("")
            pw.chmod(0o600)
            for user, password in self.users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(pw), user, password],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
        acl = self.acl_file
        if acl is not None:
            acl.write_text(self.acl or "")
            acl.chmod(0o600)

    def _config(self) -> str:
        lines = [
            # Started as root, mosquitto would switch to the "mosquitto" user, which cannot read our files.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "persistence false",
            f"log_dest file {self.log_file}",
            "log_type all",
            "log_timestamp false",
            "per_listener_settings false",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
        ]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        lines.append(f"listener {self.port} 127.0.0.1")
        if self.tls is not None:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                f"cafile {self.tls.ca_cert}",
                f"require_certificate {'true' if self.require_certificate else 'false'}",
                f"use_identity_as_username {'true' if self.use_identity_as_username else 'false'}",
            ]
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        pending = [p for p in (self.port, self.tls_port) if p]
        while pending and time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.2):
                    pending.pop(0)
            except OSError:
                # Not listening yet: wait for the process to change state (bounded), then poll again.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.02)
        return not pending

    def _stop_proc(self) -> int | None:
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
            rc = self.proc.returncode
            self.proc = None
        return rc

    def stop(self) -> int | None:
        """Stop mosquitto (SIGTERM, then SIGKILL after 5 s); returns its exit status."""
        return self._stop_proc()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MosquittoBroker {state} port={self.port} tls={self.tls_port} users={len(self.users)}>"
