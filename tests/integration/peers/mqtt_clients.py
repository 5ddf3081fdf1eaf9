"""MQTT test clients: mosquitto_pub / mosquitto_sub runners and a synchronous paho-mqtt wrapper.

Every helper takes the broker's port (127.0.0.1) and ``version`` 5 or 4 (``-V mqttv5`` / ``-V mqttv311``), so
the same test body can run against mosquitto (peers/mosquitto.py) and against the agent's MQTT listener.
Nothing here sleeps to wait: each wait is a condition with a deadline.

``mosquitto_pub(port, topic, payload, ...)`` runs one publish (payload via stdin, binary-safe, ``-d`` debug
output parsed): ``PubResult.connack`` (the CONNACK code), ``.ack_reason`` (PUBACK/PUBREC/PUBCOMP reason, 0
for 3.1.1), ``.returncode``, ``.output``.

``MosquittoSub(port, ["a/#"], ...)`` runs ``mosquitto_sub -d`` in the background (``count`` -> ``-C n``,
``wait_secs`` -> ``-W secs``); ``start()`` returns once the SUBACK arrived (``granted`` holds its codes);
``wait_messages(n)`` returns the first ``n`` received messages (``SubMessage``: topic, payload bytes, qos,
retain); ``kill()`` drops the connection without DISCONNECT (fires a will), ``wait()`` waits for the exit.

``PahoClient(port, version=5, ...)`` is a paho-mqtt 2.x client (callback API v2) run by paho's network thread,
with blocking calls that return wire values: ``connect() -> CONNACK code`` (3.1.1 return codes, not paho's
translation), ``subscribe(filter, qos) -> [SUBACK codes]``, ``publish(...) -> PUBACK/PUBREC reason``
(0 on 3.1.1 and for QoS 0 once written), ``wait_messages(n)``, ``disconnect()``, ``drop()`` (close the socket
without DISCONNECT). Each blocking call has an ``a``-prefixed asyncio twin running in a worker thread
(``await client.aconnect()``) for tests whose agent runs in the same event loop.

``bridge_message_modules()`` compiles ``microenvoy/proto/microenvoy/bridge/v1/message.proto`` with
grpcio-tools (into tests/integration/_generated, never committed) and returns ``message_pb2``, so an
upstream test peer can decode ``microenvoy.bridge.v1.Message`` envelopes.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, TypeVar

from peers.certs import CertBundle

__all__ = [
    "BRIDGE_PROTO",
    "MosquittoSub",
    "MqttError",
    "PahoClient",
    "PubResult",
    "Received",
    "SubMessage",
    "Will",
    "bridge_message_modules",
    "mosquitto_pub",
    "version_flag",
]

T = TypeVar("T")
_HERE = Path(__file__).resolve().parent
GENERATED_DIR = _HERE.parent / "_generated"
PROTO_ROOT = _HERE.parents[2] / "microenvoy" / "proto"
BRIDGE_PROTO = PROTO_ROOT / "microenvoy" / "bridge" / "v1" / "message.proto"
_MSG_PREFIX = "=MSG="
_V3_CONNACK = {
    "Success": 0,
    "Unsupported protocol version": 1,
    "Client identifier not valid": 2,
    "Server unavailable": 3,
    "Bad user name or password": 4,
    "Not authorized": 5,
}


class MqttError(Exception):
    """A client operation failed or timed out."""


def version_flag(version: int) -> str:
    """``-V`` value of the mosquitto clients: 5 -> ``mqttv5``, 4 -> ``mqttv311``, 3 -> ``mqttv31``."""
    return {5: "mqttv5", 4: "mqttv311", 3: "mqttv31"}[version]


@dataclass(frozen=True, slots=True)
class Will:
    """A will message for a client's CONNECT."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    delay_interval: int | None = None
    """MQTT 5 Will Delay Interval (seconds); paho clients only."""


