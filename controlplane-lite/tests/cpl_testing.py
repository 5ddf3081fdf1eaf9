"""Helpers shared by controlplane-lite's tests: a fake clock and resource builders."""

from __future__ import annotations

from typing import Any

from controlplane_lite.versions import CLUSTER, ENDPOINT, LISTENER, ROUTE

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)


class FakeClock:
    """A settable clock for the store and the delta state machine."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cluster(name: str, port: int = 8080, **extra: Any) -> dict[str, Any]:
    ep = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
    c: dict[str, Any] = {
        "@type": CLUSTER,
        "name": name,
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [ep]}]},
    }
    c.update(extra)
    return c


def eds_cluster(name: str) -> dict[str, Any]:
    return {"@type": CLUSTER, "name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}


def endpoints(name: str, port: int = 8080) -> dict[str, Any]:
    ep = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
    return {"@type": ENDPOINT, "cluster_name": name, "endpoints": [{"lb_endpoints": [ep]}]}


def route_config(name: str, cluster_name: str, *, typed: bool = True) -> dict[str, Any]:
    rc: dict[str, Any] = {
        "name": name,
        "virtual_hosts": [
            {
                "name": "all",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster_name}}],
            }
        ],
    }
    if typed:
        rc["@type"] = ROUTE
    return rc


def listener(
    name: str, port: int = 10000, *, cluster_name: str = "api", rds: str | None = None
) -> dict[str, Any]:
    hcm: dict[str, Any] = {"@type": HCM_TYPE, "stat_prefix": name}
    if rds:
        hcm["rds"] = {"route_config_name": rds, "config_source": {"ads": {}}}
    else:
        hcm["route_config"] = route_config("inline", cluster_name, typed=False)
    return {
        "@type": LISTENER,
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
