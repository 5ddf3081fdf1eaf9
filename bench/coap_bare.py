"""A bare aiocoap server: the limit the CoAP benchmark compares microenvoy with, and the memory probe.

    .venv/bin/python bench/coap_bare.py --port 5683 [--path bench] [--payload-size 3]
    .venv/bin/python bench/coap_bare.py --port 0 --debug-memory 50000   # what aiocoap holds, every 50k
    .venv/bin/python bench/coap_bare.py --port 0 --exchange-lifetime 10 # the workaround, see below

One aiocoap ``Context`` (``create_server_context``, the ``udp6`` transport only, bound to ``--bind``) with a
``resource.Site`` holding one resource at ``--path``: GET answers 2.05 with ``--payload-size`` bytes
(``ok\\n`` by default; after ``--delay`` seconds: beyond 0.1 s aiocoap sends a separate response),
POST/PUT answer 2.04. Once bound it prints one JSON line on stdout,
``{"event": "listening", "port": P, "pid": N}``, then serves until SIGTERM/SIGINT. asyncio's own loop by
default (aiocoap's ``udp6`` transport does its own ``recvmsg`` with ancillary data through ``add_reader``);
``--uvloop`` runs it on uvloop (what the agent uses).

``--debug-memory N`` prints every N requests (stdout, ``#``-prefixed) the RSS, the sizes of aiocoap's
per-message structures (the message manager's ``_recent_messages`` deduplication cache,
``_active_exchanges``, ``_piggyback_opportunities``, the token manager's ``incoming_requests``, the loop's
scheduled timers), the longest garbage collection per generation and the object counts of the aiocoap
types, with their growth since the previous dump;
``--trace-frames F`` also runs ``tracemalloc`` (F frames deep; slow: it cuts the request rate by an order
of magnitude) and adds the top allocations by traceback. ``--exchange-lifetime S`` replaces aiocoap's
EXCHANGE_LIFETIME (247 s, RFC 7252 §4.8.2), for which the deduplication cache keeps every request
(``TransportTuning`` is a class, aiocoap has no public setting for it): how long it keeps them is what bounds
the memory.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import linecache
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path

import aiocoap
import aiocoap.resource
from aiocoap.numbers.constants import TransportTuning

__all__ = ["BenchResource", "main"]


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


class MemoryProbe:
    """Counts requests; every ``every`` of them prints what aiocoap holds and where the memory went."""

    def __init__(self, every: int, frames: int, top: int) -> None:
        self.every = every
        self.frames = frames
        self.top = top
        self.count = 0
        self.context: aiocoap.Context | None = None
        self.previous: tracemalloc.Snapshot | None = None
        self.previous_types: collections.Counter[str] = collections.Counter()
        self.gc_started = 0.0
        self.gc_longest: dict[int, float] = {}
        """The longest collection per generation (seconds) since the last dump."""
        if every:
            gc.callbacks.append(self._gc_timer)
        if every and frames:
            tracemalloc.start(frames)

    def __repr__(self) -> str:
        return f"<MemoryProbe count={self.count} every={self.every}>"

    def _gc_timer(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.gc_started = time.perf_counter()
        else:
            took = time.perf_counter() - self.gc_started
            gen = info["generation"]
            self.gc_longest[gen] = max(self.gc_longest.get(gen, 0.0), took)

    def seen(self) -> None:
        self.count += 1
        if self.every and self.count % self.every == 0:
            self.dump()

    def structures(self) -> dict[str, int]:
        """Sizes of aiocoap's per-exchange state in every message manager / token manager."""
        out: dict[str, int] = collections.Counter()
        loop = asyncio.get_running_loop()
        out["loop._scheduled timers"] = len(getattr(loop, "_scheduled", ()))
        for ri in getattr(self.context, "request_interfaces", ()):
            tm = ri
            out["tokenmanager.incoming_requests"] += len(getattr(tm, "incoming_requests", None) or ())
            out["tokenmanager.outgoing_requests"] += len(getattr(tm, "outgoing_requests", None) or ())
            mm = getattr(tm, "token_interface", None)
            for attr in ("_recent_messages", "_active_exchanges", "_backlogs", "_piggyback_opportunities"):
                value = getattr(mm, attr, None)
                if value is not None:
                    out[f"messagemanager.{attr}"] += len(value)
            recent = getattr(mm, "_recent_messages", None) or {}
            remotes = {key[0] for key in recent}
            out["distinct remotes in _recent_messages"] += len(remotes)
            out["_recent_messages holding a response"] += sum(1 for v in recent.values() if v is not None)
        return dict(out)

    def dump(self) -> None:
        traced = f"{tracemalloc.get_traced_memory()[0] >> 10} KiB" if self.frames else "off"
        lines = [f"# ---- {self.count} requests: RSS {_rss_kib()} KiB, tracemalloc {traced}"]
        lines += [f"#   {k}: {v}" for k, v in self.structures().items()]
        pauses = ", ".join(f"gen {g} {t * 1000:.0f} ms" for g, t in sorted(self.gc_longest.items()))
        lines.append(f"#   longest garbage collection per generation since the last dump: {pauses}")
        gc.callbacks.remove(self._gc_timer)
        gc.collect()  # count live objects only (not counted as a pause: the server's own collections are)
        gc.callbacks.append(self._gc_timer)
        self.gc_longest.clear()
        types: collections.Counter[str] = collections.Counter(
            type(o).__module__ + "." + type(o).__qualname__
            for o in gc.get_objects()
            if type(o).__module__.startswith(("aiocoap", "asyncio", "functools"))
        )
        lines.append("#   live objects (aiocoap/asyncio/functools types, growth since the last dump):")
        for name, n in types.most_common(12):
            lines.append(f"#     {n:>9} {n - self.previous_types.get(name, 0):>+9}  {name}")
        self.previous_types = types
        if self.frames:
            lines += self.allocations()
        print("\n".join(lines), flush=True)

    def allocations(self) -> list[str]:
        """The top allocation sites by traceback and their growth since the previous dump."""
        snap = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>"))
        )
        lines = []
        stats = snap.compare_to(self.previous, "traceback") if self.previous else snap.statistics("traceback")
        lines.append(f"#   top {self.top} allocations by traceback (size, growth, count):")
        for st in stats[: self.top]:
            diff = getattr(st, "size_diff", st.size)
            lines.append(f"#   {st.size >> 10:>8} KiB {diff >> 10:>+8} KiB {st.count:>8} blocks")
            for fr in st.traceback.format(limit=6, most_recent_first=True):
                lines.append("#       " + fr.strip())
        self.previous = snap
        linecache.clearcache()
        return lines


