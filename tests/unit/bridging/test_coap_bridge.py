"""CoAP <-> HTTP mapping (microenvoy.bridging.coap): a table per RFC rule, hypothesis fuzzing both ways."""

from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.bridging.coap import (
    CONTENT_FORMATS,
    CONTENT_FORMATS_CODED,
    DIAGNOSTIC_MAX,
    MAX_AGE_MAX,
    Code,
    MappingError,
    content_format_for,
    error_response,
    media_type_for,
    request_headers,
    response_options,
    status_to_code,
)
from microenvoy.codecs.coap.message import CON, Message, Opt, encode_uint, read_uint, sort_options
from microenvoy.core.headers import Headers

GET, POST, PUT, DELETE, FETCH, PATCH, IPATCH = 1, 2, 3, 4, 5, 6, 7
IMF_EPOCH = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110 §5.6.7's example)


def req(*options: tuple[int, bytes], code: int = GET, payload: bytes = b"") -> Message:
    return Message(CON, code, 1, b"t", sort_options(list(options)), payload)


def hdrs(msg: Message, **kw: str) -> Headers:
    return request_headers(msg, authority=kw.pop("authority", "dev.local"), **kw)[0]


def mapping_error(msg: Message) -> MappingError:
    with pytest.raises(MappingError) as info:
        request_headers(msg, authority="dev.local")
    return info.value


def resp(
    status: int,
    fields: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    method: int = GET,
    **kw: Any,
) -> tuple[int, dict[int, list[bytes]], bytes]:
    code, options, payload = response_options(method, status, Headers(fields or []), body, **kw)
    by_number: dict[int, list[bytes]] = {}
    for n, v in options:
        by_number.setdefault(n, []).append(v)
    assert [n for n, _ in options] == sorted(n for n, _ in options)
    return code, by_number, payload


# ----------------------------------------------------------------------- content formats (RFC 7252 §12.3)


@pytest.mark.parametrize(
    ("content_type", "encoding", "expected"),
    [
        (b"text/plain", None, 0),
        (b"text/plain; charset=utf-8", None, 0),
        (b"Text/Plain;Charset=UTF-8", None, 0),
        (b'text/plain ; charset="utf-8"', None, 0),
        (b"text/plain; charset=us-ascii", None, 0),
        (b"text/plain; charset=iso-8859-1", None, None),
        (b"application/json", None, 50),
        (b"application/json; charset=utf-8", None, 50),
        (b"application/json;charset=UTF-8", None, 50),
        (b"  application/json  ", None, 50),
        (b"application/json; charset=latin1", None, None),
        (b"application/cbor", None, 60),
        (b"application/link-format", None, 40),
        (b"application/xml", None, 41),
        (b"application/octet-stream", None, 42),
        (b"application/exi", None, 47),
        (b"application/json-patch+json", None, 51),
        (b"application/merge-patch+json", None, 52),
        (b"application/cwt", None, 61),
        (b"application/senml+json", None, 110),
        (b"application/senml+cbor", None, 112),
        (b"application/vnd.oma.lwm2m+tlv", None, 11542),
        (b'application/cose; cose-type="cose-encrypt0"', None, 16),
        (b"application/cose; cose-type=COSE-SIGN1", None, 18),
        (b"application/cose", None, None),  # the registry has no parameterless application/cose
        (b"application/yang-data+cbor; id=sid", None, 140),
        (b"application/yang-data+cbor", None, 340),
        (b"application/json; foo=bar", None, 50),  # insignificant parameters ignored (RFC 8075 §6.2)
        (b"application/json", b"deflate", 11050),
        (b"application/cbor", b" Deflate ", 11060),
        (b"application/json", b"identity", 50),
        (b"application/json", b"gzip", None),
        (b"application/xml", b"deflate", None),
        (b"application/coap-payload; cf=11050", None, 11050),  # RFC 8075 §6.2's media type
        (b"application/coap-payload; cf=65536", None, None),
        (b"application/coap-payload", None, None),
        (b"text/html", None, None),
        (b"application/vnd.unknown+json", None, None),
        (b"", None, None),
        (b"json", None, None),
        (b"text/plain\xff", None, None),
    ],
)
def test_content_format_for_rfc8075_6_2(
    content_type: bytes, encoding: bytes | None, expected: int | None
) -> None:
    assert content_format_for(content_type, encoding=encoding) == expected


@pytest.mark.parametrize("number", sorted([*CONTENT_FORMATS, *CONTENT_FORMATS_CODED]))
def test_every_registry_entry_round_trips(number: int) -> None:
    mapped = media_type_for(number)
    assert mapped is not None
    assert content_format_for(mapped[0], encoding=mapped[1]) == number


def test_registry_has_the_rfc7252_12_3_core_entries() -> None:
    assert {0, 40, 41, 42, 47, 50, 60} <= CONTENT_FORMATS.keys()
    assert media_type_for(0) == (b"text/plain; charset=utf-8", None)
    assert media_type_for(11050) == (b"application/json", b"deflate")
    assert media_type_for(1) is None


