"""The configuration model: frozen dataclasses with Envoy v3 field names (a documented subset).

Durations are float seconds, sizes are ints in bytes unless the field name says otherwise (``_kb``). Every
field is documented for users in ``docs/configuration.md``. Instances are built only by
``microenvoy.config.loader`` (which validates them); code treats them as immutable snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # feature configs live in their own modules (which import this one)
    from microenvoy.config.health_check import HealthCheck
    from microenvoy.config.lb import HashPolicy, LbConfig
    from microenvoy.config.outlier import OutlierDetection
    from microenvoy.config.tracing import Tracing

__all__ = [
    "AccessLog",
    "Admin",
    "AdvertiseHttp3",
    "Bootstrap",
    "Cluster",
    "CommonTlsContext",
    "DataSource",
    "DirectResponse",
    "DownstreamTlsContext",
    "Endpoint",
    "FilterChain",
    "HeaderMatcher",
    "HeaderValueOption",
    "Http2Options",
    "HttpConnectionManager",
    "HttpFilterConfig",
    "Listener",
    "NetworkFilterConfig",
    "Node",
    "QuicOptions",
    "RetryBudget",
    "RetryPolicy",
    "Route",
    "RouteAction",
    "RouteConfiguration",
    "RouteMatch",
    "SocketAddress",
    "StaticResources",
    "StringMatcher",
    "Thresholds",
    "TlsCertificate",
    "UpstreamTlsContext",
    "VirtualHost",
    "WeightedCluster",
]


# --------------------------------------------------------------------------------------- common
@dataclass(frozen=True, slots=True)
class SocketAddress:
    address: str
    port_value: int
    protocol: str = "TCP"
    """``TCP`` or ``UDP``."""


@dataclass(frozen=True, slots=True)
class DataSource:
    """Envoy's DataSource: exactly one of ``filename`` / ``inline_string`` / ``inline_bytes``."""

    filename: str | None = None
    inline: bytes | None = None
    """``inline_string`` encoded UTF-8, or ``inline_bytes`` base64-decoded."""

    def read(self) -> bytes:
        if self.inline is not None:
            return self.inline
        assert self.filename is not None
        with open(self.filename, "rb") as f:
            return f.read()


@dataclass(frozen=True, slots=True)
class TlsCertificate:
    certificate_chain: DataSource
    private_key: DataSource
    """Never logged; redacted in ``/config_dump``."""


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """Envoy's StringMatcher: one of exact / prefix / suffix / contains / safe_regex."""

    kind: str
    """``exact``, ``prefix``, ``suffix``, ``contains`` or ``safe_regex``."""
    value: str
    ignore_case: bool = False


@dataclass(frozen=True, slots=True)
class CommonTlsContext:
    tls_certificates: tuple[TlsCertificate, ...] = ()
    alpn_protocols: tuple[str, ...] = ()
    trusted_ca: DataSource | None = None
    """``validation_context.trusted_ca``: peers must present a certificate chaining to it."""
    match_subject_alt_names: tuple[StringMatcher, ...] = ()
    """``validation_context.match_typed_subject_alt_names[].matcher`` (or the legacy untyped list)."""
    tls_minimum_protocol_version: str = "TLSv1_2"
    tls_maximum_protocol_version: str = "TLSv1_3"


@dataclass(frozen=True, slots=True)
class DownstreamTlsContext:
    common_tls_context: CommonTlsContext
    require_client_certificate: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamTlsContext:
    common_tls_context: CommonTlsContext
    sni: str = ""


# --------------------------------------------------------------------------------------- routes
@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    name: str
    """Lower-cased at load."""
    string_match: StringMatcher | None = None
    """``exact_match``/``prefix_match``/``suffix_match``/``safe_regex_match`` map here too."""
    present_match: bool | None = None
    invert_match: bool = False


@dataclass(frozen=True, slots=True)
class RouteMatch:
    prefix: str | None = None
    path: str | None = None
    safe_regex: str | None = None
    """``safe_regex.regex``; matched against the whole path without the query string."""
    case_sensitive: bool = True
    headers: tuple[HeaderMatcher, ...] = ()
    grpc: bool = False
    """``grpc: {}``: only requests with a gRPC content-type."""


