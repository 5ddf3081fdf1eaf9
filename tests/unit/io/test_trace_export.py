"""Span exporters against a fake cluster and a temporary file: batching (size and timer), the bounded buffer,
failures counted and never raised, the final flush, and the request an OTLP export sends.

No ``__init__.py`` here on purpose (a ``tests/unit/io`` package would shadow the standard ``io``)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import threading
from collections.abc import Callable
from typing import Any

import pytest

from microenvoy.admin.stats import Store
from microenvoy.config.model import HeaderValueOption
from microenvoy.config.tracing import FileTracerConfig, OpenTelemetryConfig, OtlpHttpService, Tracing
from microenvoy.core.headers import Headers
from microenvoy.io.trace_export import FileSpanExporter, OtlpHttpExporter, SpanExporter, make_exporter
from microenvoy.io.upstream import UpstreamError
from microenvoy.tracing import Span

SERVICE = OtlpHttpService(
    cluster="otel",
    authority="collector:4318",
    path="/v1/traces",
    scheme="http",
    timeout=2.0,
    request_headers_to_add=(
        HeaderValueOption("authorization", "Bearer t"),
        HeaderValueOption("content-type", "text/plain"),  # the request's own fields are never replaced
    ),
)
CONFIG = OpenTelemetryConfig(http_service=SERVICE, service_name="edge")


def span(i: int, *, sampled: bool = True) -> Span:
    s = Span(0xABC, i, 0, 1 if sampled else 0, None, 1_000 + i)
    s.end_ns = 2_000 + i
    s.status_code = 200
    return s


async def until(cond: Callable[[], bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not cond():  # noqa: ASYNC110 - state changed by the exporter's background task
            await asyncio.sleep(0.002)


class FakeStream:
    def __init__(self, cluster: FakeCluster, headers: Headers) -> None:
        self.cluster = cluster
        self.headers = headers
        self.body = b""
        self.ended = False
        self.was_reset = False
        self._chunks: list[bytes | Headers | None] = [*cluster.response_body, None]

    async def send_data(self, data: bytes, end_stream: bool) -> None:
        self.body += data
        self.ended = end_stream

    async def read_headers(self) -> Headers:
        if self.cluster.gate is not None:
            await self.cluster.gate
        if self.cluster.fail_on_read is not None:
            raise self.cluster.fail_on_read
        return Headers([(b":status", str(self.cluster.status).encode())])

    async def read_body(self) -> bytes | Headers | None:
        return self._chunks.pop(0) if self._chunks else None

    def reset(self) -> None:
        self.was_reset = True


class FakeCluster:
    def __init__(self) -> None:
        self.status = 200
        self.host: object | None = "host-1"
        self.streams: list[FakeStream] = []
        self.fail_on_open: Exception | None = None
        self.fail_on_read: Exception | None = None
        self.gate: asyncio.Future[None] | None = None
        self.response_body: list[bytes | Headers] = [b"{}"]

    def choose_host(self) -> object | None:
        return self.host

    async def open_stream(self, host: object, headers: Headers, *, end_stream: bool) -> FakeStream:
        assert host == self.host
        assert end_stream is False
        if self.fail_on_open is not None:
            raise self.fail_on_open
        s = FakeStream(self, headers)
        self.streams.append(s)
        return s

    def spans(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for s in self.streams:
            doc = json.loads(s.body)
            out += doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
        return out


class Clusters:
    def __init__(self, cluster: FakeCluster | None) -> None:
        self.cluster = cluster

    def get(self, name: str) -> FakeCluster | None:
        return self.cluster if name == "otel" else None


def otlp(cluster: FakeCluster | None, store: Store, **kw: Any) -> OtlpHttpExporter:
    return OtlpHttpExporter(CONFIG, SERVICE, Clusters(cluster), store, **kw)


async def test_a_full_batch_is_posted_at_once() -> None:
    store, cluster = Store(), FakeCluster()
    exp = otlp(cluster, store, batch_size=3, flush_interval=3600)
    for i in range(1, 4):
        exp.submit(span(i))
    await until(lambda: store.value("tracing.opentelemetry.spans_sent") == 3)
    (stream,) = cluster.streams
    assert stream.ended
    h = stream.headers
    assert [(k, v) for k, v in h if k.startswith(b":")] == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"collector:4318"),
        (b":path", b"/v1/traces"),
    ]
    assert h.get_all(b"content-type") == [b"application/json"]
    assert h.get(b"content-length") == str(len(stream.body)).encode()
    assert h.get(b"authorization") == b"Bearer t"
    doc = json.loads(stream.body)
    assert doc["resourceSpans"][0]["resource"]["attributes"][0]["value"] == {"stringValue": "edge"}
    assert [s["spanId"] for s in cluster.spans()] == [f"{i:016x}" for i in (1, 2, 3)]
    assert store.value("tracing.opentelemetry.timer_flushed") == 0
    assert store.value("tracing.opentelemetry.spans_sampled") == 3
    await exp.close()


async def test_a_partial_batch_leaves_on_the_timer() -> None:
    store, cluster = Store(), FakeCluster()
    exp = otlp(cluster, store, batch_size=100, flush_interval=0.02)
    exp.submit(span(1))
    exp.submit(span(2))
    assert cluster.streams == []  # nothing on the request path
    await until(lambda: store.value("tracing.opentelemetry.spans_sent") == 2)
    assert store.value("tracing.opentelemetry.timer_flushed") == 1
    assert len(cluster.streams) == 1
    exp.submit(span(3))  # a new timer for the next batch
    await until(lambda: store.value("tracing.opentelemetry.spans_sent") == 3)
    assert store.value("tracing.opentelemetry.timer_flushed") == 2
    await exp.close()


async def test_unsampled_spans_are_not_exported() -> None:
    store, cluster = Store(), FakeCluster()
    exp = otlp(cluster, store, batch_size=1)
    exp.submit(span(1, sampled=False))
    await exp.close()
    assert cluster.streams == []
    assert store.value("tracing.opentelemetry.spans_sampled") == 0


async def test_the_buffer_is_bounded_and_drops_the_oldest() -> None:
    store, cluster = Store(), FakeCluster()
    loop = asyncio.get_running_loop()
    cluster.gate = loop.create_future()  # the collector does not answer yet
    exp = otlp(cluster, store, batch_size=2, max_pending=4, flush_interval=3600)
    exp.submit(span(1))
    exp.submit(span(2))  # batch 1 in flight
    await until(lambda: len(cluster.streams) == 1)
    for i in range(3, 13):
        exp.submit(span(i))  # 10 more; 4 fit
    assert store.value("tracing.opentelemetry.spans_dropped") == 6
    assert "pending=4 exporting" in repr(exp)
    cluster.gate.set_result(None)
    await until(lambda: store.value("tracing.opentelemetry.spans_sent") == 6)
    assert [int(s["spanId"], 16) for s in cluster.spans()] == [1, 2, 9, 10, 11, 12]
    await exp.close()


@pytest.mark.parametrize(
    "breakage",
    ["no-cluster", "no-host", "open-fails", "read-fails", "status-503", "status-0", "exporter-bug"],
)
async def test_failures_are_counted_never_raised(breakage: str) -> None:
    store, cluster = Store(), FakeCluster()
    exp = otlp(None if breakage == "no-cluster" else cluster, store, batch_size=1)
    if breakage == "no-host":
        cluster.host = None
    elif breakage == "open-fails":
        cluster.fail_on_open = UpstreamError("connect-failure", "refused")
    elif breakage == "read-fails":
        cluster.fail_on_read = UpstreamError("reset", "gone")
    elif breakage == "status-503":
        cluster.status = 503
    elif breakage == "status-0":
        cluster.status = 0
    elif breakage == "exporter-bug":
        cluster.fail_on_open = ZeroDivisionError("a bug")
    exp.submit(span(1))
    await until(lambda: store.value("tracing.opentelemetry.export_failed") == 1)
    exp.submit(span(2))  # exporting goes on after a failure
    await until(lambda: store.value("tracing.opentelemetry.export_failed") == 2)
    await exp.close()
    assert store.value("tracing.opentelemetry.spans_sent") == 0
    if breakage == "read-fails":
        assert all(s.was_reset for s in cluster.streams)


async def test_a_silent_collector_times_out_and_the_stream_is_reset() -> None:
    store, cluster = Store(), FakeCluster()
    cluster.gate = asyncio.get_running_loop().create_future()  # never answers
    service = OtlpHttpService("otel", "c", "/v1/traces", "http", timeout=0.05)
    exp = OtlpHttpExporter(CONFIG, service, Clusters(cluster), store, batch_size=1)
    exp.submit(span(1))
    await until(lambda: store.value("tracing.opentelemetry.export_failed") == 1)
    assert cluster.streams[0].was_reset
    await exp.close()


async def test_a_long_answer_is_not_read_to_the_end() -> None:
    store, cluster = Store(), FakeCluster()
    cluster.response_body = [b"x" * 40_000, b"y" * 40_000, b"z" * 40_000]
    exp = otlp(cluster, store, batch_size=1)
    exp.submit(span(1))
    await until(lambda: store.value("tracing.opentelemetry.spans_sent") == 1)
    assert cluster.streams[0].was_reset
    assert cluster.streams[0]._chunks == [b"z" * 40_000, None]
    await exp.close()


async def test_close_flushes_what_is_pending_and_later_spans_are_ignored() -> None:
    store, cluster = Store(), FakeCluster()
    cluster.response_body = [Headers([(b"grpc-status", b"0")])]  # trailers end the answer too
    exp = otlp(cluster, store, batch_size=2, flush_interval=3600)
    for i in range(5):
        exp.submit(span(i + 1))
    await exp.close()
    assert store.value("tracing.opentelemetry.spans_sent") == 5
    assert [int(s["spanId"], 16) for s in cluster.spans()] == [1, 2, 3, 4, 5]
    exp.submit(span(9))
    assert "pending=0" in repr(exp)


def test_submit_without_a_loop_waits_for_close() -> None:
    store, cluster = Store(), FakeCluster()
    exp = otlp(cluster, store, batch_size=100)
    exp.submit(span(1))
    assert "pending=1" in repr(exp)
    asyncio.run(exp.close())
    assert store.value("tracing.opentelemetry.spans_sent") == 1


async def test_the_base_class_needs_an_export() -> None:
    store = Store()
    exp = SpanExporter("x", store, batch_size=1)
    exp.submit(span(1))
    await until(lambda: store.value("tracing.x.export_failed") == 1)
    await exp.close()


# --------------------------------------------------------------------------------------- file sink
async def test_file_sink_writes_one_document_per_span_in_a_worker_thread(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "spans.jsonl"
    store = Store()
    exp = FileSpanExporter(FileTracerConfig(str(path), "dev-1"), store, batch_size=2, flush_interval=3600)
    threads: list[threading.Thread] = []
    write = exp._write

    def spy(data: str) -> None:
        threads.append(threading.current_thread())
        write(data)

    exp._write = spy  # type: ignore[method-assign]
    for i in range(3):
        exp.submit(span(i + 1))
    await until(lambda: store.value("tracing.file.spans_sent") == 2)
    await exp.close()
    assert store.value("tracing.file.spans_sent") == 3
    assert threads
    assert all(t is not threading.main_thread() for t in threads)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines, 1):
        doc = json.loads(line)
        (rs,) = doc["resourceSpans"]
        assert rs["resource"]["attributes"] == [{"key": "service.name", "value": {"stringValue": "dev-1"}}]
        (only,) = rs["scopeSpans"][0]["spans"]
        assert only["spanId"] == f"{i:016x}"


async def test_file_sink_write_errors_are_counted(tmp_path: pathlib.Path) -> None:
    store = Store()
    exp = FileSpanExporter(FileTracerConfig(str(tmp_path)), store, batch_size=1)  # a directory
    exp.submit(span(1))
    await until(lambda: store.value("tracing.file.export_failed") == 1)
    await exp.close()
    assert store.value("tracing.file.spans_sent") == 0


# --------------------------------------------------------------------------------------- make_exporter
def test_make_exporter() -> None:
    store, clusters = Store(), Clusters(FakeCluster())
    assert make_exporter(None, clusters, store) is None
    assert make_exporter(Tracing(), clusters, store) is None
    assert make_exporter(Tracing(provider=OpenTelemetryConfig()), clusters, store) is None
    assert isinstance(make_exporter(Tracing(provider=CONFIG), clusters, store), OtlpHttpExporter)
    assert isinstance(
        make_exporter(Tracing(provider=FileTracerConfig("/x")), clusters, store), FileSpanExporter
    )