# ------------------------------------------------------------------------- request: methods (RFC 7252 §5.8)


@pytest.mark.parametrize(
    ("code", "method"),
    [
        (GET, b"GET"),
        (POST, b"POST"),
        (PUT, b"PUT"),
        (DELETE, b"DELETE"),
        (FETCH, b"FETCH"),
        (PATCH, b"PATCH"),
    ],
)
def test_method_rfc7252_5_8_and_rfc8132(code: int, method: bytes) -> None:
    assert hdrs(req(code=code)).get(b":method") == method


def test_ipatch_is_http_patch_rfc8132() -> None:
    assert hdrs(req(code=IPATCH)).get(b":method") == b"PATCH"


@pytest.mark.parametrize(("code", "expected"), [(8, Code.METHOD_NOT_ALLOWED), (31, Code.METHOD_NOT_ALLOWED)])
def test_unknown_method_is_4_05_rfc7252_5_8(code: int, expected: int) -> None:
    err = mapping_error(req(code=code))
    assert (err.code, err.stat) == (expected, "method_not_allowed")


@pytest.mark.parametrize("code", [0, 0x45, 0x84, 0xE1])
def test_non_request_code_is_4_00(code: int) -> None:
    assert mapping_error(req(code=code)).code == Code.BAD_REQUEST


def test_pseudo_headers_come_first_and_scheme_is_ours() -> None:
    h = request_headers(req((Opt.ACCEPT, b"")), authority="dev.local", scheme="https")[0]
    assert [k for k, _ in h][:4] == [b":method", b":scheme", b":authority", b":path"]
    assert h.get(b":scheme") == b"https"


# ------------------------------------------------------------------ request: Uri-Path/Query (RFC 7252 §6.5)


@pytest.mark.parametrize(
    ("segments", "prefix", "path"),
    [
        ([], "", "/"),
        ([b""], "", "/"),
        ([b"sensors", b"temp"], "", "/sensors/temp"),
        ([b"a", b""], "", "/a/"),
        ([b"a", b"", b"b"], "", "/a//b"),
        ([b"a b"], "", "/a%20b"),
        ([b"x/y"], "", "/x%2Fy"),
        ([b"q?#%"], "", "/q%3F%23%25"),
        ([b"p;jsessionid=1"], "", "/p%3Bjsessionid=1"),
        ([b"caf\xc3\xa9"], "", "/caf%C3%A9"),
        ([b"\xff\x00"], "", "/%FF%00"),
        ([b"k=v&w:x@y!$'()*+,"], "", "/k=v&w:x@y!$'()*+,"),
        ([b"..."], "", "/..."),
        ([b".hidden"], "", "/.hidden"),
        ([b"temp"], "/api", "/api/temp"),
        ([b"temp"], "/api/", "/api/temp"),
        ([b"temp"], "api", "/api/temp"),
        ([], "/api", "/api/"),
    ],
)
def test_uri_path_rfc7252_6_5(segments: list[bytes], prefix: str, path: str) -> None:
    msg = req(*[(Opt.URI_PATH, s) for s in segments])
    assert hdrs(msg, path_prefix=prefix).get(b":path") == path.encode()


@pytest.mark.parametrize("segment", [b".", b"..", b"../etc", b"a/..", b"./x", b"a/./b", b"..\\x", b"x\\.."])
def test_dot_segments_never_reach_upstream(segment: bytes) -> None:
    err = mapping_error(req((Opt.URI_PATH, b"api"), (Opt.URI_PATH, segment)))
    assert (err.code, err.stat) == (Code.BAD_REQUEST, "bad_path")


@pytest.mark.parametrize(
    ("queries", "suffix"),
    [
        ([b"a=1"], "?a=1"),
        ([b"a=1", b"b=2"], "?a=1&b=2"),
        ([b"x=a&b"], "?x=a%26b"),
        ([b"x=a+b c"], "?x=a%2Bb%20c"),
        ([b"x=a;b"], "?x=a%3Bb"),
        ([b"u=/p?q:@"], "?u=/p?q:@"),
        ([b"#frag"], "?%23frag"),
        ([b""], "?"),
        ([b"\xc3\xa9"], "?%C3%A9"),
    ],
)
def test_uri_query_rfc7252_6_5(queries: list[bytes], suffix: str) -> None:
    msg = req((Opt.URI_PATH, b"r"), *[(Opt.URI_QUERY, q) for q in queries])
    assert hdrs(msg).get(b":path") == ("/r" + suffix).encode()


# ---------------------------------------------------------------- request: Uri-Host/Port (RFC 7252 §6.4)


