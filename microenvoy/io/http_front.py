"""The HTTP connection manager at run time: one exchange per request, through filters and the router.

``HttpFront`` is built once per (listener filter chain, config snapshot) from a validated
``HttpConnectionManager``: it holds the compiled route table, the filter factories, the stats scope and the
access loggers. A downstream connection keeps the front it was accepted with, so a reload never changes
the filter chain under a live connection (new connections get the new front).

``ActiveStream`` drives one exchange:

1. request headers through the decode filters (Envoy's continue/stop contract, ``microenvoy.core.filter``);
2. the router: route match (cached on the exchange), direct responses, cluster choice, header mutations,
   ``x-forwarded-for``/``x-forwarded-proto``/``x-request-id``, then attempts with retries, per-try and route
   timeouts (Envoy's ``retry_on`` semantics, jittered exponential backoff from 25 ms);
3. the response through the encode filters (in reverse), back to the downstream codec.

Bodies stream in both directions with bounded buffering: a request chunk is credited back to the
downstream peer only after the upstream took it, and a response chunk is read from the upstream only after
the downstream took the previous one. The request body is kept for a retry only while it fits in the
listener's buffer limit.

The codec-specific side (how bytes and flow-control credit go back to the peer) is a ``DownstreamConnection``
(``microenvoy.io.tcp_front`` for HTTP/1.1 and HTTP/2, ``microenvoy.io.quic_front`` for HTTP/3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random as _random
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from microenvoy.admin.stats import Scope, Store
from microenvoy.codecs import grpc as grpc_codec
from microenvoy.config.model import HttpConnectionManager
from microenvoy.core.events import ProtocolFailure
from microenvoy.core.exchange import DownstreamInfo, Exchange, ResponseFlag
from microenvoy.core.filter import FactoryContext, FilterStatus, HttpFilter, HttpFilterFactory
from microenvoy.core.headers import HOP_BY_HOP, Headers
from microenvoy.extensions import http_filter_module
from microenvoy.io.upstream import UpstreamError
from microenvoy.router.table import RouteEntry, RouteTable
from microenvoy.tracing import TRACE_HEADERS, start_span

if TYPE_CHECKING:
    from microenvoy.io.access_log import AccessLogger
    from microenvoy.io.trace_export import SpanExporter
    from microenvoy.io.upstream import ClusterManager, UpstreamStream

__all__ = ["ActiveStream", "DownstreamConnection", "HttpFront"]

log = logging.getLogger("microenvoy.http")

ROUTER = "envoy.filters.http.router"

_METADATA_PREFIX = b"x-microenvoy-"
_MQTT_METADATA = b"x-microenvoy-mqtt-"
_HTTP_SCHEMES = (b"http", b"https")
# Never copied to the upstream request: hop-by-hop fields (te is re-added as "te: trailers" when asked),
# Host (``:authority`` carries it), and the forwarding fields the agent sets itself.
_DROPPED_UPSTREAM = HOP_BY_HOP | {b"host", b"x-forwarded-for", b"x-forwarded-proto"}
# Never copied to the downstream response: hop-by-hop fields, and ``server`` (the agent's replaces it).
_DROPPED_DOWNSTREAM = HOP_BY_HOP | {b"server"}

# Local replies for gRPC requests carry a gRPC status as Envoy does (timeouts are DEADLINE_EXCEEDED,
# overload/rate limiting RESOURCE_EXHAUSTED); other codes use the gRPC HTTP-to-status mapping.
_GRPC_LOCAL = {504: grpc_codec.DEADLINE_EXCEEDED, 429: grpc_codec.RESOURCE_EXHAUSTED}


class DownstreamConnection(Protocol):
    """What an ``ActiveStream`` needs from the connection it arrived on."""

    downstream: DownstreamInfo

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None: ...

    async def send_body(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Send, waiting for flow control / transport drain so memory stays bounded."""
        ...

    def send_trailers(self, stream_id: int, trailers: Headers) -> None: ...

    def reset_stream(self, stream_id: int) -> None: ...

    def acknowledge(self, stream_id: int, n: int) -> None:
        """Credit ``n`` request bytes back to the peer (they left the agent)."""
        ...

    def stream_closed(self, stream: ActiveStream) -> None: ...


