"""Staged rollouts: the signed catalog with each agent's share of a rollout, and where rollouts stand.

A resource stored with ``rollout: {percent: N}`` (1..99) does not reach every matching agent at once. The
store (``store.py``) starts a rollout when such a resource gets a new version and remembers the previous
version; this module turns that into what agents get:

* ``build_catalog`` signs every stored resource (once per version) and marks a resource under a running or
  halted rollout with ``delta.Staged`` (the percentage, the previous version, signed too, and the extra
  first-stage agents). ``delta.select`` then gives the new version to the agents of the first stage -- a
  stable choice: ``stage_bucket(node id, resource name) < N * 100`` out of 10,000, so the same agents are
  chosen on every control plane and restart, and a larger percentage keeps the agents of a smaller one --
  and the previous version (nothing, for a new resource) to everyone else.
* When every connected agent of the first stage has ACKed the version, the store marks the rollout
  ``complete`` and bumps its generation: the server rebuilds the catalog and the rest of the fleet gets the
  version. ``controlplane-lite rollout promote ID`` (or ``POST /v1/rollouts/ID/promote``) does it by hand.
* A NACK of the version by any agent halts the rollout (``halted``, the NACK as the reason): nobody else
  gets it; the agents that applied it keep it, the others keep the previous version. Storing a fixed
  version starts a new rollout from the same previous version; deleting the resource cancels it.
* When no known matching agent falls under the percentage (a small fleet), the one with the lowest bucket
  is the first stage, so the rollout still waits for a real ACK before going to everyone.

``progress`` computes what ``status`` and ``GET /v1/rollouts`` show: stage, ACK and NACK counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from microenvoy.xds import cose

from controlplane_lite.delta import Resource, Staged, in_first_stage, matches
from controlplane_lite.refs import cluster_refs
from controlplane_lite.store import Rollout, Store
from controlplane_lite.validate import describe
from controlplane_lite.versions import KIND_BY_TYPE_URL, LISTENER, ROUTE

__all__ = ["RolloutProgress", "build_catalog", "find_rollout", "progress"]


def _resource(
    key: Ed25519PrivateKey,
    cache: dict[tuple[str, str, str], bytes],
    type_url: str,
    name: str,
    version: str,
    body: Mapping[str, Any],
    ttl: float | None,
    selector: Mapping[str, str],
    rollout: Staged | None = None,
) -> Resource:
    k = (type_url, name, version)
    sig = cache.get(k)
    if sig is None:
        sig = cache[k] = cose.sign_resource(key, type_url, name, version, body)
    refs = frozenset(cluster_refs(body)) if type_url in (LISTENER, ROUTE) else frozenset()
    return Resource(type_url, name, version, body, sig, ttl, refs, selector, rollout)


def build_catalog(
    store: Store, key: Ed25519PrivateKey, cache: dict[tuple[str, str, str], bytes] | None = None
) -> dict[str, dict[str, Resource]]:
    """Every stored resource, signed (``cache`` keeps signatures per (type, name, version)), with the
    staged rollouts in progress attached (``Resource.rollout``)."""
    cache = {} if cache is None else cache
    active = store.active_rollouts()
    out: dict[str, dict[str, Resource]] = {}
    for r in store.resources():
        staged: Staged | None = None
        ro = active.get((r.type_url, r.name))
        if ro is not None and ro.version == r.version:
            previous: Resource | None = None
            if ro.previous_version is not None:
                body = store.version_body(r.type_url, r.name, ro.previous_version)
                if body is not None:
                    previous = _resource(
                        key, cache, r.type_url, r.name, ro.previous_version, body, r.ttl, r.selector
                    )
            staged = Staged(ro.percent, previous, frozenset(ro.stage))
        out.setdefault(r.type_url, {})[r.name] = _resource(
            key, cache, r.type_url, r.name, r.version, r.resource, r.ttl, r.selector, staged
        )
    return out


@dataclass(frozen=True, slots=True)
class RolloutProgress:
    """Where one rollout stands."""

    rollout: Rollout
    """The rollout."""
    stage: tuple[str, ...]
    """Known matching agents in the first stage (node ids)."""
    matching: int
    """Known agents the resource's selector matches."""
    acked: tuple[str, ...]
    """Agents that ACKed the rollout's version."""
    nacked: tuple[tuple[str, str], ...]
    """(node id, message) of the agents that NACKed it."""

    @property
    def stage_label(self) -> str:
        """``first 25% (1 agents)`` while the fleet is split, ``all`` once complete."""
        ro = self.rollout
        if ro.state == "complete":
            return f"all ({self.matching} agents)"
        if ro.active:
            return f"first {ro.percent}% ({len(self.stage)} agents)"
        return "-"

    def as_json(self) -> dict[str, Any]:
        """The ``GET /v1/rollouts`` entry."""
        ro = self.rollout
        return {
            "id": ro.id,
            "type": KIND_BY_TYPE_URL.get(ro.type_url, ro.type_url),
            "name": ro.name,
            "version": ro.version,
            "previous_version": ro.previous_version,
            "percent": ro.percent,
            "state": ro.state,
            "reason": ro.reason,
            "stage": list(self.stage),
            "stage_acked": sum(1 for n in self.stage if n in self.acked),
            "matching_agents": self.matching,
            "acked": len(self.acked),
            "nacked": len(self.nacked),
            "nacks": [{"node": n, "message": m} for n, m in self.nacked],
            "created": ro.created,
            "updated": ro.updated,
        }

    def __str__(self) -> str:
        return f"rollout {self.rollout.id} of {describe((self.rollout.type_url, self.rollout.name))}"


