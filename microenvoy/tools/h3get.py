"""A tiny HTTP/3 client (aioquic) for trying the agent: ``python -m microenvoy.tools.h3get URL``.

``-d DATA`` sends a POST body, ``-H 'name: value'`` adds headers, ``--grpc METHOD`` makes a unary gRPC call
(the body, ``-d``, is the raw message; the reply message is printed as raw bytes), ``-k`` is implied: the
demo certificate is self-signed, so verification is off unless ``--cacert`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from urllib.parse import urlsplit

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent

__all__ = ["main"]


class _Client(QuicConnectionProtocol):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.h3 = H3Connection(self._quic)
        self.events: list[H3Event] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event: QuicEvent) -> None:
        for ev in self.h3.handle_event(event):
            self.events.append(ev)
            if isinstance(ev, DataReceived | HeadersReceived) and ev.stream_ended and not self.done.done():
                self.done.set_result(None)


async def _run(args: argparse.Namespace) -> int:
    url = urlsplit(args.url)
    host = url.hostname or "127.0.0.1"
    port = url.port or 443
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=host)
    if args.cacert:
        config.load_verify_locations(args.cacert)
    else:
        config.verify_mode = ssl.CERT_NONE
    body = args.data.encode() if args.data is not None else b""
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    method = b"POST" if body or args.grpc else b"GET"
    headers = [(b":method", method), (b":scheme", b"https"), (b":authority", f"{host}:{port}".encode()),
               (b":path", (args.grpc or path).encode()), (b"user-agent", b"microenvoy-h3get")]  # fmt: skip
    if args.grpc:
        headers += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
        body = b"\x00" + len(body).to_bytes(4, "big") + body
    for h in args.header:
        k, _, v = h.partition(":")
        headers.append((k.strip().lower().encode(), v.strip().encode()))
    async with connect(host, port, configuration=config, create_protocol=_Client) as client:
        assert isinstance(client, _Client)
        sid = client._quic.get_next_available_stream_id()
        client.h3.send_headers(sid, headers, end_stream=not body)
        if body:
            client.h3.send_data(sid, body, end_stream=True)
        client.transmit()
        await asyncio.wait_for(client.done, args.timeout)
    out = sys.stdout.buffer
    seen_headers = False
    for ev in client.events:
        if isinstance(ev, HeadersReceived):
            for k, v in ev.headers:
                if args.include or args.grpc:
                    out.write(k + b": " + v + b"\n")
            if not seen_headers and (args.include or args.grpc):
                out.write(b"\n")
            seen_headers = True
        elif isinstance(ev, DataReceived):
            data = ev.data
            if args.grpc and len(data) >= 5:
                data = data[5:] + b"\n"
            out.write(data)
    out.flush()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="h3get", description=__doc__)
    p.add_argument("url")
    p.add_argument("-d", "--data")
    p.add_argument("-H", "--header", action="append", default=[])
    p.add_argument("-i", "--include", action="store_true", help="print response headers")
    p.add_argument("--grpc", metavar="METHOD", help="unary gRPC call, e.g. /microenvoy.demo.v1.Echo/Echo")
    p.add_argument("--cacert")
    p.add_argument("--timeout", type=float, default=10.0)
    return asyncio.run(_run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
