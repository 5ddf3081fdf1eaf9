"""The retained-message store of the local broker (sans-IO; time is the ``now`` argument).

MQTT 5.0 section 3.3.1.3 / 3.1.1 section 3.3.1.3:

* A PUBLISH with RETAIN 1 replaces the retained message of its topic [MQTT-3.3.1-5]; with a zero-byte
  payload it removes it and is not stored itself [MQTT-3.3.1-6] [MQTT-3.3.1-7].
* A retained message whose Message Expiry Interval has passed is no longer delivered (section 3.3.2.3.3);
  expiry is checked when messages are read and swept by :meth:`RetainedStore.expire`.

Bounds: at most ``max_messages`` topics and ``max_bytes`` held bytes (see :func:`microenvoy.mqtt.sizes.
message_size`); a message that would pass a bound is not retained (it is still delivered to current
subscribers) and counted in ``retained_rejected``. Gauges ``retained_messages`` and ``retained_bytes``
follow the store.

Topics are kept in a trie by level, so a wildcard filter (``a/+/c``, ``a/#``) visits only matching branches.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from enum import Enum

from microenvoy.admin.stats import Scope, Store
from microenvoy.codecs.mqtt.packets import Publish
from microenvoy.mqtt.sizes import message_size

__all__ = ["RetainOutcome", "RetainedMessage", "RetainedStore"]


@dataclass(frozen=True, slots=True)
class RetainedMessage:
    """One retained message as published (topic, payload, QoS, properties)."""

    publish: Publish
    """The PUBLISH as received (topic resolved; topic alias, packet id and DUP are not meaningful)."""
    stored_at: float
    """``now`` when it was stored."""
    expires_at: float | None
    """When its Message Expiry Interval runs out; None when it has none."""
    size: int
    """Bytes it is accounted for."""

    def remaining_expiry(self, now: float) -> int | None:
        """The Message Expiry Interval to send at ``now`` (whole seconds, at least 1); None when none."""
        if self.expires_at is None:
            return None
        return max(1, math.ceil(self.expires_at - now))


class RetainOutcome(Enum):
    """What :meth:`RetainedStore.set` did."""

    STORED = "stored"
    """Stored (new topic, or replaced the previous message)."""
    CLEARED = "cleared"
    """A zero-byte payload removed the topic's retained message (or there was none)."""
    REJECTED = "rejected"
    """Over a bound; not stored (the previous message of the topic, if any, is kept)."""


class _Node:
    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.message: RetainedMessage | None = None


