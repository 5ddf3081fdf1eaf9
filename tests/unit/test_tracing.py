"""W3C trace context (the spec's traceparent/tracestate rules, fuzzed with hypothesis), span ids, sampling,
span attributes and the OTLP JSON encoding (``microenvoy.tracing``)."""

from __future__ import annotations

import random
import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.config.tracing import Tracing
from microenvoy.core.exchange import DownstreamInfo, Exchange
from microenvoy.core.headers import Headers
from microenvoy.tracing import (
    MAX_TRACESTATE_LENGTH,
    MAX_TRACESTATE_MEMBERS,
    SPAN_KIND_SERVER,
    TRACE_HEADERS,
    Span,
    otlp_request,
    otlp_span,
    parse_traceparent,
    parse_tracestate,
    start_span,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01".encode()
TRACE_ID = int(TRACE, 16)
PARENT_ID = int(PARENT, 16)
NOW = 1700000000.5
TRACEPARENT_RE = re.compile(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def headers(*fields: tuple[bytes, bytes]) -> Headers:
    return Headers([(b":method", b"GET"), (b":path", b"/"), *fields])


# ------------------------------------------------------------------------------------------ traceparent
def test_the_specs_example() -> None:
    assert parse_traceparent(VALID) == (TRACE_ID, PARENT_ID, 1)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-00".encode()) == (TRACE_ID, PARENT_ID, 0)
    assert parse_traceparent(b" " + VALID + b"\t") == (TRACE_ID, PARENT_ID, 1)  # OWS around a field value


@pytest.mark.parametrize(
    "value",
    [
        b"",
        VALID[:-1],  # too short
        VALID + b"-",  # version 00 is exactly 55 characters
        VALID + b"00",
        f"00-{'0' * 32}-{PARENT}-01".encode(),  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01".encode(),  # all-zero parent id
        f"ff-{TRACE}-{PARENT}-01".encode(),  # version ff is invalid
        f"00-{TRACE.upper()}-{PARENT}-01".encode(),  # lower-case hex only
        f"00-{TRACE}-{PARENT.upper()}-01".encode(),
        f"0A-{TRACE}-{PARENT}-01".encode(),
        f"00-{TRACE}-{PARENT}-0G".encode(),
        f"00-{TRACE}-{PARENT}-AB".encode(),
        f"00_{TRACE}-{PARENT}-01".encode(),  # wrong separators
        f"00-{TRACE}_{PARENT}-01".encode(),
        f"00-{TRACE}-{PARENT}_01".encode(),
        f"0-0{TRACE}-{PARENT}-01".encode(),
        f"00-{TRACE[:-1]}x-{PARENT}-01".encode(),
        f"00-{TRACE}-{PARENT[:-1]}+-01".encode(),
        f"00-{TRACE[:-1]}-{PARENT}0-01".encode(),  # field lengths shifted
        f"cc-{TRACE}-{PARENT}-01x".encode(),  # future version: the 56th character must be "-"
        f"cc-{TRACE}-{PARENT}-0".encode(),  # future version: still at least 55 characters
        "00-é".encode() + VALID[5:],
    ],
)
def test_invalid_traceparent(value: bytes) -> None:
    assert parse_traceparent(value) is None


@pytest.mark.parametrize(
    "value",
    [
        f"cc-{TRACE}-{PARENT}-01".encode(),
        f"cc-{TRACE}-{PARENT}-01-what-the-future-will-be-like".encode(),
        f"01-{TRACE}-{PARENT}-01-".encode(),
        f"fe-{TRACE}-{PARENT}-01-x".encode(),
    ],
)
def test_future_versions_parse_as_version_00(value: bytes) -> None:
    assert parse_traceparent(value) == (TRACE_ID, PARENT_ID, 1)


@given(st.binary(max_size=120))
def test_traceparent_parser_never_raises_on_bytes(value: bytes) -> None:
    result = parse_traceparent(value)
    if result is not None:
        trace_id, parent_id, flags = result
        assert trace_id
        assert parent_id
        assert 0 <= flags <= 0xFF


@given(
    st.text(alphabet="0123456789abcdefABCDEF-x ", min_size=50, max_size=70),
)
def test_traceparent_parser_never_raises_on_near_misses(value: str) -> None:
    parse_traceparent(value.encode())


@given(
    st.integers(1, 2**128 - 1),
    st.integers(1, 2**64 - 1),
    st.integers(0, 255),
    st.sampled_from(["00", "01", "42", "fe"]),
)
def test_traceparent_round_trip(trace_id: int, parent_id: int, flags: int, version: str) -> None:
    value = f"{version}-{trace_id:032x}-{parent_id:016x}-{flags:02x}".encode()
    assert parse_traceparent(value) == (trace_id, parent_id, flags)


# ------------------------------------------------------------------------------------------ tracestate
def test_tracestate_is_kept_as_received() -> None:
    assert parse_tracestate([b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"]) == (
        b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    )


def test_tracestate_fields_are_combined_and_empty_members_ignored() -> None:
    assert parse_tracestate([b"rojo=1 , ,", b"\tcongo=2", b""]) == b"rojo=1,congo=2"


def test_multi_tenant_keys_and_value_characters() -> None:
    value = b"fw529a3039@dt=abc,tenant-1@sys_2=a b!c~,k*/_-0=x"
    assert parse_tracestate([value]) == value


@pytest.mark.parametrize(
    "value",
    [
        b"Rojo=1",  # keys are lower case
        b"1abc=1",  # a simple key starts with a letter
        b"rojo",  # no "="
        b"rojo=",  # empty value
        b"rojo=a=b",  # "=" is not a value character
        b"rojo=a ",  # a value does not end in a space (after trimming: "a")
        b"rojo=1,rojo=2",  # duplicate keys
        b"t@Sys=1",
        b"t@systemid-longer-than-14=1",
        b"rojo=\x7f",
        b"k=" + b"v" * 257,  # value longer than 256
        b"k" * 257 + b"=v",  # key longer than 256
    ],
)
def test_invalid_tracestate_is_dropped(value: bytes) -> None:
    # "rojo=a " is valid after trimming OWS; everything else in the list is invalid.
    if value == b"rojo=a ":
        assert parse_tracestate([value]) == b"rojo=a"
    else:
        assert parse_tracestate([value]) is None


def test_at_most_32_members() -> None:
    members = [f"k{i}=v".encode() for i in range(MAX_TRACESTATE_MEMBERS)]
    assert parse_tracestate([b",".join(members)]) == b",".join(members)
    assert parse_tracestate([b",".join([*members, b"k99=v"])]) is None


def test_long_tracestate_is_cut_whole_members_large_ones_first() -> None:
    big = b"big=" + b"x" * 200  # > 128 characters: removed first
    small = [f"k{i:02d}=".encode() + b"y" * 40 for i in range(10)]  # 10 x 44 + commas: 449
    value = b",".join([small[0], big, *small[1:]])
    out = parse_tracestate([value])
    assert out == b",".join(small)
    many = [f"k{i:02d}=".encode() + b"y" * 60 for i in range(10)]  # 10 x 64 + 9 = 649: cut from the end
    out = parse_tracestate([b",".join(many)])
    assert out == b",".join(many[:7])  # 7 x 64 + 6 = 454 <= 512 < 8 x 64 + 7
    assert len(out) <= MAX_TRACESTATE_LENGTH


@given(st.lists(st.binary(max_size=80), max_size=5))
def test_tracestate_parser_never_raises_and_respects_the_bounds(values: list[bytes]) -> None:
    out = parse_tracestate(values)
    if out is not None:
        assert len(out) <= MAX_TRACESTATE_LENGTH
        assert len(out.split(b",")) <= MAX_TRACESTATE_MEMBERS


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z][a-z0-9_*/-]{0,20}", fullmatch=True),
            st.from_regex(r"[!-+\--<>-~]{1,30}", fullmatch=True),
        ),
        min_size=1,
        max_size=40,
        unique_by=lambda kv: kv[0],
    )
)
def test_valid_tracestate_round_trips(pairs: list[tuple[str, str]]) -> None:
    value = ",".join(f"{k}={v}" for k, v in pairs).encode()
    out = parse_tracestate([value])
    if len(pairs) > MAX_TRACESTATE_MEMBERS:
        assert out is None
    elif len(value) <= MAX_TRACESTATE_LENGTH:
        assert out == value
    else:
        assert out is not None
        assert value.startswith(out)
        assert len(out) <= MAX_TRACESTATE_LENGTH


