"""The local MQTT broker core: sessions, subscriptions, routing, retained messages, wills (sans-IO).

The listener (``microenvoy/io``) owns sockets, the codec and timers; it calls a :class:`Broker` with decoded
packets and ``now``, and writes the :class:`~microenvoy.mqtt.session.Delivery` items it gets back (in order,
each on ``delivery.connection``). Nothing here blocks, sleeps or reads a clock; randomness (assigned client
ids) comes from an injected ``random.Random``. ``C`` is the listener's connection handle type: the broker only
stores and compares it (identity).

Calls, in the order a connection makes them::

    r = broker.connect(connect_packet, conn, now)      # -> ConnectResult: CONNACK fields, a connection to
                                                       #    close with 0x8E, deliveries after the CONNACK
    t = broker.resolve_topic(client_id, publish)       # v5 topic alias -> Publish, or a DISCONNECT reason
    o = broker.publish(client_id, publish, now)        # -> PublishOutcome: deliveries, PUBACK/PUBREC reason
    broker.pubrel(client_id, packet_id)                # incoming QoS 2 released -> PUBCOMP 0x00 / 0x92
    s = broker.subscribe(client_id, subscribe, now)    # -> SUBACK reason codes, retained deliveries
    broker.unsubscribe(client_id, unsubscribe)         # -> UNSUBACK reason codes
    broker.puback / pubrec / pubcomp(client_id, ...)   # outgoing acks -> deliveries the window now allows
    broker.set_congested(client_id, conn, flag)        # from pause_writing/resume_writing (QoS 0 drops)
    broker.disconnect(client_id, conn, now, ...)       # -> Batch (will messages ...)
    broker.tick(now) at broker.next_deadline()         # will delays, session expiry, retained expiry

Behaviour (MQTT 5.0 / 3.1.1):

* Client ids: an empty client id with Clean Start 1 gets an assigned one
  (``ConnectResult.assigned_client_id``, to be sent in CONNACK for v5); with Clean Start 0 it is rejected
  with 0x85 (v3.1.1: 0x02) [MQTT-3.1.3-8]. A client id already connected takes the session over: the old
  connection is returned in ``taken_over`` (send DISCONNECT 0x8E and close it) [MQTT-3.1.4-3].
* Clean Start 1 discards an existing session [MQTT-3.1.2-4]; Clean Start 0 resumes it (session present) or
  starts a new one [MQTT-3.1.2-5]. v3.1.1 Clean Session 0 means the session never expires (bounded by
  ``max_session_expiry_interval``). A session whose connection closed ends after its Session Expiry
  Interval (0: at once) [MQTT-3.1.2-23]; a DISCONNECT may change the interval, except from 0 [MQTT-3.14.2-2].
* Wills (section 3.1.2.5): published when the connection closes other than by a DISCONNECT with reason 0x00
  [MQTT-3.1.2-8] [MQTT-3.1.2-10], after the Will Delay Interval or when the session ends, whichever is first;
  a connection to the same session before the delay passes cancels it [MQTT-3.1.3-9]. On takeover the old
  connection's will follows the same rule (a zero delay, or Clean Start 1 ending the session, publishes it).
* Routing: every matching non-shared subscription of a client yields one message per client with the highest
  granted QoS of them and all their subscription identifiers [MQTT-3.3.4-2] [MQTT-3.3.4-3]; QoS is
  min(published, granted) [MQTT-3.8.4-8]; No Local skips the publisher's own subscription [MQTT-3.8.3-3];
  RETAIN is kept only with Retain As Published [MQTT-3.3.1-12] [MQTT-3.3.1-13]. Each shared group delivers to
  one member, round robin among connected members (any member when none is connected) [MQTT-4.8.2-3].
* Retained messages: a RETAIN 1 PUBLISH updates the store (zero-byte payload clears). On subscribe they are
  sent per Retain Handling (0 always, 1 only for a new subscription, 2 never) with RETAIN 1
  [MQTT-3.3.1-9] [MQTT-3.3.1-10] [MQTT-3.3.1-11]; never for a shared subscription.
* Ending a session drops its queue; messages it held for a shared subscription (never sent, or QoS 1 in
  flight) go to another member of the group.

Bounds are in :class:`BrokerLimits`; every rejection and drop is counted (see ``BrokerLimits`` and
``microenvoy.mqtt.session``).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from microenvoy.admin.stats import Scope, Store
from microenvoy.codecs.mqtt.packets import (
    EMPTY_PROPERTIES,
    PROTOCOL_LEVEL_V5,
    Connect,
    Properties,
    Publish,
    ReasonCode,
    Subscribe,
    Unsubscribe,
    Will,
)
from microenvoy.mqtt.retained import RetainedStore, RetainOutcome
from microenvoy.mqtt.session import (
    NEVER_EXPIRES,
    Delivery,
    QueuedMessage,
    Session,
    SessionConfig,
    SessionStats,
    SubscriptionEntry,
)
from microenvoy.mqtt.topics import (
    SharedFilter,
    SharedGroup,
    SubscriptionIndex,
    TopicLimits,
    parse_shared,
    topic_filter_error,
    topic_name_error,
)

__all__ = [
    "Batch",
    "Broker",
    "BrokerLimits",
    "ConnectResult",
    "PublishOutcome",
    "SubscribeOutcome",
]

C = TypeVar("C")

_WILL = 0
_EXPIRY = 1


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    """Bounds of the local broker, with defaults sized for an edge device (every one is counted when hit)."""

    max_sessions: int = 10_000
    """Sessions held (connected or not); a CONNECT that needs a new one beyond it gets 0x97 Quota exceeded
    (v3.1.1: 0x03 Server unavailable). Counted in ``sessions_rejected``."""
    max_session_expiry_interval: int = NEVER_EXPIRES
    """Cap on the Session Expiry Interval (seconds); also the expiry of v3.1.1 Clean Session 0 sessions.
    When it lowers a client's value, ``ConnectResult.session_expiry_interval`` says so (for CONNACK)."""
    max_subscriptions_per_client: int = 100
    """Subscriptions per session; beyond it SUBACK 0x97 (v3.1.1: 0x80), counted (subscriptions_rejected)."""
    maximum_qos: int = 2
    """Highest QoS granted to a subscription (advertise it in CONNACK when below 2)."""
    topic_alias_maximum: int = 10
    """Client -> server topic aliases accepted per connection (send it in CONNACK; mosquitto's default)."""
    max_retained_messages: int = 10_000
    """Retained topics held; more are not retained (``retained_rejected``)."""
    max_retained_bytes: int = 8 << 20
    """Bytes of retained messages held."""
    topics: TopicLimits = field(default_factory=TopicLimits)
    """Bounds on topic names and filters (bytes, levels)."""
    session: SessionConfig = field(default_factory=SessionConfig)
    """Per-session bounds: inflight window, queue count/bytes, QoS 0 while offline, server topic aliases."""


