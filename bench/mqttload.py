"""An MQTT 3.1.1 / 5.0 load generator on a minimal client of its own (asyncio protocols, uvloop).

    .venv/bin/python bench/mqttload.py 127.0.0.1:1883 -q 0 -c 4 --subscribers 1 -d 10 -w 2 [--json]
    .venv/bin/python bench/mqttload.py 127.0.0.1:1883 -q 1 -c 8 --inflight 16 -d 10
    .venv/bin/python bench/mqttload.py 127.0.0.1:1883 -q 1 -c 8 --rate 5000      # latency at a fixed rate
    .venv/bin/python bench/mqttload.py 127.0.0.1:1883 --idle-connections 5000   # hold them until stdin ends

Load mode. ``-c`` publisher connections (topic ``--topic``, ``{conn}`` is the connection's index) are
spread over ``-p`` worker processes, coordinated by this (otherwise idle) parent over pipes. Every
connection and subscription is established first; then the publishers run ``--warmup`` seconds unmeasured
and the measured window of ``--duration`` seconds, then stop; what is still in flight is drained (not
counted) before the report.

* QoS 0, closed loop: each publisher writes PUBLISH packets in batches for as long as its transport
  accepts them (asyncio write flow control: it stops at the transport's high-water mark and continues on
  ``resume_writing``), so the server's reading speed sets the pace.
* QoS 1, closed loop: each publisher keeps ``--inflight`` PUBLISH packets unacknowledged (capped by the
  server's MQTT 5 Receive Maximum); every PUBACK releases the next one from the same read callback. The ack
  latency is from the write of the PUBLISH to the read of its PUBACK.
* ``--rate R``: open loop, R msgs/s in total spread evenly over the publishers (a timer every
  ``--tick-ms``); a QoS 1 publisher whose window is full keeps the messages due as a backlog.

Every payload (``--payload`` bytes, at least 20) starts with the send time (CLOCK_MONOTONIC ns), the
publisher's index and a per-publisher sequence number. ``--subscribers K`` connections subscribe to
``--sub-filter`` (default: the topic with ``{conn}`` as ``+``; ``{sub}`` is the subscriber's index)
before the load starts; they measure the end-to-end latency (receive time - send time) and the loss: after
the drain, every message a publisher sent on a topic a subscriber matches and that subscriber never
received is lost (duplicates and foreign payloads are counted apart).

Counted in the window: PUBLISH packets written (QoS 0) or acknowledged (QoS 1), and messages received by
subscribers. Errors by kind: refused CONNACK, negative PUBACK/SUBACK reason codes, server DISCONNECT,
connections lost, unexpected PUBACKs, protocol errors. The generator reports its own CPU time over the
window; ``--watch-pid LABEL=PID`` reads ``/proc/PID/stat`` at the window's edges too (CPU µs per message).

Idle mode (``--idle-connections N``): N connections send CONNECT (keepalive ``--keepalive``) and are held,
with PINGREQs, until stdin reaches EOF or a line arrives (or ``--hold`` seconds); a JSON line
``{"event": "connected", ...}`` is printed on stdout once all of them are up, so a runner can read the
server's memory while they are held.
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
import os
import random
import resource
import signal
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any, cast

from procs import interrupt, loop_factory, percentile, proc_cpu_seconds, self_cpu

__all__ = [
    "LoadSpec",
    "format_report",
    "main",
    "probe",
    "proc_cpu_seconds",
    "proc_rss_kib",
    "raise_nofile_limit",
    "run_idle",
    "run_load",
    "topic_matches",
]

_STAMP = struct.Struct(">QIQ")  # send time ns, run id << 20 | publisher index, sequence number
_STAMP_SIZE = _STAMP.size  # 20
_BATCH = 64  # PUBLISH packets per write
_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"
_V311 = 4
_V5 = 5

# MQTT 5 property identifiers by value type (MQTT 5.0 §2.2.2.2), to walk a property list.
_PROP_BYTE = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_PROP_U16 = frozenset({0x13, 0x21, 0x22, 0x23})
_PROP_U32 = frozenset({0x02, 0x11, 0x18, 0x27})
_PROP_VARINT = frozenset({0x0B})
_PROP_BIN = frozenset({0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F})  # UTF-8 string or binary
_PROP_PAIR = frozenset({0x26})


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to run: the server, the shape of the load and the measured window."""

    host: str = "127.0.0.1"
    """Server address."""
    port: int = 1883
    """Server port."""
    version: int = _V5
    """MQTT protocol level: 4 (3.1.1) or 5."""
    qos: int = 0
    """QoS of the publishers (0 or 1)."""
    connections: int = 4
    """Publisher connections in total (spread over the processes)."""
    inflight: int = 16
    """QoS 1: unacknowledged PUBLISH packets per connection (capped by the server's Receive Maximum)."""
    payload: int = 64
    """Payload size in bytes (at least 20: time stamp, publisher index, sequence number)."""
    topic: str = "devices/{conn}/telemetry"
    """Publish topic; ``{conn}`` is the publisher's index."""
    rate: float = 0.0
    """Messages per second in total (0: closed loop)."""
    subscribers: int = 0
    """Subscriber connections."""
    sub_filter: str = ""
    """Subscription filter (default: ``topic`` with ``{conn}`` as ``+``); ``{sub}``: subscriber index."""
    sub_qos: int = 0
    """QoS of the subscriptions."""
    duration: float = 10.0
    """Measured window in seconds."""
    warmup: float = 2.0
    """Unmeasured load before the window, in seconds."""
    drain: float = 3.0
    """At most this long after the window for acks and deliveries still in flight."""
    processes: int = 1
    """Worker processes of the generator."""
    keepalive: int = 60
    """Keep Alive in CONNECT, seconds."""
    connect_timeout: float = 10.0
    """Time for every connection (CONNACK) and subscription (SUBACK), seconds."""
    connect_concurrency: int = 200
    """Connection attempts in flight at once."""
    tick_ms: float = 2.0
    """``rate``: the pacing timer's period in ms."""
    client_prefix: str = "mqttload"
    """Client identifiers are ``<prefix>-<pid>-p<conn>`` / ``-s<sub>`` / ``-i<n>``."""
    run_id: int = 0
    """1..4095, in every payload: subscribers count messages of another run (still queued in the server
    from an earlier one) as foreign. ``run_load`` picks one when 0."""
    watch: tuple[tuple[str, int], ...] = ()
    """(label, pid) of processes whose CPU is read at the window's edges."""


