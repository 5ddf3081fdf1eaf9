"""The broker core as the listener drives it: connect/session lifecycle, routing rules, retained messages,
shared subscriptions, wills, flow control and expiry (MQTT 5.0 / 3.1.1 normative statements)."""

from __future__ import annotations

import random

import pytest

from microenvoy.admin.stats import Store
from microenvoy.codecs.mqtt.packets import (
    PROTOCOL_LEVEL_V5,
    PROTOCOL_LEVEL_V311,
    Connect,
    Properties,
    Publish,
    Pubrel,
    ReasonCode,
    Subscribe,
    Subscription,
    Unsubscribe,
    Will,
)
from microenvoy.mqtt.broker import Broker, BrokerLimits
from microenvoy.mqtt.retained import RetainOutcome
from microenvoy.mqtt.session import NEVER_EXPIRES, Delivery, SessionConfig
from microenvoy.mqtt.topics import TopicLimits


class Env:
    """A broker with string connection handles ("conn:<client>#<n>") and a stats store."""

    def __init__(self, limits: BrokerLimits | None = None) -> None:
        self.store = Store()
        self.broker: Broker[str] = Broker(limits, self.store.scope("mqtt.t"), random.Random(7))
        self.n = 0

    def stat(self, name: str) -> int | None:
        return self.store.value("mqtt.t." + name)

    def connect(
        self,
        cid: str,
        *,
        clean: bool = True,
        expiry: int | None = None,
        level: int = PROTOCOL_LEVEL_V5,
        will: Will | None = None,
        now: float = 0.0,
        **props: int,
    ) -> tuple[str, list[Delivery[str]]]:
        self.n += 1
        conn = f"conn:{cid}#{self.n}"
        p = Properties(session_expiry_interval=expiry, **props)  # type: ignore[arg-type]
        r = self.broker.connect(Connect(level, cid, clean, 60, will=will, properties=p), conn, now)
        assert r.reason_code == 0
        return conn, r.deliveries

    def sub(
        self, cid: str, *subs: Subscription, sub_id: int | None = None, now: float = 0.0
    ) -> tuple[tuple[int, ...], list[Delivery[str]]]:
        props = Properties(subscription_identifiers=(sub_id,) if sub_id else ())
        r = self.broker.subscribe(cid, Subscribe(1, subs, props), now)
        assert r.disconnect_reason is None
        return r.reason_codes, r.deliveries

    def pub(
        self,
        cid: str,
        topic: str,
        payload: bytes = b"m",
        qos: int = 0,
        retain: bool = False,
        now: float = 0.0,
        pid: int | None = None,
        **props: object,
    ) -> list[Delivery[str]]:
        if qos and pid is None:
            pid = 1
        p = Publish(topic, payload, qos, retain, False, pid, Properties(**props))  # type: ignore[arg-type]
        return self.broker.publish(cid, p, now).deliveries


def _to(out: list[Delivery[str]], cid: str) -> list[Publish]:
    return [d.packet for d in out if d.client_id == cid and isinstance(d.packet, Publish)]


# ------------------------------------------------------------------------------------------------ connect


def test_connect_new_session_and_stats() -> None:
    env = Env()
    r = env.broker.connect(Connect(PROTOCOL_LEVEL_V5, "a"), "c1", 0)
    assert r.reason_code == 0
    assert r.client_id == "a"
    assert not r.session_present
    assert r.taken_over is None
    assert r.topic_alias_maximum == 10
    assert r.session_expiry_interval is None
    assert env.stat("sessions") == 1


def test_assigned_client_id_and_empty_id_with_clean_start_0() -> None:
    env = Env()
    r = env.broker.connect(Connect(PROTOCOL_LEVEL_V5, "", True), "c1", 0)
    assert r.reason_code == 0
    assert r.assigned_client_id is not None
    assert r.client_id == r.assigned_client_id
    r2 = env.broker.connect(Connect(PROTOCOL_LEVEL_V5, "", True), "c2", 0)
    assert r2.client_id != r.client_id
    # [MQTT-3.1.3-8] (v3.1.1) and the same rule for v5: no id to resume a session with
    for level in (PROTOCOL_LEVEL_V311, PROTOCOL_LEVEL_V5):
        bad = env.broker.connect(Connect(level, "", False), "c3", 0)
        assert bad.reason_code == ReasonCode.CLIENT_IDENTIFIER_NOT_VALID


def test_assigned_ids_are_deterministic_with_the_injected_rng() -> None:
    a: Broker[str] = Broker(rng=random.Random(1))
    b: Broker[str] = Broker(rng=random.Random(1))
    ra = a.connect(Connect(PROTOCOL_LEVEL_V5, ""), "x", 0)
    rb = b.connect(Connect(PROTOCOL_LEVEL_V5, ""), "x", 0)
    assert ra.client_id == rb.client_id