@pytest.mark.parametrize(
    ("options", "default", "authority"),
    [
        ([], "dev.local", "dev.local"),
        ([(Opt.URI_HOST, b"Sensors.Example")], "dev.local", "sensors.example"),
        ([(Opt.URI_HOST, b"h"), (Opt.URI_PORT, encode_uint(8080))], "dev.local", "h:8080"),
        ([(Opt.URI_HOST, b"h"), (Opt.URI_PORT, b"")], "dev.local", "h:0"),
        ([(Opt.URI_HOST, b"[2001:db8::1]")], "dev.local", "[2001:db8::1]"),
        ([(Opt.URI_HOST, b"2001:db8::1")], "dev.local", "[2001:db8::1]"),
        ([(Opt.URI_HOST, b"192.0.2.1")], "dev.local", "192.0.2.1"),
        ([(Opt.URI_PORT, encode_uint(5684))], "dev.local:5683", "dev.local:5684"),
        ([(Opt.URI_PORT, encode_uint(5684))], "[::1]:5683", "[::1]:5684"),
        ([(Opt.URI_PORT, encode_uint(5684))], "dev.local", "dev.local:5684"),
    ],
)
def test_uri_host_and_port_rfc7252_6_4(
    options: list[tuple[int, bytes]], default: str, authority: str
) -> None:
    assert hdrs(req(*options), authority=default).get(b":authority") == authority.encode()


@pytest.mark.parametrize(
    "host", [b"a b", b"evil/x", b"user@h", b"h\r\nx: y", b"\xc3\xa9", b"[zz::1]", b"h%41"]
)
def test_malformed_uri_host_is_4_00(host: bytes) -> None:
    err = mapping_error(req((Opt.URI_HOST, host)))
    assert (err.code, err.stat) == (Code.BAD_REQUEST, "bad_uri_host")


# ----------------------------------------------------------- request: option validation (RFC 7252 §5.4)


@pytest.mark.parametrize("number", [13, 2049, 65001, 1001])
def test_unrecognized_critical_option_is_4_02_rfc7252_5_4_1(number: int) -> None:
    err = mapping_error(req((number, b"x")))
    assert (err.code, err.stat) == (Code.BAD_OPTION, "bad_option")
    assert str(number) in err.detail


@pytest.mark.parametrize("number", [2, 16, 2048, 65000])
def test_unrecognized_elective_option_is_ignored_rfc7252_5_4_1(number: int) -> None:
    assert hdrs(req((number, b"x"))).get(b":path") == b"/"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        (Opt.URI_PORT, b"\x00\x00\x01"),  # > 2 bytes
        (Opt.ACCEPT, b"\x00\x00\x01"),
        (Opt.IF_MATCH, b"123456789"),
        (Opt.IF_NONE_MATCH, b"x"),
        (Opt.BLOCK2, b"\x00\x00\x00\x01"),
        (Opt.URI_HOST, b""),
    ],
)
def test_critical_option_with_bad_length_is_4_02_rfc7252_5_4_3(option: int, value: bytes) -> None:
    assert mapping_error(req((option, value))).code == Code.BAD_OPTION


@pytest.mark.parametrize(
    ("option", "value"),
    [(Opt.CONTENT_FORMAT, b"\x00\x00\x32"), (Opt.ETAG, b""), (Opt.ETAG, b"123456789"), (Opt.SIZE1, b"12345")],
)
def test_elective_option_with_bad_length_is_ignored_rfc7252_5_4_3(option: int, value: bytes) -> None:
    h = hdrs(req((option, value)))
    assert b"content-type" not in h
    assert b"if-none-match" not in h


@pytest.mark.parametrize("option", [Opt.URI_HOST, Opt.URI_PORT, Opt.ACCEPT, Opt.IF_NONE_MATCH])
def test_repeated_critical_non_repeatable_option_is_4_02_rfc7252_5_4_5(option: int) -> None:
    value = b"" if option == Opt.IF_NONE_MATCH else b"h"
    assert mapping_error(req((option, value), (option, value))).code == Code.BAD_OPTION


def test_repeated_elective_non_repeatable_option_keeps_the_first_rfc7252_5_4_5() -> None:
    h = hdrs(req((Opt.CONTENT_FORMAT, encode_uint(50)), (Opt.CONTENT_FORMAT, encode_uint(60))))
    assert h.get_all(b"content-type") == [b"application/json"]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        (Opt.OBSERVE, b""),
        (Opt.BLOCK1, b"\x0e"),
        (Opt.BLOCK2, b"\x02"),
        (Opt.SIZE1, encode_uint(4000)),
        (Opt.SIZE2, b""),
        (Opt.OSCORE, b"\x09\x00"),
        (Opt.ECHO, b"\x01\x02"),
        (Opt.NO_RESPONSE, b"\x02"),
        (Opt.REQUEST_TAG, b"\x07"),
        (Opt.LOCATION_PATH, b"x"),
        (Opt.MAX_AGE, b"\x05"),
    ],
)
def test_options_the_front_handles_are_accepted_and_not_mapped(option: int, value: bytes) -> None:
    h = hdrs(req((Opt.URI_PATH, b"r"), (option, value)))
    assert [k for k, _ in h] == [b":method", b":scheme", b":authority", b":path"]


