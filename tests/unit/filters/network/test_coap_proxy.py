"""The CoAP proxy filter's config: routes, bounds, errors with paths, listener rules, the HTTP routes."""

from __future__ import annotations

from typing import Any

import pytest

from microenvoy.config.loader import parse_bootstrap
from microenvoy.core.errors import ConfigError
from microenvoy.filters.network.coap_proxy import CoapProxy, http_connection_manager

COAP_TYPE = "type.googleapis.com/microenvoy.extensions.filters.network.coap_proxy.v1.CoapProxy"
L = "static_resources.listeners[0]"
F = L + ".filter_chains[0].filters[0].typed_config"


def doc(protocol: str = "UDP", **cfg: Any) -> dict[str, Any]:
    typed = {"@type": COAP_TYPE, "stat_prefix": "dev", **cfg}
    endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "coap",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": 0, "protocol": protocol}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "microenvoy.filters.network.coap_proxy", "typed_config": typed}
                            ]
                        }
                    ],
                }
            ],
            "clusters": [{"name": "api", "load_assignment": {"endpoints": [{"lb_endpoints": [endpoint]}]}}],
        }
    }


def coap_config(d: dict[str, Any]) -> CoapProxy:
    cfg = parse_bootstrap(d).static_resources.listeners[0].filter_chains[0].filters[0].config
    assert isinstance(cfg, CoapProxy)
    return cfg


def errors_of(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_bootstrap(d)
    return info.value.errors


ROUTE = {"match": {"prefix": "/s/"}, "route": {"cluster": "api", "timeout": "2s"}}


def test_defaults_and_routes() -> None:
    cfg = coap_config(
        doc(routes=[ROUTE | {"observe": {"mode": "stream", "interval": "3s"}, "link": {"rt": "t"}}])
    )
    assert cfg.block_size == 1024
    assert cfg.max_dedup_entries == 16384
    route = cfg.routes[0]
    assert route.match.prefix == "/s/"
    assert route.action.cluster == "api"
    assert route.observe is not None
    assert (route.observe.mode, route.observe.interval) == ("stream", 3.0)
    assert route.link == (("rt", "t"),)
    hcm = http_connection_manager(cfg)
    (http_route,) = hcm.route_config.virtual_hosts[0].routes
    assert http_route.match == route.match
    assert http_route.route == route.action


def test_bad_fields_are_named() -> None:
    d = doc(
        block_size=100,
        empty_ack_delay="3s",
        routes=[ROUTE | {"observe": {"mode": "push", "interval": "0s"}, "route": {"cluster": "nope"}}],
    )
    errors = errors_of(d)
    assert F + ".block_size: must be a power of two from 16 to 1024, got 100" in errors
    assert any(e.startswith(F + ".empty_ack_delay: must be below ACK_TIMEOUT") for e in errors)
    assert any(e.startswith(F + ".routes[0].observe.mode") for e in errors)
    assert F + ".routes[0].observe.interval: must be greater than 0" in errors


def test_unknown_cluster() -> None:
    errors = errors_of(doc(routes=[ROUTE | {"route": {"cluster": "nope"}}]))
    assert errors == [F + ".routes[0].route: unknown cluster 'nope'"]


def test_needs_udp_and_no_quic() -> None:
    errors = errors_of(doc("TCP", routes=[ROUTE]))
    assert errors == [
        L + ".address.socket_address.protocol: microenvoy.filters.network.coap_proxy needs a UDP listener"
    ]
