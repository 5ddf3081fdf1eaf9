"""``envoy.filters.http.local_ratelimit``: Envoy's local (per-process) token bucket rate limit.

One token bucket per filter config (shared by every exchange of the front, replaced with the config).
The bucket starts full with ``max_tokens``; every ``fill_interval`` adds ``tokens_per_fill`` up to
``max_tokens``. Refill is computed lazily from ``callbacks.now()`` (sans-IO; no timer).

Per request, as Envoy does:

1. the request is in ``filter_enabled`` (a fraction; **0 % when unset**, Envoy's safe default) or passes;
   ``enabled`` is counted;
2. a token is taken: ``ok``, continue;
3. no token: ``rate_limited``; if the request is not in ``filter_enforced`` (also 0 % when unset) it
   continues, with ``request_headers_to_add_when_not_enforced`` added;
4. otherwise ``enforced``: local reply ``status`` (429 by default) with body ``local_rate_limited``, the
   ``response_headers_to_add``, response flag ``RL``. gRPC requests get the status mapped by the front
   (429 -> ``UNAVAILABLE``, as Envoy maps it).

Stats keep Envoy's names, rooted at the stats store like Envoy's:
``<stat_prefix>.http_local_rate_limit.{enabled,enforced,rate_limited,ok}``.
"""

from __future__ import annotations

import math
import random as _random
from dataclasses import dataclass, field
from typing import Any

from microenvoy.config.model import HeaderValueOption
from microenvoy.config.reader import Reader
from microenvoy.core.exchange import ResponseFlag
from microenvoy.core.filter import FactoryContext, FilterCallbacks, FilterStatus, HttpFilter
from microenvoy.core.headers import Headers
from microenvoy.filters.http._common import (
    FractionalPercent,
    check_header_options,
    parse_header_value_option,
    parse_runtime_fractional_percent,
)
from microenvoy.router.headers import HeaderMutation

__all__ = [
    "NAME",
    "TYPE_URLS",
    "LocalRateLimitConfig",
    "LocalRateLimitFactory",
    "LocalRateLimitFilter",
    "TokenBucket",
    "TokenBucketConfig",
    "make_factory",
    "parse_config",
]

NAME = "envoy.filters.http.local_ratelimit"
TYPE_URLS = ("type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",)

MIN_FILL_INTERVAL = 0.05
"""Envoy rejects fill intervals under 50 ms."""

_STATUS_NAMES = {
    "BadRequest": 400,
    "Unauthorized": 401,
    "Forbidden": 403,
    "NotFound": 404,
    "TooManyRequests": 429,
    "InternalServerError": 500,
    "ServiceUnavailable": 503,
}


@dataclass(frozen=True, slots=True)
class TokenBucketConfig:
    max_tokens: int
    tokens_per_fill: int = 1
    fill_interval: float = 1.0
    """Seconds (``"1s"`` in YAML)."""


@dataclass(frozen=True, slots=True)
class LocalRateLimitConfig:
    stat_prefix: str
    token_bucket: TokenBucketConfig
    filter_enabled: FractionalPercent = field(default_factory=FractionalPercent)
    """Fraction of requests the limit is checked for (``filter_enabled.default_value``); 0 % when unset."""
    filter_enforced: FractionalPercent = field(default_factory=FractionalPercent)
    """Fraction of limited requests that are actually rejected; 0 % when unset."""
    status: int = 429
    response_headers_to_add: tuple[HeaderValueOption, ...] = ()
    request_headers_to_add_when_not_enforced: tuple[HeaderValueOption, ...] = ()


def _parse_bucket(r: Reader) -> TokenBucketConfig:
    max_tokens = r.integer("max_tokens", 1, required=True, min=1)
    per_fill = r.integer("tokens_per_fill", 1, min=1)
    interval = r.duration("fill_interval", 1.0, required=True)
    if interval < MIN_FILL_INTERVAL:
        r.error(f"must be at least 50ms, got {interval}s", "fill_interval")
        interval = 1.0
    return TokenBucketConfig(max_tokens=max_tokens, tokens_per_fill=per_fill, fill_interval=interval)


def _parse_status(r: Reader) -> int:
    code = r.get("code")
    r.finish()
    if isinstance(code, str) and code in _STATUS_NAMES:
        return _STATUS_NAMES[code]
    if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
        r.error(
            f"expected an HTTP status code (100..599 or one of {', '.join(_STATUS_NAMES)}), got {code!r}",
            "code",
        )
        return 429
    return code if code >= 400 else 429  # Envoy: codes below 400 fall back to 429


