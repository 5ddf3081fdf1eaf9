"""MQTT topic names and filters: validation, ``$share/`` parsing and the subscription index (sans-IO).

Rules (MQTT 5.0 section 4.7, the same in 3.1.1 section 4.7):

* ``/`` separates levels; a level may be empty (``/a``, ``a//b``) [MQTT-4.7.1-*].
* ``#`` matches the parent level and any number of child levels; it must be the last level and occupy it
  alone (``sport/#`` matches ``sport``) [MQTT-4.7.1-1].
* ``+`` matches exactly one level (possibly empty) and must occupy a whole level [MQTT-4.7.1-2].
* Topic names (PUBLISH) contain no wildcards [MQTT-3.3.2-2]; names and filters are at least one character
  [MQTT-4.7.3-1], contain no U+0000 [MQTT-4.7.3-2] and are at most 65,535 bytes of UTF-8 [MQTT-4.7.3-3].
* A filter starting with a wildcard (``#``, ``+/...``) does not match a topic name starting with ``$``
  [MQTT-4.7.2-1]; ``$SYS/#`` does.
* A shared subscription is ``$share/<ShareName>/<filter>``: the ShareName is at least one character and
  contains no ``/``, ``+`` or ``#``, and a topic filter follows the ``/`` [MQTT-4.8.2-1] [MQTT-4.8.2-2].

:class:`SubscriptionIndex` is a trie keyed by filter level: matching a topic walks one path per wildcard
branch, so its cost depends on the topic's depth and the wildcards on the way, not on the number of
subscriptions. Each filter node holds the non-shared subscriptions (by client id) and the shared groups
(by ShareName) ending there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "MAX_TOPIC_BYTES",
    "SHARE_PREFIX",
    "SharedFilter",
    "SharedGroup",
    "SubscriptionIndex",
    "TopicLimits",
    "parse_shared",
    "topic_filter_error",
    "topic_matches",
    "topic_name_error",
]

V = TypeVar("V")

MAX_TOPIC_BYTES = 65535
"""The protocol's limit on a topic name or filter, in bytes of UTF-8 [MQTT-4.7.3-3]."""

SHARE_PREFIX = "$share/"
"""Prefix of a shared subscription's topic filter [MQTT-4.8.2-1]."""


@dataclass(frozen=True, slots=True)
class TopicLimits:
    """Bounds on topic names and filters the broker accepts (tighter than the protocol's)."""

    max_bytes: int = MAX_TOPIC_BYTES
    """Longest topic name or filter in bytes of UTF-8 (the protocol allows 65,535)."""
    max_levels: int = 128
    """Most levels (``/``-separated parts) in a name or filter; bounds the subscription trie's depth."""


DEFAULT_LIMITS = TopicLimits()


def _length_error(text: str, limits: TopicLimits) -> str | None:
    if not text:
        return "empty"
    # Four bytes per code point at most: only encode when the text could be over the limit.
    if len(text) * 4 > limits.max_bytes and len(text.encode("utf-8", "surrogatepass")) > limits.max_bytes:
        return f"longer than {limits.max_bytes} bytes"
    if "\x00" in text:
        return "contains U+0000"
    if text.count("/") >= limits.max_levels:
        return f"more than {limits.max_levels} levels"
    return None


def topic_name_error(topic: str, limits: TopicLimits = DEFAULT_LIMITS) -> str | None:
    """Why ``topic`` is not a valid topic name for a PUBLISH (None when it is valid)."""
    err = _length_error(topic, limits)
    if err is not None:
        return err
    if "+" in topic or "#" in topic:
        return "contains a wildcard"
    return None


def topic_filter_error(topic_filter: str, limits: TopicLimits = DEFAULT_LIMITS) -> str | None:
    """Why ``topic_filter`` is not a valid (non-shared) topic filter (None when it is valid)."""
    err = _length_error(topic_filter, limits)
    if err is not None:
        return err
    if "+" not in topic_filter and "#" not in topic_filter:
        return None
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if level == "+":
            continue
        if level == "#":
            if i != last:
                return "'#' is not the last level"
            continue
        if "+" in level or "#" in level:
            return "a wildcard does not occupy a whole level"
    return None


