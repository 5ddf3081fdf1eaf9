"""Builders for agent configs in Envoy v3 shape (YAML-ready dicts), so every test writes the same shapes.

Only documented fields are used; where microenvoy extends Envoy (``max_connections``, ``advertise_http3``,
``max_request_bytes``, the QUIC options) the field names follow ``microenvoy/config/model.py``. If the loader
spells one differently, this is the one place to change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .certs import CertBundle

__all__ = [
    "HCM_TYPE",
    "bootstrap",
    "circuit_breakers",
    "cluster",
    "downstream_tls",
    "file_access_log",
    "filter_fault",
    "filter_health_check",
    "filter_local_ratelimit",
    "filter_rbac",
    "hash_policy_header",
    "hcm",
    "http_health_check",
    "outlier_detection",
    "percent",
    "quic_listener",
    "retry_policy",
    "route",
    "router_filter",
    "socket_address",
    "tcp_listener",
    "virtual_host",
    "weighted_cluster",
]

_T = "type.googleapis.com/"
HCM_TYPE = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_TYPE = _T + "envoy.extensions.filters.http.router.v3.Router"
DOWNSTREAM_TLS_TYPE = _T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS_TYPE = _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
QUIC_TRANSPORT_TYPE = _T + "envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport"
HTTP_PROTOCOL_OPTIONS_TYPE = _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def socket_address(port: int = 0, address: str = "127.0.0.1", protocol: str | None = None) -> dict[str, Any]:
    sa: dict[str, Any] = {"address": address, "port_value": port}
    if protocol is not None:
        sa["protocol"] = protocol
    return {"socket_address": sa}


def percent(n: int) -> dict[str, Any]:
    """Envoy's FractionalPercent."""
    return {"numerator": n, "denominator": "HUNDRED"}


def router_filter() -> dict[str, Any]:
    return {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}


def route(
    prefix: str | None = "/",
    cluster: str | None = None,
    *,
    path: str | None = None,
    regex: str | None = None,
    grpc: bool = False,
    headers: Sequence[dict[str, Any]] = (),
    direct: tuple[int, str] | None = None,
    name: str | None = None,
    route_extra: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One route: match on prefix/path/regex (+ headers, grpc), to ``cluster`` or a direct response.

    ``route_extra`` goes into the ``route`` action (``timeout``, ``retry_policy``, ``max_request_bytes`` ...);
    ``extra`` goes on the route itself (``request_headers_to_add`` ...).
    """
    match: dict[str, Any] = {}
    if path is not None:
        match["path"] = path
    elif regex is not None:
        match["safe_regex"] = {"regex": regex}
    else:
        match["prefix"] = prefix
    if headers:
        match["headers"] = list(headers)
    if grpc:
        match["grpc"] = {}
    r: dict[str, Any] = {"match": match}
    if name:
        r["name"] = name
    if direct is not None:
        r["direct_response"] = {"status": direct[0], "body": {"inline_string": direct[1]}}
    else:
        assert cluster is not None
        r["route"] = {"cluster": cluster, **(route_extra or {})}
    r.update(extra)
    return r


def virtual_host(
    routes: Iterable[dict[str, Any]], name: str = "all", domains: Sequence[str] = ("*",), **extra: Any
) -> dict[str, Any]:
    return {"name": name, "domains": list(domains), "routes": list(routes), **extra}


def hcm(
    stat_prefix: str,
    routes: Iterable[dict[str, Any]] = (),
    *,
    virtual_hosts: Sequence[dict[str, Any]] | None = None,
    filters: Sequence[dict[str, Any]] = (),
    codec_type: str = "AUTO",
    **extra: Any,
) -> dict[str, Any]:
    """The HTTP connection manager network filter; the router filter is appended to ``filters``."""
    vhosts = list(virtual_hosts) if virtual_hosts is not None else [virtual_host(routes)]
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM_TYPE,
            "stat_prefix": stat_prefix,
            "codec_type": codec_type,
            "route_config": {"name": f"{stat_prefix}_routes", "virtual_hosts": vhosts},
            "http_filters": [*filters, router_filter()],
            **extra,
        },
    }


def _tls_certificates(certs: CertBundle) -> list[dict[str, Any]]:
    return [
        {
            "certificate_chain": {"filename": str(certs.server_chain)},
            "private_key": {"filename": str(certs.server_key)},
        }
    ]


def downstream_tls(
    certs: CertBundle, alpn: Sequence[str] = ("h2", "http/1.1"), *, require_client_cert: bool = False
) -> dict[str, Any]:
    """``transport_socket`` for a TCP listener's filter chain."""
    ctx: dict[str, Any] = {
        "@type": DOWNSTREAM_TLS_TYPE,
        "common_tls_context": {"tls_certificates": _tls_certificates(certs), "alpn_protocols": list(alpn)},
    }
    if require_client_cert:
        ctx["require_client_certificate"] = True
        ctx["common_tls_context"]["validation_context"] = {"trusted_ca": {"filename": str(certs.ca_cert)}}
    return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}


