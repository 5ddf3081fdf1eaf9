"""Topic names/filters, ``$share/`` parsing and the subscription trie (MQTT 5.0 section 4.7 and 4.8.2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microenvoy.mqtt.topics import (
    SharedFilter,
    SharedGroup,
    SubscriptionIndex,
    TopicLimits,
    parse_shared,
    topic_filter_error,
    topic_matches,
    topic_name_error,
)

# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "topic",
    ["a", "/", "a/b/c", "/finance", "sport/tennis/player1", "$SYS/broker", "a//b", " ", "ünïcødé/ß"],
)
def test_valid_topic_names(topic: str) -> None:
    assert topic_name_error(topic) is None


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("", "empty"),
        ("a/+", "wildcard"),
        ("a/#", "wildcard"),
        ("a+b", "wildcard"),
        ("a\x00b", "U+0000"),
    ],
)
def test_invalid_topic_names(topic: str, why: str) -> None:
    err = topic_name_error(topic)
    assert err is not None
    assert why in err


@pytest.mark.parametrize(
    "f",
    ["#", "+", "sport/#", "sport/tennis/#", "+/tennis/#", "sport/+/player1", "/+", "+/+", "$SYS/#", "a//b"],
)
def test_valid_filters(f: str) -> None:
    assert topic_filter_error(f) is None


@pytest.mark.parametrize(
    "f", ["", "sport/tennis#", "sport/tennis/#/ranking", "sport+", "a/#/b", "#/", "a\x00"]
)
def test_invalid_filters(f: str) -> None:
    # Section 4.7.1.2/4.7.1.3 examples: "sport/tennis#" and "sport/tennis/#/ranking" are invalid,
    # "sport+" is invalid.
    assert topic_filter_error(f) is not None


def test_limits_on_bytes_and_levels() -> None:
    limits = TopicLimits(max_bytes=10, max_levels=3)
    assert topic_name_error("a/b/c", limits) is None
    assert topic_name_error("a/b/c/d", limits) is not None
    assert topic_name_error("abcdefghij", limits) is None
    assert topic_name_error("abcdefghijk", limits) is not None
    assert topic_name_error("ééééé", limits) is None  # 10 bytes of UTF-8
    assert topic_name_error("éééééé", limits) is not None  # 12 bytes
    assert topic_filter_error("a/+/#", limits) is None
    assert topic_filter_error("a/+/b/#", limits) is not None


def test_protocol_maximum_is_the_default() -> None:
    assert topic_name_error("a" * 65535) is None
    assert topic_name_error("a" * 65536) is not None


# -------------------------------------------------------------------------------------------------- $share


def test_parse_shared() -> None:
    assert parse_shared("sport/tennis") is None
    assert parse_shared("$share/consumer1/sport/tennis/+") == SharedFilter("consumer1", "sport/tennis/+")
    assert parse_shared("$share/g/#") == SharedFilter("g", "#")
    assert parse_shared("$share/g//a") == SharedFilter("g", "/a")


@pytest.mark.parametrize(
    "f",
    [
        "$share/",
        "$share//a",
        "$share/g",
        "$share/g/",
        "$share/g+/a",
        "$share/#/a",
        "$share/g/a/#/b",
        "$share/+",
    ],
)
def test_malformed_shared(f: str) -> None:
    # [MQTT-4.8.2-1]: ShareName at least one character; [MQTT-4.8.2-2]: no "/", "+", "#", then "/" and a
    # topic filter.
    assert isinstance(parse_shared(f), str)


# -------------------------------------------------------------------------------------------------- matching

SPEC_EXAMPLES = [
    # 4.7.1.2 multi-level wildcard
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    # 4.7.1.3 single-level wildcard
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    # 4.7.2 topics beginning with $
    ("#", "$SYS/broker", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("+", "$SYS", False),
    # plain and case sensitive
    ("ACCOUNTS", "Accounts", False),
    ("a/b", "a/b", True),
    ("a/b", "a/b/", False),
    ("a/+/c", "a//c", True),
]


@pytest.mark.parametrize(("f", "topic", "want"), SPEC_EXAMPLES)
def test_spec_examples_reference(f: str, topic: str, want: bool) -> None:
    assert topic_matches(f, topic) is want


@pytest.mark.parametrize(("f", "topic", "want"), SPEC_EXAMPLES)
def test_spec_examples_index(f: str, topic: str, want: bool) -> None:
    idx: SubscriptionIndex[int] = SubscriptionIndex()
    idx.add(f, "c", 1)
    direct, shared = idx.match(topic)
    assert (len(direct) == 1) is want
    assert shared == []


def test_add_replace_remove_and_prune() -> None:
    idx: SubscriptionIndex[str] = SubscriptionIndex()
    assert idx.add("a/+/c", "c1", "v1")
    assert not idx.add("a/+/c", "c1", "v2")  # replaced
    assert idx.add("a/+/c", "c2", "w")
    assert len(idx) == 2
    assert idx.get("a/+/c", "c1") == "v2"
    direct, _ = idx.match("a/b/c")
    assert direct == [{"c1": "v2", "c2": "w"}]
    assert idx.remove("a/+/c", "c1")
    assert not idx.remove("a/+/c", "c1")
    assert not idx.remove("a/x", "c2")
    assert idx.remove("a/+/c", "c2")
    assert len(idx) == 0
    assert idx._root.empty()  # branches pruned


def test_overlapping_filters_of_one_client_each_reported() -> None:
    idx: SubscriptionIndex[str] = SubscriptionIndex()
    idx.add("TopicA/#", "c", "hash")
    idx.add("TopicA/+", "c", "plus")
    idx.add("TopicA/C", "c", "exact")
    direct, _ = idx.match("TopicA/C")
    assert sorted(v for d in direct for v in d.values()) == ["exact", "hash", "plus"]


def test_shared_groups() -> None:
    idx: SubscriptionIndex[str] = SubscriptionIndex()
    idx.add("sport/tennis/+", "c1", "s1", group="g1")
    idx.add("sport/tennis/+", "c2", "s2", group="g1")
    idx.add("sport/tennis/+", "c3", "s3", group="g2")
    idx.add("sport/tennis/+", "c4", "plain")
    direct, shared = idx.match("sport/tennis/player1")
    assert direct == [{"c4": "plain"}]
    assert sorted(g.name for g in shared) == ["g1", "g2"]
    assert idx.get("sport/tennis/+", "c2", "g1") == "s2"
    g1 = idx.group("sport/tennis/+", "g1")
    assert g1 is not None
    assert list(g1.members) == ["c1", "c2"]
    assert idx.remove("sport/tennis/+", "c1", "g1")
    assert idx.remove("sport/tennis/+", "c2", "g1")
    assert idx.group("sport/tennis/+", "g1") is None
    assert not idx.remove("sport/tennis/+", "c3", "g1")
    assert len(idx) == 2


def test_shared_group_round_robin_prefers_eligible() -> None:
    g: SharedGroup[int] = SharedGroup("g", "t")
    assert g.pick() is None
    for i, cid in enumerate(["a", "b", "c"]):
        g.members[cid] = i
    assert [g.pick()[0] for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]  # type: ignore[index]
    online = {"a", "c"}
    picks = [g.pick(online.__contains__) for _ in range(4)]
    assert [p[0] for p in picks if p] == ["a", "c", "a", "c"]
    # nobody eligible: still round robin over every member (their sessions queue it)
    got = {g.pick(lambda _c: False)[0] for _ in range(3)}  # type: ignore[index]
    assert got == {"a", "b", "c"}


def test_filters_iteration() -> None:
    idx: SubscriptionIndex[int] = SubscriptionIndex()
    idx.add("a/#", "c1", 1)
    idx.add("#", "c2", 2, group="g")
    assert sorted(idx.filters()) == [("#", "c2", "g", 2), ("a/#", "c1", None, 1)]


def test_matching_does_not_scan_all_subscriptions() -> None:
    idx: SubscriptionIndex[int] = SubscriptionIndex()
    for i in range(10_000):
        idx.add(f"devices/d{i}/telemetry", f"c{i}", i)
    idx.add("devices/+/telemetry", "w", -1)
    visited = 0
    real_get = dict.get

    class CountingDict(dict):  # type: ignore[type-arg]
        def get(self, key, default=None):  # type: ignore[no-untyped-def, override]
            nonlocal visited
            visited += 1
            return real_get(self, key, default)

    # Swap the nodes' children dicts for counting ones along the way the matcher walks.
    def wrap(node) -> None:  # type: ignore[no-untyped-def]
        node.children = CountingDict(node.children)
        for child in node.children.values():
            wrap(child)

    wrap(idx._root)
    direct, _ = idx.match("devices/d4242/telemetry")
    assert sorted(v for d in direct for v in d.values()) == [-1, 4242]
    assert visited < 30


# ------------------------------------------------------------------------------------- property: index == ref

_LEVEL = st.sampled_from(["a", "b", "", "$x", "c"])
_TOPIC = st.lists(_LEVEL, min_size=1, max_size=4).map("/".join).filter(lambda t: t != "")


@st.composite
def _filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from(["a", "b", "", "$x", "+"]), min_size=0, max_size=4))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    f = "/".join(levels)
    return f if f else "#"


@settings(max_examples=300, deadline=None)
@given(
    filters=st.lists(_filters(), min_size=1, max_size=12),
    topics=st.lists(_TOPIC, min_size=1, max_size=8),
    removals=st.lists(st.integers(min_value=0, max_value=11), max_size=4),
)
def test_index_matches_brute_force(filters: list[str], topics: list[str], removals: list[int]) -> None:
    idx: SubscriptionIndex[str] = SubscriptionIndex()
    live: dict[str, str] = {}
    for i, f in enumerate(filters):
        assert topic_filter_error(f) is None
        cid = f"c{i}"
        idx.add(f, cid, f)
        live[cid] = f
    for r in removals:
        cid = f"c{r}"
        if cid in live:
            assert idx.remove(live.pop(cid), cid)
    assert len(idx) == len(live)
    for topic in topics:
        direct, _ = idx.match(topic)
        got = sorted(cid for d in direct for cid in d)
        want = sorted(cid for cid, f in live.items() if topic_matches(f, topic))
        assert got == want, (topic, live)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab/+#$\x00", max_size=12))
def test_validators_never_raise_and_agree_with_matcher(text: str) -> None:
    name_ok = topic_name_error(text) is None
    filter_ok = topic_filter_error(text) is None
    if name_ok:
        assert filter_ok  # every topic name is also a valid filter (matching exactly itself)
        assert topic_matches(text, text)  # a name used as a filter matches exactly itself
    shared = parse_shared(text)
    assert shared is None or isinstance(shared, str | SharedFilter)
