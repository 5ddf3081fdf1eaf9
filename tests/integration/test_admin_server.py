"""The admin server on a real loopback socket (and its h11 connection in memory), with a fake AdminHost.

The agent's real AdminHost is tested with the agent; here the server itself: every endpoint over HTTP/1.1,
content types, method rules, keep-alive and pipelining, limits (431/413), malformed input (400 + close),
idle timeout, connection cap, /quitquitquit ordering, and fuzzed bytes that must never break it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import socket
from collections.abc import AsyncIterator
from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microenvoy.admin.host import AdminHost
from microenvoy.admin.stats import Store
from microenvoy.config.model import SocketAddress
from microenvoy.io.admin_server import AdminHttpConnection, AdminServer, AdminServerLimits

pytestmark = pytest.mark.integration


class FakeHost:
    """A canned AdminHost that records calls."""

    def __init__(self) -> None:
        self.stats = Store()
        self.stats.counter("cluster.web.upstream_rq_total").inc(4)
        self.stats.gauge("http.ingress.downstream_cx_active").set(2)
        self.stats.histogram("cluster.web.upstream_rq_time").record(12)
        self.is_ready = True
        self.calls: list[tuple[Any, ...]] = []
        self.quit_called = asyncio.Event()

    def ready(self) -> bool:
        return self.is_ready

    def config_dump(self) -> dict[str, Any]:
        return {"configs": [{"name": "bootstrap", "private_key": "[redacted]"}]}

    def clusters_text(self) -> str:
        return "web::127.0.0.1:8080::health_flags::healthy\n"

    def clusters_json(self) -> dict[str, Any]:
        return {"cluster_statuses": [{"name": "web", "host_statuses": []}]}

    def listeners(self) -> list[dict[str, Any]]:
        return [
            {
                "name": "ingress_http",
                "local_address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": 41234, "protocol": "TCP"}
                },
            },
            {
                "name": "ingress_h3",
                "local_address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": 41235, "protocol": "UDP"}
                },
            },
        ]

    def server_info(self) -> dict[str, Any]:
        return {"version": "0.1.0", "state": "LIVE" if self.is_ready else "PRE_INITIALIZING"}

    def healthcheck_fail(self) -> None:
        self.calls.append(("healthcheck_fail",))

    def healthcheck_ok(self) -> None:
        self.calls.append(("healthcheck_ok",))

    def drain_listeners(self, graceful: bool, inbound_only: bool) -> None:
        self.calls.append(("drain_listeners", graceful, inbound_only))

    def quit(self) -> None:
        self.calls.append(("quit",))
        self.quit_called.set()

    def set_log_level(self, level: str, logger: str | None) -> str:
        self.calls.append(("set_log_level", level, logger))
        if level == "bogus":
            raise ValueError("bad level")
        return f"active loggers:\n  {logger or 'microenvoy'}: {level}\n"


Reply = tuple[int, dict[str, str], bytes]


def _request(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


async def request(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> Reply:
    return await asyncio.to_thread(_request, port, method, path, headers)


async def raw(port: int, data: bytes, *, half_close: bool = False) -> bytes:
    """Send ``data``, return everything until the server closes (the test timeout bounds the wait)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


def parse_responses(data: bytes, methods: list[bytes] | None = None) -> list[tuple[int, bytes]]:
    """Split a byte stream into (status, body) with an h11 client (checks the framing is right)."""
    out: list[tuple[int, bytes]] = []
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    for method in methods or [b"GET"] * 50:
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
        if client.our_state is not h11.IDLE:  # the server closes after the previous response
            return out
        client.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        status, body = 0, b""
        while True:
            ev = client.next_event()
            if ev is h11.NEED_DATA:
                return out
            if isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                out.append((status, body))
                break
            elif isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
                return out
    return out


@pytest.fixture
async def host() -> FakeHost:
    return FakeHost()


@pytest.fixture
async def server(host: FakeHost) -> AsyncIterator[AdminServer]:
    srv = AdminServer(host, SocketAddress("127.0.0.1", 0))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


# -- endpoints over the wire ---------------------------------------------------------------------------
async def test_binds_port_zero_and_reports_it(server: AdminServer) -> None:
    assert server.port > 0
    assert server.address == ("127.0.0.1", server.port)
    assert f":{server.port}" in repr(server)


