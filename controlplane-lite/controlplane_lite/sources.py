"""Resource files: a directory of YAML files, loaded and validated as a whole, watched by polling.

File format (``*.yaml`` / ``*.yml`` anywhere under the directory, hidden files and directories skipped;
each file holds one or more YAML documents separated by ``---``; empty documents are ignored)::

    type: cluster            # cluster | endpoint | listener | route | secret (required)
    name: api                # optional: defaults to the resource's own name (cluster_name for endpoint)
    selector:                # optional: node metadata labels an agent must carry (all of them),
      site: berlin           #   e.g. site, profile, arch; ``selector: {labels: {...}}`` is the same
      arch: arm64
    rollout: {percent: 10}   # optional: staged rollout, 1..100 (default: everyone at once)
    ttl: 30s                 # optional: the agent drops it without a refresh (heartbeats are sent)
    resource:                # required: the resource in Envoy's JSON naming, exactly as in a bootstrap's
      name: api              #   static_resources entry; "@type" is added (or must match)
      connect_timeout: 1s
      load_assignment: {...}

Every problem is reported with its place, ``clusters.yaml[1].resource: expected a mapping``, and a file
that fails leaves the whole directory unapplied (nothing is pushed). ``DirectoryWatcher.poll()`` compares
the (name, mtime, size) of every file with the last scan -- no inotify dependency -- and loads the
directory again only when something changed; ``diff`` gives the changed and removed resources.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from microenvoy.config.loader import StrictYamlLoader
from microenvoy.config.reader import Reader, parse_duration
from microenvoy.core.errors import ConfigError

from controlplane_lite.refs import Key
from controlplane_lite.validate import resource_name
from controlplane_lite.versions import TYPE_URLS, resource_version

__all__ = [
    "Change",
    "DirectoryWatcher",
    "ResourceSpec",
    "diff",
    "load_directory",
    "load_document",
    "load_file",
    "parse_document",
    "parse_documents",
]


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    """One resource as a file declares it."""

    type_url: str
    """Its type URL."""
    name: str
    """Its name."""
    resource: Mapping[str, Any]
    """The resource map with ``@type``."""
    selector: Mapping[str, str] = field(default_factory=dict)
    """Node metadata labels an agent must carry."""
    rollout_percent: int | None = None
    """Staged rollout percentage, or None."""
    ttl: float | None = None
    """TTL in seconds, or None."""
    origin: str = ""
    """Where it was declared, for messages: ``clusters.yaml[1]``."""
    source: str = ""
    """The store's ``source``: ``dir:<relative path>`` or ``push:<path>``."""

    @property
    def key(self) -> Key:
        return (self.type_url, self.name)

    @property
    def version(self) -> str:
        return resource_version(self.resource)


@dataclass(frozen=True, slots=True)
class Change:
    """What a new load changes: resources added or changed, and keys removed."""

    upserts: Mapping[Key, ResourceSpec] = field(default_factory=dict)
    """Added or changed resources (content or targeting)."""
    removals: frozenset[Key] = frozenset()
    """Resources no longer declared."""

    def __bool__(self) -> bool:
        return bool(self.upserts or self.removals)


# ============================================================================================ parsing
_StrictLoader = StrictYamlLoader
"""Duplicate keys are errors (the agent's own loader)."""


