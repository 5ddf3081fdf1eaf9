"""The upstream MQTT broker cluster (``microenvoy.clusters.mqtt_broker``) against a real mosquitto broker.

Uplink through a real agent (subprocess, MQTT listener bridge route -> the mqtt_broker cluster -> mosquitto):
QoS 0/1/2 preserved (a mosquitto_sub on the broker sees them with their QoS), v5 negative acks while the
broker is down and reconnection (persistent session) when it is back, TLS with a client certificate.
Downlink and loops run an in-process ``Server`` (the downlink needs ``register_local_front``, which the test
server calls where the lead's server wiring will): broker subscriptions delivered into the agent's local
broker with prefix rewriting, and no loop when the uplink and downlink topics overlap (MQTT 5 and 3.1.1).
"""

from __future__ import annotations

from typing import Any

import pytest
from peers import configs as C
from peers.agent import Agent
from peers.mosquitto import MosquittoBroker, mosquitto_available
from peers.mqtt_clients import MosquittoSub, mosquitto_pub

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
