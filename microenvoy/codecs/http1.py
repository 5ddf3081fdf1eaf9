"""HTTP/1.1 server codec: h11 underneath, neutral exchange events on top.

Theory of operation: one ``Http1ServerCodec`` per downstream TCP connection. ``receive_data`` feeds h11 and
returns events; requests are numbered 1, 3, 5 ... as stream ids (HTTP/2 style) so the front can treat every
codec alike. HTTP/1.1 has no multiplexing: a pipelined request is only parsed after the previous response is
complete (h11's PAUSED state), which is RFC 9112 section 9.3.2's ordering rule.

Request headers become pseudo-headers: ``:method``, ``:scheme`` (``http``/``https`` from the connection),
``:authority`` (from Host, RFC 9112 section 3.2; a request without Host is a 400), ``:path`` (the target).
Limits (RFC 6585 431): header block bytes (h11's incomplete-event limit) and header count.

Protocol errors queue a 4xx response with ``Connection: close`` (400 for malformed, 431 for oversized
headers) and return ``ProtocolFailure``; the front flushes and closes.
"""

from __future__ import annotations

from http import HTTPStatus

import h11

from microenvoy.core.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    HeadersReceived,
    ProtocolFailure,
    TrailersReceived,
)
from microenvoy.core.headers import HOP_BY_HOP, Headers

__all__ = ["Http1ServerCodec"]