@pytest.mark.parametrize("option", [(Opt.PROXY_URI, b"coap://elsewhere/x"), (Opt.PROXY_SCHEME, b"http")])
def test_forward_proxy_requests_are_5_05_rfc7252_5_10_2(option: tuple[int, bytes]) -> None:
    err = mapping_error(req(option))
    assert (err.code, err.stat) == (Code.PROXYING_NOT_SUPPORTED, "proxying")


# ------------------------------------------------ request: Content-Format/Accept (RFC 7252 §5.10.3/§5.10.4)


@pytest.mark.parametrize(
    ("number", "content_type", "coding"),
    [
        (0, b"text/plain; charset=utf-8", None),
        (50, b"application/json", None),
        (60, b"application/cbor", None),
        (11542, b"application/vnd.oma.lwm2m+tlv", None),
        (11050, b"application/json", b"deflate"),
    ],
)
def test_content_format_and_accept_to_headers(number: int, content_type: bytes, coding: bytes | None) -> None:
    h = hdrs(req((Opt.CONTENT_FORMAT, encode_uint(number)), code=POST, payload=b"x"))
    assert (h.get(b"content-type"), h.get(b"content-encoding")) == (content_type, coding)
    h = hdrs(req((Opt.ACCEPT, encode_uint(number))))
    assert (h.get(b"accept"), h.get(b"accept-encoding")) == (content_type, coding)


def test_unknown_content_format_is_4_15() -> None:
    err = mapping_error(req((Opt.CONTENT_FORMAT, encode_uint(65000)), code=POST))
    assert (err.code, err.stat) == (Code.UNSUPPORTED_CONTENT_FORMAT, "unsupported_content_format")


def test_unknown_accept_is_4_06() -> None:
    err = mapping_error(req((Opt.ACCEPT, encode_uint(9999))))
    assert (err.code, err.stat) == (Code.NOT_ACCEPTABLE, "not_acceptable")


@pytest.mark.parametrize(
    ("code", "payload", "length"),
    [(GET, b"", None), (GET, b"q", b"1"), (POST, b"", b"0"), (PUT, b"abc", b"3"), (DELETE, b"", None)],
)
def test_body_and_content_length(code: int, payload: bytes, length: bytes | None) -> None:
    h, body = request_headers(req(code=code, payload=payload), authority="d")
    assert body == payload
    assert h.get(b"content-length") == length


# ------------------------------------------ request: conditionals (RFC 7252 §5.10.6.2, §5.10.8)


@pytest.mark.parametrize(
    ("options", "field", "value"),
    [
        ([(Opt.IF_MATCH, b"\xab\x12")], b"if-match", b'"ab12"'),
        ([(Opt.IF_MATCH, b"\x01"), (Opt.IF_MATCH, b"\x02")], b"if-match", b'"01", "02"'),
        ([(Opt.IF_MATCH, b"")], b"if-match", b"*"),
        ([(Opt.IF_MATCH, b"\x01"), (Opt.IF_MATCH, b"")], b"if-match", b"*"),
        ([(Opt.IF_NONE_MATCH, b"")], b"if-none-match", b"*"),
        ([(Opt.ETAG, b"\x00\xff")], b"if-none-match", b'"00ff"'),
        ([(Opt.ETAG, b"\x01"), (Opt.ETAG, b"\x02")], b"if-none-match", b'"01", "02"'),
        ([(Opt.ETAG, b"\x01"), (Opt.IF_NONE_MATCH, b"")], b"if-none-match", b"*"),
    ],
)
def test_conditionals(options: list[tuple[int, bytes]], field: bytes, value: bytes) -> None:
    assert hdrs(req(*options)).get_all(field) == [value]


def test_size1_maps_to_nothing_rfc7959_4() -> None:
    h = hdrs(req((Opt.SIZE1, encode_uint(3)), code=PUT, payload=b"abc"))
    assert h.get(b"content-length") == b"3"
    assert all(not k.startswith(b"size") for k, _ in h)


# -------------------------------------------------------------------- response codes (RFC 8075 §7, inverted)


