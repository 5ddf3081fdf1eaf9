"""``envoy.filters.http.health_check``: Envoy's health check filter, driven by a process-wide ``HealthState``.

A request matching every ``headers`` matcher (typically ``:path`` exact ``/healthz``) is a health check:

* ``pass_through_mode: false``: answered locally once the request is complete: 200, or 503 when the
  process is failing;
* ``pass_through_mode: true``: forwarded upstream, except while the process is failing: then answered
  503 locally (Envoy does the same).

While failing (admin ``POST /healthcheck/fail`` until ``POST /healthcheck/ok``), *every* response that
passes this filter carries ``x-envoy-immediate-health-check-fail: true``, so that Envoy-style load
balancers in front drop this host at once; the local 503 uses response flag ``LH``.

The failing state is a ``HealthState`` shared by the whole process: the admin server flips it and
``make_factory`` takes it from ``FactoryContext.health`` (a module-level shared one when None). Health
checks produce no stats of their own (they are counted as ordinary requests), as in Envoy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from microenvoy.config.model import HeaderMatcher
from microenvoy.config.reader import Reader
from microenvoy.core.filter import FactoryContext, FilterCallbacks, FilterStatus, HttpFilter
from microenvoy.core.headers import Headers
from microenvoy.router.matchers import compile_header_matchers, parse_header_matcher

__all__ = [
    "DEFAULT_HEALTH",
    "NAME",
    "TYPE_URLS",
    "HealthCheckConfig",
    "HealthCheckFactory",
    "HealthCheckFilter",
    "HealthState",
    "make_factory",
    "parse_config",
]

NAME = "envoy.filters.http.health_check"
TYPE_URLS = ("type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",)

IMMEDIATE_FAIL = b"x-envoy-immediate-health-check-fail"
FAILED_LOCAL_HEALTH_CHECK = "LH"
"""Envoy's response flag for a failed local health check."""


class HealthState:
    """Is this process failing its health checks? (admin ``/healthcheck/fail`` and ``/healthcheck/ok``)."""

    __slots__ = ("failing",)

    def __init__(self, failing: bool = False) -> None:
        self.failing = failing

    def fail(self) -> None:
        self.failing = True

    def ok(self) -> None:
        self.failing = False

    def __repr__(self) -> str:
        return f"<HealthState {'failing' if self.failing else 'ok'}>"


DEFAULT_HEALTH = HealthState()
"""The process-wide state used when ``FactoryContext.health`` is None."""


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    pass_through_mode: bool
    headers: tuple[HeaderMatcher, ...]
    """All must match for a request to be a health check; must not be empty."""


def parse_config(r: Reader) -> HealthCheckConfig:
    if not r.has("pass_through_mode"):
        r.error("required field is missing", "pass_through_mode")
    pass_through = r.boolean("pass_through_mode")
    headers = r.objects("headers", parse_header_matcher, required=True, non_empty=True)
    for unsupported in ("cache_time", "cluster_min_healthy_percentages"):
        if r.has(unsupported):
            r.get(unsupported)
            r.error("not supported by microenvoy", unsupported)
    return HealthCheckConfig(pass_through_mode=pass_through, headers=headers)


class HealthCheckFactory:
    __slots__ = ("config", "health", "match", "name")

    def __init__(self, config: HealthCheckConfig, health: HealthState) -> None:
        self.name = NAME
        self.config = config
        self.health = health
        self.match = compile_header_matchers(config.headers)

    def create(self, callbacks: FilterCallbacks) -> HttpFilter:
        return HealthCheckFilter(callbacks, self)

    def admin_state(self) -> dict[str, Any]:
        return {"failing": self.health.failing}

    def __repr__(self) -> str:
        return f"<HealthCheckFactory pass_through={self.config.pass_through_mode} {self.health!r}>"


class HealthCheckFilter(HttpFilter):
    __slots__ = ("_factory", "_handling", "health_check_request")

    def __init__(self, callbacks: FilterCallbacks, factory: HealthCheckFactory) -> None:
        super().__init__(callbacks)
        self._factory = factory
        self._handling = False
        self.health_check_request = False

    def decode_headers(self, headers: Headers, end_stream: bool) -> FilterStatus:
        f = self._factory
        if f.match is None or f.match(headers):
            self.health_check_request = True
            if not f.config.pass_through_mode or f.health.failing:
                self._handling = True
        if self._handling:
            if end_stream:
                self._complete()
            return FilterStatus.STOP
        return FilterStatus.CONTINUE

    def decode_data(self, data: bytes, end_stream: bool) -> FilterStatus:
        if not self._handling:
            return FilterStatus.CONTINUE
        if end_stream:
            self._complete()
        return FilterStatus.STOP

    def decode_trailers(self, trailers: Headers) -> FilterStatus:
        if not self._handling:
            return FilterStatus.CONTINUE
        self._complete()
        return FilterStatus.STOP

    def encode_headers(self, headers: Headers, end_stream: bool) -> FilterStatus:
        if self._factory.health.failing:
            headers.set(IMMEDIATE_FAIL, b"true")
        return FilterStatus.CONTINUE

    def _complete(self) -> None:
        if self._factory.health.failing:
            self.callbacks.send_local_reply(
                503,
                b"",
                [(IMMEDIATE_FAIL, b"true")],
                details="health_check_failed",
                flag=FAILED_LOCAL_HEALTH_CHECK,
            )
        else:
            self.callbacks.send_local_reply(200, b"", details="health_check_ok")

    def __repr__(self) -> str:
        return f"<HealthCheckFilter hc={self.health_check_request} handling={self._handling}>"


def make_factory(config: HealthCheckConfig, ctx: FactoryContext) -> HealthCheckFactory:
    health = getattr(ctx, "health", None)
    return HealthCheckFactory(config, health if isinstance(health, HealthState) else DEFAULT_HEALTH)
