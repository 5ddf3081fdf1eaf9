"""OutlierDetector: Envoy's consecutive-error, success-rate and failure-percentage ejection (fake clock)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microenvoy.admin.stats import Store
from microenvoy.config.outlier import OutlierDetection
from microenvoy.upstream.host import Host
from microenvoy.upstream.outlier import EJECTION_KINDS, OutlierDetector, success_rate_threshold

PREFIX = "cluster.web.outlier_detection."


@dataclass
class Rig:
    det: OutlierDetector
    hosts: list[Host]
    store: Store
    changes: list[frozenset[Host]] = field(default_factory=list)
    """The set of ejected hosts at each on_change() call."""

    def stat(self, name: str) -> int | None:
        return self.store.value(PREFIX + name)

    def ejected(self) -> list[int]:
        return [i for i, h in enumerate(self.hosts) if h.ejected]

    def http(self, i: int, status: int, times: int = 1, now: float = 0.0) -> None:
        for _ in range(times):
            self.det.report_http(self.hosts[i], status, now)

    def local(self, i: int, result: str, times: int = 1, now: float = 0.0) -> None:
        for _ in range(times):
            self.det.report_local(self.hosts[i], result, now)


def rig(n: int = 3, seed: int = 1, **cfg: object) -> Rig:
    store = Store()
    hosts = [Host((f"10.0.0.{i + 1}", 80)) for i in range(n)]
    holder: list[Rig] = []

    def on_change() -> None:
        holder[0].changes.append(frozenset(h for h in hosts if h.ejected))

    det = OutlierDetector(OutlierDetection(**cfg), store.scope(PREFIX), random.Random(seed), on_change)  # type: ignore[arg-type]
    r = Rig(det, hosts, store)
    holder.append(r)
    det.hosts_changed(hosts)
    return r


# ------------------------------------------------------------------------------------ consecutive 5xx


def test_every_envoy_stat_exists_from_the_start() -> None:
    r = rig()
    names = {"ejections_active", "ejections_total", "ejections_overflow", "ejections_enforced_total"}
    for kind in EJECTION_KINDS:
        names |= {f"ejections_enforced_{kind}", f"ejections_detected_{kind}"}
    for name in names:
        assert r.stat(name) == 0, name
    assert "ejections_enforced_local_origin_failure_percentage" in {
        n.removeprefix(PREFIX) for n in r.store.counters
    }


def test_five_consecutive_5xx_eject() -> None:
    r = rig()
    r.http(0, 500, 4)
    assert r.ejected() == []
    r.http(0, 500)
    assert r.ejected() == [0]
    assert not r.hosts[0].available
    assert r.changes == [frozenset({r.hosts[0]})]
    assert r.stat("ejections_active") == 1
    assert r.stat("ejections_detected_consecutive_5xx") == 1
    assert r.stat("ejections_enforced_consecutive_5xx") == 1
    assert r.stat("ejections_enforced_total") == 1
    assert r.stat("ejections_total") == 1
    assert r.stat("ejections_consecutive_5xx") == 1  # Envoy's deprecated counter
    assert r.det.ejected_count == 1
    assert "ejected=1" in repr(r.det)


def test_a_non_5xx_answer_resets_the_count() -> None:
    r = rig()
    for status in (404, 200, 302, 499):
        r.http(0, 500, 4)
        r.http(0, status)
    r.http(0, 500, 4)
    assert r.ejected() == []
    r.http(0, 500)
    assert r.ejected() == [0]


def test_counts_are_per_host() -> None:
    r = rig(max_ejection_percent=100)
    for _ in range(4):
        r.http(0, 500)
        r.http(1, 500)
    assert r.ejected() == []
    r.http(1, 503)
    assert r.ejected() == [1]


def test_consecutive_5xx_threshold_is_configurable_and_zero_disables() -> None:
    r = rig(consecutive_5xx=2)
    r.http(0, 500, 2)
    assert r.ejected() == [0]
    r = rig(consecutive_5xx=0)
    r.http(0, 500, 50)
    assert r.ejected() == []
    assert r.stat("ejections_detected_consecutive_5xx") == 0


# --------------------------------------------------------------------------------- gateway failures


def test_gateway_failures_detected_but_not_enforced_by_default() -> None:
    r = rig(consecutive_5xx=100)
    r.http(0, 502)
    r.http(0, 503)
    r.http(0, 504)
    r.http(0, 503, 2)
    assert r.stat("ejections_detected_consecutive_gateway_failure") == 1
    assert r.stat("ejections_enforced_consecutive_gateway_failure") == 0
    assert r.ejected() == []


def test_gateway_failure_ejection_when_enforced() -> None:
    r = rig(consecutive_5xx=100, enforcing_consecutive_gateway_failure=100)
    r.http(0, 504, 5)
    assert r.ejected() == [0]
    assert r.stat("ejections_enforced_consecutive_gateway_failure") == 1
    assert r.stat("ejections_total") == 0  # Envoy's deprecated total counts only 5xx and success rate
    assert r.stat("ejections_enforced_total") == 1


def test_503s_count_toward_both_gateway_and_5xx() -> None:
    r = rig()  # gateway: detected only; 5xx enforced
    r.http(0, 503, 5)
    assert r.ejected() == [0]
    assert r.stat("ejections_detected_consecutive_gateway_failure") == 1
    assert r.stat("ejections_detected_consecutive_5xx") == 1
    assert r.stat("ejections_enforced_consecutive_5xx") == 1


def test_other_5xx_resets_gateway_count_but_not_5xx_count() -> None:
    r = rig(consecutive_5xx=6, enforcing_consecutive_gateway_failure=100)
    r.http(0, 503, 4)
    r.http(0, 500)  # gateway count back to 0, 5xx count 5
    r.http(0, 502)  # gateway 1, 5xx 6 -> 5xx ejection
    assert r.stat("ejections_detected_consecutive_gateway_failure") == 0
    assert r.stat("ejections_enforced_consecutive_5xx") == 1
    r = rig(consecutive_5xx=100, enforcing_consecutive_gateway_failure=100)
    r.http(0, 503, 4)
    r.http(0, 501)
    r.http(0, 503, 4)
    assert r.ejected() == []
    r.http(0, 503)
    assert r.ejected() == [0]


# ------------------------------------------------------------------------------ local origin results


def test_unsplit_local_results_map_to_503_504_200() -> None:
    r = rig()
    r.local(0, "connect_failed", 3)
    r.local(0, "timeout", 1)
    r.local(0, "connect_success")  # not mapped: does not reset
    assert r.ejected() == []
    r.local(0, "timeout")
    assert r.ejected() == [0]
    assert r.stat("ejections_detected_consecutive_gateway_failure") == 1  # 503/504 are gateway errors
    assert r.stat("ejections_enforced_consecutive_5xx") == 1
    assert r.stat("ejections_detected_consecutive_local_origin_failure") == 0

    r = rig()
    r.local(0, "connect_failed", 4)
    r.local(0, "connect_success_final")  # a 200
    r.local(0, "connect_failed", 4)
    assert r.ejected() == []


def test_unsplit_local_results_feed_the_external_success_rate() -> None:
    r = rig(n=5, success_rate_request_volume=10, failure_percentage_request_volume=10, consecutive_5xx=1000)
    r.local(0, "connect_failed", 10)
    r.local(1, "connect_success_final", 10)
    r.local(2, "connect_success", 10)  # not counted at all
    r.det.tick(10.0)
    assert r.hosts[0].success_rate == 0.0
    assert r.hosts[1].success_rate == 100.0
    assert r.hosts[2].success_rate == -1.0
    assert r.hosts[0].local_origin_success_rate == -1.0


def test_split_local_failures_have_their_own_count() -> None:
    r = rig(split_external_local_origin_errors=True)
    r.local(0, "connect_failed", 2)
    r.local(0, "timeout", 2)
    r.http(0, 500, 4)  # external results do not touch the local count
    assert r.ejected() == []
    r.local(0, "timeout")
    assert r.ejected() == [0]
    assert r.stat("ejections_detected_consecutive_local_origin_failure") == 1
    assert r.stat("ejections_enforced_consecutive_local_origin_failure") == 1
    assert r.stat("ejections_detected_consecutive_5xx") == 0
    assert r.stat("ejections_detected_consecutive_gateway_failure") == 0


def test_split_local_success_resets_only_the_local_count() -> None:
    for success in ("connect_success", "connect_success_final"):
        r = rig(split_external_local_origin_errors=True)
        r.local(0, "connect_failed", 4)
        r.http(0, 500, 4)
        r.local(0, success)
        r.local(0, "connect_failed", 4)
        assert r.ejected() == []
        r.http(0, 500)  # the 5xx count was not reset by a connect success
        assert r.ejected() == [0]


def test_split_local_threshold_and_enforcing() -> None:
    r = rig(
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=2,
        enforcing_consecutive_local_origin_failure=0,
    )
    r.local(0, "connect_failed", 2)
    assert r.ejected() == []
    assert r.stat("ejections_detected_consecutive_local_origin_failure") == 1


def test_unknown_local_result_is_a_programming_error() -> None:
    r = rig()
    with pytest.raises(ValueError, match="unknown local-origin result"):
        r.det.report_local(r.hosts[0], "reset", 0.0)


# ------------------------------------------------------------------------------- max_ejection_percent


def test_at_least_one_host_is_ejected_with_three_hosts_at_ten_percent() -> None:
    r = rig(n=3)  # default 10 %: 1 of 3 is already 33 %
    r.http(0, 500, 5)
    assert r.ejected() == [0]
    r.http(1, 500, 5)
    assert r.ejected() == [0]
    assert r.stat("ejections_overflow") == 1
    assert r.stat("ejections_active") == 1
    assert r.stat("ejections_enforced_total") == 1
    assert r.stat("ejections_detected_consecutive_5xx") == 2
    # once host 0 is back, host 1 may go
    r.det.tick(30.0)
    assert r.ejected() == []
    r.http(1, 500, 5, now=30.0)
    assert r.ejected() == [1]


def test_max_ejection_percent_bounds_the_ejected_share() -> None:
    r = rig(n=4, max_ejection_percent=50)
    for i in range(4):
        r.http(i, 500, 5)
    assert r.ejected() == [0, 1]  # 0 % and 25 % are below 50 %, 50 % is not
    assert r.stat("ejections_overflow") == 2
    r = rig(n=10, max_ejection_percent=25)
    for i in range(10):
        r.http(i, 500, 5)
    assert len(r.ejected()) == 3  # 0, 10, 20 % < 25 %


def test_max_ejection_percent_zero_ejects_nothing() -> None:
    r = rig(max_ejection_percent=0)
    r.http(0, 500, 5)
    assert r.ejected() == []
    assert r.stat("ejections_overflow") == 1
    assert r.stat("ejections_total") == 0


def test_max_ejection_percent_hundred_may_eject_all() -> None:
    r = rig(max_ejection_percent=100)
    for i in range(3):
        r.http(i, 500, 5)
    assert r.ejected() == [0, 1, 2]
    assert r.stat("ejections_overflow") == 0


# ------------------------------------------------------------------------------------ ejection time


def eject_at(r: Rig, i: int, now: float) -> None:
    r.http(i, 500, r.det.config.consecutive_5xx, now=now)
    assert r.hosts[i].ejected


def test_host_returns_at_the_first_tick_after_base_ejection_time() -> None:
    r = rig()
    eject_at(r, 0, 0.0)
    assert r.det.ejection_time(r.hosts[0]) == 30.0
    for t in (10.0, 20.0, 29.999):
        r.det.tick(t)
        assert r.hosts[0].ejected
    r.det.tick(30.0)
    assert not r.hosts[0].ejected
    assert r.hosts[0].available
    assert r.stat("ejections_active") == 0
    assert r.changes == [frozenset({r.hosts[0]}), frozenset()]
    assert r.det.ejection_time(r.hosts[0]) is None


def test_uneject_resets_counts() -> None:
    r = rig(max_ejection_percent=100, consecutive_5xx=5)
    eject_at(r, 0, 0.0)
    r.http(0, 500, 4, now=1.0)  # counts run on while ejected (the host still gets panic traffic)
    r.det.tick(30.0)
    r.http(0, 500, 1, now=31.0)  # would be the 10th: counts restarted at 0 on return
    assert not r.hosts[0].ejected


def test_errors_while_ejected_do_not_eject_again() -> None:
    r = rig()
    eject_at(r, 0, 0.0)
    r.http(0, 500, 20, now=1.0)
    assert r.stat("ejections_detected_consecutive_5xx") == 1
    assert r.stat("ejections_enforced_total") == 1
    assert len(r.changes) == 1


def test_ejection_time_grows_with_each_ejection_and_is_capped() -> None:
    r = rig(base_ejection_time=10.0, max_ejection_time=25.0, interval=1.0)
    durations = []
    now = 0.0
    for _ in range(5):
        eject_at(r, 0, now)
        duration = r.det.ejection_time(r.hosts[0])
        assert duration is not None
        durations.append(duration)
        now += duration
        r.det.tick(now)  # back exactly when its time is up, then ejected again at once
        assert not r.hosts[0].ejected
    assert durations == [10.0, 20.0, 25.0, 25.0, 25.0]
    state = r.det.host_state(r.hosts[0])
    assert state is not None
    # Envoy stops growing the multiplier once multiplier * base >= max + base
    assert state.multiplier == 4
    assert state.num_ejections == 5


def test_ejection_time_without_max_is_capped_at_300s() -> None:
    r = rig(interval=1.0)
    now = 0.0
    durations = []
    for _ in range(12):
        eject_at(r, 0, now)
        d = r.det.ejection_time(r.hosts[0])
        assert d is not None
        durations.append(d)
        now += d
        r.det.tick(now)
    assert durations[:3] == [30.0, 60.0, 90.0]
    assert max(durations) == 300.0
    assert durations[-1] == 300.0


def test_max_below_base_caps_at_base() -> None:
    r = rig(base_ejection_time=60.0, max_ejection_time=10.0)  # built directly: the parser rejects it
    eject_at(r, 0, 0.0)
    eject_time = r.det.ejection_time(r.hosts[0])
    assert eject_time == 60.0


def test_multiplier_decrements_per_healthy_interval() -> None:
    r = rig(interval=10.0, base_ejection_time=10.0)
    eject_at(r, 0, 0.0)
    r.det.tick(10.0)  # back (10 s), multiplier 1
    eject_at(r, 0, 10.0)
    assert r.det.ejection_time(r.hosts[0]) == 20.0
    r.det.tick(20.0)
    r.det.tick(30.0)  # back at 30, multiplier 2
    state = r.det.host_state(r.hosts[0])
    assert state is not None
    assert state.multiplier == 2
    r.det.tick(35.0)  # only 5 s in service: no decrement
    assert state.multiplier == 2
    r.det.tick(40.0)  # a full interval in service
    assert state.multiplier == 1
    r.det.tick(50.0)
    assert state.multiplier == 0
    r.det.tick(60.0)
    assert state.multiplier == 0  # never below zero
    eject_at(r, 0, 60.0)
    assert r.det.ejection_time(r.hosts[0]) == 10.0  # back to the base time


def test_jitter_is_added_to_the_ejection_time() -> None:
    r = rig(seed=7, max_ejection_time_jitter=5.0)
    eject_at(r, 0, 0.0)
    expected_jitter = random.Random(7).randrange(5001) / 1000.0
    assert expected_jitter > 0
    assert r.det.ejection_time(r.hosts[0]) == 30.0 + expected_jitter
    r.det.tick(30.0)
    assert r.hosts[0].ejected
    r.det.tick(30.0 + expected_jitter)
    assert not r.hosts[0].ejected


def test_no_jitter_uses_no_randomness() -> None:
    class NoRandom(random.Random):
        def randrange(self, *args: object, **kwargs: object) -> int:  # type: ignore[override]
            raise AssertionError("randomness used")

    store = Store()
    hosts = [Host(("10.0.0.1", 80))]
    det = OutlierDetector(OutlierDetection(), store.scope(PREFIX), NoRandom(), lambda: None)
    det.hosts_changed(hosts)
    for _ in range(5):
        det.report_http(hosts[0], 500, 0.0)
    assert hosts[0].ejected


# -------------------------------------------------------------------------------------- success rate


def test_success_rate_threshold_envoy_example() -> None:
    mean, threshold = success_rate_threshold([50.0, 100.0, 100.0, 100.0, 100.0], 1.9)
    assert mean == 90.0
    assert threshold == pytest.approx(52.0)


def feed(r: Rig, i: int, ok: int, failed: int, status: int = 500) -> None:
    r.http(i, 200, ok)
    r.http(i, status, failed)


def sr_rig(**cfg: object) -> Rig:
    base: dict[str, object] = {"consecutive_5xx": 10**6, "max_ejection_percent": 100}
    base.update(cfg)
    return rig(n=5, **base)


def test_success_rate_ejects_the_host_below_mean_minus_stdev_times_factor() -> None:
    r = sr_rig()
    feed(r, 0, 50, 50)
    for i in range(1, 5):
        feed(r, i, 100, 0)
    r.det.tick(10.0)
    assert r.ejected() == [0]
    assert r.det.success_rate_average == 90.0
    assert r.det.success_rate_ejection_threshold == pytest.approx(52.0)
    assert [h.success_rate for h in r.hosts] == [50.0, 100.0, 100.0, 100.0, 100.0]
    assert r.stat("ejections_detected_success_rate") == 1
    assert r.stat("ejections_enforced_success_rate") == 1
    assert r.stat("ejections_success_rate") == 1  # deprecated
    assert r.stat("ejections_total") == 1
    assert r.stat("ejections_detected_failure_percentage") == 0  # 50 % failures < 85 %


@pytest.mark.parametrize(("factor", "ejected"), [(1900, [0]), (2100, [])])
def test_stdev_factor(factor: int, ejected: list[int]) -> None:
    # rates 80, 100, 100, 100, 100: mean 96, stdev 8; 1.9 -> 80.8 (80 is below), 2.1 -> 79.2 (it is not)
    r = sr_rig(success_rate_stdev_factor=factor)
    feed(r, 0, 80, 20)
    for i in range(1, 5):
        feed(r, i, 100, 0)
    r.det.tick(10.0)
    assert r.ejected() == ejected
    assert r.det.success_rate_ejection_threshold == pytest.approx(96.0 - 8.0 * factor / 1000)


def test_success_rate_needs_minimum_hosts_with_volume() -> None:
    r = sr_rig()
    feed(r, 0, 0, 100)
    for i in range(1, 4):
        feed(r, i, 100, 0)
    feed(r, 4, 99, 0)  # 99 < success_rate_request_volume: only 4 hosts qualify
    r.det.tick(10.0)
    assert r.ejected() == []
    assert r.det.success_rate_average == -1.0
    assert r.det.success_rate_ejection_threshold == -1.0
    assert r.stat("ejections_detected_success_rate") == 0
    # the rate is still published for every host with at least min(100, 50) requests
    assert [h.success_rate for h in r.hosts] == [0.0, 100.0, 100.0, 100.0, 100.0]


def test_small_volume_publishes_no_rate() -> None:
    r = sr_rig()
    feed(r, 0, 30, 19)  # 49 < min(success_rate_request_volume, failure_percentage_request_volume)
    r.det.tick(10.0)
    assert r.hosts[0].success_rate == -1.0


def test_too_few_hosts_skip_the_analysis() -> None:
    r = rig(n=4, consecutive_5xx=10**6, enforcing_failure_percentage=100)
    feed(r, 0, 0, 100)
    for i in range(1, 4):
        feed(r, i, 100, 0)
    r.det.tick(10.0)
    assert r.ejected() == []
    assert r.hosts[0].success_rate == -1.0  # Envoy publishes nothing when it skips the analysis


def test_success_rate_uses_only_the_last_interval() -> None:
    r = sr_rig()
    feed(r, 0, 0, 100)  # a bad interval ...
    r.det.tick(10.0)  # (host 0 has the only volume: nothing computed)
    assert r.ejected() == []
    for i in range(5):  # ... followed by a good one for everyone
        feed(r, i, 100, 0)
    r.det.tick(20.0)
    assert r.ejected() == []
    assert r.det.success_rate_average == 100.0
    r.det.tick(30.0)  # an empty interval: rates go back to -1
    assert [h.success_rate for h in r.hosts] == [-1.0] * 5
    assert r.det.success_rate_average == -1.0


def test_equal_rates_eject_nobody() -> None:
    r = sr_rig()
    for i in range(5):
        feed(r, i, 67, 33)
    r.det.tick(10.0)
    assert r.ejected() == []
    assert r.det.success_rate_ejection_threshold == 67.0


def test_success_rate_enforcing_zero_detects_only() -> None:
    r = sr_rig(enforcing_success_rate=0)
    feed(r, 0, 50, 50)
    for i in range(1, 5):
        feed(r, i, 100, 0)
    r.det.tick(10.0)
    assert r.ejected() == []
    assert r.stat("ejections_detected_success_rate") == 1
    assert r.stat("ejections_enforced_success_rate") == 0
    assert r.stat("ejections_total") == 1  # Envoy counts it before the enforcing roll


def test_ejected_hosts_are_left_out_of_the_analysis() -> None:
    r = sr_rig(consecutive_5xx=5, success_rate_minimum_hosts=4)
    r.http(0, 500, 5)  # ejected by consecutive 5xx
    feed(r, 0, 0, 100)
    for _ in range(50):  # 50 % without 5 failures in a row
        r.http(1, 200)
        r.http(1, 500)
    for i in range(2, 5):
        feed(r, i, 100, 0)
    r.det.tick(10.0)
    # without host 0 the rates are 50, 100, 100, 100: mean 87.5, stdev 21.65, threshold 46.4: nobody
    assert r.ejected() == [0]
    assert r.det.success_rate_average == 87.5
    assert r.hosts[0].success_rate == -1.0


# -------------------------------------------------------------------------------- failure percentage


def fp_rig(**cfg: object) -> Rig:
    base: dict[str, object] = {"success_rate_request_volume": 10**6, "enforcing_failure_percentage": 100}
    base.update(cfg)
    return sr_rig(**base)


def test_failure_percentage_ejection() -> None:
    r = fp_rig()
    feed(r, 0, 7, 43)  # 86 % failures
    feed(r, 1, 8, 42)  # 84 %
    feed(r, 2, 50, 0)
    feed(r, 3, 50, 0)
    feed(r, 4, 15, 85)  # exactly 85 %: ejected (>=)
    r.det.tick(10.0)
    assert r.ejected() == [0, 4]
    assert r.stat("ejections_detected_failure_percentage") == 2
    assert r.stat("ejections_enforced_failure_percentage") == 2
    assert r.stat("ejections_total") == 0
    assert r.hosts[0].success_rate == 14.0


def test_failure_percentage_is_detected_only_by_default() -> None:
    r = fp_rig(enforcing_failure_percentage=0)
    feed(r, 0, 0, 50)
    for i in range(1, 5):
        feed(r, i, 50, 0)
    r.det.tick(10.0)
    assert r.ejected() == []
    assert r.stat("ejections_detected_failure_percentage") == 1


def test_failure_percentage_needs_volume_and_hosts() -> None:
    r = fp_rig()
    feed(r, 0, 0, 49)  # below failure_percentage_request_volume
    for i in range(1, 5):
        feed(r, i, 50, 0)
    r.det.tick(10.0)
    assert r.ejected() == []
    r = fp_rig(failure_percentage_minimum_hosts=6)
    feed(r, 0, 0, 50)
    for i in range(1, 5):
        feed(r, i, 50, 0)
    r.det.tick(10.0)
    assert r.ejected() == []


def test_a_host_is_not_ejected_twice_in_one_sweep() -> None:
    r = fp_rig(success_rate_request_volume=50)
    feed(r, 0, 0, 100)
    for i in range(1, 5):
        feed(r, i, 100, 0)
    r.det.tick(10.0)
    assert r.ejected() == [0]
    assert r.stat("ejections_enforced_success_rate") == 1
    assert r.stat("ejections_enforced_failure_percentage") == 0
    assert r.stat("ejections_active") == 1


# --------------------------------------------------------------------------- local origin statistics


def test_split_local_origin_success_rate_and_failure_percentage() -> None:
    r = rig(
        n=5,
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=10**6,
        consecutive_5xx=10**6,
        max_ejection_percent=100,
        enforcing_failure_percentage_local_origin=100,
    )
    r.local(0, "connect_failed", 100)  # 0 %: a success-rate outlier (and a failure-percentage one)
    for i in range(1, 5):
        r.local(i, "connect_success", 100)
        r.http(i, 500, 100)  # external failures do not count in local-origin statistics
    r.det.tick(10.0)
    assert r.ejected() == [0]
    assert r.hosts[0].local_origin_success_rate == 0.0
    assert r.hosts[1].local_origin_success_rate == 100.0
    assert r.hosts[1].success_rate == 0.0
    assert r.det.local_origin_success_rate_average == 80.0
    assert r.stat("ejections_detected_local_origin_success_rate") == 1
    assert r.stat("ejections_enforced_local_origin_success_rate") == 1
    assert r.stat("ejections_detected_local_origin_failure_percentage") == 0  # already ejected
    # external: every non-ejected host has 0 %: equal rates, no success-rate outlier
    assert r.stat("ejections_detected_success_rate") == 0


def test_split_local_failure_percentage_kind() -> None:
    r = rig(
        n=5,
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=10**6,
        success_rate_request_volume=10**6,
        max_ejection_percent=100,
        enforcing_failure_percentage_local_origin=100,
    )
    r.local(0, "timeout", 50)
    for i in range(1, 5):
        r.local(i, "connect_success_final", 50)
    r.det.tick(10.0)
    assert r.ejected() == [0]
    assert r.stat("ejections_enforced_local_origin_failure_percentage") == 1
    assert r.stat("ejections_enforced_failure_percentage") == 0


# ------------------------------------------------------------------------------------------ enforcing


def test_enforcing_zero_and_hundred() -> None:
    r = rig(enforcing_consecutive_5xx=0)
    r.http(0, 500, 5)
    assert r.ejected() == []
    assert r.stat("ejections_detected_consecutive_5xx") == 1
    assert r.stat("ejections_enforced_total") == 0
    assert r.stat("ejections_active") == 0
    assert r.changes == []
    r.http(0, 500, 5)  # the count restarted after the detection
    assert r.stat("ejections_detected_consecutive_5xx") == 2


def test_enforcing_percentage_is_a_probability() -> None:
    r = rig(n=400, seed=3, enforcing_consecutive_5xx=30, max_ejection_percent=100)
    for i in range(400):
        r.http(i, 500, 5)
    ejected = len(r.ejected())
    assert 80 <= ejected <= 160  # ~30 % of 400
    assert r.stat("ejections_detected_consecutive_5xx") == 400
    assert r.stat("ejections_enforced_consecutive_5xx") == ejected


# ----------------------------------------------------------------------------------------- membership


def test_hosts_changed_tracks_and_forgets() -> None:
    r = rig(max_ejection_percent=100)
    eject_at(r, 0, 0.0)
    newcomer = Host(("10.0.0.9", 80))
    newcomer.ejected = True  # stale flag from elsewhere: the detector owns it now
    r.det.hosts_changed([r.hosts[1], r.hosts[2], newcomer])
    assert not newcomer.ejected
    assert not r.hosts[0].ejected  # forgotten: no longer ours to hold out
    assert r.stat("ejections_active") == 0
    assert r.det.ejected_count == 0
    assert r.det.host_state(r.hosts[0]) is None
    r.det.report_http(r.hosts[0], 500, 1.0)  # a late result for a removed host is ignored
    r.det.report_local(r.hosts[0], "timeout", 1.0)
    for _ in range(5):
        r.det.report_http(newcomer, 500, 1.0)
    assert newcomer.ejected
    r.det.hosts_changed([r.hosts[1], r.hosts[2], newcomer])  # same list: nothing changes
    assert newcomer.ejected
    assert r.stat("ejections_active") == 1


def test_host_count_for_max_percent_follows_membership() -> None:
    r = rig(n=3, max_ejection_percent=30)
    extra = [Host((f"10.0.1.{i}", 80)) for i in range(7)]
    r.det.hosts_changed(r.hosts + extra)  # 10 hosts: 0, 10, 20 % < 30 %
    for i in range(3):
        r.http(i, 500, 5)
    for h in extra:
        for _ in range(5):
            r.det.report_http(h, 500, 0.0)
    assert sum(h.ejected for h in r.hosts + extra) == 3


def test_close_releases_everything() -> None:
    r = rig(max_ejection_percent=100)
    eject_at(r, 0, 0.0)
    eject_at(r, 1, 0.0)
    assert r.stat("ejections_active") == 2
    r.det.close()
    assert r.stat("ejections_active") == 0
    assert r.ejected() == []
    assert "hosts=0" in repr(r.det)


def test_gauge_is_shared_by_detectors_on_one_scope() -> None:
    store = Store()
    a_hosts = [Host(("10.0.0.1", 80))]
    b_hosts = [Host(("10.0.0.2", 80))]
    a = OutlierDetector(OutlierDetection(), store.scope(PREFIX), random.Random(1), lambda: None)
    b = OutlierDetector(OutlierDetection(), store.scope(PREFIX), random.Random(1), lambda: None)
    a.hosts_changed(a_hosts)
    b.hosts_changed(b_hosts)
    for det, hosts in ((a, a_hosts), (b, b_hosts)):
        for _ in range(5):
            det.report_http(hosts[0], 500, 0.0)
    assert store.value(PREFIX + "ejections_active") == 2
    a.close()  # an old cluster runtime going away leaves the new one's count
    assert store.value(PREFIX + "ejections_active") == 1


# -------------------------------------------------------------------------------- active health check


def test_passing_health_check_unejects() -> None:
    r = rig()
    eject_at(r, 0, 0.0)
    r.det.report_health_check(r.hosts[0], False, 1.0)
    assert r.hosts[0].ejected
    r.det.report_health_check(r.hosts[0], True, 2.0)
    assert not r.hosts[0].ejected
    assert r.stat("ejections_active") == 0
    assert len(r.changes) == 2


def test_health_check_uneject_can_be_disabled() -> None:
    r = rig(successful_active_health_check_uneject_host=False)
    eject_at(r, 0, 0.0)
    r.det.report_health_check(r.hosts[0], True, 2.0)
    assert r.hosts[0].ejected
    r = rig()
    eject_at(r, 0, 0.0)
    r.hosts[0].healthy = False  # still failing active checks: a pass of a stale check is ignored
    r.det.report_health_check(r.hosts[0], True, 2.0)
    assert r.hosts[0].ejected


# ------------------------------------------------------------------------------------------ properties


@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=20), st.integers(0, 5000))
def test_threshold_never_above_the_mean_and_equal_rates_are_safe(rates: list[float], factor: int) -> None:
    mean, threshold = success_rate_threshold(rates, factor / 1000.0)
    assert threshold <= mean + 1e-9
    assert min(rates) - 1e-9 <= mean <= max(rates) + 1e-9
    same = [rates[0]] * len(rates)
    _, t = success_rate_threshold(same, factor / 1000.0)
    assert not any(r < t for r in same)


_ops = st.lists(
    st.tuples(
        st.sampled_from(["http", "local", "tick", "hc"]),
        st.integers(0, 11),
        st.sampled_from([200, 404, 500, 502, 503, 504]),
        st.sampled_from(["connect_success", "connect_failed", "timeout", "connect_success_final"]),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 12),
    percent=st.integers(0, 100),
    split=st.booleans(),
    seed=st.integers(0, 2**16),
    ops=_ops,
)
def test_ejected_count_never_exceeds_the_bound(
    n: int, percent: int, split: bool, seed: int, ops: list[tuple[str, int, int, str]]
) -> None:
    r = rig(
        n=n,
        seed=seed,
        max_ejection_percent=percent,
        split_external_local_origin_errors=split,
        consecutive_5xx=2,
        consecutive_gateway_failure=2,
        consecutive_local_origin_failure=2,
        enforcing_consecutive_gateway_failure=50,
        enforcing_failure_percentage=100,
        success_rate_minimum_hosts=1,
        success_rate_request_volume=2,
        failure_percentage_minimum_hosts=1,
        failure_percentage_request_volume=2,
        base_ejection_time=2.0,
        max_ejection_time=5.0,
        interval=1.0,
        max_ejection_time_jitter=0.5,
    )
    bound = math.ceil(percent * n / 100)  # eject while 100 * ejected / n < percent
    now = 0.0
    previous: frozenset[Host] = frozenset()
    for op, i, status, result in ops:
        host = r.hosts[i % n]
        if op == "http":
            r.det.report_http(host, status, now)
        elif op == "local":
            r.det.report_local(host, result, now)
        elif op == "hc":
            r.det.report_health_check(host, True, now)
        else:
            now += 1.0
            r.det.tick(now)
        ejected = [h for h in r.hosts if h.ejected]
        assert len(ejected) <= bound
        assert r.det.ejected_count == len(ejected) == r.stat("ejections_active")
        for h in r.hosts:
            s = r.det.host_state(h)
            assert s is not None
            assert s.ejected == h.ejected
            assert s.multiplier >= 0
        # every on_change() saw exactly one host flip
        for snapshot in r.changes:
            assert len(snapshot ^ previous) == 1
            previous = snapshot
        r.changes.clear()
        assert previous == frozenset(ejected)
    assert r.stat("ejections_enforced_total") == sum(
        r.stat(f"ejections_enforced_{k}") or 0 for k in EJECTION_KINDS
    )


class _FixedRoll(random.Random):
    """``randrange(100)`` always answers ``roll`` (to pin the enforcing comparison)."""

    def __init__(self, roll: int) -> None:
        super().__init__(0)
        self.roll = roll

    def randrange(self, *args: object, **kwargs: object) -> int:  # type: ignore[override]
        return self.roll


@pytest.mark.parametrize(("roll", "enforced"), [(0, True), (29, True), (30, False), (99, False)])
def test_enforcing_is_roll_below_percent(roll: int, enforced: bool) -> None:
    store = Store()
    hosts = [Host(("10.0.0.1", 80))]
    config = OutlierDetection(enforcing_consecutive_5xx=30)
    det = OutlierDetector(config, store.scope(PREFIX), _FixedRoll(roll), lambda: None)
    det.hosts_changed(hosts)
    for _ in range(5):
        det.report_http(hosts[0], 500, 0.0)
    assert hosts[0].ejected is enforced
