"""Active health checking I/O: one ``HealthChecker`` per cluster probes every host on its own connections.

The verdicts, thresholds and intervals are the sans-IO ``microenvoy.upstream.health`` state machine; this
module runs one task per host that sleeps, probes, feeds the result in and sleeps again. The checker writes
the verdict to ``Host.healthy`` (what the load balancers read through ``Host.available``) and calls
``on_change()`` after every flip.

Probes use connections of their own, never the cluster's request pools, so they are not counted in
``upstream_rq_*``/``upstream_cx_*`` and do not make the cluster look used:

* HTTP over HTTP/1.1 (``Http1ClientCodec``) or HTTP/2 (``Http2ClientCodec``; ``codec_client_type``, else the
  cluster's protocol). With ``reuse_connection`` (the default) the connection stays open between checks;
  a reused HTTP/1.1 connection that turns out closed is replaced once within the same check.
* gRPC ``grpc.health.v1.Health/Check`` over HTTP/2 with our gRPC framing; SERVING passes.
* TCP: connect; then send ``send`` and wait for every ``receive`` block. Connect-only when both are empty.

The whole check (connect included) must finish within ``timeout``; a timeout fails it as
``NETWORK_TIMEOUT`` and closes its connection. TLS is used when the cluster has a ``transport_socket``
(the cluster's ``SSLContext`` when the check speaks the cluster's protocol, else one with the check's ALPN);
the SAN matchers are checked as for traffic.

``first_round`` resolves once every host present at ``start()`` has had its first verdict (cluster warming).
Stats: ``cluster.<name>.health_check.{attempt,success,failure,network_failure,passive_failure,
verify_cluster}`` counters and the ``healthy``/``degraded`` gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import cast

from microenvoy.codecs.grpc import GrpcFramingError, GrpcMessageDecoder, encode_message
from microenvoy.codecs.upstream_http1 import Http1ClientCodec
from microenvoy.codecs.upstream_http2 import CANCEL, Http2ClientCodec
from microenvoy.config.health_check import HealthCheck, HttpHealthCheck
from microenvoy.core.errors import CodecError
from microenvoy.core.events import (
    ConnectionTerminated,
    DataReceived,
    HeadersReceived,
    ProtocolFailure,
    StreamReset,
    TrailersReceived,
    WindowOpened,
)
from microenvoy.core.headers import Headers
from microenvoy.io import tls as _tls
from microenvoy.io.upstream import UpstreamCluster
from microenvoy.upstream.health import (
    FailureType,
    HealthCheckPolicy,
    HostHealth,
    PayloadMatcher,
    ProbeResult,
    Verdict,
    classify_grpc_response,
    classify_http_response,
    grpc_health_request,
    grpc_request_headers,
    http_request_headers,
)
from microenvoy.upstream.host import Host

__all__ = ["HealthChecker"]

log = logging.getLogger("microenvoy.health_check")

_MAX_GRPC_MESSAGE = 65536
"""A HealthCheckResponse is a few bytes; anything this large is a broken peer."""


class _ProbeError(Exception):
    """A probe failed before it got an answer to judge."""

    def __init__(self, failure: FailureType, detail: str, *, nothing_received: bool = False) -> None:
        super().__init__(detail)
        self.failure = failure
        self.detail = detail
        self.nothing_received = nothing_received
        """The connection died before a single response byte (a stale kept-alive connection)."""


# ============================================================================================ the link
class _Link(asyncio.Protocol):
    """A probe's transport: buffers received bytes for ``read()``; ``b""`` means the peer is gone."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop transports do not subclass it
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def read(self) -> bytes:
        while not self._buf and not self._eof:
            fut = asyncio.get_running_loop().create_future()
            self._waiter = fut
            try:
                await fut
            finally:
                self._waiter = None
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def discard_pending(self) -> None:
        """Drop bytes that arrived between checks."""
        self._buf.clear()

    @property
    def usable(self) -> bool:
        return not self.closed and not self._eof and self.transport is not None

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self, *, abort: bool = False) -> None:
        if self.transport is not None and not self.closed:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        self.closed = True

    def __repr__(self) -> str:
        return f"<_Link {'closed' if self.closed else 'open'} buffered={len(self._buf)}>"


