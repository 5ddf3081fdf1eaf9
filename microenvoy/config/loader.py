"""The bootstrap loader: a YAML/JSON document -> a validated, frozen ``Bootstrap`` (``config.model``).

Theory of operation
-------------------
``parse_bootstrap(doc)`` walks the document with ``Reader``s, so every problem is collected as
``path: message`` (``static_resources.clusters[1].lb_policy: unknown value 'ROUND_ROBBIN' ...``) and the
walk goes on after an error: one run reports everything. Network and HTTP filters are extensions, resolved
through ``microenvoy.extensions`` by ``@type`` (else by name) and parsed by their own ``parse_config``.
When the tree is built, ``cross_check`` verifies what no single field can: unique names, routes naming
existing clusters, QUIC listeners having what QUIC needs, ``advertise_http3`` naming a UDP listener.
Only if the error list is empty is a ``Bootstrap`` returned; otherwise ``ConfigError(errors)`` is raised,
so a bad config never half-applies.

Relative ``filename``s (certificates, keys, ``retry_token_key_file``) are resolved against the directory
of the config file (``load_bootstrap``) or the ``base_dir`` given to ``parse_bootstrap``; the stored
model holds the resolved path. (Envoy resolves them against its working directory.)

The ``parse_*`` helpers below are public so that extensions (the HTTP connection manager, RBAC, ...)
parse Envoy's common messages (DataSource, StringMatcher, HeaderMatcher, ...) the same way.

This module reads files (the config, and checks that referenced files exist) but does no network I/O.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import copy
import dataclasses
import ipaddress
import json
import os
import re
from collections.abc import Hashable, Iterator, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

import yaml

from microenvoy import extensions
from microenvoy.config.model import (
    Admin,
    AdvertiseHttp3,
    Bootstrap,
    Cluster,
    CommonTlsContext,
    DataSource,
    DownstreamTlsContext,
    Endpoint,
    FilterChain,
    HeaderMatcher,
    HeaderValueOption,
    Http2Options,
    HttpConnectionManager,
    Listener,
    NetworkFilterConfig,
    Node,
    QuicOptions,
    RetryBudget,
    RouteConfiguration,
    SocketAddress,
    StaticResources,
    StringMatcher,
    Thresholds,
    TlsCertificate,
    UpstreamTlsContext,
)
from microenvoy.config.reader import Reader
from microenvoy.core.errors import ConfigError

if TYPE_CHECKING:
    from microenvoy.config.health_check import HealthCheck
    from microenvoy.config.lb import LbConfig
    from microenvoy.config.outlier import OutlierDetection

__all__ = [
    "TYPE_PREFIX",
    "StrictYamlLoader",
    "cross_check",
    "load_bootstrap",
    "not_supported",
    "parse_bootstrap",
    "parse_data_source",
    "parse_extension_config",
    "parse_header_matcher",
    "parse_header_name",
    "parse_header_names",
    "parse_header_value_option",
    "parse_http2_options",
    "parse_regex",
    "parse_resource",
    "parse_socket_address",
    "parse_string_matcher",
    "resolve_path",
    "typed_config_reader",
]

TYPE_PREFIX = "type.googleapis.com/"
TLS_SOCKET = "envoy.transport_sockets.tls"
QUIC_SOCKET = "envoy.transport_sockets.quic"
COAP_PROXY = "microenvoy.filters.network.coap_proxy"
DOWNSTREAM_TLS_TYPE = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS_TYPE = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
QUIC_TRANSPORT_TYPE = TYPE_PREFIX + "envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport"
HTTP_PROTOCOL_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_PROTOCOL_OPTIONS_TYPE = TYPE_PREFIX + HTTP_PROTOCOL_OPTIONS_KEY
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
TLS_INSPECTOR_TYPE = TYPE_PREFIX + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"

_CLUSTER_TYPES = ("STATIC", "STRICT_DNS")
_LB_KEYS = ("common_lb_config", "ring_hash_lb_config", "maglev_lb_config", "least_request_lb_config")
_LB_POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV")
_DNS_FAMILIES = ("AUTO", "V4_ONLY", "V6_ONLY", "V4_PREFERRED", "ALL")
_TLS_VERSIONS = ("TLS_AUTO", "TLSv1_2", "TLSv1_3")
_SAN_TYPES = ("DNS", "URI", "IP_ADDRESS", "EMAIL")
_STRING_MATCH_KINDS = ("exact", "prefix", "suffix", "contains", "safe_regex")
_HEADER_MATCH_KEYS = (
    "string_match",
    "exact_match",
    "prefix_match",
    "suffix_match",
    "contains_match",
    "safe_regex_match",
    "present_match",
)
_APPEND_ACTIONS = (
    "APPEND_IF_EXISTS_OR_ADD",
    "ADD_IF_ABSENT",
    "OVERWRITE_IF_EXISTS_OR_ADD",
    "OVERWRITE_IF_EXISTS",
)
_HEADER_TOKEN = re.compile(r"^:?[!#$%&'*+\-.^_`|~0-9a-z]+$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?$")
_U32 = 2**32 - 1
_I31 = 2**31 - 1

_base_dir: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "microenvoy_config_base_dir", default=None
)


# ============================================================================================ entry points
def load_bootstrap(path: str) -> Bootstrap:
    """Read, parse and validate the bootstrap file at ``path`` (YAML, or JSON when it ends in ``.json``).

    Raises ``ConfigError``: a file that cannot be read or parsed gives one error naming the file and line
    (``edge.yaml:12:5: ...``); a document that parses gives every validation error with its path.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})"]) from None
    doc = _parse_json(text, path) if path.lower().endswith(".json") else _parse_yaml(text, path)
    return parse_bootstrap(doc, base_dir=os.path.dirname(os.path.abspath(path)))


