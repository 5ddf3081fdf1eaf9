"""OTLP/HTTP JSON export through a real ``UpstreamCluster`` to real collectors on loopback.

* An in-test HTTP/1.1 collector (h11 on asyncio, port 0) records every export request; its body must parse as
  an OTLP ``ExportTraceServiceRequest`` in the OTLP JSON encoding. The schema is checked with protobuf's own
  JSON parser against message descriptors built here with the field names and numbers of
  opentelemetry-proto (``trace/v1/trace.proto``, ``common/v1/common.proto``, ``resource/v1/resource.proto``,
  ``collector/trace/v1/trace_service.proto``); only ``trace_id``/``span_id``/``parent_span_id`` are declared
  as strings, because OTLP JSON encodes them as hex where protobuf JSON would use base64. Unknown fields,
  wrong types and non-integer enums are rejected by the parser.
* The HTTP/2 test server (h2c) as a collector: the export goes over the cluster's HTTP/2 pool too, and a 503
  answer is counted as a failed export.
* A refused connection is counted, never raised.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from peers.h2_server import H2Server

from microenvoy.admin.stats import Store
from microenvoy.config.model import Cluster, Endpoint, HeaderValueOption, SocketAddress
from microenvoy.config.tracing import OpenTelemetryConfig, OtlpHttpService, Tracing
from microenvoy.core.exchange import DownstreamInfo, Exchange
from microenvoy.core.headers import Headers
from microenvoy.io.trace_export import OtlpHttpExporter, make_exporter
from microenvoy.io.upstream import ClusterManager
from microenvoy.tracing import start_span

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


# ------------------------------------------------------------------------------------- the OTLP schema
def _otlp_request_class() -> Any:
    """``ExportTraceServiceRequest`` as a protobuf message class (descriptors built from the OTLP protos)."""
    F = descriptor_pb2.FieldDescriptorProto
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    fd = descriptor_pb2.FileDescriptorProto(name="otlp_subset.proto", package="otlp", syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> descriptor_pb2.DescriptorProto:
        m = fd.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)  # type: ignore[arg-type]
            if type_name:
                f.type_name = type_name
        return m

    S, B, I64, D, U32 = F.TYPE_STRING, F.TYPE_BOOL, F.TYPE_INT64, F.TYPE_DOUBLE, F.TYPE_UINT32
    F32, F64, MSG, ENUM = F.TYPE_FIXED32, F.TYPE_FIXED64, F.TYPE_MESSAGE, F.TYPE_ENUM
    any_value = message(
        "AnyValue",
        ("string_value", 1, S, opt, ""),
        ("bool_value", 2, B, opt, ""),
        ("int_value", 3, I64, opt, ""),
        ("double_value", 4, D, opt, ""),
    )
    any_value.oneof_decl.add(name="value")
    for f in any_value.field:
        f.oneof_index = 0
    message("KeyValue", ("key", 1, S, opt, ""), ("value", 2, MSG, opt, ".otlp.AnyValue"))
    message(
        "Resource",
        ("attributes", 1, MSG, rep, ".otlp.KeyValue"),
        ("dropped_attributes_count", 2, U32, opt, ""),
    )
    message(
        "InstrumentationScope",
        ("name", 1, S, opt, ""),
        ("version", 2, S, opt, ""),
        ("attributes", 3, MSG, rep, ".otlp.KeyValue"),
    )
    status = message("Status", ("message", 2, S, opt, ""), ("code", 3, ENUM, opt, ".otlp.Status.StatusCode"))
    codes = status.enum_type.add(name="StatusCode")
    for i, n in enumerate(["STATUS_CODE_UNSET", "STATUS_CODE_OK", "STATUS_CODE_ERROR"]):
        codes.value.add(name=n, number=i)
    span = message(
        "Span",
        ("trace_id", 1, S, opt, ""),  # bytes in the proto; hex strings in OTLP JSON
        ("span_id", 2, S, opt, ""),
        ("trace_state", 3, S, opt, ""),
        ("parent_span_id", 4, S, opt, ""),
        ("flags", 16, F32, opt, ""),
        ("name", 5, S, opt, ""),
        ("kind", 6, ENUM, opt, ".otlp.Span.SpanKind"),
        ("start_time_unix_nano", 7, F64, opt, ""),
        ("end_time_unix_nano", 8, F64, opt, ""),
        ("attributes", 9, MSG, rep, ".otlp.KeyValue"),
        ("dropped_attributes_count", 10, U32, opt, ""),
        ("status", 15, MSG, opt, ".otlp.Status"),
    )
    kinds = span.enum_type.add(name="SpanKind")
    for i, n in enumerate(["UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"]):
        kinds.value.add(name=f"SPAN_KIND_{n}", number=i)
    message(
        "ScopeSpans",
        ("scope", 1, MSG, opt, ".otlp.InstrumentationScope"),
        ("spans", 2, MSG, rep, ".otlp.Span"),
        ("schema_url", 3, S, opt, ""),
    )
    message(
        "ResourceSpans",
        ("resource", 1, MSG, opt, ".otlp.Resource"),
        ("scope_spans", 2, MSG, rep, ".otlp.ScopeSpans"),
        ("schema_url", 3, S, opt, ""),
    )
    message("ExportTraceServiceRequest", ("resource_spans", 1, MSG, rep, ".otlp.ResourceSpans"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("otlp.ExportTraceServiceRequest"))


EXPORT_REQUEST = _otlp_request_class()
HEX32 = re.compile(r"[0-9a-f]{32}")
HEX16 = re.compile(r"[0-9a-f]{16}")


def validate_otlp_json(body: bytes) -> Any:
    """Parse ``body`` as OTLP JSON (raises on any schema violation); returns the protobuf message."""
    msg = EXPORT_REQUEST()
    json_format.Parse(body.decode("utf-8"), msg)  # rejects unknown fields and wrong types
    for rs in msg.resource_spans:
        for ss in rs.scope_spans:
            for s in ss.spans:
                assert HEX32.fullmatch(s.trace_id), s.trace_id
                assert int(s.trace_id, 16), s.trace_id
                assert HEX16.fullmatch(s.span_id), s.span_id
                assert int(s.span_id, 16), s.span_id
                assert not s.parent_span_id or HEX16.fullmatch(s.parent_span_id)
                assert s.start_time_unix_nano <= s.end_time_unix_nano
    return msg


def test_the_schema_check_can_fail() -> None:
    with pytest.raises(json_format.ParseError):
        validate_otlp_json(b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"x","bogus":1}]}]}]}')
    with pytest.raises(json_format.ParseError):
        validate_otlp_json(b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"kind":"server"}]}]}]}')
    with pytest.raises(AssertionError):
        validate_otlp_json(b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"ABC","spanId":"1"}]}]}]}')


# ------------------------------------------------------------------------------------- an h11 collector
@dataclass
class Received:
    method: bytes
    target: bytes
    headers: dict[bytes, bytes]
    body: bytes


@dataclass
class Collector:
    """An HTTP/1.1 server answering ``status`` to every request (keep-alive), recording what it got."""

    status: int = 200
    port: int = 0
    received: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self.received.append(
                        Received(request.method, request.target, dict(request.headers), body)
                    )
                    payload = b'{"partialSuccess":{}}'
                    head = [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode()),
                    ]
                    writer.write(conn.send(h11.Response(status_code=self.status, headers=head)) or b"")
                    writer.write(conn.send(h11.Data(data=payload)) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                    await writer.drain()
                    self.arrived.set()
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (h11.RemoteProtocolError, ConnectionError):
            return
        finally:
            writer.close()

    def spans(self) -> list[Any]:
        return [s for r in self.received for rs in validate_otlp_json(r.body).resource_spans
                for ss in rs.scope_spans for s in ss.spans]  # fmt: skip


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    c = Collector()
    server = await asyncio.start_server(c.handle, "127.0.0.1", 0)
    c.port = server.sockets[0].getsockname()[1]
    async with server:
        yield c
        server.close()


async def until(cond: Callable[[], bool], within: float = 15.0) -> None:
    async with asyncio.timeout(within):
        while not cond():  # noqa: ASYNC110 - counters change in the exporter's background task
            await asyncio.sleep(0.005)


def finished_spans(n: int, *, traceparent: bytes | None = None) -> list[Any]:
    rng = random.Random(42)
    out = []
    for i in range(n):
        fields = [
            (b":method", b"GET"),
            (b":path", f"/items/{i}?q=secret".encode()),
            (b"x-request-id", b"r%d" % i),
        ]
        if traceparent is not None:
            fields.append((b"traceparent", traceparent))
            fields.append((b"tracestate", b"vendor=opaque"))
        ex = Exchange(
            request_headers=Headers(fields),
            downstream=DownstreamInfo("HTTP/1.1", ("127.0.0.1", 1), ("127.0.0.1", 2), "l"),
            start_time=0.0,
            wall_start=1700000000.0 + i,
            response_code=503 if i == 0 else 200,
            response_flags={"UF"} if i == 0 else set(),
            upstream_cluster="items",
            upstream_host="127.0.0.1:9",
        )
        span = start_span(ex.request_headers, rng, ex.wall_start, Tracing())
        assert span is not None
        span.finish(ex, ex.wall_start + 0.01)
        out.append(span)
    return out


def cluster_manager(name: str, port: int, *, http2: bool = False) -> ClusterManager:
    c = Cluster(
        name,
        endpoints=(Endpoint(SocketAddress("127.0.0.1", port)),),
        upstream_protocol="HTTP2" if http2 else "HTTP1",
        connect_timeout=2.0,
    )
    return ClusterManager([c], Store())


def service(cluster: str, path: str = "/v1/traces", timeout: float = 5.0) -> OtlpHttpService:
    return OtlpHttpService(
        cluster=cluster,
        authority="collector.local:4318",
        path=path,
        scheme="http",
        timeout=timeout,
        request_headers_to_add=(HeaderValueOption("x-api-key", "k1"),),
    )


# ------------------------------------------------------------------------------------- the tests
async def test_export_over_http1_is_valid_otlp_json(collector: Collector) -> None:
    cm = cluster_manager("otel", collector.port)
    store = Store()
    tracing = Tracing(provider=OpenTelemetryConfig(http_service=service("otel"), service_name="edge-1"))
    exporter = make_exporter(tracing, cm, store)
    assert isinstance(exporter, OtlpHttpExporter)
    exporter.batch_size = 4
    parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    spans = finished_spans(3) + finished_spans(3, traceparent=parent)
    for s in spans:
        exporter.submit(s)
    await until(lambda: store.value("tracing.opentelemetry.spans_sent") == 4)  # a full batch, at once
    await exporter.close()  # the final flush sends the other 2
    assert store.value("tracing.opentelemetry.spans_sent") == 6
    assert store.value("tracing.opentelemetry.export_failed") == 0
    assert len(collector.received) == 2
    for r in collector.received:
        assert (r.method, r.target) == (b"POST", b"/v1/traces")
        assert r.headers[b"content-type"] == b"application/json"
        assert r.headers[b"host"] == b"collector.local:4318"
        assert r.headers[b"x-api-key"] == b"k1"
        assert int(r.headers[b"content-length"]) == len(r.body)
        msg = validate_otlp_json(r.body)
        (rs,) = msg.resource_spans
        assert [(a.key, a.value.string_value) for a in rs.resource.attributes] == [("service.name", "edge-1")]
        assert rs.scope_spans[0].scope.name == "microenvoy"
    got = collector.spans()
    assert [s.span_id for s in got] == [f"{s.span_id:016x}" for s in spans]
    first, continued = got[0], got[3]
    assert first.kind == 2  # SERVER
    assert first.status.code == 2  # ERROR: a 503
    assert got[1].status.code == 0
    assert not first.parent_span_id
    assert first.start_time_unix_nano == 1700000000_000000000
    assert abs(first.end_time_unix_nano - 1700000000_010000000) < 1000  # float seconds: ~0.2 us resolution
    attrs = {a.key: a.value for a in first.attributes}
    assert attrs["http.request.method"].string_value == "GET"
    assert attrs["url.path"].string_value == "/items/0"
    assert attrs["http.response.status_code"].int_value == 503
    assert attrs["response_flags"].string_value == "UF"
    assert attrs["guid:x-request-id"].string_value == "r0"
    assert attrs["upstream_cluster"].string_value == "items"
    assert continued.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert continued.parent_span_id == "00f067aa0ba902b7"
    assert continued.trace_state == "vendor=opaque"
    assert continued.flags == 0x301
    # The collector cluster is an ordinary cluster: its stats saw the export requests.
    cl = cm.get("otel")
    assert cl is not None
    assert cl.stats.counter("upstream_rq_total").value == 2
    await cm.close()


async def test_collector_errors_are_counted(collector: Collector) -> None:
    collector.status = 500
    cm = cluster_manager("otel", collector.port)
    store = Store()
    exporter = OtlpHttpExporter(OpenTelemetryConfig(), service("otel"), cm, store, batch_size=2)
    for s in finished_spans(2):
        exporter.submit(s)
    await until(lambda: store.value("tracing.opentelemetry.export_failed") == 1)
    await exporter.close()
    assert store.value("tracing.opentelemetry.spans_sent") == 0
    assert len(collector.received) == 1
    validate_otlp_json(collector.received[0].body)
    await cm.close()


async def test_export_over_http2(h2_server: H2Server) -> None:
    cm = cluster_manager("otel-h2", h2_server.port, http2=True)
    store = Store()
    exporter = OtlpHttpExporter(
        OpenTelemetryConfig(), service("otel-h2", "/v1/traces"), cm, store, batch_size=3
    )
    for s in finished_spans(3):
        exporter.submit(s)
    await until(lambda: store.value("tracing.opentelemetry.spans_sent") == 3)
    rec = h2_server.last("/v1/traces")
    assert (rec.method, rec.authority, rec.scheme) == ("POST", "collector.local:4318", "http")
    assert rec.header("content-type") == "application/json"
    assert rec.header("x-api-key") == "k1"
    assert rec.body_length == int(rec.header("content-length") or -1) > 0
    # The same server answering 503 (its /status/<code> path): a failed export, nothing raised.
    failing = OtlpHttpExporter(
        OpenTelemetryConfig(), service("otel-h2", "/status/503"), cm, store, batch_size=1
    )
    failing.submit(finished_spans(1)[0])
    await until(lambda: store.value("tracing.opentelemetry.export_failed") == 1)
    await failing.close()
    await exporter.close()
    await cm.close()


async def test_a_refused_connection_is_counted_not_raised(dead_port: int) -> None:
    cm = cluster_manager("otel", dead_port)
    store = Store()
    exporter = OtlpHttpExporter(OpenTelemetryConfig(), service("otel", timeout=5.0), cm, store, batch_size=1)
    exporter.submit(finished_spans(1)[0])
    await until(lambda: store.value("tracing.opentelemetry.export_failed") == 1)
    await exporter.close()
    assert store.value("tracing.opentelemetry.spans_sent") == 0
    await cm.close()


def test_json_body_is_compact_and_loads() -> None:
    """The body is plain JSON (no NaN, compact separators) any OTLP/HTTP JSON receiver accepts."""
    from microenvoy.tracing import otlp_request

    body = json.dumps(otlp_request(finished_spans(2), "x"), separators=(",", ":"), allow_nan=False).encode()
    validate_otlp_json(body)
