"""The MQTT front's bridge: PUBLISHes that match a bridge route go through the HTTP engine to a cluster.

``MqttBridge`` is built once per ``mqtt_proxy`` config (like an ``HttpFront`` per HTTP connection manager):
the topic route table, the compiled path templates, and the ``HttpFront`` the bridge routes were turned into
(``mqtt_proxy.http_connection_manager``). ``send(publish, ctx)`` runs one exchange and returns the MQTT 5
reason code for the acknowledgement (``0x00`` only after a 2xx answer / gRPC OK); the listener acknowledges
(or, for MQTT 3.1.1, closes the connection) accordingly, so a message is never acknowledged unless it was
delivered. Message Expiry Interval caps the exchange's time; an already expired message is not sent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random as _random
from collections.abc import Callable
from dataclasses import dataclass

from microenvoy.admin.stats import Counter, Scope, Store
from microenvoy.bridging.mqtt import BridgeContext, ack_reason, envelope_batch, request_for
from microenvoy.codecs import grpc as grpc_codec
from microenvoy.codecs.mqtt.packets import Publish, ReasonCode
from microenvoy.core.exchange import DownstreamInfo
from microenvoy.filters.network.mqtt_proxy import MqttProxy, http_connection_manager
from microenvoy.io.bridge import BridgeResult, forward
from microenvoy.io.http_front import HttpFront
from microenvoy.io.upstream import ClusterManager
from microenvoy.router.topic_routes import (
    TopicRouteTable,
    compile_path_template,
    compile_topic_filter,
    fill_path,
)

__all__ = ["BATCH_CONTENT_TYPE", "BridgeOutcome", "MqttBridge", "batch_body"]

log = logging.getLogger("microenvoy.mqtt")


@dataclass(frozen=True, slots=True)
class BridgeOutcome:
    """What a bridged PUBLISH came to."""

    reason_code: int
    """For the PUBACK/PUBREC (v5); anything but 0x00 means: not delivered."""
    result: BridgeResult | None
    """The exchange (None when the message matched no route or had expired)."""


class _Stats:
    def __init__(self, scope: Scope) -> None:
        c = scope.counter
        self.requests = c("bridge_rq_total")
        self.by_class: dict[int, Counter] = {k: c(f"bridge_rq_{k}xx") for k in range(1, 6)}
        self.failed = c("bridge_rq_failed")
        """No answer at all (reset, timeout, overflow answered locally count by their status)."""
        self.expired = c("dropped_expired")
        self.negative = c("bridge_negative_ack")
        self.batches = c("bridge_batches")
        self.batched_messages = c("bridge_batched_messages")


class MqttBridge:
    """Bridge routes of one ``mqtt_proxy`` config, run on the shared HTTP engine."""

    def __init__(
        self,
        config: MqttProxy,
        *,
        clusters: ClusterManager,
        stats: Store,
        listener_name: str,
        rng: _random.Random | None = None,
        health: object = None,
    ) -> None:
        self.config = config
        filters = [compile_topic_filter(r.topic_filter) for r in config.routes]
        self.table = TopicRouteTable(filters)
        self.pieces = [
            None if r.grpc is not None else compile_path_template(r.path, f.names)
            for r, f in zip(config.routes, filters, strict=True)
        ]
        self.front = HttpFront(
            http_connection_manager(config), clusters=clusters, stats=stats, rng=rng, health=health
        )
        self.authority = (config.authority or listener_name).encode()
        self._batches: dict[tuple[int, str], _Batch] = {}
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self.stats = _Stats(stats.scope(f"mqtt.{config.stat_prefix}."))

    def __repr__(self) -> str:
        return f"<MqttBridge {self.config.stat_prefix!r} routes={len(self.table)}>"

    def matches(self, topic: str) -> bool:
        return self.table.match(topic) is not None

    async def send(
        self,
        publish: Publish,
        ctx: BridgeContext,
        downstream: DownstreamInfo,
        *,
        expires_in: float | None = None,
    ) -> BridgeOutcome | None:
        """Bridge ``publish`` if a route matches (None otherwise); ``expires_in``: seconds left of its
        Message Expiry Interval (None: no expiry)."""
        hit = self.table.match(publish.topic)
        if hit is None:
            return None
        index, captures = hit
        route = self.config.routes[index]
        if expires_in is not None and expires_in <= 0:
            self.stats.expired.inc()
            return BridgeOutcome(ReasonCode.UNSPECIFIED_ERROR, None)
        if route.batch is not None:
            return await self._batched(index, captures, publish, ctx, downstream)
        headers, body = request_for(
            publish,
            route_index=index,
            path_pieces=self.pieces[index],
            grpc_method=route.grpc.method if route.grpc is not None else None,
            grpc_envelope=route.grpc is not None and route.grpc.encoding == "envelope",
            default_content_type=route.content_type,
            captures=captures,
            ctx=ctx,
        )
        self.stats.requests.inc()
        call = forward(self.front, downstream, headers, body)
        if expires_in is None:
            result = await call
        else:
            try:
                result = await asyncio.wait_for(call, expires_in)
            except TimeoutError:
                self.stats.expired.inc()
                return BridgeOutcome(ReasonCode.UNSPECIFIED_ERROR, None)
        return self._outcome(route.grpc is not None, result)

    def _outcome(self, grpc: bool, result: BridgeResult) -> BridgeOutcome:
        if result.status:
            self.stats.by_class[min(5, max(1, result.status // 100))].inc()
        else:
            self.stats.failed.inc()
        grpc_status = None
        if grpc:
            raw = (result.trailers or result.headers).get(b"grpc-status")
            grpc_status = int(raw) if raw is not None and raw.isdigit() else grpc_codec.UNKNOWN
        reason = ack_reason(result.status, grpc_status)
        if reason:
            self.stats.negative.inc()
        return BridgeOutcome(reason, result)

    # -- batching ---------------------------------------------------------------------------------
    def enqueue(
        self,
        publish: Publish,
        ctx: BridgeContext,
        downstream: DownstreamInfo,
        done: Callable[[BridgeOutcome], None],
    ) -> bool:
        """The listener's fast path for batched routes: queue ``publish`` and call ``done(outcome)`` when its
        batch has been answered (no task or future per message). False when the topic's route does not
        batch (use ``send``)."""
        hit = self.table.match(publish.topic)
        if hit is None or self.config.routes[hit[0]].batch is None:
            return False
        self._add_to_batch(hit[0], hit[1], publish, ctx, downstream, done)
        return True

    async def _batched(
        self,
        index: int,
        captures: dict[str, str],
        publish: Publish,
        ctx: BridgeContext,
        downstream: DownstreamInfo,
    ) -> BridgeOutcome:
        """Queue ``publish`` into its route's open batch (per request path); every message of a batch gets
        the outcome of the one request that carries them all."""
        fut: asyncio.Future[BridgeOutcome] = asyncio.get_running_loop().create_future()

        def done(outcome: BridgeOutcome) -> None:
            if not fut.done():
                fut.set_result(outcome)

        self._add_to_batch(index, captures, publish, ctx, downstream, done)
        return await asyncio.shield(fut)

    def _add_to_batch(
        self,
        index: int,
        captures: dict[str, str],
        publish: Publish,
        ctx: BridgeContext,
        downstream: DownstreamInfo,
        done: Callable[[BridgeOutcome], None],
    ) -> None:
        route = self.config.routes[index]
        assert route.batch is not None
        pieces = self.pieces[index]
        path = (
            route.grpc.method if route.grpc is not None else fill_path(pieces or (), publish.topic, captures)
        )
        key = (index, path)
        batch = self._batches.get(key)
        loop = asyncio.get_running_loop()
        if batch is None:
            batch = self._batches[key] = _Batch(publish, ctx, downstream)
            batch.timer = loop.call_later(route.batch.max_delay, self._flush, key)
        batch.items.append((publish, ctx.client_id, done))
        if len(batch.items) >= route.batch.max_messages:
            self._flush(key)

    def _flush(self, key: tuple[int, str]) -> None:
        batch = self._batches.pop(key, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._send_batch(key, batch))
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)

    async def _send_batch(self, key: tuple[int, str], batch: _Batch) -> None:
        index, path = key
        route = self.config.routes[index]
        first = batch.items[0][0]
        grpc = route.grpc is not None
        headers, _ = request_for(
            first,
            route_index=index,
            path_pieces=None if grpc else ((path, None),),
            grpc_method=path if grpc else None,
            grpc_envelope=grpc,
            default_content_type=route.content_type,
            captures={},
            ctx=batch.ctx,
        )
        headers.set(b"x-microenvoy-mqtt-batch-size", str(len(batch.items)).encode())
        messages = [(p, client_id) for p, client_id, _ in batch.items]
        if grpc:
            body = grpc_codec.encode_message(envelope_batch(messages))  # one microenvoy.bridge.v1.Batch
        else:
            headers.set(b"content-type", BATCH_CONTENT_TYPE)
            body = batch_body(messages)
        self.stats.requests.inc()
        self.stats.batches.inc()
        self.stats.batched_messages.inc(len(batch.items))
        try:
            result = await forward(self.front, batch.downstream, headers, body)
            outcome = self._outcome(grpc, result)
        except Exception:  # never leave a message without an answer
            log.exception("mqtt batch to %s failed", path)
            outcome = BridgeOutcome(ReasonCode.UNSPECIFIED_ERROR, None)
        for _, _, done in batch.items:
            try:
                done(outcome)
            except Exception:  # one listener callback must not keep the others from their answer
                log.exception("mqtt batch acknowledgement failed")


class _Batch:
    __slots__ = ("ctx", "downstream", "items", "timer")

    def __init__(self, first: Publish, ctx: BridgeContext, downstream: DownstreamInfo) -> None:
        self.ctx = ctx
        self.downstream = downstream
        self.items: list[tuple[Publish, str, Callable[[BridgeOutcome], None]]] = []
        self.timer: asyncio.TimerHandle | None = None


BATCH_CONTENT_TYPE = b"application/vnd.microenvoy.mqtt-batch+json"
"""Content type of a batch request (``docs/mqtt.md``)."""


def batch_body(messages: list[tuple[Publish, str]]) -> bytes:
    """The batch request body: ``{"messages": [{"topic", "payload" (base64), "qos", "retain",
    "client_id", "content_type", "user_properties"}]}``, in arrival order."""
    out = []
    for p, client_id in messages:
        item: dict[str, object] = {
            "topic": p.topic,
            "payload": base64.b64encode(p.payload).decode("ascii"),
            "qos": p.qos,
            "retain": p.retain,
            "client_id": client_id,
        }
        if p.properties.content_type is not None:
            item["content_type"] = p.properties.content_type
        if p.properties.user_properties:
            item["user_properties"] = [list(kv) for kv in p.properties.user_properties]
        out.append(item)
    return json.dumps({"messages": out}, separators=(",", ":")).encode()
