"""microenvoy.xds.messages: the lite delta xDS encoding (CBOR maps keyed by proto field names)."""

from __future__ import annotations

import datetime
import math
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microenvoy.codecs.grpc import GrpcMessageDecoder, encode_message
from microenvoy.xds.messages import (
    ALL_TYPE_URLS,
    TYPE_CLUSTER,
    TYPE_CLUSTER_LOAD_ASSIGNMENT,
    TYPE_LISTENER,
    TYPE_ROUTE_CONFIGURATION,
    TYPE_SECRET,
    DeltaRequest,
    DeltaResponse,
    ErrorDetail,
    Node,
    ResourceEntry,
    XdsProtocolError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _cluster(name: str = "c1") -> dict[str, Any]:
    return {"@type": TYPE_CLUSTER, "name": name, "connect_timeout": "1s", "type": "STATIC"}


def _resp_map(**overrides: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "system_version_info": "v7",
        "type_url": TYPE_CLUSTER,
        "resources": [{"name": "c1", "version": "abc", "resource": _cluster(), "signature": b"\xd2"}],
        "removed_resources": ["old"],
        "nonce": "n1",
    }
    m.update(overrides)
    return {k: v for k, v in m.items() if v is not _DROP}


_DROP = object()


# ------------------------------------------------------------------------------------------ constants
def test_type_urls_are_the_contracts_five_in_make_before_break_order() -> None:
    assert ALL_TYPE_URLS == (
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "type.googleapis.com/envoy.config.listener.v3.Listener",
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
    )
    assert (
        TYPE_CLUSTER,
        TYPE_CLUSTER_LOAD_ASSIGNMENT,
        TYPE_LISTENER,
        TYPE_ROUTE_CONFIGURATION,
        TYPE_SECRET,
    ) == (ALL_TYPE_URLS)


# ------------------------------------------------------------------------------------------ encoding shapes
def test_request_encodes_only_the_fields_that_are_set() -> None:
    assert cbor2.loads(encode_request(DeltaRequest(type_url=TYPE_CLUSTER, response_nonce="n1"))) == {
        "type_url": TYPE_CLUSTER,
        "response_nonce": "n1",
    }


def test_full_request_uses_the_proto_field_names() -> None:
    req = DeltaRequest(
        type_url=TYPE_LISTENER,
        node=Node(id="dev-1", cluster="edge", metadata={"firmware_profile": "mqtt", "site": "a"}),
        resource_names_subscribe=("*",),
        resource_names_unsubscribe=("x",),
        initial_resource_versions={"l1": "v1"},
        response_nonce="n9",
        error_detail=ErrorDetail(code=3, message="1 rejected", details={"l2": "bad port"}),
    )
    assert cbor2.loads(encode_request(req)) == {
        "node": {"id": "dev-1", "cluster": "edge", "metadata": {"firmware_profile": "mqtt", "site": "a"}},
        "type_url": TYPE_LISTENER,
        "resource_names_subscribe": ["*"],
        "resource_names_unsubscribe": ["x"],
        "initial_resource_versions": {"l1": "v1"},
        "response_nonce": "n9",
        "error_detail": {"code": 3, "message": "1 rejected", "details": {"l2": "bad port"}},
    }
    assert decode_request(encode_request(req)) == req
    assert req.is_nack


def test_response_encodes_only_the_fields_that_are_set_and_heartbeats_have_no_resource() -> None:
    resp = DeltaResponse(type_url=TYPE_CLUSTER, nonce="n2", resources=(ResourceEntry("c1", "v1", ttl=5.0),))
    assert cbor2.loads(encode_response(resp)) == {
        "type_url": TYPE_CLUSTER,
        "resources": [{"name": "c1", "version": "v1", "ttl": 5.0}],
        "nonce": "n2",
    }
    decoded = decode_response(encode_response(resp))
    assert decoded == resp
    assert decoded.resources[0].is_heartbeat


def test_decode_response_reads_every_field() -> None:
    resp = decode_response(cbor2.dumps(_resp_map()))
    assert resp == DeltaResponse(
        type_url=TYPE_CLUSTER,
        nonce="n1",
        system_version_info="v7",
        resources=(ResourceEntry("c1", "abc", _cluster(), signature=b"\xd2"),),
        removed_resources=("old",),
    )


def test_unknown_fields_are_ignored_like_proto3() -> None:
    resp = decode_response(cbor2.dumps(_resp_map(control_plane={"identifier": "cp"}, extra=[1, 2])))
    assert resp.nonce == "n1"


def test_integer_ttl_is_read_as_seconds() -> None:
    resources = [{"name": "c1", "version": "v", "ttl": 30}]
    entry = decode_response(cbor2.dumps(_resp_map(resources=resources))).resources[0]
    assert entry.ttl == 30.0
    assert isinstance(entry.ttl, float)


def test_messages_pass_through_the_grpc_framing_byte_by_byte() -> None:
    req = DeltaRequest(type_url=TYPE_SECRET, resource_names_subscribe=("server-cert",))
    resp = decode_response(cbor2.dumps(_resp_map()))
    wire = encode_message(encode_request(req)) + encode_message(encode_response(resp))
    dec = GrpcMessageDecoder()
    got = [m for i in range(len(wire)) for m in dec.feed(wire[i : i + 1])]
    dec.finish()
    assert [c for c, _ in got] == [False, False]
    assert decode_request(got[0][1]) == req
    assert decode_response(got[1][1]) == resp


# ------------------------------------------------------------------------------------------ malformed
MALFORMED: list[tuple[str, Any, str]] = [
    ("not a map", [1, 2], "message: expected a map, got list"),
    ("missing nonce", _resp_map(nonce=_DROP), "nonce: missing"),
    ("empty nonce", _resp_map(nonce=""), "nonce: must not be empty"),
    ("nonce not a string", _resp_map(nonce=7), "nonce: expected a string, got int"),
    ("missing type_url", _resp_map(type_url=_DROP), "type_url: missing"),
    ("type_url bytes", _resp_map(type_url=b"x"), "type_url: expected a string, got bytes"),
    ("version info int", _resp_map(system_version_info=3), "system_version_info: expected a string"),
    ("resources a map", _resp_map(resources={"a": 1}), "resources: expected an array, got dict"),
    ("resource not a map", _resp_map(resources=["c1"]), "resources[0]: expected a map, got str"),
    ("resource without name", _resp_map(resources=[{"version": "v"}]), "resources[0].name: missing"),
    ("empty name", _resp_map(resources=[{"name": "", "version": "v"}]), "resources[0].name: must not be"),
    ("name int", _resp_map(resources=[{"name": 1, "version": "v"}]), "resources[0].name: expected a string"),
    ("without version", _resp_map(resources=[{"name": "a"}]), "resources[0].version: missing"),
    (
        "body not a map",
        _resp_map(resources=[{"name": "a", "version": "v", "resource": [1]}]),
        "resources[0].resource: expected a map, got list",
    ),
    (
        "body with int keys",
        _resp_map(resources=[{"name": "a", "version": "v", "resource": {b"k": "x"}}]),
        "resources[0].resource: keys must be strings",
    ),
    (
        "body with nan",
        _resp_map(resources=[{"name": "a", "version": "v", "resource": {"w": [1.0, math.nan]}}]),
        "resources[0].resource.w[1]: not a finite number",
    ),
    (
        "body with a date",
        _resp_map(resources=[{"name": "a", "version": "v", "resource": {"t": datetime.date(2024, 1, 1)}}]),
        "resources[0].resource.t: unsupported value",
    ),
    (
        "body with a tag",
        _resp_map(resources=[{"name": "a", "version": "v", "resource": {"t": cbor2.CBORTag(9999, 1)}}]),
        "resources[0].resource.t: unsupported value of type CBORTag",
    ),
    (
        "ttl string",
        _resp_map(resources=[{"name": "a", "version": "v", "ttl": "5s"}]),
        "resources[0].ttl: expected a number of seconds, got str",
    ),
    (
        "ttl bool",
        _resp_map(resources=[{"name": "a", "version": "v", "ttl": True}]),
        "resources[0].ttl: expected",
    ),
    ("ttl zero", _resp_map(resources=[{"name": "a", "version": "v", "ttl": 0}]), "resources[0].ttl: must be"),
    ("ttl negative", _resp_map(resources=[{"name": "a", "version": "v", "ttl": -1.5}]), "resources[0].ttl"),
    ("ttl inf", _resp_map(resources=[{"name": "a", "version": "v", "ttl": math.inf}]), "resources[0].ttl"),
    (
        "ttl huge int",
        _resp_map(resources=[{"name": "a", "version": "v", "ttl": 10**400}]),
        "resources[0].ttl",
    ),
    (
        "aliases a string",
        _resp_map(resources=[{"name": "a", "version": "v", "aliases": "b"}]),
        "resources[0].aliases: expected an array of strings",
    ),
    (
        "alias int",
        _resp_map(resources=[{"name": "a", "version": "v", "aliases": ["b", 2]}]),
        "resources[0].aliases[1]: expected a string",
    ),
    (
        "signature text",
        _resp_map(resources=[{"name": "a", "version": "v", "signature": "sig"}]),
        "resources[0].signature: expected bytes, got str",
    ),
    (
        "duplicate names",
        _resp_map(resources=[{"name": "a", "version": "v"}, {"name": "a", "version": "w"}]),
        "resources[1].name: duplicate name 'a'",
    ),
    ("removed a string", _resp_map(removed_resources="a"), "removed_resources: expected an array"),
    ("removed int", _resp_map(removed_resources=["a", 3]), "removed_resources[1]: expected a string"),
    (
        "removed and sent",
        _resp_map(removed_resources=["c1"]),
        "removed_resources[0]: 'c1' is also in resources",
    ),
]


@pytest.mark.parametrize(
    ("value", "reason"), [(v, r) for _, v, r in MALFORMED], ids=[i for i, _, _ in MALFORMED]
)
def test_malformed_response_names_the_field(value: Any, reason: str) -> None:
    with pytest.raises(XdsProtocolError) as info:
        decode_response(cbor2.dumps(value))
    assert info.value.reason.startswith(reason), info.value.reason
    assert str(info.value) == info.value.reason


def test_error_carries_nonce_and_type_url_when_they_were_readable() -> None:
    with pytest.raises(XdsProtocolError) as info:
        decode_response(cbor2.dumps(_resp_map(resources=[{"version": "v"}])))
    assert (info.value.type_url, info.value.nonce) == (TYPE_CLUSTER, "n1")
    with pytest.raises(XdsProtocolError) as info:
        decode_response(cbor2.dumps(_resp_map(nonce=_DROP)))
    assert (info.value.type_url, info.value.nonce) == (TYPE_CLUSTER, None)
    with pytest.raises(XdsProtocolError) as info:
        decode_response(b"\xff")
    assert (info.value.type_url, info.value.nonce) == (None, None)


RAW_MALFORMED: list[tuple[str, bytes, str]] = [
    ("not CBOR", b"\xff", "message: not valid CBOR"),
    ("empty", b"", "message: not valid CBOR"),
    ("truncated", cbor2.dumps(_resp_map())[:-3], "message: not valid CBOR"),
    ("trailing bytes", cbor2.dumps(_resp_map()) + b"\x00\x01", "message: 2 trailing bytes"),
    # {"nonce": "a", "nonce": "b"}: a map with a duplicate key
    (
        "duplicate key",
        b"\xa2" + b"".join(map(cbor2.dumps, ["nonce", "a", "nonce", "b"])),
        "message: not valid",
    ),
    ("invalid utf-8", bytes.fromhex("a1656e6f6e636562ffff"), "message: not valid CBOR"),
    # value sharing: [shareable([shared(0)])] builds a cycle
    ("cyclic", bytes.fromhex("d81c81d81d00"), "message: not valid CBOR"),
    ("shared values", cbor2.dumps({"a": [[1], [1]]}, value_sharing=True), "message: not valid CBOR"),
    (
        "string references",
        cbor2.dumps(["abcdef", "abcdef"], string_referencing=True),
        "message: not valid CBOR",
    ),
    ("int map keys (hash flooding)", cbor2.dumps({1: 2, "nonce": "n"}), "message: not valid CBOR"),
    ("deep nesting", b"\x81" * 5000 + b"\x00", "message: not valid CBOR"),
]


@pytest.mark.parametrize(
    ("data", "reason"), [(d, r) for _, d, r in RAW_MALFORMED], ids=[i for i, _, _ in RAW_MALFORMED]
)
def test_malformed_bytes_are_protocol_errors(data: bytes, reason: str) -> None:
    with pytest.raises(XdsProtocolError) as info:
        decode_response(data)
    assert info.value.reason.startswith(reason), info.value.reason
    with pytest.raises(XdsProtocolError):
        decode_request(data)


def test_deep_but_decodable_resource_is_refused_by_the_value_check() -> None:
    deep: Any = 1
    for _ in range(70):
        deep = {"x": deep}
    with pytest.raises(XdsProtocolError, match=r"(nested too deeply|not valid CBOR)"):
        decode_response(cbor2.dumps(_resp_map(resources=[{"name": "a", "version": "v", "resource": deep}])))


REQUEST_MALFORMED: list[tuple[str, Any, str]] = [
    ("no type_url", {"response_nonce": "n"}, "type_url: missing"),
    ("node not a map", {"type_url": "t", "node": "dev"}, "node: expected a map, got str"),
    ("node without id", {"type_url": "t", "node": {"cluster": "c"}}, "node.id: missing"),
    (
        "metadata keys",
        {"type_url": "t", "node": {"id": "d", "metadata": {b"k": 2}}},
        "node.metadata: keys must",
    ),
    (
        "subscribe str",
        {"type_url": "t", "resource_names_subscribe": "*"},
        "resource_names_subscribe: expected",
    ),
    (
        "initial versions",
        {"type_url": "t", "initial_resource_versions": {"a": 1}},
        "initial_resource_versions['a']: expected a string, got int",
    ),
    ("nonce bytes", {"type_url": "t", "response_nonce": b"n"}, "response_nonce: expected a string"),
    ("error without code", {"type_url": "t", "error_detail": {"message": "m"}}, "error_detail.code: missing"),
    ("error code bool", {"type_url": "t", "error_detail": {"code": True}}, "error_detail.code: expected"),
    ("error code negative", {"type_url": "t", "error_detail": {"code": -1}}, "error_detail.code: expected"),
    (
        "details values",
        {"type_url": "t", "error_detail": {"code": 3, "details": {"a": 1}}},
        "error_detail.details['a']: expected a string",
    ),
]


@pytest.mark.parametrize(
    ("value", "reason"), [(v, r) for _, v, r in REQUEST_MALFORMED], ids=[i for i, _, _ in REQUEST_MALFORMED]
)
def test_malformed_request_names_the_field(value: Any, reason: str) -> None:
    with pytest.raises(XdsProtocolError) as info:
        decode_request(cbor2.dumps(value))
    assert info.value.reason.startswith(reason), info.value.reason


# ------------------------------------------------------------------------------------------ round trips
names = st.text(min_size=1, max_size=12)
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
json_maps = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


@st.composite
def entries(draw: st.DrawFn) -> ResourceEntry:
    return ResourceEntry(
        name=draw(names),
        version=draw(st.text(min_size=1, max_size=16)),
        resource=draw(st.none() | json_maps),
        ttl=draw(st.none() | st.floats(min_value=0.001, max_value=1e9)),
        aliases=tuple(draw(st.lists(names, max_size=3))),
        signature=draw(st.none() | st.binary(max_size=40)),
    )


@st.composite
def responses(draw: st.DrawFn) -> DeltaResponse:
    resources = draw(st.lists(entries(), max_size=5, unique_by=lambda e: e.name))
    taken = {e.name for e in resources}
    removed = [n for n in draw(st.lists(names, max_size=4)) if n not in taken]
    return DeltaResponse(
        type_url=draw(st.sampled_from(ALL_TYPE_URLS) | names),
        nonce=draw(names),
        system_version_info=draw(st.text(max_size=10)),
        resources=tuple(resources),
        removed_resources=tuple(removed),
    )


@st.composite
def requests(draw: st.DrawFn) -> DeltaRequest:
    node = draw(
        st.none() | st.builds(Node, id=st.text(max_size=10), cluster=st.text(max_size=10), metadata=json_maps)
    )
    error = draw(
        st.none()
        | st.builds(
            ErrorDetail,
            code=st.integers(min_value=0, max_value=16),
            message=st.text(max_size=20),
            details=st.dictionaries(names, st.text(max_size=10), max_size=3),
        )
    )
    return DeltaRequest(
        type_url=draw(st.sampled_from(ALL_TYPE_URLS) | names),
        node=node,
        resource_names_subscribe=tuple(draw(st.lists(names, max_size=4))),
        resource_names_unsubscribe=tuple(draw(st.lists(names, max_size=4))),
        initial_resource_versions=draw(st.dictionaries(names, names, max_size=4)),
        response_nonce=draw(st.text(max_size=10)),
        error_detail=error,
    )


@ROUND_TRIP
@given(responses())
def test_response_round_trip(resp: DeltaResponse) -> None:
    assert decode_response(encode_response(resp)) == resp


@ROUND_TRIP
@given(requests())
def test_request_round_trip(req: DeltaRequest) -> None:
    assert decode_request(encode_request(req)) == req


@ROUND_TRIP
@given(responses())
def test_decoded_response_reencodes_to_the_same_bytes(resp: DeltaResponse) -> None:
    data = encode_response(resp)
    assert encode_response(decode_response(data)) == data


# ------------------------------------------------------------------------------------------ fuzzing
anything: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(["name", "version", "resource", "ttl", "nonce", "type_url", TYPE_CLUSTER]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "name",
                    "version",
                    "resource",
                    "ttl",
                    "aliases",
                    "signature",
                    "resources",
                    "removed_resources",
                    "@type",
                ]
            )
            | st.text(max_size=4)
            | st.integers(),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)


def _decodes_or_protocol_error(data: bytes) -> None:
    for decode in (decode_response, decode_request):
        reason = "ok"
        try:
            decode(data)
        except XdsProtocolError as exc:
            reason = exc.reason
        assert reason


@FUZZ
@given(anything)
def test_random_cbor_values_decode_or_raise_protocol_error(value: Any) -> None:
    _decodes_or_protocol_error(cbor2.dumps(value))


@FUZZ
@given(anything, anything)
def test_response_shaped_maps_with_random_fields(resources: Any, other: Any) -> None:
    base = _resp_map()
    for value in (
        {**base, "resources": resources},
        {**base, "resources": [resources]},
        {**base, "resources": [{"name": "a", "version": "v", "resource": other, "ttl": resources}]},
        {**base, "removed_resources": other, "nonce": resources},
    ):
        _decodes_or_protocol_error(cbor2.dumps(value))


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    _decodes_or_protocol_error(data)


@FUZZ
@given(responses(), st.data())
def test_mutated_responses_decode_or_raise_protocol_error(resp: DeltaResponse, data: st.DataObject) -> None:
    raw = bytearray(encode_response(resp))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        pos = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw[pos] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(raw)))
    _decodes_or_protocol_error(bytes(raw[:cut]))
