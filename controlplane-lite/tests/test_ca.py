"""The CA: chains verify (cryptography's X.509 verifier and ``ssl``), SPIFFE SAN, EKU, expiry, CSR checks."""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from controlplane_lite.ca import CertificateAuthority, CsrError, spiffe_node_id

NOW = 1_750_000_000.0


def _csr(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, cn: str = "whatever") -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    csr = b.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def _at(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, datetime.UTC)


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(trust_domain="fleet.example", now=NOW, cert_ttl=3600.0)


def test_client_certificate_verifies_with_spiffe_san_and_client_auth(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.issue(_csr(key, cn="ignored"), "node-1", now=NOW)
    cert = x509.load_pem_x509_certificate(issued.certificate_pem)
    assert issued.spiffe_id == "spiffe://fleet.example/agent/node-1"
    assert issued.not_after == NOW + 3600.0
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-1"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    verifier = PolicyBuilder().store(Store([ca.certificate])).time(_at(NOW + 60)).build_client_verifier()
    verified = verifier.verify(cert, [])
    assert verified.subjects == [x509.UniformResourceIdentifier("spiffe://fleet.example/agent/node-1")]
    assert ca.verified_node_id(issued.certificate_pem, now=NOW + 60) == "node-1"


def test_client_certificate_expires(ca: CertificateAuthority) -> None:
    issued = ca.issue(_csr(ec.generate_private_key(ec.SECP256R1())), "n", now=NOW, ttl=600.0)
    cert = x509.load_pem_x509_certificate(issued.certificate_pem)
    late = PolicyBuilder().store(Store([ca.certificate])).time(_at(NOW + 601)).build_client_verifier()
    with pytest.raises(VerificationError):
        late.verify(cert, [])
    assert ca.verified_node_id(issued.certificate_pem, now=NOW + 599) == "n"
    assert ca.verified_node_id(issued.certificate_pem, now=NOW + 601) is None


def test_a_certificate_of_another_ca_is_not_verified(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate(trust_domain="fleet.example", now=NOW)
    issued = other.issue(_csr(ec.generate_private_key(ec.SECP256R1())), "n", now=NOW)
    assert ca.verified_node_id(issued.certificate_pem, now=NOW) is None
    verifier = PolicyBuilder().store(Store([ca.certificate])).time(_at(NOW)).build_client_verifier()
    with pytest.raises(VerificationError):
        verifier.verify(x509.load_pem_x509_certificate(issued.certificate_pem), [])


def test_server_certificate_verifies_for_loopback_and_names(ca: CertificateAuthority) -> None:
    _, pem = ca.server_certificate(["cp.fleet.example", "10.0.0.7"], now=NOW)
    cert = x509.load_pem_x509_certificate(pem)
    for name in (x509.DNSName("localhost"), x509.DNSName("cp.fleet.example")):
        v = PolicyBuilder().store(Store([ca.certificate])).time(_at(NOW)).build_server_verifier(name)
        v.verify(cert, [])
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.0.0.7"}
    wrong = (
        PolicyBuilder()
        .store(Store([ca.certificate]))
        .time(_at(NOW))
        .build_server_verifier(x509.DNSName("evil.example"))
    )
    with pytest.raises(VerificationError):
        wrong.verify(cert, [])


@pytest.mark.parametrize(
    ("csr", "why"),
    [
        (b"not a csr", "not a PEM"),
        (_csr(ed25519.Ed25519PrivateKey.generate()), "P-256"),
        (_csr(ec.generate_private_key(ec.SECP384R1())), "P-256"),
    ],
)
def test_bad_csrs_are_refused(ca: CertificateAuthority, csr: bytes, why: str) -> None:
    with pytest.raises(CsrError, match=why):
        ca.issue(csr, "n", now=NOW)


@pytest.mark.parametrize("node", ["", "a/b", "..", "x" * 129, "spaces no", "ünï"])
def test_bad_node_ids_are_refused(ca: CertificateAuthority, node: str) -> None:
    with pytest.raises(CsrError, match="node id"):
        ca.issue(_csr(ec.generate_private_key(ec.SECP256R1())), node, now=NOW)


def test_spiffe_node_id_parsing() -> None:
    assert spiffe_node_id("spiffe://td/agent/n-1", "td") == "n-1"
    assert spiffe_node_id("spiffe://other/agent/n-1", "td") is None
    assert spiffe_node_id("spiffe://td/agent/a/b", "td") is None
    assert spiffe_node_id("spiffe://td/workload/n", "td") is None


def test_load_or_create_persists_with_private_key_mode(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    first = CertificateAuthority.load_or_create(data, trust_domain="td", now=NOW)
    assert stat.S_IMODE(os.stat(os.path.join(data, "ca-key.pem")).st_mode) == 0o600
    again = CertificateAuthority.load_or_create(data, now=NOW + 10)
    assert again.ca_pem == first.ca_pem
    assert again.trust_domain == "td"
    assert again.path == os.path.join(data, "ca.pem")
    with pytest.raises(ValueError, match="trust domain 'td'"):
        CertificateAuthority.load_or_create(data, trust_domain="other", now=NOW)
    ca_cert = x509.load_pem_x509_certificate((tmp_path / "data" / "ca.pem").read_bytes())
    assert ca_cert.not_valid_after_utc.timestamp() >= NOW + 10 * 365 * 86400 - 1


async def test_python_ssl_mutual_tls_handshake_with_issued_certificates(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """The chains work in a real TLS handshake: server and client verify each other with the CA."""
    now = datetime.datetime.now(datetime.UTC).timestamp()
    live = CertificateAuthority.generate(trust_domain="td", now=now)
    skey, scert = live.server_certificate(now=now)
    ckey = ec.generate_private_key(ec.SECP256R1())
    issued = live.issue(_csr(ckey), "n1", now=now)
    (tmp_path / "ca.pem").write_bytes(live.ca_pem)
    (tmp_path / "s.pem").write_bytes(scert + skey)
    (tmp_path / "c.pem").write_bytes(
        issued.certificate_pem
        + ckey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(tmp_path / "s.pem")
    sctx.load_verify_locations(tmp_path / "ca.pem")
    sctx.verify_mode = ssl.CERT_REQUIRED
    seen: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(writer.get_extra_info("peercert"))
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=sctx)
    port = server.sockets[0].getsockname()[1]
    cctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    cctx.load_cert_chain(tmp_path / "c.pem")
    async with server:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=cctx, server_hostname="localhost")
        peer = await asyncio.wait_for(seen, 10)
        writer.close()
    assert isinstance(peer, dict)
    assert ("URI", "spiffe://td/agent/n1") in peer["subjectAltName"]