def parse_bootstrap(doc: object, *, base_dir: str | None = None) -> Bootstrap:
    """Validate an already-parsed document (mappings, lists, scalars) into a ``Bootstrap``.

    ``base_dir`` anchors relative file names (default: the working directory). Raises ``ConfigError``
    carrying every problem as ``path: message``. ``Bootstrap.raw`` keeps a deep copy of ``doc``.
    """
    errors: list[str] = []
    token = _base_dir.set(base_dir)
    try:
        r = Reader(doc, "", errors)
        node = r.object("node", _parse_node) or Node()
        admin = r.object("admin", _parse_admin) or Admin()
        static = r.object("static_resources", _parse_static_resources) or StaticResources()
        if any(c.mqtt_broker is not None for c in static.clusters):
            from microenvoy.config.mqtt_cluster import with_node_id

            static = dataclasses.replace(static, clusters=with_node_id(static.clusters, node.id))
        dynamic = None
        if r.has("dynamic_resources"):
            from microenvoy.config.xds import parse_dynamic_resources

            dynamic = r.object("dynamic_resources", parse_dynamic_resources)
        not_supported(r, "layered_runtime overload_manager stats_sinks")
        r.finish()
        raw: dict[str, Any] = copy.deepcopy(dict(doc)) if isinstance(doc, Mapping) else {}
        bootstrap = Bootstrap(
            node=node, admin=admin, static_resources=static, dynamic_resources=dynamic, raw=raw
        )
        errors.extend(cross_check(bootstrap))
    finally:
        _base_dir.reset(token)
    if errors:
        raise ConfigError(list(dict.fromkeys(errors)))  # an error reported twice is shown once
    return bootstrap


def parse_resource(kind: str, doc: object, *, base_dir: str | None = None) -> Any:
    """One ``Cluster`` or ``Listener`` (``kind``: ``cluster`` / ``listener``) parsed on its own, as it would
    be inside ``static_resources``; raises ``ConfigError`` with paths relative to the resource. Cross checks
    between resources are ``cross_check``'s (the control-plane client composes and checks the whole)."""
    errors: list[str] = []
    token = _base_dir.set(base_dir)
    try:
        r = Reader(doc, "", errors)
        value: Any = _parse_cluster(r) if kind == "cluster" else _parse_listener(r)
        r.finish()
    finally:
        _base_dir.reset(token)
    if errors:
        raise ConfigError([e.lstrip(".") for e in dict.fromkeys(errors)])
    return value


# ============================================================================================ file parsing
class StrictYamlLoader(yaml.SafeLoader):
    """``SafeLoader`` that rejects duplicate keys in a mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key_node.value!r}",
                    key_node.start_mark,
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, path: str) -> object:
    try:
        return yaml.load(text, Loader=StrictYamlLoader)  # a SafeLoader subclass: safe
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        raise ConfigError([f"{where}: invalid YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: invalid YAML: nested too deeply"]) from None


def _parse_json(text: str, path: str) -> object:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from None
    except ValueError as exc:
        raise ConfigError([f"{path}: invalid JSON: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: invalid JSON: nested too deeply"]) from None


# ============================================================================================ shared helpers
def resolve_path(filename: str) -> str:
    """``filename`` anchored at the config file's directory when relative (see the module docstring)."""
    base = _base_dir.get()
    if base is None or os.path.isabs(filename):
        return filename
    return os.path.normpath(os.path.join(base, filename))


def not_supported(r: Reader, *keys: str) -> None:
    """Envoy fields we know but do not implement: a clear error instead of "unknown field".

    Each argument may hold several space-separated field names.
    """
    for key in " ".join(keys).split():
        if r.has(key):
            r.ignore(key)
            r.error("not supported yet", key)


def _non_empty(r: Reader, key: str, value: str) -> str:
    if r.raw.get(key) == "":
        r.error("must not be empty", key)
    return value