def _json_like(value: object, path: str, errors: list[str]) -> None:
    """Resources travel as CBOR and are hashed: only JSON-like values (YAML dates, sets... are refused)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                errors.append(f"{path}: keys must be strings, got {k!r}")
            else:
                _json_like(v, f"{path}.{k}", errors)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _json_like(v, f"{path}[{i}]", errors)
    elif isinstance(value, float) and not math.isfinite(value):
        errors.append(f"{path}: not a finite number")
    elif value is not None and not isinstance(value, str | int | float | bool):
        errors.append(f"{path}: unsupported value {value!r} (quote it to make it a string)")


def _parse_doc(doc: object, origin: str, source: str, errors: list[str]) -> ResourceSpec | None:
    before = len(errors)
    r = Reader(doc, origin, errors)
    kind = r.enum("type", tuple(TYPE_URLS), required=True)
    type_url = TYPE_URLS.get(kind or "", "")
    raw = r.get("resource")
    resource: dict[str, Any] = {}
    if raw is None:
        r.error("required field is missing", "resource")
    elif not isinstance(raw, Mapping):
        r.error("expected a mapping", "resource")
    else:
        resource = dict(raw)
        _json_like(resource, r.sub("resource"), errors)
    name = r.string("name", None)
    own = resource_name(type_url, resource) if type_url else None
    if name is None:
        name = own
        if name is None and type_url:
            field_name = "cluster_name" if kind == "endpoint" else "name"
            r.error("required field is missing (or set name)", f"resource.{field_name}")
    elif own is not None and own != name:
        r.error(f"{own!r} differs from the resource's own name", "name")
    elif own is None and type_url:
        resource["cluster_name" if kind == "endpoint" else "name"] = name
    if type_url:
        t = resource.get("@type", type_url)
        if t != type_url:
            r.error(f"expected {type_url!r}, got {t!r}", "resource.@type")
        resource["@type"] = type_url
    selector = _selector(r)
    percent: int | None = None
    ro = r.mapping("rollout")
    if ro is not None:
        percent = ro.integer("percent", None, required=True, min=1, max=100)
        ro.finish()
    ttl: float | None = None
    if r.has("ttl"):
        try:
            ttl = parse_duration(r.get("ttl"))
        except ValueError as exc:
            r.error(str(exc), "ttl")
        else:
            if ttl <= 0:
                r.error("must be greater than 0", "ttl")
    r.finish()
    if len(errors) > before or not name or not type_url:
        return None
    return ResourceSpec(type_url, name, resource, selector, percent, ttl, origin, source)


def _selector(r: Reader) -> dict[str, str]:
    """``selector: {site: x, profile: y}`` (or the same under ``labels``): label name -> string value."""
    raw = r.get("selector")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        r.error("expected a mapping of node metadata labels to values", "selector")
        return {}
    out: dict[str, str] = {}
    items = [(f"selector.{k}", k, v) for k, v in raw.items() if k != "labels"]
    labels = raw.get("labels")
    if labels is not None:
        if isinstance(labels, Mapping):
            items += [(f"selector.labels.{k}", k, v) for k, v in labels.items()]
        else:
            r.error("expected a mapping of label names to values", "selector.labels")
    for path, k, v in items:
        if not isinstance(k, str) or not k:
            r.error(f"label names must be non-empty strings, got {k!r}", "selector")
        elif not isinstance(v, str):
            r.error(f"expected a string, got {v!r} (quote it)", path)
        elif k in out and out[k] != v:
            r.error(f"label {k!r} is given twice with different values", path)
        else:
            out[k] = v
    return out


def parse_document(
    doc: object, origin: str, source: str = "", *, kind: str | None = None, name: str | None = None
) -> ResourceSpec:
    """One resource document (the file format's mapping); ``kind`` and ``name`` (the REST API's URL) fill
    ``type`` and ``name`` and must agree with them if the document has them. Raises ``ConfigError``."""
    if isinstance(doc, Mapping) and (kind is not None or name is not None):
        doc = dict(doc)
        for field_name, value in (("type", kind), ("name", name)):
            if value is None:
                continue
            have = doc.setdefault(field_name, value)
            if have != value:
                raise ConfigError([f"{origin}.{field_name}: {have!r} differs from {value!r} in the URL"])
    errors: list[str] = []
    spec = _parse_doc(doc, origin, source, errors)
    if errors or spec is None:
        raise ConfigError(errors or [f"{origin}: not a resource document"])
    return spec


def _load_all(text: str, display: str) -> list[object]:
    try:
        return list(yaml.load_all(text, Loader=_StrictLoader))  # a SafeLoader subclass: safe
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{display}:{mark.line + 1}:{mark.column + 1}" if mark is not None else display
        raise ConfigError([f"{where}: invalid YAML: {exc.problem or exc.context}"]) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError([f"{display}: invalid YAML: {exc}"]) from None


def load_document(text: str, display: str) -> object:
    """Exactly one YAML (or JSON: a subset) document from ``text``; raises ``ConfigError``."""
    docs = [d for d in _load_all(text, display) if d is not None]
    if len(docs) != 1:
        raise ConfigError([f"{display}: expected one document, got {len(docs)}"])
    return docs[0]


def parse_documents(text: str, display: str, source: str = "") -> list[ResourceSpec]:
    """Every resource in the YAML ``text`` of a file shown as ``display``; raises ``ConfigError``."""
    docs = _load_all(text, display)
    errors: list[str] = []
    specs: list[ResourceSpec] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        spec = _parse_doc(doc, f"{display}[{i}]", source, errors)
        if spec is not None:
            specs.append(spec)
    if errors:
        raise ConfigError(errors)
    return specs


def load_file(path: str, display: str | None = None, source: str | None = None) -> list[ResourceSpec]:
    """The resources of one file; raises ``ConfigError`` naming the file."""
    display = display or path
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{display}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{display}: not UTF-8 text (byte {exc.start})"]) from None
    return parse_documents(text, display, f"push:{display}" if source is None else source)


def _files(directory: str) -> list[str]:
    """Relative paths of the YAML files under ``directory`` (sorted; hidden entries skipped)."""
    out: list[str] = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.endswith((".yaml", ".yml")):
                out.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(out)


def load_directory(directory: str) -> dict[Key, ResourceSpec]:
    """Every resource declared under ``directory``; raises ``ConfigError`` with every problem of every file
    (a name declared twice included)."""
    errors: list[str] = []
    out: dict[Key, ResourceSpec] = {}
    for rel in _files(directory):
        try:
            specs = load_file(os.path.join(directory, rel), rel, f"dir:{rel}")
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
        for spec in specs:
            other = out.get(spec.key)
            if other is not None:
                errors.append(f"{spec.origin}: {spec.name!r} is already declared in {other.origin}")
            else:
                out[spec.key] = spec
    if errors:
        raise ConfigError(errors)
    return out


def _same(a: ResourceSpec, b: ResourceSpec) -> bool:
    return (a.version, dict(a.selector), a.rollout_percent, a.ttl, a.source) == (
        b.version,
        dict(b.selector),
        b.rollout_percent,
        b.ttl,
        b.source,
    )


def diff(old: Mapping[Key, ResourceSpec], new: Mapping[Key, ResourceSpec]) -> Change:
    """The change from ``old`` to ``new``: content or targeting changes, additions, removals."""
    upserts = {k: s for k, s in new.items() if k not in old or not _same(old[k], s)}
    return Change(upserts, frozenset(k for k in old if k not in new))


class DirectoryWatcher:
    """Polls a resource directory; ``poll()`` returns the change since the last good load.

    A directory that fails to load is reported (``last_errors``) and nothing changes until it loads again;
    the change is then computed against the last good load.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.current: dict[Key, ResourceSpec] = {}
        """The last good load."""
        self.last_errors: list[str] = []
        """Errors of the last load ([] when it succeeded)."""
        self._stamp: tuple[tuple[str, int, int], ...] | None = None

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        out: list[tuple[str, int, int]] = []
        for rel in _files(self.directory):
            try:
                st = os.stat(os.path.join(self.directory, rel))
            except OSError:
                continue
            out.append((rel, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def poll(self) -> Change | None:
        """None when no file changed since the last poll; else the change (may be empty), or raise
        ``ConfigError`` when the directory does not load (``current`` is kept)."""
        stamp = self._scan()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            new = load_directory(self.directory)
        except ConfigError as exc:
            self.last_errors = list(exc.errors)
            raise
        self.last_errors = []
        return diff(self.current, new)

    def accept(self, change: Change) -> None:
        """Record ``change`` as applied (call after the store took it)."""
        self.current = {k: v for k, v in self.current.items() if k not in change.removals}
        self.current.update(change.upserts)

    def forget(self) -> None:
        """Make the next ``poll`` load again (after a refused change, to retry once files change)."""
        self._stamp = None

    def __repr__(self) -> str:
        return f"<DirectoryWatcher {self.directory!r} resources={len(self.current)}>"
