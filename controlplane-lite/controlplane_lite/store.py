"""The SQLite store: resources with their versions and history, agent status, rollouts.

One database file (WAL mode, so ``controlplane-lite status`` and ``push`` in another process read and write
while ``serve`` runs). Resources are kept as their canonical CBOR; every version ever stored is kept in
``history``; ``meta.generation`` is bumped on every resource change, so a server notices writes made by
another process (``push``) by polling one integer.

Agents: one row per node id (cluster, metadata, connected since, last seen) and one row per agent and
resource with the last sent version, the last ACKed version and the last NACK (version, message, time) --
what ``status`` shows (DELTA.md rule 6).

Rollouts (staged changes, see ``rollout.py``): storing a new version of a resource that has
``rollout_percent`` (1..99) starts a rollout in the same transaction (so no server ever sees the new version
without it); the rollout remembers the previous version, which everyone outside the first stage keeps. A
later version supersedes a running or halted rollout (the new one starts from the same previous version); a
deletion cancels it. Recording agent answers moves rollouts on, in the same transaction: a NACK of the
version halts its rollout (``halted``, the NACK as the reason), and once every connected agent of the first
stage has ACKed it the rollout is ``complete`` (everyone gets it); ``promote_rollout`` does that by hand.
Every rollout state change bumps the generation, so a running server rebuilds what its agents get.

The API is synchronous and small; each call is one short transaction. ``clock`` is injected for tests.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import cbor2

from controlplane_lite.delta import in_first_stage, matches, stage_bucket
from controlplane_lite.versions import canonical, resource_version

__all__ = [
    "ACTIVE_STATES",
    "AgentResourceStatus",
    "AgentStatus",
    "HistoryEntry",
    "Rollout",
    "Store",
    "StoredResource",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS resources (
    type_url TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, resource BLOB NOT NULL,
    selector TEXT NOT NULL DEFAULT '{}', rollout_percent INTEGER, ttl REAL, source TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (type_url, name)
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, type_url TEXT NOT NULL, name TEXT NOT NULL, version TEXT,
    resource BLOB, source TEXT NOT NULL DEFAULT '', stored_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_resource ON history (type_url, name, id);
CREATE TABLE IF NOT EXISTS agents (
    node_id TEXT PRIMARY KEY, cluster TEXT NOT NULL DEFAULT '', metadata TEXT NOT NULL DEFAULT '{}',
    streams INTEGER NOT NULL DEFAULT 0, connected_since REAL, last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_resources (
    node_id TEXT NOT NULL, type_url TEXT NOT NULL, name TEXT NOT NULL,
    sent_version TEXT, sent_at REAL, acked_version TEXT, acked_at REAL,
    nack_version TEXT, nack_message TEXT, nack_at REAL,
    PRIMARY KEY (node_id, type_url, name)
);
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, type_url TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL,
    percent INTEGER NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, updated REAL NOT NULL, previous_version TEXT, stage TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS rollouts_by_resource ON rollouts (type_url, name, id);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0);
"""

_ROLLOUT_COLUMNS = {"previous_version": "TEXT", "stage": "TEXT NOT NULL DEFAULT '[]'"}
"""Columns added to ``rollouts`` after the first schema (added to older databases at open)."""

ACTIVE_STATES = ("running", "halted")
"""Rollout states in which the first stage and the rest of the fleet run different versions."""


