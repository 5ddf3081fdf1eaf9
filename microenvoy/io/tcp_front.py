"""TCP listeners speaking HTTP/1.1 and HTTP/2 (h2c prior knowledge, or TLS with ALPN).

One ``TcpHttpConnection`` (an asyncio protocol) per accepted connection picks its codec once:

* TLS: ALPN ``h2`` -> HTTP/2, anything else -> HTTP/1.1;
* cleartext: ``codec_type`` HTTP1/HTTP2, or AUTO which sniffs the HTTP/2 connection preface
  (RFC 9113 section 3.4).

It feeds bytes to the codec, turns request events into ``ActiveStream`` exchanges, and implements the
``DownstreamConnection`` side: response bytes go out as the peer's HTTP/2 windows and the socket's write
buffer allow; HTTP/1.1 reading pauses while request bytes wait for a slow upstream (``per_connection_
buffer_limit_bytes``). The connection closes after ``idle_timeout`` without streams, and on drain it sends
GOAWAY (HTTP/2) or ``Connection: close`` (HTTP/1.1) and closes once its streams finish.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from microenvoy.codecs.http1 import Http1ServerCodec
from microenvoy.codecs.http2 import Http2ServerCodec
from microenvoy.core.events import (
    ConnectionTerminated,
    DataReceived,
    HeadersReceived,
    ProtocolFailure,
    StreamReset,
    TrailersReceived,
    WindowOpened,
)
from microenvoy.core.exchange import DownstreamInfo
from microenvoy.core.headers import Headers
from microenvoy.io.http_front import ActiveStream, HttpFront

if TYPE_CHECKING:
    from microenvoy.admin.stats import Scope
    from microenvoy.io.mqtt_front import MqttConnection, MqttFront

__all__ = ["FilterChainRuntime", "ListenerStats", "TcpHttpConnection", "TcpListener"]

log = logging.getLogger("microenvoy.listener")

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class ListenerStats:
    """``listener.<address>.`` counters shared by TCP and QUIC listeners."""

    def __init__(self, scope: Scope) -> None:
        self.cx_total = scope.counter("downstream_cx_total")
        self.cx_active = scope.gauge("downstream_cx_active")
        self.cx_destroy = scope.counter("downstream_cx_destroy")
        self.cx_overflow = scope.counter("downstream_cx_overflow")
        self.cx_transport_error = scope.counter("downstream_cx_transport_socket_connect_timeout")
        self.cx_tls_error = scope.counter("ssl.connection_error")


class TcpHttpConnection(asyncio.Protocol):
    """One downstream TCP connection (HTTP/1.1 or HTTP/2)."""

    def __init__(self, listener: TcpListener) -> None:
        self.listener = listener
        self.front: HttpFront = listener.front
        self.transport: asyncio.Transport | None = None
        self.codec: Http1ServerCodec | Http2ServerCodec | None = None
        self.downstream: DownstreamInfo
        self.streams: dict[int, ActiveStream] = {}
        self._sniff = b""
        self._paused_writing = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._window_waiters: list[asyncio.Future[None]] = []
        self._reading_paused = False
        self._idle_handle: asyncio.TimerHandle | None = None
        self._draining = False
        self._drain_close_idle = True
        self._closed = False
        self._counted = False
        self._flush_scheduled = False

    def __repr__(self) -> str:
        return f"<TcpHttpConnection {self.codec!r} streams={len(self.streams)}>"

    # ----------------------------------------------------------------------- asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)
        lst = self.listener
        if lst.max_connections is not None and len(lst.connections) >= lst.max_connections:
            lst.stats.cx_overflow.inc()
            self.transport.abort()
            self._closed = True
            return
        sslobj = transport.get_extra_info("ssl_object")
        self.front = lst.front_for(sslobj)
        lst.connections.add(self)
        self._counted = True
        lst.stats.cx_total.inc()
        lst.stats.cx_active.inc()
        self.front.stats.cx_total.inc()
        self.front.stats.cx_active.inc()
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        tls = sslobj is not None
        sans: tuple[str, ...] = ()
        sni = None
        if sslobj is not None:
            from microenvoy.io.tls import peer_sans

            sans = peer_sans(sslobj)
            sni = lst.sni_of(sslobj)
        self.downstream = DownstreamInfo(
            "HTTP/1.1", (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1])),
            lst.name, tls, sni, sans,
        )  # fmt: skip
        cfg = self.front.config
        if sslobj is not None:
            self._set_codec(sslobj.selected_alpn_protocol() == "h2")
        elif cfg.codec_type == "HTTP2":
            self._set_codec(True)
        elif cfg.codec_type == "HTTP1":
            self._set_codec(False)
        self._arm_idle()

    def _set_codec(self, http2: bool) -> None:
        cfg = self.front.config
        tls = self.downstream.tls
        if http2:
            o = cfg.http2_protocol_options
            self.codec = Http2ServerCodec(
                tls=tls,
                max_concurrent_streams=o.max_concurrent_streams,
                initial_stream_window_size=o.initial_stream_window_size,
                initial_connection_window_size=o.initial_connection_window_size,
                max_header_bytes=cfg.max_request_headers_kb * 1024,
                max_headers_count=cfg.max_headers_count,
            )
            self.front.stats.cx_http2.inc()
            proto = "HTTP/2"
        else:
            self.codec = Http1ServerCodec(
                tls=tls,
                max_header_bytes=cfg.max_request_headers_kb * 1024,
                max_headers_count=cfg.max_headers_count,
            )
            self.front.stats.cx_http1.inc()
            proto = "HTTP/1.1"
        d = self.downstream
        self.downstream = DownstreamInfo(
            proto, d.remote_address, d.local_address, d.listener_name, d.tls, d.sni, d.peer_sans
        )
        if self._draining:
            self._start_drain()
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self.front.stats.cx_rx_bytes.inc(len(data))
        if self.codec is None:
            self._sniff += data
            n = min(len(self._sniff), len(_H2_PREFACE))
            if self._sniff[:n] == _H2_PREFACE[:n] and n < len(_H2_PREFACE):
                return  # could still be HTTP/2
            self._set_codec(self._sniff.startswith(_H2_PREFACE))
            data, self._sniff = self._sniff, b""
        self._feed(data)

    def eof_received(self) -> bool | None:
        if self.codec is not None:
            self._feed(b"")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        for stream in list(self.streams.values()):
            stream.on_reset("connection_lost")
        self._wake(self._drain_waiters, exc or ConnectionResetError("connection lost"))
        self._wake(self._window_waiters, exc or ConnectionResetError("connection lost"))
        if self._counted:
            self._counted = False
            lst = self.listener
            lst.connections.discard(self)
            lst.stats.cx_active.dec()
            lst.stats.cx_destroy.inc()
            self.front.stats.cx_active.dec()
            self.front.stats.cx_destroy.inc()

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._wake(self._drain_waiters)

    # --------------------------------------------------------------------------------- input
    def _feed(self, data: bytes) -> None:
        codec = self.codec
        assert codec is not None
        self._handle(codec.receive_data(data))
        self._flush()

    def _handle(self, events: list[Any]) -> None:
        front = self.front
        for ev in events:
            if isinstance(ev, HeadersReceived):
                if self._draining and isinstance(self.codec, Http1ServerCodec):
                    self.codec.keep_alive = False
                self._disarm_idle()
                stream = ActiveStream(front, self, ev.stream_id, ev.headers, ev.end_stream)
                self.streams[ev.stream_id] = stream
            elif isinstance(ev, DataReceived):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.on_data(ev.data, ev.end_stream, ev.flow_controlled_length)
                    self._check_read_pressure()
                elif ev.flow_controlled_length and isinstance(self.codec, Http2ServerCodec):
                    self.codec.acknowledge(ev.stream_id, ev.flow_controlled_length)
            elif isinstance(ev, TrailersReceived):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.on_trailers(ev.trailers)
            elif isinstance(ev, StreamReset):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.on_reset()
            elif isinstance(ev, WindowOpened):
                self._wake(self._window_waiters)
            elif isinstance(ev, ProtocolFailure):
                front.count_failure(ev, self.downstream)
                if ev.close:
                    self._close_after_flush()
            elif isinstance(ev, ConnectionTerminated):
                for s in list(self.streams.values()):
                    if ev.last_stream_id is None or s.stream_id > ev.last_stream_id:
                        s.on_reset("goaway")
                if not self.streams:
                    self._close_after_flush()

    def _check_read_pressure(self) -> None:
        if self.transport is None or not isinstance(self.codec, Http1ServerCodec):
            return
        buffered = sum(s.body.buffered for s in self.streams.values())
        if buffered > self.listener.buffer_limit and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    # -------------------------------------------------------------------- DownstreamConnection
    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        if self.codec is None or self._closed:
            return
        self.codec.send_headers(stream_id, headers, end_stream)
        self._flush_soon()

    async def send_body(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        codec = self.codec
        if codec is None or self._closed:
            return
        if isinstance(codec, Http2ServerCodec):
            while True:
                n = codec.send_data(stream_id, data, end_stream)
                self._flush_soon()
                data = data[n:]
                if not data:
                    break
                await self._wait(self._window_waiters)
        else:
            codec.send_data(stream_id, data, end_stream)
            self._flush_soon()
        if self._paused_writing:
            await self._wait(self._drain_waiters)

    def send_trailers(self, stream_id: int, trailers: Headers) -> None:
        if self.codec is None or self._closed:
            return
        self.codec.send_trailers(stream_id, trailers)
        self._flush_soon()

    def reset_stream(self, stream_id: int) -> None:
        if self.codec is None or self._closed:
            return
        self.codec.reset_stream(stream_id)
        self._flush()
        if isinstance(self.codec, Http1ServerCodec):
            self._close_after_flush()

    def acknowledge(self, stream_id: int, n: int) -> None:
        codec = self.codec
        if isinstance(codec, Http2ServerCodec):
            if n:
                codec.acknowledge(stream_id, n)
                self._flush_soon()
        elif self._reading_paused and self.transport is not None:
            buffered = sum(s.body.buffered for s in self.streams.values())
            if buffered <= self.listener.buffer_limit // 2:
                self._reading_paused = False
                self.transport.resume_reading()

    def stream_closed(self, stream: ActiveStream) -> None:
        self.streams.pop(stream.stream_id, None)
        codec = self.codec
        if isinstance(codec, Http1ServerCodec):
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
            if codec.wants_close or (self._draining and self._drain_close_idle):
                self._close_after_flush()
            else:
                more = codec.response_complete()
                if codec.wants_close:
                    self._close_after_flush()
                else:
                    self._handle(more)
                    self._flush()
        elif self._draining and not self.streams:
            self._close_after_flush()
        if not self.streams:
            self._arm_idle()

    # -------------------------------------------------------------------------------- helpers
    def _flush_soon(self) -> None:
        """Coalesce what the exchanges queue in this loop iteration into one write."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        codec = self.codec
        t = self.transport
        if codec is None or t is None:
            return
        out = codec.data_to_send()
        if out and not t.is_closing():
            self.front.stats.cx_tx_bytes.inc(len(out))
            t.write(out)
        if codec.wants_close and not self.streams:
            self._close_after_flush()

    def _close_after_flush(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.codec is not None:
            out = self.codec.data_to_send()
            if out:
                t.write(out)
        t.close()  # asyncio flushes the write buffer before closing

    async def _wait(self, waiters: list[asyncio.Future[None]]) -> None:
        if self._closed:
            raise ConnectionResetError("connection closed")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        await fut

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]], exc: BaseException | None = None) -> None:
        for fut in waiters:
            if not fut.done():
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)
                    fut.exception()  # mark retrieved: a stream may already be gone
        waiters.clear()

    def _arm_idle(self) -> None:
        timeout = self.front.config.idle_timeout
        if timeout > 0 and self._idle_handle is None and not self._closed:
            self._idle_handle = asyncio.get_running_loop().call_later(timeout, self._on_idle)

    def _disarm_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _on_idle(self) -> None:
        self._idle_handle = None
        if self.streams or self._closed:
            return
        self.front.stats.cx_idle_timeout.inc()
        if isinstance(self.codec, Http2ServerCodec):
            self.codec.goaway()
        self._close_after_flush()

    def drain(self, *, close_idle: bool = True) -> None:
        """Stop taking new requests; close once the open ones are answered. ``close_idle=False`` (a listener
        update): an idle HTTP/1.1 connection stays open, its next response carries ``Connection: close``
        (the client may be sending a request right now; closing under it would reset that request), and the
        listener closes what is left after its drain timeout."""
        if self._draining:
            return
        self._draining = True
        self._drain_close_idle = close_idle
        self.front.stats.cx_drain_close.inc()
        self._start_drain()

    def close_idle(self) -> None:
        """End of a listener-update drain: close this connection now unless an exchange is in flight."""
        if not self.streams:
            if isinstance(self.codec, Http2ServerCodec):
                self.codec.goaway()
                self._flush()
            self._close_after_flush()

    def _start_drain(self) -> None:
        codec = self.codec
        if isinstance(codec, Http2ServerCodec):
            codec.goaway()
            self._flush()
        elif isinstance(codec, Http1ServerCodec):
            if not self._drain_close_idle:
                # Never close under a client that may be sending: a response still to start carries
                # ``Connection: close``; otherwise the next request's headers turn keep-alive off
                # (``_handle``) and its response does.
                if self.streams and not codec.response_started:
                    codec.keep_alive = False
                return
            codec.keep_alive = False
        elif not self._drain_close_idle:
            return  # no bytes yet (protocol not known): the first request gets its answer, then the close
        if not self.streams:
            self._close_after_flush()


