"""What a resource references: the clusters a Listener or RouteConfiguration routes to, the route
configuration a Listener loads over RDS, the endpoints of an EDS cluster, the secrets of a TLS context.

Read from the raw Envoy-JSON map (no parsing), so it works on any resource, valid or not. Used by the
validator (which RouteConfigurations are reachable) and the delta server (a Listener or RouteConfiguration
that references a cluster the agent has not ACKed yet is held back: make before break, DELTA.md rule 5).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from controlplane_lite.versions import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET

__all__ = ["Key", "cluster_refs", "references"]

Key = tuple[str, str]
"""(type URL, resource name)."""

_SKIP = ("config_source",)
"""Subtrees that name the agent's own static clusters (an RDS ``api_config_source``), not routed-to ones."""


def _walk(node: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(node, Mapping):
        yield node
        for k, v in node.items():
            if k not in _SKIP:
                yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def cluster_refs(resource: Mapping[str, Any]) -> set[str]:
    """Cluster names a Listener or RouteConfiguration routes to (route actions, weighted clusters,
    TCP proxy, MQTT bridge routes)."""
    out: set[str] = set()
    for d in _walk(resource):
        v = d.get("cluster")
        if isinstance(v, str) and v:
            out.add(v)
        wc = d.get("weighted_clusters")
        if isinstance(wc, Mapping) and isinstance(wc.get("clusters"), list):
            for c in wc["clusters"]:
                if isinstance(c, Mapping) and isinstance(c.get("name"), str):
                    out.add(c["name"])
    return out


def references(type_url: str, resource: Mapping[str, Any]) -> set[Key]:
    """Every resource ``resource`` (of ``type_url``) needs on the agent."""
    out: set[Key] = set()
    if type_url in (LISTENER, ROUTE):
        out.update((CLUSTER, c) for c in cluster_refs(resource))
    if type_url == CLUSTER and resource.get("type") == "EDS":
        eds = resource.get("eds_cluster_config")
        service = eds.get("service_name") if isinstance(eds, Mapping) else None
        name = service or resource.get("name")
        if isinstance(name, str):
            out.add((ENDPOINT, name))
    for d in _walk(resource):
        rds = d.get("rds")
        if (
            type_url == LISTENER
            and isinstance(rds, Mapping)
            and isinstance(rds.get("route_config_name"), str)
        ):
            out.add((ROUTE, rds["route_config_name"]))
        for key in ("tls_certificate_sds_secret_configs", "validation_context_sds_secret_config"):
            refs = d.get(key)
            for ref in refs if isinstance(refs, list) else [refs]:
                if isinstance(ref, Mapping) and isinstance(ref.get("name"), str):
                    out.add((SECRET, ref["name"]))
    return out
