"""CoAP front against real peers on both sides: the aiocoap client (methods, options, blockwise, Observe) in
front of the agent, and behind it the h2 test server, a chunked HTTP/1.1 stream of newline-delimited JSON,
grpcio (unary and server-streaming), nginx (static files, ETag/Max-Age, revalidation) and a mosquitto broker
(mqtt_broker cluster: 2.04 only after the PUBACK).

tests/integration/test_coap_front.py covers libcoap's coap-client and raw datagrams; OSCORE is in
test_coap_oscore_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiocoap  # type: ignore[import-untyped]
import pytest
from nginx import NginxServer
from peers import configs as C
from peers.agent import Agent
from peers.grpc_server import GrpcEchoServer, echo_modules
from peers.h2_server import H2Server, pattern
from peers.mosquitto import MosquittoBroker, mosquitto_available
from peers.mqtt_clients import MosquittoSub

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

COAP_TYPE = "type.googleapis.com/microenvoy.extensions.filters.network.coap_proxy.v1.CoapProxy"
BROKER_TYPE = "type.googleapis.com/microenvoy.extensions.clusters.mqtt_broker.v1.MqttBroker"
PREFIX = "peers"
JSON = 50
OCTETS = 42
TEXT = 0


# ========================================================================== a streaming HTTP/1.1 peer
class NdjsonServer:
    """HTTP/1.1 on 127.0.0.1:0 (a thread per connection): every request gets ``200`` with ``content-type:
    application/json`` and a chunked body that stays open; ``push(data)`` writes ``data`` as one chunk to
    every open stream, ``end()`` finishes them. ``opened``/``closed`` count streams (the agent closing its
    upstream connection is a close)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.paths: list[str] = []
        self.opened = 0
        self.closed = 0
        self._streams: list[socket.socket] = []
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="ndjson-accept", daemon=True)
        self._accept.start()

    def __repr__(self) -> str:
        return f"<NdjsonServer port={self.port} opened={self.opened} closed={self.closed}>"

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), name="ndjson-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            try:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                request_line = buf.split(b"\r\n", 1)[0].decode("latin-1")
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
                )
                with self._cond:
                    self.paths.append(request_line.split(" ")[1])
                    self.opened += 1
                    self._streams.append(conn)
                    self._cond.notify_all()
                while conn.recv(65536):  # until the agent closes (or we do)
                    pass
            except OSError:
                pass
            finally:
                with self._cond:
                    if conn in self._streams:
                        self._streams.remove(conn)
                        self.closed += 1
                    self._cond.notify_all()

    def push(self, data: bytes) -> None:
        with self._cond:
            for conn in self._streams:
                with contextlib.suppress(OSError):
                    conn.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def wait(self, predicate: Any, timeout: float = 5.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError(f"{self!r}: condition not met within {timeout}s")

    def close(self) -> None:
        self.sock.close()
        with self._cond:
            for conn in self._streams:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)


# ============================================================================================ config
def coap_route(prefix: str, cluster: str, **extra: Any) -> dict[str, Any]:
    route_extra = extra.pop("route_extra", {})
    return {
        "name": prefix.strip("/").replace("/", "_") or "root",
        "match": {"prefix": prefix},
        "route": {"cluster": cluster, "timeout": "5s", **route_extra},
        **extra,
    }


def coap_listener(routes: list[dict[str, Any]], **cfg: Any) -> dict[str, Any]:
    f = {
        "name": "microenvoy.filters.network.coap_proxy",
        "typed_config": {"@type": COAP_TYPE, "stat_prefix": PREFIX, "routes": routes, **cfg},
    }
    return {
        "name": "coap",
        "address": C.socket_address(0, protocol="UDP"),
        "filter_chains": [{"filters": [f]}],
    }


