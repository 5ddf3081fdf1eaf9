"""A real nginx on loopback for integration tests: HTTP/1.1, h2c (prior knowledge) and TLS + ALPN h2.

    srv = NginxServer(tmp_path).start()      # or: with NginxServer(tmp_path) as srv: ...
    srv.port, srv.h2c_port, srv.tls_port     # three listeners on 127.0.0.1, same locations
    srv.ca_pem                               # PEM of the CA that signed the TLS certificate
    srv.stop()

nginx runs in the foreground as a subprocess (``daemon off; master_process off;``) with its pid file, logs
and temp directories inside ``tmp_path``. nginx cannot bind port 0, so free ports are picked by binding
port 0 and closing the socket; if nginx then fails with "Address already in use" it is restarted on new
ports (a few times). ``start()`` returns once every port accepts connections (polled, with a deadline).

Default location map (every listener):

==========================  ====================================================================
``/``                       200 ``ok\\n`` (text/plain)
``/hello``                  200 ``hello from nginx\\n`` with response header ``x-upstream: nginx``
``/echo-meta``              200 ``method=<m> uri=<uri> host=<host> proto=<proto> te=<te> cl=<len>\\n``
``/upload``                 200 ``received <content-length>\\n`` after reading (and discarding) the body
                            (``client_max_body_size 64m``)
``/status/<code>``          that status for 200, 201, 204, 301, 400, 403, 404, 429, 500, 502, 503, 504
``/big``                    a static file of ``BIG_SIZE`` bytes (``big_body()`` returns its content)
``/close``                  200 with ``Connection: close`` (nginx closes after answering)
==========================  ====================================================================

``locations={"/x": "return 200 'x';"}`` adds or replaces location blocks (the value is the block body).
``keepalive_requests`` and ``keepalive_timeout`` can be set for keep-alive tests.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = [
    "BIG_SIZE",
    "CLIENT_URI",
    "SERVER_URI",
    "NginxServer",
    "big_body",
    "free_port",
    "make_test_pki",
    "nginx_available",
]

BIG_SIZE = 1024 * 1024 + 123
SERVER_URI = "spiffe://microenvoy.test/upstream/nginx"
"""URI SAN of the generated server certificate."""
CLIENT_URI = "spiffe://microenvoy.test/device/upstream-client"
"""URI SAN of the generated client certificate."""
_STATUSES = (200, 201, 204, 301, 400, 403, 404, 429, 500, 502, 503, 504)


def nginx_available() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


def _nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    """A port that was free a moment ago (bind 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def big_body() -> bytes:
    """The content served at ``/big``."""
    pattern = bytes(range(256))
    return (pattern * (BIG_SIZE // 256 + 1))[:BIG_SIZE]


def make_test_pki(directory: Path, names: tuple[str, ...] = ("localhost",)) -> dict[str, Path]:
    """A CA, a server certificate (SANs: ``names``, 127.0.0.1, ::1, ``SERVER_URI``) and a client certificate
    (SANs: ``CLIENT_URI``, ``client.microenvoy.test``), ECDSA P-256, signed by the CA.

    Returns paths ``ca``, ``cert`` (leaf + CA chain), ``key`` (mode 0600), ``client_cert``, ``client_key``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("nginx test CA"))
        .issuer_name(name("nginx test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.UniformResourceIdentifier(SERVER_URI),
    ]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name(names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (
        x509.CertificateBuilder()
        .subject_name(name("upstream-client"))
        .issuer_name(ca.subject)
        .public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(CLIENT_URI), x509.DNSName("client.microenvoy.test")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = {
        "ca": directory / "ca.pem",
        "cert": directory / "server-chain.pem",
        "key": directory / "server.key",
        "client_cert": directory / "client.pem",
        "client_key": directory / "client.key",
    }
    paths["client_cert"].write_bytes(client.public_bytes(pem))
    paths["client_key"].write_bytes(
        client_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    paths["key"].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths["key"].chmod(0o600)
    return paths


class NginxServer:
    """nginx with three listeners (HTTP/1.1, h2c, TLS h2 + http/1.1) serving the location map above."""

    def __init__(
        self,
        tmp_path: Path,
        locations: Mapping[str, str] | None = None,
        *,
        keepalive_requests: int = 1000,
        keepalive_timeout: str = "75s",
        startup_timeout: float = 10.0,
    ) -> None:
        self.root = Path(tmp_path) / f"nginx-{os.getpid()}-{id(self):x}"
        self.locations = dict(locations or {})
        self.keepalive_requests = keepalive_requests
        self.keepalive_timeout = keepalive_timeout
        self.startup_timeout = startup_timeout
        self.port = 0
        self.h2c_port = 0
        self.tls_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.pki: dict[str, Path] = {}

    # -- paths ------------------------------------------------------------------------------------
    @property
    def ca_pem(self) -> bytes:
        return self.pki["ca"].read_bytes()

    @property
    def error_log(self) -> Path:
        return self.root / "logs" / "error.log"

    def error_log_text(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> NginxServer:
        for sub in ("logs", "tmp", "html"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if not self.pki:
            self.pki = make_test_pki(self.root / "pki")
        (self.root / "html" / "big").write_bytes(big_body())
        last_error = ""
        for _attempt in range(5):
            self.port, self.h2c_port, self.tls_port = free_port(), free_port(), free_port()
            if len({self.port, self.h2c_port, self.tls_port}) < 3:
                continue
            conf = self.root / "nginx.conf"
            conf.write_text(self._config())
            with contextlib.suppress(FileNotFoundError):
                self.error_log.unlink()
            self.proc = subprocess.Popen(
                [
                    _nginx_binary(),
                    "-p",
                    str(self.root),
                    "-c",
                    str(conf),
                    "-e",
                    str(self.error_log),
                    "-g",
                    "daemon off; master_process off;",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if self._wait_ready():
                return self
            last_error = self._stop_proc()
            if "Address already in use" not in last_error:
                break
        raise RuntimeError(f"nginx did not start: {last_error}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        pending = [self.port, self.h2c_port, self.tls_port]
        while pending and time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            port = pending[0]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    pending.pop(0)
            except OSError:
                # Not listening yet: wait for the process to change state (bounded), then poll again.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.02)
        return not pending

    def _stop_proc(self) -> str:
        out = ""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
            if self.proc.stderr is not None:
                out = self.proc.stderr.read().decode(errors="replace")
                self.proc.stderr.close()
            self.proc = None
        return out + self.error_log_text()

    def stop(self) -> None:
        self._stop_proc()

    def __enter__(self) -> NginxServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.proc is not None and self.proc.poll() is None else "stopped"
        return f"<NginxServer {state} http={self.port} h2c={self.h2c_port} tls={self.tls_port}>"

    # -- configuration ----------------------------------------------------------------------------
    def _location_map(self) -> dict[str, str]:
        locs: dict[str, str] = {
            "= /": "default_type text/plain; return 200 'ok\\n';",
            "= /hello": (
                "default_type text/plain; add_header x-upstream nginx; return 200 'hello from nginx\\n';"
            ),
            "= /echo-meta": (
                "default_type text/plain; return 200 'method=$request_method uri=$request_uri host=$host "
                "proto=$server_protocol te=$http_transfer_encoding cl=$http_content_length\\n';"
            ),
            "= /upload": (
                "default_type text/plain; client_max_body_size 64m; client_body_buffer_size 1m;"
                " return 200 'received $content_length\\n';"
            ),
            "= /big": "default_type application/octet-stream;",
            "= /close": "default_type text/plain; keepalive_timeout 0; return 200 'bye\\n';",
        }
        for code in _STATUSES:
            locs[f"= /status/{code}"] = f"default_type text/plain; return {code} 'status {code}\\n';"
        for path, body in self.locations.items():
            key = (
                path if path.startswith(("=", "~", "^~")) else f"= {path}" if not path.endswith("/") else path
            )
            locs[key] = body
        return locs

    def _config(self) -> str:
        r = self.root
        locations = "\n".join(f"        location {p} {{ {b} }}" for p, b in self._location_map().items())
        return f"""
pid {r}/nginx.pid;
error_log {self.error_log} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {r}/tmp/body;
    proxy_temp_path {r}/tmp/proxy;
    fastcgi_temp_path {r}/tmp/fastcgi;
    uwsgi_temp_path {r}/tmp/uwsgi;
    scgi_temp_path {r}/tmp/scgi;
    keepalive_requests {self.keepalive_requests};
    keepalive_timeout {self.keepalive_timeout};
    server {{
        listen 127.0.0.1:{self.port};
        listen 127.0.0.1:{self.h2c_port} http2;
        listen 127.0.0.1:{self.tls_port} ssl http2;
        server_name localhost;
        ssl_certificate {self.pki["cert"]};
        ssl_certificate_key {self.pki["key"]};
        root {r}/html;
{locations}
    }}
}}
"""
