"""Router filter: config and the pass-through marker."""

from __future__ import annotations

import pytest

from microenvoy.admin.stats import Store
from microenvoy.core.filter import FilterStatus
from microenvoy.extensions import http_filter_module
from microenvoy.filters.http import router

from .fakes import callbacks, context, parse, parse_errors


def test_registered() -> None:
    name, module = http_filter_module("", router.TYPE_URLS[0])
    assert name == router.NAME
    assert module is router


def test_config() -> None:
    assert parse(router, {}) == router.RouterConfig()
    cfg = parse(router, {"suppress_envoy_headers": True, "dynamic_stats": False})
    assert cfg == router.RouterConfig(suppress_envoy_headers=True, dynamic_stats=False)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"start_child_span": True}, "typed_config.start_child_span: unknown field"),
        ({"suppress_envoy_headers": "yes"}, "typed_config.suppress_envoy_headers: expected true or false"),
    ],
)
def test_bad_config(raw: object, error: str) -> None:
    assert any(e.startswith(error) for e in parse_errors(router, raw))


def test_marker_passes_everything() -> None:
    store = Store()
    factory = router.make_factory(router.RouterConfig(suppress_envoy_headers=True), context(store))
    assert factory.name == router.NAME
    assert factory.config.suppress_envoy_headers
    cb = callbacks()
    f = factory.create(cb)
    assert isinstance(f, router.RouterFilter)
    h = cb.exchange.request_headers
    assert f.decode_headers(h, True) is FilterStatus.CONTINUE
    assert f.decode_data(b"x", True) is FilterStatus.CONTINUE
    assert f.encode_headers(h, False) is FilterStatus.CONTINUE
    assert cb.replies == []
    assert factory.admin_state() == {}
