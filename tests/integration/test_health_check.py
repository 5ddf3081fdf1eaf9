"""Active health checking against real peers on loopback, driving ``HealthChecker`` on an ``UpstreamCluster``.

Peers (tests/integration/peers/health_peers.py): a flippable HTTP/1.1 and h2c health endpoint (optionally
TLS), a grpcio ``grpc.health.v1`` server, a TCP ping/pong server, and a closed port. Intervals are tens of
milliseconds and ``no_traffic_interval`` is set small unless the test is about it; every wait is on a
condition with a deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from peers.certs import CertBundle
from peers.common import async_wait_for
from peers.health_peers import FlipHttpServer, GrpcHealthServer, PingPongServer

from microenvoy.admin.stats import Store
from microenvoy.config.health_check import (
    GrpcHealthCheck,
    HealthCheck,
    HttpHealthCheck,
    StatusRange,
    TcpHealthCheck,
)
from microenvoy.config.model import (
    Cluster,
    CommonTlsContext,
    DataSource,
    Endpoint,
    HeaderValueOption,
    SocketAddress,
    StringMatcher,
    UpstreamTlsContext,
)
from microenvoy.core.headers import Headers
from microenvoy.io.health_check import HealthChecker
from microenvoy.io.upstream import UpstreamCluster
from microenvoy.upstream.host import Host

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

WITHIN = 10.0
"""Deadline for conditions that should hold within a few intervals (generous: 2 noisy shared cores)."""


# ------------------------------------------------------------------------------------------ helpers
def make_cluster(name: str, *ports: int, http2: bool = False, **kw: Any) -> UpstreamCluster:
    config = Cluster(
        name,
        endpoints=tuple(Endpoint(SocketAddress("127.0.0.1", p)) for p in ports),
        upstream_protocol="HTTP2" if http2 else "HTTP1",
        connect_timeout=1.0,
        **kw,
    )
    return UpstreamCluster(config, Store())


def hc(**kw: Any) -> HealthCheck:
    base: dict[str, Any] = {
        "timeout": 1.0,
        "interval": 0.05,
        "unhealthy_threshold": 2,
        "healthy_threshold": 2,
        "no_traffic_interval": 0.05,
    }
    base.update(kw)
    if not any(k in kw for k in ("http_health_check", "grpc_health_check", "tcp_health_check")):
        base["http_health_check"] = HttpHealthCheck(path="/healthz")
    return HealthCheck(**base)


class Changes:
    """The ``on_change`` callback: counts calls, snapshots the verdicts and tells the cluster (its balancer
    rebuilds its candidate list), as the agent's wiring does."""

    def __init__(self, cluster: UpstreamCluster) -> None:
        self.cluster = cluster
        self.calls = 0
        self.history: list[tuple[bool, ...]] = []

    def __call__(self) -> None:
        self.calls += 1
        self.history.append(tuple(h.healthy for h in self.cluster.hosts))
        self.cluster.hosts_changed()


class Run:
    """A started checker and its callback, stopped at the end of the ``async with``."""

    def __init__(self, cluster: UpstreamCluster, check: HealthCheck | None, seed: int = 1) -> None:
        self.cluster = cluster
        self.changes = Changes(cluster)
        self.checker = HealthChecker(
            cluster, (check,) if check is not None else (), self.changes, random.Random(seed)
        )

    async def __aenter__(self) -> Run:
        self.checker.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.checker.stop()

    def stat(self, name: str) -> int:
        return self.cluster.stats.counter(f"health_check.{name}").value

    def gauge(self, name: str) -> int:
        return self.cluster.stats.gauge(f"health_check.{name}").value

    @property
    def host(self) -> Host:
        return self.cluster.hosts[0]


async def until(cond: Any, message: str, within: float = WITHIN) -> Any:
    return await async_wait_for(cond, within, interval=0.01, message=message)


@pytest.fixture
async def http_server() -> AsyncIterator[FlipHttpServer]:
    async with FlipHttpServer() as server:
        yield server


@pytest.fixture(scope="module")
def grpc_health() -> Iterator[GrpcHealthServer]:
    with GrpcHealthServer() as server:
        yield server


