"""CoAP messages (RFC 7252 §3): the wire format, option numbers and codes; sans-IO, no state.

``decode`` turns one UDP datagram into a :class:`Message` or raises :class:`CoapFormatError` naming what was
wrong (and carrying the message id and type when the 4-byte header was readable, so the caller can answer a
malformed confirmable message with a Reset as §4.2 says). ``encode`` is its inverse. Options are kept as a
tuple of ``(number, value)`` pairs in ascending order (repeatable options keep their order); the helpers here
read and build the common ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from microenvoy.core.errors import CodecError

__all__ = [
    "ACK",
    "CON",
    "NON",
    "RST",
    "CoapFormatError",
    "Message",
    "Opt",
    "block_value",
    "code_class",
    "code_text",
    "decode",
    "encode",
    "encode_uint",
    "is_critical",
    "is_request_code",
    "parse_block",
    "read_uint",
]

CON, NON, ACK, RST = 0, 1, 2, 3
TYPE_NAMES = ("CON", "NON", "ACK", "RST")

METHODS = {1: "GET", 2: "POST", 3: "PUT", 4: "DELETE", 5: "FETCH", 6: "PATCH", 7: "iPATCH"}
"""Request codes (0.01 .. 0.07) and their names; iPATCH maps to HTTP PATCH (RFC 8132)."""


class Opt:
    """Option numbers (RFC 7252 §12.2, 7641, 7959, 8613, 7967, 9175)."""

    IF_MATCH = 1
    URI_HOST = 3
    ETAG = 4
    IF_NONE_MATCH = 5
    OBSERVE = 6
    URI_PORT = 7
    LOCATION_PATH = 8
    OSCORE = 9
    URI_PATH = 11
    CONTENT_FORMAT = 12
    MAX_AGE = 14
    URI_QUERY = 15
    ACCEPT = 17
    LOCATION_QUERY = 20
    BLOCK2 = 23
    BLOCK1 = 27
    SIZE2 = 28
    PROXY_URI = 35
    PROXY_SCHEME = 39
    SIZE1 = 60
    ECHO = 252
    NO_RESPONSE = 258
    REQUEST_TAG = 292


KNOWN_OPTIONS = frozenset(v for k, v in vars(Opt).items() if not k.startswith("_"))

# Value length limits of the options we understand (RFC 7252 §5.10 and the extensions); a known option outside
# its range is treated as unrecognized (§5.4.3): an error if critical, ignored if elective.
OPTION_LENGTHS: dict[int, tuple[int, int]] = {
    Opt.IF_MATCH: (0, 8),
    Opt.URI_HOST: (1, 255),
    Opt.ETAG: (1, 8),
    Opt.IF_NONE_MATCH: (0, 0),
    Opt.OBSERVE: (0, 3),
    Opt.URI_PORT: (0, 2),
    Opt.LOCATION_PATH: (0, 255),
    Opt.OSCORE: (0, 255),
    Opt.URI_PATH: (0, 255),
    Opt.CONTENT_FORMAT: (0, 2),
    Opt.MAX_AGE: (0, 4),
    Opt.URI_QUERY: (0, 255),
    Opt.ACCEPT: (0, 2),
    Opt.LOCATION_QUERY: (0, 255),
    Opt.BLOCK2: (0, 3),
    Opt.BLOCK1: (0, 3),
    Opt.SIZE2: (0, 4),
    Opt.PROXY_URI: (1, 1034),
    Opt.PROXY_SCHEME: (1, 255),
    Opt.SIZE1: (0, 4),
    Opt.ECHO: (1, 40),
    Opt.NO_RESPONSE: (0, 1),
    Opt.REQUEST_TAG: (0, 8),
}


def is_critical(number: int) -> bool:
    """Odd option numbers are critical (§5.4.1)."""
    return bool(number & 1)


def code_class(code: int) -> int:
    return code >> 5


def code_text(code: int) -> str:
    """``0x45`` -> ``"2.05"``."""
    return f"{code >> 5}.{code & 0x1F:02d}"


def is_request_code(code: int) -> bool:
    return 1 <= code <= 31


class CoapFormatError(CodecError):
    """A datagram is not well-formed CoAP. ``mid``/``mtype`` are set when the header was readable."""

    def __init__(self, detail: str, mid: int | None = None, mtype: int | None = None) -> None:
        super().__init__(detail, "malformed")
        self.mid = mid
        self.mtype = mtype


@dataclass(frozen=True, slots=True)
class Message:
    """One CoAP message. ``options`` is sorted by number; a repeated option appears once per value."""

    mtype: int
    code: int
    mid: int = 0
    token: bytes = b""
    options: tuple[tuple[int, bytes], ...] = ()
    payload: bytes = b""
    extra: dict[str, object] = field(default_factory=dict, compare=False, repr=False)
    """Scratch space for layers above the codec (never encoded)."""

    def opt(self, number: int) -> bytes | None:
        """The first value of option ``number``, or None."""
        for n, v in self.options:
            if n == number:
                return v
        return None

    def opts(self, number: int) -> list[bytes]:
        return [v for n, v in self.options if n == number]

    def uint(self, number: int) -> int | None:
        v = self.opt(number)
        return None if v is None else read_uint(v)

    def has(self, number: int) -> bool:
        return any(n == number for n, _ in self.options)

    def with_options(self, options: list[tuple[int, bytes]] | tuple[tuple[int, bytes], ...]) -> Message:
        return Message(self.mtype, self.code, self.mid, self.token, sort_options(options), self.payload)

    def __repr__(self) -> str:
        opts = ",".join(str(n) for n, _ in self.options)
        return (
            f"<Message {TYPE_NAMES[self.mtype]} {code_text(self.code)} mid={self.mid} "
            f"token={self.token.hex()} opts=[{opts}] payload={len(self.payload)}B>"
        )


def sort_options(
    options: list[tuple[int, bytes]] | tuple[tuple[int, bytes], ...],
) -> tuple[tuple[int, bytes], ...]:
    """Options in ascending number order; equal numbers keep their relative order (stable sort)."""
    return tuple(sorted(options, key=lambda o: o[0]))


def read_uint(value: bytes) -> int:
    return int.from_bytes(value, "big")


def encode_uint(n: int) -> bytes:
    """Shortest big-endian form (0 is the empty string, §3.2)."""
    return n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""


def parse_block(value: bytes) -> tuple[int, bool, int]:
    """A Block1/Block2 option value -> ``(num, more, szx)`` (RFC 7959 §2.2). ``szx`` 7 is reserved."""
    v = read_uint(value)
    return v >> 4, bool(v & 0x8), v & 0x7


def block_value(num: int, more: bool, szx: int) -> bytes:
    return encode_uint((num << 4) | (0x8 if more else 0) | szx)


def decode(data: bytes) -> Message:
    """One datagram -> ``Message``; ``CoapFormatError`` names the defect (§3, §5.4.3 is the caller's)."""
    n = len(data)
    if n < 4:
        raise CoapFormatError("truncated header")
    b0 = data[0]
    mtype = (b0 >> 4) & 0x3
    mid = (data[2] << 8) | data[3]
    if b0 >> 6 != 1:
        raise CoapFormatError(f"unknown version {b0 >> 6}", None, None)  # §3: silently ignore
    tkl = b0 & 0xF
    if tkl > 8:
        raise CoapFormatError(f"token length {tkl} is reserved", mid, mtype)
    code = data[1]
    pos = 4 + tkl
    if pos > n:
        raise CoapFormatError("truncated token", mid, mtype)
    token = data[4:pos]
    if code == 0:
        if n > 4 or tkl:
            raise CoapFormatError("empty message with token, options or payload", mid, mtype)
        return Message(mtype, 0, mid, b"")
    options: list[tuple[int, bytes]] = []
    number = 0
    payload = b""
    while pos < n:
        byte = data[pos]
        if byte == 0xFF:
            if pos + 1 == n:
                raise CoapFormatError("payload marker followed by an empty payload", mid, mtype)
            payload = data[pos + 1 :]
            break
        pos += 1
        delta, length = byte >> 4, byte & 0xF
        if delta == 15 or length == 15:
            raise CoapFormatError("reserved option delta or length 15", mid, mtype)
        if delta == 13:
            if pos >= n:
                raise CoapFormatError("truncated option delta", mid, mtype)
            delta = data[pos] + 13
            pos += 1
        elif delta == 14:
            if pos + 1 >= n:
                raise CoapFormatError("truncated option delta", mid, mtype)
            delta = ((data[pos] << 8) | data[pos + 1]) + 269
            pos += 2
        if length == 13:
            if pos >= n:
                raise CoapFormatError("truncated option length", mid, mtype)
            length = data[pos] + 13
            pos += 1
        elif length == 14:
            if pos + 1 >= n:
                raise CoapFormatError("truncated option length", mid, mtype)
            length = ((data[pos] << 8) | data[pos + 1]) + 269
            pos += 2
        number += delta
        if number > 0xFFFF:
            raise CoapFormatError("option number beyond 65535", mid, mtype)
        end = pos + length
        if end > n:
            raise CoapFormatError(f"option {number} runs past the end of the message", mid, mtype)
        options.append((number, data[pos:end]))
        pos = end
    return Message(mtype, code, mid, token, tuple(options), payload)


def _ext(v: int) -> tuple[int, bytes]:
    if v < 13:
        return v, b""
    if v < 269:
        return 13, bytes((v - 13,))
    return 14, (v - 269).to_bytes(2, "big")


def encode(msg: Message) -> bytes:
    """``Message`` -> datagram. Options must already be in ascending order (``sort_options``)."""
    token = msg.token
    out = bytearray((0x40 | (msg.mtype << 4) | len(token), msg.code, msg.mid >> 8, msg.mid & 0xFF))
    out += token
    last = 0
    for number, value in msg.options:
        d, dx = _ext(number - last)
        ln, lx = _ext(len(value))
        out.append((d << 4) | ln)
        out += dx
        out += lx
        out += value
        last = number
    if msg.payload:
        out.append(0xFF)
        out += msg.payload
    return bytes(out)
