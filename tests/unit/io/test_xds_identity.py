"""Node identity on the agent: the ``identity`` config block, stored-identity checks, renewal timing and the
cluster's ``reload_tls`` hook (the enroll/renew calls run end to end in test_xds_identity_e2e)."""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from microenvoy.config.loader import parse_bootstrap
from microenvoy.config.xds import IdentityConfig
from microenvoy.core.errors import ConfigError
from microenvoy.io.xds_identity import IdentityError, XdsIdentity, load_identity, new_key_and_csr

NOW = 1_750_000_000.0
H2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


def doc(dynamic: dict[str, Any]) -> dict[str, Any]:
    endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 18000}}}}
    cluster = {
        "name": "xds",
        "load_assignment": {"endpoints": [{"lb_endpoints": [endpoint]}]},
        "typed_extension_protocol_options": H2,
    }
    return {"node": {"id": "n1"}, "static_resources": {"clusters": [cluster]}, "dynamic_resources": dynamic}


def ads() -> dict[str, Any]:
    return {
        "ads_config": {"api_type": "DELTA_GRPC", "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
        "microenvoy": {"require_signatures": False},
    }


def errors_of(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_bootstrap(d)
    return info.value.errors


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("ca"))
        .issuer_name(_name("ca"))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime.fromtimestamp(NOW - 100, datetime.UTC))
        .not_valid_after(datetime.datetime.fromtimestamp(NOW + 86400, datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    key: ec.EllipticCurvePrivateKey,
    uri: str = "spiffe://td/agent/n1",
    lifetime: float = 3600.0,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name("n1"))
        .issuer_name(ca[1].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.fromtimestamp(NOW, datetime.UTC))
        .not_valid_after(datetime.datetime.fromtimestamp(NOW + lifetime, datetime.UTC))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .sign(ca[0], hashes.SHA256())
    )


def _pem(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ) + cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return _ca()


# ------------------------------------------------------------------------------------------ config
def test_identity_block_is_parsed() -> None:
    d = ads()
    d["microenvoy"]["identity"] = {
        "dir": "/var/lib/me/id",
        "bootstrap_token_file": "/etc/me/token",
        "enrollment_cluster": "xds_enroll",
        "ca_file": "/etc/me/ca.pem",
        "renew_before": "3600s",
    }
    dyn = parse_bootstrap(doc(d)).dynamic_resources
    assert dyn.identity == IdentityConfig(
        dir="/var/lib/me/id",
        bootstrap_token_file="/etc/me/token",
        enrollment_cluster="xds_enroll",
        ca_file="/etc/me/ca.pem",
        renew_before=3600.0,
    )
    assert parse_bootstrap(doc(ads())).dynamic_resources.identity is None


def test_identity_block_errors_name_the_field() -> None:
    d = ads()
    d["microenvoy"]["identity"] = {"renew_before": "-1s", "bogus": 1}
    errors = errors_of(doc(d))
    assert any("dynamic_resources.microenvoy.identity.dir" in e for e in errors), errors
    assert any("identity.bogus" in e for e in errors), errors
    assert any("identity.renew_before" in e for e in errors), errors


