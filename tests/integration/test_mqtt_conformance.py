"""The MQTT listener against the MQTT 3.1.1 and 5.0 specifications, with real clients (paho-mqtt,
mosquitto_pub/sub) and a raw-socket client built on the codec's ``MqttClientCodec`` for what real clients
cannot produce: persistent sessions and redelivery with DUP, keepalive and Server Keep Alive, shared
subscriptions, topic aliases both ways, subscription options, Receive Maximum both ways, Maximum Packet Size
both ways, message expiry, will delay, session takeover, ``$``-topics, QoS 2 exactly once, protocol
violations, a TLS listener with the client certificate as principal, and bridging to a grpcio upstream.

The normative statement each test checks is named ``[MQTT-x.x.x-y]`` (OASIS MQTT 5.0 numbering, 3.1.1 where
it differs). "Nothing arrives" is checked with a marker message sent afterwards on the same path: the first
message seen must be the marker.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
import pytest
from peers import configs as C
from peers.agent import Agent
from peers.certs import CertBundle
from peers.common import wait_for
from peers.h2_server import H2Server
from peers.mqtt_clients import MosquittoSub, PahoClient, bridge_message_modules, mosquitto_pub

from microenvoy.codecs.mqtt.codec import MqttClientCodec, encode_packet
from microenvoy.codecs.mqtt.packets import (
    EMPTY_PROPERTIES,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    ProtocolViolation,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MQTT_TYPE = "type.googleapis.com/microenvoy.extensions.filters.network.mqtt_proxy.v1.MqttProxy"
P = TypeVar("P")

MAX_PACKET = 1024
RECEIVE_MAXIMUM = 3
TOPIC_ALIAS_MAXIMUM = 4
MAX_INFLIGHT = 4


# ============================================================================================ raw client
class Closed(Exception):
    """The server closed the connection while a packet was expected."""


class RawClient:
    """A blocking MQTT client on a plain (or TLS) socket: packets are encoded with ``encode_packet`` and
    decoded with ``MqttClientCodec``, so it can send anything, including what the spec forbids."""

    def __init__(self, port: int, version: int = 5, *, tls: ssl.SSLContext | None = None) -> None:
        self.version = version
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.codec = MqttClientCodec(version)
        self.inbox: deque[Packet | ProtocolViolation] = deque()
        self.eof = False
        self.connack: Connack | None = None

    # -- sending ------------------------------------------------------------------------------------
    def send(self, *packets: Packet) -> None:
        self.sock.sendall(b"".join(encode_packet(p, self.version) for p in packets))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def connect(
        self,
        client_id: str,
        *,
        clean: bool = True,
        keepalive: int = 60,
        properties: Properties = EMPTY_PROPERTIES,
        will: Will | None = None,
    ) -> Connack:
        self.send(Connect(self.version, client_id, clean, keepalive, None, None, will, properties))
        self.connack = self.expect(Connack)
        return self.connack

    def subscribe(
        self, *subs: Subscription, packet_id: int = 1, sub_id: int | None = None
    ) -> tuple[int, ...]:
        props = Properties(subscription_identifiers=(sub_id,)) if sub_id else EMPTY_PROPERTIES
        self.send(Subscribe(packet_id, subs, props))
        suback = self.expect(Suback)
        assert suback.packet_id == packet_id
        return suback.reason_codes

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        *,
        packet_id: int = 1,
        retain: bool = False,
        **props: Any,
    ) -> int | None:
        """Publish and complete the QoS flow; the PUBACK/PUBREC reason (None for QoS 0)."""
        properties = Properties(**props) if props else EMPTY_PROPERTIES
        self.send(Publish(topic, payload, qos, retain, False, packet_id if qos else None, properties))
        if qos == 0:
            return None
        if qos == 1:
            ack = self.expect(Puback, set_aside_publish=True)
            assert ack.packet_id == packet_id
            return ack.reason_code
        rec = self.expect(Pubrec, set_aside_publish=True)
        assert rec.packet_id == packet_id
        if rec.reason_code < 0x80:
            self.send(Pubrel(packet_id))
            comp = self.expect(Pubcomp, set_aside_publish=True)
            assert comp.packet_id == packet_id
        return rec.reason_code

    def disconnect(self, reason: int = 0, **props: Any) -> None:
        self.send(Disconnect(reason, Properties(**props) if props else EMPTY_PROPERTIES))
        self.wait_closed()
        self.close()

    # -- receiving ----------------------------------------------------------------------------------
    def _fill(self, deadline: float) -> bool:
        """Read once (until ``deadline``); False on timeout. Sets ``eof`` when the server closed."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except (ConnectionResetError, ssl.SSLError, OSError):
            data = b""
        if not data:
            self.eof = True
            return True
        self.inbox.extend(self.codec.receive_data(data))
        return True

    def recv(self, timeout: float = 5.0) -> Packet:
        """The next packet; ``Closed`` if the server closed first, ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.inbox:
            if self.eof:
                raise Closed("the server closed the connection")
            if not self._fill(deadline):
                raise TimeoutError(f"no packet within {timeout}s")
        item = self.inbox.popleft()
        if isinstance(item, ProtocolViolation):
            raise AssertionError(f"the server sent a malformed packet: {item}")
        return item

    def expect(self, cls: type[P], timeout: float = 5.0, *, set_aside_publish: bool = False) -> P:
        """The next packet, which must be a ``cls``. With ``set_aside_publish`` PUBLISHes received first are
        kept (in order) for the next ``recv`` (an ack may follow deliveries that the same PUBLISH caused)."""
        aside: list[Packet] = []
        try:
            while True:
                packet = self.recv(timeout)
                if set_aside_publish and isinstance(packet, Publish) and cls is not Publish:
                    aside.append(packet)
                    continue
                assert isinstance(packet, cls), f"expected {cls.__name__}, got {packet!r}"
                return packet
        finally:
            self.inbox.extendleft(reversed(aside))

    def wait_closed(self, timeout: float = 5.0) -> list[Packet]:
        """Read until the server closes; returns the packets that came before (the socket is closed)."""
        deadline = time.monotonic() + timeout
        got: list[Packet] = []
        while True:
            while self.inbox:
                item = self.inbox.popleft()
                assert not isinstance(item, ProtocolViolation), item
                got.append(item)
            if self.eof:
                self.close()
                return got
            if not self._fill(deadline):
                raise TimeoutError(f"still open after {timeout}s; received {got!r}")

    def close(self) -> None:
        """Drop the connection without DISCONNECT."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sub(topic_filter: str, qos: int = 0, **options: Any) -> Subscription:
    return Subscription(topic_filter, qos, **options)


def first_publish(c: RawClient, timeout: float = 5.0) -> Publish:
    """The next PUBLISH (acknowledging nothing)."""
    return c.expect(Publish, timeout)


def receive_until_marker(c: RawClient, marker_topic: str, timeout: float = 5.0) -> list[Publish]:
    """PUBLISHes received before the marker (QoS 1 ones are acknowledged)."""
    got: list[Publish] = []
    while True:
        p = c.expect(Publish, timeout)
        if p.qos == 1 and p.packet_id is not None:
            c.send(Puback(p.packet_id))
        if p.topic == marker_topic:
            return got
        got.append(p)


def wait_until(when: float) -> None:
    """Let the clock pass ``when`` (expiry and delay intervals are the spec's, in whole seconds)."""
    wait_for(
        lambda: time.monotonic() >= when, when - time.monotonic() + 5, interval=0.05, message="the clock"
    )


# ============================================================================================= fixtures
def mqtt_listener(name: str, *, tls: dict[str, Any] | None = None, **cfg: Any) -> dict[str, Any]:
    f = {
        "name": "microenvoy.filters.network.mqtt_proxy",
        "typed_config": {"@type": MQTT_TYPE, "stat_prefix": name, **cfg},
    }
    chain: dict[str, Any] = {"filters": [f]}
    if tls is not None:
        chain["transport_socket"] = tls
    return {"name": name, "address": C.socket_address(0, protocol="TCP"), "filter_chains": [chain]}


