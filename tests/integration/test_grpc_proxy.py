"""gRPC through the real agent: a grpcio client -> agent (h2c) -> grpcio server, every call shape, errors,
metadata and trailers intact; the same over HTTP/3 with hand-built frames; and errors the proxy makes itself
(dead cluster -> UNAVAILABLE, route timeout -> DEADLINE_EXCEEDED) as gRPC statuses.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from peers import configs as C
from peers.agent import Agent
from peers.certs import CertBundle
from peers.grpc_server import GrpcEchoServer
from peers.h3_client import H3Client, grpc_frame, parse_grpc_frames

SERVICE = "/test.echo.v1.Echo/"


@pytest.fixture(scope="module")
def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def gateway(module_agent: Any, grpc_server: GrpcEchoServer, certs: CertBundle, unused_port: int) -> Agent:
    def by_header(value: str) -> list[dict[str, Any]]:
        return [{"name": "x-route", "string_match": {"exact": value}}]

    routes = [
        C.route(SERVICE, "dead", grpc=True, headers=by_header("dead")),
        C.route(SERVICE, "grpc", grpc=True, headers=by_header("timeout"), route_extra={"timeout": "0.5s"}),
        C.route(SERVICE, "grpc", grpc=True, route_extra={"timeout": "0s"}),
    ]
    config = C.bootstrap(
        [
            C.tcp_listener("tcp", C.hcm("grpc", routes)),
            C.quic_listener("quic", C.hcm("grpc_h3", routes), certs),
        ],
        [
            C.cluster("grpc", grpc_server.port, http2=True),
            C.cluster("dead", unused_port, http2=True, connect_timeout="0.5s"),
        ],
    )
    return module_agent(config, name="gateway")


@pytest.fixture(scope="module")
def stub(gateway: Agent, grpc_server: GrpcEchoServer) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port('tcp')}") as channel:
        yield grpc_server.stub(channel)


# ================================================================================== grpcio over h2c
def test_unary_with_metadata_and_trailers(stub: Any, grpc_server: GrpcEchoServer, gateway: Agent) -> None:
    pb2 = grpc_server.pb2
    before = grpc_server.calls["Unary"]
    reply, call = stub.Unary.with_call(
        pb2.EchoRequest(message="hello"),
        metadata=[("x-echo-trace", "abc"), ("x-echo-num", "2"), ("x-other", "not echoed")],
        timeout=10,
    )
    assert reply.message == "hello"
    assert call.code() == grpc.StatusCode.OK
    initial = dict(call.initial_metadata())
    trailing = dict(call.trailing_metadata())
    assert initial["x-echo-trace"] == "abc"
    assert trailing["x-echo-trace"] == "abc"
    assert trailing["x-echo-num"] == "2"
    assert "x-other" not in trailing
    assert grpc_server.calls["Unary"] == before + 1
    # the request metadata reached the server as sent
    assert ("x-other", "not echoed") in grpc_server.last_metadata["Unary"]
    gateway.wait_stat("cluster.grpc.upstream_rq_total", 1)


def test_server_streaming(stub: Any, grpc_server: GrpcEchoServer) -> None:
    pb2 = grpc_server.pb2
    replies = list(stub.ServerStream(pb2.EchoRequest(message="s", count=5), timeout=10))
    assert [(r.message, r.index) for r in replies] == [(f"s-{i}", i) for i in range(5)]


def test_client_streaming(stub: Any, grpc_server: GrpcEchoServer) -> None:
    pb2 = grpc_server.pb2
    reply = stub.ClientStream(iter([pb2.EchoRequest(message=m) for m in ("a", "b", "c", "d")]), timeout=10)
    assert reply.message == "a,b,c,d"
    assert reply.index == 4


def test_bidi_streaming(stub: Any, grpc_server: GrpcEchoServer) -> None:
    pb2 = grpc_server.pb2
    replies = list(stub.Bidi(iter([pb2.EchoRequest(message=str(i)) for i in range(6)]), timeout=10))
    assert [(r.message, r.index) for r in replies] == [(str(i), i) for i in range(6)]


def test_large_message(stub: Any, grpc_server: GrpcEchoServer) -> None:
    pb2 = grpc_server.pb2
    message = "x" * (1024 * 1024)
    assert stub.Unary(pb2.EchoRequest(message=message), timeout=10).message == message


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, "denied by the test"),
        (grpc.StatusCode.NOT_FOUND, "café 100% missing\nsecond line"),  # percent-encoded on the wire
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down"),
    ],
)
def test_error_status_and_message_intact(
    stub: Any, grpc_server: GrpcEchoServer, code: Any, message: str
) -> None:
    pb2 = grpc_server.pb2
    with pytest.raises(grpc.RpcError) as err:
        stub.Unary(
            pb2.EchoRequest(fail_code=code.value[0], fail_message=message),
            metadata=[("x-echo-why", "test")],
            timeout=10,
        )
    assert err.value.code() == code
    assert err.value.details() == message
    assert dict(err.value.trailing_metadata())["x-echo-why"] == "test"


def test_error_after_streamed_replies(stub: Any, grpc_server: GrpcEchoServer) -> None:
    pb2 = grpc_server.pb2
    got: list[str] = []
    request = pb2.EchoRequest(
        message="m", count=3, fail_code=grpc.StatusCode.ABORTED.value[0], fail_message="late"
    )

    def consume() -> None:
        got.extend(reply.message for reply in stub.ServerStream(request, timeout=10))

    with pytest.raises(grpc.RpcError) as err:
        consume()
    assert got == ["m-0", "m-1", "m-2"]
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert err.value.details() == "late"


# ================================================================================== errors made by the proxy
def test_dead_cluster_gives_unavailable(stub: Any, grpc_server: GrpcEchoServer, gateway: Agent) -> None:
    pb2 = grpc_server.pb2
    before = grpc_server.calls["Unary"]
    with pytest.raises(grpc.RpcError) as err:
        stub.Unary(pb2.EchoRequest(message="x"), metadata=[("x-route", "dead")], timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert grpc_server.calls["Unary"] == before
    gateway.wait_stat("cluster.dead.upstream_cx_connect_fail", 1)


def test_route_timeout_gives_deadline_exceeded(
    stub: Any, grpc_server: GrpcEchoServer, gateway: Agent
) -> None:
    pb2 = grpc_server.pb2
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        # the client allows 10 s; the route allows 0.5 s: the agent must end the call
        stub.Unary(
            pb2.EchoRequest(message="slow", delay_ms=5000), metadata=[("x-route", "timeout")], timeout=10
        )
    elapsed = time.monotonic() - start
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 4.5
    gateway.wait_stat("cluster.grpc.upstream_rq_timeout", 1)


# ================================================================================== gRPC over HTTP/3
def _grpc_headers(extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    return [("content-type", "application/grpc"), ("te", "trailers"), *(extra or [])]


def _status(r: Any) -> tuple[str | None, str | None]:
    """grpc-status/grpc-message from the trailers, or from the headers of a trailers-only response."""
    status = r.trailer("grpc-status") or r.header("grpc-status")
    message = r.trailer("grpc-message") or r.header("grpc-message")
    return status, message


async def test_grpc_unary_over_http3(gateway: Agent, grpc_server: GrpcEchoServer, certs: CertBundle) -> None:
    pb2 = grpc_server.pb2
    async with H3Client("127.0.0.1", gateway.port("quic"), ca=str(certs.ca_cert)) as c:
        r = await c.request(
            "POST",
            SERVICE + "Unary",
            _grpc_headers([("x-echo-h3", "yes")]),
            grpc_frame(pb2.EchoRequest(message="over h3").SerializeToString()),
        )
    assert r.status == 200
    assert r.header("content-type", "").startswith("application/grpc")
    assert r.header("x-echo-h3") == "yes"
    assert _status(r) == ("0", None)
    assert r.trailer("x-echo-h3") == "yes"
    (msg,) = parse_grpc_frames(r.body)
    assert pb2.EchoResponse.FromString(msg).message == "over h3"


async def test_grpc_server_streaming_over_http3(
    gateway: Agent, grpc_server: GrpcEchoServer, certs: CertBundle
) -> None:
    pb2 = grpc_server.pb2
    async with H3Client("127.0.0.1", gateway.port("quic"), ca=str(certs.ca_cert)) as c:
        r = await c.request(
            "POST",
            SERVICE + "ServerStream",
            _grpc_headers(),
            grpc_frame(pb2.EchoRequest(message="h3s", count=4).SerializeToString()),
        )
    assert r.status == 200
    assert _status(r)[0] == "0"
    replies = [pb2.EchoResponse.FromString(m) for m in parse_grpc_frames(r.body)]
    assert [x.message for x in replies] == [f"h3s-{i}" for i in range(4)]


async def test_grpc_client_streaming_over_http3(
    gateway: Agent, grpc_server: GrpcEchoServer, certs: CertBundle
) -> None:
    pb2 = grpc_server.pb2
    async with H3Client("127.0.0.1", gateway.port("quic"), ca=str(certs.ca_cert)) as c:
        s = c.open_stream("POST", SERVICE + "ClientStream", _grpc_headers())
        for m in ("p", "q", "r"):
            s.send(grpc_frame(pb2.EchoRequest(message=m).SerializeToString()))
        s.send(b"", end_stream=True)
        r = await s.response()
    assert _status(r)[0] == "0"
    (msg,) = parse_grpc_frames(r.body)
    assert pb2.EchoResponse.FromString(msg).message == "p,q,r"


async def test_grpc_error_over_http3(gateway: Agent, grpc_server: GrpcEchoServer, certs: CertBundle) -> None:
    pb2 = grpc_server.pb2
    async with H3Client("127.0.0.1", gateway.port("quic"), ca=str(certs.ca_cert)) as c:
        r = await c.request(
            "POST",
            SERVICE + "Unary",
            _grpc_headers(),
            grpc_frame(pb2.EchoRequest(fail_code=9, fail_message="precondition").SerializeToString()),
        )
    assert r.status == 200
    assert _status(r) == ("9", "precondition")


async def test_grpc_dead_cluster_over_http3(
    gateway: Agent, grpc_server: GrpcEchoServer, certs: CertBundle
) -> None:
    pb2 = grpc_server.pb2
    async with H3Client("127.0.0.1", gateway.port("quic"), ca=str(certs.ca_cert)) as c:
        r = await c.request(
            "POST",
            SERVICE + "Unary",
            _grpc_headers([("x-route", "dead")]),
            grpc_frame(pb2.EchoRequest(message="x").SerializeToString()),
        )
    # a proxy-made gRPC error: HTTP 200, trailers-only, grpc-status UNAVAILABLE
    assert r.status == 200
    assert _status(r)[0] == "14"
