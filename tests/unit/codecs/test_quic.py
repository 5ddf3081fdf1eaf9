"""``ProxyQuicConnection`` paired in memory with an aioquic client (fake clock, datagrams handed across):
consumption-based MAX_STREAM_DATA / MAX_DATA, 0-RTT stream tracking and the 425 rule, session tickets
(bounded, single use), Retry tokens, and key update / connection-ID change / address change under HTTP/3.

These pin the aioquic private hooks ``microenvoy.codecs.quic`` relies on: an aioquic upgrade that changes
them fails here."""

from __future__ import annotations

import datetime
import functools
import ssl
from collections.abc import Callable
from typing import Any

import pytest
from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.h3 import events as h3e
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header

from microenvoy.codecs.http3 import Http3ServerCodec
from microenvoy.codecs.quic import ProxyQuicConnection, RetryTokens, SessionTicketStore
from microenvoy.core.events import Event, HeadersReceived, ProtocolFailure
from microenvoy.core.headers import Headers
from microenvoy.demo import self_signed

CLIENT_ADDR = ("127.0.0.2", 50000)
SERVER_ADDR = ("127.0.0.1", 443)


@functools.cache
def certificate() -> tuple[Any, Any]:
    return self_signed()


class Pair:
    """An aioquic client and a ``ProxyQuicConnection`` server exchanging datagrams on a fake clock.

    Server events go to ``on_server_event`` (by default an ``Http3ServerCodec``; its neutral events are
    collected in ``events``); client events go to the client's H3 layer when there is one.
    """

    def __init__(
        self,
        *,
        stream_window: int = 65536,
        connection_window: int = 1 << 20,
        store: SessionTicketStore | None = None,
        ticket: tls.SessionTicket | None = None,
        early_data: bool = True,
        h3: bool = True,
        server_cls: type[QuicConnection] = ProxyQuicConnection,
    ) -> None:
        cert, key = certificate()
        self.now = 1000.0
        self.tickets: list[tls.SessionTicket] = []
        ccfg = QuicConfiguration(
            is_client=True,
            alpn_protocols=H3_ALPN,
            server_name="localhost",
            verify_mode=ssl.CERT_NONE,
            session_ticket=ticket,
        )
        self.client = QuicConnection(configuration=ccfg, session_ticket_handler=self.tickets.append)
        scfg = QuicConfiguration(
            is_client=False, alpn_protocols=H3_ALPN, max_data=connection_window, max_stream_data=stream_window
        )
        scfg.certificate = cert
        scfg.private_key = key
        kwargs: dict[str, Any] = {}
        if store is not None:
            kwargs.update(session_ticket_fetcher=store.pop, session_ticket_handler=store.add)
        if server_cls is ProxyQuicConnection:
            kwargs.update(
                stream_window=stream_window, connection_window=connection_window, early_data=early_data
            )
        odcid = self.client.original_destination_connection_id
        self.server: Any = server_cls(configuration=scfg, original_destination_connection_id=odcid, **kwargs)
        self.codec = Http3ServerCodec(self.server) if h3 else None
        self.client_h3: H3Connection | None = None
        self.h3 = h3
        self.events: list[Event] = []
        self.client_events: list[qe.QuicEvent] = []
        self.h3_events: list[h3e.H3Event] = []
        self.on_server_event: Callable[[qe.QuicEvent], None] | None = None
        self.client_addr = CLIENT_ADDR
        self.server_saw_dcids: list[bytes] = []

    def connect(self) -> None:
        self.client.connect(SERVER_ADDR, now=self.now)
        if self.h3:
            self.client_h3 = H3Connection(self.client)

    def handshake(self) -> None:
        self.connect()
        self.run()
        assert any(isinstance(e, qe.HandshakeCompleted) for e in self.client_events)

    def _server_event(self, ev: qe.QuicEvent) -> None:
        if self.on_server_event is not None:
            self.on_server_event(ev)
        if self.codec is not None:
            self.events.extend(self.codec.handle_quic_event(ev))

    def run(self, rounds: int = 100) -> None:
        """Exchange datagrams until both sides are quiet (timers fire on the fake clock when due)."""
        for _ in range(rounds):
            moved = False
            for data, _addr in self.client.datagrams_to_send(now=self.now):
                self.server_saw_dcids.append(
                    pull_quic_header(Buffer(data=data), host_cid_length=8).destination_cid
                )
                self.server.receive_datagram(data, self.client_addr, now=self.now)
                moved = True
            while (sev := self.server.next_event()) is not None:
                self._server_event(sev)
            for data, _addr in self.server.datagrams_to_send(now=self.now):
                self.client.receive_datagram(data, SERVER_ADDR, now=self.now)
                moved = True
            while (cev := self.client.next_event()) is not None:
                self.client_events.append(cev)
                if self.client_h3 is not None:
                    self.h3_events.extend(self.client_h3.handle_event(cev))
            if not moved:
                return
            self.now += 0.005
            for conn in (self.client, self.server):
                timer = conn.get_timer()
                if timer is not None and timer <= self.now:
                    conn.handle_timer(now=self.now)
        raise AssertionError("the pair never went quiet")

    # ----------------------------------------------------------------------------- HTTP/3 helpers
    def request(self, method: bytes, path: bytes = b"/", body: bytes | None = None) -> int:
        assert self.client_h3 is not None
        sid = self.client.get_next_available_stream_id()
        headers = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
            (b":path", path),
        ]
        self.client_h3.send_headers(sid, headers, end_stream=body is None)
        if body is not None:
            self.client_h3.send_data(sid, body, end_stream=True)
        return sid

    def respond(self, sid: int, status: bytes = b"200", body: bytes = b"ok") -> None:
        assert self.codec is not None
        self.codec.send_headers(sid, Headers([(b":status", status)]), False)
        self.codec.send_data(sid, body, True)

    def response(self, sid: int) -> tuple[bytes, bytes]:
        """(status, body) the client's H3 layer saw on ``sid``."""
        status = b""
        body = b""
        for ev in self.h3_events:
            if isinstance(ev, h3e.HeadersReceived) and ev.stream_id == sid and not status:
                status = dict(ev.headers)[b":status"]
            elif isinstance(ev, h3e.DataReceived) and ev.stream_id == sid:
                body += ev.data
        return status, body

    def heads(self) -> list[HeadersReceived]:
        return [e for e in self.events if isinstance(e, HeadersReceived)]