def parse_data_source(r: Reader) -> DataSource:
    """Envoy's DataSource: exactly one of ``filename`` (must exist), ``inline_string``, ``inline_bytes``."""
    not_supported(r, "environment_variable")
    kind = r.one_of("filename", "inline_string", "inline_bytes")
    r.ignore("filename", "inline_string", "inline_bytes")
    if kind == "filename":
        name = _non_empty(r, "filename", r.string("filename"))
        if not name:
            return DataSource(inline=b"")
        path = resolve_path(name)
        if not os.path.isfile(path):
            r.error(f"file not found: {path}", "filename")
        return DataSource(filename=path)
    if kind == "inline_string":
        return DataSource(inline=r.string("inline_string").encode("utf-8"))
    if kind == "inline_bytes":
        text = r.string("inline_bytes")
        try:
            return DataSource(inline=base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            r.error("expected base64 data", "inline_bytes")
    return DataSource(inline=b"")


def parse_regex(r: Reader) -> str:
    """Envoy's RegexMatcher ``{regex}``; compiled with Python's ``re`` to report syntax errors."""
    r.ignore("google_re2")  # Envoy's deprecated engine selector: accepted, nothing to configure
    regex: str = r.string("regex", required=True)
    try:
        re.compile(regex)
    except re.error as exc:
        r.error(f"invalid regex: {exc}", "regex")
    return regex


def parse_string_matcher(r: Reader) -> StringMatcher:
    """Envoy's StringMatcher: one of exact/prefix/suffix/contains/safe_regex, plus ``ignore_case``."""
    kind = r.one_of(*_STRING_MATCH_KINDS)
    r.ignore(*_STRING_MATCH_KINDS)
    ignore_case = r.boolean("ignore_case")
    if kind is None:
        return StringMatcher("exact", "", ignore_case)
    if kind == "safe_regex":
        if ignore_case:
            r.error("ignore_case has no effect on safe_regex; use (?i) in the regex", "ignore_case")
        return StringMatcher("safe_regex", r.object("safe_regex", parse_regex) or "", False)
    return StringMatcher(kind, r.string(kind), ignore_case)


def parse_header_name(r: Reader, key: str, value: str, *, allow_pseudo: bool) -> str:
    """Validate a header name read from ``key`` and return it lower-cased."""
    name = value.lower()
    if isinstance(r.raw.get(key), str):
        if not name:
            r.error("must not be empty", key)
        elif not _HEADER_TOKEN.match(name):
            r.error(f"invalid header name {value!r}", key)
        elif name.startswith(":") and not allow_pseudo:
            r.error(f"pseudo-header {value!r} cannot be set or removed here", key)
    return name


def parse_header_matcher(r: Reader) -> HeaderMatcher:
    """Envoy's HeaderMatcher. With no match specifier the header must be present (``present_match``)."""
    name = parse_header_name(r, "name", r.string("name", required=True), allow_pseudo=True)
    invert = r.boolean("invert_match")
    kind = r.one_of(*_HEADER_MATCH_KEYS, required=False)
    r.ignore(*_HEADER_MATCH_KEYS)
    not_supported(r, "range_match treat_missing_header_as_empty")
    if kind == "string_match":
        sm = r.object("string_match", parse_string_matcher)
        return HeaderMatcher(name, string_match=sm, invert_match=invert)
    if kind == "safe_regex_match":
        regex = r.object("safe_regex_match", parse_regex) or ""
        return HeaderMatcher(name, string_match=StringMatcher("safe_regex", regex), invert_match=invert)
    if kind == "present_match":
        return HeaderMatcher(name, present_match=r.boolean("present_match"), invert_match=invert)
    if kind is not None:  # exact_match, prefix_match, suffix_match, contains_match (legacy forms)
        sm = StringMatcher(kind.removesuffix("_match"), r.string(kind))
        return HeaderMatcher(name, string_match=sm, invert_match=invert)
    return HeaderMatcher(name, present_match=True, invert_match=invert)


def parse_header_value_option(r: Reader) -> HeaderValueOption:
    """``{header: {key, value}, append_action | append}`` of ``*_headers_to_add``."""
    key, value = "", ""
    h = r.mapping("header", required=True)
    if h is not None:
        key = parse_header_name(h, "key", h.string("key", required=True), allow_pseudo=False)
        value = h.string("value")
        not_supported(h, "raw_value")
        h.finish()
    action = r.enum("append_action", _APPEND_ACTIONS, "APPEND_IF_EXISTS_OR_ADD")
    if r.has("append"):
        if r.has("append_action"):
            r.error("set append_action or the legacy append, not both", "append")
        elif not r.boolean("append", True):
            action = "OVERWRITE_IF_EXISTS_OR_ADD"
    r.ignore("append", "keep_empty_value")
    return HeaderValueOption(key, value, action)


def parse_header_names(r: Reader, key: str) -> tuple[str, ...]:
    """``*_headers_to_remove``: lower-cased names; pseudo-headers and ``host`` cannot be removed."""
    out: list[str] = []
    for i, name in enumerate(r.strings(key)):
        where = f"{key}[{i}]"
        low = name.lower()
        if not low or not _HEADER_TOKEN.match(low):
            r.error(f"invalid header name {name!r}", where)
        elif low.startswith(":") or low == "host":
            r.error(f"{name!r} cannot be removed", where)
        out.append(low)
    return tuple(out)


def parse_http2_options(r: Reader) -> Http2Options:
    """Envoy's Http2ProtocolOptions subset (bounds as Envoy's)."""
    d = Http2Options()
    return Http2Options(
        max_concurrent_streams=r.integer("max_concurrent_streams", d.max_concurrent_streams, min=1, max=_I31),
        initial_stream_window_size=r.integer(
            "initial_stream_window_size", d.initial_stream_window_size, min=65535, max=_I31
        ),
        initial_connection_window_size=r.integer(
            "initial_connection_window_size", d.initial_connection_window_size, min=65535, max=_I31
        ),
    )


def parse_socket_address(
    r: Reader, *, ip_only: bool = True, port_zero: bool = True, protocols: tuple[str, ...] = ("TCP", "UDP")
) -> SocketAddress:
    """Envoy's SocketAddress ``{address, port_value, protocol}``."""
    address: str = r.string("address", required=True)
    port: int = r.integer("port_value", 0, required=True, min=0 if port_zero else 1, max=65535)
    protocol: str = r.enum("protocol", protocols, "TCP")
    not_supported(r, "named_port resolver_name ipv4_compat")
    if address:
        if ip_only and not _is_ip(address):
            r.error(f"expected an IP address, got {address!r}", "address")
        elif not ip_only and not (_is_ip(address) or _HOSTNAME.match(address)):
            r.error(f"expected an IP address or a DNS name, got {address!r}", "address")
    elif r.raw.get("address") == "":
        r.error("must not be empty", "address")
    return SocketAddress(address, port, protocol)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _address(r: Reader, key: str, **kw: Any) -> SocketAddress:
    """``{key}: {socket_address: {...}}`` (Envoy's Address)."""
    a = r.mapping(key, required=True)
    if a is None:
        return SocketAddress("", 0)
    not_supported(a, "pipe envoy_internal_address")
    sa = a.object("socket_address", lambda x: parse_socket_address(x, **kw), required=True)
    a.finish()
    return sa or SocketAddress("", 0)


def parse_extension_config(module: ModuleType, r: Reader, label: str) -> Any:
    """Run an extension's ``parse_config`` on ``r`` (a typed_config without ``@type``); never raises.

    Errors the extension raises as ``ConfigError`` join the error list; any other exception becomes one
    error naming the extension, so a buggy extension cannot crash ``microenvoy validate``.
    """
    try:
        config = module.parse_config(r)
    except ConfigError as exc:
        r.errors.extend(exc.errors)
        config = None
    except Exception as exc:  # an extension's own bug must still give a readable config error
        r.error(f"{label} could not parse its config ({type(exc).__name__}: {exc})")
        config = None
    r.finish()
    return config


def typed_config_reader(r: Reader, key: str = "typed_config") -> tuple[Reader | None, str | None]:
    """The ``typed_config`` at ``key`` as a Reader without ``@type``, and the ``@type`` value."""
    raw = r.get(key)
    if raw is None:
        return None, None
    if not isinstance(raw, Mapping):
        return Reader(raw, r.sub(key), r.errors), None  # reports "expected a mapping"
    type_url = raw.get("@type")
    if type_url is None:
        r.error("required field is missing", f"{key}.@type")
    elif not isinstance(type_url, str):
        r.error("expected a string", f"{key}.@type")
        type_url = None
    rest = {k: v for k, v in raw.items() if k != "@type"}
    return Reader(rest, r.sub(key), r.errors), type_url


def _check_type(r: Reader, key: str, got: str | None, expected: str) -> None:
    if got is not None and got != expected:
        r.error(f"expected {expected!r}, got {got!r}", f"{key}.@type")


# ============================================================================================ bootstrap parts
def _parse_node(r: Reader) -> Node:
    metadata = r.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, Mapping):
        r.error("expected a mapping", "metadata")
        metadata = {}
    return Node(id=r.string("id"), cluster=r.string("cluster"), metadata=copy.deepcopy(dict(metadata)))


