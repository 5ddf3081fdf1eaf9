"""RouteTable: virtual host precedence, route match kinds, header/grpc matchers, entries and config errors."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microenvoy.config.model import (
    DirectResponse,
    HeaderMatcher,
    HeaderValueOption,
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    StringMatcher,
    VirtualHost,
    WeightedCluster,
)
from microenvoy.core.errors import ConfigError
from microenvoy.core.exchange import DownstreamInfo, Exchange
from microenvoy.core.headers import Headers
from microenvoy.router import RouteTable, split_host_port


def _route(name: str, cluster: str | None = None, **match: object) -> Route:
    return Route(match=RouteMatch(**match), route=RouteAction(cluster=cluster or name), name=name)  # type: ignore[arg-type]


def _vh(name: str, *domains: str, routes: tuple[Route, ...] | None = None) -> VirtualHost:
    return VirtualHost(name=name, domains=domains, routes=routes or (_route(name, prefix="/"),))


def _req(authority: str | None = "example.com", path: str = "/", **extra: str) -> Headers:
    items = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", path.encode())]
    if authority is not None:
        items.append((b":authority", authority.encode()))
    items += [(k.replace("_", "-").encode(), v.encode()) for k, v in extra.items()]
    return Headers(items)


def _vhost_name(table: RouteTable, authority: str | None) -> str | None:
    m = table.match(_req(authority))
    return m[0].name if m else None


# ------------------------------------------------------------------------------ virtual hosts
@pytest.fixture
def domains_table() -> RouteTable:
    return RouteTable(
        RouteConfiguration(
            virtual_hosts=(
                _vh("default", "*"),
                _vh("suffix_short", "*.com"),
                _vh("suffix_long", "*.example.com"),
                _vh("suffix_dash", "*-api.example.com"),
                _vh("prefix_short", "api.*"),
                _vh("prefix_long", "api.example.*"),
                _vh("exact", "www.example.com"),
                _vh("exact_port", "www.example.com:8443"),
            )
        )
    )


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("www.example.com", "exact"),
        ("WWW.Example.COM", "exact"),
        ("www.example.com:8080", "exact"),  # port stripped
        ("www.example.com:8443", "exact_port"),  # exact with port beats the stripped host
        ("foo.example.com", "suffix_long"),  # longest suffix wins over *.com
        ("foo-api.example.com", "suffix_dash"),  # "-api.example.com" is longer than ".example.com"
        ("foo.com", "suffix_short"),
        ("api.example.org", "prefix_long"),  # no suffix matches; longest prefix
        ("api.other.org", "prefix_short"),
        ("api.example.com", "suffix_long"),  # suffix wildcards beat prefix wildcards
        ("other.org", "default"),
        ("", "default"),
        (None, "default"),
    ],
)
def test_domain_precedence(domains_table: RouteTable, authority: str | None, expected: str) -> None:
    assert _vhost_name(domains_table, authority) == expected
    # twice: the second lookup comes from the host cache
    assert _vhost_name(domains_table, authority) == expected


def test_wildcard_never_matches_empty() -> None:
    table = RouteTable(RouteConfiguration(virtual_hosts=(_vh("s", "*.example.com"), _vh("p", "api.*"))))
    assert _vhost_name(table, ".example.com") is None
    assert _vhost_name(table, "api.") is None
    assert _vhost_name(table, "x.example.com") == "s"


def test_no_default_vhost_means_no_match() -> None:
    table = RouteTable(RouteConfiguration(virtual_hosts=(_vh("a", "a.example"),)))
    assert table.match(_req("b.example")) is None
    assert table.match(_req(None)) is None


def test_host_header_used_when_no_authority() -> None:
    table = RouteTable(RouteConfiguration(virtual_hosts=(_vh("a", "a.example"), _vh("d", "*"))))
    h = Headers([(b":method", b"GET"), (b":path", b"/"), (b"host", b"a.example:80")])
    m = table.match(h)
    assert m is not None
    assert m[0].name == "a"


def test_host_cache_is_bounded() -> None:
    table = RouteTable(RouteConfiguration(virtual_hosts=(_vh("d", "*"),)))
    for i in range(1000):
        assert _vhost_name(table, f"h{i}.example") == "d"
    assert len(table._host_cache) <= 256


@pytest.mark.parametrize(
    ("authority", "host"),
    [
        (b"example.com:80", b"example.com"),
        (b"example.com", b"example.com"),
        (b"[::1]:8080", b"[::1]"),
        (b"[::1]", b"[::1]"),
        (b"::1", b"::1"),
        (b"example.com:abc", b"example.com:abc"),
    ],
)
def test_split_host_port(authority: bytes, host: bytes) -> None:
    assert split_host_port(authority) == host


# ------------------------------------------------------------------------------------- routes
def _table(*routes: Route) -> RouteTable:
    return RouteTable(RouteConfiguration(virtual_hosts=(_vh("vh", "*", routes=routes),)))


def _route_name(table: RouteTable, path: str = "/", **extra: str) -> str | None:
    m = table.match(_req(path=path, **extra))
    return m[1].name if m else None


def test_first_match_wins() -> None:
    table = _table(_route("a", prefix="/api"), _route("b", prefix="/api/v1"), _route("c", prefix="/"))
    assert _route_name(table, "/api/v1/x") == "a"
    assert _route_name(table, "/other") == "c"


def test_prefix_path_regex_ignore_query_and_fragment() -> None:
    table = _table(
        _route("path", path="/exact"),
        _route("regex", safe_regex=r"/items/\d+"),
        _route("prefix", prefix="/p/"),
    )
    assert _route_name(table, "/exact") == "path"
    assert _route_name(table, "/exact?x=1") == "path"
    assert _route_name(table, "/exact#frag") == "path"
    assert _route_name(table, "/exact/more") is None
    assert _route_name(table, "/items/42") == "regex"
    assert _route_name(table, "/items/42?q=/items/x") == "regex"
    assert _route_name(table, "/items/42x") is None  # full match, not search
    assert _route_name(table, "/x/items/42") is None
    assert _route_name(table, "/p/?a") == "prefix"
    assert _route_name(table, "/p?x=/p/") is None  # the prefix is checked on the path only


def test_case_insensitive() -> None:
    table = _table(
        _route("ci_prefix", prefix="/API", case_sensitive=False),
        _route("ci_path", path="/Exact", case_sensitive=False),
        _route("cs_prefix", prefix="/Case"),
    )
    assert _route_name(table, "/api/x") == "ci_prefix"
    assert _route_name(table, "/aPi") == "ci_prefix"
    assert _route_name(table, "/EXACT") == "ci_path"
    assert _route_name(table, "/Case/x") == "cs_prefix"
    assert _route_name(table, "/case/x") is None


def test_grpc_match() -> None:
    table = _table(_route("grpc", prefix="/", grpc=True), _route("http", prefix="/"))
    assert _route_name(table, "/svc/M", content_type="application/grpc") == "grpc"
    assert _route_name(table, "/svc/M", content_type="application/grpc+proto") == "grpc"
    assert _route_name(table, "/svc/M", content_type="application/json") == "http"
    assert _route_name(table, "/svc/M") == "http"


def test_header_matchers() -> None:
    table = _table(
        _route("exact", prefix="/", headers=(HeaderMatcher("x-a", StringMatcher("exact", "1")),)),
        _route("regex", prefix="/", headers=(HeaderMatcher("x-b", StringMatcher("safe_regex", r"v\d")),)),
        _route("present", prefix="/", headers=(HeaderMatcher("x-c", present_match=True),)),
        _route("absent", prefix="/", headers=(HeaderMatcher("x-d", present_match=False),)),
        _route(
            "inverted",
            prefix="/",
            headers=(HeaderMatcher("x-e", StringMatcher("prefix", "no"), invert_match=True),),
        ),
        _route(
            "method_and",
            prefix="/",
            headers=(
                HeaderMatcher(":method", StringMatcher("exact", "POST")),
                HeaderMatcher("x-f", StringMatcher("contains", "mid", ignore_case=True)),
            ),
        ),
        _route("fallback", prefix="/", headers=(HeaderMatcher("x-d", present_match=True),)),
    )
    assert _route_name(table, x_a="1", x_d="") == "exact"
    assert _route_name(table, x_b="v7", x_d="") == "regex"
    assert _route_name(table, x_b="v77", x_d="") == "fallback"
    assert _route_name(table, x_c="", x_d="") == "present"
    assert _route_name(table) == "absent"
    assert _route_name(table, x_e="yes", x_d="") == "inverted"
    assert _route_name(table, x_e="nope", x_d="") == "fallback"
    # a missing header never matches a string matcher, even inverted (Envoy)
    assert _route_name(table, x_d="") == "fallback"
    h = _req(x_f="aMIDb", x_d="")
    h.set(b":method", b"POST")
    m = table.match(h)
    assert m is not None
    assert m[1].name == "method_and"


def test_header_matcher_joins_multiple_values() -> None:
    table = _table(
        _route("joined", prefix="/", headers=(HeaderMatcher("x-v", StringMatcher("exact", "a,b")),))
    )
    h = _req()
    h.add(b"x-v", b"a")
    assert table.match(h) is None
    h.add(b"x-v", b"b")
    assert table.match(h) is not None


# ------------------------------------------------------------------------------------ entries
def _exchange(headers: Headers) -> Exchange:
    return Exchange(
        request_headers=headers,
        downstream=DownstreamInfo("HTTP/2", ("10.0.0.1", 5555), ("10.0.0.2", 443), "l"),
        start_time=0.0,
    )


def test_entry_prefix_and_host_rewrite() -> None:
    route = Route(
        match=RouteMatch(prefix="/API/", case_sensitive=False),
        route=RouteAction(cluster="c", prefix_rewrite="/v2/", host_rewrite_literal="backend.internal"),
    )
    table = _table(route)
    h = _req("example.com", "/api/items?x=1")
    h.add(b"host", b"example.com")
    entry = table.match_entry(h)
    assert entry is not None
    entry.finalize_request_headers(h, _exchange(h), insert_original_path=True)
    assert h.get(b":path") == b"/v2/items?x=1"
    assert h.get(b":authority") == b"backend.internal"
    assert h.get(b"host") == b"backend.internal"
    assert h.get(b"x-envoy-original-path") == b"/api/items?x=1"


def test_entry_path_match_rewrite_keeps_query() -> None:
    table = _table(
        Route(match=RouteMatch(path="/old"), route=RouteAction(cluster="c", prefix_rewrite="/new"))
    )
    h = _req(path="/old?q=1")
    entry = table.match_entry(h)
    assert entry is not None
    entry.finalize_request_headers(h, _exchange(h))
    assert h.get(b":path") == b"/new?q=1"
    assert b"x-envoy-original-path" not in h


def test_entry_header_levels_order() -> None:
    def opt(value: str, action: str = "OVERWRITE_IF_EXISTS_OR_ADD") -> tuple[HeaderValueOption, ...]:
        return (HeaderValueOption("x-level", value, action),)

    route = Route(
        match=RouteMatch(prefix="/"),
        route=RouteAction(cluster="c"),
        request_headers_to_add=(*opt("route"), HeaderValueOption("x-acc", "route")),
        response_headers_to_add=opt("route"),
    )
    vh = VirtualHost(
        name="vh",
        domains=("*",),
        routes=(route,),
        request_headers_to_add=(*opt("vhost"), HeaderValueOption("x-acc", "vhost")),
        response_headers_to_remove=("server",),
    )
    cfg = RouteConfiguration(
        virtual_hosts=(vh,),
        request_headers_to_add=(*opt("config"), HeaderValueOption("x-acc", "config")),
    )
    h = _req()
    entry = RouteTable(cfg).match_entry(h)
    assert entry is not None
    entry.finalize_request_headers(h, _exchange(h))
    # Envoy's default: route, then vhost, then config: the least specific overwrite wins
    assert h.get_all(b"x-level") == [b"config"]
    assert h.get_all(b"x-acc") == [b"route", b"vhost", b"config"]

    h2 = _req()
    entry2 = RouteTable(cfg, most_specific_header_mutations_wins=True).match_entry(h2)
    assert entry2 is not None
    entry2.finalize_request_headers(h2, _exchange(h2))
    assert h2.get_all(b"x-level") == [b"route"]

    resp = Headers([(b":status", b"200"), (b"server", b"up")])
    entry.finalize_response_headers(resp, _exchange(h))
    assert resp.get(b"x-level") == b"route"
    assert b"server" not in resp


def test_entry_weighted_clusters_and_retry_policy_fallback() -> None:
    vh_policy = RetryPolicy(retry_on=("5xx",), num_retries=2)
    route_policy = RetryPolicy(retry_on=("reset",), num_retries=4)
    routes = (
        Route(
            match=RouteMatch(prefix="/w"),
            route=RouteAction(weighted_clusters=(WeightedCluster("a", 1), WeightedCluster("b", 3))),
            name="w",
        ),
        Route(match=RouteMatch(prefix="/r"), route=RouteAction(cluster="c", retry_policy=route_policy)),
        Route(match=RouteMatch(prefix="/d"), direct_response=DirectResponse(204)),
    )
    table = RouteTable(
        RouteConfiguration(
            virtual_hosts=(VirtualHost("vh", ("*",), routes, retry_policy=vh_policy),),
        )
    )
    w = table.match_entry(_req(path="/w"))
    assert w is not None
    assert w.cluster is None
    assert w.retry_policy is vh_policy
    rng = random.Random(1)
    picks = [w.cluster_name(rng) for _ in range(4000)]
    assert set(picks) == {"a", "b"}
    assert 0.2 < picks.count("a") / len(picks) < 0.3
    r = table.match_entry(_req(path="/r"))
    assert r is not None
    assert r.cluster_name(rng) == "c"
    assert r.retry_policy is route_policy
    state = r.retry_state(rng)
    assert state is not None
    assert state.retries_left == 4
    d = table.match_entry(_req(path="/d"))
    assert d is not None
    assert d.route.direct_response == DirectResponse(204)
    assert d.cluster_name(rng) is None


# ------------------------------------------------------------------------------ config errors
def test_config_errors_carry_paths() -> None:
    bad = RouteConfiguration(
        virtual_hosts=(
            VirtualHost(
                "a",
                ("*", "dup.example"),
                (
                    Route(match=RouteMatch(safe_regex="(unclosed"), route=RouteAction(cluster="c")),
                    Route(match=RouteMatch(), route=RouteAction(cluster="c")),
                    Route(match=RouteMatch(prefix="/"), route=RouteAction()),
                    Route(
                        match=RouteMatch(prefix="/"),
                        route=RouteAction(cluster="c"),
                        request_headers_to_add=(HeaderValueOption("x", "%NOPE%"),),
                    ),
                    Route(
                        match=RouteMatch(safe_regex="/x"), route=RouteAction(cluster="c", prefix_rewrite="/y")
                    ),
                    Route(
                        match=RouteMatch(prefix="/"),
                        route=RouteAction(cluster="c", retry_policy=RetryPolicy(retry_on=("5xxx",))),
                    ),
                ),
            ),
            VirtualHost("b", ("dup.example", "*", "a*b"), (_route("r", prefix="/"),)),
            VirtualHost("c", (), (_route("r", prefix="/"),)),
        ),
        request_headers_to_remove=(":path",),
    )
    with pytest.raises(ConfigError) as info:
        RouteTable(bad)
    errors = info.value.errors
    joined = "\n".join(errors)
    assert "request_headers_to_remove[0]" in joined
    assert "virtual_hosts[0].routes[0].match.safe_regex: invalid regex" in joined
    assert "virtual_hosts[0].routes[1].match: exactly one of" in joined
    assert "virtual_hosts[0].routes[2].route: exactly one of cluster, weighted_clusters" in joined
    assert "virtual_hosts[0].routes[3].request_headers_to_add[0].header.value" in joined
    assert "virtual_hosts[0].routes[4].route.prefix_rewrite" in joined
    assert "virtual_hosts[0].routes[5].route.retry_policy.retry_on" in joined
    assert "virtual_hosts[1].domains[0]: domain 'dup.example' is already used" in joined
    assert "virtual_hosts[1].domains[1]" in joined  # second "*"
    assert "virtual_hosts[1].domains[2]: a wildcard" in joined
    assert "virtual_hosts[2].domains: must not be empty" in joined


# ------------------------------------------------------------------------------- robustness
_FUZZ_TABLE = RouteTable(
    RouteConfiguration(
        virtual_hosts=(
            VirtualHost(
                "a",
                ("*.example.com", "api.*", "x.example"),
                (
                    _route("r1", safe_regex=r"/[a-z]+/\d+"),
                    _route("r2", prefix="/CI", case_sensitive=False),
                    _route(
                        "r3",
                        prefix="/",
                        grpc=True,
                        headers=(HeaderMatcher("x-h", StringMatcher("suffix", "z")),),
                    ),
                ),
            ),
            _vh("d", "*"),
        )
    )
)

_header_bytes = st.binary(max_size=40)
_header_names = st.sampled_from([b":authority", b":path", b"host", b"content-type", b"x-h"]) | _header_bytes


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_header_names, _header_bytes), max_size=8))
def test_match_never_raises(items: list[tuple[bytes, bytes]]) -> None:
    result = _FUZZ_TABLE.match(Headers(items))
    assert result is None or result[0].name in {"a", "d"}
