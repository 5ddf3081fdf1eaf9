"""The sans-IO MQTT codec: round trips in both versions, framing, and every rejection with its reason code."""

from __future__ import annotations

import pytest

from microenvoy.codecs.mqtt.codec import (
    DEFAULT_MAX_PACKET_SIZE,
    MqttClientCodec,
    MqttServerCodec,
    encode_packet,
    is_valid_topic_filter,
    is_valid_topic_name,
)
from microenvoy.codecs.mqtt.packets import (
    EMPTY_PROPERTIES,
    Auth,
    Connack,
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
)
from microenvoy.codecs.mqtt.properties import encode_vbi

RC = ReasonCode


def frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_vbi(len(body)) + body


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big") + raw


def server(version: int = 5, **connect_props: object) -> MqttServerCodec:
    codec = MqttServerCodec()
    props = Properties(**connect_props) if connect_props else EMPTY_PROPERTIES  # type: ignore[arg-type]
    out = codec.receive_data(encode_packet(Connect(version, "dev1", properties=props), version))
    assert len(out) == 1
    assert isinstance(out[0], Connect)
    return codec


def violation(codec: MqttServerCodec, data: bytes) -> ProtocolViolation:
    out = codec.receive_data(data)
    assert out, "expected a violation, got nothing"
    last = out[-1]
    assert isinstance(last, ProtocolViolation), out
    return last


# ------------------------------------------------------------------------------------------ round trips

FULL_PROPS = Properties(
    payload_format_indicator=1,
    message_expiry_interval=60,
    content_type="application/json",
    response_topic="reply/here",
    correlation_data=b"\x00\x01corr",
    user_properties=(("a", "1"), ("a", "2"), ("ü", "\U0001f600")),
)

CLIENT_PACKETS_V5: list[Packet] = [
    Publish("a/b", b"payload", 0, False, False, None),
    Publish("a/b", b"{}", 1, True, True, 7, FULL_PROPS),
    Publish("", b"x", 2, False, False, 65535, Properties(topic_alias=1)),
    Puback(1),
    Puback(2, RC.NO_MATCHING_SUBSCRIBERS),
    Puback(3, RC.QUOTA_EXCEEDED, Properties(reason_string="full", user_properties=(("k", "v"),))),
    Pubrec(4, RC.UNSPECIFIED_ERROR),
    Pubrel(5),
    Pubrel(6, RC.PACKET_IDENTIFIER_NOT_FOUND),
    Pubcomp(7, 0, Properties(reason_string="ok")),
    Subscribe(
        8,
        (
            Subscription("a/+/c", 2, True, True, 2),
            Subscription("#", 0),
            Subscription("$share/g1/x/#", 1, False, True, 1),
        ),
        Properties(subscription_identifiers=(268_435_455,), user_properties=(("u", "p"),)),
    ),
    Unsubscribe(9, ("a/+/c", "#"), Properties(user_properties=(("u", "p"),))),
    Pingreq(),
    Disconnect(RC.DISCONNECT_WITH_WILL_MESSAGE, Properties(reason_string="bye", session_expiry_interval=0)),
    Disconnect(),
]

CLIENT_PACKETS_V311: list[Packet] = [
    Publish("a/b", b"payload", 0, True, False, None),
    Publish("a/b", b"", 1, False, True, 1),
    Publish("a/b", b"x" * 300, 2, False, False, 2),
    Puback(1),
    Pubrec(2),
    Pubrel(3),
    Pubcomp(4),
    Subscribe(5, (Subscription("a/+", 1), Subscription("b/#", 2))),
    Unsubscribe(6, ("a/+",)),
    Pingreq(),
    Disconnect(),
]


@pytest.mark.parametrize("packet", CLIENT_PACKETS_V5, ids=lambda p: type(p).__name__)
def test_client_packets_round_trip_v5(packet: Packet) -> None:
    codec = server(5, topic_alias_maximum=10)
    codec.encode(Connack(properties=Properties(topic_alias_maximum=5)))
    assert codec.receive_data(encode_packet(packet, 5)) == [packet]


@pytest.mark.parametrize("packet", CLIENT_PACKETS_V311, ids=lambda p: type(p).__name__)
def test_client_packets_round_trip_v311(packet: Packet) -> None:
    codec = server(4)
    assert codec.receive_data(encode_packet(packet, 4)) == [packet]