# ============================================================================================ HTTP/1.1
async def test_http_flip_to_503_and_back(http_server: FlipHttpServer) -> None:
    """503 (not retriable) fails the host at once; healthy_threshold successes bring it back."""
    cluster = make_cluster("web", http_server.port)
    async with Run(cluster, hc(unhealthy_threshold=3, healthy_threshold=2)) as run:
        await asyncio.wait_for(run.checker.first_round, WITHIN)
        assert run.host.healthy
        assert run.gauge("healthy") == 1
        http_server.status = 503
        flipped_at = time.monotonic()
        await until(lambda: not run.host.healthy, "host unhealthy after 503")
        assert run.stat("failure") >= 1
        assert run.stat("network_failure") == 0
        assert run.gauge("healthy") == 0
        # Immediate: the very first 503 flipped it, no threshold counting.
        assert time.monotonic() - flipped_at < 0.05 * 3 + 2.0
        http_server.status = 200
        successes = run.stat("success")
        await until(lambda: run.host.healthy, "host healthy again")
        assert run.stat("success") - successes >= 2  # healthy_threshold
        assert run.changes.history == [(False,), (True,), (False,), (True,)]


async def test_retriable_status_counts_toward_the_threshold(http_server: FlipHttpServer) -> None:
    """A retriable 503 needs unhealthy_threshold checks: the host leaves within interval * threshold."""
    check = hc(
        interval=0.05,
        unhealthy_threshold=3,
        http_health_check=HttpHealthCheck(path="/healthz", retriable_statuses=(StatusRange(503, 504),)),
    )
    async with FlipHttpServer() as other:
        cluster = make_cluster("web", http_server.port, other.port)
        async with Run(cluster, check) as run:
            await asyncio.wait_for(run.checker.first_round, WITHIN)
            bad, good = cluster.hosts
            assert bad.healthy
            assert good.healthy
            failures = run.stat("failure")
            http_server.status = 503
            start = time.monotonic()
            await until(lambda: not bad.healthy, "host unhealthy after three 503s")
            elapsed = time.monotonic() - start
            # Exactly the threshold: two retriable failures left it healthy, the third flipped it.
            assert run.stat("failure") - failures == 3
            assert elapsed >= 2 * 0.05  # three checks are two intervals apart at least
            assert elapsed < 0.05 * 3 + 3.0  # interval * unhealthy_threshold (+ slack for shared cores)
            # Unhealthy hosts leave the rotation (the other host is healthy: no panic).
            picks = {cluster.choose_host() for _ in range(20)}
            assert picks == {good}
            http_server.status = 200
            await until(lambda: bad.healthy, "host back")
            assert {cluster.choose_host() for _ in range(20)} == {bad, good}


async def test_immediate_fail_header(http_server: FlipHttpServer) -> None:
    check = hc(
        unhealthy_threshold=5,
        http_health_check=HttpHealthCheck(path="/healthz", retriable_statuses=(StatusRange(503, 504),)),
    )
    cluster = make_cluster("web", http_server.port)
    async with Run(cluster, check) as run:
        await asyncio.wait_for(run.checker.first_round, WITHIN)
        failures = run.stat("failure")
        http_server.status = 503
        http_server.extra_headers = [(b"x-envoy-immediate-health-check-fail", b"")]
        await until(lambda: not run.host.healthy, "host failed by the header")
        assert run.stat("failure") - failures == 1  # not five: the header bypasses the threshold


async def test_http_request_shape_and_connection_reuse(http_server: FlipHttpServer) -> None:
    check = hc(
        http_health_check=HttpHealthCheck(
            path="/status?probe=1",
            request_headers_to_add=(HeaderValueOption("x-probe", "yes"),),
        )
    )
    cluster = make_cluster("shape", http_server.port)
    async with Run(cluster, check) as run:
        await until(lambda: len(http_server.requests) >= 4, "four checks")
        req = http_server.requests[0]
        assert req[b"user-agent"] == b"Envoy/HC"
        assert req[b"host"] == b"shape"  # no host configured: the cluster name (Envoy)
        assert req[b"x-probe"] == b"yes"
        assert req[b":path"] == b"/status?probe=1"
        assert http_server.connections == 1  # reuse_connection (default): one connection for all checks
        # Checks are not traffic: the cluster's request and connection stats stay untouched.
        assert cluster.stats.counter("upstream_rq_total").value == 0
        assert cluster.stats.counter("upstream_cx_total").value == 0
        assert run.stat("attempt") >= 4


