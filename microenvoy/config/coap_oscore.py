"""OSCORE config (RFC 8613): the ``oscore`` block of the ``coap_proxy`` network filter.

::

    oscore:
      require: false                  # true: plain (unprotected) requests are refused with 4.01
      state_dir: /var/lib/microenvoy/oscore   # optional: where sender sequence numbers are persisted
      contexts:
      - name: sensor-17               # label in logs and stats; the principal for RBAC
        sender_id: "01"               # hex; the agent's Sender ID (= the device's Recipient ID)
        recipient_id: "00"            # hex; the device's Sender ID (the kid in its requests)
        id_context: "37cbf3210017a2d3"  # hex, optional ("" or absent: no ID Context)
        master_secret: "0102..."      # hex; or master_secret_file: /path (raw bytes, or hex digits)
        master_salt: "9e7c..."        # hex, optional (default empty)
        algorithm: AES-CCM-16-64-128  # AEAD algorithm (names as aiocoap's ``oscore.algorithms``)
        hkdf: SHA-256                 # SHA-256 | SHA-384 | SHA-512
        replay_window: 32             # replay window size (RFC 8613 §7.4 default 32)

Every bad field is reported with its path (``...oscore.contexts[1].sender_id: not hexadecimal``). The
secret is read while the config is parsed (``master_secret_file`` too, resolved against the config file's
directory) and kept only in ``OscoreContextConfig.master_secret``, which ``repr`` never shows; the raw
``master_secret``/``master_secret_file`` keys are redacted by ``microenvoy.config.dump.redact``.

This module does not import aiocoap (config stays cheap); the algorithm table here is checked against
aiocoap's in the unit tests. The runtime is ``microenvoy.io.coap_oscore.OscoreServer``; user docs are in
``docs/coap.md (OSCORE)``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from microenvoy.config.reader import Reader

__all__ = [
    "AEAD_NONCE_LENGTHS",
    "DEFAULT_ALGORITHM",
    "HKDF_HASHES",
    "OscoreConfig",
    "OscoreContextConfig",
    "parse_oscore",
    "parse_oscore_context",
]

DEFAULT_ALGORITHM = "AES-CCM-16-64-128"

AEAD_NONCE_LENGTHS: dict[str, int] = {
    "AES-CCM-16-64-128": 13,
    "AES-CCM-16-64-256": 13,
    "AES-CCM-64-64-128": 7,
    "AES-CCM-64-64-256": 7,
    "AES-CCM-16-128-128": 13,
    "AES-CCM-16-128-256": 13,
    "AES-CCM-64-128-128": 7,
    "AES-CCM-64-128-256": 7,
    "ChaCha20/Poly1305": 12,
    "A128GCM": 12,
    "A192GCM": 12,
    "A256GCM": 12,
}
"""The AEAD algorithms aiocoap implements (its ``oscore.algorithms`` minus the non-AEAD A128CBC) and their
nonce length; a Sender/Recipient ID may be at most ``nonce length - 6`` bytes long (RFC 8613 §3.3)."""

HKDF_HASHES: dict[str, str] = {"SHA-256": "sha256", "SHA-384": "sha384", "SHA-512": "sha512"}
"""Config name -> aiocoap's ``oscore.hashfunctions`` key."""

_HEX = re.compile(r"^(?:[0-9a-fA-F]{2})*$")
_HEX_FILE = re.compile(rb"^(?:[0-9a-fA-F]{2})+$")
_MAX_REPLAY_WINDOW = 1024


@dataclass(frozen=True, slots=True)
class OscoreContextConfig:
    """One device's OSCORE security context as the agent (the server) sees it."""

    name: str
    """Label for logs and stats; the principal RBAC sees for requests protected with this context."""
    sender_id: bytes
    """The agent's Sender ID (the device's Recipient ID)."""
    recipient_id: bytes
    """The device's Sender ID: the ``kid`` in its requests."""
    master_secret: bytes = field(repr=False)
    """The Master Secret (never shown by ``repr``/``str``)."""
    master_secret_file: str = ""
    """Where ``master_secret`` was read from ("" when given inline)."""
    id_context: bytes | None = None
    """The ID Context (``kid context``); None when absent."""
    master_salt: bytes = b""
    """The Master Salt (empty by default, RFC 8613 §3.1)."""
    algorithm: str = DEFAULT_ALGORITHM
    """AEAD algorithm name (a key of ``AEAD_NONCE_LENGTHS``)."""
    hkdf: str = "SHA-256"
    """HKDF hash (a key of ``HKDF_HASHES``)."""
    replay_window: int = 32
    """Replay window size in sequence numbers (RFC 8613 §7.4)."""


@dataclass(frozen=True, slots=True)
class OscoreConfig:
    """The ``oscore`` block of a ``coap_proxy`` filter."""

    contexts: tuple[OscoreContextConfig, ...] = ()
    """One security context per device; (recipient_id, id_context) pairs are unique."""
    require: bool = False
    """True: requests without the OSCORE option are refused with 4.01 Unauthorized."""
    state_dir: str = ""
    """Directory for persisted sender sequence numbers (RFC 8613 Appendix B.1.1); "" keeps none and starts
    each context's sequence number at a random point (see docs/coap.md (OSCORE))."""


