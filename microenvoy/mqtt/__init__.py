"""The local MQTT broker core (sans-IO): topics and the subscription index, retained messages, sessions and
the :class:`~microenvoy.mqtt.broker.Broker` the MQTT listener drives.

Nothing here does I/O or reads a clock: the listener passes decoded packets (``microenvoy.codecs.mqtt.
packets``) and ``now``, and writes the deliveries it gets back.
"""

from microenvoy.mqtt.broker import (
    Batch,
    Broker,
    BrokerLimits,
    ConnectResult,
    PublishOutcome,
    SubscribeOutcome,
)
from microenvoy.mqtt.retained import RetainedMessage, RetainedStore, RetainOutcome
from microenvoy.mqtt.session import Delivery, QueuedMessage, Session, SessionConfig, SubscriptionEntry
from microenvoy.mqtt.topics import (
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
    "Delivery",
    "PublishOutcome",
    "QueuedMessage",
    "RetainOutcome",
    "RetainedMessage",
    "RetainedStore",
    "Session",
    "SessionConfig",
    "SubscribeOutcome",
    "SubscriptionEntry",
    "SubscriptionIndex",
    "TopicLimits",
    "parse_shared",
    "topic_filter_error",
    "topic_name_error",
]