def _parse_admin(r: Reader) -> Admin:
    address = Admin().address
    if r.has("address"):
        address = _address(r, "address", protocols=("TCP",))
    return Admin(address=address, access_log_path=r.string("access_log_path", None))


def _parse_static_resources(r: Reader) -> StaticResources:
    listeners = r.objects("listeners", _parse_listener)
    clusters = r.objects("clusters", _parse_cluster)
    not_supported(r, "secrets")
    return StaticResources(listeners=listeners, clusters=clusters)


# ============================================================================================ TLS
def _parse_tls_certificate(r: Reader) -> TlsCertificate:
    not_supported(r, "password ocsp_staple private_key_provider watched_directory")
    chain = r.object("certificate_chain", parse_data_source, required=True)
    key = r.object("private_key", parse_data_source, required=True)
    return TlsCertificate(chain or DataSource(inline=b""), key or DataSource(inline=b""))


def _parse_typed_san(r: Reader) -> StringMatcher:
    r.enum("san_type", _SAN_TYPES, required=True)
    not_supported(r, "oid")
    return r.object("matcher", parse_string_matcher, required=True) or StringMatcher("exact", "")


def _parse_common_tls(r: Reader) -> CommonTlsContext:
    not_supported(
        r,
        "tls_certificate_sds_secret_configs",
        "validation_context_sds_secret_config",
        "combined_validation_context",
    )
    certs = r.objects("tls_certificates", _parse_tls_certificate)
    alpn = r.strings("alpn_protocols")
    for i, proto in enumerate(alpn):
        if not proto or len(proto) > 255:
            r.error("must be 1 to 255 characters", f"alpn_protocols[{i}]")
    trusted_ca: DataSource | None = None
    sans: tuple[StringMatcher, ...] = ()
    v = r.mapping("validation_context")
    if v is not None:
        trusted_ca = v.object("trusted_ca", parse_data_source)
        typed = v.objects("match_typed_subject_alt_names", _parse_typed_san)
        legacy = v.objects("match_subject_alt_names", parse_string_matcher)
        if typed and legacy:
            v.error("set match_typed_subject_alt_names or match_subject_alt_names, not both")
        sans = typed + legacy
        if sans and trusted_ca is None:
            v.error("subject alt name matching needs trusted_ca", "trusted_ca")
        v.finish()
    lo, hi = "TLSv1_2", "TLSv1_3"
    p = r.mapping("tls_params")
    if p is not None:
        versions = []
        for key in ("tls_minimum_protocol_version", "tls_maximum_protocol_version"):
            if p.raw.get(key) in ("TLSv1_0", "TLSv1_1"):
                p.ignore(key)
                p.error(f"{p.raw[key]} is not supported (TLS 1.2 is the minimum)", key)
                versions.append("TLS_AUTO")
            else:
                versions.append(p.enum(key, _TLS_VERSIONS, "TLS_AUTO"))
        lo, hi = versions
        lo = "TLSv1_2" if lo == "TLS_AUTO" else lo
        hi = "TLSv1_3" if hi == "TLS_AUTO" else hi
        if lo > hi:  # "TLSv1_2" < "TLSv1_3"
            p.error(f"tls_minimum_protocol_version {lo} is above tls_maximum_protocol_version {hi}")
        not_supported(p, "cipher_suites ecdh_curves signature_algorithms")
        p.finish()
    return CommonTlsContext(
        tls_certificates=certs,
        alpn_protocols=alpn,
        trusted_ca=trusted_ca,
        match_subject_alt_names=sans,
        tls_minimum_protocol_version=lo,
        tls_maximum_protocol_version=hi,
    )


def _parse_downstream_tls(r: Reader) -> DownstreamTlsContext:
    not_supported(
        r,
        "session_ticket_keys",
        "session_ticket_keys_sds_secret_config",
        "require_sni",
        "ocsp_staple_policy",
        "full_scan_certs_on_sni_mismatch",
    )
    common = r.object("common_tls_context", _parse_common_tls, required=True) or CommonTlsContext()
    require = r.boolean("require_client_certificate")
    if r.has("common_tls_context") and not common.tls_certificates:
        r.error("a downstream TLS context needs a certificate", "common_tls_context.tls_certificates")
    if require and common.trusted_ca is None:
        r.error(
            "require_client_certificate needs common_tls_context.validation_context.trusted_ca",
            "require_client_certificate",
        )
    return DownstreamTlsContext(common, require)


def _parse_upstream_tls(r: Reader) -> UpstreamTlsContext:
    not_supported(r, "allow_renegotiation max_session_keys enforce_rsa_key_usage")
    common = r.object("common_tls_context", _parse_common_tls) or CommonTlsContext()
    if len(common.tls_certificates) > 1:
        r.error("at most one client certificate", "common_tls_context.tls_certificates")
    sni: str = r.string("sni")
    if sni and not _HOSTNAME.match(sni):
        r.error(f"expected a DNS name, got {sni!r}", "sni")
    return UpstreamTlsContext(common, sni)


def _downstream_transport_socket(r: Reader, udp: bool) -> DownstreamTlsContext | None:
    name: str = r.string("name", required=True)
    expected = QUIC_SOCKET if udp else TLS_SOCKET
    if name and name != expected:
        kind = "UDP (QUIC)" if udp else "TCP"
        r.error(f"expected {expected!r} on a {kind} listener, got {name!r}", "name")
    tc, type_url = typed_config_reader(r)
    if tc is None:
        r.error("required field is missing", "typed_config")
        return None
    if udp:
        _check_type(r, "typed_config", type_url, QUIC_TRANSPORT_TYPE)
        not_supported(tc, "enable_early_data")
        ctx = tc.object("downstream_tls_context", _parse_downstream_tls, required=True)
    else:
        _check_type(r, "typed_config", type_url, DOWNSTREAM_TLS_TYPE)
        ctx = _parse_downstream_tls(tc)
    tc.finish()
    return ctx


