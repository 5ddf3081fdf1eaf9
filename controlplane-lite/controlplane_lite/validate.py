"""Validation of resources with the agent's own config model, before anything is stored or pushed.

The prospective resource set (the store's resources with a change applied) is composed into one bootstrap
document exactly as the agent composes it (``microenvoy.xds.resources``: dynamic Clusters and Listeners in
``static_resources``, EDS endpoints, RDS routes and SDS secrets inlined) and validated by the agent's loader.
What the agent would reject is refused here, with the loader's path; what the agent would hold because a
reference is missing (a route to a cluster that does not exist) is refused too, since the whole set is known
here. A RouteConfiguration or ClusterLoadAssignment nothing references yet is validated on its own (the
route configuration with the HTTP connection manager's parser, the endpoints inside a static cluster).

Every message is prefixed with where the resource came from (``clusters.yaml[1] Cluster 'api': lb_policy:
unknown value ...``). ``check`` returns the messages; ``ensure_valid`` raises ``ConfigError`` with them.

Known limit: a ``filename`` DataSource is checked against the control plane's file system (the loader checks
that the file exists); ship certificates and keys inline or as Secrets.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from microenvoy.config.loader import parse_bootstrap
from microenvoy.config.reader import Reader
from microenvoy.core.errors import ConfigError
from microenvoy.filters.network.http_connection_manager import parse_route_configuration
from microenvoy.xds import resources as agent_resources

from controlplane_lite.refs import Key, references
from controlplane_lite.versions import CLUSTER, ENDPOINT, KIND_BY_TYPE_URL, ROUTE, SECRET

__all__ = ["check", "describe", "ensure_valid", "prospective", "resource_name"]

_NAME_FIELD = {ENDPOINT: "cluster_name"}


def describe(key: Key) -> str:
    """``Cluster 'api'``: how messages name a resource."""
    return agent_resources.describe(key)


def resource_name(type_url: str, resource: Mapping[str, Any]) -> str | None:
    """The name a resource carries itself (``name``; ``cluster_name`` for a ClusterLoadAssignment)."""
    v = resource.get(_NAME_FIELD.get(type_url, "name"))
    return v if isinstance(v, str) else None


def _strip(resource: Mapping[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(dict(resource))
    d.pop("@type", None)
    return d


def _own_checks(key: Key, resource: Mapping[str, Any]) -> list[str]:
    """What can be said of one resource alone: its ``@type``, its name, a Secret's shape."""
    type_url, name = key
    errors: list[str] = []
    if type_url not in KIND_BY_TYPE_URL:
        errors.append(f"unsupported resource type {type_url!r}")
        return errors
    t = resource.get("@type")
    if t is not None and t != type_url:
        errors.append(f"@type: expected {type_url!r}, got {t!r}")
    own = resource_name(type_url, resource)
    field = _NAME_FIELD.get(type_url, "name")
    if own is None:
        errors.append(f"{field}: required field is missing")
    elif own != name:
        errors.append(f"{field}: {own!r} does not match the resource name {name!r}")
    if type_url == SECRET:
        kinds = [k for k in ("tls_certificate", "validation_context") if k in resource]
        if len(kinds) != 1:
            errors.append("exactly one of tls_certificate, validation_context is required")
        for k in kinds:
            if not isinstance(resource[k], Mapping):
                errors.append(f"{k}: expected a mapping")
        for k in resource:
            if k not in ("@type", "name", "tls_certificate", "validation_context"):
                errors.append(f"{k}: unknown field")
    return errors


def _standalone_route(resource: Mapping[str, Any], clusters: Mapping[str, Any]) -> list[str]:
    errors: list[str] = []
    r = Reader(_strip(resource), "", errors)
    rc = parse_route_configuration(r)
    r.finish()
    for vi, vh in enumerate(rc.virtual_hosts):
        for ri, route in enumerate(vh.routes):
            action = route.route
            if action is None:
                continue
            where = f"virtual_hosts[{vi}].routes[{ri}].route"
            names = [(f"{where}.cluster", action.cluster)] if action.cluster is not None else []
            names += [
                (f"{where}.weighted_clusters.clusters[{wi}].name", wc.name)
                for wi, wc in enumerate(action.weighted_clusters)
            ]
            for path, cname in names:
                if cname and cname not in clusters:
                    errors.append(f"{path}: unknown cluster {cname!r}")
    return errors


def _standalone_endpoints(name: str, resource: Mapping[str, Any]) -> list[str]:
    cla = _strip(resource)
    doc = {"static_resources": {"clusters": [{"name": name, "type": "STATIC", "load_assignment": cla}]}}
    try:
        parse_bootstrap(doc)
    except ConfigError as exc:
        prefix = "static_resources.clusters[0].load_assignment"
        return [e[len(prefix) :].lstrip(".") if e.startswith(prefix) else e for e in exc.errors]
    return []


def check(resources: Mapping[Key, Mapping[str, Any]], origins: Mapping[Key, str] | None = None) -> list[str]:
    """Every problem of the resource set ``resources`` (key -> resource map), as
    ``<origin> <Type> '<name>': <path>: <message>``; empty when the agent would accept all of it."""
    origins = origins or {}

    def msg(key: Key, text: str) -> str:
        origin = origins.get(key)
        return f"{origin} {describe(key)}: {text}" if origin else f"{describe(key)}: {text}"

    errors: list[str] = []
    bad: set[Key] = set()
    for key, res in sorted(resources.items()):
        for e in _own_checks(key, res):
            errors.append(msg(key, e))
            bad.add(key)
    by_type: dict[str, dict[str, Mapping[str, Any]]] = {}
    for (t, n), res in resources.items():
        if (t, n) not in bad:
            by_type.setdefault(t, {})[n] = res
    referenced = {ref for key, res in resources.items() for ref in references(key[0], res)}
    # Whole-set validation, as the agent does it.
    verdict = agent_resources.validate({}, by_type)
    for key, text in sorted(verdict.rejected.items()):
        errors.append(msg(key, text))
    for key, text in sorted(verdict.held.items()):
        errors.append(msg(key, f"references a resource that does not exist ({text})"))
    # Route configurations and endpoints nothing references yet: on their own.
    clusters = by_type.get(CLUSTER, {})
    for name, res in sorted(by_type.get(ROUTE, {}).items()):
        if (ROUTE, name) not in referenced:
            errors.extend(msg((ROUTE, name), e) for e in _standalone_route(res, clusters))
    for name, res in sorted(by_type.get(ENDPOINT, {}).items()):
        if (ENDPOINT, name) not in referenced:
            errors.extend(msg((ENDPOINT, name), e) for e in _standalone_endpoints(name, res))
    return list(dict.fromkeys(errors))


def ensure_valid(
    resources: Mapping[Key, Mapping[str, Any]], origins: Mapping[Key, str] | None = None
) -> None:
    """``check``, raising ``ConfigError`` with every message if there is any."""
    errors = check(resources, origins)
    if errors:
        raise ConfigError(errors)


def prospective(
    current: Mapping[Key, Mapping[str, Any]],
    upserts: Mapping[Key, Mapping[str, Any]],
    removals: set[Key] | frozenset[Key] = frozenset(),
) -> dict[Key, Mapping[str, Any]]:
    """The resource set after a change: ``current`` minus ``removals`` plus ``upserts``."""
    out = {k: v for k, v in current.items() if k not in removals}
    out.update(upserts)
    return out
