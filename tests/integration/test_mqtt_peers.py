"""The MQTT test peers proven against a real mosquitto 2.0: mosquitto_pub/mosquitto_sub and paho-mqtt in
MQTT 3.1.1 and 5.0, QoS 0/1/2, retained and will delivery, persistent sessions, shared subscriptions, TLS
client certificates, and password + ACL denial.

The test bodies take a broker port and the expected codes from ``MOSQUITTO_CODES``, so the same shapes can run
against the agent's MQTT listener (whose codes differ where mosquitto deviates from what microenvoy does, see
docs/mqtt-auth.md). Also here: mosquitto's password file and ACL file read by ``microenvoy.mqtt.auth``
give the same answers mosquitto gave, and the ``microenvoy.bridge.v1.Message`` .proto compiles with
grpcio-tools and decodes the bridge's envelopes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers.certs import CertBundle
from peers.mosquitto import MosquittoBroker, mosquitto_available
from peers.mqtt_clients import (
    MosquittoSub,
    PahoClient,
    Will,
    bridge_message_modules,
    mosquitto_pub,
)

from microenvoy.mqtt.auth import (
    Acl,
    CertificateInfo,
    Principal,
    certificate_info,
    parse_acl_file,
    parse_password_file,
)

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed (.ci/setup)")

VERSIONS = [pytest.param(4, id="v311"), pytest.param(5, id="v5")]
QOS = [0, 1, 2]


@dataclass(frozen=True)
class DenialCodes:
    """What a broker answers to refused operations (per protocol version 4 / 5)."""

    bad_password: dict[int, int]
    anonymous: dict[int, int]
    subscribe_denied: dict[int, int]
    """SUBACK code for a subscription the ACL does not allow."""
    publish_denied_qos1: dict[int, int]
    """PUBACK reason code for a refused QoS 1 PUBLISH."""


MOSQUITTO_CODES = DenialCodes(
    # mosquitto 2.0 refuses a wrong password as "not authorized" (3.1.1: 5, 5.0: 0x87), not 4 / 0x86.
    bad_password={4: 5, 5: 0x87},
    anonymous={4: 5, 5: 0x87},
    # mosquitto 2.0's ACL file does not check SUBSCRIBE: it grants the QoS and filters at delivery.
    subscribe_denied={4: 1, 5: 1},
    publish_denied_qos1={4: 0, 5: 0x87},
)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


def _payload(i: int) -> bytes:
    return bytes([i, 0, 255]) + f"message {i}".encode()


# ====================================================================================== basic pub/sub
@pytest.mark.parametrize("qos", QOS)
@pytest.mark.parametrize("pub_version", VERSIONS)
@pytest.mark.parametrize("sub_version", VERSIONS)
def test_cli_pub_sub(broker: MosquittoBroker, sub_version: int, pub_version: int, qos: int) -> None:
    topic = f"cli/{sub_version}{pub_version}{qos}"
    with MosquittoSub(
        broker.port, [f"{topic}/#"], version=sub_version, qos=qos, count=3, wait_secs=20
    ) as sub:
        assert sub.granted == [qos]
        for i in range(3):
            r = mosquitto_pub(broker.port, f"{topic}/{i}", _payload(i), version=pub_version, qos=qos)
            assert r.returncode == 0, r.output
            assert r.connack == 0
            assert r.acks == {0: (), 1: (("PUBACK", 0),), 2: (("PUBCOMP", 0),)}[qos]
        got = sub.wait_messages(3)
        assert sub.wait() == 0  # -C 3: exits after three messages
    assert [(m.topic, m.payload, m.qos, m.retain) for m in got] == [
        (f"{topic}/{i}", _payload(i), qos, False) for i in range(3)
    ]


@pytest.mark.parametrize("qos", QOS)
@pytest.mark.parametrize("version", VERSIONS)
def test_paho_pub_sub(broker: MosquittoBroker, version: int, qos: int) -> None:
    topic = f"paho/{version}/{qos}"
    with (
        PahoClient(broker.port, version=version, client_id=f"sub-{version}-{qos}") as sub,
        PahoClient(broker.port, version=version) as pub,
    ):
        assert sub.connect() == 0
        assert pub.connect() == 0
        assert sub.subscribe(f"{topic}/+", qos) == [qos]
        for i in range(3):
            assert pub.publish(f"{topic}/{i}", _payload(i), qos) == 0
        got = sub.wait_messages(3)
    assert [(m.topic, m.payload, m.qos, m.retain, m.dup) for m in got] == [
        (f"{topic}/{i}", _payload(i), qos, False, False) for i in range(3)
    ]


def test_paho_v5_properties_round_trip(broker: MosquittoBroker) -> None:
    with PahoClient(broker.port, version=5) as sub, PahoClient(broker.port, version=5) as pub:
        assert sub.connect() == 0
        assert pub.connect() == 0
        assert sub.subscribe("props/#", 1) == [1]
        props = {
            "ContentType": "application/json",
            "ResponseTopic": "props/reply",
            "CorrelationData": b"\x01\x02",
            "UserProperty": [("k", "v"), ("k", "w")],
            "MessageExpiryInterval": 60,
        }
        assert pub.publish("props/a", b"{}", 1, properties=props) == 0
        (msg,) = sub.wait_messages(1)
    assert msg.properties["ContentType"] == "application/json"
    assert msg.properties["ResponseTopic"] == "props/reply"
    assert msg.properties["CorrelationData"] == b"\x01\x02"
    assert msg.properties["UserProperty"] == [("k", "v"), ("k", "w")]
    assert 0 < msg.properties["MessageExpiryInterval"] <= 60


@pytest.mark.parametrize("version", VERSIONS)
async def test_paho_asyncio_twins(broker: MosquittoBroker, version: int) -> None:
    with PahoClient(broker.port, version=version) as c:
        assert await c.aconnect() == 0
        assert await c.asubscribe("async/x", 1) == [1]
        assert await c.apublish("async/x", b"hi", 1) == 0
        (msg,) = await c.await_messages(1)
        assert msg.payload == b"hi"
        await c.adisconnect()
        assert not c.connected


# ===================================================================================== retained, will
@pytest.mark.parametrize("version", VERSIONS)
def test_retained_delivery_and_clearing(broker: MosquittoBroker, version: int) -> None:
    base = f"retained/{version}"
    r = mosquitto_pub(broker.port, f"{base}/a", b"kept", version=version, qos=1, retain=True)
    assert r.ok, r.output
    assert r.ack_reason == (0x10 if version == 5 else 0)  # v5: "No matching subscribers" (a success)
    with PahoClient(broker.port, version=version) as c:
        assert c.connect() == 0
        assert c.subscribe(f"{base}/#", 1) == [1]
        (msg,) = c.wait_messages(1)
        assert (msg.topic, msg.payload, msg.retain) == (f"{base}/a", b"kept", True)
        # a live message on the same topic is not flagged retained for an existing subscription
        assert c.publish(f"{base}/a", b"live", 1, retain=True) == 0
        assert c.wait_messages(2)[1].retain is False
    with MosquittoSub(broker.port, [f"{base}/#"], version=version, count=1, wait_secs=20) as sub:
        (m,) = sub.wait_messages(1)
        assert (m.topic, m.payload, m.retain) == (f"{base}/a", b"live", True)
    # an empty retained message clears it: a new subscriber sees only what is published after
    assert mosquitto_pub(broker.port, f"{base}/a", b"", version=version, qos=1, retain=True).ok
    with PahoClient(broker.port, version=version) as c:
        assert c.connect() == 0
        assert c.subscribe(f"{base}/#", 1) == [1]
        assert c.publish(f"{base}/fence", b"fence", 1) == 0  # after the SUBACK: after any retained message
        got = c.wait_messages(1)
        assert [(m.topic, m.payload) for m in got] == [(f"{base}/fence", b"fence")]


@pytest.mark.parametrize("version", VERSIONS)
def test_will_on_dropped_paho_connection(broker: MosquittoBroker, version: int) -> None:
    topic = f"will/paho/{version}"
    with PahoClient(broker.port, version=version) as watcher:
        assert watcher.connect() == 0
        assert watcher.subscribe(topic, 1) == [1]
        dying = PahoClient(broker.port, version=version, will=Will(topic, b"gone", qos=1))
        assert dying.connect() == 0
        dying.drop()
        (msg,) = watcher.wait_messages(1)
        assert (msg.topic, msg.payload, msg.qos) == (topic, b"gone", 1)


@pytest.mark.parametrize("version", VERSIONS)
def test_no_will_on_clean_disconnect_and_will_on_killed_cli(broker: MosquittoBroker, version: int) -> None:
    topic = f"will/cli/{version}"
    with PahoClient(broker.port, version=version) as watcher:
        assert watcher.connect() == 0
        assert watcher.subscribe(f"{topic}/#", 1) == [1]
        polite = PahoClient(broker.port, version=version, will=Will(f"{topic}/polite", b"x"))
        assert polite.connect() == 0
        polite.disconnect()  # DISCONNECT: the will is discarded
        sub = MosquittoSub(broker.port, ["unused/topic"], version=version,
                           will=Will(f"{topic}/killed", b"died", qos=1, retain=True)).start()  # fmt: skip
        sub.kill()
        (msg,) = watcher.wait_messages(1)
        assert (msg.topic, msg.payload) == (f"{topic}/killed", b"died")
        # the will was retained: a late subscriber gets it
        with MosquittoSub(broker.port, [f"{topic}/killed"], version=version, count=1, wait_secs=20) as late:
            assert late.wait_messages(1)[0].retain is True
        assert mosquitto_pub(broker.port, f"{topic}/killed", b"", retain=True, qos=1).ok


def test_will_delay_is_cancelled_by_reconnect(broker: MosquittoBroker) -> None:
    """MQTT 5 will delay: the session's will waits; reconnecting in time cancels it."""
    topic = "willdelay/gone"
    with PahoClient(broker.port, version=5) as watcher:
        assert watcher.connect() == 0
        assert watcher.subscribe("willdelay/#", 1) == [1]
        will = Will(topic, b"late", qos=1, delay_interval=30)
        c = PahoClient(broker.port, version=5, client_id="delayed-will", clean_start=False, session_expiry=60,
                       will=will)  # fmt: skip
        assert c.connect() == 0
        c.drop()
        again = PahoClient(
            broker.port, version=5, client_id="delayed-will", clean_start=False, session_expiry=0
        )
        assert again.connect() == 0
        again.disconnect()
        assert watcher.publish("willdelay/fence", b"fence", 1) == 0
        got = watcher.wait_messages(1)
        assert [m.topic for m in got] == ["willdelay/fence"]


