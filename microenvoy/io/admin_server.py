"""The admin HTTP/1.1 server: Envoy's admin API on ``admin.address`` (default 127.0.0.1:9901).

Two parts:

* ``AdminHttpConnection``: a sans-IO HTTP/1.1 server connection over h11, fed bytes and returning bytes to
  send. It enforces the request limits (header block size -> 431, body size -> 413), answers malformed
  requests with 400 and closes, supports keep-alive and pipelining, and sends ``100 Continue`` when asked.
  The answers come from ``microenvoy.admin.host.handle_request``. Unit-testable and fuzzable in memory.
* ``AdminServer``: the asyncio shell: listens (port 0 allowed; ``port`` is the bound one), caps concurrent
  connections, closes idle connections, writes with backpressure, runs ``AdminResponse.after`` callbacks
  (``/quitquitquit``) once the answer is written, and closes everything on ``close()``.

Stats, in the host's store under ``http.admin.`` (Envoy's names for its admin connection manager):
``downstream_cx_total``, ``downstream_cx_active`` (gauge), ``downstream_cx_protocol_error``,
``downstream_cx_idle_timeout``, ``downstream_cx_overflow``, ``downstream_rq_total``,
``downstream_rq_1xx``..``downstream_rq_5xx``, ``downstream_rq_too_large``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType

import h11

from microenvoy.admin.host import AdminHost, AdminResponse, handle_request
from microenvoy.admin.stats import Counter, Gauge, Store
from microenvoy.config.model import SocketAddress

__all__ = ["AdminHttpConnection", "AdminOutput", "AdminServer", "AdminServerLimits"]

log = logging.getLogger(__name__)

_READ_SIZE = 65536
_COMMON_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"server", b"microenvoy"),
    (b"cache-control", b"no-cache, max-age=0"),
    (b"x-content-type-options", b"nosniff"),
)


@dataclass(frozen=True, slots=True)
class AdminServerLimits:
    """Bounds on what one admin client may cost."""

    max_request_headers_bytes: int = 16 * 1024
    """Request line plus headers; more -> 431 and close (``downstream_rq_too_large``)."""
    max_request_body_bytes: int = 64 * 1024
    """Admin requests carry no meaningful body; more -> 413 and close."""
    max_connections: int = 64
    """Concurrent admin connections; more are closed at once (``downstream_cx_overflow``)."""
    idle_timeout: float = 60.0
    """Seconds without a byte read (or a write making progress) before the connection is closed."""


@dataclass(frozen=True, slots=True)
class AdminOutput:
    """What the shell must do after feeding bytes to an ``AdminHttpConnection``."""

    data: bytes
    """Bytes to write (possibly empty)."""
    after: tuple[Callable[[], None], ...] = ()
    """Callbacks to run once ``data`` has been written."""
    close: bool = False
    """Close the connection after writing ``data``."""


class _AdminStats:
    """The ``http.admin.*`` stats, looked up once."""

    __slots__ = (
        "cx_active",
        "cx_idle_timeout",
        "cx_overflow",
        "cx_protocol_error",
        "cx_total",
        "rq_too_large",
        "rq_total",
        "rq_xx",
    )

    def __init__(self, store: Store) -> None:
        scope = store.scope("http.admin.")
        self.cx_total: Counter = scope.counter("downstream_cx_total")
        self.cx_active: Gauge = scope.gauge("downstream_cx_active")
        self.cx_protocol_error: Counter = scope.counter("downstream_cx_protocol_error")
        self.cx_idle_timeout: Counter = scope.counter("downstream_cx_idle_timeout")
        self.cx_overflow: Counter = scope.counter("downstream_cx_overflow")
        self.rq_total: Counter = scope.counter("downstream_rq_total")
        self.rq_too_large: Counter = scope.counter("downstream_rq_too_large")
        self.rq_xx: tuple[Counter, ...] = tuple(scope.counter(f"downstream_rq_{i}xx") for i in range(1, 6))

    def response(self, status: int) -> None:
        if 100 <= status < 600:
            self.rq_xx[status // 100 - 1].inc()

    def __repr__(self) -> str:
        return f"<_AdminStats rq_total={self.rq_total.value}>"


class AdminHttpConnection:
    """One admin client connection as an h11 state machine (sans-IO).

    ``receive_data(b"")`` signals end of input. Once an output says ``close``, further input is ignored.
    """

    def __init__(
        self,
        host: AdminHost,
        limits: AdminServerLimits | None = None,
        stats: _AdminStats | None = None,
    ) -> None:
        self._host = host
        self._limits = limits or AdminServerLimits()
        self._stats = stats or _AdminStats(host.stats)
        self._h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self._limits.max_request_headers_bytes
        )
        self._method = ""
        self._target = ""
        self._body_bytes = 0
        self._requests = 0
        self.closed = False

    def __repr__(self) -> str:
        return (
            f"<AdminHttpConnection requests={self._requests} ours={self._h11.our_state.__name__}"
            f" theirs={self._h11.their_state.__name__} closed={self.closed}>"
        )

    def receive_data(self, data: bytes) -> AdminOutput:
        """Feed bytes from the client (``b""`` at EOF); return what to write and whether to close."""
        if self.closed:
            return AdminOutput(b"", (), True)
        out: list[bytes] = []
        after: list[Callable[[], None]] = []
        try:
            self._h11.receive_data(data)
            self._process(out, after)
        except h11.RemoteProtocolError as e:
            if e.error_status_hint == 431:  # head still incomplete past the limit
                self._stats.rq_too_large.inc()
            else:
                self._stats.cx_protocol_error.inc()
            reason = str(e)[:200]  # h11 quotes the offending bytes; keep logs and answers short
            log.warning("admin: bad request from client: %s", reason)
            self._send_error(out, e.error_status_hint, f"bad request: {reason}\n")
        except h11.LocalProtocolError:
            log.error("admin: HTTP/1.1 state error", exc_info=True)
            self.closed = True
        return AdminOutput(b"".join(out), tuple(after), self.closed)

    def _process(self, out: list[bytes], after: list[Callable[[], None]]) -> None:
        conn = self._h11
        while not self.closed:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    continue
                self.closed = True  # one side asked to close (Connection: close, HTTP/1.0)
                return
            if isinstance(event, h11.Request):
                self._method = event.method.decode("ascii", "replace")
                self._target = event.target.decode("latin-1")
                self._body_bytes = 0
                # h11 bounds only an *incomplete* head; a complete one read at once is checked here.
                size = (
                    len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                )
                if size > self._limits.max_request_headers_bytes:
                    self._stats.rq_too_large.inc()
                    self._send_error(out, 431, "request headers too large\n")
                    return
                if not event.http_version.startswith(b"1."):  # RFC 9110 15.6.6
                    self._stats.cx_protocol_error.inc()
                    self._send_error(out, 505, "HTTP version not supported\n")
                    return
                declared = next((int(v) for n, v in event.headers if n == b"content-length"), 0)
                if declared > self._limits.max_request_body_bytes:  # refuse before "100 Continue"
                    self._stats.rq_too_large.inc()
                    self._send_error(out, 413, "request body too large\n")
                    return
                if conn.client_is_waiting_for_100_continue:
                    out.append(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            elif isinstance(event, h11.Data):
                self._body_bytes += len(event.data)
                if self._body_bytes > self._limits.max_request_body_bytes:
                    self._stats.rq_too_large.inc()
                    self._send_error(out, 413, "request body too large\n")
            elif isinstance(event, h11.EndOfMessage):
                self._requests += 1
                self._stats.rq_total.inc()
                response = handle_request(self._host, self._method, self._target)
                self._send(out, response, close=False)
                self._method = ""
                if response.after is not None:
                    after.append(response.after)
                if conn.our_state is h11.MUST_CLOSE:
                    self.closed = True
            elif isinstance(event, h11.ConnectionClosed):
                self.closed = True

    def _send(self, out: list[bytes], response: AdminResponse, close: bool) -> None:
        headers = [
            (b"content-type", response.content_type.encode("latin-1")),
            (b"content-length", str(len(response.body)).encode()),
            *_COMMON_HEADERS,
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers),
        ]
        if close:
            headers.append((b"connection", b"close"))
        self._stats.response(response.status)
        out.append(
            self._h11.send(
                h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status))
            )
        )
        if self._method != "HEAD" and response.body:
            out.append(self._h11.send(h11.Data(data=response.body)))
        out.append(self._h11.send(h11.EndOfMessage()))

    def _send_error(self, out: list[bytes], status: int, message: str) -> None:
        """Answer ``status`` and close, if the state machine still allows an answer."""
        self.closed = True
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError):
                self._send(out, AdminResponse(status, message.encode("utf-8", "replace")), close=True)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


class AdminServer:
    """The admin server on one TCP address. ``await start()``, read ``port``, ``await close()``."""

    def __init__(
        self,
        host: AdminHost,
        address: SocketAddress | None = None,
        limits: AdminServerLimits | None = None,
    ) -> None:
        self._host = host
        self._address = address or SocketAddress("127.0.0.1", 9901)
        if self._address.protocol.upper() != "TCP":
            raise ValueError(f"admin address must be TCP, not {self._address.protocol}")
        self._limits = limits or AdminServerLimits()
        self._stats = _AdminStats(host.stats)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def __repr__(self) -> str:
        where = f"{self._address.address}:{self.port}" if self._server else "not started"
        return f"<AdminServer {where} connections={len(self._tasks)}>"

    @property
    def port(self) -> int:
        """The bound port (the real one when configured with 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("admin server not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> tuple[str, int]:
        """The bound (address, port)."""
        return self._address.address, self.port

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("admin server already started")
        self._server = await asyncio.start_server(
            self._on_connection, self._address.address, self._address.port_value, limit=_READ_SIZE
        )
        log.info("admin server listening on %s:%d", self._address.address, self.port)

    async def close(self) -> None:
        """Stop listening and close every open admin connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> AdminServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._server is None or task is None:  # accepted while closing
            writer.close()
            return
        if len(self._tasks) >= self._limits.max_connections:
            self._stats.cx_overflow.inc()
            writer.close()
            return
        self._tasks.add(task)
        self._stats.cx_total.inc()
        self._stats.cx_active.inc()
        try:
            await self._serve(reader, writer)
        except (ConnectionError, OSError) as e:
            log.debug("admin connection ended: %s", e)
        except Exception:
            log.error("admin connection failed", exc_info=True)
        finally:
            self._tasks.discard(task)
            self._stats.cx_active.dec()
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = AdminHttpConnection(self._host, self._limits, self._stats)
        idle = self._limits.idle_timeout
        while True:
            try:
                async with asyncio.timeout(idle):
                    data = await reader.read(_READ_SIZE)
            except TimeoutError:
                self._stats.cx_idle_timeout.inc()
                log.debug("admin connection idle for %.0fs, closing", idle)
                return
            output = conn.receive_data(data)
            if output.data:
                writer.write(output.data)
                try:
                    async with asyncio.timeout(idle):
                        await writer.drain()
                except TimeoutError:
                    self._stats.cx_idle_timeout.inc()
                    return
            for callback in output.after:
                try:
                    callback()
                except Exception:
                    log.error("admin: post-response action failed", exc_info=True)
            if output.close or not data:
                return
