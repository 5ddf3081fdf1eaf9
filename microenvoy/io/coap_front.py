"""The CoAP listener: a UDP socket speaking CoAP, bridged into the HTTP engine (RFC 8075).

``CoapFront`` is built once per ``coap_proxy`` config (like ``HttpFront`` per HTTP connection manager): the
HTTP front the routes were turned into, OSCORE contexts, the blockwise store. ``CoapListener`` owns the socket
and the sans-IO message layer (``microenvoy.codecs.coap.endpoint``), which it keeps across reloads, and the
observed resources. Per request:

1. OSCORE-protected requests are verified and decrypted (failures answered per RFC 8613, never routed);
2. ``/.well-known/core`` is answered from the routes; Block2 follow-ups from the stored body;
3. the request is mapped (``microenvoy.bridging.coap``) and matched to a route (its CoAP settings); Block1
   blocks are reassembled first;
4. Observe registrations attach to the resource's single upstream refresh (poll or stream);
5. the exchange runs through the HTTP engine (``microenvoy.io.bridge.forward``) and the response is mapped
   back, split into Block2 blocks when large, protected when the request was, and sent piggybacked or
   separately by the message layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, cast

from microenvoy.bridging.coap import (
    MappingError,
    error_response,
    grpc_request,
    grpc_response,
    request_headers,
    response_options,
)
from microenvoy.codecs.coap.blockwise import BlockStore, size_of, szx_for
from microenvoy.codecs.coap.endpoint import Gone, Request, ServerEndpoint
from microenvoy.codecs.coap.message import (
    CON,
    METHODS,
    NON,
    Message,
    Opt,
    block_value,
    code_class,
    encode_uint,
    parse_block,
    sort_options,
)
from microenvoy.core.errors import ConfigError
from microenvoy.core.exchange import DownstreamInfo, ResponseFlag
from microenvoy.core.headers import Headers
from microenvoy.filters.network.coap_proxy import CoapProxy, CoapRoute, http_connection_manager
from microenvoy.io.bridge import BridgeResult, forward
from microenvoy.io.tcp_front import ListenerStats

if TYPE_CHECKING:
    from microenvoy.admin.stats import Scope, Store
    from microenvoy.io.http_front import HttpFront
    from microenvoy.router.table import RouteEntry

__all__ = ["CoapFront", "CoapListener", "coap_http_config"]

log = logging.getLogger("microenvoy.coap")

GET = 1
CONTENT = 0x45  # 2.05
CONTINUE = 0x5F  # 2.31
BAD_REQUEST = 0x80
UNAUTHORIZED = 0x81
BAD_OPTION = 0x82
NOT_FOUND = 0x84
INCOMPLETE = 0x88  # 4.08 Request Entity Incomplete
TOO_LARGE = 0x8D  # 4.13
UNAVAILABLE = 0xA3  # 5.03
LINK_FORMAT = 40
_WELL_KNOWN = [b".well-known", b"core"]
_KEY_OPTIONS = frozenset((Opt.URI_HOST, Opt.URI_PORT, Opt.URI_PATH, Opt.URI_QUERY, Opt.ACCEPT))
_Response = tuple[int, list[tuple[int, bytes]], bytes]
_OBSERVE_MAX = 0xFFFFFF
_LINE_TYPES = {
    b"application/x-ndjson": b"application/json",
    b"application/ndjson": b"application/json",
    b"application/jsonl": b"application/json",
    b"application/json-seq": b"application/json",
    b"application/x-json-stream": b"application/json",
}
"""Streamed media types whose lines are each a representation of another type (NDJSON lines are JSON)."""

coap_http_config = http_connection_manager
"""The HTTP connection manager a ``coap_proxy`` config runs on (the server builds its ``HttpFront``)."""


class _Stats:
    """``coap.<stat_prefix>.*``."""

    def __init__(self, scope: Scope) -> None:
        c = scope.counter
        self.rq_total = c("rq_total")
        self.by_method = {code: c(f"rq_{name.lower()}") for code, name in METHODS.items()}
        self.by_class = {k: c(f"rs_{k}xx") for k in (2, 4, 5)}
        self.rq_overflow = c("rq_overflow")
        self.no_response = c("no_response")
        self.bad_option = c("bad_option")
        self.mapping_error = c("mapping_error")
        self.upstream_unreachable = c("upstream_unreachable")
        self.upstream_timeout = c("upstream_timeout")
        self.block1_transfers = c("block1_transfers")
        self.block2_transfers = c("block2_transfers")
        self.block_continue = c("block_continue")
        self.block_too_large = c("block_too_large")
        self.block_incomplete = c("block_incomplete")
        self.wellknown = c("well_known_core")
        self.observe_registered = c("observe_registered")
        self.observe_deregistered = c("observe_deregistered")
        self.observe_rejected = c("observe_rejected")
        self.observers_gone = c("observers_gone")
        self.notifications = c("notifications")
        self.notifications_dropped = c("notifications_dropped")
        self.observe_refresh = c("observe_refresh")
        self.observe_refresh_failed = c("observe_refresh_failed")
        self.observers = scope.gauge("observers")
        self.observed_resources = scope.gauge("observed_resources")
        self.rq_active = scope.gauge("rq_active")
        self.oscore_ok = c("oscore_ok")
        self.oscore_failures = c("oscore_failures")
        self.oscore = {
            k: c(k)
            for k in (
                "oscore_unknown_context", "oscore_decode_failed", "oscore_decrypt_failed", "oscore_replay",
                "oscore_method", "oscore_required", "oscore_context_unavailable",
            )
        }  # fmt: skip
        self.scope = scope


class CoapFront:
    """Runtime of one ``coap_proxy`` config (immutable once built, like ``HttpFront``)."""

    def __init__(self, config: CoapProxy, http: HttpFront, *, stats: Store, listener_name: str) -> None:
        self.config = config
        self.http = http
        self.authority = config.authority or listener_name
        self.stats = _Stats(stats.scope(f"coap.{config.stat_prefix}."))
        routes = http.config.route_config.virtual_hosts[0].routes
        self.by_route: dict[int, CoapRoute] = {id(r): c for r, c in zip(routes, config.routes, strict=True)}
        self.oscore: Any = None
        if config.oscore is not None:
            from microenvoy.io.coap_oscore import OscoreServer  # aiocoap is loaded only with OSCORE

            try:
                self.oscore = OscoreServer(config.oscore)
            except Exception as exc:  # OscoreStateError: an unreadable state_dir file
                raise ConfigError([f"typed_config.oscore.state_dir: {exc}"]) from exc
        self.blocks = BlockStore(
            max_entries=config.max_block_transfers,
            max_bytes=config.max_block_bytes,
            lifetime=config.block_lifetime,
        )
        self.well_known = self._link_format().encode()

    def __repr__(self) -> str:
        return f"<CoapFront {self.config.stat_prefix!r} routes={len(self.config.routes)}>"

    def _link_format(self) -> str:
        links = []
        for route in self.config.routes:
            m = route.match
            target = m.path if m.path is not None else m.prefix
            if target is None:
                continue  # a regex route has no single path to list
            attrs = "".join(
                f";{k}" if k == "obs" else (f";{k}={v}" if k in ("ct", "sz") else f';{k}="{v}"')
                for k, v in route.link
            )
            if route.observe is not None and not any(k == "obs" for k, _ in route.link):
                attrs += ";obs"
            links.append(f"<{target}>{attrs}")
        return ",".join(links)

    def route_for(self, headers: Headers) -> tuple[RouteEntry | None, CoapRoute | None]:
        """The matched HTTP route entry (handed to the engine, so a gRPC rewrite of ``:path`` cannot re-route
        the request) and its CoAP settings."""
        entry = self.http.routes.match_entry(headers)
        return entry, None if entry is None else self.by_route.get(id(entry.route))


class _Observer:
    __slots__ = ("block_szx", "confirmable", "oscore", "remote", "token")

    def __init__(self, remote: Any, token: bytes, confirmable: bool, oscore: Any, block_szx: int) -> None:
        self.remote = remote
        self.token = token
        self.confirmable = confirmable
        self.oscore = oscore
        self.block_szx = block_szx


class _Resource:
    """One observed resource: one upstream refresh, the latest representation, its observers."""

    def __init__(
        self,
        listener: CoapListener,
        key: tuple[Any, ...],
        front: CoapFront,
        route: CoapRoute,
        entry: RouteEntry | None,
        method: int,
        headers: Headers,
        body: bytes,
        downstream: DownstreamInfo,
    ) -> None:
        self.listener = listener
        self.entry = entry
        self.body = body
        self.key = key
        self.front = front
        self.route = route
        self.method = method
        self.headers = headers
        self.downstream = downstream
        self.observers: dict[tuple[Any, bytes], _Observer] = {}
        self.state: _Response | None = None
        self.upstream_etag: bytes | None = None
        self.seq = 1
        self.sent = 0
        self.ready: asyncio.Future[_Response] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None
        self._pending = b""

    def __repr__(self) -> str:
        return f"<_Resource {self.key[1]!r} observers={len(self.observers)}>"

    def start(self) -> None:
        assert self.route.observe is not None
        run = self._stream if self.route.observe.mode == "stream" else self._poll
        self.task = asyncio.get_running_loop().create_task(run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if not self.ready.done():
            self.ready.cancel()

    # ----------------------------------------------------------------------------------- refresh
    def _request(self, etag: bytes | None) -> Headers:
        """The refresh request; ``etag``: the upstream's own ETag header of the last representation."""
        h = Headers(list(self.headers.items()))
        h.remove(b"if-none-match")
        if etag is not None and self.route.grpc_method is None:
            h.set(b"if-none-match", etag)
        return h

    async def _poll(self) -> None:
        assert self.route.observe is not None
        interval = self.route.observe.interval
        stats = self.front.stats
        first = True
        while True:
            if not first:
                await asyncio.sleep(interval)
            stats.observe_refresh.inc()
            request = self._request(None if first else self.upstream_etag)
            result = await forward(
                self.front.http, self.downstream, request, self.body,
                max_response_bytes=self.route.max_body_bytes, entry=self.entry,
            )  # fmt: skip
            response = self.listener.map_result(self.front, self.method, result, self.route)
            first = False
            if result.status == 304:  # unchanged since the ETag we sent
                continue
            if 200 <= result.status < 300:
                self.upstream_etag = result.headers.get(b"etag")
            if code_class(response[0]) != 2:
                if not self.ready.done():
                    self.ready.set_result(response)
                    return
                if result.status in (404, 410):  # the resource is gone: tell the observers, end (§4.2)
                    self.listener.notify_all(self, response, final=True)
                    return
                stats.observe_refresh_failed.inc()  # an upstream failure is not a new state
                continue
            self._update(response)

    async def _stream(self) -> None:
        assert self.route.observe is not None
        interval = self.route.observe.interval
        stats = self.front.stats
        while True:
            stats.observe_refresh.inc()
            self._pending = b""
            grpc = [False]
            ctype: list[bytes | None] = [None]

            def on_headers(h: Headers, grpc: list[bool] = grpc, ctype: list[bytes | None] = ctype) -> None:
                ct = h.get(b"content-type") or b""
                grpc[0] = ct.startswith(b"application/grpc")
                base = ct.split(b";")[0].strip().lower()
                ctype[0] = None if grpc[0] else _LINE_TYPES.get(base, ct)

            def on_data(data: bytes, grpc: list[bool] = grpc, ctype: list[bytes | None] = ctype) -> None:
                self._on_stream_data(data, grpc[0], ctype[0])

            result = await forward(
                self.front.http, self.downstream, self._request(None), self.body,
                on_headers=on_headers, on_data=on_data, entry=self.entry,
            )  # fmt: skip
            if not self.ready.done():  # the stream ended (or failed) before its first message
                response = self.listener.map_result(self.front, self.method, result, self.route)
                if code_class(response[0]) != 2:
                    self.ready.set_result(response)
                    return
            stats.observe_refresh_failed.inc()
            await asyncio.sleep(interval)

    def _on_stream_data(self, data: bytes, grpc: bool, content_type: bytes | None) -> None:
        buf = self._pending + data
        limit = self.route.max_body_bytes
        pieces: list[bytes] = []
        if grpc:  # length-prefixed messages (gRPC framing): each message is a notification
            while len(buf) >= 5:
                n = int.from_bytes(buf[1:5], "big")
                if len(buf) < 5 + n:
                    break
                pieces.append(buf[5 : 5 + n])
                buf = buf[5 + n :]
        else:  # newline-delimited representations
            while True:
                i = buf.find(b"\n")
                if i < 0:
                    break
                line = buf[:i].lstrip(b"\x1e").rstrip(b"\r")  # json-seq record separator, CRLF
                if line:  # empty lines are keep-alives
                    pieces.append(line)
                buf = buf[i + 1 :]
        if len(buf) > limit:
            buf = b""  # an unterminated piece beyond the route's limit is dropped
            self.front.stats.observe_refresh_failed.inc()
        self._pending = buf
        headers = Headers([(b":status", b"200")])
        if content_type:
            headers.set(b"content-type", content_type)
        elif grpc:
            headers.set(b"content-type", b"application/octet-stream")
        for piece in pieces:
            if len(piece) > limit:
                continue
            try:
                response = response_options(self.method, 200, headers, piece)
            except MappingError:
                continue
            self._update(response)

    def _update(self, response: _Response) -> None:
        if self.state is not None and response == self.state:
            return
        self.state = response
        self.seq = (self.seq + 1) & _OBSERVE_MAX
        if not self.ready.done():
            self.ready.set_result(response)
            return
        self.listener.notify_all(self, response, final=False)


