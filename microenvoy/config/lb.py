"""Load-balancing config: a cluster's ``common_lb_config`` / ``*_lb_config`` and a route's ``hash_policy``.

``parse_cluster_lb(cluster_reader, lb_policy)`` reads the cluster-level keys Envoy v3 puts beside
``lb_policy`` (``common_lb_config``, ``ring_hash_lb_config``, ``maglev_lb_config``,
``least_request_lb_config``) into one frozen ``LbConfig``; a policy-specific block given for another policy is
an error, as in Envoy. ``parse_hash_policies(route_action_reader)`` reads ``route.hash_policy[]``.

Both report every bad field with its path through the ``Reader`` and return a best-effort value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from microenvoy.config.reader import Reader

__all__ = [
    "MAX_MAGLEV_TABLE_SIZE",
    "MAX_RING_SIZE",
    "ConnectionPropertiesHash",
    "HashPolicy",
    "HeaderHash",
    "LbConfig",
    "LeastRequestLbConfig",
    "MaglevLbConfig",
    "QueryParameterHash",
    "RingHashLbConfig",
    "is_prime",
    "parse_cluster_lb",
    "parse_hash_policies",
]

MAX_RING_SIZE = 8388608
"""Envoy's upper bound for ``minimum_ring_size`` and ``maximum_ring_size`` (8M entries)."""
MAX_MAGLEV_TABLE_SIZE = 5000011
"""Envoy's upper bound for ``maglev_lb_config.table_size`` (a prime)."""


@dataclass(frozen=True, slots=True)
class RingHashLbConfig:
    """``ring_hash_lb_config``."""

    minimum_ring_size: int = 1024
    """The ring has at least this many entries (more entries: better spread, bigger table)."""
    maximum_ring_size: int = MAX_RING_SIZE
    """Cap on the ring size (skewed weights could otherwise ask for a huge ring)."""
    hash_function: str = "XX_HASH"
    """Only the default is accepted; microenvoy's ring hash is 64-bit BLAKE2b (see docs/load-balancing.md)."""


@dataclass(frozen=True, slots=True)
class MaglevLbConfig:
    """``maglev_lb_config``."""

    table_size: int = 65537
    """Lookup table size; a prime number. Larger tables follow the weights more closely."""


@dataclass(frozen=True, slots=True)
class LeastRequestLbConfig:
    """``least_request_lb_config``."""

    choice_count: int = 2
    """Hosts sampled per pick when all weights are equal (power of two choices)."""
    active_request_bias: float = 1.0
    """With unequal weights: effective weight = weight / (active_requests + 1) ** bias (0: plain weights)."""


@dataclass(frozen=True, slots=True)
class LbConfig:
    """Everything a cluster's load balancer is configured with (besides ``lb_policy`` itself)."""

    healthy_panic_threshold: float = 50.0
    """``common_lb_config.healthy_panic_threshold`` in percent: below this share of available hosts the
    balancer uses all hosts (panic). 0 disables panic mode."""
    ring_hash_lb_config: RingHashLbConfig = field(default_factory=RingHashLbConfig)
    """Used when ``lb_policy`` is ``RING_HASH``."""
    maglev_lb_config: MaglevLbConfig = field(default_factory=MaglevLbConfig)
    """Used when ``lb_policy`` is ``MAGLEV``."""
    least_request_lb_config: LeastRequestLbConfig = field(default_factory=LeastRequestLbConfig)
    """Used when ``lb_policy`` is ``LEAST_REQUEST``."""


# ------------------------------------------------------------------------------------- hash policies
@dataclass(frozen=True, slots=True)
class HeaderHash:
    """``hash_policy[].header``: hash the value(s) of one request header (metadata headers included)."""

    header_name: str
    """Lower-cased at load; may be a pseudo-header (``:authority``) or ``x-microenvoy-*`` metadata."""


@dataclass(frozen=True, slots=True)
class ConnectionPropertiesHash:
    """``hash_policy[].connection_properties``."""

    source_ip: bool = False
    """Hash the downstream client's IP address (without port)."""


@dataclass(frozen=True, slots=True)
class QueryParameterHash:
    """``hash_policy[].query_parameter``: hash the first value of a query parameter of ``:path``."""

    name: str
    """Parameter name, matched exactly (case-sensitive, not percent-decoded), as Envoy does."""


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """One ``route.hash_policy[]`` entry; exactly one of ``header``/``connection_properties``/
    ``query_parameter`` is set."""

    header: HeaderHash | None = None
    connection_properties: ConnectionPropertiesHash | None = None
    query_parameter: QueryParameterHash | None = None
    terminal: bool = False
    """Stop evaluating further policies once a hash has been produced (by this or an earlier policy)."""


_COMMON_NOT_SUPPORTED = (
    "zone_aware_lb_config",
    "locality_weighted_lb_config",
    "update_merge_window",
    "ignore_new_hosts_until_first_hc",
    "close_connections_on_host_set_change",
    "consistent_hashing_lb_config",
    "override_host_status",
)
_POLICY_BLOCKS = {
    "ring_hash_lb_config": "RING_HASH",
    "maglev_lb_config": "MAGLEV",
    "least_request_lb_config": "LEAST_REQUEST",
}


