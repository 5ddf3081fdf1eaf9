"""The agent's node identity: a short-lived client certificate from controlplane-lite's CA, kept renewed.

``dynamic_resources.microenvoy.identity`` (``microenvoy.config.xds.IdentityConfig``) turns it on. At start,
without a valid certificate in ``dir``, the agent makes a P-256 key and a CSR and calls the control plane's
``/microenvoy.controlplane.v1.Identity/Enroll`` (a unary gRPC call, CBOR maps, over the agent's own HTTP/2
client: ``cluster.open_stream`` on ``enrollment_cluster``, TLS without a client certificate) with the
one-time token from ``bootstrap_token_file``. The answer's certificate is checked (our key, our SPIFFE id,
issued by ``ca_file`` when given) and stored atomically: ``identity.pem`` (key + certificate, mode 0600,
written to a temp file, fsynced, renamed) is the one file TLS loads, so key and certificate never
mismatch; ``cert.pem`` and ``ca.pem`` are public copies.

The xDS clusters present the certificate: ``attach(cluster)`` hands ``identity.pem`` to the cluster
(``UpstreamCluster.reload_tls``), which builds its TLS context again for new connections and drains the
pooled ones (a stream in flight finishes on its connection). ``XdsSession`` waits for ``ready()`` and calls
``attach`` before each stream, so a cluster rebuilt by a reload gets the certificate too.

Renewal: at ``not_after - min(renew_before, lifetime / 2)`` a new key and CSR go to the same method
*without* a token over the xDS cluster, whose connection presents the current certificate; failures retry
with jittered backoff (1 s to 60 s). A certificate that expired anyway falls back to the token path.
Stats: ``xds.identity.enroll_success|enroll_failed|renew_success|renew_failed`` and the gauge
``xds.identity.expiration_unix_time_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from microenvoy.codecs.grpc import GrpcMessageDecoder, encode_message, percent_decode_grpc_message
from microenvoy.core.headers import Headers

if TYPE_CHECKING:
    from microenvoy.config.xds import IdentityConfig
    from microenvoy.io.server import Server
    from microenvoy.io.upstream import UpstreamCluster

__all__ = ["ENROLL_PATH", "IdentityError", "LoadedIdentity", "XdsIdentity", "load_identity"]

log = logging.getLogger("microenvoy.xds.identity")

ENROLL_PATH = b"/microenvoy.controlplane.v1.Identity/Enroll"
IDENTITY_FILE = "identity.pem"
CERT_FILE = "cert.pem"
CA_FILE = "ca.pem"
_CALL_TIMEOUT = 15.0
_MAX_RESPONSE = 256 * 1024
_BACKOFF_MIN = 1.0
_BACKOFF_MAX = 60.0
_MAX_SLEEP = 300.0
"""Re-check at least this often: a device clock that jumps must not push a renewal past the expiry."""
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\r?\n?", re.S)


class IdentityError(Exception):
    """Enrollment or renewal failed, or a stored/issued certificate is not usable; the message says why."""


@dataclass(frozen=True, slots=True)
class LoadedIdentity:
    """A usable identity from ``identity.pem``."""

    path: str
    """The PEM file (key + certificate) TLS loads."""
    not_before: float
    not_after: float
    spiffe_id: str


def _spiffe_ids(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]


def _check_certificate(
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    node_id: str,
    ca: x509.Certificate | None,
    now: float,
) -> str:
    """The certificate's SPIFFE id if it is ours and usable at ``now``; ``IdentityError`` otherwise."""
    if cert.public_key() != key.public_key():
        raise IdentityError("the certificate is not for our key")
    ids = [u for u in _spiffe_ids(cert) if u.endswith(f"/agent/{node_id}")]
    if not ids:
        raise IdentityError(f"the certificate has no SPIFFE id for node {node_id!r}")
    if now >= cert.not_valid_after_utc.timestamp():
        raise IdentityError("the certificate has expired")
    if ca is not None:
        try:
            cert.verify_directly_issued_by(ca)
        except Exception as exc:
            raise IdentityError(f"the certificate is not issued by ca_file ({exc})") from None
    return ids[0]


