"""The HTTP/3 server codec over a ``ProxyQuicConnection``, paired in memory with an aioquic H3 client on a
fake clock: requests with bodies and trailers (also replayed one byte per QUIC event), header limits,
responses as the client's H3 layer sees them, resets, GOAWAY, and connection close."""

from __future__ import annotations

import functools
import ssl
from typing import Any

from aioquic.buffer import Buffer
from aioquic.h3 import events as h3e
from aioquic.h3.connection import H3_ALPN, ErrorCode, FrameType, H3Connection
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from microenvoy.codecs.http3 import Http3ServerCodec
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
from microenvoy.core.headers import Headers
from microenvoy.demo import self_signed

CLIENT_ADDR = ("127.0.0.2", 50000)
SERVER_ADDR = ("127.0.0.1", 443)


@functools.cache
def certificate() -> tuple[Any, Any]:
    return self_signed()


class Pair:
    """An aioquic H3 client and a ``ProxyQuicConnection`` + ``Http3ServerCodec`` on a fake clock."""

    def __init__(self, *, codec: bool = True, **codec_kw: int) -> None:
        cert, key = certificate()
        self.now = 1000.0
        ccfg = QuicConfiguration(
            is_client=True, alpn_protocols=H3_ALPN, server_name="localhost", verify_mode=ssl.CERT_NONE
        )
        self.client = QuicConnection(configuration=ccfg)
        scfg = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
        scfg.certificate = cert
        scfg.private_key = key
        self.server = ProxyQuicConnection(
            configuration=scfg,
            original_destination_connection_id=self.client.original_destination_connection_id,
            stream_window=scfg.max_stream_data,
            connection_window=scfg.max_data,
        )
        self.codec: Http3ServerCodec | None = Http3ServerCodec(self.server, **codec_kw) if codec else None
        self.server_quic_events: list[qe.QuicEvent] = []
        self.events: list[Event] = []
        self.client_quic_events: list[qe.QuicEvent] = []
        self.h3_events: list[h3e.H3Event] = []
        self.client.connect(SERVER_ADDR, now=self.now)
        self.h3 = H3Connection(self.client)
        self.run()
        assert any(isinstance(e, qe.HandshakeCompleted) for e in self.client_quic_events)

    def run(self) -> None:
        for _ in range(100):
            moved = False
            for data, _ in self.client.datagrams_to_send(now=self.now):
                self.server.receive_datagram(data, CLIENT_ADDR, now=self.now)
                moved = True
            while (sev := self.server.next_event()) is not None:
                self.server_quic_events.append(sev)
                if self.codec is not None:
                    self.events.extend(self.codec.handle_quic_event(sev))
            for data, _ in self.server.datagrams_to_send(now=self.now):
                self.client.receive_datagram(data, SERVER_ADDR, now=self.now)
                moved = True
            while (cev := self.client.next_event()) is not None:
                self.client_quic_events.append(cev)
                self.h3_events.extend(self.h3.handle_event(cev))
            if not moved:
                return
            self.now += 0.005
            for conn in (self.client, self.server):
                timer = conn.get_timer()
                if timer is not None and timer <= self.now:
                    conn.handle_timer(now=self.now)
        raise AssertionError("the pair never went quiet")

    def settle(self, seconds: float = 5.0) -> None:
        """Let timers run on the fake clock (closing/draining periods, loss recovery)."""
        end = self.now + seconds
        while self.now < end:
            self.now += 0.1
            for conn in (self.client, self.server):
                timer = conn.get_timer()
                if timer is not None and timer <= self.now:
                    conn.handle_timer(now=self.now)
            self.run()

    def request(
        self,
        method: bytes = b"GET",
        path: bytes = b"/",
        body: bytes | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
        trailers: list[tuple[bytes, bytes]] | None = None,
    ) -> int:
        sid = self.client.get_next_available_stream_id()
        headers = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
            (b":path", path),
        ]
        headers += extra or []
        self.h3.send_headers(sid, headers, end_stream=body is None and trailers is None)
        if body is not None:
            self.h3.send_data(sid, body, end_stream=trailers is None)
        if trailers is not None:
            self.h3.send_headers(sid, trailers, end_stream=True)
        return sid

    def stream_events(self, sid: int) -> list[Event]:
        return [e for e in self.events if getattr(e, "stream_id", None) == sid]

    def client_side(self, sid: int) -> list[h3e.H3Event]:
        return [e for e in self.h3_events if getattr(e, "stream_id", None) == sid]


