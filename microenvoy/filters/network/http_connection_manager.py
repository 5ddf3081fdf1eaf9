"""``envoy.filters.network.http_connection_manager``: its name, type URLs and config parser.

This module only turns the HCM ``typed_config`` (Envoy v3 field names) into a frozen
``microenvoy.config.model.HttpConnectionManager``: route configuration, HTTP filter list (each filter's
typed config parsed by that filter's own module), access logs and limits. It does no I/O and holds no
runtime state: the connection manager that runs exchanges through the filters lives with the fronts
(``microenvoy/io/`` drives the codecs, the filter chain and the router).

Two choices differ from Envoy and are documented in ``docs/configuration.md``:

* an HCM without ``http_filters`` (or with an empty list) gets an implicit ``envoy.filters.http.router``
  (Envoy would have no terminal filter and answer nothing useful); when the list is given, its last entry
  must be the router, as in Envoy;
* ``rds`` is not supported yet: routes come inline in ``route_config``.
"""

from __future__ import annotations

import math
import os
from typing import Any

from microenvoy import extensions
from microenvoy.config.loader import (
    TYPE_PREFIX,
    not_supported,
    parse_data_source,
    parse_extension_config,
    parse_header_matcher,
    parse_header_names,
    parse_header_value_option,
    parse_http2_options,
    parse_regex,
    typed_config_reader,
)
from microenvoy.config.model import (
    AccessLog,
    DirectResponse,
    HeaderValueOption,
    Http2Options,
    HttpConnectionManager,
    HttpFilterConfig,
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)
from microenvoy.config.reader import Reader
from microenvoy.core.errors import ConfigError

__all__ = [
    "CODEC_TYPES",
    "NAME",
    "RETRY_ON",
    "ROUTER",
    "TYPE_URLS",
    "header_lists",
    "implicit_router",
    "parse_access_log",
    "parse_config",
    "parse_http_filters",
    "parse_route_action",
    "parse_route_configuration",
    "parse_route_match",
]

NAME = "envoy.filters.network.http_connection_manager"
TYPE_URLS = (
    TYPE_PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
)
ROUTER = "envoy.filters.http.router"
CODEC_TYPES = ("AUTO", "HTTP1", "HTTP2", "HTTP3")
RETRY_ON = (
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "retriable-status-codes",
    "retriable-4xx",
    "cancelled",
    "deadline-exceeded",
    "resource-exhausted",
    "unavailable",
    "internal",
)
_FILE_LOG = "envoy.access_loggers.file"
_STDOUT_LOG = "envoy.access_loggers.stdout"
_ACCESS_LOG_TYPES = {
    TYPE_PREFIX + "envoy.extensions.access_loggers.file.v3.FileAccessLog": _FILE_LOG,
    TYPE_PREFIX + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog": _STDOUT_LOG,
}
_HeaderLists = tuple[
    tuple[HeaderValueOption, ...], tuple[str, ...], tuple[HeaderValueOption, ...], tuple[str, ...]
]


