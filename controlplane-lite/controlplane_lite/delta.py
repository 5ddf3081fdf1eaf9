"""The per-stream delta xDS server state machine (sans-IO): what to send one agent, and when.

Theory of operation
-------------------
One ``DeltaStream`` per open ``DeltaAggregatedResources`` stream. The I/O shell (``server.py``) feeds it
the agent's requests (``on_request``) and the agent's current view of the resources (``set_snapshot``: type
URL -> name -> ``Resource``, already targeted and signed), then calls ``poll(now)`` for the responses to
send and sleeps until ``next_deadline()`` (TTL heartbeats). Both return events (``Sent``, ``Acked``,
``Nacked``) that the shell records in the store. Time is an input; nothing here does I/O.

Per type URL the stream keeps the agent's **interest** (``*`` wildcard and/or explicit names; an empty first
subscribe of Listener/Cluster is the legacy wildcard) and, per resource, the version **last sent** and the
version **last ACKed**, the **NACKed** version with its message, and the names that **must be answered**.

The rules of DELTA.md, as implemented:

1. An ACK (``response_nonce`` without ``error_detail``) marks every resource of that response as ACKed; a
   NACK marks the resources named in ``error_detail.details`` (all of them when there are no details) as
   NACKed with the message and the rest as ACKed (the agent applies the valid ones). A nonce that is not
   outstanding (stale or unknown) changes nothing, but the request's subscription changes are honoured.
2. Versions are the content hashes computed by the store; "changed" means "another version".
3. Every name in ``resource_names_subscribe`` is answered, even if the agent has it (unless it announced
   that very name in ``initial_resource_versions``): with the resource, or in ``removed_resources`` at once
   when it does not exist.
4. ``initial_resource_versions`` counts as sent and ACKed: only what differs is sent, and every announced
   name that no longer exists is removed.
5. Make before break: each poll sends updates in the order Secret, Cluster, ClusterLoadAssignment, Listener,
   RouteConfiguration (secrets first: clusters and listeners reference them), then removals in the reverse
   order. A Listener or RouteConfiguration that routes to a cluster the agent has not ACKed yet (a cluster of
   its view) is held until that ACK. A Cluster is not removed while a Listener or RouteConfiguration the
   agent holds (ACKed or in flight) still routes to it: its removal waits for their update's ACK.
6. A NACKed version is never sent again; the next version is. NACKs carry their message to the store.
   ``seed_nacks`` carries NACKs over from an earlier stream of the same agent.
7. A resource with ``ttl`` is sent with it; while the agent has ACKed its current version a heartbeat (same
   name and version, no body, no signature -- there is nothing to sign) is sent every ``ttl / 2``. A NACKed
   heartbeat (the agent no longer has it) makes the resource go out in full again.

Targeting and staged rollouts happen before the stream, in ``select``: an agent's view holds only the
resources whose selector its node metadata matches (a resource that stops matching is therefore removed
from that agent like a deleted one), and a resource under a staged rollout (``Resource.rollout``) is the new
version for the agents of the first stage (``in_first_stage``: a stable hash of node id and resource name)
and the previous version -- or nothing, for a new resource -- for everyone else.

Nonces are ``<prefix><counter>``: unique per stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from microenvoy.xds.messages import (
    DEFAULT_WILDCARD_TYPE_URLS,
    WILDCARD,
    DeltaRequest,
    DeltaResponse,
    Node,
    ResourceEntry,
)

from controlplane_lite.versions import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET

__all__ = [
    "UPDATE_ORDER",
    "Acked",
    "DeltaStream",
    "Event",
    "Nacked",
    "Resource",
    "Sent",
    "Snapshot",
    "Staged",
    "StaleNonce",
    "in_first_stage",
    "matches",
    "select",
    "stage_bucket",
]

UPDATE_ORDER: tuple[str, ...] = (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE)
"""Updates go out in this order (any other type after, by name); removals in the reverse order."""
_GATED = (LISTENER, ROUTE)


@dataclass(frozen=True, slots=True)
class Resource:
    """One resource as the stream sends it."""

    type_url: str
    """Its type URL."""
    name: str
    """Its name."""
    version: str
    """Its content-hash version."""
    body: Mapping[str, Any]
    """The resource map (``@type`` included)."""
    signature: bytes
    """COSE_Sign1 over (type_url, name, version, body)."""
    ttl: float | None = None
    """Seconds the agent keeps it without a refresh, or None."""
    clusters: frozenset[str] = frozenset()
    """Clusters it routes to (Listener, RouteConfiguration): gates it until the agent ACKed them."""
    selector: Mapping[str, str] = field(default_factory=dict)
    """Node labels an agent must carry to get it (``select``)."""
    rollout: Staged | None = None
    """A staged rollout of this version in progress (running or halted), or None: everyone gets it."""


@dataclass(frozen=True, slots=True)
class Staged:
    """A version in its first rollout stage: who gets it, and what everyone else keeps."""

    percent: int
    """The share (1..99) of matching agents in the first stage (``in_first_stage``)."""
    previous: Resource | None
    """What the agents outside the first stage get: the version they had (None: the resource is new)."""
    also: frozenset[str] = frozenset()
    """Node ids in the first stage besides the hash choice (the one agent picked when no known agent
    fell under the percentage, so that a small fleet still has a first stage)."""


Snapshot = Mapping[str, Mapping[str, Resource]]
"""type URL -> name -> resource: what one agent should have."""


@dataclass(frozen=True, slots=True)
class Sent:
    """A resource went out (``version`` '' = in ``removed_resources``)."""

    type_url: str
    """Type URL."""
    name: str
    """Resource name."""
    version: str
    """Version sent, '' for a removal."""


@dataclass(frozen=True, slots=True)
class Acked:
    """The agent ACKed a resource (``version`` '' = a removal)."""

    type_url: str
    """Type URL."""
    name: str
    """Resource name."""
    version: str
    """Version ACKed, '' for a removal."""


@dataclass(frozen=True, slots=True)
class Nacked:
    """The agent rejected a version of a resource."""

    type_url: str
    """Type URL."""
    name: str
    """Resource name."""
    version: str
    """The rejected version."""
    message: str
    """The agent's reason (``error_detail.details[name]``, else ``error_detail.message``)."""


