"""Dynamic resources -> one bootstrap document, validated by the same loader as a config file (sans-IO).

The agent keeps every applied xDS resource in Envoy's JSON shape. ``compose`` turns the static bootstrap plus
those resources into a single bootstrap document: dynamic Clusters and Listeners join ``static_resources``;
an EDS cluster gets its ClusterLoadAssignment inlined as ``load_assignment``; an HCM with ``rds`` gets its
RouteConfiguration inlined as ``route_config``; SDS references get their Secret inlined. The loader then
validates the result exactly as it validates a file, and the server applies it through its reload path (so a
changed cluster warms before it replaces the old one, listeners keep their sockets).

``validate`` decides, per resource, what an update does:

* **rejected**: the resource itself is invalid (a loader error under its path): NACKed by name;
* **held**: it references something the agent does not have yet (a cluster, a route configuration, an
  endpoint assignment, a secret): kept aside, not applied half-way, and applied when the reference arrives
  (DELTA.md rule 5);
* otherwise it is part of the new configuration.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from microenvoy.config.loader import cross_check, parse_bootstrap, parse_resource
from microenvoy.config.model import Bootstrap, StaticResources
from microenvoy.core.errors import ConfigError

__all__ = [
    "CLUSTER",
    "ENDPOINTS",
    "LISTENER",
    "ROUTES",
    "SECRET",
    "TYPES",
    "Composed",
    "Validator",
    "Verdict",
    "compose",
    "compose_one",
    "describe",
    "references",
    "validate",
]

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTES = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
TYPES = (CLUSTER, ENDPOINTS, LISTENER, ROUTES, SECRET)
"""In make-before-break order (DELTA.md rule 5)."""
_SHORT = {t: t.rsplit(".", 1)[1] for t in TYPES}

Key = tuple[str, str]
"""(type URL, resource name)."""
Resources = Mapping[str, Mapping[str, Mapping[str, Any]]]
"""type URL -> name -> resource (Envoy JSON, ``@type`` allowed)."""


@dataclass(slots=True)
class Composed:
    """A composed bootstrap document and where each dynamic resource landed in it."""

    doc: dict[str, Any]
    paths: dict[str, Key] = field(default_factory=dict)
    """Document path prefix (``static_resources.clusters[3]``) -> the resource it came from."""
    used: dict[Key, set[Key]] = field(default_factory=dict)
    """Resource -> the resources inlined into it (its route configuration, endpoints, secrets)."""
    held: dict[Key, str] = field(default_factory=dict)
    """Resources left out because a reference is missing -> what is missing."""


@dataclass(slots=True)
class Verdict:
    """What ``validate`` decided."""

    bootstrap: Bootstrap | None
    """The validated configuration (None only if the static part itself is broken)."""
    rejected: dict[Key, str] = field(default_factory=dict)
    held: dict[Key, str] = field(default_factory=dict)
    cluster_delta: tuple[list[Any], list[str]] | None = None
    """(clusters parsed anew, cluster names gone) when only those differ from the previous verdict's
    bootstrap (``Validator.validate`` with ``changed``); None: compare everything."""


def _strip(resource: Mapping[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(dict(resource))
    d.pop("@type", None)
    return d


def compose_one(
    key: Key, resources: Resources, exclude: set[Key] | None = None
) -> tuple[dict[str, Any] | None, set[Key], str]:
    """One Cluster or Listener with its references inlined: ``(document, inlined resources, "")``, or
    ``(None, ..., what it waits for)``."""
    exclude = exclude or set()
    type_url, name = key
    used: set[Key] = set()
    doc = _strip(resources[type_url][name])
    if type_url == CLUSTER:
        if doc.get("type") == "EDS":
            eds = doc.pop("eds_cluster_config", None) or {}
            service = eds.get("service_name") or doc.get("name") or name
            if service not in resources.get(ENDPOINTS, {}) or (ENDPOINTS, service) in exclude:
                return None, used, f"waits for ClusterLoadAssignment {service!r}"
            doc["type"] = "STATIC"
            cla = _strip(resources[ENDPOINTS][service])
            cla.pop("cluster_name", None)
            doc["load_assignment"] = {"cluster_name": doc.get("name", name), **cla}
            used.add((ENDPOINTS, service))
        missing = _inline_secrets(doc, resources, exclude, used)
    else:
        missing = _inline_routes(doc, resources, exclude, used) or _inline_secrets(
            doc, resources, exclude, used
        )
    return (None, used, missing) if missing else (doc, used, "")


def compose(static: Mapping[str, Any], resources: Resources, exclude: set[Key] | None = None) -> Composed:
    """The static bootstrap ``static`` plus ``resources`` (minus ``exclude``) as one bootstrap document."""
    exclude = exclude or set()
    doc = copy.deepcopy(dict(static))
    doc.pop("dynamic_resources", None)  # validated with the static part; not a resource
    sr = doc.setdefault("static_resources", {})
    out = Composed(doc)
    for type_url, section in ((CLUSTER, "clusters"), (LISTENER, "listeners")):
        items: list[Any] = sr.setdefault(section, [])
        for name in sorted(resources.get(type_url, {})):
            key = (type_url, name)
            if key in exclude:
                continue
            one, used, missing = compose_one(key, resources, exclude)
            if one is None:
                out.held[key] = missing
                continue
            out.paths[f"static_resources.{section}[{len(items)}]"] = key
            out.used[key] = used
            items.append(one)
    return out


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _inline_routes(listener: dict[str, Any], resources: Resources, exclude: set[Key], used: set[Key]) -> str:
    for d in _walk(listener):
        rds = d.get("rds")
        if not isinstance(rds, dict):
            continue
        name = rds.get("route_config_name")
        if not isinstance(name, str) or name not in resources.get(ROUTES, {}) or (ROUTES, name) in exclude:
            return f"waits for RouteConfiguration {name!r}"
        del d["rds"]
        d["route_config"] = _strip(resources[ROUTES][name])
        used.add((ROUTES, name))
    return ""


def _inline_secrets(node: dict[str, Any], resources: Resources, exclude: set[Key], used: set[Key]) -> str:
    secrets = resources.get(SECRET, {})

    def secret(ref: Any) -> dict[str, Any] | None:
        name = ref.get("name") if isinstance(ref, dict) else None
        if not isinstance(name, str) or name not in secrets or (SECRET, name) in exclude:
            return None
        used.add((SECRET, name))
        return _strip(secrets[name])

    for d in list(_walk(node)):
        refs = d.pop("tls_certificate_sds_secret_configs", None)
        if refs is not None:
            certs = d.setdefault("tls_certificates", [])
            for ref in refs if isinstance(refs, list) else [refs]:
                s = secret(ref)
                if s is None or "tls_certificate" not in s:
                    return f"waits for Secret {_ref_name(ref)!r} (tls_certificate)"
                certs.append(s["tls_certificate"])
        ref = d.pop("validation_context_sds_secret_config", None)
        if ref is not None:
            s = secret(ref)
            if s is None or "validation_context" not in s:
                return f"waits for Secret {_ref_name(ref)!r} (validation_context)"
            d["validation_context"] = s["validation_context"]
    return ""


def _ref_name(ref: Any) -> Any:
    return ref.get("name") if isinstance(ref, dict) else ref


class _Held:
    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


class _Bad:
    __slots__ = ("blame", "why")

    def __init__(self, blame: Key, why: str) -> None:
        self.blame = blame
        self.why = why


class Validator:
    """Validation that is cheap for a small delta in a large configuration.

    Each Cluster and Listener is parsed on its own (``parse_resource``) and the outcome is kept per
    resource, keyed by its version and the versions of what was inlined into it; a delta re-parses only
    what changed. The whole is then assembled into a ``Bootstrap`` with the static part (parsed once) and
    checked with ``cross_check``; unchanged resources keep their parsed objects, so the server sees them as
    identical (``is``) and leaves their runtimes alone.
    """

    def __init__(self, static: Mapping[str, Any], *, base_dir: str | None = None) -> None:
        self.static_doc = static
        self.base_dir = base_dir
        self.base = parse_bootstrap(static, base_dir=base_dir)
        self._cache: dict[Key, tuple[Any, Any]] = {}
        self._deps: dict[tuple[Key, str], tuple[Key, ...]] = {}
        self._primed = False
        self._clean = False
        """The last verdict passed the cross checks, nothing excluded (a cluster-only delta may skip them)."""
        self._good: dict[str, dict[Key, Any]] = {CLUSTER: {}, LISTENER: {}}
        """Clusters/Listeners that parsed, in arrival order (what the next bootstrap is made of)."""
        self._held: dict[Key, str] = {}
        self._bad: dict[Key, _Bad] = {}
        self._rdeps: dict[Key, set[Key]] = {}
        """Inlined resource -> the Clusters/Listeners inlining it (to look at again when it changes)."""

    def __repr__(self) -> str:
        return f"<Validator cached={len(self._cache)}>"

    def _fingerprint(self, key: Key, resources: Resources, versions: Mapping[Key, str] | None) -> Any:
        if versions is None or key not in versions:
            return None
        version = versions[key]
        deps = self._deps.get((key, version))
        if deps is None:
            deps = tuple(sorted(_references_of(key[0], resources[key[0]][key[1]])))
            self._deps[(key, version)] = deps
        return (version, tuple((d, versions.get(d), d[1] in resources.get(d[0], {})) for d in deps))

    def _outcome(self, key: Key, resources: Resources, versions: Mapping[Key, str] | None) -> Any:
        fp = self._fingerprint(key, resources, versions)
        hit = self._cache.get(key)
        if fp is not None and hit is not None and hit[0] == fp:
            return hit[1]
        doc, used, missing = compose_one(key, resources)
        outcome: Any
        if doc is None:
            outcome = _Held(missing)
        else:
            try:
                value = parse_resource(
                    "cluster" if key[0] == CLUSTER else "listener", doc, base_dir=self.base_dir
                )
                if key[0] == CLUSTER and getattr(value, "mqtt_broker", None) is not None:
                    from microenvoy.config.mqtt_cluster import with_node_id

                    value = with_node_id([value], self.base.node.id)[0]
                outcome = value
            except ConfigError as exc:
                rest = "; ".join(exc.errors)
                inner = next((u for u in used if _INLINED[u[0]] in rest), None)
                outcome = _Bad(inner or key, rest)
        if fp is not None:
            self._cache[key] = (fp, outcome)
        return outcome

    def forget(self, keep: set[Key]) -> None:
        """Drop cached outcomes of resources that are gone (bounded memory)."""
        for key in [k for k in self._cache if k not in keep]:
            del self._cache[key]
        for dk in [d for d in self._deps if d[0] not in keep]:
            del self._deps[dk]
        for dep in [d for d in self._rdeps if d not in keep]:
            del self._rdeps[dep]
        for referrers in self._rdeps.values():
            referrers.intersection_update(keep)

    def _assemble(self, clusters: tuple[Any, ...], listeners: tuple[Any, ...]) -> Bootstrap:
        base = self.base.static_resources
        return Bootstrap(
            node=self.base.node,
            admin=self.base.admin,
            static_resources=StaticResources(
                listeners=base.listeners + listeners, clusters=base.clusters + clusters
            ),
            dynamic_resources=self.base.dynamic_resources,
            raw={},
        )

    def _forget_outcome(self, key: Key) -> None:
        for group in (self._good[CLUSTER], self._good[LISTENER], self._held, self._bad):
            group.pop(key, None)

    def _place(self, key: Key, outcome: Any) -> None:
        self._forget_outcome(key)
        if isinstance(outcome, _Held):
            self._held[key] = outcome.why
        elif isinstance(outcome, _Bad):
            self._bad[key] = outcome
        else:
            self._good[key[0]][key] = outcome

    def validate(
        self, resources: Resources, versions: Mapping[Key, str] | None = None, changed: set[Key] | None = None
    ) -> Verdict:
        """The verdict for ``resources`` (with ``versions``, parsed outcomes are reused). ``changed``: the
        keys that differ from the previous call (added, replaced or removed, of any type); then only those
        Clusters/Listeners and the ones that inline a changed resource are looked at again."""
        if changed is None or not self._primed:
            self._good = {CLUSTER: {}, LISTENER: {}}
            self._held = {}
            self._bad = {}
            self._rdeps = {}
            redo: set[Key] | list[Key] = [(t, n) for t in (CLUSTER, LISTENER) for n in resources.get(t, {})]
            self._primed = True
        else:
            redo = {k for k in changed if k[0] in (CLUSTER, LISTENER)}
            for k in changed:
                redo |= self._rdeps.get(k, set())
        delta = changed is not None and self._clean
        before = {k: self._good[k[0]].get(k) for k in redo} if delta else {}
        for key in redo:
            if key[1] not in resources.get(key[0], {}):  # removed
                self._forget_outcome(key)
                continue
            if changed is not None:
                self._cache.pop(key, None)
            outcome = self._outcome(key, resources, versions)
            self._place(key, outcome)
            version = versions.get(key) if versions is not None else None
            deps = self._deps.get((key, version)) if version is not None else None
            for dep in deps if deps is not None else _references_of(key[0], resources[key[0]][key[1]]):
                self._rdeps.setdefault(dep, set()).add(key)
        verdict = Verdict(None, held=dict(self._held))
        for key, bad in self._bad.items():
            verdict.rejected[bad.blame] = bad.why
            if bad.blame != key:
                verdict.held[key] = f"waits for a valid {describe(bad.blame)}"
        base = self.base.static_resources
        if delta and all(k[0] == CLUSTER for k in redo):
            # Only clusters changed content (none appeared or went, none is an MQTT broker): the cross
            # checks, which look at cluster names and listeners only, cannot change; skip them.
            now = {k: self._good[CLUSTER].get(k) for k in redo}
            same_names = all((before[k] is None) == (now[k] is None) for k in redo)
            if same_names and not any(getattr(c, "mqtt_broker", None) for c in now.values() if c is not None):
                verdict.bootstrap = self._assemble(
                    tuple(self._good[CLUSTER].values()), tuple(self._good[LISTENER].values())
                )
                verdict.cluster_delta = ([c for c in now.values() if c is not None], [])
                return verdict
        self._clean = False
        excluded: set[Key] = set()
        for _ in range(len(self._good[LISTENER]) + len(self._good[CLUSTER]) + 1):
            good_c = self._good[CLUSTER]
            good_l = self._good[LISTENER]
            if excluded:
                clusters = tuple(v for k, v in good_c.items() if k not in excluded)
                listeners = tuple(v for k, v in good_l.items() if k not in excluded)
            else:
                clusters, listeners = tuple(good_c.values()), tuple(good_l.values())
            b = Bootstrap(
                node=self.base.node,
                admin=self.base.admin,
                static_resources=StaticResources(
                    listeners=base.listeners + listeners, clusters=base.clusters + clusters
                ),
                dynamic_resources=self.base.dynamic_resources,
                raw={},
            )
            errors = cross_check(b)
            if not errors:
                verdict.bootstrap = b
                self._clean = not excluded
                return verdict
            parsed = {
                t: [(k, v) for k, v in self._good[t].items() if k not in excluded]
                for t in (CLUSTER, LISTENER)
            }
            blamed = _blame_indexed(errors, len(base.listeners), len(base.clusters), parsed)
            if not blamed:  # the static part is broken: nothing dynamic can fix it
                for key in _all_keys(resources):
                    verdict.rejected.setdefault(key, "; ".join(errors))
                return verdict
            for key, messages in blamed.items():
                unknown = [m for m in messages if "unknown cluster" in m]
                if unknown and len(unknown) == len(messages) and key[0] == LISTENER:
                    verdict.held[key] = "waits for " + unknown[0].split("unknown ", 1)[1]
                else:
                    verdict.rejected[key] = "; ".join(messages)
                excluded.add(key)
        return verdict


def validate(static: Mapping[str, Any], resources: Resources, *, base_dir: str | None = None) -> Verdict:
    """Validate ``resources`` composed onto ``static`` once (no cache): see ``Validator``."""
    try:
        validator = Validator(static, base_dir=base_dir)
    except ConfigError as exc:
        return Verdict(None, rejected={k: "; ".join(exc.errors) for k in _all_keys(resources)})
    return validator.validate(resources)


def _blame_indexed(
    errors: list[str], n_listeners: int, n_clusters: int, parsed: Mapping[str, list[tuple[Key, Any]]]
) -> dict[Key, list[str]]:
    """Cross-check errors (``static_resources.listeners[i]...``) -> the dynamic resource at that index."""
    blamed: dict[Key, list[str]] = {}
    for err in errors:
        for section, offset, type_url in (
            ("listeners", n_listeners, LISTENER),
            ("clusters", n_clusters, CLUSTER),
        ):
            prefix = f"static_resources.{section}["
            if not err.startswith(prefix):
                continue
            index = int(err[len(prefix) : err.index("]", len(prefix))]) - offset
            if 0 <= index < len(parsed[type_url]):
                key = parsed[type_url][index][0]
                rest = err[err.index("]", len(prefix)) + 1 :].lstrip(".")
                blamed.setdefault(key, []).append(rest)
            break
    return blamed


def _references_of(type_url: str, resource: Mapping[str, Any]) -> set[Key]:
    one = references({type_url: {"x": resource}})
    return {(t, n) for t, names in one.items() for n in names}


def _all_keys(resources: Resources) -> set[Key]:
    return {(t, n) for t, names in resources.items() for n in names}


_INLINED = {ROUTES: "route_config", ENDPOINTS: "load_assignment", SECRET: "tls_certificates"}


def references(resources: Resources) -> dict[str, set[str]]:
    """The names the Clusters and Listeners reference, by type: EDS assignments, RDS route configurations,
    SDS secrets (what the agent subscribes to explicitly)."""
    out: dict[str, set[str]] = {ENDPOINTS: set(), ROUTES: set(), SECRET: set()}
    for name, c in resources.get(CLUSTER, {}).items():
        if c.get("type") == "EDS":
            eds = c.get("eds_cluster_config") or {}
            out[ENDPOINTS].add(str(eds.get("service_name") or c.get("name") or name))
    for kind in (CLUSTER, LISTENER):
        for res in resources.get(kind, {}).values():
            for d in _walk(res):
                rds = d.get("rds")
                if isinstance(rds, dict) and isinstance(rds.get("route_config_name"), str):
                    out[ROUTES].add(rds["route_config_name"])
                refs = d.get("tls_certificate_sds_secret_configs")
                for ref in refs if isinstance(refs, list) else []:
                    if isinstance(ref, dict) and isinstance(ref.get("name"), str):
                        out[SECRET].add(ref["name"])
                ref = d.get("validation_context_sds_secret_config")
                if isinstance(ref, dict) and isinstance(ref.get("name"), str):
                    out[SECRET].add(ref["name"])
    return out


def describe(key: Key) -> str:
    """``Cluster 'api'``: how logs, NACKs and stats name a resource."""
    return f"{_SHORT.get(key[0], key[0])} {key[1]!r}"
