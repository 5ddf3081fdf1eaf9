"""Access logs: one line per finished exchange, to a file or stdout, buffered and written off the event loop.

Formats follow Envoy's command operators. The default text format is Envoy's::

    [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
    %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
    "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"

Supported operators: everything the header formatter knows (``%REQ(..)%``, ``%START_TIME%`` and
``%START_TIME(<strftime>)%``, ``%PROTOCOL%``, ``%DOWNSTREAM_REMOTE_ADDRESS%``, ``%UPSTREAM_HOST%``,
``%UPSTREAM_CLUSTER%`` ...) plus ``%RESP(..)%``, ``%RESPONSE_CODE%``, ``%RESPONSE_CODE_DETAILS%``,
``%RESPONSE_FLAGS%`` (Envoy's order, e.g. ``UT,URX``), ``%DURATION%`` (ms), ``%BYTES_RECEIVED%``,
``%BYTES_SENT%``, ``%UPSTREAM_REQUEST_ATTEMPT_COUNT%`` and ``%TRACE_ID%``. In a text format an operator that
yields nothing prints ``-``.

``json_format`` is Envoy's typed JSON: a value that is exactly one operator keeps its type (a number for
``%RESPONSE_CODE%``, ``%DURATION%``, ``%BYTES_RECEIVED%``, ``%BYTES_SENT%``,
``%UPSTREAM_REQUEST_ATTEMPT_COUNT%``; ``null`` when the operator yields nothing); any other string is
formatted as text; numbers, booleans and null are copied; nested mappings are formatted recursively.

Lines go to an in-memory buffer (bounded: over 1 MiB the oldest pending lines are dropped and counted in
``access_log.dropped``) and are written once per second or when 64 KiB are pending, by a worker thread, one
write at a time and in order: a slow or stalled disk never blocks the event loop, it only fills the buffer.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import IO, Any

from microenvoy.admin.stats import Store
from microenvoy.config.model import AccessLog
from microenvoy.core.exchange import Exchange, response_flags_text
from microenvoy.router.headers import compile_value

__all__ = ["DEFAULT_FORMAT", "AccessLogger", "compile_format", "compile_json_format"]

DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% '
    '%RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "%REQ(X-FORWARDED-FOR)%" '
    '"%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)

Formatter = Callable[[Exchange], str]
_Raw = Callable[[Exchange], "str | int | None"]
"""An operator: its typed value, or None when it yields nothing (``-`` in text, ``null`` in JSON)."""

_OWN = re.compile(
    r"%(RESPONSE_CODE|RESPONSE_CODE_DETAILS|RESPONSE_FLAGS|DURATION|BYTES_RECEIVED|BYTES_SENT|"
    r"UPSTREAM_REQUEST_ATTEMPT_COUNT|TRACE_ID|RESP\([^)]*\))%"
)
_OPERATOR = re.compile(r"%%|%([A-Z][A-Z0-9_]*)(?:\(([^)]*)\))?(?::(\d+))?%")


def _trace_id(ex: Exchange) -> str | None:
    span = ex.span
    return f"{span.trace_id:032x}" if span is not None else None


def _own(name: str, arg: str | None) -> _Raw:
    if name == "RESPONSE_CODE":
        return lambda ex: ex.response_code
    if name == "RESPONSE_CODE_DETAILS":
        return lambda ex: ex.response_code_details or None
    if name == "RESPONSE_FLAGS":
        return lambda ex: response_flags_text(ex.response_flags)
    if name == "DURATION":
        return lambda ex: int((time.monotonic() - ex.start_time) * 1000)
    if name == "BYTES_RECEIVED":
        return lambda ex: ex.request_body_bytes
    if name == "BYTES_SENT":
        return lambda ex: ex.response_body_bytes
    if name == "UPSTREAM_REQUEST_ATTEMPT_COUNT":
        return lambda ex: ex.attempts
    if name == "TRACE_ID":
        return _trace_id
    assert arg is not None
    key = arg.strip().lower().encode("latin-1")
    if not key:
        raise ValueError("%RESP(name)% needs a header name")

    def resp(ex: Exchange) -> str | None:
        h = ex.response_headers
        v = h.get(key) if h is not None else None
        return v.decode("latin-1") if v else None

    return resp


def _header_formatter(f: Callable[[Exchange], bytes]) -> _Raw:
    def raw(ex: Exchange) -> str | None:
        return f(ex).decode("latin-1") or None

    return raw


def _operator(m: re.Match[str]) -> _Raw | str:
    """One ``%...%`` match -> its function (or a literal, for ``%%`` and formatter constants)."""
    if m.group(0) == "%%":
        return "%"
    name = m.group(1)
    if _OWN.fullmatch(m.group(0)):
        return _own(name, m.group(2))
    compiled = compile_value(m.group(0))  # the header formatter's operators (REQ, START_TIME ...)
    if isinstance(compiled, bytes):
        return compiled.decode("utf-8")
    return _header_formatter(compiled)


def _text(raw: _Raw) -> Formatter:
    def fmt(ex: Exchange) -> str:
        v = raw(ex)
        return "-" if v is None else str(v)

    return fmt


def compile_format(fmt: str) -> Formatter:
    """Compile an Envoy format string; raises ValueError for an unknown operator.

    Each operator that yields nothing prints ``-``, as Envoy does; literals are copied (``%%`` is ``%``).
    """
    parts: list[str | Formatter] = []
    pos = 0
    for m in _OPERATOR.finditer(fmt):
        if m.start() > pos:
            parts.append(fmt[pos : m.start()])
        pos = m.end()
        op = _operator(m)
        parts.append(op if isinstance(op, str) else _text(op))
    if pos < len(fmt):
        parts.append(fmt[pos:])
    for p in parts:
        if isinstance(p, str) and "%" in p and p != "%":
            raise ValueError(f"invalid access log format (a lone '%'; write '%%'): {fmt!r}")
    frozen = tuple(parts)
    if len(frozen) == 1 and not isinstance(frozen[0], str):
        return frozen[0]
    return lambda ex: "".join(p if isinstance(p, str) else p(ex) for p in frozen)


JsonFormatValue = Any
"""A ``json_format`` value: a format string, a number, a boolean, None, or a nested mapping (a ``dict`` or a
tuple of ``(key, value)`` pairs, as the frozen config keeps it)."""
_JsonPart = Callable[[Exchange], Any]


def _json_value(value: JsonFormatValue, where: str) -> tuple[bool, Any]:
    """``(dynamic, x)``: x is the constant itself, or a function of the exchange when dynamic."""
    if value is None or isinstance(value, bool | int | float):
        return False, value
    if isinstance(value, str):
        try:
            m = _OPERATOR.fullmatch(value)
            if m is not None and m.group(0) != "%%":
                op = _operator(m)
                return (False, op) if isinstance(op, str) else (True, op)
            if "%" not in value:
                return False, value
            return True, compile_format(value)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}" if where else str(exc)) from None
    if isinstance(value, Mapping):
        pairs: list[Any] = list(value.items())
    elif isinstance(value, tuple | list):
        pairs = list(value)
    else:
        raise ValueError(f"{where or 'json_format'}: unsupported value {value!r}")
    fields: list[tuple[str, bool, Any]] = []
    for item in pairs:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"{where or 'json_format'}: expected a mapping, got {value!r}")
        key, sub = item
        dynamic, x = _json_value(sub, f"{where}.{key}" if where else key)
        fields.append((key, dynamic, x))
    if not any(d for _, d, _ in fields):
        return False, {k: x for k, _, x in fields}
    frozen = tuple(fields)

    def obj(ex: Exchange) -> dict[str, Any]:
        return {k: (x(ex) if d else x) for k, d, x in frozen}

    return True, obj


def compile_json_format(fields: JsonFormatValue) -> Callable[[Exchange], dict[str, Any]]:
    """Compile a ``json_format`` mapping (dict or ``(key, value)`` pairs) into exchange -> JSON object.

    Raises ValueError (naming the key) for an unknown operator or an unsupported value.
    """
    if isinstance(fields, str) or not isinstance(fields, Mapping | tuple | list):
        raise ValueError("json_format must be a mapping")
    dynamic, x = _json_value(fields, "")
    if not isinstance(x, dict) and not dynamic:
        raise ValueError("json_format must be a mapping")
    if not dynamic:
        return lambda ex: x
    fn: Callable[[Exchange], dict[str, Any]] = x
    return fn


class AccessLogger:
    """One configured access log sink (file or stdout)."""

    MAX_PENDING = 1 << 20
    FLUSH_BYTES = 64 * 1024
    FLUSH_INTERVAL = 1.0

    def __init__(self, config: AccessLog, stats: Store) -> None:
        self.config = config
        if config.json_format:
            obj = compile_json_format(config.json_format)
            self._format: Formatter = lambda ex: json.dumps(obj(ex), ensure_ascii=False) + "\n"
        else:
            self._format = compile_format(config.text_format or DEFAULT_FORMAT)
        self._pending: deque[str] = deque()
        self._pending_bytes = 0
        self._file: IO[str] | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[bool] | None = None
        """The write in the worker thread, if one is running (one at a time keeps lines in order)."""
        self._lock = threading.Lock()
        """Held by whoever writes to the sink (the worker thread, or ``close``)."""
        self._closed = False
        self.dropped = stats.counter("access_log.dropped")
        self.written = stats.counter("access_log.written")

    def __repr__(self) -> str:
        busy = " writing" if self._writing is not None else ""
        return f"<AccessLogger {self.config.path or 'stdout'} pending={len(self._pending)}{busy}>"

    def log(self, ex: Exchange) -> None:
        """Format and queue one line; never blocks on the sink."""
        line = self._format(ex)
        self._pending.append(line)
        self._pending_bytes += len(line)
        while self._pending_bytes > self.MAX_PENDING and self._pending:
            self._pending_bytes -= len(self._pending.popleft())
            self.dropped.inc()
        if self._pending_bytes >= self.FLUSH_BYTES:
            self.flush()
        elif self._flush_handle is None and self._writing is None:
            try:
                self._flush_handle = asyncio.get_running_loop().call_later(self.FLUSH_INTERVAL, self.flush)
            except RuntimeError:
                self.flush()

    def _take(self) -> tuple[str, int]:
        data = "".join(self._pending)
        n = len(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        return data, n

    def flush(self) -> None:
        """Hand what is pending to the worker thread (inside a running loop), else write it now."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._pending or self._writing is not None:
            return  # a running write flushes again when it is done
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            data, n = self._take()
            self._count(n, self._write_blocking(data))
            return
        data, n = self._take()
        fut = loop.run_in_executor(None, self._write_blocking, data)
        self._writing = fut
        fut.add_done_callback(lambda f: self._written(f, n))

    def _written(self, fut: asyncio.Future[bool], n: int) -> None:
        self._writing = None
        ok = not fut.cancelled() and fut.exception() is None and fut.result()
        self._count(n, ok)
        if self._pending and not self._closed:
            if self._pending_bytes >= self.FLUSH_BYTES:
                self.flush()
            elif self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_later(self.FLUSH_INTERVAL, self.flush)

    def _count(self, n: int, ok: bool) -> None:
        if ok:
            self.written.inc(n)
        else:
            self.dropped.inc(n)

    def _write_blocking(self, data: str) -> bool:
        """Write to the sink (in the worker thread, or at close); False on an I/O error."""
        with self._lock:
            try:
                if self.config.path is None:
                    sys.stdout.write(data)
                    sys.stdout.flush()
                else:
                    if self._file is None:
                        self._file = open(self.config.path, "a", encoding="utf-8")  # kept open until close
                    self._file.write(data)
                    self._file.flush()
            except (OSError, ValueError):  # ValueError: stdout closed under us
                return False
            return True

    def close(self) -> None:
        """Write what is pending and close the file. Synchronous (shutdown): waits for a running write."""
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._pending:
            data, n = self._take()
            self._count(n, self._write_blocking(data))
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    async def aclose(self) -> None:
        """``close`` without blocking the loop: waits for the running write, then writes the rest in the
        worker thread."""
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._writing is not None:
            await asyncio.wait([self._writing])
        await asyncio.get_running_loop().run_in_executor(None, self.close)
