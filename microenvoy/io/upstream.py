"""Upstream I/O: clusters, per-host connection pools (HTTP/1.1 and HTTP/2, plain or TLS) and request streams.

This is the only upstream module that touches the event loop. Its pieces, from the outside in:

``ClusterManager``
    Owns one ``UpstreamCluster`` per configured cluster; ``update()`` swaps in a new cluster list on config
    reload (unchanged clusters keep their runtime and pools, replaced/removed ones drain); STRICT_DNS
    clusters re-resolve every ``dns_refresh_rate`` with ``loop.getaddrinfo``; renders ``/clusters``.
``UpstreamCluster``
    The hosts, the load balancer (``microenvoy.upstream.lb``) and one ``_HostPool`` per host.
``_HostPool``
    HTTP/1.1: idle keep-alive connections (LIFO, at most ``MAX_IDLE_PER_HOST``, closed after the cluster's
    ``idle_timeout``); one request per connection at a time, never pipelined.
    HTTP/2: connections multiplexing streams up to the peer's SETTINGS_MAX_CONCURRENT_STREAMS; when all are
    full another connection is opened. A new HTTP/2 connection is usable once the server's first SETTINGS
    frame arrived (so its stream limit is known); that wait is part of the connect timeout. Requests that
    arrive while a connection is being set up wait for it instead of opening one each.
``UpstreamStream``
    One request/response. Sending respects the peer's flow control (HTTP/2 windows) and the transport's write
    buffer; receiving buffers at most one stream window (HTTP/2: WINDOW_UPDATE is sent only as the caller
    reads) or ``per_connection_buffer_limit_bytes`` (HTTP/1.1: reading from the socket pauses).

Errors surface as ``UpstreamError`` with Envoy-like ``kind``s the router maps to retry policies and response
flags: ``connect-failure`` (refused, TLS failure, SAN mismatch), ``connect-timeout``, ``reset`` (the
connection or stream died), ``refused-stream`` (RST_STREAM REFUSED_STREAM or beyond a GOAWAY's last stream:
never processed, safe to retry), ``overflow`` (circuit breaker), ``protocol-error`` (the upstream broke
HTTP). A connection lost mid-response fails every stream on it; nothing waits forever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random as _random
import socket
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from microenvoy.admin.stats import Counter, Gauge, Histogram, Scope, Store
from microenvoy.codecs.upstream_http1 import Http1ClientCodec
from microenvoy.codecs.upstream_http2 import CANCEL, Http2ClientCodec
from microenvoy.config.model import Cluster, Thresholds
from microenvoy.core.errors import CodecError
from microenvoy.core.events import (
    ConnectionTerminated,
    DataAcknowledged,
    DataReceived,
    Event,
    HeadersReceived,
    ProtocolFailure,
    StreamReset,
    TrailersReceived,
    WindowOpened,
)
from microenvoy.core.headers import Headers
from microenvoy.io import tls as _tls
from microenvoy.upstream.host import Host
from microenvoy.upstream.lb import LoadBalancer, make_lb

if TYPE_CHECKING:
    from microenvoy.io.health_check import HealthChecker
    from microenvoy.upstream.outlier import OutlierDetector

__all__ = [
    "DEFAULT_MAX_REQUESTS",
    "MAX_IDLE_PER_HOST",
    "ClusterManager",
    "Host",
    "UpstreamCluster",
    "UpstreamError",
    "UpstreamStream",
]

log = logging.getLogger("microenvoy.upstream")

MAX_IDLE_PER_HOST = 32
"""Idle HTTP/1.1 keep-alive connections kept per host; more are closed when released."""
DEFAULT_MAX_REQUESTS = 1024
"""Envoy's default circuit breaker ``max_requests`` per cluster: beyond it -> ``overflow``."""
_DNS_FIRST_ROUND_TIMEOUT = 5.0
_WARMING_TIMEOUT = 30.0
"""At start-up, how long listeners wait for clusters' first health-check round (each check has its own
timeout, so a round normally ends much sooner)."""
_ASSUMED_H2_STREAMS = 100
"""Requests allowed to wait for one HTTP/2 connection still being set up (before its SETTINGS say more)."""
_CLOSE_GRACE = 1.0
_MAX_REISSUE = 2
"""Times a refused headers-only HTTP/2 request is sent again before ``refused-stream`` reaches the caller."""

KINDS = ("connect-failure", "connect-timeout", "reset", "refused-stream", "overflow", "protocol-error")


class UpstreamError(Exception):
    """An upstream request failed; ``kind`` is one of ``KINDS``."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


# ============================================================================================ stats
class _ClusterStats:
    """The cluster's stats objects, looked up once (``cluster.<name>.*``)."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        c = scope.counter
        g = scope.gauge
        self.cx_total: Counter = c("upstream_cx_total")
        self.cx_active: Gauge = g("upstream_cx_active")
        self.cx_connect_fail: Counter = c("upstream_cx_connect_fail")
        self.cx_connect_timeout: Counter = c("upstream_cx_connect_timeout")
        self.cx_destroy: Counter = c("upstream_cx_destroy")
        self.cx_destroy_local: Counter = c("upstream_cx_destroy_local")
        self.cx_destroy_remote: Counter = c("upstream_cx_destroy_remote")
        self.cx_http1_total: Counter = c("upstream_cx_http1_total")
        self.cx_http2_total: Counter = c("upstream_cx_http2_total")
        self.cx_protocol_error: Counter = c("upstream_cx_protocol_error")
        self.cx_idle_timeout: Counter = c("upstream_cx_idle_timeout")
        self.cx_rx_bytes_total: Counter = c("upstream_cx_rx_bytes_total")
        self.cx_tx_bytes_total: Counter = c("upstream_cx_tx_bytes_total")
        self.rq_total: Counter = c("upstream_rq_total")
        self.rq_active: Gauge = g("upstream_rq_active")
        self.rq_rx_reset: Counter = c("upstream_rq_rx_reset")
        self.rq_tx_reset: Counter = c("upstream_rq_tx_reset")
        self.rq_pending_overflow: Counter = c("upstream_rq_pending_overflow")
        self.rq_pending_total: Counter = c("upstream_rq_pending_total")
        self.rq_pending_active: Gauge = g("upstream_rq_pending_active")
        self.cx_overflow: Counter = c("upstream_cx_overflow")
        self.rq_retry_overflow: Counter = c("upstream_rq_retry_overflow")
        self.rq_reissued: Counter = c("upstream_rq_refused_reissued")
        self.rq_time: Histogram = scope.histogram("upstream_rq_time")
        self.membership_total: Gauge = g("membership_total")
        self.membership_healthy: Gauge = g("membership_healthy")
        self.membership_degraded: Gauge = g("membership_degraded")
        self.membership_excluded: Gauge = g("membership_excluded")
        self.update_attempt: Counter = c("update_attempt")
        self.update_success: Counter = c("update_success")
        self.update_failure: Counter = c("update_failure")
        self.lb_healthy_panic: Counter = c("lb_healthy_panic")
        self._codes: dict[int, tuple[Counter, Counter]] = {}

    def response_code(self, status: int) -> None:
        pair = self._codes.get(status)
        if pair is None:
            pair = (
                self.scope.counter(f"upstream_rq_{status}"),
                self.scope.counter(f"upstream_rq_{status // 100}xx"),
            )
            self._codes[status] = pair
        pair[0].inc()
        pair[1].inc()


_LB_GAUGES = (
    ("ring_hash_lb", "size"),
    ("ring_hash_lb", "min_hashes_per_host"),
    ("ring_hash_lb", "max_hashes_per_host"),
    ("maglev_lb", "min_entries_per_host"),
    ("maglev_lb", "max_entries_per_host"),
)
"""Balancer table gauges (Envoy's ``cluster.<name>.ring_hash_lb.*`` / ``maglev_lb.*``)."""


class _BreakerGauges:
    """``circuit_breakers.default.{cx,rq_pending,rq,rq_retry}_open`` (1 while saturated) and, with
    ``track_remaining``, ``remaining_{cx,pending,rq,retries}`` (Envoy's names), set when stats are read."""

    _OPEN = ("cx_open", "rq_pending_open", "rq_open", "rq_retry_open")
    _REMAINING = ("remaining_cx", "remaining_pending", "remaining_rq", "remaining_retries")

    def __init__(self, scope: Scope, track_remaining: bool) -> None:
        self.open = [scope.gauge(n) for n in self._OPEN]
        self.remaining = [scope.gauge(n) for n in self._REMAINING] if track_remaining else []
        scope.gauge("cx_pool_open")  # one pool per host here: never saturated, exported for parity

    def update(self, *used_and_limit: tuple[int, int]) -> None:
        for i, (used, limit) in enumerate(used_and_limit):
            self.open[i].set(1 if used >= limit else 0)
            if self.remaining:
                self.remaining[i].set(max(0, limit - used))