def _upstream_transport_socket(r: Reader) -> UpstreamTlsContext | None:
    name: str = r.string("name", required=True)
    if name and name != TLS_SOCKET:
        r.error(f"expected {TLS_SOCKET!r}, got {name!r}", "name")
    tc, type_url = typed_config_reader(r)
    if tc is None:
        r.error("required field is missing", "typed_config")
        return None
    _check_type(r, "typed_config", type_url, UPSTREAM_TLS_TYPE)
    ctx = _parse_upstream_tls(tc)
    tc.finish()
    return ctx


# ============================================================================================ listeners
def _parse_listener(r: Reader) -> Listener:
    name = _non_empty(r, "name", r.string("name", required=True))
    address = _address(r, "address")
    udp = address.protocol == "UDP"
    quic: QuicOptions | None = None
    u = r.mapping("udp_listener_config")
    if u is not None:
        quic = u.object("quic_options", _parse_quic_options)
        if quic is None and u.has("quic_options"):  # `quic_options:` with no value = all defaults
            quic = QuicOptions()
        not_supported(u, "downstream_socket_config udp_packet_packet_writer_config")
        u.finish()
        if not udp:
            r.error(
                "only valid on a UDP listener (address.socket_address.protocol: UDP)", "udp_listener_config"
            )
    _listener_filters(r)
    chains = r.objects("filter_chains", lambda x: _parse_filter_chain(x, udp), required=True, non_empty=True)
    not_supported(
        r,
        "default_filter_chain",
        "filter_chain_matcher",
        "additional_addresses",
        "use_original_dst",
        "connection_balance_config",
        "reuse_port",
        "enable_reuse_port",
    )
    limit = r.integer("per_connection_buffer_limit_bytes", 1048576, min=1, max=_U32)
    max_connections = r.integer("max_connections", None, min=1)
    advertise = r.object("advertise_http3", _parse_advertise_http3)
    drain = r.duration("drain_timeout", 5.0)
    return Listener(
        name=name,
        address=address,
        filter_chains=chains,
        quic_options=quic,
        per_connection_buffer_limit_bytes=limit,
        max_connections=max_connections,
        advertise_http3=advertise,
        drain_timeout=drain,
    )


def _listener_filters(r: Reader) -> None:
    """Only ``envoy.filters.listener.tls_inspector`` is accepted: a no-op, SNI/ALPN are always inspected."""

    def one(x: Reader) -> None:
        name = x.string("name", required=True)
        tc, type_url = typed_config_reader(x)
        if type_url is not None:
            _check_type(x, "typed_config", type_url, TLS_INSPECTOR_TYPE)
        elif name and name != TLS_INSPECTOR:
            x.error(f"only {TLS_INSPECTOR} is supported", "name")
        if tc is not None:
            tc.finish()

    r.objects("listener_filters", one)


def _parse_quic_options(r: Reader) -> QuicOptions:
    d = QuicOptions()
    streams, stream_window, conn_window = (
        d.max_concurrent_streams,
        d.initial_stream_window_size,
        d.initial_connection_window_size,
    )
    q = r.mapping("quic_protocol_options")
    if q is not None:
        streams = q.integer("max_concurrent_streams", streams, min=1, max=_I31)
        stream_window = q.integer("initial_stream_window_size", stream_window, min=1, max=16777216)
        conn_window = q.integer("initial_connection_window_size", conn_window, min=1, max=25165824)
        q.finish()
    idle = r.duration("idle_timeout", d.idle_timeout)
    if idle <= 0:
        r.error("must be greater than 0", "idle_timeout")
    key_file: str | None = r.string("retry_token_key_file", None)
    if key_file is not None:
        key_file = resolve_path(key_file) if key_file else key_file
        parent = os.path.dirname(key_file) or "."
        if not key_file:
            r.error("must not be empty", "retry_token_key_file")
        elif not os.path.isdir(parent):
            r.error(f"directory not found: {parent}", "retry_token_key_file")
    lifetime = r.duration("session_ticket_lifetime", d.session_ticket_lifetime)
    if not 0 < lifetime <= 604800:
        r.error("must be greater than 0 and at most 7 days (RFC 8446)", "session_ticket_lifetime")
    not_supported(
        r,
        "crypto_handshake_timeout",
        "enabled",
        "packets_to_read_to_connection_count_ratio",
        "crypto_stream_config",
        "proof_source_config",
        "connection_id_generator_config",
        "server_preferred_address_config",
        "send_disable_active_migration",
    )
    return QuicOptions(
        max_concurrent_streams=streams,
        initial_stream_window_size=stream_window,
        initial_connection_window_size=conn_window,
        idle_timeout=idle,
        retry=r.boolean("retry", d.retry),
        retry_token_key_file=key_file,
        session_ticket_store_size=r.integer("session_ticket_store_size", d.session_ticket_store_size, min=0),
        session_ticket_lifetime=lifetime,
        early_data=r.boolean("early_data", d.early_data),
    )


def _parse_advertise_http3(r: Reader) -> AdvertiseHttp3:
    listener = _non_empty(r, "listener", r.string("listener", required=True))
    return AdvertiseHttp3(listener=listener, max_age=r.integer("max_age", 86400, min=0, max=_U32))


def _parse_filter_chain(r: Reader, udp: bool) -> FilterChain:
    name: str = r.string("name")
    server_names: tuple[str, ...] = ()
    m = r.mapping("filter_chain_match")
    if m is not None:
        server_names = tuple(s.lower() for s in m.strings("server_names"))
        for i, sn in enumerate(server_names):
            if not (_HOSTNAME.match(sn.removeprefix("*.")) and "*" not in sn.removeprefix("*.")):
                m.error(f"expected a DNS name or *.suffix, got {sn!r}", f"server_names[{i}]")
        not_supported(
            m,
            "destination_port",
            "prefix_ranges",
            "direct_source_prefix_ranges",
            "source_type",
            "source_prefix_ranges",
            "source_ports",
            "transport_protocol",
            "application_protocols",
        )
        m.finish()
    filters = r.objects("filters", _parse_network_filter, required=True, non_empty=True)
    tls = r.object("transport_socket", lambda x: _downstream_transport_socket(x, udp))
    not_supported(r, "transport_socket_connect_timeout metadata")
    if server_names and tls is None:
        r.error(
            "server_names match the TLS SNI and need a transport_socket", "filter_chain_match.server_names"
        )
    return FilterChain(filters=filters, transport_socket=tls, name=name, server_names=server_names)


