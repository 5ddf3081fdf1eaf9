"""Load balancers and hosts: weights, interleaving, least-request preference, panic mode, consistent
hashing (spread and disruption), lazy rebuilds, determinism."""

from __future__ import annotations

import collections
import hashlib
import math
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microenvoy.config.lb import (
    HashPolicy,
    HeaderHash,
    LbConfig,
    LeastRequestLbConfig,
    MaglevLbConfig,
    RingHashLbConfig,
)
from microenvoy.core.headers import Headers
from microenvoy.router.hash_policy import compute_hash, hash64
from microenvoy.upstream.host import Host
from microenvoy.upstream.lb import LeastRequestLb, MaglevLb, RandomLb, RingHashLb, RoundRobinLb, make_lb


def hosts(*weights: int) -> list[Host]:
    return [Host((f"10.0.0.{i + 1}", 80), w) for i, w in enumerate(weights)]


def test_host_repr_and_address_text() -> None:
    h = Host(("::1", 8080), weight=0)
    assert h.weight == 1  # clamped
    assert h.address_text == "[::1]:8080"
    assert "healthy" in repr(h)
    h.ejected = True
    assert not h.available
    assert "unavailable" in repr(h)


def test_round_robin_smooth_weighted_sequence() -> None:
    hs = hosts(5, 1, 1)
    lb = RoundRobinLb(random.Random(1))
    picks = [lb.choose(hs) for _ in range(70)]
    counts = collections.Counter(picks)
    assert counts[hs[0]] == 50
    assert counts[hs[1]] == 10
    assert counts[hs[2]] == 10
    # smooth: never more than 3 picks of the heavy host in a row (plain WRR would give 5)
    run = longest = 0
    for p in picks:
        run = run + 1 if p is hs[0] else 0
        longest = max(longest, run)
    assert longest <= 4


def test_round_robin_equal_weights_cycles() -> None:
    hs = hosts(1, 1, 1)
    lb = RoundRobinLb(random.Random(7))
    picks = [lb.choose(hs) for _ in range(9)]
    for i in range(3, 9):
        assert picks[i] is picks[i - 3]
    assert set(picks) == set(hs)


def test_round_robin_random_start_differs_between_seeds() -> None:
    hs = hosts(1, 1, 1, 1, 1, 1, 1, 1)
    firsts = {RoundRobinLb(random.Random(seed)).choose(hs) for seed in range(40)}
    assert len(firsts) > 1


def test_round_robin_skips_unhealthy_and_follows_membership_changes() -> None:
    hs = hosts(1, 1, 1)
    hs[1].healthy = False
    lb = RoundRobinLb(random.Random(0))
    assert hs[1] not in {lb.choose(hs) for _ in range(20)}
    hs2 = hs[:1]
    assert {lb.choose(hs2) for _ in range(5)} == {hs[0]}


def test_empty_and_single() -> None:
    for lb in (RoundRobinLb(random.Random(0)), LeastRequestLb(random.Random(0)), RandomLb(random.Random(0))):
        assert lb.choose([]) is None
        h = hosts(3)
        assert lb.choose(h) is h[0]


def test_panic_mode_uses_all_hosts_when_most_are_unhealthy() -> None:
    hs = hosts(1, 1, 1, 1)
    for h in hs[:3]:
        h.healthy = False
    lb = RoundRobinLb(random.Random(0))
    picked = {lb.choose(hs) for _ in range(40)}
    assert picked == set(hs)  # 25 % healthy < 50 % threshold -> panic
    assert lb.panic_total == 40
    hs[0].healthy = hs[1].healthy = True  # 75 % healthy -> normal
    lb.hosts_changed()
    picked = {lb.choose(hs) for _ in range(40)}
    assert picked == {hs[0], hs[1], hs[3]}
    assert lb.panic_total == 40


def test_all_unhealthy_still_picks_in_panic() -> None:
    hs = hosts(1, 1)
    for h in hs:
        h.healthy = False
    assert LeastRequestLb(random.Random(0)).choose(hs) in hs


def test_least_request_prefers_idle_host() -> None:
    hs = hosts(1, 1)
    hs[0].rq_active = 10
    lb = LeastRequestLb(random.Random(3))
    counts = collections.Counter(lb.choose(hs) for _ in range(400))
    # P2C picks the busy host only when both samples hit it (~25 %)
    assert counts[hs[1]] > 250
    assert counts[hs[0]] < 150


