"""Active health checking config: a cluster's ``health_checks`` (Envoy's ``config.core.v3.HealthCheck``).

Field names and defaults are Envoy's. ``timeout``, ``interval``, ``unhealthy_threshold`` and
``healthy_threshold`` are required; the optional intervals default along Envoy's chain (``unhealthy_interval``
-> ``interval``, ``unhealthy_edge_interval`` -> ``unhealthy_interval``, ``healthy_edge_interval`` ->
``interval``, ``no_traffic_healthy_interval`` -> ``no_traffic_interval`` (60 s)); they are kept as ``None``
here and resolved by ``microenvoy.upstream.health.HealthCheckPolicy``. Exactly one checker is set:
``http_health_check``, ``grpc_health_check`` or ``tcp_health_check``. Like Envoy, a cluster takes at most one
health check. Payloads (``tcp_health_check.send`` / ``receive``) are Envoy's ``Payload``: ``{text: <hex>}`` or
``{binary: <base64>}``. User docs: ``docs/health-checking.md``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass

from microenvoy.config.model import HeaderValueOption
from microenvoy.config.reader import Reader

__all__ = [
    "GrpcHealthCheck",
    "HealthCheck",
    "HttpHealthCheck",
    "StatusRange",
    "TcpHealthCheck",
    "parse_health_check",
    "parse_health_checks",
]

_UINT32_MAX = 2**32 - 1
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH")
_CHECKERS = ("http_health_check", "grpc_health_check", "tcp_health_check", "custom_health_check")


@dataclass(frozen=True, slots=True)
class StatusRange:
    """Envoy's ``type.v3.Int64Range`` of HTTP statuses: ``start`` inclusive, ``end`` exclusive."""

    start: int
    """First status in the range (>= 100)."""
    end: int
    """One past the last status (<= 600, > start)."""

    def __contains__(self, status: object) -> bool:
        return isinstance(status, int) and self.start <= status < self.end


@dataclass(frozen=True, slots=True)
class HttpHealthCheck:
    """``http_health_check``: a request to ``path``; the answer's status decides."""

    path: str
    """Request path (required, non-empty)."""
    host: str = ""
    """``:authority``/``Host`` of the check; empty: the cluster's name (Envoy)."""
    method: str = "GET"
    """Request method; ``CONNECT`` is not allowed (Envoy)."""
    request_headers_to_add: tuple[HeaderValueOption, ...] = ()
    """Extra request headers (``append_action`` honoured)."""
    request_headers_to_remove: tuple[str, ...] = ()
    """Header names removed from the check request (lower-case)."""
    expected_statuses: tuple[StatusRange, ...] = (StatusRange(200, 201),)
    """Statuses that pass; Envoy's default is 200 only."""
    retriable_statuses: tuple[StatusRange, ...] = ()
    """Failing statuses that count toward ``unhealthy_threshold`` instead of failing the host at once."""
    codec_client_type: str | None = None
    """``HTTP1`` or ``HTTP2``; None: the cluster's upstream protocol."""


@dataclass(frozen=True, slots=True)
class GrpcHealthCheck:
    """``grpc_health_check``: ``grpc.health.v1.Health/Check``; ``SERVING`` passes."""

    service_name: str = ""
    """``HealthCheckRequest.service``; empty asks about the server as a whole."""
    authority: str = ""
    """``:authority`` of the call; empty: the cluster's name (Envoy)."""
    initial_metadata: tuple[HeaderValueOption, ...] = ()
    """Extra request headers (gRPC initial metadata)."""