@pytest.mark.parametrize(
    ("method", "status", "code"),
    [
        (GET, 200, Code.CONTENT),
        (FETCH, 200, Code.CONTENT),
        (POST, 200, Code.CHANGED),
        (PUT, 200, Code.CHANGED),
        (PATCH, 200, Code.CHANGED),
        (IPATCH, 200, Code.CHANGED),
        (DELETE, 200, Code.DELETED),
        (POST, 201, Code.CREATED),
        (PUT, 201, Code.CREATED),
        (GET, 201, Code.CONTENT),
        (POST, 202, Code.CHANGED),
        (PUT, 202, Code.CHANGED),
        (DELETE, 202, Code.DELETED),
        (GET, 203, Code.CONTENT),
        (POST, 204, Code.CHANGED),
        (PUT, 204, Code.CHANGED),
        (DELETE, 204, Code.DELETED),
        (GET, 204, Code.CONTENT),
        (POST, 205, Code.CHANGED),
        (GET, 206, Code.CONTENT),
        (GET, 299, Code.CONTENT),
        (GET, 304, Code.VALID),
        (GET, 301, Code.BAD_GATEWAY),
        (GET, 302, Code.BAD_GATEWAY),
        (GET, 100, Code.BAD_GATEWAY),
        (GET, 400, Code.BAD_REQUEST),
        (GET, 401, Code.UNAUTHORIZED),
        (GET, 402, Code.BAD_REQUEST),
        (GET, 403, Code.FORBIDDEN),
        (GET, 404, Code.NOT_FOUND),
        (GET, 405, Code.METHOD_NOT_ALLOWED),
        (GET, 406, Code.NOT_ACCEPTABLE),
        (GET, 408, Code.BAD_REQUEST),
        (PUT, 409, Code.CONFLICT),
        (GET, 410, Code.NOT_FOUND),
        (PUT, 411, Code.BAD_REQUEST),
        (PUT, 412, Code.PRECONDITION_FAILED),
        (PUT, 413, Code.REQUEST_ENTITY_TOO_LARGE),
        (GET, 414, Code.BAD_OPTION),
        (PUT, 415, Code.UNSUPPORTED_CONTENT_FORMAT),
        (GET, 416, Code.BAD_REQUEST),
        (PATCH, 422, Code.UNPROCESSABLE_ENTITY),
        (GET, 429, Code.TOO_MANY_REQUESTS),
        (GET, 451, Code.BAD_REQUEST),
        (GET, 500, Code.INTERNAL_SERVER_ERROR),
        (GET, 501, Code.NOT_IMPLEMENTED),
        (GET, 502, Code.BAD_GATEWAY),
        (GET, 503, Code.SERVICE_UNAVAILABLE),
        (GET, 504, Code.GATEWAY_TIMEOUT),
        (GET, 505, Code.BAD_GATEWAY),
        (GET, 507, Code.INTERNAL_SERVER_ERROR),
        (GET, 600, Code.BAD_GATEWAY),
    ],
)
def test_status_table_rfc8075_7(method: int, status: int, code: int) -> None:
    assert status_to_code(method, status) == code
    assert resp(status, method=method)[0] == code


# ------------------------------------------------------------- response: Content-Format (RFC 8075 §6.2)


@pytest.mark.parametrize(
    ("fields", "body", "code", "cf"),
    [
        ([(b"content-type", b"application/json")], b"{}", Code.CONTENT, [encode_uint(50)]),
        ([(b"content-type", b"text/plain; charset=utf-8")], b"hi", Code.CONTENT, [b""]),
        ([(b"content-type", b"application/json"), (b"content-encoding", b"deflate")], b"x", Code.CONTENT,
         [encode_uint(11050)]),
        ([], b"raw", Code.CONTENT, None),
        ([(b"content-type", b"text/html")], b"", Code.CONTENT, None),
        ([(b"content-type", b"text/html")], b"<p>", Code.BAD_GATEWAY, None),
        ([(b"content-type", b"application/json"), (b"content-encoding", b"gzip")], b"x", Code.BAD_GATEWAY,
         None),
        ([(b"content-encoding", b"br")], b"x", Code.BAD_GATEWAY, None),
    ],
)  # fmt: skip
def test_content_type_to_content_format(
    fields: list[tuple[bytes, bytes]], body: bytes, code: int, cf: list[bytes] | None
) -> None:
    got_code, options, payload = resp(200, fields, body)
    assert got_code == code
    assert options.get(Opt.CONTENT_FORMAT) == cf
    if code == Code.BAD_GATEWAY:
        assert payload.startswith((b"no CoAP Content-Format", b"content-encoding"))
        assert options[Opt.MAX_AGE] == [b""]
    else:
        assert payload == body


# ------------------------------------------------------ response: Max-Age (RFC 7252 §5.10.5, RFC 9111)


