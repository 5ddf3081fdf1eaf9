"""The bootstrap loader: good configs become the expected dataclasses, bad ones every error with a path."""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from microenvoy import extensions
from microenvoy.config import ConfigError, load_bootstrap, parse_bootstrap
from microenvoy.config.model import (
    AdvertiseHttp3,
    Cluster,
    CommonTlsContext,
    DataSource,
    DirectResponse,
    DownstreamTlsContext,
    Endpoint,
    HeaderMatcher,
    HeaderValueOption,
    Http2Options,
    HttpConnectionManager,
    QuicOptions,
    RetryPolicy,
    Route,
    RouteAction,
    RouteMatch,
    SocketAddress,
    StringMatcher,
    TlsCertificate,
    UpstreamTlsContext,
    WeightedCluster,
)

REPO = Path(__file__).resolve().parents[3]
T = "type.googleapis.com/"
HCM_TYPE = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "envoy.filters.http.router"
ROUTER_TYPE = T + "envoy.extensions.filters.http.router.v3.Router"
HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
L0 = "static_resources.listeners[0]"
L1 = "static_resources.listeners[1]"
HCM0 = L0 + ".filter_chains[0].filters[0].typed_config"
ROUTE0 = HCM0 + ".route_config.virtual_hosts[0].routes[0]"


@pytest.fixture(autouse=True)
def _router_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router filter is written in parallel; if it cannot be imported, stand in a minimal module."""
    try:
        importlib.import_module("microenvoy.filters.http.router")
    except ImportError:
        stub = types.ModuleType("microenvoy.filters.http.router")
        stub.NAME = ROUTER  # type: ignore[attr-defined]
        stub.TYPE_URLS = (ROUTER_TYPE,)  # type: ignore[attr-defined]
        stub.parse_config = lambda r: "router-config"  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "microenvoy.filters.http.router", stub)


# ------------------------------------------------------------------------------------------ builders
def hcm(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": "ingress",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}],
                }
            ]
        },
        "http_filters": [{"name": ROUTER, "typed_config": {"@type": ROUTER_TYPE}}],
    }
    cfg.update(over)
    return cfg


def listener(name: str = "http", port: int = 8080, protocol: str = "TCP", **over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port, "protocol": protocol}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm()}]}
        ],
    }
    out.update(over)
    return out


def quic_listener(cert_dir: Path, name: str = "quic", port: int = 8443, **hcm_over: Any) -> dict[str, Any]:
    out = listener(name, port, "UDP", udp_listener_config={"quic_options": {}})
    chain = out["filter_chains"][0]
    chain["filters"][0]["typed_config"] = hcm(**hcm_over)
    chain["transport_socket"] = {
        "name": "envoy.transport_sockets.quic",
        "typed_config": {
            "@type": T + "envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport",
            "downstream_tls_context": {"common_tls_context": {"tls_certificates": [certs(cert_dir)]}},
        },
    }
    return out


def cluster(name: str = "backend", **over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 9000}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    out.update(over)
    return out


def bootstrap(listeners: list[Any] | None = None, clusters: list[Any] | None = None) -> dict[str, Any]:
    return {
        "static_resources": {
            "listeners": [listener()] if listeners is None else listeners,
            "clusters": [cluster()] if clusters is None else clusters,
        }
    }


def certs(d: Path) -> dict[str, Any]:
    (d / "c.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (d / "k.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    return {
        "certificate_chain": {"filename": str(d / "c.pem")},
        "private_key": {"filename": str(d / "k.pem")},
    }


def errors_of(doc: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_bootstrap(doc)
    assert info.value.errors, "ConfigError without errors"
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def the_hcm(doc: dict[str, Any], listener_index: int = 0) -> HttpConnectionManager:
    b = parse_bootstrap(doc)
    cfg = b.static_resources.listeners[listener_index].filter_chains[0].filters[0].config
    assert isinstance(cfg, HttpConnectionManager)
    return cfg


# ------------------------------------------------------------------------------------------ good configs
FULL_YAML = """
node:
  id: n1
  cluster: edge
  metadata: {rack: r1, nested: {a: [1, 2]}}
admin:
  access_log_path: /dev/null
  address: {socket_address: {address: 127.0.0.1, port_value: 0}}
