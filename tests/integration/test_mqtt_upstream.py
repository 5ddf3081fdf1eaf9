"""The upstream MQTT broker cluster (``microenvoy.clusters.mqtt_broker``) against a real mosquitto broker.

Uplink through a real agent (subprocess, MQTT listener bridge route -> the mqtt_broker cluster -> mosquitto):
QoS 0/1/2 preserved (a mosquitto_sub on the broker sees them with their QoS), v5 negative acks while the
broker is down and reconnection (persistent session) when it is back, TLS with a client certificate.
Downlink and loops run an in-process ``Server`` (the downlink needs ``register_local_front``, which the test
server calls where the lead's server wiring will): broker subscriptions delivered into the agent's local
broker with prefix rewriting, and no loop when the uplink and downlink topics overlap (MQTT 5 and 3.1.1).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from peers import configs as C
from peers import mosquitto as mosquitto_peer
from peers.agent import Agent
from peers.certs import CertBundle
from peers.common import async_wait_for
from peers.mosquitto import MosquittoBroker, mosquitto_available
from peers.mqtt_clients import MosquittoSub, PahoClient, mosquitto_pub

from microenvoy.config.loader import parse_bootstrap
from microenvoy.io.mqtt_upstream import register_local_front
from microenvoy.io.server import Server

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(90),
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
]

MQTT_TYPE = "type.googleapis.com/microenvoy.extensions.filters.network.mqtt_proxy.v1.MqttProxy"
BROKER_TYPE = "type.googleapis.com/microenvoy.extensions.clusters.mqtt_broker.v1.MqttBroker"
# Metadata headers are not sent upstream by default; the bridge route passes the MQTT facts to the cluster.
PASS_METADATA = [
    {"header": {"key": f"x-microenvoy-mqtt-{k}", "value": f"%REQ(x-microenvoy-mqtt-{k})%"}}
    for k in ("topic", "qos", "retain", "client-id")
]


def mqtt_listener(name: str, routes: list[dict[str, Any]]) -> dict[str, Any]:
    f = {
        "name": "microenvoy.filters.network.mqtt_proxy",
        "typed_config": {"@type": MQTT_TYPE, "stat_prefix": name, "routes": routes},
    }
    return {"name": name, "address": C.socket_address(0, protocol="TCP"), "filter_chains": [{"filters": [f]}]}


def bridge_route(topic_filter: str, cluster: str = "cloud", timeout: str = "5s") -> dict[str, Any]:
    return {
        "name": f"to-{cluster}",
        "match": {"topic_filter": topic_filter},
        "route": {"cluster": cluster, "timeout": timeout},
        "request_headers_to_add": PASS_METADATA,
    }


def broker_cluster(
    name: str, port: int, *, tls: dict[str, Any] | None = None, **typed: Any
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name,
        "connect_timeout": "2s",
        "cluster_type": {
            "name": "microenvoy.clusters.mqtt_broker",
            "typed_config": {
                "@type": BROKER_TYPE,
                "reconnect_backoff": {"base_interval": "0.1s", "max_interval": "0.5s"},
                **typed,
            },
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": C.socket_address(port)}}]}],
        },
    }
    if tls is not None:
        c["transport_socket"] = tls
    return c


def _connected(a: Agent, cluster: str = "cloud") -> None:
    a.wait_stat(f"cluster.{cluster}.mqtt_connected", lambda v: v == 1, timeout=15)


# ============================================================================================ uplink
@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with MosquittoBroker(tmp_path_factory.mktemp("mosq")) as b:
        yield b


@pytest.mark.parametrize("version", [5, 4])
def test_qos_is_preserved_to_the_broker(agent: Any, broker: MosquittoBroker, version: int) -> None:
    protocol = "v5" if version == 5 else "v311"
    config = C.bootstrap(
        [mqtt_listener("mq", [bridge_route("dev/#")])],
        [broker_cluster("cloud", broker.port, protocol=protocol, publish_topic="up/{topic}")],
    )
    a = agent(config, name=f"up{version}")
    _connected(a)
    port = a.port("mq")
    with MosquittoSub(broker.port, [f"up/dev/{version}/#"], version=5, qos=2, count=3) as sub:
        for qos in (0, 1, 2):
            r = mosquitto_pub(port, f"dev/{version}/q{qos}", f"m{qos}", version=version, qos=qos)
            assert r.ok, r.output
        got = sub.wait_messages(3)
    assert sorted((m.topic, m.payload, m.qos) for m in got) == [
        (f"up/dev/{version}/q0", b"m0", 0),
        (f"up/dev/{version}/q1", b"m1", 1),
        (f"up/dev/{version}/q2", b"m2", 2),
    ]
    assert a.stat("cluster.cloud.mqtt_published_qos1") == 1
    assert a.stat("cluster.cloud.mqtt_published_qos2") == 1
    # QoS 1/2 were acknowledged by the broker before the client's ack; the QoS 0 exchange may be cut short
    # when mosquitto_pub disconnects right after writing (the message reached the broker anyway, see above).
    assert a.wait_stat("cluster.cloud.mqtt_acked", 2) >= 2
    assert a.stat("cluster.cloud.upstream_rq_2xx") >= 2


def test_broker_down_negative_ack_then_reconnect_with_persistent_session(
    agent: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mosquitto keeps sessions across its restart only with persistence (saved at SIGTERM).
    store = tmp_path / "store"
    store.mkdir()
    b = MosquittoBroker(
        tmp_path / "b", extra_config=f"persistence true\npersistence_location {store}/\nautosave_interval 0"
    )
    b.start()
    try:
        config = C.bootstrap(
            [mqtt_listener("mq", [bridge_route("dev/#")])],
            [broker_cluster("cloud", b.port, client_id="gw-persist", session_expiry_interval=600)],
        )
        a = agent(config, name="reconnect")
        _connected(a)
        assert a.stat("cluster.cloud.mqtt_session_present") == 0
        port = a.port("mq")
        assert mosquitto_pub(port, "dev/a", "one", qos=1).ack_reason == 0
        b.stop()
        a.wait_stat("cluster.cloud.mqtt_connected", lambda v: v == 0)
        r = mosquitto_pub(port, "dev/a", "lost", qos=1)
        assert r.ack_reason == 0x80, r.output  # MQTT 5: negative PUBACK, nothing was delivered
        r4 = mosquitto_pub(port, "dev/a", "lost", qos=1, version=4)
        assert r4.ack_reason is None, r4.output  # 3.1.1: connection closed without an ack
        assert a.stat("cluster.cloud.mqtt_not_connected") >= 2
        assert a.stat("cluster.cloud.upstream_rq_2xx") == 1
        # Back on the same port: the agent reconnects (jittered backoff) and resumes its session.
        monkeypatch.setattr(mosquitto_peer, "free_port", lambda: b.port)
        b.start()
        a.wait_stat("cluster.cloud.mqtt_connected", lambda v: v == 1, timeout=20)
        assert a.stat("cluster.cloud.mqtt_reconnects") >= 1
        assert a.stat("cluster.cloud.mqtt_session_present") == 1
        assert a.stat("cluster.cloud.upstream_cx_total") == 2
        with MosquittoSub(b.port, ["dev/#"], qos=1, count=1) as sub:
            assert mosquitto_pub(port, "dev/a", "two", qos=1).ack_reason == 0
            assert [(m.topic, m.payload) for m in sub.wait_messages(1)] == [("dev/a", b"two")]
    finally:
        b.stop()


def test_tls_with_client_certificate(agent: Any, tmp_path: Path, certs: CertBundle) -> None:
    b = MosquittoBroker(tmp_path / "tls", tls=certs, require_certificate=True).start()
    try:
        tls = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "localhost",
                "common_tls_context": {
                    "validation_context": {"trusted_ca": {"filename": str(certs.ca_cert)}},
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(certs.client_cert)},
                            "private_key": {"filename": str(certs.client_key)},
                        }
                    ],
                },
            },
        }
        config = C.bootstrap(
            [mqtt_listener("mq", [bridge_route("dev/#")])],
            [broker_cluster("cloud", b.tls_port, tls=tls, publish_topic="secure/{topic}")],
        )
        a = agent(config, name="tls")
        _connected(a)
        with MosquittoSub(b.port, ["secure/#"], qos=1, count=1) as sub:
            assert mosquitto_pub(a.port("mq"), "dev/x", "over tls", qos=1).ack_reason == 0
            assert [(m.topic, m.payload) for m in sub.wait_messages(1)] == [("secure/dev/x", b"over tls")]
    finally:
        b.stop()


# ============================================================================================ downlink
class _WiredServer(Server):
    """The agent with the downlink wiring (``register_local_front`` where the server builds MQTT fronts)."""

    def _mqtt_chain(self, lc: Any, chain: Any, config: Any) -> Any:
        runtime = super()._mqtt_chain(lc, chain, config)
        register_local_front(self.clusters, lc.name, runtime.mqtt)
        return runtime


async def _start(config: dict[str, Any]) -> _WiredServer:
    server = _WiredServer(parse_bootstrap(config))
    await server.start()
    return server


def _stat(server: Server, name: str) -> int:
    return server.stats.value(name) or 0


async def _wait_stat(server: Server, name: str, n: int) -> None:
    await async_wait_for(lambda: _stat(server, name) >= n, 15, message=f"{name} >= {n}")


def _downlink_config(broker_port: int, protocol: str, *, uplink: str | None = None) -> dict[str, Any]:
    routes = [bridge_route(uplink)] if uplink is not None else []
    subs = [
        {"topic_filter": "cloud/cmd/#", "qos": 1, "strip_prefix": "cloud/", "local_prefix": "edge/",
         "listener": "mq"},
        {"topic_filter": "shared/#", "qos": 1, "listener": "mq"},
    ]  # fmt: skip
    return C.bootstrap(
        [mqtt_listener("mq", routes)],
        [broker_cluster("cloud", broker_port, protocol=protocol, subscriptions=subs)],
        node={"id": f"edge-{protocol}-{'up' if uplink else 'down'}"},  # own client id: no resumed session
    )


@pytest.mark.parametrize("protocol", ["v5", "v311"])
async def test_downlink_into_the_local_broker_with_prefix_rewriting(
    broker: MosquittoBroker, protocol: str
) -> None:
    server = await _start(_downlink_config(broker.port, protocol))
    try:
        await _wait_stat(server, "cluster.cloud.mqtt_connected", 1)
        port = server._lst["mq"].bound_port
        with PahoClient(port, version=5) as local:
            await local.aconnect()
            assert await local.asubscribe("edge/#", 1) == [1]
            # The broker's subscription may still be in flight right after CONNACK: publish until one lands.
            await _publish_until_delivered(broker.port, "cloud/cmd/reboot", b"now", local)
            got = await local.await_messages(1)
        assert (got[0].topic, got[0].payload, got[0].qos) == ("edge/cmd/reboot", b"now", 1)
        assert _stat(server, "cluster.cloud.mqtt_downlink_delivered") >= 1
    finally:
        await server.shutdown(drain=False)


async def _publish_until_delivered(broker_port: int, topic: str, payload: bytes, local: PahoClient) -> None:
    async def one() -> bool:
        r = await asyncio.to_thread(mosquitto_pub, broker_port, topic, payload, qos=1)
        assert r.ok, r.output
        return bool(local.messages)

    for _ in range(50):
        if await one():
            return
        try:
            await async_wait_for(lambda: bool(local.messages), 0.2)
            return
        except TimeoutError:
            continue
    raise AssertionError(f"nothing delivered from {topic}")


@pytest.mark.parametrize("protocol", ["v5", "v311"])
async def test_no_loop_when_uplink_and_downlink_overlap(broker: MosquittoBroker, protocol: str) -> None:
    # Uplink bridges shared/# to the broker; the downlink subscribes to shared/# into the same listener.
    server = await _start(_downlink_config(broker.port, protocol, uplink="shared/#"))
    try:
        await _wait_stat(server, "cluster.cloud.mqtt_subscriptions_active", 2)
        port = server._lst["mq"].bound_port
        with PahoClient(port, version=5) as local, PahoClient(broker.port, version=5) as remote:
            await local.aconnect()
            assert await local.asubscribe("shared/#", 1) == [1]
            await remote.aconnect()
            assert await remote.asubscribe("shared/#", 1) == [1]
            # Up: a local device publishes; the broker's subscriber sees it once, the local one once.
            await asyncio.to_thread(_local_publish, port, "shared/up", b"from-edge")
            assert [(m.topic, m.payload) for m in await remote.await_messages(1)] == [
                ("shared/up", b"from-edge")
            ]
            assert [(m.topic, m.payload) for m in await local.await_messages(1)] == [
                ("shared/up", b"from-edge")
            ]
            # Down: a cloud publish reaches the local subscriber once and is not bridged back up.
            r = await asyncio.to_thread(mosquitto_pub, broker.port, "shared/down", b"from-cloud", qos=1)
            assert r.ok, r.output
            await local.await_messages(2)
            await remote.await_messages(2)
            # A marker through both paths proves everything before it was processed.
            await asyncio.to_thread(_local_publish, port, "shared/marker", b"end")
            await remote.await_messages(3)
            await local.await_messages(3)
            assert [(m.topic, m.payload) for m in local.messages] == [
                ("shared/up", b"from-edge"),
                ("shared/down", b"from-cloud"),
                ("shared/marker", b"end"),
            ]
            assert [(m.topic, m.payload) for m in remote.messages] == [
                ("shared/up", b"from-edge"),
                ("shared/down", b"from-cloud"),
                ("shared/marker", b"end"),
            ]
        assert _stat(server, "cluster.cloud.mqtt_published") == 2  # up + marker: nothing came back up
        if protocol == "v311":  # no No Local: the echoes arrived and were dropped by the loop rule
            await _wait_stat(server, "cluster.cloud.mqtt_downlink_loop_dropped", 2)
            assert _stat(server, "cluster.cloud.mqtt_downlink_loop_dropped") == 2
            assert _stat(server, "cluster.cloud.mqtt_downlink_delivered") == 1
        else:  # No Local: the broker never sent them
            assert _stat(server, "cluster.cloud.mqtt_downlink_loop_dropped") == 0
            assert _stat(server, "cluster.cloud.mqtt_downlink_received") == 1
            assert _stat(server, "cluster.cloud.mqtt_downlink_delivered") == 1
    finally:
        await server.shutdown(drain=False)


def _local_publish(port: int, topic: str, payload: bytes) -> None:
    r = mosquitto_pub(port, topic, payload, qos=1)
    assert r.ack_reason == 0, r.output


# ============================================================================================ config
def test_config_defaults_and_errors_name_the_path() -> None:
    from microenvoy.core.errors import ConfigError

    ok = parse_bootstrap(_downlink_config(1883, "v5"))
    cfg = ok.static_resources.clusters[0].mqtt_broker
    assert cfg.client_id == "edge-v5-down-cloud"  # <node id>-<cluster>
    assert (cfg.protocol, cfg.clean_session, cfg.qos, cfg.publish_topic) == ("v5", False, None, "{topic}")
    bad = _downlink_config(1883, "v5")
    typed = bad["static_resources"]["clusters"][0]["cluster_type"]["typed_config"]
    typed["subscriptions"][0]["listener"] = "nope"
    typed["publish_topic"] = "x/{nope}"
    typed["protocol"] = "v4"
    typed["password"] = {"inline_string": "secret"}
    with pytest.raises(ConfigError) as exc:
        parse_bootstrap(bad)
    text = "\n".join(exc.value.errors)
    base = "static_resources.clusters[0].cluster_type.typed_config"
    assert f"{base}.subscriptions[0].listener: no listener named 'nope'" in text
    assert f"{base}.publish_topic: unknown placeholder {{nope}}" in text
    assert f"{base}.protocol:" in text
    assert f"{base}.password: a password needs a username" in text