@dataclass(frozen=True, slots=True)
class StoredResource:
    """One current resource."""

    type_url: str
    """Its type URL (``versions.CLUSTER`` ...)."""
    name: str
    """Its name, unique per type."""
    version: str
    """Content-hash version of ``resource``."""
    resource: Mapping[str, Any]
    """The resource map as sent on the wire (Envoy JSON naming, ``@type`` included)."""
    selector: Mapping[str, str] = field(default_factory=dict)
    """Node metadata labels an agent must carry to receive it (empty = every agent)."""
    rollout_percent: int | None = None
    """Staged rollout: the share of matching agents that get a change first (None = all at once)."""
    ttl: float | None = None
    """Seconds the agent keeps it without a refresh (heartbeats are sent), or None."""
    source: str = ""
    """Where it came from: ``dir:<relative path>``, ``push:<path>`` or ``api``."""
    created: float = 0.0
    """When it was first stored (epoch seconds)."""
    updated: float = 0.0
    """When its current version was stored."""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One stored version of a resource (``version`` None = deleted)."""

    version: str | None
    """The version stored, or None for a deletion."""
    resource: Mapping[str, Any] | None
    """The resource at that version, or None for a deletion."""
    source: str
    """Who stored it."""
    stored_at: float
    """When."""


@dataclass(frozen=True, slots=True)
class AgentResourceStatus:
    """What one agent was sent and answered for one resource."""

    type_url: str
    """The resource's type URL."""
    name: str
    """The resource's name."""
    sent_version: str | None
    """Last version sent ('' = sent as removed), None if never sent."""
    sent_at: float | None
    """When it was sent."""
    acked_version: str | None
    """Last version the agent ACKed ('' = removal ACKed)."""
    acked_at: float | None
    """When it was ACKed."""
    nack_version: str | None
    """The last version the agent NACKed (None if none)."""
    nack_message: str | None
    """The agent's message for that NACK."""
    nack_at: float | None
    """When."""


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """One agent as the store knows it."""

    node_id: str
    """The agent's node id."""
    cluster: str
    """The agent's node cluster."""
    metadata: Mapping[str, Any]
    """The node metadata sent on its first request (labels, firmware profile, agent version)."""
    connected: bool
    """Whether a stream is open now."""
    connected_since: float | None
    """When the current stream opened (None when disconnected)."""
    last_seen: float
    """The last time a request arrived."""


@dataclass(frozen=True, slots=True)
class Rollout:
    """A staged rollout of one resource version."""

    id: int
    """Its id."""
    type_url: str
    """The resource's type URL."""
    name: str
    """The resource's name."""
    version: str
    """The version being rolled out."""
    percent: int
    """The share of matching agents that get it first."""
    state: str
    """``running``, ``halted`` (an agent NACKed), ``complete`` (everyone gets it), ``superseded`` (a newer
    version replaced it) or ``cancelled`` (the resource was deleted)."""
    reason: str
    """Why it halted (the NACK: ``<node> NACKed: <message>``), was promoted, superseded or cancelled."""
    created: float
    """When it started."""
    updated: float
    """When its state last changed."""
    previous_version: str | None = None
    """The version the agents outside the first stage keep (None: the resource is new to them)."""
    stage: tuple[str, ...] = ()
    """Node ids added to the first stage besides the hash choice (see ``delta.Staged.also``)."""

    @property
    def active(self) -> bool:
        """Running or halted: the fleet is split between the new and the previous version."""
        return self.state in ACTIVE_STATES


