"""Load balancers and hosts: weights, interleaving, least-request preference, panic mode, determinism."""

from __future__ import annotations

import collections
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.upstream.host import Host
from microenvoy.upstream.lb import LeastRequestLb, RandomLb, RoundRobinLb, make_lb


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
