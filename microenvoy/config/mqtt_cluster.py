"""Upstream MQTT broker cluster config: a cluster with ``cluster_type`` ``microenvoy.clusters.mqtt_broker``.

Envoy's custom-cluster shape (``cluster_type: {name, typed_config}``, no ``type``); the broker addresses come
from the cluster's ``load_assignment`` (STATIC) and TLS from its ``transport_socket`` (UpstreamTlsContext)::

    - name: cloud
      connect_timeout: 5s
      cluster_type:
        name: microenvoy.clusters.mqtt_broker
        typed_config:
          "@type": type.googleapis.com/microenvoy.extensions.clusters.mqtt_broker.v1.MqttBroker
          client_id: gw-17-cloud            # default "<node id>-<cluster name>"; %h = this host's name
          protocol: v5                      # v5 | v311
          publish_topic: "site-a/{topic}"
          subscriptions:
          - {topic_filter: "commands/#", qos: 1, strip_prefix: "commands/", local_prefix: "cmd/",
             listener: mqtt_in}
      load_assignment: {...}

The runtime is ``microenvoy.io.mqtt_upstream.MqttBrokerCluster``; user docs: ``docs/mqtt-upstream.md``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from microenvoy.config.model import Bootstrap, Cluster, DataSource
from microenvoy.config.reader import Reader

__all__ = [
    "CLUSTER_TYPE_NAME",
    "TYPE_URL",
    "MqttBroker",
    "MqttSubscription",
    "ReconnectBackoff",
    "check_mqtt_clusters",
    "parse_cluster_type",
    "parse_mqtt_broker",
    "with_node_id",
]

CLUSTER_TYPE_NAME = "microenvoy.clusters.mqtt_broker"
TYPE_URL = "type.googleapis.com/microenvoy.extensions.clusters.mqtt_broker.v1.MqttBroker"
_PROTOCOLS = ("v5", "v311")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_TEMPLATE_NAMES = ("topic", "client_id")
_MAX_CLIENT_ID = 65535
_MQTT_PROXY = "microenvoy.filters.network.mqtt_proxy"


@dataclass(frozen=True, slots=True)
class ReconnectBackoff:
    """Jittered exponential backoff between connection attempts (Envoy's BackoffStrategy field names)."""

    base_interval: float = 0.5
    """Seconds before the first retry; doubled after each failed attempt."""
    max_interval: float = 30.0
    """Upper bound of the delay (seconds)."""


@dataclass(frozen=True, slots=True)
class MqttSubscription:
    """A downlink: messages from the upstream broker delivered into a local MQTT listener's broker."""

    topic_filter: str
    """Subscribed on the upstream broker (``+``/``#`` allowed)."""
    listener: str
    """Name of the listener (with an ``mqtt_proxy`` filter) whose local broker receives the messages."""
    qos: int = 1
    """Maximum QoS requested for the subscription."""
    strip_prefix: str = ""
    """Removed from the start of the topic (when it starts with it) before ``local_prefix`` is added."""
    local_prefix: str = ""
    """Prepended to the (stripped) topic: the local topic name."""


@dataclass(frozen=True, slots=True)
class MqttBroker:
    """``typed_config`` of a ``microenvoy.clusters.mqtt_broker`` cluster."""

    client_id: str = ""
    """MQTT client identifier; empty = ``<node id>-<cluster name>`` (filled in at load). ``%h`` is replaced
    by the host name at connect time."""
    protocol: str = "v5"
    """``v5`` (MQTT 5.0) or ``v311`` (MQTT 3.1.1)."""
    clean_session: bool = False
    """False: a persistent session (subscriptions and unacknowledged QoS 1/2 survive reconnects)."""
    session_expiry_interval: int = 3600
    """MQTT 5 Session Expiry Interval (seconds) of a persistent session."""
    keepalive: int = 60
    """Keep Alive in seconds (0 disables)."""
    username: str = ""
    password: DataSource | None = None
    """Envoy DataSource (``inline_string`` / ``filename``); redacted in ``/config_dump``."""
    publish_topic: str = "{topic}"
    """Uplink topic template: ``{topic}`` is the exchange's MQTT topic (or its ``:path`` without the leading
    ``/``), ``{client_id}`` the publishing device's client id."""
    qos: int | None = None
    """QoS of uplink publishes; None = the exchange's QoS (``x-microenvoy-mqtt-qos``), else 1."""
    max_inflight: int = 32
    """Uplink publishes awaiting the broker's acknowledgement; more are answered 503 (overflow)."""
    reconnect_backoff: ReconnectBackoff = ReconnectBackoff()
    subscriptions: tuple[MqttSubscription, ...] = ()
    loop_window: float = 30.0
    """MQTT 3.1.1 (no No Local): seconds a published message's (topic, payload) is remembered, so its echo
    from an overlapping downlink subscription is dropped."""
    max_pending_downlink: int = 1000
    """Downlink messages held while the target listener is not up yet (beyond: dropped, counted)."""


def _template_error(template: str) -> str | None:
    for name in _PLACEHOLDER.findall(template):
        if name not in _TEMPLATE_NAMES:
            return f"unknown placeholder {{{name}}} (use {{topic}} or {{client_id}})"
    if "+" in template or "#" in template:
        return "a topic name must not contain + or #"
    return None


def _filter_error(topic_filter: str) -> str | None:
    from microenvoy.mqtt.topics import topic_filter_error

    return topic_filter_error(topic_filter)


def _prefix_error(prefix: str) -> str | None:
    if "+" in prefix or "#" in prefix or "\x00" in prefix:
        return "must not contain +, # or NUL"
    return None


def _parse_subscription(r: Reader) -> MqttSubscription:
    topic_filter: str = r.string("topic_filter", required=True)
    if isinstance(r.raw.get("topic_filter"), str):
        err = _filter_error(topic_filter)
        if err is not None:
            r.error(err, "topic_filter")
        elif topic_filter.startswith("$share/"):
            r.error("shared subscriptions are not supported for downlinks", "topic_filter")
    listener: str = r.string("listener", required=True)
    if r.raw.get("listener") == "":
        r.error("must not be empty", "listener")
    strip: str = r.string("strip_prefix", "")
    local: str = r.string("local_prefix", "")
    for key, value in (("strip_prefix", strip), ("local_prefix", local)):
        err = _prefix_error(value)
        if err is not None:
            r.error(err, key)
    sub = MqttSubscription(
        topic_filter=topic_filter,
        listener=listener,
        qos=r.integer("qos", 1, min=0, max=2),
        strip_prefix=strip,
        local_prefix=local,
    )
    r.finish()
    return sub


def _parse_backoff(r: Reader) -> ReconnectBackoff:
    d = ReconnectBackoff()
    base: float = r.duration("base_interval", d.base_interval)
    if base <= 0:
        r.error("must be greater than 0", "base_interval")
        base = d.base_interval
    top: float = r.duration("max_interval", max(d.max_interval, base))
    if top < base:
        r.error("must not be smaller than base_interval", "max_interval")
        top = base
    r.finish()
    return ReconnectBackoff(base, top)


def _parse_password(r: Reader) -> DataSource:
    from microenvoy.config.loader import parse_data_source

    return parse_data_source(r)


def parse_mqtt_broker(r: Reader) -> MqttBroker:
    """The ``typed_config`` (without ``@type``) -> ``MqttBroker``; every error goes to ``r``."""
    d = MqttBroker()
    client_id: str = r.string("client_id", "")
    if len(client_id.encode("utf-8", "replace")) > _MAX_CLIENT_ID or "\x00" in client_id:
        r.error("must be at most 65535 bytes of UTF-8 without NUL", "client_id")
    protocol: str = r.enum("protocol", _PROTOCOLS, d.protocol)
    publish_topic: str = r.string("publish_topic", d.publish_topic)
    if isinstance(r.raw.get("publish_topic"), str):
        err = _template_error(publish_topic) or (None if publish_topic else "must not be empty")
        if err is not None:
            r.error(err, "publish_topic")
    qos: int | None = r.integer("qos", min=0, max=2) if r.has("qos") else None
    password = r.object("password", _parse_password)
    username: str = r.string("username", "")
    if password is not None and not username:
        r.error("a password needs a username", "password")
    loop_window: float = r.duration("loop_window", d.loop_window)
    if loop_window < 0:
        r.error("must not be negative", "loop_window")
        loop_window = d.loop_window
    cfg = MqttBroker(
        client_id=client_id,
        protocol=protocol,
        clean_session=r.boolean("clean_session", d.clean_session),
        session_expiry_interval=r.integer(
            "session_expiry_interval", d.session_expiry_interval, min=0, max=0xFFFFFFFF
        ),
        keepalive=r.integer("keepalive", d.keepalive, min=0, max=65535),
        username=username,
        password=password,
        publish_topic=publish_topic,
        qos=qos,
        max_inflight=r.integer("max_inflight", d.max_inflight, min=1, max=65535),
        reconnect_backoff=r.object("reconnect_backoff", _parse_backoff) or ReconnectBackoff(),
        subscriptions=r.objects("subscriptions", _parse_subscription),
        loop_window=loop_window,
        max_pending_downlink=r.integer("max_pending_downlink", d.max_pending_downlink, min=0),
    )
    r.finish()
    return cfg


def parse_cluster_type(r: Reader) -> MqttBroker | None:
    """A cluster's ``cluster_type`` block (``r`` is the cluster): the parsed config, or None (errors
    reported) when it is not a valid ``microenvoy.clusters.mqtt_broker``."""
    ct = r.mapping("cluster_type", required=True)
    if ct is None:
        return None
    name: str = ct.string("name", required=True)
    if isinstance(ct.raw.get("name"), str) and name != CLUSTER_TYPE_NAME:
        ct.error(f"unknown cluster type {name!r} (supported: {CLUSTER_TYPE_NAME})", "name")
        ct.ignore("typed_config")
        ct.finish()
        return None
    raw = ct.get("typed_config")
    cfg: MqttBroker | None = None
    if raw is None:
        cfg = MqttBroker()
    elif not isinstance(raw, dict):
        ct.error("expected a mapping", "typed_config")
    else:
        type_url = raw.get("@type")
        if type_url is not None and type_url != TYPE_URL:
            ct.error(f"expected {TYPE_URL!r}, got {type_url!r}", "typed_config.@type")
        rest = {k: v for k, v in raw.items() if k != "@type"}
        cfg = parse_mqtt_broker(Reader(rest, ct.sub("typed_config"), ct.errors))
    ct.ignore("typed_config")
    ct.finish()
    if r.has("type"):
        r.error("set cluster_type or type, not both", "type")
    return cfg


def with_node_id(clusters: Sequence[Cluster], node_id: str) -> tuple[Cluster, ...]:
    """Fill the default client id (``<node id>-<cluster>``) of every MQTT broker cluster without one."""
    out = []
    for c in clusters:
        mb = c.mqtt_broker
        if isinstance(mb, MqttBroker) and not mb.client_id:
            cid = f"{node_id}-{c.name}" if node_id else f"microenvoy-{c.name}"
            c = replace(c, mqtt_broker=replace(mb, client_id=cid))
        out.append(c)
    return tuple(out)


def check_mqtt_clusters(b: Bootstrap) -> list[str]:
    """Cross-checks (run by the loader's ``cross_check``): every downlink names a listener with an
    ``mqtt_proxy`` filter; health checks are not available on an MQTT broker cluster."""
    errors: list[str] = []
    mqtt_listeners = {
        li.name
        for li in b.static_resources.listeners
        for chain in li.filter_chains
        for f in chain.filters
        if f.name == _MQTT_PROXY
    }
    for i, c in enumerate(b.static_resources.clusters):
        mb = c.mqtt_broker
        if not isinstance(mb, MqttBroker):
            continue
        path = f"static_resources.clusters[{i}]"
        if c.health_checks:
            errors.append(f"{path}.health_checks: not supported on an MQTT broker cluster")
        for j, sub in enumerate(mb.subscriptions):
            if sub.listener and sub.listener not in mqtt_listeners:
                errors.append(
                    f"{path}.cluster_type.typed_config.subscriptions[{j}].listener: no listener named "
                    f"{sub.listener!r} with a {_MQTT_PROXY} filter"
                )
    return errors
