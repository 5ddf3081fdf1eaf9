"""The HTTP/1.1 server codec in memory: request parsing (whole and byte by byte), limits, errors,
responses as an h11 client sees them, keep-alive, and hypothesis: arbitrary bytes only ever yield events."""

from __future__ import annotations

import itertools

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microenvoy.codecs.http1 import Http1ServerCodec
from microenvoy.core.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    HeadersReceived,
    ProtocolFailure,
    TrailersReceived,
)
from microenvoy.core.headers import Headers

# ----------------------------------------------------------------------------------------- helpers


def feed_bytewise(codec: Http1ServerCodec, data: bytes) -> list[Event]:
    events: list[Event] = []
    for i in range(len(data)):
        events.extend(codec.receive_data(data[i : i + 1]))
    return events


def coalesce(events: list[Event]) -> list[Event]:
    """Merge adjacent body chunks of one stream so that differently split inputs compare equal."""
    out: list[Event] = []
    for ev in events:
        prev = out[-1] if out else None
        if (
            isinstance(ev, DataReceived)
            and isinstance(prev, DataReceived)
            and prev.stream_id == ev.stream_id
            and not prev.end_stream
        ):
            out[-1] = DataReceived(
                ev.stream_id,
                prev.data + ev.data,
                ev.end_stream,
                prev.flow_controlled_length + ev.flow_controlled_length,
            )
        else:
            out.append(ev)
    return out


def client_events(client: h11.Connection, data: bytes) -> list[object]:
    if data:  # b"" would mean EOF to h11
        client.receive_data(data)
    out: list[object] = []
    while True:
        ev = client.next_event()
        if ev is h11.NEED_DATA or ev is h11.PAUSED:
            return out
        out.append(ev)
        if isinstance(ev, h11.ConnectionClosed):
            return out


def answered(codec: Http1ServerCodec, stream_id: int, body: bytes = b"ok") -> None:
    codec.send_headers(
        stream_id, Headers([(b":status", b"200"), (b"content-length", str(len(body)).encode())]), False
    )
    codec.send_data(stream_id, body, True)