class Store:
    """The control plane's SQLite database (one file; ``":memory:"`` for tests)."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout = 5000")
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self._db.execute(statement)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(rollouts)").fetchall()}
        for column, decl in _ROLLOUT_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE rollouts ADD COLUMN {column} {decl}")

    def close(self) -> None:
        self._db.close()

    def __repr__(self) -> str:
        return f"<Store {self.path!r} generation={self.generation()}>"

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- resources ---------------------------------------------------------------------------------
    def generation(self) -> int:
        """A counter bumped by every resource change (by any process)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0])

    def put(
        self,
        type_url: str,
        name: str,
        resource: Mapping[str, Any],
        *,
        selector: Mapping[str, str] | None = None,
        rollout_percent: int | None = None,
        ttl: float | None = None,
        source: str = "",
    ) -> bool:
        """Store ``resource`` as the current version of ``(type_url, name)``; True if anything changed.

        The version is the content hash of ``resource``; storing the same content (and the same targeting)
        again changes nothing and does not bump the generation. A new version with ``rollout_percent``
        1..99 starts a staged rollout (see the module docstring).
        """
        version = resource_version(resource)
        blob = canonical(dict(resource))
        sel = json.dumps(dict(selector or {}), sort_keys=True)
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                "SELECT version, selector, rollout_percent, ttl, source FROM resources "
                "WHERE type_url = ? AND name = ?",
                (type_url, name),
            ).fetchone()
            if row is not None and tuple(row) == (version, sel, rollout_percent, ttl, source):
                return False
            if row is None:
                db.execute(
                    "INSERT INTO resources (type_url, name, version, resource, selector, rollout_percent, "
                    "ttl, source, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (type_url, name, version, blob, sel, rollout_percent, ttl, source, now, now),
                )
            else:
                db.execute(
                    "UPDATE resources SET version = ?, resource = ?, selector = ?, rollout_percent = ?, "
                    "ttl = ?, source = ?, updated = ? WHERE type_url = ? AND name = ?",
                    (version, blob, sel, rollout_percent, ttl, source, now, type_url, name),
                )
            if row is None or row[0] != version:
                db.execute(
                    "INSERT INTO history (type_url, name, version, resource, source, stored_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (type_url, name, version, blob, source, now),
                )
            self._stage_change(
                db, type_url, name, None if row is None else row[0], version, rollout_percent, selector or {}
            )
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        return True

    def _stage_change(
        self,
        db: sqlite3.Connection,
        type_url: str,
        name: str,
        old: str | None,
        version: str,
        percent: int | None,
        selector: Mapping[str, str],
    ) -> None:
        """Start, supersede or adjust the rollout of ``(type_url, name)`` for a stored change."""
        now = self._clock()
        staged = percent is not None and 0 < percent < 100
        active = _active(db, type_url, name)
        if old == version:  # a targeting change: a running rollout follows a new percentage
            if active is not None and active.state == "running" and percent != active.percent:
                if staged:
                    db.execute(
                        "UPDATE rollouts SET percent = ?, updated = ? WHERE id = ?", (percent, now, active.id)
                    )
                else:
                    _set_state(db, active.id, "complete", "rollout percentage removed", now)
            return
        base = old
        if active is not None:
            base = active.previous_version
            _set_state(db, active.id, "superseded", f"superseded by version {version}", now)
        if not staged or base == version:
            return
        known = [(a.node_id, a.metadata) for a in _agents(db)]
        also = _fallback_stage(known, name, percent or 0, selector, ())
        db.execute(
            "INSERT INTO rollouts (type_url, name, version, percent, state, created, updated, "
            "previous_version, stage) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?)",
            (type_url, name, version, percent, now, now, base, json.dumps(sorted(also))),
        )

    def delete(self, type_url: str, name: str, *, source: str = "") -> bool:
        """Remove the resource (its history keeps a deletion entry); True if it existed."""
        now = self._clock()
        with self._tx() as db:
            cur = db.execute("DELETE FROM resources WHERE type_url = ? AND name = ?", (type_url, name))
            if cur.rowcount == 0:
                return False
            db.execute(
                "INSERT INTO history (type_url, name, version, resource, source, stored_at) "
                "VALUES (?, ?, NULL, NULL, ?, ?)",
                (type_url, name, source, now),
            )
            active = _active(db, type_url, name)
            if active is not None:
                _set_state(db, active.id, "cancelled", "resource deleted", now)
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        return True

    def get(self, type_url: str, name: str) -> StoredResource | None:
        row = self._db.execute(
            f"SELECT {_RES_COLS} FROM resources WHERE type_url = ? AND name = ?", (type_url, name)
        ).fetchone()
        return None if row is None else _resource(row)

    def resources(self, type_url: str | None = None) -> list[StoredResource]:
        """Every current resource (of one type), ordered by type and name."""
        if type_url is None:
            rows = self._db.execute(f"SELECT {_RES_COLS} FROM resources ORDER BY type_url, name")
        else:
            rows = self._db.execute(
                f"SELECT {_RES_COLS} FROM resources WHERE type_url = ? ORDER BY name", (type_url,)
            )
        return [_resource(r) for r in rows.fetchall()]

    def history(self, type_url: str, name: str) -> list[HistoryEntry]:
        """Every version ever stored for the resource, oldest first (deletions included)."""
        rows = self._db.execute(
            "SELECT version, resource, source, stored_at FROM history WHERE type_url = ? AND name = ? "
            "ORDER BY id",
            (type_url, name),
        ).fetchall()
        return [
            HistoryEntry(v, None if blob is None else cbor2.loads(blob), src, at) for v, blob, src, at in rows
        ]

    def version_body(self, type_url: str, name: str, version: str) -> Mapping[str, Any] | None:
        """The resource as it was at ``version`` (from the history), or None if never stored."""
        row = self._db.execute(
            "SELECT resource FROM history WHERE type_url = ? AND name = ? AND version = ? "
            "ORDER BY id DESC LIMIT 1",
            (type_url, name, version),
        ).fetchone()
        return None if row is None else dict(cbor2.loads(row[0]))

    # -- agents ------------------------------------------------------------------------------------
    def reset_connections(self) -> None:
        """At server start: no stream survives a restart."""
        with self._tx() as db:
            db.execute("UPDATE agents SET streams = 0, connected_since = NULL")

    def agent_connected(self, node_id: str, cluster: str, metadata: Mapping[str, Any]) -> None:
        now = self._clock()
        meta = json.dumps(dict(metadata), sort_keys=True, default=str)
        with self._tx() as db:
            db.execute(
                "INSERT INTO agents (node_id, cluster, metadata, streams, connected_since, last_seen) "
                "VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (node_id) DO UPDATE SET cluster = excluded.cluster, "
                "metadata = excluded.metadata, streams = streams + 1, "
                "connected_since = COALESCE(connected_since, excluded.connected_since), "
                "last_seen = excluded.last_seen",
                (node_id, cluster, meta, now, now),
            )
            self._advance_rollouts(db, None)

    def agent_disconnected(self, node_id: str) -> None:
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "UPDATE agents SET streams = MAX(streams - 1, 0), last_seen = ?, "
                "connected_since = CASE WHEN streams <= 1 THEN NULL ELSE connected_since END "
                "WHERE node_id = ?",
                (now, node_id),
            )
            self._advance_rollouts(db, None)

    def agent_seen(self, node_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE agents SET last_seen = ? WHERE node_id = ?", (self._clock(), node_id))

    def record_sent(self, node_id: str, type_url: str, name: str, version: str) -> None:
        """``version`` '' = sent in ``removed_resources``."""
        self._upsert_agent_resource(node_id, type_url, name, "sent_version = ?, sent_at = ?", (version,))

    def record_ack(self, node_id: str, type_url: str, name: str, version: str) -> None:
        self._upsert_agent_resource(node_id, type_url, name, "acked_version = ?, acked_at = ?", (version,))

    def record_nack(self, node_id: str, type_url: str, name: str, version: str, message: str) -> None:
        self._upsert_agent_resource(
            node_id, type_url, name, "nack_version = ?, nack_message = ?, nack_at = ?", (version, message)
        )

    def record_events(self, node_id: str, rows: list[tuple[str, str, str, str, str]]) -> None:
        """Many ``(kind, type_url, name, version, message)`` in one transaction; kind is ``sent``,
        ``acked`` or ``nacked`` (the server's per-poll batch)."""
        if not rows:
            return
        now = self._clock()
        with self._tx() as db:
            for kind, type_url, name, version, message in rows:
                db.execute(
                    "INSERT OR IGNORE INTO agent_resources (node_id, type_url, name) VALUES (?, ?, ?)",
                    (node_id, type_url, name),
                )
                values: tuple[str | float, ...]
                if kind == "sent":
                    assign, values = "sent_version = ?, sent_at = ?", (version, now)
                elif kind == "acked":
                    assign, values = "acked_version = ?, acked_at = ?", (version, now)
                elif kind == "nacked":
                    assign, values = (
                        "nack_version = ?, nack_message = ?, nack_at = ?",
                        (version, message, now),
                    )
                else:
                    raise ValueError(f"unknown event kind {kind!r}")
                db.execute(
                    f"UPDATE agent_resources SET {assign} WHERE node_id = ? AND type_url = ? AND name = ?",
                    (*values, node_id, type_url, name),
                )
            db.execute("UPDATE agents SET last_seen = ? WHERE node_id = ?", (now, node_id))
            answers = [(node_id, *r) for r in rows if r[0] in ("acked", "nacked")]
            if answers:
                self._advance_rollouts(db, answers)

    def _advance_rollouts(
        self, db: sqlite3.Connection, answers: list[tuple[str, str, str, str, str, str]] | None
    ) -> None:
        """Move running rollouts on after agent answers ``(node, kind, type_url, name, version, message)``
        (only the rollouts they touch) or a connect/disconnect (``None``: every running rollout): halt on
        a NACK of the version, complete when the first stage ACKed it, pick a first-stage agent when no
        known agent is in the first stage."""
        running = _rollouts(db, "WHERE state = 'running'")
        if answers is not None:
            touched = {(a[2], a[3], a[4]) for a in answers}
            running = [r for r in running if (r.type_url, r.name, r.version) in touched]
        if not running:
            return
        answers = answers or []
        now = self._clock()
        changed = False
        for ro in running:
            nack = next(
                (
                    a
                    for a in answers
                    if a[1] == "nacked" and (a[2], a[3], a[4]) == (ro.type_url, ro.name, ro.version)
                ),
                None,
            )
            if nack is not None:
                _set_state(db, ro.id, "halted", f"{nack[0]} NACKed: {nack[5]}", now)
                changed = True
                continue
            sel_row = db.execute(
                "SELECT selector, version FROM resources WHERE type_url = ? AND name = ?",
                (ro.type_url, ro.name),
            ).fetchone()
            if sel_row is None or sel_row[1] != ro.version:
                continue
            selector: dict[str, str] = json.loads(sel_row[0])
            agents = [a for a in _agents(db) if not selector or matches(selector, a.metadata)]
            known = [(a.node_id, a.metadata) for a in agents]
            also = _fallback_stage(known, ro.name, ro.percent, selector, ro.stage)
            if also != frozenset(ro.stage):
                db.execute(
                    "UPDATE rollouts SET stage = ?, updated = ? WHERE id = ?",
                    (json.dumps(sorted(also)), now, ro.id),
                )
                changed = True
            stage = [
                a.node_id
                for a in agents
                if a.connected and in_first_stage(a.node_id, ro.name, ro.percent, also)
            ]
            if not stage:
                continue
            acked = {
                nid
                for (nid,) in db.execute(
                    "SELECT node_id FROM agent_resources WHERE type_url = ? AND name = ? AND "
                    "acked_version = ?",
                    (ro.type_url, ro.name, ro.version),
                ).fetchall()
            }
            if all(nid in acked for nid in stage):
                _set_state(db, ro.id, "complete", f"first stage ACKed ({len(stage)} agents)", now)
                changed = True
        if changed:
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")

    def _upsert_agent_resource(
        self, node_id: str, type_url: str, name: str, assign: str, values: tuple[str, ...]
    ) -> None:
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO agent_resources (node_id, type_url, name) VALUES (?, ?, ?)",
                (node_id, type_url, name),
            )
            db.execute(
                f"UPDATE agent_resources SET {assign} WHERE node_id = ? AND type_url = ? AND name = ?",
                (*values, now, node_id, type_url, name),
            )

    def agents(self) -> list[AgentStatus]:
        return _agents(self._db)

    def agent_resources(self, node_id: str) -> list[AgentResourceStatus]:
        rows = self._db.execute(
            "SELECT type_url, name, sent_version, sent_at, acked_version, acked_at, nack_version, "
            "nack_message, nack_at FROM agent_resources WHERE node_id = ? ORDER BY type_url, name",
            (node_id,),
        ).fetchall()
        return [AgentResourceStatus(*row) for row in rows]

    # -- rollouts ----------------------------------------------------------------------------------
    def start_rollout(
        self, type_url: str, name: str, version: str, percent: int, previous_version: str | None = None
    ) -> int:
        """Record a running rollout by hand (``put`` starts them itself); bumps the generation."""
        now = self._clock()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO rollouts (type_url, name, version, percent, state, created, updated, "
                "previous_version) VALUES (?, ?, ?, ?, 'running', ?, ?, ?)",
                (type_url, name, version, percent, now, now, previous_version),
            )
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
            return int(cur.lastrowid or 0)

    def set_rollout_state(self, rollout_id: int, state: str, reason: str = "") -> None:
        with self._tx() as db:
            _set_state(db, rollout_id, state, reason, self._clock())
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")

    def promote_rollout(self, rollout_id: int, *, force: bool = False) -> Rollout:
        """Send a running rollout's version to everyone (``complete``); a halted one only with ``force``.
        Raises ``LookupError`` (no such rollout) or ``ValueError`` (not in a state to promote)."""
        with self._tx() as db:
            found = _rollouts(db, "WHERE id = ?", (rollout_id,))
            if not found:
                raise LookupError(f"no rollout {rollout_id}")
            ro = found[0]
            if ro.state != "running" and not (force and ro.state == "halted"):
                hint = " (use force to promote a halted rollout)" if ro.state == "halted" else ""
                raise ValueError(f"rollout {rollout_id} is {ro.state}{hint}")
            reason = "promoted by hand" + (f" after: {ro.reason}" if ro.state == "halted" else "")
            _set_state(db, ro.id, "complete", reason, self._clock())
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
            (done,) = _rollouts(db, "WHERE id = ?", (rollout_id,))
            return done

    def rollouts(self) -> list[Rollout]:
        """Every rollout, oldest first."""
        return _rollouts(self._db, "")

    def active_rollouts(self) -> dict[tuple[str, str], Rollout]:
        """(type URL, name) -> its running or halted rollout."""
        return {(r.type_url, r.name): r for r in _rollouts(self._db, "WHERE state IN ('running', 'halted')")}