class CoapListener:
    """A bound UDP socket serving CoAP for one listener (see the module docstring)."""

    def __init__(self, name: str, host: str, port: int, front: CoapFront, *, stats: Scope) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.front = front
        self.stats = ListenerStats(stats)
        cfg = front.config
        self.endpoint = ServerEndpoint(
            max_dedup=cfg.max_dedup_entries, empty_ack_delay=cfg.empty_ack_delay, rng=None
        )
        self.transport: asyncio.DatagramTransport | None = None
        self.bound_port = 0
        self.local_address: tuple[str, int] = (host, port)
        self.connections: set[asyncio.Task[None]] = set()
        """Requests in flight (what a drain waits for)."""
        self.resources: dict[tuple[Any, ...], _Resource] = {}
        self._accepting = True
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._out: list[tuple[bytes, Any]] = []
        self._refresher_store: Store | None = None
        self._refresher: Any = None

    def __repr__(self) -> str:
        return f"<CoapListener {self.name} {self.host}:{self.bound_port} in_flight={len(self.connections)}>"

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self.host, self.port)
        )
        self.transport = transport
        sock = transport.get_extra_info("sockname")
        self.bound_port = int(sock[1])
        self.local_address = (str(sock[0]), self.bound_port)

    def update(self, front: CoapFront) -> None:
        """Reload: new requests use the new front; observed resources keep theirs until they end."""
        self.front = front
        self.endpoint.max_dedup = front.config.max_dedup_entries
        self.endpoint.empty_ack_delay = front.config.empty_ack_delay

    async def stop_accepting(self) -> None:
        self._accepting = False

    def drain(self) -> None:
        """Nothing to announce in CoAP: new requests are ignored, those in flight finish."""

    def close_all(self) -> None:
        for res in list(self.resources.values()):
            res.stop()
        self.resources.clear()
        for task in list(self.connections):
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.close()
        if self._refresher_store is not None:
            self._refresher_store.remove_refresher(self._refresher)
            self._refresher_store = None

    def export_stats(self, store: Store) -> None:
        """Publish the message layer's counts as ``coap.<stat_prefix>.<name>`` when stats are read."""

        def refresh() -> None:
            scope = self.front.stats.scope
            for name, value in self.endpoint.stats.items():
                scope.counter(name).value = value
            scope.gauge("dedup_entries").set(len(self.endpoint._dedup))
            scope.gauge("block_entries").set(len(self.front.blocks))
            scope.gauge("block_bytes").set(self.front.blocks.bytes)
            scope.counter("block_evicted").value = self.front.blocks.evicted

        store.add_refresher(refresh)
        self._refresher_store = store
        self._refresher = refresh

    # ---------------------------------------------------------------------------------- input
    def datagram_received(self, data: bytes, addr: Any) -> None:
        front = self.front
        out = self._out
        now = time.monotonic()
        ep = self.endpoint
        ep.expire(now)
        if len(data) > front.config.max_message_size:
            req = ep.receive(data, addr, now, out)
            if req is not None:  # RFC 7252 §4.6 / RFC 7959 §2.9.3: too big for one message, use Block1
                opts = ((Opt.SIZE1, encode_uint(front.config.max_message_size)),)
                ep.respond(req, TOO_LARGE, opts, b"", now, out)
                front.stats.block_too_large.inc()
            self._flush()
            return
        req = ep.receive(data, addr, now, out)
        if ep.gone:
            self._observers_gone()
        if req is not None:
            if not self._accepting:  # draining: tell the device to come back (to the next agent) later
                front.stats.rq_overflow.inc()
                opts = ((Opt.MAX_AGE, encode_uint(1)),)
                ep.respond(req, UNAVAILABLE, opts, b"draining", now, out)
            else:
                front.stats.rq_total.inc()
                counter = front.stats.by_method.get(req.message.code)
                if counter is not None:
                    counter.inc()
                task = asyncio.get_running_loop().create_task(self._serve(front, req))
                self.connections.add(task)
                task.add_done_callback(self.connections.discard)
        self._flush()

    def _flush(self) -> None:
        out = self._out
        if out and self.transport is not None:
            send = self.transport.sendto
            for data, addr in out:
                send(data, addr)
            self.endpoint.stats["tx"] += len(out)
        out.clear()
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self.endpoint.next_deadline()
        if deadline is None:
            return
        if self._timer is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = deadline
        self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.endpoint.tick(time.monotonic(), self._out)
        if self.endpoint.gone:
            self._observers_gone()
        self._flush()

    def _observers_gone(self) -> None:
        gone: list[Gone] = self.endpoint.gone
        self.endpoint.gone = []
        for g in gone:
            for res in list(self.resources.values()):
                if res.observers.pop((g.remote, g.token), None) is not None:
                    res.front.stats.observers_gone.inc()
                    res.front.stats.observers.dec()
                    self._maybe_end(res)

    # -------------------------------------------------------------------------------- serving
    async def _serve(self, front: CoapFront, req: Request) -> None:
        loop = asyncio.get_running_loop()
        ack = None
        if req.message.mtype == CON:
            ack = loop.call_later(front.config.empty_ack_delay, self._ack_due, req)
        stats = front.stats
        stats.rq_active.inc()
        try:
            code, options, payload = await self._respond_to(front, req)
        except asyncio.CancelledError:
            raise
        except Exception:  # our own failure: answer 5.00, never leave the client retransmitting
            log.exception("CoAP request %r failed", req.message)
            code, options, payload = error_response("internal")
        finally:
            stats.rq_active.dec()
            if ack is not None:
                ack.cancel()
        klass = stats.by_class.get(code >> 5)
        if klass is not None:
            klass.inc()
        m = req.message
        if m.mtype == NON and code == BAD_OPTION:  # §5.4.1: a NON with a critical option we lack is rejected
            self.endpoint.reject(req, self._out)
        elif _suppressed(m, code):  # RFC 7967 No-Response: a CON still gets its (empty) ACK
            stats.no_response.inc()
            self.endpoint.ack_due(req, self._out)
            req.answered = True
        else:
            self.endpoint.respond(req, code, sort_options(options), payload, time.monotonic(), self._out)
        self._flush()

    def _ack_due(self, req: Request) -> None:
        self.endpoint.ack_due(req, self._out)
        self._flush()

    async def _respond_to(self, front: CoapFront, req: Request) -> _Response:
        msg = req.message
        oscore = front.oscore
        if msg.has(Opt.OSCORE):
            if oscore is None:  # OSCORE is a critical option this listener does not process (§5.4.1)
                front.stats.bad_option.inc()
                return BAD_OPTION, [], b"OSCORE not configured"
            try:
                oreq = oscore.unprotect(msg)
            except Exception as exc:
                return self._oscore_failure(front, exc)
            front.stats.oscore_ok.inc()
            code, options, payload = await self._process(front, req, oreq.inner, oreq)
            inner = Message(msg.mtype, code, msg.mid, msg.token, sort_options(options), payload)
            try:
                outer = oscore.protect(oreq, inner)
            except Exception as exc:
                return self._oscore_failure(front, exc)
            return outer.code, list(outer.options), outer.payload
        if oscore is not None and oscore.require:
            return self._oscore_failure(front, oscore.plain_refusal())
        return await self._process(front, req, msg, None)

    @staticmethod
    def _oscore_failure(front: CoapFront, exc: Exception) -> _Response:
        """An ``OscoreError`` (anything else is ours and propagates) -> its answer, counted."""
        stat = getattr(exc, "stat", None)
        if stat is None:
            raise exc
        front.stats.oscore_failures.inc()
        counter = front.stats.oscore.get(stat)
        if counter is not None:
            counter.inc()
        return exc.code, list(exc.options), exc.payload  # type: ignore[attr-defined]

    async def _process(self, front: CoapFront, req: Request, msg: Message, oreq: Any) -> _Response:
        remote = req.remote
        now = time.monotonic()
        if msg.opts(Opt.URI_PATH) == _WELL_KNOWN:
            return self._well_known(front, msg, now, remote)
        principal = getattr(oreq, "principal", None)
        try:
            headers, body = request_headers(msg, authority=front.authority)
        except MappingError as exc:
            (front.stats.bad_option if exc.code == BAD_OPTION else front.stats.mapping_error).inc()
            if exc.stat != "bad_option":
                front.stats.scope.counter(exc.stat).inc()  # a small fixed set of names (docs/coap.md)
            return exc.code, [], exc.detail.encode()[:128]
        entry, route = front.route_for(headers)
        limit = route.max_body_bytes if route is not None else 65536
        rkey = (principal, tuple((n, v) for n, v in msg.options if n in _KEY_OPTIONS))
        # ---- Block2 follow-ups (RFC 7959 §2.4): served from the stored body
        b2 = msg.opt(Opt.BLOCK2)
        want_szx = szx_for(front.config.block_size)
        if b2 is not None:
            num, _, szx = parse_block(b2)
            if szx == 7:
                return BAD_OPTION, [], b"Block2 SZX 7 is reserved"
            want_szx = min(want_szx, szx)
            if num > 0:
                stored = front.blocks.get((remote, rkey), now)
                if stored is not None:
                    body2, meta = stored
                    code2, options2 = cast("tuple[int, tuple[tuple[int, bytes], ...]]", meta)
                    return self._slice(body2, num, want_szx, list(options2), msg, front, code2)
        # ---- Block1 (RFC 7959 §2.3 / §2.5)
        b1 = msg.opt(Opt.BLOCK1)
        block1_reply: tuple[int, bytes] | None = None
        if b1 is not None:
            num, more, szx = parse_block(b1)
            if szx == 7:
                return BAD_OPTION, [], b"Block1 SZX 7 is reserved"
            size1 = msg.uint(Opt.SIZE1)
            if num == 0 and size1 is not None and size1 > limit:
                front.stats.block_too_large.inc()
                return TOO_LARGE, [(Opt.SIZE1, encode_uint(limit))], b""
            tag = msg.opt(Opt.REQUEST_TAG)
            state, whole = front.blocks.block1(
                (remote, msg.code, rkey, tag), num, more, szx, msg.payload, limit, now
            )
            if state == "continue":
                front.stats.block_continue.inc()
                return CONTINUE, [(Opt.BLOCK1, block_value(num, True, szx))], b""
            if state == "too_large":
                front.stats.block_too_large.inc()
                return TOO_LARGE, [(Opt.SIZE1, encode_uint(limit))], b""
            if state == "incomplete":
                front.stats.block_incomplete.inc()
                return INCOMPLETE, [], b"Block1 out of order or unknown"
            assert whole is not None
            if num > 0:
                front.stats.block1_transfers.inc()
            body = whole
            headers.set(b"content-length", str(len(body)).encode())
            block1_reply = (Opt.BLOCK1, block_value(num, False, szx))
        elif len(body) > limit:
            front.stats.block_too_large.inc()
            return TOO_LARGE, [(Opt.SIZE1, encode_uint(limit))], b""
        addr: tuple[Any, ...] = remote  # type: ignore[assignment]
        downstream = DownstreamInfo(
            protocol="CoAP",
            remote_address=(str(addr[0]), int(addr[1])),
            local_address=self.local_address,
            listener_name=self.name,
            peer_sans=(principal,) if principal else (),
        )
        if route is not None and route.grpc_method is not None:
            headers, body = grpc_request(headers, body, route.grpc_method)
        # ---- Observe (RFC 7641)
        observe = msg.uint(Opt.OBSERVE) if msg.code == GET else None
        if observe is not None and route is not None and route.observe is not None:
            if observe == 0:
                return await self._register(
                    front, route, entry, req, msg, headers, body, downstream, rkey, oreq, want_szx
                )
            if observe == 1:
                self._deregister((id(front), rkey, body), front, remote, msg.token)
        # ---- the exchange
        cfg = front.config
        if len(self.connections) > cfg.max_concurrent_requests:
            front.stats.rq_overflow.inc()
            return UNAVAILABLE, [(Opt.MAX_AGE, encode_uint(1))], b"overloaded"
        result = await forward(front.http, downstream, headers, body, max_response_bytes=limit, entry=entry)
        code, options, payload = self.map_result(front, msg.code, result, route)
        if block1_reply is not None:
            options.append(block1_reply)
        if len(payload) > size_of(want_szx) or b2 is not None:
            front.blocks.put((remote, rkey), payload, time.monotonic(), (code, tuple(options)))
            return self._slice(payload, 0, want_szx, options, msg, front, code)
        return code, options, payload

    def _slice(
        self,
        body: bytes,
        num: int,
        szx: int,
        options: list[tuple[int, bytes]],
        msg: Message,
        front: CoapFront,
        code: int = CONTENT,
    ) -> _Response:
        size = size_of(szx)
        start = num * size
        if start >= len(body) and not (num == 0 and not body):
            return 0x80, [], b"Block2 beyond the end"  # 4.00
        part = body[start : start + size]
        more = start + size < len(body)
        opts = [o for o in options if o[0] not in (Opt.BLOCK2, Opt.SIZE2, Opt.OBSERVE, Opt.BLOCK1)]
        if num == 0:
            opts += [o for o in options if o[0] in (Opt.OBSERVE, Opt.BLOCK1)]
        opts.append((Opt.BLOCK2, block_value(num, more, szx)))
        if num == 0:
            opts.append((Opt.SIZE2, encode_uint(len(body))))
        if num > 0 and not more:
            front.stats.block2_transfers.inc()
        return code, opts, part

    def _well_known(self, front: CoapFront, msg: Message, now: float, remote: Any) -> _Response:
        if msg.code != GET:
            return 0x85, [], b""  # 4.05 Method Not Allowed
        front.stats.wellknown.inc()
        body = front.well_known
        queries = [q.decode("utf-8", "replace") for q in msg.opts(Opt.URI_QUERY)]
        if queries:  # RFC 6690 §4.1: filter on one attribute (trailing * = prefix match)
            body = _filter_links(body, queries[0]).encode()
        options = [(Opt.CONTENT_FORMAT, encode_uint(LINK_FORMAT))]
        b2 = msg.opt(Opt.BLOCK2)
        szx = szx_for(front.config.block_size)
        num = 0
        if b2 is not None:
            num, _, bszx = parse_block(b2)
            szx = min(szx, bszx)
        if len(body) > size_of(szx) or b2 is not None:
            return self._slice(body, num, szx, options, msg, front)
        return CONTENT, options, body

    def map_result(
        self, front: CoapFront, method: int, result: BridgeResult, route: CoapRoute | None
    ) -> _Response:
        """An exchange's outcome -> CoAP response (local failures by their response flags)."""
        flags = result.exchange.response_flags
        stats = front.stats
        if ResponseFlag.UPSTREAM_OVERFLOW in flags:
            retry = result.headers.get(b"retry-after")
            after = int(retry) if retry is not None and retry.isdigit() else 1
            return error_response("overflow", retry_after=after)
        if ResponseFlag.UPSTREAM_REQUEST_TIMEOUT in flags:
            stats.upstream_timeout.inc()
            return error_response("timeout")
        if flags & {ResponseFlag.UPSTREAM_CONNECTION_FAILURE, ResponseFlag.NO_HEALTHY_UPSTREAM} or (
            result.status == 0 and not result.truncated
        ):
            stats.upstream_unreachable.inc()
            return error_response("unreachable")
        if result.truncated:
            return error_response("unreachable")
        if ResponseFlag.NO_ROUTE_FOUND in flags:
            return error_response("no_route")
        if route is not None and route.grpc_method is not None:
            return grpc_response(method, result.status, result.headers, result.trailers, result.body)
        try:
            return response_options(method, result.status, result.headers, result.body)
        except MappingError as exc:
            stats.mapping_error.inc()
            return exc.code, [], exc.detail.encode()[:128]

    # -------------------------------------------------------------------------------- Observe
    async def _register(
        self,
        front: CoapFront,
        route: CoapRoute,
        entry: RouteEntry | None,
        req: Request,
        msg: Message,
        headers: Headers,
        body: bytes,
        downstream: DownstreamInfo,
        rkey: tuple[Any, ...],
        oreq: Any,
        szx: int,
    ) -> _Response:
        assert route.observe is not None
        key = (id(front), rkey, body)  # a gRPC stream's request message is part of the resource
        res = self.resources.get(key)
        remote = req.remote
        if res is None:
            if len(self.resources) >= front.config.max_observed_resources:
                front.stats.observe_rejected.inc()
                res = None
            else:
                res = _Resource(self, key, front, route, entry, msg.code, headers, body, downstream)
                self.resources[key] = res
                front.stats.observed_resources.inc()
                res.start()
        if res is None or len(res.observers) >= route.observe.max_observers:
            front.stats.observe_rejected.inc()  # answered without Observe: not registered (§4.1)
            result = await forward(
                front.http, downstream, headers, b"", max_response_bytes=route.max_body_bytes
            )
            code, options, payload = self.map_result(front, msg.code, result, route)
            return self._maybe_slice(front, remote, rkey, code, options, payload, szx, msg)
        try:
            response = await asyncio.shield(res.ready)
        except asyncio.CancelledError:
            if res.ready.cancelled():
                return error_response("unreachable")
            raise
        if code_class(response[0]) == 2 and res.state is not None:
            response = res.state  # the latest state (a stream may have moved on since `ready`)
        code, options, payload = response
        if code_class(code) != 2:  # the first fetch failed: no observation (§4.1: answer without Observe)
            self._maybe_end(res)
            return self._maybe_slice(front, remote, rkey, code, list(options), payload, szx, msg)
        if (remote, msg.token) not in res.observers:
            front.stats.observers.inc()
        res.observers[(remote, msg.token)] = _Observer(remote, msg.token, msg.mtype == CON, oreq, szx)
        front.stats.observe_registered.inc()
        opts = [*options, (Opt.OBSERVE, encode_uint(res.seq))]
        return self._maybe_slice(front, remote, rkey, code, opts, payload, szx, msg)

    def _maybe_slice(
        self,
        front: CoapFront,
        remote: Any,
        rkey: tuple[Any, ...],
        code: int,
        options: list[tuple[int, bytes]],
        payload: bytes,
        szx: int,
        msg: Message,
    ) -> _Response:
        if len(payload) > size_of(szx):
            front.blocks.put((remote, rkey), payload, time.monotonic(), (code, tuple(options)))
            return self._slice(payload, 0, szx, options, msg, front, code)
        return code, options, payload

    def _deregister(self, key: tuple[Any, ...], front: CoapFront, remote: Any, token: bytes) -> None:
        res = self.resources.get(key)
        if res is not None and res.observers.pop((remote, token), None) is not None:
            front.stats.observe_deregistered.inc()
            front.stats.observers.dec()
            self._maybe_end(res)

    def _maybe_end(self, res: _Resource) -> None:
        if not res.observers and self.resources.get(res.key) is res:
            del self.resources[res.key]
            res.front.stats.observed_resources.dec()
            res.stop()

    def notify_all(self, res: _Resource, response: _Response, *, final: bool) -> None:
        """Send ``response`` (the resource's new state) to every observer of ``res``."""
        code, options, payload = response
        front = res.front
        observe = res.route.observe
        assert observe is not None
        res.sent += 1
        now = time.monotonic()
        out = self._out
        every = observe.confirmable_every
        for (remote, token), obs in list(res.observers.items()):
            opts = list(options)
            if not final:
                opts.append((Opt.OBSERVE, encode_uint(res.seq)))
            ncode, nopts, npayload = self._maybe_slice(
                front, remote, res.key[1], code, opts, payload, obs.block_szx, Message(CON, GET)
            )
            if obs.oscore is not None:
                inner = Message(CON, ncode, 0, token, sort_options(nopts), npayload)
                try:
                    outer = front.oscore.protect(obs.oscore, inner, observe=not final)
                except Exception as exc:  # the context cannot send (sequence numbers, state file)
                    if getattr(exc, "stat", None) is None:
                        raise
                    self._oscore_failure(front, exc)
                    front.stats.notifications_dropped.inc()
                    continue
                ncode, nopts, npayload = outer.code, list(outer.options), outer.payload
            confirmable = obs.confirmable or (every > 0 and res.sent % every == 0)
            if self.endpoint.notify(
                remote, token, ncode, sort_options(nopts), npayload, confirmable=confirmable, now=now, out=out
            ):
                front.stats.notifications.inc()
            else:
                front.stats.notifications_dropped.inc()
        if final:
            front.stats.observers.dec(len(res.observers))
            res.observers.clear()
            self._maybe_end(res)
        self._flush()


