"""Blockwise transfers (RFC 7959): Block1 reassembly rules and the store's bounds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from microenvoy.codecs.coap.blockwise import BlockStore, size_of, szx_for


def store(**kw: object) -> BlockStore:
    args: dict[str, object] = {"max_entries": 8, "max_bytes": 4096, "lifetime": 60.0} | kw
    return BlockStore(**args)  # type: ignore[arg-type]


def test_sizes() -> None:
    assert [size_of(s) for s in range(7)] == [16, 32, 64, 128, 256, 512, 1024]
    assert all(szx_for(size_of(s)) == s for s in range(7))


def test_reassembly_in_order() -> None:
    s = store()
    assert s.block1("k", 0, True, 0, b"a" * 16, 100, 0.0) == ("continue", None)
    assert s.block1("k", 1, True, 0, b"b" * 16, 100, 0.0) == ("continue", None)
    assert s.block1("k", 2, False, 0, b"c", 100, 0.0) == ("complete", b"a" * 16 + b"b" * 16 + b"c")
    assert len(s) == 0
    assert s.bytes == 0


def test_out_of_order_and_unknown_are_incomplete() -> None:
    s = store()
    assert s.block1("k", 1, True, 0, b"a" * 16, 100, 0.0) == ("incomplete", None)
    s.block1("k", 0, True, 0, b"a" * 16, 100, 0.0)
    assert s.block1("k", 2, True, 0, b"a" * 16, 100, 0.0) == ("incomplete", None)
    assert s.block1("k", 0, True, 0, b"short", 100, 0.0) == ("incomplete", None)


def test_over_the_limit() -> None:
    s = store()
    s.block1("k", 0, True, 0, b"a" * 16, 20, 0.0)
    assert s.block1("k", 1, True, 0, b"a" * 16, 20, 0.0) == ("too_large", None)
    assert len(s) == 0


def test_expired_transfer_is_forgotten() -> None:
    s = store(lifetime=1.0)
    s.block1("k", 0, True, 0, b"a" * 16, 100, 0.0)
    assert s.block1("k", 1, False, 0, b"b", 100, 5.0) == ("incomplete", None)


def test_block2_bodies() -> None:
    s = store()
    s.put("r", b"x" * 100, 0.0, "meta")
    assert s.get("r", 1.0) == (b"x" * 100, "meta")
    assert s.get("r", 61.0) is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 300)), max_size=200))
def test_bounded(ops: list[tuple[int, int]]) -> None:
    s = store(max_entries=5, max_bytes=1000)
    for i, (key, n) in enumerate(ops):
        if n % 2:
            s.put(key, b"y" * n, float(i))
        else:
            s.block1(key, 0, True, 4, b"z" * 256, 10_000, float(i))
        assert len(s) <= 5
        assert s.bytes <= 1000 or len(s) <= 1
        assert s.bytes == sum(it.size for it in s._items.values())
