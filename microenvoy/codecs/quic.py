"""aioquic's QUIC connection with the two things a proxy needs that it lacks.

1. **Flow control by consumption.** aioquic raises MAX_DATA / MAX_STREAM_DATA as soon as data *arrives*
   (doubling the window whenever half of it was received), so a client can push far more than the agent can
   forward. Here a request stream's credit follows what the front *consumed* (forwarded upstream): the limit
   slides to ``consumed + window`` (RFC 9000 section 4.2), so unforwarded bytes per stream never exceed the
   configured window. Control and QPACK streams keep aioquic's behaviour (H3 consumes them at once).
2. **0-RTT bookkeeping.** Streams whose STREAM frames arrived in 0-RTT packets are recorded so the HTTP/3
   codec can refuse non-idempotent requests in early data (RFC 8470, RFC 9114 section 10.9).

Both hook private methods of ``aioquic.quic.connection.QuicConnection`` (``_write_connection_limits``,
``_write_stream_limits``, ``_handle_stream_frame``); ``tests/unit/codecs/test_quic.py`` pins the behaviour so
an aioquic upgrade that changes them fails loudly.
"""

from __future__ import annotations

from typing import Any

from aioquic import tls
from aioquic._buffer import Buffer
from aioquic.quic.connection import QuicConnection, QuicReceiveContext
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.stream import QuicStream

__all__ = ["ProxyQuicConnection", "RetryTokens", "SessionTicketStore"]


class ProxyQuicConnection(QuicConnection):
    """A server-side QUIC connection with consumption-based receive windows and 0-RTT tracking."""

    def __init__(self, *, stream_window: int, connection_window: int, early_data: bool = True,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._unconsumed: dict[int, int] = {}
        """Request stream id -> payload bytes handed to the front but not yet consumed."""
        self._unconsumed_total = 0
        self._early_data_enabled = early_data
        self.early_streams: set[int] = set()
        """Request streams that carried 0-RTT data."""

    def __repr__(self) -> str:
        return (
            f"<ProxyQuicConnection cid={self.host_cid.hex()} streams={len(self._streams)}"
            f" unconsumed={self._unconsumed_total}>"
        )

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._early_data_enabled:
            # Tickets then carry no early_data extension, so clients never attempt 0-RTT.
            self.tls._max_early_data = None

    # ---------------------------------------------------------------------------- accounting
    def delivered(self, stream_id: int, n: int) -> None:
        """``n`` payload bytes of ``stream_id`` were handed to the front (not yet consumed)."""
        if n:
            self._unconsumed[stream_id] = self._unconsumed.get(stream_id, 0) + n
            self._unconsumed_total += n

    def consumed(self, stream_id: int, n: int) -> None:
        """The front forwarded ``n`` bytes of ``stream_id``: their credit may go back to the peer."""
        left = self._unconsumed.get(stream_id)
        if left is None or not n:
            return
        n = min(n, left)
        self._unconsumed_total -= n
        if left - n:
            self._unconsumed[stream_id] = left - n
        else:
            del self._unconsumed[stream_id]

    def release(self, stream_id: int) -> None:
        """The stream is over: whatever it held no longer counts against the connection window."""
        left = self._unconsumed.pop(stream_id, 0)
        self._unconsumed_total -= left
        self.early_streams.discard(stream_id)

    def unconsumed(self, stream_id: int | None = None) -> int:
        if stream_id is None:
            return self._unconsumed_total
        return self._unconsumed.get(stream_id, 0)

    # ------------------------------------------------------------------------ aioquic hooks
    def _write_connection_limits(self, builder: QuicPacketBuilder, space: Any) -> None:
        limit = self._local_max_data
        target = limit.used - self._unconsumed_total + self._connection_window
        if target - limit.value >= self._connection_window // 4:
            limit.value = target
        # Hide the received byte count so aioquic's receive-driven doubling does not fire.
        used = limit.used
        limit.used = 0
        try:
            super()._write_connection_limits(builder, space)
        finally:
            limit.used = used

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: Any, stream: QuicStream) -> None:
        sid = stream.stream_id
        if sid is None or sid & 3 or not stream.max_stream_data_local:
            super()._write_stream_limits(builder, space, stream)
            return
        receiver = stream.receiver
        target = receiver.highest_offset - self._unconsumed.get(sid, 0) + self._stream_window
        if target - stream.max_stream_data_local >= self._stream_window // 4:
            stream.max_stream_data_local = target
        elif stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return  # nothing to announce (the common case: called per stream per packet)
        highest = receiver.highest_offset
        receiver.highest_offset = 0
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            receiver.highest_offset = highest

    def _handle_stream_frame(self, context: QuicReceiveContext, frame_type: int, buf: Buffer) -> None:
        if context.epoch == tls.Epoch.ZERO_RTT:
            start = buf.tell()
            self.early_streams.add(buf.pull_uint_var())
            buf.seek(start)
        super()._handle_stream_frame(context, frame_type, buf)