def coalesce(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for ev in events:
        prev = out[-1] if out else None
        if isinstance(ev, DataReceived) and isinstance(prev, DataReceived) and prev.stream_id == ev.stream_id:
            out[-1] = DataReceived(
                ev.stream_id,
                prev.data + ev.data,
                ev.end_stream,
                prev.flow_controlled_length + ev.flow_controlled_length,
            )
        elif isinstance(ev, DataReceived) and not ev.data and not ev.end_stream:
            continue
        else:
            out.append(ev)
    return out


BODY = bytes(range(256)) * 40  # 10 KiB, several QUIC packets


# ------------------------------------------------------------------------------------------ requests


def test_request_with_body_and_trailers() -> None:
    p = Pair()
    sid = p.request(b"POST", b"/upload", BODY, extra=[(b"content-type", b"application/grpc")],
                    trailers=[(b"x-checksum", b"abc"), (b"x-n", b"1")])  # fmt: skip
    p.run()
    evs = coalesce(p.stream_events(sid))
    head = evs[0]
    assert isinstance(head, HeadersReceived)
    assert not head.end_stream
    assert not head.early_data
    assert list(head.headers) == [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"localhost"),
        (b":path", b"/upload"),
        (b"content-type", b"application/grpc"),
    ]
    assert evs[1] == DataReceived(sid, BODY, False, len(BODY))
    assert evs[2] == TrailersReceived(sid, Headers([(b"x-checksum", b"abc"), (b"x-n", b"1")]))
    assert len(evs) == 3
    # Every DataReceived reports its payload as flow-controlled, and it stays unconsumed until acknowledged.
    chunks = [e for e in p.stream_events(sid) if isinstance(e, DataReceived)]
    assert all(e.flow_controlled_length == len(e.data) for e in chunks)
    assert p.server.unconsumed(sid) == len(BODY)
    assert p.codec is not None
    p.codec.acknowledge(sid, 1000)
    assert p.server.unconsumed(sid) == len(BODY) - 1000
    assert p.codec.open_streams() == 1
    assert p.codec.last_stream_id == sid


def test_get_ends_with_its_headers() -> None:
    p = Pair()
    sid = p.request()
    p.run()
    evs = p.stream_events(sid)
    assert len(evs) == 1
    assert isinstance(evs[0], HeadersReceived)
    assert evs[0].end_stream


def test_body_without_trailers_ends_with_data() -> None:
    p = Pair()
    sid = p.request(b"PUT", b"/x", b"abc")
    p.run()
    evs = coalesce(p.stream_events(sid))
    assert evs[1:] == [DataReceived(sid, b"abc", True, 3)]


def test_one_byte_per_quic_event_gives_the_same_events() -> None:
    """Replay everything a server saw as one-byte StreamDataReceived events into a fresh codec."""
    original = Pair()
    sids = [
        original.request(b"POST", b"/a", BODY, trailers=[(b"x-t", b"1")]),
        original.request(b"GET", b"/b", extra=[(b"x-custom", b"v" * 100)]),
        original.request(b"GET", b"/b", extra=[(b"x-custom", b"v" * 100)]),  # QPACK dynamic table reuse
    ]
    original.run()
    fresh = Pair(codec=False)
    codec = Http3ServerCodec(fresh.server)
    replayed: list[Event] = []
    for ev in original.server_quic_events:
        if isinstance(ev, qe.StreamDataReceived) and len(ev.data) > 1:
            for i in range(len(ev.data)):
                last = i == len(ev.data) - 1
                piece = qe.StreamDataReceived(
                    data=ev.data[i : i + 1], end_stream=ev.end_stream and last, stream_id=ev.stream_id
                )
                replayed.extend(codec.handle_quic_event(piece))
        else:
            replayed.extend(codec.handle_quic_event(ev))
    assert coalesce(replayed) == coalesce(original.events)
    assert [e.stream_id for e in replayed if isinstance(e, HeadersReceived)] == sids
    assert not any(isinstance(e, ProtocolFailure) for e in replayed)


def test_client_reset_becomes_stream_reset_and_releases_the_stream() -> None:
    p = Pair()
    sid = p.client.get_next_available_stream_id()
    p.h3.send_headers(
        sid, [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"l"), (b":path", b"/")]
    )
    p.h3.send_data(sid, b"partial", end_stream=False)
    p.run()
    assert p.server.unconsumed(sid) == 7
    # The client sent everything but FIN; now it gives up.
    p.client.reset_stream(sid, int(ErrorCode.H3_REQUEST_CANCELLED))
    p.run()
    assert StreamReset(sid, int(ErrorCode.H3_REQUEST_CANCELLED), "remote_reset") in p.events
    assert p.server.unconsumed(sid) == 0
    assert p.codec is not None
    assert p.codec.open_streams() == 0


# -------------------------------------------------------------------------------------- header limits


