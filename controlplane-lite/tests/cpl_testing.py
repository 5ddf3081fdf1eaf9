"""Helpers shared by controlplane-lite's tests."""

from __future__ import annotations


class FakeClock:
    """A settable clock for the store and the delta state machine."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