async def test_no_reuse_opens_a_connection_per_check(http_server: FlipHttpServer) -> None:
    check = hc(reuse_connection=False, http_health_check=HttpHealthCheck(path="/h", host="svc.example"))
    cluster = make_cluster("noreuse", http_server.port)
    async with Run(cluster, check):
        await until(lambda: len(http_server.requests) >= 3, "three checks")
        await until(lambda: http_server.connections >= 3, "a connection per check")
        assert http_server.requests[0][b"host"] == b"svc.example"


async def test_server_closing_kept_alive_connections_is_not_a_failure(http_server: FlipHttpServer) -> None:
    http_server.keep_alive = False  # "connection: close" on every answer
    cluster = make_cluster("close", http_server.port)
    async with Run(cluster, hc()) as run:
        await until(lambda: len(http_server.requests) >= 4, "four checks")
        assert run.stat("failure") == 0
        assert run.host.healthy
        assert http_server.connections >= 4


async def test_http_timeout_is_a_network_failure() -> None:
    async with PingPongServer() as silent:  # reads the request, never answers HTTP
        cluster = make_cluster("slow", silent.port)
        async with Run(cluster, hc(timeout=0.1)) as run:
            await asyncio.wait_for(run.checker.first_round, WITHIN)
            assert not run.host.healthy
            await until(lambda: run.stat("network_failure") >= 2, "two timeouts")
            assert run.stat("success") == 0
            assert run.checker._sessions[run.host].health.timed_out
            await until(lambda: silent.connections >= 2, "a new connection after a timeout")


# ============================================================================================ HTTP/2
async def test_http2_check_flip_and_reuse() -> None:
    async with FlipHttpServer(h2c=True) as server:
        cluster = make_cluster("h2", server.port, http2=True)  # codec: as the cluster
        async with Run(cluster, hc()) as run:
            await asyncio.wait_for(run.checker.first_round, WITHIN)
            assert run.host.healthy
            req = server.requests[0]
            assert req[b":authority"] == b"h2"
            assert req[b"user-agent"] == b"Envoy/HC"
            server.status = 500
            await until(lambda: not run.host.healthy, "h2 host unhealthy")
            server.status = 200
            await until(lambda: run.host.healthy, "h2 host healthy")
            assert server.connections == 1


async def test_codec_client_type_overrides_the_cluster_protocol() -> None:
    async with FlipHttpServer(h2c=True) as server:
        cluster = make_cluster("h1cluster", server.port)  # an HTTP/1.1 cluster, checked over HTTP/2
        check = hc(http_health_check=HttpHealthCheck(path="/", codec_client_type="HTTP2"))
        async with Run(cluster, check) as run:
            await asyncio.wait_for(run.checker.first_round, WITHIN)
            assert run.host.healthy
            assert b":authority" in server.requests[0]


# ============================================================================================ TLS
def tls_socket(certs: CertBundle, **kw: Any) -> UpstreamTlsContext:
    common = CommonTlsContext(trusted_ca=DataSource(filename=str(certs.ca_cert)), **kw)
    return UpstreamTlsContext(common, sni="localhost")


async def test_http_check_over_tls(certs: CertBundle) -> None:
    async with FlipHttpServer(ssl_context=certs.server_context(["http/1.1"])) as server:
        cluster = make_cluster("tls", server.port, transport_socket=tls_socket(certs))
        async with Run(cluster, hc()) as run:
            await asyncio.wait_for(run.checker.first_round, WITHIN)
            assert run.host.healthy
            assert run.stat("success") >= 1


async def test_tls_san_mismatch_fails_the_check(certs: CertBundle) -> None:
    async with FlipHttpServer(ssl_context=certs.server_context(["http/1.1"])) as server:
        bad_san = tls_socket(certs, match_subject_alt_names=(StringMatcher("exact", "spiffe://nope"),))
        cluster = make_cluster("tls-san", server.port, transport_socket=bad_san)
        async with Run(cluster, hc()) as run:
            await asyncio.wait_for(run.checker.first_round, WITHIN)
            assert not run.host.healthy
            assert run.stat("network_failure") >= 1
            assert server.requests == []