STREAM = "/test.echo.v1.Echo/ServerStream"
UNARY = "/test.echo.v1.Echo/Unary"
HEX_ETAG = "ab12cd34"
NGINX_LOCATIONS = {
    "/static/": "default_type application/json; expires 30s;",
    "= /valid/sensor.json": (
        "default_type application/json; expires 30s;"
        f""" add_header ETag '"{HEX_ETAG}"' always;"""
        f""" if ($http_if_none_match = '"{HEX_ETAG}"') {{ return 304; }}"""
        " try_files /static/sensor.json =404;"
    ),
}
STATIC_BODY = b'{"sensor": "t1", "value": 21.5}'


@pytest.fixture(scope="module")
def ndjson() -> Iterator[NdjsonServer]:
    server = NdjsonServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def static_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    """nginx serving ``/static/sensor.json`` with ``expires 30s`` (Cache-Control: max-age=30) and its ETag."""
    with NginxServer(tmp_path_factory.mktemp("nginx-coap"), locations=NGINX_LOCATIONS) as server:
        static = server.root / "html" / "static"
        static.mkdir(parents=True, exist_ok=True)
        (static / "sensor.json").write_bytes(STATIC_BODY)
        yield server


@pytest.fixture(scope="module")
def edge(
    module_agent: Any,
    h2_server: H2Server,
    grpc_server: GrpcEchoServer,
    ndjson: NdjsonServer,
    static_nginx: NginxServer,
) -> Agent:
    routes = [
        coap_route("/poll/", "h2", observe={"mode": "poll", "interval": "0.2s"}),
        coap_route("/ndjson/", "ndjson", observe={"mode": "stream", "interval": "30s"}),
        coap_route("/grpc/unary", "grpc", route_extra={"grpc": {"method": UNARY}}),
        coap_route(
            "/grpc/stream",
            "grpc",
            route_extra={"grpc": {"method": STREAM}},
            observe={"mode": "stream", "interval": "1s"},
        ),
        coap_route("/nginx/", "nginx_h1", route_extra={"prefix_rewrite": "/static/"}),
        coap_route("/nginx2/", "nginx_h2c", route_extra={"prefix_rewrite": "/static/"}),
        coap_route("/nginx-valid/", "nginx_h1", route_extra={"prefix_rewrite": "/valid/"}),
        coap_route("/", "h2"),
    ]
    config = C.bootstrap(
        [coap_listener(routes)],
        [
            C.cluster("h2", h2_server.port, http2=True),
            C.cluster("grpc", grpc_server.port, http2=True),
            C.cluster("ndjson", ndjson.port),
            C.cluster("nginx_h1", static_nginx.port),
            C.cluster("nginx_h2c", static_nginx.h2c_port, http2=True),
        ],
    )
    a: Agent = module_agent(config, name="coap-peers")
    return a


@pytest.fixture
async def ctx() -> AsyncIterator[Any]:
    """An aiocoap client context in the test's event loop."""
    c = await aiocoap.Context.create_client_context()
    yield c
    await c.shutdown()


def uri(agent: Agent, path: str) -> str:
    return f"coap://127.0.0.1:{agent.port('coap')}{path}"


async def request(ctx: Any, code: Any, target: str, payload: bytes = b"", **options: Any) -> Any:
    msg = aiocoap.Message(code=code, uri=target, payload=payload, **options)
    return await asyncio.wait_for(ctx.request(msg).response, 10)


def increasing(numbers: list[int]) -> bool:
    """Observe numbers strictly increasing (no wrap within a test)."""
    return all(a < b for a, b in itertools.pairwise(numbers))


def header(headers: list[list[str]], name: str) -> str | None:
    return next((v for k, v in headers if k == name), None)