class RetryTokens:
    """Retry tokens (RFC 9000 section 8.1.2) sealed with a key the operator keeps across restarts.

    aioquic's own handler draws a random key per process, so a restart invalidates every token in flight;
    here the key is an input (the QUIC listener loads it from ``retry_token_key_file``). A token binds the
    client's address, the original and the Retry source connection IDs and the issue time, and is valid
    for ``lifetime`` seconds (clients use it within one round trip).
    """

    VERSION = 1

    def __init__(self, key: bytes, lifetime: float = 30.0) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(key) not in (16, 32):
            raise ValueError("retry token key must be 16 or 32 bytes")
        self._aead = AESGCM(key)
        self.lifetime = lifetime

    def __repr__(self) -> str:
        return f"<RetryTokens lifetime={self.lifetime}>"

    @staticmethod
    def _address(addr: tuple[Any, ...]) -> bytes:
        import ipaddress

        return ipaddress.ip_address(addr[0]).packed + int(addr[1]).to_bytes(2, "big")

    def create(self, addr: tuple[Any, ...], original_dcid: bytes, retry_scid: bytes, now: float) -> bytes:
        import os

        plain = (
            bytes([len(original_dcid)]) + original_dcid + bytes([len(retry_scid)]) + retry_scid
            + int(now * 1000).to_bytes(8, "big")
        )  # fmt: skip
        nonce = os.urandom(12)
        return bytes([self.VERSION]) + nonce + self._aead.encrypt(nonce, plain, self._address(addr))

    def validate(self, addr: tuple[Any, ...], dcid: bytes, token: bytes, now: float) -> bytes:
        """The original destination connection ID, or ValueError naming what is wrong."""
        from cryptography.exceptions import InvalidTag

        if len(token) < 1 + 12 + 16 or token[0] != self.VERSION:
            raise ValueError("malformed retry token")
        try:
            plain = self._aead.decrypt(token[1:13], token[13:], self._address(addr))
        except InvalidTag:
            raise ValueError("retry token does not verify (wrong key or client address)") from None
        n = plain[0]
        odcid = plain[1 : 1 + n]
        m = plain[1 + n]
        rscid = plain[2 + n : 2 + n + m]
        issued = int.from_bytes(plain[2 + n + m : 10 + n + m], "big") / 1000.0
        if rscid != dcid:
            raise ValueError("retry token was issued for another connection ID")
        if not 0 <= now - issued <= self.lifetime:
            raise ValueError("retry token expired")
        return odcid


class SessionTicketStore:
    """Server-side TLS 1.3 resumption tickets, bounded (LRU) and single-use.

    Single use (a ticket is removed when a client presents it) is the anti-replay measure of RFC 8446
    section 8.1 for 0-RTT: a replayed ClientHello finds no ticket and falls back to a full handshake, so its
    early data is never accepted twice by this server.
    """

    def __init__(self, capacity: int = 4096) -> None:
        from collections import OrderedDict

        self.capacity = capacity
        self._tickets: OrderedDict[bytes, tls.SessionTicket] = OrderedDict()
        self.issued = 0
        self.resumed = 0

    def __repr__(self) -> str:
        return f"<SessionTicketStore {len(self._tickets)}/{self.capacity}>"

    def __len__(self) -> int:
        return len(self._tickets)

    def add(self, ticket: tls.SessionTicket) -> None:
        if self.capacity <= 0:
            return
        self._tickets[ticket.ticket] = ticket
        self.issued += 1
        while len(self._tickets) > self.capacity:
            self._tickets.popitem(last=False)

    def pop(self, label: bytes) -> tls.SessionTicket | None:
        ticket = self._tickets.pop(label, None)
        if ticket is not None:
            self.resumed += 1
        return ticket
