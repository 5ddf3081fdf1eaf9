"""Cluster resilience end to end: a real agent in front of three real upstream processes on loopback.

The upstreams are ``peers/counting_upstream.py`` processes (HTTP/1.1 + h2c): they count requests per path,
answer ``x-upstream-id``, can be SIGKILLed and restarted on the same port, and flip their ``/health``.
Clients are the asyncio HTTP/2 client of ``peers/`` (many concurrent streams) and the blocking HTTP/1.1 one.

* outlier detection + retries: one of three upstreams killed under concurrent load -> no client sees an
  error, ``/clusters`` shows ``/failed_outlier_check``, the host comes back after its ejection time;
* active health checking: ``/health`` flipped to 503 -> out of rotation within ``interval *
  unhealthy_threshold`` (``/failed_active_hc``), back after flipping it again;
* circuit breaker: 50 concurrent slow requests against ``max_requests: 10`` -> exactly 40 overflow 503s
  with ``x-envoy-overloaded``, response flag ``UO`` and ``upstream_rq_pending_overflow`` = 40;
* distribution, from the upstreams' own counters: weighted round robin (exact 1:2:3), least request (a
  slow host gets little), MAGLEV and RING_HASH on a header (sticky per user, spread over all hosts).

Nothing sleeps to synchronise: every wait polls a condition (``/clusters``, stats, counters) with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import configs as C
from peers.agent import Agent
from peers.common import Response, async_wait_for, wait_for
from peers.counting_upstream import UpstreamGroup
from peers.h1_client import H1Connection
from peers.h2_client import H2Client

pytestmark = pytest.mark.timeout(60)

Factory = Any  # the conftest's agent factory


@pytest.fixture
def upstreams(tmp_path: Path) -> Iterator[UpstreamGroup]:
    """Three counting upstreams ``a``, ``b``, ``c`` for one test (tests kill and flip them)."""
    with UpstreamGroup(tmp_path / "upstreams", 3) as group:
        yield group


@pytest.fixture(scope="module")
def shared_upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamGroup]:
    """Three counting upstreams for the distribution tests (they only read counters of their own paths)."""
    with UpstreamGroup(tmp_path_factory.mktemp("shared-upstreams"), 3) as group:
        yield group


# ------------------------------------------------------------------------------------------------ helpers
def listener(routes: list[dict[str, Any]], **hcm_extra: Any) -> dict[str, Any]:
    return C.tcp_listener("http", C.hcm("res", routes, **hcm_extra))


def host_flags(agent: Agent, cluster: str) -> dict[int, str]:
    """``{port: health_flags}`` of ``cluster``'s hosts from ``/clusters`` (Envoy's text format)."""
    status, body = agent.admin_get("/clusters")
    assert status == 200, body
    out: dict[int, str] = {}
    for line in body.decode().splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster and parts[2] == "health_flags":
            out[int(parts[1].rpartition(":")[2])] = parts[3]
    return out


def flags_of(agent: Agent, cluster: str, port: int) -> str:
    return host_flags(agent, cluster).get(port, "<host missing>")


async def has_flag(agent: Agent, cluster: str, port: int, flag: str) -> bool:
    return flag in await asyncio.to_thread(flags_of, agent, cluster, port)


async def lacks_flag(agent: Agent, cluster: str, port: int, flag: str) -> bool:
    text = await asyncio.to_thread(flags_of, agent, cluster, port)
    return flag not in text and text != "<host missing>"


class Load:
    """Closed-loop GETs on ``clients`` HTTP/2 connections to the agent; records every outcome."""

    def __init__(self, port: int, path: str, clients: int = 6) -> None:
        self.port = port
        self.path = path
        self.clients = clients
        self.ok = 0
        self.by_upstream: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self, n: int) -> None:
        async with H2Client("127.0.0.1", self.port) as c:
            i = 0
            while not self._stop.is_set():
                i += 1
                try:
                    r = await c.request("GET", f"{self.path}?c={n}&i={i}", within=10)
                except Exception as exc:
                    self.failures.append(f"client {n} request {i}: {exc!r}")
                    return
                if r.status == 200:
                    self.ok += 1
                    self.by_upstream[r.header("x-upstream-id") or "?"] += 1
                else:
                    self.failures.append(f"client {n} request {i}: {r.status} {r.body[:80]!r}")

    def start(self) -> Load:
        self._tasks = [asyncio.ensure_future(self._client(n)) for n in range(self.clients)]
        return self

    async def progress(self, more: int, within: float = 10.0) -> None:
        """Wait until ``more`` further requests succeeded (fails early if a client failed)."""
        target = self.ok + more

        def check() -> bool:
            if self.failures:
                raise AssertionError(f"client failures: {self.failures[:5]}")
            return self.ok >= target

        await async_wait_for(check, within, message=f"{more} more successful requests (at {self.ok})")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 15)


def get_seq(port: int, path: str, n: int, headers: tuple[tuple[str, str], ...] = ()) -> list[Response]:
    """``n`` sequential GETs on one HTTP/1.1 keep-alive connection."""
    with H1Connection("127.0.0.1", port) as c:
        return [c.request("GET", path, headers) for _ in range(n)]


# ====================================================================================== outlier detection
async def test_killed_upstream_is_ejected_and_returns(agent: Factory, upstreams: UpstreamGroup) -> None:
    routes = [C.route("/", "svc", route_extra={"retry_policy": C.retry_policy("connect-failure,reset,5xx")})]
    svc = C.cluster(
        "svc",
        upstreams.ports,
        connect_timeout="0.5s",
        outlier_detection=C.outlier_detection(
            consecutive_5xx=3, consecutive_gateway_failure=3, interval="0.2s", base_ejection_time="1s"
        ),
        # Envoy's default max_retries (3 concurrent retries) would turn the burst of retries at the kill
        # (every request in flight on the victim at once) into client-visible 503s
        circuit_breakers=C.circuit_breakers(max_retries=100),
    )
    a: Agent = agent(C.bootstrap([listener(routes)], [svc]), name="outlier")
    victim = upstreams["b"]
    load = Load(a.port("http"), "/work", clients=6).start()
    try:
        await load.progress(60)
        await async_wait_for(lambda: len(load.by_upstream) == 3, 10, message="traffic on all three upstreams")

        await asyncio.to_thread(victim.kill)
        killed_at = time.monotonic()
        await async_wait_for(
            lambda: has_flag(a, "svc", victim.port, "/failed_outlier_check"),
            5,
            message="the killed host marked /failed_outlier_check",
        )
        ejected_after = time.monotonic() - killed_at
        await load.progress(60)  # the load goes on around the ejected host without errors

        await asyncio.to_thread(victim.restart)
        assert victim.port == upstreams.ports[1]
        await async_wait_for(
            lambda: lacks_flag(a, "svc", victim.port, "/failed_outlier_check"),
            10,
            message="the ejection ends after base_ejection_time",
        )
        back_after = time.monotonic() - killed_at
        await async_wait_for(
            lambda: asyncio.to_thread(lambda: victim.path_count("/work") >= 5),
            10,
            message="the restarted host receives traffic again",
        )
        await load.progress(30)
    finally:
        await load.stop()
    assert load.failures == []
    assert load.ok >= 150
    assert ejected_after < 5
    assert back_after >= 1.0  # base_ejection_time
    stats = await asyncio.to_thread(a.stats)
    assert stats.get("cluster.svc.outlier_detection.ejections_enforced_total", 0) >= 1
    assert stats.get("cluster.svc.upstream_rq_retry", 0) >= 1


# ====================================================================================== health checking
@pytest.mark.parametrize("retriable", [True, False], ids=["503-retriable", "503-immediate"])
def test_failing_health_check_removes_host_and_it_returns(
    agent: Factory, upstreams: UpstreamGroup, retriable: bool
) -> None:
    """As in Envoy, a status listed in ``retriable_statuses`` counts toward ``unhealthy_threshold``; any other
    unexpected status (the plain case) marks the host unhealthy at the first failed check."""
    interval, threshold = 0.2, 2
    hc = C.http_health_check(
        "/health",
        interval=f"{interval}s",
        unhealthy_threshold=threshold,
        retriable_statuses=[(503, 504)] if retriable else [],
    )
    svc = C.cluster("hc", upstreams.ports, health_checks=[hc])
    a: Agent = agent(C.bootstrap([listener([C.route("/", "hc")])], [svc]), name="hc")
    port = a.port("http")
    victim = upstreams["b"]
    wait_for(lambda: all(u.path_count("/health") >= 1 for u in upstreams), 5, message="health checks running")
    wait_for(
        lambda: all(f == "healthy" for f in host_flags(a, "hc").values()), 5, message="all hosts healthy"
    )
    get_seq(port, "/before", 30)
    assert all(n > 0 for n in upstreams.path_counts("/before").values()), upstreams.path_counts("/before")

    needed = threshold if retriable else 1
    checks_before = victim.path_count("/health")
    failures_before = a.stat("cluster.hc.health_check.failure")
    flipped_at = time.monotonic()
    victim.set_health(503)
    wait_for(
        lambda: "/failed_active_hc" in flags_of(a, "hc", victim.port),
        5,
        interval=0.01,
        message="/failed_active_hc on the host whose /health answers 503",
    )
    removed_after = time.monotonic() - flipped_at
    # the failures needed were counted, and they took at most that many intervals (+ scheduling slack)
    assert victim.path_count("/health") - checks_before >= needed
    assert removed_after <= interval * needed + 0.5, f"removed after {removed_after:.3f} s"
    assert a.stat("cluster.hc.health_check.failure") - failures_before >= needed

    statuses = [r.status for r in get_seq(port, "/during", 30)]
    assert statuses == [200] * 30
    during = upstreams.path_counts("/during")
    assert during["b"] == 0, during
    assert during["a"] + during["c"] == 30

    victim.set_health(200)
    wait_for(lambda: flags_of(a, "hc", victim.port) == "healthy", 5, message="the host healthy again")
    get_seq(port, "/after", 30)
    assert upstreams.path_counts("/after")["b"] > 0


# ====================================================================================== circuit breakers
async def test_circuit_breaker_max_requests(agent: Factory, upstreams: UpstreamGroup, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    access_log = C.file_access_log(
        log, {"code": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%", "path": "%REQ(:PATH)%"}
    )
    svc = C.cluster(
        "cb",
        upstreams.ports,
        circuit_breakers=C.circuit_breakers(max_requests=10, max_pending_requests=1000, max_connections=1000),
    )
    a: Agent = agent(C.bootstrap([listener([C.route("/", "cb")], access_log=access_log)], [svc]), name="cb")
    async with H2Client("127.0.0.1", a.port("http")) as c:
        rs = await asyncio.gather(*(c.request("GET", f"/slow?ms=1500&n={i}", within=20) for i in range(50)))
    by_status = Counter(r.status for r in rs)
    assert by_status == {200: 10, 503: 40}, by_status
    for r in rs:
        if r.status == 503:
            assert r.header("x-envoy-overloaded") == "true", r.headers
        else:
            assert r.header("x-envoy-overloaded") is None
            assert r.header("x-upstream-id") in ("a", "b", "c")
    assert sum(upstreams.path_counts("/slow").values()) == 10
    assert sum(u.counts()["max_active"] for u in upstreams) <= 10
    assert a.wait_stat("cluster.cb.upstream_rq_pending_overflow", 40) == 40

    def lines() -> list[dict[str, str]] | None:
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
        return rows if len(rows) >= 50 else None

    rows = wait_for(lines, 10, message="50 access log lines")
    # str(): Envoy renders a lone %RESPONSE_CODE% in json_format as a number
    assert Counter((str(row["code"]), row["flags"]) for row in rows) == {("200", "-"): 10, ("503", "UO"): 40}


# ====================================================================================== distribution
@pytest.fixture(scope="module")
def dist_agent(module_agent: Factory, shared_upstreams: UpstreamGroup) -> Agent:
    ports = shared_upstreams.ports
    routes = [C.route("/wrr/", "wrr"), C.route("/lr/", "lr")]
    clusters = [
        C.weighted_cluster("wrr", [(ports[0], 1), (ports[1], 2), (ports[2], 3)]),
        C.cluster("lr", ports, lb_policy="LEAST_REQUEST"),
    ]
    agent: Agent = module_agent(C.bootstrap([listener(routes)], clusters), name="dist")
    return agent


def test_weighted_round_robin_exact_proportions(dist_agent: Agent, shared_upstreams: UpstreamGroup) -> None:
    rs = get_seq(dist_agent.port("http"), "/wrr/x", 60)
    assert [r.status for r in rs] == [200] * 60
    assert shared_upstreams.path_counts("/wrr/x") == {"a": 10, "b": 20, "c": 30}
    # smooth: every window of 6 consecutive picks holds the exact 1:2:3 proportions
    ids = [r.header("x-upstream-id") for r in rs]
    for start in range(0, 60, 6):
        assert Counter(ids[start : start + 6]) == {"a": 1, "b": 2, "c": 3}, ids[start : start + 6]


async def test_least_request_avoids_slow_host(dist_agent: Agent, shared_upstreams: UpstreamGroup) -> None:
    slow = shared_upstreams["a"]
    await asyncio.to_thread(slow.set_delay, 300)
    try:
        async with H2Client("127.0.0.1", dist_agent.port("http")) as c:

            async def client(n: int) -> list[int]:
                return [(await c.request("GET", f"/lr/x?c={n}", within=20)).status for _ in range(30)]

            statuses = [s for batch in await asyncio.gather(*(client(n) for n in range(8))) for s in batch]
    finally:
        await asyncio.to_thread(slow.set_delay, 0)
    n = 8 * 30
    assert statuses == [200] * n
    counts = await asyncio.to_thread(shared_upstreams.path_counts, "/lr/x")
    assert sum(counts.values()) == n
    # round robin or random would give the slow host a third (80); two choices give it ~1/8 (~30)
    assert counts["a"] < 0.22 * n, counts
    assert counts["b"] > 0.3 * n, counts
    assert counts["c"] > 0.3 * n, counts


@pytest.mark.parametrize("policy", ["MAGLEV", "RING_HASH"])
def test_consistent_hash_on_header(agent: Factory, upstreams: UpstreamGroup, policy: str) -> None:
    route = C.route("/", "hash", route_extra={"hash_policy": C.hash_policy_header("x-user")})
    a: Agent = agent(C.bootstrap([listener([route])], [C.cluster("hash", upstreams.ports, lb_policy=policy)]))
    port = a.port("http")
    placement: dict[str, set[str]] = {}
    with H1Connection("127.0.0.1", port) as c:
        for round_ in range(3):
            for user in range(60):
                r = c.request("GET", f"/u?round={round_}", (("x-user", f"user-{user}"),))
                assert r.status == 200
                placement.setdefault(f"user-{user}", set()).add(r.header("x-upstream-id") or "?")
    moved = {user: ids for user, ids in placement.items() if len(ids) != 1}
    assert moved == {}, f"users that landed on more than one upstream: {moved}"
    spread = Counter(next(iter(ids)) for ids in placement.values())
    assert set(spread) == {"a", "b", "c"}, spread
    assert min(spread.values()) >= 5, spread  # 60 users over 3 hosts: ~20 each
    assert sum(upstreams.path_counts("/u").values()) == 180
