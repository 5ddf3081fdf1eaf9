"""The HTTP/2 upstream client codec against an in-memory h2 server, byte by byte where it matters."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microenvoy.codecs.upstream_http2 import CANCEL, REFUSED_STREAM, Http2ClientCodec
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
from microenvoy.core.headers import Headers


class Peer:
    """An h2 server in memory wired to a client codec."""

    def __init__(self, codec: Http2ClientCodec, *, max_streams: int | None = None, window: int | None = None):
        self.codec = codec
        self.server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        initial: dict[int, int] = {}
        if max_streams is not None:
            initial[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = max_streams
        if window is not None:
            initial[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = window
        self.server.local_settings = h2.settings.Settings(client=False, initial_values=initial)
        self.server.initiate_connection()
        self.server_events: list[h2.events.Event] = []
        codec.initiate()

    def to_server(self) -> list[h2.events.Event]:
        evs = self.server.receive_data(self.codec.data_to_send())
        self.server_events.extend(evs)
        return evs

    def to_client(self, bytewise: bool = False) -> list[Event]:
        data = self.server.data_to_send()
        if not bytewise:
            return self.codec.receive_data(data)
        out: list[Event] = []
        for i in range(len(data)):
            out.extend(self.codec.receive_data(data[i : i + 1]))
        return out

    def handshake(self) -> None:
        self.to_server()
        self.to_client()
        self.to_server()


def req(path: bytes = b"/", *extra: tuple[bytes, bytes]) -> Headers:
    return Headers(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", path), *extra]
    )


def test_preface_settings_from_options() -> None:
    codec = Http2ClientCodec(
        Http2Options(
            max_concurrent_streams=7, initial_stream_window_size=1000, initial_connection_window_size=200000
        )
    )
    p = Peer(codec)
    evs = p.to_server()
    changed = next(e for e in evs if isinstance(e, h2.events.RemoteSettingsChanged))
    assert changed.changed_settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE].new_value == 1000
    assert changed.changed_settings[h2.settings.SettingCodes.ENABLE_PUSH].new_value == 0
    assert changed.changed_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 7
    assert p.server.outbound_flow_control_window == 200000
    assert not codec.settings_received
    events = p.to_client()
    assert codec.settings_received
    assert any(isinstance(e, WindowOpened) for e in events)


def test_request_response_with_trailers_bytewise_and_header_translation() -> None:
    codec = Http2ClientCodec()
    p = Peer(codec)
    p.handshake()
    sid = codec.send_headers(
        Headers(
            [
                (b":method", b"POST"),
                (b":path", b"/svc/M"),
                (b"host", b"example"),
                (b"connection", b"x"),
                (b"te", b"trailers"),
                (b"transfer-encoding", b"chunked"),
                (b"content-type", b"application/grpc"),
            ]
        ),
        end_stream=False,
    )
    assert sid == 1
    assert codec.send_data(sid, b"hello", end_stream=True) == 5
    evs = p.to_server()
    rr = next(e for e in evs if isinstance(e, h2.events.RequestReceived))
    hdrs = list(rr.headers)
    assert hdrs[:4] == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"example"),
        (b":path", b"/svc/M"),
    ]
    names = [k for k, _ in hdrs]
    assert b"connection" not in names
    assert b"transfer-encoding" not in names
    assert (b"te", b"trailers") in hdrs
    assert b"host" not in names
    p.server.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    p.server.send_data(1, b"world")
    p.server.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    events = p.to_client(bytewise=True)
    kinds = [type(e).__name__ for e in events if not isinstance(e, WindowOpened)]
    assert kinds == ["HeadersReceived", "DataReceived", "TrailersReceived"]
    data = next(e for e in events if isinstance(e, DataReceived))
    assert data.data == b"world"
    assert data.flow_controlled_length == 5
    trailers = next(e for e in events if isinstance(e, TrailersReceived))
    assert trailers.trailers.get(b"grpc-status") == b"0"
    assert codec.active_streams == 0


def test_headers_only_response_and_separate_end_stream() -> None:
    codec = Http2ClientCodec()
    p = Peer(codec)
    p.handshake()
    codec.send_headers(req(), end_stream=True)
    codec.send_headers(req(), end_stream=True)
    p.to_server()
    p.server.send_headers(1, [(b":status", b"204")], end_stream=True)
    p.server.send_headers(3, [(b":status", b"200")])
    p.server.send_data(3, b"x")
    p.server.end_stream(3)
    events = [e for e in p.to_client() if not isinstance(e, WindowOpened)]
    assert isinstance(events[0], HeadersReceived)
    assert events[0].end_stream
    ends = [e for e in events if isinstance(e, DataReceived) and e.end_stream]
    assert len(ends) == 1
    assert ends[0].stream_id == 3


def test_informational_response_skipped() -> None:
    codec = Http2ClientCodec()
    p = Peer(codec)
    p.handshake()
    codec.send_headers(req(), end_stream=True)
    p.to_server()
    p.server.send_headers(1, [(b":status", b"100")])
    p.server.send_headers(1, [(b":status", b"200")], end_stream=True)
    heads = [e for e in p.to_client() if isinstance(e, HeadersReceived)]
    assert [h.headers.get(b":status") for h in heads] == [b"200"]


def test_max_concurrent_streams_honoured() -> None:
    codec = Http2ClientCodec()
    p = Peer(codec, max_streams=2)
    p.handshake()
    assert codec.peer_max_concurrent_streams == 2
    codec.send_headers(req(), end_stream=True)
    codec.send_headers(req(), end_stream=True)
    assert not codec.can_open_stream
    with pytest.raises(CodecError, match="capacity"):
        codec.send_headers(req(), end_stream=True)
    p.to_server()
    p.server.send_headers(1, [(b":status", b"200")], end_stream=True)
    p.to_client()
    assert codec.can_open_stream
    assert codec.send_headers(req(), end_stream=True) == 5


def test_send_flow_control_partial_and_resume() -> None:
    codec = Http2ClientCodec()
    p = Peer(codec, window=10)
    p.handshake()
    sid = codec.send_headers(req(), end_stream=False)
    assert codec.send_window(sid) == 10
    assert codec.send_data(sid, b"0123456789abcdef", end_stream=True) == 10
    assert codec.send_window(sid) == 0
    p.to_server()
    p.server.increment_flow_control_window(100, stream_id=sid)
    opened = [e for e in p.to_client() if isinstance(e, WindowOpened)]
    assert opened
    assert opened[0].stream_id == sid
    assert codec.send_data(sid, b"abcdef", end_stream=True) == 6
    evs = p.to_server()
    assert any(isinstance(e, h2.events.StreamEnded) for e in evs)
    received = b"".join(e.data for e in p.server_events if isinstance(e, h2.events.DataReceived))
    assert received == b"0123456789abcdef"


def test_send_large_body_is_split_into_frames() -> None:
    codec = Http2ClientCodec()
    p = Peer(codec)
    p.handshake()
    sid = codec.send_headers(req(), end_stream=False)
    assert codec.send_data(sid, b"z" * 40000, end_stream=False) == 40000
    frames = [e for e in p.to_server() if isinstance(e, h2.events.DataReceived)]
    assert len(frames) >= 3  # 16384-byte default max frame size


def test_receive_flow_control_is_manual() -> None:
    codec = Http2ClientCodec(
        Http2Options(initial_stream_window_size=100, initial_connection_window_size=65535)
    )
    p = Peer(codec)
    p.handshake()
    sid = codec.send_headers(req(), end_stream=True)
    p.to_server()
    p.server.send_headers(sid, [(b":status", b"200")])
    p.server.send_data(sid, b"a" * 100)
    p.to_client()
    assert p.server.local_flow_control_window(sid) == 0
    p.to_server()
    assert p.server.local_flow_control_window(sid) == 0  # nothing acknowledged yet: no WINDOW_UPDATE
    codec.acknowledge(sid, 100)
    p.to_server()
    assert p.server.local_flow_control_window(sid) == 100


def test_refused_stream_and_remote_reset() -> None:
    codec = Http2ClientCodec()
    p = Peer(codec)
    p.handshake()
    codec.send_headers(req(), end_stream=True)
    codec.send_headers(req(), end_stream=True)
    p.to_server()
    p.server.reset_stream(1, h2.errors.ErrorCodes.REFUSED_STREAM)
    p.server.reset_stream(3, h2.errors.ErrorCodes.INTERNAL_ERROR)
    resets = [e for e in p.to_client() if isinstance(e, StreamReset)]
    assert [(r.stream_id, r.reason) for r in resets] == [(1, "refused_stream"), (3, "remote_reset")]
    assert resets[0].error_code == REFUSED_STREAM
    assert codec.active_streams == 0


def test_goaway_refuses_later_streams_and_lets_earlier_ones_finish() -> None:
    codec = Http2ClientCodec()
    p = Peer(codec)
    p.handshake()
    for _ in range(3):
        codec.send_headers(req(), end_stream=True)
    p.to_server()
    p.server.send_headers(1, [(b":status", b"200")])
    p.server.close_connection(last_stream_id=1)
    events = p.to_client()
    resets = [e for e in events if isinstance(e, StreamReset)]
    assert sorted(r.stream_id for r in resets) == [3, 5]
    assert all(r.reason == "refused_stream" for r in resets)
    term = next(e for e in events if isinstance(e, ConnectionTerminated))
    assert term.last_stream_id == 1
    assert codec.goaway_received
    assert not codec.can_open_stream
    # stream 1 still completes although GOAWAY arrived (raw frames: the h2 server refuses to send now)
    from hyperframe.frame import DataFrame

    f = DataFrame(1)
    f.data = b"late"
    f.flags.add("END_STREAM")
    late = codec.receive_data(f.serialize())
    assert [(type(e).__name__, getattr(e, "data", None)) for e in late] == [("DataReceived", b"late")]
    assert "goaway" in repr(codec)


def test_reset_stream_is_idempotent_and_sends_cancel() -> None:
    codec = Http2ClientCodec()
    p = Peer(codec)
    p.handshake()
    sid = codec.send_headers(req(), end_stream=False)
    codec.reset_stream(sid)
    codec.reset_stream(sid)
    resets = [e for e in p.to_server() if isinstance(e, h2.events.StreamReset)]
    assert len(resets) == 1
    assert resets[0].error_code == CANCEL
    with pytest.raises(CodecError):
        codec.send_data(sid, b"x", end_stream=False)


def test_protocol_error_gives_failure_goaway_and_fails_streams() -> None:
    codec = Http2ClientCodec()
    p = Peer(codec)
    p.handshake()
    codec.send_headers(req(), end_stream=True)
    codec.data_to_send()
    # DATA on stream 0 is a connection error (RFC 9113 6.1)
    events = codec.receive_data(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    assert isinstance(events[-1], ProtocolFailure)
    assert any(isinstance(e, StreamReset) and e.stream_id == 1 for e in events)
    assert codec.closed
    goaway = [
        e
        for e in p.server.receive_data(codec.data_to_send())
        if isinstance(e, h2.events.ConnectionTerminated)
    ]
    assert goaway
    assert goaway[0].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert codec.receive_data(b"anything") == []


def test_invalid_response_headers_are_rejected() -> None:
    codec = Http2ClientCodec()
    p = Peer(codec)
    p.handshake()
    codec.send_headers(req(), end_stream=True)
    p.to_server()
    p.server.config.validate_outbound_headers = False
    p.server.config.normalize_outbound_headers = False
    p.server.send_headers(1, [(b":status", b"200"), (b"Upper-Case", b"x")], end_stream=True)
    events = p.to_client()
    assert any(isinstance(e, ProtocolFailure | StreamReset) for e in events)
    assert not any(isinstance(e, HeadersReceived) for e in events)


def test_bad_request_headers_raise_codec_error() -> None:
    codec = Http2ClientCodec()
    p = Peer(codec)
    p.handshake()
    with pytest.raises(CodecError):
        codec.send_headers(req(b"/", (b":weird", b"x")), end_stream=True)


def test_close_sends_goaway() -> None:
    codec = Http2ClientCodec()
    p = Peer(codec)
    p.handshake()
    codec.close()
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in p.to_server())
    assert not codec.can_open_stream


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    codec = Http2ClientCodec()
    p = Peer(codec)
    p.handshake()
    codec.send_headers(req(), end_stream=True)
    codec.receive_data(data)
