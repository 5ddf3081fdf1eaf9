"""Outlier detection: passive health checking of a cluster's hosts, as Envoy does it (sans-IO).

Theory of operation
-------------------
The router reports every result of every attempt to the cluster's ``OutlierDetector``:

* ``report_http(host, status, now)``: the upstream answered (an *externally originated* result). A 5xx
  counts toward ``consecutive_5xx``, a 502/503/504 also toward ``consecutive_gateway_failure`` (another 5xx
  resets only the gateway count); anything else resets both. Every answer goes into the host's success-rate
  bucket of the current interval (a 5xx is a failure).
* ``report_local(host, result, now)``: what happened *locally* (Envoy's ``LOCAL_ORIGIN_*`` results):
  ``"connect_success"``, ``"connect_failed"``, ``"timeout"``, ``"connect_success_final"``. With
  ``split_external_local_origin_errors: false`` (the default) they are mapped to HTTP codes as Envoy does:
  connect_failed -> 503, timeout -> 504, connect_success_final -> 200, connect_success -> nothing (the answer
  that follows is reported). With ``true`` they feed their own counter ``consecutive_local_origin_failure``
  and their own (local-origin) success-rate bucket instead, and 5xx answers count only as external results.

A consecutive count reaching its threshold ejects the host at once (if it is not ejected already); the count
is reset afterwards whatever the outcome. ``tick(now)`` is Envoy's interval timer (the caller runs it every
``config.interval`` seconds): it un-ejects hosts whose time is up, closes the interval's success-rate buckets,
runs the success-rate and failure-percentage analyses on them, publishes ``Host.success_rate`` /
``Host.local_origin_success_rate`` and lowers the ejection multiplier of hosts that stayed in service.

Ejection (``_eject``), in Envoy's order:

1. ``max_ejection_percent``: allowed only while ``100 * ejected / hosts < max_ejection_percent`` (so with
   any non-zero value the first host can always be ejected, "at least one host regardless"); otherwise
   ``ejections_overflow`` is counted and nothing happens.
2. ``enforcing_<kind>`` percent: the detection is enforced with that probability (injected ``rng``); a
   detection that is not enforced only counts ``ejections_detected_<kind>``.
3. The host is flagged (``Host.ejected``, shown as ``/failed_outlier_check``), ``on_change()`` is called, and
   its multiplier grows by one (while ``multiplier * base < max + base``). It stays out for
   ``min(base_ejection_time * multiplier, max_ejection_time) + jitter`` (jitter drawn once per ejection from
   ``[0, max_ejection_time_jitter]`` in milliseconds); it returns at the first tick after that.

Success rate (per interval, over hosts with at least ``success_rate_request_volume`` requests, needing at
least ``success_rate_minimum_hosts`` such hosts): ``threshold = mean - stdev * success_rate_stdev_factor /
1000`` (population standard deviation); hosts below it are outliers. Failure percentage: hosts with at least
``failure_percentage_request_volume`` requests (and at least ``failure_percentage_minimum_hosts`` of them)
whose ``100 - success_rate`` is at least ``failure_percentage_threshold`` are outliers. Both analyses run
for external results and, in split mode, for local-origin results. Already ejected hosts are left out.

Time (``now``, seconds, monotonic) and randomness (``rng``) are inputs; nothing here does I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from microenvoy.admin.stats import Counter, Scope
from microenvoy.config.outlier import OutlierDetection
from microenvoy.upstream.host import Host

__all__ = ["EJECTION_KINDS", "LOCAL_RESULTS", "HostOutlierState", "OutlierDetector", "success_rate_threshold"]

EJECTION_KINDS: tuple[str, ...] = (
    "consecutive_5xx",
    "consecutive_gateway_failure",
    "success_rate",
    "consecutive_local_origin_failure",
    "local_origin_success_rate",
    "failure_percentage",
    "local_origin_failure_percentage",
)
"""Envoy's ejection types, spelled as in its ``ejections_{detected,enforced}_<kind>`` stat names."""

