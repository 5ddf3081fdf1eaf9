"""The MQTT packet model: reason code values, v3.1.1 CONNACK mapping, frozen packets."""

from __future__ import annotations

import dataclasses

import pytest

from microenvoy.codecs.mqtt.packets import (
    EMPTY_PROPERTIES,
    ConnackReturnCode,
    Properties,
    Publish,
    ReasonCode,
    connack_code_v311,
)


def test_reason_code_values_match_the_spec() -> None:
    assert ReasonCode.SUCCESS == 0x00
    assert ReasonCode.DISCONNECT_WITH_WILL_MESSAGE == 0x04
    assert ReasonCode.NO_MATCHING_SUBSCRIBERS == 0x10
    assert ReasonCode.NO_SUBSCRIPTION_EXISTED == 0x11
    assert ReasonCode.CONTINUE_AUTHENTICATION == 0x18
    assert ReasonCode.UNSPECIFIED_ERROR == 0x80
    assert ReasonCode.MALFORMED_PACKET == 0x81
    assert ReasonCode.PROTOCOL_ERROR == 0x82
    assert ReasonCode.BANNED == 0x8A
    assert ReasonCode.TOPIC_NAME_INVALID == 0x90
    assert ReasonCode.PACKET_TOO_LARGE == 0x95
    assert ReasonCode.PAYLOAD_FORMAT_INVALID == 0x99
    assert ReasonCode.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED == 0xA2


@pytest.mark.parametrize(
    ("v5", "v311"),
    [
        (ReasonCode.SUCCESS, ConnackReturnCode.ACCEPTED),
        (ReasonCode.UNSUPPORTED_PROTOCOL_VERSION, ConnackReturnCode.UNACCEPTABLE_PROTOCOL_VERSION),
        (ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, ConnackReturnCode.IDENTIFIER_REJECTED),
        (ReasonCode.SERVER_UNAVAILABLE, ConnackReturnCode.SERVER_UNAVAILABLE),
        (ReasonCode.SERVER_BUSY, ConnackReturnCode.SERVER_UNAVAILABLE),
        (ReasonCode.BAD_USER_NAME_OR_PASSWORD, ConnackReturnCode.BAD_USER_NAME_OR_PASSWORD),
        (ReasonCode.NOT_AUTHORIZED, ConnackReturnCode.NOT_AUTHORIZED),
        (ReasonCode.BANNED, ConnackReturnCode.NOT_AUTHORIZED),
        (ReasonCode.UNSPECIFIED_ERROR, ConnackReturnCode.SERVER_UNAVAILABLE),
        (ReasonCode.MALFORMED_PACKET, ConnackReturnCode.SERVER_UNAVAILABLE),
    ],
)
def test_connack_code_v311(v5: int, v311: int) -> None:
    assert connack_code_v311(v5) == v311


def test_packets_are_frozen_and_default_to_empty_properties() -> None:
    p = Publish("a/b", b"x")
    assert p.properties is EMPTY_PROPERTIES
    assert p.packet_id is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.topic = "c"  # type: ignore[misc]
    assert Properties() == EMPTY_PROPERTIES
    assert EMPTY_PROPERTIES.user_properties == ()
    assert EMPTY_PROPERTIES.subscription_identifiers == ()