# ------------------------------------------------------------------------------------------ start_span
def test_a_valid_context_is_continued_with_a_new_span_id() -> None:
    rng = random.Random(1)
    span = start_span(headers((b"traceparent", VALID), (b"tracestate", b"rojo=1")), rng, NOW)
    assert span is not None
    assert span.trace_id == TRACE_ID
    assert span.parent_id == PARENT_ID
    assert span.span_id not in (0, PARENT_ID)
    assert span.sampled
    assert span.start_ns == 1700000000_500000000
    assert span.traceparent == f"00-{TRACE}-{span.span_id:016x}-01".encode()
    assert span.outgoing_headers() == [(b"traceparent", span.traceparent), (b"tracestate", b"rojo=1")]
    assert {k for k, _ in span.outgoing_headers()} == TRACE_HEADERS


def test_every_hop_gets_a_new_span_id() -> None:
    rng = random.Random(2)
    value = VALID
    seen = {PARENT_ID}
    for _ in range(5):  # the outgoing header of one hop is the incoming header of the next
        span = start_span(headers((b"traceparent", value)), rng, NOW)
        assert span is not None
        assert span.trace_id == TRACE_ID
        assert span.parent_id in seen
        assert span.span_id not in seen
        seen.add(span.span_id)
        value = span.traceparent