def _common_args(
    port: int,
    version: int,
    client_id: str | None,
    username: str | None,
    password: str | None,
    tls: CertBundle | None,
    client_cert: bool,
    keepalive: int | None,
) -> list[str]:
    args = ["-h", "127.0.0.1", "-p", str(port), "-V", version_flag(version), "-d"]
    if client_id is not None:
        args += ["-i", client_id]
    if username is not None:
        args += ["-u", username]
    if password is not None:
        args += ["-P", password]
    if tls is not None:
        args += ["--cafile", str(tls.ca_cert)]
        if client_cert:
            args += ["--cert", str(tls.client_cert), "--key", str(tls.client_key)]
    if keepalive is not None:
        args += ["-k", str(keepalive)]
    return args


_CONNACK = re.compile(r"received CONNACK \((\d+)\)")
_ACK = re.compile(r"received (PUBACK|PUBREC|PUBCOMP) \(Mid: \d+, RC:(\d+)\)")
_PUB_FAILED = re.compile(r"Publish \d+ failed: (.*)")
_REASON_NAMES = {
    "Unspecified error": 0x80,
    "Implementation specific error": 0x83,
    "Not authorized": 0x87,
    "Topic Name invalid": 0x90,
    "Packet Identifier in use": 0x91,
    "Quota exceeded": 0x97,
    "Payload format invalid": 0x99,
}


@dataclass(frozen=True, slots=True)
class PubResult:
    """What one mosquitto_pub run saw."""

    returncode: int
    output: str
    """stdout + stderr (with ``-d`` debug lines)."""
    connack: int | None
    """The CONNACK code (3.1.1 return code or 5.0 reason code); None if none arrived."""
    ack_reason: int | None
    """Reason code of the final acknowledgement (PUBACK for QoS 1, the first of PUBREC/PUBCOMP >= 0x80 or
    PUBCOMP for QoS 2); None when none arrived (QoS 0)."""
    acks: tuple[tuple[str, int], ...] = ()
    """Acknowledgements whose reason code mosquitto_pub prints (PUBACK, PUBCOMP), in order."""
    failure: str | None = None
    """mosquitto_pub's "Publish N failed: <reason>" text (MQTT 5 negative PUBACK/PUBREC), without the dot."""

    @property
    def ok(self) -> bool:
        """Connected, and the publish was not refused (0x10 No matching subscribers is a success)."""
        return (
            self.returncode == 0
            and self.connack == 0
            and self.failure is None
            and (self.ack_reason is None or self.ack_reason < 0x80)
        )