@dataclass(frozen=True, slots=True)
class SharedFilter:
    """A parsed ``$share/<group>/<filter>``."""

    group: str
    """The ShareName."""
    topic_filter: str
    """The topic filter after the ShareName."""


def parse_shared(topic_filter: str, limits: TopicLimits = DEFAULT_LIMITS) -> SharedFilter | str | None:
    """``$share/<group>/<filter>`` -> :class:`SharedFilter`; an error message when it starts with
    ``$share/`` but is malformed; None when it is not a shared subscription."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    rest = topic_filter[len(SHARE_PREFIX) :]
    group, sep, inner = rest.partition("/")
    if not group:
        return "empty ShareName"
    if "+" in group or "#" in group:
        return "ShareName contains a wildcard"
    if not sep or not inner:
        return "no topic filter after the ShareName"
    err = topic_filter_error(inner, limits)
    if err is not None:
        return err
    return SharedFilter(group, inner)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether the (valid, non-shared) ``topic_filter`` matches ``topic`` (the spec's rules by level)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    f = topic_filter.split("/")
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True  # the parent level (i == len(t)) and every child level
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


class SharedGroup(Generic[V]):
    """The members of one shared subscription (``$share/<name>/<filter>``), picked round robin."""

    __slots__ = ("_cursor", "members", "name", "topic_filter")

    def __init__(self, name: str, topic_filter: str) -> None:
        self.name = name
        self.topic_filter = topic_filter
        self.members: dict[str, V] = {}
        """client id -> subscription, in joining order."""
        self._cursor = 0

    def pick(self, eligible: Callable[[str], bool] | None = None) -> tuple[str, V] | None:
        """The next member in round-robin order, preferring members for which ``eligible`` is true (e.g.
        connected); any member when none is eligible; None when the group is empty."""
        n = len(self.members)
        if n == 0:
            return None
        items = list(self.members.items())
        start = self._cursor % n
        if eligible is not None:
            for k in range(n):
                i = (start + k) % n
                if eligible(items[i][0]):
                    self._cursor = i + 1
                    return items[i]
        self._cursor = start + 1
        return items[start]

    def __repr__(self) -> str:
        return f"<SharedGroup $share/{self.name}/{self.topic_filter} members={len(self.members)}>"


class _Node(Generic[V]):
    """A trie node: literal children by level; the ``+`` and ``#`` children apart (no lookup to match)."""

    __slots__ = ("children", "groups", "hash", "plus", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.plus: _Node[V] | None = None
        self.hash: _Node[V] | None = None
        self.subs: dict[str, V] | None = None
        self.groups: dict[str, SharedGroup[V]] | None = None

    def empty(self) -> bool:
        return (
            not self.children
            and self.plus is None
            and self.hash is None
            and not self.subs
            and not self.groups
        )

    def child(self, level: str) -> _Node[V] | None:
        if level == "+":
            return self.plus
        if level == "#":
            return self.hash
        return self.children.get(level)

    def make_child(self, level: str) -> _Node[V]:
        node = self.child(level)
        if node is None:
            node = _Node()
            if level == "+":
                self.plus = node
            elif level == "#":
                self.hash = node
            else:
                self.children[level] = node
        return node

    def drop_child(self, level: str) -> None:
        if level == "+":
            self.plus = None
        elif level == "#":
            self.hash = None
        else:
            del self.children[level]

    def all_children(self) -> Iterator[tuple[str, _Node[V]]]:
        yield from self.children.items()
        if self.plus is not None:
            yield "+", self.plus
        if self.hash is not None:
            yield "#", self.hash


class SubscriptionIndex(Generic[V]):
    """Topic filter -> subscriptions, as a trie over filter levels.

    ``add``/``remove`` take the (validated, non-shared) filter, the client id and, for a shared subscription,
    the group name; ``match`` returns the subscriptions whose filter matches a topic name.
    """

    __slots__ = ("_count", "_root")

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._count = 0

    def __len__(self) -> int:
        """Number of (client, filter[, group]) subscriptions held."""
        return self._count

    def _find(self, topic_filter: str) -> _Node[V] | None:
        node: _Node[V] | None = self._root
        for level in topic_filter.split("/"):
            assert node is not None
            node = node.child(level)
            if node is None:
                return None
        return node

    def add(self, topic_filter: str, client_id: str, value: V, group: str | None = None) -> bool:
        """Add or replace a subscription; True when it is new."""
        node = self._root
        for level in topic_filter.split("/"):
            node = node.make_child(level)
        if group is None:
            if node.subs is None:
                node.subs = {}
            new = client_id not in node.subs
            node.subs[client_id] = value
        else:
            if node.groups is None:
                node.groups = {}
            g = node.groups.get(group)
            if g is None:
                g = node.groups[group] = SharedGroup(group, topic_filter)
            new = client_id not in g.members
            g.members[client_id] = value
        if new:
            self._count += 1
        return new

    def remove(self, topic_filter: str, client_id: str, group: str | None = None) -> bool:
        """Remove a subscription; True when it existed. Empty trie branches are pruned."""
        path: list[tuple[_Node[V], str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.child(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if group is None:
            if not node.subs or client_id not in node.subs:
                return False
            del node.subs[client_id]
            if not node.subs:
                node.subs = None
        else:
            groups = node.groups
            g = groups.get(group) if groups else None
            if groups is None or g is None or client_id not in g.members:
                return False
            del g.members[client_id]
            if not g.members:
                del groups[group]
                if not groups:
                    node.groups = None
        self._count -= 1
        for parent, level in reversed(path):
            child = parent.child(level)
            if child is None or not child.empty():
                break
            parent.drop_child(level)
        return True

    def get(self, topic_filter: str, client_id: str, group: str | None = None) -> V | None:
        """The subscription stored for exactly this filter/client/group, if any."""
        node = self._find(topic_filter)
        if node is None:
            return None
        if group is None:
            return node.subs.get(client_id) if node.subs else None
        g = node.groups.get(group) if node.groups else None
        return g.members.get(client_id) if g is not None else None

    def group(self, topic_filter: str, name: str) -> SharedGroup[V] | None:
        """The shared group ``$share/<name>/<topic_filter>``, if it has members."""
        node = self._find(topic_filter)
        if node is None or not node.groups:
            return None
        return node.groups.get(name)

    def match(self, topic: str) -> tuple[list[dict[str, V]], list[SharedGroup[V]]]:
        """The subscriptions matching topic name ``topic``: (client id -> subscription maps of the matching
        non-shared filters, matching shared groups). A client appears once per matching filter."""
        direct: list[dict[str, V]] = []
        shared: list[SharedGroup[V]] = []
        levels = topic.split("/")
        n = len(levels)
        node = self._root
        # Level 0 apart: a filter starting with a wildcard does not match a $-topic [MQTT-4.7.2-1].
        stack: list[tuple[_Node[V], int]] = []
        if not topic.startswith("$"):
            h = node.hash
            if h is not None:
                if h.subs:
                    direct.append(h.subs)
                if h.groups:
                    shared.extend(h.groups.values())
            if node.plus is not None:
                stack.append((node.plus, 1))
        exact = node.children.get(levels[0])
        if exact is not None:
            stack.append((exact, 1))
        while stack:
            node, i = stack.pop()
            h = node.hash
            if h is not None:  # "a/#" matches "a" and everything below it
                if h.subs:
                    direct.append(h.subs)
                if h.groups:
                    shared.extend(h.groups.values())
            if i == n:
                if node.subs:
                    direct.append(node.subs)
                if node.groups:
                    shared.extend(node.groups.values())
                continue
            if node.plus is not None:
                stack.append((node.plus, i + 1))
            if node.children:
                exact = node.children.get(levels[i])
                if exact is not None:
                    stack.append((exact, i + 1))
        return direct, shared

    def filters(self) -> Iterator[tuple[str, str, str | None, V]]:
        """Every (filter, client id, group, subscription); for dumps and tests."""
        stack: list[tuple[_Node[V], tuple[str, ...]]] = [(self._root, ())]
        while stack:
            node, prefix = stack.pop()
            if prefix:
                text = "/".join(prefix)
                for cid, v in (node.subs or {}).items():
                    yield text, cid, None, v
                for g in (node.groups or {}).values():
                    for cid, v in g.members.items():
                        yield text, cid, g.name, v
            for level, child in node.all_children():
                stack.append((child, (*prefix, level)))

    def __repr__(self) -> str:
        return f"<SubscriptionIndex subscriptions={self._count}>"