class _HttpStats:
    """The ``http.<prefix>.`` counters, looked up once per front."""

    def __init__(self, scope: Scope) -> None:
        c = scope.counter
        self.scope = scope
        self.rq_total = c("downstream_rq_total")
        self.rq_active = scope.gauge("downstream_rq_active")
        self.rq_xx = [c(f"downstream_rq_{i}xx") for i in range(1, 6)]
        self.rq_time = scope.histogram("downstream_rq_time")
        self.rq_http1 = c("downstream_rq_http1_total")
        self.rq_http2 = c("downstream_rq_http2_total")
        self.rq_http3 = c("downstream_rq_http3_total")
        self.rq_timeout = c("downstream_rq_timeout")
        self.rq_idle_timeout = c("downstream_rq_idle_timeout")
        self.rq_too_large = c("downstream_rq_too_large")
        self.rq_rx_reset = c("downstream_rq_rx_reset")
        self.rq_tx_reset = c("downstream_rq_tx_reset")
        self.rq_completed = c("downstream_rq_completed")
        self.no_route = c("no_route")
        self.no_cluster = c("no_cluster")
        self.direct_response = c("rq_direct_response")
        self.rq_early_data = c("downstream_rq_early_data")
        self.cx_total = c("downstream_cx_total")
        self.cx_active = scope.gauge("downstream_cx_active")
        self.cx_destroy = c("downstream_cx_destroy")
        self.cx_http1 = c("downstream_cx_http1_total")
        self.cx_http2 = c("downstream_cx_http2_total")
        self.cx_http3 = c("downstream_cx_http3_total")
        self.cx_protocol_error = c("downstream_cx_protocol_error")
        self.cx_idle_timeout = c("downstream_cx_idle_timeout")
        self.cx_drain_close = c("downstream_cx_drain_close")
        self.cx_rx_bytes = c("downstream_cx_rx_bytes_total")
        self.cx_tx_bytes = c("downstream_cx_tx_bytes_total")

    def by_protocol(self, protocol: str) -> None:
        if protocol == "HTTP/2":
            self.rq_http2.inc()
        elif protocol == "HTTP/3":
            self.rq_http3.inc()
        else:
            self.rq_http1.inc()