def parse_config(r: Reader) -> HttpConnectionManager:
    """The HCM ``typed_config`` (without ``@type``) -> ``HttpConnectionManager``; errors go to ``r``."""
    d = HttpConnectionManager(stat_prefix="", route_config=RouteConfiguration())
    codec = r.enum("codec_type", CODEC_TYPES, d.codec_type)
    stat_prefix: str = r.string("stat_prefix", required=True)
    if r.raw.get("stat_prefix") == "":
        r.error("must not be empty", "stat_prefix")
    route_config = RouteConfiguration()
    if r.has("rds"):
        r.ignore("rds", "route_config")
        r.error("not supported yet, use route_config", "rds")
    elif r.has("scoped_routes"):
        r.ignore("scoped_routes", "route_config")
        r.error("not supported yet, use route_config", "scoped_routes")
    else:
        before = len(r.errors)
        route_config = r.object("route_config", parse_route_configuration, required=True) or route_config
        if len(r.errors) == before and r.has("route_config"):
            _compile_routes(route_config, r.sub("route_config"), r.errors)
    http_filters = parse_http_filters(r)
    access_log = r.objects("access_log", parse_access_log)
    stream_idle_timeout = r.duration("stream_idle_timeout", d.stream_idle_timeout)
    request_timeout = r.duration("request_timeout", d.request_timeout)
    idle_timeout, max_headers_count = d.idle_timeout, d.max_headers_count
    c = r.mapping("common_http_protocol_options")
    if c is not None:
        idle_timeout = c.duration("idle_timeout", idle_timeout)
        max_headers_count = c.integer("max_headers_count", max_headers_count, min=1, max=10000)
        not_supported(
            c,
            "max_connection_duration",
            "max_stream_duration",
            "headers_with_underscores_action",
            "max_requests_per_connection",
            "max_response_headers_kb",
        )
        c.finish()
    max_kb = r.integer("max_request_headers_kb", d.max_request_headers_kb, min=1, max=96)
    h2 = r.object("http2_protocol_options", parse_http2_options) or Http2Options()
    r.object("http3_protocol_options", lambda _: None)  # accepted for Envoy configs; no options yet ({})
    tracing = None
    if r.has("tracing"):
        from microenvoy.config.tracing import parse_tracing  # only configs that trace load it

        tracing = r.object("tracing", parse_tracing)
    not_supported(
        r,
        "upgrade_configs",
        "normalize_path",
        "merge_slashes",
        "forward_client_cert_details",
        "set_current_client_cert_details",
        "xff_num_trusted_hops",
        "internal_address_config",
        "local_reply_config",
        "request_id_extension",
        "strip_matching_host_port",
        "path_with_escaped_slashes_action",
        "preserve_external_request_id",
        "drain_timeout",
        "delayed_close_timeout",
        "server_header_transformation",
        "access_log_options",
    )
    return HttpConnectionManager(
        stat_prefix=stat_prefix,
        route_config=route_config,
        codec_type=codec,
        http_filters=http_filters,
        generate_request_id=r.boolean("generate_request_id", d.generate_request_id),
        access_log=access_log,
        stream_idle_timeout=stream_idle_timeout,
        tracing=tracing,
        request_timeout=request_timeout,
        idle_timeout=idle_timeout,
        max_headers_count=max_headers_count,
        max_request_headers_kb=max_kb,
        http2_protocol_options=h2,
        server_name=r.string("server_name", d.server_name),
        use_remote_address=r.boolean("use_remote_address", d.use_remote_address),
        max_request_bytes=r.integer("max_request_bytes", None, min=0),
    )


def _compile_routes(rc: RouteConfiguration, path: str, errors: list[str]) -> None:
    """Compile the route table once so that what only the router checks (header value formatters such
    as an unknown ``%COMMAND%``) is reported at load too, with full paths."""
    try:
        from microenvoy.router.table import RouteTable
    except ImportError:  # the router package is optional for validation; the runtime will need it
        return
    try:
        RouteTable(rc)
    except ConfigError as exc:
        errors.extend(f"{path}.{e}" for e in exc.errors)


# ============================================================================================ HTTP filters
def implicit_router() -> tuple[HttpFilterConfig, ...]:
    """The filter list of a config without ``http_filters``: just the router."""
    module = extensions.http_filter_module(ROUTER)[1]
    return (HttpFilterConfig(name=ROUTER, config=parse_extension_config(module, Reader({}, "", []), ROUTER)),)


