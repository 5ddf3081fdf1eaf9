"""local_ratelimit: config, token bucket refill over fake time, enabled/enforced fractions, stats."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.admin.stats import Store
from microenvoy.core.exchange import ResponseFlag
from microenvoy.core.filter import FilterStatus
from microenvoy.filters.http import local_ratelimit as lrl
from microenvoy.filters.http._common import FractionalPercent

from .fakes import FakeCallbacks, callbacks, context, parse, parse_errors

ALWAYS = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "x"}


def _raw(**over: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "stat_prefix": "rl",
        "token_bucket": {"max_tokens": 2, "tokens_per_fill": 1, "fill_interval": "1s"},
        "filter_enabled": ALWAYS,
        "filter_enforced": ALWAYS,
    }
    raw.update(over)
    return raw


def test_config_parses() -> None:
    cfg = parse(
        lrl,
        _raw(
            status={"code": "ServiceUnavailable"},
            response_headers_to_add=[
                {"header": {"key": "X-RL", "value": "yes"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
                {"header": {"key": "x-legacy", "value": "1"}, "append": False},
            ],
        ),
    )
    assert cfg.stat_prefix == "rl"
    assert cfg.token_bucket == lrl.TokenBucketConfig(2, 1, 1.0)
    assert cfg.filter_enabled == FractionalPercent(100, 100)
    assert cfg.status == 503
    assert cfg.response_headers_to_add[0].key == "x-rl"
    assert cfg.response_headers_to_add[1].append_action == "OVERWRITE_IF_EXISTS_OR_ADD"


def test_defaults_are_envoys() -> None:
    cfg = parse(lrl, {"stat_prefix": "p", "token_bucket": {"max_tokens": 1, "fill_interval": "0.5s"}})
    assert cfg.filter_enabled == FractionalPercent(0)
    assert cfg.filter_enforced == FractionalPercent(0)
    assert cfg.status == 429
    assert parse(lrl, _raw(status={"code": 200})).status == 429  # below 400 falls back to 429


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"token_bucket": {"max_tokens": 1, "fill_interval": "1s"}}, "typed_config.stat_prefix: required"),
        ({"stat_prefix": "p"}, "typed_config.token_bucket: required"),
        (_raw(token_bucket={"max_tokens": 0, "fill_interval": "1s"}),
         "typed_config.token_bucket.max_tokens: must be >= 1"),
        (_raw(token_bucket={"max_tokens": 1}), "typed_config.token_bucket.fill_interval: required"),
        (_raw(token_bucket={"max_tokens": 1, "fill_interval": "10ms"}),
         "typed_config.token_bucket.fill_interval: must be at least 50ms"),
        (_raw(filter_enabled={"default_value": {"numerator": 1, "denominator": "BILLION"}}),
         "typed_config.filter_enabled.default_value.denominator: unknown value 'BILLION'"),
        (_raw(filter_enabled={"runtime_key": "k"}), "typed_config.filter_enabled.default_value: required"),
        (_raw(status={"code": 999}), "typed_config.status.code"),
        (_raw(response_headers_to_add=[{"header": {"key": ":status", "value": "1"}}]),
         "typed_config.response_headers_to_add[0].header.key"),
        (_raw(response_headers_to_add=[{"header": {"key": "x", "value": "%BAD%"}}]),
         "typed_config.response_headers_to_add[0].header.value"),
        (_raw(descriptors=[]), "typed_config.descriptors: unknown field"),
    ],
)  # fmt: skip
def test_bad_config(raw: object, error: str) -> None:
    errors = parse_errors(lrl, raw)
    assert any(e.startswith(error) for e in errors), errors


def _run(factory: lrl.LocalRateLimitFactory, cb: FakeCallbacks) -> FilterStatus:
    return factory.create(cb).decode_headers(cb.exchange.request_headers, True)


def test_bucket_limits_and_refills_over_fake_time() -> None:
    store = Store()
    cfg = parse(lrl, _raw(response_headers_to_add=[{"header": {"key": "x-rl", "value": "%PROTOCOL%"}}]))
    factory = lrl.make_factory(cfg, context(store))
    clock = 100.0

    def attempt() -> FakeCallbacks:
        cb = callbacks()
        cb.clock = clock
        _run(factory, cb)
        return cb

    assert attempt().replies == []
    assert attempt().replies == []
    limited = attempt()
    assert len(limited.replies) == 1
    reply = limited.replies[0]
    assert reply.status == 429
    assert reply.body == b"local_rate_limited"
    assert reply.flag == ResponseFlag.RATE_LIMITED
    assert reply.headers == [(b"x-rl", b"HTTP/2")]
    clock += 0.999
    assert attempt().replies  # not a whole interval yet
    clock += 0.002
    assert attempt().replies == []  # one token after one interval
    assert attempt().replies
    clock += 10
    assert [bool(attempt().replies) for _ in range(3)] == [False, False, True]  # capped at max_tokens
    prefix = "rl.http_local_rate_limit."
    assert store.value(prefix + "enabled") == 9
    assert store.value(prefix + "ok") == 5
    assert store.value(prefix + "rate_limited") == 4
    assert store.value(prefix + "enforced") == 4
    assert factory.admin_state() == {"tokens": 0, "max_tokens": 2}


def test_not_enabled_means_no_check() -> None:
    store = Store()
    factory = lrl.make_factory(parse(lrl, _raw(filter_enabled=None, filter_enforced=None)), context(store))
    for _ in range(5):
        cb = callbacks()
        assert _run(factory, cb) is FilterStatus.CONTINUE
        assert cb.replies == []
    assert (
        store.value("rl.http_local_rate_limit.enabled") is None
        or store.value("rl.http_local_rate_limit.enabled") == 0
    )


def test_enabled_but_not_enforced_adds_request_headers() -> None:
    store = Store()
    raw = _raw(
        filter_enforced=None,
        token_bucket={"max_tokens": 1, "fill_interval": "60s"},
        request_headers_to_add_when_not_enforced=[{"header": {"key": "x-would-limit", "value": "true"}}],
    )
    factory = lrl.make_factory(parse(lrl, raw), context(store))
    first, second = callbacks(), callbacks()
    assert _run(factory, first) is FilterStatus.CONTINUE
    assert _run(factory, second) is FilterStatus.CONTINUE
    assert first.exchange.request_headers.get(b"x-would-limit") is None
    assert second.exchange.request_headers.get(b"x-would-limit") == b"true"
    assert second.replies == []
    assert store.value("rl.http_local_rate_limit.rate_limited") == 1
    assert store.value("rl.http_local_rate_limit.enforced") == 0


def test_fractional_enabled_with_seeded_random() -> None:
    store = Store()
    half = {"default_value": {"numerator": 5000, "denominator": "TEN_THOUSAND"}}
    raw = _raw(filter_enabled=half, token_bucket={"max_tokens": 1000000, "fill_interval": "1s"})
    factory = lrl.make_factory(parse(lrl, raw), context(store, seed=42))
    for _ in range(2000):
        _run(factory, callbacks())
    enabled = store.value("rl.http_local_rate_limit.enabled") or 0
    assert 850 < enabled < 1150


def test_status_from_config() -> None:
    factory = lrl.make_factory(
        parse(lrl, _raw(status={"code": 503}, token_bucket={"max_tokens": 1, "fill_interval": "1s"})),
        context(Store()),
    )
    _run(factory, callbacks())
    cb = callbacks()
    assert _run(factory, cb) is FilterStatus.STOP
    assert cb.replies[0].status == 503


@given(st.lists(st.floats(0, 5), max_size=50), st.integers(1, 5), st.integers(1, 3))
def test_bucket_never_exceeds_max_or_goes_negative(
    steps: list[float], max_tokens: int, per_fill: int
) -> None:
    bucket = lrl.TokenBucket(lrl.TokenBucketConfig(max_tokens, per_fill, 0.5))
    now = 0.0
    for step in steps:
        now += step
        bucket.try_consume(now)
        assert 0 <= bucket.tokens <= max_tokens
