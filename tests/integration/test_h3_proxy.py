"""HTTP/3 in, through the real agent, to real upstreams: an aioquic client -> agent -> nginx (HTTP/1.1 and
h2c) and -> the h2 test server; plus the QUIC features a mobile client needs (resumption, 0-RTT with replay
protection, key update, connection ID change, NAT rebinding, address mobility, QPACK dynamic table, a large
ClientHello, version negotiation) and alt-svc advertisement on the TCP listener.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest
from nginx import big_body
from peers import configs as C
from peers.agent import Agent
from peers.certs import CertBundle
from peers.h1_client import h1_request
from peers.h2_server import H2Server, pattern
from peers.h3_client import H3Client

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def edge(module_agent: Any, nginx: Any, h2_server: H2Server, certs: CertBundle) -> Agent:
    routes = [
        C.route("/nginx-h1/", "nginx_h1", route_extra={"prefix_rewrite": "/"}),
        C.route("/nginx-h2/", "nginx_h2c", route_extra={"prefix_rewrite": "/"}),
        C.route("/", "h2"),
    ]
    config = C.bootstrap(
        [
            C.quic_listener("quic", C.hcm("h3", routes), certs),
            C.tcp_listener("tcp", C.hcm("tcp", routes), advertise_http3={"listener": "quic"}),
        ],
        [
            C.cluster("nginx_h1", nginx.port),
            C.cluster("nginx_h2c", nginx.h2c_port, http2=True),
            C.cluster("h2", h2_server.port, http2=True),
        ],
    )
    return module_agent(config, name="edge")


def client(agent: Agent, certs: CertBundle, **kwargs: Any) -> H3Client:
    """An HTTP/3 client to the agent's QUIC listener that verifies the agent's certificate."""
    return H3Client("127.0.0.1", agent.port("quic"), ca=str(certs.ca_cert), **kwargs)


# ================================================================================== proxying
async def test_h3_to_nginx_http1(edge: Agent, certs: CertBundle) -> None:
    async with client(edge, certs) as c:
        r = await c.request("GET", "/nginx-h1/hello")
        meta = await c.request("GET", "/nginx-h1/echo-meta")
    assert r.status == 200
    assert r.body == b"hello from nginx\n"
    assert r.header("x-upstream") == "nginx"
    assert meta.status == 200
    assert b"method=GET uri=/echo-meta " in meta.body
    assert b"proto=HTTP/1.1" in meta.body
    await edge.await_stat("http.h3.downstream_rq_2xx", 2)
    await edge.await_stat("cluster.nginx_h1.upstream_rq_total", 2)


async def test_h3_to_nginx_h2c(edge: Agent, certs: CertBundle) -> None:
    async with client(edge, certs) as c:
        meta = await c.request("GET", "/nginx-h2/echo-meta")
        big = await c.request("GET", "/nginx-h2/big")
    assert meta.status == 200
    assert b"proto=HTTP/2.0" in meta.body
    assert big.status == 200
    assert big.body == big_body()


async def test_h3_upload_to_nginx_http1(edge: Agent, certs: CertBundle) -> None:
    body = pattern(MIB)
    async with client(edge, certs) as c:
        r = await c.request("POST", "/nginx-h1/upload", [("content-length", str(len(body)))], body)
    assert r.status == 200
    assert r.body == b"received 1048576\n"


async def test_h3_to_h2_server_body_echo_1mib(edge: Agent, certs: CertBundle, h2_server: H2Server) -> None:
    body = pattern(MIB)
    async with client(edge, certs) as c:
        r = await c.request("POST", "/echo", [("content-type", "application/x-test")], body)
    assert r.status == 200
    assert r.header("content-type") == "application/x-test"
    assert len(r.body) == len(body)
    assert r.body == body
    assert h2_server.last("/echo").body_length == MIB


async def test_h3_trailers_end_to_end(edge: Agent, certs: CertBundle, h2_server: H2Server) -> None:
    async with client(edge, certs) as c:
        r = await c.request(
            "POST",
            "/echo",
            [("content-type", "application/x-test"), ("te", "trailers")],
            b"with trailers",
            trailers=[("x-client-checksum", "c0ffee")],
        )
    assert r.status == 200
    assert r.body == b"with trailers"
    # the request trailer reached the upstream (which echoes it back) and the response trailers reached us
    assert h2_server.last("/echo").trailers == [("x-client-checksum", "c0ffee")]
    assert r.trailer("x-client-checksum") == "c0ffee"
    assert r.trailer("x-server-trailer") == "done"


async def test_h3_request_headers_reach_upstream(edge: Agent, certs: CertBundle) -> None:
    async with client(edge, certs) as c:
        r = await c.request("GET", "/headers?x=1", [("x-custom", "hello"), ("user-agent", "h3-test")])
    assert r.status == 200
    seen = r.json()
    headers = dict((k, v) for k, v in seen["headers"])
    assert seen["method"] == "GET"
    assert seen["path"] == "/headers?x=1"
    assert seen["authority"] == f"localhost:{edge.port('quic')}"
    assert headers["x-custom"] == "hello"
    assert headers["user-agent"] == "h3-test"
    assert headers.get("x-forwarded-proto") == "https"
    assert headers.get("x-request-id")


async def test_h3_concurrent_streams(edge: Agent, certs: CertBundle) -> None:
    async with client(edge, certs) as c:
        results = await asyncio.gather(*(c.request("GET", f"/concurrent/{i}") for i in range(30)))
    assert [r.status for r in results] == [200] * 30
    assert sorted(r.json()["path"] for r in results) == sorted(f"/concurrent/{i}" for i in range(30))


async def test_h3_flow_control_slow_upstream(edge: Agent, certs: CertBundle, h2_server: H2Server) -> None:
    """A slow upstream slows the HTTP/3 client: the agent never grants far more credit than it forwarded."""
    total, rate, bound = 4 * MIB, 8 * MIB, 2 * MIB  # without backpressure ~3.5 MiB would pile up
    path = "/slow-read/h3-flow"
    before = h2_server.progress(path)
    worst = 0
    async with client(edge, certs) as c:
        s = c.open_stream("POST", f"{path}?rate={rate}", [("content-length", str(total))])
        s.send(b"\x00" * total, end_stream=True)
        response = asyncio.ensure_future(s.response(within=60))
        while not response.done():
            # credit granted to us minus what the upstream actually consumed = what the agent buffers
            worst = max(worst, s.send_credit() - (h2_server.progress(path) - before))
            await asyncio.wait([response], timeout=0.01)
        r = response.result()
    assert r.status == 200
    assert r.json() == {"received": total}
    assert worst <= bound, f"agent buffered up to {worst} bytes for a slow upstream (bound {bound})"


# ================================================================================== alt-svc
def test_alt_svc_advertised_on_tcp_listener(edge: Agent) -> None:
    r = h1_request("127.0.0.1", edge.port("tcp"), "GET", "/alt-svc")
    assert r.status == 200
    assert r.header("alt-svc") == f'h3=":{edge.port("quic")}"; ma=86400'


# ================================================================================== resumption, 0-RTT
async def test_session_resumption(edge: Agent, certs: CertBundle) -> None:
    async with client(edge, certs) as c:
        assert (await c.request("GET", "/first")).status == 200
        ticket = await c.wait_session_ticket()
        assert c.session_resumed is False
    async with client(edge, certs, session_ticket=ticket) as c:
        r = await c.request("GET", "/resumed")
        assert c.session_resumed is True
    assert r.status == 200
    await edge.await_stat("http.h3.quic.session_resumed", 1)


async def test_0rtt_get_served_post_too_early(edge: Agent, certs: CertBundle, h2_server: H2Server) -> None:
    async with client(edge, certs) as c:
        assert (await c.request("GET", "/warmup")).status == 200
        ticket = await c.wait_session_ticket()
    gets, posts = h2_server.count("/early/get"), h2_server.count("/early/post")
    too_early = edge.stat("http.h3.downstream_rq_too_early")
    async with client(edge, certs, session_ticket=ticket, early_data=True) as c:
        # both are written before the handshake completes, so they travel in 0-RTT packets
        get = c.open_stream("GET", "/early/get", end_stream=True)
        post = c.open_stream("POST", "/early/post", [("content-type", "text/plain")])
        post.send(b"not replay safe", end_stream=True)
        r_get, r_post = await get.response(), await post.response()
        await c.wait_handshake()
        assert c.session_resumed is True
        assert c.early_data_accepted is True
    assert r_get.status == 200
    assert r_post.status == 425
    assert h2_server.count("/early/get") == gets + 1
    assert h2_server.last("/early/get").header("early-data") == "1"  # RFC 8470 section 5.1
    assert h2_server.count("/early/post") == posts  # a non-idempotent 0-RTT request never goes upstream
    await edge.await_stat("http.h3.downstream_rq_too_early", too_early + 1)
    await edge.await_stat("http.h3.quic.early_data_accepted", 1)


async def test_after_0rtt_post_is_served_once_handshake_completes(edge: Agent, certs: CertBundle) -> None:
    async with client(edge, certs) as c:
        await c.request("GET", "/warmup")
        ticket = await c.wait_session_ticket()
    async with client(edge, certs, session_ticket=ticket, early_data=True) as c:
        early = c.open_stream("POST", "/echo")
        early.send(b"early", end_stream=True)
        assert (await early.response()).status == 425
        await c.wait_handshake()
        retried = await c.request("POST", "/echo", body=b"retry after handshake")
    assert retried.status == 200
    assert retried.body == b"retry after handshake"


# ================================================================================== migration, keys
async def test_key_update(edge: Agent, certs: CertBundle) -> None:
    async with client(edge, certs) as c:
        assert (await c.request("GET", "/before-key-update")).status == 200
        c.request_key_update()
        r1 = await c.request("POST", "/echo", body=pattern(200_000))
        assert c.key_phase == 1
        c.request_key_update()
        r2 = await c.request("GET", "/after-second-update")
        assert c.key_phase == 0
    assert r1.body == pattern(200_000)
    assert r2.status == 200


async def test_connection_id_change(edge: Agent, certs: CertBundle) -> None:
    async with client(edge, certs) as c:
        assert (await c.request("GET", "/before-cid-change")).status == 200
        await c.ping()
        assert c.spare_peer_cids() > 0, "the agent issued no spare connection IDs"
        old, new = c.change_connection_id()
        assert old != new
        assert (await c.request("GET", "/after-cid-change")).status == 200
        old2, new2 = c.change_connection_id()
        assert new2 not in (old, old2)
        assert (await c.request("GET", "/after-second-change")).status == 200


async def test_nat_rebinding(edge: Agent, certs: CertBundle) -> None:
    async with client(edge, certs, trace=True) as c:
        assert (await c.request("GET", "/before-rebind")).status == 200
        old, new = await c.rebind()
        assert old != new
        r = await c.request("POST", "/echo", body=pattern(300_000))
        assert r.body == pattern(300_000)
        assert c.path_challenges_received() >= 1, "the agent did not validate the new path"


async def test_address_mobility_with_new_connection_id(edge: Agent, certs: CertBundle) -> None:
    async with client(edge, certs, trace=True) as c:
        assert (await c.request("GET", "/before-migration")).status == 200
        await c.ping()
        await c.rebind()
        old, new = c.change_connection_id()
        assert old != new
        assert (await c.request("GET", "/after-migration")).status == 200
        assert c.path_challenges_received() >= 1


async def test_migration_during_a_transfer(edge: Agent, certs: CertBundle) -> None:
    body = pattern(2 * MIB)
    async with client(edge, certs) as c:
        s = c.open_stream("POST", "/echo")
        s.send(body, end_stream=True)
        await s.response_headers()
        await c.rebind()
        got = bytearray()
        async for chunk in s.chunks():
            got += chunk
    assert bytes(got) == body


async def test_qpack_dynamic_table(edge: Agent, certs: CertBundle) -> None:
    headers = [("x-repeated-header", "a value long enough to be worth indexing in the table")]
    async with client(edge, certs) as c:
        for i in range(4):
            assert (await c.request("GET", f"/qpack/{i}", headers)).status == 200
        stats = c.qpack_stats()
    # the agent advertised a dynamic table and we inserted into it; it acknowledged (decoder stream)
    assert stats["encoder_bytes_sent"] > 0
    assert stats["decoder_bytes_received"] > 0


async def test_large_client_hello(edge: Agent, certs: CertBundle) -> None:
    padding = tuple(f"x-pad-{i}-{'a' * 40}" for i in range(80))  # ~4 KB of ALPN: several Initial packets
    async with client(edge, certs, alpn=(*padding, "h3")) as c:
        r = await c.request("GET", "/big-hello")
        assert c.alpn == "h3"
    assert r.status == 200


def test_version_negotiation(edge: Agent) -> None:
    """An Initial with an unknown version gets a Version Negotiation packet listing QUIC v1."""
    dcid, scid = os.urandom(8), os.urandom(8)
    packet = bytes([0xC0]) + bytes.fromhex("1a2a3a4a") + bytes([8]) + dcid + bytes([8]) + scid
    packet += b"\x00" * (1200 - len(packet))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(packet, ("127.0.0.1", edge.port("quic")))
        data, _ = sock.recvfrom(2048)
    assert data[0] & 0x80, "not a long header packet"
    assert data[1:5] == b"\x00\x00\x00\x00", "not a Version Negotiation packet"
    # DCID/SCID are echoed swapped; then the supported versions
    assert data[5] == 8
    assert data[6:14] == scid
    assert data[14] == 8
    assert data[15:23] == dcid
    versions = [data[i : i + 4] for i in range(23, len(data), 4)]
    assert b"\x00\x00\x00\x01" in versions


# ================================================================================== Retry
async def test_retry_with_a_token_key_that_survives_restarts(
    agent: Any, certs: CertBundle, h2_server: H2Server, tmp_path: Any
) -> None:
    key_file = tmp_path / "quic-retry.key"
    quic_options = {"retry": True, "retry_token_key_file": str(key_file)}
    config = C.bootstrap(
        [C.quic_listener("quic", C.hcm("h3r", [C.route("/", "h2")]), certs, quic_options=quic_options)],
        [C.cluster("h2", h2_server.port, http2=True)],
    )
    first = agent(config, name="retry1")
    async with client(first, certs) as c:
        assert (await c.request("GET", "/after-retry")).status == 200
    await first.await_stat("http.h3r.quic.retry_sent", 1)
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_bytes()
    assert key
    first.stop()
    second = agent(config, name="retry2")
    async with client(second, certs) as c:
        assert (await c.request("GET", "/after-restart")).status == 200
    await second.await_stat("http.h3r.quic.retry_sent", 1)
    assert key_file.read_bytes() == key  # the same key: tokens issued before the restart stay valid