def parse_http_filters(r: Reader) -> tuple[HttpFilterConfig, ...]:
    """``http_filters`` (an absent or empty list means just the router)."""
    raw = r.raw.get("http_filters")
    if raw is None or raw == []:
        r.ignore("http_filters")
        implicit = _parse_http_filter(Reader({"name": ROUTER}, r.sub("http_filters"), r.errors))
        return (implicit,) if implicit is not None else ()
    parsed = r.objects("http_filters", _parse_http_filter)
    last = len(parsed) - 1
    for i, f in enumerate(parsed):
        if f is None:
            continue
        where = r.sub(f"http_filters[{i}]")
        if f.name == ROUTER and i != last:
            r.errors.append(f"{where}: {ROUTER} is terminal and must be the last HTTP filter")
        if f.name == ROUTER and f.disabled:
            r.errors.append(f"{where}.disabled: the router cannot be disabled")
    tail = parsed[-1] if parsed else None
    if tail is not None and tail.name != ROUTER and tail.name in extensions.HTTP_FILTERS:
        r.errors.append(
            f"{r.sub(f'http_filters[{last}]')}: the last HTTP filter must be {ROUTER}, got {tail.name!r}"
        )
    return tuple(f for f in parsed if f is not None)


def _parse_http_filter(r: Reader) -> HttpFilterConfig | None:
    """One ``http_filters[]`` entry; None if ``is_optional`` and the extension is not available."""
    name: str = r.string("name", required=True)
    if r.raw.get("name") == "":
        r.error("must not be empty", "name")
    tc, type_url = typed_config_reader(r)
    optional = r.boolean("is_optional")
    disabled = r.boolean("disabled")
    not_supported(r, "config_discovery")
    try:
        ext_name, module = extensions.http_filter_module(name, type_url)
    except KeyError as exc:
        if optional:
            return None
        r.error(str(exc.args[0]), "typed_config.@type" if type_url else "name")
        return HttpFilterConfig(name=name, config=None, disabled=disabled)
    except ImportError as exc:
        if optional:
            return None
        r.error(f"HTTP filter {name!r} is not available in this build ({exc})", "name")
        return HttpFilterConfig(name=name, config=None, disabled=disabled)
    if tc is None:
        tc = Reader({}, r.sub("typed_config"), r.errors)
    config = parse_extension_config(module, tc, ext_name)
    return HttpFilterConfig(name=ext_name, config=config, disabled=disabled)


# ============================================================================================ access logs
def parse_access_log(r: Reader) -> AccessLog:
    name: str = r.string("name", required=True)
    tc, type_url = typed_config_reader(r)
    not_supported(r, "filter")
    kind = _ACCESS_LOG_TYPES.get(type_url or "") or (name if name in (_FILE_LOG, _STDOUT_LOG) else None)
    if kind is None:
        if type_url is not None:
            r.error(
                f"unknown @type {type_url!r} (expected one of {', '.join(_ACCESS_LOG_TYPES)})",
                "typed_config.@type",
            )
        elif name:
            r.error(f"unknown access logger {name!r} (expected {_FILE_LOG} or {_STDOUT_LOG})", "name")
        return AccessLog(name=name)
    path: str | None = None
    json_format: tuple[tuple[str, str], ...] = ()
    text_format: str | None = None
    if tc is None:
        if kind == _FILE_LOG:
            r.error("required field is missing", "typed_config")
        return AccessLog(name=kind)
    if kind == _FILE_LOG:
        path = tc.string("path", None, required=True)
        if path == "":
            tc.error("must not be empty", "path")
        not_supported(tc, "format json_format typed_json_format")
    lf = tc.mapping("log_format")
    if lf is not None:
        which = lf.one_of("json_format", "text_format_source", "text_format")
        lf.ignore("json_format", "text_format_source", "text_format")
        if which == "json_format":
            json_format = _json_format(lf)
        elif which == "text_format_source":
            src = lf.mapping("text_format_source")
            if src is not None:
                text_format = src.string("inline_string", required=True)
                src.finish()
        elif which == "text_format":
            text_format = lf.string("text_format")
        not_supported(
            lf, "typed_json_format", "formatters", "omit_empty_values", "content_type", "json_format_options"
        )
        lf.finish()
    tc.finish()
    return AccessLog(name=kind, path=path, json_format=json_format, text_format=text_format)