@dataclass(slots=True)
class Batch(Generic[C]):
    """Side effects of a call: packets to write, and will messages published (already routed locally; given
    so that the listener can also send them through its bridge routes)."""

    deliveries: list[Delivery[C]] = field(default_factory=list)
    """Packets to write, in order."""
    wills: list[tuple[str, Publish]] = field(default_factory=list)
    """(client id, will PUBLISH) for every will published."""


@dataclass(slots=True)
class ConnectResult(Generic[C]):
    """The outcome of a CONNECT."""

    reason_code: int
    """0 accepted; else the CONNACK reason (0x85 client id not valid, 0x97 quota exceeded) - then close."""
    client_id: str
    """The session's client id (the assigned one when the client sent none)."""
    session_present: bool = False
    """CONNACK Session Present."""
    assigned_client_id: str | None = None
    """Set when the broker assigned the client id (v5: CONNACK Assigned Client Identifier)."""
    session_expiry_interval: int | None = None
    """Set when the broker uses another Session Expiry Interval than the client asked (v5: put in CONNACK)."""
    topic_alias_maximum: int = 0
    """Our Topic Alias Maximum for this connection (v5: CONNACK Topic Alias Maximum when > 0)."""
    taken_over: C | None = None
    """The previous connection of this client id: send it DISCONNECT 0x8E (v5) and close it."""
    deliveries: list[Delivery[C]] = field(default_factory=list)
    """Packets to write after the CONNACK: retransmissions (DUP), queued messages, takeover wills."""
    wills: list[tuple[str, Publish]] = field(default_factory=list)
    """Wills published by this connect (a taken-over or discarded session's)."""


