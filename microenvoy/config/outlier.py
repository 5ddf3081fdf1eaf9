"""Outlier detection config: a cluster's ``outlier_detection`` (Envoy's ``cluster.v3.OutlierDetection``).

Field names and defaults are Envoy's. Counts and percentages are ``UInt32Value`` wrappers in Envoy's proto, so
both ``consecutive_5xx: 3`` and ``consecutive_5xx: {value: 3}`` are accepted (proto3 JSON); percentages
(``max_ejection_percent``, ``enforcing_*``, ``failure_percentage_threshold``) must be 0..100. Durations are
seconds here (``"10s"``/``"250ms"`` in YAML); ``interval``, ``base_ejection_time`` and ``max_ejection_time``
must be greater than 0, and ``max_ejection_time`` may not be smaller than ``base_ejection_time`` (when absent
it is ``max(300 s, base_ejection_time)``, as Envoy). The detector using this config is
``microenvoy.upstream.outlier.OutlierDetector``; user docs are in ``docs/outlier-detection.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from microenvoy.config.reader import Reader

__all__ = ["DEFAULT_MAX_EJECTION_TIME", "OutlierDetection", "parse_outlier_detection"]

DEFAULT_MAX_EJECTION_TIME = 300.0
"""Envoy's ``max_ejection_time`` default (seconds), raised to ``base_ejection_time`` if that is larger."""

_UINT32_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Passive health checking of a cluster's hosts (every field as Envoy names it and defaults it)."""

    consecutive_5xx: int = 5
    """Consecutive 5xx answers (and, unsplit, local failures mapped to 503/504) before an ejection."""
    interval: float = 10.0
    """Seconds between analysis sweeps (un-ejections, success-rate and failure-percentage ejections)."""
    base_ejection_time: float = 30.0
    """Seconds a host is ejected for, times its ejection multiplier (grows with each ejection)."""
    max_ejection_percent: int = 10
    """Ejection allowed while fewer than this % of the hosts are ejected (so at least one host, if > 0)."""
    enforcing_consecutive_5xx: int = 100
    """% chance that a detected consecutive-5xx outlier is actually ejected."""
    enforcing_success_rate: int = 100
    """% chance that a detected success-rate outlier is actually ejected."""
    success_rate_minimum_hosts: int = 5
    """Hosts with enough volume needed before success-rate outliers are computed at all."""
    success_rate_request_volume: int = 100
    """Requests in one interval a host needs to take part in the success-rate computation."""
    success_rate_stdev_factor: int = 1900
    """Ejection threshold is ``mean - stdev * factor / 1000`` (1900 means 1.9 standard deviations)."""
    consecutive_gateway_failure: int = 5
    """Consecutive 502/503/504 answers before a gateway-failure ejection."""
    enforcing_consecutive_gateway_failure: int = 0
    """% chance that a detected consecutive-gateway-failure outlier is ejected (0: detected only)."""
    split_external_local_origin_errors: bool = False
    """Count locally originated failures (connect failure, timeout) apart from the upstream's answers."""
    consecutive_local_origin_failure: int = 5
    """Split mode: consecutive local-origin failures before an ejection."""
    enforcing_consecutive_local_origin_failure: int = 100
    """Split mode: % chance that a consecutive local-origin outlier is ejected."""
    enforcing_local_origin_success_rate: int = 100
    """Split mode: % chance that a local-origin success-rate outlier is ejected."""
    failure_percentage_threshold: int = 85
    """A host whose failure % in an interval is at least this is a failure-percentage outlier."""
    enforcing_failure_percentage: int = 0
    """% chance that a failure-percentage outlier is ejected (0: detected only)."""
    enforcing_failure_percentage_local_origin: int = 0
    """% chance that a local-origin failure-percentage outlier is ejected (0: detected only)."""
    failure_percentage_minimum_hosts: int = 5
    """Hosts the cluster needs before failure-percentage ejection is performed."""
    failure_percentage_request_volume: int = 50
    """Requests in one interval a host needs for failure-percentage ejection."""
    max_ejection_time: float = DEFAULT_MAX_EJECTION_TIME
    """Cap (seconds) of ``base_ejection_time * multiplier``; the parser sets ``max(300, base)`` if absent."""
    max_ejection_time_jitter: float = 0.0
    """Up to this many seconds (random, millisecond steps) are added to each ejection time."""
    successful_active_health_check_uneject_host: bool = True
    """A passing active health check un-ejects an ejected host (Envoy's default)."""


