"""The CoAP message layer: piggybacked/separate responses, deduplication, retransmission, bounds."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from microenvoy.codecs.coap.endpoint import EXCHANGE_LIFETIME, MAX_RETRANSMIT, Gone, ServerEndpoint
from microenvoy.codecs.coap.message import ACK, CON, NON, RST, Message, decode, encode

R = ("127.0.0.1", 5000)
Out = list[tuple[bytes, object]]


def ep(**kw: object) -> ServerEndpoint:
    return ServerEndpoint(rng=random.Random(1), **kw)  # type: ignore[arg-type]


def get(mid: int, mtype: int = CON, token: bytes = b"t") -> bytes:
    return encode(Message(mtype, 1, mid, token, ((11, b"x"),)))


def test_piggybacked_response_and_duplicate_from_cache() -> None:
    e, out = ep(), []  # type: ServerEndpoint, Out
    req = e.receive(get(7), R, 0.0, out)
    assert req is not None
    assert out == []
    e.respond(req, 0x45, (), b"hi", 0.1, out)
    ((raw, to),) = out
    m = decode(raw)
    assert (m.mtype, m.code, m.mid, m.token, m.payload, to) == (ACK, 0x45, 7, b"t", b"hi", R)
    out.clear()
    assert e.receive(get(7), R, 1.0, out) is None  # never handed out twice
    assert out == [(raw, R)]
    assert e.stats["duplicate"] == 1


def test_duplicate_while_pending_is_not_a_new_request() -> None:
    e, out = ep(), []  # type: ServerEndpoint, Out
    assert e.receive(get(7), R, 0.0, out) is not None
    assert e.receive(get(7), R, 0.2, out) is None
    assert out == []


def test_separate_response_after_empty_ack() -> None:
    e, out = ep(), []  # type: ServerEndpoint, Out
    req = e.receive(get(9), R, 0.0, out)
    assert req is not None
    e.ack_due(req, out)
    assert decode(out[0][0]) == Message(ACK, 0, 9)
    out.clear()
    assert e.receive(get(9), R, 0.6, out) is None  # duplicate: the empty ACK again
    assert decode(out[0][0]) == Message(ACK, 0, 9)
    out.clear()
    e.respond(req, 0x45, (), b"late", 1.0, out)
    m = decode(out[0][0])
    assert (m.mtype, m.code, m.token, m.payload) == (CON, 0x45, b"t", b"late")
    assert m.mid != 9
    out.clear()
    # not acknowledged: retransmitted with doubling timeouts, then given up
    now = 1.0
    for _ in range(MAX_RETRANSMIT):
        now = e.next_deadline() or now
        e.tick(now, out)
    assert len(out) == MAX_RETRANSMIT
    assert all(raw == out[0][0] for raw, _ in out)
    e.tick(e.next_deadline() or now, out)
    assert e.gone == [Gone(R, b"t", "timeout")]
    assert e.next_deadline() is None


def test_ack_stops_retransmission() -> None:
    e, out = ep(), []  # type: ServerEndpoint, Out
    assert e.notify(R, b"o", 0x45, (), b"n1", confirmable=True, now=0.0, out=out)
    mid = decode(out[0][0]).mid
    out.clear()
    e.receive(encode(Message(ACK, 0, mid)), R, 0.5, out)
    e.tick(100.0, out)
    assert out == []
    assert e.gone == []


def test_rst_to_a_notification_ends_the_observation() -> None:
    e, out = ep(), []  # type: ServerEndpoint, Out
    e.notify(R, b"o", 0x45, (), b"n1", confirmable=False, now=0.0, out=out)
    mid = decode(out[0][0]).mid
    e.receive(encode(Message(RST, 0, mid)), R, 0.5, out)
    assert e.gone == [Gone(R, b"o", "reset")]


def test_ping_gets_rst_and_malformed_con_gets_rst() -> None:
    e, out = ep(), []  # type: ServerEndpoint, Out
    assert e.receive(encode(Message(CON, 0, 3)), R, 0.0, out) is None
    assert decode(out[0][0]) == Message(RST, 0, 3)
    out.clear()
    assert e.receive(bytes.fromhex("49010004") + b"123456789", R, 0.0, out) is None
    assert decode(out[0][0]) == Message(RST, 0, 4)
    out.clear()
    assert e.receive(bytes.fromhex("59010005") + b"123456789", R, 0.0, out) is None  # NON: silently ignored
    assert out == []
    assert e.stats["malformed"] == 2


def test_non_request_gets_non_response() -> None:
    e, out = ep(), []  # type: ServerEndpoint, Out
    req = e.receive(get(5, NON), R, 0.0, out)
    assert req is not None
    e.respond(req, 0x45, (), b"x", 0.0, out)
    assert decode(out[0][0]).mtype == NON


def test_dedup_expires_after_exchange_lifetime() -> None:
    e, out = ep(), []  # type: ServerEndpoint, Out
    req = e.receive(get(1), R, 0.0, out)
    assert req is not None
    e.respond(req, 0x45, (), b"", 0.0, out)
    e.expire(EXCHANGE_LIFETIME + 1)
    assert e.receive(get(1), R, EXCHANGE_LIFETIME + 1, out) is not None


@settings(max_examples=30, deadline=None)
@given(st.integers(16, 64), st.integers(0, 2000))
def test_dedup_is_bounded(limit: int, n: int) -> None:
    e, out = ep(max_dedup=limit), []  # type: ServerEndpoint, Out
    for i in range(n):
        req = e.receive(get(i & 0xFFFF, token=b""), ("127.0.0.1", 1000 + i % 7), float(i), out)
        if req is not None:
            e.respond(req, 0x45, (), b"x" * 10, float(i), out)
    assert len(e._dedup) <= limit
    assert e.stats["dedup_evicted"] == max(0, n - limit)


def test_outstanding_is_bounded() -> None:
    e, out = ep(max_outstanding=2), []  # type: ServerEndpoint, Out
    assert e.notify(R, b"a", 0x45, (), b"", confirmable=True, now=0.0, out=out)
    assert e.notify(R, b"b", 0x45, (), b"", confirmable=True, now=0.0, out=out)
    assert not e.notify(R, b"c", 0x45, (), b"", confirmable=True, now=0.0, out=out)
    assert e.stats["outstanding_overflow"] == 1


def test_newer_notification_replaces_the_outstanding_one() -> None:
    """RFC 7641 §4.5.2: one confirmable notification in flight per observer; counters carry over."""
    e, out = ep(), []  # type: ServerEndpoint, Out
    e.notify(R, b"o", 0x45, (), b"n1", confirmable=True, now=0.0, out=out)
    first = decode(out[0][0]).mid
    e.tick(e.next_deadline() or 0.0, out)  # one retransmission of n1
    assert len(out) == 2
    e.notify(R, b"o", 0x45, (), b"n2", confirmable=True, now=3.0, out=out)
    assert e.stats["replaced"] == 1
    assert len(e._outstanding) == 1
    e.receive(encode(Message(ACK, 0, first)), R, 3.1, out)  # a late ACK of n1 does not stop n2
    assert e.busy(R, b"o")
    out.clear()
    while e.next_deadline() is not None:
        e.tick(e.next_deadline() or 0.0, out)
    assert [decode(raw).payload for raw, _ in out] == [b"n2"] * (MAX_RETRANSMIT - 1)
    assert e.gone == [Gone(R, b"o", "timeout")]
    assert not e.busy(R, b"o")
