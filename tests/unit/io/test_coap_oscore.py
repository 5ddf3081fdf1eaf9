"""OSCORE server side (microenvoy.io.coap_oscore) against aiocoap's own client-side security context.

The client is aiocoap's ``FilesystemSecurityContext`` (its persisted context class, independent of our
in-memory one), so every request and response here is real RFC 8613 crypto in both directions; the RFC's
Appendix C vectors pin the derivation and the byte-exact wire format.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiocoap  # type: ignore[import-untyped]
import pytest
from aiocoap import oscore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microenvoy.codecs.coap.message import ACK, CON, NON, Message, Opt, decode, encode
from microenvoy.config.coap_oscore import OscoreConfig, OscoreContextConfig
from microenvoy.io.coap_oscore import OscoreError, OscoreRequest, OscoreServer, OscoreStateError

SECRET = bytes.fromhex("0102030405060708090a0b0c0d0e0f10")
SALT = bytes.fromhex("9e7ca92223786340")
C4_REQUEST = bytes.fromhex("44025d1f00003974396c6f63616c686f7374620914ff612f1092f1776f1c1668b3825e")
C7_RESPONSE = bytes.fromhex("64445d1f0000397490ffdbaad1e9a7e7b2a813d3c31524378303cdafae119106")
C8_RESPONSE = bytes.fromhex("64445d1f00003974920100ff4d4c13669384b67354b2b6175ff4b8658c666a6cf88e")

GET, POST, CONTENT, CHANGED, UNAUTHORIZED = 1, 2, 0x45, 0x44, 0x81


def device(name: str = "sensor-17", *, sid: str = "01", rid: str = "", salt: bytes = SALT, **kw: Any) -> Any:
    return OscoreContextConfig(
        name=name,
        sender_id=bytes.fromhex(sid),
        recipient_id=bytes.fromhex(rid),
        master_secret=kw.pop("secret", SECRET),
        master_salt=salt,
        **kw,
    )


class Client:
    """aiocoap's client-side context with the keys matching ``device()`` (roles swapped)."""

    def __init__(self, basedir: Path, *, sid: str = "", rid: str = "01", salt: bytes = SALT, **extra: Any):
        basedir.mkdir(parents=True, exist_ok=True)
        settings = {"sender-id_hex": sid, "recipient-id_hex": rid, "secret_hex": SECRET.hex(), **extra}
        if salt:
            settings["salt_hex"] = salt.hex()
        (basedir / "settings.json").write_text(json.dumps(settings))
        self.ctx = oscore.FilesystemSecurityContext(str(basedir))

    def request(
        self, code: int = GET, path: str = "temp", *, mid: int = 0x1234, **opts: Any
    ) -> tuple[bytes, Any]:
        msg = aiocoap.Message(code=code, uri_path=tuple(p for p in path.split("/") if p), **opts)
        outer, request_id = self.ctx.protect(msg)
        outer.mtype, outer.mid, outer.token = aiocoap.CON, mid, b"\x07\x08"
        return outer.encode(), request_id

    def response(self, wire: bytes, request_id: Any) -> Any:
        inner, _ = self.ctx.unprotect(aiocoap.Message.decode(wire), request_id)
        return inner

    def close(self) -> None:
        self.ctx._destroy()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    c = Client(tmp_path / "client")
    yield c
    c.close()


@pytest.fixture
def server(tmp_path: Path) -> OscoreServer:
    """A server whose context was never used (state_dir without a state file): the window starts empty."""
    state = tmp_path / "state"
    state.mkdir()
    return OscoreServer(OscoreConfig(contexts=(device(),), state_dir=str(state)))


def ack(msg: Message) -> Message:
    return dataclasses.replace(msg, mtype=ACK)


# ---------------------------------------------------------------------------------------- RFC 8613 vectors


def _ctx(server: OscoreServer) -> Any:
    (ctx,) = server._by_id.values()
    return ctx


@pytest.mark.parametrize(
    ("sid", "rid", "salt", "sender_key", "recipient_key", "common_iv"),
    [
        # C.1.2 (server side of C.1): with Master Salt
        ("01", "", SALT, "ffb14e093c94c9cac9471648b4f98710", "f0910ed7295e6ad4b54fc793154302ff",
         "4622d4dd6d944168eefb54987c"),
        # C.2.2: without Master Salt
        ("01", "00", b"", "e57b5635815177cd679ab4bcec9d7dda", "321b26943253c7ffb6003b0b64d74041",
         "be35ae297d2dace910c52e99f9"),
    ],
)  # fmt: skip
def test_key_derivation_matches_rfc8613_appendix_c(
    sid: str, rid: str, salt: bytes, sender_key: str, recipient_key: str, common_iv: str
) -> None:
    ctx = _ctx(OscoreServer(OscoreConfig(contexts=(device(sid=sid, rid=rid, salt=salt),))))
    assert ctx.sender_key.hex() == sender_key
    assert ctx.recipient_key.hex() == recipient_key
    assert ctx.common_iv.hex() == common_iv