def is_prime(n: int) -> bool:
    """Deterministic trial division (table sizes are at most a few million: ~1100 divisions)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def _not_supported(r: Reader, *keys: str) -> None:
    for key in keys:
        if r.has(key):
            r.ignore(key)
            r.error("not supported yet", key)


def _percent(r: Reader, key: str, default: float) -> float:
    """Envoy's ``type.v3.Percent`` (``{value: 50}``); a bare number is accepted too."""
    raw = r.raw.get(key)
    if isinstance(raw, dict):
        sub = r.mapping(key)
        assert sub is not None
        value: float = sub.number("value", default)
        sub.finish()
        where = sub.sub("value")
    else:
        value = r.number(key, default)
        where = r.sub(key)
    if not 0.0 <= value <= 100.0:
        r.errors.append(f"{where}: must be between 0 and 100, got {value:g}")
        return default
    return value


def _parse_common(r: Reader) -> float:
    threshold = _percent(r, "healthy_panic_threshold", 50.0)
    _not_supported(r, *_COMMON_NOT_SUPPORTED)
    return threshold


def _parse_ring_hash(r: Reader) -> RingHashLbConfig:
    lo: int = r.integer("minimum_ring_size", 1024, min=1, max=MAX_RING_SIZE)
    hi: int = r.integer("maximum_ring_size", MAX_RING_SIZE, min=1, max=MAX_RING_SIZE)
    if r.raw.get("hash_function") == "MURMUR_HASH_2":
        r.ignore("hash_function")
        r.error("MURMUR_HASH_2 is not supported yet (use XX_HASH)", "hash_function")
        fn = "XX_HASH"
    else:
        fn = r.enum("hash_function", ("XX_HASH",), "XX_HASH")
    if lo > hi:
        r.error(f"must not exceed maximum_ring_size ({hi}), got {lo}", "minimum_ring_size")
        lo = hi
    return RingHashLbConfig(minimum_ring_size=lo, maximum_ring_size=hi, hash_function=fn)


def _parse_maglev(r: Reader) -> MaglevLbConfig:
    size: int = r.integer("table_size", 65537, min=2, max=MAX_MAGLEV_TABLE_SIZE)
    if not is_prime(size):
        r.error(f"must be a prime number, got {size}", "table_size")
        size = 65537
    return MaglevLbConfig(table_size=size)


def _parse_least_request(r: Reader) -> LeastRequestLbConfig:
    count: int = r.integer("choice_count", 2, min=2, max=100)
    bias = 1.0
    raw = r.raw.get("active_request_bias")
    if isinstance(raw, dict):  # config.core.v3.RuntimeDouble {default_value, runtime_key}
        sub = r.mapping("active_request_bias")
        assert sub is not None
        bias = sub.number("default_value", 1.0, min=0.0)
        sub.string("runtime_key")  # accepted; microenvoy has no runtime layer
        sub.finish()
    else:
        bias = r.number("active_request_bias", 1.0, min=0.0)
    _not_supported(r, "slow_start_config", "enable_full_scan", "selection_method")
    return LeastRequestLbConfig(choice_count=count, active_request_bias=bias)


def parse_cluster_lb(r: Reader, lb_policy: str) -> LbConfig:
    """Read the load-balancing blocks from a *cluster's* Reader (the lead calls this from the cluster
    parser, after ``lb_policy`` was read). Does not call ``r.finish()``: the cluster parser does."""
    threshold = 50.0
    common = r.mapping("common_lb_config")
    if common is not None:
        threshold = _parse_common(common)
        common.finish()
    for key, policy in _POLICY_BLOCKS.items():
        if r.has(key) and lb_policy != policy:
            r.error(f"only valid with lb_policy {policy} (lb_policy is {lb_policy})", key)
    ring = r.object("ring_hash_lb_config", _parse_ring_hash) or RingHashLbConfig()
    maglev = r.object("maglev_lb_config", _parse_maglev) or MaglevLbConfig()
    least = r.object("least_request_lb_config", _parse_least_request) or LeastRequestLbConfig()
    return LbConfig(
        healthy_panic_threshold=threshold,
        ring_hash_lb_config=ring,
        maglev_lb_config=maglev,
        least_request_lb_config=least,
    )


def _parse_header_hash(r: Reader) -> HeaderHash:
    name: str = r.string("header_name", required=True)
    if r.has("header_name") and not name:
        r.error("must not be empty", "header_name")
    _not_supported(r, "regex_rewrite")
    return HeaderHash(header_name=name.lower())


def _parse_connection_properties(r: Reader) -> ConnectionPropertiesHash:
    return ConnectionPropertiesHash(source_ip=r.boolean("source_ip"))


def _parse_query_parameter(r: Reader) -> QueryParameterHash:
    name: str = r.string("name", required=True)
    if r.has("name") and not name:
        r.error("must not be empty", "name")
    return QueryParameterHash(name=name)


def _parse_hash_policy(r: Reader) -> HashPolicy:
    _not_supported(r, "cookie", "filter_state")
    kind = r.one_of("header", "connection_properties", "query_parameter", required=not (
        r.has("cookie") or r.has("filter_state")))  # fmt: skip
    terminal = r.boolean("terminal")
    header = cp = qp = None
    if kind == "header":
        header = r.object("header", _parse_header_hash)
    elif kind == "connection_properties":
        cp = r.object("connection_properties", _parse_connection_properties)
    elif kind == "query_parameter":
        qp = r.object("query_parameter", _parse_query_parameter)
    r.ignore("header", "connection_properties", "query_parameter")  # the ones one_of rejected
    return HashPolicy(header=header, connection_properties=cp, query_parameter=qp, terminal=terminal)


def parse_hash_policies(r: Reader, key: str = "hash_policy") -> tuple[HashPolicy, ...]:
    """``route.hash_policy[]`` from a RouteAction's Reader (``finish()`` of each entry is done here)."""
    return r.objects(key, _parse_hash_policy)
