"""``dynamic_resources``: where the agent gets its delta configuration (ADS over a static cluster).

Envoy's field names, plus microenvoy's own block (⚑ in docs/control-plane.md)::

    dynamic_resources:
      ads_config:
        api_type: DELTA_GRPC                 # the only type supported
        transport_api_version: V3
        grpc_services:                       # tried in this order, failing over on errors
        - envoy_grpc: {cluster_name: xds_cluster}
        set_node_on_first_message_only: true
      cds_config: {ads: {}, initial_fetch_timeout: 15s}
      lds_config: {ads: {}, initial_fetch_timeout: 15s}
      microenvoy:
        trusted_keys: ["<base64 Ed25519 public key>"]   # resources must be signed by one of these
        cache_dir: /var/lib/microenvoy/xds               # the offline-first cache (last applied config)

The runtime is ``microenvoy.io.xds``; the protocol is in docs/control-plane.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from microenvoy.config.reader import Reader

__all__ = ["DynamicResources", "parse_dynamic_resources"]

_DEFAULT_FETCH_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class DynamicResources:
    """The parsed ``dynamic_resources`` block."""

    xds_clusters: tuple[str, ...]
    """``ads_config.grpc_services[].envoy_grpc.cluster_name``: static clusters (HTTP/2) of the control plane,
    in failover order."""
    initial_fetch_timeout: float = _DEFAULT_FETCH_TIMEOUT
    """How long the agent waits at start for its first Cluster/Listener update before it serves from the
    cache (the longest of ``cds_config`` / ``lds_config``; Envoy's default 15 s; 0 = do not wait)."""
    trusted_keys: tuple[str, ...] = ()
    """Ed25519 public keys (base64 of the raw 32 bytes, or PEM) whose signatures are accepted."""
    require_signatures: bool = True
    """Refuse (NACK) resources without a valid signature; false only for a lab without keys."""
    cache_dir: str | None = None
    """Directory of the offline-first cache; None = no cache (the agent starts from static config)."""
    authority: str = ""
    """``:authority`` of the xDS stream (default: the cluster's name)."""


def parse_dynamic_resources(r: Reader) -> DynamicResources:
    clusters: list[str] = []
    ads = r.mapping("ads_config", required=True)
    if ads is not None:
        api = ads.enum("api_type", ("DELTA_GRPC", "AGGREGATED_DELTA_GRPC", "GRPC"), "DELTA_GRPC")
        if api == "GRPC":
            ads.error("only the incremental protocol is supported: use DELTA_GRPC", "api_type")
        ads.enum("transport_api_version", ("V3",), "V3")
        ads.boolean("set_node_on_first_message_only", True)
        for svc in ads.objects("grpc_services", _grpc_service, required=True, non_empty=True):
            if svc:
                clusters.append(svc)
        ads.finish()
    timeouts: list[float] = []
    for key in ("cds_config", "lds_config"):
        src = r.mapping(key)
        if src is None:
            continue
        a = src.mapping("ads")
        if a is None:
            src.error("only ads: {} config sources are supported", "ads")
        else:
            a.finish()
        src.enum("resource_api_version", ("V3",), "V3")
        if src.has("initial_fetch_timeout"):
            timeouts.append(src.duration("initial_fetch_timeout", _DEFAULT_FETCH_TIMEOUT))
        src.finish()
    keys: tuple[str, ...] = ()
    require = True
    cache_dir: str | None = None
    authority = ""
    m = r.mapping("microenvoy")
    if m is not None:
        keys = m.strings("trusted_keys")
        for i, key in enumerate(keys):
            problem = _key_problem(key)
            if problem:
                m.error(problem, f"trusted_keys[{i}]")
        require = m.boolean("require_signatures", True)
        cache_dir = m.string("cache_dir", "") or None
        authority = m.string("authority", "")
        m.finish()
    if require and not keys:
        r.error(
            "resources must be signed: give microenvoy.trusted_keys (or require_signatures: false for a lab)",
            "microenvoy.trusted_keys",
        )
    r.finish()
    return DynamicResources(
        xds_clusters=tuple(clusters),
        initial_fetch_timeout=max(timeouts) if timeouts else _DEFAULT_FETCH_TIMEOUT,
        trusted_keys=keys,
        require_signatures=require,
        cache_dir=cache_dir,
        authority=authority,
    )


def _grpc_service(r: Reader) -> str:
    g = r.mapping("envoy_grpc")
    name = ""
    if g is None:
        r.error("only envoy_grpc (a static cluster) is supported", "envoy_grpc")
    else:
        name = g.string("cluster_name", required=True)
        g.finish()
    r.ignore("timeout")
    r.finish()
    return name


def _key_problem(key: str) -> str:
    """Empty if ``key`` loads as an Ed25519 public key, else why not."""
    try:
        from microenvoy.xds.cose import load_public_key
    except ImportError:  # the cose module is optional for validation; the runtime needs it
        return ""
    try:
        load_public_key(key)
    except Exception as exc:
        return f"not an Ed25519 public key ({exc})"
    return ""