class RawDelivery:
    """Server-side app for raw (non-H3) streams: hands every request-stream byte to the 'front' as the
    HTTP/3 codec does (``delivered``), and counts what arrived."""

    def __init__(self, server: ProxyQuicConnection) -> None:
        self.server = server
        self.received: dict[int, int] = {}

    def __call__(self, ev: qe.QuicEvent) -> None:
        if isinstance(ev, qe.StreamDataReceived) and ev.stream_id % 4 == 0:
            self.server.delivered(ev.stream_id, len(ev.data))
            self.received[ev.stream_id] = self.received.get(ev.stream_id, 0) + len(ev.data)

    @property
    def total(self) -> int:
        return sum(self.received.values())


def raw_pair(**kw: Any) -> tuple[Pair, RawDelivery]:
    p = Pair(h3=False, **kw)
    app = RawDelivery(p.server)
    p.on_server_event = app
    p.handshake()
    return p, app


def idle(p: Pair, seconds: float = 2.0) -> None:
    """Let loss-recovery timers run on the fake clock (the client would retransmit/probe)."""
    end = p.now + seconds
    while p.now < end:
        p.now += 0.1
        for conn in (p.client, p.server):
            timer = conn.get_timer()
            if timer is not None and timer <= p.now:
                conn.handle_timer(now=p.now)
        p.run()


# ------------------------------------------------------------------------------ (a) stream window


