"""Per-client MQTT session state of the local broker (sans-IO; ``now`` is an argument).

Theory of operation. A :class:`Session` outlives network connections (MQTT 5.0 section 4.1): it holds the
client's subscriptions, the messages on their way to it and the QoS 2 packet ids it has sent us. A connection
*attaches* to it (:meth:`Session.attach`) and *detaches* (:meth:`Session.detach`); everything tied to one
network connection (topic aliases both ways, the client's Receive Maximum, Topic Alias Maximum and Maximum
Packet Size) is reset on attach.

Outgoing (server -> client) messages, section 4.3 and 4.9:

* :meth:`Session.deliver` takes a :class:`QueuedMessage` already shaped for this client (granted QoS, RETAIN
  as the subscription says, subscription identifiers). QoS 0 goes out at once when connected (while offline it
  is dropped unless ``queue_qos0_offline``). QoS 1/2 get a packet id (1..65535, never one still in flight
  [MQTT-2.2.1-3]) and go out while fewer than the *window* are unacknowledged: the client's Receive Maximum
  (v5, capped by ``max_inflight_v5``) or ``max_inflight`` (v3.1.1) [MQTT-3.3.4-9]; the rest wait in the
  queue, bounded by ``max_queued_messages``/``max_queued_bytes`` (a message over a bound is dropped and
  counted in ``dropped_queue_full``).
* QoS 1: PUBLISH -> PUBACK frees the id. QoS 2: PUBLISH -> PUBREC (reason < 0x80) -> we send PUBREL -> PUBCOMP
  frees it; a PUBREC with a reason >= 0x80 ends the flow and frees it at once [MQTT-4.3.3-*].
* Redelivery is not time based in MQTT 5: when a connection attaches to a session that has unacknowledged
  messages, every unacknowledged PUBLISH is sent again with DUP 1 [MQTT-3.3.1-1] and every PUBREL again
  [MQTT-4.4.0-1], in their original order, before the queue moves on. v3.1.1 is handled the same way.
* Message expiry (section 3.3.2.3.3): a queued message whose Message Expiry Interval has passed is dropped
  before it is sent [MQTT-3.3.2-5] (``dropped_expired``); one that is sent carries the interval minus the time
  it waited [MQTT-3.3.2-6]. A message already in flight is completed even if it expires.
* Maximum Packet Size (v5): a PUBLISH larger than the client accepts is discarded as if it had been delivered
  [MQTT-3.1.2-25] (``dropped_too_large``).
* Topic aliases server -> client (v5): with the client's Topic Alias Maximum > 0, each topic gets an alias;
  the first PUBLISH carries topic and alias, later ones an empty topic and the alias; when all aliases are in
  use the least recently used one is re-mapped (the PUBLISH then carries topic and alias again). Aliases are
  assigned as packets are handed to the listener, so the listener must write every delivery, in order.

Incoming (client -> server):

* Topic aliases client -> server (v5, section 3.3.2.3.4): :meth:`Session.resolve_topic` registers and looks
  them up; alias 0 or above our Topic Alias Maximum is 0x94 [MQTT-3.3.2-9]; an empty topic with an unknown
  alias is a Protocol Error 0x82 [MQTT-3.3.4-?].
* QoS 2 (section 4.3.3, method B): :meth:`Session.receive_qos2` records the packet id on the first PUBLISH
  (deliver it) and reports a retransmission (answer PUBREC again, do not deliver again) until
  :meth:`Session.release_qos2` (PUBREL) frees it [MQTT-4.3.3-10].
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from microenvoy.admin.stats import Scope, Store
from microenvoy.codecs.mqtt.packets import (
    EMPTY_PROPERTIES,
    PROTOCOL_LEVEL_V5,
    Properties,
    Publish,
    Pubrel,
    ReasonCode,
    Will,
)
from microenvoy.mqtt.sizes import message_size, publish_wire_size

__all__ = [
    "NEVER_EXPIRES",
    "Delivery",
    "QueuedMessage",
    "Session",
    "SessionConfig",
    "SessionStats",
    "SubscriptionEntry",
]

C = TypeVar("C")

NEVER_EXPIRES = 0xFFFFFFFF
"""Session Expiry Interval meaning "the session does not expire" (MQTT 5.0 section 3.1.2.11.2)."""

_MAX_PACKET_ID = 65535


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Per-session bounds (Envoy-style defaults sized for an edge device)."""

    max_inflight: int = 20
    """Outgoing QoS 1/2 window for v3.1.1 clients (mosquitto's ``max_inflight_messages`` default)."""
    max_inflight_v5: int = 1024
    """Cap on a v5 client's Receive Maximum used as the outgoing window (the server may send fewer)."""
    max_queued_messages: int = 1000
    """Messages waiting per session (offline, or beyond the window); mosquitto's ``max_queued_messages``."""
    max_queued_bytes: int = 1 << 20
    """Bytes waiting per session (see :func:`microenvoy.mqtt.sizes.message_size`)."""
    queue_qos0_offline: bool = False
    """Queue QoS 0 messages for offline persistent sessions (the spec allows either; mosquitto: off)."""
    server_topic_aliases: bool = True
    """Assign topic aliases server -> client when the client allows them (v5)."""