def test_least_request_weights_active_requests() -> None:
    hs = hosts(10, 1)
    hs[0].rq_active = 5  # (5+1)/10 = 0.6 < (0+1)/1
    lb = LeastRequestLb(random.Random(5), choice_count=5)
    counts = collections.Counter(lb.choose(hs) for _ in range(200))
    assert counts[hs[0]] > counts[hs[1]]


def test_random_honours_weights() -> None:
    hs = hosts(9, 1)
    lb = RandomLb(random.Random(11))
    counts = collections.Counter(lb.choose(hs) for _ in range(2000))
    assert 1650 < counts[hs[0]] < 1950


def test_make_lb() -> None:
    assert isinstance(make_lb("ROUND_ROBIN"), RoundRobinLb)
    assert isinstance(make_lb("LEAST_REQUEST"), LeastRequestLb)
    assert isinstance(make_lb("RANDOM"), RandomLb)
    with pytest.raises(ValueError, match="CLUSTER_PROVIDED"):
        make_lb("CLUSTER_PROVIDED")
    assert "panic_total=0" in repr(make_lb("RANDOM"))


@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8), st.integers(0, 2**32))
def test_round_robin_is_exactly_proportional_over_a_full_cycle(weights: list[int], seed: int) -> None:
    hs = hosts(*weights)
    lb = RoundRobinLb(random.Random(seed))
    total = sum(weights)
    lb.choose(hs)  # warm-up pick; the cycle property holds over any window of `total` picks after it
    counts = collections.Counter(lb.choose(hs) for _ in range(total * 3))
    for h, w in zip(hs, weights, strict=True):
        assert counts[h] == 3 * w


@given(st.integers(0, 2**32))
def test_same_seed_same_choices(seed: int) -> None:
    hs = hosts(1, 2, 3)
    for cls in (RoundRobinLb, LeastRequestLb, RandomLb):
        a, b = cls(random.Random(seed)), cls(random.Random(seed))
        assert [a.choose(hs) for _ in range(10)] == [b.choose(hs) for _ in range(10)]


# ================================================================================ hosts_changed, panic
def test_cached_candidates_follow_hosts_changed_and_new_lists() -> None:
    hs = hosts(1, 1, 1)
    lb = RandomLb(random.Random(0))
    assert {lb.choose(hs) for _ in range(50)} == set(hs)
    hs[2].ejected = True  # without hosts_changed() the cached candidate set is still used
    assert hs[2] in {lb.choose(hs) for _ in range(50)}
    lb.hosts_changed()
    assert {lb.choose(hs) for _ in range(50)} == {hs[0], hs[1]}
    fewer = hs[:1]  # a different list object is noticed without hosts_changed()
    assert {lb.choose(fewer) for _ in range(10)} == {hs[0]}
    hs.append(Host(("10.0.0.9", 80)))  # so is a length change of the same list
    assert hs[3] in {lb.choose(hs) for _ in range(80)}


@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV"])
def test_every_policy_skips_unavailable_hosts_and_panics(policy: str) -> None:
    hs = hosts(1, 2, 3, 4)
    lb = make_lb(policy, LbConfig(maglev_lb_config=MaglevLbConfig(table_size=1009)), random.Random(3))
    hs[1].healthy = False
    lb.hosts_changed()
    picked = {lb.choose(hs, k * 0x9E3779B97F4A7C15 % 2**64) for k in range(200)}
    assert picked == {hs[0], hs[2], hs[3]}
    assert lb.panic_total == 0
    for h in hs[:3]:
        h.ejected = True
    lb.hosts_changed()
    picked = {lb.choose(hs, k * 0x9E3779B97F4A7C15 % 2**64) for k in range(400)}
    assert picked == set(hs)  # 25 % available < 50 %: panic, all hosts
    assert lb.panic_total == 400
    assert "panic" in repr(lb)


