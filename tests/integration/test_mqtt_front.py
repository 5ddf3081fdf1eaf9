"""The MQTT listener end to end with real clients (mosquitto_pub/sub, paho-mqtt) and a real h2 upstream:
local pub/sub in both protocol versions, bridged QoS 1/2 acknowledged only after the upstream's 2xx, negative
acks (v5) and connection close (v3.1.1) on upstream failure, retained and will delivery, malformed input."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import pytest
from peers import configs as C
from peers.agent import Agent
from peers.common import wait_for
from peers.h2_server import H2Server
from peers.mqtt_clients import MosquittoSub, PahoClient, Will, mosquitto_pub

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MQTT_TYPE = "type.googleapis.com/microenvoy.extensions.filters.network.mqtt_proxy.v1.MqttProxy"


def mqtt_listener(name: str, **cfg: Any) -> dict[str, Any]:
    f = {
        "name": "microenvoy.filters.network.mqtt_proxy",
        "typed_config": {"@type": MQTT_TYPE, "stat_prefix": name, **cfg},
    }
    return {"name": name, "address": C.socket_address(0, protocol="TCP"), "filter_chains": [{"filters": [f]}]}


@pytest.fixture(scope="module")
def mq(module_agent: Any, h2_server: H2Server) -> Agent:
    routes = [
        {"name": "telemetry", "match": {"topic_filter": "devices/{device}/telemetry"},
         "route": {"cluster": "up", "path": "/v1/{device}", "timeout": "5s"}},
        {"name": "failing", "match": {"topic_filter": "fail/{code}"},
         "route": {"cluster": "up", "path": "/status/{code}", "timeout": "5s"}},
        {"name": "slow", "match": {"topic_filter": "slow/{ms}"},
         "route": {"cluster": "up", "path": "/delay/{ms}", "timeout": "5s"}},
    ]  # fmt: skip
    config = C.bootstrap([mqtt_listener("mq", routes=routes)], [C.cluster("up", h2_server.port, http2=True)])
    return module_agent(config, name="mqtt")


@pytest.mark.parametrize("version", [4, 5])
def test_local_pub_sub_with_mosquitto_clients(mq: Agent, version: int) -> None:
    port = mq.port("mq")
    with MosquittoSub(port, [f"local/{version}/#"], version=version, qos=2, count=3) as sub:
        for qos in (0, 1, 2):
            r = mosquitto_pub(port, f"local/{version}/q{qos}", f"m{qos}", version=version, qos=qos)
            assert r.returncode == 0, r.output
        got = sub.wait_messages(3)
    assert sorted((m.topic, m.payload, m.qos) for m in got) == [
        (f"local/{version}/q0", b"m0", 0),
        (f"local/{version}/q1", b"m1", 1),
        (f"local/{version}/q2", b"m2", 2),
    ]


@pytest.mark.parametrize(("version", "qos"), [(4, 1), (5, 1), (5, 2), (4, 2)])
def test_bridged_publish_is_acked_after_the_upstream(
    mq: Agent, h2_server: H2Server, version: int, qos: int
) -> None:
    device = f"d-{version}-{qos}"
    with MosquittoSub(mq.port("mq"), ["devices/+/telemetry"], version=5, qos=1, count=1) as sub:
        r = mosquitto_pub(mq.port("mq"), f"devices/{device}/telemetry", b'{"t": 1}', version=version, qos=qos)
        assert r.returncode == 0, r.output
        assert r.ack_reason == 0
        assert h2_server.count(f"/v1/{device}") == 1  # delivered before the ack came back
        (local,) = sub.wait_messages(1)  # local subscribers get it too
    assert local.payload == b'{"t": 1}'
    assert mq.stat("mqtt.mq.bridge_rq_2xx") >= 1


def test_v5_upstream_failure_is_a_negative_puback(mq: Agent, h2_server: H2Server) -> None:
    c = PahoClient(mq.port("mq"), version=5, client_id="neg5")
    assert c.connect() == 0
    try:
        assert c.publish("fail/503", b"x", qos=1) == 0x80
        assert c.publish("fail/403", b"x", qos=1) == 0x87
        assert c.publish("fail/429", b"x", qos=1) == 0x97
        assert c.publish("devices/ok5/telemetry", b"x", qos=1) == 0
    finally:
        c.disconnect()
    assert mq.stat("mqtt.mq.acks_negative") >= 3


def test_v311_upstream_failure_closes_without_ack(mq: Agent) -> None:
    before = mq.stat("mqtt.mq.closed_undelivered")
    r = mosquitto_pub(mq.port("mq"), "fail/500", b"x", version=4, qos=1, timeout=10)
    assert r.ack_reason is None  # never acknowledged
    assert r.returncode != 0
    assert mq.wait_stat("mqtt.mq.closed_undelivered", before + 1) >= before + 1


def test_retained_and_will(mq: Agent) -> None:
    port = mq.port("mq")
    assert mosquitto_pub(port, "state/lamp", b"on", qos=1, retain=True).returncode == 0
    with MosquittoSub(port, ["state/#"], version=4, count=1) as sub:
        (m,) = sub.wait_messages(1)
    assert (m.topic, m.payload, m.retain) == ("state/lamp", b"on", True)
    watcher = PahoClient(port, version=5, client_id="watcher")
    assert watcher.connect() == 0
    assert watcher.subscribe("wills/#", 1) == [1]
    dying = PahoClient(port, version=5, client_id="dying", will=Will("wills/dying", b"gone", 1))
    assert dying.connect() == 0
    dying.drop()
    (w,) = watcher.wait_messages(1)
    watcher.disconnect()
    assert (w.topic, w.payload) == ("wills/dying", b"gone")


def test_malformed_connect_is_closed_and_counted(mq: Agent) -> None:
    before = mq.stat("mqtt.mq.malformed") + mq.stat("mqtt.mq.protocol_error")
    with socket.create_connection(("127.0.0.1", mq.port("mq")), timeout=5) as s:
        s.sendall(b"\x10\x05\x00\x04MQTX")  # CONNECT with a bad protocol name, truncated
        s.settimeout(5)
        assert s.recv(100) == b""  # closed
    wait_for(
        lambda: mq.stat("mqtt.mq.malformed") + mq.stat("mqtt.mq.protocol_error") > before,
        10,
        message="the violation counted",
    )
    with socket.create_connection(("127.0.0.1", mq.port("mq")), timeout=5) as s:
        s.sendall(b"\x30\x02\x00\x00")  # PUBLISH before CONNECT
        s.settimeout(5)
        assert s.recv(100) == b""
    assert mq.stat("mqtt.mq.cx_total") >= 2


@pytest.fixture(scope="module")
def secured(module_agent: Any, tmp_path_factory: pytest.TempPathFactory) -> Agent:
    d = tmp_path_factory.mktemp("mqttauth")
    pw = d / "passwd"
    for user, password in (("alice", "wonder"), ("bob", "builder")):
        subprocess.run(
            [sys.executable, "-m", "microenvoy.tools.mqtt_passwd", "-b", *(["-c"] if user == "alice" else []),
             "--scheme", "pbkdf2-sha256", "--iterations", "1000", str(pw), user, password],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    auth = {
        "password_file": str(pw),
        "acl": [
            {"access": "write", "topic": "devices/%u/#"},
            {"access": "read", "topic": "commands/%c/#"},
            {"access": "readwrite", "topic": "shared/#", "principals": ["alice"]},
        ],
    }
    config = C.bootstrap([mqtt_listener("sec", auth=auth)], [])
    return module_agent(config, name="mqtt-auth")


@pytest.mark.parametrize("version", [4, 5])
def test_bad_password_is_refused_with_the_versions_code(secured: Agent, version: int) -> None:
    c = PahoClient(secured.port("sec"), version=version, username="alice", password="nope")
    assert c.connect() == (0x86 if version == 5 else 4)
    anon = PahoClient(secured.port("sec"), version=version)
    assert anon.connect() == (0x87 if version == 5 else 5)
    assert secured.stat("mqtt.sec.connect_failed_bad_user_name_or_password") >= 1


def test_acls_with_substitution(secured: Agent) -> None:
    port = secured.port("sec")
    alice = PahoClient(port, version=5, client_id="a1", username="alice", password="wonder")
    assert alice.connect() == 0
    bob = PahoClient(port, version=5, client_id="b1", username="bob", password="builder")
    assert bob.connect() == 0
    try:
        assert alice.publish("devices/alice/t", b"ok", qos=1) in (0, 0x10)
        assert alice.publish("devices/bob/t", b"no", qos=1) == 0x87  # %u is alice
        assert alice.subscribe("commands/a1/#", 1) == [1]
        assert alice.subscribe("commands/b1/#", 1) == [0x87]  # %c is a1
        assert alice.subscribe("shared/#", 0) == [0]
        assert bob.subscribe("shared/#", 0) == [0x87]
        assert bob.publish("shared/x", b"x", qos=1) == 0x87
    finally:
        alice.disconnect()
        bob.disconnect()
    assert secured.stat("mqtt.sec.publish_denied") >= 2


def test_v5_request_response_with_mosquitto_rr(mq: Agent) -> None:
    """mosquitto_rr sends a request with Response Topic and Correlation Data and prints the response: the
    upstream's answer (the h2 server's JSON echo) comes back on the response topic."""
    proc = subprocess.run(
        ["mosquitto_rr", "-h", "127.0.0.1", "-p", str(mq.port("mq")), "-t", "devices/rr/telemetry",
         "-e", "replies/rr", "-m", "ping", "-q", "1", "-W", "10", "-F", "%p|%C|%D|%P",
         "-D", "publish", "correlation-data", "req-42"],
        capture_output=True, timeout=20, check=False,
    )  # fmt: skip
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert out, proc.stderr.decode()
    payload, ctype, corr, props = out.strip().split("|", 3)
    assert '"path": "/v1/rr"' in payload
    assert ctype == "application/json"
    assert corr == "req-42"  # the request's correlation data came back
    assert "status:200" in props


def test_bridged_qos0_is_delivered_after_the_client_left(mq: Agent) -> None:
    """mosquitto_pub disconnects right after writing a QoS 0 PUBLISH; the slow upstream exchange still
    completes (it is not cancelled with the connection)."""
    before = mq.stat("mqtt.mq.bridge_rq_2xx")
    assert mosquitto_pub(mq.port("mq"), "slow/400", b"late", qos=0).returncode == 0
    assert mq.wait_stat("mqtt.mq.bridge_rq_2xx", before + 1) >= before + 1


SECRET = {"prefix": "devices/secret"}


@pytest.fixture(scope="module")
def filtered(module_agent: Any, h2_server: H2Server) -> Agent:
    """The same HTTP filters as HTTP traffic: rbac on the MQTT metadata, local_ratelimit."""
    rbac = C.filter_rbac(
        "DENY",
        {
            "no-secrets": {
                "permissions": [{"header": {"name": "x-microenvoy-mqtt-topic", "string_match": SECRET}}],
                "principals": [{"any": True}],
            },
        },
    )  # fmt: skip
    limit = C.filter_local_ratelimit(2, fill_interval="3600s")
    routes = [{"match": {"topic_filter": "devices/{device}/telemetry"},
               "route": {"cluster": "up", "path": "/v1/{device}", "timeout": "5s"}}]  # fmt: skip
    config = C.bootstrap(
        [mqtt_listener("flt", routes=routes, http_filters=[rbac, limit, C.router_filter()])],
        [C.cluster("up", h2_server.port, http2=True)],
    )
    return module_agent(config, name="mqtt-filters")


def test_http_filters_apply_to_bridged_messages(filtered: Agent, h2_server: H2Server) -> None:
    c = PahoClient(filtered.port("flt"), version=5, client_id="flt1")
    assert c.connect() == 0
    try:
        assert c.publish("devices/secret/telemetry", b"x", qos=1) == 0x87  # rbac 403
        assert h2_server.count("/v1/secret") == 0
        assert c.publish("devices/a/telemetry", b"x", qos=1) == 0  # token 1 (the denied one took none)
        assert c.publish("devices/b/telemetry", b"x", qos=1) == 0  # token 2
        assert c.publish("devices/c/telemetry", b"x", qos=1) == 0x97  # local_ratelimit 429
    finally:
        c.disconnect()
    assert filtered.stat("http.flt.rbac.denied") == 1


def test_config_dump_shows_mqtt_routes(mq: Agent) -> None:
    status, body = mq.admin_get("/config_dump")
    assert status == 200
    assert b"devices/{device}/telemetry" in body
    assert b"microenvoy.filters.network.mqtt_proxy" in body


@pytest.mark.parametrize("version", [4, 5])
def test_will_topic_needs_publish_rights(secured: Agent, version: int) -> None:
    port = secured.port("sec")
    bad = PahoClient(
        port, version=version, username="bob", password="builder", will=Will("shared/x", b"w", 0)
    )
    assert bad.connect() == (0x87 if version == 5 else 5)
    ok = PahoClient(
        port, version=version, username="bob", password="builder", will=Will("devices/bob/w", b"w", 0)
    )
    assert ok.connect() == 0
    ok.disconnect()


def test_deny_rule_inside_an_allowed_subscription_is_checked_per_message(
    module_agent: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """allow readwrite a/#, deny a/%c/#: a client may subscribe to a/#, yet messages under its own a/<id>/
    (which other clients may publish) never reach it: the deny rule only overlaps the subscription, so each
    delivery is checked."""
    auth = {
        "allow_anonymous": True,
        "acl": [{"access": "readwrite", "topic": "a/#"}, {"access": "deny", "topic": "a/%c/#"}],
    }
    agent = module_agent(C.bootstrap([mqtt_listener("acl", auth=auth)], []), name="mqtt-acl")
    port = agent.port("acl")
    with MosquittoSub(port, ["a/#"], version=5, qos=1, count=2, client_id="reader") as sub:
        for topic in ("a/open/1", "a/reader/secret", "a/open/2"):
            r = mosquitto_pub(port, topic, topic, version=5, qos=1, client_id="writer")
            assert r.ack_reason in (0, 0x10), r.output  # the writer may publish there
        got = sub.wait_messages(2)
    assert [m.topic for m in got] == ["a/open/1", "a/open/2"]
