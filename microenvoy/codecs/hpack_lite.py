"""A header block encoder for the upstream HTTP/2 client that never indexes and never Huffman-codes.

RFC 7541 lets an encoder use only the static table and literals: a decoder must accept them, and an
encoder that never inserts into the dynamic table can never desynchronise it. On a proxy's LAN hop the few
bytes Huffman coding and indexing would save cost far more CPU than they are worth (with hpack's encoder
they were the largest single cost of an upstream request). Each field becomes:

* an indexed field (section 6.1) when the static table holds the exact name and value;
* else a literal field without indexing (section 6.2.2), with the name from the static table when it is
  there, the value as a raw (non-Huffman) string.

The first block starts with a dynamic table size update to 0 (section 6.3), so the peer's decoder keeps no
table for us and later SETTINGS_HEADER_TABLE_SIZE changes need no signal. Decoding responses stays with
the ``hpack`` library (the peer chooses its own encoding).
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack.table import HeaderTable

__all__ = ["LiteralEncoder", "encode_integer"]

_STATIC_FULL: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FULL.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)


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
            idx = full.get((name, value))
            if idx is not None:
                out += encode_integer(idx, 7, 0x80)
                continue
            nidx = names.get(name)
            if nidx is not None:
                out += encode_integer(nidx, 4, 0x00)
            else:
                out.append(0x00)
                out += encode_integer(len(name), 7, 0x00)
                out += name
            out += encode_integer(len(value), 7, 0x00)
            out += value
        return bytes(out)
