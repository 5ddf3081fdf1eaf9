"""A CoAP (RFC 7252, UDP) load generator: confirmable requests, N in flight, over one or several sockets.

    .venv/bin/python bench/coapload.py 127.0.0.1:5683 --path /bench -c 32 --sockets 4 -d 10 -w 2 [--json]
    .venv/bin/python bench/coapload.py 127.0.0.1:5683 --method POST --payload 64 -c 16 --requests 100000
    .venv/bin/python bench/coapload.py 127.0.0.1:5683 --requests 1000000 --rss-pid 1234 --rss-every 100000

Closed loop: ``--concurrency`` requests are kept in flight in total, spread evenly over ``--sockets`` UDP
sockets (each one a CoAP endpoint of its own: a source port, its own message ids and tokens); every response
releases the next request on the same socket. The run lasts ``--warmup`` + ``--duration`` seconds (only the
duration is measured), or, with ``--requests N``, until N requests have been answered (or failed), all of
them measured. Requests still outstanding at the end are drained (not counted) for at most ``--drain`` s.

Each request is a confirmable GET (``--method POST``/``PUT``: with ``--payload`` bytes) to ``--path`` with a
``--token-length``-byte token. Responses are matched the RFC 7252 way: a piggybacked response in the ACK
(same message id; its token must be the request's, else it is the stale answer a server's deduplication
cache gives for a reused message id: ``token_mismatch``); an empty ACK stops the retransmissions and the
response comes later as a separate CON (acknowledged with an empty ACK; a retransmitted one is acknowledged
again) or NON; a Reset fails the request. A confirmable request without ACK is retransmitted after
ACK_TIMEOUT (2 s) x a random factor in [1, 1.5], doubling, at most 4 times (``timeout`` after that); a
separate response that does not come within ``--separate-timeout`` is a ``timeout`` too.

Message ids run up per socket from a random start. RFC 7252 §4.4 forbids reusing one within
EXCHANGE_LIFETIME (247 s), which caps one endpoint at 65536 / 247 s = 265 requests/s; so after
``--mids-per-socket`` (default 65536) message ids a socket is retired (it finishes what it has in flight)
and a fresh one (a new source port: a new endpoint) takes its place. ``--wrap`` keeps the sockets and lets
the message ids wrap instead (what a client that ignores §4.4 does; a deduplicating server then answers
from its cache). ``--mids-per-socket 1`` sends every request from a new source port.

Reported: answered requests/s, latency (first transmission to response) p50/p90/p99/max, the response
code histogram, retransmissions, separate responses, errors by kind, the generator's own CPU, and for every
``--watch-pid LABEL=PID`` its CPU (µs per request) and RSS at the window's edges. ``--rss-pid PID
--rss-every N`` samples that process's VmRSS every N finished requests (the memory series).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import math
import random
import signal
import socket
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from mqttload import proc_rss_kib  # noqa: E402
from procs import interrupt, loop_factory, percentile, positive, proc_cpu_seconds, self_cpu  # noqa: E402

from microenvoy.codecs.coap.message import (  # noqa: E402
    ACK,
    CON,
    RST,
    CoapFormatError,
    Message,
    Opt,
    code_text,
    decode,
    encode,
    is_request_code,
)

__all__ = ["LoadSpec", "format_report", "main", "probe", "run_load"]

METHOD_CODES = {"GET": 1, "POST": 2, "PUT": 3, "DELETE": 4}
ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
_TICK = 0.05  # the retransmission / timeout sweep period (s)
_RECENT_ACKED = 4096  # separate responses remembered per socket to re-acknowledge a retransmitted one


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to run: the server, the requests and how many, the measured window."""

    host: str = "127.0.0.1"
    """Server address."""
    port: int = 5683
    """Server UDP port."""
    path: str = "/bench"
    """Uri-Path of every request (split on ``/`` into Uri-Path options)."""
    method: str = "GET"
    """GET, POST, PUT or DELETE."""
    payload: int = 0
    """Request payload bytes (POST/PUT)."""
    concurrency: int = 16
    """Requests in flight in total."""
    sockets: int = 1
    """UDP sockets (endpoints) the requests are spread over."""
    duration: float = 10.0
    """Measured seconds (duration mode)."""
    warmup: float = 2.0
    """Unmeasured seconds before the window (duration mode)."""
    requests: int = 0
    """Request mode: stop after this many finished requests (0: duration mode)."""
    drain: float = 10.0
    """Seconds to wait for the outstanding requests at the end."""
    separate_timeout: float = 30.0
    """Seconds to wait for a separate response after its empty ACK."""
    token_length: int = 4
    """Token bytes (1..8)."""
    mids_per_socket: int = 65536
    """Message ids a socket uses before it is replaced by a fresh one."""
    wrap: bool = False
    """Never replace sockets: message ids wrap around (violates RFC 7252 §4.4 beyond 265 req/s)."""
    rss_pid: int = 0
    """Sample this process's VmRSS every ``rss_every`` finished requests."""
    rss_every: int = 100000
    """Sampling period in finished requests."""
    progress: bool = False
    """Print every RSS sample to stderr as it is taken."""
    watch: tuple[tuple[str, int], ...] = ()
    """(label, pid) of processes whose CPU and RSS are read at the window's edges."""


