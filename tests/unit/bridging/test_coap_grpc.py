"""CoAP routes to gRPC methods: the request becomes one length-prefixed message, grpc-status maps back."""

from __future__ import annotations

import pytest

from microenvoy.bridging.coap import grpc_request, grpc_response
from microenvoy.codecs.coap.message import Opt
from microenvoy.core.headers import Headers


def test_request_is_a_unary_call() -> None:
    h = Headers([(b":method", b"GET"), (b":path", b"/x?y=1"), (b":authority", b"dev"), (b"accept", b"a/b")])
    out, body = grpc_request(h, b"\x08\x01", "/pkg.Svc/Get")
    assert out.get(b":method") == b"POST"
    assert out.get(b":path") == b"/pkg.Svc/Get"
    assert out.get(b":authority") == b"dev"
    assert out.get(b"content-type") == b"application/grpc"
    assert out.get(b"te") == b"trailers"
    assert out.get(b"accept") is None
    assert body == b"\x00\x00\x00\x00\x02\x08\x01"


def test_ok_response() -> None:
    code, options, payload = grpc_response(
        1, 200, Headers(), Headers([(b"grpc-status", b"0")]), b"\0\0\0\0\1z"
    )
    assert (code, payload) == (0x45, b"z")
    assert (Opt.CONTENT_FORMAT, b"\x2a") in options
    assert grpc_response(2, 200, Headers(), Headers([(b"grpc-status", b"0")]), b"\0\0\0\0\0")[0] == 0x44


@pytest.mark.parametrize(
    ("status", "code"), [(5, 0x84), (7, 0x83), (16, 0x81), (14, 0xA3), (4, 0xA4), (12, 0xA1), (13, 0xA0)]
)
def test_error_statuses(status: int, code: int) -> None:
    trailers = Headers([(b"grpc-status", str(status).encode()), (b"grpc-message", b"nope")])
    assert grpc_response(1, 200, Headers(), trailers, b"") == (code, [], b"nope")


def test_trailers_only_and_bad_framing() -> None:
    assert grpc_response(1, 200, Headers([(b"grpc-status", b"5")]), None, b"")[0] == 0x84
    assert grpc_response(1, 200, Headers(), Headers([(b"grpc-status", b"0")]), b"\0\0\0\0\x09ab")[0] == 0xA2
    assert grpc_response(1, 503, Headers(), None, b"")[0] == 0xA3