def parse_config(r: Reader) -> LocalRateLimitConfig:
    stat_prefix = r.string("stat_prefix", required=True)
    bucket = r.object("token_bucket", _parse_bucket)
    if bucket is None:
        r.error("required field is missing", "token_bucket")
        bucket = TokenBucketConfig(max_tokens=1)
    enabled = r.object("filter_enabled", parse_runtime_fractional_percent) or FractionalPercent(0)
    enforced = r.object("filter_enforced", parse_runtime_fractional_percent) or FractionalPercent(0)
    status = 429
    sr = r.mapping("status")
    if sr is not None:
        status = _parse_status(sr)
    to_add = r.objects("response_headers_to_add", parse_header_value_option)
    when_not = r.objects("request_headers_to_add_when_not_enforced", parse_header_value_option)
    check_header_options(r, "response_headers_to_add", to_add, "response")
    check_header_options(r, "request_headers_to_add_when_not_enforced", when_not, "request")
    return LocalRateLimitConfig(
        stat_prefix=stat_prefix,
        token_bucket=bucket,
        filter_enabled=enabled,
        filter_enforced=enforced,
        status=status,
        response_headers_to_add=to_add,
        request_headers_to_add_when_not_enforced=when_not,
    )


class TokenBucket:
    """A token bucket refilled in whole ``fill_interval`` steps, driven by the caller's clock."""

    __slots__ = ("_last_fill", "fill_interval", "max_tokens", "tokens", "tokens_per_fill")

    def __init__(self, config: TokenBucketConfig) -> None:
        self.max_tokens = config.max_tokens
        self.tokens_per_fill = config.tokens_per_fill
        self.fill_interval = config.fill_interval
        self.tokens = config.max_tokens
        self._last_fill: float | None = None

    def refill(self, now: float) -> None:
        last = self._last_fill
        if last is None:
            self._last_fill = now
            return
        elapsed = now - last
        if elapsed < self.fill_interval:
            return
        fills = math.floor(elapsed / self.fill_interval)
        self.tokens = min(self.max_tokens, self.tokens + fills * self.tokens_per_fill)
        self._last_fill = last + fills * self.fill_interval

    def try_consume(self, now: float) -> bool:
        self.refill(now)
        if self.tokens > 0:
            self.tokens -= 1
            return True
        return False

    def __repr__(self) -> str:
        return f"<TokenBucket {self.tokens}/{self.max_tokens} +{self.tokens_per_fill}/{self.fill_interval}s>"


class LocalRateLimitFactory:
    """Holds the shared bucket, the stats and the compiled header options."""

    __slots__ = (
        "_enabled",
        "_enforced",
        "_ok",
        "_rate_limited",
        "bucket",
        "config",
        "name",
        "random",
        "reply_headers",
        "when_not_enforced",
    )

    def __init__(self, config: LocalRateLimitConfig, ctx: FactoryContext) -> None:
        self.name = NAME
        self.config = config
        self.bucket = TokenBucket(config.token_bucket)
        self.random: _random.Random = ctx.random
        self.reply_headers = HeaderMutation(config.response_headers_to_add, what="response")
        self.when_not_enforced = HeaderMutation(config.request_headers_to_add_when_not_enforced)
        scope = ctx.stats.store.scope(f"{config.stat_prefix}.http_local_rate_limit.")
        self._enabled = scope.counter("enabled")
        self._enforced = scope.counter("enforced")
        self._rate_limited = scope.counter("rate_limited")
        self._ok = scope.counter("ok")

    def create(self, callbacks: FilterCallbacks) -> HttpFilter:
        return LocalRateLimitFilter(callbacks, self)

    def admin_state(self) -> dict[str, Any]:
        return {"tokens": self.bucket.tokens, "max_tokens": self.bucket.max_tokens}

    def __repr__(self) -> str:
        return f"<LocalRateLimitFactory {self.config.stat_prefix!r} {self.bucket!r}>"


class LocalRateLimitFilter(HttpFilter):
    __slots__ = ("_factory",)

    def __init__(self, callbacks: FilterCallbacks, factory: LocalRateLimitFactory) -> None:
        super().__init__(callbacks)
        self._factory = factory

    def decode_headers(self, headers: Headers, end_stream: bool) -> FilterStatus:
        f = self._factory
        if not f.config.filter_enabled.sample(f.random):
            return FilterStatus.CONTINUE
        f._enabled.inc()
        if f.bucket.try_consume(self.callbacks.now()):
            f._ok.inc()
            return FilterStatus.CONTINUE
        f._rate_limited.inc()
        exchange = self.callbacks.exchange
        if not f.config.filter_enforced.sample(f.random):
            if f.when_not_enforced:
                f.when_not_enforced.apply(headers, exchange)
            return FilterStatus.CONTINUE
        f._enforced.inc()
        reply: list[tuple[bytes, bytes]] | None = None
        if f.reply_headers:
            extra = Headers()
            f.reply_headers.apply(extra, exchange)
            reply = list(extra.items())
        self.callbacks.send_local_reply(
            f.config.status,
            b"local_rate_limited",
            reply,
            details="local_rate_limited",
            flag=ResponseFlag.RATE_LIMITED,
        )
        return FilterStatus.STOP

    def __repr__(self) -> str:
        return f"<LocalRateLimitFilter {self._factory.config.stat_prefix!r}>"


def make_factory(config: LocalRateLimitConfig, ctx: FactoryContext) -> LocalRateLimitFactory:
    return LocalRateLimitFactory(config, ctx)
