from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from cpl_testing import cluster, listener
from microenvoy.core.errors import ConfigError

from controlplane_lite.apply import apply_change, stored_specs
from controlplane_lite.sources import DirectoryWatcher, load_directory, parse_documents
from controlplane_lite.store import Store
from controlplane_lite.versions import CLUSTER, ENDPOINT, LISTENER, resource_version


def doc(kind: str, resource: dict[str, object], **extra: object) -> dict[str, object]:
    r = {k: v for k, v in resource.items() if k != "@type"}
    return {"type": kind, "resource": r, **extra}


def write(path: Path, *docs: dict[str, object]) -> None:
    path.write_text(yaml.safe_dump_all(list(docs)))


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_parse_documents_full_form() -> None:
    text = """
type: cluster
selector: {labels: {site: berlin}}
rollout: {percent: 10}
ttl: 30s
resource:
  name: api
  connect_timeout: 1s
---
---
type: endpoint
name: api-eds
resource:
  endpoints: []
"""
    a, b = parse_documents(text, "c.yaml", "dir:c.yaml")
    assert (a.type_url, a.name, a.ttl, a.rollout_percent) == (CLUSTER, "api", 30.0, 10)
    assert dict(a.selector) == {"site": "berlin"}
    assert a.resource["@type"] == CLUSTER
    assert a.origin == "c.yaml[0]"
    assert a.version == resource_version(a.resource)
    assert (b.type_url, b.name, b.origin) == (ENDPOINT, "api-eds", "c.yaml[2]")
    assert b.resource["cluster_name"] == "api-eds"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("type: clustr\nresource: {name: a}", "c.yaml[0].type: unknown value 'clustr'"),
        ("type: cluster\n", "c.yaml[0].resource: required field is missing"),
        ("type: cluster\nresource: [1]", "c.yaml[0].resource: expected a mapping"),
        ("type: cluster\nresource: {}", "c.yaml[0].resource.name: required field is missing"),
        ("type: cluster\nname: b\nresource: {name: a}", "c.yaml[0].name: 'a' differs"),
        ("type: cluster\nresource: {name: a}\nbogus: 1", "c.yaml[0].bogus: unknown field"),
        ("type: cluster\nresource: {name: a}\nttl: soon", "c.yaml[0].ttl: expected a duration"),
        (
            "type: cluster\nresource: {name: a}\nrollout: {percent: 0}",
            "c.yaml[0].rollout.percent: must be >=",
        ),
        ("type: cluster\nresource: {name: a, d: 2024-01-01}", "c.yaml[0].resource.d: unsupported value"),
        ("type: cluster\nresource: {name: a, name: b}", "c.yaml:2:21: invalid YAML: found duplicate key"),
        ("type: cluster\nresource: {name: a, '@type': x}", "c.yaml[0].resource.@type: expected"),
        ("type: [", "c.yaml:1:"),
    ],
)
def test_parse_documents_errors_carry_the_place(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_documents(text, "c.yaml")
    assert any(e.startswith(expected) for e in info.value.errors), info.value.errors


def test_load_directory_and_duplicates(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", doc("cluster", cluster("api")))
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "b.yml", doc("listener", listener("edge")))
    (tmp_path / ".hidden.yaml").write_text("garbage: [")
    (tmp_path / "notes.txt").write_text("ignored")
    specs = load_directory(str(tmp_path))
    assert set(specs) == {(CLUSTER, "api"), (LISTENER, "edge")}
    assert specs[(LISTENER, "edge")].source == os.path.join("dir:sub", "b.yml")
    write(tmp_path / "c.yaml", doc("cluster", cluster("api")))
    with pytest.raises(ConfigError) as info:
        load_directory(str(tmp_path))
    assert info.value.errors == ["c.yaml[0]: 'api' is already declared in a.yaml[0]"]


def test_watcher_reports_changes_and_removals(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    write(f, doc("cluster", cluster("api")), doc("cluster", cluster("old")))
    w = DirectoryWatcher(str(tmp_path))
    first = w.poll()
    assert first is not None
    assert set(first.upserts) == {(CLUSTER, "api"), (CLUSTER, "old")}
    w.accept(first)
    assert w.poll() is None  # nothing touched
    write(f, doc("cluster", cluster("api", port=9090)), doc("cluster", cluster("new")))
    bump_mtime(f)
    change = w.poll()
    assert change is not None
    assert set(change.upserts) == {(CLUSTER, "api"), (CLUSTER, "new")}
    assert change.removals == {(CLUSTER, "old")}


def test_watcher_keeps_last_good_on_error(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    write(f, doc("cluster", cluster("api")))
    w = DirectoryWatcher(str(tmp_path))
    change = w.poll()
    assert change is not None
    w.accept(change)
    f.write_text("type: cluster\nresource: {name: api, lb_policy: [}\n")
    bump_mtime(f)
    with pytest.raises(ConfigError):
        w.poll()
    assert w.last_errors
    assert set(w.current) == {(CLUSTER, "api")}
    assert w.poll() is None  # the broken file is not reloaded until it changes


def test_apply_change_validates_before_writing(tmp_path: Path, store: Store) -> None:
    write(tmp_path / "a.yaml", doc("cluster", cluster("api")), doc("listener", listener("edge")))
    specs = load_directory(str(tmp_path))
    applied = apply_change(store, specs.values())
    assert set(applied.upserts) == set(specs)
    assert stored_specs(store, "dir:").keys() == specs.keys()
    gen = store.generation()
    # removing the cluster the listener routes to is refused, nothing is written
    with pytest.raises(ConfigError) as info:
        apply_change(store, [], [(CLUSTER, "api")])
    assert "Listener 'edge'" in info.value.errors[0]
    assert store.generation() == gen
    # a bad field: refused with the file place
    write(
        tmp_path / "a.yaml",
        doc("cluster", cluster("api", lb_policy="NOPE")),
        doc("listener", listener("edge")),
    )
    bad = load_directory(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        apply_change(store, bad.values())
    assert info.value.errors[0].startswith("a.yaml[0] Cluster 'api': lb_policy: unknown value 'NOPE'")
    assert store.generation() == gen
    # unchanged content changes nothing
    assert not apply_change(store, specs.values())