def response_of(raw: bytes, method: bytes = b"GET") -> tuple[h11.Response, bytes, list[tuple[bytes, bytes]]]:
    """Parse one response with a fresh h11 client (after sending it a matching request)."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
    client.send(h11.EndOfMessage())
    evs = client_events(client, raw)
    resp = evs[0]
    assert isinstance(resp, h11.Response)
    body = b"".join(bytes(e.data) for e in evs if isinstance(e, h11.Data))
    end = [e for e in evs if isinstance(e, h11.EndOfMessage)]
    assert end, f"response incomplete: {evs}"
    return resp, body, list(end[0].headers)


GET = b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n"
POST_CL = b"POST /up HTTP/1.1\r\nHost: example.com\r\nContent-Length: 11\r\n\r\nhello world"
POST_CHUNKED = (
    b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\nX-Other: a\r\n\r\n"
)
POST_CHUNKED_NO_TRAILERS = (
    b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
)
HTTP10 = b"GET /old HTTP/1.0\r\n\r\n"


# ------------------------------------------------------------------------------------------ requests


def test_get_becomes_pseudo_headers() -> None:
    c = Http1ServerCodec()
    evs = c.receive_data(GET)
    head = evs[0]
    assert isinstance(head, HeadersReceived)
    assert head.stream_id == 1
    assert head.end_stream
    assert list(head.headers) == [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"example.com"),
        (b":path", b"/a?b=1"),
        (b"user-agent", b"t"),
        (b"accept", b"*/*"),
    ]
    assert b"host" not in head.headers
    assert not head.early_data
    assert c.data_to_send() == b""
    assert c.open_streams() == 1


def test_tls_connection_gives_https_scheme() -> None:
    c = Http1ServerCodec(tls=True)
    head = c.receive_data(GET)[0]
    assert isinstance(head, HeadersReceived)
    assert head.headers.get(b":scheme") == b"https"


def test_missing_host_on_http11_is_400_and_close() -> None:
    c = Http1ServerCodec()
    evs = c.receive_data(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n")
    assert len(evs) == 1
    failure = evs[0]
    assert isinstance(failure, ProtocolFailure)
    assert failure.close
    assert failure.stat == "downstream_rq_http1_invalid"
    resp, _, _ = response_of(c.data_to_send())
    assert resp.status_code == 400
    assert (b"connection", b"close") in resp.headers
    assert c.wants_close


def test_http10_without_host_is_accepted_with_empty_authority() -> None:
    c = Http1ServerCodec()
    head = c.receive_data(HTTP10)[0]
    assert isinstance(head, HeadersReceived)
    assert head.headers.get(b":authority") == b""
    assert head.headers.get(b":path") == b"/old"


def test_content_length_body() -> None:
    c = Http1ServerCodec()
    evs = c.receive_data(POST_CL)
    head = evs[0]
    assert isinstance(head, HeadersReceived)
    assert not head.end_stream
    assert head.headers.get(b"content-length") == b"11"
    assert evs[1:] == [
        DataReceived(1, b"hello world", False, 11),
        DataReceived(1, b"", True, 0),
    ]


def test_content_length_zero_ends_with_headers() -> None:
    c = Http1ServerCodec()
    head = c.receive_data(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")[0]
    assert isinstance(head, HeadersReceived)
    assert head.end_stream


def test_chunked_body_with_trailers() -> None:
    c = Http1ServerCodec()
    evs = coalesce(c.receive_data(POST_CHUNKED))
    head = evs[0]
    assert isinstance(head, HeadersReceived)
    assert not head.end_stream
    assert head.headers.get(b"transfer-encoding") == b"chunked"
    assert evs[1:] == [
        DataReceived(1, b"hello world", False, 11),
        TrailersReceived(1, Headers([(b"x-sum", b"42"), (b"x-other", b"a")])),
    ]


def test_chunked_body_without_trailers_ends_with_empty_data() -> None:
    c = Http1ServerCodec()
    evs = c.receive_data(POST_CHUNKED_NO_TRAILERS)
    assert evs[1:] == [DataReceived(1, b"abc", False, 3), DataReceived(1, b"", True, 0)]


@pytest.mark.parametrize(
    "raw",
    [GET, HTTP10, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"],
    ids=["get", "1.0", "cl0"],
)
def test_nothing_follows_a_request_that_ended_with_its_headers(raw: bytes) -> None:
    """events.HeadersReceived.end_stream promises that no body follows (as the h2/h3 codecs do)."""
    c = Http1ServerCodec()
    evs = c.receive_data(raw)
    assert len(evs) == 1
    assert isinstance(evs[0], HeadersReceived)
    assert evs[0].end_stream


def test_expect_100_continue_is_answered() -> None:
    c = Http1ServerCodec()
    evs = c.receive_data(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert isinstance(evs[0], HeadersReceived)
    assert c.data_to_send().startswith(b"HTTP/1.1 100 ")
    assert c.receive_data(b"abc") == [DataReceived(1, b"abc", False, 3), DataReceived(1, b"", True, 0)]


def test_eof_is_connection_terminated() -> None:
    c = Http1ServerCodec()
    assert c.receive_data(b"") == [ConnectionTerminated(reason="eof")]
    assert c.receive_data(GET) == []


@pytest.mark.parametrize(
    "raw",
    [GET, POST_CL, POST_CHUNKED, POST_CHUNKED_NO_TRAILERS, HTTP10],
    ids=["get", "cl", "chunked", "te", "1.0"],
)
def test_byte_by_byte_gives_the_same_events(raw: bytes) -> None:
    whole = Http1ServerCodec().receive_data(raw)
    bytewise = feed_bytewise(Http1ServerCodec(), raw)
    assert coalesce(bytewise) == coalesce(whole)
    # Body bytes trickle in as they arrive, they are not held back until the end.
    if raw in (POST_CL, POST_CHUNKED):
        assert sum(isinstance(e, DataReceived) and bool(e.data) for e in bytewise) > 1


def test_pipelined_requests_wait_for_response_complete() -> None:
    c = Http1ServerCodec()
    raw = GET + POST_CL + GET.replace(b"/a?b=1", b"/third")
    evs = c.receive_data(raw)
    assert [type(e) for e in evs] == [HeadersReceived]  # only the first request
    assert c.response_complete() == []  # nothing answered yet: nothing more parsed
    answered(c, 1)
    evs = c.response_complete()
    head = evs[0]
    assert isinstance(head, HeadersReceived)
    assert head.stream_id == 3
    assert head.headers.get(b":path") == b"/up"
    assert evs[1:] == [DataReceived(3, b"hello world", False, 11), DataReceived(3, b"", True, 0)]
    answered(c, 3)
    evs = c.response_complete()
    head = evs[0]
    assert isinstance(head, HeadersReceived)
    assert head.stream_id == 5
    assert head.headers.get(b":path") == b"/third"
    # The client reads three complete responses, in order.
    client = h11.Connection(h11.CLIENT)
    out = c.data_to_send()
    statuses = []
    for _ in range(2):
        client.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"x")]))
        client.send(h11.EndOfMessage())
        evs2 = client_events(client, out)
        out = b""
        statuses += [e.status_code for e in evs2 if isinstance(e, h11.Response)]
        client.start_next_cycle()
    assert statuses == [200, 200]


def test_pipelined_requests_byte_by_byte() -> None:
    raw = POST_CHUNKED + GET
    c = Http1ServerCodec()
    first = coalesce(feed_bytewise(c, raw))
    assert isinstance(first[0], HeadersReceived)
    assert isinstance(first[-1], TrailersReceived)
    answered(c, 1)
    second = c.response_complete()
    assert isinstance(second[0], HeadersReceived)
    assert second[0].stream_id == 3
    assert second[0].headers.get(b":path") == b"/a?b=1"


# -------------------------------------------------------------------------------------- bad input


def test_incomplete_header_block_over_limit_is_431() -> None:
    c = Http1ServerCodec(max_header_bytes=1024)
    evs = c.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 2000)
    assert len(evs) == 1
    failure = evs[0]
    assert isinstance(failure, ProtocolFailure)
    assert failure.stat == "downstream_rq_431"
    assert failure.close
    resp, _, _ = response_of(c.data_to_send())
    assert resp.status_code == 431
    assert (b"connection", b"close") in resp.headers
    assert c.wants_close


def test_header_block_over_limit_byte_by_byte_is_431() -> None:
    c = Http1ServerCodec(max_header_bytes=1024)
    evs = feed_bytewise(c, b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
    assert [type(e) for e in evs] == [ProtocolFailure]  # counted once, not once per later byte
    assert c.data_to_send().startswith(b"HTTP/1.1 431 ")


def test_complete_header_block_over_limit_in_one_read_is_431() -> None:
    """h11's limit only bounds an incomplete head; the codec must not depend on segmentation."""
    c = Http1ServerCodec(max_header_bytes=1024)
    evs = c.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
    assert [type(e) for e in evs] == [ProtocolFailure]
    assert isinstance(evs[0], ProtocolFailure)
    assert evs[0].stat == "downstream_rq_431"
    resp, _, _ = response_of(c.data_to_send())
    assert resp.status_code == 431