# ================================================================================== sessions, sharing
@pytest.mark.parametrize("version", VERSIONS)
def test_persistent_session_queues_while_offline(broker: MosquittoBroker, version: int) -> None:
    cid, topic = f"persistent-{version}", f"session/{version}"
    c = PahoClient(broker.port, version=version, client_id=cid, clean_start=False, session_expiry=300)
    assert c.connect() == 0
    assert c.subscribe(topic, 1) == [1]
    c.disconnect()
    for i in range(3):
        assert mosquitto_pub(broker.port, topic, _payload(i), version=version, qos=1).ok
    with PahoClient(
        broker.port, version=version, client_id=cid, clean_start=False, session_expiry=300
    ) as back:
        assert back.connect() == 0
        got = back.wait_messages(3)
        assert [m.payload for m in got] == [_payload(i) for i in range(3)]
        back.disconnect()
    # end the session
    with PahoClient(broker.port, version=version, client_id=cid, clean_start=True) as end:
        assert end.connect() == 0


def test_shared_subscription_splits_messages(broker: MosquittoBroker) -> None:
    with (
        PahoClient(broker.port, version=5) as a,
        PahoClient(broker.port, version=4) as b,
        PahoClient(broker.port, version=5) as pub,
    ):
        for c in (a, b, pub):
            assert c.connect() == 0
        assert a.subscribe("$share/workers/jobs/#", 1) == [1]
        assert b.subscribe("$share/workers/jobs/#", 1) == [1]
        for i in range(20):
            assert pub.publish(f"jobs/{i}", str(i), 1) == 0

        def total() -> int:
            return len(a.messages) + len(b.messages)

        from peers.common import wait_for

        wait_for(lambda: total() >= 20, 10, message="20 shared messages")
        payloads = sorted(int(m.payload) for m in a.messages + b.messages)
    assert payloads == list(range(20))  # each message exactly once in the group
    assert a.messages  # mosquitto round-robins between the group's members
    assert b.messages