# ============================================================================================ probers
class _Prober:
    """One host's probe connection and the protocol spoken on it."""

    alpn: tuple[str, ...] = ()

    def __init__(self, checker: HealthChecker, host: Host) -> None:
        self.checker = checker
        self.host = host
        self.link: _Link | None = None

    async def probe(self) -> ProbeResult:
        raise NotImplementedError

    async def connect(self) -> _Link:
        cluster = self.checker.cluster
        cfg = cluster.config
        loop = asyncio.get_running_loop()
        tls_cfg = cfg.transport_socket
        sslctx = self.checker.ssl_context(self.alpn) if tls_cfg is not None else None
        ip, port = self.host.address
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                _transport, link = await loop.create_connection(
                    _Link,
                    ip,
                    port,
                    ssl=sslctx,
                    server_hostname=(tls_cfg.sni or None) if sslctx is not None and tls_cfg else None,
                    ssl_handshake_timeout=cfg.connect_timeout if sslctx is not None else None,
                )
        except TimeoutError:
            raise _ProbeError(
                FailureType.NETWORK, f"connect timed out after {cfg.connect_timeout}s"
            ) from None
        except (OSError, ssl.SSLError) as e:
            raise _ProbeError(FailureType.NETWORK, f"connect failed: {e}") from None
        if tls_cfg is not None and tls_cfg.common_tls_context.match_subject_alt_names:
            assert link.transport is not None
            sslobj = link.transport.get_extra_info("ssl_object")
            if not _tls.check_subject_alt_names(sslobj, tls_cfg.common_tls_context.match_subject_alt_names):
                link.close(abort=True)
                raise _ProbeError(FailureType.NETWORK, "certificate SAN mismatch")
        self.link = link
        return link

    def close(self, *, abort: bool = False) -> None:
        if self.link is not None:
            self.link.close(abort=abort)
            self.link = None

    def authority(self, configured: str) -> str:
        return configured or self.checker.cluster.name

    @property
    def scheme(self) -> bytes:
        return b"https" if self.checker.cluster.config.transport_socket is not None else b"http"


class _Http1Prober(_Prober):
    alpn = ("http/1.1",)

    def __init__(self, checker: HealthChecker, host: Host) -> None:
        super().__init__(checker, host)
        self.codec: Http1ClientCodec | None = None

    async def probe(self) -> ProbeResult:
        reused = self.link is not None and self.link.usable and self.codec is not None and self.codec.idle
        try:
            return await self._once(reused)
        except _ProbeError as e:
            if not (reused and e.nothing_received):
                raise
            # The kept-alive connection had been closed by the peer: once more on a fresh one.
            return await self._once(False)

    async def _once(self, reuse: bool) -> ProbeResult:
        check = self.checker.check
        http = check.http_health_check
        assert http is not None
        if not reuse:
            self.close()
            self.codec = Http1ClientCodec()
            link = await self.connect()
        else:
            assert self.link is not None
            link = self.link
            link.discard_pending()
        codec = self.codec
        assert codec is not None
        headers = http_request_headers(http, authority=self.authority(http.host), scheme=self.scheme)
        try:
            codec.send_headers(headers, end_stream=True)
        except CodecError as e:
            self.close(abort=True)
            raise _ProbeError(FailureType.NETWORK, f"cannot send the request: {e}") from None
        link.write(codec.data_to_send())
        response: Headers | None = None
        received_any = False
        while True:
            data = await link.read()
            received_any = received_any or bool(data)
            done = False
            for ev in codec.receive_data(data):
                if isinstance(ev, HeadersReceived):
                    response = ev.headers
                    done = done or ev.end_stream
                elif isinstance(ev, DataReceived):
                    done = done or ev.end_stream
                elif isinstance(ev, TrailersReceived):
                    done = True
                elif isinstance(ev, StreamReset | ProtocolFailure | ConnectionTerminated):
                    if done or (codec.response_complete and response is not None):
                        break
                    self.close(abort=True)
                    raise _ProbeError(
                        FailureType.NETWORK, _event_detail(ev), nothing_received=not received_any
                    )
            if done and response is not None:
                break
            if not data:
                self.close(abort=True)
                raise _ProbeError(
                    FailureType.NETWORK,
                    "connection closed before the response",
                    nothing_received=not received_any,
                )
        result = classify_http_response(http, response)
        if check.reuse_connection and codec.reusable:
            codec.start_next_cycle()
        else:
            self.close()
        return result


