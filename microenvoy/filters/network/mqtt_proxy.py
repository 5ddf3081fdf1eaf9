"""The MQTT proxy network filter's configuration (``microenvoy.filters.network.mqtt_proxy``).

A TCP (or TLS) listener whose filter chain holds this filter speaks MQTT 3.1.1 and 5.0: it is a small broker
for its own clients and bridges PUBLISHes that match a bridge route into the same HTTP filters, routes and
clusters as HTTP traffic (``docs/mqtt.md``)::

    - name: microenvoy.filters.network.mqtt_proxy
      typed_config:
        "@type": type.googleapis.com/microenvoy.extensions.filters.network.mqtt_proxy.v1.MqttProxy
        stat_prefix: devices
        routes:
        - name: telemetry
          match: {topic_filter: "devices/{device}/telemetry"}
          route:
            cluster: ingest
            path: /v1/devices/{device}/telemetry
            timeout: 5s
        http_filters: [...]          # optional, as in the HTTP connection manager (rbac, local_ratelimit ...)

Each bridge route's ``route`` block takes the HTTP route action's fields (``cluster`` or
``weighted_clusters``, ``timeout``, ``retry_policy``, ``hash_policy`` ...) plus the MQTT ones below.
Internally the routes become an HTTP route table (one route per bridge route, selected by a metadata header),
so the HTTP engine forwards bridged messages exactly like HTTP requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from microenvoy.config.loader import TYPE_PREFIX, not_supported
from microenvoy.config.model import (
    AccessLog,
    HeaderMatcher,
    HeaderValueOption,
    HttpConnectionManager,
    HttpFilterConfig,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    StringMatcher,
    VirtualHost,
)
from microenvoy.config.reader import Reader
from microenvoy.filters.network import http_connection_manager as hcm
from microenvoy.router.topic_routes import compile_path_template, compile_topic_filter

__all__ = [
    "NAME",
    "ROUTE_HEADER",
    "TYPE_URLS",
    "Batching",
    "GrpcBridge",
    "MqttProxy",
    "MqttRoute",
    "http_connection_manager",
    "parse_config",
]

NAME = "microenvoy.filters.network.mqtt_proxy"
TYPE_URLS = (TYPE_PREFIX + "microenvoy.extensions.filters.network.mqtt_proxy.v1.MqttProxy",)
ROUTE_HEADER = "x-microenvoy-mqtt-route"
"""Metadata header carrying the index of the bridge route a message matched (selects the HTTP route)."""
_MAX_PACKET = 268435455
"""The protocol's limit on a packet's size (remaining length 0xFFFFFF7F + 5 header bytes, rounded)."""
_ENCODINGS = ("raw", "envelope")
_ACKS = ("upstream",)


@dataclass(frozen=True, slots=True)
class GrpcBridge:
    """Send bridged messages as unary gRPC calls."""

    method: str
    """``/package.Service/Method``: the request's ``:path``."""
    encoding: str = "raw"
    """``raw``: the payload is the protobuf request; ``envelope``: a ``microenvoy.bridge.v1.Message``."""


@dataclass(frozen=True, slots=True)
class Batching:
    """Several messages of a route in one upstream request (``docs/mqtt.md`` has the body format)."""

    max_messages: int
    max_delay: float
    """Seconds the first message of a batch waits for more."""