def test_oversized_headers_are_431_and_the_connection_lives() -> None:
    p = Pair(max_header_bytes=1024)
    sid = p.request(b"POST", b"/", b"body that is drained", extra=[(b"x-big", b"a" * 2000)])
    p.run()
    assert p.stream_events(sid) == []  # no exchange event for the refused stream
    failures = [e for e in p.events if isinstance(e, ProtocolFailure)]
    assert failures == [
        ProtocolFailure("downstream_rq_431", "request headers too large", close=False, status=431)
    ]
    resp = p.client_side(sid)
    assert isinstance(resp[0], h3e.HeadersReceived)
    assert dict(resp[0].headers)[b":status"] == b"431"
    assert p.server.unconsumed(sid) == 0  # the refused body does not hold connection credit
    # The connection still serves the next request.
    ok = p.request(b"GET", b"/next")
    p.run()
    heads = [e for e in p.events if isinstance(e, HeadersReceived)]
    assert [h.stream_id for h in heads] == [ok]
    assert not any(isinstance(e, qe.ConnectionTerminated) for e in p.client_quic_events)


def test_too_many_headers_are_431() -> None:
    p = Pair(max_headers_count=10)
    sid = p.request(extra=[(b"x-%d" % i, b"v") for i in range(10)])
    p.run()
    assert [e.stat for e in p.events if isinstance(e, ProtocolFailure)] == ["downstream_rq_431"]
    resp = p.client_side(sid)
    assert isinstance(resp[0], h3e.HeadersReceived)
    assert dict(resp[0].headers)[b":status"] == b"431"


# -------------------------------------------------------------------------------------- responses


def test_response_headers_data_and_trailers_as_the_client_sees_them() -> None:
    p = Pair()
    sid = p.request(b"POST", b"/rpc", b"req", extra=[(b"content-type", b"application/grpc")])
    p.run()
    assert p.codec is not None
    p.codec.send_headers(
        sid,
        Headers(
            [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"connection", b"keep-alive"),  # connection-specific: never on HTTP/3
                (b"transfer-encoding", b"chunked"),
            ]
        ),
        False,
    )
    assert p.codec.send_data(sid, b"first ", False) == 6
    assert p.codec.send_data(sid, b"second", False) == 6
    p.codec.send_trailers(sid, Headers([(b"grpc-status", b"0"), (b"grpc-message", b"ok")]))
    p.run()
    evs = p.client_side(sid)
    heads = [e for e in evs if isinstance(e, h3e.HeadersReceived)]
    assert heads[0].headers == [(b":status", b"200"), (b"content-type", b"application/grpc")]
    assert not heads[0].stream_ended
    assert b"".join(e.data for e in evs if isinstance(e, h3e.DataReceived)) == b"first second"
    assert heads[1].headers == [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]
    assert heads[1].stream_ended
    assert p.codec.open_streams() == 0  # the stream is forgotten once the response ended
    assert p.codec.send_buffered(sid) == 0  # everything was acknowledged by the client


def test_send_buffered_counts_unacknowledged_bytes() -> None:
    p = Pair()
    sid = p.request()
    p.run()
    assert p.codec is not None
    p.codec.send_headers(sid, Headers([(b":status", b"200")]), False)
    p.codec.send_data(sid, b"z" * 5000, False)
    assert p.codec.send_buffered(sid) >= 5000  # queued, not yet sent
    p.run()
    assert p.codec.send_buffered(sid) == 0
    assert p.codec.send_buffered(9999) == 0


def test_headers_only_response() -> None:
    p = Pair()
    sid = p.request()
    p.run()
    assert p.codec is not None
    p.codec.send_headers(sid, Headers([(b":status", b"204")]), True)
    p.run()
    evs = p.client_side(sid)
    assert len(evs) == 1
    assert isinstance(evs[0], h3e.HeadersReceived)
    assert evs[0].stream_ended


def test_server_reset_reaches_the_client() -> None:
    p = Pair()
    sid = p.request(b"POST", b"/", b"x")
    p.run()
    assert p.codec is not None
    p.codec.reset_stream(sid)
    p.codec.reset_stream(sid)  # twice is harmless
    p.run()
    resets = [e for e in p.client_quic_events if isinstance(e, qe.StreamReset) and e.stream_id == sid]
    assert [r.error_code for r in resets] == [int(ErrorCode.H3_REQUEST_CANCELLED)]
    assert p.codec.open_streams() == 0
    # Sending on a finished stream is swallowed.
    p.codec.send_headers(sid, Headers([(b":status", b"200")]), True)
    assert p.codec.send_data(sid, b"late", True) == 4


def test_trailers_after_an_early_response_are_not_a_new_request() -> None:
    p = Pair()
    sid = p.client.get_next_available_stream_id()
    p.h3.send_headers(
        sid, [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"l"), (b":path", b"/")]
    )
    p.h3.send_data(sid, b"part1", end_stream=False)
    p.run()
    assert p.codec is not None
    p.codec.send_headers(sid, Headers([(b":status", b"413")]), True)  # local reply before the body ended
    # The client sends the rest before it sees the answer (and the STOP_SENDING that comes with it).
    p.h3.send_data(sid, b"part2", end_stream=False)
    p.h3.send_headers(sid, [(b"x-trailer", b"1")], end_stream=True)
    p.run()
    assert [type(e) for e in p.stream_events(sid)] == [HeadersReceived, DataReceived]


