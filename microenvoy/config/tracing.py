"""Tracing config: the HTTP connection manager's ``tracing`` block (Envoy's ``HCM.Tracing``).

Field names and defaults are Envoy's::

    tracing:
      random_sampling: {value: 10}        # percent of new traces that are sampled (default 100)
      client_sampling: {value: 100}       # ... of new traces whose request carries x-client-trace-id
      overall_sampling: {value: 100}      # upper limit applied after the two above
      max_path_tag_length: 256            # url.path attribute length limit
      provider:
        name: envoy.tracers.opentelemetry
        typed_config:
          "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
          service_name: edge-gateway
          http_service:
            http_uri: {uri: "http://collector:4318/v1/traces", cluster: otel, timeout: 1s}
            request_headers_to_add: [{header: {key: authorization, value: "Bearer ..."}}]

Providers: ``envoy.tracers.opentelemetry`` with ``http_service`` (we send OTLP/HTTP with the **JSON**
encoding; Envoy sends protobuf) and microenvoy's own ``microenvoy.tracers.file`` (one OTLP-JSON line per
span, for devices without a collector). ``grpc_service`` is not supported yet. Without a provider the agent
only propagates W3C trace context (a new span id per hop) and exports nothing. Percentages are Envoy's
``type.v3.Percent`` (``{value: 12.5}``; a bare number is accepted too) and must be within 0..100.

The runtime side is ``microenvoy.tracing`` (context and spans) and ``microenvoy.io.trace_export``
(exporters); user docs are in ``docs/tracing.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from microenvoy.config.model import HeaderValueOption
from microenvoy.config.reader import Reader

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "FILE_TRACER",
    "FILE_TRACER_TYPE_URL",
    "OPENTELEMETRY",
    "OPENTELEMETRY_TYPE_URL",
    "FileTracerConfig",
    "OpenTelemetryConfig",
    "OtlpHttpService",
    "Tracing",
    "TracingProvider",
    "parse_tracing",
]

OPENTELEMETRY = "envoy.tracers.opentelemetry"
OPENTELEMETRY_TYPE_URL = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
FILE_TRACER = "microenvoy.tracers.file"
FILE_TRACER_TYPE_URL = "type.googleapis.com/microenvoy.tracers.file.v1.FileTracerConfig"
DEFAULT_SERVICE_NAME = "unknown_service:microenvoy"
"""Envoy's default is ``unknown_service:envoy``; ours names the agent."""
DEFAULT_OTLP_PATH = "/v1/traces"
"""Used when ``http_uri.uri`` has no path (the OTLP/HTTP default)."""


@dataclass(frozen=True, slots=True)
class OtlpHttpService:
    """``http_service`` of the OpenTelemetry tracer: where OTLP/HTTP JSON export requests go."""

    cluster: str
    """``http_uri.cluster``: the agent's own cluster that carries the export requests."""
    authority: str
    """Host (and port) of ``http_uri.uri``: the ``:authority`` of export requests."""
    path: str
    """Path (and query) of ``http_uri.uri`` (``/v1/traces`` when it has none)."""
    scheme: str
    """``http`` or ``https`` from ``http_uri.uri`` (TLS itself is the cluster's ``transport_socket``)."""
    timeout: float
    """``http_uri.timeout`` (seconds): one export request, connect included."""
    request_headers_to_add: tuple[HeaderValueOption, ...] = ()
    """Literal headers added to every export request (no formatters, as in Envoy)."""


@dataclass(frozen=True, slots=True)
class OpenTelemetryConfig:
    """``envoy.tracers.opentelemetry``: OTLP export over HTTP (JSON) through a cluster."""

    http_service: OtlpHttpService | None = None
    """None: spans are created and propagated but not reported (Envoy's "left empty")."""
    service_name: str = DEFAULT_SERVICE_NAME
    """The ``service.name`` resource attribute."""


@dataclass(frozen=True, slots=True)
class FileTracerConfig:
    """``microenvoy.tracers.file``: append one OTLP-JSON document per span, one per line, to ``path``."""

    path: str
    service_name: str = DEFAULT_SERVICE_NAME


TracingProvider = OpenTelemetryConfig | FileTracerConfig


@dataclass(frozen=True, slots=True)
class Tracing:
    """The HCM ``tracing`` block. Its presence turns on trace context for every request (new traces are
    started for requests without a valid ``traceparent``)."""

    random_sampling: float = 100.0
    """Percent of new traces (no valid incoming ``traceparent``) that are sampled."""
    client_sampling: float = 100.0
    """Percent of new traces sampled when the request carries ``x-client-trace-id`` (instead of
    ``random_sampling``)."""
    overall_sampling: float = 100.0
    """Upper limit applied after the decisions above (a second, independent draw)."""
    max_path_tag_length: int = 256
    """The ``url.path`` span attribute is cut to this many characters."""
    provider: TracingProvider | None = None
    """Where sampled spans go; None = context propagation only."""
    provider_name: str = ""
    """``provider.name`` as configured (for stat names and logs)."""


def _percent(r: Reader, key: str) -> float:
    """Envoy's ``type.v3.Percent`` (``{value: 12.5}``) or a bare number; 0..100."""
    raw = r.get(key)
    if raw is None:
        return 100.0
    value: float = 100.0
    if isinstance(raw, dict):
        p = Reader(raw, r.sub(key), r.errors)
        value = p.number("value", 0.0)
        p.finish()
    elif isinstance(raw, bool) or not isinstance(raw, int | float):
        r.error("expected a percentage like {value: 10}", key)
        return 100.0
    else:
        value = float(raw)
    if not 0.0 <= value <= 100.0:
        r.error(f"must be within 0 and 100, got {value:g}", key)
        return 100.0
    return value