class _Http2Prober(_Prober):
    """HTTP/2 checks and gRPC checks (``grpc``)."""

    alpn = ("h2",)

    def __init__(self, checker: HealthChecker, host: Host, *, grpc: bool) -> None:
        super().__init__(checker, host)
        self.grpc = grpc
        self.codec: Http2ClientCodec | None = None

    def _fresh(self) -> bool:
        codec = self.codec
        return not (
            self.link is not None
            and self.link.usable
            and codec is not None
            and not codec.closed
            and not codec.goaway_received
            and codec.can_open_stream
        )

    async def probe(self) -> ProbeResult:
        check = self.checker.check
        if self._fresh():
            self.close()
            self.codec = Http2ClientCodec(
                self.checker.cluster.config.http2_protocol_options, default_scheme=self.scheme
            )
            link = await self.connect()
            self.codec.initiate()
            link.write(self.codec.data_to_send())
        assert self.link is not None
        assert self.codec is not None
        link, codec = self.link, self.codec
        body = b""
        if self.grpc:
            g = check.grpc_health_check
            assert g is not None
            headers = grpc_request_headers(g, authority=self.authority(g.authority), scheme=self.scheme)
            body = encode_message(grpc_health_request(g.service_name))
        else:
            http = check.http_health_check
            assert http is not None
            headers = http_request_headers(http, authority=self.authority(http.host), scheme=self.scheme)
        try:
            sid = codec.send_headers(headers, end_stream=not body)
            pending = body
            if pending:
                pending = pending[codec.send_data(sid, pending, True) :]
        except CodecError as e:
            self.close(abort=True)
            raise _ProbeError(FailureType.NETWORK, f"cannot send the request: {e}") from None
        link.write(codec.data_to_send())
        try:
            result = await self._response(link, codec, sid, pending)
        finally:
            codec.stream_finished(sid)
        if not check.reuse_connection or codec.goaway_received or codec.closed:
            self.close()
        return result

    async def _response(self, link: _Link, codec: Http2ClientCodec, sid: int, pending: bytes) -> ProbeResult:
        response: Headers | None = None
        trailers: Headers | None = None
        decoder = GrpcMessageDecoder(_MAX_GRPC_MESSAGE)
        messages: list[bytes] = []
        framing_error = ""
        done = False
        while not done:
            data = await link.read()
            if not data:
                self.close(abort=True)
                raise _ProbeError(FailureType.NETWORK, "connection closed before the response")
            events = codec.receive_data(data)
            for ev in events:
                if isinstance(ev, ProtocolFailure):
                    link.write(codec.data_to_send())
                    self.close(abort=True)
                    raise _ProbeError(FailureType.NETWORK, ev.detail)
                if isinstance(ev, ConnectionTerminated):
                    if ev.last_stream_id is not None and sid > ev.last_stream_id:
                        self.close()
                        raise _ProbeError(FailureType.NETWORK, "GOAWAY before the check was processed")
                    continue
                if isinstance(ev, WindowOpened):
                    if pending:
                        try:
                            pending = pending[codec.send_data(sid, pending, True) :]
                        except CodecError:
                            pending = b""
                    continue
                if getattr(ev, "stream_id", None) != sid:
                    continue
                if isinstance(ev, HeadersReceived):
                    response = ev.headers
                    done = ev.end_stream
                elif isinstance(ev, DataReceived):
                    if ev.flow_controlled_length:
                        codec.acknowledge(sid, ev.flow_controlled_length)
                    if self.grpc and not framing_error:
                        try:
                            messages.extend(m for _c, m in decoder.feed(ev.data))
                        except GrpcFramingError as e:
                            framing_error = str(e)
                            codec.reset_stream(sid, CANCEL)
                            done = True
                    done = done or ev.end_stream
                elif isinstance(ev, TrailersReceived):
                    trailers = ev.trailers
                    done = True
                elif isinstance(ev, StreamReset):
                    link.write(codec.data_to_send())
                    raise _ProbeError(FailureType.NETWORK, f"stream reset (code {ev.error_code})")
            link.write(codec.data_to_send())
        if response is None:
            raise _ProbeError(FailureType.NETWORK, "stream ended without a response")
        if not self.grpc:
            return classify_http_response(self.checker.http, response)
        if framing_error:
            return ProbeResult.fail(FailureType.ACTIVE, f"bad gRPC framing: {framing_error}")
        if decoder.buffered:
            return ProbeResult.fail(FailureType.ACTIVE, "response ended inside a gRPC message")
        return classify_grpc_response(response, messages, trailers)


