"""The mqtt_proxy filter's ``auth`` block (microenvoy.config.mqtt_auth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from microenvoy.config import loader
from microenvoy.config.mqtt_auth import MqttAclRule, MqttAuth, parse_mqtt_auth
from microenvoy.config.reader import Reader
from microenvoy.mqtt.auth import hash_password

P = "auth"


def parse(raw: Any) -> tuple[MqttAuth, list[str]]:
    errors: list[str] = []
    cfg = parse_mqtt_auth(Reader(raw, P, errors))
    return cfg, errors


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    pw = tmp_path / "mqtt.passwd"
    pw.write_text(f"alice:{hash_password('x', n=16, r=1)}\n")
    acl = tmp_path / "mqtt.acl"
    acl.write_text("user alice\ntopic readwrite alice/#\n")
    return {"pw": str(pw), "acl": str(acl)}


def test_full_block(files: dict[str, str]) -> None:
    cfg, errors = parse(
        {
            "password_file": files["pw"],
            "allow_anonymous": True,
            "principal_from_certificate": "san",
            "acl_file": files["acl"],
            "acl": [
                {"access": "readwrite", "topic": "devices/%c/#"},
                {"access": "read", "topic": "public/#", "anonymous": True},
                {"access": "readwrite", "topic": "#", "principals": ["admin", "ops"]},
                {"access": "deny", "topic": "admin/#"},
            ],
        }
    )
    assert errors == []
    assert cfg == MqttAuth(
        password_file=files["pw"],
        allow_anonymous=True,
        principal_from_certificate="san",
        acl=(
            MqttAclRule("readwrite", "devices/%c/#"),
            MqttAclRule("read", "public/#", anonymous=True),
            MqttAclRule("readwrite", "#", principals=("admin", "ops")),
            MqttAclRule("deny", "admin/#"),
        ),
        acl_file=files["acl"],
    )
    assert cfg.has_acl


def test_defaults(files: dict[str, str]) -> None:
    cfg, errors = parse({"password_file": files["pw"]})
    assert errors == []
    assert cfg == MqttAuth(password_file=files["pw"])
    assert not cfg.allow_anonymous
    assert cfg.principal_from_certificate == "none"
    assert not cfg.has_acl


def test_someone_must_be_able_to_connect() -> None:
    _, errors = parse({})
    assert errors == [
        "auth: no client can connect: set password_file, principal_from_certificate or allow_anonymous: true"
    ]
    assert parse({"allow_anonymous": True})[1] == []
    assert parse({"principal_from_certificate": "cn"})[1] == []


def test_field_errors_carry_paths(tmp_path: Path) -> None:
    _, errors = parse(
        {
            "password_file": str(tmp_path / "missing"),
            "allow_anonymous": "yes",
            "principal_from_certificate": "subject",
            "acl_file": "",
            "acl": [
                {"access": "all", "topic": "a"},
                {"access": "read", "topic": "a/#/b"},
                {"access": "read", "topic": "x/%h"},
                {"access": "read"},
                {"access": "read", "topic": "t", "principals": ["a"], "anonymous": True},
                {"access": "read", "topic": "t", "principals": [""]},
                {"access": "read", "topic": "t", "principals": []},
                {"access": "read", "topic": "t", "bogus": 1},
            ],
            "extra": True,
        }
    )
    assert errors == [
        f"auth.password_file: file not found: {tmp_path / 'missing'}",
        "auth.allow_anonymous: expected true or false, got string",
        "auth.principal_from_certificate: unknown value 'subject' (expected one of none, cn, san)",
        "auth.acl[0].access: unknown value 'all' (expected one of read, write, readwrite, deny)",
        "auth.acl[1].topic: '#' must be a whole level and the last one (level 2: '#')",
        "auth.acl[2].topic: unknown placeholder '%h' (only %c and %u)",
        "auth.acl[3].topic: required field is missing",
        "auth.acl[4].anonymous: set principals or anonymous: true, not both",
        "auth.acl[5].principals[0]: must not be empty",
        "auth.acl[6].principals: must not be empty (omit it for every client)",
        "auth.acl[7].bogus: unknown field",
        "auth.acl_file: must not be empty (omit it instead)",
        "auth.extra: unknown field",
    ]


def test_file_contents_are_checked_at_load(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("alice:plain\n\nbob\n")
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic read a/#/b\n")
    _, errors = parse({"password_file": str(pw), "acl_file": str(acl)})
    assert errors == [
        f"auth.password_file: {pw}:1: user 'alice': not a password hash (expected $scheme$...; plain-text "
        "passwords are not accepted)",
        f"auth.password_file: {pw}:3: expected username:hash",
        f"auth.acl_file: {acl}:2: topic 'a/#/b': '#' must be a whole level and the last one (level 2: '#')",
    ]


def test_relative_paths_resolve_against_the_config_directory(files: dict[str, str], tmp_path: Path) -> None:
    token = loader._base_dir.set(str(tmp_path))
    try:
        cfg, errors = parse({"password_file": "mqtt.passwd", "acl_file": "mqtt.acl"})
    finally:
        loader._base_dir.reset(token)
    assert errors == []
    assert cfg.password_file == files["pw"]
    assert cfg.acl_file == files["acl"]


def test_through_reader_object_reports_once(files: dict[str, str]) -> None:
    errors: list[str] = []
    r = Reader({"auth": {"password_file": files["pw"], "nope": 1}}, "f", errors)
    cfg = r.object("auth", parse_mqtt_auth)
    assert cfg is not None
    assert cfg.password_file == files["pw"]
    assert errors == ["f.auth.nope: unknown field"]
