"""End to end: a real ``controlplane-lite serve`` process and real agents on loopback (issue 6, "Tests").

A YAML edit reaches traffic within 1 s; an invalid file is refused by the control plane and a resource the
agent rejects is NACKed, shown by ``controlplane-lite status`` with its message, while the old config
serves; a SIGKILLed control plane leaves the agent serving; an agent restarted with the control plane down
serves from its signed cache, and on reconnect only what changed is sent and what was deleted is removed; a
foreign signing key is refused; a listener changing under continuous load loses no request.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import configs as C
from peers.agent import Agent
from peers.common import wait_for
from peers.controlplane import (
    ControlPlaneProcess,
    agent_bootstrap,
    cluster_doc,
    listener_doc,
)
from peers.h1_client import H1Connection, h1_request
from peers.h2_server import H2Server

from microenvoy.xds.messages import TYPE_CLUSTER as CLUSTER
from microenvoy.xds.messages import TYPE_LISTENER as LISTENER

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NODE = "edge-dev-1"
GENERATIONS = 8
"""How many times the listener changes under load."""


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    """A control plane with the CLI's default poll interval (0.5 s); started by the test."""
    proc = ControlPlaneProcess(tmp_path / "cp")
    yield proc
    proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bootstrap(cp: ControlPlaneProcess, cache: Path | None, **kwargs: Any) -> dict[str, Any]:
    doc = agent_bootstrap(cp.port, cp.public_key(), cache, **kwargs)
    doc.setdefault("node", {})["id"] = NODE
    doc["node"].setdefault("metadata", {})["firmware_profile"] = "tiny-e2e"
    return doc


def server_info(a: Agent) -> dict[str, Any]:
    status, body = a.admin_get("/server_info")
    assert status == 200
    info: dict[str, Any] = json.loads(body)["config_source"]
    return info


def get(port: int, path: str) -> int:
    return h1_request("127.0.0.1", port, "GET", path, timeout=5).status


def base_resources(upstream: int, prefix: str = "/") -> list[dict[str, Any]]:
    return [cluster_doc("api", upstream), listener_doc("edge", [C.route(prefix, "api")])]


def start_serving(
    agent: Callable[..., Agent], cp: ControlPlaneProcess, upstream: int, cache: Path | None, **kw: Any
) -> tuple[Agent, int]:
    """Control plane with ``api`` + ``edge`` (``/`` -> api), an agent that serves it; (agent, edge port)."""
    versions = cp.write("edge.yaml", base_resources(upstream))
    cp.start()
    a = agent(bootstrap(cp, cache, **kw), name="e2e")
    port = a.port("edge")
    assert get(port, "/x") == 200
    cp.wait_acked(NODE, LISTENER, "edge", versions[(LISTENER, "edge")])
    return a, port


def test_yaml_edit_adds_a_cluster_and_a_route_and_traffic_flows_within_1s(
    agent: Callable[..., Agent], cp: ControlPlaneProcess, h2_server: H2Server
) -> None:
    cp.write(
        "edge.yaml", [cluster_doc("api", h2_server.port), listener_doc("edge", [C.route("/old/", "api")])]
    )
    cp.start()
    a = agent(bootstrap(cp, None), name="e2e")
    port = a.port("edge")
    assert get(port, "/old/x") == 200
    assert get(port, "/fresh/x") == 404
    cp.wait_acked(NODE, LISTENER, "edge")
    with H2Server() as fresh:
        docs = [
            cluster_doc("api", h2_server.port),
            cluster_doc("fresh", fresh.port),
            listener_doc("edge", [C.route("/fresh/", "fresh"), C.route("/old/", "api")]),
        ]
        written = time.monotonic()
        cp.write("edge.yaml", docs)
        while get(port, "/fresh/x") != 200:
            assert time.monotonic() - written < 10, "the change never reached the agent"
        elapsed = time.monotonic() - written
        assert fresh.count("/fresh/x") >= 1  # the 200 came from the new upstream
    assert get(port, "/old/y") == 200  # the old route kept serving
    assert elapsed < 1.0, f"file write -> first 200 through the agent took {elapsed * 1000:.0f} ms"


