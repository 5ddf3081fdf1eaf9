"""CoAP Observe refreshed by ETag polling against nginx (304s are not notifications, a change is, a 404 ends
the observation), and a coap_proxy listener reloaded in place (same socket, new routes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from nginx import NginxServer
from peers import configs as C
from peers.agent import Agent
from peers.coap import RawCoap, coap_listener, coap_route
from peers.common import wait_for

from microenvoy.codecs.coap.message import ACK, CON, NON, RST, Message, Opt

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

GET = 1
CONTENT, NOT_FOUND = 0x45, 0x84


@pytest.fixture
def static(tmp_path: Path) -> Iterator[NginxServer]:
    with NginxServer(tmp_path / "nginx", locations={"/files/": "default_type application/json;"}) as server:
        files = server.root / "html" / "files"
        files.mkdir(parents=True, exist_ok=True)
        (files / "t.json").write_bytes(b'{"t": 1}')
        yield server


def _observe(c: RawCoap, path: str) -> Message:
    return c.request(GET, path, options=[(Opt.OBSERVE, b"")])


def _next_notification(c: RawCoap, token: bytes, timeout: float = 5.0) -> Message:
    msg = c.recv_until(lambda m: m.token == token and m.code != 0, timeout)
    if msg.mtype == CON:
        c.ack(msg)
    return msg


def test_poll_revalidates_with_the_upstream_etag(agent: object, static: NginxServer) -> None:
    routes = [
        coap_route("/s/", "files", route_extra={"prefix_rewrite": "/files/"}, observe={"interval": "0.1s"})
    ]
    a: Agent = agent(C.bootstrap([coap_listener(routes)], [C.cluster("files", static.port)]))  # type: ignore[operator]
    target = static.root / "html" / "files" / "t.json"
    with RawCoap(a.port("coap")) as c:
        first = _observe(c, "/s/t.json")
        assert first.code == CONTENT
        assert first.payload == b'{"t": 1}'
        assert first.has(Opt.OBSERVE)
        # Unchanged: every later poll carries nginx's ETag and gets a 304, which is not a notification.
        a.wait_stat("http.coap.downstream_rq_3xx", lambda n: n >= 5)
        assert a.stat("coap.coap.notifications") == 0
        # Changed (new size, so a new ETag): one notification with the new representation.
        target.write_bytes(b'{"t": 22}')
        note = _next_notification(c, first.token)
        assert note.code == CONTENT
        assert note.payload == b'{"t": 22}'
        assert note.uint(Opt.OBSERVE) > first.uint(Opt.OBSERVE)  # type: ignore[operator]
        # Gone: the 4.04 goes to the observer without Observe and ends the observation (RFC 7641 §4.2).
        target.unlink()
        end = _next_notification(c, first.token)
        assert end.code == NOT_FOUND
        assert not end.has(Opt.OBSERVE)
        a.wait_stat("coap.coap.observed_resources", 0)
        a.wait_stat("coap.coap.observers", 0)
        polls = a.stat("coap.coap.observe_refresh")
        reply = c.request(GET, "/s/missing")  # the agent still serves; the ended resource polls no more
        assert reply.code == NOT_FOUND
        assert a.stat("coap.coap.observe_refresh") == polls


def test_reload_keeps_the_socket_and_applies_new_routes(agent: object, h2_server: object) -> None:
    port_up = h2_server.port  # type: ignore[attr-defined]
    clusters = [C.cluster("up", port_up, http2=True)]
    config = C.bootstrap([coap_listener([coap_route("/old/")])], clusters)
    a: Agent = agent(config)  # type: ignore[operator]
    port = a.port("coap")
    with RawCoap(port) as c:
        assert c.request(GET, "/old/x").code == CONTENT
        assert c.request(GET, "/new/x").code == NOT_FOUND
        a.reload(C.bootstrap([coap_listener([coap_route("/new/")])], clusters))
        wait_for(lambda: c.request(GET, "/new/x").code == CONTENT, 10, message="new route live")
        assert c.request(GET, "/old/x").code == NOT_FOUND
    assert a.port("coap") == port


def test_non_with_unknown_critical_option_is_rejected_and_no_response_honoured(
    agent: object, h2_server: object
) -> None:
    """RFC 7252 §5.4.1 (a NON request with an unrecognized critical option is rejected: RST, nothing routed)
    and RFC 7967 No-Response (a suppressed class: a CON gets only its empty ACK, a NON nothing)."""
    clusters = [C.cluster("up", h2_server.port, http2=True)]  # type: ignore[attr-defined]
    a: Agent = agent(C.bootstrap([coap_listener([coap_route("/")])], clusters))  # type: ignore[operator]
    with RawCoap(a.port("coap")) as c:
        bad = c.message(GET, "/nr/bad", mtype=NON, options=[(9999, b"x")])
        c.send(bad)
        rst = c.recv_until(lambda m: m.mid == bad.mid)
        assert (rst.mtype, rst.code) == (RST, 0)
        assert h2_server.count("/nr/bad") == 0  # type: ignore[attr-defined]
        # No-Response 2 (not interested in 2.xx): a CON gets an empty ACK only, upstream still sees it.
        quiet = c.message(GET, "/nr/quiet", options=[(Opt.NO_RESPONSE, b"\x02")])
        c.send(quiet)
        ack = c.recv_until(lambda m: m.mid == quiet.mid)
        assert (ack.mtype, ack.code) == (ACK, 0)
        assert h2_server.count("/nr/quiet") == 1  # type: ignore[attr-defined]
        # No-Response 16 (not interested in 5.xx) does not hide a 2.05.
        loud = c.request(GET, "/nr/loud", options=[(Opt.NO_RESPONSE, b"\x10")])
        assert loud.code == CONTENT
        # A NON whose answer is suppressed gets nothing: the next ping's RST is the first thing back.
        c.send(c.message(GET, "/nr/quiet2", mtype=NON, options=[(Opt.NO_RESPONSE, b"\x02")]))
        a.wait_stat("coap.coap.no_response", 2)  # served and suppressed
        ping = Message(CON, 0, c.next_mid())
        c.send(ping)
        first = c.recv(3.0)
        assert (first.mtype, first.mid) == (RST, ping.mid), first
        assert a.stat("coap.coap.rejected") == 1


def test_draining_listener_answers_5_03(agent: object, h2_server: object) -> None:
    clusters = [C.cluster("up", h2_server.port, http2=True)]  # type: ignore[attr-defined]
    a: Agent = agent(C.bootstrap([coap_listener([coap_route("/")])], clusters))  # type: ignore[operator]
    with RawCoap(a.port("coap")) as c:
        assert c.request(GET, "/before-drain").code == CONTENT
        status, _ = a.admin_post("/drain_listeners?graceful")
        assert status == 200

        attempts = [0]

        def refused() -> bool:  # the admin drain is asynchronous: the first requests may still pass
            attempts[0] += 1
            reply = c.request(GET, f"/during-drain/{attempts[0]}")
            return reply.code == 0xA3 and reply.uint(Opt.MAX_AGE) == 1

        wait_for(refused, 10, message="5.03 while draining")
    assert h2_server.count(f"/during-drain/{attempts[0]}") == 0  # type: ignore[attr-defined]
