"""Bridge route topic filters with captures, and path templates."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from microenvoy.router.topic_routes import (
    TopicRouteTable,
    compile_path_template,
    compile_topic_filter,
    fill_path,
)


@pytest.mark.parametrize(
    ("flt", "topic", "want"),
    [
        ("devices/{device}/telemetry", "devices/d1/telemetry", {"device": "d1"}),
        ("devices/{device}/telemetry", "devices/d1/status", None),
        ("devices/{device}/telemetry", "devices/d1/telemetry/x", None),
        ("sites/{site}/+/status", "sites/s1/gw/status", {"site": "s1"}),
        ("logs/#", "logs", {"#": ""}),
        ("logs/#", "logs/a/b", {"#": "a/b"}),
        ("logs/#", "log", None),
        ("#", "a/b", {"#": "a/b"}),
        ("#", "$SYS/x", None),  # [MQTT-4.7.2-1]
        ("+/x", "$SYS/x", None),
        ("{who}/x", "$SYS/x", None),
        ("$SYS/#", "$SYS/x", {"#": "x"}),
        ("a//b", "a//b", {}),
        ("{a}/{b}", "x/", {"a": "x", "b": ""}),
    ],
)
def test_match(flt: str, topic: str, want: dict[str, str] | None) -> None:
    assert compile_topic_filter(flt).match(topic) == want


@pytest.mark.parametrize(
    ("flt", "err"),
    [
        ("", "must not be empty"),
        ("a/#/b", "level 2"),
        ("a/b#", "level 2"),
        ("a+/b", "level 1"),
        ("{x}/{x}", "used twice"),
        ("{topic}/x", "reserved"),
        ("a/{b", "level 2"),
    ],
)
def test_bad_filters_name_the_level(flt: str, err: str) -> None:
    with pytest.raises(ValueError, match=err):
        compile_topic_filter(flt)


def test_path_templates() -> None:
    f = compile_topic_filter("devices/{device}/#")
    pieces = compile_path_template("/v1/devices/{device}/data/{#}", f.names)
    caps = f.match("devices/a b/x/y")
    assert caps is not None
    assert fill_path(pieces, "devices/a b/x/y", caps) == "/v1/devices/a%20b/data/x/y"
    whole = compile_path_template("/ingest/{topic}", f.names)
    assert fill_path(whole, "devices/d/x", {"device": "d", "#": "x"}) == "/ingest/devices/d/x"
    with pytest.raises(ValueError, match="unknown placeholder"):
        compile_path_template("/x/{nope}", f.names)
    with pytest.raises(ValueError, match="start with"):
        compile_path_template("x", f.names)
    seg = compile_path_template("/d/{device}", f.names)
    assert fill_path(seg, "t", {"device": "a/b"}) == "/d/a%2Fb"  # one capture never becomes two segments


def test_first_route_wins() -> None:
    table = TopicRouteTable([compile_topic_filter("a/{x}"), compile_topic_filter("#")])
    assert table.match("a/1") == (0, {"x": "1"})
    assert table.match("b") == (1, {"#": "b"})
    assert TopicRouteTable([compile_topic_filter("a")]).match("b") is None


def _reference(flt: str, topic: str) -> bool:
    f, t = flt.split("/"), topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


_level = st.sampled_from(["a", "b", "", "$x"])


@given(
    st.lists(st.sampled_from(["a", "b", "+", ""]), min_size=1, max_size=4),
    st.booleans(),
    st.lists(_level, min_size=1, max_size=5),
)
def test_matches_like_mqtt_wildcards(levels: list[str], hash_tail: bool, topic_levels: list[str]) -> None:
    flt = "/".join([*levels, "#"] if hash_tail else levels)
    assume(flt != "")  # an empty filter is invalid (tested above)
    topic = "/".join(topic_levels)
    assert (compile_topic_filter(flt).match(topic) is not None) == _reference(flt, topic)