def test_max_sessions() -> None:
    env = Env(BrokerLimits(max_sessions=2))
    env.connect("a")
    env.connect("b")
    r = env.broker.connect(Connect(PROTOCOL_LEVEL_V5, "c"), "cc", 0)
    assert r.reason_code == ReasonCode.QUOTA_EXCEEDED
    assert env.stat("sessions_rejected") == 1
    # an existing client may still reconnect (clean or not)
    assert env.broker.connect(Connect(PROTOCOL_LEVEL_V5, "a", True), "ca2", 0).reason_code == 0
    assert env.broker.connect(Connect(PROTOCOL_LEVEL_V5, "b", False), "cb2", 0).reason_code == 0


def test_session_expiry_sequence_v5() -> None:
    """The interoperability suite's session expiry sequence."""
    env = Env()
    t = Subscription("TopicA", 2)
    # expiry 0: the session ends with the connection
    conn, _ = env.connect("a", expiry=0)
    env.sub("a", t)
    env.broker.disconnect("a", conn, 0, reason_code=0)
    r = env.broker.connect(Connect(PROTOCOL_LEVEL_V5, "a", False), "y", 0.5)
    assert not r.session_present
    assert env.broker.sessions["a"].subscriptions == {}
    env.broker.disconnect("a", "y", 1, reason_code=0)
    assert "a" not in env.broker.sessions
    # expiry 5: still there after 2 s, gone after 6 more
    r = env.broker.connect(
        Connect(PROTOCOL_LEVEL_V5, "a", True, properties=Properties(session_expiry_interval=5)), "x1", 10
    )
    assert not r.session_present
    env.sub("a", t)
    env.broker.disconnect("a", "x1", 10, reason_code=0)
    assert env.broker.next_deadline() == 15
    r = env.broker.connect(
        Connect(PROTOCOL_LEVEL_V5, "a", False, properties=Properties(session_expiry_interval=5)), "x2", 12
    )
    assert r.session_present
    assert "TopicA" in env.broker.sessions["a"].subscriptions
    env.broker.disconnect("a", "x2", 12, reason_code=0)
    env.broker.tick(15)  # the timer of the first disconnect is stale: the session is still there
    assert "a" in env.broker.sessions
    env.broker.tick(17)
    assert "a" not in env.broker.sessions
    assert env.stat("sessions_expired") == 1
    assert env.stat("subscriptions") == 0
    r = env.broker.connect(
        Connect(PROTOCOL_LEVEL_V5, "a", False, properties=Properties(session_expiry_interval=5)), "x3", 18
    )
    assert not r.session_present
    # DISCONNECT raises the expiry from 1 to 5, then a DISCONNECT with 0 ends it at once
    env.broker.disconnect("a", "x3", 18, reason_code=0, session_expiry_interval=5)
    env.broker.tick(21)
    r = env.broker.connect(
        Connect(PROTOCOL_LEVEL_V5, "a", False, properties=Properties(session_expiry_interval=1)), "x4", 21
    )
    assert r.session_present
    env.broker.disconnect("a", "x4", 21, reason_code=0, session_expiry_interval=0)
    assert "a" not in env.broker.sessions


def test_disconnect_cannot_raise_expiry_from_zero() -> None:
    env = Env()
    conn, _ = env.connect("a", expiry=0)
    env.broker.disconnect("a", conn, 0, reason_code=0, session_expiry_interval=100)  # [MQTT-3.14.2-2]
    assert "a" not in env.broker.sessions


def test_session_expiry_capped() -> None:
    env = Env(BrokerLimits(max_session_expiry_interval=60))
    r = env.broker.connect(
        Connect(PROTOCOL_LEVEL_V5, "a", properties=Properties(session_expiry_interval=3600)), "c", 0
    )
    assert r.session_expiry_interval == 60
    env.broker.disconnect("a", "c", 0)
    assert env.broker.sessions["a"].expires_at == 60
    # v3.1.1 persistent sessions take the cap too
    env.broker.connect(Connect(PROTOCOL_LEVEL_V311, "b", False), "d", 0)
    assert env.broker.sessions["b"].session_expiry == 60


def test_v311_clean_session_flags() -> None:
    env = Env()
    conn, _ = env.connect("p", clean=False, level=PROTOCOL_LEVEL_V311)
    assert env.broker.sessions["p"].session_expiry == NEVER_EXPIRES
    env.broker.disconnect("p", conn, 0)
    assert env.broker.next_deadline() is None  # never expires
    r = env.broker.connect(Connect(PROTOCOL_LEVEL_V311, "p", False), "c2", 1)
    assert r.session_present
    r = env.broker.connect(Connect(PROTOCOL_LEVEL_V311, "p", True), "c3", 2)
    assert not r.session_present  # [MQTT-3.2.2-1]
    assert r.taken_over == "c2"
    env.broker.disconnect("p", "c3", 3)
    assert "p" not in env.broker.sessions


def test_clean_start_discards_the_old_session() -> None:
    env = Env()
    conn, _ = env.connect("a", expiry=100)
    env.sub("a", Subscription("t", 1))
    env.broker.disconnect("a", conn, 0)
    env.connect("b")
    env.pub("b", "t", qos=1)
    assert env.broker.sessions["a"].queued_count == 1
    conn, out = env.connect("a", clean=True, expiry=100)
    assert out == []
    assert env.broker.sessions["a"].subscriptions == {}
    assert env.stat("queued") == 0
    assert env.stat("subscriptions") == 0