def _suppressed(msg: Message, code: int) -> bool:
    """RFC 7967: the request's No-Response option says the client is not interested in this code's class."""
    value = msg.opt(Opt.NO_RESPONSE)
    if value is None:
        return False
    bits = int.from_bytes(value, "big")
    return bool(bits & {2: 2, 4: 8, 5: 16}.get(code >> 5, 0))


def _filter_links(body: bytes, query: str) -> str:
    name, _, value = query.partition("=")
    prefix = value.endswith("*")
    value = value.rstrip("*")
    kept = []
    for link in body.decode().split(","):
        if not link:
            continue
        target, *attrs = link.split(";")
        values: list[str] = []
        if name == "href":
            values = [target.strip("<>")]
        for a in attrs:
            k, _, v = a.partition("=")
            if k == name:
                values += v.strip('"').split(" ") if v else [""]
        if any(v.startswith(value) if prefix else v == value for v in values):
            kept.append(link)
    return ",".join(kept)


class _Protocol(asyncio.DatagramProtocol):
    """The asyncio side of a ``CoapListener``: datagrams in, errors logged."""

    def __init__(self, listener: CoapListener) -> None:
        self.listener = listener

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            self.listener.datagram_received(data, addr)
        except Exception:  # a datagram must never take the listener down
            self.listener.endpoint.stats["malformed"] += 1
            log.warning("dropped a CoAP datagram from %s", addr, exc_info=True)

    def error_received(self, exc: Exception) -> None:
        with contextlib.suppress(Exception):
            log.debug("CoAP socket error: %s", exc)