def _parse_http_service(r: Reader) -> OtlpHttpService | None:
    from microenvoy.config.loader import parse_header_value_option

    cluster, authority, path, scheme, timeout = "", "", DEFAULT_OTLP_PATH, "http", 1.0
    u = r.mapping("http_uri", required=True)
    if u is not None:
        uri: str = u.string("uri", required=True)
        cluster = u.string("cluster", required=True)
        if u.raw.get("cluster") == "":
            u.error("must not be empty", "cluster")
        timeout = u.duration("timeout", 1.0, required=True)
        if u.has("timeout") and timeout <= 0:
            u.error("must be greater than 0", "timeout")
        if uri:
            try:
                parts = urlsplit(uri)
                parts.port  # noqa: B018  # raises ValueError for a bad port
            except ValueError as exc:
                u.error(f"invalid URI {uri!r}: {exc}", "uri")
            else:
                if parts.scheme not in ("http", "https") or not parts.netloc:
                    u.error(f"expected an http:// or https:// URI with a host, got {uri!r}", "uri")
                scheme = parts.scheme or "http"
                authority = parts.netloc.rpartition("@")[2]
                path = parts.path or DEFAULT_OTLP_PATH
                if parts.query:
                    path += "?" + parts.query
        u.finish()
    headers = r.objects("request_headers_to_add", parse_header_value_option)
    if u is None:
        return None
    return OtlpHttpService(
        cluster=cluster,
        authority=authority,
        path=path,
        scheme=scheme,
        timeout=timeout,
        request_headers_to_add=headers,
    )


def _service_name(r: Reader) -> str:
    name: str = r.string("service_name", DEFAULT_SERVICE_NAME)
    return name or DEFAULT_SERVICE_NAME


def _parse_opentelemetry(r: Reader) -> OpenTelemetryConfig:
    from microenvoy.config.loader import not_supported

    http: OtlpHttpService | None = None
    if r.has("grpc_service"):
        r.ignore("grpc_service")
        r.error("not supported yet (use http_service: OTLP/HTTP with JSON)", "grpc_service")
    if r.has("http_service"):
        http = r.object("http_service", _parse_http_service)
    not_supported(
        r,
        "collector_cluster",
        "resource_detectors",
        "sampler",
        "max_cache_size",
        "set_telemetry_sdk_resource_attributes",
        "set_service_name_resource_attribute",
        "set_instrumentation_scope",
    )
    return OpenTelemetryConfig(http_service=http, service_name=_service_name(r))


def _parse_file_tracer(r: Reader) -> FileTracerConfig:
    path: str = r.string("path", required=True)
    if r.raw.get("path") == "":
        r.error("must not be empty", "path")
    return FileTracerConfig(path=path, service_name=_service_name(r))


_PROVIDERS: dict[str, tuple[str, Callable[[Reader], TracingProvider]]] = {
    OPENTELEMETRY: (OPENTELEMETRY_TYPE_URL, _parse_opentelemetry),
    FILE_TRACER: (FILE_TRACER_TYPE_URL, _parse_file_tracer),
}
_BY_TYPE_URL = {url: name for name, (url, _) in _PROVIDERS.items()}


def _parse_provider(r: Reader) -> tuple[str, TracingProvider | None]:
    from microenvoy.config.loader import typed_config_reader

    name: str = r.string("name", required=True)
    tc, type_url = typed_config_reader(r)
    kind = _BY_TYPE_URL.get(type_url or "") if type_url is not None else name
    if type_url is not None and kind is None:
        r.error(f"unknown tracer @type {type_url!r} (expected one of {', '.join(_BY_TYPE_URL)})",
                "typed_config.@type")  # fmt: skip
        return name, None
    if kind not in _PROVIDERS:
        if name:
            r.error(f"unknown tracer {name!r} (expected one of {', '.join(_PROVIDERS)})", "name")
        return name, None
    if tc is None:
        if kind == FILE_TRACER:
            r.error("required field is missing", "typed_config")
            return name, None
        tc = Reader({}, r.sub("typed_config"), r.errors)
    assert kind is not None
    provider = _PROVIDERS[kind][1](tc)
    tc.finish()
    return kind, provider


def parse_tracing(r: Reader) -> Tracing:
    """The HCM ``tracing`` mapping -> ``Tracing``; every bad field is reported on ``r`` with its path.

    Calls ``r.finish()`` itself; wiring it through ``Reader.object`` is fine too (nothing is reported twice).
    """
    from microenvoy.config.loader import not_supported

    d = Tracing()
    random_sampling = _percent(r, "random_sampling")
    client_sampling = _percent(r, "client_sampling")
    overall_sampling = _percent(r, "overall_sampling")
    max_path = r.integer("max_path_tag_length", d.max_path_tag_length, min=1, max=2**32 - 1)
    provider: TracingProvider | None = None
    provider_name = ""
    p = r.mapping("provider")
    if p is not None:
        provider_name, provider = _parse_provider(p)
        p.finish()
    if r.raw.get("verbose") is True:
        r.ignore("verbose")
        r.error("not supported yet", "verbose")
    else:
        r.boolean("verbose")
    if r.raw.get("spawn_upstream_span") not in (None, False, {"value": False}):
        r.ignore("spawn_upstream_span")
        r.error("not supported yet (one span per hop)", "spawn_upstream_span")
    else:
        r.ignore("spawn_upstream_span")
    not_supported(r, "custom_tags", "operation_name", "request_headers_for_tags")
    r.finish()
    r.ignore(*r.raw)  # reported once: a caller's own finish() (``Reader.object``) adds nothing
    return Tracing(
        random_sampling=random_sampling,
        client_sampling=client_sampling,
        overall_sampling=overall_sampling,
        max_path_tag_length=max_path,
        provider=provider,
        provider_name=provider_name,
    )
