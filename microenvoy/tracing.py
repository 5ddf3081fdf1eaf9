"""W3C Trace Context (``traceparent`` / ``tracestate``) and the agent's own span per exchange, sans-IO.

Theory of operation (W3C Trace Context Level 1, https://www.w3.org/TR/trace-context/):

* ``traceparent`` is ``version-traceid-parentid-flags`` in lower-case hex. Version ``00`` is exactly 55
  characters; a trace id of all zeros or a parent id of all zeros is invalid; version ``ff`` is invalid.
  A higher version is parsed as version 00 provided the header is at least 55 characters long and, when
  longer, the 56th character is ``-`` (section 3.2.4, "versioning of traceparent"). Upper-case hex, a
  header sent more than once and anything else malformed make the header invalid.
* An invalid or missing ``traceparent`` restarts the trace (a new 128-bit trace id, no parent) and
  ``tracestate`` is then not parsed at all (section 3.3.1: "if the vendor failed to parse traceparent, it
  MUST NOT attempt to parse tracestate").
* ``tracestate`` is a comma-separated list of ``key=value`` members (all ``tracestate`` fields are joined);
  empty members are allowed and dropped. A malformed member, a duplicate key or more than 32 members make
  the whole header invalid: it is dropped. Longer than 512 characters, it is cut whole members at a time:
  first members longer than 128 characters, then from the end (section 3.3.1.5). Otherwise it is
  propagated as received (we add no member of our own).
* Every hop gets a new 64-bit span id: the outgoing ``traceparent`` is
  ``00-<trace id>-<our span id>-<flags>``. Flags keep the sampled bit (``01``) and Level 2's
  random-trace-id bit (``02``, a property of the trace id we keep); unknown bits are cleared as Level 1
  requires.

Sampling (Envoy's HCM ``tracing`` block, ``microenvoy.config.tracing.Tracing``): a valid incoming context
keeps its sampled flag (as Envoy's OpenTelemetry tracer does); a new trace is sampled with
``client_sampling`` percent when the request carries ``x-client-trace-id``, else ``random_sampling``
percent, and then with ``overall_sampling`` percent (a second, independent draw). Randomness comes from an
injected ``random.Random`` and time is an input.

Without a ``tracing`` block (``config=None``) the agent still takes part in a trace it is handed: a valid
incoming ``traceparent`` gets a new span id for the next hop, but no trace is started for requests without
one (they pass unchanged).

A ``Span`` is the only per-request object: ids are ints, hex is formatted only when a header or an export
document is written. ``otlp_span`` / ``otlp_request`` build the OTLP JSON encoding of
``ExportTraceServiceRequest`` (hex ids, 64-bit integers as strings, enums as integers).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from microenvoy import __version__
from microenvoy.core.exchange import Exchange, response_flags_text
from microenvoy.core.headers import Headers

if TYPE_CHECKING:  # the config module loads only when a config has a tracing block
    from microenvoy.config.tracing import Tracing

__all__ = [
    "MAX_TRACESTATE_LENGTH",
    "MAX_TRACESTATE_MEMBERS",
    "RANDOM_TRACE_ID",
    "SAMPLED",
    "SPAN_KIND_SERVER",
    "TRACEPARENT",
    "TRACESTATE",
    "TRACE_HEADERS",
    "Span",
    "otlp_request",
    "otlp_span",
    "parse_traceparent",
    "parse_tracestate",
    "start_span",
]

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
TRACE_HEADERS = frozenset({TRACEPARENT, TRACESTATE})
"""The fields the agent rewrites: drop them while copying a request, then add ``Span.outgoing_headers()``."""
SAMPLED = 0x01
RANDOM_TRACE_ID = 0x02
_KNOWN_FLAGS = SAMPLED | RANDOM_TRACE_ID
MAX_TRACESTATE_MEMBERS = 32
MAX_TRACESTATE_LENGTH = 512
_LARGE_MEMBER = 128
SPAN_KIND_SERVER = 2
"""OTLP ``Span.SpanKind.SPAN_KIND_SERVER``: the agent's span covers the request it received."""
_STATUS_ERROR = 2
_CLIENT_TRACE_ID = b"x-client-trace-id"
_REQUEST_ID = b"x-request-id"
_HEX = b"0123456789abcdef"
_KEY = re.compile(
    rb"[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}"
)  # simple-key | tenant-id "@" system-id
_VALUE = re.compile(rb"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


def _hex(b: bytes) -> bool:
    return bool(b) and not b.translate(None, _HEX)


def parse_traceparent(value: bytes) -> tuple[int, int, int] | None:
    """``(trace_id, parent_id, flags)`` from one ``traceparent`` value, or None if it is invalid."""
    v = value.strip(b" \t")
    n = len(v)
    if n < 55 or v[2] != 0x2D or v[35] != 0x2D or v[52] != 0x2D:  # "-"
        return None
    version = v[:2]
    if not _hex(version) or version == b"ff":
        return None
    if version == b"00":
        if n != 55:
            return None
    elif n > 55 and v[55] != 0x2D:
        return None
    trace, parent, flags = v[3:35], v[36:52], v[53:55]
    if not (_hex(trace) and _hex(parent) and _hex(flags)):
        return None
    trace_id = int(trace, 16)
    parent_id = int(parent, 16)
    if not trace_id or not parent_id:
        return None
    return trace_id, parent_id, int(flags, 16)


def parse_tracestate(values: Sequence[bytes]) -> bytes | None:
    """All ``tracestate`` field values -> one value to propagate (bounded to 512 characters), or None when
    invalid or empty."""
    members: list[bytes] = []
    keys: set[bytes] = set()
    for value in values:
        for raw in value.split(b","):
            member = raw.strip(b" \t")
            if not member:
                continue
            key, eq, val = member.partition(b"=")
            if not eq or _KEY.fullmatch(key) is None or _VALUE.fullmatch(val) is None or key in keys:
                return None
            keys.add(key)
            members.append(member)
            if len(members) > MAX_TRACESTATE_MEMBERS:
                return None
    if not members:
        return None
    size = sum(len(m) for m in members) + len(members) - 1
    if size > MAX_TRACESTATE_LENGTH:
        for i in range(len(members) - 1, -1, -1):  # large members first, from the end
            if size <= MAX_TRACESTATE_LENGTH:
                break
            if len(members[i]) > _LARGE_MEMBER:
                size -= len(members[i]) + 1
                del members[i]
        while members and size > MAX_TRACESTATE_LENGTH:
            size -= len(members.pop()) + 1
        if not members:
            return None
    return b",".join(members)


def _nonzero_bits(rng: random.Random, bits: int) -> int:
    while True:
        v = rng.getrandbits(bits)
        if v:
            return v


def _ns(wall: float) -> int:
    """Wall clock seconds -> integer nanoseconds without the float error of ``wall * 1e9`` at 1.7e18."""
    whole = int(wall)
    return whole * 1_000_000_000 + round((wall - whole) * 1e9)


def _draw(rng: random.Random, percent: float) -> bool:
    if percent >= 100.0:
        return True
    if percent <= 0.0:
        return False
    return rng.random() * 100.0 < percent


class Span:
    """The agent's span for one exchange: W3C ids, timing (wall clock, ns) and the attributes it exports.

    Created by ``start_span`` at request headers, completed by ``finish`` when the exchange ends.
    """

    __slots__ = (
        "end_ns",
        "flags",
        "method",
        "name",
        "parent_id",
        "path",
        "protocol",
        "request_id",
        "response_flags",
        "span_id",
        "start_ns",
        "status_code",
        "trace_id",
        "tracestate",
        "upstream_cluster",
        "upstream_host",
    )

    def __init__(
        self,
        trace_id: int,
        span_id: int,
        parent_id: int,
        flags: int,
        tracestate: bytes | None,
        start_ns: int,
        name: str = "ingress",
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        """The caller's span id (0: this span starts the trace)."""
        self.flags = flags
        self.tracestate = tracestate
        self.start_ns = start_ns
        self.end_ns = 0
        """0 until ``finish``."""
        self.name = name
        self.method = ""
        self.path = ""
        self.status_code = 0
        self.protocol = ""
        self.request_id: str | None = None
        """``x-request-id``; set it when the agent generates one (else ``finish`` reads the request's)."""
        self.response_flags = "-"
        self.upstream_cluster: str | None = None
        self.upstream_host: str | None = None

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    @property
    def span_id_hex(self) -> str:
        return f"{self.span_id:016x}"

    @property
    def traceparent(self) -> bytes:
        """The ``traceparent`` for the next hop: our span id is its parent."""
        return b"00-%032x-%016x-%02x" % (self.trace_id, self.span_id, self.flags)

    def outgoing_headers(self) -> list[tuple[bytes, bytes]]:
        """``traceparent`` (and ``tracestate`` when there is one) for the upstream request."""
        if self.tracestate is None:
            return [(TRACEPARENT, self.traceparent)]
        return [(TRACEPARENT, self.traceparent), (TRACESTATE, self.tracestate)]

    def finish(self, ex: Exchange, end_wall: float, *, name: str | None = None, max_path: int = 256) -> None:
        """Record the end (``end_wall``: wall clock seconds) and the exchange's attributes."""
        self.end_ns = max(self.start_ns, _ns(end_wall))
        if name:
            self.name = name
        self.method = ex.method.decode("latin-1")
        path = ex.path
        q = path.find(b"?")
        if q >= 0:
            path = path[:q]
        self.path = path[:max_path].decode("latin-1")
        self.status_code = ex.response_code
        self.protocol = ex.downstream.protocol
        if self.request_id is None:
            rid = ex.request_headers.get(_REQUEST_ID)
            self.request_id = rid.decode("latin-1") if rid is not None else None
        self.response_flags = response_flags_text(ex.response_flags)
        self.upstream_cluster = ex.upstream_cluster
        self.upstream_host = ex.upstream_host

    @property
    def error(self) -> bool:
        """An error span: a 5xx answer, or no answer at all (reset, downstream gone)."""
        return self.status_code >= 500 or self.status_code == 0

    def __repr__(self) -> str:
        return (
            f"<Span {self.name} {self.trace_id_hex}/{self.span_id_hex}"
            f" sampled={self.sampled} code={self.status_code}>"
        )


def start_span(
    headers: Headers, rng: random.Random, now_wall: float, config: Tracing | None = None
) -> Span | None:
    """The agent's span for a request with ``headers`` received at ``now_wall`` (wall clock seconds).

    A valid incoming ``traceparent`` is continued (same trace id and flags, its parent id as our parent);
    otherwise a new trace is started and sampled per ``config``. Returns None only when ``config`` is None
    and there is no valid context to continue (nothing to propagate).
    """
    tracestate: bytes | None = None
    ctx: tuple[int, int, int] | None = None
    first = headers.get(TRACEPARENT)
    if first is not None:
        tps = headers.get_all(TRACEPARENT)
        if len(tps) == 1:
            ctx = parse_traceparent(first)
    if ctx is not None:
        trace_id, parent_id, flags = ctx
        flags &= _KNOWN_FLAGS
        if TRACESTATE in headers:
            tracestate = parse_tracestate(headers.get_all(TRACESTATE))
    elif config is None:
        return None
    else:
        trace_id, parent_id = _nonzero_bits(rng, 128), 0
        percent = config.client_sampling if _CLIENT_TRACE_ID in headers else config.random_sampling
        flags = SAMPLED if _draw(rng, percent) and _draw(rng, config.overall_sampling) else 0
    return Span(trace_id, _nonzero_bits(rng, 64), parent_id, flags, tracestate, _ns(now_wall))


# ------------------------------------------------------------------------------------------- OTLP JSON
def _str_attr(key: str, value: str) -> dict[str, Any]:
    return {"key": key, "value": {"stringValue": value}}


def _int_attr(key: str, value: int) -> dict[str, Any]:
    return {"key": key, "value": {"intValue": str(value)}}


def otlp_span(span: Span) -> dict[str, Any]:
    """One finished span in the OTLP JSON encoding (``opentelemetry.proto.trace.v1.Span``)."""
    attrs = [
        _str_attr("http.request.method", span.method),
        _str_attr("url.path", span.path),
        _int_attr("http.response.status_code", span.status_code),
    ]
    proto, _, version = span.protocol.partition("/")
    if proto:
        attrs.append(_str_attr("network.protocol.name", proto.lower()))
        if version:
            attrs.append(_str_attr("network.protocol.version", version))
    if span.request_id is not None:
        attrs.append(_str_attr("guid:x-request-id", span.request_id))
    if span.upstream_cluster is not None:
        attrs.append(_str_attr("upstream_cluster", span.upstream_cluster))
    if span.upstream_host is not None:
        attrs.append(_str_attr("upstream_address", span.upstream_host))
    attrs.append(_str_attr("response_flags", span.response_flags))
    out: dict[str, Any] = {
        "traceId": f"{span.trace_id:032x}",
        "spanId": f"{span.span_id:016x}",
    }
    if span.tracestate is not None:
        out["traceState"] = span.tracestate.decode("ascii")
    if span.parent_id:
        out["parentSpanId"] = f"{span.parent_id:016x}"
    # Bits 0-7: W3C trace flags; bit 8: "is the parent remote" is known; bit 9: it is (it came in a header).
    out["flags"] = (span.flags & 0xFF) | 0x100 | (0x200 if span.parent_id else 0)
    out["name"] = span.name
    out["kind"] = SPAN_KIND_SERVER
    out["startTimeUnixNano"] = str(span.start_ns)
    out["endTimeUnixNano"] = str(span.end_ns or span.start_ns)
    out["attributes"] = attrs
    out["status"] = {"code": _STATUS_ERROR} if span.error else {}
    return out


def otlp_request(spans: Sequence[Span], service_name: str) -> dict[str, Any]:
    """An ``ExportTraceServiceRequest`` (OTLP JSON) carrying ``spans`` of one resource and scope."""
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [_str_attr("service.name", service_name)]},
                "scopeSpans": [
                    {
                        "scope": {"name": "microenvoy", "version": __version__},
                        "spans": [otlp_span(s) for s in spans],
                    }
                ],
            }
        ]
    }