# ------------------------------------------------------------------------------------------ stored identity
def test_load_identity_accepts_a_usable_certificate(tmp_path: Path, ca: Any) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "identity.pem").write_bytes(_pem(key, _leaf(ca, key)))
    (tmp_path / "ca.pem").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    ident = load_identity(str(tmp_path), "n1", ca_file=str(tmp_path / "ca.pem"), now=NOW + 10)
    assert ident.spiffe_id == "spiffe://td/agent/n1"
    assert ident.not_after == NOW + 3600.0
    assert ident.path == str(tmp_path / "identity.pem")


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("expired", "expired"),
        ("other node", "no SPIFFE id for node 'n1'"),
        ("other key", "not for our key"),
        ("other ca", "not issued by ca_file"),
        ("no cert", "needs a private key and a certificate"),
    ],
)
def test_load_identity_refuses(tmp_path: Path, ca: Any, case: str, why: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(ca, key)
    now = NOW + 10
    if case == "expired":
        now = NOW + 3600
    elif case == "other node":
        cert = _leaf(ca, key, uri="spiffe://td/agent/n2")
    elif case == "other key":
        cert = _leaf(ca, ec.generate_private_key(ec.SECP256R1()))
    elif case == "other ca":
        cert = _leaf(_ca(), key)
    data = _pem(key, cert)
    if case == "no cert":
        data = data.split(b"-----BEGIN CERTIFICATE-----")[0]
    (tmp_path / "identity.pem").write_bytes(data)
    (tmp_path / "ca.pem").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    with pytest.raises(IdentityError, match=why):
        load_identity(str(tmp_path), "n1", ca_file=str(tmp_path / "ca.pem"), now=now)


def test_missing_identity_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_identity(str(tmp_path), "n1", now=NOW)


def test_csr_is_p256_and_self_signed() -> None:
    key, pem = new_key_and_csr("n1")
    csr = x509.load_pem_x509_csr(pem.encode())
    assert csr.is_signature_valid
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    assert public == key.public_key()


# ------------------------------------------------------------------------------------------ renewal timing
class _Stats:
    def counter(self, name: str) -> Any:
        return _Metric()

    def gauge(self, name: str) -> Any:
        return _Metric()


class _Metric:
    value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n

    def set(self, v: int) -> None:
        self.value = v


class _Server:
    def __init__(self) -> None:
        self.stats = _Stats()
        self.bootstrap = type("B", (), {"node": type("N", (), {"id": "n1"})()})()


@pytest.mark.parametrize(
    ("lifetime", "renew_before", "renew_at"),
    [(86400.0, 8 * 3600.0, NOW + 16 * 3600.0), (20.0, 15.0, NOW + 10.0), (3600.0, 60.0, NOW + 3540.0)],
)
def test_renewal_time_is_before_expiry_and_at_most_half_the_lifetime(
    tmp_path: Path, ca: Any, lifetime: float, renew_before: float, renew_at: float
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "identity.pem").write_bytes(_pem(key, _leaf(ca, key, lifetime=lifetime)))
    ident = XdsIdentity(
        _Server(),  # type: ignore[arg-type]
        IdentityConfig(dir=str(tmp_path), renew_before=renew_before),
        xds_clusters=("xds",),
    )
    ident.current = load_identity(str(tmp_path), "n1", now=NOW)
    assert ident.renew_at() == renew_at


# ------------------------------------------------------------------------------------------ the cluster hook
def test_reload_tls_loads_the_client_certificate_and_drops_the_cached_context(
    tmp_path: Path, ca: Any
) -> None:
    from microenvoy.admin.stats import Store
    from microenvoy.io.upstream import UpstreamCluster

    d = doc(ads())
    (tmp_path / "ca.pem").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    d["static_resources"]["clusters"][0]["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "validation_context": {"trusted_ca": {"filename": str(tmp_path / "ca.pem")}}
            },
        },
    }
    config = parse_bootstrap(d).static_resources.clusters[0]
    cluster = UpstreamCluster(config, Store())
    before = cluster.ssl_context()
    assert isinstance(before, ssl.SSLContext)
    assert cluster.ssl_context() is before  # cached
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "identity.pem"
    path.write_bytes(_pem(key, _leaf(ca, key)))
    cluster.reload_tls(str(path))
    after = cluster.ssl_context()
    assert after is not before
    assert cluster.client_certificate == str(path)
    path.write_bytes(b"not pem")  # the file is read at the next rebuild, not before
    assert cluster.ssl_context() is after
    cluster.reload_tls(str(path))
    with pytest.raises(ssl.SSLError):
        cluster.ssl_context()
    assert os.path.exists(path)