class _TcpProber(_Prober):
    def __init__(self, checker: HealthChecker, host: Host) -> None:
        super().__init__(checker, host)
        tcp = checker.check.tcp_health_check
        assert tcp is not None
        self.send = tcp.send
        self.matcher = PayloadMatcher(tcp.receive)
        self.expects_reply = bool(tcp.receive)

    async def probe(self) -> ProbeResult:
        reuse = self.checker.check.reuse_connection and self.expects_reply
        if self.link is not None and self.link.usable and reuse:
            link = self.link
            link.discard_pending()
        else:
            self.close()
            link = await self.connect()
        self.matcher.reset()
        link.write(self.send)
        if self.matcher.done:  # connect-only (or send-only): connecting was the check
            self.close()
            return ProbeResult.success("connected")
        while True:
            data = await link.read()
            if not data:
                self.close(abort=True)
                raise _ProbeError(FailureType.NETWORK, "connection closed before the expected bytes")
            if self.matcher.feed(data):
                break
        if not reuse:
            self.close()
        return ProbeResult.success("expected bytes received")


def _event_detail(ev: object) -> str:
    if isinstance(ev, ProtocolFailure):
        return ev.detail
    if isinstance(ev, StreamReset):
        return "connection closed mid-response"
    return "connection closed by the upstream"


# ============================================================================================ sessions
class _Session:
    """One host under checking: its state machine, its prober, its task."""

    def __init__(self, checker: HealthChecker, host: Host) -> None:
        self.checker = checker
        self.host = host
        self.health = HostHealth(checker.policy)
        self.prober = checker.make_prober(host)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"health_check:{self.checker.cluster.name}:{self.host.address_text}"
        )

    async def _run(self) -> None:
        delay = self.checker.policy.initial_delay()
        if delay > 0:
            await asyncio.sleep(delay)
        while True:
            result = await self._probe()
            verdict = self.checker.record(self, result)
            await asyncio.sleep(verdict.delay)

    async def _probe(self) -> ProbeResult:
        checker = self.checker
        checker.stats_attempt.inc()
        timeout = checker.policy.timeout
        try:
            async with asyncio.timeout(timeout):
                return await self.prober.probe()
        except TimeoutError:
            self.prober.close(abort=True)
            return ProbeResult.fail(FailureType.NETWORK_TIMEOUT, f"no answer within {timeout}s")
        except _ProbeError as e:
            return ProbeResult.fail(e.failure, e.detail)
        except (OSError, ssl.SSLError, CodecError) as e:
            self.prober.close(abort=True)
            return ProbeResult.fail(FailureType.NETWORK, str(e) or type(e).__name__)
        except Exception as e:  # our own bug: keep checking, but say so loudly
            log.exception(
                "cluster %s: health check of %s crashed", checker.cluster.name, self.host.address_text
            )
            self.prober.close(abort=True)
            return ProbeResult.fail(FailureType.NETWORK, f"internal error: {e!r}")

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.prober.close(abort=True)

    def __repr__(self) -> str:
        return f"<_Session {self.host.address_text} {self.health!r}>"


