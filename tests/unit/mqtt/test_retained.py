"""The retained-message store: set/replace/clear, wildcard matching, bounds, expiry, stats."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from microenvoy.admin.stats import Store
from microenvoy.codecs.mqtt.packets import Properties, Publish
from microenvoy.mqtt.retained import RetainedStore, RetainOutcome
from microenvoy.mqtt.sizes import message_size
from microenvoy.mqtt.topics import topic_matches


def _pub(topic: str, payload: bytes = b"x", qos: int = 0, expiry: int | None = None) -> Publish:
    return Publish(topic, payload, qos, True, properties=Properties(message_expiry_interval=expiry))


def _topics(msgs: list) -> list[str]:  # type: ignore[type-arg]
    return sorted(m.publish.topic for m in msgs)


def test_set_replace_clear_and_gauges() -> None:
    store = Store()
    r = RetainedStore(stats=store.scope("mqtt.t"))
    assert r.set(_pub("a/b", b"1"), 0) is RetainOutcome.STORED
    assert r.set(_pub("a/b", b"22"), 1) is RetainOutcome.STORED  # replaces
    assert len(r) == 1
    got = r.get("a/b", 2)
    assert got is not None
    assert got.publish.payload == b"22"
    assert got.stored_at == 1
    assert store.value("mqtt.t.retained_messages") == 1
    assert store.value("mqtt.t.retained_bytes") == r.bytes == message_size(_pub("a/b", b"22"))
    # a zero-byte payload clears and is not stored itself [MQTT-3.3.1-6] [MQTT-3.3.1-7]
    assert r.set(_pub("a/b", b""), 3) is RetainOutcome.CLEARED
    assert r.get("a/b", 3) is None
    assert len(r) == 0
    assert r.bytes == 0
    assert store.value("mqtt.t.retained_messages") == 0
    assert r._root.children == {}  # pruned
    assert r.set(_pub("never/there", b""), 3) is RetainOutcome.CLEARED


def test_wildcard_match() -> None:
    r = RetainedStore()
    for t in ["TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA", "$SYS/x", "a/b/c/d"]:
        r.set(_pub(t), 0)
    assert _topics(r.match("TopicA/+", 0)) == ["TopicA/B", "TopicA/C"]
    assert _topics(r.match("+/C", 0)) == ["Topic/C", "TopicA/C"]
    assert _topics(r.match("#", 0)) == ["/TopicA", "Topic/C", "TopicA", "TopicA/B", "TopicA/C", "a/b/c/d"]
    assert _topics(r.match("/#", 0)) == ["/TopicA"]
    assert _topics(r.match("+/+", 0)) == ["/TopicA", "Topic/C", "TopicA/B", "TopicA/C"]
    assert _topics(r.match("TopicA/#", 0)) == ["TopicA", "TopicA/B", "TopicA/C"]  # parent level too
    assert _topics(r.match("$SYS/#", 0)) == ["$SYS/x"]
    assert _topics(r.match("+/x", 0)) == []  # [MQTT-4.7.2-1]
    assert _topics(r.match("TopicA", 0)) == ["TopicA"]
    assert _topics(r.match("a/+/c/#", 0)) == ["a/b/c/d"]
    assert r.match("nothing/+", 0) == []


def test_match_is_in_store_order() -> None:
    r = RetainedStore()
    r.set(_pub("t/2"), 2)
    r.set(_pub("t/1"), 1)
    r.set(_pub("t/3"), 3)
    assert [m.publish.topic for m in r.match("t/#", 5)] == ["t/1", "t/2", "t/3"]


def test_count_bound_rejects_new_topics_but_replaces() -> None:
    store = Store()
    r = RetainedStore(max_messages=2, stats=store.scope("m"))
    assert r.set(_pub("a"), 0) is RetainOutcome.STORED
    assert r.set(_pub("b"), 0) is RetainOutcome.STORED
    assert r.set(_pub("c"), 0) is RetainOutcome.REJECTED
    assert r.set(_pub("a", b"new"), 0) is RetainOutcome.STORED  # replacing needs no new slot
    assert store.value("m.retained_rejected") == 1
    assert _topics(r.match("#", 0)) == ["a", "b"]


def test_byte_bound() -> None:
    one = message_size(_pub("a", b"x" * 100))
    r = RetainedStore(max_bytes=2 * one + 60)  # two large ones; a small one only once a large one shrank
    assert r.set(_pub("a", b"x" * 100), 0) is RetainOutcome.STORED
    assert r.set(_pub("b", b"x" * 100), 0) is RetainOutcome.STORED
    assert r.set(_pub("c", b"x" * 5), 0) is RetainOutcome.REJECTED
    assert r.set(_pub("a", b"x" * 5), 0) is RetainOutcome.STORED  # smaller replacement frees room
    assert r.set(_pub("c", b"x" * 5), 0) is RetainOutcome.STORED
    assert r.set(_pub("d", b"x" * 10_000), 0) is RetainOutcome.REJECTED
    assert r.bytes <= r.max_bytes


def test_expiry() -> None:
    store = Store()
    r = RetainedStore(stats=store.scope("m"))
    r.set(_pub("e/1", expiry=5), 100)
    r.set(_pub("e/2", expiry=10), 100)
    r.set(_pub("e/3"), 100)
    assert r.next_expiry() == 105
    msg = r.get("e/1", 101.5)
    assert msg is not None
    assert msg.remaining_expiry(101.5) == 4
    assert _topics(r.match("e/+", 104.9)) == ["e/1", "e/2", "e/3"]
    assert _topics(r.match("e/+", 105)) == ["e/2", "e/3"]  # expired ones are not delivered
    assert len(r) == 2
    assert r.get("e/2", 110) is None
    assert r.expire(200) == 0
    assert len(r) == 1
    assert r.next_expiry() is None
    assert store.value("m.retained_expired") == 2
    assert r.get("e/3", 10**9) is not None  # no expiry: kept


def test_replacement_cancels_old_expiry() -> None:
    r = RetainedStore()
    r.set(_pub("t", b"old", expiry=1), 0)
    r.set(_pub("t", b"new"), 0.5)  # no expiry now
    assert r.expire(5) == 0
    got = r.get("t", 5)
    assert got is not None
    assert got.publish.payload == b"new"
    # same timestamp, different expiry: the stale heap entry must not remove the new message
    r.set(_pub("u", b"1", expiry=1), 7)
    r.set(_pub("u", b"2", expiry=100), 7)
    assert r.expire(9) == 0
    assert r.get("u", 9) is not None


def test_full_store_makes_room_from_expired() -> None:
    r = RetainedStore(max_messages=1)
    r.set(_pub("a", expiry=1), 0)
    assert r.set(_pub("b"), 0.5) is RetainOutcome.REJECTED
    assert r.set(_pub("b"), 2) is RetainOutcome.STORED


def test_clear_all() -> None:
    r = RetainedStore()
    r.set(_pub("a", expiry=1), 0)
    r.clear()
    assert len(r) == 0
    assert r.bytes == 0
    assert r.next_expiry() is None


_LEVEL = st.sampled_from(["a", "b", "", "$s"])
_TOPIC = st.lists(_LEVEL, min_size=1, max_size=4).map("/".join).filter(bool)
_FILTER = st.lists(st.sampled_from(["a", "b", "", "$s", "+"]), min_size=0, max_size=4).flatmap(
    lambda ls: st.sampled_from(["/".join([*ls, "#"]), "/".join(ls) or "#"])
)


@settings(max_examples=300, deadline=None)
@given(topics=st.lists(_TOPIC, max_size=10), filters=st.lists(_FILTER, min_size=1, max_size=5))
def test_match_agrees_with_reference(topics: list[str], filters: list[str]) -> None:
    r = RetainedStore()
    for t in topics:
        r.set(_pub(t), 0)
    for f in filters:
        want = sorted({t for t in topics if topic_matches(f, t)})
        assert _topics(r.match(f, 0)) == want, f
