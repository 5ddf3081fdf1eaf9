"""Sans-IO MQTT 3.1.1 / 5.0 codec: bytes in, packets (or one ``ProtocolViolation``) out, and back.

Theory of operation
-------------------
:class:`MqttServerCodec` is the server side of one network connection. ``receive_data(data)`` appends the
bytes to a small buffer and returns every complete packet in it, in order, as the frozen dataclasses of
``microenvoy.codecs.mqtt.packets``. Data may arrive split at any byte boundary and may hold many packets.
The fixed header (first byte + Remaining Length, a Variable Byte Integer of at most four bytes) is read first;
a packet larger than ``max_packet_size`` is rejected from the header alone, before its body is buffered, so
the buffer never exceeds ``max_packet_size + 5`` bytes. Until a packet is complete the body is only appended,
never re-parsed, so a large packet trickling in byte by byte costs linear time.

Any violation of the specification produces one :class:`ProtocolViolation` (reason code + message) after the
packets that preceded it; from then on the codec parses nothing ("Unless stated otherwise, if either the
Server or Client encounters a protocol violation, it MUST close the Network Connection", MQTT 3.1.1 4.8;
MQTT 5.0 4.13). :meth:`MqttServerCodec.violation_response` says what to send before closing: in MQTT 5 a
CONNACK (before the CONNECT was accepted) or a DISCONNECT with the reason code; in MQTT 3.1.1 only the CONNACK
return codes 0x01 (unacceptable protocol level, [MQTT-3.1.2-2]) and 0x02 (identifier rejected,
[MQTT-3.1.3-9]) exist, everything else is a bare close.

Checks (reason code in brackets; 0x81 malformed, 0x82 protocol error):

* the first packet must be CONNECT [MQTT-3.1.0-1] (0x82), a second CONNECT is a protocol error
  [MQTT-3.1.0-2] (0x82); packets only a server sends (CONNACK, SUBACK, UNSUBACK, PINGRESP) and the reserved
  type 0 (and 15 in 3.1.1) are rejected (0x82 / 0x81).
* protocol name and level [MQTT-3.1.2-1], [MQTT-3.1.2-2]: "MQTT" level 4 or 5; anything else with "MQTT" or
  "MQIsdp" is 0x84 (answered with CONNACK 0x01 in the 3.1.1 form), an unknown name 0x82 (closed).
* reserved fixed header flags [MQTT-2.1.3-1] (0x81), PUBLISH QoS 3 [MQTT-3.3.1-4] (0x81), DUP with QoS 0
  [MQTT-3.3.1-2] (0x82), packet identifier 0 [MQTT-2.3.1-1] (0x82).
* CONNECT flags: reserved bit [MQTT-3.1.2-3], will QoS 3 [MQTT-3.1.2-14], will QoS/retain without the will
  flag [MQTT-3.1.2-11], [MQTT-3.1.2-13], [MQTT-3.1.2-15], password without user name in 3.1.1
  [MQTT-3.1.2-22] (all 0x81); an empty client id without clean session in 3.1.1 [MQTT-3.1.3-8] (0x85).
* UTF-8 strings: well formed, no surrogates, no U+0000 [MQTT-1.5.4-1], [MQTT-1.5.4-2] (0x81).
* topic names: no wildcards [MQTT-3.3.2-2] (0x90), non-empty [MQTT-4.7.3-1] unless an MQTT 5 Topic Alias is
  given (0x82); topic filters: ``#`` alone in the last level [MQTT-4.7.1-1], ``+`` alone in its level
  [MQTT-4.7.1-2], not empty [MQTT-4.7.3-1], ``$share/<name>/<filter>`` with a non-empty share name without
  ``/+#`` and a filter [MQTT-4.8.2-1], [MQTT-4.8.2-2] (0x81); a SUBSCRIBE/UNSUBSCRIBE without any filter
  [MQTT-3.8.3-3], [MQTT-3.10.3-2] (0x82); subscription option reserved bits [MQTT-3.8.3-5] and QoS 3 (0x81),
  Retain Handling 3 (0x82), No Local on a shared subscription [MQTT-3.8.3-4] (0x82).
* MQTT 5 properties: see ``microenvoy.codecs.mqtt.properties``; plus a Subscription Identifier on a PUBLISH
  from a client [MQTT-3.3.4-6] (0x82), a Response Topic with wildcards [MQTT-3.3.2-14] (0x82), Payload Format
  Indicator 1 with a payload (or will payload) that is not UTF-8 [MQTT-3.3.2-4] (0x99), Topic Alias 0 or above
  the Topic Alias Maximum of the CONNACK this codec encoded [MQTT-3.2.2-17] (0x94), QoS above its Maximum QoS
  [MQTT-3.2.2-11] (0x9B), RETAIN when it said Retain Available 0 [MQTT-3.2.2-14] (0x9A), a Subscription
  Identifier when it said Subscription Identifier Available 0 (0xA1), a DISCONNECT setting a non-zero Session
  Expiry after a CONNECT with zero [MQTT-3.14.2-2] (0x82), AUTH without an Authentication Method in CONNECT
  [MQTT-4.12.0-?] (0x82), reason codes not allowed for the packet type (0x82).
* Remaining Length that does not match the packet's content (0x81); a fifth length byte or a Variable Byte
  Integer not in its shortest form [MQTT-1.5.5-1] (0x81).
* Maximum Packet Size both ways: incoming over ``max_packet_size`` (or the Maximum Packet Size of the CONNACK
  this codec encoded, if smaller) is 0x95; outgoing, :meth:`MqttServerCodec.encode` honours the client's
  Maximum Packet Size from CONNECT: it drops the Reason String, then the User Properties of packets that may
  lose them (never of a PUBLISH, whose properties are part of the message) and returns ``None`` when the
  packet still does not fit ("the Server MUST discard it without sending it", [MQTT-3.1.2-25]).

What the codec does not do (the session/broker's job): Topic Alias resolution (a PUBLISH with an alias keeps
its topic, possibly empty, and ``properties.topic_alias``), Receive Maximum accounting (0x93), packet
identifier bookkeeping (0x91/0x92), keep alive, authentication.

:class:`MqttClientCodec` decodes the server-to-client direction (for tests and the load generator), and
:func:`encode_packet` encodes any packet in either protocol version.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

from microenvoy.codecs.mqtt.packets import (
    EMPTY_PROPERTIES,
    PROTOCOL_LEVEL_V5,
    PROTOCOL_LEVEL_V311,
    Auth,
    Connack,
    ConnackReturnCode,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Properties,
    ProtocolViolation,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
    connack_code_v311,
)
from microenvoy.codecs.mqtt.properties import (
    MAX_VBI,
    WILL,
    MqttDecodeError,
    decode_properties,
    decode_utf8,
    encode_properties,
    encode_vbi,
    strip_optional_properties,
)

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "MqttClientCodec",
    "MqttServerCodec",
    "encode_packet",
    "is_valid_topic_filter",
    "is_valid_topic_name",
]

DEFAULT_MAX_PACKET_SIZE: Final = MAX_VBI + 5
"""The largest packet MQTT can express (Remaining Length 268,435,455 + a five-byte fixed header)."""

_U16 = struct.Struct(">H")
_PUBACK_CODES: Final = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_PUBREL_CODES: Final = frozenset({0x00, 0x92})
_DISCONNECT_CODES: Final = frozenset(
    {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90} | set(range(0x93, 0xA3))
)
_AUTH_CODES: Final = frozenset({0x00, 0x18, 0x19})
_CONNACK_CODES: Final = frozenset(
    {0x00, *range(0x80, 0x8B), 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
)
_SUBACK_CODES: Final = frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2})
_UNSUBACK_CODES: Final = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
_SHARE_PREFIX: Final = "$share/"


def _malformed(message: str) -> MqttDecodeError:
    return MqttDecodeError(ReasonCode.MALFORMED_PACKET, message)


def _protocol_error(message: str) -> MqttDecodeError:
    return MqttDecodeError(ReasonCode.PROTOCOL_ERROR, message)


# ------------------------------------------------------------------------------------------ topics


def is_valid_topic_name(topic: str) -> bool:
    """A PUBLISH/will topic name: at least one character, no ``+`` or ``#`` (section 4.7)."""
    return bool(topic) and "+" not in topic and "#" not in topic


