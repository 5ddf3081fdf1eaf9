"""A TLS listener with two filter chains: the chain (certificate and HTTP front) is chosen by SNI.

Chain ``b`` matches ``b.example`` and ``*.b.example`` with its own certificate and a direct response;
the default chain (no ``server_names``) serves everything else with the test CA's certificate.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from peers import configs
from peers.agent import Agent
from peers.certs import CertBundle

from microenvoy.demo import self_signed


@pytest.fixture(scope="module")
def sni_agent(module_agent, certs: CertBundle, tmp_path_factory: pytest.TempPathFactory) -> Agent:  # type: ignore[no-untyped-def]
    tmp: Path = tmp_path_factory.mktemp("sni")
    cert, key = self_signed()
    (tmp / "b.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "b.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    b_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": configs.DOWNSTREAM_TLS_TYPE,
            "common_tls_context": {
                "tls_certificates": [
                    {"certificate_chain": {"filename": str(tmp / "b.pem")},
                     "private_key": {"filename": str(tmp / "b.key")}}
                ],
                "alpn_protocols": ["http/1.1"],
            },
        },
    }  # fmt: skip
    b_chain = {
        "filter_chain_match": {"server_names": ["b.example", "*.b.example"]},
        "filters": [configs.hcm("sni_b", [configs.route(direct=(200, "chain b"))])],
        "transport_socket": b_tls,
    }
    default = configs.tcp_listener(
        "tls",
        configs.hcm("sni_default", [configs.route(direct=(200, "default chain"))]),
        tls=configs.downstream_tls(certs, alpn=("http/1.1",)),
    )
    default["filter_chains"].insert(0, b_chain)
    agent: Agent = module_agent(configs.bootstrap([default], []), name="sni")
    return agent


def fetch(port: int, sni: str) -> tuple[str, bytes]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            cn = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return str(cn[0].value), data


@pytest.mark.parametrize("sni", ["b.example", "x.b.example"])
def test_matching_sni_gets_its_chain(sni_agent: Agent, sni: str) -> None:
    cn, data = fetch(sni_agent.port("tls"), sni)
    assert cn == "microenvoy demo"
    assert data.endswith(b"chain b")


@pytest.mark.parametrize("sni", ["localhost", "b.example.org", "example"])
def test_other_sni_gets_the_default_chain(sni_agent: Agent, sni: str) -> None:
    cn, data = fetch(sni_agent.port("tls"), sni)
    assert cn != "microenvoy demo"
    assert data.endswith(b"default chain")
    assert sni_agent.stat("http.sni_default.downstream_rq_2xx") >= 1
