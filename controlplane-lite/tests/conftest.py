"""Shared fixtures for controlplane-lite's tests.

Run from the repository root: ``.venv/bin/pytest controlplane-lite/tests``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cpl_testing import FakeClock

from controlplane_lite.store import Store


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> Iterator[Store]:
    s = Store(":memory:", clock=clock)
    yield s
    s.close()
