"""The REST API: change resources and read the fleet over HTTP/1.1 with JSON, protected by a bearer token.

Endpoints (every one needs ``Authorization: Bearer <token>``; the token is generated on first use into
``DATA/api-token``, mode 0600, and printed by ``controlplane-lite token --api``)::

    GET    /v1/resources[?type=KIND]       the stored resources (no bodies)
    GET    /v1/resources/{type}/{name}     one resource with its body
    PUT    /v1/resources/{type}/{name}     create or replace: body = one resource document (YAML or JSON)
    DELETE /v1/resources/{type}/{name}     remove
    GET    /v1/agents                      agents, their versions and last NACK
    GET    /v1/rollouts                    every rollout: stage, ACK/NACK counts, state
    POST   /v1/rollouts/{id}/promote[?force=1]   send a rollout's version to everyone

A PUT body is the resource file format's document (``selector``, ``rollout``, ``ttl``, ``resource``;
``type`` and ``name`` come from the URL and must agree if given). It is validated with the agent's config
model against the whole stored set (``apply.apply_change``: all or nothing) before anything is stored; a bad
document is ``400`` with every error and its path, and nothing is pushed. Resources declared in the watched
directory belong to it: changing them here is ``409``. A DELETE that would leave a dangling reference is
``409`` with the errors. Responses are JSON; errors are ``{"error": "...", "errors": [...]}``.

The server is a small asyncio HTTP/1.1 server on ``h11``: keep-alive, request heads bounded to about 16 KiB
(431 beyond; checked per 8 KiB read), bodies to ``max_body`` (413 beyond), an idle timeout per connection.
``RestApi.dispatch`` is the whole request handling without I/O (the tests call it directly). After a change
it calls ``on_change`` (``serve`` passes the gRPC server's refresh, so agents get the delta at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11
from microenvoy.core.errors import ConfigError

from controlplane_lite.apply import apply_change
from controlplane_lite.rollout import RolloutProgress, progress
from controlplane_lite.sources import load_document, parse_document
from controlplane_lite.store import Store, StoredResource
from controlplane_lite.versions import KIND_BY_TYPE_URL, TYPE_URLS

__all__ = ["MAX_BODY", "TOKEN_FILE", "ApiResponse", "RestApi", "load_or_create_api_token"]

log = logging.getLogger("controlplane_lite.rest")

TOKEN_FILE = "api-token"
MAX_BODY = 1 << 20
"""Default request body limit (bytes)."""
MAX_HEAD = 16 * 1024
IDLE_TIMEOUT = 30.0
_KNOWN = frozenset(s.value for s in HTTPStatus)
_READ_SIZE = 8192
"""Small reads keep h11's head limit effective (it bounds only what is still incomplete)."""


