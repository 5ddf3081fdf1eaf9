"""The coap_proxy filter's ``oscore`` block (microenvoy.config.coap_oscore)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.config.coap_oscore import (
    AEAD_NONCE_LENGTHS,
    HKDF_HASHES,
    OscoreConfig,
    OscoreContextConfig,
    parse_oscore,
)
from microenvoy.config.dump import REDACTED, redact
from microenvoy.config.reader import Reader

P = "listeners[0].filter_chains[0].filters[0].typed_config.oscore"
SECRET = "0102030405060708090a0b0c0d0e0f10"


def parse(raw: Any) -> tuple[OscoreConfig, list[str]]:
    errors: list[str] = []
    cfg = parse_oscore(Reader(raw, P, errors))
    return cfg, errors


def ctx(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "sensor-17",
        "sender_id": "01",
        "recipient_id": "00",
        "master_secret": SECRET,
    }
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def test_minimal_context_defaults() -> None:
    cfg, errors = parse({"contexts": [ctx()]})
    assert errors == []
    assert cfg == OscoreConfig(
        contexts=(
            OscoreContextConfig(
                name="sensor-17",
                sender_id=b"\x01",
                recipient_id=b"\x00",
                master_secret=bytes.fromhex(SECRET),
            ),
        ),
    )
    c = cfg.contexts[0]
    assert (c.algorithm, c.hkdf, c.replay_window, c.id_context, c.master_salt) == (
        "AES-CCM-16-64-128",
        "SHA-256",
        32,
        None,
        b"",
    )
    assert cfg.require is False
    assert cfg.state_dir == ""


def test_full_block(tmp_path: Path) -> None:
    cfg, errors = parse(
        {
            "require": True,
            "state_dir": str(tmp_path),
            "contexts": [
                ctx(
                    id_context="37CBF3210017A2D3",
                    master_salt="9e7ca92223786340",
                    algorithm="A128GCM",
                    hkdf="SHA-512",
                    replay_window=64,
                ),
                ctx(name="other", sender_id="", recipient_id="01"),
            ],
        }
    )
    assert errors == []
    assert cfg.require is True
    assert cfg.state_dir == str(tmp_path)
    a, b = cfg.contexts
    assert a.id_context == bytes.fromhex("37cbf3210017a2d3")
    assert a.master_salt == bytes.fromhex("9e7ca92223786340")
    assert (a.algorithm, a.hkdf, a.replay_window) == ("A128GCM", "SHA-512", 64)
    assert (b.sender_id, b.recipient_id) == (b"", b"\x01")


def test_empty_id_context_means_none() -> None:
    cfg, errors = parse({"contexts": [ctx(id_context="")]})
    assert errors == []
    assert cfg.contexts[0].id_context is None


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({}, f"{P}.contexts: required field is missing"),
        ({"contexts": []}, f"{P}.contexts: must not be empty"),
        ({"contexts": [ctx(sender_id="0g")]}, f"{P}.contexts[0].sender_id: not hexadecimal"),
        ({"contexts": [ctx(recipient_id="123")]}, f"{P}.contexts[0].recipient_id: not hexadecimal"),
        ({"contexts": [ctx(recipient_id=None)]}, f"{P}.contexts[0].recipient_id: required field is missing"),
        ({"contexts": [ctx(name=None)]}, f"{P}.contexts[0].name: required field is missing"),
        ({"contexts": [ctx(name="")]}, f"{P}.contexts[0].name: must not be empty"),
        ({"contexts": [ctx(sender_id=1)]}, f"{P}.contexts[0].sender_id: expected a string, got integer"),
        ({"contexts": [ctx(master_secret="")]}, f"{P}.contexts[0].master_secret: must not be empty"),
        (
            {"contexts": [ctx(master_secret=None)]},
            f"{P}.contexts[0]: one of master_secret, master_secret_file",
        ),
        (
            {"contexts": [ctx(master_secret_file="/x")]},
            f"{P}.contexts[0]: only one of master_secret, master_secret_file may be set",
        ),
        ({"contexts": [ctx(master_salt="xyz")]}, f"{P}.contexts[0].master_salt: not hexadecimal"),
        ({"contexts": [ctx(id_context="q")]}, f"{P}.contexts[0].id_context: not hexadecimal"),
        ({"contexts": [ctx(algorithm="A128CBC")]}, f"{P}.contexts[0].algorithm: unknown value 'A128CBC'"),
        ({"contexts": [ctx(hkdf="MD5")]}, f"{P}.contexts[0].hkdf: unknown value 'MD5'"),
        ({"contexts": [ctx(replay_window=0)]}, f"{P}.contexts[0].replay_window: must be >= 1"),
        ({"contexts": [ctx(replay_window=5000)]}, f"{P}.contexts[0].replay_window: must be <= 1024"),
        (
            {"contexts": [ctx(sender_id="0102030405060708")]},
            f"{P}.contexts[0].sender_id: 8 bytes is too long",
        ),
        (
            {"contexts": [ctx(algorithm="AES-CCM-64-64-128", recipient_id="0102")]},
            f"{P}.contexts[0].recipient_id: 2 bytes is too long for AES-CCM-64-64-128 (at most 1)",
        ),
        ({"contexts": [ctx(recipient_id="01")]}, f"{P}.contexts[0].recipient_id: must differ from sender_id"),
        ({"contexts": [ctx(colour="red")]}, f"{P}.contexts[0].colour: unknown field"),
        ({"contexts": [ctx()], "extra": 1}, f"{P}.extra: unknown field"),
        ({"contexts": [ctx()], "require": "yes"}, f"{P}.require: expected true or false"),
        ({"contexts": [ctx()], "state_dir": "/nonexistent/dir"}, f"{P}.state_dir: not a directory"),
        ({"contexts": [ctx()], "state_dir": ""}, f"{P}.state_dir: must not be empty"),
        (
            {"contexts": [ctx(), ctx(name="b", sender_id="02")]},
            f"{P}.contexts[1].recipient_id: recipient_id '00' with no id_context is also used by contexts[0]",
        ),
        (
            {"contexts": [ctx(), ctx(recipient_id="02")]},
            f"{P}.contexts[1].name: name 'sensor-17' is also used by contexts[0]",
        ),
    ],
)
def test_errors_name_the_field(raw: Any, error: str) -> None:
    _, errors = parse(raw)
    assert any(e.startswith(error) for e in errors), errors


def test_same_recipient_id_with_different_id_context_is_fine() -> None:
    _, errors = parse({"contexts": [ctx(id_context="aa"), ctx(name="b", id_context="bb"), ctx(name="c")]})
    assert errors == []


def test_secret_file_hex_or_raw(tmp_path: Path) -> None:
    hexfile = tmp_path / "hex.key"
    hexfile.write_text(SECRET[:16] + "\n" + SECRET[16:] + "\n")
    raw = tmp_path / "raw.key"
    raw.write_bytes(b"\x00\xffnot-hex\n")
    cfg, errors = parse(
        {
            "contexts": [
                ctx(master_secret=None, master_secret_file=str(hexfile)),
                ctx(name="b", recipient_id="02", master_secret=None, master_secret_file=str(raw)),
            ]
        }
    )
    assert errors == []
    assert cfg.contexts[0].master_secret == bytes.fromhex(SECRET)
    assert cfg.contexts[0].master_secret_file == str(hexfile)
    assert cfg.contexts[1].master_secret == b"\x00\xffnot-hex\n"


def test_secret_file_problems(tmp_path: Path) -> None:
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"")
    _, errors = parse({"contexts": [ctx(master_secret=None, master_secret_file=str(tmp_path / "missing"))]})
    assert errors[0].startswith(f"{P}.contexts[0].master_secret_file: cannot read")
    _, errors = parse({"contexts": [ctx(master_secret=None, master_secret_file=str(empty))]})
    assert errors[0].endswith("empty")


def test_secret_never_shown() -> None:
    cfg, _ = parse({"contexts": [ctx()]})
    text = repr(cfg) + str(cfg) + repr(cfg.contexts[0])
    assert SECRET not in text
    assert repr(bytes.fromhex(SECRET)) not in text
    assert "master_secret=" not in text


def test_config_dump_redacts_secret_keys() -> None:
    doc = {"oscore": {"contexts": [ctx(), ctx(master_secret=None, master_secret_file="/etc/k")]}}
    out = redact(doc)
    contexts = out["oscore"]["contexts"]  # type: ignore[index]
    assert contexts[0]["master_secret"] == REDACTED
    assert contexts[1]["master_secret_file"] == REDACTED
    assert contexts[0]["sender_id"] == "01"


def test_algorithm_table_matches_aiocoap() -> None:
    from aiocoap import oscore  # type: ignore[import-untyped]

    aead = {name: alg for name, alg in oscore.algorithms.items() if isinstance(alg, oscore.AeadAlgorithm)}
    assert set(aead) == set(AEAD_NONCE_LENGTHS)
    for name, alg in aead.items():
        assert alg.iv_bytes == AEAD_NONCE_LENGTHS[name], name
    assert set(HKDF_HASHES.values()) <= set(oscore.hashfunctions)


@given(
    st.dictionaries(
        st.sampled_from([*sorted(ctx()), "x", "master_secret_file", "id_context"]),
        st.one_of(st.text(), st.integers()),
    )
)
def test_fuzzed_contexts_never_crash(entry: dict[str, Any]) -> None:
    _, errors = parse({"contexts": [entry]})
    assert all(e.startswith(f"{P}.contexts[0]") for e in errors)
