"""Header lists shared by every protocol.

Names are lower-case ``bytes`` and values are ``bytes``: that is what h11, h2 (with header encoding off) and
aioquic's H3 layer produce, so the hot path never converts. Pseudo-headers (``:method``, ``:scheme``,
``:authority``, ``:path``, ``:status``) live in the same list, first, as HTTP/2 and HTTP/3 carry them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["CONNECTION_SPECIFIC", "HOP_BY_HOP", "HeaderList", "Headers"]

HeaderList = list[tuple[bytes, bytes]]

CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"http2-settings"}
)
"""Fields HTTP/2 and HTTP/3 forbid (RFC 9113 section 8.2.2, RFC 9114 section 4.2); ``te`` other than
``trailers`` is handled by the caller."""

HOP_BY_HOP = CONNECTION_SPECIFIC | {b"te", b"trailer", b"proxy-authenticate", b"proxy-authorization"}
"""Hop-by-hop fields (RFC 9110 section 7.6.1) never forwarded from one hop to the next."""


class Headers:
    """A mutable, ordered multimap of header fields (lower-case names)."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self._items: HeaderList = list(items)

    # -- reading -------------------------------------------------------------------------------
    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """First value of ``name`` or ``default``."""
        for k, v in self._items:
            if k == name:
                return v
        return default

    def get_all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self._items if k == name]

    def joined(self, name: bytes) -> bytes | None:
        """All values of ``name`` joined by ``,`` (RFC 9110 field combination), or None."""
        values = self.get_all(name)
        return b",".join(values) if values else None

    def __contains__(self, name: object) -> bool:
        return any(k == name for k, _ in self._items)

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self._items == other._items
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def items(self) -> HeaderList:
        """The underlying list (not a copy): codecs hand it straight to the wire encoder."""
        return self._items

    def copy(self) -> Headers:
        return Headers(self._items)

    def byte_size(self) -> int:
        """Size as HPACK/QPACK count it (name + value + 32 per field, RFC 7541 section 4.1)."""
        return sum(len(k) + len(v) + 32 for k, v in self._items)

    # -- writing -------------------------------------------------------------------------------
    def add(self, name: bytes, value: bytes) -> None:
        self._items.append((name, value))

    def set(self, name: bytes, value: bytes) -> None:
        """Replace every ``name`` with one field (kept at the first one's position), or append."""
        out: HeaderList = []
        placed = False
        for k, v in self._items:
            if k == name:
                if not placed:
                    out.append((name, value))
                    placed = True
            else:
                out.append((k, v))
        if not placed:
            if name.startswith(b":"):
                out.insert(self._pseudo_end(out), (name, value))
            else:
                out.append((name, value))
        self._items = out

    def setdefault(self, name: bytes, value: bytes) -> bytes:
        current = self.get(name)
        if current is None:
            self.set(name, value)
            return value
        return current

    def remove(self, name: bytes) -> int:
        """Remove every field called ``name``; returns how many were removed."""
        before = len(self._items)
        self._items = [(k, v) for k, v in self._items if k != name]
        return before - len(self._items)

    @staticmethod
    def _pseudo_end(items: HeaderList) -> int:
        for i, (k, _) in enumerate(items):
            if not k.startswith(b":"):
                return i
        return len(items)