_RES_COLS = "type_url, name, version, resource, selector, rollout_percent, ttl, source, created, updated"
_ROLLOUT_COLS = (
    "id, type_url, name, version, percent, state, reason, created, updated, previous_version, stage"
)


def _rollouts(db: sqlite3.Connection, where: str, args: tuple[Any, ...] = ()) -> list[Rollout]:
    rows = db.execute(f"SELECT {_ROLLOUT_COLS} FROM rollouts {where} ORDER BY id", args).fetchall()
    out: list[Rollout] = []
    for rid, t, n, v, pct, state, reason, created, updated, prev, stage in rows:
        out.append(
            Rollout(rid, t, n, v, pct, state, reason, created, updated, prev, tuple(json.loads(stage)))
        )
    return out


def _active(db: sqlite3.Connection, type_url: str, name: str) -> Rollout | None:
    found = _rollouts(
        db, "WHERE type_url = ? AND name = ? AND state IN ('running', 'halted')", (type_url, name)
    )
    return found[-1] if found else None


def _set_state(db: sqlite3.Connection, rollout_id: int, state: str, reason: str, now: float) -> None:
    db.execute(
        "UPDATE rollouts SET state = ?, reason = ?, updated = ? WHERE id = ?",
        (state, reason, now, rollout_id),
    )


