"""HTTP/1.1 client codec for upstream connections (h11), speaking the neutral exchange events.

Theory of operation: one ``Http1ClientCodec`` wraps one h11 client connection. The I/O layer sends one request
at a time (never pipelining), feeds received bytes to ``receive_data`` and writes ``data_to_send()``. A
request's pseudo-headers become the request line and ``Host`` (RFC 9112 section 3.2: "A client MUST send a
Host header field in all HTTP/1.1 request messages"); hop-by-hop fields are dropped (RFC 9110 section 7.6.1);
a request whose body follows without ``content-length`` is sent chunked (RFC 9112 section 7.1), which is also
the only way HTTP/1.1 can carry request trailers: trailers on a content-length request are dropped.

Responses come back as ``HeadersReceived`` (``:status`` first; 1xx skipped), ``DataReceived`` and
``TrailersReceived`` (chunked trailers). When both directions are complete and the server allows keep-alive,
``reusable`` is true and ``DataAcknowledged`` is emitted; the pool then calls ``start_next_cycle()``. A
connection that closes before the response is complete gives ``StreamReset`` (reason ``connection_closed``);
bytes h11 rejects give ``ProtocolFailure`` (the connection must be closed).
"""

from __future__ import annotations

import h11

from microenvoy.core.errors import CodecError
from microenvoy.core.events import (
    ConnectionTerminated,
    DataAcknowledged,
    DataReceived,
    Event,
    HeadersReceived,
    ProtocolFailure,
    StreamReset,
    TrailersReceived,
)
from microenvoy.core.headers import HOP_BY_HOP, Headers

__all__ = ["Http1ClientCodec"]


_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


