"""A bare aioquic HTTP/3 server that answers every request with 200 and a small fixed body.

It is the upper limit for the benchmark: the same QUIC + HTTP/3 stack as microenvoy's QUIC listener
(aioquic), with nothing behind it. Request bodies are read and discarded; the answer is sent when the
request stream ends.

    .venv/bin/python bench/bare_h3_server.py [--port 0] [--port-file FILE] [--cert C --key K]

It binds 127.0.0.1 (port 0 by default), prints ``listening on 127.0.0.1:PORT`` and, with ``--port-file``,
writes the bound port there. Without ``--cert``/``--key`` it makes a throwaway self-signed certificate.
Runs on uvloop when it is installed. Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated, QuicEvent

__all__ = ["BODY", "BareH3Protocol", "main", "start_server"]

#: The response body (the same bytes the benchmark's nginx returns).
BODY = b"hello from the benchmark\n"


class BareH3Protocol(QuicConnectionProtocol):
    """One QUIC connection: HTTP/3, 200 + ``BODY`` for every request once its stream has ended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._h3: H3Connection | None = None
        self._headers = [
            (b":status", b"200"),
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(BODY)).encode()),
            (b"server", b"bare-aioquic"),
        ]

    def __repr__(self) -> str:
        return f"<BareH3Protocol h3={'yes' if self._h3 is not None else 'no'}>"

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self._h3 = H3Connection(self._quic)
        if self._h3 is None:
            return
        for ev in self._h3.handle_event(event):
            if isinstance(ev, HeadersReceived | DataReceived) and ev.stream_ended:
                self._h3.send_headers(ev.stream_id, self._headers)
                self._h3.send_data(ev.stream_id, BODY, end_stream=True)


def _self_signed(directory: str) -> tuple[str, str]:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from microenvoy.demo import self_signed_certificate

    return self_signed_certificate(directory)


async def start_server(host: str, port: int, cert: str, key: str) -> tuple[asyncio.DatagramTransport, int]:
    """Serve HTTP/3 on ``host:port``; returns the transport and the bound port."""
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(cert, key)
    server = await serve(host, port, configuration=config, create_protocol=BareH3Protocol)
    transport: asyncio.DatagramTransport = server._transport  # type: ignore[assignment]
    return transport, int(transport.get_extra_info("sockname")[1])


def _write_port(path: str, port: int) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(f"{port}\n")
    os.replace(path + ".tmp", path)


async def _amain(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bare-h3-") as tmp:
        cert, key = (args.cert, args.key) if args.cert else _self_signed(tmp)
        transport, port = await start_server(args.host, args.port, cert, key)
        print(f"listening on {args.host}:{port}", flush=True)
        if args.port_file:
            _write_port(args.port_file, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        transport.close()
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", help="write the bound port to this file")
    p.add_argument("--cert", help="certificate chain (PEM); default: a throwaway self-signed one")
    p.add_argument("--key", help="private key (PEM)")
    args = p.parse_args(argv)
    if bool(args.cert) != bool(args.key):
        p.error("--cert and --key go together")
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_amain(args))


if __name__ == "__main__":
    sys.exit(main())
