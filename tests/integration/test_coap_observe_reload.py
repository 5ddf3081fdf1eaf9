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

from microenvoy.codecs.coap.message import CON, Message, Opt

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