class Http1ServerCodec:
    """Sans-IO HTTP/1.1 server side of one connection."""

    protocol = "HTTP/1.1"

    def __init__(
        self,
        *,
        tls: bool = False,
        max_header_bytes: int = 60 * 1024,
        max_headers_count: int = 100,
        max_discard_bytes: int = 1 << 20,
    ) -> None:
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._max_discard = max_discard_bytes
        self._expected: int | None = None
        """Declared request body length (None: chunked)."""
        self._received = 0
        self._discarding = False
        """The response went out before the request body ended: read and drop the rest, then go on."""
        self._scheme = b"https" if tls else b"http"
        self._max_header_bytes = max_header_bytes
        self._max_headers_count = max_headers_count
        self._out: list[bytes] = []
        self._stream_id = -1
        self._request_open = False
        """A request's body is still arriving."""
        self._response_started = False
        self._response_done = False
        self._chunked = False
        self._closed = False
        self.keep_alive = True

    def __repr__(self) -> str:
        return (
            f"<Http1ServerCodec stream={self._stream_id} their={self._conn.their_state}"
            f" our={self._conn.our_state}>"
        )

    # ------------------------------------------------------------------------------------ input
    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the socket (``b""`` = EOF)."""
        if self._closed:
            return []
        try:
            self._conn.receive_data(data)
        except RuntimeError:  # data after the peer closed; nothing more to parse
            return []
        return self._drain()

    def _drain(self) -> list[Event]:
        events: list[Event] = []
        conn = self._conn
        while True:
            before = conn.their_state
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if before is h11.MUST_CLOSE:
                    # The client said "Connection: close" and its request is complete: RFC 9112 section
                    # 9.6 says to answer it and ignore whatever follows, not to fail it.
                    self._closed = True
                    return events
                events.append(self._fail(exc.error_status_hint, str(exc)))
                return events
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return events
            if isinstance(ev, h11.Request):
                out = self._on_request(ev)
                events.append(out)
                if isinstance(out, ProtocolFailure):
                    return events
            elif isinstance(ev, h11.Data):
                self._received += len(ev.data)
                if not self._discarding:
                    events.append(DataReceived(self._stream_id, bytes(ev.data), False, len(ev.data)))
            elif isinstance(ev, h11.EndOfMessage):
                if not self._request_open:
                    continue  # the request ended with its headers: HeadersReceived said so already
                self._request_open = False
                if self._discarding:
                    self._discarding = False
                    if not self._next_cycle():
                        return events
                    continue
                if ev.headers:
                    events.append(TrailersReceived(self._stream_id, Headers((k, v) for k, v in ev.headers)))
                else:
                    events.append(DataReceived(self._stream_id, b"", True, 0))
            elif isinstance(ev, h11.ConnectionClosed):
                self._closed = True
                events.append(ConnectionTerminated(reason="eof"))
                return events

    def _on_request(self, req: h11.Request) -> Event:
        raw = req.headers
        if req.http_version not in (b"1.0", b"1.1"):
            return self._fail(505, f"HTTP version {req.http_version.decode('latin-1')} not supported")
        if len(raw) > self._max_headers_count:
            return self._fail(431, f"too many headers ({len(raw)} > {self._max_headers_count})")
        # h11's limit only bounds an *incomplete* head; a complete one that arrived in one read is
        # measured here so the limit does not depend on how the bytes were segmented.
        size = len(req.method) + len(req.target) + 12 + sum(len(k) + len(v) + 4 for k, v in raw)
        if size > self._max_header_bytes:
            return self._fail(431, f"request headers too large ({size} > {self._max_header_bytes} bytes)")
        self._stream_id += 2
        self._received = 0
        self._expected = None
        self._response_started = False
        self._response_done = False
        host: bytes | None = None
        items: list[tuple[bytes, bytes]] = [
            (b":method", bytes(req.method)),
            (b":scheme", self._scheme),
            (b":authority", b""),
            (b":path", bytes(req.target)),
        ]
        end_stream = True
        for name, value in raw:
            if name == b"host":
                host = bytes(value)
                continue
            if name == b"content-length":
                if value != b"0":
                    end_stream = False
                    self._expected = int(value)  # h11 validated it
            elif name == b"transfer-encoding":
                end_stream = False
            items.append((bytes(name), bytes(value)))
        if host is None:
            if req.http_version == b"1.0":
                host = b""
            else:  # RFC 9112 section 3.2: a request without Host is a 400
                return self._fail(400, "missing Host header")
        items[2] = (b":authority", host)
        self._request_open = not end_stream
        if not end_stream and self._conn.they_are_waiting_for_100_continue:
            self._out.append(self._conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        return HeadersReceived(self._stream_id, Headers(items), end_stream)

    def _fail(self, status: int, detail: str) -> ProtocolFailure:
        """Queue a 4xx with Connection: close if a response can still be sent."""
        self.keep_alive = False
        self._closed = True  # parse nothing more: one failure, one stat
        if self._conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not self._response_started:
            try:
                body = (detail + "\n").encode("utf-8", "replace")
                self._out.append(
                    self._conn.send(
                        h11.Response(
                            status_code=status,
                            reason=_reason(status),
                            headers=[
                                (b"content-type", b"text/plain"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"),
                            ],
                        )
                    )
                )
                self._out.append(self._conn.send(h11.Data(data=body)))
                self._out.append(self._conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass
        stat = "downstream_rq_431" if status == 431 else "downstream_rq_http1_invalid"
        return ProtocolFailure(stat, detail, close=True, status=status)

    # ----------------------------------------------------------------------------------- output
    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        status = 200
        items: list[tuple[bytes, bytes]] = []
        has_length = False
        for k, v in headers:
            if k == b":status":
                status = int(v)
            elif k.startswith(b":") or k in HOP_BY_HOP:
                continue
            else:
                if k == b"content-length":
                    has_length = True
                items.append((k, v))
        if end_stream and not has_length and status not in (204, 304) and status >= 200:
            items.append((b"content-length", b"0"))
        if self.keep_alive and self._request_open:
            # Answering before the request body ended: keep the connection only if the rest is known to
            # be small enough to read and drop (RFC 9112 section 9.6), else say we close.
            left = None if self._expected is None else self._expected - self._received
            if left is None or left > self._max_discard:
                self.keep_alive = False
        if not self.keep_alive:
            items.append((b"connection", b"close"))
        self._response_started = True
        # h11 picks chunked framing for an HTTP/1.1 peer when no length is known.
        self._chunked = not has_length and not end_stream and self._conn.their_http_version == b"1.1"
        try:
            self._out.append(
                self._conn.send(h11.Response(status_code=status, headers=items, reason=_reason(status)))
            )
            if end_stream:
                self._end()
        except h11.LocalProtocolError:
            self.keep_alive = False

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        try:
            if data:
                self._out.append(self._conn.send(h11.Data(data=data)))
            if end_stream:
                self._end()
        except h11.LocalProtocolError:
            self.keep_alive = False

    def send_trailers(self, stream_id: int, trailers: Headers) -> None:
        """Trailers go out only on a chunked response (h11 drops them otherwise: no way to send)."""
        try:
            items = [(k, v) for k, v in trailers if not k.startswith(b":")]
            chunked = self._conn.our_state is h11.SEND_BODY and self._chunked
            self._out.append(self._conn.send(h11.EndOfMessage(headers=items if chunked else [])))
            self._response_done = True
        except h11.LocalProtocolError:
            self.keep_alive = False

    def _end(self) -> None:
        self._out.append(self._conn.send(h11.EndOfMessage()))
        self._response_done = True

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        """HTTP/1.1 cannot reset one exchange: the connection closes."""
        self.keep_alive = False

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def response_complete(self) -> list[Event]:
        """Called by the front after the last response byte: start the next keep-alive cycle."""
        if not self.keep_alive:
            return []
        if self._request_open:
            # The response went out first; the rest of the (small, see send_headers) body is read and
            # dropped, then the next request is parsed.
            self._discarding = True
            return self._drain()
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            if not self._next_cycle():
                return []
            return self._drain()
        if self._conn.our_state is h11.MUST_CLOSE or self._conn.their_state is h11.MUST_CLOSE:
            self.keep_alive = False
        return []

    def _next_cycle(self) -> bool:
        try:
            self._conn.start_next_cycle()
        except h11.LocalProtocolError:
            self.keep_alive = False
            return False
        return True

    @property
    def response_started(self) -> bool:
        """The current response's headers went out (too late to add ``Connection: close`` to them)."""
        return self._response_started

    @property
    def wants_close(self) -> bool:
        """The connection must close once pending bytes are written."""
        return not self.keep_alive or self._conn.our_state in (h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)

    def open_streams(self) -> int:
        return 1 if self._stream_id >= 1 and not self._response_done else 0


_REASONS: dict[int, bytes] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


def _reason(status: int) -> bytes:
    """The standard reason phrase (RFC 9110 section 15), as nginx and Envoy send; empty for unknown codes.
    Some clients (h2load --h1) treat a status line without one as a failure."""
    return _REASONS.get(status, b"")