def _json_format(lf: Reader) -> tuple[tuple[str, Any], ...]:
    raw = lf.get("json_format")
    if not isinstance(raw, dict) or not raw:
        lf.error("expected a non-empty mapping of field name to format string", "json_format")
        return ()
    value = _json_format_value(lf, raw, "json_format")
    return value if isinstance(value, tuple) else ()


def _json_format_value(lf: Reader, value: Any, where: str) -> Any:
    """A ``json_format`` value: format strings, literals (numbers, booleans, null) and nested mappings (kept
    as tuples of pairs so the config stays hashable)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            lf.error("must be a finite number", where)
        return value
    if isinstance(value, dict):
        return tuple((str(k), _json_format_value(lf, v, f"{where}.{k}")) for k, v in value.items())
    lf.error(
        "expected a format string, a number, a boolean, null or a mapping (lists are not supported)", where
    )
    return None


# ============================================================================================ routes
def parse_route_configuration(r: Reader) -> RouteConfiguration:
    """Envoy's RouteConfiguration (inline ``route_config``; reusable for RDS later)."""
    name: str = r.string("name")
    vhosts = r.objects("virtual_hosts", _parse_virtual_host)
    owner: dict[str, int] = {}
    for i, vh in enumerate(vhosts):
        for j, domain in enumerate(vh.domains):
            if domain in owner:
                r.error(
                    f"domain {domain!r} is already used by virtual_hosts[{owner[domain]}]",
                    f"virtual_hosts[{i}].domains[{j}]",
                )
            else:
                owner[domain] = i
    add, remove, resp_add, resp_remove = header_lists(r)
    r.ignore("validate_clusters")  # accepted: clusters are always validated
    not_supported(
        r,
        "vhds",
        "internal_only_headers",
        "most_specific_header_mutations_wins",
        "typed_per_filter_config",
        "request_mirror_policies",
        "max_direct_response_body_size_bytes",
        "cluster_specifier_plugins",
        "ignore_port_in_host_matching",
    )
    return RouteConfiguration(
        name=name,
        virtual_hosts=vhosts,
        request_headers_to_add=add,
        request_headers_to_remove=remove,
        response_headers_to_add=resp_add,
        response_headers_to_remove=resp_remove,
    )


def header_lists(r: Reader) -> _HeaderLists:
    return (
        r.objects("request_headers_to_add", parse_header_value_option),
        parse_header_names(r, "request_headers_to_remove"),
        r.objects("response_headers_to_add", parse_header_value_option),
        parse_header_names(r, "response_headers_to_remove"),
    )


def _parse_virtual_host(r: Reader) -> VirtualHost:
    name: str = r.string("name", required=True)
    domains = tuple(d.lower() for d in r.strings("domains", required=True))
    if r.has("domains") and isinstance(r.raw.get("domains"), list) and not r.raw["domains"]:
        r.error("must not be empty", "domains")
    for i, domain in enumerate(domains):
        stars = domain.count("*")
        if not domain or (stars and not (stars == 1 and (domain[0] == "*" or domain[-1] == "*"))):
            r.error(
                f"invalid domain {domain!r} (a wildcard '*' may only be a whole prefix or suffix)",
                f"domains[{i}]",
            )
    routes = r.objects("routes", _parse_route)
    add, remove, resp_add, resp_remove = header_lists(r)
    retry = r.object("retry_policy", _parse_retry_policy)
    not_supported(
        r,
        "require_tls",
        "virtual_clusters",
        "rate_limits",
        "cors",
        "typed_per_filter_config",
        "hedge_policy",
        "request_mirror_policies",
        "matcher",
        "include_request_attempt_count",
        "include_attempt_count_in_response",
        "per_request_buffer_limit_bytes",
    )
    return VirtualHost(
        name=name,
        domains=domains,
        routes=routes,
        request_headers_to_add=add,
        request_headers_to_remove=remove,
        response_headers_to_add=resp_add,
        response_headers_to_remove=resp_remove,
        retry_policy=retry,
    )


