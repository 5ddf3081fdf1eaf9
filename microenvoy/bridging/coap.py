"""CoAP request -> HTTP exchange and HTTP response -> CoAP response, sans-IO (RFC 7252 §10.2, RFC 8075).

RFC 8075 specifies the HTTP-to-CoAP direction (an HTTP client reaching a CoAP server); the CoAP front is the
mirror image (a CoAP client reaching HTTP upstreams, RFC 7252 §10.2). This module applies RFC 8075's tables
inverted, and says where it had to choose; ``docs/coap.md`` has the same tables for users.

* :func:`request_headers` turns a CoAP request into HTTP request headers (pseudo-headers first) and a body,
  or raises :class:`MappingError` carrying the CoAP error code, a diagnostic text (RFC 7252 §5.5.2) and a stat
  name: 4.02 for an unrecognized critical option (§5.4.1), 4.05 for an unknown method (§5.8), 4.15 / 4.06
  for a Content-Format / Accept with no media type, 5.05 for Proxy-Uri / Proxy-Scheme (a reverse proxy).
* :func:`response_options` turns the upstream HTTP response into ``(code, options, payload)``.
* :func:`error_response` answers local failures (upstream unreachable, timeout, overflow ...).

Options the front handles itself (Observe, Block1/Block2, Size1/Size2, OSCORE, Echo, No-Response,
Request-Tag) pass validation here and are otherwise ignored. Nothing here keeps state.
"""

from __future__ import annotations

import hashlib
import math
import re
from datetime import UTC, datetime
from typing import Final, Literal
from urllib.parse import unquote_to_bytes

from microenvoy.codecs.coap.message import METHODS, OPTION_LENGTHS, Message, Opt, is_critical, is_request_code
from microenvoy.core.headers import Headers

__all__ = [
    "CONTENT_FORMATS",
    "CONTENT_FORMATS_CODED",
    "DIAGNOSTIC_MAX",
    "MAX_AGE_DEFAULT",
    "MAX_AGE_MAX",
    "Code",
    "ErrorKind",
    "MappingError",
    "content_format_for",
    "error_response",
    "grpc_request",
    "grpc_response",
    "media_type_for",
    "request_headers",
    "response_options",
    "status_to_code",
]

MAX_AGE_DEFAULT: Final = 60
"""Max-Age a CoAP recipient assumes when the option is absent (RFC 7252 §5.10.5)."""
MAX_AGE_MAX: Final = 2**32 - 1
"""Largest Max-Age value (4-byte uint)."""
DIAGNOSTIC_MAX: Final = 128
"""Longest diagnostic payload (bytes) put on an error response (RFC 7252 §5.5.2)."""

CoapOptions = list[tuple[int, bytes]]
CoapResponse = tuple[int, CoapOptions, bytes]


class Code:
    """Response codes (RFC 7252 §12.1.2, RFC 8132, RFC 8516) as ``class << 5 | detail``."""

    CREATED = 0x41  # 2.01
    DELETED = 0x42  # 2.02
    VALID = 0x43  # 2.03
    CHANGED = 0x44  # 2.04
    CONTENT = 0x45  # 2.05
    BAD_REQUEST = 0x80  # 4.00
    UNAUTHORIZED = 0x81  # 4.01
    BAD_OPTION = 0x82  # 4.02
    FORBIDDEN = 0x83  # 4.03
    NOT_FOUND = 0x84  # 4.04
    METHOD_NOT_ALLOWED = 0x85  # 4.05
    NOT_ACCEPTABLE = 0x86  # 4.06
    REQUEST_ENTITY_INCOMPLETE = 0x88  # 4.08
    CONFLICT = 0x89  # 4.09
    PRECONDITION_FAILED = 0x8C  # 4.12
    REQUEST_ENTITY_TOO_LARGE = 0x8D  # 4.13
    UNSUPPORTED_CONTENT_FORMAT = 0x8F  # 4.15
    UNPROCESSABLE_ENTITY = 0x96  # 4.22
    TOO_MANY_REQUESTS = 0x9D  # 4.29
    INTERNAL_SERVER_ERROR = 0xA0  # 5.00
    NOT_IMPLEMENTED = 0xA1  # 5.01
    BAD_GATEWAY = 0xA2  # 5.02
    SERVICE_UNAVAILABLE = 0xA3  # 5.03
    GATEWAY_TIMEOUT = 0xA4  # 5.04
    PROXYING_NOT_SUPPORTED = 0xA5  # 5.05


