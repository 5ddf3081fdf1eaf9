"""Blockwise transfers (RFC 7959), server side, sans-IO: Block1 reassembly and Block2 bodies, bounded.

``Block1`` collects a request body sent in blocks; ``Block2`` keeps the bodies of responses too large for one
message so that a client's follow-up requests for later blocks are served without asking upstream again.
Both live in one :class:`BlockStore` whose entry count, total bytes and entry age are bounded: the oldest
entries are evicted first (``evicted`` counts them), so a flood of half-finished transfers cannot grow the
agent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["BlockStore", "size_of", "szx_for"]


def size_of(szx: int) -> int:
    """Block size of a SZX (0..6): 16 .. 1024 bytes."""
    return 1 << (szx + 4)


def szx_for(size: int) -> int:
    """SZX of a power-of-two block size 16..1024."""
    return max(0, min(6, size.bit_length() - 5))


class _Item:
    __slots__ = ("data", "expires", "meta", "size")

    def __init__(self, data: bytearray | bytes, size: int, expires: float, meta: object = None) -> None:
        self.data = data
        self.size = size
        self.expires = expires
        self.meta = meta


class BlockStore:
    """Bounded Block1 reassemblies and Block2 bodies (see the module docstring)."""

    def __init__(self, *, max_entries: int, max_bytes: int, lifetime: float) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.lifetime = lifetime
        self._items: OrderedDict[Hashable, _Item] = OrderedDict()
        self.bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"<BlockStore entries={len(self._items)} bytes={self.bytes}>"

    # ------------------------------------------------------------------------------------ Block1
    def block1(
        self, key: Hashable, num: int, more: bool, szx: int, payload: bytes, limit: int, now: float
    ) -> tuple[str, bytes | None]:
        """One Block1 block of the request body ``key``. Returns ``("continue", None)`` (answer 2.31),
        ``("complete", body)``, ``("too_large", None)`` (4.13) or ``("incomplete", None)`` (4.08: a block
        out of order or a transfer we do not know)."""
        size = size_of(szx)
        if more and len(payload) != size:  # §2.2: all blocks but the last carry exactly the block size
            self.drop(("b1", key))
            return "incomplete", None
        k = ("b1", key)
        item = self._items.get(k)
        if item is not None and item.expires <= now:
            self.drop(k)
            item = None
        offset = num * size
        if num == 0:
            if item is not None:
                self.drop(k)  # a new transfer of the same body starts over
            if not more:
                return ("too_large", None) if len(payload) > limit else ("complete", payload)
            item = _Item(bytearray(), 0, now + self.lifetime)
            self._items[k] = item
        elif item is None or len(item.data) != offset:
            self.drop(k)
            return "incomplete", None
        if len(item.data) + len(payload) > limit:
            self.drop(k)
            return "too_large", None
        assert isinstance(item.data, bytearray)
        item.data += payload
        self._grow(item, len(payload))
        item.expires = now + self.lifetime
        self._items.move_to_end(k)
        if more:
            self._bound(now, keep=k)
            return ("continue", None) if k in self._items else ("incomplete", None)
        self.drop(k)
        return "complete", bytes(item.data)

    # ------------------------------------------------------------------------------------ Block2
    def put(self, key: Hashable, body: bytes, now: float, meta: object = None) -> None:
        """Keep a response body (and ``meta``, e.g. its code and options) for later Block2 requests."""
        k = ("b2", key)
        self.drop(k)
        item = _Item(body, 0, now + self.lifetime, meta)
        self._items[k] = item
        self._grow(item, len(body))
        self._bound(now, keep=k)

    def get(self, key: Hashable, now: float) -> tuple[bytes, object] | None:
        """``(body, meta)`` kept by ``put``, or None (never stored, expired or evicted)."""
        k = ("b2", key)
        item = self._items.get(k)
        if item is None:
            return None
        if item.expires <= now:
            self.drop(k)
            return None
        data = item.data
        return (data if isinstance(data, bytes) else bytes(data)), item.meta

    # ------------------------------------------------------------------------------------ bounds
    def drop(self, k: Hashable) -> None:
        item = self._items.pop(k, None)
        if item is not None:
            self.bytes -= item.size

    def _grow(self, item: _Item, n: int) -> None:
        item.size += n
        self.bytes += n

    def _bound(self, now: float, keep: Hashable) -> None:
        items = self._items
        while items:
            k = next(iter(items))
            item = items[k]
            over = len(items) > self.max_entries or self.bytes > self.max_bytes
            if not over and item.expires > now:
                break
            if k == keep and len(items) == 1:
                if self.bytes > self.max_bytes:  # a single transfer beyond the whole budget
                    self.drop(k)
                    self.evicted += 1
                break
            self.drop(k)
            if over:
                self.evicted += 1