def _uint32(r: Reader, key: str, default: int) -> int:
    value: int = r.integer(key, default, min=0, max=_UINT32_MAX)
    return value


def _percent(r: Reader, key: str, default: int) -> int:
    value: int = r.integer(key, default, min=0, max=100)
    return value


def _bool_value(r: Reader, key: str, default: bool) -> bool:
    """A ``BoolValue`` wrapper: ``true`` or ``{value: true}``."""
    raw = r.raw.get(key)
    if isinstance(raw, Mapping) and set(raw) == {"value"}:
        inner = raw["value"]
        r.get(key)
        if isinstance(inner, bool):
            return inner
        r.error("expected true or false", key)
        return default
    return r.boolean(key, default)


def parse_outlier_detection(r: Reader) -> OutlierDetection:
    """A cluster's ``outlier_detection`` mapping; every bad field is reported with its path.

    Calls ``r.finish()`` itself (unknown fields are errors); wiring it through ``Reader.object`` is fine too,
    the unknown fields are not reported twice.
    """
    interval = r.positive_duration("interval") or 10.0
    base = r.positive_duration("base_ejection_time") or 30.0
    max_time = r.positive_duration("max_ejection_time")
    if max_time is None:
        max_time = max(DEFAULT_MAX_EJECTION_TIME, base)
    elif max_time < base:
        r.error(f"must not be smaller than base_ejection_time ({base:g}s)", "max_ejection_time")
        max_time = base
    jitter: float = r.duration("max_ejection_time_jitter", 0.0)
    config = OutlierDetection(
        consecutive_5xx=_uint32(r, "consecutive_5xx", 5),
        interval=interval,
        base_ejection_time=base,
        max_ejection_percent=_percent(r, "max_ejection_percent", 10),
        enforcing_consecutive_5xx=_percent(r, "enforcing_consecutive_5xx", 100),
        enforcing_success_rate=_percent(r, "enforcing_success_rate", 100),
        success_rate_minimum_hosts=_uint32(r, "success_rate_minimum_hosts", 5),
        success_rate_request_volume=_uint32(r, "success_rate_request_volume", 100),
        success_rate_stdev_factor=_uint32(r, "success_rate_stdev_factor", 1900),
        consecutive_gateway_failure=_uint32(r, "consecutive_gateway_failure", 5),
        enforcing_consecutive_gateway_failure=_percent(r, "enforcing_consecutive_gateway_failure", 0),
        split_external_local_origin_errors=r.boolean("split_external_local_origin_errors", False),
        consecutive_local_origin_failure=_uint32(r, "consecutive_local_origin_failure", 5),
        enforcing_consecutive_local_origin_failure=_percent(
            r, "enforcing_consecutive_local_origin_failure", 100
        ),
        enforcing_local_origin_success_rate=_percent(r, "enforcing_local_origin_success_rate", 100),
        failure_percentage_threshold=_percent(r, "failure_percentage_threshold", 85),
        enforcing_failure_percentage=_percent(r, "enforcing_failure_percentage", 0),
        enforcing_failure_percentage_local_origin=_percent(r, "enforcing_failure_percentage_local_origin", 0),
        failure_percentage_minimum_hosts=_uint32(r, "failure_percentage_minimum_hosts", 5),
        failure_percentage_request_volume=_uint32(r, "failure_percentage_request_volume", 50),
        max_ejection_time=max_time,
        max_ejection_time_jitter=jitter,
        successful_active_health_check_uneject_host=_bool_value(
            r, "successful_active_health_check_uneject_host", True
        ),
    )
    r.finish()
    r.ignore(*r.raw)  # reported once: a caller's own finish() (``Reader.object``) adds nothing
    return config
