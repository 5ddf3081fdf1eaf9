"""The control plane's small certificate authority: node identities for agents (issue 6, point 12).

A P-256 key and a self-signed CA certificate (10 years) are generated on first use under the data directory
(``ca-key.pem`` mode 0600, ``ca.pem``); P-256 because ``cryptography``'s X.509 verifier (and most TLS stacks'
policy checks) refuse Ed25519 chains. The CA's subject carries the **trust domain** (``O=``), so it is read
back with the key and never drifts from the certificates already issued.

``CertificateAuthority.issue`` turns an agent's CSR (a P-256 key; its subject and extensions are ignored)
into a short-lived client certificate (default 24 h): subject ``CN=<node id>``, the SPIFFE-style URI SAN
``spiffe://<trust domain>/agent/<node id>`` and the ``clientAuth`` EKU. ``server_certificate`` makes the
control plane's own TLS certificate (``serverAuth``, SANs ``localhost``/``127.0.0.1``/``::1`` plus the
configured names), kept in memory only: a fresh one each start.

Times are inputs (``now``: seconds since the epoch), so the tests drive expiry without sleeping.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_VALIDITY",
    "DEFAULT_CERT_TTL",
    "DEFAULT_TRUST_DOMAIN",
    "SERVER_CERT_VALIDITY",
    "CertificateAuthority",
    "CsrError",
    "Issued",
    "node_id_problem",
    "spiffe_id",
    "spiffe_node_id",
]

DEFAULT_TRUST_DOMAIN = "microenvoy"
DEFAULT_CERT_TTL = 24 * 3600.0
"""Lifetime of an agent client certificate (seconds)."""
CA_VALIDITY = 10 * 365 * 86400.0
SERVER_CERT_VALIDITY = 365 * 86400.0
_SKEW = 300.0
"""``notBefore`` is backdated this much: a device clock a little behind must still accept a fresh cert."""
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
KEY_FILE = "ca-key.pem"
CERT_FILE = "ca.pem"


class CsrError(ValueError):
    """A CSR (or node id) the CA refuses; the message says why."""


@dataclass(frozen=True, slots=True)
class Issued:
    """One issued client certificate."""

    certificate_pem: bytes
    """The leaf certificate (PEM)."""
    not_after: float
    """Expiry, seconds since the epoch."""
    serial: int
    """The certificate's serial number (random, 159 bits)."""
    spiffe_id: str
    """Its URI SAN."""


def _dt(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, datetime.UTC)


def node_id_problem(node_id: str) -> str:
    """Empty if ``node_id`` can be a SPIFFE path segment and a CN, else why not."""
    if not _NODE_ID.fullmatch(node_id):
        return f"node id {node_id!r} must be 1-128 characters of A-Z a-z 0-9 . _ -"
    if node_id in (".", ".."):
        return f"node id {node_id!r} is not a valid path segment"
    return ""


def spiffe_id(trust_domain: str, node_id: str) -> str:
    """``spiffe://<trust_domain>/agent/<node_id>``."""
    return f"spiffe://{trust_domain}/agent/{node_id}"


def spiffe_node_id(uri: str, trust_domain: str) -> str | None:
    """The node id in an agent SPIFFE id of ``trust_domain`` (None if ``uri`` is not one)."""
    prefix = f"spiffe://{trust_domain}/agent/"
    if not uri.startswith(prefix):
        return None
    node = uri[len(prefix) :]
    return node if not node_id_problem(node) else None


