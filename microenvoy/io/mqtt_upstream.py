"""Upstream MQTT broker cluster: a paho-mqtt (2.x, callback API v2) session to a broker, as a cluster.

``MqttBrokerCluster`` is an ``UpstreamCluster`` for the HTTP engine (``ClusterManager`` builds it for a
cluster whose ``cluster_type`` is ``microenvoy.clusters.mqtt_broker``, config in
``microenvoy.config.mqtt_cluster``). One MQTT session per cluster, to one of its endpoints at a time (the next
one after a failure).

Uplink: ``open_stream`` returns an ``MqttPublishStream`` that collects the request body and, when the request
ends, PUBLISHes it (topic from ``publish_topic``, QoS from the exchange or the config). The broker's PUBACK
(QoS 1) / PUBCOMP (QoS 2) / the packet being written (QoS 0) is a synthetic ``:status 200``; a negative MQTT
5 acknowledgement is a 4xx/503 (``_NACK_STATUS``); not connected is a ``connect-failure``, the inflight limit
an ``overflow``, a connection lost before the acknowledgement a ``reset`` (the engine turns those into 503 and
applies its retry policy). A reset or timed-out stream forgets its packet id at once.

Downlink: the configured subscriptions' messages are injected into the local broker of the named MQTT
listener (``register_local_front``), topic rewritten by ``strip_prefix`` / ``local_prefix``, with the origin
``DOWNLINK_ORIGIN`` (a client id no MQTT client can have). Loops: MQTT 5 subscriptions use No Local and every
uplink PUBLISH carries the user property ``microenvoy-origin: <client id>`` (dropped if it comes back); MQTT
3.1.1 has no No Local, so a message whose (topic, payload) this session published within ``loop_window``
seconds is dropped once when it comes back down. Injected messages never reach bridge routes (those act on
PUBLISHes of local clients only), so nothing that came down goes back up.

I/O model: paho is driven from the asyncio loop (``loop_read`` / ``loop_write`` on reader/writer callbacks,
``loop_misc`` on a 1 s timer); only the blocking TCP connect + TLS handshake (``Client.reconnect``) runs in
the default executor, while nothing else touches the client. Every callback therefore runs on the loop
thread, with no locking or thread hand-off per message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random as _random
import socket
import ssl
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

from microenvoy.admin.stats import Store
from microenvoy.codecs.mqtt.packets import Properties, Publish, ReasonCode
from microenvoy.config.model import Cluster
from microenvoy.config.mqtt_cluster import MqttBroker, MqttSubscription
from microenvoy.core.headers import Headers
from microenvoy.io import tls as _tls
from microenvoy.io.upstream import UpstreamCluster, UpstreamError, UpstreamStream
from microenvoy.mqtt.topics import topic_matches, topic_name_error
from microenvoy.upstream.host import Host

if TYPE_CHECKING:
    from microenvoy.io.upstream import ClusterManager

__all__ = [
    "DOWNLINK_ORIGIN",
    "ORIGIN_PROPERTY",
    "MqttBrokerCluster",
    "MqttPublishStream",
    "is_downlink_origin",
    "local_front",
    "register_local_front",
]

log = logging.getLogger("microenvoy.mqtt_upstream")

DOWNLINK_ORIGIN = "\x00microenvoy:mqtt_broker"
"""Origin (``Broker.inject(origin=...)``) of downlink messages: contains NUL, which no MQTT client id may
[MQTT-1.5.4-2], so No Local never hides them from a local client and nothing can impersonate it."""
ORIGIN_PROPERTY = "microenvoy-origin"
"""MQTT 5 user property on every uplink PUBLISH: the session's client id (a downlink carrying ours is an
echo)."""
_MISC_INTERVAL = 1.0
_ECHO_MAX = 4096
_NACK_STATUS: dict[int, int] = {
    ReasonCode.NOT_AUTHORIZED: 403,
    ReasonCode.QUOTA_EXCEEDED: 429,
    ReasonCode.PAYLOAD_FORMAT_INVALID: 400,
    ReasonCode.TOPIC_NAME_INVALID: 404,
}
"""Negative MQTT 5 acknowledgements that keep their meaning through the bridge's ``ack_reason`` mapping;
every other reason >= 0x80 is a 503."""

_fronts: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


# ============================================================================== local broker registry
def register_local_front(clusters: ClusterManager, listener_name: str, front: Any) -> None:
    """Make ``front`` (an ``io.mqtt_front.MqttFront``) the downlink target for ``listener_name`` of the
    agent whose cluster manager is ``clusters`` (call it whenever the server builds an MQTT front; the
    latest one wins). Downlink messages held while the listener was not up are delivered now."""
    _fronts.setdefault(clusters, {})[listener_name] = front
    for cluster in clusters.clusters.values():
        if isinstance(cluster, MqttBrokerCluster):
            cluster.flush_pending()


def local_front(clusters: ClusterManager | None, listener_name: str) -> Any:
    """The registered front of ``listener_name`` (None if there is none yet)."""
    if clusters is None:
        return None
    return _fronts.get(clusters, {}).get(listener_name)


def is_downlink_origin(origin: str) -> bool:
    """Did a message with this ``inject`` origin come down from an upstream MQTT broker cluster?"""
    return origin == DOWNLINK_ORIGIN


# ============================================================================================ stats
class _MqttStats:
    """``cluster.<name>.mqtt_*`` (the ``upstream_*`` ones are the HTTP cluster's)."""

    def __init__(self, cluster: UpstreamCluster) -> None:
        c, g = cluster.stats.counter, cluster.stats.gauge
        self.connected = g("mqtt_connected")
        self.session_present = g("mqtt_session_present")
        """1 when the broker's last CONNACK said it kept our session (persistent session resumed)."""
        self.published = c("mqtt_published")
        self.published_qos = [c(f"mqtt_published_qos{q}") for q in range(3)]
        self.acked = c("mqtt_acked")
        self.nacked = c("mqtt_nacked")
        self.publish_failed = c("mqtt_publish_failed")
        self.inflight = g("mqtt_inflight")
        self.inflight_overflow = c("mqtt_inflight_overflow")
        self.not_connected = c("mqtt_not_connected")
        self.lost_inflight = c("mqtt_lost_inflight")
        self.reconnects = c("mqtt_reconnects")
        self.connack_refused = c("mqtt_connack_refused")
        self.subscribe_failed = c("mqtt_subscribe_failed")
        self.subscriptions_active = g("mqtt_subscriptions_active")
        """Downlink subscriptions the broker granted on this connection (or kept in a resumed session)."""
        self.downlink_received = c("mqtt_downlink_received")
        self.downlink_delivered = c("mqtt_downlink_delivered")
        self.downlink_dropped = c("mqtt_downlink_dropped")
        self.downlink_loop_dropped = c("mqtt_downlink_loop_dropped")


# ============================================================================================ streams
class MqttPublishStream(UpstreamStream):
    """One bridged exchange: the request body becomes one PUBLISH; the acknowledgement is the response."""

    __slots__ = ("_chunks", "_mid", "_request", "_size")

    def __init__(self, cluster: MqttBrokerCluster, host: Host, stream_id: int, request: _Request) -> None:
        super().__init__(cluster, host, stream_id)
        self._request = request
        self._chunks: list[bytes] = []
        self._size = 0
        self._mid: int | None = None

    async def send_data(self, data: bytes, end_stream: bool) -> None:
        if self._request_ended:
            return
        if self._error is not None:
            raise self._error
        if data:
            self._chunks.append(data)
            self._size += len(data)
        if end_stream:
            self._end_request()

    async def send_trailers(self, trailers: Headers) -> None:
        if self._request_ended:
            return
        if self._error is not None:
            raise self._error
        self._end_request()

    def reset(self) -> None:
        if self._done:
            return
        self._request_ended = True
        self._cluster._stats.rq_tx_reset.inc()
        cast(MqttBrokerCluster, self._cluster)._forget(self)
        self._fail(UpstreamError("reset", "reset by the caller"), by_caller=True)

    def _end_request(self) -> None:
        self._request_ended = True
        payload = b"".join(self._chunks)
        self._chunks = []
        cast(MqttBrokerCluster, self._cluster)._publish(self, payload)

    def _answer(self, status: int, reason: str, reason_code: int | None = None) -> None:
        """The synthetic response (headers and a short text body)."""
        body = (reason + "\n").encode("utf-8", "replace") if reason else b""
        fields = [(b":status", b"%d" % status)]
        if body:
            fields += [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
        if reason_code is not None:
            fields.append((b"x-microenvoy-mqtt-reason-code", b"0x%02x" % reason_code))
        self._on_headers(Headers(fields), end_stream=not body)
        if body:
            self._on_data(body, 0, True)


class _Request:
    """What the exchange asked to publish (taken from its request headers)."""

    __slots__ = ("client_id", "content_type", "qos", "retain", "topic")

    def __init__(self, topic: str, qos: int, retain: bool, client_id: str, content_type: str) -> None:
        self.topic = topic
        self.qos = qos
        self.retain = retain
        self.client_id = client_id
        self.content_type = content_type


def _request_from(headers: Headers, cfg: MqttBroker) -> _Request:
    raw_topic = headers.get(b"x-microenvoy-mqtt-topic")
    if raw_topic is not None:
        topic = raw_topic.decode("utf-8", "replace")
    else:  # a non-MQTT exchange, or metadata not passed: the path without "/" (and query), decoded
        path = (headers.get(b":path") or b"/").split(b"?", 1)[0]
        topic = unquote(path.decode("latin-1")[1:], errors="replace")
    qos = cfg.qos
    if qos is None:
        raw_qos = headers.get(b"x-microenvoy-mqtt-qos")
        qos = int(raw_qos) if raw_qos in (b"0", b"1", b"2") else 1
    client_id = (headers.get(b"x-microenvoy-mqtt-client-id") or b"").decode("utf-8", "replace")
    content_type = (headers.get(b"content-type") or b"").decode("latin-1")
    if content_type == "application/octet-stream":
        content_type = ""
    topic_out = cfg.publish_topic.replace("{topic}", topic).replace("{client_id}", client_id)
    retain = headers.get(b"x-microenvoy-mqtt-retain") == b"1"
    return _Request(topic_out, qos, retain, client_id, content_type)


# ============================================================================================ TLS
class _SniContext:
    """paho wraps its socket with ``server_hostname=<the host it dials>`` (an IP here): this hands the
    cluster's ``sni`` (or nothing) to the real context instead."""

    def __init__(self, ctx: ssl.SSLContext, sni: str) -> None:
        self._ctx = ctx
        self._sni = sni or None
        self.check_hostname = ctx.check_hostname

    def wrap_socket(
        self, sock: socket.socket, server_hostname: str | None = None, **kw: Any
    ) -> ssl.SSLSocket:
        return self._ctx.wrap_socket(sock, server_hostname=self._sni, **kw)


class _SanMismatch(Exception):
    """The broker's certificate has none of the configured subject alt names."""


# ============================================================================================ the cluster
class MqttBrokerCluster(UpstreamCluster):
    """An upstream MQTT broker as a cluster (see the module docstring)."""

    keeps_mqtt_metadata = True

    def __init__(
        self,
        config: Cluster,
        stats: Store,
        *,
        random: _random.Random | None = None,
        manager: ClusterManager | None = None,
    ) -> None:
        super().__init__(config, stats, random=random)
        assert isinstance(config.mqtt_broker, MqttBroker)
        self.mqtt: MqttBroker = config.mqtt_broker
        self._manager = manager
        self._m = _MqttStats(self)
        self._v5 = self.mqtt.protocol == "v5"
        self._client: Any = None
        self._connected_host: Host | None = None
        self._connected = False
        self._fd = -1
        self._waiting: dict[int, MqttPublishStream] = {}
        self._next_stream = 0
        self._host_index = 0
        self._task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._connack: asyncio.Future[bool] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._closing = False
        self._echo: collections.OrderedDict[tuple[str, int, int], float] = collections.OrderedDict()
        self._held: collections.deque[tuple[str, Publish]] = collections.deque()
        self._sub_filters = [s.topic_filter for s in self.mqtt.subscriptions]
        self._client_id = self.mqtt.client_id

    def __repr__(self) -> str:
        state = "connected" if self._connected else "closing" if self._closing else "disconnected"
        return (
            f"<MqttBrokerCluster {self.name} {self.mqtt.protocol} {state}"
            f" inflight={len(self._waiting)} hosts={len(self.hosts)}>"
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> asyncio.Future[None]:
        """Start the session (connects in the background) and return ``warmed`` (done at once: a broker
        that is down must not hold up the listeners; exchanges get 503 until it is connected)."""
        warmed = super().start()
        if self._task is None and not self._closing:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            self._task = self._loop.create_task(self._run(), name=f"mqtt-cluster:{self.name}")
        return warmed

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def connection_count(self) -> int:
        return 1 if self._fd >= 0 or (self._connecting is not None and not self._connecting.done()) else 0

    def drain(self) -> None:
        """Replaced or removed: no new exchanges; the session ends once its acknowledgements are in (or
        after the connect timeout), without reconnecting."""
        super().drain()
        if self._loop is not None and not self._closing:
            self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + max(1.0, self.config.connect_timeout)
        while self._waiting and time.monotonic() < deadline and self._connected:
            lost = self._lost
            if lost is None:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(lost), 0.05)
        self.close()

    def close(self) -> None:
        super().close()
        if self._closing:
            return
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        client = self._client
        if client is not None and self._connected:
            client.disconnect()  # DISCONNECT is written by loop_write, then paho closes the socket
        elif self._fd >= 0:
            self._shutdown_socket()

    async def stop(self) -> None:
        await super().stop()
        if not self._closing:
            self.close()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._connecting is not None and not self._connecting.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._connecting), self.config.connect_timeout + 1)
        lost = self._lost
        if self._fd >= 0 and lost is not None and not lost.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(lost), 1.0)
        if self._fd >= 0:
            self._shutdown_socket()
            if lost is not None and not lost.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(lost), 1.0)
        self._close_client_socket()

    # -- the connection loop ---------------------------------------------------------------------
    def _make_client(self) -> Any:
        from paho.mqtt import client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        cfg = self.mqtt
        client_id = cfg.client_id.replace("%h", socket.gethostname())
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if self._v5 else cfg.clean_session,
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
            reconnect_on_failure=False,
        )
        client.connect_timeout = self.config.connect_timeout
        client.max_inflight_messages_set(cfg.max_inflight)
        if cfg.username:
            password = cfg.password.read().decode("utf-8") if cfg.password is not None else None
            client.username_pw_set(cfg.username, password)
        tls_cfg = self.config.transport_socket
        if tls_cfg is not None:
            ctx = _tls.client_context(tls_cfg, [])
            client.tls_set_context(cast(ssl.SSLContext, _SniContext(ctx, tls_cfg.sni)))
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._client_id = client_id
        return client

    def _next_host(self) -> Host | None:
        hosts = self.hosts
        if not hosts:
            return None
        host = hosts[self._host_index % len(hosts)]
        return host

    def _backoff(self, attempt: int) -> float:
        b = self.mqtt.reconnect_backoff
        ceiling = min(b.max_interval, b.base_interval * (2 ** min(attempt, 30)))
        return float(self._random.uniform(b.base_interval / 2, ceiling))  # full jitter, floor base/2

    async def _run(self) -> None:
        failures = 0
        first = True
        try:
            while not self._closing and not self.draining:  # a retired cluster never reconnects
                host = self._next_host()
                if host is not None:
                    if not first:
                        self._m.reconnects.inc()
                    first = False
                    if await self._connect_once(host):
                        failures = 0
                        assert self._lost is not None
                        await asyncio.shield(self._lost)
                    else:
                        failures += 1
                        self._host_index += 1  # try the next endpoint next time
                if self._closing or self.draining:
                    return
                await asyncio.sleep(self._backoff(failures))
        except asyncio.CancelledError:
            return

    async def _connect_once(self, host: Host) -> bool:
        loop = asyncio.get_running_loop()
        if self._client is None:
            self._client = self._make_client()
        client = self._client
        cfg = self.mqtt
        ip, port = host.address
        if self._v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties as PahoProperties

            props = PahoProperties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: no hints
            if not cfg.clean_session:
                props.SessionExpiryInterval = cfg.session_expiry_interval
            client.connect_async(ip, port, cfg.keepalive, clean_start=cfg.clean_session, properties=props)
        else:
            client.connect_async(ip, port, cfg.keepalive)
        self._lost = loop.create_future()
        self._connack = loop.create_future()
        self._connecting = loop.run_in_executor(None, self._blocking_connect)
        try:
            await asyncio.shield(self._connecting)
        except (OSError, ssl.SSLError, ValueError, _SanMismatch) as e:
            self._connect_failed(host, f"{type(e).__name__}: {e}")
            return False
        if self._closing:
            self._close_client_socket()
            return False
        sock = client.socket()
        if sock is None:
            self._connect_failed(host, "no socket")
            return False
        self._fd = sock.fileno()
        loop.add_reader(self._fd, self._readable)
        if client.want_write():
            loop.add_writer(self._fd, self._writable)
        self._misc = loop.call_later(_MISC_INTERVAL, self._on_misc)
        self._connected_host = host
        try:
            ok = await asyncio.wait_for(asyncio.shield(self._connack), self.config.connect_timeout)
        except TimeoutError:
            ok = False
            self._connect_failed(host, "no CONNACK in time")
            self._shutdown_socket()
        if not ok:
            if not self._lost.done():  # refused: paho closes the socket itself
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._lost), 1.0)
            if self._fd >= 0:
                self._shutdown_socket()
            return False
        return True

    def _blocking_connect(self) -> None:
        """In the executor: TCP connect + TLS handshake + CONNECT queued (the loop does not touch the client
        meanwhile)."""
        client = self._client
        client.reconnect()
        tls_cfg = self.config.transport_socket
        if tls_cfg is not None and tls_cfg.common_tls_context.match_subject_alt_names:
            sock = client.socket()
            if not _tls.check_subject_alt_names(sock, tls_cfg.common_tls_context.match_subject_alt_names):
                client._sock_close()  # paho has no public abort before CONNACK
                raise _SanMismatch("certificate SAN mismatch")

    def _connect_failed(self, host: Host, why: str) -> None:
        self._stats.cx_connect_fail.inc()
        host.cx_connect_fail += 1
        self._report_local(host, "connect_failed")
        log.info("cluster %s: connecting to %s failed: %s", self.name, host.address_text, why)

    def _shutdown_socket(self) -> None:
        """Make paho see the connection end (its own loss handling runs on the next read)."""
        sock = self._client.socket() if self._client is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        else:
            self._socket_gone()

    def _close_client_socket(self) -> None:
        client = self._client
        if client is not None and client.socket() is not None:
            client._sock_close()  # end of life: paho's own cleanup (calls _on_socket_close)
        self._socket_gone()

    # -- paho I/O on the loop --------------------------------------------------------------------
    def _readable(self) -> None:
        client = self._client
        rc = client.loop_read()
        sock = client.socket()
        while rc == 0 and isinstance(sock, ssl.SSLSocket) and sock.pending():
            rc = client.loop_read()
            sock = client.socket()

    def _writable(self) -> None:
        self._client.loop_write()

    def _on_misc(self) -> None:
        self._misc = None
        client = self._client
        if client is None or self._fd < 0:
            return
        client.loop_misc()
        if self._fd >= 0 and self._loop is not None:
            self._misc = self._loop.call_later(_MISC_INTERVAL, self._on_misc)

    def _on_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _on_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._on_thread() and self._fd >= 0 and self._loop is not None:
            self._loop.add_writer(self._fd, self._writable)
        # (from the executor during connect: _connect_once checks want_write() afterwards)

    def _on_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._on_thread() and self._fd >= 0 and self._loop is not None:
            self._loop.remove_writer(self._fd)

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._on_thread():
            self._socket_gone()

    def _socket_gone(self) -> None:
        """The connection ended (any reason): unregister, fail what waits for an ack, wake the loop."""
        loop = self._loop
        if self._fd >= 0 and loop is not None:
            loop.remove_reader(self._fd)
            loop.remove_writer(self._fd)
        self._fd = -1
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        host = self._connected_host
        if self._connected:
            self._connected = False
            self._m.connected.set(0)
            self._m.subscriptions_active.set(0)
            st = self._stats
            st.cx_active.dec()
            st.cx_destroy.inc()
            (st.cx_destroy_local if self._closing else st.cx_destroy_remote).inc()
            if host is not None:
                host.cx_active -= 1
            log.info("cluster %s: disconnected from the broker", self.name)
        self._connected_host = None
        waiting, self._waiting = self._waiting, {}
        self._m.inflight.set(0)
        for stream in waiting.values():
            self._m.lost_inflight.inc()
            stream._fail(UpstreamError("reset", "broker connection lost before the acknowledgement"))
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(False)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    # -- paho callbacks (loop thread) ------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        host = self._connected_host
        if reason_code.is_failure:
            self._m.connack_refused.inc()
            if host is not None:
                self._connect_failed(host, f"CONNACK {reason_code}")
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(False)
            return
        self._connected = True
        self._m.connected.set(1)
        self._m.session_present.set(1 if flags.session_present else 0)
        st = self._stats
        st.cx_total.inc()
        st.cx_active.inc()
        if host is not None:
            host.cx_active += 1
            host.cx_total += 1
            self._report_local(host, "connect_success")
        log.info(
            "cluster %s: connected to %s as %r (session present: %s)",
            self.name,
            host.address_text if host is not None else "?",
            self._client_id,
            bool(flags.session_present),
        )
        if self.mqtt.subscriptions and (self._v5 or self.mqtt.clean_session or not flags.session_present):
            self._subscribe(client)
        elif self.mqtt.subscriptions:  # 3.1.1 session resumed: the broker kept the subscriptions
            self._m.subscriptions_active.set(len(self.mqtt.subscriptions))
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(True)

    def _subscribe(self, client: Any) -> None:
        if self._v5:
            from paho.mqtt.subscribeoptions import SubscribeOptions

            topics: list[tuple[str, Any]] = [
                (
                    s.topic_filter,
                    SubscribeOptions(
                        qos=s.qos,
                        noLocal=True,
                        retainAsPublished=True,
                        retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB,
                    ),
                )
                for s in self.mqtt.subscriptions
            ]
        else:
            topics = [(s.topic_filter, s.qos) for s in self.mqtt.subscriptions]
        rc, _mid = client.subscribe(topics)
        if rc != 0:
            self._m.subscribe_failed.inc()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        self._m.subscriptions_active.set(sum(1 for rc in reason_codes if not rc.is_failure))
        for sub, rc in zip(self.mqtt.subscriptions, reason_codes, strict=False):
            if rc.is_failure:
                self._m.subscribe_failed.inc()
                log.warning("cluster %s: broker refused subscription %r: %s", self.name, sub.topic_filter, rc)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        stream = self._waiting.pop(mid, None)
        self._m.inflight.set(len(self._waiting))
        if stream is None:
            return  # reset/timed out meanwhile, or a retransmission from an earlier connection
        code = int(reason_code.value) if reason_code is not None else 0
        if code >= 0x80:
            self._m.nacked.inc()
            status = _NACK_STATUS.get(code, 503)
            stream._answer(status, f"broker refused the message: {reason_code}", code)
        else:
            self._m.acked.inc()
            stream._answer(200, "", code if self._v5 else None)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._m.downlink_received.inc()
        topic: str = msg.topic
        payload = bytes(msg.payload)
        props = getattr(msg, "properties", None)
        user_props: list[tuple[str, str]] = list(getattr(props, "UserProperty", None) or [])
        if self._v5:
            if any(k == ORIGIN_PROPERTY and v == self._client_id for k, v in user_props):
                self._m.downlink_loop_dropped.inc()
                return
        elif self._echo_take(topic, payload):
            self._m.downlink_loop_dropped.inc()
            return
        sub = self._subscription_for(topic)
        if sub is None:
            self._m.downlink_dropped.inc()
            return
        local = topic
        if sub.strip_prefix and local.startswith(sub.strip_prefix):
            local = local[len(sub.strip_prefix) :]
        local = sub.local_prefix + local
        content_type = getattr(props, "ContentType", None) if props is not None else None
        expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
        publish = Publish(
            topic=local,
            payload=payload,
            qos=min(int(msg.qos), sub.qos),
            retain=bool(msg.retain),
            properties=Properties(
                content_type=content_type,
                message_expiry_interval=expiry,
                user_properties=tuple((k, v) for k, v in user_props if k != ORIGIN_PROPERTY),
            ),
        )
        self._deliver(sub.listener, publish)

    def _subscription_for(self, topic: str) -> MqttSubscription | None:
        for sub in self.mqtt.subscriptions:
            if topic_matches(sub.topic_filter, topic):
                return sub
        return None

    # -- downlink into the local broker ------------------------------------------------------------
    def _deliver(self, listener: str, publish: Publish) -> None:
        front = local_front(self._manager, listener)
        if front is None:
            if len(self._held) < self.mqtt.max_pending_downlink:
                self._held.append((listener, publish))
            else:
                self._m.downlink_dropped.inc()
            return
        out = front.broker.inject(publish, time.monotonic(), origin=DOWNLINK_ORIGIN)
        if out.reason_code == ReasonCode.TOPIC_NAME_INVALID:
            self._m.downlink_dropped.inc()
            return
        front.deliver(out.deliveries)
        self._m.downlink_delivered.inc()

    def flush_pending(self) -> None:
        """Deliver downlink messages held while their listener was not registered."""
        held, self._held = self._held, collections.deque()
        for listener, publish in held:
            self._deliver(listener, publish)

    # -- loop suppression for MQTT 3.1.1 -------------------------------------------------------------
    def _echo_key(self, topic: str, payload: bytes) -> tuple[str, int, int]:
        return (topic, len(payload), hash(payload))

    def _echo_note(self, topic: str, payload: bytes) -> None:
        if self._v5 or self.mqtt.loop_window <= 0:
            return
        if not any(topic_matches(f, topic) for f in self._sub_filters):
            return
        echo = self._echo
        echo[self._echo_key(topic, payload)] = time.monotonic() + self.mqtt.loop_window
        while len(echo) > _ECHO_MAX:
            echo.popitem(last=False)

    def _echo_take(self, topic: str, payload: bytes) -> bool:
        echo = self._echo
        now = time.monotonic()
        while echo:
            _key, expiry = next(iter(echo.items()))
            if expiry > now:
                break
            echo.popitem(last=False)
        return echo.pop(self._echo_key(topic, payload), None) is not None

    # -- uplink ----------------------------------------------------------------------------------
    def choose_host(self, hash_key: int | None = None) -> Host | None:
        """The broker the session is connected to (one session per cluster), else the balancer's pick."""
        if self._connected_host is not None:
            return self._connected_host
        return super().choose_host(hash_key)

    async def open_stream(self, host: Host, headers: Headers, *, end_stream: bool) -> UpstreamStream:
        """A stream publishing the exchange when its request ends; raises ``UpstreamError``."""
        if self.draining:
            raise UpstreamError("connect-failure", f"cluster {self.name} was removed")
        if self._rq_active >= self.max_requests:
            self._stats.rq_pending_overflow.inc()
            raise UpstreamError(
                "overflow", f"cluster {self.name}: max_requests ({self.max_requests}) reached"
            )
        if not self._connected:
            self._m.not_connected.inc()
            raise UpstreamError("connect-failure", f"cluster {self.name}: not connected to the broker")
        if len(self._waiting) >= self.mqtt.max_inflight:
            self._m.inflight_overflow.inc()
            raise UpstreamError(
                "overflow", f"cluster {self.name}: max_inflight ({self.mqtt.max_inflight}) reached"
            )
        self._next_stream += 1
        if self._connected_host is not None:
            host = self._connected_host
        stream = MqttPublishStream(self, host, self._next_stream, _request_from(headers, self.mqtt))
        if end_stream:
            stream._end_request()
        return stream

    def _publish(self, stream: MqttPublishStream, payload: bytes) -> None:
        req = stream._request
        err = topic_name_error(req.topic)
        if err is not None:
            self._m.publish_failed.inc()
            stream._answer(404, f"invalid topic {req.topic!r}: {err}", ReasonCode.TOPIC_NAME_INVALID)
            return
        client = self._client
        if not self._connected or client is None:
            self._m.not_connected.inc()
            stream._answer(503, "not connected to the broker")
            return
        if len(self._waiting) >= self.mqtt.max_inflight:
            self._m.inflight_overflow.inc()
            stream._answer(503, "too many messages awaiting the broker's acknowledgement")
            return
        props = None
        if self._v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties as PahoProperties

            props = PahoProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho: no hints
            user = [(ORIGIN_PROPERTY, self._client_id)]
            if req.client_id:
                user.append(("microenvoy-client-id", req.client_id))
            props.UserProperty = user
            if req.content_type:
                props.ContentType = req.content_type
        self._echo_note(req.topic, payload)
        try:
            info = client.publish(req.topic, payload, req.qos, req.retain, props)
        except (ValueError, TypeError) as e:
            self._m.publish_failed.inc()
            stream._answer(503, f"publish failed: {e}")
            return
        if info.rc != 0:
            self._m.publish_failed.inc()
            stream._answer(503, f"publish failed: rc {info.rc}")
            return
        self._m.published.inc()
        self._m.published_qos[req.qos].inc()
        stream._mid = info.mid
        self._waiting[info.mid] = stream
        self._m.inflight.set(len(self._waiting))

    def _forget(self, stream: MqttPublishStream) -> None:
        mid = stream._mid
        if mid is not None and self._waiting.get(mid) is stream:
            del self._waiting[mid]
            self._m.inflight.set(len(self._waiting))
        stream._mid = None

    def admin_lines(self) -> list[str]:
        lines = super().admin_lines()
        lines.append(f"{self.name}::mqtt::connected::{str(self._connected).lower()}")
        lines.append(f"{self.name}::mqtt::client_id::{getattr(self, '_client_id', self.mqtt.client_id)}")
        return lines
