"""The HTTP filters in a real agent, one listener per filter so their effects do not mix: local_ratelimit
(429), rbac (403 by path, header and source IP), fault (abort, delay), health_check with the admin's
``/healthcheck/fail|ok``, and route/virtual-host header mutation as the upstream sees it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from peers import configs as C
from peers.agent import Agent
from peers.common import pairs_to_dict
from peers.h1_client import H1Connection, h1_request
from peers.h2_client import H2Client
from peers.h2_server import H2Server


@pytest.fixture(scope="module")
def filters(module_agent: Any, h2_server: H2Server) -> Agent:
    to_h2 = [C.route("/", "h2")]
    rbac_deny = C.filter_rbac(
        "DENY",
        {
            "deny-admin-paths": {
                "permissions": [{"url_path": {"path": {"prefix": "/admin"}}}],
                "principals": [{"any": True}],
            },
            "deny-mallory": {
                "permissions": [{"any": True}],
                "principals": [{"header": {"name": "x-user", "string_match": {"exact": "mallory"}}}],
            },
        },
    )
    rbac_allow_lan_only = C.filter_rbac(
        "ALLOW",
        {
            "lan-only": {
                "permissions": [{"any": True}],
                "principals": [{"direct_remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}],
            }
        },
    )
    mutation_routes = [
        C.route(
            "/",
            "h2",
            request_headers_to_add=[
                {
                    "header": {"key": "x-added", "value": "by-route"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                },
                {"header": {"key": "x-client-ip", "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}},
            ],
            request_headers_to_remove=["x-secret"],
            response_headers_to_add=[
                {
                    "header": {"key": "x-response-added", "value": "yes"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        )
    ]
    mutation_vhost = C.virtual_host(
        mutation_routes,
        request_headers_to_add=[{"header": {"key": "x-vhost", "value": "edge"}}],
    )
    listeners = [
        C.tcp_listener(
            "ratelimit",
            C.hcm("rl", to_h2, filters=[C.filter_local_ratelimit(3, "60s", stat_prefix="rl_test")]),
        ),
        C.tcp_listener("rbac", C.hcm("rbac", to_h2, filters=[rbac_deny])),
        C.tcp_listener("rbac_allow", C.hcm("rbac_allow", to_h2, filters=[rbac_allow_lan_only])),
        C.tcp_listener(
            "fault",
            C.hcm(
                "fault",
                to_h2,
                filters=[
                    C.filter_fault("fault-abort", abort_status=503, header=("x-fault", "abort")),
                    C.filter_fault("fault-delay", delay="0.5s", header=("x-fault", "delay")),
                ],
            ),
        ),
        C.tcp_listener("health", C.hcm("health", to_h2, filters=[C.filter_health_check("/healthz")])),
        C.tcp_listener("mutation", C.hcm("mutation", virtual_hosts=[mutation_vhost])),
    ]
    return module_agent(C.bootstrap(listeners, [C.cluster("h2", h2_server.port, http2=True)]), name="filters")


def get(agent: Agent, listener: str, path: str, headers: list[tuple[str, str]] | None = None) -> Any:
    return h1_request("127.0.0.1", agent.port(listener), "GET", path, headers or [])


# ================================================================================== local_ratelimit
def test_local_ratelimit_429(filters: Agent, h2_server: H2Server) -> None:
    with H1Connection("127.0.0.1", filters.port("ratelimit")) as c:
        statuses = [c.request("GET", f"/rl/{i}").status for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    assert h2_server.count("/rl/3") == 0  # limited requests never reach the upstream
    filters.wait_stat("rl_test.http_local_rate_limit.rate_limited", 2)
    filters.wait_stat("http.rl.downstream_rq_4xx", 2)


# ================================================================================== rbac
def test_rbac_denies_by_path_and_header(filters: Agent, h2_server: H2Server) -> None:
    assert get(filters, "rbac", "/public").status == 200
    assert get(filters, "rbac", "/admin/users").status == 403
    assert get(filters, "rbac", "/public/2", [("x-user", "mallory")]).status == 403
    assert get(filters, "rbac", "/public/3", [("x-user", "alice")]).status == 200
    assert h2_server.count("/admin/users") == 0
    filters.wait_stat("http.rbac.rbac.denied", 2)


async def test_rbac_over_http2(filters: Agent) -> None:
    async with H2Client("127.0.0.1", filters.port("rbac")) as c:
        denied = await c.request("GET", "/admin")
        allowed = await c.request("GET", "/ok")
    assert denied.status == 403
    assert allowed.status == 200


def test_rbac_source_ip_principal(filters: Agent, h2_server: H2Server) -> None:
    r = get(filters, "rbac_allow", "/from-loopback")
    assert r.status == 403  # 127.0.0.1 is not in 10.0.0.0/8
    assert h2_server.count("/from-loopback") == 0


# ================================================================================== fault
def test_fault_abort(filters: Agent, h2_server: H2Server) -> None:
    r = get(filters, "fault", "/fault/abort", [("x-fault", "abort")])
    assert r.status == 503
    assert h2_server.count("/fault/abort") == 0
    filters.wait_stat("http.fault.fault.aborts_injected", 1)


def test_fault_delay(filters: Agent, h2_server: H2Server) -> None:
    start = time.monotonic()
    r = get(filters, "fault", "/fault/delay", [("x-fault", "delay")])
    delayed = time.monotonic() - start
    assert r.status == 200
    assert delayed >= 0.5
    assert h2_server.count("/fault/delay") == 1
    filters.wait_stat("http.fault.fault.delays_injected", 1)


def test_no_fault_without_header(filters: Agent, h2_server: H2Server) -> None:
    delays, aborts = (
        filters.stat("http.fault.fault.delays_injected"),
        filters.stat("http.fault.fault.aborts_injected"),
    )
    r = get(filters, "fault", "/fault/none", [("x-fault", "something-else")])
    assert r.status == 200
    assert h2_server.count("/fault/none") == 1
    assert filters.stat("http.fault.fault.delays_injected") == delays
    assert filters.stat("http.fault.fault.aborts_injected") == aborts


# ================================================================================== health_check
def test_health_check_fail_and_ok(filters: Agent, h2_server: H2Server) -> None:
    before = h2_server.count("/healthz")
    assert get(filters, "health", "/healthz").status == 200
    assert h2_server.count("/healthz") == before + 1  # pass-through mode asks the upstream
    try:
        status, _ = filters.admin_post("/healthcheck/fail")
        assert status == 200
        r = get(filters, "health", "/healthz")
        assert r.status == 503
        assert h2_server.count("/healthz") == before + 1  # answered by the agent itself
        assert get(filters, "health", "/other").status == 200  # only health checks are failed
    finally:
        filters.admin_post("/healthcheck/ok")
    assert get(filters, "health", "/healthz").status == 200


# ================================================================================== header mutation
def test_request_and_response_header_mutation(filters: Agent, h2_server: H2Server) -> None:
    r = get(
        filters,
        "mutation",
        "/mutate",
        [("x-secret", "do-not-forward"), ("x-added", "from-client"), ("x-keep", "1")],
    )
    assert r.status == 200
    seen = h2_server.last("/mutate")
    upstream = pairs_to_dict(seen.headers)
    assert "x-secret" not in upstream
    assert upstream["x-added"] == "by-route"  # overwritten, not appended
    assert upstream["x-vhost"] == "edge"
    assert upstream["x-client-ip"] == "127.0.0.1"
    assert upstream["x-keep"] == "1"
    assert r.header("x-response-added") == "yes"
