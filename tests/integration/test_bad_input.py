"""Bad input at the boundary: every case gets a protocol-correct rejection, is counted in /stats, and the
agent keeps serving (checked at the end: no traceback in its log).

Oversized headers (> 60 KiB) and too many headers -> 431 over HTTP/1.1, HTTP/2 and HTTP/3; a body over the
route's ``max_request_bytes`` -> 413; malformed HTTP/1 -> 400 and close; HTTP/2 protocol errors -> GOAWAY
with the right code; the listener's ``max_connections``; stream and connection idle timeouts.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack
from typing import Any

import pytest
from peers import configs as C
from peers.agent import Agent
from peers.certs import CertBundle
from peers.common import wait_for
from peers.h1_client import H1Connection, h1_request, raw_exchange
from peers.h2_client import H2Client, raw_frame
from peers.h2_server import H2Server
from peers.h3_client import H3Client

BIG_HEADER = ("x-big", "a" * (61 * 1024))
MANY_HEADERS = [(f"x-h-{i}", "v") for i in range(150)]


@pytest.fixture(scope="module")
def bad(module_agent: Any, h2_server: H2Server, certs: CertBundle) -> Agent:
    routes = [
        C.route("/small/", "h2", route_extra={"max_request_bytes": 1024, "prefix_rewrite": "/"}),
        C.route("/", "h2"),
    ]
    config = C.bootstrap(
        [
            C.tcp_listener("tcp", C.hcm("bad", routes)),
            C.tcp_listener("capped", C.hcm("capped", routes), max_connections=2),
            C.tcp_listener(
                "idle",
                C.hcm(
                    "idle",
                    routes,
                    stream_idle_timeout="0.5s",
                    common_http_protocol_options={"idle_timeout": "0.5s"},
                ),
            ),
            C.quic_listener("quic", C.hcm("bad_h3", routes), certs),
        ],
        [C.cluster("h2", h2_server.port, http2=True)],
    )
    return module_agent(config, name="bad")


@pytest.fixture
def stats_delta(bad: Agent) -> Any:
    """``delta(name)``: how much a stat grew since the test started (polls briefly for it to move)."""
    before = bad.stats()

    def delta(name: str, at_least: int = 1) -> int:
        base = before.get(name, 0)
        return bad.wait_stat(name, lambda v: v - base >= at_least, timeout=5) - base

    return delta


def status_line(data: bytes) -> bytes:
    return data.split(b"\r\n", 1)[0]


# ================================================================================== 431
def test_h1_headers_over_60kib_get_431(bad: Agent, stats_delta: Any) -> None:
    name, value = BIG_HEADER
    request = f"GET /big-headers HTTP/1.1\r\nHost: x\r\n{name}: {value}\r\n\r\n".encode()
    data, _closed = raw_exchange("127.0.0.1", bad.port("tcp"), request)
    assert status_line(data).startswith(b"HTTP/1.1 431 ")
    assert stats_delta("http.bad.downstream_rq_431") >= 1
    assert stats_delta("http.bad.downstream_rq_4xx") >= 1


def test_h1_too_many_headers_get_431(bad: Agent, stats_delta: Any) -> None:
    lines = "".join(f"{k}: {v}\r\n" for k, v in MANY_HEADERS)
    data, _ = raw_exchange("127.0.0.1", bad.port("tcp"), f"GET / HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
    assert status_line(data).startswith(b"HTTP/1.1 431 ")
    assert stats_delta("http.bad.downstream_rq_431") >= 1
    assert stats_delta("http.bad.downstream_rq_4xx") >= 1


async def test_h2_headers_over_60kib_get_431(bad: Agent, stats_delta: Any, h2_server: H2Server) -> None:
    async with H2Client("127.0.0.1", bad.port("tcp")) as c:
        r = await c.request("GET", "/h2-big-headers", [BIG_HEADER])
        many = await c.request("GET", "/h2-many-headers", MANY_HEADERS)
        ok = await c.request("GET", "/h2-after-431")  # the connection survives (a stream-level error)
    assert r.status == 431
    assert many.status == 431
    assert ok.status == 200
    assert h2_server.count("/h2-big-headers") == 0
    assert stats_delta("http.bad.downstream_rq_431", 2) >= 2
    assert stats_delta("http.bad.downstream_rq_4xx", 2) >= 2


async def test_h3_headers_over_60kib_get_431(bad: Agent, certs: CertBundle, stats_delta: Any) -> None:
    async with H3Client("127.0.0.1", bad.port("quic"), ca=str(certs.ca_cert)) as c:
        r = await c.request("GET", "/h3-big-headers", [BIG_HEADER])
        many = await c.request("GET", "/h3-many-headers", MANY_HEADERS)
        ok = await c.request("GET", "/h3-after-431")
    assert r.status == 431
    assert many.status == 431
    assert ok.status == 200
    assert stats_delta("http.bad_h3.downstream_rq_431", 2) >= 2
    assert stats_delta("http.bad_h3.downstream_rq_4xx", 2) >= 2


# ================================================================================== 413
def test_h1_body_over_route_limit_gets_413(bad: Agent, stats_delta: Any) -> None:
    with H1Connection("127.0.0.1", bad.port("tcp")) as c:
        small = c.request("POST", "/small/echo", body=b"s" * 1000)
    assert small.status == 200
    assert small.body == b"s" * 1000
    r = h1_request("127.0.0.1", bad.port("tcp"), "POST", "/small/echo", body=b"x" * 2048)
    assert r.status == 413
    assert stats_delta("http.bad.downstream_rq_too_large") >= 1
    assert stats_delta("http.bad.downstream_rq_4xx") >= 1


async def test_h2_streamed_body_over_route_limit_gets_413(bad: Agent, stats_delta: Any) -> None:
    async with H2Client("127.0.0.1", bad.port("tcp")) as c:
        sid = c.start_request("POST", "/small/echo")  # no content-length: the limit is found while streaming
        for _ in range(8):
            await c.send_data(sid, b"y" * 512)
        await c.send_data(sid, b"", end_stream=True)
        r = await c.wait_response(sid)
        ok = await c.request("POST", "/small/echo", body=b"z" * 100)
    assert r.status == 413
    assert ok.status == 200
    assert stats_delta("http.bad.downstream_rq_too_large") >= 1
    assert stats_delta("http.bad.downstream_rq_4xx") >= 1


# ================================================================================== malformed HTTP/1
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n",
        b"NOT-A-REQUEST-LINE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n",
    ],
    ids=["bad-header-line", "bad-request-line", "bad-content-length", "conflicting-lengths", "bad-chunk"],
)
def test_malformed_http1_gets_400_and_close(bad: Agent, stats_delta: Any, request_bytes: bytes) -> None:
    data, closed = raw_exchange("127.0.0.1", bad.port("tcp"), request_bytes)
    assert status_line(data).startswith(b"HTTP/1.1 400 ")
    assert closed
    assert stats_delta("http.bad.downstream_rq_http1_invalid") >= 1
    assert stats_delta("http.bad.downstream_cx_protocol_error") >= 1


# ================================================================================== HTTP/2 protocol errors
@pytest.mark.parametrize(
    ("frame", "error_code"),
    [
        (raw_frame(0x0, 0x0, 0, b"data"), 0x1),  # DATA on stream 0: PROTOCOL_ERROR
        (raw_frame(0x8, 0x0, 0, b"\x00\x00\x00\x00"), 0x1),  # WINDOW_UPDATE of 0: PROTOCOL_ERROR
        (raw_frame(0x4, 0x0, 0, b"\x00\x03\x00\x00\x00"), 0x6),  # SETTINGS of 5 bytes: FRAME_SIZE_ERROR
    ],
    ids=["data-on-stream-0", "zero-window-update", "bad-settings-length"],
)
async def test_h2_protocol_error_gets_goaway(
    bad: Agent, stats_delta: Any, frame: bytes, error_code: int
) -> None:
    async with H2Client("127.0.0.1", bad.port("tcp")) as c:
        assert (await c.request("GET", "/before-protocol-error")).status == 200
        await c.send_raw(frame)
        goaway = await c.wait_goaway(within=5)
    assert goaway.error_code == error_code
    assert stats_delta("http.bad.downstream_cx_protocol_error") >= 1


def test_h2_bad_preface_closes(bad: Agent) -> None:
    data, closed = raw_exchange(
        "127.0.0.1", bad.port("tcp"), b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + b"\x00" * 30
    )
    assert closed
    assert b"HTTP/1.1 200" not in data


# ================================================================================== max_connections
async def test_listener_max_connections(bad: Agent) -> None:
    port = bad.port("capped")
    overflow = f"listener.127.0.0.1_{port}.downstream_cx_overflow"
    before = bad.stat(overflow)
    first, second = H2Client("127.0.0.1", port), H2Client("127.0.0.1", port)
    async with first, second:
        assert (await first.request("GET", "/cap/1")).status == 200
        assert (await second.request("GET", "/cap/2")).status == 200
        # a third connection is closed at once, without being served
        data, closed = raw_exchange("127.0.0.1", port, b"GET /cap/3 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed
        assert data == b""
        bad.wait_stat(overflow, before + 1)
        # the two accepted connections still work
        assert (await first.request("GET", "/cap/4")).status == 200
    # once they are gone, new connections are accepted again

    def serves() -> bool:
        return h1_request("127.0.0.1", port, "GET", "/cap/5", timeout=2).status == 200

    wait_for(serves, 10, message="capped listener accepting again")


def test_many_connections_then_still_serving(bad: Agent) -> None:
    with ExitStack() as stack:
        socks = [
            stack.enter_context(socket.create_connection(("127.0.0.1", bad.port("tcp")))) for _ in range(50)
        ]
        for s in socks[::2]:
            s.sendall(b"GET /half HTTP/1.1\r\nHost: x\r\n")  # incomplete heads
    assert h1_request("127.0.0.1", bad.port("tcp"), "GET", "/after-many").status == 200


# ================================================================================== idle timeouts
async def test_connection_idle_timeout(bad: Agent, stats_delta: Any) -> None:
    async with H2Client("127.0.0.1", bad.port("idle")) as c:
        assert (await c.request("GET", "/idle/1")).status == 200
        goaway = await c.wait_goaway(within=5)  # no streams for 0.5 s: the agent closes
    assert goaway.error_code == 0
    assert stats_delta("http.idle.downstream_cx_idle_timeout") >= 1


async def test_stream_idle_timeout(bad: Agent, stats_delta: Any) -> None:
    async with H2Client("127.0.0.1", bad.port("idle")) as c:
        sid = c.start_request("POST", "/idle/stream")  # headers, then nothing
        r = await c.wait_response(sid, within=5)
    assert r.status == 408
    assert stats_delta("http.idle.downstream_rq_idle_timeout") >= 1


# ================================================================================== still alive
def test_agent_survived_all_bad_input(bad: Agent) -> None:
    """Runs last in this module: the agent still serves and never logged a traceback."""
    r = h1_request("127.0.0.1", bad.port("tcp"), "GET", "/still-alive")
    assert r.status == 200
    assert bad.running
    assert "Traceback" not in bad.log_text()