# ----------------------------------------------------------------------------------------------- takeover


def test_takeover_keeps_the_session_and_ignores_the_old_connection() -> None:
    env = Env()
    old, _ = env.connect("a", expiry=100)
    env.sub("a", Subscription("t", 1))
    env.connect("b")
    env.pub("b", "t", qos=1)  # in flight on the old connection
    r = env.broker.connect(
        Connect(PROTOCOL_LEVEL_V5, "a", False, properties=Properties(session_expiry_interval=100)), "new", 1
    )
    assert r.taken_over == old  # [MQTT-3.1.4-3]: DISCONNECT 0x8E and close it
    assert r.session_present
    (p,) = _to(r.deliveries, "a")
    assert p.dup
    assert r.deliveries[0].connection == "new"
    assert env.stat("sessions_taken_over") == 1
    # the old connection's close arrives later: ignored
    assert env.broker.disconnect("a", old, 2).deliveries == []
    assert env.broker.sessions["a"].connection == "new"
    out = env.pub("b", "t")
    assert [d.connection for d in out] == ["new"]


def test_takeover_will_with_zero_delay_is_published() -> None:
    env = Env()
    env.connect("w")
    env.sub("w", Subscription("will/#", 0))
    env.connect("a", expiry=100, will=Will("will/a", b"gone"))
    r = env.broker.connect(
        Connect(PROTOCOL_LEVEL_V5, "a", False, properties=Properties(session_expiry_interval=100)), "n", 1
    )
    assert [p.payload for p in _to(r.deliveries, "w")] == [b"gone"]
    assert r.wills == [("a", Publish("will/a", b"gone"))]


def test_takeover_will_with_delay_is_not_published_when_session_resumes() -> None:
    env = Env()
    env.connect("w")
    env.sub("w", Subscription("will/#", 0))
    will = Will("will/a", b"gone", properties=Properties(will_delay_interval=10))
    env.connect("a", expiry=100, will=will)
    r = env.broker.connect(
        Connect(PROTOCOL_LEVEL_V5, "a", False, properties=Properties(session_expiry_interval=100)), "n", 1
    )
    assert _to(r.deliveries, "w") == []
    assert env.broker.tick(100).deliveries == []
    # with Clean Start 1 the old session ends, and with it the delay
    env.broker.disconnect("a", "n", 2, reason_code=0)
    env.connect("a2", expiry=100, will=will)
    r = env.broker.connect(Connect(PROTOCOL_LEVEL_V5, "a2", True), "n2", 3)
    assert [p.topic for p in _to(r.deliveries, "w")] == ["will/a"]


# ---------------------------------------------------------------------------------------------------- wills


def test_will_published_unless_normal_disconnect() -> None:
    env = Env()
    env.connect("w")
    env.sub("w", Subscription("will/#", 2))
    conn, _ = env.connect("a", will=Will("will/a", b"bye", 1))
    b = env.broker.disconnect("a", conn, 1)  # network loss [MQTT-3.1.2-8]
    assert [(p.payload, p.qos) for p in _to(b.deliveries, "w")] == [(b"bye", 1)]
    assert b.wills[0][0] == "a"
    conn, _ = env.connect("a", will=Will("will/a", b"bye"))
    assert env.broker.disconnect("a", conn, 2, reason_code=0).deliveries == []  # [MQTT-3.1.2-10]
    conn, _ = env.connect("a", will=Will("will/a", b"bye"))
    b = env.broker.disconnect("a", conn, 3, reason_code=ReasonCode.DISCONNECT_WITH_WILL_MESSAGE)
    assert len(_to(b.deliveries, "w")) == 1
    assert env.stat("will_published") == 2


def test_will_properties_and_retain() -> None:
    env = Env()
    props = Properties(
        content_type="text/plain",
        response_topic="r",
        correlation_data=b"c",
        user_properties=(("k", "v"),),
        message_expiry_interval=30,
        payload_format_indicator=1,
        will_delay_interval=0,
    )
    conn, _ = env.connect("a", will=Will("will/a", b"x", 1, True, props))
    env.broker.disconnect("a", conn, 0)
    env.connect("late")
    _, out = env.sub("late", Subscription("will/a", 1))
    (p,) = _to(out, "late")
    assert p.retain
    assert p.properties.content_type == "text/plain"
    assert p.properties.user_properties == (("k", "v"),)
    assert p.properties.correlation_data == b"c"
    assert p.properties.will_delay_interval is None
    assert p.properties.message_expiry_interval == 30