def mosquitto_pub(
    port: int,
    topic: str,
    payload: bytes | str = b"",
    *,
    version: int = 5,
    qos: int = 0,
    retain: bool = False,
    client_id: str | None = None,
    username: str | None = None,
    password: str | None = None,
    tls: CertBundle | None = None,
    client_cert: bool = False,
    properties: Sequence[tuple[str, ...]] = (),
    extra: Sequence[str] = (),
    timeout: float = 15.0,
) -> PubResult:
    """Publish one message with mosquitto_pub (payload from stdin, so any bytes work).

    ``properties``: MQTT 5 ``-D`` triples such as ``("publish", "user-property", "k", "v")`` (the first item
    is the packet name; the rest are passed as they are).
    """
    data = payload.encode() if isinstance(payload, str) else payload
    args = [
        "mosquitto_pub",
        *_common_args(port, version, client_id, username, password, tls, client_cert, None),
    ]
    args += ["-t", topic, "-q", str(qos)]
    args.append("-s" if data else "-n")  # -s refuses empty input; -n sends a zero-length payload
    if retain:
        args.append("-r")
    for prop in properties:
        args += ["-D", *prop]
    args += list(extra)
    try:
        proc = subprocess.run(args, input=data, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise MqttError(f"mosquitto_pub did not finish within {timeout}s: {exc.output!r}") from None
    output = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    m = _CONNACK.search(output)
    acks = tuple((kind, int(rc)) for kind, rc in _ACK.findall(output))
    ack_reason: int | None = None
    for _kind, rc in acks:
        ack_reason = rc
        if rc >= 0x80:
            break
    f = _PUB_FAILED.search(output)
    failure = f.group(1).rstrip(".") if f else None
    if failure is not None and failure in _REASON_NAMES:
        ack_reason = _REASON_NAMES[failure]  # a negative PUBREC's code is only printed as this text
    return PubResult(proc.returncode, output, int(m.group(1)) if m else None, ack_reason, acks, failure)


@dataclass(frozen=True, slots=True)
class SubMessage:
    """One message printed by mosquitto_sub."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


class MosquittoSub:
    """``mosquitto_sub`` in the background; see the module docstring."""

    def __init__(
        self,
        port: int,
        topics: Sequence[str],
        *,
        version: int = 5,
        qos: int = 0,
        count: int | None = None,
        wait_secs: int | None = None,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: CertBundle | None = None,
        client_cert: bool = False,
        clean: bool = True,
        will: Will | None = None,
        keepalive: int | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        args = ["mosquitto_sub", *_common_args(port, version, client_id, username, password, tls, client_cert,
                                               keepalive)]  # fmt: skip
        for t in topics:
            args += ["-t", t]
        args += ["-q", str(qos), "-F", f"{_MSG_PREFIX}\\t%q\\t%r\\t%x\\t%t"]
        if count is not None:
            args += ["-C", str(count)]
        if wait_secs is not None:
            args += ["-W", str(wait_secs)]
        if not clean:
            args.append("-c")
        if will is not None:
            args += ["--will-topic", will.topic, "--will-payload", will.payload.decode(), "--will-qos",
                     str(will.qos)]  # fmt: skip
            if will.retain:
                args.append("--will-retain")
        args += list(extra)
        self.args = args
        self.topics = tuple(topics)
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self.messages: list[SubMessage] = []
        self.granted: list[int] | None = None
        self.connack: int | None = None
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> MosquittoSub:
        """Start mosquitto_sub and wait for its SUBACK (or for the process to end, e.g. refused)."""
        # mosquitto_sub's stdout is block-buffered into a pipe: ask for line buffering (glibc stdio).
        prefix = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
        self.proc = subprocess.Popen(
            [*prefix, *self.args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, name="mosquitto_sub-reader", daemon=True)
        self._reader.start()
        self._wait(lambda: self.granted is not None or self._ended(), timeout, "SUBACK")
        return self

    def _ended(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None and not self._reader_alive()

    def _reader_alive(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                if line.startswith(_MSG_PREFIX + "\t"):
                    _, qos, retain, hexpayload, topic = line.split("\t", 4)
                    self.messages.append(
                        SubMessage(topic, bytes.fromhex(hexpayload), int(qos), retain == "1")
                    )
                elif line.startswith("Subscribed (mid: "):
                    self.granted = [int(x) for x in line.split("):", 1)[1].split(",")]
                else:
                    m = _CONNACK.search(line)
                    if m:
                        self.connack = int(m.group(1))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait(self, cond: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not cond():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MqttError(
                        f"mosquitto_sub: timed out after {timeout}s waiting for {what}:\n{self.output}"
                    )
                self._cond.wait(min(left, 0.1))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_messages(self, count: int, timeout: float = 10.0) -> list[SubMessage]:
        """The first ``count`` messages, once that many arrived."""
        self._wait(lambda: len(self.messages) >= count or self._ended(), timeout, f"{count} messages")
        if len(self.messages) < count:
            raise MqttError(f"mosquitto_sub ended after {len(self.messages)} messages:\n{self.output}")
        return self.messages[:count]

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the process to exit (``-C``/``-W``); returns its exit status."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MqttError(f"mosquitto_sub still running after {timeout}s:\n{self.output}") from None
        if self._reader is not None:
            self._reader.join(timeout)
        return rc

    def kill(self) -> None:
        """SIGKILL: the connection drops without DISCONNECT (the broker publishes the will)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.stop()

    def stop(self) -> None:
        """SIGTERM (mosquitto_sub disconnects cleanly), then SIGKILL after 5 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None and not self._reader_alive():
            self.proc.stdout.close()

    def __enter__(self) -> MosquittoSub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.proc is not None and self.proc.poll() is None else "stopped"
        return f"<MosquittoSub {state} topics={list(self.topics)} messages={len(self.messages)}>"


# ================================================================================================= paho
@dataclass(frozen=True, slots=True)
class Received:
    """One message a paho client received."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    properties: dict[str, Any] = field(default_factory=dict)
    """MQTT 5 properties present, as paho names and types them (``ContentType`` str, ``CorrelationData``
    bytes, ``UserProperty`` list of (name, value) tuples ...)."""


class PahoClient:
    """A paho-mqtt client on paho's network thread (no automatic reconnect), with blocking calls that return
    wire codes. paho does not report PUBREC reason codes: check a QoS 2 refusal with ``mosquitto_pub``."""

    def __init__(
        self,
        port: int,
        *,
        version: int = 5,
        client_id: str = "",
        username: str | None = None,
        password: str | bytes | None = None,
        tls: CertBundle | None = None,
        client_cert: bool = False,
        clean_start: bool = True,
        session_expiry: int | None = None,
        keepalive: int = 60,
        will: Will | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        import paho.mqtt.client as mqtt  # imported lazily: only MQTT tests need it

        self._mqtt = mqtt
        self.port = port
        self.host = host
        self.version = version
        self.keepalive = keepalive
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        protocol = {5: mqtt.MQTTv5, 4: mqtt.MQTTv311, 3: mqtt.MQTTv31}[version]
        kwargs: dict[str, Any] = {}
        if version != 5:
            kwargs["clean_session"] = clean_start
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set(
                ca_certs=str(tls.ca_cert),
                certfile=str(tls.client_cert) if client_cert else None,
                keyfile=str(tls.client_key) if client_cert else None,
            )
        if will is not None:
            props = None
            if will.delay_interval is not None and version == 5:
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                props = Properties(PacketTypes.WILLMESSAGE)
                props.WillDelayInterval = will.delay_interval
            self.client.will_set(will.topic, will.payload, will.qos, will.retain, props)
        self._cond = threading.Condition()
        self.connack: int | None = None
        self.connected = False
        self.disconnected = False
        self.disconnect_reason: int | None = None
        self.messages: list[Received] = []
        self._subacks: dict[int, list[int]] = {}
        self._acks: dict[int, int] = {}
        self._thread_started = False
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe
        c.on_publish = self._on_publish
        self.log: list[str] = []
        """paho's log lines (the last ones are attached to errors)."""
        c.on_log = self._on_log

    # -- callbacks (paho's network thread) ------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._cond:
            code = int(reason.value)
            if self.version != 5:
                code = _V3_CONNACK.get(str(reason), code)
            self.connack = code
            self.connected = code == 0
            self._cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        # The socket is already closed: this only marks the client disconnected, so that paho's network
        # thread does not reconnect by itself (an extra CONNECT no test asked for).
        client.disconnect()
        with self._cond:
            self.connected = False
            self.disconnected = True
            self.disconnect_reason = int(reason.value)
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props: dict[str, Any] = {}
        p = getattr(msg, "properties", None)
        if p is not None:
            for spaced in p.names:
                name = spaced.replace(" ", "")
                if hasattr(p, name):
                    props[name] = getattr(p, name)
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain),
                                          bool(msg.dup), props))  # fmt: skip
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        with self._cond:
            self._subacks[mid] = [int(r.value) for r in reasons]
            self._cond.notify_all()

    def _on_unsubscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        with self._cond:
            self._subacks[mid] = [int(r.value) for r in reasons] if isinstance(reasons, list) else []
            self._cond.notify_all()

    def _on_log(self, client: Any, userdata: Any, level: int, text: str) -> None:
        with self._cond:
            self.log.append(text)
            del self.log[:-200]

    def _error(self, message: str) -> MqttError:
        with self._cond:
            tail = "\n".join(self.log[-20:])
        return MqttError(f"{message}\npaho log:\n{tail}")

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._cond:
            self._acks[mid] = int(reason.value)
            self._cond.notify_all()

    # -- waiting -----------------------------------------------------------------------------------
    def _wait(self, cond: Callable[[], T | None], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = cond()
                if value is not None and value is not False:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._error(f"paho client: timed out after {timeout}s waiting for {what}")
                self._cond.wait(min(left, 0.1))

    # -- blocking API ------------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0, properties: dict[str, Any] | None = None) -> int:
        """Connect and wait for the CONNACK; returns its code (0 = accepted; 3.1.1 return codes for v3.1.1).
        A refused or dropped connection returns its code or raises ``MqttError`` when none arrived."""
        mqtt = self._mqtt
        props = None
        if self.version == 5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            if self.session_expiry is not None:
                props.SessionExpiryInterval = self.session_expiry
            for name, value in (properties or {}).items():
                setattr(props, name, value)
        kwargs: dict[str, Any] = {"properties": props}
        if self.version == 5:
            kwargs["clean_start"] = self.clean_start
        with self._cond:
            self.connack = None
            self.disconnected = False
        rc = self.client.connect(self.host, self.port, self.keepalive, **kwargs)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise self._error(f"paho connect failed: {rc}")
        self._start_network()
        return self._wait(
            lambda: self.connack if self.connack is not None else (-1 if self.disconnected else None),
            timeout,
            "CONNACK",
        )

    def subscribe(
        self,
        topic_filter: str | Sequence[tuple[str, int]],
        qos: int = 0,
        timeout: float = 10.0,
        **options: Any,
    ) -> list[int]:
        """Subscribe and wait for the SUBACK; returns its codes (granted QoS, or >= 0x80 refusals).
        ``options`` (MQTT 5): ``no_local``, ``retain_as_published``, ``retain_handling``."""
        mqtt = self._mqtt
        if isinstance(topic_filter, str):
            if self.version == 5:
                from paho.mqtt.subscribeoptions import SubscribeOptions

                target: Any = [(topic_filter, SubscribeOptions(qos=qos, **options))]
            else:
                target = [(topic_filter, qos)]
        else:
            target = list(topic_filter)
        rc, mid = self.client.subscribe(target)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise self._error(f"paho subscribe failed: {rc}")
        return self._wait(lambda: self._subacks.get(mid), timeout, f"SUBACK {mid}")

    def unsubscribe(self, topic_filter: str, timeout: float = 10.0) -> list[int]:
        rc, mid = self.client.unsubscribe(topic_filter)
        if rc != self._mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise self._error(f"paho unsubscribe failed: {rc}")
        return self._wait(lambda: self._subacks.get(mid), timeout, f"UNSUBACK {mid}")

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        retain: bool = False,
        timeout: float = 10.0,
        properties: dict[str, Any] | None = None,
    ) -> int:
        """Publish and wait until paho reports it done: QoS 0 written, QoS 1 PUBACK, QoS 2 PUBCOMP (or a
        PUBREC >= 0x80). Returns the reason code (always 0 on 3.1.1)."""
        props = None
        if properties and self.version == 5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.PUBLISH)
            for name, value in properties.items():
                setattr(props, name, value)
        info = self.client.publish(topic, payload, qos, retain, props)
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
            raise self._error(f"paho publish failed: {info.rc}")
        mid = info.mid
        return self._wait(lambda: self._acks.get(mid), timeout, f"acknowledgement of message {mid}")

    def wait_messages(self, count: int, timeout: float = 10.0) -> list[Received]:
        """The first ``count`` received messages, once that many arrived."""
        self._wait(lambda: len(self.messages) >= count or None, timeout, f"{count} messages")
        with self._cond:
            return self.messages[:count]

    def wait_disconnected(self, timeout: float = 10.0) -> int:
        """Wait until the connection is gone; returns the DISCONNECT reason paho reported."""
        return self._wait(
            lambda: self.disconnect_reason if self.disconnected else None, timeout, "disconnect"
        )

    def disconnect(self, timeout: float = 10.0) -> None:
        """Send DISCONNECT (no will) and stop the network thread."""
        with self._cond:
            connected = self.connected
        if connected:
            self.client.disconnect()
            self.wait_disconnected(timeout)
        self._stop_network()

    def drop(self) -> None:
        """Close the socket without DISCONNECT (the broker publishes the will)."""
        self._stop_network()

    # -- the network thread ------------------------------------------------------------------------
    def _start_network(self) -> None:
        if self._thread_started:
            return
        self.client.loop_start()
        self._thread_started = True

    def _stop_network(self) -> None:
        if self._thread_started:
            self.client.loop_stop()
            self._thread_started = False
        # Close the connection socket and paho's wake-up socket pair now, not at garbage collection (the
        # client sits in a reference cycle with our callbacks); paho's own __del__ does the same.
        self.client._reset_sockets()

    # -- asyncio twins (``within``: the same deadline as the blocking call's ``timeout``) --------------
    async def aconnect(self, within: float = 10.0) -> int:
        return await asyncio.to_thread(self.connect, within)

    async def asubscribe(self, topic_filter: str, qos: int = 0, within: float = 10.0) -> list[int]:
        return await asyncio.to_thread(self.subscribe, topic_filter, qos, within)

    async def apublish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        retain: bool = False,
        within: float = 10.0,
    ) -> int:
        return await asyncio.to_thread(self.publish, topic, payload, qos, retain, within)

    async def await_messages(self, count: int, within: float = 10.0) -> list[Received]:
        return await asyncio.to_thread(self.wait_messages, count, within)

    async def adisconnect(self, within: float = 10.0) -> None:
        await asyncio.to_thread(self.disconnect, within)

    def close(self) -> None:
        """Disconnect if connected; always stops the network thread."""
        try:
            self.disconnect(5.0)
        finally:
            self.drop()

    def __enter__(self) -> PahoClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<PahoClient v{self.version} {state} port={self.port} messages={len(self.messages)}>"