# ================================================================================================= TLS
@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory, certs: CertBundle) -> Iterator[MosquittoBroker]:
    acl = "user client-1\ntopic readwrite devices/client-1/#\n"
    with MosquittoBroker(
        tmp_path_factory.mktemp("mosquitto-tls"),
        tls=certs,
        require_certificate=True,
        use_identity_as_username=True,
        allow_anonymous=False,
        acl=acl,
    ) as b:
        yield b


@pytest.mark.parametrize("version", VERSIONS)
def test_tls_client_certificate_is_the_principal(
    tls_broker: MosquittoBroker, certs: CertBundle, version: int
) -> None:
    port = tls_broker.tls_port
    with PahoClient(port, version=version, tls=certs, client_cert=True, host="localhost") as c:
        assert c.connect() == 0
        assert c.subscribe("devices/client-1/#", 1) == [1]
        assert c.publish("devices/client-1/up", b"x", 1) == 0
        assert c.publish("devices/other/up", b"y", 1) == MOSQUITTO_CODES.publish_denied_qos1[version]
        assert c.publish("devices/client-1/fence", b"f", 1) == 0
        got = c.wait_messages(2)
        assert [m.topic for m in got] == ["devices/client-1/up", "devices/client-1/fence"]
    r = mosquitto_pub(port, "devices/client-1/cli", b"z", version=version, qos=1, tls=certs, client_cert=True)
    assert r.ok, r.output
    # without a client certificate the TLS handshake fails: no CONNACK at all
    r = mosquitto_pub(port, "devices/client-1/cli", b"z", version=version, qos=1, tls=certs, timeout=20)
    assert r.returncode != 0
    assert r.connack is None
    # the identity microenvoy would take from the same certificate
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(certs.client_cert.read_bytes())
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    info = certificate_info(
        {
            "subject": ((("commonName", cn),),),
            "subjectAltName": tuple(
                ("URI", u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
            )
            + tuple(("DNS", d) for d in sans.get_values_for_type(x509.DNSName)),
        }
    )
    assert info is not None
    assert info.identity("cn") == "client-1"
    assert CertificateInfo(None, info.sans).identity("san") == "spiffe://microenvoy.test/device/client-1"


# ======================================================================================= auth and ACL
ACL = """\
# mosquitto ACL file (also read by microenvoy.mqtt.auth.parse_acl_file)
user alice
topic readwrite alice/#
topic read public/#
user observer
topic read #
pattern readwrite devices/%c/#
"""
USERS = {"alice": "alice-pw", "observer": "observer-pw"}


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path_factory.mktemp("mosquitto-auth"), users=USERS, acl=ACL) as b:
        yield b


