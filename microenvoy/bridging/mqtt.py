"""MQTT PUBLISH <-> exchange mapping (sans-IO), as ``docs/mqtt.md`` and PROTOCOLS.md describe it.

``request_for`` turns a PUBLISH that matched a bridge route into request headers and a body for the HTTP
engine; ``ack_reason`` turns the outcome into the MQTT 5 reason code of the PUBACK/PUBREC (``0x00`` only for
a 2xx answer, or gRPC status OK). ``envelope`` encodes the documented ``microenvoy.bridge.v1.Message``.

Metadata headers (``x-microenvoy-mqtt-*``) are visible to HTTP filters, hash policies and access logs; like
every ``x-microenvoy-`` header they are not sent upstream unless a route copies them
(``request_headers_to_add`` with ``%REQ(x-microenvoy-mqtt-client-id)%``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from microenvoy.codecs import grpc as grpc_codec
from microenvoy.codecs.mqtt.packets import Properties, Publish, ReasonCode
from microenvoy.core.headers import Headers
from microenvoy.router.topic_routes import fill_path

__all__ = [
    "BridgeContext",
    "ack_reason",
    "envelope",
    "envelope_batch",
    "grpc_status_reason",
    "request_for",
]

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
_PROP_PREFIX = b"x-microenvoy-mqtt-prop-"
_MAX_USER_PROPERTY_HEADERS = 32


@dataclass(frozen=True, slots=True)
class BridgeContext:
    """Facts about the client a message came from (fixed per connection)."""

    authority: bytes
    client_id: str
    principal: str
    tls: bool
    protocol_level: int


def request_for(
    publish: Publish,
    *,
    route_index: int,
    path_pieces: Sequence[tuple[str, str | None]] | None,
    grpc_method: str | None,
    grpc_envelope: bool,
    default_content_type: str,
    captures: dict[str, str],
    ctx: BridgeContext,
) -> tuple[Headers, bytes]:
    """Request headers and body for a bridged PUBLISH (``path_pieces`` for HTTP, ``grpc_method`` for gRPC)."""
    props = publish.properties
    if grpc_method is not None:
        path = grpc_method.encode()
        content_type = b"application/grpc"
        message = envelope(publish, ctx.client_id) if grpc_envelope else publish.payload
        body = grpc_codec.encode_message(message)
    else:
        assert path_pieces is not None
        path = fill_path(path_pieces, publish.topic, captures).encode()
        content_type = (props.content_type or default_content_type).encode("utf-8", "replace")
        body = publish.payload
    fields: list[tuple[bytes, bytes]] = [
        (b":method", b"POST"),
        (b":scheme", b"mqtts" if ctx.tls else b"mqtt"),
        (b":authority", ctx.authority),
        (b":path", path),
        (b"content-type", content_type),
    ]
    if grpc_method is not None:
        fields.append((b"te", b"trailers"))
    fields += [
        (b"x-microenvoy-mqtt-route", str(route_index).encode()),
        (b"x-microenvoy-mqtt-topic", publish.topic.encode()),
        (b"x-microenvoy-mqtt-qos", b"%d" % publish.qos),
        (b"x-microenvoy-mqtt-retain", b"1" if publish.retain else b"0"),
        (b"x-microenvoy-mqtt-client-id", ctx.client_id.encode()),
        (b"x-microenvoy-mqtt-principal", ctx.principal.encode()),
        (b"x-microenvoy-mqtt-version", b"5" if ctx.protocol_level == 5 else b"3.1.1"),
    ]
    if props.response_topic is not None:
        fields.append((b"x-microenvoy-mqtt-response-topic", props.response_topic.encode()))
    fields += _user_property_headers(props)
    return Headers(fields), body


def _user_property_headers(props: Properties) -> list[tuple[bytes, bytes]]:
    """User properties as ``x-microenvoy-mqtt-prop-<name>``; names that are not HTTP tokens are skipped,
    values with control characters too (a header cannot carry them)."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in props.user_properties[:_MAX_USER_PROPERTY_HEADERS]:
        key = name.lower().encode("utf-8", "replace")
        raw = value.encode("utf-8")
        if not _TOKEN.match(key) or any((b < 0x20 and b != 0x09) or b == 0x7F for b in raw):
            continue
        out.append((_PROP_PREFIX + key, raw))
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes | int) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        assert isinstance(payload, int)
        return key + _varint(payload)
    assert isinstance(payload, bytes)
    return key + _varint(len(payload)) + payload


