"""Log levels and the ``microenvoy`` logger hierarchy, for the admin ``/logging`` endpoint and the CLI.

Loggers form one tree under ``microenvoy`` with a child per layer (``microenvoy.io``, ``microenvoy.codecs``,
...; modules log to ``logging.getLogger(__name__)``). Level names are Envoy's: ``trace``, ``debug``, ``info``,
``warning`` (``warn``), ``error``, ``critical``, ``off``. ``trace`` is a level below DEBUG (5) and ``off``
above CRITICAL, so nothing passes.

A logger is named in full (``microenvoy.io.admin_server``) or relative to the root (``io``,
``io.admin_server``). This module touches only the stdlib ``logging`` tree (no handlers): handlers installed
by the CLI should keep level NOTSET so the logger levels decide.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

__all__ = [
    "LAYERS",
    "LEVELS",
    "ROOT",
    "known_loggers",
    "level_name",
    "levels_text",
    "logger_name",
    "parse_level",
    "parse_logging_query",
    "set_level",
]

ROOT = "microenvoy"
"""The root of every microenvoy logger."""

LAYERS: tuple[str, ...] = (
    "admin", "cli", "codecs", "config", "core", "filters", "io", "profiles", "router", "store", "upstream",
    "xds",
)  # fmt: skip
"""Direct children of ``microenvoy``: one per layer (ARCHITECTURE.md section 3)."""

TRACE = 5
OFF = logging.CRITICAL + 10

LEVELS: dict[str, int] = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": OFF,
}
"""Envoy's level names -> stdlib levels."""

_NAMES: dict[int, str] = {v: k for k, v in reversed(LEVELS.items())}  # "warning" wins over "warn"
_LOGGER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_level(name: str) -> int:
    """``"debug"`` -> ``logging.DEBUG``; case-insensitive; ValueError for an unknown name."""
    level = LEVELS.get(name.strip().lower())
    if level is None:
        raise ValueError(f"unknown log level {name!r} (expected one of {', '.join(LEVELS)})")
    return level


def level_name(level: int) -> str:
    """The Envoy name of a stdlib level; levels between names round down (``15`` -> ``debug``)."""
    if level in _NAMES:
        return _NAMES[level]
    below = [v for v in _NAMES if v <= level]
    return _NAMES[max(below)] if below else "trace"


def logger_name(name: str) -> str:
    """Canonical full logger name; ``"io"`` -> ``"microenvoy.io"``. ValueError for a name we do not own.

    Accepted: ``microenvoy``, any logger that already exists under it, and any name whose first component
    after ``microenvoy`` is a layer (so a module logger can be tuned before its module is imported).
    """
    name = name.strip()
    if not _LOGGER_NAME.fullmatch(name):
        raise ValueError(f"invalid logger name {name!r}")
    full = name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}"
    if full == ROOT or full in _existing() or full.split(".")[1] in LAYERS:
        return full
    raise ValueError(f"unknown logger {name!r} (layers: {', '.join(LAYERS)})")


def known_loggers() -> list[str]:
    """The root, every layer, and every existing logger below them, sorted."""
    return sorted({ROOT, *(f"{ROOT}.{layer}" for layer in LAYERS), *_existing()})


def levels_text() -> str:
    """Envoy's ``/logging`` listing with effective levels: ``active loggers:\\n  microenvoy: info\\n...``."""
    lines = ["active loggers:"]
    lines += [f"  {n}: {level_name(logging.getLogger(n).getEffectiveLevel())}" for n in known_loggers()]
    return "\n".join(lines) + "\n"


def set_level(level: str, logger: str | None = None) -> str:
    """Set one logger (``logger``) or all of them (None), return ``levels_text()``. ValueError if bad.

    "All" sets the root and resets every descendant to NOTSET, so each one's effective level is ``level``.
    """
    value = parse_level(level)
    if logger is None:
        logging.getLogger(ROOT).setLevel(value)
        for n in _existing():
            logging.getLogger(n).setLevel(logging.NOTSET)
    else:
        logging.getLogger(logger_name(logger)).setLevel(value)
    return levels_text()


def parse_logging_query(params: Iterable[tuple[str, str]]) -> list[tuple[str | None, str]]:
    """Validate ``/logging`` query parameters into ``[(logger or None for all, level), ...]``.

    Envoy's forms: ``level=<level>`` (all loggers), ``paths=<logger>:<level>,<logger>:<level>`` and
    ``<logger>=<level>``. Every level and logger is checked before anything is returned (so nothing is
    half-applied); ValueError names the first bad one.
    """
    out: list[tuple[str | None, str]] = []
    for key, value in params:
        if key == "level":
            parse_level(value)
            out.append((None, value.strip().lower()))
        elif key == "paths":
            for item in filter(None, (p.strip() for p in value.split(","))):
                name, sep, lvl = item.rpartition(":")
                if not sep:
                    raise ValueError(f"paths entry {item!r} is not <logger>:<level>")
                parse_level(lvl)
                out.append((logger_name(name), lvl.strip().lower()))
        else:
            if not value:
                raise ValueError(f"missing level for logger {key!r}")
            parse_level(value)
            out.append((logger_name(key), value.strip().lower()))
    return out


def _existing() -> set[str]:
    """Names of real loggers (not placeholders) under the root."""
    manager = logging.getLogger(ROOT).manager
    return {
        n
        for n, obj in list(manager.loggerDict.items())
        if n.startswith(ROOT + ".") and isinstance(obj, logging.Logger)
    }
