"""Trace context and request ids through a live agent: W3C ``traceparent``/``tracestate`` reach the upstream
with the agent's own span id, spans land in the file sink with the right parent, and ``x-request-id`` is
generated once and seen by the upstream and the access log alike."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from peers import configs
from peers.agent import Agent
from peers.common import wait_for
from peers.h1_client import h1_request

_TP = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def _agent(agent: Any, tmp_path: Path, upstream_port: int) -> tuple[Agent, Path, Path]:
    spans, log = tmp_path / "spans.jsonl", tmp_path / "access.log"
    tracing = {
        "provider": {
            "name": "microenvoy.tracers.file",
            "typed_config": {
                "@type": "type.googleapis.com/microenvoy.tracers.file.v1.FileTracerConfig",
                "path": str(spans),
                "service_name": "edge-test",
            },
        }
    }
    fields = {"rid": "%REQ(X-REQUEST-ID)%", "trace": "%TRACE_ID%", "code": "%RESPONSE_CODE%"}
    http = configs.hcm(
        "traced",
        [configs.route("/", "echo")],
        tracing=tracing,
        access_log=configs.file_access_log(log, fields),
    )
    doc = configs.bootstrap(
        [configs.tcp_listener("http", http)], [configs.cluster("echo", upstream_port, http2=True)]
    )
    return agent(doc, name="traced"), spans, log


def _upstream_headers(body: bytes) -> dict[str, str]:
    return {k: v for k, v in json.loads(body)["headers"]}


def _rows(path: Path, n: int) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        if not path.exists():
            return None
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return rows if len(rows) >= n else None

    return wait_for(ready, timeout=10, message=f"{n} lines in {path.name}")


def _span(line: dict[str, Any]) -> dict[str, Any]:
    span = line["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert isinstance(span, dict)
    return span


def test_traceparent_continues_with_a_new_span_id_per_hop(agent: Any, h2_server: Any, tmp_path: Path) -> None:
    a, spans, log = _agent(agent, tmp_path, h2_server.port)
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    incoming = [("traceparent", f"00-{trace_id}-{parent}-01"), ("tracestate", "vendor=abc,other=1")]
    r = h1_request("127.0.0.1", a.port("http"), "GET", "/traced", incoming)
    assert r.status == 200
    up = _upstream_headers(r.body)
    m = _TP.match(up["traceparent"])
    assert m is not None, up["traceparent"]
    assert m.group(1) == trace_id
    assert m.group(2) != parent  # the agent's own span is the upstream's parent
    assert m.group(3) == "01"
    assert up["tracestate"] == "vendor=abc,other=1"
    span = _span(_rows(spans, 1)[0])
    assert span["traceId"] == trace_id
    assert span["parentSpanId"] == parent
    assert span["spanId"] == m.group(2)
    attrs = {x["key"]: x["value"] for x in span["attributes"]}
    assert attrs["http.response.status_code"] == {"intValue": "200"}
    row = _rows(log, 1)[0]
    assert row["trace"] == trace_id
    assert row["code"] == 200
    assert row["rid"] == up["x-request-id"]


def test_new_trace_and_request_id_when_absent(agent: Any, h2_server: Any, tmp_path: Path) -> None:
    a, spans, log = _agent(agent, tmp_path, h2_server.port)
    bad = [("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")]  # all-zero trace id
    r = h1_request("127.0.0.1", a.port("http"), "GET", "/fresh", bad)
    assert r.status == 200
    up = _upstream_headers(r.body)
    m = _TP.match(up["traceparent"])
    assert m is not None
    assert m.group(1) != "0" * 32
    rid = up["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", rid)
    span = _span(_rows(spans, 1)[0])
    assert span["traceId"] == m.group(1)
    assert "parentSpanId" not in span or not span["parentSpanId"]
    assert _rows(log, 1)[0]["rid"] == rid