LOCAL_RESULTS: tuple[str, ...] = ("connect_success", "connect_failed", "timeout", "connect_success_final")
"""The locally originated results ``report_local`` takes (Envoy's ``LOCAL_ORIGIN_*``)."""

_UNSPLIT_CODES: dict[str, int | None] = {
    "connect_success": None,  # the answer that follows is reported on its own
    "connect_failed": 503,
    "timeout": 504,
    "connect_success_final": 200,
}
"""How Envoy maps local results to HTTP codes when local and external errors are not split."""

_GATEWAY_ERRORS = frozenset((502, 503, 504))


class _Bucket:
    """Success-rate counts of one result origin: the running interval and the last closed one."""

    __slots__ = ("last_success", "last_total", "success", "total")

    def __init__(self) -> None:
        self.total = 0
        self.success = 0
        self.last_total = 0
        self.last_success = 0

    def roll(self) -> None:
        """Close the running interval (it becomes ``last_*``) and start an empty one."""
        self.last_total, self.last_success = self.total, self.success
        self.total = self.success = 0

    def last_rate(self) -> float | None:
        """Success rate (percent) of the last closed interval; None without requests."""
        if not self.last_total:
            return None
        return self.last_success * 100.0 / self.last_total


class HostOutlierState:
    """The detector's bookkeeping for one host (read-only for callers: admin pages and tests)."""

    __slots__ = (
        "consecutive_5xx",
        "consecutive_gateway_failure",
        "consecutive_local_origin_failure",
        "ejected",
        "external",
        "jitter",
        "last_ejection_time",
        "last_unejection_time",
        "local_origin",
        "multiplier",
        "num_ejections",
    )

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway_failure = 0
        self.consecutive_local_origin_failure = 0
        self.ejected = False
        """Ejected by this detector (mirrored to ``Host.ejected``)."""
        self.external = _Bucket()
        self.local_origin = _Bucket()
        self.multiplier = 0
        """Envoy's ejection time backoff: +1 per ejection, -1 per interval spent back in service."""
        self.num_ejections = 0
        self.jitter = 0.0
        """Seconds added to the current ejection."""
        self.last_ejection_time: float | None = None
        self.last_unejection_time: float | None = None

    def __repr__(self) -> str:
        state = "ejected" if self.ejected else "in service"
        return (
            f"<HostOutlierState {state} x{self.multiplier} 5xx={self.consecutive_5xx}"
            f" gw={self.consecutive_gateway_failure} local={self.consecutive_local_origin_failure}>"
        )


