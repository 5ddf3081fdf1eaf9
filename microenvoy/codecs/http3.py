"""HTTP/3 server codec: aioquic's H3Connection over a ``ProxyQuicConnection``, neutral events on top.

Theory of operation: the QUIC listener feeds every QUIC event of one connection to ``handle_quic_event``;
HTTP/3 request streams (client-initiated bidirectional, RFC 9114 section 6.1) become exchange events. The
first HEADERS frame on a stream is the request, a second one the trailers (section 4.1). QPACK dynamic tables
are on (aioquic's 4096-byte table, 16 blocked streams).

Early data (RFC 8470, RFC 9114 section 10.9): a request whose stream carried 0-RTT data is marked
``early_data``; the codec itself answers non-idempotent methods with 425 Too Early so that they are never
forwarded, and the front adds ``early-data: 1`` to the idempotent ones it forwards.

Payload bytes are reported to the QUIC layer as delivered and only credited back to the peer when the front
calls ``acknowledge`` (see ``microenvoy.codecs.quic``).
"""

from __future__ import annotations

from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import H3_ALPN, ErrorCode, FrameType, H3Connection, encode_frame
from aioquic.h3.events import DataReceived as H3DataReceived
from aioquic.h3.events import HeadersReceived as H3HeadersReceived
from aioquic.quic import events as qe

from microenvoy.codecs.quic import ProxyQuicConnection
from microenvoy.core.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    HeadersReceived,
    ProtocolFailure,
    StreamReset,
    TrailersReceived,
)
from microenvoy.core.headers import CONNECTION_SPECIFIC, Headers

__all__ = ["H3_ALPN", "IDEMPOTENT_METHODS", "Http3ServerCodec"]

