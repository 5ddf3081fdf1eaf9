"""Active health checking, sans-IO: per-host verdicts, check intervals and the probes' wire pieces.

Theory of operation (Envoy's ``HealthCheckerImplBase``; ``microenvoy.io.health_check`` does the I/O):

* A host under health checking starts **unhealthy and pending** (Envoy's ``FAILED_ACTIVE_HC`` plus
  ``PENDING_ACTIVE_HC``). Its first check decides at once: one success marks it healthy ("this makes startup
  faster"), a failure leaves it unhealthy. Either way the first verdict clears *pending*; a cluster whose
  hosts have all left pending has finished its first round (the agent uses that to warm the cluster).
* A healthy host turns unhealthy after ``unhealthy_threshold`` consecutive failures. Network failures
  (connect errors, resets, timeouts) and *retriable* HTTP statuses count toward the threshold; any other
  failure (an HTTP status outside ``expected_statuses`` and ``retriable_statuses``, the
  ``x-envoy-immediate-health-check-fail`` header, a gRPC answer other than SERVING, a gRPC error status)
  marks it unhealthy *immediately*, as Envoy does for ``ACTIVE`` failures that are not retriable.
* An unhealthy host turns healthy after ``healthy_threshold`` consecutive successes.
* A failure resets the success count and a success the failure count.

Each result is a *transition*: ``CHANGED`` (the verdict flipped, or the first verdict cleared *pending*),
``CHANGE_PENDING`` (counting toward a flip) or ``UNCHANGED``. The delay until the next check follows
Envoy's ``interval()``: while the cluster has never carried traffic, ``no_traffic_interval`` (or
``no_traffic_healthy_interval`` after a success that is not pending); otherwise after a success
``healthy_edge_interval`` when pending, else ``interval``; after a failure ``unhealthy_edge_interval`` when
pending, else ``unhealthy_interval``. Jitter is added from the injected ``random.Random``: up to
``interval_jitter_percent`` percent of the base, plus up to ``interval_jitter``; never less than 1 ms. The
first check of a host is delayed by up to ``initial_jitter`` (immediately without it).

Time is an input: ``HostHealth.record(result, now, had_traffic)`` returns a ``Verdict`` with the delay and
the absolute time of the next check.

Probe pieces (no I/O): ``http_request_headers`` and ``classify_http_response`` for HTTP checks;
``grpc_health_request``/``parse_grpc_health_response`` encode/decode the two tiny protobuf messages of
``grpc.health.v1`` by hand, ``classify_grpc_response`` judges a finished call; ``PayloadMatcher`` finds a TCP
check's ``receive`` blocks in order in a byte stream with bounded memory.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from microenvoy.config.health_check import GrpcHealthCheck, HealthCheck, HttpHealthCheck, StatusRange
from microenvoy.config.model import HeaderValueOption
from microenvoy.core.headers import Headers

__all__ = [
    "GRPC_HEALTH_PATH",
    "IMMEDIATE_FAIL_HEADER",
    "NOT_SERVING",
    "SERVICE_UNKNOWN",
    "SERVING",
    "UNKNOWN",
    "USER_AGENT",
    "FailureType",
    "HealthCheckPolicy",
    "HostHealth",
    "PayloadMatcher",
    "ProbeResult",
    "Transition",
    "Verdict",
    "classify_grpc_response",
    "classify_http_response",
    "grpc_health_request",
    "grpc_request_headers",
    "http_request_headers",
    "parse_grpc_health_response",
]

USER_AGENT = b"Envoy/HC"
"""``user-agent`` of HTTP checks (Envoy's value, so upstreams can tell checks from traffic)."""
IMMEDIATE_FAIL_HEADER = b"x-envoy-immediate-health-check-fail"
"""A response carrying this header fails the host at once (an Envoy upstream in health-check fail mode)."""
GRPC_HEALTH_PATH = b"/grpc.health.v1.Health/Check"

# grpc.health.v1.HealthCheckResponse.ServingStatus
UNKNOWN = 0
SERVING = 1
NOT_SERVING = 2
SERVICE_UNKNOWN = 3
_SERVING_NAMES = {UNKNOWN: "UNKNOWN", SERVING: "SERVING", NOT_SERVING: "NOT_SERVING",
                  SERVICE_UNKNOWN: "SERVICE_UNKNOWN"}  # fmt: skip
_MIN_DELAY = 0.001
"""Envoy never schedules a check sooner than 1 ms (no live lock)."""


class FailureType(enum.Enum):
    """Envoy's ``HealthCheckFailureType``."""

    ACTIVE = "active"
    """The upstream answered, and the answer says it is not healthy."""
    NETWORK = "network"
    """Connect failure, reset, connection closed, protocol error."""
    NETWORK_TIMEOUT = "network_timeout"
    """No complete answer within ``timeout``."""
    PASSIVE = "passive"
    """Reported from outside the checker (an ``x-envoy-immediate-health-check-fail`` seen on traffic)."""


class Transition(enum.Enum):
    """Envoy's ``HealthTransition`` for one check result."""

    UNCHANGED = "unchanged"
    CHANGED = "changed"
    CHANGE_PENDING = "change_pending"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one probe, before the state machine weighs it."""

    passed: bool
    """The check succeeded."""
    failure: FailureType | None = None
    """Why it failed (None when it passed)."""
    retriable: bool = False
    """An ``ACTIVE`` failure that counts toward ``unhealthy_threshold`` (a retriable HTTP status)."""
    detail: str = ""
    """Human-readable reason, for logs."""

    @classmethod
    def success(cls, detail: str = "") -> ProbeResult:
        return cls(True, None, False, detail)

    @classmethod
    def fail(cls, failure: FailureType, detail: str = "", *, retriable: bool = False) -> ProbeResult:
        return cls(False, failure, retriable, detail)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one recorded result did to a host, and when to check it next."""

    healthy: bool
    """The host's verdict after this result."""
    transition: Transition
    """Envoy's transition for this result."""
    flipped: bool
    """``healthy`` changed with this result."""
    first: bool
    """This was the host's first result (it cleared *pending*)."""
    delay: float
    """Seconds until the next check (jitter included)."""
    next_check: float
    """``now + delay``."""


# ============================================================================================ intervals
class HealthCheckPolicy:
    """A ``HealthCheck``'s timing with Envoy's defaults resolved, and its jitter source."""

    __slots__ = (
        "healthy_edge_interval",
        "healthy_threshold",
        "initial_jitter",
        "interval",
        "interval_jitter",
        "interval_jitter_percent",
        "no_traffic_healthy_interval",
        "no_traffic_interval",
        "random",
        "timeout",
        "unhealthy_edge_interval",
        "unhealthy_interval",
        "unhealthy_threshold",
    )

    def __init__(self, check: HealthCheck, rng: random.Random) -> None:
        self.random = rng
        self.timeout = check.timeout
        self.interval = check.interval
        self.unhealthy_threshold = max(1, check.unhealthy_threshold)
        self.healthy_threshold = max(1, check.healthy_threshold)
        self.initial_jitter = check.initial_jitter
        self.interval_jitter = check.interval_jitter
        self.interval_jitter_percent = check.interval_jitter_percent
        self.no_traffic_interval = check.no_traffic_interval
        self.no_traffic_healthy_interval = (
            check.no_traffic_healthy_interval
            if check.no_traffic_healthy_interval is not None
            else check.no_traffic_interval
        )
        self.unhealthy_interval = (
            check.unhealthy_interval if check.unhealthy_interval is not None else check.interval
        )
        self.unhealthy_edge_interval = (
            check.unhealthy_edge_interval
            if check.unhealthy_edge_interval is not None
            else self.unhealthy_interval
        )
        self.healthy_edge_interval = (
            check.healthy_edge_interval if check.healthy_edge_interval is not None else check.interval
        )

    def base_interval(self, passed: bool, transition: Transition, had_traffic: bool) -> float:
        """Envoy's interval choice before jitter (``passed`` is the result just recorded)."""
        if not had_traffic:
            if passed and transition is not Transition.CHANGE_PENDING:
                return self.no_traffic_healthy_interval
            return self.no_traffic_interval
        if passed:
            return self.healthy_edge_interval if transition is Transition.CHANGE_PENDING else self.interval
        return (
            self.unhealthy_edge_interval
            if transition is Transition.CHANGE_PENDING
            else self.unhealthy_interval
        )

    def with_jitter(self, base: float) -> float:
        """``base`` plus ``[0, base * percent / 100)`` plus ``[0, interval_jitter)``; at least 1 ms."""
        delay = base
        span = base * self.interval_jitter_percent / 100.0
        if span > 0:
            delay += self.random.random() * span
        if self.interval_jitter > 0:
            delay += self.random.random() * self.interval_jitter
        return max(_MIN_DELAY, delay)

    def next_delay(self, passed: bool, transition: Transition, had_traffic: bool) -> float:
        return self.with_jitter(self.base_interval(passed, transition, had_traffic))

    def initial_delay(self) -> float:
        """Delay of a host's first check: 0 without ``initial_jitter``, else ``[1 ms, initial_jitter)``."""
        if self.initial_jitter <= 0:
            return 0.0
        return max(_MIN_DELAY, self.random.random() * self.initial_jitter)

    def __repr__(self) -> str:
        return (
            f"<HealthCheckPolicy interval={self.interval} timeout={self.timeout}"
            f" thresholds={self.unhealthy_threshold}/{self.healthy_threshold}>"
        )


# ============================================================================================ per host
class HostHealth:
    """One host's active health state (Envoy's ``ActiveHealthCheckSession`` minus the I/O)."""

    __slots__ = ("first_check", "healthy", "num_healthy", "num_unhealthy", "pending", "policy", "timed_out")

    def __init__(self, policy: HealthCheckPolicy) -> None:
        self.policy = policy
        self.healthy = False
        """Verdict; False until the first success (the host starts ``FAILED_ACTIVE_HC``)."""
        self.pending = True
        """No result yet (``PENDING_ACTIVE_HC``)."""
        self.first_check = True
        self.num_healthy = 0
        """Consecutive successes while unhealthy."""
        self.num_unhealthy = 0
        """Consecutive failures while healthy."""
        self.timed_out = False
        """Unhealthy and the last failure was a timeout (Envoy's ``ACTIVE_HC_TIMEOUT``)."""

    def record(self, result: ProbeResult, now: float, had_traffic: bool) -> Verdict:
        """Weigh one probe result; returns the verdict and the next check time."""
        if result.passed:
            return self._success(now, had_traffic)
        return self._failure(result.failure or FailureType.ACTIVE, result.retriable, now, had_traffic)

    def _success(self, now: float, had_traffic: bool) -> Verdict:
        self.num_unhealthy = 0
        transition = Transition.UNCHANGED
        was = self.healthy
        if not self.healthy:
            self.num_healthy += 1
            if self.first_check or self.num_healthy >= self.policy.healthy_threshold:
                self.healthy = True
                self.timed_out = False
                self.num_healthy = 0
                transition = Transition.CHANGED
            else:
                transition = Transition.CHANGE_PENDING
        return self._finish(True, transition, was, now, had_traffic)

    def _failure(self, failure: FailureType, retriable: bool, now: float, had_traffic: bool) -> Verdict:
        self.num_healthy = 0
        transition = Transition.UNCHANGED
        was = self.healthy
        if self.healthy:
            network = failure in (FailureType.NETWORK, FailureType.NETWORK_TIMEOUT)
            self.num_unhealthy += 1
            if (not network and not retriable) or self.num_unhealthy >= self.policy.unhealthy_threshold:
                self.healthy = False
                self.num_unhealthy = 0
                transition = Transition.CHANGED
            else:
                transition = Transition.CHANGE_PENDING
        self.timed_out = failure is FailureType.NETWORK_TIMEOUT and not self.healthy
        return self._finish(False, transition, was, now, had_traffic)

    def _finish(
        self, passed: bool, transition: Transition, was: bool, now: float, had_traffic: bool
    ) -> Verdict:
        first = self.pending
        if self.pending:
            self.pending = False
            transition = Transition.CHANGED  # Envoy's clearPendingFlag: the excluded-host list changes
        self.first_check = False
        delay = self.policy.next_delay(passed, transition, had_traffic)
        return Verdict(self.healthy, transition, self.healthy != was, first, delay, now + delay)

    def __repr__(self) -> str:
        state = "pending" if self.pending else "healthy" if self.healthy else "unhealthy"
        return f"<HostHealth {state} successes={self.num_healthy} failures={self.num_unhealthy}>"


# ============================================================================================ HTTP
def _apply_header_options(headers: Headers, options: tuple[HeaderValueOption, ...]) -> None:
    """Envoy's append actions, decided against the headers as they were before these options."""
    before = {name for name, _ in headers}
    appends: list[tuple[bytes, bytes]] = []
    for opt in options:
        name = opt.key.lower().encode("latin-1", "replace")
        value = opt.value.encode("utf-8", "replace")
        action = opt.append_action
        if action == "APPEND_IF_EXISTS_OR_ADD":
            appends.append((name, value))
        elif action == "ADD_IF_ABSENT":
            if name not in before:
                appends.append((name, value))
        elif action == "OVERWRITE_IF_EXISTS_OR_ADD" or (action == "OVERWRITE_IF_EXISTS" and name in before):
            headers.set(name, value)
    for name, value in appends:
        headers.add(name, value)


def http_request_headers(check: HttpHealthCheck, *, authority: str, scheme: bytes) -> Headers:
    """The request of an HTTP check: method, path, ``authority`` (the ``host`` or cluster name), the
    ``user-agent: Envoy/HC`` mark, then ``request_headers_to_remove`` and ``request_headers_to_add``.
    """
    headers = Headers(
        [
            (b":method", check.method.encode("ascii")),
            (b":scheme", scheme),
            (b":authority", authority.encode("utf-8", "replace")),
            (b":path", check.path.encode("utf-8", "replace")),
            (b"user-agent", USER_AGENT),
        ]
    )
    for name in check.request_headers_to_remove:
        headers.remove(name.encode("latin-1", "replace"))
    _apply_header_options(headers, check.request_headers_to_add)
    return headers


def _in_ranges(status: int, ranges: tuple[StatusRange, ...]) -> bool:
    return any(r.start <= status < r.end for r in ranges)


def classify_http_response(check: HttpHealthCheck, headers: Headers) -> ProbeResult:
    """Judge a complete HTTP answer: expected status passes, a retriable one counts toward the threshold,
    anything else (or the immediate-fail header) fails the host at once."""
    raw = headers.get(b":status") or b"0"
    try:
        status = int(raw)
    except ValueError:
        status = 0
    if IMMEDIATE_FAIL_HEADER in headers:
        return ProbeResult.fail(FailureType.ACTIVE, f"status {status} with {IMMEDIATE_FAIL_HEADER.decode()}")
    if _in_ranges(status, check.expected_statuses):
        return ProbeResult.success(f"status {status}")
    if _in_ranges(status, check.retriable_statuses):
        return ProbeResult.fail(FailureType.ACTIVE, f"retriable status {status}", retriable=True)
    return ProbeResult.fail(FailureType.ACTIVE, f"unexpected status {status}")


# ============================================================================================ gRPC
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def grpc_health_request(service: str) -> bytes:
    """``HealthCheckRequest{service}`` serialized (field 1, length-delimited; empty when ``service`` is)."""
    data = service.encode("utf-8")
    if not data:
        return b""
    return b"\x0a" + _varint(len(data)) + data


def _read_varint(msg: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= len(msg):
            raise ValueError("truncated varint")
        b = msg[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise ValueError("varint longer than 10 bytes")


def parse_grpc_health_response(msg: bytes) -> int:
    """``HealthCheckResponse.status`` (0 UNKNOWN when absent). Unknown fields are skipped; the last
    occurrence of ``status`` wins (protobuf rules). Raises ``ValueError`` on malformed bytes."""
    status = UNKNOWN
    pos = 0
    n = len(msg)
    while pos < n:
        key, pos = _read_varint(msg, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _read_varint(msg, pos)
            if field == 1:
                status = value & 0xFFFFFFFF
                if status >= 1 << 31:  # enums are int32 on the wire: sign-extended negatives
                    status -= 1 << 32
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(msg, pos)
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > n:
            raise ValueError("truncated field")
    return status


def grpc_request_headers(check: GrpcHealthCheck, *, authority: str, scheme: bytes) -> Headers:
    """Headers of the ``grpc.health.v1.Health/Check`` call (plus ``initial_metadata``)."""
    headers = Headers(
        [
            (b":method", b"POST"),
            (b":scheme", scheme),
            (b":authority", authority.encode("utf-8", "replace")),
            (b":path", GRPC_HEALTH_PATH),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"user-agent", USER_AGENT),
        ]
    )
    _apply_header_options(headers, check.initial_metadata)
    return headers


def classify_grpc_response(headers: Headers, messages: list[bytes], trailers: Headers | None) -> ProbeResult:
    """Judge a finished ``Check`` call: HTTP 200, ``grpc-status: 0``, exactly one message, SERVING.

    ``trailers`` is None for a trailers-only answer (the status is then in ``headers``).
    """
    raw_status = headers.get(b":status") or b"0"
    if raw_status != b"200":
        return ProbeResult.fail(FailureType.ACTIVE, f"HTTP status {raw_status.decode('latin-1')}")
    source = trailers if trailers is not None else headers
    grpc_status = source.get(b"grpc-status")
    if grpc_status is None:
        return ProbeResult.fail(FailureType.ACTIVE, "no grpc-status")
    if grpc_status != b"0":
        return ProbeResult.fail(FailureType.ACTIVE, f"grpc-status {grpc_status.decode('latin-1')}")
    if len(messages) != 1:
        return ProbeResult.fail(FailureType.ACTIVE, f"expected one response message, got {len(messages)}")
    try:
        status = parse_grpc_health_response(messages[0])
    except ValueError as e:
        return ProbeResult.fail(FailureType.ACTIVE, f"bad HealthCheckResponse: {e}")
    name = _SERVING_NAMES.get(status, str(status))
    if status != SERVING:
        return ProbeResult.fail(FailureType.ACTIVE, f"serving status {name}")
    return ProbeResult.success(name)


# ============================================================================================ TCP
class PayloadMatcher:
    """Finds ``blocks`` in a byte stream, each after the previous one (gaps allowed), as Envoy's TCP check.

    ``feed(data)`` returns True once every block was seen. Memory stays below the longest block: bytes
    that can no longer start a match are dropped.
    """

    __slots__ = ("_blocks", "_buf", "_index")

    def __init__(self, blocks: tuple[bytes, ...]) -> None:
        self._blocks = tuple(b for b in blocks if b)
        self._index = 0
        self._buf = bytearray()

    @property
    def done(self) -> bool:
        return self._index >= len(self._blocks)

    def feed(self, data: bytes) -> bool:
        if self.done:
            return True
        self._buf += data
        while not self.done:
            block = self._blocks[self._index]
            at = self._buf.find(block)
            if at < 0:
                keep = len(block) - 1
                if len(self._buf) > keep:
                    del self._buf[: len(self._buf) - keep]
                return False
            del self._buf[: at + len(block)]
            self._index += 1
        self._buf.clear()
        return True

    def reset(self) -> None:
        self._index = 0
        self._buf.clear()

    def __repr__(self) -> str:
        return f"<PayloadMatcher {self._index}/{len(self._blocks)} buffered={len(self._buf)}>"
