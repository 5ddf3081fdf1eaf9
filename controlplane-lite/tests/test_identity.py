"""Bootstrap tokens, the enrollment rules, and the mTLS grpcio server (enroll, renew, xDS needs the cert)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import cbor2
import grpc
import pytest
from cpl_testing import FakeClock
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from microenvoy.xds.messages import (
    DELTA_ADS_METHOD,
    DeltaRequest,
    DeltaResponse,
    Node,
    decode_response,
    encode_request,
)

from controlplane_lite.ca import CertificateAuthority
from controlplane_lite.identity import (
    ENROLL_METHOD,
    Enroller,
    EnrollError,
    TokenStore,
    decode_enroll_request,
    peer_node_id,
)
from controlplane_lite.server import ControlPlane
from controlplane_lite.store import Store
from controlplane_lite.versions import CLUSTER


def _csr(key: ec.EllipticCurvePrivateKey) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def tokens(clock: FakeClock) -> Iterator[TokenStore]:
    t = TokenStore(":memory:", clock=clock)
    yield t
    t.close()


# ------------------------------------------------------------------------------------------ tokens
def test_token_is_single_use(tokens: TokenStore) -> None:
    tok = tokens.create("n1", 60)
    assert tokens.pending() == [("n1", 1060.0)]
    tokens.consume(tok, "n1")
    with pytest.raises(EnrollError, match="already used") as e:
        tokens.consume(tok, "n1")
    assert e.value.code == "UNAUTHENTICATED"
    assert tokens.pending() == []


def test_token_expires(tokens: TokenStore, clock: FakeClock) -> None:
    tok = tokens.create("n1", 60)
    clock.now += 60
    with pytest.raises(EnrollError, match="expired"):
        tokens.consume(tok, "n1")


def test_token_is_bound_to_its_node_and_not_spent_by_the_wrong_one(tokens: TokenStore) -> None:
    tok = tokens.create("n1", 60)
    with pytest.raises(EnrollError, match="not for node 'n2'"):
        tokens.consume(tok, "n2")
    tokens.consume(tok, "n1")


def test_unknown_token_and_bad_create_arguments(tokens: TokenStore) -> None:
    with pytest.raises(EnrollError, match="unknown"):
        tokens.consume("nope", "n1")
    with pytest.raises(ValueError, match="node id"):
        tokens.create("a b", 60)
    with pytest.raises(ValueError, match="ttl"):
        tokens.create("n1", 0)


def test_only_the_hash_is_stored(tmp_path: Path) -> None:
    path = str(tmp_path / "identity.sqlite")
    t = TokenStore(path)
    tok = t.create("n1")
    t.close()
    assert tok.encode() not in (tmp_path / "identity.sqlite").read_bytes()


# ------------------------------------------------------------------------------------------ enroller
@pytest.fixture
def enroller(tokens: TokenStore) -> Enroller:
    return Enroller(CertificateAuthority.generate(trust_domain="td", now=time.time()), tokens)


def test_enroll_with_token_then_renew_with_the_certificate(enroller: Enroller) -> None:
    now = time.time()
    tok = enroller.tokens.create("n1", 60)
    out = enroller.enroll(
        {"node_id": "n1", "csr_pem": _csr(ec.generate_private_key(ec.SECP256R1())), "token": tok},
        None,
        now=now,
    )
    assert enroller.ca.verified_node_id(out["certificate_pem"], now=now) == "n1"
    assert out["ca_pem"] == enroller.ca.ca_pem.decode()
    renewed = enroller.enroll(
        {"node_id": "n1", "csr_pem": _csr(ec.generate_private_key(ec.SECP256R1()))}, "n1", now=now
    )
    assert renewed["not_after"] >= out["not_after"]
    assert [how for *_, how in enroller.tokens.issued("n1")] == ["token", "renewal"]


def test_renewal_needs_the_same_node_certificate(enroller: Enroller) -> None:
    req = {"node_id": "n1", "csr_pem": _csr(ec.generate_private_key(ec.SECP256R1()))}
    with pytest.raises(EnrollError, match="current client certificate"):
        enroller.enroll(req, None, now=time.time())
    with pytest.raises(EnrollError, match="is for 'n2'"):
        enroller.enroll(req, "n2", now=time.time())


def test_a_bad_csr_does_not_burn_the_token(enroller: Enroller) -> None:
    tok = enroller.tokens.create("n1", 60)
    with pytest.raises(EnrollError, match="csr_pem") as e:
        enroller.enroll({"node_id": "n1", "csr_pem": "garbage", "token": tok}, None, now=time.time())
    assert e.value.code == "INVALID_ARGUMENT"
    good = {"node_id": "n1", "csr_pem": _csr(ec.generate_private_key(ec.SECP256R1())), "token": tok}
    enroller.enroll(good, None, now=time.time())


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\xff\xff", "not CBOR"),
        (cbor2.dumps([1]), "CBOR map"),
        (cbor2.dumps({"csr_pem": "x"}), "node_id: required"),
        (cbor2.dumps({"node_id": "n", "csr_pem": 5}), "csr_pem: must be"),
        (cbor2.dumps({"node_id": "n", "csr_pem": b"\xff"}), "csr_pem: must be ASCII"),
        (b"\x00" * 70000, "larger than"),
    ],
)
def test_malformed_requests_name_the_field(data: bytes, why: str) -> None:
    with pytest.raises(EnrollError, match=why) as e:
        decode_enroll_request(data)
    assert e.value.code == "INVALID_ARGUMENT"


def test_peer_node_id_from_auth_context(enroller: Enroller) -> None:
    now = time.time()
    issued = enroller.ca.issue(_csr(ec.generate_private_key(ec.SECP256R1())), "n7", now=now)
    assert peer_node_id(enroller.ca, {"x509_pem_cert": [issued.certificate_pem]}, now) == "n7"
    assert peer_node_id(enroller.ca, {"transport_security_type": [b"ssl"]}, now) is None


# ------------------------------------------------------------------------------------------ the server
@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    resources = tmp_path / "resources"
    resources.mkdir()
    (resources / "c.yaml").write_text(
        "type: cluster\nresource:\n  name: api\n  connect_timeout: 1s\n"
        "  load_assignment:\n    cluster_name: api\n    endpoints: []\n"
    )
    store = Store(str(tmp_path / "cp.sqlite"))
    tokens = TokenStore(str(tmp_path / "identity.sqlite"))
    enroller = Enroller(
        CertificateAuthority.load_or_create(str(tmp_path), trust_domain="td", now=time.time()), tokens
    )
    cp = ControlPlane(store, Ed25519PrivateKey.generate(), directory=str(resources), enroller=enroller)
    await cp.start("127.0.0.1:0", "127.0.0.1:0")
    try:
        yield cp
    finally:
        await cp.stop(0)
        store.close()
        tokens.close()


def _channel(cp: ControlPlane, port: int, cert: tuple[bytes, bytes] | None = None) -> Any:
    assert cp.ca is not None
    if cert is None:
        creds = grpc.ssl_channel_credentials(cp.ca.ca_pem)
    else:
        creds = grpc.ssl_channel_credentials(cp.ca.ca_pem, cert[0], cert[1])
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", creds, options=(("grpc.ssl_target_name_override", "localhost"),)
    )


async def _enroll(channel: Any, request: dict[str, Any]) -> dict[str, Any]:
    out = await channel.unary_unary(ENROLL_METHOD)(cbor2.dumps(request), timeout=10)
    assert isinstance(out, bytes)
    msg = cbor2.loads(out)
    assert isinstance(msg, dict)
    return msg


async def _xds_first(channel: Any, node_id: str) -> DeltaResponse | None:
    call = channel.stream_stream(DELTA_ADS_METHOD, request_serializer=encode_request)()
    await call.write(DeltaRequest(CLUSTER, node=Node(node_id, "edge", {}), resource_names_subscribe=("*",)))
    msg = await asyncio.wait_for(call.read(), 10)
    return decode_response(msg) if isinstance(msg, bytes) else None


@pytest.mark.integration
async def test_enroll_then_xds_over_mtls_and_renew(served: ControlPlane) -> None:
    cp = served
    assert cp.enroller is not None
    token = cp.enroller.tokens.create("n1", 60)
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    async with _channel(cp, cp.enroll_port) as ch:
        got = await _enroll(ch, {"node_id": "n1", "csr_pem": _csr(key), "token": token})
        with pytest.raises(grpc.aio.AioRpcError) as used:  # one time only
            await _enroll(ch, {"node_id": "n1", "csr_pem": _csr(key), "token": token})
        assert used.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as no_cert:  # the enrollment port has no client certs
            await _xds_first(ch, "n1")
        assert no_cert.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as renew_without_cert:
            await _enroll(ch, {"node_id": "n1", "csr_pem": _csr(key)})
        assert renew_without_cert.value.code() == grpc.StatusCode.UNAUTHENTICATED
    cert = (key_pem, got["certificate_pem"].encode())
    async with _channel(cp, cp.port, cert) as ch:
        resp = await _xds_first(ch, "n1")
        assert resp is not None
        assert resp.type_url == CLUSTER
        assert cp.authenticated == {"n1": "spiffe://td/agent/n1"}
        renewed = await _enroll(ch, {"node_id": "n1", "csr_pem": _csr(key)})
        assert cp.ca is not None
        assert cp.ca.verified_node_id(renewed["certificate_pem"], now=time.time()) == "n1"
    async with _channel(cp, cp.port, cert) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as other:  # the certificate is n1's, the node says n2
            await _xds_first(ch, "n2")
        assert other.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.integration
async def test_xds_port_refuses_a_client_without_certificate(served: ControlPlane) -> None:
    async with _channel(served, served.port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _xds_first(ch, "n1")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: no certificate
    assert served.authenticated == {}
