"""Test peers for active health checking: a flippable HTTP/1.1 (or HTTP/2) health endpoint, a grpcio
``grpc.health.v1.Health`` server and a TCP ping/pong server.

* ``FlipHttpServer`` runs in the test's own event loop (``async with``); it answers every request with
  ``status`` (settable at any time) and the ``extra_headers``; HTTP/1.1 via h11 (keep-alive honoured) and,
  with ``h2c=True``, HTTP/2 with prior knowledge via h2. It records every request's headers and counts
  connections, so tests can see the ``user-agent`` and connection reuse. Optionally TLS.
* ``GrpcHealthServer`` is an in-process grpcio server (thread pool) implementing ``Health/Check`` through a
  generic handler; its messages are encoded by protobuf itself (classes built from a descriptor), so the
  agent's hand-written encoding is checked against the real thing. ``set(service, status)`` changes what it
  answers; an unknown service gets ``NOT_FOUND`` as grpc's reference servicer does.
* ``PingPongServer`` (in the test loop) answers each ``PING`` with ``PO`` and ``NG`` in two writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h11
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from .grpc_server import start_grpc_server

__all__ = ["SERVING_STATUS", "FlipHttpServer", "GrpcHealthServer", "PingPongServer", "health_messages"]

SERVING_STATUS = {"UNKNOWN": 0, "SERVING": 1, "NOT_SERVING": 2, "SERVICE_UNKNOWN": 3}


def health_messages() -> tuple[Any, Any]:
    """``grpc.health.v1`` HealthCheckRequest/Response classes, built by protobuf from a descriptor."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="peers_health.proto", package="grpc.health.v1", syntax="proto3"
    )
    req = fdp.message_type.add(name="HealthCheckRequest")
    req.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    res = fdp.message_type.add(name="HealthCheckResponse")
    enum = res.enum_type.add(name="ServingStatus")
    for name, number in SERVING_STATUS.items():
        enum.value.add(name=name, number=number)
    res.field.add(
        name="status",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")),
    )


# ============================================================================================ HTTP
class FlipHttpServer:
    """A health endpoint whose answer the test flips (``status``, ``extra_headers``), in the test's loop."""

    def __init__(self, *, h2c: bool = False, ssl_context: ssl.SSLContext | None = None) -> None:
        self.h2c = h2c
        self.ssl_context = ssl_context
        self.status = 200
        self.extra_headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        """HTTP/1.1: False answers with ``connection: close``."""
        self.requests: list[dict[bytes, bytes]] = []
        self.times: list[float] = []
        """``time.monotonic()`` of each request, in the order of ``requests``."""
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def open_connections(self) -> int:
        return len(self._writers)

    def _record(self, headers: dict[bytes, bytes]) -> None:
        self.requests.append(headers)
        self.times.append(time.monotonic())

    async def __aenter__(self) -> FlipHttpServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            self._server = None

    def _response_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", b"text/plain"), *self.extra_headers]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            if self.h2c:
                await self._serve_h2(reader, writer)
            else:
                await self._serve_h1(reader, writer)
        except (ConnectionError, h11.ProtocolError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    async def _serve_h1(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    return
                continue
            if isinstance(event, h11.Request):
                self._record({k: v for k, v in event.headers} | {b":path": event.target})
                body = f"status {self.status}\n".encode()
                headers = [*self._response_headers(), (b"content-length", str(len(body)).encode())]
                if not self.keep_alive:
                    headers.append((b"connection", b"close"))
                writer.write(conn.send(h11.Response(status_code=self.status, headers=headers)))
                if event.method != b"HEAD":
                    writer.write(conn.send(h11.Data(data=body)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
            elif isinstance(event, h11.EndOfMessage):
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    return
            elif isinstance(event, h11.ConnectionClosed):
                return

    async def _serve_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self._record({bytes(k): bytes(v) for k, v in event.headers})
                    body = f"status {self.status}\n".encode()
                    conn.send_headers(
                        event.stream_id,
                        [(b":status", str(self.status).encode()), *self._response_headers()],
                    )
                    conn.send_data(event.stream_id, body, end_stream=True)
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            writer.write(conn.data_to_send())
            await writer.drain()


# ============================================================================================ gRPC
class GrpcHealthServer:
    """grpcio server implementing ``grpc.health.v1.Health/Check`` on ``127.0.0.1:<port>`` (h2c)."""

    def __init__(self) -> None:
        self.request_cls, self.response_cls = health_messages()
        self._statuses: dict[str, int] = {"": SERVING_STATUS["SERVING"]}
        self._lock = threading.Lock()
        self.calls: list[tuple[str, tuple[tuple[str, Any], ...]]] = []
        self.port = 0
        self._server: grpc.Server | None = None

    def set(self, service: str, status: str) -> None:
        with self._lock:
            self._statuses[service] = SERVING_STATUS[status]

    def _check(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.calls.append((request.service, tuple(context.invocation_metadata())))
            status = self._statuses.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return self.response_cls(status=status)

    def start(self) -> GrpcHealthServer:
        handler = grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self._check,
                    request_deserializer=self.request_cls.FromString,
                    response_serializer=lambda m: m.SerializeToString(),
                )
            },
        )
        self._server, self.port = start_grpc_server(
            lambda server: server.add_generic_rpc_handlers((handler,)), workers=4, name="grpc-health"
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> GrpcHealthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ============================================================================================ TCP
class PingPongServer:
    """Answers every ``PING`` with ``PO`` then ``NG`` (two writes), in the test's loop."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self.pings = 0
        self.silent = False
        """Read but never answer (the check must time out)."""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> PingPongServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        buf = b""
        try:
            while True:
                data = await reader.read(1024)
                if not data:
                    return
                buf += data
                while b"PING" in buf:
                    buf = buf.split(b"PING", 1)[1]
                    self.pings += 1
                    if not self.silent:
                        writer.write(b"xxPO")
                        await writer.drain()
                        writer.write(b"yyNGzz")
                        await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
