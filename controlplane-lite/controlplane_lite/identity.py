"""Agent enrollment: one-time bootstrap tokens and the ``Identity/Enroll`` method's rules (no gRPC here).

**Tokens** (``controlplane-lite token --node ID``) are 256-bit random strings; only their SHA-256 is stored
(``DATA/identity.sqlite``, table ``tokens``) with the node id they are bound to, an expiry, and the time
they were used. A token enrolls exactly one CSR for exactly its node, once, before it expires.

**Enroll** (``/microenvoy.controlplane.v1.Identity/Enroll``, unary, CBOR maps as in the xDS contract):
request ``{node_id, csr_pem, token?}``, response ``{certificate_pem, ca_pem, not_after}`` (``not_after``
in seconds since the epoch). With a ``token`` it is a first enrollment; without one it is a **renewal**,
allowed only over a connection presenting a valid client certificate of this CA for the same node id.
Every certificate issued is recorded (table ``issued``) for the audit trail.

``EnrollError.code`` is the gRPC status name the server answers with (``INVALID_ARGUMENT`` for a malformed
request or CSR, ``UNAUTHENTICATED`` for a bad/used/expired/foreign token or a missing/foreign certificate).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cbor2

from controlplane_lite.ca import CertificateAuthority, CsrError, node_id_problem

__all__ = [
    "DEFAULT_TOKEN_TTL",
    "ENROLL_METHOD",
    "EnrollError",
    "Enroller",
    "TokenStore",
    "decode_enroll_request",
    "encode_enroll_response",
    "peer_node_id",
]

ENROLL_METHOD = "/microenvoy.controlplane.v1.Identity/Enroll"
DEFAULT_TOKEN_TTL = 3600.0
_MAX_REQUEST = 64 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
CREATE TABLE IF NOT EXISTS issued (
    serial TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    issued_at REAL NOT NULL,
    not_after REAL NOT NULL,
    how TEXT NOT NULL
);
"""


class EnrollError(Exception):
    """An enrollment the control plane refuses: ``code`` (gRPC status name) and ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class TokenStore:
    """Bootstrap tokens (hashed) and the issued-certificate log, in SQLite (``:memory:`` for tests)."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        self._db.executescript(_SCHEMA)

    def __repr__(self) -> str:
        return f"<TokenStore {self.path}>"

    def close(self) -> None:
        self._db.close()

    def create(self, node_id: str, ttl: float = DEFAULT_TOKEN_TTL) -> str:
        """A new one-time token for ``node_id``, valid ``ttl`` seconds (the only time it is visible)."""
        problem = node_id_problem(node_id)
        if problem:
            raise ValueError(problem)
        if ttl <= 0:
            raise ValueError("the token ttl must be greater than 0")
        token = secrets.token_urlsafe(32)
        now = self.clock()
        self._db.execute(
            "INSERT INTO tokens (hash, node_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
            (_hash(token), node_id, now, now + ttl),
        )
        return token

    def consume(self, token: str, node_id: str) -> None:
        """Use ``token`` for ``node_id`` (``EnrollError`` UNAUTHENTICATED if unknown/used/expired/foreign)."""
        now = self.clock()
        h = _hash(token)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute(
                "SELECT node_id, expires_at, used_at FROM tokens WHERE hash = ?", (h,)
            ).fetchone()
            if row is None:
                raise EnrollError("UNAUTHENTICATED", "unknown bootstrap token")
            bound, expires_at, used_at = row
            if used_at is not None:
                raise EnrollError("UNAUTHENTICATED", "the bootstrap token was already used")
            if now >= expires_at:
                raise EnrollError("UNAUTHENTICATED", "the bootstrap token has expired")
            if bound != node_id:
                raise EnrollError("UNAUTHENTICATED", f"the bootstrap token is not for node {node_id!r}")
            self._db.execute("UPDATE tokens SET used_at = ? WHERE hash = ?", (now, h))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def record_issued(self, node_id: str, serial: int, not_after: float, how: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO issued (serial, node_id, issued_at, not_after, how)"
            " VALUES (?, ?, ?, ?, ?)",
            (format(serial, "x"), node_id, self.clock(), not_after, how),
        )

    def issued(self, node_id: str) -> list[tuple[str, float, float, str]]:
        """``(serial hex, issued_at, not_after, how)`` of every certificate issued to ``node_id``."""
        rows = self._db.execute(
            "SELECT serial, issued_at, not_after, how FROM issued WHERE node_id = ? ORDER BY issued_at",
            (node_id,),
        ).fetchall()
        return [(str(s), float(i), float(n), str(h)) for s, i, n, h in rows]

    def pending(self) -> list[tuple[str, float]]:
        """``(node_id, expires_at)`` of unused, unexpired tokens."""
        rows = self._db.execute(
            "SELECT node_id, expires_at FROM tokens WHERE used_at IS NULL AND expires_at > ? ORDER BY 2",
            (self.clock(),),
        ).fetchall()
        return [(str(n), float(e)) for n, e in rows]


