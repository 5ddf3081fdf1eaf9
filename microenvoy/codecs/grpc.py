"""gRPC over HTTP/2 framing, status codes and timeouts (sans-IO; our own code, no grpcio in the agent).

The gRPC wire format (grpc/doc/PROTOCOL-HTTP2.md) puts each message in a *length-prefixed message*:
one byte compressed-flag (0 or 1), a 4-byte big-endian length, then the message bytes. A body is any number of
these, split across DATA frames arbitrarily, so the decoder is incremental. Status travels in trailers
(``grpc-status``, ``grpc-message`` percent-encoded); a response with no body may be *trailers-only*: a single
HEADERS block carrying ``:status 200`` and the status fields, which is how the proxy answers its own errors.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

from microenvoy.core.errors import CodecError
from microenvoy.core.headers import Headers

__all__ = [
    "ABORTED",
    "ALREADY_EXISTS",
    "CANCELLED",
    "DATA_LOSS",
    "DEADLINE_EXCEEDED",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "FAILED_PRECONDITION",
    "INTERNAL",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "OK",
    "OUT_OF_RANGE",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "STATUS_NAMES",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "UNIMPLEMENTED",
    "UNKNOWN",
    "GrpcFramingError",
    "GrpcMessageDecoder",
    "decode_grpc_message",
    "encode_grpc_message",
    "encode_message",
    "format_grpc_timeout",
    "grpc_local_reply_headers",
    "http_status_to_grpc",
    "parse_grpc_timeout",
    "percent_decode_grpc_message",
    "percent_encode_grpc_message",
]

# Status codes (grpc/doc/statuscodes.md).
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
ABORTED = 10
OUT_OF_RANGE = 11
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
DATA_LOSS = 15
UNAUTHENTICATED = 16

STATUS_NAMES: dict[int, str] = {
    OK: "OK",
    CANCELLED: "CANCELLED",
    UNKNOWN: "UNKNOWN",
    INVALID_ARGUMENT: "INVALID_ARGUMENT",
    DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    NOT_FOUND: "NOT_FOUND",
    ALREADY_EXISTS: "ALREADY_EXISTS",
    PERMISSION_DENIED: "PERMISSION_DENIED",
    RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED",
    FAILED_PRECONDITION: "FAILED_PRECONDITION",
    ABORTED: "ABORTED",
    OUT_OF_RANGE: "OUT_OF_RANGE",
    UNIMPLEMENTED: "UNIMPLEMENTED",
    INTERNAL: "INTERNAL",
    UNAVAILABLE: "UNAVAILABLE",
    DATA_LOSS: "DATA_LOSS",
    UNAUTHENTICATED: "UNAUTHENTICATED",
}

DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024
"""grpcio's default receive limit (4 MiB)."""

_PREFIX = struct.Struct(">BI")


class GrpcFramingError(CodecError):
    """A length-prefixed message stream is malformed (bad flag byte, message over the size limit)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, stat="grpc_framing_error")


# ------------------------------------------------------------------------------------- framing
def encode_message(msg: bytes, compressed: bool = False) -> bytes:
    """One length-prefixed message: flag byte, 4-byte big-endian length, ``msg``."""
    if len(msg) > 0xFFFFFFFF:
        raise ValueError("gRPC message longer than 4 GiB")
    return _PREFIX.pack(1 if compressed else 0, len(msg)) + msg


encode_grpc_message = encode_message


class GrpcMessageDecoder:
    """Incremental decoder: ``feed(chunk)`` yields every ``(compressed, message)`` completed so far.

    Buffered bytes never exceed one message plus its prefix, so ``max_message_size`` bounds memory; a
    longer declared length raises ``GrpcFramingError`` as soon as the prefix is seen (gRPC answers
    RESOURCE_EXHAUSTED for that). ``finish()`` raises if the stream ended in the middle of a message.
    """

    __slots__ = ("_buf", "_need", "max_message_size", "messages_decoded")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._buf = bytearray()
        self.messages_decoded = 0

    def feed(self, data: bytes) -> Iterator[tuple[bool, bytes]]:
        self._buf += data
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= 5:
                flag, length = _PREFIX.unpack_from(buf, pos)
                if flag > 1:
                    raise GrpcFramingError(f"invalid compressed-flag byte {flag}")
                if length > self.max_message_size:
                    raise GrpcFramingError(
                        f"message of {length} bytes exceeds the limit of {self.max_message_size}"
                    )
                end = pos + 5 + length
                if len(buf) < end:
                    break
                msg = bytes(buf[pos + 5 : end])
                pos = end
                self.messages_decoded += 1
                yield flag == 1, msg
        finally:
            if pos:
                del buf[:pos]

    def decode(self, data: bytes) -> list[tuple[bool, bytes]]:
        """``list(feed(data))``."""
        return list(self.feed(data))

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held."""
        return len(self._buf)

    def finish(self) -> None:
        """The body ended: it must not end inside a message."""
        if self._buf:
            raise GrpcFramingError(f"stream ended inside a message ({len(self._buf)} bytes pending)")

    def __repr__(self) -> str:
        return f"<GrpcMessageDecoder decoded={self.messages_decoded} buffered={len(self._buf)}>"


