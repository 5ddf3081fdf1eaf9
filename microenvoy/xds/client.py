"""The agent's delta xDS client as a sans-IO state machine (DELTA.md rules 1-8, agent side).

Theory of operation
-------------------
``DeltaClient`` owns what the agent has told and heard from the control plane over one ADS delta stream at a
time; the I/O shell (microenvoy/io) moves bytes and calls it, the Server validates and applies resources.
Nothing here reads the clock or draws randomness by itself: every entry point takes ``now`` and the jitter
comes from an injected ``random.Random``.

Per resource type (in make-before-break order: Cluster, ClusterLoadAssignment, Listener,
RouteConfiguration, Secret) it keeps:

* the **interest**: ``*`` for the wildcard types (Listener, Cluster; rule 3) and explicit names for the others
  (EDS cluster names, RDS route configuration names, SDS secret names), changed with ``subscribe`` /
  ``unsubscribe``;
* the **accepted versions**: name -> version of every resource the agent applied and ACKed; a rejected
  resource keeps its previous accepted version, because the last good one stays in effect (rule 1);
* **TTL deadlines** of resources that came with a ``ttl`` (rule 7);
* stats hooks: ``TypeCounters`` (update_attempt / update_success / update_rejected / ttl_expired) and the
  ``version_text`` (``system_version_info`` of the last fully accepted response).

The life of a stream::

    server = client.next_server(addresses)                # rule 8: round-robin after a failed attempt
    ... open the gRPC stream ...
    for req in client.on_connected(now): send(req)        # interest + initial_resource_versions (rule 4)
    for each response message:
        resp = decode_response(msg)                       # XdsProtocolError -> client.reject(exc) or reset
        update = client.on_response(resp, now)
        rejected = server.validate_and_apply(update)      # {name: message} of the invalid ones
        req = client.ack(update, rejected)                # ACK, or NACK naming only those (rule 1)
        if req is not None: send(req)
    ... stream ends or the attempt fails ...
    delay = client.on_disconnected(now)                   # rule 8: jittered exponential backoff

    between messages: for (type_url, name) in client.expired(now): remove it   # rule 7
                      wake up at client.next_deadline()

Backoff (rule 8) is exponential with **equal jitter**: the n-th consecutive failed attempt (n = 0, 1, ...)
waits ``c/2 + uniform(0, c/2)`` with ``c = min(backoff_cap, backoff_base * 2**n)``, so with the defaults the
first retry comes after 0.25-0.5 s and no retry waits more than 30 s; never less than half the ceiling, so a
fleet cannot hammer a control plane that fails at once, and the random half spreads the fleet. The count
restarts after a stream that got at least one well-formed response.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from microenvoy.xds.messages import (
    DEFAULT_TYPE_URLS,
    DEFAULT_WILDCARD_TYPE_URLS,
    INVALID_ARGUMENT,
    WILDCARD,
    DeltaRequest,
    DeltaResponse,
    ErrorDetail,
    Node,
    ResourceEntry,
    XdsProtocolError,
)

__all__ = ["MAX_NACK_MESSAGE", "DeltaClient", "TypeCounters", "Update"]

_T = TypeVar("_T")

MAX_NACK_MESSAGE = 1024
"""Longest ``error_detail.message`` summary sent (the per-resource ``details`` carry the full reasons)."""


@dataclass(frozen=True, slots=True)
class Update:
    """What one response asks the agent to do; hand it back to ``DeltaClient.ack`` once applied."""

    type_url: str
    """Resource type of the response."""
    nonce: str
    """The response's nonce, echoed by the ACK/NACK."""
    system_version_info: str
    """Debug version of the response (becomes ``version_text`` when fully accepted)."""
    resources: dict[str, ResourceEntry]
    """Name -> entry to validate and apply (only entries with a body, of the right ``@type``, subscribed)."""
    removed: tuple[str, ...]
    """Names to remove (no longer exist, or never did: rule 4)."""
    heartbeats: tuple[str, ...] = ()
    """Names whose TTL this response refreshed; nothing to apply (rule 7)."""
    ignored: tuple[str, ...] = ()
    """Names the agent is not subscribed to: neither applied nor NACKed."""
    invalid: dict[str, str] = field(default_factory=dict)
    """Name -> reason, rejected by the client itself (wrong ``@type``, heartbeat for an unknown version);
    ``ack`` NACKs them with the caller's rejections."""
    error: str | None = None
    """Set when the whole response is rejected (a type the agent did not subscribe to): apply nothing."""
    received_at: float = 0.0
    """``now`` of ``on_response``; TTL deadlines of the applied resources count from it."""
    stream: int = 0
    """Stream generation the response arrived on; ``ack`` answers only on that stream."""


