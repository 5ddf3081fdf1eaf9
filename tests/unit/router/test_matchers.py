"""String/header matchers and their typed-config parsers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.config.model import HeaderMatcher, StringMatcher
from microenvoy.config.reader import Reader
from microenvoy.core.headers import Headers
from microenvoy.router.matchers import (
    compile_header_matcher,
    compile_string_matcher,
    header_value,
    parse_header_matcher,
    parse_string_matcher,
)


@pytest.mark.parametrize(
    ("kind", "value", "ignore_case", "subject", "expected"),
    [
        ("exact", "abc", False, b"abc", True),
        ("exact", "abc", False, b"ABC", False),
        ("exact", "abc", True, b"ABC", True),
        ("prefix", "ab", False, b"abc", True),
        ("prefix", "AB", True, b"abc", True),
        ("prefix", "bc", False, b"abc", False),
        ("suffix", "bc", False, b"abc", True),
        ("suffix", "BC", True, b"abc", True),
        ("contains", "b", False, b"abc", True),
        ("contains", "B", True, b"abc", True),
        ("contains", "x", False, b"abc", False),
        ("safe_regex", "a.c", False, b"abc", True),
        ("safe_regex", "a.c", False, b"abcd", False),  # full match
        ("safe_regex", "A.C", True, b"abc", False),  # ignore_case does not apply to regexes
    ],
)
def test_string_matcher(kind: str, value: str, ignore_case: bool, subject: bytes, expected: bool) -> None:
    assert compile_string_matcher(StringMatcher(kind, value, ignore_case))(subject) is expected


def test_header_value_joins() -> None:
    h = Headers([(b"a", b"1"), (b"b", b"x"), (b"a", b"2"), (b"a", b"3")])
    assert header_value(h, b"a") == b"1,2,3"
    assert header_value(h, b"b") == b"x"
    assert header_value(h, b"c") is None


@pytest.mark.parametrize(
    ("matcher", "present", "absent"),
    [
        (HeaderMatcher("x"), True, False),  # no specifier: present_match true
        (HeaderMatcher("x", present_match=True), True, False),
        (HeaderMatcher("x", present_match=False), False, True),
        (HeaderMatcher("x", present_match=True, invert_match=True), False, True),
        (HeaderMatcher("x", present_match=False, invert_match=True), True, False),
        (HeaderMatcher("x", StringMatcher("exact", "v")), True, False),
        (HeaderMatcher("x", StringMatcher("exact", "v"), invert_match=True), False, False),
        (HeaderMatcher("x", StringMatcher("exact", "other"), invert_match=True), True, False),
    ],
)
def test_header_matcher_presence_table(matcher: HeaderMatcher, present: bool, absent: bool) -> None:
    m = compile_header_matcher(matcher)
    assert m(Headers([(b"x", b"v")])) is present
    assert m(Headers([(b"y", b"v")])) is absent


def _parse(fn, raw: object):  # type: ignore[no-untyped-def]
    errors: list[str] = []
    r = Reader(raw, "m", errors)
    value = fn(r)
    r.finish()
    return value, errors


def test_parse_string_matcher() -> None:
    v, errors = _parse(parse_string_matcher, {"prefix": "/a", "ignore_case": True})
    assert errors == []
    assert v == StringMatcher("prefix", "/a", True)
    v, errors = _parse(parse_string_matcher, {"safe_regex": {"google_re2": {}, "regex": "a+"}})
    assert errors == []
    assert v == StringMatcher("safe_regex", "a+")


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({}, "m: one of exact, prefix"),
        ({"exact": "a", "prefix": "b"}, "m: only one of"),
        ({"safe_regex": {"regex": "("}}, "m.safe_regex.regex: invalid regex"),
        ({"exact": 3}, "m.exact: expected a string"),
        ({"exact": "a", "bogus": 1}, "m.bogus: unknown field"),
    ],
)
def test_parse_string_matcher_errors(raw: object, error: str) -> None:
    _, errors = _parse(parse_string_matcher, raw)
    assert any(e.startswith(error) for e in errors), errors


def test_parse_header_matcher_forms() -> None:
    v, errors = _parse(
        parse_header_matcher, {"name": "X-A", "string_match": {"exact": "1"}, "invert_match": True}
    )
    assert errors == []
    assert v == HeaderMatcher("x-a", StringMatcher("exact", "1"), invert_match=True)
    v, errors = _parse(parse_header_matcher, {"name": ":method", "exact_match": "GET"})
    assert errors == []
    assert v == HeaderMatcher(":method", StringMatcher("exact", "GET"))
    v, errors = _parse(parse_header_matcher, {"name": "x", "safe_regex_match": {"regex": "a|b"}})
    assert errors == []
    assert v == HeaderMatcher("x", StringMatcher("safe_regex", "a|b"))
    v, errors = _parse(parse_header_matcher, {"name": "x", "present_match": False})
    assert errors == []
    assert v == HeaderMatcher("x", present_match=False)
    v, errors = _parse(parse_header_matcher, {"name": "x"})
    assert errors == []
    assert v == HeaderMatcher("x", present_match=True)  # Envoy: no specifier = must be present


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"exact_match": "x"}, "m.name: required field is missing"),
        ({"name": "x", "range_match": {"start": 1, "end": 2}}, "m.range_match: not supported"),
        ({"name": "x", "exact_match": "a", "prefix_match": "b"}, "m: only one of"),
        ({"name": "x", "string_match": {"safe_regex": {"regex": "["}}}, "m.string_match.safe_regex.regex"),
        ({"name": "x", "typo": 1}, "m.typo: unknown field"),
    ],
)
def test_parse_header_matcher_errors(raw: object, error: str) -> None:
    _, errors = _parse(parse_header_matcher, raw)
    assert any(e.startswith(error) for e in errors), errors


@given(st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=8)), max_size=6))
def test_header_matchers_never_raise(items: list[tuple[bytes, bytes]]) -> None:
    h = Headers(items)
    for m in (
        HeaderMatcher("x", StringMatcher("safe_regex", r"\d+")),
        HeaderMatcher("x", StringMatcher("contains", "é", ignore_case=True)),
        HeaderMatcher("x", present_match=False, invert_match=True),
    ):
        assert compile_header_matcher(m)(h) in (True, False)
