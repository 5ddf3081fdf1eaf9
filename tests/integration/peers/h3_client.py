"""An HTTP/3 client for tests, on aioquic: requests, streaming, resumption/0-RTT and connection migration.

    async with H3Client("127.0.0.1", port) as c:
        r = await c.request("GET", "/")
        ticket = await c.wait_session_ticket()
    async with H3Client("127.0.0.1", port, session_ticket=ticket, early_data=True) as c:
        r = await c.request("GET", "/")          # sent in 0-RTT
        assert c.early_data_accepted and c.session_resumed

Migration helpers (the features an external interop runner checks): ``request_key_update()``,
``change_connection_id()`` and ``rebind()`` (NAT rebinding: move the client to a new UDP socket, as aioquic's
interop client does). ``path_challenges_received()`` counts PATH_CHALLENGE frames from the server (needs
``trace=True``). ``grpc_frame`` builds gRPC-over-HTTP/3 request bodies by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3 import events as h3e
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.logger import QuicLogger
from aioquic.tls import Epoch, SessionTicket

from .common import HeaderInput, Response, StreamResetError, header_list
from .grpc_server import grpc_frame, parse_grpc_frames

__all__ = ["H3_ALPN", "H3Client", "H3Stream", "grpc_frame", "parse_grpc_frames"]

_EOF = object()


class H3Stream:
    """One request stream: send the body incrementally, receive the response incrementally."""

    def __init__(self, client: H3Client, stream_id: int) -> None:
        self.client = client
        self.stream_id = stream_id
        loop = asyncio.get_running_loop()
        self._headers: asyncio.Future[tuple[int, list[tuple[str, str]]]] = loop.create_future()
        self._chunks: asyncio.Queue[Any] = asyncio.Queue()
        self.trailers: list[tuple[str, str]] = []
        self.informational: list[tuple[int, list[tuple[str, str]]]] = []
        self.ended = False
        self.error: BaseException | None = None
        self._last_credit = 0
        self._last_acked = 0

    # -------------------------------------------------------------- sending
    def send(self, data: bytes, end_stream: bool = False) -> None:
        """Queue body bytes (aioquic buffers them and sends as flow control allows)."""
        self.client._h3.send_data(self.stream_id, data, end_stream)
        self.client._transmit()

    def send_trailers(self, trailers: HeaderInput) -> None:
        self.client._h3.send_headers(self.stream_id, _enc(header_list(trailers)), end_stream=True)
        self.client._transmit()

    def reset(self, error_code: int = 0x10C) -> None:
        """Abandon the stream (H3_REQUEST_CANCELLED by default)."""
        self.client._quic.reset_stream(self.stream_id, error_code)
        self.client._transmit()

    def send_credit(self) -> int:
        """The flow-control limit the peer granted us on this stream (MAX_STREAM_DATA), in bytes."""
        stream = self.client._quic._streams.get(self.stream_id)
        if stream is not None:
            self._last_credit = int(stream.max_stream_data_remote)
        return self._last_credit

    def bytes_acked(self) -> int:
        """Request-body bytes (HTTP/3 framing included) the peer acknowledged receiving."""
        stream = self.client._quic._streams.get(self.stream_id)
        if stream is not None:
            # aioquic drops the acknowledged prefix of the send buffer and advances this offset
            self._last_acked = int(stream.sender._buffer_start)
        return self._last_acked

    # -------------------------------------------------------------- receiving
    async def response_headers(self, within: float = 10.0) -> tuple[int, list[tuple[str, str]]]:
        return await asyncio.wait_for(asyncio.shield(self._headers), within)

    async def read_chunk(self, within: float = 10.0) -> bytes:
        """The next body chunk; ``b""`` at the end. Raises StreamResetError / ConnectionError."""
        item = await asyncio.wait_for(self._chunks.get(), within)
        if item is _EOF:
            self._chunks.put_nowait(_EOF)
            return b""
        if isinstance(item, BaseException):
            self._chunks.put_nowait(item)
            raise item
        return bytes(item)

    async def chunks(self, within: float = 10.0) -> AsyncIterator[bytes]:
        while True:
            chunk = await self.read_chunk(within)
            if not chunk:
                return
            yield chunk

    async def response(self, within: float = 10.0) -> Response:
        """Wait for the whole response."""

        async def collect() -> Response:
            status, headers = await self._headers
            body = bytearray()
            async for chunk in self.chunks(within):
                body += chunk
            return Response(status, headers, bytes(body), list(self.trailers))

        return await asyncio.wait_for(collect(), within)

    # -------------------------------------------------------------- events from the client
    def _on_headers(self, headers: list[tuple[str, str]], ended: bool) -> None:
        if not self._headers.done():
            status = 0
            rest: list[tuple[str, str]] = []
            for k, v in headers:
                if k == ":status":
                    status = int(v)
                else:
                    rest.append((k, v))
            if 100 <= status < 200:
                self.informational.append((status, rest))
                return
            self._headers.set_result((status, rest))
        else:
            self.trailers = headers
        if ended:
            self._end()

    def _on_data(self, data: bytes, ended: bool) -> None:
        if data:
            self._chunks.put_nowait(data)
        if ended:
            self._end()

    def _end(self) -> None:
        self.ended = True
        self._chunks.put_nowait(_EOF)

    def __repr__(self) -> str:
        return f"<H3Stream {self.stream_id} ended={self.ended} error={self.error!r}>"

    def _fail(self, exc: BaseException) -> None:
        if self.ended:
            return
        self.error = exc
        if not self._headers.done():
            self._headers.set_exception(exc)
            self._headers.exception()  # mark retrieved; read_chunk re-raises it
        self._chunks.put_nowait(exc)


def _enc(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class _Protocol(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection, client: H3Client) -> None:
        super().__init__(quic)
        self.client = client
        self.h3 = H3Connection(quic)

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        self.client._on_quic_event(event)
        for h3_event in self.h3.handle_event(event):
            self.client._on_h3_event(h3_event)


class H3Client:
    """An HTTP/3 client connection; use as an async context manager."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        alpn: tuple[str, ...] = ("h3",),
        ca: str | None = None,
        server_name: str = "localhost",
        session_ticket: SessionTicket | None = None,
        early_data: bool = False,
        trace: bool = False,
        authority: str | None = None,
        idle_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_datagram_size: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.authority = authority or f"{server_name}:{port}"
        self.early_data = early_data
        self.connect_timeout = connect_timeout
        cfg = QuicConfiguration(
            is_client=True, alpn_protocols=list(alpn), server_name=server_name, idle_timeout=idle_timeout
        )
        if max_datagram_size is not None:
            cfg.max_datagram_size = max_datagram_size
        if ca is None:
            cfg.verify_mode = ssl.CERT_NONE
        else:
            cfg.load_verify_locations(cafile=ca)
        if session_ticket is not None:
            cfg.session_ticket = session_ticket
        self.quic_logger: QuicLogger | None = QuicLogger() if trace else None
        cfg.quic_logger = self.quic_logger
        self.configuration = cfg
        self.tickets: list[SessionTicket] = []
        self.session_resumed: bool | None = None
        self.early_data_accepted: bool | None = None
        self.alpn: str | None = None
        self.terminated: qe.ConnectionTerminated | None = None
        self._ticket_event = asyncio.Event()
        self._handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._streams: dict[int, H3Stream] = {}
        self._protocol: _Protocol | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._quic: QuicConnection = QuicConnection(configuration=cfg, session_ticket_handler=self._on_ticket)

    # -------------------------------------------------------------- lifecycle
    def _family(self) -> tuple[socket.AddressFamily, str]:
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return socket.AF_INET, "127.0.0.1"
        return (socket.AF_INET6, "::1") if ip.version == 6 else (socket.AF_INET, "127.0.0.1")

    def _new_socket(self) -> socket.socket:
        family, local = self._family()
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((local, 0))
        except BaseException:
            sock.close()
            raise
        return sock

    async def __aenter__(self) -> H3Client:
        loop = asyncio.get_running_loop()
        sock = self._new_socket()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _Protocol(self._quic, self), sock=sock
        )
        self._transport = transport
        self._protocol = protocol
        try:
            protocol.connect((self.host, self.port), transmit=True)
            if not self.early_data:
                await self.wait_handshake(self.connect_timeout)
        except BaseException:
            transport.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._protocol is None:
            return
        self._protocol.close()
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            await asyncio.wait_for(self._protocol.wait_closed(), 3)
        if self._protocol._transport is not None:
            self._protocol._transport.close()
        self._protocol = None

    async def wait_handshake(self, within: float = 10.0) -> None:
        """Wait for the handshake to complete (needed before key updates)."""
        await asyncio.wait_for(asyncio.shield(self._handshake), within)

    async def wait_session_ticket(self, within: float = 5.0) -> SessionTicket:
        """Wait for a NewSessionTicket from the server; returns the latest one."""
        await asyncio.wait_for(self._ticket_event.wait(), within)
        return self.tickets[-1]

    @property
    def session_ticket(self) -> SessionTicket | None:
        return self.tickets[-1] if self.tickets else None

    @property
    def _h3(self) -> H3Connection:
        assert self._protocol is not None, "not connected"
        return self._protocol.h3

    def _transmit(self) -> None:
        if self._protocol is not None:
            self._protocol.transmit()

    # -------------------------------------------------------------- requests
    def open_stream(
        self,
        method: str,
        path: str,
        headers: HeaderInput = (),
        *,
        authority: str | None = None,
        scheme: str = "https",
        end_stream: bool = False,
    ) -> H3Stream:
        """Send request headers on a new stream; send the body with ``H3Stream.send``."""
        if self.terminated is not None:
            raise ConnectionError(f"connection terminated: {self.terminated}")
        sid = self._quic.get_next_available_stream_id()
        stream = H3Stream(self, sid)
        self._streams[sid] = stream
        hdrs = [
            (":method", method),
            (":scheme", scheme),
            (":authority", authority or self.authority),
            (":path", path),
            *header_list(headers),
        ]
        self._h3.send_headers(sid, _enc(hdrs), end_stream=end_stream)
        self._transmit()
        return stream

    async def request(
        self,
        method: str,
        path: str,
        headers: HeaderInput = (),
        body: bytes = b"",
        trailers: HeaderInput | None = None,
        *,
        authority: str | None = None,
        within: float = 10.0,
    ) -> Response:
        """Send a whole request and wait for the whole response."""
        stream = self.open_stream(
            method, path, headers, authority=authority, end_stream=not body and trailers is None
        )
        if body:
            stream.send(body, end_stream=trailers is None)
        if trailers is not None:
            stream.send_trailers(trailers)
        return await stream.response(within)

    # -------------------------------------------------------------- migration and keys
    def request_key_update(self) -> None:
        """Start a key update (the next 1-RTT packet uses the next key phase)."""
        assert self._protocol is not None
        self._protocol.request_key_update()

    @property
    def key_phase(self) -> int:
        return int(self._quic._cryptos[Epoch.ONE_RTT].key_phase)

    @property
    def peer_cid(self) -> bytes:
        """The connection ID we currently send to (chosen by the server)."""
        return bytes(self._quic._peer_cid.cid)

    def spare_peer_cids(self) -> int:
        """How many unused connection IDs the server has issued to us."""
        return len(self._quic._peer_cid_available)

    def change_connection_id(self) -> tuple[bytes, bytes]:
        """Switch to the next connection ID the server issued; returns ``(old, new)``."""
        assert self._protocol is not None
        old = self.peer_cid
        self._protocol.change_connection_id()
        return old, self.peer_cid

    @property
    def local_address(self) -> tuple[str, int]:
        assert self._protocol is not None
        assert self._protocol._transport is not None
        addr = self._protocol._transport.get_extra_info("sockname")
        return addr[0], addr[1]

    async def rebind(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """NAT rebinding: move the connection to a new local UDP port; returns ``(old, new)`` addresses.

        Like aioquic's interop client: close the current transport and attach the same protocol to a new
        socket. The server sees packets from a new address and must validate and adopt it.
        """
        protocol = self._protocol
        assert protocol is not None
        assert protocol._transport is not None
        old = self.local_address
        loop = asyncio.get_running_loop()
        sock = self._new_socket()
        protocol._transport.close()
        await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
        # Announce the new path at once with an ack-eliciting PING. Without it, a client that is only
        # receiving may send nothing more: the server's packets go to the closed old port, no ACK is due,
        # and the connection stalls until an idle timeout (a race that made transfer tests flaky).
        self._quic.send_ping(0)
        protocol.transmit()
        return old, self.local_address

    async def ping(self, within: float = 5.0) -> None:
        assert self._protocol is not None
        await asyncio.wait_for(self._protocol.ping(), within)

    def path_challenges_received(self) -> int:
        """PATH_CHALLENGE frames received from the server (requires ``trace=True``)."""
        assert self.quic_logger is not None, "construct the client with trace=True"
        count = 0
        for trace in self.quic_logger._traces:
            for ev in trace._events:
                if ev["name"] == "transport:packet_received":
                    count += sum(1 for f in ev["data"]["frames"] if f.get("frame_type") == "path_challenge")
        return count

    def qpack_stats(self) -> dict[str, int]:
        """Bytes on the QPACK encoder/decoder streams (non-zero means the dynamic table is in use)."""
        h3 = self._h3
        return {
            "encoder_bytes_sent": h3._encoder_bytes_sent,
            "encoder_bytes_received": h3._encoder_bytes_received,
            "decoder_bytes_sent": h3._decoder_bytes_sent,
            "decoder_bytes_received": h3._decoder_bytes_received,
        }

    # -------------------------------------------------------------- events
    def _on_ticket(self, ticket: SessionTicket) -> None:
        self.tickets.append(ticket)
        self._ticket_event.set()

    def _on_quic_event(self, event: qe.QuicEvent) -> None:
        if isinstance(event, qe.HandshakeCompleted):
            self.alpn = event.alpn_protocol
            self.session_resumed = event.session_resumed
            self.early_data_accepted = event.early_data_accepted
            if not self._handshake.done():
                self._handshake.set_result(None)
        elif isinstance(event, qe.StreamReset):
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                stream._fail(StreamResetError(event.stream_id, event.error_code))
        elif isinstance(event, qe.ConnectionTerminated):
            self.terminated = event
            exc = ConnectionError(
                f"connection terminated: error 0x{event.error_code:x} {event.reason_phrase!r}"
            )
            if not self._handshake.done():
                self._handshake.set_exception(exc)
                self._handshake.exception()
            for stream in self._streams.values():
                stream._fail(exc)
            self._streams.clear()

    def _on_h3_event(self, event: h3e.H3Event) -> None:
        if isinstance(event, h3e.HeadersReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._on_headers(header_list(event.headers), event.stream_ended)
                if event.stream_ended:
                    self._streams.pop(event.stream_id, None)
        elif isinstance(event, h3e.DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._on_data(event.data, event.stream_ended)
                if event.stream_ended:
                    self._streams.pop(event.stream_id, None)

    def __repr__(self) -> str:
        return (
            f"<H3Client {self.host}:{self.port} streams={len(self._streams)} "
            f"resumed={self.session_resumed} early_data={self.early_data_accepted}>"
        )
