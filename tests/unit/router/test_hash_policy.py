"""Route hash_policy evaluation: each input kind, missing inputs, combination and terminal, caching."""

from __future__ import annotations

from hashlib import blake2b

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.config.lb import ConnectionPropertiesHash, HashPolicy, HeaderHash, QueryParameterHash
from microenvoy.core.headers import Headers
from microenvoy.router.hash_policy import compile_hash_policies, compute_hash, hash64

MASK = 2**64 - 1


def header(name: str, terminal: bool = False) -> HashPolicy:
    return HashPolicy(header=HeaderHash(name), terminal=terminal)


def query(name: str, terminal: bool = False) -> HashPolicy:
    return HashPolicy(query_parameter=QueryParameterHash(name), terminal=terminal)


SOURCE_IP = HashPolicy(connection_properties=ConnectionPropertiesHash(source_ip=True))


def req(path: bytes = b"/", *extra: tuple[bytes, bytes]) -> Headers:
    return Headers([(b":method", b"GET"), (b":path", path), (b":authority", b"svc"), *extra])


def rotl(h: int) -> int:
    return ((h << 1) | (h >> 63)) & MASK


def test_hash64_is_blake2b_64_little_endian() -> None:
    assert hash64(b"abc") == int.from_bytes(blake2b(b"abc", digest_size=8).digest(), "little")
    assert hash64(b"abc") != hash64(b"abd")
    assert 0 <= hash64(b"") < 2**64


def test_header_value_is_hashed_and_missing_header_gives_none() -> None:
    p = (header("x-user"),)
    assert compute_hash(p, req(b"/", (b"x-user", b"alice")), None) == hash64(b"alice")
    assert compute_hash(p, req(), None) is None


def test_header_name_is_matched_lower_case_and_pseudo_headers_work() -> None:
    assert compute_hash((header("X-User"),), req(b"/", (b"x-user", b"a")), None) == hash64(b"a")
    assert compute_hash((header(":authority"),), req(), None) == hash64(b"svc")


def test_metadata_header_such_as_the_mqtt_client_id() -> None:
    p = (header("x-microenvoy-mqtt-client-id"),)
    h = Headers([(b":path", b"/"), (b"x-microenvoy-mqtt-client-id", b"sensor-1")])
    assert compute_hash(p, h, "10.0.0.1") == hash64(b"sensor-1")


def test_repeated_header_values_are_sorted_and_separated() -> None:
    p = (header("x-k"),)
    ab = compute_hash(p, req(b"/", (b"x-k", b"a"), (b"x-k", b"b")), None)
    ba = compute_hash(p, req(b"/", (b"x-k", b"b"), (b"x-k", b"a")), None)
    assert ab == ba == hash64(b"a\0b")
    three = compute_hash(p, req(b"/", (b"x-k", b"c"), (b"x-k", b"a"), (b"x-k", b"b")), None)
    assert three == hash64(b"a\0b\0c")
    # the split between values matters (a plain concatenation would make these equal)
    assert compute_hash(p, req(b"/", (b"x-k", b"ab"), (b"x-k", b"c")), None) != compute_hash(
        p, req(b"/", (b"x-k", b"a"), (b"x-k", b"bc")), None
    )


def test_source_ip() -> None:
    assert compute_hash((SOURCE_IP,), req(), "192.0.2.7") == hash64(b"192.0.2.7")
    assert compute_hash((SOURCE_IP,), req(), None) is None
    assert compute_hash((SOURCE_IP,), req(), "") is None
    off = (HashPolicy(connection_properties=ConnectionPropertiesHash(source_ip=False)),)
    assert compute_hash(off, req(), "192.0.2.7") is None  # Envoy adds no method for source_ip: false


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/a?user=bob", b"bob"),
        (b"/a?x=1&user=bob&user=eve", b"bob"),  # the first value
        (b"/a?userx=1&user=bob", b"bob"),  # a longer name is another parameter
        (b"/a?user", b""),  # present without a value: the empty value is hashed
        (b"/a?user=", b""),
        (b"/a?user=b%20b", b"b%20b"),  # not decoded (as Envoy)
        (b"/a?user=bob#frag", b"bob"),
        (b"/a?user=x=y", b"x=y"),
    ],
)
def test_query_parameter(path: bytes, expected: bytes) -> None:
    assert compute_hash((query("user"),), req(path), None) == hash64(expected)