# ===================================================================================== bridge envelope
_bridge_module: ModuleType | None = None
_bridge_lock = threading.Lock()


def bridge_message_modules() -> ModuleType:
    """Generate (if stale) and import the ``microenvoy.bridge.v1.Message`` module (``message_pb2``)."""
    global _bridge_module
    with _bridge_lock:
        if _bridge_module is not None:
            return _bridge_module
        GENERATED_DIR.mkdir(exist_ok=True)
        init = GENERATED_DIR / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated at test time by the peers; not committed."""\n')
        out_dir = GENERATED_DIR / "bridge"
        out_dir.mkdir(exist_ok=True)
        digest = hashlib.sha256(BRIDGE_PROTO.read_bytes()).hexdigest()
        stamp = out_dir / "message.sha256"
        output = out_dir / "microenvoy" / "bridge" / "v1" / "message_pb2.py"
        with open(GENERATED_DIR / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (stamp.exists() and stamp.read_text() == digest and output.exists()):
                from grpc_tools import protoc  # imported lazily: it is heavy

                rc = protoc.main(
                    ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={out_dir}", str(BRIDGE_PROTO)]
                )
                if rc != 0:
                    raise RuntimeError(f"grpc_tools.protoc failed with exit code {rc} for {BRIDGE_PROTO}")
                stamp.write_text(digest)
        # Import by file path: ``microenvoy.bridge`` would otherwise resolve inside the real package.
        spec = importlib.util.spec_from_file_location("microenvoy_bridge_v1_message_pb2", output)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _bridge_module = module
        return module