def _hex(r: Reader, key: str, *, required: bool = False, non_empty: bool = False) -> bytes | None:
    """A hex string field -> bytes; None when absent (or invalid, reported)."""
    text = r.string(key, None, required=required)
    if text is None:  # absent, or not a string (reported)
        return None
    if not _HEX.match(text):
        r.error("not hexadecimal (an even number of 0-9a-f digits)", key)
        return None
    if non_empty and not text:
        r.error("must not be empty", key)
        return None
    return bytes.fromhex(text)


def _secret_file(r: Reader, key: str) -> tuple[str, bytes | None]:
    name = r.string(key, "")
    if not name:
        r.error("must not be empty", key)
        return "", None
    from microenvoy.config.loader import resolve_path

    if "\0" in name:
        r.error("a file name cannot contain a NUL byte", key)
        return "", None
    path = resolve_path(name)
    try:
        with open(path, "rb") as f:
            data = f.read(4097)
    except OSError as exc:
        r.error(f"cannot read {path}: {exc.strerror or exc}", key)
        return path, None
    if len(data) > 4096:
        r.error(f"{path}: longer than 4096 bytes, not a master secret", key)
        return path, None
    compact = b"".join(data.split())
    secret = bytes.fromhex(compact.decode("ascii")) if _HEX_FILE.match(compact) else data
    if not secret:
        r.error(f"{path}: empty", key)
        return path, None
    return path, secret


def parse_oscore_context(r: Reader) -> OscoreContextConfig:
    """One ``contexts[i]`` entry; problems go to ``r`` (the caller calls ``finish()``)."""
    name = r.string("name", "", required=True)
    if r.has("name") and isinstance(r.raw.get("name"), str) and not name:
        r.error("must not be empty", "name")
    sender_id = _hex(r, "sender_id", required=True)
    recipient_id = _hex(r, "recipient_id", required=True)
    id_context = _hex(r, "id_context") or None
    master_salt = _hex(r, "master_salt") or b""
    algorithm = r.enum("algorithm", tuple(AEAD_NONCE_LENGTHS), DEFAULT_ALGORITHM)
    hkdf = r.enum("hkdf", tuple(HKDF_HASHES), "SHA-256")
    replay_window = r.integer("replay_window", 32, min=1, max=_MAX_REPLAY_WINDOW)

    secret: bytes | None = None
    secret_file = ""
    kind = r.one_of("master_secret", "master_secret_file")
    r.ignore("master_secret", "master_secret_file")
    if kind == "master_secret":
        secret = _hex(r, "master_secret", non_empty=True)
    elif kind == "master_secret_file":
        secret_file, secret = _secret_file(r, "master_secret_file")

    max_id = AEAD_NONCE_LENGTHS[algorithm] - 6
    for key, value in (("sender_id", sender_id), ("recipient_id", recipient_id)):
        if value is not None and len(value) > max_id:
            r.error(f"{len(value)} bytes is too long for {algorithm} (at most {max_id})", key)
    if sender_id is not None and sender_id == recipient_id:
        r.error("must differ from sender_id (RFC 8613 §3.3)", "recipient_id")
    if id_context is not None and len(id_context) > 255:
        r.error("longer than 255 bytes", "id_context")
    return OscoreContextConfig(
        name=name,
        sender_id=sender_id or b"",
        recipient_id=recipient_id or b"",
        master_secret=secret or b"",
        master_secret_file=secret_file,
        id_context=id_context,
        master_salt=master_salt,
        algorithm=algorithm,
        hkdf=hkdf,
        replay_window=replay_window,
    )


def parse_oscore(r: Reader) -> OscoreConfig:
    """The ``oscore`` block -> ``OscoreConfig``; every problem goes to ``r`` with its path.

    Calls ``r.finish()`` itself (wiring it through ``Reader.object`` is fine too: nothing is reported twice).
    """
    require = r.boolean("require", False)
    state_dir = r.string("state_dir", "")
    if state_dir:
        from microenvoy.config.loader import resolve_path

        state_dir = resolve_path(state_dir)
        if not os.path.isdir(state_dir):
            r.error(f"not a directory: {state_dir}", "state_dir")
    elif r.raw.get("state_dir") == "":
        r.error("must not be empty (omit it instead)", "state_dir")
    contexts = r.objects("contexts", parse_oscore_context, required=True, non_empty=True)
    seen_names: dict[str, int] = {}
    seen_ids: dict[tuple[bytes, bytes | None], int] = {}
    for i, c in enumerate(contexts):
        where = f"contexts[{i}]"
        if c.name:
            if c.name in seen_names:
                r.error(f"name {c.name!r} is also used by contexts[{seen_names[c.name]}]", f"{where}.name")
            seen_names.setdefault(c.name, i)
        ident = (c.recipient_id, c.id_context)
        if ident in seen_ids:
            ctx = "no id_context" if c.id_context is None else f"id_context {c.id_context.hex()!r}"
            rid = c.recipient_id.hex()
            other = seen_ids[ident]
            r.error(
                f"recipient_id {rid!r} with {ctx} is also used by contexts[{other}]", f"{where}.recipient_id"
            )
        seen_ids.setdefault(ident, i)
    r.finish()
    return OscoreConfig(contexts=contexts, require=require, state_dir=state_dir)