def test_invalid_file_is_refused_and_an_agent_nack_shows_in_status(
    agent: Callable[..., Agent], cp: ControlPlaneProcess, h2_server: H2Server, tmp_path: Path
) -> None:
    static_port = free_port()
    local = C.tcp_listener("local", C.hcm("local", [C.route("/", direct=(200, "local"))]), port=static_port)
    a, port = start_serving(agent, cp, h2_server.port, None, listeners=[local])
    before = a.stats()

    # 1. A file the control plane refuses: the error's place is logged, nothing is stored or pushed.
    bad = cluster_doc("broken", h2_server.port, lb_policy="NOT_A_POLICY")
    cp.write("bad.yaml", [bad])
    wait_for(lambda: "bad.yaml[0] Cluster 'broken'" in cp.log_text(), 10, message="refusal logged")
    assert "lb_policy" in cp.log_text()
    assert cp.current_version(CLUSTER, "broken") is None
    after = a.stats()
    assert after["xds.Cluster.update_attempt"] == before["xds.Cluster.update_attempt"]
    cp.remove("bad.yaml")

    # 2. Valid for the control plane, invalid for this agent: its port is the agent's static listener's.
    clash = listener_doc("clash", [C.route("/", direct=(200, "clash"))], port=static_port)
    cp.write("clash.yaml", [clash])
    rows = cp.wait_agent(NODE, lambda r: bool(getattr(r.get((LISTENER, "clash")), "nack_version", None)))
    assert rows[(LISTENER, "clash")].acked_version is None
    status = cp.status()
    assert "Listener 'clash'" in status
    assert f"127.0.0.1:{static_port} is already used by" in status
    a.wait_stat("xds.Listener.update_rejected", before["xds.Listener.update_rejected"] + 1)
    # The old config keeps serving, and the static listener is untouched.
    assert "clash" not in a.listeners()
    assert get(port, "/still") == 200
    assert h1_request("127.0.0.1", static_port, "GET", "/").body == b"local"
    # A later valid change still goes through (the NACKed resource does not block the stream).
    cp.write("edge.yaml", base_resources(h2_server.port, prefix="/v2/"))
    wait_for(lambda: get(port, "/still") == 404, 10, message="later change applied")


def test_a_listener_that_cannot_bind_is_nacked(
    agent: Callable[..., Agent], cp: ControlPlaneProcess, h2_server: H2Server
) -> None:
    _, port = start_serving(agent, cp, h2_server.port, None)
    with socket.socket() as taken:  # another process holds the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cp.write("busy.yaml", [listener_doc("busy", [C.route("/", direct=(200, "busy"))], port=busy)])
        rows = cp.wait_agent(
            NODE, lambda r: (LISTENER, "busy") in r and r[(LISTENER, "busy")].sent_version is not None
        )
        rows = cp.wait_agent(
            NODE, lambda r: bool(r[(LISTENER, "busy")].acked_version or r[(LISTENER, "busy")].nack_version)
        )
        assert rows[(LISTENER, "busy")].nack_version, "a listener that is not listening was ACKed"
    assert get(port, "/x") == 200


def test_an_agent_of_a_control_plane_without_listeners_starts_at_once(
    agent: Callable[..., Agent], cp: ControlPlaneProcess, h2_server: H2Server
) -> None:
    cp.write("clusters.yaml", [cluster_doc("api", h2_server.port)])
    cp.start()
    started = time.monotonic()
    a = agent(bootstrap(cp, None, fetch_timeout="8s"), name="nolisteners")
    elapsed = time.monotonic() - started
    assert server_info(a)["resources"]["Cluster"] == 1
    assert elapsed < 4.0, f"start took {elapsed:.1f} s: it waited for initial_fetch_timeout (8 s)"


