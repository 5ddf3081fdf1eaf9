"""A staged rollout through the real grpcio server with four agents (small grpcio delta clients): the first
stage gets the change, the rest follow once it ACKed; the next change is NACKed and halts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from cpl_testing import cluster
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from microenvoy.xds.messages import (
    DELTA_ADS_METHOD,
    DeltaRequest,
    DeltaResponse,
    ErrorDetail,
    Node,
    decode_response,
    encode_request,
)

from controlplane_lite.cli import render_status
from controlplane_lite.delta import stage_bucket
from controlplane_lite.server import ControlPlane
from controlplane_lite.store import Store
from controlplane_lite.versions import CLUSTER, resource_version

pytestmark = pytest.mark.integration

V1, V2, V3 = cluster("api", 8080), cluster("api", 8081), cluster("api", 8082)


async def until(cond: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class Agent:
    """A minimal delta client over a real grpcio channel."""

    def __init__(self, port: int, node_id: str) -> None:
        self.node_id = node_id
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        method = self.channel.stream_stream(
            DELTA_ADS_METHOD, request_serializer=encode_request, response_deserializer=decode_response
        )
        self.call = method()

    async def subscribe(self) -> None:
        node = Node(self.node_id, "edge", {"firmware_profile": "tiny", "site": "lab"})
        await self.call.write(DeltaRequest(CLUSTER, node=node, resource_names_subscribe=("*",)))

    async def recv(self, within: float = 5.0) -> DeltaResponse:
        msg = await asyncio.wait_for(self.call.read(), within)
        assert isinstance(msg, DeltaResponse), msg
        return msg

    async def ack(self, resp: DeltaResponse, nack: str | None = None) -> None:
        detail = None if nack is None else ErrorDetail(message=nack, details={"api": nack})
        await self.call.write(DeltaRequest(CLUSTER, response_nonce=resp.nonce, error_detail=detail))

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


def versions(resp: DeltaResponse) -> dict[str, str]:
    return {e.name: e.version for e in resp.resources}


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    store = Store(str(tmp_path / "cp.sqlite"))
    store.put(CLUSTER, "api", V1, source="push")
    server = ControlPlane(store, Ed25519PrivateKey.generate(), poll_interval=0.05)
    await server.start("127.0.0.1:0")
    try:
        yield server
    finally:
        await server.stop(0)
        store.close()


async def test_staged_rollout_with_four_agents(cp: ControlPlane) -> None:
    ids = [f"dev-{i}" for i in range(100)]
    stage = [n for n in ids if stage_bucket(n, "api") < 5000][:2]
    rest = [n for n in ids if stage_bucket(n, "api") >= 5000][:2]
    agents = {n: Agent(cp.port, n) for n in stage + rest}
    store = cp.store
    try:
        for a in agents.values():
            await a.subscribe()
            first = await a.recv()
            assert versions(first) == {"api": resource_version(V1)}
            await a.ack(first)
        await until(lambda: all(r.connected for r in store.agents()) and len(store.agents()) == 4)

        # a change with rollout 50 %: only the first stage gets it
        store.put(CLUSTER, "api", V2, rollout_percent=50, source="push")
        got = {n: await agents[n].recv() for n in stage}
        assert all(versions(r) == {"api": resource_version(V2)} for r in got.values())
        await agents[stage[0]].ack(got[stage[0]])
        await until(lambda: store.agent_resources(stage[0])[0].acked_version == resource_version(V2))
        assert store.rollouts()[0].state == "running"
        assert [store.agent_resources(n)[0].sent_version for n in rest] == [resource_version(V1)] * 2
        assert "first 50% (2 agents)" in render_status(store)

        # the last first-stage ACK completes it: the rest of the fleet gets it without anyone's help
        await agents[stage[1]].ack(got[stage[1]])
        for n in rest:
            resp = await agents[n].recv()
            assert versions(resp) == {"api": resource_version(V2)}
            await agents[n].ack(resp)
        assert store.rollouts()[0].state == "complete"

        # the next change is NACKed by one first-stage agent: halted, nobody else gets it
        store.put(CLUSTER, "api", V3, rollout_percent=50, source="push")
        got = {n: await agents[n].recv() for n in stage}
        assert all(versions(r) == {"api": resource_version(V3)} for r in got.values())
        await agents[stage[0]].ack(got[stage[0]], nack="port 8082 refused")
        await agents[stage[1]].ack(got[stage[1]])
        await until(lambda: store.rollouts()[-1].state == "halted")
        assert store.rollouts()[-1].reason == f"{stage[0]} NACKed: port 8082 refused"
        # the server rebuilt what everyone gets after the halt: another change reaches the rest of the
        # fleet, and the halted version does not come with it
        store.put(CLUSTER, "other", cluster("other"), source="push")
        for n in rest:
            resp = await agents[n].recv()
            assert versions(resp) == {"other": resource_version(cluster("other"))}
        text = render_status(store)
        assert "halted" in text
        assert "port 8082 refused" in text
        sent = {n: {r.name: r.sent_version for r in store.agent_resources(n)} for n in rest}
        assert all(s["api"] == resource_version(V2) for s in sent.values())
    finally:
        for a in agents.values():
            await a.close()
