"""Load balancers: pick one host of a cluster for a request (sans-IO; randomness is injected).

Theory of operation
-------------------
Every balancer implements ``LoadBalancer.choose(hosts, hash_key) -> Host | None`` and
``hosts_changed()``. ``hosts`` is the cluster's current host list; ``hash_key`` is the request's 64-bit
key from the route's ``hash_policy`` (``microenvoy.router.hash_policy.compute_hash``), used by the
consistent-hash balancers (``RING_HASH``, ``MAGLEV``) and ignored by the others; ``None`` there means a
random key. (A ``bytes`` key is accepted too and hashed first.)

Like Envoy, a balancer picks among *available* hosts (healthy, not ejected) unless fewer than
``panic_threshold`` percent of the hosts are available: then it is in *panic* and picks among all hosts,
because sending traffic to possibly-bad hosts beats failing everything (Envoy's default threshold is 50 %;
0 disables panic, and then no available host means no host). ``panic_total`` counts panicked picks (the
cluster exports it as ``lb_healthy_panic``). An empty host list gives ``None`` (the router answers 503
with response flag ``UH``).

The candidate set and every per-set structure (smooth-WRR scores, the least-request EDF heap, the random
balancer's cumulative weights, the hash ring, the Maglev table) are built lazily on the first pick after
the set changed, never per request. The cluster must call ``hosts_changed()`` whenever membership,
weights or availability (health check verdict, outlier ejection) change; passing a different list object
(or one of a different length) is noticed without it. ``refresh(hosts)`` builds right away (for stats).

Hosts are ordered by address before ring/table construction, so every agent with the same host set builds
the same ring and table whatever order DNS or the config lists them in.
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Sequence

try:  # the C module itself: importing hashlib would also load OpenSSL's _hashlib (~1.5 MiB resident)
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - CPython builds without _blake2
    from hashlib import blake2b
from typing import TYPE_CHECKING, Protocol

from microenvoy.upstream.host import Host

if TYPE_CHECKING:
    from microenvoy.config.lb import LbConfig

__all__ = [
    "LeastRequestLb",
    "LoadBalancer",
    "MaglevLb",
    "RandomLb",
    "RingHashLb",
    "RoundRobinLb",
    "make_lb",
]

_U64 = 1 << 64


class LoadBalancer(Protocol):
    """What the cluster calls for each request attempt."""

    panic_total: int

    def choose(self, hosts: Sequence[Host], hash_key: int | bytes | None = None) -> Host | None: ...

    def hosts_changed(self) -> None: ...


_BLAKE2B_64 = blake2b(digest_size=8)


_RING_SOFT_CAP = 64
"""The ring stays within this many times ``minimum_ring_size`` points (65536 by default) besides
``maximum_ring_size``: building it is Python work on the event loop at every availability change."""


def _points(address: bytes, count: int) -> list[int]:
    """A host's first ``count`` ring positions: eight 64-bit values from each 64-byte BLAKE2b digest of
    ``<address>_<block>``. Nested (the first n positions do not depend on ``count``), so a host's points do
    not move when other hosts change."""
    out: list[int] = []
    prefix = address + b"_"
    for block in range((count + 7) // 8):
        digest = blake2b(prefix + str(block).encode(), digest_size=64).digest()
        out.extend(int.from_bytes(digest[i : i + 8], "little") for i in range(0, 64, 8))
    del out[count:]
    return out


def _hash64(data: bytes) -> int:
    # Same function as microenvoy.router.hash_policy.hash64 (not imported: that module loads the config
    # package, which upstream does not need). A test checks that both agree.
    h = _BLAKE2B_64.copy()
    h.update(data)
    return int.from_bytes(h.digest(), "little")


class _Base:
    """Candidate selection (availability, panic) with lazy rebuild; subclasses implement ``_rebuild``."""

    __slots__ = (
        "_candidates",
        "_panic",
        "_source",
        "_source_len",
        "_stale",
        "panic_threshold",
        "panic_total",
        "random",
    )

    def __init__(self, rng: random.Random | None = None, *, panic_threshold: float = 50.0) -> None:
        self.random = rng if rng is not None else random.Random()
        self.panic_threshold = panic_threshold
        """Percent of available hosts below which all hosts are used (0 disables panic)."""
        self.panic_total = 0
        """Picks made in panic mode (exported as ``lb_healthy_panic``)."""
        self._source: Sequence[Host] | None = None
        self._source_len = 0
        self._stale = True
        self._panic = False
        self._candidates: list[Host] = []

    def hosts_changed(self) -> None:
        """Membership, weights or availability changed: rebuild on the next pick."""
        self._stale = True

    def refresh(self, hosts: Sequence[Host]) -> None:
        """Recompute the candidate set (and the subclass's tables) for ``hosts`` now."""
        self._source = hosts
        self._source_len = len(hosts)
        self._stale = False
        available = [h for h in hosts if h.available]
        self._panic = False
        if len(available) == len(hosts):
            candidates = list(hosts)
        elif len(available) * 100.0 < self.panic_threshold * len(hosts):
            self._panic = True
            candidates = list(hosts)
        else:
            candidates = available
        self._candidates = candidates
        self._rebuild(candidates)

    def _rebuild(self, candidates: list[Host]) -> None:
        """Subclass hook: build per-candidate-set structures."""

    def _prepare(self, hosts: Sequence[Host]) -> list[Host]:
        if self._stale or hosts is not self._source or len(hosts) != self._source_len:
            self.refresh(hosts)
        if self._panic:
            self.panic_total += 1
        return self._candidates

    @property
    def in_panic(self) -> bool:
        """Was the candidate set, as last built, in panic mode."""
        return self._panic

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} candidates={len(self._candidates)}"
            f"{' panic' if self._panic else ''} panic_total={self.panic_total}>"
        )


