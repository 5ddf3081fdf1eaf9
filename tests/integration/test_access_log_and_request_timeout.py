"""Access logs written by a live agent (JSON lines to a file) and the HCM ``request_timeout`` (408)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peers import configs
from peers.agent import Agent
from peers.common import wait_for
from peers.h1_client import h1_request, raw_exchange


def _agent(agent, tmp_path: Path, upstream_port: int) -> tuple[Agent, Path]:  # type: ignore[no-untyped-def]
    log = tmp_path / "access.log"
    access_log = [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(log),
                "log_format": {
                    "json_format": {
                        "code": "%RESPONSE_CODE%",
                        "method": "%REQ(:METHOD)%",
                        "path": "%REQ(:PATH)%",
                        "flags": "%RESPONSE_FLAGS%",
                        "details": "%RESPONSE_CODE_DETAILS%",
                        "protocol": "%PROTOCOL%",
                    }
                },
            },
        }
    ]
    http = configs.hcm(
        "logged",
        [configs.route("/slow", "echo"), configs.route(direct=(200, "ok"))],
        access_log=access_log,
        request_timeout="0.5s",
    )
    clusters = [configs.cluster("echo", upstream_port, http2=True)]
    a: Agent = agent(configs.bootstrap([configs.tcp_listener("http", http)], clusters), name="logged")
    return a, log


def test_request_timeout_and_access_log(agent, h2_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, log = _agent(agent, tmp_path, h2_server.port)
    port = a.port("http")
    assert h1_request("127.0.0.1", port, "GET", "/hello").status == 200
    # A body announced but never completed (the upstream waits for it): the whole request did not arrive
    # within request_timeout.
    data, _ = raw_exchange(
        "127.0.0.1", port, b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab", timeout=2
    )
    assert data.startswith(b"HTTP/1.1 408 ")
    assert a.stat("http.logged.downstream_rq_timeout") >= 1

    def lines() -> list[dict[str, Any]] | None:
        if not log.exists():
            return None
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return rows if len(rows) >= 2 else None

    rows = wait_for(lines, timeout=10, message="two access log lines")
    assert rows[0] == {
        "code": 200, "method": "GET", "path": "/hello", "flags": "-", "details": "direct_response",
        "protocol": "HTTP/1.1",
    }  # fmt: skip
    assert rows[1]["code"] == 408
    assert rows[1]["details"] == "request_overall_timeout"
