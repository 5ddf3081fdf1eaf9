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
        identity:                                        # node identity: mTLS to the control plane
          dir: /var/lib/microenvoy/identity              # key + certificate (written by the agent)
          bootstrap_token_file: /etc/microenvoy/token    # one-time token for the first certificate
          enrollment_cluster: xds_enroll                 # the CP's enrollment port (TLS, no client cert)
          ca_file: /etc/microenvoy/cp-ca.pem             # the issued certificate must chain to it
          renew_before: 28800s                           # renew this long before expiry (8 h)

The runtime is ``microenvoy.io.xds``; the protocol is in docs/control-plane.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from microenvoy.config.reader import Reader

__all__ = ["DynamicResources", "IdentityConfig", "parse_dynamic_resources", "parse_identity"]

_DEFAULT_FETCH_TIMEOUT = 15.0
_DEFAULT_RENEW_BEFORE = 8 * 3600.0


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """``dynamic_resources.microenvoy.identity``: the agent's certificate from the control plane's CA
    (``microenvoy.io.xds_identity``); the xDS clusters present it as their client certificate."""

    dir: str
    """Directory of ``identity.pem`` (key + certificate, 0600), ``cert.pem`` and ``ca.pem``."""
    bootstrap_token_file: str | None = None
    """File holding the one-time bootstrap token (``controlplane-lite token``) for the first certificate."""
    enrollment_cluster: str = ""
    """Static cluster (TLS, HTTP/2, no client certificate) of the control plane's enrollment port; default:
    the first xDS cluster (only works with a control plane that does not require client certificates)."""
    ca_file: str | None = None
    """The control plane's CA (PEM): an issued certificate that does not chain to it is refused."""
    renew_before: float = _DEFAULT_RENEW_BEFORE
    """Renew this long before the certificate expires (at most half its lifetime); default 8 h."""


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
    identity: IdentityConfig | None = None
    """Node identity (``microenvoy.identity``); None = the xDS clusters' TLS config as written."""


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
    identity: IdentityConfig | None = None
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
        identity = m.object("identity", parse_identity)
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
        identity=identity,
    )


def parse_identity(r: Reader) -> IdentityConfig:
    """``microenvoy.identity`` (relative paths are anchored at the config file's directory)."""
    from microenvoy.config.loader import resolve_path

    directory = r.string("dir", required=True)
    token = r.string("bootstrap_token_file", "") or None
    ca = r.string("ca_file", "") or None
    renew = r.duration("renew_before", _DEFAULT_RENEW_BEFORE)
    if renew is not None and renew <= 0:
        r.error("must be greater than 0", "renew_before")
    enrollment = r.string("enrollment_cluster", "")
    r.finish()
    return IdentityConfig(
        dir=resolve_path(directory) if directory else "",
        bootstrap_token_file=resolve_path(token) if token else None,
        enrollment_cluster=enrollment,
        ca_file=resolve_path(ca) if ca else None,
        renew_before=renew if renew is not None and renew > 0 else _DEFAULT_RENEW_BEFORE,
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