def _parse_network_filter(r: Reader) -> NetworkFilterConfig:
    name: str = _non_empty(r, "name", r.string("name", required=True))
    tc, type_url = typed_config_reader(r)
    try:
        ext_name, module = extensions.network_filter_module(name, type_url)
    except KeyError as exc:
        r.error(str(exc.args[0]), "typed_config.@type" if type_url else "name")
        return NetworkFilterConfig(name=name, config=None)
    except ImportError as exc:
        r.error(f"extension {name!r} is not available in this build ({exc})", "name")
        return NetworkFilterConfig(name=name, config=None)
    if tc is None:
        tc = Reader({}, r.sub("typed_config"), r.errors)
    return NetworkFilterConfig(name=ext_name, config=parse_extension_config(module, tc, ext_name))


# ============================================================================================ clusters
def _parse_cluster(r: Reader) -> Cluster:
    name = _non_empty(r, "name", r.string("name", required=True))
    ctype = "STATIC"
    mqtt_broker = None
    if r.has("cluster_type"):  # Envoy's custom cluster shape; the MQTT broker cluster is the only one
        from microenvoy.config.mqtt_cluster import parse_cluster_type

        mqtt_broker = parse_cluster_type(r)
        r.ignore("type")
    elif r.raw.get("type") in ("LOGICAL_DNS", "EDS", "ORIGINAL_DST"):
        r.ignore("type")
        r.error(f"{r.raw['type']} is not supported yet (use STATIC or STRICT_DNS)", "type")
    else:
        ctype = r.enum("type", _CLUSTER_TYPES, "STATIC")
    connect_timeout = r.duration("connect_timeout", 5.0)
    if connect_timeout <= 0:
        r.error("must be greater than 0", "connect_timeout")
    lb_policy = "ROUND_ROBIN"
    if r.raw.get("lb_policy") in ("CLUSTER_PROVIDED", "LOAD_BALANCING_POLICY_CONFIG"):
        r.ignore("lb_policy")
        r.error(f"{r.raw['lb_policy']} is not supported yet", "lb_policy")
    else:
        lb_policy = r.enum("lb_policy", _LB_POLICIES, "ROUND_ROBIN")
    endpoints: tuple[Endpoint, ...] = ()
    la = r.mapping("load_assignment")
    if la is not None:
        la.string("cluster_name")
        groups = la.objects("endpoints", lambda x: _parse_locality_endpoints(x, ctype == "STATIC"))
        endpoints = tuple(e for group in groups for e in group)
        not_supported(la, "policy named_endpoints")
        la.finish()
    dns_refresh_rate = r.duration("dns_refresh_rate", 5.0)
    if dns_refresh_rate < 0.001:
        r.error("must be at least 1ms", "dns_refresh_rate")
    dns_lookup_family = r.enum("dns_lookup_family", _DNS_FAMILIES, "AUTO")
    limit = r.integer("per_connection_buffer_limit_bytes", 1048576, min=1, max=_U32)
    max_requests: int = r.integer("max_requests_per_connection", 0, min=0, max=_U32)

    protocol, h2, idle = "HTTP1", Http2Options(), 3600.0
    if r.has("http2_protocol_options"):  # legacy cluster-level field
        protocol, h2 = "HTTP2", r.object("http2_protocol_options", parse_http2_options) or Http2Options()
    teo = r.mapping("typed_extension_protocol_options")
    if teo is not None:
        if r.has("http2_protocol_options"):
            r.error(
                "set typed_extension_protocol_options or the legacy http2_protocol_options, not both",
                "http2_protocol_options",
            )
        opts = _parse_http_protocol_options(teo)
        teo.finish()
        if opts is not None:
            protocol, h2, idle, typed_max = opts
            if typed_max is not None:
                if r.has("max_requests_per_connection"):
                    r.error("also set in typed_extension_protocol_options", "max_requests_per_connection")
                max_requests = typed_max
    tls = r.object("transport_socket", _upstream_transport_socket)
    breakers = r.object("circuit_breakers", _parse_circuit_breakers) or ()
    # Feature configs are imported only when a cluster uses them (each is a few hundred KiB resident).
    lb_config: LbConfig | None = None
    if any(r.has(k) for k in _LB_KEYS):
        from microenvoy.config.lb import LbConfig, parse_cluster_lb

        lb_config = parse_cluster_lb(r, lb_policy)
        if lb_config == LbConfig():
            lb_config = None  # the model's "Envoy defaults"
    health_checks: tuple[HealthCheck, ...] = ()
    if r.has("health_checks"):
        from microenvoy.config.health_check import parse_health_checks

        health_checks = parse_health_checks(r)
    outlier: OutlierDetection | None = None
    if r.has("outlier_detection"):
        from microenvoy.config.outlier import parse_outlier_detection

        outlier = r.object("outlier_detection", parse_outlier_detection)
    not_supported(
        r,
        "eds_cluster_config",
        "lb_subset_config",
        "upstream_connection_options",
        "transport_socket_matches",
        "http_protocol_options",
        "common_http_protocol_options",
        "dns_resolvers",
        "respect_dns_ttl",
    )
    return Cluster(
        name=name,
        type=ctype,
        connect_timeout=connect_timeout,
        lb_policy=lb_policy,
        endpoints=endpoints,
        upstream_protocol=protocol,
        http2_protocol_options=h2,
        transport_socket=tls,
        dns_refresh_rate=dns_refresh_rate,
        dns_lookup_family=dns_lookup_family,
        per_connection_buffer_limit_bytes=limit,
        max_requests_per_connection=max_requests,
        circuit_breakers=breakers,
        lb_config=lb_config,
        health_checks=health_checks,
        outlier_detection=outlier,
        idle_timeout=idle,
        mqtt_broker=mqtt_broker,
    )