static_resources:
  listeners:
  - name: http
    address: {socket_address: {address: "::", port_value: 8080}}
    per_connection_buffer_limit_bytes: 32768
    max_connections: 50
    advertise_http3: {listener: quic, max_age: 3600}
    drain_timeout: 250ms
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {"@type": TLS_INSPECTOR_TYPE}
    filter_chains:
    - name: tls
      filter_chain_match: {server_names: [API.example.com]}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates:
            - certificate_chain: {filename: c.pem}
              private_key: {inline_string: KEY}
            validation_context:
              trusted_ca: {inline_bytes: Q0E=}
              match_typed_subject_alt_names:
              - san_type: DNS
                matcher: {suffix: .example.com}
            tls_params: {tls_minimum_protocol_version: TLSv1_3}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": HCM_TYPE
          stat_prefix: ingress
          codec_type: HTTP2
          generate_request_id: false
          stream_idle_timeout: 60s
          request_timeout: 0.5s
          common_http_protocol_options: {idle_timeout: 120s, max_headers_count: 50}
          max_request_headers_kb: 96
          http2_protocol_options:
            max_concurrent_streams: 10
            initial_stream_window_size: 131072
            initial_connection_window_size: 262144
          server_name: edge
          use_remote_address: false
          max_request_bytes: 1000
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: /tmp/access.log
              log_format: {json_format: {status: "%RESPONSE_CODE%"}}
          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format: {text_format_source: {inline_string: "%REQ(:PATH)%\\n"}}
          route_config:
            name: rc
            request_headers_to_remove: [x-debug]
            virtual_hosts:
            - name: api
              domains: [API.example.com, "*.api.example.com"]
              retry_policy: {retry_on: 5xx, num_retries: 3}
              response_headers_to_add:
              - header: {key: X-Served-By, value: edge}
                append: false
              routes:
              - name: grpc
                match:
                  prefix: /pkg.Svc/
                  grpc: {}
                  case_sensitive: false
                  headers:
                  - name: X-Tenant
                    string_match: {exact: acme, ignore_case: true}
                  - {name: x-canary, present_match: true, invert_match: true}
                  - {name: x-v, safe_regex_match: {regex: "v[0-9]+"}}
                  - {name: x-old, prefix_match: abc}
                  - {name: x-any}
                route:
                  weighted_clusters:
                    clusters: [{name: h2, weight: 90}, {name: h1, weight: 10}]
                  timeout: 0s
                  idle_timeout: 30s
                  max_grpc_timeout: 5s
                  retry_policy:
                    retry_on: "unavailable, reset,connect-failure"
                    num_retries: 2
                    per_try_timeout: 1s
                    retry_back_off: {base_interval: 10ms, max_interval: 100ms}
                    retriable_status_codes: [503]
              - match: {safe_regex: {regex: "/v[12]/.*"}}
                route: {cluster: h1, host_rewrite_literal: backend.local, max_request_bytes: 10}
                request_headers_to_add:
                - header: {key: x-a, value: "1"}
                  append_action: ADD_IF_ABSENT
              - match: {path: /ping}
                direct_response: {status: 204}
              - match: {prefix: /old/}
                route: {cluster: h1, prefix_rewrite: /new/}
  - name: quic
    address: {socket_address: {address: 0.0.0.0, port_value: 8443, protocol: UDP}}
    udp_listener_config:
      quic_options:
        quic_protocol_options:
          max_concurrent_streams: 20
          initial_stream_window_size: 32768
          initial_connection_window_size: 524288
        idle_timeout: 30s
        retry: true
        retry_token_key_file: retry.key
        session_ticket_store_size: 0
        session_ticket_lifetime: 3600s
        early_data: false
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.quic
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport
          downstream_tls_context:
            common_tls_context:
              tls_certificates: [{certificate_chain: {filename: c.pem}, private_key: {filename: k.pem}}]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": HCM_TYPE
          stat_prefix: h3
          codec_type: HTTP3
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{match: {prefix: /}, route: {cluster: h1}}]
  clusters:
  - name: h2
    type: STATIC
    connect_timeout: 0.25s
    lb_policy: LEAST_REQUEST
    per_connection_buffer_limit_bytes: 65536
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {max_concurrent_streams: 7}
        common_http_protocol_options: {idle_timeout: 90s, max_requests_per_connection: 1000}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: backend.example.com
        common_tls_context:
          alpn_protocols: [h2]
          tls_certificates: [{certificate_chain: {filename: c.pem}, private_key: {filename: k.pem}}]
          validation_context: {trusted_ca: {filename: c.pem}}
    load_assignment:
      cluster_name: h2
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 10.0.0.1, port_value: 443}}, hostname: b1}
          load_balancing_weight: 3
        - endpoint: {address: {socket_address: {address: "::1", port_value: 443}}}
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 10.0.0.2, port_value: 443}}}
  - name: h1
    type: STRICT_DNS
    dns_refresh_rate: 10s
    dns_lookup_family: V4_ONLY
    max_requests_per_connection: 100
    load_assignment:
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: backend.local, port_value: 80}}}
  - name: legacy_h2
    http2_protocol_options: {}
