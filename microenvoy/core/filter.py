"""The HTTP filter contract (Envoy's, simplified), shared by every front.

A filter chain is built per exchange from factories that validated their typed config once at load. The
front calls the ``decode_*`` hooks in configuration order on the request and the ``encode_*`` hooks in
reverse order on the response. Each hook returns:

* ``FilterStatus.CONTINUE``: pass the event to the next filter;
* ``FilterStatus.STOP``: hold iteration; the filter later calls ``callbacks.continue_decoding()`` /
  ``continue_encoding()`` (e.g. after a timer) or ``callbacks.send_local_reply(...)``. On data hooks STOP
  means "buffer this chunk" (bounded by the route's body limit) until continue.

A filter may call ``send_local_reply`` from any decode hook; the chain then stops and the reply goes through
the encode hooks of the filters before it, as in Envoy. Filters never do I/O: time comes from
``callbacks.now()`` and delays from ``callbacks.set_timer()``, which the front implements.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from microenvoy.core.exchange import Exchange
from microenvoy.core.headers import Headers

if TYPE_CHECKING:
    from microenvoy.admin.stats import Scope

__all__ = [
    "FactoryContext",
    "FilterCallbacks",
    "FilterStatus",
    "HttpFilter",
    "HttpFilterFactory",
    "TimerHandle",
]


class FilterStatus(enum.Enum):
    CONTINUE = "continue"
    STOP = "stop"


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class FilterCallbacks(Protocol):
    """What a filter may ask of the front that runs it."""

    @property
    def exchange(self) -> Exchange: ...

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def set_timer(self, delay: float, callback: Callable[[], None]) -> TimerHandle: ...

    def continue_decoding(self) -> None: ...

    def continue_encoding(self) -> None: ...

    def send_local_reply(
        self,
        status: int,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        details: str = "",
        flag: str | None = None,
    ) -> None:
        """Answer the request locally (gRPC requests get the matching grpc-status, as Envoy does).

        ``details`` is the response code details for access logs, ``flag`` a ``ResponseFlag`` code.
        """
        ...

    def clear_route_cache(self) -> None:
        """Re-match the route after this filter changed headers the route table looks at."""
        ...

    @property
    def stats(self) -> Scope:
        """The front's stats scope (``http.<stat_prefix>.``)."""
        ...


class HttpFilter:
    """Base class: every hook continues by default."""

    __slots__ = ("callbacks",)

    def __init__(self, callbacks: FilterCallbacks) -> None:
        self.callbacks = callbacks

    def decode_headers(self, headers: Headers, end_stream: bool) -> FilterStatus:
        return FilterStatus.CONTINUE

    def decode_data(self, data: bytes, end_stream: bool) -> FilterStatus:
        return FilterStatus.CONTINUE

    def decode_trailers(self, trailers: Headers) -> FilterStatus:
        return FilterStatus.CONTINUE

    def encode_headers(self, headers: Headers, end_stream: bool) -> FilterStatus:
        return FilterStatus.CONTINUE

    def encode_data(self, data: bytes, end_stream: bool) -> FilterStatus:
        return FilterStatus.CONTINUE

    def encode_trailers(self, trailers: Headers) -> FilterStatus:
        return FilterStatus.CONTINUE

    def on_destroy(self) -> None:
        """The exchange is over (completed or reset); cancel timers here."""


class HttpFilterFactory(Protocol):
    """Built once per config snapshot from the validated typed config; makes one filter per exchange."""

    name: str

    def create(self, callbacks: FilterCallbacks) -> HttpFilter: ...

    def admin_state(self) -> dict[str, Any]:
        """Optional live state for /config_dump (may be empty)."""
        ...


class FactoryContext:
    """What a filter factory gets at build time (once per config snapshot)."""

    __slots__ = ("health", "random", "stat_prefix", "stats")

    def __init__(self, stats: Scope, stat_prefix: str, random: Any, health: Any = None) -> None:
        self.stats = stats
        """Scope of the owning front (``http.<stat_prefix>.``)."""
        self.stat_prefix = stat_prefix
        self.random = random
        """An injected ``random.Random`` (tests seed it)."""
        self.health = health
        """The process-wide health state (``/healthcheck/fail``) for the health_check filter."""

    def __repr__(self) -> str:
        return f"<FactoryContext {self.stat_prefix!r}>"
