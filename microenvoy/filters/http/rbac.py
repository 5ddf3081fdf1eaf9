"""``envoy.filters.http.rbac``: Envoy's role based access control on request headers and the downstream
connection.

``rules`` has an ``action`` and named ``policies``; a policy matches when *any* of its ``permissions`` and
*any* of its ``principals`` match. ``ALLOW``: the request passes only if some policy matches; ``DENY``: it
is rejected if some policy matches; ``LOG``: it always passes (``logged``/``not_logged`` are counted and
``access_log_hint`` set). Without ``rules`` nothing is enforced. Policies are evaluated in name order (as
Envoy's map); the first matching name is the "effective policy". ``shadow_rules`` are evaluated the same
way but only counted and recorded in the exchange's metadata (``envoy.filters.http.rbac``:
``shadow_effective_policy_id``, ``shadow_engine_result``).

Permissions: ``any``, ``header`` (HeaderMatcher, e.g. ``:method``), ``url_path.path`` (StringMatcher on the
path without query), ``destination_port``, ``destination_ip`` (CIDR of the local address),
``requested_server_name`` (SNI), ``and_rules``/``or_rules``/``not_rule``.

Principals: ``any``, ``authenticated.principal_name`` (StringMatcher against the verified TLS peer's SANs;
without ``principal_name`` any verified peer certificate), ``direct_remote_ip`` / ``remote_ip`` /
``source_ip`` (CIDR of the downstream address; microenvoy has no PROXY protocol or trusted XFF hops, so all
three see the connection's peer), ``header``, ``url_path``, ``and_ids``/``or_ids``/``not_id``.

Matching only looks at the request headers and ``Exchange.downstream`` (``DownstreamInfo``), so the same
policies work for every front (HTTP, MQTT, CoAP).

A denied request gets a local 403 ``RBAC: access denied`` with response flag ``RBAC`` and details
``rbac_access_denied_matched_policy[<name>|none]``. Stats (in the front's scope, as Envoy names them):
``http.<stat_prefix>.rbac.<rules_stat_prefix>{allowed,denied,logged,not_logged}`` and
``http.<stat_prefix>.rbac.<shadow_rules_stat_prefix>{shadow_allowed,shadow_denied}``.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from microenvoy.config.model import HeaderMatcher, StringMatcher
from microenvoy.config.reader import Reader
from microenvoy.core.exchange import DownstreamInfo, ResponseFlag
from microenvoy.core.filter import FactoryContext, FilterCallbacks, FilterStatus, HttpFilter
from microenvoy.core.headers import Headers
from microenvoy.router.matchers import (
    compile_header_matcher,
    compile_string_matcher,
    parse_header_matcher,
    parse_string_matcher,
)

__all__ = [
    "NAME",
    "TYPE_URLS",
    "CidrRange",
    "Permission",
    "Policy",
    "Principal",
    "RbacConfig",
    "RbacEngine",
    "RbacFactory",
    "RbacFilter",
    "Rules",
    "make_factory",
    "parse_config",
]

NAME = "envoy.filters.http.rbac"
TYPE_URLS = ("type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",)

ACTIONS = ("ALLOW", "DENY", "LOG")
METADATA_KEY = "envoy.filters.http.rbac"


# --------------------------------------------------------------------------------------- config
@dataclass(frozen=True, slots=True)
class CidrRange:
    address_prefix: str
    prefix_len: int


@dataclass(frozen=True, slots=True)
class Permission:
    kind: str
    """``any``, ``header``, ``url_path``, ``destination_port``, ``destination_ip``,
    ``requested_server_name``, ``and_rules``, ``or_rules``, ``not_rule``."""
    header: HeaderMatcher | None = None
    matcher: StringMatcher | None = None
    """``url_path.path`` or ``requested_server_name``."""
    port: int = 0
    cidr: CidrRange | None = None
    rules: tuple[Permission, ...] = ()
    """Children of and/or (one for ``not_rule``)."""


@dataclass(frozen=True, slots=True)
class Principal:
    kind: str
    """``any``, ``authenticated``, ``direct_remote_ip``, ``remote_ip``, ``source_ip``, ``header``,
    ``url_path``, ``and_ids``, ``or_ids``, ``not_id``."""
    header: HeaderMatcher | None = None
    matcher: StringMatcher | None = None
    """``authenticated.principal_name`` (None: any verified peer) or ``url_path.path``."""
    cidr: CidrRange | None = None
    ids: tuple[Principal, ...] = ()


@dataclass(frozen=True, slots=True)
class Policy:
    permissions: tuple[Permission, ...]
    principals: tuple[Principal, ...]


@dataclass(frozen=True, slots=True)
class Rules:
    action: str
    policies: tuple[tuple[str, Policy], ...]
    """Sorted by name (Envoy keeps policies in a sorted map)."""


@dataclass(frozen=True, slots=True)
class RbacConfig:
    rules: Rules | None = None
    shadow_rules: Rules | None = None
    rules_stat_prefix: str = ""
    shadow_rules_stat_prefix: str = ""


# -------------------------------------------------------------------------------------- parsing
_PERMISSION_KINDS = (
    "any",
    "header",
    "url_path",
    "destination_port",
    "destination_ip",
    "requested_server_name",
    "and_rules",
    "or_rules",
    "not_rule",
)
_PERMISSION_UNSUPPORTED = (
    "metadata",
    "matcher",
    "destination_port_range",
    "uri_template",
    "sourced_metadata",
)
_PRINCIPAL_KINDS = (
    "any",
    "authenticated",
    "direct_remote_ip",
    "remote_ip",
    "source_ip",
    "header",
    "url_path",
    "and_ids",
    "or_ids",
    "not_id",
)
_PRINCIPAL_UNSUPPORTED = ("metadata", "filter_state", "sourced_metadata", "custom")


def _parse_cidr(r: Reader) -> CidrRange:
    prefix = r.string("address_prefix", required=True)
    length = r.integer("prefix_len", 0, min=0, max=128)
    if prefix:
        try:
            address = ipaddress.ip_address(prefix)
        except ValueError:
            r.error(f"not an IPv4 or IPv6 address: {prefix!r}", "address_prefix")
        else:
            limit = 32 if address.version == 4 else 128
            if length > limit:
                r.error(f"must be <= {limit} for an IPv{address.version} prefix, got {length}", "prefix_len")
                length = limit
    return CidrRange(prefix, length)


def _parse_url_path(r: Reader) -> StringMatcher:
    m = r.object("path", parse_string_matcher, required=True)
    return m if m is not None else StringMatcher("exact", "")


def _one_of(r: Reader, kinds: tuple[str, ...], unsupported: tuple[str, ...]) -> str | None:
    for k in unsupported:
        if r.has(k):
            r.get(k)
            r.error("not supported by microenvoy", k)
    kind = r.one_of(*kinds, *unsupported)
    r.ignore(*kinds, *unsupported)  # a second kind was already reported by one_of
    return kind if kind in kinds else None


def _parse_any(r: Reader) -> None:
    if r.get("any") is not True:
        r.error("must be true", "any")


def _parse_permission(r: Reader) -> Permission:
    kind = _one_of(r, _PERMISSION_KINDS, _PERMISSION_UNSUPPORTED)
    if kind is None:
        return Permission("any")
    if kind == "any":
        _parse_any(r)
        return Permission("any")
    if kind == "header":
        return Permission("header", header=r.object("header", parse_header_matcher))
    if kind == "url_path":
        return Permission("url_path", matcher=r.object("url_path", _parse_url_path))
    if kind == "requested_server_name":
        return Permission(kind, matcher=r.object(kind, parse_string_matcher))
    if kind == "destination_port":
        return Permission(kind, port=r.integer(kind, 0, min=0, max=65535))
    if kind == "destination_ip":
        return Permission(kind, cidr=r.object(kind, _parse_cidr))
    if kind == "not_rule":
        child = r.object(kind, _parse_permission)
        return Permission(kind, rules=(child,) if child is not None else ())
    sub = r.mapping(kind)
    rules: tuple[Permission, ...] = ()
    if sub is not None:
        rules = sub.objects("rules", _parse_permission, required=True, non_empty=True)
        sub.finish()
    return Permission(kind, rules=rules)


def _parse_authenticated(r: Reader) -> StringMatcher | None:
    return r.object("principal_name", parse_string_matcher)


def _parse_principal(r: Reader) -> Principal:
    kind = _one_of(r, _PRINCIPAL_KINDS, _PRINCIPAL_UNSUPPORTED)
    if kind is None:
        return Principal("any")
    if kind == "any":
        _parse_any(r)
        return Principal("any")
    if kind == "authenticated":
        sub = r.mapping(kind)
        matcher = None
        if sub is not None:
            matcher = _parse_authenticated(sub)
            sub.finish()
        return Principal(kind, matcher=matcher)
    if kind in ("direct_remote_ip", "remote_ip", "source_ip"):
        return Principal(kind, cidr=r.object(kind, _parse_cidr))
    if kind == "header":
        return Principal(kind, header=r.object(kind, parse_header_matcher))
    if kind == "url_path":
        return Principal(kind, matcher=r.object(kind, _parse_url_path))
    if kind == "not_id":
        child = r.object(kind, _parse_principal)
        return Principal(kind, ids=(child,) if child is not None else ())
    sub = r.mapping(kind)
    ids: tuple[Principal, ...] = ()
    if sub is not None:
        ids = sub.objects("ids", _parse_principal, required=True, non_empty=True)
        sub.finish()
    return Principal(kind, ids=ids)


def _parse_policy(r: Reader) -> Policy:
    permissions = r.objects("permissions", _parse_permission, required=True, non_empty=True)
    principals = r.objects("principals", _parse_principal, required=True, non_empty=True)
    for unsupported in ("condition", "checked_condition"):
        if r.has(unsupported):
            r.get(unsupported)
            r.error("not supported by microenvoy", unsupported)
    return Policy(permissions, principals)


def _parse_rules(r: Reader) -> Rules:
    action = r.enum("action", ACTIONS, "ALLOW")
    policies: list[tuple[str, Policy]] = []
    pr = r.mapping("policies")
    if pr is not None:
        for name in sorted(pr.raw):
            policy = pr.object(name, _parse_policy, required=True)
            if policy is not None:
                policies.append((name, policy))
        pr.finish()
    return Rules(action, tuple(policies))


def parse_config(r: Reader) -> RbacConfig:
    for unsupported in ("matcher", "shadow_matcher", "track_per_rule_stats"):
        if r.has(unsupported):
            r.get(unsupported)
            r.error("not supported by microenvoy", unsupported)
    return RbacConfig(
        rules=r.object("rules", _parse_rules),
        shadow_rules=r.object("shadow_rules", _parse_rules),
        rules_stat_prefix=r.string("rules_stat_prefix"),
        shadow_rules_stat_prefix=r.string("shadow_rules_stat_prefix"),
    )


# ------------------------------------------------------------------------------------- matching
_Match = Callable[[Headers, DownstreamInfo], bool]


@functools.lru_cache(maxsize=1024)
def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _cidr_match(cidr: CidrRange | None, local: bool) -> _Match:
    if cidr is None:
        return lambda h, d: False
    net = ipaddress.ip_network(f"{cidr.address_prefix}/{cidr.prefix_len}", strict=False)

    def match(h: Headers, d: DownstreamInfo) -> bool:
        ip = _ip((d.local_address if local else d.remote_address)[0])
        return ip is not None and ip.version == net.version and ip in net

    return match


def _path(h: Headers) -> bytes:
    path = h.get(b":path") or b""
    for sep in (b"?", b"#"):
        i = path.find(sep)
        if i >= 0:
            path = path[:i]
    return path


def _path_match(m: StringMatcher | None) -> _Match:
    if m is None:
        return lambda h, d: False
    sm = compile_string_matcher(m)
    return lambda h, d: sm(_path(h))


def _header_match(m: HeaderMatcher | None) -> _Match:
    if m is None:
        return lambda h, d: False
    hm = compile_header_matcher(m)
    return lambda h, d: hm(h)


def _compile_permission(p: Permission) -> _Match:
    kind = p.kind
    if kind == "any":
        return lambda h, d: True
    if kind == "header":
        return _header_match(p.header)
    if kind == "url_path":
        return _path_match(p.matcher)
    if kind == "requested_server_name":
        if p.matcher is None:
            return lambda h, d: False
        sni = compile_string_matcher(p.matcher)
        return lambda h, d: sni((d.sni or "").encode("latin-1", "replace"))
    if kind == "destination_port":
        port = p.port
        return lambda h, d: d.local_address[1] == port
    if kind == "destination_ip":
        return _cidr_match(p.cidr, local=True)
    children = tuple(_compile_permission(c) for c in p.rules)
    if kind == "and_rules":
        return lambda h, d: all(c(h, d) for c in children)
    if kind == "or_rules":
        return lambda h, d: any(c(h, d) for c in children)
    if kind == "not_rule" and children:
        child = children[0]
        return lambda h, d: not child(h, d)
    raise ValueError(f"unknown permission kind {kind!r}")


def _compile_principal(p: Principal) -> _Match:
    kind = p.kind
    if kind == "any":
        return lambda h, d: True
    if kind == "authenticated":
        if p.matcher is None:
            return lambda h, d: bool(d.peer_sans)
        name = compile_string_matcher(p.matcher)
        return lambda h, d: any(name(san.encode("utf-8", "replace")) for san in d.peer_sans)
    if kind in ("direct_remote_ip", "remote_ip", "source_ip"):
        return _cidr_match(p.cidr, local=False)
    if kind == "header":
        return _header_match(p.header)
    if kind == "url_path":
        return _path_match(p.matcher)
    children = tuple(_compile_principal(c) for c in p.ids)
    if kind == "and_ids":
        return lambda h, d: all(c(h, d) for c in children)
    if kind == "or_ids":
        return lambda h, d: any(c(h, d) for c in children)
    if kind == "not_id" and children:
        child = children[0]
        return lambda h, d: not child(h, d)
    raise ValueError(f"unknown principal kind {kind!r}")


class RbacEngine:
    """Compiled ``Rules``: ``evaluate(headers, downstream) -> (allowed, effective policy name or None)``."""

    __slots__ = ("_policies", "action")

    def __init__(self, rules: Rules) -> None:
        self.action = rules.action
        self._policies = tuple(
            (
                name,
                tuple(_compile_permission(p) for p in policy.permissions),
                tuple(_compile_principal(p) for p in policy.principals),
            )
            for name, policy in rules.policies
        )

    def matched_policy(self, headers: Headers, downstream: DownstreamInfo) -> str | None:
        for name, permissions, principals in self._policies:
            if any(p(headers, downstream) for p in permissions) and any(
                p(headers, downstream) for p in principals
            ):
                return name
        return None

    def evaluate(self, headers: Headers, downstream: DownstreamInfo) -> tuple[bool, str | None]:
        name = self.matched_policy(headers, downstream)
        if self.action == "ALLOW":
            return name is not None, name
        if self.action == "DENY":
            return name is None, name
        return True, name  # LOG

    def __repr__(self) -> str:
        return f"<RbacEngine {self.action} policies={len(self._policies)}>"


# --------------------------------------------------------------------------------------- filter
class RbacFactory:
    __slots__ = (
        "_allowed",
        "_denied",
        "_logged",
        "_not_logged",
        "_shadow_allowed",
        "_shadow_denied",
        "config",
        "engine",
        "name",
        "shadow_engine",
    )

    def __init__(self, config: RbacConfig, ctx: FactoryContext) -> None:
        self.name = NAME
        self.config = config
        self.engine = RbacEngine(config.rules) if config.rules is not None else None
        self.shadow_engine = RbacEngine(config.shadow_rules) if config.shadow_rules is not None else None
        scope = ctx.stats.scope("rbac.")
        p = config.rules_stat_prefix
        self._allowed = scope.counter(p + "allowed")
        self._denied = scope.counter(p + "denied")
        self._logged = scope.counter(p + "logged")
        self._not_logged = scope.counter(p + "not_logged")
        sp = config.shadow_rules_stat_prefix
        self._shadow_allowed = scope.counter(sp + "shadow_allowed")
        self._shadow_denied = scope.counter(sp + "shadow_denied")

    def create(self, callbacks: FilterCallbacks) -> HttpFilter:
        return RbacFilter(callbacks, self)

    def admin_state(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"<RbacFactory engine={self.engine!r} shadow={self.shadow_engine!r}>"


class RbacFilter(HttpFilter):
    __slots__ = ("_factory",)

    def __init__(self, callbacks: FilterCallbacks, factory: RbacFactory) -> None:
        super().__init__(callbacks)
        self._factory = factory

    def decode_headers(self, headers: Headers, end_stream: bool) -> FilterStatus:
        f = self._factory
        exchange = self.callbacks.exchange
        downstream = exchange.downstream
        if f.shadow_engine is not None:
            allowed, name = f.shadow_engine.evaluate(headers, downstream)
            (f._shadow_allowed if allowed else f._shadow_denied).inc()
            meta = exchange.metadata.setdefault(METADATA_KEY, {})
            if name is not None:
                meta["shadow_effective_policy_id"] = name
            meta["shadow_engine_result"] = "allowed" if allowed else "denied"
        engine = f.engine
        if engine is None:
            return FilterStatus.CONTINUE
        allowed, name = engine.evaluate(headers, downstream)
        if engine.action == "LOG":
            (f._logged if name is not None else f._not_logged).inc()
            exchange.metadata.setdefault(METADATA_KEY, {})["access_log_hint"] = name is not None
            return FilterStatus.CONTINUE
        if allowed:
            f._allowed.inc()
            return FilterStatus.CONTINUE
        f._denied.inc()
        self.callbacks.send_local_reply(
            403,
            b"RBAC: access denied",
            details=f"rbac_access_denied_matched_policy[{name or 'none'}]",
            flag=ResponseFlag.RBAC_DENIED,
        )
        return FilterStatus.STOP

    def __repr__(self) -> str:
        return f"<RbacFilter {self._factory.engine!r}>"


def make_factory(config: RbacConfig, ctx: FactoryContext) -> RbacFactory:
    return RbacFactory(config, ctx)
