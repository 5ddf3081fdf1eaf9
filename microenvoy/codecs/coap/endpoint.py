"""The CoAP message layer of a server endpoint (RFC 7252 §4, RFC 7641 §4.5), sans-IO and bounded.

One ``ServerEndpoint`` serves every remote of a UDP listener. The I/O layer feeds it datagrams
(``receive``) and timer ticks (``tick``), both with the current monotonic time, and sends what it returns
(``(datagram, remote)`` pairs). Requests come out as :class:`Request` objects; the application answers them
with ``respond`` whenever it is ready:

* answered before ``empty_ack_delay``: the response is piggybacked on the ACK;
* otherwise the endpoint has already sent an empty ACK (``ack_due``) and the response goes out as a separate
  confirmable response, retransmitted with exponential back-off (§4.2) until it is acknowledged;
* a duplicate request (same remote and message id within the exchange lifetime) is never handed out again: it
  is answered from the deduplication cache (the cached response, or the empty ACK while still pending).

Notifications (``notify``) go out confirmable or not; an RST or a confirmable notification that is never
acknowledged ends the observation (:class:`Gone`). Memory is bounded: the deduplication cache holds at most
``max_dedup`` entries (oldest evicted first, counted as ``dedup_evicted``) for at most the exchange lifetime;
outstanding confirmable messages are capped by ``max_outstanding``.
"""

from __future__ import annotations

import heapq
import random as _random
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from microenvoy.codecs.coap.message import (
    ACK,
    CON,
    NON,
    RST,
    CoapFormatError,
    Message,
    decode,
    encode,
    is_request_code,
)

__all__ = ["Gone", "Request", "ServerEndpoint", "Transmission"]

ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
EXCHANGE_LIFETIME = 247.0
NON_LIFETIME = 145.0

Remote = Hashable


@dataclass(slots=True, eq=False)
class Request:
    """A new request from ``remote``; pass it back to ``ServerEndpoint.respond`` exactly once."""

    remote: Remote
    message: Message
    received: float
    acked: bool = False
    """An empty ACK already went out: the response will be a separate one."""
    answered: bool = False

    def __repr__(self) -> str:
        return f"<Request {self.message!r} from {self.remote!r}>"


@dataclass(frozen=True, slots=True)
class Gone:
    """Observer ``(remote, token)`` went away: it sent an RST, or a confirmable message to it timed out."""

    remote: Remote
    token: bytes
    reason: str
    """``reset`` or ``timeout``."""


@dataclass(slots=True, eq=False)
class Transmission:
    """An outstanding confirmable message of ours."""

    remote: Remote
    mid: int
    token: bytes
    datagram: bytes
    deadline: float
    timeout: float
    attempts: int = 0


class _Entry:
    """Deduplication state of one received message id."""

    __slots__ = ("expires", "request", "response")

    def __init__(self, request: Request | None, expires: float) -> None:
        self.request = request
        self.response: bytes | None = None
        self.expires = expires