@pytest.mark.parametrize("path", [b"/a", b"/a?", b"/a?users=1", b"/a?USER=1", b"/a#user=1"])
def test_query_parameter_missing(path: bytes) -> None:
    assert compute_hash((query("user"),), req(path), None) is None


def test_query_parameter_without_path() -> None:
    assert compute_hash((query("user"),), Headers([(b":method", b"CONNECT")]), None) is None


def test_policies_combine_with_rotation_envoy_style() -> None:
    h = req(b"/?q=1", (b"x-a", b"A"), (b"x-b", b"B"))
    p = (header("x-a"), header("x-b"))
    assert compute_hash(p, h, None) == rotl(hash64(b"A")) ^ hash64(b"B")
    three = (header("x-a"), query("q"), SOURCE_IP)
    expected = rotl(rotl(hash64(b"A")) ^ hash64(b"1")) ^ hash64(b"10.0.0.1")
    assert compute_hash(three, h, "10.0.0.1") == expected
    # duplicate policies do not cancel out (without the rotation x ^ x would be 0)
    assert compute_hash((header("x-a"), header("x-a")), h, None) == rotl(hash64(b"A")) ^ hash64(b"A") != 0


def test_missing_inputs_are_skipped_in_the_combination() -> None:
    h = req(b"/", (b"x-b", b"B"))
    assert compute_hash((header("x-a"), header("x-b")), h, None) == hash64(b"B")
    assert compute_hash((header("x-a"), header("x-c")), h, None) is None


def test_terminal_stops_once_a_hash_exists() -> None:
    h = req(b"/?q=1", (b"x-a", b"A"), (b"x-b", b"B"))
    assert compute_hash((header("x-a", terminal=True), header("x-b")), h, None) == hash64(b"A")
    # a terminal policy that found nothing does not stop the walk ...
    assert compute_hash((header("x-zz", terminal=True), header("x-b")), h, None) == hash64(b"B")
    # ... unless an earlier policy already produced a hash (Envoy checks the running value)
    p = (header("x-a"), header("x-zz", terminal=True), header("x-b"))
    assert compute_hash(p, h, None) == hash64(b"A")
    # terminal in the middle after combining two
    p = (header("x-a"), query("q", terminal=True), header("x-b"))
    assert compute_hash(p, h, None) == rotl(hash64(b"A")) ^ hash64(b"1")


def test_empty_policy_list_and_compile_cache() -> None:
    assert compute_hash((), req(), "1.2.3.4") is None
    p = (header("x-a"),)
    fn = compile_hash_policies(p)
    assert fn(req(b"/", (b"x-a", b"A")), None) == hash64(b"A")
    assert compile_hash_policies([])(req(), None) is None
    # same content, different tuple objects: both evaluate (the cache is keyed by identity, checked)
    p2 = (header("x-a"),)
    assert compute_hash(p, req(b"/", (b"x-a", b"A")), None) == compute_hash(
        p2, req(b"/", (b"x-a", b"A")), None
    )


@given(
    st.lists(st.binary(max_size=20), max_size=4),
    st.lists(st.binary(max_size=20), max_size=4),
    st.one_of(st.none(), st.ip_addresses().map(str)),
    st.binary(max_size=40),
    st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_any_request_gives_a_64_bit_key_or_none_deterministically(
    a: list[bytes], b: list[bytes], ip: str | None, path: bytes, terminal: list[bool]
) -> None:
    policies = (header("x-a", terminal[0]), header("x-b", terminal[1]), SOURCE_IP, query("k", terminal[3]))
    h = Headers([(b":path", path)] + [(b"x-a", v) for v in a] + [(b"x-b", v) for v in b])
    first = compute_hash(policies, h, ip)
    assert first == compile_hash_policies(policies)(h, ip)
    if first is not None:
        assert 0 <= first < 2**64
    has_query = b"?" in path and any(
        part == b"k" or part.startswith(b"k=") for part in path.split(b"?", 1)[1].split(b"#")[0].split(b"&")
    )
    assert (first is None) == (not a and not b and not ip and not has_query)
