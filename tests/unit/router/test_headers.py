"""Header options: append actions, removal, formatters, rewrites."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.config.model import HeaderValueOption
from microenvoy.core.exchange import DownstreamInfo, Exchange
from microenvoy.core.headers import Headers
from microenvoy.router.headers import HeaderMutation, compile_value, levels_in_order, rewrite_path


def _exchange(**headers: str) -> Exchange:
    h = Headers([(b":method", b"GET"), (b":path", b"/p?q")])
    for k, v in headers.items():
        h.add(k.replace("_", "-").encode(), v.encode())
    return Exchange(
        request_headers=h,
        downstream=DownstreamInfo("HTTP/3", ("2001:db8::1", 4433), ("10.0.0.2", 443), "l", sni="sni.example"),
        start_time=12.0,
        wall_start=1_700_000_000.123456,
        upstream_host="10.1.1.1:8080",
        upstream_cluster="backend",
    )


@pytest.mark.parametrize(
    ("action", "before", "after"),
    [
        ("APPEND_IF_EXISTS_OR_ADD", [], [b"new"]),
        ("APPEND_IF_EXISTS_OR_ADD", [b"old"], [b"old", b"new"]),
        ("ADD_IF_ABSENT", [], [b"new"]),
        ("ADD_IF_ABSENT", [b"old"], [b"old"]),
        ("OVERWRITE_IF_EXISTS_OR_ADD", [], [b"new"]),
        ("OVERWRITE_IF_EXISTS_OR_ADD", [b"old", b"old2"], [b"new"]),
        ("OVERWRITE_IF_EXISTS", [], []),
        ("OVERWRITE_IF_EXISTS", [b"old"], [b"new"]),
    ],
)
def test_append_actions(action: str, before: list[bytes], after: list[bytes]) -> None:
    h = Headers([(b"x", v) for v in before])
    HeaderMutation((HeaderValueOption("X", "new", action),)).apply(h, _exchange())
    assert h.get_all(b"x") == after


def test_remove_happens_before_add_and_decisions_use_old_headers() -> None:
    h = Headers([(b"x-gone", b"1"), (b"x-reset", b"old")])
    m = HeaderMutation(
        (
            HeaderValueOption("x-reset", "new", "ADD_IF_ABSENT"),
            HeaderValueOption("x-twice", "a", "ADD_IF_ABSENT"),
            HeaderValueOption("x-twice", "b", "ADD_IF_ABSENT"),
            HeaderValueOption("x-over", "1", "OVERWRITE_IF_EXISTS_OR_ADD"),
            HeaderValueOption("x-over", "2", "OVERWRITE_IF_EXISTS_OR_ADD"),
        ),
        ("x-gone", "X-Reset"),
    )
    assert m
    m.apply(h, _exchange())
    assert b"x-gone" not in h
    assert h.get_all(b"x-reset") == [b"new"]  # removed first, so "absent"
    assert h.get_all(b"x-twice") == [b"a", b"b"]  # both decided against the headers before this level
    assert h.get_all(b"x-over") == [b"2"]


def test_empty_value_adds_nothing() -> None:
    h = Headers()
    HeaderMutation((HeaderValueOption("x-up", "%UPSTREAM_HOST%"),)).apply(
        h,
        Exchange(Headers(), DownstreamInfo("HTTP/1.1", ("1.2.3.4", 1), ("5.6.7.8", 2), "l"), 0.0),
    )
    assert b"x-up" not in h


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", b"plain"),
        ("100%%", b"100%"),
        ("%DOWNSTREAM_REMOTE_ADDRESS%", b"[2001:db8::1]:4433"),
        ("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", b"2001:db8::1"),
        ("%DOWNSTREAM_LOCAL_ADDRESS%", b"10.0.0.2:443"),
        ("%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", b"10.0.0.2"),
        ("proto=%PROTOCOL%;", b"proto=HTTP/3;"),
        ("%REQUESTED_SERVER_NAME%", b"sni.example"),
        ("%REQ(:path)%", b"/p?q"),
        ("%REQ(X-Missing?x-user)%", b"alice"),
        ("%REQ(x-user):3%", b"ali"),
        ("%REQ(x-missing)%", b""),
        ("%START_TIME%", b"2023-11-14T22:13:20.123Z"),
        ("%START_TIME(%s)%", b"1700000000"),
        ("%START_TIME(%Y/%E6S)%", b"2023/20.123456"),
        ("%START_TIME(%3f)%", b"123"),
        ("%UPSTREAM_HOST%", b"10.1.1.1:8080"),
        ("%UPSTREAM_CLUSTER%-x", b"backend-x"),
    ],
)
def test_formatters(value: str, expected: bytes) -> None:
    compiled = compile_value(value)
    got = compiled if isinstance(compiled, bytes) else compiled(_exchange(x_user="alice"))
    assert got == expected


def test_literal_values_compile_to_bytes() -> None:
    assert compile_value("no formatter here") == b"no formatter here"
    assert compile_value("50%%") == b"50%"


@pytest.mark.parametrize(
    "value", ["%NOPE%", "50%", "%REQ()%", "%PROTOCOL(x)%", "%PROTOCOL:3%", "%START_TIME:2%"]
)
def test_bad_formats(value: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  # the message is checked via the route table tests
        compile_value(value)


@pytest.mark.parametrize(
    ("key", "what"),
    [(":path", "request"), ("host", "request"), (":status", "response"), ("", "request")],
)
def test_protected_headers_rejected(key: str, what: str) -> None:
    with pytest.raises(ValueError, match="headers_to_add"):
        HeaderMutation((HeaderValueOption(key, "v"),), what=what)
    if key:
        with pytest.raises(ValueError, match="headers_to_remove"):
            HeaderMutation((), (key,), what=what)


def test_host_may_be_set_on_responses() -> None:
    HeaderMutation((HeaderValueOption("host", "v"),), what="response")


def test_levels_in_order_skips_empty() -> None:
    a = HeaderMutation((HeaderValueOption("a", "1"),))
    empty = HeaderMutation()
    c = HeaderMutation((HeaderValueOption("c", "1"),))
    assert levels_in_order(a, empty, c) == (a, c)
    assert levels_in_order(a, empty, c, most_specific_wins=True) == (c, a)


@pytest.mark.parametrize(
    ("path", "prefix", "rewrite", "expected"),
    [
        (b"/api/v1/x?y=1", b"/api/", b"/", b"/v1/x?y=1"),
        (b"/API/v1", b"/api/", b"/new/", b"/new/v1"),
        (b"/api", b"/api", b"/", b"/"),
        (b"/prefix/etc", b"/prefix", b"/", b"//etc"),  # Envoy's documented gotcha
        (b"/other", b"/api", b"/x", b"/other"),
    ],
)
def test_rewrite_path(path: bytes, prefix: bytes, rewrite: bytes, expected: bytes) -> None:
    assert rewrite_path(path, prefix, rewrite) == expected


@given(st.binary(max_size=30), st.binary(max_size=10), st.binary(max_size=10))
def test_rewrite_path_keeps_the_tail(path: bytes, prefix: bytes, rewrite: bytes) -> None:
    out = rewrite_path(path, prefix, rewrite)
    if path[: len(prefix)].lower() == prefix.lower():
        assert out == rewrite + path[len(prefix) :]
    else:
        assert out == path
