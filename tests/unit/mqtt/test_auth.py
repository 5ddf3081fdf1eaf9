"""MQTT authentication and authorization (microenvoy.mqtt.auth) and the mqtt_passwd tool."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microenvoy.config.mqtt_auth import MqttAclRule, MqttAuth
from microenvoy.core.errors import ConfigError
from microenvoy.mqtt import auth
from microenvoy.mqtt.auth import (
    ANONYMOUS,
    Acl,
    AclRule,
    Authenticator,
    AuthFailure,
    CertificateInfo,
    PasswordFile,
    PasswordHash,
    Principal,
    certificate_info,
    check_acl_topic,
    connack_refusal,
    filter_covers,
    filters_overlap,
    hash_password,
    load_authenticator,
    parse_acl_file,
    parse_password_file,
    publish_denial,
    subscribe_denied_code,
    topic_matches,
    verify_password,
)
from microenvoy.tools import mqtt_passwd

# Written by mosquitto_passwd 2.0.11 (password "secret" / "x"): $7$ is PBKDF2-SHA512, $6$ one SHA-512.
MOSQ_7 = (
    "$7$101$tALldRa6JWerVoR3$"
    "EAgqtFc3SDVzn5lXNdFoxCvg42q0mtU1jnpFeBx3OswgKwiIgLiaq7CgnMeR4G1szyEusVUHmhymgRGq332Yxg=="
)
MOSQ_6 = (
    "$6$VBIdy4C/66TZcOOv$"
    "mYjszfxpi9uf/+s8++/tEhWEiAdfupaWtKF6CCBmARZaZuDkdzINGd//jSun1GXEQo1o1r6trhCH/LaVoZmYgQ=="
)

# Cheap parameters keep the suite fast; the defaults are exercised once.
FAST = {"scheme": "scrypt", "n": 16, "r": 1, "p": 1}
FAST_PBKDF2 = {"scheme": "pbkdf2-sha256", "iterations": 10}


# ============================================================================================= hashing
def test_default_hash_is_scrypt_and_verifies() -> None:
    encoded = hash_password("secret")
    assert encoded.startswith("$scrypt$n=16384,r=8,p=1$")
    assert verify_password(encoded, "secret")
    assert not verify_password(encoded, "Secret")


@pytest.mark.parametrize("kw", [FAST, FAST_PBKDF2])
def test_hash_round_trip_and_salt(kw: Any) -> None:
    a, b = hash_password(b"pw\x00\xff", **kw), hash_password(b"pw\x00\xff", **kw)
    assert a != b  # fresh salt each time
    assert verify_password(a, b"pw\x00\xff")
    assert verify_password(b, b"pw\x00\xff")
    assert not verify_password(a, b"pw\x00\xfe")
    assert PasswordHash.decode(a).encode() == a


def test_known_vectors() -> None:
    salt = b"0123456789abcdef"
    enc = hash_password("pw", scheme="pbkdf2-sha256", iterations=1000, salt=salt)
    import hashlib

    expected = hashlib.pbkdf2_hmac("sha256", b"pw", salt, 1000, 32)
    assert PasswordHash.decode(enc).digest == expected
    enc = hash_password("pw", scheme="scrypt", n=16, r=1, p=1, salt=salt)
    assert PasswordHash.decode(enc).digest == hashlib.scrypt(b"pw", salt=salt, n=16, r=1, p=1, dklen=32)


def test_mosquitto_hashes_verify() -> None:
    assert verify_password(MOSQ_7, "secret")
    assert not verify_password(MOSQ_7, "secreT")
    assert verify_password(MOSQ_6, "x")
    assert not verify_password(MOSQ_6, "y")
    assert PasswordHash.decode(MOSQ_7).encode() == MOSQ_7
    assert PasswordHash.decode(MOSQ_6).encode() == MOSQ_6


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("secret", "plain-text"),
        ("$md5$abc$def", "unknown hash scheme"),
        ("$scrypt$n=16,r=1$c2FsdA$aGFzaA", "parameters must be"),
        ("$scrypt$n=15,r=1,p=1$c2FsdA$aGFzaA", "power of 2"),
        ("$scrypt$n=1048576,r=64,p=1$c2FsdA$aGFzaA", "256 MiB"),
        ("$scrypt$n=16,r=1,p=1$c2FsdA", "wrong number of fields"),
        ("$pbkdf2-sha256$i=0$c2FsdA$aGFzaA", "iterations"),
        ("$pbkdf2-sha256$i=x$c2FsdA$aGFzaA", "parameters must be"),
        ("$pbkdf2-sha256$i=10$***$aGFzaA", "base64"),
        ("$pbkdf2-sha256$i=10$$aGFzaA", "empty salt"),
        ("$7$x$c2FsdA$aGFzaA", "iterations"),
    ],
)
def test_malformed_hashes(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        PasswordHash.decode(text)


def test_hash_password_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="unknown scheme"):
        hash_password("x", scheme="md5")
    with pytest.raises(ValueError, match="power of 2"):
        hash_password("x", scheme="scrypt", n=1000)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_decode_never_crashes(text: str) -> None:
    try:
        PasswordHash.decode(text)
    except ValueError:
        pass


# ======================================================================================= password file
def _file(*users: tuple[str, str]) -> str:
    return "".join(f"{u}:{hash_password(p, **FAST)}\n" for u, p in users)


def test_password_file_parse_and_verify() -> None:
    text = "# users\n\n" + _file(("alice", "a-pw"), ("bob", "b-pw")) + f"mosq:{MOSQ_7}\n"
    pf = parse_password_file(text, "/etc/mqtt.passwd")
    assert len(pf) == 3
    assert "alice" in pf
    assert "carol" not in pf
    assert pf.verify("alice", b"a-pw")
    assert pf.verify("mosq", b"secret")
    assert not pf.verify("alice", b"b-pw")
    assert not pf.verify("carol", b"a-pw")
    assert repr(pf) == "<PasswordFile /etc/mqtt.passwd users=3>"


def test_password_file_errors_name_file_and_line() -> None:
    good = hash_password("x", **FAST)
    text = f"alice:{good}\nnocolon\n:{good}\nalice:{good}\nbob:$md5$x$y\ncarol:plain\n"
    errors: list[str] = []
    pf = parse_password_file(text, "pw.txt", errors)
    assert errors == [
        "pw.txt:2: expected username:hash",
        "pw.txt:3: empty username",
        "pw.txt:4: duplicate user 'alice'",
        "pw.txt:5: user 'bob': unknown hash scheme 'md5' (expected scrypt or pbkdf2-sha256)",
        "pw.txt:6: user 'carol': not a password hash (expected $scheme$...; plain-text passwords are not "
        "accepted)",
    ]
    assert list(pf.entries) == ["alice"]
    with pytest.raises(ConfigError) as info:
        parse_password_file(text, "pw.txt")
    assert len(info.value.errors) == 5


def test_unknown_user_costs_one_hash_with_the_files_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """'No such user' and 'wrong password' do the same work: one derivation with the same scheme/params."""
    pf = parse_password_file(_file(("alice", "pw"), ("bob", "pw")) + f"old:{MOSQ_6}\n")
    calls: list[tuple[str, tuple[int, ...], int]] = []
    real = PasswordHash.derive

    def spy(self: PasswordHash, password: bytes) -> bytes:
        calls.append((self.scheme, self.params, len(self.digest)))
        return real(self, password)

    monkeypatch.setattr(PasswordHash, "derive", spy)
    assert not pf.verify("alice", b"wrong")
    assert not pf.verify("nobody", b"wrong")
    assert len(calls) == 2
    assert calls[0] == calls[1] == ("scrypt", (16, 1, 1), 32)
    calls.clear()
    empty = PasswordFile({})
    assert not empty.verify("x", b"y")
    assert calls == [("scrypt", (16384, 8, 1), 32)]


# ============================================================================================== topics
def test_topic_matches() -> None:
    assert topic_matches("a/+/c", "a/b/c")
    assert not topic_matches("a/+/c", "a/b/d")
    assert topic_matches("a/#", "a")
    assert topic_matches("a/#", "a/b/c")
    assert topic_matches("#", "a")
    assert not topic_matches("#", "$SYS/x")
    assert not topic_matches("+/x", "$SYS/x")
    assert topic_matches("$SYS/#", "$SYS/x")
    assert topic_matches("a//b", "a//b")
    assert topic_matches("a/+/b", "a//b")
    assert not topic_matches("a/b", "a/b/c")
    assert not topic_matches("a/b/c", "a/b")


def test_covers_examples() -> None:
    assert filter_covers("a/#", "a/+/b")
    assert filter_covers("a/#", "a")
    assert filter_covers("#", "a/#")
    assert not filter_covers("+/b", "#")
    assert not filter_covers("a/+", "a/#")
    assert not filter_covers("a/b", "a/+")
    assert not filter_covers("#", "$SYS/#")
    assert filter_covers("$SYS/#", "$SYS/+")
    assert not filter_covers("a/b/#", "a")


_LEVELS = ["a", "b", "$s", "+", "#", ""]


@st.composite
def _filters(draw: st.DrawFn) -> str:
    n = draw(st.integers(1, 3))
    levels = [draw(st.sampled_from(_LEVELS)) for _ in range(n)]
    if "#" in levels[:-1]:
        levels = levels[: levels.index("#") + 1]
    levels = [lv if lv != "$s" or i == 0 else "a" for i, lv in enumerate(levels)]
    return "/".join(levels)


# Every topic up to 4 levels over the filters' literals plus one they never use: exact ground truth for
# filters of at most 3 levels.
_TOPICS = [
    "/".join(t)
    for n in range(1, 5)
    for t in itertools.product(["a", "b", "$s", "z", ""], repeat=n)
    if all(not x.startswith("$") for x in t[1:])
]


@settings(max_examples=400, deadline=None)
@given(_filters(), _filters())
def test_covers_and_overlap_agree_with_enumeration(p: str, f: str) -> None:
    matched_f = [t for t in _TOPICS if topic_matches(f, t)]
    assert filter_covers(p, f) == all(topic_matches(p, t) for t in matched_f)
    assert filters_overlap(p, f) == any(topic_matches(p, t) for t in matched_f)
    assert filters_overlap(p, f) == filters_overlap(f, p)


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("", "must not be empty"),
        ("a/#/b", "'#' must be a whole level and the last one"),
        ("a/b#", "'#' must be a whole level"),
        ("a/b+", "'+' must be a whole level"),
        ("a/%x", "unknown placeholder '%x'"),
        ("a/%", "unknown placeholder '%'"),
        ("a\0", "NUL"),
    ],
)
def test_check_acl_topic(topic: str, problem: str) -> None:
    result = check_acl_topic(topic, substitute=True)
    assert result is not None
    assert problem in result


def test_check_acl_topic_accepts() -> None:
    for t in ("#", "+", "a/+/%c/#", "dev-%c-%u/x", "$SYS/#"):
        assert check_acl_topic(t, substitute=True) is None
    assert check_acl_topic("100%/x", substitute=False) is None


# ================================================================================================ ACLs
ALICE = Principal("alice", "password")
BOB = Principal("bob", "password")


def acl(*rules: tuple[str, str], who: str = "*") -> Acl:
    rs = [AclRule(a, t) for a, t in rules]
    if who == "*":
        return Acl(everyone=rs)
    if who == "anonymous":
        return Acl(anonymous=rs)
    return Acl(users={who: rs})


def test_no_acl_allows_everything() -> None:
    c = Acl.allow_all().bind(ANONYMOUS, "c1")
    assert c.can_publish("x")
    assert c.can_subscribe("#")
    assert c.can_read("$SYS/x")
    assert not c.delivery_check_needed("#")
    assert repr(c) == "<ClientAcl allow-all>"


def test_default_deny_and_access_kinds() -> None:
    a = acl(("read", "r/#"), ("write", "w/#"), ("readwrite", "rw/#"))
    c = a.bind(ALICE, "c1")
    assert c.can_subscribe("r/x")
    assert not c.can_publish("r/x")
    assert c.can_publish("w/x")
    assert not c.can_subscribe("w/x")
    assert not c.can_read("w/x")
    assert c.can_publish("rw/x")
    assert c.can_subscribe("rw/#")
    assert c.can_read("rw/x")
    assert not c.can_publish("other")
    assert not c.can_subscribe("other")
    assert repr(c) == "<ClientAcl read=2 write=2 deny=0>"


@pytest.mark.parametrize("order", [0, 1])
def test_deny_wins_regardless_of_order(order: int) -> None:
    rules = [("readwrite", "a/#"), ("deny", "a/secret/#")]
    c = acl(*(rules if order == 0 else rules[::-1])).bind(ALICE, "c1")
    assert c.can_publish("a/x")
    assert not c.can_publish("a/secret/x")
    assert not c.can_read("a/secret")
    assert not c.can_subscribe("a/secret/+")
    assert not c.can_subscribe("a/secret/#")
    # an overlapping (not covering) deny cannot refuse the subscription: deliveries are checked instead
    assert c.can_subscribe("a/#")
    assert c.delivery_check_needed("a/#")
    assert c.can_subscribe("a/public/#")
    assert not c.delivery_check_needed("a/public/#")


def test_wildcard_subscription_needs_a_pattern_as_wide() -> None:
    c = acl(("read", "devices/+/telemetry"), ("read", "logs/#")).bind(ALICE, "c1")
    assert c.can_subscribe("devices/d1/telemetry")
    assert c.can_subscribe("devices/+/telemetry")
    assert not c.can_subscribe("devices/#")
    assert not c.can_subscribe("devices/+/+")
    assert not c.can_subscribe("#")
    assert c.can_subscribe("logs/#")
    assert c.can_subscribe("logs/+/x")
    assert c.can_subscribe("logs")
    assert not c.can_subscribe("+/+/telemetry")


def test_shared_subscriptions_are_checked_by_their_filter() -> None:
    c = acl(("read", "jobs/#")).bind(ALICE, "c1")
    assert c.can_subscribe("$share/workers/jobs/+")
    assert not c.can_subscribe("$share/workers/other/#")
    assert not c.can_subscribe("$share/workers")
    assert not c.can_subscribe("$share//jobs/x")


def test_invalid_topics_are_refused() -> None:
    c = acl(("readwrite", "#")).bind(ALICE, "c1")
    assert not c.can_publish("a/+")
    assert not c.can_publish("")
    assert not c.can_read("a/#")
    assert not c.can_subscribe("a/#/b")
    assert not c.can_subscribe("")
    assert c.can_publish("a")
    assert not c.can_publish("$SYS/x")


def test_rules_by_principal() -> None:
    a = Acl(
        everyone=[AclRule("read", "public/#")],
        anonymous=[AclRule("write", "anon/#")],
        users={"alice": [AclRule("readwrite", "alice/#")]},
    )
    assert a.can_publish(ALICE, "c", "alice/x")
    assert not a.can_publish(BOB, "c", "alice/x")
    assert a.can_subscribe(BOB, "c", "public/#")
    assert a.can_subscribe(ANONYMOUS, "c", "public/#")
    assert a.can_publish(ANONYMOUS, "c", "anon/x")
    assert not a.can_publish(ALICE, "c", "anon/x")
    assert a.can_read(ALICE, "c", "public/x")
    assert not a.can_read(ANONYMOUS, "c", "alice/x")
    assert repr(a) == "<Acl everyone=1 anonymous=1 users=1>"


def test_substitution() -> None:
    a = acl(("readwrite", "devices/%c/#"), ("read", "users/%u/inbox"), ("write", "dev-%c-%u/up"))
    c = a.bind(ALICE, "dev1")
    assert c.can_publish("devices/dev1/x")
    assert not c.can_publish("devices/dev2/x")
    assert c.can_subscribe("users/alice/inbox")
    assert not c.can_subscribe("users/bob/inbox")
    assert c.can_publish("dev-dev1-alice/up")
    # topic lines of a mosquitto ACL file are literal
    lit = Acl(everyone=[AclRule("readwrite", "x/%c", substitute=False)]).bind(ALICE, "dev1")
    assert lit.can_publish("x/%c")
    assert not lit.can_publish("x/dev1")


@pytest.mark.parametrize("client_id", ["+", "#", "a/b", "", "$SYS", "a+b", "x#", "a\0b"])
def test_unsafe_client_id_does_not_widen_allow_rules(client_id: str) -> None:
    c = acl(("readwrite", "devices/%c/#"), ("readwrite", "%c/#")).bind(ALICE, client_id)
    for topic in ("devices/other/x", "devices/a/b/x", "devices/+/x", "$SYS/x", "other/x", "a/b"):
        assert not c.can_publish(topic), topic
    for f in ("devices/#", "devices/+/#", "#", "$SYS/#", "a/b/#"):
        assert not c.can_subscribe(f), f


@pytest.mark.parametrize("username", ["+", "#", "a/b"])
def test_unsafe_username_does_not_widen_allow_rules(username: str) -> None:
    c = acl(("readwrite", "users/%u/#")).bind(Principal(username, "password"), "c1")
    assert not c.can_publish("users/other/x")
    assert not c.can_subscribe("users/#")


def test_anonymous_has_no_username_to_substitute() -> None:
    c = acl(("readwrite", "users/%u/#"), ("readwrite", "devices/%c/#")).bind(ANONYMOUS, "c1")
    assert not c.can_publish("users//x")
    assert not c.can_subscribe("users/+/#")
    assert c.can_publish("devices/c1/x")


@pytest.mark.parametrize(
    ("client_id", "denied", "allowed"),
    [
        ("+", ["devices/anything/config"], ["devices/x/other"]),
        ("", ["devices/anything/config"], ["devices/x/other"]),
        ("a/b", ["devices/q/anything", "devices/a/b/config"], ["other/x"]),
        ("$SYS", ["devices/$SYS/config"], ["devices/x/other"]),
    ],
)
def test_unsafe_values_make_deny_rules_wider(client_id: str, denied: list[str], allowed: list[str]) -> None:
    c = acl(("readwrite", "#"), ("deny", "devices/%c/config")).bind(ALICE, client_id)
    for t in denied:
        assert not c.can_publish(t), t
    for t in allowed:
        assert c.can_publish(t), t


def test_deny_with_literal_client_id() -> None:
    c = acl(("readwrite", "#"), ("deny", "devices/%c/config")).bind(ALICE, "d1")
    assert not c.can_publish("devices/d1/config")
    assert c.can_publish("devices/d2/config")
    assert c.delivery_check_needed("devices/+/config")
    assert not c.delivery_check_needed("devices/d2/+")


def test_acl_from_config() -> None:
    rules = (
        MqttAclRule("readwrite", "devices/%c/#"),
        MqttAclRule("read", "public/#", anonymous=True),
        MqttAclRule("readwrite", "#", principals=("admin",)),
        MqttAclRule("deny", "admin/#"),
    )
    file_rules = parse_acl_file("topic read anon-file/#\nuser bob\ntopic write bob/%c\npattern read p/%u\n")
    a = Acl.from_config(rules, file_rules)
    admin = Principal("admin", "password")
    assert a.can_publish(admin, "c", "anything")
    assert not a.can_publish(admin, "c", "admin/x")
    assert a.can_subscribe(ANONYMOUS, "c", "public/#")
    assert not a.can_subscribe(BOB, "c", "public/#")
    assert a.can_subscribe(ANONYMOUS, "c", "anon-file/x")
    assert not a.can_subscribe(ALICE, "c", "anon-file/x")
    assert a.can_publish(BOB, "c", "bob/%c")
    assert not a.can_publish(BOB, "c", "bob/c")
    assert a.can_read(BOB, "c", "p/bob")
    assert a.can_publish(ALICE, "d7", "devices/d7/up")


# ============================================================================================ ACL file
def test_acl_file_sections() -> None:
    rules = parse_acl_file(
        "# anonymous\ntopic read public/#\ntopic status\n\nuser alice\ntopic readwrite alice/#\n"
        "pattern write devices/%c/up\nuser bob smith\ntopic deny secret/#\n"
    )
    assert rules.anonymous == (AclRule("read", "public/#", False), AclRule("readwrite", "status", False))
    assert rules.users == {
        "alice": (AclRule("readwrite", "alice/#", False),),
        "bob smith": (AclRule("deny", "secret/#", False),),
    }
    assert rules.everyone == (AclRule("write", "devices/%c/up", True),)


def test_acl_file_errors_name_file_and_line() -> None:
    errors: list[str] = []
    parse_acl_file("user\ntopic\nfoo bar\ntopic read a/#/b\npattern read x/%q\ntopic ok/x\n", "acl", errors)
    assert errors == [
        "acl:1: 'user' needs a name",
        "acl:2: 'topic' needs a topic",
        "acl:3: unknown keyword 'foo' (expected user, topic or pattern)",
        "acl:4: topic 'a/#/b': '#' must be a whole level and the last one (level 2: '#')",
        "acl:5: topic 'x/%q': unknown placeholder '%q' (only %c and %u)",
    ]
    with pytest.raises(ConfigError):
        parse_acl_file("nonsense\n", "acl")


# ======================================================================================== principals
def _auth(**kw: Any) -> Authenticator:
    pf = parse_password_file(_file(("alice", "a-pw")))
    return Authenticator(passwords=pf, **kw)


def test_authenticate_with_password() -> None:
    a = _auth()
    r = a.authenticate("alice", b"a-pw")
    assert r.ok
    assert r.principal == Principal("alice", "password")
    assert r.failure is None
    for user, pw in (("alice", b"bad"), ("nobody", b"a-pw"), ("alice", None), (None, b"a-pw")):
        r = a.authenticate(user, pw)
        assert not r.ok, (user, pw)
        assert r.failure is AuthFailure.BAD_CREDENTIALS, (user, pw)
    assert a.authenticate(None, None).failure is AuthFailure.NOT_AUTHORIZED


def test_anonymous() -> None:
    a = _auth(allow_anonymous=True)
    r = a.authenticate(None, None)
    assert r.principal is ANONYMOUS
    assert r.principal.anonymous
    assert str(r.principal) == ""
    assert a.authenticate("alice", b"bad").failure is AuthFailure.BAD_CREDENTIALS  # no fallback
    no_file = Authenticator(allow_anonymous=True)
    assert no_file.authenticate("mallory", b"x").principal is ANONYMOUS  # unverifiable: names nobody
    assert Authenticator().authenticate("mallory", b"x").failure is AuthFailure.NOT_AUTHORIZED


def test_certificate_principals() -> None:
    cert = CertificateInfo("client-1", ("client-1.example", "spiffe://t/device/1"))
    cn = _auth(principal_from_certificate="cn")
    assert cn.authenticate(None, None, cert).principal == Principal("client-1", "certificate")
    assert cn.authenticate("alice", b"wrong", cert).principal == Principal("client-1", "certificate")
    san = _auth(principal_from_certificate="san")
    assert san.authenticate(None, None, cert).principal == Principal("spiffe://t/device/1", "certificate")
    assert CertificateInfo(None, ("d.example",)).identity("san") == "d.example"
    assert CertificateInfo(None, ()).identity("san") is None
    # no usable identity: fall back to the password
    assert cn.authenticate("alice", b"a-pw", CertificateInfo(None, ())).principal == ALICE
    assert cn.authenticate(None, None, CertificateInfo(None, ())).failure is AuthFailure.NOT_AUTHORIZED
    # mode none: a certificate names nobody
    assert _auth().authenticate(None, None, cert).failure is AuthFailure.NOT_AUTHORIZED


def test_certificate_info_from_getpeercert() -> None:
    peercert = {
        "subject": ((("organizationName", "microenvoy tests"),), (("commonName", "client-1"),)),
        "subjectAltName": (("URI", "spiffe://t/d/1"), ("DNS", "client-1.t"), ("IP Address", "127.0.0.1")),
    }
    info = certificate_info(peercert)
    assert info == CertificateInfo("client-1", ("spiffe://t/d/1", "client-1.t"))
    assert certificate_info({}) is None
    assert certificate_info(None) is None


def test_authenticator_acl_shortcuts() -> None:
    a = Authenticator(allow_anonymous=True, acl=acl(("readwrite", "d/%c/#")))
    assert a.can_publish(ANONYMOUS, "c1", "d/c1/x")
    assert not a.can_publish(ANONYMOUS, "c1", "d/c2/x")
    assert a.can_subscribe(ANONYMOUS, "c1", "d/c1/#")
    assert a.can_read(ANONYMOUS, "c1", "d/c1/y")
    assert a.authorizer(ANONYMOUS, "c1").can_publish("d/c1/z")
    assert repr(a) == "<Authenticator users=0 anonymous=True cert=none <Acl everyone=1 anonymous=0 users=0>>"


# ================================================================================ loading from files
def test_load_authenticator(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(_file(("alice", "a-pw")))
    (tmp_path / "acl").write_text("user alice\ntopic readwrite alice/#\n")
    cfg = MqttAuth(
        password_file=str(tmp_path / "pw"),
        acl_file=str(tmp_path / "acl"),
        acl=(MqttAclRule("read", "public/#"),),
    )
    a = load_authenticator(cfg)
    p = a.authenticate("alice", b"a-pw").principal
    assert p is not None
    assert a.can_publish(p, "c", "alice/x")
    assert a.can_subscribe(p, "c", "public/#")
    assert not a.can_publish(p, "c", "public/x")
    # no ACL configured: allow all
    open_ = load_authenticator(MqttAuth(password_file=str(tmp_path / "pw")))
    assert not open_.acl.enabled
    assert open_.can_publish(p, "c", "any/thing")
    # no auth block: anonymous, no ACL
    none = load_authenticator(None)
    assert none.authenticate(None, None).principal is ANONYMOUS
    assert not none.acl.enabled


def test_load_authenticator_errors(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("alice\n")
    (tmp_path / "acl").write_text("bogus\n")
    with pytest.raises(ConfigError) as info:
        load_authenticator(MqttAuth(password_file=str(tmp_path / "pw"), acl_file=str(tmp_path / "acl")))
    assert info.value.errors == [
        f"{tmp_path / 'pw'}:1: expected username:hash",
        f"{tmp_path / 'acl'}:1: unknown keyword 'bogus' (expected user, topic or pattern)",
    ]
    with pytest.raises(ConfigError, match="cannot read"):
        load_authenticator(MqttAuth(password_file=str(tmp_path / "missing")))


# ====================================================================================== reason codes
def test_reason_codes() -> None:
    assert connack_refusal(AuthFailure.BAD_CREDENTIALS, 5) == 0x86
    assert connack_refusal(AuthFailure.NOT_AUTHORIZED, 5) == 0x87
    assert connack_refusal(AuthFailure.BAD_CREDENTIALS, 4) == 4
    assert connack_refusal(AuthFailure.NOT_AUTHORIZED, 4) == 5
    assert connack_refusal(AuthFailure.NOT_AUTHORIZED, 3) == 5
    assert publish_denial(5, 0) == auth.PublishDenial(False, 0)
    assert publish_denial(5, 1) == auth.PublishDenial(True, 0x87)
    assert publish_denial(5, 2) == auth.PublishDenial(True, 0x87)
    assert publish_denial(4, 1) == auth.PublishDenial(True, 0)
    assert publish_denial(4, 2) == auth.PublishDenial(True, 0)
    assert publish_denial(4, 0) == auth.PublishDenial(False, 0)
    assert subscribe_denied_code(5) == 0x87
    assert subscribe_denied_code(4) == 0x80


# ============================================================================================== the tool
def _entries(path: Path) -> PasswordFile:
    return parse_password_file(path.read_text(), str(path))


def test_tool_batch_create_update_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pw = tmp_path / "mqtt.passwd"
    fast = ["--scrypt-n", "16", "--scrypt-r", "1"]
    assert mqtt_passwd.main(["-b", str(pw), "alice", "x"]) == 1
    assert "use -c to create it" in capsys.readouterr().err
    assert mqtt_passwd.main(["-c", "-b", *fast, str(pw), "alice", "a1"]) == 0
    assert os.stat(pw).st_mode & 0o777 == 0o600
    with pw.open("a") as f:
        f.write("# a comment\n")
    assert (
        mqtt_passwd.main(["-b", "--scheme", "pbkdf2-sha256", "--iterations", "5", str(pw), "bob", "b1"]) == 0
    )
    assert mqtt_passwd.main(["-b", *fast, str(pw), "alice", "a2"]) == 0
    pf = _entries(pw)
    assert pf.verify("alice", b"a2")
    assert not pf.verify("alice", b"a1")
    assert pf.verify("bob", b"b1")
    assert pf.entries["bob"].scheme == "pbkdf2-sha256"
    assert pf.entries["bob"].params == (5,)
    assert "# a comment" in pw.read_text()
    assert pw.read_text().splitlines()[0].startswith("alice:")  # updated in place
    assert mqtt_passwd.main(["-D", str(pw), "alice"]) == 0
    assert list(_entries(pw).entries) == ["bob"]
    assert mqtt_passwd.main(["-D", str(pw), "alice"]) == 1
    assert "no user 'alice'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-b", "F", "a:b", "x"], "invalid username"),
        (["-b", "F", " a", "x"], "invalid username"),
        (["-c", "-b", "F", "a"], "-b needs the password"),
        (["-c", "F", "a", "x"], "needs -b"),
        (["-c", "-b", "F", "a", ""], "empty password"),
        (["-c", "-b", "--scrypt-n", "1000", "F", "a", "x"], "power of 2"),
        (["-D", "-b", "F", "a"], "cannot be combined"),
    ],
)
def test_tool_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    argv = [str(tmp_path / "pw") if a == "F" else a for a in argv]
    assert mqtt_passwd.main(argv) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "pw").exists()


def test_tool_as_module_reads_stdin(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    proc = subprocess.run(
        [sys.executable, "-m", "microenvoy.tools.mqtt_passwd", "-c", "--scrypt-n", "16", str(pw), "dev1"],
        input="s3cret\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert _entries(pw).verify("dev1", b"s3cret")


def test_update_lines() -> None:
    lines = ["# c", "a:1", "b:2", "a:3"]
    assert mqtt_passwd.update_lines(lines, "a", "a:X") == (["# c", "a:X", "b:2"], True)
    assert mqtt_passwd.update_lines(lines, "c", "c:Y") == ([*lines, "c:Y"], False)
    assert mqtt_passwd.update_lines(lines, "a", None) == (["# c", "b:2"], True)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab:$#%+/ \n\tcu=,0123456789rnpi-\x00é"), max_size=120))
def test_file_parsers_never_crash(text: str) -> None:
    """Any text: problems are reported as file:line errors, never raised as anything else."""
    errors: list[str] = []
    pf = parse_password_file(text, "pw", errors)
    rules = parse_acl_file(text, "acl", errors)
    assert all(e.startswith(("pw:", "acl:")) for e in errors)
    acl = Acl(rules.everyone, rules.anonymous, rules.users).bind(Principal("a", "password"), "c")
    acl.can_publish("a/b")
    acl.can_subscribe("a/#")
    assert len(pf) <= text.count(":")
