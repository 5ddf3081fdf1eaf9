"""The static-table/literal HPACK encoder: whatever it emits, a full HPACK decoder reads back exactly."""

from __future__ import annotations

from hpack import Decoder
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.codecs.hpack_lite import LiteralEncoder, encode_integer

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
