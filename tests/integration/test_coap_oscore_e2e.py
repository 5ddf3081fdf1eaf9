"""OSCORE end to end: aiocoap's client with an OSCORE context against a live agent's CoAP listener, routed to
a real HTTP/2 upstream. Covers the Echo round after start, the protected request/response, RBAC on the
context name, a client with the wrong key, a plain request with ``require: true``, and the redacted dump."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiocoap  # type: ignore[import-untyped]
import pytest
from aiocoap import oscore
from peers.agent import Agent
from peers.configs import bootstrap, cluster, filter_rbac, router_filter, socket_address
from peers.h2_server import H2Server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SECRET = "0102030405060708090a0b0c0d0e0f10"
SALT = "9e7ca92223786340"
COAP_TYPE = "type.googleapis.com/microenvoy.extensions.filters.network.coap_proxy.v1.CoapProxy"


def _contexts() -> list[dict[str, Any]]:
    return [
        {
            "name": "sensor-17",
            "sender_id": "01",
            "recipient_id": "00",
            "master_secret": SECRET,
            "master_salt": SALT,
        },
        {
            "name": "sensor-99",
            "sender_id": "01",
            "recipient_id": "09",
            "master_secret": SECRET,
            "master_salt": SALT,
        },
    ]


def _config(upstream_port: int, state_dir: Path, *, require: bool = True) -> dict[str, Any]:
    rbac = filter_rbac(
        "ALLOW",
        {
            "sensor-17 writes": {
                "permissions": [{"url_path": {"path": {"prefix": "/sensors/"}}}],
                "principals": [{"authenticated": {"principal_name": {"exact": "sensor-17"}}}],
            },
            "anyone reads": {
                "permissions": [{"url_path": {"path": {"prefix": "/public/"}}}],
                "principals": [{"any": True}],
            },
        },
    )
    coap = {
        "name": "microenvoy.filters.network.coap_proxy",
        "typed_config": {
            "@type": COAP_TYPE,
            "stat_prefix": "dev",
            "routes": [
                {
                    "name": "observed",
                    "match": {"prefix": "/public/obs/"},
                    "route": {"cluster": "up", "timeout": "5s"},
                    "observe": {"mode": "poll", "interval": "0.2s"},
                },
                {"name": "all", "match": {"prefix": "/"}, "route": {"cluster": "up", "timeout": "5s"}},
            ],
            "http_filters": [rbac, router_filter()],
            "oscore": {"require": require, "state_dir": str(state_dir), "contexts": _contexts()},
        },
    }
    listener = {
        "name": "coap",
        "address": socket_address(0, protocol="UDP"),
        "filter_chains": [{"filters": [coap]}],
    }
    return bootstrap([listener], [cluster("up", upstream_port, http2=True)])


def _client_context(basedir: Path, sender_id: str, secret: str = SECRET) -> Any:
    basedir.mkdir(parents=True)
    settings = {"sender-id_hex": sender_id, "recipient-id_hex": "01", "secret_hex": secret, "salt_hex": SALT}
    (basedir / "settings.json").write_text(json.dumps(settings))
    return oscore.FilesystemSecurityContext(str(basedir))


ClientFactory = Callable[..., Any]


@pytest.fixture
async def coap_client(tmp_path: Path) -> AsyncIterator[ClientFactory]:
    """``await coap_client(agent, sender_id, secret=SECRET)`` -> an aiocoap client context using OSCORE for
    ``coap://127.0.0.1:<port>/*``; all are shut down (and their context files released) afterwards."""
    made: list[tuple[Any, Any]] = []

    async def make(agent: Agent, sender_id: str, secret: str = SECRET) -> Any:
        ctx = await aiocoap.Context.create_client_context()
        sec = _client_context(tmp_path / f"client-{len(made)}", sender_id, secret)
        ctx.client_credentials[f"coap://127.0.0.1:{agent.port('coap')}/*"] = sec
        made.append((ctx, sec))
        return ctx

    yield make
    for ctx, sec in made:
        await ctx.shutdown()
        sec._destroy()


def _uri(agent: Agent, path: str) -> str:
    return f"coap://127.0.0.1:{agent.port('coap')}{path}"


async def _request(ctx: Any, code: Any, uri: str, payload: bytes = b"") -> Any:
    return await ctx.request(aiocoap.Message(code=code, uri=uri, payload=payload)).response


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "oscore-state"
    d.mkdir()
    return d


async def test_protected_request_is_routed_and_answered(
    agent: Callable[..., Agent], h2_server: H2Server, coap_client: ClientFactory, state_dir: Path
) -> None:
    a = agent(_config(h2_server.port, state_dir))
    ctx = await coap_client(a, "00")
    resp = await _request(ctx, aiocoap.POST, _uri(a, "/sensors/t1"), b"21.5")
    assert resp.code == aiocoap.CHANGED, resp
    echo = json.loads(resp.payload)
    assert echo["method"] == "POST"
    assert echo["path"] == "/sensors/t1"
    assert echo["body_length"] == 4
    # The response came back OSCORE-protected and verified by the client's context.
    assert isinstance(resp.remote, aiocoap.transports.oscore.OSCOREAddress)
    assert a.stat("coap.dev.oscore_ok") >= 1
    # A never-used context under state_dir starts with an empty replay window: no Echo round was needed.
    assert a.stat("coap.dev.oscore_replay") == 0
    # A second request in the same session works too (a fresh sequence number each time).
    resp = await _request(ctx, aiocoap.GET, _uri(a, "/public/x"))
    assert resp.code == aiocoap.CONTENT
    assert json.loads(resp.payload)["path"] == "/public/x"