def _uniform(hosts: Sequence[Host]) -> bool:
    return len({h.weight for h in hosts}) <= 1


# ============================================================================================ round robin
class RoundRobinLb(_Base):
    """Smooth weighted round robin (nginx's algorithm): weights honoured, picks interleaved.

    Each pick adds every candidate's weight to its running score, takes the highest score and subtracts the
    total weight from it. With weights 5/1/1 the sequence is a a b a c a a, never five a's in a row. Over
    any window of ``sum(weights)`` picks each host is picked exactly ``weight`` times. With equal weights it
    is a plain rotation (O(1) per pick); with unequal weights a pick is O(candidates). The rotation starts at
    a random position, so that many agents do not all hit the same host first.
    """

    __slots__ = ("_index", "_offset", "_scores", "_total", "_uniform", "_weights")

    def __init__(self, rng: random.Random | None = None, *, panic_threshold: float = 50.0) -> None:
        super().__init__(rng, panic_threshold=panic_threshold)
        self._offset = self.random.randrange(1 << 30)
        """Ties are broken starting at this (random) position, so agents do not all start at host 0."""
        self._index = 0
        self._uniform = True
        self._weights: list[int] = []
        self._scores: list[int] = []
        self._total = 0

    def _rebuild(self, candidates: list[Host]) -> None:
        n = len(candidates)
        if n:
            start = self._offset % n
            candidates[:] = candidates[start:] + candidates[:start]
        self._index = 0
        self._uniform = _uniform(candidates)
        self._weights = [h.weight for h in candidates]
        self._scores = [0] * n
        self._total = sum(self._weights)

    def choose(self, hosts: Sequence[Host], hash_key: int | bytes | None = None) -> Host | None:
        candidates = self._prepare(hosts)
        n = len(candidates)
        if n <= 1:
            return candidates[0] if n else None
        if self._uniform:
            i = self._index
            self._index = i + 1 if i + 1 < n else 0
            return candidates[i]
        scores = self._scores
        weights = self._weights
        best = 0
        best_score = scores[0] + weights[0]
        scores[0] = best_score
        for i in range(1, n):
            s = scores[i] + weights[i]
            scores[i] = s
            if s > best_score:
                best, best_score = i, s
        scores[best] = best_score - self._total
        return candidates[best]