class OutlierDetector:
    """One cluster's outlier detector; owns ``Host.ejected`` of the hosts it tracks."""

    __slots__ = (
        "_active",
        "_deprecated_consecutive_5xx",
        "_deprecated_success_rate",
        "_detected",
        "_enforced",
        "_enforced_total",
        "_enforcing",
        "_gauge_active",
        "_overflow",
        "_states",
        "_total",
        "config",
        "local_origin_success_rate_average",
        "local_origin_success_rate_ejection_threshold",
        "on_change",
        "rng",
        "success_rate_average",
        "success_rate_ejection_threshold",
    )

    def __init__(
        self,
        config: OutlierDetection,
        scope: Scope,
        rng: random.Random,
        on_change: Callable[[], None],
    ) -> None:
        self.config = config
        self.rng = rng
        self.on_change = on_change
        """Called after every ejection and un-ejection (the cluster refreshes whatever depends on hosts)."""
        self._states: dict[Host, HostOutlierState] = {}
        self._active = 0
        self.success_rate_average = -1.0
        """Mean external success rate of the last analysis (-1: not computed), Envoy's ``/clusters``
        ``outlier::success_rate_average``."""
        self.success_rate_ejection_threshold = -1.0
        """Its ejection threshold (-1: not computed)."""
        self.local_origin_success_rate_average = -1.0
        self.local_origin_success_rate_ejection_threshold = -1.0
        self._gauge_active = scope.gauge("ejections_active")
        self._total = scope.counter("ejections_total")
        self._overflow = scope.counter("ejections_overflow")
        self._enforced_total = scope.counter("ejections_enforced_total")
        self._deprecated_consecutive_5xx = scope.counter("ejections_consecutive_5xx")
        self._deprecated_success_rate = scope.counter("ejections_success_rate")
        self._detected: dict[str, Counter] = {
            k: scope.counter(f"ejections_detected_{k}") for k in EJECTION_KINDS
        }
        self._enforced: dict[str, Counter] = {
            k: scope.counter(f"ejections_enforced_{k}") for k in EJECTION_KINDS
        }
        self._enforcing: dict[str, int] = {
            "consecutive_5xx": config.enforcing_consecutive_5xx,
            "consecutive_gateway_failure": config.enforcing_consecutive_gateway_failure,
            "success_rate": config.enforcing_success_rate,
            "consecutive_local_origin_failure": config.enforcing_consecutive_local_origin_failure,
            "local_origin_success_rate": config.enforcing_local_origin_success_rate,
            "failure_percentage": config.enforcing_failure_percentage,
            "local_origin_failure_percentage": config.enforcing_failure_percentage_local_origin,
        }

    # -- membership ----------------------------------------------------------------------------
    def hosts_changed(self, hosts: Sequence[Host]) -> None:
        """The cluster's current host list: new hosts are tracked (in service), missing ones forgotten.

        A forgotten host that was ejected leaves ``ejections_active`` and has its ``ejected`` flag cleared
        (it is no longer ours to manage); no ``on_change()`` is called for membership changes.
        """
        current = set(hosts)
        for host in hosts:
            if host not in self._states:
                self._states[host] = HostOutlierState()
                host.ejected = False
        for host in [h for h in self._states if h not in current]:
            self._forget(host)

    def close(self) -> None:
        """The cluster is going away: forget every host (``ejections_active`` drops by our ejections)."""
        for host in list(self._states):
            self._forget(host)

    def _forget(self, host: Host) -> None:
        state = self._states.pop(host)
        if state.ejected:
            self._active -= 1
            self._gauge_active.dec()
            host.ejected = False

    @property
    def ejected_count(self) -> int:
        """Hosts currently ejected by this detector."""
        return self._active

    def host_state(self, host: Host) -> HostOutlierState | None:
        """The detector's state for ``host`` (None if not tracked); do not modify it."""
        return self._states.get(host)

    # -- results -------------------------------------------------------------------------------
    def report_http(self, host: Host, status: int, now: float) -> None:
        """An answer from the upstream (externally originated result) with HTTP ``status``."""
        state = self._states.get(host)
        if state is not None:
            self._put_http(host, state, status, now)

    def report_local(self, host: Host, result: str, now: float) -> None:
        """A locally originated result, one of ``LOCAL_RESULTS``; another value raises ``ValueError``."""
        if result not in _UNSPLIT_CODES:
            raise ValueError(f"unknown local-origin result {result!r} (expected one of {LOCAL_RESULTS})")
        state = self._states.get(host)
        if state is None:
            return
        if not self.config.split_external_local_origin_errors:
            code = _UNSPLIT_CODES[result]
            if code is not None:
                self._put_http(host, state, code, now)
            return
        bucket = state.local_origin
        bucket.total += 1
        if result in ("connect_success", "connect_success_final"):
            bucket.success += 1
            state.consecutive_local_origin_failure = 0
            return
        state.consecutive_local_origin_failure += 1
        if state.consecutive_local_origin_failure == self.config.consecutive_local_origin_failure:
            self._consecutive(host, state, "consecutive_local_origin_failure", now)

    def report_health_check(self, host: Host, healthy: bool, now: float) -> None:
        """An active health check finished: a pass un-ejects an ejected host (unless
        ``successful_active_health_check_uneject_host`` is false), as Envoy does."""
        state = self._states.get(host)
        if (
            state is not None
            and state.ejected
            and healthy
            and host.healthy
            and self.config.successful_active_health_check_uneject_host
        ):
            self._uneject(host, state, now)

    def _put_http(self, host: Host, state: HostOutlierState, status: int, now: float) -> None:
        state.external.total += 1
        if 500 <= status <= 599:
            if status in _GATEWAY_ERRORS:
                state.consecutive_gateway_failure += 1
                if state.consecutive_gateway_failure == self.config.consecutive_gateway_failure:
                    self._consecutive(host, state, "consecutive_gateway_failure", now)
            else:
                state.consecutive_gateway_failure = 0
            state.consecutive_5xx += 1
            if state.consecutive_5xx == self.config.consecutive_5xx:
                self._consecutive(host, state, "consecutive_5xx", now)
        else:
            state.external.success += 1
            state.consecutive_5xx = 0
            state.consecutive_gateway_failure = 0

    def _consecutive(self, host: Host, state: HostOutlierState, kind: str, now: float) -> None:
        """A consecutive-error threshold was reached (Envoy's ``onConsecutiveErrorWorker``)."""
        if state.ejected:
            return  # counts keep running; they are reset when the host returns
        self._detected[kind].inc()
        self._eject(host, state, kind, now)
        if kind == "consecutive_5xx":
            self._deprecated_consecutive_5xx.inc()
            state.consecutive_5xx = 0
        elif kind == "consecutive_gateway_failure":
            state.consecutive_gateway_failure = 0
        else:
            state.consecutive_local_origin_failure = 0

    # -- ejection ------------------------------------------------------------------------------
    def _enforce(self, kind: str) -> bool:
        percent = self._enforcing[kind]
        if percent >= 100:
            return True
        if percent <= 0:
            return False
        return self.rng.randrange(100) < percent

    def _eject(self, host: Host, state: HostOutlierState, kind: str, now: float) -> None:
        if 100 * self._active >= self.config.max_ejection_percent * len(self._states):
            self._overflow.inc()
            return
        if kind in ("consecutive_5xx", "success_rate"):
            self._total.inc()  # Envoy's deprecated total counts only these two kinds
        if not self._enforce(kind):
            return
        self._active += 1
        self._gauge_active.inc()
        self._enforced_total.inc()
        self._enforced[kind].inc()
        state.ejected = True
        host.ejected = True
        state.num_ejections += 1
        state.last_ejection_time = now
        jitter_ms = round(self.config.max_ejection_time_jitter * 1000)
        state.jitter = self.rng.randrange(jitter_ms + 1) / 1000.0 if jitter_ms > 0 else 0.0
        base = self.config.base_ejection_time
        if state.multiplier * base < self._max_ejection_time() + base:
            state.multiplier += 1
        self.on_change()

    def _uneject(self, host: Host, state: HostOutlierState, now: float) -> None:
        self._active -= 1
        self._gauge_active.dec()
        state.ejected = False
        host.ejected = False
        state.consecutive_5xx = 0
        state.consecutive_gateway_failure = 0
        state.consecutive_local_origin_failure = 0
        state.last_unejection_time = now
        self.on_change()

    def _max_ejection_time(self) -> float:
        return max(self.config.base_ejection_time, self.config.max_ejection_time)

    def ejection_time(self, host: Host) -> float | None:
        """How long ``host``'s current ejection lasts in seconds (None if it is not ejected)."""
        state = self._states.get(host)
        if state is None or not state.ejected:
            return None
        base = self.config.base_ejection_time
        return min(base * state.multiplier, self._max_ejection_time()) + state.jitter

    # -- the interval --------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """The periodic sweep (every ``config.interval``): un-eject, analyse the interval, relax backoff."""
        for host, state in list(self._states.items()):
            if state.ejected and state.last_ejection_time is not None:
                duration = self.ejection_time(host)
                if duration is not None and duration <= now - state.last_ejection_time:
                    self._uneject(host, state, now)
            state.external.roll()
            state.local_origin.roll()
            host.success_rate = -1.0
            host.local_origin_success_rate = -1.0
        self._analyse(local=False, now=now)
        self._analyse(local=True, now=now)
        for state in self._states.values():
            if (
                not state.ejected
                and state.multiplier > 0
                and state.last_unejection_time is not None
                and now - state.last_unejection_time >= self.config.interval
            ):
                state.multiplier -= 1

    def _analyse(self, *, local: bool, now: float) -> None:
        """Success-rate and failure-percentage ejections for one result origin (Envoy's
        ``processSuccessRateEjections``)."""
        cfg = self.config
        self._publish(local, -1.0, -1.0)
        n = len(self._states)
        if n < cfg.success_rate_minimum_hosts and n < cfg.failure_percentage_minimum_hosts:
            return
        min_volume = min(cfg.success_rate_request_volume, cfg.failure_percentage_request_volume)
        for_sr: list[tuple[Host, float]] = []
        for_fp: list[tuple[Host, float]] = []
        for host, state in self._states.items():
            if state.ejected:
                continue
            bucket = state.local_origin if local else state.external
            rate = bucket.last_rate()
            if rate is None:
                continue
            volume = bucket.last_total
            if volume >= min_volume:
                if local:
                    host.local_origin_success_rate = rate
                else:
                    host.success_rate = rate
            if volume >= cfg.success_rate_request_volume:
                for_sr.append((host, rate))
            if volume >= cfg.failure_percentage_request_volume:
                for_fp.append((host, rate))

        if for_sr and len(for_sr) >= cfg.success_rate_minimum_hosts:
            average, threshold = success_rate_threshold(
                [rate for _, rate in for_sr], cfg.success_rate_stdev_factor / 1000.0
            )
            self._publish(local, average, threshold)
            kind = "local_origin_success_rate" if local else "success_rate"
            for host, rate in for_sr:
                outlier = self._states.get(host)  # on_change() may have changed the membership
                if outlier is not None and rate < threshold:
                    self._deprecated_success_rate.inc()
                    self._detected[kind].inc()
                    self._eject(host, outlier, kind, now)

        if for_fp and len(for_fp) >= cfg.failure_percentage_minimum_hosts:
            kind = "local_origin_failure_percentage" if local else "failure_percentage"
            for host, rate in for_fp:
                outlier = self._states.get(host)
                if outlier is None or outlier.ejected:
                    continue  # gone, or just ejected for its success rate
                if 100.0 - rate >= cfg.failure_percentage_threshold:
                    self._detected[kind].inc()
                    self._eject(host, outlier, kind, now)

    def _publish(self, local: bool, average: float, threshold: float) -> None:
        if local:
            self.local_origin_success_rate_average = average
            self.local_origin_success_rate_ejection_threshold = threshold
        else:
            self.success_rate_average = average
            self.success_rate_ejection_threshold = threshold

    def __repr__(self) -> str:
        return f"<OutlierDetector hosts={len(self._states)} ejected={self._active}>"


def success_rate_threshold(rates: Sequence[float], stdev_factor: float) -> tuple[float, float]:
    """``(mean, mean - stdev_factor * stdev)`` of ``rates`` (population standard deviation), Envoy's
    ``successRateEjectionThreshold``: rates 50, 100, 100, 100, 100 with factor 1.9 give (90, 52).

    When every rate is the same the threshold is exactly that rate (no float residue can put an equal host
    below it).
    """
    n = len(rates)
    mean = math.fsum(rates) / n
    if min(rates) == max(rates):
        return rates[0], rates[0]
    variance = math.fsum((r - mean) ** 2 for r in rates) / n
    return mean, mean - stdev_factor * math.sqrt(variance)