def test_connect_round_trip_v5_with_everything() -> None:
    connect = Connect(
        5,
        "client-ü",
        False,
        65535,
        "user",
        b"\x00secret",
        Will(
            "will/topic",
            b"gone",
            2,
            True,
            Properties(will_delay_interval=30, payload_format_indicator=1, content_type="text/plain"),
        ),
        Properties(
            session_expiry_interval=0xFFFFFFFF,
            receive_maximum=20,
            maximum_packet_size=1 << 20,
            topic_alias_maximum=8,
            request_response_information=1,
            request_problem_information=0,
            authentication_method="SCRAM",
            authentication_data=b"\x01\x02",
            user_properties=(("x", "y"),),
        ),
    )
    codec = MqttServerCodec()
    assert codec.receive_data(encode_packet(connect, 5)) == [connect]
    assert codec.version == 5
    assert codec.protocol_level == 5
    assert codec.connect_received
    assert codec.peer_maximum_packet_size == 1 << 20


def test_connect_round_trip_v311() -> None:
    connect = Connect(4, "c", True, 10, "u", b"p", Will("w", b"x", 1, False))
    codec = MqttServerCodec()
    assert codec.receive_data(encode_packet(connect, 4)) == [connect]
    assert codec.version == 4
    assert codec.protocol_level == 4


def test_v5_password_without_username_is_allowed() -> None:
    codec = MqttServerCodec()
    connect = Connect(5, "c", password=b"token")
    assert codec.receive_data(encode_packet(connect, 5)) == [connect]


SERVER_PACKETS_V5: list[Packet] = [
    Connack(
        True,
        0,
        Properties(
            assigned_client_identifier="auto-1",
            server_keep_alive=30,
            receive_maximum=100,
            topic_alias_maximum=10,
            maximum_qos=1,
            retain_available=1,
            maximum_packet_size=65536,
            wildcard_subscription_available=1,
            subscription_identifier_available=1,
            shared_subscription_available=1,
            response_information="resp/",
            session_expiry_interval=100,
        ),
    ),
    Connack(False, RC.NOT_AUTHORIZED, Properties(reason_string="no")),
    Publish("a/b", b"x", 1, False, False, 3, Properties(subscription_identifiers=(1, 2, 300))),
    Puback(1, RC.NOT_AUTHORIZED),
    Pubrec(2),
    Pubrel(3),
    Pubcomp(4, RC.PACKET_IDENTIFIER_NOT_FOUND),
    Suback(5, (0, 1, 2, RC.NOT_AUTHORIZED, RC.TOPIC_FILTER_INVALID), Properties(reason_string="partly")),
    Unsuback(6, (0, RC.NO_SUBSCRIPTION_EXISTED)),
    Pingresp(),
    Disconnect(RC.SERVER_SHUTTING_DOWN, Properties(server_reference="other:1883")),
    Auth(RC.CONTINUE_AUTHENTICATION, Properties(authentication_method="SCRAM", authentication_data=b"d")),
]


@pytest.mark.parametrize("packet", SERVER_PACKETS_V5, ids=lambda p: type(p).__name__)
def test_server_packets_round_trip_v5(packet: Packet) -> None:
    codec = server(5)
    data = codec.encode(packet)
    assert data is not None
    assert MqttClientCodec(5).receive_data(data) == [packet]


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (Connack(True, 0), Connack(True, 0)),
        (Connack(True, RC.BAD_USER_NAME_OR_PASSWORD), Connack(False, 4)),
        (Connack(False, RC.CLIENT_IDENTIFIER_NOT_VALID), Connack(False, 2)),
        (Connack(False, 0, Properties(server_keep_alive=5)), Connack(False, 0)),
        (
            Publish("t", b"p", 1, True, False, 9, Properties(content_type="x")),
            Publish("t", b"p", 1, True, False, 9),
        ),
        (Puback(1, RC.NOT_AUTHORIZED), Puback(1)),
        (Pubrec(2, RC.UNSPECIFIED_ERROR), Pubrec(2)),
        (Pubrel(3), Pubrel(3)),
        (Pubcomp(4), Pubcomp(4)),
        (Suback(5, (0, 1, 2, RC.NOT_AUTHORIZED, RC.QUOTA_EXCEEDED)), Suback(5, (0, 1, 2, 0x80, 0x80))),
        (Unsuback(6, (0, RC.NO_SUBSCRIPTION_EXISTED)), Unsuback(6)),
        (Pingresp(), Pingresp()),
    ],
    ids=lambda p: type(p).__name__,
)
def test_server_packets_v311_leave_out_v5_fields(packet: Packet, expected: Packet) -> None:
    codec = server(4)
    data = codec.encode(packet)
    assert data is not None
    assert MqttClientCodec(4).receive_data(data) == [expected]


def test_v311_encodings_are_exact() -> None:
    codec = server(4)
    assert codec.encode(Connack(False, 0)) == b"\x20\x02\x00\x00"
    assert codec.encode(Puback(0x1234, RC.UNSPECIFIED_ERROR)) == b"\x40\x02\x12\x34"
    assert codec.encode(Pubrel(1)) == b"\x62\x02\x00\x01"
    assert codec.encode(Unsuback(2, (0,))) == b"\xb0\x02\x00\x02"
    assert codec.encode(Suback(3, (1, 0x87))) == b"\x90\x04\x00\x03\x01\x80"
    assert codec.encode(Disconnect(RC.PROTOCOL_ERROR)) == b""
    assert codec.encode(Pingresp()) == b"\xd0\x00"