class BenchResource(aiocoap.resource.Resource):
    """GET: 2.05 with a fixed payload; POST/PUT: 2.04 (the body is read and dropped)."""

    def __init__(self, payload: bytes, probe: MemoryProbe, delay: float = 0.0) -> None:
        super().__init__()
        self.payload = payload
        self.probe = probe
        self.delay = delay
        """Seconds before answering (beyond aiocoap's 0.1 s EMPTY_ACK_DELAY: a separate response)."""

    def __repr__(self) -> str:
        return f"<BenchResource payload={len(self.payload)}B>"

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self.probe.seen()
        if self.delay:
            await asyncio.sleep(self.delay)
        return aiocoap.Message(code=aiocoap.CONTENT, payload=self.payload, content_format=0)

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        self.probe.seen()
        return aiocoap.Message(code=aiocoap.CHANGED)

    render_put = render_post


def _set_exchange_lifetime(seconds: float) -> None:
    """aiocoap computes EXCHANGE_LIFETIME as a property of ``TransportTuning``; every message gets a fresh
    ``TransportTuning()``, so the class is the only place to change it."""
    TransportTuning.EXCHANGE_LIFETIME = property(lambda self: seconds)  # type: ignore[assignment,method-assign]


async def serve(args: argparse.Namespace) -> None:
    probe = MemoryProbe(args.debug_memory, args.trace_frames, args.top)
    site = aiocoap.resource.Site()
    payload = (b"ok\n" * (args.payload_size // 3 + 1))[: args.payload_size]
    site.add_resource([p for p in args.path.split("/") if p], BenchResource(payload, probe, args.delay))
    ctx = await aiocoap.Context.create_server_context(site, bind=(args.bind, args.port), transports=["udp6"])
    probe.context = ctx
    port = args.port
    if not port:
        port = ctx.request_interfaces[0].token_interface.message_interface._local_port()
    print(json.dumps({"event": "listening", "port": port, "pid": os.getpid()}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if args.debug_memory:
        probe.dump()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ctx.shutdown(), 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bind", default="127.0.0.1", help="address to bind (loopback only in benchmarks)")
    p.add_argument("--port", type=int, default=0, help="UDP port (0: any free one, printed)")
    p.add_argument("--path", default="bench", help="the resource's Uri-Path (segments split on /)")
    p.add_argument("--payload-size", type=int, default=3, help="bytes in the GET response")
    p.add_argument(
        "--debug-memory", type=int, default=0, metavar="N", help="dump allocations every N requests"
    )
    p.add_argument(
        "--trace-frames",
        type=int,
        default=0,
        help="with --debug-memory: tracemalloc depth (0: no tracemalloc)",
    )
    p.add_argument("--top", type=int, default=8, help="allocation sites per dump")
    p.add_argument("--delay", type=float, default=0.0, help="seconds before a GET is answered")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio's selector loop")
    p.add_argument("--exchange-lifetime", type=float, default=0.0, help="override 247 s (seconds, > 0)")
    args = p.parse_args(argv)
    if args.exchange_lifetime > 0:
        _set_exchange_lifetime(args.exchange_lifetime)
    factory = None
    if args.uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