@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV"])
def test_panic_threshold_zero_disables_panic(policy: str) -> None:
    hs = hosts(1, 1, 1, 1)
    lb = make_lb(policy, LbConfig(healthy_panic_threshold=0.0, maglev_lb_config=MaglevLbConfig(251)))
    for h in hs[1:]:
        h.healthy = False
    lb.hosts_changed()
    assert {lb.choose(hs, k * 0x9E3779B97F4A7C15 % 2**64) for k in range(50)} == {hs[0]}
    hs[0].healthy = False
    lb.hosts_changed()
    assert lb.choose(hs, 1) is None
    assert lb.panic_total == 0


def test_panic_threshold_from_config_is_honoured() -> None:
    hs = hosts(1, 1, 1, 1)
    hs[0].healthy = hs[1].healthy = False  # 50 % available: not below 50, below 75
    lb = make_lb("ROUND_ROBIN", LbConfig(healthy_panic_threshold=75.0), random.Random(0))
    assert {lb.choose(hs) for _ in range(20)} == set(hs)
    lb = make_lb("ROUND_ROBIN", None, random.Random(0))
    assert {lb.choose(hs) for _ in range(20)} == {hs[2], hs[3]}


def test_make_lb_reads_config_and_accepts_the_old_positional_rng() -> None:
    cfg = LbConfig(
        healthy_panic_threshold=10.0,
        ring_hash_lb_config=RingHashLbConfig(minimum_ring_size=64, maximum_ring_size=128),
        maglev_lb_config=MaglevLbConfig(table_size=251),
        least_request_lb_config=LeastRequestLbConfig(choice_count=3, active_request_bias=0.5),
    )
    ring = make_lb("RING_HASH", cfg)
    assert isinstance(ring, RingHashLb)
    assert (ring.minimum_ring_size, ring.maximum_ring_size, ring.panic_threshold) == (64, 128, 10.0)
    maglev = make_lb("MAGLEV", cfg)
    assert isinstance(maglev, MaglevLb)
    assert maglev.table_size == 251
    lr = make_lb("LEAST_REQUEST", cfg)
    assert isinstance(lr, LeastRequestLb)
    assert (lr.choice_count, lr.active_request_bias) == (3, 0.5)
    old = make_lb("RANDOM", random.Random(4))  # legacy make_lb(policy, rng)
    new = make_lb("RANDOM", rng=random.Random(4))
    hs = hosts(1, 1, 1, 1, 1)
    assert [old.choose(hs) for _ in range(20)] == [new.choose(hs) for _ in range(20)]


# ================================================================================ least request, random
@given(
    st.lists(st.integers(1, 10), min_size=2, max_size=8).filter(lambda w: len(set(w)) > 1),
    st.integers(0, 2**32),
)
def test_least_request_idle_hosts_follow_weights(weights: list[int], seed: int) -> None:
    """EDF with idle hosts: after P picks each host has P*w/W picks, within 2 (its random start phase)."""
    hs = hosts(*weights)
    lb = LeastRequestLb(random.Random(seed))
    total = sum(weights)
    picks = 20 * total
    counts = collections.Counter(lb.choose(hs) for _ in range(picks))
    for h, w in zip(hs, weights, strict=True):
        assert abs(counts[h] - picks * w / total) <= 2


def test_least_request_active_request_bias() -> None:
    hs = hosts(4, 1)
    hs[0].rq_active = 3  # 4 / (3+1) = 1 == 1 / (0+1): an even split with bias 1
    lb = LeastRequestLb(random.Random(1))
    counts = collections.Counter(lb.choose(hs) for _ in range(1000))
    assert abs(counts[hs[0]] - 500) <= 2
    lb = LeastRequestLb(random.Random(1), active_request_bias=0.0)  # bias 0: plain weights, 4:1
    counts = collections.Counter(lb.choose(hs) for _ in range(1000))
    assert abs(counts[hs[0]] - 800) <= 2
    lb = LeastRequestLb(random.Random(1), active_request_bias=2.0)  # 4/16 vs 1: 1:4
    counts = collections.Counter(lb.choose(hs) for _ in range(1000))
    assert abs(counts[hs[0]] - 200) <= 2


def test_least_request_uniform_weights_prefers_fewest_active() -> None:
    hs = hosts(1, 1, 1)
    hs[0].rq_active, hs[1].rq_active = 5, 5
    lb = LeastRequestLb(random.Random(9), choice_count=3)
    counts = collections.Counter(lb.choose(hs) for _ in range(900))
    # the idle host wins unless it is not sampled at all: P = 1 - (2/3)**3 = 0.70
    assert 570 < counts[hs[2]] < 690


