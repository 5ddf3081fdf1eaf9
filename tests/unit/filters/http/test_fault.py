"""fault: config, delays on fake timers, aborts, header-controlled faults, percentages, max_active_faults."""

from __future__ import annotations

from typing import Any

import pytest

from microenvoy.admin.stats import Store
from microenvoy.core.exchange import ResponseFlag
from microenvoy.core.filter import FilterStatus
from microenvoy.filters.http import fault
from microenvoy.filters.http._common import FractionalPercent

from .fakes import FakeCallbacks, callbacks, context, parse, parse_errors, request

ALL = {"numerator": 100}


def _factory(raw: dict[str, Any], store: Store | None = None, seed: int = 1) -> fault.FaultFactory:
    return fault.make_factory(parse(fault, raw), context(store or Store(), seed=seed))


def _start(factory: fault.FaultFactory, **req: Any) -> tuple[fault.FaultFilter, FakeCallbacks, FilterStatus]:
    headers, ds = request(**req)
    cb = callbacks(headers, ds)
    f = factory.create(cb)
    assert isinstance(f, fault.FaultFilter)
    return f, cb, f.decode_headers(headers, False)


def test_config() -> None:
    cfg = parse(
        fault,
        {
            "delay": {"fixed_delay": "0.5s", "percentage": {"numerator": 25, "denominator": "TEN_THOUSAND"}},
            "abort": {"http_status": 503, "percentage": ALL},
            "headers": [{"name": "x-chaos", "present_match": True}],
            "max_active_faults": 3,
            "delay_percent_runtime": "ignored",
        },
    )
    assert cfg.delay == fault.FaultDelay(fixed_delay=0.5, percentage=FractionalPercent(25, 10000))
    assert cfg.abort == fault.FaultAbort(http_status=503, percentage=FractionalPercent(100, 100))
    assert cfg.max_active_faults == 3
    assert cfg.headers[0].name == "x-chaos"
    header_cfg = parse(fault, {"delay": {"header_delay": {}}, "abort": {"header_abort": {}}})
    assert header_cfg.delay.header_delay
    assert header_cfg.delay.percentage == FractionalPercent(0)  # Envoy's default
    assert header_cfg.abort.header_abort


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"delay": {"percentage": ALL}}, "typed_config.delay: one of fixed_delay, header_delay is required"),
        ({"delay": {"fixed_delay": "1s", "header_delay": {}}}, "typed_config.delay: only one of"),
        ({"delay": {"fixed_delay": "soon"}}, "typed_config.delay.fixed_delay: expected a duration"),
        ({"abort": {"http_status": 700}}, "typed_config.abort.http_status: must be <= 599"),
        ({"abort": {"http_status": 100}}, "typed_config.abort.http_status: must be >= 200"),
        ({"abort": {"grpc_status": 17}}, "typed_config.abort.grpc_status: must be <= 16"),
        ({"abort": {"percentage": ALL}}, "typed_config.abort: one of http_status"),
        (
            {"abort": {"http_status": 503, "percentage": {"numerator": -1}}},
            "typed_config.abort.percentage.numerator",
        ),
        ({"abort": {"header_abort": {"x": 1}}}, "typed_config.abort.header_abort.x: unknown field"),
        (
            {"headers": [{"name": "x", "string_match": {"bogus": "1"}}]},
            "typed_config.headers[0].string_match",
        ),
        ({"response_rate_limit": {}}, "typed_config.response_rate_limit: not supported"),
        ({"max_active_faults": -1}, "typed_config.max_active_faults: must be >= 0"),
    ],
)
def test_bad_config(raw: object, error: str) -> None:
    errors = parse_errors(fault, raw)
    assert any(e.startswith(error) for e in errors), errors


def test_fixed_delay_then_continue() -> None:
    store = Store()
    factory = _factory({"delay": {"fixed_delay": "2s", "percentage": ALL}}, store)
    f, cb, status = _start(factory)
    assert status is FilterStatus.STOP
    assert ResponseFlag.DELAY_INJECTED in cb.exchange.response_flags
    assert f.decode_data(b"body", False) is FilterStatus.STOP  # held during the delay
    assert store.value("http.ingress.fault.active_faults") == 1
    cb.advance(1.9)
    assert cb.continued_decoding == 0
    cb.advance(0.2)
    assert cb.continued_decoding == 1
    assert cb.replies == []
    assert f.decode_data(b"more", True) is FilterStatus.CONTINUE
    assert store.value("http.ingress.fault.delays_injected") == 1
    assert store.value("http.ingress.fault.active_faults") == 0  # a finished delay is no longer active
    f.on_destroy()
    assert store.value("http.ingress.fault.active_faults") == 0