# ------------------------------------------------------------------------------------ content formats

CONTENT_FORMATS: dict[int, str] = {
    0: "text/plain; charset=utf-8",
    16: 'application/cose; cose-type="cose-encrypt0"',
    17: 'application/cose; cose-type="cose-mac0"',
    18: 'application/cose; cose-type="cose-sign1"',
    19: "application/ace+cbor",
    21: "image/gif",
    22: "image/jpeg",
    23: "image/png",
    40: "application/link-format",
    41: "application/xml",
    42: "application/octet-stream",
    47: "application/exi",
    50: "application/json",
    51: "application/json-patch+json",
    52: "application/merge-patch+json",
    60: "application/cbor",
    61: "application/cwt",
    62: "application/multipart-core",
    63: "application/cbor-seq",
    96: 'application/cose; cose-type="cose-encrypt"',
    97: 'application/cose; cose-type="cose-mac"',
    98: 'application/cose; cose-type="cose-sign"',
    101: "application/cose-key",
    102: "application/cose-key-set",
    110: "application/senml+json",
    111: "application/sensml+json",
    112: "application/senml+cbor",
    113: "application/sensml+cbor",
    114: "application/senml-exi",
    115: "application/sensml-exi",
    140: "application/yang-data+cbor; id=sid",
    256: "application/coap-group+json",
    257: "application/concise-problem-details+cbor",
    258: "application/swid+cbor",
    271: "application/dots+cbor",
    272: "application/missing-blocks+cbor-seq",
    280: "application/pkcs7-mime; smime-type=server-generated-key",
    281: "application/pkcs7-mime; smime-type=certs-only",
    284: "application/pkcs8",
    285: "application/csrattrs",
    286: "application/pkcs10",
    287: "application/pkix-cert",
    290: "application/aif+cbor",
    291: "application/aif+json",
    310: "application/senml+xml",
    311: "application/sensml+xml",
    320: "application/senml-etch+json",
    322: "application/senml-etch+cbor",
    340: "application/yang-data+cbor",
    341: "application/yang-data+cbor; id=name",
    432: "application/td+json",
    10000: "application/vnd.ocf+cbor",
    10001: "application/oscore",
    10002: "application/javascript",
    11542: "application/vnd.oma.lwm2m+tlv",
    11543: "application/vnd.oma.lwm2m+json",
    11544: "application/vnd.oma.lwm2m+cbor",
    20000: "text/css",
    30000: "image/svg+xml",
}
"""The IANA "CoAP Content-Formats" registry entries with identity content coding (RFC 7252 §12.3)."""

CONTENT_FORMATS_CODED: dict[int, tuple[int, str]] = {11050: (50, "deflate"), 11060: (60, "deflate")}
"""Registry entries with a content coding: number -> (identity number, coding)."""

_TOKEN = r"[a-z0-9!#$&^_.+\-]+"
_MEDIA_TYPE = re.compile(rf"^{_TOKEN}/{_TOKEN}$")
_UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii"})  # us-ascii text is valid UTF-8


def _parse_media_type(value: str) -> tuple[str, dict[str, str]] | None:
    """``type/subtype; a=b; c="d"`` -> (lower-case type, {lower-case name: unquoted value})."""
    parts = value.split(";")
    mt = parts[0].strip().lower()
    if not _MEDIA_TYPE.match(mt):
        return None
    params: dict[str, str] = {}
    for part in parts[1:]:
        name, eq, val = part.strip().partition("=")
        if not eq:
            continue  # tolerate "text/plain;" and stray tokens
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = re.sub(r"\\(.)", r"\1", val[1:-1])
        params[name.strip().lower()] = val
    return mt, params


def _build_index() -> tuple[dict[tuple[str, frozenset[tuple[str, str]]], int], dict[str, frozenset[str]]]:
    index: dict[tuple[str, frozenset[tuple[str, str]]], int] = {}
    significant: dict[str, set[str]] = {}
    for number, text in CONTENT_FORMATS.items():
        parsed = _parse_media_type(text)
        assert parsed is not None, text
        mt, params = parsed
        params.pop("charset", None)
        significant.setdefault(mt, set()).update(params)
        index[(mt, frozenset((k, v.lower()) for k, v in params.items()))] = number
    return index, {mt: frozenset(names) for mt, names in significant.items()}


_INDEX, _SIGNIFICANT = _build_index()