def test_rfc8613_c4_request_and_c7_response_byte_exact(server: OscoreServer) -> None:
    req = server.unprotect(decode(C4_REQUEST))
    assert req.principal == "sensor-17"
    assert req.kid == b""
    inner = req.inner
    assert (inner.mtype, inner.code, inner.mid, inner.token) == (CON, GET, 0x5D1F, bytes.fromhex("00003974"))
    # Uri-Host stays outer (Class U) and is carried into the inner request; Uri-Path was encrypted.
    assert inner.options == ((Opt.URI_HOST, b"localhost"), (Opt.URI_PATH, b"tv1"))
    out = server.protect(req, Message(ACK, CONTENT, payload=b"Hello World!"))
    assert encode(ack(out)) == C7_RESPONSE


def test_rfc8613_c8_response_with_partial_iv(server: OscoreServer) -> None:
    req = server.unprotect(decode(C4_REQUEST))
    out = server.protect(req, Message(ACK, CONTENT, payload=b"Hello World!"), observe=True)
    assert encode(ack(out)) == C8_RESPONSE  # the agent's own sequence number 0 as Partial IV


# ---------------------------------------------------------------------------------------- round trips


def test_request_and_response_round_trip_with_aiocoap_client(server: OscoreServer, client: Client) -> None:
    wire, request_id = client.request(POST, "/sensors/t1", payload=b"21.5", content_format=50, uri_host="gw")
    msg = decode(wire)
    assert server.is_protected(msg)
    assert msg.code == POST
    assert msg.opt(Opt.URI_PATH) is None
    req = server.unprotect(msg)
    assert isinstance(req, OscoreRequest)
    assert "sensor-17" in repr(req)
    inner = req.inner
    assert (inner.code, inner.mid, inner.token, inner.mtype) == (POST, 0x1234, b"\x07\x08", CON)
    assert inner.opts(Opt.URI_PATH) == [b"sensors", b"t1"]
    assert inner.opt(Opt.URI_HOST) == b"gw"
    assert inner.uint(Opt.CONTENT_FORMAT) == 50
    assert inner.payload == b"21.5"
    assert not inner.has(Opt.OSCORE)

    response = Message(
        ACK, CHANGED, options=((Opt.CONTENT_FORMAT, b""), (Opt.MAX_AGE, b"\x3c")), payload=b"ok"
    )
    out = server.protect(req, response)
    assert (out.code, out.token, out.opt(Opt.OSCORE)) == (CHANGED, b"\x07\x08", b"")  # nonce reused
    assert b"ok" not in out.payload
    got = client.response(encode(ack(out)), request_id)
    assert (int(got.code), got.payload, got.opt.content_format, got.opt.max_age) == (CHANGED, b"ok", 0, 60)


def test_fetch_request_gets_2_05_outer_code(server: OscoreServer, client: Client) -> None:
    wire, request_id = client.request(GET, "obs", observe=0)  # an observation goes out as FETCH
    msg = decode(wire)
    assert msg.code == 5
    assert msg.uint(Opt.OBSERVE) == 0
    req = server.unprotect(msg)
    assert req.inner.code == GET
    assert req.inner.uint(Opt.OBSERVE) == 0
    out = server.protect(
        req, Message(ACK, CONTENT, options=((Opt.OBSERVE, b"\x01"),), payload=b"1"), observe=True
    )
    assert out.code == CONTENT
    first = client.response(encode(ack(out)), request_id)
    out2 = server.protect(
        req, Message(ACK, CONTENT, options=((Opt.OBSERVE, b"\x02"),), payload=b"2"), observe=True
    )
    second = client.response(encode(ack(out2)), request_id)
    # Each notification has its own Partial IV; the client orders them by it (RFC 8613 §4.1.3.5.2).
    assert out.opt(Opt.OSCORE) != out2.opt(Opt.OSCORE)
    assert out.uint(Opt.OBSERVE) is not None
    assert out2.uint(Opt.OBSERVE) == out.uint(Opt.OBSERVE) + 1
    assert (first.payload, second.payload) == (b"1", b"2")
    assert second.opt.observe > first.opt.observe