def _parse_circuit_breakers(r: Reader) -> tuple[Thresholds, ...]:
    thresholds: tuple[Thresholds, ...] = r.objects("thresholds", _parse_thresholds)
    not_supported(r, "per_host_thresholds")
    r.finish()
    seen: set[str] = set()
    for i, t in enumerate(thresholds):
        if t.priority in seen:
            r.error(f"priority {t.priority} appears twice", f"thresholds[{i}].priority")
        seen.add(t.priority)
    return thresholds


def _parse_thresholds(r: Reader) -> Thresholds:
    budget = r.object("retry_budget", _parse_retry_budget)
    t = Thresholds(
        priority=r.enum("priority", ("DEFAULT", "HIGH"), "DEFAULT"),
        max_connections=r.integer("max_connections", 1024, min=1, max=_U32),
        max_pending_requests=r.integer("max_pending_requests", 1024, min=0, max=_U32),
        max_requests=r.integer("max_requests", 1024, min=1, max=_U32),
        max_retries=r.integer("max_retries", 3, min=0, max=_U32),
        retry_budget=budget,
        track_remaining=r.boolean("track_remaining"),
    )
    not_supported(r, "max_connection_pools")
    r.finish()
    return t


def _parse_retry_budget(r: Reader) -> RetryBudget:
    percent = 20.0
    p = r.mapping("budget_percent")
    if p is not None:
        percent = p.number("value", 20.0, min=0.0)
        if percent > 100.0:
            p.error("must be <= 100", "value")
        p.finish()
    b = RetryBudget(
        budget_percent=percent,
        min_retry_concurrency=r.integer("min_retry_concurrency", 3, min=0, max=_U32),
    )
    r.finish()
    return b


def _parse_locality_endpoints(r: Reader, static: bool) -> tuple[Endpoint, ...]:
    not_supported(r, "locality priority load_balancing_weight proximity")
    return r.objects("lb_endpoints", lambda x: _parse_lb_endpoint(x, static))


def _parse_lb_endpoint(r: Reader, static: bool) -> Endpoint:
    address, hostname = SocketAddress("", 0), ""
    e = r.mapping("endpoint", required=True)
    if e is not None:
        address = _address(e, "address", ip_only=static, port_zero=False, protocols=("TCP",))
        hostname = e.string("hostname")
        not_supported(e, "health_check_config additional_addresses")
        e.finish()
    weight = r.integer("load_balancing_weight", 1, min=1, max=_U32)
    not_supported(r, "health_status metadata")
    return Endpoint(address=address, load_balancing_weight=weight, hostname=hostname)


def _parse_http_protocol_options(
    teo: Reader,
) -> tuple[str, Http2Options, float, int | None] | None:
    """``typed_extension_protocol_options[HttpProtocolOptions]`` -> (protocol, h2 options, idle, max rq)."""
    for key in teo.raw:
        if key != HTTP_PROTOCOL_OPTIONS_KEY:
            teo.ignore(key)
            teo.error(f"only {HTTP_PROTOCOL_OPTIONS_KEY} is supported", key)
    r, type_url = typed_config_reader(teo, HTTP_PROTOCOL_OPTIONS_KEY)
    if r is None:
        return None
    _check_type(teo, HTTP_PROTOCOL_OPTIONS_KEY, type_url, HTTP_PROTOCOL_OPTIONS_TYPE)
    not_supported(
        r,
        "auto_config",
        "use_downstream_protocol_config",
        "upstream_http_protocol_options",
        "http_filters",
        "header_validation_config",
    )
    protocol, h2 = "HTTP1", Http2Options()
    x = r.mapping("explicit_http_config", required=True)
    if x is not None:
        kind = x.one_of("http_protocol_options", "http2_protocol_options")
        x.ignore("http_protocol_options", "http2_protocol_options")
        not_supported(x, "http3_protocol_options")
        if kind == "http2_protocol_options":
            protocol = "HTTP2"
            h2 = x.object("http2_protocol_options", parse_http2_options) or h2
        elif kind == "http_protocol_options":
            x.object("http_protocol_options", lambda _: None)  # no HTTP/1 options supported: must be {}
        x.finish()
    idle, max_requests = 3600.0, None
    c = r.mapping("common_http_protocol_options")
    if c is not None:
        idle = c.duration("idle_timeout", idle)
        max_requests = c.integer("max_requests_per_connection", None, min=0, max=_U32)
        c.finish()
    r.finish()
    return protocol, h2, idle, max_requests


# ============================================================================================ cross-checks
def cross_check(b: Bootstrap) -> list[str]:
    """Consistency checks across the whole config (go-control-plane's ``Consistent()`` idea).

    Paths are rebuilt from tuple positions, which mirror the document's list positions.
    """
    errors: list[str] = []
    clusters: dict[str, int] = {}
    for i, c in enumerate(b.static_resources.clusters):
        if c.name in clusters:
            errors.append(
                f"static_resources.clusters[{i}].name: duplicate cluster name {c.name!r} "
                f"(also static_resources.clusters[{clusters[c.name]}])"
            )
        elif c.name:
            clusters[c.name] = i
    if any(c.mqtt_broker is not None for c in b.static_resources.clusters):
        from microenvoy.config.mqtt_cluster import check_mqtt_clusters

        errors.extend(check_mqtt_clusters(b))
    listeners: dict[str, int] = {}
    bound: dict[tuple[str, int, str], int] = {}
    by_name = {li.name: li for li in b.static_resources.listeners}
    for i, li in enumerate(b.static_resources.listeners):
        lp = f"static_resources.listeners[{i}]"
        if li.name in listeners:
            errors.append(
                f"{lp}.name: duplicate listener name {li.name!r} "
                f"(also static_resources.listeners[{listeners[li.name]}])"
            )
        elif li.name:
            listeners[li.name] = i
        addr = (li.address.address, li.address.port_value, li.address.protocol)
        if li.address.address and li.address.port_value:
            if addr in bound:
                errors.append(
                    f"{lp}.address: {li.address.protocol} {li.address.address}:"
                    f"{li.address.port_value} is already used by "
                    f"static_resources.listeners[{bound[addr]}]"
                )
            else:
                bound[addr] = i
        errors.extend(_check_listener(li, lp, clusters, by_name))
    errors.extend(_check_dynamic(b))
    return errors


