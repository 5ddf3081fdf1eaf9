"""A small toolkit to turn raw YAML/JSON mappings into frozen config with path-carrying errors.

Every config parser (the bootstrap loader and each extension's ``parse_config``) reads through a ``Reader``:
it records every error as ``path: message`` instead of stopping at the first one, and ``finish()`` reports
fields nobody read as unknown. Parsers return a best-effort value even after an error so that one run
reports all problems; the caller raises ``ConfigError`` if ``errors`` is non-empty.

    r = Reader(raw, "static_resources.clusters[0]", errors)
    name = r.string("name", required=True)
    timeout = r.duration("connect_timeout", default=5.0)
    r.finish()
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = ["Reader", "parse_duration"]

T = TypeVar("T")
_MISSING: Any = object()
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|ms)$")


def parse_duration(value: object) -> float:
    """``"5s"``, ``"0.25s"``, ``"250ms"`` or a bare number of seconds -> seconds. Raises ValueError.

    Also accepts protobuf JSON's ``{seconds, nanos}``. Negative and non-finite values are rejected.
    """
    seconds: float | None = None
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, int | float):
        seconds = _finite(value)
    elif isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m:
            n = _finite(m.group(1))
            seconds = None if n is None else (n / 1000.0 if m.group(2) == "ms" else n)
    elif isinstance(value, Mapping) and set(value) <= {"seconds", "nanos"}:
        s, ns = value.get("seconds", 0), value.get("nanos", 0)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in (s, ns)):
            whole, frac = _finite(s), _finite(ns)
            seconds = None if whole is None or frac is None else whole + frac / 1e9
    if seconds is None:
        raise ValueError(f"expected a duration like '5s', '0.25s' or '250ms', got {_show(value)}")
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {_show(value)}")
    return seconds


def _show(v: object, limit: int = 60) -> str:
    """A bounded ``repr`` for error messages (huge values must not flood the error list)."""
    try:
        text = repr(v)
    except ValueError:  # ints beyond sys.get_int_max_str_digits()
        text = f"<{type(v).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finite(v: object) -> float | None:
    """``float(v)`` if that is a finite number, else None (never raises for int/float/str input)."""
    try:
        f = float(v)  # type: ignore[arg-type]
    except (ValueError, TypeError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def _type_name(v: object) -> str:
    if v is None:
        return "null"
    return {dict: "mapping", list: "list", str: "string", bool: "bool", int: "integer",
            float: "number"}.get(type(v), type(v).__name__)  # fmt: skip


class Reader:
    """Reads one mapping at ``path``; errors go to the shared ``errors`` list."""

    __slots__ = ("_invalid", "_seen", "errors", "path", "raw")

    def __init__(self, raw: object, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        self._seen: set[str] = set()
        self._invalid = False
        """Not a mapping (already reported): its missing required fields are not reported again."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.error(f"expected a mapping, got {_type_name(raw)}")
            self._invalid = True
            raw = {}
        self.raw: Mapping[str, Any] = raw

    # -- plumbing ------------------------------------------------------------------------------
    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, message: str, key: str | None = None) -> None:
        where = self.sub(key) if key is not None else self.path
        self.errors.append(f"{where}: {message}" if where else message)

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, default: Any = None) -> Any:
        """Raw access (marks the key as read)."""
        self._seen.add(key)
        return self.raw.get(key, default)

    def finish(self) -> None:
        """Report every key that no accessor read as an unknown field."""
        for key in self.raw:
            if key not in self._seen:
                self.error("unknown field", key)

    def ignore(self, *keys: str) -> None:
        """Accept these keys without reading them (e.g. ``@type`` checked elsewhere)."""
        self._seen.update(keys)

    def _take(self, key: str, required: bool) -> Any:
        self._seen.add(key)
        if key not in self.raw or self.raw[key] is None:
            if required and not self._invalid:
                self.error("required field is missing", key)
            return _MISSING
        return self.raw[key]

    # -- scalars -------------------------------------------------------------------------------
    def string(self, key: str, default: Any = "", *, required: bool = False) -> Any:
        v = self._take(key, required)
        if v is _MISSING:
            return default
        if not isinstance(v, str):
            self.error(f"expected a string, got {_type_name(v)}", key)
            return default
        return v

    def boolean(self, key: str, default: bool = False) -> bool:
        v = self._take(key, False)
        if v is _MISSING:
            return default
        if not isinstance(v, bool):
            self.error(f"expected true or false, got {_type_name(v)}", key)
            return default
        return v

    def integer(
        self,
        key: str,
        default: Any = 0,
        *,
        required: bool = False,
        min: int | None = None,
        max: int | None = None,
    ) -> Any:
        v = self._take(key, required)
        if v is _MISSING:
            return default
        if isinstance(v, Mapping) and set(v) == {"value"}:  # protobuf wrapper types (UInt32Value)
            v = v["value"]
        if isinstance(v, str) and v.isascii() and v.isdigit():  # proto3 JSON encodes 64-bit ints as strings
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            self.error(f"expected an integer, got {_type_name(v)}", key)
            return default
        if min is not None and v < min:
            self.error(f"must be >= {min}, got {v}", key)
            return default
        if max is not None and v > max:
            self.error(f"must be <= {max}, got {v}", key)
            return default
        return v

    def number(self, key: str, default: Any = 0.0, *, min: float | None = None) -> Any:
        v = self._take(key, False)
        if v is _MISSING:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float) or _finite(v) is None:
            self.error(f"expected a number, got {_type_name(v)}", key)
            return default
        if min is not None and v < min:
            self.error(f"must be >= {min}, got {v}", key)
            return default
        return float(v)

    def duration(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        """Seconds as a float from ``"5s"``/``"0.25s"``/``"250ms"`` (or ``{seconds, nanos}``)."""
        v = self._take(key, required)
        if v is _MISSING:
            return default
        try:
            return parse_duration(v)
        except ValueError as exc:
            self.error(str(exc), key)
            return default

    def positive_duration(self, key: str, default: Any = None) -> Any:
        """``duration`` that must be > 0 (Envoy's ``duration = {gt {}}``); ``default`` otherwise."""
        value = self.duration(key, default)
        if value is not None and value is not default and value <= 0:
            self.error("must be greater than 0", key)
            return default
        return value

    def enum(self, key: str, allowed: Sequence[str], default: Any = None, *,
             required: bool = False) -> Any:  # fmt: skip
        v = self._take(key, required)
        if v is _MISSING:
            return default
        if not isinstance(v, str):
            self.error(f"expected a string, got {_type_name(v)}", key)
            return default
        if v not in allowed:
            self.error(f"unknown value {v!r} (expected one of {', '.join(allowed)})", key)
            return default
        return v

    # -- structure -----------------------------------------------------------------------------
    def mapping(self, key: str, *, required: bool = False) -> Reader | None:
        """A nested mapping as its own Reader (call its ``finish()``), or None if absent."""
        v = self._take(key, required)
        if v is _MISSING:
            return None
        return Reader(v, self.sub(key), self.errors)

    def object(self, key: str, parse: Callable[[Reader], T], *, required: bool = False) -> T | None:
        """Parse a nested mapping with ``parse(reader)``; ``finish()`` is called for you."""
        r = self.mapping(key, required=required)
        if r is None:
            return None
        value = parse(r)
        r.finish()
        return value

    def objects(self, key: str, parse: Callable[[Reader], T], *, required: bool = False,
             non_empty: bool = False) -> tuple[T, ...]:  # fmt: skip
        """A list of mappings, each parsed with ``parse(reader)`` at ``key[i]``."""
        v = self._take(key, required)
        if v is _MISSING:
            return ()
        if not isinstance(v, list):
            self.error(f"expected a list, got {_type_name(v)}", key)
            return ()
        if non_empty and not v:
            self.error("must not be empty", key)
        out: list[T] = []
        for i, item in enumerate(v):
            r = Reader(item, f"{self.sub(key)}[{i}]", self.errors)
            out.append(parse(r))
            r.finish()
        return tuple(out)

    def strings(self, key: str, *, required: bool = False) -> tuple[str, ...]:
        v = self._take(key, required)
        if v is _MISSING:
            return ()
        if not isinstance(v, list):
            self.error(f"expected a list of strings, got {_type_name(v)}", key)
            return ()
        out: list[str] = []
        for i, item in enumerate(v):
            if isinstance(item, str):
                out.append(item)
            else:
                self.errors.append(f"{self.sub(key)}[{i}]: expected a string, got {_type_name(item)}")
        return tuple(out)

    def one_of(self, *keys: str, required: bool = True) -> str | None:
        """Exactly one of ``keys`` may be set (Envoy's oneof); returns which, or None."""
        present = [k for k in keys if self.raw.get(k) is not None]
        if len(present) > 1:
            self.error(f"only one of {', '.join(keys)} may be set, got {', '.join(present)}")
            return present[0]
        if not present:
            if required and not self._invalid:
                self.error(f"one of {', '.join(keys)} is required")
            return None
        return present[0]

    def __repr__(self) -> str:
        return f"<Reader {self.path!r}>"