@given(st.lists(st.integers(1, 10), min_size=2, max_size=6), st.integers(0, 2**32))
def test_random_follows_weights_statistically(weights: list[int], seed: int) -> None:
    """20000 seeded picks; each host's share within 5 standard deviations of w/W (binomial)."""
    hs = hosts(*weights)
    lb = RandomLb(random.Random(seed))
    n = 20000
    counts = collections.Counter(lb.choose(hs) for _ in range(n))
    total = sum(weights)
    for h, w in zip(hs, weights, strict=True):
        p = w / total
        assert abs(counts[h] - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


# ================================================================================ consistent hashing
RING = RingHashLbConfig(minimum_ring_size=16384)
_rng = random.Random(42)
KEYS = [_rng.getrandbits(64) for _ in range(20000)]


def hosts_at(n: int, weights: list[int] | None = None) -> list[Host]:
    return [Host((f"10.1.{i // 250}.{i % 250 + 1}", 8000 + i), (weights or [1] * n)[i]) for i in range(n)]


def ring_shares(lb: RingHashLb) -> dict[Host, float]:
    """Exact share of the 64-bit key space each host owns (arc lengths, wrapping)."""
    shares: collections.Counter[Host] = collections.Counter()
    hashes, owners = lb._hashes, lb._ring_hosts
    for i, (point, host) in enumerate(zip(hashes, owners, strict=True)):
        prev = hashes[i - 1] if i else hashes[-1] - 2**64
        shares[host] += (point - prev) / 2**64
    return dict(shares)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=6))
def test_ring_hash_spreads_keys_by_weight(weights: list[int]) -> None:
    """With a 16384-point ring each host owns its weight's share of the key space within 20 % (relative);
    the lightest host has >= 540 points, so the share's standard deviation is < 4.3 %."""
    hs = hosts_at(len(weights), weights)
    lb = make_lb("RING_HASH", LbConfig(ring_hash_lb_config=RING), random.Random(0))
    assert isinstance(lb, RingHashLb)
    lb.refresh(hs)
    total = sum(weights)
    shares = ring_shares(lb)
    for h, w in zip(hs, weights, strict=True):
        assert shares[h] == pytest.approx(w / total, rel=0.2)
    counts = collections.Counter(lb.choose(hs, k) for k in KEYS)
    for h in hs:  # picks agree with the arcs (20000 keys: binomial noise < 1 % absolute)
        assert counts[h] / len(KEYS) == pytest.approx(shares[h], abs=0.02)
    assert lb.size >= 16384
    assert lb.min_hashes_per_host <= lb.max_hashes_per_host
    assert sum(shares.values()) == pytest.approx(1.0)


def test_ring_hash_stats_and_ring_size_bounds() -> None:
    lb = RingHashLb(minimum_ring_size=1024)
    lb.refresh(hosts_at(3))  # every host gets minimum_ring_size points, however many hosts there are
    assert (lb.size, lb.min_hashes_per_host, lb.max_hashes_per_host) == (3072, 1024, 1024)
    lb = RingHashLb(minimum_ring_size=1024)
    lb.refresh(hosts_at(2, [1, 3]))  # the lightest gets 1024 points, the heavy one 3x
    assert (lb.size, lb.min_hashes_per_host, lb.max_hashes_per_host) == (4096, 1024, 3072)
    lb = RingHashLb(minimum_ring_size=64, maximum_ring_size=100)
    lb.refresh(hosts_at(2, [1, 199]))  # 12800 points wanted, capped at 100: the lightest host keeps one
    assert lb.size == 100
    assert (lb.min_hashes_per_host, lb.max_hashes_per_host) == (1, 99)
    lb.refresh([])
    assert lb.size == 0
    assert lb.choose([], 5) is None
    assert "RingHashLb size=0" in repr(lb)


def test_maglev_stats() -> None:
    lb = MaglevLb(table_size=65537)
    lb.refresh(hosts_at(3))
    assert (lb.min_entries_per_host, lb.max_entries_per_host) == (21845, 21846)
    assert "entries_per_host=21845..21846" in repr(lb)
    lb.refresh([])
    assert lb.choose([], 5) is None
    assert lb.max_entries_per_host == 0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=8))