async def test_index_and_404(server: AdminServer) -> None:
    status, headers, body = await request(server.port, "GET", "/")
    assert status == 200
    assert headers["content-type"] == "text/plain; charset=UTF-8"
    assert body.startswith(b"admin commands are:\n")
    for path in (b"/ready", b"/stats/prometheus", b"/config_dump", b"/listeners", b"/quitquitquit"):
        assert b"  " + path + b": " in body
    status, _, body404 = await request(server.port, "GET", "/no/such/thing")
    assert status == 404
    assert body404 == b"invalid path. " + body


async def test_ready(server: AdminServer, host: FakeHost) -> None:
    assert (await request(server.port, "GET", "/ready"))[::2] == (200, b"LIVE\n")
    host.is_ready = False
    assert (await request(server.port, "GET", "/ready"))[::2] == (503, b"PRE_INITIALIZING\n")


async def test_stats_text_json_filter(server: AdminServer) -> None:
    status, headers, body = await request(server.port, "GET", "/stats")
    assert (status, headers["content-type"]) == (200, "text/plain; charset=UTF-8")
    lines = body.decode().splitlines()
    assert "cluster.web.upstream_rq_total: 4" in lines
    assert "http.ingress.downstream_cx_active: 2" in lines
    assert any(x.startswith("cluster.web.upstream_rq_time: P0(nan,12)") for x in lines)
    _, _, body = await request(server.port, "GET", "/stats?filter=^cluster%5C.web%5C.upstream_rq_total$")
    assert body == b"cluster.web.upstream_rq_total: 4\n"
    status, headers, body = await request(
        server.port, "GET", "/stats?format=json&filter=downstream_cx_active"
    )
    assert (status, headers["content-type"]) == (200, "application/json")
    assert json.loads(body) == {
        "stats": [
            {"name": "http.admin.downstream_cx_active", "value": 1},  # this very connection
            {"name": "http.ingress.downstream_cx_active", "value": 2},
        ]
    }
    status, _, body = await request(server.port, "GET", "/stats?usedonly")
    assert status == 200
    assert b"http.admin.downstream_cx_overflow" not in body  # never bumped
    status, _, body = await request(server.port, "GET", "/stats?filter=(unclosed")
    assert status == 400
    assert body.startswith(b"Invalid regex")


async def test_prometheus(server: AdminServer) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = await request(server.port, "GET", "/stats/prometheus")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert fams["microenvoy_cluster_web_upstream_rq"].samples[0].value == 4  # counter, _total stripped
    assert fams["microenvoy_http_ingress_downstream_cx_active"].type == "gauge"
    assert fams["microenvoy_cluster_web_upstream_rq_time"].type == "histogram"


async def test_json_endpoints(server: AdminServer) -> None:
    for path, expected in (
        ("/config_dump", {"configs": [{"name": "bootstrap", "private_key": "[redacted]"}]}),
        ("/server_info", {"version": "0.1.0", "state": "LIVE"}),
        ("/clusters?format=json", {"cluster_statuses": [{"name": "web", "host_statuses": []}]}),
    ):
        status, headers, body = await request(server.port, "GET", path)
        assert (status, headers["content-type"]) == (200, "application/json"), path
        assert json.loads(body) == expected
    status, headers, body = await request(server.port, "GET", "/clusters")
    assert (status, body) == (200, b"web::127.0.0.1:8080::health_flags::healthy\n")
    assert headers["content-type"].startswith("text/plain")


async def test_listeners_show_the_hosts_bound_ports(server: AdminServer) -> None:
    _, _, body = await request(server.port, "GET", "/listeners")
    assert body == b"ingress_http::127.0.0.1:41234\ningress_h3::127.0.0.1:41235\n"
    status, headers, body = await request(server.port, "GET", "/listeners?format=json")
    assert (status, headers["content-type"]) == (200, "application/json")
    doc = json.loads(body)
    assert [
        (
            s["name"],
            s["local_address"]["socket_address"]["port_value"],
            s["local_address"]["socket_address"]["protocol"],
        )
        for s in doc["listener_statuses"]
    ] == [("ingress_http", 41234, "TCP"), ("ingress_h3", 41235, "UDP")]