def load_or_create_api_token(data_dir: str) -> str:
    """The API token under ``data_dir`` (generated and written with mode 0600 on first use)."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, TOKEN_FILE)
    try:
        with open(path) as f:
            token = f.read().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return token


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """One response: status, JSON payload, extra headers."""

    status: int
    """HTTP status code."""
    payload: Any
    """The JSON body."""
    headers: tuple[tuple[str, str], ...] = field(default=())
    """Extra response headers."""

    def body(self) -> bytes:
        return json.dumps(self.payload, indent=2, sort_keys=True).encode() + b"\n"


def _error(status: int, message: str, errors: list[str] | None = None, **extra: Any) -> ApiResponse:
    payload: dict[str, Any] = {"error": message}
    if errors is not None:
        payload["errors"] = errors
    payload.update(extra)
    headers = (("www-authenticate", 'Bearer realm="controlplane-lite"'),) if status == 401 else ()
    if status == 405:
        headers = (("allow", str(extra.get("allow", ""))),)
    return ApiResponse(status, payload, headers)


def _resource_json(r: StoredResource, *, body: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": KIND_BY_TYPE_URL.get(r.type_url, r.type_url),
        "name": r.name,
        "version": r.version,
        "selector": dict(r.selector),
        "rollout": None if r.rollout_percent is None else {"percent": r.rollout_percent},
        "ttl": r.ttl,
        "source": r.source,
        "created": r.created,
        "updated": r.updated,
    }
    if body:
        out["resource"] = dict(r.resource)
    return out


def agents_json(store: Store) -> list[dict[str, Any]]:
    """``GET /v1/agents``: every agent, its resources (sent / ACKed / current version) and last NACK."""
    current = {(r.type_url, r.name): r.version for r in store.resources()}
    out: list[dict[str, Any]] = []
    for a in store.agents():
        md = a.metadata
        rows: list[dict[str, Any]] = []
        last: dict[str, Any] | None = None
        for r in store.agent_resources(a.node_id):
            if not r.sent_version and not r.acked_version:
                continue
            nack = None
            if r.nack_version:
                nack = {"version": r.nack_version, "message": r.nack_message, "at": r.nack_at}
                if last is None or (r.nack_at or 0.0) > (last["at"] or 0.0):
                    last = {"type": KIND_BY_TYPE_URL.get(r.type_url, r.type_url), "name": r.name, **nack}
            rows.append(
                {
                    "type": KIND_BY_TYPE_URL.get(r.type_url, r.type_url),
                    "name": r.name,
                    "sent_version": r.sent_version,
                    "acked_version": r.acked_version,
                    "current_version": current.get((r.type_url, r.name)),
                    "nack": nack,
                }
            )
        out.append(
            {
                "node_id": a.node_id,
                "cluster": a.cluster,
                "profile": md.get("firmware_profile") or md.get("profile"),
                "metadata": dict(md),
                "connected": a.connected,
                "connected_since": a.connected_since,
                "last_seen": a.last_seen,
                "resources": rows,
                "last_nack": last,
            }
        )
    return out


class RestApi:
    """The REST API over a ``Store`` (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        token: str,
        *,
        on_change: Callable[[], object] | None = None,
        max_body: int = MAX_BODY,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        if not token:
            raise ValueError("the API token must not be empty")
        self.store = store
        self._token = token.encode()
        self.on_change = on_change
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.port = 0
        """The bound port (after ``start``)."""
        self.requests = 0
        """Requests answered."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<RestApi port={self.port} requests={self.requests}>"

    # ======================================================================================= sans-IO
    def authorized(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries the token (constant-time comparison)."""
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(value.strip(), self._token)

    def dispatch(self, method: str, target: str, authorization: bytes | None, body: bytes) -> ApiResponse:
        """Answer one request (no I/O besides the store)."""
        if not self.authorized(authorization):
            return _error(401, "missing or wrong bearer token")
        url = urlsplit(target)
        query = parse_qs(url.query)
        parts = [unquote(p) for p in url.path.split("/")]
        if parts[:1] != [""] or parts[1:2] != ["v1"] or len(parts) < 3:
            return _error(404, f"no such endpoint {url.path!r}")
        route = parts[2:]
        try:
            if route == ["resources"]:
                return self._only(method, "GET") or self._list_resources(query)
            if len(route) == 3 and route[0] == "resources":
                return self._resource(method, route[1], route[2], body)
            if route == ["agents"]:
                return self._only(method, "GET") or ApiResponse(200, {"agents": agents_json(self.store)})
            if route == ["rollouts"]:
                rows = [p.as_json() for p in progress(self.store)]
                return self._only(method, "GET") or ApiResponse(200, {"rollouts": rows})
            if len(route) == 3 and route[0] == "rollouts" and route[2] == "promote":
                return self._only(method, "POST") or self._promote(route[1], query)
        except Exception as exc:  # a store or validation failure must not take the API down
            log.exception("%s %s failed", method, target)
            return _error(500, f"internal error: {type(exc).__name__}")
        return _error(404, f"no such endpoint {url.path!r}")

    @staticmethod
    def _only(method: str, allowed: str) -> ApiResponse | None:
        if method == allowed:
            return None
        return _error(405, f"method {method} not allowed", allow=allowed)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _list_resources(self, query: Mapping[str, list[str]]) -> ApiResponse:
        kinds = query.get("type", [])
        type_url: str | None = None
        if kinds:
            type_url = TYPE_URLS.get(kinds[0])
            if type_url is None:
                return _error(400, f"unknown type {kinds[0]!r}", allowed=sorted(TYPE_URLS))
        rows = [_resource_json(r, body=False) for r in self.store.resources(type_url)]
        return ApiResponse(200, {"resources": rows})

    def _resource(self, method: str, kind: str, name: str, body: bytes) -> ApiResponse:
        type_url = TYPE_URLS.get(kind)
        if type_url is None:
            return _error(404, f"unknown resource type {kind!r}", allowed=sorted(TYPE_URLS))
        if not name:
            return _error(404, "empty resource name")
        existing = self.store.get(type_url, name)
        if method == "GET":
            if existing is None:
                return _error(404, f"no {kind} {name!r}")
            return ApiResponse(200, _resource_json(existing, body=True))
        if method not in ("PUT", "DELETE"):
            return _error(405, f"method {method} not allowed", allow="GET, PUT, DELETE")
        if existing is not None and existing.source.startswith("dir:"):
            return _error(
                409,
                f"{kind} {name!r} is declared in the resource directory ({existing.source[4:]}): "
                "change it there",
            )
        if method == "DELETE":
            if existing is None:
                return _error(404, f"no {kind} {name!r}")
            try:
                apply_change(self.store, (), [(type_url, name)], source="api")
            except ConfigError as exc:
                return _error(409, "the deletion would break other resources; nothing changed", exc.errors)
            self._changed()
            return ApiResponse(200, {"type": kind, "name": name, "deleted": True})
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _error(400, "invalid resource document", [f"body: not UTF-8 (byte {exc.start})"])
        try:
            doc = load_document(text, "body")
            spec = parse_document(doc, "body", "api", kind=kind, name=name)
            change = apply_change(self.store, [spec], source="api")
        except ConfigError as exc:
            return _error(400, "invalid resource document; nothing was stored or pushed", exc.errors)
        if change:
            self._changed()
        rollout: dict[str, Any] | None = None
        active = self.store.active_rollouts().get((type_url, name))
        if active is not None and active.version == spec.version:
            found = [p for p in progress(self.store) if p.rollout.id == active.id]
            rollout = found[0].as_json() if found else None
        payload = {
            "type": kind,
            "name": name,
            "version": spec.version,
            "changed": bool(change),
            "rollout": rollout,
        }
        return ApiResponse(201 if existing is None else 200, payload)

    def _promote(self, ref: str, query: Mapping[str, list[str]]) -> ApiResponse:
        if not ref.isdigit():
            return _error(404, f"no rollout {ref!r}")
        force = query.get("force", ["0"])[0] in ("1", "true", "yes")
        try:
            self.store.promote_rollout(int(ref), force=force)
        except LookupError as exc:
            return _error(404, str(exc))
        except ValueError as exc:
            return _error(409, str(exc))
        self._changed()
        found: list[RolloutProgress] = [p for p in progress(self.store) if p.rollout.id == int(ref)]
        return ApiResponse(200, found[0].as_json())

    # ============================================================================================ I/O
    async def start(self, listen: str = "127.0.0.1:0") -> int:
        """Bind ``HOST:PORT`` (port 0 = a free port) and serve; returns the bound port."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        self._server = await asyncio.start_server(self._connection, host, int(port))
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("REST API on %s:%d", host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _next_event(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await asyncio.wait_for(reader.read(_READ_SIZE), self.idle_timeout)
            conn.receive_data(data)

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, resp: ApiResponse) -> None:
        data = resp.body()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(data))),
            ("cache-control", "no-store"),
            *resp.headers,
        ]
        reason = HTTPStatus(resp.status).phrase.encode() if resp.status in _KNOWN else b""
        writer.write(conn.send(h11.Response(status_code=resp.status, headers=headers, reason=reason)) or b"")
        writer.write(conn.send(h11.Data(data=data)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        self.requests += 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            try:
                event = await self._next_event(conn, reader)
                if isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request)
                headers = {k: v for k, v in event.headers}
                length = headers.get(b"content-length")
                if length is not None and int(length) > self.max_body:
                    await self._send(conn, writer, _error(413, f"body larger than {self.max_body} bytes"))
                    return
                body = bytearray()
                while True:
                    part = await self._next_event(conn, reader)
                    if isinstance(part, h11.EndOfMessage):
                        break
                    if isinstance(part, h11.ConnectionClosed):
                        return
                    if isinstance(part, h11.Data):
                        body += part.data
                        if len(body) > self.max_body:
                            resp = _error(413, f"body larger than {self.max_body} bytes")
                            await self._send(conn, writer, resp)
                            return
            except h11.RemoteProtocolError as exc:
                with contextlib.suppress(h11.LocalProtocolError):
                    await self._send(conn, writer, _error(exc.error_status_hint, f"bad request: {exc}"))
                return
            target = event.target.decode("ascii", "replace")
            method = event.method.decode("ascii", "replace")
            resp = self.dispatch(method, target, headers.get(b"authorization"), bytes(body))
            log.debug("%s %s -> %d", event.method.decode(), target, resp.status)
            await self._send(conn, writer, resp)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
