"""In-process exchanges: a non-HTTP front (MQTT, CoAP) hands a request to the HTTP engine, awaits the answer.

``forward`` runs a complete exchange through an ``HttpFront`` (its filters, route table, retries, timeouts,
clusters, stats and access logs) as if it had arrived on an HTTP connection, and returns the response
collected in memory. The response body is bounded (``max_response_bytes``): beyond it the exchange is reset
and the result says so, so a misbehaving upstream cannot grow the agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from microenvoy.core.exchange import DownstreamInfo, Exchange
from microenvoy.core.headers import Headers
from microenvoy.io.http_front import ActiveStream, HttpFront
from microenvoy.router.table import RouteEntry

__all__ = ["BridgeResult", "forward"]

_DEFAULT_MAX_RESPONSE = 1048576


@dataclass(frozen=True, slots=True)
class BridgeResult:
    """What came back: the status (0 when the exchange was reset before any response) and the response."""

    status: int
    headers: Headers
    body: bytes
    trailers: Headers | None
    exchange: Exchange
    """The finished exchange (response flags, upstream host, attempts ...)."""
    truncated: bool = False
    """The response body went over ``max_response_bytes`` and the exchange was reset."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class _Sink:
    """The ``DownstreamConnection`` of one in-process exchange: collects the response."""

    __slots__ = (
        "body", "done", "downstream", "headers", "limit", "on_data", "on_headers", "stream", "trailers",
        "truncated",
    )  # fmt: skip

    def __init__(
        self,
        downstream: DownstreamInfo,
        limit: int,
        on_headers: Callable[[Headers], None] | None = None,
        on_data: Callable[[bytes], None] | None = None,
    ) -> None:
        self.downstream = downstream
        self.limit = limit
        self.on_headers = on_headers
        self.on_data = on_data
        self.headers: Headers | None = None
        self.body = bytearray()
        self.trailers: Headers | None = None
        self.truncated = False
        self.stream: ActiveStream | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        self.headers = headers
        if self.on_headers is not None:
            self.on_headers(headers)

    async def send_body(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if self.on_data is not None:
            if data:
                self.on_data(data)
            return
        if len(self.body) + len(data) > self.limit:
            self.truncated = True
            if self.stream is not None:
                self.stream.on_reset("response_too_large")
            return
        self.body += data

    def send_trailers(self, stream_id: int, trailers: Headers) -> None:
        self.trailers = trailers

    def reset_stream(self, stream_id: int) -> None:
        """The engine reset the exchange (upstream reset mid-body, timeout after the headers ...)."""

    def acknowledge(self, stream_id: int, n: int) -> None:
        """Request bytes left the agent: nothing to credit, the body was handed over whole."""

    def stream_closed(self, stream: ActiveStream) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def forward(
    front: HttpFront,
    downstream: DownstreamInfo,
    headers: Headers,
    body: bytes,
    *,
    max_response_bytes: int = _DEFAULT_MAX_RESPONSE,
    on_headers: Callable[[Headers], None] | None = None,
    on_data: Callable[[bytes], None] | None = None,
    entry: RouteEntry | None = None,
) -> BridgeResult:
    """Run one exchange (request ``headers`` with pseudo-headers, whole ``body``) through ``front``.

    With ``on_data`` the response body is not collected: each piece is handed to it as it arrives (a long
    upstream stream, e.g. an observed resource); ``on_headers`` sees the response headers first. ``entry``:
    the route the caller already matched (before it rewrote the request, e.g. into a gRPC call), used instead
    of matching again; a filter that clears the route cache still re-matches."""
    sink = _Sink(downstream, max_response_bytes, on_headers, on_data)
    stream = ActiveStream(front, sink, 1, headers, end_stream=not body)
    sink.stream = stream
    if entry is not None:  # the stream's task has not run yet: its first route lookup finds this
        stream.entry = entry
        ex = stream.exchange
        ex.route, ex.virtual_host, ex.route_resolved = entry.route, entry.virtual_host, True
    if body:
        stream.on_data(body, True, 0)
    try:
        await asyncio.shield(sink.done)
    except asyncio.CancelledError:
        stream.on_reset("cancelled")
        raise
    h = sink.headers or Headers()
    status_raw = h.get(b":status")
    status = int(status_raw) if status_raw is not None and status_raw.isdigit() else 0
    if sink.truncated:
        status = 0
    return BridgeResult(status, h, bytes(sink.body), sink.trailers, stream.exchange, sink.truncated)