"""


FULL_YAML = FULL_YAML.replace(
    "TLS_INSPECTOR_TYPE", T + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
)
FULL_YAML = FULL_YAML.replace("HCM_TYPE", HCM_TYPE)


@pytest.fixture
def full(tmp_path: Path) -> Path:
    (tmp_path / "c.pem").write_text("cert")
    (tmp_path / "k.pem").write_text("key")
    path = tmp_path / "full.yaml"
    path.write_text(FULL_YAML)
    return path


def test_full_config_parses_to_the_expected_dataclasses(full: Path) -> None:
    d = full.parent
    b = load_bootstrap(str(full))
    assert (b.node.id, b.node.cluster, b.node.metadata) == (
        "n1",
        "edge",
        {"rack": "r1", "nested": {"a": [1, 2]}},
    )
    assert b.admin.address == SocketAddress("127.0.0.1", 0)
    assert b.admin.access_log_path == "/dev/null"

    http, quic = b.static_resources.listeners
    assert http.name == "http"
    assert http.address == SocketAddress("::", 8080, "TCP")
    assert (http.per_connection_buffer_limit_bytes, http.max_connections, http.drain_timeout) == (
        32768,
        50,
        0.25,
    )
    assert http.advertise_http3 == AdvertiseHttp3("quic", 3600)
    assert http.quic_options is None
    chain = http.filter_chains[0]
    assert (chain.name, chain.server_names) == ("tls", ("api.example.com",))
    assert chain.transport_socket == DownstreamTlsContext(
        CommonTlsContext(
            tls_certificates=(
                TlsCertificate(DataSource(filename=str(d / "c.pem")), DataSource(inline=b"KEY")),
            ),
            alpn_protocols=("h2", "http/1.1"),
            trusted_ca=DataSource(inline=b"CA"),
            match_subject_alt_names=(StringMatcher("suffix", ".example.com"),),
            tls_minimum_protocol_version="TLSv1_3",
            tls_maximum_protocol_version="TLSv1_3",
        ),
        require_client_certificate=True,
    )
    nf = chain.filters[0]
    assert nf.name == "envoy.filters.network.http_connection_manager"
    h = nf.config
    assert isinstance(h, HttpConnectionManager)
    assert (h.stat_prefix, h.codec_type, h.generate_request_id) == ("ingress", "HTTP2", False)
    assert (h.stream_idle_timeout, h.request_timeout, h.idle_timeout) == (60.0, 0.5, 120.0)
    assert (h.max_headers_count, h.max_request_headers_kb, h.server_name) == (50, 96, "edge")
    assert (h.use_remote_address, h.max_request_bytes) == (False, 1000)
    assert h.http2_protocol_options == Http2Options(10, 131072, 262144)
    assert [f.name for f in h.http_filters] == [ROUTER]
    assert [(a.name, a.path, a.json_format, a.text_format) for a in h.access_log] == [
        ("envoy.access_loggers.file", "/tmp/access.log", (("status", "%RESPONSE_CODE%"),), None),
        ("envoy.access_loggers.stdout", None, (), "%REQ(:PATH)%\n"),
    ]
    rc = h.route_config
    assert (rc.name, rc.request_headers_to_remove) == ("rc", ("x-debug",))
    vh = rc.virtual_hosts[0]
    assert vh.domains == ("api.example.com", "*.api.example.com")
    assert vh.retry_policy == RetryPolicy(retry_on=("5xx",), num_retries=3)
    assert vh.response_headers_to_add == (
        HeaderValueOption("x-served-by", "edge", "OVERWRITE_IF_EXISTS_OR_ADD"),
    )
    grpc, regex, direct, rewrite = vh.routes
    assert grpc == Route(
        name="grpc",
        match=RouteMatch(
            prefix="/pkg.Svc/",
            case_sensitive=False,
            grpc=True,
            headers=(
                HeaderMatcher("x-tenant", StringMatcher("exact", "acme", ignore_case=True)),
                HeaderMatcher("x-canary", present_match=True, invert_match=True),
                HeaderMatcher("x-v", StringMatcher("safe_regex", "v[0-9]+")),
                HeaderMatcher("x-old", StringMatcher("prefix", "abc")),
                HeaderMatcher("x-any", present_match=True),
            ),
        ),
        route=RouteAction(
            weighted_clusters=(WeightedCluster("h2", 90), WeightedCluster("h1", 10)),
            timeout=0.0,
            idle_timeout=30.0,
            max_grpc_timeout=5.0,
            retry_policy=RetryPolicy(
                retry_on=("unavailable", "reset", "connect-failure"),
                num_retries=2,
                per_try_timeout=1.0,
                base_interval=0.01,
                max_interval=0.1,
                retriable_status_codes=(503,),
            ),
        ),
    )
    assert regex.match == RouteMatch(safe_regex="/v[12]/.*")
    assert regex.route == RouteAction(
        cluster="h1", host_rewrite_literal="backend.local", max_request_bytes=10
    )
    assert regex.request_headers_to_add == (HeaderValueOption("x-a", "1", "ADD_IF_ABSENT"),)
    assert direct.direct_response == DirectResponse(204)
    assert direct.route is None
    assert rewrite.route == RouteAction(cluster="h1", prefix_rewrite="/new/")

    assert quic.address == SocketAddress("0.0.0.0", 8443, "UDP")
    assert quic.quic_options == QuicOptions(
        max_concurrent_streams=20,
        initial_stream_window_size=32768,
        initial_connection_window_size=524288,
        idle_timeout=30.0,
        retry=True,
        retry_token_key_file=str(d / "retry.key"),
        session_ticket_store_size=0,
        session_ticket_lifetime=3600.0,
        early_data=False,
    )
    qtls = quic.filter_chains[0].transport_socket
    assert qtls is not None
    assert qtls.common_tls_context.tls_certificates[0].private_key.filename == str(d / "k.pem")
    qh = quic.filter_chains[0].filters[0].config
    assert isinstance(qh, HttpConnectionManager)
    assert qh.codec_type == "HTTP3"

    h2, h1, legacy = b.static_resources.clusters
    assert h2 == Cluster(
        name="h2",
        type="STATIC",
        connect_timeout=0.25,
        lb_policy="LEAST_REQUEST",
        endpoints=(
            Endpoint(SocketAddress("10.0.0.1", 443), 3, "b1"),
            Endpoint(SocketAddress("::1", 443)),
            Endpoint(SocketAddress("10.0.0.2", 443)),
        ),
        upstream_protocol="HTTP2",
        http2_protocol_options=Http2Options(max_concurrent_streams=7),
        transport_socket=UpstreamTlsContext(
            CommonTlsContext(
                tls_certificates=(
                    TlsCertificate(
                        DataSource(filename=str(d / "c.pem")), DataSource(filename=str(d / "k.pem"))
                    ),
                ),
                alpn_protocols=("h2",),
                trusted_ca=DataSource(filename=str(d / "c.pem")),
            ),
            sni="backend.example.com",
        ),
        per_connection_buffer_limit_bytes=65536,
        max_requests_per_connection=1000,
        idle_timeout=90.0,
    )
    assert h1 == Cluster(
        name="h1",
        type="STRICT_DNS",
        endpoints=(Endpoint(SocketAddress("backend.local", 80)),),
        dns_refresh_rate=10.0,
        dns_lookup_family="V4_ONLY",
        max_requests_per_connection=100,
    )
    assert legacy.upstream_protocol == "HTTP2"
    assert legacy.endpoints == ()


def test_raw_keeps_the_loaded_document_as_a_copy() -> None:
    doc = bootstrap()
    b = parse_bootstrap(doc)
    assert b.raw == doc
    b.raw["static_resources"]["clusters"][0]["name"] = "changed"
    assert doc["static_resources"]["clusters"][0]["name"] == "backend"


def test_empty_document_is_a_valid_bootstrap_with_defaults() -> None:
    b = parse_bootstrap(None)
    assert b.static_resources.listeners == ()
    assert b.admin.address == SocketAddress("127.0.0.1", 9901)


def test_example_edge_config_is_accepted() -> None:
    b = load_bootstrap(str(REPO / "docs" / "examples" / "edge.yaml"))
    http, quic = b.static_resources.listeners
    assert quic.quic_options is not None
    assert http.advertise_http3 == AdvertiseHttp3("quic", 86400)
    protocols = {c.name: c.upstream_protocol for c in b.static_resources.clusters}
    assert protocols == {"grpc_backend": "HTTP2", "rest_backend": "HTTP1"}
    grpc, rest = b.static_resources.clusters
    assert grpc.health_checks[0].kind == "grpc"
    assert grpc.circuit_breakers[0].max_requests == 256
    assert rest.health_checks[0].kind == "http"
    assert rest.outlier_detection is not None
    assert rest.outlier_detection.max_ejection_percent == 50
    h = http.filter_chains[0].filters[0].config
    assert isinstance(h, HttpConnectionManager)
    grpc_routes = [r for r in h.route_config.virtual_hosts[0].routes if r.match.grpc]
    assert grpc_routes
    assert grpc_routes[0].route is not None
    assert grpc_routes[0].route.cluster == "grpc_backend"
    cert = quic.filter_chains[0].transport_socket
    assert cert is not None
    for c in cert.common_tls_context.tls_certificates:
        assert c.certificate_chain.filename is not None
        assert os.path.isfile(c.certificate_chain.filename)


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("5s", 5.0),
        ("0.25s", 0.25),
        ("250ms", 0.25),
        (2, 2.0),
        (1.5, 1.5),
        ({"seconds": 1, "nanos": 500000000}, 1.5),
    ],
)
def test_duration_forms(raw: object, seconds: float) -> None:
    b = parse_bootstrap(bootstrap(clusters=[cluster(connect_timeout=raw)]))
    assert b.static_resources.clusters[0].connect_timeout == seconds


@pytest.mark.parametrize("raw", ["5", "5 s", "-1s", "1h", "5sec", "", True, [], "1e3s", float("inf")])
def test_bad_durations_are_errors_with_the_path(raw: object) -> None:
    errors = errors_of(bootstrap(clusters=[cluster(connect_timeout=raw)]))
    assert len(errors) == 1
    assert errors[0].startswith("static_resources.clusters[0].connect_timeout: ")


def test_json_input_gives_the_same_bootstrap_as_yaml(full: Path) -> None:
    import yaml

    doc = yaml.safe_load(FULL_YAML)
    jpath = full.parent / "full.json"
    jpath.write_text(json.dumps(doc, indent="\t"))  # tabs: valid JSON, not valid YAML indentation
    assert load_bootstrap(str(jpath)) == load_bootstrap(str(full))


def test_implicit_router_when_http_filters_are_absent() -> None:
    doc = bootstrap()
    del doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "http_filters"
    ]
    assert [f.name for f in the_hcm(doc).http_filters] == [ROUTER]


def test_optional_unknown_http_filter_is_skipped() -> None:
    doc = bootstrap([listener()])
    filters = [{"name": "acme.filters.http.magic", "is_optional": True}, {"name": ROUTER}]
    doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "http_filters"
    ] = filters
    assert [f.name for f in the_hcm(doc).http_filters] == [ROUTER]


def test_relative_file_names_resolve_against_base_dir(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    ctx = {"common_tls_context": {"trusted_ca": {"filename": "c.pem"}}}
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"validation_context": ctx["common_tls_context"]},
        },
    }
    doc = bootstrap(clusters=[cluster(transport_socket=tls)])
    b = parse_bootstrap(doc, base_dir=str(tmp_path))
    ts = b.static_resources.clusters[0].transport_socket
    assert ts is not None
    assert ts.common_tls_context.trusted_ca == DataSource(filename=str(tmp_path / "c.pem"))
    errors = errors_of(doc)  # relative to the working directory: not there
    assert errors == [
        "static_resources.clusters[0].transport_socket.typed_config.common_tls_context.validation_context"
        ".trusted_ca.filename: file not found: c.pem"
    ]


# ------------------------------------------------------------------------------------------ errors
def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set ``a.b[0].c`` in ``doc`` (``value`` DELETE removes the key)."""
    parts: list[str | int] = []
    for part in path.split("."):
        name, _, rest = part.partition("[")
        parts.append(name)
        parts.extend(int(i) for i in rest.rstrip("]").split("][") if i) if rest else None
    node: Any = doc
    for p in parts[:-1]:
        node = node[p]
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return doc


