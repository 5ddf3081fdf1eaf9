"""An HTTP/3 load generator on aioquic: M connections x N concurrent streams, closed loop.

    .venv/bin/python bench/h3load.py https://127.0.0.1:4433/ -c 4 -m 8 -d 15 -w 3 [-p 2] [--json]

Every connection keeps N requests in flight; when one ends, the next is sent from the same event
callback, so new requests ride in the same UDP flush as the acknowledgements (no task per request). The
connections are spread over ``--processes`` worker processes (uvloop when installed), coordinated by this
(otherwise idle) parent process over pipes: all workers connect first (handshakes are not measured), then
run ``--warmup`` seconds unmeasured, then the measured window of ``--duration`` seconds (or until
``--requests`` responses). Requests still in flight at the end are drained, not counted.

Counted in the window: responses that *ended* inside it. ``req/s`` counts good responses only (status
``--expect-status``, default 200); everything else is an error, by kind: ``status`` (another status),
``reset`` (stream reset by the peer), ``timeout`` (no complete response within ``--timeout``; the stream is
then cancelled and replaced), ``connection`` (the connection closed under the request).

CPU: the generator reports its own CPU time (user+system of its worker processes) over the window, so a
reader can see whether it was the bottleneck. ``--watch-pid LABEL=PID`` (repeatable) also reads
``/proc/PID/stat`` (utime+stime, all threads) at the window's edges and reports CPU µs per good request.

Certificates are not verified (benchmark peers use throwaway self-signed ones).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import ctypes
import json
import math
import multiprocessing
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamReset
from procs import interrupt, loop_factory, percentile, proc_cpu_seconds, self_cpu

__all__ = ["LoadSpec", "ProbeResult", "format_report", "main", "probe", "proc_cpu_seconds", "run_load"]

_H3_REQUEST_CANCELLED = 0x10C


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to run: target, shape of the load and the measured window."""

    url: str
    """``https://host:port/path`` (host must be an IP literal or resolvable name)."""
    connections: int = 4
    """QUIC connections in total (spread over the processes)."""
    streams: int = 8
    """Concurrent request streams per connection."""
    duration: float = 10.0
    """Measured window in seconds (ignored when ``requests`` is set)."""
    requests: int = 0
    """If > 0: the window ends after this many responses (split over the processes)."""
    warmup: float = 2.0
    """Unmeasured load before the window, in seconds."""
    method: str = "GET"
    """Request method (POST when ``body_size`` > 0 and method is GET)."""
    body_size: int = 0
    """Request body size in bytes (0: no body)."""
    processes: int = 1
    """Worker processes of the generator."""
    timeout: float = 5.0
    """Per-request timeout in seconds."""
    connect_timeout: float = 5.0
    """QUIC handshake timeout in seconds."""
    expect_status: int = 200
    """Status that counts as success."""
    watch: tuple[tuple[str, int], ...] = ()
    """(label, pid) of processes whose CPU is read at the window's edges."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One request's outcome (HTTP/3 is the only protocol the client speaks)."""

    alpn: str | None
    """Negotiated ALPN (``h3``)."""
    status: int
    """Response status."""
    headers: list[tuple[str, str]]
    """Response headers, in order."""
    body: bytes
    """Response body."""


def _client_config(host: str) -> QuicConfiguration:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=host)
    config.verify_mode = ssl.CERT_NONE
    return config


def _target(url: str) -> tuple[str, int, str, bytes]:
    u = urlsplit(url)
    if u.scheme != "https" or not u.hostname:
        raise ValueError(f"not an https:// URL: {url!r}")
    port = u.port or 443
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    authority = f"[{u.hostname}]:{port}" if ":" in u.hostname else f"{u.hostname}:{port}"
    return u.hostname, port, path, authority.encode()


