"""The admin server of a real agent: redaction, Prometheus exposition, listeners, clusters, server info."""

from __future__ import annotations

import json
import urllib.request

from peers import configs
from peers.agent import Agent
from peers.certs import CertBundle
from prometheus_client.parser import text_string_to_metric_families


def _agent(agent, certs: CertBundle) -> Agent:  # type: ignore[no-untyped-def]
    key_pem = certs.server_key.read_text()
    tls = configs.downstream_tls(certs)
    tls["typed_config"]["common_tls_context"]["tls_certificates"][0]["private_key"] = {
        "inline_string": key_pem
    }
    listener = configs.tcp_listener("tls", configs.hcm("adm", [configs.route(direct=(200, "ok"))]), tls=tls)
    upstream = configs.cluster("up", 9)  # never contacted
    a: Agent = agent(configs.bootstrap([listener], [upstream]), name="admin")
    return a


def test_config_dump_redacts_inline_private_keys(agent, certs: CertBundle) -> None:  # type: ignore[no-untyped-def]
    a = _agent(agent, certs)
    dump = a.config_dump()
    assert "PRIVATE KEY" not in dump
    assert "[redacted]" in dump
    doc = json.loads(dump)
    assert doc["configs"][0]["bootstrap"]["static_resources"]["listeners"][0]["name"] == "tls"


def test_prometheus_exposition_of_a_live_agent_parses(agent, certs: CertBundle) -> None:  # type: ignore[no-untyped-def]
    a = _agent(agent, certs)
    status, body = a.admin_get("/stats/prometheus")
    assert status == 200
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert any(n.startswith("microenvoy_http_adm_downstream") for n in names)
    assert any(n.startswith("microenvoy_cluster_up_") for n in names)


def test_listeners_clusters_server_info(agent, certs: CertBundle) -> None:  # type: ignore[no-untyped-def]
    a = _agent(agent, certs)
    assert a.port("tls") > 0
    status, text = a.admin_get("/clusters")
    assert status == 200
    assert b"up::127.0.0.1:9::" in text
    status, info = a.admin_get("/server_info")
    assert status == 200
    assert json.loads(info)["state"] == "LIVE"
    with urllib.request.urlopen(f"http://{a.admin_host}:{a.admin_port}/ready", timeout=5) as r:
        assert r.status == 200
        assert r.read().strip() == b"LIVE"