def test_max_stream_data_follows_consumption_not_arrival() -> None:
    p, app = raw_pair(stream_window=4096)
    sid = p.client.get_next_available_stream_id()
    p.client.send_stream_data(sid, b"x" * 20000)
    p.run()
    idle(p)
    # Nothing consumed: the client could send exactly the initial window and is blocked.
    assert app.received[sid] == 4096
    assert p.server.unconsumed(sid) == 4096
    assert p.client._streams[sid].max_stream_data_remote == 4096
    assert not p.client._streams[sid].sender.buffer_is_empty
    # The front forwarded 2000 bytes: the limit slides to consumed + window.
    p.server.consumed(sid, 2000)
    p.run()
    idle(p)
    assert app.received[sid] == 6096
    assert p.client._streams[sid].max_stream_data_remote == 6096
    assert p.server.unconsumed(sid) == 4096
    # Small consumptions are batched (a quarter of the window) instead of one frame per byte.
    p.server.consumed(sid, 500)
    p.run()
    assert app.received[sid] == 6096
    p.server.consumed(sid, 600)
    p.run()
    assert app.received[sid] == 6096 + 1100
    # Consuming everything as it comes lets the whole body through.
    for _ in range(20):
        p.server.consumed(sid, p.server.unconsumed(sid))
        p.run()
    assert app.received[sid] == 20000


def test_plain_aioquic_grants_stream_credit_on_arrival() -> None:
    """The premise of the hook: aioquic alone doubles the window as data arrives (if this ever fails,
    aioquic changed and ``ProxyQuicConnection`` may be revisited)."""
    p = Pair(h3=False, stream_window=4096, server_cls=QuicConnection)
    p.handshake()
    sid = p.client.get_next_available_stream_id()
    p.client.send_stream_data(sid, b"x" * 20000)
    p.run()
    idle(p)
    assert p.server._streams[sid].receiver.highest_offset == 20000


def test_unconsumed_accounting() -> None:
    p, _ = raw_pair()
    server: ProxyQuicConnection = p.server
    server.delivered(0, 100)
    server.delivered(4, 50)
    server.delivered(0, 0)
    assert (server.unconsumed(0), server.unconsumed(4), server.unconsumed()) == (100, 50, 150)
    server.consumed(0, 30)
    server.consumed(0, 0)
    server.consumed(8, 10)  # unknown stream: ignored
    assert (server.unconsumed(0), server.unconsumed()) == (70, 120)
    server.consumed(0, 1000)  # more than delivered: clamped
    assert (server.unconsumed(0), server.unconsumed()) == (0, 50)
    server.early_streams.add(4)
    server.release(4)
    assert server.unconsumed() == 0
    assert 4 not in server.early_streams
    assert "unconsumed=0" in repr(server)


# -------------------------------------------------------------------------- (b) connection window


def test_max_data_follows_consumption_not_arrival() -> None:
    p, app = raw_pair(stream_window=65536, connection_window=8192)
    sids = []
    for _ in range(3):
        sid = p.client.get_next_available_stream_id()
        p.client.send_stream_data(sid, b"y" * 10000)
        sids.append(sid)
    p.run()
    idle(p)
    assert app.total == 8192
    assert p.server.unconsumed() == 8192
    assert p.client._remote_max_data == 8192
    # 4000 bytes forwarded (on whichever streams): 4000 more may come, on any stream.
    left = 4000
    for sid in sids:
        n = min(left, p.server.unconsumed(sid))
        p.server.consumed(sid, n)
        left -= n
    p.run()
    idle(p)
    assert app.total == 8192 + 4000
    assert p.client._remote_max_data == 12192


def test_release_returns_an_abandoned_streams_bytes_to_the_connection() -> None:
    p, app = raw_pair(stream_window=65536, connection_window=8192)
    a = p.client.get_next_available_stream_id()
    p.client.send_stream_data(a, b"a" * 8192)
    p.run()
    assert app.total == 8192
    b = p.client.get_next_available_stream_id()
    p.client.send_stream_data(b, b"b" * 5000, end_stream=True)
    p.run()
    idle(p)
    assert app.received.get(b, 0) == 0
    p.server.release(a)  # the exchange on `a` was reset: its unconsumed bytes no longer count
    p.run()
    idle(p)
    assert app.received[b] == 5000


