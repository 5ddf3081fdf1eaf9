"""Route header manipulation: ``*_headers_to_add`` / ``*_headers_to_remove``, Envoy's header value formatters,
and the path/host rewrites a route asks for.

Semantics follow Envoy's ``HeaderParser::evaluateHeaders`` for one level (route, virtual host or route
configuration):

1. every name in ``*_headers_to_remove`` is removed;
2. each ``HeaderValueOption`` value is formatted; an empty result adds nothing (Envoy's default
   ``keep_empty_value: false``);
3. decisions are taken against the headers as they were *before* this level's additions, then all
   overwrites are applied, then all appends:

   * ``APPEND_IF_EXISTS_OR_ADD`` (default): add another field;
   * ``ADD_IF_ABSENT``: add only if the name was absent;
   * ``OVERWRITE_IF_EXISTS_OR_ADD`` (legacy ``append: false``): replace every field of that name, or add;
   * ``OVERWRITE_IF_EXISTS``: replace only if present.

Levels are applied in Envoy's default order (``most_specific_header_mutations_wins: false``): route, then
virtual host, then route configuration. So for an overwrite of the same header at several levels the least
specific level (route configuration) wins; appends accumulate in that order. ``levels_in_order`` gives
the sequence for either choice.

Header values may use these formatters (everything else is literal, ``%%`` is a literal ``%``; an unknown
``%COMMAND%`` is a config error):

``%DOWNSTREAM_REMOTE_ADDRESS%``, ``%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%``,
``%DOWNSTREAM_LOCAL_ADDRESS%``, ``%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%``, ``%PROTOCOL%``,
``%REQUESTED_SERVER_NAME%``, ``%REQ(name)%`` (also ``%REQ(a?b)%`` fallback and ``%REQ(name):N%`` truncation),
``%START_TIME%`` / ``%START_TIME(format)%`` (UTC; default ``%Y-%m-%dT%H:%M:%E3SZ``; ``%E<n>S`` seconds with
n decimals, ``%<n>f`` n fraction digits, ``%s`` epoch seconds), ``%UPSTREAM_HOST%``, ``%UPSTREAM_CLUSTER%``.
Values come from the ``Exchange`` at the time the level is applied (``%UPSTREAM_HOST%`` is empty until an
upstream host is chosen).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Sequence

from microenvoy.config.model import HeaderValueOption
from microenvoy.core.exchange import Exchange
from microenvoy.core.headers import Headers

__all__ = [
    "APPEND_ACTIONS",
    "HeaderMutation",
    "ValueFormatter",
    "compile_value",
    "levels_in_order",
    "rewrite_host",
    "rewrite_path",
]

APPEND_ACTIONS = (
    "APPEND_IF_EXISTS_OR_ADD",
    "ADD_IF_ABSENT",
    "OVERWRITE_IF_EXISTS_OR_ADD",
    "OVERWRITE_IF_EXISTS",
)

ValueFormatter = Callable[[Exchange], bytes]
"""A compiled header value: exchange -> bytes."""

_Part = bytes | Callable[[Exchange], bytes]
_COMMAND = re.compile(r"([A-Z][A-Z0-9_]*)(?:\(([^)]*)\))?(?::(\d+))?%")
_DEFAULT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%E3SZ"
_TIME_SPECIAL = re.compile(r"%(?:E(\d)S|(\d)f|f|s)")


def _addr(address: tuple[str, int], with_port: bool) -> bytes:
    host = address[0]
    if not with_port:
        return host.encode("latin-1", "replace")
    if ":" in host:
        return f"[{host}]:{address[1]}".encode("latin-1", "replace")
    return f"{host}:{address[1]}".encode("latin-1", "replace")


def _format_time(wall: float, fmt: str) -> bytes:
    dt = datetime.datetime.fromtimestamp(wall, tz=datetime.UTC)
    nanos = round((wall - int(wall)) * 1e9) if wall >= 0 else 0
    nanos = min(nanos, 999_999_999)

    def special(m: re.Match[str]) -> str:
        token = m.group(0)
        if token == "%s":
            return str(int(wall))
        if token == "%f":
            return f"{nanos:09d}"
        if m.group(1) is not None:  # %E<n>S
            n = int(m.group(1))
            return f"{dt.second:02d}" + (f".{nanos:09d}"[: n + 1] if n else "")
        n = int(m.group(2))
        return f"{nanos:09d}"[:n]

    return dt.strftime(_TIME_SPECIAL.sub(special, fmt)).encode("utf-8", "replace")


def _command(name: str, arg: str | None, limit: int | None) -> Callable[[Exchange], bytes]:
    fn: Callable[[Exchange], bytes]
    if name in ("DOWNSTREAM_REMOTE_ADDRESS", "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT"):
        with_port = not name.endswith("_WITHOUT_PORT")

        def fn(ex: Exchange) -> bytes:
            return _addr(ex.downstream.remote_address, with_port)
    elif name in ("DOWNSTREAM_LOCAL_ADDRESS", "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT"):
        with_port_l = not name.endswith("_WITHOUT_PORT")

        def fn(ex: Exchange) -> bytes:
            return _addr(ex.downstream.local_address, with_port_l)
    elif name == "PROTOCOL":

        def fn(ex: Exchange) -> bytes:
            return ex.downstream.protocol.encode("latin-1", "replace")
    elif name == "REQUESTED_SERVER_NAME":

        def fn(ex: Exchange) -> bytes:
            return (ex.downstream.sni or "").encode("latin-1", "replace")
    elif name == "REQ":
        if not arg:
            raise ValueError("%REQ(name)% needs a header name")
        names = [n.strip().lower().encode("latin-1") for n in arg.split("?", 1)]
        if any(not n for n in names):
            raise ValueError(f"invalid header name in %REQ({arg})%")

        def fn(ex: Exchange) -> bytes:
            for n in names:
                v = ex.request_headers.get(n)
                if v is not None:
                    return v
            return b""
    elif name == "START_TIME":
        fmt = arg if arg else _DEFAULT_TIME_FORMAT

        def fn(ex: Exchange) -> bytes:
            return _format_time(ex.wall_start, fmt)
    elif name == "UPSTREAM_HOST":

        def fn(ex: Exchange) -> bytes:
            return (ex.upstream_host or "").encode("latin-1", "replace")
    elif name == "UPSTREAM_CLUSTER":

        def fn(ex: Exchange) -> bytes:
            return (ex.upstream_cluster or "").encode("latin-1", "replace")
    else:
        raise ValueError(f"unsupported header formatter %{name}%")
    if arg is not None and name not in ("REQ", "START_TIME"):
        raise ValueError(f"%{name}% takes no argument")
    if limit is not None:
        if name != "REQ":
            raise ValueError(f"%{name}% takes no length limit")
        inner = fn

        def fn(ex: Exchange) -> bytes:
            return inner(ex)[:limit]

    return fn


def compile_value(value: str) -> bytes | ValueFormatter:
    """Compile a header value with formatters: returns the literal bytes when there is no formatter (the
    common case, no per-request work), else a callable. Raises ``ValueError`` on a bad format."""
    if "%" not in value:
        return value.encode("utf-8")
    parts: list[_Part] = []
    literal: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c != "%":
            literal.append(c)
            i += 1
            continue
        if i + 1 < n and value[i + 1] == "%":
            literal.append("%")
            i += 2
            continue
        m = _COMMAND.match(value, i + 1)
        if m is None:
            raise ValueError(f"invalid header value format at position {i}: {value!r}")
        if literal:
            parts.append("".join(literal).encode("utf-8"))
            literal = []
        parts.append(_command(m.group(1), m.group(2), int(m.group(3)) if m.group(3) else None))
        i = m.end()
    if literal:
        parts.append("".join(literal).encode("utf-8"))
    if all(isinstance(p, bytes) for p in parts):
        return b"".join(p for p in parts if isinstance(p, bytes))
    frozen = tuple(parts)
    if len(frozen) == 1 and not isinstance(frozen[0], bytes):
        return frozen[0]

    def fmt(ex: Exchange) -> bytes:
        return b"".join(p if isinstance(p, bytes) else p(ex) for p in frozen)

    return fmt


_APPEND, _ADD_IF_ABSENT, _OVERWRITE_OR_ADD, _OVERWRITE_IF_EXISTS = range(4)


class HeaderMutation:
    """One level's compiled ``*_headers_to_add`` + ``*_headers_to_remove`` (see the module docstring).

    The constructor raises ``ValueError`` naming the offending entry (``request_headers_to_add[1]: ...``).
    """

    __slots__ = ("_adds", "_removes")

    def __init__(
        self,
        to_add: Sequence[HeaderValueOption] = (),
        to_remove: Sequence[str] = (),
        *,
        what: str = "request",
    ) -> None:
        adds: list[tuple[bytes, bytes | ValueFormatter, int]] = []
        for i, opt in enumerate(to_add):
            where = f"{what}_headers_to_add[{i}]"
            key = opt.key.strip().lower()
            if not key:
                raise ValueError(f"{where}.header.key: must not be empty")
            if key.startswith(":") or (what == "request" and key == "host"):
                raise ValueError(f"{where}.header.key: {key!r} may not be modified")
            if opt.append_action not in APPEND_ACTIONS:
                raise ValueError(f"{where}.append_action: unknown value {opt.append_action!r}")
            try:
                value = compile_value(opt.value)
            except ValueError as exc:
                raise ValueError(f"{where}.header.value: {exc}") from None
            adds.append((key.encode("latin-1"), value, APPEND_ACTIONS.index(opt.append_action)))
        removes: list[bytes] = []
        for i, name in enumerate(to_remove):
            key = name.strip().lower()
            if not key or key.startswith(":") or (what == "request" and key == "host"):
                raise ValueError(f"{what}_headers_to_remove[{i}]: {name!r} may not be removed")
            removes.append(key.encode("latin-1"))
        self._adds = tuple(adds)
        self._removes = tuple(removes)

    def __bool__(self) -> bool:
        return bool(self._adds or self._removes)

    def apply(self, headers: Headers, exchange: Exchange) -> None:
        for name in self._removes:
            headers.remove(name)
        if not self._adds:
            return
        overwrite: list[tuple[bytes, bytes]] = []
        append: list[tuple[bytes, bytes]] = []
        for name, value, action in self._adds:
            v = value if isinstance(value, bytes) else value(exchange)
            if not v:
                continue
            if action == _APPEND:
                append.append((name, v))
            elif action == _ADD_IF_ABSENT:
                if name not in headers:
                    append.append((name, v))
            elif action == _OVERWRITE_OR_ADD or name in headers:
                overwrite.append((name, v))
        for name, v in overwrite:
            headers.set(name, v)
        for name, v in append:
            headers.add(name, v)

    def __repr__(self) -> str:
        return f"<HeaderMutation add={len(self._adds)} remove={len(self._removes)}>"


def levels_in_order(
    route: HeaderMutation,
    vhost: HeaderMutation,
    config: HeaderMutation,
    *,
    most_specific_wins: bool = False,
) -> tuple[HeaderMutation, ...]:
    """The non-empty levels in application order: Envoy's default route, vhost, route config (the least
    specific overwrite wins); ``most_specific_wins`` reverses it."""
    levels = (config, vhost, route) if most_specific_wins else (route, vhost, config)
    return tuple(level for level in levels if level)


def rewrite_path(path: bytes, matched_prefix: bytes, prefix_rewrite: bytes) -> bytes:
    """Replace ``matched_prefix`` (as matched, possibly case-insensitively) at the start of ``path`` with
    ``prefix_rewrite``; the rest, query string included, is kept. Unchanged if the prefix is not there."""
    n = len(matched_prefix)
    head = path[:n]
    if head != matched_prefix and head.lower() != matched_prefix.lower():
        return path
    return prefix_rewrite + path[n:]


def rewrite_host(headers: Headers, host: bytes) -> None:
    """``host_rewrite_literal``: set ``:authority`` (and ``host`` when an HTTP/1 front put one there)."""
    headers.set(b":authority", host)
    if b"host" in headers:
        headers.set(b"host", host)