def test_will_delay_publishes_later_or_is_cancelled_by_reconnect() -> None:
    env = Env()
    env.connect("w")
    env.sub("w", Subscription("will/#", 0))
    will = Will("will/a", b"late", properties=Properties(will_delay_interval=5))
    conn, _ = env.connect("a", expiry=100, will=will)
    assert env.broker.disconnect("a", conn, 10).deliveries == []
    assert env.broker.next_deadline() == 15
    assert env.broker.tick(14.9).deliveries == []
    b = env.broker.tick(15)
    assert [p.payload for p in _to(b.deliveries, "w")] == [b"late"]
    assert b.wills == [("a", Publish("will/a", b"late"))]
    # reconnect within the delay: never sent [MQTT-3.1.3-9]
    conn, _ = env.connect("a", clean=False, expiry=100, will=will, now=20)
    env.broker.disconnect("a", conn, 20)
    env.connect("a", clean=False, expiry=100, now=22)
    assert env.broker.tick(30).deliveries == []
    assert env.stat("will_published") == 1


def test_will_sent_at_session_end_when_earlier_than_its_delay() -> None:
    env = Env()
    env.connect("w")
    env.sub("w", Subscription("will/#", 0))
    will = Will("will/a", b"x", properties=Properties(will_delay_interval=60))
    conn, _ = env.connect("a", expiry=3, will=will)
    env.broker.disconnect("a", conn, 0)
    assert env.broker.next_deadline() == 3
    b = env.broker.tick(3)
    assert len(_to(b.deliveries, "w")) == 1
    assert "a" not in env.broker.sessions
    assert env.broker.tick(60).deliveries == []
    # session expiry 0: the session ends with the connection, so the will goes at once
    conn, _ = env.connect("z", expiry=0, will=will)
    assert len(_to(env.broker.disconnect("z", conn, 1).deliveries, "w")) == 1


def test_v311_will_has_no_delay() -> None:
    env = Env()
    env.connect("w", level=PROTOCOL_LEVEL_V311)
    env.sub("w", Subscription("will/#", 0))
    will = Will("will/a", b"x", properties=Properties(will_delay_interval=60))
    conn, _ = env.connect("a", clean=False, level=PROTOCOL_LEVEL_V311, will=will)
    assert len(_to(env.broker.disconnect("a", conn, 0).deliveries, "w")) == 1


# ------------------------------------------------------------------------------------------------- routing


def test_basic_pub_sub_all_qos_and_downgrade() -> None:
    env = Env()
    env.connect("a")
    env.sub("a", Subscription("TopicA", 1))
    got = [(p.qos, p.payload) for q in (0, 1, 2) for p in _to(env.pub("x", "TopicA", b"%d" % q, q), "a")]
    assert got == [(0, b"0"), (1, b"1"), (1, b"2")]  # min(published, granted) [MQTT-3.8.4-8]


def test_no_matching_subscribers_reason() -> None:
    env = Env()
    env.connect("a")
    o = env.broker.publish("a", Publish("nobody", b"", 1, packet_id=1), 0)
    assert o.reason_code == ReasonCode.NO_MATCHING_SUBSCRIBERS
    assert not o.matched
    env.sub("a", Subscription("nobody", 0))
    o = env.broker.publish("a", Publish("nobody", b"", 1, packet_id=2), 0)
    assert o.reason_code == 0
    assert o.matched


def test_dollar_topics_not_matched_by_leading_wildcards() -> None:
    env = Env()
    env.connect("a")
    env.sub("a", Subscription("#", 0), Subscription("+/+", 0))
    assert env.pub("b", "$TopicA/B") == []  # [MQTT-4.7.2-1]
    env.sub("a", Subscription("$TopicA/#", 0))
    assert len(env.pub("b", "$TopicA/B")) == 1


def test_overlapping_subscriptions_one_message_max_qos_all_ids() -> None:
    env = Env()
    env.connect("a")
    env.sub("a", Subscription("TopicA/#", 2), sub_id=1)
    env.sub("a", Subscription("TopicA/+", 1), sub_id=2)
    env.sub("a", Subscription("TopicA/C", 0))
    (p,) = _to(env.pub("b", "TopicA/C", qos=2), "a")
    assert p.qos == 2  # [MQTT-3.3.5-1] (v3.1.1) / one copy with the maximum QoS
    assert p.properties.subscription_identifiers == (1, 2)  # [MQTT-3.3.4-3]


def test_subscription_identifier_replaced_on_resubscribe() -> None:
    env = Env()
    env.connect("a")
    env.sub("a", Subscription("t", 0), sub_id=5)
    assert _to(env.pub("b", "t"), "a")[0].properties.subscription_identifiers == (5,)
    env.sub("a", Subscription("t", 0), sub_id=9)
    assert _to(env.pub("b", "t"), "a")[0].properties.subscription_identifiers == (9,)
    env.sub("a", Subscription("t", 0))
    assert _to(env.pub("b", "t"), "a")[0].properties.subscription_identifiers == ()


def test_no_local() -> None:
    env = Env()
    env.connect("a")
    env.connect("b")
    env.sub("a", Subscription("t", 1, no_local=True))
    env.sub("b", Subscription("t", 1, no_local=True))
    out = env.pub("a", "t", qos=1)
    assert _to(out, "a") == []  # [MQTT-3.8.3-3]
    assert len(_to(out, "b")) == 1
    # another matching subscription without No Local still delivers
    env.sub("a", Subscription("#", 0))
    assert [p.qos for p in _to(env.pub("a", "t", qos=1), "a")] == [0]


