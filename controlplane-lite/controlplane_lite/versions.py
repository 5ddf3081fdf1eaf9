"""Content-hash versions and the resource type URLs of the wire contract.

A resource's version is the first 16 hex characters of ``sha256(cbor2.dumps(resource, canonical=True))``:
stable across control-plane restarts and replicas (DELTA.md rule 2), and equal for equal content, so an
unchanged file never produces a push.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import cbor2

__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "KIND_BY_TYPE_URL",
    "LISTENER",
    "ROUTE",
    "SECRET",
    "TYPE_URLS",
    "canonical",
    "resource_version",
    "system_version",
]

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

TYPE_URLS: Mapping[str, str] = {
    "cluster": CLUSTER,
    "endpoint": ENDPOINT,
    "listener": LISTENER,
    "route": ROUTE,
    "secret": SECRET,
}
"""Short kind (as written in resource files and the CLI) -> type URL."""

KIND_BY_TYPE_URL: Mapping[str, str] = {v: k for k, v in TYPE_URLS.items()}


def canonical(obj: Any) -> bytes:
    """The canonical CBOR encoding (RFC 8949 §4.2.1 as cbor2 implements it) used for hashing and signing."""
    return cbor2.dumps(obj, canonical=True)


def resource_version(resource: Mapping[str, Any]) -> str:
    """The content-hash version of ``resource`` (the map sent on the wire, ``@type`` included)."""
    return hashlib.sha256(canonical(dict(resource))).hexdigest()[:16]


def system_version(versions: Mapping[tuple[str, str], str]) -> str:
    """A debug-only digest of a whole set of ``(type_url, name) -> version`` (``system_version_info``)."""
    items = sorted(f"{t}\x00{n}\x00{v}" for (t, n), v in versions.items())
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]