# ============================================================================================ gRPC
async def test_grpc_serving_not_serving(grpc_health: GrpcHealthServer) -> None:
    grpc_health.set("echo.Echo", "SERVING")
    check = hc(
        grpc_health_check=GrpcHealthCheck(
            service_name="echo.Echo",
            authority="grpc.example",
            initial_metadata=(HeaderValueOption("x-hc-token", "t1"),),
        )
    )
    cluster = make_cluster("grpc", grpc_health.port, http2=True)
    try:
        async with Run(cluster, check) as run:
            await asyncio.wait_for(run.checker.first_round, WITHIN)
            assert run.host.healthy
            service, metadata = grpc_health.calls[-1]
            assert service == "echo.Echo"
            assert ("x-hc-token", "t1") in metadata
            grpc_health.set("echo.Echo", "NOT_SERVING")
            await until(lambda: not run.host.healthy, "NOT_SERVING -> unhealthy")
            assert run.stat("network_failure") == 0
            grpc_health.set("echo.Echo", "SERVING")
            await until(lambda: run.host.healthy, "SERVING -> healthy")
    finally:
        grpc_health.set("echo.Echo", "SERVING")


async def test_grpc_whole_server_and_unknown_service(grpc_health: GrpcHealthServer) -> None:
    cluster = make_cluster("grpc-all", grpc_health.port, grpc_health.port, http2=True)
    async with Run(cluster, hc(grpc_health_check=GrpcHealthCheck())) as run:  # service "" = the server
        await asyncio.wait_for(run.checker.first_round, WITHIN)
        assert all(h.healthy for h in cluster.hosts)
    cluster = make_cluster("grpc-unknown", grpc_health.port, http2=True)
    async with Run(cluster, hc(grpc_health_check=GrpcHealthCheck(service_name="no.such.Service"))) as run:
        await asyncio.wait_for(run.checker.first_round, WITHIN)
        assert not run.host.healthy  # NOT_FOUND grpc-status
        await until(lambda: run.stat("failure") >= 2, "two failures")
        assert run.stat("network_failure") == 0  # the server answered: an active failure


# ============================================================================================ TCP
async def test_tcp_send_receive() -> None:
    check = hc(tcp_health_check=TcpHealthCheck(send=b"PING", receive=(b"PO", b"NG")))
    async with PingPongServer() as server:
        cluster = make_cluster("tcp", server.port)
        async with Run(cluster, check) as run:
            await asyncio.wait_for(run.checker.first_round, WITHIN)
            assert run.host.healthy
            await until(lambda: server.pings >= 3, "three pings")
            assert server.connections == 1  # reused: the check expects a reply
            server.silent = True
            await until(lambda: not run.host.healthy, "silent server -> timeouts -> unhealthy")
            assert run.stat("network_failure") >= 2  # unhealthy_threshold timeouts


async def test_tcp_connect_only(dead_port: int) -> None:
    async with PingPongServer() as server:
        cluster = make_cluster("tcp-connect", server.port, dead_port)
        async with Run(cluster, hc(tcp_health_check=TcpHealthCheck())) as run:
            await asyncio.wait_for(run.checker.first_round, WITHIN)
            live, dead = cluster.hosts
            assert live.healthy
            assert not dead.healthy
            await until(lambda: server.connections >= 3, "a connection per connect-only check")
            assert run.stat("network_failure") >= 1
            assert run.gauge("healthy") == 1


async def test_tcp_listener_goes_away() -> None:
    check = hc(tcp_health_check=TcpHealthCheck(), unhealthy_threshold=2)
    server = PingPongServer()
    await server.__aenter__()
    cluster = make_cluster("tcp-gone", server.port)
    async with Run(cluster, check) as run:
        await asyncio.wait_for(run.checker.first_round, WITHIN)
        assert run.host.healthy
        await server.__aexit__(None, None, None)
        await until(lambda: not run.host.healthy, "closed port -> unhealthy")
        assert run.stat("network_failure") >= 2


# ============================================================================================ lifecycle
async def test_first_round_waits_for_every_host(http_server: FlipHttpServer, dead_port: int) -> None:
    cluster = make_cluster("warm", http_server.port, dead_port)
    run = Run(cluster, hc(initial_jitter=0.2, healthy_threshold=3))
    checker = run.checker
    assert all(h.healthy for h in cluster.hosts)  # before start: no verdict, nothing changed
    async with run:
        assert not any(h.healthy for h in cluster.hosts)  # unhealthy-pending from start()
        assert not checker.first_round.done()
        await asyncio.wait_for(checker.first_round, WITHIN)
        good, bad = cluster.hosts
        assert good.healthy  # one success suffices at startup, despite healthy_threshold 3
        assert not bad.healthy
        assert run.changes.calls >= 2  # start() (all to unhealthy) and the first success


