"""The agent's delta xDS session against a scripted grpcio control plane: the initial fetch before listeners
open, live updates, a bad signature NACKed while the old config serves, a held listener, and a restart with
the control plane down served from the signed offline cache."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from peers import configs as C
from peers.agent import Agent
from peers.common import wait_for
from peers.h1_client import h1_request
from peers.h2_server import H2Server
from peers.xds_server import ScriptedControlPlane

from microenvoy.xds import cose
from microenvoy.xds.messages import TYPE_CLUSTER as CLUSTER
from microenvoy.xds.messages import TYPE_LISTENER as LISTENER

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def cp(key: Ed25519PrivateKey) -> Iterator[ScriptedControlPlane]:
    server = ScriptedControlPlane(key).start()
    yield server
    server.stop()


def bootstrap(
    cp_port: int, key: Ed25519PrivateKey, cache: Path, *, fetch_timeout: str = "10s"
) -> dict[str, Any]:
    doc = C.bootstrap([], [C.cluster("xds_cluster", cp_port, http2=True)])
    doc["dynamic_resources"] = {
        "ads_config": {
            "api_type": "DELTA_GRPC",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
        },
        "cds_config": {"ads": {}, "initial_fetch_timeout": fetch_timeout},
        "lds_config": {"ads": {}, "initial_fetch_timeout": fetch_timeout},
        "microenvoy": {"trusted_keys": [cose.encode_public_key(key.public_key())], "cache_dir": str(cache)},
    }
    return doc


def api_cluster(port: int) -> dict[str, Any]:
    c = C.cluster("api", port, http2=True)
    c.pop("name")
    return {"name": "api", **c}


def edge_listener(prefix: str = "/") -> dict[str, Any]:
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "edge",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": prefix}, "route": {"cluster": "api"}}],
                }
            ]
        },
    }
    return {
        "name": "edge",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def server_info(a: Agent) -> dict[str, Any]:
    status, body = a.admin_get("/server_info")
    assert status == 200
    info: dict[str, Any] = json.loads(body)
    return info


def test_initial_fetch_updates_nack_and_cache(
    agent: Any, cp: ScriptedControlPlane, key: Ed25519PrivateKey, h2_server: H2Server, tmp_path: Path
) -> None:
    cp.put(CLUSTER, "api", api_cluster(h2_server.port))
    cp.put(LISTENER, "edge", edge_listener())
    cache = tmp_path / "cache"
    a: Agent = agent(bootstrap(cp.port, key, cache), name="xds1")
    # The listener from the control plane was there before /ready: the initial fetch came first.
    port = a.port("edge")
    assert h1_request("127.0.0.1", port, "GET", "/hello").status == 200
    assert server_info(a)["config_source"]["source"] == "control_plane"
    first = cp.wait_request(lambda r: r.type_url == CLUSTER and not r.response_nonce)
    assert first.resource_names_subscribe == ("*",)
    assert first.node is not None
    assert first.node.id == "test-xds1"
    cp.wait_request(lambda r: r.type_url == LISTENER and bool(r.response_nonce) and r.error_detail is None)

    # A tampered resource: NACKed by name with the signature error, counted, the old config keeps serving.
    cp.put(CLUSTER, "api", {**api_cluster(h2_server.port), "connect_timeout": "2s"}, tamper=True)
    nack = cp.wait_request(lambda r: r.type_url == CLUSTER and r.error_detail is not None)
    assert nack.error_detail is not None
    assert "api" in nack.error_detail.details
    assert "signature" in nack.error_detail.details["api"]
    a.wait_stat("xds.signature_invalid", 1)
    assert h1_request("127.0.0.1", port, "GET", "/still").status == 200

    # A listener that references a cluster the agent does not have yet is held, not applied half-way.
    held = edge_listener()
    held["name"] = "later"
    held["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0][
        "route"
    ]["cluster"] = "not-yet"
    cp.put(LISTENER, "later", held)
    wait_for(lambda: "Listener 'later'" in server_info(a)["config_source"]["held"], 10, message="held")
    assert "later" not in a.listeners()

    # A live update: the route now only matches /v2/ (same listener name and address: same socket).
    cp.put(LISTENER, "edge", edge_listener("/v2/"))
    wait_for(lambda: h1_request("127.0.0.1", port, "GET", "/old").status == 404, 10, message="update applied")
    assert h1_request("127.0.0.1", port, "GET", "/v2/x").status == 200
    a.stop()

    # The control plane is gone; the agent restarts and serves the last good config from its cache.
    cp.stop()
    b: Agent = agent(bootstrap(cp.port, key, cache, fetch_timeout="1s"), name="xds2")
    info = server_info(b)["config_source"]
    assert info["source"] == "cache"
    assert info["connected"] is False
    port2 = b.port("edge")
    assert h1_request("127.0.0.1", port2, "GET", "/v2/from-cache").status == 200
    assert h1_request("127.0.0.1", port2, "GET", "/old").status == 404
    assert b.stat("xds.cache_loaded") == 1
    assert "serving from the cache" in b.log_text()


def test_cache_with_a_foreign_signature_is_not_used(
    agent: Any, cp: ScriptedControlPlane, key: Ed25519PrivateKey, h2_server: H2Server, tmp_path: Path
) -> None:
    cp.put(CLUSTER, "api", api_cluster(h2_server.port))
    cp.put(LISTENER, "edge", edge_listener())
    cache = tmp_path / "cache"
    a: Agent = agent(bootstrap(cp.port, key, cache), name="xds3")
    assert h1_request("127.0.0.1", a.port("edge"), "GET", "/x").status == 200
    a.stop()
    cp.stop()
    other = Ed25519PrivateKey.generate()  # the bootstrap now trusts another key only
    b: Agent = agent(bootstrap(cp.port, other, cache, fetch_timeout="1s"), name="xds4")
    assert server_info(b)["config_source"]["source"] == "static"
    assert "edge" not in b.listeners()
    assert "skipped" in b.log_text()


def test_connection_open_across_a_listener_change_gets_its_answer(
    agent: Any, cp: ScriptedControlPlane, key: Ed25519PrivateKey, h2_server: H2Server, tmp_path: Path
) -> None:
    """The connections of a changed listener drain: one opened before the change, whose request is sent
    after it, still gets its answer (with ``Connection: close``)."""
    import socket

    cp.put(CLUSTER, "api", api_cluster(h2_server.port))
    cp.put(LISTENER, "edge", edge_listener())
    a: Agent = agent(bootstrap(cp.port, key, tmp_path / "cache"), name="xds5")
    port = a.port("edge")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as early:
        a.wait_stat("http.edge.downstream_cx_active", 1)
        cp.put(LISTENER, "edge", edge_listener("/v2/"))
        cp.wait_request(
            lambda r: (
                r.type_url == LISTENER
                and r.response_nonce != ""
                and r.error_detail is None
                and len([q for q in cp.requests if q.type_url == LISTENER and q.response_nonce]) >= 2
            )
        )
        early.sendall(b"GET /v2/late HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = early.recv(65536)
            assert chunk, f"closed before the response: {data!r}"
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in data.lower()
