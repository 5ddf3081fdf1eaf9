"""The command line: keys, push, status, and ``serve`` as a real process driven by a grpcio agent."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cpl_testing import cluster
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

from controlplane_lite.cli import main, render_status
from controlplane_lite.store import Store
from controlplane_lite.versions import CLUSTER


def doc(kind: str, resource: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "resource": {k: v for k, v in resource.items() if k != "@type"}}


def test_keys_creates_a_private_key_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "data")
    assert main(["keys", "--data", data]) == 0
    first = capsys.readouterr().out.strip()
    cose.load_public_key(first)
    mode = stat.S_IMODE(os.stat(os.path.join(data, "signing-key.pem")).st_mode)
    assert mode == 0o600
    assert main(["keys", "--data", data]) == 0
    assert capsys.readouterr().out.strip() == first


def test_push_stores_valid_and_refuses_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "data")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump_all([doc("cluster", cluster("api"))]))
    assert main(["push", "--data", data, str(good)]) == 0
    assert "stored Cluster 'api'" in capsys.readouterr().out
    assert main(["push", "--data", data, str(good)]) == 0
    assert "1 unchanged" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump_all([doc("cluster", cluster("other")), doc("cluster", cluster("x", lb_policy="NO"))])
    )
    assert main(["push", "--data", data, str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"refused: {bad}[1] Cluster 'x': lb_policy: unknown value 'NO'" in err
    store = Store(os.path.join(data, "store.sqlite"))
    try:
        assert [r.name for r in store.resources()] == ["api"]  # nothing of the bad file was stored
    finally:
        store.close()


def test_token_prints_a_one_time_token(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["token", "--data", str(tmp_path), "--node", "n1", "--ttl", "15m"]) == 0
    out = capsys.readouterr()
    assert len(out.out.strip()) >= 40
    assert "node n1, valid 900s" in out.err
    assert main(["token", "--data", str(tmp_path), "--node", "bad id"]) == 2


def test_status_table(store: Store) -> None:
    assert render_status(store) == "no agents yet"
    store.put(CLUSTER, "api", cluster("api"))
    api = store.get(CLUSTER, "api")
    assert api is not None
    store.agent_connected("dev-1", "edge", {"firmware_profile": "tiny"})
    store.record_sent("dev-1", CLUSTER, "api", api.version)
    store.record_ack("dev-1", CLUSTER, "api", api.version)
    store.record_sent("dev-1", CLUSTER, "new", "abc")
    store.record_nack("dev-1", CLUSTER, "new", "abc", "port refused")
    store.start_rollout(CLUSTER, "api", api.version, 10)
    out = render_status(store, verbose=True)
    header, row = out.splitlines()[:2]
    assert header.split() == ["AGENT", "PROFILE", "CONNECTED", "SINCE", "VERSIONS", "LAST", "NACK"]
    assert row.startswith("dev-1")
    assert "tiny" in row
    assert "1/2 current" in row
    assert "Cluster 'new' abc: port refused" in row
    assert "ROLLOUT" in out
    assert "acked -" in out


@pytest.fixture
def serve_proc(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path, str]]:
    resources = tmp_path / "resources"
    resources.mkdir()
    (resources / "clusters.yaml").write_text(yaml.safe_dump_all([doc("cluster", cluster("api"))]))
    data = str(tmp_path / "data")
    argv = [
        "serve",
        "--dir",
        str(resources),
        "--listen",
        "127.0.0.1:0",
        "--data",
        data,
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane_lite", *argv], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("controlplane-lite: serving on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        assert Path(data, "serve.port").read_text().strip() == str(port)
        yield proc, port, resources, data
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.integration
async def test_serve_push_and_nack_in_status(
    serve_proc: tuple[subprocess.Popen[str], int, Path, str], tmp_path: Path
) -> None:
    proc, port, _, data = serve_proc
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        call = channel.stream_stream(
            DELTA_ADS_METHOD, request_serializer=encode_request, response_deserializer=decode_response
        )()
        await call.write(DeltaRequest(CLUSTER, node=Node("dev-9", metadata={"profile": "gw"}),
                                      resource_names_subscribe=("*",)))  # fmt: skip
        first = await asyncio.wait_for(call.read(), 10.0)
        assert isinstance(first, DeltaResponse)
        assert [e.name for e in first.resources] == ["api"]
        await call.write(DeltaRequest(CLUSTER, response_nonce=first.nonce))
        pushed = tmp_path / "more.yaml"
        pushed.write_text(yaml.safe_dump_all([doc("cluster", cluster("more", 9001))]))
        start = time.monotonic()
        assert await asyncio.to_thread(main, ["push", "--data", data, str(pushed)]) == 0
        delta = await asyncio.wait_for(call.read(), 5.0)
        assert time.monotonic() - start < 2.0
        assert isinstance(delta, DeltaResponse)
        assert [e.name for e in delta.resources] == ["more"]
        await call.write(
            DeltaRequest(
                CLUSTER,
                response_nonce=delta.nonce,
                error_detail=ErrorDetail(message="rejected", details={"more": "port 9001 is not allowed"}),
            )
        )
        deadline = time.monotonic() + 10
        while True:
            status = [sys.executable, "-m", "controlplane_lite", "status", "--data", data]
            done = await asyncio.to_thread(subprocess.run, status, capture_output=True, text=True, check=True)
            out = done.stdout
            if "port 9001 is not allowed" in out:
                break
            assert time.monotonic() < deadline, out
            await asyncio.sleep(0.1)
        row = next(line for line in out.splitlines() if line.startswith("dev-9"))
        assert "gw" in row
        assert "Cluster 'more'" in row
        call.cancel()
    finally:
        await channel.close()
    assert proc.poll() is None