@dataclass(frozen=True, slots=True)
class MqttRoute:
    """One bridge route: a topic filter (with ``{name}`` captures) and where matching messages go."""

    name: str
    topic_filter: str
    action: RouteAction
    """Cluster, timeout, retry policy ... exactly as an HTTP route's ``route`` block."""
    path: str = "/{topic}"
    """``:path`` template; ``{capture}``, ``{#}`` and ``{topic}`` are filled in (percent-encoded)."""
    content_type: str = "application/octet-stream"
    """``content-type`` when the message has no MQTT 5 Content Type."""
    grpc: GrpcBridge | None = None
    batch: Batching | None = None
    ack: str = "upstream"
    """When QoS 1/2 messages are acknowledged: ``upstream`` (after a 2xx answer)."""
    request_headers_to_add: tuple[HeaderValueOption, ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MqttProxy:
    """The filter's whole configuration (bounds default to values that fit a 512 MB device)."""

    stat_prefix: str
    """Stats appear as ``mqtt.<stat_prefix>.*`` (and the bridge's HTTP stats as ``http.<stat_prefix>.*``)."""
    authority: str = ""
    """``:authority`` of bridged exchanges; empty = the listener's name."""
    routes: tuple[MqttRoute, ...] = ()
    http_filters: tuple[HttpFilterConfig, ...] = ()
    """HTTP filters bridged messages pass through (the router is implicit, as in the HCM)."""
    access_log: tuple[AccessLog, ...] = ()
    auth: Any = None
    """``microenvoy.config.mqtt_auth`` settings (password file, ACLs); None = anonymous, no ACLs."""
    max_packet_size: int = 1048576
    """Largest packet accepted from a client (bigger: DISCONNECT 0x95 / close), announced in CONNACK."""
    receive_maximum: int = 64
    """QoS 1/2 messages a client may have unacknowledged towards the agent (announced in CONNACK)."""
    max_inflight_messages: int = 32
    """QoS 1/2 messages sent to a client and not yet acknowledged (v5: also capped by its Receive Maximum)."""
    max_queued_messages: int = 1000
    """Messages kept for an offline persistent session or a full inflight window (beyond: dropped)."""
    max_session_expiry_interval: int = 86400
    """Cap on a client's Session Expiry Interval (seconds)."""
    max_keepalive: int = 0
    """If > 0, clients asking for a longer (or no) keepalive get this as Server Keep Alive (v5)."""
    topic_alias_maximum: int = 16
    """Topic aliases a v5 client may use towards the agent (0 disables)."""
    max_retained_messages: int = 10000
    max_retained_bytes: int = 16777216
    max_subscriptions_per_client: int = 100
    connect_timeout: float = 10.0
    """Time a new connection has to send CONNECT."""
    retain_available: bool = True
    maximum_qos: int = 2
    idle_timeout: float = 0.0
    """Reserved (keepalive governs idleness); 0."""


# ============================================================================================ parsing
def parse_config(r: Reader) -> MqttProxy:
    """The filter's ``typed_config`` (without ``@type``) -> ``MqttProxy``; every error goes to ``r``."""
    stat_prefix: str = r.string("stat_prefix", required=True)
    if r.raw.get("stat_prefix") == "":
        r.error("must not be empty", "stat_prefix")
    d = MqttProxy(stat_prefix="")
    routes: tuple[MqttRoute, ...] = r.objects("routes", _parse_route)
    http_filters: tuple[HttpFilterConfig, ...] = ()
    if r.has("http_filters"):
        http_filters = hcm.parse_http_filters(r)
    access_log: tuple[AccessLog, ...] = r.objects("access_log", hcm.parse_access_log)
    auth = None
    if r.has("auth"):
        from microenvoy.config.mqtt_auth import parse_mqtt_auth

        auth = r.object("auth", parse_mqtt_auth)
    cfg = MqttProxy(
        stat_prefix=stat_prefix,
        authority=r.string("authority", ""),
        routes=routes,
        http_filters=http_filters,
        access_log=access_log,
        auth=auth,
        max_packet_size=r.integer("max_packet_size", d.max_packet_size, min=64, max=_MAX_PACKET),
        receive_maximum=r.integer("receive_maximum", d.receive_maximum, min=1, max=65535),
        max_inflight_messages=r.integer("max_inflight_messages", d.max_inflight_messages, min=1, max=65535),
        max_queued_messages=r.integer("max_queued_messages", d.max_queued_messages, min=0, max=10_000_000),
        max_session_expiry_interval=r.integer(
            "max_session_expiry_interval", d.max_session_expiry_interval, min=0, max=0xFFFFFFFF
        ),
        max_keepalive=r.integer("max_keepalive", d.max_keepalive, min=0, max=65535),
        topic_alias_maximum=r.integer("topic_alias_maximum", d.topic_alias_maximum, min=0, max=65535),
        max_retained_messages=r.integer("max_retained_messages", d.max_retained_messages, min=0),
        max_retained_bytes=r.integer("max_retained_bytes", d.max_retained_bytes, min=0),
        max_subscriptions_per_client=r.integer(
            "max_subscriptions_per_client", d.max_subscriptions_per_client, min=1, max=65535
        ),
        connect_timeout=r.positive_duration("connect_timeout", d.connect_timeout),
        retain_available=r.boolean("retain_available", d.retain_available),
        maximum_qos=r.integer("maximum_qos", d.maximum_qos, min=0, max=2),
    )
    return cfg


def _parse_route(r: Reader) -> MqttRoute:
    name: str = r.string("name")
    topic_filter = ""
    names: tuple[str, ...] = ()
    m = r.mapping("match", required=True)
    if m is not None:
        topic_filter = m.string("topic_filter", required=True)
        if isinstance(m.raw.get("topic_filter"), str):
            try:
                names = compile_topic_filter(topic_filter).names
            except ValueError as exc:
                m.error(str(exc), "topic_filter")
        m.finish()
    action = RouteAction()
    path, content_type = "/{topic}", "application/octet-stream"
    grpc: GrpcBridge | None = None
    batch: Batching | None = None
    ack = "upstream"
    a = r.mapping("route", required=True)
    if a is not None:
        path = a.string("path", "/{topic}")
        content_type = a.string("content_type", content_type)
        grpc = a.object("grpc", _parse_grpc)
        batch = a.object("batch", _parse_batch)
        ack = a.enum("ack", _ACKS, "upstream")
        if grpc is not None and a.has("path"):
            a.error("set path or grpc.method, not both", "path")
        elif isinstance(a.raw.get("path"), str):
            try:
                compile_path_template(path, names)
            except ValueError as exc:
                a.error(str(exc), "path")
        if grpc is not None and batch is not None and grpc.encoding != "envelope":
            a.error(
                "batching a gRPC route needs grpc.encoding: envelope (one Batch message per call)", "batch"
            )
        if grpc is not None:
            path = grpc.method
        action = hcm.parse_route_action(a)
        a.finish()
    add: tuple[HeaderValueOption, ...] = ()
    remove: tuple[str, ...] = ()
    if r.has("request_headers_to_add") or r.has("request_headers_to_remove"):
        add, remove, *_ = hcm.header_lists(r)
    not_supported(r, "direct_response", "redirect")
    return MqttRoute(
        name=name,
        topic_filter=topic_filter,
        action=action,
        path=path,
        content_type=content_type,
        grpc=grpc,
        batch=batch,
        ack=ack,
        request_headers_to_add=add,
        request_headers_to_remove=remove,
    )


def _parse_grpc(r: Reader) -> GrpcBridge:
    method: str = r.string("method", required=True)
    if isinstance(r.raw.get("method"), str) and (method.count("/") != 2 or not method.startswith("/")):
        r.error("expected /package.Service/Method", "method")
    g = GrpcBridge(method=method, encoding=r.enum("encoding", _ENCODINGS, "raw"))
    r.finish()
    return g


def _parse_batch(r: Reader) -> Batching:
    b = Batching(
        max_messages=r.integer("max_messages", required=True, min=1, max=10000),
        max_delay=r.positive_duration("max_delay", 0.01),
    )
    r.finish()
    return b


# ============================================================================ the bridge as HTTP routes
def http_connection_manager(cfg: MqttProxy) -> HttpConnectionManager:
    """The HTTP connection manager the bridge runs on: one route per bridge route, selected by the
    ``x-microenvoy-mqtt-route`` metadata header the MQTT front sets, so the HTTP engine does the rest
    (filters, retries, timeouts, clusters, stats under ``http.<stat_prefix>.``, access logs)."""
    routes = []
    for i, route in enumerate(cfg.routes):
        header = HeaderMatcher(ROUTE_HEADER, StringMatcher("exact", str(i)))
        routes.append(
            Route(
                match=RouteMatch(prefix="/", headers=(header,)),
                route=route.action,
                name=route.name or f"mqtt_route_{i}",
                request_headers_to_add=route.request_headers_to_add,
                request_headers_to_remove=route.request_headers_to_remove,
            )
        )
    vhost = VirtualHost(name="mqtt", domains=("*",), routes=tuple(routes))
    filters = cfg.http_filters or hcm.implicit_router()
    return HttpConnectionManager(
        stat_prefix=cfg.stat_prefix,
        route_config=RouteConfiguration(name=f"{cfg.stat_prefix}_mqtt_routes", virtual_hosts=(vhost,)),
        http_filters=filters,
        access_log=cfg.access_log,
        generate_request_id=True,
        use_remote_address=False,
    )
