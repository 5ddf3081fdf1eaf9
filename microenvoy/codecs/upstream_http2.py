"""HTTP/2 client codec for upstream connections (h2), speaking the neutral exchange events.

Theory of operation: one ``Http2ClientCodec`` wraps one ``h2.connection.H2Connection`` in client mode with
header encoding off (bytes in, bytes out) and inbound header validation on. ``initiate()`` queues the
connection preface and our SETTINGS (RFC 9113 section 3.4), built from the cluster's ``Http2Options``; the I/O
layer writes ``data_to_send()`` after every call and feeds received bytes to ``receive_data``.

Streams: ``can_open_stream`` honours the peer's SETTINGS_MAX_CONCURRENT_STREAMS (section 5.1.2: "Endpoints
MUST NOT exceed the limit set by their peer") and refuses once a GOAWAY arrived or stream ids ran out, so the
pool opens another connection. ``send_data`` sends at most the peer's flow-control window (section 6.9) and
returns how much it took; the caller waits for ``WindowOpened`` to send the rest.

Receive flow control is manual: every ``DataReceived`` carries ``flow_controlled_length``; WINDOW_UPDATE
frames are only queued when the consumer calls ``acknowledge(stream_id, n)``, so a slow reader stops the
upstream after one window of data (end-to-end backpressure, bounded memory).

GOAWAY (section 6.8): streams with ids above ``last_stream_id`` "were not or will not be processed" and are
reported as ``StreamReset`` with reason ``refused_stream`` (safe to retry); streams at or below it may still
complete. h2 moves its state machine to CLOSED on GOAWAY and would reject their remaining frames (even later
frames of the same read), so the codec wraps h2's GOAWAY handler to put it back to CLIENT_OPEN (keeping the
output h2 would discard) and refuses new streams itself.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from microenvoy.codecs.hpack_lite import LiteralEncoder
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

NO_ERROR = int(h2.errors.ErrorCodes.NO_ERROR)
CANCEL = int(h2.errors.ErrorCodes.CANCEL)
REFUSED_STREAM = int(h2.errors.ErrorCodes.REFUSED_STREAM)
_MAX_STREAM_ID = 2**31 - 1

# RFC 9113 section 8.2.2: connection-specific fields MUST NOT appear; "te" only with "trailers".
_PSEUDO_ORDER = (b":method", b":scheme", b":authority", b":path")


class Http2ClientCodec:
    """One upstream HTTP/2 connection (client side)."""

    __slots__ = (
        "_conn",
        "_connection_window",
        "_open",
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
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_inbound_headers=True,
            # Outbound fields come from validated downstream input and validated config, and
            # _request_fields() enforces the HTTP/2 rules that matter here; h2's generic per-field checks
            # and normalisation were a tenth of the agent's CPU per request (docs/benchmarks.md).
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._conn = h2.connection.H2Connection(config=config)
        # Static table + raw literals only (see hpack_lite): the cheapest valid HPACK for a LAN hop.
        self._conn.encoder = LiteralEncoder()  # type: ignore[assignment]
        self._conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: options.max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: options.initial_stream_window_size,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
            },
        )
        # h2 moves to CLOSED on GOAWAY (and drops queued output), rejecting the frames of the streams the
        # peer still finishes, even later in the same read. Wrap its GOAWAY handler to stay open for them.
        table = self._conn._frame_dispatch_table
        original = table[hyperframe.frame.GoAwayFrame]

        def _goaway(frame: hyperframe.frame.GoAwayFrame) -> Any:
            pending = bytes(self._conn._data_to_send)
            result = original(frame)
            self._conn._data_to_send[:0] = pending
            if not self.closed:
                self._conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
            return result

        table[hyperframe.frame.GoAwayFrame] = _goaway
        self._connection_window = options.initial_connection_window_size
        self.default_scheme = default_scheme
        """``:scheme`` when a request lacks one (``https`` over TLS)."""
        self.closed = False
        self.goaway_received = False
        self.last_stream_id: int | None = None
        """From the peer's GOAWAY."""
        self.settings_received = False
        """The peer's first SETTINGS frame arrived (its limits are known)."""
        self.streams_opened = 0
        self._open: set[int] = set()

    # -- state ----------------------------------------------------------------------------------
    @property
    def peer_max_concurrent_streams(self) -> int:
        return int(self._conn.remote_settings.max_concurrent_streams)

    @property
    def active_streams(self) -> int:
        """Streams we opened that are not finished on our side of the bookkeeping."""
        return len(self._open)

    @property
    def can_open_stream(self) -> bool:
        return (
            not self.closed
            and not self.goaway_received
            and len(self._open) < self.peer_max_concurrent_streams
            and self._conn.highest_outbound_stream_id + 2 <= _MAX_STREAM_ID
        )

    def stream_finished(self, stream_id: int) -> None:
        """The I/O layer is done with a stream (complete or reset); frees its concurrency slot."""
        self._open.discard(stream_id)

    # -- sending --------------------------------------------------------------------------------
    def initiate(self) -> None:
        """Queue the connection preface, our SETTINGS and the connection window increase."""
        self._conn.initiate_connection()
        extra = self._connection_window - 65535
        if extra > 0:
            self._conn.increment_flow_control_window(extra)

    def send_headers(self, headers: Headers, end_stream: bool) -> int:
        """Open a stream with ``headers``; returns its id. Raises ``CodecError`` when not allowed."""
        if not self.can_open_stream:
            raise CodecError("no stream capacity on this HTTP/2 connection", stat="upstream_cx_no_capacity")
        stream_id = self._conn.get_next_available_stream_id()
        try:
            self._conn.send_headers(stream_id, self._request_fields(headers), end_stream=end_stream)
        except (h2.exceptions.ProtocolError, ValueError, TypeError) as e:
            raise CodecError(f"cannot send request headers: {e}", "upstream_rq_local_protocol_error") from e
        self._open.add(stream_id)
        self.streams_opened += 1
        return stream_id

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
        fields.extend((k, v) for k, v in pseudo.items() if k not in _PSEUDO_ORDER)
        fields.extend(regular)
        return fields

    def send_window(self, stream_id: int) -> int:
        """Bytes the peer lets us send on ``stream_id`` now (min of stream and connection windows)."""
        try:
            return max(0, self._conn.local_flow_control_window(stream_id))
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            return 0

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> int:
        """Send as much of ``data`` as the windows allow; END_STREAM only if all of it went.

        Returns the number of bytes taken. ``data == b""`` with ``end_stream`` just ends the stream.
        """
        try:
            window = max(0, self._conn.local_flow_control_window(stream_id))
        except h2.exceptions.ProtocolError as e:  # StreamClosedError / NoSuchStreamError
            raise CodecError(f"stream {stream_id} is closed", "upstream_rq_stream_closed") from e
        take = min(len(data), window)
        max_frame = self._conn.max_outbound_frame_size
        sent = 0
        try:
            while sent < take:
                n = min(max_frame, take - sent)
                last = end_stream and sent + n == len(data)
                self._conn.send_data(stream_id, data[sent : sent + n], end_stream=last)
                sent += n
            if end_stream and not data:
                self._conn.end_stream(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError) as e:
            raise CodecError(f"stream {stream_id} is closed", "upstream_rq_stream_closed") from e
        except h2.exceptions.ProtocolError as e:
            raise CodecError(f"cannot send data: {e}", "upstream_rq_local_protocol_error") from e
        return sent

    def send_trailers(self, stream_id: int, trailers: Headers) -> None:
        fields = [(k, v) for k, v in trailers if not k.startswith(b":") and k not in CONNECTION_SPECIFIC]
        try:
            self._conn.send_headers(stream_id, fields, end_stream=True)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError) as e:
            raise CodecError(f"stream {stream_id} is closed", "upstream_rq_stream_closed") from e
        except (h2.exceptions.ProtocolError, ValueError, TypeError) as e:
            raise CodecError(f"cannot send trailers: {e}", "upstream_rq_local_protocol_error") from e

    def reset_stream(self, stream_id: int, error_code: int = CANCEL) -> None:
        """RST_STREAM (idempotent; a stream already closed is left alone)."""
        self._open.discard(stream_id)
        if self.closed:
            return
        try:
            self._conn.reset_stream(stream_id, error_code)
        except h2.exceptions.ProtocolError:  # includes StreamClosedError / NoSuchStreamError
            pass

    def acknowledge(self, stream_id: int, n: int) -> None:
        """The consumer took ``n`` flow-controlled bytes of ``stream_id``: hand the window back."""
        if n <= 0 or self.closed:
            return
        try:
            self._conn.acknowledge_received_data(n, stream_id)
        except h2.exceptions.ProtocolError:
            pass

    def ping(self, opaque: bytes = b"\0" * 8) -> None:
        self._conn.ping(opaque)

    def close(self, error_code: int = NO_ERROR) -> None:
        """Queue GOAWAY; the connection accepts nothing more."""
        if not self.closed:
            self.closed = True
            try:
                self._conn.close_connection(error_code)
            except h2.exceptions.ProtocolError:
                pass

    def data_to_send(self) -> bytes:
        return self._conn.data_to_send()

    # -- receiving ------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the upstream; returns neutral events."""
        if self.closed and not self.goaway_received:
            return []
        try:
            h2_events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            code = int(getattr(e, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR))
            self.close(code)
            failed: list[Event] = [StreamReset(sid, code, "protocol_error") for sid in sorted(self._open)]
            self._open.clear()
            failed.append(ProtocolFailure("upstream_cx_protocol_error", f"HTTP/2 protocol error: {e}"))
            return failed
        out: list[Event] = []
        for ev in h2_events:
            self._translate(ev, out)
        return out

    def _translate(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            sid = ev.stream_id
            out.append(HeadersReceived(sid, Headers(_pairs(ev.headers)), ev.stream_ended is not None))
            if ev.stream_ended is not None:
                self._open.discard(sid)
        elif isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id
            ended = ev.stream_ended is not None
            out.append(DataReceived(sid, bytes(ev.data or b""), ended, ev.flow_controlled_length or 0))
            if ended:
                self._open.discard(sid)
        elif isinstance(ev, h2.events.TrailersReceived):
            out.append(TrailersReceived(ev.stream_id, Headers(_pairs(ev.headers))))
            self._open.discard(ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            sid = ev.stream_id
            if not _already_ended(out, sid):
                out.append(DataReceived(sid, b"", True, 0))
            self._open.discard(sid)
        elif isinstance(ev, h2.events.StreamReset):
            code = int(ev.error_code) if ev.error_code is not None else 0
            if code == REFUSED_STREAM:
                reason = "refused_stream"
            elif ev.remote_reset:
                reason = "remote_reset"
            else:
                reason = "protocol_error"
            out.append(StreamReset(ev.stream_id, code, reason))
            self._open.discard(ev.stream_id)
        elif isinstance(ev, h2.events.WindowUpdated):
            out.append(WindowOpened(ev.stream_id or None))
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.settings_received = True
            out.append(WindowOpened(None))  # initial window or concurrency may have grown
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._on_goaway(ev, out)
        # PingReceived/PingAckReceived/SettingsAcknowledged/Priority/AltSvc/Unknown: nothing to do.

    def _on_goaway(self, ev: h2.events.ConnectionTerminated, out: list[Event]) -> None:
        self.goaway_received = True
        last = ev.last_stream_id if ev.last_stream_id is not None else 0
        self.last_stream_id = last
        code = int(ev.error_code) if ev.error_code is not None else 0
        for sid in sorted(self._open):
            if sid > last:
                out.append(StreamReset(sid, REFUSED_STREAM, "refused_stream"))
                self._open.discard(sid)
        reason = (ev.additional_data or b"").decode("utf-8", "replace")
        out.append(ConnectionTerminated(code, reason or "goaway", last))

    def __repr__(self) -> str:
        return (
            f"<Http2ClientCodec open={len(self._open)}/{self.peer_max_concurrent_streams}"
            f" opened={self.streams_opened}{' goaway' if self.goaway_received else ''}"
            f"{' closed' if self.closed else ''}>"
        )


def _pairs(headers: object) -> list[tuple[bytes, bytes]]:
    return [(bytes(k), bytes(v)) for k, v in headers]  # type: ignore[attr-defined]


def _already_ended(out: list[Event], sid: int) -> bool:
    for e in reversed(out):
        if isinstance(e, HeadersReceived | DataReceived) and e.stream_id == sid:
            return e.end_stream
        if isinstance(e, TrailersReceived) and e.stream_id == sid:
            return True
    return False
