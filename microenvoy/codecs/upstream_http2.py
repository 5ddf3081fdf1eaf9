"""HTTP/2 client codec for upstream connections, speaking the neutral exchange events.

Theory of operation: a small, purpose-built HTTP/2 client (RFC 9113) for the agent's upstream hop. It was
written instead of wrapping the ``h2`` library because that library's generic state machine was a third of
the agent's CPU per proxied request (docs/benchmarks.md); this codec does only what a client needs and keeps
every check the RFC requires of one. Header blocks are encoded with the static table and raw literals and
decoded by a lean HPACK decoder (both in ``microenvoy.codecs.hpack_lite``).

``initiate()`` queues the connection preface and our SETTINGS (section 3.4; ENABLE_PUSH 0, our concurrency,
initial window and header list size) and raises the connection window to the configured size. The I/O layer
writes ``data_to_send()`` after every call and feeds received bytes to ``receive_data``.

Streams: ``can_open_stream`` honours the peer's SETTINGS_MAX_CONCURRENT_STREAMS (section 5.1.2) and refuses
once a GOAWAY arrived or stream ids ran out. ``send_data`` sends at most the peer's windows (section 6.9) and
returns how much it took; the caller waits for ``WindowOpened`` for the rest.

Receive flow control is manual: every ``DataReceived`` carries ``flow_controlled_length``; WINDOW_UPDATE
frames are only sent when the consumer calls ``acknowledge(stream_id, n)`` (batched to half a window), so a
slow reader stops the upstream after one window (end-to-end backpressure, bounded memory).

Errors: a connection error (section 5.4.1) sends GOAWAY with its code, fails every open stream and returns a
``ProtocolFailure``; a malformed response (section 8.1.1: bad ``:status``, connection-specific or upper-case
fields, content-length not matching the body, HEADERS without END_STREAM after the final response) is a
stream error: RST_STREAM PROTOCOL_ERROR and a ``StreamReset``.

GOAWAY (section 6.8): streams above ``last_stream_id`` were not processed and are reported as ``StreamReset``
with reason ``refused_stream`` (safe to retry); streams at or below it still complete.
"""

from __future__ import annotations

import struct

from microenvoy.codecs.hpack_lite import HpackError, LiteDecoder, LiteralEncoder
from microenvoy.config.model import Http2Options
from microenvoy.core.errors import CodecError
from microenvoy.core.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    HeadersReceived,
    ProtocolFailure,
    StreamReset,
    TrailersReceived,
    WindowOpened,
)
from microenvoy.core.headers import CONNECTION_SPECIFIC, Headers

__all__ = ["CANCEL", "NO_ERROR", "REFUSED_STREAM", "Http2ClientCodec"]

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9

_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS, _PUSH, _PING, _GOAWAY, _WINDOW, _CONT = range(10)
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_MAX_STREAM_ID = 2**31 - 1
_MAX_WINDOW = 2**31 - 1
_DEFAULT_FRAME = 16384
_HEAD = struct.Struct(">HBBBL")  # 24-bit length as (high 16, low 8), type, flags, stream id
_PSEUDO_ORDER = (b":method", b":scheme", b":authority", b":path")
_BAD_VALUE = (b"\r", b"\n", b"\x00")