class HttpFront:
    """Runtime of one HTTP connection manager config (immutable once built)."""

    def __init__(
        self,
        config: HttpConnectionManager,
        *,
        clusters: ClusterManager,
        stats: Store,
        rng: _random.Random | None = None,
        health: Any = None,
        alt_svc: Callable[[], bytes | None] | None = None,
        access_loggers: tuple[AccessLogger, ...] = (),
        buffer_limit: int = 1048576,
        exporter: SpanExporter | None = None,
    ) -> None:
        self.config = config
        self.clusters = clusters
        self.random = rng or _random.Random()
        self.scope = stats.scope(f"http.{config.stat_prefix}.")
        self.stats = _HttpStats(self.scope)
        self.routes = RouteTable(config.route_config)
        self.alt_svc = alt_svc
        self.access_loggers = access_loggers
        self.exporter = exporter
        """Where finished sampled spans go (None: trace context is propagated, nothing exported)."""
        self.buffer_limit = buffer_limit
        self.server_name = config.server_name.encode("latin-1", "replace")
        ctx = FactoryContext(self.scope, config.stat_prefix, self.random, health)
        factories: list[HttpFilterFactory] = []
        self.suppress_envoy_headers = False
        for f in config.http_filters:
            if f.name == ROUTER:
                self.suppress_envoy_headers = bool(getattr(f.config, "suppress_envoy_headers", False))
                continue
            if f.disabled:
                continue
            _, module = http_filter_module(f.name)
            factories.append(module.make_factory(f.config, ctx))
        self.factories = tuple(factories)
        self.max_request_bytes = config.max_request_bytes
        self.active: set[ActiveStream] = set()
        """Open exchanges (for the idle sweep)."""
        self._sweep_handle: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<HttpFront {self.config.stat_prefix!r} filters={len(self.factories)}>"

    # Stream idle timeouts: one sweep per front instead of a timer per exchange.
    def track(self, stream: ActiveStream) -> None:
        self.active.add(stream)
        if self._sweep_handle is None and self.config.stream_idle_timeout > 0:
            self._schedule_sweep()

    def untrack(self, stream: ActiveStream) -> None:
        self.active.discard(stream)

    def _schedule_sweep(self) -> None:
        idle = self.config.stream_idle_timeout
        interval = max(0.05, min(idle / 4, 5.0))
        self._sweep_handle = asyncio.get_running_loop().call_later(interval, self._sweep)

    def _sweep(self) -> None:
        self._sweep_handle = None
        idle = self.config.stream_idle_timeout
        now = time.monotonic()
        for s in [s for s in self.active if now - s.last_activity >= idle]:
            self.active.discard(s)
            s.idle_expired()
        if self.active:
            self._schedule_sweep()

    def config_dump(self) -> dict[str, Any]:
        return {"stat_prefix": self.config.stat_prefix, "filters": [f.name for f in self.factories]}

    def count_failure(self, ev: ProtocolFailure, downstream: DownstreamInfo) -> None:
        """A codec rejected a request or the connection: its stat, and the answer as a request if any."""
        st = self.stats
        self.scope.counter(ev.stat).inc()
        if ev.status:
            st.rq_total.inc()
            st.by_protocol(downstream.protocol)
            if 100 <= ev.status < 600:
                st.rq_xx[ev.status // 100 - 1].inc()
        if ev.close:
            st.cx_protocol_error.inc()
            log.warning("%s peer %s:%d: %s", downstream.protocol, *downstream.remote_address, ev.detail)
        else:
            log.info("%s peer %s:%d: %s", downstream.protocol, *downstream.remote_address, ev.detail)


class _LocalReply(Exception):
    """Raised inside the engine to turn the rest of the exchange into a local reply."""

    def __init__(self, status: int, body: str, details: str, flag: str | None = None,
                 grpc_status: int | None = None,
                 extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
        super().__init__(details)
        self.status = status
        self.body = body
        self.details = details
        self.flag = flag
        self.grpc_status = grpc_status
        self.extra_headers = extra_headers or []
        """Headers a filter asked for (a filter's grpc-status replaces the mapped one)."""


class _RequestBody:
    """Request body chunks waiting for the upstream, bounded by the downstream's flow control."""

    __slots__ = ("buffered", "chunks", "ended", "trailers", "waiter")

    def __init__(self) -> None:
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.buffered = 0
        self.ended = False
        self.trailers: Headers | None = None
        self.waiter: asyncio.Future[None] | None = None

    def push(self, data: bytes, fc_len: int, end: bool) -> None:
        if data or fc_len:
            self.chunks.append((data, fc_len))
            self.buffered += len(data)
        if end:
            self.ended = True
        self._wake()

    def finish(self, trailers: Headers | None) -> None:
        self.trailers = trailers
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next(self) -> tuple[bytes, int] | None:
        """The next chunk, or None once the body (and trailers) are complete."""
        while not self.chunks:
            if self.ended:
                return None
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        data, n = self.chunks.popleft()
        self.buffered -= len(data)
        return data, n


class ActiveStream:
    """One exchange on a downstream connection (see the module docstring)."""

    __slots__ = (
        "_body_bytes",
        "_encode_resume",
        "_filters",
        "_local",
        "_replay",
        "_replayable",
        "_request_timer",
        "_resume",
        "_retry_slot",
        "_task",
        "_timed_out",
        "body",
        "conn",
        "entry",
        "exchange",
        "front",
        "last_activity",
        "response_started",
        "stream_id",
    )

    def __init__(
        self,
        front: HttpFront,
        conn: DownstreamConnection,
        stream_id: int,
        headers: Headers,
        end_stream: bool,
        *,
        early_data: bool = False,
    ) -> None:
        self.front = front
        self.conn = conn
        self.stream_id = stream_id
        downstream = conn.downstream
        if early_data:
            downstream = DownstreamInfo(
                downstream.protocol, downstream.remote_address, downstream.local_address,
                downstream.listener_name, downstream.tls, downstream.sni, downstream.peer_sans, True,
            )  # fmt: skip
        self.exchange = ex = Exchange(headers, downstream, time.monotonic(), time.time())
        config = front.config
        if config.generate_request_id and b"x-request-id" not in headers:
            headers.add(b"x-request-id", _request_id(front.random))  # seen by filters and access logs too
        span = start_span(headers, front.random, ex.wall_start, config.tracing)
        if span is not None:
            ex.span = span
            rid = headers.get(b"x-request-id")
            if rid is not None:
                span.request_id = rid.decode("latin-1")
        self.body = _RequestBody()
        if end_stream:
            self.body.ended = True
        self.entry: RouteEntry | None = None
        self.response_started = False
        self._filters: list[HttpFilter] = [f.create(self) for f in front.factories]
        self._resume: asyncio.Future[None] | None = None
        self._encode_resume: asyncio.Future[None] | None = None
        self._local: _LocalReply | None = None
        self._replay: list[bytes] = []
        self._replayable = True
        self._body_bytes = 0
        self.last_activity = self.exchange.start_time
        self._timed_out = False
        self._retry_slot = False
        front.stats.rq_total.inc()
        front.stats.rq_active.inc()
        front.stats.by_protocol(downstream.protocol)
        if early_data:
            front.stats.rq_early_data.inc()
        loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] = loop.create_task(self._run())
        front.track(self)
        self._request_timer: asyncio.TimerHandle | None = None
        rt = front.config.request_timeout
        if rt > 0 and not self.body.ended:
            self._request_timer = loop.call_later(rt, self._on_request_timeout)

    def __repr__(self) -> str:
        return f"<ActiveStream {self.stream_id} {self.exchange!r}>"

    # ---------------------------------------------------------------- events from the connection
    def on_data(self, data: bytes, end_stream: bool, fc_len: int) -> None:
        self.last_activity = time.monotonic()
        self.exchange.request_body_bytes += len(data)
        limit = self._body_limit()
        if limit is not None and self.exchange.request_body_bytes > limit:
            self._fail_local(_LocalReply(413, "payload too large", "request_payload_too_large"))
            self.front.stats.rq_too_large.inc()
            self.conn.acknowledge(self.stream_id, fc_len)
            return
        self.body.push(data, fc_len, end_stream)

    def on_trailers(self, trailers: Headers) -> None:
        self.last_activity = time.monotonic()
        self.body.finish(trailers)

    def on_reset(self, reason: str = "remote_reset") -> None:
        """The downstream reset the stream or the connection went away."""
        if self._task.done():
            return
        self.front.stats.rq_rx_reset.inc()
        self.exchange.response_flags.add(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
        self._task.cancel()

    def _body_limit(self) -> int | None:
        entry = self.entry
        if entry is not None and entry.route.route is not None and entry.route.route.max_request_bytes:
            return entry.route.route.max_request_bytes
        return self.front.max_request_bytes

    def _fail_local(self, reply: _LocalReply) -> None:
        """A local reply from outside the engine task (body limit, idle timeout)."""
        if self._local is None:
            self._local = reply
        if not self._task.done():
            self._task.cancel()

    def _on_request_timeout(self) -> None:
        """``request_timeout``: the whole request did not arrive in time (Envoy answers 408)."""
        self._request_timer = None
        if self.body.ended:
            return
        self.front.stats.rq_timeout.inc()
        self._fail_local(_LocalReply(408, "request timeout", "request_overall_timeout"))

    def idle_expired(self) -> None:
        """``stream_idle_timeout`` passed without activity (called by the front's sweep)."""
        self.front.stats.rq_idle_timeout.inc()
        self.exchange.response_flags.add(ResponseFlag.STREAM_IDLE_TIMEOUT)
        self._fail_local(_LocalReply(408, "stream timeout", "stream_idle_timeout"))

    # ------------------------------------------------------------ FilterCallbacks for the filters
    @property
    def stats(self) -> Scope:
        return self.front.scope

    def now(self) -> float:
        return time.monotonic()

    def set_timer(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback)

    def continue_decoding(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

    def continue_encoding(self) -> None:
        if self._encode_resume is not None and not self._encode_resume.done():
            self._encode_resume.set_result(None)

    def send_local_reply(
        self,
        status: int,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        details: str = "",
        flag: str | None = None,
    ) -> None:
        self._local = _LocalReply(
            status, body.decode("utf-8", "replace"), details or "local_reply", flag, extra_headers=headers
        )
        self.continue_decoding()

    def clear_route_cache(self) -> None:
        self.entry = None
        self.exchange.route_resolved = False

    # ------------------------------------------------------------------------------- the engine
    async def _run(self) -> None:
        ex = self.exchange
        try:
            try:
                await self._decode_headers()
                if self._local is not None:
                    raise self._local
                await self._route_and_forward()
            except _LocalReply as reply:
                await self._send_local(reply)
            except asyncio.CancelledError:
                if self._deadline_passed():  # fired outside an attempt (e.g. during a retry backoff)
                    self._local = _failure_reply("timeout", self.exchange_cluster_stats())
                if self._local is not None and not self.response_started:
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(self._send_local(self._local))
                else:
                    if self.response_started or self._local is not None:
                        self.front.stats.rq_tx_reset.inc()
                    self.conn.reset_stream(self.stream_id)
        except Exception:  # our own bug: never take the connection down with it
            log.exception("exchange %r failed", ex)
            if not self.response_started:
                with contextlib.suppress(Exception):
                    await self._send_local(_LocalReply(500, "internal error", "internal_error"))
            else:
                self.conn.reset_stream(self.stream_id)
        finally:
            self._complete()

    async def _decode_headers(self) -> None:
        headers = self.exchange.request_headers
        end = self.body.ended and not self.body.chunks
        for f in self._filters:
            st = f.decode_headers(headers, end)
            if self._local is not None:
                return
            if st is FilterStatus.STOP:
                self._resume = asyncio.get_running_loop().create_future()
                await self._resume
                self._resume = None
                if self._local is not None:
                    return

    def _resolve_route(self) -> RouteEntry | None:
        if not self.exchange.route_resolved:
            self.entry = self.front.routes.match_entry(self.exchange.request_headers)
            self.exchange.route = self.entry.route if self.entry is not None else None
            self.exchange.virtual_host = self.entry.virtual_host if self.entry is not None else None
            self.exchange.route_resolved = True
        return self.entry

    async def _route_and_forward(self) -> None:
        front = self.front
        ex = self.exchange
        entry = self._resolve_route()
        if entry is None:
            front.stats.no_route.inc()
            raise _LocalReply(404, "", "route_not_found", ResponseFlag.NO_ROUTE_FOUND)
        route = entry.route
        if route.direct_response is not None:
            front.stats.direct_response.inc()
            dr = route.direct_response
            raise _LocalReply(dr.status, dr.body.decode("utf-8", "replace"), "direct_response")
        action = route.route
        assert action is not None
        limit = self._body_limit()
        if limit is not None:
            cl = ex.request_headers.get(b"content-length")
            # Body bytes may have arrived before the route (and so its limit) was known.
            if (cl is not None and cl.isdigit() and int(cl) > limit) or ex.request_body_bytes > limit:
                front.stats.rq_too_large.inc()
                raise _LocalReply(413, "payload too large", "request_payload_too_large")
        name = entry.cluster_name(front.random)
        cluster = front.clusters.get(name) if name else None
        if cluster is None:
            front.stats.no_cluster.inc()
            raise _LocalReply(503, "no cluster", "cluster_not_found", "NC")
        ex.upstream_cluster = cluster.name
        headers = self._upstream_headers(entry, cluster.keeps_mqtt_metadata)

        # Timeouts: the route timeout covers the whole upstream exchange (0 disables), gRPC clients may
        # lower it with grpc-timeout when the route allows (max_grpc_timeout).
        timeout = action.timeout
        if action.max_grpc_timeout is not None and ex.is_grpc:
            gt = ex.request_headers.get(b"grpc-timeout")
            parsed = grpc_codec.parse_grpc_timeout(gt) if gt else None
            if parsed is not None:
                cap = action.max_grpc_timeout
                timeout = parsed if cap == 0 else min(parsed, cap)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout > 0 else None
        retry = entry.retry_state(front.random)
        per_try = entry.retry_policy.per_try_timeout if entry.retry_policy is not None else None

        hash_key = None
        if entry.hash_key is not None:
            hash_key = entry.hash_key(ex.request_headers, ex.downstream.remote_address[0])
        timer = self._arm_deadline(deadline)  # the route timeout: one timer for every attempt and the body
        try:
            await self._attempts(cluster, headers, deadline, retry, per_try, hash_key)
        finally:
            if timer is not None:
                timer.cancel()

    async def _attempts(
        self,
        cluster: Any,
        headers: Headers,
        deadline: float | None,
        retry: Any,
        per_try: float | None,
        hash_key: int | None,
    ) -> None:
        """Attempts until an answer is forwarded or a failure becomes a local reply (raised)."""
        try:
            await self._attempts_loop(cluster, headers, deadline, retry, per_try, hash_key)
        finally:
            if self._retry_slot:
                self._retry_slot = False
                cluster.retry_end()

    def _take_retry_slot(self, cluster: Any) -> bool:
        """The circuit breaker's say on one more retry (the exchange keeps its slot until it ends)."""
        if self._retry_slot:
            return True
        if cluster.retry_begin():
            self._retry_slot = True
            return True
        return False

    async def _attempts_loop(
        self,
        cluster: Any,
        headers: Headers,
        deadline: float | None,
        retry: Any,
        per_try: float | None,
        hash_key: int | None,
    ) -> None:
        ex = self.exchange
        loop = asyncio.get_running_loop()
        cstats = cluster.stats
        while True:
            ex.attempts += 1
            host = cluster.choose_host(hash_key)
            if host is None:
                raise _LocalReply(503, "no healthy upstream", "no_healthy_upstream",
                                  ResponseFlag.NO_HEALTHY_UPSTREAM)  # fmt: skip
            ex.upstream_host = f"{host.address[0]}:{host.address[1]}"
            try_deadline = deadline
            if per_try:
                t = loop.time() + per_try
                try_deadline = t if deadline is None else min(t, deadline)
            outcome = await self._attempt(cluster, host, headers, try_deadline, deadline)
            # The retry policy sees an upstream answer, a failure kind, or a per-try timeout, which Envoy
            # treats as a 504 for 5xx/gateway-error and as "no response" for reset.
            if isinstance(outcome, tuple):
                us, resp = outcome
                wanted = (
                    retry is not None
                    and self._replayable
                    and retry.should_retry_headers(_status(resp), resp)
                    and self._take_retry_slot(cluster)
                )
                if not wanted:
                    if retry is not None and retry.limit_exceeded:
                        ex.response_flags.add(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
                        cstats.counter("upstream_rq_retry_limit_exceeded").inc()
                    await self._respond(us, resp, deadline)
                    return
                us.reset()
            else:
                kind = outcome
                if kind in ("per-try-timeout", "timeout"):
                    cluster.report_timeout(host)
                if kind == "per-try-timeout" and (deadline is None or loop.time() < deadline):
                    cstats.counter("upstream_rq_per_try_timeout").inc()
                    wanted = (
                        retry is not None
                        and self._replayable
                        and (
                            retry.should_retry_headers(504, _NO_HEADERS) or retry.should_retry_reset("reset")
                        )
                    )
                    if not wanted:
                        kind = "timeout"
                    else:
                        wanted = self._take_retry_slot(cluster)
                else:
                    retry_kind = "connect-failure" if kind == "connect-timeout" else kind
                    wanted = (
                        kind != "timeout"
                        and retry is not None
                        and self._replayable
                        and retry.should_retry_reset(retry_kind)
                        and self._take_retry_slot(cluster)
                    )
                if not wanted:
                    if retry is not None and retry.limit_exceeded:
                        ex.response_flags.add(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
                    raise _failure_reply(kind, cstats)
            assert retry is not None
            cstats.counter("upstream_rq_retry").inc()
            await self._backoff(retry.next_backoff(), deadline)

    async def _backoff(self, delay: float, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - loop.time()))
        if delay > 0:
            await asyncio.sleep(delay)

    async def _attempt(
        self,
        cluster: Any,
        host: Any,
        headers: Headers,
        try_deadline: float | None,
        deadline: float | None,
    ) -> tuple[UpstreamStream, Headers] | str:
        """One upstream try: headers, body pump, response headers. Returns (stream, headers) or a failure
        kind (``connect-failure``, ``reset``, ``per-try-timeout``, ``timeout`` ...)."""
        end_stream = (
            self.body.ended and not self.body.chunks and not self._replay and self.body.trailers is None
        )
        us: UpstreamStream | None = None
        pump: asyncio.Task[None] | None = None
        timer = self._arm_deadline(try_deadline) if try_deadline != deadline else None
        try:
            us = await cluster.open_stream(host, headers.copy(), end_stream=end_stream)
            if not end_stream:
                pump = asyncio.get_running_loop().create_task(self._pump_request(us))
            resp = await us.read_headers()
            return us, resp
        except UpstreamError as exc:
            if pump is not None:
                pump.cancel()
            return str(exc.kind)
        except asyncio.CancelledError:
            if pump is not None:
                pump.cancel()
            if us is not None:
                us.reset()
            if not self._deadline_passed():
                raise
            if deadline is not None and asyncio.get_running_loop().time() >= deadline - 1e-3:
                return "timeout"
            return "per-try-timeout"
        except BaseException:
            if pump is not None:
                pump.cancel()
            if us is not None:
                us.reset()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    # Deadlines: one timer that cancels this exchange's task (cheaper than asyncio.timeout() per await).
    def _arm_deadline(self, when: float | None) -> asyncio.TimerHandle | None:
        if when is None:
            return None
        return asyncio.get_running_loop().call_at(when, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timed_out = True
        self._task.cancel()

    def exchange_cluster_stats(self) -> Scope:
        name = self.exchange.upstream_cluster
        cluster = self.front.clusters.get(name) if name else None
        return cluster.stats if cluster is not None else self.front.scope

    def _deadline_passed(self) -> bool:
        """In an ``except CancelledError``: was it our deadline (and nothing else cancelled us)?"""
        if not self._timed_out:
            return False
        self._timed_out = False
        return self._task.uncancel() == 0

    async def _pump_request(self, us: UpstreamStream) -> None:
        """Request body (replayed part first) and trailers to the upstream, crediting the downstream."""
        conn = self.conn
        sid = self.stream_id
        limit = self.front.buffer_limit
        filters = self._filters
        try:
            for chunk in self._replay:
                await us.send_data(chunk, False)
            while True:
                item = await self.body.next()
                if item is None:
                    break
                data, fc_len = item
                for f in filters:
                    if f.decode_data(data, False) is FilterStatus.STOP:
                        self._resume = asyncio.get_running_loop().create_future()
                        await self._resume
                    if self._local is not None:
                        self._task.cancel()
                        return
                if self._replayable:
                    self._body_bytes += len(data)
                    if self._body_bytes <= limit:
                        self._replay.append(data)
                    else:
                        self._replayable = False
                        self._replay.clear()
                await us.send_data(data, False)
                conn.acknowledge(sid, fc_len)
                self.last_activity = time.monotonic()
            if self.body.trailers is not None:
                await us.send_trailers(self.body.trailers)
            else:
                await us.send_data(b"", True)
        except UpstreamError:
            return  # read_headers reports the failure

    def _upstream_headers(self, entry: RouteEntry, keep_mqtt: bool = False) -> Headers:
        """The request as it leaves: hop-by-hop and metadata fields dropped, forwarding fields added
        (one pass over the fields; ``Headers.set`` would rebuild the list each time)."""
        ex = self.exchange
        front = self.front
        out: list[tuple[bytes, bytes]] = []
        te_trailers = False
        xff: bytes | None = None
        request_id = False
        early = ex.downstream.early_data
        span = ex.span
        replaced = TRACE_HEADERS if span is not None else _NOTHING
        for k, v in ex.request_headers:
            if k in replaced:
                continue
            if k.startswith(_METADATA_PREFIX) and keep_mqtt and k.startswith(_MQTT_METADATA):
                out.append((k, v))  # an MQTT broker cluster publishes with the message's topic, QoS, retain
                continue
            if k in _DROPPED_UPSTREAM or k.startswith(_METADATA_PREFIX):
                if k == b"te":  # hop-by-hop, but "te: trailers" is kept (gRPC needs it)
                    te_trailers = te_trailers or b"trailers" in v.lower()
                elif k == b"x-forwarded-for":
                    xff = v
                continue
            if k == b":scheme" and v not in _HTTP_SCHEMES:
                v = b"https" if ex.downstream.tls else b"http"  # mqtt/coap exchanges: upstreams speak HTTP
            elif k == b"x-request-id":
                request_id = True
            elif k == b"early-data":  # RFC 8470 section 5.1: an earlier hop's mark is never removed
                early = False
            out.append((k, v))
        if te_trailers:
            out.append((b"te", b"trailers"))
        if front.config.use_remote_address:
            remote = ex.downstream.remote_address[0].encode("latin-1")
            out.append((b"x-forwarded-for", xff + b"," + remote if xff else remote))
        elif xff:
            out.append((b"x-forwarded-for", xff))
        out.append((b"x-forwarded-proto", b"https" if ex.downstream.tls else b"http"))
        if front.config.generate_request_id and not request_id:
            out.append((b"x-request-id", _request_id(front.random)))
        if early:
            out.append((b"early-data", b"1"))  # RFC 8470 section 5.1
        if span is not None:
            out.extend(span.outgoing_headers())  # our span id as the parent of the next hop
        h = Headers(out)
        entry.finalize_request_headers(h, ex, insert_original_path=not front.suppress_envoy_headers)
        return h

    # ------------------------------------------------------------------------------ response path
    async def _respond(self, us: UpstreamStream, resp: Headers, deadline: float | None) -> None:
        ex = self.exchange
        status = _status(resp)
        ex.response_code = status
        front = self.front
        fields = [(k, v) for k, v in resp if k not in _DROPPED_DOWNSTREAM]
        fields.append((b"server", front.server_name))
        out = Headers(fields)
        entry = self.entry
        if entry is not None:
            entry.finalize_response_headers(out, ex)
        if front.alt_svc is not None:
            self._add_alt_svc(out)
        if not await self._encode_headers(out, False):
            us.reset()
            return
        ended = us.response_complete
        self.conn.send_headers(self.stream_id, out, ended)
        self.response_started = True
        if ended:
            return
        filters = self._filters
        try:
            while True:
                item = await us.read_body()
                self.last_activity = time.monotonic()
                if item is None:
                    await self.conn.send_body(self.stream_id, b"", True)
                    return
                if isinstance(item, Headers):
                    for f in reversed(filters):
                        f.encode_trailers(item)
                    self.conn.send_trailers(self.stream_id, item)
                    return
                last = us.response_complete  # the end already arrived: send it with this chunk
                for f in reversed(filters):
                    f.encode_data(item, last)
                ex.response_body_bytes += len(item)
                await self.conn.send_body(self.stream_id, item, last)
                if last:
                    return
        except UpstreamError:
            ex.response_flags.add(ResponseFlag.UPSTREAM_REMOTE_RESET)
            self.front.stats.rq_tx_reset.inc()
            self.conn.reset_stream(self.stream_id)
        except asyncio.CancelledError:
            us.reset()
            if not self._deadline_passed():
                raise
            ex.response_flags.add(ResponseFlag.UPSTREAM_REQUEST_TIMEOUT)
            self.conn.reset_stream(self.stream_id)
        except BaseException:
            us.reset()
            raise

    def _decorate_response(self, headers: Headers) -> None:
        """``server`` and ``alt-svc`` on a local reply (the upstream path adds them while copying)."""
        headers.set(b"server", self.front.server_name)
        if self.front.alt_svc is not None:
            self._add_alt_svc(headers)

    def _add_alt_svc(self, headers: Headers) -> None:
        assert self.front.alt_svc is not None
        value = self.front.alt_svc()
        if value is not None and b"alt-svc" not in headers:
            headers.add(b"alt-svc", value)

    async def _encode_headers(self, headers: Headers, end_stream: bool) -> bool:
        for f in reversed(self._filters):
            if f.encode_headers(headers, end_stream) is FilterStatus.STOP:
                self._encode_resume = asyncio.get_running_loop().create_future()
                await self._encode_resume
                self._encode_resume = None
        return True

    async def _send_local(self, reply: _LocalReply) -> None:
        if self.response_started:
            self.conn.reset_stream(self.stream_id)
            return
        ex = self.exchange
        ex.response_code = reply.status
        ex.response_code_details = reply.details
        if reply.flag:
            ex.response_flags.add(reply.flag)
        extra = reply.extra_headers
        if ex.is_grpc:
            code = reply.grpc_status
            if code is None:
                code = _GRPC_LOCAL.get(reply.status) or grpc_codec.http_status_to_grpc(reply.status)
            headers = grpc_codec.grpc_local_reply_headers(code, reply.body or reply.details)
            for k, v in extra:
                # A filter's own grpc-status/grpc-message (fault abort) replaces the mapped one.
                if k in (b"grpc-status", b"grpc-message"):
                    headers.set(k, v)
                else:
                    headers.add(k, v)
            self._decorate_response(headers)
            await self._encode_headers(headers, True)
            self.response_started = True
            self.conn.send_headers(self.stream_id, headers, True)
            return
        body = reply.body.encode("utf-8") if reply.body else b""
        headers = Headers([(b":status", str(reply.status).encode())])
        if body:
            headers.add(b"content-type", b"text/plain")
        headers.add(b"content-length", str(len(body)).encode())
        for k, v in extra:
            headers.add(k, v)
        if self.entry is not None and reply.details == "direct_response":
            self.entry.finalize_response_headers(headers, ex)
        self._decorate_response(headers)
        await self._encode_headers(headers, not body)
        self.response_started = True
        ex.response_body_bytes = len(body)
        head = ex.method == b"HEAD"
        self.conn.send_headers(self.stream_id, headers, not body or head)
        if body and not head:
            await self.conn.send_body(self.stream_id, body, True)

    def _complete(self) -> None:
        front = self.front
        ex = self.exchange
        front.untrack(self)
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None
        for f in self._filters:
            try:
                f.on_destroy()
            except Exception:
                log.exception("filter on_destroy failed")
        front.stats.rq_active.dec()
        front.stats.rq_completed.inc()
        code = ex.response_code
        if 100 <= code < 600:
            front.stats.rq_xx[code // 100 - 1].inc()
        front.stats.rq_time.record((time.monotonic() - ex.start_time) * 1000.0)
        # Whatever request bytes are still queued will never be forwarded: credit them back.
        for _, n in self.body.chunks:
            self.conn.acknowledge(self.stream_id, n)
        self.body.chunks.clear()
        span = ex.span
        if span is not None and span.sampled and front.exporter is not None:
            tracing = front.config.tracing
            route = self.entry.route.name if self.entry is not None else ""
            span.finish(
                ex,
                ex.wall_start + (time.monotonic() - ex.start_time),
                name=route or None,
                max_path=tracing.max_path_tag_length if tracing is not None else 256,
            )
            front.exporter.submit(span)
        for logger in front.access_loggers:
            logger.log(ex)
        self.conn.stream_closed(self)


def _request_id(rng: _random.Random) -> bytes:
    """A random (version 4) UUID for ``x-request-id`` from the front's PRNG: unique enough to correlate
    logs, without an ``os.urandom`` system call per request."""
    h = "%032x" % (rng.getrandbits(128) & ~(0xF << 76) & ~(0x3 << 62) | (0x4 << 76) | (0x2 << 62))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}".encode()


_NO_HEADERS = Headers()
_NOTHING: frozenset[bytes] = frozenset()


_RESET_TEXT = "upstream connect error or disconnect/reset before headers"


def _failure_reply(kind: str, cstats: Scope) -> _LocalReply:
    """The local reply for an upstream failure that will not be retried."""
    if kind in ("timeout", "per-try-timeout"):
        cstats.counter("upstream_rq_timeout").inc()
        return _LocalReply(
            504,
            "upstream request timeout",
            "upstream_response_timeout",
            ResponseFlag.UPSTREAM_REQUEST_TIMEOUT,
        )
    if kind == "overflow":
        return _LocalReply(
            503, "upstream overflow", "upstream_overflow", ResponseFlag.UPSTREAM_OVERFLOW,
            extra_headers=[(b"x-envoy-overloaded", b"true")],
        )  # fmt: skip
    if kind in ("connect-failure", "connect-timeout"):
        return _LocalReply(
            503, _RESET_TEXT, "upstream_connect_failure", ResponseFlag.UPSTREAM_CONNECTION_FAILURE
        )
    return _LocalReply(
        503, _RESET_TEXT, "upstream_reset_before_response_started", ResponseFlag.UPSTREAM_REMOTE_RESET
    )


def _status(headers: Headers) -> int:
    s = headers.get(b":status")
    try:
        return int(s) if s is not None else 502
    except ValueError:
        return 502
