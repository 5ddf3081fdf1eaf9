"""The HTTP route table: virtual host selection and route matching, compiled once per route configuration.

``RouteTable(config)`` validates and precompiles everything (bytes domains and prefixes, regexes, header
matchers, header mutations, weighted cluster pickers) and raises ``ConfigError`` with paths relative to the
route configuration (``virtual_hosts[0].routes[2].match.safe_regex: ...``). ``match(headers)`` then runs per
request without touching the config objects.

**Virtual host selection** (Envoy's ``RouteMatcher::findVirtualHost``), on ``:authority`` (or ``host``)
lower-cased:

1. an exact domain equal to the whole authority (so ``example.com:8080`` can be configured), then the
   authority with its port stripped (``[v6]:port`` handled) in the following steps;
2. an exact domain;
3. the longest suffix wildcard (``*.example.com``, ``*-api.example.com``);
4. the longest prefix wildcard (``api.*``);
5. the ``*`` virtual host.

Wildcards never match an empty string (``*.example.com`` does not match ``.example.com``). A request
without any authority gets the ``*`` virtual host if there is one. Domains must be unique; at most one
virtual host may be ``*``.

**Route matching**: routes of the chosen virtual host are tried in order, the first match wins. ``prefix``,
``path`` and ``safe_regex`` look at ``:path`` without its query string and fragment (Envoy's
``PathMatcher``); ``safe_regex`` must match the whole path; ``case_sensitive: false`` applies to
``prefix`` and ``path`` (not to regexes, as in Envoy). ``headers`` matchers all have to match
(``microenvoy.router.matchers``); ``grpc: {}`` requires a ``content-type`` starting with
``application/grpc``.
"""

from __future__ import annotations

import random as _random
import re
from typing import TYPE_CHECKING, Any

from microenvoy.config.model import RetryPolicy, Route, RouteConfiguration, VirtualHost
from microenvoy.core.errors import ConfigError
from microenvoy.core.exchange import Exchange
from microenvoy.core.headers import Headers
from microenvoy.router.headers import HeaderMutation, levels_in_order, rewrite_host, rewrite_path
from microenvoy.router.matchers import HeadersMatcher, compile_header_matchers
from microenvoy.router.retry import RetryState
from microenvoy.router.weighted import WeightedClusterPicker

if TYPE_CHECKING:
    from microenvoy.router.hash_policy import HashFn

__all__ = ["RouteEntry", "RouteTable", "split_host_port"]

_PREFIX, _PATH, _REGEX = 0, 1, 2
_HOST_CACHE_SIZE = 256


def split_host_port(authority: bytes) -> bytes:
    """``host:port`` -> ``host``; ``[v6]:port`` -> ``[v6]``; anything else unchanged."""
    colon = authority.rfind(b":")
    if colon < 0:
        return authority
    bracket = authority.rfind(b"]")
    if bracket > colon:  # a bare "[v6]" (the colon is inside the brackets)
        return authority
    if authority.count(b":") > 1 and bracket < 0:  # an unbracketed IPv6 literal: no port
        return authority
    port = authority[colon + 1 :]
    if not port.isdigit():
        return authority
    return authority[:colon]