def test_retain_as_published() -> None:
    env = Env()
    env.connect("a")
    env.sub("a", Subscription("rap", 1, retain_as_published=True), Subscription("plain", 1))
    assert [p.retain for p in _to(env.pub("b", "rap", retain=False), "a")] == [False]
    assert [p.retain for p in _to(env.pub("b", "rap", retain=True), "a")] == [True]  # [MQTT-3.3.1-13]
    assert [p.retain for p in _to(env.pub("b", "plain", retain=True), "a")] == [False]  # [MQTT-3.3.1-12]


def test_user_properties_and_request_response_properties_forwarded_alias_stripped() -> None:
    env = Env()
    env.connect("a")
    env.sub("a", Subscription("t", 2))
    props = {
        "user_properties": (("a", "2"), ("c", "3")),
        "content_type": "My name",
        "payload_format_indicator": 1,
        "response_topic": "resp",
        "correlation_data": b"id",
        "topic_alias": 3,
    }
    (p,) = _to(env.pub("b", "t", **props), "a")
    assert p.properties.user_properties == (("a", "2"), ("c", "3"))
    assert p.properties.content_type == "My name"
    assert p.properties.payload_format_indicator == 1
    assert p.properties.response_topic == "resp"
    assert p.properties.correlation_data == b"id"
    assert p.properties.topic_alias is None  # the publisher's alias means nothing to the subscriber


def test_v311_subscriber_gets_no_properties() -> None:
    env = Env()
    env.connect("old", level=PROTOCOL_LEVEL_V311)
    env.sub("old", Subscription("t", 1))
    (p,) = _to(env.pub("b", "t", user_properties=(("a", "b"),)), "old")
    assert p.properties == Properties()


def test_invalid_topic_name_is_not_routed() -> None:
    env = Env(BrokerLimits(topics=TopicLimits(max_levels=3)))
    env.connect("a")
    env.sub("a", Subscription("#", 0))
    o = env.broker.publish("b", Publish("a/b/c/d", b""), 0)
    assert o.reason_code == ReasonCode.TOPIC_NAME_INVALID
    assert o.deliveries == []
    assert env.broker.publish("b", Publish("a/+", b""), 0).reason_code == ReasonCode.TOPIC_NAME_INVALID


def test_inject_routes_with_origin_for_no_local() -> None:
    env = Env()
    env.connect("a")
    env.sub("a", Subscription("down/#", 1, no_local=True))
    o = env.broker.inject(Publish("down/x", b"from upstream", 1), 0, origin="bridge")
    assert o.matched
    assert [p.payload for p in _to(o.deliveries, "a")] == [b"from upstream"]
    assert env.broker.inject(Publish("down/x", b"", 1), 0, origin="a").deliveries == []


# ------------------------------------------------------------------------------------------ retained messages


def test_retained_store_updated_and_cleared() -> None:
    env = Env()
    o = env.broker.publish(
        "p", Publish("r/1", b"v", 1, True, packet_id=1, properties=Properties(topic_alias=2)), 0
    )
    assert o.retained is RetainOutcome.STORED
    kept = env.broker.retained.get("r/1", 0)
    assert kept is not None
    assert kept.publish.packet_id is None
    assert kept.publish.properties.topic_alias is None
    assert env.stat("retained_messages") == 1
    assert env.broker.publish("p", Publish("r/1", b"", 0, True), 0).retained is RetainOutcome.CLEARED
    assert env.stat("retained_messages") == 0
    assert env.broker.publish("p", Publish("r/2", b"x", 0, False), 0).retained is None


def test_retained_messages_on_subscribe_with_retain_flag_and_ids() -> None:
    env = Env()
    for i, t in enumerate(["fromb/qos 0", "fromb/qos 1", "fromb/qos2"]):
        env.pub("p", t, b"v", qos=i, retain=True, user_properties=(("a", "2"),))
    env.connect("a")
    codes, out = env.sub("a", Subscription("fromb/+", 2), sub_id=42)
    assert codes == (2,)
    ps = _to(out, "a")
    assert sorted(p.qos for p in ps) == [0, 1, 2]
    assert all(p.retain for p in ps)  # [MQTT-3.3.1-9]
    assert all(p.properties.subscription_identifiers == (42,) for p in ps)
    assert all(p.properties.user_properties == (("a", "2"),) for p in ps)


def test_retain_handling_0_1_2() -> None:
    env = Env()
    for t in ["TopicA/B", "Topic/C", "TopicA/C"]:
        env.pub("p", t, retain=True)
    env.connect("a")
    # 1: only when the subscription is new
    assert len(env.sub("a", Subscription("+/+", 2, retain_handling=1))[1]) == 3
    assert env.sub("a", Subscription("+/+", 2, retain_handling=1))[1] == []
    # 2: never
    env.connect("a")
    assert env.sub("a", Subscription("+/+", 2, retain_handling=2))[1] == []
    assert env.sub("a", Subscription("+/+", 2, retain_handling=2))[1] == []
    # 0: every time, also when the subscription is replaced [MQTT-3.8.4-3]
    env.connect("a")
    assert len(env.sub("a", Subscription("+/+", 2, retain_handling=0))[1]) == 3
    assert len(env.sub("a", Subscription("+/+", 2, retain_handling=0))[1]) == 3


