"""The delta server state machine, rule by rule (DELTA.md), as scripts of request in, responses out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from microenvoy.xds.messages import DeltaRequest, DeltaResponse, ErrorDetail, Node

from controlplane_lite.delta import Acked, DeltaStream, Nacked, Resource, Sent, StaleNonce, matches, select
from controlplane_lite.versions import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, resource_version


def res(type_url: str, name: str, rev: int = 1, *, ttl: float | None = None, clusters: tuple[str, ...] = (),
        selector: Mapping[str, str] | None = None) -> Resource:  # fmt: skip
    body: dict[str, Any] = {"@type": type_url, "name": name, "rev": rev}
    return Resource(
        type_url, name, resource_version(body), body, b"sig:" + name.encode(), ttl, frozenset(clusters),
        selector or {},
    )  # fmt: skip


def snap(*resources: Resource) -> dict[str, dict[str, Resource]]:
    out: dict[str, dict[str, Resource]] = {}
    for r in resources:
        out.setdefault(r.type_url, {})[r.name] = r
    return out


def req(type_url: str, *, sub: tuple[str, ...] = (), unsub: tuple[str, ...] = (), nonce: str = "",
        initial: dict[str, str] | None = None, nack: str | None = None,
        details: dict[str, str] | None = None, node: bool = False) -> DeltaRequest:  # fmt: skip
    return DeltaRequest(
        type_url=type_url,
        node=Node("n1", "edge", {"site": "a"}) if node else None,
        resource_names_subscribe=sub,
        resource_names_unsubscribe=unsub,
        initial_resource_versions=initial or {},
        response_nonce=nonce,
        error_detail=None if nack is None else ErrorDetail(message=nack, details=details or {}),
    )


def names(r: DeltaResponse) -> list[str]:
    return [e.name for e in r.resources]


def poll(s: DeltaStream, now: float = 0.0) -> list[DeltaResponse]:
    return s.poll(now)[0]


def ack(s: DeltaStream, r: DeltaResponse) -> list[object]:
    return list(s.on_request(req(r.type_url, nonce=r.nonce), 0.0))


def test_wildcard_first_request_gets_everything_signed() -> None:
    s = DeltaStream(nonce_prefix="x-")
    s.set_snapshot(snap(res(CLUSTER, "a"), res(CLUSTER, "b")), version_info="g1")
    assert s.on_request(req(CLUSTER, sub=("*",), node=True), 0.0) == []
    assert s.node is not None
    assert s.node.id == "n1"
    (r,), events = s.poll(0.0)
    assert r.type_url == CLUSTER
    assert names(r) == ["a", "b"]
    assert r.nonce == "x-1"
    assert r.system_version_info == "g1"
    assert all(e.signature == b"sig:" + e.name.encode() and e.resource is not None for e in r.resources)
    assert events == [Sent(CLUSTER, "a", r.resources[0].version), Sent(CLUSTER, "b", r.resources[1].version)]
    assert poll(s) == []  # nothing more until something changes


def test_legacy_wildcard_empty_first_subscribe() -> None:
    s = DeltaStream()
    s.set_snapshot(snap(res(LISTENER, "l")))
    s.on_request(req(LISTENER), 0.0)
    assert names(poll(s)[0]) == ["l"]
    # not for non-wildcard types
    s.set_snapshot(snap(res(LISTENER, "l"), res(ROUTE, "r")))
    s.on_request(req(ROUTE), 0.0)
    assert poll(s) == []


def test_ack_then_only_changes_are_sent() -> None:
    s = DeltaStream()
    a1, b1 = res(CLUSTER, "a"), res(CLUSTER, "b")
    s.set_snapshot(snap(a1, b1))
    s.on_request(req(CLUSTER, sub=("*",)), 0.0)
    (r,) = poll(s)
    assert ack(s, r) == [Acked(CLUSTER, "a", a1.version), Acked(CLUSTER, "b", b1.version)]
    a2 = res(CLUSTER, "a", 2)
    s.set_snapshot(snap(a2, b1))
    (r2,) = poll(s)
    assert names(r2) == ["a"]
    assert r2.resources[0].version == a2.version
    assert r2.nonce != r.nonce


def test_nonces_are_unique_per_stream() -> None:
    s = DeltaStream()
    s.on_request(req(CLUSTER, sub=("*",)), 0.0)
    seen = set()
    for i in range(20):
        s.set_snapshot(snap(res(CLUSTER, "a", i)))
        (r,) = poll(s)
        assert r.nonce not in seen
        seen.add(r.nonce)


def test_nack_with_details_names_only_the_bad_ones_and_is_never_resent() -> None:
    s = DeltaStream()
    good, bad = res(CLUSTER, "good"), res(CLUSTER, "bad")
    s.set_snapshot(snap(good, bad))
    s.on_request(req(CLUSTER, sub=("*",)), 0.0)
    (r,) = poll(s)
    events = s.on_request(
        req(CLUSTER, nonce=r.nonce, nack="1 rejected", details={"bad": "lb_policy: nope"}), 0
    )
    assert Nacked(CLUSTER, "bad", bad.version, "lb_policy: nope") in events
    assert Acked(CLUSTER, "good", good.version) in events
    # the NACKed version is not sent again, not even after a snapshot refresh or a re-subscribe
    s.set_snapshot(snap(good, bad))
    assert poll(s) == []
    s.on_request(req(CLUSTER, sub=("bad",)), 0.0)
    assert poll(s) == []
    # a new version is
    bad2 = res(CLUSTER, "bad", 2)
    s.set_snapshot(snap(good, bad2))
    (r2,) = poll(s)
    assert names(r2) == ["bad"]
    assert ack(s, r2) == [Acked(CLUSTER, "bad", bad2.version)]


def test_nack_without_details_rejects_the_whole_response() -> None:
    s = DeltaStream()
    s.set_snapshot(snap(res(CLUSTER, "a"), res(CLUSTER, "b")))
    s.on_request(req(CLUSTER, sub=("*",)), 0.0)
    (r,) = poll(s)
    events = s.on_request(req(CLUSTER, nonce=r.nonce, nack="bad response"), 0.0)
    assert [type(e) for e in events] == [Nacked, Nacked]
    assert all(isinstance(e, Nacked) and e.message == "bad response" for e in events)


def test_reverting_to_the_acked_version_after_a_nack_is_sent() -> None:
    s = DeltaStream()
    v1 = res(CLUSTER, "a", 1)
    s.set_snapshot(snap(v1))
    s.on_request(req(CLUSTER, sub=("*",)), 0.0)
    ack(s, poll(s)[0])
    s.set_snapshot(snap(res(CLUSTER, "a", 2)))
    (r,) = poll(s)
    s.on_request(req(CLUSTER, nonce=r.nonce, nack="no"), 0.0)
    s.set_snapshot(snap(v1))
    (r,) = poll(s)
    assert r.resources[0].version == v1.version


def test_stale_nonce_changes_nothing_but_subscriptions_are_honoured() -> None:
    s = DeltaStream()
    s.set_snapshot(snap(res(ROUTE, "r1"), res(ROUTE, "r2")))
    s.on_request(req(ROUTE, sub=("r1",)), 0.0)
    (r,) = poll(s)
    ack(s, r)
    events = s.on_request(req(ROUTE, sub=("r2",), nonce=r.nonce), 0.0)  # the same nonce again: stale
    assert events == [StaleNonce(ROUTE, r.nonce)]
    (r2,) = poll(s)
    assert names(r2) == ["r2"]
    assert s.on_request(req(ROUTE, nonce="nope"), 0.0) == [StaleNonce(ROUTE, "nope")]
    # a nonce of another type is stale too
    assert s.on_request(req(CLUSTER, nonce=r2.nonce), 0.0) == [StaleNonce(CLUSTER, r2.nonce)]


def test_every_subscribed_name_is_answered_even_if_unchanged() -> None:
    s = DeltaStream()
    r1 = res(ROUTE, "r1")
    s.set_snapshot(snap(r1))
    s.on_request(req(ROUTE, sub=("r1",)), 0.0)
    ack(s, poll(s)[0])
    assert poll(s) == []
    s.on_request(req(ROUTE, sub=("r1",)), 0.0)
    (r,) = poll(s)
    assert names(r) == ["r1"]


def test_nonexistent_names_are_removed_at_once() -> None:
    s = DeltaStream()
    s.set_snapshot(snap(res(ROUTE, "r1")))
    s.on_request(req(ROUTE, sub=("r1", "ghost")), 0.0)
    (r,), events = s.poll(0.0)
    assert names(r) == ["r1"]
    assert r.removed_resources == ("ghost",)
    assert Sent(ROUTE, "ghost", "") in events
    assert ack(s, r)[-1] == Acked(ROUTE, "ghost", "")
    assert poll(s) == []


def test_unsubscribe_sends_no_removal() -> None:
    s = DeltaStream()
    s.set_snapshot(snap(res(ROUTE, "r1")))
    s.on_request(req(ROUTE, sub=("r1",)), 0.0)
    ack(s, poll(s)[0])
    s.on_request(req(ROUTE, unsub=("r1",)), 0.0)
    assert poll(s) == []
    s.set_snapshot(snap(res(ROUTE, "r1", 2)))
    assert poll(s) == []  # no longer interested


def test_reconnect_sends_only_differences_and_removes_what_disappeared() -> None:
    a, b, c = res(CLUSTER, "a"), res(CLUSTER, "b"), res(CLUSTER, "c")
    b2 = res(CLUSTER, "b", 2)
    s = DeltaStream()
    s.set_snapshot(snap(a, b2, c))
    initial = {"a": a.version, "b": b.version, "gone": "0123456789abcdef"}
    s.on_request(req(CLUSTER, sub=("*",), initial=initial, node=True), 0.0)
    responses = poll(s)
    assert [(names(r), r.removed_resources) for r in responses] == [(["b", "c"], ()), ([], ("gone",))]
    for r in responses:
        ack(s, r)
    assert poll(s) == []


def test_reconnect_with_explicit_names_not_answered_when_versions_match() -> None:
    r1, r2 = res(ROUTE, "r1"), res(ROUTE, "r2")
    s = DeltaStream()
    s.set_snapshot(snap(r1, r2))
    s.on_request(req(ROUTE, sub=("r1", "r2", "r3"), initial={"r1": r1.version, "r3": "old"}), 0.0)
    responses = poll(s)
    assert [(names(r), r.removed_resources) for r in responses] == [(["r2"], ()), ([], ("r3",))]


def test_listener_waits_for_the_ack_of_a_new_cluster() -> None:
    s = DeltaStream()
    cl = res(CLUSTER, "api")
    li = res(LISTENER, "edge", clusters=("api",))
    s.set_snapshot(snap(cl, li))
    s.on_request(req(LISTENER, sub=("*",)), 0.0)
    s.on_request(req(CLUSTER, sub=("*",)), 0.0)
    (r,) = poll(s)
    assert r.type_url == CLUSTER  # the listener is held
    assert s.held() == {(LISTENER, "edge"): frozenset({"api"})}
    assert poll(s) == []
    ack(s, r)
    (r2,) = poll(s)
    assert (r2.type_url, names(r2)) == (LISTENER, ["edge"])
    assert s.held() == {}


def test_listener_stays_held_while_its_cluster_is_nacked() -> None:
    s = DeltaStream()
    s.set_snapshot(snap(res(CLUSTER, "api"), res(ROUTE, "r", clusters=("api",))))
    s.on_request(req(CLUSTER, sub=("*",)), 0.0)
    s.on_request(req(ROUTE, sub=("r",)), 0.0)
    (r,) = poll(s)
    s.on_request(req(CLUSTER, nonce=r.nonce, nack="bad", details={"api": "bad"}), 0.0)
    assert poll(s) == []


def test_route_to_an_acked_cluster_is_not_held_by_a_cluster_update() -> None:
    s = DeltaStream()
    s.set_snapshot(snap(res(CLUSTER, "api")))
    s.on_request(req(CLUSTER, sub=("*",)), 0.0)
    s.on_request(req(ROUTE, sub=("r",)), 0.0)
    for r in poll(s):
        ack(s, r)
    s.set_snapshot(snap(res(CLUSTER, "api", 2), res(ROUTE, "r", clusters=("api",))))
    responses = poll(s)
    assert [r.type_url for r in responses] == [CLUSTER, ROUTE]  # clusters first, both in one poll


def test_updates_in_make_before_break_order_and_removals_last() -> None:
    s = DeltaStream()
    for t in (ROUTE, LISTENER, ENDPOINT, CLUSTER, SECRET):
        s.on_request(req(t, sub=("*",)), 0.0)
    old = [res(t, "old") for t in (ROUTE, LISTENER, ENDPOINT, CLUSTER, SECRET)]
    s.set_snapshot(snap(*old))
    for r in poll(s):
        ack(s, r)
    new = [res(t, "new") for t in (ROUTE, LISTENER, ENDPOINT, CLUSTER, SECRET)]
    s.set_snapshot(snap(*new))
    responses = poll(s)
    order = [(r.type_url, bool(r.resources), bool(r.removed_resources)) for r in responses]
    assert order == [
        (SECRET, True, False),
        (CLUSTER, True, False),
        (ENDPOINT, True, False),
        (LISTENER, True, False),
        (ROUTE, True, False),
        (ROUTE, False, True),
        (LISTENER, False, True),
        (ENDPOINT, False, True),
        (CLUSTER, False, True),
        (SECRET, False, True),
    ]


def test_cluster_removal_waits_until_no_listener_routes_to_it() -> None:
    s = DeltaStream()
    s.on_request(req(CLUSTER, sub=("*",)), 0.0)
    s.on_request(req(LISTENER, sub=("*",)), 0.0)
    old, new = res(CLUSTER, "old"), res(CLUSTER, "new")
    s.set_snapshot(snap(old, res(LISTENER, "edge", 1, clusters=("old",))))
    for _ in range(2):
        for r in poll(s):
            ack(s, r)
    # switch the listener from "old" to "new" and delete "old"
    s.set_snapshot(snap(new, res(LISTENER, "edge", 2, clusters=("new",))))
    (r,) = poll(s)
    assert (r.type_url, names(r), r.removed_resources) == (CLUSTER, ["new"], ())  # no removal yet
    ack(s, r)
    (li,) = poll(s)
    assert (li.type_url, names(li)) == (LISTENER, ["edge"])
    assert poll(s) == []  # the listener update is in flight: "old" is still in use
    # the agent NACKs the listener: its old version (routing to "old") stays in effect, so does "old"
    s.on_request(req(LISTENER, nonce=li.nonce, nack="no", details={"edge": "bad"}), 0.0)
    assert poll(s) == []
    s.set_snapshot(snap(new, res(LISTENER, "edge", 3, clusters=("new",))))
    (li3,) = poll(s)
    ack(s, li3)
    (rm,) = poll(s)
    assert (rm.type_url, rm.removed_resources) == (CLUSTER, ("old",))


def test_ttl_heartbeats() -> None:
    s = DeltaStream()
    a = res(CLUSTER, "a", ttl=10.0)
    s.set_snapshot(snap(a, res(CLUSTER, "b")))
    s.on_request(req(CLUSTER, sub=("*",)), 0.0)
    (r,) = poll(s, 0.0)
    assert r.resources[0].ttl == 10.0
    assert s.next_deadline() == 5.0
    assert poll(s, 4.9) == []
    assert poll(s, 5.0) == []  # not ACKed yet: no heartbeat, rescheduled
    ack(s, r)
    assert s.next_deadline() == 10.0
    (hb,) = poll(s, 10.0)
    (entry,) = hb.resources
    assert (entry.name, entry.version, entry.resource, entry.signature, entry.ttl) == (
        "a",
        a.version,
        None,
        None,
        10.0,
    )
    assert ack(s, hb) == []  # heartbeats are not recorded as new ACKs
    assert s.next_deadline() == 15.0


def test_nacked_heartbeat_resends_in_full() -> None:
    s = DeltaStream()
    a = res(CLUSTER, "a", ttl=2.0)
    s.set_snapshot(snap(a))
    s.on_request(req(CLUSTER, sub=("*",)), 0.0)
    ack(s, poll(s, 0.0)[0])
    (hb,) = poll(s, 1.0)
    assert hb.resources[0].resource is None
    assert s.on_request(req(CLUSTER, nonce=hb.nonce, nack="expired", details={"a": "no"}), 1.0) == []
    (full,) = poll(s, 1.1)
    assert full.resources[0].resource is not None


def test_ttl_change_alone_resends() -> None:
    s = DeltaStream()
    s.set_snapshot(snap(res(CLUSTER, "a")))
    s.on_request(req(CLUSTER, sub=("*",)), 0.0)
    ack(s, poll(s)[0])
    s.set_snapshot(snap(res(CLUSTER, "a", ttl=30.0)))
    (r,) = poll(s)
    assert r.resources[0].ttl == 30.0


def test_seeded_nacks_survive_a_reconnect() -> None:
    v1, v2 = res(CLUSTER, "a", 1), res(CLUSTER, "a", 2)
    s = DeltaStream()
    s.seed_nacks(CLUSTER, {"a": (v2.version, "bad")})
    s.set_snapshot(snap(v2))
    s.on_request(req(CLUSTER, sub=("*",), initial={"a": v1.version}), 0.0)
    assert poll(s) == []


def test_unsubscribing_the_wildcard() -> None:
    s = DeltaStream()
    s.set_snapshot(snap(res(CLUSTER, "a"), res(CLUSTER, "b")))
    s.on_request(req(CLUSTER, sub=("*", "a")), 0.0)
    ack(s, poll(s)[0])
    s.on_request(req(CLUSTER, unsub=("*",)), 0.0)
    s.set_snapshot(snap(res(CLUSTER, "a", 2), res(CLUSTER, "b", 2)))
    (r,) = poll(s)
    assert names(r) == ["a"]


def test_selectors() -> None:
    assert matches({}, {})
    assert matches({"site": "a"}, {"site": "a", "arch": "arm"})
    assert matches({"site": "a"}, {"labels": {"site": "a"}})
    assert not matches({"site": "a"}, {"site": "b"})
    assert not matches({"site": "a"}, {})
    cat = snap(res(CLUSTER, "all"), res(CLUSTER, "a-only", selector={"site": "a"}))
    assert set(select(cat, {"site": "a"})[CLUSTER]) == {"all", "a-only"}
    assert set(select(cat, {"site": "b"})[CLUSTER]) == {"all"}