def tcp_listener(
    name: str,
    http: dict[str, Any],
    *,
    tls: dict[str, Any] | None = None,
    port: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """A TCP listener with one filter chain holding ``http`` (an ``hcm(...)``), optionally TLS."""
    chain: dict[str, Any] = {"filters": [http]}
    if tls is not None:
        chain["transport_socket"] = tls
    return {"name": name, "address": socket_address(port, protocol="TCP"), "filter_chains": [chain], **extra}


def quic_listener(
    name: str,
    http: dict[str, Any],
    certs: CertBundle,
    *,
    quic_options: dict[str, Any] | None = None,
    port: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """A UDP listener with QUIC + HTTP/3 (Envoy's shape: QuicDownstreamTransport wrapping the TLS context)."""
    http = {**http, "typed_config": {**http["typed_config"], "codec_type": "HTTP3"}}
    return {
        "name": name,
        "address": socket_address(port, protocol="UDP"),
        "udp_listener_config": {"quic_options": dict(quic_options or {})},
        "filter_chains": [
            {
                "filters": [http],
                "transport_socket": {
                    "name": "envoy.transport_sockets.quic",
                    "typed_config": {
                        "@type": QUIC_TRANSPORT_TYPE,
                        "downstream_tls_context": {
                            "common_tls_context": {
                                "tls_certificates": _tls_certificates(certs),
                                "alpn_protocols": ["h3"],
                            }
                        },
                    },
                },
            }
        ],
        **extra,
    }


def cluster(
    name: str,
    ports: int | Sequence[int],
    *,
    http2: bool = False,
    connect_timeout: str = "1s",
    lb_policy: str = "ROUND_ROBIN",
    tls_ca: str | Path | None = None,
    client_cert: tuple[str | Path, str | Path] | None = None,
    sni: str = "localhost",
    alpn: Sequence[str] | None = None,
    address: str = "127.0.0.1",
    **extra: Any,
) -> dict[str, Any]:
    """A STATIC cluster on loopback ports; ``http2`` selects HTTP/2 (h2c, or ALPN h2 with TLS).

    ``tls_ca`` turns on upstream TLS (the CA file that must sign the server's certificate); ``client_cert``
    is ``(certificate_chain, private_key)`` for mTLS.
    """
    port_list = [ports] if isinstance(ports, int) else list(ports)
    c: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "lb_policy": lb_policy,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": socket_address(p, address)}} for p in port_list]}
            ],
        },
    }
    if http2:
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_PROTOCOL_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    if tls_ca is not None:
        common: dict[str, Any] = {
            "validation_context": {"trusted_ca": {"filename": str(tls_ca)}},
            "alpn_protocols": list(alpn or (["h2"] if http2 else ["http/1.1"])),
        }
        if client_cert is not None:
            common["tls_certificates"] = [
                {
                    "certificate_chain": {"filename": str(client_cert[0])},
                    "private_key": {"filename": str(client_cert[1])},
                }
            ]
        c["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": UPSTREAM_TLS_TYPE, "sni": sni, "common_tls_context": common},
        }
    c.update(extra)
    return c


def bootstrap(
    listeners: Sequence[dict[str, Any]], clusters: Sequence[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """The whole document: admin on ``127.0.0.1:0`` plus static listeners and clusters."""
    return {
        "admin": {"address": socket_address(0)},
        "static_resources": {"listeners": list(listeners), "clusters": list(clusters)},
        **extra,
    }


# ------------------------------------------------------------------------------------ HTTP filters
def filter_local_ratelimit(
    max_tokens: int,
    fill_interval: str = "60s",
    tokens_per_fill: int | None = None,
    stat_prefix: str = "http_local_rate_limiter",
) -> dict[str, Any]:
    """Envoy's LocalRateLimit (stats ``<stat_prefix>.http_local_rate_limit.{ok,rate_limited,...}``)."""
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": stat_prefix,
            "token_bucket": {
                "max_tokens": max_tokens,
                "tokens_per_fill": tokens_per_fill if tokens_per_fill is not None else max_tokens,
                "fill_interval": fill_interval,
            },
            # Envoy's defaults are 0 % for both: without these the filter neither counts nor enforces.
            "filter_enabled": {"runtime_key": "local_rate_limit_enabled", "default_value": percent(100)},
            "filter_enforced": {"runtime_key": "local_rate_limit_enforced", "default_value": percent(100)},
        },
    }


def filter_rbac(action: str, policies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": action, "policies": policies},
        },
    }