def test_unknown_flags_are_cleared_and_the_decision_kept() -> None:
    rng = random.Random(3)
    span = start_span(headers((b"traceparent", f"00-{TRACE}-{PARENT}-ff".encode())), rng, NOW)
    assert span is not None
    assert span.traceparent.endswith(b"-03")
    span = start_span(headers((b"traceparent", f"00-{TRACE}-{PARENT}-00".encode())), rng, NOW, Tracing())
    assert span is not None
    assert not span.sampled
    span = start_span(
        headers((b"traceparent", VALID)), rng, NOW, Tracing(random_sampling=0.0, overall_sampling=0.0)
    )
    assert span is not None
    assert span.sampled


def test_a_future_version_is_answered_in_version_00() -> None:
    span = start_span(
        headers((b"traceparent", f"cc-{TRACE}-{PARENT}-01-later".encode())), random.Random(), NOW
    )
    assert span is not None
    assert span.traceparent.startswith(f"00-{TRACE}-".encode())


@pytest.mark.parametrize(
    "fields",
    [
        (),
        ((b"traceparent", b"garbage"),),
        ((b"traceparent", b"garbage"), (b"tracestate", b"rojo=1")),
        ((b"traceparent", VALID), (b"traceparent", VALID)),  # sent twice: invalid
        ((b"tracestate", b"rojo=1"),),
    ],
)
def test_without_a_valid_context_a_new_trace_starts(fields: tuple[tuple[bytes, bytes], ...]) -> None:
    span = start_span(headers(*fields), random.Random(4), NOW, Tracing())
    assert span is not None
    assert span.trace_id not in (0, TRACE_ID)
    assert span.parent_id == 0
    assert span.tracestate is None  # never parsed without a valid traceparent
    assert span.sampled  # random_sampling defaults to 100 %
    assert TRACEPARENT_RE.fullmatch(span.traceparent)
    assert span.outgoing_headers() == [(b"traceparent", span.traceparent)]