DELETE = object()
H = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
R = H + ".route_config.virtual_hosts[0].routes[0]"

CASES: list[tuple[str, Any, str]] = [
    (
        "static_resources.clusters[0].lb_policy",
        "ROUND_ROBBIN",
        "static_resources.clusters[0].lb_policy: unknown value 'ROUND_ROBBIN' "
        "(expected one of ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV)",
    ),
    (
        "static_resources.clusters[0].lb_policy",
        "CLUSTER_PROVIDED",
        "static_resources.clusters[0].lb_policy: CLUSTER_PROVIDED is not supported yet",
    ),
    (
        "static_resources.clusters[0].type",
        "EDS",
        "static_resources.clusters[0].type: EDS is not supported yet (use STATIC or STRICT_DNS)",
    ),
    ("static_resources.clusters[0].colour", "blue", "static_resources.clusters[0].colour: unknown field"),
    (
        "static_resources.clusters[1].name",
        DELETE,
        "static_resources.clusters[1].name: required field is missing",
    ),
    (
        "static_resources.clusters[1].name",
        7,
        "static_resources.clusters[1].name: expected a string, got integer",
    ),
    ("static_resources.clusters[1].name", "", "static_resources.clusters[1].name: must not be empty"),
    (
        "static_resources.clusters[0].circuit_breakers",
        {"thresholds": [{"max_requests": 0}]},
        "static_resources.clusters[0].circuit_breakers.thresholds[0].max_requests: must be >= 1, got 0",
    ),
    (
        "static_resources.clusters[0].circuit_breakers",
        {"thresholds": [{}, {"priority": "DEFAULT"}]},
        "static_resources.clusters[0].circuit_breakers.thresholds[1].priority: "
        "priority DEFAULT appears twice",
    ),
    (
        "static_resources.clusters[0].circuit_breakers",
        {"thresholds": [{"retry_budget": {"budget_percent": {"value": 150}}}]},
        "static_resources.clusters[0].circuit_breakers.thresholds[0].retry_budget.budget_percent.value: "
        "must be <= 100",
    ),
    (
        "static_resources.clusters[0].connect_timeout",
        "0s",
        "static_resources.clusters[0].connect_timeout: must be greater than 0",
    ),
    (
        "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address"
        ".socket_address.address",
        "backend.local",
        "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address"
        ".socket_address.address: expected an IP address, got 'backend.local'",
    ),
    (
        "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address"
        ".socket_address.port_value",
        0,
        "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address"
        ".socket_address.port_value: must be >= 1, got 0",
    ),
    (
        "static_resources.listeners[0].address.socket_address.port_value",
        70000,
        "static_resources.listeners[0].address.socket_address.port_value: must be <= 65535, got 70000",
    ),
    (
        "static_resources.listeners[0].address.socket_address.port_value",
        "http",
        "static_resources.listeners[0].address.socket_address.port_value: expected an integer, got string",
    ),
    (
        "static_resources.listeners[0].address.socket_address.address",
        "localhost",
        L0 + ".address.socket_address.address: expected an IP address, got 'localhost'",
    ),
    (
        "static_resources.listeners[0].address.socket_address.protocol",
        "SCTP",
        L0 + ".address.socket_address.protocol: unknown value 'SCTP' (expected one of TCP, UDP)",
    ),
    (
        "static_resources.listeners[0].filter_chains",
        [],
        "static_resources.listeners[0].filter_chains: must not be empty",
    ),
    (
        "static_resources.listeners[0].max_connections",
        0,
        "static_resources.listeners[0].max_connections: must be >= 1, got 0",
    ),
    (H + ".rds", {"route_config_name": "x"}, H + ".rds: not supported yet, use route_config"),
    (H + ".stat_prefix", DELETE, H + ".stat_prefix: required field is missing"),
    (H + ".route_config", DELETE, H + ".route_config: required field is missing"),
    (
        H + ".codec_type",
        "HTTP4",
        H + ".codec_type: unknown value 'HTTP4' (expected one of AUTO, HTTP1, HTTP2, HTTP3)",
    ),
    (
        H + ".codec_type",
        "HTTP3",
        H + ".codec_type: HTTP3 needs a UDP listener with udp_listener_config.quic_options",
    ),
    (H + ".max_request_headers_kb", 97, H + ".max_request_headers_kb: must be <= 96, got 97"),
    (
        H + ".stream_idle_timeout",
        "5 minutes",
        H + ".stream_idle_timeout: expected a duration like '5s', '0.25s' or '250ms', got '5 minutes'",
    ),
    (H + ".generate_request_id", "yes", H + ".generate_request_id: expected true or false, got string"),
    (
        H + ".http_filters",
        [{"name": "envoy.filters.http.nope"}],
        H
        + ".http_filters[0].name: unknown extension 'envoy.filters.http.nope' (known: "
        + ", ".join(sorted(extensions.HTTP_FILTERS))
        + ")",
    ),
    (H + ".http_filters[0].disabled", True, H + ".http_filters[0].disabled: the router cannot be disabled"),
    (
        H + ".http_filters[0].typed_config.@type",
        T + "acme.Nope",
        H + ".http_filters[0].typed_config.@type: unknown @type 'type.googleapis.com/acme.Nope'",
    ),
    (
        H + ".http_filters[0].typed_config",
        {},
        H + ".http_filters[0].typed_config.@type: required field is missing",
    ),
    (R + ".route.cluster", "nope", R + ".route.cluster: unknown cluster 'nope'"),
    (
        R + ".route",
        {
            "weighted_clusters": {
                "clusters": [{"name": "backend", "weight": 1}, {"name": "gone", "weight": 1}]
            }
        },
        R + ".route.weighted_clusters.clusters[1].name: unknown cluster 'gone'",
    ),
    (
        R + ".route",
        {"weighted_clusters": {"clusters": [{"name": "backend", "weight": 0}]}},
        R + ".route.weighted_clusters.clusters: weights must add up to more than 0",
    ),
    (
        R + ".route",
        {"cluster": "backend", "weighted_clusters": {"clusters": [{"name": "backend", "weight": 1}]}},
        R + ".route: only one of cluster, weighted_clusters may be set, got cluster, weighted_clusters",
    ),
    (R + ".route", {}, R + ".route: one of cluster, weighted_clusters is required"),
    (
        R + ".match",
        {"prefix": "/", "path": "/x"},
        R + ".match: only one of prefix, path, safe_regex may be set, got prefix, path",
    ),
    (R + ".match", {}, R + ".match: one of prefix, path, safe_regex is required"),
    (R + ".match", {"path": "x"}, R + ".match.path: must start with '/', got 'x'"),
    (
        R + ".match",
        {"safe_regex": {"regex": "(unclosed"}},
        R + ".match.safe_regex.regex: invalid regex: missing ), unterminated subpattern at position 0",
    ),
    (
        R + ".match",
        {"prefix": "/", "headers": [{"name": "x", "string_match": {"safe_regex": {"regex": "*"}}}]},
        R + ".match.headers[0].string_match.safe_regex.regex: invalid regex: nothing to repeat at position 0",
    ),
    (R + ".match", {"prefix": "/", "query_parameters": []}, R + ".match.query_parameters: not supported yet"),
    (R + ".redirect", {"path_redirect": "/"}, R + ".redirect: not supported yet"),
    (
        R + ".route.retry_policy",
        {"retry_on": "5xx,sometimes"},
        R + ".route.retry_policy.retry_on: unknown retry condition 'sometimes' (expected one of " + "",
    ),  # prefix match, see test
    (
        R + ".route.retry_policy",
        {"retry_back_off": {"max_interval": "1s"}},
        R + ".route.retry_policy.retry_back_off.base_interval: required field is missing",
    ),
    (
        R + ".route.retry_policy",
        {"retriable_status_codes": [503, 42]},
        R + ".route.retry_policy.retriable_status_codes[1]: expected an HTTP status code (100-599), got 42",
    ),
    (
        R + ".request_headers_to_add",
        [{"header": {"key": ":path", "value": "/"}}],
        R + ".request_headers_to_add[0].header.key: pseudo-header ':path' cannot be set or removed here",
    ),
    (
        R + ".request_headers_to_remove",
        ["host"],
        R + ".request_headers_to_remove[0]: 'host' cannot be removed",
    ),
    (
        R,
        {"match": {"prefix": "/"}, "direct_response": {"status": 99}},
        R + ".direct_response.status: must be >= 100, got 99",
    ),
    (
        H + ".route_config.virtual_hosts[0].domains",
        [],
        H + ".route_config.virtual_hosts[0].domains: must not be empty",
    ),
    (
        H + ".route_config.virtual_hosts[0].domains",
        ["a.*.com"],
        H + ".route_config.virtual_hosts[0].domains[0]: "
        "invalid domain 'a.*.com' (a wildcard '*' may only be a whole prefix or suffix)",
    ),
    (
        H + ".access_log",
        [{"name": "envoy.access_loggers.syslog"}],
        H + ".access_log[0].name: unknown access logger 'envoy.access_loggers.syslog' (expected "
        "envoy.access_loggers.file or envoy.access_loggers.stdout)",
    ),
    (
        "admin.address.socket_address.protocol",
        "UDP",
        "admin.address.socket_address.protocol: unknown value 'UDP' (expected one of TCP)",
    ),
    ("layered_runtime", {}, "layered_runtime: not supported yet"),
    ("statc_resources", {}, "statc_resources: unknown field"),
]


