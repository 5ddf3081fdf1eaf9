"""Weighted cluster selection (``route.weighted_clusters``) with an injected ``random.Random``.

Envoy draws ``r`` uniformly in ``[0, total_weight)`` and walks the clusters in configuration order, taking
the first whose cumulative weight exceeds ``r``; a bisect over the precomputed cumulative weights does the
same in O(log n).
"""

from __future__ import annotations

import bisect
import random as _random
from collections.abc import Sequence

from microenvoy.config.model import WeightedCluster

__all__ = ["WeightedClusterPicker"]


class WeightedClusterPicker:
    """Picks a cluster name in proportion to the configured weights (zero-weight clusters never)."""

    __slots__ = ("_cumulative", "_names", "total")

    def __init__(self, clusters: Sequence[WeightedCluster]) -> None:
        if not clusters:
            raise ValueError("weighted_clusters must not be empty")
        names: list[str] = []
        cumulative: list[int] = []
        total = 0
        for c in clusters:
            if c.weight < 0:
                raise ValueError(f"weighted cluster {c.name!r} has a negative weight")
            if c.weight == 0:
                continue
            total += c.weight
            names.append(c.name)
            cumulative.append(total)
        if total == 0:
            raise ValueError("weighted_clusters: the total weight must be > 0")
        self._names = tuple(names)
        self._cumulative = tuple(cumulative)
        self.total = total

    def pick(self, random: _random.Random) -> str:
        r = random.randrange(self.total)
        return self._names[bisect.bisect_right(self._cumulative, r)]

    def __repr__(self) -> str:
        return f"<WeightedClusterPicker {len(self._names)} clusters total={self.total}>"