@dataclass(frozen=True, slots=True)
class TcpHealthCheck:
    """``tcp_health_check``: connect, optionally send ``send`` and expect every ``receive`` block in order."""

    send: bytes = b""
    """Bytes written after connecting (empty: nothing)."""
    receive: tuple[bytes, ...] = ()
    """Blocks that must all arrive, in this order, not necessarily adjacent; empty: connect-only check."""


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """One active health check of a cluster (Envoy's ``HealthCheck``). Durations are seconds."""

    timeout: float
    """Time a single check may take (connect included) before it fails as a timeout."""
    interval: float
    """Time between checks of a host (from the end of one to the start of the next)."""
    unhealthy_threshold: int
    """Consecutive failures (network errors, timeouts, retriable statuses) that mark a host unhealthy."""
    healthy_threshold: int
    """Consecutive successes that mark an unhealthy host healthy (one suffices for a host's first check)."""
    http_health_check: HttpHealthCheck | None = None
    """HTTP checker (exactly one checker is set)."""
    grpc_health_check: GrpcHealthCheck | None = None
    """gRPC health v1 checker."""
    tcp_health_check: TcpHealthCheck | None = None
    """Plain TCP checker."""
    initial_jitter: float = 0.0
    """The first check of a host waits a random time in ``[0, initial_jitter)``."""
    interval_jitter: float = 0.0
    """A random time in ``[0, interval_jitter)`` is added to every interval."""
    interval_jitter_percent: int = 0
    """A random time in ``[0, interval * percent / 100)`` is added to every interval."""
    no_traffic_interval: float = 60.0
    """Interval used while the cluster has never carried traffic (Envoy's default 60 s)."""
    no_traffic_healthy_interval: float | None = None
    """No-traffic interval for hosts that pass; None: ``no_traffic_interval``."""
    unhealthy_interval: float | None = None
    """Interval for unhealthy hosts; None: ``interval``."""
    unhealthy_edge_interval: float | None = None
    """Interval after a failure that did not (yet) flip the host; None: ``unhealthy_interval``."""
    healthy_edge_interval: float | None = None
    """Interval after a success that did not (yet) flip the host; None: ``interval``."""
    reuse_connection: bool = True
    """Keep the check connection open between checks (HTTP and gRPC; TCP checks with ``receive``)."""
    always_log_health_check_failures: bool = False
    """Log every failed check at INFO (default: DEBUG)."""
    always_log_health_check_success: bool = False
    """Log every passed check at INFO (default: DEBUG)."""

    @property
    def kind(self) -> str:
        """``http``, ``grpc`` or ``tcp``."""
        if self.grpc_health_check is not None:
            return "grpc"
        if self.tcp_health_check is not None:
            return "tcp"
        return "http"


# ============================================================================================ parsers
def parse_health_checks(r: Reader) -> tuple[HealthCheck, ...]:
    """The cluster's ``health_checks`` list (``r`` reads the cluster); at most one entry, as in Envoy."""
    checks = r.objects("health_checks", parse_health_check)
    if len(checks) > 1:
        r.error("only one health check per cluster is supported (as in Envoy)", "health_checks")
    return checks


def parse_health_check(r: Reader) -> HealthCheck:
    """One ``HealthCheck`` mapping (``finish()`` is the caller's, as with ``Reader.objects``)."""
    timeout = _positive(r, "timeout", required=True, default=1.0)
    interval = _positive(r, "interval", required=True, default=1.0)
    unhealthy = _threshold(r, "unhealthy_threshold")
    healthy = _threshold(r, "healthy_threshold")
    initial_jitter = r.duration("initial_jitter", 0.0)
    interval_jitter = r.duration("interval_jitter", 0.0)
    jitter_percent: int = r.integer("interval_jitter_percent", 0, min=0, max=_UINT32_MAX)
    no_traffic = _positive(r, "no_traffic_interval", default=60.0)
    no_traffic_healthy = _optional_positive(r, "no_traffic_healthy_interval")
    unhealthy_interval = _optional_positive(r, "unhealthy_interval")
    unhealthy_edge = _optional_positive(r, "unhealthy_edge_interval")
    healthy_edge = _optional_positive(r, "healthy_edge_interval")
    if isinstance(r.raw.get("reuse_connection"), Mapping):  # the BoolValue wrapper form {value: ...}
        wrapped = r.object("reuse_connection", lambda x: x.boolean("value", True))
        reuse = True if wrapped is None else wrapped
    else:
        reuse = r.boolean("reuse_connection", True)
    log_failures = r.boolean("always_log_health_check_failures")
    log_success = r.boolean("always_log_health_check_success")
    for key in (
        "alt_port",
        "event_log_path",
        "event_logger",
        "event_service",
        "tls_options",
        "transport_socket_match_criteria",
        "healthy_edge_interval_jitter",
        "no_traffic_interval_jitter",
    ):
        if r.has(key):
            r.ignore(key)
            r.error("not supported yet", key)
    kind = r.one_of(*_CHECKERS)
    r.ignore(*_CHECKERS)
    http = grpc = tcp = None
    if kind == "custom_health_check":
        r.error("not supported yet", "custom_health_check")
    elif kind == "http_health_check":
        http = r.object("http_health_check", _parse_http)
    elif kind == "grpc_health_check":
        grpc = r.object("grpc_health_check", _parse_grpc)
    elif kind == "tcp_health_check":
        tcp = r.object("tcp_health_check", _parse_tcp)
    if kind is None or kind == "custom_health_check":
        http = HttpHealthCheck(path="/")  # placeholder so the value stays well-formed; errors were recorded
    return HealthCheck(
        timeout=timeout,
        interval=interval,
        unhealthy_threshold=unhealthy,
        healthy_threshold=healthy,
        http_health_check=http,
        grpc_health_check=grpc,
        tcp_health_check=tcp,
        initial_jitter=initial_jitter,
        interval_jitter=interval_jitter,
        interval_jitter_percent=jitter_percent,
        no_traffic_interval=no_traffic,
        no_traffic_healthy_interval=no_traffic_healthy,
        unhealthy_interval=unhealthy_interval,
        unhealthy_edge_interval=unhealthy_edge,
        healthy_edge_interval=healthy_edge,
        reuse_connection=reuse,
        always_log_health_check_failures=log_failures,
        always_log_health_check_success=log_success,
    )


