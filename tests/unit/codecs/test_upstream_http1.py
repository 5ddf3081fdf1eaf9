"""The HTTP/1.1 upstream client codec against an in-memory h11 server, byte by byte."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microenvoy.codecs.upstream_http1 import Http1ClientCodec
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
from microenvoy.core.headers import Headers


def req(method: bytes = b"GET", path: bytes = b"/x", *extra: tuple[bytes, bytes]) -> Headers:
    return Headers(
        [(b":method", method), (b":scheme", b"http"), (b":authority", b"svc.local"), (b":path", path), *extra]
    )


def server_events(server: h11.Connection, data: bytes) -> list[object]:
    server.receive_data(data)
    out: list[object] = []
    while True:
        ev = server.next_event()
        if ev is h11.NEED_DATA or ev is h11.PAUSED:
            return out
        out.append(ev)


def feed_bytewise(codec: Http1ClientCodec, data: bytes) -> list[Event]:
    events: list[Event] = []
    for i in range(len(data)):
        events.extend(codec.receive_data(data[i : i + 1]))
    return events


def body_of(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived))


def test_get_translation_and_keepalive_reuse() -> None:
    c = Http1ClientCodec()
    server = h11.Connection(h11.SERVER)
    sid = c.send_headers(
        req(
            b"GET",
            b"/a?b=1",
            (b"connection", b"x-hop"),
            (b"x-hop", b"1"),
            (b"te", b"trailers"),
            (b"accept", b"*/*"),
        ),
        end_stream=True,
    )
    assert sid == 1
    evs = server_events(server, c.data_to_send())
    request = evs[0]
    assert isinstance(request, h11.Request)
    assert request.method == b"GET"
    assert request.target == b"/a?b=1"
    names = [k for k, _ in request.headers]
    assert names[0] == b"host"
    assert dict(request.headers)[b"host"] == b"svc.local"
    assert b"te" not in names
    assert b"connection" not in names
    assert b"x-hop" not in names  # named by Connection
    assert b"accept" in names
    assert isinstance(evs[1], h11.EndOfMessage)
    wire = server.send(h11.Response(status_code=200, headers=[(b"content-length", b"5"), (b"x-a", b"1")]))
    wire = (
        (wire or b"")
        + (server.send(h11.Data(data=b"hello")) or b"")
        + (server.send(h11.EndOfMessage()) or b"")
    )
    events = feed_bytewise(c, wire)
    heads = [e for e in events if isinstance(e, HeadersReceived)]
    assert len(heads) == 1
    assert heads[0].headers.get(b":status") == b"200"
    assert heads[0].headers.get(b"x-a") == b"1"
    assert body_of(events) == b"hello"
    assert isinstance(events[-1], DataAcknowledged)
    assert any(isinstance(e, DataReceived) and e.end_stream for e in events)
    assert c.reusable
    c.start_next_cycle()
    server.start_next_cycle()
    assert c.idle
    assert c.send_headers(req(), end_stream=True) == 2
    assert isinstance(server_events(server, c.data_to_send())[0], h11.Request)
    assert "requests=2" in repr(c)


def test_chunked_request_with_trailers_and_chunked_response_with_trailers() -> None:
    c = Http1ClientCodec()
    server = h11.Connection(h11.SERVER)
    c.send_headers(req(b"POST", b"/up"), end_stream=False)
    c.send_data(b"abc", end_stream=False)
    c.send_trailers(Headers([(b"x-checksum", b"42"), (b"connection", b"close")]))
    evs = server_events(server, c.data_to_send())
    assert isinstance(evs[0], h11.Request)
    assert dict(evs[0].headers)[b"transfer-encoding"] == b"chunked"
    assert b"".join(bytes(e.data) for e in evs if isinstance(e, h11.Data)) == b"abc"
    assert isinstance(evs[-1], h11.EndOfMessage)
    assert list(evs[-1].headers) == [(b"x-checksum", b"42")]
    wire = server.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")])) or b""
    wire += server.send(h11.Data(data=b"xyz")) or b""
    wire += server.send(h11.EndOfMessage(headers=[(b"grpc-status", b"0")])) or b""
    events = feed_bytewise(c, wire)
    head = next(e for e in events if isinstance(e, HeadersReceived))
    assert b"transfer-encoding" not in head.headers  # hop-by-hop stripped from the response
    assert body_of(events) == b"xyz"
    trailers = [e for e in events if isinstance(e, TrailersReceived)]
    assert trailers[0].trailers.get(b"grpc-status") == b"0"
    assert c.reusable


def test_trailers_dropped_on_content_length_request() -> None:
    c = Http1ClientCodec()
    server = h11.Connection(h11.SERVER)
    c.send_headers(req(b"PUT", b"/p", (b"content-length", b"2")), end_stream=False)
    c.send_data(b"ok", end_stream=False)
    c.send_trailers(Headers([(b"x-t", b"1")]))
    evs = server_events(server, c.data_to_send())
    assert b"transfer-encoding" not in dict(evs[0].headers)
    assert isinstance(evs[-1], h11.EndOfMessage)
    assert list(evs[-1].headers) == []


def test_post_without_body_gets_content_length_zero_and_host_fallbacks() -> None:
    c = Http1ClientCodec(default_authority=b"fallback:80")
    server = h11.Connection(h11.SERVER)
    c.send_headers(Headers([(b":method", b"POST"), (b":path", b"/p")]), end_stream=True)
    request = server_events(server, c.data_to_send())[0]
    assert dict(request.headers)[b"content-length"] == b"0"
    assert dict(request.headers)[b"host"] == b"fallback:80"


def test_informational_responses_are_skipped_and_head_end_folds() -> None:
    c = Http1ClientCodec()
    c.send_headers(req(), end_stream=True)
    c.data_to_send()
    events = feed_bytewise(c, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nx: y\r\n\r\n")
    heads = [e for e in events if isinstance(e, HeadersReceived)]
    assert len(heads) == 1
    assert heads[0].headers.get(b":status") == b"204"
    # 204 has no body: the end folds into the headers when they arrive in one read
    c2 = Http1ClientCodec()
    c2.send_headers(req(), end_stream=True)
    evs = c2.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert isinstance(evs[0], HeadersReceived)
    assert evs[0].end_stream


def test_busy_connection_refuses_second_request() -> None:
    c = Http1ClientCodec()
    c.send_headers(req(), end_stream=True)
    with pytest.raises(CodecError, match="busy"):
        c.send_headers(req(), end_stream=True)


def test_connection_close_response_is_not_reusable() -> None:
    c = Http1ClientCodec()
    c.send_headers(req(), end_stream=True)
    evs = c.receive_data(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nZ")
    assert body_of(evs) == b"Z"
    assert not c.reusable
    assert not any(isinstance(e, DataAcknowledged) for e in evs)


def test_eof_mid_body_is_a_stream_reset() -> None:
    c = Http1ClientCodec()
    c.send_headers(req(), end_stream=True)
    evs = c.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    assert body_of(evs) == b"abc"
    evs = c.receive_data(b"")
    assert isinstance(evs[0], StreamReset)
    assert evs[0].reason == "connection_closed"
    assert c.closed


def test_eof_before_any_response_is_a_stream_reset() -> None:
    c = Http1ClientCodec()
    c.send_headers(req(), end_stream=True)
    evs = c.receive_data(b"")
    assert any(isinstance(e, StreamReset) for e in evs)


def test_eof_delimited_body() -> None:
    c = Http1ClientCodec()
    c.send_headers(req(), end_stream=True)
    evs = c.receive_data(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
    evs += c.receive_data(b"")
    assert body_of(evs) == b"until close"
    assert any(isinstance(e, DataReceived) and e.end_stream for e in evs)
    assert isinstance(evs[-1], ConnectionTerminated)
    assert not any(isinstance(e, StreamReset) for e in evs)


def test_garbage_response_is_protocol_failure() -> None:
    c = Http1ClientCodec()
    c.send_headers(req(), end_stream=True)
    evs = c.receive_data(b"NOT HTTP AT ALL\r\n\r\n")
    assert isinstance(evs[0], ProtocolFailure)
    assert c.closed
    assert c.receive_data(b"more") == []


def test_oversized_response_headers_are_protocol_failure() -> None:
    c = Http1ClientCodec(max_response_header_bytes=1024)
    c.send_headers(req(), end_stream=True)
    evs = c.receive_data(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 2000)
    assert any(isinstance(e, ProtocolFailure) for e in evs)


def test_invalid_header_value_is_codec_error() -> None:
    c = Http1ClientCodec()
    with pytest.raises(CodecError):
        c.send_headers(req(b"GET", b"/", (b"x-bad", b"a\r\nb")), end_stream=True)


def test_send_after_early_response_is_dropped() -> None:
    c = Http1ClientCodec()
    c.send_headers(req(b"POST", b"/p"), end_stream=False)
    c.data_to_send()
    evs = c.receive_data(b"HTTP/1.1 413 Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    assert any(isinstance(e, HeadersReceived) for e in evs)
    assert c.response_complete
    assert not c.request_complete
    c.send_data(b"more", end_stream=True)  # still allowed by h11 (client may finish), no crash
    assert not c.reusable


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_arbitrary_response_bytes_never_crash(data: bytes) -> None:
    c = Http1ClientCodec()
    c.send_headers(req(), end_stream=True)
    c.receive_data(data)
    c.receive_data(b"")