@dataclass(slots=True)
class PublishOutcome(Generic[C]):
    """The outcome of an incoming PUBLISH."""

    reason_code: int = 0
    """For the v5 PUBACK/PUBREC: 0 success, 0x10 no matching subscribers, 0x90 topic name invalid (not
    routed; v3.1.1: close the connection)."""
    deliveries: list[Delivery[C]] = field(default_factory=list)
    """Packets to write, in order."""
    matched: bool = False
    """Some subscription received it (locally)."""
    duplicate: bool = False
    """A QoS 2 retransmission whose first copy was already delivered: answer PUBREC, nothing was routed."""
    retained: RetainOutcome | None = None
    """What the retained store did (None when RETAIN was 0)."""


@dataclass(slots=True)
class SubscribeOutcome(Generic[C]):
    """The outcome of a SUBSCRIBE."""

    reason_codes: tuple[int, ...] = ()
    """SUBACK reason codes, one per filter (granted QoS, or >= 0x80)."""
    deliveries: list[Delivery[C]] = field(default_factory=list)
    """Retained messages to write after the SUBACK."""
    disconnect_reason: int | None = None
    """A Protocol Error in the packet (No Local on a shared subscription [MQTT-3.8.3-4], Retain Handling 3):
    send no SUBACK, DISCONNECT with this reason (v5) and close. Nothing was applied."""


class _Stats:
    __slots__ = (
        "session",
        "sessions",
        "sessions_expired",
        "sessions_rejected",
        "sessions_taken_over",
        "subscriptions",
        "subscriptions_rejected",
        "will_published",
    )

    def __init__(self, scope: Scope) -> None:
        self.session = SessionStats(scope)
        self.sessions = scope.gauge("sessions")
        self.subscriptions = scope.gauge("subscriptions")
        self.sessions_expired = scope.counter("sessions_expired")
        self.sessions_rejected = scope.counter("sessions_rejected")
        self.sessions_taken_over = scope.counter("sessions_taken_over")
        self.subscriptions_rejected = scope.counter("subscriptions_rejected")
        self.will_published = scope.counter("will_published")


