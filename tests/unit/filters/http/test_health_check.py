"""health_check: config, local answers, pass-through, the failing state and its header."""

from __future__ import annotations

from typing import Any

import pytest

from microenvoy.admin.stats import Store
from microenvoy.core.filter import FactoryContext, FilterStatus
from microenvoy.core.headers import Headers
from microenvoy.filters.http import health_check as hc

from .fakes import FakeCallbacks, callbacks, context, parse, parse_errors, request

HEALTHZ = [{"name": ":path", "string_match": {"exact": "/healthz"}}]


def _factory(pass_through: bool, state: hc.HealthState) -> hc.HealthCheckFactory:
    cfg = parse(hc, {"pass_through_mode": pass_through, "headers": HEALTHZ})
    return hc.make_factory(cfg, context(Store(), health=state))


def _run(factory: hc.HealthCheckFactory, path: str = "/healthz", end_stream: bool = True,
         **extra: Any) -> tuple[hc.HealthCheckFilter, FakeCallbacks, FilterStatus]:  # fmt: skip
    headers, ds = request(path=path, **extra)
    cb = callbacks(headers, ds)
    f = factory.create(cb)
    assert isinstance(f, hc.HealthCheckFilter)
    return f, cb, f.decode_headers(headers, end_stream)


def test_config() -> None:
    cfg = parse(hc, {"pass_through_mode": False, "headers": HEALTHZ})
    assert cfg.pass_through_mode is False
    assert cfg.headers[0].name == ":path"


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"headers": HEALTHZ}, "typed_config.pass_through_mode: required"),
        ({"pass_through_mode": False}, "typed_config.headers: required"),
        ({"pass_through_mode": False, "headers": []}, "typed_config.headers: must not be empty"),
        (
            {"pass_through_mode": "no", "headers": HEALTHZ},
            "typed_config.pass_through_mode: expected true or false",
        ),
        (
            {"pass_through_mode": True, "headers": HEALTHZ, "cache_time": "1s"},
            "typed_config.cache_time: not supported",
        ),
    ],
)
def test_bad_config(raw: object, error: str) -> None:
    errors = parse_errors(hc, raw)
    assert any(e.startswith(error) for e in errors), errors


def test_local_mode_answers_200_then_503_when_failing() -> None:
    state = hc.HealthState()
    factory = _factory(False, state)
    _, cb, status = _run(factory)
    assert status is FilterStatus.STOP
    assert [r.status for r in cb.replies] == [200]
    state.fail()
    f, cb, status = _run(factory)
    (reply,) = cb.replies
    assert reply.status == 503
    assert (hc.IMMEDIATE_FAIL, b"true") in reply.headers
    assert reply.flag == hc.FAILED_LOCAL_HEALTH_CHECK
    resp = Headers([(b":status", b"503"), (hc.IMMEDIATE_FAIL, b"true")])
    f.encode_headers(resp, True)
    assert resp.get_all(hc.IMMEDIATE_FAIL) == [b"true"]  # set, not duplicated
    state.ok()
    _, cb, _ = _run(factory)
    assert [r.status for r in cb.replies] == [200]


def test_local_mode_waits_for_the_end_of_the_request() -> None:
    factory = _factory(False, hc.HealthState())
    f, cb, status = _run(factory, end_stream=False)
    assert status is FilterStatus.STOP
    assert cb.replies == []
    assert f.decode_data(b"x", False) is FilterStatus.STOP
    assert cb.replies == []
    assert f.decode_data(b"", True) is FilterStatus.STOP
    assert [r.status for r in cb.replies] == [200]
    f2, cb2, _ = _run(factory, end_stream=False)
    assert f2.decode_trailers(Headers()) is FilterStatus.STOP
    assert [r.status for r in cb2.replies] == [200]


def test_non_matching_requests_pass() -> None:
    factory = _factory(False, hc.HealthState())
    f, cb, status = _run(factory, path="/healthz/deep")
    assert status is FilterStatus.CONTINUE
    assert f.decode_data(b"x", True) is FilterStatus.CONTINUE
    assert f.decode_trailers(Headers()) is FilterStatus.CONTINUE
    assert cb.replies == []
    assert not f.health_check_request


def test_pass_through_forwards_unless_failing() -> None:
    state = hc.HealthState()
    factory = _factory(True, state)
    f, cb, status = _run(factory)
    assert status is FilterStatus.CONTINUE
    assert cb.replies == []
    assert f.health_check_request
    resp = Headers([(b":status", b"200")])
    f.encode_headers(resp, True)
    assert hc.IMMEDIATE_FAIL not in resp
    state.fail()
    _, cb, status = _run(factory)
    assert status is FilterStatus.STOP
    assert [r.status for r in cb.replies] == [503]


def test_failing_marks_every_response() -> None:
    state = hc.HealthState(failing=True)
    factory = _factory(True, state)
    f, _cb, status = _run(factory, path="/api")
    assert status is FilterStatus.CONTINUE
    resp = Headers([(b":status", b"200")])
    f.encode_headers(resp, False)
    assert resp.get(hc.IMMEDIATE_FAIL) == b"true"
    assert factory.admin_state() == {"failing": True}
    assert "failing" in repr(state)


def test_default_state_is_shared() -> None:
    cfg = parse(hc, {"pass_through_mode": False, "headers": HEALTHZ})
    a = hc.make_factory(cfg, FactoryContext(Store().scope("http.a."), "a", None))
    b = hc.make_factory(cfg, context(Store()))
    assert a.health is hc.DEFAULT_HEALTH
    assert b.health is hc.DEFAULT_HEALTH