class _Req:
    """One request in flight."""

    __slots__ = ("acked", "data", "deadline", "ep", "mid", "start", "timeout", "token", "tries")

    def __init__(self, ep: _Endpoint, mid: int, token: bytes, data: bytes, now: float) -> None:
        self.ep = ep
        self.mid = mid
        self.token = token
        self.data = data
        self.start = now
        self.tries = 0
        self.timeout = ACK_TIMEOUT * (1 + random.random() * (ACK_RANDOM_FACTOR - 1))
        self.deadline = now + self.timeout
        self.acked = False
        """An empty ACK came: no retransmissions, a separate response is due by ``deadline``."""

    def __repr__(self) -> str:
        return f"<_Req mid={self.mid} token={self.token.hex()} tries={self.tries} acked={self.acked}>"


class _Run:
    """The whole run's counters and the request budget."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.options: tuple[tuple[int, bytes], ...] = tuple(
            (Opt.URI_PATH, seg.encode()) for seg in spec.path.split("/") if seg
        )
        if spec.method in ("POST", "PUT"):
            self.options = (*self.options, (Opt.CONTENT_FORMAT, bytes([42])))  # application/octet-stream
        self.code = METHOD_CODES[spec.method]
        self.body = (b"coapload" * (spec.payload // 8 + 1))[: spec.payload] if spec.payload else b""
        self.issued = 0
        self.finished = 0
        """Requests answered or failed."""
        self.answered = 0
        self.stop_issuing = False
        self.measuring = spec.requests > 0
        self.latencies = array.array("d")
        self.codes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.retransmissions = 0
        self.late_acks = 0
        """ACKs/RSTs for a message id no longer awaited (answers to retransmissions)."""
        self.separate = 0
        self.endpoints_opened = 0
        self.rss_series: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.done = asyncio.get_running_loop().create_future()
        """Request mode: resolved when ``requests`` requests have finished."""
        self.drained = asyncio.Event()
        """Set by the sweep once issuing has stopped and nothing is in flight."""

    def __repr__(self) -> str:
        return f"<_Run issued={self.issued} finished={self.finished} answered={self.answered}>"

    def may_issue(self) -> bool:
        if self.stop_issuing:
            return False
        if self.spec.requests and self.issued >= self.spec.requests:
            return False
        return True

    def finish(self, req: _Req, now: float, code: int | None, error: str | None) -> None:
        self.finished += 1
        if code is not None:
            self.answered += 1
            if self.measuring:
                self.latencies.append(now - req.start)
                self.codes[code_text(code)] += 1
        if error is not None and self.measuring:
            self.errors[error] += 1
        spec = self.spec
        if spec.rss_pid and self.finished % spec.rss_every == 0:
            self.sample_rss(now)
        if spec.requests and self.finished >= spec.requests and not self.done.done():
            self.done.set_result(None)

    def sample_rss(self, now: float) -> None:
        try:
            kib = proc_rss_kib(self.spec.rss_pid)
        except (OSError, RuntimeError):
            kib = -1
        sample = {"requests": self.finished, "rss_kib": kib, "t_s": round(now - self.t0, 2)}
        self.rss_series.append(sample)
        if self.spec.progress:
            print(f"coapload: {self.finished} requests, RSS {kib} KiB at {sample['t_s']} s", file=sys.stderr)


class _Endpoint(asyncio.DatagramProtocol):
    """One UDP socket connected to the server: its message ids, tokens and requests in flight."""

    def __init__(self, run: _Run, lane: _Lane) -> None:
        self.run = run
        self.lane = lane
        self.transport: asyncio.DatagramTransport | None = None
        self.mid = random.randrange(0x10000)
        self.mids_used = 0
        self.token = random.randrange(1 << (8 * run.spec.token_length))
        self.by_mid: dict[int, _Req] = {}
        """Requests whose ACK is still due."""
        self.by_token: dict[bytes, _Req] = {}
        """Every request in flight (a separate response finds it by token)."""
        self.recent_acked: deque[int] = deque(maxlen=_RECENT_ACKED)
        self.retired = False

    def __repr__(self) -> str:
        return f"<_Endpoint mid={self.mid} inflight={len(self.by_token)} retired={self.retired}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        if self.run.measuring:
            self.run.errors[f"socket: {type(exc).__name__}"] += 1

    def exhausted(self) -> bool:
        return not self.run.spec.wrap and self.mids_used >= self.run.spec.mids_per_socket

    def send_request(self, now: float) -> None:
        run = self.run
        mid = self.mid
        self.mid = (mid + 1) & 0xFFFF
        self.mids_used += 1
        tl = run.spec.token_length
        self.token = (self.token + 1) % (1 << (8 * tl))
        token = self.token.to_bytes(tl, "big")
        data = encode(Message(CON, run.code, mid, token, run.options, run.body))
        req = _Req(self, mid, token, data, now)
        stale = self.by_mid.pop(mid, None)  # only with --wrap and 65536 in flight on one socket
        if stale is not None:
            self._fail(stale, now, "mid_reused_in_flight")
        self.by_mid[mid] = req
        self.by_token[token] = req
        run.issued += 1
        assert self.transport is not None
        self.transport.sendto(data)

    def _complete(self, req: _Req, now: float, code: int | None, error: str | None) -> None:
        self.by_mid.pop(req.mid, None)
        if self.by_token.get(req.token) is req:
            del self.by_token[req.token]
        self.run.finish(req, now, code, error)
        self.lane.released(self, now)

    def _fail(self, req: _Req, now: float, error: str) -> None:
        self._complete(req, now, None, error)

    def _send(self, msg: Message) -> None:
        assert self.transport is not None
        self.transport.sendto(encode(msg))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.monotonic()
        run = self.run
        try:
            msg = decode(data)
        except CoapFormatError:
            if run.measuring:
                run.errors["malformed"] += 1
            return
        if msg.mtype == ACK or msg.mtype == RST:
            req = self.by_mid.get(msg.mid)
            if req is None:  # the answer to a retransmission whose original was answered: not an error
                if run.measuring:
                    run.late_acks += 1
                return
            if msg.mtype == RST:
                self._fail(req, now, "reset")
            elif msg.code == 0:  # empty ACK: the response comes separately
                del self.by_mid[msg.mid]
                req.acked = True
                req.deadline = now + run.spec.separate_timeout
                if run.measuring:
                    run.separate += 1
            elif msg.token != req.token:
                self._fail(req, now, "token_mismatch")
            else:
                self._complete(req, now, msg.code, None)
            return
        if msg.code == 0:  # CoAP ping (CON) or an empty NON: a Reset is the answer to a ping
            if msg.mtype == CON:
                self._send(Message(RST, 0, msg.mid))
            return
        if is_request_code(msg.code):
            if run.measuring:
                run.errors["request_received"] += 1
            if msg.mtype == CON:
                self._send(Message(RST, 0, msg.mid))
            return
        # a separate response (CON or NON)
        req = self.by_token.get(msg.token)
        if req is None:
            if msg.mtype == CON:
                if msg.mid in self.recent_acked:  # our ACK got lost: the server retransmitted it
                    self._send(Message(ACK, 0, msg.mid))
                else:
                    self._send(Message(RST, 0, msg.mid))
                    if run.measuring:
                        run.errors["unexpected_response"] += 1
            return
        if msg.mtype == CON:
            self._send(Message(ACK, 0, msg.mid))
            self.recent_acked.append(msg.mid)
        self._complete(req, now, msg.code, None)

    def sweep(self, now: float) -> None:
        """Retransmit the requests whose ACK is overdue; fail what has run out of time."""
        due = [r for r in self.by_token.values() if r.deadline <= now]
        for req in due:
            if req.acked:
                self._fail(req, now, "timeout")
            elif req.tries >= MAX_RETRANSMIT:
                self._fail(req, now, "timeout")
            else:
                req.tries += 1
                req.timeout *= 2
                req.deadline = now + req.timeout
                self.run.retransmissions += 1
                assert self.transport is not None
                self.transport.sendto(req.data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Lane:
    """The requests of one ``--sockets`` slot: a current endpoint and the retired ones still draining."""

    def __init__(self, run: _Run, slots: int) -> None:
        self.run = run
        self.slots = slots
        self.current: _Endpoint | None = None
        self.draining: list[_Endpoint] = []
        self.pending_open = 0
        """Requests waiting for a fresh endpoint to be opened."""

    def __repr__(self) -> str:
        return f"<_Lane slots={self.slots} draining={len(self.draining)}>"

    async def open(self) -> _Endpoint:
        loop = asyncio.get_running_loop()
        spec = self.run.spec
        family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
        _, ep = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self.run, self), remote_addr=(spec.host, spec.port), family=family
        )
        self.run.endpoints_opened += 1
        return ep

    async def start(self) -> None:
        self.current = await self.open()
        now = time.monotonic()
        for _ in range(self.slots):
            self.issue(now)

    def issue(self, now: float) -> None:
        if not self.run.may_issue():
            return
        ep = self.current
        if ep is None or ep.exhausted():
            if ep is not None:
                ep.retired = True
                self.draining.append(ep)
                self.current = None
            self.pending_open += 1
            if self.pending_open == 1:
                asyncio.get_running_loop().create_task(self._reopen())
            return
        ep.send_request(now)

    async def _reopen(self) -> None:
        try:
            self.current = await self.open()
        except OSError as exc:
            self.run.errors[f"socket: {type(exc).__name__}"] += 1
            self.run.stop_issuing = True
            return
        n, self.pending_open = self.pending_open, 0
        now = time.monotonic()
        for _ in range(n):
            self.issue(now)

    def released(self, ep: _Endpoint, now: float) -> None:
        if ep.retired and not ep.by_token:
            self.draining.remove(ep)
            ep.close()
        self.issue(now)

    def endpoints(self) -> list[_Endpoint]:
        return [*self.draining, *([self.current] if self.current else [])]

    def inflight(self) -> int:
        return sum(len(ep.by_token) for ep in self.endpoints())

    def sweep(self, now: float) -> None:
        for ep in self.endpoints():
            ep.sweep(now)

    def close(self) -> None:
        for ep in self.endpoints():
            ep.close()


def _validate(spec: LoadSpec) -> None:
    if spec.method not in METHOD_CODES:
        raise ValueError(f"--method must be one of {sorted(METHOD_CODES)}")
    if not 1 <= spec.token_length <= 8:
        raise ValueError("--token-length must be 1..8")
    if spec.concurrency < spec.sockets:
        raise ValueError("--concurrency must be at least --sockets")
    if not 1 <= spec.mids_per_socket <= 65536:
        raise ValueError("--mids-per-socket must be 1..65536")
    if spec.rss_pid and spec.rss_every <= 0:
        raise ValueError("--rss-every must be > 0")


def _watched(spec: LoadSpec) -> dict[str, tuple[float, int]]:
    out = {}
    for label, pid in spec.watch:
        try:
            out[label] = (proc_cpu_seconds(pid), proc_rss_kib(pid))
        except (OSError, RuntimeError):
            out[label] = (math.nan, -1)
    return out


async def _main(spec: LoadSpec) -> dict[str, Any]:
    run = _Run(spec)
    per, extra = divmod(spec.concurrency, spec.sockets)
    lanes = [_Lane(run, per + (1 if i < extra else 0)) for i in range(spec.sockets)]

    async def ticker() -> None:
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            for lane in lanes:
                lane.sweep(now)
            if run.stop_issuing and not any(lane.inflight() for lane in lanes):
                run.drained.set()
                if spec.requests and not run.done.done():
                    run.done.set_result(None)  # a socket could not be opened: nothing more will finish

    tick = asyncio.create_task(ticker())
    try:
        if spec.rss_pid:
            run.sample_rss(time.monotonic())
        w0 = _watched(spec)
        cpu0 = self_cpu()
        t0 = time.monotonic()
        if spec.requests:
            run.t0 = t0
            for lane in lanes:
                await lane.start()
            await run.done
            elapsed = time.monotonic() - t0
            finished0 = 0
        else:
            for lane in lanes:
                await lane.start()
            await asyncio.sleep(spec.warmup)
            run.measuring = True
            w0 = _watched(spec)
            cpu0 = self_cpu()
            t0 = time.monotonic()
            finished0 = run.answered
            await asyncio.sleep(spec.duration)
            run.measuring = False
            elapsed = time.monotonic() - t0
        cpu1 = self_cpu()
        w1 = _watched(spec)
        answered = run.answered - finished0 if not spec.requests else run.answered
        run.stop_issuing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.drained.wait(), spec.drain)
        unfinished = sum(lane.inflight() for lane in lanes)
        if spec.rss_pid and (not run.rss_series or run.rss_series[-1]["requests"] != run.finished):
            run.sample_rss(time.monotonic())
    finally:
        tick.cancel()
        for lane in lanes:
            lane.close()
    return _report(run, elapsed, answered, unfinished, cpu1 - cpu0, w0, w1)


def _report(
    run: _Run,
    elapsed: float,
    answered: int,
    unfinished: int,
    gen_cpu: float,
    w0: dict[str, tuple[float, int]],
    w1: dict[str, tuple[float, int]],
) -> dict[str, Any]:
    spec = run.spec
    lat = sorted(run.latencies)

    def per_req(cpu_s: float) -> float:
        return round(cpu_s / answered * 1e6, 2) if answered else math.nan

    def ms(q: float) -> float:
        return round(percentile(lat, q) * 1000, 3)

    watched = {
        label: {
            "pid": pid,
            "cpu_s": round(w1[label][0] - w0[label][0], 3),
            "cpu_pct": round((w1[label][0] - w0[label][0]) / elapsed * 100, 1),
            "cpu_us_per_req": per_req(w1[label][0] - w0[label][0]),
            "rss_before_kib": w0[label][1],
            "rss_after_kib": w1[label][1],
        }
        for label, pid in spec.watch
    }
    return {
        "spec": {k: v for k, v in asdict(spec).items() if k != "watch"},
        "window_s": round(elapsed, 3),
        "answered": answered,
        "rate": round(answered / elapsed, 1) if elapsed > 0 else math.nan,
        "latency_ms": {
            "p50": ms(0.5),
            "p90": ms(0.9),
            "p99": ms(0.99),
            "max": round(lat[-1] * 1000, 3) if lat else math.nan,
        },
        "codes": dict(sorted(run.codes.items())),
        "errors": sum(run.errors.values()),
        "error_kinds": dict(run.errors),
        "retransmissions": run.retransmissions,
        "late_acks": run.late_acks,
        "separate_responses": run.separate,
        "unfinished": unfinished,
        "issued_total": run.issued,
        "sockets_opened": run.endpoints_opened,
        "generator": {
            "cpu_s": round(gen_cpu, 3),
            "cpu_pct": round(gen_cpu / elapsed * 100, 1) if elapsed > 0 else math.nan,
            "cpu_us_per_req": per_req(gen_cpu),
        },
        "watched": watched,
        "rss_series": run.rss_series,
    }


def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Run one load (blocking) and return the report (see ``format_report`` for its fields)."""
    _validate(spec)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(_main(spec))


