"""``serve`` as a real process with its REST API: the port file, the token, a PUT that reaches an agent at
once, a refused PUT, ``rollout list``/``promote`` and the rollouts table in ``status``."""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cpl_testing import cluster
from microenvoy.xds.messages import (
    DELTA_ADS_METHOD,
    DeltaRequest,
    DeltaResponse,
    Node,
    decode_response,
    encode_request,
)

from controlplane_lite.cli import main
from controlplane_lite.store import Store
from controlplane_lite.versions import CLUSTER, resource_version

pytestmark = pytest.mark.integration


def call_api(port: int, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, int, str]]:
    resources = tmp_path / "resources"
    resources.mkdir()
    data = str(tmp_path / "data")
    argv = ["serve", "--dir", str(resources), "--listen", "127.0.0.1:0", "--data", data,
            "--log-level", "warning", "--poll-interval", "0.1"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane_lite", *argv], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        grpc_port = int(lines[0].rsplit(":", 1)[1])
        assert lines[2].startswith("controlplane-lite: api on 127.0.0.1:"), lines
        api_port = int(lines[2].rsplit(":", 1)[1])
        assert Path(data, "api.port").read_text().strip() == str(api_port)
        yield grpc_port, api_port, data
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_rest_api_of_a_running_serve(
    served: tuple[int, int, str], capsys: pytest.CaptureFixture[str]
) -> None:
    grpc_port, api_port, data = served
    assert main(["token", "--data", data, "--api"]) == 0
    token = capsys.readouterr().out.strip()
    assert len(token) >= 40
    status, payload = await asyncio.to_thread(call_api, api_port, "GET", "/v1/agents", "wrong")
    assert status == 401

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        call = channel.stream_stream(
            DELTA_ADS_METHOD, request_serializer=encode_request, response_deserializer=decode_response
        )()
        await call.write(DeltaRequest(CLUSTER, node=Node("dev-1", metadata={"site": "lab"}),
                                      resource_names_subscribe=("*",)))  # fmt: skip
        greeting = await asyncio.wait_for(call.read(), 5.0)  # no clusters yet: an empty answer at once
        assert isinstance(greeting, DeltaResponse)
        assert greeting.resources == ()
        await call.write(DeltaRequest(CLUSTER, response_nonce=greeting.nonce))
        body = {
            "selector": {"site": "lab"},
            "resource": {k: v for k, v in cluster("api").items() if k != "@type"},
        }
        status, payload = await asyncio.to_thread(
            call_api, api_port, "PUT", "/v1/resources/cluster/api", token, body
        )
        assert (status, payload["version"]) == (201, resource_version(cluster("api")))
        got = await asyncio.wait_for(call.read(), 5.0)  # pushed at once, not at the next poll
        assert isinstance(got, DeltaResponse)
        assert [e.name for e in got.resources] == ["api"]
        await call.write(DeltaRequest(CLUSTER, response_nonce=got.nonce))

        bad = {"resource": {"name": "api", "connect_timeout": "soon"}}
        status, payload = await asyncio.to_thread(
            call_api, api_port, "PUT", "/v1/resources/cluster/api", token, bad
        )
        assert status == 400
        assert payload["errors"][0].startswith("body Cluster 'api': connect_timeout")

        # a staged change: the only agent is the first stage; promote it by hand from the CLI
        body["resource"] = {k: v for k, v in cluster("api", 9).items() if k != "@type"}
        body["rollout"] = {"percent": 10}
        status, payload = await asyncio.to_thread(
            call_api, api_port, "PUT", "/v1/resources/cluster/api", token, body
        )
        assert status == 200
        assert payload["rollout"]["state"] == "running"
        staged = await asyncio.wait_for(call.read(), 5.0)
        assert isinstance(staged, DeltaResponse)
        assert [e.version for e in staged.resources] == [resource_version(cluster("api", 9))]
        assert await asyncio.to_thread(main, ["rollout", "list", "--data", data]) == 0
        assert "running" in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["rollout", "promote", "cluster/api", "--data", data]) == 0
        assert "complete" in capsys.readouterr().out
        status, payload = await asyncio.to_thread(call_api, api_port, "GET", "/v1/rollouts", token)
        assert [r["state"] for r in payload["rollouts"]] == ["complete"]
        status, payload = await asyncio.to_thread(call_api, api_port, "GET", "/v1/agents", token)
        assert [a["node_id"] for a in payload["agents"]] == ["dev-1"]
        call.cancel()
    finally:
        await channel.close()
    store = Store(str(Path(data, "store.sqlite")))
    try:
        assert store.get(CLUSTER, "api") is not None
    finally:
        store.close()
