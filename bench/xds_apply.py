"""Apply time at the agent for a one-cluster delta in a 10,000-cluster config, and delta vs snapshot bytes.

    .venv/bin/python bench/xds_apply.py [--clusters 10000] [--changes 30] [-c 4] [--json out.json]

A real ``controlplane-lite serve`` (its resource directory: ``bulk.yaml`` with ``--clusters - 1`` clusters,
``hot.yaml`` with cluster ``hot`` and listener ``edge`` routing ``/`` to it) and a real agent
(``python -m microenvoy run``, uvloop) whose ``dynamic_resources`` point at it; ``hot`` goes to an h2c nginx.
Once the agent serves the whole config, ``h2load --h1 -c C`` sends requests through ``edge`` while
``hot.yaml`` is rewritten ``--changes`` times (``hot``'s ``connect_timeout`` changes each time), each change
waiting for the previous one to be applied. Per change:

* **apply ms**: the agent's own ``xds.Cluster.update_time`` for that update (verify, validate, apply, as the
  agent's histogram records it: the increase of its Prometheus ``_sum`` while ``_count`` grows by one);
* **write -> ACK ms**: from the file write to the control plane's store holding the agent's ACK of the new
  version (includes the control plane's poll interval, its validation of the whole directory, signing, the
  wire, and its batched status write); waiting reads the store, not the agent's admin port;
* **rx bytes**: what the agent received on the xDS stream for the change (``cluster.xds_cluster.
  upstream_cx_rx_bytes_total``: gRPC + HTTP/2 framing included).

Then the size of one Cluster ``DeltaDiscoveryResponse`` encoded with ``microenvoy.xds.messages`` (CBOR,
COSE_Sign1 signatures, 5-byte gRPC prefix): one resource (the delta) vs all of them (a state-of-the-world
snapshot). Failed requests come from h2load (non-2xx, errors, timeouts).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from procs import ROOT, Procs, admin_get, listener_ports, percentile, positive, wait_for  # noqa: E402

__all__ = ["main", "snapshot_bytes"]

_HTTP_OPTS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_H2 = {
    _HTTP_OPTS: {
        "@type": "type.googleapis.com/" + _HTTP_OPTS,
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}
_PROM = re.compile(r"^microenvoy_xds_Cluster_update_time_(sum|count) ([0-9.e+-]+)$", re.M)
_REQUESTS = re.compile(
    r"requests:\s+(\d+) total,\s+(\d+) started,\s+(\d+) done,\s+(\d+) succeeded,\s+(\d+) failed,\s+"
    r"(\d+) errored,\s+(\d+) timeout"
)
_STATUS = re.compile(r"status codes:\s+(\d+) 2xx,\s+(\d+) 3xx,\s+(\d+) 4xx,\s+(\d+) 5xx")


def cluster(name: str, port: int, *, h2: bool = False, connect_timeout: str = "1s") -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": port}}}}]}
            ],
        },
    }  # fmt: skip
    if h2:
        c["typed_extension_protocol_options"] = _H2
    return c


def listener(cluster_name: str) -> dict[str, Any]:
    from procs import agent_hcm

    hcm = agent_hcm(stat_prefix="edge", codec_type="AUTO", route={"cluster": cluster_name})
    return {
        "name": "edge",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [hcm]}],
    }


def hot_version(port: int, i: int) -> str:
    from controlplane_lite.versions import CLUSTER, resource_version

    res = {**cluster("hot", port, h2=True, connect_timeout=f"{1 + i / 1000:.3f}s"), "@type": CLUSTER}
    return resource_version(res)


def acked(data: Path, version: str) -> bool:
    """Whether the agent ACKed ``version`` of cluster ``hot`` (read from the control plane's store, so that
    waiting costs the agent nothing)."""
    from controlplane_lite.store import Store
    from controlplane_lite.versions import CLUSTER

    store = Store(str(data / "store.sqlite"))
    try:
        rows = {(r.type_url, r.name): r for r in store.agent_resources("bench-agent")}
    finally:
        store.close()
    row = rows.get((CLUSTER, "hot"))
    return row is not None and row.acked_version == version


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # the control plane skips hidden files
    tmp.write_text(text)
    os.replace(tmp, path)


def hot_file(port: int, i: int) -> str:
    docs = [
        {
            "type": "cluster",
            "resource": cluster("hot", port, h2=True, connect_timeout=f"{1 + i / 1000:.3f}s"),
        },
        {"type": "listener", "resource": listener("hot")},
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)


def prom(admin: str) -> tuple[float, int]:
    """(sum, count) of the agent's ``xds.Cluster.update_time`` histogram (filtered: 10,000 clusters have
    hundreds of thousands of stats)."""
    found = dict(_PROM.findall(admin_get(admin, "/stats/prometheus?filter=update_time")))
    return float(found.get("sum", 0.0)), int(float(found.get("count", 0)))


def stat(admin: str, name: str) -> int:
    doc = json.loads(admin_get(admin, "/stats?format=json&filter=" + quote(f"^{re.escape(name)}$")))
    for e in doc["stats"]:
        if e.get("name") == name:
            return int(e["value"])
    return 0


def agent_bootstrap(cp_port: int, key: str, fetch_timeout: str) -> dict[str, Any]:
    return {
        "node": {"id": "bench-agent", "cluster": "bench", "metadata": {"firmware_profile": "bench"}},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [], "clusters": [cluster("xds_cluster", cp_port, h2=True)]},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
            },
            "cds_config": {"ads": {}, "initial_fetch_timeout": fetch_timeout},
            "lds_config": {"ads": {}, "initial_fetch_timeout": fetch_timeout},
            "microenvoy": {"trusted_keys": [key]},
        },
    }


def start_control_plane(procs: Procs, resources: Path, data: Path, poll: float) -> int:
    port_file = data / "serve.port"
    cmd = [sys.executable, "-m", "controlplane_lite", "serve", "--dir", str(resources), "--data", str(data),
           "--listen", "127.0.0.1:0", "--log-level", "warning", "--poll-interval", str(poll)]  # fmt: skip
    proc = procs.spawn("controlplane", cmd)
    wait_for(
        lambda: port_file.exists() and port_file.read_text().strip().isdigit(), 120, "controlplane", proc
    )
    return int(port_file.read_text())


def snapshot_bytes(n: int) -> dict[str, int]:
    """Encoded size of one Cluster response with 1 resource and with ``n`` (signed, gRPC-framed)."""
    from controlplane_lite.versions import resource_version
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from microenvoy.codecs.grpc import encode_message
    from microenvoy.xds import cose
    from microenvoy.xds.messages import TYPE_CLUSTER, DeltaResponse, ResourceEntry, encode_response

    key = Ed25519PrivateKey.generate()
    entries = []
    for i in range(n):
        name = "hot" if i == 0 else f"c{i:05d}"
        res = {**cluster(name, 8080 + i % 1000, h2=i == 0), "@type": TYPE_CLUSTER}
        version = resource_version(res)
        sig = cose.sign_resource(key, TYPE_CLUSTER, name, version, res)
        entries.append(ResourceEntry(name, version, res, signature=sig))

    def size(resources: list[ResourceEntry]) -> int:
        resp = DeltaResponse(TYPE_CLUSTER, "n-1", "0123456789abcdef", tuple(resources))
        return len(encode_message(encode_response(resp)))

    return {"delta": size(entries[:1]), "snapshot": size(entries), "resources": n}


def run_h2load(url: str, clients: int, duration: float) -> subprocess.Popen[str]:
    exe = shutil.which("h2load")
    if exe is None:
        raise FileNotFoundError("h2load not found (Debian package nghttp2-client)")
    cmd = [exe, "--h1", "-c", str(clients), "-m", "1", "-D", str(int(duration) + 1), url]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def parse_h2load(out: str) -> dict[str, int]:
    rq, st = _REQUESTS.search(out), _STATUS.search(out)
    if rq is None or st is None:
        raise RuntimeError(f"cannot parse h2load output:\n{out}")
    return {
        "done": int(rq.group(3)),
        "succeeded": int(rq.group(4)),
        "failed": int(rq.group(5)) + int(rq.group(6)) + int(rq.group(7)),
        "non_2xx": int(st.group(2)) + int(st.group(3)) + int(st.group(4)),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    procs = Procs(prefix="microenvoy-xds-apply-", keep_tmp=args.keep_tmp)
    try:
        procs.start_nginx_h2c()
        up = procs.nginx_port
        resources, data = procs.tmp / "resources", procs.tmp / "data"
        resources.mkdir()
        t0 = time.monotonic()
        bulk = [{"type": "cluster", "resource": cluster(f"c{i:05d}", up)} for i in range(1, args.clusters)]
        write_atomic(resources / "bulk.yaml", yaml.safe_dump_all(bulk, sort_keys=False))
        write_atomic(resources / "hot.yaml", hot_file(up, 0))
        cp_port = start_control_plane(procs, resources, data, args.poll_interval)
        cp_start = time.monotonic() - t0
        key = subprocess.run([sys.executable, "-m", "controlplane_lite", "keys", "--data", str(data)],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        t1 = time.monotonic()
        _, admin = procs.start_agent(agent_bootstrap(cp_port, key, "300s"), wait_ready=True)
        initial = time.monotonic() - t1
        port = listener_ports(admin)["edge"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert resp.status == 200, resp.status
        first_sum, first_count = prom(admin)
        # One unmeasured change to learn the cycle time (the h2load run must cover every change).
        c0 = time.monotonic()
        write_atomic(resources / "hot.yaml", hot_file(up, 1))
        wait_for(lambda: acked(data, hot_version(up, 1)), 600, "warm-up change applied")
        cycle = time.monotonic() - c0
        load = run_h2load(
            f"http://127.0.0.1:{port}/", args.connections, 2 + args.changes * (cycle * 1.2 + 0.3)
        )
        time.sleep(1.0)  # the load is running before the first change
        samples: list[dict[str, float]] = []
        for i in range(2, args.changes + 2):
            s0, n0 = prom(admin)
            rx0 = stat(admin, "cluster.xds_cluster.upstream_cx_rx_bytes_total")
            want = hot_version(up, i)
            w = time.monotonic()
            write_atomic(resources / "hot.yaml", hot_file(up, i))
            wait_for(lambda v=want: acked(data, v), 600, f"change {i} applied")
            applied = time.monotonic() - w
            s1, n1 = prom(admin)
            if n1 != n0 + 1:
                raise RuntimeError(f"change {i}: {n1 - n0} Cluster updates at the agent, expected 1")
            rx1 = stat(admin, "cluster.xds_cluster.upstream_cx_rx_bytes_total")
            samples.append({"apply_ms": (s1 - s0) / (n1 - n0), "e2e_ms": applied * 1000, "rx": rx1 - rx0})
            time.sleep(0.3)  # a pause between changes: the load runs on the applied config for a while
        out, _ = load.communicate(timeout=600)
        h2 = parse_h2load(out)
        rejected = stat(admin, "xds.Cluster.update_rejected")
    finally:
        procs.close()
    sizes = snapshot_bytes(args.clusters)
    return {
        "clusters": args.clusters,
        "changes": args.changes,
        "control_plane_start_s": round(cp_start, 1),
        "agent_initial_fetch_s": round(initial, 1),
        "initial_apply_ms": round(first_sum / max(first_count, 1), 1),
        "samples": samples,
        "h2load": h2,
        "update_rejected": rejected,
        "bytes": sizes,
    }


def table(r: dict[str, Any]) -> str:
    apply = sorted(s["apply_ms"] for s in r["samples"])
    e2e = sorted(s["e2e_ms"] for s in r["samples"])
    rx = sorted(s["rx"] for s in r["samples"])
    h2, b = r["h2load"], r["bytes"]
    lines = [
        f"One-cluster delta in a {r['clusters']:,}-cluster config, {r['changes']} changes under load "
        f"(control plane start {r['control_plane_start_s']} s; agent start incl. the first "
        f"{r['clusters']:,}-cluster update {r['agent_initial_fetch_s']} s, that update's apply "
        f"{r['initial_apply_ms']} ms)",
        "",
        "| measure | p50 | p99 | max |",
        "|---|---|---|---|",
        f"| apply at the agent (xds.Cluster.update_time) ms | {percentile(apply, 0.5):.2f} | "
        f"{percentile(apply, 0.99):.2f} | {apply[-1]:.2f} |",
        f"| file write -> ACK recorded by the control plane ms | {percentile(e2e, 0.5):.0f} | "
        f"{percentile(e2e, 0.99):.0f} | {e2e[-1]:.0f} |",
        f"| xDS bytes received per change | {percentile(rx, 0.5):.0f} | {percentile(rx, 0.99):.0f} | "
        f"{rx[-1]:.0f} |",
        "",
        f"Requests during the changes (h2load --h1): {h2['done']} done, {h2['succeeded']} succeeded, "
        f"{h2['failed']} failed/errored/timed out, {h2['non_2xx']} non-2xx; "
        f"xds.Cluster.update_rejected {r['update_rejected']}.",
        "",
        "| Cluster response (CBOR, signed, gRPC-framed) | bytes |",
        "|---|---|",
        f"| delta: 1 resource | {b['delta']:,} |",
        f"| snapshot: {b['resources']:,} resources | {b['snapshot']:,} |",
        f"| ratio | 1 : {b['snapshot'] / b['delta']:,.0f} |",
        "",
        f"apply ms mean {statistics.fmean(apply):.2f}, min {apply[0]:.2f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--clusters", type=positive(int), default=10000, help="clusters in the config (10000)")
    p.add_argument("--changes", type=positive(int), default=30, help="one-cluster changes measured (30)")
    p.add_argument("-c", "--connections", type=positive(int), default=4, help="h2load connections (4)")
    p.add_argument("--poll-interval", type=positive(float), default=0.5, help="control plane poll (0.5 s)")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    env_root = str(ROOT)
    if env_root not in sys.path:
        sys.path.insert(0, env_root)
    r = measure(args)
    print(table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