def progress(store: Store) -> list[RolloutProgress]:
    """Every rollout with its stage and ACK/NACK counts, oldest first."""
    rollouts = store.rollouts()
    if not rollouts:
        return []
    agents = store.agents()
    answers = {a.node_id: {(r.type_url, r.name): r for r in store.agent_resources(a.node_id)} for a in agents}
    selectors = {(r.type_url, r.name): r.selector for r in store.resources()}
    out: list[RolloutProgress] = []
    for ro in rollouts:
        key = (ro.type_url, ro.name)
        selector = selectors.get(key, {})
        matching = [a for a in agents if not selector or matches(selector, a.metadata)]
        stage = tuple(a.node_id for a in matching if in_first_stage(a.node_id, ro.name, ro.percent, ro.stage))
        acked: list[str] = []
        nacked: list[tuple[str, str]] = []
        for a in agents:
            row = answers[a.node_id].get(key)
            if row is None:
                continue
            if row.acked_version == ro.version:
                acked.append(a.node_id)
            if row.nack_version == ro.version:
                nacked.append((a.node_id, row.nack_message or ""))
        out.append(RolloutProgress(ro, stage, len(matching), tuple(acked), tuple(nacked)))
    return out


def find_rollout(store: Store, ref: str) -> Rollout:
    """The rollout ``ref`` names: its id, or a resource (``NAME`` or ``TYPE/NAME``) with an active rollout
    (the latest rollout of the resource if none is active). Raises ``LookupError``."""
    rollouts = store.rollouts()
    if ref.isdigit():
        for ro in rollouts:
            if ro.id == int(ref):
                return ro
        raise LookupError(f"no rollout {ref}")
    kind, _, name = ref.rpartition("/")
    found = [
        ro for ro in rollouts if ro.name == name and (not kind or KIND_BY_TYPE_URL.get(ro.type_url) == kind)
    ]
    if not found:
        raise LookupError(f"no rollout of {ref!r}")
    active = [ro for ro in found if ro.active]
    if len({(ro.type_url, ro.name) for ro in active or found}) > 1:
        raise LookupError(f"{ref!r} is ambiguous: say TYPE/NAME (cluster/{name}, listener/{name} ...)")
    return (active or found)[-1]
