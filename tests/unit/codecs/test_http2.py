"""The HTTP/2 server codec against an in-memory h2 client: requests with bodies and trailers, end-to-end flow
control in both directions, header limits, connection errors as GOAWAY frames (parsed with hyperframe), drain,
and hypothesis: arbitrary bytes after a valid preface only ever yield events."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame, WindowUpdateFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microenvoy.codecs.http2 import Http2ServerCodec
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

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQ = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"/up")]
GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"/")]

# ----------------------------------------------------------------------------------------- helpers


def parse_frames(data: bytes) -> list[Frame]:
    out: list[Frame] = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        out.append(frame)
        view = view[9 + length :]
    return out


def goaways(data: bytes) -> list[GoAwayFrame]:
    return [f for f in parse_frames(data) if isinstance(f, GoAwayFrame)]


def new_client(initial_window: int | None = None) -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    if initial_window is not None:
        c.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window}
        )
    c.initiate_connection()
    return c


def pair(client_window: int | None = None, **kw: int) -> tuple[Http2ServerCodec, h2.connection.H2Connection]:
    """A server codec and an h2 client with the SETTINGS exchange done (both sides ACKed)."""
    server = Http2ServerCodec(**kw)
    client = new_client(client_window)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    assert server.data_to_send() == b""
    return server, client


def to_server(server: Http2ServerCodec, client: h2.connection.H2Connection) -> list[Event]:
    return server.receive_data(client.data_to_send())


def to_client(server: Http2ServerCodec, client: h2.connection.H2Connection) -> list[h2.events.Event]:
    data = server.data_to_send()
    return client.receive_data(data) if data else []


def to_server_bytewise(server: Http2ServerCodec, data: bytes) -> list[Event]:
    out: list[Event] = []
    for i in range(len(data)):
        out.extend(server.receive_data(data[i : i + 1]))
    return out


def body(events: list[Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


# ------------------------------------------------------------------------------------------ requests


def test_request_with_body_and_trailers() -> None:
    server, client = pair()
    client.send_headers(1, [*REQ, (b"content-type", b"application/grpc"), (b"te", b"trailers")])
    client.send_data(1, b"hello ")
    client.send_data(1, b"world")
    client.send_headers(1, [(b"grpc-timeout", b"1S"), (b"x-sum", b"42")], end_stream=True)
    evs = to_server(server, client)
    head = evs[0]
    assert isinstance(head, HeadersReceived)
    assert head.stream_id == 1
    assert not head.end_stream
    assert list(head.headers)[:4] == REQ
    assert head.headers.get(b"te") == b"trailers"
    assert evs[1:] == [
        DataReceived(1, b"hello ", False, 6),
        DataReceived(1, b"world", False, 5),
        TrailersReceived(1, Headers([(b"grpc-timeout", b"1S"), (b"x-sum", b"42")])),
    ]
    assert server.open_streams() == 1
    assert server.last_stream_id == 1


def test_request_byte_by_byte_gives_the_same_events() -> None:
    client = new_client()
    client.send_headers(1, REQ)
    client.send_data(1, b"abc", end_stream=True)
    client.send_headers(3, GET, end_stream=True)
    wire = client.data_to_send()
    whole = Http2ServerCodec().receive_data(wire)
    bytewise = to_server_bytewise(Http2ServerCodec(), wire)
    assert bytewise == whole
    assert [type(e) for e in whole if not isinstance(e, WindowOpened)] == [
        HeadersReceived,
        DataReceived,
        HeadersReceived,
    ]
    assert DataReceived(1, b"abc", True, 3) in whole


def test_host_stands_in_for_missing_authority() -> None:
    server, client = pair()
    client.send_headers(
        1, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"h.example")], True
    )
    head = to_server(server, client)[0]
    assert isinstance(head, HeadersReceived)
    assert head.end_stream
    assert head.headers.get(b":authority") == b"h.example"


def test_padding_counts_as_flow_controlled() -> None:
    server, client = pair()
    client.send_headers(1, REQ)
    client.send_data(1, b"abc", end_stream=True, pad_length=10)
    data = [e for e in to_server(server, client) if isinstance(e, DataReceived)]
    assert data == [DataReceived(1, b"abc", True, 14)]  # 3 bytes + 10 padding + 1 pad-length octet


def test_response_headers_data_trailers_reach_the_client() -> None:
    server, client = pair()
    client.send_headers(1, GET, end_stream=True)
    to_server(server, client)
    server.send_headers(
        1,
        Headers(
            [
                (b":status", b"200"),
                (b"content-type", b"text/plain"),
                (b"connection", b"keep-alive"),  # connection-specific: must not reach HTTP/2
                (b"transfer-encoding", b"chunked"),
            ]
        ),
        False,
    )
    assert server.send_data(1, b"payload", False) == 7
    server.send_trailers(1, Headers([(b"grpc-status", b"0")]))
    evs = to_client(server, client)
    resp = [e for e in evs if isinstance(e, h2.events.ResponseReceived)]
    assert resp[0].headers == [(b":status", b"200"), (b"content-type", b"text/plain")]
    assert b"".join(e.data for e in evs if isinstance(e, h2.events.DataReceived)) == b"payload"
    trailers = [e for e in evs if isinstance(e, h2.events.TrailersReceived)]
    assert trailers[0].headers == [(b"grpc-status", b"0")]
    assert any(isinstance(e, h2.events.StreamEnded) for e in evs)


def test_send_data_with_end_stream_and_empty_body() -> None:
    server, client = pair()
    client.send_headers(1, GET, end_stream=True)
    to_server(server, client)
    server.send_headers(1, Headers([(b":status", b"204")]), False)
    assert server.send_data(1, b"", True) == 0
    evs = to_client(server, client)
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 1 for e in evs)


def test_client_reset_becomes_stream_reset() -> None:
    server, client = pair()
    client.send_headers(1, REQ)
    to_server(server, client)
    client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    evs = to_server(server, client)
    assert evs == [StreamReset(1, int(h2.errors.ErrorCodes.CANCEL), "remote_reset")]
    # Sending on the reset stream is swallowed, not raised.
    assert server.send_data(1, b"late", True) == 4
    server.send_headers(1, Headers([(b":status", b"200")]), True)
    server.reset_stream(1)


def test_client_goaway_becomes_connection_terminated() -> None:
    server, client = pair()
    client.send_headers(1, GET, end_stream=True)
    client.close_connection(last_stream_id=0)
    evs = to_server(server, client)
    assert isinstance(evs[-1], ConnectionTerminated)
    assert evs[-1].error_code == 0
    assert server.wants_close


def test_eof_is_connection_terminated() -> None:
    server, _ = pair()
    assert server.receive_data(b"") == [ConnectionTerminated(reason="eof")]
    assert server.receive_data(b"more") == []


# ------------------------------------------------------------------------------------- flow control


def _window_updates(data: bytes) -> list[WindowUpdateFrame]:
    return [f for f in parse_frames(data) if isinstance(f, WindowUpdateFrame)]


def test_client_cannot_send_beyond_the_window_until_acknowledged() -> None:
    server, client = pair(initial_stream_window_size=1000)
    client.send_headers(1, REQ)
    assert client.local_flow_control_window(1) == 1000
    client.send_data(1, b"x" * 1000)
    assert client.local_flow_control_window(1) == 0
    evs = to_server(server, client)
    assert body(evs, 1) == b"x" * 1000
    # Received but not forwarded: no credit goes back, the client stays blocked.
    out = server.data_to_send()
    assert _window_updates(out) == []
    client.receive_data(out)
    assert client.local_flow_control_window(1) == 0
    with pytest.raises(h2.exceptions.FlowControlError):
        client.send_data(1, b"y")
    # The front forwarded 600 bytes upstream: exactly that much credit goes back.
    server.acknowledge(1, 600)
    out = server.data_to_send()
    stream_updates = [f for f in _window_updates(out) if f.stream_id == 1]
    assert [f.window_increment for f in stream_updates] == [600]
    client.receive_data(out)
    assert client.local_flow_control_window(1) == 600
    client.send_data(1, b"z" * 600, end_stream=True)
    evs = to_server(server, client)
    assert body(evs, 1) == b"z" * 600


def test_connection_window_only_reopens_on_acknowledge() -> None:
    # Small connection window (the RFC minimum 65535), large stream windows: the connection is the limit.
    server, client = pair(initial_stream_window_size=1 << 20, initial_connection_window_size=65535)
    sent = 0
    for sid in (1, 3, 5):
        client.send_headers(sid, REQ)
        n = min(client.local_flow_control_window(sid), 30000)
        for i in range(0, n, 10000):
            client.send_data(sid, b"d" * min(10000, n - i))
        sent += n
    assert sent == 65535
    assert client.outbound_flow_control_window == 0
    to_server(server, client)
    out = server.data_to_send()
    assert [f for f in _window_updates(out) if f.stream_id == 0] == []
    for sid in (1, 3, 5):
        server.acknowledge(sid, 30000 if sid != 5 else 5535)
    out = server.data_to_send()
    conn_credit = sum(f.window_increment for f in _window_updates(out) if f.stream_id == 0)
    assert conn_credit == 65535
    client.receive_data(out)
    assert client.outbound_flow_control_window == 65535


def test_acknowledge_is_harmless_on_closed_or_unknown_streams() -> None:
    server, client = pair()
    server.acknowledge(99, 10)
    server.acknowledge(1, 0)
    client.send_headers(1, REQ)
    client.send_data(1, b"abc", end_stream=True)
    to_server(server, client)
    server.send_headers(1, Headers([(b":status", b"200")]), True)
    server.acknowledge(1, 3)  # the stream is closed by now
    assert not server.wants_close


def test_send_data_is_partial_on_a_small_client_window_then_window_opened() -> None:
    server, client = pair(client_window=100)
    client.send_headers(1, GET, end_stream=True)
    to_server(server, client)
    server.send_headers(1, Headers([(b":status", b"200")]), False)
    payload = bytes(range(256)) * 2
    n = server.send_data(1, payload, True)
    assert n == 100
    evs = to_client(server, client)
    got = [e for e in evs if isinstance(e, h2.events.DataReceived)]
    assert b"".join(e.data for e in got) == payload[:100]
    assert not any(isinstance(e, h2.events.StreamEnded) for e in evs)  # end_stream held back
    assert server.send_data(1, payload[n:], True) == 0  # still no credit
    # The client consumes; its WINDOW_UPDATE reaches the codec as WindowOpened for that stream.
    client.acknowledge_received_data(100, 1)
    evs_s = to_server(server, client)
    assert WindowOpened(1) in evs_s
    m = server.send_data(1, payload[n:], True)
    assert m == 100
    to_client(server, client)
    client.increment_flow_control_window(1000, stream_id=1)
    assert WindowOpened(1) in to_server(server, client)
    rest = payload[n + m :]
    assert server.send_data(1, rest, True) == len(rest)
    evs = to_client(server, client)
    assert any(isinstance(e, h2.events.StreamEnded) for e in evs)


def test_send_data_splits_at_max_frame_size() -> None:
    server, client = pair(client_window=1 << 20)
    client.increment_flow_control_window(1 << 20)
    client.send_headers(1, GET, end_stream=True)
    to_server(server, client)
    server.send_headers(1, Headers([(b":status", b"200")]), False)
    assert server.send_data(1, b"q" * 40000, True) == 40000
    frames = [f for f in parse_frames(server.data_to_send()) if isinstance(f, DataFrame)]
    assert [len(f.data) for f in frames] == [16384, 16384, 40000 - 2 * 16384]
    assert "END_STREAM" in frames[-1].flags
    assert all("END_STREAM" not in f.flags for f in frames[:-1])


def test_settings_change_of_initial_window_opens_every_stream() -> None:
    server, client = pair(client_window=10)
    client.send_headers(1, GET, end_stream=True)
    to_server(server, client)
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    assert WindowOpened(None) in to_server(server, client)


# -------------------------------------------------------------------------------------- header limits


def test_oversized_headers_are_431_on_that_stream_and_the_connection_lives() -> None:
    server, client = pair(max_header_bytes=1024)
    client.send_headers(1, [*GET, (b"x-big", b"a" * 2000)], end_stream=True)
    evs = to_server(server, client)
    assert evs == [ProtocolFailure("downstream_rq_431", "request headers too large", close=False, status=431)]
    cevs = to_client(server, client)
    resp = [e for e in cevs if isinstance(e, h2.events.ResponseReceived)]
    assert resp[0].stream_id == 1
    assert resp[0].headers[0] == (b":status", b"431")
    assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in cevs)
    # The next request on the same connection is served normally.
    client.send_headers(3, GET, end_stream=True)
    evs = to_server(server, client)
    assert isinstance(evs[0], HeadersReceived)
    assert evs[0].stream_id == 3
    assert not server.wants_close


def test_too_many_headers_are_431() -> None:
    server, client = pair(max_headers_count=10)
    client.send_headers(1, [*GET, *((b"x-%d" % i, b"v") for i in range(10))], end_stream=True)
    evs = to_server(server, client)
    assert [type(e) for e in evs] == [ProtocolFailure]
    assert isinstance(evs[0], ProtocolFailure)
    assert evs[0].stat == "downstream_rq_431"
    assert not evs[0].close
    cevs = to_client(server, client)
    assert [e.headers[0] for e in cevs if isinstance(e, h2.events.ResponseReceived)] == [(b":status", b"431")]


def test_advertised_max_header_list_size() -> None:
    server = Http2ServerCodec(max_header_bytes=4096)
    client = new_client()
    server.receive_data(client.data_to_send())
    evs = client.receive_data(server.data_to_send())
    changed = next(e for e in evs if isinstance(e, h2.events.RemoteSettingsChanged)).changed_settings
    assert changed[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE].new_value == 4096


def test_hugely_oversized_headers_are_a_connection_error() -> None:
    """Beyond twice the limit the HPACK decoder stops: ENHANCE_YOUR_CALM, not a 64 KiB+ allocation."""
    server, client = pair(max_header_bytes=1024)
    client.send_headers(1, [*GET, (b"x-big", b"a" * 20000)], end_stream=True)
    evs = to_server(server, client)
    assert len(evs) == 1
    failure = evs[0]
    assert isinstance(failure, ProtocolFailure)
    assert failure.close
    assert failure.stat == "http2.enhance_your_calm"
    codes = {g.error_code for g in goaways(server.data_to_send())}
    assert codes == {int(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)}


# ----------------------------------------------------------------------------------- protocol errors


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


@pytest.mark.parametrize(
    ("wire", "code", "stat"),
    [
        (_frame(0x0, 0, 0, b"x"), h2.errors.ErrorCodes.PROTOCOL_ERROR, "http2.protocol_error"),
        (_frame(0x0, 0, 1, b"x" * 16385), h2.errors.ErrorCodes.FRAME_SIZE_ERROR, "http2.frame_size_error"),
        (_frame(0x4, 0, 0, b"\x00\x04\x00"), h2.errors.ErrorCodes.FRAME_SIZE_ERROR, "http2.frame_size_error"),
        (_frame(0x8, 0, 0, b"\x00\x00\x00\x00"), h2.errors.ErrorCodes.PROTOCOL_ERROR, "http2.protocol_error"),
        (_frame(0x0, 0, 7, b"x"), h2.errors.ErrorCodes.PROTOCOL_ERROR, "http2.protocol_error"),
        (_frame(0x1, 0x4, 2, b"\x82"), h2.errors.ErrorCodes.PROTOCOL_ERROR, "http2.protocol_error"),
        (
            _frame(0x4, 0, 0, b"\x00\x04\x80\x00\x00\x00"),
            h2.errors.ErrorCodes.FLOW_CONTROL_ERROR,
            "http2.flow_control_error",
        ),
    ],
    ids=[
        "data-on-stream-0",
        "frame-too-large",
        "bad-settings-length",
        "zero-window-update",
        "data-on-idle-stream",
        "even-stream-id",
        "initial-window-too-big",
    ],
)
def test_connection_errors_send_goaway_with_the_right_code(
    wire: bytes, code: h2.errors.ErrorCodes, stat: str
) -> None:
    server, _ = pair()
    evs = server.receive_data(wire)
    assert len(evs) == 1
    failure = evs[0]
    assert isinstance(failure, ProtocolFailure)
    assert failure.close
    assert failure.stat == stat
    assert code.name in failure.detail
    frames = goaways(server.data_to_send())
    assert frames, "no GOAWAY sent"
    assert {g.error_code for g in frames} == {int(code)}
    assert all(g.last_stream_id == 0 for g in frames)
    assert server.wants_close
    assert server.receive_data(_frame(0x0, 0, 1, b"x")) == []  # nothing is parsed after the error


def test_bad_hpack_is_goaway_compression_error() -> None:
    server, _ = pair()
    evs = server.receive_data(_frame(0x1, 0x5, 1, b"\xff\xff\xff\xff"))
    assert [type(e) for e in evs] == [ProtocolFailure]
    assert {g.error_code for g in goaways(server.data_to_send())} == {
        int(h2.errors.ErrorCodes.COMPRESSION_ERROR)
    }


def test_connection_error_sends_at_most_two_goaways() -> None:
    """h2 itself sends a GOAWAY when it raises; the codec adds one with the detail. Both agree."""
    server, _ = pair()
    server.receive_data(_frame(0x0, 0, 0, b"x"))
    frames = goaways(server.data_to_send())
    assert 1 <= len(frames) <= 2
    assert len({(g.error_code, g.last_stream_id) for g in frames}) == 1


def test_bad_preface_is_goaway_protocol_error() -> None:
    server = Http2ServerCodec()
    evs = server.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(evs) == 1
    assert isinstance(evs[0], ProtocolFailure)
    assert evs[0].stat == "http2.protocol_error"
    assert evs[0].close
    frames = goaways(server.data_to_send())
    assert frames
    assert {g.error_code for g in frames} == {int(h2.errors.ErrorCodes.PROTOCOL_ERROR)}


def test_flow_control_violation_is_goaway_flow_control_error() -> None:
    server, client = pair(initial_stream_window_size=100, initial_connection_window_size=65535)
    client.send_headers(1, REQ)
    to_server(server, client)
    # Hand-built DATA past the advertised window (the h2 client would refuse to send it).
    evs = server.receive_data(_frame(0x0, 0, 1, b"x" * 16384) * 5)
    failures = [e for e in evs if isinstance(e, ProtocolFailure)]
    assert len(failures) == 1
    assert failures[0].close
    codes = {g.error_code for g in goaways(server.data_to_send())}
    assert codes == {int(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)}


def test_goaway_after_streams_names_the_last_stream() -> None:
    server, client = pair()
    client.send_headers(1, GET, end_stream=True)
    client.send_headers(3, GET, end_stream=True)
    to_server(server, client)
    server.receive_data(_frame(0x0, 0, 0, b"x"))
    frames = goaways(server.data_to_send())
    assert {g.last_stream_id for g in frames} == {3}


def test_goaway_for_drain_is_no_error_with_last_stream_id() -> None:
    server, client = pair()
    client.send_headers(1, GET, end_stream=True)
    client.send_headers(5, GET, end_stream=True)
    to_server(server, client)
    server.goaway()
    frames = goaways(server.data_to_send())
    assert len(frames) == 1
    assert frames[0].error_code == int(h2.errors.ErrorCodes.NO_ERROR)
    assert frames[0].last_stream_id == 5
    assert not server.wants_close


def test_streams_in_flight_finish_after_a_drain_goaway() -> None:
    server, client = pair()
    client.send_headers(1, REQ)
    client.send_headers(5, GET, end_stream=True)
    to_server(server, client)
    server.goaway()
    assert [(g.error_code, g.last_stream_id) for g in goaways(server.data_to_send())] == [(0, 5)]
    # The request body of stream 1 is still arriving (h2's own client stops sending once it *reads* a
    # GOAWAY, real clients finish the streams below last_stream_id; so the GOAWAY is not delivered here)...
    client.send_data(1, b"rest", end_stream=True)
    evs = to_server(server, client)
    assert evs == [DataReceived(1, b"rest", True, 4)]
    # ...a stream opened after the GOAWAY is refused...
    client.send_headers(7, GET, end_stream=True)
    assert to_server(server, client) == []
    # ...and both in-flight responses go out.
    server.send_headers(5, Headers([(b":status", b"200")]), True)
    server.send_headers(1, Headers([(b":status", b"201")]), True)
    frames = parse_frames(server.data_to_send())
    ended = {f.stream_id for f in frames if isinstance(f, HeadersFrame) and "END_STREAM" in f.flags}
    assert ended == {1, 5}
    assert [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)] == [(7, 7)]


def test_goaway_before_any_stream_names_stream_zero() -> None:
    server, _ = pair()
    server.goaway()
    frames = goaways(server.data_to_send())
    assert [(g.error_code, g.last_stream_id) for g in frames] == [(0, 0)]


def test_repr_is_one_line() -> None:
    server, _ = pair()
    assert repr(server) == "<Http2ServerCodec streams=0 closed=False>"


# ------------------------------------------------------------------------------------- hypothesis

_EVENT_TYPES = (
    HeadersReceived,
    DataReceived,
    TrailersReceived,
    StreamReset,
    WindowOpened,
    ProtocolFailure,
    ConnectionTerminated,
)


def _valid_fragments() -> list[bytes]:
    c = new_client()
    c.data_to_send()
    c.send_headers(1, REQ)
    c.send_data(1, b"abc")
    c.send_headers(1, [(b"x-t", b"1")], end_stream=True)
    c.send_headers(3, GET, end_stream=True)
    c.reset_stream(3)
    c.ping(b"12345678")
    c.increment_flow_control_window(10)
    return [c.data_to_send()]


_FRAGMENTS = _valid_fragments()
_frame_st = st.builds(
    _frame,
    st.integers(0, 12),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF]),
    st.binary(max_size=40),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(st.one_of(st.binary(max_size=60), _frame_st, st.sampled_from(_FRAGMENTS)), max_size=10),
    bytewise=st.booleans(),
    ack=st.booleans(),
)
def test_arbitrary_bytes_after_preface_only_yield_events(
    chunks: list[bytes], bytewise: bool, ack: bool
) -> None:
    server = Http2ServerCodec(max_header_bytes=512, max_headers_count=8)
    events: list[Event] = list(server.receive_data(PREFACE + _frame(0x4, 0, 0, b"")))
    for chunk in chunks:
        new = to_server_bytewise(server, chunk) if bytewise else server.receive_data(chunk)
        events.extend(new)
        for ev in new:
            if isinstance(ev, HeadersReceived):
                server.send_headers(ev.stream_id, Headers([(b":status", b"200")]), False)
                server.send_data(ev.stream_id, b"ok", True)
            elif isinstance(ev, DataReceived) and ack:
                server.acknowledge(ev.stream_id, ev.flow_controlled_length)
        server.data_to_send()
    assert all(isinstance(e, _EVENT_TYPES) for e in events)
    failures = [e for e in events if isinstance(e, ProtocolFailure) and e.close]
    if failures:
        assert server.wants_close
        assert len(failures) == 1