async def test_no_checks_means_no_verdicts(http_server: FlipHttpServer) -> None:
    cluster = make_cluster("plain", http_server.port)
    async with Run(cluster, None) as run:
        assert run.checker.first_round.done()
        assert run.host.healthy
        assert run.changes.calls == 0
        assert http_server.requests == []


async def test_hosts_changed(http_server: FlipHttpServer) -> None:
    async with FlipHttpServer() as second:
        cluster = make_cluster("dyn", http_server.port)
        async with Run(cluster, hc()) as run:
            await asyncio.wait_for(run.checker.first_round, WITHIN)
            old = cluster.hosts[0]
            new = Host(("127.0.0.1", second.port))
            cluster.set_hosts([new])
            run.checker.hosts_changed()
            assert not new.healthy  # a new host starts unhealthy-pending
            await until(lambda: new.healthy, "new host checked and healthy")
            assert old not in run.checker._sessions
            seen = len(http_server.requests)
            await until(lambda: len(second.requests) >= seen + 5, "five more checks of the new host")
            assert len(http_server.requests) <= seen + 1  # at most one check was already in flight
            assert run.gauge("healthy") == 1


async def test_stop_cancels_checks_and_closes_connections(http_server: FlipHttpServer) -> None:
    cluster = make_cluster("stop", http_server.port)
    run = Run(cluster, hc(initial_jitter=30.0))
    run.checker.start()
    first_round = run.checker.first_round
    await run.checker.stop()
    assert first_round.cancelled()  # stopped before any verdict
    cluster = make_cluster("stop2", http_server.port)
    async with Run(cluster, hc()) as run2:
        await until(lambda: len(http_server.requests) >= 2, "checks")
    await until(lambda: http_server.open_connections == 0, "server saw the check connection close")
    n = len(http_server.requests)
    assert repr(run2.checker).startswith("<HealthChecker stop2 http stopped")
    # No check runs after stop(): a fresh cluster probing the same server shows the count moving only then.
    async with Run(make_cluster("stop3", http_server.port), hc()):
        await until(lambda: len(http_server.requests) > n, "a new checker's check")


async def test_no_traffic_interval_until_the_cluster_carries_traffic(http_server: FlipHttpServer) -> None:
    cluster = make_cluster("idle", http_server.port)
    check = hc(interval=0.01, no_traffic_interval=0.3)
    async with Run(cluster, check):
        await until(lambda: len(http_server.requests) >= 3, "three idle checks")
        stamps = list(http_server.times)
        idle_gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert min(idle_gaps) >= 0.25  # no traffic: no_traffic_interval between checks
        # Real traffic through the cluster's own pool.
        host = cluster.hosts[0]
        headers = Headers(
            [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/traffic")]
        )
        stream = await cluster.open_stream(host, headers, end_stream=True)
        await stream.read_headers()
        while await stream.read_body() is not None:
            pass
        assert cluster.stats.counter("upstream_rq_total").value == 1
        # The next idle-scheduled check fires, then checks run at ``interval``.
        before = len(http_server.requests)
        start = time.monotonic()
        await until(lambda: len(http_server.requests) >= before + 12, "fast checks after traffic")
        assert time.monotonic() - start < 12 * 0.3  # far quicker than no_traffic_interval pacing
    cluster.close()


async def test_immediate_failure_reported_from_traffic(http_server: FlipHttpServer) -> None:
    cluster = make_cluster("passive", http_server.port)
    async with Run(cluster, hc(unhealthy_threshold=5, interval=0.2)) as run:
        await asyncio.wait_for(run.checker.first_round, WITHIN)
        assert run.host.healthy
        calls = run.changes.calls
        run.checker.report_immediate_failure(run.host)
        assert not run.host.healthy  # at once, no threshold
        assert run.stat("passive_failure") == 1
        assert run.changes.calls == calls + 1
        await until(lambda: run.host.healthy, "the endpoint still answers 200: healthy again")
        run.checker.report_immediate_failure(Host(("127.0.0.1", 1)))  # not a checked host: ignored
        assert run.stat("passive_failure") == 1
