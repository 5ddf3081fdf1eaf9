"""The upstream HTTP/2 client codec against hand-built frames: the RFC 9113 rules a client must enforce
that a well-behaved peer (the h2-based tests in test_upstream_http2.py) never exercises."""

from __future__ import annotations

import struct

import hpack
from hyperframe.frame import Frame, GoAwayFrame, PingFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame

from microenvoy.codecs.upstream_http2 import Http2ClientCodec
from microenvoy.core.events import DataReceived, HeadersReceived, ProtocolFailure, StreamReset, WindowOpened
from microenvoy.core.headers import Headers

REQ = Headers([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"/")])


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def frames(data: bytes) -> list[Frame]:
    out = []
    if data.startswith(b"PRI * HTTP/2.0"):
        data = data[24:]
    while data:
        f, length = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9 : 9 + length]))
        out.append(f)
        data = data[9 + length :]
    return out


def ready() -> Http2ClientCodec:
    c = Http2ClientCodec()
    c.initiate()
    c.receive_data(frame(0x4, 0, 0))  # the peer's (empty) SETTINGS
    c.data_to_send()
    return c


def headers_block(fields: list[tuple[bytes, bytes]]) -> bytes:
    return hpack.Encoder().encode(fields)


def test_settings_are_acknowledged_and_ping_is_answered() -> None:
    c = Http2ClientCodec()
    c.initiate()
    evs = c.receive_data(frame(0x4, 0, 0, struct.pack(">HL", 0x3, 2)) + frame(0x6, 0, 0, b"12345678"))
    assert evs == [WindowOpened(None)]
    assert c.peer_max_concurrent_streams == 2
    out = frames(c.data_to_send())
    assert any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in out)
    assert any(isinstance(f, PingFrame) and "ACK" in f.flags and f.opaque_data == b"12345678" for f in out)


def test_response_split_over_continuation_frames_with_padding() -> None:
    c = ready()
    sid = c.send_headers(REQ, end_stream=True)
    block = headers_block([(b":status", b"200"), (b"x-long", b"v" * 300)])
    padded = bytes([3]) + block[:100] + b"\0\0\0"
    data = (
        frame(0x1, 0x8, sid, padded) + frame(0x9, 0, sid, block[100:200]) + frame(0x9, 0x4, sid, block[200:])
    )
    data += frame(0x0, 0x1 | 0x8, sid, bytes([2]) + b"ok" + b"\0\0")
    evs = c.receive_data(data)
    assert isinstance(evs[0], HeadersReceived)
    assert evs[0].headers.get(b"x-long") == b"v" * 300
    assert evs[1] == DataReceived(sid, b"ok", True, 5)  # padding counts for flow control


def test_content_length_mismatch_is_a_stream_error() -> None:
    c = ready()
    sid = c.send_headers(REQ, end_stream=True)
    block = headers_block([(b":status", b"200"), (b"content-length", b"10")])
    evs = c.receive_data(frame(0x1, 0x4, sid, block) + frame(0x0, 0x1, sid, b"short"))
    assert isinstance(evs[0], HeadersReceived)
    assert evs[1] == StreamReset(sid, 0x1, "protocol_error")
    assert [
        (f.stream_id, f.error_code) for f in frames(c.data_to_send()) if isinstance(f, RstStreamFrame)
    ] == [(sid, 0x1)]


def test_malformed_response_headers_are_a_stream_error() -> None:
    for fields in (
        [(b"x-no-status", b"1")],
        [(b":status", b"20")],
        [(b":status", b"200"), (b":path", b"/")],
        [(b":status", b"200"), (b"connection", b"close")],
        [(b":status", b"200"), (b"x-bad", b"a\r\nb")],
    ):
        c = ready()
        sid = c.send_headers(REQ, end_stream=True)
        evs = c.receive_data(frame(0x1, 0x5, sid, headers_block(fields)))
        assert evs == [StreamReset(sid, 0x1, "protocol_error")], fields


def test_connection_errors_send_goaway_with_the_right_code() -> None:
    cases = {
        "push": (frame(0x5, 0x4, 1, b"\0\0\0\2"), 0x1),
        "idle stream": (frame(0x0, 0, 9, b"x"), 0x1),
        "data on 0": (frame(0x0, 0, 0, b"x"), 0x1),
        "frame size": (frame(0x0, 0, 1, b"x" * 16385), 0x6),
        "max frame size": (frame(0x4, 0, 0, struct.pack(">HL", 0x5, 100)), 0x1),
        "window 0": (frame(0x8, 0, 0, struct.pack(">L", 0)), 0x1),
        "window overflow": (frame(0x8, 0, 0, struct.pack(">L", 2**31 - 1)), 0x3),
        "bad hpack": (frame(0x1, 0x5, 1, b"\xff\xff\xff\xff\xff"), 0x9),
        "interrupted block": (frame(0x1, 0x0, 1, b"\x88") + frame(0x6, 0, 0, b"12345678"), 0x1),
    }
    for name, (data, code) in cases.items():
        c = ready()
        c.send_headers(REQ, end_stream=True)
        evs = c.receive_data(data)
        assert isinstance(evs[-1], ProtocolFailure), name
        assert StreamReset(1, code, "protocol_error") in evs, name
        goaways = [f for f in frames(c.data_to_send()) if isinstance(f, GoAwayFrame)]
        assert [g.error_code for g in goaways] == [code], name
        assert c.closed
        assert not c.can_open_stream


def test_window_updates_are_batched_to_half_a_window() -> None:
    c = ready()
    sid = c.send_headers(REQ, end_stream=True)
    c.receive_data(frame(0x1, 0x4, sid, headers_block([(b":status", b"200")])))
    c.receive_data(frame(0x0, 0, sid, b"x" * 16384) + frame(0x0, 0, sid, b"x" * 16384))
    c.acknowledge(sid, 16384)
    assert not [f for f in frames(c.data_to_send()) if isinstance(f, WindowUpdateFrame)]
    c.acknowledge(sid, 16384)  # 32768 >= 65535 // 2 on the stream
    updates = [
        (f.stream_id, f.window_increment)
        for f in frames(c.data_to_send())
        if isinstance(f, WindowUpdateFrame)
    ]
    assert updates == [(sid, 32768)]
