"""Per-client session state: packet ids, inflight window, QoS 1/2 sender flows, redelivery with DUP, offline
queue bounds, message expiry, Maximum Packet Size, topic aliases both ways, incoming QoS 2."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microenvoy.admin.stats import Store
from microenvoy.codecs.mqtt.packets import (
    EMPTY_PROPERTIES,
    PROTOCOL_LEVEL_V5,
    PROTOCOL_LEVEL_V311,
    Properties,
    Publish,
    Pubrel,
    ReasonCode,
)
from microenvoy.mqtt.session import Delivery, QueuedMessage, Session, SessionConfig, SessionStats
from microenvoy.mqtt.sizes import message_size, publish_wire_size


class Env:
    def __init__(self, config: SessionConfig | None = None) -> None:
        self.store = Store()
        self.stats = SessionStats(self.store.scope("mqtt.t"))
        self.session: Session[str] = Session("c", config or SessionConfig(), self.stats)
        self.out: list[Delivery[str]] = []

    def stat(self, name: str) -> int | None:
        return self.store.value("mqtt.t." + name)

    def attach(
        self, level: int = PROTOCOL_LEVEL_V5, now: float = 0.0, **kw: int | None
    ) -> list[Delivery[str]]:
        out: list[Delivery[str]] = []
        self.session.attach("conn", level, now, out, **kw)  # type: ignore[arg-type]
        return out

    def deliver(self, topic: str = "t", qos: int = 1, now: float = 0.0, **kw: object) -> list[Delivery[str]]:
        out: list[Delivery[str]] = []
        expires_at = kw.pop("expires_at", None)
        pub = Publish(topic, kw.pop("payload", b"p"), qos, properties=kw.pop("props", EMPTY_PROPERTIES))  # type: ignore[arg-type]
        self.session.deliver(QueuedMessage(pub, expires_at, kw.pop("share", None)), now, out)  # type: ignore[arg-type]
        return out


def _pubs(out: list[Delivery[str]]) -> list[Publish]:
    return [d.packet for d in out if isinstance(d.packet, Publish)]


# -------------------------------------------------------------------------------------------- packet ids


def test_packet_ids_increase_and_skip_ids_in_flight() -> None:
    env = Env()
    env.attach(receive_maximum=65535)
    ids = [_pubs(env.deliver())[0].packet_id for _ in range(3)]
    assert ids == [1, 2, 3]
    # wrap around: ids still in flight are never reused [MQTT-2.2.1-3]
    env.session._next_pid = 65535
    assert _pubs(env.deliver())[0].packet_id == 65535
    assert _pubs(env.deliver())[0].packet_id == 4  # 1, 2, 3 are still unacknowledged
    assert env.session.puback(2, 0, env.out)
    env.session._next_pid = 1
    assert _pubs(env.deliver())[0].packet_id == 2  # freed, reusable


def test_qos0_has_no_packet_id_and_ignores_the_window() -> None:
    env = Env()
    env.attach(receive_maximum=1)
    env.deliver(qos=1)
    env.deliver(qos=1)  # queued behind the window
    out = env.deliver(qos=0)
    assert [(p.qos, p.packet_id) for p in _pubs(out)] == [(0, None)]
    assert env.session.inflight_count == 1
    assert env.session.queued_count == 1


# --------------------------------------------------------------------------------------- inflight window


def test_window_is_the_v5_receive_maximum() -> None:
    env = Env()
    env.attach(receive_maximum=2)
    sent = [p for _ in range(5) for p in _pubs(env.deliver(topic="t", qos=2))]
    assert [p.packet_id for p in sent] == [1, 2]  # [MQTT-3.3.4-9]
    assert env.session.queued_count == 3
    assert env.stat("inflight") == 2
    assert env.stat("queued") == 3
    out: list[Delivery[str]] = []
    assert env.session.pubrec(1, 0, 0, out)
    assert [d.packet for d in out] == [Pubrel(1)]  # PUBREL does not free the window yet
    out.clear()
    assert env.session.pubcomp(1, 0, out)
    assert [p.packet_id for p in _pubs(out)] == [3]
    assert env.session.inflight_count == 2


def test_window_capped_by_config_for_v5_and_configured_for_v311() -> None:
    env = Env(SessionConfig(max_inflight_v5=3, max_inflight=2))
    env.attach(receive_maximum=100)
    assert len([p for _ in range(5) for p in _pubs(env.deliver())]) == 3
    env2 = Env(SessionConfig(max_inflight=2))
    env2.attach(PROTOCOL_LEVEL_V311)
    assert len([p for _ in range(5) for p in _pubs(env2.deliver())]) == 2
    env3 = Env()
    env3.attach()  # no Receive Maximum: 65535, capped at max_inflight_v5 (1024)
    assert len([p for _ in range(1100) for p in _pubs(env3.deliver())]) == 1024


def test_queue_keeps_order_after_window_opens() -> None:
    env = Env()
    env.attach(receive_maximum=1)
    for i in range(4):
        env.deliver(topic=f"t/{i}")
    order = []
    for pid in range(1, 5):
        out: list[Delivery[str]] = []
        assert env.session.puback(pid, 0, out)
        order += [p.topic for p in _pubs(out)]
    assert order == ["t/1", "t/2", "t/3"]


# -------------------------------------------------------------------------------------- QoS 1/2 flows


def test_qos1_puback() -> None:
    env = Env()
    env.attach()
    (p,) = _pubs(env.deliver(qos=1))
    assert not env.session.puback(99, 0, env.out)
    assert env.session.puback(p.packet_id or 0, 0, env.out)
    assert not env.session.puback(p.packet_id or 0, 0, env.out)  # already done
    assert env.session.inflight_count == 0
    assert env.stat("inflight") == 0


def test_qos2_flow_and_wrong_acks() -> None:
    env = Env()
    env.attach()
    (p,) = _pubs(env.deliver(qos=2))
    pid = p.packet_id or 0
    out: list[Delivery[str]] = []
    assert not env.session.puback(pid, 0, out)  # PUBACK for a QoS 2 message is not accepted
    assert not env.session.pubcomp(pid, 0, out)  # no PUBREL sent yet
    assert env.session.pubrec(pid, 0, 0, out)
    assert env.session.pubrec(pid, 0, 0, out)  # a repeated PUBREC gets the PUBREL again
    assert [d.packet for d in out] == [Pubrel(pid), Pubrel(pid)]
    assert env.session.pubcomp(pid, 0, out)
    assert not env.session.pubcomp(pid, 0, out)
    assert env.session.inflight_count == 0


def test_qos2_negative_pubrec_ends_the_flow() -> None:
    env = Env()
    env.attach(receive_maximum=1)
    (p,) = _pubs(env.deliver(qos=2))
    env.deliver(qos=2, topic="next")
    out: list[Delivery[str]] = []
    assert env.session.pubrec(p.packet_id or 0, ReasonCode.QUOTA_EXCEEDED, 0, out)
    # no PUBREL; the window moved on
    assert [type(d.packet).__name__ for d in out] == ["Publish"]
    assert _pubs(out)[0].topic == "next"


# ------------------------------------------------------------------------------------------- redelivery


def test_resume_retransmits_with_dup_then_pubrel_then_queue() -> None:
    env = Env()
    env.attach(receive_maximum=3)
    p1, p2, p3 = (_pubs(env.deliver(topic=f"t/{i}", qos=2 if i == 1 else 1))[0] for i in range(3))
    assert env.session.pubrec(p2.packet_id or 0, 0, 0, env.out)
    env.deliver(topic="queued", qos=1)
    env.deliver(topic="dropped-qos0", qos=0)  # online QoS 0 goes at once; nothing queued for it
    env.session.detach()
    assert env.session.connection is None
    env.deliver(topic="offline", qos=1)
    env.deliver(topic="offline-qos0", qos=0)
    assert env.stat("dropped_qos0_offline") == 1
    out = env.attach(receive_maximum=10, now=5.0)
    pk = [d.packet for d in out]
    assert pk[0] == Publish("t/0", b"p", 1, False, True, p1.packet_id)  # DUP 1 [MQTT-3.3.1-1]
    assert pk[1] == Pubrel(p2.packet_id or 0)  # [MQTT-4.4.0-1]
    assert pk[2] == Publish("t/2", b"p", 1, False, True, p3.packet_id)
    assert [(p.topic, p.dup) for p in _pubs(out)[2:]] == [("queued", False), ("offline", False)]


def test_resume_with_a_smaller_receive_maximum_resends_within_it() -> None:
    """[MQTT-3.3.4-9]: on resume, unacknowledged PUBLISHes beyond the new Receive Maximum wait; each ack lets
    the next one out with its original packet id and DUP, before anything from the queue."""
    env = Env()
    env.attach(receive_maximum=10)
    sent = [_pubs(env.deliver(topic=f"t/{i}", qos=1))[0] for i in range(3)]
    env.session.detach()
    env.deliver(topic="queued", qos=1)
    out = env.attach(receive_maximum=1, now=1.0)
    assert [(p.topic, p.packet_id, p.dup) for p in _pubs(out)] == [("t/0", sent[0].packet_id, True)]
    more: list[Delivery[str]] = []
    env.session.puback(sent[0].packet_id or 0, 2.0, more)
    assert [(p.topic, p.packet_id, p.dup) for p in _pubs(more)] == [("t/1", sent[1].packet_id, True)]
    more = []
    env.session.puback(sent[1].packet_id or 0, 3.0, more)
    assert [(p.topic, p.dup) for p in _pubs(more)] == [("t/2", True)]
    more = []
    env.session.puback(sent[2].packet_id or 0, 4.0, more)
    assert [(p.topic, p.dup) for p in _pubs(more)] == [("queued", False)]


def test_resume_on_v311_same_rules() -> None:
    env = Env()
    env.attach(PROTOCOL_LEVEL_V311)
    env.deliver(qos=1)
    env.session.detach()
    out = env.attach(PROTOCOL_LEVEL_V311)
    (p,) = _pubs(out)
    assert p.dup
    assert p.packet_id == 1


# --------------------------------------------------------------------------------------- offline queue


def test_offline_queue_bounded_by_count() -> None:
    env = Env(SessionConfig(max_queued_messages=3))
    for _ in range(5):
        env.deliver(qos=1)
    assert env.session.queued_count == 3
    assert env.stat("dropped_queue_full") == 2
    assert env.stat("queued") == 3


def test_offline_queue_bounded_by_bytes() -> None:
    size = message_size(Publish("t", b"x" * 100, 1))
    env = Env(SessionConfig(max_queued_bytes=2 * size))
    for _ in range(3):
        env.deliver(qos=1, payload=b"x" * 100)
    assert env.session.queued_count == 2
    assert env.session.queued_bytes == 2 * size
    assert env.stat("dropped_queue_full") == 1


def test_qos0_offline_queued_when_configured() -> None:
    env = Env(SessionConfig(queue_qos0_offline=True))
    env.deliver(qos=0)
    out = env.attach()
    assert [(p.qos, p.packet_id) for p in _pubs(out)] == [(0, None)]


def test_full_queue_makes_room_from_expired_messages() -> None:
    env = Env(SessionConfig(max_queued_messages=1))
    env.deliver(qos=1, expires_at=10.0)
    env.deliver(qos=1, topic="second", now=11.0)
    assert env.stat("dropped_expired") == 1
    assert env.stat("dropped_queue_full") == 0
    assert [p.topic for p in _pubs(env.attach(now=12.0))] == ["second"]


# ------------------------------------------------------------------------------------------ message expiry


def test_expired_queued_messages_are_dropped_and_sent_ones_carry_the_rest() -> None:
    env = Env()
    props = Properties(message_expiry_interval=10)
    env.deliver(topic="short", qos=1, props=props, expires_at=110.0, now=100.0)
    env.deliver(
        topic="long", qos=1, props=Properties(message_expiry_interval=60), expires_at=160.0, now=100.0
    )
    out = env.attach(now=130.0)
    (p,) = _pubs(out)
    assert p.topic == "long"
    assert p.properties.message_expiry_interval == 30  # 60 minus the 30 s it waited [MQTT-3.3.2-6]
    assert env.stat("dropped_expired") == 1  # [MQTT-3.3.2-5]


def test_purge_expired() -> None:
    env = Env()
    env.deliver(qos=1, expires_at=5.0)
    env.deliver(qos=1)
    assert env.session.purge_expired(4.0) == 0
    assert env.session.purge_expired(5.0) == 1
    assert env.session.queued_count == 1
    assert env.stat("queued") == 1


def test_inflight_message_is_completed_even_when_expired() -> None:
    env = Env()
    env.attach()
    env.deliver(qos=1, props=Properties(message_expiry_interval=5), expires_at=5.0)
    env.session.detach()
    (p,) = _pubs(env.attach(now=100.0))
    assert p.dup
    assert p.properties.message_expiry_interval == 1


# -------------------------------------------------------------------------------------- maximum packet size


def test_too_large_for_the_client_is_dropped_as_if_delivered() -> None:
    env = Env()
    env.attach(maximum_packet_size=50)
    assert _pubs(env.deliver(qos=1, payload=b"x" * 100)) == []
    assert env.stat("dropped_too_large") == 1
    assert env.session.inflight_count == 0  # no packet id consumed
    (p,) = _pubs(env.deliver(qos=1, payload=b"x" * 10))
    assert p.packet_id == 1
    assert publish_wire_size(p, PROTOCOL_LEVEL_V5) <= 50
    assert _pubs(env.deliver(qos=0, payload=b"x" * 100)) == []
    assert env.stat("dropped_too_large") == 2


def test_exact_maximum_packet_size_boundary() -> None:
    pub = Publish("t", b"x" * 20, 1, packet_id=1)
    size = publish_wire_size(pub, PROTOCOL_LEVEL_V5)
    ok = Env(SessionConfig(server_topic_aliases=False))
    ok.attach(maximum_packet_size=size)
    assert len(_pubs(ok.deliver(qos=1, payload=b"x" * 20))) == 1
    short = Env(SessionConfig(server_topic_aliases=False))
    short.attach(maximum_packet_size=size - 1)
    assert _pubs(short.deliver(qos=1, payload=b"x" * 20)) == []


def test_reconnect_with_smaller_maximum_drops_inflight_retransmission() -> None:
    env = Env()
    env.attach()
    env.deliver(qos=1, payload=b"x" * 100)
    env.session.detach()
    assert _pubs(env.attach(maximum_packet_size=20)) == []
    assert env.session.inflight_count == 0
    assert env.stat("inflight") == 0


# -------------------------------------------------------------------------------------- v3.1.1 shaping


def test_v311_gets_no_properties() -> None:
    env = Env()
    env.attach(PROTOCOL_LEVEL_V311, topic_alias_maximum=5, maximum_packet_size=10)
    props = Properties(user_properties=(("a", "b"),), message_expiry_interval=50)
    (p,) = _pubs(env.deliver(qos=1, props=props, payload=b"x" * 100, expires_at=50.0))
    assert p.properties is EMPTY_PROPERTIES
    assert p.topic == "t"


# ----------------------------------------------------------------------------------------- topic aliases


def test_server_to_client_aliases_lru() -> None:
    env = Env()
    env.attach(topic_alias_maximum=2)
    seq = ["a", "a", "b", "a", "c", "c", "b"]
    got = []
    for t in seq:
        (p,) = _pubs(env.deliver(topic=t, qos=0))
        got.append((p.topic, p.properties.topic_alias))
    assert got == [
        ("a", 1),
        ("", 1),
        ("b", 2),
        ("", 1),
        ("c", 2),  # "b" was least recently used: its alias 2 now means "c"
        ("", 2),
        ("b", 1),  # "a" was least recently used
    ]


def test_no_server_aliases_when_client_allows_none_or_config_off() -> None:
    env = Env()
    env.attach(topic_alias_maximum=0)
    assert _pubs(env.deliver(qos=0))[0].properties.topic_alias is None
    env2 = Env(SessionConfig(server_topic_aliases=False))
    env2.attach(topic_alias_maximum=10)
    assert _pubs(env2.deliver(qos=0))[0].properties.topic_alias is None


def test_aliases_reset_on_reconnect() -> None:
    env = Env()
    env.attach(topic_alias_maximum=5)
    env.deliver(topic="x", qos=1)
    env.session.detach()
    (p,) = _pubs(env.attach(topic_alias_maximum=5))
    assert p.topic == "x"
    assert p.properties.topic_alias == 1
    assert p.dup


def test_too_large_publish_does_not_register_an_alias() -> None:
    env = Env()
    env.attach(topic_alias_maximum=5, maximum_packet_size=40)
    assert _pubs(env.deliver(topic="big", qos=0, payload=b"x" * 100)) == []
    (p,) = _pubs(env.deliver(topic="big", qos=0, payload=b"x"))
    assert p.topic == "big"  # the client never learned the alias, so the topic is sent


def test_client_to_server_aliases() -> None:
    env = Env()
    env.attach()
    s = env.session
    first = Publish("sensors/t", b"1", properties=Properties(topic_alias=3))
    assert s.resolve_topic(first, 10) is first
    later = s.resolve_topic(Publish("", b"2", properties=Properties(topic_alias=3)), 10)
    assert isinstance(later, Publish)
    assert later.topic == "sensors/t"
    assert later.payload == b"2"
    # re-map
    s.resolve_topic(Publish("other", b"", properties=Properties(topic_alias=3)), 10)
    again = s.resolve_topic(Publish("", b"", properties=Properties(topic_alias=3)), 10)
    assert isinstance(again, Publish)
    assert again.topic == "other"
    # [MQTT-3.3.2-9] / [MQTT-3.3.2-10]: 0 or above our maximum
    assert s.resolve_topic(Publish("x", b"", properties=Properties(topic_alias=0)), 10) == 0x94
    assert s.resolve_topic(Publish("x", b"", properties=Properties(topic_alias=11)), 10) == 0x94
    # unknown alias with an empty topic; empty topic without alias: Protocol Error
    assert s.resolve_topic(Publish("", b"", properties=Properties(topic_alias=4)), 10) == 0x82
    assert s.resolve_topic(Publish("", b""), 10) == 0x82
    plain = Publish("p", b"")
    assert s.resolve_topic(plain, 10) is plain
    # aliases belong to the connection [MQTT-3.3.2-7]
    s.detach()
    env.attach()
    assert s.resolve_topic(Publish("", b"", properties=Properties(topic_alias=3)), 10) == 0x82


# ------------------------------------------------------------------------------------------ incoming QoS 2


def test_incoming_qos2_exactly_once() -> None:
    env = Env()
    s = env.session
    assert s.receive_qos2(7)
    assert not s.receive_qos2(7)  # retransmission before PUBREL: not delivered again
    assert s.release_qos2(7)
    assert not s.release_qos2(7)  # PUBCOMP 0x92
    assert s.receive_qos2(7)  # a new message may reuse the id


# ---------------------------------------------------------------------------------------------- discard


def test_discard_returns_shared_messages_that_may_go_elsewhere() -> None:
    env = Env()
    env.attach(receive_maximum=2)
    share = ("g", "t/#")
    env.deliver(topic="q1-shared", qos=1, share=share)
    env.deliver(topic="q2-shared", qos=2, share=share)
    env.deliver(topic="queued-shared", qos=2, share=share)
    env.deliver(topic="queued-plain", qos=1)
    back = env.session.discard()
    # QoS 1 in flight and never-sent ones; never a QoS 2 message in flight [MQTT-4.8.2-5]
    assert [m.publish.topic for m in back] == ["q1-shared", "queued-shared"]
    assert env.session.inflight_count == 0
    assert env.session.queued_count == 0
    assert env.stat("inflight") == 0
    assert env.stat("queued") == 0


def test_repr() -> None:
    env = Env()
    assert repr(env.session) == "<Session 'c' offline subscriptions=0 inflight=0 queued=0>"


@pytest.mark.parametrize("n", [0, 127, 128, 16383, 16384, 2097151, 2097152, 268435455])
def test_varint_size(n: int) -> None:
    from microenvoy.mqtt.sizes import varint_size

    want = 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4
    assert varint_size(n) == want


# ------------------------------------------------------------------------------------------- congestion


def test_congested_connection_drops_qos0_before_assigning_an_alias() -> None:
    env = Env()
    env.attach(topic_alias_maximum=5)
    env.session.congested = True
    assert _pubs(env.deliver(topic="t", qos=0)) == []
    assert env.stat("dropped_slow_consumer") == 1
    (p1,) = _pubs(env.deliver(topic="t", qos=1))  # QoS 1/2 are bounded by the window, not dropped
    env.session.congested = False
    (p0,) = _pubs(env.deliver(topic="u", qos=0))
    assert (p1.topic, p1.properties.topic_alias) == ("t", 1)
    assert (p0.topic, p0.properties.topic_alias) == ("u", 2)
    env.session.congested = True
    env.session.detach()
    env.attach()
    assert not env.session.congested  # a new connection starts uncongested


# ------------------------------------------------------------------------------- sizes agree with the codec

_PROPS = st.builds(
    Properties,
    payload_format_indicator=st.none() | st.integers(0, 1),
    message_expiry_interval=st.none() | st.integers(0, 2**32 - 1),
    content_type=st.none() | st.text(max_size=20),
    response_topic=st.none() | st.text(alphabet="ab/é", min_size=1, max_size=20),
    correlation_data=st.none() | st.binary(max_size=20),
    subscription_identifiers=st.lists(st.integers(1, 268_435_455), max_size=3).map(tuple),
    topic_alias=st.none() | st.integers(1, 65535),
    user_properties=st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(
    topic=st.text(alphabet="ab/ü😀", max_size=30),
    payload=st.binary(max_size=300),
    qos=st.integers(0, 2),
    props=_PROPS,
    level=st.sampled_from([PROTOCOL_LEVEL_V311, PROTOCOL_LEVEL_V5]),
)
def test_publish_wire_size_is_the_encoded_size(
    topic: str, payload: bytes, qos: int, props: Properties, level: int
) -> None:
    from microenvoy.codecs.mqtt.codec import encode_packet

    pub = Publish(topic, payload, qos, False, False, 1 if qos else None, props)
    assert publish_wire_size(pub, level) == len(encode_packet(pub, level))
