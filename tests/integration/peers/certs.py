"""Throwaway PKI for the tests: a CA, a server certificate (SAN localhost, 127.0.0.1, ::1) and a client
certificate, generated with ``cryptography`` and written as PEM files into a directory."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CLIENT_SAN_DNS", "CLIENT_SAN_URI", "CertBundle", "make_certs"]

CLIENT_SAN_URI = "spiffe://microenvoy.test/device/client-1"
CLIENT_SAN_DNS = "client-1.microenvoy.test"


@dataclass(frozen=True, slots=True)
class CertBundle:
    """Paths of the generated PEM files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    """Leaf only; the CA is in ``ca_cert``."""
    server_key: Path
    server_chain: Path
    """Leaf followed by the CA certificate."""
    client_cert: Path
    client_key: Path

    def server_context(
        self, alpn: Sequence[str] = ("h2",), *, require_client_cert: bool = False
    ) -> ssl.SSLContext:
        """A server-side ``ssl.SSLContext`` with the server certificate and the given ALPN list."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_chain, self.server_key)
        ctx.set_alpn_protocols(list(alpn))
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.ca_cert)
        return ctx

    def client_context(self, alpn: Sequence[str] = ("h2",), *, client_cert: bool = False) -> ssl.SSLContext:
        """A client-side context trusting the test CA (hostname ``localhost`` or ``127.0.0.1`` verifies)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        ctx.set_alpn_protocols(list(alpn))
        if client_cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "microenvoy tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    cn: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    now: datetime.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def make_certs(directory: Path) -> CertBundle:
    """Generate the CA, server and client certificates (ECDSA P-256) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("microenvoy test CA"))
        .issuer_name(_name("microenvoy test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key, server_cert = _leaf(
        ca_key,
        ca_cert,
        "localhost",
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ],
        ExtendedKeyUsageOID.SERVER_AUTH,
        now,
    )
    client_key, client_cert = _leaf(
        ca_key,
        ca_cert,
        "client-1",
        [x509.UniformResourceIdentifier(CLIENT_SAN_URI), x509.DNSName(CLIENT_SAN_DNS)],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        now,
    )

    def pem(c: x509.Certificate) -> bytes:
        return c.public_bytes(serialization.Encoding.PEM)

    bundle = CertBundle(
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        server_chain=directory / "server-chain.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    bundle.ca_cert.write_bytes(pem(ca_cert))
    _write_key(bundle.ca_key, ca_key)
    bundle.server_cert.write_bytes(pem(server_cert))
    bundle.server_chain.write_bytes(pem(server_cert) + pem(ca_cert))
    _write_key(bundle.server_key, server_key)
    bundle.client_cert.write_bytes(pem(client_cert))
    _write_key(bundle.client_key, client_key)
    return bundle