def _valid_plain_filter(topic_filter: str) -> bool:
    if not topic_filter:
        return False
    if "+" not in topic_filter and "#" not in topic_filter:
        return True
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level:
            if level != "#" or i != last:
                return False
        elif "+" in level and level != "+":
            return False
    return True


def is_valid_topic_filter(topic_filter: str) -> bool:
    """A topic filter (section 4.7.1), including the ``$share/<ShareName>/<filter>`` form (4.8.2)."""
    if topic_filter.startswith(_SHARE_PREFIX):
        share_name, sep, rest = topic_filter[len(_SHARE_PREFIX) :].partition("/")
        if not share_name or not sep or "+" in share_name or "#" in share_name:
            return False
        return _valid_plain_filter(rest)
    return _valid_plain_filter(topic_filter)


# ------------------------------------------------------------------------------------------ reading


def _read_u16(buf: bytes, pos: int, end: int, what: str) -> int:
    if pos + 2 > end:
        raise _malformed(f"truncated {what}")
    return (buf[pos] << 8) | buf[pos + 1]


def _read_string(buf: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    if pos + 2 > end:
        raise _malformed(f"truncated {what}")
    n = (buf[pos] << 8) | buf[pos + 1]
    pos += 2
    if pos + n > end:
        raise _malformed(f"{what} overruns the packet")
    return decode_utf8(buf[pos : pos + n], what), pos + n


def _read_binary(buf: bytes, pos: int, end: int, what: str) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise _malformed(f"truncated {what}")
    n = (buf[pos] << 8) | buf[pos + 1]
    pos += 2
    if pos + n > end:
        raise _malformed(f"{what} overruns the packet")
    return buf[pos : pos + n], pos + n


def _read_packet_id(buf: bytes, pos: int, end: int) -> int:
    packet_id = _read_u16(buf, pos, end, "packet identifier")
    if packet_id == 0:
        raise _protocol_error("packet identifier 0")
    return packet_id


def _check_utf8_payload(payload: bytes, what: str) -> None:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        raise MqttDecodeError(
            ReasonCode.PAYLOAD_FORMAT_INVALID, f"{what} is not UTF-8 but its payload format indicator is 1"
        ) from None


def _check_message_properties(props: Properties, payload: bytes, what: str) -> None:
    """Checks shared by PUBLISH and will properties."""
    if props.payload_format_indicator == 1:
        _check_utf8_payload(payload, what)
    if props.response_topic is not None and not is_valid_topic_name(props.response_topic):
        raise _protocol_error("response topic is empty or contains wildcards")


_Handler = Callable[[Any, bytes, int, int, int], Packet]
"""A packet decoder: (codec, buffer, body start, body end, fixed header flags) -> packet."""


class _MqttCodec:
    """Shared framing: buffering, the fixed header, the size limit and the violation latch."""

    __slots__ = ("_buf", "_handlers", "_need", "max_packet_size", "protocol_level", "version", "violation")

    def __init__(self, max_packet_size: int) -> None:
        if not 2 <= max_packet_size <= DEFAULT_MAX_PACKET_SIZE:
            raise ValueError(f"max_packet_size must be 2..{DEFAULT_MAX_PACKET_SIZE}")
        self.max_packet_size = max_packet_size
        """Largest incoming packet accepted (whole packet, fixed header included); larger -> 0x95."""
        self.protocol_level: int | None = None
        """The protocol level of the CONNECT (None before it), even an unsupported one."""
        self.version = PROTOCOL_LEVEL_V311
        """The negotiated version: 5 after an MQTT 5 CONNECT, else 4 (also before CONNECT)."""
        self.violation: ProtocolViolation | None = None
        """The violation that stopped the codec, if any."""
        self._buf = bytearray()
        self._need = 0
        self._handlers: list[_Handler] = _NO_HANDLERS

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Packet | ProtocolViolation]:
        """Feed received bytes; returns the complete packets in order, then at most one violation."""
        if self.violation is not None:
            return []
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            raw = bytes(buf)
            buf.clear()
        else:
            raw = data if isinstance(data, bytes) else bytes(data)
        out: list[Packet | ProtocolViolation] = []
        pos = 0
        n = len(raw)
        first = 0
        self._need = 0
        try:
            while n - pos >= 2:
                first = raw[pos]
                byte = raw[pos + 1]
                if byte < 0x80:
                    length = byte
                    body = pos + 2
                else:
                    length = byte & 0x7F
                    shift = 7
                    i = pos + 2
                    while True:
                        if i >= n:
                            length = -1
                            break
                        byte = raw[i]
                        i += 1
                        length |= (byte & 0x7F) << shift
                        if byte < 0x80:
                            if not byte:
                                # [MQTT-1.5.5-1]: the minimum number of bytes.
                                raise _malformed("remaining length is not minimally encoded")
                            break
                        shift += 7
                        if shift == 28:
                            raise _malformed("remaining length longer than four bytes")
                    if length < 0:
                        break
                    body = i
                end = body + length
                if end - pos > self.max_packet_size:
                    raise MqttDecodeError(
                        ReasonCode.PACKET_TOO_LARGE,
                        f"packet of {end - pos} bytes exceeds the maximum packet size {self.max_packet_size}",
                    )
                if end > n:
                    self._need = end - pos
                    break
                out.append(self._handlers[first >> 4](self, raw, body, end, first & 0x0F))
                pos = end
        except MqttDecodeError as exc:
            violation = ProtocolViolation(exc.reason_code, exc.message, first >> 4)
            self.violation = violation
            out.append(violation)
            self._buf.clear()
            return out
        if pos < n:
            buf += memoryview(raw)[pos:]
        return out

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete packet held in the buffer."""
        return len(self._buf)

    def _unexpected(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        raise _protocol_error("unexpected packet type for this side of the connection")

    # -------------------------------------------------------------------- packets both sides receive

    def _publish(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise _malformed("PUBLISH with QoS 3")
        dup = flags & 8 != 0
        if dup and not qos:
            raise _protocol_error("PUBLISH with DUP set and QoS 0")
        if pos + 2 > end:
            raise _malformed("truncated topic name")
        tend = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
        if tend > end:
            raise _malformed("topic name overruns the packet")
        topic = decode_utf8(buf[pos + 2 : tend], "topic name")
        pos = tend
        packet_id: int | None = None
        if qos:
            if pos + 2 > end:
                raise _malformed("truncated packet identifier")
            packet_id = (buf[pos] << 8) | buf[pos + 1]
            if not packet_id:
                raise _protocol_error("packet identifier 0")
            pos += 2
        props = EMPTY_PROPERTIES
        if self.version == PROTOCOL_LEVEL_V5:
            if pos < end and buf[pos] == 0:
                pos += 1
            else:
                props, pos = decode_properties(buf, pos, end, PacketType.PUBLISH)
        if "+" in topic or "#" in topic:
            raise MqttDecodeError(ReasonCode.TOPIC_NAME_INVALID, "topic name contains a wildcard")
        payload = buf[pos:end]
        if props is not EMPTY_PROPERTIES:
            self._check_publish_properties(props, payload)
        if not topic and props.topic_alias is None:
            raise _protocol_error("empty topic name without a topic alias")
        return Publish(topic, payload, qos, flags & 1 == 1, dup, packet_id, props)

    def _check_publish_properties(self, props: Properties, payload: bytes) -> None:
        _check_message_properties(props, payload, "PUBLISH payload")

    def _ack(self, buf: bytes, pos: int, end: int, flags: int, ptype: int) -> tuple[int, int, Properties]:
        """Packet id, reason code and properties of PUBACK/PUBREC/PUBREL/PUBCOMP."""
        expected = 0x02 if ptype == PacketType.PUBREL else 0x00
        if flags != expected:
            raise _malformed("reserved fixed header flags are wrong")
        packet_id = _read_packet_id(buf, pos, end)
        pos += 2
        if self.version != PROTOCOL_LEVEL_V5:
            if pos != end:
                raise _malformed("remaining length does not match the packet")
            return packet_id, 0, EMPTY_PROPERTIES
        if pos == end:
            return packet_id, 0, EMPTY_PROPERTIES
        reason = buf[pos]
        pos += 1
        allowed = _PUBREL_CODES if ptype in (PacketType.PUBREL, PacketType.PUBCOMP) else _PUBACK_CODES
        if reason not in allowed:
            raise _protocol_error(f"reason code 0x{reason:02X} is not valid here")
        props = EMPTY_PROPERTIES
        if pos < end:
            props, pos = decode_properties(buf, pos, end, ptype)
        if pos != end:
            raise _malformed("remaining length does not match the packet")
        return packet_id, reason, props

    def _puback(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        return Puback(*self._ack(buf, pos, end, flags, PacketType.PUBACK))

    def _pubrec(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        return Pubrec(*self._ack(buf, pos, end, flags, PacketType.PUBREC))

    def _pubrel(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        return Pubrel(*self._ack(buf, pos, end, flags, PacketType.PUBREL))

    def _pubcomp(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        return Pubcomp(*self._ack(buf, pos, end, flags, PacketType.PUBCOMP))

    def _reason_and_properties(
        self, buf: bytes, pos: int, end: int, flags: int, ptype: int, allowed: frozenset[int]
    ) -> tuple[int, Properties]:
        """DISCONNECT / AUTH: an optional reason code and optional properties (v5 only)."""
        if flags:
            raise _malformed("reserved fixed header flags are wrong")
        if self.version != PROTOCOL_LEVEL_V5:
            if pos != end:
                raise _malformed("remaining length does not match the packet")
            return 0, EMPTY_PROPERTIES
        if pos == end:
            return 0, EMPTY_PROPERTIES
        reason = buf[pos]
        pos += 1
        if reason not in allowed:
            raise _protocol_error(f"reason code 0x{reason:02X} is not valid here")
        props = EMPTY_PROPERTIES
        if pos < end:
            props, pos = decode_properties(buf, pos, end, ptype)
        if pos != end:
            raise _malformed("remaining length does not match the packet")
        return reason, props

    def _disconnect(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        reason, props = self._reason_and_properties(
            buf, pos, end, flags, PacketType.DISCONNECT, _DISCONNECT_CODES
        )
        return Disconnect(reason, props)

    def _auth(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        if self.version != PROTOCOL_LEVEL_V5:
            raise _malformed("packet type 15 is reserved in MQTT 3.1.1")
        reason, props = self._reason_and_properties(buf, pos, end, flags, PacketType.AUTH, _AUTH_CODES)
        return Auth(reason, props)

    @staticmethod
    def _empty(pos: int, end: int, flags: int) -> None:
        if flags:
            raise _malformed("reserved fixed header flags are wrong")
        if pos != end:
            raise _malformed("remaining length must be 0")


class MqttServerCodec(_MqttCodec):
    """Server side of one MQTT connection (both versions; the CONNECT decides which).

    ``receive_data`` decodes client-to-server packets; ``encode`` encodes server-to-client packets in the
    negotiated version, within the client's Maximum Packet Size. Encoding a CONNACK also teaches the codec
    what the server announced (Topic Alias Maximum, Maximum QoS, Retain Available, Subscription Identifier
    Available, Maximum Packet Size), which incoming packets are then checked against.
    """

    __slots__ = (
        "_auth_method",
        "_connect_session_expiry",
        "_max_qos",
        "_problem_information",
        "_retain_available",
        "_sub_ids_available",
        "_topic_alias_maximum",
        "connect_received",
        "peer_maximum_packet_size",
    )

    def __init__(self, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> None:
        super().__init__(max_packet_size)
        self.connect_received = False
        """A well-formed CONNECT has been decoded."""
        self.peer_maximum_packet_size: int | None = None
        """The client's Maximum Packet Size from CONNECT (None: no limit)."""
        self._connect_session_expiry = 0
        self._auth_method: str | None = None
        self._problem_information = True
        self._topic_alias_maximum = 0
        self._max_qos = 2
        self._retain_available = True
        self._sub_ids_available = True
        self._handlers = _SERVER_BEFORE_CONNECT

    def __repr__(self) -> str:
        state = "failed" if self.violation else "connected" if self.connect_received else "awaiting-connect"
        return f"MqttServerCodec(v{self.version} {state} buffered={len(self._buf)})"

    # ------------------------------------------------------------------------------------ encoding

    def encode(self, packet: Packet) -> bytes | None:
        """Bytes for ``packet`` in the negotiated version, or None if it exceeds the client's maximum size.

        Over the client's Maximum Packet Size the Reason String is dropped, then the User Properties (not for
        PUBLISH); ``None`` means the packet must be discarded (count it as dropped). A DISCONNECT on a 3.1.1
        connection encodes to ``b""`` (3.1.1 servers just close).
        """
        version = self.version
        if isinstance(packet, Connack):
            # On a connection whose CONNECT had an unsupported level, version is 4: the refusal is the
            # 3.1.1 CONNACK 0x01 [MQTT-3.1.2-2].
            self._learn_connack(packet)
        elif isinstance(packet, Disconnect):
            if version != PROTOCOL_LEVEL_V5:
                return b""
        elif (
            not self._problem_information
            and not isinstance(packet, Publish)
            and version == PROTOCOL_LEVEL_V5
            and (props := getattr(packet, "properties", EMPTY_PROPERTIES)) is not EMPTY_PROPERTIES
        ):
            # [MQTT-3.1.2-29]: with Request Problem Information 0, no Reason String or User Properties on
            # anything but PUBLISH, CONNACK and DISCONNECT.
            packet = replace(packet, properties=strip_optional_properties(props))  # type: ignore[arg-type]
        data = encode_packet(packet, version)
        limit = self.peer_maximum_packet_size
        if limit is None or len(data) <= limit:
            return data
        if isinstance(packet, Publish | Connect | Subscribe | Unsubscribe | Pingresp | Pingreq):
            return None
        props = packet.properties
        for strip_user in (False, True):
            smaller = strip_optional_properties(props, user_properties=strip_user)
            if smaller is props:
                continue
            data = encode_packet(replace(packet, properties=smaller), version)
            if len(data) <= limit:
                return data
        return None

    def violation_response(self, violation: ProtocolViolation, *, connack_sent: bool) -> bytes:
        """What to send before closing after ``violation`` (possibly ``b""``).

        MQTT 5: CONNACK(reason) if no CONNACK was sent yet, else DISCONNECT(reason). MQTT 3.1.1: a CONNACK
        only for an unsupported protocol level (0x01) or a rejected client identifier (0x02); otherwise
        nothing. A connection whose CONNECT named an unknown protocol gets nothing.
        """
        reason = violation.reason_code
        if self.version == PROTOCOL_LEVEL_V5:
            if connack_sent:
                return encode_packet(Disconnect(reason), PROTOCOL_LEVEL_V5)
            if reason not in _CONNACK_CODES:
                reason = ReasonCode.PROTOCOL_ERROR
            return encode_packet(Connack(False, reason), PROTOCOL_LEVEL_V5)
        if connack_sent or violation.packet_type != PacketType.CONNECT:
            return b""
        if reason in (ReasonCode.UNSUPPORTED_PROTOCOL_VERSION, ReasonCode.CLIENT_IDENTIFIER_NOT_VALID):
            return encode_packet(Connack(False, reason), PROTOCOL_LEVEL_V311)
        return b""

    def _learn_connack(self, connack: Connack) -> None:
        props = connack.properties
        self._topic_alias_maximum = props.topic_alias_maximum or 0
        self._max_qos = 2 if props.maximum_qos is None else props.maximum_qos
        self._retain_available = props.retain_available != 0
        self._sub_ids_available = props.subscription_identifier_available != 0
        if props.maximum_packet_size is not None and self.version == PROTOCOL_LEVEL_V5:
            self.max_packet_size = min(self.max_packet_size, props.maximum_packet_size)

    # ------------------------------------------------------------------------------------ decoding

    def _reserved_type(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        raise _malformed("packet type 0 is reserved")

    def _unexpected(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        raise _protocol_error("a client must not send this packet type")

    def _before_connect(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        raise _protocol_error("the first packet must be CONNECT")

    def _connect(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        if self.connect_received:
            raise _protocol_error("second CONNECT on the connection")
        if flags:
            raise _malformed("reserved fixed header flags are wrong")
        name, pos = _read_binary(buf, pos, end, "protocol name")
        if pos >= end:
            raise _malformed("truncated protocol level")
        level = buf[pos]
        pos += 1
        self.protocol_level = level
        if name == b"MQTT" and level == PROTOCOL_LEVEL_V5:
            self.version = PROTOCOL_LEVEL_V5
        elif name == b"MQTT" and level == PROTOCOL_LEVEL_V311:
            self.version = PROTOCOL_LEVEL_V311
        elif name in (b"MQTT", b"MQIsdp"):
            raise MqttDecodeError(
                ReasonCode.UNSUPPORTED_PROTOCOL_VERSION, f"unsupported protocol level {level}"
            )
        else:
            raise _protocol_error("unknown protocol name")
        v5 = self.version == PROTOCOL_LEVEL_V5
        if pos >= end:
            raise _malformed("truncated connect flags")
        cflags = buf[pos]
        pos += 1
        if cflags & 0x01:
            raise _malformed("reserved connect flag is set")
        will_flag = cflags & 0x04 != 0
        will_qos = (cflags >> 3) & 3
        will_retain = cflags & 0x20 != 0
        has_password = cflags & 0x40 != 0
        has_username = cflags & 0x80 != 0
        if will_qos == 3:
            raise _malformed("will QoS 3")
        if not will_flag and (will_qos or will_retain):
            raise _malformed("will QoS or will retain set without the will flag")
        if not v5 and has_password and not has_username:
            raise _malformed("password flag set without the user name flag")
        keep_alive = _read_u16(buf, pos, end, "keep alive")
        pos += 2
        props = EMPTY_PROPERTIES
        if v5:
            props, pos = decode_properties(buf, pos, end, PacketType.CONNECT)
        client_id, pos = _read_string(buf, pos, end, "client identifier")
        will: Will | None = None
        if will_flag:
            will_props = EMPTY_PROPERTIES
            if v5:
                will_props, pos = decode_properties(buf, pos, end, WILL)
            will_topic, pos = _read_string(buf, pos, end, "will topic")
            will_payload, pos = _read_binary(buf, pos, end, "will payload")
            if not is_valid_topic_name(will_topic):
                raise MqttDecodeError(ReasonCode.TOPIC_NAME_INVALID, "will topic is empty or has wildcards")
            if will_props is not EMPTY_PROPERTIES:
                _check_message_properties(will_props, will_payload, "will payload")
            will = Will(will_topic, will_payload, will_qos, will_retain, will_props)
        username: str | None = None
        password: bytes | None = None
        if has_username:
            username, pos = _read_string(buf, pos, end, "user name")
        if has_password:
            password, pos = _read_binary(buf, pos, end, "password")
        if pos != end:
            raise _malformed("remaining length does not match the CONNECT")
        clean_start = cflags & 0x02 != 0
        if not v5 and not client_id and not clean_start:
            raise MqttDecodeError(
                ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, "empty client identifier without clean session"
            )
        self.connect_received = True
        self._handlers = _SERVER_HANDLERS
        self.peer_maximum_packet_size = props.maximum_packet_size
        self._connect_session_expiry = props.session_expiry_interval or 0
        self._auth_method = props.authentication_method
        self._problem_information = props.request_problem_information != 0
        return Connect(level, client_id, clean_start, keep_alive, username, password, will, props)

    def _check_publish_properties(self, props: Properties, payload: bytes) -> None:
        if props.subscription_identifiers:
            raise _protocol_error("a client must not send a subscription identifier on PUBLISH")
        alias = props.topic_alias
        if alias is not None and alias > self._topic_alias_maximum:
            raise MqttDecodeError(
                ReasonCode.TOPIC_ALIAS_INVALID,
                f"topic alias {alias} exceeds the topic alias maximum {self._topic_alias_maximum}",
            )
        _check_message_properties(props, payload, "PUBLISH payload")

    def _publish(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        packet = super()._publish(buf, pos, end, flags)
        if flags & 0x07 and self.version == PROTOCOL_LEVEL_V5:
            qos = (flags >> 1) & 3
            if qos > self._max_qos:
                raise MqttDecodeError(ReasonCode.QOS_NOT_SUPPORTED, f"QoS {qos} above the maximum QoS")
            if flags & 1 and not self._retain_available:
                raise MqttDecodeError(ReasonCode.RETAIN_NOT_SUPPORTED, "retain is not available")
        return packet

    def _subscribe(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        if flags != 0x02:
            raise _malformed("reserved fixed header flags are wrong")
        packet_id = _read_packet_id(buf, pos, end)
        pos += 2
        v5 = self.version == PROTOCOL_LEVEL_V5
        props = EMPTY_PROPERTIES
        if v5:
            props, pos = decode_properties(buf, pos, end, PacketType.SUBSCRIBE)
            if props.subscription_identifiers and not self._sub_ids_available:
                raise MqttDecodeError(
                    ReasonCode.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
                    "subscription identifiers not supported",
                )
        subscriptions: list[Subscription] = []
        while pos < end:
            topic_filter, pos = _read_string(buf, pos, end, "topic filter")
            if pos >= end:
                raise _malformed("missing subscription options")
            options = buf[pos]
            pos += 1
            qos = options & 0x03
            if qos == 3:
                raise _malformed("subscription QoS 3")
            if not is_valid_topic_filter(topic_filter):
                raise _malformed("invalid topic filter")
            if v5:
                if options & 0xC0:
                    raise _malformed("reserved subscription option bits are set")
                retain_handling = (options >> 4) & 0x03
                if retain_handling == 3:
                    raise _protocol_error("retain handling 3")
                no_local = options & 0x04 != 0
                if no_local and topic_filter.startswith(_SHARE_PREFIX):
                    raise _protocol_error("no local on a shared subscription")
                subscriptions.append(
                    Subscription(topic_filter, qos, no_local, options & 0x08 != 0, retain_handling)
                )
            else:
                if options & 0xFC:
                    raise _malformed("reserved subscription option bits are set")
                subscriptions.append(Subscription(topic_filter, qos))
        if not subscriptions:
            raise _protocol_error("SUBSCRIBE without any topic filter")
        return Subscribe(packet_id, tuple(subscriptions), props)

    def _unsubscribe(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        if flags != 0x02:
            raise _malformed("reserved fixed header flags are wrong")
        packet_id = _read_packet_id(buf, pos, end)
        pos += 2
        props = EMPTY_PROPERTIES
        if self.version == PROTOCOL_LEVEL_V5:
            props, pos = decode_properties(buf, pos, end, PacketType.UNSUBSCRIBE)
        filters: list[str] = []
        while pos < end:
            topic_filter, pos = _read_string(buf, pos, end, "topic filter")
            if not is_valid_topic_filter(topic_filter):
                raise _malformed("invalid topic filter")
            filters.append(topic_filter)
        if not filters:
            raise _protocol_error("UNSUBSCRIBE without any topic filter")
        return Unsubscribe(packet_id, tuple(filters), props)

    def _pingreq(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        self._empty(pos, end, flags)
        return Pingreq()

    def _disconnect_from_client(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        packet = self._disconnect(buf, pos, end, flags)
        assert isinstance(packet, Disconnect)
        expiry = packet.properties.session_expiry_interval
        if expiry and not self._connect_session_expiry:
            raise _protocol_error("non-zero session expiry in DISCONNECT after zero in CONNECT")
        return packet

    def _auth_from_client(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        packet = self._auth(buf, pos, end, flags)
        if self._auth_method is None:
            raise _protocol_error("AUTH without an authentication method in CONNECT")
        return packet


class MqttClientCodec(_MqttCodec):
    """Client side: decodes server-to-client packets (for tests and the load generator).

    The version is fixed up front (the client chose it in its CONNECT); :func:`encode_packet` encodes.
    """

    __slots__ = ()

    def __init__(
        self, protocol_level: int = PROTOCOL_LEVEL_V5, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    ) -> None:
        super().__init__(max_packet_size)
        if protocol_level not in (PROTOCOL_LEVEL_V311, PROTOCOL_LEVEL_V5):
            raise ValueError("protocol_level must be 4 or 5")
        self.protocol_level = protocol_level
        self.version = protocol_level
        self._handlers = _CLIENT_HANDLERS_V5 if protocol_level == PROTOCOL_LEVEL_V5 else _CLIENT_HANDLERS_V311

    def __repr__(self) -> str:
        state = "failed" if self.violation else "ok"
        return f"MqttClientCodec(v{self.version} {state} buffered={len(self._buf)})"

    def _connack(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        if flags:
            raise _malformed("reserved fixed header flags are wrong")
        if pos + 2 > end:
            raise _malformed("truncated CONNACK")
        ack_flags, code = buf[pos], buf[pos + 1]
        pos += 2
        if ack_flags & 0xFE:
            raise _malformed("reserved CONNACK flags are set")
        props = EMPTY_PROPERTIES
        if self.version == PROTOCOL_LEVEL_V5:
            if code not in _CONNACK_CODES:
                raise _protocol_error(f"CONNACK reason code 0x{code:02X} is not valid")
            props, pos = decode_properties(buf, pos, end, PacketType.CONNACK)
        elif code > ConnackReturnCode.NOT_AUTHORIZED:
            raise _protocol_error(f"CONNACK return code {code} is reserved")
        if pos != end:
            raise _malformed("remaining length does not match the CONNACK")
        return Connack(ack_flags == 1, code, props)

    def _suback(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        if flags:
            raise _malformed("reserved fixed header flags are wrong")
        packet_id = _read_packet_id(buf, pos, end)
        pos += 2
        props = EMPTY_PROPERTIES
        allowed = _SUBACK_CODES
        if self.version == PROTOCOL_LEVEL_V5:
            props, pos = decode_properties(buf, pos, end, PacketType.SUBACK)
        else:
            allowed = frozenset({0x00, 0x01, 0x02, 0x80})
        codes = tuple(buf[pos:end])
        for code in codes:
            if code not in allowed:
                raise _protocol_error(f"SUBACK reason code 0x{code:02X} is not valid")
        if not codes:
            raise _protocol_error("SUBACK without reason codes")
        return Suback(packet_id, codes, props)

    def _unsuback(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        if flags:
            raise _malformed("reserved fixed header flags are wrong")
        packet_id = _read_packet_id(buf, pos, end)
        pos += 2
        if self.version != PROTOCOL_LEVEL_V5:
            if pos != end:
                raise _malformed("remaining length does not match the UNSUBACK")
            return Unsuback(packet_id)
        props, pos = decode_properties(buf, pos, end, PacketType.UNSUBACK)
        codes = tuple(buf[pos:end])
        for code in codes:
            if code not in _UNSUBACK_CODES:
                raise _protocol_error(f"UNSUBACK reason code 0x{code:02X} is not valid")
        if not codes:
            raise _protocol_error("UNSUBACK without reason codes")
        return Unsuback(packet_id, codes, props)

    def _pingresp(self, buf: bytes, pos: int, end: int, flags: int) -> Packet:
        self._empty(pos, end, flags)
        return Pingresp()


def _table(default: _Handler, entries: dict[int, _Handler]) -> list[_Handler]:
    table = [default] * 16
    for ptype, handler in entries.items():
        table[ptype] = handler
    return table


_NO_HANDLERS: list[_Handler] = [_MqttCodec._unexpected] * 16
_SERVER_BEFORE_CONNECT = _table(
    MqttServerCodec._before_connect,
    {0: MqttServerCodec._reserved_type, PacketType.CONNECT: MqttServerCodec._connect},
)
_SERVER_HANDLERS = _table(
    MqttServerCodec._unexpected,
    {
        0: MqttServerCodec._reserved_type,
        PacketType.CONNECT: MqttServerCodec._connect,
        PacketType.PUBLISH: MqttServerCodec._publish,
        PacketType.PUBACK: MqttServerCodec._puback,
        PacketType.PUBREC: MqttServerCodec._pubrec,
        PacketType.PUBREL: MqttServerCodec._pubrel,
        PacketType.PUBCOMP: MqttServerCodec._pubcomp,
        PacketType.SUBSCRIBE: MqttServerCodec._subscribe,
        PacketType.UNSUBSCRIBE: MqttServerCodec._unsubscribe,
        PacketType.PINGREQ: MqttServerCodec._pingreq,
        PacketType.DISCONNECT: MqttServerCodec._disconnect_from_client,
        PacketType.AUTH: MqttServerCodec._auth_from_client,
    },
)
_CLIENT_HANDLERS_V311 = _table(
    MqttClientCodec._unexpected,
    {
        PacketType.CONNACK: MqttClientCodec._connack,
        PacketType.PUBLISH: MqttClientCodec._publish,
        PacketType.PUBACK: MqttClientCodec._puback,
        PacketType.PUBREC: MqttClientCodec._pubrec,
        PacketType.PUBREL: MqttClientCodec._pubrel,
        PacketType.PUBCOMP: MqttClientCodec._pubcomp,
        PacketType.SUBACK: MqttClientCodec._suback,
        PacketType.UNSUBACK: MqttClientCodec._unsuback,
        PacketType.PINGRESP: MqttClientCodec._pingresp,
    },
)
_CLIENT_HANDLERS_V5 = _table(
    MqttClientCodec._unexpected,
    {
        **dict(enumerate(_CLIENT_HANDLERS_V311)),
        PacketType.DISCONNECT: MqttClientCodec._disconnect,
        PacketType.AUTH: MqttClientCodec._auth,
    },
)


# ------------------------------------------------------------------------------------------ encoding


def _frame(first: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes((first, n)) + body
    return bytes((first,)) + encode_vbi(n) + body


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def _binary(data: bytes) -> bytes:
    return _U16.pack(len(data)) + data


def _encode_connect(p: Connect, version: int) -> bytes:
    level = p.protocol_level
    v5 = level == PROTOCOL_LEVEL_V5
    flags = 0x02 if p.clean_start else 0
    will = p.will
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if p.password is not None:
        flags |= 0x40
    if p.username is not None:
        flags |= 0x80
    parts = [_string("MQIsdp" if level == 3 else "MQTT"), bytes((level, flags)), _U16.pack(p.keep_alive)]
    if v5:
        parts.append(encode_properties(p.properties))
    parts.append(_string(p.client_id))
    if will is not None:
        if v5:
            parts.append(encode_properties(will.properties))
        parts.append(_string(will.topic))
        parts.append(_binary(will.payload))
    if p.username is not None:
        parts.append(_string(p.username))
    if p.password is not None:
        parts.append(_binary(p.password))
    return _frame(0x10, b"".join(parts))


def _encode_connack(p: Connack, version: int) -> bytes:
    if version == PROTOCOL_LEVEL_V5:
        body = bytes((1 if p.session_present else 0, p.reason_code)) + encode_properties(p.properties)
        return _frame(0x20, body)
    code = connack_code_v311(p.reason_code)
    # [MQTT-3.2.2-4]: session present is 0 with a non-zero return code.
    return bytes((0x20, 2, 1 if p.session_present and code == 0 else 0, code))


def _encode_publish(p: Publish, version: int) -> bytes:
    topic = p.topic.encode("utf-8")
    first = 0x30 | (p.qos << 1) | (0x08 if p.dup else 0) | (0x01 if p.retain else 0)
    parts = [_U16.pack(len(topic)), topic]
    if p.qos:
        if p.packet_id is None:
            raise ValueError("a QoS 1/2 PUBLISH needs a packet id")
        parts.append(_U16.pack(p.packet_id))
    if version == PROTOCOL_LEVEL_V5:
        props = p.properties
        parts.append(b"\x00" if props is EMPTY_PROPERTIES else encode_properties(props))
    parts.append(p.payload)
    return _frame(first, b"".join(parts))


def _encode_ack(first: int, packet_id: int, reason: int, props: Properties, version: int) -> bytes:
    if version != PROTOCOL_LEVEL_V5 or (reason == 0 and props is EMPTY_PROPERTIES):
        return bytes((first, 2, packet_id >> 8, packet_id & 0xFF))
    if props is EMPTY_PROPERTIES:
        return bytes((first, 3, packet_id >> 8, packet_id & 0xFF, reason))
    return _frame(first, _U16.pack(packet_id) + bytes((reason,)) + encode_properties(props))


def _encode_puback(p: Puback, version: int) -> bytes:
    return _encode_ack(0x40, p.packet_id, p.reason_code, p.properties, version)


def _encode_pubrec(p: Pubrec, version: int) -> bytes:
    return _encode_ack(0x50, p.packet_id, p.reason_code, p.properties, version)


def _encode_pubrel(p: Pubrel, version: int) -> bytes:
    return _encode_ack(0x62, p.packet_id, p.reason_code, p.properties, version)


def _encode_pubcomp(p: Pubcomp, version: int) -> bytes:
    return _encode_ack(0x70, p.packet_id, p.reason_code, p.properties, version)


def _encode_subscribe(p: Subscribe, version: int) -> bytes:
    v5 = version == PROTOCOL_LEVEL_V5
    parts = [_U16.pack(p.packet_id)]
    if v5:
        parts.append(encode_properties(p.properties))
    for s in p.subscriptions:
        options = s.qos
        if v5:
            options |= (
                (0x04 if s.no_local else 0)
                | (0x08 if s.retain_as_published else 0)
                | (s.retain_handling << 4)
            )
        parts.append(_string(s.topic_filter))
        parts.append(bytes((options,)))
    return _frame(0x82, b"".join(parts))


def _encode_suback(p: Suback, version: int) -> bytes:
    if version == PROTOCOL_LEVEL_V5:
        body = _U16.pack(p.packet_id) + encode_properties(p.properties) + bytes(p.reason_codes)
    else:
        codes = bytes(c if c <= 2 else 0x80 for c in p.reason_codes)
        body = _U16.pack(p.packet_id) + codes
    return _frame(0x90, body)


def _encode_unsubscribe(p: Unsubscribe, version: int) -> bytes:
    parts = [_U16.pack(p.packet_id)]
    if version == PROTOCOL_LEVEL_V5:
        parts.append(encode_properties(p.properties))
    parts.extend(_string(f) for f in p.topic_filters)
    return _frame(0xA2, b"".join(parts))


def _encode_unsuback(p: Unsuback, version: int) -> bytes:
    if version != PROTOCOL_LEVEL_V5:
        return bytes((0xB0, 2, p.packet_id >> 8, p.packet_id & 0xFF))
    return _frame(0xB0, _U16.pack(p.packet_id) + encode_properties(p.properties) + bytes(p.reason_codes))


def _encode_pingreq(p: Pingreq, version: int) -> bytes:
    return b"\xc0\x00"


def _encode_pingresp(p: Pingresp, version: int) -> bytes:
    return b"\xd0\x00"


def _encode_disconnect(p: Disconnect, version: int) -> bytes:
    if version != PROTOCOL_LEVEL_V5 or (p.reason_code == 0 and p.properties is EMPTY_PROPERTIES):
        return b"\xe0\x00"
    if p.properties is EMPTY_PROPERTIES:
        return bytes((0xE0, 1, p.reason_code))
    return _frame(0xE0, bytes((p.reason_code,)) + encode_properties(p.properties))


def _encode_auth(p: Auth, version: int) -> bytes:
    if version != PROTOCOL_LEVEL_V5:
        raise ValueError("AUTH exists only in MQTT 5")
    if p.reason_code == 0 and p.properties is EMPTY_PROPERTIES:
        return b"\xf0\x00"
    return _frame(0xF0, bytes((p.reason_code,)) + encode_properties(p.properties))


_ENCODERS: dict[type, Callable[[Packet, int], bytes]] = {
    Connect: _encode_connect,  # type: ignore[dict-item]
    Connack: _encode_connack,  # type: ignore[dict-item]
    Publish: _encode_publish,  # type: ignore[dict-item]
    Puback: _encode_puback,  # type: ignore[dict-item]
    Pubrec: _encode_pubrec,  # type: ignore[dict-item]
    Pubrel: _encode_pubrel,  # type: ignore[dict-item]
    Pubcomp: _encode_pubcomp,  # type: ignore[dict-item]
    Subscribe: _encode_subscribe,  # type: ignore[dict-item]
    Suback: _encode_suback,  # type: ignore[dict-item]
    Unsubscribe: _encode_unsubscribe,  # type: ignore[dict-item]
    Unsuback: _encode_unsuback,  # type: ignore[dict-item]
    Pingreq: _encode_pingreq,  # type: ignore[dict-item]
    Pingresp: _encode_pingresp,  # type: ignore[dict-item]
    Disconnect: _encode_disconnect,  # type: ignore[dict-item]
    Auth: _encode_auth,  # type: ignore[dict-item]
}


def encode_packet(packet: Packet, version: int) -> bytes:
    """Encode any packet (either direction) for protocol ``version`` 4 or 5 (CONNECT uses its own level).

    In 3.1.1 the MQTT 5 fields are left out: properties, ack reason codes, UNSUBACK codes; a CONNACK reason
    code becomes the 3.1.1 return code and SUBACK failure codes become 0x80. No size limit is applied.
    """
    return _ENCODERS[type(packet)](packet, version)