def _parse_route(r: Reader) -> Route:
    name: str = r.string("name")
    match = r.object("match", parse_route_match, required=True) or RouteMatch(prefix="/")
    not_supported(
        r,
        "redirect",
        "filter_action",
        "non_forwarding_action",
        "typed_per_filter_config",
        "decorator",
        "metadata",
        "tracing",
        "per_request_buffer_limit_bytes",
    )
    action: RouteAction | None = None
    direct: DirectResponse | None = None
    kind = r.one_of("route", "direct_response")
    r.ignore("route", "direct_response")
    if kind == "route":
        action = r.object("route", parse_route_action)
        if action is not None and action.prefix_rewrite is not None and match.safe_regex is not None:
            r.error("cannot be used with a safe_regex match", "route.prefix_rewrite")
    elif kind == "direct_response":
        direct = r.object("direct_response", _parse_direct_response)
    add, remove, resp_add, resp_remove = header_lists(r)
    return Route(
        match=match,
        route=action,
        direct_response=direct,
        name=name,
        request_headers_to_add=add,
        request_headers_to_remove=remove,
        response_headers_to_add=resp_add,
        response_headers_to_remove=resp_remove,
    )


def parse_route_match(r: Reader) -> RouteMatch:
    kind = r.one_of("prefix", "path", "safe_regex")
    r.ignore("prefix", "path", "safe_regex")
    not_supported(
        r,
        "path_separated_prefix",
        "path_match_policy",
        "connect_matcher",
        "query_parameters",
        "runtime_fraction",
        "tls_context",
        "dynamic_metadata",
        "filter_state",
    )
    prefix = path = regex = None
    if kind == "prefix":
        prefix = r.string("prefix")
        if prefix and not prefix.startswith("/"):
            r.error(f"must start with '/', got {prefix!r}", "prefix")
    elif kind == "path":
        path = r.string("path")
        if not path.startswith("/"):
            r.error(f"must start with '/', got {path!r}", "path")
    elif kind == "safe_regex":
        regex = r.object("safe_regex", parse_regex) or ""
    case_sensitive = r.boolean("case_sensitive", True)
    headers = r.objects("headers", parse_header_matcher)
    grpc = r.has("grpc") and r.raw.get("grpc") is not None
    r.object("grpc", lambda _: None)  # `grpc: {}` has no fields
    return RouteMatch(
        prefix=prefix, path=path, safe_regex=regex, case_sensitive=case_sensitive, headers=headers, grpc=grpc
    )


def parse_route_action(r: Reader) -> RouteAction:
    not_supported(
        r,
        "cluster_header",
        "cluster_specifier_plugin",
        "inline_cluster_specifier_plugin",
        "regex_rewrite",
        "path_rewrite_policy",
        "host_rewrite_header",
        "auto_host_rewrite",
        "host_rewrite_path_regex",
        "rate_limits",
        "cors",
        "hedge_policy",
        "upgrade_configs",
        "request_mirror_policies",
        "priority",
        "grpc_timeout_offset",
        "max_stream_duration",
        "internal_redirect_policy",
        "metadata_match",
    )
    kind = r.one_of("cluster", "weighted_clusters")
    r.ignore("cluster", "weighted_clusters")
    cluster: str | None = None
    weighted: tuple[WeightedCluster, ...] = ()
    if kind == "cluster":
        cluster = r.string("cluster")
        if not cluster:
            r.error("must not be empty", "cluster")
    elif kind == "weighted_clusters":
        wc = r.mapping("weighted_clusters")
        if wc is not None:
            weighted = wc.objects("clusters", _parse_weighted_cluster, required=True, non_empty=True)
            if weighted and sum(w.weight for w in weighted) <= 0:
                wc.error("weights must add up to more than 0", "clusters")
            not_supported(wc, "total_weight runtime_key_prefix header_name")
            wc.finish()
    timeout = r.duration("timeout", 15.0)
    prefix_rewrite: str | None = r.string("prefix_rewrite", None)
    host_rewrite: str | None = r.string("host_rewrite_literal", None)
    if host_rewrite == "":
        r.error("must not be empty", "host_rewrite_literal")
    return RouteAction(
        cluster=cluster,
        weighted_clusters=weighted,
        prefix_rewrite=prefix_rewrite,
        host_rewrite_literal=host_rewrite,
        timeout=timeout,
        idle_timeout=r.duration("idle_timeout", None),
        retry_policy=r.object("retry_policy", _parse_retry_policy),
        max_request_bytes=r.integer("max_request_bytes", None, min=0),
        max_grpc_timeout=r.duration("max_grpc_timeout", None),
        hash_policy=_hash_policies(r),
    )


