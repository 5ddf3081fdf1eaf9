"""PUBLISH -> request mapping, the gRPC envelope (checked against protobuf itself), and ack reason codes."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from microenvoy.bridging.mqtt import BridgeContext, ack_reason, envelope, request_for
from microenvoy.codecs import grpc as grpc_codec
from microenvoy.codecs.mqtt.packets import Properties, Publish
from microenvoy.router.topic_routes import compile_path_template, compile_topic_filter

CTX = BridgeContext(authority=b"mqtt", client_id="dev-1", principal="alice", tls=False, protocol_level=5)


def test_http_request_for_a_publish() -> None:
    f = compile_topic_filter("devices/{device}/telemetry")
    pub = Publish(
        "devices/d 1/telemetry",
        b'{"t":1}',
        qos=1,
        packet_id=7,
        properties=Properties(
            content_type="application/json",
            response_topic="replies/d1",
            user_properties=(("Site", "lab"), ("bad name", "x"), ("ctl", "a\nb")),
        ),
    )
    caps = f.match(pub.topic)
    assert caps is not None
    headers, body = request_for(
        pub,
        route_index=3,
        path_pieces=compile_path_template("/v1/{device}", f.names),
        grpc_method=None,
        grpc_envelope=False,
        default_content_type="application/octet-stream",
        captures=caps,
        ctx=CTX,
    )
    assert body == b'{"t":1}'
    assert headers.get(b":path") == b"/v1/d%201"
    assert headers.get(b":scheme") == b"mqtt"
    assert headers.get(b"content-type") == b"application/json"
    assert headers.get(b"x-microenvoy-mqtt-route") == b"3"
    assert headers.get(b"x-microenvoy-mqtt-qos") == b"1"
    assert headers.get(b"x-microenvoy-mqtt-client-id") == b"dev-1"
    assert headers.get(b"x-microenvoy-mqtt-response-topic") == b"replies/d1"
    assert headers.get(b"x-microenvoy-mqtt-prop-site") == b"lab"
    assert b"x-microenvoy-mqtt-prop-bad name" not in headers
    assert b"x-microenvoy-mqtt-prop-ctl" not in headers


def _message_class() -> type:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="bridge_test.proto", package="microenvoy.bridge.v1", syntax="proto3"
    )
    m = fdp.message_type.add(name="Message")
    t = descriptor_pb2.FieldDescriptorProto
    scalars = (
        ("topic", 1, t.TYPE_STRING),
        ("payload", 2, t.TYPE_BYTES),
        ("qos", 3, t.TYPE_UINT32),
        ("client_id", 4, t.TYPE_STRING),
        ("content_type", 5, t.TYPE_STRING),
        ("retain", 7, t.TYPE_BOOL),
    )
    for name, number, kind in scalars:
        m.field.add(name=name, number=number, type=kind, label=t.LABEL_OPTIONAL)
    entry = m.nested_type.add(name="PropertiesEntry")
    entry.field.add(name="key", number=1, type=t.TYPE_STRING, label=t.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=t.TYPE_STRING, label=t.LABEL_OPTIONAL)
    entry.options.map_entry = True
    m.field.add(name="properties", number=6, type=t.TYPE_MESSAGE, label=t.LABEL_REPEATED,
                type_name=".microenvoy.bridge.v1.Message.PropertiesEntry")  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("microenvoy.bridge.v1.Message"))


def test_envelope_is_a_valid_protobuf_message() -> None:
    pub = Publish(
        "a/b",
        b"\x00\x01",
        qos=2,
        retain=True,
        packet_id=1,
        properties=Properties(content_type="x/y", user_properties=(("k", "v"), ("k", "w"), ("z", ""))),
    )
    msg = _message_class().FromString(envelope(pub, "c1"))
    assert (msg.topic, msg.payload, msg.qos, msg.client_id, msg.content_type, msg.retain) == (
        "a/b", b"\x00\x01", 2, "c1", "x/y", True,
    )  # fmt: skip
    assert dict(msg.properties) == {"k": "v", "z": ""}
    empty = _message_class().FromString(envelope(Publish("t", b""), ""))
    assert (empty.topic, empty.qos, empty.retain) == ("t", 0, False)


def test_grpc_request_is_framed() -> None:
    headers, body = request_for(
        Publish("t", b"\x08\x01"),
        route_index=0,
        path_pieces=None,
        grpc_method="/iot.v1.Ingest/Publish",
        grpc_envelope=False,
        default_content_type="",
        captures={},
        ctx=CTX,
    )
    assert headers.get(b":path") == b"/iot.v1.Ingest/Publish"
    assert headers.get(b"content-type") == b"application/grpc"
    assert headers.get(b"te") == b"trailers"
    assert grpc_codec.decode_grpc_message(body) == b"\x08\x01"


@pytest.mark.parametrize(
    ("status", "grpc", "reason"),
    [
        (200, None, 0x00), (204, None, 0x00), (401, None, 0x87), (403, None, 0x87), (400, None, 0x99),
        (415, None, 0x99), (422, None, 0x99), (429, None, 0x97), (404, None, 0x90), (500, None, 0x80),
        (503, None, 0x80), (504, None, 0x80), (0, None, 0x80), (302, None, 0x80),
        (200, 0, 0x00), (200, 7, 0x87), (200, 3, 0x99), (200, 8, 0x97), (200, 12, 0x90), (200, 14, 0x80),
    ],
)  # fmt: skip
def test_ack_reasons(status: int, grpc: int | None, reason: int) -> None:
    assert ack_reason(status, grpc) == reason