async def test_restart_costs_one_echo_round(
    agent: Callable[..., Agent], h2_server: H2Server, coap_client: ClientFactory, state_dir: Path
) -> None:
    first = agent(_config(h2_server.port, state_dir), name="first")
    ctx = await coap_client(first, "00")
    assert (await _request(ctx, aiocoap.GET, _uri(first, "/public/a"))).code == aiocoap.CONTENT
    first.stop()
    # The same state_dir: the agent's sequence numbers continue, the device's replay window is unknown.
    second = agent(_config(h2_server.port, state_dir), name="second")
    ctx2 = await coap_client(second, "00")
    resp = await _request(ctx2, aiocoap.GET, _uri(second, "/public/b"))
    assert resp.code == aiocoap.CONTENT  # aiocoap answered the 4.01 + Echo and repeated the request
    assert second.stat("coap.dev.oscore_replay") == 1
    assert second.stat("coap.dev.oscore_ok") == 1
    assert h2_server.count("/public/b") == 1  # the challenged request never reached the upstream


async def test_rbac_sees_the_context_name(
    agent: Callable[..., Agent], h2_server: H2Server, coap_client: ClientFactory, state_dir: Path
) -> None:
    a = agent(_config(h2_server.port, state_dir))
    other = await coap_client(a, "09")  # sensor-99: valid OSCORE, but not allowed to write /sensors/
    resp = await _request(other, aiocoap.POST, _uri(a, "/sensors/t9"), b"1")
    assert resp.code == aiocoap.FORBIDDEN
    assert isinstance(resp.remote, aiocoap.transports.oscore.OSCOREAddress)  # the 4.03 is protected too
    assert h2_server.count("/sensors/t9") == 0


async def test_wrong_key_is_refused_and_never_routed(
    agent: Callable[..., Agent], h2_server: H2Server, coap_client: ClientFactory, state_dir: Path
) -> None:
    a = agent(_config(h2_server.port, state_dir))
    bad = await coap_client(a, "00", secret="ff" * 16)
    with pytest.raises(aiocoap.error.Error):
        # The agent answers an unprotected 4.00, which the OSCORE client cannot accept as a response.
        await _request(bad, aiocoap.POST, _uri(a, "/sensors/wrong-key"), b"x")
    a.wait_stat("coap.dev.oscore_decrypt_failed", 1)
    assert h2_server.count("/sensors/wrong-key") == 0


async def test_plain_request_refused_when_required(
    agent: Callable[..., Agent], h2_server: H2Server, state_dir: Path
) -> None:
    a = agent(_config(h2_server.port, state_dir))
    ctx = await aiocoap.Context.create_client_context()
    try:
        resp = await _request(ctx, aiocoap.GET, _uri(a, "/public/plain"))
    finally:
        await ctx.shutdown()
    assert resp.code == aiocoap.UNAUTHORIZED
    assert a.stat("coap.dev.oscore_required") == 1
    assert h2_server.count("/public/plain") == 0


async def test_config_dump_redacts_the_master_secret(
    agent: Callable[..., Agent], h2_server: H2Server, state_dir: Path
) -> None:
    a = agent(_config(h2_server.port, state_dir))
    dump = a.config_dump()
    assert SECRET not in dump
    assert "master_secret" in dump
    assert SECRET not in a.log_text()


async def test_observe_notifications_are_protected(
    agent: Callable[..., Agent], h2_server: H2Server, coap_client: ClientFactory, state_dir: Path
) -> None:
    """Each notification to an OSCORE observer is protected with a fresh sequence number (RFC 8613 §4.1.3.5)
    and verified by the client's context; notifications keep increasing Observe numbers."""
    a = agent(_config(h2_server.port, state_dir))
    ctx = await coap_client(a, "00")
    req = ctx.request(aiocoap.Message(code=aiocoap.GET, uri=_uri(a, "/public/obs/t"), observe=0))
    first = await req.response
    assert first.code == aiocoap.CONTENT
    assert isinstance(first.remote, aiocoap.transports.oscore.OSCOREAddress)
    assert first.opt.observe is not None
    seen = []
    async for note in req.observation:
        assert note.code == aiocoap.CONTENT
        assert isinstance(note.remote, aiocoap.transports.oscore.OSCOREAddress)
        assert json.loads(note.payload)["path"] == "/public/obs/t"
        seen.append(note.opt.observe)
        if len(seen) == 3:
            break
    assert seen == sorted(set(seen))
    assert a.stat("coap.dev.notifications") >= 3
    assert a.stat("coap.dev.oscore_context_unavailable") == 0