def test_v5_short_forms() -> None:
    codec = server(5)
    assert codec.encode(Puback(1)) == b"\x40\x02\x00\x01"
    assert codec.encode(Puback(1, RC.NO_MATCHING_SUBSCRIBERS)) == b"\x40\x03\x00\x01\x10"
    assert codec.encode(Disconnect()) == b"\xe0\x00"
    assert codec.encode(Disconnect(RC.MALFORMED_PACKET)) == b"\xe0\x01\x81"
    assert codec.encode(Connack(False, 0)) == b"\x20\x03\x00\x00\x00"
    # Short forms decode (ack without reason code, reason without properties).
    assert codec.receive_data(b"\x40\x02\x00\x05\x50\x03\x00\x06\x10\xe0\x00") == [
        Puback(5),
        Pubrec(6, RC.NO_MATCHING_SUBSCRIBERS),
        Disconnect(),
    ]


def test_large_publish_uses_multibyte_remaining_length() -> None:
    codec = server(5)
    packet = Publish("big", b"\xaa" * 2_000_000, 1, False, False, 1)
    data = encode_packet(packet, 5)
    assert data[1] & 0x80
    assert data[2] & 0x80
    assert not data[3] & 0x80
    assert codec.receive_data(data) == [packet]


# ------------------------------------------------------------------------------------------ framing


def _stream(version: int) -> tuple[bytes, list[Packet]]:
    connect = Connect(version, "dev", keep_alive=5)
    packets: list[Packet] = [connect, *(CLIENT_PACKETS_V5 if version == 5 else CLIENT_PACKETS_V311)]
    packets = [p for p in packets if not (isinstance(p, Publish) and p.properties.topic_alias)]
    return b"".join(encode_packet(p, version) for p in packets), packets


@pytest.mark.parametrize("version", [4, 5])
def test_byte_by_byte_equals_whole(version: int) -> None:
    data, packets = _stream(version)
    whole = MqttServerCodec().receive_data(data)
    assert whole == packets
    codec = MqttServerCodec()
    got: list[Packet | ProtocolViolation] = []
    for i in range(len(data)):
        got.extend(codec.receive_data(data[i : i + 1]))
    assert got == packets
    assert codec.buffered == 0


@pytest.mark.parametrize("chunk", [2, 3, 7, 64, 1000])
def test_arbitrary_chunking(chunk: int) -> None:
    data, packets = _stream(5)
    codec = MqttServerCodec()
    got: list[Packet | ProtocolViolation] = []
    for i in range(0, len(data), chunk):
        got.extend(codec.receive_data(bytearray(data[i : i + chunk])))
    assert got == packets


def test_many_packets_in_one_read_and_a_partial_tail() -> None:
    codec = server(5)
    pub = encode_packet(Publish("t", b"x", 1, False, False, 1), 5)
    out = codec.receive_data(pub * 100 + pub[:3])
    assert len(out) == 100
    assert codec.buffered == 3
    assert codec.receive_data(pub[3:]) == [Publish("t", b"x", 1, False, False, 1)]
    assert codec.buffered == 0


def test_memoryview_input() -> None:
    codec = server(5)
    data = encode_packet(Publish("t", b"x"), 5)
    assert codec.receive_data(memoryview(data)) == [Publish("t", b"x")]


# ------------------------------------------------------------------------------------------ CONNECT checks

