"""Delta xDS wire messages in the lite encoding: CBOR maps keyed by the proto field names (sans-IO).

This is the single definition of the message format spoken between the agent and controlplane-lite
(/work/xds-contract.md, DELTA.md "Messages"): ``DeltaDiscoveryRequest`` (agent -> control plane) and
``DeltaDiscoveryResponse`` (control plane -> agent) as frozen dataclasses, with both directions of
encoding so that controlplane-lite imports the very same code.

* ``encode_request`` / ``encode_response`` write a CBOR map holding only the fields that are set (proto3
  style: an empty list, map or string is not sent; ``type_url`` and ``nonce`` always are).
* ``decode_response`` / ``decode_request`` accept exactly the contract's shapes and raise
  ``XdsProtocolError`` naming the offending field (``resources[2].ttl: expected a number, got str``) for
  anything else: not CBOR, trailing bytes, wrong types, a missing ``nonce``/``type_url``, a resource without
  a name, duplicate resource names. Unknown keys are ignored (proto3 forward compatibility). CBOR tags are
  not part of the format: value-sharing and string-reference tags are refused while decoding (they could
  build cycles or exponential fan-out from a few bytes) and every other tag decodes to a value type the
  checks refuse (dates, sets, ...). Resource bodies and node metadata may hold only JSON-like values
  (map with string keys, array, string, bytes, int, finite float, bool, null).
* gRPC framing (the 5-byte length prefix) is not done here: use ``microenvoy.codecs.grpc.encode_message``
  and ``GrpcMessageDecoder`` around these bytes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import cbor2

__all__ = [
    "ALL_TYPE_URLS",
    "CONTENT_TYPE",
    "DEFAULT_TYPE_URLS",
    "DEFAULT_WILDCARD_TYPE_URLS",
    "DELTA_ADS_METHOD",
    "INVALID_ARGUMENT",
    "MICROENVOY_TYPE_PREFIX",
    "TYPE_CLUSTER",
    "TYPE_CLUSTER_LOAD_ASSIGNMENT",
    "TYPE_LISTENER",
    "TYPE_ROUTE_CONFIGURATION",
    "TYPE_SECRET",
    "WILDCARD",
    "DeltaRequest",
    "DeltaResponse",
    "ErrorDetail",
    "Node",
    "ResourceEntry",
    "XdsProtocolError",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]

# ------------------------------------------------------------------------------------------ constants
TYPE_CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
TYPE_CLUSTER_LOAD_ASSIGNMENT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPE_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
TYPE_ROUTE_CONFIGURATION = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
TYPE_SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

MICROENVOY_TYPE_PREFIX = "type.googleapis.com/microenvoy.config.v1."
"""Prefix of microenvoy's own resource types (for what Envoy has no type for), e.g. ``...v1.MqttRoute``."""

ALL_TYPE_URLS: tuple[str, ...] = (
    TYPE_CLUSTER,
    TYPE_CLUSTER_LOAD_ASSIGNMENT,
    TYPE_LISTENER,
    TYPE_ROUTE_CONFIGURATION,
    TYPE_SECRET,
)
"""The five Envoy types of the contract, in make-before-break order (DELTA.md rule 5)."""

DEFAULT_TYPE_URLS = ALL_TYPE_URLS
DEFAULT_WILDCARD_TYPE_URLS: tuple[str, ...] = (TYPE_LISTENER, TYPE_CLUSTER)
"""Types subscribed with ``*`` (DELTA.md rule 3)."""

WILDCARD = "*"
DELTA_ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
CONTENT_TYPE = "application/grpc+cbor"
INVALID_ARGUMENT = 3
"""gRPC status code carried in a NACK's ``error_detail.code``."""

_MAX_DEPTH = 64
"""Deepest container nesting accepted (resources are shallow Envoy-JSON maps)."""