@pytest.mark.parametrize(
    ("path", "call"),
    [
        ("/healthcheck/fail", ("healthcheck_fail",)),
        ("/healthcheck/ok", ("healthcheck_ok",)),
        ("/drain_listeners?graceful&inbound_only", ("drain_listeners", True, True)),
        ("/drain_listeners", ("drain_listeners", False, False)),
    ],
)
async def test_mutating_endpoints(
    server: AdminServer, host: FakeHost, path: str, call: tuple[Any, ...]
) -> None:
    status, headers, body = await request(server.port, "GET", path)
    assert (status, headers["allow"], body) == (405, "POST", b"Method GET not allowed, POST required.\n")
    assert host.calls == []
    status, _, body = await request(server.port, "POST", path)
    assert (status, body) == (200, b"OK\n")
    assert host.calls == [call]


async def test_quitquitquit_answers_then_quits(server: AdminServer, host: FakeHost) -> None:
    assert (await request(server.port, "GET", "/quitquitquit"))[0] == 405
    assert not host.quit_called.is_set()
    status, _, body = await request(server.port, "POST", "/quitquitquit")
    assert (status, body) == (200, b"OK\n")
    await asyncio.wait_for(host.quit_called.wait(), 10)


async def test_logging(server: AdminServer, host: FakeHost) -> None:
    status, _, body = await request(server.port, "GET", "/logging")
    assert status == 200
    assert body.startswith(b"active loggers:\n  microenvoy: ")
    assert (await request(server.port, "GET", "/logging?level=debug"))[0] == 405
    status, _, body = await request(server.port, "POST", "/logging?level=debug")
    assert (status, body) == (200, b"active loggers:\n  microenvoy: debug\n")
    status, _, body = await request(server.port, "POST", "/logging?upstream=error")
    assert (status, body) == (200, b"active loggers:\n  microenvoy.upstream: error\n")
    status, _, body = await request(server.port, "POST", "/logging?level=loud")
    assert status == 400
    assert b"unknown log level" in body
    assert host.calls == [("set_log_level", "debug", None), ("set_log_level", "error", "microenvoy.upstream")]


async def test_head_has_headers_but_no_body(server: AdminServer) -> None:
    data = await raw(server.port, b"HEAD /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-length: 5" in head.lower()
    assert rest == b""


async def test_other_methods_on_read_endpoints(server: AdminServer) -> None:
    status, headers, _ = await request(server.port, "DELETE", "/stats")
    assert (status, headers["allow"]) == (405, "GET, HEAD")


# -- HTTP/1.1 behaviour -------------------------------------------------------------------------------
async def test_keep_alive_reuses_the_connection(server: AdminServer, host: FakeHost) -> None:
    def two_on_one() -> list[int]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            statuses = []
            for path in ("/ready", "/server_info", "/nope"):
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                statuses.append(resp.status)
            return statuses
        finally:
            conn.close()

    assert await asyncio.to_thread(two_on_one) == [200, 200, 404]
    assert host.stats.value("http.admin.downstream_cx_total") == 1
    assert host.stats.value("http.admin.downstream_rq_total") == 3
    assert host.stats.value("http.admin.downstream_rq_2xx") == 2
    assert host.stats.value("http.admin.downstream_rq_4xx") == 1


async def test_pipelined_requests_are_answered_in_order(server: AdminServer) -> None:
    data = await raw(
        server.port,
        b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\n"
        b"POST /healthcheck/fail HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
        b"GET /stats?filter=nomatch HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    assert parse_responses(data, [b"GET", b"POST", b"GET"]) == [(200, b"LIVE\n"), (200, b"OK\n"), (200, b"")]


async def test_expect_100_continue(server: AdminServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            b"POST /healthcheck/ok HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n"
        )
        line = await asyncio.wait_for(reader.readline(), 10)
        assert line.startswith(b"HTTP/1.1 100 ")
        assert await asyncio.wait_for(reader.readline(), 10) == b"\r\n"
        writer.write(b"abcd")
        line = await asyncio.wait_for(reader.readline(), 10)
        assert line.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64) + b"\r\n\r\n",  # a TLS ClientHello
        b"GET /ready HTTP/1.1\r\nbad header line\r\n\r\n",
        b"GET /ready HTTP/9.9\r\nhost: x\r\n\r\n",
        b"GET  /ready HTTP/1.1\r\n\r\n",
        b"GET /ready HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
        b"GET /ready HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n",
        b"\r\n\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ],
)
async def test_malformed_request_is_400_and_close(
    server: AdminServer, host: FakeHost, garbage: bytes
) -> None:
    data = await raw(server.port, garbage)
    assert data.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 501 ", b"HTTP/1.1 505 ")), data[:60]
    assert b"connection: close" in data.lower()
    assert (await request(server.port, "GET", "/ready"))[0] == 200  # still serving