@pytest.mark.parametrize(("path", "value", "expected"), CASES, ids=[c[0].split(".")[-1] for c in CASES])
def test_each_error_is_reported_with_its_exact_path(path: str, value: Any, expected: str) -> None:
    doc = bootstrap(clusters=[cluster(), cluster("spare")])
    doc["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}}
    errors = errors_of(_set(doc, path, value if value is DELETE else copy.deepcopy(value)))
    if expected.endswith("(expected one of "):
        assert len(errors) == 1
        assert errors[0].startswith(expected)
    else:
        assert errors == [expected]


def test_unknown_network_filter_name() -> None:
    doc = bootstrap()
    chain = doc["static_resources"]["listeners"][0]["filter_chains"][0]
    chain["filters"] = [{"name": "envoy.filters.network.nope"}]
    errors = errors_of(doc)
    assert errors == [
        L0 + ".filter_chains[0].filters[0].name: unknown extension 'envoy.filters.network.nope' (known: "
        "envoy.filters.network.http_connection_manager, microenvoy.filters.network.coap_proxy, "
        "microenvoy.filters.network.mqtt_proxy)"
    ]


def test_several_errors_at_once_are_all_reported() -> None:
    doc = bootstrap(
        listeners=[listener(), listener(port=8081)],
        clusters=[cluster(), cluster("other", lb_policy="ROUND_ROBBIN", surprise=1)],
    )
    _set(doc, R + ".route.cluster", "missing")
    errors = errors_of(doc)
    assert errors == [
        "static_resources.clusters[1].lb_policy: unknown value 'ROUND_ROBBIN' (expected one of ROUND_ROBIN, "
        "LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV)",
        "static_resources.clusters[1].surprise: unknown field",
        R + ".route.cluster: unknown cluster 'missing'",
        L1 + ".name: duplicate listener name 'http' (also static_resources.listeners[0])",
    ]


def test_duplicate_cluster_names_and_listener_addresses() -> None:
    doc = bootstrap(listeners=[listener("a"), listener("b")], clusters=[cluster(), cluster()])
    assert errors_of(doc) == [
        "static_resources.clusters[1].name: duplicate cluster name 'backend' "
        "(also static_resources.clusters[0])",
        L1 + ".address: TCP 127.0.0.1:8080 is already used by static_resources.listeners[0]",
    ]


def test_the_last_http_filter_must_be_the_router() -> None:
    doc = bootstrap()
    _set(doc, H + ".http_filters", [{"name": ROUTER}, {"name": ROUTER}])
    assert errors_of(doc) == [
        H + ".http_filters[0]: envoy.filters.http.router is terminal and must be the last HTTP filter"
    ]


def test_an_unavailable_filter_module_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        extensions.HTTP_FILTERS,
        "acme.filters.http.gone",
        ("microenvoy.filters.http._does_not_exist", (T + "acme.Gone",)),
    )
    doc = bootstrap()
    _set(
        doc,
        H + ".http_filters",
        [{"name": "acme.filters.http.gone", "typed_config": {"@type": T + "acme.Gone"}}, {"name": ROUTER}],
    )
    errors = errors_of(doc)
    assert errors == [
        H + ".http_filters[0].name: HTTP filter 'acme.filters.http.gone' is not available in this build "
        "(No module named 'microenvoy.filters.http._does_not_exist')"
    ]


