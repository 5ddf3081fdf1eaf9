"""End to end: the bootstrap token flow yields a certificate and the xDS stream runs over mTLS (issue 6).

A real ``controlplane-lite serve --tls`` (mTLS xDS port + enrollment port) and a real agent that has only a
one-time token: it enrolls, stores its key and certificate, streams xDS with it (the control plane logs the
SPIFFE id), renews before expiry without the token, and after a restart uses the stored certificate. A
client without a certificate cannot open the xDS stream on either port.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from peers import configs as C
from peers.agent import Agent
from peers.common import wait_for
from peers.controlplane import ControlPlaneProcess, agent_bootstrap, cluster_doc, listener_doc
from peers.h1_client import h1_request
from peers.h2_server import H2Server

from microenvoy.xds.messages import DELTA_ADS_METHOD, DeltaRequest, Node, encode_request
from microenvoy.xds.messages import TYPE_CLUSTER as CLUSTER
from microenvoy.xds.messages import TYPE_LISTENER as LISTENER

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NODE = "edge-id-1"
SPIFFE = f"spiffe://microenvoy/agent/{NODE}"


class TlsControlPlane(ControlPlaneProcess):
    """``serve --tls`` with an enrollment port and short-lived agent certificates."""

    cert_ttl = "20s"

    def command(self, *args: str) -> list[str]:
        if args and args[0] == "serve":
            args = (*args, "--tls", "--enroll-listen", "127.0.0.1:0", "--cert-ttl", self.cert_ttl)
        return super().command(*args)

    @property
    def enroll_port(self) -> int:
        return int((self.data / "enroll.port").read_text())


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[TlsControlPlane]:
    proc = TlsControlPlane(tmp_path / "cp")
    yield proc
    proc.kill()


def bootstrap(cp: TlsControlPlane, tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """An agent bootstrap with TLS xDS clusters and an ``identity`` block holding only a token."""
    ca = tmp_path / "cp-ca.pem"
    ca.write_text(cp.cli("keys", "--ca").stdout)
    token = tmp_path / "token"
    token.write_text(cp.cli("token", "--node", NODE, "--ttl", "10m").stdout)
    doc = agent_bootstrap(cp.port, cp.public_key(), None)
    doc["static_resources"]["clusters"] = [
        C.cluster("xds_cluster", cp.port, http2=True, tls_ca=ca),
        C.cluster("xds_enroll", cp.enroll_port, http2=True, tls_ca=ca),
    ]
    identity_dir = tmp_path / "identity"
    doc["dynamic_resources"]["microenvoy"]["identity"] = {
        "dir": str(identity_dir),
        "bootstrap_token_file": str(token),
        "enrollment_cluster": "xds_enroll",
        "ca_file": str(ca),
        "renew_before": "15s",
    }
    doc["node"] = {"id": NODE, "metadata": {"firmware_profile": "tiny-e2e"}}
    return doc, identity_dir


def get(port: int, path: str) -> int:
    return h1_request("127.0.0.1", port, "GET", path, timeout=5).status


def grpc_xds_error(port: int, ca_pem: bytes) -> grpc.StatusCode:
    """Open the xDS stream with grpcio, TLS but no client certificate; the status it fails with."""
    creds = grpc.ssl_channel_credentials(ca_pem)
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        call = ch.stream_stream(DELTA_ADS_METHOD, request_serializer=encode_request)
        req = DeltaRequest(CLUSTER, node=Node(NODE, "edge", {}), resource_names_subscribe=("*",))
        try:
            for _ in call(iter([req]), timeout=10):
                pass
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    raise AssertionError("the xDS stream opened without a client certificate")


def test_bootstrap_token_yields_a_certificate_and_xds_runs_over_mtls(
    agent: Callable[..., Agent], cp: TlsControlPlane, h2_server: H2Server, tmp_path: Path
) -> None:
    cp.write("edge.yaml", [cluster_doc("api", h2_server.port), listener_doc("edge", [C.route("/", "api")])])
    cp.start()
    doc, identity_dir = bootstrap(cp, tmp_path)
    a = agent(doc, name="ident")
    assert get(a.port("edge"), "/x") == 200  # the config came over the mTLS stream
    cp.wait_acked(NODE, LISTENER, "edge")
    assert a.stat("xds.identity.enroll_success") == 1

    # The key and certificate are stored, private, and carry the SPIFFE id; the CP saw that id.
    ident = identity_dir / "identity.pem"
    assert stat.S_IMODE(os.stat(ident).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((identity_dir / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE]
    wait_for(lambda: f"agent {NODE} connected from" in cp.log_text() and SPIFFE in cp.log_text(), 10)

    # Without a client certificate the xDS stream cannot be opened: refused at the TLS handshake on the
    # xDS port, UNAUTHENTICATED on the enrollment port.
    ca_pem = (tmp_path / "cp-ca.pem").read_bytes()
    assert grpc_xds_error(cp.port, ca_pem) == grpc.StatusCode.UNAVAILABLE
    assert grpc_xds_error(cp.enroll_port, ca_pem) == grpc.StatusCode.UNAUTHENTICATED

    # Renewal before expiry (20 s certificates, renew 15 s before): a new certificate without the token,
    # and the stream keeps serving.
    a.wait_stat("xds.identity.renew_success", 1, timeout=30)
    renewed = x509.load_pem_x509_certificate((identity_dir / "cert.pem").read_bytes())
    assert renewed.serial_number != cert.serial_number
    assert renewed.not_valid_after_utc > cert.not_valid_after_utc
    assert get(a.port("edge"), "/y") == 200
    assert "renewed" in cp.log_text()

    # A restart uses the stored certificate (the token is spent) and streams again over mTLS.
    a.stop()
    b = agent(doc, name="ident-again")
    assert get(b.port("edge"), "/z") == 200
    assert b.stat("xds.identity.enroll_success") == 0
    assert b.stat("xds.connected_state") == 1
    assert b.stat("xds.identity.expiration_unix_time_seconds") >= int(time.time())


def test_a_spent_token_does_not_enroll_a_second_agent(
    agent: Callable[..., Agent], cp: TlsControlPlane, tmp_path: Path
) -> None:
    cp.start()
    doc, _ = bootstrap(cp, tmp_path)
    first = agent(doc, name="first")
    first.wait_stat("xds.identity.enroll_success", 1)
    first.stop()
    doc["dynamic_resources"]["microenvoy"]["identity"]["dir"] = str(tmp_path / "other-identity")
    doc["dynamic_resources"]["cds_config"]["initial_fetch_timeout"] = "1s"
    doc["dynamic_resources"]["lds_config"]["initial_fetch_timeout"] = "1s"
    second = agent(doc, name="second")
    second.wait_stat("xds.identity.enroll_failed", 1)
    assert second.stat("xds.connected_state") == 0
    assert "already used" in second.log_text()