# ============================================================================================ streams
class UpstreamStream:
    """One request/response on an upstream connection (created by ``UpstreamCluster.open_stream``)."""

    __slots__ = (
        "_body",
        "_buffered",
        "_cluster",
        "_done",
        "_error",
        "_headers",
        "_headers_read",
        "_request_ended",
        "_response_ended",
        "_start",
        "_status",
        "_trailers",
        "_waiter",
        "host",
        "stream_id",
    )

    def __init__(self, cluster: UpstreamCluster, host: Host, stream_id: int) -> None:
        self.host = host
        self.stream_id = stream_id
        self._cluster = cluster
        self._headers: Headers | None = None
        self._headers_read = False
        self._status = 0
        self._body: collections.deque[tuple[bytes, int]] = collections.deque()
        self._buffered = 0
        self._trailers: Headers | None = None
        self._response_ended = False
        self._request_ended = False
        self._error: UpstreamError | None = None
        self._done = False
        self._waiter: asyncio.Future[None] | None = None
        self._start = asyncio.get_running_loop().time()
        host.rq_active += 1
        host.rq_total += 1
        cluster._stats.rq_total.inc()
        cluster._stats.rq_active.inc()
        cluster._rq_active += 1

    # -- public API ------------------------------------------------------------------------------
    async def send_data(self, data: bytes, end_stream: bool) -> None:
        """Send a body chunk; waits while the peer's flow control or our write buffer is full."""
        raise NotImplementedError

    async def send_trailers(self, trailers: Headers) -> None:
        """Send request trailers (ends the request)."""
        raise NotImplementedError

    async def read_headers(self) -> Headers:
        """The final response headers (with ``:status``); raises ``UpstreamError`` on failure."""
        while self._headers is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        self._headers_read = True
        return self._headers

    async def read_body(self) -> bytes | Headers | None:
        """Next body chunk, or the trailers (a ``Headers``; the end), or None at the end of the body."""
        while True:
            if self._body:
                data, flow = self._body.popleft()
                self._buffered -= len(data)
                self._consumed(len(data), flow)
                return data
            if self._trailers is not None:
                trailers, self._trailers = self._trailers, None
                return trailers
            if self._response_ended:
                return None
            if self._error is not None:
                raise self._error
            await self._wait()

    def reset(self) -> None:
        """Abandon the stream (HTTP/2 RST_STREAM CANCEL; HTTP/1.1 closes the connection). Idempotent."""
        raise NotImplementedError

    @property
    def response_complete(self) -> bool:
        """The response ended with its headers: no body or trailers will follow."""
        return self._response_ended and not self._body and self._trailers is None

    # -- for the connections ---------------------------------------------------------------------
    async def _wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiter = fut
        try:
            await fut
        finally:
            self._waiter = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _consumed(self, nbytes: int, flow: int) -> None:
        """The caller took a chunk: return flow-control credit (overridden)."""

    def _on_headers(self, headers: Headers, end_stream: bool) -> None:
        if self._headers is not None:  # a second HEADERS without END_STREAM is trailers in disguise
            return
        status_raw = headers.get(b":status") or b"0"
        try:
            self._status = int(status_raw)
        except ValueError:
            self._status = 0
        self._headers = headers
        cluster = self._cluster
        cluster._stats.response_code(self._status)
        if cluster.outlier is not None:
            cluster.outlier.report_http(self.host, self._status, asyncio.get_running_loop().time())
        hc = cluster.health_checker
        if hc is not None and b"x-envoy-immediate-health-check-fail" in headers:
            hc.report_immediate_failure(self.host)  # the upstream asks to be taken out now (passive)
        if end_stream:
            self._on_end()
        self._wake()

    def _on_data(self, data: bytes, flow: int, end_stream: bool) -> None:
        if data or flow:
            self._body.append((data, flow))
            self._buffered += len(data)
        if end_stream:
            self._on_end()
        self._wake()

    def _on_trailers(self, trailers: Headers) -> None:
        self._trailers = trailers
        self._on_end()
        self._wake()

    def _on_end(self) -> None:
        if self._response_ended:
            return
        self._response_ended = True
        self._finish(success=self._status < 500)

    def _fail(self, error: UpstreamError, *, by_caller: bool = False) -> None:
        """The stream died (reset, connection lost): wake the reader with ``error``. Only a failure the
        upstream caused (not the caller's own reset) counts against the host in outlier detection."""
        if self._response_ended or self._error is not None:
            return
        self._error = error
        self._finish(success=False)
        if not by_caller and error.kind in ("reset", "protocol-error"):
            self._cluster._report_local(self.host, "connect_failed")  # as Envoy's router reports resets
        self._wake()

    def _finish(self, success: bool) -> None:
        if self._done:
            return
        self._done = True
        h = self.host
        h.rq_active -= 1
        st = self._cluster._stats
        st.rq_active.dec()
        self._cluster._rq_active -= 1
        if success and self._error is None:
            h.rq_success += 1
        else:
            h.rq_error += 1
        if self._response_ended:
            st.rq_time.record((asyncio.get_running_loop().time() - self._start) * 1000.0)

    def __repr__(self) -> str:
        state = (
            "error"
            if self._error
            else "done"
            if self._response_ended
            else "headers"
            if self._headers is not None
            else "waiting"
        )
        return f"<{type(self).__name__} {self.stream_id} to {self.host.address_text} {state}>"


class _H1Stream(UpstreamStream):
    __slots__ = ("_conn",)

    def __init__(self, cluster: UpstreamCluster, host: Host, conn: _H1Connection, stream_id: int) -> None:
        super().__init__(cluster, host, stream_id)
        self._conn = conn

    async def send_data(self, data: bytes, end_stream: bool) -> None:
        if self._request_ended:
            return
        if self._error is not None:
            raise self._error
        conn = self._conn
        if self._response_ended or conn.stream is not self:  # early response: connection closing; drop
            self._request_ended = end_stream
            return
        try:
            conn.codec.send_data(data, end_stream)
        except CodecError as e:
            self._local_protocol_error(e)
        self._request_ended = end_stream
        conn.flush()
        await conn.drain()
        if self._error is not None:
            raise self._error
        if end_stream:
            conn.request_done()

    async def send_trailers(self, trailers: Headers) -> None:
        if self._request_ended:
            return
        if self._error is not None:
            raise self._error
        if self._response_ended or self._conn.stream is not self:
            self._request_ended = True
            return
        try:
            self._conn.codec.send_trailers(trailers)
        except CodecError as e:
            self._local_protocol_error(e)
        self._request_ended = True
        self._conn.flush()
        await self._conn.drain()
        self._conn.request_done()

    def _local_protocol_error(self, e: CodecError) -> None:
        err = UpstreamError("protocol-error", str(e))
        self._conn.close(local=True)
        self._fail(err)
        raise err

    def _consumed(self, nbytes: int, flow: int) -> None:
        if self._conn.stream is self:
            self._conn.consumed(self._buffered)

    def reset(self) -> None:
        conn = self._conn
        if conn.stream is not self:
            return  # already released to the pool (complete) or already reset
        if not self._done:
            self._cluster._stats.rq_tx_reset.inc()
        self._fail(UpstreamError("reset", "reset by the caller"), by_caller=True)
        self._request_ended = True
        conn.stream = None
        conn.close(local=True)