@dataclass(frozen=True, slots=True)
class HeaderValueOption:
    key: str
    value: str
    append_action: str = "APPEND_IF_EXISTS_OR_ADD"
    """``APPEND_IF_EXISTS_OR_ADD``, ``ADD_IF_ABSENT``, ``OVERWRITE_IF_EXISTS_OR_ADD``,
    ``OVERWRITE_IF_EXISTS`` (legacy ``append: false`` = overwrite)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retry_on: tuple[str, ...] = ()
    """Comma list in YAML: ``5xx``, ``gateway-error``, ``reset``, ``connect-failure``,
    ``refused-stream``, ``retriable-status-codes``, and gRPC ``cancelled``, ``deadline-exceeded``,
    ``resource-exhausted``, ``unavailable``, ``internal``."""
    num_retries: int = 1
    per_try_timeout: float | None = None
    base_interval: float = 0.025
    """``retry_back_off.base_interval``."""
    max_interval: float | None = None
    """``retry_back_off.max_interval`` (default 10x base)."""
    retriable_status_codes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    name: str
    weight: int


@dataclass(frozen=True, slots=True)
class RouteAction:
    cluster: str | None = None
    weighted_clusters: tuple[WeightedCluster, ...] = ()
    prefix_rewrite: str | None = None
    host_rewrite_literal: str | None = None
    timeout: float = 15.0
    """Whole-exchange upstream timeout; 0 disables. Envoy's default 15 s."""
    idle_timeout: float | None = None
    retry_policy: RetryPolicy | None = None
    max_request_bytes: int | None = None
    """microenvoy extension: request bodies larger than this get 413."""
    max_grpc_timeout: float | None = None
    """Honour ``grpc-timeout`` up to this (0 = unbounded); None ignores the header (Envoy)."""
    hash_policy: tuple[HashPolicy, ...] = ()
    """What RING_HASH / MAGLEV clusters hash on (header, source IP, query parameter)."""


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Route:
    match: RouteMatch
    route: RouteAction | None = None
    direct_response: DirectResponse | None = None
    name: str = ""
    request_headers_to_add: tuple[HeaderValueOption, ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()
    response_headers_to_add: tuple[HeaderValueOption, ...] = ()
    response_headers_to_remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    request_headers_to_add: tuple[HeaderValueOption, ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()
    response_headers_to_add: tuple[HeaderValueOption, ...] = ()
    response_headers_to_remove: tuple[str, ...] = ()
    retry_policy: RetryPolicy | None = None


@dataclass(frozen=True, slots=True)
class RouteConfiguration:
    name: str = ""
    virtual_hosts: tuple[VirtualHost, ...] = ()
    request_headers_to_add: tuple[HeaderValueOption, ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()
    response_headers_to_add: tuple[HeaderValueOption, ...] = ()
    response_headers_to_remove: tuple[str, ...] = ()


# ------------------------------------------------------------------------------ HTTP front (HCM)
@dataclass(frozen=True, slots=True)
class HttpFilterConfig:
    name: str
    """The canonical extension name (resolved from ``@type`` when given)."""
    config: Any
    """The extension's own frozen config (from its ``parse_config``)."""
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class AccessLog:
    """``access_log[]``: file or stdout sink (``envoy.access_loggers.file`` / ``.stdout``)."""

    name: str
    path: str | None = None
    """None for stdout."""
    json_format: tuple[tuple[str, Any], ...] = ()
    """``log_format.json_format`` (key -> Envoy command string); empty = the default text format."""
    text_format: str | None = None


@dataclass(frozen=True, slots=True)
class Http2Options:
    max_concurrent_streams: int = 100
    initial_stream_window_size: int = 65535
    initial_connection_window_size: int = 1048576


@dataclass(frozen=True, slots=True)
class HttpConnectionManager:
    stat_prefix: str
    route_config: RouteConfiguration
    codec_type: str = "AUTO"
    """``AUTO``, ``HTTP1``, ``HTTP2``, ``HTTP3``."""
    http_filters: tuple[HttpFilterConfig, ...] = ()
    generate_request_id: bool = True
    access_log: tuple[AccessLog, ...] = ()
    stream_idle_timeout: float = 300.0
    request_timeout: float = 0.0
    idle_timeout: float = 3600.0
    """``common_http_protocol_options.idle_timeout``: a connection with no streams closes after it."""
    max_headers_count: int = 100
    """``common_http_protocol_options.max_headers_count``."""
    max_request_headers_kb: int = 60
    http2_protocol_options: Http2Options = field(default_factory=Http2Options)
    server_name: str = "microenvoy"
    use_remote_address: bool = True
    max_request_bytes: int | None = None
    """Default body limit for routes that set none (microenvoy extension)."""
    tracing: Tracing | None = None
    """W3C trace context handling and span export; None still rewrites ``traceparent`` per hop."""


@dataclass(frozen=True, slots=True)
class NetworkFilterConfig:
    name: str
    config: Any
    """For ``envoy.filters.network.http_connection_manager``: an ``HttpConnectionManager``."""


@dataclass(frozen=True, slots=True)
class FilterChain:
    filters: tuple[NetworkFilterConfig, ...]
    transport_socket: DownstreamTlsContext | None = None
    name: str = ""
    server_names: tuple[str, ...] = ()
    """``filter_chain_match.server_names`` (SNI); empty matches any."""


# ------------------------------------------------------------------------------------ listeners
@dataclass(frozen=True, slots=True)
class QuicOptions:
    """``udp_listener_config.quic_options`` plus microenvoy's QUIC extensions."""

    max_concurrent_streams: int = 100
    """``quic_protocol_options.max_concurrent_streams``."""
    initial_stream_window_size: int = 65536
    initial_connection_window_size: int = 1048576
    idle_timeout: float = 300.0
    retry: bool = False
    """Send a Retry (address validation) before every handshake."""
    retry_token_key_file: str | None = None
    """File with the Retry token key; created (mode 0600) if missing, so tokens survive restarts."""
    session_ticket_store_size: int = 4096
    """Resumption tickets kept (LRU); 0 disables resumption."""
    session_ticket_lifetime: float = 86400.0
    early_data: bool = True
    """Accept 0-RTT; only idempotent requests are served from it (others get 425 Too Early)."""


@dataclass(frozen=True, slots=True)
class AdvertiseHttp3:
    """microenvoy listener option: add ``alt-svc: h3=":PORT"; ma=MAX_AGE`` to responses."""

    listener: str
    """Name of the UDP (QUIC) listener whose bound port is advertised."""
    max_age: int = 86400


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    address: SocketAddress
    filter_chains: tuple[FilterChain, ...]
    quic_options: QuicOptions | None = None
    """Set (possibly to defaults) when ``udp_listener_config.quic_options`` is present: HTTP/3."""
    per_connection_buffer_limit_bytes: int = 1048576
    max_connections: int | None = None
    """microenvoy extension: accepted connections beyond this are closed at once (counted)."""
    advertise_http3: AdvertiseHttp3 | None = None
    drain_timeout: float = 5.0


# ------------------------------------------------------------------------------------- clusters
@dataclass(frozen=True, slots=True)
class Endpoint:
    address: SocketAddress
    load_balancing_weight: int = 1
    hostname: str = ""


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """``circuit_breakers.thresholds[].retry_budget``: retries allowed as a share of active requests."""

    budget_percent: float = 20.0
    """Percent of active plus pending requests that may be retries at once."""
    min_retry_concurrency: int = 3
    """Retries always allowed at once, whatever the budget says."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """``circuit_breakers.thresholds[]`` for one routing priority (Envoy's defaults)."""

    priority: str = "DEFAULT"
    """``DEFAULT`` or ``HIGH`` (routes are always DEFAULT priority: HIGH thresholds are kept, unused)."""
    max_connections: int = 1024
    """Connections to all hosts of the cluster; beyond it requests wait (``upstream_cx_overflow``)."""
    max_pending_requests: int = 1024
    """Requests waiting for a connection; beyond it -> 503 UO (``upstream_rq_pending_overflow``)."""
    max_requests: int = 1024
    """Requests in flight to the cluster (waiting ones included); beyond it -> 503 UO."""
    max_retries: int = 3
    """Retries in flight at once (``upstream_rq_retry_overflow``); replaced by ``retry_budget`` when set."""
    retry_budget: RetryBudget | None = None
    track_remaining: bool = False
    """Export ``circuit_breakers.<priority>.remaining_*`` gauges."""


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    type: str = "STATIC"
    """``STATIC`` or ``STRICT_DNS``."""
    connect_timeout: float = 5.0
    lb_policy: str = "ROUND_ROBIN"
    """``ROUND_ROBIN``, ``LEAST_REQUEST``, ``RANDOM``."""
    endpoints: tuple[Endpoint, ...] = ()
    """Flattened ``load_assignment.endpoints[].lb_endpoints[]``."""
    upstream_protocol: str = "HTTP1"
    """``HTTP1`` or ``HTTP2`` from ``typed_extension_protocol_options`` (HttpProtocolOptions
    ``explicit_http_config``) or the legacy ``http2_protocol_options``."""
    http2_protocol_options: Http2Options = field(default_factory=Http2Options)
    transport_socket: UpstreamTlsContext | None = None
    dns_refresh_rate: float = 5.0
    dns_lookup_family: str = "AUTO"
    per_connection_buffer_limit_bytes: int = 1048576
    max_requests_per_connection: int = 0
    idle_timeout: float = 3600.0
    """``common_http_protocol_options.idle_timeout`` of the upstream protocol options."""
    circuit_breakers: tuple[Thresholds, ...] = ()
    """At most one entry per priority; a missing DEFAULT entry means Envoy's default thresholds."""
    lb_config: LbConfig | None = None
    """Panic threshold and policy-specific balancer settings; None = Envoy's defaults."""
    health_checks: tuple[HealthCheck, ...] = ()
    outlier_detection: OutlierDetection | None = None
    mqtt_broker: Any = None
    """``microenvoy.config.mqtt_cluster.MqttBroker`` when ``cluster_type`` is
    ``microenvoy.clusters.mqtt_broker`` (an upstream MQTT broker session instead of HTTP pools); else None."""


# -------------------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True, slots=True)
class Node:
    id: str = ""
    cluster: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Admin:
    address: SocketAddress = field(default_factory=lambda: SocketAddress("127.0.0.1", 9901))
    access_log_path: str | None = None


@dataclass(frozen=True, slots=True)
class StaticResources:
    listeners: tuple[Listener, ...] = ()
    clusters: tuple[Cluster, ...] = ()


@dataclass(frozen=True, slots=True)
class Bootstrap:
    node: Node = field(default_factory=Node)
    admin: Admin = field(default_factory=Admin)
    static_resources: StaticResources = field(default_factory=StaticResources)
    dynamic_resources: Any = None
    """``microenvoy.config.xds.DynamicResources`` (delta xDS from a control plane), or None."""
    raw: dict[str, Any] = field(default_factory=dict, compare=False)
    """The document as loaded (for ``/config_dump``, redacted there)."""
