"""The CoAP proxy network filter's configuration (``microenvoy.filters.network.coap_proxy``).

A UDP listener whose filter chain holds this filter speaks CoAP (RFC 7252, with blockwise transfers, Observe
and OSCORE). Every request is mapped to an HTTP exchange (RFC 8075) and goes through the same HTTP filters,
routes and clusters as HTTP traffic (``docs/coap.md``)::

    - name: microenvoy.filters.network.coap_proxy
      typed_config:
        "@type": type.googleapis.com/microenvoy.extensions.filters.network.coap_proxy.v1.CoapProxy
        stat_prefix: devices
        routes:
        - name: sensors
          match: {prefix: /sensors/}
          route: {cluster: backend, timeout: 5s}
          observe: {mode: poll, interval: 5s}
          link: {rt: temperature, ct: "50"}
        http_filters: [...]          # optional, as in the HTTP connection manager (rbac, local_ratelimit ...)

A route's ``match`` and ``route`` take the HTTP route's fields (prefix/path/safe_regex/headers; cluster,
weighted_clusters, timeout, retry_policy, prefix_rewrite ...). Internally the routes become an HTTP route
table, so the HTTP engine forwards CoAP requests exactly like HTTP requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from microenvoy.config.loader import TYPE_PREFIX, not_supported
from microenvoy.config.model import (
    AccessLog,
    HeaderValueOption,
    HttpConnectionManager,
    HttpFilterConfig,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from microenvoy.config.reader import Reader
from microenvoy.filters.network import http_connection_manager as hcm

__all__ = [
    "NAME",
    "TYPE_URLS",
    "CoapProxy",
    "CoapRoute",
    "Observe",
    "http_connection_manager",
    "parse_config",
]

NAME = "microenvoy.filters.network.coap_proxy"
TYPE_URLS = (TYPE_PREFIX + "microenvoy.extensions.filters.network.coap_proxy.v1.CoapProxy",)
_BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024)
_LINK_ATTRS = ("rt", "if", "ct", "title", "sz", "obs")


@dataclass(frozen=True, slots=True)
class Observe:
    """How the agent refreshes an observed resource from upstream (one refresh per resource)."""

    mode: str = "poll"
    """``poll``: GET every ``interval`` with If-None-Match; ``stream``: one long upstream response whose
    chunks (HTTP) or messages (server-streaming gRPC) are the notifications."""
    interval: float = 5.0
    """Seconds between polls (``poll``), or before re-opening an ended stream (``stream``)."""
    max_observers: int = 256
    """Observers of one resource (beyond: the request is answered without Observe, RFC 7641 §4.1)."""
    confirmable_every: int = 0
    """Send every Nth notification confirmable even to a non-confirmable observer (0: follow the request's
    type). Confirmable notifications find observers that are gone."""


@dataclass(frozen=True, slots=True)
class CoapRoute:
    """One route: an HTTP route match (on the mapped ``:path``) and action, plus CoAP-specific settings."""

    name: str
    match: RouteMatch
    action: RouteAction
    observe: Observe | None = None
    """Observe (RFC 7641) on this route's resources; None: Observe is ignored (a plain response)."""
    grpc_method: str | None = None
    """``route.grpc.method``: requests become unary (or, observed in ``stream`` mode, server-streaming)
    gRPC calls of this ``/package.Service/Method``; the payload is the serialized request message."""
    max_body_bytes: int = 65536
    """Largest request body reassembled from Block1 and response body returned (4.13 / 5.02 beyond)."""
    link: tuple[tuple[str, str], ...] = ()
    """Attributes listed for this route in ``/.well-known/core`` (``rt``, ``if``, ``ct``, ``title`` ...)."""
    request_headers_to_add: tuple[HeaderValueOption, ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CoapProxy:
    """The filter's whole configuration (bounds default to values that fit a 512 MB device)."""

    stat_prefix: str
    """Stats appear as ``coap.<stat_prefix>.*`` (the exchanges' HTTP stats as ``http.<stat_prefix>.*``)."""
    authority: str = ""
    """``:authority`` of requests without Uri-Host; empty = the listener's name."""
    routes: tuple[CoapRoute, ...] = ()
    http_filters: tuple[HttpFilterConfig, ...] = ()
    access_log: tuple[AccessLog, ...] = ()
    oscore: Any = None
    """``microenvoy.config.coap_oscore.OscoreConfig``; None = no OSCORE."""
    block_size: int = 1024
    """Largest block the agent sends in Block2 (a client's smaller Block2 SZX wins), 16..1024."""
    max_message_size: int = 1152
    """Largest datagram accepted (RFC 7252 §4.6); bigger requests must use Block1."""
    empty_ack_delay: float = 0.5
    """A confirmable request not answered within this gets an empty ACK and a separate response later."""
    max_dedup_entries: int = 16384
    """Received message ids remembered for deduplication (each at most EXCHANGE_LIFETIME, 247 s)."""
    max_concurrent_requests: int = 1024
    """Requests in flight upstream; beyond, 5.03 Service Unavailable with Max-Age 1."""
    max_block_transfers: int = 256
    """Block1 reassemblies and cached Block2 responses in progress, each (oldest evicted beyond)."""
    max_block_bytes: int = 4194304
    """Bytes held by Block1 reassemblies and cached Block2 responses together."""
    block_lifetime: float = 60.0
    """Seconds an unfinished blockwise transfer is kept."""
    max_observed_resources: int = 256
    """Resources observed at once (each has one upstream refresh)."""


# ============================================================================================ parsing
def parse_config(r: Reader) -> CoapProxy:
    """The filter's ``typed_config`` (without ``@type``) -> ``CoapProxy``; every error goes to ``r``."""
    stat_prefix: str = r.string("stat_prefix", required=True)
    if r.raw.get("stat_prefix") == "":
        r.error("must not be empty", "stat_prefix")
    d = CoapProxy(stat_prefix="")
    routes: tuple[CoapRoute, ...] = r.objects("routes", _parse_route)
    http_filters: tuple[HttpFilterConfig, ...] = ()
    if r.has("http_filters"):
        http_filters = hcm.parse_http_filters(r)
    access_log: tuple[AccessLog, ...] = r.objects("access_log", hcm.parse_access_log)
    oscore = None
    if r.has("oscore"):
        from microenvoy.config.coap_oscore import parse_oscore

        oscore = r.object("oscore", parse_oscore)
    block_size: int = r.integer("block_size", d.block_size, min=16, max=1024)
    if block_size not in _BLOCK_SIZES:
        r.error(f"must be a power of two from 16 to 1024, got {block_size}", "block_size")
        block_size = d.block_size
    empty_ack_delay: float = r.duration("empty_ack_delay", d.empty_ack_delay)
    if not 0 <= empty_ack_delay < 2.0:
        r.error("must be below ACK_TIMEOUT (2s) so the client does not retransmit first", "empty_ack_delay")
    return CoapProxy(
        stat_prefix=stat_prefix,
        authority=r.string("authority", ""),
        routes=routes,
        http_filters=http_filters,
        access_log=access_log,
        oscore=oscore,
        block_size=block_size,
        max_message_size=r.integer("max_message_size", d.max_message_size, min=64, max=65507),
        empty_ack_delay=empty_ack_delay,
        max_dedup_entries=r.integer("max_dedup_entries", d.max_dedup_entries, min=16, max=10_000_000),
        max_concurrent_requests=r.integer("max_concurrent_requests", d.max_concurrent_requests, min=1),
        max_block_transfers=r.integer("max_block_transfers", d.max_block_transfers, min=1),
        max_block_bytes=r.integer("max_block_bytes", d.max_block_bytes, min=1024),
        block_lifetime=r.positive_duration("block_lifetime", d.block_lifetime),
        max_observed_resources=r.integer("max_observed_resources", d.max_observed_resources, min=1),
    )


def _parse_route(r: Reader) -> CoapRoute:
    name: str = r.string("name")
    match = r.object("match", hcm.parse_route_match, required=True) or RouteMatch(prefix="/")
    action = RouteAction()
    grpc_method: str | None = None
    a = r.mapping("route", required=True)
    if a is not None:
        g = a.mapping("grpc")
        if g is not None:
            grpc_method = g.string("method", required=True)
            if isinstance(g.raw.get("method"), str) and (
                grpc_method.count("/") != 2 or not grpc_method.startswith("/")
            ):
                g.error("expected /package.Service/Method", "method")
            g.finish()
        action = hcm.parse_route_action(a)
        a.finish()
    if action.prefix_rewrite is not None and match.safe_regex is not None:
        r.error("cannot be used with a safe_regex match", "route.prefix_rewrite")
    observe = r.object("observe", _parse_observe)
    link: tuple[tuple[str, str], ...] = ()
    lk = r.mapping("link")
    if lk is not None:
        pairs = []
        for key in _LINK_ATTRS:
            if lk.has(key):
                pairs.append((key, str(lk.string(key))))
        lk.finish()
        link = tuple(pairs)
    add: tuple[HeaderValueOption, ...] = ()
    remove: tuple[str, ...] = ()
    if r.has("request_headers_to_add") or r.has("request_headers_to_remove"):
        add, remove, *_ = hcm.header_lists(r)
    not_supported(r, "direct_response", "redirect")
    return CoapRoute(
        name=name,
        match=match,
        action=action,
        observe=observe,
        grpc_method=grpc_method,
        max_body_bytes=r.integer("max_body_bytes", 65536, min=0, max=64 * 1048576),
        link=link,
        request_headers_to_add=add,
        request_headers_to_remove=remove,
    )


def _parse_observe(r: Reader) -> Observe:
    d = Observe()
    o = Observe(
        mode=r.enum("mode", ("poll", "stream"), d.mode),
        interval=r.positive_duration("interval", d.interval),
        max_observers=r.integer("max_observers", d.max_observers, min=1),
        confirmable_every=r.integer("confirmable_every", d.confirmable_every, min=0),
    )
    r.finish()
    return o


# ============================================================================ the routes as HTTP routes
def http_connection_manager(cfg: CoapProxy) -> HttpConnectionManager:
    """The HTTP connection manager CoAP exchanges run through: one HTTP route per CoAP route (same match),
    so the HTTP engine does the rest (filters, retries, timeouts, clusters, stats under
    ``http.<stat_prefix>.``, access logs)."""
    routes = tuple(
        Route(
            match=route.match,
            route=route.action,
            name=route.name or f"coap_route_{i}",
            request_headers_to_add=route.request_headers_to_add,
            request_headers_to_remove=route.request_headers_to_remove,
        )
        for i, route in enumerate(cfg.routes)
    )
    vhost = VirtualHost(name="coap", domains=("*",), routes=routes)
    return HttpConnectionManager(
        stat_prefix=cfg.stat_prefix,
        route_config=RouteConfiguration(name=f"{cfg.stat_prefix}_coap_routes", virtual_hosts=(vhost,)),
        http_filters=cfg.http_filters or hcm.implicit_router(),
        access_log=cfg.access_log,
        generate_request_id=True,
        use_remote_address=False,
    )