# ============================================================================================ least request
class LeastRequestLb(_Base):
    """Envoy's least request balancer.

    Equal weights: power of ``choice_count`` choices: sample that many candidates uniformly, keep the one with
    the fewest active requests (the first sampled on ties). Unequal weights: earliest-deadline-first over
    dynamic weights ``weight / (rq_active + 1) ** active_request_bias`` (Envoy's formula; the picked host's
    weight is recomputed each time it is picked). With bias 0 this is weighted round robin; with idle hosts
    the split follows the weights exactly.
    """

    __slots__ = ("_heap", "_now", "_seq", "_uniform", "active_request_bias", "choice_count")

    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        choice_count: int = 2,
        active_request_bias: float = 1.0,
        panic_threshold: float = 50.0,
    ) -> None:
        super().__init__(rng, panic_threshold=panic_threshold)
        self.choice_count = max(1, choice_count)
        self.active_request_bias = max(0.0, active_request_bias)
        self._uniform = True
        self._heap: list[list[float]] = []
        """EDF entries ``[deadline, sequence, candidate index]``: lists, mutated in place on each pick."""
        self._now = 0.0
        self._seq = 0

    def _weight(self, h: Host) -> float:
        bias = self.active_request_bias
        if bias == 0.0:
            return float(h.weight)
        if bias == 1.0:
            return h.weight / (h.rq_active + 1)
        return h.weight / math.pow(h.rq_active + 1, bias)

    def _rebuild(self, candidates: list[Host]) -> None:
        self._uniform = _uniform(candidates)
        self._now = 0.0
        self._seq = len(candidates)
        self._heap = []
        if not self._uniform:
            rnd = self.random.random
            # a random phase per host, so agents started together do not pick in lockstep
            self._heap = [[rnd() / self._weight(h), float(i), float(i)] for i, h in enumerate(candidates)]
            heapq.heapify(self._heap)

    def choose(self, hosts: Sequence[Host], hash_key: int | bytes | None = None) -> Host | None:
        candidates = self._prepare(hosts)
        n = len(candidates)
        if n <= 1:
            return candidates[0] if n else None
        if self._uniform:
            rnd = self.random.random
            best = candidates[int(rnd() * n)]
            for _ in range(self.choice_count - 1):
                h = candidates[int(rnd() * n)]
                if h.rq_active < best.rq_active:
                    best = h
            return best
        heap = self._heap
        top = heap[0]
        h = candidates[int(top[2])]
        self._now = now = top[0]
        top[0] = now + 1.0 / self._weight(h)
        top[1] = float(self._seq)
        self._seq += 1
        heapq.heapreplace(heap, top)
        return h


# ============================================================================================ random
class RandomLb(_Base):
    """Weighted random pick among candidates (uniform when weights are equal; O(log n) otherwise)."""

    __slots__ = ("_cumulative", "_total")

    def __init__(self, rng: random.Random | None = None, *, panic_threshold: float = 50.0) -> None:
        super().__init__(rng, panic_threshold=panic_threshold)
        self._cumulative: list[int] | None = None
        self._total = 0

    def _rebuild(self, candidates: list[Host]) -> None:
        if _uniform(candidates):
            self._cumulative = None
            return
        acc = 0
        cumulative = []
        for h in candidates:
            acc += h.weight
            cumulative.append(acc)
        self._cumulative = cumulative
        self._total = acc

    def choose(self, hosts: Sequence[Host], hash_key: int | bytes | None = None) -> Host | None:
        candidates = self._prepare(hosts)
        n = len(candidates)
        if n <= 1:
            return candidates[0] if n else None
        cumulative = self._cumulative
        if cumulative is None:
            return candidates[int(self.random.random() * n)]
        return candidates[bisect_right(cumulative, self.random.random() * self._total)]