@dataclass(slots=True)
class TypeCounters:
    """Per-type stats hooks (Envoy's ``<type>.update_*``); ``update_time`` is the caller's to measure."""

    update_attempt: int = 0
    """Responses received (well-formed or not)."""
    update_success: int = 0
    """Responses fully accepted (ACK)."""
    update_rejected: int = 0
    """Responses NACKed, wholly or in part."""
    ttl_expired: int = 0
    """Resources removed because their TTL passed without a refresh."""


class _TypeState:
    """Mutable per-type bookkeeping (private)."""

    __slots__ = ("accepted", "counters", "deadlines", "names", "sent_on_stream", "version_text")

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.accepted: dict[str, str] = {}
        self.deadlines: dict[str, float] = {}
        self.version_text = ""
        self.sent_on_stream = False
        self.counters = TypeCounters()

    def subscribed(self, name: str) -> bool:
        return WILDCARD in self.names or name in self.names

    def forget(self, name: str) -> None:
        self.accepted.pop(name, None)
        self.deadlines.pop(name, None)


def _ordered(names: Iterable[str]) -> tuple[str, ...]:
    """Wildcard first, then the names sorted (deterministic requests)."""
    s = set(names)
    head = (WILDCARD,) if WILDCARD in s else ()
    return head + tuple(sorted(s - {WILDCARD}))


def _dedupe(names: Iterable[str]) -> list[str]:
    if isinstance(names, str):
        raise TypeError("names must be an iterable of strings, not a string")
    return list(dict.fromkeys(names))


