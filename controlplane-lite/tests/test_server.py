"""The real grpcio server, talked to by a small grpcio client stream with the contract's CBOR, as an agent."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cpl_testing import cluster, listener
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from microenvoy.xds import cose
from microenvoy.xds.messages import (
    DELTA_ADS_METHOD,
    DeltaRequest,
    DeltaResponse,
    ErrorDetail,
    Node,
    decode_response,
    encode_request,
)

from controlplane_lite.server import ControlPlane
from controlplane_lite.store import Store
from controlplane_lite.versions import CLUSTER, LISTENER

pytestmark = pytest.mark.integration


def doc(kind: str, resource: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "resource": {k: v for k, v in resource.items() if k != "@type"}}


def write(path: Path, *docs: dict[str, Any]) -> None:
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(yaml.safe_dump_all(list(docs)))
    st = path.stat()
    if st.st_mtime_ns <= before:  # coarse file-system clocks: make the edit visible to the mtime poll
        os.utime(path, ns=(st.st_atime_ns, before + 1_000_000))


async def until(cond: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class Agent:
    """A minimal delta client over a real grpcio channel."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        method = self.channel.stream_stream(
            DELTA_ADS_METHOD, request_serializer=encode_request, response_deserializer=decode_response
        )
        self.call = method(metadata=(("x-content-type", "application/grpc+cbor"),))

    async def send(self, req: DeltaRequest) -> None:
        await self.call.write(req)

    async def recv(self, within: float = 5.0) -> DeltaResponse:
        msg = await asyncio.wait_for(self.call.read(), within)
        assert isinstance(msg, DeltaResponse), msg
        return msg

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
async def served(tmp_path: Path, key: Ed25519PrivateKey) -> AsyncIterator[tuple[ControlPlane, Path]]:
    resources = tmp_path / "resources"
    resources.mkdir()
    write(resources / "clusters.yaml", doc("cluster", cluster("api")))
    store = Store(str(tmp_path / "cp.sqlite"))
    cp = ControlPlane(store, key, directory=str(resources))
    await cp.start("127.0.0.1:0")
    try:
        yield cp, resources
    finally:
        await cp.stop(0)
        store.close()


async def test_agent_stream_ack_push_and_nack(
    served: tuple[ControlPlane, Path], key: Ed25519PrivateKey
) -> None:
    cp, resources = served
    assert cp.port > 0
    agent = Agent(cp.port)
    try:
        node = Node("dev-1", "edge", {"firmware_profile": "tiny", "site": "lab"})
        await agent.send(DeltaRequest(CLUSTER, node=node, resource_names_subscribe=("*",)))
        first = await agent.recv()
        assert first.type_url == CLUSTER
        (entry,) = first.resources
        assert entry.name == "api"
        assert entry.resource is not None
        trusted = cose.trusted_keys([key.public_key()])
        assert cose.verify_resource(
            trusted, entry.signature, CLUSTER, entry.name, entry.version, entry.resource
        ) == cose.key_id(key.public_key())
        await agent.send(DeltaRequest(CLUSTER, response_nonce=first.nonce))
        await until(lambda: cp.store.agent_resources("dev-1")[0].acked_version == entry.version)
        (agent_row,) = cp.store.agents()
        assert agent_row.connected
        assert agent_row.metadata["firmware_profile"] == "tiny"

        # a YAML edit adds a cluster: the delta arrives within 1 s, and holds only the new cluster
        edited = time.monotonic()
        write(
            resources / "clusters.yaml", doc("cluster", cluster("api")), doc("cluster", cluster("new", 9000))
        )
        delta = await agent.recv(within=1.5)
        assert time.monotonic() - edited < 1.0
        assert [e.name for e in delta.resources] == ["new"]
        assert delta.removed_resources == ()

        # the agent rejects it: the NACK is recorded with its message
        await agent.send(
            DeltaRequest(
                CLUSTER,
                response_nonce=delta.nonce,
                error_detail=ErrorDetail(message="1 resource rejected", details={"new": "port 9000 refused"}),
            )
        )

        def nacked() -> bool:
            rows = {r.name: r for r in cp.store.agent_resources("dev-1")}
            return "new" in rows and rows["new"].nack_message == "port 9000 refused"

        await until(nacked)

        # a listener arrives after the cluster it routes to; a bad edit is refused and nothing is pushed
        await agent.send(DeltaRequest(LISTENER, resource_names_subscribe=("*",)))
        greeting = await agent.recv()  # nothing of that type yet: answered at once, empty (rule 4)
        assert (greeting.type_url, greeting.resources, greeting.removed_resources) == (LISTENER, (), ())
        await agent.send(DeltaRequest(LISTENER, response_nonce=greeting.nonce))
        write(resources / "bad.yaml", doc("cluster", cluster("broken", lb_policy="NOPE")))
        await until(lambda: bool(cp.directory_errors))
        assert cp.directory_errors[0].startswith("bad.yaml[0] Cluster 'broken': lb_policy")
        assert cp.store.get(CLUSTER, "broken") is None
        os.unlink(resources / "bad.yaml")
        write(resources / "listeners.yaml", doc("listener", listener("edge", 10000, cluster_name="api")))
        lis = await agent.recv(within=2.0)
        assert (lis.type_url, [e.name for e in lis.resources]) == (LISTENER, ["edge"])
    finally:
        await agent.close()
    await until(lambda: not cp.store.agents()[0].connected)


async def test_reconnect_gets_only_differences(served: tuple[ControlPlane, Path]) -> None:
    cp, resources = served
    api = cp.store.get(CLUSTER, "api")
    assert api is not None
    write(resources / "clusters.yaml", doc("cluster", cluster("api")), doc("cluster", cluster("b")))
    await until(lambda: cp.store.get(CLUSTER, "b") is not None)
    agent = Agent(cp.port)
    try:
        await agent.send(
            DeltaRequest(
                CLUSTER,
                node=Node("dev-2"),
                resource_names_subscribe=("*",),
                initial_resource_versions={"api": api.version, "gone": "0000000000000000"},
            )
        )
        got = [await agent.recv(), await agent.recv()]
        assert [([e.name for e in r.resources], r.removed_resources) for r in got] == [
            (["b"], ()),
            ([], ("gone",)),
        ]
    finally:
        await agent.close()


async def test_malformed_request_ends_the_stream_with_invalid_argument(
    served: tuple[ControlPlane, Path],
) -> None:
    cp, _ = served
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{cp.port}")
    try:
        call = channel.stream_stream(DELTA_ADS_METHOD)()
        await call.write(b"\xa1\x68type_url\x01")  # type_url is not a string
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call.read(), 5.0)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "type_url" in (info.value.details() or "")
    finally:
        await channel.close()
