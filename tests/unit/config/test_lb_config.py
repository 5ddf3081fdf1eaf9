"""Load-balancing config: cluster lb blocks and route hash_policy, defaults, values and every error path."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.config.lb import (
    ConnectionPropertiesHash,
    HashPolicy,
    HeaderHash,
    LbConfig,
    LeastRequestLbConfig,
    MaglevLbConfig,
    QueryParameterHash,
    RingHashLbConfig,
    is_prime,
    parse_cluster_lb,
    parse_hash_policies,
)
from microenvoy.config.reader import Reader

C = "static_resources.clusters[0]"
R = "route_config.virtual_hosts[0].routes[0].route"


def cluster(raw: dict[str, Any], policy: str = "ROUND_ROBIN") -> tuple[LbConfig, list[str]]:
    errors: list[str] = []
    r = Reader(raw, C, errors)
    cfg = parse_cluster_lb(r, policy)
    r.finish()
    return cfg, errors


def policies(raw: object) -> tuple[tuple[HashPolicy, ...], list[str]]:
    errors: list[str] = []
    r = Reader({"hash_policy": raw}, R, errors)
    out = parse_hash_policies(r)
    r.finish()
    return out, errors


# ============================================================================================ cluster
def test_defaults() -> None:
    cfg, errors = cluster({})
    assert errors == []
    assert cfg == LbConfig()
    assert cfg.healthy_panic_threshold == 50.0
    assert cfg.ring_hash_lb_config == RingHashLbConfig(1024, 8388608, "XX_HASH")
    assert cfg.maglev_lb_config.table_size == 65537
    assert cfg.least_request_lb_config == LeastRequestLbConfig(2, 1.0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [({"value": 25}, 25.0), ({"value": 0}, 0.0), (100, 100.0), ({"value": 12.5}, 12.5), ({}, 50.0)],
)
def test_panic_threshold(raw: object, expected: float) -> None:
    cfg, errors = cluster({"common_lb_config": {"healthy_panic_threshold": raw}})
    assert errors == []
    assert cfg.healthy_panic_threshold == expected


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (
            {"value": 101},
            f"{C}.common_lb_config.healthy_panic_threshold.value: must be between 0 and 100, got 101",
        ),
        (-1, f"{C}.common_lb_config.healthy_panic_threshold: must be between 0 and 100, got -1"),
        (
            {"value": "x"},
            f"{C}.common_lb_config.healthy_panic_threshold.value: expected a number, got string",
        ),
        ("50", f"{C}.common_lb_config.healthy_panic_threshold: expected a number, got string"),
        ({"value": 5, "x": 1}, f"{C}.common_lb_config.healthy_panic_threshold.x: unknown field"),
    ],
)
def test_panic_threshold_errors(raw: object, error: str) -> None:
    cfg, errors = cluster({"common_lb_config": {"healthy_panic_threshold": raw}})
    assert errors == [error]
    assert cfg.healthy_panic_threshold == 50.0 or raw == {"value": 5, "x": 1}


@pytest.mark.parametrize(
    "key",
    [
        "zone_aware_lb_config",
        "locality_weighted_lb_config",
        "update_merge_window",
        "ignore_new_hosts_until_first_hc",
        "close_connections_on_host_set_change",
        "consistent_hashing_lb_config",
        "override_host_status",
    ],
)
def test_common_lb_config_fields_not_supported(key: str) -> None:
    _, errors = cluster({"common_lb_config": {key: {}}})
    assert errors == [f"{C}.common_lb_config.{key}: not supported yet"]


def test_common_lb_config_unknown_field_and_bad_type() -> None:
    assert cluster({"common_lb_config": {"bogus": 1}})[1] == [f"{C}.common_lb_config.bogus: unknown field"]
    assert cluster({"common_lb_config": 3})[1] == [f"{C}.common_lb_config: expected a mapping, got integer"]


def test_ring_hash() -> None:
    raw = {
        "ring_hash_lb_config": {
            "minimum_ring_size": 64,
            "maximum_ring_size": "4096",
            "hash_function": "XX_HASH",
        }
    }
    cfg, errors = cluster(raw, "RING_HASH")
    assert errors == []
    assert cfg.ring_hash_lb_config == RingHashLbConfig(64, 4096, "XX_HASH")
    cfg, errors = cluster({"ring_hash_lb_config": {"minimum_ring_size": {"value": 10}}}, "RING_HASH")
    assert errors == []
    assert cfg.ring_hash_lb_config.minimum_ring_size == 10


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"minimum_ring_size": 0}, "minimum_ring_size: must be >= 1, got 0"),
        ({"minimum_ring_size": 8388609}, "minimum_ring_size: must be <= 8388608, got 8388609"),
        ({"maximum_ring_size": 8388609}, "maximum_ring_size: must be <= 8388608, got 8388609"),
        ({"maximum_ring_size": 0}, "maximum_ring_size: must be >= 1, got 0"),
        (
            {"minimum_ring_size": 2000, "maximum_ring_size": 1000},
            "minimum_ring_size: must not exceed maximum_ring_size (1000), got 2000",
        ),
        (
            {"hash_function": "MURMUR_HASH_2"},
            "hash_function: MURMUR_HASH_2 is not supported yet (use XX_HASH)",
        ),
        ({"hash_function": "SHA"}, "hash_function: unknown value 'SHA' (expected one of XX_HASH)"),
        ({"minimum_ring_size": 1.5}, "minimum_ring_size: expected an integer, got number"),
        ({"ring_size": 1}, "ring_size: unknown field"),
    ],
)
def test_ring_hash_errors(raw: dict[str, Any], error: str) -> None:
    cfg, errors = cluster({"ring_hash_lb_config": raw}, "RING_HASH")
    assert errors == [f"{C}.ring_hash_lb_config.{error}"]
    ring = cfg.ring_hash_lb_config
    assert 1 <= ring.minimum_ring_size <= ring.maximum_ring_size <= 8388608


def test_maglev() -> None:
    cfg, errors = cluster({"maglev_lb_config": {"table_size": 251}}, "MAGLEV")
    assert errors == []
    assert cfg.maglev_lb_config == MaglevLbConfig(251)
    assert (
        cluster({"maglev_lb_config": {"table_size": 5000011}}, "MAGLEV")[0].maglev_lb_config.table_size
        == 5000011
    )


@pytest.mark.parametrize(
    ("size", "error"),
    [
        (65536, "must be a prime number, got 65536"),
        (1, "must be >= 2, got 1"),
        (5000012, "must be <= 5000011, got 5000012"),
        ("big", "expected an integer, got string"),
    ],
)
def test_maglev_errors(size: object, error: str) -> None:
    cfg, errors = cluster({"maglev_lb_config": {"table_size": size}}, "MAGLEV")
    assert errors == [f"{C}.maglev_lb_config.table_size: {error}"]
    assert cfg.maglev_lb_config.table_size == 65537


def test_least_request() -> None:
    raw = {"least_request_lb_config": {"choice_count": 3, "active_request_bias": 0.5}}
    assert cluster(raw, "LEAST_REQUEST") == (
        LbConfig(least_request_lb_config=LeastRequestLbConfig(3, 0.5)),
        [],
    )
    raw = {"least_request_lb_config": {"active_request_bias": {"default_value": 2, "runtime_key": "lr.bias"}}}
    cfg, errors = cluster(raw, "LEAST_REQUEST")
    assert errors == []
    assert cfg.least_request_lb_config.active_request_bias == 2.0


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"choice_count": 1}, "choice_count: must be >= 2, got 1"),
        ({"choice_count": 101}, "choice_count: must be <= 100, got 101"),
        ({"active_request_bias": -1}, "active_request_bias: must be >= 0.0, got -1"),
        (
            {"active_request_bias": {"default_value": -0.5}},
            "active_request_bias.default_value: must be >= 0.0, got -0.5",
        ),
        ({"active_request_bias": {"value": 1}}, "active_request_bias.value: unknown field"),
        ({"slow_start_config": {}}, "slow_start_config: not supported yet"),
    ],
)
def test_least_request_errors(raw: dict[str, Any], error: str) -> None:
    _, errors = cluster({"least_request_lb_config": raw}, "LEAST_REQUEST")
    assert errors == [f"{C}.least_request_lb_config.{error}"]


@pytest.mark.parametrize(
    ("key", "policy", "wrong"),
    [
        ("ring_hash_lb_config", "RING_HASH", "MAGLEV"),
        ("maglev_lb_config", "MAGLEV", "ROUND_ROBIN"),
        ("least_request_lb_config", "LEAST_REQUEST", "RING_HASH"),
    ],
)
def test_policy_block_for_another_policy_is_an_error(key: str, policy: str, wrong: str) -> None:
    _, errors = cluster({key: {}}, wrong)
    assert errors == [f"{C}.{key}: only valid with lb_policy {policy} (lb_policy is {wrong})"]
    assert cluster({key: {}}, policy)[1] == []


def test_every_problem_is_reported_in_one_run() -> None:
    raw = {
        "common_lb_config": {"healthy_panic_threshold": {"value": 200}, "zone_aware_lb_config": {}},
        "maglev_lb_config": {"table_size": 100},
        "ring_hash_lb_config": {"minimum_ring_size": 0},
    }
    _, errors = cluster(raw, "MAGLEV")
    assert len(errors) == 5


@given(
    st.dictionaries(
        st.sampled_from(
            ["common_lb_config", "ring_hash_lb_config", "maglev_lb_config", "least_request_lb_config"]
        ),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "healthy_panic_threshold",
                            "value",
                            "table_size",
                            "minimum_ring_size",
                            "maximum_ring_size",
                            "hash_function",
                            "choice_count",
                            "active_request_bias",
                            "default_value",
                            "x",
                        ]
                    ),
                    inner,
                    max_size=4,
                )
            ),
            max_leaves=10,
        ),
    ),
    st.sampled_from(["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV"]),
)
def test_arbitrary_input_never_crashes_and_stays_in_range(raw: dict[str, Any], policy: str) -> None:
    cfg, errors = cluster(raw, policy)
    assert all(isinstance(e, str) and e.startswith(C) for e in errors)
    assert 0.0 <= cfg.healthy_panic_threshold <= 100.0
    assert is_prime(cfg.maglev_lb_config.table_size)
    assert 1 <= cfg.ring_hash_lb_config.minimum_ring_size <= cfg.ring_hash_lb_config.maximum_ring_size
    assert cfg.least_request_lb_config.choice_count >= 2
    assert cfg.least_request_lb_config.active_request_bias >= 0.0


def test_is_prime() -> None:
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert is_prime(65537)
    assert is_prime(5000011)
    assert not is_prime(65535)


# ======================================================================================== hash_policy
def test_hash_policies() -> None:
    raw = [
        {"header": {"header_name": "X-MicroEnvoy-MQTT-Client-Id"}, "terminal": True},
        {"connection_properties": {"source_ip": True}},
        {"query_parameter": {"name": "user"}},
    ]
    out, errors = policies(raw)
    assert errors == []
    assert out == (
        HashPolicy(header=HeaderHash("x-microenvoy-mqtt-client-id"), terminal=True),
        HashPolicy(connection_properties=ConnectionPropertiesHash(source_ip=True)),
        HashPolicy(query_parameter=QueryParameterHash("user")),
    )
    assert policies(None) == ((), [])


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"cookie": {"name": "s"}}, "[0].cookie: not supported yet"),
        ({"filter_state": {"key": "k"}}, "[0].filter_state: not supported yet"),
        ({}, "[0]: one of header, connection_properties, query_parameter is required"),
        (
            {"header": {"header_name": "a"}, "query_parameter": {"name": "b"}},
            "[0]: only one of header, connection_properties, query_parameter may be set,"
            " got header, query_parameter",
        ),
        ({"header": {}}, "[0].header.header_name: required field is missing"),
        ({"header": {"header_name": ""}}, "[0].header.header_name: must not be empty"),
        (
            {"header": {"header_name": "a", "regex_rewrite": {}}},
            "[0].header.regex_rewrite: not supported yet",
        ),
        ({"header": "x-a"}, "[0].header: expected a mapping, got string"),
        ({"query_parameter": {}}, "[0].query_parameter.name: required field is missing"),
        ({"query_parameter": {"name": ""}}, "[0].query_parameter.name: must not be empty"),
        (
            {"connection_properties": {"source_ip": "yes"}},
            "[0].connection_properties.source_ip: expected true or false, got string",
        ),
        (
            {"header": {"header_name": "a"}, "terminal": 1},
            "[0].terminal: expected true or false, got integer",
        ),
        ({"header": {"header_name": "a"}, "weight": 1}, "[0].weight: unknown field"),
        ("x-a", "[0]: expected a mapping, got string"),
    ],
)
def test_hash_policy_errors(raw: object, error: str) -> None:
    _, errors = policies([raw])
    assert errors == [f"{R}.hash_policy{error}"]


def test_hash_policy_not_a_list() -> None:
    assert policies({"header": {}})[1] == [f"{R}.hash_policy: expected a list, got mapping"]