def _write_private(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_public(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CertificateAuthority:
    """A P-256 CA: agent client certificates from CSRs and the control plane's server certificate."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        *,
        cert_ttl: float = DEFAULT_CERT_TTL,
        path: str | None = None,
    ) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("the CA key must be P-256")
        self.key = key
        self.certificate = certificate
        self.cert_ttl = cert_ttl
        self.path = path
        """``ca.pem`` on disk (None for an in-memory CA)."""
        orgs = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        self.trust_domain = str(orgs[0].value) if orgs else DEFAULT_TRUST_DOMAIN
        self.ca_pem = certificate.public_bytes(serialization.Encoding.PEM)

    def __repr__(self) -> str:
        return f"<CertificateAuthority trust_domain={self.trust_domain} ttl={self.cert_ttl:g}s>"

    # -- creation ------------------------------------------------------------------------------------
    @classmethod
    def generate(
        cls, *, trust_domain: str = DEFAULT_TRUST_DOMAIN, now: float, cert_ttl: float = DEFAULT_CERT_TTL
    ) -> CertificateAuthority:
        """A new CA (key and self-signed certificate valid for ``CA_VALIDITY``)."""
        if not _TRUST_DOMAIN.fullmatch(trust_domain):
            raise ValueError(f"trust domain {trust_domain!r} must be lower-case letters, digits, . _ -")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, "controlplane-lite CA"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_dt(now - _SKEW))
            .not_valid_after(_dt(now + CA_VALIDITY))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
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
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert, cert_ttl=cert_ttl)

    @classmethod
    def load_or_create(
        cls,
        data_dir: str,
        *,
        trust_domain: str | None = None,
        cert_ttl: float = DEFAULT_CERT_TTL,
        now: float,
    ) -> CertificateAuthority:
        """The CA under ``data_dir`` (``ca-key.pem`` 0600 + ``ca.pem``), generated on first use.

        ``trust_domain`` applies to a new CA; an existing CA keeps its own and a different explicit value is
        an error (certificates already issued name the old one).
        """
        os.makedirs(data_dir, exist_ok=True)
        key_path = os.path.join(data_dir, KEY_FILE)
        cert_path = os.path.join(data_dir, CERT_FILE)
        try:
            with open(key_path, "rb") as f:
                key_pem = f.read()
            with open(cert_path, "rb") as f:
                cert_pem = f.read()
        except FileNotFoundError:
            if os.path.exists(key_path):
                raise ValueError(f"{key_path} exists but {cert_path} is missing") from None
            ca = cls.generate(trust_domain=trust_domain or DEFAULT_TRUST_DOMAIN, now=now, cert_ttl=cert_ttl)
            _write_private(
                key_path,
                ca.key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
            _write_public(cert_path, ca.ca_pem)
            ca.path = cert_path
            return ca
        key = serialization.load_pem_private_key(key_pem, None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: not an EC private key")
        ca = cls(key, x509.load_pem_x509_certificate(cert_pem), cert_ttl=cert_ttl, path=cert_path)
        if ca.certificate.public_key() != key.public_key():
            raise ValueError(f"{cert_path} does not match {key_path}")
        if trust_domain is not None and trust_domain != ca.trust_domain:
            raise ValueError(
                f"the CA in {data_dir} has trust domain {ca.trust_domain!r}, not {trust_domain!r}"
            )
        return ca

    # -- issuing -------------------------------------------------------------------------------------
    def spiffe_id(self, node_id: str) -> str:
        return spiffe_id(self.trust_domain, node_id)

    @staticmethod
    def check_csr(csr_pem: bytes | str) -> ec.EllipticCurvePublicKey:
        """The CSR's public key if the CSR is acceptable (PEM, P-256, self-signature verifies)."""
        data = csr_pem.encode("ascii", "replace") if isinstance(csr_pem, str) else bytes(csr_pem)
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as exc:
            raise CsrError(f"not a PEM certificate signing request ({exc})") from None
        try:
            public = csr.public_key()
        except Exception as exc:  # an unsupported algorithm
            raise CsrError(f"unsupported CSR key ({exc})") from None
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
            raise CsrError("the CSR key must be an EC P-256 (secp256r1) key")
        if not csr.is_signature_valid:
            raise CsrError("the CSR's signature does not verify")
        return public

    def issue(self, csr_pem: bytes | str, node_id: str, *, now: float, ttl: float | None = None) -> Issued:
        """A client certificate for ``node_id`` with the CSR's public key (``CsrError`` if refused)."""
        problem = node_id_problem(node_id)
        if problem:
            raise CsrError(problem)
        public = self.check_csr(csr_pem)
        lifetime = self.cert_ttl if ttl is None else ttl
        not_after = min(now + lifetime, self.certificate.not_valid_after_utc.timestamp())
        uri = self.spiffe_id(node_id)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(serial)
            .not_valid_before(_dt(now - _SKEW))
            .not_valid_after(_dt(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(self._aki(), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), not_after, serial, uri)

    def server_certificate(
        self, names: Iterable[str] = (), *, now: float, validity: float = SERVER_CERT_VALIDITY
    ) -> tuple[bytes, bytes]:
        """``(private key PEM, certificate PEM)`` for the control plane's TLS port: SANs ``localhost``,
        ``127.0.0.1``, ``::1`` and ``names`` (host names or IP addresses)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        seen: set[str] = set()
        for name in ("localhost", "127.0.0.1", "::1", *names):
            if not name or name in seen:
                continue
            seen.add(name)
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        not_after = min(now + validity, self.certificate.not_valid_after_utc.timestamp())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "controlplane-lite")]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_dt(now - _SKEW))
            .not_valid_after(_dt(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(self._aki(), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return key_pem, cert.public_bytes(serialization.Encoding.PEM)

    def _aki(self) -> x509.AuthorityKeyIdentifier:
        ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    # -- checking ------------------------------------------------------------------------------------
    def verified_node_id(self, cert_pem: bytes | str, *, now: float) -> str | None:
        """The node id of a client certificate this CA issued and that is valid at ``now`` (None if not).

        Defence in depth for what the TLS layer already verified: issuer signature, validity, clientAuth.
        """
        data = cert_pem.encode("ascii", "replace") if isinstance(cert_pem, str) else bytes(cert_pem)
        try:
            cert = x509.load_pem_x509_certificate(data)
            cert.verify_directly_issued_by(self.certificate)
            if not cert.not_valid_before_utc.timestamp() <= now < cert.not_valid_after_utc.timestamp():
                return None
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
                return None
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
            return None
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            node = spiffe_node_id(uri, self.trust_domain)
            if node is not None:
                return node
        return None


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
