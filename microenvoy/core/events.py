"""The neutral exchange events every codec speaks (ARCHITECTURE.md section 4).

Downstream codecs turn wire bytes into ``Request*`` events and take ``Response*`` events back; upstream codecs
do the reverse. Events are frozen and slotted; the ``Headers`` they carry are handed over, not shared.
"""

from __future__ import annotations

from dataclasses import dataclass

from microenvoy.core.headers import Headers

__all__ = [
    "ConnectionTerminated",
    "DataAcknowledged",
    "DataReceived",
    "Event",
    "HeadersReceived",
    "ProtocolFailure",
    "StreamReset",
    "TrailersReceived",
    "WindowOpened",
]


@dataclass(frozen=True, slots=True)
class HeadersReceived:
    """A header block (request headers downstream, response headers upstream)."""

    stream_id: int
    """Codec-local stream id (HTTP/1.1 uses a counter per connection)."""
    headers: Headers
    """Pseudo-headers first, names lower-case."""
    end_stream: bool
    """No body or trailers follow."""
    early_data: bool = False
    """HTTP/3 only: the request arrived in 0-RTT (RFC 8470)."""


@dataclass(frozen=True, slots=True)
class DataReceived:
    """A body chunk. ``flow_controlled_length`` must be acknowledged once consumed."""

    stream_id: int
    data: bytes
    end_stream: bool
    flow_controlled_length: int = 0
    """Bytes of connection/stream window this chunk used (HTTP/2 counts padding)."""


@dataclass(frozen=True, slots=True)
class TrailersReceived:
    """Trailers; always the end of that direction of the stream."""

    stream_id: int
    trailers: Headers


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer (or the codec, on a stream-level protocol error) reset one stream."""

    stream_id: int
    error_code: int
    reason: str = ""
    """Short stat-friendly reason, e.g. ``remote_reset``, ``refused_stream``."""


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """The peer granted send credit; ``stream_id`` None means connection-wide."""

    stream_id: int | None


@dataclass(frozen=True, slots=True)
class DataAcknowledged:
    """HTTP/1.1 upstream only: a keep-alive response is fully read, the connection is reusable."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ProtocolFailure:
    """The peer broke the protocol; the codec has queued the protocol-correct reply (400, GOAWAY ...)."""

    stat: str
    """Stat suffix to increment, e.g. ``downstream_rq_rx_reset`` or ``http1.invalid_request``."""
    detail: str
    close: bool = True
    """The connection must be closed once pending bytes are flushed."""
    status: int = 0
    """The HTTP status the codec answered with (431, 400, 425 ...), 0 if none: counted as a request."""


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection is over (GOAWAY received, CONNECTION_CLOSE, EOF)."""

    error_code: int = 0
    reason: str = ""
    last_stream_id: int | None = None


Event = (
    HeadersReceived
    | DataReceived
    | TrailersReceived
    | StreamReset
    | WindowOpened
    | DataAcknowledged
    | ProtocolFailure
    | ConnectionTerminated
)