def test_killed_control_plane_leaves_the_agent_serving(
    agent: Callable[..., Agent], cp: ControlPlaneProcess, h2_server: H2Server
) -> None:
    a, port = start_serving(agent, cp, h2_server.port, None)
    errors = a.stat("xds.stream_errors")
    cp.kill()
    a.wait_stat("xds.connected_state", lambda v: v == 0)
    a.wait_stat("xds.stream_errors", errors + 2, timeout=20)  # it keeps trying to reconnect
    for i in range(20):
        assert get(port, f"/after-kill/{i}") == 200
    assert server_info(a)["source"] == "control_plane"
    assert "edge" in a.listeners()


def test_restart_from_cache_then_reconnect_sends_only_changes_and_removes_deleted(
    agent: Callable[..., Agent], cp: ControlPlaneProcess, h2_server: H2Server, tmp_path: Path
) -> None:
    cache = tmp_path / "agent-cache"
    docs = [cluster_doc("spare", h2_server.port), *base_resources(h2_server.port)]
    cp.write("edge.yaml", docs)
    cp.start()
    a = agent(bootstrap(cp, cache), name="first")
    assert get(a.port("edge"), "/x") == 200
    cp.wait_acked(NODE, CLUSTER, "spare")
    cp.wait_acked(NODE, LISTENER, "edge")
    sent_before = cp.agent_resources(NODE)
    a.stop()
    cp.kill()

    # While everything is down: 'spare' is deleted, the listener changes, cluster 'api' stays the same.
    changed = cp.write("edge.yaml", base_resources(h2_server.port, prefix="/v2/"))

    # The agent boots with the control plane away and serves its last good config from the cache.
    b = agent(bootstrap(cp, cache, fetch_timeout="1s"), name="second")
    info = server_info(b)
    assert info["source"] == "cache"
    assert info["connected"] is False
    assert info["resources"]["Cluster"] == 2
    port = b.port("edge")
    assert get(port, "/x") == 200
    assert b.stat("xds.cache_loaded") == 1
    assert "serving from the cache" in b.log_text()

    # The control plane comes back on the same address; the agent reconnects (backoff) and gets the delta.
    cp.start(port=cp.port)
    new_edge = cp.wait_acked(NODE, LISTENER, "edge", changed[(LISTENER, "edge")], timeout=45)
    assert new_edge != sent_before[(LISTENER, "edge")].acked_version
    wait_for(lambda: get(port, "/x") == 404, 10, message="the changed listener applied")
    assert get(port, "/v2/x") == 200
    rows = cp.wait_agent(NODE, lambda r: r[(CLUSTER, "spare")].acked_version == "")
    assert rows[(CLUSTER, "spare")].sent_version == ""  # sent as removed
    # The unchanged cluster was not sent again: its last send is the one from before the restart.
    assert rows[(CLUSTER, "api")].sent_at == sent_before[(CLUSTER, "api")].sent_at
    assert rows[(CLUSTER, "api")].acked_version == sent_before[(CLUSTER, "api")].acked_version
    wait_for(lambda: server_info(b)["resources"]["Cluster"] == 1, 10, message="'spare' removed at the agent")
    assert server_info(b)["source"] == "control_plane"
    # ... and removed from the cache too: a restart without the control plane has no 'spare'.
    b.stop()
    cp.kill()
    c = agent(bootstrap(cp, cache, fetch_timeout="1s"), name="third")
    assert server_info(c)["source"] == "cache"
    assert server_info(c)["resources"]["Cluster"] == 1
    assert get(c.port("edge"), "/v2/x") == 200


