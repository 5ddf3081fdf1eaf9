"""health_checks config: required fields, Envoy's defaults, the one-checker rule, payloads, status ranges,
errors with their paths, and (property-based) that arbitrary input never crashes the parser."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.config.health_check import (
    GrpcHealthCheck,
    HealthCheck,
    HttpHealthCheck,
    StatusRange,
    TcpHealthCheck,
    parse_health_checks,
)
from microenvoy.config.model import HeaderValueOption
from microenvoy.config.reader import Reader

PATH = "static_resources.clusters[0]"
HC = f"{PATH}.health_checks[0]"


def parse(checks: Any) -> tuple[tuple[HealthCheck, ...], list[str]]:
    errors: list[str] = []
    r = Reader({"health_checks": checks}, PATH, errors)
    out = parse_health_checks(r)
    r.finish()
    return out, errors


def ok(check: dict[str, Any]) -> HealthCheck:
    out, errors = parse([check])
    assert errors == []
    assert len(out) == 1
    return out[0]


BASE: dict[str, Any] = {
    "timeout": "1s",
    "interval": "5s",
    "unhealthy_threshold": 3,
    "healthy_threshold": 2,
}


def with_(**kw: Any) -> dict[str, Any]:
    return {**BASE, **kw}


def test_minimal_http_check_has_envoys_defaults() -> None:
    hc = ok(with_(http_health_check={"path": "/healthz"}))
    assert hc == HealthCheck(
        timeout=1.0,
        interval=5.0,
        unhealthy_threshold=3,
        healthy_threshold=2,
        http_health_check=HttpHealthCheck(path="/healthz"),
    )
    assert hc.kind == "http"
    assert hc.no_traffic_interval == 60.0
    assert hc.reuse_connection is True
    assert hc.initial_jitter == 0.0
    assert hc.unhealthy_interval is None  # resolved to interval by the policy
    http = hc.http_health_check
    assert http is not None
    assert http.method == "GET"
    assert http.expected_statuses == (StatusRange(200, 201),)
    assert http.codec_client_type is None  # "as the cluster"


def test_every_field() -> None:
    hc = ok(
        with_(
            initial_jitter="100ms",
            interval_jitter="0.5s",
            interval_jitter_percent=10,
            no_traffic_interval="30s",
            no_traffic_healthy_interval="90s",
            unhealthy_interval="2s",
            unhealthy_edge_interval="1s",
            healthy_edge_interval="3s",
            reuse_connection=False,
            always_log_health_check_failures=True,
            always_log_health_check_success=True,
            unhealthy_threshold={"value": 4},
            http_health_check={
                "path": "/h",
                "host": "svc.local",
                "method": "HEAD",
                "request_headers_to_add": [{"header": {"key": "X-A", "value": "1"}, "append": False}],
                "request_headers_to_remove": ["X-Drop"],
                "expected_statuses": [{"start": 200, "end": 300}, {"start": "404", "end": "405"}],
                "retriable_statuses": [{"start": 503, "end": 504}],
                "codec_client_type": "HTTP2",
            },
        )
    )
    assert hc.initial_jitter == 0.1
    assert hc.interval_jitter == 0.5
    assert hc.interval_jitter_percent == 10
    assert hc.no_traffic_interval == 30.0
    assert hc.no_traffic_healthy_interval == 90.0
    assert hc.unhealthy_interval == 2.0
    assert hc.unhealthy_edge_interval == 1.0
    assert hc.healthy_edge_interval == 3.0
    assert hc.reuse_connection is False
    assert hc.always_log_health_check_failures is True
    assert hc.always_log_health_check_success is True
    assert hc.unhealthy_threshold == 4
    assert hc.http_health_check == HttpHealthCheck(
        path="/h",
        host="svc.local",
        method="HEAD",
        request_headers_to_add=(HeaderValueOption("x-a", "1", "OVERWRITE_IF_EXISTS_OR_ADD"),),
        request_headers_to_remove=("x-drop",),
        expected_statuses=(StatusRange(200, 300), StatusRange(404, 405)),
        retriable_statuses=(StatusRange(503, 504),),
        codec_client_type="HTTP2",
    )


def test_reuse_connection_bool_value_wrapper() -> None:
    hc = ok(with_(reuse_connection={"value": False}, tcp_health_check={}))
    assert hc.reuse_connection is False


def test_grpc_check() -> None:
    hc = ok(
        with_(
            grpc_health_check={
                "service_name": "echo.Echo",
                "authority": "grpc.local",
                "initial_metadata": [{"header": {"key": "x-token", "value": "t"}}],
            }
        )
    )
    assert hc.kind == "grpc"
    assert hc.grpc_health_check == GrpcHealthCheck(
        "echo.Echo", "grpc.local", (HeaderValueOption("x-token", "t"),)
    )
    assert ok(with_(grpc_health_check={})).grpc_health_check == GrpcHealthCheck()


def test_tcp_check_payloads() -> None:
    hc = ok(
        with_(
            tcp_health_check={
                "send": {"text": "50494E47"},
                "receive": [{"text": "504f"}, {"binary": "Tkc="}],
            }
        )
    )
    assert hc.kind == "tcp"
    assert hc.tcp_health_check == TcpHealthCheck(send=b"PING", receive=(b"PO", b"NG"))
    assert ok(with_(tcp_health_check={})).tcp_health_check == TcpHealthCheck()


def test_no_health_checks() -> None:
    assert parse(None) == ((), [])
    errors: list[str] = []
    r = Reader({}, PATH, errors)
    assert parse_health_checks(r) == ()
    assert errors == []


@pytest.mark.parametrize(
    ("check", "error"),
    [
        ({"interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1, "tcp_health_check": {}},
         f"{HC}.timeout: required field is missing"),
        ({"timeout": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1, "tcp_health_check": {}},
         f"{HC}.interval: required field is missing"),
        ({"timeout": "1s", "interval": "1s", "healthy_threshold": 1, "tcp_health_check": {}},
         f"{HC}.unhealthy_threshold: required field is missing"),
        ({"timeout": "1s", "interval": "1s", "unhealthy_threshold": 1, "tcp_health_check": {}},
         f"{HC}.healthy_threshold: required field is missing"),
        (with_(interval="0s", tcp_health_check={}), f"{HC}.interval: must be greater than 0"),
        (with_(timeout=0, tcp_health_check={}), f"{HC}.timeout: must be greater than 0"),
        (with_(unhealthy_interval="0s", tcp_health_check={}),
         f"{HC}.unhealthy_interval: must be greater than 0"),
        (with_(no_traffic_interval="0ms", tcp_health_check={}),
         f"{HC}.no_traffic_interval: must be greater than 0"),
        (with_(unhealthy_threshold=0, tcp_health_check={}), f"{HC}.unhealthy_threshold: must be >= 1, got 0"),
        (with_(healthy_threshold=0, tcp_health_check={}), f"{HC}.healthy_threshold: must be >= 1, got 0"),
        (with_(interval="fast", tcp_health_check={}),
         f"{HC}.interval: expected a duration like '5s', '0.25s' or '250ms', got 'fast'"),
        (BASE, f"{HC}: one of http_health_check, grpc_health_check, tcp_health_check, custom_health_check"
               " is required"),
        (with_(tcp_health_check={}, grpc_health_check={}),
         f"{HC}: only one of http_health_check, grpc_health_check, tcp_health_check, custom_health_check"
         " may be set, got grpc_health_check, tcp_health_check"),
        (with_(custom_health_check={"name": "x"}), f"{HC}.custom_health_check: not supported yet"),
        (with_(event_log_path="/tmp/hc.log", tcp_health_check={}), f"{HC}.event_log_path: not supported yet"),
        (with_(alt_port=1234, tcp_health_check={}), f"{HC}.alt_port: not supported yet"),
        (with_(tcp_health_check={}, bogus=1), f"{HC}.bogus: unknown field"),
        (with_(http_health_check={}), f"{HC}.http_health_check.path: required field is missing"),
        (with_(http_health_check={"path": ""}), f"{HC}.http_health_check.path: must not be empty"),
        (with_(http_health_check={"path": "/", "method": "CONNECT"}),
         f"{HC}.http_health_check.method: CONNECT cannot be used for health checks"),
        (with_(http_health_check={"path": "/", "method": "FETCH"}),
         f"{HC}.http_health_check.method: unknown value 'FETCH' (expected one of GET, HEAD, POST, PUT,"
         " DELETE, OPTIONS, TRACE, PATCH)"),
        (with_(http_health_check={"path": "/", "expected_statuses": [{"start": 99, "end": 200}]}),
         f"{HC}.http_health_check.expected_statuses[0].start: must be >= 100, got 99"),
        (with_(http_health_check={"path": "/", "expected_statuses": [{"start": 200, "end": 601}]}),
         f"{HC}.http_health_check.expected_statuses[0].end: must be <= 600, got 601"),
        (with_(http_health_check={"path": "/", "retriable_statuses": [{"start": 500, "end": 500}]}),
         f"{HC}.http_health_check.retriable_statuses[0]: the range [500, 500) is empty: start must be less"
         " than end"),
        (with_(http_health_check={"path": "/", "expected_statuses": [{"start": 200}]}),
         f"{HC}.http_health_check.expected_statuses[0].end: required field is missing"),
        (with_(http_health_check={"path": "/", "codec_client_type": "HTTP3"}),
         f"{HC}.http_health_check.codec_client_type: HTTP3 health checks are not supported yet"),
        (with_(http_health_check={"path": "/", "receive": [{"text": "00"}]}),
         f"{HC}.http_health_check.receive: not supported yet"),
        (with_(http_health_check={"path": "/", "request_headers_to_remove": [":path"]}),
         f"{HC}.http_health_check.request_headers_to_remove[0]: ':path' cannot be removed"),
        (with_(tcp_health_check={"send": {"text": "zz"}}),
         f"{HC}.tcp_health_check.send.text: expected hex digits"),
        (with_(tcp_health_check={"send": {"text": ""}}),
         f"{HC}.tcp_health_check.send.text: must not be empty"),
        (with_(tcp_health_check={"receive": [{"binary": "!!"}]}),
         f"{HC}.tcp_health_check.receive[0].binary: expected base64 data"),
        (with_(tcp_health_check={"send": {}}),
         f"{HC}.tcp_health_check.send: one of text, binary is required"),
        (with_(grpc_health_check={"service": "x"}), f"{HC}.grpc_health_check.service: unknown field"),
    ],
)  # fmt: skip
def test_errors_name_the_field(check: dict[str, Any], error: str) -> None:
    _out, errors = parse([check])
    assert error in errors, errors


def test_only_one_health_check_per_cluster() -> None:
    one = with_(tcp_health_check={})
    out, errors = parse([one, one])
    assert len(out) == 2
    assert errors == [f"{PATH}.health_checks: only one health check per cluster is supported (as in Envoy)"]


def test_not_a_list() -> None:
    _out, errors = parse({"timeout": "1s"})
    assert errors == [f"{PATH}.health_checks: expected a list, got mapping"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
check_like = st.fixed_dictionaries(
    {},
    optional={
        "timeout": st.sampled_from(["1s", "0s", 1, -1, "x"]) | json_values,
        "interval": st.sampled_from(["1s", "250ms", 0]) | json_values,
        "unhealthy_threshold": st.integers(-2, 5) | json_values,
        "healthy_threshold": st.integers(-2, 5) | json_values,
        "http_health_check": st.fixed_dictionaries(
            {},
            optional={
                "path": st.text(max_size=8) | json_values,
                "method": st.sampled_from(["GET", "CONNECT", "X"]) | json_values,
                "expected_statuses": st.lists(
                    st.fixed_dictionaries({}, optional={"start": json_values, "end": json_values}), max_size=2
                )
                | json_values,
            },
        )
        | json_values,
        "grpc_health_check": json_values,
        "tcp_health_check": st.fixed_dictionaries(
            {}, optional={"send": json_values, "receive": st.lists(json_values, max_size=2)}
        )
        | json_values,
        "interval_jitter_percent": json_values,
        "reuse_connection": json_values,
    },
)


@given(st.lists(check_like, max_size=2) | json_values)
def test_arbitrary_input_never_crashes(checks: Any) -> None:
    out, errors = parse(checks)
    assert all(isinstance(e, str) and e.startswith(PATH) for e in errors)
    for hc in out:
        assert isinstance(hc, HealthCheck)
        if not errors:
            assert hc.timeout > 0
            assert hc.interval > 0
            assert hc.unhealthy_threshold >= 1
            assert hc.healthy_threshold >= 1
            assert (
                sum(x is not None for x in (hc.http_health_check, hc.grpc_health_check, hc.tcp_health_check))
                == 1
            )
