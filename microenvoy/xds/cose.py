"""Resource signatures: COSE_Sign1 (RFC 9052 §4.2, §4.4) with EdDSA over Ed25519, sans-IO.

Every xDS resource controlplane-lite sends carries a COSE_Sign1 over
``cbor2.dumps([type_url, name, version, resource], canonical=True)``, sent with a *detached* payload (nil):
the verifier rebuilds the payload from the resource entry it received. The agent verifies it against the
public keys pinned in its bootstrap before applying or caching the resource; several trusted keys allow
rotation.

Wire shape (RFC 9052 §4.2)::

    COSE_Sign1 = #6.18([ protected: bstr .cbor {1 (alg): -8 (EdDSA), 4 (kid): bstr},
                         unprotected: {}, payload: nil (detached) / bstr, signature: bstr(64) ])

The signature is Ed25519 over ``Sig_structure = ["Signature1", protected, external_aad = h'', payload]``
(§4.4). The key id is the first 8 bytes of SHA-256 of the raw 32-byte public key.

Verification is strict, and every failure is one :class:`SignatureError` with a short ``reason``:

* tag 18 is required (an untagged array is "not a COSE_Sign1");
* the protected header is a non-empty bstr holding one definite-length CBOR map without duplicate labels;
  ``alg`` must be there and be -8 ("unsupported algorithm" otherwise);
* a ``crit`` header (label 2) names parameters the recipient must understand (§3.1); we understand none
  beyond the ones this document defines, so any ``crit`` is refused ("unknown critical header");
* a label in both buckets, a non-map unprotected header, trailing bytes, or a malformed structure is
  "malformed";
* detached mode requires a nil payload, attached mode a bstr one;
* the kid (protected, or unprotected as RFC 9052 allows) must name a trusted key ("unknown key id").

Interoperability with other COSE implementations (pycose) is checked in tests/unit/xds/test_cose.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "ALG_EDDSA",
    "COSE_SIGN1_TAG",
    "MAX_SIGNATURE_SIZE",
    "SignatureError",
    "Verified",
    "encode_public_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "resource_payload",
    "sign1",
    "sign_resource",
    "trusted_keys",
    "verify1",
    "verify_resource",
]

COSE_SIGN1_TAG = 18
"""CBOR tag of a COSE_Sign1 message (RFC 9052 §2)."""
ALG_EDDSA = -8
"""COSE algorithm identifier of EdDSA (RFC 9053 §2.2); with an Ed25519 key."""
MAX_SIGNATURE_SIZE = 4096
"""Largest detached-payload COSE_Sign1 :func:`verify_resource` decodes (ours is ~90 bytes)."""

_HDR_ALG = 1
_HDR_CRIT = 2
_HDR_KID = 4
_KID_SIZE = 8
_ED25519_SIG_SIZE = 64
_ED25519_KEY_SIZE = 32
_MAX_DEPTH = 16


class SignatureError(Exception):
    """A signature is missing, malformed, made with an unknown key or does not verify."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        """Short, stable reason ("missing signature", "bad signature", ...): fit for a stat or a NACK."""
        self.detail = detail
        """Optional specifics (which header, what was found); never key material."""


@dataclass(frozen=True, slots=True)
class Verified:
    """A COSE_Sign1 that verified."""

    kid: bytes
    """Key id of the trusted key that verified it."""
    payload: bytes
    """The signed payload (the detached one when detached)."""


# ------------------------------------------------------------------------------------------------ keys


def key_id(public_key: Ed25519PublicKey) -> bytes:
    """The 8-byte key id: the first 8 bytes of SHA-256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:_KID_SIZE]


def trusted_keys(keys: Iterable[Ed25519PublicKey]) -> dict[bytes, Ed25519PublicKey]:
    """The ``{kid: key}`` mapping :func:`verify_resource` takes, from a list of pinned keys."""
    return {key_id(key): key for key in keys}


