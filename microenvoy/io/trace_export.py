"""Span exporters: sampled spans leave the agent in batches, off the request path.

``make_exporter(tracing, clusters, stats)`` builds the exporter of an HTTP connection manager's ``tracing``
provider (None without one). The request path only calls ``exporter.submit(span)``: an append to a bounded
buffer (over ``max_pending`` the oldest span is dropped and counted). A batch leaves when ``batch_size``
spans are pending or ``flush_interval`` seconds after the first pending span, one export at a time, in a
background task; ``await exporter.close()`` flushes what is left.

* ``OtlpHttpExporter`` (``envoy.tracers.opentelemetry`` with ``http_service``): POSTs the OTLP JSON encoding
  of ``ExportTraceServiceRequest`` (``content-type: application/json``) through the agent's own cluster
  machinery (``UpstreamCluster.choose_host`` + ``open_stream``: the collector cluster's load balancing,
  TLS, pools and stats apply). A 2xx answer within ``http_uri.timeout`` is a success; anything else counts
  ``export_failed`` and the batch is dropped (never retried, never raised). No OpenTelemetry package is
  needed.
* ``FileSpanExporter`` (``microenvoy.tracers.file``): appends one OTLP JSON document per span, one per line
  (the line format of the OpenTelemetry Collector's file exporter, readable by its ``otlpjsonfile``
  receiver); the writes run in a worker thread so a slow disk never stalls the event loop.

Stats (``tracing.<provider>.``, ``<provider>`` being ``opentelemetry`` or ``file``; Envoy names its
OpenTelemetry tracer's ``tracing.opentelemetry.spans_sent`` and ``timer_flushed``):

* ``spans_sampled``: sampled spans handed to the exporter (unsampled ones are ignored);
* ``spans_sent``: spans in successful exports;
* ``spans_dropped``: spans lost because the buffer was full (the oldest go first);
* ``export_failed``: failed exports (connect failure, timeout, non-2xx, write error); their spans are lost;
* ``timer_flushed``: batches sent because ``flush_interval`` passed (not because the batch was full).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from typing import IO, Any, Protocol

from microenvoy.admin.stats import Store
from microenvoy.config.tracing import FileTracerConfig, OpenTelemetryConfig, OtlpHttpService, Tracing
from microenvoy.core.headers import Headers
from microenvoy.tracing import Span, otlp_request

__all__ = [
    "ClusterLookup",
    "FileSpanExporter",
    "OtlpHttpExporter",
    "SpanExporter",
    "make_exporter",
]

log = logging.getLogger("microenvoy.tracing")

MAX_RESPONSE_BODY = 64 * 1024
"""Bytes of a collector's answer we read (and discard) before giving up on the rest."""


class _Stream(Protocol):
    """What the OTLP exporter uses of ``microenvoy.io.upstream.UpstreamStream``."""

    async def send_data(self, data: bytes, end_stream: bool) -> None: ...
    async def read_headers(self) -> Headers: ...
    async def read_body(self) -> bytes | Headers | None: ...
    def reset(self) -> None: ...


class _Cluster(Protocol):
    """What the OTLP exporter uses of ``microenvoy.io.upstream.UpstreamCluster``."""

    def choose_host(self) -> Any: ...
    async def open_stream(self, host: Any, headers: Headers, *, end_stream: bool) -> _Stream: ...


class ClusterLookup(Protocol):
    """What the OTLP exporter needs of ``microenvoy.io.upstream.ClusterManager``."""

    def get(self, name: str) -> _Cluster | None: ...


