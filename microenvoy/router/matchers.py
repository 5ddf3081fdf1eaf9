"""Compiled string and header matchers (Envoy's ``StringMatcher`` and ``HeaderMatcher``), shared by the route
table and the filters (rbac, fault, health_check), plus their typed-config parsers.

Matchers work on ``bytes`` (what the codecs hand us), are compiled once at config load and are plain
callables on the hot path. Semantics follow Envoy's ``HeaderUtility::matchHeaders``:

* several fields with the same name are joined with ``,`` before matching;
* a *missing* header never matches a string matcher, whether or not ``invert_match`` is set; only
  ``present_match`` sees absence (``present_match: false`` matches a missing header, and ``invert_match``
  flips ``present_match``);
* a matcher with no match specifier means ``present_match: true``;
* ``safe_regex`` is a full match (Python ``re`` stands in for RE2; ``ignore_case`` does not apply to it,
  as in Envoy).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from microenvoy.config.model import HeaderMatcher, StringMatcher
from microenvoy.core.headers import Headers

__all__ = [
    "BytesMatcher",
    "HeadersMatcher",
    "compile_header_matcher",
    "compile_header_matchers",
    "compile_string_matcher",
    "header_value",
    "parse_header_matcher",
    "parse_string_matcher",
]

BytesMatcher = Callable[[bytes], bool]
"""A compiled string matcher: value -> matched."""
HeadersMatcher = Callable[[Headers], bool]
"""A compiled header matcher: request headers -> matched."""

_STRING_KINDS = ("exact", "prefix", "suffix", "contains", "safe_regex")


def compile_string_matcher(m: StringMatcher) -> BytesMatcher:
    """Compile a ``StringMatcher`` into a ``bytes -> bool`` callable. Raises ``re.error`` on a bad regex."""
    if m.kind == "safe_regex":
        rx = re.compile(m.value.encode("utf-8"))
        return lambda v: rx.fullmatch(v) is not None
    if m.kind not in _STRING_KINDS:
        raise ValueError(f"unknown string matcher kind {m.kind!r}")
    want = m.value.encode("utf-8")
    if m.ignore_case:
        want = want.lower()
        if m.kind == "exact":
            return lambda v: v.lower() == want
        if m.kind == "prefix":
            return lambda v: v.lower().startswith(want)
        if m.kind == "suffix":
            return lambda v: v.lower().endswith(want)
        return lambda v: want in v.lower()
    if m.kind == "exact":
        return lambda v: v == want
    if m.kind == "prefix":
        return lambda v: v.startswith(want)
    if m.kind == "suffix":
        return lambda v: v.endswith(want)
    return lambda v: want in v


def header_value(headers: Headers, name: bytes) -> bytes | None:
    """All values of ``name`` joined by ``,`` (Envoy's ``getAllOfHeaderAsString``), None when absent."""
    first: bytes | None = None
    rest: list[bytes] | None = None
    for k, v in headers.items():
        if k == name:
            if first is None:
                first = v
            elif rest is None:
                rest = [first, v]
            else:
                rest.append(v)
    if rest is not None:
        return b",".join(rest)
    return first


def compile_header_matcher(m: HeaderMatcher) -> HeadersMatcher:
    """Compile one ``HeaderMatcher`` (see the module docstring for missing-header semantics)."""
    name = m.name.lower().encode("latin-1", "replace")
    invert = m.invert_match
    if m.string_match is None:
        present = True if m.present_match is None else m.present_match
        # Absent: matches iff present_match is false (not inverted) / true (inverted).
        # Present: matches iff present_match is true, flipped by invert.
        on_present = present != invert
        on_absent = (not present) != invert
        return lambda h: on_present if header_value(h, name) is not None else on_absent
    string = compile_string_matcher(m.string_match)

    def match(h: Headers) -> bool:
        v = header_value(h, name)
        if v is None:
            return False
        return string(v) != invert

    return match


def compile_header_matchers(ms: tuple[HeaderMatcher, ...]) -> HeadersMatcher | None:
    """All of ``ms`` must match (None when there are none: nothing to check)."""
    if not ms:
        return None
    compiled = tuple(compile_header_matcher(m) for m in ms)
    if len(compiled) == 1:
        return compiled[0]
    return lambda h: all(c(h) for c in compiled)


# ------------------------------------------------------------------------------------- parsing
# Parsing lives with the rest of the config reading; re-exported here for the filters that match headers.
from microenvoy.config.loader import parse_header_matcher, parse_string_matcher  # noqa: E402
