"""gRPC framing, timeouts, status mapping and trailers-only local replies."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.codecs import grpc
from microenvoy.codecs.grpc import (
    GrpcFramingError,
    GrpcMessageDecoder,
    decode_grpc_message,
    encode_message,
    format_grpc_timeout,
    grpc_local_reply_headers,
    http_status_to_grpc,
    parse_grpc_timeout,
    percent_decode_grpc_message,
    percent_encode_grpc_message,
)
from microenvoy.core.errors import CodecError


def test_encode_message_layout() -> None:
    assert encode_message(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert encode_message(b"", compressed=True) == b"\x01\x00\x00\x00\x00"


def test_decoder_byte_by_byte() -> None:
    wire = encode_message(b"hello") + encode_message(b"") + encode_message(b"x" * 300, compressed=True)
    dec = GrpcMessageDecoder()
    out = []
    for i in range(len(wire)):
        out.extend(dec.feed(wire[i : i + 1]))
    assert out == [(False, b"hello"), (False, b""), (True, b"x" * 300)]
    assert dec.buffered == 0
    dec.finish()
    assert dec.messages_decoded == 3
    assert "decoded=3" in repr(dec)


def test_decoder_rejects_oversized_message_at_the_prefix() -> None:
    dec = GrpcMessageDecoder(max_message_size=10)
    with pytest.raises(GrpcFramingError, match="exceeds"):
        dec.decode(b"\x00\x00\x00\x00\x0b")  # 11 bytes declared; no payload needed to reject
    assert isinstance(GrpcFramingError("x"), CodecError)


def test_decoder_rejects_bad_flag_and_truncation() -> None:
    with pytest.raises(GrpcFramingError, match="compressed-flag"):
        GrpcMessageDecoder().decode(b"\x02\x00\x00\x00\x00")
    dec = GrpcMessageDecoder()
    assert dec.decode(b"\x00\x00\x00\x00\x05ab") == []
    with pytest.raises(GrpcFramingError, match="inside a message"):
        dec.finish()


def test_decode_single_message() -> None:
    assert decode_grpc_message(encode_message(b"m")) == b"m"
    with pytest.raises(GrpcFramingError):
        decode_grpc_message(encode_message(b"a") + encode_message(b"b"))
    with pytest.raises(GrpcFramingError):
        decode_grpc_message(encode_message(b"a", compressed=True))


@given(
    st.lists(st.tuples(st.booleans(), st.binary(max_size=200)), max_size=8),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=20),
)
def test_decoder_arbitrary_splits(messages: list[tuple[bool, bytes]], cuts: list[int]) -> None:
    wire = b"".join(encode_message(m, compressed=c) for c, m in messages)
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    dec = GrpcMessageDecoder()
    out: list[tuple[bool, bytes]] = []
    for a, b in itertools.pairwise(points):
        out.extend(dec.feed(wire[a:b]))
    assert out == messages
    dec.finish()


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=64))
def test_decoder_arbitrary_bytes_only_raise_codec_error(data: bytes, limit: int) -> None:
    dec = GrpcMessageDecoder(max_message_size=limit)
    try:
        for _ in dec.feed(data):
            pass
        dec.finish()
    except GrpcFramingError:
        pass


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"3S", 3.0),
        (b"100m", 0.1),
        (b"250u", 0.00025),
        (b"5n", 5e-9),
        (b"99999999S", 99999999.0),
        ("7S", 7.0),
    ],
)
def test_parse_grpc_timeout(raw: bytes | str, seconds: float) -> None:
    assert parse_grpc_timeout(raw) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "raw", [b"", b"S", b"1", b"123456789S", b"1s", b"-1S", b"1.5S", b"1 S", b"1SS", b"\xff"]
)
def test_parse_grpc_timeout_rejects(raw: bytes) -> None:
    assert parse_grpc_timeout(raw) is None


@given(st.floats(min_value=1e-9, max_value=3.5e11, allow_nan=False))
def test_format_grpc_timeout_round_trips_without_shortening(seconds: float) -> None:
    text = format_grpc_timeout(seconds)
    assert len(text) <= 9
    parsed = parse_grpc_timeout(text)
    assert parsed is not None
    assert parsed >= seconds * (1 - 1e-9)


def test_format_grpc_timeout_examples() -> None:
    assert format_grpc_timeout(0.1) == b"100000u"
    assert format_grpc_timeout(0) == b"0n"
    assert format_grpc_timeout(1.0) == b"1000000u"  # finest unit that fits in 8 digits
    assert format_grpc_timeout(10**12) == b"99999999H"


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, grpc.INTERNAL),
        (401, grpc.UNAUTHENTICATED),
        (403, grpc.PERMISSION_DENIED),
        (404, grpc.UNIMPLEMENTED),
        (429, grpc.UNAVAILABLE),
        (502, grpc.UNAVAILABLE),
        (503, grpc.UNAVAILABLE),
        (504, grpc.UNAVAILABLE),
        (500, grpc.UNKNOWN),
        (200, grpc.UNKNOWN),
        (418, grpc.UNKNOWN),
        (100, grpc.INTERNAL),
    ],
)
def test_http_status_to_grpc(status: int, code: int) -> None:
    assert http_status_to_grpc(status) == code


def test_status_names_complete() -> None:
    assert len(grpc.STATUS_NAMES) == 17
    assert grpc.STATUS_NAMES[grpc.UNAUTHENTICATED] == "UNAUTHENTICATED"


def test_local_reply_is_trailers_only() -> None:
    h = grpc_local_reply_headers(grpc.UNAVAILABLE, "no healthy upstream")
    assert list(h) == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"14"),
        (b"grpc-message", b"no healthy upstream"),
    ]
    assert b"grpc-message" not in grpc_local_reply_headers(grpc.OK)


def test_grpc_message_percent_encoding() -> None:
    assert percent_encode_grpc_message("50% off\n café") == b"50%25 off%0A caf%C3%A9"
    assert percent_decode_grpc_message(b"50%25 off%0A caf%C3%A9") == "50% off\n café"
    assert percent_decode_grpc_message(b"bad %zz and %4") == "bad %zz and %4"


@given(st.text(max_size=50))
def test_percent_encoding_round_trip(text: str) -> None:
    enc = percent_encode_grpc_message(text)
    assert all(0x20 <= b <= 0x7E for b in enc)
    assert percent_decode_grpc_message(enc) == text.encode("utf-8", "replace").decode("utf-8", "replace")