class DeltaClient:
    """Delta ADS client state for one agent across streams (see the module docstring)."""

    __slots__ = (
        "_attempt",
        "_connected",
        "_connected_since",
        "_failover_pending",
        "_got_response",
        "_node",
        "_node_sent",
        "_rng",
        "_server_index",
        "_stream",
        "_types",
        "backoff_base",
        "backoff_cap",
    )

    def __init__(
        self,
        node: Node,
        *,
        rng: random.Random,
        types: Sequence[str] = DEFAULT_TYPE_URLS,
        wildcard_types: Iterable[str] = DEFAULT_WILDCARD_TYPE_URLS,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        if len(set(types)) != len(types):
            raise ValueError("types must not repeat")
        wild = set(wildcard_types)
        if not wild <= set(types):
            raise ValueError(f"wildcard types {sorted(wild - set(types))} are not in types")
        if not 0 < backoff_base <= backoff_cap:
            raise ValueError("need 0 < backoff_base <= backoff_cap")
        self._node = node
        self._rng = rng
        self._types: dict[str, _TypeState] = {t: _TypeState() for t in types}
        for t in wild:
            self._types[t].names.add(WILDCARD)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._connected = False
        self._connected_since: float | None = None
        self._node_sent = False
        self._got_response = False
        self._stream = 0
        self._attempt = 0
        self._server_index = 0
        self._failover_pending = False

    # ------------------------------------------------------------------------------------ inspection
    @property
    def node(self) -> Node:
        """The identity sent in the first request of every stream."""
        return self._node

    @property
    def types(self) -> tuple[str, ...]:
        """Resource types in make-before-break order (rule 5)."""
        return tuple(self._types)

    @property
    def connected(self) -> bool:
        """A stream is open (``xds.connected_state``)."""
        return self._connected

    @property
    def connected_since(self) -> float | None:
        """``now`` of the last ``on_connected`` while connected, else None."""
        return self._connected_since if self._connected else None

    @property
    def stream(self) -> int:
        """Generation of the current (or last) stream, starting at 1."""
        return self._stream

    def _state(self, type_url: str) -> _TypeState:
        try:
            return self._types[type_url]
        except KeyError:
            raise ValueError(f"unknown resource type {type_url!r}") from None

    def subscriptions(self, type_url: str) -> frozenset[str]:
        """The current interest of a type (``*`` for wildcard)."""
        return frozenset(self._state(type_url).names)

    def accepted_versions(self, type_url: str) -> dict[str, str]:
        """Name -> version the agent applied and ACKed (a copy)."""
        return dict(self._state(type_url).accepted)

    def version_text(self, type_url: str) -> str:
        """``system_version_info`` of the last fully accepted response of the type (Envoy's version_text)."""
        return self._state(type_url).version_text

    def counters(self, type_url: str) -> TypeCounters:
        """Live stats counters of the type."""
        return self._state(type_url).counters

    # ------------------------------------------------------------------------------------ interest
    def restore(self, type_url: str, name: str, version: str) -> None:
        """Seed an accepted version from the offline cache, so the first request per type on the next stream
        carries it in ``initial_resource_versions`` and the server sends only what differs (rule 4).

        Only names of current interest are reported; subscribe explicit names before connecting.
        """
        self._state(type_url).accepted[name] = version

    def subscribe(self, type_url: str, names: Iterable[str]) -> list[DeltaRequest]:
        """Add ``names`` (``*`` = wildcard) to the interest of ``type_url``; the request(s) to send now.

        Nothing is sent while disconnected (``on_connected`` sends the whole interest) or when every name is
        already subscribed. If this is the type's first request on the stream, it carries the whole interest,
        and ``initial_resource_versions`` (rule 4); never an empty first subscribe, which would be the legacy
        wildcard (rule 3).
        """
        st = self._state(type_url)
        new = [n for n in _dedupe(names) if n not in st.names]
        st.names.update(new)
        if not (self._connected and new):
            return []
        if not st.sent_on_stream:
            return [self._first_request(type_url, st)]
        return [DeltaRequest(type_url=type_url, resource_names_subscribe=_ordered(new))]

    def unsubscribe(self, type_url: str, names: Iterable[str]) -> list[DeltaRequest]:
        """Remove ``names`` from the interest; accepted versions of names no longer covered are forgotten
        (the caller removes those resources). The request to send now, if the type is live on the stream.
        """
        st = self._state(type_url)
        gone = [n for n in _dedupe(names) if n in st.names]
        st.names.difference_update(gone)
        for name in [n for n in st.accepted if not st.subscribed(n)]:
            st.forget(name)
        if not (self._connected and st.sent_on_stream and gone):
            return []
        return [DeltaRequest(type_url=type_url, resource_names_unsubscribe=_ordered(gone))]

    def _first_request(self, type_url: str, st: _TypeState) -> DeltaRequest:
        """The first request of a type on a stream: whole interest + what the agent already has (rule 4);
        the node only in the very first request of the stream."""
        st.sent_on_stream = True
        node = None
        if not self._node_sent:
            node = self._node
            self._node_sent = True
        return DeltaRequest(
            type_url=type_url,
            node=node,
            resource_names_subscribe=_ordered(st.names),
            initial_resource_versions={n: v for n, v in sorted(st.accepted.items()) if st.subscribed(n)},
        )

    # ------------------------------------------------------------------------------------ stream
    def on_connected(self, now: float) -> list[DeltaRequest]:
        """A new stream is open: the first request of every type that has an interest, in make-before-break
        order (rule 5), each with ``initial_resource_versions`` = the accepted versions (rule 4), wildcard
        ``*`` for Listener and Cluster (rule 3); the node rides in the very first one only.
        """
        self._connected = True
        self._connected_since = now
        self._stream += 1
        self._node_sent = False
        self._got_response = False
        out: list[DeltaRequest] = []
        for type_url, st in self._types.items():
            st.sent_on_stream = False
            if st.names:
                out.append(self._first_request(type_url, st))
        return out

    def on_response(self, resp: DeltaResponse, now: float) -> Update:
        """Classify a decoded response; the caller applies ``update.resources`` / ``update.removed`` and
        answers with ``ack`` (rule 1: every response is answered).

        * Entries with a body, subscribed, whose ``@type`` is the response's type: to validate and apply.
        * Heartbeats (no body) of the accepted version refresh the TTL here: deadline = now + ttl, or no
          deadline without ``ttl`` (rule 7). A heartbeat for another version (or a resource the agent does
          not have, e.g. expired) cannot be applied and is NACKed, so the server sends it in full.
        * Names outside the interest are ignored (a late answer to an unsubscribe).
        * A response for a type the agent does not subscribe to is NACKed as a whole (``update.error``).
        """
        self._got_response = True
        st = self._types.get(resp.type_url)
        if st is None:
            return Update(
                type_url=resp.type_url,
                nonce=resp.nonce,
                system_version_info=resp.system_version_info,
                resources={},
                removed=(),
                error=f"resource type {resp.type_url!r} is not subscribed",
                received_at=now,
                stream=self._stream,
            )
        st.counters.update_attempt += 1
        apply: dict[str, ResourceEntry] = {}
        heartbeats: list[str] = []
        ignored: list[str] = []
        invalid: dict[str, str] = {}
        for entry in resp.resources:
            name = entry.name
            if not st.subscribed(name):
                ignored.append(name)
            elif entry.resource is None:
                have = st.accepted.get(name)
                if have == entry.version:
                    heartbeats.append(name)
                    if entry.ttl is not None:
                        st.deadlines[name] = now + entry.ttl
                    else:
                        st.deadlines.pop(name, None)
                else:
                    held = f"version {have!r} is in effect" if have is not None else "the agent has none"
                    invalid[name] = f"heartbeat for version {entry.version!r} but {held}; send it in full"
            else:
                rtype = entry.resource.get("@type")
                if rtype != resp.type_url:
                    invalid[name] = f"@type is {rtype!r}, expected {resp.type_url!r}"
                else:
                    apply[name] = entry
        return Update(
            type_url=resp.type_url,
            nonce=resp.nonce,
            system_version_info=resp.system_version_info,
            resources=apply,
            removed=tuple(resp.removed_resources),
            heartbeats=tuple(heartbeats),
            ignored=tuple(ignored),
            invalid=invalid,
            received_at=now,
            stream=self._stream,
        )

    def ack(self, update: Update, rejected: Mapping[str, str] | None = None) -> DeltaRequest | None:
        """Record what the caller applied and answer the response (rule 1).

        ``rejected`` maps the names of ``update.resources`` the caller refused to why. Every other resource
        of the update is recorded as accepted (its version, its TTL deadline from ``update.received_at``);
        a rejected one keeps its previous accepted version (the last good one stays in effect); removed names
        are forgotten. The answer is an ACK (``response_nonce`` only) when nothing was rejected, else a NACK
        whose ``error_detail`` (code 3) summarizes and whose ``details`` name only the rejected resources
        (per-resource NACK, gRFC A46). Returns None when the update came on an earlier stream (state is
        still recorded; there is nobody to answer). Raises ``ValueError`` for a rejected name that is not
        among ``update.resources``.
        """
        rejected = dict(rejected or {})
        unknown = sorted(set(rejected) - set(update.resources))
        if unknown:
            raise ValueError(f"rejected names not in the update: {unknown}")
        refused = {**update.invalid, **rejected}
        st = self._types.get(update.type_url)
        if st is not None and update.error is None:
            for name, entry in update.resources.items():
                if name in refused:
                    continue
                st.accepted[name] = entry.version
                if entry.ttl is not None:
                    st.deadlines[name] = update.received_at + entry.ttl
                else:
                    st.deadlines.pop(name, None)
            for name in update.removed:
                st.forget(name)
        if update.error is not None:
            detail = ErrorDetail(code=INVALID_ARGUMENT, message=update.error)
        elif refused:
            total = len(update.resources) + len(update.invalid)
            summary = "; ".join(f"{n}: {m}" for n, m in sorted(refused.items()))
            message = f"{len(refused)} of {total} resources rejected: {summary}"
            if len(message) > MAX_NACK_MESSAGE:
                message = message[: MAX_NACK_MESSAGE - 3] + "..."
            detail = ErrorDetail(
                code=INVALID_ARGUMENT, message=message, details=dict(sorted(refused.items()))
            )
        else:
            detail = None
        if st is not None:
            if detail is None:
                st.counters.update_success += 1
                st.version_text = update.system_version_info
            else:
                st.counters.update_rejected += 1
        if update.stream != self._stream or not self._connected:
            return None
        return DeltaRequest(type_url=update.type_url, response_nonce=update.nonce, error_detail=detail)

    def reject(self, error: XdsProtocolError) -> DeltaRequest | None:
        """NACK a response that failed to decode as a whole (rule 1), if its nonce and type could be read;
        None means the stream must be reset instead. A malformed response does not count as a response
        for the backoff reset."""
        if not self._connected or error.nonce is None or error.type_url is None:
            return None
        st = self._types.get(error.type_url)
        if st is not None:
            st.counters.update_attempt += 1
            st.counters.update_rejected += 1
        detail = ErrorDetail(code=INVALID_ARGUMENT, message=f"malformed response: {error.reason}")
        return DeltaRequest(type_url=error.type_url, response_nonce=error.nonce, error_detail=detail)

    # ------------------------------------------------------------------------------------ reconnect
    def on_disconnected(self, now: float) -> float:
        """The stream ended, or an attempt to open one failed: seconds to wait before the next attempt
        (rule 8, equal jitter, see the module docstring). A stream that got at least one response resets
        the backoff; one that got none counts as a failed attempt and moves ``next_server`` on.
        """
        if self._got_response:
            self._attempt = 0
        else:
            self._failover_pending = True
        self._connected = False
        self._got_response = False
        self._node_sent = False
        for st in self._types.values():
            st.sent_on_stream = False
        ceiling = self.backoff_cap
        if self._attempt < 64:
            ceiling = min(self.backoff_cap, self.backoff_base * (1 << self._attempt))
        if ceiling < self.backoff_cap:
            self._attempt += 1
        half = ceiling / 2.0
        return half + self._rng.uniform(0.0, half)

    def next_server(self, servers: Sequence[_T]) -> _T:
        """The control-plane address for the next attempt (rule 8): the same one after a stream that got
        responses, the next one round-robin after each failed attempt."""
        if not servers:
            raise ValueError("no control-plane addresses")
        if self._failover_pending:
            self._server_index += 1
            self._failover_pending = False
        return servers[self._server_index % len(servers)]

    # ------------------------------------------------------------------------------------ TTL
    def expired(self, now: float) -> list[tuple[str, str]]:
        """``(type_url, name)`` of every resource whose TTL passed without a refresh (rule 7), forgotten
        here; the caller removes them. Listed in break order (the reverse of make-before-break: Secret,
        RouteConfiguration, Listener, ClusterLoadAssignment, Cluster), so referrers go before referents.
        TTLs run while disconnected too: a TTL'd resource is meant to vanish without its control plane.
        """
        out: list[tuple[str, str]] = []
        for type_url, st in reversed(self._types.items()):
            due = sorted(n for n, d in st.deadlines.items() if d <= now)
            for name in due:
                st.forget(name)
                st.counters.ttl_expired += 1
                out.append((type_url, name))
        return out

    def next_deadline(self) -> float | None:
        """Earliest TTL deadline, or None: when to call ``expired`` next."""
        deadlines = [d for st in self._types.values() for d in st.deadlines.values()]
        return min(deadlines) if deadlines else None

    def __repr__(self) -> str:
        accepted = sum(len(st.accepted) for st in self._types.values())
        return (
            f"<DeltaClient node={self._node.id!r} connected={self._connected} stream={self._stream} "
            f"accepted={accepted} attempt={self._attempt}>"
        )
