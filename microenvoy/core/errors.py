"""Errors shared across layers."""

from __future__ import annotations

__all__ = ["CodecError", "ConfigError"]


class ConfigError(Exception):
    """A configuration is invalid. ``errors`` holds every problem as ``path: message``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class CodecError(Exception):
    """A peer sent bytes the codec cannot accept; ``stat`` names the counter to bump."""

    def __init__(self, detail: str, stat: str = "protocol_error") -> None:
        super().__init__(detail)
        self.stat = stat