def decode_enroll_request(data: bytes) -> dict[str, str]:
    """``{node_id, csr_pem, token?}`` from CBOR (``EnrollError`` INVALID_ARGUMENT naming the bad field)."""
    if len(data) > _MAX_REQUEST:
        raise EnrollError("INVALID_ARGUMENT", f"request larger than {_MAX_REQUEST} bytes")
    try:
        msg = cbor2.loads(data)
    except Exception as exc:
        raise EnrollError("INVALID_ARGUMENT", f"not CBOR ({exc})") from None
    if not isinstance(msg, dict):
        raise EnrollError("INVALID_ARGUMENT", "the request must be a CBOR map")
    out: dict[str, str] = {}
    for field, required in (("node_id", True), ("csr_pem", True), ("token", False)):
        value = msg.get(field)
        if value is None:
            if required:
                raise EnrollError("INVALID_ARGUMENT", f"{field}: required")
            continue
        if isinstance(value, bytes):
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                raise EnrollError("INVALID_ARGUMENT", f"{field}: must be ASCII text") from None
        if not isinstance(value, str) or not value:
            raise EnrollError("INVALID_ARGUMENT", f"{field}: must be a non-empty string")
        out[field] = value
    return out


def encode_enroll_response(response: Mapping[str, Any]) -> bytes:
    return cbor2.dumps(dict(response), canonical=True)


def peer_node_id(
    ca: CertificateAuthority, auth_context: Mapping[str, Sequence[bytes]], now: float
) -> str | None:
    """The node id of the verified client certificate in a grpcio ``auth_context()`` (None without one)."""
    pems = auth_context.get("x509_pem_cert") or []
    for pem in pems:
        node = ca.verified_node_id(pem, now=now)
        if node is not None:
            return node
    return None


class Enroller:
    """Enrollment and renewal decisions: a request in, a certificate (or ``EnrollError``) out."""

    def __init__(self, ca: CertificateAuthority, tokens: TokenStore) -> None:
        self.ca = ca
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"<Enroller {self.ca!r}>"

    def enroll(self, request: Mapping[str, str], peer: str | None, *, now: float) -> dict[str, Any]:
        """Issue a certificate for ``request`` (see the module docstring); ``peer`` is the node id of the
        connection's verified client certificate, if any."""
        node_id = request["node_id"]
        problem = node_id_problem(node_id)
        if problem:
            raise EnrollError("INVALID_ARGUMENT", f"node_id: {problem}")
        token = request.get("token")
        if token is None and peer != node_id:
            if peer is None:
                raise EnrollError(
                    "UNAUTHENTICATED", "renewal needs the node's current client certificate (or a token)"
                )
            raise EnrollError("UNAUTHENTICATED", f"the client certificate is for {peer!r}, not {node_id!r}")
        # The CSR is checked before the token is spent: a bad CSR must not burn a one-time token.
        try:
            self.ca.check_csr(request["csr_pem"])
        except CsrError as exc:
            raise EnrollError("INVALID_ARGUMENT", f"csr_pem: {exc}") from None
        how = "renewal"
        if token is not None:
            self.tokens.consume(token, node_id)
            how = "token"
        issued = self.ca.issue(request["csr_pem"], node_id, now=now)
        self.tokens.record_issued(node_id, issued.serial, issued.not_after, how)
        return {
            "certificate_pem": issued.certificate_pem.decode("ascii"),
            "ca_pem": self.ca.ca_pem.decode("ascii"),
            "not_after": issued.not_after,
        }