def test_delay_then_abort() -> None:
    store = Store()
    factory = _factory({"delay": {"fixed_delay": "1s", "percentage": ALL},
                        "abort": {"http_status": 502, "percentage": ALL}}, store)  # fmt: skip
    f, cb, status = _start(factory)
    assert status is FilterStatus.STOP
    assert cb.replies == []
    cb.advance(1.0)
    (reply,) = cb.replies
    assert reply.status == 502
    assert reply.body == b"fault filter abort"
    assert reply.flag == ResponseFlag.FAULT_INJECTED
    assert cb.continued_decoding == 0
    assert store.value("http.ingress.fault.active_faults") == 1
    f.on_destroy()
    assert store.value("http.ingress.fault.active_faults") == 0
    assert store.value("http.ingress.fault.aborts_injected") == 1


def test_destroy_cancels_pending_delay() -> None:
    store = Store()
    f, cb, _ = _start(_factory({"delay": {"fixed_delay": "5s", "percentage": ALL}}, store))
    f.on_destroy()
    assert cb.timers[0].cancelled
    cb.advance(10)
    assert cb.continued_decoding == 0
    assert store.value("http.ingress.fault.active_faults") == 0


def test_grpc_abort() -> None:
    _, cb, status = _start(
        _factory({"abort": {"grpc_status": 14, "percentage": ALL}}), content_type="application/grpc"
    )
    assert status is FilterStatus.STOP
    (reply,) = cb.replies
    assert reply.status == 200
    assert (b"grpc-status", b"14") in reply.headers


def test_header_matchers_gate_faults() -> None:
    factory = _factory({"abort": {"http_status": 503, "percentage": ALL},
                        "headers": [{"name": "x-chaos", "exact_match": "on"}]})  # fmt: skip
    _, cb, status = _start(factory)
    assert status is FilterStatus.CONTINUE
    assert cb.replies == []
    _, cb, status = _start(factory, x_chaos="on")
    assert status is FilterStatus.STOP


def test_header_faults_only_when_configured() -> None:
    fixed = _factory({"abort": {"http_status": 503, "percentage": {"numerator": 0}}})
    _, cb, status = _start(
        fixed, x_envoy_fault_abort_request="500", x_envoy_fault_abort_request_percentage="100"
    )
    assert status is FilterStatus.CONTINUE

    header = _factory(
        {"abort": {"header_abort": {}, "percentage": ALL}, "delay": {"header_delay": {}, "percentage": ALL}}
    )
    _, cb, status = _start(header)
    assert status is FilterStatus.CONTINUE  # no headers: nothing injected
    _, cb, status = _start(header, x_envoy_fault_abort_request="418")
    assert cb.replies[0].status == 418
    _, cb, status = _start(header, x_envoy_fault_abort_request="99")  # out of range: ignored
    assert status is FilterStatus.CONTINUE
    _, cb, status = _start(header, x_envoy_fault_abort_grpc_request="8")
    assert cb.replies[0].status == 200
    assert (b"grpc-status", b"8") in cb.replies[0].headers
    _, cb, status = _start(header, x_envoy_fault_delay_request="250")
    assert status is FilterStatus.STOP
    assert cb.timers[0].due == pytest.approx(0.25)
    _, cb, status = _start(header, x_envoy_fault_delay_request="soon")
    assert status is FilterStatus.CONTINUE
    # the percentage header can lower but never raise the configured percentage
    _, cb, status = _start(
        header, x_envoy_fault_abort_request="503", x_envoy_fault_abort_request_percentage="0"
    )
    assert status is FilterStatus.CONTINUE
    capped = _factory({"abort": {"header_abort": {}, "percentage": {"numerator": 0}}})
    _, cb, status = _start(
        capped, x_envoy_fault_abort_request="503", x_envoy_fault_abort_request_percentage="100"
    )
    assert status is FilterStatus.CONTINUE


def test_percentage_with_seeded_random() -> None:
    store = Store()
    factory = _factory({"abort": {"http_status": 503, "percentage": {"numerator": 30}}}, store, seed=7)
    aborted = 0
    for _ in range(2000):
        f, _cb, status = _start(factory)
        aborted += status is FilterStatus.STOP
        f.on_destroy()
    assert 500 < aborted < 700
    assert store.value("http.ingress.fault.aborts_injected") == aborted
    # same seed, same decisions
    again = _factory({"abort": {"http_status": 503, "percentage": {"numerator": 30}}}, Store(), seed=7)
    repeat = 0
    for _ in range(2000):
        f, _cb, status = _start(again)
        repeat += status is FilterStatus.STOP
        f.on_destroy()
    assert repeat == aborted


def test_max_active_faults() -> None:
    store = Store()
    factory = _factory({"delay": {"fixed_delay": "1s", "percentage": ALL}, "max_active_faults": 2}, store)
    first = _start(factory)
    second = _start(factory)
    third = _start(factory)
    assert [s for _, _, s in (first, second, third)] == [
        FilterStatus.STOP,
        FilterStatus.STOP,
        FilterStatus.CONTINUE,
    ]
    assert store.value("http.ingress.fault.faults_overflow") == 1
    first[0].on_destroy()
    assert _start(factory)[2] is FilterStatus.STOP
    assert factory.admin_state() == {"active_faults": 2}