def test_second_response_to_one_request_uses_a_fresh_partial_iv(server: OscoreServer, client: Client) -> None:
    wire, request_id = client.request()
    req = server.unprotect(decode(wire))
    a = server.protect(req, Message(ACK, CONTENT, payload=b"a"))
    b = server.protect(req, Message(ACK, CONTENT, payload=b"b"))
    assert a.opt(Opt.OSCORE) == b""
    assert b.opt(Opt.OSCORE) not in (b"", None)
    assert client.response(encode(ack(b)), request_id).payload == b"b"


# ---------------------------------------------------------------------------------------- failures


def _fails(server: OscoreServer, wire: bytes | Message) -> OscoreError:
    with pytest.raises(OscoreError) as info:
        server.unprotect(wire if isinstance(wire, Message) else decode(wire))
    return info.value


def test_replayed_request_is_refused(server: OscoreServer, client: Client) -> None:
    wire, _ = client.request()
    server.unprotect(decode(wire))
    err = _fails(server, wire)
    assert (err.code, err.stat, err.payload, err.protected) == (
        UNAUTHORIZED,
        "oscore_replay",
        b"Replay detected",
        False,
    )
    assert err.options == [(Opt.MAX_AGE, b"")]  # Max-Age 0: not cacheable
    reply = err.to_message(decode(wire))
    assert (reply.mtype, reply.mid, reply.token, reply.code) == (ACK, 0x1234, b"\x07\x08", UNAUTHORIZED)
    assert not reply.has(Opt.OSCORE)


def test_old_sequence_number_outside_the_window_is_refused(server: OscoreServer, client: Client) -> None:
    old, _ = client.request(mid=1)
    for i in range(40):  # window 32
        server.unprotect(decode(client.request(mid=2 + i)[0]))
    assert _fails(server, old).stat == "oscore_replay"


def test_tampered_ciphertext_fails_decryption(server: OscoreServer, client: Client) -> None:
    wire, _ = client.request(POST, payload=b"x")
    msg = decode(wire)
    bad = dataclasses.replace(msg, payload=bytes([msg.payload[0] ^ 1]) + msg.payload[1:])
    err = _fails(server, bad)
    assert (err.code, err.stat, err.payload) == (0x80, "oscore_decrypt_failed", b"Decryption failed")
    # The tampered message did not use up the sequence number: the genuine one still passes.
    assert server.unprotect(msg).inner.payload == b"x"


def test_tampered_class_i_data_fails_decryption(server: OscoreServer, client: Client) -> None:
    """The Partial IV is authenticated (external AAD): changing it breaks the tag."""
    wire, _ = client.request()
    msg = decode(wire)
    option = msg.opt(Opt.OSCORE)
    assert option is not None
    forged = option[:1] + bytes([option[1] ^ 0x40]) + option[2:]
    assert _fails(
        server, msg.with_options([(n, forged if n == Opt.OSCORE else v) for n, v in msg.options])
    ).stat == ("oscore_decrypt_failed")


def test_unknown_kid_or_kid_context(tmp_path: Path, server: OscoreServer) -> None:
    stranger = Client(tmp_path / "stranger", sid="05")
    try:
        err = _fails(server, stranger.request()[0])
    finally:
        stranger.close()
    assert (err.code, err.stat, err.payload) == (
        UNAUTHORIZED,
        "oscore_unknown_context",
        b"Security context not found",
    )
    with_ctx = Client(tmp_path / "ctx", **{"id-context_hex": "37cbf321"})
    try:
        assert _fails(server, with_ctx.request()[0]).stat == "oscore_unknown_context"
    finally:
        with_ctx.close()


def test_outer_method_must_be_post_or_fetch(server: OscoreServer, client: Client) -> None:
    msg = decode(client.request()[0])
    err = _fails(server, dataclasses.replace(msg, code=GET))
    assert (err.code, err.stat) == (0x85, "oscore_method")


@pytest.mark.parametrize(
    "option",
    [
        b"\xe0",  # reserved bits
        b"\x10",  # kid context announced but absent
        b"\x15\x01",  # kid context longer than what follows
        b"\x13\x01",  # Partial IV shorter than announced
        b"\x29\x01",  # Group OSCORE flag (these are pairwise contexts)
    ],
)
def test_undecodable_oscore_option_is_4_02(server: OscoreServer, option: bytes) -> None:
    msg = Message(CON, POST, 1, b"t", ((Opt.OSCORE, option),), b"\x00" * 12)
    err = _fails(server, msg)
    assert (err.code, err.stat) == (0x82, "oscore_decode_failed")