# ---------------------------------------------------------------------------------------------- helpers


def proc_rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB, from ``/proc/PID/status``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (``+``, ``#``; a leading wildcard skips ``$`` topics)."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f = topic_filter.split("/")
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect_packet(client_id: str, version: int, keepalive: int, *, receive_maximum: int = 0) -> bytes:
    """CONNECT with clean session / clean start; MQTT 5: Session Expiry 0 and our Receive Maximum."""
    var = _str("MQTT") + bytes([version, 0x02]) + keepalive.to_bytes(2, "big")
    if version == _V5:
        props = b"\x21" + receive_maximum.to_bytes(2, "big") if receive_maximum else b""
        var += _varint(len(props)) + props
    return _packet(0x10, var + _str(client_id))


def subscribe_packet(pid: int, topic_filter: str, qos: int, version: int) -> bytes:
    """SUBSCRIBE with one filter."""
    body = pid.to_bytes(2, "big") + (b"\x00" if version == _V5 else b"") + _str(topic_filter) + bytes([qos])
    return _packet(0x82, body)


def _parse_props(data: bytes, p: int, end: int) -> dict[int, Any]:
    """An MQTT 5 property list in ``data[p:end]`` -> {identifier: value} (user properties skipped)."""
    out: dict[int, Any] = {}
    while p < end:
        pid = data[p]
        p += 1
        if pid in _PROP_BYTE:
            out[pid] = data[p]
            p += 1
        elif pid in _PROP_U16:
            out[pid] = (data[p] << 8) | data[p + 1]
            p += 2
        elif pid in _PROP_U32:
            out[pid] = int.from_bytes(data[p : p + 4], "big")
            p += 4
        elif pid in _PROP_VARINT:
            v, p = _read_varint(data, p, end)
            out[pid] = v
        elif pid in _PROP_BIN:
            n = (data[p] << 8) | data[p + 1]
            out[pid] = bytes(data[p + 2 : p + 2 + n])
            p += 2 + n
        elif pid in _PROP_PAIR:
            for _ in range(2):
                n = (data[p] << 8) | data[p + 1]
                p += 2 + n
        else:
            raise ValueError(f"unknown property 0x{pid:02x}")
    if p != end:
        raise ValueError("property list overruns its length")
    return out


def _read_varint(data: bytes, p: int, end: int) -> tuple[int, int]:
    """A Variable Byte Integer at ``data[p]`` -> (value, next offset); (-1, p) if ``end`` cuts it."""
    value = 0
    shift = 0
    while p < end:
        b = data[p]
        p += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, p
        shift += 7
        if shift > 21:
            raise ValueError("malformed Variable Byte Integer")
    return -1, p


# ---------------------------------------------------------------------------------------------- client
class _Run:
    """Per-process state the connections share: phase, errors, latency samples."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.recording = False
        """Inside the measured window: latency samples are kept."""
        self.errors: dict[str, int] = {}
        self.ack_lat = array.array("q")
        """QoS 1 ack latencies in the window, ns."""
        self.e2e_lat = array.array("q")
        """End-to-end latencies (subscribers) in the window, ns."""
        self.last_delivery = 0.0
        self.server: dict[str, Any] = {}
        """What the first CONNACK said (receive maximum ...)."""

    def __repr__(self) -> str:
        return f"<_Run recording={self.recording} errors={sum(self.errors.values())}>"

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class _Client(asyncio.Protocol):
    """One MQTT connection: CONNECT/CONNACK, packet framing, control packets. Subclasses handle PUBLISH
    and PUBACK."""

    def __init__(self, run: _Run, client_id: str, *, receive_maximum: int = 0) -> None:
        self.run = run
        self.v5 = run.spec.version == _V5
        self.client_id = client_id
        self.receive_maximum = receive_maximum
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.paused = False
        self.closing = False
        self.closed = False
        self.connack: dict[int, Any] = {}
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.connected: asyncio.Future[None] = loop.create_future()
        self.subscribed: asyncio.Future[None] = loop.create_future()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.client_id} closed={self.closed}>"

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)
        spec = self.run.spec
        transport.write(
            connect_packet(self.client_id, spec.version, spec.keepalive, receive_maximum=self.receive_maximum)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.closing:
            self.run.error("connection_lost")
        for fut in (self.connected, self.subscribed):
            if not fut.done():
                fut.set_exception(ConnectionError(f"{self.client_id}: connection lost ({exc})"))
                fut.exception()  # retrieved: a waiter may be gone already

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        n = len(data)
        p = 0
        now = time.monotonic_ns()
        try:
            while p + 2 <= n:
                b0 = data[p]
                rl = data[p + 1]
                q = p + 2
                if rl & 0x80:
                    rl, q = _read_varint(data, p + 1, n)
                    if rl < 0:
                        break
                end = q + rl
                if end > n:
                    break
                t = b0 >> 4
                if t == 4:
                    self.on_puback(data, q, end, now)
                elif t == 3:
                    self.on_publish(b0, data, q, end, now)
                else:
                    self.on_control(t, data, q, end)
                p = end
        except (ValueError, IndexError) as exc:
            self.protocol_error(f"{type(exc).__name__}: {exc}")
            return
        if p < n:
            self.buf = data[p:]
        self.after_read()

    # -- packets
    def on_puback(self, data: bytes, q: int, end: int, now: int) -> None:
        self.run.error("unexpected_puback")

    def on_publish(self, b0: int, data: bytes, q: int, end: int, now: int) -> None:
        self.run.error("unexpected_publish")

    def after_read(self) -> None:
        """Called once per read, after every complete packet in it was handled."""

    def pump(self) -> None:
        """Send what may be sent now (publishers)."""

    def on_control(self, t: int, data: bytes, q: int, end: int) -> None:
        if t == 2:  # CONNACK
            code = data[q + 1]
            if self.v5 and end > q + 2:
                plen, r = _read_varint(data, q + 2, end)
                self.connack = _parse_props(data, r, r + plen)
            if code:
                self.run.error(f"connack_0x{code:02x}")
                if not self.connected.done():
                    self.connected.set_exception(ConnectionError(f"CONNACK refused: 0x{code:02x}"))
                self.close()
            elif not self.connected.done():
                self.connected.set_result(None)
        elif t == 9:  # SUBACK
            r = q + 2
            if self.v5:
                plen, r = _read_varint(data, r, end)
                r += plen
            codes = data[r:end]
            bad = [c for c in codes if c >= 0x80]
            if bad:
                self.run.error(f"suback_0x{bad[0]:02x}")
                if not self.subscribed.done():
                    self.subscribed.set_exception(ConnectionError(f"SUBACK refused: 0x{bad[0]:02x}"))
            elif not self.subscribed.done():
                self.subscribed.set_result(None)
        elif t == 13:  # PINGRESP
            pass
        elif t == 14:  # DISCONNECT from the server (MQTT 5)
            code = data[q] if end > q else 0
            self.run.error(f"disconnect_0x{code:02x}")
        else:
            self.protocol_error(f"unexpected packet type {t}")

    def protocol_error(self, what: str) -> None:
        self.run.error("protocol_error")
        if "protocol_error_detail" not in self.run.server:
            self.run.server["protocol_error_detail"] = what
        self.close()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self, *, disconnect: bool = False) -> None:
        """Close the connection (with DISCONNECT first when ``disconnect``)."""
        self.closing = True
        if self.transport is not None and not self.closed:
            if disconnect:
                self.transport.write(_DISCONNECT)
            self.transport.close()


class _Publisher(_Client):
    """Publishes on one topic: QoS 0 in batches while the transport accepts them, or QoS 1 with a window
    of packet identifiers; in rate mode only what ``credit`` allows."""

    def __init__(self, run: _Run, client_id: str, index: int, topic: str) -> None:
        super().__init__(run, client_id)
        spec = run.spec
        self.index = index
        self.topic = topic
        self.qos = spec.qos
        self.active = False
        self.scheduled = False
        self.closed_loop = spec.rate <= 0
        self.credit = 0
        """Messages that may be sent (rate mode: the ticker adds what is due)."""
        self.issued = 0
        """Rate mode: messages made due so far."""
        self.seq = 0
        """Messages sent (the next sequence number)."""
        self.acked = 0
        self.nacked = 0
        self.window = spec.inflight
        self.free: list[int] = []
        self.sent_at: list[int] = []
        tb = topic.encode()
        pad = spec.payload - _STAMP_SIZE
        pid_len = 2 if spec.qos else 0
        props_len = 1 if self.v5 else 0
        remaining = 2 + len(tb) + pid_len + props_len + spec.payload
        self.prefix = bytes([0x30 | (spec.qos << 1)]) + _varint(remaining) + _str(tb)
        fmt = f">{len(self.prefix)}s" + ("H" if spec.qos else "") + ("x" if self.v5 else "") + "QIQ"
        fmt += f"{pad}x" if pad else ""
        self.pack = struct.Struct(fmt).pack

    def start(self) -> None:
        """After CONNACK: size the QoS 1 window from the server's Receive Maximum and start sending."""
        if self.qos:
            rm = int(self.connack.get(0x21, 65535)) if self.v5 else 65535
            self.window = max(1, min(self.window, rm))
            self.free = list(range(self.window, 0, -1))
            self.sent_at = [0] * (self.window + 1)
        self.active = True
        if self.closed_loop:
            self.credit = 1 << 62
        self.pump()

    def stop(self) -> None:
        self.active = False

    @property
    def inflight(self) -> int:
        return self.window - len(self.free) if self.qos else 0

    def _pump_soon(self) -> None:
        self.scheduled = False
        self.pump()

    def pump(self) -> None:
        if self.paused or not self.active or self.closed:
            return
        n = min(self.credit, _BATCH)
        if self.qos:
            n = min(n, len(self.free))
        if n <= 0:
            return
        ts = time.monotonic_ns()
        pack = self.pack
        prefix = self.prefix
        me = self.run.spec.run_id << 20 | self.index
        seq = self.seq
        if self.qos:
            free = self.free
            sent_at = self.sent_at
            parts = []
            for s in range(seq, seq + n):
                pid = free.pop()
                sent_at[pid] = ts
                parts.append(pack(prefix, pid, ts, me, s))
        else:
            parts = [pack(prefix, ts, me, s) for s in range(seq, seq + n)]
        self.seq = seq + n
        self.credit -= n
        assert self.transport is not None
        self.transport.write(b"".join(parts))
        if not self.qos and self.credit > 0 and not self.paused and not self.scheduled:
            self.scheduled = True  # QoS 0 flood: again on the next loop iteration (reads go first)
            self.loop.call_soon(self._pump_soon)

    def on_puback(self, data: bytes, q: int, end: int, now: int) -> None:
        pid = (data[q] << 8) | data[q + 1]
        sent_at = self.sent_at
        if pid >= len(sent_at) or not sent_at[pid]:
            self.run.error("unexpected_puback")
            return
        t = sent_at[pid]
        sent_at[pid] = 0
        self.free.append(pid)
        if end - q > 2 and data[q + 2] >= 0x80:
            self.nacked += 1
            self.run.error(f"puback_0x{data[q + 2]:02x}")
            return
        self.acked += 1
        if self.run.recording:
            self.run.ack_lat.append(now - t)

    def after_read(self) -> None:
        if self.qos and self.active:
            self.pump()


class _Subscriber(_Client):
    """Subscribes to one filter; counts deliveries per publisher (loss, duplicates) and the end-to-end
    latency from the payload's time stamp."""

    def __init__(self, run: _Run, client_id: str, index: int, topic_filter: str, publishers: int) -> None:
        super().__init__(run, client_id, receive_maximum=65535)
        self.index = index
        self.topic_filter = topic_filter
        self.received = 0
        self.duplicates = 0
        self.foreign = 0
        self.next_seq = [0] * publishers
        self.unique = [0] * publishers
        self.acks: list[bytes] = []
        self.tag = run.spec.run_id << 20

    def on_publish(self, b0: int, data: bytes, q: int, end: int, now: int) -> None:
        q += 2 + ((data[q] << 8) | data[q + 1])
        if b0 & 0x06:
            pid = data[q : q + 2]
            q += 2
            self.acks.append(b"\x40\x02" + pid)
        if self.v5:
            plen = data[q]
            if plen & 0x80:
                plen, q = _read_varint(data, q, end)
            else:
                q += 1
            q += plen
        if end - q < _STAMP_SIZE:
            self.foreign += 1
            return
        ts, pub, seq = _STAMP.unpack_from(data, q)
        pub ^= self.tag
        if pub >= len(self.next_seq):  # another run's message (or a foreign payload)
            self.foreign += 1
            return
        self.received += 1
        if self.run.recording:
            self.run.e2e_lat.append(now - ts)
        exp = self.next_seq[pub]
        if seq >= exp:
            self.next_seq[pub] = seq + 1
            self.unique[pub] += 1
        else:
            self.duplicates += 1

    def after_read(self) -> None:
        self.run.last_delivery = time.monotonic()
        if self.acks:
            self.send(b"".join(self.acks))
            self.acks.clear()


async def _open(run: _Run, make: Callable[[], _Client], sem: asyncio.Semaphore, limit_s: float) -> _Client:
    async with sem:
        loop = asyncio.get_running_loop()
        spec = run.spec
        _, proto = await asyncio.wait_for(loop.create_connection(make, spec.host, spec.port), limit_s)
        assert isinstance(proto, _Client)
        try:
            await asyncio.wait_for(asyncio.shield(proto.connected), limit_s)
        except BaseException:
            proto.close()
            raise
        if not run.server:
            run.server.update({f"0x{k:02x}": v for k, v in proto.connack.items() if not isinstance(v, bytes)})
        return proto


# ---------------------------------------------------------------------------------------------- worker
def _topics(spec: LoadSpec) -> list[str]:
    return [spec.topic.replace("{conn}", str(i)) for i in range(spec.connections)]


def _sub_filter(spec: LoadSpec, sub: int) -> str:
    f = spec.sub_filter or spec.topic.replace("{conn}", "+")
    return f.replace("{sub}", str(sub))


async def _worker_main(spec: LoadSpec, pubs: list[int], subs: list[int], pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    run = _Run(spec)
    topics = _topics(spec)
    sem = asyncio.Semaphore(spec.connect_concurrency)
    tag = f"{spec.client_prefix}-{os.getpid()}"
    subscribers: list[_Subscriber] = []
    publishers: list[_Publisher] = []

    def make_sub(i: int) -> Callable[[], _Client]:
        return lambda: _Subscriber(run, f"{tag}-s{i}", i, _sub_filter(spec, i), spec.connections)

    def make_pub(i: int) -> Callable[[], _Client]:
        return lambda: _Publisher(run, f"{tag}-p{i}", i, topics[i])

    try:
        async with asyncio.timeout(spec.connect_timeout):
            opened = await asyncio.gather(*(_open(run, make_sub(i), sem, spec.connect_timeout) for i in subs))
            for n, s in enumerate(opened):
                assert isinstance(s, _Subscriber)
                subscribers.append(s)
                s.send(subscribe_packet(n + 1, s.topic_filter, spec.sub_qos, spec.version))
            await asyncio.gather(*(s.subscribed for s in subscribers))
            opened = await asyncio.gather(*(_open(run, make_pub(i), sem, spec.connect_timeout) for i in pubs))
            publishers = [p for p in opened if isinstance(p, _Publisher)]
    except BaseException as exc:
        for c in [*subscribers, *publishers]:
            c.close()
        raise RuntimeError(f"connecting: {type(exc).__name__}: {exc} (errors {run.errors})") from exc
    pipe.send(("ready", run.server))
    msg = await loop.run_in_executor(None, pipe.recv)
    if msg[0] != "go":
        for c in [*subscribers, *publishers]:
            c.close(disconnect=True)
        return
    _, t_start, t_begin, t_end = msg
    snap: dict[str, Any] = {}
    stopped = loop.create_future()

    def counters() -> tuple[int, int, float]:
        done = sum(p.acked for p in publishers) if spec.qos else sum(p.seq for p in publishers)
        return done, sum(s.received for s in subscribers), self_cpu()

    def begin() -> None:
        snap["begin"] = counters()
        run.recording = True

    def end() -> None:
        run.recording = False
        snap["end"] = counters()
        for p in publishers:
            p.stop()
        if not stopped.done():
            stopped.set_result(None)

    def start() -> None:
        for p in publishers:
            p.start()

    ticker: asyncio.Task[None] | None = None
    if spec.rate > 0:
        per_pub = spec.rate / spec.connections

        async def tick() -> None:
            period = spec.tick_ms / 1000.0
            await asyncio.sleep(max(0.0, t_start - time.monotonic()))
            while True:
                elapsed = time.monotonic() - t_start
                due = int(per_pub * elapsed)
                for p in publishers:
                    if due > p.issued:
                        p.credit += due - p.issued
                        p.issued = due
                        p.pump()
                await asyncio.sleep(period)

        ticker = asyncio.ensure_future(tick())
    loop.call_later(max(0.0, t_start - time.monotonic()), start)
    loop.call_later(max(0.0, t_begin - time.monotonic()), begin)
    loop.call_later(max(0.0, t_end - time.monotonic()), end)
    await stopped
    if ticker is not None:
        ticker.cancel()
    # Drain: wait for the acks still due, and until deliveries have been quiet for a moment.
    deadline = time.monotonic() + spec.drain
    while time.monotonic() < deadline:
        live = [p for p in publishers if not p.closed]
        quiet = time.monotonic() - run.last_delivery > 0.3 if subscribers else True
        if quiet and not any(p.inflight for p in live):
            break
        await asyncio.sleep(0.02)
    unacked = sum(p.inflight for p in publishers)
    report = {
        "window": (snap["begin"], snap["end"]),
        "errors": run.errors,
        "server": run.server,
        "unacked": unacked,
        "nacked": sum(p.nacked for p in publishers),
        "sent": {p.index: p.seq for p in publishers},
        "acked": sum(p.acked for p in publishers),
        "windows": sorted({p.window for p in publishers}),
        "subs": {
            s.index: {
                "filter": s.topic_filter,
                "unique": s.unique,
                "received": s.received,
                "duplicates": s.duplicates,
                "foreign": s.foreign,
            }
            for s in subscribers
        },
        "backlog": sum(p.credit for p in publishers) if spec.rate > 0 else 0,
        "ack_lat": run.ack_lat.tobytes(),
        "e2e_lat": run.e2e_lat.tobytes(),
    }
    for c in [*publishers, *subscribers]:
        c.close(disconnect=True)
    pipe.send(("result", report))
    await asyncio.sleep(0.05)  # let the DISCONNECTs leave


def _worker(spec: LoadSpec, pubs: list[int], subs: list[int], pipe: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    with contextlib.suppress(Exception):  # ... and if the parent dies, so do we (Linux)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    raise_nofile_limit()
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(_worker_main(spec, pubs, subs, pipe))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


# ---------------------------------------------------------------------------------------------- parent


def _lat_summary(raw: list[bytes]) -> dict[str, float]:
    values: list[int] = []
    for chunk in raw:
        a = array.array("q")
        a.frombytes(chunk)
        values.extend(a)
    values.sort()
    ms = 1e-6
    if not values:
        return {"n": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan, "mean": math.nan}
    return {
        "n": len(values),
        "p50": round(percentile(values, 0.50) * ms, 3),
        "p90": round(percentile(values, 0.90) * ms, 3),
        "p99": round(percentile(values, 0.99) * ms, 3),
        "max": round(values[-1] * ms, 3),
        "mean": round(sum(values) / len(values) * ms, 3),
    }


@dataclass
class _Coordinator:
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
        for pipe in self.pipes:
            with contextlib.suppress(Exception):
                pipe.send(("stop",))
        for proc in self.procs:
            if not now:
                proc.join(timeout=3)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=3)


def _validate(spec: LoadSpec) -> None:
    if spec.version not in (_V311, _V5):
        raise ValueError("version must be 4 (3.1.1) or 5")
    if spec.qos not in (0, 1) or spec.sub_qos not in (0, 1):
        raise ValueError("QoS 0 or 1 only")
    if spec.payload < _STAMP_SIZE:
        raise ValueError(f"payload must be at least {_STAMP_SIZE} bytes")
    if spec.processes < 1 or spec.connections < spec.processes:
        raise ValueError("need 1 <= processes <= connections")
    if not 0 <= spec.run_id < 4096 or spec.connections >= 1 << 20:
        raise ValueError("run_id must be 0..4095 and connections < 2**20")
    if not 1 <= spec.inflight <= 65535:
        raise ValueError("inflight must be 1..65535")


def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Run the load described by ``spec`` and return the report (see ``--json``)."""
    _validate(spec)
    if not spec.run_id:
        spec = replace(spec, run_id=random.randint(1, 4095))
    raise_nofile_limit()
    ctx = multiprocessing.get_context("spawn")
    co = _Coordinator()
    try:
        for w in range(spec.processes):
            pubs = list(range(w, spec.connections, spec.processes))
            subs = list(range(w, spec.subscribers, spec.processes))
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(spec, pubs, subs, child_end), daemon=True)
            proc.start()
            child_end.close()
            co.procs.append(proc)
            co.pipes.append(parent_end)
        deadline = time.monotonic() + spec.connect_timeout + 15.0  # + interpreter start-up
        ready = [co.recv(pipe, deadline, "ready") for pipe in co.pipes]
        t_start = time.monotonic() + 0.05
        t_begin = t_start + spec.warmup
        t_end = t_begin + spec.duration
        for pipe in co.pipes:
            pipe.send(("go", t_start, t_begin, t_end))
        time.sleep(max(0.0, t_begin - time.monotonic()))
        cpu0 = {label: proc_cpu_seconds(pid) for label, pid in spec.watch}
        time.sleep(max(0.0, t_end - time.monotonic()))
        cpu1 = {label: proc_cpu_seconds(pid) for label, pid in spec.watch}
        results = [co.recv(pipe, t_end + spec.drain + 30.0, "result")[1] for pipe in co.pipes]
    except BaseException:
        co.stop(now=True)
        raise
    co.stop(now=False)
    return _report(spec, ready[0][1], results, cpu0, cpu1)


def _report(
    spec: LoadSpec,
    server: dict[str, Any],
    results: list[dict[str, Any]],
    cpu0: dict[str, float],
    cpu1: dict[str, float],
) -> dict[str, Any]:
    elapsed = spec.duration
    published = sum(r["window"][1][0] - r["window"][0][0] for r in results)
    delivered = sum(r["window"][1][1] - r["window"][0][1] for r in results)
    gen_cpu = sum(r["window"][1][2] - r["window"][0][2] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    sent: dict[int, int] = {}
    for r in results:
        sent.update({int(k): v for k, v in r["sent"].items()})
    topics = _topics(spec)
    expected = lost = duplicates = foreign = received = 0
    for r in results:
        for s in r["subs"].values():
            for pub, n in sent.items():
                if topic_matches(s["filter"], topics[pub]):
                    expected += n
                    lost += max(0, n - s["unique"][pub])
            duplicates += s["duplicates"]
            foreign += s["foreign"]
            received += s["received"]
    count = published

    def per_msg(cpu_s: float) -> float:
        return round(cpu_s / count * 1e6, 2) if count else math.nan

    watched = {
        label: {
            "pid": pid,
            "cpu_s": round(cpu1[label] - cpu0[label], 3),
            "cpu_pct": round((cpu1[label] - cpu0[label]) / elapsed * 100, 1),
            "cpu_us_per_msg": per_msg(cpu1[label] - cpu0[label]),
        }
        for label, pid in spec.watch
    }
    return {
        "mode": "load",
        "spec": {k: v for k, v in asdict(spec).items() if k != "watch"},
        "server": server,
        "inflight_window": sorted({w for r in results for w in r["windows"]}),
        "window_s": round(elapsed, 3),
        "published": published,
        "published_rate": round(published / elapsed, 1),
        "sent_total": sum(sent.values()),
        "acked_total": sum(r["acked"] for r in results),
        "delivered": delivered,
        "delivered_rate": round(delivered / elapsed, 1),
        "received_total": received,
        "expected_total": expected,
        "lost": lost,
        "duplicates": duplicates,
        "foreign": foreign,
        "unacked": sum(r["unacked"] for r in results),
        "nacked": sum(r["nacked"] for r in results),
        "backlog": sum(r["backlog"] for r in results),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "ack_latency_ms": _lat_summary([r["ack_lat"] for r in results]),
        "e2e_latency_ms": _lat_summary([r["e2e_lat"] for r in results]),
        "generator": {
            "processes": spec.processes,
            "cpu_s": round(gen_cpu, 3),
            "cpu_pct": round(gen_cpu / elapsed * 100, 1),
            "cpu_us_per_msg": per_msg(gen_cpu),
        },
        "watched": watched,
    }


def format_report(rep: dict[str, Any]) -> str:
    """A human-readable summary of a ``run_load`` or ``run_idle`` report."""
    s = rep["spec"]
    if rep["mode"] == "idle":
        return (
            f"idle     {rep['connected']}/{s['connections']} connections held {rep['held_s']:.1f} s"
            f" (connected in {rep['connect_s']:.2f} s), {rep['errors']} errors {rep['error_kinds'] or ''}"
        )
    ver = "5" if s["version"] == _V5 else "3.1.1"
    load = f"rate {s['rate']:g} msgs/s" if s["rate"] > 0 else "closed loop"
    window = f", inflight {rep['inflight_window']}" if s["qos"] else ""
    lines = [
        f"target   {s['host']}:{s['port']} MQTT {ver}, QoS {s['qos']}, {s['connections']} publishers{window},"
        f" {s['payload']} B payload, {load}, {s['subscribers']} subscribers, {s['processes']} process(es)",
        f"window   {rep['window_s']:.2f} s after {s['warmup']:.1f} s warm-up",
        f"publish  {rep['published_rate']:.1f} msgs/s ({'acked' if s['qos'] else 'written'}),"
        f" {rep['unacked']} unacked after drain, {rep['nacked']} negative acks"
        + (f", backlog {rep['backlog']}" if s["rate"] > 0 else ""),
    ]
    if s["qos"]:
        a = rep["ack_latency_ms"]
        lines.append(
            f"ack ms   p50 {a['p50']:.3f}  p90 {a['p90']:.3f}  p99 {a['p99']:.3f}  max {a['max']:.3f}"
        )
    if s["subscribers"]:
        e = rep["e2e_latency_ms"]
        lines += [
            f"deliver  {rep['delivered_rate']:.1f} msgs/s; {rep['lost']} lost of {rep['expected_total']}"
            f" expected, {rep['duplicates']} duplicates",
            f"e2e ms   p50 {e['p50']:.3f}  p90 {e['p90']:.3f}  p99 {e['p99']:.3f}  max {e['max']:.3f}",
        ]
    gen = rep["generator"]
    lines.append(f"errors   {rep['errors']} {rep['error_kinds'] or ''}")
    lines.append(f"gen CPU  {gen['cpu_pct']:.0f} % of a core, {gen['cpu_us_per_msg']} µs/msg")
    for label, w in rep["watched"].items():
        lines.append(f"{label:<8} CPU {w['cpu_pct']:.0f} % of a core, {w['cpu_us_per_msg']} µs/msg")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- idle
async def _idle_main(
    spec: LoadSpec, count: int, hold: float, announce: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    run = _Run(spec)
    sem = asyncio.Semaphore(spec.connect_concurrency)
    tag = f"{spec.client_prefix}-{os.getpid()}"
    t0 = time.monotonic()

    def make(i: int) -> Callable[[], _Client]:
        return lambda: _Client(run, f"{tag}-i{i}")

    outcomes = await asyncio.gather(
        *(_open(run, make(i), sem, spec.connect_timeout) for i in range(count)), return_exceptions=True
    )
    clients = [c for c in outcomes if isinstance(c, _Client)]
    for c in outcomes:
        if isinstance(c, BaseException):
            run.error(f"connect_failed_{type(c).__name__}")
    connect_s = time.monotonic() - t0
    info = {
        "event": "connected",
        "connected": len(clients),
        "requested": count,
        "connect_s": round(connect_s, 3),
    }
    announce(info)
    # Hold: PINGREQ every connection about every keepalive/2, spread over time; until stdin says stop.
    stop = asyncio.Event()
    if hold <= 0:

        def on_stdin() -> None:
            try:
                data = os.read(sys.stdin.fileno(), 4096)
            except OSError:
                data = b""
            if not data or b"\n" in data:
                stop.set()

        loop.add_reader(sys.stdin.fileno(), on_stdin)
    else:
        loop.call_later(hold, stop.set)
    t_held = time.monotonic()
    interval = max(1.0, spec.keepalive / 2)
    i = 0
    while not stop.is_set():
        step = max(1, len(clients) // max(1, int(interval * 10)))  # every 0.1 s, a slice of the clients
        for c in clients[i : i + step]:
            c.send(_PINGREQ)
        i = i + step if i + step < len(clients) else 0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    if hold <= 0:
        loop.remove_reader(sys.stdin.fileno())
    held_s = time.monotonic() - t_held
    dropped = sum(1 for c in clients if c.closed)
    for c in clients:
        c.close(disconnect=True)
    await asyncio.sleep(0.1)
    return {
        "mode": "idle",
        "spec": {**{k: v for k, v in asdict(spec).items() if k != "watch"}, "connections": count},
        "server": run.server,
        "connected": len(clients),
        "connect_s": round(connect_s, 3),
        "held_s": round(held_s, 3),
        "dropped_while_held": dropped,
        "errors": sum(run.errors.values()),
        "error_kinds": run.errors,
    }


def run_idle(
    spec: LoadSpec, count: int, *, hold: float = 0.0, announce: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Open ``count`` connections (CONNECT, CONNACK) and hold them until stdin ends or a line arrives
    (``hold`` 0) or for ``hold`` seconds; ``announce`` gets the "connected" event."""
    _validate(spec)
    limit = raise_nofile_limit()
    if limit < count + 64:
        raise RuntimeError(f"RLIMIT_NOFILE is {limit}: too low for {count} connections")

    def default(info: dict[str, Any]) -> None:
        print(json.dumps(info), flush=True)

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(_idle_main(spec, count, hold, announce or default))


# ---------------------------------------------------------------------------------------------- probe
async def probe(host: str, port: int, version: int = _V5, limit_s: float = 5.0) -> dict[str, Any]:
    """Connect, subscribe to a probe topic, publish one QoS 1 message to it and receive it. Returns the
    CONNACK properties and the round trip in ms; raises on any failure."""
    spec = LoadSpec(host=host, port=port, version=version, qos=1, connections=1, subscribers=1,
                    topic="mqttload/probe/{conn}", sub_qos=1, inflight=1)  # fmt: skip
    run = _Run(spec)
    sem = asyncio.Semaphore(2)
    tag = f"{spec.client_prefix}-{os.getpid()}-probe"
    async with asyncio.timeout(limit_s):
        sub = await _open(run, lambda: _Subscriber(run, f"{tag}-s", 0, "mqttload/probe/0", 1), sem, limit_s)
        assert isinstance(sub, _Subscriber)
        try:
            sub.send(subscribe_packet(1, sub.topic_filter, 1, version))
            await sub.subscribed
            pub = await _open(run, lambda: _Publisher(run, f"{tag}-p", 0, "mqttload/probe/0"), sem, limit_s)
            assert isinstance(pub, _Publisher)
            try:
                t0 = time.monotonic()
                pub.start()
                pub.credit = 0
                while not (pub.acked and sub.unique[0]):
                    if run.errors:
                        raise RuntimeError(f"probe failed: {run.errors}")
                    await asyncio.sleep(0.005)
                rtt = (time.monotonic() - t0) * 1000
            finally:
                pub.close(disconnect=True)
        finally:
            sub.close(disconnect=True)
    return {"connack": {f"0x{k:02x}": v for k, v in pub.connack.items()}, "rtt_ms": round(rtt, 3)}


# ---------------------------------------------------------------------------------------------- CLI
def _watch(value: str) -> tuple[str, int]:
    label, _, pid = value.partition("=")
    if not pid.isdigit():
        raise argparse.ArgumentTypeError("expected LABEL=PID")
    return label, int(pid)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("server", help="HOST:PORT of the MQTT server")
    p.add_argument("-V", "--mqtt-version", choices=("311", "5"), default="5", help="protocol version")
    p.add_argument("-q", "--qos", type=int, choices=(0, 1), default=0, help="publish QoS")
    p.add_argument("-c", "--connections", type=int, default=4, help="publisher connections (total)")
    p.add_argument("-p", "--processes", type=int, default=1, help="generator worker processes")
    p.add_argument("--inflight", type=int, default=16, help="QoS 1: unacked PUBLISH per connection")
    p.add_argument("-s", "--payload", type=int, default=64, help="payload bytes (>= 20)")
    p.add_argument("-t", "--topic", default="devices/{conn}/telemetry", help="{conn}: publisher index")
    p.add_argument("-r", "--rate", type=float, default=0.0, help="msgs/s in total (default: closed loop)")
    p.add_argument("--subscribers", type=int, default=0, help="subscriber connections")
    p.add_argument("--sub-filter", default="", help="default: the topic with {conn} -> +; {sub}: index")
    p.add_argument("--sub-qos", type=int, choices=(0, 1), default=0)
    p.add_argument("-d", "--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("-w", "--warmup", type=float, default=2.0, help="unmeasured seconds before")
    p.add_argument("--drain", type=float, default=3.0, help="max seconds for in-flight messages after")
    p.add_argument("-k", "--keepalive", type=int, default=60)
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--connect-concurrency", type=int, default=200)
    p.add_argument("--tick-ms", type=float, default=2.0, help="--rate: pacing period")
    p.add_argument("--client-prefix", default="mqttload")
    p.add_argument("--watch-pid", type=_watch, action="append", default=[], metavar="LABEL=PID")
    p.add_argument("--idle-connections", type=int, default=0, metavar="N", help="idle mode: hold N conns")
    p.add_argument("--hold", type=float, default=0.0, help="idle mode: seconds (default: until stdin EOF)")
    p.add_argument("--probe", action="store_true", help="one subscribe + QoS 1 publish round trip")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    host, _, port = args.server.rpartition(":")
    if not host or not port.isdigit():
        p.error("server must be HOST:PORT")
    version = _V5 if args.mqtt_version == "5" else _V311
    signal.signal(signal.SIGTERM, interrupt)
    if args.probe:
        res = asyncio.run(probe(host.strip("[]"), int(port), version))
        print(json.dumps(res) if args.json else f"probe OK: {res}")
        return 0
    spec = LoadSpec(
        host=host.strip("[]"), port=int(port), version=version, qos=args.qos, connections=args.connections,
        inflight=args.inflight, payload=args.payload, topic=args.topic, rate=args.rate,
        subscribers=args.subscribers, sub_filter=args.sub_filter, sub_qos=args.sub_qos,
        duration=args.duration, warmup=args.warmup, drain=args.drain, processes=args.processes,
        keepalive=args.keepalive, connect_timeout=args.connect_timeout,
        connect_concurrency=args.connect_concurrency, tick_ms=args.tick_ms, client_prefix=args.client_prefix,
        watch=tuple(args.watch_pid),
    )  # fmt: skip
    try:
        _validate(spec)
    except ValueError as exc:
        p.error(str(exc))
    try:
        if args.idle_connections:
            rep = run_idle(spec, args.idle_connections, hold=args.hold)
        else:
            rep = run_load(spec)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