def test_retained_message_expiry_on_subscribe() -> None:
    env = Env()
    env.pub("p", "r", retain=True, now=0, message_expiry_interval=10)
    env.connect("a")
    _, out = env.sub("a", Subscription("r", 0), now=4)
    (p,) = _to(out, "a")
    assert p.properties.message_expiry_interval == 6
    env.connect("b")
    assert env.sub("b", Subscription("r", 0), now=10)[1] == []
    assert env.broker.next_deadline() is None


def test_retained_bounds_counted() -> None:
    env = Env(BrokerLimits(max_retained_messages=1))
    env.pub("p", "r/1", retain=True)
    o = env.broker.publish("p", Publish("r/2", b"x", 0, True), 0)
    assert o.retained is RetainOutcome.REJECTED
    assert env.stat("retained_rejected") == 1


# --------------------------------------------------------------------------------------------- subscribe


def test_subscribe_reason_codes() -> None:
    env = Env(BrokerLimits(max_subscriptions_per_client=2, maximum_qos=1))
    env.connect("a")
    r = env.broker.subscribe(
        "a",
        Subscribe(
            1,
            (
                Subscription("ok", 2),
                Subscription("bad/#/x", 0),
                Subscription("$share/g+/x", 0),
                Subscription("denied", 0),
                Subscription("second", 0),
                Subscription("third", 0),
                Subscription("ok", 0),  # replacing needs no new slot
            ),
        ),
        0,
        authorize=lambda f: f != "denied",
    )
    assert r.reason_codes == (1, 0x8F, 0x8F, 0x87, 0, 0x97, 0)
    assert env.stat("subscriptions_rejected") == 1
    assert env.stat("subscriptions") == 2


def test_subscribe_reason_codes_v311() -> None:
    env = Env(BrokerLimits(max_subscriptions_per_client=1))
    env.connect("a", level=PROTOCOL_LEVEL_V311)
    r = env.broker.subscribe(
        "a",
        Subscribe(
            1, (Subscription("ok", 2), Subscription("a/#/b", 0), Subscription("x", 0), Subscription("y", 0))
        ),
        0,
        authorize=lambda f: f != "x",
    )
    assert r.reason_codes == (2, 0x80, 0x80, 0x80)


def test_subscribe_protocol_errors_apply_nothing() -> None:
    env = Env()
    env.connect("a")
    r = env.broker.subscribe(
        "a", Subscribe(1, (Subscription("fine", 0), Subscription("$share/g/t", 0, no_local=True))), 0
    )
    assert r.disconnect_reason == ReasonCode.PROTOCOL_ERROR  # [MQTT-3.8.3-4]
    r = env.broker.subscribe("a", Subscribe(1, (Subscription("t", 0, retain_handling=3),)), 0)
    assert r.disconnect_reason == ReasonCode.PROTOCOL_ERROR
    assert env.broker.sessions["a"].subscriptions == {}


def test_unsubscribe() -> None:
    env = Env()
    env.connect("a")
    env.sub("a", Subscription("TopicA", 2), Subscription("TopicA/B", 2), Subscription("$share/g/x", 1))
    codes = env.broker.unsubscribe("a", Unsubscribe(1, ("TopicA", "nope", "a/#/b", "$share/g/x")))
    assert codes == (0, ReasonCode.NO_SUBSCRIPTION_EXISTED, ReasonCode.TOPIC_FILTER_INVALID, 0)
    assert env.pub("b", "TopicA") == []
    assert env.pub("b", "x") == []
    assert len(env.pub("b", "TopicA/B")) == 1
    assert env.stat("subscriptions") == 1


# ------------------------------------------------------------------------------------- shared subscriptions


def test_shared_subscription_round_robin_and_no_retained() -> None:
    env = Env()
    env.pub("p", "sport/tennis/x", retain=True)
    for cid in ("s1", "s2", "s3"):
        env.connect(cid)
        _, out = env.sub(cid, Subscription("$share/g/sport/tennis/+", 1))
        assert out == []  # no retained messages on a shared subscription
    env.connect("plain")
    env.sub("plain", Subscription("sport/tennis/+", 0))
    got: dict[str, int] = {}
    for i in range(9):
        out = env.pub("p", "sport/tennis/x", qos=1, pid=i + 1)
        assert len(_to(out, "plain")) == 1  # and every non-shared subscriber gets its copy
        shared = [d.client_id for d in out if d.client_id != "plain"]
        assert len(shared) == 1  # exactly one member of the group
        got[shared[0]] = got.get(shared[0], 0) + 1
    assert got == {"s1": 3, "s2": 3, "s3": 3}


