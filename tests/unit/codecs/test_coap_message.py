"""The CoAP message codec: round trips (hypothesis), every malformed-header case RFC 7252 §3 names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.codecs.coap.message import (
    ACK,
    CON,
    CoapFormatError,
    Message,
    Opt,
    block_value,
    code_text,
    decode,
    encode,
    encode_uint,
    parse_block,
    read_uint,
    sort_options,
)

options = st.lists(st.tuples(st.integers(0, 65535), st.binary(max_size=300)), max_size=8).map(sort_options)
messages = st.builds(
    Message,
    mtype=st.integers(0, 3),
    code=st.integers(1, 255),
    mid=st.integers(0, 65535),
    token=st.binary(max_size=8),
    options=options,
    payload=st.binary(max_size=200),
)


@given(messages)
def test_round_trip(msg: Message) -> None:
    assert decode(encode(msg)) == msg


@given(st.binary(max_size=64))
def test_decode_never_raises_anything_else(data: bytes) -> None:
    try:
        msg = decode(data)
    except CoapFormatError:
        return
    assert decode(encode(msg)) == msg or msg.code == 0


def test_known_bytes() -> None:
    # CON GET mid 0x1234, token "ab", Uri-Path "demo" / "x", Accept 50.
    msg = Message(
        CON, 1, 0x1234, b"ab", ((Opt.URI_PATH, b"demo"), (Opt.URI_PATH, b"x"), (Opt.ACCEPT, b"\x32"))
    )
    raw = encode(msg)
    assert raw == bytes.fromhex("420112346162b464656d6f01786132")
    assert decode(raw).opts(Opt.URI_PATH) == [b"demo", b"x"]
    assert decode(raw).uint(Opt.ACCEPT) == 50


def test_extended_delta_and_length() -> None:
    msg = Message(CON, 2, 1, b"", ((Opt.SIZE1, b"\x01\x00"), (2000, b"v" * 400)), b"p")
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    ("data", "detail", "has_mid"),
    [
        (b"\x40\x01", "truncated header", False),
        (bytes.fromhex("49010001") + b"123456789", "token length 9 is reserved", True),
        (bytes.fromhex("4f010001"), "token length 15 is reserved", True),
        (bytes.fromhex("42010001") + b"a", "truncated token", True),
        (bytes.fromhex("40010001") + b"\xf0", "reserved option delta or length 15", True),
        (bytes.fromhex("40010001") + b"\x0f", "reserved option delta or length 15", True),
        (bytes.fromhex("40010001") + b"\xd0", "truncated option delta", True),
        (bytes.fromhex("40010001") + b"\x03ab", "option 0 runs past the end of the message", True),
        (bytes.fromhex("40010001") + b"\xff", "payload marker followed by an empty payload", True),
        (bytes.fromhex("40000001") + b"\xff\x01", "empty message with token, options or payload", True),
        (bytes.fromhex("80010001"), "unknown version 2", False),
    ],
)
def test_malformed(data: bytes, detail: str, has_mid: bool) -> None:
    with pytest.raises(CoapFormatError) as info:
        decode(data)
    assert str(info.value) == detail
    assert (info.value.mid == 1) is has_mid


def test_empty_ack() -> None:
    assert decode(bytes.fromhex("60000007")) == Message(ACK, 0, 7)


def test_helpers() -> None:
    assert code_text(0x45) == "2.05"
    assert code_text(0x84) == "4.04"
    assert encode_uint(0) == b""
    assert read_uint(encode_uint(70000)) == 70000
    assert parse_block(block_value(5, True, 6)) == (5, True, 6)
    assert block_value(0, False, 0) == b""