class Http1ClientCodec:
    """One upstream HTTP/1.1 connection: one request/response at a time."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_head_sent",
        "_out",
        "_response_done",
        "_response_started",
        "closed",
        "default_authority",
        "requests",
        "stream_id",
    )

    def __init__(self, *, default_authority: bytes = b"", max_response_header_bytes: int = 65536) -> None:
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_response_header_bytes)
        self.default_authority = default_authority
        """``Host`` used when a request has neither ``:authority`` nor ``host``."""
        self.stream_id = 0
        """Counter of the current request (1 for the first)."""
        self.requests = 0
        self.closed = False
        self._chunked = False
        self._head_sent = False
        self._response_started = False
        self._response_done = False
        self._out: list[bytes] = []

    # -- state ----------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """No request in progress and the connection can take one."""
        return not self.closed and self._conn.our_state is h11.IDLE and self._conn.their_state is h11.IDLE

    @property
    def request_complete(self) -> bool:
        return self._conn.our_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    @property
    def response_complete(self) -> bool:
        return self._response_done

    @property
    def reusable(self) -> bool:
        """Both directions of the current exchange are complete and keep-alive was agreed."""
        return not self.closed and self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    def start_next_cycle(self) -> None:
        """Reset for the next request (only when ``reusable``)."""
        self._conn.start_next_cycle()
        self._chunked = False
        self._head_sent = False
        self._response_started = False
        self._response_done = False

    # -- sending --------------------------------------------------------------------------------
    def send_headers(self, headers: Headers, end_stream: bool) -> int:
        """Queue the request head (and its end when ``end_stream``); returns the request's stream id."""
        if not self.idle:
            raise CodecError("HTTP/1.1 connection is busy or closed", stat="upstream_cx_busy")
        method = headers.get(b":method") or b"GET"
        target = headers.get(b":path") or b"/"
        authority = headers.get(b":authority") or headers.get(b"host") or self.default_authority
        connection_named = _connection_tokens(headers)
        out: list[tuple[bytes, bytes]] = [(b"host", authority)]
        has_length = False
        for name, value in headers:
            if name.startswith(b":") or name == b"host" or name in HOP_BY_HOP or name in connection_named:
                continue
            if name == b"content-length":
                has_length = True
            out.append((name, value))
        self._chunked = False
        if not end_stream and not has_length:
            out.append((b"transfer-encoding", b"chunked"))
            self._chunked = True
        elif end_stream and not has_length and method in _BODY_METHODS:
            out.append((b"content-length", b"0"))
        try:
            request = h11.Request(method=method, target=target, headers=out)
        except h11.LocalProtocolError as e:
            raise CodecError(f"cannot send HTTP/1.1 request: {e}", "upstream_rq_local_protocol_error") from e
        self.stream_id += 1
        self.requests += 1
        self._send(request)
        self._head_sent = True
        if end_stream:
            self._send(h11.EndOfMessage())
        return self.stream_id

    def send_data(self, data: bytes, end_stream: bool) -> None:
        if self._conn.our_state is not h11.SEND_BODY:
            return  # the exchange already ended (early response / reset): drop, as the pool closes it
        if data:
            self._send(h11.Data(data=data))
        if end_stream:
            self._send(h11.EndOfMessage())

    def send_trailers(self, trailers: Headers) -> None:
        """Chunked requests carry trailers; on a content-length request they are dropped."""
        if self._conn.our_state is not h11.SEND_BODY:
            return
        if self._chunked:
            fields = [(k, v) for k, v in trailers if not k.startswith(b":") and k not in HOP_BY_HOP]
            self._send(h11.EndOfMessage(headers=fields))
        else:
            self._send(h11.EndOfMessage())

    def _send(self, event: h11.Request | h11.Data | h11.EndOfMessage) -> None:
        try:
            data = self._conn.send(event)
        except h11.LocalProtocolError as e:
            self.closed = True
            raise CodecError(f"cannot send HTTP/1.1 request: {e}", "upstream_rq_local_protocol_error") from e
        if data:
            self._out.append(data)

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def close(self) -> None:
        """Give up on the connection (reset, drain): the pool closes the transport."""
        self.closed = True

    # -- receiving ------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the upstream (``b""`` = EOF); returns neutral events."""
        events: list[Event] = []
        if self.closed:
            return events
        sid = self.stream_id
        try:
            self._conn.receive_data(data)
            while True:
                ev = self._conn.next_event()
                if ev is h11.NEED_DATA or ev is h11.PAUSED:
                    break
                if isinstance(ev, h11.InformationalResponse):
                    continue  # 100 Continue and friends: the engine never sees 1xx
                if isinstance(ev, h11.Response):
                    self._response_started = True
                    events.append(HeadersReceived(sid, _response_headers(ev), end_stream=False))
                elif isinstance(ev, h11.Data):
                    events.append(DataReceived(sid, bytes(ev.data), False, len(ev.data)))
                elif isinstance(ev, h11.EndOfMessage):
                    self._response_done = True
                    if ev.headers:
                        trailers = Headers((k, v) for k, v in ev.headers if k not in HOP_BY_HOP)
                        events.append(TrailersReceived(sid, trailers))
                    else:
                        _mark_end(events, sid)
                    if self.reusable:
                        events.append(DataAcknowledged(sid))
                elif isinstance(ev, h11.ConnectionClosed):
                    self.closed = True
                    events.append(ConnectionTerminated(reason="closed by upstream"))
                    break
        except h11.RemoteProtocolError as e:
            self.closed = True
            if self._head_sent and not self._response_done and not data:  # EOF mid-exchange
                events.append(StreamReset(sid, 0, "connection_closed"))
                events.append(ConnectionTerminated(reason="closed by upstream"))
            else:
                events.append(ProtocolFailure("upstream_cx_protocol_error", f"bad HTTP/1.1 response: {e}"))
        if self.closed and self._head_sent and not self._response_done:
            if not any(isinstance(e, StreamReset | ProtocolFailure) for e in events):
                events.insert(0, StreamReset(sid, 0, "connection_closed"))
        return events

    def __repr__(self) -> str:
        return (
            f"<Http1ClientCodec requests={self.requests} us={self._conn.our_state.__name__}"
            f" them={self._conn.their_state.__name__}{' closed' if self.closed else ''}>"
        )


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for value in headers.get_all(b"connection"):
        for t in value.split(b","):
            t = t.strip().lower()
            if t:
                tokens.add(t)
    return frozenset(tokens)


def _response_headers(ev: h11.Response) -> Headers:
    items: list[tuple[bytes, bytes]] = [(b":status", str(ev.status_code).encode())]
    raw = list(ev.headers)
    named: set[bytes] = set()
    for k, v in raw:
        if k == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    items.extend((k, v) for k, v in raw if k not in HOP_BY_HOP and k not in named)
    return Headers(items)


def _mark_end(events: list[Event], sid: int) -> None:
    """Fold the end of the response into the last event of this batch when possible."""
    if events:
        last = events[-1]
        if isinstance(last, HeadersReceived) and last.stream_id == sid and not last.end_stream:
            events[-1] = HeadersReceived(sid, last.headers, True)
            return
        if isinstance(last, DataReceived) and last.stream_id == sid and not last.end_stream:
            events[-1] = DataReceived(sid, last.data, True, last.flow_controlled_length)
            return
    events.append(DataReceived(sid, b"", True, 0))