def test_plain_aioquic_grants_connection_credit_on_arrival() -> None:
    p = Pair(h3=False, stream_window=65536, connection_window=8192, server_cls=QuicConnection)
    p.handshake()
    for _ in range(3):
        p.client.send_stream_data(p.client.get_next_available_stream_id(), b"y" * 10000)
    p.run()
    idle(p)
    assert p.server._local_max_data.used == 30000


# ----------------------------------------------------------------------------------------- (c) 0-RTT


def resumed_pair(store: SessionTicketStore, **kw: Any) -> tuple[Pair, tls.SessionTicket]:
    first = Pair(store=store, **kw)
    first.handshake()
    sid = first.request(b"GET")
    first.run()
    heads = first.heads()
    assert [h.early_data for h in heads] == [False]
    assert first.server.early_streams == set()
    first.respond(sid)
    first.run()
    assert first.tickets, "the server issued no session ticket"
    return Pair(store=store, ticket=first.tickets[-1], **kw), first.tickets[-1]


def test_zero_rtt_streams_are_tracked_and_non_idempotent_requests_get_425() -> None:
    store = SessionTicketStore()
    p, ticket = resumed_pair(store)
    assert ticket.max_early_data_size is not None
    p.connect()
    post = p.request(b"POST", b"/order", b"pay once")
    get = p.request(b"GET", b"/menu")
    put = p.request(b"PUT", b"/x", b"idempotent")
    # All three requests leave in the client's first flight, i.e. as 0-RTT.
    p.run()
    done = [e for e in p.client_events if isinstance(e, qe.HandshakeCompleted)]
    assert done
    assert done[0].session_resumed
    assert done[0].early_data_accepted
    assert {post, get, put} <= p.server.early_streams
    heads = p.heads()
    assert [(h.stream_id, h.headers.get(b":method"), h.early_data) for h in heads] == [
        (get, b"GET", True),
        (put, b"PUT", True),
    ]
    failures = [e for e in p.events if isinstance(e, ProtocolFailure)]
    assert failures == [
        ProtocolFailure("downstream_rq_too_early", "non-idempotent request in 0-RTT", False, 425)
    ]
    status, body = p.response(post)
    assert status == b"425"
    assert b"0-RTT" in body
    # The refused request's body is drained and never surfaces as an exchange event.
    assert not [e for e in p.events if getattr(e, "stream_id", None) == post]
    assert p.server.unconsumed(post) == 0
    # The idempotent ones are served normally.
    p.respond(get)
    p.run()
    assert p.response(get) == (b"200", b"ok")


def test_requests_after_the_handshake_are_not_early() -> None:
    store = SessionTicketStore()
    p, _ = resumed_pair(store)
    p.handshake()  # resumed, but nothing sent before the handshake finished
    sid = p.request(b"POST", b"/", b"late")
    p.run()
    assert sid not in p.server.early_streams
    assert [h.early_data for h in p.heads()] == [False]


def test_early_data_disabled_means_no_zero_rtt() -> None:
    store = SessionTicketStore()
    p, ticket = resumed_pair(store, early_data=False)
    assert ticket.max_early_data_size is None  # the ticket does not even offer 0-RTT
    p.connect()
    sid = p.request(b"POST", b"/", b"x")
    p.run()
    done = next(e for e in p.client_events if isinstance(e, qe.HandshakeCompleted))
    assert done.session_resumed
    assert not done.early_data_accepted
    assert p.server.early_streams == set()
    assert [(h.stream_id, h.early_data) for h in p.heads()] == [(sid, False)]


def test_a_replayed_ticket_finds_nothing_full_handshake_no_early_data() -> None:
    store = SessionTicketStore()
    p, ticket = resumed_pair(store)
    p.handshake()
    assert next(e for e in p.client_events if isinstance(e, qe.HandshakeCompleted)).session_resumed
    replay = Pair(store=store, ticket=ticket)
    replay.connect()
    replay.request(b"GET")
    replay.run()
    idle(replay)
    done = next(e for e in replay.client_events if isinstance(e, qe.HandshakeCompleted))
    assert not done.session_resumed
    assert not done.early_data_accepted
    assert replay.server.early_streams == set()
    assert all(not h.early_data for h in replay.heads())


