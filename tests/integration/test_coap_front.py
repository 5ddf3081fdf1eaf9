"""The CoAP front with real peers on loopback: libcoap's ``coap-client-notls`` and raw UDP datagrams against a
live agent, routed to the h2 test server and to nginx (HTTP/1.1 and h2c).

Covers the RFC 8075 mapping end to end (methods, ``:path``, Content-Format both ways, 2.xx per method), the
status mapping including local failures (dead upstream 5.02, route timeout 5.04, circuit breaker 5.03 with
Max-Age), separate responses, deduplication, blockwise both ways (and 4.13), Observe with one upstream refresh
per resource, malformed datagrams (plus hypothesis), ``/.well-known/core`` and HTTP filters (local_ratelimit,
rbac) on CoAP requests. Every test checks the upstream side too.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nginx import NginxServer, free_port
from peers import configs as C
from peers.agent import Agent
from peers.coap import (
    COAP_CLIENT,
    RawCoap,
    coap_client,
    coap_listener,
    coap_route,
    coap_uri,
)
from peers.common import wait_for
from peers.h2_server import H2Server, pattern

from microenvoy.codecs.coap.message import ACK, CON, NON, RST, Message, Opt, encode, encode_uint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

GET, POST, PUT, DELETE = 1, 2, 3, 4
CREATED, DELETED, VALID, CHANGED, CONTENT = 0x41, 0x42, 0x43, 0x44, 0x45
BAD_OPTION, FORBIDDEN, NOT_FOUND, TOO_LARGE, TOO_MANY = 0x82, 0x83, 0x84, 0x8D, 0x9D
BAD_GATEWAY, UNAVAILABLE, GATEWAY_TIMEOUT = 0xA2, 0xA3, 0xA4
JSON_CF, TEXT_CF, OCTET_CF, LINK_CF = 50, 0, 42, 40
P = "coap.coap."


def uid() -> str:
    return uuid.uuid4().hex[:12]


def code(text: str) -> int:
    """``"2.05"`` -> 0x45."""
    c, _, d = text.partition(".")
    return (int(c) << 5) | int(d)


# ------------------------------------------------------------------------------ coap-client output
_PACKET = re.compile(r"^v:1 t:(CON|NON|ACK|RST) c:(\S+) i:([0-9a-f]+) \{([0-9a-f]*)\} \[ ?(.*?) ?\]", re.M)


@dataclass
class Packet:
    """One packet line of ``coap-client -v 7`` (sent or received)."""

    mtype: str
    code: str
    mid: int
    token: str
    options: dict[str, str]

    @property
    def is_response(self) -> bool:
        return bool(re.fullmatch(r"\d\.\d\d", self.code)) and self.code != "0.00"


def packets(stdout: bytes) -> list[Packet]:
    """Packet lines in order; libcoap logs some packets twice (sent, then again when processed): each
    ``(type, code, mid)`` is listed once."""
    out = []
    seen: set[tuple[str, str, str]] = set()
    for m in _PACKET.finditer(stdout.decode("utf-8", "replace")):
        key = (m.group(1), m.group(2), m.group(3))
        if key in seen:
            continue
        seen.add(key)
        opts: dict[str, str] = {}
        for part in m.group(5).split(", "):
            name, sep, value = part.partition(":")
            if sep:
                opts.setdefault(name, value)
        out.append(Packet(m.group(1), m.group(2), int(m.group(3), 16), m.group(4), opts))
    return out


def responses(stdout: bytes) -> list[Packet]:
    return [p for p in packets(stdout) if p.is_response]


# ----------------------------------------------------------------------------------------- agent
@pytest.fixture(scope="module")
def dead_upstream_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def coap(module_agent: Any, h2_server: H2Server, nginx: NginxServer, dead_upstream_port: int) -> Agent:
    """One agent for most tests: routes by prefix to the h2 server, nginx (h1/h2c), a dead port, a slow route,
    a circuit-broken cluster, an observed route and a route with a small body limit."""
    rw = {"prefix_rewrite": "/"}
    routes = [
        coap_route(
            "/obs/",
            name="observed",
            observe={"mode": "poll", "interval": "0.3s"},
            link={"rt": "temperature", "ct": "50", "title": "Observed things"},
        ),
        coap_route(
            "/obsx/", route_extra={"prefix_rewrite": "/status/"}, observe={"mode": "poll", "interval": "0.3s"}
        ),
        coap_route("/ng1/", "ng1", route_extra=rw, link={"rt": "nginx"}),
        coap_route("/ng2/", "ng2", route_extra=rw),
        coap_route("/dead/", "dead", route_extra=rw),
        coap_route("/slow/", timeout="0.5s", route_extra=rw),
        coap_route("/cb/", "cb", route_extra=rw),
        coap_route("/small/", route_extra={"prefix_rewrite": "/echo/"}, max_body_bytes=1000),
        coap_route("/"),
    ]
    clusters = [
        C.cluster("up", h2_server.port, http2=True),
        C.cluster("ng1", nginx.port),
        C.cluster("ng2", nginx.h2c_port, http2=True),
        C.cluster("dead", dead_upstream_port, connect_timeout="0.5s"),
        C.cluster(
            "cb",
            h2_server.port,
            http2=True,
            circuit_breakers=C.circuit_breakers(max_requests=1, max_pending_requests=1000),
        ),
    ]
    agent: Agent = module_agent(C.bootstrap([coap_listener(routes)], clusters), name="coap")
    return agent


@pytest.fixture
def raw(coap: Agent) -> Iterator[RawCoap]:
    with RawCoap(coap.port("coap")) as c:
        yield c


def assert_alive(agent: Agent) -> None:
    """A fresh client still gets a normal GET answered (and the process is up)."""
    path = f"/alive/{uid()}"
    with RawCoap(agent.port("coap")) as c:
        reply = c.request(GET, path)
    assert reply.code == CONTENT, reply
    assert agent.running


def cf(msg: Message) -> int | None:
    return msg.uint(Opt.CONTENT_FORMAT)


# ======================================================================== methods and mapping -> h2
@pytest.mark.parametrize(
    ("method", "expected"), [("get", "2.05"), ("post", "2.04"), ("put", "2.04"), ("delete", "2.02")]
)
def test_methods_to_h2_server(coap: Agent, h2_server: H2Server, method: str, expected: str) -> None:
    path = f"/things/{uid()}"
    args = ["-v", "7", "-m", method, "-B", "5"]
    body = b'{"t": 21.5}'
    if method in ("post", "put"):
        args += ["-e", body.decode(), "-t", "50"]
    res = coap_client(*args, coap_uri(coap.port("coap"), path + "?unit=C&n=3"))
    got = responses(res.stdout)
    assert got, res.text
    assert got[-1].code == expected, got
    assert got[-1].options.get("Content-Format") == "application/json", got
    # upstream side: method, :path from Uri-Path + Uri-Query, content-type from Content-Format, the body
    assert h2_server.count(path) == 1
    seen = h2_server.last(path)
    assert seen.method == method.upper()
    assert seen.path == path + "?unit=C&n=3"
    if method in ("post", "put"):
        assert seen.header("content-type") == "application/json"
        assert seen.header("content-length") == str(len(body))
    else:
        assert seen.header("content-type") is None


@pytest.mark.parametrize("method", ["post", "put"])
def test_created_maps_to_2_01(coap: Agent, h2_server: H2Server, method: str) -> None:
    path = f"/status/201/{uid()}"
    res = coap_client("-v", "7", "-m", method, "-e", "x", "-t", "0", coap_uri(coap.port("coap"), path))
    got = responses(res.stdout)
    assert [p.code for p in got] == ["2.01"], res.text
    assert h2_server.last(path).header("content-type") == "text/plain; charset=utf-8"


def test_echo_content_format_round_trip(raw: RawCoap, h2_server: H2Server) -> None:
    path = f"echo/{uid()}"
    reply = raw.request(POST, path, payload=b"\xa1\x01\x02", content_format=60)
    assert reply.code == CHANGED
    assert cf(reply) == 60  # application/cbor back from the upstream's content-type
    assert reply.payload == b"\xa1\x01\x02"
    assert h2_server.last("/" + path).header("content-type") == "application/cbor"


@pytest.mark.parametrize("which", ["ng1", "ng2"])
@pytest.mark.parametrize(
    ("method", "expected"), [("get", "2.05"), ("post", "2.04"), ("put", "2.04"), ("delete", "2.02")]
)
def test_methods_to_nginx(coap: Agent, which: str, method: str, expected: str) -> None:
    """nginx over HTTP/1.1 (ng1) and h2c (ng2): /echo-meta reports what nginx received."""
    args = ["-v", "7", "-m", method, "-B", "5"]
    if method in ("post", "put"):
        args += ["-e", "hello", "-t", "0"]
    res = coap_client(*args, coap_uri(coap.port("coap"), f"/{which}/echo-meta?k=v"))
    got = responses(res.stdout)
    assert [p.code for p in got] == [expected], res.text
    assert got[0].options.get("Content-Format") == "text/plain"
    seen = res.stdout.decode("utf-8", "replace")
    proto = "HTTP/1.1" if which == "ng1" else "HTTP/2.0"
    assert f"method={method.upper()} uri=/echo-meta?k=v " in seen, seen
    assert f"proto={proto}" in seen, seen
    if method in ("post", "put"):
        assert "cl=5" in seen, seen


def test_nginx_upload_body(raw: RawCoap) -> None:
    reply = raw.request(PUT, "ng2/upload", payload=b"z" * 700, content_format=OCTET_CF)
    assert reply.code == CHANGED, reply
    assert reply.payload == b"received 700\n"
    assert cf(reply) == TEXT_CF


# ============================================================================== status mapping
def test_upstream_404_and_503(coap: Agent, raw: RawCoap, h2_server: H2Server) -> None:
    p404, p503 = f"status/404/{uid()}", f"status/503/{uid()}"
    r404 = raw.request(GET, p404)
    assert r404.code == NOT_FOUND
    assert cf(r404) is None  # error responses carry a diagnostic, no Content-Format
    assert r404.payload == b"status 404"
    r503 = raw.request(GET, p503)
    assert r503.code == UNAVAILABLE
    assert r503.uint(Opt.MAX_AGE) == 0  # a transient failure is not cached for CoAP's default 60 s
    assert h2_server.count("/" + p404) == 1
    assert h2_server.count("/" + p503) == 1
    res = coap_client("-m", "get", "-B", "5", coap_uri(coap.port("coap"), f"/{p404}x"))
    assert "4.04" in res.stderr, res.stderr


def test_dead_upstream_is_5_02(coap: Agent, raw: RawCoap) -> None:
    before = coap.stat(P + "upstream_unreachable")
    reply = raw.request(GET, f"dead/{uid()}")
    assert reply.code == BAD_GATEWAY, reply
    assert reply.uint(Opt.MAX_AGE) == 0
    assert coap.wait_stat(P + "upstream_unreachable", before + 1) == before + 1


def test_route_timeout_is_5_04(coap: Agent, raw: RawCoap, h2_server: H2Server) -> None:
    path = f"/delay/3000/{uid()}"
    before = coap.stat(P + "upstream_timeout")
    reply = raw.request(GET, "slow" + path)
    assert reply.code == GATEWAY_TIMEOUT, reply
    assert reply.uint(Opt.MAX_AGE) == 0
    assert h2_server.count(path) == 1  # it did reach the upstream, which was too slow
    coap.wait_stat(P + "upstream_timeout", before + 1)


def test_circuit_breaker_overflow_is_5_03(coap: Agent, raw: RawCoap, h2_server: H2Server) -> None:
    path = f"/delay/1500/{uid()}"
    sent = [raw.message(GET, f"cb{path}?n={i}") for i in range(3)]
    for m in sent:
        raw.send(m)
    replies: dict[bytes, Message] = {}
    tokens = {m.token for m in sent}

    def all_answered() -> bool:
        msg = raw.recv(5.0)
        if msg.mtype == CON:
            raw.ack(msg)
        if msg.code and msg.token in tokens:
            replies[msg.token] = msg
        return len(replies) == 3

    wait_for(all_answered, 10, interval=0, message="three answers")
    codes = sorted(m.code for m in replies.values())
    assert codes == [CONTENT, UNAVAILABLE, UNAVAILABLE], [hex(c) for c in codes]
    for m in replies.values():
        if m.code == UNAVAILABLE:
            assert m.has(Opt.MAX_AGE), m
            assert m.uint(Opt.MAX_AGE) >= 1
    assert h2_server.count(path) == 1  # the overflowing two never went upstream


# ============================================================================ separate responses
def test_separate_response_empty_ack_first(coap: Agent, raw: RawCoap, h2_server: H2Server) -> None:
    before = coap.stat(P + "separate")
    path = f"/delay/1200/{uid()}"
    req = raw.message(GET, path)
    raw.send(req)
    first = raw.recv(3.0)
    assert (first.mtype, first.code, first.mid, first.token) == (ACK, 0, req.mid, b""), first
    second = raw.recv(5.0)
    assert (second.mtype, second.code, second.token) == (CON, CONTENT, req.token), second
    assert second.mid != req.mid
    raw.ack(second)
    assert coap.wait_stat(P + "separate", before + 1) == before + 1
    assert h2_server.count(path) == 1


def test_separate_response_retransmitted_until_acked(coap: Agent, raw: RawCoap) -> None:
    before = coap.stat(P + "retransmit")
    req = raw.message(GET, f"/delay/700/{uid()}")
    raw.send(req)
    assert raw.recv(3.0).code == 0  # the empty ACK
    first = raw.recv(3.0)
    assert (first.mtype, first.token) == (CON, req.token), first
    again = raw.recv(6.0)  # not acknowledged: the same message again (ACK_TIMEOUT 2..3 s)
    assert (again.mid, again.token, again.payload) == (first.mid, first.token, first.payload)
    raw.ack(again)
    assert coap.wait_stat(P + "retransmit", before + 1) >= before + 1


# ============================================================================== deduplication
def test_duplicate_con_answered_from_cache(coap: Agent, raw: RawCoap, h2_server: H2Server) -> None:
    before = coap.stat(P + "duplicate")
    path = f"/dup/{uid()}"
    req = encode(raw.message(GET, path))
    raw.send(req)
    a = raw.recv_raw(3.0)
    raw.send(req)
    b = raw.recv_raw(3.0)
    assert a == b  # the cached ACK, byte for byte (the JSON echo would differ: x-request-id)
    assert h2_server.count(path) == 1
    assert coap.wait_stat(P + "duplicate", before + 1) == before + 1


def test_duplicate_while_pending(coap: Agent, raw: RawCoap, h2_server: H2Server) -> None:
    before = coap.stat(P + "duplicate")
    path = f"/delay/1200/{uid()}"
    msg = raw.message(GET, path)
    req = encode(msg)
    raw.send(req)
    raw.send(req)  # still pending, before the empty ACK: swallowed
    ack = raw.recv(3.0)
    assert (ack.mtype, ack.code, ack.mid) == (ACK, 0, msg.mid)
    raw.send(req)  # after the empty ACK: answered with the empty ACK again
    again = raw.recv(3.0)
    assert (again.mtype, again.code, again.mid) == (ACK, 0, msg.mid)
    reply = raw.recv(5.0)
    assert (reply.mtype, reply.code, reply.token) == (CON, CONTENT, msg.token), reply
    raw.ack(reply)
    assert coap.wait_stat(P + "duplicate", before + 2) == before + 2
    assert h2_server.count(path) == 1


def test_duplicate_after_separate_response_gets_empty_ack(
    coap: Agent, raw: RawCoap, h2_server: H2Server
) -> None:
    """The client's retransmission arrives after the separate response went out (its empty ACK was lost):
    it is acknowledged again (RFC 7252 §4.5), never forwarded a second time."""
    before = coap.stat(P + "duplicate")
    path = f"/delay/700/{uid()}"
    msg = raw.message(GET, path)
    raw.send(msg)
    assert raw.recv(3.0).code == 0  # the empty ACK
    reply = raw.recv(5.0)
    assert (reply.mtype, reply.code, reply.token) == (CON, CONTENT, msg.token), reply
    raw.ack(reply)
    raw.send(msg)  # the same request (same mid) once more
    ping = raw.next_mid()
    raw.send(Message(CON, 0, ping))
    first = raw.recv(3.0)
    assert (first.mtype, first.code, first.mid) == (ACK, 0, msg.mid), first
    coap.wait_stat(P + "duplicate", before + 1)
    assert h2_server.count(path) == 1


# ==================================================================================== blockwise
@pytest.mark.parametrize("method", ["put", "post"])
def test_block1_upload_arrives_whole(coap: Agent, h2_server: H2Server, tmp_path: Path, method: str) -> None:
    data = pattern(5000)
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(data)
    before = coap.stat(P + "block1_transfers")
    path = f"/echo/{uid()}"
    res = coap_client(
        "-v", "7", "-m", method, "-b", "64", "-f", str(src), "-o", str(out), "-B", "8",
        coap_uri(coap.port("coap"), path),
    )  # fmt: skip
    blocks = [p for p in packets(res.stdout) if p.code == method.upper() and "Block1" in p.options]
    assert len(blocks) == -(-5000 // 64), blocks[:3]  # really sent in 64-byte blocks
    assert out.read_bytes() == data  # echoed back whole (via Block2)
    assert h2_server.count(path) == 1
    assert h2_server.progress(path) == 5000
    assert h2_server.last(path).header("content-length") == "5000"
    coap.wait_stat(P + "block1_transfers", before + 1)


@pytest.mark.parametrize("block", [None, "64"])
def test_block2_download(coap: Agent, h2_server: H2Server, tmp_path: Path, block: str | None) -> None:
    out = tmp_path / "big.bin"
    path = f"/big/3000/{uid()}"
    before = coap.stat(P + "block2_transfers")
    args = ["-v", "7", "-m", "get", "-o", str(out), "-B", "8"]
    if block:
        args += ["-b", block]
    res = coap_client(*args, coap_uri(coap.port("coap"), path))
    got = responses(res.stdout)
    size = int(block or 1024)
    assert len(got) == -(-3000 // size), [p.options for p in got]
    assert got[0].options.get("Size2") == "3000"
    assert all(p.options.get("Block2", "").endswith(f"/{size}") for p in got)
    assert out.read_bytes() == pattern(3000)
    assert h2_server.count(path) == 1  # later blocks come from the agent's copy
    coap.wait_stat(P + "block2_transfers", before + 1)


def test_body_over_route_limit_is_4_13(
    coap: Agent, raw: RawCoap, h2_server: H2Server, tmp_path: Path
) -> None:
    before = coap.stat(P + "block_too_large")
    tag = uid()
    # announced by Size1 in the first block: refused at once with Size1 = the route's limit
    first = raw.request(
        PUT,
        f"small/{tag}",
        options=[(Opt.BLOCK1, encode_uint((0 << 4) | 0x8 | 2)), (Opt.SIZE1, encode_uint(5000))],
        payload=b"a" * 64,
    )
    assert first.code == TOO_LARGE, first
    assert first.uint(Opt.SIZE1) == 1000
    # a single datagram over the limit
    single = raw.request(PUT, f"small/{tag}", payload=b"b" * 1001)
    assert (single.code, single.uint(Opt.SIZE1)) == (TOO_LARGE, 1000), single
    # coap-client -b 64 with a 5000-byte file
    src = tmp_path / "in.bin"
    src.write_bytes(pattern(5000))
    uri = coap_uri(coap.port("coap"), f"/small/{tag}")
    res = coap_client("-v", "7", "-m", "put", "-b", "64", "-f", str(src), "-B", "5", uri)
    got = responses(res.stdout)
    assert got, res.text
    assert got[-1].code == "4.13", got
    assert h2_server.count(f"/echo/{tag}") == 0
    coap.wait_stat(P + "block_too_large", before + 3)


def test_block1_out_of_order_is_4_08(coap: Agent, raw: RawCoap, h2_server: H2Server) -> None:
    before = coap.stat(P + "block_incomplete")
    path = f"echo/{uid()}"
    block1 = encode_uint((3 << 4) | 0x8 | 2)  # block 3 of a transfer the agent never saw
    reply = raw.request(PUT, path, options=[(Opt.BLOCK1, block1)], payload=b"c" * 64)
    assert reply.code == 0x88, reply  # 4.08 Request Entity Incomplete
    first = raw.request(PUT, path, options=[(Opt.BLOCK1, encode_uint(0x8 | 2))], payload=b"d" * 64)
    assert first.code == 0x5F, first  # 2.31 Continue
    assert first.opt(Opt.BLOCK1) == encode_uint(0x8 | 2)
    short = raw.request(PUT, path, options=[(Opt.BLOCK1, encode_uint((1 << 4) | 0x8 | 2))], payload=b"e")
    assert short.code == 0x88, short  # a non-final block must be exactly the block size
    coap.wait_stat(P + "block_incomplete", before + 2)
    assert h2_server.count("/" + path) == 0


# ====================================================================================== Observe
def _observe(port: int, path: str, seconds: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [COAP_CLIENT, "-v", "7", "-s", str(seconds), "-B", str(seconds + 3), coap_uri(port, path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def _notifications(stdout: bytes) -> list[int]:
    return [int(p.options["Observe"]) for p in responses(stdout) if "Observe" in p.options]


def test_observe_notifications(coap: Agent, h2_server: H2Server) -> None:
    path = f"/obs/{uid()}"
    proc = _observe(coap.port("coap"), path, 3)
    out, err = proc.communicate(timeout=15)
    seqs = _notifications(out)
    assert len(seqs) >= 4, (seqs, err.decode()[-500:])
    assert seqs == sorted(set(seqs))  # fresh, increasing sequence numbers
    assert h2_server.count(path) >= len(seqs)
    coap.wait_stat(P + "observed_resources", lambda v: v == 0)


def test_observe_one_refresh_for_two_observers(coap: Agent, h2_server: H2Server) -> None:
    path = f"/obs/{uid()}"
    before = coap.stats()
    port = coap.port("coap")
    procs = [_observe(port, path, 3), _observe(port, path, 3)]
    try:
        coap.wait_stat(P + "observers", lambda v: v >= before.get(P + "observers", 0) + 2, timeout=5)
        assert coap.stat(P + "observed_resources") == 1  # one resource, one upstream refresh
        outs = [p.communicate(timeout=15)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    counts = [len(_notifications(o)) for o in outs]
    assert min(counts) >= 4, counts
    polls = h2_server.count(path)
    # one poll stream per interval, not one per observer: ~ the notifications one observer saw
    assert polls <= max(counts) + 2, (polls, counts)
    # both left (deregistration): the polling stops
    coap.wait_stat(P + "observed_resources", lambda v: v == 0)
    coap.wait_stat(P + "observers", lambda v: v == before.get(P + "observers", 0))
    settled = h2_server.count(path)
    assert settled <= polls + 3  # each deregistration (GET with Observe: 1) is a plain GET upstream too
    # a request that takes several poll intervals: no new poll meanwhile
    with RawCoap(port) as c:
        assert c.request(GET, f"/delay/1000/{uid()}").code == CONTENT
    assert h2_server.count(path) == settled


def test_observe_rst_ends_observation(coap: Agent, raw: RawCoap, h2_server: H2Server) -> None:
    path = f"obs/{uid()}"
    reg = raw.request(GET, path, mtype=NON, options=[(Opt.OBSERVE, b"")])
    assert reg.code == CONTENT, reg
    assert reg.has(Opt.OBSERVE), reg
    note = raw.recv_until(lambda m: m.token == reg.token and m.code == CONTENT, 3.0)
    assert note.mtype == NON  # a non-confirmable registration gets non-confirmable notifications
    gone = coap.stat(P + "observers_gone")
    raw.send(Message(RST, 0, note.mid))  # "I do not know this": the observer is gone (RFC 7641 §3.6)
    coap.wait_stat(P + "observers_gone", gone + 1)
    coap.wait_stat(P + "observed_resources", lambda v: v == 0)
    settled = h2_server.count("/" + path)
    assert raw.request(GET, f"/delay/1000/{uid()}").code == CONTENT
    assert h2_server.count("/" + path) <= settled + 1


def test_observe_ignored_on_route_without_observe(coap: Agent, raw: RawCoap, h2_server: H2Server) -> None:
    path = f"plain/{uid()}"
    reply = raw.request(GET, path, options=[(Opt.OBSERVE, b"")])
    assert reply.code == CONTENT, reply
    assert not reply.has(Opt.OBSERVE)  # answered once, not registered (RFC 7641 §4.1)
    assert coap.stat(P + "observed_resources") == 0
    assert h2_server.count("/" + path) == 1


def test_observe_first_fetch_fails_registers_nothing(coap: Agent, raw: RawCoap, h2_server: H2Server) -> None:
    tag = uid()
    reply = raw.request(GET, f"obsx/404/{tag}", options=[(Opt.OBSERVE, b"")])
    assert reply.code == NOT_FOUND, reply
    assert not reply.has(Opt.OBSERVE)
    coap.wait_stat(P + "observed_resources", lambda v: v == 0)
    assert h2_server.count(f"/status/404/{tag}") == 1


def test_unacked_con_notifications_are_retransmitted(coap: Agent, raw: RawCoap) -> None:
    """An observer that never acknowledges: the newest notification replaces the one awaiting its ACK but
    inherits its retransmission timer (RFC 7641 §4.5.2), so the outstanding notification is retransmitted
    (same message id) on schedule, ACK_TIMEOUT (2..3 s) after the first one, although the resource changes
    every 0.3 s; that is what finds an observer that is gone after MAX_RETRANSMIT."""
    path = f"obs/{uid()}"
    reg = raw.request(GET, path, options=[(Opt.OBSERVE, b"")])  # CON registration: CON notifications
    assert reg.has(Opt.OBSERVE), reg
    seen: set[int] = set()
    try:

        def repeated(m: Message) -> bool:
            if m.token != reg.token or m.mtype != CON:
                return False
            if m.mid in seen:
                return True
            seen.add(m.mid)
            return False

        again = raw.recv_until(repeated, 5.0)  # never acknowledged: the first unacknowledged one + 2..3 s
        assert again.has(Opt.OBSERVE)
    finally:
        raw.request(GET, path, options=[(Opt.OBSERVE, encode_uint(1))], token=reg.token)  # deregister
        coap.wait_stat(P + "observed_resources", lambda v: v == 0)


# ============================================================================ malformed datagrams
def _expect_rst(raw: RawCoap, mid: int) -> None:
    msg = raw.recv(3.0)
    assert (msg.mtype, msg.code, msg.mid) == (RST, 0, mid), msg


def test_truncated_header_ignored(coap: Agent, raw: RawCoap) -> None:
    before = coap.stat(P + "malformed")
    raw.send(b"\x40\x01")
    _nothing_but_ping(raw)  # nothing to answer (no message id)
    coap.wait_stat(P + "malformed", before + 1)
    assert_alive(coap)


def _nothing_but_ping(raw: RawCoap) -> None:
    """The agent sent nothing for what was sent before: the first datagram back is the RST to a ping sent
    now (datagrams on loopback arrive, and are handled, in order)."""
    mid = raw.next_mid()
    raw.send(Message(CON, 0, mid))
    _expect_rst(raw, mid)


def test_malformed_non_dropped(coap: Agent, raw: RawCoap) -> None:
    before = coap.stat(P + "malformed")
    mid = raw.next_mid()
    raw.send(bytes((0x50 | 9, GET, mid >> 8, mid & 0xFF)) + b"t" * 9)  # NON, token length 9
    _nothing_but_ping(raw)
    raw.send(Message(ACK, GET, raw.next_mid(), b"tk", ((Opt.URI_PATH, b"x"),)))  # a request in an ACK
    _nothing_but_ping(raw)
    coap.wait_stat(P + "malformed", before + 2)


@pytest.mark.parametrize("tkl", range(9, 16))
def test_reserved_token_length_gets_rst(coap: Agent, raw: RawCoap, tkl: int) -> None:
    before = coap.stat(P + "malformed")
    mid = raw.next_mid()
    raw.send(bytes((0x40 | tkl, GET, mid >> 8, mid & 0xFF)) + b"t" * tkl)
    _expect_rst(raw, mid)
    coap.wait_stat(P + "malformed", before + 1)
    assert_alive(coap)


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b"\xf0", id="option-delta-15"),
        pytest.param(b"\x1f", id="option-length-15"),
        pytest.param(b"\xff", id="payload-marker-without-payload"),
        pytest.param(b"\xb5abc", id="option-past-the-end"),
    ],
)
def test_malformed_con_gets_rst(coap: Agent, raw: RawCoap, tail: bytes) -> None:
    before = coap.stat(P + "malformed")
    mid = raw.next_mid()
    raw.send(bytes((0x40, GET, mid >> 8, mid & 0xFF)) + tail)
    _expect_rst(raw, mid)
    coap.wait_stat(P + "malformed", before + 1)
    assert_alive(coap)


def test_unknown_critical_option_is_4_02(coap: Agent, raw: RawCoap, h2_server: H2Server) -> None:
    before = coap.stat(P + "bad_option")
    path = f"crit/{uid()}"
    reply = raw.request(GET, path, options=[(9999, b"x")])
    assert (reply.mtype, reply.code) == (ACK, BAD_OPTION), reply
    assert h2_server.count("/" + path) == 0
    coap.wait_stat(P + "bad_option", before + 1)
    elective = raw.request(GET, path, options=[(9998, b"x")])  # even: elective, ignored
    assert elective.code == CONTENT
    assert h2_server.count("/" + path) == 1


def test_ping_gets_rst(coap: Agent, raw: RawCoap) -> None:
    before = coap.stat(P + "ping")
    mid = raw.next_mid()
    raw.send(Message(CON, 0, mid))
    _expect_rst(raw, mid)
    coap.wait_stat(P + "ping", before + 1)
    assert_alive(coap)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=80),
        st.binary(min_size=4, max_size=60).map(lambda b: bytes((0x40 | (b[0] & 0x3F),)) + b[1:]),
    )
)
def test_random_datagrams_do_not_hurt(coap: Agent, data: bytes) -> None:
    port = coap.port("coap")
    with RawCoap(port) as fuzz:
        fuzz.send(data)
    with RawCoap(port) as c:  # a ping is answered: the listener is alive
        mid = c.next_mid()
        c.send(Message(CON, 0, mid))
        reply = c.recv(3.0)
        assert (reply.mtype, reply.mid) == (RST, mid)


def test_alive_after_fuzzing(coap: Agent) -> None:
    assert_alive(coap)


# ================================================================================ mapping refusals
@pytest.mark.parametrize(
    ("options", "req_code", "expected"),
    [
        pytest.param([(Opt.CONTENT_FORMAT, encode_uint(9999))], POST, 0x8F, id="unknown-content-format-4.15"),
        pytest.param([(Opt.ACCEPT, encode_uint(9999))], GET, 0x86, id="unknown-accept-4.06"),
        pytest.param([(Opt.PROXY_SCHEME, b"http")], GET, 0xA5, id="proxy-scheme-5.05"),
        pytest.param([], 8, 0x85, id="method-0.08-4.05"),
        pytest.param([(Opt.URI_PATH, b"..")], GET, 0x80, id="dot-segment-4.00"),
        pytest.param([(Opt.URI_HOST, b"a b")], GET, 0x80, id="bad-uri-host-4.00"),
    ],
)
def test_unmappable_requests_never_reach_upstream(
    coap: Agent,
    raw: RawCoap,
    h2_server: H2Server,
    options: list[tuple[int, bytes]],
    req_code: int,
    expected: int,
) -> None:
    before = coap.stat(P + "mapping_error")
    total = h2_server.total()
    path = f"refused/{uid()}"
    reply = raw.request(req_code, path, options=options, payload=b"{}" if req_code == POST else b"")
    assert reply.code == expected, reply
    assert reply.payload  # a diagnostic
    coap.wait_stat(P + "mapping_error", before + 1)
    assert h2_server.total() == total


def test_oversized_datagram_is_4_13(coap: Agent, raw: RawCoap, h2_server: H2Server) -> None:
    path = f"echo/{uid()}"
    reply = raw.request(PUT, path, payload=b"q" * 1200)  # max_message_size 1152: use Block1
    assert reply.code == TOO_LARGE, reply
    assert reply.uint(Opt.SIZE1) == 1152
    assert h2_server.count("/" + path) == 0


def test_non_request_gets_non_response(coap: Agent, raw: RawCoap, h2_server: H2Server) -> None:
    path = f"/delay/700/{uid()}"
    req = raw.message(GET, path, mtype=NON)
    raw.send(req)
    reply = raw.recv(5.0)  # no empty ACK first, even though slower than empty_ack_delay
    assert (reply.mtype, reply.code, reply.token) == (NON, CONTENT, req.token), reply
    assert h2_server.count(path) == 1


# ============================================================================ /.well-known/core
def test_well_known_core(coap: Agent, raw: RawCoap) -> None:
    reply = raw.request(GET, ".well-known/core")
    assert (reply.code, cf(reply)) == (CONTENT, LINK_CF), reply
    links = reply.payload.decode().split(",")
    assert '</obs/>;rt="temperature";ct=50;title="Observed things";obs' in links, links
    assert '</ng1/>;rt="nginx"' in links
    assert "</>" in links
    filtered = raw.request(GET, ".well-known/core?rt=temperature")
    assert filtered.payload.decode() == '</obs/>;rt="temperature";ct=50;title="Observed things";obs'
    prefix = raw.request(GET, ".well-known/core?rt=ngi*")
    assert prefix.payload.decode() == '</ng1/>;rt="nginx"'
    res = coap_client("-m", "get", "-B", "5", coap_uri(coap.port("coap"), "/.well-known/core"))
    assert b'</obs/>;rt="temperature"' in res.stdout


# ================================================================================= HTTP filters
def test_local_ratelimit_gives_4_29(agent: Any, h2_server: H2Server) -> None:
    cfg = C.bootstrap(
        [coap_listener([coap_route("/")], http_filters=[C.filter_local_ratelimit(1), C.router_filter()])],
        [C.cluster("up", h2_server.port, http2=True)],
    )
    a: Agent = agent(cfg, name="ratelimit")
    path = f"/limited/{uid()}"
    with RawCoap(a.port("coap")) as c:
        assert c.request(GET, path).code == CONTENT
        second = c.request(GET, path)
    assert second.code == TOO_MANY, second
    assert h2_server.count(path) == 1
    a.wait_stat(P + "rs_4xx", 1)


def test_rbac_deny_gives_4_03(agent: Any, h2_server: H2Server) -> None:
    rbac = C.filter_rbac(
        "DENY",
        {
            "no-secrets": {
                "permissions": [{"url_path": {"path": {"prefix": "/secret"}}}],
                "principals": [{"any": True}],
            }
        },
    )
    cfg = C.bootstrap(
        [coap_listener([coap_route("/")], http_filters=[rbac, C.router_filter()])],
        [C.cluster("up", h2_server.port, http2=True)],
    )
    a: Agent = agent(cfg, name="rbac")
    tag = uid()
    with RawCoap(a.port("coap")) as c:
        denied = c.request(GET, f"secret/{tag}")
        allowed = c.request(GET, f"open/{tag}")
    assert denied.code == FORBIDDEN, denied
    assert allowed.code == CONTENT
    assert h2_server.count(f"/secret/{tag}") == 0
    assert h2_server.count(f"/open/{tag}") == 1