def test_a_crashing_filter_parser_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = types.ModuleType("microenvoy_test_bad_filter")

    def parse_config(r: Any) -> Any:
        raise RuntimeError("boom")

    bad.parse_config = parse_config  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "microenvoy_test_bad_filter", bad)
    monkeypatch.setitem(extensions.HTTP_FILTERS, "acme.bad", ("microenvoy_test_bad_filter", ()))
    doc = bootstrap()
    _set(
        doc, H + ".http_filters", [{"name": "acme.bad", "typed_config": {"@type": T + "x"}}, {"name": ROUTER}]
    )
    errors = errors_of(doc)
    assert errors == [H + ".http_filters[0].typed_config.@type: unknown @type 'type.googleapis.com/x'"]
    _set(doc, H + ".http_filters", [{"name": "acme.bad"}, {"name": ROUTER}])
    assert errors_of(doc) == [
        H + ".http_filters[0].typed_config: acme.bad could not parse its config (RuntimeError: boom)"
    ]


def test_filter_parser_errors_carry_the_filter_path() -> None:
    doc = bootstrap()
    _set(doc, H + ".http_filters[0].typed_config.no_such_option", True)
    assert errors_of(doc) == [H + ".http_filters[0].typed_config.no_such_option: unknown field"]


def test_udp_listener_rules(tmp_path: Path) -> None:
    doc = bootstrap(listeners=[listener("q", 8443, "UDP")])
    assert errors_of(doc) == [
        L0 + ".udp_listener_config.quic_options: required on a UDP listener (UDP serves QUIC/HTTP/3, "
        "or CoAP with microenvoy.filters.network.coap_proxy)",
        L0
        + ".filter_chains[0].transport_socket: a QUIC listener needs envoy.transport_sockets.quic with a TLS "
        "certificate",
    ]
    doc = bootstrap(listeners=[quic_listener(tmp_path, codec_type="HTTP2")])
    assert errors_of(doc) == [HCM0 + ".codec_type: a UDP (QUIC) listener needs HTTP3 or AUTO, got HTTP2"]
    good = quic_listener(tmp_path)
    assert (
        parse_bootstrap(bootstrap(listeners=[good])).static_resources.listeners[0].quic_options
        == QuicOptions()
    )
    tcp = listener(udp_listener_config={"quic_options": {}})
    assert errors_of(bootstrap(listeners=[tcp])) == [
        L0 + ".udp_listener_config: only valid on a UDP listener (address.socket_address.protocol: UDP)"
    ]
    wrong_socket = quic_listener(tmp_path)
    wrong_socket["filter_chains"][0]["transport_socket"]["name"] = "envoy.transport_sockets.tls"
    assert errors_of(bootstrap(listeners=[wrong_socket])) == [
        L0
        + ".filter_chains[0].transport_socket.name: expected 'envoy.transport_sockets.quic' on a UDP (QUIC) "
        "listener, got 'envoy.transport_sockets.tls'"
    ]