# ---------------------------------------------------------------------------------- (d) Retry tokens

KEY = bytes(range(32))
ODCID = bytes.fromhex("0011223344556677")
RSCID = bytes.fromhex("8899aabbccddeeff")


def test_retry_token_round_trip() -> None:
    tokens = RetryTokens(KEY, lifetime=30)
    token = tokens.create(CLIENT_ADDR, ODCID, RSCID, now=1000.0)
    assert tokens.validate(CLIENT_ADDR, RSCID, token, now=1010.0) == ODCID
    # IPv6 addresses and 16-byte keys work as well.
    tokens16 = RetryTokens(KEY[:16])
    addr6 = ("2001:db8::1", 443, 0, 0)
    assert tokens16.validate(addr6, RSCID, tokens16.create(addr6, ODCID, RSCID, 5.0), 6.0) == ODCID
    # Every token is fresh (random nonce).
    assert tokens.create(CLIENT_ADDR, ODCID, RSCID, 1000.0) != token


def test_retry_token_survives_a_restart_with_the_same_key() -> None:
    before = RetryTokens(KEY)
    token = before.create(CLIENT_ADDR, ODCID, RSCID, now=1000.0)
    after = RetryTokens(bytes(KEY))  # a new process that loaded the same key file
    assert after.validate(CLIENT_ADDR, RSCID, token, now=1001.0) == ODCID


@pytest.mark.parametrize(
    ("addr", "dcid", "now", "match"),
    [
        (("127.0.0.3", 50000), RSCID, 1001.0, "does not verify"),
        (("127.0.0.2", 50001), RSCID, 1001.0, "does not verify"),
        (CLIENT_ADDR, ODCID, 1001.0, "another connection ID"),
        (CLIENT_ADDR, RSCID, 1031.0, "expired"),
        (CLIENT_ADDR, RSCID, 999.0, "expired"),  # issued "in the future": clock went back
    ],
    ids=["other-ip", "other-port", "wrong-dcid", "expired", "from-the-future"],
)
def test_retry_token_rejections(addr: tuple[str, int], dcid: bytes, now: float, match: str) -> None:
    tokens = RetryTokens(KEY, lifetime=30)
    token = tokens.create(CLIENT_ADDR, ODCID, RSCID, now=1000.0)
    with pytest.raises(ValueError, match=match):
        tokens.validate(addr, dcid, token, now)


def test_retry_token_wrong_key() -> None:
    token = RetryTokens(KEY).create(CLIENT_ADDR, ODCID, RSCID, now=1000.0)
    with pytest.raises(ValueError, match="does not verify"):
        RetryTokens(bytes(32)).validate(CLIENT_ADDR, RSCID, token, now=1000.0)


def test_retry_token_tampering_and_garbage() -> None:
    tokens = RetryTokens(KEY)
    token = tokens.create(CLIENT_ADDR, ODCID, RSCID, now=1000.0)
    for i in range(len(token)):
        bad = token[:i] + bytes([token[i] ^ 0x01]) + token[i + 1 :]
        with pytest.raises(ValueError, match=r"malformed|does not verify"):
            tokens.validate(CLIENT_ADDR, RSCID, bad, now=1000.0)
    for junk in (b"", b"\x01", token[:20], b"\x02" + token[1:]):
        with pytest.raises(ValueError, match=r"malformed|does not verify"):
            tokens.validate(CLIENT_ADDR, RSCID, junk, now=1000.0)


def test_retry_token_key_must_be_16_or_32_bytes() -> None:
    with pytest.raises(ValueError, match="16 or 32"):
        RetryTokens(b"short")
    assert repr(RetryTokens(KEY, lifetime=5)) == "<RetryTokens lifetime=5>"


# ---------------------------------------------------------------------------- (e) SessionTicketStore