def test_header_block_just_under_limit_is_accepted() -> None:
    c = Http1ServerCodec(max_header_bytes=1024)
    head = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 900 + b"\r\n\r\n"
    assert len(head) < 1024
    evs = c.receive_data(head)
    assert isinstance(evs[0], HeadersReceived)


def test_too_many_headers_is_431() -> None:
    c = Http1ServerCodec(max_headers_count=10)
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(11))
    evs = c.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\n" + fields + b"\r\n")
    assert len(evs) == 1
    failure = evs[0]
    assert isinstance(failure, ProtocolFailure)
    assert failure.stat == "downstream_rq_431"
    assert failure.close
    resp, _, _ = response_of(c.data_to_send())
    assert resp.status_code == 431
    assert (b"connection", b"close") in resp.headers
    assert c.wants_close


def test_header_count_at_the_limit_is_fine() -> None:
    c = Http1ServerCodec(max_headers_count=10)
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(9))
    head = c.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\n" + fields + b"\r\n")[0]
    assert isinstance(head, HeadersReceived)


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nHost: h\r\n\r\n",
        b"GET  HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ],
    ids=["garbage", "extra-token", "empty-target", "space-in-name", "bad-length", "bad-chunk", "two-hosts"],
)
def test_malformed_request_is_400_with_connection_close(raw: bytes) -> None:
    c = Http1ServerCodec()
    evs = c.receive_data(raw)
    failures = [e for e in evs if isinstance(e, ProtocolFailure)]
    assert len(failures) == 1
    assert failures[0].close
    assert failures[0].stat == "downstream_rq_http1_invalid"
    assert evs[-1] is failures[0]
    # No response had started (for a broken body too): the 400 goes out, then the connection closes.
    resp, _, _ = response_of(c.data_to_send())
    assert resp.status_code == 400
    assert (b"connection", b"close") in resp.headers
    assert c.wants_close
    assert c.receive_data(GET) == []  # nothing after the failure is parsed (or counted again)


