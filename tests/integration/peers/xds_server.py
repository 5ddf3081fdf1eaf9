"""A scripted delta-xDS control plane for agent tests: a real grpcio server speaking the CBOR wire format.

    cp = ScriptedControlPlane(signing_key).start()      # 127.0.0.1:<cp.port>, h2c
    cp.put(CLUSTER, "api", {...})                       # signed, content-hash version; pushed to every stream
    cp.wait_request(lambda r: r.type_url == CLUSTER and r.response_nonce)   # what the agent sent (ACK/NACK)
    cp.stop()

It answers each type's first request with every stored resource of that type the agent subscribed to (all
of them for a wildcard), and pushes later ``put``/``remove`` calls to every open stream. It is deliberately
simple (no make-before-break ordering, no initial_resource_versions diffing): controlplane-lite is the real
one; this peer lets the agent's side be tested on its own.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import cbor2
import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microenvoy.xds import cose
from microenvoy.xds.messages import (
    DELTA_ADS_METHOD,
    DeltaRequest,
    DeltaResponse,
    ResourceEntry,
    decode_request,
    encode_response,
)

from .common import wait_for

__all__ = ["ScriptedControlPlane", "content_version"]


def content_version(resource: dict[str, Any]) -> str:
    return hashlib.sha256(cbor2.dumps(resource, canonical=True)).hexdigest()[:16]


class _Stream:
    def __init__(self) -> None:
        self.out: queue.Queue[DeltaResponse | None] = queue.Queue()
        self.subscribed: dict[str, set[str]] = {}


class ScriptedControlPlane:
    """See the module docstring. ``tamper``: sign, then change the resource (a bad signature)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.resources: dict[str, dict[str, tuple[str, dict[str, Any], bytes]]] = {}
        self.requests: list[DeltaRequest] = []
        self.port = 0
        self._streams: list[_Stream] = []
        self._lock = threading.Condition()
        self._nonces = itertools.count(1)
        self._server: grpc.Server | None = None

    # ------------------------------------------------------------------------------ resources
    def put(self, type_url: str, name: str, resource: dict[str, Any], *, tamper: bool = False) -> str:
        body = {"@type": type_url, **resource}
        version = content_version(body)
        signature = cose.sign_resource(self.key, type_url, name, version, body)
        if tamper:
            body = {**body, "tampered": True}
        with self._lock:
            self.resources.setdefault(type_url, {})[name] = (version, body, signature)
            self._push(type_url, [name], [])
        return version

    def remove(self, type_url: str, name: str) -> None:
        with self._lock:
            self.resources.get(type_url, {}).pop(name, None)
            self._push(type_url, [], [name])

    def _push(self, type_url: str, names: list[str], removed: list[str]) -> None:
        for s in self._streams:
            subs = s.subscribed.get(type_url)
            if subs is None:
                continue
            wanted = [n for n in names if "*" in subs or n in subs]
            gone = [n for n in removed if "*" in subs or n in subs]
            if wanted or gone:
                s.out.put(self._response(type_url, wanted, gone))

    def _response(self, type_url: str, names: list[str], removed: list[str]) -> DeltaResponse:
        entries = []
        for n in names:
            if n in self.resources.get(type_url, {}):
                version, body, signature = self.resources[type_url][n]
                entries.append(ResourceEntry(n, version, body, signature=signature))
        return DeltaResponse(type_url, f"n{next(self._nonces)}", "scripted", tuple(entries), tuple(removed))

    # -------------------------------------------------------------------------------- serving
    def _handle(
        self, request_iterator: Iterator[DeltaRequest], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        stream = _Stream()
        with self._lock:
            self._streams.append(stream)

        def reader() -> None:
            try:
                for req in request_iterator:
                    with self._lock:
                        self.requests.append(req)
                        self._lock.notify_all()
                        if req.response_nonce:
                            continue  # an ACK/NACK
                        subs = stream.subscribed.setdefault(req.type_url, set())
                        subs.update(req.resource_names_subscribe)
                        subs.difference_update(req.resource_names_unsubscribe)
                        have = self.resources.get(req.type_url, {})
                        asked = (
                            list(have)
                            if "*" in subs
                            else [n for n in req.resource_names_subscribe if n in have]
                        )
                        missing = [n for n in req.resource_names_subscribe if n != "*" and n not in have]
                        stream.out.put(self._response(req.type_url, asked, missing))
            except grpc.RpcError:
                pass
            finally:
                stream.out.put(None)

        threading.Thread(target=reader, daemon=True).start()
        try:
            while True:
                item = stream.out.get()
                if item is None or not context.is_active():
                    return
                yield item
        finally:
            with self._lock:
                self._streams.remove(stream)

    def start(self) -> ScriptedControlPlane:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.stream_stream_rpc_method_handler(
            self._handle, request_deserializer=decode_request, response_serializer=encode_response
        )
        service, method = DELTA_ADS_METHOD.lstrip("/").split("/")
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        with self._lock:
            for s in self._streams:
                s.out.put(None)
        if self._server is not None:
            self._server.stop(grace=0).wait(5)
            self._server = None

    def wait_request(self, predicate: Callable[[DeltaRequest], bool], timeout: float = 10.0) -> DeltaRequest:
        found: list[DeltaRequest] = []

        def seen() -> bool:
            with self._lock:
                found[:] = [r for r in self.requests if predicate(r)]
            return bool(found)

        wait_for(seen, timeout, message="an xDS request from the agent")
        return found[-1]