# ============================================================================================ ring hash
class RingHashLb(_Base):
    """Ketama-style consistent hash ring (``RING_HASH``).

    Every candidate host puts its own points on the ring (``_points``: BLAKE2b of its address): the
    lightest host gets ``minimum_ring_size`` points and the others proportionally more by weight, the whole
    ring capped at ``maximum_ring_size`` and at 64 x ``minimum_ring_size`` (then scaled down). A key maps to
    the first point at or after it, wrapping around: O(log ring size) per pick with ``bisect`` and no
    allocation.

    Unlike Envoy, which shares ``minimum_ring_size`` points among all hosts (so adding a host takes points
    away from every other host and moves more keys than the new host's share), a host's point count does not
    depend on how many other hosts there are: adding or removing one of N equal hosts moves exactly the keys
    of that host's points, ~1/N, up to 64 equal hosts (beyond the cap, counts shrink as in Envoy). The price
    is a ring N times larger (N * 1024 points by default).
    """

    __slots__ = (
        "_hashes",
        "_ring_hosts",
        "max_hashes_per_host",
        "maximum_ring_size",
        "min_hashes_per_host",
        "minimum_ring_size",
        "size",
    )

    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        minimum_ring_size: int = 1024,
        maximum_ring_size: int = 8388608,
        panic_threshold: float = 50.0,
    ) -> None:
        super().__init__(rng, panic_threshold=panic_threshold)
        self.minimum_ring_size = max(1, minimum_ring_size)
        self.maximum_ring_size = max(self.minimum_ring_size, maximum_ring_size)
        self._hashes: list[int] = []
        self._ring_hosts: list[Host] = []
        self.size = 0
        """Points on the ring (gauge ``ring_hash_lb.size``)."""
        self.min_hashes_per_host = 0
        """Fewest points any host got (gauge ``ring_hash_lb.min_hashes_per_host``)."""
        self.max_hashes_per_host = 0
        """Most points any host got (gauge ``ring_hash_lb.max_hashes_per_host``)."""

    def _rebuild(self, candidates: list[Host]) -> None:
        self._hashes, self._ring_hosts = [], []
        self.size = self.min_hashes_per_host = self.max_hashes_per_host = 0
        if not candidates:
            return
        hosts = sorted(candidates, key=lambda h: h.address_text)
        min_weight = min(h.weight for h in hosts)
        per_host = [self.minimum_ring_size * h.weight / min_weight for h in hosts]
        total = sum(per_host)
        cap = min(self.maximum_ring_size, _RING_SOFT_CAP * self.minimum_ring_size)
        if total > cap:  # scale down; floor so the cap holds (every host keeps a point)
            per_host = [math.floor(n * cap / total) for n in per_host]
        # One sortable int per point: the 64-bit position above the host's index, so a plain int sort
        # orders the ring (no tuples) and the index comes back with a mask.
        shift = max(1, len(hosts).bit_length())
        mask = (1 << shift) - 1
        keys: list[int] = []
        lo, hi = math.inf, 0
        for index, (h, n) in enumerate(zip(hosts, per_host, strict=True)):
            count = max(1, round(n))
            keys.extend(p << shift | index for p in _points(h.address_text.encode(), count))
            lo, hi = min(lo, count), max(hi, count)
        keys.sort()
        self._hashes = [k >> shift for k in keys]
        self._ring_hosts = [hosts[k & mask] for k in keys]
        self.size = len(keys)
        self.min_hashes_per_host, self.max_hashes_per_host = int(lo), hi

    def choose(self, hosts: Sequence[Host], hash_key: int | bytes | None = None) -> Host | None:
        self._prepare(hosts)
        hashes = self._hashes
        if not hashes:
            return None
        if hash_key is None:
            hash_key = self.random.getrandbits(64)
        elif isinstance(hash_key, bytes):
            hash_key = _hash64(hash_key)
        i = bisect_left(hashes, hash_key)
        return self._ring_hosts[i if i < len(hashes) else 0]

    def __repr__(self) -> str:
        return (
            f"<RingHashLb size={self.size} hashes_per_host={self.min_hashes_per_host}.."
            f"{self.max_hashes_per_host}{' panic' if self._panic else ''} panic_total={self.panic_total}>"
        )