def content_format_for(content_type: bytes, *, encoding: bytes | None = None) -> int | None:
    """The CoAP Content-Format number for an HTTP ``content-type`` (and ``content-encoding``), or None.

    Case, whitespace and quoting are normalized; a ``charset`` must be UTF-8 (or US-ASCII) when given;
    parameters the registry entry does not distinguish on are ignored (RFC 8075 §6.2 allows leniency).
    ``application/coap-payload; cf=N`` (RFC 8075 §6.2) is Content-Format N.
    """
    try:
        parsed = _parse_media_type(content_type.decode("ascii"))
    except UnicodeDecodeError:
        return None
    if parsed is None:
        return None
    mt, params = parsed
    coding = (encoding or b"").strip().lower()
    if coding in (b"", b"identity"):
        coding = b""
    charset = params.get("charset")
    if charset is not None and charset.lower() not in _UTF8_CHARSETS:
        return None
    if mt == "application/coap-payload":
        cf = params.get("cf", "")
        if coding or not cf.isdigit() or len(cf) > 5 or int(cf) > 0xFFFF:
            return None
        return int(cf)
    names = _SIGNIFICANT.get(mt, frozenset())
    key = frozenset((k, v.lower()) for k, v in params.items() if k in names)
    number = _INDEX.get((mt, key))
    if number is None or not coding:
        return number
    for coded, (base, name) in CONTENT_FORMATS_CODED.items():
        if base == number and name.encode() == coding:
            return coded
    return None


def media_type_for(number: int) -> tuple[bytes, bytes | None] | None:
    """Content-Format ``number`` -> (HTTP content-type, content-coding or None), or None if unregistered."""
    text = CONTENT_FORMATS.get(number)
    if text is not None:
        return text.encode(), None
    coded = CONTENT_FORMATS_CODED.get(number)
    if coded is not None:
        return CONTENT_FORMATS[coded[0]].encode(), coded[1].encode()
    return None


# ------------------------------------------------------------------------------------------ errors


