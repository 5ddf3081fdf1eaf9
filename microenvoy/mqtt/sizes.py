"""Sizes of PUBLISH packets: the encoded size (for the client's Maximum Packet Size) and the bytes a held
message costs (for queue and retained-store bounds). Sans-IO, no encoding is done."""

from __future__ import annotations

from microenvoy.codecs.mqtt.packets import PROTOCOL_LEVEL_V5, Properties, Publish

__all__ = ["message_size", "properties_size", "publish_wire_size", "varint_size"]

_HELD_OVERHEAD = 96
"""Approximate Python object overhead of one held message (dataclass, bytes and str headers)."""


def varint_size(n: int) -> int:
    """Bytes of MQTT's Variable Byte Integer encoding of ``n`` (0..268,435,455)."""
    if n < 128:
        return 1
    if n < 16384:
        return 2
    if n < 2097152:
        return 3
    return 4


def _utf8(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


def properties_size(p: Properties) -> int:
    """Encoded length of the PUBLISH properties in ``p`` (without the leading property-length integer)."""
    n = 0
    if p.payload_format_indicator is not None:
        n += 2
    if p.message_expiry_interval is not None:
        n += 5
    if p.content_type is not None:
        n += 3 + _utf8(p.content_type)
    if p.response_topic is not None:
        n += 3 + _utf8(p.response_topic)
    if p.correlation_data is not None:
        n += 3 + len(p.correlation_data)
    for sid in p.subscription_identifiers:
        n += 1 + varint_size(sid)
    if p.topic_alias is not None:
        n += 3
    for k, v in p.user_properties:
        n += 5 + _utf8(k) + _utf8(v)
    return n


def publish_wire_size(publish: Publish, protocol_level: int) -> int:
    """The encoded size of ``publish`` in bytes (fixed header included) at ``protocol_level``."""
    remaining = 2 + _utf8(publish.topic) + len(publish.payload)
    if publish.qos:
        remaining += 2
    if protocol_level >= PROTOCOL_LEVEL_V5:
        plen = properties_size(publish.properties)
        remaining += varint_size(plen) + plen
    return 1 + varint_size(remaining) + remaining


def message_size(publish: Publish) -> int:
    """Bytes one held copy of ``publish`` is accounted for in queue and retained-store bounds."""
    return _HELD_OVERHEAD + publish_wire_size(publish, PROTOCOL_LEVEL_V5)
