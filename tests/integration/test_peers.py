"""Self-tests of the test peers, without the agent: if these fail, the agent tests prove nothing.

* the HTTP/3 client against a bare aioquic HTTP/3 server (requests, trailers, streaming, resumption, 0-RTT,
  key update, connection ID change, NAT rebinding, QPACK dynamic table);
* the gRPC echo server with a grpcio client, and with hand-built gRPC frames over the raw HTTP/2 client;
* the HTTP/2 test server with the raw HTTP/2 client and with h2load;
* the HTTP/1.1 client against the standard library's HTTP server.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from peers.certs import CertBundle
from peers.common import StreamResetError
from peers.grpc_server import GrpcEchoServer, grpc_frame, parse_grpc_frames
from peers.h1_client import H1Connection, raw_exchange
from peers.h2_client import H2Client, raw_frame
from peers.h2_server import H2Server, pattern
from peers.h2load import run_h2load
from peers.h3_client import H3Client
from peers.h3_server import H3TestServer

MIB = 1024 * 1024


# ============================================================================ HTTP/3 client
@pytest.fixture
async def h3_server(certs: CertBundle) -> object:
    async with H3TestServer(certs) as server:
        yield server


async def test_h3_client_get_and_verified_tls(h3_server: H3TestServer, certs: CertBundle) -> None:
    async with H3Client("127.0.0.1", h3_server.port, ca=str(certs.ca_cert)) as c:
        r = await c.request("GET", "/hello", [("x-test", "1")])
        assert c.alpn == "h3"
    assert r.status == 200
    body = r.json()
    assert body["method"] == "GET"
    assert body["path"] == "/hello"
    assert ["x-test", "1"] in body["headers"]


async def test_h3_client_rejects_unknown_ca(
    h3_server: H3TestServer, tmp_path: object, certs: CertBundle
) -> None:
    from peers.certs import make_certs

    other = make_certs(tmp_path / "other")  # type: ignore[operator]
    with pytest.raises(ConnectionError):
        async with H3Client("127.0.0.1", h3_server.port, ca=str(other.ca_cert), connect_timeout=5):
            pass


async def test_h3_client_large_body_and_trailers(h3_server: H3TestServer) -> None:
    body = pattern(MIB)
    async with H3Client("127.0.0.1", h3_server.port) as c:
        r = await c.request(
            "POST", "/echo", [("content-type", "application/x-test")], body, [("x-checksum", "abc")]
        )
    assert r.status == 200
    assert r.body == body
    assert r.header("content-type") == "application/x-test"
    assert r.trailer("x-checksum") == "abc"
    assert r.trailer("x-server-trailer") == "done"


async def test_h3_client_streaming(h3_server: H3TestServer) -> None:
    async with H3Client("127.0.0.1", h3_server.port) as c:
        s = c.open_stream("POST", "/echo")
        for i in range(5):
            s.send(b"chunk%d;" % i)
        s.send(b"", end_stream=True)
        status, _ = await s.response_headers()
        got = b"".join([chunk async for chunk in s.chunks()])
    assert status == 200
    assert got == b"".join(b"chunk%d;" % i for i in range(5))


async def test_h3_client_resumption_and_0rtt(h3_server: H3TestServer) -> None:
    async with H3Client("127.0.0.1", h3_server.port) as c:
        assert (await c.request("GET", "/")).status == 200
        ticket = await c.wait_session_ticket()
        assert c.session_resumed is False
    # resumption without early data
    async with H3Client("127.0.0.1", h3_server.port, session_ticket=ticket) as c:
        assert (await c.request("GET", "/")).status == 200
        assert c.session_resumed is True
        ticket = await c.wait_session_ticket()
    # 0-RTT: a GET is served from early data, a POST gets 425
    async with H3Client("127.0.0.1", h3_server.port, session_ticket=ticket, early_data=True) as c:
        get = c.open_stream("GET", "/early", end_stream=True)
        post = c.open_stream("POST", "/early-post")
        post.send(b"not replay safe", end_stream=True)
        r_get, r_post = await get.response(), await post.response()
        await c.wait_handshake()
        assert c.early_data_accepted is True
        assert c.session_resumed is True
    assert r_get.status == 200
    assert r_get.header("x-early-data") == "1"
    assert r_post.status == 425
    assert h3_server.early_requests == 2


async def test_h3_client_key_update(h3_server: H3TestServer) -> None:
    async with H3Client("127.0.0.1", h3_server.port) as c:
        assert (await c.request("GET", "/before")).status == 200
        assert c.key_phase == 0
        c.request_key_update()
        assert (await c.request("GET", "/after")).status == 200
        assert c.key_phase == 1
        c.request_key_update()
        assert (await c.request("GET", "/again")).status == 200
        assert c.key_phase == 0


async def test_h3_client_connection_id_change(h3_server: H3TestServer) -> None:
    async with H3Client("127.0.0.1", h3_server.port) as c:
        assert (await c.request("GET", "/")).status == 200
        await c.ping()
        assert c.spare_peer_cids() > 0
        old, new = c.change_connection_id()
        assert old != new
        assert (await c.request("GET", "/after-cid-change")).status == 200


async def test_h3_client_rebinding(h3_server: H3TestServer) -> None:
    async with H3Client("127.0.0.1", h3_server.port, trace=True) as c:
        assert (await c.request("GET", "/")).status == 200
        old, new = await c.rebind()
        assert old[1] != new[1]
        assert (await c.request("GET", "/after-rebind")).status == 200
        assert c.path_challenges_received() >= 1  # the server validated the new path


async def test_h3_client_qpack_dynamic_table(h3_server: H3TestServer) -> None:
    async with H3Client("127.0.0.1", h3_server.port) as c:
        for _ in range(3):
            r = await c.request("GET", "/qpack", [("x-custom-header", "some-longish-value-to-index")])
            assert r.status == 200
        assert c.qpack_stats()["encoder_bytes_sent"] > 0


# ============================================================================ gRPC server
@pytest.fixture(scope="module")
def grpc_peer() -> Iterator[GrpcEchoServer]:
    with GrpcEchoServer() as server:
        yield server


def test_grpc_server_unary_stream_and_errors(grpc_peer: GrpcEchoServer) -> None:
    pb2 = grpc_peer.pb2
    with grpc_peer.channel() as ch:
        stub = grpc_peer.stub(ch)
        reply, call = stub.Unary.with_call(
            pb2.EchoRequest(message="hi"), metadata=[("x-echo-color", "blue")], timeout=10
        )
        assert reply.message == "hi"
        assert ("x-echo-color", "blue") in call.initial_metadata()
        assert ("x-echo-color", "blue") in call.trailing_metadata()
        stream = list(stub.ServerStream(pb2.EchoRequest(message="s", count=3), timeout=10))
        assert [(m.message, m.index) for m in stream] == [("s-0", 0), ("s-1", 1), ("s-2", 2)]
        reply = stub.ClientStream(iter([pb2.EchoRequest(message=x) for x in "abc"]), timeout=10)
        assert (reply.message, reply.index) == ("a,b,c", 3)
        out = list(stub.Bidi(iter([pb2.EchoRequest(message=x) for x in "xy"]), timeout=10))
        assert [m.message for m in out] == ["x", "y"]
        with pytest.raises(grpc.RpcError) as err:
            stub.Unary(pb2.EchoRequest(fail_code=7, fail_message="no way"), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == "no way"
        with pytest.raises(grpc.RpcError) as err:
            stub.Unary(pb2.EchoRequest(delay_ms=5000), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert grpc_peer.calls["Unary"] >= 3


async def test_grpc_server_with_hand_built_frames(grpc_peer: GrpcEchoServer) -> None:
    pb2 = grpc_peer.pb2
    headers = [("content-type", "application/grpc"), ("te", "trailers"), ("x-echo-k", "v")]
    async with H2Client("127.0.0.1", grpc_peer.port) as c:
        r = await c.request(
            "POST",
            "/test.echo.v1.Echo/Unary",
            headers,
            grpc_frame(pb2.EchoRequest(message="raw").SerializeToString()),
        )
        failed = await c.request(
            "POST",
            "/test.echo.v1.Echo/Unary",
            headers,
            grpc_frame(pb2.EchoRequest(fail_code=5, fail_message="nothing here").SerializeToString()),
        )
    assert r.status == 200
    assert r.header("x-echo-k") == "v"
    assert r.trailer("grpc-status") == "0"
    assert r.trailer("x-echo-k") == "v"
    (msg,) = parse_grpc_frames(r.body)
    assert pb2.EchoResponse.FromString(msg).message == "raw"
    # an error is trailers-only: grpc-status in the (only) header block
    status = failed.trailer("grpc-status") or failed.header("grpc-status")
    message = failed.trailer("grpc-message") or failed.header("grpc-message")
    assert (status, message) == ("5", "nothing here")


def test_grpc_frame_parsing() -> None:
    assert parse_grpc_frames(grpc_frame(b"ab") + grpc_frame(b"")) == [b"ab", b""]
    with pytest.raises(ValueError, match="truncated"):
        parse_grpc_frames(grpc_frame(b"abc")[:-1])


# ============================================================================ HTTP/2 server
@pytest.fixture(scope="module")
def h2_peer(certs: CertBundle) -> Iterator[H2Server]:
    with H2Server(certs=certs) as server:
        yield server


async def test_h2_server_json_echo_and_status(h2_peer: H2Server) -> None:
    async with H2Client("127.0.0.1", h2_peer.port) as c:
        r = await c.request("GET", "/anything?q=1", [("x-hello", "world")])
        s = await c.request("GET", "/status/503")
    assert r.status == 200
    body = r.json()
    assert body["path"] == "/anything?q=1"
    assert ["x-hello", "world"] in body["headers"]
    assert s.status == 503
    assert h2_peer.count("/anything") == 1


async def test_h2_server_body_echo_trailers_and_big(h2_peer: H2Server) -> None:
    body = pattern(MIB + 7)
    async with H2Client("127.0.0.1", h2_peer.port) as c:
        r = await c.request("POST", "/echo", [("content-type", "application/x-t")], body, [("x-t", "1")])
        big = await c.request("GET", f"/big/{2 * MIB}")
    assert r.status == 200
    assert r.body == body
    assert r.trailers == [("x-t", "1"), ("x-server-trailer", "done")]
    assert big.body == pattern(2 * MIB)


async def test_h2_server_fail_n_times(h2_peer: H2Server) -> None:
    async with H2Client("127.0.0.1", h2_peer.port) as c:
        codes = [(await c.request("GET", "/fail/2/selftest")).status for _ in range(3)]
        with pytest.raises(StreamResetError):
            await c.request("GET", "/fail/1/selftest-reset?mode=reset")
        ok = await c.request("GET", "/fail/1/selftest-reset?mode=reset")
        with pytest.raises(StreamResetError) as err:
            await c.request("GET", "/reset?code=7")
    assert codes == [503, 503, 200]
    assert ok.status == 200
    assert err.value.error_code == 7
    assert h2_peer.count("/fail/2/selftest") == 3


async def test_h2_server_delay_multiplexed(h2_peer: H2Server) -> None:
    async with H2Client("127.0.0.1", h2_peer.port) as c:
        start = time.monotonic()
        results = await asyncio.gather(*(c.request("GET", "/delay/200") for _ in range(10)))
        elapsed = time.monotonic() - start
    assert all(r.status == 200 for r in results)
    assert len({r.json()["connection_id"] for r in results}) == 1
    assert elapsed >= 0.2


async def test_h2_server_slow_read_applies_backpressure(h2_peer: H2Server) -> None:
    size, rate = 512 * 1024, 2 * MIB
    async with H2Client("127.0.0.1", h2_peer.port) as c:
        start = time.monotonic()
        r = await c.request("POST", f"/slow-read?rate={rate}", body=b"x" * size)
        elapsed = time.monotonic() - start
    assert r.json() == {"received": size}
    # the server withholds WINDOW_UPDATEs, so the client cannot send faster than the read rate
    assert elapsed >= (size - 65535) / rate * 0.9


async def test_h2_server_tls_alpn_and_client_cert(certs: CertBundle) -> None:
    with H2Server(certs=certs, require_client_cert=True) as server:
        assert server.tls_port is not None
        ctx = certs.client_context(("h2",), client_cert=True)
        async with H2Client("127.0.0.1", server.tls_port, ssl_context=ctx) as c:
            r = await c.request("GET", "/who")
            assert c.alpn == "h2"
    assert r.json()["peer_subject"]["commonName"] == "client-1"
    assert r.json()["alpn"] == "h2"


async def test_h2_client_sees_goaway_for_raw_protocol_error(h2_peer: H2Server) -> None:
    async with H2Client("127.0.0.1", h2_peer.port) as c:
        await asyncio.wait_for(c.remote_settings_received.wait(), 5)
        await c.send_raw(raw_frame(0x0, 0x0, 0, b"bad"))  # DATA on stream 0
        goaway = await c.wait_goaway()
    assert goaway.error_code == 1  # PROTOCOL_ERROR


def test_h2load_against_h2_server(h2_peer: H2Server) -> None:
    before = h2_peer.count("/h2load")
    r = run_h2load(f"http://127.0.0.1:{h2_peer.port}/h2load", n=10, c=2, m=2)
    assert (r.succeeded, r.failed, r.errored, r.status_2xx) == (10, 0, 0, 10)
    assert h2_peer.count("/h2load") - before == 10


# ============================================================================ HTTP/1.1 client
class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        out = json.dumps({"path": self.path, "len": len(body), "x": self.headers.get("x-test")}).encode()
        self.send_response(201)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


def test_h1_client_keepalive_and_raw() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with H1Connection("127.0.0.1", port) as c:
            r1 = c.request("POST", "/a", [("x-test", "1")], b"hello")
            r2 = c.request("POST", "/b", body=b"")
        assert (r1.status, r1.json()) == (201, {"path": "/a", "len": 5, "x": "1"})
        assert r2.json()["path"] == "/b"
        raw = b"POST /raw HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        data, closed = raw_exchange("127.0.0.1", port, raw)
        assert data.startswith(b"HTTP/1.1 201 ")
        assert data.endswith(b'"x": null}')
        assert closed
    finally:
        server.shutdown()
        server.server_close()
