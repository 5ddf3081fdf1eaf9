"""Small shared pieces of the test peers: the response record, header helpers and condition waiting."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "Response",
    "StreamResetError",
    "async_wait_for",
    "header_list",
    "pairs_to_dict",
    "pause",
    "wait_for",
]

T = TypeVar("T")

HeaderInput = Iterable[tuple[str | bytes, str | bytes]]


def _s(v: str | bytes) -> str:
    return v.decode("latin-1") if isinstance(v, bytes) else v


def header_list(headers: HeaderInput) -> list[tuple[str, str]]:
    """Normalise header pairs to ``(str, str)`` (names kept as given)."""
    return [(_s(k), _s(v)) for k, v in headers]


class StreamResetError(Exception):
    """The peer reset the stream (HTTP/2 RST_STREAM or QUIC RESET_STREAM) before the response completed."""

    def __init__(self, stream_id: int, error_code: int) -> None:
        super().__init__(f"stream {stream_id} reset by peer with error code {error_code}")
        self.stream_id = stream_id
        self.error_code = error_code


@dataclass
class Response:
    """One HTTP response as a test sees it; header names are lower-case ``str``."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name`` (case-insensitive), or ``default``."""
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def trailer(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for k, v in self.trailers:
            if k.lower() == name:
                return v
        return default

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return (
            f"<Response {self.status} headers={len(self.headers)} body={len(self.body)}B "
            f"trailers={len(self.trailers)}>"
        )


def wait_for(
    condition: Callable[[], T | bool | None],
    timeout: float,
    *,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``condition`` until it returns a truthy value (returned) or ``timeout`` seconds pass (raises).

    This is condition polling with a deadline, not a fixed sleep: it returns as soon as the condition holds.
    """
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value  # type: ignore[return-value]
        except Exception as exc:  # the condition may fail until the peer is up
            last_exc = exc
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {text}") from last_exc
        time.sleep(interval)


async def async_wait_for(
    condition: Callable[[], T | bool | Awaitable[T | bool | None] | None],
    within: float,
    *,
    interval: float = 0.02,
    message: str = "condition",
) -> T:
    """The asyncio twin of ``wait_for``; ``condition`` may be sync or async."""
    deadline = time.monotonic() + within
    last_exc: Exception | None = None
    while True:
        try:
            value: Any = condition()
            if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
                value = await value
            if value:
                return value  # type: ignore[no-any-return]
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {within:.1f}s waiting for {message}") from last_exc
        await pause(interval)


async def pause(seconds: float) -> None:
    """Let time pass inside a peer (a server's deliberate delay, a polling interval).

    The one place the test peers call ``asyncio.sleep``: the project bans it for sans-IO code, and tests never
    use it to wait for something to happen (they poll a condition with a deadline instead).
    """
    await asyncio.sleep(seconds)  # a peer's deliberate delay, not a wait for an event


def pairs_to_dict(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Join repeated header values with ``, `` (names lower-cased)."""
    out: dict[str, str] = {}
    for k, v in headers:
        k = k.lower()
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out