class SpanExporter:
    """Bounded buffer + batching + one background export at a time; subclasses implement ``_export``."""

    def __init__(
        self,
        kind: str,
        stats: Store,
        *,
        max_pending: int = 2048,
        batch_size: int = 256,
        flush_interval: float = 1.0,
    ) -> None:
        self.kind = kind
        self.max_pending = max_pending
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._pending: collections.deque[Span] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        scope = stats.scope(f"tracing.{kind}.")
        self.spans_sampled = scope.counter("spans_sampled")
        self.spans_sent = scope.counter("spans_sent")
        self.spans_dropped = scope.counter("spans_dropped")
        self.export_failed = scope.counter("export_failed")
        self.timer_flushed = scope.counter("timer_flushed")

    def __repr__(self) -> str:
        busy = " exporting" if self._task is not None and not self._task.done() else ""
        return f"<{type(self).__name__} pending={len(self._pending)}{busy}>"

    # -- the request path --------------------------------------------------------------------------
    def submit(self, span: Span) -> None:
        """Queue a finished span (unsampled spans are ignored); never blocks, never raises."""
        if not span.flags & 1 or self._closed:
            return
        self.spans_sampled.inc()
        pending = self._pending
        if len(pending) >= self.max_pending:
            pending.popleft()
            self.spans_dropped.inc()
        pending.append(span)
        if len(pending) >= self.batch_size:
            self._start(timer=False)
        elif self._timer is None and (self._task is None or self._task.done()):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a synchronous caller): close() flushes
                return
            self._timer = loop.call_later(self.flush_interval, self._start, True)

    # -- flushing ---------------------------------------------------------------------------------
    def _start(self, timer: bool) -> None:
        if timer:
            self._timer = None
        if self._task is not None and not self._task.done():
            return  # the running export loop takes what is pending
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if timer:
            self.timer_flushed.inc()
        self._task = loop.create_task(self._drain(), name=f"trace-export:{self.kind}")

    async def _drain(self) -> None:
        while self._pending:
            n = min(self.batch_size, len(self._pending))
            batch = [self._pending.popleft() for _ in range(n)]
            try:
                ok = await self._export(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # an exporter bug must not end exporting (or reach the request path)
                log.exception("%s span export failed", self.kind)
                ok = False
            if ok:
                self.spans_sent.inc(len(batch))
            else:
                self.export_failed.inc()
            if not self._closed and len(self._pending) < self.batch_size:
                break  # a partial batch waits for the timer (or fills up)
        if self._pending and not self._closed and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self._start, True)

    async def _export(self, spans: list[Span]) -> bool:
        """Send one batch; True on success. Must not raise for peer or I/O failures."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop taking spans, export what is pending (each export bounded by its own timeout)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and not self._task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pending:
            self._task = asyncio.get_running_loop().create_task(self._drain())
            await self._task
        await self._close_sink()

    async def _close_sink(self) -> None:
        """Release the sink (file) after the final flush."""


class OtlpHttpExporter(SpanExporter):
    """OTLP/HTTP JSON export through one of the agent's clusters."""

    def __init__(
        self,
        config: OpenTelemetryConfig,
        service: OtlpHttpService,
        clusters: ClusterLookup,
        stats: Store,
        *,
        max_pending: int = 2048,
        batch_size: int = 256,
        flush_interval: float = 1.0,
    ) -> None:
        super().__init__(
            "opentelemetry",
            stats,
            max_pending=max_pending,
            batch_size=batch_size,
            flush_interval=flush_interval,
        )
        self.service = service
        self.service_name = config.service_name
        self.clusters = clusters
        extra = [
            (h.key.lower().encode("latin-1"), h.value.encode("utf-8")) for h in service.request_headers_to_add
        ]
        self._extra_headers = [kv for kv in extra if kv[0] not in _OWN_FIELDS]
        """``request_headers_to_add`` as literal fields (the request's own fields cannot be replaced)."""

    def _headers(self, length: int) -> Headers:
        s = self.service
        fields = [
            (b":method", b"POST"),
            (b":scheme", s.scheme.encode("ascii")),
            (b":authority", s.authority.encode("latin-1")),
            (b":path", s.path.encode("latin-1")),
            (b"content-type", b"application/json"),
            (b"content-length", str(length).encode("ascii")),
        ]
        fields.extend(self._extra_headers)
        return Headers(fields)

    async def _export(self, spans: list[Span]) -> bool:
        body = json.dumps(otlp_request(spans, self.service_name), separators=(",", ":")).encode("utf-8")
        cluster = self.clusters.get(self.service.cluster)
        if cluster is None:
            log.warning("trace export: cluster %r is not configured", self.service.cluster)
            return False
        host = cluster.choose_host()
        if host is None:
            log.info("trace export: cluster %s has no healthy host", self.service.cluster)
            return False
        try:
            async with asyncio.timeout(self.service.timeout):
                status = await self._post(cluster, host, body)
        except TimeoutError:
            log.info("trace export to cluster %s timed out", self.service.cluster)
            return False
        except Exception as exc:  # UpstreamError and anything the pool raises: counted, never raised
            log.info("trace export to cluster %s failed: %s", self.service.cluster, exc)
            return False
        if not 200 <= status < 300:
            log.info("trace export to cluster %s: collector answered %d", self.service.cluster, status)
            return False
        return True

    async def _post(self, cluster: _Cluster, host: Any, body: bytes) -> int:
        stream = await cluster.open_stream(host, self._headers(len(body)), end_stream=False)
        try:
            await stream.send_data(body, True)
            headers = await stream.read_headers()
            read = 0
            while read <= MAX_RESPONSE_BODY:
                item = await stream.read_body()
                if not isinstance(item, bytes):
                    break
                read += len(item)
            else:
                stream.reset()
        except BaseException:
            stream.reset()
            raise
        raw = headers.get(b":status") or b"0"
        return int(raw) if raw.isdigit() else 0


_OWN_FIELDS = frozenset({b":method", b":scheme", b":authority", b":path", b"content-type", b"content-length"})


class FileSpanExporter(SpanExporter):
    """One OTLP JSON document per span, one per line, appended to a file by a worker thread."""

    def __init__(
        self,
        config: FileTracerConfig,
        stats: Store,
        *,
        max_pending: int = 2048,
        batch_size: int = 256,
        flush_interval: float = 1.0,
    ) -> None:
        super().__init__(
            "file", stats, max_pending=max_pending, batch_size=batch_size, flush_interval=flush_interval
        )
        self.path = config.path
        self.service_name = config.service_name
        self._file: IO[str] | None = None

    async def _export(self, spans: list[Span]) -> bool:
        data = "".join(
            json.dumps(otlp_request((s,), self.service_name), separators=(",", ":")) + "\n" for s in spans
        )
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._write, data)
        except OSError as exc:
            log.warning("trace file %s: %s", self.path, exc)
            return False
        return True

    def _write(self, data: str) -> None:
        """In the worker thread: open (once) and append."""
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # kept open, closed in close()
        self._file.write(data)
        self._file.flush()

    async def _close_sink(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            await asyncio.get_running_loop().run_in_executor(None, f.close)


def make_exporter(tracing: Tracing | None, clusters: ClusterLookup, stats: Store) -> SpanExporter | None:
    """The exporter for an HCM's ``tracing`` provider, or None (no tracing, no provider, or an
    OpenTelemetry provider without ``http_service``: context propagation only)."""
    if tracing is None:
        return None
    p = tracing.provider
    if isinstance(p, FileTracerConfig):
        return FileSpanExporter(p, stats)
    if isinstance(p, OpenTelemetryConfig) and p.http_service is not None:
        return OtlpHttpExporter(p, p.http_service, clusters, stats)
    return None