# ---------------------------------------------------------------------------------------------- worker
class _Run:
    """Per-process run state shared by the connections: phase, counters, latencies."""

    def __init__(self, spec: LoadSpec, limit: int) -> None:
        _host, _port, path, authority = _target(spec.url)
        method = "POST" if spec.body_size and spec.method == "GET" else spec.method
        self.body = b"x" * spec.body_size
        self.headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority),
            (b":path", path.encode()),
            (b"user-agent", b"microenvoy-h3load"),
        ]
        if self.body:
            self.headers += [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(len(self.body)).encode()),
            ]
        self.expect = spec.expect_status
        self.limit = limit
        self.issuing = True
        self.measuring = False
        self.ended = False
        self.latencies = array.array("d")
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self.lost_connections = 0
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.datagrams_window = (0, 0)
        self.inflight = 0
        self.drained = asyncio.Event()
        self.t_begin = 0.0
        self.t_end = 0.0
        self.cpu_begin = 0.0
        self.cpu_end = 0.0
        self.on_end: Callable[[], None] = lambda: None

    def __repr__(self) -> str:
        return f"<_Run ok={self.ok} errors={sum(self.errors.values())} measuring={self.measuring}>"

    def begin(self) -> None:
        self.cpu_begin = self_cpu()
        self.t_begin = time.monotonic()
        self.datagrams_window = (self.datagrams_in, self.datagrams_out)
        self.measuring = True

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.measuring:
            self.t_end = time.monotonic()
            self.cpu_end = self_cpu()
            self.datagrams_window = (
                self.datagrams_in - self.datagrams_window[0],
                self.datagrams_out - self.datagrams_window[1],
            )
            self.measuring = False
        self.issuing = False
        self.on_end()

    def complete(self, latency: float, status: int, error: str | None) -> None:
        if not self.measuring:
            return
        if error is None and status != self.expect:
            error = "status"
        if status:
            self.statuses[status] = self.statuses.get(status, 0) + 1
        if error is None:
            self.ok += 1
            self.latencies.append(latency)
            if self.limit and self.ok >= self.limit:
                self.end()
        else:
            self.errors[error] = self.errors.get(error, 0) + 1


class _CountingTransport:
    """Counts the datagrams a connection sends (uvloop's transports do not take new attributes)."""

    def __init__(self, transport: Any, run: _Run) -> None:
        self._transport = transport
        self._run = run

    def __repr__(self) -> str:
        return f"<_CountingTransport {self._transport!r}>"

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self._run.datagrams_out += 1
        self._transport.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _LoadProtocol(QuicConnectionProtocol):
    """One client connection that keeps ``streams`` requests in flight while the run is issuing."""

    def __init__(self, *args: Any, run: _Run, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.run = run
        self.inflight: dict[int, float] = {}
        self.status: dict[int, int] = {}
        self.closed = False

    def __repr__(self) -> str:
        return f"<_LoadProtocol inflight={len(self.inflight)} closed={self.closed}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_CountingTransport(transport, self.run))  # type: ignore[arg-type]

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.run.datagrams_in += 1
        super().datagram_received(data, addr)

    def send_request(self) -> None:
        run = self.run
        sid = self._quic.get_next_available_stream_id()
        if run.body:
            self.h3.send_headers(sid, run.headers)
            self.h3.send_data(sid, run.body, end_stream=True)
        else:
            self.h3.send_headers(sid, run.headers, end_stream=True)
        self.inflight[sid] = time.monotonic()
        run.inflight += 1

    def _done(self, sid: int, error: str | None) -> None:
        start = self.inflight.pop(sid, None)
        if start is None:
            return
        run = self.run
        run.inflight -= 1
        status = self.status.pop(sid, 0)
        run.complete(time.monotonic() - start, status, error)
        if run.issuing and not self.closed:
            self.send_request()
        elif not run.issuing and not run.inflight:
            run.drained.set()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset):
            self._done(event.stream_id, "reset")
            return
        if isinstance(event, ConnectionTerminated):
            self.closed = True
            if self.run.issuing:
                self.run.lost_connections += 1
            for sid in list(self.inflight):
                self._done(sid, "connection")
            return
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                if ev.stream_id not in self.status:
                    for k, v in ev.headers:
                        if k == b":status":
                            self.status[ev.stream_id] = int(v)
                            break
                if ev.stream_ended:
                    self._done(ev.stream_id, None)
            elif isinstance(ev, DataReceived) and ev.stream_ended:
                self._done(ev.stream_id, None)

    def expire(self, now: float, timeout: float) -> None:
        """Cancel requests older than ``timeout`` (counted as errors) and replace them."""
        late = [sid for sid, t in self.inflight.items() if now - t > timeout]
        for sid in late:
            with contextlib.suppress(Exception):
                self._quic.reset_stream(sid, _H3_REQUEST_CANCELLED)
                self._quic.stop_stream(sid, _H3_REQUEST_CANCELLED)
            self._done(sid, "timeout")
        if late:
            self.transmit()