# ============================================================================ aiocoap -> h2 server
@pytest.mark.parametrize(
    ("code", "method", "success"),
    [
        (aiocoap.GET, "GET", aiocoap.CONTENT),
        (aiocoap.POST, "POST", aiocoap.CHANGED),
        (aiocoap.PUT, "PUT", aiocoap.CHANGED),
        (aiocoap.DELETE, "DELETE", aiocoap.DELETED),
        (aiocoap.FETCH, "FETCH", aiocoap.CONTENT),
        (aiocoap.iPATCH, "PATCH", aiocoap.CHANGED),
    ],
)
async def test_methods_reach_the_h2_upstream(
    edge: Agent, h2_server: H2Server, ctx: Any, code: Any, method: str, success: Any
) -> None:
    payload = b"" if code in (aiocoap.GET, aiocoap.DELETE) else b'{"v": 1}'
    extra: dict[str, Any] = {"content_format": JSON} if payload else {}
    resp = await request(ctx, code, uri(edge, f"/dev/{method.lower()}/x?a=1&b=two"), payload, **extra)
    assert resp.code == success, resp
    assert resp.opt.content_format == JSON
    seen = json.loads(resp.payload)
    assert seen["method"] == method
    assert seen["path"] == f"/dev/{method.lower()}/x?a=1&b=two"
    assert seen["body_length"] == len(payload)
    assert seen["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert header(seen["headers"], "content-type") == ("application/json" if payload else None)
    # 2.05 with no Cache-Control from upstream: no Max-Age (CoAP's default 60 s); never on 2.01/2.02/2.04.
    assert resp.opt.max_age is None
    rec = h2_server.last(f"/dev/{method.lower()}/x")
    assert rec.method == method
    assert rec.path == f"/dev/{method.lower()}/x?a=1&b=two"


async def test_accept_and_content_format_map_to_headers(edge: Agent, h2_server: H2Server, ctx: Any) -> None:
    resp = await request(
        ctx, aiocoap.POST, uri(edge, "/echo"), b"plain words", content_format=TEXT, accept=TEXT
    )
    assert resp.code == aiocoap.CHANGED
    assert resp.payload == b"plain words"
    assert resp.opt.content_format == TEXT  # text/plain;charset=utf-8 came back from the echo
    rec = h2_server.last("/echo")
    assert rec.header("content-type") == "text/plain; charset=utf-8"
    assert rec.header("accept") == "text/plain; charset=utf-8"
    assert rec.header("content-length") == "11"
    resp = await request(ctx, aiocoap.GET, uri(edge, "/accept-json"), accept=JSON)
    assert resp.code == aiocoap.CONTENT
    assert header(json.loads(resp.payload)["headers"], "accept") == "application/json"


async def test_error_statuses_and_max_age(edge: Agent, ctx: Any) -> None:
    resp = await request(ctx, aiocoap.GET, uri(edge, "/status/404"))
    assert resp.code == aiocoap.NOT_FOUND
    assert resp.payload == b"status 404"  # text/plain upstream body as the diagnostic
    resp = await request(ctx, aiocoap.GET, uri(edge, "/status/503"))
    assert resp.code == aiocoap.SERVICE_UNAVAILABLE
    assert resp.opt.max_age == 0  # a transient failure must not be cached for CoAP's default 60 s


async def test_block1_upload_of_20kb(edge: Agent, h2_server: H2Server, ctx: Any) -> None:
    body = pattern(20_000)
    before = edge.stat(f"coap.{PREFIX}.block1_transfers")
    count = h2_server.count("/echo")
    resp = await request(ctx, aiocoap.POST, uri(edge, "/echo"), body, content_format=OCTETS)
    assert resp.code == aiocoap.CHANGED
    assert resp.payload == body  # the echo came back whole (Block2, reassembled by aiocoap)
    rec = h2_server.last("/echo")
    assert rec.body_length == 20_000
    assert rec.header("content-length") == "20000"  # reassembled before it went upstream
    assert h2_server.count("/echo") == count + 1  # one upstream request for all the blocks
    assert edge.stat(f"coap.{PREFIX}.block1_transfers") == before + 1


async def test_block2_download_of_50kb(edge: Agent, h2_server: H2Server, ctx: Any) -> None:
    before = edge.stat(f"coap.{PREFIX}.block2_transfers")
    count = h2_server.count("/big/50000")
    resp = await request(ctx, aiocoap.GET, uri(edge, "/big/50000"))
    assert resp.code == aiocoap.CONTENT
    assert resp.opt.content_format == OCTETS
    assert resp.payload == pattern(50_000)
    assert edge.stat(f"coap.{PREFIX}.block2_transfers") == before + 1
    # The follow-up blocks were served from the stored body, not fetched again.
    assert h2_server.count("/big/50000") == count + 1


async def wait_gauges_zero(agent: Agent) -> None:
    await agent.await_stat(f"coap.{PREFIX}.observers", lambda v: v == 0)
    await agent.await_stat(f"coap.{PREFIX}.observed_resources", lambda v: v == 0)


async def cancel_observation(agent: Agent, req: Any, ndjson: NdjsonServer | None = None) -> None:
    """``observation.cancel()``, then wait until the agent has no observer and no observed resource left.

    aiocoap sends no deregistration: it accepts one more notification, then answers the next confirmable
    one with RST (protocol.py, "We don't really support cancellation"), which tells the agent the observer
    is gone. A poll or re-opened stream produces those notifications by itself; an open ndjson stream is
    given fresh lines until the agent lets go."""
    req.observation.cancel()
    if ndjson is None:
        await wait_gauges_zero(agent)
        return
    for i in range(40):
        ndjson.push(f'{{"after_cancel": {i}}}\n'.encode())
        with contextlib.suppress(TimeoutError):
            await agent.await_stat(f"coap.{PREFIX}.observers", lambda v: v == 0, within=0.5)
            break
    await wait_gauges_zero(agent)


async def test_observe_poll_route(edge: Agent, h2_server: H2Server, ctx: Any) -> None:
    msg = aiocoap.Message(code=aiocoap.GET, uri=uri(edge, "/poll/temp"), observe=0)
    req = ctx.request(msg)
    first = await asyncio.wait_for(req.response, 10)
    assert first.code == aiocoap.CONTENT
    assert first.opt.observe is not None
    numbers = [first.opt.observe]
    streams = {json.loads(first.payload)["stream_id"]}
    await edge.await_stat(f"coap.{PREFIX}.observers", 1)
    assert edge.stat(f"coap.{PREFIX}.observed_resources") == 1

    async def three() -> None:
        async for note in req.observation:
            assert note.code == aiocoap.CONTENT
            numbers.append(note.opt.observe)
            streams.add(json.loads(note.payload)["stream_id"])
            if len(numbers) >= 4:
                return

    await asyncio.wait_for(three(), 8)
    assert len(numbers) == 4
    assert increasing(numbers), numbers
    assert len(streams) == 4  # each notification is a fresh upstream poll
    await cancel_observation(edge, req)  # observed_resources 0: the poll task was stopped


# ============================================================================ Observe in stream mode
async def next_note(it: Any, within: float = 5.0) -> Any:
    return await asyncio.wait_for(it.__anext__(), within)


async def test_observe_stream_over_chunked_http(edge: Agent, ndjson: NdjsonServer, ctx: Any) -> None:
    opened, closed = ndjson.opened, ndjson.closed
    msg = aiocoap.Message(code=aiocoap.GET, uri=uri(edge, "/ndjson/room1"), observe=0)
    req = ctx.request(msg)
    await asyncio.to_thread(ndjson.wait, lambda s: s.opened == opened + 1)
    assert ndjson.paths[-1] == "/ndjson/room1"
    ndjson.push(b'{"t": 20}\n')
    first = await asyncio.wait_for(req.response, 10)
    assert first.code == aiocoap.CONTENT
    assert first.payload == b'{"t": 20}'
    assert first.opt.content_format == JSON
    await edge.await_stat(f"coap.{PREFIX}.observers", 1)
    it = req.observation.__aiter__()
    numbers = [first.opt.observe]
    # A line split over two chunks is one notification; a chunk with a repeated state is none.
    for i, chunks in enumerate([[b'{"t": ', b"21}\n"], [b'{"t": 22}\n'], [b'{"t": 22}\n{"t": 23}\n']]):
        for c in chunks:
            ndjson.push(c)
        note = await next_note(it)
        assert note.code == aiocoap.CONTENT
        assert note.payload == f'{{"t": {21 + i}}}'.encode()
        numbers.append(note.opt.observe)
    assert len(numbers) == 4
    assert increasing(numbers), numbers
    assert ndjson.opened == opened + 1  # one upstream stream for the whole observation
    await cancel_observation(edge, req, ndjson)
    await asyncio.to_thread(ndjson.wait, lambda s: s.closed == closed + 1)  # the agent closed the stream


async def test_observe_stream_two_observers_share_one_stream(
    edge: Agent, ndjson: NdjsonServer, ctx: Any
) -> None:
    opened, closed = ndjson.opened, ndjson.closed
    target = uri(edge, "/ndjson/shared")
    req1 = ctx.request(aiocoap.Message(code=aiocoap.GET, uri=target, observe=0))
    await asyncio.to_thread(ndjson.wait, lambda s: s.opened == opened + 1)
    ndjson.push(b'{"n": 1}\n')
    assert (await asyncio.wait_for(req1.response, 10)).payload == b'{"n": 1}'
    other = await aiocoap.Context.create_client_context()  # a second device (another source port)
    try:
        req2 = other.request(aiocoap.Message(code=aiocoap.GET, uri=target, observe=0))
        r2 = await asyncio.wait_for(req2.response, 10)
        assert r2.payload == b'{"n": 1}'  # the current state, without a new upstream request
        await edge.await_stat(f"coap.{PREFIX}.observers", 2)
        assert edge.stat(f"coap.{PREFIX}.observed_resources") == 1
        it1, it2 = req1.observation.__aiter__(), req2.observation.__aiter__()
        ndjson.push(b'{"n": 2}\n')
        assert (await next_note(it1)).payload == b'{"n": 2}'
        assert (await next_note(it2)).payload == b'{"n": 2}'
        assert ndjson.opened == opened + 1
        req2.observation.cancel()
        await cancel_observation(edge, req1, ndjson)
    finally:
        await other.shutdown()
    await asyncio.to_thread(ndjson.wait, lambda s: s.closed == closed + 1)


async def test_observe_stream_registration_carries_the_current_state(
    edge: Agent, ndjson: NdjsonServer, ctx: Any
) -> None:
    opened = ndjson.opened
    req = ctx.request(aiocoap.Message(code=aiocoap.GET, uri=uri(edge, "/ndjson/burst"), observe=0))
    await asyncio.to_thread(ndjson.wait, lambda s: s.opened == opened + 1)
    ndjson.push(b'{"s": "old"}\n{"s": "new"}\n')  # two states in one chunk: "new" is current
    first = await asyncio.wait_for(req.response, 10)
    try:
        assert first.payload == b'{"s": "new"}'
    finally:
        await cancel_observation(edge, req, ndjson)


async def test_observe_grpc_server_stream(edge: Agent, grpc_server: GrpcEchoServer, ctx: Any) -> None:
    pb2, _ = echo_modules()
    calls = grpc_server.calls["ServerStream"]
    payload = pb2.EchoRequest(message="s", count=3).SerializeToString()
    req = ctx.request(
        aiocoap.Message(code=aiocoap.GET, uri=uri(edge, "/grpc/stream"), payload=payload, observe=0)
    )
    first = await asyncio.wait_for(req.response, 10)
    assert first.code == aiocoap.CONTENT
    assert first.opt.content_format == OCTETS
    assert first.opt.observe is not None
    seen = [pb2.EchoResponse.FromString(first.payload)]
    numbers = [first.opt.observe]
    it = req.observation.__aiter__()
    # Every streamed message arrives as a notification whose payload is the serialized EchoResponse (the
    # stream is re-opened after it ends, `interval` 1s, and replays s-0..s-2).
    while {(m.message, m.index) for m in seen} != {("s-0", 0), ("s-1", 1), ("s-2", 2)}:
        note = await next_note(it, 6)
        assert note.code == aiocoap.CONTENT
        numbers.append(note.opt.observe)
        seen.append(pb2.EchoResponse.FromString(note.payload))
    assert increasing(numbers), numbers
    assert grpc_server.calls["ServerStream"] >= calls + 1
    await cancel_observation(edge, req)


# ====================================================================================== gRPC unary
async def test_grpc_unary(edge: Agent, grpc_server: GrpcEchoServer, ctx: Any) -> None:
    pb2, _ = echo_modules()
    calls = grpc_server.calls["Unary"]
    body = pb2.EchoRequest(message="hello coap").SerializeToString()
    resp = await request(ctx, aiocoap.POST, uri(edge, "/grpc/unary"), body)
    assert resp.code == aiocoap.CHANGED
    assert resp.opt.content_format == OCTETS
    reply = pb2.EchoResponse.FromString(resp.payload)
    assert (reply.message, reply.index) == ("hello coap", 0)
    assert grpc_server.calls["Unary"] == calls + 1


@pytest.mark.parametrize(
    ("grpc_code", "coap_code"),
    [
        (5, aiocoap.NOT_FOUND),
        (14, aiocoap.SERVICE_UNAVAILABLE),
        (3, aiocoap.BAD_REQUEST),
        (7, aiocoap.FORBIDDEN),
    ],
)
async def test_grpc_unary_failure_maps_to_coap(edge: Agent, ctx: Any, grpc_code: int, coap_code: Any) -> None:
    pb2, _ = echo_modules()
    body = pb2.EchoRequest(message="x", fail_code=grpc_code, fail_message="nope here").SerializeToString()
    resp = await request(ctx, aiocoap.POST, uri(edge, "/grpc/unary"), body)
    assert resp.code == coap_code
    assert resp.payload == b"nope here"  # grpc-message as the diagnostic
    assert resp.opt.content_format is None


# =========================================================================================== nginx
@pytest.mark.parametrize("route", ["/nginx/", "/nginx2/"], ids=["http1", "h2c"])
async def test_nginx_static_file_etag_and_revalidation(
    edge: Agent, static_nginx: NginxServer, ctx: Any, route: str
) -> None:
    target = uri(edge, f"{route}sensor.json")
    resp = await request(ctx, aiocoap.GET, target)
    assert resp.code == aiocoap.CONTENT
    assert resp.payload == STATIC_BODY
    assert resp.opt.content_format == JSON
    assert resp.opt.max_age == 30  # expires 30s -> Cache-Control: max-age=30
    # nginx's ETag is "<mtime hex>-<size hex>": not a plain hex string, so (docs/coap-mapping.md) the CoAP
    # ETag is the first 8 bytes of SHA-256 of the entity-tag as nginx wrote it.
    st = (static_nginx.root / "html" / "static" / "sensor.json").stat()
    nginx_etag = f'"{int(st.st_mtime):x}-{st.st_size:x}"'.encode()
    assert resp.opt.etag == hashlib.sha256(nginx_etag).digest()[:8]
    # Revalidation with that ETag: nginx does not know the hashed tag, so the answer is a full 2.05 again
    # (correct, not minimal), with the same ETag.
    again = await request(ctx, aiocoap.GET, target, etag=resp.opt.etag)
    assert again.code == aiocoap.CONTENT
    assert again.payload == STATIC_BODY
    assert again.opt.etag == resp.opt.etag


async def test_nginx_hex_etag_revalidates_to_valid(edge: Agent, static_nginx: NginxServer, ctx: Any) -> None:
    # /valid/sensor.json: the static file with a strong hex ETag; nginx answers 304 when If-None-Match is it.
    target = uri(edge, "/nginx-valid/sensor.json")
    resp = await request(ctx, aiocoap.GET, target)
    assert resp.code == aiocoap.CONTENT
    assert resp.payload == STATIC_BODY
    assert resp.opt.etag == bytes.fromhex(HEX_ETAG)  # "ab12cd34" decoded: the exact inverse mapping
    assert resp.opt.max_age == 30
    again = await request(ctx, aiocoap.GET, target, etag=resp.opt.etag)
    assert again.code == aiocoap.VALID  # RFC 7252 §5.10.6.2: ETag -> If-None-Match -> 304 -> 2.03
    assert again.payload == b""
    assert again.opt.etag == resp.opt.etag
    assert again.opt.max_age == 30  # 2.03 refreshes the stored response's freshness
    other = await request(ctx, aiocoap.GET, target, etag=b"\x01\x02")
    assert other.code == aiocoap.CONTENT  # a tag nginx does not match: the full representation
    assert other.payload == STATIC_BODY


# ============================================================================================ MQTT
needs_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
TOPIC = "coap/telemetry/t1"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    if not mosquitto_available():
        pytest.skip("mosquitto is not installed")
    with MosquittoBroker(tmp_path_factory.mktemp("mosq-coap")) as b:
        yield b


@contextlib.contextmanager
def frozen(broker: MosquittoBroker) -> Iterator[None]:
    """SIGSTOP the broker (it keeps its sockets, answers nothing) until the block ends (SIGCONT)."""
    assert broker.proc is not None
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)


