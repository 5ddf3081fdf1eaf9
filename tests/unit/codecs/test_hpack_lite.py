"""The static-table/literal HPACK encoder: whatever it emits, a full HPACK decoder reads back exactly."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.codecs.hpack_lite import HpackError, LiteDecoder, LiteralEncoder, encode_integer

_names = st.sampled_from([b":method", b":path", b":authority", b"content-type", b"x-custom", b"accept"]) | (
    st.binary(min_size=1, max_size=40).map(lambda b: bytes(c % 26 + 97 for c in b))
)
_headers = st.lists(st.tuples(_names, st.binary(max_size=300)), max_size=20)


def test_integer_encoding_rfc7541_examples() -> None:
    assert encode_integer(10, 5, 0) == bytes([0b01010])  # C.1.1
    assert encode_integer(1337, 5, 0) == bytes([0b11111, 0b10011010, 0b00001010])  # C.1.2
    assert encode_integer(42, 8, 0) == bytes([42])  # C.1.3


def test_exact_static_entries_are_one_byte_and_first_block_zeroes_the_table() -> None:
    enc = LiteralEncoder()
    first = enc.encode([(b":method", b"GET"), (b":path", b"/")])
    assert first == bytes([0x20, 0x82, 0x84])
    assert enc.encode([(b":method", b"GET")]) == bytes([0x82])  # no second size update


@given(st.lists(_headers, min_size=1, max_size=5))
def test_round_trip_through_a_full_decoder(blocks: list[list[tuple[bytes, bytes]]]) -> None:
    enc = LiteralEncoder()
    dec = Decoder()
    dec.max_header_list_size = 1 << 20
    for block in blocks:
        assert dec.decode(enc.encode(block), raw=True) == block
    assert len(dec.header_table.dynamic_entries) == 0  # we never made the peer index anything


_any_headers = st.lists(
    st.tuples(
        _names,
        st.sampled_from([b"GET", b"200", b"nginx/1.22.1", b"text/plain", b""]) | st.binary(max_size=200),
    ),
    max_size=15,
)


@given(st.lists(_any_headers, min_size=1, max_size=8), st.sampled_from([4096, 256, 0]))
def test_lite_decoder_matches_hpack_on_huffman_indexed_blocks(
    blocks: list[list[tuple[bytes, bytes]]], table_size: int
) -> None:
    """Whatever a full encoder does (Huffman, incremental indexing, eviction, size updates), LiteDecoder
    reads the same fields as the reference decoder."""
    enc = Encoder()
    enc.header_table_size = table_size
    ref = Decoder()
    ref.max_header_list_size = 1 << 20
    lite = LiteDecoder(max_header_list_size=1 << 20)
    for block in blocks:
        data = enc.encode(block)
        assert lite.decode(data) == [(bytes(k), bytes(v)) for k, v in ref.decode(data, raw=True)]


@given(st.binary(max_size=64))
def test_lite_decoder_only_raises_hpack_error(data: bytes) -> None:
    try:
        LiteDecoder().decode(data)
    except HpackError:
        pass


def test_lite_decoder_limits() -> None:
    with pytest.raises(HpackError):
        LiteDecoder(max_table_size=100).decode(encode_integer(4096, 5, 0x20))  # size update over our limit
    with pytest.raises(HpackError):
        LiteDecoder().decode(bytes([0x82]) + encode_integer(0, 5, 0x20))  # size update after a field
    with pytest.raises(HpackError):
        LiteDecoder(max_header_list_size=40).decode(bytes([0x82, 0x84]))  # 2 x (7 + 32) > 40
    with pytest.raises(HpackError):
        LiteDecoder().decode(bytes([0xBE]))  # index 62: empty dynamic table
