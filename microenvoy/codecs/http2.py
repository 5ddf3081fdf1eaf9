"""HTTP/2 server codec: the h2 state machine underneath, neutral exchange events on top.

Theory of operation: one ``Http2ServerCodec`` per downstream connection (h2c prior knowledge or TLS+ALPN
``h2``). h2 validates frames and header blocks (RFC 9113 section 8.2); a connection error becomes a GOAWAY
carrying h2's error code (PROTOCOL_ERROR, FRAME_SIZE_ERROR, FLOW_CONTROL_ERROR, ... section 5.4.1) and a
``ProtocolFailure``; stream errors are RST_STREAMs that h2 emits itself.

Flow control is end to end: received DATA is only credited back (WINDOW_UPDATE) when the front calls
``acknowledge(stream_id, n)`` after the bytes left the agent, so a slow upstream stalls the client at its
window instead of growing our buffers. Sending obeys the peer's windows: ``send_data`` returns how many bytes
it could send now and the front waits for ``WindowOpened`` for the rest.

Header limits: the HPACK decoder accepts up to twice the configured limit so that an oversized request still
decodes, and the request is then answered 431 on its stream (the connection survives), as HTTP/1.1 does.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hyperframe.frame import GoAwayFrame

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

__all__ = ["Http2ServerCodec"]


_ERROR_STATS = {
    h2.errors.ErrorCodes.PROTOCOL_ERROR: "protocol_error",
    h2.errors.ErrorCodes.FRAME_SIZE_ERROR: "frame_size_error",
    h2.errors.ErrorCodes.FLOW_CONTROL_ERROR: "flow_control_error",
    h2.errors.ErrorCodes.COMPRESSION_ERROR: "compression_error",
    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: "enhance_your_calm",
}


class Http2ServerCodec:
    """Sans-IO HTTP/2 server side of one connection."""

    protocol = "HTTP/2"

    def __init__(
        self,
        *,
        tls: bool = False,
        max_concurrent_streams: int = 100,
        initial_stream_window_size: int = 65535,
        initial_connection_window_size: int = 1048576,
        max_header_bytes: int = 60 * 1024,
        max_headers_count: int = 100,
    ) -> None:
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._conn = h2.connection.H2Connection(config=config)
        self._scheme = b"https" if tls else b"http"
        self._max_header_bytes = max_header_bytes
        self._max_headers_count = max_headers_count
        self._conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_stream_window_size,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_bytes,
            },
        )
        # Decode oversized blocks so they can be answered 431 instead of killing the connection.
        self._conn.decoder.max_header_list_size = 2 * max_header_bytes + 4096
        self._conn.initiate_connection()
        if initial_connection_window_size > 65535:
            self._conn.increment_flow_control_window(initial_connection_window_size - 65535)
        self._extra_out: list[bytes] = []
        self._goaway_last: int | None = None
        self.closed = False
        self.last_stream_id = 0

    def __repr__(self) -> str:
        return f"<Http2ServerCodec streams={len(self._conn.streams)} closed={self.closed}>"

    # ------------------------------------------------------------------------------------ input
    def receive_data(self, data: bytes) -> list[Event]:
        if self.closed:
            return []
        if not data:
            self.closed = True
            return [ConnectionTerminated(reason="eof")]
        try:
            h2_events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            h2_code = getattr(exc, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR)
            code = h2_code
            cause = exc.__cause__
            if isinstance(cause, HPACKError) and not isinstance(cause, OversizedHeaderListError):
                code = h2.errors.ErrorCodes.COMPRESSION_ERROR  # RFC 9113 section 4.3
            # h2 has already queued its own GOAWAY (with h2_code); replace it when the code differs.
            pending = self._conn.data_to_send()
            h2_goaway = pending[-17:-14] == b"\x00\x00\x08" and pending[-14:-13] == b"\x07"
            if not h2_goaway or code != h2_code:
                if h2_goaway:
                    pending = pending[:-17]
                frame = GoAwayFrame(stream_id=0, last_stream_id=self.last_stream_id, error_code=int(code))
                frame.additional_data = str(exc)[:200].encode("utf-8", "replace")
                pending += frame.serialize()
            self._extra_out.append(pending)
            self.closed = True
            stat = _ERROR_STATS.get(code, "protocol_error")
            return [ProtocolFailure(f"http2.{stat}", f"HTTP/2 {code.name}: {exc}", close=True)]
        events: list[Event] = []
        for ev in h2_events:
            if isinstance(ev, h2.events.RequestReceived):
                out = self._on_request(ev)
                if out is not None:
                    events.append(out)
            elif isinstance(ev, h2.events.DataReceived):
                events.append(
                    DataReceived(
                        ev.stream_id,
                        ev.data,
                        ev.stream_ended is not None,
                        ev.flow_controlled_length,
                    )
                )
            elif isinstance(ev, h2.events.TrailersReceived):
                events.append(TrailersReceived(ev.stream_id, Headers(ev.headers)))
            elif isinstance(ev, h2.events.StreamReset):
                events.append(StreamReset(ev.stream_id, int(ev.error_code), "remote_reset"))
            elif isinstance(ev, h2.events.WindowUpdated):
                events.append(WindowOpened(ev.stream_id or None))
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                    events.append(WindowOpened(None))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.closed = True
                events.append(ConnectionTerminated(int(ev.error_code or 0), "goaway", ev.last_stream_id))
        return events

    def _on_request(self, ev: h2.events.RequestReceived) -> Event | None:
        sid = ev.stream_id
        assert sid is not None
        if self._goaway_last is not None and sid > self._goaway_last:
            self.reset_stream(sid, int(h2.errors.ErrorCodes.REFUSED_STREAM))
            return None
        self.last_stream_id = max(self.last_stream_id, sid)
        raw = ev.headers or []
        headers = Headers(raw)
        if len(raw) > self._max_headers_count or headers.byte_size() > self._max_header_bytes:
            self._conn.send_headers(sid, [(b":status", b"431"), (b"content-length", b"0")], end_stream=True)
            return ProtocolFailure("downstream_rq_431", "request headers too large", close=False, status=431)
        if b":authority" not in headers:
            host = headers.get(b"host")
            if host is not None:  # RFC 9113 section 8.3.1: Host stands in for :authority
                headers.set(b":authority", host)
        return HeadersReceived(sid, headers, ev.stream_ended is not None)

    # ----------------------------------------------------------------------------------- output
    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        items = [(k, v) for k, v in headers if k not in CONNECTION_SPECIFIC]
        try:
            self._conn.send_headers(stream_id, items, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> int:
        """Send as much of ``data`` as the windows allow; returns the bytes taken.

        ``end_stream`` is only applied when everything was sent.
        """
        conn = self._conn
        try:
            window = conn.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return len(data)  # the stream is gone: drop silently, the front notices the reset
        n = min(window, len(data))
        frame = conn.max_outbound_frame_size
        sent = 0
        try:
            while sent < n:
                chunk = data[sent : sent + min(frame, n - sent)]
                sent += len(chunk)
                conn.send_data(stream_id, chunk, end_stream=end_stream and sent == len(data))
            if end_stream and not data:
                conn.end_stream(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return len(data)
        return sent

    def send_trailers(self, stream_id: int, trailers: Headers) -> None:
        self.send_headers(stream_id, trailers, end_stream=True)

    def reset_stream(
        self, stream_id: int, error_code: int = int(h2.errors.ErrorCodes.INTERNAL_ERROR)
    ) -> None:
        try:
            self._conn.reset_stream(stream_id, error_code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def acknowledge(self, stream_id: int, n: int) -> None:
        """Credit ``n`` flow-controlled bytes back to the peer (they left the agent)."""
        if n:
            try:
                self._conn.acknowledge_received_data(n, stream_id)
            except (h2.exceptions.ProtocolError, ValueError):
                pass

    def goaway(self, graceful: bool = True) -> None:
        """Drain: GOAWAY NO_ERROR naming the last stream we will process (RFC 9113 section 6.8).

        The frame is written directly: h2's ``close_connection`` would move its state machine to CLOSED and
        refuse the responses of the streams that are still open, which a graceful drain must finish. Streams
        the client opens after this are refused (REFUSED_STREAM, safe to retry elsewhere).
        """
        if self._goaway_last is not None:
            return
        self._goaway_last = self.last_stream_id
        frame = GoAwayFrame(stream_id=0, last_stream_id=self.last_stream_id, error_code=0)
        self._extra_out.append(self._conn.data_to_send() + frame.serialize())

    def data_to_send(self) -> bytes:
        if self._extra_out:
            out = b"".join(self._extra_out) + self._conn.data_to_send()
            self._extra_out.clear()
            return out
        return self._conn.data_to_send()

    def open_streams(self) -> int:
        return self._conn.open_inbound_streams

    @property
    def wants_close(self) -> bool:
        return self.closed
