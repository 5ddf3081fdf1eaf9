"""The MQTT listener: one ``MqttConnection`` per TCP/TLS connection, driving the sans-IO codec and broker.

``MqttFront`` is the runtime of one ``mqtt_proxy`` config: the local broker (kept across reloads by the
server), the bridge (bridge routes on the HTTP engine) and the stats under ``mqtt.<stat_prefix>.``. An
``MqttConnection`` decodes packets (``codecs.mqtt``), hands them to the broker (``mqtt.broker``) and writes
what comes back, coalesced into one write per loop iteration.

Acknowledgements (PUBACK / PUBREC) are sent in the order the PUBLISHes arrived: a QoS 1/2 message that
matches a bridge route is acknowledged only after the upstream answered 2xx (then it is also delivered to
local subscribers); a failure gives a v5 negative ack with the mapped reason code, and closes a v3.1.1
connection without an ack so the client sends it again. Nothing is acknowledged that was not delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random as _random
import time
from collections import deque
from typing import Any, cast

from microenvoy.admin.stats import Counter, Scope, Store
from microenvoy.bridging.mqtt import BridgeContext
from microenvoy.codecs.mqtt.codec import MqttServerCodec
from microenvoy.codecs.mqtt.packets import (
    PROTOCOL_LEVEL_V5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Pingresp,
    Properties,
    ProtocolViolation,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)
from microenvoy.core.exchange import DownstreamInfo
from microenvoy.filters.network.mqtt_proxy import MqttProxy
from microenvoy.io.mqtt_bridge import BridgeOutcome, MqttBridge
from microenvoy.io.upstream import ClusterManager
from microenvoy.mqtt.auth import (
    AuthResult,
    ClientAcl,
    certificate_info,
    connack_refusal,
    load_authenticator,
    publish_denial,
)
from microenvoy.mqtt.broker import Broker, BrokerLimits
from microenvoy.mqtt.session import Delivery, SessionConfig

__all__ = ["MqttConnection", "MqttFront", "broker_limits"]

log = logging.getLogger("microenvoy.mqtt")

_WRITE_HIGH = 256 << 10
"""Above this many bytes queued on a connection's transport the client is congested: QoS 0 messages to it
are dropped by its session (``dropped_slow_consumer``) until the buffer drains."""
_MAX_QOS0_BRIDGED = 1024
"""Bridged QoS 0 messages in flight per listener; more are dropped (``dropped_bridge_busy``)."""
_MAX_BRIDGE_TASKS = 64
"""Bridged messages in flight per connection (QoS 1/2 are also bounded by our Receive Maximum)."""


def broker_limits(cfg: MqttProxy) -> BrokerLimits:
    """The broker bounds from the filter config."""
    return BrokerLimits(
        max_session_expiry_interval=cfg.max_session_expiry_interval,
        max_subscriptions_per_client=cfg.max_subscriptions_per_client,
        maximum_qos=cfg.maximum_qos,
        topic_alias_maximum=cfg.topic_alias_maximum,
        max_retained_messages=cfg.max_retained_messages,
        max_retained_bytes=cfg.max_retained_bytes,
        session=SessionConfig(
            max_inflight=cfg.max_inflight_messages,
            max_inflight_v5=cfg.max_inflight_messages,
            max_queued_messages=cfg.max_queued_messages,
        ),
    )


class _Stats:
    """``mqtt.<prefix>.`` counters of the listener (the broker and the bridge add their own)."""

    def __init__(self, scope: Scope) -> None:
        c, g = scope.counter, scope.gauge
        self.scope = scope
        self.cx_total = c("cx_total")
        self.cx_active = g("cx_active")
        self.connect_success = c("connect_success")
        self.connect_timeout = c("connect_timeout")
        self.keepalive_timeout = c("keepalive_timeout")
        self.malformed = c("malformed")
        self.protocol_error = c("protocol_error")
        self.packet_too_large = c("packet_too_large")
        self.publish_received = [c(f"publish_received_qos{q}") for q in range(3)]
        self.publish_sent = [c(f"publish_sent_qos{q}") for q in range(3)]
        self.dropped_too_large = c("dropped_packet_too_large")
        self.acks_delayed = c("acks_delayed")
        self.acks_negative = c("acks_negative")
        self.publish_denied = c("publish_denied")
        self.dropped_bridge_busy = c("dropped_bridge_busy")
        self.responses_published = c("responses_published")
        self.closed_undelivered = c("closed_undelivered")
        self._connect_failed: dict[int, Counter] = {}

    def connect_failed(self, reason: int) -> None:
        counter = self._connect_failed.get(reason)
        if counter is None:
            name = ReasonCode(reason).name.lower() if reason in ReasonCode._value2member_map_ else hex(reason)
            counter = self._connect_failed[reason] = self.scope.counter(f"connect_failed_{name}")
        counter.inc()


class MqttFront:
    """Runtime of one ``mqtt_proxy`` config (immutable once built, like ``HttpFront``)."""

    def __init__(
        self,
        config: MqttProxy,
        *,
        clusters: ClusterManager,
        stats: Store,
        listener_name: str,
        broker: Broker[MqttConnection] | None = None,
        rng: _random.Random | None = None,
        health: object = None,
    ) -> None:
        self.config = config
        self.listener_name = listener_name
        self.scope = stats.scope(f"mqtt.{config.stat_prefix}.")
        self.stats = _Stats(self.scope)
        self.random = rng or _random.Random()
        self.broker: Broker[MqttConnection] = (
            broker if broker is not None else Broker(broker_limits(config), self.scope, self.random)
        )
        self.bridge = (
            MqttBridge(
                config, clusters=clusters, stats=stats, listener_name=listener_name, rng=rng, health=health
            )
            if config.routes
            else None
        )
        self._tick: asyncio.TimerHandle | None = None
        self._tick_at: float | None = None
        self.detached: set[asyncio.Task[None]] = set()
        """Bridged QoS 0 exchanges, which outlive the connection they came from."""
        self.auth = load_authenticator(config.auth)
        """Authentication and ACLs (``auth`` block; none: anonymous clients, everything allowed)."""
        self.slow_auth = self.auth.passwords is not None
        """Password checks hash for tens of milliseconds: they run in a worker thread."""

    def __repr__(self) -> str:
        return f"<MqttFront {self.config.stat_prefix!r} sessions={len(self.broker.sessions)}>"

    # -- writing what the broker returns ---------------------------------------------------------
    def deliver(self, deliveries: list[Delivery[MqttConnection]]) -> None:
        for d in deliveries:
            d.connection.send_delivery(d.packet)
        self.schedule_tick()

    def publish_wills(self, wills: list[tuple[str, Publish]]) -> None:
        """Wills were routed locally by the broker; those matching a bridge route also go upstream."""
        if self.bridge is None:
            return
        for client_id, will in wills:
            if self.bridge.matches(will.topic):
                ctx = BridgeContext(self.listener_name.encode(), client_id, "", False, PROTOCOL_LEVEL_V5)
                down = DownstreamInfo("MQTT", ("0.0.0.0", 0), ("0.0.0.0", 0), self.listener_name)
                task = asyncio.get_running_loop().create_task(self.bridge.send(will, ctx, down))
                task.add_done_callback(_retrieve)

    # -- broker timers (will delay, session expiry, retained expiry) ------------------------------
    def schedule_tick(self) -> None:
        when = self.broker.next_deadline()
        if when is None or (self._tick_at is not None and self._tick_at <= when):
            return
        loop = asyncio.get_running_loop()
        if self._tick is not None:
            self._tick.cancel()
        self._tick_at = when
        self._tick = loop.call_at(max(loop.time(), _loop_time(when)), self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        self._tick_at = None
        batch = self.broker.tick(time.monotonic())
        self.deliver(batch.deliveries)
        self.publish_wills(batch.wills)

    def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None


def _allows_all(front: MqttFront) -> bool:
    """No ACL configured: nothing to check per packet."""
    return front.config.auth is None or not front.config.auth.has_acl


def _loop_time(monotonic: float) -> float:
    """Broker deadlines are ``time.monotonic()`` values; the loop's clock may differ by an offset."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic - time.monotonic())


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("bridging a will failed: %r", task.exception())


