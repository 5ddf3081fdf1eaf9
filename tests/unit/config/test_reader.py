"""The path-carrying ``Reader`` and ``parse_duration`` (property-based: arbitrary input never crashes)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.config.reader import Reader, parse_duration

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
duration_like = st.one_of(
    json_values,
    st.from_regex(r"\A-?\d{1,400}(\.\d{0,30})?\s?(s|ms|m|h|)\s?\Z"),
    st.fixed_dictionaries({}, optional={"seconds": json_values, "nanos": json_values}),
    st.integers(min_value=10**300, max_value=10**400),
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5s", 5.0),
        ("0.25s", 0.25),
        ("250ms", 0.25),
        (" 1s ", 1.0),
        ("0s", 0.0),
        (3, 3.0),
        (0.5, 0.5),
        ({"seconds": 2, "nanos": 500_000_000}, 2.5),
        ({}, 0.0),
    ],
)
def test_parse_duration_accepts_envoy_forms(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "5",
        "5 s",
        "-1s",
        "1m",
        "1h",
        "s",
        "",
        ".5s",
        "1e3s",
        True,
        None,
        [],
        float("nan"),
        float("inf"),
        -1,
        {"seconds": -1},
        {"seconds": "1"},
        {"seconds": None},
        {"minutes": 1},
        10**400,
        "9" * 400 + "s",
    ],
)
def test_parse_duration_rejects_everything_else(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@given(duration_like)
def test_parse_duration_raises_only_value_error(value: object) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return
    assert isinstance(seconds, float)
    assert math.isfinite(seconds)
    assert seconds >= 0


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=999), st.booleans())
def test_parse_duration_string_round_trip(whole: int, frac: int, millis: bool) -> None:
    text = f"{whole}.{frac:03d}{'ms' if millis else 's'}"
    expected = (whole + frac / 1000) / (1000 if millis else 1)
    assert parse_duration(text) == pytest.approx(expected)


@given(json_values)
def test_reader_accessors_never_raise_and_always_report(value: Any) -> None:
    """Every accessor either accepts the value or records an error mentioning the path."""
    for call in (
        lambda r: r.string("k"),
        lambda r: r.boolean("k"),
        lambda r: r.integer("k", min=0, max=10),
        lambda r: r.number("k", min=0.0),
        lambda r: r.duration("k"),
        lambda r: r.enum("k", ("A", "B")),
        lambda r: r.strings("k"),
        lambda r: r.objects("k", lambda x: x.string("name")),
        lambda r: r.object("k", lambda x: x.integer("n")),
    ):
        errors: list[str] = []
        r = Reader({"k": value}, "root", errors)
        call(r)
        r.finish()
        assert all(e.startswith("root.k") for e in errors), errors


def test_unknown_fields_are_reported_with_their_path() -> None:
    errors: list[str] = []
    r = Reader({"known": 1, "typo": 2}, "a.b[3]", errors)
    assert r.integer("known") == 1
    r.finish()
    assert errors == ["a.b[3].typo: unknown field"]


def test_nested_paths_and_required_fields() -> None:
    errors: list[str] = []
    r = Reader({"items": [{"name": "x"}, {}, "oops"]}, "top", errors)
    names = r.objects("items", lambda x: x.string("name", required=True))
    r.finish()
    assert names == ("x", "", "")
    assert errors == [
        "top.items[1].name: required field is missing",
        "top.items[2]: expected a mapping, got string",
    ]


def test_integer_forms_and_bounds() -> None:
    errors: list[str] = []
    r = Reader({"a": {"value": 7}, "b": "42", "c": True, "d": 11, "e": "²"}, "", errors)
    assert (r.integer("a"), r.integer("b"), r.integer("c", -1), r.integer("d", -1, max=10)) == (7, 42, -1, -1)
    assert r.integer("e", -1) == -1
    assert errors == [
        "c: expected an integer, got bool",
        "d: must be <= 10, got 11",
        "e: expected an integer, got string",
    ]


def test_one_of() -> None:
    errors: list[str] = []
    r = Reader({"x": 1, "y": 2}, "m", errors)
    assert r.one_of("x", "y", "z") == "x"
    assert Reader({}, "n", errors).one_of("x", "y") is None
    assert errors == ["m: only one of x, y, z may be set, got x, y", "n: one of x, y is required"]


def test_duration_error_carries_path() -> None:
    errors: list[str] = []
    assert Reader({"t": "5 s"}, "c", errors).duration("t", 1.0) == 1.0
    assert errors == ["c.t: expected a duration like '5s', '0.25s' or '250ms', got '5 s'"]