@pytest.mark.parametrize(
    "fields", [(), ((b"traceparent", b"garbage"),), ((b"traceparent", VALID), (b"traceparent", VALID))]
)
def test_without_tracing_config_nothing_is_started(fields: tuple[tuple[bytes, bytes], ...]) -> None:
    assert start_span(headers(*fields), random.Random(), NOW) is None


def test_span_and_trace_ids_are_unique_and_never_zero() -> None:
    rng = random.Random(5)
    spans = [start_span(headers(), rng, NOW, Tracing()) for _ in range(10_000)]
    assert len({s.span_id for s in spans if s is not None}) == 10_000
    assert len({s.trace_id for s in spans if s is not None}) == 10_000


class ZeroFirst(random.Random):
    """Returns 0 for the first draws of every width: ids must still be non-zero."""

    def __init__(self) -> None:
        super().__init__(6)
        self.zeros = 2

    def getrandbits(self, k: int) -> int:
        if self.zeros:
            self.zeros -= 1
            return 0
        return super().getrandbits(k)


def test_an_all_zero_draw_is_redrawn() -> None:
    span = start_span(headers(), ZeroFirst(), NOW, Tracing())
    assert span is not None
    assert span.trace_id
    assert span.span_id


def _sampled_share(config: Tracing, *fields: tuple[bytes, bytes], n: int = 20_000) -> float:
    rng = random.Random(7)
    h = headers(*fields)
    return sum(1 for _ in range(n) if (s := start_span(h, rng, NOW, config)) is not None and s.sampled) / n


def test_random_sampling() -> None:
    assert _sampled_share(Tracing(random_sampling=0.0), n=2000) == 0.0
    assert _sampled_share(Tracing(random_sampling=100.0), n=2000) == 1.0
    assert _sampled_share(Tracing(random_sampling=25.0)) == pytest.approx(0.25, abs=0.02)
    assert _sampled_share(Tracing(random_sampling=0.5)) == pytest.approx(0.005, abs=0.003)


def test_client_sampling_applies_to_requests_with_x_client_trace_id() -> None:
    config = Tracing(random_sampling=0.0, client_sampling=50.0)
    assert _sampled_share(config, (b"x-client-trace-id", b"abc")) == pytest.approx(0.5, abs=0.02)
    assert _sampled_share(config, n=2000) == 0.0


def test_overall_sampling_is_an_upper_limit() -> None:
    assert _sampled_share(Tracing(random_sampling=50.0, overall_sampling=50.0)) == pytest.approx(
        0.25, abs=0.02
    )
    assert _sampled_share(Tracing(overall_sampling=0.0), n=2000) == 0.0


def test_unsampled_new_traces_still_propagate() -> None:
    span = start_span(headers(), random.Random(8), NOW, Tracing(random_sampling=0.0))
    assert span is not None
    assert span.traceparent.endswith(b"-00")


# ------------------------------------------------------------------------------------------ finish, OTLP
def exchange(**kw: object) -> Exchange:
    ex = Exchange(
        request_headers=Headers(
            [
                (b":method", b"POST"),
                (b":path", b"/v1/items/42?token=secret"),
                (b":authority", b"api"),
                (b"x-request-id", b"rid-1"),
            ]
        ),
        downstream=DownstreamInfo("HTTP/2", ("192.0.2.1", 5000), ("10.0.0.1", 443), "ingress"),
        start_time=time.monotonic(),
        wall_start=NOW,
        response_code=201,
        response_flags={"URX", "UT"},
        upstream_host="10.0.0.5:8080",
        upstream_cluster="items",
    )
    for k, v in kw.items():
        setattr(ex, k, v)
    return ex