def encode_public_key(public_key: Ed25519PublicKey) -> str:
    """Base64 of the raw 32-byte key: the form a bootstrap pins (:func:`load_public_key` reads it)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def _text(data: str | bytes) -> str:
    if isinstance(data, bytes):
        try:
            return data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ValueError("a key must be base64 or PEM text") from None
    return data.strip()


def _raw32(text: str, what: str) -> bytes:
    compact = "".join(text.split()).replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what}: not base64 (nor PEM)") from None
    if len(raw) != _ED25519_KEY_SIZE:
        raise ValueError(f"{what}: base64 must hold the raw 32-byte Ed25519 key, got {len(raw)} bytes")
    return raw


def load_public_key(data: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from base64 of its raw 32 bytes, or a PEM SubjectPublicKeyInfo.

    Raises ``ValueError`` with a reason that names no key material.
    """
    text = _text(data)
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"public key: bad PEM ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"public key: PEM holds a {type(key).__name__}, not an Ed25519 key")
        return key
    return Ed25519PublicKey.from_public_bytes(_raw32(text, "public key"))


def load_private_key(data: str | bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from an unencrypted PEM PKCS#8, or base64 of the raw 32-byte seed.

    Raises ``ValueError`` with a reason that names no key material.
    """
    text = _text(data)
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
        except (ValueError, TypeError) as exc:
            # The message of a failed PEM parse names the reason, never the key.
            raise ValueError(f"private key: bad PEM ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"private key: PEM holds a {type(key).__name__}, not an Ed25519 key")
        return key
    return Ed25519PrivateKey.from_private_bytes(_raw32(text, "private key"))


# ----------------------------------------------------------------------------------------- COSE_Sign1


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 9052 §4.4 Sig_structure for a COSE_Sign1 with empty external_aad."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def sign1(
    private_key: Ed25519PrivateKey, payload: bytes, *, kid: bytes | None = None, detached: bool = False
) -> bytes:
    """A tagged COSE_Sign1 (EdDSA) over ``payload``; ``kid`` defaults to :func:`key_id` of the key.

    With ``detached`` the payload slot is nil and the verifier must supply the payload.
    """
    if kid is None:
        kid = key_id(private_key.public_key())
    protected = cbor2.dumps({_HDR_ALG: ALG_EDDSA, _HDR_KID: kid}, canonical=True)
    signature = private_key.sign(_sig_structure(protected, payload))
    return cbor2.dumps(
        cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, None if detached else payload, signature])
    )


def _decode_one(data: bytes) -> Any:
    """Exactly one CBOR item; trailing bytes or any decoder complaint is "malformed"."""
    fp = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(fp).decode()
    except Exception as exc:  # the decoder raises many types for hostile input; all are "malformed"
        raise SignatureError("malformed", f"undecodable CBOR ({type(exc).__name__})") from None
    if fp.tell() != len(data):
        raise SignatureError("malformed", "trailing bytes after the CBOR item")
    return item


def _declared_map_size(encoded: bytes) -> int | None:
    """Entry count of the definite-length CBOR map ``encoded`` starts with (None if not one)."""
    first = encoded[0]
    if first >> 5 != 5:
        return None
    info = first & 0x1F
    if info < 24:
        return info
    width = {24: 1, 25: 2, 26: 4, 27: 8}.get(info)
    if width is None or len(encoded) < 1 + width:
        return None  # 31 = indefinite length: refused (cannot count duplicates cheaply)
    return int.from_bytes(encoded[1 : 1 + width], "big")


def _protected_header(protected: object) -> Mapping[Any, Any]:
    if not isinstance(protected, bytes):
        raise SignatureError("malformed", "protected header is not a bstr")
    if not protected:
        # A zero-length protected header means "no protected parameters": no alg under the signature.
        raise SignatureError("unsupported algorithm", "no protected algorithm")
    header = _decode_one(protected)
    if not isinstance(header, Mapping):
        raise SignatureError("malformed", "protected header is not a map")
    if _declared_map_size(protected) != len(header):
        raise SignatureError("malformed", "protected header has duplicate labels or an indefinite length")
    return header


def _is_int(value: object, expected: int) -> bool:
    return type(value) is int and value == expected


def verify1(
    trusted: Mapping[bytes, Ed25519PublicKey], message: bytes, *, detached_payload: bytes | None = None
) -> Verified:
    """Verify a COSE_Sign1 (EdDSA) against the trusted ``{kid: key}`` keys; see the module docstring.

    ``detached_payload`` given: the message's payload slot must be nil and this is what was signed.
    Otherwise the message must carry its payload. Raises :class:`SignatureError`, never anything else.
    """
    if not isinstance(message, bytes | bytearray | memoryview):
        raise SignatureError("missing signature" if message is None else "malformed", "not bytes")
    message = bytes(message)
    if not message:
        raise SignatureError("missing signature")
    item = _decode_one(message)
    if not isinstance(item, cbor2.CBORTag) or item.tag != COSE_SIGN1_TAG:
        tag = f"tag {item.tag}" if isinstance(item, cbor2.CBORTag) else f"untagged {type(item).__name__}"
        raise SignatureError("not a COSE_Sign1", tag)
    parts = item.value
    if not isinstance(parts, Sequence) or isinstance(parts, str | bytes) or len(parts) != 4:
        raise SignatureError("malformed", "COSE_Sign1 is not an array of 4")
    protected, unprotected, payload, signature = parts
    header = _protected_header(protected)
    if not isinstance(unprotected, Mapping):
        raise SignatureError("malformed", "unprotected header is not a map")
    if set(header) & set(unprotected):
        raise SignatureError("malformed", "a header label is both protected and unprotected")
    if _HDR_CRIT in unprotected:
        raise SignatureError("malformed", "crit must be protected")
    if _HDR_CRIT in header:
        raise SignatureError("unknown critical header", repr(header[_HDR_CRIT])[:64])
    if _HDR_ALG in unprotected:
        raise SignatureError("unsupported algorithm", "alg must be protected")
    if not _is_int(header.get(_HDR_ALG), ALG_EDDSA):
        raise SignatureError("unsupported algorithm", repr(header.get(_HDR_ALG))[:32])
    if detached_payload is not None:
        if payload is not None:
            raise SignatureError("malformed", "payload must be nil (detached)")
        signed_payload = bytes(detached_payload)
    else:
        if not isinstance(payload, bytes):
            raise SignatureError("malformed", "no payload in the message and none supplied")
        signed_payload = payload
    kid = header.get(_HDR_KID, unprotected.get(_HDR_KID))
    if kid is None:
        raise SignatureError("unknown key id", "no kid")
    if not isinstance(kid, bytes):
        raise SignatureError("malformed", "kid is not a bstr")
    key = trusted.get(kid)
    if key is None:
        raise SignatureError("unknown key id", kid.hex())
    if not isinstance(signature, bytes) or len(signature) != _ED25519_SIG_SIZE:
        raise SignatureError("bad signature", "not a 64-byte Ed25519 signature")
    try:
        key.verify(signature, _sig_structure(protected, signed_payload))
    except InvalidSignature:
        raise SignatureError("bad signature") from None
    return Verified(kid=kid, payload=signed_payload)


# --------------------------------------------------------------------------------------- xDS resources


def resource_payload(type_url: str, name: str, version: str, resource: Mapping[str, Any]) -> bytes:
    """The signed payload: ``cbor2.dumps([type_url, name, version, resource], canonical=True)``."""
    return cbor2.dumps([type_url, name, version, resource], canonical=True)


def sign_resource(
    private_key: Ed25519PrivateKey, type_url: str, name: str, version: str, resource: Mapping[str, Any]
) -> bytes:
    """The detached COSE_Sign1 a resource entry carries as its ``signature``."""
    return sign1(private_key, resource_payload(type_url, name, version, resource), detached=True)


def verify_resource(
    trusted: Mapping[bytes, Ed25519PublicKey],
    signature: bytes | None,
    type_url: str,
    name: str,
    version: str,
    resource: Mapping[str, Any],
) -> bytes:
    """Verify a resource entry's signature; returns the kid of the key that verified it.

    Arguments come straight from a decoded entry, so their types are checked here too. Raises
    :class:`SignatureError` only.
    """
    if signature is None or (isinstance(signature, bytes | bytearray) and not signature):
        raise SignatureError("missing signature")
    if not isinstance(signature, bytes | bytearray):
        raise SignatureError("malformed", "signature is not a bstr")
    if len(signature) > MAX_SIGNATURE_SIZE:
        raise SignatureError("malformed", f"signature larger than {MAX_SIGNATURE_SIZE} bytes")
    if not (isinstance(type_url, str) and isinstance(name, str) and isinstance(version, str)):
        raise SignatureError("malformed", "type_url, name and version must be strings")
    if not isinstance(resource, Mapping):
        raise SignatureError("malformed", "resource is not a map")
    try:
        payload = resource_payload(type_url, name, version, resource)
    except Exception as exc:  # an unencodable value in a decoded resource is the peer's fault
        raise SignatureError("malformed", f"resource cannot be encoded ({type(exc).__name__})") from None
    return verify1(trusted, bytes(signature), detached_payload=payload).kid