@dataclass(frozen=True, slots=True)
class SubscriptionEntry:
    """One subscription of a session, with its options (MQTT 5.0 section 3.8.3.1)."""

    client_id: str
    """The subscribing client."""
    topic_filter: str
    """The filter as subscribed (``$share/<group>/<filter>`` for a shared subscription)."""
    filter: str
    """The topic filter proper (the part after the ShareName for a shared subscription)."""
    group: str | None
    """ShareName of a shared subscription, else None."""
    qos: int
    """Granted maximum QoS."""
    no_local: bool = False
    """Do not forward the client's own publications (v5)."""
    retain_as_published: bool = False
    """Keep the RETAIN flag as published when forwarding (v5); otherwise it is 0."""
    retain_handling: int = 0
    """0 send retained messages on subscribe, 1 only if the subscription is new, 2 never (v5)."""
    subscription_id: int | None = None
    read_check: bool = False
    """The client's ACL must be asked before each delivery on this subscription (an allow rule covers the
    filter but a deny rule overlaps it): ``Session.can_read``."""
    """Subscription Identifier (v5), attached to every message sent for this subscription."""


@dataclass(slots=True)
class QueuedMessage:
    """A message on its way to one client: shaped for it (QoS, RETAIN, subscription ids), no packet id."""

    publish: Publish
    """Full topic, no topic alias, no packet id, DUP 0; properties as they go out (bar expiry/alias)."""
    expires_at: float | None = None
    """When its Message Expiry Interval runs out; None when it has none."""
    share: tuple[str, str] | None = None
    """(ShareName, filter) when it was sent for a shared subscription (for redispatch)."""
    size: int = 0
    """Bytes it is accounted for while queued (set when queued)."""


@dataclass(frozen=True, slots=True)
class Delivery(Generic[C]):
    """A packet for the listener to encode and write on ``connection``."""

    connection: C
    """The listener's handle of the client's current connection."""
    client_id: str
    """The receiving client."""
    packet: Publish | Pubrel
    """PUBLISH (new or a DUP retransmission) or PUBREL (QoS 2 retransmission or answer to a PUBREC)."""


class SessionStats:
    """The stats every session updates (looked up once from the broker's scope)."""

    __slots__ = (
        "dropped_expired",
        "dropped_qos0_offline",
        "dropped_queue_full",
        "dropped_slow_consumer",
        "dropped_too_large",
        "inflight",
        "queued",
    )

    def __init__(self, scope: Scope | None = None) -> None:
        s = scope if scope is not None else Store().scope("mqtt")
        self.inflight = s.gauge("inflight")
        self.queued = s.gauge("queued")
        self.dropped_queue_full = s.counter("dropped_queue_full")
        self.dropped_expired = s.counter("dropped_expired")
        self.dropped_too_large = s.counter("dropped_too_large")
        self.dropped_qos0_offline = s.counter("dropped_qos0_offline")
        self.dropped_slow_consumer = s.counter("dropped_slow_consumer")

    def __repr__(self) -> str:
        return f"<SessionStats inflight={self.inflight.value} queued={self.queued.value}>"