def _load_ca(path: str | None) -> x509.Certificate | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def load_identity(directory: str, node_id: str, *, ca_file: str | None = None, now: float) -> LoadedIdentity:
    """The identity in ``directory`` if present and usable (``IdentityError`` / ``OSError`` otherwise)."""
    path = os.path.join(directory, IDENTITY_FILE)
    with open(path, "rb") as f:
        data = f.read()
    key: ec.EllipticCurvePrivateKey | None = None
    cert: x509.Certificate | None = None
    try:
        for m in _PEM_BLOCK.finditer(data):
            if m.group(1).endswith(b"PRIVATE KEY") and key is None:
                k = serialization.load_pem_private_key(m.group(0), None)
                if not isinstance(k, ec.EllipticCurvePrivateKey):
                    raise IdentityError("the key is not an EC key")
                key = k
            elif m.group(1) == b"CERTIFICATE" and cert is None:
                cert = x509.load_pem_x509_certificate(m.group(0))
    except ValueError as exc:
        raise IdentityError(f"{path}: unreadable ({exc})") from None
    if key is None or cert is None:
        raise IdentityError(f"{path}: needs a private key and a certificate")
    spiffe = _check_certificate(cert, key, node_id, _load_ca(ca_file), now)
    return LoadedIdentity(
        path, cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp(), spiffe
    )


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_key_and_csr(node_id: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh P-256 key and a CSR for it (the CA sets the real subject and SAN)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


class XdsIdentity:
    """See the module docstring."""

    def __init__(
        self, server: Server, config: IdentityConfig, *, xds_clusters: tuple[str, ...], authority: str = ""
    ) -> None:
        self.server = server
        self.config = config
        self.node_id = server.bootstrap.node.id
        self.xds_clusters = xds_clusters
        self.authority = authority
        self.path = os.path.join(config.dir, IDENTITY_FILE)
        self.current: LoadedIdentity | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._generation = 0
        self._attached: dict[int, int] = {}
        stats = server.stats
        self.enroll_success = stats.counter("xds.identity.enroll_success")
        self.enroll_failed = stats.counter("xds.identity.enroll_failed")
        self.renew_success = stats.counter("xds.identity.renew_success")
        self.renew_failed = stats.counter("xds.identity.renew_failed")
        self.expiration = stats.gauge("xds.identity.expiration_unix_time_seconds")

    def __repr__(self) -> str:
        until = (
            "-"
            if self.current is None
            else time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.current.not_after))
        )
        return f"<XdsIdentity node={self.node_id} valid_until={until}>"

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load a stored identity (if usable) and start the enroll/renew task."""
        os.makedirs(self.config.dir, mode=0o700, exist_ok=True)
        for name in self.xds_clusters:
            cluster = self.server.clusters.get(name)
            if cluster is not None and cluster.config.transport_socket is None:
                log.warning("identity: xDS cluster %s has no transport_socket: its stream is not mTLS", name)
        try:
            self._use(await asyncio.to_thread(self._load))
            log.info("identity %s valid until %s", self.current and self.current.spiffe_id, self._until())
        except FileNotFoundError:
            log.info("no identity in %s yet: enrolling with the bootstrap token", self.config.dir)
        except (OSError, IdentityError) as exc:
            log.warning("stored identity not usable (%s): enrolling with the bootstrap token", exc)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def ready(self) -> None:
        """Wait until there is a usable certificate."""
        await self._ready.wait()

    def attach(self, cluster: UpstreamCluster) -> None:
        """Make ``cluster`` present the current certificate (no-op if it already does)."""
        if self.current is None or self._attached.get(id(cluster)) == self._generation:
            return
        if cluster.config.transport_socket is None:  # plain h2c: nothing to present the certificate on
            return
        cluster.reload_tls(self.path)
        self._attached[id(cluster)] = self._generation

    def _until(self) -> str:
        if self.current is None:
            return "-"
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.current.not_after))

    def _load(self) -> LoadedIdentity:
        return load_identity(self.config.dir, self.node_id, ca_file=self.config.ca_file, now=time.time())

    def _use(self, ident: LoadedIdentity) -> None:
        self.current = ident
        self._generation += 1
        self._attached.clear()
        self.expiration.set(int(ident.not_after))
        for name in self.xds_clusters:
            cluster = self.server.clusters.get(name)
            if cluster is not None:
                self.attach(cluster)
        self._ready.set()

    def renew_at(self) -> float:
        """When the current certificate should be renewed (wall clock)."""
        assert self.current is not None
        lifetime = self.current.not_after - self.current.not_before
        return self.current.not_after - min(self.config.renew_before, lifetime / 2)

    # ------------------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        failures = 0
        while True:
            now = time.time()
            if self.current is not None and now < self.renew_at():
                await asyncio.sleep(min(_MAX_SLEEP, self.renew_at() - now))
                continue
            renewing = self.current is not None and now < self.current.not_after
            try:
                if renewing:
                    await self.renew()
                else:
                    await self.enroll()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                (self.renew_failed if renewing else self.enroll_failed).inc()
                delay = min(_BACKOFF_MAX, _BACKOFF_MIN * 2 ** min(failures - 1, 10))
                delay = delay / 2 + self.server.random.uniform(0, delay / 2)
                log.warning(
                    "identity: %s failed (%s); retrying in %.1fs",
                    "renewal" if renewing else "enrollment",
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def enroll(self) -> LoadedIdentity:
        """First certificate: the bootstrap token over ``enrollment_cluster`` (or the first xDS cluster)."""
        if self.config.bootstrap_token_file is None:
            raise IdentityError("no usable certificate and no bootstrap_token_file to enroll with")
        token = (await asyncio.to_thread(_read_text, self.config.bootstrap_token_file)).strip()
        if not token:
            raise IdentityError(f"{self.config.bootstrap_token_file} is empty")
        ident = await self._request(self.config.enrollment_cluster or self.xds_clusters[0], token)
        self.enroll_success.inc()
        log.info("identity: enrolled as %s, valid until %s", ident.spiffe_id, self._until())
        return ident

    async def renew(self) -> LoadedIdentity:
        """A new key and certificate, authenticated by the current certificate over the xDS cluster."""
        ident = await self._request(self.xds_clusters[0], None)
        self.renew_success.inc()
        log.info("identity: renewed %s, valid until %s", ident.spiffe_id, self._until())
        return ident

    async def _request(self, cluster_name: str, token: str | None) -> LoadedIdentity:
        key, csr = await asyncio.to_thread(new_key_and_csr, self.node_id)
        request: dict[str, Any] = {"node_id": self.node_id, "csr_pem": csr}
        if token is not None:
            request["token"] = token
        response = await self.call(cluster_name, cbor2.dumps(request))
        try:
            msg = cbor2.loads(response)
            cert_pem = msg["certificate_pem"]
            ca_pem = msg.get("ca_pem", "")
            cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
        except Exception as exc:
            raise IdentityError(f"malformed Enroll response ({exc})") from None
        ca = _load_ca(self.config.ca_file) if self.config.ca_file else None
        _check_certificate(cert, key, self.node_id, ca, time.time())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        cert_bytes = cert.public_bytes(serialization.Encoding.PEM)
        ca_bytes = ca_pem.encode("ascii") if isinstance(ca_pem, str) else b""
        await asyncio.to_thread(self._store, key_pem, cert_bytes, ca_bytes)
        ident = await asyncio.to_thread(self._load)
        self._use(ident)
        return ident

    def _store(self, key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> None:
        d = self.config.dir
        _write_atomically(self.path, key_pem + cert_pem, 0o600)
        _write_atomically(os.path.join(d, CERT_FILE), cert_pem, 0o644)
        if ca_pem:
            _write_atomically(os.path.join(d, CA_FILE), ca_pem, 0o644)
        _fsync_dir(d)

    async def call(self, cluster_name: str, request: bytes) -> bytes:
        """One unary ``Enroll`` call over ``cluster_name``; the response message (``IdentityError``)."""
        from microenvoy.io.xds import grpc_target

        try:
            cluster, host, headers = grpc_target(
                self.server.clusters, cluster_name, ENROLL_PATH, self.authority
            )
        except ConnectionError as exc:
            raise IdentityError(str(exc)) from exc
        async with asyncio.timeout(_CALL_TIMEOUT):
            stream = await cluster.open_stream(host, headers, end_stream=False)
            try:
                await stream.send_data(encode_message(request), True)
                head = await stream.read_headers()
                if head.get(b":status") != b"200":
                    raise IdentityError(f"the control plane answered :status {head.get(b':status')!r}")
                status = head.get(b"grpc-status")
                trailers: Headers | None = head if status is not None else None
                decoder = GrpcMessageDecoder(_MAX_RESPONSE)
                messages: list[bytes] = []
                while trailers is None:
                    item = await stream.read_body()
                    if item is None:
                        break
                    if isinstance(item, Headers):
                        trailers = item
                        break
                    messages += [m for _, m in decoder.feed(item)]
            finally:
                stream.reset()
        status = trailers.get(b"grpc-status") if trailers is not None else None
        if status != b"0":
            message = trailers.get(b"grpc-message") if trailers is not None else None
            text = percent_decode_grpc_message(message) if message else ""
            raise IdentityError(
                f"Enroll refused: grpc-status {status.decode() if status else 'missing'} {text}".rstrip()
            )
        if len(messages) != 1:
            raise IdentityError(f"Enroll answered {len(messages)} messages, not 1")
        return messages[0]


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()