def test_advertise_http3_must_name_a_udp_listener(tmp_path: Path) -> None:
    doc = bootstrap(listeners=[listener(advertise_http3={"listener": "other"}), listener("other", 8081)])
    assert errors_of(doc) == [L0 + ".advertise_http3.listener: 'other' is not a UDP (QUIC) listener"]
    doc = bootstrap(listeners=[listener(advertise_http3={"listener": "nope"})])
    assert errors_of(doc) == [L0 + ".advertise_http3.listener: unknown listener 'nope'"]
    doc = bootstrap(listeners=[listener(advertise_http3={"listener": "quic"}), quic_listener(tmp_path)])
    assert parse_bootstrap(doc).static_resources.listeners[0].advertise_http3 == AdvertiseHttp3("quic")


def test_missing_certificate_files_are_reported(tmp_path: Path) -> None:
    q = quic_listener(tmp_path)
    (tmp_path / "k.pem").unlink()
    errors = errors_of(bootstrap(listeners=[q]))
    assert errors == [
        L0 + ".filter_chains[0].transport_socket.typed_config.downstream_tls_context.common_tls_context"
        f".tls_certificates[0].private_key.filename: file not found: {tmp_path / 'k.pem'}"
    ]


def test_downstream_tls_needs_a_certificate_and_a_ca_for_client_certs() -> None:
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {"alpn_protocols": ["h2"]},
        },
    }
    doc = bootstrap()
    _set(doc, L0 + ".filter_chains[0].transport_socket", tls)
    p = L0 + ".filter_chains[0].transport_socket.typed_config"
    assert errors_of(doc) == [
        p + ".common_tls_context.tls_certificates: a downstream TLS context needs a certificate",
        p + ".require_client_certificate: require_client_certificate needs "
        "common_tls_context.validation_context.trusted_ca",
    ]


def test_protocol_options_conflict_and_type_check() -> None:
    teo = {HPO: {"@type": T + "wrong.Type", "explicit_http_config": {"http2_protocol_options": {}}}}
    doc = bootstrap(clusters=[cluster(typed_extension_protocol_options=teo, http2_protocol_options={})])
    c = "static_resources.clusters[0]"
    assert errors_of(doc) == [
        c + ".http2_protocol_options: set typed_extension_protocol_options or the legacy "
        "http2_protocol_options, not both",
        c + f".typed_extension_protocol_options.{HPO}.@type: expected 'type.googleapis.com/{HPO}', "
        "got 'type.googleapis.com/wrong.Type'",
    ]