@pytest.mark.parametrize("version", VERSIONS)
def test_connect_refusals(auth_broker: MosquittoBroker, version: int) -> None:
    codes = MOSQUITTO_CODES
    port = auth_broker.port
    for user, password, expected in (
        ("alice", "wrong", codes.bad_password[version]),
        ("nobody", "alice-pw", codes.bad_password[version]),
        (None, None, codes.anonymous[version]),
    ):
        with PahoClient(port, version=version, username=user, password=password) as c:
            assert c.connect() == expected, (user, password)
        r = mosquitto_pub(port, "alice/x", b"m", version=version, username=user, password=password)
        assert r.connack == expected, r.output
        assert r.returncode != 0
    with PahoClient(port, version=version, username="alice", password="alice-pw") as c:
        assert c.connect() == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_acl_denials(auth_broker: MosquittoBroker, version: int) -> None:
    codes = MOSQUITTO_CODES
    port = auth_broker.port
    with (
        PahoClient(port, version=version, username="observer", password="observer-pw") as observer,
        PahoClient(port, version=version, username="alice", password="alice-pw", client_id="dev1") as alice,
    ):
        assert observer.connect() == 0
        assert alice.connect() == 0
        assert observer.subscribe("#", 1) == [1]
        # publish: allowed, refused (negative PUBACK in v5, a plain PUBACK in 3.1.1), pattern with %c
        assert alice.publish("alice/ok", b"1", 1) == 0
        assert alice.publish("public/news", b"2", 1) == codes.publish_denied_qos1[version]
        assert alice.publish("public/news", b"3", 0) == 0  # QoS 0: silently dropped
        assert alice.publish("devices/dev1/up", b"4", 1) == 0
        assert alice.publish("devices/dev2/up", b"5", 1) == codes.publish_denied_qos1[version]
        assert alice.publish("alice/fence", b"6", 1) == 0
        assert "Denied PUBLISH" in auth_broker.log_text()  # logged before the PUBACK went out
        got = observer.wait_messages(3)
        assert [(m.topic, m.payload) for m in got] == [
            ("alice/ok", b"1"),
            ("devices/dev1/up", b"4"),
            ("alice/fence", b"6"),
        ]
        # subscribe outside the ACL: mosquitto grants it but delivers nothing there
        assert alice.subscribe("observer/#", 1) == [codes.subscribe_denied[version]]
        assert alice.subscribe("alice/#", 1) == [1]
        assert observer.publish("observer/secret", b"s", 1) == codes.publish_denied_qos1[version]
        assert alice.publish("alice/fence2", b"f", 1) == 0
        assert [m.topic for m in alice.wait_messages(1)] == ["alice/fence2"]