# ============================================================================================ maglev
class MaglevLb(_Base):
    """Maglev consistent hashing (Eisenbud et al., NSDI 2016, as in Envoy's ``MaglevTable``).

    Each candidate host has a permutation of the ``table_size`` (prime) slots given by ``offset`` and
    ``skip`` from the hash of its address; hosts take turns claiming their next free slot, a host of
    normalized weight ``w`` taking a turn every ``max_w / w`` rounds, until the table is full. A pick is
    ``table[key % table_size]``: O(1), no allocation. Removing one of N hosts moves about 1/N of the keys.
    """

    __slots__ = ("_table", "max_entries_per_host", "min_entries_per_host", "table_size")

    def __init__(
        self, rng: random.Random | None = None, *, table_size: int = 65537, panic_threshold: float = 50.0
    ) -> None:
        super().__init__(rng, panic_threshold=panic_threshold)
        self.table_size = table_size
        """Must be prime (the config parser checks); every skip is then coprime with it."""
        self._table: list[Host] = []
        self.min_entries_per_host = 0
        """Fewest table slots any host owns (gauge ``maglev_lb.min_entries_per_host``)."""
        self.max_entries_per_host = 0
        """Most table slots any host owns (gauge ``maglev_lb.max_entries_per_host``)."""

    def _rebuild(self, candidates: list[Host]) -> None:
        self._table = []
        self.min_entries_per_host = self.max_entries_per_host = 0
        if not candidates:
            return
        m = self.table_size
        hosts = sorted(candidates, key=lambda h: h.address_text)
        n = len(hosts)
        offsets: list[int] = []
        skips: list[int] = []
        for h in hosts:
            digest = blake2b(h.address_text.encode(), digest_size=16).digest()
            offsets.append(int.from_bytes(digest[:8], "little") % m)
            skips.append(int.from_bytes(digest[8:], "little") % (m - 1) + 1)
        positions = offsets[:]  # slot of each host's next permutation entry: offset + next * skip (mod m)
        # Integer form of Envoy's float test `iteration * w_i < target_i` (target grows by max_w per turn).
        weights = [h.weight for h in hosts]
        weighted = not _uniform(hosts)
        max_w = max(weights)
        targets = [0] * n
        table: list[Host | None] = [None] * m
        # Probing gets slow as the table fills (1/free_fraction probes per claim, m*ln(m) in all). Once only
        # `tail` slots are free, each host instead walks the free slots sorted by their position in its own
        # permutation (k = (slot - offset) / skip mod m): the same claims, found without probing. Where the
        # switch happens does not change the result, only the build time.
        tail = max(64, m // (8 * n))
        free = m
        if not weighted:  # the common case, without per-turn weight bookkeeping
            while free - n > tail:
                for i in range(n):
                    c = positions[i]
                    skip = skips[i]
                    while table[c] is not None:
                        c = (c + skip) % m
                    table[c] = hosts[i]
                    positions[i] = (c + skip) % m
                free -= n
        orders: list[list[int]] = []
        cursors = [0] * n
        iteration = 1
        while free:
            probing = free > tail
            if not probing and not orders:
                orders = self._tail_orders(table, offsets, skips)
            for i in range(n):
                if weighted:
                    if iteration * weights[i] < targets[i]:
                        continue
                    targets[i] += max_w
                if probing:
                    c = positions[i]
                    skip = skips[i]
                    while table[c] is not None:
                        c = (c + skip) % m
                    table[c] = hosts[i]
                    positions[i] = (c + skip) % m
                else:
                    order = orders[i]
                    k = cursors[i]
                    while table[order[k] % m] is not None:
                        k += 1
                    table[order[k] % m] = hosts[i]
                    cursors[i] = k + 1
                free -= 1
                if not free:
                    break
            iteration += 1
        counts = Counter(table)
        self._table = table  # type: ignore[assignment]  # full: no None left
        self.min_entries_per_host = min(counts.values())
        self.max_entries_per_host = max(counts.values())

    def _tail_orders(self, table: list[Host | None], offsets: list[int], skips: list[int]) -> list[list[int]]:
        """For each host, the free slots in the order its permutation visits them, each encoded as
        ``k * m + slot`` (one int per entry sorts fast; ``% m`` gives the slot back)."""
        m = self.table_size
        free_slots = [f for f in range(m) if table[f] is None]
        orders = []
        for offset, skip in zip(offsets, skips, strict=True):
            inverse = pow(skip, -1, m)
            orders.append(sorted([(f - offset) * inverse % m * m + f for f in free_slots]))
        return orders

    def choose(self, hosts: Sequence[Host], hash_key: int | bytes | None = None) -> Host | None:
        self._prepare(hosts)
        table = self._table
        if not table:
            return None
        if hash_key is None:
            hash_key = self.random.getrandbits(64)
        elif isinstance(hash_key, bytes):
            hash_key = _hash64(hash_key)
        return table[hash_key % self.table_size]

    def __repr__(self) -> str:
        return (
            f"<MaglevLb table_size={self.table_size} entries_per_host={self.min_entries_per_host}.."
            f"{self.max_entries_per_host}{' panic' if self._panic else ''} panic_total={self.panic_total}>"
        )


# ============================================================================================ factory
_POLICIES: dict[str, type[RoundRobinLb | LeastRequestLb | RandomLb | RingHashLb | MaglevLb]] = {
    "ROUND_ROBIN": RoundRobinLb,
    "LEAST_REQUEST": LeastRequestLb,
    "RANDOM": RandomLb,
    "RING_HASH": RingHashLb,
    "MAGLEV": MaglevLb,
}


def make_lb(
    policy: str, config: LbConfig | random.Random | None = None, rng: random.Random | None = None
) -> LoadBalancer:
    """The balancer for a cluster's ``lb_policy`` (``ROUND_ROBIN``, ``LEAST_REQUEST``, ``RANDOM``,
    ``RING_HASH``, ``MAGLEV``) configured from ``config`` (None: Envoy's defaults).

    For backwards compatibility a ``random.Random`` passed as ``config`` is taken as ``rng``
    (the old signature was ``make_lb(policy, rng)``); new callers pass ``rng=`` by keyword.
    """
    if isinstance(config, random.Random):
        config, rng = None, config
    if config is None:  # every balancer's constructor defaults are Envoy's (no config module import)
        cls = _POLICIES.get(policy)
        if cls is None:
            raise ValueError(f"unsupported lb_policy {policy!r}")
        return cls(rng)
    cfg = config
    panic = cfg.healthy_panic_threshold
    if policy == "ROUND_ROBIN":
        return RoundRobinLb(rng, panic_threshold=panic)
    if policy == "LEAST_REQUEST":
        lr = cfg.least_request_lb_config
        return LeastRequestLb(
            rng,
            choice_count=lr.choice_count,
            active_request_bias=lr.active_request_bias,
            panic_threshold=panic,
        )
    if policy == "RANDOM":
        return RandomLb(rng, panic_threshold=panic)
    if policy == "RING_HASH":
        ring = cfg.ring_hash_lb_config
        return RingHashLb(
            rng,
            minimum_ring_size=ring.minimum_ring_size,
            maximum_ring_size=ring.maximum_ring_size,
            panic_threshold=panic,
        )
    if policy == "MAGLEV":
        return MaglevLb(rng, table_size=cfg.maglev_lb_config.table_size, panic_threshold=panic)
    raise ValueError(f"unsupported lb_policy {policy!r}")