def _check_listener(
    li: Listener, lp: str, clusters: Mapping[str, int], by_name: Mapping[str, Listener]
) -> Iterator[str]:
    udp = li.address.protocol == "UDP"
    coap = any(nf.name == COAP_PROXY for fc in li.filter_chains for nf in fc.filters)
    if coap:
        yield from _check_coap_listener(li, lp, clusters)
        return
    if udp and li.quic_options is None:
        yield (
            f"{lp}.udp_listener_config.quic_options: required on a UDP listener (UDP serves QUIC/HTTP/3, "
            f"or CoAP with {COAP_PROXY})"
        )
    sni_owner: dict[str, int] = {}
    for j, fc in enumerate(li.filter_chains):
        fp = f"{lp}.filter_chains[{j}]"
        for sn in fc.server_names or ("",):
            if sn in sni_owner:
                what = f"server name {sn!r}" if sn else "a chain without server_names"
                other = f"{lp}.filter_chains[{sni_owner[sn]}]"
                yield f"{fp}.filter_chain_match: {what} is also matched by {other}"
            else:
                sni_owner[sn] = j
        if udp:
            tls = fc.transport_socket
            if tls is None or not tls.common_tls_context.tls_certificates:
                yield f"{fp}.transport_socket: a QUIC listener needs {QUIC_SOCKET} with a TLS certificate"
            elif tls.common_tls_context.tls_maximum_protocol_version != "TLSv1_3":
                yield (f"{fp}.transport_socket: QUIC needs TLS 1.3 (tls_params.tls_maximum_protocol_version)")
        for k, nf in enumerate(fc.filters):
            hp = f"{fp}.filters[{k}].typed_config"
            if not isinstance(nf.config, HttpConnectionManager):
                if udp and nf.config is not None:
                    yield f"{fp}.filters[{k}]: a QUIC listener only supports the HTTP connection manager"
                for ri, mqtt_route in enumerate(getattr(nf.config, "routes", None) or ()):
                    action = getattr(mqtt_route, "action", None)  # the MQTT proxy's bridge routes
                    for name in _action_clusters(action):
                        if name not in clusters:
                            yield f"{hp}.routes[{ri}].route: unknown cluster {name!r}"
                continue
            codec = nf.config.codec_type
            if udp and codec not in ("HTTP3", "AUTO"):
                yield f"{hp}.codec_type: a UDP (QUIC) listener needs HTTP3 or AUTO, got {codec}"
            if not udp and codec == "HTTP3":
                yield f"{hp}.codec_type: HTTP3 needs a UDP listener with udp_listener_config.quic_options"
            for path, cluster in _route_cluster_refs(nf.config.route_config):
                if cluster and cluster not in clusters:
                    yield f"{hp}.{path}: unknown cluster {cluster!r}"
            tracing = nf.config.tracing
            service = getattr(tracing.provider, "http_service", None) if tracing is not None else None
            if service is not None and service.cluster not in clusters:
                yield (
                    f"{hp}.tracing.provider.typed_config.http_service.http_uri.cluster: "
                    f"unknown cluster {service.cluster!r}"
                )
    adv = li.advertise_http3
    if adv is not None and adv.listener:
        target = by_name.get(adv.listener)
        if udp:
            yield f"{lp}.advertise_http3: only valid on a TCP listener"
        elif target is None:
            yield f"{lp}.advertise_http3.listener: unknown listener {adv.listener!r}"
        elif target.address.protocol != "UDP" or target.quic_options is None:
            yield f"{lp}.advertise_http3.listener: {adv.listener!r} is not a UDP (QUIC) listener"


def _check_dynamic(b: Bootstrap) -> Iterator[str]:
    dyn = b.dynamic_resources
    if dyn is None:
        return
    clusters = {c.name: c for c in b.static_resources.clusters}
    for i, name in enumerate(dyn.xds_clusters):
        path = f"dynamic_resources.ads_config.grpc_services[{i}].envoy_grpc.cluster_name"
        c = clusters.get(name)
        if c is None:
            yield f"{path}: unknown cluster {name!r} (the control plane's cluster must be a static cluster)"
        elif c.upstream_protocol != "HTTP2":
            yield f"{path}: cluster {name!r} must speak HTTP/2 (gRPC): set http2_protocol_options"
    if not b.node.id:
        yield "node.id: required with dynamic_resources (the control plane keys its state by it)"


def _check_coap_listener(li: Listener, lp: str, clusters: Mapping[str, int]) -> Iterator[str]:
    if li.address.protocol != "UDP":
        yield f"{lp}.address.socket_address.protocol: {COAP_PROXY} needs a UDP listener"
    if li.quic_options is not None:
        yield f"{lp}.udp_listener_config.quic_options: a CoAP listener does not serve QUIC"
    if len(li.filter_chains) != 1:
        yield f"{lp}.filter_chains: a CoAP listener has exactly one filter chain"
    for j, fc in enumerate(li.filter_chains):
        fp = f"{lp}.filter_chains[{j}]"
        if fc.transport_socket is not None:
            yield f"{fp}.transport_socket: not supported on a CoAP listener (no DTLS; use OSCORE)"
        if len(fc.filters) != 1 or fc.filters[0].name != COAP_PROXY:
            yield f"{fp}.filters: {COAP_PROXY} must be the chain's only network filter"
        for k, nf in enumerate(fc.filters):
            for ri, route in enumerate(getattr(nf.config, "routes", None) or ()):
                for name in _action_clusters(getattr(route, "action", None)):
                    if name not in clusters:
                        yield f"{fp}.filters[{k}].typed_config.routes[{ri}].route: unknown cluster {name!r}"


def _action_clusters(action: Any) -> list[str]:
    if action is None:
        return []
    names = [action.cluster] if action.cluster else []
    return names + [w.name for w in action.weighted_clusters]


def _route_cluster_refs(rc: RouteConfiguration) -> Iterator[tuple[str, str]]:
    for vi, vh in enumerate(rc.virtual_hosts):
        for ri, route in enumerate(vh.routes):
            if route.route is None:
                continue
            base = f"route_config.virtual_hosts[{vi}].routes[{ri}].route"
            if route.route.cluster is not None:
                yield f"{base}.cluster", route.route.cluster
            for wi, wc in enumerate(route.route.weighted_clusters):
                yield f"{base}.weighted_clusters.clusters[{wi}].name", wc.name