class GrpcSink:
    """A grpcio server answering any unary method with an empty message; records (method, request bytes,
    metadata). A request whose bytes contain ``deny`` is refused with PERMISSION_DENIED."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []
        self._lock = threading.Lock()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="grpc-sink"),
            options=[("grpc.so_reuseport", 0)],
        )
        self.server.add_generic_rpc_handlers((self,))  # type: ignore[arg-type]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method  # type: ignore[attr-defined]

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
            with self._lock:
                self.calls.append((method, request, md))
            if b"deny" in request:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "denied")
            return b""

        return grpc.unary_unary_rpc_method_handler(handle)

    def requests(self, method: str) -> list[bytes]:
        with self._lock:
            return [r for m, r, _ in self.calls if m == method]

    def stop(self) -> None:
        self.server.stop(grace=None).wait(5)


@pytest.fixture(scope="module")
def grpc_sink() -> Iterator[GrpcSink]:
    s = GrpcSink()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def mq(module_agent: Any, certs: CertBundle, grpc_sink: GrpcSink, h2_server: H2Server) -> Agent:
    limits = {
        "max_packet_size": MAX_PACKET,
        "receive_maximum": RECEIVE_MAXIMUM,
        "topic_alias_maximum": TOPIC_ALIAS_MAXIMUM,
        "max_inflight_messages": MAX_INFLIGHT,
        "max_session_expiry_interval": 3600,
    }
    tls_auth = {
        "principal_from_certificate": "cn",
        "acl": [{"access": "readwrite", "topic": "devices/%u/#"}],
    }
    grpc_routes = [
        {"name": "raw", "match": {"topic_filter": "grpc/raw/{device}"},
         "route": {"cluster": "sink", "timeout": "5s", "grpc": {"method": "/iot.v1.Ingest/Raw"}}},
        {"name": "env", "match": {"topic_filter": "grpc/env/#"},
         "route": {"cluster": "sink", "timeout": "5s",
                   "grpc": {"method": "/iot.v1.Ingest/Envelope", "encoding": "envelope"}}},
        {"name": "h2", "match": {"topic_filter": "h2/{device}"},
         "route": {"cluster": "h2up", "path": "/q2/{device}", "timeout": "5s"}},
    ]  # fmt: skip
    listeners = [
        mqtt_listener("cf", **limits),
        mqtt_listener("ka", max_keepalive=1),
        mqtt_listener("tls", tls=C.downstream_tls(certs, alpn=(), require_client_cert=True), auth=tls_auth),
        mqtt_listener("br", routes=grpc_routes),
        mqtt_listener("lim", maximum_qos=1, retain_available=False),
    ]
    clusters = [C.cluster("sink", grpc_sink.port, http2=True), C.cluster("h2up", h2_server.port, http2=True)]
    config = C.bootstrap(listeners, clusters)
    return module_agent(config, name="mqtt-conformance")


_ids = iter(range(1, 1 << 30))


def cid(prefix: str) -> str:
    """A client id unique in this module (sessions outlive tests)."""
    return f"{prefix}-{next(_ids)}"


def persistent(version: int) -> dict[str, Any]:
    """CONNECT arguments for a session that outlives the connection (v5: Session Expiry 300)."""
    if version == 5:
        return {"clean": False, "properties": Properties(session_expiry_interval=300)}
    return {"clean": False}


# ================================================================================== persistent sessions
@pytest.mark.parametrize("version", [4, 5])
def test_persistent_session_queues_and_redelivers_with_dup(mq: Agent, version: int) -> None:
    """[MQTT-3.1.2-4/5] Clean Start 0 resumes the session, CONNACK Session Present 1 [MQTT-3.2.2-2];
    unacknowledged PUBLISHes are sent again with DUP 1 and PUBRELs again, in order [MQTT-4.4.0-1]
    [MQTT-3.3.1-1]; messages published while offline are delivered [MQTT-3.1.2-5]; Clean Start 1 discards
    the session [MQTT-3.1.2-4] (Session Present 0 [MQTT-3.2.2-1])."""
    port = mq.port("cf")
    name = cid(f"ps{version}")
    topic = f"ps/{name}"
    s = RawClient(port, version)
    assert s.connect(name, **persistent(version)).session_present is False
    assert s.subscribe(sub(f"{topic}/#", 2)) == (2,)
    with RawClient(port, 5) as pub:
        pub.connect(cid("pspub"))
        assert pub.publish(f"{topic}/a", b"a", 1) == 0
        p1 = first_publish(s)  # QoS 1, never acknowledged
        assert pub.publish(f"{topic}/b", b"b", 2, packet_id=2) == 0
        p2 = first_publish(s)
        assert (p1.topic, p1.qos, p1.dup, p2.topic, p2.qos) == (f"{topic}/a", 1, False, f"{topic}/b", 2)
        assert p1.packet_id is not None
        assert p2.packet_id is not None
        s.send(Pubrec(p2.packet_id))
        assert s.expect(Pubrel).packet_id == p2.packet_id  # PUBCOMP never sent
        s.close()
        wait_for(lambda: mq.stat("mqtt.cf.cx_active") <= 1, 10, message="the subscriber's close seen")
        # Offline: queued for the session.
        assert pub.publish(f"{topic}/c", b"c", 1, packet_id=3) == 0
        assert pub.publish(f"{topic}/d", b"d", 2, packet_id=4) == 0
    s = RawClient(port, version)
    assert s.connect(name, **persistent(version)).session_present is True
    redelivered = s.expect(Publish)
    assert (redelivered.topic, redelivered.payload, redelivered.dup) == (f"{topic}/a", b"a", True)
    assert redelivered.packet_id == p1.packet_id
    assert s.expect(Pubrel).packet_id == p2.packet_id
    c = s.expect(Publish)
    d = s.expect(Publish)
    assert [(c.topic, c.qos, c.dup), (d.topic, d.qos, d.dup)] == [
        (f"{topic}/c", 1, False),
        (f"{topic}/d", 2, False),
    ]
    assert c.packet_id is not None
    assert d.packet_id is not None
    s.send(Puback(p1.packet_id), Pubcomp(p2.packet_id), Puback(c.packet_id), Pubrec(d.packet_id))
    assert s.expect(Pubrel).packet_id == d.packet_id
    s.send(Pubcomp(d.packet_id))
    s.disconnect()
    # Clean Start 1: the old session is gone, so is its subscription.
    with RawClient(port, version) as s2:
        props = Properties(session_expiry_interval=300) if version == 5 else EMPTY_PROPERTIES
        assert s2.connect(name, clean=True, properties=props).session_present is False
        s2.disconnect()
    with RawClient(port, version) as s3:
        # v5: the Clean Start 1 session (expiry 300) was kept; v3.1.1: Clean Session 1 ended with it.
        assert s3.connect(name, **persistent(version)).session_present is (version == 5)
        with RawClient(port, 5) as pub:
            pub.connect(cid("pspub"))
            assert pub.publish(f"{topic}/e", b"e", 1) == 0x10  # No matching subscribers [MQTT-3.3.4-?]
        s3.disconnect()


def test_v5_session_expiry_is_honoured(mq: Agent) -> None:
    """A session ends Session Expiry Interval seconds after its connection closed [MQTT-3.1.2-23]; the
    DISCONNECT may lower it [MQTT-3.14.2-?]; a CONNECT with Clean Start 0 afterwards gets Session Present 0
    and no messages."""
    port = mq.port("cf")
    name = cid("exp")
    before = mq.stat("mqtt.cf.sessions_expired")
    with RawClient(port) as s:
        s.connect(name, clean=False, properties=Properties(session_expiry_interval=300))
        assert s.subscribe(sub(f"exp/{name}", 1)) == (1,)
        s.disconnect(session_expiry_interval=1)
    gone_at = time.monotonic() + 1
    with RawClient(port) as pub:
        pub.connect(cid("exppub"))
        assert pub.publish(f"exp/{name}", b"queued", 1) == 0  # the session still exists
    mq.wait_stat("mqtt.cf.sessions_expired", before + 1, timeout=10)
    assert time.monotonic() >= gone_at - 0.1
    with RawClient(port) as s:
        assert (
            s.connect(name, clean=False, properties=Properties(session_expiry_interval=300)).session_present
            is False
        )
        s.send(Pingreq())
        assert isinstance(s.recv(), Pingresp)  # nothing was queued for the new session
        s.disconnect()


def test_v5_disconnect_cannot_set_expiry_after_zero(mq: Agent) -> None:
    """A DISCONNECT with a non-zero Session Expiry Interval after a CONNECT with zero is a Protocol Error
    [MQTT-3.14.2-2]: the server answers DISCONNECT 0x82."""
    with RawClient(mq.port("cf")) as c:
        c.connect(cid("dz"))
        c.send(Disconnect(0, Properties(session_expiry_interval=10)))
        got = c.wait_closed()
    assert got == [Disconnect(0x82)]


# ============================================================================================ keepalive
@pytest.mark.parametrize("version", [4, 5])
def test_silent_client_is_disconnected_after_one_and_a_half_keepalives(mq: Agent, version: int) -> None:
    """No packet within 1.5 x Keep Alive: the server closes the connection [MQTT-3.1.2-22] (3.1.1:
    [MQTT-3.1.2-24]), v5 with DISCONNECT 0x8D first, and publishes the will [MQTT-3.1.2-8]."""
    port = mq.port("cf")
    name = cid(f"ka{version}")
    before = mq.stat("mqtt.cf.keepalive_timeout")
    with RawClient(port, 5) as watcher:
        watcher.connect(cid("kaw"))
        watcher.subscribe(sub(f"kawill/{name}", 1))
        with RawClient(port, version) as c:
            c.connect(name, keepalive=1, will=Will(f"kawill/{name}", b"silent", 1))
            t0 = time.monotonic()
            got = c.wait_closed(timeout=6)
            elapsed = time.monotonic() - t0
        assert got == ([Disconnect(0x8D)] if version == 5 else [])
        assert 1.4 <= elapsed < 4.0, elapsed
        will = first_publish(watcher)
        assert (will.topic, will.payload) == (f"kawill/{name}", b"silent")
    assert mq.stat("mqtt.cf.keepalive_timeout") >= before + 1


def test_server_keep_alive(mq: Agent) -> None:
    """max_keepalive: a v5 client asking for more (or 0) gets Server Keep Alive in CONNACK and must use it
    [MQTT-3.2.2-21]; the server holds it to that value. A v3.1.1 client cannot be told, so its own Keep Alive
    stands (a conformant client pinging at its own interval is not cut off)."""
    port = mq.port("ka")
    with (
        RawClient(port) as v5_zero,
        RawClient(port) as v5_long,
        RawClient(port) as v5_short,
        RawClient(port, 4) as v311,
    ):
        assert v5_zero.connect(cid("sk0"), keepalive=0).properties.server_keep_alive == 1
        assert v5_long.connect(cid("sk60"), keepalive=60).properties.server_keep_alive == 1
        assert v5_short.connect(cid("sk1"), keepalive=1).properties.server_keep_alive is None
        assert v311.connect(cid("sk311"), keepalive=60).reason_code == 0
        t0 = time.monotonic()
        assert v5_zero.wait_closed(6) == [Disconnect(0x8D)]
        assert v5_long.wait_closed(6) == [Disconnect(0x8D)]
        assert time.monotonic() - t0 >= 1.4
        wait_until(t0 + 2.0)
        v311.send(Pingreq())
        assert isinstance(v311.recv(), Pingresp)  # still connected after 1.5 x the server's maximum
        v311.disconnect()


def test_pingreq_keeps_the_connection_alive(mq: Agent) -> None:
    """PINGREQ is answered with PINGRESP [MQTT-3.12.4-1] and counts as activity for the keepalive."""
    with RawClient(mq.port("cf")) as c:
        c.connect(cid("ping"), keepalive=1)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:  # past 1.5 x keepalive, pinging every 0.5 s
            c.send(Pingreq())
            assert isinstance(c.recv(), Pingresp)
            wait_until(time.monotonic() + 0.5)
        c.disconnect()


# ============================================================================================= takeover
@pytest.mark.parametrize("version", [4, 5])
def test_takeover_disconnects_the_first_connection(mq: Agent, version: int) -> None:
    """A second CONNECT with the same Client Identifier: the server disconnects the existing client
    [MQTT-3.1.4-3], v5 with DISCONNECT 0x8E; the session continues (Session Present 1)."""
    port = mq.port("cf")
    name = cid(f"to{version}")
    before = mq.stat("mqtt.cf.sessions_taken_over")
    with RawClient(port, version) as first, RawClient(port, version) as second:
        first.connect(name, **persistent(version))
        assert first.subscribe(sub(f"to/{name}", 1)) == (1,)
        assert second.connect(name, **persistent(version)).session_present is True
        assert first.wait_closed() == ([Disconnect(0x8E)] if version == 5 else [])
        with RawClient(port) as pub:
            pub.connect(cid("topub"))
            assert pub.publish(f"to/{name}", b"x", 1) == 0
        p = first_publish(second)  # the subscription moved with the session
        assert p.topic == f"to/{name}"
        second.send(Puback(p.packet_id or 0))
        second.disconnect()
    assert mq.stat("mqtt.cf.sessions_taken_over") >= before + 1


# ===================================================================================== receive maximum
def test_client_exceeding_our_receive_maximum_gets_0x93(mq: Agent) -> None:
    """CONNACK carries our Receive Maximum; a client with more QoS 2 PUBLISHes unacknowledged than that
    (PUBREC sent, PUBCOMP not yet: no PUBREL from it) is disconnected with 0x93 (section 3.3.4,
    [MQTT-3.3.4-7])."""
    with RawClient(mq.port("cf")) as c:
        assert c.connect(cid("rmin")).properties.receive_maximum == RECEIVE_MAXIMUM
        for pid in range(1, RECEIVE_MAXIMUM + 1):
            c.send(Publish(f"rmin/{pid}", b"x", 2, False, False, pid))
            assert c.expect(Pubrec).packet_id == pid
        c.send(Publish("rmin/over", b"x", 2, False, False, RECEIVE_MAXIMUM + 1))
        assert c.wait_closed() == [Disconnect(0x93)]


def test_client_within_our_receive_maximum_is_served(mq: Agent) -> None:
    """Completing QoS 2 flows frees the quota: more than Receive Maximum messages in sequence are fine."""
    with RawClient(mq.port("cf")) as c:
        c.connect(cid("rmok"))
        for pid in range(1, 2 * RECEIVE_MAXIMUM + 2):
            assert c.publish(f"rmok/{pid}", b"x", 2, packet_id=pid) in (0, 0x10)
        c.disconnect()


@pytest.mark.parametrize("version", [4, 5])
def test_inflight_window_towards_a_client(mq: Agent, version: int) -> None:
    """We never have more unacknowledged QoS 1/2 PUBLISHes to a client than its Receive Maximum
    [MQTT-3.3.4-9] (v3.1.1: our max_inflight_messages); QoS 0 is not limited; each PUBACK lets one more
    out."""
    port = mq.port("cf")
    window = 2 if version == 5 else MAX_INFLIGHT
    topic = cid(f"win{version}")
    with RawClient(port, version) as c, RawClient(port) as pub:
        props = Properties(receive_maximum=2) if version == 5 else EMPTY_PROPERTIES
        c.connect(cid("winc"), properties=props)
        c.subscribe(sub(f"{topic}/#", 1))
        pub.connect(cid("winp"))
        total = window + 3
        for i in range(total):
            assert pub.publish(f"{topic}/{i}", b"m", 1, packet_id=i + 1) == 0
        pub.publish(f"{topic}/marker", b"", 0)
        got = []
        while True:
            p = first_publish(c)
            if p.topic.endswith("/marker"):
                break
            got.append(p)
        assert [p.topic for p in got] == [f"{topic}/{i}" for i in range(window)]
        c.send(Puback(got[0].packet_id or 0))
        nxt = first_publish(c)
        assert nxt.topic == f"{topic}/{window}"  # exactly one more
        for p in [*got[1:], nxt]:
            c.send(Puback(p.packet_id or 0))
        rest = [first_publish(c) for _ in range(total - window - 1)]
        assert [p.topic for p in rest] == [f"{topic}/{i}" for i in range(window + 1, total)]
        for p in rest:
            c.send(Puback(p.packet_id or 0))
        c.disconnect()


# ================================================================================= maximum packet size
@pytest.mark.parametrize("version", [4, 5])
def test_publish_over_our_maximum_packet_size(mq: Agent, version: int) -> None:
    """CONNACK carries Maximum Packet Size; a bigger packet is a violation: v5 DISCONNECT 0x95
    [MQTT-3.2.2-?]/section 3.2.2.3.6, v3.1.1 close; counted."""
    before = mq.stat("mqtt.cf.packet_too_large")
    with RawClient(mq.port("cf"), version) as c:
        ack = c.connect(cid(f"big{version}"))
        if version == 5:
            assert ack.properties.maximum_packet_size == MAX_PACKET
        c.send(Publish("big/x", b"x" * MAX_PACKET, 1, False, False, 1))
        assert c.wait_closed() == ([Disconnect(0x95)] if version == 5 else [])
    mq.wait_stat("mqtt.cf.packet_too_large", before + 1)


def test_messages_over_the_clients_maximum_packet_size_are_not_sent(mq: Agent) -> None:
    """The server MUST NOT send packets larger than the client's Maximum Packet Size; it discards them as if
    delivered [MQTT-3.1.2-24] [MQTT-3.1.2-25]; counted."""
    port = mq.port("cf")
    topic = cid("cmps")
    before = mq.stat("mqtt.cf.dropped_too_large")
    with RawClient(port) as c, RawClient(port) as pub:
        c.connect(cid("cmpsc"), properties=Properties(maximum_packet_size=200))
        c.subscribe(sub(f"{topic}/#", 1))
        pub.connect(cid("cmpsp"))
        assert pub.publish(f"{topic}/big1", b"x" * 300, 1) == 0
        assert pub.publish(f"{topic}/big0", b"x" * 300, 0) is None
        assert pub.publish(f"{topic}/small", b"ok", 1, packet_id=2) == 0
        p = first_publish(c)
        assert (p.topic, p.payload) == (f"{topic}/small", b"ok")
        c.disconnect()
    assert mq.stat("mqtt.cf.dropped_too_large") >= before + 2


# ======================================================================================== topic aliases
def test_topic_alias_client_to_server_with_paho(mq: Agent) -> None:
    """A client may set a Topic Alias with a topic and then send an empty topic with that alias
    (section 3.3.2.3.4); the server resolves it for subscribers (who never see the client's alias)."""
    port = mq.port("cf")
    topic = f"tacs/{cid('t')}"
    with RawClient(port) as s:
        s.connect(cid("tacss"))
        s.subscribe(sub(topic, 0))
        paho = PahoClient(port, version=5, client_id=cid("tacsp"))
        try:
            assert paho.connect() == 0
            assert paho.publish(topic, b"one", 1, properties={"TopicAlias": 1}) == 0
            assert paho.publish("", b"two", 1, properties={"TopicAlias": 1}) == 0
        finally:
            paho.close()
        got = [first_publish(s), first_publish(s)]
    assert [(p.topic, p.payload, p.properties.topic_alias) for p in got] == [
        (topic, b"one", None),
        (topic, b"two", None),
    ]


@pytest.mark.parametrize(
    ("alias", "topic", "reason"),
    [(TOPIC_ALIAS_MAXIMUM + 1, "tabad/x", 0x94), (0, "tabad/x", 0x94), (2, "", 0x82)],
    ids=["over-maximum", "zero", "unknown"],
)
def test_invalid_topic_alias_is_a_disconnect(mq: Agent, alias: int, topic: str, reason: int) -> None:
    """Topic Alias 0 or above our Topic Alias Maximum: DISCONNECT 0x94 [MQTT-3.2.2-17] [MQTT-3.3.2-8]
    [MQTT-3.3.2-9]; an empty topic with an alias that has no mapping: Protocol Error 0x82."""
    with RawClient(mq.port("cf")) as c:
        assert c.connect(cid("tabad")).properties.topic_alias_maximum == TOPIC_ALIAS_MAXIMUM
        c.send(Publish(topic, b"x", 0, properties=Properties(topic_alias=alias)))
        assert c.wait_closed() == [Disconnect(reason)]


def test_topic_alias_server_to_client(mq: Agent) -> None:
    """With the client's Topic Alias Maximum > 0 the server may use aliases, never above that maximum
    [MQTT-3.1.2-26]; the first use carries topic and alias, later ones may carry the alias only; with
    Topic Alias Maximum 0 (absent) none is sent [MQTT-3.1.2-27]."""
    port = mq.port("cf")
    base = f"tasc/{cid('t')}"
    topics = [f"{base}/a", f"{base}/a", f"{base}/b", f"{base}/c", f"{base}/a", f"{base}/c"]
    with RawClient(port) as c, RawClient(port) as plain, RawClient(port) as pub:
        c.connect(cid("tascc"), properties=Properties(topic_alias_maximum=2))
        c.subscribe(sub(f"{base}/#", 0))
        plain.connect(cid("tascplain"))
        plain.subscribe(sub(f"{base}/#", 0))
        pub.connect(cid("tascp"))
        for i, t in enumerate(topics):
            pub.publish(t, str(i).encode(), 0)
        mapping: dict[int, str] = {}
        resolved = []
        for _ in topics:
            p = first_publish(c)
            alias = p.properties.topic_alias
            assert alias is not None
            assert 1 <= alias <= 2
            if p.topic:
                mapping[alias] = p.topic
            else:
                assert alias in mapping, "alias used before it was set"
            resolved.append((mapping[alias], p.payload))
            if p.payload == b"1":
                assert p.topic == "", "the second message to the same topic uses the alias alone"
        assert resolved == [(t, str(i).encode()) for i, t in enumerate(topics)]
        for i, t in enumerate(topics):
            p = first_publish(plain)
            assert (p.topic, p.payload, p.properties.topic_alias) == (t, str(i).encode(), None)


# =================================================================================== subscription options
def test_no_local_and_subscription_identifiers(mq: Agent) -> None:
    """No Local: the client's own PUBLISHes are not sent back to it [MQTT-3.8.3-3]; a Subscription
    Identifier is returned with each matching PUBLISH [MQTT-3.3.4-3], all of them when several subscriptions
    match [MQTT-3.3.4-4]/[MQTT-3.3.4-5]; a PUBLISH to another subscriber carries none of them."""
    port = mq.port("cf")
    base = f"nl/{cid('t')}"
    with RawClient(port) as a, RawClient(port) as b:
        a.connect(cid("nla"))
        b.connect(cid("nlb"))
        assert a.subscribe(sub(f"{base}/#", 1, no_local=True), sub_id=7) == (1,)
        assert a.subscribe(sub(f"{base}/+/deep", 0), packet_id=2, sub_id=9) == (0,)
        assert b.subscribe(sub(f"{base}/#", 0)) == (0,)
        assert a.publish(f"{base}/own", b"own", 1) == 0  # b got it
        assert first_publish(b).topic == f"{base}/own"
        assert b.publish(f"{base}/other", b"x", 1) == 0
        p = first_publish(a)  # not "own": No Local
        assert (p.topic, p.properties.subscription_identifiers) == (f"{base}/other", (7,))
        a.send(Puback(p.packet_id or 0))
        assert b.publish(f"{base}/x/deep", b"y", 1, packet_id=2) == 0
        p = first_publish(a)
        assert p.topic == f"{base}/x/deep"
        assert sorted(p.properties.subscription_identifiers) == [7, 9]
        assert p.qos == 1  # the highest QoS of the overlapping subscriptions [MQTT-3.3.4-2]
        a.send(Puback(p.packet_id or 0))
        own = first_publish(b)
        assert own.properties.subscription_identifiers == ()
        a.disconnect()
        b.disconnect()


def test_retain_as_published_and_retain_handling(mq: Agent) -> None:
    """Retained messages on subscribe carry RETAIN 1 [MQTT-3.3.1-9]; live messages keep RETAIN only with
    Retain As Published [MQTT-3.3.1-12] [MQTT-3.3.1-13]; Retain Handling 0 sends retained messages on every
    subscribe [MQTT-3.3.1-9], 1 only for a new subscription [MQTT-3.3.1-10], 2 never [MQTT-3.3.1-11]."""
    port = mq.port("cf")
    base = f"rap/{cid('t')}"
    marker = f"{base}/zz-marker"
    with RawClient(port) as pub:
        pub.connect(cid("rapp"))
        assert pub.publish(f"{base}/kept", b"old", 1, retain=True) == 0x10

        def check(handling: int, resubscribe_sends: bool) -> None:
            with RawClient(port) as c:
                c.connect(cid(f"rh{handling}"))
                c.subscribe(sub(f"{base}/+", 1, retain_handling=handling))
                pub.publish(marker, b"", 0)
                first = receive_until_marker(c, marker)
                assert [(p.topic, p.retain) for p in first] == (
                    [] if handling == 2 else [(f"{base}/kept", True)]
                )
                c.subscribe(sub(f"{base}/+", 1, retain_handling=handling), packet_id=2)
                pub.publish(marker, b"", 0)
                again = receive_until_marker(c, marker)
                assert [(p.topic, p.retain) for p in again] == (
                    [(f"{base}/kept", True)] if resubscribe_sends else []
                )
                c.disconnect()

        check(0, True)
        check(1, False)
        check(2, False)
        with RawClient(port) as rap, RawClient(port) as norap:
            rap.connect(cid("rap1"))
            norap.connect(cid("rap0"))
            rap.subscribe(sub(f"{base}/live", 0, retain_as_published=True, retain_handling=2))
            norap.subscribe(sub(f"{base}/live", 0, retain_handling=2))
            pub.publish(f"{base}/live", b"now", 0, retain=True)
            assert first_publish(rap).retain is True
            assert first_publish(norap).retain is False
            rap.disconnect()
            norap.disconnect()
        pub.publish(f"{base}/kept", b"", 1, retain=True)  # clears [MQTT-3.3.1-6]
        pub.publish(f"{base}/live", b"", 1, retain=True, packet_id=2)
        pub.disconnect()


def test_retained_cleared_by_empty_payload_v311(mq: Agent) -> None:
    """v3.1.1: a retained message is replaced and cleared by a zero-byte retained PUBLISH [MQTT-3.3.1-10]
    (3.1.1 numbering); new subscribers then get nothing."""
    port = mq.port("cf")
    topic = f"r311/{cid('t')}"
    with RawClient(port, 4) as pub:
        pub.connect(cid("r311p"))
        pub.publish(topic, b"v1", 1, retain=True)
        pub.publish(topic, b"v2", 1, retain=True, packet_id=2)
        with RawClient(port, 4) as c:
            c.connect(cid("r311c"))
            c.subscribe(sub(topic, 1))
            p = first_publish(c)
            assert (p.payload, p.retain) == (b"v2", True)
            c.send(Puback(p.packet_id or 0))
            c.disconnect()
        pub.publish(topic, b"", 1, retain=True, packet_id=3)
        with RawClient(port, 4) as c:
            c.connect(cid("r311c"))
            c.subscribe(sub(topic, 1))
            pub.publish(f"{topic}", b"live", 0)
            p = first_publish(c)
            assert (p.payload, p.retain) == (b"live", False)
            c.disconnect()
        pub.disconnect()


# ============================================================================================ $-topics
def test_dollar_topics_are_not_matched_by_leading_wildcards(mq: Agent) -> None:
    """Topic filters starting with # or + do not match topic names starting with $ [MQTT-4.7.2-1]; a
    filter starting with $ does."""
    port = mq.port("cf")
    tag = cid("d")
    with RawClient(port) as wild, RawClient(port) as plus, RawClient(port) as dollar, RawClient(port) as pub:
        for c in (wild, plus, dollar):
            c.connect(cid("dol"))
        wild.subscribe(sub("#", 0))
        plus.subscribe(sub(f"+/{tag}", 0))
        dollar.subscribe(sub(f"$SYS/{tag}", 0))
        pub.connect(cid("dolp"))
        pub.publish(f"$SYS/{tag}", b"sys", 0)
        pub.publish(f"marker/{tag}", b"m", 0)
        assert first_publish(dollar).topic == f"$SYS/{tag}"
        wild_got = first_publish(wild)
        while wild_got.topic != f"marker/{tag}":  # other tests' traffic may pass; never the $ one
            assert wild_got.topic != f"$SYS/{tag}"
            wild_got = first_publish(wild)
        assert first_publish(plus).topic == f"marker/{tag}"


# ============================================================================ QoS 2 exactly once inbound
@pytest.mark.parametrize("version", [4, 5])
def test_qos2_retransmission_before_pubrel_is_delivered_once(mq: Agent, version: int) -> None:
    """Until PUBREL, a PUBLISH with the same Packet Identifier is answered with PUBREC and not delivered again
    [MQTT-4.3.3-9]/[MQTT-4.3.3-10]; after PUBCOMP the identifier is a new message."""
    port = mq.port("cf")
    topic = f"eo/{cid('t')}"
    with RawClient(port) as s, RawClient(port, version) as c:
        s.connect(cid("eos"))
        s.subscribe(sub(topic, 2))
        c.connect(cid("eoc"))
        c.send(Publish(topic, b"once", 2, False, False, 7))
        assert c.expect(Pubrec).packet_id == 7
        c.send(Publish(topic, b"once", 2, False, True, 7))  # DUP retransmission
        assert c.expect(Pubrec).packet_id == 7
        c.send(Pubrel(7))
        assert c.expect(Pubcomp) == Pubcomp(7)
        c.send(Publish(topic, b"again", 2, False, False, 7))  # the identifier is free again
        assert c.expect(Pubrec).packet_id == 7
        c.send(Pubrel(7))
        assert c.expect(Pubcomp).packet_id == 7
        c.send(Pubrel(99))  # unknown: PUBCOMP 0x92 in v5 [MQTT-3.7.2-?]
        comp = c.expect(Pubcomp)
        assert (comp.packet_id, comp.reason_code) == (99, 0x92 if version == 5 else 0)
        got = []
        for _ in range(2):
            p = first_publish(s)
            got.append(p.payload)
            s.send(Pubrec(p.packet_id or 0))
            s.expect(Pubrel, set_aside_publish=True)
            s.send(Pubcomp(p.packet_id or 0))
        s.send(Pingreq())
        assert isinstance(s.recv(), Pingresp)  # no third copy before it
        assert got == [b"once", b"again"]
        c.disconnect()
        s.disconnect()


# ====================================================================================== message expiry
def test_message_expiry_for_an_offline_session(mq: Agent) -> None:
    """A queued message whose Message Expiry Interval passed is not delivered [MQTT-3.3.2-5]; one that is
    delivered carries the interval minus the time it waited [MQTT-3.3.2-6]."""
    port = mq.port("cf")
    name = cid("mex")
    topic = f"mex/{name}"
    before = mq.stat("mqtt.cf.dropped_expired")
    with RawClient(port) as s:
        s.connect(name, clean=False, properties=Properties(session_expiry_interval=60))
        s.subscribe(sub(f"{topic}/#", 1))
        s.disconnect()
    with RawClient(port) as pub:
        pub.connect(cid("mexp"))
        assert pub.publish(f"{topic}/short", b"s", 1, message_expiry_interval=1) == 0
        t0 = time.monotonic()
        assert pub.publish(f"{topic}/long", b"l", 1, packet_id=2, message_expiry_interval=100) == 0
        pub.disconnect()
    wait_until(t0 + 2.1)
    with RawClient(port) as s:
        assert s.connect(name, clean=False, properties=Properties(session_expiry_interval=0)).session_present
        p = first_publish(s)
        assert p.topic == f"{topic}/long"
        mei = p.properties.message_expiry_interval
        assert mei is not None
        assert mei <= 98
        s.send(Puback(p.packet_id or 0), Pingreq())
        assert isinstance(s.recv(), Pingresp)  # the expired one never comes
        s.disconnect()
    assert mq.stat("mqtt.cf.dropped_expired") >= before + 1


# ======================================================================================== will delay
def will_props(delay: int) -> Properties:
    return Properties(will_delay_interval=delay)


def test_will_delay_interval(mq: Agent) -> None:
    """The will is published Will Delay Interval after the connection closed [MQTT-3.1.3-9]; a reconnect to
    the session before then cancels it; a session ending sooner publishes it at once (section 3.1.3.2.2);
    a DISCONNECT 0x00 discards it [MQTT-3.1.2-10], 0x04 sends it."""
    port = mq.port("cf")
    base = f"wd/{cid('t')}"
    marker = f"{base}/zz-marker"
    with RawClient(port) as watcher, RawClient(port) as pub:
        watcher.connect(cid("wdw"))
        watcher.subscribe(sub(f"{base}/#", 0))
        pub.connect(cid("wdp"))
        persistent5 = Properties(session_expiry_interval=30)
        # 1) delayed
        delayed = RawClient(port)
        delayed.connect(
            cid("wd1"), properties=persistent5, will=Will(f"{base}/delayed", b"d", 0, False, will_props(1))
        )
        # 2) cancelled by a reconnect in time
        name = cid("wd2")
        cancelled = RawClient(port)
        cancelled.connect(
            name, properties=persistent5, will=Will(f"{base}/cancelled", b"c", 0, False, will_props(1))
        )
        # 3) session expiry 0 ends the session before the delay: published at once
        ends = RawClient(port)
        ends.connect(cid("wd3"), will=Will(f"{base}/ends", b"e", 0, False, will_props(100)))
        # 4) DISCONNECT 0x00 discards it, 5) DISCONNECT 0x04 sends it
        normal = RawClient(port)
        normal.connect(cid("wd4"), will=Will(f"{base}/normal", b"n", 0))
        withwill = RawClient(port)
        withwill.connect(cid("wd5"), will=Will(f"{base}/withwill", b"w", 0))
        t0 = time.monotonic()
        for c in (delayed, cancelled, ends):
            c.close()
        normal.disconnect(0)
        withwill.disconnect(0x04)
        again = RawClient(port)
        assert again.connect(name, clean=False, properties=persistent5).session_present
        pub.publish(marker, b"", 0)
        early = receive_until_marker(watcher, marker)
        assert sorted(p.topic for p in early) == [f"{base}/ends", f"{base}/withwill"]
        p = first_publish(watcher, timeout=5)
        assert (p.topic, p.payload) == (f"{base}/delayed", b"d")
        assert time.monotonic() - t0 >= 0.9
        wait_until(t0 + 1.3)
        pub.publish(marker, b"", 0)
        assert receive_until_marker(watcher, marker) == []  # the cancelled one never came
        again.disconnect()


# ================================================================================ shared subscriptions
def test_shared_subscription_delivers_each_message_to_one_member(mq: Agent) -> None:
    """$share/<group>/<filter>: each message goes to exactly one member of the group [MQTT-4.8.2-?]
    (section 4.8.2), while a normal subscriber gets every message; members may be v5 or v3.1.1 clients."""
    port = mq.port("cf")
    base = f"sh/{cid('t')}"
    members = [
        PahoClient(port, version=5, client_id=cid("sh5")),
        PahoClient(port, version=4, client_id=cid("sh4")),
    ]
    everyone = PahoClient(port, version=5, client_id=cid("shall"))
    try:
        for m in members:
            assert m.connect() == 0
            assert m.subscribe(f"$share/g1/{base}/#", 1) == [1]
        assert everyone.connect() == 0
        assert everyone.subscribe(f"{base}/#", 1) == [1]
        n = 10
        with RawClient(port) as pub:
            pub.connect(cid("shp"))
            for i in range(n):
                assert pub.publish(f"{base}/{i}", str(i).encode(), 1, packet_id=i + 1) == 0
        assert len(everyone.wait_messages(n)) == n
        wait_for(lambda: sum(len(m.messages) for m in members) >= n, 10, message="shared deliveries")
        got = [msg.payload for m in members for msg in m.messages]
        assert sorted(got, key=int) == [str(i).encode() for i in range(n)]  # each exactly once
        assert all(m.messages for m in members), "both members get a share"
    finally:
        for c in (*members, everyone):
            c.close()


# ============================================================================== malformed and violations
def _patched(packet: Packet, version: int, first: int) -> bytes:
    data = encode_packet(packet, version)
    return bytes((first,)) + data[1:]


def _publish_raw_topic(topic: bytes, version: int) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (b"\x00" if version == 5 else b"") + b"payload"
    return bytes((0x30, len(body))) + body


# name -> (bytes for the version, v5 DISCONNECT reason)
VIOLATIONS: dict[str, tuple[Callable[[int], bytes], int]] = {
    "subscribe-reserved-flags": (
        lambda v: _patched(Subscribe(1, (sub("a"),)), v, 0x80),
        0x81,
    ),  # [MQTT-2.1.3-1]
    "pubrel-reserved-flags": (lambda v: _patched(Pubrel(1), v, 0x60), 0x81),  # [MQTT-3.6.1-1]
    "topic-bad-utf8": (lambda v: _publish_raw_topic(b"a/\xff", v), 0x81),  # [MQTT-1.5.4-1]
    "topic-surrogate": (lambda v: _publish_raw_topic(b"a/\xed\xa0\x80", v), 0x81),  # [MQTT-1.5.4-1]
    "topic-nul": (lambda v: _publish_raw_topic(b"a/\x00", v), 0x81),  # [MQTT-1.5.4-2]
    "second-connect": (lambda v: encode_packet(Connect(v, "again"), v), 0x82),  # [MQTT-3.1.0-2]
    "publish-wildcard-topic": (lambda v: encode_packet(Publish("a/+/b", b"x"), v), 0x90),  # [MQTT-3.3.2-2]
    "subscribe-no-filters": (lambda v: encode_packet(Subscribe(1, ()), v), 0x82),  # [MQTT-3.8.3-2]
    "unsubscribe-no-filters": (lambda v: _patched(Subscribe(1, ()), v, 0xA2), 0x82),  # [MQTT-3.10.3-2]
    "subscribe-bad-filter": (
        lambda v: encode_packet(Subscribe(1, (sub("a/#/b"),)), v),
        0x81,
    ),  # [MQTT-4.7.1-1]
    "publish-qos3": (lambda v: _patched(Publish("a", b"x", 1, packet_id=1), v, 0x36), 0x81),  # [MQTT-3.3.1-4]
    "publish-packet-id-0": (
        lambda v: encode_packet(Publish("a", b"x", 1, packet_id=0), v),
        0x82,
    ),  # [MQTT-2.2.1-3]
    "server-packet-connack": (lambda v: encode_packet(Connack(False, 0), v), 0x82),
    "reserved-type-0": (lambda v: b"\x00\x00", 0x81),
    "remaining-length-5-bytes": (lambda v: b"\x30\xff\xff\xff\xff\x7f", 0x81),  # section 1.5.5
    "remaining-length-not-minimal": (lambda v: b"\xc0\x80\x00", 0x81),  # [MQTT-1.5.5-1]
    "pingreq-with-body": (lambda v: b"\xc0\x01\x00", 0x81),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
@pytest.mark.parametrize("version", [4, 5])
def test_protocol_violation_closes_the_connection(mq: Agent, version: int, case: str) -> None:
    """A protocol violation closes the network connection [MQTT-4.8.0-1] (3.1.1: section 4.8): MQTT 5 sends
    DISCONNECT with the reason code first [MQTT-4.13.1-1]; it is counted."""
    make, reason = VIOLATIONS[case]
    counter = "mqtt.cf.malformed" if reason == 0x81 else "mqtt.cf.protocol_error"
    before = mq.stat(counter)
    with RawClient(mq.port("cf"), version) as c:
        c.connect(cid("bad"))
        c.send_raw(make(version))
        got = c.wait_closed()
    assert got == ([Disconnect(reason)] if version == 5 else [])
    mq.wait_stat(counter, before + 1)


def test_v5_payload_format_invalid(mq: Agent) -> None:
    """Payload Format Indicator 1 with a payload that is not UTF-8: 0x99 (section 3.3.2.3.2)."""
    with RawClient(mq.port("cf")) as c:
        c.connect(cid("pfi"))
        c.send(Publish("pfi/x", b"\xff\xfe", 1, False, False, 1, Properties(payload_format_indicator=1)))
        got = c.wait_closed()
    assert got in ([Disconnect(0x99)], [Puback(1, 0x99)])


@pytest.mark.parametrize(
    ("version", "client_id", "clean", "expected"),
    [(4, "", False, 0x02), (5, "", False, 0x85)],
)
def test_empty_client_id_without_clean_start_is_refused(
    mq: Agent, version: int, client_id: str, clean: bool, expected: int
) -> None:
    """An empty Client Identifier needs Clean Start 1: v3.1.1 CONNACK 0x02 [MQTT-3.1.3-8], v5 0x85
    [MQTT-3.1.3-8]; then the connection is closed [MQTT-3.2.2-5]."""
    with RawClient(mq.port("cf"), version) as c:
        props = Properties(session_expiry_interval=10) if version == 5 else EMPTY_PROPERTIES
        ack = c.connect(client_id, clean=clean, properties=props)
        assert (ack.reason_code, ack.session_present) == (expected, False)
        assert c.wait_closed() == []


def test_v5_assigned_client_identifier(mq: Agent) -> None:
    """An empty Client Identifier with Clean Start 1 gets an Assigned Client Identifier in CONNACK
    [MQTT-3.1.3-6] [MQTT-3.2.2-16]; v3.1.1 is accepted too [MQTT-3.1.3-6]."""
    with RawClient(mq.port("cf")) as c:
        ack = c.connect("")
        assert ack.reason_code == 0
        assert ack.properties.assigned_client_identifier
        c.disconnect()
    with RawClient(mq.port("cf"), 4) as c:
        assert c.connect("").reason_code == 0
        c.disconnect()


@pytest.mark.parametrize(
    ("name", "level", "connack"), [(b"MQTT", 6, 0x01), (b"MQIsdp", 3, 0x01), (b"MQTT", 3, 0x01)]
)
def test_unsupported_protocol_level(mq: Agent, name: bytes, level: int, connack: int) -> None:
    """An unsupported protocol level is answered with CONNACK 0x01 (3.1.1 form) and closed [MQTT-3.1.2-2]."""
    body = len(name).to_bytes(2, "big") + name + bytes((level, 0x02)) + b"\x00\x3c" + b"\x00\x01x"
    with RawClient(mq.port("cf"), 4) as c:
        c.send_raw(bytes((0x10, len(body))) + body)
        assert c.wait_closed() == [Connack(False, connack)]


def test_connect_reserved_flag_closes(mq: Agent) -> None:
    """The CONNECT reserved flag must be 0, else the connection is closed [MQTT-3.1.2-3]."""
    with RawClient(mq.port("cf"), 4) as c:
        c.send_raw(_patched(Connect(4, "rf"), 4, 0x10).replace(b"MQTT\x04\x02", b"MQTT\x04\x03", 1))
        assert c.wait_closed() == []


# ================================================================================================= TLS
def test_tls_client_certificate_is_the_principal(mq: Agent, certs: CertBundle) -> None:
    """On a TLS listener with principal_from_certificate: cn, the client certificate's CN (client-1) is the
    principal: the ACL devices/%u/# lets it publish and subscribe under devices/client-1/ only."""
    port = mq.port("tls")
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    ctx.load_cert_chain(certs.client_cert, certs.client_key)
    with RawClient(port, 5, tls=ctx) as c:
        assert c.connect(cid("tls")).reason_code == 0
        assert c.subscribe(sub("devices/client-1/#", 1), sub("devices/other/#", 1)) == (1, 0x87)
        assert c.publish("devices/client-1/t", b"ok", 1) == 0
        p = first_publish(c)
        assert (p.topic, p.payload) == ("devices/client-1/t", b"ok")
        c.send(Puback(p.packet_id or 0))
        assert c.publish("devices/other/t", b"no", 1, packet_id=2) == 0x87
        c.disconnect()
    # Real clients, both versions.
    with MosquittoSub(
        port, ["devices/client-1/#"], version=4, qos=1, count=1, tls=certs, client_cert=True
    ) as s:
        assert s.granted == [1]
        r = mosquitto_pub(port, "devices/client-1/x", b"v", version=5, qos=1, tls=certs, client_cert=True)
        assert r.ok, r.output
        assert [(m.topic, m.payload) for m in s.wait_messages(1)] == [("devices/client-1/x", b"v")]
    denied = mosquitto_pub(port, "devices/client-2/x", b"v", version=5, qos=1, tls=certs, client_cert=True)
    assert denied.ack_reason == 0x87


def test_tls_without_a_client_certificate_is_refused(mq: Agent, certs: CertBundle) -> None:
    """require_client_certificate: no certificate, no MQTT session."""
    r = mosquitto_pub(mq.port("tls"), "devices/client-1/x", b"v", version=5, qos=1, tls=certs, timeout=10)
    assert r.returncode != 0
    assert r.connack is None


# ====================================================================================== gRPC bridging
@pytest.mark.parametrize("version", [4, 5])
def test_bridge_to_grpc_raw_and_envelope(mq: Agent, grpc_sink: GrpcSink, version: int) -> None:
    """Bridged QoS 1 PUBLISHes become unary gRPC calls to a grpcio server: ``raw`` sends the payload as the
    request message, ``envelope`` a microenvoy.bridge.v1.Message; the PUBACK comes after the upstream's OK,
    and a gRPC PERMISSION_DENIED is a v5 PUBACK 0x87 / a v3.1.1 close."""
    port = mq.port("br")
    device = cid(f"g{version}")
    raw_before = len(grpc_sink.requests("/iot.v1.Ingest/Raw"))
    r = mosquitto_pub(port, f"grpc/raw/{device}", b"\x00\x01raw", version=version, qos=1, client_id=device)
    assert r.ok, r.output
    assert grpc_sink.requests("/iot.v1.Ingest/Raw")[raw_before:] == [b"\x00\x01raw"]
    r = mosquitto_pub(
        port, f"grpc/env/{device}/t", b"payload", version=version, qos=1, client_id=device,
        properties=[("publish", "content-type", "text/plain")] if version == 5 else [],
    )  # fmt: skip
    assert r.ok, r.output
    pb2 = bridge_message_modules()
    envelopes = [pb2.Message.FromString(b) for b in grpc_sink.requests("/iot.v1.Ingest/Envelope")]
    env = next(e for e in envelopes if e.topic == f"grpc/env/{device}/t")
    assert (env.payload, env.qos, env.client_id, env.retain) == (b"payload", 1, device, False)
    if version == 5:
        assert env.content_type == "text/plain"
    denied = mosquitto_pub(
        port, f"grpc/raw/{device}", b"deny", version=version, qos=1, client_id=device, timeout=10
    )
    if version == 5:
        assert denied.ack_reason == 0x87
    else:
        assert denied.ack_reason is None  # never acknowledged: the connection was closed
        assert denied.returncode != 0


def test_bridged_qos2_retransmission_reaches_the_upstream_once(mq: Agent, h2_server: H2Server) -> None:
    """QoS 2 to a bridge route (HTTP/2 upstream): the PUBREC comes after the upstream's 2xx; a DUP
    retransmission before PUBREL is answered again without a second upstream request [MQTT-4.3.3-10]."""
    device = cid("q2")
    with RawClient(mq.port("br")) as c:
        c.connect(device)
        publish = Publish(f"h2/{device}", device.encode(), 2, False, False, 5)
        c.send(publish)
        assert c.expect(Pubrec) == Pubrec(5)
        c.send(Publish(publish.topic, publish.payload, 2, False, True, 5))
        assert c.expect(Pubrec) == Pubrec(5)
        c.send(Pubrel(5))
        assert c.expect(Pubcomp) == Pubcomp(5)
        c.disconnect()
    assert h2_server.count(f"/q2/{device}") == 1


# ======================================================================== message properties, (un)subscribe
def test_message_properties_are_forwarded_unaltered(mq: Agent) -> None:
    """Payload Format Indicator, Content Type, Response Topic, Correlation Data and User Properties (in
    order) reach the subscriber unaltered [MQTT-3.3.2-4] [MQTT-3.3.2-15]..[MQTT-3.3.2-20] [MQTT-3.3.2-18]."""
    port = mq.port("cf")
    topic = f"props/{cid('t')}"
    user = (("b", "2"), ("a", "1"), ("a", "0"))
    with RawClient(port) as s, RawClient(port) as pub:
        s.connect(cid("props"))
        s.subscribe(sub(topic, 1))
        pub.connect(cid("propp"))
        assert (
            pub.publish(
                topic,
                "héllo".encode(),
                1,
                payload_format_indicator=1,
                content_type="text/plain; charset=utf-8",
                response_topic="props/reply",
                correlation_data=b"\x00corr",
                user_properties=user,
            )
            == 0
        )
        p = first_publish(s).properties
        assert (p.payload_format_indicator, p.content_type, p.response_topic, p.correlation_data) == (
            1,
            "text/plain; charset=utf-8",
            "props/reply",
            b"\x00corr",
        )
        assert p.user_properties == user
        s.disconnect()


@pytest.mark.parametrize("version", [4, 5])
def test_unsubscribe_and_subscription_replacement(mq: Agent, version: int) -> None:
    """A repeated SUBSCRIBE to the same filter replaces the subscription (new maximum QoS) [MQTT-3.8.4-3];
    delivered QoS is the minimum of published and granted [MQTT-3.8.4-8]; UNSUBACK answers UNSUBSCRIBE with
    the same Packet Identifier [MQTT-3.10.4-4], v5 with 0x00 / 0x11 No subscription existed, and no message
    is sent on the removed subscription [MQTT-3.10.4-1]."""
    port = mq.port("cf")
    topic = f"unsub/{cid('t')}"
    marker = f"{topic}-marker"
    with RawClient(port, version) as s, RawClient(port) as pub:
        s.connect(cid("uns"))
        pub.connect(cid("unp"))
        assert s.subscribe(sub(topic, 2), sub(marker, 0)) == (2, 0)
        assert pub.publish(topic, b"q2", 2) == 0
        assert first_publish(s).qos == 2
        s.send(Pubrec(1))
        assert s.expect(Pubrel).packet_id == 1
        s.send(Pubcomp(1))
        assert s.subscribe(sub(topic, 1), packet_id=2) == (1,)  # replaced, not added
        assert pub.publish(topic, b"q2 again", 2, packet_id=2) == 0
        p = first_publish(s)
        assert (p.payload, p.qos) == (b"q2 again", 1)
        s.send(Puback(p.packet_id or 0))
        pub.publish(marker, b"", 0)
        assert receive_until_marker(s, marker) == []  # one copy only
        s.send(Unsubscribe(9, (topic, f"{topic}/never")))
        unsuback = s.expect(Unsuback)
        assert unsuback.packet_id == 9
        if version == 5:
            assert unsuback.reason_codes == (0x00, 0x11)
        assert pub.publish(topic, b"gone", 1, packet_id=3) == 0x10
        pub.publish(marker, b"", 0)
        assert receive_until_marker(s, marker) == []
        s.disconnect()


def test_retained_message_expires(mq: Agent) -> None:
    """A retained message whose Message Expiry Interval passed is no longer sent to new subscribers
    [MQTT-3.3.2-5]; one still valid carries the remaining interval."""
    port = mq.port("cf")
    base = f"rexp/{cid('t')}"
    with RawClient(port) as pub:
        pub.connect(cid("rexpp"))
        pub.publish(f"{base}/short", b"s", 1, retain=True, message_expiry_interval=1)
        t0 = time.monotonic()
        pub.publish(f"{base}/long", b"l", 1, packet_id=2, retain=True, message_expiry_interval=100)
        wait_until(t0 + 2.1)
        with RawClient(port) as s:
            s.connect(cid("rexps"))
            s.subscribe(sub(f"{base}/+", 0))
            pub.publish(f"{base}/zz", b"", 0)
            got = receive_until_marker(s, f"{base}/zz")
            assert [p.topic for p in got] == [f"{base}/long"]
            assert (got[0].properties.message_expiry_interval or 100) <= 98
            s.disconnect()
        pub.publish(f"{base}/long", b"", 1, retain=True, packet_id=3)
        pub.disconnect()


# =========================================================================== Maximum QoS, Retain Available
def test_maximum_qos_and_retain_available(mq: Agent) -> None:
    """maximum_qos 1 / retain_available false: CONNACK says Maximum QoS 1 and Retain Available 0
    [MQTT-3.2.2-9]; a SUBSCRIBE for QoS 2 is granted QoS 1; a QoS 2 PUBLISH is DISCONNECT 0x9B
    [MQTT-3.2.2-11]; a retained PUBLISH is DISCONNECT 0x9A [MQTT-3.2.2-14]; v3.1.1 subscribers are granted
    QoS 1 and a QoS 2 PUBLISH is delivered with the granted QoS (3.1.1 has no Maximum QoS)."""
    port = mq.port("lim")
    with RawClient(port) as c:
        ack = c.connect(cid("lim"))
        assert (ack.properties.maximum_qos, ack.properties.retain_available) == (1, 0)
        assert c.subscribe(sub("lim/#", 2)) == (1,)
        c.send(Publish("lim/x", b"x", 2, False, False, 1))
        assert c.wait_closed() == [Disconnect(0x9B)]
    with RawClient(port) as c:
        c.connect(cid("lim"))
        c.send(Publish("lim/x", b"x", 0, True))
        assert c.wait_closed() == [Disconnect(0x9A)]
    with RawClient(port, 4) as c:
        c.connect(cid("lim4"))
        assert c.subscribe(sub("lim4/#", 2)) == (1,)
        c.disconnect()


@pytest.mark.parametrize(
    "props",
    [
        Properties(receive_maximum=0),
        Properties(maximum_packet_size=0),
    ],
    ids=["receive-maximum-0", "maximum-packet-size-0"],
)
def test_connect_property_protocol_errors(mq: Agent, props: Properties) -> None:
    """Receive Maximum 0 or Maximum Packet Size 0 in CONNECT is a Protocol Error (sections 3.1.2.11.3,
    3.1.2.11.4): CONNACK 0x82 and close [MQTT-3.2.2-?]."""
    with RawClient(mq.port("cf")) as c:
        c.send(Connect(5, cid("cpe"), True, 60, None, None, None, props))
        assert c.wait_closed() == [Connack(False, 0x82)]


@pytest.mark.parametrize("version", [4, 5])
def test_takeover_publishes_the_old_connections_will(mq: Agent, version: int) -> None:
    """The taken-over connection is closed as by the server, not by a DISCONNECT 0x00: its will (no delay)
    is published [MQTT-3.1.2-8]; the new connection's will is kept."""
    port = mq.port("cf")
    name = cid(f"tow{version}")
    with RawClient(port) as watcher:
        watcher.connect(cid("toww"))
        watcher.subscribe(sub(f"towill/{name}/#", 0))
        with RawClient(port, version) as first, RawClient(port, version) as second:
            first.connect(name, will=Will(f"towill/{name}/first", b"1"))
            second.connect(name, will=Will(f"towill/{name}/second", b"2"))
            first.wait_closed()
            p = first_publish(watcher)
            assert (p.topic, p.payload) == (f"towill/{name}/first", b"1")
            second.disconnect()
        with RawClient(port) as pub:
            pub.connect(cid("towp"))
            pub.publish(f"towill/{name}/marker", b"", 0)
        assert receive_until_marker(watcher, f"towill/{name}/marker") == []  # DISCONNECT 0x00: no will


def test_topic_aliases_do_not_survive_the_connection(mq: Agent) -> None:
    """Topic Alias mappings belong to one network connection [MQTT-3.3.2-7]: after a reconnect to the same
    session the server sends the topic again, and an alias the client set before is unknown (0x82)."""
    port = mq.port("cf")
    name = cid("tareset")
    topic = f"tareset/{name}"
    props = Properties(topic_alias_maximum=2, session_expiry_interval=30)
    with RawClient(port) as pub:
        pub.connect(cid("tarp"))
        with RawClient(port) as c:
            c.connect(name, clean=False, properties=props)
            c.subscribe(sub(topic, 0))
            c.send(Publish(f"{topic}-set", b"set", 0, properties=Properties(topic_alias=1)))
            pub.publish(topic, b"1", 0)
            pub.publish(topic, b"2", 0)
            a, b = first_publish(c), first_publish(c)
            assert (a.topic, a.properties.topic_alias, b.topic) == (topic, 1, "")
            c.close()
        with RawClient(port) as c:
            assert c.connect(name, clean=False, properties=props).session_present
            pub.publish(topic, b"3", 0)
            p = first_publish(c)
            assert (p.topic, p.payload) == (topic, b"3")  # the topic again, not the old alias alone
            c.send(Publish("", b"old alias", 0, properties=Properties(topic_alias=1)))
            assert c.wait_closed() == [Disconnect(0x82)]


# ================================================================================ topic filter matching
MATCHING = {
    # filter -> topics (of TOPICS below) it matches; the examples of section 4.7.1
    "sport/#": {
        "sport",
        "sport/",
        "sport/tennis",
        "sport/tennis/player1",
        "sport/tennis/player1/ranking",
        "sport//x",
    },
    "sport/tennis/#": {"sport/tennis", "sport/tennis/player1", "sport/tennis/player1/ranking"},
    "sport/tennis/+": {"sport/tennis/player1"},
    "sport/+": {"sport/", "sport/tennis"},
    "+/+": {"/finance", "sport/", "sport/tennis", "Sport/tennis"},
    "/+": {"/finance"},
    "+": {"sport"},
    "sport//x": {"sport//x"},
    "+/+/+": {"sport//x", "sport/tennis/player1"},
}
TOPICS = ["sport", "sport/", "sport/tennis", "sport/tennis/player1", "sport/tennis/player1/ranking",
          "/finance", "sport//x"]  # fmt: skip


@pytest.mark.parametrize("version", [4, 5])
def test_topic_filter_matching(mq: Agent, version: int) -> None:
    """'#' matches the parent and any number of levels [MQTT-4.7.1-2]; '+' matches exactly one level, which
    may be empty [MQTT-4.7.1-3]; topic names and filters are case sensitive, levels may be empty (4.7.3)."""
    port = mq.port("cf")
    ns = cid(f"m{version}")
    clients: dict[str, RawClient] = {}
    try:
        with RawClient(port) as pub:
            pub.connect(cid("mp"))
            for f in MATCHING:
                c = clients[f] = RawClient(port, version)
                c.connect(cid("ms"))
                assert c.subscribe(sub(f"{ns}/{f}", 0), sub(f"{ns}-marker", 0)) == (0, 0)
            for t in [*TOPICS, "Sport/tennis"]:
                pub.publish(f"{ns}/{t}", b"", 0)
            pub.publish(f"{ns}-marker", b"", 0)
            for f, c in clients.items():
                got = {p.topic.removeprefix(f"{ns}/") for p in receive_until_marker(c, f"{ns}-marker")}
                assert got == MATCHING[f], f
    finally:
        for c in clients.values():
            c.close()


def test_session_expiry_is_capped_and_announced(mq: Agent) -> None:
    """A Session Expiry Interval above max_session_expiry_interval is lowered and the CONNACK says so
    (section 3.2.2.3.2); one within it is not echoed."""
    with RawClient(mq.port("cf")) as c:
        ack = c.connect(cid("cap"), clean=True, properties=Properties(session_expiry_interval=0xFFFFFFFF))
        assert ack.properties.session_expiry_interval == 3600
        c.disconnect()
    with RawClient(mq.port("cf")) as c:
        ack = c.connect(cid("cap"), clean=True, properties=Properties(session_expiry_interval=100))
        assert ack.properties.session_expiry_interval is None
        c.disconnect()


def test_negative_pubrec_from_the_client_ends_the_qos2_flow(mq: Agent) -> None:
    """A PUBREC with a reason code >= 0x80 ends the QoS 2 delivery: no PUBREL follows, the packet identifier
    and the Receive Maximum quota are free again [MQTT-4.3.3-4] / section 4.9."""
    port = mq.port("cf")
    topic = f"nrec/{cid('t')}"
    with RawClient(port) as c, RawClient(port) as pub:
        c.connect(cid("nrec"), properties=Properties(receive_maximum=1))
        c.subscribe(sub(topic, 2))
        pub.connect(cid("nrecp"))
        pub.publish(topic, b"1", 2)
        pub.publish(topic, b"2", 2, packet_id=2)
        first = first_publish(c)
        assert first.payload == b"1"
        c.send(Pubrec(first.packet_id or 0, 0x80))
        second = first_publish(c)  # not a PUBREL: the window moved on
        assert second.payload == b"2"
        c.send(Pubrec(second.packet_id or 0))
        assert c.expect(Pubrel).packet_id == second.packet_id
        c.send(Pubcomp(second.packet_id or 0))
        c.disconnect()
