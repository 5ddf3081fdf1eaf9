"""Upstream pools against real peers on loopback: nginx (HTTP/1.1 keep-alive, h2c, TLS + ALPN h2) and an
in-test asyncio h2 server for the exotic cases (REFUSED_STREAM, GOAWAY, flow control, trailers, max concurrent
streams, connection loss, mTLS). Also connect failures, a silent peer, STRICT_DNS and config updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from nginx import BIG_SIZE, CLIENT_URI, SERVER_URI, NginxServer, big_body, make_test_pki, nginx_available

from microenvoy.admin.stats import Store
from microenvoy.config.health_check import HealthCheck, HttpHealthCheck
from microenvoy.config.model import (
    Cluster,
    CommonTlsContext,
    DataSource,
    DownstreamTlsContext,
    Endpoint,
    Http2Options,
    RetryBudget,
    SocketAddress,
    StringMatcher,
    Thresholds,
    TlsCertificate,
    UpstreamTlsContext,
)
from microenvoy.config.outlier import OutlierDetection
from microenvoy.core.headers import Headers
from microenvoy.io import tls
from microenvoy.io.upstream import ClusterManager, UpstreamCluster, UpstreamError, UpstreamStream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(40)]


# ------------------------------------------------------------------------------------------ helpers
def cluster(name: str, port: int, *, http2: bool = False, **kw: Any) -> Cluster:
    return Cluster(
        name,
        endpoints=(Endpoint(SocketAddress("127.0.0.1", port)),),
        upstream_protocol="HTTP2" if http2 else "HTTP1",
        **kw,
    )


def request(path: str, method: str = "GET", *extra: tuple[bytes, bytes]) -> Headers:
    return Headers(
        [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", b"localhost"),
            (b":path", path.encode()),
            *extra,
        ]
    )


async def read_all(s: UpstreamStream) -> tuple[Headers, bytes, Headers | None]:
    head = await s.read_headers()
    body = bytearray()
    trailers = None
    while True:
        chunk = await s.read_body()
        if chunk is None:
            break
        if isinstance(chunk, Headers):
            trailers = chunk
            assert await s.read_body() is None
            break
        body += chunk
    return head, bytes(body), trailers


async def fetch(
    cl: UpstreamCluster,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    *extra: tuple[bytes, bytes],
) -> tuple[int, bytes, Headers | None]:
    host = cl.choose_host()
    assert host is not None
    s = await cl.open_stream(host, request(path, method, *extra), end_stream=body is None)
    if body is not None:
        await s.send_data(body, True)
    head, data, trailers = await read_all(s)
    return int(head.get(b":status") or 0), data, trailers


async def wait_until(cond: Callable[[], bool], within: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)  # polling a condition, not a fixed wait


def stat(store: Store, name: str) -> int:
    v = store.value(name)
    return 0 if v is None else v


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    if not nginx_available():
        pytest.skip("nginx is not installed (the README's test command installs it)")
    srv = NginxServer(tmp_path_factory.mktemp("nginx"), keepalive_requests=1000)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def manager() -> AsyncIterator[Callable[..., ClusterManager]]:
    made: list[ClusterManager] = []

    def make(*clusters: Cluster, store: Store | None = None) -> ClusterManager:
        cm = ClusterManager(list(clusters), store or Store())
        made.append(cm)
        return cm

    yield make
    for cm in made:
        await cm.close()


# ------------------------------------------------------------------------------- in-test h2 server
class H2TestServer:
    """An asyncio HTTP/2 server with scripted behaviour per path.

    ``/echo`` body echo (+ the request's trailers and ``x-server-trailer`` back); ``/hold`` waits for
    ``release()``; ``/answer-early`` answers at once and resets the unfinished request (NO_ERROR);
    ``/refuse`` RST_STREAM REFUSED_STREAM (``/refuse-once``: only the first time); ``/reset``
    RST_STREAM INTERNAL_ERROR; ``/goaway`` GOAWAY with last_stream_id = this stream - 2, at least 0 (earlier
    streams still finish); ``/big/<n>`` n bytes under
    flow control; ``/drop`` headers + some data then the TCP connection is cut; ``/slow`` does not hand
    back flow-control credit for the request body until ``release_slow`` is set; anything else 200 ``ok``.
    """

    def __init__(self, *, max_streams: int = 100, window: int = 65535, sslctx: ssl.SSLContext | None = None):
        self.max_streams = max_streams
        self.window = window
        self.sslctx = sslctx
        self.port = 0
        self.connections = 0
        self.held: list[tuple[Any, int]] = []
        self.big_sent: dict[int, int] = {}
        self.release_slow = asyncio.Event()
        self.slow_received = 0
        self.refused_once = False
        self.peer_sans: list[tuple[str, ...]] = []
        self._server: asyncio.Server | None = None
        self._protos: list[Any] = []

    async def start(self) -> H2TestServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _H2ServerProto(self), "127.0.0.1", 0, ssl=self.sslctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def release(self) -> None:
        held, self.held = self.held, []
        for proto, sid in held:
            proto.respond(sid, 200, b"released")

    async def stop(self) -> None:
        for p in self._protos:
            if p.transport is not None:
                p.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class _H2ServerProto(asyncio.Protocol):
    def __init__(self, server: H2TestServer) -> None:
        self.server = server
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: server.max_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: server.window,
            },
        )
        self.transport: asyncio.Transport | None = None
        self.paths: dict[int, str] = {}
        self.bodies: dict[int, bytearray] = {}
        self.trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.pending: dict[int, bytearray] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections += 1
        self.server._protos.append(self)
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            self.server.peer_sans.append(tls.peer_sans(sslobj))
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            assert self.transport is not None
            self.transport.close()
            return
        for ev in events:
            self.handle(ev)
        self.flush()

    def handle(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            sid = ev.stream_id
            path = dict(ev.headers)[b":path"].decode()
            self.paths[sid] = path
            self.bodies[sid] = bytearray()
            if path == "/refuse" or (path == "/refuse-once" and not self.server.refused_once):
                self.server.refused_once = path == "/refuse-once"
                self.conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            elif path == "/reset":
                self.conn.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            elif path == "/answer-early":  # as nginx's `return`: answer, then stop the request body
                self.conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"5")])
                self.conn.send_data(sid, b"early", end_stream=True)
                self.conn.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)
            elif path == "/goaway":
                self.conn.close_connection(last_stream_id=max(0, sid - 2))
                # h2 refuses to send anything after its own GOAWAY; real servers finish earlier streams.
                self.conn.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
            elif ev.stream_ended is not None:
                self.request_done(sid)
        elif isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id
            self.bodies.setdefault(sid, bytearray()).extend(ev.data)
            if self.paths.get(sid) == "/slow" and not self.server.release_slow.is_set():
                self.server.slow_received += len(ev.data)
                asyncio.get_running_loop().create_task(self.ack_later(sid, ev.flow_controlled_length))
            else:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            if ev.stream_ended is not None:
                self.request_done(sid)
        elif isinstance(ev, h2.events.TrailersReceived):
            self.trailers[ev.stream_id] = list(ev.headers)
            self.request_done(ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            if ev.stream_id in self.paths and not self.stream_was_ended_by(ev):
                self.request_done(ev.stream_id)
        elif isinstance(ev, h2.events.WindowUpdated):
            self.pump()

    def stream_was_ended_by(self, ev: h2.events.StreamEnded) -> bool:
        return getattr(ev, "_handled", False)

    async def ack_later(self, sid: int, n: int) -> None:
        await self.server.release_slow.wait()
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.acknowledge_received_data(n, sid)
        self.flush()

    _done: set[int]

    def request_done(self, sid: int) -> None:
        done = self.__dict__.setdefault("_done", set())
        if sid in done:
            return
        done.add(sid)
        path = self.paths.get(sid, "")
        if path == "/echo":
            body = bytes(self.bodies.get(sid, b""))
            trailers = self.trailers.get(sid)
            self.conn.send_headers(
                sid,
                [(b":status", b"200"), (b"content-length", str(len(body)).encode())]
                if trailers is None
                else [(b":status", b"200")],
            )
            self.pending[sid] = bytearray(body)
            self.pump(
                trailers_for={sid: [*(trailers or []), (b"x-server-trailer", b"done")]} if trailers else None
            )
        elif path == "/hold":
            self.server.held.append((self, sid))
        elif path.startswith("/big/"):
            self.conn.send_headers(sid, [(b":status", b"200")])
            self.pending[sid] = bytearray(b"b" * int(path.split("/")[2]))
            self.server.big_sent[sid] = 0
            self.pump()
        elif path == "/drop":
            self.conn.send_headers(sid, [(b":status", b"200")])
            self.conn.send_data(sid, b"partial")
            self.flush()
            assert self.transport is not None
            self.transport.abort()
        elif path == "/slow":
            self.respond(sid, 200, str(len(self.bodies[sid])).encode())
        else:
            self.respond(sid, 200, b"ok")

    _trailers_for: dict[int, list[tuple[bytes, bytes]]]

    def pump(self, trailers_for: dict[int, list[tuple[bytes, bytes]]] | None = None) -> None:
        tf = self.__dict__.setdefault("_trailers_for", {})
        if trailers_for:
            tf.update(trailers_for)
        for sid, buf in list(self.pending.items()):
            try:
                while buf:
                    n = min(
                        len(buf), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
                    )
                    if n <= 0:
                        break
                    self.conn.send_data(sid, bytes(buf[:n]))
                    if sid in self.server.big_sent:
                        self.server.big_sent[sid] += n
                    del buf[:n]
                if not buf:
                    del self.pending[sid]
                    if sid in tf:
                        self.conn.send_headers(sid, tf.pop(sid), end_stream=True)
                    else:
                        self.conn.end_stream(sid)
            except h2.exceptions.ProtocolError:
                self.pending.pop(sid, None)
        self.flush()

    def respond(self, sid: int, status: int, body: bytes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.send_headers(sid, [(b":status", str(status).encode())])
            self.conn.send_data(sid, body, end_stream=True)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


@pytest.fixture
async def h2server() -> AsyncIterator[Callable[..., Any]]:
    servers: list[H2TestServer] = []

    async def make(**kw: Any) -> H2TestServer:
        srv = await H2TestServer(**kw).start()
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        await s.stop()


# ------------------------------------------------------------------------------------- nginx tests
async def test_http1_keepalive_reuse_and_stats(nginx: NginxServer, manager: Any) -> None:
    store = Store()
    cm = manager(cluster("web", nginx.port), store=store)
    await cm.start()
    cl = cm.get("web")
    for _ in range(5):
        status, body, _ = await fetch(cl, "/hello")
        assert (status, body) == (200, b"hello from nginx\n")
    assert stat(store, "cluster.web.upstream_cx_total") == 1
    assert stat(store, "cluster.web.upstream_cx_http1_total") == 1
    assert stat(store, "cluster.web.upstream_rq_total") == 5
    assert stat(store, "cluster.web.upstream_rq_200") == 5
    assert stat(store, "cluster.web.upstream_rq_2xx") == 5
    assert stat(store, "cluster.web.upstream_rq_active") == 0
    assert stat(store, "cluster.web.upstream_cx_rx_bytes_total") > 0
    assert stat(store, "cluster.web.upstream_cx_tx_bytes_total") > 0
    assert store.histograms["cluster.web.upstream_rq_time"].count == 5
    assert stat(store, "cluster.web.membership_total") == 1
    text = cm.admin_clusters_text()
    assert f"web::127.0.0.1:{nginx.port}::rq_total::5" in text
    assert f"web::127.0.0.1:{nginx.port}::cx_active::1" in text
    assert f"web::127.0.0.1:{nginx.port}::health_flags::healthy" in text
    assert f"web::127.0.0.1:{nginx.port}::weight::1" in text
    js = cm.admin_clusters_json()
    host = js["cluster_statuses"][0]["host_statuses"][0]
    assert host["address"]["socket_address"]["port_value"] == nginx.port
    assert {"name": "rq_total", "value": "5"} in host["stats"]


async def test_http1_translation_chunked_upload_and_status_codes(nginx: NginxServer, manager: Any) -> None:
    store = Store()
    cm = manager(cluster("web", nginx.port), store=store)
    cl = cm.get("web")
    status, body, _ = await fetch(cl, "/echo-meta?x=1")
    assert status == 200
    assert b"method=GET uri=/echo-meta?x=1 host=localhost proto=HTTP/1.1" in body
    status, body, _ = await fetch(cl, "/echo-meta", "POST", b"payload")
    assert b"te=chunked" in body  # no content-length + body -> chunked
    status, body, _ = await fetch(cl, "/echo-meta", "POST", b"payload", (b"content-length", b"7"))
    assert b"cl=7" in body
    assert b"te= " in body
    status, body, _ = await fetch(cl, "/upload", "POST", b"u" * 300_000, (b"content-length", b"300000"))
    assert (status, body) == (200, b"received 300000\n")
    for code in (404, 503, 204):
        status, _, _ = await fetch(cl, f"/status/{code}")
        assert status == code
    assert stat(store, "cluster.web.upstream_rq_404") == 1
    assert stat(store, "cluster.web.upstream_rq_5xx") == 1
    assert stat(store, "cluster.web.upstream_cx_total") == 1  # all on one keep-alive connection


async def test_http1_concurrency_uses_separate_connections_and_keeps_them_idle(
    nginx: NginxServer, manager: Any
) -> None:
    store = Store()
    cm = manager(cluster("web", nginx.port), store=store)
    cl = cm.get("web")
    results = await asyncio.gather(*(fetch(cl, "/hello") for _ in range(6)))
    assert all(r[0] == 200 for r in results)
    assert stat(store, "cluster.web.upstream_cx_total") == 6  # never pipelined
    await asyncio.gather(*(fetch(cl, "/hello") for _ in range(6)))
    assert stat(store, "cluster.web.upstream_cx_total") == 6  # reused from the idle list
    assert stat(store, "cluster.web.upstream_cx_active") == 6


async def test_http1_connection_close_and_keepalive_requests_limit(tmp_path: Path, manager: Any) -> None:
    if not nginx_available():
        pytest.skip("nginx not installed")
    with NginxServer(tmp_path, keepalive_requests=2) as srv:
        store = Store()
        cm = manager(cluster("web", srv.port), store=store)
        cl = cm.get("web")
        for _ in range(5):
            assert (await fetch(cl, "/hello"))[0] == 200
        assert stat(store, "cluster.web.upstream_cx_total") == 3  # nginx said "Connection: close" every 2nd
        assert (await fetch(cl, "/close"))[1] == b"bye\n"
        assert (await fetch(cl, "/hello"))[0] == 200
        assert stat(store, "cluster.web.upstream_rq_rx_reset") == 0


async def test_http1_idle_timeout_closes_pooled_connection(nginx: NginxServer, manager: Any) -> None:
    store = Store()
    cm = manager(cluster("web", nginx.port, idle_timeout=0.2), store=store)
    cl = cm.get("web")
    assert (await fetch(cl, "/hello"))[0] == 200
    assert stat(store, "cluster.web.upstream_cx_active") == 1
    await wait_until(lambda: stat(store, "cluster.web.upstream_cx_active") == 0, what="idle close")
    assert stat(store, "cluster.web.upstream_cx_idle_timeout") == 1
    assert (await fetch(cl, "/hello"))[0] == 200
    assert stat(store, "cluster.web.upstream_cx_total") == 2


async def test_http1_receive_backpressure_bounds_buffering(nginx: NginxServer, manager: Any) -> None:
    cm = manager(cluster("web", nginx.port, per_connection_buffer_limit_bytes=16384))
    cl = cm.get("web")
    host = cl.choose_host()
    s = await cl.open_stream(host, request("/big"), end_stream=True)
    await s.read_headers()
    # Not reading: the socket is paused after the buffer limit; memory stays far below the 1 MiB body.
    await wait_until(lambda: s._buffered > 16384, what="buffer fill")
    await asyncio.sleep(0.2)  # give a runaway reader the chance to buffer everything (it must not)
    assert s._buffered < 600_000
    data = bytearray()
    while (chunk := await s.read_body()) is not None:
        assert isinstance(chunk, bytes)
        data += chunk
    assert len(data) == BIG_SIZE
    assert bytes(data) == big_body()


async def test_h2c_multiplexing_on_one_connection(nginx: NginxServer, manager: Any) -> None:
    store = Store()
    cm = manager(cluster("h2", nginx.h2c_port, http2=True), store=store)
    cl = cm.get("h2")
    results = await asyncio.gather(*(fetch(cl, "/echo-meta") for _ in range(40)))
    assert all(r[0] == 200 and b"proto=HTTP/2.0" in r[1] for r in results)
    assert stat(store, "cluster.h2.upstream_cx_total") == 1
    assert stat(store, "cluster.h2.upstream_cx_http2_total") == 1
    assert stat(store, "cluster.h2.upstream_rq_2xx") == 40
    status, body, _ = await fetch(cl, "/big")
    assert status == 200
    assert body == big_body()
    status, body, _ = await fetch(cl, "/upload", "POST", b"x" * 200_000, (b"content-length", b"200000"))
    assert status == 200


async def test_h2c_receive_flow_control_is_end_to_end(nginx: NginxServer, manager: Any) -> None:
    window = 32768
    cm = manager(
        cluster(
            "h2",
            nginx.h2c_port,
            http2=True,
            http2_protocol_options=Http2Options(initial_stream_window_size=window),
        )
    )
    cl = cm.get("h2")
    host = cl.choose_host()
    s = await cl.open_stream(host, request("/big"), end_stream=True)
    await s.read_headers()
    await wait_until(lambda: s._buffered >= window, what="one window of data")
    await asyncio.sleep(0.2)  # nginx must stop: no WINDOW_UPDATE until we read
    assert s._buffered <= window
    data = bytearray()
    while (chunk := await s.read_body()) is not None:
        assert isinstance(chunk, bytes)
        data += chunk
    assert bytes(data) == big_body()


async def test_tls_h2_with_alpn_sni_and_san_matching(nginx: NginxServer, manager: Any) -> None:
    ca = DataSource(inline=nginx.ca_pem)
    good = UpstreamTlsContext(
        CommonTlsContext(trusted_ca=ca, match_subject_alt_names=(StringMatcher("exact", SERVER_URI),)),
        sni="localhost",
    )
    store = Store()
    cm = manager(
        cluster("tls", nginx.tls_port, http2=True, transport_socket=good),
        cluster("tls1", nginx.tls_port, transport_socket=UpstreamTlsContext(CommonTlsContext(trusted_ca=ca))),
        cluster(
            "badsan",
            nginx.tls_port,
            http2=True,
            transport_socket=UpstreamTlsContext(
                CommonTlsContext(
                    trusted_ca=ca, match_subject_alt_names=(StringMatcher("prefix", "spiffe://other/"),)
                )
            ),
        ),
        cluster(
            "badsni",
            nginx.tls_port,
            http2=True,
            transport_socket=UpstreamTlsContext(CommonTlsContext(trusted_ca=ca), sni="not-this-host.example"),
        ),
        cluster("noca", nginx.tls_port, http2=True, transport_socket=UpstreamTlsContext(CommonTlsContext())),
        store=store,
    )
    status, body, _ = await fetch(cm.get("tls"), "/echo-meta")
    assert status == 200
    assert b"proto=HTTP/2.0" in body
    assert b"host=localhost" in body
    status, body, _ = await fetch(cm.get("tls1"), "/echo-meta")
    assert b"proto=HTTP/1.1" in body  # ALPN http/1.1 for an HTTP1 cluster
    for name in ("badsan", "badsni", "noca"):
        with pytest.raises(UpstreamError) as ei:
            await fetch(cm.get(name), "/")
        assert ei.value.kind == "connect-failure", name
        assert stat(store, f"cluster.{name}.upstream_cx_connect_fail") == 1


# ------------------------------------------------------------------------------ h2 exotic behaviour
async def test_max_concurrent_streams_opens_second_connection(h2server: Any, manager: Any) -> None:
    srv = await h2server(max_streams=2)
    store = Store()
    cm = manager(cluster("h2", srv.port, http2=True), store=store)
    cl = cm.get("h2")
    tasks = [asyncio.create_task(fetch(cl, "/hold")) for _ in range(3)]
    await wait_until(lambda: len(srv.held) == 3, what="3 held requests")
    assert srv.connections == 2
    assert stat(store, "cluster.h2.upstream_cx_total") == 2
    assert stat(store, "cluster.h2.upstream_rq_active") == 3
    srv.release()
    results = await asyncio.gather(*tasks)
    assert [r[:2] for r in results] == [(200, b"released")] * 3
    # both connections stay pooled; two more concurrent requests fit without a new connection
    tasks = [asyncio.create_task(fetch(cl, "/hold")) for _ in range(2)]
    await wait_until(lambda: len(srv.held) == 2, what="2 held")
    srv.release()
    await asyncio.gather(*tasks)
    assert srv.connections == 2


async def test_refused_stream_and_reset_kinds(h2server: Any, manager: Any) -> None:
    srv = await h2server()
    store = Store()
    cm = manager(cluster("h2", srv.port, http2=True), store=store)
    cl = cm.get("h2")
    with pytest.raises(UpstreamError) as ei:
        await fetch(cl, "/refuse")
    assert ei.value.kind == "refused-stream"
    assert stat(store, "cluster.h2.upstream_rq_refused_reissued") == 2  # sent 3 times in all
    with pytest.raises(UpstreamError) as ei:
        await fetch(cl, "/refuse", "POST", b"body")  # a request with a body is never re-sent by the pool
    assert ei.value.kind == "refused-stream"
    assert stat(store, "cluster.h2.upstream_rq_refused_reissued") == 2
    with pytest.raises(UpstreamError) as ei:
        await fetch(cl, "/reset")
    assert ei.value.kind == "reset"
    assert stat(store, "cluster.h2.upstream_rq_rx_reset") == 3
    assert (await fetch(cl, "/refuse-once"))[:2] == (200, b"ok")  # refused once, re-sent transparently
    assert stat(store, "cluster.h2.upstream_rq_refused_reissued") == 3
    assert (await fetch(cl, "/ok"))[0] == 200  # the connection survived stream errors
    assert stat(store, "cluster.h2.upstream_cx_total") == 1
    host = cl.choose_host()
    assert host is not None
    assert host.rq_error == 3


async def test_goaway_refuses_unprocessed_streams_and_finishes_earlier_ones(
    h2server: Any, manager: Any
) -> None:
    srv = await h2server()
    store = Store()
    cm = manager(cluster("h2", srv.port, http2=True), store=store)
    cl = cm.get("h2")
    held = asyncio.create_task(fetch(cl, "/hold"))  # stream 1
    await wait_until(lambda: len(srv.held) == 1, what="held")
    with pytest.raises(UpstreamError) as ei:
        await fetch(cl, "/goaway", "POST", b"x")  # stream 3: GOAWAY(last_stream_id=1)
    assert ei.value.kind == "refused-stream"
    srv.release()
    assert (await held)[:2] == (200, b"released")
    # the draining connection is closed; a new request opens a new one
    assert (await fetch(cl, "/ok"))[0] == 200
    assert srv.connections == 2
    # a headers-only request beyond the GOAWAY is re-sent on a new connection (here it meets GOAWAY again)
    with pytest.raises(UpstreamError) as ei:
        await fetch(cl, "/goaway")
    assert ei.value.kind == "refused-stream"
    assert stat(store, "cluster.h2.upstream_rq_refused_reissued") == 2


async def test_trailers_both_ways_and_request_flow_control(h2server: Any, manager: Any) -> None:
    srv = await h2server(window=1000)
    cm = manager(cluster("h2", srv.port, http2=True))
    cl = cm.get("h2")
    host = cl.choose_host()
    body = bytes(range(256)) * 40  # 10240 bytes: ten times the peer's stream window
    s = await cl.open_stream(host, request("/echo", "POST", (b"te", b"trailers")), end_stream=False)
    await s.send_data(body, False)
    await s.send_trailers(Headers([(b"x-client-trailer", b"yes")]))
    head, data, trailers = await read_all(s)
    assert head.get(b":status") == b"200"
    assert data == body
    assert trailers is not None
    assert trailers.get(b"x-client-trailer") == b"yes"
    assert trailers.get(b"x-server-trailer") == b"done"


async def test_slow_reader_blocks_sender(h2server: Any, manager: Any) -> None:
    srv = await h2server(window=4096)
    cm = manager(cluster("h2", srv.port, http2=True))
    cl = cm.get("h2")
    host = cl.choose_host()
    s = await cl.open_stream(host, request("/slow", "POST"), end_stream=False)
    sender = asyncio.create_task(s.send_data(b"s" * 50_000, True))
    await wait_until(lambda: srv.slow_received >= 4096, what="one window")
    await asyncio.sleep(0.1)
    assert not sender.done()  # blocked on the upstream's flow control, nothing unbounded queued
    assert srv.slow_received <= 65535
    srv.release_slow.set()
    await asyncio.wait_for(sender, 10)
    _head, data, _ = await read_all(s)
    assert data == b"50000"


async def test_connection_lost_mid_response_fails_streams(
    h2server: Any, nginx: NginxServer, manager: Any
) -> None:
    srv = await h2server()
    store = Store()
    cm = manager(cluster("h2", srv.port, http2=True), store=store)
    cl = cm.get("h2")
    host = cl.choose_host()
    other = asyncio.create_task(fetch(cl, "/hold"))
    await wait_until(lambda: len(srv.held) == 1, what="held")
    s = await cl.open_stream(host, request("/drop"), end_stream=True)
    head = await asyncio.wait_for(s.read_headers(), 5)
    assert head.get(b":status") == b"200"
    with pytest.raises(UpstreamError) as ei:
        await asyncio.wait_for(read_all(s), 5)
    assert ei.value.kind == "reset"
    with pytest.raises(UpstreamError) as ei:
        await asyncio.wait_for(other, 5)  # the other stream on that connection fails too, never hangs
    assert ei.value.kind == "reset"
    assert stat(store, "cluster.h2.upstream_cx_destroy") == 1
    assert stat(store, "cluster.h2.upstream_rq_active") == 0


async def test_caller_reset_sends_cancel_and_releases_stream(h2server: Any, manager: Any) -> None:
    srv = await h2server(max_streams=1)
    store = Store()
    cm = manager(cluster("h2", srv.port, http2=True), store=store)
    cl = cm.get("h2")
    host = cl.choose_host()
    s = await cl.open_stream(host, request("/hold"), end_stream=True)
    await wait_until(lambda: len(srv.held) == 1, what="held")
    s.reset()
    s.reset()
    assert stat(store, "cluster.h2.upstream_rq_tx_reset") == 1
    srv.held.clear()
    assert (await fetch(cl, "/ok"))[0] == 200  # the slot was freed: same connection
    assert srv.connections == 1


async def test_h2_buffered_but_unread_data_is_credited_back_on_reset(h2server: Any, manager: Any) -> None:
    srv = await h2server()
    cm = manager(
        cluster(
            "h2",
            srv.port,
            http2=True,
            http2_protocol_options=Http2Options(initial_connection_window_size=65535),
        )
    )
    cl = cm.get("h2")
    host = cl.choose_host()
    for _ in range(4):  # 4 x 60000 unread bytes would exhaust a 64 KiB connection window without credit back
        s = await cl.open_stream(host, request("/big/60000"), end_stream=True)
        await s.read_headers()
        await wait_until(lambda s=s: s._buffered >= 60000 or s.response_complete, what="data")
        s.reset()
    assert (await fetch(cl, "/big/70000"))[1] == b"b" * 70000


# ------------------------------------------------------------------------------------ mTLS upstream
async def test_upstream_mtls_with_inline_client_certificate(
    tmp_path: Path, h2server: Any, manager: Any
) -> None:
    pki = make_test_pki(tmp_path / "pki")
    server_ctx = tls.server_context(
        DownstreamTlsContext(
            CommonTlsContext(
                tls_certificates=(
                    TlsCertificate(
                        DataSource(filename=str(pki["cert"])), DataSource(filename=str(pki["key"]))
                    ),
                ),
                trusted_ca=DataSource(filename=str(pki["ca"])),
            ),
            require_client_certificate=True,
        ),
        ["h2"],
    )
    srv = await h2server(sslctx=server_ctx)
    client_tls = UpstreamTlsContext(
        CommonTlsContext(
            tls_certificates=(
                TlsCertificate(
                    DataSource(inline=pki["client_cert"].read_bytes()),
                    DataSource(inline=pki["client_key"].read_bytes()),
                ),
            ),
            trusted_ca=DataSource(inline=pki["ca"].read_bytes()),
        ),
        sni="localhost",
    )
    no_cert = UpstreamTlsContext(CommonTlsContext(trusted_ca=DataSource(inline=pki["ca"].read_bytes())))
    cm = manager(
        cluster("mtls", srv.port, http2=True, transport_socket=client_tls),
        cluster("nocert", srv.port, http2=True, transport_socket=no_cert),
    )
    assert (await fetch(cm.get("mtls"), "/ok"))[:2] == (200, b"ok")
    assert srv.peer_sans[0] == (CLIENT_URI, "client.microenvoy.test")
    with pytest.raises(UpstreamError) as ei:
        await fetch(cm.get("nocert"), "/ok")
    assert ei.value.kind in (
        "connect-failure",
        "reset",
    )  # TLS 1.3: the rejection may come after the handshake


# ---------------------------------------------------------------------------- failures and timeouts
async def test_closed_port_is_connect_failure_fast(manager: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = Store()
    cm = manager(cluster("dead", port), cluster("dead2", port, http2=True), store=store)
    for name in ("dead", "dead2"):
        start = time.monotonic()
        with pytest.raises(UpstreamError) as ei:
            await fetch(cm.get(name), "/")
        assert ei.value.kind == "connect-failure"
        assert time.monotonic() - start < 1.0
        assert stat(store, f"cluster.{name}.upstream_cx_connect_fail") == 1
        assert stat(store, f"cluster.{name}.upstream_rq_active") == 0
    assert "dead::127.0.0.1" in cm.admin_clusters_text()


async def test_silent_peer_h2_is_connect_timeout_and_h1_stays_pending(manager: Any) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w)  # accept TCP, never answer HTTP

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        store = Store()
        cm = manager(
            cluster("h2", port, http2=True, connect_timeout=0.3),
            cluster("h1", port, connect_timeout=0.3),
            store=store,
        )
        start = time.monotonic()
        with pytest.raises(UpstreamError) as ei:
            await fetch(cm.get("h2"), "/")
        assert ei.value.kind == "connect-timeout"
        assert 0.25 < time.monotonic() - start < 3
        assert stat(store, "cluster.h2.upstream_cx_connect_timeout") == 1
        # a caller cancelled while the connection is being set up does not leave a pending connection behind
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fetch(cm.get("h2"), "/"), 0.05)
        with pytest.raises(UpstreamError) as ei:
            await asyncio.wait_for(fetch(cm.get("h2"), "/"), 5)
        assert ei.value.kind == "connect-timeout"
        # HTTP/1.1: TCP connects, the response never comes; the caller's timeout observes it, reset cleans up
        cl = cm.get("h1")
        s = await cl.open_stream(cl.choose_host(), request("/"), end_stream=True)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(s.read_headers(), 0.3)
        s.reset()
        assert stat(store, "cluster.h1.upstream_rq_tx_reset") == 1
        assert stat(store, "cluster.h1.upstream_rq_active") == 0
        await wait_until(lambda: stat(store, "cluster.h1.upstream_cx_active") == 0, what="h1 closed")
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()


async def test_upstream_closes_before_response_h1(manager: Any) -> None:
    async def rude(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
        await w.drain()
        w.close()

    server = await asyncio.start_server(rude, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        store = Store()
        cm = manager(cluster("h1", port), store=store)
        with pytest.raises(UpstreamError) as ei:
            await asyncio.wait_for(fetch(cm.get("h1"), "/"), 5)
        assert ei.value.kind == "reset"
        assert stat(store, "cluster.h1.upstream_rq_rx_reset") == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_circuit_breaker_overflow(h2server: Any, manager: Any) -> None:
    srv = await h2server()
    store = Store()
    cm = manager(
        cluster(
            "h2", srv.port, http2=True, circuit_breakers=(Thresholds(max_requests=2, track_remaining=True),)
        ),
        store=store,
    )
    cl = cm.get("h2")
    tasks = [asyncio.create_task(fetch(cl, "/hold")) for _ in range(2)]
    await wait_until(lambda: len(srv.held) == 2, what="held")
    assert stat(store, "cluster.h2.circuit_breakers.default.rq_open") == 1
    assert stat(store, "cluster.h2.circuit_breakers.default.remaining_rq") == 0
    with pytest.raises(UpstreamError) as ei:
        await fetch(cl, "/ok")
    assert ei.value.kind == "overflow"
    assert stat(store, "cluster.h2.upstream_rq_pending_overflow") == 1
    srv.release()
    await asyncio.gather(*tasks)
    assert stat(store, "cluster.h2.circuit_breakers.default.rq_open") == 0
    assert stat(store, "cluster.h2.circuit_breakers.default.remaining_rq") == 2


async def test_max_connections_makes_requests_wait_then_serves_them(h2server: Any, manager: Any) -> None:
    """At max_connections a request needing a connection is pending (upstream_cx_overflow) and is served
    as soon as a stream slot frees; it is not failed."""
    srv = await h2server(max_streams=1)
    store = Store()
    cm = manager(
        cluster("h2", srv.port, http2=True, circuit_breakers=(Thresholds(max_connections=1),)), store=store
    )
    cl = cm.get("h2")
    first = asyncio.create_task(fetch(cl, "/hold"))
    await wait_until(lambda: len(srv.held) == 1, what="first held")
    second = asyncio.create_task(fetch(cl, "/ok"))
    await wait_until(lambda: stat(store, "cluster.h2.upstream_cx_overflow") == 1, what="cx overflow")
    assert stat(store, "cluster.h2.upstream_rq_pending_active") == 1
    assert stat(store, "cluster.h2.circuit_breakers.default.cx_open") == 1
    assert not second.done()
    srv.release()
    assert (await first)[0] == 200
    assert (await second)[0] == 200
    assert srv.connections == 1
    assert stat(store, "cluster.h2.upstream_rq_pending_active") == 0


async def test_max_pending_requests_zero_refuses_requests_needing_a_connection(
    nginx: NginxServer, manager: Any
) -> None:
    store = Store()
    cm = manager(
        cluster("h1", nginx.port, circuit_breakers=(Thresholds(max_pending_requests=0),)), store=store
    )
    cl = cm.get("h1")
    with pytest.raises(UpstreamError) as ei:
        await fetch(cl, "/")
    assert ei.value.kind == "overflow"
    assert stat(store, "cluster.h1.upstream_rq_pending_overflow") == 1


async def test_http1_max_connections_evicts_an_idle_connection_of_another_host(
    nginx: NginxServer, manager: Any
) -> None:
    """Two hosts (the same nginx twice), max_connections 1: host B's request closes host A's idle
    keep-alive connection instead of waiting for it forever."""
    store = Store()
    c = Cluster(
        "two",
        endpoints=(
            Endpoint(SocketAddress("127.0.0.1", nginx.port)),
            Endpoint(SocketAddress("127.0.0.1", nginx.port)),
        ),
        circuit_breakers=(Thresholds(max_connections=1),),
    )
    cl = manager(c, store=store).get("two")
    a, b = cl.hosts
    for host in (a, b, a):
        s = await cl.open_stream(host, request("/"), end_stream=True)
        head, _, _ = await read_all(s)
        assert head.get(b":status") == b"200"
    assert cl.connection_count <= 1
    assert stat(store, "cluster.two.upstream_cx_total") == 3


def test_retry_slots_follow_max_retries_and_the_budget() -> None:
    store = Store()
    cl = UpstreamCluster(Cluster("r", circuit_breakers=(Thresholds(max_retries=2),)), store)
    assert cl.retry_begin()
    assert cl.retry_begin()
    assert not cl.retry_begin()
    assert stat(store, "cluster.r.upstream_rq_retry_overflow") == 1
    cl.retry_end()
    assert cl.retry_begin()
    budget = Thresholds(retry_budget=RetryBudget(budget_percent=50.0, min_retry_concurrency=1))
    cl2 = UpstreamCluster(Cluster("b", circuit_breakers=(budget,)), store)
    assert cl2.retry_limit() == 1  # no active requests: the floor
    cl2._rq_active = 10
    assert cl2.retry_limit() == 5


# ------------------------------------------------------------------------------ DNS and config update
async def test_strict_dns_resolves_and_replaces_hosts(
    nginx: NginxServer, manager: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store()
    c = Cluster(
        "dns",
        type="STRICT_DNS",
        endpoints=(Endpoint(SocketAddress("localhost", nginx.port)),),
        dns_lookup_family="V4_ONLY",
        dns_refresh_rate=0.05,
    )
    cm = manager(c, store=store)
    assert cm.get("dns").choose_host() is None  # nothing resolved before start()
    await cm.start()
    cl = cm.get("dns")
    host = cl.choose_host()
    assert host is not None
    assert host.address == ("127.0.0.1", nginx.port)
    assert host.hostname == "localhost"
    assert (await fetch(cl, "/hello"))[0] == 200
    assert stat(store, "cluster.dns.membership_total") == 1
    assert stat(store, "cluster.dns.update_success") >= 1

    loop = asyncio.get_running_loop()
    answers = [("127.0.0.2", "127.0.0.3")]

    async def fake_getaddrinfo(name: str, port: int, **_kw: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[0]]

    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    await wait_until(
        lambda: {h.address[0] for h in cl.hosts} == {"127.0.0.2", "127.0.0.3"}, what="dns change"
    )
    assert stat(store, "cluster.dns.membership_total") == 2
    kept = next(h for h in cl.hosts if h.address[0] == "127.0.0.2")
    answers[0] = ("127.0.0.2",)
    await wait_until(lambda: len(cl.hosts) == 1, what="dns shrink")
    assert cl.hosts[0] is kept  # unchanged addresses keep their Host (stats, pool)


async def test_update_keeps_unchanged_clusters_and_drains_removed(nginx: NginxServer, manager: Any) -> None:
    store = Store()
    a = cluster("a", nginx.port)
    b = cluster("b", nginx.h2c_port, http2=True)
    cm = manager(a, b, store=store)
    ra, rb = cm.get("a"), cm.get("b")
    assert (await fetch(ra, "/hello"))[0] == 200
    assert (await fetch(rb, "/hello"))[0] == 200
    b2 = cluster("b", nginx.h2c_port, http2=True, connect_timeout=1.0)
    cm.update([a, b2])
    assert cm.get("a") is ra
    assert cm.get("b") is not rb
    assert cm.get("b").config == b2
    await wait_until(lambda: rb.connection_count == 0, what="old b drained")
    assert (await fetch(cm.get("b"), "/hello"))[0] == 200
    cm.update([b2])
    assert cm.get("a") is None
    await wait_until(lambda: ra.connection_count == 0, what="removed a drained")
    assert "a::" not in cm.admin_clusters_text()


async def test_update_drains_busy_connection_after_its_request(h2server: Any, manager: Any) -> None:
    srv = await h2server()
    c = cluster("h", srv.port, http2=True)
    cm = manager(c)
    old = cm.get("h")
    task = asyncio.create_task(fetch(old, "/hold"))
    await wait_until(lambda: len(srv.held) == 1, what="held")
    cm.update([])
    assert old.connection_count == 1  # busy: kept until its stream ends
    srv.release()
    assert (await task)[:2] == (200, b"released")
    await wait_until(lambda: old.connection_count == 0, what="drained after the request")


async def test_response_complete_only_when_nothing_is_left_to_read(
    h2server: Any, nginx: NginxServer, manager: Any
) -> None:
    srv = await h2server()
    cm = manager(cluster("h2", srv.port, http2=True), cluster("h1", nginx.port))
    for name, path in (("h2", "/ok"), ("h1", "/hello")):
        cl = cm.get(name)
        s = await cl.open_stream(cl.choose_host(), request(path), end_stream=True)
        await s.read_headers()
        await wait_until(lambda s=s: s._response_ended, what="response end")
        assert not s.response_complete  # the body is buffered, not read yet
        assert await s.read_body()
        assert await s.read_body() is None
        assert s.response_complete
    s = await cm.get("h1").open_stream(cm.get("h1").choose_host(), request("/status/204"), end_stream=True)
    await s.read_headers()
    assert s.response_complete


async def test_complete_response_survives_a_reset_of_the_request_side(h2server: Any, manager: Any) -> None:
    """RFC 9113 section 8.1: a server may answer before the request body ended, then RST_STREAM(NO_ERROR).
    The buffered response must still reach the reader, even when the reset was processed first."""
    srv = await h2server()
    cm = manager(cluster("h2", srv.port, http2=True))
    cl = cm.get("h2")
    host = cl.choose_host()
    assert host is not None
    s = await cl.open_stream(host, request("/answer-early", "POST"), end_stream=False)
    await asyncio.wait_for(_until(lambda: s._response_ended), 5)  # type: ignore[attr-defined]
    conn = s._conn  # type: ignore[attr-defined]
    await asyncio.wait_for(_until(lambda: s.stream_id not in conn.streams), 5)  # the reset arrived too
    head, data, _ = await read_all(s)
    assert head.get(b":status") == b"200"
    assert data == b"early"
    await s.send_data(b"rest of the body", True)  # dropped quietly, no error


async def _until(cond: Any) -> None:
    """Poll a condition on the loop (bounded by the caller's wait_for)."""
    while not cond():  # noqa: ASYNC110 - the state lives in the pool, there is no event to wait on
        await asyncio.sleep(0.005)


# -------------------------------------------------------------------------------------------- warming
def _hc(path: str = "/") -> HealthCheck:
    return HealthCheck(
        timeout=1.0,
        interval=0.05,
        unhealthy_threshold=1,
        healthy_threshold=1,
        no_traffic_interval=0.05,
        http_health_check=HttpHealthCheck(path=path),
    )


async def test_start_waits_for_the_first_health_check_round(nginx: NginxServer, manager: Any) -> None:
    cm = manager(cluster("hc", nginx.port, health_checks=(_hc(),)))
    await asyncio.wait_for(cm.start(), 10)
    cl = cm.get("hc")
    assert cl.warmed is not None
    assert cl.warmed.done()
    assert [h.healthy for h in cl.hosts] == [True]


async def test_changed_cluster_serves_only_once_warm(nginx: NginxServer, manager: Any) -> None:
    """The old runtime keeps serving until the replacement's first health-check round is over; a dead
    replacement host is then known to be unhealthy before any request reaches it."""
    store = Store()
    cm = manager(cluster("w", nginx.port), store=store)
    await cm.start()
    old = cm.get("w")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers: the check can only time out
    try:
        slow_hc = dataclasses.replace(_hc(), timeout=0.5)
        cm.update([cluster("w", silent.getsockname()[1], health_checks=(slow_hc,))])
        assert cm.get("w") is old  # warming: still the old one
        assert (await fetch(old, "/"))[0] == 200
        await wait_until(lambda: cm.get("w") is not old, what="the warm cluster to take over")
        new = cm.get("w")
        assert [h.healthy for h in new.hosts] == [False]
        assert old.draining
    finally:
        silent.close()


async def test_new_cluster_name_is_unknown_until_warm(nginx: NginxServer, manager: Any) -> None:
    cm = manager(cluster("a", nginx.port))
    await cm.start()
    cm.update([cluster("a", nginx.port), cluster("b", nginx.port, health_checks=(_hc(),))])
    assert cm.get("b") is None
    await wait_until(lambda: cm.get("b") is not None, what="cluster b to warm")
    assert cm.get("a") is not None


async def test_immediate_health_check_fail_header_on_traffic_fails_the_host(
    tmp_path: Path, manager: Any
) -> None:
    if not nginx_available():
        pytest.skip("nginx is not installed")
    srv = NginxServer(
        tmp_path, locations={"/bye": "add_header x-envoy-immediate-health-check-fail true; return 200 'bye';"}
    )
    srv.start()
    try:
        store = Store()
        slow = dataclasses.replace(_hc(), interval=30.0, no_traffic_interval=30.0)
        cm = manager(cluster("p", srv.port, health_checks=(slow,)), store=store)
        await cm.start()
        cl = cm.get("p")
        assert [h.healthy for h in cl.hosts] == [True]
        assert (await fetch(cl, "/bye"))[0] == 200
        assert [h.healthy for h in cl.hosts] == [False]
        assert stat(store, "cluster.p.health_check.passive_failure") == 1
    finally:
        srv.stop()


# ------------------------------------------------------------------------------- outlier detection inputs
async def test_upstream_reset_counts_against_the_host_but_our_own_reset_does_not(
    h2server: Any, manager: Any
) -> None:
    srv = await h2server()
    od = OutlierDetection(consecutive_5xx=1, interval=60.0)
    cm = manager(cluster("od", srv.port, http2=True, outlier_detection=od))
    await cm.start()
    cl = cm.get("od")
    (host,) = cl.hosts
    s = await cl.open_stream(host, request("/hold"), end_stream=True)
    await wait_until(lambda: len(srv.held) == 1, what="held")
    s.reset()  # the caller gives up (timeout, client gone): not the host's fault
    assert not host.ejected
    with pytest.raises(UpstreamError):
        await fetch(cl, "/reset")  # the upstream resets the stream: a gateway failure
    assert host.ejected


async def test_changed_strict_dns_cluster_takes_over_only_with_its_hosts(
    nginx: NginxServer, manager: Any
) -> None:
    cm = manager(cluster("d", nginx.port))
    await cm.start()
    old = cm.get("d")
    dns = Cluster(
        "d",
        type="STRICT_DNS",
        endpoints=(Endpoint(SocketAddress("localhost", nginx.port)),),
        dns_lookup_family="V4_ONLY",
    )
    cm.update([dns])
    assert cm.get("d") is old  # not resolved yet: the old one serves
    await wait_until(lambda: cm.get("d") is not old, what="the resolved cluster to take over")
    new = cm.get("d")
    assert [h.address for h in new.hosts] == [("127.0.0.1", nginx.port)]
    assert (await fetch(new, "/"))[0] == 200
