"""COSE_Sign1 (RFC 9052) with Ed25519: our sign/verify, strictness, key loading, interop with pycose."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pycose import headers as cose_headers
from pycose.algorithms import EdDSA
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.messages import Sign1Message

from microenvoy.xds import cose
from microenvoy.xds.cose import SignatureError

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
RESOURCE: dict[str, Any] = {
    "@type": CLUSTER,
    "name": "api",
    "connect_timeout": "1s",
    "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"port_value": 8080}}}]}]},
}
# One fixed key for the module: Ed25519 signing is deterministic, so the tests are too.
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = KEY.public_key()
TRUSTED = cose.trusted_keys([PUB])
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def signed() -> bytes:
    return cose.sign_resource(KEY, CLUSTER, "api", "v1", RESOURCE)


def verify(signature: Any, *, version: str = "v1", trusted: Any = TRUSTED) -> bytes:
    return cose.verify_resource(trusted, signature, CLUSTER, "api", version, RESOURCE)


def reason(signature: Any, **kw: Any) -> str:
    with pytest.raises(SignatureError) as info:
        verify(signature, **kw)
    return info.value.reason


def handmade(
    protected: bytes | dict[int, Any],
    unprotected: dict[int, Any] | None = None,
    *,
    payload: bytes | None = None,
    tag: int | None = 18,
    key: Ed25519PrivateKey = KEY,
    signature: bytes | None = None,
) -> bytes:
    """A COSE_Sign1 over the resource payload with whatever headers, *correctly signed*: only the property
    under test is wrong."""
    body = protected if isinstance(protected, bytes) else cbor2.dumps(protected)
    detached = cose.resource_payload(CLUSTER, "api", "v1", RESOURCE)
    sig = signature if signature is not None else key.sign(cbor2.dumps(["Signature1", body, b"", detached]))
    parts = [body, unprotected or {}, payload, sig]
    return cbor2.dumps(cbor2.CBORTag(tag, parts) if tag is not None else parts)


KID = cose.key_id(PUB)


# --------------------------------------------------------------------------------------------- keys


def test_key_id_is_the_first_8_bytes_of_sha256_of_the_raw_key() -> None:
    assert cose.key_id(PUB) == hashlib.sha256(raw_public(PUB)).digest()[:8]
    assert cose.key_id(PUB) != cose.key_id(OTHER.public_key())


def test_load_public_key_base64_pem_and_bytes() -> None:
    b64 = cose.encode_public_key(PUB)
    assert base64.b64decode(b64) == raw_public(PUB)
    pem = PUB.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    urlsafe = base64.urlsafe_b64encode(raw_public(PUB)).decode().rstrip("=")
    for text in (b64, f"  {b64}\n", b64.encode(), pem, pem.decode(), urlsafe):
        assert raw_public(cose.load_public_key(text)) == raw_public(PUB)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64 at all!",
        base64.b64encode(b"x" * 31).decode(),
        base64.b64encode(b"x" * 64).decode(),
        b"\xff\xfe",
        "-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n",
    ],
)
def test_load_public_key_refuses_bad_text(text: str | bytes) -> None:
    with pytest.raises(ValueError, match=r"public key|base64"):
        cose.load_public_key(text)


def test_load_public_key_refuses_a_non_ed25519_pem() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = p256.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ValueError, match="not an Ed25519 key"):
        cose.load_public_key(pem)


def test_load_private_key_pem_pkcs8_and_base64_seed() -> None:
    pem = KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    seed = base64.b64encode(raw_private(KEY)).decode()
    for text in (pem, pem.decode(), seed, seed.encode()):
        loaded = cose.load_private_key(text)
        assert raw_private(loaded) == raw_private(KEY)
        sig = cose.sign_resource(loaded, CLUSTER, "api", "v1", RESOURCE)
        assert verify(sig) == KID


def test_load_private_key_refuses_other_keys_and_never_echoes_the_key() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    pem = p256.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="not an Ed25519 key"):
        cose.load_private_key(pem)
    short = base64.b64encode(raw_private(KEY)[:31]).decode()
    with pytest.raises(ValueError, match="31 bytes") as info:
        cose.load_private_key(short)
    assert short not in str(info.value)


# ------------------------------------------------------------------------------------- sign / verify


def test_round_trip_returns_the_kid_and_the_wire_shape_is_the_contracts() -> None:
    sig = signed()
    assert verify(sig) == KID
    tag = cbor2.loads(sig)
    assert tag.tag == 18
    protected, unprotected, payload, signature = tag.value
    assert cbor2.loads(protected) == {1: -8, 4: KID}
    assert protected == cbor2.dumps({1: -8, 4: KID}, canonical=True)
    assert dict(unprotected) == {}
    assert payload is None  # detached
    assert len(signature) == 64
    structure = cbor2.dumps(
        ["Signature1", protected, b"", cose.resource_payload(CLUSTER, "api", "v1", RESOURCE)]
    )
    PUB.verify(signature, structure)  # plain Ed25519 over the RFC 9052 §4.4 Sig_structure
    assert cose.resource_payload(CLUSTER, "api", "v1", RESOURCE) == cbor2.dumps(
        [CLUSTER, "api", "v1", RESOURCE], canonical=True
    )


def test_the_payload_is_canonical_so_key_order_does_not_matter() -> None:
    reordered = dict(reversed(list(RESOURCE.items())))
    assert cose.verify_resource(TRUSTED, signed(), CLUSTER, "api", "v1", reordered) == KID


def test_several_trusted_keys_allow_rotation() -> None:
    both = cose.trusted_keys([PUB, OTHER.public_key()])
    new_sig = cose.sign_resource(OTHER, CLUSTER, "api", "v1", RESOURCE)
    assert verify(signed(), trusted=both) == KID
    assert verify(new_sig, trusted=both) == cose.key_id(OTHER.public_key())
    assert reason(new_sig) == "unknown key id"  # not pinned: refused


def test_a_foreign_key_claiming_a_trusted_kid_is_a_bad_signature() -> None:
    forged = handmade({1: -8, 4: KID}, key=OTHER)
    assert reason(forged) == "bad signature"


def test_missing_signature() -> None:
    assert reason(None) == "missing signature"
    assert reason(b"") == "missing signature"
    assert reason("text") == "malformed"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (handmade({1: -8, 4: KID}, tag=None), "not a COSE_Sign1"),
        (handmade({1: -8, 4: KID}, tag=98), "not a COSE_Sign1"),
        (cbor2.dumps(cbor2.CBORTag(18, [b"", {}, None])), "malformed"),
        (cbor2.dumps(cbor2.CBORTag(18, {"a": 1})), "malformed"),
        (handmade({1: -8, 4: KID}) + b"\x00", "malformed"),  # trailing bytes
        (handmade({1: -8, 4: KID})[:-1], "malformed"),  # truncated
        (handmade({1: -7, 4: KID}), "unsupported algorithm"),  # ES256
        (handmade({1: -19, 4: KID}), "unsupported algorithm"),
        (handmade({4: KID}), "unsupported algorithm"),
        (handmade({4: KID}, {1: -8}), "unsupported algorithm"),  # alg unprotected only
        (handmade(b"", {1: -8, 4: KID}), "unsupported algorithm"),  # nothing protected
        (handmade({1: "EdDSA", 4: KID}), "unsupported algorithm"),
        (handmade({1: -8, 4: KID, 2: [99], 99: 1}), "unknown critical header"),
        (handmade({1: -8, 4: KID}, {2: [99]}), "malformed"),  # crit must be protected
        # duplicate label in the protected map: {1: -7, 1: -8, 4: kid} (cbor2 keeps the last value)
        (handmade(b"\xa3\x01\x26\x01\x27\x04\x48" + KID), "malformed"),
        (handmade(b"\xbf\x01\x27\x04\x48" + KID + b"\xff"), "malformed"),  # indefinite-length map
        (handmade(cbor2.dumps([1, -8])), "malformed"),  # protected is not a map
        (handmade({1: -8, 4: KID}, {4: KID}), "malformed"),  # a label in both buckets
        (handmade({1: -8, 4: "kid"}), "malformed"),
        (handmade({1: -8}), "unknown key id"),  # no kid at all
        (handmade({1: -8, 4: b"12345678"}), "unknown key id"),
        (handmade({1: -8, 4: KID}, payload=b"attached"), "malformed"),  # detached expected
        (handmade({1: -8, 4: KID}, signature=b"\x00" * 63), "bad signature"),
        (handmade({1: -8, 4: KID}, signature=b"\x00" * 64), "bad signature"),
    ],
)
def test_strict_verification(message: bytes, expected: str) -> None:
    assert reason(message) == expected


def test_kid_in_the_unprotected_bucket_and_a_non_canonical_protected_map_are_accepted() -> None:
    """RFC 9052 lets kid be unprotected and any valid CBOR encoding of the protected map be signed."""
    assert verify(handmade({1: -8}, {4: KID})) == KID
    kid_first = b"\xa2\x04\x48" + KID + b"\x01\x27"
    assert verify(handmade(kid_first)) == KID
    wide_alg = b"\xa2\x01\x38\x07\x04\x48" + KID  # -8 in a 1-byte argument: still -8
    assert verify(handmade(wide_alg)) == KID


def test_attached_mode() -> None:
    message = cose.sign1(KEY, b"hello")
    assert cose.verify1(TRUSTED, message) == cose.Verified(kid=KID, payload=b"hello")
    with pytest.raises(SignatureError, match="payload must be nil"):
        cose.verify1(TRUSTED, message, detached_payload=b"hello")
    detached = cose.sign1(KEY, b"hello", detached=True)
    with pytest.raises(SignatureError, match="no payload"):
        cose.verify1(TRUSTED, detached)
    assert cose.verify1(TRUSTED, detached, detached_payload=b"hello").payload == b"hello"
    with pytest.raises(SignatureError, match="bad signature"):
        cose.verify1(TRUSTED, detached, detached_payload=b"hellO")


def test_explicit_kid() -> None:
    message = cose.sign1(KEY, b"x", kid=b"rotation-2")
    assert cose.verify1({b"rotation-2": PUB}, message).kid == b"rotation-2"


def test_entry_fields_of_the_wrong_type_are_malformed_not_crashes() -> None:
    sig = signed()
    for args in [
        (sig, 1, "api", "v1", RESOURCE),
        (sig, CLUSTER, None, "v1", RESOURCE),
        (sig, CLUSTER, "api", b"v1", RESOURCE),
        (sig, CLUSTER, "api", "v1", ["not", "a", "map"]),
        (sig, CLUSTER, "api", "v1", {"x": object()}),  # cannot be encoded
        (b"\xd2" * (cose.MAX_SIGNATURE_SIZE + 1), CLUSTER, "api", "v1", RESOURCE),
    ]:
        with pytest.raises(SignatureError) as info:
            cose.verify_resource(TRUSTED, *args)
        assert info.value.reason == "malformed"


def test_error_carries_reason_and_detail() -> None:
    err = SignatureError("unknown key id", "0011")
    assert (err.reason, err.detail, str(err)) == ("unknown key id", "0011", "unknown key id: 0011")
    assert str(SignatureError("bad signature")) == "bad signature"


# ------------------------------------------------------------------------------- interop with pycose


def pycose_key(*, private: bool) -> OKPKey:
    if private:
        return OKPKey(crv=Ed25519, x=raw_public(PUB), d=raw_private(KEY))
    return OKPKey(crv=Ed25519, x=raw_public(PUB))


def pycose_decode(message: bytes) -> Sign1Message:
    # pycose 1.1's own decode() expects cbor2 5's mutable lists; cbor2 6 decodes a tag's content as a tuple
    # with a frozendict, so hand pycose the parts it expects and let it parse headers and verify.
    tag = cbor2.loads(message)
    assert tag.tag == Sign1Message.cbor_tag
    protected, unprotected, payload, signature = tag.value
    return Sign1Message.from_cose_obj([protected, dict(unprotected), payload, signature], True)


def test_pycose_attached_message_verifies_with_ours() -> None:
    msg = Sign1Message(phdr={cose_headers.Algorithm: EdDSA, cose_headers.KID: KID}, payload=b"payload")
    msg.key = pycose_key(private=True)
    encoded = msg.encode()
    assert cose.verify1(TRUSTED, encoded) == cose.Verified(kid=KID, payload=b"payload")


def test_pycose_detached_resource_signature_verifies_with_ours() -> None:
    payload = cose.resource_payload(CLUSTER, "api", "v1", RESOURCE)
    msg = Sign1Message(phdr={cose_headers.Algorithm: EdDSA}, uhdr={cose_headers.KID: KID})
    msg.key = pycose_key(private=True)
    encoded = msg.encode(detached_payload=payload)
    assert verify(encoded) == KID
    assert reason(encoded, version="v2") == "bad signature"


def test_ours_verifies_with_pycose() -> None:
    decoded = pycose_decode(signed())
    decoded.key = pycose_key(private=False)
    assert decoded.get_attr(cose_headers.Algorithm) is EdDSA
    assert decoded.get_attr(cose_headers.KID) == KID
    assert decoded.payload is None
    assert decoded.verify_signature(detached_payload=cose.resource_payload(CLUSTER, "api", "v1", RESOURCE))
    assert not decoded.verify_signature(
        detached_payload=cose.resource_payload(CLUSTER, "api", "v2", RESOURCE)
    )

    attached = pycose_decode(cose.sign1(KEY, b"hello"))
    attached.key = pycose_key(private=False)
    assert attached.payload == b"hello"
    assert attached.verify_signature()


# -------------------------------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
resources = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


@given(index=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_tampered_byte_fails(index: int, flip: int) -> None:
    sig = bytearray(signed())
    sig[index % len(sig)] ^= flip
    with pytest.raises(SignatureError):
        verify(bytes(sig))


@given(
    field=st.sampled_from(["type_url", "name", "version", "resource"]),
    text=st.text(max_size=30),
    resource=resources,
)
def test_changing_what_was_signed_fails(field: str, text: str, resource: dict[str, Any]) -> None:
    entry: dict[str, Any] = {"type_url": CLUSTER, "name": "api", "version": "v1", "resource": RESOURCE}
    entry[field] = resource if field == "resource" else text
    assume(entry[field] != {"type_url": CLUSTER, "name": "api", "version": "v1", "resource": RESOURCE}[field])
    with pytest.raises(SignatureError) as info:
        cose.verify_resource(
            TRUSTED, signed(), entry["type_url"], entry["name"], entry["version"], entry["resource"]
        )
    assert info.value.reason == "bad signature"


@given(type_url=st.text(), name=st.text(), version=st.text(max_size=16), resource=resources)
def test_round_trip_for_any_entry(type_url: str, name: str, version: str, resource: dict[str, Any]) -> None:
    sig = cose.sign_resource(KEY, type_url, name, version, resource)
    assert cose.verify_resource(TRUSTED, sig, type_url, name, version, resource) == KID


@given(data=st.binary(max_size=200))
def test_random_bytes_raise_only_signature_error(data: bytes) -> None:
    with pytest.raises(SignatureError):
        verify(data)


cbor_items = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.binary(max_size=70)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.integers(-10, 10) | st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=15,
)


@settings(max_examples=300)
@given(
    parts=st.lists(cbor_items, min_size=0, max_size=5),
    protected=st.dictionaries(st.integers(-10, 10), cbor_items, max_size=4).map(cbor2.dumps) | cbor_items,
)
def test_random_cose_shaped_structures_raise_only_signature_error(parts: list[Any], protected: Any) -> None:
    message = cbor2.dumps(cbor2.CBORTag(18, [protected, *parts]))
    with pytest.raises(SignatureError):
        verify(message)
