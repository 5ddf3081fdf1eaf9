"""The sans-IO health checking state machine (fake clock, seeded randomness) and the probes' wire pieces.

Thresholds, the immediate failures, the single-success startup, Envoy's interval choice (edge, unhealthy,
no-traffic intervals), jitter bounds; HTTP request building and response judging; gRPC health messages
against protobuf's own encoder; TCP payload matching split at every byte.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.config.health_check import (
    GrpcHealthCheck,
    HealthCheck,
    HttpHealthCheck,
    StatusRange,
    TcpHealthCheck,
)
from microenvoy.config.model import HeaderValueOption
from microenvoy.core.headers import Headers
from microenvoy.upstream.health import (
    NOT_SERVING,
    SERVING,
    FailureType,
    HealthCheckPolicy,
    HostHealth,
    PayloadMatcher,
    ProbeResult,
    Transition,
    classify_grpc_response,
    classify_http_response,
    grpc_health_request,
    grpc_request_headers,
    http_request_headers,
    parse_grpc_health_response,
)

OK = ProbeResult.success()
NET = ProbeResult.fail(FailureType.NETWORK, "refused")
TIMEOUT = ProbeResult.fail(FailureType.NETWORK_TIMEOUT, "slow")
BAD = ProbeResult.fail(FailureType.ACTIVE, "503")
RETRY = ProbeResult.fail(FailureType.ACTIVE, "503", retriable=True)
PASSIVE = ProbeResult.fail(FailureType.PASSIVE, "header")


def check(**kw: Any) -> HealthCheck:
    base: dict[str, Any] = {
        "timeout": 1.0,
        "interval": 10.0,
        "unhealthy_threshold": 3,
        "healthy_threshold": 2,
        "tcp_health_check": TcpHealthCheck(),
    }
    base.update(kw)
    return HealthCheck(**base)


def host(seed: int = 0, **kw: Any) -> HostHealth:
    return HostHealth(HealthCheckPolicy(check(**kw), random.Random(seed)))


def healthy_host(**kw: Any) -> HostHealth:
    h = host(**kw)
    h.record(OK, 0.0, True)
    assert h.healthy
    return h


# ============================================================================================ startup
def test_starts_unhealthy_pending_and_one_success_is_enough() -> None:
    h = host(healthy_threshold=5)
    assert (h.healthy, h.pending) == (False, True)
    v = h.record(OK, 100.0, True)
    assert v.healthy
    assert v.flipped
    assert v.first
    assert v.transition is Transition.CHANGED
    assert (h.healthy, h.pending) == (True, False)


def test_first_failure_clears_pending_but_stays_unhealthy() -> None:
    h = host(healthy_threshold=2)
    v = h.record(NET, 0.0, True)
    assert (v.healthy, v.flipped, v.first) == (False, False, True)
    assert v.transition is Transition.CHANGED  # Envoy's clearPendingFlag
    assert not h.pending
    # After the first check, healthy_threshold successes are needed.
    v = h.record(OK, 1.0, True)
    assert (v.healthy, v.transition, v.first) == (False, Transition.CHANGE_PENDING, False)
    v = h.record(OK, 2.0, True)
    assert (v.healthy, v.flipped, v.transition) == (True, True, Transition.CHANGED)


# ============================================================================================ thresholds
@pytest.mark.parametrize("failure", [NET, TIMEOUT, RETRY])
def test_counted_failures_need_the_threshold(failure: ProbeResult) -> None:
    h = healthy_host(unhealthy_threshold=3)
    for i in range(2):
        v = h.record(failure, float(i), True)
        assert v.healthy
        assert v.transition is Transition.CHANGE_PENDING
        assert not v.flipped
    v = h.record(failure, 3.0, True)
    assert (v.healthy, v.flipped, v.transition) == (False, True, Transition.CHANGED)


@pytest.mark.parametrize("failure", [BAD, PASSIVE])
def test_active_and_passive_failures_are_immediate(failure: ProbeResult) -> None:
    h = healthy_host(unhealthy_threshold=5)
    v = h.record(failure, 1.0, True)
    assert (v.healthy, v.flipped, v.transition) == (False, True, Transition.CHANGED)


def test_a_success_resets_the_failure_count() -> None:
    h = healthy_host(unhealthy_threshold=2)
    h.record(NET, 1.0, True)
    h.record(OK, 2.0, True)
    assert h.record(NET, 3.0, True).healthy
    assert not h.record(NET, 4.0, True).healthy


def test_a_failure_resets_the_success_count() -> None:
    h = healthy_host(unhealthy_threshold=1, healthy_threshold=3)
    h.record(NET, 1.0, True)
    assert not h.healthy
    h.record(OK, 2.0, True)
    h.record(OK, 3.0, True)
    h.record(RETRY, 4.0, True)  # any failure resets
    h.record(OK, 5.0, True)
    h.record(OK, 6.0, True)
    assert not h.healthy
    v = h.record(OK, 7.0, True)
    assert v.healthy
    assert v.flipped


def test_failures_while_unhealthy_change_nothing() -> None:
    h = healthy_host(unhealthy_threshold=1)
    h.record(BAD, 1.0, True)
    for result in (BAD, NET, TIMEOUT, RETRY):
        v = h.record(result, 2.0, True)
        assert (v.healthy, v.flipped, v.transition) == (False, False, Transition.UNCHANGED)


def test_timeout_flag_tracks_the_last_failure_while_unhealthy() -> None:
    h = healthy_host(unhealthy_threshold=1)
    h.record(TIMEOUT, 1.0, True)
    assert h.timed_out
    h.record(BAD, 2.0, True)
    assert not h.timed_out
    h.record(OK, 3.0, True)
    h.record(OK, 4.0, True)
    assert h.healthy
    assert not h.timed_out


# ============================================================================================ intervals
def test_intervals_with_traffic() -> None:
    h = host(
        interval=10.0,
        unhealthy_interval=20.0,
        unhealthy_edge_interval=2.0,
        healthy_edge_interval=3.0,
        unhealthy_threshold=2,
        healthy_threshold=2,
    )
    assert h.record(OK, 0.0, True).delay == 10.0  # first: CHANGED (healthy) -> interval
    assert h.record(OK, 0.0, True).delay == 10.0  # steady healthy
    assert h.record(NET, 0.0, True).delay == 2.0  # pending toward unhealthy -> unhealthy edge
    assert h.record(NET, 0.0, True).delay == 20.0  # flipped -> unhealthy interval
    assert h.record(NET, 0.0, True).delay == 20.0  # steady unhealthy
    assert h.record(OK, 0.0, True).delay == 3.0  # pending toward healthy -> healthy edge
    assert h.record(OK, 0.0, True).delay == 10.0  # flipped -> interval


def test_interval_defaults_follow_envoys_chain() -> None:
    p = HealthCheckPolicy(check(interval=7.0), random.Random(0))
    assert (p.unhealthy_interval, p.unhealthy_edge_interval, p.healthy_edge_interval) == (7.0, 7.0, 7.0)
    assert (p.no_traffic_interval, p.no_traffic_healthy_interval) == (60.0, 60.0)
    p = HealthCheckPolicy(
        check(interval=7.0, unhealthy_interval=9.0, no_traffic_interval=30.0), random.Random(0)
    )
    assert (p.unhealthy_interval, p.unhealthy_edge_interval, p.healthy_edge_interval) == (9.0, 9.0, 7.0)
    assert p.no_traffic_healthy_interval == 30.0


def test_no_traffic_intervals() -> None:
    h = host(interval=1.0, no_traffic_interval=60.0, no_traffic_healthy_interval=300.0, unhealthy_threshold=2)
    assert h.record(OK, 0.0, False).delay == 300.0  # healthy, not pending
    assert h.record(NET, 0.0, False).delay == 60.0  # failing
    assert h.record(OK, 0.0, False).delay == 300.0
    assert h.record(OK, 0.0, True).delay == 1.0  # traffic seen: the normal interval
    h2 = host(interval=1.0, no_traffic_interval=60.0, no_traffic_healthy_interval=300.0, healthy_threshold=2)
    h2.record(NET, 0.0, False)
    assert h2.record(OK, 0.0, False).delay == 60.0  # pending toward healthy: no_traffic_interval


def test_next_check_is_now_plus_delay() -> None:
    v = host(interval=4.0).record(OK, 123.5, True)
    assert v.next_check == 127.5


@given(
    seed=st.integers(0, 2**32),
    base=st.floats(0.01, 100.0),
    percent=st.integers(0, 200),
    jitter=st.floats(0.0, 10.0),
)
def test_jitter_bounds(seed: int, base: float, percent: int, jitter: float) -> None:
    p = HealthCheckPolicy(
        check(interval=base, interval_jitter_percent=percent, interval_jitter=jitter), random.Random(seed)
    )
    for _ in range(5):
        d = p.next_delay(True, Transition.UNCHANGED, True)
        assert base <= d
        assert d <= base + base * percent / 100.0 + jitter
        if percent == 0 and jitter == 0.0:
            assert d == base


def test_jitter_spreads_and_is_seeded() -> None:
    p = HealthCheckPolicy(check(interval=1.0, interval_jitter_percent=50), random.Random(7))
    delays = [p.next_delay(True, Transition.UNCHANGED, True) for _ in range(200)]
    assert min(delays) < 1.1
    assert max(delays) > 1.4
    q = HealthCheckPolicy(check(interval=1.0, interval_jitter_percent=50), random.Random(7))
    assert delays == [q.next_delay(True, Transition.UNCHANGED, True) for _ in range(200)]


@given(seed=st.integers(0, 2**32), initial=st.floats(0.0, 5.0))
def test_initial_jitter_bounds(seed: int, initial: float) -> None:
    p = HealthCheckPolicy(check(initial_jitter=initial), random.Random(seed))
    d = p.initial_delay()
    if initial == 0.0:
        assert d == 0.0
    else:
        assert 0.001 <= d <= max(0.001, initial)


def test_delay_is_never_below_one_millisecond() -> None:
    p = HealthCheckPolicy(check(interval=1e-6), random.Random(0))
    assert p.next_delay(True, Transition.UNCHANGED, True) == 0.001


# ============================================================================================ HTTP
def http(**kw: Any) -> HttpHealthCheck:
    return HttpHealthCheck(path="/healthz", **kw)


def resp(status: int | bytes, *extra: tuple[bytes, bytes]) -> Headers:
    raw = status if isinstance(status, bytes) else str(status).encode()
    return Headers([(b":status", raw), *extra])


def test_request_headers() -> None:
    h = http_request_headers(http(method="HEAD"), authority="svc", scheme=b"https")
    assert list(h) == [
        (b":method", b"HEAD"),
        (b":scheme", b"https"),
        (b":authority", b"svc"),
        (b":path", b"/healthz"),
        (b"user-agent", b"Envoy/HC"),
    ]


def test_request_header_mutations() -> None:
    cfg = http(
        request_headers_to_remove=("user-agent",),
        request_headers_to_add=(
            HeaderValueOption("x-a", "1"),
            HeaderValueOption("x-a", "2"),
            HeaderValueOption("x-b", "only-if-absent", "ADD_IF_ABSENT"),
            HeaderValueOption("user-agent", "mine", "OVERWRITE_IF_EXISTS"),  # removed first: not present
            HeaderValueOption(":authority", "other", "OVERWRITE_IF_EXISTS_OR_ADD"),
        ),
    )
    h = http_request_headers(cfg, authority="svc", scheme=b"http")
    assert h.get_all(b"x-a") == [b"1", b"2"]
    assert h.get(b"x-b") == b"only-if-absent"
    assert b"user-agent" not in h
    assert h.get(b":authority") == b"other"


def test_classify_http() -> None:
    cfg = http(
        expected_statuses=(StatusRange(200, 300),),
        retriable_statuses=(StatusRange(503, 504), StatusRange(429, 430)),
    )
    assert classify_http_response(cfg, resp(200)).passed
    assert classify_http_response(cfg, resp(299)).passed
    r = classify_http_response(cfg, resp(503))
    assert (r.passed, r.failure, r.retriable) == (False, FailureType.ACTIVE, True)
    assert classify_http_response(cfg, resp(429)).retriable
    r = classify_http_response(cfg, resp(500))
    assert (r.passed, r.failure, r.retriable) == (False, FailureType.ACTIVE, False)
    assert not classify_http_response(cfg, resp(b"abc")).passed
    assert not classify_http_response(http(), resp(204)).passed  # default: 200 only
    # The immediate-fail header fails even an expected status, and is never retriable.
    r = classify_http_response(cfg, resp(503, (b"x-envoy-immediate-health-check-fail", b"")))
    assert (r.passed, r.retriable) == (False, False)
    assert not classify_http_response(cfg, resp(200, (b"x-envoy-immediate-health-check-fail", b""))).passed


# ============================================================================================ gRPC
def _health_messages() -> tuple[Any, Any]:
    """HealthCheckRequest/Response classes built by protobuf itself (an independent encoder)."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="hc_test_health.proto", package="hctest.v1", syntax="proto3"
    )
    req = fdp.message_type.add(name="HealthCheckRequest")
    req.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    res = fdp.message_type.add(name="HealthCheckResponse")
    enum = res.enum_type.add(name="ServingStatus")
    for i, name in enumerate(["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"]):
        enum.value.add(name=name, number=i)
    res.field.add(
        name="status",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
        type_name=".hctest.v1.HealthCheckResponse.ServingStatus",
    )
    res.field.add(name="note", number=7, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    res.field.add(name="n64", number=9, type=descriptor_pb2.FieldDescriptorProto.TYPE_FIXED64)
    res.field.add(name="n32", number=10, type=descriptor_pb2.FieldDescriptorProto.TYPE_FIXED32)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("hctest.v1.HealthCheckRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("hctest.v1.HealthCheckResponse")),
    )


REQUEST, RESPONSE = _health_messages()


@given(st.text(max_size=300))
def test_grpc_request_encoding_matches_protobuf(service: str) -> None:
    assert grpc_health_request(service) == REQUEST(service=service).SerializeToString()


@given(
    status=st.integers(-(2**31), 2**31 - 1),
    note=st.text(max_size=40),
    n64=st.integers(0, 2**64 - 1),
    n32=st.integers(0, 2**32 - 1),
)
def test_grpc_response_decoding_matches_protobuf(status: int, note: str, n64: int, n32: int) -> None:
    data = RESPONSE(status=status, note=note, n64=n64, n32=n32).SerializeToString()
    assert parse_grpc_health_response(data) == status


@given(st.binary(max_size=40))
def test_grpc_response_decoding_never_crashes(data: bytes) -> None:
    try:
        parse_grpc_health_response(data)
    except ValueError:
        pass


@pytest.mark.parametrize("data", [b"\x08", b"\x0a\x05ab", b"\x0b", b"\x00\x01", b"\x08" + b"\xff" * 11])
def test_grpc_response_malformed(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  # any malformed input, one error type
        parse_grpc_health_response(data)


def test_grpc_request_headers() -> None:
    g = GrpcHealthCheck(service_name="s", initial_metadata=(HeaderValueOption("x-md", "v"),))
    h = grpc_request_headers(g, authority="grpc.svc", scheme=b"http")
    assert h.get(b":method") == b"POST"
    assert h.get(b":path") == b"/grpc.health.v1.Health/Check"
    assert h.get(b"content-type") == b"application/grpc"
    assert h.get(b"te") == b"trailers"
    assert h.get(b":authority") == b"grpc.svc"
    assert h.get(b"x-md") == b"v"


def grpc_resp(status: bytes = b"200") -> Headers:
    return Headers([(b":status", status), (b"content-type", b"application/grpc")])


def trailers(code: bytes) -> Headers:
    return Headers([(b"grpc-status", code)])


def serving(n: int) -> bytes:
    return RESPONSE(status=n).SerializeToString()  # type: ignore[no-any-return]


def test_classify_grpc() -> None:
    assert classify_grpc_response(grpc_resp(), [serving(SERVING)], trailers(b"0")).passed
    r = classify_grpc_response(grpc_resp(), [serving(NOT_SERVING)], trailers(b"0"))
    assert (r.passed, r.failure, r.retriable) == (False, FailureType.ACTIVE, False)
    assert "NOT_SERVING" in r.detail
    assert not classify_grpc_response(grpc_resp(), [serving(0)], trailers(b"0")).passed
    assert not classify_grpc_response(grpc_resp(), [serving(SERVING)], trailers(b"14")).passed
    assert not classify_grpc_response(grpc_resp(), [], trailers(b"0")).passed
    assert not classify_grpc_response(grpc_resp(), [serving(1), serving(1)], trailers(b"0")).passed
    assert not classify_grpc_response(grpc_resp(b"503"), [serving(1)], trailers(b"0")).passed
    assert not classify_grpc_response(grpc_resp(), [b"\x0b"], trailers(b"0")).passed
    assert not classify_grpc_response(grpc_resp(), [serving(1)], Headers()).passed
    # trailers-only answer: the status is in the headers
    only = grpc_resp()
    only.add(b"grpc-status", b"12")
    r = classify_grpc_response(only, [], None)
    assert not r.passed
    assert "12" in r.detail


# ============================================================================================ TCP
def test_payload_matcher_in_order_with_gaps() -> None:
    m = PayloadMatcher((b"AB", b"CD"))
    assert not m.feed(b"xxA")
    assert not m.feed(b"Byy")
    assert not m.feed(b"C")
    assert m.feed(b"Dzz")
    assert m.done
    m.reset()
    assert not m.done
    assert not m.feed(b"CDAB")  # order matters: CD came before AB
    assert m.feed(b"CD")


def test_payload_matcher_empty_is_done() -> None:
    assert PayloadMatcher(()).done
    assert PayloadMatcher((b"",)).feed(b"")


@given(
    blocks=st.lists(st.binary(min_size=1, max_size=6), min_size=1, max_size=4),
    noise=st.lists(st.binary(max_size=5), max_size=5),
    cuts=st.lists(st.integers(0, 60), max_size=8),
)
def test_payload_matcher_split_anywhere(blocks: list[bytes], noise: list[bytes], cuts: list[int]) -> None:
    stream = b""
    for i, b in enumerate(blocks):
        stream += (noise[i] if i < len(noise) else b"") + b
    m = PayloadMatcher(tuple(blocks))
    points = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    results = [m.feed(stream[a:b]) for a, b in itertools.pairwise(points)]
    assert results[-1] if results else m.done
    assert m.done
    assert len(m._buf) == 0


def test_payload_matcher_memory_is_bounded() -> None:
    m = PayloadMatcher((b"needle",))
    for _ in range(1000):
        assert not m.feed(b"x" * 1000)
    assert len(m._buf) < len(b"needle")
    assert m.feed(b"needle")


def test_reprs() -> None:
    h = host()
    assert repr(h) == "<HostHealth pending successes=0 failures=0>"
    assert "interval=10.0" in repr(h.policy)
    assert repr(PayloadMatcher((b"a",))) == "<PayloadMatcher 0/1 buffered=0>"