async def test_bad_requests_are_counted(server: AdminServer, host: FakeHost) -> None:
    data = await raw(server.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 ")
    assert host.stats.value("http.admin.downstream_cx_protocol_error") == 1


async def test_truncated_request_then_eof(server: AdminServer) -> None:
    data = await raw(server.port, b"GET /ready HTTP/1.1\r\nhost:", half_close=True)
    assert data == b"" or data.startswith(b"HTTP/1.1 400 ")


async def test_oversized_headers_are_431(host: FakeHost) -> None:
    limits = AdminServerLimits(max_request_headers_bytes=4096)
    async with AdminServer(host, SocketAddress("127.0.0.1", 0), limits) as srv:
        data = await raw(srv.port, b"GET /ready HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 10000 + b"\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 431 ")
        # an endless request line is cut off as well
        data = await raw(srv.port, b"GET /" + b"a" * 10000)
        assert data.startswith(b"HTTP/1.1 431 ")
        assert host.stats.value("http.admin.downstream_rq_too_large") == 2
        assert host.stats.value("http.admin.downstream_cx_protocol_error") == 0


async def test_oversized_body_is_413(host: FakeHost) -> None:
    limits = AdminServerLimits(max_request_body_bytes=1000)
    async with AdminServer(host, SocketAddress("127.0.0.1", 0), limits) as srv:
        data = await raw(
            srv.port,
            b"POST /healthcheck/fail HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n" + b"z" * 5000,
        )
        assert data.startswith(b"HTTP/1.1 413 ")
        assert host.calls == []
        assert host.stats.value("http.admin.downstream_rq_too_large") == 1
        # chunked: no length up front, cut off once the body passes the limit
        data = await raw(
            srv.port,
            b"POST /healthcheck/fail HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"400\r\n"
            + b"z" * 1024
            + b"\r\n"
            + b"400\r\n"
            + b"z" * 1024
            + b"\r\n0\r\n\r\n",
        )
        assert data.startswith(b"HTTP/1.1 413 ")
        # a declared oversized body with Expect: 100-continue is refused before the client sends it
        data = await raw(
            srv.port,
            b"POST /healthcheck/fail HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n"
            b"expect: 100-continue\r\n\r\n",
        )
        assert data.startswith(b"HTTP/1.1 413 ")
        assert host.calls == []
        assert host.stats.value("http.admin.downstream_rq_too_large") == 3


async def test_idle_connection_is_closed(host: FakeHost) -> None:
    async with AdminServer(host, SocketAddress("127.0.0.1", 0), AdminServerLimits(idle_timeout=0.2)) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            writer.write(b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\n")
            assert parse_responses(await asyncio.wait_for(reader.read(), 10)) == [(200, b"LIVE\n")]
            # read() returned: the server closed the kept-alive connection after the idle timeout
        finally:
            writer.close()
            await writer.wait_closed()
        assert host.stats.value("http.admin.downstream_cx_idle_timeout") == 1


async def test_connection_cap(host: FakeHost) -> None:
    async with AdminServer(host, SocketAddress("127.0.0.1", 0), AdminServerLimits(max_connections=1)) as srv:
        r1, w1 = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            w1.write(b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await asyncio.wait_for(r1.readline(), 10)).startswith(b"HTTP/1.1 200 ")
            assert await raw(srv.port, b"") == b""  # over the cap: closed at once
            assert host.stats.value("http.admin.downstream_cx_overflow") == 1
        finally:
            w1.close()
            await w1.wait_closed()


async def test_close_ends_open_connections(host: FakeHost) -> None:
    srv = AdminServer(host, SocketAddress("127.0.0.1", 0))
    await srv.start()
    port = srv.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200 ")
        await srv.close()
        await asyncio.wait_for(reader.read(), 10)  # EOF (the rest of the response, then nothing)
        assert host.stats.value("http.admin.downstream_cx_active") == 0
    finally:
        writer.close()
        await writer.wait_closed()
    with pytest.raises(ConnectionRefusedError):  # not listening any more
        await asyncio.open_connection("127.0.0.1", port)
    await srv.close()  # idempotent


async def test_ipv6_loopback(host: FakeHost) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        srv = AdminServer(host, SocketAddress("::1", 0))
        await srv.start()
    except OSError:
        pytest.skip("::1 not available")
    try:
        reader, writer = await asyncio.open_connection("::1", srv.port)
        writer.write(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert parse_responses(await asyncio.wait_for(reader.read(), 10)) == [(200, b"LIVE\n")]
        writer.close()
        await writer.wait_closed()
    finally:
        await srv.close()


async def test_rejects_udp_and_double_start(host: FakeHost) -> None:
    with pytest.raises(ValueError, match="TCP"):
        AdminServer(host, SocketAddress("127.0.0.1", 0, "UDP"))
    srv = AdminServer(host, SocketAddress("127.0.0.1", 0))
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.port
    async with srv:
        with pytest.raises(RuntimeError, match="already started"):
            await srv.start()


async def test_random_garbage_over_the_socket_never_kills_the_server(server: AdminServer) -> None:
    rng = random.Random(1234)
    for _ in range(30):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
        data = await raw(server.port, junk, half_close=True)
        assert data == b"" or data.startswith(b"HTTP/1.1 "), data[:40]
    assert (await request(server.port, "GET", "/ready"))[0] == 200


# -- the sans-IO connection in memory ---------------------------------------------------------------
def _feed(conn: AdminHttpConnection, chunks: list[bytes]) -> tuple[bytes, bool]:
    out = b""
    closed = False
    for chunk in chunks:
        o = conn.receive_data(chunk)
        out += o.data
        for cb in o.after:
            cb()
        closed = o.close
        if closed:
            break
    return out, closed


def test_byte_at_a_time_equals_one_chunk() -> None:
    req = (
        b"GET /stats?filter=upstream_rq_total HTTP/1.1\r\nhost: x\r\n\r\n"
        b"POST /quitquitquit HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"
    )
    h1, h2 = FakeHost(), FakeHost()
    whole, _ = _feed(AdminHttpConnection(h1), [req])
    bytewise, closed = _feed(AdminHttpConnection(h2), [req[i : i + 1] for i in range(len(req))])
    assert whole == bytewise
    assert not closed
    assert parse_responses(whole, [b"GET", b"POST"]) == [
        (200, b"cluster.web.upstream_rq_total: 4\n"),
        (200, b"OK\n"),
    ]
    assert h1.calls == h2.calls == [("quit",)]


def test_eof_closes_and_later_input_is_ignored() -> None:
    conn = AdminHttpConnection(FakeHost())
    o = conn.receive_data(b"")
    assert (o.data, o.close) == (b"", True)
    assert conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").data == b""
    assert "closed=True" in repr(conn)


def test_http10_gets_an_answer_and_close() -> None:
    out, closed = _feed(AdminHttpConnection(FakeHost()), [b"GET /ready HTTP/1.0\r\n\r\n"])
    assert out.startswith(b"HTTP/1.1 200 ")
    assert out.endswith(b"LIVE\n")
    assert closed


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_fuzz_bytes_never_raise(chunks: list[bytes]) -> None:
    host = FakeHost()
    conn = AdminHttpConnection(
        host, AdminServerLimits(max_request_headers_bytes=512, max_request_body_bytes=256)
    )
    out, _ = _feed(conn, [*chunks, b""])
    assert out == b"" or out.startswith(b"HTTP/1.1 ")


_REQUEST_LINES = st.sampled_from(
    [
        b"GET / HTTP/1.1",
        b"POST /quitquitquit HTTP/1.1",
        b"GET /stats?format=json HTTP/1.1",
        b"HEAD /x HTTP/1.0",
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(_REQUEST_LINES, st.lists(st.binary(max_size=40), max_size=4), st.binary(max_size=40)),
        max_size=4,
    ),
    st.integers(min_value=1, max_value=64),
)
def test_fuzz_near_valid_requests(reqs: list[tuple[bytes, list[bytes], bytes]], step: int) -> None:
    stream = b"".join(
        line + b"\r\nhost: x\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + tail
        for line, headers, tail in reqs
    )
    conn = AdminHttpConnection(FakeHost())
    out, _ = _feed(conn, [stream[i : i + step] for i in range(0, len(stream), step)] + [b""])
    assert out == b"" or out.startswith(b"HTTP/1.1 ")


def test_fake_host_is_an_admin_host() -> None:
    h: AdminHost = FakeHost()
    assert h.ready()
