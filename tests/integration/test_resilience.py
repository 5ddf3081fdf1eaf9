"""Retries, timeouts and live reload against an upstream that fails on purpose (the h2 test server).

* retries on 5xx, reset, refused-stream and connect-failure, counted in ``cluster.<name>.upstream_rq_retry``;
  exhausted retries and routes without a retry policy pass the failure through;
* per-try timeout (retried) and route timeout (504, ``upstream_rq_timeout``);
* SIGHUP reload under load with zero failed requests; a new route is visible only after the reload; an
  invalid config is rejected and the old one keeps serving; SIGTERM exits cleanly.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import uuid
from typing import Any

import pytest
from peers import configs as C
from peers.agent import Agent
from peers.common import async_wait_for, wait_for
from peers.h1_client import h1_request
from peers.h2_client import H2Client
from peers.h2_server import H2Server

RETRY_ALL = {
    "retry_on": "5xx,reset,connect-failure,refused-stream",
    "num_retries": 3,
    "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.05s"},
}


def uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def res(module_agent: Any, h2_server: H2Server, unused_port: int) -> Agent:
    routes = [
        C.route("/fail/", "h2", route_extra={"retry_policy": RETRY_ALL}),
        C.route("/plain/", "h2", route_extra={"prefix_rewrite": "/"}),
        C.route(
            "/per-try/",
            "h2",
            route_extra={
                "prefix_rewrite": "/",
                "timeout": "5s",
                "retry_policy": {
                    "retry_on": "5xx,reset",
                    "num_retries": 2,
                    "per_try_timeout": "0.3s",
                    "retry_back_off": {"base_interval": "0.01s"},
                },
            },
        ),
        C.route("/slow/", "h2", route_extra={"prefix_rewrite": "/", "timeout": "0.5s"}),
        C.route("/mixed/", "mixed", route_extra={"prefix_rewrite": "/", "retry_policy": RETRY_ALL}),
        C.route(
            "/no-retry-slots/",
            "no_retry_slots",
            route_extra={"prefix_rewrite": "/", "retry_policy": RETRY_ALL},
        ),
    ]
    config = C.bootstrap(
        [C.tcp_listener("tcp", C.hcm("res", routes))],
        [
            C.cluster("h2", h2_server.port, http2=True),
            C.cluster("mixed", [unused_port, h2_server.port], http2=True, connect_timeout="0.5s"),
            C.cluster(
                "no_retry_slots",
                h2_server.port,
                http2=True,
                circuit_breakers=C.circuit_breakers(max_retries=0),
            ),
        ],
    )
    return module_agent(config, name="res")


def get(agent: Agent, path: str) -> Any:
    return h1_request("127.0.0.1", agent.port("tcp"), "GET", path)


# ================================================================================== retries
def test_retry_on_5xx(res: Agent, h2_server: H2Server) -> None:
    path = f"/fail/2/five-{uid()}"
    before = res.stat("cluster.h2.upstream_rq_retry")
    r = get(res, path)
    assert r.status == 200
    assert h2_server.count(path) == 3
    assert res.wait_stat("cluster.h2.upstream_rq_retry", before + 2) >= before + 2


def test_retry_on_reset(res: Agent, h2_server: H2Server) -> None:
    path = f"/fail/2/reset-{uid()}"
    r = get(res, path + "?mode=reset")
    assert r.status == 200
    assert h2_server.count(path) == 3


def test_retry_on_refused_stream(res: Agent, h2_server: H2Server) -> None:
    path = f"/fail/1/refused-{uid()}"
    r = get(res, path + "?mode=reset&code=7")
    assert r.status == 200
    assert h2_server.count(path) == 2


def test_retries_exhausted_pass_failure_through(res: Agent, h2_server: H2Server) -> None:
    path = f"/fail/10/exhaust-{uid()}"
    r = get(res, path)
    assert r.status == 503
    assert h2_server.count(path) == 4  # the first try and num_retries=3
    res.wait_stat("cluster.h2.upstream_rq_retry_limit_exceeded", 1)


def test_retry_circuit_breaker_full_passes_the_failure_through(res: Agent, h2_server: H2Server) -> None:
    """max_retries: 0 -> the retry policy wants a retry, the breaker refuses it (counted)."""
    key = f"cb-{uid()}"
    r = get(res, f"/no-retry-slots/fail/1/{key}")
    assert r.status == 503
    assert h2_server.count(f"/fail/1/{key}") == 1
    assert res.wait_stat("cluster.no_retry_slots.upstream_rq_retry_overflow", 1) >= 1
    assert res.stat("cluster.no_retry_slots.upstream_rq_retry") == 0


def test_no_retry_policy_no_retry(res: Agent, h2_server: H2Server) -> None:
    key = f"nr-{uid()}"
    r = get(res, f"/plain/fail/1/{key}")
    assert r.status == 503
    assert h2_server.count(f"/fail/1/{key}") == 1


def test_upstream_reset_without_retry_is_503(res: Agent) -> None:
    before = res.stat("http.res.downstream_rq_5xx")
    r = get(res, "/plain/reset")
    assert r.status == 503
    res.wait_stat("http.res.downstream_rq_5xx", before + 1)


def test_retry_on_connect_failure(res: Agent, h2_server: H2Server) -> None:
    key = uid()
    statuses = [get(res, f"/mixed/cf-{key}-{i}").status for i in range(6)]
    assert statuses == [200] * 6
    assert sum(h2_server.count(f"/cf-{key}-{i}") for i in range(6)) == 6
    res.wait_stat("cluster.mixed.upstream_cx_connect_fail", 1)
    res.wait_stat("cluster.mixed.upstream_rq_retry", 1)


# ================================================================================== timeouts
def test_per_try_timeout_then_retry_succeeds(res: Agent, h2_server: H2Server) -> None:
    key = f"pt-{uid()}"
    start = time.monotonic()
    r = get(res, f"/per-try/fail/1/{key}?mode=delay&ms=4000")
    elapsed = time.monotonic() - start
    assert r.status == 200
    assert elapsed < 3.0  # the slow first try was abandoned after 0.3 s
    assert h2_server.count(f"/fail/1/{key}") == 2
    res.wait_stat("cluster.h2.upstream_rq_per_try_timeout", 1)


def test_route_timeout_gives_504(res: Agent) -> None:
    before = res.stat("cluster.h2.upstream_rq_timeout")
    start = time.monotonic()
    r = get(res, "/slow/delay/4000")
    elapsed = time.monotonic() - start
    assert r.status == 504
    assert 0.4 <= elapsed < 3.0
    res.wait_stat("cluster.h2.upstream_rq_timeout", before + 1)


async def test_route_timeout_over_http2_resets_upstream(res: Agent, h2_server: H2Server) -> None:
    resets = h2_server.resets_received
    async with H2Client("127.0.0.1", res.port("tcp")) as c:
        r = await c.request("GET", "/slow/delay/4000")
        ok = await c.request("GET", "/plain/after-timeout")  # the connection is still usable
    assert r.status == 504
    assert ok.status == 200
    # the agent cancelled the upstream stream rather than leaving it running
    await async_wait_for(lambda: h2_server.resets_received > resets, 5, message="upstream RST_STREAM")


# ================================================================================== reload
def _reload_config(
    h2_server: H2Server, *, with_new_route: bool, lb_policy: str = "ROUND_ROBIN"
) -> dict[str, Any]:
    routes = [C.route("/load/", "h2"), C.route("/delay/", "h2")]
    if with_new_route:
        routes.append(C.route(path="/new", direct=(200, "fresh route")))
    routes.append(C.route("/", direct=(404, "no such route")))
    return C.bootstrap(
        [C.tcp_listener("tcp", C.hcm("reload", routes), drain_timeout="1s")],
        [C.cluster("h2", h2_server.port, http2=True, lb_policy=lb_policy)],
    )


async def test_sighup_reload_under_load(agent: Any, h2_server: H2Server) -> None:
    a: Agent = agent(_reload_config(h2_server, with_new_route=False), name="reload")
    port = a.port("tcp")
    ports_before = a.listeners()
    assert (await asyncio.to_thread(h1_request, "127.0.0.1", port, "GET", "/new")).status == 404

    stop = asyncio.Event()
    done = [0]
    failures: list[str] = []

    def record(what: str, status: int) -> None:
        if status == 200:
            done[0] += 1
        else:
            failures.append(f"{what}: status {status}")

    async def persistent(n: int) -> None:
        async with H2Client("127.0.0.1", port) as c:
            while not stop.is_set():
                try:
                    record("persistent", (await c.request("GET", f"/load/p{n}")).status)
                except Exception as exc:
                    failures.append(f"persistent: {exc!r}")
                    return

    async def fresh_h2() -> None:
        while not stop.is_set():
            try:
                async with H2Client("127.0.0.1", port) as c:
                    record("fresh h2", (await c.request("GET", "/load/f")).status)
            except Exception as exc:
                failures.append(f"fresh h2: {exc!r}")

    async def fresh_h1() -> None:
        while not stop.is_set():
            try:
                r = await asyncio.to_thread(h1_request, "127.0.0.1", port, "GET", "/load/h1")
                record("fresh h1", r.status)
            except Exception as exc:
                failures.append(f"fresh h1: {exc!r}")

    tasks = [asyncio.ensure_future(t) for t in (persistent(1), persistent(2), fresh_h2(), fresh_h1())]
    try:
        async with H2Client("127.0.0.1", port) as slow:
            await async_wait_for(lambda: done[0] >= 30, 20, message="load running")
            # a request in flight across the reload must complete on its connection
            in_flight = asyncio.ensure_future(slow.request("GET", "/delay/1500"))
            at_reload = done[0]
            await asyncio.to_thread(a.reload, _reload_config(h2_server, with_new_route=True))
            await async_wait_for(lambda: done[0] >= at_reload + 30, 20, message="load after reload")
            assert (await asyncio.wait_for(in_flight, 10)).status == 200
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
    assert failures == []
    assert done[0] >= 60
    r = await asyncio.to_thread(h1_request, "127.0.0.1", port, "GET", "/new")
    assert r.status == 200
    assert r.body == b"fresh route"
    assert a.listeners() == ports_before  # unchanged listeners keep their sockets
    assert a.running


def test_invalid_reload_rejected_old_config_serves(agent: Any, h2_server: H2Server) -> None:
    a: Agent = agent(_reload_config(h2_server, with_new_route=False), name="badreload")
    port = a.port("tcp")
    assert h1_request("127.0.0.1", port, "GET", "/load/x").status == 200
    bad = _reload_config(h2_server, with_new_route=True, lb_policy="ROUND_ROBBIN")
    a.reload(bad, expect_rejected="ROUND_ROBBIN")
    assert a.running
    assert h1_request("127.0.0.1", port, "GET", "/load/after-bad-reload").status == 200
    assert h1_request("127.0.0.1", port, "GET", "/new").status == 404  # nothing of the bad config applied
    # a good config after the bad one still applies
    a.reload(_reload_config(h2_server, with_new_route=True))
    assert h1_request("127.0.0.1", port, "GET", "/new").status == 200


def test_sigterm_drains_and_exits_cleanly(agent: Any, h2_server: H2Server) -> None:
    a: Agent = agent(_reload_config(h2_server, with_new_route=False), name="term")
    assert h1_request("127.0.0.1", a.port("tcp"), "GET", "/load/x").status == 200
    start = time.monotonic()
    a.signal(signal.SIGTERM)
    assert a.proc is not None
    rc = a.proc.wait(10)
    assert rc == 0
    assert time.monotonic() - start < 5.0


def test_reloads_reuse_the_access_log_file(agent: Any, h2_server: H2Server, tmp_path: Any) -> None:
    """Reloading with the same access_log keeps one logger and one open file, however many reloads."""
    log = tmp_path / "access.log"

    def config(with_new_route: bool) -> dict[str, Any]:
        doc = _reload_config(h2_server, with_new_route=with_new_route)
        hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["access_log"] = C.file_access_log(log, {"code": "%RESPONSE_CODE%"})
        return doc

    a: Agent = agent(config(False), name="logreload")

    def logged_lines() -> int:
        return len(log.read_text().splitlines()) if log.exists() else 0

    for i in range(3):  # a logged request (the logger opens its file), then a reload
        assert h1_request("127.0.0.1", a.port("tcp"), "GET", "/load/x").status == 200
        wait_for(lambda n=i: logged_lines() > n, 10, message="the access log line")
        a.reload(config(i % 2 == 0))
    assert a.proc is not None
    fd_dir = f"/proc/{a.proc.pid}/fd"
    import os

    open_logs = [fd for fd in os.listdir(fd_dir) if os.path.realpath(f"{fd_dir}/{fd}") == str(log)]
    assert len(open_logs) <= 1
