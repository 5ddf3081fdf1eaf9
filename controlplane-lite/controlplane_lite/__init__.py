"""controlplane-lite: a small delta-xDS control plane for fleets of microenvoy agents.

Resources (Envoy-JSON-shaped maps) come from a watched directory of YAML files or ``controlplane-lite push``,
are validated with the agent's own config model, stored in SQLite with content-hash versions, and served to
agents over the ``DeltaAggregatedResources`` gRPC stream (CBOR messages, COSE-signed resources).
"""

from controlplane_lite.versions import TYPE_URLS, resource_version

__all__ = ["TYPE_URLS", "resource_version"]

__version__ = "0.1.0"
