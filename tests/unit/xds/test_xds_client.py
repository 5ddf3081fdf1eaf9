"""microenvoy.xds.client.DeltaClient: the agent's delta xDS state machine, rule by rule (DELTA.md 1-8)."""

from __future__ import annotations

import random
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microenvoy.xds.client import MAX_NACK_MESSAGE, DeltaClient, Update
from microenvoy.xds.messages import (
    TYPE_CLUSTER,
    TYPE_CLUSTER_LOAD_ASSIGNMENT,
    TYPE_LISTENER,
    TYPE_ROUTE_CONFIGURATION,
    TYPE_SECRET,
    DeltaRequest,
    DeltaResponse,
    Node,
    ResourceEntry,
    XdsProtocolError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

NODE = Node(id="dev-1", cluster="edge", metadata={"firmware_profile": "mqtt", "agent_version": "0.6"})
EDS = TYPE_CLUSTER_LOAD_ASSIGNMENT
RDS = TYPE_ROUTE_CONFIGURATION


def make_client(seed: int = 1, **kw: Any) -> DeltaClient:
    return DeltaClient(NODE, rng=random.Random(seed), **kw)


def entry(
    name: str, version: str, type_url: str = TYPE_CLUSTER, *, ttl: float | None = None, body: bool = True
) -> ResourceEntry:
    resource = {"@type": type_url, "name": name} if body else None
    return ResourceEntry(name=name, version=version, resource=resource, ttl=ttl, signature=b"sig")


def response(
    type_url: str, nonce: str, *entries: ResourceEntry, removed: tuple[str, ...] = (), version: str = ""
) -> DeltaResponse:
    # Through the wire format, so the client sees exactly what decode_response yields.
    resp = DeltaResponse(
        type_url=type_url,
        nonce=nonce,
        system_version_info=version,
        resources=entries,
        removed_resources=removed,
    )
    return decode_response(encode_response(resp))


def apply(
    client: DeltaClient, resp: DeltaResponse, now: float = 0.0, rejected: dict[str, str] | None = None
) -> tuple[Update, DeltaRequest | None]:
    update = client.on_response(resp, now)
    return update, client.ack(update, rejected)


# ------------------------------------------------------------------------------------------ first requests
def test_first_stream_subscribes_wildcard_types_with_star_and_node_only_in_the_first_request() -> None:
    client = make_client()
    reqs = client.on_connected(0.0)
    assert reqs == [
        DeltaRequest(type_url=TYPE_CLUSTER, node=NODE, resource_names_subscribe=("*",)),
        DeltaRequest(type_url=TYPE_LISTENER, resource_names_subscribe=("*",)),
    ]
    assert client.connected
    # Exactly the contract's shape on the wire: only the fields that are set.
    assert decode_request(encode_request(reqs[1])) == reqs[1]


def test_on_connected_orders_every_type_make_before_break() -> None:
    client = make_client()
    client.subscribe(TYPE_SECRET, ["cert"])
    client.subscribe(RDS, ["routes"])
    client.subscribe(EDS, ["c1"])
    reqs = client.on_connected(0.0)
    assert [r.type_url for r in reqs] == [TYPE_CLUSTER, EDS, TYPE_LISTENER, RDS, TYPE_SECRET]
    assert [r.node is not None for r in reqs] == [True, False, False, False, False]
    assert reqs[1].resource_names_subscribe == ("c1",)
    assert reqs[3].resource_names_subscribe == ("routes",)


def test_explicit_type_without_names_never_sends_an_empty_subscribe() -> None:
    """Rule 3: an empty first subscribe is the legacy wildcard; EDS/RDS/SDS must not fall into it."""
    client = make_client(wildcard_types=[])
    assert client.on_connected(0.0) == []
    reqs = client.subscribe(EDS, ["b", "a", "a"])
    assert reqs == [DeltaRequest(type_url=EDS, node=NODE, resource_names_subscribe=("a", "b"))]


def test_subscribe_while_connected_sends_only_the_new_names() -> None:
    client = make_client()
    client.on_connected(0.0)
    assert client.subscribe(EDS, ["c2", "c1"]) == [
        DeltaRequest(type_url=EDS, resource_names_subscribe=("c1", "c2"))
    ]
    assert client.subscribe(EDS, ["c1", "c3"]) == [
        DeltaRequest(type_url=EDS, resource_names_subscribe=("c3",))
    ]
    assert client.subscribe(EDS, ["c1"]) == []
    assert client.subscriptions(EDS) == {"c1", "c2", "c3"}
    with pytest.raises(TypeError):
        client.subscribe(EDS, "c4")
    with pytest.raises(ValueError, match="unknown resource type"):
        client.subscribe("type.googleapis.com/nope", ["x"])


def test_subscribe_while_disconnected_waits_for_the_stream() -> None:
    client = make_client()
    assert client.subscribe(RDS, ["r1"]) == []
    reqs = client.on_connected(0.0)
    assert DeltaRequest(type_url=RDS, resource_names_subscribe=("r1",)) in reqs


def test_unsubscribe_sends_the_names_and_forgets_their_versions() -> None:
    client = make_client()
    client.subscribe(EDS, ["c1", "c2"])
    client.on_connected(0.0)
    apply(client, response(EDS, "n1", entry("c1", "v1", EDS), entry("c2", "v1", EDS)))
    assert client.unsubscribe(EDS, ["c1", "zz"]) == [
        DeltaRequest(type_url=EDS, resource_names_unsubscribe=("c1",))
    ]
    assert client.accepted_versions(EDS) == {"c2": "v1"}
    assert client.unsubscribe(EDS, ["c1"]) == []
    client.on_disconnected(1.0)
    reqs = client.on_connected(2.0)
    eds = next(r for r in reqs if r.type_url == EDS)
    assert eds.resource_names_subscribe == ("c2",)
    assert eds.initial_resource_versions == {"c2": "v1"}


def test_unsubscribing_the_wildcard_forgets_what_it_covered() -> None:
    client = make_client()
    client.on_connected(0.0)
    apply(client, response(TYPE_CLUSTER, "n1", entry("a", "1"), entry("b", "1")))
    client.subscribe(TYPE_CLUSTER, ["b"])
    assert client.unsubscribe(TYPE_CLUSTER, ["*"]) == [
        DeltaRequest(type_url=TYPE_CLUSTER, resource_names_unsubscribe=("*",))
    ]
    assert client.accepted_versions(TYPE_CLUSTER) == {"b": "1"}


# ---------------------------------------------------------------------------------- rule 1: ACK / NACK
def test_ack_is_the_nonce_without_error_detail() -> None:
    client = make_client()
    client.on_connected(0.0)
    update, ack = apply(client, response(TYPE_CLUSTER, "n1", entry("c1", "v1"), version="sv1"))
    assert set(update.resources) == {"c1"}
    assert update.nonce == "n1"
    assert ack == DeltaRequest(type_url=TYPE_CLUSTER, response_nonce="n1")
    assert ack is not None
    assert not ack.is_nack
    assert client.accepted_versions(TYPE_CLUSTER) == {"c1": "v1"}
    assert client.version_text(TYPE_CLUSTER) == "sv1"
    c = client.counters(TYPE_CLUSTER)
    assert (c.update_attempt, c.update_success, c.update_rejected) == (1, 1, 0)


def test_nack_names_only_the_rejected_resources_and_keeps_the_last_good_version() -> None:
    client = make_client()
    client.on_connected(0.0)
    apply(client, response(TYPE_CLUSTER, "n1", entry("a", "1"), entry("b", "1"), version="sv1"))
    _update, nack = apply(
        client,
        response(TYPE_CLUSTER, "n2", entry("a", "2"), entry("b", "2"), entry("c", "2"), version="sv2"),
        rejected={"b": "connect_timeout: must be greater than 0"},
    )
    assert nack is not None
    assert nack.is_nack
    assert nack.response_nonce == "n2"
    assert nack.error_detail is not None
    assert nack.error_detail.code == 3
    assert nack.error_detail.details == {"b": "connect_timeout: must be greater than 0"}
    assert "1 of 3 resources rejected" in nack.error_detail.message
    assert "b: connect_timeout" in nack.error_detail.message
    # a and c applied; b keeps version 1 (the last good one stays in effect)
    assert client.accepted_versions(TYPE_CLUSTER) == {"a": "2", "b": "1", "c": "2"}
    assert client.version_text(TYPE_CLUSTER) == "sv1"
    c = client.counters(TYPE_CLUSTER)
    assert (c.update_attempt, c.update_success, c.update_rejected) == (2, 1, 1)
    assert nack.error_detail is not None
    assert decode_request(encode_request(nack)) == nack


def test_rejected_new_resource_is_not_recorded_at_all() -> None:
    client = make_client()
    client.on_connected(0.0)
    apply(client, response(TYPE_CLUSTER, "n1", entry("a", "1")), rejected={"a": "bad"})
    assert client.accepted_versions(TYPE_CLUSTER) == {}


def test_nack_message_is_bounded_but_details_are_complete() -> None:
    client = make_client()
    client.on_connected(0.0)
    entries = [entry(f"cluster-{i:03}", "1") for i in range(100)]
    rejected = {e.name: "x" * 50 for e in entries}
    _, nack = apply(client, response(TYPE_CLUSTER, "n1", *entries), rejected=rejected)
    assert nack is not None
    assert nack.error_detail is not None
    assert len(nack.error_detail.message) == MAX_NACK_MESSAGE
    assert nack.error_detail.message.endswith("...")
    assert nack.error_detail.details == rejected


def test_rejecting_a_name_that_is_not_in_the_update_is_a_caller_error() -> None:
    client = make_client()
    client.on_connected(0.0)
    update = client.on_response(response(TYPE_CLUSTER, "n1", entry("a", "1")), 0.0)
    with pytest.raises(ValueError, match="not in the update"):
        client.ack(update, {"b": "bad"})


def test_resource_of_the_wrong_type_is_nacked_by_the_client_itself() -> None:
    client = make_client()
    client.on_connected(0.0)
    wrong = ResourceEntry("l1", "1", {"@type": TYPE_LISTENER, "name": "l1"})
    untyped = ResourceEntry("x", "1", {"name": "x"})
    update, nack = apply(client, response(TYPE_CLUSTER, "n1", wrong, untyped, entry("ok", "1")))
    assert set(update.resources) == {"ok"}
    assert set(update.invalid) == {"l1", "x"}
    assert nack is not None
    assert nack.error_detail is not None
    assert set(nack.error_detail.details) == {"l1", "x"}
    assert "@type is" in nack.error_detail.details["l1"]
    assert client.accepted_versions(TYPE_CLUSTER) == {"ok": "1"}


def test_response_for_a_type_not_subscribed_is_nacked_whole() -> None:
    client = make_client(types=[TYPE_CLUSTER, TYPE_LISTENER])
    client.on_connected(0.0)
    update, nack = apply(client, response(TYPE_SECRET, "n1", entry("cert", "1", TYPE_SECRET)))
    assert update.error is not None
    assert update.resources == {}
    assert nack is not None
    assert nack.error_detail is not None
    assert nack.type_url == TYPE_SECRET
    assert nack.response_nonce == "n1"
    assert "not subscribed" in nack.error_detail.message


def test_malformed_response_with_a_nonce_is_nacked_otherwise_the_stream_is_reset() -> None:
    client = make_client()
    client.on_connected(0.0)
    bad = cbor2.dumps({"type_url": TYPE_CLUSTER, "nonce": "n5", "resources": [{"version": "1"}]})
    with pytest.raises(XdsProtocolError) as info:
        decode_response(bad)
    nack = client.reject(info.value)
    assert nack is not None
    assert nack.error_detail is not None
    assert (nack.type_url, nack.response_nonce) == (TYPE_CLUSTER, "n5")
    assert "resources[0].name: missing" in nack.error_detail.message
    assert client.counters(TYPE_CLUSTER).update_rejected == 1
    assert client.reject(XdsProtocolError("message: not valid CBOR")) is None


def test_ack_of_an_update_from_an_earlier_stream_records_but_sends_nothing() -> None:
    client = make_client()
    client.on_connected(0.0)
    update = client.on_response(response(TYPE_CLUSTER, "n1", entry("a", "1")), 0.0)
    client.on_disconnected(1.0)
    assert client.ack(update) is None
    client.on_connected(2.0)
    assert client.ack(update) is None
    assert client.accepted_versions(TYPE_CLUSTER) == {"a": "1"}


# ------------------------------------------------------------------------------------------ rule 3: wildcard
def test_wildcard_types_accept_any_name_explicit_types_ignore_unsubscribed_names() -> None:
    client = make_client()
    client.subscribe(EDS, ["c1"])
    client.on_connected(0.0)
    update, _ = apply(client, response(TYPE_LISTENER, "n1", entry("any", "1", TYPE_LISTENER)))
    assert set(update.resources) == {"any"}
    update, ack = apply(client, response(EDS, "n2", entry("c1", "1", EDS), entry("late", "1", EDS)))
    assert set(update.resources) == {"c1"}
    assert update.ignored == ("late",)
    assert ack == DeltaRequest(type_url=EDS, response_nonce="n2")
    assert client.accepted_versions(EDS) == {"c1": "1"}


# ------------------------------------------------------------------------------------------ rule 4: reconnect
def test_reconnect_sends_initial_resource_versions_only_in_the_first_request_per_type() -> None:
    client = make_client()
    client.subscribe(EDS, ["c1"])
    first = client.on_connected(0.0)
    assert all(not r.initial_resource_versions for r in first)
    apply(client, response(TYPE_CLUSTER, "n1", entry("c1", "h1"), entry("c2", "h2")))
    apply(client, response(EDS, "n2", entry("c1", "e1", EDS)))
    apply(client, response(TYPE_LISTENER, "n3", entry("l1", "x1", TYPE_LISTENER)))
    client.on_disconnected(5.0)

    reqs = client.on_connected(6.0)
    assert reqs == [
        DeltaRequest(
            type_url=TYPE_CLUSTER,
            node=NODE,
            resource_names_subscribe=("*",),
            initial_resource_versions={"c1": "h1", "c2": "h2"},
        ),
        DeltaRequest(type_url=EDS, resource_names_subscribe=("c1",), initial_resource_versions={"c1": "e1"}),
        DeltaRequest(
            type_url=TYPE_LISTENER, resource_names_subscribe=("*",), initial_resource_versions={"l1": "x1"}
        ),
    ]
    # Later requests on the same stream never repeat them.
    more = client.subscribe(EDS, ["c2"])
    assert more == [DeltaRequest(type_url=EDS, resource_names_subscribe=("c2",))]
    _, ack = apply(client, response(TYPE_CLUSTER, "n4", entry("c3", "h3")))
    assert ack == DeltaRequest(type_url=TYPE_CLUSTER, response_nonce="n4")


def test_first_request_of_a_type_subscribed_late_on_a_reconnected_stream_carries_its_versions() -> None:
    client = make_client()
    client.restore(RDS, "r1", "v1")
    client.restore(RDS, "r2", "v2")
    client.on_connected(0.0)
    reqs = client.subscribe(RDS, ["r1"])
    assert reqs == [
        DeltaRequest(type_url=RDS, resource_names_subscribe=("r1",), initial_resource_versions={"r1": "v1"})
    ]


def test_restored_versions_from_the_cache_go_into_the_first_stream() -> None:
    client = make_client()
    client.restore(TYPE_CLUSTER, "c1", "h1")
    reqs = client.on_connected(0.0)
    assert reqs[0].initial_resource_versions == {"c1": "h1"}
    assert reqs[0].node == NODE


def test_removed_resources_are_passed_on_and_forgotten() -> None:
    client = make_client()
    client.on_connected(0.0)
    apply(client, response(TYPE_CLUSTER, "n1", entry("a", "1", ttl=5.0), entry("b", "1")))
    update, ack = apply(client, response(TYPE_CLUSTER, "n2", removed=("a", "never-existed")))
    assert update.removed == ("a", "never-existed")
    assert ack == DeltaRequest(type_url=TYPE_CLUSTER, response_nonce="n2")
    assert client.accepted_versions(TYPE_CLUSTER) == {"b": "1"}
    assert client.next_deadline() is None
    client.on_disconnected(1.0)
    assert client.on_connected(2.0)[0].initial_resource_versions == {"b": "1"}


# ------------------------------------------------------------------------------------------ rule 7: TTL
def test_ttl_expires_without_a_refresh_and_a_heartbeat_refreshes_it() -> None:
    client = make_client()
    client.on_connected(0.0)
    apply(client, response(TYPE_CLUSTER, "n1", entry("a", "1", ttl=10.0), entry("b", "1")), now=100.0)
    assert client.next_deadline() == 110.0
    assert client.expired(109.9) == []

    update, ack = apply(
        client, response(TYPE_CLUSTER, "n2", entry("a", "1", ttl=10.0, body=False)), now=108.0
    )
    assert update.heartbeats == ("a",)
    assert update.resources == {}
    assert ack == DeltaRequest(type_url=TYPE_CLUSTER, response_nonce="n2")
    assert client.next_deadline() == 118.0
    assert client.expired(117.0) == []

    assert client.expired(118.0) == [(TYPE_CLUSTER, "a")]
    assert client.accepted_versions(TYPE_CLUSTER) == {"b": "1"}
    assert client.counters(TYPE_CLUSTER).ttl_expired == 1
    assert client.next_deadline() is None
    assert client.expired(1000.0) == []


def test_heartbeat_without_ttl_and_full_resource_without_ttl_clear_the_deadline() -> None:
    client = make_client()
    client.on_connected(0.0)
    apply(client, response(TYPE_CLUSTER, "n1", entry("a", "1", ttl=10.0), entry("b", "1", ttl=10.0)))
    apply(client, response(TYPE_CLUSTER, "n2", entry("a", "1", body=False), entry("b", "2")), now=1.0)
    assert client.next_deadline() is None
    assert client.expired(100.0) == []


def test_heartbeat_for_a_version_the_agent_does_not_have_is_nacked() -> None:
    client = make_client()
    client.on_connected(0.0)
    apply(client, response(TYPE_CLUSTER, "n1", entry("a", "1", ttl=10.0)))
    update, nack = apply(
        client,
        response(TYPE_CLUSTER, "n2", entry("a", "2", body=False), entry("z", "1", body=False)),
        now=5.0,
    )
    assert update.heartbeats == ()
    assert set(update.invalid) == {"a", "z"}
    assert nack is not None
    assert nack.error_detail is not None
    assert set(nack.error_detail.details) == {"a", "z"}
    assert "send it in full" in nack.error_detail.details["z"]
    assert client.next_deadline() == 10.0  # not refreshed


def test_rejected_update_keeps_the_old_deadline_accepted_update_restarts_it() -> None:
    client = make_client()
    client.on_connected(0.0)
    apply(client, response(TYPE_CLUSTER, "n1", entry("a", "1", ttl=10.0), entry("b", "1", ttl=10.0)))
    apply(
        client,
        response(TYPE_CLUSTER, "n2", entry("a", "2", ttl=10.0), entry("b", "2", ttl=10.0)),
        now=6.0,
        rejected={"a": "bad"},
    )
    assert client.expired(10.0) == [(TYPE_CLUSTER, "a")]
    assert client.expired(15.9) == []
    assert client.expired(16.0) == [(TYPE_CLUSTER, "b")]


def test_expired_lists_resources_in_break_order() -> None:
    client = make_client()
    client.subscribe(RDS, ["r"])
    client.subscribe(EDS, ["c"])
    client.on_connected(0.0)
    for i, t in enumerate([TYPE_CLUSTER, EDS, TYPE_LISTENER, RDS]):
        name = {TYPE_CLUSTER: "c", EDS: "c", TYPE_LISTENER: "l", RDS: "r"}[t]
        apply(client, response(t, f"n{i}", entry(name, "1", t, ttl=1.0)))
    assert client.expired(2.0) == [(RDS, "r"), (TYPE_LISTENER, "l"), (EDS, "c"), (TYPE_CLUSTER, "c")]


def test_ttls_keep_running_while_disconnected() -> None:
    client = make_client()
    client.on_connected(0.0)
    apply(client, response(TYPE_CLUSTER, "n1", entry("a", "1", ttl=3.0)))
    client.on_disconnected(1.0)
    assert client.expired(3.0) == [(TYPE_CLUSTER, "a")]


# ------------------------------------------------------------------------------------------ rule 8: backoff
def _ceiling(n: int) -> float:
    return min(30.0, 0.5 * 2**n)


def test_backoff_is_exponential_with_equal_jitter_and_capped() -> None:
    client = make_client(seed=7)
    delays = [client.on_disconnected(float(i)) for i in range(12)]
    for n, d in enumerate(delays):
        assert _ceiling(n) / 2 <= d <= _ceiling(n), (n, d)
    assert delays[0] <= 0.5
    assert max(delays) <= 30.0
    assert all(15.0 <= d <= 30.0 for d in delays[6:])
    assert len({round(d, 9) for d in delays[6:]}) > 1  # jittered, not a fixed cap
    # Seeded: the same seed gives the same sequence.
    again = make_client(seed=7)
    assert [again.on_disconnected(float(i)) for i in range(12)] == delays


def test_backoff_restarts_after_a_stream_that_got_a_response() -> None:
    client = make_client(seed=3)
    for i in range(5):
        client.on_disconnected(float(i))  # failed attempts: ceiling grows to 8 s
    client.on_connected(10.0)
    client.on_response(response(TYPE_CLUSTER, "n1"), 10.5)
    d = client.on_disconnected(11.0)
    assert 0.25 <= d <= 0.5
    d = client.on_disconnected(12.0)
    assert 0.5 <= d <= 1.0


def test_stream_that_got_no_response_does_not_restart_the_backoff() -> None:
    client = make_client(seed=3)
    client.on_disconnected(0.0)
    client.on_disconnected(1.0)
    client.on_connected(2.0)
    assert 1.0 <= client.on_disconnected(3.0) <= 2.0


def test_malformed_response_does_not_count_as_a_response_for_the_backoff() -> None:
    client = make_client(seed=3)
    client.on_disconnected(0.0)
    client.on_connected(1.0)
    client.reject(XdsProtocolError("resources: bad", type_url=TYPE_CLUSTER, nonce="n"))
    assert 0.5 <= client.on_disconnected(2.0) <= 1.0


def test_backoff_parameters_are_configurable_and_checked() -> None:
    client = make_client(backoff_base=1.0, backoff_cap=4.0)
    delays = [client.on_disconnected(0.0) for _ in range(5)]
    assert [_c / 2 <= d <= _c for _c, d in zip([1, 2, 4, 4, 4], delays, strict=True)] == [True] * 5
    with pytest.raises(ValueError, match="backoff"):
        make_client(backoff_base=0.0)
    with pytest.raises(ValueError, match="backoff"):
        make_client(backoff_base=5.0, backoff_cap=1.0)


def test_failover_moves_round_robin_after_each_failed_attempt_and_stays_after_a_good_stream() -> None:
    client = make_client()
    servers = ["cp-a:18000", "cp-b:18000", "cp-c:18000"]
    order = []
    order.append(client.next_server(servers))  # a
    client.on_disconnected(0.0)  # connect failed
    order.append(client.next_server(servers))  # b
    client.on_connected(1.0)  # b works for a while
    client.on_response(response(TYPE_CLUSTER, "n1"), 1.0)
    client.on_disconnected(2.0)
    order.append(client.next_server(servers))  # still b
    client.on_disconnected(3.0)  # b refuses now
    order.append(client.next_server(servers))  # c
    client.on_connected(4.0)
    client.on_disconnected(5.0)  # stream opened but nothing came: failed attempt
    order.append(client.next_server(servers))  # a
    order.append(client.next_server(servers))  # no failure in between: a again
    assert order == ["cp-a:18000", "cp-b:18000", "cp-b:18000", "cp-c:18000", "cp-a:18000", "cp-a:18000"]
    with pytest.raises(ValueError, match="no control-plane"):
        client.next_server([])


def test_node_is_sent_again_in_the_first_request_of_every_stream() -> None:
    client = make_client()
    assert client.on_connected(0.0)[0].node == NODE
    client.on_disconnected(1.0)
    reqs = client.on_connected(2.0)
    assert reqs[0].node == NODE
    assert all(r.node is None for r in reqs[1:])


# ------------------------------------------------------------------------------------------ misc
def test_constructor_checks_types() -> None:
    with pytest.raises(ValueError, match="repeat"):
        make_client(types=[TYPE_CLUSTER, TYPE_CLUSTER])
    with pytest.raises(ValueError, match="wildcard"):
        make_client(types=[TYPE_CLUSTER], wildcard_types=[TYPE_LISTENER])


def test_repr_is_one_line_with_the_state() -> None:
    client = make_client()
    client.on_connected(0.0)
    apply(client, response(TYPE_CLUSTER, "n1", entry("a", "1")))
    text = repr(client)
    assert "\n" not in text
    assert "connected=True" in text
    assert "accepted=1" in text
    assert client.connected_since == 0.0
    client.on_disconnected(1.0)
    assert client.connected_since is None
    assert not client.connected


# ------------------------------------------------------------------------------------------ model check
@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.dictionaries(st.sampled_from("abcde"), st.sampled_from(["1", "2", "3"]), max_size=5),
            st.sets(st.sampled_from("abcde")),
            st.sets(st.sampled_from("abcde")),
        ),
        max_size=8,
    )
)
def test_accepted_versions_follow_a_simple_model(
    steps: list[tuple[dict[str, str], set[str], set[str]]],
) -> None:
    """Whatever the sequence, accepted = applied-and-not-rejected versions minus removals, and every answer
    is an ACK exactly when nothing was rejected, naming only the rejected resources otherwise (rule 1)."""
    client = make_client()
    client.on_connected(0.0)
    model: dict[str, str] = {}
    for i, (sent, reject, remove) in enumerate(steps):
        removed = tuple(sorted(remove - set(sent)))
        entries = [entry(n, v) for n, v in sorted(sent.items())]
        rejected = {n: "bad" for n in reject if n in sent}
        _, answer = apply(
            client, response(TYPE_CLUSTER, f"n{i}", *entries, removed=removed), rejected=rejected
        )
        assert answer is not None
        assert answer.response_nonce == f"n{i}"
        if rejected:
            assert answer.error_detail is not None
            assert answer.error_detail.details == rejected
        else:
            assert answer.error_detail is None
        model.update({n: v for n, v in sent.items() if n not in rejected})
        for n in removed:
            model.pop(n, None)
        assert client.accepted_versions(TYPE_CLUSTER) == model