CONNECT_V5_HEAD = s("MQTT") + b"\x05"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # First packet must be CONNECT.
        (encode_packet(Publish("t", b"x"), 5), RC.PROTOCOL_ERROR),
        (b"\xc0\x00", RC.PROTOCOL_ERROR),
        # Unsupported levels and names.
        (frame(0x10, s("MQIsdp") + b"\x03\x02\x00\x3c" + s("c")), RC.UNSUPPORTED_PROTOCOL_VERSION),
        (frame(0x10, s("MQTT") + b"\x03\x02\x00\x3c" + s("c")), RC.UNSUPPORTED_PROTOCOL_VERSION),
        (frame(0x10, s("MQTT") + b"\x06\x02\x00\x3c\x00" + s("c")), RC.UNSUPPORTED_PROTOCOL_VERSION),
        (frame(0x10, s("hj") + b"\x05\x02\x00\x3c\x00" + s("c")), RC.PROTOCOL_ERROR),
        # Reserved fixed header flags, reserved connect flag.
        (frame(0x11, CONNECT_V5_HEAD + b"\x02\x00\x3c\x00" + s("c")), RC.MALFORMED_PACKET),
        (frame(0x10, CONNECT_V5_HEAD + b"\x03\x00\x3c\x00" + s("c")), RC.MALFORMED_PACKET),
        # Will QoS 3; will QoS / retain without the will flag.
        (
            frame(0x10, CONNECT_V5_HEAD + b"\x1e\x00\x3c\x00" + s("c") + b"\x00" + s("w") + s("p")),
            RC.MALFORMED_PACKET,
        ),
        (frame(0x10, CONNECT_V5_HEAD + b"\x0a\x00\x3c\x00" + s("c")), RC.MALFORMED_PACKET),
        (frame(0x10, CONNECT_V5_HEAD + b"\x22\x00\x3c\x00" + s("c")), RC.MALFORMED_PACKET),
        # Truncated, trailing bytes.
        (frame(0x10, CONNECT_V5_HEAD + b"\x02\x00"), RC.MALFORMED_PACKET),
        (frame(0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x00" + s("c") + b"\x00"), RC.MALFORMED_PACKET),
        # Client id not UTF-8 / with U+0000 / with an encoded surrogate.
        (frame(0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x00" + s(b"\xff")), RC.MALFORMED_PACKET),
        (frame(0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x00" + s(b"a\x00b")), RC.MALFORMED_PACKET),
        (frame(0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x00" + s(b"\xed\xa0\x80")), RC.MALFORMED_PACKET),
        (frame(0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x00" + s(b"\xc0\x80")), RC.MALFORMED_PACKET),
        # Properties: receive maximum 0, maximum packet size 0, duplicate, not allowed in CONNECT, unknown id.
        (frame(0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x03\x21\x00\x00" + s("c")), RC.PROTOCOL_ERROR),
        (frame(0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x05\x27\x00\x00\x00\x00" + s("c")), RC.PROTOCOL_ERROR),
        (
            frame(
                0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x0a\x11\x00\x00\x00\x01\x11\x00\x00\x00\x02" + s("c")
            ),
            RC.PROTOCOL_ERROR,
        ),
        (frame(0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x03\x23\x00\x01" + s("c")), RC.MALFORMED_PACKET),
        (frame(0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x02\x7f\x00" + s("c")), RC.MALFORMED_PACKET),
        (frame(0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x02\x17\x02" + s("c")), RC.PROTOCOL_ERROR),
        (frame(0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x02\x19\x05" + s("c")), RC.PROTOCOL_ERROR),
        (frame(0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x04\x16\x00\x01\x00" + s("c")), RC.PROTOCOL_ERROR),
        # Property length overrunning the packet.
        (frame(0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x40" + s("c")), RC.MALFORMED_PACKET),
        # Will topic with a wildcard / empty; will property not allowed there; will payload not UTF-8, PFI 1.
        (
            frame(0x10, CONNECT_V5_HEAD + b"\x06\x00\x3c\x00" + s("c") + b"\x00" + s("w/#") + s("p")),
            RC.TOPIC_NAME_INVALID,
        ),
        (
            frame(0x10, CONNECT_V5_HEAD + b"\x06\x00\x3c\x00" + s("c") + b"\x00" + s("") + s("p")),
            RC.TOPIC_NAME_INVALID,
        ),
        (
            frame(
                0x10, CONNECT_V5_HEAD + b"\x06\x00\x3c\x00" + s("c") + b"\x03\x21\x00\x01" + s("w") + s("p")
            ),
            RC.MALFORMED_PACKET,
        ),
        (
            frame(
                0x10, CONNECT_V5_HEAD + b"\x06\x00\x3c\x00" + s("c") + b"\x02\x01\x01" + s("w") + s(b"\xff")
            ),
            RC.PAYLOAD_FORMAT_INVALID,
        ),
        # Will properties: response topic with a wildcard.
        (
            frame(
                0x10,
                CONNECT_V5_HEAD + b"\x06\x00\x3c\x00" + s("c") + b"\x06\x08" + s("r/+") + s("w") + s("p"),
            ),
            RC.PROTOCOL_ERROR,
        ),
    ],
)
def test_connect_rejections_v5(data: bytes, reason: int) -> None:
    codec = MqttServerCodec()
    v = violation(codec, data)
    assert v.reason_code == reason, v
    assert not codec.connect_received


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (s("MQTT") + b"\x04\x42\x00\x3c" + s("c") + s("pw"), RC.MALFORMED_PACKET),  # password without user
        (
            s("MQTT") + b"\x04\x00\x00\x3c" + s(""),
            RC.CLIENT_IDENTIFIER_NOT_VALID,
        ),  # empty id, no clean session
        (s("MQTT") + b"\x04\x02\x00\x3c" + s("c") + b"\x00", RC.MALFORMED_PACKET),  # trailing byte
    ],
)
def test_connect_rejections_v311(body: bytes, reason: int) -> None:
    codec = MqttServerCodec()
    v = violation(codec, frame(0x10, body))
    assert v.reason_code == reason
    assert v.packet_type == PacketType.CONNECT


def test_v311_empty_client_id_with_clean_session_is_accepted() -> None:
    codec = MqttServerCodec()
    assert codec.receive_data(encode_packet(Connect(4, "", True), 4)) == [Connect(4, "", True)]


def test_second_connect_is_a_protocol_error() -> None:
    codec = server(5)
    assert violation(codec, encode_packet(Connect(5, "again"), 5)).reason_code == RC.PROTOCOL_ERROR


# ------------------------------------------------------------------------------------------ other packets


def pub_v5(topic: bytes, rest: bytes, first: int = 0x30) -> bytes:
    return frame(first, s(topic) + rest)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # PUBLISH: QoS 3, DUP on QoS 0, packet id 0, wildcards, empty topic without alias, bad UTF-8.
        (pub_v5(b"t", b"\x00\x01\x00", 0x36), RC.MALFORMED_PACKET),
        (pub_v5(b"t", b"\x00", 0x38), RC.PROTOCOL_ERROR),
        (pub_v5(b"t", b"\x00\x00\x00", 0x32), RC.PROTOCOL_ERROR),
        (pub_v5(b"a/+", b"\x00"), RC.TOPIC_NAME_INVALID),
        (pub_v5(b"a/#", b"\x00"), RC.TOPIC_NAME_INVALID),
        (pub_v5(b"", b"\x00"), RC.PROTOCOL_ERROR),
        (pub_v5(b"\xfe", b"\x00"), RC.MALFORMED_PACKET),
        (pub_v5(b"a\x00", b"\x00"), RC.MALFORMED_PACKET),
        # PUBLISH properties: topic alias 0 / above the maximum (none announced -> 0), subscription identifier
        # from a client, duplicate content type, property not allowed, PFI 2, PFI 1 with a non-UTF-8 payload,
        # response topic with a wildcard, truncated property.
        (pub_v5(b"t", b"\x03\x23\x00\x00"), RC.TOPIC_ALIAS_INVALID),
        (pub_v5(b"t", b"\x03\x23\x00\x01"), RC.TOPIC_ALIAS_INVALID),
        (pub_v5(b"t", b"\x02\x0b\x01"), RC.PROTOCOL_ERROR),
        (pub_v5(b"t", b"\x08\x03" + s("a") + b"\x03" + s("b")), RC.PROTOCOL_ERROR),
        (pub_v5(b"t", b"\x05\x11\x00\x00\x00\x01"), RC.MALFORMED_PACKET),
        (pub_v5(b"t", b"\x02\x01\x02"), RC.PROTOCOL_ERROR),
        (pub_v5(b"t", b"\x02\x01\x01\xc3\x28"), RC.PAYLOAD_FORMAT_INVALID),
        (pub_v5(b"t", b"\x06\x08" + s("r/#")), RC.PROTOCOL_ERROR),
        (pub_v5(b"t", b"\x02\x02\x00"), RC.MALFORMED_PACKET),
        (pub_v5(b"t", b"\x03\x26\x00\x01"), RC.MALFORMED_PACKET),
        # Acks: reserved flags, packet id 0, invalid reason codes, truncated, trailing bytes after properties.
        (b"\x41\x02\x00\x01", RC.MALFORMED_PACKET),
        (b"\x60\x02\x00\x01", RC.MALFORMED_PACKET),
        (b"\x40\x02\x00\x00", RC.PROTOCOL_ERROR),
        (b"\x40\x03\x00\x01\x92", RC.PROTOCOL_ERROR),
        (b"\x62\x03\x00\x01\x10", RC.PROTOCOL_ERROR),
        (b"\x40\x01\x00", RC.MALFORMED_PACKET),
        (b"\x40\x05\x00\x01\x00\x00\x00", RC.MALFORMED_PACKET),
        # SUBSCRIBE: flags, no filters, bad filters, QoS 3, reserved option bits, retain handling 3, no local
        # on a shared subscription, two subscription identifiers, subscription identifier 0, missing options.
        (frame(0x80, b"\x00\x01\x00" + s("a") + b"\x00"), RC.MALFORMED_PACKET),
        (frame(0x82, b"\x00\x01\x00"), RC.PROTOCOL_ERROR),
        (frame(0x82, b"\x00\x01\x00" + s("a/#/b") + b"\x00"), RC.MALFORMED_PACKET),
        (frame(0x82, b"\x00\x01\x00" + s("a#") + b"\x00"), RC.MALFORMED_PACKET),
        (frame(0x82, b"\x00\x01\x00" + s("a/b+") + b"\x00"), RC.MALFORMED_PACKET),
        (frame(0x82, b"\x00\x01\x00" + s("") + b"\x00"), RC.MALFORMED_PACKET),
        (frame(0x82, b"\x00\x01\x00" + s("$share/g") + b"\x00"), RC.MALFORMED_PACKET),
        (frame(0x82, b"\x00\x01\x00" + s("$share//a") + b"\x00"), RC.MALFORMED_PACKET),
        (frame(0x82, b"\x00\x01\x00" + s("$share/g+/a") + b"\x00"), RC.MALFORMED_PACKET),
        (frame(0x82, b"\x00\x01\x00" + s("a") + b"\x03"), RC.MALFORMED_PACKET),
        (frame(0x82, b"\x00\x01\x00" + s("a") + b"\x40"), RC.MALFORMED_PACKET),
        (frame(0x82, b"\x00\x01\x00" + s("a") + b"\x30"), RC.PROTOCOL_ERROR),
        (frame(0x82, b"\x00\x01\x00" + s("$share/g/a") + b"\x04"), RC.PROTOCOL_ERROR),
        (frame(0x82, b"\x00\x01\x04\x0b\x01\x0b\x02" + s("a") + b"\x00"), RC.PROTOCOL_ERROR),
        (frame(0x82, b"\x00\x01\x02\x0b\x00" + s("a") + b"\x00"), RC.PROTOCOL_ERROR),
        (frame(0x82, b"\x00\x01\x00" + s("a")), RC.MALFORMED_PACKET),
        (frame(0x82, b"\x00\x00\x00" + s("a") + b"\x00"), RC.PROTOCOL_ERROR),
        # UNSUBSCRIBE: flags, no filters, bad filter.
        (frame(0xA0, b"\x00\x01\x00" + s("a")), RC.MALFORMED_PACKET),
        (frame(0xA2, b"\x00\x01\x00"), RC.PROTOCOL_ERROR),
        (frame(0xA2, b"\x00\x01\x00" + s("a/#/")), RC.MALFORMED_PACKET),
        # PINGREQ with a body / flags; DISCONNECT with flags, invalid reason, session expiry after 0.
        (b"\xc0\x01\x00", RC.MALFORMED_PACKET),
        (b"\xc1\x00", RC.MALFORMED_PACKET),
        (b"\xe1\x00", RC.MALFORMED_PACKET),
        (b"\xe0\x01\x10", RC.PROTOCOL_ERROR),
        (b"\xe0\x07\x00\x05\x11\x00\x00\x00\x0a", RC.PROTOCOL_ERROR),
        # AUTH without an authentication method in CONNECT.
        (b"\xf0\x00", RC.PROTOCOL_ERROR),
        # Packets only a server sends; reserved type 0.
        (b"\x20\x02\x00\x00", RC.PROTOCOL_ERROR),
        (b"\x90\x03\x00\x01\x00", RC.PROTOCOL_ERROR),
        (b"\xb0\x02\x00\x01", RC.PROTOCOL_ERROR),
        (b"\xd0\x00", RC.PROTOCOL_ERROR),
        (b"\x00\x00", RC.MALFORMED_PACKET),
        # A fifth remaining-length byte; remaining length / property VBI not in the shortest form.
        (b"\x30\xff\xff\xff\xff\x01", RC.MALFORMED_PACKET),
        (b"\xc0\x80\x00", RC.MALFORMED_PACKET),
        (pub_v5(b"t", b"\x80\x00"), RC.MALFORMED_PACKET),
        (frame(0x82, b"\x00\x01\x03\x0b\x81\x00" + s("a") + b"\x00"), RC.MALFORMED_PACKET),
    ],
)
def test_rejections_v5(data: bytes, reason: int) -> None:
    codec = server(5)
    v = violation(codec, data)
    assert v.reason_code == reason, v
    assert v.packet_type == data[0] >> 4


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (frame(0x30, s("a/+") + b"x"), RC.TOPIC_NAME_INVALID),
        (frame(0x30, s("") + b"x"), RC.PROTOCOL_ERROR),
        (frame(0x36, s("t") + b"\x00\x01x"), RC.MALFORMED_PACKET),
        (
            frame(0x82, b"\x00\x01" + s("a") + b"\x04"),
            RC.MALFORMED_PACKET,
        ),  # no-local bit is reserved in 3.1.1
        (frame(0x82, b"\x00\x01"), RC.PROTOCOL_ERROR),
        (b"\x40\x03\x00\x01\x00", RC.MALFORMED_PACKET),  # no reason codes in 3.1.1
        (b"\xe0\x01\x00", RC.MALFORMED_PACKET),
        (b"\xf0\x00", RC.MALFORMED_PACKET),  # type 15 is reserved in 3.1.1
    ],
)
def test_rejections_v311(data: bytes, reason: int) -> None:
    codec = server(4)
    assert violation(codec, data).reason_code == reason


def test_nothing_is_parsed_after_a_violation() -> None:
    codec = server(5)
    good = encode_packet(Pingreq(), 5)
    out = codec.receive_data(good + b"\xc1\x00" + good)
    assert out[0] == Pingreq()
    assert isinstance(out[1], ProtocolViolation)
    assert len(out) == 2
    assert codec.receive_data(good) == []
    assert codec.violation is out[1]
    assert "failed" in repr(codec)


# ------------------------------------------------------------------------------------------ limits


def test_incoming_packet_too_large_is_detected_from_the_header() -> None:
    codec = MqttServerCodec(max_packet_size=1024)
    codec.receive_data(encode_packet(Connect(5, "c"), 5))
    ok = encode_packet(Publish("t", b"x" * (1024 - 7)), 5)
    assert len(ok) == 1024
    assert codec.receive_data(ok) == [Publish("t", b"x" * (1024 - 7))]
    # Only the fixed header of a 1025-byte packet: rejected before any body byte arrives.
    v = violation(codec, b"\x30\xfe\x07")
    assert v.reason_code == RC.PACKET_TOO_LARGE
    assert codec.buffered == 0


def test_connack_maximum_packet_size_lowers_the_incoming_limit() -> None:
    codec = server(5)
    codec.encode(Connack(properties=Properties(maximum_packet_size=100)))
    assert codec.max_packet_size == 100
    assert violation(codec, encode_packet(Publish("t", b"x" * 100), 5)).reason_code == RC.PACKET_TOO_LARGE


def test_max_packet_size_bounds() -> None:
    with pytest.raises(ValueError, match="max_packet_size"):
        MqttServerCodec(max_packet_size=1)
    with pytest.raises(ValueError, match="max_packet_size"):
        MqttServerCodec(max_packet_size=DEFAULT_MAX_PACKET_SIZE + 1)


def test_outgoing_respects_the_clients_maximum_packet_size() -> None:
    codec = server(5, maximum_packet_size=40)
    small = Publish("t", b"x" * 10)
    assert codec.encode(small) == encode_packet(small, 5)
    # A PUBLISH never loses properties: too big -> dropped.
    assert codec.encode(Publish("t", b"x" * 40)) is None
    assert (
        codec.encode(Publish("t", b"x" * 10, properties=Properties(user_properties=(("k", "v" * 30),))))
        is None
    )
    # Acks drop the reason string first, then the user properties.
    ack = Puback(1, RC.QUOTA_EXCEEDED, Properties(reason_string="r" * 30, user_properties=(("k", "v"),)))
    assert MqttClientCodec(5).receive_data(codec.encode(ack) or b"") == [
        Puback(1, RC.QUOTA_EXCEEDED, Properties(user_properties=(("k", "v"),)))
    ]
    ack2 = Puback(1, RC.QUOTA_EXCEEDED, Properties(reason_string="r", user_properties=(("k", "v" * 40),)))
    assert codec.encode(ack2) == b"\x40\x03\x00\x01\x97"
    assert codec.encode(Suback(1, (0,) * 50)) is None


def test_request_problem_information_0_strips_reason_strings() -> None:
    codec = server(5, request_problem_information=0)
    props = Properties(reason_string="why", user_properties=(("k", "v"),))
    assert codec.encode(Puback(1, RC.QUOTA_EXCEEDED, props)) == b"\x40\x03\x00\x01\x97"
    assert codec.encode(Suback(2, (0,), props)) == b"\x90\x04\x00\x02\x00\x00"
    # PUBLISH, CONNACK and DISCONNECT keep them.
    for packet in (Publish("t", b"", properties=props), Connack(False, 0, props), Disconnect(0x80, props)):
        assert codec.encode(packet) == encode_packet(packet, 5)
    # The default (absent = 1) keeps them everywhere.
    assert server(5).encode(Puback(1, 0, props)) == encode_packet(Puback(1, 0, props), 5)


# ------------------------------------------------------------------------------------------ CONNACK learning


def test_topic_alias_within_the_announced_maximum() -> None:
    codec = server(5)
    codec.encode(Connack(properties=Properties(topic_alias_maximum=2)))
    pub = Publish("a", b"", properties=Properties(topic_alias=2))
    again = Publish("", b"", properties=Properties(topic_alias=2))
    assert codec.receive_data(encode_packet(pub, 5) + encode_packet(again, 5)) == [pub, again]
    bad = encode_packet(Publish("a", b"", properties=Properties(topic_alias=3)), 5)
    assert violation(codec, bad).reason_code == RC.TOPIC_ALIAS_INVALID


def test_maximum_qos_and_retain_available() -> None:
    codec = server(5)
    codec.encode(Connack(properties=Properties(maximum_qos=1, retain_available=0)))
    assert codec.receive_data(encode_packet(Publish("a", b"", 1, packet_id=1), 5))
    assert (
        violation(codec, encode_packet(Publish("a", b"", 2, packet_id=2), 5)).reason_code
        == RC.QOS_NOT_SUPPORTED
    )
    codec = server(5)
    codec.encode(Connack(properties=Properties(retain_available=0)))
    assert (
        violation(codec, encode_packet(Publish("a", b"", retain=True), 5)).reason_code
        == RC.RETAIN_NOT_SUPPORTED
    )


def test_subscription_identifiers_not_available() -> None:
    codec = server(5)
    codec.encode(Connack(properties=Properties(subscription_identifier_available=0)))
    sub = Subscribe(1, (Subscription("a"),), Properties(subscription_identifiers=(5,)))
    assert violation(codec, encode_packet(sub, 5)).reason_code == RC.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED


def test_disconnect_session_expiry_allowed_when_connect_had_one() -> None:
    codec = server(5, session_expiry_interval=10)
    d = Disconnect(0, Properties(session_expiry_interval=100))
    assert codec.receive_data(encode_packet(d, 5)) == [d]


def test_auth_allowed_with_an_authentication_method() -> None:
    codec = server(5, authentication_method="SCRAM")
    a = Auth(RC.CONTINUE_AUTHENTICATION, Properties(authentication_method="SCRAM", authentication_data=b"x"))
    assert codec.receive_data(encode_packet(a, 5)) == [a]


# ------------------------------------------------------------------------------------------ responses


def test_violation_response_v5() -> None:
    codec = MqttServerCodec()
    v = violation(codec, frame(0x10, CONNECT_V5_HEAD + b"\x02\x00\x3c\x03\x21\x00\x00" + s("c")))
    assert codec.version == 5
    assert codec.violation_response(v, connack_sent=False) == b"\x20\x03\x00\x82\x00"
    codec = server(5)
    v = violation(codec, b"\xc1\x00")
    assert codec.violation_response(v, connack_sent=True) == b"\xe0\x01\x81"
    codec = server(5)
    v = violation(codec, encode_packet(Publish("a", b"", properties=Properties(topic_alias=1)), 5))
    # 0x94 is not a CONNACK reason code: a CONNACK carries Protocol Error instead.
    assert codec.violation_response(v, connack_sent=False) == b"\x20\x03\x00\x82\x00"


def test_violation_response_v311() -> None:
    codec = MqttServerCodec()
    v = violation(codec, frame(0x10, s("MQTT") + b"\x03\x02\x00\x3c" + s("c")))
    assert codec.violation_response(v, connack_sent=False) == b"\x20\x02\x00\x01"
    codec = MqttServerCodec()
    v = violation(codec, frame(0x10, s("MQTT") + b"\x06\x02\x00\x3c\x00" + s("c")))
    assert codec.encode(Connack(False, v.reason_code)) == b"\x20\x02\x00\x01"
    codec = MqttServerCodec()
    v = violation(codec, frame(0x10, s("MQTT") + b"\x04\x00\x00\x3c" + s("")))
    assert codec.violation_response(v, connack_sent=False) == b"\x20\x02\x00\x02"
    codec = MqttServerCodec()
    v = violation(codec, frame(0x10, s("nope") + b"\x04\x02\x00\x3c" + s("c")))
    assert codec.violation_response(v, connack_sent=False) == b""
    codec = server(4)
    v = violation(codec, b"\xc1\x00")
    assert codec.violation_response(v, connack_sent=True) == b""


# ------------------------------------------------------------------------------------------ topics


@pytest.mark.parametrize(
    ("topic_filter", "valid"),
    [
        ("#", True),
        ("+", True),
        ("a/#", True),
        ("+/+/#", True),
        ("/", True),
        ("a//b", True),
        ("$SYS/#", True),
        ("$share/g/a/+", True),
        ("$share/g/#", True),
        ("", False),
        ("a/#/b", False),
        ("a#", False),
        ("#/", False),
        ("a+/b", False),
        ("$share/g", False),
        ("$share/g/", False),
        ("$share//a", False),
        ("$share/a#/b", False),
    ],
)
def test_topic_filters(topic_filter: str, valid: bool) -> None:
    assert is_valid_topic_filter(topic_filter) is valid


def test_topic_names() -> None:
    assert is_valid_topic_name("a/b")
    assert is_valid_topic_name("/")
    assert not is_valid_topic_name("")
    assert not is_valid_topic_name("a/+")
    assert not is_valid_topic_name("#")


def test_repr() -> None:
    codec = MqttServerCodec()
    assert repr(codec) == "MqttServerCodec(v4 awaiting-connect buffered=0)"
    codec.receive_data(encode_packet(Connect(5, "c"), 5) + b"\x30")
    assert repr(codec) == "MqttServerCodec(v5 connected buffered=1)"
    assert repr(MqttClientCodec(4)) == "MqttClientCodec(v4 ok buffered=0)"
