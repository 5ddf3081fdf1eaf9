"""Dynamic resources composed into one bootstrap: EDS/RDS/SDS inlined, per-resource rejection, holding a
resource until what it references arrives."""

from __future__ import annotations

from typing import Any

from microenvoy.xds.resources import CLUSTER, ENDPOINTS, LISTENER, ROUTES, compose, describe, validate

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
STATIC: dict[str, Any] = {
    "node": {"id": "dev-1"},
    "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
}


def cluster(name: str, **extra: Any) -> dict[str, Any]:
    ep = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}}}
    c: dict[str, Any] = {
        "@type": CLUSTER,
        "name": name,
        "load_assignment": {"endpoints": [{"lb_endpoints": [ep]}]},
    }
    c.update(extra)
    return c


def listener(name: str, port: int, *, cluster_name: str = "api", rds: str | None = None) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": name,
    }
    if rds:
        hcm["rds"] = {"route_config_name": rds, "config_source": {"ads": {}}}
    else:
        hcm["route_config"] = route_config("inline", cluster_name)
    return {
        "@type": LISTENER,
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def route_config(name: str, cluster_name: str) -> dict[str, Any]:
    return {
        "name": name,
        "virtual_hosts": [
            {
                "name": "all",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster_name}}],
            }
        ],
    }


def test_valid_set_composes_and_parses() -> None:
    resources = {CLUSTER: {"api": cluster("api")}, LISTENER: {"edge": listener("edge", 10001)}}
    v = validate(STATIC, resources)
    assert v.rejected == {}
    assert v.held == {}
    assert v.bootstrap is not None
    assert [c.name for c in v.bootstrap.static_resources.clusters] == ["api"]
    assert [li.name for li in v.bootstrap.static_resources.listeners] == ["edge"]


def test_listener_waiting_for_its_cluster_is_held_not_rejected() -> None:
    resources = {LISTENER: {"edge": listener("edge", 10001, cluster_name="later")}}
    v = validate(STATIC, resources)
    assert v.rejected == {}
    assert (LISTENER, "edge") in v.held
    assert "later" in v.held[(LISTENER, "edge")]
    assert v.bootstrap is not None
    assert v.bootstrap.static_resources.listeners == ()


def test_invalid_resource_is_rejected_by_name_others_apply() -> None:
    bad = cluster("bad", connect_timeout="-1s")
    resources = {CLUSTER: {"api": cluster("api"), "bad": bad}, LISTENER: {"edge": listener("edge", 10001)}}
    v = validate(STATIC, resources)
    assert list(v.rejected) == [(CLUSTER, "bad")]
    assert "connect_timeout" in v.rejected[(CLUSTER, "bad")]
    assert v.bootstrap is not None
    assert [c.name for c in v.bootstrap.static_resources.clusters] == ["api"]


def test_rds_and_eds_are_inlined_and_held_until_present() -> None:
    eds = {"@type": CLUSTER, "name": "api", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}
    resources: dict[str, dict[str, Any]] = {
        CLUSTER: {"api": eds},
        LISTENER: {"edge": listener("edge", 10001, rds="r1")},
    }
    v = validate(STATIC, resources)
    assert set(v.held) == {(CLUSTER, "api"), (LISTENER, "edge")}
    ep = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9000}}}}
    resources[ENDPOINTS] = {
        "api": {"@type": ENDPOINTS, "cluster_name": "api", "endpoints": [{"lb_endpoints": [ep]}]}
    }
    resources[ROUTES] = {"r1": {"@type": ROUTES, **route_config("r1", "api")}}
    v = validate(STATIC, resources)
    assert v.held == {}
    assert v.rejected == {}
    assert v.bootstrap is not None
    (c,) = v.bootstrap.static_resources.clusters
    assert c.endpoints[0].address.port_value == 9000
    composed = compose(STATIC, resources)
    assert composed.used[(LISTENER, "edge")] == {(ROUTES, "r1")}


def test_error_inside_an_inlined_route_config_blames_the_route_config() -> None:
    rc = route_config("r1", "api")
    rc["virtual_hosts"][0]["routes"][0]["route"]["timeout"] = "soon"
    resources = {
        CLUSTER: {"api": cluster("api")},
        LISTENER: {"edge": listener("edge", 10001, rds="r1")},
        ROUTES: {"r1": {"@type": ROUTES, **rc}},
    }
    v = validate(STATIC, resources)
    assert list(v.rejected) == [(ROUTES, "r1")]
    assert v.held == {(LISTENER, "edge"): "waits for a valid RouteConfiguration 'r1'"}


def test_describe() -> None:
    assert describe((CLUSTER, "api")) == "Cluster 'api'"


def test_incremental_validation_matches_a_full_pass_and_reuses_objects() -> None:
    from microenvoy.xds.resources import Validator

    eds = {"@type": CLUSTER, "name": "e", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}
    ep = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9000}}}}
    cla = {"@type": ENDPOINTS, "cluster_name": "e", "endpoints": [{"lb_endpoints": [ep]}]}
    resources: dict[str, dict[str, Any]] = {
        CLUSTER: {"api": cluster("api"), "e": eds, **{f"c{i}": cluster(f"c{i}") for i in range(20)}},
        ENDPOINTS: {"e": cla},
        LISTENER: {"edge": listener("edge", 10001)},
    }
    versions = {(t, n): "1" for t, names in resources.items() for n in names}
    v = Validator(STATIC)
    first = v.validate(resources, versions)
    assert first.bootstrap is not None
    before = {c.name: c for c in first.bootstrap.static_resources.clusters}
    # A changed assignment re-parses the cluster that inlines it, and nothing else.
    cla2 = {**cla, "endpoints": [{"lb_endpoints": [{**ep, "endpoint": {"address": {"socket_address": {
        "address": "127.0.0.1", "port_value": 9001}}}}]}]}  # fmt: skip
    resources[ENDPOINTS]["e"] = cla2
    versions[(ENDPOINTS, "e")] = "2"
    second = v.validate(resources, versions, {(ENDPOINTS, "e")})
    assert second.bootstrap is not None
    after = {c.name: c for c in second.bootstrap.static_resources.clusters}
    assert after["e"].endpoints[0].address.port_value == 9001
    assert all(after[n] is before[n] for n in before if n != "e")  # unchanged objects are the same objects
    # A removed cluster: the listener routing to it is held, the same verdict a full pass gives.
    del resources[CLUSTER]["api"]
    third = v.validate(resources, versions, {(CLUSTER, "api")})
    full = validate(STATIC, resources)
    assert third.held == full.held
    assert (LISTENER, "edge") in third.held
    assert third.bootstrap is not None
    assert full.bootstrap is not None
    assert sorted(c.name for c in third.bootstrap.static_resources.clusters) == sorted(
        c.name for c in full.bootstrap.static_resources.clusters
    )