def decode_grpc_message(data: bytes, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> bytes:
    """Exactly one uncompressed message in ``data`` (unary calls); raises ``GrpcFramingError`` otherwise."""
    dec = GrpcMessageDecoder(max_message_size)
    msgs = dec.decode(data)
    dec.finish()
    if len(msgs) != 1:
        raise GrpcFramingError(f"expected one message, got {len(msgs)}")
    compressed, msg = msgs[0]
    if compressed:
        raise GrpcFramingError("compressed message without a negotiated encoding")
    return msg


# ------------------------------------------------------------------------------------- timeouts
_TIMEOUT = re.compile(rb"^([0-9]{1,8})([HMSmun])$")
_UNITS: dict[bytes, float] = {
    b"H": 3600.0,
    b"M": 60.0,
    b"S": 1.0,
    b"m": 1e-3,
    b"u": 1e-6,
    b"n": 1e-9,
}


def parse_grpc_timeout(value: bytes | str) -> float | None:
    """``grpc-timeout`` (``TimeoutValue TimeoutUnit``: 1-8 ASCII digits then one of H M S m u n) -> seconds.

    Returns None for anything malformed (Envoy then ignores the header).
    """
    if isinstance(value, str):
        value = value.encode("latin-1", "replace")
    m = _TIMEOUT.match(value.strip())
    if m is None:
        return None
    return int(m.group(1)) * _UNITS[m.group(2)]


def format_grpc_timeout(seconds: float) -> bytes:
    """Seconds -> the finest ``grpc-timeout`` that fits 8 digits, rounding up (never shortens a deadline)."""
    if seconds <= 0:
        return b"0n"
    for unit, scale in ((b"n", 1e-9), (b"u", 1e-6), (b"m", 1e-3), (b"S", 1.0), (b"M", 60.0), (b"H", 3600.0)):
        amount = seconds / scale
        n = int(amount)
        if n < amount - 1e-9 * max(1.0, amount):
            n += 1
        if n <= 99_999_999:
            return str(max(n, 1)).encode() + unit
    return b"99999999H"


# ------------------------------------------------------------------------------------- statuses
_HTTP_TO_GRPC: dict[int, int] = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}


def http_status_to_grpc(status: int) -> int:
    """gRPC status for an HTTP response that lacks ``grpc-status`` (grpc/doc/http-grpc-status-mapping.md).

    The table maps 400 INTERNAL, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 UNIMPLEMENTED,
    429/502/503/504 UNAVAILABLE and *all other codes* to UNKNOWN (as Envoy's ``httpToGrpcStatus``). 1xx are
    not final responses; if one reaches here it is INTERNAL (as grpc-java). 200 without grpc-status is also
    an error for gRPC, UNKNOWN per the table.
    """
    if 100 <= status < 200:
        return INTERNAL
    return _HTTP_TO_GRPC.get(status, UNKNOWN)


# grpc-message: percent-encode bytes outside %x20-%x7E and "%" itself (PROTOCOL-HTTP2.md, Percent-Encoded).
_UNRESERVED = frozenset(range(0x20, 0x7F)) - {0x25}


def percent_encode_grpc_message(message: str) -> bytes:
    out = bytearray()
    for b in message.encode("utf-8"):
        if b in _UNRESERVED:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def percent_decode_grpc_message(value: bytes) -> str:
    """Lenient decoding: a ``%`` not followed by two hex digits is kept literally (as the spec asks)."""
    out = bytearray()
    i = 0
    n = len(value)
    while i < n:
        b = value[i]
        if b == 0x25 and _is_hex(value[i + 1 : i + 3]):
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(b)
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(two: bytes) -> bool:
    return len(two) == 2 and all(c in b"0123456789abcdefABCDEF" for c in two)


def grpc_local_reply_headers(status_code: int, message: str = "") -> Headers:
    """A trailers-only response (one HEADERS block, end of stream) carrying a gRPC status.

    ``:status`` is 200 as gRPC requires; ``grpc-message`` is omitted when empty.
    """
    h = Headers([(b":status", b"200"), (b"content-type", b"application/grpc")])
    h.add(b"grpc-status", str(int(status_code)).encode())
    if message:
        h.add(b"grpc-message", percent_encode_grpc_message(message))
    return h
