"""Fan-out: many simulated agents on one controlplane-lite; time from one change to the last ACK.

    .venv/bin/python bench/xds_fanout.py [--agents 1000] [--rounds 5] [--poll-interval 0.5] [--json out.json]

A real ``controlplane-lite serve`` process; in this process (asyncio, uvloop when installed) ``--agents``
light delta clients (``LightAgent``: one TCP connection and one HTTP/2 stream each, raw ``h2``, messages
with ``microenvoy.xds.messages`` and the gRPC framing of ``microenvoy.codecs.grpc``). Each subscribes to
Cluster and Listener (wildcard) with its own node id and ACKs every response at once (no validation, no
signature check: the agent's own apply cost is ``bench/xds_apply.py``). Once every client holds the
initial config, one resource file is rewritten (cluster ``hot`` changes); per client the time from the
file write to its ACK of the response carrying the new ``hot`` is recorded. ``--rounds`` changes are
measured one after the other; the table gives the first response, p50, p99 and max over all clients, per
round. The control plane polls its directory every ``--poll-interval`` seconds, which is part of the figure
(the goal is < 2 s from the change to the last ACK).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from procs import Procs, loop_factory, percentile, positive, wait_for  # noqa: E402

from microenvoy.codecs.grpc import GrpcMessageDecoder, encode_message  # noqa: E402
from microenvoy.xds.messages import (  # noqa: E402
    DELTA_ADS_METHOD,
    TYPE_CLUSTER,
    TYPE_LISTENER,
    DeltaRequest,
    DeltaResponse,
    Node,
    decode_response,
    encode_request,
)

__all__ = ["LightAgent", "main"]


class LightAgent:
    """One simulated agent: a delta xDS stream that ACKs everything and remembers versions and times."""

    def __init__(self, node_id: str, port: int) -> None:
        self.node_id = node_id
        self.port = port
        self.versions: dict[tuple[str, str], str] = {}
        """(type_url, name) -> the last version received."""
        self.acked_at: dict[tuple[str, str, str], float] = {}
        """(type_url, name, version) -> ``time.monotonic()`` when the ACK was written."""
        self.seen_types: set[str] = set()
        self.responses = 0
        self.error = ""
        self._h2: h2.connection.H2Connection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<LightAgent {self.node_id} responses={self.responses} resources={len(self.versions)}>"

    async def run(self, connected: asyncio.Semaphore) -> None:
        try:
            async with connected:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self._writer = writer
            conn = self._h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.increment_flow_control_window(16 * 1024 * 1024)
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [
                (":method", "POST"), (":scheme", "http"), (":authority", "xds_cluster"),
                (":path", DELTA_ADS_METHOD), ("content-type", "application/grpc+cbor"), ("te", "trailers"),
            ])  # fmt: skip
            node = Node(self.node_id, "bench", {"firmware_profile": "sim", "agent_version": "bench"})
            first = DeltaRequest(TYPE_CLUSTER, node=node, resource_names_subscribe=("*",))
            second = DeltaRequest(TYPE_LISTENER, resource_names_subscribe=("*",))
            conn.send_data(
                sid, encode_message(encode_request(first)) + encode_message(encode_request(second))
            )
            writer.write(conn.data_to_send())
            decoder = GrpcMessageDecoder(64 * 1024 * 1024)
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("control plane closed the connection")
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        for _, message in decoder.feed(ev.data):
                            self._on_response(sid, decode_response(message))
                    elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                        raise ConnectionError(f"stream ended: {ev}")
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        raise ConnectionError(f"GOAWAY: {ev}")
                out = conn.data_to_send()
                if out:
                    writer.write(out)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if self._writer is not None:
                self._writer.close()

    def _on_response(self, sid: int, resp: DeltaResponse) -> None:
        assert self._h2 is not None
        self.responses += 1
        self.seen_types.add(resp.type_url)
        ack = DeltaRequest(resp.type_url, response_nonce=resp.nonce)
        self._h2.send_data(sid, encode_message(encode_request(ack)))
        now = time.monotonic()
        for e in resp.resources:
            self.versions[(resp.type_url, e.name)] = e.version
            self.acked_at[(resp.type_url, e.name, e.version)] = now
        for name in resp.removed_resources:
            self.versions.pop((resp.type_url, name), None)


_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
LISTENER: dict[str, Any] = {
    "name": "edge",
    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10080}},
    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": _HCM, "stat_prefix": "edge", "route_config": {"virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c00"}}],
        }]},
    }}]}],
}  # fmt: skip
"""The one listener every simulated agent gets (a first wildcard Listener request with nothing to send is
not answered by controlplane-lite, and the clients wait for a response of each type)."""


def cluster(name: str, port: int, connect_timeout: str = "1s") -> dict[str, Any]:
    return {
        "name": name,
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}}]}],
        },
    }  # fmt: skip


def write_hot(resources: Path, i: int) -> None:
    doc = {"type": "cluster", "resource": cluster("hot", 9000, f"{1 + i / 1000:.3f}s")}
    tmp = resources / ".hot.yaml.tmp"
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, resources / "hot.yaml")


def hot_version(i: int) -> str:
    from controlplane_lite.versions import resource_version

    return resource_version({**cluster("hot", 9000, f"{1 + i / 1000:.3f}s"), "@type": TYPE_CLUSTER})


async def fan_out(args: argparse.Namespace, procs: Procs, resources: Path, cp_port: int) -> dict[str, Any]:
    agents = [LightAgent(f"sim-{i:04d}", cp_port) for i in range(args.agents)]
    gate = asyncio.Semaphore(64)
    tasks = [asyncio.create_task(a.run(gate)) for a in agents]
    start = time.monotonic()
    try:
        while True:
            ready = sum(1 for a in agents if {TYPE_CLUSTER, TYPE_LISTENER} <= a.seen_types)
            errors = [a.error for a in agents if a.error]
            if errors:
                raise RuntimeError(f"{len(errors)} clients failed, first: {errors[0]}")
            if ready == len(agents):
                break
            if time.monotonic() - start > 300:
                raise TimeoutError(f"only {ready}/{len(agents)} clients got their initial config")
            await asyncio.sleep(0.05)
        connect_s = time.monotonic() - start
        rounds = []
        for r in range(1, args.rounds + 1):
            await asyncio.sleep(1.0)  # let the previous round's ACKs settle
            version = hot_version(r)
            key = (TYPE_CLUSTER, "hot", version)
            written = time.monotonic()
            write_hot(resources, r)
            while not all(key in a.acked_at for a in agents):
                if time.monotonic() - written > 120:
                    missing = sum(1 for a in agents if key not in a.acked_at)
                    raise TimeoutError(f"round {r}: {missing} clients never got the change")
                if any(a.error for a in agents):
                    raise RuntimeError(next(a.error for a in agents if a.error))
                await asyncio.sleep(0.01)
            times = sorted((a.acked_at[key] - written) * 1000 for a in agents)
            rounds.append(times)
        other = sum(a.responses for a in agents)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
    return {"agents": args.agents, "connect_s": connect_s, "rounds": rounds, "responses": other}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, args.agents * 2 + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    procs = Procs(prefix="microenvoy-xds-fanout-", keep_tmp=args.keep_tmp)
    try:
        resources, data = procs.tmp / "resources", procs.tmp / "data"
        resources.mkdir()
        others = [{"type": "cluster", "resource": cluster(f"c{i:02d}", 9000 + i)} for i in range(10)]
        others.append({"type": "listener", "resource": LISTENER})
        (resources / "others.yaml").write_text(yaml.safe_dump_all(others, sort_keys=False))
        write_hot(resources, 0)
        port_file = data / "serve.port"
        cmd = [sys.executable, "-m", "controlplane_lite", "serve", "--dir", str(resources),
               "--data", str(data), "--listen", "127.0.0.1:0", "--log-level", "warning",
               "--poll-interval", str(args.poll_interval)]  # fmt: skip
        proc = procs.spawn("controlplane", cmd)
        wait_for(lambda: port_file.exists() and port_file.read_text().strip().isdigit(), 60, "cp", proc)
        cp_port = int(port_file.read_text())
        factory = loop_factory()
        with asyncio.Runner(loop_factory=factory) as runner:
            result = runner.run(fan_out(args, procs, resources, cp_port))
        status = subprocess.run(
            [sys.executable, "-m", "controlplane_lite", "status", "--data", str(data)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        result["status_rows"] = max(0, len(status.splitlines()) - 1)
    finally:
        procs.close()
    return result


def table(r: dict[str, Any]) -> str:
    lines = [
        f"{r['agents']} simulated agents on one controlplane-lite (all connected with their initial config "
        f"after {r['connect_s']:.1f} s); change of one cluster file -> each agent's ACK, ms:",
        "",
        "| round | first | p50 | p99 | max |",
        "|---|---|---|---|---|",
    ]
    for i, times in enumerate(r["rounds"], 1):
        lines.append(
            f"| {i} | {times[0]:.0f} | {percentile(times, 0.5):.0f} | {percentile(times, 0.99):.0f} | "
            f"{times[-1]:.0f} |"
        )
    every = sorted(t for times in r["rounds"] for t in times)
    lines.append(
        f"| all | {every[0]:.0f} | {percentile(every, 0.5):.0f} | {percentile(every, 0.99):.0f} | "
        f"{every[-1]:.0f} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--agents", type=positive(int), default=1000, help="simulated agents (1000)")
    p.add_argument("--rounds", type=positive(int), default=5, help="changes measured (5)")
    p.add_argument("--poll-interval", type=positive(float), default=0.5, help="control plane poll (0.5 s)")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    r = measure(args)
    print(table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
