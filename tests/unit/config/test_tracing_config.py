"""The HCM ``tracing`` block parser (``microenvoy.config.tracing.parse_tracing``): Envoy field names and
defaults, both providers, and an error with its full path for every bad field."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.config.model import HeaderValueOption
from microenvoy.config.reader import Reader
from microenvoy.config.tracing import (
    DEFAULT_SERVICE_NAME,
    FILE_TRACER,
    FILE_TRACER_TYPE_URL,
    OPENTELEMETRY,
    OPENTELEMETRY_TYPE_URL,
    FileTracerConfig,
    OpenTelemetryConfig,
    OtlpHttpService,
    Tracing,
    parse_tracing,
)

WHERE = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.tracing"


def parse(raw: Any) -> tuple[Tracing, list[str]]:
    errors: list[str] = []
    r = Reader(raw, WHERE, errors)
    t = parse_tracing(r)
    r.finish()  # as Reader.object would: nothing is reported twice
    return t, errors


def otel(**typed: Any) -> dict[str, Any]:
    return {"provider": {"name": OPENTELEMETRY, "typed_config": {"@type": OPENTELEMETRY_TYPE_URL, **typed}}}


HTTP_SERVICE = {
    "http_uri": {"uri": "http://collector.local:4318/v1/traces", "cluster": "otel", "timeout": "0.5s"},
    "request_headers_to_add": [{"header": {"key": "Authorization", "value": "Bearer 100%"}}],
}


def test_defaults() -> None:
    t, errors = parse({})
    assert errors == []
    assert t == Tracing()
    assert (t.random_sampling, t.client_sampling, t.overall_sampling) == (100.0, 100.0, 100.0)
    assert t.max_path_tag_length == 256
    assert t.provider is None


def test_sampling_percentages() -> None:
    t, errors = parse(
        {
            "random_sampling": {"value": 12.5},
            "client_sampling": {"value": 0},
            "overall_sampling": 50,
            "max_path_tag_length": {"value": 64},
            "verbose": False,
            "spawn_upstream_span": False,
        }
    )
    assert errors == []
    assert (t.random_sampling, t.client_sampling, t.overall_sampling) == (12.5, 0.0, 50.0)
    assert t.max_path_tag_length == 64


def test_opentelemetry_http_service() -> None:
    t, errors = parse(otel(http_service=HTTP_SERVICE, service_name="edge-gw"))
    assert errors == []
    assert t.provider_name == OPENTELEMETRY
    assert t.provider == OpenTelemetryConfig(
        http_service=OtlpHttpService(
            cluster="otel",
            authority="collector.local:4318",
            path="/v1/traces",
            scheme="http",
            timeout=0.5,
            request_headers_to_add=(HeaderValueOption("authorization", "Bearer 100%"),),
        ),
        service_name="edge-gw",
    )


@pytest.mark.parametrize(
    ("uri", "authority", "path", "scheme"),
    [
        ("https://otel.example:443", "otel.example:443", "/v1/traces", "https"),  # no path: OTLP's default
        ("http://[::1]:4318/custom/path?x=1", "[::1]:4318", "/custom/path?x=1", "http"),
        ("http://user@host/v1/traces", "host", "/v1/traces", "http"),  # credentials never become :authority
    ],
)
def test_uri_parts(uri: str, authority: str, path: str, scheme: str) -> None:
    service = {"http_uri": {"uri": uri, "cluster": "c", "timeout": "1s"}}
    t, errors = parse(otel(http_service=service))
    assert errors == []
    assert isinstance(t.provider, OpenTelemetryConfig)
    assert t.provider.http_service is not None
    s = t.provider.http_service
    assert (s.authority, s.path, s.scheme) == (authority, path, scheme)


def test_opentelemetry_without_a_service_only_propagates() -> None:
    t, errors = parse(otel())
    assert errors == []
    assert t.provider == OpenTelemetryConfig(http_service=None, service_name=DEFAULT_SERVICE_NAME)


def test_provider_by_type_url_and_typed_config_optional_for_opentelemetry() -> None:
    t, errors = parse({"provider": {"name": "anything", "typed_config": {"@type": OPENTELEMETRY_TYPE_URL}}})
    assert errors == []
    assert t.provider_name == OPENTELEMETRY
    t, errors = parse({"provider": {"name": OPENTELEMETRY}})
    assert errors == []
    assert isinstance(t.provider, OpenTelemetryConfig)


def test_file_tracer() -> None:
    raw = {
        "provider": {
            "name": FILE_TRACER,
            "typed_config": {"@type": FILE_TRACER_TYPE_URL, "path": "/tmp/t.jsonl"},
        }
    }
    t, errors = parse(raw)
    assert errors == []
    assert t.provider == FileTracerConfig(path="/tmp/t.jsonl", service_name=DEFAULT_SERVICE_NAME)
    assert t.provider_name == FILE_TRACER


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"random_sampling": {"value": 101}}, "random_sampling: must be within 0 and 100, got 101"),
        ({"overall_sampling": -1}, "overall_sampling: must be within 0 and 100, got -1"),
        ({"client_sampling": "10%"}, "client_sampling: expected a percentage like {value: 10}"),
        ({"random_sampling": {"value": "x"}}, "random_sampling.value: expected a number, got string"),
        ({"random_sampling": {"value": 1, "denominator": 2}}, "random_sampling.denominator: unknown field"),
        ({"max_path_tag_length": 0}, "max_path_tag_length: must be >= 1, got 0"),
        ({"verbose": True}, "verbose: not supported yet"),
        ({"spawn_upstream_span": True}, "spawn_upstream_span: not supported yet (one span per hop)"),
        ({"custom_tags": []}, "custom_tags: not supported yet"),
        ({"bogus": 1}, "bogus: unknown field"),
        (
            {"provider": {"name": "envoy.tracers.zipkin"}},
            "provider.name: unknown tracer 'envoy.tracers.zipkin'",
        ),
        (
            {
                "provider": {
                    "name": "x",
                    "typed_config": {"@type": "type.googleapis.com/envoy.config.trace.v3.Zipkin"},
                }
            },
            "provider.typed_config.@type: unknown tracer @type",
        ),
        (
            {"provider": {"name": OPENTELEMETRY, "typed_config": {}}},
            "provider.typed_config.@type: required field",
        ),
        (
            otel(grpc_service={"envoy_grpc": {"cluster_name": "otel"}}),
            "grpc_service: not supported yet (use http_service",
        ),
        (otel(sampler={}), "provider.typed_config.sampler: not supported yet"),
        (otel(http_service={}), "provider.typed_config.http_service.http_uri: required field is missing"),
        (
            otel(http_service={"http_uri": {"uri": "http://c/v1/traces", "cluster": "c"}}),
            "http_service.http_uri.timeout: required field is missing",
        ),
        (
            otel(http_service={"http_uri": {"uri": "http://c", "cluster": "c", "timeout": "0s"}}),
            "http_service.http_uri.timeout: must be greater than 0",
        ),
        (
            otel(http_service={"http_uri": {"uri": "grpc://c", "cluster": "c", "timeout": "1s"}}),
            "http_service.http_uri.uri: expected an http:// or https:// URI with a host",
        ),
        (
            otel(http_service={"http_uri": {"uri": "http://c:99999", "cluster": "c", "timeout": "1s"}}),
            "http_service.http_uri.uri: invalid URI",
        ),
        (
            otel(http_service={"http_uri": {"uri": "http://c", "cluster": "", "timeout": "1s"}}),
            "http_service.http_uri.cluster: must not be empty",
        ),
        (
            otel(
                http_service={
                    **HTTP_SERVICE,
                    "request_headers_to_add": [{"header": {"key": ":path", "value": "x"}}],
                }
            ),
            "http_service.request_headers_to_add[0].header.key",
        ),
        ({"provider": {"name": FILE_TRACER}}, "provider.typed_config: required field is missing"),
        (
            {"provider": {"name": FILE_TRACER, "typed_config": {"@type": FILE_TRACER_TYPE_URL, "path": ""}}},
            "provider.typed_config.path: must not be empty",
        ),
        (
            {
                "provider": {
                    "name": FILE_TRACER,
                    "typed_config": {"@type": FILE_TRACER_TYPE_URL, "path": "p", "x": 1},
                }
            },
            "provider.typed_config.x: unknown field",
        ),
    ],
)
def test_each_error_names_its_path(raw: dict[str, Any], expected: str) -> None:
    _, errors = parse(raw)
    assert any(e.startswith(WHERE + ".") and expected in e for e in errors), errors
    assert len(errors) == len(set(errors))  # nothing reported twice


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=3)
    ),
    max_leaves=10,
)
keys = st.sampled_from(
    [
        "random_sampling",
        "client_sampling",
        "overall_sampling",
        "max_path_tag_length",
        "provider",
        "verbose",
        "x",
    ]
)


@given(st.dictionaries(keys, json_values, max_size=4), json_values)
def test_arbitrary_input_never_crashes(raw: dict[str, Any], typed: Any) -> None:
    parse(raw)
    parse(otel(http_service=typed))
    parse({"provider": {"name": FILE_TRACER, "typed_config": typed}})


@given(
    st.fixed_dictionaries(
        {},
        optional={"uri": json_values | st.text(max_size=40), "cluster": json_values, "timeout": json_values},
    ),
    json_values,
)
def test_arbitrary_http_uri_never_crashes(http_uri: dict[str, Any], headers: Any) -> None:
    parse(otel(http_service={"http_uri": http_uri, "request_headers_to_add": headers}))
    parse(otel(http_service={"http_uri": {**http_uri, "uri": "http://" + str(http_uri.get("uri"))}}))