class _H2Stream(UpstreamStream):
    __slots__ = ("_conn", "_reissued", "_replay", "_reset_sent", "_unacked")

    def __init__(self, cluster: UpstreamCluster, host: Host, conn: _H2Connection, stream_id: int) -> None:
        super().__init__(cluster, host, stream_id)
        self._conn = conn
        self._reset_sent = False
        self._unacked = 0
        self._replay: Headers | None = None
        """A headers-only request, kept so a refused (never processed) stream can be sent again."""
        self._reissued = 0

    def _can_reissue(self) -> bool:
        return (
            self._replay is not None
            and self._reissued < _MAX_REISSUE
            and self._headers is None
            and self._error is None
            and not self._reset_sent
        )

    async def _reissue(self) -> None:
        """Send a refused headers-only request again on a connection that takes it (RFC 9113 8.7)."""
        assert self._replay is not None
        self._reissued += 1
        pool = self._conn.pool
        try:
            conn = await pool._h2_connection()
            if self._reset_sent:
                return
            sid = conn.codec.send_headers(self._replay, end_stream=True)
        except UpstreamError as e:
            self._fail(e)
            return
        except CodecError as e:
            self._fail(UpstreamError("protocol-error", str(e)))
            return
        self._cluster._stats.rq_reissued.inc()
        self._conn = conn
        self.stream_id = sid
        conn.cancel_idle_timer()
        conn.streams[sid] = self
        conn.flush()

    def _on_data(self, data: bytes, flow: int, end_stream: bool) -> None:
        self._unacked += flow
        if flow and not data:  # padding only: hand the credit straight back
            self._conn.acknowledge(self.stream_id, flow)
            self._unacked -= flow
            flow = 0
        super()._on_data(data, flow, end_stream)

    def _consumed(self, nbytes: int, flow: int) -> None:
        if flow:
            self._unacked -= flow
            self._conn.acknowledge(self.stream_id, flow)

    async def send_data(self, data: bytes, end_stream: bool) -> None:
        if self._request_ended:
            return
        conn = self._conn
        view = data
        while True:
            if self._error is not None:
                raise self._error
            if self._reset_sent:
                return
            if self.stream_id not in conn.streams and self._response_ended:
                self._request_ended = True  # answered and reset/closed by the peer: drop the rest
                return
            try:
                n = conn.codec.send_data(self.stream_id, view, end_stream)
            except CodecError:
                if self._response_ended:  # peer closed its side after answering (RFC 9113 8.1)
                    self._request_ended = True
                    return
                raise UpstreamError("reset", "stream closed while sending") from None
            conn.flush()
            if n == len(view):
                break
            view = view[n:]
            await conn.wait_window()
        self._request_ended = end_stream
        await conn.drain()
        if self._error is not None:
            raise self._error
        conn.maybe_release(self)

    async def send_trailers(self, trailers: Headers) -> None:
        if self._request_ended:
            return
        if self._error is not None:
            raise self._error
        if self._reset_sent:
            return
        try:
            self._conn.codec.send_trailers(self.stream_id, trailers)
        except CodecError:
            if not self._response_ended:
                raise UpstreamError("reset", "stream closed while sending trailers") from None
        self._request_ended = True
        self._conn.flush()
        await self._conn.drain()
        self._conn.maybe_release(self)

    def reset(self) -> None:
        if self._reset_sent or (self._response_ended and self._request_ended):
            self._release_credit()
            return
        self._reset_sent = True
        if not self._done:
            self._cluster._stats.rq_tx_reset.inc()
        self._fail(UpstreamError("reset", "reset by the caller"), by_caller=True)
        conn = self._conn
        conn.codec.reset_stream(self.stream_id, CANCEL)
        self._release_credit()
        conn.flush()
        conn.forget(self.stream_id)

    def _release_credit(self, keep_body: bool = False) -> None:
        """Unread buffered data still holds connection window: give it back when the stream dies.

        ``keep_body``: the response was complete before the reset (a server may answer and then reset the
        request side, RFC 9113 section 8.1): the reader still gets the buffered body, only its credit is
        returned now.
        """
        if self._unacked:
            self._conn.acknowledge(self.stream_id, self._unacked)
            self._unacked = 0
        if keep_body:
            self._body = collections.deque((data, 0) for data, _ in self._body)
            return
        self._body.clear()
        self._buffered = 0