def test_header_append_legacy_and_action_conflict() -> None:
    doc = bootstrap()
    _set(
        doc,
        R + ".request_headers_to_add",
        [{"header": {"key": "x", "value": "1"}, "append": False, "append_action": "ADD_IF_ABSENT"}],
    )
    assert errors_of(doc) == [
        R + ".request_headers_to_add[0].append: set append_action or the legacy append, not both"
    ]


def test_header_value_formatters_are_checked_at_load() -> None:
    pytest.importorskip("microenvoy.router.table")
    doc = bootstrap()
    _set(doc, R + ".request_headers_to_add", [{"header": {"key": "x-who", "value": "%NO_SUCH_THING%"}}])
    errors = errors_of(doc)
    assert len(errors) == 1
    assert errors[0].startswith(R + ".")
    assert "NO_SUCH_THING" in errors[0]


# ------------------------------------------------------------------------------------------ files
def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("static_resources:\n  clusters:\n  - name: a\n   type: STATIC\n")
    with pytest.raises(ConfigError) as info:
        load_bootstrap(str(p))
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith(f"{p}:4:")
    assert "invalid YAML" in info.value.errors[0]


def test_duplicate_yaml_keys_are_errors(tmp_path: Path) -> None:
    p = tmp_path / "dup.yaml"
    p.write_text("admin: {}\nnode:\n  id: a\n  id: b\n")
    with pytest.raises(ConfigError) as info:
        load_bootstrap(str(p))
    assert info.value.errors == [f"{p}:4:3: invalid YAML: found duplicate key 'id'"]


def test_json_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.json"
    p.write_text('{\n  "node": {"id": "a",}\n}\n')
    with pytest.raises(ConfigError) as info:
        load_bootstrap(str(p))
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith(f"{p}:2:")


def test_unreadable_file(tmp_path: Path) -> None:
    p = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_bootstrap(str(p))
    assert info.value.errors == [f"{p}: cannot read: No such file or directory"]


def test_validation_errors_from_a_file_carry_paths(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("static_resources:\n  clusters:\n  - name: a\n  - name: b\n    lb_policy: ROUND_ROBBIN\n")
    with pytest.raises(ConfigError) as info:
        load_bootstrap(str(p))
    assert info.value.errors == [
        "static_resources.clusters[1].lb_policy: unknown value 'ROUND_ROBBIN' (expected one of ROUND_ROBIN, "
        "LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV)"
    ]


def test_top_level_must_be_a_mapping() -> None:
    assert errors_of([1, 2]) == ["expected a mapping, got list"]


def test_the_complete_example_in_the_configuration_docs_is_valid() -> None:
    import yaml

    text = (REPO / "docs" / "configuration.md").read_text()
    section = text[text.index("## Complete example") :]
    block = section[
        section.index("```yaml\n") + len("```yaml\n") : section.index("\n```", section.index("```yaml"))
    ]
    b = parse_bootstrap(yaml.safe_load(block), base_dir=str(REPO / "docs" / "examples"))
    assert [li.name for li in b.static_resources.listeners] == ["http", "quic"]
    assert [c.upstream_protocol for c in b.static_resources.clusters] == ["HTTP2", "HTTP1"]


def test_circuit_breaker_thresholds_parse_with_envoy_defaults() -> None:
    doc = bootstrap(
        clusters=[
            cluster(
                circuit_breakers={
                    "thresholds": [
                        {"max_requests": {"value": 10}, "max_pending_requests": 5, "track_remaining": True},
                        {"priority": "HIGH", "retry_budget": {"min_retry_concurrency": 7}},
                    ]
                }
            )
        ]
    )
    c = parse_bootstrap(doc).static_resources.clusters[0]
    default, high = c.circuit_breakers
    assert (default.priority, default.max_requests, default.max_pending_requests) == ("DEFAULT", 10, 5)
    assert (default.max_connections, default.max_retries, default.track_remaining) == (1024, 3, True)
    assert high.priority == "HIGH"
    assert high.retry_budget is not None
    assert (high.retry_budget.budget_percent, high.retry_budget.min_retry_concurrency) == (20.0, 7)


def _with_hcm_extra(**extra: Any) -> dict[str, Any]:
    doc = bootstrap()
    doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"].update(extra)
    return doc


def test_tracing_collector_must_be_a_configured_cluster() -> None:
    tracing = {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "http_service": {
                    "http_uri": {"uri": "http://collector:4318/v1/traces", "cluster": "otel", "timeout": "1s"}
                },
            },
        }
    }
    errs = errors_of(_with_hcm_extra(tracing=tracing))
    assert errs == [
        "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.tracing.provider.typed_config"
        ".http_service.http_uri.cluster: unknown cluster 'otel'"
    ]


def test_json_format_values_may_be_typed_and_nested() -> None:
    log = {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {
                "json_format": {"code": "%RESPONSE_CODE%", "n": 1, "ok": True, "up": {"h": "%UPSTREAM_HOST%"}}
            },
        },
    }
    h = the_hcm(_with_hcm_extra(access_log=[log]))
    assert h.access_log[0].json_format == (
        ("code", "%RESPONSE_CODE%"),
        ("n", 1),
        ("ok", True),
        ("up", (("h", "%UPSTREAM_HOST%"),)),
    )
    log["typed_config"]["log_format"] = {"json_format": {"bad": [1, 2]}}  # type: ignore[index]
    assert errors_of(_with_hcm_extra(access_log=[log]))[0].endswith(
        "log_format.json_format.bad: expected a format string, a number, a boolean, null or a mapping "
        "(lists are not supported)"
    )
