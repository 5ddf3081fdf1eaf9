"""RetryState: retry_on decisions, the retry budget and jittered backoff bounds."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.config.model import RetryPolicy
from microenvoy.core.headers import Headers
from microenvoy.router.retry import RETRY_ON_VALUES, RetryState


def _state(*retry_on: str, num_retries: int = 5, **kw: object) -> RetryState:
    return RetryState(RetryPolicy(retry_on=retry_on, num_retries=num_retries, **kw), random.Random(7))  # type: ignore[arg-type]


def _h(**kv: str) -> Headers:
    return Headers([(k.replace("_", "-").encode(), v.encode()) for k, v in kv.items()])


@pytest.mark.parametrize(
    ("retry_on", "status", "expected"),
    [
        ("5xx", 500, True),
        ("5xx", 503, True),
        ("5xx", 599, True),
        ("5xx", 404, False),
        ("5xx", 200, False),
        ("gateway-error", 502, True),
        ("gateway-error", 503, True),
        ("gateway-error", 504, True),
        ("gateway-error", 500, False),
        ("reset", 503, False),
        ("connect-failure", 503, False),
        ("refused-stream", 503, False),
        ("retriable-4xx", 409, True),
        ("retriable-4xx", 404, False),
    ],
)
def test_status_decisions(retry_on: str, status: int, expected: bool) -> None:
    assert _state(retry_on).should_retry_headers(status, _h()) is expected


def test_retriable_status_codes() -> None:
    s = _state("retriable-status-codes", retriable_status_codes=(418, 429))
    assert s.should_retry_headers(418, _h())
    assert s.should_retry_headers(429, _h())
    assert not s.should_retry_headers(500, _h())
    # the list alone does nothing without the retry_on value
    assert not _state("5xx", retriable_status_codes=(418,)).should_retry_headers(418, _h())


@pytest.mark.parametrize(
    ("retry_on", "kind", "expected"),
    [
        ("5xx", "reset", True),
        ("5xx", "connect-failure", True),
        ("5xx", "refused-stream", True),
        ("5xx", "timeout", True),
        ("gateway-error", "reset", True),
        ("gateway-error", "timeout", True),
        ("reset", "reset", True),
        ("reset", "connect-failure", True),
        ("reset", "refused-stream", True),
        ("connect-failure", "connect-failure", True),
        ("connect-failure", "reset", False),
        ("connect-failure", "refused-stream", False),
        ("refused-stream", "refused-stream", True),
        ("refused-stream", "reset", False),
        ("refused-stream", "connect-failure", False),
        ("retriable-status-codes", "reset", False),
        ("unavailable", "reset", False),
    ],
)
def test_reset_decisions(retry_on: str, kind: str, expected: bool) -> None:
    assert _state(retry_on).should_retry_reset(kind) is expected


@pytest.mark.parametrize(
    ("name", "code"),
    [("cancelled", "1"), ("deadline-exceeded", "4"), ("resource-exhausted", "8"), ("internal", "13"),
     ("unavailable", "14")],
)  # fmt: skip
def test_grpc_decisions(name: str, code: str) -> None:
    s = _state(name)
    assert s.should_retry_headers(200, _h(grpc_status=code))
    assert not s.should_retry_headers(200, _h(grpc_status="0"))
    assert not s.should_retry_headers(200, _h())
    other = "2" if code != "2" else "3"
    assert not s.should_retry_headers(200, _h(grpc_status=other))


def test_overloaded_is_never_retried() -> None:
    assert not _state("5xx").should_retry_headers(503, _h(x_envoy_overloaded="true"))


def test_budget_and_limit_exceeded() -> None:
    s = _state("5xx", num_retries=2)
    assert s.should_retry_headers(503, _h())
    assert s.should_retry_reset("reset")
    assert s.retries_left == 0
    assert s.retries_used == 2
    assert not s.limit_exceeded
    assert not s.should_retry_headers(200, _h())  # not wanted: not a limit problem
    assert not s.limit_exceeded
    assert not s.should_retry_headers(503, _h())
    assert s.limit_exceeded
    assert "left=0" in repr(s)


def test_unknown_retry_on_rejected() -> None:
    with pytest.raises(ValueError, match="5xxx"):
        _state("5xxx")
    assert "5xx" in RETRY_ON_VALUES


def test_backoff_defaults_grow_and_cap() -> None:
    s = _state("5xx")
    assert [s.backoff_cap(n) for n in range(6)] == pytest.approx([0.025, 0.05, 0.1, 0.2, 0.25, 0.25])
    assert s.backoff_cap(10_000) == pytest.approx(0.25)


def test_backoff_configured_max() -> None:
    s = _state("5xx", base_interval=0.1, max_interval=0.3)
    assert [s.backoff_cap(n) for n in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])


def test_backoff_is_jittered_and_seeded() -> None:
    a = [_state("5xx").next_backoff() for _ in range(3)]
    b = [_state("5xx").next_backoff() for _ in range(3)]
    assert a == b  # same seed, same draws
    s = _state("5xx")
    draws = [s.next_backoff() for _ in range(8)]
    assert len(set(draws)) == len(draws)


@given(
    st.integers(0, 2**32 - 1),
    st.floats(0.001, 5.0),
    st.one_of(st.none(), st.floats(0.001, 60.0)),
    st.integers(1, 80),
)
def test_backoff_always_within_cap(seed: int, base: float, max_interval: float | None, n: int) -> None:
    s = RetryState(
        RetryPolicy(retry_on=("5xx",), base_interval=base, max_interval=max_interval), random.Random(seed)
    )
    cap_max = max_interval if max_interval is not None else 10 * base
    for i in range(n):
        cap = s.backoff_cap(i)
        assert 0 <= cap <= cap_max
        assert cap <= base * 2**i + 1e-12
        d = s.next_backoff()
        assert 0.0 <= d <= cap