async def probe(host: str, port: int, path: str = "/bench", limit_s: float = 5.0) -> dict[str, Any]:
    """One confirmable GET; its code and round trip (retransmitted every 0.5 s, up to ``limit_s``)."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[tuple[Message, float]] = loop.create_future()
    token = random.randbytes(4)
    mid = random.randrange(0x10000)

    class _Probe(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            try:
                msg = decode(data)
            except CoapFormatError:
                return
            if msg.mtype == CON:
                transport.sendto(encode(Message(ACK, 0, msg.mid)))
            if msg.code and msg.token == token and not got.done():
                got.set_result((msg, time.monotonic()))

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    transport, _ = await loop.create_datagram_endpoint(_Probe, remote_addr=(host, port), family=family)
    opts = tuple((Opt.URI_PATH, s.encode()) for s in path.split("/") if s)
    data = encode(Message(CON, 1, mid, token, opts))
    t0 = time.monotonic()
    try:
        deadline = t0 + limit_s
        while not got.done():
            transport.sendto(data)
            try:
                await asyncio.wait_for(asyncio.shield(got), min(0.5, max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no CoAP answer from {host}:{port} in {limit_s} s") from None
        msg, t1 = got.result()
    finally:
        transport.close()
    return {
        "code": code_text(msg.code),
        "payload": msg.payload.decode(errors="replace"),
        "rtt_ms": (t1 - t0) * 1e3,
    }


def format_report(rep: dict[str, Any]) -> str:
    """A human-readable summary of a ``run_load`` report."""
    s = rep["spec"]
    body = f" {s['payload']} B" if s["payload"] else ""
    mode = (
        f"{s['requests']} requests"
        if s["requests"]
        else f"{s['duration']:g} s after {s['warmup']:g} s warm-up"
    )
    sockets = "wrapping mids" if s["wrap"] else f"new socket every {s['mids_per_socket']} mids"
    lat = rep["latency_ms"]
    gen = rep["generator"]
    lines = [
        f"target   coap://{s['host']}:{s['port']}{s['path']} CON {s['method']}{body},"
        f" {s['concurrency']} in flight over {s['sockets']} socket(s) ({sockets}), {mode}",
        f"answered {rep['answered']} in {rep['window_s']:.2f} s: {rep['rate']:.1f} req/s;"
        f" codes {rep['codes']}",
        f"latency  ms p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}  max {lat['max']:.3f}",
        f"exchange {rep['retransmissions']} retransmissions ({rep['late_acks']} late ACKs),"
        f" {rep['separate_responses']} separate responses,"
        f" {rep['sockets_opened']} sockets opened, {rep['unfinished']} unfinished after drain",
        f"errors   {rep['errors']} {rep['error_kinds'] or ''}",
        f"gen CPU  {gen['cpu_pct']:.0f} % of a core, {gen['cpu_us_per_req']} µs/req",
    ]
    for label, w in rep["watched"].items():
        lines.append(
            f"{label:<8} CPU {w['cpu_pct']:.0f} % of a core, {w['cpu_us_per_req']} µs/req;"
            f" RSS {w['rss_before_kib']} -> {w['rss_after_kib']} KiB"
        )
    if rep["rss_series"]:
        pid = s["rss_pid"]
        lines.append(
            f"RSS of {pid}: " + ", ".join(f"{x['requests']}: {x['rss_kib']}" for x in rep["rss_series"])
        )
    return "\n".join(lines)


def _watch(value: str) -> tuple[str, int]:
    label, _, pid = value.partition("=")
    if not pid.isdigit():
        raise argparse.ArgumentTypeError("expected LABEL=PID")
    return label, int(pid)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("server", help="HOST:PORT of the CoAP server ([v6]:port for IPv6)")
    p.add_argument("--path", default="/bench", help="Uri-Path")
    p.add_argument("-m", "--method", default="GET", choices=sorted(METHOD_CODES))
    p.add_argument("-s", "--payload", type=int, default=0, help="request payload bytes (POST/PUT)")
    p.add_argument("-c", "--concurrency", type=positive(int), default=16, help="requests in flight (total)")
    p.add_argument("--sockets", type=positive(int), default=1, help="UDP sockets (endpoints)")
    p.add_argument("-d", "--duration", type=positive(float), default=10.0, help="measured seconds")
    p.add_argument("-w", "--warmup", type=float, default=2.0, help="unmeasured seconds before")
    p.add_argument("-n", "--requests", type=int, default=0, help="stop after N finished requests")
    p.add_argument("--drain", type=float, default=10.0, help="max seconds for outstanding requests after")
    p.add_argument("--separate-timeout", type=positive(float), default=30.0)
    p.add_argument("--token-length", type=int, default=4)
    p.add_argument("--mids-per-socket", type=int, default=65536, help="then a fresh socket takes over")
    p.add_argument("--wrap", action="store_true", help="keep the sockets, let message ids wrap")
    p.add_argument("--rss-pid", type=int, default=0, help="sample this pid's VmRSS every --rss-every")
    p.add_argument("--rss-every", type=int, default=100000)
    p.add_argument("--progress", action="store_true", help="print each RSS sample to stderr")
    p.add_argument("--watch-pid", type=_watch, action="append", default=[], metavar="LABEL=PID")
    p.add_argument("--probe", action="store_true", help="one GET round trip, then exit")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    host, _, port = args.server.rpartition(":")
    if not host or not port.isdigit():
        p.error("server must be HOST:PORT")
    host = host.strip("[]")
    signal.signal(signal.SIGTERM, interrupt)
    if args.probe:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            res = runner.run(probe(host, int(port), args.path))
        print(json.dumps(res) if args.json else f"probe OK: {res}")
        return 0
    spec = LoadSpec(
        host=host, port=int(port), path=args.path, method=args.method, payload=args.payload,
        concurrency=args.concurrency, sockets=args.sockets, duration=args.duration, warmup=args.warmup,
        requests=args.requests, drain=args.drain, separate_timeout=args.separate_timeout,
        token_length=args.token_length, mids_per_socket=args.mids_per_socket, wrap=args.wrap,
        rss_pid=args.rss_pid, rss_every=args.rss_every, progress=args.progress, watch=tuple(args.watch_pid),
    )  # fmt: skip
    try:
        _validate(spec)
    except ValueError as exc:
        p.error(str(exc))
    try:
        rep = run_load(spec)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
