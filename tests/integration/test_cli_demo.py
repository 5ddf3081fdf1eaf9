"""The command line and the demo, as a user runs them: real subprocesses, real clients.

* ``microenvoy version`` / ``validate`` (good file exit 0; bad file: every error with its path, exit 1);
* ``microenvoy demo`` on its embedded config: an HTTP/3 GET (aioquic client), a gRPC call over h2c (grpcio
  with raw bytes against the demo's gRPC echo), a gRPC call over HTTP/3 (the shipped ``h3get`` tool), the
  admin server, and a clean exit on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from peers.common import wait_for
from peers.h3_client import H3Client

REPO = Path(__file__).resolve().parents[2]
MICROENVOY = [sys.executable, "-m", "microenvoy"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MICROENVOY, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_version() -> None:
    out = run("version")
    assert out.returncode == 0
    assert out.stdout.startswith("microenvoy ")


def test_validate_good_file() -> None:
    out = run("validate", "-c", "docs/examples/edge.yaml")
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_validate_bad_file_prints_every_error_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """
static_resources:
  clusters:
  - name: a
    lb_policy: ROUND_ROBBIN
    connect_timeout: five seconds
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    bogus: 1
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          stat_prefix: x
          route_config:
            virtual_hosts:
            - name: v
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: missing}
"""
    )
    out = run("validate", "-c", str(bad))
    assert out.returncode == 1
    err = out.stderr
    assert "static_resources.clusters[0].lb_policy: unknown value 'ROUND_ROBBIN'" in err
    assert "static_resources.clusters[0].connect_timeout:" in err
    assert "static_resources.listeners[0].bogus: unknown field" in err
    assert "unknown cluster 'missing'" in err


def test_run_with_a_bad_file_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("static_resources: {clusters: [{name: a, type: NOPE}]}\n")
    out = run("run", "-c", str(bad))
    assert out.returncode == 1
    assert "static_resources.clusters[0].type" in out.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("demo")
    addr_file = tmp / "admin"
    log = (tmp / "demo.log").open("w")
    proc = subprocess.Popen(
        [*MICROENVOY, "demo", "--http-port", "0", "--https-port", "0", "--admin-port", "0",
         "--mqtt-port", "0", "--coap-port", "0", "--admin-address-path", str(addr_file)],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    try:
        wait_for(
            lambda: addr_file.exists() and addr_file.read_text().strip(), timeout=30, message="demo admin"
        )
        admin = "http://" + addr_file.read_text().strip()
        with urllib.request.urlopen(admin + "/listeners?format=json", timeout=5) as r:
            statuses = json.load(r)["listener_statuses"]
        ports = {s["name"]: s["local_address"]["socket_address"]["port_value"] for s in statuses}
        yield proc, admin, ports, tmp / "demo.log"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


async def test_demo_http3_get(demo) -> None:  # type: ignore[no-untyped-def]
    _, _, ports, _ = demo
    async with H3Client("127.0.0.1", ports["h3"]) as c:
        resp = await c.request("GET", "/hello")
    assert resp.status == 200
    seen = json.loads(resp.body)
    assert seen["path"] == "/hello"
    assert seen["headers"][":scheme"] == "https"


def test_demo_grpc_over_h2c(demo) -> None:  # type: ignore[no-untyped-def]
    _, _, ports, _ = demo
    with grpc.insecure_channel(f"127.0.0.1:{ports['http']}") as ch:
        call = ch.unary_unary(
            "/microenvoy.demo.v1.Echo/Echo",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        reply, info = call.with_call(b"\x0a\x05hello", timeout=10)
    assert reply == b"\x0a\x05hello"
    assert info.code() == grpc.StatusCode.OK


def test_demo_grpc_over_http3_with_the_shipped_tool(demo) -> None:  # type: ignore[no-untyped-def]
    _, _, ports, _ = demo
    out = subprocess.run(
        [sys.executable, "-m", "microenvoy.tools.h3get", "--grpc", "/microenvoy.demo.v1.Echo/Echo",
         "-d", "ping", f"https://127.0.0.1:{ports['h3']}/"],
        capture_output=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert b"grpc-status: 0" in out.stdout
    assert b"ping" in out.stdout


def test_demo_admin_and_alt_svc(demo) -> None:  # type: ignore[no-untyped-def]
    _, admin, ports, _ = demo
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/healthz", timeout=5) as r:
        assert r.status == 200
        assert r.headers["alt-svc"] == f'h3=":{ports["h3"]}"; ma=86400'
    with urllib.request.urlopen(admin + "/ready", timeout=5) as r:
        assert r.read().strip() == b"LIVE"


def test_demo_mqtt_bridge_with_mosquitto_clients(demo) -> None:  # type: ignore[no-untyped-def]
    _, admin, ports, _ = demo
    port = str(ports["mqtt"])
    pub = subprocess.run(
        ["mosquitto_pub", "-p", port, "-h", "127.0.0.1", "-t", "demo/sensor/1", "-m", '{"t": 21.5}',
         "-q", "1"],
        capture_output=True, timeout=20, check=False,
    )  # fmt: skip
    assert pub.returncode == 0, pub.stderr
    rr = subprocess.run(
        ["mosquitto_rr", "-p", port, "-h", "127.0.0.1", "-t", "demo/hello", "-e", "demo-replies/1",
         "-m", "hi", "-W", "10"],
        capture_output=True, timeout=20, check=False,
    )  # fmt: skip
    assert rr.returncode == 0, rr.stderr
    echo = json.loads(rr.stdout)
    assert echo["path"] == "/demo/hello"
    with urllib.request.urlopen(admin + "/stats?filter=mqtt.mqtt.bridge_rq_2xx", timeout=5) as r:
        assert b"mqtt.mqtt.bridge_rq_2xx: 2" in r.read()


def test_demo_coap_with_libcoap_client(demo) -> None:  # type: ignore[no-untyped-def]
    _, admin, ports, _ = demo
    url = f"coap://127.0.0.1:{ports['coap']}/demo/hello"
    get = subprocess.run(
        ["coap-client-notls", "-m", "get", url], capture_output=True, timeout=30, check=False
    )
    assert get.returncode == 0, get.stderr
    echo = json.loads(get.stdout)
    assert echo["path"] == "/demo/hello"
    assert echo["method"] == "GET"
    wkc = subprocess.run(
        ["coap-client-notls", "-m", "get", f"coap://127.0.0.1:{ports['coap']}/.well-known/core"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert wkc.stdout.strip() == b'</demo/>;rt="demo";ct=50;obs'
    with urllib.request.urlopen(admin + "/stats?filter=coap.coap.rs_2xx", timeout=5) as r:
        assert b"coap.coap.rs_2xx: 2" in r.read()


def test_demo_exits_cleanly_on_sigterm(demo) -> None:  # type: ignore[no-untyped-def]
    proc, _, _, log = demo
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert "Traceback" not in log.read_text()
