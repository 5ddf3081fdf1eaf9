"""Applying a change to the store: validate the resulting set with the agent's model, then write it.

Used by the directory watcher (``serve --dir``), ``controlplane-lite push`` and the REST API. A change is
all or nothing: if the resulting resource set has any problem, ``ConfigError`` is raised with every message
(each prefixed with where the resource came from) and the store is not touched, so nothing is pushed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from controlplane_lite.refs import Key
from controlplane_lite.sources import Change, ResourceSpec
from controlplane_lite.store import Store
from controlplane_lite.validate import ensure_valid, prospective

__all__ = ["apply_change", "stored_specs"]


def stored_specs(store: Store, source_prefix: str) -> dict[Key, ResourceSpec]:
    """The stored resources whose source starts with ``source_prefix`` (``dir:``), as specs."""
    return {
        (r.type_url, r.name): ResourceSpec(
            r.type_url, r.name, r.resource, r.selector, r.rollout_percent, r.ttl, r.source, r.source
        )
        for r in store.resources()
        if r.source.startswith(source_prefix)
    }


def apply_change(
    store: Store, upserts: Iterable[ResourceSpec], removals: Iterable[Key] = (), *, source: str = ""
) -> Change:
    """Validate and store; returns what actually changed in the store. Raises ``ConfigError``."""
    ups = {s.key: s for s in upserts}
    rem = frozenset(removals) - set(ups)
    stored = store.resources()
    current: dict[Key, Mapping[str, Any]] = {(r.type_url, r.name): r.resource for r in stored}
    origins = {(r.type_url, r.name): f"(stored from {r.source or 'unknown'})" for r in stored}
    origins.update({k: s.origin for k, s in ups.items() if s.origin})
    after = prospective(current, {k: s.resource for k, s in ups.items()}, rem)
    ensure_valid(after, origins)
    changed: dict[Key, ResourceSpec] = {}
    for key, spec in ups.items():
        if store.put(
            spec.type_url,
            spec.name,
            spec.resource,
            selector=spec.selector,
            rollout_percent=spec.rollout_percent,
            ttl=spec.ttl,
            source=spec.source,
        ):
            changed[key] = spec
    removed = frozenset(k for k in rem if store.delete(k[0], k[1], source=source))
    return Change(changed, removed)