# ======================================================================================== connections
class _ConnectionBase(asyncio.Protocol):
    """What both connection kinds share: transport, write backpressure, stats, pool membership."""

    protocol_name = ""

    def __init__(self, pool: _HostPool) -> None:
        self.pool = pool
        self.stats = pool.cluster._stats
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._local_close = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._idle_handle: asyncio.TimerHandle | None = None
        self.connected = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Resolved when the transport is gone (``connection_lost``)."""
        self._slot = True
        """Holds one of the cluster's ``max_connections`` slots (given back at close, exactly once)."""
        pool.cluster._cx_count += 1

    def free_slot(self) -> None:
        if self._slot:
            self._slot = False
            cluster = self.pool.cluster
            cluster._cx_count -= 1
            cluster.wake_waiters()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        while self._write_paused and not self.closed:
            fut = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.closed:
            self.stats.cx_tx_bytes_total.inc(len(data))
            self.transport.write(data)

    def close(self, *, local: bool = True) -> None:
        if self.closed:
            return
        self._local_close = local
        self.cancel_idle_timer()
        self.free_slot()
        if self.transport is not None:
            self.transport.close()
        else:
            self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        self.cancel_idle_timer()
        self.free_slot()
        self._wake_drain()
        if self.connected:
            self.connected = False
            self.pool.host.cx_active -= 1
            self.stats.cx_active.dec()
            self.stats.cx_destroy.inc()
            (self.stats.cx_destroy_local if self._local_close else self.stats.cx_destroy_remote).inc()
        self._lost(exc, was_closed)
        self.pool.remove(self)
        if not self.lost.done():
            self.lost.set_result(None)

    def _lost(self, exc: Exception | None, was_closed: bool) -> None:
        raise NotImplementedError

    def mark_connected(self) -> None:
        self.connected = True
        self.pool.host.cx_active += 1
        self.pool.host.cx_total += 1
        self.stats.cx_active.inc()

    def start_idle_timer(self) -> None:
        self.cancel_idle_timer()
        timeout = self.pool.cluster.config.idle_timeout
        if timeout and timeout > 0:
            self._idle_handle = asyncio.get_running_loop().call_later(timeout, self._idle_expired)

    def cancel_idle_timer(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _idle_expired(self) -> None:
        self._idle_handle = None
        self.stats.cx_idle_timeout.inc()
        self.close(local=True)


class _H1Connection(_ConnectionBase):
    protocol_name = "HTTP/1.1"

    def __init__(self, pool: _HostPool) -> None:
        super().__init__(pool)
        self.codec = Http1ClientCodec(default_authority=pool.default_authority.encode("ascii", "replace"))
        self.stream: _H1Stream | None = None
        self._reading_paused = False
        self._high = max(16384, pool.cluster.config.per_connection_buffer_limit_bytes)

    def data_received(self, data: bytes) -> None:
        self.stats.cx_rx_bytes_total.inc(len(data))
        self._dispatch(self.codec.receive_data(data))

    def eof_received(self) -> bool | None:
        self._dispatch(self.codec.receive_data(b""))
        return False

    def _dispatch(self, events: list[Event]) -> None:
        s = self.stream
        for ev in events:
            if isinstance(ev, HeadersReceived):
                if s is not None:
                    s._on_headers(ev.headers, ev.end_stream)
            elif isinstance(ev, DataReceived):
                if s is not None:
                    s._on_data(ev.data, ev.flow_controlled_length, ev.end_stream)
                    if s._buffered > self._high and not self._reading_paused and self.transport is not None:
                        self._reading_paused = True
                        self.transport.pause_reading()
            elif isinstance(ev, TrailersReceived):
                if s is not None:
                    s._on_trailers(ev.trailers)
            elif isinstance(ev, StreamReset):
                if s is not None:
                    s._fail(UpstreamError("reset", "upstream closed the connection mid-response"))
                    self.stats.rq_rx_reset.inc()
            elif isinstance(ev, ProtocolFailure):
                self.stats.cx_protocol_error.inc()
                log.warning("upstream %s: %s", self.pool.host.address_text, ev.detail)
                if s is not None:
                    s._fail(UpstreamError("protocol-error", ev.detail))
                self.close(local=True)
                return
            elif isinstance(ev, ConnectionTerminated):
                if s is not None and not s._response_ended:
                    s._fail(UpstreamError("reset", "upstream closed the connection"))
                self.close(local=False)
                return
            elif isinstance(ev, DataAcknowledged):
                pass
        if s is not None and s._response_ended:
            self._response_done()

    def consumed(self, buffered: int) -> None:
        if self._reading_paused and buffered <= self._high // 2 and self.transport is not None:
            self._reading_paused = False
            if not self.closed:
                self.transport.resume_reading()

    def start(self, cluster: UpstreamCluster, headers: Headers, end_stream: bool) -> _H1Stream:
        self.cancel_idle_timer()
        sid = self.codec.send_headers(headers, end_stream)
        stream = _H1Stream(cluster, self.pool.host, self, sid)
        stream._request_ended = end_stream
        self.stream = stream
        self.flush()
        return stream

    def flush(self) -> None:
        self.write(self.codec.data_to_send())

    def request_done(self) -> None:
        s = self.stream
        if s is not None and s._response_ended:
            self._response_done()

    def _response_done(self) -> None:
        s = self.stream
        assert s is not None
        if not s._request_ended:
            # Early response (e.g. 413 while we upload): like Envoy, close rather than finish the upload.
            self.stream = None
            self.close(local=True)
            return
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()
        self._release()

    def _release(self) -> None:
        self.stream = None
        pool = self.pool
        if self.codec.reusable and not pool.draining and not self.closed:
            limit = pool.cluster.config.max_requests_per_connection
            if not limit or self.codec.requests < limit:
                self.codec.start_next_cycle()
                pool.release_h1(self)
                return
        self.close(local=True)

    def _lost(self, exc: Exception | None, was_closed: bool) -> None:
        s = self.stream
        if s is not None and not s._response_ended:
            if s._error is None and not was_closed:
                self.stats.rq_rx_reset.inc()
            s._fail(UpstreamError("reset", f"upstream connection lost: {exc or 'closed'}"))

    def __repr__(self) -> str:
        return f"<_H1Connection {self.pool.host.address_text} {self.codec!r}>"


class _H2Connection(_ConnectionBase):
    protocol_name = "HTTP/2"

    def __init__(self, pool: _HostPool) -> None:
        super().__init__(pool)
        cluster = pool.cluster
        self.codec = Http2ClientCodec(
            cluster.config.http2_protocol_options,
            default_scheme=b"https" if cluster.config.transport_socket is not None else b"http",
        )
        self.streams: dict[int, _H2Stream] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reserved = 0
        """Requests waiting for this connection to become ready."""
        self.establishing: asyncio.Task[None] | None = None
        self._window_waiters: list[asyncio.Future[None]] = []
        self._flush_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.codec.initiate()
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.stats.cx_rx_bytes_total.inc(len(data))
        events = self.codec.receive_data(data)
        for ev in events:
            self._dispatch(ev)
        self.flush()
        if self.codec.settings_received and not self.ready.done():
            self.ready.set_result(None)
        if self.codec.goaway_received and not self.streams:
            self.close(local=False)

    def _dispatch(self, ev: Event) -> None:
        if isinstance(ev, HeadersReceived):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s._on_headers(ev.headers, ev.end_stream)
                if ev.end_stream:
                    self.maybe_release(s)
        elif isinstance(ev, DataReceived):
            s = self.streams.get(ev.stream_id)
            if s is None:
                self.codec.acknowledge(ev.stream_id, ev.flow_controlled_length)
                return
            s._on_data(ev.data, ev.flow_controlled_length, ev.end_stream)
            if ev.end_stream:
                self.maybe_release(s)
        elif isinstance(ev, TrailersReceived):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s._on_trailers(ev.trailers)
                self.maybe_release(s)
        elif isinstance(ev, StreamReset):
            s = self.streams.pop(ev.stream_id, None)
            if s is not None:
                if ev.reason == "refused_stream" and s._can_reissue():
                    # Never processed (REFUSED_STREAM or beyond a GOAWAY): a headers-only request is sent
                    # again transparently, as a refused stream is always safe to retry.
                    task = asyncio.get_running_loop().create_task(s._reissue())
                    task.add_done_callback(_retrieve)
                    self._maybe_idle()
                    return
                if ev.reason == "refused_stream":
                    err = UpstreamError("refused-stream", f"stream refused (code {ev.error_code})")
                else:
                    err = UpstreamError("reset", f"upstream reset the stream (code {ev.error_code})")
                if not s._response_ended:
                    self.stats.rq_rx_reset.inc()
                s._fail(err)
                s._release_credit(keep_body=s._response_ended)
                self._wake_window()
                self._maybe_idle()
        elif isinstance(ev, WindowOpened):
            self._wake_window()
            self.pool.capacity_changed()
        elif isinstance(ev, ProtocolFailure):
            self.stats.cx_protocol_error.inc()
            log.warning("upstream %s: %s", self.pool.host.address_text, ev.detail)
            self._fail_all(UpstreamError("protocol-error", ev.detail))
            self.flush()
            self.close(local=True)
        elif isinstance(ev, ConnectionTerminated):
            log.info(
                "upstream %s sent GOAWAY (code %d, last stream %s)",
                self.pool.host.address_text,
                ev.error_code,
                ev.last_stream_id,
            )
            self.pool.capacity_changed()

    # -- used by streams -------------------------------------------------------------------------
    def flush(self) -> None:
        """Coalesce: streams started or fed in this loop iteration share one write."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_scheduled = False
        self.write(self.codec.data_to_send())

    def acknowledge(self, stream_id: int, n: int) -> None:
        if n > 0 and not self.closed:
            self.codec.acknowledge(stream_id, n)
            self.flush()

    async def wait_window(self) -> None:
        if self.closed:
            raise UpstreamError("reset", "upstream connection closed while waiting for flow-control window")
        fut = asyncio.get_running_loop().create_future()
        self._window_waiters.append(fut)
        await fut

    def _wake_window(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def maybe_release(self, s: _H2Stream) -> None:
        """Drop a stream whose both directions are over (its unread buffer stays with the stream object)."""
        if s._response_ended and s._request_ended:
            self.forget(s.stream_id)

    def forget(self, stream_id: int) -> None:
        if self.streams.pop(stream_id, None) is not None:
            self.codec.stream_finished(stream_id)
            self.pool.capacity_changed()
            self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self.streams:
            return
        if self.codec.goaway_received or self.pool.draining or self._exhausted():
            self.close(local=True)
        elif not self.closed:
            self.start_idle_timer()

    def _exhausted(self) -> bool:
        limit = self.pool.cluster.config.max_requests_per_connection
        return bool(limit) and self.codec.streams_opened >= limit

    @property
    def usable(self) -> bool:
        return (
            self.ready.done()
            and not self.ready.cancelled()
            and self.ready.exception() is None
            and not self.closed
            and self.codec.can_open_stream
            and not self._exhausted()
        )

    def start(self, cluster: UpstreamCluster, headers: Headers, end_stream: bool) -> _H2Stream:
        self.cancel_idle_timer()
        sid = self.codec.send_headers(headers, end_stream)
        stream = _H2Stream(cluster, self.pool.host, self, sid)
        stream._request_ended = end_stream
        if end_stream:
            stream._replay = headers
        self.streams[sid] = stream
        self.flush()
        return stream

    def _fail_all(self, err: UpstreamError) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        for s in streams:
            s._fail(err)
        self._wake_window()

    def _lost(self, exc: Exception | None, was_closed: bool) -> None:
        if not self.ready.done():
            self.ready.set_exception(
                UpstreamError("connect-failure", f"closed before HTTP/2 SETTINGS: {exc}")
            )
            self.ready.exception()  # mark retrieved: waiters may all have gone
        n_active = sum(1 for s in self.streams.values() if not s._response_ended)
        if n_active and not was_closed:
            self.stats.rq_rx_reset.inc(n_active)
        self._fail_all(UpstreamError("reset", f"upstream connection lost: {exc or 'closed'}"))

    def close(self, *, local: bool = True) -> None:
        if not self.closed and self.transport is not None and not self.codec.closed:
            self.codec.close()
            self.flush_now()
        super().close(local=local)

    def __repr__(self) -> str:
        return f"<_H2Connection {self.pool.host.address_text} streams={len(self.streams)} {self.codec!r}>"


# ============================================================================================ pools
class _HostPool:
    """The connections to one host."""

    def __init__(self, cluster: UpstreamCluster, host: Host) -> None:
        self.cluster = cluster
        self.host = host
        self.http2 = cluster.config.upstream_protocol == "HTTP2"
        self.idle: list[_H1Connection] = []
        self.busy: set[_H1Connection] = set()
        self.h2: list[_H2Connection] = []
        self.draining = False
        self.default_authority = host.hostname or host.address_text

    @property
    def connection_count(self) -> int:
        return len(self.idle) + len(self.busy) + len(self.h2)

    async def open_stream(self, headers: Headers, end_stream: bool) -> UpstreamStream:
        if self.http2:
            return await self._open_h2(headers, end_stream)
        return await self._open_h1(headers, end_stream)

    # -- HTTP/1.1 --------------------------------------------------------------------------------
    def _take_idle(self) -> _H1Connection | None:
        while self.idle:
            c = self.idle.pop()
            if not c.closed and c.codec.idle:
                c.cancel_idle_timer()
                return c
            c.close(local=True)
        return None

    async def _open_h1(self, headers: Headers, end_stream: bool) -> UpstreamStream:
        conn = self._take_idle()
        if conn is None:
            # Pending: no connection to use now. Wait for a new one, or for one to come back when the
            # cluster is at max_connections.
            cluster = self.cluster
            cluster.pending_begin()
            try:
                overflowed = False
                while conn is None:
                    if cluster.connection_room(self):
                        conn = _H1Connection(self)
                        await self._connect(conn)
                        break
                    if not overflowed:
                        overflowed = True
                        cluster._stats.cx_overflow.inc()
                    await cluster.wait_capacity()
                    conn = self._take_idle()
            finally:
                cluster.pending_end()
        self.busy.add(conn)
        try:
            return conn.start(self.cluster, headers, end_stream)
        except CodecError as e:
            conn.close(local=True)
            raise UpstreamError("protocol-error", str(e)) from e

    def release_h1(self, conn: _H1Connection) -> None:
        self.busy.discard(conn)
        if self.draining or len(self.idle) >= MAX_IDLE_PER_HOST:
            conn.close(local=True)
            return
        self.idle.append(conn)
        conn.start_idle_timer()
        self.cluster.wake_waiters()

    # -- HTTP/2 ----------------------------------------------------------------------------------
    async def _open_h2(self, headers: Headers, end_stream: bool) -> UpstreamStream:
        conn = await self._h2_connection()
        try:
            return conn.start(self.cluster, headers, end_stream)
        except CodecError as e:
            raise UpstreamError("protocol-error", str(e)) from e

    async def _h2_connection(self) -> _H2Connection:
        """A connection with a free stream slot now (waiting for or opening one as needed)."""
        for conn in self.h2:
            if conn.usable:
                return conn
        cluster = self.cluster
        cluster.pending_begin()
        try:
            return await self._h2_connection_pending()
        finally:
            cluster.pending_end()

    async def _h2_connection_pending(self) -> _H2Connection:
        attempts = 0
        overflowed = False
        while attempts < 8:
            for conn in self.h2:
                if conn.usable:
                    return conn
            pending = next(
                (
                    c
                    for c in self.h2
                    if c.establishing is not None
                    and not c.establishing.done()
                    and c.reserved < _ASSUMED_H2_STREAMS
                ),
                None,
            )
            if pending is not None and pending.establishing is not None:
                pending.reserved += 1
                try:
                    await asyncio.shield(pending.establishing)
                finally:
                    pending.reserved -= 1
                continue
            if not self.cluster.connection_room(self):
                if not overflowed:
                    overflowed = True
                    self.cluster._stats.cx_overflow.inc()
                await self.cluster.wait_capacity()
                continue
            # Establish in a task of its own: a caller cancelled meanwhile (per-try timeout) must not leave
            # a half-made connection that other requests wait on forever.
            attempts += 1
            conn = _H2Connection(self)
            self.h2.append(conn)
            conn.reserved += 1
            task = conn.establishing = asyncio.get_running_loop().create_task(self._establish(conn))
            task.add_done_callback(_retrieve)
            try:
                await asyncio.shield(task)
            finally:
                conn.reserved -= 1
        raise UpstreamError("overflow", "no HTTP/2 stream capacity after opening connections")

    async def _establish(self, conn: _H2Connection) -> None:
        try:
            await self._connect(conn)
            await self._wait_ready(conn)
        except UpstreamError as e:
            if not conn.ready.done():
                conn.ready.set_exception(e)
                conn.ready.exception()  # retrieved: every waiter may have gone
            conn.close(local=True)
            self.remove(conn)
            raise
        except BaseException:
            if not conn.ready.done():
                conn.ready.set_exception(UpstreamError("connect-failure", "connection setup aborted"))
                conn.ready.exception()
            conn.close(local=True)
            self.remove(conn)
            raise

    async def _wait_ready(self, conn: _H2Connection) -> None:
        remaining = max(0.001, self.cluster.config.connect_timeout)
        try:
            async with asyncio.timeout(remaining):
                await asyncio.shield(conn.ready)
        except TimeoutError:
            self.cluster._stats.cx_connect_timeout.inc()
            self.cluster._stats.cx_connect_fail.inc()
            self.host.cx_connect_fail += 1
            err = UpstreamError("connect-timeout", "no HTTP/2 SETTINGS from upstream in time")
            if not conn.ready.done():
                conn.ready.set_exception(err)
                conn.ready.exception()
            conn.close(local=True)
            raise err from None

    def capacity_changed(self) -> None:
        """A stream ended or the peer's limits changed: requests waiting at max_connections look again."""
        self.cluster.wake_waiters()

    # -- connecting ------------------------------------------------------------------------------
    async def _connect(self, conn: _ConnectionBase) -> None:
        cluster = self.cluster
        cfg = cluster.config
        st = cluster._stats
        loop = asyncio.get_running_loop()
        sslctx: ssl.SSLContext | None = None
        server_hostname: str | None = None
        tls_cfg = cfg.transport_socket
        if tls_cfg is not None:
            sslctx = cluster.ssl_context()
            server_hostname = tls_cfg.sni or None
        ip, port = self.host.address
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                await loop.create_connection(
                    lambda: conn,
                    ip,
                    port,
                    ssl=sslctx,
                    server_hostname=server_hostname if sslctx is not None else None,
                    ssl_handshake_timeout=cfg.connect_timeout if sslctx is not None else None,
                )
        except TimeoutError:
            self._connect_failed(conn)
            st.cx_connect_timeout.inc()
            cluster._report_local(self.host, "timeout")
            raise UpstreamError("connect-timeout", f"connect to {self.host.address_text} timed out") from None
        except (OSError, ssl.SSLError) as e:
            self._connect_failed(conn)
            cluster._report_local(self.host, "connect_failed")
            raise UpstreamError("connect-failure", f"connect to {self.host.address_text}: {e}") from None
        if sslctx is not None and isinstance(conn, _H2Connection):
            assert conn.transport is not None
            sslobj = conn.transport.get_extra_info("ssl_object")
            chosen = sslobj.selected_alpn_protocol() if sslobj is not None else None
            if chosen not in (None, "h2"):
                conn.close(local=True)
                self._connect_failed(conn)
                raise UpstreamError(
                    "connect-failure", f"{self.host.address_text}: ALPN chose {chosen}, not h2"
                )
        if tls_cfg is not None and tls_cfg.common_tls_context.match_subject_alt_names:
            assert conn.transport is not None
            sslobj = conn.transport.get_extra_info("ssl_object")
            if not _tls.check_subject_alt_names(sslobj, tls_cfg.common_tls_context.match_subject_alt_names):
                conn.close(local=True)
                self._connect_failed(conn)
                raise UpstreamError("connect-failure", f"{self.host.address_text}: certificate SAN mismatch")
        st.cx_total.inc()
        (st.cx_http2_total if isinstance(conn, _H2Connection) else st.cx_http1_total).inc()
        conn.mark_connected()
        cluster._report_local(self.host, "connect_success")

    def _connect_failed(self, conn: _ConnectionBase) -> None:
        self.cluster._stats.cx_connect_fail.inc()
        self.host.cx_connect_fail += 1
        conn.closed = True
        conn.free_slot()
        self.remove(conn)

    # -- lifecycle -------------------------------------------------------------------------------
    def remove(self, conn: _ConnectionBase) -> None:
        if isinstance(conn, _H2Connection):
            with contextlib.suppress(ValueError):
                self.h2.remove(conn)
        elif isinstance(conn, _H1Connection):
            self.busy.discard(conn)
            with contextlib.suppress(ValueError):
                self.idle.remove(conn)

    def drain(self) -> None:
        """No new streams; close idle connections now and busy ones when their streams end."""
        self.draining = True
        for c in list(self.idle):
            c.close(local=True)
        self.idle.clear()
        for h2c in list(self.h2):
            if not h2c.streams:
                h2c.close(local=True)

    def connections(self) -> list[_ConnectionBase]:
        return [*self.idle, *self.busy, *self.h2]

    def close_all(self) -> None:
        self.draining = True
        for c in list(self.idle) + list(self.busy) + list(self.h2):
            if isinstance(c, _H2Connection) and c.establishing is not None and not c.establishing.done():
                c.establishing.cancel()
            c.close(local=True)

    def __repr__(self) -> str:
        return (
            f"<_HostPool {self.host.address_text} {'h2' if self.http2 else 'h1'} idle={len(self.idle)}"
            f" busy={len(self.busy)} h2={len(self.h2)}{' draining' if self.draining else ''}>"
        )


# ============================================================================================ clusters
class UpstreamCluster:
    """The runtime of one configured cluster: hosts, load balancer, pools, stats."""

    keeps_mqtt_metadata = False
    """An MQTT broker cluster (``io/mqtt_upstream``) sets it: the ``x-microenvoy-mqtt-*`` metadata of a
    bridged message reaches it, so it publishes with the message's topic, QoS and retain flag."""

    def __init__(self, config: Cluster, stats: Store, *, random: _random.Random | None = None) -> None:
        self.name = config.name
        self.config = config
        self.stats: Scope = stats.scope(f"cluster.{config.name}.")
        self._stats = _ClusterStats(self.stats)
        self._random = random if random is not None else _random.Random()
        self.lb: LoadBalancer = make_lb(config.lb_policy, config.lb_config, rng=self._random)
        self.outlier: OutlierDetector | None = None
        if config.outlier_detection is not None:
            from microenvoy.upstream.outlier import OutlierDetector

            self.outlier = OutlierDetector(
                config.outlier_detection,
                self.stats.scope("outlier_detection."),
                self._random,
                self.hosts_changed,
            )
        self.health_checker: HealthChecker | None = None
        self._outlier_timer: asyncio.TimerHandle | None = None
        self._hc_stop: asyncio.Task[None] | None = None
        self.warmed: asyncio.Future[None] | None = None
        """Set by ``start()``: done when the cluster may serve (its first health-check round is over)."""
        self.hosts: list[Host] = []
        self._host_set: frozenset[Host] = frozenset()
        self._pools: dict[Host, _HostPool] = {}
        self._old_pools: list[_HostPool] = []
        self._rq_active = 0
        self._ssl: ssl.SSLContext | None = None
        self.client_certificate: str | None = None
        """A PEM file (certificate chain + key) loaded on top of the configured TLS context: the node
        identity (``io/xds_identity``) of the xDS clusters; changed with ``reload_tls``."""
        self.draining = False
        # Circuit breakers (DEFAULT priority: routes have no other).
        self.thresholds = next((t for t in config.circuit_breakers if t.priority == "DEFAULT"), Thresholds())
        self.max_requests = self.thresholds.max_requests
        self._pending = 0
        self._retries_active = 0
        self._cx_count = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._store = stats
        self._cb = _BreakerGauges(
            self.stats.scope("circuit_breakers.default."), self.thresholds.track_remaining
        )
        self._lb_gauges = [
            (self.stats.gauge(f"{prefix}.{attr}"), attr)
            for prefix, attr in _LB_GAUGES
            if prefix == {"RING_HASH": "ring_hash_lb", "MAGLEV": "maglev_lb"}.get(config.lb_policy)
        ]
        stats.add_refresher(self._refresh_gauges)
        if config.type != "STRICT_DNS":
            self.set_hosts(
                [
                    Host((ep.address.address, ep.address.port_value), ep.load_balancing_weight, ep.hostname)
                    for ep in config.endpoints
                ]
            )
        else:
            self._update_membership()

    # -- hosts -----------------------------------------------------------------------------------
    def start(self) -> asyncio.Future[None]:
        """Start health checking and outlier analysis (needs the loop); returns ``warmed``."""
        loop = asyncio.get_running_loop()
        if self.warmed is not None:
            return self.warmed
        if self.config.health_checks:
            from microenvoy.io.health_check import HealthChecker

            self.health_checker = HealthChecker(
                self,
                self.config.health_checks,
                self.hosts_changed,
                self._random,
                on_check=self._health_checked,
            )
            self.health_checker.start()
            self.warmed = self.health_checker.first_round
        else:
            self.warmed = loop.create_future()
            self.warmed.set_result(None)
        if self.outlier is not None:
            self._outlier_timer = loop.call_later(self.outlier.config.interval, self._outlier_tick)
        return self.warmed

    def _outlier_tick(self) -> None:
        assert self.outlier is not None
        loop = asyncio.get_running_loop()
        self.outlier.tick(loop.time())
        if not self.draining:
            self._outlier_timer = loop.call_later(self.outlier.config.interval, self._outlier_tick)

    def _health_checked(self, host: Host, passed: bool) -> None:
        """A finished active check: a pass un-ejects an outlier (Envoy default behaviour)."""
        if self.outlier is not None:
            self.outlier.report_health_check(host, passed, asyncio.get_running_loop().time())

    def hosts_changed(self) -> None:
        """Membership, weight, health or ejection changed: balancers rebuild, gauges follow."""
        self.lb.hosts_changed()
        self._update_membership()

    def stop_checks(self) -> None:
        """No more outlier analysis or health checks (the cluster was replaced or removed)."""
        if self._outlier_timer is not None:
            self._outlier_timer.cancel()
            self._outlier_timer = None
        if self.outlier is not None:
            self.outlier.close()  # its ejections stop counting in the shared gauges
        if self.health_checker is not None and self._hc_stop is None:
            self._hc_stop = asyncio.get_running_loop().create_task(self.health_checker.stop())

    async def stop(self) -> None:
        self.stop_checks()
        if self._hc_stop is not None:
            await self._hc_stop

    # -- outlier detection inputs ----------------------------------------------------------------
    def report_timeout(self, host: Host) -> None:
        """The router gave up waiting for ``host`` (per-try or route timeout)."""
        if self.outlier is not None:
            self.outlier.report_local(host, "timeout", asyncio.get_running_loop().time())

    def _report_local(self, host: Host, result: str) -> None:
        if self.outlier is not None:
            self.outlier.report_local(host, result, asyncio.get_running_loop().time())

    def set_hosts(self, hosts: Sequence[Host]) -> None:
        """Replace the host set; hosts that left have their pools drained."""
        keep = set(hosts)
        for h, pool in list(self._pools.items()):
            if h not in keep:
                pool.drain()
                del self._pools[h]
                if pool.connection_count:
                    self._old_pools.append(pool)
        self.hosts = list(hosts)
        self._host_set = frozenset(self.hosts)
        if self.outlier is not None:
            self.outlier.hosts_changed(self.hosts)
        if self.health_checker is not None:
            self.health_checker.hosts_changed()
        self.hosts_changed()

    def _update_membership(self) -> None:
        self._stats.membership_total.set(len(self.hosts))
        self._stats.membership_healthy.set(sum(1 for h in self.hosts if h.healthy))
        self._stats.membership_degraded.set(0)
        self._stats.membership_excluded.set(sum(1 for h in self.hosts if h.ejected))

    def choose_host(self, hash_key: int | None = None) -> Host | None:
        """Load balancer pick (``hash_key`` from the route's hash_policy, for RING_HASH and MAGLEV); None
        when the cluster has no host (the router answers 503 UH)."""
        before = self.lb.panic_total
        host = self.lb.choose(self.hosts, hash_key)
        if self.lb.panic_total != before:
            self._stats.lb_healthy_panic.inc(self.lb.panic_total - before)
        return host

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            tls_cfg = self.config.transport_socket
            assert tls_cfg is not None
            alpn = ["h2"] if self.config.upstream_protocol == "HTTP2" else ["http/1.1"]
            ctx = _tls.client_context(tls_cfg, alpn)
            if self.client_certificate is not None:
                ctx.load_cert_chain(self.client_certificate)
            self._ssl = ctx
        return self._ssl

    def reload_tls(self, client_certificate: str | None) -> None:
        """New connections use ``client_certificate`` (read again at the next connect); pooled connections
        drain (streams in flight finish on them)."""
        self.client_certificate = client_certificate
        self._ssl = None
        for host, pool in list(self._pools.items()):
            pool.drain()
            del self._pools[host]
            if pool.connection_count:
                self._old_pools.append(pool)

    # -- streams ---------------------------------------------------------------------------------
    async def open_stream(self, host: Host, headers: Headers, *, end_stream: bool) -> UpstreamStream:
        """Send request ``headers`` to ``host`` over a pooled connection; raises ``UpstreamError``."""
        if self._rq_active + self._pending >= self.max_requests:
            self._stats.rq_pending_overflow.inc()
            raise UpstreamError(
                "overflow", f"cluster {self.name}: max_requests ({self.max_requests}) reached"
            )
        pool = self._pools.get(host)
        if pool is None:
            if self.draining:
                raise UpstreamError("connect-failure", f"cluster {self.name} was removed")
            if host not in self._host_set:
                raise UpstreamError("connect-failure", f"{host.address_text} left cluster {self.name}")
            pool = self._pools[host] = _HostPool(self, host)
        return await pool.open_stream(headers, end_stream)

    # -- circuit breakers ------------------------------------------------------------------------
    def pending_begin(self) -> None:
        """A request starts waiting for a connection; beyond ``max_pending_requests`` -> ``overflow``."""
        if self._pending >= self.thresholds.max_pending_requests:
            self._stats.rq_pending_overflow.inc()
            raise UpstreamError(
                "overflow", f"cluster {self.name}: max_pending_requests ({self._pending}) reached"
            )
        self._pending += 1
        self._stats.rq_pending_total.inc()
        self._stats.rq_pending_active.inc()

    def pending_end(self) -> None:
        self._pending -= 1
        self._stats.rq_pending_active.dec()

    def connection_room(self, pool: _HostPool) -> bool:
        """May ``pool`` open another connection under ``max_connections``? At the limit an idle HTTP/1.1
        connection of another host is closed to make room (idle ones would otherwise hold slots forever)."""
        if self._cx_count < self.thresholds.max_connections:
            return True
        for other in self.pools():
            if other is not pool and other.idle:
                other.idle.pop().close(local=True)
                return self._cx_count < self.thresholds.max_connections
        return False

    async def wait_capacity(self) -> None:
        """Wait until a connection slot frees, an idle connection returns or an HTTP/2 stream ends."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)

    def wake_waiters(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def retry_limit(self) -> int:
        t = self.thresholds
        b = t.retry_budget
        if b is None:
            return t.max_retries
        return max(b.min_retry_concurrency, int((self._rq_active + self._pending) * b.budget_percent / 100.0))

    def retry_begin(self) -> bool:
        """Take a retry slot (``max_retries`` or the retry budget); False (counted) when none is free."""
        if self._retries_active >= self.retry_limit():
            self._stats.rq_retry_overflow.inc()
            return False
        self._retries_active += 1
        return True

    def retry_end(self) -> None:
        self._retries_active -= 1

    def _refresh_gauges(self) -> None:
        for gauge, attr in self._lb_gauges:
            gauge.set(int(getattr(self.lb, attr, 0)))
        t = self.thresholds
        self._cb.update(
            (self._cx_count, t.max_connections),
            (self._pending, t.max_pending_requests),
            (self._rq_active + self._pending, t.max_requests),
            (self._retries_active, self.retry_limit()),
        )

    def pools(self) -> list[_HostPool]:
        self._old_pools = [p for p in self._old_pools if p.connection_count]
        return list(self._pools.values()) + self._old_pools

    @property
    def connection_count(self) -> int:
        return sum(p.connection_count for p in self.pools())

    def drain(self) -> None:
        self.draining = True
        self._store.remove_refresher(self._refresh_gauges)  # a replacing cluster owns the names now
        for p in self.pools():
            p.drain()

    def close(self) -> None:
        self.draining = True
        self._store.remove_refresher(self._refresh_gauges)
        with contextlib.suppress(RuntimeError):  # no loop: nothing was started
            self.stop_checks()
        for p in self.pools():
            p.close_all()

    # -- STRICT_DNS ------------------------------------------------------------------------------
    async def resolve(self) -> None:
        """One DNS round: every endpoint name -> addresses; hosts are replaced as answers change."""
        loop = asyncio.get_running_loop()
        self._stats.update_attempt.inc()
        old = {(h.hostname, h.address): h for h in self.hosts}
        new_hosts: list[Host] = []
        failed = False
        for ep in self.config.endpoints:
            name, port = ep.address.address, ep.address.port_value
            try:
                infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            except (OSError, UnicodeError) as e:
                log.info("cluster %s: DNS lookup of %s failed: %s", self.name, name, e)
                failed = True
                new_hosts.extend(h for (hn, _a), h in old.items() if hn == name)
                continue
            for addr in _pick_family(infos, self.config.dns_lookup_family):
                key = (name, (addr, port))
                h = old.get(key)
                if h is None:
                    h = Host((addr, port), ep.load_balancing_weight, name)
                    old[key] = h
                elif h.weight != max(1, ep.load_balancing_weight):
                    h.weight = max(1, ep.load_balancing_weight)
                if h not in new_hosts:
                    new_hosts.append(h)
        (self._stats.update_failure if failed else self._stats.update_success).inc()
        if [id(h) for h in new_hosts] != [id(h) for h in self.hosts]:
            self.set_hosts(new_hosts)

    # -- admin -----------------------------------------------------------------------------------
    def admin_lines(self) -> list[str]:
        n = self.name
        t = self.thresholds
        out = [
            f"{n}::observability_name::{n}",
            f"{n}::default_priority::max_connections::{t.max_connections}",
            f"{n}::default_priority::max_pending_requests::{t.max_pending_requests}",
            f"{n}::default_priority::max_requests::{t.max_requests}",
            f"{n}::default_priority::max_retries::{t.max_retries}",
            f"{n}::added_via_api::false",
        ]
        od = self.outlier
        if od is not None:
            out.append(f"{n}::outlier::success_rate_average::{od.success_rate_average:g}")
            out.append(
                f"{n}::outlier::success_rate_ejection_threshold::{od.success_rate_ejection_threshold:g}"
            )
            out.append(
                f"{n}::outlier::local_origin_success_rate_average::{od.local_origin_success_rate_average:g}"
            )
            out.append(
                f"{n}::outlier::local_origin_success_rate_ejection_threshold::"
                f"{od.local_origin_success_rate_ejection_threshold:g}"
            )
        for h in self.hosts:
            a = f"{n}::{h.address_text}"
            for stat, value in _host_stats(h):
                out.append(f"{a}::{stat}::{value}")
            out.append(f"{a}::hostname::{h.hostname}")
            out.append(f"{a}::health_flags::{_health_flags(h)}")
            out.append(f"{a}::weight::{h.weight}")
            out.append(f"{a}::region::")
            out.append(f"{a}::zone::")
            out.append(f"{a}::sub_zone::")
            out.append(f"{a}::canary::false")
            out.append(f"{a}::priority::0")
            out.append(f"{a}::success_rate::{h.success_rate:g}")
            out.append(f"{a}::local_origin_success_rate::{h.local_origin_success_rate:g}")
        return out

    def admin_json(self) -> dict[str, Any]:
        statuses = []
        for h in self.hosts:
            statuses.append(
                {
                    "address": {"socket_address": {"address": h.address[0], "port_value": h.address[1]}},
                    "stats": [
                        {
                            "name": stat,
                            "value": str(value),
                            **({"type": "GAUGE"} if stat.endswith("active") else {}),
                        }
                        for stat, value in _host_stats(h)
                    ],
                    "health_status": {
                        "eds_health_status": "HEALTHY" if h.healthy else "UNHEALTHY",
                        **({"failed_outlier_check": True} if h.ejected else {}),
                        **({"failed_active_health_check": True} if not h.healthy else {}),
                    },
                    "weight": h.weight,
                    **({"success_rate": {"value": h.success_rate}} if h.success_rate >= 0 else {}),
                    **(
                        {"local_origin_success_rate": {"value": h.local_origin_success_rate}}
                        if h.local_origin_success_rate >= 0
                        else {}
                    ),
                    "hostname": h.hostname,
                    "locality": {},
                }
            )
        od = self.outlier
        extra: dict[str, Any] = {}
        if od is not None and od.success_rate_ejection_threshold >= 0:
            extra["success_rate_ejection_threshold"] = {"value": od.success_rate_ejection_threshold}
        if od is not None and od.local_origin_success_rate_ejection_threshold >= 0:
            extra["local_origin_success_rate_ejection_threshold"] = {
                "value": od.local_origin_success_rate_ejection_threshold
            }
        return {
            "name": self.name,
            "observability_name": self.name,
            "added_via_api": False,
            **extra,
            "circuit_breakers": {
                "thresholds": [
                    {
                        "priority": t.priority,
                        "max_connections": t.max_connections,
                        "max_pending_requests": t.max_pending_requests,
                        "max_requests": t.max_requests,
                        "max_retries": t.max_retries,
                    }
                    for t in (
                        self.thresholds,
                        *(x for x in self.config.circuit_breakers if x.priority != "DEFAULT"),
                    )
                ]
            },
            "host_statuses": statuses,
        }

    def __repr__(self) -> str:
        return (
            f"<UpstreamCluster {self.name} {self.config.type} hosts={len(self.hosts)}"
            f" rq_active={self._rq_active}{' draining' if self.draining else ''}>"
        )


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a connection-setup task's outcome as seen (its waiters may all have been cancelled)."""
    if not task.cancelled():
        task.exception()


def _host_stats(h: Host) -> list[tuple[str, int]]:
    return [
        ("cx_active", h.cx_active),
        ("cx_connect_fail", h.cx_connect_fail),
        ("cx_total", h.cx_total),
        ("rq_active", h.rq_active),
        ("rq_error", h.rq_error),
        ("rq_success", h.rq_success),
        ("rq_timeout", h.rq_timeout),
        ("rq_total", h.rq_total),
    ]


def _health_flags(h: Host) -> str:
    flags = []
    if not h.healthy:
        flags.append("/failed_active_hc")
    if h.ejected:
        flags.append("/failed_outlier_check")
    return "".join(flags) or "healthy"


def _pick_family(infos: list[Any], family: str) -> list[str]:
    """Addresses from ``getaddrinfo`` per Envoy's ``dns_lookup_family`` (order kept, duplicates dropped)."""
    v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
    v6 = [i[4][0] for i in infos if i[0] == socket.AF_INET6]
    if family == "V4_ONLY":
        chosen = v4
    elif family == "V6_ONLY":
        chosen = v6
    elif family == "V4_PREFERRED":
        chosen = v4 or v6
    elif family == "ALL":
        chosen = v4 + v6
    else:  # AUTO: IPv6 if there is any, else IPv4 (Envoy's AUTO)
        chosen = v6 or v4
    seen: list[str] = []
    for a in chosen:
        if a not in seen:
            seen.append(a)
    return seen


# ======================================================================================= the manager
class ClusterManager:
    """All clusters of the agent, swapped as a whole on config reload."""

    def __init__(
        self, clusters: Sequence[Cluster], stats: Store, *, random: _random.Random | None = None
    ) -> None:
        self._store = stats
        self._random = random
        self._clusters: dict[str, UpstreamCluster] = {}
        self._draining: list[UpstreamCluster] = []
        self._dns_tasks: dict[str, asyncio.Task[None]] = {}
        self._warming: dict[str, UpstreamCluster] = {}
        self._warm_tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._stop = asyncio.Event()
        for c in clusters:
            self._clusters[c.name] = self._make(c)

    def _make(self, config: Cluster) -> UpstreamCluster:
        if config.mqtt_broker is not None:  # an upstream MQTT broker (paho-mqtt), loaded only when used
            from microenvoy.io.mqtt_upstream import MqttBrokerCluster

            return MqttBrokerCluster(config, self._store, random=self._random, manager=self)
        return UpstreamCluster(config, self._store, random=self._random)

    async def start(self) -> None:
        """Start STRICT_DNS resolution and health checking; returns after every cluster's first DNS round
        and first health-check round (each bounded by a timeout), so listeners open onto warm clusters."""
        self._started = True
        firsts = [self._start_dns(c) for c in self._clusters.values() if c.config.type == "STRICT_DNS"]
        waits = [f for f in firsts if f is not None]
        if waits:
            await asyncio.wait(waits, timeout=_DNS_FIRST_ROUND_TIMEOUT)
        warming = [c.start() for c in self._clusters.values()]
        pending = [w for w in warming if not w.done()]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=_WARMING_TIMEOUT)
            if late:
                log.warning(
                    "%d cluster(s) still warming after %.0fs; serving anyway", len(late), _WARMING_TIMEOUT
                )

    def _start_dns(self, cluster: UpstreamCluster) -> asyncio.Future[None] | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        first: asyncio.Future[None] = loop.create_future()
        old = self._dns_tasks.pop(cluster.name, None)
        if old is not None:
            old.cancel()
        self._dns_tasks[cluster.name] = loop.create_task(
            self._dns_loop(cluster, first), name=f"dns:{cluster.name}"
        )
        return first

    async def _dns_loop(self, cluster: UpstreamCluster, first: asyncio.Future[None]) -> None:
        while not cluster.draining:
            try:
                await cluster.resolve()
            except Exception:  # never let one bad round end resolution for good
                log.exception("cluster %s: DNS refresh failed", cluster.name)
            if not first.done():
                first.set_result(None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.05, cluster.config.dns_refresh_rate))
            if self._stop.is_set():
                return

    def get(self, name: str) -> UpstreamCluster | None:
        return self._clusters.get(name)

    @property
    def clusters(self) -> dict[str, UpstreamCluster]:
        return dict(self._clusters)

    def update(
        self, clusters: Sequence[Cluster], *, delta: tuple[Sequence[Cluster], Sequence[str]] | None = None
    ) -> None:
        """Apply a new cluster list: equal configs keep their runtime; others are replaced or drained.

        ``delta`` = (changed configs, removed names): the caller knows that only these differ from the
        running set (a control-plane delta in a large config), so only they are looked at."""
        serving = self._clusters
        warming_all = self._warming
        if delta is not None:
            changed, removed = delta
            new = dict(serving)
            for name in removed:
                new.pop(name, None)
                if name in warming_all:
                    warming_all.pop(name).close()
            clusters = changed
        else:
            new = {}
            if warming_all:
                names = {c.name for c in clusters}
                for name in [n for n in warming_all if n not in names]:
                    warming_all.pop(name).close()
        for c in clusters:
            current = serving.get(c.name)
            if current is not None and current.config is c and c.name not in warming_all:
                new[c.name] = current  # the very same config object (a control-plane delta left it alone)
                continue
            warming = warming_all.get(c.name)
            if current is not None and (current.config is c or current.config == c):
                new[c.name] = current
                if warming is not None:  # back to the serving config: drop the one still warming
                    del self._warming[c.name]
                    warming.close()
                continue
            if warming is not None:
                if warming.config == c:
                    if current is not None:
                        new[c.name] = current
                    continue
                del self._warming[c.name]
                warming.close()
            fresh = self._make(c)
            dns_first = self._start_dns(fresh) if self._started and c.type == "STRICT_DNS" else None
            if self._started and (dns_first is not None or not fresh.start().done()):
                # Warming: the serving cluster (if any) keeps serving until the new one has its hosts
                # (first DNS round) and their first health-check round is over; a brand-new name is
                # unknown to routes until then (503 NC), as in Envoy.
                self._warming[c.name] = fresh
                if current is not None:
                    new[c.name] = current
                warm = asyncio.get_running_loop().create_task(self._warm(fresh, dns_first))
                self._warm_tasks.add(warm)
                warm.add_done_callback(self._warm_tasks.discard)
            else:
                new[c.name] = fresh
        looked_at = (
            self._clusters.items()
            if delta is None
            else [
                (n, self._clusters[n])
                for n in {*(c.name for c in delta[0]), *delta[1]}
                if n in self._clusters
            ]
        )
        for name, old in looked_at:
            if new.get(name) is not old:
                if name not in new or new[name].config.type != "STRICT_DNS":
                    task = self._dns_tasks.pop(name, None)  # (a replacing STRICT_DNS one cancelled it)
                    if task is not None:
                        task.cancel()
                self._retire(old)
        self._clusters = new
        self._draining = [c for c in self._draining if c.connection_count]

    async def _warm(self, cluster: UpstreamCluster, dns_first: asyncio.Future[None] | None) -> None:
        if dns_first is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(dns_first), _DNS_FIRST_ROUND_TIMEOUT)
            if cluster.draining:
                return  # replaced or removed meanwhile
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(cluster.start()), _WARMING_TIMEOUT)
        if self._warming.get(cluster.name) is not cluster:
            return  # replaced or removed meanwhile
        del self._warming[cluster.name]
        old = self._clusters.get(cluster.name)
        self._clusters = {**self._clusters, cluster.name: cluster}
        if old is not None:
            self._retire(old)
        log.info("cluster %s: warmed, now serving", cluster.name)

    def _retire(self, cluster: UpstreamCluster) -> None:
        cluster.drain()
        cluster.stop_checks()
        if cluster.connection_count:
            self._draining.append(cluster)

    async def close(self) -> None:
        """Stop DNS, close every connection and wait (briefly) until the transports are gone."""
        self._stop.set()
        for t in list(self._warm_tasks):
            t.cancel()
        for w in self._warming.values():
            w.close()
        self._warming.clear()
        tasks = list(self._dns_tasks.values())
        self._dns_tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        clusters = list(self._clusters.values()) + self._draining
        conns = [c for cl in clusters for p in cl.pools() for c in p.connections()]
        for cl in clusters:
            cl.close()
            await cl.stop()
        self._draining = []
        waits = [c.lost for c in conns if not c.lost.done()]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=_CLOSE_GRACE)
            for c in conns:
                if not c.lost.done() and c.transport is not None:
                    c.transport.abort()
            if pending:
                await asyncio.wait(pending, timeout=_CLOSE_GRACE)

    def admin_clusters_text(self) -> str:
        """Envoy's ``GET /clusters`` text."""
        lines: list[str] = []
        for name in sorted(self._clusters):
            lines.extend(self._clusters[name].admin_lines())
        return "\n".join(lines) + ("\n" if lines else "")

    def admin_clusters_json(self) -> dict[str, Any]:
        """Envoy's ``GET /clusters?format=json``."""
        return {"cluster_statuses": [self._clusters[n].admin_json() for n in sorted(self._clusters)]}

    def __repr__(self) -> str:
        return f"<ClusterManager clusters={len(self._clusters)} draining={len(self._draining)}>"