def _positive(r: Reader, key: str, *, default: float, required: bool = False) -> float:
    value: float | None = r.duration(key, None, required=required)
    if value is None:
        return default
    if value <= 0:
        r.error("must be greater than 0", key)
        return default
    return value


def _optional_positive(r: Reader, key: str) -> float | None:
    value: float | None = r.duration(key, None)
    if value is not None and value <= 0:
        r.error("must be greater than 0", key)
        return None
    return value


def _threshold(r: Reader, key: str) -> int:
    value: int = r.integer(key, 1, required=True, min=1, max=_UINT32_MAX)
    return value


def _parse_http(r: Reader) -> HttpHealthCheck:
    from microenvoy.config.loader import parse_header_names, parse_header_value_option

    path: str = r.string("path", required=True)
    if r.has("path") and not path:
        r.error("must not be empty", "path")
    elif path and not path.isprintable():
        r.error("must be printable text", "path")
    host: str = r.string("host")
    if host and not host.isprintable():
        r.error("must be printable text", "host")
    method: str = "GET"
    if r.raw.get("method") == "CONNECT":
        r.ignore("method")
        r.error("CONNECT cannot be used for health checks", "method")
    elif r.raw.get("method") == "METHOD_UNSPECIFIED":
        r.ignore("method")
    else:
        method = r.enum("method", _METHODS, "GET")
    add = r.objects("request_headers_to_add", parse_header_value_option)
    remove = parse_header_names(r, "request_headers_to_remove")
    expected = r.objects("expected_statuses", _parse_range) or (StatusRange(200, 201),)
    retriable = r.objects("retriable_statuses", _parse_range)
    codec: str | None = r.enum("codec_client_type", ("HTTP1", "HTTP2", "HTTP3"), None)
    if codec == "HTTP3":
        r.error("HTTP3 health checks are not supported yet", "codec_client_type")
        codec = None
    for key in ("send", "receive", "response_buffer_size", "service_name_matcher", "service_name"):
        if r.has(key):
            r.ignore(key)
            r.error("not supported yet", key)
    return HttpHealthCheck(
        path=path or "/",
        host=host,
        method=method,
        request_headers_to_add=add,
        request_headers_to_remove=remove,
        expected_statuses=expected,
        retriable_statuses=retriable,
        codec_client_type=codec,
    )


def _parse_range(r: Reader) -> StatusRange:
    start: int = r.integer("start", 0, required=True)
    end: int = r.integer("end", 0, required=True)
    if r.has("start") and r.has("end") and isinstance(start, int) and isinstance(end, int):
        if start < 100:
            r.error(f"must be >= 100, got {start}", "start")
        elif end > 600:
            r.error(f"must be <= 600, got {end}", "end")
        elif start >= end:
            r.error(f"the range [{start}, {end}) is empty: start must be less than end")
    return StatusRange(start, end)


def _parse_grpc(r: Reader) -> GrpcHealthCheck:
    from microenvoy.config.loader import parse_header_value_option

    service: str = r.string("service_name")
    authority: str = r.string("authority")
    if authority and not authority.isprintable():
        r.error("must be printable text", "authority")
    metadata = r.objects("initial_metadata", parse_header_value_option)
    return GrpcHealthCheck(service_name=service, authority=authority, initial_metadata=metadata)


def _parse_tcp(r: Reader) -> TcpHealthCheck:
    send = r.object("send", _parse_payload) or b""
    receive = r.objects("receive", _parse_payload)
    return TcpHealthCheck(send=send, receive=tuple(b for b in receive if b))


def _parse_payload(r: Reader) -> bytes:
    """Envoy's ``HealthCheck.Payload``: ``{text: <hex>}`` or ``{binary: <base64>}``, non-empty."""
    kind = r.one_of("text", "binary")
    r.ignore("text", "binary")
    if kind == "text":
        text: str = r.string("text")
        try:
            data = bytes.fromhex(text)
        except ValueError:
            r.error("expected hex digits", "text")
            return b""
        if not data:
            r.error("must not be empty", "text")
        return data
    if kind == "binary":
        raw: str = r.string("binary")
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            r.error("expected base64 data", "binary")
            return b""
        if not data:
            r.error("must not be empty", "binary")
        return data
    return b""
