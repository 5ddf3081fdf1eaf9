"""``envoy.filters.http.fault``: Envoy's HTTP fault injection (delays and aborts).

For a request matching every ``headers`` matcher (all requests when there are none):

1. **delay**: with probability ``delay.percentage`` (**0 % when unset**, as Envoy's ``FractionalPercent``
   default) the request is held for ``fixed_delay`` (via ``callbacks.set_timer``; request body and
   trailers are held too), response flag ``DI``. With ``header_delay: {}`` the duration comes from the
   request header ``x-envoy-fault-delay-request`` (milliseconds) instead, and
   ``x-envoy-fault-delay-request-percentage`` may lower the percentage (never above the configured one).
2. **abort**, checked right away or after the delay: with probability ``abort.percentage`` the request
   gets a local reply ``http_status`` (body ``fault filter abort``, flag ``FI``); ``grpc_status`` answers
   HTTP 200 with that ``grpc-status`` (a ``grpc-status`` header passed to ``send_local_reply``, which the
   front keeps for gRPC requests). With ``header_abort: {}`` the status comes from
   ``x-envoy-fault-abort-request`` (200..599) or ``x-envoy-fault-abort-grpc-request``, and
   ``x-envoy-fault-abort-request-percentage`` may lower the percentage.

Header-controlled faults apply only when ``header_delay`` / ``header_abort`` are configured.
``max_active_faults`` caps concurrent faulted requests (``faults_overflow`` counts refusals). Stats, in
the front's scope as Envoy names them: ``http.<stat_prefix>.fault.{delays_injected,aborts_injected,
faults_overflow}`` and the gauge ``http.<stat_prefix>.fault.active_faults``.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass, field
from typing import Any

from microenvoy.config.model import HeaderMatcher
from microenvoy.config.reader import Reader
from microenvoy.core.exchange import ResponseFlag
from microenvoy.core.filter import FactoryContext, FilterCallbacks, FilterStatus, HttpFilter, TimerHandle
from microenvoy.core.headers import Headers
from microenvoy.filters.http._common import FractionalPercent, parse_fractional_percent
from microenvoy.router.matchers import compile_header_matchers, parse_header_matcher

__all__ = [
    "NAME",
    "TYPE_URLS",
    "FaultAbort",
    "FaultConfig",
    "FaultDelay",
    "FaultFactory",
    "FaultFilter",
    "make_factory",
    "parse_config",
]

NAME = "envoy.filters.http.fault"
TYPE_URLS = ("type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",)

DELAY_HEADER = b"x-envoy-fault-delay-request"
DELAY_PERCENT_HEADER = b"x-envoy-fault-delay-request-percentage"
ABORT_HEADER = b"x-envoy-fault-abort-request"
ABORT_GRPC_HEADER = b"x-envoy-fault-abort-grpc-request"
ABORT_PERCENT_HEADER = b"x-envoy-fault-abort-request-percentage"
ABORT_BODY = b"fault filter abort"


@dataclass(frozen=True, slots=True)
class FaultDelay:
    fixed_delay: float | None = None
    """Seconds; None with ``header_delay``."""
    header_delay: bool = False
    percentage: FractionalPercent = field(default_factory=FractionalPercent)


@dataclass(frozen=True, slots=True)
class FaultAbort:
    http_status: int | None = None
    grpc_status: int | None = None
    header_abort: bool = False
    percentage: FractionalPercent = field(default_factory=FractionalPercent)


@dataclass(frozen=True, slots=True)
class FaultConfig:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    headers: tuple[HeaderMatcher, ...] = ()
    max_active_faults: int | None = None


def _empty(r: Reader, key: str) -> bool:
    """``header_delay: {}`` / ``header_abort: {}``: an empty message."""
    sub = r.mapping(key)
    if sub is None:
        return False
    sub.finish()
    return True


def _parse_delay(r: Reader) -> FaultDelay:
    kind = r.one_of("fixed_delay", "header_delay")
    fixed = r.duration("fixed_delay") if kind == "fixed_delay" else None
    header = _empty(r, "header_delay") if kind == "header_delay" else False
    r.ignore("fixed_delay", "header_delay")
    pct = r.object("percentage", parse_fractional_percent) or FractionalPercent()
    return FaultDelay(fixed_delay=fixed, header_delay=header, percentage=pct)


def _parse_abort(r: Reader) -> FaultAbort:
    kind = r.one_of("http_status", "grpc_status", "header_abort")
    http = grpc = None
    header = False
    if kind == "http_status":
        http = r.integer("http_status", None, min=200, max=599)
    elif kind == "grpc_status":
        grpc = r.integer("grpc_status", None, min=0, max=16)
    elif kind == "header_abort":
        header = _empty(r, "header_abort")
    r.ignore("http_status", "grpc_status", "header_abort")
    pct = r.object("percentage", parse_fractional_percent) or FractionalPercent()
    return FaultAbort(http_status=http, grpc_status=grpc, header_abort=header, percentage=pct)


def parse_config(r: Reader) -> FaultConfig:
    for unsupported in ("response_rate_limit", "upstream_cluster", "downstream_nodes", "filter_metadata"):
        if r.has(unsupported):
            r.get(unsupported)
            r.error("not supported by microenvoy", unsupported)
    for runtime_key in (
        "delay_percent_runtime",
        "abort_percent_runtime",
        "delay_duration_runtime",
        "abort_http_status_runtime",
        "max_active_faults_runtime",
        "response_rate_limit_percent_runtime",
        "abort_grpc_status_runtime",
    ):
        r.string(runtime_key)  # accepted: there is no runtime layer
    r.boolean("disable_downstream_cluster_stats")
    return FaultConfig(
        delay=r.object("delay", _parse_delay),
        abort=r.object("abort", _parse_abort),
        headers=r.objects("headers", parse_header_matcher),
        max_active_faults=r.integer("max_active_faults", None, min=0),
    )


def _header_int(headers: Headers, name: bytes) -> int | None:
    """First value of ``name`` as a non-negative integer (untrusted input: anything else is None)."""
    v = headers.get(name)
    if v is None:
        return None
    v = v.strip()
    if not v or len(v) > 18 or not v.isdigit():
        return None
    return int(v)


class FaultFactory:
    __slots__ = (
        "_aborts",
        "_active",
        "_delays",
        "_overflow",
        "config",
        "headers_match",
        "name",
        "random",
    )

    def __init__(self, config: FaultConfig, ctx: FactoryContext) -> None:
        self.name = NAME
        self.config = config
        self.random: _random.Random = ctx.random
        self.headers_match = compile_header_matchers(config.headers)
        scope = ctx.stats.scope("fault.")
        self._delays = scope.counter("delays_injected")
        self._aborts = scope.counter("aborts_injected")
        self._overflow = scope.counter("faults_overflow")
        self._active = scope.gauge("active_faults")

    def create(self, callbacks: FilterCallbacks) -> HttpFilter:
        return FaultFilter(callbacks, self)

    def admin_state(self) -> dict[str, Any]:
        return {"active_faults": self._active.value}

    # -- decisions -----------------------------------------------------------------------------
    def delay_for(self, headers: Headers) -> float | None:
        d = self.config.delay
        if d is None:
            return None
        pct = d.percentage
        if d.header_delay:
            header_pct = _header_int(headers, DELAY_PERCENT_HEADER)
            if header_pct is not None:
                pct = pct.capped(header_pct)
        if not pct.sample(self.random):
            return None
        if d.header_delay:
            ms = _header_int(headers, DELAY_HEADER)
            duration = ms / 1000.0 if ms is not None else None
        else:
            duration = d.fixed_delay
        return duration if duration is not None and duration > 0 else None

    def abort_for(self, headers: Headers) -> tuple[int, int | None] | None:
        """``(http status, grpc status or None)`` if this request is to be aborted."""
        a = self.config.abort
        if a is None:
            return None
        pct = a.percentage
        if a.header_abort:
            header_pct = _header_int(headers, ABORT_PERCENT_HEADER)
            if header_pct is not None:
                pct = pct.capped(header_pct)
        if not pct.sample(self.random):
            return None
        if a.header_abort:
            http = _header_int(headers, ABORT_HEADER)
            if http is not None and 200 <= http < 600:
                return http, None
            grpc = _header_int(headers, ABORT_GRPC_HEADER)
            if grpc is not None and grpc <= 16:
                return 200, grpc
            return None
        if a.http_status is not None:
            return a.http_status, None
        if a.grpc_status is not None:
            return 200, a.grpc_status
        return None

    def __repr__(self) -> str:
        return f"<FaultFactory active={self._active.value}>"


class FaultFilter(HttpFilter):
    __slots__ = ("_active", "_factory", "_headers", "_timer")

    def __init__(self, callbacks: FilterCallbacks, factory: FaultFactory) -> None:
        super().__init__(callbacks)
        self._factory = factory
        self._timer: TimerHandle | None = None
        self._active = False
        self._headers: Headers | None = None

    def _try_activate(self) -> bool:
        """Count this exchange as one active fault, unless ``max_active_faults`` is reached."""
        if self._active:
            return True
        f = self._factory
        limit = f.config.max_active_faults
        if limit is not None and f._active.value >= limit:
            f._overflow.inc()
            return False
        f._active.inc()
        self._active = True
        return True

    def _deactivate(self) -> None:
        if self._active:
            self._active = False
            self._factory._active.dec()

    def decode_headers(self, headers: Headers, end_stream: bool) -> FilterStatus:
        f = self._factory
        if f.headers_match is not None and not f.headers_match(headers):
            return FilterStatus.CONTINUE
        delay = f.delay_for(headers)
        if delay is not None and self._try_activate():
            self._headers = headers
            f._delays.inc()
            self.callbacks.exchange.response_flags.add(ResponseFlag.DELAY_INJECTED)
            self._timer = self.callbacks.set_timer(delay, self._after_delay)
            return FilterStatus.STOP
        if self._maybe_abort(headers):
            return FilterStatus.STOP
        return FilterStatus.CONTINUE

    def _maybe_abort(self, headers: Headers) -> bool:
        status = self._factory.abort_for(headers)
        if status is None or not self._try_activate():
            return False
        http, grpc = status
        self._factory._aborts.inc()
        extra = None
        if grpc is not None:
            extra = [(b"grpc-status", str(grpc).encode()), (b"grpc-message", ABORT_BODY)]
        self.callbacks.send_local_reply(
            http, ABORT_BODY, extra, details="fault_filter_abort", flag=ResponseFlag.FAULT_INJECTED
        )
        return True

    def _after_delay(self) -> None:
        self._timer = None
        headers = self._headers
        self._headers = None
        if headers is not None and self._maybe_abort(headers):
            return
        self._deactivate()  # the delay is over and nothing else is injected
        self.callbacks.continue_decoding()

    def decode_data(self, data: bytes, end_stream: bool) -> FilterStatus:
        return FilterStatus.STOP if self._timer is not None else FilterStatus.CONTINUE

    def decode_trailers(self, trailers: Headers) -> FilterStatus:
        return FilterStatus.STOP if self._timer is not None else FilterStatus.CONTINUE

    def on_destroy(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._headers = None
        self._deactivate()

    def __repr__(self) -> str:
        return f"<FaultFilter active={self._active} delaying={self._timer is not None}>"


def make_factory(config: FaultConfig, ctx: FactoryContext) -> FaultFactory:
    return FaultFactory(config, ctx)