@pytest.mark.parametrize(
    ("status", "fields", "max_age"),
    [
        (200, [(b"cache-control", b"max-age=30")], 30),
        (200, [(b"cache-control", b'public, max-age="30"')], 30),
        (200, [(b"cache-control", b"max-age=30, s-maxage=10")], 10),
        (200, [(b"cache-control", b"s-maxage=10")], 10),
        (200, [(b"cache-control", b"max-age=30"), (b"age", b"12")], 18),
        (200, [(b"cache-control", b"max-age=30"), (b"age", b"99")], 0),
        (200, [(b"cache-control", b"max-age=99999999999")], MAX_AGE_MAX),
        (200, [(b"cache-control", b"max-age=abc")], 0),
        (200, [(b"cache-control", b"no-store")], 0),
        (200, [(b"cache-control", b"no-cache, max-age=30")], 0),
        (200, [(b"cache-control", b"private, max-age=30")], 0),
        (200, [(b"cache-control", b"public")], None),
        (200, [], None),
        (
            200,
            [(b"date", b"Sun, 06 Nov 1994 08:49:37 GMT"), (b"expires", b"Sun, 06 Nov 1994 08:50:37 GMT")],
            60,
        ),
        (200, [(b"date", b"Sun, 06 Nov 1994 08:49:37 GMT"), (b"expires", b"0")], 0),
        (200, [(b"expires", b"Sunday, 06-Nov-94 08:49:47 GMT")], 10),  # Date missing: relative to now
        (200, [(b"expires", b"Sun Nov  6 08:49:57 1994")], 20),
        (304, [(b"cache-control", b"max-age=5")], 5),
        (304, [], None),
        (404, [], None),  # heuristically cacheable (RFC 9110 §15.1): CoAP's default applies
        (404, [(b"cache-control", b"max-age=7")], 7),
        (500, [], 0),
        (502, [], 0),
        (403, [], 0),
        (503, [(b"retry-after", b"120")], 120),
        (503, [(b"retry-after", b"Sun, 06 Nov 1994 08:50:37 GMT")], 60),
        (503, [(b"retry-after", b"Sun, 06 Nov 1994 08:40:37 GMT")], 0),
        (503, [(b"retry-after", b"soon"), (b"cache-control", b"max-age=3")], 3),
        (503, [(b"retry-after", b"soon")], 0),
        (429, [(b"retry-after", b"2")], 2),
        (500, [(b"retry-after", b"2")], 0),  # Retry-After only means "retry" on 503 and 429
    ],
)
def test_max_age(status: int, fields: list[tuple[bytes, bytes]], max_age: int | None) -> None:
    _, options, _ = resp(status, fields, now=IMF_EPOCH)
    got = options.get(Opt.MAX_AGE)
    assert (None if got is None else read_uint(got[0])) == max_age
    if got is not None:
        assert got[0] == encode_uint(max_age or 0)


def test_retry_after_date_needs_now() -> None:
    _, options, _ = resp(503, [(b"retry-after", b"Sun, 06 Nov 1994 08:50:37 GMT")])
    assert options[Opt.MAX_AGE] == [b""]  # 503 without usable freshness is not cached


@pytest.mark.parametrize("method", [POST, PUT, DELETE])
def test_no_max_age_on_uncacheable_success_codes_rfc7252_5_9_1(method: int) -> None:
    assert Opt.MAX_AGE not in resp(200, [(b"cache-control", b"max-age=30")], method=method)[1]


# --------------------------------------------------------------------- response: ETag (RFC 7252 §5.10.6)


