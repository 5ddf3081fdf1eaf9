"""The MQTT proxy filter's config: bridge routes, bounds, errors with paths, the synthesized HTTP routes."""

from __future__ import annotations

from typing import Any

import pytest

from microenvoy.config.loader import parse_bootstrap
from microenvoy.core.errors import ConfigError
from microenvoy.filters.network.mqtt_proxy import ROUTE_HEADER, MqttProxy, http_connection_manager

MQTT_TYPE = "type.googleapis.com/microenvoy.extensions.filters.network.mqtt_proxy.v1.MqttProxy"
F = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"


def doc(**cfg: Any) -> dict[str, Any]:
    typed = {"@type": MQTT_TYPE, "stat_prefix": "dev", **cfg}
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "mqtt",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1883}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "microenvoy.filters.network.mqtt_proxy", "typed_config": typed}
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "ingest",
                    "load_assignment": {
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": "127.0.0.1", "port_value": 9}
                                            }
                                        }
                                    }
                                ]
                            }
                        ]
                    },
                }
            ],
        }
    }


def mqtt_config(d: dict[str, Any]) -> MqttProxy:
    cfg = parse_bootstrap(d).static_resources.listeners[0].filter_chains[0].filters[0].config
    assert isinstance(cfg, MqttProxy)
    return cfg


def errors(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_bootstrap(d)
    return info.value.errors


TELEMETRY = {
    "name": "telemetry",
    "match": {"topic_filter": "devices/{device}/telemetry"},
    "route": {
        "cluster": "ingest",
        "path": "/v1/devices/{device}",
        "timeout": "2s",
        "content_type": "application/json",
    },
}


def test_defaults_and_a_bridge_route() -> None:
    cfg = mqtt_config(doc(routes=[TELEMETRY], max_packet_size=65536))
    assert cfg.stat_prefix == "dev"
    assert cfg.max_packet_size == 65536
    assert cfg.receive_maximum == 64
    (route,) = cfg.routes
    assert (route.topic_filter, route.path, route.content_type) == (
        "devices/{device}/telemetry",
        "/v1/devices/{device}",
        "application/json",
    )
    assert route.action.cluster == "ingest"
    assert route.action.timeout == 2.0
    hcm = http_connection_manager(cfg)
    (vh,) = hcm.route_config.virtual_hosts
    (r,) = vh.routes
    assert r.match.headers[0].name == ROUTE_HEADER
    assert r.route is route.action
    assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.router"]


def test_grpc_bridge_uses_the_method_as_path() -> None:
    route = {
        **TELEMETRY,
        "route": {"cluster": "ingest", "grpc": {"method": "/iot.v1.Ingest/Publish", "encoding": "envelope"}},
    }
    (r,) = mqtt_config(doc(routes=[route])).routes
    assert r.grpc is not None
    assert (r.path, r.grpc.encoding) == ("/iot.v1.Ingest/Publish", "envelope")


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            {"match": {"topic_filter": "a/#/b"}, "route": {"cluster": "ingest"}},
            "routes[0].match.topic_filter: level 2",
        ),
        (
            {"match": {"topic_filter": "a/{x}"}, "route": {"cluster": "ingest", "path": "/{y}"}},
            "routes[0].route.path: unknown placeholder {y}",
        ),
        (
            {"match": {"topic_filter": "a"}, "route": {"cluster": "nope"}},
            "routes[0].route: unknown cluster 'nope'",
        ),
        (
            {"match": {"topic_filter": "a"}, "route": {"cluster": "ingest", "grpc": {"method": "bad"}}},
            "routes[0].route.grpc.method: expected /package.Service/Method",
        ),
        (
            {"match": {"topic_filter": "a"}, "route": {"cluster": "ingest", "batch": {"max_messages": 0}}},
            "routes[0].route.batch.max_messages: must be >= 1",
        ),
        (
            {"match": {"topic_filter": "a"}, "route": {"cluster": "ingest", "colour": 1}},
            "routes[0].route.colour: unknown field",
        ),
    ],
)
def test_route_errors_name_the_field(route: dict[str, Any], message: str) -> None:
    errs = errors(doc(routes=[route]))
    assert any(e.startswith(f"{F}.{message}") for e in errs), errs


def test_bounds_are_checked() -> None:
    errs = errors(doc(max_packet_size=10, maximum_qos=3))
    assert f"{F}.max_packet_size: must be >= 64, got 10" in errs
    assert f"{F}.maximum_qos: must be <= 2, got 3" in errs