class _ConnError(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class _Stream:
    __slots__ = ("content_length", "final", "local_ended", "received", "recv_unacked", "remote_ended",
                 "send_window")  # fmt: skip

    def __init__(self, send_window: int) -> None:
        self.send_window = send_window
        self.recv_unacked = 0
        self.final = False
        """The final (non-1xx) response headers arrived."""
        self.local_ended = False
        self.remote_ended = False
        self.content_length: int | None = None
        self.received = 0


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HEAD.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


class Http2ClientCodec:
    """One upstream HTTP/2 connection (client side)."""

    __slots__ = (
        "_block",
        "_buf",
        "_conn_recv_unacked",
        "_conn_send_window",
        "_connection_window",
        "_decoder",
        "_encoder",
        "_local_window",
        "_max_concurrent",
        "_max_header_list",
        "_next_sid",
        "_open",
        "_out",
        "_peer_frame",
        "_peer_max_concurrent",
        "_peer_window",
        "_streams",
        "closed",
        "default_scheme",
        "goaway_received",
        "last_stream_id",
        "settings_received",
        "streams_opened",
    )

    def __init__(
        self,
        options: Http2Options | None = None,
        *,
        default_scheme: bytes = b"http",
        max_header_list_size: int = 65536,
    ) -> None:
        options = options or Http2Options()
        self._out = bytearray()
        self._buf = bytearray()
        self._block: tuple[int, int, bytearray] | None = None
        """A header block waiting for CONTINUATION frames: (stream, HEADERS flags, fragment)."""
        self._encoder = LiteralEncoder()
        self._decoder = LiteDecoder(max_header_list_size=max_header_list_size)
        self._max_header_list = max_header_list_size
        self._max_concurrent = options.max_concurrent_streams
        self._local_window = options.initial_stream_window_size
        self._connection_window = options.initial_connection_window_size
        self._conn_recv_unacked = 0
        self._conn_send_window = 65535
        self._peer_window = 65535
        self._peer_frame = _DEFAULT_FRAME
        self._peer_max_concurrent = 100  # until the peer's SETTINGS (RFC: unlimited; be modest)
        self._streams: dict[int, _Stream] = {}
        self._next_sid = 1
        self._open: set[int] = set()
        self.default_scheme = default_scheme
        """``:scheme`` when a request lacks one (``https`` over TLS)."""
        self.closed = False
        self.goaway_received = False
        self.last_stream_id: int | None = None
        """From the peer's GOAWAY."""
        self.settings_received = False
        """The peer's first SETTINGS frame arrived (its limits are known)."""
        self.streams_opened = 0

    # -- state ----------------------------------------------------------------------------------
    @property
    def peer_max_concurrent_streams(self) -> int:
        return self._peer_max_concurrent

    @property
    def active_streams(self) -> int:
        """Streams we opened that are not finished on our side of the bookkeeping."""
        return len(self._open)

    @property
    def can_open_stream(self) -> bool:
        return (
            not self.closed
            and not self.goaway_received
            and len(self._open) < self._peer_max_concurrent
            and self._next_sid <= _MAX_STREAM_ID
        )

    def stream_finished(self, stream_id: int) -> None:
        """The I/O layer is done with a stream (complete or reset); frees its concurrency slot."""
        self._open.discard(stream_id)

    # -- sending --------------------------------------------------------------------------------
    def initiate(self) -> None:
        """Queue the connection preface, our SETTINGS and the connection window increase."""
        settings = struct.pack(
            ">HLHLHLHL",
            0x2, 0,  # ENABLE_PUSH
            0x3, self._max_concurrent,  # MAX_CONCURRENT_STREAMS
            0x4, self._local_window,  # INITIAL_WINDOW_SIZE
            0x6, self._max_header_list,  # MAX_HEADER_LIST_SIZE
        )  # fmt: skip
        self._out += _PREFACE + _frame(_SETTINGS, 0, 0, settings)
        extra = self._connection_window - 65535
        if extra > 0:
            self._out += _frame(_WINDOW, 0, 0, struct.pack(">L", extra))

    def send_headers(self, headers: Headers, end_stream: bool) -> int:
        """Open a stream with ``headers``; returns its id. Raises ``CodecError`` when not allowed."""
        if not self.can_open_stream:
            raise CodecError("no stream capacity on this HTTP/2 connection", stat="upstream_cx_no_capacity")
        fields = self._request_fields(headers)
        sid = self._next_sid
        self._next_sid += 2
        self._write_block(sid, self._encoder.encode(fields), end_stream)
        stream = _Stream(self._peer_window)
        stream.local_ended = end_stream
        self._streams[sid] = stream
        self._open.add(sid)
        self.streams_opened += 1
        return sid

    def _write_block(self, sid: int, block: bytes, end_stream: bool) -> None:
        flags = _END_STREAM if end_stream else 0
        limit = self._peer_frame
        if len(block) <= limit:
            self._out += _frame(_HEADERS, flags | _END_HEADERS, sid, block)
            return
        self._out += _frame(_HEADERS, flags, sid, block[:limit])
        pos = limit
        while pos < len(block):
            chunk = block[pos : pos + limit]
            pos += limit
            self._out += _frame(_CONT, _END_HEADERS if pos >= len(block) else 0, sid, chunk)

    def _request_fields(self, headers: Headers) -> list[tuple[bytes, bytes]]:
        pseudo: dict[bytes, bytes] = {}
        regular: list[tuple[bytes, bytes]] = []
        host: bytes | None = None
        for name, value in headers:
            if name.startswith(b":"):
                if name not in _PSEUDO_ORDER:  # RFC 9113 section 8.3: no other request pseudo-headers
                    raise CodecError(
                        f"unknown request pseudo-header {name!r}", "upstream_rq_local_protocol_error"
                    )
                pseudo.setdefault(name, value)
            elif name == b"host":
                host = host or value
            elif name in CONNECTION_SPECIFIC:
                continue
            elif name == b"te" and value.strip().lower() != b"trailers":
                continue
            else:
                regular.append((name, value))
        if b":authority" not in pseudo and host is not None:
            pseudo[b":authority"] = host
        pseudo.setdefault(b":scheme", self.default_scheme)
        pseudo.setdefault(b":method", b"GET")
        if pseudo[b":method"] != b"CONNECT":
            pseudo.setdefault(b":path", b"/")
        fields = [(k, pseudo[k]) for k in _PSEUDO_ORDER if k in pseudo]
        fields.extend(regular)
        return fields

    def _sendable(self, stream_id: int) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None or s.local_ended or self.closed:
            raise CodecError(f"stream {stream_id} is closed", "upstream_rq_stream_closed")
        return s

    def send_window(self, stream_id: int) -> int:
        """Bytes the peer lets us send on ``stream_id`` now (min of stream and connection windows)."""
        s = self._streams.get(stream_id)
        if s is None or s.local_ended:
            return 0
        return max(0, min(s.send_window, self._conn_send_window))

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> int:
        """Send as much of ``data`` as the windows allow; END_STREAM only if all of it went.

        Returns the number of bytes taken. ``data == b""`` with ``end_stream`` just ends the stream.
        """
        s = self._sendable(stream_id)
        take = min(len(data), max(0, min(s.send_window, self._conn_send_window)))
        limit = self._peer_frame
        sent = 0
        while sent < take:
            n = min(limit, take - sent)
            last = end_stream and sent + n == len(data)
            self._out += _frame(_DATA, _END_STREAM if last else 0, stream_id, data[sent : sent + n])
            sent += n
        if end_stream and not data:
            self._out += _frame(_DATA, _END_STREAM, stream_id)
        s.send_window -= sent
        self._conn_send_window -= sent
        if end_stream and sent == len(data):
            self._local_end(stream_id, s)
        return sent

    def send_trailers(self, stream_id: int, trailers: Headers) -> None:
        s = self._sendable(stream_id)
        fields = [(k, v) for k, v in trailers if not k.startswith(b":") and k not in CONNECTION_SPECIFIC]
        self._write_block(stream_id, self._encoder.encode(fields), True)
        self._local_end(stream_id, s)

    def _local_end(self, sid: int, s: _Stream) -> None:
        s.local_ended = True
        if s.remote_ended:
            del self._streams[sid]

    def reset_stream(self, stream_id: int, error_code: int = CANCEL) -> None:
        """RST_STREAM (idempotent; a stream already closed is left alone)."""
        self._open.discard(stream_id)
        if self.closed:
            return
        s = self._streams.pop(stream_id, None)
        if s is None:
            return
        self._out += _frame(_RST, 0, stream_id, struct.pack(">L", error_code))
        if s.recv_unacked:  # unread data still holds connection window
            self._credit_connection(s.recv_unacked)

    def acknowledge(self, stream_id: int, n: int) -> None:
        """The consumer took ``n`` flow-controlled bytes of ``stream_id``: hand the window back."""
        if n <= 0 or self.closed:
            return
        s = self._streams.get(stream_id)
        if s is not None and not s.remote_ended:
            s.recv_unacked += n
            if s.recv_unacked >= self._local_window // 2:
                self._out += _frame(_WINDOW, 0, stream_id, struct.pack(">L", s.recv_unacked))
                s.recv_unacked = 0
        self._credit_connection(n)

    def _credit_connection(self, n: int) -> None:
        self._conn_recv_unacked += n
        if self._conn_recv_unacked >= self._connection_window // 2:
            self._out += _frame(_WINDOW, 0, 0, struct.pack(">L", self._conn_recv_unacked))
            self._conn_recv_unacked = 0

    def ping(self, opaque: bytes = b"\0" * 8) -> None:
        self._out += _frame(_PING, 0, 0, opaque[:8].ljust(8, b"\0"))

    def close(self, error_code: int = NO_ERROR, detail: bytes = b"") -> None:
        """Queue GOAWAY; the connection accepts nothing more."""
        if not self.closed:
            self.closed = True
            self._out += _frame(_GOAWAY, 0, 0, struct.pack(">LL", 0, error_code) + detail[:200])

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- receiving ------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the upstream; returns neutral events."""
        if self.closed and not self.goaway_received:
            return []
        buf = self._buf
        buf += data
        out: list[Event] = []
        pos = 0
        try:
            while len(buf) - pos >= 9:
                hi, lo, ftype, flags, sid = _HEAD.unpack_from(buf, pos)
                length = (hi << 8) | lo
                sid &= _MAX_STREAM_ID
                if length > _DEFAULT_FRAME:
                    raise _ConnError(
                        FRAME_SIZE_ERROR, f"frame of {length} bytes over our SETTINGS_MAX_FRAME_SIZE"
                    )
                if len(buf) - pos - 9 < length:
                    break
                payload = bytes(buf[pos + 9 : pos + 9 + length])
                pos += 9 + length
                self._frame_received(ftype, flags, sid, payload, out)
        except _ConnError as e:
            del buf[:]
            return self._connection_error(e, out)
        except HpackError as e:
            del buf[:]
            return self._connection_error(_ConnError(COMPRESSION_ERROR, f"header block: {e}"), out)
        del buf[:pos]
        return out

    def _connection_error(self, e: _ConnError, out: list[Event]) -> list[Event]:
        self.close(e.code, str(e).encode("utf-8", "replace"))
        for sid in sorted(self._open):
            out.append(StreamReset(sid, e.code, "protocol_error"))
        self._open.clear()
        self._streams.clear()
        out.append(ProtocolFailure("upstream_cx_protocol_error", f"HTTP/2 protocol error: {e}"))
        return out

    def _frame_received(self, ftype: int, flags: int, sid: int, payload: bytes, out: list[Event]) -> None:
        if self._block is not None and ftype != _CONT:
            raise _ConnError(PROTOCOL_ERROR, "header block interrupted by another frame")
        if ftype == _DATA:
            self._on_data(flags, sid, payload, out)
        elif ftype == _HEADERS:
            if sid == 0 or sid % 2 == 0:
                raise _ConnError(PROTOCOL_ERROR, f"HEADERS on stream {sid}")
            fragment = payload
            if flags & _PADDED:
                fragment = self._unpad(fragment)
            if flags & _PRIORITY_FLAG:
                if len(fragment) < 5:
                    raise _ConnError(FRAME_SIZE_ERROR, "HEADERS priority fields truncated")
                fragment = fragment[5:]
            if flags & _END_HEADERS:
                self._on_headers(sid, flags, fragment, out)
            else:
                self._block = (sid, flags, bytearray(fragment))
        elif ftype == _CONT:
            block = self._block
            if block is None or block[0] != sid:
                raise _ConnError(PROTOCOL_ERROR, "unexpected CONTINUATION")
            block[2].extend(payload)
            if len(block[2]) > 2 * self._max_header_list + 4096:
                raise _ConnError(PROTOCOL_ERROR, "header block too large")
            if flags & _END_HEADERS:
                self._block = None
                self._on_headers(sid, block[1], bytes(block[2]), out)
        elif ftype == _SETTINGS:
            self._on_settings(flags, sid, payload, out)
        elif ftype == _WINDOW:
            self._on_window_update(sid, payload, out)
        elif ftype == _RST:
            self._on_rst(sid, payload, out)
        elif ftype == _PING:
            if sid != 0 or len(payload) != 8:
                raise _ConnError(FRAME_SIZE_ERROR if sid == 0 else PROTOCOL_ERROR, "bad PING")
            if not flags & _ACK:
                self._out += _frame(_PING, _ACK, 0, payload)
        elif ftype == _GOAWAY:
            if sid != 0 or len(payload) < 8:
                raise _ConnError(PROTOCOL_ERROR, "bad GOAWAY")
            last, code = struct.unpack_from(">LL", payload)
            self._on_goaway(last & _MAX_STREAM_ID, code, payload[8:], out)
        elif ftype == _PRIORITY:
            if sid == 0:
                raise _ConnError(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self._stream_error(sid, FRAME_SIZE_ERROR, out)
        elif ftype == _PUSH:
            raise _ConnError(PROTOCOL_ERROR, "PUSH_PROMISE although SETTINGS_ENABLE_PUSH is 0")
        # Unknown frame types are ignored (section 5.5).

    @staticmethod
    def _unpad(payload: bytes) -> bytes:
        if not payload:
            raise _ConnError(FRAME_SIZE_ERROR, "padded frame without a pad length")
        pad = payload[0]
        if pad >= len(payload):
            raise _ConnError(PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - pad]

    def _known(self, sid: int) -> _Stream | None:
        """The stream, or None if it is closed; raises for a stream that was never opened."""
        s = self._streams.get(sid)
        if s is None and sid >= self._next_sid:
            raise _ConnError(PROTOCOL_ERROR, f"frame on idle stream {sid}")
        return s

    def _on_data(self, flags: int, sid: int, payload: bytes, out: list[Event]) -> None:
        if sid == 0:
            raise _ConnError(PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        data = self._unpad(payload) if flags & _PADDED else payload
        s = self._known(sid)
        if s is None or s.remote_ended:
            # Closed (we reset it, or it already ended): give the connection credit straight back.
            self._credit_connection(flow)
            if s is not None:
                self._stream_error(sid, STREAM_CLOSED, out)
            return
        if not s.final:
            self._stream_error(sid, PROTOCOL_ERROR, out)
            self._credit_connection(flow)
            return
        s.received += len(data)
        end = bool(flags & _END_STREAM)
        if s.content_length is not None and (
            s.received > s.content_length or (end and s.received != s.content_length)
        ):
            self._stream_error(sid, PROTOCOL_ERROR, out)
            self._credit_connection(flow)
            return
        out.append(DataReceived(sid, data, end, flow))
        if end:
            self._remote_end(sid, s)

    def _on_headers(self, sid: int, flags: int, block: bytes, out: list[Event]) -> None:
        # Always decoded, even for a stream we dropped: the HPACK state must advance.
        fields = self._decoder.decode(block)
        s = self._known(sid)
        if s is None:
            return
        end = bool(flags & _END_STREAM)
        if s.remote_ended:
            self._stream_error(sid, STREAM_CLOSED, out)
            return
        if s.final:  # trailers
            if not end or any(k.startswith(b":") for k, _ in fields) or not _valid_fields(fields):
                self._stream_error(sid, PROTOCOL_ERROR, out)
                return
            out.append(TrailersReceived(sid, Headers(fields)))
            self._remote_end(sid, s)
            return
        status = _response_status(fields)
        if status is None:
            self._stream_error(sid, PROTOCOL_ERROR, out)
            return
        if status < 200:  # informational (100 Continue, 103 Early Hints): not forwarded
            if end:
                self._stream_error(sid, PROTOCOL_ERROR, out)
            return
        s.final = True
        for k, v in fields:
            if k == b"content-length":
                try:
                    s.content_length = int(v)
                except ValueError:
                    self._stream_error(sid, PROTOCOL_ERROR, out)
                    return
        if end and s.content_length not in (None, 0) and status not in (204, 304):
            self._stream_error(sid, PROTOCOL_ERROR, out)
            return
        out.append(HeadersReceived(sid, Headers(fields), end))
        if end:
            self._remote_end(sid, s)

    def _remote_end(self, sid: int, s: _Stream) -> None:
        s.remote_ended = True
        self._open.discard(sid)
        if s.local_ended:
            del self._streams[sid]

    def _stream_error(self, sid: int, code: int, out: list[Event]) -> None:
        """A stream error: RST_STREAM with ``code`` and a ``StreamReset`` for the caller."""
        s = self._streams.pop(sid, None)
        self._open.discard(sid)
        self._out += _frame(_RST, 0, sid, struct.pack(">L", code))
        if s is not None:
            if s.recv_unacked:
                self._credit_connection(s.recv_unacked)
            out.append(StreamReset(sid, code, "protocol_error"))

    def _on_settings(self, flags: int, sid: int, payload: bytes, out: list[Event]) -> None:
        if sid != 0:
            raise _ConnError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & _ACK:
            if payload:
                raise _ConnError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnError(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        for i in range(0, len(payload), 6):
            ident, value = struct.unpack_from(">HL", payload, i)
            if ident == 0x1:
                self._encoder.header_table_size = value
            elif ident == 0x2:
                if value > 1:
                    raise _ConnError(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH must be 0 or 1")
            elif ident == 0x3:
                self._peer_max_concurrent = value
            elif ident == 0x4:
                if value > _MAX_WINDOW:
                    raise _ConnError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1")
                delta = value - self._peer_window
                self._peer_window = value
                for st in self._streams.values():
                    st.send_window += delta
            elif ident == 0x5:
                if not _DEFAULT_FRAME <= value <= 2**24 - 1:
                    raise _ConnError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self._peer_frame = value
        self._out += _frame(_SETTINGS, _ACK, 0)
        self.settings_received = True
        out.append(WindowOpened(None))  # initial window or concurrency may have grown

    def _on_window_update(self, sid: int, payload: bytes, out: list[Event]) -> None:
        if len(payload) != 4:
            raise _ConnError(FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        inc = struct.unpack(">L", payload)[0] & _MAX_WINDOW
        if sid == 0:
            if inc == 0:
                raise _ConnError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._conn_send_window += inc
            if self._conn_send_window > _MAX_WINDOW:
                raise _ConnError(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            out.append(WindowOpened(None))
            return
        s = self._known(sid)
        if s is None:
            return
        if inc == 0:
            self._stream_error(sid, PROTOCOL_ERROR, out)
            return
        s.send_window += inc
        if s.send_window > _MAX_WINDOW:
            self._stream_error(sid, FLOW_CONTROL_ERROR, out)
            return
        out.append(WindowOpened(sid))

    def _on_rst(self, sid: int, payload: bytes, out: list[Event]) -> None:
        if sid == 0:
            raise _ConnError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ConnError(FRAME_SIZE_ERROR, "RST_STREAM length")
        s = self._known(sid)
        if s is None:
            return
        code = struct.unpack(">L", payload)[0]
        del self._streams[sid]
        self._open.discard(sid)
        if s.recv_unacked:
            self._credit_connection(s.recv_unacked)
        out.append(StreamReset(sid, code, "refused_stream" if code == REFUSED_STREAM else "remote_reset"))

    def _on_goaway(self, last: int, code: int, debug: bytes, out: list[Event]) -> None:
        self.goaway_received = True
        self.last_stream_id = last
        for sid in sorted(self._open):
            if sid > last:
                out.append(StreamReset(sid, REFUSED_STREAM, "refused_stream"))
                self._open.discard(sid)
                self._streams.pop(sid, None)
        out.append(ConnectionTerminated(code, debug.decode("utf-8", "replace") or "goaway", last))

    def __repr__(self) -> str:
        return (
            f"<Http2ClientCodec open={len(self._open)}/{self._peer_max_concurrent}"
            f" opened={self.streams_opened}{' goaway' if self.goaway_received else ''}"
            f"{' closed' if self.closed else ''}>"
        )


def _response_status(fields: list[tuple[bytes, bytes]]) -> int | None:
    """``:status`` of a well-formed response header block (section 8.3.2), else None."""
    status: int | None = None
    regular = False
    for k, v in fields:
        if k.startswith(b":"):
            if k != b":status" or status is not None or regular or len(v) != 3 or not v.isdigit():
                return None
            status = int(v)
        else:
            regular = True
    if status is None or not _valid_fields(fields):
        return None
    return status


_VALID: set[tuple[bytes, bytes]] = set()
"""Fields already checked (upstreams repeat the same few): a set lookup instead of the checks."""


def _valid_fields(fields: list[tuple[bytes, bytes]]) -> bool:
    """Section 8.2: lower-case names, no connection-specific fields, no CR/LF/NUL in values."""
    valid = _VALID
    for field in fields:
        if field in valid:
            continue
        k, v = field
        if k in CONNECTION_SPECIFIC or (k == b"te" and v != b"trailers") or k != k.lower() or not k:
            return False
        for bad in _BAD_VALUE:
            if bad in v:
                return False
        if len(valid) >= 1024:
            valid.clear()
        valid.add(field)
    return True
