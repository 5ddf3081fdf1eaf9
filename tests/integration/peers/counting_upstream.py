"""A counting upstream *process* for cluster tests and benchmarks: HTTP/1.1 (h11) and h2c (h2), one port.

Run it (it needs only h11 and h2, and imports nothing from this package, so it also runs by path):

    python tests/integration/peers/counting_upstream.py --id a [--port 0] [--port-file F]

It binds ``127.0.0.1:<port>`` (0 picks a free port), writes the bound port to ``--port-file`` (atomically)
and prints ``LISTENING <port>`` on stdout. Protocol per connection: HTTP/2 when the client starts with the
prior-knowledge preface (h2c), HTTP/1.1 (keep-alive) otherwise.

=================================  =====================================================================
``GET /count``                     counters as JSON: ``{"id", "total", "paths": {path: n}, "active",
                                   "max_active", "health": status}``; ``total`` counts every request
                                   except ``/count``, ``/health`` and the control posts
``POST /count/reset``              zero the counters (``max_active`` too)
``GET /health``                    the current health status (200 until set), body ``<id> <status>``
``POST /health?status=NNN``        set it
``POST /delay?ms=N``               add N ms before answering every ordinary request (a "slow host")
``/slow?ms=N``                     answer 200 after N ms
``/status/NNN``                    answer that status
anything else                      200, body ``<id>\\n``
=================================  =====================================================================

Every response carries ``x-upstream-id: <id>``. Paths are counted without the query string. The only
sleeps are the peer's deliberate delays (``/slow``, ``/delay``).

``CountingUpstream`` (in the test process) starts one such process, reads its port back, kills it with
SIGKILL and restarts it on the same port; ``UpstreamGroup`` does it for N of them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["CountingUpstream", "UpstreamGroup", "main"]

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


# ================================================================================================ server
class _State:
    """What the process counts and the knobs the test turns."""

    def __init__(self, ident: str) -> None:
        self.ident = ident
        self.paths: Counter[str] = Counter()
        self.total = 0
        self.active = 0
        self.max_active = 0
        self.health = 200
        self.delay_ms = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.ident,
            "total": self.total,
            "paths": dict(self.paths),
            "active": self.active,
            "max_active": self.max_active,
            "health": self.health,
            "delay_ms": self.delay_ms,
        }

    async def handle(self, method: str, target: str) -> tuple[int, bytes, str]:
        """One request -> (status, body, content type)."""
        parts = urlsplit(target)
        path = parts.path or "/"
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.paths[path] += 1
        if path == "/count":
            if method == "POST":
                return 405, b"use GET /count or POST /count/reset\n", "text/plain"
            self.paths[path] -= 1  # reading the counters does not change them
            if not self.paths[path]:
                del self.paths[path]
            return 200, json.dumps(self.snapshot()).encode(), "application/json"
        if path == "/count/reset":
            self.paths.clear()
            self.total = 0
            self.max_active = self.active
            return 200, b"reset\n", "text/plain"
        if path == "/health":
            if method == "POST":
                self.health = int(query.get("status", "200"))
                return 200, f"{self.ident} health set to {self.health}\n".encode(), "text/plain"
            return self.health, f"{self.ident} {self.health}\n".encode(), "text/plain"
        if path == "/delay" and method == "POST":
            self.delay_ms = int(query.get("ms", "0"))
            return 200, f"{self.ident} delay {self.delay_ms} ms\n".encode(), "text/plain"
        self.total += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            delay = self.delay_ms
            if path == "/slow":
                delay += int(query.get("ms", "1000"))
            if delay > 0:
                await asyncio.sleep(delay / 1000)  # the peer's deliberate slowness, not a wait for an event
            if path.startswith("/status/"):
                try:
                    status = int(path.rsplit("/", 1)[1])
                except ValueError:
                    status = 400
                if not 200 <= status <= 599:
                    status = 400
                return status, f"{self.ident} {status}\n".encode(), "text/plain"
            return 200, f"{self.ident}\n".encode(), "text/plain"
        finally:
            self.active -= 1


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


async def _serve_h1(
    state: _State, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes
) -> None:
    import h11

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(first)
    ident = state.ident.encode()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            conn.receive_data(data)
            if not data:
                return
            continue
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            if event is h11.PAUSED and conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                continue
            return
        if not isinstance(event, h11.Request):
            continue
        method, target = event.method.decode(), event.target.decode()
        while True:  # the request body (discarded)
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(ev, h11.EndOfMessage):
                break
            elif isinstance(ev, h11.ConnectionClosed):
                return
        status, body, ctype = await state.handle(method, target)
        headers = [
            (b"content-type", ctype.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"x-upstream-id", ident),
        ]
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        out += conn.send(h11.Data(data=body)) if body else b""
        out += conn.send(h11.EndOfMessage())
        writer.write(out)
        await writer.drain()
        if conn.our_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()


async def _serve_h2(
    state: _State, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes
) -> None:
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    tasks: set[asyncio.Task[None]] = set()

    def flush() -> None:
        data = conn.data_to_send()
        if data and not writer.is_closing():
            writer.write(data)

    async def answer(stream_id: int, method: str, target: str) -> None:
        status, body, ctype = await state.handle(method, target)
        with contextlib.suppress(Exception):  # the stream or connection may be gone meanwhile
            conn.send_headers(
                stream_id,
                [
                    (":status", str(status)),
                    ("content-type", ctype),
                    ("content-length", str(len(body))),
                    ("x-upstream-id", state.ident),
                ],
                end_stream=not body,
            )
            if body:
                conn.send_data(stream_id, body, end_stream=True)
            flush()

    pending: dict[int, tuple[str, str]] = {}
    data = first
    try:
        while data:
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    hdrs = {bytes(k): bytes(v) for k, v in ev.headers or ()}
                    method = hdrs.get(b":method", b"GET").decode("latin-1")
                    pending[ev.stream_id] = (method, hdrs.get(b":path", b"/").decode("latin-1"))
                    if ev.stream_ended is not None:
                        method, target = pending.pop(ev.stream_id)
                        t = asyncio.ensure_future(answer(ev.stream_id, method, target))
                        tasks.add(t)
                        t.add_done_callback(tasks.discard)
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in pending:
                    method, target = pending.pop(ev.stream_id)
                    t = asyncio.ensure_future(answer(ev.stream_id, method, target))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    flush()
                    return
            flush()
            await writer.drain()
            data = await reader.read(65536)
    finally:
        for t in tasks:
            t.cancel()


async def _serve(state: _State, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        first = await reader.read(65536)
        if not first:
            return
        while len(first) < len(_H2_PREFACE) and _H2_PREFACE.startswith(first):
            more = await reader.read(65536)
            if not more:
                return
            first += more
        if first.startswith(_H2_PREFACE):
            await _serve_h2(state, reader, writer, first)
        else:
            await _serve_h1(state, reader, writer, first)
    except (ConnectionError, OSError):
        pass
    except Exception as exc:  # a peer's bad bytes: drop the connection, keep serving others
        print(f"counting_upstream {state.ident}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    finally:
        writer.close()


def _write_port_file(path: str, port: int) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, path)


async def _amain(args: argparse.Namespace) -> None:
    state = _State(args.id)
    server = await asyncio.start_server(
        lambda r, w: _serve(state, r, w), args.host, args.port, reuse_address=True, backlog=1024
    )
    port = int(server.sockets[0].getsockname()[1])
    if args.port_file:
        _write_port_file(args.port_file, port)
    print(f"LISTENING {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--id", required=True, help="value of the x-upstream-id response header")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", default="", help="write the bound port here (atomically)")
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_amain(args))
    return 0


# ================================================================================================ control
class CountingUpstream:
    """One counting upstream process, driven from a test or a benchmark (blocking calls)."""

    def __init__(self, ident: str, workdir: Path, *, port: int = 0) -> None:
        self.ident = ident
        self.workdir = workdir
        self.port = port
        """The bound port (0 until started; kept across ``kill``/``restart``)."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"upstream-{self.ident}.log"

    def start(self, timeout: float = 15.0) -> CountingUpstream:
        """Start the process (on ``self.port``, 0 the first time); return once it answers ``/count``."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / f"upstream-{self.ident}.port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--id", self.ident, "--port", str(self.port),
               "--port-file", str(port_file)]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"upstream {self.ident} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if port_file.exists():
                self.port = int(port_file.read_text())
                with contextlib.suppress(OSError):
                    self.counts(timeout=1.0)
                    return self
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"upstream {self.ident} did not start within {timeout} s:\n{self.log_tail()}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(0.02)  # bounded poll interval while waiting for the port file

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no FIN for open connections' requests in flight beyond what the kernel sends."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self, timeout: float = 15.0) -> CountingUpstream:
        """Start again on the same port (counters start from zero)."""
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- talking to it directly (not through the agent) -------------------------------------------
    def request(self, method: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=b"" if method == "POST" else None)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def counts(self, timeout: float = 5.0) -> dict[str, Any]:
        status, body = self.request("GET", "/count", timeout)
        if status != 200:
            raise RuntimeError(f"upstream {self.ident}: /count answered {status}")
        result: dict[str, Any] = json.loads(body)
        return result

    def total(self) -> int:
        return int(self.counts()["total"])

    def path_count(self, path: str) -> int:
        return int(self.counts()["paths"].get(path, 0))

    def reset(self) -> None:
        self.request("POST", "/count/reset")

    def set_health(self, status: int) -> None:
        code, body = self.request("POST", f"/health?status={status}")
        if code != 200:
            raise RuntimeError(f"upstream {self.ident}: setting health answered {code} {body!r}")

    def set_delay(self, ms: int) -> None:
        self.request("POST", f"/delay?ms={ms}")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<CountingUpstream {self.ident} 127.0.0.1:{self.port} {state} starts={self.starts}>"


class UpstreamGroup:
    """N counting upstreams (ids ``a``, ``b``, ``c`` ... by default); a context manager stopping them all."""

    def __init__(self, workdir: Path, n: int = 3, ids: Sequence[str] | None = None) -> None:
        names = list(ids) if ids is not None else [chr(ord("a") + i) for i in range(n)]
        self.upstreams = [CountingUpstream(name, workdir) for name in names]

    def start(self) -> UpstreamGroup:
        try:
            for u in self.upstreams:
                u.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for u in self.upstreams:
            u.stop()

    def __enter__(self) -> UpstreamGroup:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __iter__(self) -> Iterator[CountingUpstream]:
        return iter(self.upstreams)

    def __getitem__(self, key: int | str) -> CountingUpstream:
        if isinstance(key, int):
            return self.upstreams[key]
        for u in self.upstreams:
            if u.ident == key:
                return u
        raise KeyError(key)

    def __len__(self) -> int:
        return len(self.upstreams)

    @property
    def ports(self) -> list[int]:
        return [u.port for u in self.upstreams]

    def by_port(self, port: int) -> CountingUpstream:
        for u in self.upstreams:
            if u.port == port:
                return u
        raise KeyError(port)

    def totals(self) -> dict[str, int]:
        """``{id: total}`` of every running upstream."""
        return {u.ident: u.total() for u in self.upstreams if u.running}

    def path_counts(self, path: str) -> dict[str, int]:
        return {u.ident: u.path_count(path) for u in self.upstreams if u.running}

    def reset(self) -> None:
        for u in self.upstreams:
            if u.running:
                u.reset()

    def __repr__(self) -> str:
        return f"<UpstreamGroup {[u.ident for u in self.upstreams]} ports={self.ports}>"


if __name__ == "__main__":
    sys.exit(main())