def make_ticket(label: bytes) -> tls.SessionTicket:
    now = datetime.datetime.now(datetime.UTC)
    return tls.SessionTicket(
        age_add=0,
        cipher_suite=tls.CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=now + datetime.timedelta(hours=1),
        not_valid_before=now,
        resumption_secret=b"s" * 32,
        server_name="localhost",
        ticket=label,
    )


def test_ticket_store_is_single_use() -> None:
    store = SessionTicketStore()
    t = make_ticket(b"t1")
    store.add(t)
    assert len(store) == 1
    assert store.pop(b"t1") is t
    assert store.pop(b"t1") is None
    assert store.pop(b"unknown") is None
    assert (store.issued, store.resumed, len(store)) == (1, 1, 0)


def test_ticket_store_is_bounded_lru() -> None:
    store = SessionTicketStore(capacity=3)
    for i in range(5):
        store.add(make_ticket(b"t%d" % i))
    assert len(store) == 3
    assert store.pop(b"t0") is None
    assert store.pop(b"t1") is None
    assert [store.pop(b"t%d" % i) is not None for i in (2, 3, 4)] == [True, True, True]
    assert store.issued == 5
    assert repr(store) == "<SessionTicketStore 0/3>"


def test_ticket_store_with_zero_capacity_stores_nothing() -> None:
    store = SessionTicketStore(capacity=0)
    store.add(make_ticket(b"t"))
    assert len(store) == 0
    assert store.pop(b"t") is None


def test_ticket_store_single_use_through_a_real_handshake() -> None:
    store = SessionTicketStore(capacity=8)
    p, _ = resumed_pair(store)
    assert len(store) == 1
    p.handshake()
    assert store.resumed == 1
    # The resumed connection got a fresh ticket; the used one is gone.
    assert len(store) == 1
    assert store.issued == 2


# ---------------------------------------------- (f) key update, connection-ID change, address change


def established() -> Pair:
    p = Pair()
    p.handshake()
    sid = p.request(b"GET", b"/first")
    p.run()
    p.respond(sid, body=b"one")
    p.run()
    assert p.response(sid) == (b"200", b"one")
    return p


def round_trip(p: Pair, path: bytes, body: bytes = b"request body") -> None:
    sid = p.request(b"POST", path, body)
    p.run()
    head = next(h for h in p.heads() if h.stream_id == sid)
    assert head.headers.get(b":path") == path
    got = b"".join(e.data for e in p.events if getattr(e, "stream_id", None) == sid and hasattr(e, "data"))
    assert got == body
    p.respond(sid, body=b"reply " + path)
    p.run()
    assert p.response(sid) == (b"200", b"reply " + path)


def test_key_update_keeps_http3_working() -> None:
    p = established()
    one_rtt = tls.Epoch.ONE_RTT
    assert p.client._cryptos[one_rtt].key_phase == 0
    assert p.server._cryptos[one_rtt].key_phase == 0
    p.client.request_key_update()
    round_trip(p, b"/after-update")
    assert p.client._cryptos[one_rtt].key_phase == 1
    assert p.server._cryptos[one_rtt].key_phase == 1
    p.client.request_key_update()
    round_trip(p, b"/after-second-update")
    assert p.server._cryptos[one_rtt].key_phase == 0


def test_client_connection_id_change_keeps_http3_working() -> None:
    p = established()
    host_cids = {c.cid for c in p.server._host_cids}
    old = p.client._peer_cid.cid
    p.client.change_connection_id()
    new = p.client._peer_cid.cid
    assert new != old
    assert new in host_cids
    p.server_saw_dcids.clear()
    round_trip(p, b"/after-cid-change")
    assert set(p.server_saw_dcids) == {new}
    # The server learns that the old one was retired (the listener unregisters it).
    idle(p)
    assert old not in {c.cid for c in p.server._host_cids}


def test_client_address_change_keeps_http3_working() -> None:
    p = established()
    p.client_addr = ("127.0.0.9", 40000)  # NAT rebinding / migration: same connection, new address
    round_trip(p, b"/after-migration")
    idle(p)
    assert p.server._network_paths[0].addr == ("127.0.0.9", 40000)
    assert p.server._network_paths[0].is_validated