class RouteEntry:
    """A compiled route with everything the router needs after a match."""

    __slots__ = (
        "_host_rewrite",
        "_matched",
        "_picker",
        "_prefix_rewrite",
        "cluster",
        "hash_key",
        "request_mutations",
        "response_mutations",
        "retry_policy",
        "route",
        "virtual_host",
    )

    def __init__(
        self,
        virtual_host: VirtualHost,
        route: Route,
        request_mutations: tuple[HeaderMutation, ...],
        response_mutations: tuple[HeaderMutation, ...],
        matched: bytes | None,
    ) -> None:
        self.virtual_host = virtual_host
        self.route = route
        self.request_mutations = request_mutations
        """Request header levels in application order (route, vhost, route configuration)."""
        self.response_mutations = response_mutations
        action = route.route
        self.cluster: str | None = action.cluster if action is not None else None
        """The single cluster, or None for weighted clusters / direct responses."""
        self._picker = (
            WeightedClusterPicker(action.weighted_clusters)
            if action is not None and action.weighted_clusters
            else None
        )
        self.hash_key: HashFn | None = None
        if action is not None and action.hash_policy:
            from microenvoy.router.hash_policy import compile_hash_policies  # only routes that hash

            self.hash_key = compile_hash_policies(action.hash_policy)
        """``(request headers, source ip) -> int | None`` for hash balancers, from the route's hash_policy."""
        self.retry_policy: RetryPolicy | None = (
            action.retry_policy if action is not None and action.retry_policy else virtual_host.retry_policy
        )
        """The route's retry policy, else the virtual host's (Envoy: the route's replaces the vhost's)."""
        self._matched = matched
        self._prefix_rewrite = (
            action.prefix_rewrite.encode("utf-8")
            if action is not None and action.prefix_rewrite is not None and matched is not None
            else None
        )
        self._host_rewrite = (
            action.host_rewrite_literal.encode("utf-8")
            if action is not None and action.host_rewrite_literal
            else None
        )

    def cluster_name(self, random: _random.Random) -> str | None:
        """The upstream cluster for this request (a weighted pick when configured)."""
        if self._picker is not None:
            return self._picker.pick(random)
        return self.cluster

    def retry_state(self, random: _random.Random) -> RetryState | None:
        return RetryState(self.retry_policy, random) if self.retry_policy is not None else None

    def finalize_request_headers(
        self, headers: Headers, exchange: Exchange, *, insert_original_path: bool = False
    ) -> None:
        """Apply the header levels, then ``host_rewrite_literal``, then ``prefix_rewrite`` (Envoy's order;
        formatters see the original path). ``insert_original_path`` adds ``x-envoy-original-path``."""
        for level in self.request_mutations:
            level.apply(headers, exchange)
        if self._host_rewrite is not None:
            rewrite_host(headers, self._host_rewrite)
        if self._prefix_rewrite is not None and self._matched is not None:
            path = headers.get(b":path")
            if path is not None:
                new = rewrite_path(path, self._matched, self._prefix_rewrite)
                if new != path:
                    if insert_original_path:
                        headers.set(b"x-envoy-original-path", path)
                    headers.set(b":path", new)

    def finalize_response_headers(self, headers: Headers, exchange: Exchange) -> None:
        for level in self.response_mutations:
            level.apply(headers, exchange)

    def __repr__(self) -> str:
        target = self.cluster or ("weighted" if self._picker else "direct_response")
        return f"<RouteEntry vhost={self.virtual_host.name!r} route={self.route.name!r} -> {target}>"


class _Compiled:
    __slots__ = ("case_sensitive", "entry", "grpc", "headers", "kind", "regex", "value")

    def __init__(
        self,
        kind: int,
        value: bytes,
        regex: re.Pattern[bytes] | None,
        case_sensitive: bool,
        headers: HeadersMatcher | None,
        grpc: bool,
        entry: RouteEntry,
    ) -> None:
        self.kind = kind
        self.value = value
        self.regex = regex
        self.case_sensitive = case_sensitive
        self.headers = headers
        self.grpc = grpc
        self.entry = entry


class _Vhost:
    __slots__ = ("routes", "vhost")

    def __init__(self, vhost: VirtualHost, routes: tuple[_Compiled, ...]) -> None:
        self.vhost = vhost
        self.routes = routes