# RFC 9110 section 9.2.2
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class Http3ServerCodec:
    """Sans-IO HTTP/3 server side of one QUIC connection."""

    protocol = "HTTP/3"

    def __init__(
        self,
        quic: ProxyQuicConnection,
        *,
        max_header_bytes: int = 60 * 1024,
        max_headers_count: int = 100,
    ) -> None:
        self.quic = quic
        self._h3: H3Connection | None = None
        self._max_header_bytes = max_header_bytes
        self._max_headers_count = max_headers_count
        self._requests: set[int] = set()
        """Streams whose request headers were received (a later HEADERS frame is trailers)."""
        self._request_done: set[int] = set()
        """Request streams whose request side ended (body end or trailers)."""
        self._refused: set[int] = set()
        """Streams whose response is over (or refused) while the request still arrives: the rest is
        ignored until the request side ends."""
        self._goaway_id: int | None = None
        self.closed = False
        self.last_stream_id = 0

    def __repr__(self) -> str:
        return f"<Http3ServerCodec streams={len(self._requests)} closed={self.closed}>"

    # ------------------------------------------------------------------------------------ input
    def handle_quic_event(self, event: qe.QuicEvent) -> list[Event]:
        if isinstance(event, qe.ProtocolNegotiated):
            if event.alpn_protocol in H3_ALPN and self._h3 is None:
                self._h3 = H3Connection(self.quic)
            return []
        if isinstance(event, qe.ConnectionTerminated):
            self.closed = True
            return [ConnectionTerminated(event.error_code, event.reason_phrase or "closed")]
        out: list[Event] = []
        if isinstance(event, qe.StreamReset):
            if event.stream_id in self._requests:
                out.append(StreamReset(event.stream_id, event.error_code, "remote_reset"))
                self._forget(event.stream_id)
        h3 = self._h3
        if h3 is None:
            return out
        for ev in h3.handle_event(event):
            if isinstance(ev, H3HeadersReceived):
                sid = ev.stream_id
                if sid in self._refused:
                    if ev.stream_ended:
                        self._refused.discard(sid)
                    continue
                if sid in self._requests:
                    self._request_done.add(sid)
                    out.append(TrailersReceived(sid, Headers(ev.headers)))
                else:
                    req = self._on_request(sid, ev)
                    if req is not None:
                        out.append(req)
            elif isinstance(ev, H3DataReceived):
                sid = ev.stream_id
                if sid in self._refused or sid not in self._requests:
                    if ev.data:
                        self.quic.delivered(sid, len(ev.data))
                        self.quic.consumed(sid, len(ev.data))
                    if ev.stream_ended:
                        self._refused.discard(sid)
                    continue
                if ev.stream_ended:
                    self._request_done.add(sid)
                self.quic.delivered(sid, len(ev.data))
                out.append(DataReceived(sid, ev.data, ev.stream_ended, len(ev.data)))
        if self.quic._close_event is not None and not self.closed:  # H3 protocol error closed QUIC
            self.closed = True
            reason = self.quic._close_event.reason_phrase
            out.append(ProtocolFailure("http3.protocol_error", f"HTTP/3 error: {reason}", close=True))
        return out

    def _on_request(self, sid: int, ev: H3HeadersReceived) -> Event | None:
        headers = Headers(ev.headers)
        if self._goaway_id is not None and sid >= self._goaway_id:
            # RFC 9114 section 5.2: beyond our GOAWAY; the client may retry it on a new connection.
            code = int(ErrorCode.H3_REQUEST_REJECTED)
            for stop in (self.quic.reset_stream, self.quic.stop_stream):
                try:
                    stop(sid, code)
                except ValueError:
                    pass
            if not ev.stream_ended:
                self._refused.add(sid)
            return None
        self.last_stream_id = max(self.last_stream_id, sid)
        if len(headers) > self._max_headers_count or headers.byte_size() > self._max_header_bytes:
            self._refuse(sid, 431, b"request headers too large\n", ev.stream_ended)
            return ProtocolFailure("downstream_rq_431", "request headers too large", close=False, status=431)
        early = sid in self.quic.early_streams
        if early and (headers.get(b":method") or b"") not in IDEMPOTENT_METHODS:
            # RFC 8470 section 5.2: 425 asks the client to retry after the handshake.
            self._refuse(sid, 425, b"request sent in 0-RTT early data is not idempotent\n", ev.stream_ended)
            return ProtocolFailure(
                "downstream_rq_too_early", "non-idempotent request in 0-RTT", close=False, status=425
            )
        self._requests.add(sid)
        if ev.stream_ended:
            self._request_done.add(sid)
        return HeadersReceived(sid, headers, ev.stream_ended, early_data=early)

    def _refuse(self, sid: int, status: int, body: bytes, request_ended: bool) -> None:
        assert self._h3 is not None
        if not request_ended:
            self._refused.add(sid)
        self._h3.send_headers(
            sid,
            [(b":status", str(status).encode()), (b"content-length", str(len(body)).encode())],
        )
        self._h3.send_data(sid, body, end_stream=True)
        # We will not read the rest of the request (RFC 9114 section 4.1.1).
        try:
            self.quic.stop_stream(sid, int(ErrorCode.H3_NO_ERROR))
        except ValueError:
            pass

    def _forget(self, sid: int) -> None:
        self._requests.discard(sid)
        self._refused.discard(sid)
        self._request_done.discard(sid)
        self.quic.release(sid)

    def _response_done(self, sid: int) -> None:
        """Our response ended. If the request is still arriving, ignore the rest (RFC 9114 4.1.1)."""
        if sid in self._requests and sid not in self._request_done:
            self._requests.discard(sid)
            self._refused.add(sid)
            self.quic.release(sid)
            try:
                self.quic.stop_stream(sid, int(ErrorCode.H3_NO_ERROR))
            except ValueError:
                pass
        else:
            self._forget(sid)

    # ----------------------------------------------------------------------------------- output
    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        if self._h3 is None:
            return
        items = [(k, v) for k, v in headers if k not in CONNECTION_SPECIFIC]
        try:
            self._h3.send_headers(stream_id, items, end_stream=end_stream)
        except Exception:
            return
        if end_stream:
            self._response_done(stream_id)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> int:
        """Queue ``data``; QUIC buffers it (the front bounds that with ``send_buffered``)."""
        if self._h3 is None:
            return len(data)
        try:
            self._h3.send_data(stream_id, data, end_stream=end_stream)
        except Exception:
            return len(data)
        if end_stream:
            self._response_done(stream_id)
        return len(data)

    def send_trailers(self, stream_id: int, trailers: Headers) -> None:
        self.send_headers(stream_id, trailers, end_stream=True)

    def send_buffered(self, stream_id: int) -> int:
        """Bytes queued on the stream and not yet acknowledged by the peer."""
        stream = self.quic._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def reset_stream(self, stream_id: int, error_code: int = int(ErrorCode.H3_REQUEST_CANCELLED)) -> None:
        try:
            self.quic.reset_stream(stream_id, error_code)
        except ValueError:
            pass
        try:
            self.quic.stop_stream(stream_id, error_code)
        except ValueError:
            pass
        self._response_done(stream_id)

    def acknowledge(self, stream_id: int, n: int) -> None:
        self.quic.consumed(stream_id, n)

    def goaway(self, graceful: bool = True) -> None:
        """Send GOAWAY on our control stream (RFC 9114 section 5.2); aioquic has no sender for it."""
        h3 = self._h3
        if h3 is None or h3._local_control_stream_id is None:
            return
        # Client-initiated bidirectional ids are multiples of 4; allow everything received so far. A later
        # GOAWAY never carries a larger id than an earlier one.
        goaway_id = self.last_stream_id + 4 if self._requests or self.last_stream_id else 0
        if self._goaway_id is not None:
            goaway_id = min(goaway_id, self._goaway_id)
        self._goaway_id = goaway_id
        frame = encode_frame(FrameType.GOAWAY, encode_uint_var(self._goaway_id))
        self.quic.send_stream_data(h3._local_control_stream_id, frame)

    def open_streams(self) -> int:
        return len(self._requests)

    @property
    def wants_close(self) -> bool:
        return self.closed
