"""The REST API: routing, token, validation (all or nothing) via ``dispatch``, and the h11 server on a real
loopback socket (keep-alive, limits, malformed requests)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
import yaml
from cpl_testing import cluster, listener

from controlplane_lite.rest import ApiResponse, RestApi, load_or_create_api_token
from controlplane_lite.store import Store
from controlplane_lite.versions import CLUSTER, LISTENER, resource_version

TOKEN = "s3cret-token"
AUTH = f"Bearer {TOKEN}".encode()


def doc(resource: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"resource": {k: v for k, v in resource.items() if k != "@type"}, **extra}).encode()


class Api:
    def __init__(self, store: Store) -> None:
        self.changes = 0
        self.api = RestApi(store, TOKEN, on_change=self._changed)

    def _changed(self) -> None:
        self.changes += 1

    def __call__(self, method: str, target: str, body: bytes = b"", auth: bytes | None = AUTH) -> ApiResponse:
        return self.api.dispatch(method, target, auth, body)


@pytest.fixture
def api(store: Store) -> Api:
    return Api(store)


def test_token_is_required_and_compared_exactly(api: Api) -> None:
    for auth in (None, b"", b"Bearer", b"Bearer wrong", b"Basic " + TOKEN.encode(), AUTH + b"x"):
        r = api("GET", "/v1/agents", auth=auth)
        assert r.status == 401, auth
        assert ("www-authenticate", 'Bearer realm="controlplane-lite"') in r.headers
    assert api("GET", "/v1/agents", auth=b"bearer  " + TOKEN.encode()).status == 200
    assert api("PUT", "/v1/resources/cluster/api", doc(cluster("api")), auth=None).status == 401
    assert api.api.store.resources() == []
    with pytest.raises(ValueError, match="empty"):
        RestApi(api.api.store, "")


def test_token_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    token = load_or_create_api_token(data)
    assert len(token) >= 40
    assert stat.S_IMODE(os.stat(os.path.join(data, "api-token")).st_mode) == 0o600
    assert load_or_create_api_token(data) == token


def test_put_creates_validates_and_replaces(api: Api, store: Store) -> None:
    r = api("PUT", "/v1/resources/cluster/api", doc(cluster("api"), selector={"site": "x"}, ttl="30s"))
    assert r.status == 201, r.payload
    assert r.payload == {
        "type": "cluster",
        "name": "api",
        "version": resource_version(cluster("api")),
        "changed": True,
        "rollout": None,
    }
    stored = store.get(CLUSTER, "api")
    assert stored is not None
    assert (dict(stored.selector), stored.ttl, stored.source) == ({"site": "x"}, 30.0, "api")
    assert api.changes == 1
    # the same again: 200, nothing changed, nothing pushed
    r = api("PUT", "/v1/resources/cluster/api", doc(cluster("api"), selector={"site": "x"}, ttl="30s"))
    assert (r.status, r.payload["changed"], api.changes) == (200, False, 1)
    # YAML bodies work too; the name may be repeated if it agrees
    body = yaml.safe_dump(
        {"name": "api", "resource": {k: v for k, v in cluster("api", 9).items() if k != "@type"}}
    )
    r = api("PUT", "/v1/resources/cluster/api", body.encode())
    assert (r.status, r.payload["version"]) == (200, resource_version(cluster("api", 9)))
    got = api("GET", "/v1/resources/cluster/api")
    assert got.status == 200
    assert got.payload["resource"] == cluster("api", 9)
    listing = api("GET", "/v1/resources")
    assert [(x["type"], x["name"]) for x in listing.payload["resources"]] == [("cluster", "api")]
    assert "resource" not in listing.payload["resources"][0]
    assert api("GET", "/v1/resources?type=listener").payload == {"resources": []}
    assert api("GET", "/v1/resources?type=nope").status == 400


def test_a_bad_document_is_400_with_paths_and_nothing_is_stored(api: Api, store: Store) -> None:
    api("PUT", "/v1/resources/cluster/api", doc(cluster("api")))
    gen = store.generation()
    cases = [
        (doc(cluster("api", lb_policy="NOPE")), "body Cluster 'api': lb_policy: "),
        (doc(cluster("api"), rollout={"percent": 0}), "body.rollout.percent: must be >="),
        (doc(cluster("api"), color="red"), "body.color: unknown field"),
        (doc(cluster("other")), "body.name: 'other' differs from the resource's own name"),
        (json.dumps({"type": "listener", "resource": {}}).encode(), "body.type: 'listener' differs from"),
        (b"{resource: [", "body:1:"),
        (b"[1, 2]", "body: expected a mapping"),
        (b"", "body: expected one document, got 0"),
        (b"\xff\xfe", "body: not UTF-8"),
    ]
    for body, expected in cases:
        r = api("PUT", "/v1/resources/cluster/api", body)
        assert r.status == 400, (body, r.payload)
        assert "nothing was stored" in r.payload["error"] or "invalid" in r.payload["error"]
        assert any(e.startswith(expected) for e in r.payload["errors"]), (expected, r.payload["errors"])
    # a listener routing to a cluster that does not exist: refused as a whole
    r = api("PUT", "/v1/resources/listener/edge", doc(listener("edge", cluster_name="missing")))
    assert r.status == 400
    assert "references a resource that does not exist" in " ".join(r.payload["errors"])
    assert store.generation() == gen
    assert store.get(LISTENER, "edge") is None
    assert api.changes == 1


def test_delete(api: Api, store: Store) -> None:
    assert api("DELETE", "/v1/resources/cluster/api").status == 404
    api("PUT", "/v1/resources/cluster/api", doc(cluster("api")))
    api("PUT", "/v1/resources/listener/edge", doc(listener("edge", cluster_name="api")))
    r = api("DELETE", "/v1/resources/cluster/api")  # the listener still routes to it
    assert r.status == 409
    assert r.payload["errors"]
    assert store.get(CLUSTER, "api") is not None
    assert api("DELETE", "/v1/resources/listener/edge").payload == {
        "type": "listener",
        "name": "edge",
        "deleted": True,
    }
    assert api("DELETE", "/v1/resources/cluster/api").status == 200
    assert store.resources() == []


def test_directory_resources_belong_to_the_directory(api: Api, store: Store) -> None:
    store.put(CLUSTER, "api", cluster("api"), source="dir:clusters.yaml")
    for method, body in (("PUT", doc(cluster("api", 1))), ("DELETE", b"")):
        r = api(method, "/v1/resources/cluster/api", body)
        assert r.status == 409
        assert "clusters.yaml" in r.payload["error"]


def test_routing_errors(api: Api) -> None:
    assert api("GET", "/v2/agents").status == 404
    assert api("GET", "/v1/nothing").status == 404
    assert api("GET", "/v1/resources/bogus/x").status == 404
    assert api("GET", "/v1/resources/cluster/missing").status == 404
    r = api("POST", "/v1/agents")
    assert (r.status, r.headers) == (405, (("allow", "GET"),))
    assert api("PATCH", "/v1/resources/cluster/api").status == 405
    assert api("GET", "/v1/rollouts/1/promote").status == 405
    assert api("POST", "/v1/rollouts/x/promote").status == 404
    assert api("POST", "/v1/rollouts/7/promote").status == 404


def test_agents_and_rollouts(api: Api, store: Store) -> None:
    api("PUT", "/v1/resources/cluster/api", doc(cluster("api")))
    store.agent_connected("dev-1", "edge", {"firmware_profile": "tiny", "site": "x"})
    v1 = resource_version(cluster("api"))
    store.record_events("dev-1", [("sent", CLUSTER, "api", v1, ""), ("acked", CLUSTER, "api", v1, "")])
    r = api("PUT", "/v1/resources/cluster/api", doc(cluster("api", 2), rollout={"percent": 1}))
    assert r.status == 200
    rollout = r.payload["rollout"]
    assert rollout["state"] == "running"
    assert rollout["previous_version"] == v1
    assert rollout["stage"] == ["dev-1"]  # the only agent: the first stage of a small fleet
    v2 = r.payload["version"]
    store.record_events(
        "dev-1", [("sent", CLUSTER, "api", v2, ""), ("nacked", CLUSTER, "api", v2, "bad port")]
    )
    (agent,) = api("GET", "/v1/agents").payload["agents"]
    assert (agent["node_id"], agent["profile"], agent["connected"]) == ("dev-1", "tiny", True)
    assert agent["last_nack"]["message"] == "bad port"
    assert agent["resources"][0]["acked_version"] == v1
    assert agent["resources"][0]["current_version"] == v2
    (ro,) = api("GET", "/v1/rollouts").payload["rollouts"]
    assert (ro["state"], ro["nacked"], ro["reason"]) == ("halted", 1, "dev-1 NACKed: bad port")
    changes = api.changes
    assert api("POST", f"/v1/rollouts/{ro['id']}/promote").status == 409
    promoted = api("POST", f"/v1/rollouts/{ro['id']}/promote?force=1")
    assert (promoted.status, promoted.payload["state"]) == (200, "complete")
    assert api.changes == changes + 1


# ============================================================================== over a real socket
@pytest.fixture
async def served(store: Store) -> AsyncIterator[RestApi]:
    api = RestApi(store, TOKEN, max_body=4096, idle_timeout=5.0)
    await api.start("127.0.0.1:0")
    try:
        yield api
    finally:
        await api.stop()


async def exchange(port: int, raw: bytes, responses: int = 1) -> list[tuple[int, dict[str, str], Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        out = []
        for _ in range(responses):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            lines = head.decode().split("\r\n")
            status = int(lines[0].split()[1])
            assert lines[0] == f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5.0)
            out.append((status, headers, json.loads(body)))
        return out
    finally:
        writer.close()
        await writer.wait_closed()


def request(method: str, path: str, body: bytes = b"", *, auth: bool = True, close: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: cp", f"Content-Length: {len(body)}"]
    if auth:
        lines.append(f"Authorization: Bearer {TOKEN}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_http_keep_alive_put_then_get(served: RestApi, store: Store) -> None:
    raw = request("PUT", "/v1/resources/cluster/api", doc(cluster("api"))) + request("GET", "/v1/resources")
    (put, got) = await exchange(served.port, raw, 2)
    assert put[0] == 201
    assert put[1]["content-type"] == "application/json"
    assert got[0] == 200
    assert [r["name"] for r in got[2]["resources"]] == ["api"]
    assert served.requests == 2


async def test_http_unauthorized_oversized_and_malformed(served: RestApi, store: Store) -> None:
    ((status, headers, payload),) = await exchange(served.port, request("GET", "/v1/agents", auth=False))
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    big = b"x" * 5000
    ((status, _, payload),) = await exchange(served.port, request("PUT", "/v1/resources/cluster/a", big))
    assert status == 413
    chunked = (
        b"PUT /v1/resources/cluster/a HTTP/1.1\r\nHost: cp\r\nTransfer-Encoding: chunked\r\n"
        b"Authorization: Bearer "
        + TOKEN.encode()
        + b"\r\n\r\n"
        + b"%x\r\n" % len(big)
        + big
        + b"\r\n0\r\n\r\n"
    )
    ((status, _, _),) = await exchange(served.port, chunked)
    assert status == 413
    ((status, _, payload),) = await exchange(served.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400
    assert payload["error"].startswith("bad request")
    huge_head = b"GET /v1/agents HTTP/1.1\r\nHost: cp\r\nX-Pad: " + b"a" * 40000 + b"\r\n\r\n"
    ((status, _, _),) = await exchange(served.port, huge_head)
    assert status == 431
    assert store.resources() == []