class RouteTable:
    """A compiled ``RouteConfiguration`` (see the module docstring for the matching rules)."""

    __slots__ = ("_default", "_exact", "_host_cache", "_prefixes", "_suffixes", "_vhosts", "config")

    def __init__(
        self, config: RouteConfiguration, *, most_specific_header_mutations_wins: bool = False
    ) -> None:
        self.config = config
        errors: list[str] = []
        cfg_req = self._mutation(config.request_headers_to_add, config.request_headers_to_remove,
                                 "request", "", errors)  # fmt: skip
        cfg_resp = self._mutation(config.response_headers_to_add, config.response_headers_to_remove,
                                  "response", "", errors)  # fmt: skip
        self._exact: dict[bytes, _Vhost] = {}
        suffixes: list[tuple[bytes, _Vhost]] = []
        prefixes: list[tuple[bytes, _Vhost]] = []
        self._default: _Vhost | None = None
        vhosts: list[_Vhost] = []
        seen: dict[str, int] = {}
        for vi, vh in enumerate(config.virtual_hosts):
            vpath = f"virtual_hosts[{vi}]"
            vh_req = self._mutation(vh.request_headers_to_add, vh.request_headers_to_remove, "request",
                                    vpath + ".", errors)  # fmt: skip
            vh_resp = self._mutation(vh.response_headers_to_add, vh.response_headers_to_remove, "response",
                                     vpath + ".", errors)  # fmt: skip
            routes: list[_Compiled] = []
            for ri, route in enumerate(vh.routes):
                compiled = self._compile_route(
                    vh, route, f"{vpath}.routes[{ri}]", errors, (vh_req, cfg_req), (vh_resp, cfg_resp),
                    most_specific_header_mutations_wins,
                )  # fmt: skip
                if compiled is not None:
                    routes.append(compiled)
            cv = _Vhost(vh, tuple(routes))
            vhosts.append(cv)
            if not vh.domains:
                errors.append(f"{vpath}.domains: must not be empty")
            for di, domain in enumerate(vh.domains):
                d = domain.strip().lower()
                where = f"{vpath}.domains[{di}]"
                if not d:
                    errors.append(f"{where}: must not be empty")
                    continue
                if d in seen:
                    errors.append(f"{where}: domain {domain!r} is already used by virtual_hosts[{seen[d]}]")
                    continue
                seen[d] = vi
                if d == "*":
                    self._default = cv
                elif d.startswith("*"):
                    suffixes.append((d[1:].encode("latin-1", "replace"), cv))
                elif d.endswith("*"):
                    prefixes.append((d[:-1].encode("latin-1", "replace"), cv))
                elif "*" in d:
                    errors.append(f"{where}: a wildcard may only be the first or last character")
                else:
                    self._exact[d.encode("latin-1", "replace")] = cv
        if errors:
            raise ConfigError(errors)
        # Longest wildcard first; stable for equal lengths (configuration order).
        self._suffixes = tuple(sorted(suffixes, key=lambda p: -len(p[0])))
        self._prefixes = tuple(sorted(prefixes, key=lambda p: -len(p[0])))
        self._vhosts = tuple(vhosts)
        self._host_cache: dict[bytes, _Vhost | None] = {}

    # -- compilation ---------------------------------------------------------------------------
    @staticmethod
    def _mutation(to_add: Any, to_remove: Any, what: str, path: str, errors: list[str]) -> HeaderMutation:
        try:
            return HeaderMutation(to_add, to_remove, what=what)
        except ValueError as exc:
            errors.append(f"{path}{exc}")
            return HeaderMutation()

    def _compile_route(
        self,
        vh: VirtualHost,
        route: Route,
        path: str,
        errors: list[str],
        req_levels: tuple[HeaderMutation, HeaderMutation],
        resp_levels: tuple[HeaderMutation, HeaderMutation],
        most_specific_wins: bool,
    ) -> _Compiled | None:
        n_errors = len(errors)
        m = route.match
        kinds = [k for k, v in (("prefix", m.prefix), ("path", m.path), ("safe_regex", m.safe_regex))
                 if v is not None]  # fmt: skip
        if len(kinds) != 1:
            errors.append(f"{path}.match: exactly one of prefix, path, safe_regex is required")
            return None
        regex: re.Pattern[bytes] | None = None
        value = b""
        matched: bytes | None = None
        if m.safe_regex is not None:
            kind = _REGEX
            try:
                regex = re.compile(m.safe_regex.encode("utf-8"))
            except re.error as exc:
                errors.append(f"{path}.match.safe_regex: invalid regex: {exc}")
        else:
            kind = _PREFIX if m.prefix is not None else _PATH
            raw = m.prefix if m.prefix is not None else m.path
            assert raw is not None
            value = raw.encode("utf-8")
            matched = value
            if not m.case_sensitive:
                value = value.lower()
        try:
            headers = compile_header_matchers(m.headers)
        except (re.error, ValueError) as exc:
            errors.append(f"{path}.match.headers: {exc}")
            headers = None
        if route.route is None and route.direct_response is None:
            errors.append(f"{path}: one of route, direct_response is required")
        elif route.route is not None and route.direct_response is not None:
            errors.append(f"{path}: only one of route, direct_response may be set")
        action = route.route
        if action is not None:
            if (action.cluster is None) == (not action.weighted_clusters):
                errors.append(f"{path}.route: exactly one of cluster, weighted_clusters is required")
            if action.prefix_rewrite is not None and kind == _REGEX:
                errors.append(f"{path}.route.prefix_rewrite: needs a prefix or path match, not safe_regex")
            if action.weighted_clusters:
                try:
                    WeightedClusterPicker(action.weighted_clusters)
                except ValueError as exc:
                    errors.append(f"{path}.route.{exc}")
            if action.retry_policy is not None:
                try:
                    RetryState(action.retry_policy, _random.Random(0))
                except ValueError as exc:
                    errors.append(f"{path}.route.retry_policy.retry_on: {exc}")
        route_req = self._mutation(route.request_headers_to_add, route.request_headers_to_remove, "request",
                                   path + ".", errors)  # fmt: skip
        route_resp = self._mutation(route.response_headers_to_add, route.response_headers_to_remove,
                                    "response", path + ".", errors)  # fmt: skip
        if len(errors) != n_errors:
            return None
        entry = RouteEntry(
            vh,
            route,
            levels_in_order(route_req, *req_levels, most_specific_wins=most_specific_wins),
            levels_in_order(route_resp, *resp_levels, most_specific_wins=most_specific_wins),
            matched,
        )
        return _Compiled(kind, value, regex, m.case_sensitive, headers, m.grpc, entry)

    # -- matching ------------------------------------------------------------------------------
    def _find_vhost(self, authority: bytes | None) -> _Vhost | None:
        if not authority:
            return self._default
        cache = self._host_cache
        try:
            return cache[authority]
        except KeyError:
            pass
        host = authority.lower()
        found = self._exact.get(host)
        if found is None:
            host = split_host_port(host)
            found = self._exact.get(host)
        if found is None:
            n = len(host)
            for suffix, vh in self._suffixes:
                if len(suffix) < n and host.endswith(suffix):
                    found = vh
                    break
        if found is None:
            n = len(host)
            for prefix, vh in self._prefixes:
                if len(prefix) < n and host.startswith(prefix):
                    found = vh
                    break
        if found is None:
            found = self._default
        if len(cache) >= _HOST_CACHE_SIZE:
            cache.clear()
        cache[authority] = found
        return found

    def match_entry(self, headers: Headers) -> RouteEntry | None:
        """The first matching route of the selected virtual host, compiled; None if nothing matches."""
        authority = headers.get(b":authority")
        if authority is None:
            authority = headers.get(b"host")
        vh = self._find_vhost(authority)
        if vh is None:
            return None
        path = headers.get(b":path") or b""
        q = path.find(b"?")
        if q >= 0:
            path = path[:q]
        f = path.find(b"#")
        if f >= 0:
            path = path[:f]
        lower: bytes | None = None
        is_grpc: bool | None = None
        for r in vh.routes:
            kind = r.kind
            if kind == _REGEX:
                assert r.regex is not None
                if r.regex.fullmatch(path) is None:
                    continue
            else:
                p = path
                if not r.case_sensitive:
                    if lower is None:
                        lower = path.lower()
                    p = lower
                if kind == _PREFIX:
                    if not p.startswith(r.value):
                        continue
                elif p != r.value:
                    continue
            if r.grpc:
                if is_grpc is None:
                    ct = headers.get(b"content-type")
                    is_grpc = ct is not None and ct.startswith(b"application/grpc")
                if not is_grpc:
                    continue
            if r.headers is not None and not r.headers(headers):
                continue
            return r.entry
        return None

    def match(self, headers: Headers) -> tuple[VirtualHost, Route] | None:
        """The ``(virtual host, route)`` config objects of the first match, or None."""
        entry = self.match_entry(headers)
        if entry is None:
            return None
        return entry.virtual_host, entry.route

    def virtual_host_for(self, authority: bytes | None) -> VirtualHost | None:
        """Virtual host selection alone (for tests, admin and protocol fronts without paths)."""
        vh = self._find_vhost(authority)
        return vh.vhost if vh is not None else None

    def __repr__(self) -> str:
        routes = sum(len(v.routes) for v in self._vhosts)
        return f"<RouteTable {self.config.name!r} vhosts={len(self._vhosts)} routes={routes}>"