# ------------------------------------------------------------------------------------------- GOAWAY


def control_frames(p: Pair) -> list[tuple[int, bytes]]:
    """Frames on the server's control stream as the client received them."""
    assert p.codec is not None
    assert p.codec._h3 is not None
    cid = p.codec._h3._local_control_stream_id
    raw = b"".join(
        e.data for e in p.client_quic_events if isinstance(e, qe.StreamDataReceived) and e.stream_id == cid
    )
    buf = Buffer(data=raw)
    assert buf.pull_uint_var() == 0x00  # control stream type
    frames = []
    while not buf.eof():
        ftype = buf.pull_uint_var()
        length = buf.pull_uint_var()
        frames.append((ftype, buf.pull_bytes(length)))
    return frames


def goaway_ids(p: Pair) -> list[int]:
    return [Buffer(data=payload).pull_uint_var() for t, payload in control_frames(p) if t == FrameType.GOAWAY]


def test_goaway_is_accepted_by_the_client_and_names_the_next_stream() -> None:
    p = Pair()
    a = p.request()
    b = p.request()
    p.run()
    assert p.codec is not None
    p.codec.goaway()
    p.run()
    assert goaway_ids(p) == [b + 4]
    assert a < b
    assert not any(isinstance(e, qe.ConnectionTerminated) for e in p.client_quic_events)
    # In-flight requests are still answered after the GOAWAY.
    for sid in (a, b):
        p.codec.send_headers(sid, Headers([(b":status", b"200")]), True)
    p.run()
    assert all(isinstance(p.client_side(s)[0], h3e.HeadersReceived) for s in (a, b))


def test_goaway_before_any_request() -> None:
    p = Pair()
    assert p.codec is not None
    p.codec.goaway()
    p.run()
    ids = goaway_ids(p)
    assert len(ids) == 1
    assert ids[0] % 4 == 0  # a client-initiated bidirectional stream id (RFC 9114 section 5.2)


def test_goaway_id_never_increases_and_later_requests_are_rejected() -> None:
    p = Pair()
    p.request()
    p.run()
    assert p.codec is not None
    p.codec.goaway()
    p.run()
    late = p.request()  # the aioquic client ignores GOAWAY and opens another stream
    p.run()
    p.codec.goaway()
    p.run()
    first, second = goaway_ids(p)
    assert second <= first
    assert late >= first
    assert not [e for e in p.events if isinstance(e, HeadersReceived) and e.stream_id == late]


def test_no_goaway_before_h3_is_negotiated() -> None:
    cert, key = certificate()
    scfg = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    scfg.certificate = cert
    scfg.private_key = key
    quic: Any = ProxyQuicConnection(
        configuration=scfg,
        original_destination_connection_id=b"12345678",
        stream_window=1,
        connection_window=1,
    )
    codec = Http3ServerCodec(quic)
    codec.goaway()  # nothing to send on, nothing raised
    codec.send_headers(0, Headers([(b":status", b"200")]), True)
    assert codec.send_data(0, b"x", True) == 1
    assert "closed=False" in repr(codec)


# --------------------------------------------------------------------------------------- shutdown


def test_connection_close_becomes_connection_terminated() -> None:
    p = Pair()
    p.request()
    p.run()
    p.client.close(error_code=int(ErrorCode.H3_NO_ERROR), reason_phrase="bye")
    p.settle()
    terms = [e for e in p.events if isinstance(e, ConnectionTerminated)]
    assert terms == [ConnectionTerminated(int(ErrorCode.H3_NO_ERROR), "bye")]
    assert p.codec is not None
    assert p.codec.wants_close


def test_h3_protocol_error_is_a_closing_protocol_failure() -> None:
    p = Pair()
    # A DATA frame on the client's control stream is H3_FRAME_UNEXPECTED (RFC 9114 section 7.2.1).
    assert p.h3._local_control_stream_id is not None
    p.client.send_stream_data(p.h3._local_control_stream_id, b"\x00\x01x")
    p.settle()
    failures = [e for e in p.events if isinstance(e, ProtocolFailure)]
    assert len(failures) == 1
    assert failures[0].close
    assert failures[0].stat == "http3.protocol_error"
    assert p.codec is not None
    assert p.codec.wants_close
    closes = [e for e in p.client_quic_events if isinstance(e, qe.ConnectionTerminated)]
    assert closes
    assert closes[0].error_code == int(ErrorCode.H3_FRAME_UNEXPECTED)
