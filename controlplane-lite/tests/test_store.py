from __future__ import annotations

import os

from cpl_testing import FakeClock

from controlplane_lite.store import Store
from controlplane_lite.versions import CLUSTER, LISTENER, resource_version

RES = {"@type": CLUSTER, "name": "a", "connect_timeout": "1s"}


def test_put_get_and_version(store: Store) -> None:
    assert store.put(CLUSTER, "a", RES, selector={"site": "x"}, ttl=30.0, source="api")
    got = store.get(CLUSTER, "a")
    assert got is not None
    assert got.version == resource_version(RES)
    assert dict(got.resource) == RES
    assert dict(got.selector) == {"site": "x"}
    assert got.ttl == 30.0
    assert got.source == "api"


def test_same_content_is_no_change(store: Store) -> None:
    assert store.put(CLUSTER, "a", RES)
    g = store.generation()
    assert not store.put(CLUSTER, "a", dict(reversed(list(RES.items()))))
    assert store.generation() == g
    assert len(store.history(CLUSTER, "a")) == 1


def test_targeting_change_is_a_change_without_new_history(store: Store) -> None:
    store.put(CLUSTER, "a", RES)
    assert store.put(CLUSTER, "a", RES, selector={"site": "b"})
    assert len(store.history(CLUSTER, "a")) == 1


def test_history_keeps_every_version_and_deletions(store: Store, clock: FakeClock) -> None:
    store.put(CLUSTER, "a", RES)
    clock.now += 1
    v2 = {**RES, "connect_timeout": "2s"}
    store.put(CLUSTER, "a", v2)
    clock.now += 1
    assert store.delete(CLUSTER, "a")
    assert not store.delete(CLUSTER, "a")
    hist = store.history(CLUSTER, "a")
    assert [h.version for h in hist] == [resource_version(RES), resource_version(v2), None]
    assert hist[0].stored_at < hist[1].stored_at < hist[2].stored_at
    assert store.get(CLUSTER, "a") is None
    assert store.version_body(CLUSTER, "a", resource_version(RES)) == RES


def test_generation_bumps_on_change(store: Store) -> None:
    g0 = store.generation()
    store.put(CLUSTER, "a", RES)
    store.delete(CLUSTER, "a")
    assert store.generation() == g0 + 2


def test_resources_listing(store: Store) -> None:
    store.put(LISTENER, "l", {"@type": LISTENER, "name": "l"})
    store.put(CLUSTER, "b", RES)
    store.put(CLUSTER, "a", RES)
    assert [r.name for r in store.resources(CLUSTER)] == ["a", "b"]
    assert len(store.resources()) == 3


def test_agent_status(store: Store, clock: FakeClock) -> None:
    store.agent_connected("n1", "edge", {"profile": "tiny", "site": "s1"})
    store.record_sent("n1", CLUSTER, "a", "v1")
    store.record_ack("n1", CLUSTER, "a", "v1")
    clock.now += 5
    store.record_sent("n1", CLUSTER, "a", "v2")
    store.record_nack("n1", CLUSTER, "a", "v2", "bad lb_policy")
    (agent,) = store.agents()
    assert agent.connected
    assert agent.connected_since == 1000.0
    assert agent.metadata["profile"] == "tiny"
    (res,) = store.agent_resources("n1")
    assert (res.sent_version, res.acked_version, res.nack_version) == ("v2", "v1", "v2")
    assert res.nack_message == "bad lb_policy"
    assert res.nack_at == 1005.0
    store.agent_disconnected("n1")
    (agent,) = store.agents()
    assert not agent.connected
    assert agent.connected_since is None


def test_two_streams_of_one_agent(store: Store) -> None:
    store.agent_connected("n1", "", {})
    store.agent_connected("n1", "", {})
    store.agent_disconnected("n1")
    assert store.agents()[0].connected
    store.agent_disconnected("n1")
    assert not store.agents()[0].connected


def test_reset_connections(store: Store) -> None:
    store.agent_connected("n1", "", {})
    store.reset_connections()
    assert not store.agents()[0].connected


def test_rollouts(store: Store) -> None:
    rid = store.start_rollout(CLUSTER, "a", "v1", 10)
    store.set_rollout_state(rid, "halted", "n1 NACKed: bad")
    (r,) = store.rollouts()
    assert (r.state, r.reason, r.percent) == ("halted", "n1 NACKed: bad", 10)


def test_file_store_is_shared_between_connections(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "cp.sqlite")
    a, b = Store(path), Store(path)
    try:
        g = b.generation()
        a.put(CLUSTER, "a", RES)
        assert b.generation() == g + 1
        assert b.get(CLUSTER, "a") is not None
        assert a._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        a.close()
        b.close()