class FilterChainRuntime:
    """One filter chain of a listener at run time: SNI names, HTTP front and TLS context."""

    __slots__ = ("coap", "front", "mqtt", "server_names", "ssl_context")

    def __init__(
        self,
        server_names: tuple[str, ...],
        front: HttpFront | None,
        ssl_context: ssl.SSLContext | None,
        *,
        mqtt: MqttFront | None = None,
        coap: Any = None,
    ):
        self.server_names = server_names
        self.front = cast(HttpFront, front)
        """The HTTP front (None only for an MQTT chain, whose connections never ask for it)."""
        self.ssl_context = ssl_context
        self.mqtt = mqtt
        """The MQTT front when the chain's network filter is ``mqtt_proxy``."""
        self.coap = coap
        """The ``microenvoy.io.coap_front.CoapFront`` when the chain's network filter is ``coap_proxy``."""

    def matches(self, sni: str) -> int:
        """Match quality for ``sni``: 2 exact, 1 wildcard (longer suffix wins via ranking), 0 default, -1."""
        if not self.server_names:
            return 0
        for name in self.server_names:
            if name == sni:
                return 1_000_000
            if name.startswith("*") and sni.endswith(name[1:]) and len(sni) > len(name) - 1:
                return len(name)
        return -1

    def __repr__(self) -> str:
        return f"<FilterChainRuntime {self.server_names or '*'} {self.front!r}>"