@dataclass(frozen=True, slots=True)
class StaleNonce:
    """A request answered a nonce that is not outstanding (ignored; subscriptions still honoured)."""

    type_url: str
    """Type URL of the request."""
    nonce: str
    """The nonce it carried."""


Event = Sent | Acked | Nacked | StaleNonce


def matches(selector: Mapping[str, str], metadata: Mapping[str, Any]) -> bool:
    """True if the node ``metadata`` carries every label of ``selector`` (top level or under ``labels``)."""
    labels = metadata.get("labels")
    nested: Mapping[str, Any] = labels if isinstance(labels, Mapping) else {}
    for k, v in selector.items():
        have = metadata.get(k, nested.get(k))
        if have is None or str(have) != v:
            return False
    return True


def stage_bucket(node_id: str, name: str) -> int:
    """A stable number in 0..9999 for (node id, resource name): the agent's place in a staged rollout."""
    digest = hashlib.sha256(f"{node_id}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000


def in_first_stage(node_id: str, name: str, percent: int, also: Collection[str] = ()) -> bool:
    """Whether the agent ``node_id`` is in the first stage of a ``percent`` rollout of ``name``."""
    return stage_bucket(node_id, name) < percent * 100 or node_id in also


def select(
    catalog: Snapshot, metadata: Mapping[str, Any], node_id: str = ""
) -> dict[str, dict[str, Resource]]:
    """What the agent ``node_id`` with node ``metadata`` should have: the resources whose selector it
    matches; under a staged rollout, the new version in the first stage and the previous one elsewhere."""
    out: dict[str, dict[str, Resource]] = {}
    for t, by_name in catalog.items():
        view: dict[str, Resource] = {}
        for n, r in by_name.items():
            if r.selector and not matches(r.selector, metadata):
                continue
            staged = r.rollout
            if staged is not None and not in_first_stage(node_id, n, staged.percent, staged.also):
                if staged.previous is None:
                    continue
                r = staged.previous
            view[n] = r
        out[t] = view
    return out


@dataclass(slots=True)
class _Pending:
    """An outstanding response: what the agent will hold once it ACKs it."""

    type_url: str
    versions: dict[str, str] = field(default_factory=dict)
    clusters: dict[str, frozenset[str]] = field(default_factory=dict)
    removed: tuple[str, ...] = ()
    heartbeats: frozenset[str] = frozenset()


@dataclass(slots=True)
class _TypeState:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    sent: dict[str, str] = field(default_factory=dict)
    acked: dict[str, str] = field(default_factory=dict)
    acked_clusters: dict[str, frozenset[str]] = field(default_factory=dict)
    nacked: dict[str, tuple[str, str]] = field(default_factory=dict)
    answer: set[str] = field(default_factory=set)
    removing: set[str] = field(default_factory=set)
    heartbeat_at: dict[str, float] = field(default_factory=dict)
    ttls: dict[str, float | None] = field(default_factory=dict)
    greet: bool = False
    """A first wildcard subscription not answered yet (an empty response if there is nothing)."""

    def interested(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def forget(self, name: str) -> None:
        for d in (self.sent, self.acked, self.acked_clusters, self.nacked, self.heartbeat_at, self.ttls):
            d.pop(name, None)
        self.answer.discard(name)
        self.removing.discard(name)


class DeltaStream:
    """The server side of one delta xDS stream (see the module docstring)."""

    def __init__(self, *, nonce_prefix: str = "", version_info: str = "") -> None:
        self.node: Node | None = None
        """The agent's node, from its first request."""
        self.version_info = version_info
        """``system_version_info`` put in every response (debug only)."""
        self._nonce_prefix = nonce_prefix
        self._counter = 0
        self._types: dict[str, _TypeState] = {}
        self._pending: dict[str, _Pending] = {}
        self._snapshot: Snapshot = {}
        self._has_snapshot = False
        """A snapshot was set: an empty type really has nothing (before, it is just not known yet)."""

    def __repr__(self) -> str:
        node = self.node.id if self.node else "?"
        return f"<DeltaStream node={node!r} types={len(self._types)} pending={len(self._pending)}>"

    # -- inputs ------------------------------------------------------------------------------------
    def set_snapshot(self, snapshot: Snapshot, version_info: str | None = None) -> None:
        """The resources this agent should have now (call ``poll`` afterwards)."""
        self._snapshot = snapshot
        self._has_snapshot = True
        if version_info is not None:
            self.version_info = version_info

    def seed_nacks(self, type_url: str, nacks: Mapping[str, tuple[str, str]]) -> None:
        """NACKs recorded on an earlier stream (name -> (version, message)): not resent unchanged."""
        self._types.setdefault(type_url, _TypeState()).nacked.update(nacks)

    def on_request(self, req: DeltaRequest, now: float) -> list[Event]:
        """Take one request: the node, an ACK/NACK, subscription changes, initial versions."""
        if req.node is not None and self.node is None:
            self.node = req.node
        t = req.type_url
        st = self._types.get(t)
        first = st is None or not (st.wildcard or st.names or st.sent)
        if st is None:
            st = self._types[t] = _TypeState()
        events: list[Event] = []
        if req.response_nonce:
            events.extend(self._answer(st, req))
        subscribe = req.resource_names_subscribe
        if first and not subscribe and t in DEFAULT_WILDCARD_TYPE_URLS:
            subscribe = (WILDCARD,)  # the legacy wildcard
        initial = req.initial_resource_versions
        for name in subscribe:
            if name == WILDCARD:
                if st.wildcard and not first:  # a repeated "*" asks for everything again
                    st.answer.update(self._snapshot.get(t, {}))
                if first:
                    st.greet = True  # answered even when there is nothing: the agent's initial fetch ends
                st.wildcard = True
            else:
                st.names.add(name)
                if name not in initial:
                    st.answer.add(name)
        for name in req.resource_names_unsubscribe:
            if name == WILDCARD:
                st.wildcard = False
                for n in [n for n in {*st.sent, *st.acked} if n not in st.names]:
                    st.forget(n)
            else:
                st.names.discard(name)
                if not st.wildcard:
                    st.forget(name)
        view = self._snapshot.get(t, {})
        for name, version in initial.items():
            st.sent[name] = st.acked[name] = version
            res = view.get(name)
            if res is not None and res.version == version:
                st.acked_clusters[name] = res.clusters
                st.ttls[name] = res.ttl
                if res.ttl is not None:
                    st.heartbeat_at[name] = now + res.ttl / 2
        return events

    def _answer(self, st: _TypeState, req: DeltaRequest) -> list[Event]:
        p = self._pending.get(req.response_nonce)
        if p is None or p.type_url != req.type_url:
            return [StaleNonce(req.type_url, req.response_nonce)]
        del self._pending[req.response_nonce]
        t = p.type_url
        rejected: dict[str, str] = {}
        if req.error_detail is not None:
            ed = req.error_detail
            named = {n: m for n, m in ed.details.items() if n in p.versions}
            rejected = named or {n: ed.message for n in p.versions}
        events: list[Event] = []
        for name, version in p.versions.items():
            if name in rejected:
                if name in p.heartbeats:  # the agent does not have it any more: send it in full
                    if st.sent.get(name) == version:
                        del st.sent[name]
                    st.acked.pop(name, None)
                    st.heartbeat_at.pop(name, None)
                    st.ttls.pop(name, None)
                    continue
                st.nacked[name] = (version, rejected[name])
                events.append(Nacked(t, name, version, rejected[name]))
            else:
                if name in p.heartbeats:
                    continue
                st.acked[name] = version
                if name in p.clusters:
                    st.acked_clusters[name] = p.clusters[name]
                if st.nacked.get(name, ("",))[0] != version:
                    st.nacked.pop(name, None)
                events.append(Acked(t, name, version))
        for name in p.removed:
            st.acked.pop(name, None)
            st.acked_clusters.pop(name, None)
            st.removing.discard(name)
            events.append(Acked(t, name, ""))
        return events

    # -- outputs -----------------------------------------------------------------------------------
    def _order(self) -> list[str]:
        known = [t for t in UPDATE_ORDER if t in self._types]
        return known + sorted(t for t in self._types if t not in UPDATE_ORDER)

    def _nonce(self) -> str:
        self._counter += 1
        return f"{self._nonce_prefix}{self._counter}"

    def _view(self, t: str, st: _TypeState) -> dict[str, Resource]:
        return {n: r for n, r in self._snapshot.get(t, {}).items() if st.interested(n)}

    def held(self) -> dict[tuple[str, str], frozenset[str]]:
        """Listeners/routes waiting for cluster ACKs -> the clusters they wait for."""
        out: dict[tuple[str, str], frozenset[str]] = {}
        for t in _GATED:
            st = self._types.get(t)
            if st is None:
                continue
            for name, res in self._view(t, st).items():
                missing = self._missing_clusters(res)
                if missing and st.sent.get(name) != res.version:
                    out[(t, name)] = missing
        return out

    def _missing_clusters(self, res: Resource) -> frozenset[str]:
        cst = self._types.get(CLUSTER)
        if cst is None or not res.clusters:
            return frozenset()
        view = self._view(CLUSTER, cst)
        return frozenset(c for c in res.clusters if c in view and c not in cst.acked)

    def _clusters_in_use(self) -> set[str]:
        used: set[str] = set()
        for t in _GATED:
            st = self._types.get(t)
            if st is not None:
                for refs in st.acked_clusters.values():
                    used.update(refs)
        for p in self._pending.values():
            if p.type_url in _GATED:
                for refs in p.clusters.values():
                    used.update(refs)
        return used

    def poll(self, now: float) -> tuple[list[DeltaResponse], list[Event]]:
        """The responses to send now (updates first, removals last) and the ``Sent`` events."""
        responses: list[DeltaResponse] = []
        events: list[Event] = []
        answered: set[tuple[str, str]] = set()
        order = self._order()
        for t in order:
            st = self._types[t]
            view = self._view(t, st)
            p = _Pending(t)
            entries: list[ResourceEntry] = []
            heartbeats: set[str] = set()
            for name, res in sorted(view.items()):
                must = name in st.answer
                current = st.sent.get(name) == res.version and st.ttls.get(name) == res.ttl
                if current and not must:
                    due = st.heartbeat_at.get(name)
                    if res.ttl is not None and due is not None and due <= now:
                        st.heartbeat_at[name] = now + res.ttl / 2
                        if st.acked.get(name) == res.version:  # else the full resource is in flight
                            entries.append(ResourceEntry(name=name, version=res.version, ttl=res.ttl))
                            p.versions[name] = res.version
                            heartbeats.add(name)
                    continue
                if st.nacked.get(name, ("",))[0] == res.version:
                    st.answer.discard(name)  # rule 6 wins: the agent already said no to this version
                    continue
                if t in _GATED and self._missing_clusters(res):
                    continue  # held until the agent ACKed the clusters it routes to (rule 5)
                entries.append(
                    ResourceEntry(
                        name=name,
                        version=res.version,
                        resource=dict(res.body),
                        ttl=res.ttl,
                        signature=res.signature,
                    )
                )
                p.versions[name] = res.version
                if t in _GATED:
                    p.clusters[name] = res.clusters
                st.sent[name] = res.version
                st.ttls[name] = res.ttl
                st.answer.discard(name)
                st.removing.discard(name)
                if res.ttl is not None:
                    st.heartbeat_at[name] = now + res.ttl / 2
                else:
                    st.heartbeat_at.pop(name, None)
                events.append(Sent(t, name, res.version))
            missing = sorted(n for n in st.answer if n not in view)
            for name in missing:  # subscribed names that do not exist: removed at once (rule 3/4)
                st.answer.discard(name)
                st.sent.pop(name, None)
                st.removing.add(name)
                answered.add((t, name))
                events.append(Sent(t, name, ""))
            p.removed = tuple(missing)
            p.heartbeats = frozenset(heartbeats)
            if entries or missing or (st.greet and self._has_snapshot and not self._snapshot.get(t)):
                st.greet = False  # a type with nothing for this agent is answered (empty) once
                responses.append(self._respond(p, tuple(entries)))
        in_use = self._clusters_in_use()
        for t in reversed(order):
            st = self._types[t]
            view = self._view(t, st)
            gone = sorted(
                n
                for n in {*st.sent, *st.acked}
                if n not in view and n not in st.removing and (t, n) not in answered
            )
            if t == CLUSTER:
                gone = [n for n in gone if n not in in_use]  # make before break (rule 5)
            if not gone:
                continue
            for name in gone:
                st.sent.pop(name, None)
                st.nacked.pop(name, None)
                st.heartbeat_at.pop(name, None)
                st.ttls.pop(name, None)
                st.removing.add(name)
                events.append(Sent(t, name, ""))
            responses.append(self._respond(_Pending(t, removed=tuple(gone)), ()))
        return responses, events

    def _respond(self, p: _Pending, entries: tuple[ResourceEntry, ...]) -> DeltaResponse:
        nonce = self._nonce()
        self._pending[nonce] = p
        return DeltaResponse(
            type_url=p.type_url,
            nonce=nonce,
            system_version_info=self.version_info,
            resources=entries,
            removed_resources=p.removed,
        )

    def next_deadline(self) -> float | None:
        """When ``poll`` has heartbeats to send (None: nothing timed)."""
        times = [t for st in self._types.values() for t in st.heartbeat_at.values()]
        return min(times) if times else None

    @property
    def pending(self) -> int:
        """Responses not yet ACKed or NACKed."""
        return len(self._pending)