def filter_fault(
    name: str,
    *,
    abort_status: int | None = None,
    delay: str | None = None,
    header: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """An HTTPFault filter (100 %); ``header`` limits it to requests carrying that exact header value."""
    cfg: dict[str, Any] = {"@type": _T + "envoy.extensions.filters.http.fault.v3.HTTPFault"}
    if abort_status is not None:
        cfg["abort"] = {"http_status": abort_status, "percentage": percent(100)}
    if delay is not None:
        cfg["delay"] = {"fixed_delay": delay, "percentage": percent(100)}
    if header is not None:
        cfg["headers"] = [{"name": header[0], "string_match": {"exact": header[1]}}]
    return {"name": name, "typed_config": cfg}


def filter_health_check(path: str = "/healthz", pass_through_mode: bool = True) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.health_check",
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.health_check.v3.HealthCheck",
            "pass_through_mode": pass_through_mode,
            "headers": [{"name": ":path", "string_match": {"exact": path}}],
        },
    }


# ------------------------------------------------------------------------------------ cluster resilience
def weighted_cluster(name: str, weighted_ports: Sequence[tuple[int, int]], **kwargs: Any) -> dict[str, Any]:
    """``cluster(...)`` whose endpoints carry ``load_balancing_weight``: ``[(port, weight), ...]``."""
    c = cluster(name, [p for p, _ in weighted_ports], **kwargs)
    for ep, (_, weight) in zip(
        c["load_assignment"]["endpoints"][0]["lb_endpoints"], weighted_ports, strict=True
    ):
        ep["load_balancing_weight"] = weight
    return c


def http_health_check(
    path: str = "/health",
    *,
    interval: str = "0.2s",
    timeout: str = "1s",
    unhealthy_threshold: int = 2,
    healthy_threshold: int = 1,
    no_traffic_interval: str | None = None,
    retriable_statuses: Sequence[tuple[int, int]] = (),
    **extra: Any,
) -> dict[str, Any]:
    """One ``health_checks[]`` entry with ``http_health_check.path`` (Envoy's core.v3.HealthCheck).

    ``no_traffic_interval`` defaults to ``interval`` here (Envoy's default is 60 s, too slow for a test).
    ``retriable_statuses`` are ``[start, end)`` ranges: as in Envoy, only those (and network failures) count
    toward ``unhealthy_threshold``; any other unexpected status marks the host unhealthy at once.
    """
    http: dict[str, Any] = {"path": path}
    if retriable_statuses:
        http["retriable_statuses"] = [{"start": a, "end": b} for a, b in retriable_statuses]
    return {
        "timeout": timeout,
        "interval": interval,
        "no_traffic_interval": no_traffic_interval or interval,
        "unhealthy_threshold": unhealthy_threshold,
        "healthy_threshold": healthy_threshold,
        "http_health_check": http,
        **extra,
    }


def outlier_detection(
    *,
    consecutive_5xx: int = 3,
    consecutive_gateway_failure: int | None = None,
    interval: str = "0.2s",
    base_ejection_time: str = "1s",
    max_ejection_percent: int = 50,
    **extra: Any,
) -> dict[str, Any]:
    """A cluster's ``outlier_detection`` (Envoy field names; anything else goes through ``extra``)."""
    od: dict[str, Any] = {
        "consecutive_5xx": consecutive_5xx,
        "interval": interval,
        "base_ejection_time": base_ejection_time,
        "max_ejection_percent": max_ejection_percent,
    }
    if consecutive_gateway_failure is not None:
        od["consecutive_gateway_failure"] = consecutive_gateway_failure
        od["enforcing_consecutive_gateway_failure"] = 100  # Envoy's default is 0 % for this one
    od.update(extra)
    return od


def circuit_breakers(
    *,
    max_connections: int | None = None,
    max_pending_requests: int | None = None,
    max_requests: int | None = None,
    max_retries: int | None = None,
    retry_budget: dict[str, Any] | None = None,
    priority: str = "DEFAULT",
) -> dict[str, Any]:
    """A cluster's ``circuit_breakers`` with one threshold (unset limits keep Envoy's defaults)."""
    t: dict[str, Any] = {"priority": priority}
    for key, value in (
        ("max_connections", max_connections),
        ("max_pending_requests", max_pending_requests),
        ("max_requests", max_requests),
        ("max_retries", max_retries),
        ("retry_budget", retry_budget),
    ):
        if value is not None:
            t[key] = value
    return {"thresholds": [t]}


def retry_policy(
    retry_on: str = "connect-failure,reset,5xx", num_retries: int = 3, base_interval: str = "0.01s"
) -> dict[str, Any]:
    """A route's ``retry_policy`` with a short backoff (max interval 5 x base)."""
    base = float(base_interval.rstrip("s"))
    return {
        "retry_on": retry_on,
        "num_retries": num_retries,
        "retry_back_off": {"base_interval": base_interval, "max_interval": f"{base * 5:g}s"},
    }


def hash_policy_header(header_name: str) -> list[dict[str, Any]]:
    """A route's ``hash_policy`` hashing on one request header."""
    return [{"header": {"header_name": header_name}}]


def file_access_log(path: str | Path, fields: dict[str, str]) -> list[dict[str, Any]]:
    """An HCM ``access_log`` list: JSON lines with ``fields`` (name -> Envoy command string) to ``path``."""
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": _T + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(path),
                "log_format": {"json_format": dict(fields)},
            },
        }
    ]