async def _worker_main(spec: LoadSpec, connections: int, limit: int, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    run = _Run(spec, limit)
    host, port, _path, _auth = _target(spec.url)
    config = _client_config(host)

    def factory(*args: Any, **kwargs: Any) -> _LoadProtocol:
        return _LoadProtocol(*args, run=run, **kwargs)

    async with contextlib.AsyncExitStack() as stack:
        protos: list[_LoadProtocol] = []
        async with asyncio.timeout(spec.connect_timeout):
            for _ in range(connections):
                cm = connect(host, port, configuration=config, create_protocol=factory)
                proto = await stack.enter_async_context(cm)
                assert isinstance(proto, _LoadProtocol)
                protos.append(proto)
        pipe.send(("ready",))
        msg = await loop.run_in_executor(None, pipe.recv)
        if msg[0] != "go":
            return
        _, t_begin, t_end = msg
        finished = loop.create_future()

        def on_end() -> None:
            pipe.send(("done", run.t_begin, run.t_end))
            if not finished.done():
                finished.set_result(None)

        run.on_end = on_end
        for proto in protos:
            for _ in range(spec.streams):
                proto.send_request()
            proto.transmit()
        loop.call_later(max(0.0, t_begin - time.monotonic()), run.begin)
        if t_end is not None:
            loop.call_later(max(0.0, t_end - time.monotonic()), run.end)

        async def watchdog() -> None:
            while True:
                await asyncio.sleep(min(0.25, spec.timeout / 4))
                now = time.monotonic()
                for proto in protos:
                    proto.expire(now, spec.timeout)
                if all(p.closed for p in protos):
                    run.end()  # nothing left to measure with

        dog = asyncio.ensure_future(watchdog())
        try:
            await finished
            # Drain: let in-flight requests finish (not counted) so the server sees no resets.
            if run.inflight:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(spec.timeout, 2.0)):
                        await run.drained.wait()
        finally:
            dog.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3.0):
                await stack.aclose()  # closes every connection and waits for it
    pipe.send(
        (
            "result",
            {
                "ok": run.ok,
                "errors": run.errors,
                "statuses": run.statuses,
                "lost_connections": run.lost_connections,
                "cpu": run.cpu_end - run.cpu_begin,
                "datagrams": run.datagrams_window,
                "latencies": run.latencies.tobytes(),
            },
        )
    )


def _worker(spec: LoadSpec, connections: int, limit: int, pipe: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    with contextlib.suppress(Exception):  # ... and if the parent dies, so do we (Linux)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(_worker_main(spec, connections, limit, pipe))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


# ---------------------------------------------------------------------------------------------- parent
def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@dataclass
class _Coordinator:
    spec: LoadSpec
    procs: list[multiprocessing.process.BaseProcess] = field(default_factory=list)
    pipes: list[Connection] = field(default_factory=list)

    def recv(self, pipe: Connection, deadline: float, want: str) -> tuple[Any, ...]:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not pipe.poll(left):
                raise TimeoutError(f"load worker did not report {want!r} in time")
            msg: tuple[Any, ...] = pipe.recv()
            if msg[0] == "error":
                raise RuntimeError(f"load worker failed: {msg[1]}")
            if msg[0] == want:
                return msg

    def stop(self, *, now: bool) -> None:
        """Let the workers finish (``now=False``: they are done or waiting for "go"), else kill them."""
        for pipe in self.pipes:
            with contextlib.suppress(Exception):
                pipe.send(("stop",))
        for proc in self.procs:
            if not now:
                proc.join(timeout=3)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=3)