class RetainedStore:
    """Retained messages by topic, bounded by count and bytes."""

    def __init__(
        self, max_messages: int = 10_000, max_bytes: int = 8 << 20, stats: Scope | None = None
    ) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._root = _Node()
        self._count = 0
        self._bytes = 0
        self._expiry: list[tuple[float, int, str, RetainedMessage]] = []
        """(expires_at, seq, topic, message) heap; an entry is stale once the topic's message changed."""
        self._seq = 0
        scope = stats if stats is not None else Store().scope("mqtt")
        self._g_count = scope.gauge("retained_messages")
        self._g_bytes = scope.gauge("retained_bytes")
        self._c_rejected = scope.counter("retained_rejected")
        self._c_expired = scope.counter("retained_expired")

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        """Bytes held by every retained message."""
        return self._bytes

    # -------------------------------------------------------------------------------------------- writes

    def set(self, publish: Publish, now: float) -> RetainOutcome:
        """Apply a PUBLISH with RETAIN 1: store, replace or (zero-byte payload) clear its topic's message."""
        if not publish.payload:
            self._remove(publish.topic)
            return RetainOutcome.CLEARED
        size = message_size(publish)
        old = self._find(publish.topic)
        old_size = old.size if old is not None else 0
        if (
            old is None and self._count >= self.max_messages
        ) or self._bytes - old_size + size > self.max_bytes:
            self._expire_due(now)  # room may be held by messages that have expired
            old = self._find(publish.topic)
            old_size = old.size if old is not None else 0
            if (
                old is None and self._count >= self.max_messages
            ) or self._bytes - old_size + size > self.max_bytes:
                self._c_rejected.inc()
                return RetainOutcome.REJECTED
        interval = publish.properties.message_expiry_interval
        expires_at = now + interval if interval is not None else None
        msg = RetainedMessage(publish, now, expires_at, size)
        node = self._root
        for level in publish.topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if node.message is None:
            self._count += 1
        else:
            self._bytes -= node.message.size
        node.message = msg
        self._bytes += size
        if expires_at is not None:
            self._seq += 1
            heapq.heappush(self._expiry, (expires_at, self._seq, publish.topic, msg))
        self._sync()
        return RetainOutcome.STORED

    def clear(self) -> None:
        """Drop every retained message."""
        self._root = _Node()
        self._count = 0
        self._bytes = 0
        self._expiry.clear()
        self._sync()

    def expire(self, now: float) -> int:
        """Remove the messages whose expiry has passed at ``now``; how many were removed."""
        return self._expire_due(now)

    def next_expiry(self) -> float | None:
        """When the next retained message expires (may be a stale, already replaced entry: harmless)."""
        return self._expiry[0][0] if self._expiry else None

    # --------------------------------------------------------------------------------------------- reads

    def get(self, topic: str, now: float) -> RetainedMessage | None:
        """The live retained message of ``topic``, if any."""
        msg = self._find(topic)
        if msg is not None and msg.expires_at is not None and msg.expires_at <= now:
            self._expire_due(now)
            return None
        return msg

    def match(self, topic_filter: str, now: float) -> list[RetainedMessage]:
        """Live retained messages whose topic matches the (valid, non-shared) ``topic_filter``."""
        out: list[RetainedMessage] = []
        expired = False
        levels = topic_filter.split("/")
        n = len(levels)
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if i == n:
                if node.message is not None:
                    out.append(node.message)
                continue
            level = levels[i]
            if level == "#":
                # The parent level and everything below; not $-topics from the root [MQTT-4.7.2-1].
                if node.message is not None and i > 0:
                    out.append(node.message)
                sub: list[_Node] = [
                    c for name, c in node.children.items() if not (i == 0 and name.startswith("$"))
                ]
                while sub:
                    c = sub.pop()
                    if c.message is not None:
                        out.append(c.message)
                    sub.extend(c.children.values())
            elif level == "+":
                for name, c in node.children.items():
                    if i == 0 and name.startswith("$"):
                        continue
                    stack.append((c, i + 1))
            else:
                c2 = node.children.get(level)
                if c2 is not None:
                    stack.append((c2, i + 1))
        live = []
        for m in out:
            if m.expires_at is not None and m.expires_at <= now:
                expired = True
            else:
                live.append(m)
        if expired:
            self._expire_due(now)
        live.sort(key=lambda m: m.stored_at)
        return live

    # ------------------------------------------------------------------------------------------ internals

    def _find(self, topic: str) -> RetainedMessage | None:
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return None
            node = child
        return node.message

    def _remove(self, topic: str) -> RetainedMessage | None:
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return None
            path.append((node, level))
            node = child
        msg = node.message
        if msg is None:
            return None
        node.message = None
        self._count -= 1
        self._bytes -= msg.size
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.children or child.message is not None:
                break
            del parent.children[level]
        self._sync()
        return msg

    def _expire_due(self, now: float) -> int:
        removed = 0
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, _, topic, entry = heapq.heappop(heap)
            if self._find(topic) is entry:
                self._remove(topic)
                removed += 1
        if removed:
            self._c_expired.inc(removed)
        return removed

    def _sync(self) -> None:
        self._g_count.set(self._count)
        self._g_bytes.set(self._bytes)

    def __repr__(self) -> str:
        return f"<RetainedStore messages={self._count} bytes={self._bytes}>"
