"""The admin interface: what the agent exposes to the admin server (``AdminHost``) and the endpoint table.

Sans-IO. ``handle_request(host, method, target)`` turns one admin request into an ``AdminResponse``; the HTTP
server (``microenvoy/io/admin_server.py``) only frames it. Paths, parameters and output formats follow Envoy's
admin API (https://www.envoyproxy.io/docs/envoy/latest/operations/admin):

=========================  ======  ==========================================================================
path                       method  answer
=========================  ======  ==========================================================================
``/``, ``/help``           GET     text index of the endpoints
``/ready``                 GET     200 ``LIVE`` / 503 ``<server_info()["state"]>`` (``PRE_INITIALIZING`` ...)
``/stats``                 GET     text; ``?filter=<regex>``, ``?usedonly``, ``?format=json|prometheus``,
                                  ``?pretty`` (indented JSON)
``/stats/prometheus``      GET     Prometheus text 0.0.4; ``?filter=``, ``?usedonly``
``/config_dump``           GET     JSON (redacted by the host)
``/clusters``              GET     text; ``?format=json``
``/listeners``             GET     ``name::address:port`` lines; ``?format=json`` -> ``{"listener_statuses"}``
``/server_info``           GET     JSON
``/logging``               GET     current levels (POST with parameters to change them)
``/healthcheck/fail|ok``   POST    ``OK``
``/drain_listeners``       POST    ``OK``; ``?graceful``, ``?inbound_only``
``/quitquitquit``          POST    ``OK``, then ``host.quit()`` once the answer is sent
``/logging``               POST    ``?level=<l>``, ``?<logger>=<l>``, ``?paths=<logger>:<l>,...``
=========================  ======  ==========================================================================

Read endpoints accept GET and HEAD; mutating ones require POST (anything else: 405 with ``Allow``). An unknown
path is a 404 carrying the index. A host method that raises becomes a 500 with the error's type; it never
escapes.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote

from microenvoy.admin import logging as admin_logging
from microenvoy.admin.stats import Store

__all__ = [
    "ENDPOINTS",
    "AdminHost",
    "AdminResponse",
    "Endpoint",
    "handle_request",
    "index_text",
]

log = logging.getLogger(__name__)

TEXT = "text/plain; charset=UTF-8"
JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"

MAX_FILTER_LENGTH = 1024
"""Longest ``?filter=`` regex accepted (the admin port is trusted, but a bound keeps mistakes cheap)."""
MAX_QUERY_FIELDS = 64


class AdminHost(Protocol):
    """What the agent gives the admin server. Every method is called on the event loop and must be quick."""

    stats: Store
    """The process' stats store (``/stats``, ``/stats/prometheus``); the admin server adds ``http.admin.*``
    to it."""

    def ready(self) -> bool:
        """True once initialised and not draining. When False, ``/ready`` answers 503 with
        ``server_info()["state"]`` (``PRE_INITIALIZING``, ``INITIALIZING``, ``DRAINING``) as its body."""
        ...

    def config_dump(self) -> dict[str, Any]:
        """The running config as JSON-able data, secrets already redacted."""
        ...

    def clusters_text(self) -> str:
        """Envoy's ``/clusters`` text (``<cluster>::<host>:<port>::<stat>::<value>`` lines)."""
        ...

    def clusters_json(self) -> dict[str, Any]:
        """Envoy's ``/clusters?format=json`` (``{"cluster_statuses": [...]}``)."""
        ...

    def listeners(self) -> list[dict[str, Any]]:
        """``[{"name": .., "local_address": {"socket_address": {"address": .., "port_value": <bound port>,
        "protocol": "TCP"|"UDP"}}}]``: the port actually bound (not 0)."""
        ...

    def server_info(self) -> dict[str, Any]:
        """Envoy's ``/server_info`` (``version``, ``state``, ``uptime_current_epoch``, ``node`` ...)."""
        ...

    def healthcheck_fail(self) -> None:
        """Make the health_check filter answer 503 (Envoy's ``/healthcheck/fail``)."""
        ...

    def healthcheck_ok(self) -> None:
        """Undo ``healthcheck_fail``."""
        ...

    def drain_listeners(self, graceful: bool, inbound_only: bool) -> None:
        """Stop accepting on listeners (after the drain period when ``graceful``)."""
        ...

    def quit(self) -> None:
        """Begin shutdown (``/quitquitquit``); called after the admin answer has been written."""
        ...

    def set_log_level(self, level: str, logger: str | None) -> str:
        """Set ``level`` (Envoy name, lower-case) on ``logger`` (full name, ``microenvoy.io``) or on all
        loggers (None); return the new levels text. ValueError for a bad level or logger.
        ``microenvoy.admin.logging.set_level`` does exactly this for the stdlib logging tree."""
        ...


@dataclass(frozen=True, slots=True)
class AdminResponse:
    """One admin answer, ready to frame."""

    status: int
    """HTTP status code."""
    body: bytes
    """The whole body (admin answers are small and built at once)."""
    content_type: str = TEXT
    """``Content-Type`` header value."""
    headers: tuple[tuple[str, str], ...] = ()
    """Extra response headers (``Allow`` on a 405)."""
    after: Callable[[], None] | None = field(default=None, compare=False)
    """Run by the server once the response has been written (``/quitquitquit``)."""


