"""The QUIC listener: UDP datagrams in, HTTP/3 exchanges out.

``QuicListener`` is the datagram endpoint. It parses each packet's header, answers unknown versions with
Version Negotiation (RFC 9000 section 6), optionally validates the client's address with a Retry whose
token key survives restarts (section 8.1.2), and routes every datagram by destination connection ID, never
by address, so connection ID changes, NAT rebinding and client migration (section 9) keep working: aioquic
validates the new path, the listener only follows the IDs the connection issues and retires.

``QuicHttpConnection`` runs one ``ProxyQuicConnection`` + ``Http3ServerCodec`` and is the
``DownstreamConnection`` for its exchanges. It keeps the aioquic timer, transmits after every event,
holds streams to a bounded send buffer, and reports resumption and 0-RTT in stats.

Session resumption uses a bounded, single-use ``SessionTicketStore``; 0-RTT is accepted (when
``early_data`` is on) and the codec refuses non-idempotent requests in it with 425.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from aioquic._buffer import Buffer
from aioquic.h3.connection import H3_ALPN
from aioquic.quic import events as qe
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import TRANSPORT_CLOSE_FRAME_CAPACITY
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicPacketBuilder

from microenvoy.codecs.http3 import Http3ServerCodec
from microenvoy.codecs.quic import ProxyQuicConnection, RetryTokens, SessionTicketStore
from microenvoy.config.model import DownstreamTlsContext, QuicOptions
from microenvoy.core.events import (
    ConnectionTerminated,
    DataReceived,
    HeadersReceived,
    ProtocolFailure,
    StreamReset,
    TrailersReceived,
)
from microenvoy.core.exchange import DownstreamInfo
from microenvoy.core.headers import Headers
from microenvoy.io.http_front import ActiveStream, HttpFront
from microenvoy.io.tcp_front import ListenerStats

if TYPE_CHECKING:
    from microenvoy.admin.stats import Scope

__all__ = ["QuicHttpConnection", "QuicListener", "load_retry_key", "quic_configuration"]

log = logging.getLogger("microenvoy.quic")


def load_retry_key(path: str | None) -> bytes:
    """The Retry token key from ``path`` (created with mode 0600 if missing), or a random one."""
    if path is None:
        return os.urandom(32)
    try:
        with open(path, "rb") as f:
            key = f.read()
        if len(key) in (16, 32):
            return key
        raise ValueError(f"{path}: retry token key must be 16 or 32 bytes, found {len(key)}")
    except FileNotFoundError:
        key = os.urandom(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        return key


def quic_configuration(options: QuicOptions, tls: DownstreamTlsContext) -> QuicConfiguration:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    cfg = QuicConfiguration(
        is_client=False,
        alpn_protocols=list(tls.common_tls_context.alpn_protocols or H3_ALPN),
        max_data=options.initial_connection_window_size,
        max_stream_data=options.initial_stream_window_size,
        idle_timeout=options.idle_timeout,
    )
    cert = tls.common_tls_context.tls_certificates[0]
    chain = x509.load_pem_x509_certificates(cert.certificate_chain.read())
    cfg.certificate = chain[0]
    cfg.certificate_chain = chain[1:]
    cfg.private_key = load_pem_private_key(cert.private_key.read(), password=None)
    return cfg


class _QuicStats:
    def __init__(self, scope: Scope) -> None:
        c = scope.counter
        self.handshakes = c("quic.handshake_completed")
        self.resumed = c("quic.session_resumed")
        self.early_data = c("quic.early_data_accepted")
        self.retry_sent = c("quic.retry_sent")
        self.retry_invalid = c("quic.retry_token_invalid")
        self.version_negotiation = c("quic.version_negotiation_sent")
        self.packets_dropped = c("quic.packets_dropped")
        self.migrations = c("quic.path_changes")
        self.cid_issued = c("quic.connection_id_issued")


class QuicHttpConnection:
    """One QUIC connection carrying HTTP/3 (the ``DownstreamConnection`` of its exchanges)."""

    def __init__(self, listener: QuicListener, quic: ProxyQuicConnection, addr: tuple[Any, ...]) -> None:
        self.listener = listener
        self.front: HttpFront = listener.front
        self.quic = quic
        cfg = self.front.config
        self.codec = Http3ServerCodec(
            quic, max_header_bytes=cfg.max_request_headers_kb * 1024, max_headers_count=cfg.max_headers_count
        )
        self.streams: dict[int, ActiveStream] = {}
        self.downstream = DownstreamInfo(
            "HTTP/3", (str(addr[0]), int(addr[1])), listener.local_address, listener.name, True
        )
        self._addr = addr
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._send_waiters: dict[int, asyncio.Future[None]] = {}
        self._closed = False
        self._draining = False
        self._transmit_scheduled = False
        self.cids: set[bytes] = set()
        self._send_limit = max(64 * 1024, listener.options.initial_stream_window_size)

    def __repr__(self) -> str:
        return f"<QuicHttpConnection {self._addr} streams={len(self.streams)} closed={self._closed}>"

    # ---------------------------------------------------------------------------------- input
    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.quic.receive_datagram(data, addr, now=time.monotonic())
        self._process()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = time.monotonic()
        at = self.quic.get_timer()
        if at is None:
            return
        if at > now + 0.0005:  # woke up early for a deadline that has since moved: sleep again
            self.transmit()
            return
        self.quic.handle_timer(now=max(now, at))
        self._process()

    def _process(self) -> None:
        quic = self.quic
        listener = self.listener
        while True:
            ev = quic.next_event()
            if ev is None:
                break
            if isinstance(ev, qe.ConnectionIdIssued):
                listener.register(ev.connection_id, self)
                listener.qstats.cid_issued.inc()
            elif isinstance(ev, qe.ConnectionIdRetired):
                listener.unregister(ev.connection_id)
            elif isinstance(ev, qe.HandshakeCompleted):
                listener.qstats.handshakes.inc()
                if ev.session_resumed:
                    listener.qstats.resumed.inc()
                if ev.early_data_accepted:
                    listener.qstats.early_data.inc()
            elif isinstance(ev, qe.ConnectionTerminated):
                self._handle(self.codec.handle_quic_event(ev))
                self._terminated()
                return
            else:
                self._handle(self.codec.handle_quic_event(ev))
        self._wake_senders()
        self.transmit()

    def _handle(self, events: list[Any]) -> None:
        front = self.front
        for ev in events:
            if isinstance(ev, HeadersReceived):
                stream = ActiveStream(front, self, ev.stream_id, ev.headers, ev.end_stream,
                                      early_data=ev.early_data)  # fmt: skip
                self.streams[ev.stream_id] = stream
            elif isinstance(ev, DataReceived):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.on_data(ev.data, ev.end_stream, ev.flow_controlled_length)
                else:
                    self.quic.consumed(ev.stream_id, ev.flow_controlled_length)
            elif isinstance(ev, TrailersReceived):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.on_trailers(ev.trailers)
            elif isinstance(ev, StreamReset):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.on_reset()
            elif isinstance(ev, ProtocolFailure):
                front.count_failure(ev, self.downstream)
            elif isinstance(ev, ConnectionTerminated):
                for s in list(self.streams.values()):
                    s.on_reset("connection_closed")

    def _terminated(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in list(self.streams.values()):
            s.on_reset("connection_closed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in self._send_waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionResetError("QUIC connection closed"))
                fut.exception()
        self._send_waiters.clear()
        self.listener.connection_closed(self)

    # ------------------------------------------------------------------------------- output
    def _transmit_soon(self) -> None:
        """Coalesce: everything the exchanges queue in this loop iteration leaves in one flush, so a
        response's HEADERS and DATA share packets instead of one datagram each."""
        if not self._transmit_scheduled:
            self._transmit_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_transmit)

    def _scheduled_transmit(self) -> None:
        self._transmit_scheduled = False
        self.transmit()

    def transmit(self) -> None:
        transport = self.listener.transport
        if transport is None:
            return
        quic = self.quic
        now = time.monotonic()
        sent = 0
        for data, addr in quic.datagrams_to_send(now=now):
            transport.sendto(data, addr)
            sent += len(data)
        if sent:
            self.front.stats.cx_tx_bytes.inc(sent)
        at = quic.get_timer()
        # Re-arm only when the connection needs waking *earlier*: the deadline moves on nearly every
        # flush, and a timer that fires early just re-arms (see _on_timer).
        if at is not None and (self._timer_at is None or at < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            loop = asyncio.get_running_loop()
            # loop.time() and time.monotonic() may differ (uvloop): schedule relative to now.
            self._timer = loop.call_at(loop.time() + max(0.0, at - now), self._on_timer)

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        if self._closed:
            return
        self.codec.send_headers(stream_id, headers, end_stream)
        self._transmit_soon()

    async def send_body(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if self._closed:
            return
        self.codec.send_data(stream_id, data, end_stream)
        self._transmit_soon()
        while not self._closed and self.codec.send_buffered(stream_id) > self._send_limit:
            fut = self._send_waiters.get(stream_id)
            if fut is None or fut.done():
                fut = self._send_waiters[stream_id] = asyncio.get_running_loop().create_future()
            await fut

    def _wake_senders(self) -> None:
        if not self._send_waiters:
            return
        for sid, fut in list(self._send_waiters.items()):
            if self.codec.send_buffered(sid) <= self._send_limit // 2 and not fut.done():
                fut.set_result(None)
                del self._send_waiters[sid]

    def send_trailers(self, stream_id: int, trailers: Headers) -> None:
        if self._closed:
            return
        self.codec.send_trailers(stream_id, trailers)
        self._transmit_soon()

    def reset_stream(self, stream_id: int) -> None:
        if self._closed:
            return
        self.codec.reset_stream(stream_id)
        self._transmit_soon()

    def acknowledge(self, stream_id: int, n: int) -> None:
        if n and not self._closed:
            self.codec.acknowledge(stream_id, n)
            self._transmit_soon()

    def stream_closed(self, stream: ActiveStream) -> None:
        self.streams.pop(stream.stream_id, None)
        self.quic.release(stream.stream_id)
        fut = self._send_waiters.pop(stream.stream_id, None)
        if fut is not None and not fut.done():
            fut.set_result(None)
        if self._draining and not self.streams:
            self.close()

    def drain(self) -> None:
        if self._draining or self._closed:
            return
        self._draining = True
        self.front.stats.cx_drain_close.inc()
        self.codec.goaway()
        self._transmit_soon()
        if not self.streams:
            self.close()

    def close(self, error_code: int = 0x100, reason: str = "") -> None:  # H3_NO_ERROR
        if self._closed:
            return
        self.quic.close(error_code=error_code, reason_phrase=reason)
        self._transmit_soon()


class QuicListener(asyncio.DatagramProtocol):
    """A bound UDP socket serving QUIC + HTTP/3 for one listener."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        front: HttpFront,
        *,
        options: QuicOptions,
        tls: DownstreamTlsContext,
        stats: Scope,
        max_connections: int | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.front = front
        self.options = options
        self.configuration = quic_configuration(options, tls)
        self.max_connections = max_connections
        self.stats = ListenerStats(stats)
        self.qstats = _QuicStats(front.scope)
        self.tickets = SessionTicketStore(options.session_ticket_store_size)
        self.retry: RetryTokens | None = (
            RetryTokens(load_retry_key(options.retry_token_key_file)) if options.retry else None
        )
        self.transport: asyncio.DatagramTransport | None = None
        self._by_cid: dict[bytes, QuicHttpConnection] = {}
        self.connections: set[QuicHttpConnection] = set()
        self.bound_port = 0
        self.local_address: tuple[str, int] = (host, port)
        self._accepting = True

    def __repr__(self) -> str:
        return f"<QuicListener {self.name} {self.host}:{self.bound_port} cx={len(self.connections)}>"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, self.port))
        self.transport = transport
        sock = self.transport.get_extra_info("sockname")
        self.bound_port = int(sock[1])
        self.local_address = (str(sock[0]), self.bound_port)

    def update(self, front: HttpFront, options: QuicOptions, tls: DownstreamTlsContext,
               max_connections: int | None) -> None:  # fmt: skip
        """Reload: new connections get the new front, certificate and limits."""
        self.front = front
        self.options = options
        self.configuration = quic_configuration(options, tls)
        self.max_connections = max_connections

    # ------------------------------------------------------------------------------ dispatch
    def register(self, cid: bytes, conn: QuicHttpConnection) -> None:
        self._by_cid[cid] = conn
        conn.cids.add(cid)

    def unregister(self, cid: bytes) -> None:
        conn = self._by_cid.pop(cid, None)
        if conn is not None:
            conn.cids.discard(cid)

    def connection_closed(self, conn: QuicHttpConnection) -> None:
        for cid in list(conn.cids):
            self._by_cid.pop(cid, None)
        conn.cids.clear()
        if conn in self.connections:
            self.connections.discard(conn)
            self.stats.cx_active.dec()
            self.stats.cx_destroy.inc()
            self.front.stats.cx_active.dec()
            self.front.stats.cx_destroy.inc()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            self._datagram(data, addr)
        except Exception:  # a malformed datagram must never take the listener down
            self.qstats.packets_dropped.inc()
            log.warning("dropped a datagram from %s", addr, exc_info=log.isEnabledFor(logging.DEBUG))

    def _datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        buf = Buffer(data=data)
        try:
            header = pull_quic_header(buf, host_cid_length=self.configuration.connection_id_length)
        except ValueError:
            self.qstats.packets_dropped.inc()
            return
        conn = self._by_cid.get(header.destination_cid)
        if conn is not None:
            self.front.stats.cx_rx_bytes.inc(len(data))
            conn.datagram_received(data, addr)
            return
        transport = self.transport
        assert transport is not None
        versions = self.configuration.supported_versions
        if header.version is not None and header.version not in versions:
            if header.packet_type != QuicPacketType.VERSION_NEGOTIATION and len(data) >= 1200:
                # Never answer a VN packet with VN (no reflection loops); only to full-size Initials.
                transport.sendto(
                    encode_quic_version_negotiation(
                        source_cid=header.destination_cid,
                        destination_cid=header.source_cid,
                        supported_versions=versions,
                    ),
                    addr,
                )
                self.qstats.version_negotiation.inc()
            return
        if header.packet_type != QuicPacketType.INITIAL or len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            self.qstats.packets_dropped.inc()
            return
        if not self._accepting:
            return
        if self.max_connections is not None and len(self.connections) >= self.max_connections:
            self.stats.cx_overflow.inc()
            return
        assert header.version is not None
        original_dcid = header.destination_cid
        retry_scid: bytes | None = None
        if self.retry is not None:
            now = time.time()  # wall clock: tokens outlive a restart, monotonic time does not
            if not header.token:
                scid = os.urandom(8)
                transport.sendto(
                    encode_quic_retry(
                        version=header.version,
                        source_cid=scid,
                        destination_cid=header.source_cid,
                        original_destination_cid=header.destination_cid,
                        retry_token=self.retry.create(addr, header.destination_cid, scid, now),
                    ),
                    addr,
                )
                self.qstats.retry_sent.inc()
                return
            try:
                original_dcid = self.retry.validate(addr, header.destination_cid, header.token, now)
            except ValueError as exc:
                self.qstats.retry_invalid.inc()
                log.info("invalid retry token from %s: %s", addr, exc)
                transport.sendto(
                    _invalid_token_close(header.version, header.destination_cid, header.source_cid), addr
                )
                return
            retry_scid = header.destination_cid
        opts = self.options
        quic = ProxyQuicConnection(
            configuration=self.configuration,
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
            session_ticket_fetcher=self.tickets.pop,
            session_ticket_handler=self.tickets.add,
            stream_window=opts.initial_stream_window_size,
            connection_window=opts.initial_connection_window_size,
            early_data=opts.early_data,
        )
        quic._local_max_streams_bidi.value = quic._local_max_streams_bidi.sent = opts.max_concurrent_streams
        conn = QuicHttpConnection(self, quic, addr)
        self.connections.add(conn)
        self.stats.cx_total.inc()
        self.stats.cx_active.inc()
        self.front.stats.cx_total.inc()
        self.front.stats.cx_active.inc()
        self.front.stats.cx_http3.inc()
        self.register(header.destination_cid, conn)
        self.register(quic.host_cid, conn)
        self.front.stats.cx_rx_bytes.inc(len(data))
        conn.datagram_received(data, addr)

    # ------------------------------------------------------------------------------- lifecycle
    def drain(self) -> None:
        for c in list(self.connections):
            c.drain()

    async def stop_accepting(self) -> None:
        self._accepting = False

    def close_all(self) -> None:
        for c in list(self.connections):
            c.close()
        if self.transport is not None:
            self.transport.close()


def _invalid_token_close(version: int, dcid: bytes, scid: bytes) -> bytes:
    """An Initial carrying CONNECTION_CLOSE(INVALID_TOKEN) (RFC 9000 section 8.1.3)."""
    crypto = CryptoPair()
    crypto.setup_initial(cid=dcid, is_client=False, version=version)
    builder = QuicPacketBuilder(
        host_cid=dcid, is_client=False, max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE, peer_cid=scid,
        version=version,
    )  # fmt: skip
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    frame = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE, capacity=TRANSPORT_CLOSE_FRAME_CAPACITY)
    frame.push_uint_var(QuicErrorCode.INVALID_TOKEN)
    frame.push_uint_var(QuicFrameType.PADDING)
    frame.push_uint_var(0)
    datagrams, _ = builder.flush()
    return datagrams[0]
