"""Access logs: one line per finished exchange, to a file or stdout, buffered and flushed off the hot path.

Formats follow Envoy's command operators. The default text format is Envoy's::

    [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
    %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
    "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"

``json_format`` maps keys to one operator each (or a literal). Supported operators: everything the header
formatter knows (``%REQ(..)%``, ``%START_TIME%``, ``%PROTOCOL%``, ``%DOWNSTREAM_REMOTE_ADDRESS%``,
``%UPSTREAM_HOST%``, ``%UPSTREAM_CLUSTER%`` ...) plus ``%RESP(..)%``, ``%RESPONSE_CODE%``,
``%RESPONSE_CODE_DETAILS%``, ``%RESPONSE_FLAGS%``, ``%DURATION%`` (ms), ``%BYTES_RECEIVED%``,
``%BYTES_SENT%``, ``%UPSTREAM_REQUEST_ATTEMPT_COUNT%``.

Lines go to an in-memory buffer (bounded: over 1 MiB the oldest pending lines are dropped and counted) and are
written once per second or when 64 KiB are pending, never inside the request path.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import Callable
from typing import IO

from microenvoy.admin.stats import Store
from microenvoy.config.model import AccessLog
from microenvoy.core.exchange import Exchange
from microenvoy.router.headers import compile_value

__all__ = ["DEFAULT_FORMAT", "AccessLogger", "compile_format"]

DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% '
    '%RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "%REQ(X-FORWARDED-FOR)%" '
    '"%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)

Formatter = Callable[[Exchange], str]
_OWN = re.compile(
    r"%(RESPONSE_CODE|RESPONSE_CODE_DETAILS|RESPONSE_FLAGS|DURATION|BYTES_RECEIVED|BYTES_SENT|"
    r"UPSTREAM_REQUEST_ATTEMPT_COUNT|RESP\([^)]*\))%"
)


def _own(name: str, arg: str | None) -> Formatter:
    if name == "RESPONSE_CODE":
        return lambda ex: str(ex.response_code)
    if name == "RESPONSE_CODE_DETAILS":
        return lambda ex: ex.response_code_details or "-"
    if name == "RESPONSE_FLAGS":
        return lambda ex: ",".join(sorted(ex.response_flags)) or "-"
    if name == "DURATION":
        return lambda ex: str(int((time.monotonic() - ex.start_time) * 1000))
    if name == "BYTES_RECEIVED":
        return lambda ex: str(ex.request_body_bytes)
    if name == "BYTES_SENT":
        return lambda ex: str(ex.response_body_bytes)
    if name == "UPSTREAM_REQUEST_ATTEMPT_COUNT":
        return lambda ex: str(ex.attempts)
    assert arg is not None
    key = arg.lower().encode("latin-1")

    def resp(ex: Exchange) -> str:
        h = ex.response_headers
        v = h.get(key) if h is not None else None
        return v.decode("latin-1") if v is not None else "-"

    return resp


_OPERATOR = re.compile(r"%%|%([A-Z][A-Z0-9_]*)(?:\(([^)]*)\))?(?::(\d+))?%")


def _dash(f: Callable[[Exchange], bytes]) -> Formatter:
    return lambda ex: f(ex).decode("latin-1") or "-"


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
        if m.group(0) == "%%":
            parts.append("%")
            continue
        name = m.group(1)
        if _OWN.fullmatch(m.group(0)):
            parts.append(_own("RESP" if name == "RESP" else name, m.group(2)))
            continue
        compiled = compile_value(m.group(0))  # the header formatter's operators (REQ, START_TIME ...)
        if isinstance(compiled, bytes):
            parts.append(compiled.decode("utf-8"))
        else:
            parts.append(_dash(compiled))
    if pos < len(fmt):
        parts.append(fmt[pos:])
    for p in parts:
        if isinstance(p, str) and "%" in p and p != "%":
            raise ValueError(f"invalid access log format (a lone '%'; write '%%'): {fmt!r}")
    frozen = tuple(parts)
    return lambda ex: "".join(p if isinstance(p, str) else p(ex) for p in frozen)


class AccessLogger:
    """One configured access log sink."""

    MAX_PENDING = 1 << 20
    FLUSH_BYTES = 64 * 1024

    def __init__(self, config: AccessLog, stats: Store) -> None:
        self.config = config
        if config.json_format:
            fields = [(k, compile_format(v)) for k, v in config.json_format]
            self._format: Formatter = lambda ex: json.dumps({k: f(ex) for k, f in fields}) + "\n"
        else:
            self._format = compile_format(config.text_format or DEFAULT_FORMAT)
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._file: IO[str] | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self.dropped = stats.counter("access_log.dropped")
        self.written = stats.counter("access_log.written")

    def __repr__(self) -> str:
        return f"<AccessLogger {self.config.path or 'stdout'} pending={len(self._pending)}>"

    def log(self, ex: Exchange) -> None:
        line = self._format(ex)
        self._pending.append(line)
        self._pending_bytes += len(line)
        while self._pending_bytes > self.MAX_PENDING and self._pending:
            self._pending_bytes -= len(self._pending.pop(0))
            self.dropped.inc()
        if self._pending_bytes >= self.FLUSH_BYTES:
            self.flush()
        elif self._flush_handle is None:
            try:
                self._flush_handle = asyncio.get_running_loop().call_later(1.0, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._pending:
            return
        data = "".join(self._pending)
        n = len(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        try:
            if self.config.path is None:
                sys.stdout.write(data)
                sys.stdout.flush()
            else:
                if self._file is None:
                    self._file = open(self.config.path, "a", encoding="utf-8")
                self._file.write(data)
                self._file.flush()
            self.written.inc(n)
        except OSError:
            self.dropped.inc(n)

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
