"""Redaction of a loaded config document for ``/config_dump`` (secrets never leave the process)."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["REDACTED", "redact"]

REDACTED = "[redacted]"


def _secret(key: object) -> bool:
    if not isinstance(key, str):
        return False
    low = key.lower()
    return low in ("private_key", "password") or "secret" in low


def redact(raw: object) -> object:
    """A deep copy of ``raw`` with every ``private_key``, ``password`` and ``*secret*`` value replaced.

    Mappings become dicts and lists/tuples become lists (the JSON shapes); other values are returned
    as they are (they are immutable scalars in a loaded document).
    """
    if isinstance(raw, Mapping):
        return {k: (REDACTED if _secret(k) else redact(v)) for k, v in raw.items()}
    if isinstance(raw, list | tuple):
        return [redact(v) for v in raw]
    return raw