def test_qos2_denial_cli(auth_broker: MosquittoBroker) -> None:
    port = auth_broker.port
    r = mosquitto_pub(port, "public/x", b"m", version=5, qos=2, username="alice", password="alice-pw")
    assert (r.connack, r.ack_reason, r.failure) == (0, 0x87, "Not authorized"), r.output
    r = mosquitto_pub(port, "public/x", b"m", version=4, qos=2, username="alice", password="alice-pw")
    assert (r.connack, r.ack_reason, r.failure) == (0, 0, None), r.output
    r = mosquitto_pub(port, "alice/x", b"m", version=5, qos=2, username="alice", password="alice-pw")
    assert (r.ack_reason, r.acks) == (0, (("PUBCOMP", 0),)), r.output


def test_microenvoy_reads_mosquittos_files(auth_broker: MosquittoBroker) -> None:
    """The password file mosquitto_passwd wrote and the ACL file mosquitto enforced, read by
    microenvoy.mqtt.auth, give the answers mosquitto gave above."""
    assert auth_broker.password_file is not None
    passwords = parse_password_file(auth_broker.password_file.read_text(), str(auth_broker.password_file))
    assert passwords.verify("alice", b"alice-pw")
    assert not passwords.verify("alice", b"wrong")
    assert passwords.verify("observer", b"observer-pw")
    assert passwords.entries["alice"].scheme == "mosquitto-pbkdf2-sha512"
    rules = parse_acl_file(ACL, "acl")
    acl = Acl(rules.everyone, rules.anonymous, rules.users)
    alice = acl.bind(Principal("alice", "password"), "dev1")
    assert alice.can_publish("alice/ok")
    assert not alice.can_publish("public/news")
    assert alice.can_publish("devices/dev1/up")
    assert not alice.can_publish("devices/dev2/up")
    assert not alice.can_read("observer/secret")
    assert not alice.can_subscribe("observer/#")  # microenvoy refuses at SUBSCRIBE (mosquitto at delivery)
    assert alice.can_subscribe("alice/#")
    observer = acl.bind(Principal("observer", "password"), "obs")
    assert observer.can_subscribe("#")
    assert not observer.can_publish("observer/secret")


# ========================================================================================= the .proto
def test_bridge_envelope_proto_compiles_and_decodes_the_bridge_encoding() -> None:
    pb2 = bridge_message_modules()
    fields = {f.name: (f.number, f.type) for f in pb2.Message.DESCRIPTOR.fields}
    fd = pb2.Message.DESCRIPTOR.fields_by_name
    assert pb2.Message.DESCRIPTOR.full_name == "microenvoy.bridge.v1.Message"
    assert {name: n for name, (n, _) in fields.items()} == {
        "topic": 1,
        "payload": 2,
        "qos": 3,
        "client_id": 4,
        "content_type": 5,
        "properties": 6,
        "retain": 7,
    }
    assert fd["properties"].message_type.GetOptions().map_entry
    from microenvoy.bridging.mqtt import envelope
    from microenvoy.codecs.mqtt.packets import Properties, Publish

    pub = Publish(
        "devices/d1/telemetry",
        os.urandom(16),
        qos=1,
        retain=True,
        packet_id=7,
        properties=Properties(content_type="application/cbor", user_properties=(("site", "s1"),)),
    )
    msg = pb2.Message.FromString(envelope(pub, "d1"))
    assert (msg.topic, msg.payload, msg.qos, msg.retain, msg.client_id, msg.content_type) == (
        pub.topic, pub.payload, 1, True, "d1", "application/cbor",
    )  # fmt: skip
    assert dict(msg.properties) == {"site": "s1"}
    assert Path(pb2.__file__).is_file()