def _hash8(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()[:8]


@pytest.mark.parametrize(
    ("etag", "expected"),
    [
        (b'"ab12"', b"\xab\x12"),
        (b'"0011223344556677"', bytes.fromhex("0011223344556677")),
        (b' "ab" ', b"\xab"),
        (b'"001122334455667788"', _hash8(b'"001122334455667788"')),  # 9 bytes: too long for CoAP
        (b'"AB12"', _hash8(b'"AB12"')),  # upper-case would not round-trip through our lower-case hex
        (b'"abc"', _hash8(b'"abc"')),
        (b'"65f1a2b3-1a4"', _hash8(b'"65f1a2b3-1a4"')),  # nginx style
        (b'W/"ab12"', _hash8(b'W/"ab12"')),
        (b'""', _hash8(b'""')),
        (b"unquoted", None),
        (b'"a"b"', None),
        (b'"', None),
    ],
)
def test_etag(etag: bytes, expected: bytes | None) -> None:
    _, options, _ = resp(200, [(b"etag", etag)])
    assert options.get(Opt.ETAG) == (None if expected is None else [expected])


def test_etag_validation_round_trip_rfc7252_5_10_6_2() -> None:
    """A CoAP ETag from a hex HTTP tag, sent back by the client, asks the upstream for exactly that tag."""
    _, options, _ = resp(200, [(b"etag", b'"c0ffee"')], b"x")
    coap_etag = options[Opt.ETAG][0]
    h = hdrs(req((Opt.ETAG, coap_etag)))
    assert h.get(b"if-none-match") == b'"c0ffee"'
    code, options, payload = resp(304, [(b"etag", h.get(b"if-none-match") or b"")], b"ignored")
    assert (code, options[Opt.ETAG], payload) == (Code.VALID, [coap_etag], b"")


# ------------------------------------------------------------ response: Location (RFC 7252 §5.10.7)


@pytest.mark.parametrize(
    ("location", "kw", "path", "query"),
    [
        (b"/things/5", {}, [b"things", b"5"], None),
        (b"/things/5?a=1&b=2", {}, [b"things", b"5"], [b"a=1", b"b=2"]),
        (b"/things/a%20b%2Fc", {}, [b"things", b"a b/c"], None),
        (b"/t?x=%26", {}, [b"t"], [b"x=&"]),
        (b"/t/", {}, [b"t", b""], None),
        (b"/", {}, None, None),
        (b"/t#frag", {}, [b"t"], None),
        (b"/api/things/5", {"path_prefix": "/api"}, [b"things", b"5"], None),
        (b"/api", {"path_prefix": "/api/"}, None, None),
        (b"/other/5", {"path_prefix": "/api"}, None, None),
        (b"http://elsewhere/x", {}, None, None),
        (b"https://up.internal:8443/x/y?q", {"request_authority": "UP.internal:8443"}, [b"x", b"y"], [b"q"]),
        (b"https://up.internal/x", {"request_authority": "other"}, None, None),
        (b"//up/x", {"request_authority": "up"}, [b"x"], None),
        (b"things/5", {}, None, None),  # relative to a request URI we do not know
        (b"/a/../b", {}, None, None),
        (b"/" + b"x" * 256, {}, None, None),
        (b"/caf\xc3\xa9", {}, None, None),
    ],
)
def test_location_rfc7252_5_10_7(
    location: bytes, kw: dict[str, Any], path: list[bytes] | None, query: list[bytes] | None
) -> None:
    code, options, _ = resp(201, [(b"location", location)], method=POST, **kw)
    assert code == Code.CREATED
    assert options.get(Opt.LOCATION_PATH) == path
    assert options.get(Opt.LOCATION_QUERY) == query


# ---------------------------------------------------- response: diagnostic payloads (RFC 7252 §5.5.2)


@pytest.mark.parametrize(
    ("fields", "body", "payload"),
    [
        ([(b"content-type", b"text/plain")], b"no such\n  sensor", b"no such sensor"),
        ([(b"content-type", b"text/plain; charset=utf-8")], b"x" * 500, b"x" * DIAGNOSTIC_MAX),
        ([(b"content-type", b"text/plain")], "é".encode() * 100, "é".encode() * (DIAGNOSTIC_MAX // 2)),
        ([(b"content-type", b"text/plain")], b"bad \xff byte", "bad \ufffd byte".encode()),
        ([(b"content-type", b"text/html")], b"<h1>404</h1>", b""),
        ([(b"content-type", b"application/json")], b'{"e":1}', b""),
        ([], b"text without a type", b""),
    ],
)
def test_error_diagnostic_payload(fields: list[tuple[bytes, bytes]], body: bytes, payload: bytes) -> None:
    code, options, got = resp(404, fields, body)
    assert code == Code.NOT_FOUND
    assert got == payload
    assert len(got) <= DIAGNOSTIC_MAX
    got.decode("utf-8")  # always valid UTF-8
    assert Opt.CONTENT_FORMAT not in options  # diagnostic payloads carry no Content-Format


def test_redirect_is_5_02_with_a_diagnostic() -> None:
    code, options, payload = resp(302, [(b"location", b"/x")], b"moved")
    assert (code, options, payload) == (Code.BAD_GATEWAY, {Opt.MAX_AGE: [b""]}, b"upstream redirect (302)")


def test_304_drops_the_body_and_keeps_content_format() -> None:
    code, options, payload = resp(304, [(b"etag", b'"01"'), (b"content-type", b"application/json")], b"x")
    assert (code, payload) == (Code.VALID, b"")
    assert options[Opt.ETAG] == [b"\x01"]


# ------------------------------------------------------------------------------ local failures


@pytest.mark.parametrize(
    ("kind", "kw", "code", "options"),
    [
        ("unreachable", {}, Code.BAD_GATEWAY, [(Opt.MAX_AGE, b"")]),
        ("timeout", {}, Code.GATEWAY_TIMEOUT, [(Opt.MAX_AGE, b"")]),
        ("internal", {}, Code.INTERNAL_SERVER_ERROR, [(Opt.MAX_AGE, b"")]),
        ("overflow", {"retry_after": 2.2}, Code.SERVICE_UNAVAILABLE, [(Opt.MAX_AGE, b"\x03")]),
        ("overflow", {"retry_after": 0}, Code.SERVICE_UNAVAILABLE, [(Opt.MAX_AGE, b"")]),
        ("overflow", {}, Code.SERVICE_UNAVAILABLE, []),
        ("no_route", {}, Code.NOT_FOUND, []),
        ("too_large", {"size1": 1024}, Code.REQUEST_ENTITY_TOO_LARGE, [(Opt.SIZE1, b"\x04\x00")]),
        ("too_large", {}, Code.REQUEST_ENTITY_TOO_LARGE, []),
    ],
)
def test_error_response(kind: str, kw: dict[str, float], code: int, options: list[tuple[int, bytes]]) -> None:
    got = error_response(kind, **kw)  # type: ignore[arg-type]
    assert got[:2] == (code, options)
    assert 0 < len(got[2]) <= DIAGNOSTIC_MAX


def test_mapping_error_response_and_repr() -> None:
    err = MappingError(Code.BAD_OPTION, "unrecognized critical option 13" + "x" * 200, "bad_option")
    code, options, payload = err.response()
    assert (code, options, len(payload)) == (Code.BAD_OPTION, [], DIAGNOSTIC_MAX)
    assert "4.02" in repr(err)


# ----------------------------------------------------------------------------------------- fuzzing

_interesting_numbers = st.sampled_from(
    [1, 3, 4, 5, 6, 7, 8, 9, 11, 12, 14, 15, 17, 20, 23, 27, 28, 35, 39, 60, 252, 258, 292, 2, 13, 16, 65001]
)
_option = st.tuples(
    st.one_of(_interesting_numbers, st.integers(0, 65535)),
    st.one_of(
        st.binary(max_size=12),
        st.sampled_from([b".", b"..", b"../x", b"a/..", b"%2e%2e", b"\\..", b"x/y", b""]),
    ),
)
_segment = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([b".", b"..", b"../x", b"a/..", b"%2e%2e", b"\\..", b"x/y", b""]),
    st.text(alphabet="./\\a%2eE", max_size=6).map(str.encode),
)
_uri_paths = st.lists(_segment, max_size=5).map(lambda segs: [(Opt.URI_PATH, s) for s in segs])
_messages = st.builds(
    Message,
    mtype=st.integers(0, 3),
    code=st.one_of(st.integers(1, 7), st.integers(0, 255)),
    mid=st.just(1),
    token=st.binary(max_size=8),
    options=st.tuples(_uri_paths, st.lists(_option, max_size=6)).map(lambda t: sort_options(t[0] + t[1])),
    payload=st.binary(max_size=32),
)
_prefixes = st.sampled_from(["", "/api", "/api/", "coap", "/a/b"])
_FIELD_VALUE = re.compile(rb"^[\x20-\x7e]*$")


@given(_messages, _prefixes)
def test_fuzz_request_mapping_never_escapes_the_prefix(msg: Message, prefix: str) -> None:
    error: MappingError | None = None
    try:
        headers, body = request_headers(msg, authority="dev.local:5683", path_prefix=prefix)
    except MappingError as e:
        error = e
    if error is not None:
        assert error.code >> 5 in (4, 5)
        assert error.stat
        return
    assert body == msg.payload
    path = headers.get(b":path")
    assert path is not None
    base = "/" + prefix.strip("/") if prefix.strip("/") else ""
    assert path.startswith(base.encode() + b"/")
    raw_path = path.split(b"?", 1)[0]
    decoded = unquote_to_bytes(raw_path)
    segments = re.split(rb"[/\\]", decoded)
    assert b".." not in segments
    assert b"." not in segments
    for name, value in headers:
        assert name == name.lower()
        assert _FIELD_VALUE.match(value), (name, value)


_header_names = st.sampled_from(
    [b"content-type", b"content-encoding", b"cache-control", b"etag", b"location", b"retry-after", b"expires",
     b"date", b"age", b"x-other"]
)  # fmt: skip
_header_values = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [b"application/json", b"text/plain", b"text/html", b"max-age=5", b"no-store", b'"ab12"', b'W/"x"',
         b"/a/b?c", b"http://h/x", b"120", b"Sun, 06 Nov 1994 08:49:37 GMT", b"deflate", b"gzip", b"x%zz"]
    ),
)  # fmt: skip


