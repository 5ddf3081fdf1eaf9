"""One request/response exchange, whichever protocol it came from.

An ``Exchange`` is created by a front (HTTP connection manager, later MQTT and CoAP proxies) for every request
and is what filters, the router and access logs look at. Protocol-specific facts travel as metadata headers
with the ``x-microenvoy-`` prefix (PROTOCOLS.md) or in ``DownstreamInfo``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from microenvoy.core.headers import Headers

__all__ = ["METADATA_PREFIX", "DownstreamInfo", "Exchange", "ResponseFlag", "response_flags_text"]

METADATA_PREFIX = b"x-microenvoy-"


class ResponseFlag:
    """Envoy's response flags (``%RESPONSE_FLAGS%``), as short codes."""

    NO_HEALTHY_UPSTREAM = "UH"
    UPSTREAM_CONNECTION_FAILURE = "UF"
    UPSTREAM_OVERFLOW = "UO"
    NO_ROUTE_FOUND = "NR"
    UPSTREAM_REQUEST_TIMEOUT = "UT"
    UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"
    UPSTREAM_REMOTE_RESET = "UR"
    LOCAL_RESET = "LR"
    DOWNSTREAM_CONNECTION_TERMINATION = "DC"
    STREAM_IDLE_TIMEOUT = "SI"
    RATE_LIMITED = "RL"
    UNAUTHORIZED = "UAEX"
    RBAC_DENIED = "RBAC"
    FAULT_INJECTED = "FI"
    DELAY_INJECTED = "DI"
    DOWNSTREAM_PROTOCOL_ERROR = "DPE"
    UPSTREAM_PROTOCOL_ERROR = "UPE"

    ORDER = (
        "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC", "URX",
        "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR", "UDO",
    )  # fmt: skip
    """Envoy's order of the short codes in ``%RESPONSE_FLAGS%`` (``ResponseFlagUtils``: the flag enum's
    order, not alphabetical); codes Envoy does not have (``RBAC``) follow, sorted."""


_FLAG_RANK = {code: i for i, code in enumerate(ResponseFlag.ORDER)}


def response_flags_text(flags: set[str]) -> str:
    """``%RESPONSE_FLAGS%``: the short codes joined by commas in Envoy's order, ``-`` when there is none."""
    if not flags:
        return "-"
    if len(flags) == 1:
        return next(iter(flags))
    return ",".join(sorted(flags, key=lambda f: (_FLAG_RANK.get(f, len(_FLAG_RANK)), f)))


@dataclass(frozen=True, slots=True)
class DownstreamInfo:
    """Facts about the downstream connection an exchange arrived on."""

    protocol: str
    """``HTTP/1.1``, ``HTTP/2``, ``HTTP/3`` (later ``MQTT/3.1.1``, ``MQTT/5``, ``CoAP``)."""
    remote_address: tuple[str, int]
    local_address: tuple[str, int]
    listener_name: str
    tls: bool = False
    sni: str | None = None
    peer_sans: tuple[str, ...] = ()
    """Subject alternative names (DNS and URI) of a verified client certificate."""
    early_data: bool = False
    """The request arrived in TLS 1.3 / QUIC 0-RTT and may be a replay."""


@dataclass(slots=True)
class Exchange:
    """Mutable per-request state shared by the front, the filters, the router and the access log."""

    request_headers: Headers
    downstream: DownstreamInfo
    start_time: float
    """Monotonic clock at request headers."""
    wall_start: float = 0.0
    """Wall clock (``time.time()``) at request headers, for access logs."""
    route: Any = None
    """The matched ``microenvoy.router.Route`` (or None); filters may clear it to force a re-match."""
    route_resolved: bool = False
    virtual_host: Any = None
    response_headers: Headers | None = None
    response_code: int = 0
    response_flags: set[str] = field(default_factory=set)
    response_code_details: str = ""
    upstream_host: str | None = None
    upstream_cluster: str | None = None
    request_body_bytes: int = 0
    response_body_bytes: int = 0
    attempts: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form per-exchange data for filters (dynamic metadata)."""
    span: Any = None
    """The exchange's tracing span (``microenvoy.tracing.Span``) or None (``%TRACE_ID%``, span export)."""

    @property
    def method(self) -> bytes:
        return self.request_headers.get(b":method") or b""

    @property
    def path(self) -> bytes:
        return self.request_headers.get(b":path") or b""

    @property
    def authority(self) -> bytes:
        return self.request_headers.get(b":authority") or self.request_headers.get(b"host") or b""

    @property
    def is_grpc(self) -> bool:
        ct = self.request_headers.get(b"content-type") or b""
        return ct.startswith(b"application/grpc")

    def __repr__(self) -> str:
        return (
            f"<Exchange {self.method.decode('latin-1')} {self.path.decode('latin-1')}"
            f" via {self.downstream.protocol} code={self.response_code}>"
        )