def test_a_foreign_signing_key_is_refused(
    agent: Callable[..., Agent], cp: ControlPlaneProcess, h2_server: H2Server, tmp_path: Path
) -> None:
    cp.write("edge.yaml", base_resources(h2_server.port))
    cp.start()
    other = ControlPlaneProcess(tmp_path / "other")  # only its key: the agent trusts this one
    doc = agent_bootstrap(cp.port, other.public_key(), None, fetch_timeout="1s")
    doc["node"] = {"id": NODE}
    a = agent(doc, name="foreign")
    a.wait_stat("xds.signature_invalid", 1)
    rows = cp.wait_agent(NODE, lambda r: bool(getattr(r.get((CLUSTER, "api")), "nack_version", None)))
    assert "signature" in (rows[(CLUSTER, "api")].nack_message or "")
    assert not any(r.acked_version for r in rows.values())
    status = cp.status()
    assert "Cluster 'api'" in status
    assert "signature" in status
    assert "edge" not in a.listeners()
    assert server_info(a)["resources"]["Cluster"] == 0


def test_a_connection_opened_before_a_listener_change_still_gets_its_answer(
    agent: Callable[..., Agent], cp: ControlPlaneProcess, h2_server: H2Server
) -> None:
    a, port = start_serving(agent, cp, h2_server.port, None)
    with H1Connection("127.0.0.1", port, timeout=5) as early:
        wait_for(lambda: a.stat("http.edge.downstream_cx_active") >= 1, 10, message="connection accepted")
        hdr = [{"header": {"key": "x-gen", "value": "2"}}]
        route = C.route("/", "api", response_headers_to_add=hdr)
        versions = cp.write("edge.yaml", [cluster_doc("api", h2_server.port), listener_doc("edge", [route])])
        cp.wait_acked(NODE, LISTENER, "edge", versions[(LISTENER, "edge")])
        r = early.request("GET", "/sent-after-the-change")
    assert r.status == 200
    assert (r.header("connection") or "").lower() == "close"


def test_listener_changes_under_continuous_load_lose_no_request(
    agent: Callable[..., Agent], cp: ControlPlaneProcess, h2_server: H2Server
) -> None:
    a, port = start_serving(agent, cp, h2_server.port, None)
    stop = threading.Event()
    lock = threading.Lock()
    ok = [0]
    failures: list[str] = []
    seen: set[str] = set()

    def record(resp_gen: str | None) -> None:
        with lock:
            ok[0] += 1
            seen.add(resp_gen or "")

    def keep_alive(worker: int) -> None:
        conn: H1Connection | None = None
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if conn is None:
                    conn = H1Connection("127.0.0.1", port, timeout=5)
                r = conn.request("GET", f"/ka/{worker}/{i}")
                if r.status != 200:
                    raise AssertionError(f"status {r.status}")
                record(r.header("x-gen"))
                if (r.header("connection") or "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as exc:
                with lock:
                    failures.append(f"keep-alive {worker} #{i}: {exc!r}")
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def fresh() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = h1_request("127.0.0.1", port, "GET", f"/fresh/{i}", timeout=5)
                if r.status != 200:
                    raise AssertionError(f"status {r.status}")
                record(r.header("x-gen"))
            except Exception as exc:
                with lock:
                    failures.append(f"fresh #{i}: {exc!r}")

    threads = [threading.Thread(target=keep_alive, args=(w,)) for w in range(3)]
    threads.append(threading.Thread(target=fresh))
    for t in threads:
        t.start()
    try:
        for gen in range(1, GENERATIONS + 1):
            hdr = [{"header": {"key": "x-gen", "value": str(gen)}}]
            route = C.route("/", "api", response_headers_to_add=hdr)
            cp.write("edge.yaml", [cluster_doc("api", h2_server.port), listener_doc("edge", [route])])
            wait_for(lambda g=str(gen): g in seen, 15, message=f"generation {gen} served")
            before = ok[0]
            wait_for(lambda b=before: ok[0] >= b + 20, 15, message="load continues")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert not failures, f"{len(failures)} failed of {ok[0] + len(failures)}: {failures[:5]}"
    assert {str(g) for g in range(1, GENERATIONS + 1)} <= seen
    assert ok[0] > 100
    assert a.stat("xds.Listener.update_success") >= GENERATIONS + 1