def _agents(db: sqlite3.Connection) -> list[AgentStatus]:
    rows = db.execute(
        "SELECT node_id, cluster, metadata, streams, connected_since, last_seen FROM agents ORDER BY node_id"
    ).fetchall()
    return [
        AgentStatus(nid, cl, json.loads(meta), streams > 0, since, seen)
        for nid, cl, meta, streams, since, seen in rows
    ]


def _fallback_stage(
    known: list[tuple[str, Mapping[str, Any]]],
    name: str,
    percent: int,
    selector: Mapping[str, str],
    also: tuple[str, ...] | frozenset[str],
) -> frozenset[str]:
    """``also`` plus, when none of the ``known`` matching agents is in the first stage, the one with the
    lowest stage bucket (a small fleet still gets a first stage; the choice is kept once made)."""
    matching = [nid for nid, md in known if not selector or matches(selector, md)]
    if not matching or any(in_first_stage(nid, name, percent, also) for nid in matching):
        return frozenset(also)
    return frozenset(also) | {min(matching, key=lambda nid: (stage_bucket(nid, name), nid))}


def _resource(row: tuple[Any, ...]) -> StoredResource:
    t, n, v, blob, sel, pct, ttl, src, created, updated = row
    return StoredResource(t, n, v, cbor2.loads(blob), json.loads(sel), pct, ttl, src, created, updated)
