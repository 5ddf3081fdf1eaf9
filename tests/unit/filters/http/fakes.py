"""A fake ``FilterCallbacks`` for filter unit tests: a settable clock, manual timers, recorded replies."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from microenvoy.admin.stats import Scope, Store
from microenvoy.config.reader import Reader
from microenvoy.core.errors import ConfigError
from microenvoy.core.exchange import DownstreamInfo, Exchange
from microenvoy.core.filter import FactoryContext
from microenvoy.core.headers import Headers


@dataclass
class LocalReply:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    details: str
    flag: str | None


@dataclass
class FakeTimer:
    due: float
    callback: Callable[[], None]
    cancelled: bool = False
    fired: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeCallbacks:
    exchange: Exchange
    stats: Scope
    clock: float = 0.0
    timers: list[FakeTimer] = field(default_factory=list)
    replies: list[LocalReply] = field(default_factory=list)
    continued_decoding: int = 0
    continued_encoding: int = 0
    route_cache_cleared: int = 0

    def now(self) -> float:
        return self.clock

    def set_timer(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        t = FakeTimer(self.clock + delay, callback)
        self.timers.append(t)
        return t

    def advance(self, seconds: float) -> None:
        """Move the clock and fire due timers in order."""
        self.clock += seconds
        for t in sorted(self.timers, key=lambda t: t.due):
            if not t.cancelled and not t.fired and t.due <= self.clock:
                t.fired = True
                t.callback()

    def continue_decoding(self) -> None:
        self.continued_decoding += 1

    def continue_encoding(self) -> None:
        self.continued_encoding += 1

    def send_local_reply(
        self,
        status: int,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        details: str = "",
        flag: str | None = None,
    ) -> None:
        self.replies.append(LocalReply(status, body, list(headers or []), details, flag))
        if flag:
            self.exchange.response_flags.add(flag)

    def clear_route_cache(self) -> None:
        self.route_cache_cleared += 1


def request(
    path: str = "/",
    method: str = "GET",
    remote: tuple[str, int] = ("192.0.2.10", 40000),
    local: tuple[str, int] = ("192.0.2.1", 8443),
    peer_sans: tuple[str, ...] = (),
    sni: str | None = None,
    **extra: str,
) -> tuple[Headers, DownstreamInfo]:
    h = Headers([(b":method", method.encode()), (b":scheme", b"https"), (b":authority", b"svc"),
                 (b":path", path.encode())])  # fmt: skip
    for k, v in extra.items():
        h.add(k.replace("_", "-").encode(), v.encode())
    ds = DownstreamInfo("HTTP/2", remote, local, "l", tls=bool(peer_sans), sni=sni, peer_sans=peer_sans)
    return h, ds


def callbacks(
    headers: Headers | None = None, downstream: DownstreamInfo | None = None, store: Store | None = None
) -> FakeCallbacks:
    if headers is None or downstream is None:
        headers, downstream = request()
    store = store or Store()
    return FakeCallbacks(Exchange(headers, downstream, start_time=0.0), store.scope("http.ingress."))


def context(store: Store, seed: int = 1, health: Any = None) -> FactoryContext:
    return FactoryContext(store.scope("http.ingress."), "ingress", random.Random(seed), health=health)


def parse(module: Any, raw: object) -> Any:
    """Parse typed config like the loader does (``finish()`` then raise ``ConfigError``)."""
    errors: list[str] = []
    r = Reader(raw, "typed_config", errors)
    config = module.parse_config(r)
    r.finish()
    if errors:
        raise ConfigError(errors)
    return config


def parse_errors(module: Any, raw: object) -> list[str]:
    try:
        parse(module, raw)
    except ConfigError as exc:
        return exc.errors
    return []