@dataclass(slots=True)
class _Inflight:
    message: QueuedMessage | None
    """The message (None once PUBREC arrived: only the PUBREL/PUBCOMP exchange is left)."""


@dataclass(slots=True)
class _Connection(Generic[C]):
    """Per-network-connection state."""

    handle: C
    protocol_level: int
    window: int
    topic_alias_maximum: int
    maximum_packet_size: int | None
    in_aliases: dict[int, str] = field(default_factory=dict)
    out_aliases: OrderedDict[str, int] = field(default_factory=OrderedDict)
    unsent: deque[int] = field(default_factory=deque)
    """In-flight PUBLISHes not sent on this connection yet: on resume only as many as its Receive Maximum
    allows go out [MQTT-3.3.4-9]; the rest follow (same packet id, DUP) as acks free the window."""


class Session(Generic[C]):
    """One client's session: subscriptions, outgoing flow, incoming QoS 2 state, will (see module doc)."""

    def __init__(self, client_id: str, config: SessionConfig, stats: SessionStats) -> None:
        self.client_id = client_id
        self.config = config
        self.stats = stats
        self.protocol_level = PROTOCOL_LEVEL_V5
        self.session_expiry = 0
        """Session Expiry Interval in seconds (:data:`NEVER_EXPIRES` for never)."""
        self.expires_at: float | None = None
        """While disconnected: when the session ends (None: never, or connected)."""
        self.subscriptions: dict[str, SubscriptionEntry] = {}
        """By the topic filter as subscribed (``$share/...`` included)."""
        self.will: Will | None = None
        """The connection's will while connected; while disconnected, a will waiting for its delay."""
        self.will_at: float | None = None
        """While disconnected: when the waiting will is published."""
        self.incoming_qos2: set[int] = set()
        """Packet ids of QoS 2 PUBLISHes received and not yet released by PUBREL."""
        self._conn: _Connection[C] | None = None
        self._inflight: dict[int, _Inflight] = {}
        self._queue: deque[QueuedMessage] = deque()
        self._queued_bytes = 0
        self._expiring = 0
        """Queued messages that carry an expiry (only then is a full queue worth sweeping)."""
        self._next_pid = 1
        self.congested = False
        self.can_read: Callable[[str], bool] | None = None
        """The connected client's per-topic read check (its ACL), for subscriptions with ``read_check``."""
        """Set by the listener while the connection's write buffer is above its high-water mark: QoS 0
        messages are then dropped here (``dropped_slow_consumer``), before a topic alias is assigned to them
        (a PUBLISH the listener dropped after that would leave the client's alias table out of step)."""

    # -------------------------------------------------------------------------------------- connection

    @property
    def connection(self) -> C | None:
        """The listener's handle of the attached connection, None while disconnected."""
        return self._conn.handle if self._conn is not None else None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def attach(
        self,
        connection: C,
        protocol_level: int,
        now: float,
        out: list[Delivery[C]],
        *,
        receive_maximum: int | None = None,
        topic_alias_maximum: int | None = None,
        maximum_packet_size: int | None = None,
    ) -> None:
        """A connection takes the session (after CONNACK): retransmit what is unacknowledged (PUBLISH with
        DUP 1, PUBREL), then send from the queue as the window allows; packets are appended to ``out``."""
        v5 = protocol_level >= PROTOCOL_LEVEL_V5
        if v5:
            rm = receive_maximum if receive_maximum else 65535
            window = max(1, min(rm, self.config.max_inflight_v5))
            tam = (topic_alias_maximum or 0) if self.config.server_topic_aliases else 0
        else:
            window = max(1, self.config.max_inflight)
            tam = 0
            maximum_packet_size = None
        self.protocol_level = protocol_level
        self._conn = conn = _Connection(connection, protocol_level, window, tam, maximum_packet_size)
        self.expires_at = None
        self.will_at = None
        self.congested = False
        on_wire = 0
        for pid, entry in list(self._inflight.items()):
            msg = entry.message
            if msg is None:
                out.append(Delivery(conn.handle, self.client_id, Pubrel(pid)))
                on_wire += 1
                continue
            if on_wire >= window:
                conn.unsent.append(pid)  # the window is full: resent once acks free it
                continue
            on_wire += 1
            pkt = self._build(conn, msg, pid, True, now)
            if pkt is None:  # too large for this connection: as if delivered [MQTT-3.1.2-25]
                del self._inflight[pid]
                self.stats.inflight.dec()
                self.stats.dropped_too_large.inc()
            else:
                out.append(Delivery(conn.handle, self.client_id, pkt))
        self._pump(now, out)

    def detach(self) -> None:
        """The connection is gone; aliases and the window go with it, the rest stays."""
        self._conn = None

    # ----------------------------------------------------------------------------- outgoing messages

    @property
    def inflight_count(self) -> int:
        """QoS 1/2 messages sent and not yet completely acknowledged."""
        return len(self._inflight)

    @property
    def queued_count(self) -> int:
        """Messages waiting to be sent."""
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def deliver(self, msg: QueuedMessage, now: float, out: list[Delivery[C]]) -> None:
        """Send ``msg`` now if connected and the window allows (appending to ``out``), else queue it."""
        conn = self._conn
        qos = msg.publish.qos
        if conn is None:
            if qos == 0 and not self.config.queue_qos0_offline:
                self.stats.dropped_qos0_offline.inc()
                return
            self._enqueue(msg, now)
            return
        if qos == 0:
            if msg.expires_at is not None and msg.expires_at <= now:
                self.stats.dropped_expired.inc()
                return
            if self.congested:
                self.stats.dropped_slow_consumer.inc()
                return
            pkt = self._build(conn, msg, None, False, now)
            if pkt is None:
                self.stats.dropped_too_large.inc()
            else:
                out.append(Delivery(conn.handle, self.client_id, pkt))
            return
        if not self._queue and len(self._inflight) < conn.window:
            self._send_new(conn, msg, now, out)
        else:
            self._enqueue(msg, now)

    def puback(self, packet_id: int, now: float, out: list[Delivery[C]]) -> bool:
        """PUBACK from the client: completes a QoS 1 delivery. False when nothing QoS 1 was in flight."""
        entry = self._inflight.get(packet_id)
        if entry is None or entry.message is None or entry.message.publish.qos != 1:
            return False
        del self._inflight[packet_id]
        self.stats.inflight.dec()
        self._pump(now, out)
        return True

    def pubrec(self, packet_id: int, reason_code: int, now: float, out: list[Delivery[C]]) -> bool:
        """PUBREC from the client: answers PUBREL (appended to ``out``), or with a reason >= 0x80 ends the
        flow. A repeated PUBREC gets the PUBREL again. False when no QoS 2 delivery had that id."""
        entry = self._inflight.get(packet_id)
        if entry is None or (entry.message is not None and entry.message.publish.qos != 2):
            return False
        if reason_code >= 0x80:
            del self._inflight[packet_id]
            self.stats.inflight.dec()
            self._pump(now, out)
            return True
        entry.message = None
        conn = self._conn
        if conn is not None:
            out.append(Delivery(conn.handle, self.client_id, Pubrel(packet_id)))
        return True

    def pubcomp(self, packet_id: int, now: float, out: list[Delivery[C]]) -> bool:
        """PUBCOMP from the client: completes a QoS 2 delivery. False when no PUBREL was outstanding."""
        entry = self._inflight.get(packet_id)
        if entry is None or entry.message is not None:
            return False
        del self._inflight[packet_id]
        self.stats.inflight.dec()
        self._pump(now, out)
        return True

    def purge_expired(self, now: float) -> int:
        """Drop queued messages whose expiry has passed; how many were dropped."""
        if not self._expiring:
            return 0
        kept: deque[QueuedMessage] = deque()
        dropped = 0
        for m in self._queue:
            if m.expires_at is not None and m.expires_at <= now:
                dropped += 1
                self._expiring -= 1
                self._queued_bytes -= m.size
            else:
                kept.append(m)
        if dropped:
            self._queue = kept
            self.stats.queued.dec(dropped)
            self.stats.dropped_expired.inc(dropped)
        return dropped

    def discard(self) -> list[QueuedMessage]:
        """The session ends: drop every outgoing message. Returns the ones a shared subscription may give to
        another member: queued ones never sent, and QoS 1 ones in flight (a QoS 2 message in flight must not
        go to anyone else [MQTT-4.8.2-5])."""
        back: list[QueuedMessage] = []
        for entry in self._inflight.values():
            m = entry.message
            if m is not None and m.share is not None and m.publish.qos == 1:
                back.append(m)
        back.extend(m for m in self._queue if m.share is not None)
        self.stats.inflight.dec(len(self._inflight))
        self.stats.queued.dec(len(self._queue))
        self._inflight.clear()
        self._queue.clear()
        self._queued_bytes = 0
        self._expiring = 0
        return back

    # ----------------------------------------------------------------------------- incoming messages

    def resolve_topic(self, publish: Publish, topic_alias_maximum: int) -> Publish | int:
        """Apply a client -> server Topic Alias: the PUBLISH with its topic filled in, or the reason code to
        disconnect with (0x94 Topic Alias invalid, 0x82 Protocol Error)."""
        alias = publish.properties.topic_alias
        if alias is None:
            return publish if publish.topic else ReasonCode.PROTOCOL_ERROR
        if alias == 0 or alias > topic_alias_maximum:
            return ReasonCode.TOPIC_ALIAS_INVALID
        conn = self._conn
        if conn is None:
            return ReasonCode.PROTOCOL_ERROR
        if publish.topic:
            conn.in_aliases[alias] = publish.topic
            return publish
        topic = conn.in_aliases.get(alias)
        if topic is None:
            return ReasonCode.PROTOCOL_ERROR
        return Publish(
            topic,
            publish.payload,
            publish.qos,
            publish.retain,
            publish.dup,
            publish.packet_id,
            publish.properties,
        )

    def receive_qos2(self, packet_id: int) -> bool:
        """A QoS 2 PUBLISH arrived: True the first time (deliver it), False for a retransmission."""
        if packet_id in self.incoming_qos2:
            return False
        self.incoming_qos2.add(packet_id)
        return True

    def release_qos2(self, packet_id: int) -> bool:
        """PUBREL (or our negative PUBREC) frees the packet id; False when it was unknown (PUBCOMP 0x92)."""
        try:
            self.incoming_qos2.remove(packet_id)
        except KeyError:
            return False
        return True

    # ------------------------------------------------------------------------------------- internals

    def _enqueue(self, msg: QueuedMessage, now: float) -> None:
        cfg = self.config
        if not msg.size:
            msg.size = message_size(msg.publish)
        if (
            len(self._queue) >= cfg.max_queued_messages
            or self._queued_bytes + msg.size > cfg.max_queued_bytes
        ):
            self.purge_expired(now)
            if (
                len(self._queue) >= cfg.max_queued_messages
                or self._queued_bytes + msg.size > cfg.max_queued_bytes
            ):
                self.stats.dropped_queue_full.inc()
                return
        self._queue.append(msg)
        self._queued_bytes += msg.size
        if msg.expires_at is not None:
            self._expiring += 1
        self.stats.queued.inc()

    def _pump(self, now: float, out: list[Delivery[C]]) -> None:
        conn = self._conn
        if conn is None:
            return
        unsent = conn.unsent
        while unsent and len(self._inflight) - len(unsent) < conn.window:
            pid = unsent.popleft()
            entry = self._inflight.get(pid)
            if entry is None or entry.message is None:
                continue
            pkt = self._build(conn, entry.message, pid, True, now)
            if pkt is None:  # too large for this connection: as if delivered [MQTT-3.1.2-25]
                del self._inflight[pid]
                self.stats.inflight.dec()
                self.stats.dropped_too_large.inc()
            else:
                out.append(Delivery(conn.handle, self.client_id, pkt))
        q = self._queue
        while q:
            msg = q[0]
            if msg.publish.qos and len(self._inflight) >= conn.window:
                return
            q.popleft()
            self._queued_bytes -= msg.size
            self.stats.queued.dec()
            if msg.expires_at is not None:
                self._expiring -= 1
                if msg.expires_at <= now:
                    self.stats.dropped_expired.inc()
                    continue
            if msg.publish.qos:
                self._send_new(conn, msg, now, out)
                continue
            if self.congested:
                self.stats.dropped_slow_consumer.inc()
                continue
            pkt = self._build(conn, msg, None, False, now)
            if pkt is None:
                self.stats.dropped_too_large.inc()
            else:
                out.append(Delivery(conn.handle, self.client_id, pkt))

    def _send_new(self, conn: _Connection[C], msg: QueuedMessage, now: float, out: list[Delivery[C]]) -> None:
        if msg.expires_at is not None and msg.expires_at <= now:
            self.stats.dropped_expired.inc()
            return
        pid = self._next_pid
        inflight = self._inflight
        while pid in inflight:
            pid = pid % _MAX_PACKET_ID + 1
        pkt = self._build(conn, msg, pid, False, now)
        if pkt is None:
            self.stats.dropped_too_large.inc()
            return
        self._next_pid = pid % _MAX_PACKET_ID + 1
        inflight[pid] = _Inflight(msg)
        self.stats.inflight.inc()
        out.append(Delivery(conn.handle, self.client_id, pkt))

    def _build(
        self, conn: _Connection[C], msg: QueuedMessage, packet_id: int | None, dup: bool, now: float
    ) -> Publish | None:
        """The PUBLISH for this connection (expiry left, topic alias), or None when it is too large."""
        p = msg.publish
        if conn.protocol_level < PROTOCOL_LEVEL_V5:
            return Publish(p.topic, p.payload, p.qos, p.retain, dup, packet_id, EMPTY_PROPERTIES)
        props = p.properties
        topic = p.topic
        if msg.expires_at is not None:
            left = max(1, math.ceil(msg.expires_at - now))
            if left != props.message_expiry_interval:
                props = _with(props, message_expiry_interval=left)
        alias = 0
        known = False
        tam = conn.topic_alias_maximum
        if tam:
            aliases = conn.out_aliases
            got = aliases.get(topic)
            if got is not None:
                alias, known = got, True
            elif len(aliases) < tam:
                alias = len(aliases) + 1
            else:
                alias = next(iter(aliases.values()))  # least recently used
            props = _with(props, topic_alias=alias)
        pkt = Publish("" if known else topic, p.payload, p.qos, p.retain, dup, packet_id, props)
        if conn.maximum_packet_size is not None and (
            publish_wire_size(pkt, conn.protocol_level) > conn.maximum_packet_size
        ):
            return None
        if alias:
            aliases = conn.out_aliases
            if known:
                aliases.move_to_end(topic)
            else:
                if len(aliases) >= tam:
                    aliases.popitem(last=False)
                aliases[topic] = alias
        return pkt

    def __repr__(self) -> str:
        state = "connected" if self._conn is not None else "offline"
        return (
            f"<Session {self.client_id!r} {state} subscriptions={len(self.subscriptions)} "
            f"inflight={len(self._inflight)} queued={len(self._queue)}>"
        )


def _with(
    props: Properties,
    *,
    message_expiry_interval: int | None = None,
    topic_alias: int | None = None,
) -> Properties:
    """``props`` with the expiry and/or the topic alias replaced (None keeps the current value)."""
    return Properties(
        payload_format_indicator=props.payload_format_indicator,
        message_expiry_interval=(
            message_expiry_interval if message_expiry_interval is not None else props.message_expiry_interval
        ),
        content_type=props.content_type,
        response_topic=props.response_topic,
        correlation_data=props.correlation_data,
        subscription_identifiers=props.subscription_identifiers,
        topic_alias=topic_alias if topic_alias is not None else props.topic_alias,
        user_properties=props.user_properties,
    )
