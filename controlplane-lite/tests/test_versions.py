from __future__ import annotations

import hashlib

import cbor2
from hypothesis import given
from hypothesis import strategies as st

from controlplane_lite.versions import CLUSTER, resource_version, system_version

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


def test_version_is_the_contracts_hash() -> None:
    res = {"@type": CLUSTER, "name": "a", "connect_timeout": "1s"}
    expected = hashlib.sha256(cbor2.dumps(res, canonical=True)).hexdigest()[:16]
    assert resource_version(res) == expected
    assert len(expected) == 16


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_version_ignores_key_order(d: dict[str, object]) -> None:
    reordered = dict(reversed(list(d.items())))
    assert resource_version(d) == resource_version(reordered)


def test_version_changes_with_content() -> None:
    assert resource_version({"a": 1}) != resource_version({"a": 2})


def test_system_version_is_order_independent() -> None:
    a = {("t", "x"): "1", ("t", "y"): "2"}
    b = {("t", "y"): "2", ("t", "x"): "1"}
    assert system_version(a) == system_version(b)
    assert system_version(a) != system_version({("t", "x"): "1"})