def test_finish_records_the_attributes() -> None:
    span = Span(TRACE_ID, 7, PARENT_ID, 1, b"rojo=1", int(NOW * 1e9))
    span.finish(exchange(), NOW + 0.25, name="items-route", max_path=8)
    assert span.end_ns - span.start_ns == 250_000_000
    assert (span.name, span.method, span.path, span.status_code) == ("items-route", "POST", "/v1/item", 201)
    assert (span.protocol, span.request_id, span.response_flags) == ("HTTP/2", "rid-1", "UT,URX")
    assert (span.upstream_cluster, span.upstream_host) == ("items", "10.0.0.5:8080")
    assert not span.error
    assert "items-route" in repr(span)
    assert TRACE in repr(span)


def test_a_generated_request_id_wins_and_the_end_never_precedes_the_start() -> None:
    span = Span(1, 2, 0, 1, None, int(NOW * 1e9))
    span.request_id = "generated"
    span.finish(exchange(), NOW - 5)
    assert span.request_id == "generated"
    assert span.end_ns == span.start_ns
    assert span.name == "ingress"


@pytest.mark.parametrize(
    ("code", "error"), [(200, False), (404, False), (499, False), (500, True), (503, True), (0, True)]
)
def test_error_status(code: int, error: bool) -> None:
    span = Span(1, 2, 0, 1, None, 0)
    span.finish(exchange(response_code=code), NOW)
    assert span.error is error
    assert otlp_span(span)["status"] == ({"code": 2} if error else {})


def test_otlp_span_encoding() -> None:
    span = Span(TRACE_ID, 0xABC, PARENT_ID, 1, b"rojo=1", int(NOW * 1e9))
    span.finish(exchange(), NOW + 1)
    doc = otlp_span(span)
    assert doc["traceId"] == TRACE
    assert doc["spanId"] == "0000000000000abc"
    assert doc["parentSpanId"] == PARENT
    assert doc["traceState"] == "rojo=1"
    assert doc["flags"] == 0x301  # sampled, parent is known to be remote
    assert doc["kind"] == SPAN_KIND_SERVER
    assert doc["startTimeUnixNano"] == "1700000000500000000"
    assert doc["endTimeUnixNano"] == "1700000001500000000"
    attrs = {a["key"]: a["value"] for a in doc["attributes"]}
    assert attrs == {
        "http.request.method": {"stringValue": "POST"},
        "url.path": {"stringValue": "/v1/items/42"},  # never the query (it may carry secrets)
        "http.response.status_code": {"intValue": "201"},
        "network.protocol.name": {"stringValue": "http"},
        "network.protocol.version": {"stringValue": "2"},
        "guid:x-request-id": {"stringValue": "rid-1"},
        "upstream_cluster": {"stringValue": "items"},
        "upstream_address": {"stringValue": "10.0.0.5:8080"},
        "response_flags": {"stringValue": "UT,URX"},
    }


def test_a_root_span_has_no_parent_field() -> None:
    span = Span(TRACE_ID, 5, 0, 0, None, 1)
    span.finish(exchange(upstream_host=None, upstream_cluster=None, response_flags=set()), 0.0)
    doc = otlp_span(span)
    assert "parentSpanId" not in doc
    assert "traceState" not in doc
    assert doc["flags"] == 0x100
    keys = {a["key"] for a in doc["attributes"]}
    assert "upstream_cluster" not in keys
    assert "upstream_address" not in keys


def test_otlp_request_envelope() -> None:
    spans = [Span(TRACE_ID, i, 0, 1, None, 1) for i in (1, 2)]
    doc = otlp_request(spans, "edge")
    (rs,) = doc["resourceSpans"]
    assert rs["resource"] == {"attributes": [{"key": "service.name", "value": {"stringValue": "edge"}}]}
    (ss,) = rs["scopeSpans"]
    assert ss["scope"]["name"] == "microenvoy"
    assert [s["spanId"] for s in ss["spans"]] == ["0000000000000001", "0000000000000002"]