class XdsProtocolError(Exception):
    """A delta xDS message is malformed; ``reason`` names the bad field (``resources[0].name: missing``).

    ``type_url`` and ``nonce`` are filled in when they could be read, so that the caller can NACK the whole
    response (``DeltaClient.reject``); without a nonce the only answer is to reset the stream.
    """

    def __init__(self, reason: str, *, type_url: str | None = None, nonce: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.type_url = type_url
        self.nonce = nonce


# ------------------------------------------------------------------------------------------ messages
@dataclass(frozen=True, slots=True)
class Node:
    """The agent's identity, sent in the first request of a stream only."""

    id: str
    """Unique node id."""
    cluster: str = ""
    """Service cluster the node belongs to."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form labels: ``firmware_profile``, ``agent_version``, ``site``, ``profile``, ``arch`` ..."""


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """Why a response was NACKed (google.rpc.Status shape plus microenvoy's per-resource ``details``)."""

    code: int = INVALID_ARGUMENT
    """gRPC status code (3 INVALID_ARGUMENT for a rejected config)."""
    message: str = ""
    """Human-readable summary."""
    details: dict[str, str] = field(default_factory=dict)
    """Resource name -> why it was rejected; names only the rejected resources (microenvoy extension)."""


@dataclass(frozen=True, slots=True)
class DeltaRequest:
    """``DeltaDiscoveryRequest``: a subscription change, an ACK or a NACK (agent -> control plane)."""

    type_url: str
    """Resource type this request is about."""
    node: Node | None = None
    """Only in the first request of a stream."""
    resource_names_subscribe: tuple[str, ...] = ()
    """Names added to the interest (``*`` = wildcard)."""
    resource_names_unsubscribe: tuple[str, ...] = ()
    """Names removed from the interest."""
    initial_resource_versions: dict[str, str] = field(default_factory=dict)
    """Name -> version the agent already has; first request per type on a stream only."""
    response_nonce: str = ""
    """Nonce of the response being ACKed/NACKed ("" = none)."""
    error_detail: ErrorDetail | None = None
    """Present = NACK."""

    @property
    def is_nack(self) -> bool:
        """True when this request rejects (part of) a response."""
        return self.error_detail is not None


@dataclass(frozen=True, slots=True)
class ResourceEntry:
    """One resource in a response (``envoy.service.discovery.v3.Resource`` plus our ``signature``)."""

    name: str
    """Resource name, unique per type."""
    version: str
    """Content hash of the resource (DELTA.md rule 2)."""
    resource: dict[str, Any] | None = None
    """Envoy-JSON-shaped map with ``@type``; None = TTL heartbeat (DELTA.md rule 7)."""
    ttl: float | None = None
    """Seconds the resource lives without a refresh; None = forever."""
    aliases: tuple[str, ...] = ()
    """Other names the resource is known by."""
    signature: bytes | None = None
    """COSE_Sign1 with a detached payload over (type_url, name, version, resource)."""

    @property
    def is_heartbeat(self) -> bool:
        """True when the entry carries no body (same name and version refresh the TTL)."""
        return self.resource is None


@dataclass(frozen=True, slots=True)
class DeltaResponse:
    """``DeltaDiscoveryResponse`` (control plane -> agent)."""

    type_url: str
    """Resource type of every entry."""
    nonce: str
    """Unique per stream; echoed in the ACK/NACK."""
    system_version_info: str = ""
    """Debug only."""
    resources: tuple[ResourceEntry, ...] = ()
    """Added or changed resources and heartbeats."""
    removed_resources: tuple[str, ...] = ()
    """Names that no longer exist (or never did)."""


# ------------------------------------------------------------------------------------------ encoding
def _encode_node(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {"id": node.id}
    if node.cluster:
        out["cluster"] = node.cluster
    if node.metadata:
        out["metadata"] = dict(node.metadata)
    return out


def encode_request(req: DeltaRequest) -> bytes:
    """CBOR bytes of ``req`` holding only the fields that are set (``type_url`` always)."""
    out: dict[str, Any] = {}
    if req.node is not None:
        out["node"] = _encode_node(req.node)
    out["type_url"] = req.type_url
    if req.resource_names_subscribe:
        out["resource_names_subscribe"] = list(req.resource_names_subscribe)
    if req.resource_names_unsubscribe:
        out["resource_names_unsubscribe"] = list(req.resource_names_unsubscribe)
    if req.initial_resource_versions:
        out["initial_resource_versions"] = dict(req.initial_resource_versions)
    if req.response_nonce:
        out["response_nonce"] = req.response_nonce
    if req.error_detail is not None:
        ed: dict[str, Any] = {"code": req.error_detail.code, "message": req.error_detail.message}
        if req.error_detail.details:
            ed["details"] = dict(req.error_detail.details)
        out["error_detail"] = ed
    return cbor2.dumps(out)


def _encode_entry(entry: ResourceEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"name": entry.name, "version": entry.version}
    if entry.resource is not None:
        out["resource"] = entry.resource
    if entry.ttl is not None:
        out["ttl"] = float(entry.ttl)
    if entry.aliases:
        out["aliases"] = list(entry.aliases)
    if entry.signature is not None:
        out["signature"] = bytes(entry.signature)
    return out


def encode_response(resp: DeltaResponse) -> bytes:
    """CBOR bytes of ``resp`` holding only the fields that are set (``type_url`` and ``nonce`` always)."""
    out: dict[str, Any] = {}
    if resp.system_version_info:
        out["system_version_info"] = resp.system_version_info
    out["type_url"] = resp.type_url
    if resp.resources:
        out["resources"] = [_encode_entry(e) for e in resp.resources]
    if resp.removed_resources:
        out["removed_resources"] = list(resp.removed_resources)
    out["nonce"] = resp.nonce
    return cbor2.dumps(out)


# ------------------------------------------------------------------------------------------ decoding
def _refuse_tag(value: Any, immutable: bool) -> Any:
    raise cbor2.CBORDecodeError("shared and string references are not allowed")


_REFUSED_TAGS = {25: _refuse_tag, 28: _refuse_tag, 29: _refuse_tag, 256: _refuse_tag}


def _loads(data: bytes) -> Any:
    """One CBOR item filling ``data`` exactly; any decoder failure becomes ``XdsProtocolError``."""
    fp = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            fp,
            semantic_decoders=_REFUSED_TAGS,
            max_depth=_MAX_DEPTH,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
        obj = decoder.decode()
    except Exception as exc:  # the decoder's failures are all peer input errors here
        raise XdsProtocolError(f"message: not valid CBOR ({exc})") from None
    if fp.tell() != len(data):
        raise XdsProtocolError(f"message: {len(data) - fp.tell()} trailing bytes after the CBOR item")
    return obj


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


class _Fields:
    """Typed, path-carrying accessors over one decoded CBOR map."""

    __slots__ = ("m", "path")

    def __init__(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise XdsProtocolError(f"{path or 'message'}: expected a map, got {_kind(value)}")
        self.m: dict[Any, Any] = value
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def string(self, key: str, *, required: bool = False, nonempty: bool = False) -> str:
        v = self.m.get(key)
        if v is None:
            if required:
                raise XdsProtocolError(f"{self.at(key)}: missing")
            return ""
        if not isinstance(v, str):
            raise XdsProtocolError(f"{self.at(key)}: expected a string, got {_kind(v)}")
        if nonempty and not v:
            raise XdsProtocolError(f"{self.at(key)}: must not be empty")
        return v

    def strings(self, key: str) -> tuple[str, ...]:
        v = self.m.get(key)
        if v is None:
            return ()
        if not isinstance(v, list):
            raise XdsProtocolError(f"{self.at(key)}: expected an array of strings, got {_kind(v)}")
        for i, s in enumerate(v):
            if not isinstance(s, str):
                raise XdsProtocolError(f"{self.at(key)}[{i}]: expected a string, got {_kind(s)}")
        return tuple(v)

    def string_map(self, key: str) -> dict[str, str]:
        sub = self.m.get(key)
        if sub is None:
            return {}
        f = _Fields(sub, self.at(key))
        out: dict[str, str] = {}
        for k, v in f.m.items():
            if not isinstance(k, str):
                raise XdsProtocolError(f"{f.path}: keys must be strings, got {_kind(k)}")
            if not isinstance(v, str):
                raise XdsProtocolError(f"{f.path}[{k!r}]: expected a string, got {_kind(v)}")
            out[k] = v
        return out

    def json_map(self, key: str) -> dict[str, Any] | None:
        v = self.m.get(key)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise XdsProtocolError(f"{self.at(key)}: expected a map, got {_kind(v)}")
        _check_json(v, self.at(key), 0)
        return v

    def sub(self, key: str) -> _Fields | None:
        v = self.m.get(key)
        return None if v is None else _Fields(v, self.at(key))


def _check_json(value: object, path: str, depth: int) -> None:
    """Only JSON-like values (plus bytes) in resource bodies and node metadata."""
    if depth > _MAX_DEPTH:
        raise XdsProtocolError(f"{path}: nested too deeply")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise XdsProtocolError(f"{path}: keys must be strings, got {_kind(k)}")
            _check_json(v, f"{path}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(v, f"{path}[{i}]", depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise XdsProtocolError(f"{path}: not a finite number")
    elif value is not None and not isinstance(value, str | bytes | int):  # bool is an int
        raise XdsProtocolError(f"{path}: unsupported value of type {_kind(value)}")


def _decode_entry(value: object, path: str) -> ResourceEntry:
    f = _Fields(value, path)
    name = f.string("name", required=True, nonempty=True)
    version = f.string("version", required=True, nonempty=True)
    resource = f.json_map("resource")
    ttl_raw = f.m.get("ttl")
    ttl: float | None = None
    if ttl_raw is not None:
        if isinstance(ttl_raw, bool) or not isinstance(ttl_raw, int | float):
            raise XdsProtocolError(f"{f.at('ttl')}: expected a number of seconds, got {_kind(ttl_raw)}")
        try:
            ttl = float(ttl_raw)
        except OverflowError:
            ttl = math.inf
        if not (math.isfinite(ttl) and ttl > 0):
            raise XdsProtocolError(f"{f.at('ttl')}: must be a finite number of seconds greater than 0")
    aliases = f.strings("aliases")
    sig = f.m.get("signature")
    if sig is not None and not isinstance(sig, bytes):
        raise XdsProtocolError(f"{f.at('signature')}: expected bytes, got {_kind(sig)}")
    return ResourceEntry(
        name=name, version=version, resource=resource, ttl=ttl, aliases=aliases, signature=sig
    )


def decode_response(data: bytes) -> DeltaResponse:
    """Parse a ``DeltaDiscoveryResponse``; raises ``XdsProtocolError`` naming the bad field."""
    f = _Fields(_loads(data), "")
    # Read the two fields a whole-response NACK needs first, so a later error can carry them.
    type_url = nonce = None
    raw_type, raw_nonce = f.m.get("type_url"), f.m.get("nonce")
    if isinstance(raw_type, str) and raw_type:
        type_url = raw_type
    if isinstance(raw_nonce, str) and raw_nonce:
        nonce = raw_nonce
    try:
        f.string("type_url", required=True, nonempty=True)
        f.string("nonce", required=True, nonempty=True)
        version_info = f.string("system_version_info")
        raw_resources = f.m.get("resources")
        entries: list[ResourceEntry] = []
        if raw_resources is not None:
            if not isinstance(raw_resources, list):
                raise XdsProtocolError(f"resources: expected an array, got {_kind(raw_resources)}")
            seen: set[str] = set()
            for i, item in enumerate(raw_resources):
                entry = _decode_entry(item, f"resources[{i}]")
                if entry.name in seen:
                    raise XdsProtocolError(f"resources[{i}].name: duplicate name {entry.name!r}")
                seen.add(entry.name)
                entries.append(entry)
        removed = f.strings("removed_resources")
        names = {e.name for e in entries}
        for i, name in enumerate(removed):
            if name in names:
                raise XdsProtocolError(f"removed_resources[{i}]: {name!r} is also in resources")
    except XdsProtocolError as exc:
        raise XdsProtocolError(exc.reason, type_url=type_url, nonce=nonce) from None
    return DeltaResponse(
        type_url=type_url or "",
        nonce=nonce or "",
        system_version_info=version_info,
        resources=tuple(entries),
        removed_resources=removed,
    )


def _decode_node(f: _Fields) -> Node:
    node_id = f.string("id", required=True)
    cluster = f.string("cluster")
    metadata = f.json_map("metadata")
    return Node(id=node_id, cluster=cluster, metadata={} if metadata is None else metadata)


def decode_request(data: bytes) -> DeltaRequest:
    """Parse a ``DeltaDiscoveryRequest`` (control plane side); ``XdsProtocolError`` names the bad field."""
    f = _Fields(_loads(data), "")
    node_f = f.sub("node")
    node = None if node_f is None else _decode_node(node_f)
    type_url = f.string("type_url", required=True, nonempty=True)
    error_detail = None
    ed = f.sub("error_detail")
    if ed is not None:
        code = ed.m.get("code")
        if code is None:
            raise XdsProtocolError(f"{ed.at('code')}: missing")
        if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 0x7FFFFFFF:
            raise XdsProtocolError(f"{ed.at('code')}: expected a gRPC status code, got {code!r:.40}")
        error_detail = ErrorDetail(code=code, message=ed.string("message"), details=ed.string_map("details"))
    return DeltaRequest(
        type_url=type_url,
        node=node,
        resource_names_subscribe=f.strings("resource_names_subscribe"),
        resource_names_unsubscribe=f.strings("resource_names_unsubscribe"),
        initial_resource_versions=f.string_map("initial_resource_versions"),
        response_nonce=f.string("response_nonce"),
        error_detail=error_detail,
    )
