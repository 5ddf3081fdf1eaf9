"""In-process exchanges (``io/bridge.forward``) through the real HTTP engine to a real h2 upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from peers.h2_server import H2Server

from microenvoy.admin.stats import Store
from microenvoy.config.model import (
    Cluster,
    Endpoint,
    HttpConnectionManager,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    SocketAddress,
    VirtualHost,
)
from microenvoy.core.exchange import DownstreamInfo
from microenvoy.core.headers import Headers
from microenvoy.filters.network.http_connection_manager import implicit_router
from microenvoy.io.bridge import forward
from microenvoy.io.http_front import HttpFront
from microenvoy.io.upstream import ClusterManager

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

DOWN = DownstreamInfo("MQTT/5", ("127.0.0.1", 40000), ("127.0.0.1", 1883), "mqtt")


@pytest.fixture
async def front(h2_server: H2Server) -> AsyncIterator[HttpFront]:
    routes = (
        Route(RouteMatch(prefix="/short/"), route=RouteAction(cluster="up", timeout=0.3, prefix_rewrite="/")),
        Route(RouteMatch(prefix="/"), route=RouteAction(cluster="up", timeout=5.0)),
    )
    hcm = HttpConnectionManager(
        stat_prefix="bridge",
        route_config=RouteConfiguration(virtual_hosts=(VirtualHost("all", ("*",), routes),)),
        http_filters=implicit_router(),
    )
    store = Store()
    cluster = Cluster(
        "up", endpoints=(Endpoint(SocketAddress("127.0.0.1", h2_server.port)),), upstream_protocol="HTTP2"
    )
    cm = ClusterManager([cluster], store)
    await cm.start()
    yield HttpFront(hcm, clusters=cm, stats=store)
    await cm.close()


def request(path: str, **extra: str) -> Headers:
    h = Headers(
        [(b":method", b"POST"), (b":scheme", b"mqtt"), (b":authority", b"mqtt"), (b":path", path.encode())]
    )
    for k, v in extra.items():
        h.add(k.replace("_", "-").encode(), v.encode())
    return h


async def test_forward_returns_the_upstream_answer(front: HttpFront) -> None:
    r = await forward(front, DOWN, request("/echo-json", content_type="application/json"), b'{"t": 21}')
    assert r.status == 200
    echo = json.loads(r.body)
    assert echo["body_length"] == 9
    assert echo["method"] == "POST"
    assert r.exchange.upstream_cluster == "up"
    assert any(k == "x-request-id" for k, _ in echo["headers"])


async def test_forward_carries_upstream_errors_and_timeouts(front: HttpFront) -> None:
    r = await forward(front, DOWN, request("/status/503"), b"x")
    assert r.status == 503
    r = await forward(front, DOWN, request("/short/delay/2000"), b"")
    assert r.status == 504
    assert "UT" in r.exchange.response_flags


async def test_response_over_the_limit_is_cut_and_reported(front: HttpFront) -> None:
    r: Any = await forward(front, DOWN, request("/big/100000"), b"", max_response_bytes=1000)
    assert r.truncated
    assert r.status == 0
    assert not r.ok