def test_maglev_table_follows_weights(weights: list[int]) -> None:
    """Slots owned per host = table_size * w/W within 1 % (relative) plus one turn per host."""
    hs = hosts_at(len(weights), weights)
    lb = MaglevLb(random.Random(0), table_size=10007)
    lb.refresh(hs)
    owned = collections.Counter(lb._table)
    total = sum(weights)
    for h, w in zip(hs, weights, strict=True):
        assert abs(owned[h] - 10007 * w / total) <= 0.01 * 10007 * w / total + len(hs)
    counts = collections.Counter(lb.choose(hs, k) for k in KEYS)
    for h in hs:
        assert counts[h] / len(KEYS) == pytest.approx(owned[h] / 10007, abs=0.02)


def maglev_reference(hs: list[Host], m: int) -> list[Host]:
    """The paper's / Envoy's table construction, written plainly (probing all the way; exact fractions where
    Envoy uses doubles, whose rounding would decide some turns at random)."""
    ordered = sorted(hs, key=lambda h: h.address_text)
    total = sum(h.weight for h in ordered)
    entries = []
    for h in ordered:
        d = hashlib.blake2b(h.address_text.encode(), digest_size=16).digest()
        offset = int.from_bytes(d[:8], "little") % m
        skip = int.from_bytes(d[8:], "little") % (m - 1) + 1
        entries.append(
            {"offset": offset, "skip": skip, "w": Fraction(h.weight, total), "target": Fraction(0), "next": 0}
        )
    max_w = max(e["w"] for e in entries)
    table: list[Host | None] = [None] * m
    filled, iteration = 0, 1
    while filled < m:
        for h, e in zip(ordered, entries, strict=True):
            if filled == m:
                break
            if iteration * e["w"] < e["target"]:
                continue
            e["target"] += max_w
            c = (e["offset"] + e["skip"] * e["next"]) % m
            while table[c] is not None:
                e["next"] += 1
                c = (e["offset"] + e["skip"] * e["next"]) % m
            table[c] = h
            e["next"] += 1
            filled += 1
        iteration += 1
    return table  # type: ignore[return-value]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 6), min_size=1, max_size=12),
    st.sampled_from([2, 3, 5, 7, 13, 251, 1009, 4099]),
)
def test_maglev_fast_build_equals_the_reference_construction(weights: list[int], m: int) -> None:
    hs = hosts_at(len(weights), weights)
    lb = MaglevLb(table_size=m)
    lb.refresh(hs)
    assert lb._table == maglev_reference(hs, m)


def moved_fraction(policy: str, before: list[Host], after: list[Host]) -> float:
    cfg = LbConfig(maglev_lb_config=MaglevLbConfig(table_size=65537))
    a, b = make_lb(policy, cfg), make_lb(policy, cfg)
    return sum(a.choose(before, k) is not b.choose(after, k) for k in KEYS) / len(KEYS)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13])
def test_maglev_adding_or_removing_one_host_moves_about_one_nth(n: int) -> None:
    """Tolerance: moved share <= 1.25/(n+1) + 1 % (ideal 1/(n+1); Maglev trades a little extra
    disruption for its even spread; measured 0.99-1.08x here)."""
    hs = hosts_at(n + 1)
    assert moved_fraction("MAGLEV", hs[:n], hs) <= 1.25 / (n + 1) + 0.01
    assert moved_fraction("MAGLEV", hs, hs[:n]) <= 1.25 / (n + 1) + 0.01
    assert moved_fraction("MAGLEV", hs, hs[1:]) <= 1.25 / (n + 1) + 0.01
    assert moved_fraction("MAGLEV", hs, hs[1:]) >= 0.8 / (n + 1) - 0.01  # the removed host's keys do move


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13])
def test_ring_hash_adding_or_removing_one_host_moves_about_one_nth(n: int) -> None:
    """A host's point count does not depend on the number of hosts, so only the changed host's keys move:
    its arcs' share, ideally 1/(n+1). Tolerance: <= 1.25/(n+1) + 1 % (arc sizes vary around the mean)."""
    hs = hosts_at(n + 1)
    for before, after in ((hs[:n], hs), (hs, hs[:n]), (hs, hs[1:])):
        assert moved_fraction("RING_HASH", before, after) <= 1.25 / (n + 1) + 0.01
    assert moved_fraction("RING_HASH", hs, hs[1:]) >= 0.8 / (n + 1) - 0.01


