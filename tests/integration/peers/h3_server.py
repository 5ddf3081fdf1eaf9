"""A bare aioquic HTTP/3 server for the peers' self-tests (not the agent): proves ``H3Client`` works.

Runs in the caller's event loop. It keeps a session-ticket store (so resumption and 0-RTT work), answers
``/echo`` with the request body (and the request's trailers plus ``x-server-trailer: done``), ``/status/<n>``
with that status, anything else with a JSON echo. Like the agent must, it answers a non-idempotent request
that arrived in 0-RTT with 425 Too Early, and marks 0-RTT responses with ``x-early-data: 1``.

    async with H3TestServer(certs) as srv:
        async with H3Client("127.0.0.1", srv.port) as c: ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.h3 import events as h3e
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.tls import SessionTicket

from .certs import CertBundle

__all__ = ["H3TestServer"]

_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


@dataclass
class _Req:
    headers: dict[str, str]
    regular: list[tuple[str, str]]
    early: bool
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = field(default_factory=list)


class _ServerProtocol(QuicConnectionProtocol):
    server: H3TestServer

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._h3: H3Connection | None = None
        self._reqs: dict[int, _Req] = {}

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        if isinstance(event, qe.ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self._h3 = H3Connection(self._quic)
        if self._h3 is None:
            return
        for ev in self._h3.handle_event(event):
            self._on_h3(ev)

    def _on_h3(self, ev: h3e.H3Event) -> None:
        assert self._h3 is not None
        if isinstance(ev, h3e.HeadersReceived):
            req = self._reqs.get(ev.stream_id)
            pairs = [(k.decode(), v.decode()) for k, v in ev.headers]
            if req is None:
                early = not self._quic._handshake_complete
                req = _Req(dict(pairs), [(k, v) for k, v in pairs if not k.startswith(":")], early)
                self._reqs[ev.stream_id] = req
                self.server.requests += 1
                self.server.early_requests += int(early)
            else:
                req.trailers = pairs
            if ev.stream_ended:
                self._respond(ev.stream_id)
        elif isinstance(ev, h3e.DataReceived):
            req = self._reqs.get(ev.stream_id)
            if req is not None:
                req.body += ev.data
                if ev.stream_ended:
                    self._respond(ev.stream_id)

    def _respond(self, sid: int) -> None:
        assert self._h3 is not None
        req = self._reqs.pop(sid)
        method, path = req.headers.get(":method", ""), req.headers.get(":path", "")
        status, body, trailers = 200, b"", None
        ctype = "application/json"
        if req.early and method not in _SAFE_METHODS:
            status, body = 425, b"too early"
        elif path.startswith("/status/"):
            status, body = int(path.split("/")[2]), b"status"
        elif path.startswith("/echo"):
            body = bytes(req.body)
            ctype = req.headers.get("content-type", "application/octet-stream")
            if req.trailers or "x-send-trailers" in req.headers:
                trailers = [*req.trailers, ("x-server-trailer", "done")]
        else:
            body = json.dumps(
                {"method": method, "path": path, "headers": req.regular, "body_length": len(req.body)}
            ).encode()
        headers = [(":status", str(status)), ("content-type", ctype)]
        if req.early:
            headers.append(("x-early-data", "1"))
        self._h3.send_headers(sid, [(k.encode(), v.encode()) for k, v in headers], end_stream=False)
        self._h3.send_data(sid, body, end_stream=trailers is None)
        if trailers is not None:
            self._h3.send_headers(sid, [(k.encode(), v.encode()) for k, v in trailers], end_stream=True)
        self.transmit()


class H3TestServer:
    """An in-process aioquic HTTP/3 server on ``127.0.0.1:<port>`` with a session ticket store."""

    def __init__(self, certs: CertBundle) -> None:
        self.certs = certs
        self.port = 0
        self.requests = 0
        self.early_requests = 0
        self.tickets: dict[bytes, SessionTicket] = {}
        self._server: QuicServer | None = None

    async def __aenter__(self) -> H3TestServer:
        cfg = QuicConfiguration(is_client=False, alpn_protocols=list(H3_ALPN))
        cfg.load_cert_chain(str(self.certs.server_chain), str(self.certs.server_key))
        owner = self

        class Protocol(_ServerProtocol):
            server = owner

        self._server = await serve(
            "127.0.0.1",
            0,
            configuration=cfg,
            create_protocol=Protocol,
            session_ticket_fetcher=lambda label: self.tickets.pop(label, None),
            session_ticket_handler=self._store_ticket,
        )
        assert self._server._transport is not None
        self.port = self._server._transport.get_extra_info("sockname")[1]
        return self

    def _store_ticket(self, ticket: SessionTicket) -> None:
        self.tickets[ticket.ticket] = ticket

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def __repr__(self) -> str:
        return f"<H3TestServer port={self.port} requests={self.requests}>"