def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Run the load described by ``spec`` and return the report (see ``--json``)."""
    if spec.processes < 1 or spec.connections < spec.processes:
        raise ValueError("need 1 <= processes <= connections")
    ctx = multiprocessing.get_context("spawn")
    conns = _split(spec.connections, spec.processes)
    limits = _split(spec.requests, spec.processes) if spec.requests else [0] * spec.processes
    co = _Coordinator(spec)
    try:
        for n, limit in zip(conns, limits, strict=True):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(spec, n, limit, child_end), daemon=True)
            proc.start()
            child_end.close()
            co.procs.append(proc)
            co.pipes.append(parent_end)
        deadline = time.monotonic() + spec.connect_timeout + 15.0  # + interpreter start-up
        for pipe in co.pipes:
            co.recv(pipe, deadline, "ready")
        t_begin = time.monotonic() + 0.05 + spec.warmup
        t_end = None if spec.requests else t_begin + spec.duration
        for pipe in co.pipes:
            pipe.send(("go", t_begin, t_end))
        time.sleep(max(0.0, t_begin - time.monotonic()))
        cpu0 = {label: proc_cpu_seconds(pid) for label, pid in spec.watch}
        if t_end is not None:
            time.sleep(max(0.0, t_end - time.monotonic()))
            cpu1 = {label: proc_cpu_seconds(pid) for label, pid in spec.watch}
        window_deadline = (t_end or t_begin + 3600.0) + spec.timeout + 5.0
        done = [co.recv(pipe, window_deadline, "done") for pipe in co.pipes]
        if t_end is None:
            cpu1 = {label: proc_cpu_seconds(pid) for label, pid in spec.watch}
        results = [co.recv(pipe, time.monotonic() + spec.timeout + 10.0, "result")[1] for pipe in co.pipes]
    except BaseException:
        co.stop(now=True)
        raise
    co.stop(now=False)
    elapsed = t_end - t_begin if t_end is not None else max(d[2] for d in done) - min(d[1] for d in done)
    latencies: list[float] = []
    for r in results:
        a = array.array("d")
        a.frombytes(r["latencies"])
        latencies.extend(a)
    latencies.sort()
    ok = sum(r["ok"] for r in results)
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in r["statuses"].items():
            statuses[str(k)] = statuses.get(str(k), 0) + v
    gen_cpu = sum(r["cpu"] for r in results)
    per_req = lambda s: s / ok * 1e6 if ok else math.nan  # noqa: E731
    watched = {
        label: {
            "pid": pid,
            "cpu_s": round(cpu1[label] - cpu0[label], 3),
            "cpu_pct": round((cpu1[label] - cpu0[label]) / elapsed * 100, 1),
            "cpu_us_per_req": round(per_req(cpu1[label] - cpu0[label]), 1),
        }
        for label, pid in spec.watch
    }
    ms = 1000.0
    return {
        "spec": {k: v for k, v in asdict(spec).items() if k != "watch"},
        "concurrency": spec.connections * spec.streams,
        "window_s": round(elapsed, 3),
        "requests": ok,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "statuses": statuses,
        "lost_connections": sum(r["lost_connections"] for r in results),
        "datagrams_per_req": {
            "in": round(sum(r["datagrams"][0] for r in results) / ok, 2) if ok else math.nan,
            "out": round(sum(r["datagrams"][1] for r in results) / ok, 2) if ok else math.nan,
        },
        "rps": round(ok / elapsed, 1) if elapsed > 0 else math.nan,
        "latency_ms": {
            "p50": round(percentile(latencies, 0.50) * ms, 3),
            "p90": round(percentile(latencies, 0.90) * ms, 3),
            "p99": round(percentile(latencies, 0.99) * ms, 3),
            "max": round(latencies[-1] * ms, 3) if latencies else math.nan,
            "mean": round(sum(latencies) / len(latencies) * ms, 3) if latencies else math.nan,
        },
        "generator": {
            "processes": spec.processes,
            "cpu_s": round(gen_cpu, 3),
            "cpu_pct": round(gen_cpu / elapsed * 100, 1),
            "cpu_us_per_req": round(per_req(gen_cpu), 1),
        },
        "watched": watched,
    }


def format_report(rep: dict[str, Any]) -> str:
    """A human-readable summary of a ``run_load`` report."""
    s = rep["spec"]
    lat = rep["latency_ms"]
    gen = rep["generator"]
    lines = [
        f"target   {s['url']}  {s['connections']} conn x {s['streams']} streams = {rep['concurrency']}"
        f" concurrent, {gen['processes']} generator process(es)",
        f"window   {rep['window_s']:.2f} s after {s['warmup']:.1f} s warm-up",
        f"requests {rep['requests']} ok, {rep['errors']} errors {rep['error_kinds'] or ''}"
        f" statuses {rep['statuses']}" + (f", {rep['lost_connections']} connections lost"
                                         if rep["lost_connections"] else ""),
        f"req/s    {rep['rps']:.1f}",
        f"latency  p50 {lat['p50']:.2f} ms  p90 {lat['p90']:.2f} ms  p99 {lat['p99']:.2f} ms"
        f"  max {lat['max']:.2f} ms",
        f"gen CPU  {gen['cpu_s']:.2f} s = {gen['cpu_pct']:.0f} % of one core,"
        f" {gen['cpu_us_per_req']:.0f} µs/req",
        f"UDP      {rep['datagrams_per_req']['in']:.2f} datagrams received and"
        f" {rep['datagrams_per_req']['out']:.2f} sent per request (client side)",
    ]  # fmt: skip
    for label, w in rep["watched"].items():
        lines.append(
            f"{label:<8} pid {w['pid']}: {w['cpu_s']:.2f} s CPU = {w['cpu_pct']:.0f} % of one core,"
            f" {w['cpu_us_per_req']:.0f} µs/req"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- probe
class _ProbeProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A handshake failure surfaces from connect(); do not also log this future's exception.
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())

    def __repr__(self) -> str:
        return f"<_ProbeProtocol done={self.done.done()}>"

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset | ConnectionTerminated) and not self.done.done():
            self.done.set_exception(ConnectionError(f"request failed: {event}"))
            return
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                self.headers.extend(ev.headers)
            elif isinstance(ev, DataReceived):
                self.body += ev.data
            if isinstance(ev, HeadersReceived | DataReceived) and ev.stream_ended and not self.done.done():
                self.done.set_result(None)


async def probe(url: str, limit_s: float = 5.0) -> ProbeResult:
    """One HTTP/3 GET; raises on failure or timeout."""
    host, port, path, authority = _target(url)
    headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority),
               (b":path", path.encode()), (b"user-agent", b"microenvoy-h3load-probe")]  # fmt: skip
    async with asyncio.timeout(limit_s):
        async with connect(
            host, port, configuration=_client_config(host), create_protocol=_ProbeProtocol
        ) as c:
            assert isinstance(c, _ProbeProtocol)
            c.h3.send_headers(c._quic.get_next_available_stream_id(), headers, end_stream=True)
            c.transmit()
            await c.done
            alpn = c._quic.tls.alpn_negotiated
    hdrs = [(k.decode(), v.decode(errors="replace")) for k, v in c.headers]
    status = int(next(v for k, v in hdrs if k == ":status"))
    return ProbeResult(alpn=alpn, status=status, headers=hdrs, body=bytes(c.body))


# ---------------------------------------------------------------------------------------------- CLI
def _watch(value: str) -> tuple[str, int]:
    label, sep, pid = value.rpartition("=")
    if not sep or not label or not pid.isdigit():
        raise argparse.ArgumentTypeError("expected LABEL=PID")
    return label, int(pid)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="h3load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("url", help="https://HOST:PORT/PATH")
    p.add_argument("-c", "--connections", type=int, default=4, help="QUIC connections (default 4)")
    p.add_argument("-m", "--streams", type=int, default=8, help="concurrent streams per connection (8)")
    p.add_argument("-d", "--duration", type=float, default=10.0, help="measured seconds (10)")
    p.add_argument("-n", "--requests", type=int, default=0, help="measure this many responses instead")
    p.add_argument("-w", "--warmup", type=float, default=2.0, help="unmeasured warm-up seconds (2)")
    p.add_argument("-p", "--processes", type=int, default=1, help="generator worker processes (1)")
    p.add_argument("--method", default="GET")
    p.add_argument("--body-size", type=int, default=0, help="request body bytes (POST if > 0)")
    p.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, seconds (5)")
    p.add_argument("--expect-status", type=int, default=200)
    p.add_argument("--watch-pid", type=_watch, action="append", default=[], metavar="LABEL=PID",
                   help="report this process's CPU per request (repeatable)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--probe", action="store_true", help="send one GET, print status, headers and body")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    if args.probe:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            res = runner.run(probe(args.url, args.timeout))
        print(f"alpn {res.alpn}")
        for k, v in res.headers:
            print(f"{k}: {v}")
        print()
        sys.stdout.buffer.write(res.body)
        return 0 if res.status == args.expect_status else 1
    spec = LoadSpec(
        url=args.url, connections=args.connections, streams=args.streams, duration=args.duration,
        requests=args.requests, warmup=args.warmup, method=args.method, body_size=args.body_size,
        processes=args.processes, timeout=args.timeout, expect_status=args.expect_status,
        watch=tuple(args.watch_pid),
    )  # fmt: skip
    try:
        rep = run_load(spec)
    except KeyboardInterrupt:
        return 130
    print(json.dumps(rep, indent=2) if args.json else format_report(rep), flush=True)
    return 0 if rep["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