def envelope_batch(messages: Sequence[tuple[Publish, str]]) -> bytes:
    """``microenvoy.bridge.v1.Batch {repeated Message messages = 1;}`` of (publish, client id) pairs."""
    return b"".join(_field(1, 2, envelope(p, client_id)) for p, client_id in messages)


def envelope(publish: Publish, client_id: str) -> bytes:
    """``microenvoy.bridge.v1.Message`` (protobuf wire format; see ``microenvoy/proto``)::

    string topic = 1; bytes payload = 2; uint32 qos = 3; string client_id = 4;
    string content_type = 5; map<string, string> properties = 6; bool retain = 7;
    """
    props = publish.properties
    out = bytearray(_field(1, 2, publish.topic.encode()))
    if publish.payload:
        out += _field(2, 2, publish.payload)
    if publish.qos:
        out += _field(3, 0, publish.qos)
    if client_id:
        out += _field(4, 2, client_id.encode())
    if props.content_type:
        out += _field(5, 2, props.content_type.encode())
    seen: set[str] = set()
    for name, value in props.user_properties:  # a map: the first value of a repeated name wins
        if name in seen:
            continue
        seen.add(name)
        entry = _field(1, 2, name.encode()) + _field(2, 2, value.encode())
        out += _field(6, 2, entry)
    if publish.retain:
        out += _field(7, 0, 1)
    return bytes(out)


_STATUS_REASONS = {
    401: ReasonCode.NOT_AUTHORIZED,
    403: ReasonCode.NOT_AUTHORIZED,
    400: ReasonCode.PAYLOAD_FORMAT_INVALID,
    415: ReasonCode.PAYLOAD_FORMAT_INVALID,
    422: ReasonCode.PAYLOAD_FORMAT_INVALID,
    429: ReasonCode.QUOTA_EXCEEDED,
    404: ReasonCode.TOPIC_NAME_INVALID,
}
_GRPC_REASONS = {
    grpc_codec.UNAUTHENTICATED: ReasonCode.NOT_AUTHORIZED,
    grpc_codec.PERMISSION_DENIED: ReasonCode.NOT_AUTHORIZED,
    grpc_codec.INVALID_ARGUMENT: ReasonCode.PAYLOAD_FORMAT_INVALID,
    grpc_codec.RESOURCE_EXHAUSTED: ReasonCode.QUOTA_EXCEEDED,
    grpc_codec.NOT_FOUND: ReasonCode.TOPIC_NAME_INVALID,
    grpc_codec.UNIMPLEMENTED: ReasonCode.TOPIC_NAME_INVALID,
}


def grpc_status_reason(grpc_status: int) -> int:
    """The PUBACK reason for a gRPC status (0 OK -> success)."""
    if grpc_status == grpc_codec.OK:
        return ReasonCode.SUCCESS
    return int(_GRPC_REASONS.get(grpc_status, ReasonCode.UNSPECIFIED_ERROR))


def ack_reason(status: int, grpc_status: int | None = None) -> int:
    """The PUBACK/PUBREC reason code for an upstream outcome: ``status`` 0 means no answer (reset, timeout
    before any response, response too large). Only 2xx (and gRPC OK) is success."""
    if grpc_status is not None and 200 <= status < 300:
        return grpc_status_reason(grpc_status)
    if 200 <= status < 300:
        return ReasonCode.SUCCESS
    return int(_STATUS_REASONS.get(status, ReasonCode.UNSPECIFIED_ERROR))