# ============================================================================================ the checker
class HealthChecker:
    """Active health checking of one cluster's hosts (the first of ``checks``; Envoy allows one)."""

    def __init__(
        self,
        cluster: UpstreamCluster,
        checks: Sequence[HealthCheck],
        on_change: Callable[[], None],
        rng: random.Random,
        *,
        on_check: Callable[[Host, bool], None] | None = None,
    ) -> None:
        """``on_change()`` runs after any host's verdict flipped; ``on_check(host, passed)`` (optional)
        after every check (e.g. outlier detection's ``successful_active_health_check_uneject_host``)."""
        self.cluster = cluster
        self.checks = tuple(checks)
        self._on_change = on_change
        self._on_check = on_check
        self._rng = rng
        self._check = self.checks[0] if self.checks else None
        self._policy = HealthCheckPolicy(self._check, rng) if self._check is not None else None
        self._sessions: dict[Host, _Session] = {}
        self._first_round: asyncio.Future[None] | None = None
        self._round_hosts: set[Host] = set()
        self._started = False
        self._stopped = False
        self._ssl: dict[tuple[str, ...], ssl.SSLContext] = {}
        scope = cluster.stats.scope("health_check.")
        self.stats_attempt = scope.counter("attempt")
        self.stats_success = scope.counter("success")
        self.stats_failure = scope.counter("failure")
        self.stats_network_failure = scope.counter("network_failure")
        self.stats_passive_failure = scope.counter("passive_failure")
        self.stats_verify_cluster = scope.counter("verify_cluster")
        self.stats_healthy = scope.gauge("healthy")
        self.stats_degraded = scope.gauge("degraded")
        cs = cluster.stats
        self._traffic = (
            cs.counter("upstream_cx_total"),
            cs.counter("upstream_cx_connect_fail"),
            cs.counter("upstream_rq_total"),
        )

    # -- what sessions use -------------------------------------------------------------------------
    @property
    def check(self) -> HealthCheck:
        assert self._check is not None
        return self._check

    @property
    def policy(self) -> HealthCheckPolicy:
        assert self._policy is not None
        return self._policy

    @property
    def http(self) -> HttpHealthCheck:
        http = self.check.http_health_check
        assert http is not None
        return http

    def make_prober(self, host: Host) -> _Prober:
        check = self.check
        if check.grpc_health_check is not None:
            return _Http2Prober(self, host, grpc=True)
        if check.tcp_health_check is not None:
            return _TcpProber(self, host)
        http = self.http
        codec = http.codec_client_type or self.cluster.config.upstream_protocol
        if codec == "HTTP2":
            return _Http2Prober(self, host, grpc=False)
        return _Http1Prober(self, host)

    def ssl_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        """The cluster's context when ``alpn`` is what it offers (or the check has no ALPN), else our own."""
        cluster_alpn = ("h2",) if self.cluster.config.upstream_protocol == "HTTP2" else ("http/1.1",)
        if not alpn or alpn == cluster_alpn:
            return self.cluster.ssl_context()
        ctx = self._ssl.get(alpn)
        if ctx is None:
            tls_cfg = self.cluster.config.transport_socket
            assert tls_cfg is not None
            ctx = self._ssl[alpn] = _tls.client_context(tls_cfg, list(alpn))
        return ctx

    def had_traffic(self) -> bool:
        """The cluster has ever tried to carry traffic (then Envoy leaves the no-traffic intervals)."""
        return any(c.value for c in self._traffic)

    def record(self, session: _Session, result: ProbeResult) -> Verdict:
        """Feed one probe result to the host's state machine and apply the verdict."""
        loop = asyncio.get_running_loop()
        verdict = session.health.record(result, loop.time(), self.had_traffic())
        host = session.host
        check = self.check
        if result.passed:
            self.stats_success.inc()
            level = logging.INFO if check.always_log_health_check_success else logging.DEBUG
            log.log(level, "cluster %s: health check of %s passed (%s)", self.cluster.name,
                    host.address_text, result.detail)  # fmt: skip
        else:
            self.stats_failure.inc()
            if result.failure in (FailureType.NETWORK, FailureType.NETWORK_TIMEOUT):
                self.stats_network_failure.inc()
            level = logging.INFO if check.always_log_health_check_failures else logging.DEBUG
            log.log(level, "cluster %s: health check of %s failed (%s): %s", self.cluster.name,
                    host.address_text, result.failure.value if result.failure else "?",
                    result.detail)  # fmt: skip
        self._apply(session, verdict, result.detail)
        if self._on_check is not None:
            try:
                self._on_check(host, result.passed)
            except Exception:
                log.exception("cluster %s: on_check callback failed", self.cluster.name)
        return verdict

    def _apply(self, session: _Session, verdict: Verdict, detail: str) -> None:
        host = session.host
        if verdict.flipped:
            host.healthy = verdict.healthy
            log.info("cluster %s: host %s is now %s%s", self.cluster.name, host.address_text,
                     "healthy" if verdict.healthy else "unhealthy",
                     "" if verdict.healthy else f" ({detail})")  # fmt: skip
        self._update_gauge()
        if verdict.flipped:
            self._notify()
        if verdict.first:
            self._round_hosts.discard(host)
            self._maybe_round_done()

    def _notify(self) -> None:
        try:
            self._on_change()
        except Exception:
            log.exception("cluster %s: health change callback failed", self.cluster.name)

    def _update_gauge(self) -> None:
        self.stats_healthy.set(sum(1 for h in self._sessions if h.healthy))

    def _maybe_round_done(self) -> None:
        fut = self._first_round
        if fut is not None and not fut.done() and not self._round_hosts:
            fut.set_result(None)

    # -- public API -------------------------------------------------------------------------------
    @property
    def first_round(self) -> asyncio.Future[None]:
        """Resolves when every host present at ``start()`` has had its first verdict (cancelled by
        ``stop()`` before that). Created on first access; needs a running loop."""
        if self._first_round is None:
            self._first_round = asyncio.get_running_loop().create_future()
            if self._started and not self._round_hosts:
                self._first_round.set_result(None)
        return self._first_round

    def start(self) -> None:
        """Mark every host unhealthy-pending and schedule its first check (after ``initial_jitter``)."""
        if self._started:
            return
        self._started = True
        if self._check is not None:
            self._round_hosts = set(self.cluster.hosts)
        _ = self.first_round  # (done at once when there is nothing to check)
        if self._check is None:
            self._maybe_round_done()
            return
        self.hosts_changed()
        self._maybe_round_done()

    def hosts_changed(self) -> None:
        """Re-read ``cluster.hosts``: new hosts start unhealthy-pending and are checked; removed hosts'
        checks and connections stop."""
        if not self._started or self._stopped or self._check is None:
            return
        current = list(self.cluster.hosts)
        keep = set(current)
        for host in [h for h in self._sessions if h not in keep]:
            self._sessions.pop(host).stop()
            self._round_hosts.discard(host)
        flipped = False
        for host in current:
            if host in self._sessions:
                continue
            session = self._sessions[host] = _Session(self, host)
            if host.healthy:
                host.healthy = False
                flipped = True
            session.start()
        self._update_gauge()
        if flipped:
            self._notify()
        self._maybe_round_done()

    def report_immediate_failure(self, host: Host) -> None:
        """Traffic saw ``x-envoy-immediate-health-check-fail`` from ``host``: fail it now (``PASSIVE``)."""
        session = self._sessions.get(host)
        if session is None or self._stopped:
            return
        self.stats_failure.inc()
        self.stats_passive_failure.inc()
        verdict = session.health.record(
            ProbeResult.fail(FailureType.PASSIVE, "immediate health check fail"),
            asyncio.get_running_loop().time(),
            self.had_traffic(),
        )
        self._apply(session, verdict, "x-envoy-immediate-health-check-fail")

    async def stop(self) -> None:
        """Cancel every check and close the probe connections."""
        self._stopped = True
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for s in sessions:
            s.stop()
        tasks = [s.task for s in sessions if s.task is not None]
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        fut = self._first_round
        if fut is not None and not fut.done():
            fut.cancel()

    def __repr__(self) -> str:
        kind = self._check.kind if self._check is not None else "none"
        healthy = sum(1 for h in self._sessions if h.healthy)
        state = "stopped" if self._stopped else "running" if self._started else "new"
        return f"<HealthChecker {self.cluster.name} {kind} {state} healthy={healthy}/{len(self._sessions)}>"