@needs_mosquitto
async def test_post_to_mqtt_broker_is_acked_after_puback(
    agent: Any, broker: MosquittoBroker, ctx: Any
) -> None:
    route = coap_route(
        "/mqtt/",
        "cloud",
        request_headers_to_add=[{"header": {"key": "x-microenvoy-mqtt-topic", "value": TOPIC}}],
    )
    cloud = {
        "name": "cloud",
        "connect_timeout": "2s",
        "cluster_type": {
            "name": "microenvoy.clusters.mqtt_broker",
            "typed_config": {
                "@type": BROKER_TYPE,
                "qos": 1,
                "reconnect_backoff": {"base_interval": "0.1s", "max_interval": "0.5s"},
            },
        },
        "load_assignment": {
            "cluster_name": "cloud",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": C.socket_address(broker.port)}}]}],
        },
    }
    a: Agent = agent(C.bootstrap([coap_listener([route])], [cloud]), name="coap-mqtt")
    await a.await_stat("cluster.cloud.mqtt_connected", lambda v: v == 1, within=15)
    target = uri(a, "/mqtt/anything")
    with MosquittoSub(broker.port, ["coap/#"], qos=1) as sub:
        resp = await request(ctx, aiocoap.POST, target, b"21.5", content_format=TEXT)
        assert resp.code == aiocoap.CHANGED
        got = await asyncio.to_thread(sub.wait_messages, 1)
        assert (got[0].topic, got[0].payload, got[0].qos) == (TOPIC, b"21.5", 1)
        assert a.stat("cluster.cloud.mqtt_acked") == 1
        # While the broker cannot answer, the PUBLISH is written but not acknowledged: no 2.04 yet (the
        # agent has sent an empty ACK and holds the response back).
        with frozen(broker):
            pending = asyncio.ensure_future(
                asyncio.wait_for(
                    ctx.request(aiocoap.Message(code=aiocoap.POST, uri=target, payload=b"22.0")).response, 10
                )
            )
            await a.await_stat("cluster.cloud.mqtt_inflight", lambda v: v == 1)
            await a.await_stat(f"coap.{PREFIX}.empty_ack", 1)  # the empty ACK went out, the answer waits
            assert not pending.done()
            assert a.stat("cluster.cloud.mqtt_acked") == 1
            assert a.stat(f"coap.{PREFIX}.rs_2xx") == 1
        resp = await pending  # the broker resumes, PUBACKs, and only then the 2.04 is sent
        assert resp.code == aiocoap.CHANGED
        assert a.stat("cluster.cloud.mqtt_acked") == 2
        got = await asyncio.to_thread(sub.wait_messages, 2)
        assert got[1].payload == b"22.0"