def test_shared_groups_each_deliver_and_member_qos_respected() -> None:
    env = Env()
    env.connect("a")
    env.connect("b")
    env.sub("a", Subscription("$share/g1/t", 0))
    env.sub("b", Subscription("$share/g2/t", 2), sub_id=3)
    out = env.pub("p", "t", qos=2)
    assert [p.qos for p in _to(out, "a")] == [0]  # [MQTT-4.8.2-3]
    (pb,) = _to(out, "b")
    assert pb.qos == 2
    assert pb.properties.subscription_identifiers == (3,)


def test_shared_prefers_connected_members() -> None:
    env = Env()
    conn, _ = env.connect("off", expiry=100)
    env.sub("off", Subscription("$share/g/t", 1))
    env.connect("on")
    env.sub("on", Subscription("$share/g/t", 1))
    env.broker.disconnect("off", conn, 0)
    for i in range(4):
        assert [d.client_id for d in env.pub("p", "t", qos=1, pid=i + 1)] == ["on"]
    assert env.broker.sessions["off"].queued_count == 0


def test_shared_messages_of_an_ending_session_go_to_another_member() -> None:
    env = Env()
    c1, _ = env.connect("m1", expiry=0)
    env.sub("m1", Subscription("$share/g/t", 1), Subscription("other", 1))
    env.connect("m2", receive_maximum=1)
    env.sub("m2", Subscription("$share/g/t", 1))
    delivered: dict[str, list[bytes]] = {"m1": [], "m2": []}
    for i in range(4):
        for d in env.pub("p", "t", b"%d" % i, qos=1, pid=i + 1):
            delivered[d.client_id].append(d.packet.payload)  # type: ignore[union-attr]
    assert delivered == {"m1": [b"0", b"2"], "m2": [b"1"]}  # m2's window holds "3"
    assert env.broker.sessions["m2"].queued_count == 1
    b = env.broker.disconnect("m1", c1, 1)  # unacknowledged QoS 1 messages go to m2
    assert _to(b.deliveries, "m2") == []  # m2's window is still full: queued
    assert env.broker.sessions["m2"].queued_count == 3
    out = env.broker.puback("m2", 1, 2)
    assert [p.payload for p in _to(out, "m2")] == [b"3"]


# ---------------------------------------------------------------------------------------- flow control


def test_inflight_window_vs_receive_maximum_through_the_broker() -> None:
    env = Env()
    env.connect("a", receive_maximum=2)
    env.sub("a", Subscription("t", 1))
    sent = [p.packet_id for i in range(5) for p in _to(env.pub("p", "t", qos=1, pid=i + 1), "a")]
    assert sent == [1, 2]
    assert env.stat("inflight") == 2
    assert env.stat("queued") == 3
    assert [p.packet_id for p in _to(env.broker.puback("a", 1, 0), "a")] == [3]
    assert env.broker.puback("a", 77, 0) == []
    assert env.broker.puback("nobody", 1, 0) == []


def test_outgoing_qos2_through_the_broker() -> None:
    env = Env()
    env.connect("a")
    env.sub("a", Subscription("t", 2))
    (p,) = _to(env.pub("p", "t", qos=2), "a")
    out = env.broker.pubrec("a", p.packet_id or 0, 0, 0)
    assert [d.packet for d in out] == [Pubrel(p.packet_id or 0)]
    env.broker.pubcomp("a", p.packet_id or 0, 0)
    assert env.stat("inflight") == 0


def test_incoming_qos2_exactly_once() -> None:
    env = Env()
    env.connect("pub")
    env.connect("a")
    env.sub("a", Subscription("t", 2))
    first = env.broker.publish("pub", Publish("t", b"once", 2, packet_id=9), 0)
    assert len(first.deliveries) == 1
    dup = env.broker.publish("pub", Publish("t", b"once", 2, True, True, 9), 0)
    assert dup.duplicate
    assert dup.deliveries == []  # [MQTT-4.3.3-10] not delivered again
    assert env.broker.pubrel("pub", 9)
    assert not env.broker.pubrel("pub", 9)  # PUBCOMP 0x92
    again = env.broker.publish("pub", Publish("t", b"new", 2, packet_id=9), 0)
    assert not again.duplicate


def test_incoming_qos2_state_survives_reconnect_of_a_persistent_session() -> None:
    env = Env()
    conn, _ = env.connect("pub", expiry=100)
    env.broker.publish("pub", Publish("t", b"x", 2, packet_id=4), 0)
    env.broker.disconnect("pub", conn, 0)
    env.connect("pub", clean=False, expiry=100)
    assert env.broker.publish("pub", Publish("t", b"x", 2, True, True, 4), 0).duplicate


# ----------------------------------------------------------------------------------------- redelivery


def test_redelivery_on_reconnect_with_dup() -> None:
    env = Env()
    conn, _ = env.connect("b", expiry=100)
    env.sub("b", Subscription("TopicA/#", 2))
    env.pub("b", "TopicA/B", qos=1)
    env.pub("b", "TopicA/C", qos=2, pid=2)
    env.broker.disconnect("b", conn, 1, reason_code=0)
    conn, out = env.connect("b", clean=False, expiry=100, now=2)
    ps = _to(out, "b")
    assert [(p.topic, p.qos, p.dup) for p in ps] == [("TopicA/B", 1, True), ("TopicA/C", 2, True)]
    assert all(d.connection == conn for d in out)