Handler = Callable[["AdminHost", "_Query"], AdminResponse]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One admin path."""

    path: str
    """Exact path, no trailing slash."""
    help: str
    """One line for the index."""
    handler: Handler
    """Builds the answer."""
    mutates: bool = False
    """Requires POST (Envoy's ``mutates_server_state``)."""


class _Query:
    """Decoded query parameters; a key without ``=`` (``?usedonly``) has the value ``""``."""

    __slots__ = ("items",)

    def __init__(self, items: Sequence[tuple[str, str]]) -> None:
        self.items = list(items)

    def get(self, key: str) -> str | None:
        for k, v in self.items:
            if k == key:
                return v
        return None

    def has(self, key: str) -> bool:
        return any(k == key for k, _ in self.items)

    def flag(self, key: str) -> bool:
        """``?graceful``, ``?graceful=true`` and ``?graceful=1`` are set; ``=false``/``=0`` are not."""
        v = self.get(key)
        return v is not None and v.strip().lower() not in ("false", "0", "no")

    def __repr__(self) -> str:
        return f"<_Query {self.items!r}>"


# -- helpers -----------------------------------------------------------------------------------------
def _text(body: str, status: int = 200) -> AdminResponse:
    return AdminResponse(status, body.encode("utf-8", "replace"), TEXT)


def _json(data: Any, status: int = 200, *, pretty: bool = True) -> AdminResponse:
    indent, separators = (2, None) if pretty else (None, (",", ":"))
    body = (
        json.dumps(_finite(data), indent=indent, separators=separators, default=str, allow_nan=False) + "\n"
    )
    return AdminResponse(status, body.encode("utf-8"), JSON)


def _finite(data: Any) -> Any:
    """JSON has no NaN/Infinity: they become null."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def _ok() -> AdminResponse:
    return _text("OK\n")


def _format(q: _Query, allowed: tuple[str, ...]) -> str:
    fmt = (q.get("format") or "text").lower()
    if fmt not in allowed:
        raise _BadRequest(f"invalid format {fmt!r}; expected one of {', '.join(allowed)}")
    return fmt


class _BadRequest(Exception):
    """A parameter error: 400 with the message."""


def _name_filter(q: _Query) -> re.Pattern[str] | None:
    raw = q.get("filter")
    if not raw:
        return None
    if len(raw) > MAX_FILTER_LENGTH:
        raise _BadRequest(f"filter longer than {MAX_FILTER_LENGTH} characters")
    try:
        return re.compile(raw)
    except (re.error, RecursionError, OverflowError) as e:
        raise _BadRequest(f"Invalid regex: {e}") from None


# -- endpoints ---------------------------------------------------------------------------------------
def _index(host: AdminHost, q: _Query) -> AdminResponse:
    return _text(index_text())


def _ready(host: AdminHost, q: _Query) -> AdminResponse:
    if host.ready():
        return _text("LIVE\n")
    state = host.server_info().get("state")
    return _text(f"{state if isinstance(state, str) and state != 'LIVE' else 'PRE_INITIALIZING'}\n", 503)


def _stats(host: AdminHost, q: _Query) -> AdminResponse:
    fmt = _format(q, ("text", "json", "prometheus"))
    if fmt == "prometheus":
        return _prometheus(host, q)
    pattern, used_only = _name_filter(q), q.has("usedonly")
    if fmt == "json":
        return _json(host.stats.json(pattern, used_only=used_only), pretty=q.has("pretty"))
    lines = list(host.stats.iter_text(pattern, used_only=used_only))
    return _text("".join(line + "\n" for line in lines))


def _prometheus(host: AdminHost, q: _Query) -> AdminResponse:
    body = host.stats.prometheus(_name_filter(q), used_only=q.has("usedonly"))
    return AdminResponse(200, body.encode("utf-8"), PROMETHEUS)


def _config_dump(host: AdminHost, q: _Query) -> AdminResponse:
    return _json(host.config_dump())


def _clusters(host: AdminHost, q: _Query) -> AdminResponse:
    if _format(q, ("text", "json")) == "json":
        return _json(host.clusters_json())
    text = host.clusters_text()
    return _text(text if not text or text.endswith("\n") else text + "\n")


def _listeners(host: AdminHost, q: _Query) -> AdminResponse:
    statuses = host.listeners()
    if _format(q, ("text", "json")) == "json":
        return _json({"listener_statuses": statuses})
    lines = []
    for s in statuses:
        sa = s.get("local_address", {}).get("socket_address", {})
        address = str(sa.get("address", ""))
        if ":" in address:
            address = f"[{address}]"
        lines.append(f"{s.get('name', '')}::{address}:{sa.get('port_value', '')}\n")
    return _text("".join(lines))


def _server_info(host: AdminHost, q: _Query) -> AdminResponse:
    return _json(host.server_info())


def _healthcheck_fail(host: AdminHost, q: _Query) -> AdminResponse:
    host.healthcheck_fail()
    return _ok()


def _healthcheck_ok(host: AdminHost, q: _Query) -> AdminResponse:
    host.healthcheck_ok()
    return _ok()


def _drain_listeners(host: AdminHost, q: _Query) -> AdminResponse:
    host.drain_listeners(graceful=q.flag("graceful"), inbound_only=q.flag("inbound_only"))
    return _ok()


def _quit(host: AdminHost, q: _Query) -> AdminResponse:
    return AdminResponse(200, b"OK\n", TEXT, after=host.quit)


def _logging(host: AdminHost, q: _Query) -> AdminResponse:
    try:
        changes = admin_logging.parse_logging_query(q.items)
        if not changes:
            return _text(admin_logging.levels_text())
        text = ""
        for logger, level in changes:
            text = host.set_log_level(level, logger)
    except ValueError as e:
        raise _BadRequest(f"error: {e}") from None
    return _text(text)


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/", "this index", _index),
    Endpoint("/help", "this index", _index),
    Endpoint("/ready", "200 LIVE when ready to serve, else 503 with the server state", _ready),
    Endpoint("/stats", "print stats (?filter=<regex>, ?usedonly, ?format=json|prometheus)", _stats),
    Endpoint("/stats/prometheus", "print stats in Prometheus text format (?filter=, ?usedonly)", _prometheus),
    Endpoint("/config_dump", "dump the running configuration (secrets redacted)", _config_dump),
    Endpoint("/clusters", "upstream cluster status (?format=json)", _clusters),
    Endpoint("/listeners", "listener names and bound addresses (?format=json)", _listeners),
    Endpoint("/server_info", "version, state, uptime and node", _server_info),
    Endpoint("/logging", "show log levels; POST ?level=<l> or ?<logger>=<l> to change", _logging),
    Endpoint("/healthcheck/fail", "make the health_check filter fail", _healthcheck_fail, mutates=True),
    Endpoint("/healthcheck/ok", "undo /healthcheck/fail", _healthcheck_ok, mutates=True),
    Endpoint(
        "/drain_listeners", "drain listeners (?graceful, ?inbound_only)", _drain_listeners, mutates=True
    ),
    Endpoint("/quitquitquit", "exit the server", _quit, mutates=True),
)
_BY_PATH: dict[str, Endpoint] = {e.path: e for e in ENDPOINTS}
_READ_METHODS = ("GET", "HEAD")


def index_text() -> str:
    """``admin commands are:`` followed by one ``  <path>: <help>`` line per endpoint (Envoy's ``/help``)."""
    lines = ["admin commands are:"]
    lines += [f"  {e.path}: {'(POST) ' if e.mutates else ''}{e.help}" for e in ENDPOINTS if e.path != "/help"]
    return "\n".join(lines) + "\n"


def _split_target(target: str) -> tuple[str, _Query]:
    path, _, query = target.partition("?")
    path = unquote(path.partition("#")[0], errors="replace")
    if len(path) > 1:
        path = path.rstrip("/") or "/"
    fields = [f for f in query.partition("#")[0].split("&") if f]
    if len(fields) > MAX_QUERY_FIELDS:
        raise ValueError(f"more than {MAX_QUERY_FIELDS} query parameters")
    # Percent-decoding only, as Envoy does: "+" stays a plus (it is common in ?filter= regexes).
    items = []
    for f in fields:
        key, _, value = f.partition("=")
        items.append((unquote(key, errors="replace"), unquote(value, errors="replace")))
    return path, _Query(items)


def handle_request(host: AdminHost, method: str, target: str) -> AdminResponse:
    """Answer one admin request. Never raises: bad input is a 4xx, a failing host a 500."""
    try:
        path, query = _split_target(target)
    except ValueError as e:  # too many query fields
        return _text(f"invalid query: {e}\n", 400)
    endpoint = _BY_PATH.get(path)
    if endpoint is None:
        return _text("invalid path. " + index_text(), 404)
    method = method.upper()
    if endpoint.mutates and method != "POST":
        return AdminResponse(
            405, f"Method {method} not allowed, POST required.\n".encode(), TEXT, (("allow", "POST"),)
        )
    if endpoint.path == "/logging":
        if method == "POST" or (method in _READ_METHODS and not query.items):
            pass
        elif method in _READ_METHODS:
            return AdminResponse(
                405, b"Changing log levels requires POST.\n", TEXT, (("allow", "GET, HEAD, POST"),)
            )
        else:
            return _method_not_allowed(method, "GET, HEAD, POST")
    elif not endpoint.mutates and method not in _READ_METHODS:
        return _method_not_allowed(method, "GET, HEAD")
    try:
        return endpoint.handler(host, query)
    except _BadRequest as e:
        return _text(f"{e}\n", 400)
    except Exception as e:
        log.error("admin %s %s failed", method, path, exc_info=True)
        return _text(f"internal error: {type(e).__name__}\n", 500)


def _method_not_allowed(method: str, allow: str) -> AdminResponse:
    return AdminResponse(405, f"Method {method} not allowed.\n".encode(), TEXT, (("allow", allow),))
