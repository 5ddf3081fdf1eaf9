"""Load balancers: pick one host of a cluster for a request (sans-IO; randomness is injected).

Every balancer implements ``LoadBalancer.choose(hosts, hash_key) -> Host | None``. ``hosts`` is the
cluster's current host list (the balancer keeps no reference to it between calls, so membership changes
need no notification); ``hash_key`` is for consistent-hash balancers and ignored by the ones here.

Like Envoy, a balancer picks among *available* hosts (healthy, not ejected) unless fewer than
``panic_threshold`` percent of the hosts are available: then it is in *panic* and picks among all hosts,
because sending traffic to possibly-bad hosts beats failing everything (Envoy's default threshold is 50 %).
``panic_total`` counts panicked picks (the cluster exports it as ``lb_healthy_panic``). An empty host list
gives ``None`` (the router answers 503 with response flag ``UH``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from microenvoy.upstream.host import Host

__all__ = ["LeastRequestLb", "LoadBalancer", "RandomLb", "RoundRobinLb", "make_lb"]


class LoadBalancer(Protocol):
    """What the cluster calls for each request attempt."""

    panic_total: int

    def choose(self, hosts: Sequence[Host], hash_key: bytes | None = None) -> Host | None: ...


class _Base:
    __slots__ = ("panic_threshold", "panic_total", "random")

    def __init__(self, rng: random.Random | None = None, *, panic_threshold: float = 50.0) -> None:
        self.random = rng if rng is not None else random.Random()
        self.panic_threshold = panic_threshold
        self.panic_total = 0

    def _candidates(self, hosts: Sequence[Host]) -> Sequence[Host]:
        available = [h for h in hosts if h.available]
        if len(available) == len(hosts):
            return hosts
        if len(available) * 100.0 < self.panic_threshold * len(hosts):
            self.panic_total += 1
            return hosts
        return available

    def __repr__(self) -> str:
        return f"<{type(self).__name__} panic_total={self.panic_total}>"


class RoundRobinLb(_Base):
    """Smooth weighted round robin (nginx's algorithm): weights honoured, picks interleaved.

    Each pick adds every candidate's weight to its running score, takes the highest score and subtracts the
    total weight from it. With weights 5/1/1 the sequence is a a b a c a a, never five a's in a row. Ties
    are broken from a random position, so that many agents do not all hit the same host first.
    """

    __slots__ = ("_offset", "_scores")

    def __init__(self, rng: random.Random | None = None, *, panic_threshold: float = 50.0) -> None:
        super().__init__(rng, panic_threshold=panic_threshold)
        self._scores: dict[Host, int] = {}
        self._offset = self.random.randrange(1 << 30)
        """Ties are broken starting at this (random) position, so agents do not all start at host 0."""

    def choose(self, hosts: Sequence[Host], hash_key: bytes | None = None) -> Host | None:
        candidates = self._candidates(hosts)
        n = len(candidates)
        if not n:
            return None
        if n == 1:
            return candidates[0]
        scores = self._scores
        if len(scores) > 2 * len(hosts) + 8:  # forget hosts that left the cluster
            live = set(hosts)
            self._scores = scores = {h: s for h, s in scores.items() if h in live}
        start = self._offset % n
        total = 0
        best: Host | None = None
        best_score = 0
        for i in range(n):
            h = candidates[(start + i) % n]
            s = scores.get(h, 0) + h.weight
            scores[h] = s
            total += h.weight
            if best is None or s > best_score:
                best, best_score = h, s
        assert best is not None
        scores[best] = best_score - total
        return best


class LeastRequestLb(_Base):
    """Power of two choices: sample two candidates, take the one with fewer active requests per weight.

    With ``choice_count`` > 2 more candidates are sampled (Envoy's ``least_request_lb_config.choice_count``).
    Samples are drawn weight-proportionally, so weights matter even when every host is idle.
    """

    __slots__ = ("choice_count",)

    def __init__(
        self, rng: random.Random | None = None, *, choice_count: int = 2, panic_threshold: float = 50.0
    ) -> None:
        super().__init__(rng, panic_threshold=panic_threshold)
        self.choice_count = max(1, choice_count)

    def choose(self, hosts: Sequence[Host], hash_key: bytes | None = None) -> Host | None:
        candidates = self._candidates(hosts)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        weights = [h.weight for h in candidates]
        uniform = min(weights) == max(weights)
        best: Host | None = None
        best_load = 0.0
        for _ in range(self.choice_count):
            if uniform:
                h = candidates[self.random.randrange(len(candidates))]
            else:
                h = self.random.choices(candidates, weights)[0]
            load = (h.rq_active + 1) / h.weight
            if best is None or load < best_load:
                best, best_load = h, load
        return best


class RandomLb(_Base):
    """Weighted random pick among candidates."""

    __slots__ = ()

    def choose(self, hosts: Sequence[Host], hash_key: bytes | None = None) -> Host | None:
        candidates = self._candidates(hosts)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        return self.random.choices(candidates, [h.weight for h in candidates])[0]


def make_lb(policy: str, rng: random.Random | None = None) -> LoadBalancer:
    """The balancer for a cluster's ``lb_policy`` (``ROUND_ROBIN``, ``LEAST_REQUEST``, ``RANDOM``)."""
    if policy == "LEAST_REQUEST":
        return LeastRequestLb(rng)
    if policy == "RANDOM":
        return RandomLb(rng)
    if policy == "ROUND_ROBIN":
        return RoundRobinLb(rng)
    raise ValueError(f"unsupported lb_policy {policy!r}")
