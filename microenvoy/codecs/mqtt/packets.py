"""MQTT 3.1.1 / 5.0 packet model: frozen packet dataclasses, MQTT 5 properties and reason codes.

This module is the vocabulary shared by the codec (``microenvoy.codecs.mqtt.codec``), the broker core and the
listener: it holds data only, no parsing. One class per MQTT control packet; fields that exist only in MQTT 5
(reason codes on acks, properties) default so that the same objects describe a v3.1.1 session (the encoder
leaves them out when the negotiated protocol level is 4).

Conventions:

* Strings are ``str`` (UTF-8 on the wire, validated by the codec), binary data is ``bytes``.
* ``qos`` is 0, 1 or 2; ``packet_id`` is 1..65535 (``None`` on a QoS 0 PUBLISH).
* ``properties`` is a :class:`Properties`; :data:`EMPTY_PROPERTIES` when there are none.
* A reason code is a plain ``int``; :class:`ReasonCode` names them (it is an ``IntEnum``, so members compare
  equal to the ints the decoder produces).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "CONNACK_RETURN_CODES_V311",
    "EMPTY_PROPERTIES",
    "PROTOCOL_LEVEL_V5",
    "PROTOCOL_LEVEL_V31",
    "PROTOCOL_LEVEL_V311",
    "Auth",
    "Connack",
    "ConnackReturnCode",
    "Connect",
    "Disconnect",
    "Packet",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Properties",
    "ProtocolViolation",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "ReasonCode",
    "Suback",
    "Subscribe",
    "Subscription",
    "Unsuback",
    "Unsubscribe",
    "Will",
    "connack_code_v311",
]

PROTOCOL_LEVEL_V31 = 3
"""MQTT 3.1 (protocol name ``MQIsdp``): not supported, answered with CONNACK 0x01."""
PROTOCOL_LEVEL_V311 = 4
"""MQTT 3.1.1 (protocol name ``MQTT``)."""
PROTOCOL_LEVEL_V5 = 5
"""MQTT 5.0 (protocol name ``MQTT``)."""


class PacketType(IntEnum):
    """MQTT control packet types (the high nibble of the fixed header's first byte)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


class ReasonCode(IntEnum):
    """MQTT 5.0 reason codes (section 2.4). Several names share a value (e.g. 0x00)."""

    SUCCESS = 0x00
    NORMAL_DISCONNECTION = 0x00
    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL_MESSAGE = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


class ConnackReturnCode(IntEnum):
    """MQTT 3.1.1 CONNACK return codes (section 3.2.2.3)."""

    ACCEPTED = 0x00
    UNACCEPTABLE_PROTOCOL_VERSION = 0x01
    IDENTIFIER_REJECTED = 0x02
    SERVER_UNAVAILABLE = 0x03
    BAD_USER_NAME_OR_PASSWORD = 0x04
    NOT_AUTHORIZED = 0x05


CONNACK_RETURN_CODES_V311: dict[int, int] = {
    ReasonCode.SUCCESS: ConnackReturnCode.ACCEPTED,
    ReasonCode.UNSUPPORTED_PROTOCOL_VERSION: ConnackReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
    ReasonCode.CLIENT_IDENTIFIER_NOT_VALID: ConnackReturnCode.IDENTIFIER_REJECTED,
    ReasonCode.SERVER_UNAVAILABLE: ConnackReturnCode.SERVER_UNAVAILABLE,
    ReasonCode.SERVER_BUSY: ConnackReturnCode.SERVER_UNAVAILABLE,
    ReasonCode.SERVER_SHUTTING_DOWN: ConnackReturnCode.SERVER_UNAVAILABLE,
    ReasonCode.USE_ANOTHER_SERVER: ConnackReturnCode.SERVER_UNAVAILABLE,
    ReasonCode.SERVER_MOVED: ConnackReturnCode.SERVER_UNAVAILABLE,
    ReasonCode.CONNECTION_RATE_EXCEEDED: ConnackReturnCode.SERVER_UNAVAILABLE,
    ReasonCode.QUOTA_EXCEEDED: ConnackReturnCode.SERVER_UNAVAILABLE,
    ReasonCode.BAD_USER_NAME_OR_PASSWORD: ConnackReturnCode.BAD_USER_NAME_OR_PASSWORD,
    ReasonCode.BAD_AUTHENTICATION_METHOD: ConnackReturnCode.BAD_USER_NAME_OR_PASSWORD,
    ReasonCode.NOT_AUTHORIZED: ConnackReturnCode.NOT_AUTHORIZED,
    ReasonCode.BANNED: ConnackReturnCode.NOT_AUTHORIZED,
}
"""MQTT 5 CONNACK reason code -> the closest MQTT 3.1.1 CONNACK return code (others: Server unavailable)."""


def connack_code_v311(reason_code: int) -> int:
    """The MQTT 3.1.1 CONNACK return code for an MQTT 5 CONNACK reason code (0..5)."""
    if reason_code in CONNACK_RETURN_CODES_V311:
        return CONNACK_RETURN_CODES_V311[reason_code]
    if 0 <= reason_code <= 5 and reason_code < 0x80:
        # Already a v3.1.1 return code (the caller passed one through).
        return reason_code
    return ConnackReturnCode.SERVER_UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Properties:
    """MQTT 5 properties (section 2.2.2.2); every field is optional. ``None``/empty means "absent"."""

    payload_format_indicator: int | None = None
    """0x01 (PUBLISH, Will): 0 unspecified bytes, 1 UTF-8 payload."""
    message_expiry_interval: int | None = None
    """0x02 (PUBLISH, Will): lifetime of the message in seconds."""
    content_type: str | None = None
    """0x03 (PUBLISH, Will): MIME type of the payload."""
    response_topic: str | None = None
    """0x08 (PUBLISH, Will): topic name for a response message."""
    correlation_data: bytes | None = None
    """0x09 (PUBLISH, Will): binary data correlating request and response."""
    subscription_identifiers: tuple[int, ...] = ()
    """0x0B (PUBLISH, SUBSCRIBE): 1..268,435,455; several on a PUBLISH, at most one on a SUBSCRIBE."""
    session_expiry_interval: int | None = None
    """0x11 (CONNECT, CONNACK, DISCONNECT): seconds the session outlives the connection."""
    assigned_client_identifier: str | None = None
    """0x12 (CONNACK): the client id the server assigned to a client that sent an empty one."""
    server_keep_alive: int | None = None
    """0x13 (CONNACK): keep alive the server imposes, in seconds."""
    authentication_method: str | None = None
    """0x15 (CONNECT, CONNACK, AUTH): extended authentication method name."""
    authentication_data: bytes | None = None
    """0x16 (CONNECT, CONNACK, AUTH): extended authentication data."""
    request_problem_information: int | None = None
    """0x17 (CONNECT): 0 or 1."""
    will_delay_interval: int | None = None
    """0x18 (Will properties): seconds to delay the will message."""
    request_response_information: int | None = None
    """0x19 (CONNECT): 0 or 1."""
    response_information: str | None = None
    """0x1A (CONNACK): basis for response topics."""
    server_reference: str | None = None
    """0x1C (CONNACK, DISCONNECT): another server to use."""
    reason_string: str | None = None
    """0x1F (all acks, CONNACK, DISCONNECT, AUTH): human-readable diagnostic."""
    receive_maximum: int | None = None
    """0x21 (CONNECT, CONNACK): 1..65535 concurrent QoS 1/2 publications."""
    topic_alias_maximum: int | None = None
    """0x22 (CONNECT, CONNACK): highest topic alias accepted."""
    topic_alias: int | None = None
    """0x23 (PUBLISH): 1..65535."""
    maximum_qos: int | None = None
    """0x24 (CONNACK): 0 or 1 (absent means 2)."""
    retain_available: int | None = None
    """0x25 (CONNACK): 0 or 1."""
    user_properties: tuple[tuple[str, str], ...] = ()
    """0x26 (every packet with properties): name/value pairs, order preserved, repeats allowed."""
    maximum_packet_size: int | None = None
    """0x27 (CONNECT, CONNACK): largest packet the sender accepts, 1..4,294,967,295."""
    wildcard_subscription_available: int | None = None
    """0x28 (CONNACK): 0 or 1."""
    subscription_identifier_available: int | None = None
    """0x29 (CONNACK): 0 or 1."""
    shared_subscription_available: int | None = None
    """0x2A (CONNACK): 0 or 1."""


EMPTY_PROPERTIES = Properties()
"""The shared "no properties" value."""


@dataclass(frozen=True, slots=True)
class Will:
    """The will message carried by a CONNECT."""

    topic: str
    """Will topic (a topic name, no wildcards)."""
    payload: bytes
    """Will payload."""
    qos: int = 0
    """Will QoS 0..2."""
    retain: bool = False
    """Will retain flag."""
    properties: Properties = EMPTY_PROPERTIES
    """Will properties (v5): will delay, payload format, expiry, content type, response topic ..."""


@dataclass(frozen=True, slots=True)
class Connect:
    """CONNECT (client -> server)."""

    protocol_level: int
    """4 (3.1.1) or 5 (5.0); 3 only ever appears in a client-side encoding used by tests."""
    client_id: str
    """Client identifier; may be empty (the server assigns one, or rejects it; see the spec)."""
    clean_start: bool = True
    """Clean Start (v5) / Clean Session (v3.1.1)."""
    keep_alive: int = 0
    """Keep alive in seconds, 0 = off."""
    username: str | None = None
    """User name, if the flag is set."""
    password: bytes | None = None
    """Password, if the flag is set."""
    will: Will | None = None
    """The will message, if the will flag is set."""
    properties: Properties = EMPTY_PROPERTIES
    """CONNECT properties (v5)."""


@dataclass(frozen=True, slots=True)
class Connack:
    """CONNACK (server -> client)."""

    session_present: bool = False
    """Session present flag."""
    reason_code: int = 0
    """v5 reason code; encoded as the v3.1.1 return code (:func:`connack_code_v311`) on a 3.1.1 session."""
    properties: Properties = EMPTY_PROPERTIES
    """CONNACK properties (v5)."""


@dataclass(frozen=True, slots=True)
class Publish:
    """PUBLISH (both directions)."""

    topic: str
    """Topic name; empty when a v5 Topic Alias stands for it (resolving aliases is the session's job)."""
    payload: bytes
    """Application message."""
    qos: int = 0
    """QoS 0..2."""
    retain: bool = False
    """RETAIN flag."""
    dup: bool = False
    """DUP flag (only with QoS > 0)."""
    packet_id: int | None = None
    """Packet identifier 1..65535 for QoS 1/2, None for QoS 0."""
    properties: Properties = EMPTY_PROPERTIES
    """PUBLISH properties (v5)."""


@dataclass(frozen=True, slots=True)
class Puback:
    """PUBACK (QoS 1 acknowledgement)."""

    packet_id: int
    """Packet identifier of the PUBLISH."""
    reason_code: int = 0
    """v5 reason code (0 success, 0x10 no matching subscribers, >= 0x80 failure)."""
    properties: Properties = EMPTY_PROPERTIES
    """Reason string, user properties (v5)."""


@dataclass(frozen=True, slots=True)
class Pubrec:
    """PUBREC (QoS 2, part 1)."""

    packet_id: int
    """Packet identifier of the PUBLISH."""
    reason_code: int = 0
    """v5 reason code."""
    properties: Properties = EMPTY_PROPERTIES
    """Reason string, user properties (v5)."""


@dataclass(frozen=True, slots=True)
class Pubrel:
    """PUBREL (QoS 2, part 2)."""

    packet_id: int
    """Packet identifier of the PUBLISH."""
    reason_code: int = 0
    """v5 reason code (0 success, 0x92 packet identifier not found)."""
    properties: Properties = EMPTY_PROPERTIES
    """Reason string, user properties (v5)."""


@dataclass(frozen=True, slots=True)
class Pubcomp:
    """PUBCOMP (QoS 2, part 3)."""

    packet_id: int
    """Packet identifier of the PUBLISH."""
    reason_code: int = 0
    """v5 reason code (0 success, 0x92 packet identifier not found)."""
    properties: Properties = EMPTY_PROPERTIES
    """Reason string, user properties (v5)."""


@dataclass(frozen=True, slots=True)
class Subscription:
    """One topic filter of a SUBSCRIBE with its subscription options."""

    topic_filter: str
    """Topic filter (may contain ``+``/``#``, may be ``$share/<group>/<filter>``)."""
    qos: int = 0
    """Maximum QoS 0..2."""
    no_local: bool = False
    """v5 No Local option."""
    retain_as_published: bool = False
    """v5 Retain As Published option."""
    retain_handling: int = 0
    """v5 Retain Handling 0..2."""


@dataclass(frozen=True, slots=True)
class Subscribe:
    """SUBSCRIBE (client -> server)."""

    packet_id: int
    """Packet identifier."""
    subscriptions: tuple[Subscription, ...]
    """At least one subscription."""
    properties: Properties = EMPTY_PROPERTIES
    """Subscription identifier, user properties (v5)."""


@dataclass(frozen=True, slots=True)
class Suback:
    """SUBACK (server -> client)."""

    packet_id: int
    """Packet identifier of the SUBSCRIBE."""
    reason_codes: tuple[int, ...]
    """One per subscription: granted QoS 0..2 or a failure code (v3.1.1: only 0x80 is a failure code)."""
    properties: Properties = EMPTY_PROPERTIES
    """Reason string, user properties (v5)."""


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """UNSUBSCRIBE (client -> server)."""

    packet_id: int
    """Packet identifier."""
    topic_filters: tuple[str, ...]
    """At least one topic filter."""
    properties: Properties = EMPTY_PROPERTIES
    """User properties (v5)."""


@dataclass(frozen=True, slots=True)
class Unsuback:
    """UNSUBACK (server -> client)."""

    packet_id: int
    """Packet identifier of the UNSUBSCRIBE."""
    reason_codes: tuple[int, ...] = ()
    """v5: one per topic filter (0 success, 0x11 no subscription existed ...); not sent in v3.1.1."""
    properties: Properties = EMPTY_PROPERTIES
    """Reason string, user properties (v5)."""


@dataclass(frozen=True, slots=True)
class Pingreq:
    """PINGREQ (client -> server)."""


@dataclass(frozen=True, slots=True)
class Pingresp:
    """PINGRESP (server -> client)."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """DISCONNECT (client -> server; in v5 also server -> client)."""

    reason_code: int = 0
    """v5 reason code (0 normal, 0x04 disconnect with will message, >= 0x80 error)."""
    properties: Properties = EMPTY_PROPERTIES
    """Session expiry interval, reason string, server reference, user properties (v5)."""


@dataclass(frozen=True, slots=True)
class Auth:
    """AUTH (v5 only, both directions)."""

    reason_code: int = 0
    """0 success, 0x18 continue authentication, 0x19 re-authenticate."""
    properties: Properties = EMPTY_PROPERTIES
    """Authentication method/data, reason string, user properties."""


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke the protocol; the codec parses nothing more after returning this.

    The listener answers a v5 client with DISCONNECT(reason_code) (CONNACK(reason_code) if CONNECT has not
    been accepted yet) and closes; a v3.1.1 client is simply disconnected (for an unsupported protocol level,
    CONNACK with return code 0x01 first).
    """

    reason_code: int
    """0x81 malformed, 0x82 protocol error, 0x84 unsupported version, 0x95 too large, 0x99 ..."""
    message: str
    """What was wrong, for the log line (never contains payload or credentials)."""
    packet_type: int = 0
    """The offending packet's type (0 when unknown)."""


Packet = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
    | Auth
)
"""Any MQTT control packet."""
