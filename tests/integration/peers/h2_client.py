"""A small asyncio HTTP/2 client (h2 library) for tests: h2c prior knowledge or TLS with ALPN.

Concurrent requests multiplex on one connection. ``send_raw`` writes bytes that bypass the h2 state machine
(to provoke protocol errors); a GOAWAY from the peer is recorded in ``goaway``.

    async with H2Client("127.0.0.1", port) as c:
        r = await c.request("GET", "/")
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from .common import HeaderInput, Response, StreamResetError, header_list

__all__ = ["GoAway", "H2Client", "raw_frame"]


def raw_frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """Encode one HTTP/2 frame by hand (RFC 9113 §4.1)."""
    return (
        len(payload).to_bytes(3, "big") + bytes([frame_type, flags]) + stream_id.to_bytes(4, "big") + payload
    )


@dataclass(frozen=True)
class GoAway:
    error_code: int
    last_stream_id: int
    debug_data: bytes


@dataclass
class _Pending:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    done: asyncio.Future[None] | None = None


class H2Client:
    """An HTTP/2 client connection; use as an async context manager."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = "localhost",
        authority: str | None = None,
        initial_window_size: int = 1024 * 1024,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname if ssl_context is not None else None
        self.authority = authority or f"{host}:{port}"
        self.scheme = "https" if ssl_context is not None else "http"
        self.h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window_size,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.goaway: GoAway | None = None
        self.alpn: str | None = None
        self.closed = asyncio.Event()
        self.remote_settings_received = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[int, _Pending] = {}
        self._window_changed = asyncio.Event()
        self._protocol_error: Exception | None = None

    async def __aenter__(self) -> H2Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, within: float = 10.0) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                self.host, self.port, ssl=self.ssl_context, server_hostname=self.server_hostname
            ),
            within,
        )
        self._reader, self._writer = reader, writer
        ssl_obj = writer.get_extra_info("ssl_object")
        if ssl_obj is not None:
            self.alpn = ssl_obj.selected_alpn_protocol()
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(16 * 1024 * 1024 - 65535)
        self._flush()
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    async def close(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(Exception):
                self.h2.close_connection()
                self._flush()
            self._writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.wait_closed(), 2)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    async def send_raw(self, data: bytes) -> None:
        """Write bytes to the socket as they are, outside the h2 state machine."""
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def wait_goaway(self, within: float = 5.0) -> GoAway:
        """Wait until the peer sent GOAWAY (or closed); returns it. Raises TimeoutError."""
        await asyncio.wait_for(self.closed.wait(), within)
        if self.goaway is None:
            raise ConnectionError("connection closed without GOAWAY")
        return self.goaway

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self._protocol_error = exc
                    self._flush()
                    break
                for ev in events:
                    self._on_event(ev)
                self._flush()
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            self._protocol_error = exc
        finally:
            self.closed.set()
            for sid, p in list(self._pending.items()):
                if p.done is not None and not p.done.done():
                    err = ConnectionError(
                        f"connection closed before stream {sid} completed"
                        + (f" (GOAWAY {self.goaway.error_code})" if self.goaway else "")
                    )
                    p.done.set_exception(err)

    def _on_event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            p = self._pending.get(ev.stream_id)
            if p is not None:
                for k, v in header_list(ev.headers):
                    if k == ":status":
                        p.status = int(v)
                    else:
                        p.headers.append((k, v))
                if ev.stream_ended is not None:
                    self._finish(ev.stream_id)
        elif isinstance(ev, h2.events.DataReceived):
            self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            p = self._pending.get(ev.stream_id)
            if p is not None:
                p.body += ev.data
            if ev.stream_ended is not None:
                self._finish(ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            p = self._pending.get(ev.stream_id)
            if p is not None:
                p.trailers = header_list(ev.headers)
            if ev.stream_ended is not None:
                self._finish(ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            self._finish(ev.stream_id)
        elif isinstance(ev, h2.events.StreamReset):
            self._window_changed.set()  # wake a sender blocked on this stream's window
            p = self._pending.get(ev.stream_id)  # whoever awaits the stream removes it
            if p is not None and p.done is not None and not p.done.done():
                p.done.set_exception(StreamResetError(ev.stream_id, int(ev.error_code or 0)))
        elif isinstance(ev, h2.events.WindowUpdated):
            self._window_changed.set()
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self._window_changed.set()
            self.remote_settings_received.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = GoAway(
                int(ev.error_code or 0), int(ev.last_stream_id or 0), ev.additional_data or b""
            )

    def _finish(self, sid: int) -> None:
        p = self._pending.get(sid)
        if p is not None and p.done is not None and not p.done.done():
            p.done.set_result(None)

    async def _send_body(self, sid: int, data: bytes, end_stream: bool, p: _Pending | None = None) -> None:
        view = memoryview(data)
        while view:
            if p is not None and p.done is not None and p.done.done():
                return  # the peer already answered (or reset); stop uploading
            window = self.h2.local_flow_control_window(sid)
            if window <= 0:
                self._window_changed.clear()
                closed = asyncio.ensure_future(self.closed.wait())
                changed = asyncio.ensure_future(self._window_changed.wait())
                try:
                    await asyncio.wait({closed, changed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closed.cancel()
                    changed.cancel()
                if self.closed.is_set():
                    raise ConnectionError("connection closed while sending the body")
                continue
            n = min(window, self.h2.max_outbound_frame_size, len(view))
            self.h2.send_data(sid, bytes(view[:n]))
            view = view[n:]
            self._flush()
            assert self._writer is not None
            await self._writer.drain()
        if end_stream:
            self.h2.end_stream(sid)
            self._flush()

    def request_headers(
        self, method: str, path: str, headers: HeaderInput = (), authority: str | None = None
    ) -> list[tuple[str, str]]:
        return [
            (":method", method),
            (":scheme", self.scheme),
            (":authority", authority or self.authority),
            (":path", path),
            *header_list(headers),
        ]

    async def request(
        self,
        method: str,
        path: str,
        headers: HeaderInput = (),
        body: bytes = b"",
        trailers: HeaderInput | None = None,
        *,
        authority: str | None = None,
        within: float = 10.0,
    ) -> Response:
        """Send one request and wait for the whole response. Raises StreamResetError, ConnectionError."""
        return await asyncio.wait_for(self._request(method, path, headers, body, trailers, authority), within)

    async def _request(
        self,
        method: str,
        path: str,
        headers: HeaderInput,
        body: bytes,
        trailers: HeaderInput | None,
        authority: str | None,
    ) -> Response:
        if self.closed.is_set():
            raise ConnectionError("connection is closed")
        sid = self.h2.get_next_available_stream_id()
        p = _Pending(done=asyncio.get_running_loop().create_future())
        self._pending[sid] = p
        assert p.done is not None
        try:
            hdrs = self.request_headers(method, path, headers, authority)
            self.h2.send_headers(sid, hdrs, end_stream=not body and trailers is None)
            self._flush()
            try:
                if body:
                    await self._send_body(sid, body, end_stream=trailers is None, p=p)
                if trailers is not None and not p.done.done():
                    self.h2.send_headers(sid, header_list(trailers), end_stream=True)
                    self._flush()
            except h2.exceptions.StreamClosedError:
                pass  # the peer ended or reset the stream early; p.done carries the outcome
            await p.done
        finally:
            self._pending.pop(sid, None)
        return Response(p.status, p.headers, bytes(p.body), p.trailers)

    # -------------------------------------------------------------- a stream driven step by step
    def start_request(
        self, method: str, path: str, headers: HeaderInput = (), *, authority: str | None = None
    ) -> int:
        """Send request headers without ending the stream; returns the stream id (see ``send_data``)."""
        if self.closed.is_set():
            raise ConnectionError("connection is closed")
        sid = self.h2.get_next_available_stream_id()
        self._pending[sid] = _Pending(done=asyncio.get_running_loop().create_future())
        self.h2.send_headers(sid, self.request_headers(method, path, headers, authority), end_stream=False)
        self._flush()
        return sid

    async def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        """Send body bytes on a stream from ``start_request`` (respecting flow control).

        Does nothing once the peer answered or reset the stream (``wait_response`` reports the outcome).
        """
        p = self._pending.get(sid)
        if p is not None and p.done is not None and p.done.done():
            return
        try:
            if data:
                await self._send_body(sid, data, end_stream, p=p)
            elif end_stream:
                self.h2.end_stream(sid)
                self._flush()
        except h2.exceptions.StreamClosedError:
            pass

    async def wait_response(self, sid: int, within: float = 10.0) -> Response:
        """The response on a stream from ``start_request``. Raises StreamResetError, ConnectionError."""
        p = self._pending.get(sid)
        if p is None or p.done is None:
            raise LookupError(f"stream {sid} is not pending (reset or already collected)")
        try:
            await asyncio.wait_for(asyncio.shield(p.done), within)
        finally:
            if p.done.done():
                self._pending.pop(sid, None)
        return Response(p.status, p.headers, bytes(p.body), p.trailers)

    def __repr__(self) -> str:
        return f"<H2Client {self.scheme}://{self.host}:{self.port} streams={len(self._pending)}>"