def test_broken_body_after_response_started_sends_no_400() -> None:
    c = Http1ServerCodec()
    c.receive_data(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    c.send_headers(1, Headers([(b":status", b"200")]), False)
    c.send_data(1, b"partial", False)
    started = c.data_to_send()
    evs = c.receive_data(b"zz\r\n")
    assert [type(e) for e in evs] == [ProtocolFailure]
    assert c.data_to_send() == b""  # a second status line would corrupt the response under way
    assert started.startswith(b"HTTP/1.1 200 ")
    assert c.wants_close


def test_unsupported_http_version_is_rejected() -> None:
    c = Http1ServerCodec()
    evs = c.receive_data(b"GET / HTTP/2.0\r\nHost: h\r\n\r\n")
    assert [type(e) for e in evs] == [ProtocolFailure]
    assert c.data_to_send().startswith(b"HTTP/1.1 505 ")


# -------------------------------------------------------------------------------------- responses


def test_response_with_content_length() -> None:
    c = Http1ServerCodec()
    c.receive_data(GET)
    c.send_headers(
        1,
        Headers(
            [
                (b":status", b"201"),
                (b"content-length", b"5"),
                (b"x-a", b"1"),
                (b"connection", b"x-hop"),  # hop-by-hop: never copied
                (b"keep-alive", b"timeout=5"),
                (b"transfer-encoding", b"chunked"),
            ]
        ),
        False,
    )
    c.send_data(1, b"hel", False)
    c.send_data(1, b"lo", True)
    raw = c.data_to_send()
    resp, body, trailers = response_of(raw)
    assert resp.status_code == 201
    assert body == b"hello"
    assert trailers == []
    names = [k for k, _ in resp.headers]
    assert b"transfer-encoding" not in names
    assert b"keep-alive" not in names
    assert b"connection" not in names
    assert (b"x-a", b"1") in resp.headers
    assert (b"content-length", b"5") in resp.headers
    assert c.open_streams() == 0
    assert not c.wants_close


def test_response_without_length_is_chunked_with_trailers() -> None:
    c = Http1ServerCodec()
    c.receive_data(GET)
    c.send_headers(1, Headers([(b":status", b"200"), (b"content-type", b"application/grpc")]), False)
    c.send_data(1, b"abc", False)
    c.send_data(1, b"def", False)
    c.send_trailers(1, Headers([(b"grpc-status", b"0"), (b"grpc-message", b"ok")]))
    raw = c.data_to_send()
    assert b"transfer-encoding: chunked" in raw.lower()
    resp, body, trailers = response_of(raw)
    assert resp.status_code == 200
    assert body == b"abcdef"
    assert trailers == [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]
    assert c.open_streams() == 0


def test_trailers_on_a_content_length_response_are_dropped() -> None:
    c = Http1ServerCodec()
    c.receive_data(GET)
    c.send_headers(1, Headers([(b":status", b"200"), (b"content-length", b"2")]), False)
    c.send_data(1, b"ok", False)
    c.send_trailers(1, Headers([(b"x-t", b"1")]))
    resp, body, trailers = response_of(c.data_to_send())
    assert body == b"ok"
    assert trailers == []
    assert b"x-t" not in [k for k, _ in resp.headers]


def test_headers_only_response_gets_content_length_zero() -> None:
    c = Http1ServerCodec()
    c.receive_data(GET)
    c.send_headers(1, Headers([(b":status", b"404")]), True)
    resp, body, _ = response_of(c.data_to_send())
    assert resp.status_code == 404
    assert (b"content-length", b"0") in resp.headers
    assert body == b""


def test_204_has_no_content_length() -> None:
    c = Http1ServerCodec()
    c.receive_data(GET)
    c.send_headers(1, Headers([(b":status", b"204")]), True)
    resp, _, _ = response_of(c.data_to_send())
    assert resp.status_code == 204
    assert b"content-length" not in [k for k, _ in resp.headers]


def test_response_to_http10_without_length_closes() -> None:
    c = Http1ServerCodec()
    c.receive_data(HTTP10)
    c.send_headers(1, Headers([(b":status", b"200")]), False)
    c.send_data(1, b"streamed", True)
    raw = c.data_to_send()
    assert b"chunked" not in raw.lower()
    assert raw.endswith(b"streamed")
    assert c.wants_close
    assert c.response_complete() == []


# ------------------------------------------------------------------------------------- keep-alive


def test_keep_alive_cycle() -> None:
    c = Http1ServerCodec()
    c.receive_data(GET)
    answered(c, 1)
    assert not c.wants_close
    assert c.response_complete() == []  # no next request yet
    head = c.receive_data(GET)[0]
    assert isinstance(head, HeadersReceived)
    assert head.stream_id == 3


def test_connection_close_request_closes_after_response() -> None:
    c = Http1ServerCodec()
    evs = c.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert isinstance(evs[0], HeadersReceived)
    answered(c, 1)
    resp, _, _ = response_of(c.data_to_send())
    assert resp.status_code == 200
    assert (b"connection", b"close") in resp.headers
    assert c.wants_close
    assert c.response_complete() == []


@pytest.mark.parametrize("after", [GET, b"\r\n"], ids=["pipelined", "crlf"])
def test_bytes_after_connection_close_request_are_ignored(after: bytes) -> None:
    c = Http1ServerCodec()
    evs = c.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" + after)
    assert not any(isinstance(e, ProtocolFailure) for e in evs)
    answered(c, 1)
    resp, _, _ = response_of(c.data_to_send())
    assert resp.status_code == 200
    assert c.wants_close


def test_http10_closes_after_response() -> None:
    c = Http1ServerCodec()
    c.receive_data(HTTP10)
    answered(c, 1)
    assert c.wants_close


def test_keep_alive_false_adds_connection_close() -> None:
    c = Http1ServerCodec()
    c.receive_data(GET)
    c.keep_alive = False  # the front is draining
    answered(c, 1)
    resp, _, _ = response_of(c.data_to_send())
    assert (b"connection", b"close") in resp.headers
    assert c.wants_close


def test_response_before_request_body_read_drops_the_rest_and_keeps_alive() -> None:
    c = Http1ServerCodec()
    c.receive_data(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\npartial")
    c.send_headers(1, Headers([(b":status", b"413")]), True)
    resp, _, _ = response_of(c.data_to_send())
    assert (b"connection", b"close") not in resp.headers
    assert c.response_complete() == []
    assert not c.wants_close
    # The rest of the body is read and dropped; the next request is parsed as usual.
    evs = c.receive_data(b"x" * 93 + GET)
    assert [type(e) for e in evs] == [HeadersReceived]
    assert evs[0].stream_id == 3


def test_response_before_a_large_or_chunked_body_closes() -> None:
    for head in (b"Content-Length: 10000000", b"Transfer-Encoding: chunked"):
        c = Http1ServerCodec(max_discard_bytes=1000)
        c.receive_data(b"POST / HTTP/1.1\r\nHost: h\r\n" + head + b"\r\n\r\n")
        c.send_headers(1, Headers([(b":status", b"413")]), True)
        resp, _, _ = response_of(c.data_to_send())
        assert (b"connection", b"close") in resp.headers
        assert c.response_complete() == []
        assert c.wants_close


def test_reset_stream_closes_the_connection() -> None:
    c = Http1ServerCodec()
    c.receive_data(GET)
    c.reset_stream(1)
    assert c.wants_close


def test_repr_is_one_line() -> None:
    c = Http1ServerCodec()
    c.receive_data(GET)
    r = repr(c)
    assert "\n" not in r
    assert r.startswith("<Http1ServerCodec stream=1")


# ------------------------------------------------------------------------------------- hypothesis

_EVENT_TYPES = (HeadersReceived, DataReceived, TrailersReceived, ProtocolFailure, ConnectionTerminated)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=400),
        st.lists(
            st.sampled_from(
                [
                    GET,
                    POST_CL,
                    POST_CHUNKED,
                    b"\r\n",
                    b"Host: h\r\n",
                    b"Content-Length: 3\r\n",
                    b"0\r\n",
                    b" ",
                ]
            )
            | st.binary(max_size=20),
            max_size=12,
        ).map(b"".join),
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    answer=st.booleans(),
)
def test_arbitrary_bytes_only_yield_events(data: bytes, cuts: list[int], answer: bool) -> None:
    c = Http1ServerCodec(max_header_bytes=256, max_headers_count=8)
    bounds = sorted({0, len(data), *(x for x in cuts if x <= len(data))})
    events: list[Event] = []
    for a, b in itertools.pairwise(bounds):
        new = c.receive_data(data[a:b])
        events.extend(new)
        if answer:
            for ev in new:
                if isinstance(ev, HeadersReceived):
                    answered(c, ev.stream_id)
                    events.extend(c.response_complete())
    events.extend(c.receive_data(b""))
    assert all(isinstance(e, _EVENT_TYPES) for e in events)
    out = c.data_to_send()
    failures = [e for e in events if isinstance(e, ProtocolFailure)]
    if failures:
        assert c.wants_close
        if not any(isinstance(e, HeadersReceived) for e in events):
            assert out.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ", b"HTTP/1.1 505 "))
    ids = [e.stream_id for e in events if isinstance(e, HeadersReceived)]
    assert ids == list(range(1, 2 * len(ids), 2))


@pytest.mark.parametrize(
    ("status", "line"),
    [
        (200, b"HTTP/1.1 200 OK\r\n"),
        (503, b"HTTP/1.1 503 Service Unavailable\r\n"),
        (599, b"HTTP/1.1 599 \r\n"),
    ],
)
def test_status_line_carries_the_standard_reason_phrase(status: int, line: bytes) -> None:
    c = Http1ServerCodec()
    c.receive_data(GET)
    c.send_headers(1, Headers([(b":status", str(status).encode()), (b"content-length", b"0")]), True)
    assert c.data_to_send().startswith(line)
