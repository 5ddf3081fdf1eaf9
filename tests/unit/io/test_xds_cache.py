"""The offline-first xDS cache: atomic durable writes, verified loads, bad files skipped with a reason."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microenvoy.io import xds_cache
from microenvoy.io.xds_cache import XdsCache, XdsCacheError
from microenvoy.xds import cose

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
TRUSTED = cose.trusted_keys([KEY.public_key()])
KID = cose.key_id(KEY.public_key())


def cluster(name: str, port: int = 8080) -> dict[str, Any]:
    return {"@type": CLUSTER, "name": name, "connect_timeout": "1s", "port": port}


def put(cache: XdsCache, type_url: str, name: str, version: str, resource: dict[str, Any]) -> Path:
    return cache.store(
        type_url, name, version, resource, cose.sign_resource(KEY, type_url, name, version, resource)
    )


def by_name(cache: XdsCache) -> dict[str, str]:
    loaded = cache.load(TRUSTED)
    assert loaded.problems == ()
    return {r.name: r.version for r in loaded.resources}


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_round_trip(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path / "cache", clock=lambda: 1234.5)
    put(cache, CLUSTER, "api", "v1", cluster("api"))
    put(cache, LISTENER, "main", "l1", {"@type": LISTENER, "name": "main"})
    # A new instance (a reboot) reads the same resources back, verified.
    loaded = XdsCache(tmp_path / "cache").load(TRUSTED)
    assert loaded.problems == ()
    assert [(r.type_url, r.name, r.version) for r in loaded.resources] == [
        (CLUSTER, "api", "v1"),
        (LISTENER, "main", "l1"),
    ]
    api = loaded.resources[0]
    assert api.resource == cluster("api")
    assert api.kid == KID
    assert api.stored_at == 1234.5
    assert cose.verify_resource(TRUSTED, api.signature, CLUSTER, "api", "v1", api.resource) == KID


def test_file_layout_is_one_cbor_map_per_resource(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path, clock=lambda: 7.0)
    path = put(cache, CLUSTER, "api", "v1", cluster("api"))
    assert path == cache.path_for(CLUSTER, "api")
    assert path.parent == tmp_path
    assert path.name.endswith(".cbor")
    assert len(path.stem) == 32
    assert cache.path_for(CLUSTER, "api") != cache.path_for(LISTENER, "api")  # type is part of the key
    record = cbor2.loads(path.read_bytes())
    assert set(record) == {"type_url", "name", "version", "resource", "signature", "stored_at"}
    assert (record["type_url"], record["name"], record["version"], record["stored_at"]) == (
        CLUSTER,
        "api",
        "v1",
        7.0,
    )
    assert files(tmp_path) == [path.name]


def test_secrets_are_private_to_the_agent(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path / "new")
    path = put(cache, CLUSTER, "api", "v1", cluster("api"))
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_store_replaces_and_remove_forgets(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path)
    put(cache, CLUSTER, "api", "v1", cluster("api"))
    put(cache, CLUSTER, "api", "v2", cluster("api", 9090))
    put(cache, CLUSTER, "db", "d1", cluster("db"))
    assert by_name(cache) == {"api": "v2", "db": "d1"}
    assert len(files(tmp_path)) == 2
    assert cache.remove(CLUSTER, "api") is True
    assert cache.remove(CLUSTER, "api") is False
    assert by_name(cache) == {"db": "d1"}
    assert len(files(tmp_path)) == 1


def test_retain_keeps_the_directory_to_what_is_applied(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path)
    for name in ("a", "b", "c"):
        put(cache, CLUSTER, name, "v1", cluster(name))
    cache.write_meta({"system_version_info": "s1"})
    (tmp_path / "README").write_text("not ours")
    assert cache.retain([(CLUSTER, "b"), (LISTENER, "x")]) == 2
    assert by_name(cache) == {"b": "v1"}
    assert sorted(files(tmp_path)) == sorted(["README", "meta.cbor", cache.path_for(CLUSTER, "b").name])


def test_store_many_is_all_or_nothing_on_encoding(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path)
    good = cluster("a")
    entries = [
        (CLUSTER, "a", "v1", good, cose.sign_resource(KEY, CLUSTER, "a", "v1", good)),
        (CLUSTER, "b", "v1", {"x": object()}, b"sig"),
    ]
    with pytest.raises(XdsCacheError, match="cannot encode"):
        cache.store_many(entries)
    assert files(tmp_path) == []
    cache.store_many(entries[:1])
    assert by_name(cache) == {"a": "v1"}


def test_oversized_resources_are_refused(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path, max_resource_size=1024)
    put(cache, CLUSTER, "api", "v1", cluster("api"))
    big = {**cluster("api"), "blob": "x" * 2000}
    with pytest.raises(XdsCacheError, match="exceeds the cache limit of 1024"):
        put(cache, CLUSTER, "api", "v2", big)
    assert by_name(cache) == {"api": "v1"}  # the old version is intact
    # A file that grew past the limit on disk (another config, or an attacker) is skipped, not read whole.
    XdsCache(tmp_path, max_resource_size=4096).store(CLUSTER, "big", "v", big, b"s")
    loaded = cache.load(TRUSTED)
    assert [r.name for r in loaded.resources] == ["api"]
    assert loaded.problems == ((cache.path_for(CLUSTER, "big"), "too large: over 1024 bytes"),)
    with pytest.raises(ValueError, match="greater than 0"):
        XdsCache(tmp_path, max_resource_size=0)


def test_default_limit_is_4_mib() -> None:
    assert xds_cache.DEFAULT_MAX_RESOURCE_SIZE == 4 * 1024 * 1024


def _tamper(path: Path, edit: Any) -> None:
    record = cbor2.loads(path.read_bytes())
    record = dict(record)
    edit(record)
    path.write_bytes(cbor2.dumps(record))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda r: r["resource"].update(port=6666), "signature: bad signature"),
        (lambda r: r.update(version="v9"), "signature: bad signature"),
        (
            lambda r: r.update(signature=r["signature"][:-1] + bytes([r["signature"][-1] ^ 1])),
            "signature: bad signature",
        ),
        (lambda r: r.update(signature=b""), "signature: missing signature"),
        (
            lambda r: r.update(
                signature=cose.sign_resource(
                    Ed25519PrivateKey.generate(), CLUSTER, "api", "v1", cluster("api")
                )
            ),
            "signature: unknown key id",
        ),
        (lambda r: r.update(name="other"), "misplaced: the file name does not match its type_url and name"),
        (lambda r: r.pop("signature"), "corrupt: missing signature"),
        (lambda r: r.update(resource=[1]), "corrupt: resource must be a map and signature a bstr"),
        (lambda r: r.update(version=1), "corrupt: type_url, name and version must be strings"),
        (lambda r: r.update(stored_at="now"), "corrupt: stored_at must be a number"),
    ],
)
def test_a_bad_file_is_skipped_with_a_reason(tmp_path: Path, edit: Any, expected: str) -> None:
    cache = XdsCache(tmp_path)
    path = put(cache, CLUSTER, "api", "v1", cluster("api"))
    put(cache, CLUSTER, "db", "d1", cluster("db"))
    _tamper(path, edit)
    loaded = cache.load(TRUSTED)
    assert [r.name for r in loaded.resources] == ["db"]
    assert loaded.problems == ((path, expected),)
    assert path.exists()  # kept by default: a fixed trust list may accept it, the next store replaces it


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "corrupt: not one CBOR item (CBORDecodeEOF)"),
        (b"\xa1", "corrupt: not one CBOR item (CBORDecodeEOF)"),
        (cbor2.dumps([1, 2]), "corrupt: not a map"),
        (b"\xff\x00garbage", "corrupt: not one CBOR item (CBORDecodeValueError)"),
    ],
)
def test_garbage_files_are_skipped(tmp_path: Path, content: bytes, expected: str) -> None:
    cache = XdsCache(tmp_path)
    path = cache.path_for(CLUSTER, "x")
    path.write_bytes(content)
    loaded = cache.load(TRUSTED)
    assert loaded.resources == ()
    assert len(loaded.problems) == 1
    assert loaded.problems[0][0] == path
    assert loaded.problems[0][1].split(" (")[0] == expected.split(" (")[0]


def test_truncated_file_at_every_length_is_skipped_never_raised(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path)
    path = put(cache, CLUSTER, "api", "v1", cluster("api"))
    full = path.read_bytes()
    for n in range(len(full)):
        path.write_bytes(full[:n])
        loaded = cache.load(TRUSTED)
        assert loaded.resources == ()
        assert [reason.split(":")[0] for _, reason in loaded.problems] == ["corrupt"], n
    path.write_bytes(full + b"\x00")
    assert cache.load(TRUSTED).problems == ((path, "corrupt: not one CBOR item (ValueError)"),)


def test_discard_invalid_deletes_bad_files(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path)
    path = put(cache, CLUSTER, "api", "v1", cluster("api"))
    put(cache, CLUSTER, "db", "d1", cluster("db"))
    path.write_bytes(path.read_bytes()[:10])
    assert len(cache.load(TRUSTED, discard_invalid=True).problems) == 1
    assert not path.exists()
    assert cache.load(TRUSTED).problems == ()


def test_a_rotated_out_key_makes_the_cache_unusable_but_a_rotation_keeps_it(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path)
    put(cache, CLUSTER, "api", "v1", cluster("api"))
    new = Ed25519PrivateKey.generate().public_key()
    assert [r.name for r in cache.load(cose.trusted_keys([new, KEY.public_key()])).resources] == ["api"]
    loaded = cache.load(cose.trusted_keys([new]))
    assert loaded.resources == ()
    assert [reason for _, reason in loaded.problems] == ["signature: unknown key id"]


def test_crash_between_write_and_rename_leaves_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = XdsCache(tmp_path)
    put(cache, CLUSTER, "api", "v1", cluster("api"))

    def crash(src: Any, dst: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(xds_cache.os, "replace", crash)
    with pytest.raises(XdsCacheError, match="Input/output error"):
        put(cache, CLUSTER, "api", "v2", cluster("api", 9090))
    monkeypatch.undo()
    assert by_name(cache) == {"api": "v1"}
    assert len(files(tmp_path)) == 1  # the temp file of the failed write is gone too


def test_temp_files_left_by_a_crash_are_ignored_and_cleaned(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path)
    path = put(cache, CLUSTER, "api", "v1", cluster("api"))
    # What a power cut leaves: a half-written temp file beside the old version (same prefix mkstemp uses),
    # and a complete one that never got renamed.
    partial = tmp_path / f".{path.stem}.abc123.tmp"
    partial.write_bytes(path.read_bytes()[:7])
    newer = cluster("api", 9090)
    whole = tmp_path / f".{path.stem}.def456.tmp"
    XdsCache(tmp_path / "elsewhere").store(
        CLUSTER, "api", "v2", newer, cose.sign_resource(KEY, CLUSTER, "api", "v2", newer)
    )
    whole.write_bytes((tmp_path / "elsewhere" / path.name).read_bytes())
    loaded = cache.load(TRUSTED)
    assert loaded.problems == ()
    assert loaded.removed_temp == 2
    assert [(r.name, r.version) for r in loaded.resources] == [("api", "v1")]
    assert not partial.exists()
    assert not whole.exists()


def test_concurrent_stores_of_one_name_leave_one_whole_version(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path)
    other = XdsCache(tmp_path)  # a second writer on the same directory (its own lock)
    versions = [f"v{i}" for i in range(40)]
    signed = {v: cose.sign_resource(KEY, CLUSTER, "api", v, cluster("api", int(v[1:]))) for v in versions}
    start = threading.Barrier(8)

    def writer(k: int) -> None:
        start.wait(timeout=10)
        for v in versions[k::8]:
            (cache if k % 2 else other).store(CLUSTER, "api", v, cluster("api", int(v[1:])), signed[v])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    loaded = cache.load(TRUSTED)
    assert loaded.problems == ()
    assert loaded.removed_temp == 0
    assert len(loaded.resources) == 1
    assert loaded.resources[0].version in versions
    assert loaded.resources[0].resource == cluster("api", int(loaded.resources[0].version[1:]))
    # Sequentially, the last store wins.
    put(cache, CLUSTER, "api", "last", cluster("api", 1))
    assert by_name(cache) == {"api": "last"}
    assert len(files(tmp_path)) == 1


def test_meta_round_trip(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path, clock=lambda: 99.0)
    assert cache.read_meta() is None
    cache.write_meta({"system_version_info": "s1", "node": "dev-1"})
    assert cache.read_meta() == {"system_version_info": "s1", "node": "dev-1", "saved_at": 99.0}
    (tmp_path / "meta.cbor").write_bytes(b"\xa3")
    assert cache.read_meta() is None
    assert cache.load(TRUSTED).problems == ()  # meta is not a resource


def test_unusable_directory_is_a_cache_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(XdsCacheError, match="cannot create the cache directory"):
        XdsCache(blocker / "cache")


def test_load_of_a_vanished_directory_is_empty(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path / "gone")
    os.rmdir(tmp_path / "gone")
    loaded = cache.load(TRUSTED)
    assert (loaded.resources, loaded.problems, loaded.removed_temp) == ((), (), 0)


def test_repr(tmp_path: Path) -> None:
    cache = XdsCache(tmp_path)
    put(cache, CLUSTER, "api", "v1", cluster("api"))
    assert repr(cache) == f"<XdsCache {str(tmp_path)!r} max=4194304 stores=1 removes=0>"
