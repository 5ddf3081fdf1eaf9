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

from microenvoy.config.loader import parse_bootstrap
from microenvoy.config.model import Bootstrap
from microenvoy.core.errors import ConfigError

__all__ = [
    "CLUSTER",
    "ENDPOINTS",
    "LISTENER",
    "ROUTES",
    "SECRET",
    "TYPES",
    "Composed",
    "Verdict",
    "compose",
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


def _strip(resource: Mapping[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(dict(resource))
    d.pop("@type", None)
    return d


def compose(static: Mapping[str, Any], resources: Resources, exclude: set[Key] | None = None) -> Composed:
    """The static bootstrap ``static`` plus ``resources`` (minus ``exclude``) as one bootstrap document."""
    exclude = exclude or set()
    doc = copy.deepcopy(dict(static))
    doc.pop("dynamic_resources", None)  # validated with the static part; not a resource
    sr = doc.setdefault("static_resources", {})
    clusters: list[Any] = sr.setdefault("clusters", [])
    listeners: list[Any] = sr.setdefault("listeners", [])
    out = Composed(doc)

    def have(type_url: str, name: str) -> bool:
        return name in resources.get(type_url, {}) and (type_url, name) not in exclude

    for name, res in sorted(resources.get(CLUSTER, {}).items()):
        key = (CLUSTER, name)
        if key in exclude:
            continue
        c = _strip(res)
        used: set[Key] = set()
        if c.get("type") == "EDS":
            eds = c.pop("eds_cluster_config", None) or {}
            service = eds.get("service_name") or c.get("name") or name
            if not have(ENDPOINTS, service):
                out.held[key] = f"waits for ClusterLoadAssignment {service!r}"
                continue
            c["type"] = "STATIC"
            cla = _strip(resources[ENDPOINTS][service])
            cla.pop("cluster_name", None)
            c["load_assignment"] = {"cluster_name": c.get("name", name), **cla}
            used.add((ENDPOINTS, service))
        missing = _inline_secrets(c, resources, exclude, used)
        if missing:
            out.held[key] = missing
            continue
        out.paths[f"static_resources.clusters[{len(clusters)}]"] = key
        out.used[key] = used
        clusters.append(c)
    for name, res in sorted(resources.get(LISTENER, {}).items()):
        key = (LISTENER, name)
        if key in exclude:
            continue
        li = _strip(res)
        used = set()
        missing = _inline_routes(li, resources, exclude, used) or _inline_secrets(
            li, resources, exclude, used
        )
        if missing:
            out.held[key] = missing
            continue
        out.paths[f"static_resources.listeners[{len(listeners)}]"] = key
        out.used[key] = used
        listeners.append(li)
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


def validate(static: Mapping[str, Any], resources: Resources, *, base_dir: str | None = None) -> Verdict:
    """Compose and validate; resources whose own part of the document is invalid are rejected (with the
    loader's messages), those that reference what is missing are held, and the rest is validated again
    without them until the document is valid."""
    verdict = Verdict(None)
    exclude: set[Key] = set()
    for _ in range(len(TYPES) * 4 + sum(len(v) for v in resources.values())):
        composed = compose(static, resources, exclude)
        held = dict(composed.held)
        try:
            verdict.bootstrap = parse_bootstrap(composed.doc, base_dir=base_dir)
        except ConfigError as exc:
            blamed = _blame(exc.errors, composed)
            if not blamed:  # the static part is broken: nothing dynamic can fix it
                verdict.rejected.update({k: "; ".join(exc.errors) for k in _all_keys(resources) - exclude})
                verdict.held.update(held)
                return verdict
            for key, messages in blamed.items():
                unknown = [m for m in messages if "unknown cluster" in m]
                if unknown and len(unknown) == len(messages) and key[0] == LISTENER:
                    verdict.held[key] = "waits for " + unknown[0].split("unknown ", 1)[1]
                else:
                    verdict.rejected[key] = "; ".join(messages)
                exclude.add(key)
            continue
        verdict.held.update(held)
        return verdict
    return verdict


def _all_keys(resources: Resources) -> set[Key]:
    return {(t, n) for t, names in resources.items() for n in names}


def _blame(errors: list[str], composed: Composed) -> dict[Key, list[str]]:
    """Loader errors -> the dynamic resource under whose path each one is (``Listener 'edge': ...``)."""
    blamed: dict[Key, list[str]] = {}
    for err in errors:
        for prefix, key in composed.paths.items():
            if err.startswith(prefix + ".") or err.startswith(prefix + ":"):
                rest = err[len(prefix) :].lstrip(".")
                # An error inside an inlined RouteConfiguration / ClusterLoadAssignment is that resource's.
                inner = next((u for u in composed.used.get(key, ()) if _INLINED[u[0]] in rest), None)
                blamed.setdefault(inner or key, []).append(rest)
                break
    return blamed


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
