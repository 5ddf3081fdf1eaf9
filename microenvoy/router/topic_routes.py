"""MQTT bridge routes: topic filters with named captures, and path templates filled from them (sans-IO).

A bridge route's ``topic_filter`` is an MQTT topic filter whose levels may also be ``{name}``: a single-level
wildcard (like ``+``) whose value is captured. ``#`` as the last level matches the rest (zero or more levels)
and is captured as ``{#}``. Examples::

    devices/{device}/telemetry     matches devices/d1/telemetry        -> {device: d1}
    sites/{site}/+/status          matches sites/s1/gw/status          -> {site: s1}
    logs/#                          matches logs, logs/a/b             -> {#: "a/b"}

The route's ``path`` template may use every capture plus ``{topic}`` (the whole topic); values are
percent-encoded as one path segment (``{#}`` and ``{topic}`` keep their ``/``). Like MQTT itself, filters
starting with a wildcard do not match topics starting with ``$`` [MQTT-4.7.2-1].

``compile_topic_filter`` rejects malformed templates with a message naming the bad level, for the config
loader; ``TopicRouteTable.match`` returns the first matching route in configuration order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

__all__ = [
    "CompiledTopicFilter",
    "TopicRouteTable",
    "compile_path_template",
    "compile_topic_filter",
    "fill_path",
]

_CAPTURE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*|#)\}")


@dataclass(frozen=True, slots=True)
class CompiledTopicFilter:
    """A topic filter with captures, split into levels once."""

    text: str
    levels: tuple[str | None, ...]
    """Per level: the literal text, or None for a wildcard level (``+`` or a capture)."""
    captures: tuple[tuple[int, str], ...]
    """(level index, capture name) for every ``{name}`` level."""
    multi: bool
    """Ends with ``#`` (matches the parent level and everything below)."""

    @property
    def names(self) -> tuple[str, ...]:
        """Capture names usable in a path template (``#`` included when the filter ends with it)."""
        return tuple(n for _, n in self.captures) + (("#",) if self.multi else ())

    def match(self, topic: str) -> dict[str, str] | None:
        """Captures when ``topic`` matches, else None."""
        parts = topic.split("/")
        levels = self.levels
        n = len(levels)
        if self.multi:
            if len(parts) < n:
                return None
        elif len(parts) != n:
            return None
        if topic.startswith("$") and (n == 0 or levels[0] is None):
            return None  # [MQTT-4.7.2-1]: a leading wildcard does not match $-topics
        for want, got in zip(levels, parts, strict=False):
            if want is not None and want != got:
                return None
        out = {name: parts[i] for i, name in self.captures}
        if self.multi:
            out["#"] = "/".join(parts[n:])
        return out


def compile_topic_filter(text: str) -> CompiledTopicFilter:
    """Parse a route topic filter; raises ``ValueError`` with the reason (for the config loader)."""
    if not text:
        raise ValueError("must not be empty")
    if "\x00" in text:
        raise ValueError("must not contain U+0000")
    raw = text.split("/")
    multi = raw[-1] == "#"
    if multi:
        raw = raw[:-1]
    levels: list[str | None] = []
    captures: list[tuple[int, str]] = []
    seen: set[str] = set()
    for i, level in enumerate(raw):
        m = _CAPTURE.match(level)
        if m is not None:
            name = m.group(1)
            if name in seen or name == "topic":
                raise ValueError(f"level {i + 1}: capture name {name!r} is used twice or reserved")
            seen.add(name)
            captures.append((i, name))
            levels.append(None)
        elif level == "+":
            levels.append(None)
        elif "#" in level or "+" in level or "{" in level or "}" in level:
            raise ValueError(
                f"level {i + 1} ({level!r}): '#' must be the last level alone, "
                "'+' and '{name}' a whole level"
            )
        else:
            levels.append(level)
    return CompiledTopicFilter(text, tuple(levels), tuple(captures), multi)


def compile_path_template(template: str, names: Sequence[str]) -> tuple[tuple[str, str | None], ...]:
    """A path template -> (literal, placeholder or None) pieces; unknown placeholders raise ``ValueError``."""
    if not template.startswith("/"):
        raise ValueError("must start with '/'")
    known = {*names, "topic"}
    pieces: list[tuple[str, str | None]] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        name = m.group(1)
        if name not in known:
            raise ValueError(f"unknown placeholder {{{name}}} (known: {', '.join(sorted(known))})")
        pieces.append((template[pos : m.start()], name))
        pos = m.end()
    rest = template[pos:]
    if "{" in rest or "}" in rest:
        raise ValueError(f"malformed placeholder in {rest!r}")
    pieces.append((rest, None))
    return tuple(pieces)


def fill_path(pieces: Sequence[tuple[str, str | None]], topic: str, captures: dict[str, str]) -> str:
    """The request path for ``topic`` from a compiled template (captures percent-encoded)."""
    out: list[str] = []
    for literal, name in pieces:
        out.append(literal)
        if name is None:
            continue
        if name == "topic":
            out.append(quote(topic, safe="/"))
        elif name == "#":
            out.append(quote(captures.get("#", ""), safe="/"))
        else:
            out.append(quote(captures.get(name, ""), safe=""))
    return "".join(out)


class TopicRouteTable:
    """Bridge routes in configuration order; ``match`` returns (index, captures) of the first hit."""

    __slots__ = ("_filters",)

    def __init__(self, filters: Sequence[CompiledTopicFilter]) -> None:
        self._filters = tuple(filters)

    def match(self, topic: str) -> tuple[int, dict[str, str]] | None:
        for i, f in enumerate(self._filters):
            captures = f.match(topic)
            if captures is not None:
                return i, captures
        return None

    def __len__(self) -> int:
        return len(self._filters)

    def __repr__(self) -> str:
        return f"<TopicRouteTable routes={len(self._filters)}>"
