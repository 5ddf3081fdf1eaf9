"""MQTT 5 properties on the wire (section 2.2.2): the property table, decoding with validation, encoding.

Every property has an identifier, a data type and a set of packets it may appear in (the table in section
2.2.2.2; :data:`PROPERTY_TABLE`). The decoder enforces, quoting the specification:

* "A Control Packet which contains an Identifier which is not valid for its packet type, or contains a value
  not of the specified data type, is a Malformed Packet" -> 0x81 (also unknown identifiers, a length that
  overruns the property block, ill-formed UTF-8).
* "It is a Protocol Error to include <property> more than once" for every property but User Property and
  (on PUBLISH) Subscription Identifier -> 0x82.
* value ranges that the specification calls a Protocol Error: Receive Maximum 0, Maximum Packet Size 0,
  Subscription Identifier 0, the 0/1 byte properties (Payload Format Indicator, Request Problem/Response
  Information, Maximum QoS, Retain/Wildcard/Subscription Identifier/Shared Subscription Available), and
  Authentication Data without an Authentication Method -> 0x82; Topic Alias 0 -> 0x94.

Will properties are checked as the pseudo packet type :data:`WILL` (0).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

from microenvoy.codecs.mqtt.packets import EMPTY_PROPERTIES, PacketType, Properties, ReasonCode

__all__ = [
    "BINARY",
    "BYTE",
    "FOUR_BYTE_INT",
    "MAX_VBI",
    "PROPERTY_TABLE",
    "STRING_PAIR",
    "TWO_BYTE_INT",
    "UTF8_STRING",
    "VARIABLE_BYTE_INT",
    "WILL",
    "MqttDecodeError",
    "decode_properties",
    "decode_utf8",
    "encode_properties",
    "encode_vbi",
    "read_vbi",
    "strip_optional_properties",
]

WILL: Final = 0
"""Pseudo packet type for Will Properties (the CONNECT payload's will block)."""

BYTE: Final = 0
TWO_BYTE_INT: Final = 1
FOUR_BYTE_INT: Final = 2
VARIABLE_BYTE_INT: Final = 3
UTF8_STRING: Final = 4
BINARY: Final = 5
STRING_PAIR: Final = 6

_P = PacketType
_ALL_WITH_PROPERTIES = frozenset(
    {
        _P.CONNECT,
        _P.CONNACK,
        _P.PUBLISH,
        WILL,
        _P.PUBACK,
        _P.PUBREC,
        _P.PUBREL,
        _P.PUBCOMP,
        _P.SUBSCRIBE,
        _P.SUBACK,
        _P.UNSUBSCRIBE,
        _P.UNSUBACK,
        _P.DISCONNECT,
        _P.AUTH,
    }
)
_MESSAGE = frozenset({_P.PUBLISH, WILL})

PROPERTY_TABLE: Final[dict[int, tuple[str, int, frozenset[int]]]] = {
    0x01: ("payload_format_indicator", BYTE, _MESSAGE),
    0x02: ("message_expiry_interval", FOUR_BYTE_INT, _MESSAGE),
    0x03: ("content_type", UTF8_STRING, _MESSAGE),
    0x08: ("response_topic", UTF8_STRING, _MESSAGE),
    0x09: ("correlation_data", BINARY, _MESSAGE),
    0x0B: ("subscription_identifiers", VARIABLE_BYTE_INT, frozenset({_P.PUBLISH, _P.SUBSCRIBE})),
    0x11: ("session_expiry_interval", FOUR_BYTE_INT, frozenset({_P.CONNECT, _P.CONNACK, _P.DISCONNECT})),
    0x12: ("assigned_client_identifier", UTF8_STRING, frozenset({_P.CONNACK})),
    0x13: ("server_keep_alive", TWO_BYTE_INT, frozenset({_P.CONNACK})),
    0x15: ("authentication_method", UTF8_STRING, frozenset({_P.CONNECT, _P.CONNACK, _P.AUTH})),
    0x16: ("authentication_data", BINARY, frozenset({_P.CONNECT, _P.CONNACK, _P.AUTH})),
    0x17: ("request_problem_information", BYTE, frozenset({_P.CONNECT})),
    0x18: ("will_delay_interval", FOUR_BYTE_INT, frozenset({WILL})),
    0x19: ("request_response_information", BYTE, frozenset({_P.CONNECT})),
    0x1A: ("response_information", UTF8_STRING, frozenset({_P.CONNACK})),
    0x1C: ("server_reference", UTF8_STRING, frozenset({_P.CONNACK, _P.DISCONNECT})),
    0x1F: (
        "reason_string",
        UTF8_STRING,
        frozenset(
            {
                _P.CONNACK,
                _P.PUBACK,
                _P.PUBREC,
                _P.PUBREL,
                _P.PUBCOMP,
                _P.SUBACK,
                _P.UNSUBACK,
                _P.DISCONNECT,
                _P.AUTH,
            }
        ),
    ),
    0x21: ("receive_maximum", TWO_BYTE_INT, frozenset({_P.CONNECT, _P.CONNACK})),
    0x22: ("topic_alias_maximum", TWO_BYTE_INT, frozenset({_P.CONNECT, _P.CONNACK})),
    0x23: ("topic_alias", TWO_BYTE_INT, frozenset({_P.PUBLISH})),
    0x24: ("maximum_qos", BYTE, frozenset({_P.CONNACK})),
    0x25: ("retain_available", BYTE, frozenset({_P.CONNACK})),
    0x26: ("user_properties", STRING_PAIR, _ALL_WITH_PROPERTIES),
    0x27: ("maximum_packet_size", FOUR_BYTE_INT, frozenset({_P.CONNECT, _P.CONNACK})),
    0x28: ("wildcard_subscription_available", BYTE, frozenset({_P.CONNACK})),
    0x29: ("subscription_identifier_available", BYTE, frozenset({_P.CONNACK})),
    0x2A: ("shared_subscription_available", BYTE, frozenset({_P.CONNACK})),
}
"""Property identifier -> (``Properties`` field, data type, packet types it may appear in)."""

_ENCODE_ORDER: tuple[tuple[str, int, int], ...] = tuple(
    (name, pid, kind) for pid, (name, kind, _allowed) in PROPERTY_TABLE.items()
)
_ZERO_OR_ONE = (
    "payload_format_indicator",
    "request_problem_information",
    "request_response_information",
    "maximum_qos",
    "retain_available",
    "wildcard_subscription_available",
    "subscription_identifier_available",
    "shared_subscription_available",
)
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
MAX_VBI: Final = 268_435_455


class MqttDecodeError(Exception):
    """Raised inside the decoder; the codec turns it into a ``ProtocolViolation`` with ``reason_code``."""

    def __init__(self, reason_code: int, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message


def _malformed(message: str) -> MqttDecodeError:
    return MqttDecodeError(ReasonCode.MALFORMED_PACKET, message)


def _protocol_error(message: str) -> MqttDecodeError:
    return MqttDecodeError(ReasonCode.PROTOCOL_ERROR, message)


def decode_utf8(raw: bytes, what: str) -> str:
    """Decode a UTF-8 Encoded String's bytes, enforcing [MQTT-1.5.4-1] and [MQTT-1.5.4-2].

    Python's strict UTF-8 decoder rejects ill-formed sequences, overlong forms and encoded surrogates
    (U+D800..U+DFFF); U+0000 is rejected here. A BOM (U+FEFF) is kept, as [MQTT-1.5.4-3] requires.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(f"{what} is not well-formed UTF-8") from None
    if "\x00" in text:
        raise _malformed(f"{what} contains U+0000")
    return text


def read_vbi(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode a Variable Byte Integer at ``pos`` (at most four bytes); returns (value, next position)."""
    value = 0
    shift = 0
    for _ in range(4):
        if pos >= end:
            raise _malformed("truncated variable byte integer")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if not byte and shift:
                raise _malformed("variable byte integer is not minimally encoded")
            return value, pos
        shift += 7
    raise _malformed("variable byte integer longer than four bytes")


def encode_vbi(value: int) -> bytes:
    """Encode a Variable Byte Integer (0..268,435,455)."""
    if value < 0x80:
        return bytes((value,))
    if not 0 <= value <= MAX_VBI:
        raise ValueError(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_string(buf: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    if pos + 2 > end:
        raise _malformed(f"truncated {what}")
    n = (buf[pos] << 8) | buf[pos + 1]
    pos += 2
    if pos + n > end:
        raise _malformed(f"{what} overruns its block")
    return decode_utf8(buf[pos : pos + n], what), pos + n


_CACHE_LIMIT: Final = 256
_caches: list[dict[bytes, Properties]] = [{} for _ in range(16)]
"""Per packet type: raw property block -> its decoded, validated Properties (shared by all connections).

A frozen 27-field dataclass costs microseconds to build; devices repeat the same properties (content type,
user properties) on every message, so a small cache makes the common case a dict lookup."""


def decode_properties(buf: bytes, pos: int, end: int, packet_type: int) -> tuple[Properties, int]:
    """Decode the property block at ``pos`` (length VBI + properties) for ``packet_type`` (or :data:`WILL`).

    Returns the properties and the position after the block; raises :class:`MqttDecodeError`.
    """
    if pos < end and buf[pos] < 0x80:
        length = buf[pos]
        pos += 1
    else:
        length, pos = read_vbi(buf, pos, end)
    if length == 0:
        return EMPTY_PROPERTIES, pos
    block_end = pos + length
    if block_end > end:
        raise _malformed("property length overruns the packet")
    block = buf[pos:block_end]
    cache = _caches[packet_type]
    props = cache.get(block)
    if props is None:
        props = _decode_block(block, packet_type)
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[block] = props
    return props, block_end


def _decode_block(buf: bytes, packet_type: int) -> Properties:
    pos = 0
    block_end = len(buf)
    values: dict[str, Any] = {}
    user: list[tuple[str, str]] = []
    sub_ids: list[int] = []
    table = PROPERTY_TABLE
    while pos < block_end:
        pid = buf[pos]
        pos += 1
        entry = table.get(pid)
        if entry is None:
            raise _malformed(f"unknown property identifier 0x{pid:02X}")
        name, kind, allowed = entry
        if packet_type not in allowed:
            raise _malformed(f"property {name} (0x{pid:02X}) is not allowed in this packet")
        value: Any
        if kind == BYTE:
            if pos >= block_end:
                raise _malformed(f"truncated {name}")
            value = buf[pos]
            pos += 1
        elif kind == TWO_BYTE_INT:
            if pos + 2 > block_end:
                raise _malformed(f"truncated {name}")
            value = (buf[pos] << 8) | buf[pos + 1]
            pos += 2
        elif kind == FOUR_BYTE_INT:
            if pos + 4 > block_end:
                raise _malformed(f"truncated {name}")
            value = int.from_bytes(buf[pos : pos + 4], "big")
            pos += 4
        elif kind == VARIABLE_BYTE_INT:
            value, pos = read_vbi(buf, pos, block_end)
            if value == 0:
                raise _protocol_error("subscription identifier 0")
            if packet_type == PacketType.SUBSCRIBE and sub_ids:
                raise _protocol_error("more than one subscription identifier in SUBSCRIBE")
            sub_ids.append(value)
            continue
        elif kind == UTF8_STRING:
            value, pos = _read_string(buf, pos, block_end, name)
        elif kind == BINARY:
            if pos + 2 > block_end:
                raise _malformed(f"truncated {name}")
            n = (buf[pos] << 8) | buf[pos + 1]
            pos += 2
            if pos + n > block_end:
                raise _malformed(f"{name} overruns the property block")
            value = buf[pos : pos + n]
            pos += n
        else:  # STRING_PAIR
            key, pos = _read_string(buf, pos, block_end, "user property name")
            val, pos = _read_string(buf, pos, block_end, "user property value")
            user.append((key, val))
            continue
        if name in values:
            raise _protocol_error(f"property {name} included more than once")
        check = _RANGE_CHECKS.get(name)
        if check is not None:
            check(value)
        values[name] = value
    if user:
        values["user_properties"] = tuple(user)
    if sub_ids:
        values["subscription_identifiers"] = tuple(sub_ids)
    if "authentication_data" in values and "authentication_method" not in values:
        raise _protocol_error("authentication data without an authentication method")
    return Properties(**values)


def _zero_or_one(name: str) -> Callable[[int], None]:
    def check(value: int) -> None:
        if value > 1:
            raise _protocol_error(f"{name} must be 0 or 1, got {value}")

    return check


def _not_zero(name: str, reason: int = ReasonCode.PROTOCOL_ERROR) -> Callable[[int], None]:
    def check(value: int) -> None:
        if value == 0:
            raise MqttDecodeError(reason, f"{name} 0")

    return check


_RANGE_CHECKS: dict[str, Callable[[int], None]] = {
    **{name: _zero_or_one(name) for name in _ZERO_OR_ONE},
    "receive_maximum": _not_zero("receive maximum"),
    "maximum_packet_size": _not_zero("maximum packet size"),
    "topic_alias": _not_zero("topic alias", ReasonCode.TOPIC_ALIAS_INVALID),
}


def _string_bytes(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def encode_properties(props: Properties) -> bytes:
    """Encode a property block (length VBI + properties); ``b"\\x00"`` when there are none."""
    if props is EMPTY_PROPERTIES:
        return b"\x00"
    parts: list[bytes] = []
    for name, pid, kind in _ENCODE_ORDER:
        value = getattr(props, name)
        if value is None or value == ():
            continue
        if kind == BYTE:
            parts.append(bytes((pid, value)))
        elif kind == TWO_BYTE_INT:
            parts.append(bytes((pid,)) + _U16.pack(value))
        elif kind == FOUR_BYTE_INT:
            parts.append(bytes((pid,)) + _U32.pack(value))
        elif kind == VARIABLE_BYTE_INT:
            for sub_id in value:
                parts.append(bytes((pid,)) + encode_vbi(sub_id))
        elif kind == UTF8_STRING:
            parts.append(bytes((pid,)) + _string_bytes(value))
        elif kind == BINARY:
            parts.append(bytes((pid,)) + _U16.pack(len(value)) + bytes(value))
        else:
            for key, val in value:
                parts.append(bytes((pid,)) + _string_bytes(key) + _string_bytes(val))
    body = b"".join(parts)
    return encode_vbi(len(body)) + body


def strip_optional_properties(props: Properties, *, user_properties: bool = True) -> Properties:
    """``props`` without Reason String (and User Properties): what a sender drops to fit a size limit."""
    if props.reason_string is None and (not user_properties or not props.user_properties):
        return props
    values = {name: getattr(props, name) for name, _pid, _kind in _ENCODE_ORDER}
    values["reason_string"] = None
    if user_properties:
        values["user_properties"] = ()
    stripped = Properties(**values)
    return EMPTY_PROPERTIES if stripped == EMPTY_PROPERTIES else stripped
