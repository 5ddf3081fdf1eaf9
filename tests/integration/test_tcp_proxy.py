"""HTTP/1.1 and HTTP/2 in over TCP (cleartext and TLS with ALPN), through the real agent, to nginx and the h2
test server (also over upstream TLS and mTLS); h2load against the h2c listener with zero failures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from nginx import big_body
from peers import configs as C
from peers.agent import Agent
from peers.certs import CertBundle
from peers.h1_client import H1Connection, h1_request
from peers.h2_client import H2Client
from peers.h2_server import H2Server, pattern
from peers.h2load import run_h2load

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def mtls_server(certs: CertBundle) -> Iterator[H2Server]:
    """An h2 upstream on TLS that requires a client certificate signed by the test CA."""
    with H2Server(certs=certs, require_client_cert=True) as server:
        yield server


@pytest.fixture(scope="module")
def front(
    module_agent: Any, nginx: Any, h2_server: H2Server, mtls_server: H2Server, certs: CertBundle
) -> Agent:
    routes = [
        C.route("/h1/", "nginx_h1", route_extra={"prefix_rewrite": "/"}),
        C.route("/h2c/", "nginx_h2c", route_extra={"prefix_rewrite": "/"}),
        C.route("/tls-up/", "nginx_tls", route_extra={"prefix_rewrite": "/"}),
        C.route("/mtls/", "h2_mtls", route_extra={"prefix_rewrite": "/"}),
        C.route("/h2/", "h2", route_extra={"prefix_rewrite": "/"}),
        C.route("/", "nginx_h2c"),
    ]
    config = C.bootstrap(
        [
            C.tcp_listener("tcp", C.hcm("tcp", routes)),
            C.tcp_listener("tls", C.hcm("tls", routes), tls=C.downstream_tls(certs, ("h2", "http/1.1"))),
        ],
        [
            C.cluster("nginx_h1", nginx.port),
            C.cluster("nginx_h2c", nginx.h2c_port, http2=True),
            C.cluster("nginx_tls", nginx.tls_port, http2=True, tls_ca=nginx.pki["ca"], sni="localhost"),
            C.cluster(
                "h2_mtls",
                mtls_server.tls_port or 0,
                http2=True,
                tls_ca=certs.ca_cert,
                client_cert=(certs.client_cert, certs.client_key),
            ),
            C.cluster("h2", h2_server.port, http2=True),
        ],
    )
    return module_agent(config, name="front", log_level="info")


# ================================================================================== HTTP/1.1
def test_http1_to_nginx_http1(front: Agent) -> None:
    r = h1_request("127.0.0.1", front.port("tcp"), "GET", "/h1/hello")
    assert r.status == 200
    assert r.body == b"hello from nginx\n"
    assert r.header("x-upstream") == "nginx"
    front.wait_stat("http.tcp.downstream_rq_2xx", 1)
    front.wait_stat("cluster.nginx_h1.upstream_rq_total", 1)


def test_http1_keepalive_and_body(front: Agent) -> None:
    body = pattern(MIB)
    with H1Connection("127.0.0.1", front.port("tcp")) as c:
        r1 = c.request("GET", "/h1/echo-meta")
        r2 = c.request("POST", "/h1/upload", body=body)
        r3 = c.request("GET", "/h2c/echo-meta")
        r4 = c.request("GET", "/h2c/big")
    assert b"proto=HTTP/1.1" in r1.body
    assert r2.body == b"received 1048576\n"
    assert b"proto=HTTP/2.0" in r3.body  # HTTP/1.1 in, HTTP/2 out
    assert r4.body == big_body()


def test_http1_chunked_request_body(front: Agent, h2_server: H2Server) -> None:
    with H1Connection("127.0.0.1", front.port("tcp")) as c:
        r = c.request("POST", "/h2/echo", [("transfer-encoding", "chunked")], b"chunked body")
    assert r.status == 200
    assert r.body == b"chunked body"


# ================================================================================== HTTP/2 cleartext
async def test_h2c_prior_knowledge(front: Agent) -> None:
    async with H2Client("127.0.0.1", front.port("tcp")) as c:
        r = await c.request("GET", "/h2c/echo-meta")
        r1 = await c.request("GET", "/h1/echo-meta")
    assert r.status == 200
    assert b"proto=HTTP/2.0" in r.body
    assert b"proto=HTTP/1.1" in r1.body  # HTTP/2 in, HTTP/1.1 out
    await front.await_stat("http.tcp.downstream_rq_http2_total", 2)


async def test_h2c_multiplexed_requests(front: Agent) -> None:
    async with H2Client("127.0.0.1", front.port("tcp")) as c:
        results = await asyncio.gather(*(c.request("GET", f"/h2/multiplex/{i}") for i in range(40)))
    assert [r.status for r in results] == [200] * 40
    # the agent multiplexed them over its HTTP/2 pool: far fewer upstream connections than requests
    assert len({r.json()["connection_id"] for r in results}) <= 4


async def test_h2c_body_and_trailers(front: Agent, h2_server: H2Server) -> None:
    body = pattern(MIB)
    async with H2Client("127.0.0.1", front.port("tcp")) as c:
        r = await c.request("POST", "/h2/echo", [("te", "trailers")], body, trailers=[("x-sum", "1")])
    assert r.body == body
    assert r.trailer("x-sum") == "1"
    assert r.trailer("x-server-trailer") == "done"


# ================================================================================== TLS + ALPN
async def test_tls_alpn_h2(front: Agent, certs: CertBundle) -> None:
    ctx = certs.client_context(("h2", "http/1.1"))
    async with H2Client("127.0.0.1", front.port("tls"), ssl_context=ctx) as c:
        r = await c.request("GET", "/h1/hello")
        assert c.alpn == "h2"
    assert r.status == 200
    assert r.body == b"hello from nginx\n"
    await front.await_stat("http.tls.downstream_rq_http2_total", 1)


def test_tls_alpn_http11(front: Agent, certs: CertBundle) -> None:
    ctx = certs.client_context(("http/1.1",))
    with H1Connection("127.0.0.1", front.port("tls"), ssl_context=ctx) as c:
        assert c.alpn == "http/1.1"
        r = c.request("GET", "/h2c/echo-meta")
    assert r.status == 200
    assert b"proto=HTTP/2.0" in r.body
    front.wait_stat("http.tls.downstream_rq_http1_total", 1)


def test_tls_without_alpn_is_http11(front: Agent, certs: CertBundle) -> None:
    ctx = certs.client_context(())
    with H1Connection("127.0.0.1", front.port("tls"), ssl_context=ctx) as c:
        assert c.alpn is None
        r = c.request("GET", "/h1/hello")
    assert r.status == 200


def test_x_forwarded_proto_https_over_tls(front: Agent, certs: CertBundle) -> None:
    ctx = certs.client_context(("http/1.1",))
    r = h1_request("127.0.0.1", front.port("tls"), "GET", "/h2/fwd", ssl_context=ctx)
    headers = dict((k, v) for k, v in r.json()["headers"])
    assert headers.get("x-forwarded-proto") == "https"
    assert "127.0.0.1" in headers.get("x-forwarded-for", "")


# ================================================================================== upstream TLS
def test_upstream_tls_alpn_h2_to_nginx(front: Agent) -> None:
    r = h1_request("127.0.0.1", front.port("tcp"), "GET", "/tls-up/echo-meta")
    assert r.status == 200
    assert b"proto=HTTP/2.0" in r.body


def test_upstream_mtls_client_certificate(front: Agent) -> None:
    r = h1_request("127.0.0.1", front.port("tcp"), "GET", "/mtls/who")
    assert r.status == 200
    seen = r.json()
    assert seen["alpn"] == "h2"
    assert seen["peer_subject"]["commonName"] == "client-1"


# ================================================================================== load
def test_h2load_against_h2c_listener(front: Agent) -> None:
    before = front.stat("http.tcp.downstream_rq_2xx")
    r = run_h2load(f"http://127.0.0.1:{front.port('tcp')}/", n=2000, c=10, m=10)
    assert r.failed == 0, r.output
    assert r.errored == 0, r.output
    assert r.timeout == 0, r.output
    assert r.succeeded == 2000, r.output
    assert r.status_2xx == 2000, r.output
    assert front.wait_stat("http.tcp.downstream_rq_2xx", before + 2000) >= before + 2000