class TcpListener:
    """A bound TCP listener; its filter chains can be swapped on reload (new connections only).

    With several TLS filter chains the chain is chosen by SNI (``filter_chain_match.server_names``: exact
    name, then the longest ``*.suffix``, then a chain without names) during the handshake, so each chain
    presents its own certificate.
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        chains: list[FilterChainRuntime],
        *,
        stats: Scope,
        max_connections: int | None = None,
        buffer_limit: int = 1048576,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.chains = chains
        self.max_connections = max_connections
        self.buffer_limit = buffer_limit
        self.stats = ListenerStats(stats)
        self.connections: set[TcpHttpConnection | MqttConnection] = set()
        self.server: asyncio.Server | None = None
        self.bound_port = 0
        self._sni: dict[int, str] = {}
        self.ssl_context = self._listener_context()

    def __repr__(self) -> str:
        return f"<TcpListener {self.name} {self.host}:{self.bound_port} cx={len(self.connections)}>"

    @property
    def front(self) -> HttpFront:
        return self.chains[0].front

    def _listener_context(self) -> ssl.SSLContext | None:
        ctx = self.chains[0].ssl_context
        if ctx is not None and len(self.chains) > 1:
            ctx.sni_callback = self._on_sni
        return ctx

    def _on_sni(self, sslobj: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        sni = (server_name or "").lower()
        best = max(self.chains, key=lambda c: c.matches(sni))
        if best.matches(sni) >= 0 and best.ssl_context is not None and best.ssl_context is not ctx:
            sslobj.context = best.ssl_context
        if len(self._sni) > 4096:
            self._sni.clear()
        self._sni[id(sslobj)] = sni

    def sni_of(self, sslobj: Any) -> str | None:
        return self._sni.pop(id(sslobj), None)

    def front_for(self, sslobj: Any) -> HttpFront:
        if sslobj is not None and len(self.chains) > 1:
            ctx = sslobj.context
            for c in self.chains:
                if c.ssl_context is ctx:
                    return c.front
        return self.chains[0].front

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.Protocol] = self._new_connection
        self.server = await loop.create_server(
            factory, self.host, self.port, ssl=self.ssl_context, reuse_address=True, backlog=1024,
            ssl_handshake_timeout=10.0 if self.ssl_context is not None else None,
        )  # fmt: skip
        sock = self.server.sockets[0]
        self.bound_port = int(sock.getsockname()[1])

    def _new_connection(self) -> asyncio.Protocol:
        mqtt = self.chains[0].mqtt
        if mqtt is not None:
            from microenvoy.io.mqtt_front import MqttConnection

            return MqttConnection(self, mqtt)
        return TcpHttpConnection(self)

    def update(self, chains: list[FilterChainRuntime], max_connections: int | None) -> None:
        """Reload: new connections get the new chains (fronts, certificates); open ones keep theirs."""
        self.chains = chains
        self.max_connections = max_connections
        self.ssl_context = self._listener_context()
        if self.server is not None and self.ssl_context is not None:
            # asyncio keeps the context per server: swapping its attribute is how new handshakes use it.
            self.server._ssl_context = self.ssl_context  # type: ignore[attr-defined]

    def drain(self) -> None:
        for c in list(self.connections):
            c.drain()

    def drain_connections(self, timeout: float) -> None:
        """The listener's config changed: the connections accepted under the old one drain. HTTP ones at
        once (GOAWAY / ``Connection: close``: in-flight requests finish, then they close); MQTT ones keep
        working and get DISCONNECT 0x8B (server shutting down) at the end of ``timeout``. Whatever is still
        open then is closed."""
        old = list(self.connections)
        if not old:
            return
        loop = asyncio.get_running_loop()
        mqtt = [c for c in old if not isinstance(c, TcpHttpConnection)]
        for c in old:
            if isinstance(c, TcpHttpConnection):
                c.drain(close_idle=False)

        def end() -> None:
            for m in mqtt:
                if m in self.connections:
                    m.drain()
            for h in old:
                if h in self.connections and isinstance(h, TcpHttpConnection) and not h.streams:
                    h.close_idle()  # one with a request in flight closes after its response (draining)

        loop.call_later(timeout, end)

    async def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    def close_all(self) -> None:
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.abort()
