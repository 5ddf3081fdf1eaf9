"""Weighted cluster picks."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.config.model import WeightedCluster
from microenvoy.router.weighted import WeightedClusterPicker


def test_proportions_and_zero_weight() -> None:
    p = WeightedClusterPicker([WeightedCluster("a", 10), WeightedCluster("z", 0), WeightedCluster("b", 30)])
    rng = random.Random(3)
    picks = [p.pick(rng) for _ in range(8000)]
    assert "z" not in picks
    assert 0.22 < picks.count("a") / len(picks) < 0.28
    assert p.total == 40


@pytest.mark.parametrize(
    "clusters",
    [[], [WeightedCluster("a", 0)], [WeightedCluster("a", -1), WeightedCluster("b", 2)]],
)
def test_invalid(clusters: list[WeightedCluster]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  # messages are checked in the route table tests
        WeightedClusterPicker(clusters)


@given(st.lists(st.integers(0, 5), min_size=1, max_size=6).filter(any), st.integers(0, 2**32))
def test_pick_only_positive_weights(weights: list[int], seed: int) -> None:
    clusters = [WeightedCluster(f"c{i}", w) for i, w in enumerate(weights)]
    picked = WeightedClusterPicker(clusters).pick(random.Random(seed))
    assert weights[int(picked[1:])] > 0