class MappingError(Exception):
    """A CoAP request that cannot be mapped: answer it with ``code`` and ``detail``, count ``stat``."""

    def __init__(self, code: int, detail: str, stat: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.stat = stat

    def response(self) -> CoapResponse:
        """The error response: the code and ``detail`` as diagnostic payload (RFC 7252 §5.5.2)."""
        return self.code, [], _diagnostic(self.detail)

    def __repr__(self) -> str:
        return f"MappingError({self.code >> 5}.{self.code & 0x1F:02d}, {self.detail!r}, stat={self.stat!r})"


def _diagnostic(text: str) -> bytes:
    """UTF-8 text cut to DIAGNOSTIC_MAX bytes on a character boundary."""
    data = text.encode("utf-8", "replace")
    if len(data) <= DIAGNOSTIC_MAX:
        return data
    return data[:DIAGNOSTIC_MAX].decode("utf-8", "ignore").encode()


# ---------------------------------------------------------------------------------- request mapping

_REPEATABLE = frozenset(
    {
        Opt.IF_MATCH,
        Opt.ETAG,
        Opt.LOCATION_PATH,
        Opt.URI_PATH,
        Opt.URI_QUERY,
        Opt.LOCATION_QUERY,
        Opt.REQUEST_TAG,
    }
)
"""Options that may occur more than once (RFC 7252 §5.10, RFC 9175); a repeated other one is unrecognized
after its first occurrence (§5.4.5)."""


def _safe_table(safe: bytes) -> tuple[str, ...]:
    return tuple(chr(b) if b in safe else f"%{b:02X}" for b in range(256))


_UNRESERVED = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
# pchar (RFC 3986 §3.3) minus ";" (some servers cut path parameters at ";", e.g. Tomcat).
_PATH_SAFE = _safe_table(_UNRESERVED + b"!$&'()*+,=:@")
# query chars minus the "&" separator, "+" (form decoding reads it as a space) and ";" (an old separator).
_QUERY_SAFE = _safe_table(_UNRESERVED + b"!$'()*,=:@/?")


def _quote(value: bytes, table: tuple[str, ...]) -> str:
    return "".join([table[b] for b in value])


_DOT_SEGMENTS = frozenset({b".", b".."})
_HOST = re.compile(r"^(?:[a-z0-9\-._~]+|\[[0-9a-f:.]+\])$")


def _method(code: int) -> bytes:
    if not is_request_code(code):
        raise MappingError(
            Code.BAD_REQUEST, f"code {code >> 5}.{code & 0x1F:02d} is not a request", "bad_request"
        )
    name = METHODS.get(code)
    if name is None:
        raise MappingError(Code.METHOD_NOT_ALLOWED, f"unknown method 0.{code:02d}", "method_not_allowed")
    return b"PATCH" if name == "iPATCH" else name.encode()


def _recognized_options(msg: Message) -> dict[int, list[bytes]]:
    """Options we act on, by number; an unrecognized critical option raises 4.02 (RFC 7252 §5.4.1)."""
    found: dict[int, list[bytes]] = {}
    for number, value in msg.options:
        limits = OPTION_LENGTHS.get(number)
        recognized = (
            limits is not None
            and limits[0] <= len(value) <= limits[1]
            and (number in _REPEATABLE or number not in found)
        )
        if recognized:
            found.setdefault(number, []).append(value)
        elif is_critical(number):
            raise MappingError(Code.BAD_OPTION, f"unrecognized critical option {number}", "bad_option")
    return found


def _path(segments: list[bytes], prefix: str) -> str:
    for seg in segments:
        # %2E is "." (RFC 3986 §6.2.2.2), and upstreams that decode %2F before removing dot segments (nginx
        # does) would resolve "../x" even when encoded: refuse dot segments outright, never forward them.
        if seg in _DOT_SEGMENTS or _DOT_SEGMENTS.intersection(re.split(rb"[/\\]", seg)):
            raise MappingError(Code.BAD_REQUEST, "dot segment in Uri-Path", "bad_path")
    base = prefix.rstrip("/")
    if base and not base.startswith("/"):
        base = "/" + base
    return base + "/" + "/".join(_quote(s, _PATH_SAFE) for s in segments)


def _authority(options: dict[int, list[bytes]], default: str) -> str:
    host_opt = options.get(Opt.URI_HOST)
    port_opt = options.get(Opt.URI_PORT)
    if host_opt is None:
        if port_opt is None:
            return default
        host = default
        if host.startswith("["):
            host = host[: host.find("]") + 1] if "]" in host else host
        elif ":" in host:
            host = host.rsplit(":", 1)[0]
    else:
        try:
            host = host_opt[0].decode("ascii").lower()
        except UnicodeDecodeError:
            host = ""
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # a bare IPv6 literal
        if not _HOST.match(host):
            raise MappingError(Code.BAD_REQUEST, "malformed Uri-Host", "bad_uri_host")
    if port_opt is None:
        return host
    return f"{host}:{int.from_bytes(port_opt[0], 'big')}"


def _etags(values: list[bytes]) -> bytes:
    return b", ".join(b'"' + v.hex().encode() + b'"' for v in values)


def request_headers(
    msg: Message, *, authority: str, scheme: str = "http", path_prefix: str = ""
) -> tuple[Headers, bytes]:
    """A CoAP request -> (HTTP request headers with pseudo-headers, body); :class:`MappingError` if it can't.

    ``authority`` is used when the request has no Uri-Host; ``path_prefix`` is put before the Uri-Path.
    """
    method = _method(msg.code)
    options = _recognized_options(msg)
    if Opt.PROXY_URI in options or Opt.PROXY_SCHEME in options:
        raise MappingError(Code.PROXYING_NOT_SUPPORTED, "forward proxying is not supported", "proxying")
    path = _path(options.get(Opt.URI_PATH, []), path_prefix)
    queries = options.get(Opt.URI_QUERY)
    if queries:
        path += "?" + "&".join(_quote(q, _QUERY_SAFE) for q in queries)
    fields: list[tuple[bytes, bytes]] = [
        (b":method", method),
        (b":scheme", scheme.encode("ascii")),
        (b":authority", _authority(options, authority).encode("ascii")),
        (b":path", path.encode("ascii")),
    ]
    cf = options.get(Opt.CONTENT_FORMAT)
    if cf is not None:
        number = int.from_bytes(cf[0], "big")
        mapped = media_type_for(number)
        if mapped is None:
            raise MappingError(
                Code.UNSUPPORTED_CONTENT_FORMAT,
                f"unknown Content-Format {number}",
                "unsupported_content_format",
            )
        fields.append((b"content-type", mapped[0]))
        if mapped[1] is not None:
            fields.append((b"content-encoding", mapped[1]))
    accept = options.get(Opt.ACCEPT)
    if accept is not None:
        number = int.from_bytes(accept[0], "big")
        mapped = media_type_for(number)
        if mapped is None:
            raise MappingError(Code.NOT_ACCEPTABLE, f"unknown Accept {number}", "not_acceptable")
        fields.append((b"accept", mapped[0]))
        if mapped[1] is not None:
            fields.append((b"accept-encoding", mapped[1]))
    if_match = options.get(Opt.IF_MATCH)
    if if_match is not None:
        # An empty If-Match means "the resource exists" (RFC 7252 §5.10.8.1): HTTP's "*".
        fields.append((b"if-match", b"*" if b"" in if_match else _etags(if_match)))
    if Opt.IF_NONE_MATCH in options:
        fields.append((b"if-none-match", b"*"))
    elif Opt.ETAG in options:
        # ETag in a request asks to validate stored representations (RFC 7252 §5.10.6.2): 304 -> 2.03.
        fields.append((b"if-none-match", _etags(options[Opt.ETAG])))
    body = msg.payload
    if body or method in (b"POST", b"PUT", b"PATCH", b"FETCH"):
        fields.append((b"content-length", str(len(body)).encode()))
    return Headers(fields), body


# --------------------------------------------------------------------------------- response mapping

_STATUS: dict[int, int] = {
    400: Code.BAD_REQUEST,
    401: Code.UNAUTHORIZED,
    402: Code.BAD_REQUEST,
    403: Code.FORBIDDEN,
    404: Code.NOT_FOUND,
    405: Code.METHOD_NOT_ALLOWED,
    406: Code.NOT_ACCEPTABLE,
    409: Code.CONFLICT,
    410: Code.NOT_FOUND,
    412: Code.PRECONDITION_FAILED,
    413: Code.REQUEST_ENTITY_TOO_LARGE,
    414: Code.BAD_OPTION,
    415: Code.UNSUPPORTED_CONTENT_FORMAT,
    422: Code.UNPROCESSABLE_ENTITY,
    429: Code.TOO_MANY_REQUESTS,
    500: Code.INTERNAL_SERVER_ERROR,
    501: Code.NOT_IMPLEMENTED,
    502: Code.BAD_GATEWAY,
    503: Code.SERVICE_UNAVAILABLE,
    504: Code.GATEWAY_TIMEOUT,
    505: Code.BAD_GATEWAY,
}
"""HTTP error statuses with a CoAP counterpart (RFC 8075 §7 Table 2 inverted, RFC 8132, RFC 8516)."""

_HEURISTICALLY_CACHEABLE = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
"""RFC 9110 §15.1: statuses a cache may store without explicit freshness; other statuses without freshness
information get Max-Age 0, since a CoAP recipient would otherwise assume 60 s (RFC 7252 §5.10.5)."""


def _success(method_code: int) -> int:
    """The 2.xx a CoAP server answers ``method`` with on success (RFC 7252 §5.8, RFC 8132)."""
    if method_code in (1, 5):  # GET, FETCH
        return Code.CONTENT
    if method_code == 4:  # DELETE
        return Code.DELETED
    return Code.CHANGED  # POST, PUT, PATCH, iPATCH


def status_to_code(method_code: int, status: int) -> int:
    """The CoAP response code for HTTP ``status`` answering request code ``method_code``."""
    if 200 <= status <= 299:
        if status == 201 and method_code in (2, 3, 6, 7):  # POST, PUT, PATCH, iPATCH may create
            return Code.CREATED
        return _success(method_code)
    if status == 304:
        return Code.VALID
    mapped = _STATUS.get(status)
    if mapped is not None:
        return mapped
    if 400 <= status <= 499:
        return Code.BAD_REQUEST
    if 500 <= status <= 599:
        return Code.INTERNAL_SERVER_ERROR
    return Code.BAD_GATEWAY  # 1xx as a final answer, 3xx redirects (CoAP has none), nonsense


def _directives(headers: Headers) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in headers.get_all(b"cache-control"):
        for item in value.decode("latin-1").split(","):
            name, _, arg = item.strip().partition("=")
            name = name.strip().lower()
            if name and name not in out:
                out[name] = arg.strip().strip('"')
    return out


def _seconds(value: str) -> int:
    """delta-seconds; a malformed value counts as 0 (stale, RFC 9111 §4.2.1)."""
    return min(int(value), MAX_AGE_MAX) if value.isdigit() else 0


_MONTHS = {m: i for i, m in enumerate(("jan feb mar apr may jun jul aug sep oct nov dec").split(), 1)}
_DATE_FORMATS = (
    re.compile(r"^[a-z]{3}, (\d{2}) ([a-z]{3}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) gmt$"),  # IMF-fixdate
    re.compile(r"^[a-z]+, (\d{2})-([a-z]{3})-(\d{2}) (\d{2}):(\d{2}):(\d{2}) gmt$"),  # RFC 850
    re.compile(r"^[a-z]{3} ([a-z]{3}) ([ \d]\d) (\d{2}):(\d{2}):(\d{2}) (\d{4})$"),  # asctime
)


def _http_date(value: bytes) -> float | None:
    """An HTTP-date (RFC 9110 §5.6.7, all three formats) as a POSIX timestamp, or None."""
    text = value.decode("latin-1").strip().lower()
    for i, pattern in enumerate(_DATE_FORMATS):
        m = pattern.match(text)
        if m is None:
            continue
        g = m.groups()
        if i == 2:
            mon, day, hh, mi, ss, year = g[0], int(g[1]), g[2], g[3], g[4], int(g[5])
        else:
            day, mon, year, hh, mi, ss = int(g[0]), g[1], int(g[2]), g[3], g[4], g[5]
            if i == 1:
                year += 2000 if year < 70 else 1900  # RFC 9110 §5.6.7 (close enough to "50 years")
        month = _MONTHS.get(mon)
        if month is None:
            return None
        try:
            return datetime(year, month, day, int(hh), int(mi), int(ss), tzinfo=UTC).timestamp()
        except ValueError:
            return None
    return None


def _clamp(seconds: float) -> int:
    return max(0, min(MAX_AGE_MAX, math.ceil(seconds)))


def _freshness(headers: Headers, now: float | None) -> int | None:
    """Explicit freshness lifetime left (RFC 9111 §4.2.1, minus Age), or None when the response has none."""
    d = _directives(headers)
    if "no-store" in d or "no-cache" in d or "private" in d:
        return 0  # CoAP has no way to say "revalidate" or "one client only": do not let anyone cache it
    if "max-age" in d or "s-maxage" in d:
        lifetime = min(_seconds(d[k]) for k in ("max-age", "s-maxage") if k in d)
    else:
        expires = headers.get(b"expires")
        if expires is None:
            return None
        end = _http_date(expires)
        date_header = headers.get(b"date")
        start = _http_date(date_header) if date_header is not None else now
        if end is None or start is None:
            return 0  # invalid Expires: already expired (RFC 9111 §5.3)
        lifetime = _clamp(end - start)
    age = headers.get(b"age")
    if age is not None:
        lifetime -= _seconds(age.decode("latin-1").strip())
    return _clamp(lifetime)


def _retry_after(headers: Headers, now: float | None) -> int | None:
    value = headers.get(b"retry-after")
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return _clamp(int(text))
    when = _http_date(value)
    if when is None or now is None:
        return None
    return _clamp(when - now)


def _coap_etag(value: bytes) -> bytes | None:
    """An HTTP entity-tag -> a CoAP ETag (1..8 bytes).

    A strong tag whose opaque part is 2..16 lower-case hex digits is decoded, which round-trips with the
    request mapping (CoAP ETag ``ab12`` is sent upstream as ``"ab12"``). Any other tag (longer, weak, not hex)
    becomes the first 8 bytes of its SHA-256: stable per representation, so Observe and caches still see
    changes, but a client revalidating with it gets a full 2.05 instead of 2.03.
    """
    v = value.strip()
    weak = v.startswith(b"W/")
    tag = v[2:] if weak else v
    if len(tag) < 2 or tag[:1] != b'"' or tag[-1:] != b'"' or b'"' in tag[1:-1]:
        return None
    opaque = tag[1:-1]
    if not weak and 2 <= len(opaque) <= 16 and len(opaque) % 2 == 0 and re.fullmatch(rb"[0-9a-f]+", opaque):
        return bytes.fromhex(opaque.decode())
    return hashlib.sha256(v).digest()[:8]


_SCHEME = re.compile(r"^[a-z][a-z0-9+.\-]*:", re.IGNORECASE)


def _location(value: bytes, path_prefix: str, request_authority: str | None) -> CoapOptions:
    """Location -> Location-Path/Location-Query (RFC 7252 §5.10.7); [] when it cannot be expressed."""
    try:
        loc = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return []
    loc = loc.split("#", 1)[0]
    if _SCHEME.match(loc) or loc.startswith("//"):
        rest = loc.split("//", 1)[1] if "//" in loc else ""
        auth, slash, tail = rest.partition("/")
        auth, q, query_tail = auth.partition("?")
        if request_authority is None or auth.lower() != request_authority.lower():
            return []  # points elsewhere: a CoAP client could not follow it through us
        loc = "/" + tail if slash else "/" + (q + query_tail if q else "")
    if not loc.startswith("/"):
        return []  # relative to the request URI, which we do not know here
    path, q, query = loc.partition("?")
    base = path_prefix.rstrip("/")
    if base and not base.startswith("/"):
        base = "/" + base
    if base:
        if path != base and not path.startswith(base + "/"):
            return []  # outside the namespace this route exposes over CoAP
        path = path[len(base) :] or "/"
    out: CoapOptions = []
    segments = path.split("/")[1:]
    if segments != [""]:
        for seg in segments:
            raw = unquote_to_bytes(seg)
            if raw in _DOT_SEGMENTS or len(raw) > 255:
                return []
            out.append((Opt.LOCATION_PATH, raw))
    if q and query:
        for part in query.split("&"):
            raw = unquote_to_bytes(part)
            if len(raw) > 255:
                return []
            out.append((Opt.LOCATION_QUERY, raw))
    return out


def _media_type(headers: Headers) -> str | None:
    ct = headers.get(b"content-type")
    if ct is None:
        return None
    parsed = _parse_media_type(ct.decode("latin-1"))
    return None if parsed is None else parsed[0]


def _upstream_diagnostic(headers: Headers, body: bytes) -> bytes:
    """The upstream body as a diagnostic payload when it is short UTF-8 ``text/plain``, else nothing."""
    if not body or _media_type(headers) != "text/plain":
        return b""
    text = body[: DIAGNOSTIC_MAX * 4].decode("utf-8", "replace")
    return _diagnostic(" ".join(text.split()))


def _uint(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""


def response_options(
    method_code: int,
    status: int,
    headers: Headers,
    body: bytes,
    *,
    now: float | None = None,
    path_prefix: str = "",
    request_authority: str | None = None,
) -> CoapResponse:
    """An HTTP response -> (CoAP code, options sorted by number, payload). Never raises.

    ``now`` (POSIX seconds) resolves date-valued Retry-After/Expires; ``path_prefix`` is stripped from a
    Location (the inverse of :func:`request_headers`); an absolute Location is kept only when its authority
    is ``request_authority``.
    """
    code = status_to_code(method_code, status)
    options: CoapOptions = []
    if code >> 5 != 2:
        if 300 <= status <= 399:
            return code, [(Opt.MAX_AGE, b"")], _diagnostic(f"upstream redirect ({status})")
        max_age = _retry_after(headers, now) if status in (429, 503) else None
        if max_age is None:
            max_age = _freshness(headers, now)
        if max_age is None and status not in _HEURISTICALLY_CACHEABLE:
            max_age = 0
        if max_age is not None:
            options.append((Opt.MAX_AGE, _uint(max_age)))
        return code, options, _upstream_diagnostic(headers, body)
    payload = b"" if code == Code.VALID else body
    ct = headers.get(b"content-type")
    encoding = headers.get(b"content-encoding")
    if ct is not None:
        cf = content_format_for(ct, encoding=encoding)
        if cf is not None:
            options.append((Opt.CONTENT_FORMAT, _uint(cf)))
        elif payload:
            shown = ct.decode("latin-1")[:64] + (f" ({encoding.decode('latin-1')[:16]})" if encoding else "")
            return Code.BAD_GATEWAY, [(Opt.MAX_AGE, b"")], _diagnostic(f"no CoAP Content-Format for {shown}")
    elif payload and encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
        return Code.BAD_GATEWAY, [(Opt.MAX_AGE, b"")], _diagnostic("content-encoding without content-type")
    etag = headers.get(b"etag")
    if etag is not None:
        coap_etag = _coap_etag(etag)
        if coap_etag is not None:
            options.append((Opt.ETAG, coap_etag))
    if code in (Code.CONTENT, Code.VALID):  # the cacheable success codes (RFC 7252 §5.9.1)
        max_age = _freshness(headers, now)
        if max_age is None and status not in _HEURISTICALLY_CACHEABLE and status != 304:
            max_age = 0
        if max_age is not None:
            options.append((Opt.MAX_AGE, _uint(max_age)))
    location = headers.get(b"location")
    if location is not None:
        options += _location(location, path_prefix, request_authority)
    return code, sorted(options, key=lambda o: o[0]), payload


# ----------------------------------------------------------------------------------- local failures

ErrorKind = Literal["unreachable", "timeout", "overflow", "no_route", "too_large", "internal"]

_LOCAL: dict[str, tuple[int, str]] = {
    "unreachable": (Code.BAD_GATEWAY, "upstream unreachable"),
    "timeout": (Code.GATEWAY_TIMEOUT, "upstream timeout"),
    "overflow": (Code.SERVICE_UNAVAILABLE, "overloaded"),
    "no_route": (Code.NOT_FOUND, "no route"),
    "too_large": (Code.REQUEST_ENTITY_TOO_LARGE, "request too large"),
    "internal": (Code.INTERNAL_SERVER_ERROR, "internal error"),
}


def error_response(
    kind: ErrorKind, *, retry_after: float | None = None, size1: int | None = None
) -> CoapResponse:
    """The response for a failure of our own: 5.02 unreachable, 5.04 timeout, 5.03 overflow, 4.04 no route,
    4.13 too large (Size1 = ``size1``, the largest body accepted, RFC 7959 §4), 5.00 internal.

    Transient failures carry Max-Age 0 so no cache keeps them for the default 60 s; ``overflow`` carries
    ``retry_after`` (seconds, rounded up) as Max-Age, the time after which to retry (RFC 7252 §5.9.3.4).
    """
    code, text = _LOCAL[kind]
    options: CoapOptions = []
    if kind == "overflow":
        if retry_after is not None:
            options.append((Opt.MAX_AGE, _uint(_clamp(retry_after))))
    elif kind in ("unreachable", "timeout", "internal"):
        options.append((Opt.MAX_AGE, b""))
    elif kind == "too_large" and size1 is not None:
        options.append((Opt.SIZE1, _uint(max(0, min(size1, MAX_AGE_MAX)))))
    return code, options, _diagnostic(text)


# ------------------------------------------------------------------------------------------- gRPC routes
_GRPC_CODES: dict[int, int] = {
    3: Code.BAD_REQUEST,  # INVALID_ARGUMENT
    5: Code.NOT_FOUND,
    6: 0x80 | 9,  # ALREADY_EXISTS -> 4.09 Conflict
    7: Code.FORBIDDEN,  # PERMISSION_DENIED
    8: 0x80 | 29,  # RESOURCE_EXHAUSTED -> 4.29 Too Many Requests
    9: 0x80 | 12,  # FAILED_PRECONDITION -> 4.12
    11: Code.BAD_REQUEST,  # OUT_OF_RANGE
    12: 0xA1,  # UNIMPLEMENTED -> 5.01
    14: 0xA3,  # UNAVAILABLE -> 5.03
    4: 0xA4,  # DEADLINE_EXCEEDED -> 5.04
    16: Code.UNAUTHORIZED,  # UNAUTHENTICATED
}


def grpc_request(headers: Headers, body: bytes, method: str) -> tuple[Headers, bytes]:
    """Turn a mapped request into a unary gRPC call of ``method`` (``/pkg.Service/Method``): the CoAP payload
    is the serialized request message, sent as one length-prefixed message."""
    keep = [
        (k, v)
        for k, v in headers.items()
        if k not in (b":method", b":path", b"content-type", b"content-length", b"accept", b"if-none-match")
    ]
    out = Headers([(b":method", b"POST"), (b":path", method.encode()), *keep])
    out.set(b"content-type", b"application/grpc")
    out.set(b"te", b"trailers")
    return out, len(body).to_bytes(5, "big") + body


def grpc_response(
    method_code: int, status: int, headers: Headers, trailers: Headers | None, body: bytes
) -> CoapResponse:
    """A unary gRPC answer -> CoAP: grpc-status 0 gives the method's 2.xx with the response message as an
    ``application/octet-stream`` payload; other statuses map to 4.xx/5.xx with grpc-message as diagnostic."""
    if status != 200:
        return response_options(method_code, status, headers, b"")
    source = trailers if trailers is not None and trailers.get(b"grpc-status") is not None else headers
    raw = source.get(b"grpc-status")
    grpc_status = int(raw) if raw is not None and raw.isdigit() else 2
    if grpc_status != 0:
        message = (source.get(b"grpc-message") or b"").decode("utf-8", "replace")
        return _GRPC_CODES.get(grpc_status, Code.INTERNAL_SERVER_ERROR), [], _diagnostic(message)
    if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
        return Code.BAD_GATEWAY, [(Opt.MAX_AGE, b"")], _diagnostic("not one uncompressed gRPC message")
    return _success(method_code), [(Opt.CONTENT_FORMAT, _uint(42))], body[5:]
