"""The demo's built-in upstream: a small h2c server with an HTTP echo and a gRPC echo.

* any non-gRPC request: 200 with a JSON description of the request as the upstream saw it (method, path,
  headers) and, for requests with a body, the body echoed back in ``body``;
* any gRPC request (``content-type: application/grpc...``): every request message is sent back unchanged as a
  response message (so ``/microenvoy.demo.v1.Echo/Echo`` works with any message type whose request and
  response are the same), then trailers ``grpc-status: 0``. Metadata ``x-echo-*`` is echoed in trailers.

It exists so that ``microenvoy demo`` needs nothing else on the machine; it is not part of the data plane.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from microenvoy.codecs.grpc import GrpcMessageDecoder, encode_message

__all__ = ["DemoUpstream"]


class _Conn(asyncio.Protocol):
    def __init__(self, server: DemoUpstream) -> None:
        self.server = server
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, dict[str, Any]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                hdrs = dict(ev.headers or [])
                grpc = (hdrs.get(b"content-type") or b"").startswith(b"application/grpc")
                self.requests[ev.stream_id] = {
                    "headers": ev.headers, "body": bytearray(), "grpc": grpc,
                    "decoder": GrpcMessageDecoder() if grpc else None,
                }  # fmt: skip
                if grpc:
                    self.h2.send_headers(
                        ev.stream_id,
                        [(b":status", b"200"), (b"content-type", b"application/grpc")],
                    )
                if ev.stream_ended is not None:
                    self._finish(ev.stream_id)
            elif isinstance(ev, h2.events.DataReceived):
                assert ev.stream_id is not None
                req = self.requests.get(ev.stream_id)
                self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
                if req is not None and ev.data:
                    if req["grpc"]:
                        for _, msg in req["decoder"].decode(ev.data):
                            self.h2.send_data(ev.stream_id, encode_message(msg))
                    elif len(req["body"]) < 1 << 20:
                        req["body"] += ev.data
                if ev.stream_ended is not None:
                    self._finish(ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                pass
            elif isinstance(ev, h2.events.StreamReset):
                self.requests.pop(ev.stream_id, None)
        self._flush()

    def _finish(self, sid: int) -> None:
        req = self.requests.pop(sid, None)
        if req is None:
            return
        self.server.requests += 1
        if req["grpc"]:
            trailers = [(b"grpc-status", b"0")]
            trailers += [(k, v) for k, v in req["headers"] if k.startswith(b"x-echo-")]
            self.h2.send_headers(sid, trailers, end_stream=True)
            return
        desc = {
            "upstream": "microenvoy demo upstream (h2c)",
            "method": dict(req["headers"]).get(b":method", b"").decode(),
            "path": dict(req["headers"]).get(b":path", b"").decode(),
            "headers": {k.decode(): v.decode("latin-1") for k, v in req["headers"]},
        }
        if req["body"]:
            desc["body"] = bytes(req["body"]).decode("utf-8", "replace")
        body = (json.dumps(desc, indent=2) + "\n").encode()
        self.h2.send_headers(
            sid,
            [(b":status", b"200"), (b"content-type", b"application/json"),
             (b"content-length", str(len(body)).encode())],
        )  # fmt: skip
        window = self.h2.local_flow_control_window(sid)
        self.h2.send_data(sid, body[:window], end_stream=len(body) <= window)
        if len(body) > window:  # the demo answers are small; a huge request echo is truncated
            self.h2.end_stream(sid)

    def _flush(self) -> None:
        out = self.h2.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)


class DemoUpstream:
    """``await DemoUpstream().start()``; ``port`` is the bound port (127.0.0.1)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.requests = 0
        self._server: asyncio.Server | None = None

    def __repr__(self) -> str:
        return f"<DemoUpstream {self.host}:{self.port} requests={self.requests}>"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
