from __future__ import annotations

from typing import Any

import pytest
from cpl_testing import cluster, eds_cluster, endpoints, listener, route_config
from microenvoy.core.errors import ConfigError

from controlplane_lite.refs import Key, cluster_refs, references
from controlplane_lite.validate import check, ensure_valid, prospective
from controlplane_lite.versions import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET


def rs(*items: tuple[str, dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    out: dict[Key, dict[str, Any]] = {}
    for type_url, res in items:
        name = res.get("cluster_name") if type_url == ENDPOINT else res["name"]
        out[(type_url, name)] = res
    return out


def test_valid_set_passes() -> None:
    resources = rs(
        (CLUSTER, cluster("api")),
        (CLUSTER, eds_cluster("eds")),
        (ENDPOINT, endpoints("eds")),
        (LISTENER, listener("edge", 10000)),
        (LISTENER, listener("rds", 10001, rds="r1")),
        (ROUTE, route_config("r1", "eds")),
    )
    assert check(resources) == []
    ensure_valid(resources)


def test_bad_cluster_field_is_named_with_origin() -> None:
    resources = rs((CLUSTER, cluster("api", lb_policy="ROUND_ROBBIN")))
    errors = check(resources, {(CLUSTER, "api"): "clusters.yaml[0]"})
    assert len(errors) == 1
    assert errors[0].startswith("clusters.yaml[0] Cluster 'api': lb_policy: unknown value 'ROUND_ROBBIN'")


def test_listener_to_missing_cluster_is_refused() -> None:
    errors = check(rs((LISTENER, listener("edge", cluster_name="nope"))))
    assert len(errors) == 1
    assert "Listener 'edge'" in errors[0]
    assert "'nope'" in errors[0]


def test_removing_a_referenced_cluster_is_refused() -> None:
    current = rs((CLUSTER, cluster("api")), (LISTENER, listener("edge")))
    assert check(current) == []
    after = prospective(current, {}, {(CLUSTER, "api")})
    errors = check(after)
    assert errors
    assert "Listener 'edge'" in errors[0]


def test_error_inside_an_rds_route_is_the_routes() -> None:
    bad = route_config("r1", "api")
    bad["virtual_hosts"][0]["routes"][0]["match"] = {"prefix": "/", "bogus": 1}
    errors = check(rs((CLUSTER, cluster("api")), (LISTENER, listener("edge", rds="r1")), (ROUTE, bad)))
    assert any(e.startswith("RouteConfiguration 'r1'") and "bogus" in e for e in errors), errors


def test_unreferenced_route_is_validated_alone() -> None:
    errors = check(rs((ROUTE, route_config("r1", "missing"))))
    assert errors == [
        "RouteConfiguration 'r1': virtual_hosts[0].routes[0].route.cluster: unknown cluster 'missing'"
    ]
    bad = route_config("r2", "x")
    bad["virtual_hosts"][0]["domains"] = "notalist"
    errors = check(rs((ROUTE, bad), (CLUSTER, cluster("x"))))
    assert any("virtual_hosts[0].domains" in e for e in errors), errors


def test_unreferenced_endpoints_are_validated_alone() -> None:
    cla = endpoints("e")
    cla["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = 70000
    errors = check(rs((ENDPOINT, cla)))
    assert len(errors) == 1
    assert errors[0].startswith("ClusterLoadAssignment 'e': endpoints[0].lb_endpoints[0]")
    assert "70000" in errors[0]


def test_eds_cluster_without_endpoints_is_refused() -> None:
    errors = check(rs((CLUSTER, eds_cluster("eds"))))
    assert errors
    assert "ClusterLoadAssignment 'eds'" in errors[0]


def test_name_and_type_mismatch() -> None:
    errors = check({(CLUSTER, "other"): {**cluster("api"), "@type": LISTENER}})
    assert any("@type" in e for e in errors)
    assert any("does not match the resource name 'other'" in e for e in errors)


def test_secret_shape() -> None:
    ok = {"@type": SECRET, "name": "s", "tls_certificate": {"certificate_chain": {"inline_string": "x"}}}
    assert check({(SECRET, "s"): ok}) == []
    errors = check({(SECRET, "s"): {"@type": SECRET, "name": "s", "junk": 1}})
    assert any("exactly one of" in e for e in errors)
    assert any("junk: unknown field" in e for e in errors)


def test_ensure_valid_raises_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        ensure_valid(rs((CLUSTER, cluster("api", connect_timeout="soon"))))
    assert any("connect_timeout" in e for e in info.value.errors)


def test_references() -> None:
    assert references(LISTENER, listener("edge", cluster_name="api")) == {(CLUSTER, "api")}
    assert references(LISTENER, listener("edge", rds="r1")) == {(ROUTE, "r1")}
    assert references(CLUSTER, eds_cluster("e")) == {(ENDPOINT, "e")}
    weighted = {"route": {"weighted_clusters": {"clusters": [{"name": "a", "weight": 1}, {"name": "b"}]}}}
    assert cluster_refs(weighted) == {"a", "b"}
    api_source = {"rds": {"config_source": {"api_config_source": {"cluster": "xds_cluster"}}}}
    assert cluster_refs(api_source) == set()