def _hash_policies(r: Reader) -> tuple[Any, ...]:
    if not r.has("hash_policy"):
        return ()
    from microenvoy.config.lb import parse_hash_policies  # only routes that hash load it

    return parse_hash_policies(r)


def _parse_weighted_cluster(r: Reader) -> WeightedCluster:
    name: str = r.string("name", required=True)
    if r.raw.get("name") == "":
        r.error("must not be empty", "name")
    not_supported(
        r,
        "cluster_header",
        "request_headers_to_add",
        "request_headers_to_remove",
        "response_headers_to_add",
        "response_headers_to_remove",
        "typed_per_filter_config",
        "host_rewrite_literal",
        "metadata_match",
    )
    return WeightedCluster(name=name, weight=r.integer("weight", 0, required=True, min=0, max=2**32 - 1))


def _parse_retry_policy(r: Reader) -> RetryPolicy:
    retry_on: list[str] = []
    for cond in (c.strip() for c in r.string("retry_on").split(",")):
        if not cond:
            continue
        if cond not in RETRY_ON:
            r.error(f"unknown retry condition {cond!r} (expected one of {', '.join(RETRY_ON)})", "retry_on")
        elif cond not in retry_on:
            retry_on.append(cond)
    num_retries = r.integer("num_retries", 1, min=0, max=2**32 - 1)
    per_try_timeout = r.duration("per_try_timeout", None)
    base, cap = 0.025, None
    b = r.mapping("retry_back_off")
    if b is not None:
        base = b.duration("base_interval", base, required=True)
        if base <= 0:
            b.error("must be greater than 0", "base_interval")
        cap = b.duration("max_interval", None)
        if cap is not None and cap < base:
            b.error("must not be below base_interval", "max_interval")
        b.finish()
    codes: list[int] = []
    raw_codes = r.get("retriable_status_codes")
    if raw_codes is not None:
        if not isinstance(raw_codes, list):
            r.error("expected a list of status codes", "retriable_status_codes")
        else:
            for i, code in enumerate(raw_codes):
                if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
                    r.error(
                        f"expected an HTTP status code (100-599), got {code!r}",
                        f"retriable_status_codes[{i}]",
                    )
                else:
                    codes.append(code)
    not_supported(
        r,
        "retry_priority",
        "retry_host_predicate",
        "retry_options_predicates",
        "host_selection_retry_max_attempts",
        "retriable_headers",
        "retriable_request_headers",
        "rate_limited_retry_back_off",
        "retry_back_off_strategy",
    )
    return RetryPolicy(
        retry_on=tuple(retry_on),
        num_retries=num_retries,
        per_try_timeout=per_try_timeout,
        base_interval=base,
        max_interval=cap,
        retriable_status_codes=tuple(codes),
    )


def _parse_direct_response(r: Reader) -> DirectResponse:
    status: int = r.integer("status", 200, required=True, min=100, max=599)
    body = b""
    ds = r.object("body", parse_data_source)
    if ds is not None:
        if ds.inline is not None:
            body = ds.inline
        elif ds.filename is not None and os.path.isfile(ds.filename):
            try:
                body = ds.read()
            except OSError as exc:
                r.error(f"cannot read {ds.filename}: {exc.strerror or exc}", "body.filename")
        if len(body) > 4096:
            r.error(f"at most 4096 bytes, got {len(body)}", "body")
    return DirectResponse(status=status, body=body)
