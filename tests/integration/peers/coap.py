"""CoAP peers for integration tests: libcoap's ``coap-client-notls`` as a subprocess and a raw UDP client.

    res = coap_client("-m", "get", uri)                 # CoapClientResult: returncode, stdout, stderr
    with RawCoap(port) as c:                            # a UDP socket on 127.0.0.1 bound to port 0
        reply = c.request(GET, "status/404")            # a CON request; the first answer to it (Message)
        c.send(msg); c.recv(timeout=2.0)                # anything else, datagram by datagram
    coap_listener(routes, stat_prefix="coap", **cfg)    # a UDP listener with the coap_proxy filter (dict)

The raw client encodes with ``microenvoy.codecs.coap.message`` (so it can send what a conforming client
would never send) and waits with deadlines, never fixed sleeps.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from microenvoy.codecs.coap.message import (
    ACK,
    CON,
    Message,
    Opt,
    decode,
    encode,
    encode_uint,
    sort_options,
)

from .configs import socket_address

__all__ = [
    "COAP_CLIENT",
    "COAP_TYPE",
    "CoapClientResult",
    "RawCoap",
    "coap_client",
    "coap_filter",
    "coap_listener",
    "coap_route",
    "coap_uri",
    "path_options",
]

COAP_TYPE = "type.googleapis.com/microenvoy.extensions.filters.network.coap_proxy.v1.CoapProxy"
COAP_CLIENT = shutil.which("coap-client-notls") or "/usr/bin/coap-client-notls"

GET, POST, PUT, DELETE = 1, 2, 3, 4


# ------------------------------------------------------------------------------------------- config
def coap_route(
    prefix: str = "/",
    cluster: str = "up",
    *,
    timeout: str = "5s",
    name: str | None = None,
    route_extra: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One coap_proxy route (``extra``: observe, max_body_bytes, link ...)."""
    r: dict[str, Any] = {"match": {"prefix": prefix}, "route": {"cluster": cluster, "timeout": timeout}}
    r["route"].update(route_extra or {})
    if name is not None:
        r["name"] = name
    r.update(extra)
    return r


def coap_filter(routes: Sequence[dict[str, Any]], *, stat_prefix: str = "coap", **cfg: Any) -> dict[str, Any]:
    return {
        "name": "microenvoy.filters.network.coap_proxy",
        "typed_config": {"@type": COAP_TYPE, "stat_prefix": stat_prefix, "routes": list(routes), **cfg},
    }


def coap_listener(
    routes: Sequence[dict[str, Any]], *, name: str = "coap", stat_prefix: str = "coap", **cfg: Any
) -> dict[str, Any]:
    """A UDP listener on 127.0.0.1:0 whose chain is the coap_proxy filter (``cfg``: its other fields)."""
    return {
        "name": name,
        "address": socket_address(0, protocol="UDP"),
        "filter_chains": [{"filters": [coap_filter(routes, stat_prefix=stat_prefix, **cfg)]}],
    }


def coap_uri(port: int, path: str = "/") -> str:
    return f"coap://127.0.0.1:{port}{path}"


# ------------------------------------------------------------------------------------- coap-client
@dataclass
class CoapClientResult:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


def coap_client(*args: str, timeout: float = 10.0) -> CoapClientResult:
    """Run ``coap-client-notls ARGS`` to completion (killed after ``timeout``); stdout stays bytes."""
    proc = subprocess.run(
        [COAP_CLIENT, *args], capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
    )
    return CoapClientResult(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))


# ------------------------------------------------------------------------------------------ raw UDP
def path_options(path: str) -> list[tuple[int, bytes]]:
    """``"a/b?x=1&y"`` -> Uri-Path ``a``, ``b`` and Uri-Query ``x=1``, ``y`` options."""
    p, _, q = path.lstrip("/").partition("?")
    opts = [(Opt.URI_PATH, seg.encode()) for seg in p.split("/") if seg]
    opts += [(Opt.URI_QUERY, part.encode()) for part in q.split("&") if part]
    return opts


class RawCoap:
    """A UDP socket talking CoAP datagram by datagram to ``127.0.0.1:port``."""

    def __init__(self, port: int) -> None:
        self.addr = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self._mids = itertools.count(random.randrange(0x10000))
        self.received: list[Message] = []
        """Every message received, in order (also those that ``request`` skipped)."""

    def __enter__(self) -> RawCoap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def __repr__(self) -> str:
        return f"<RawCoap -> {self.addr[0]}:{self.addr[1]} received={len(self.received)}>"

    def next_mid(self) -> int:
        return next(self._mids) & 0xFFFF

    def token(self) -> bytes:
        return os.urandom(4)

    def message(
        self,
        code: int,
        path: str = "",
        *,
        mtype: int = CON,
        mid: int | None = None,
        token: bytes | None = None,
        options: Sequence[tuple[int, bytes]] = (),
        payload: bytes = b"",
        content_format: int | None = None,
    ) -> Message:
        opts = [*path_options(path), *options]
        if content_format is not None:
            opts.append((Opt.CONTENT_FORMAT, encode_uint(content_format)))
        return Message(
            mtype,
            code,
            self.next_mid() if mid is None else mid,
            self.token() if token is None else token,
            sort_options(opts),
            payload,
        )

    def send(self, msg: Message | bytes) -> None:
        self.sock.sendto(msg if isinstance(msg, bytes) else encode(msg), self.addr)

    def recv_raw(self, timeout: float = 3.0) -> bytes:
        """The next datagram (raises ``TimeoutError``)."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, _ = self.sock.recvfrom(65535)
        except TimeoutError:
            raise TimeoutError(f"no datagram within {timeout}s") from None
        return data

    def recv(self, timeout: float = 3.0) -> Message:
        msg = decode(self.recv_raw(timeout))
        self.received.append(msg)
        return msg

    def recv_until(self, predicate: Any, timeout: float = 5.0) -> Message:
        """Receive until ``predicate(msg)``; other messages are kept in ``received``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching message within {timeout}s; got {self.received[-5:]}")
            msg = self.recv(left)
            if predicate(msg):
                return msg

    def ack(self, msg: Message) -> None:
        """Acknowledge a confirmable message of the agent (empty ACK)."""
        self.send(Message(ACK, 0, msg.mid))

    def exchange(self, msg: Message, timeout: float = 5.0) -> Message:
        """Send ``msg`` and return the response carrying its token (a separate CON one is ACKed)."""
        self.send(msg)

        def answer(m: Message) -> bool:
            return m.code != 0 and m.token == msg.token

        reply = self.recv_until(answer, timeout)
        if reply.mtype == CON:
            self.ack(reply)
        return reply

    def request(self, code: int, path: str = "", timeout: float = 5.0, **kwargs: Any) -> Message:
        return self.exchange(self.message(code, path, **kwargs), timeout)
