"""Targeting and staged rollouts, sans-IO: the store's rollout state, the catalog and ``select``, and the
delta stream an agent sees (no sockets)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cpl_testing import FakeClock, cluster
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from microenvoy.xds.messages import DeltaRequest, ErrorDetail, Node

from controlplane_lite.cli import render_status
from controlplane_lite.delta import Acked, DeltaStream, Nacked, Sent, in_first_stage, select, stage_bucket
from controlplane_lite.rollout import build_catalog, find_rollout, progress
from controlplane_lite.store import Store
from controlplane_lite.versions import CLUSTER, resource_version

KEY = Ed25519PrivateKey.generate()
V1 = cluster("api", 8080)
V2 = cluster("api", 8081)
V3 = cluster("api", 8082)


def nodes(count: int, percent: int, inside: bool, name: str = "api") -> list[str]:
    """``count`` node ids that are (or are not) in the first stage of a ``percent`` rollout of ``name``."""
    out = [f"dev-{i}" for i in range(1000) if (stage_bucket(f"dev-{i}", name) < percent * 100) == inside]
    return out[:count]


def connect(store: Store, *node_ids: str, **labels: str) -> None:
    for nid in node_ids:
        store.agent_connected(nid, "edge", {"firmware_profile": "tiny", **labels})


def version_for(store: Store, node_id: str, metadata: Mapping[str, Any] | None = None) -> str | None:
    """The version of cluster ``api`` that agent would be sent now (None: not at all)."""
    view = select(build_catalog(store, KEY), metadata or {}, node_id)
    r = view.get(CLUSTER, {}).get("api")
    return None if r is None else r.version


def answer(store: Store, node_id: str, kind: str, body: Mapping[str, Any], message: str = "") -> None:
    store.record_events(node_id, [(kind, CLUSTER, "api", resource_version(body), message)])


# ================================================================================= stage choice
def test_stage_bucket_is_stable_and_a_larger_percentage_keeps_the_smaller_stage() -> None:
    assert stage_bucket("dev-1", "api") == stage_bucket("dev-1", "api")
    assert 0 <= stage_bucket("dev-1", "api") < 10_000
    ids = [f"dev-{i}" for i in range(400)]
    ten = {n for n in ids if in_first_stage(n, "api", 10)}
    fifty = {n for n in ids if in_first_stage(n, "api", 50)}
    assert ten < fifty
    assert 15 < len(ten) < 70  # about 10 % of 400
    assert 150 < len(fifty) < 250
    # the choice depends on the resource name too: another resource has another first stage
    assert ten != {n for n in ids if in_first_stage(n, "other", 10)}
    assert in_first_stage("outside", "api", 1, also={"outside"})


# ===================================================================================== targeting
def test_selector_targets_agents_by_node_labels(store: Store) -> None:
    store.put(CLUSTER, "api", V1, selector={"site": "berlin", "arch": "arm64"})
    catalog = build_catalog(store, KEY)
    assert "api" in select(catalog, {"site": "berlin", "arch": "arm64", "profile": "x"})[CLUSTER]
    assert "api" in select(catalog, {"labels": {"site": "berlin", "arch": "arm64"}})[CLUSTER]
    assert "api" not in select(catalog, {"site": "berlin", "arch": "amd64"})[CLUSTER]
    assert "api" not in select(catalog, {"site": "berlin"})[CLUSTER]


def test_a_selection_change_is_a_removal_for_that_agent(store: Store) -> None:
    store.put(CLUSTER, "api", V1, selector={"site": "berlin"})
    store.put(CLUSTER, "other", cluster("other"))
    md = {"site": "berlin"}
    s = DeltaStream()
    s.set_snapshot(select(build_catalog(store, KEY), md, "n1"))
    s.on_request(DeltaRequest(CLUSTER, node=Node("n1", "", md), resource_names_subscribe=("*",)), 0.0)
    (first,), _ = s.poll(0.0)
    assert sorted(e.name for e in first.resources) == ["api", "other"]
    s.on_request(DeltaRequest(CLUSTER, response_nonce=first.nonce), 0.0)
    # the resource now targets another site: this agent loses it, like a deletion
    store.put(CLUSTER, "api", V1, selector={"site": "paris"})
    s.set_snapshot(select(build_catalog(store, KEY), md, "n1"))
    (removal,), events = s.poll(0.0)
    assert (removal.resources, removal.removed_resources) == ((), ("api",))
    assert events == [Sent(CLUSTER, "api", "")]
    # and gets it back when it matches again
    store.put(CLUSTER, "api", V1, selector={"site": "berlin"})
    s.set_snapshot(select(build_catalog(store, KEY), md, "n1"))
    (back,), _ = s.poll(0.0)
    assert [e.name for e in back.resources] == ["api"]


def test_flat_and_labels_selector_forms_in_documents() -> None:
    from microenvoy.core.errors import ConfigError

    from controlplane_lite.sources import parse_documents

    (a, b) = parse_documents(
        "type: cluster\nselector: {site: x, arch: arm64}\nresource: {name: a}\n---\n"
        "type: cluster\nselector: {labels: {site: x}, profile: p}\nresource: {name: b}\n",
        "f.yaml",
    )
    assert dict(a.selector) == {"site": "x", "arch": "arm64"}
    assert dict(b.selector) == {"site": "x", "profile": "p"}
    with pytest.raises(ConfigError) as info:
        parse_documents("type: cluster\nselector: {site: 12}\nresource: {name: a}\n", "f.yaml")
    assert info.value.errors == ["f.yaml[0].selector.site: expected a string, got 12 (quote it)"]


# ======================================================================================= rollouts
def test_a_staged_change_goes_to_the_first_stage_only(store: Store) -> None:
    inside, outside = nodes(2, 25, True), nodes(2, 25, False)
    connect(store, *inside, *outside)
    store.put(CLUSTER, "api", V1)
    assert store.rollouts() == []
    assert store.put(CLUSTER, "api", V2, rollout_percent=25)
    (ro,) = store.rollouts()
    assert (ro.version, ro.previous_version, ro.percent, ro.state) == (
        resource_version(V2),
        resource_version(V1),
        25,
        "running",
    )
    for nid in inside:
        assert version_for(store, nid) == resource_version(V2)
    for nid in outside:
        assert version_for(store, nid) == resource_version(V1)


def test_the_rollout_completes_when_every_first_stage_agent_acked(store: Store) -> None:
    inside, outside = nodes(2, 25, True), nodes(2, 25, False)
    connect(store, *inside, *outside)
    store.put(CLUSTER, "api", V1)
    store.put(CLUSTER, "api", V2, rollout_percent=25)
    gen = store.generation()
    answer(store, inside[0], "acked", V2)
    answer(store, outside[0], "acked", V1)
    assert store.rollouts()[0].state == "running"
    assert store.generation() == gen  # nothing for the server to rebuild yet
    answer(store, inside[1], "acked", V2)
    (ro,) = store.rollouts()
    assert ro.state == "complete"
    assert "first stage ACKed (2 agents)" in ro.reason
    assert store.generation() > gen  # the server rebuilds: the rest of the fleet gets it
    for nid in outside:
        assert version_for(store, nid) == resource_version(V2)


def test_a_disconnected_first_stage_agent_does_not_block(store: Store) -> None:
    inside, outside = nodes(2, 25, True), nodes(1, 25, False)
    connect(store, *inside, *outside)
    store.put(CLUSTER, "api", V1)
    store.put(CLUSTER, "api", V2, rollout_percent=25)
    answer(store, inside[0], "acked", V2)
    assert store.rollouts()[0].state == "running"
    store.agent_disconnected(inside[1])
    assert store.rollouts()[0].state == "complete"


def test_any_nack_halts_the_rollout_and_nobody_else_gets_it(store: Store) -> None:
    inside, outside = nodes(2, 25, True), nodes(2, 25, False)
    connect(store, *inside, *outside)
    store.put(CLUSTER, "api", V1)
    store.put(CLUSTER, "api", V2, rollout_percent=25)
    answer(store, inside[0], "acked", V2)
    gen = store.generation()
    answer(store, inside[1], "nacked", V2, "port 8081 refused")
    (ro,) = store.rollouts()
    assert ro.state == "halted"
    assert ro.reason == f"{inside[1]} NACKed: port 8081 refused"
    assert store.generation() > gen
    # a late ACK of the last stage agent does not restart it
    answer(store, inside[1], "acked", V2)
    assert store.rollouts()[0].state == "halted"
    for nid in outside:
        assert version_for(store, nid) == resource_version(V1)
    # status shows it: stage, counts, state and the NACK message
    text = render_status(store)
    assert "halted" in text
    assert "port 8081 refused" in text
    assert "first 25% (2 agents)" in text
    (p,) = progress(store)
    assert p.as_json()["nacked"] == 1
    assert p.as_json()["nacks"] == [{"node": inside[1], "message": "port 8081 refused"}]


def test_a_fixed_version_supersedes_a_halted_rollout_from_the_same_base(store: Store) -> None:
    inside, outside = nodes(1, 25, True), nodes(1, 25, False)
    connect(store, *inside, *outside)
    store.put(CLUSTER, "api", V1)
    store.put(CLUSTER, "api", V2, rollout_percent=25)
    answer(store, inside[0], "nacked", V2, "bad")
    store.put(CLUSTER, "api", V3, rollout_percent=25)
    first, second = store.rollouts()
    assert (first.state, second.state) == ("superseded", "running")
    assert second.previous_version == resource_version(V1)  # the rest still run V1
    assert version_for(store, outside[0]) == resource_version(V1)
    assert version_for(store, inside[0]) == resource_version(V3)
    # going back to the previous version ends the rollout: everyone runs it
    store.put(CLUSTER, "api", V1, rollout_percent=25)
    assert [r.state for r in store.rollouts()] == ["superseded", "superseded"]
    assert version_for(store, inside[0]) == resource_version(V1)


def test_promote_by_hand_and_force_for_a_halted_one(store: Store) -> None:
    inside, outside = nodes(1, 10, True), nodes(1, 10, False)
    connect(store, *inside, *outside)
    store.put(CLUSTER, "api", V1)
    store.put(CLUSTER, "api", V2, rollout_percent=10)
    ro = find_rollout(store, "cluster/api")
    assert find_rollout(store, "api") == ro == find_rollout(store, str(ro.id))
    done = store.promote_rollout(ro.id)
    assert (done.state, done.reason) == ("complete", "promoted by hand")
    assert version_for(store, outside[0]) == resource_version(V2)
    with pytest.raises(ValueError, match="is complete"):
        store.promote_rollout(ro.id)
    store.put(CLUSTER, "api", V3, rollout_percent=10)
    answer(store, inside[0], "nacked", V3, "no")
    halted = store.rollouts()[-1]
    with pytest.raises(ValueError, match="use force"):
        store.promote_rollout(halted.id)
    assert store.promote_rollout(halted.id, force=True).reason.startswith("promoted by hand after:")
    with pytest.raises(LookupError):
        store.promote_rollout(999)
    with pytest.raises(LookupError):
        find_rollout(store, "listener/api")


def test_a_new_resource_under_rollout_reaches_only_the_first_stage(store: Store) -> None:
    store.put(CLUSTER, "base", cluster("base"))
    inside, outside = nodes(1, 30, True), nodes(1, 30, False)
    connect(store, *inside, *outside)
    store.put(CLUSTER, "api", V1, rollout_percent=30)
    (ro,) = store.rollouts()
    assert ro.previous_version is None
    assert version_for(store, inside[0]) == resource_version(V1)
    assert version_for(store, outside[0]) is None


def test_deleting_cancels_and_targeting_changes_adjust_the_rollout(store: Store) -> None:
    connect(store, *nodes(1, 20, True), *nodes(1, 20, False))
    store.put(CLUSTER, "api", V1)
    store.put(CLUSTER, "api", V2, rollout_percent=20)
    assert store.put(CLUSTER, "api", V2, rollout_percent=60)
    assert store.rollouts()[0].percent == 60
    store.put(CLUSTER, "api", V2)  # no percentage any more: everyone
    assert store.rollouts()[0].state == "complete"
    store.put(CLUSTER, "api", V3, rollout_percent=20)
    assert store.delete(CLUSTER, "api")
    assert [r.state for r in store.rollouts()] == ["complete", "cancelled"]


def test_a_small_fleet_still_has_a_first_stage(store: Store) -> None:
    # nobody of these three falls under 1 %: the lowest bucket is the first stage, and stays it
    fleet = nodes(3, 1, False)
    connect(store, *fleet)
    store.put(CLUSTER, "api", V1)
    store.put(CLUSTER, "api", V2, rollout_percent=1)
    (ro,) = store.rollouts()
    chosen = min(fleet, key=lambda n: stage_bucket(n, "api"))
    assert ro.stage == (chosen,)
    got = {n: version_for(store, n) for n in fleet}
    assert got[chosen] == resource_version(V2)
    assert sorted(v for n, v in got.items() if n != chosen) == [resource_version(V1)] * 2
    answer(store, chosen, "acked", V2)
    assert store.rollouts()[0].state == "complete"


def test_the_fallback_stage_is_picked_when_the_first_agent_connects(store: Store, clock: FakeClock) -> None:
    store.put(CLUSTER, "api", V1)
    store.put(CLUSTER, "api", V2, rollout_percent=1)
    assert store.rollouts()[0].stage == ()
    (late,) = nodes(1, 1, False)
    gen = store.generation()
    connect(store, late)
    assert store.rollouts()[0].stage == (late,)
    assert store.generation() > gen


def test_selector_limits_the_stage_and_the_completion(store: Store) -> None:
    inside = nodes(3, 50, True)
    connect(store, inside[0], inside[1], site="a")
    connect(store, inside[2], site="b")  # in the hash range, but not targeted
    store.put(CLUSTER, "api", V1, selector={"site": "a"})
    store.put(CLUSTER, "api", V2, selector={"site": "a"}, rollout_percent=50)
    (p,) = progress(store)
    assert sorted(p.stage) == sorted(inside[:2])
    assert p.matching == 2
    answer(store, inside[0], "acked", V2)
    answer(store, inside[1], "acked", V2)
    assert store.rollouts()[0].state == "complete"


def test_stream_events_drive_the_rollout(store: Store) -> None:
    """The delta stream's Acked/Nacked events, recorded as the server does, move the rollout."""
    (inside,) = nodes(1, 50, True)
    connect(store, inside)
    store.put(CLUSTER, "api", V1)
    store.put(CLUSTER, "api", V2, rollout_percent=50)
    s = DeltaStream()
    s.set_snapshot(select(build_catalog(store, KEY), {}, inside))
    s.on_request(DeltaRequest(CLUSTER, node=Node(inside), resource_names_subscribe=("*",)), 0.0)
    (resp,), _ = s.poll(0.0)
    assert resp.resources[0].version == resource_version(V2)
    events = s.on_request(
        DeltaRequest(CLUSTER, response_nonce=resp.nonce, error_detail=ErrorDetail(message="nope")), 0.0
    )
    assert events == [Nacked(CLUSTER, "api", resource_version(V2), "nope")]
    rows = [("nacked", e.type_url, e.name, e.version, e.message) for e in events if isinstance(e, Nacked)]
    store.record_events(inside, rows)
    assert store.rollouts()[0].state == "halted"
    assert not any(isinstance(e, Acked) for e in events)


def test_push_of_a_staged_change_and_the_rollout_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from controlplane_lite.cli import main

    data = str(tmp_path / "data")
    f = tmp_path / "api.yaml"
    f.write_text("type: cluster\nresource: {name: api, connect_timeout: 1s}\n")
    assert main(["push", "--data", data, str(f)]) == 0
    f.write_text("type: cluster\nrollout: {percent: 20}\nresource: {name: api, connect_timeout: 2s}\n")
    assert main(["push", "--data", data, str(f)]) == 0
    assert "(rollout 1: first 20% of the matching agents)" in capsys.readouterr().out
    assert main(["rollout", "list", "--data", data]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["ROLLOUT", "RESOURCE", "VERSION", "STAGE", "ACKED", "NACKED",
                                           "STATE", "REASON"]  # fmt: skip
    assert "first 20% (0 agents)" in out
    assert main(["rollout", "promote", "--data", data]) == 2
    assert main(["rollout", "promote", "listener/api", "--data", data]) == 1
    assert "no rollout of 'listener/api'" in capsys.readouterr().err
    assert main(["rollout", "promote", "1", "--data", data]) == 0
    assert main(["rollout", "promote", "1", "--data", data]) == 1
    assert "rollout 1 is complete" in capsys.readouterr().err
