"""A header block encoder for the upstream HTTP/2 client that never indexes and never Huffman-codes.

RFC 7541 lets an encoder use only the static table and literals: a decoder must accept them, and an
encoder that never inserts into the dynamic table can never desynchronise it. On a proxy's LAN hop the few
bytes Huffman coding and indexing would save cost far more CPU than they are worth (with hpack's encoder
they were the largest single cost of an upstream request). Each field becomes:

* an indexed field (section 6.1) when the static table holds the exact name and value;
* else a literal field without indexing (section 6.2.2), with the name from the static table when it is
  there, the value as a raw (non-Huffman) string.

The first block starts with a dynamic table size update to 0 (section 6.3), so the peer's decoder keeps no
table for us and later SETTINGS_HEADER_TABLE_SIZE changes need no signal.

``LiteDecoder`` is a full decoder (the peer chooses its encoding) without the ``hpack`` library's per-field
debug logging, and with a small cache of Huffman-decoded strings (see its docstring).
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

__all__ = ["HpackError", "LiteDecoder", "LiteralEncoder", "encode_integer"]

_STATIC_FULL: dict[tuple[bytes, bytes], bytes] = {}
"""(name, value) in the static table -> its indexed-field encoding."""
_STATIC_NAME: dict[bytes, bytes] = {}
"""name in the static table -> the first byte(s) of a literal without indexing with that indexed name."""


def encode_integer(value: int, prefix_bits: int, first_byte: int) -> bytes:
    """RFC 7541 section 5.1: ``value`` in an N-bit prefix whose other bits are ``first_byte``'s."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first_byte | value,))
    out = bytearray((first_byte | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


for _i, (_n, _v) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FULL.setdefault((_n, _v), encode_integer(_i, 7, 0x80))
    _STATIC_NAME.setdefault(_n, encode_integer(_i, 4, 0x00))


class LiteralEncoder:
    """Drop-in for ``hpack.Encoder`` inside h2 (``encode(headers) -> bytes``, ``header_table_size``)."""

    __slots__ = ("_announced", "header_table_size")

    def __init__(self) -> None:
        self._announced = False
        self.header_table_size = 4096
        """What the peer allows (h2 sets it from SETTINGS_HEADER_TABLE_SIZE); we use none of it."""

    def __repr__(self) -> str:
        return f"<LiteralEncoder announced={self._announced}>"

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = False) -> bytes:
        out = bytearray()
        if not self._announced:
            out.append(0x20)  # dynamic table size update: 0
            self._announced = True
        full = _STATIC_FULL
        names = _STATIC_NAME
        for name, value in headers:
            indexed = full.get((name, value))
            if indexed is not None:
                out += indexed
                continue
            prefix = names.get(name)
            if prefix is not None:
                out += prefix
            else:
                out.append(0x00)
                n = len(name)
                out += bytes((n,)) if n < 127 else encode_integer(n, 7, 0x00)
                out += name
            n = len(value)
            out += bytes((n,)) if n < 127 else encode_integer(n, 7, 0x00)
            out += value
        return bytes(out)


class HpackError(ValueError):
    """A header block that does not decode (a COMPRESSION_ERROR for the connection)."""


_STATIC = HeaderTable.STATIC_TABLE
_STATIC_LEN = len(_STATIC)


def _decode_int(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data):
            raise HpackError("truncated integer")
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
        if shift > 28:
            raise HpackError("integer too large")


class LiteDecoder:
    """An HPACK decoder (RFC 7541) without per-field logging, with Huffman results cached.

    Upstreams repeat the same few values (``server``, ``content-type``, ``date`` within a second), so a small
    cache of Huffman-coded byte strings -> decoded bytes turns most Huffman work into a dict lookup.
    Dynamic table, size updates and eviction follow sections 4 and 6.3; errors raise ``HpackError``.
    """

    __slots__ = ("_dynamic", "_huffman_cache", "_limit", "_size", "max_header_list_size", "max_table_size")

    HUFFMAN_CACHE = 512

    def __init__(self, max_table_size: int = 4096, max_header_list_size: int = 65536) -> None:
        self._dynamic: list[tuple[bytes, bytes]] = []
        """Newest first (index 62 is ``_dynamic[0]``)."""
        self._size = 0
        self.max_table_size = max_table_size
        """Our SETTINGS_HEADER_TABLE_SIZE: the largest size update the peer may announce."""
        self._limit = max_table_size
        """The size the peer's encoder currently uses."""
        self.max_header_list_size = max_header_list_size
        self._huffman_cache: dict[bytes, bytes] = {}

    def __repr__(self) -> str:
        return f"<LiteDecoder entries={len(self._dynamic)} size={self._size}/{self._limit}>"

    def _get(self, index: int) -> tuple[bytes, bytes]:
        if index == 0:
            raise HpackError("index 0")
        if index <= _STATIC_LEN:
            return _STATIC[index - 1]
        try:
            return self._dynamic[index - _STATIC_LEN - 1]
        except IndexError:
            raise HpackError(f"index {index} beyond the dynamic table") from None

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 32
        if size > self._limit:
            self._dynamic.clear()
            self._size = 0
            return
        self._dynamic.insert(0, (name, value))
        self._size += size
        self._evict()

    def _evict(self) -> None:
        while self._size > self._limit and self._dynamic:
            n, v = self._dynamic.pop()
            self._size -= len(n) + len(v) + 32

    def _string(self, data: bytes, pos: int) -> tuple[bytes, int]:
        if pos >= len(data):
            raise HpackError("truncated string")
        huffman = data[pos] & 0x80
        length, pos = _decode_int(data, pos, 7)
        end = pos + length
        if end > len(data):
            raise HpackError("string longer than the block")
        raw = data[pos:end]
        if not huffman:
            return raw, end
        cached = self._huffman_cache.get(raw)
        if cached is None:
            try:
                cached = decode_huffman(raw)
            except HPACKDecodingError as e:
                raise HpackError(str(e)) from None
            if len(self._huffman_cache) >= self.HUFFMAN_CACHE:
                self._huffman_cache.clear()
            self._huffman_cache[raw] = cached
        return cached, end

    def _literal(self, data: bytes, pos: int, prefix_bits: int) -> tuple[tuple[bytes, bytes], int]:
        """A literal field (section 6.2): name by index or as a string, then the value."""
        index, pos = _decode_int(data, pos, prefix_bits)
        if index:
            name = self._get(index)[0]
        else:
            name, pos = self._string(data, pos)
        value, pos = self._string(data, pos)
        return (name, value), pos

    def decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        pos = 0
        n = len(data)
        total = 0
        while pos < n:
            b = data[pos]
            if b & 0x80:  # 6.1 indexed field
                index, pos = _decode_int(data, pos, 7)
                field = self._get(index)
            elif b & 0x40:  # 6.2.1 literal with incremental indexing
                field, pos = self._literal(data, pos, 6)
                self._add(*field)
            elif b & 0x20:  # 6.3 dynamic table size update: only at the start of a block
                if out:
                    raise HpackError("table size update after a field")
                size, pos = _decode_int(data, pos, 5)
                if size > self.max_table_size:
                    raise HpackError(f"table size update {size} over our limit {self.max_table_size}")
                self._limit = size
                self._evict()
                continue
            else:  # 6.2.2 / 6.2.3 literal without indexing / never indexed
                field, pos = self._literal(data, pos, 4)
            total += len(field[0]) + len(field[1]) + 32
            if total > self.max_header_list_size:
                raise HpackError("header list larger than SETTINGS_MAX_HEADER_LIST_SIZE")
            out.append(field)
        return out