class Broker(Generic[C]):
    """Sessions by client id, the subscription index and the retained store (see module doc)."""

    def __init__(
        self,
        limits: BrokerLimits | None = None,
        stats: Scope | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.limits = limits if limits is not None else BrokerLimits()
        scope = stats if stats is not None else Store().scope("mqtt")
        self._stats = _Stats(scope)
        self._rng = rng if rng is not None else random.Random()
        self.sessions: dict[str, Session[C]] = {}
        self.index: SubscriptionIndex[SubscriptionEntry] = SubscriptionIndex()
        self.retained = RetainedStore(
            self.limits.max_retained_messages, self.limits.max_retained_bytes, scope
        )
        self._timers: list[tuple[float, int, int, str, Session[C]]] = []
        self._seq = 0

    # ------------------------------------------------------------------------------------------ connect

    def connect(self, packet: Connect, connection: C, now: float) -> ConnectResult[C]:
        """Handle an accepted CONNECT (authentication done by the listener). On reason_code 0 send CONNACK
        (session present, assigned client id, session expiry, topic alias maximum from the result), then the
        deliveries; close ``taken_over`` with DISCONNECT 0x8E."""
        limits = self.limits
        v5 = packet.protocol_level >= PROTOCOL_LEVEL_V5
        props = packet.properties
        client_id = packet.client_id
        assigned: str | None = None
        if not client_id:
            if not packet.clean_start:
                return ConnectResult(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, "")
            client_id = assigned = self._assign_client_id()
        requested = (
            (props.session_expiry_interval or 0) if v5 else (0 if packet.clean_start else NEVER_EXPIRES)
        )
        expiry = min(requested, limits.max_session_expiry_interval)
        old = self.sessions.get(client_id)
        if (old is None or packet.clean_start) and len(self.sessions) - (
            old is not None
        ) >= limits.max_sessions:
            self._stats.sessions_rejected.inc()
            return ConnectResult(ReasonCode.QUOTA_EXCEEDED, client_id)

        result: ConnectResult[C] = ConnectResult(0, client_id, assigned_client_id=assigned)
        if v5 and expiry != requested:
            result.session_expiry_interval = expiry
        if v5:
            result.topic_alias_maximum = limits.topic_alias_maximum
        batch: Batch[C] = Batch(result.deliveries, result.wills)
        session: Session[C] | None = None
        if old is not None:
            if old.connected:
                result.taken_over = old.connection
                self._stats.sessions_taken_over.inc()
                will = old.will
                old.will = None
                old.detach()
                if will is not None and (packet.clean_start or _will_delay(will, old.protocol_level) == 0):
                    self._publish_will(client_id, will, now, batch)
            elif old.will is not None and packet.clean_start:
                will = old.will
                old.will = None
                old.will_at = None
                self._publish_will(client_id, will, now, batch)  # the session ends before the delay passed
            else:
                old.will = None  # reconnected within the will delay: never sent [MQTT-3.1.3-9]
                old.will_at = None
            if packet.clean_start:
                self._end_session(old, now, batch)
            else:
                session = old
                result.session_present = True
        if session is None:
            session = Session(client_id, limits.session, self._stats.session)
            self.sessions[client_id] = session
            self._stats.sessions.set(len(self.sessions))
        session.session_expiry = expiry
        session.will = packet.will
        session.attach(
            connection,
            packet.protocol_level,
            now,
            result.deliveries,
            receive_maximum=props.receive_maximum,
            topic_alias_maximum=props.topic_alias_maximum,
            maximum_packet_size=props.maximum_packet_size,
        )
        return result

    def disconnect(
        self,
        client_id: str,
        connection: C,
        now: float,
        *,
        reason_code: int | None = None,
        session_expiry_interval: int | None = None,
    ) -> Batch[C]:
        """The connection closed. ``reason_code`` is the client's DISCONNECT reason (None: no DISCONNECT -
        network loss, keepalive timeout, protocol error, server-initiated close); the will is published unless
        it is 0x00. ``session_expiry_interval`` is the DISCONNECT's (v5), ignored when the CONNECT's was 0
        (that is a Protocol Error the listener may answer). A connection that is no longer the session's
        (taken over) changes nothing."""
        batch: Batch[C] = Batch()
        session = self.sessions.get(client_id)
        if session is None or not session.connected or session.connection is not connection:
            return batch
        will = session.will
        session.will = None
        if session_expiry_interval is not None and session.session_expiry != 0:
            session.session_expiry = min(session_expiry_interval, self.limits.max_session_expiry_interval)
        session.detach()
        publish_will = will is not None and reason_code != 0
        if session.session_expiry == 0:
            if will is not None and publish_will:
                self._publish_will(client_id, will, now, batch)
            self._end_session(session, now, batch)
            return batch
        if session.session_expiry != NEVER_EXPIRES:
            session.expires_at = now + session.session_expiry
            self._schedule(session.expires_at, _EXPIRY, session)
        if will is not None and publish_will:
            delay = _will_delay(will, session.protocol_level)
            if delay == 0:
                self._publish_will(client_id, will, now, batch)
            else:
                session.will = will
                session.will_at = now + delay
                self._schedule(session.will_at, _WILL, session)
        return batch

    # ------------------------------------------------------------------------------------------ publish

    def resolve_topic(self, client_id: str, publish: Publish) -> Publish | int:
        """Apply a v5 Topic Alias of an incoming PUBLISH: the PUBLISH with its topic, or the DISCONNECT reason
        (0x94 Topic Alias invalid, 0x82 Protocol Error)."""
        session = self.sessions.get(client_id)
        if session is None:
            return ReasonCode.PROTOCOL_ERROR
        return session.resolve_topic(publish, self.limits.topic_alias_maximum)

    def publish(self, client_id: str, publish: Publish, now: float) -> PublishOutcome[C]:
        """Route an incoming PUBLISH (topic resolved, authorized) to local subscribers and the retained store.

        QoS 2: the first PUBLISH with a packet id is routed, a retransmission before PUBREL is not
        (``duplicate``). Answer with PUBACK/PUBREC(``reason_code``) for QoS 1/2."""
        out: PublishOutcome[C] = PublishOutcome()
        if topic_name_error(publish.topic, self.limits.topics) is not None:
            out.reason_code = ReasonCode.TOPIC_NAME_INVALID
            return out
        if publish.qos == 2 and publish.packet_id is not None:
            session = self.sessions.get(client_id)
            if session is not None and not session.receive_qos2(publish.packet_id):
                out.duplicate = True
                return out
        out.matched = self._route(client_id, publish, now, out.deliveries)
        if not out.matched:
            out.reason_code = ReasonCode.NO_MATCHING_SUBSCRIBERS
        if publish.retain:
            out.retained = self.retained.set(_for_store(publish), now)
        return out

    def inject(self, publish: Publish, now: float, *, origin: str = "") -> PublishOutcome[C]:
        """Publish a message that did not come from a local client (bridged from an upstream broker, an MQTT 5
        response): routed and retained like :meth:`publish`; ``origin`` is the client id No Local compares."""
        out: PublishOutcome[C] = PublishOutcome()
        if topic_name_error(publish.topic, self.limits.topics) is not None:
            out.reason_code = ReasonCode.TOPIC_NAME_INVALID
            return out
        out.matched = self._route(origin, publish, now, out.deliveries)
        if not out.matched:
            out.reason_code = ReasonCode.NO_MATCHING_SUBSCRIBERS
        if publish.retain:
            out.retained = self.retained.set(_for_store(publish), now)
        return out

    def pubrel(self, client_id: str, packet_id: int) -> bool:
        """PUBREL from the client (or our negative PUBREC): releases an incoming QoS 2 packet id. Answer
        PUBCOMP 0x00 when True, 0x92 Packet Identifier not found when False."""
        session = self.sessions.get(client_id)
        return session is not None and session.release_qos2(packet_id)

    def set_congested(self, client_id: str, connection: C, congested: bool) -> None:
        """The connection's write buffer went above (True) or back below (False) its high-water mark (call it
        from ``pause_writing``/``resume_writing``). While congested, QoS 0 messages to the client are dropped
        by the session (``dropped_slow_consumer``) - never drop a delivery after the broker returned it: it
        may carry a topic alias the following ones rely on. QoS 1/2 are bounded by the inflight window."""
        session = self.sessions.get(client_id)
        if session is not None and session.connected and session.connection is connection:
            session.congested = congested

    # -------------------------------------------------------------------------------------- outgoing acks

    def puback(self, client_id: str, packet_id: int, now: float) -> list[Delivery[C]]:
        """PUBACK from the client; returns what the freed window lets out."""
        out: list[Delivery[C]] = []
        session = self.sessions.get(client_id)
        if session is not None:
            session.puback(packet_id, now, out)
        return out

    def pubrec(self, client_id: str, packet_id: int, reason_code: int, now: float) -> list[Delivery[C]]:
        """PUBREC from the client; returns the PUBREL to send (reason < 0x80), or what the freed window lets
        out (reason >= 0x80 ends the delivery)."""
        out: list[Delivery[C]] = []
        session = self.sessions.get(client_id)
        if session is not None:
            session.pubrec(packet_id, reason_code, now, out)
        return out

    def pubcomp(self, client_id: str, packet_id: int, now: float) -> list[Delivery[C]]:
        """PUBCOMP from the client; returns what the freed window lets out."""
        out: list[Delivery[C]] = []
        session = self.sessions.get(client_id)
        if session is not None:
            session.pubcomp(packet_id, now, out)
        return out

    # ------------------------------------------------------------------------------------ subscriptions

    def subscribe(
        self,
        client_id: str,
        packet: Subscribe,
        now: float,
        authorize: Callable[[str], bool] | None = None,
        read_check_needed: Callable[[str], bool] | None = None,
    ) -> SubscribeOutcome[C]:
        """Apply a SUBSCRIBE. ``authorize(filter)`` (the filter after any ``$share/<group>/``) denies a filter
        with 0x87 (v3.1.1: 0x80). Write the SUBACK first, then ``deliveries`` (retained messages)."""
        result: SubscribeOutcome[C] = SubscribeOutcome()
        session = self.sessions.get(client_id)
        if session is None:
            result.disconnect_reason = ReasonCode.PROTOCOL_ERROR
            return result
        v5 = session.protocol_level >= PROTOCOL_LEVEL_V5
        limits = self.limits
        parsed: list[SharedFilter | str | None] = []
        for sub in packet.subscriptions:
            shared = parse_shared(sub.topic_filter, limits.topics)
            if isinstance(shared, SharedFilter) and sub.no_local and v5:
                result.disconnect_reason = ReasonCode.PROTOCOL_ERROR  # [MQTT-3.8.3-4]
                return result
            if sub.retain_handling == 3 or sub.qos > 2:
                result.disconnect_reason = ReasonCode.PROTOCOL_ERROR  # [MQTT-3.8.3-5]
                return result
            parsed.append(shared)
        sids = packet.properties.subscription_identifiers
        sub_id = sids[0] if sids and v5 else None
        codes: list[int] = []
        for sub, shared in zip(packet.subscriptions, parsed, strict=True):
            if isinstance(shared, str):  # "$share/..." but malformed
                codes.append(ReasonCode.TOPIC_FILTER_INVALID if v5 else 0x80)
                continue
            if shared is None:
                inner, group = sub.topic_filter, None
                if topic_filter_error(inner, limits.topics) is not None:
                    codes.append(ReasonCode.TOPIC_FILTER_INVALID if v5 else 0x80)
                    continue
            else:
                inner, group = shared.topic_filter, shared.group
            if authorize is not None and not authorize(inner):
                codes.append(ReasonCode.NOT_AUTHORIZED if v5 else 0x80)
                continue
            existed = sub.topic_filter in session.subscriptions
            if not existed and len(session.subscriptions) >= limits.max_subscriptions_per_client:
                self._stats.subscriptions_rejected.inc()
                codes.append(ReasonCode.QUOTA_EXCEEDED if v5 else 0x80)
                continue
            granted = min(sub.qos, limits.maximum_qos)
            entry = SubscriptionEntry(
                client_id,
                sub.topic_filter,
                inner,
                group,
                granted,
                no_local=sub.no_local if v5 else False,
                retain_as_published=sub.retain_as_published if v5 else False,
                retain_handling=sub.retain_handling if v5 else 0,
                subscription_id=sub_id,
                read_check=read_check_needed is not None and read_check_needed(inner),
            )
            session.subscriptions[sub.topic_filter] = entry
            if self.index.add(inner, client_id, entry, group):
                self._stats.subscriptions.inc()
            codes.append(granted)
            # Retained messages: never on a shared subscription; per Retain Handling otherwise.
            if group is None and (entry.retain_handling == 0 or (entry.retain_handling == 1 and not existed)):
                for msg in self.retained.match(inner, now):
                    p = msg.publish
                    if entry.read_check and not _may_read(session, p.topic):
                        continue
                    qos = min(p.qos, granted)
                    props = _shape_props(p.properties, (sub_id,) if sub_id else (), v5)
                    session.deliver(
                        QueuedMessage(
                            Publish(p.topic, p.payload, qos, True, False, None, props), msg.expires_at
                        ),
                        now,
                        result.deliveries,
                    )
        result.reason_codes = tuple(codes)
        return result

    def unsubscribe(self, client_id: str, packet: Unsubscribe) -> tuple[int, ...]:
        """Apply an UNSUBSCRIBE; UNSUBACK reason codes (v5: 0x00, 0x11 no subscription existed, 0x8F)."""
        session = self.sessions.get(client_id)
        codes: list[int] = []
        for text in packet.topic_filters:
            entry = session.subscriptions.pop(text, None) if session is not None else None
            if entry is None:
                shared = parse_shared(text, self.limits.topics)
                bad = isinstance(shared, str) or (
                    shared is None and topic_filter_error(text, self.limits.topics) is not None
                )
                codes.append(ReasonCode.TOPIC_FILTER_INVALID if bad else ReasonCode.NO_SUBSCRIPTION_EXISTED)
                continue
            if self.index.remove(entry.filter, client_id, entry.group):
                self._stats.subscriptions.dec()
            codes.append(ReasonCode.SUCCESS)
        return tuple(codes)

    # -------------------------------------------------------------------------------------------- timers

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (None: nothing scheduled)."""
        t = self._timers[0][0] if self._timers else None
        r = self.retained.next_expiry()
        if r is not None and (t is None or r < t):
            return r
        return t

    def tick(self, now: float) -> Batch[C]:
        """Run what is due at ``now``: delayed wills, session expiry, retained-message expiry."""
        batch: Batch[C] = Batch()
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, kind, client_id, session = heapq.heappop(timers)
            if self.sessions.get(client_id) is not session or session.connected:
                continue
            if kind == _WILL:
                if session.will is not None and session.will_at == when:
                    will = session.will
                    session.will = None
                    session.will_at = None
                    self._publish_will(client_id, will, now, batch)
            elif session.expires_at == when:
                self._stats.sessions_expired.inc()
                self._end_session(session, now, batch)
        self.retained.expire(now)
        return batch

    # ----------------------------------------------------------------------------------------- internals

    def _assign_client_id(self) -> str:
        while True:
            cid = f"auto-{self._rng.getrandbits(64):016x}"
            if cid not in self.sessions:
                return cid

    def _schedule(self, when: float, kind: int, session: Session[C]) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, kind, session.client_id, session))

    def _end_session(self, session: Session[C], now: float, batch: Batch[C]) -> None:
        """Remove a session: its subscriptions, its queue (shared-subscription messages go to another member),
        a will still waiting for its delay is published now."""
        client_id = session.client_id
        for entry in session.subscriptions.values():
            if self.index.remove(entry.filter, client_id, entry.group):
                self._stats.subscriptions.dec()
        session.subscriptions.clear()
        if self.sessions.get(client_id) is session:
            del self.sessions[client_id]
            self._stats.sessions.set(len(self.sessions))
        if session.will is not None and not session.connected:
            will = session.will
            session.will = None
            session.will_at = None
            self._publish_will(client_id, will, now, batch)
        for msg in session.discard():
            self._redispatch(msg, now, batch.deliveries)

    def _redispatch(self, msg: QueuedMessage, now: float, out: list[Delivery[C]]) -> None:
        if msg.share is None:
            return
        group = self.index.group(msg.share[1], msg.share[0])
        if group is None:
            return
        picked = self._pick(group)
        if picked is None:
            return
        cid, entry = picked
        p = msg.publish
        v5 = self.sessions[cid].protocol_level >= PROTOCOL_LEVEL_V5
        sids = (entry.subscription_id,) if entry.subscription_id else ()
        props = _shape_props(p.properties, sids, v5)
        shaped = Publish(p.topic, p.payload, min(p.qos, entry.qos), p.retain, False, None, props)
        self.sessions[cid].deliver(QueuedMessage(shaped, msg.expires_at, msg.share), now, out)

    def _pick(self, group: SharedGroup[SubscriptionEntry]) -> tuple[str, SubscriptionEntry] | None:
        sessions = self.sessions

        def connected(cid: str) -> bool:
            s = sessions.get(cid)
            return s is not None and s.connected

        return group.pick(connected)

    def _publish_will(self, client_id: str, will: Will, now: float, batch: Batch[C]) -> None:
        wp = will.properties
        props = (
            EMPTY_PROPERTIES
            if wp is EMPTY_PROPERTIES
            else Properties(
                payload_format_indicator=wp.payload_format_indicator,
                message_expiry_interval=wp.message_expiry_interval,
                content_type=wp.content_type,
                response_topic=wp.response_topic,
                correlation_data=wp.correlation_data,
                user_properties=wp.user_properties,
            )
        )
        publish = Publish(will.topic, will.payload, will.qos, will.retain, False, None, props)
        self._stats.will_published.inc()
        self._route(client_id, publish, now, batch.deliveries)
        if will.retain:
            self.retained.set(publish, now)
        batch.wills.append((client_id, publish))

    def _route(self, publisher: str, publish: Publish, now: float, out: list[Delivery[C]]) -> bool:
        """Deliver ``publish`` to every matching subscription; True when any subscriber got it."""
        direct, shared = self.index.match(publish.topic)
        if not direct and not shared:
            return False
        props = publish.properties
        if props.topic_alias is not None or props.subscription_identifiers:
            props = _shape_props(props, (), True)
        mei = props.message_expiry_interval
        expires_at = now + mei if mei is not None else None
        sessions = self.sessions
        matched = False
        # Plain copies (no subscription ids) are shared between subscribers with the same QoS/RETAIN.
        plain: dict[tuple[int, bool], Publish] = {}

        def shaped(qos: int, retain: bool, sids: tuple[int, ...], v5: bool) -> Publish:
            if sids and v5:
                return Publish(
                    publish.topic, publish.payload, qos, retain, False, None, _shape_props(props, sids, True)
                )
            key = (qos, retain)
            p = plain.get(key)
            if p is None:
                p = plain[key] = Publish(publish.topic, publish.payload, qos, retain, False, None, props)
            return p

        if len(direct) == 1:
            for cid, e in direct[0].items():
                if e.no_local and cid == publisher:
                    continue
                s = sessions.get(cid)
                if s is None or (e.read_check and not _may_read(s, publish.topic)):
                    continue
                matched = True
                sids = (e.subscription_id,) if e.subscription_id else ()
                p = shaped(
                    min(publish.qos, e.qos),
                    publish.retain and e.retain_as_published,
                    sids,
                    s.protocol_level >= PROTOCOL_LEVEL_V5,
                )
                s.deliver(QueuedMessage(p, expires_at), now, out)
        elif direct:
            merged: dict[str, list[SubscriptionEntry]] = {}
            for subs in direct:
                for cid, e in subs.items():
                    if e.no_local and cid == publisher:
                        continue
                    if e.read_check and not _may_read(sessions.get(cid), publish.topic):
                        continue
                    lst = merged.get(cid)
                    if lst is None:
                        merged[cid] = [e]
                    else:
                        lst.append(e)
            for cid, entries in merged.items():
                s = sessions.get(cid)
                if s is None:
                    continue
                matched = True
                qos = min(publish.qos, max(e.qos for e in entries))
                retain = publish.retain and any(e.retain_as_published for e in entries)
                all_sids = tuple(sorted({e.subscription_id for e in entries if e.subscription_id}))
                p = shaped(qos, retain, all_sids, s.protocol_level >= PROTOCOL_LEVEL_V5)
                s.deliver(QueuedMessage(p, expires_at), now, out)
        for group in shared:
            picked = self._pick(group)
            if picked is None:
                continue
            cid, e = picked
            s = sessions.get(cid)
            if s is None or (e.read_check and not _may_read(s, publish.topic)):
                continue
            matched = True
            sids = (e.subscription_id,) if e.subscription_id else ()
            p = shaped(
                min(publish.qos, e.qos),
                publish.retain and e.retain_as_published,
                sids,
                s.protocol_level >= PROTOCOL_LEVEL_V5,
            )
            s.deliver(QueuedMessage(p, expires_at, (group.name, group.topic_filter)), now, out)
        return matched

    def __repr__(self) -> str:
        return (
            f"<Broker sessions={len(self.sessions)} subscriptions={len(self.index)} "
            f"retained={len(self.retained)}>"
        )


def _may_read(session: Session[C] | None, topic: str) -> bool:
    """The session's ACL read check (no session or no check: allowed)."""
    if session is None or session.can_read is None:
        return True
    return session.can_read(topic)


def _will_delay(will: Will, protocol_level: int) -> int:
    if protocol_level < PROTOCOL_LEVEL_V5:
        return 0
    return will.properties.will_delay_interval or 0


def _shape_props(props: Properties, sids: tuple[int, ...], v5: bool) -> Properties:
    """PUBLISH properties as they go to a subscriber: no topic alias, these subscription identifiers."""
    if not v5:
        return EMPTY_PROPERTIES
    if props.topic_alias is None and props.subscription_identifiers == sids:
        return props
    return Properties(
        payload_format_indicator=props.payload_format_indicator,
        message_expiry_interval=props.message_expiry_interval,
        content_type=props.content_type,
        response_topic=props.response_topic,
        correlation_data=props.correlation_data,
        subscription_identifiers=sids,
        user_properties=props.user_properties,
    )


def _for_store(publish: Publish) -> Publish:
    """The PUBLISH as the retained store keeps it: no alias, no subscription ids, no packet id/DUP."""
    props = _shape_props(publish.properties, (), True)
    if props is publish.properties and publish.packet_id is None and not publish.dup:
        return publish
    return Publish(publish.topic, publish.payload, publish.qos, True, False, None, props)