class _PendingAck:
    """An incoming QoS 1/2 PUBLISH waiting for its turn to be acknowledged (acks go out in order)."""

    __slots__ = ("done", "packet_id", "qos", "reason")

    def __init__(self, packet_id: int, qos: int) -> None:
        self.packet_id = packet_id
        self.qos = qos
        self.reason = 0
        self.done = False


class MqttConnection(asyncio.Protocol):
    """One MQTT client connection (see the module docstring)."""

    def __init__(self, listener: Any, front: MqttFront) -> None:
        self.listener = listener
        self.front = front
        cfg = front.config
        self.codec = MqttServerCodec(cfg.max_packet_size)
        self.transport: asyncio.Transport | None = None
        self.downstream: DownstreamInfo
        self.client_id = ""
        self.connected = False
        self.closed = False
        self._connack_sent = False
        self._v5 = False
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._keepalive = 0.0
        self._last_rx = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._acks: deque[_PendingAck] = deque()
        self._unacked = 0
        """Incoming QoS 1/2 PUBLISHes counting against our Receive Maximum: QoS 1 until its PUBACK, QoS 2
        until its PUBCOMP (or a negative PUBREC)."""
        self._qos2_open: set[int] = set()
        """Packet ids of incoming QoS 2 PUBLISHes on this connection not yet completed by PUBCOMP."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._batched = 0
        """QoS 1/2 messages of this connection waiting in a bridge batch."""
        self._ctx: BridgeContext | None = None
        self._counted = False
        self._paused = False
        self._acl: ClientAcl | None = None
        self._held: list[Any] | None = None
        """Packets that arrived while the CONNECT is being authenticated (handled after the CONNACK)."""
        self._disconnect_reason: int | None = None
        """The client's DISCONNECT reason (None: the connection just went away: the will is sent)."""

    def __repr__(self) -> str:
        return f"<MqttConnection {self.client_id or '-'} {self.codec!r}>"

    # ------------------------------------------------------------------------- asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH)
        lst = self.listener
        if lst.max_connections is not None and len(lst.connections) >= lst.max_connections:
            lst.stats.cx_overflow.inc()
            self.transport.abort()
            self.closed = True
            return
        lst.connections.add(self)
        self._counted = True
        lst.stats.cx_total.inc()
        lst.stats.cx_active.inc()
        self.front.stats.cx_total.inc()
        self.front.stats.cx_active.inc()
        sslobj = transport.get_extra_info("ssl_object")
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.downstream = DownstreamInfo(
            "MQTT", (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1])), lst.name, sslobj is not None
        )
        self._last_rx = time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(self.front.config.connect_timeout, self._on_timer)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._last_rx = time.monotonic()
        for item in self.codec.receive_data(data):
            if self.closed:
                return
            if self._held is not None:
                self._held.append(item)  # CONNECT still being authenticated
                continue
            if isinstance(item, ProtocolViolation):
                self._violation(item)
                return
            self._dispatch(item)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self._paused = True
        if self.connected:  # its session drops QoS 0 (so topic aliases stay in step)
            self.front.broker.set_congested(self.client_id, self, True)

    def resume_writing(self) -> None:
        self._paused = False
        if self.connected:
            self.front.broker.set_congested(self.client_id, self, False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in self._tasks:
            task.cancel()  # unacknowledged messages stay unacknowledged: the client sends them again
        if self._counted:
            self._counted = False
            self.listener.connections.discard(self)
            self.listener.stats.cx_active.dec()
            self.front.stats.cx_active.dec()
        if self.connected:
            self.connected = False
            front = self.front
            batch = front.broker.disconnect(
                self.client_id, self, time.monotonic(), reason_code=self._disconnect_reason
            )
            front.deliver(batch.deliveries)
            front.publish_wills(batch.wills)

    # ------------------------------------------------------------------------------- writing
    def _send(self, packet: Any) -> None:
        data = self.codec.encode(packet)
        if data is None:
            self.front.stats.dropped_too_large.inc()
            return
        if data:
            self._out.append(data)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def send_delivery(self, packet: Publish | Pubrel) -> None:
        """A broker delivery for this client (PUBLISH or PUBREL)."""
        if self.closed:
            return
        if isinstance(packet, Publish):
            self.front.stats.publish_sent[packet.qos].inc()
        self._send(packet)

    def _close(self, reason: int | None = None) -> None:
        """Close after what is queued (v5 DISCONNECT with ``reason`` first when given)."""
        if self.closed:
            return
        if reason is not None and self._v5 and self._connack_sent:
            self._send(Disconnect(reason))
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def drain(self) -> None:
        """Listener drain: v5 clients get DISCONNECT 0x8B (server shutting down)."""
        self._close(ReasonCode.SERVER_SHUTTING_DOWN)

    # ------------------------------------------------------------------------------- timers
    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        if not self.connected:
            self.front.stats.connect_timeout.inc()
            self._close()
            return
        if self._keepalive <= 0:
            return
        idle = time.monotonic() - self._last_rx
        limit = self._keepalive * 1.5  # [MQTT-3.1.2-22]
        if idle >= limit:
            self.front.stats.keepalive_timeout.inc()
            self._close(ReasonCode.KEEP_ALIVE_TIMEOUT)
            return
        self._timer = loop.call_later(limit - idle, self._on_timer)

    # ------------------------------------------------------------------------------ packets
    def _violation(self, v: ProtocolViolation) -> None:
        st = self.front.stats
        if v.reason_code == ReasonCode.MALFORMED_PACKET:
            st.malformed.inc()
        elif v.reason_code == ReasonCode.PACKET_TOO_LARGE:
            st.packet_too_large.inc()
        else:
            st.protocol_error.inc()
        log.debug("mqtt %s: %s (0x%02x)", self.downstream.remote_address, v.message, v.reason_code)
        data = self.codec.violation_response(v, connack_sent=self._connack_sent)
        if data:
            self._out.append(data)
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _dispatch(self, p: Any) -> None:
        if isinstance(p, Publish):
            self._on_publish(p)
        elif isinstance(p, Puback):
            self.front.deliver(self.front.broker.puback(self.client_id, p.packet_id, time.monotonic()))
        elif isinstance(p, Pubrec):
            self.front.deliver(
                self.front.broker.pubrec(self.client_id, p.packet_id, p.reason_code, time.monotonic())
            )
        elif isinstance(p, Pubrel):
            if p.packet_id in self._qos2_open:
                self._qos2_open.discard(p.packet_id)
                self._unacked -= 1
            ok = self.front.broker.pubrel(self.client_id, p.packet_id)
            self._send(Pubcomp(p.packet_id, 0 if ok else ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))
        elif isinstance(p, Pubcomp):
            self.front.deliver(self.front.broker.pubcomp(self.client_id, p.packet_id, time.monotonic()))
        elif isinstance(p, Pingreq):
            self._send(Pingresp())
        elif isinstance(p, Subscribe):
            self._on_subscribe(p)
        elif isinstance(p, Unsubscribe):
            self._send(Unsuback(p.packet_id, self.front.broker.unsubscribe(self.client_id, p)))
        elif isinstance(p, Connect):
            self._on_connect(p)
        elif isinstance(p, Disconnect):
            self._disconnect_reason = p.reason_code
            if p.properties.session_expiry_interval is not None and self.connected:
                self.connected = False
                front = self.front
                batch = front.broker.disconnect(
                    self.client_id,
                    self,
                    time.monotonic(),
                    reason_code=p.reason_code,
                    session_expiry_interval=p.properties.session_expiry_interval,
                )
                front.deliver(batch.deliveries)
                front.publish_wills(batch.wills)
            self._close()
        elif isinstance(p, Auth):
            self._close(ReasonCode.BAD_AUTHENTICATION_METHOD)  # no enhanced authentication methods

    def _on_connect(self, p: Connect) -> None:
        front = self.front
        self._v5 = p.protocol_level == PROTOCOL_LEVEL_V5
        if p.properties.authentication_method is not None:
            front.stats.connect_failed(ReasonCode.BAD_AUTHENTICATION_METHOD)
            self._reject(ReasonCode.BAD_AUTHENTICATION_METHOD)
            return
        cert = None
        if self.transport is not None and self.downstream.tls:
            sslobj = self.transport.get_extra_info("ssl_object")
            cert = certificate_info(sslobj.getpeercert() if sslobj is not None else None)
        auth = front.auth
        if not front.slow_auth:
            self._connect_authenticated(p, auth.authenticate(p.username, p.password, cert))
            return
        self._held = []
        task = asyncio.get_running_loop().create_task(self._authenticate(p, cert))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _authenticate(self, p: Connect, cert: Any) -> None:
        auth = self.front.auth
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, auth.authenticate, p.username, p.password, cert)
        held, self._held = self._held or [], None
        if self.closed:
            return
        self._connect_authenticated(p, result)
        for item in held:
            if self.closed:
                return
            if isinstance(item, ProtocolViolation):
                self._violation(item)
                return
            self._dispatch(item)
        self._flush()

    def _connect_authenticated(self, p: Connect, auth: AuthResult) -> None:
        front = self.front
        cfg = front.config
        if auth.principal is None:
            assert auth.failure is not None
            reason = connack_refusal(auth.failure, PROTOCOL_LEVEL_V5)  # the codec maps it for 3.1.1
            front.stats.connect_failed(reason)
            self._reject(reason)
            return
        if p.will is not None and not _allows_all(front):
            # A will is a publish the client makes by leaving: its topic needs publish rights (mosquitto too).
            if not front.auth.authorizer(auth.principal, p.client_id).can_publish(p.will.topic):
                front.stats.connect_failed(ReasonCode.NOT_AUTHORIZED)
                self._reject(ReasonCode.NOT_AUTHORIZED)
                return
        result = front.broker.connect(p, self, time.monotonic())
        if result.reason_code:
            front.stats.connect_failed(result.reason_code)
            self._reject(result.reason_code)
            return
        old = result.taken_over
        if old is not None and old is not self:
            old._close(ReasonCode.SESSION_TAKEN_OVER)
        self.client_id = result.client_id
        self.connected = True
        if not _allows_all(front):
            self._acl = front.auth.authorizer(auth.principal, self.client_id)
            session = front.broker.sessions.get(self.client_id)
            if session is not None:  # deliveries on subscriptions a deny rule overlaps are checked one by one
                session.can_read = self._acl.can_read
        front.stats.connect_success.inc()
        keepalive = p.keep_alive
        server_keepalive: int | None = None
        # Only a v5 client can be told (Server Keep Alive, [MQTT-3.2.2-21]); a v3.1.1 client keeps its own
        # value, or a conformant client pinging at its own interval would be cut off.
        if self._v5 and cfg.max_keepalive and (keepalive == 0 or keepalive > cfg.max_keepalive):
            keepalive = server_keepalive = cfg.max_keepalive
        self._keepalive = float(keepalive)
        props = Properties()
        if self._v5:
            props = Properties(
                session_expiry_interval=result.session_expiry_interval,
                assigned_client_identifier=result.assigned_client_id,
                server_keep_alive=server_keepalive,
                receive_maximum=cfg.receive_maximum,
                topic_alias_maximum=result.topic_alias_maximum or None,
                maximum_packet_size=cfg.max_packet_size,
                maximum_qos=cfg.maximum_qos if cfg.maximum_qos < 2 else None,
                retain_available=None if cfg.retain_available else 0,
            )
        self._send(Connack(result.session_present, 0, props))
        self._connack_sent = True
        self._ctx = BridgeContext(
            authority=(cfg.authority or self.listener.name).encode(),
            client_id=self.client_id,
            principal=str(auth.principal),
            tls=self.downstream.tls,
            protocol_level=p.protocol_level,
        )
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._keepalive > 0:
            self._timer = asyncio.get_running_loop().call_later(self._keepalive * 1.5, self._on_timer)
        front.deliver(result.deliveries)
        front.publish_wills(result.wills)

    def _reject(self, reason: int) -> None:
        self._send(Connack(False, reason))
        self._connack_sent = True
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _on_subscribe(self, p: Subscribe) -> None:
        front = self.front
        acl = self._acl
        out = front.broker.subscribe(
            self.client_id,
            p,
            time.monotonic(),
            acl.can_subscribe if acl is not None else None,
            acl.delivery_check_needed if acl is not None else None,
        )
        if out.disconnect_reason is not None:
            self._close(out.disconnect_reason)
            return
        self._send(Suback(p.packet_id, out.reason_codes))
        front.deliver(out.deliveries)

    def _on_publish(self, p: Publish) -> None:
        front = self.front
        resolved = front.broker.resolve_topic(self.client_id, p)
        if isinstance(resolved, int):
            self._close(resolved)
            return
        p = resolved
        front.stats.publish_received[p.qos].inc()
        if self._acl is not None and not self._acl.can_publish(p.topic):
            front.stats.publish_denied.inc()
            denial = publish_denial(PROTOCOL_LEVEL_V5 if self._v5 else 4, p.qos)
            if denial.send_ack and p.packet_id is not None:
                if p.qos == 1:
                    self._send(Puback(p.packet_id, denial.reason_code))
                else:
                    self._send(Pubrec(p.packet_id, denial.reason_code))
            return
        bridge = front.bridge
        bridged = bridge is not None and bridge.matches(p.topic)
        if bridged and p.qos == 2:
            assert p.packet_id is not None
            session = front.broker.sessions.get(self.client_id)
            if session is not None and not session.receive_qos2(p.packet_id):
                # A retransmission: still in flight -> its PUBREC comes; already answered -> answer again.
                if not any(a.packet_id == p.packet_id for a in self._acks):
                    self._send(Pubrec(p.packet_id, 0))
                return
        pending: _PendingAck | None = None
        if p.qos:
            assert p.packet_id is not None
            if not (p.qos == 2 and p.packet_id in self._qos2_open):  # a QoS 2 retransmission counts once
                if self._unacked >= front.config.receive_maximum and self._v5:
                    self._close(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)  # section 3.3.4, [MQTT-3.3.4-7]
                    return
                self._unacked += 1
                if p.qos == 2:
                    self._qos2_open.add(p.packet_id)
            pending = _PendingAck(p.packet_id, p.qos)
            self._acks.append(pending)
        if bridged and pending is None:
            # QoS 0 has no ack to withhold: it is bridged even if the client disconnects meanwhile (the
            # front keeps the task), within a bound per listener; beyond it the message is dropped.
            if len(front.detached) >= _MAX_QOS0_BRIDGED:
                front.stats.dropped_bridge_busy.inc()
                return
            task = asyncio.get_running_loop().create_task(self._bridge(p, None))
            front.detached.add(task)
            task.add_done_callback(front.detached.discard)
            return
        if bridged and len(self._tasks) + self._batched < _MAX_BRIDGE_TASKS:
            front.stats.acks_delayed.inc()
            assert bridge is not None
            assert self._ctx is not None
            if p.properties.message_expiry_interval is None and bridge.enqueue(
                p, self._ctx, self.downstream, lambda outcome: self._bridged(p, pending, outcome)
            ):
                self._batched += 1  # a batched route: answered by callback, no task per message
                return
            # QoS 1/2: cancelled with the connection (never acknowledged: the client sends it again).
            task = asyncio.get_running_loop().create_task(self._bridge(p, pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if bridged:
            # Too many bridged messages in flight on this connection: treat as a quota failure.
            self._finish(pending, ReasonCode.QUOTA_EXCEEDED)
            return
        self._finish(pending, self._route_locally(p))

    def _route_locally(self, p: Publish) -> int:
        out = self.front.broker.publish(self.client_id, p, time.monotonic())
        self.front.deliver(out.deliveries)
        return out.reason_code

    async def _bridge(self, p: Publish, pending: _PendingAck | None) -> None:
        bridge = self.front.bridge
        assert bridge is not None
        assert self._ctx is not None
        expires_in = None
        if p.properties.message_expiry_interval is not None:
            expires_in = float(p.properties.message_expiry_interval)
        try:
            outcome = await bridge.send(p, self._ctx, self.downstream, expires_in=expires_in)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("mqtt bridge failed for %s", p.topic)
            outcome = None
        self._after_bridge(p, pending, outcome)

    def _bridged(self, p: Publish, pending: _PendingAck | None, outcome: BridgeOutcome) -> None:
        """A batched message's answer (a callback from the bridge)."""
        self._batched -= 1
        if self.closed and pending is not None:
            # The client is gone: no ack; delivered upstream or not, it sends the message again.
            if outcome.reason_code == 0:
                out = self.front.broker.inject(p, time.monotonic(), origin=self.client_id)
                self.front.deliver(out.deliveries)
            return
        self._after_bridge(p, pending, outcome)

    def _after_bridge(self, p: Publish, pending: _PendingAck | None, outcome: BridgeOutcome | None) -> None:
        reason = ReasonCode.UNSPECIFIED_ERROR if outcome is None else outcome.reason_code
        now = time.monotonic()
        if reason == 0:  # delivered upstream: local subscribers get it too
            out = self.front.broker.inject(p, now, origin=self.client_id)
            self.front.deliver(out.deliveries)
        if outcome is not None and outcome.result is not None and p.properties.response_topic is not None:
            self._respond(p, outcome.result)
        self._finish(pending, reason)

    def _respond(self, request: Publish, result: Any) -> None:
        """MQTT 5 request/response: the upstream's answer goes to the Response Topic with the request's
        Correlation Data, its content type, and the HTTP status as user property ``status``."""
        ctype = result.headers.get(b"content-type")
        props = Properties(
            correlation_data=request.properties.correlation_data,
            content_type=ctype.decode("latin-1") if ctype else None,
            user_properties=(("status", str(result.status)),),
        )
        assert request.properties.response_topic is not None
        response = Publish(
            request.properties.response_topic, result.body, min(request.qos, 1), properties=props
        )
        out = self.front.broker.inject(response, time.monotonic())
        self.front.stats.responses_published.inc()
        self.front.deliver(out.deliveries)

    def _finish(self, pending: _PendingAck | None, reason: int) -> None:
        if pending is None:
            return
        pending.reason = reason
        pending.done = True
        acks = self._acks
        while acks and acks[0].done:
            a = acks.popleft()
            code = a.reason
            if a.qos == 1:
                self._unacked -= 1
            elif code >= 0x80 and a.packet_id in self._qos2_open:
                self._qos2_open.discard(a.packet_id)  # a negative PUBREC ends the QoS 2 flow
                self._unacked -= 1
            if code >= 0x80:
                self.front.stats.acks_negative.inc()
                if not self._v5:
                    # MQTT 3.1.1 has no negative acks: close so the client sends the message again.
                    self.front.stats.closed_undelivered.inc()
                    self._close()
                    return
                if a.qos == 2:
                    with contextlib.suppress(Exception):
                        self.front.broker.pubrel(self.client_id, a.packet_id)  # the QoS 2 flow ends here
            if code == ReasonCode.NO_MATCHING_SUBSCRIBERS and not self._v5:
                code = 0
            self._send(Puback(a.packet_id, code) if a.qos == 1 else Pubrec(a.packet_id, code))
