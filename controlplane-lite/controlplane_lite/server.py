"""The gRPC server: one ``DeltaAggregatedResources`` stream per agent, driven by ``delta.DeltaStream``.

A grpcio asyncio server (``grpc.aio``) with a generic handler for
``/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources``: messages are the
contract's CBOR maps (``microenvoy.xds.messages``), so no protobuf is involved. A malformed request ends
the stream with ``INVALID_ARGUMENT`` naming the bad field.

``ControlPlane`` keeps the **catalog** (every stored resource, signed once per version with the control
plane's Ed25519 key) and, per stream, a ``DeltaStream`` fed with the part of the catalog the agent's node
metadata selects. A background task polls every ``poll_interval`` seconds: the resource directory (a change
is validated and stored, or refused and logged) and the store's generation (a ``push`` from another
process); when the store changed, the catalog is rebuilt and every stream is woken to send its delta.
Sent/ACK/NACK events go to the store (``status`` reads them), NACK messages are logged.

**Node identity** (with an ``Enroller``, ``serve --tls``): the xDS port serves TLS with a server certificate
from the control plane's CA and *requires* a client certificate of that CA (mutual TLS at the TLS layer);
the xDS stream additionally checks that the certificate's SPIFFE id names the node id of the first request
(``UNAUTHENTICATED`` otherwise). ``/microenvoy.controlplane.v1.Identity/Enroll`` (``identity.py``) is served
on both ports: on the xDS port it renews (the current certificate authenticates), on the optional
*enrollment port* (TLS, no client certificate: grpcio can only require client certificates or not ask for
them) a new agent trades its one-time bootstrap token for its first certificate. The xDS method on the
enrollment port has no client certificate to check and is refused with ``UNAUTHENTICATED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from microenvoy.core.errors import ConfigError
from microenvoy.xds.messages import (
    DELTA_ADS_METHOD,
    DeltaRequest,
    XdsProtocolError,
    decode_request,
    encode_response,
)

from controlplane_lite.apply import apply_change, stored_specs
from controlplane_lite.ca import CertificateAuthority
from controlplane_lite.delta import Acked, DeltaStream, Event, Nacked, Resource, Sent, StaleNonce, select
from controlplane_lite.identity import (
    ENROLL_METHOD,
    Enroller,
    EnrollError,
    decode_enroll_request,
    encode_enroll_response,
    peer_node_id,
)
from controlplane_lite.rollout import build_catalog  # signed, with staged rollouts (re-exported)
from controlplane_lite.sources import DirectoryWatcher
from controlplane_lite.store import Store

__all__ = ["SERVICE", "ControlPlane", "build_catalog"]

log = logging.getLogger("controlplane_lite")

SERVICE, _, METHOD = DELTA_ADS_METHOD.lstrip("/").partition("/")
IDENTITY_SERVICE, _, ENROLL = ENROLL_METHOD.lstrip("/").partition("/")


def _deserialize(data: bytes) -> DeltaRequest | XdsProtocolError:
    """The request deserializer: never raises, so a bad message becomes a clean INVALID_ARGUMENT."""
    try:
        return decode_request(data)
    except XdsProtocolError as exc:
        return exc


@dataclass(slots=True, eq=False)
class _Conn:
    """One open stream."""

    stream: DeltaStream
    peer: str
    node_id: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    error: str = ""
    code: Any = None
    """The gRPC status the stream ends with when ``error`` is set (default INVALID_ARGUMENT)."""
    identity: str | None = None
    """The node id of the verified client certificate (mTLS), None on an insecure server."""


class ControlPlane:
    """The control plane's server: the gRPC endpoint, the catalog, the directory/store poller."""

    def __init__(
        self,
        store: Store,
        signing_key: Ed25519PrivateKey,
        *,
        directory: str | None = None,
        poll_interval: float = 0.5,
        enroller: Enroller | None = None,
        server_names: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.enroller = enroller
        """With an enroller the server runs mTLS (see the module docstring); None = h2c."""
        self.server_names = server_names
        """Extra SANs of the server certificate (host names/IPs agents dial) besides localhost/loopback."""
        self.enroll_port = 0
        """The bound enrollment port (TLS without client certificates), 0 if none."""
        self.authenticated: dict[str, str] = {}
        """node id -> SPIFFE id of the verified client certificate, for the connected agents."""
        self.signing_key = signing_key
        self.poll_interval = poll_interval
        self.watcher = DirectoryWatcher(directory) if directory else None
        self.port = 0
        """The bound port (after ``start``)."""
        self.directory_errors: list[str] = []
        """Why the last directory change was refused ([] when it was applied)."""
        self._server: Any = None
        self._conns: set[_Conn] = set()
        self._catalog: dict[str, dict[str, Resource]] = {}
        self._signatures: dict[tuple[str, str, str], bytes] = {}
        self._generation = -1
        self._poller: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<ControlPlane port={self.port} agents={len(self._conns)} generation={self._generation}>"

    @property
    def connections(self) -> int:
        return len(self._conns)

    # -- life cycle --------------------------------------------------------------------------------
    @property
    def ca(self) -> CertificateAuthority | None:
        return self.enroller.ca if self.enroller is not None else None

    async def start(self, listen: str = "127.0.0.1:0", enroll_listen: str | None = None) -> int:
        """Load the directory, build the catalog, bind ``listen`` (port 0 = a free port) and serve.

        With an enroller, ``listen`` is mutual TLS and ``enroll_listen`` (if given) the TLS port where
        agents enroll with a bootstrap token (``enroll_port`` after the start)."""
        self.store.reset_connections()
        if self.watcher is not None:
            self.watcher.current = stored_specs(self.store, "dir:")
            self.sync_directory()
        self.refresh()
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                METHOD: grpc.stream_stream_rpc_method_handler(
                    self._handle, request_deserializer=_deserialize, response_serializer=encode_response
                )
            },
        )
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((handler,))
        if self.enroller is None:
            self.port = self._server.add_insecure_port(listen)
        else:
            self._server.add_generic_rpc_handlers(
                (
                    grpc.method_handlers_generic_handler(
                        IDENTITY_SERVICE, {ENROLL: grpc.unary_unary_rpc_method_handler(self._enroll)}
                    ),
                )
            )
            ca = self.enroller.ca
            pair = ca.server_certificate(self.server_names, now=time.time())
            mtls = grpc.ssl_server_credentials([pair], root_certificates=ca.ca_pem, require_client_auth=True)
            self.port = self._server.add_secure_port(listen, mtls)
            if enroll_listen is not None:
                self.enroll_port = self._server.add_secure_port(
                    enroll_listen, grpc.ssl_server_credentials([pair])
                )
                if not self.enroll_port:
                    raise OSError(f"cannot bind {enroll_listen}")
        if not self.port:
            raise OSError(f"cannot bind {listen}")
        await self._server.start()
        self._poller = asyncio.create_task(self._poll_loop())
        log.info("controlplane-lite serving delta xDS on %s (port %d)", listen, self.port)
        return self.port

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._server is not None:
            await self._server.stop(grace)

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- sources -----------------------------------------------------------------------------------
    def sync_directory(self) -> bool:
        """Apply a changed resource directory to the store; True if the store changed."""
        if self.watcher is None:
            return False
        try:
            change = self.watcher.poll()
            if change is None:
                return False
            applied = apply_change(self.store, change.upserts.values(), change.removals, source="dir")
        except ConfigError as exc:
            self.directory_errors = list(exc.errors)
            for e in exc.errors:
                log.warning("resource directory refused, nothing pushed: %s", e)
            return False
        self.directory_errors = []
        self.watcher.accept(change)
        if applied:
            log.info(
                "resource directory: %d changed, %d removed", len(applied.upserts), len(applied.removals)
            )
        return bool(applied)

    def refresh(self) -> bool:
        """Rebuild the catalog if the store changed (any process) and wake every stream."""
        gen = self.store.generation()
        if gen == self._generation:
            return False
        self._generation = gen
        self._catalog = build_catalog(self.store, self.signing_key, self._signatures)
        live = {(t, n, r.version) for t, by in self._catalog.items() for n, r in by.items()}
        for k in [k for k in self._signatures if k not in live]:
            del self._signatures[k]
        for conn in self._conns:
            conn.stream.set_snapshot(select(self._catalog, conn.metadata, conn.node_id), str(gen))
            conn.wake.set()
        return True

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.sync_directory()
                self.refresh()
            except Exception:  # keep serving: a broken poll must not take the control plane down
                log.exception("poll failed")

    # -- streams -----------------------------------------------------------------------------------
    async def _enroll(self, data: bytes, context: Any) -> bytes:
        """``Identity/Enroll``: a certificate for a token or for the current certificate (renewal)."""
        assert self.enroller is not None
        now = time.time()
        peer: str | None = None
        try:
            peer = peer_node_id(self.enroller.ca, context.auth_context(), now)
            request = decode_enroll_request(data)
            response = self.enroller.enroll(request, peer, now=now)
        except EnrollError as exc:
            log.warning("enrollment from %s refused: %s", peer or context.peer(), exc.message)
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
            raise AssertionError("abort returned") from None  # pragma: no cover (abort raises)
        how = "renewed" if "token" not in request else "enrolled"
        log.info("agent %s %s: certificate valid until %s", request["node_id"], how,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(response["not_after"])))  # fmt: skip
        return encode_enroll_response(response)

    async def _handle(self, request_iterator: AsyncIterator[Any], context: Any) -> None:
        identity: str | None = None
        if self.enroller is not None:
            identity = peer_node_id(self.enroller.ca, context.auth_context(), time.time())
            if identity is None:
                log.warning("xDS stream from %s refused: no valid client certificate", context.peer())
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid client certificate is required")
                return
        conn = _Conn(DeltaStream(nonce_prefix=secrets.token_hex(3) + "-"), str(context.peer()))
        conn.identity = identity
        conn.stream.set_snapshot(select(self._catalog, {}), str(self._generation))
        self._conns.add(conn)
        loop = asyncio.get_running_loop()
        reader = asyncio.create_task(self._read(conn, context))
        try:
            while not conn.closed:
                responses, events = conn.stream.poll(loop.time())
                self._record(conn, events)
                for resp in responses:
                    await context.write(resp)
                deadline = conn.stream.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                conn.wake.clear()
                if not conn.closed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(conn.wake.wait(), timeout)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self._conns.discard(conn)
            if conn.identity is not None and conn.node_id == conn.identity:
                self.authenticated.pop(conn.node_id, None)
            if conn.node_id:
                self.store.agent_disconnected(conn.node_id)
                log.info("agent %s disconnected", conn.node_id)
        if conn.error:
            await context.abort(conn.code or grpc.StatusCode.INVALID_ARGUMENT, conn.error)

    async def _read(self, conn: _Conn, context: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    break
                if isinstance(msg, XdsProtocolError):
                    log.warning(
                        "agent %s sent a malformed request: %s", conn.node_id or conn.peer, msg.reason
                    )
                    conn.error = msg.reason
                    break
                self._on_request(conn, msg, loop.time())
                conn.wake.set()
                if conn.error:
                    break
        finally:
            conn.closed = True
            conn.wake.set()

    def _on_request(self, conn: _Conn, req: DeltaRequest, now: float) -> None:
        if (
            conn.identity is not None
            and not conn.node_id
            and (req.node is None or req.node.id != conn.identity)
        ):
            claimed = req.node.id if req.node is not None else "(no node)"
            conn.error = f"the client certificate is for node {conn.identity!r}, not {claimed!r}"
            conn.code = grpc.StatusCode.UNAUTHENTICATED
            log.warning("xDS stream from %s refused: %s", conn.peer, conn.error)
            return
        if req.node is not None and not conn.node_id:
            conn.node_id = req.node.id or f"unknown@{conn.peer}"
            if conn.identity is not None:
                self.authenticated[conn.node_id] = (
                    self.enroller.ca.spiffe_id(conn.identity) if self.enroller else ""
                )
            conn.metadata = dict(req.node.metadata)
            self.store.agent_connected(conn.node_id, req.node.cluster, conn.metadata)
            nacks: dict[str, dict[str, tuple[str, str]]] = {}
            for row in self.store.agent_resources(conn.node_id):
                if row.nack_version and row.nack_version != row.acked_version:
                    nacks.setdefault(row.type_url, {})[row.name] = (row.nack_version, row.nack_message or "")
            for type_url, by_name in nacks.items():
                conn.stream.seed_nacks(type_url, by_name)
            conn.stream.set_snapshot(select(self._catalog, conn.metadata, conn.node_id))
            if conn.identity is not None:
                log.info("agent %s connected from %s as %s", conn.node_id, conn.peer,
                         self.authenticated.get(conn.node_id))  # fmt: skip
            else:
                log.info("agent %s connected from %s", conn.node_id, conn.peer)
        elif not conn.node_id:
            conn.node_id = f"unknown@{conn.peer}"
            self.store.agent_connected(conn.node_id, "", {})
        self._record(conn, conn.stream.on_request(req, now))

    def _record(self, conn: _Conn, events: list[Event]) -> None:
        rows: list[tuple[str, str, str, str, str]] = []
        for e in events:
            if isinstance(e, Sent):
                rows.append(("sent", e.type_url, e.name, e.version, ""))
            elif isinstance(e, Acked):
                rows.append(("acked", e.type_url, e.name, e.version, ""))
            elif isinstance(e, Nacked):
                rows.append(("nacked", e.type_url, e.name, e.version, e.message))
                log.warning("agent %s NACKed %s %r version %s: %s", conn.node_id, e.type_url, e.name,
                            e.version, e.message)  # fmt: skip
            elif isinstance(e, StaleNonce):
                log.debug("agent %s answered a stale nonce %r", conn.node_id, e.nonce)
        if rows and conn.node_id:
            self.store.record_events(conn.node_id, rows)
