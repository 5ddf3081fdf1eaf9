"""A grpcio test server for ``test.echo.v1.Echo`` (tests/integration/protos/echo.proto).

The Python modules are generated with ``grpc_tools.protoc`` into ``tests/integration/_generated/`` the first
time they are needed in a session (never committed). The server runs in-process on a thread pool, bound to
``127.0.0.1:0``; metadata whose key starts with ``x-echo-`` is sent back as both initial and trailing
metadata; ``fail_code`` ends the call with that status and ``fail_message``; ``delay_ms`` waits (cut short
by a cancel).
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import importlib
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

__all__ = ["GrpcEchoServer", "echo_modules", "grpc_frame", "parse_grpc_frames"]

_HERE = Path(__file__).resolve().parent
PROTO_DIR = _HERE.parent / "protos"
GENERATED_DIR = _HERE.parent / "_generated"
SERVICE = "test.echo.v1.Echo"

_modules: tuple[ModuleType, ModuleType] | None = None
_modules_lock = threading.Lock()


def echo_modules() -> tuple[ModuleType, ModuleType]:
    """Generate (if stale) and import ``echo_pb2`` and ``echo_pb2_grpc``; returns ``(pb2, pb2_grpc)``."""
    global _modules
    with _modules_lock:
        if _modules is not None:
            return _modules
        proto = PROTO_DIR / "echo.proto"
        GENERATED_DIR.mkdir(exist_ok=True)
        init = GENERATED_DIR / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated at test time by peers/grpc_server.py; not committed."""\n')
        digest = hashlib.sha256(proto.read_bytes()).hexdigest()
        stamp = GENERATED_DIR / "echo.sha256"
        # A file lock keeps two concurrent pytest processes from generating into each other's output.
        with open(GENERATED_DIR / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            outputs = [GENERATED_DIR / "echo_pb2.py", GENERATED_DIR / "echo_pb2_grpc.py"]
            if not (stamp.exists() and stamp.read_text() == digest and all(p.exists() for p in outputs)):
                from grpc_tools import protoc  # imported lazily: it is heavy

                rc = protoc.main(
                    [
                        "grpc_tools.protoc",
                        f"-I{PROTO_DIR}",
                        f"--python_out={GENERATED_DIR}",
                        f"--grpc_python_out={GENERATED_DIR}",
                        str(proto),
                    ]
                )
                if rc != 0:
                    raise RuntimeError(f"grpc_tools.protoc failed with exit code {rc}")
                stamp.write_text(digest)
        # The generated *_grpc module imports ``echo_pb2`` as a top-level module.
        if str(GENERATED_DIR) not in sys.path:
            sys.path.insert(0, str(GENERATED_DIR))
        pb2 = importlib.import_module("echo_pb2")
        pb2_grpc = importlib.import_module("echo_pb2_grpc")
        _modules = (pb2, pb2_grpc)
        return _modules


def grpc_frame(message: bytes, *, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message: flag byte, 4-byte big-endian length, payload."""
    return (b"\x01" if compressed else b"\x00") + len(message).to_bytes(4, "big") + message


def parse_grpc_frames(data: bytes) -> list[bytes]:
    """Split a gRPC body into its messages; raises ValueError on a truncated frame."""
    out: list[bytes] = []
    i = 0
    while i < len(data):
        if len(data) - i < 5:
            raise ValueError(f"truncated gRPC frame header at offset {i}")
        n = int.from_bytes(data[i + 1 : i + 5], "big")
        if len(data) - i - 5 < n:
            raise ValueError(f"truncated gRPC message at offset {i}: want {n} bytes")
        out.append(data[i + 5 : i + 5 + n])
        i += 5 + n
    return out


_STATUS_BY_CODE = {s.value[0]: s for s in grpc.StatusCode}


class _EchoServicer:
    """The ``Echo`` implementation; counts calls per method."""

    def __init__(self, server: GrpcEchoServer) -> None:
        self._server = server
        self._pb2 = server.pb2

    def _begin(self, method: str, context: grpc.ServicerContext) -> None:
        self._server._count(method)
        echo = tuple((k, v) for k, v in context.invocation_metadata() if k.startswith("x-echo-"))
        self._server._record_metadata(method, context.invocation_metadata())
        if echo:
            context.send_initial_metadata(echo)
            context.set_trailing_metadata(echo)

    @staticmethod
    def _delay(request: Any, context: grpc.ServicerContext) -> None:
        if request.delay_ms > 0:
            done = threading.Event()
            context.add_callback(done.set)  # a cancelled or expired call ends the wait at once
            done.wait(request.delay_ms / 1000.0)

    @staticmethod
    def _maybe_fail(request: Any, context: grpc.ServicerContext) -> None:
        if request.fail_code:
            context.abort(_STATUS_BY_CODE[request.fail_code], request.fail_message)

    def Unary(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._begin("Unary", context)
        self._delay(request, context)
        self._maybe_fail(request, context)
        return self._pb2.EchoResponse(message=request.message, index=0)

    def ServerStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._begin("ServerStream", context)
        self._delay(request, context)
        for i in range(request.count or 1):
            yield self._pb2.EchoResponse(message=f"{request.message}-{i}", index=i)
        self._maybe_fail(request, context)

    def ClientStream(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        self._begin("ClientStream", context)
        messages = []
        last: Any = None
        for req in request_iterator:
            messages.append(req.message)
            last = req
        if last is not None:
            self._delay(last, context)
            self._maybe_fail(last, context)
        return self._pb2.EchoResponse(message=",".join(messages), index=len(messages))

    def Bidi(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        self._begin("Bidi", context)
        for i, req in enumerate(request_iterator):
            self._delay(req, context)
            self._maybe_fail(req, context)
            yield self._pb2.EchoResponse(message=req.message, index=i)


class GrpcEchoServer:
    """In-process grpcio server for ``test.echo.v1.Echo`` on ``127.0.0.1:<port>`` (h2c)."""

    def __init__(self, *, max_workers: int = 16) -> None:
        self.pb2, self.pb2_grpc = echo_modules()
        self._max_workers = max_workers
        self._server: grpc.Server | None = None
        self._lock = threading.Lock()
        self.calls: collections.Counter[str] = collections.Counter()
        self.last_metadata: dict[str, tuple[tuple[str, str | bytes], ...]] = {}
        self.port = 0

    def _count(self, method: str) -> None:
        with self._lock:
            self.calls[method] += 1

    def _record_metadata(self, method: str, md: Any) -> None:
        with self._lock:
            self.last_metadata[method] = tuple((k, v) for k, v in md)

    def start(self) -> GrpcEchoServer:
        self._server, self.port = start_grpc_server(
            lambda server: self.pb2_grpc.add_EchoServicer_to_server(_EchoServicer(self), server),
            workers=self._max_workers,
            name="grpc-echo",
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> GrpcEchoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def channel(self, target: str | None = None) -> grpc.Channel:
        """An insecure channel to ``target`` (default: this server, directly)."""
        return grpc.insecure_channel(target or f"127.0.0.1:{self.port}")

    def stub(self, channel: grpc.Channel) -> Any:
        return self.pb2_grpc.EchoStub(channel)

    def __repr__(self) -> str:
        return f"<GrpcEchoServer port={self.port} calls={dict(self.calls)}>"


def start_grpc_server(
    register: Callable[[grpc.Server], object], *, workers: int, name: str
) -> tuple[grpc.Server, int]:
    """A started grpcio server on 127.0.0.1, port 0 (read back), with ``register`` adding its services."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name),
        options=[("grpc.so_reuseport", 0)],
    )
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    if not port:
        raise RuntimeError("grpc server could not bind 127.0.0.1:0")
    server.start()
    return server, port
