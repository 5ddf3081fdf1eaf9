"""Route ``hash_policy``: turn a request into the 64-bit key consistent-hash balancers look up (sans-IO).

Envoy's algorithm (``HashPolicyImpl::generateHash``): the policies are evaluated in order; each one that finds
its input yields a 64-bit hash, folded into the running value as ``hash = rotl1(hash) ^ new`` (the rotation
keeps two identical policies from cancelling out); a ``terminal`` policy stops the walk once a hash exists
(produced by it or by an earlier policy). If nothing produced a hash the result is ``None`` and the
balancer picks at random.

Inputs, as Envoy reads them:

- ``header``: every value of the header, sorted (so the order of repeated headers does not matter). One value
  hashes as itself; several are joined with NUL before hashing (NUL cannot occur in a field value, so
  ``["ab", "c"]`` and ``["a", "bc"]`` differ). Any header works, pseudo-headers and the exchange metadata
  headers (``x-microenvoy-mqtt-client-id`` ...) included.
- ``connection_properties.source_ip``: the downstream IP address text (no port).
- ``query_parameter``: the first value of that parameter in ``:path``'s query string, not decoded
  (``?a`` alone gives the empty value, which is hashed).

The hash function is 64-bit BLAKE2b (``hashlib.blake2b(digest_size=8)``, little-endian): in the stdlib, in C,
stable across processes and Python versions (unlike ``hash()``), and well mixed. Envoy uses xxHash64, so
keys do not land on the same hosts as in Envoy; they are consistent among microenvoy agents.

Policies are compiled once into a tuple of small closures (``compile_hash_policies``); ``compute_hash``
keeps the compiled form per policy tuple, so the per-request cost is the header scan plus one BLAKE2b call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

try:  # the C module itself: importing hashlib would also load OpenSSL's _hashlib (~1.5 MiB resident)
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - CPython builds without _blake2
    from hashlib import blake2b

from microenvoy.config.lb import HashPolicy
from microenvoy.core.headers import Headers

__all__ = ["HashFn", "compile_hash_policies", "compute_hash", "hash64"]

_MASK = (1 << 64) - 1

HashFn = Callable[[Headers, "str | None"], "int | None"]
"""A compiled policy list: ``(request headers, source ip) -> 64-bit key or None``."""

_Method = Callable[[Headers, "str | None"], "int | None"]


_BLAKE2B_64 = blake2b(digest_size=8)


def hash64(data: bytes) -> int:
    """The 64-bit hash of request keys and ring points: BLAKE2b with an 8-byte digest, read little-endian.

    Copying a prepared hash object is cheaper than constructing one with keyword arguments.
    """
    h = _BLAKE2B_64.copy()
    h.update(data)
    return int.from_bytes(h.digest(), "little")


def _header_method(name: bytes) -> _Method:
    def evaluate(headers: Headers, source_ip: str | None) -> int | None:
        values = [v for k, v in headers.items() if k == name]  # faster than a loop with early exits
        if not values:
            return None
        if len(values) == 1:
            return hash64(values[0])
        values.sort()
        return hash64(b"\0".join(values))

    return evaluate


def _source_ip_method(headers: Headers, source_ip: str | None) -> int | None:
    if not source_ip:
        return None
    return hash64(source_ip.encode())


def _query_method(name: bytes) -> _Method:
    key = name + b"="

    def evaluate(headers: Headers, source_ip: str | None) -> int | None:
        path = headers.get(b":path")
        if path is None:
            return None
        q = path.find(b"?")
        if q < 0:
            return None
        end = path.find(b"#", q)
        query = path[q + 1 :] if end < 0 else path[q + 1 : end]
        for part in query.split(b"&"):
            if part == name:
                return hash64(b"")
            if part.startswith(key):
                return hash64(part[len(key) :])
        return None

    return evaluate


def _method(policy: HashPolicy) -> _Method | None:
    if policy.header is not None:
        return _header_method(policy.header.header_name.lower().encode("latin-1"))
    if policy.connection_properties is not None and policy.connection_properties.source_ip:
        return _source_ip_method
    if policy.query_parameter is not None:
        return _query_method(policy.query_parameter.name.encode("latin-1"))
    return None  # connection_properties with source_ip false: Envoy adds no method for it


def compile_hash_policies(policies: Sequence[HashPolicy]) -> HashFn:
    """Build the per-request hash function for a route's policy list."""
    methods: tuple[tuple[_Method, bool], ...] = tuple(
        (m, p.terminal) for p in policies if (m := _method(p)) is not None
    )
    if len(methods) == 1:  # the common case: one policy, nothing to fold
        only = methods[0][0]
        return only

    def compute(headers: Headers, source_ip: str | None) -> int | None:
        result: int | None = None
        for method, terminal in methods:
            new = method(headers, source_ip)
            if new is not None:
                result = new if result is None else (((result << 1) | (result >> 63)) & _MASK) ^ new
            if terminal and result is not None:
                break
        return result

    return compute


_cache: dict[int, tuple[Sequence[HashPolicy], HashFn]] = {}


def compute_hash(policies: Sequence[HashPolicy], headers: Headers, source_ip: str | None) -> int | None:
    """The request's hash key for ``policies`` (a route's ``hash_policy``), or None when no policy applied.

    The compiled form is cached by the identity of ``policies`` (routes hold their tuple for their lifetime),
    so calling this per request costs one dict lookup on top of the evaluation.
    """
    if not policies:
        return None
    entry = _cache.get(id(policies))
    if entry is None or entry[0] is not policies:
        if len(_cache) >= 1024:  # config reloads leave old tuples behind: bound the cache
            _cache.clear()
        entry = (policies, compile_hash_policies(policies))
        _cache[id(policies)] = entry
    return entry[1](headers, source_ip)