def test_ring_hash_removal_moves_only_the_removed_hosts_keys() -> None:
    """Every remaining host keeps its point count, so the classic consistent-hashing guarantee holds
    exactly: only the removed host's keys move."""
    hs = hosts_at(12)
    cfg = LbConfig(ring_hash_lb_config=RingHashLbConfig(minimum_ring_size=121))
    a, b = make_lb("RING_HASH", cfg), make_lb("RING_HASH", cfg)
    before = [a.choose(hs, k) for k in KEYS]
    rest = hs[1:]
    after = [b.choose(rest, k) for k in KEYS]
    assert isinstance(a, RingHashLb)
    assert isinstance(b, RingHashLb)
    assert a.min_hashes_per_host == b.min_hashes_per_host == a.max_hashes_per_host == b.max_hashes_per_host
    for x, y in zip(before, after, strict=True):
        assert x is y or x is hs[0]


@pytest.mark.parametrize("policy", ["RING_HASH", "MAGLEV"])
def test_hash_balancers_ignore_host_order_and_use_random_without_a_key(policy: str) -> None:
    hs = hosts_at(5)
    shuffled = hs[::-1]
    a, b = make_lb(policy, rng=random.Random(1)), make_lb(policy, rng=random.Random(1))
    assert [a.choose(hs, k) for k in KEYS[:500]] == [b.choose(shuffled, k) for k in KEYS[:500]]
    counts = collections.Counter(a.choose(hs) for _ in range(2000))  # no key: a random one per pick
    assert set(counts) == set(hs)
    assert min(counts.values()) > 250
    assert a.choose(hs, b"client-1") is a.choose(hs, hash64(b"client-1"))  # bytes keys are hashed


@pytest.mark.parametrize("policy", ["RING_HASH", "MAGLEV"])
def test_hash_balancers_rebuild_only_after_hosts_changed(policy: str) -> None:
    hs = hosts_at(4)
    lb = make_lb(policy)
    builds = 0
    original = type(lb)._rebuild

    def counting(self: object, candidates: list[Host]) -> None:
        nonlocal builds
        builds += 1
        original(self, candidates)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(lb), "_rebuild", counting)
        for k in KEYS[:100]:
            lb.choose(hs, k)
        assert builds == 1
        owner = lb.choose(hs, KEYS[0])
        assert owner is not None
        owner.healthy = False
        assert lb.choose(hs, KEYS[0]) is owner  # not told yet
        lb.hosts_changed()
        assert lb.choose(hs, KEYS[0]) is not owner
        assert builds == 2
        owner.healthy = True
        owner.weight = 50
        lb.hosts_changed()
        lb.choose(hs, 1)
        assert builds == 3


def test_consistent_hash_through_the_hash_policy_of_an_mqtt_client_id() -> None:
    policies = (HashPolicy(header=HeaderHash("x-microenvoy-mqtt-client-id")),)
    lb = make_lb("MAGLEV")
    hs = hosts_at(6)

    def pick(client: bytes) -> Host | None:
        key = compute_hash(
            policies, Headers([(b":path", b"/"), (b"x-microenvoy-mqtt-client-id", client)]), None
        )
        return lb.choose(hs, key)

    assert all(pick(b"sensor-17") is pick(b"sensor-17") for _ in range(5))
    assert len({pick(f"sensor-{i}".encode()) for i in range(60)}) == 6


@given(st.integers(0, 2**32))
def test_same_seed_same_choices_for_every_policy(seed: int) -> None:
    hs = hosts(1, 2, 3)
    for policy in ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV"):
        cfg = LbConfig(maglev_lb_config=MaglevLbConfig(table_size=251))
        a, b = make_lb(policy, cfg, random.Random(seed)), make_lb(policy, cfg, random.Random(seed))
        assert [a.choose(hs) for _ in range(10)] == [b.choose(hs) for _ in range(10)]
