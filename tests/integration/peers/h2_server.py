"""A small HTTP/2 test server (h2 library, asyncio) running in its own thread and event loop.

Speaks h2c with prior knowledge and, when given certificates, TLS with ALPN ``h2``. What it answers depends
on the path (the query string is ignored for counting):

=====================  ==============================================================================
``/status/<code>``     answers ``<code>`` (body ``status <code>``)
``/delay/<ms>``        waits ``<ms>`` after the request ended, then the JSON echo
``/fail/<n>/<any>``    the first ``n`` requests to this exact path fail, later ones get the JSON echo;
                       ``?mode=status`` (default, ``&status=503``), ``?mode=reset`` (RST_STREAM,
                       ``&code=2``) or ``?mode=delay`` (answer 200 only after ``&ms=5000``)
``/reset``             resets the stream (``?code=`` the HTTP/2 error code, default 2 INTERNAL_ERROR;
                       7 is REFUSED_STREAM), without reading the body
``/slow-read``         reads the body at ``?rate=`` bytes per second (default 262144) by withholding
                       WINDOW_UPDATEs, then answers ``{"received": n}``; ``progress(path)`` shows bytes so far
``/echo``              answers 200 with the request body (content-type copied); trailers (the request's
                       own plus ``x-server-trailer: done``) when the request had trailers or carried
                       ``x-send-trailers: 1``
``/big/<n>``           answers ``n`` bytes of a fixed pattern (``pattern(n)``)
anything else          the JSON echo: method, path, authority, scheme, headers, trailers, body length/sha256
=====================  ==============================================================================

Every request is counted per path (``count(path)``, ``wait_count``) and recorded (``requests``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import json
import ssl
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from .certs import CertBundle
from .common import pause

__all__ = ["H2Server", "RecordedRequest", "pattern"]

_CONN_WINDOW = 16 * 1024 * 1024


def pattern(n: int) -> bytes:
    """``n`` bytes of a fixed, non-repeating-at-small-scale pattern (for body integrity checks)."""
    block = bytes(range(251))  # 251 is prime, so offsets do not align with power-of-two frame sizes
    reps = n // len(block) + 1
    return (block * reps)[:n]


@dataclass
class RecordedRequest:
    """What the server saw of one request."""

    method: str
    path: str
    authority: str
    scheme: str
    headers: list[tuple[str, str]]
    connection_id: int
    stream_id: int
    body_length: int = 0
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass
class _Stream:
    sid: int
    method: str
    path: str
    authority: str
    scheme: str
    headers: list[tuple[str, str]]
    record: RecordedRequest
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    withhold_acks: bool = False
    unacked: int = 0
    task: asyncio.Task[None] | None = None


def _d(v: bytes | str) -> str:
    return v.decode("latin-1") if isinstance(v, bytes) else v


class _Conn:
    """One downstream connection of the test server."""

    def __init__(self, server: H2Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.id = next(server._conn_ids)
        cfg = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: server.max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: server.initial_window_size,
            },
        )
        self.streams: dict[int, _Stream] = {}
        self.window_changed = asyncio.Event()
        ssl_obj = writer.get_extra_info("ssl_object")
        self.alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
        peer = ssl_obj.getpeercert() if ssl_obj is not None else None
        self.peer_subject = dict(x[0] for x in peer["subject"]) if peer else None

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def run(self) -> None:
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_CONN_WINDOW - 65535)
        self.flush()
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self.flush()  # h2 queued a GOAWAY
                    break
                for event in events:
                    self._on_event(event)
                self.flush()
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for s in self.streams.values():
                if s.task is not None:
                    s.task.cancel()
            self.writer.close()

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.DataReceived):
            s = self.streams.get(event.stream_id)
            if s is None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            s.body += event.data
            s.record.body_length = len(s.body)
            self.server._progress_add(s.path.partition("?")[0], len(event.data))
            if s.withhold_acks:
                s.unacked += event.flow_controlled_length
            else:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if event.stream_ended is not None:
                s.ended.set()
        elif isinstance(event, h2.events.TrailersReceived):
            s = self.streams.get(event.stream_id)
            if s is not None:
                s.trailers = [(_d(k), _d(v)) for k, v in event.headers]
                s.record.trailers = list(s.trailers)
                if event.stream_ended is not None:
                    s.ended.set()
        elif isinstance(event, h2.events.StreamEnded):
            s = self.streams.get(event.stream_id)
            if s is not None:
                s.ended.set()
        elif isinstance(event, h2.events.StreamReset):
            s = self.streams.pop(event.stream_id, None)
            if s is not None and s.task is not None:
                s.task.cancel()
            self.server._note_reset(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.window_changed.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.writer.close()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        pseudo: dict[str, str] = {}
        regular: list[tuple[str, str]] = []
        for k, v in event.headers:
            name, value = _d(k), _d(v)
            if name.startswith(":"):
                pseudo[name] = value
            else:
                regular.append((name, value))
        path = pseudo.get(":path", "")
        record = RecordedRequest(
            method=pseudo.get(":method", ""),
            path=path,
            authority=pseudo.get(":authority", ""),
            scheme=pseudo.get(":scheme", ""),
            headers=regular,
            connection_id=self.id,
            stream_id=event.stream_id,
        )
        s = _Stream(
            sid=event.stream_id,
            method=record.method,
            path=path,
            authority=record.authority,
            scheme=record.scheme,
            headers=regular,
            record=record,
            withhold_acks=path.startswith("/slow-read"),
        )
        if event.stream_ended is not None:
            s.ended.set()
        self.streams[event.stream_id] = s
        self.server._record(record)
        s.task = asyncio.get_running_loop().create_task(self._serve(s))

    # ------------------------------------------------------------------ responses
    async def _send_body(self, sid: int, data: bytes, end_stream: bool) -> None:
        view = memoryview(data)
        while view:
            window = self.h2.local_flow_control_window(sid)
            if window <= 0:
                self.window_changed.clear()
                await self.window_changed.wait()
                continue
            n = min(window, self.h2.max_outbound_frame_size, len(view))
            self.h2.send_data(sid, bytes(view[:n]))
            view = view[n:]
            self.flush()
            await self.writer.drain()
        if end_stream:
            self.h2.end_stream(sid)
            self.flush()

    async def _respond(
        self,
        s: _Stream,
        status: int,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        trailers: list[tuple[str, str]] | None = None,
    ) -> None:
        hdrs = [(":status", str(status)), ("server", "h2-test-server")]
        hdrs += headers or []
        if body and not any(k == "content-length" for k, _ in hdrs) and not trailers:
            hdrs.append(("content-length", str(len(body))))
        self.h2.send_headers(s.sid, hdrs, end_stream=not body and not trailers)
        self.flush()
        if body:
            await self._send_body(s.sid, body, end_stream=not trailers)
        if trailers:
            self.h2.send_headers(s.sid, trailers, end_stream=True)
            self.flush()

    def _json_echo(self, s: _Stream) -> bytes:
        return json.dumps(
            {
                "method": s.method,
                "path": s.path,
                "authority": s.authority,
                "scheme": s.scheme,
                "headers": s.headers,
                "trailers": s.trailers,
                "body_length": len(s.body),
                "body_sha256": hashlib.sha256(s.body).hexdigest(),
                "connection_id": self.id,
                "stream_id": s.sid,
                "alpn": self.alpn,
                "peer_subject": self.peer_subject,
            }
        ).encode()

    async def _slow_read(self, s: _Stream, rate: int) -> None:
        tick = 0.02
        per_tick = max(1, int(rate * tick))
        while True:
            if s.unacked:
                n = min(per_tick, s.unacked)
                s.unacked -= n
                self.h2.acknowledge_received_data(n, s.sid)
                self.flush()
            if s.ended.is_set() and not s.unacked:
                return
            await pause(tick)

    async def _serve(self, s: _Stream) -> None:
        try:
            await self._dispatch(s)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, ConnectionError):
            pass
        except asyncio.CancelledError:
            raise
        finally:
            self.streams.pop(s.sid, None)

    async def _dispatch(self, s: _Stream) -> None:
        path, _, query = s.path.partition("?")
        q = {k: v[-1] for k, v in parse_qs(query).items()}
        parts = path.strip("/").split("/")
        head = parts[0] if parts else ""
        if head == "reset":
            self._reset(s, int(q.get("code", h2.errors.ErrorCodes.INTERNAL_ERROR)))
            return
        if head == "slow-read":
            await self._slow_read(s, int(q.get("rate", 262144)))
            await self._respond(
                s, 200, json.dumps({"received": len(s.body)}).encode(), [("content-type", "application/json")]
            )
            return
        await s.ended.wait()
        json_ct = [("content-type", "application/json")]
        if head == "status" and len(parts) > 1:
            code = int(parts[1])
            await self._respond(s, code, f"status {code}".encode(), [("content-type", "text/plain")])
        elif head == "delay" and len(parts) > 1:
            await pause(int(parts[1]) / 1000.0)
            await self._respond(s, 200, self._json_echo(s), json_ct)
        elif head == "fail" and len(parts) > 1:
            if self.server.count(path) <= int(parts[1]):
                mode = q.get("mode", "status")
                if mode == "reset":
                    self._reset(s, int(q.get("code", h2.errors.ErrorCodes.INTERNAL_ERROR)))
                elif mode == "delay":
                    await pause(int(q.get("ms", 5000)) / 1000.0)
                    await self._respond(s, 200, self._json_echo(s), json_ct)
                else:
                    code = int(q.get("status", 503))
                    await self._respond(s, code, f"failing on purpose: {code}".encode())
            else:
                await self._respond(s, 200, self._json_echo(s), json_ct)
        elif head == "echo":
            ct = next((v for k, v in s.headers if k == "content-type"), "application/octet-stream")
            trailers = None
            if s.trailers or any(k == "x-send-trailers" for k, _ in s.headers):
                trailers = [*s.trailers, ("x-server-trailer", "done")]
            await self._respond(s, 200, bytes(s.body), [("content-type", ct)], trailers)
        elif head == "big" and len(parts) > 1:
            await self._respond(
                s, 200, pattern(int(parts[1])), [("content-type", "application/octet-stream")]
            )
        else:
            await self._respond(s, 200, self._json_echo(s), json_ct)

    def _reset(self, s: _Stream, code: int) -> None:
        self.h2.reset_stream(s.sid, error_code=code)
        self.flush()


class H2Server:
    """The HTTP/2 test server; ``start()`` runs it in a background thread with its own event loop.

    ``port`` is the h2c (prior knowledge) port; ``tls_port`` the TLS (ALPN h2) port when ``certs`` is given.
    """

    def __init__(
        self,
        *,
        certs: CertBundle | None = None,
        require_client_cert: bool = False,
        max_concurrent_streams: int = 100,
        initial_window_size: int = 65535,
    ) -> None:
        self.certs = certs
        self.require_client_cert = require_client_cert
        self.max_concurrent_streams = max_concurrent_streams
        self.initial_window_size = initial_window_size
        self.port = 0
        self.tls_port: int | None = None
        self.requests: collections.deque[RecordedRequest] = collections.deque(maxlen=5000)
        self.resets_received = 0
        self._counts: collections.Counter[str] = collections.Counter()
        self._progress: collections.Counter[str] = collections.Counter()
        self._cond = threading.Condition()
        self._conn_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.Server] = []
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._conns: set[_Conn] = set()
        self._startup_error: BaseException | None = None

    # ------------------------------------------------------------------ observations (any thread)
    def count(self, path: str) -> int:
        """Requests received so far for ``path`` (query string ignored)."""
        with self._cond:
            return self._counts[path.partition("?")[0]]

    def total(self) -> int:
        with self._cond:
            return sum(self._counts.values())

    def progress(self, path: str) -> int:
        """Request-body bytes received so far for ``path`` (all requests to it)."""
        with self._cond:
            return self._progress[path.partition("?")[0]]

    def wait_count(self, path: str, n: int, timeout: float = 10.0) -> int:
        """Block until ``count(path) >= n``; returns the count. Raises TimeoutError."""
        key = path.partition("?")[0]
        with self._cond:
            if not self._cond.wait_for(lambda: self._counts[key] >= n, timeout):
                raise TimeoutError(f"{key}: {self._counts[key]} requests after {timeout}s, wanted {n}")
            return self._counts[key]

    def requests_for(self, path: str) -> list[RecordedRequest]:
        key = path.partition("?")[0]
        with self._cond:
            return [r for r in self.requests if r.path.partition("?")[0] == key]

    def last(self, path: str) -> RecordedRequest:
        found = self.requests_for(path)
        if not found:
            raise LookupError(f"no request seen for {path}")
        return found[-1]

    def reset_counts(self) -> None:
        with self._cond:
            self._counts.clear()
            self._progress.clear()
            self.requests.clear()

    def _record(self, record: RecordedRequest) -> None:
        with self._cond:
            self._counts[record.path.partition("?")[0]] += 1
            self.requests.append(record)
            self._cond.notify_all()

    def _progress_add(self, key: str, n: int) -> None:
        with self._cond:
            self._progress[key] += n

    def _note_reset(self, _sid: int) -> None:
        with self._cond:
            self.resets_received += 1
            self._cond.notify_all()

    # ------------------------------------------------------------------ lifecycle
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        conn = _Conn(self, reader, writer)
        self._conns.add(conn)
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)
            self._conn_tasks.discard(task)

    async def _start(self) -> None:
        srv = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self._servers.append(srv)
        self.port = srv.sockets[0].getsockname()[1]
        if self.certs is not None:
            ctx: ssl.SSLContext = self.certs.server_context(
                ("h2",), require_client_cert=self.require_client_cert
            )
            tls = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ctx)
            self._servers.append(tls)
            self.tls_port = tls.sockets[0].getsockname()[1]

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start())
        except BaseException as exc:
            self._startup_error = exc
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown())
            loop.close()

    async def _shutdown(self) -> None:
        for srv in self._servers:
            srv.close()
        # End connections by closing their sockets: their handler tasks then return normally (cancelling
        # them would make asyncio's stream callback log an error for each).
        for conn in list(self._conns):
            conn.writer.transport.abort()
        if self._conn_tasks:
            await asyncio.wait(list(self._conn_tasks), timeout=5)
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        # cancel stream tasks still pending
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in pending:
            t.cancel()
        for t in pending:
            with contextlib.suppress(BaseException):
                await t

    def start(self) -> H2Server:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="h2-test-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("h2 test server did not start in 10 s")
        if self._startup_error is not None:
            raise RuntimeError("h2 test server failed to start") from self._startup_error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> H2Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<H2Server port={self.port} tls_port={self.tls_port} requests={self.total()}>"
