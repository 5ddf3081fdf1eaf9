"""``envoy.filters.http.router``: the terminal HTTP filter.

The forwarding itself (route lookup, cluster pick, retries, timeouts, upstream streaming) is done by the
front's engine, not by this class: ``RouterFilter`` is a pass-through marker whose presence ends the filter
chain, and its factory carries the router's typed config (``suppress_envoy_headers``, ``dynamic_stats``)
for the engine to read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from microenvoy.config.reader import Reader
from microenvoy.core.filter import FactoryContext, FilterCallbacks, HttpFilter

__all__ = [
    "NAME",
    "TYPE_URLS",
    "RouterConfig",
    "RouterFactory",
    "RouterFilter",
    "make_factory",
    "parse_config",
]

NAME = "envoy.filters.http.router"
TYPE_URLS = ("type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    suppress_envoy_headers: bool = False
    """Do not add ``x-envoy-*`` headers (``x-envoy-upstream-service-time``, ``x-envoy-original-path`` ...)."""
    dynamic_stats: bool = True
    """Emit per-upstream-cluster request stats (``cluster.<name>.upstream_rq_<code>`` ...)."""


def parse_config(r: Reader) -> RouterConfig:
    return RouterConfig(
        suppress_envoy_headers=r.boolean("suppress_envoy_headers"),
        dynamic_stats=r.boolean("dynamic_stats", True),
    )


class RouterFilter(HttpFilter):
    """Marks the end of the chain; every hook continues (the engine behind it does the forwarding)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<RouterFilter>"


class RouterFactory:
    """Makes ``RouterFilter`` markers and exposes ``config`` to the front's engine."""

    __slots__ = ("config", "name")

    def __init__(self, config: RouterConfig) -> None:
        self.name = NAME
        self.config = config

    def create(self, callbacks: FilterCallbacks) -> HttpFilter:
        return RouterFilter(callbacks)

    def admin_state(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"<RouterFactory {self.config}>"


def make_factory(config: RouterConfig, ctx: FactoryContext) -> RouterFactory:
    return RouterFactory(config)