@given(
    st.integers(0, 31),
    st.integers(100, 599),
    st.lists(st.tuples(_header_names, _header_values), max_size=8),
    st.binary(max_size=300),
    st.one_of(st.none(), st.floats(0, 2e9)),
    _prefixes,
)
def test_fuzz_response_mapping_never_raises(
    method: int, status: int, fields: list[tuple[bytes, bytes]], body: bytes, now: float | None, prefix: str
) -> None:
    code, options, payload = response_options(
        method, status, Headers(fields), body, now=now, path_prefix=prefix, request_authority="h"
    )
    assert code >> 5 in (2, 4, 5)
    assert options == sorted(options, key=lambda o: o[0])
    for number, value in options:
        assert number in (Opt.CONTENT_FORMAT, Opt.MAX_AGE, Opt.ETAG, Opt.LOCATION_PATH, Opt.LOCATION_QUERY)
        if number == Opt.ETAG:
            assert 1 <= len(value) <= 8
        elif number in (Opt.CONTENT_FORMAT, Opt.MAX_AGE):
            assert len(value) <= (2 if number == Opt.CONTENT_FORMAT else 4)
        else:
            assert len(value) <= 255
            assert value not in (b".", b"..")
    if code >> 5 != 2:
        assert len(payload) <= DIAGNOSTIC_MAX
        payload.decode("utf-8")
    elif code == Code.VALID:
        assert payload == b""