class ServerEndpoint:
    """See the module docstring. ``stats`` counts by name (the I/O layer maps them to its stats scope)."""

    def __init__(
        self,
        *,
        max_dedup: int = 16384,
        max_outstanding: int = 4096,
        empty_ack_delay: float = 0.5,
        rng: _random.Random | None = None,
    ) -> None:
        self.max_dedup = max_dedup
        self.max_outstanding = max_outstanding
        self.empty_ack_delay = empty_ack_delay
        self.rng = rng or _random.Random()
        self._mid = self.rng.randrange(0x10000)
        self._dedup: OrderedDict[tuple[Remote, int], _Entry] = OrderedDict()
        self._outstanding: dict[tuple[Remote, int], Transmission] = {}
        self._by_token: dict[tuple[Remote, bytes], tuple[Remote, int]] = {}
        """The latest confirmable message per (remote, token), for replacing notifications."""
        self._timers: list[tuple[float, int, tuple[Remote, int]]] = []
        self._seq = 0
        self._recent_non: OrderedDict[tuple[Remote, int], bytes] = OrderedDict()
        """Message ids of recent non-confirmable notifications -> token, so an RST to one ends it."""
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "rx", "tx", "malformed", "duplicate", "dedup_evicted", "empty_ack", "separate",
                "retransmit", "con_timeout", "reset_rx", "ping", "ignored", "outstanding_overflow",
                "replaced", "rejected",
            ),
            0,
        )  # fmt: skip
        self.gone: list[Gone] = []
        """Observers found gone since the caller last emptied the list."""

    def __repr__(self) -> str:
        return f"<ServerEndpoint dedup={len(self._dedup)} outstanding={len(self._outstanding)}>"

    # ------------------------------------------------------------------------------------ input
    def receive(
        self, data: bytes, remote: Remote, now: float, out: list[tuple[bytes, Remote]]
    ) -> Request | None:
        """One datagram from ``remote``: a new request (to answer), or None (handled here). Datagrams to
        send are appended to ``out``."""
        self.stats["rx"] += 1
        try:
            msg = decode(data)
        except CoapFormatError as exc:
            self.stats["malformed"] += 1
            if exc.mid is not None and exc.mtype == CON:  # §4.2: reject a confirmable message we cannot parse
                out.append((encode(Message(RST, 0, exc.mid)), remote))
            return None
        mtype, code = msg.mtype, msg.code
        if code == 0:
            if mtype == CON:  # a CoAP ping (§4.3): answered with RST
                self.stats["ping"] += 1
                out.append((encode(Message(RST, 0, msg.mid)), remote))
            elif mtype == ACK:
                self._acknowledged(remote, msg.mid)
            elif mtype == RST:
                self._reset(remote, msg.mid)
            else:
                self.stats["ignored"] += 1
            return None
        if not is_request_code(code):
            if mtype == ACK:  # a piggybacked response to something we sent: we only send responses
                self._acknowledged(remote, msg.mid)
            elif mtype == CON:
                out.append((encode(Message(RST, 0, msg.mid)), remote))
            self.stats["ignored"] += 1
            return None
        if mtype in (ACK, RST):  # a request cannot be carried in an ACK or RST (§4.2 / §4.3)
            self.stats["malformed"] += 1
            return None
        key = (remote, msg.mid)
        entry = self._dedup.get(key)
        if entry is not None and entry.expires > now:
            self.stats["duplicate"] += 1
            if entry.response is not None:
                out.append((entry.response, remote))
            elif entry.request is not None and entry.request.acked:
                out.append((encode(Message(ACK, 0, msg.mid)), remote))
            return None
        req = Request(remote, msg, now)
        self._remember(key, req, now + (EXCHANGE_LIFETIME if mtype == CON else NON_LIFETIME))
        return req

    def _remember(self, key: tuple[Remote, int], req: Request, expires: float) -> None:
        d = self._dedup
        if key in d:
            del d[key]
        d[key] = _Entry(req, expires)
        while len(d) > self.max_dedup:
            _, old = d.popitem(last=False)
            if old.expires > req.received:
                self.stats["dedup_evicted"] += 1

    def expire(self, now: float) -> None:
        """Drop deduplication entries past their lifetime (oldest first; cheap when nothing expired)."""
        d = self._dedup
        while d:
            key = next(iter(d))
            if d[key].expires > now:
                break
            del d[key]

    # ----------------------------------------------------------------------------------- output
    def ack_due(self, req: Request, out: list[tuple[bytes, Remote]]) -> None:
        """``empty_ack_delay`` passed without a response: acknowledge a confirmable request now."""
        if req.answered or req.acked or req.message.mtype != CON:
            return
        req.acked = True
        self.stats["empty_ack"] += 1
        out.append((encode(Message(ACK, 0, req.message.mid)), req.remote))

    def reject(self, req: Request, out: list[tuple[bytes, Remote]]) -> None:
        """Reject ``req`` (§4.2/§4.3): a Reset instead of a response; a duplicate gets the Reset again."""
        if req.answered:
            return
        req.answered = True
        raw = encode(Message(RST, 0, req.message.mid))
        out.append((raw, req.remote))
        self.stats["rejected"] += 1
        entry = self._dedup.get((req.remote, req.message.mid))
        if entry is not None and entry.request is req:
            entry.request = None
            entry.response = raw

    def respond(
        self,
        req: Request,
        code: int,
        options: tuple[tuple[int, bytes], ...],
        payload: bytes,
        now: float,
        out: list[tuple[bytes, Remote]],
    ) -> None:
        """Answer ``req`` (options sorted). Piggybacked if no empty ACK went out, else a separate response."""
        if req.answered:
            return
        req.answered = True
        m = req.message
        raw: bytes | None
        if m.mtype == CON and not req.acked:
            raw = encode(Message(ACK, code, m.mid, m.token, options, payload))
        elif m.mtype == CON:
            self.stats["separate"] += 1
            raw = self._send_con(req.remote, code, m.token, options, payload, now)
            if raw is None:
                return
        else:
            raw = encode(Message(NON, code, self.next_mid(), m.token, options, payload))
        out.append((raw, req.remote))
        entry = self._dedup.get((req.remote, m.mid))
        if entry is not None and entry.request is req:
            entry.request = None
            # A duplicate gets the piggybacked response again; after a separate response (retransmitted by
            # its own timer) it gets the empty ACK again (§4.5), its first ACK having been lost.
            entry.response = raw if not req.acked else encode(Message(ACK, 0, m.mid))

    def notify(
        self,
        remote: Remote,
        token: bytes,
        code: int,
        options: tuple[tuple[int, bytes], ...],
        payload: bytes,
        *,
        confirmable: bool,
        now: float,
        out: list[tuple[bytes, Remote]],
    ) -> bool:
        """Send a notification; False if too many confirmable messages are outstanding (dropped)."""
        if confirmable:
            # RFC 7641 §4.5.2: a newer notification replaces one still awaiting its ACK, and inherits its
            # retransmission counter and timeout (so an observer that is gone is found just as fast).
            old = self._by_token.get((remote, token))
            prev = self._outstanding.pop(old, None) if old is not None else None
            raw = self._send_con(remote, code, token, options, payload, now, prev)
            if raw is None:
                return False
        else:
            mid = self.next_mid()
            raw = encode(Message(NON, code, mid, token, options, payload))
            recent = self._recent_non
            recent[(remote, mid)] = token
            if len(recent) > self.max_outstanding:
                recent.popitem(last=False)
        out.append((raw, remote))
        return True

    def busy(self, remote: Remote, token: bytes) -> bool:
        """A confirmable message with ``token`` to ``remote`` awaits its ACK."""
        return (remote, token) in self._by_token

    def next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def _send_con(
        self,
        remote: Remote,
        code: int,
        token: bytes,
        options: tuple[tuple[int, bytes], ...],
        payload: bytes,
        now: float,
        prev: Transmission | None = None,
    ) -> bytes | None:
        if len(self._outstanding) >= self.max_outstanding:
            self.stats["outstanding_overflow"] += 1
            return None
        mid = self.next_mid()
        raw = encode(Message(CON, code, mid, token, options, payload))
        if prev is None:
            timeout = ACK_TIMEOUT * (1 + (ACK_RANDOM_FACTOR - 1) * self.rng.random())
            t = Transmission(remote, mid, token, raw, now + timeout, timeout)
        else:
            self.stats["replaced"] += 1
            t = Transmission(remote, mid, token, raw, prev.deadline, prev.timeout, prev.attempts)
        key = (remote, mid)
        self._outstanding[key] = t
        self._by_token[(remote, token)] = key
        self._seq += 1
        heapq.heappush(self._timers, (t.deadline, self._seq, key))
        return raw

    def _forget(self, key: tuple[Remote, int]) -> Transmission | None:
        t = self._outstanding.pop(key, None)
        if t is not None and self._by_token.get((t.remote, t.token)) == key:
            del self._by_token[(t.remote, t.token)]
        return t

    def _acknowledged(self, remote: Remote, mid: int) -> None:
        self._forget((remote, mid))

    def _reset(self, remote: Remote, mid: int) -> None:
        self.stats["reset_rx"] += 1
        t = self._forget((remote, mid))
        token: bytes | None = t.token if t is not None else self._recent_non.pop((remote, mid), None)
        if token is not None:
            self.gone.append(Gone(remote, token, "reset"))

    # ----------------------------------------------------------------------------------- timers
    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def tick(self, now: float, out: list[tuple[bytes, Remote]]) -> None:
        """Retransmit confirmable messages whose timeout passed; give up after MAX_RETRANSMIT (§4.2)."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, key = heapq.heappop(timers)
            t = self._outstanding.get(key)
            if t is None:
                continue
            if t.attempts >= MAX_RETRANSMIT:
                self._forget(key)
                self.stats["con_timeout"] += 1
                self.gone.append(Gone(t.remote, t.token, "timeout"))
                continue
            t.attempts += 1
            t.timeout *= 2
            t.deadline = now + t.timeout
            self.stats["retransmit"] += 1
            out.append((t.datagram, t.remote))
            self._seq += 1
            heapq.heappush(timers, (t.deadline, self._seq, key))