def test_offline_queue_and_bound() -> None:
    env = Env(BrokerLimits(session=SessionConfig(max_queued_messages=2)))
    conn, _ = env.connect("a", expiry=100)
    env.sub("a", Subscription("+/+", 2))
    env.broker.disconnect("a", conn, 0)
    env.pub("b", "TopicA/B", b"qos 0", 0)
    env.pub("b", "Topic/C", b"qos 1", 1)
    env.pub("b", "TopicA/C", b"qos 2", 2, pid=2)
    env.pub("b", "TopicA/D", b"over", 1, pid=3)
    assert env.stat("dropped_qos0_offline") == 1
    assert env.stat("dropped_queue_full") == 1
    _, out = env.connect("a", clean=False, expiry=100)
    assert [p.payload for p in _to(out, "a")] == [b"qos 1", b"qos 2"]


def test_publication_expiry_while_offline() -> None:
    """The interoperability suite's publication expiry sequence."""
    env = Env()
    conn, _ = env.connect("b", expiry=100)
    env.sub("b", Subscription("TopicA", 2))
    env.broker.disconnect("b", conn, 0, reason_code=0)
    env.connect("a")
    env.pub("a", "TopicA", b"qos 1 - expire", 1, now=0, message_expiry_interval=1)
    env.pub("a", "TopicA", b"qos 2 - expire", 2, now=0, pid=2, message_expiry_interval=1)
    env.pub("a", "TopicA", b"qos 1 - keep", 1, now=0, pid=3, message_expiry_interval=6)
    env.pub("a", "TopicA", b"qos 2 - keep", 2, now=0, pid=4, message_expiry_interval=6)
    _, out = env.connect("b", clean=False, expiry=100, now=3)
    ps = _to(out, "b")
    assert [p.payload for p in ps] == [b"qos 1 - keep", b"qos 2 - keep"]
    assert all(p.properties.message_expiry_interval == 3 for p in ps)
    assert env.stat("dropped_expired") == 2


# ----------------------------------------------------------------------------------------- topic aliases


def test_resolve_topic_through_the_broker() -> None:
    env = Env(BrokerLimits(topic_alias_maximum=2))
    env.connect("a")
    p = Publish("long/topic", b"", properties=Properties(topic_alias=2))
    assert env.broker.resolve_topic("a", p) is p
    r = env.broker.resolve_topic("a", Publish("", b"", properties=Properties(topic_alias=2)))
    assert isinstance(r, Publish)
    assert r.topic == "long/topic"
    assert env.broker.resolve_topic("a", Publish("x", b"", properties=Properties(topic_alias=3))) == 0x94
    assert env.broker.resolve_topic("ghost", p) == 0x82


def test_server_topic_alias_to_subscriber() -> None:
    env = Env()
    env.connect("a", topic_alias_maximum=1)
    env.sub("a", Subscription("t", 0))
    got = [(p.topic, p.properties.topic_alias) for _ in range(3) for p in _to(env.pub("b", "t"), "a")]
    assert got == [("t", 1), ("", 1), ("", 1)]


# ------------------------------------------------------------------------------------------------- misc


def test_repr_and_gauges() -> None:
    env = Env()
    env.connect("a")
    env.sub("a", Subscription("x", 0), Subscription("$share/g/y", 0))
    assert repr(env.broker) == "<Broker sessions=1 subscriptions=2 retained=0>"
    assert env.stat("subscriptions") == 2


@pytest.mark.parametrize("level", [PROTOCOL_LEVEL_V311, PROTOCOL_LEVEL_V5])
def test_subscribe_and_publish_for_unknown_client(level: int) -> None:
    env = Env()
    r = env.broker.subscribe("ghost", Subscribe(1, (Subscription("t", 0),)), 0)
    assert r.disconnect_reason == ReasonCode.PROTOCOL_ERROR
    assert env.broker.unsubscribe("ghost", Unsubscribe(1, ("t",))) == (ReasonCode.NO_SUBSCRIPTION_EXISTED,)
    assert not env.broker.pubrel("ghost", 1)
    assert env.broker.disconnect("ghost", "c", 0).deliveries == []


def test_set_congested_drops_qos0_for_that_connection_only() -> None:
    env = Env()
    conn, _ = env.connect("a")
    env.sub("a", Subscription("t", 1))
    env.broker.set_congested("a", "some-old-connection", True)  # not the session's connection: ignored
    assert len(env.pub("b", "t")) == 1
    env.broker.set_congested("a", conn, True)
    assert env.pub("b", "t") == []
    assert len(env.pub("b", "t", qos=1)) == 1
    assert env.stat("dropped_slow_consumer") == 1
    env.broker.set_congested("a", conn, False)
    assert len(env.pub("b", "t")) == 1
    env.broker.set_congested("ghost", conn, True)  # unknown client: nothing happens
