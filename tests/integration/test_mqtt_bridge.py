"""The MQTT bridge (io/mqtt_bridge.MqttBridge) against a real h2 upstream: route match, path template,
ack reason codes from real answers, expiry, metadata headers for filters only."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import pytest
from peers.h2_server import H2Server

from microenvoy.admin.stats import Store
from microenvoy.bridging.mqtt import BridgeContext
from microenvoy.codecs.mqtt.packets import Properties, Publish
from microenvoy.config.model import Cluster, Endpoint, RouteAction, SocketAddress
from microenvoy.core.exchange import DownstreamInfo
from microenvoy.filters.network.mqtt_proxy import Batching, GrpcBridge, MqttProxy, MqttRoute
from microenvoy.io.mqtt_bridge import MqttBridge
from microenvoy.io.upstream import ClusterManager

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

DOWN = DownstreamInfo("MQTT/5", ("127.0.0.1", 40000), ("127.0.0.1", 1883), "mqtt")
CTX = BridgeContext(authority=b"mqtt", client_id="dev-1", principal="", tls=False, protocol_level=5)


@pytest.fixture
async def bridge(h2_server: H2Server) -> AsyncIterator[tuple[MqttBridge, Store]]:
    routes = (
        MqttRoute("status", "status/{code}", RouteAction(cluster="up", timeout=5.0), path="/status/{code}"),
        MqttRoute("telemetry", "devices/{device}/telemetry", RouteAction(cluster="up"), path="/v1/{device}"),
        MqttRoute(
            "batched",
            "batch/{kind}/#",
            RouteAction(cluster="up"),
            path="/batch/{kind}",
            batch=Batching(max_messages=3, max_delay=0.2),
        ),
    )
    store = Store()
    cluster = Cluster(
        "up", endpoints=(Endpoint(SocketAddress("127.0.0.1", h2_server.port)),), upstream_protocol="HTTP2"
    )
    cm = ClusterManager([cluster], store)
    await cm.start()
    yield MqttBridge(MqttProxy("dev", routes=routes), clusters=cm, stats=store, listener_name="mqtt"), store
    await cm.close()


async def test_bridged_publish_reaches_the_upstream(
    bridge: tuple[MqttBridge, Store], h2_server: H2Server
) -> None:
    b, store = bridge
    pub = Publish(
        "devices/d7/telemetry", b"21.5", qos=1, packet_id=1, properties=Properties(content_type="text/plain")
    )
    out = await b.send(pub, CTX, DOWN)
    assert out is not None
    assert out.reason_code == 0
    assert out.result is not None
    echo = json.loads(out.result.body)
    assert echo["path"] == "/v1/d7"
    assert echo["body_length"] == 4
    headers = dict(echo["headers"])
    assert headers["content-type"] == "text/plain"
    assert not any(k.startswith("x-microenvoy-") for k in headers)  # metadata stays in the agent
    assert store.value("mqtt.dev.bridge_rq_2xx") == 1


@pytest.mark.parametrize(("code", "reason"), [("503", 0x80), ("404", 0x90), ("403", 0x87), ("429", 0x97)])
async def test_upstream_errors_become_negative_acks(
    bridge: tuple[MqttBridge, Store], code: str, reason: int
) -> None:
    b, store = bridge
    out = await b.send(Publish(f"status/{code}", b"x", qos=1, packet_id=2), CTX, DOWN)
    assert out is not None
    assert out.reason_code == reason
    assert store.value("mqtt.dev.bridge_negative_ack") == 1


async def test_unrouted_and_expired_messages(bridge: tuple[MqttBridge, Store], h2_server: H2Server) -> None:
    b, store = bridge
    assert await b.send(Publish("other/topic", b"x"), CTX, DOWN) is None
    before = h2_server.count("/v1/late")
    out = await b.send(Publish("devices/late/telemetry", b"x", qos=1, packet_id=3), CTX, DOWN, expires_in=0)
    assert out is not None
    assert out.reason_code == 0x80
    assert out.result is None
    assert h2_server.count("/v1/late") == before  # never sent
    assert store.value("mqtt.dev.dropped_expired") == 1


async def test_batching_sends_one_request_and_acks_every_message(
    bridge: tuple[MqttBridge, Store], h2_server: H2Server
) -> None:
    b, store = bridge
    pubs = [Publish(f"batch/full/{i}", f"m{i}".encode(), qos=1, packet_id=10 + i) for i in range(3)]
    outs = await asyncio.gather(*(b.send(p, CTX, DOWN) for p in pubs))
    assert [o.reason_code for o in outs if o is not None] == [0, 0, 0]
    assert h2_server.count("/batch/full") == 1  # three messages, one request
    first = outs[0]
    assert first is not None
    assert first.result is not None
    echo = json.loads(first.result.body)
    assert dict(echo["headers"])["content-type"] == "application/vnd.microenvoy.mqtt-batch+json"
    assert echo["body_length"] > 0
    # Fewer than max_messages: sent when max_delay passes.
    outs = await asyncio.gather(
        *(b.send(Publish(f"batch/part/{i}", b"x", qos=1, packet_id=20 + i), CTX, DOWN) for i in range(2))
    )
    assert [o.reason_code for o in outs if o is not None] == [0, 0]
    assert h2_server.count("/batch/part") == 1
    assert store.value("mqtt.dev.bridge_batched_messages") == 5


def test_batch_body_format() -> None:
    from microenvoy.io.mqtt_bridge import batch_body

    body = json.loads(
        batch_body(
            [
                (
                    Publish(
                        "a/b", b"\x00\xff", qos=1, packet_id=1, properties=Properties(content_type="x/y")
                    ),
                    "c1",
                )
            ]
        )
    )
    (m,) = body["messages"]
    assert (m["topic"], base64.b64decode(m["payload"]), m["qos"], m["client_id"], m["content_type"]) == (
        "a/b", b"\x00\xff", 1, "c1", "x/y",
    )  # fmt: skip


async def test_grpc_batching_sends_one_batch_message_per_call() -> None:
    """A gRPC route with batching: one unary call carrying a microenvoy.bridge.v1.Batch (decoded with the
    shipped .proto); its OK acknowledges every message."""
    import grpc
    from peers.grpc_server import start_grpc_server
    from peers.mqtt_clients import bridge_message_modules

    calls: list[bytes] = []

    def handle(request: bytes, context: object) -> bytes:
        calls.append(request)
        return b""

    handler = grpc.method_handlers_generic_handler(
        "iot.v1.Ingest", {"Publish": grpc.unary_unary_rpc_method_handler(handle)}
    )
    server, port = start_grpc_server(lambda s: s.add_generic_rpc_handlers((handler,)), workers=2, name="g")
    store = Store()
    cluster = Cluster("g", endpoints=(Endpoint(SocketAddress("127.0.0.1", port)),), upstream_protocol="HTTP2")
    cm = ClusterManager([cluster], store)
    await cm.start()
    try:
        route = MqttRoute(
            "g",
            "plant/#",
            RouteAction(cluster="g"),
            grpc=GrpcBridge("/iot.v1.Ingest/Publish", "envelope"),
            batch=Batching(max_messages=3, max_delay=0.2),
        )
        b = MqttBridge(MqttProxy("dev", routes=(route,)), clusters=cm, stats=store, listener_name="mqtt")
        pubs = [Publish(f"plant/{i}", f"v{i}".encode(), qos=1, packet_id=1 + i) for i in range(3)]
        outs = await asyncio.gather(*(b.send(p, CTX, DOWN) for p in pubs))
        assert [o.reason_code for o in outs if o is not None] == [0, 0, 0]
        (call,) = calls
        batch = bridge_message_modules().Batch.FromString(call)
        assert [(m.topic, m.payload, m.client_id) for m in batch.messages] == [
            ("plant/0", b"v0", "dev-1"), ("plant/1", b"v1", "dev-1"), ("plant/2", b"v2", "dev-1"),
        ]  # fmt: skip
    finally:
        await cm.close()
        server.stop(grace=None).wait(5)