def test_plain_refusal_when_required(tmp_path: Path) -> None:
    srv = OscoreServer(OscoreConfig(contexts=(device(),), require=True))
    assert srv.require
    assert not srv.is_protected(Message(CON, GET, 1, b"", ((Opt.URI_PATH, b"x"),)))
    err = srv.plain_refusal()
    assert (err.code, err.stat) == (UNAUTHORIZED, "oscore_required")
    assert err.to_message(Message(NON, GET, 7, b"k")).mtype == NON


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(option=st.binary(max_size=20), payload=st.binary(max_size=40), code=st.sampled_from([POST, 5, 1, 3]))
def test_fuzzed_oscore_messages_only_raise_oscore_error(
    server: OscoreServer, option: bytes, payload: bytes, code: int
) -> None:
    msg = Message(CON, code, 1, b"t", ((Opt.OSCORE, option),), payload)
    with pytest.raises(OscoreError) as info:
        server.unprotect(msg)
    assert info.value.code in (0x80, 0x81, 0x82, 0x85)


# ---------------------------------------------------------------------------------------- Echo recovery


def test_first_request_after_start_gets_protected_echo_then_succeeds(tmp_path: Path, client: Client) -> None:
    srv = OscoreServer(OscoreConfig(contexts=(device(),)))  # no state: the replay window is unknown
    wire, request_id = client.request(POST, payload=b"hi")
    err = _fails(srv, wire)
    assert (err.stat, err.protected, err.code) == ("oscore_replay", True, CHANGED)
    reply = err.to_message(decode(wire))
    assert reply.has(Opt.OSCORE)
    assert reply.opt(Opt.OSCORE) not in (b"", None)
    inner = client.response(encode(reply), request_id)
    assert int(inner.code) == UNAUTHORIZED
    assert inner.opt.echo
    # The client repeats the request with the Echo value inside the protection.
    wire2, request_id2 = client.request(POST, payload=b"hi", echo=inner.opt.echo, mid=0x1235)
    req = srv.unprotect(decode(wire2))
    assert req.inner.payload == b"hi"
    assert not req.inner.has(Opt.ECHO)
    assert client.response(encode(ack(srv.protect(req, Message(ACK, CHANGED)))), request_id2).code == CHANGED
    # The window is initialized now: the first request (older sequence number) is a replay, plainly refused.
    late = _fails(srv, wire)
    assert (late.stat, late.protected, late.code) == ("oscore_replay", False, UNAUTHORIZED)


def test_wrong_echo_value_is_challenged_again(tmp_path: Path, client: Client) -> None:
    srv = OscoreServer(OscoreConfig(contexts=(device(),)))
    wire, _ = client.request(echo=b"\x00" * 8)
    assert _fails(srv, wire).protected


# ---------------------------------------------------------------------------------------- sequence numbers


def test_sequence_numbers_persist_across_restarts(tmp_path: Path, client: Client) -> None:
    state = tmp_path / "state"
    state.mkdir()
    cfg = OscoreConfig(contexts=(device(),), state_dir=str(state))
    srv = OscoreServer(cfg)
    (path,) = state.glob("oscore-*.json")
    bound = json.loads(path.read_text())["next-to-send"]
    assert bound > 0
    wire, _ = client.request()
    req = srv.unprotect(decode(wire))
    for _ in range(bound + 5):  # crosses the first persisted bound
        srv.protect(req, Message(ACK, CONTENT), observe=True)
    used = _ctx(srv).sender_sequence_number
    assert json.loads(path.read_text())["next-to-send"] >= used

    again = OscoreServer(cfg)  # a restart
    assert _ctx(again).sender_sequence_number >= used
    # ...and its replay window is unknown, so the next request is challenged with Echo.
    assert _fails(again, client.request(mid=9)[0]).protected


def test_without_state_dir_sequence_numbers_start_at_random_points() -> None:
    starts = {_ctx(OscoreServer(OscoreConfig(contexts=(device(),)))).sender_sequence_number for _ in range(4)}
    assert len(starts) > 1
    assert all(s < 2**39 for s in starts)


def test_unreadable_state_is_a_startup_error(tmp_path: Path) -> None:
    cfg = OscoreConfig(contexts=(device(),), state_dir=str(tmp_path))
    OscoreServer(cfg)
    (path,) = tmp_path.glob("oscore-*.json")
    path.write_text("{not json")
    with pytest.raises(OscoreStateError, match="sensor-17"):
        OscoreServer(cfg)


def test_secret_never_in_repr(server: OscoreServer) -> None:
    text = repr(server) + repr(_ctx(server)) + repr(device()) + str(OscoreConfig(contexts=(device(),)))
    assert SECRET.hex() not in text
    assert repr(SECRET) not in text
