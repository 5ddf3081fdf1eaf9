"""Retry decisions and jittered backoff for one exchange (Envoy's ``RetryStateImpl``), sans-IO.

The front creates one ``RetryState`` per exchange whose route has a retry policy, asks it after every
failed attempt and sleeps ``next_backoff()`` (with its own timer) before the next one:

    state = RetryState(policy, rng)
    ...
    if state.should_retry_headers(status, response_headers):  # or should_retry_reset("reset")
        delay = state.next_backoff()

``retry_on`` semantics (Envoy's ``x-envoy-retry-on`` values):

* ``5xx``: any 5xx response, and any reset / connect failure / refused stream / per-try timeout;
* ``gateway-error``: 502, 503, 504 responses, and the same resets as ``5xx``;
* ``reset``: the upstream did not answer at all (reset, disconnect, connect failure, per-try timeout);
* ``connect-failure``: the connection to the upstream could not be made (incl. connect timeout);
* ``refused-stream``: the upstream refused the stream (HTTP/2 ``REFUSED_STREAM``);
* ``retriable-status-codes``: the response status is in ``retriable_status_codes``;
* ``retriable-4xx``: 409;
* gRPC ``cancelled``, ``deadline-exceeded``, ``internal``, ``resource-exhausted``, ``unavailable``: the
  ``grpc-status`` in the response *headers* (a trailers-only response) is that code. A status that
  arrives in trailers comes after the response started and is never retried, as in Envoy.

A response carrying ``x-envoy-overloaded`` is never retried. Each positive decision spends one of
``num_retries``; when the policy would retry but nothing is left, ``limit_exceeded`` becomes true (the
front sets the ``URX`` response flag).

Backoff is Envoy's fully jittered exponential backoff: retry n (0-based) waits a uniformly random time in
``[0, min(base * 2**n, max))`` with ``base = retry_back_off.base_interval`` (25 ms by default) and
``max = retry_back_off.max_interval`` (10 x base by default).
"""

from __future__ import annotations

import random as _random

from microenvoy.config.model import RetryPolicy
from microenvoy.core.headers import Headers

__all__ = ["GRPC_RETRY_ON", "RESET_KINDS", "RETRY_ON_VALUES", "RetryState"]

GRPC_RETRY_ON: dict[str, int] = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}
"""gRPC ``retry_on`` names -> grpc-status codes."""

RETRY_ON_VALUES = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "connect-failure",
        "refused-stream",
        "retriable-status-codes",
        "retriable-4xx",
        *GRPC_RETRY_ON,
    }
)
"""Every ``retry_on`` value microenvoy understands (the config loader validates against it)."""

RESET_KINDS = ("reset", "connect-failure", "refused-stream", "timeout")
"""Kinds for ``should_retry_reset``: ``timeout`` is a per-try timeout."""

_5XX = 1
_GATEWAY = 2
_RESET = 4
_CONNECT = 8
_REFUSED = 16
_STATUS_CODES = 32
_4XX = 64
_BITS = {
    "5xx": _5XX,
    "gateway-error": _GATEWAY,
    "reset": _RESET,
    "connect-failure": _CONNECT,
    "refused-stream": _REFUSED,
    "retriable-status-codes": _STATUS_CODES,
    "retriable-4xx": _4XX,
}
_ANY_RESET = _5XX | _GATEWAY | _RESET


class RetryState:
    """Retries left and backoff position for one exchange."""

    __slots__ = (
        "_backoff_n",
        "_base",
        "_bits",
        "_grpc",
        "_max",
        "_random",
        "_status_codes",
        "limit_exceeded",
        "retries_left",
        "retries_used",
    )

    def __init__(self, policy: RetryPolicy, random: _random.Random) -> None:
        bits = 0
        grpc: set[bytes] = set()
        for name in policy.retry_on:
            name = name.strip()
            if name in _BITS:
                bits |= _BITS[name]
            elif name in GRPC_RETRY_ON:
                grpc.add(str(GRPC_RETRY_ON[name]).encode())
            else:
                raise ValueError(f"unknown retry_on value {name!r}")
        self._bits = bits
        self._grpc = frozenset(grpc)
        self._status_codes = frozenset(policy.retriable_status_codes)
        self._random = random
        self._base = policy.base_interval if policy.base_interval > 0 else 0.025
        self._max = policy.max_interval if policy.max_interval is not None else 10 * self._base
        self._backoff_n = 0
        self.retries_left = max(0, policy.num_retries)
        """Retries still allowed."""
        self.retries_used = 0
        self.limit_exceeded = False
        """The policy wanted another retry but none was left (``URX``)."""

    # -- decisions without the budget ----------------------------------------------------------
    def would_retry_headers(self, status: int, headers: Headers) -> bool:
        """Does ``retry_on`` cover this response (ignoring how many retries are left)?"""
        if b"x-envoy-overloaded" in headers:
            return False
        bits = self._bits
        if bits & _5XX and 500 <= status <= 599:
            return True
        if bits & _GATEWAY and status in (502, 503, 504):
            return True
        if bits & _STATUS_CODES and status in self._status_codes:
            return True
        if bits & _4XX and status == 409:
            return True
        if self._grpc:
            grpc_status = headers.get(b"grpc-status")
            if grpc_status is not None and grpc_status.strip() in self._grpc:
                return True
        return False

    def would_retry_reset(self, kind: str) -> bool:
        """Does ``retry_on`` cover an attempt that got no response (``RESET_KINDS``)?"""
        bits = self._bits
        if bits & _ANY_RESET:
            return True
        if kind == "connect-failure":
            return bool(bits & _CONNECT)
        if kind == "refused-stream":
            return bool(bits & _REFUSED)
        return False

    # -- decisions that spend the budget -------------------------------------------------------
    def should_retry_headers(self, status: int, headers: Headers) -> bool:
        """Retry after this response? Spends one retry when true."""
        return self._spend(self.would_retry_headers(status, headers))

    def should_retry_reset(self, kind: str) -> bool:
        """Retry after a reset / connect failure / refused stream / per-try timeout? Spends one when true."""
        return self._spend(self.would_retry_reset(kind))

    def _spend(self, wanted: bool) -> bool:
        if not wanted:
            return False
        if self.retries_left <= 0:
            self.limit_exceeded = True
            return False
        self.retries_left -= 1
        self.retries_used += 1
        return True

    # -- backoff -------------------------------------------------------------------------------
    def backoff_cap(self, n: int) -> float:
        """Upper bound of the wait before retry ``n`` (0-based): ``min(base * 2**n, max)``."""
        if n >= 62:
            return self._max
        return min(self._base * (1 << n), self._max)

    def next_backoff(self) -> float:
        """Seconds to wait before the next retry: uniform in ``[0, cap)``; advances the backoff."""
        cap = self.backoff_cap(self._backoff_n)
        self._backoff_n += 1
        return self._random.random() * cap

    def __repr__(self) -> str:
        return f"<RetryState left={self.retries_left} used={self.retries_used} n={self._backoff_n}>"
