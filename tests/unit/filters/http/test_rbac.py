"""rbac: config parsing, permissions, principals, ALLOW/DENY/LOG, shadow rules and stats."""

from __future__ import annotations

from typing import Any

import pytest

from microenvoy.admin.stats import Store
from microenvoy.core.exchange import ResponseFlag
from microenvoy.core.filter import FilterStatus
from microenvoy.filters.http import rbac

from .fakes import FakeCallbacks, callbacks, context, parse, parse_errors, request


def _factory(raw: dict[str, Any], store: Store | None = None) -> rbac.RbacFactory:
    return rbac.make_factory(parse(rbac, raw), context(store or Store()))


def _decide(factory: rbac.RbacFactory, **req: Any) -> tuple[FilterStatus, FakeCallbacks]:
    headers, ds = request(**req)
    cb = callbacks(headers, ds)
    return factory.create(cb).decode_headers(headers, True), cb


def _allowed(factory: rbac.RbacFactory, **req: Any) -> bool:
    status, cb = _decide(factory, **req)
    assert (status is FilterStatus.CONTINUE) == (not cb.replies)
    return status is FilterStatus.CONTINUE


def _policy(permissions: list[Any], principals: list[Any]) -> dict[str, Any]:
    return {"permissions": permissions, "principals": principals}


def _allow(
    permissions: list[Any], principals: list[Any] | None = None, action: str = "ALLOW"
) -> dict[str, Any]:
    return {
        "rules": {"action": action, "policies": {"p": _policy(permissions, principals or [{"any": True}])}}
    }


def _cidr(prefix: str, length: int) -> dict[str, Any]:
    return {"address_prefix": prefix, "prefix_len": length}


def test_no_rules_allows_everything() -> None:
    store = Store()
    f = _factory({}, store)
    assert _allowed(f)
    assert store.value("http.ingress.rbac.allowed") == 0


def test_allow_with_no_policies_denies() -> None:
    f = _factory({"rules": {"action": "ALLOW"}})
    assert not _allowed(f)


def test_deny_reply_flag_details_and_stats() -> None:
    store = Store()
    f = _factory(_allow([{"url_path": {"path": {"prefix": "/admin"}}}], action="DENY"), store)
    status, cb = _decide(f, path="/admin/x")
    assert status is FilterStatus.STOP
    (reply,) = cb.replies
    assert reply.status == 403
    assert reply.body == b"RBAC: access denied"
    assert reply.flag == ResponseFlag.RBAC_DENIED
    assert reply.details == "rbac_access_denied_matched_policy[p]"
    assert _allowed(f, path="/public")
    assert store.value("http.ingress.rbac.denied") == 1
    assert store.value("http.ingress.rbac.allowed") == 1


def test_permissions() -> None:
    f = _factory(_allow([{"url_path": {"path": {"exact": "/exact"}}}]))
    assert _allowed(f, path="/exact?query=1")
    assert not _allowed(f, path="/exact/no")

    f = _factory(_allow([{"header": {"name": ":method", "string_match": {"exact": "GET"}}}]))
    assert _allowed(f, method="GET")
    assert not _allowed(f, method="POST")

    f = _factory(_allow([{"header": {"name": "x-team", "present_match": True}}]))
    assert _allowed(f, x_team="a")
    assert not _allowed(f)

    f = _factory(_allow([{"destination_port": 8443}]))
    assert _allowed(f, local=("192.0.2.1", 8443))
    assert not _allowed(f, local=("192.0.2.1", 80))

    f = _factory(_allow([{"destination_ip": {"address_prefix": "192.0.2.0", "prefix_len": 24}}]))
    assert _allowed(f, local=("192.0.2.9", 1))
    assert not _allowed(f, local=("198.51.100.1", 1))

    f = _factory(_allow([{"requested_server_name": {"suffix": ".example.com"}}]))
    assert _allowed(f, sni="api.example.com")
    assert not _allowed(f)

    composite = {
        "and_rules": {
            "rules": [
                {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                {
                    "or_rules": {
                        "rules": [
                            {"url_path": {"path": {"prefix": "/a"}}},
                            {"url_path": {"path": {"prefix": "/b"}}},
                        ]
                    }
                },
                {"not_rule": {"url_path": {"path": {"safe_regex": {"regex": ".*/secret"}}}}},
            ]
        }
    }
    f = _factory(_allow([composite]))
    assert _allowed(f, path="/a/x")
    assert _allowed(f, path="/b/x")
    assert not _allowed(f, path="/c/x")
    assert not _allowed(f, path="/a/secret")
    assert not _allowed(f, path="/a/x", method="PUT")


def test_principals_ip() -> None:
    for kind in ("direct_remote_ip", "remote_ip", "source_ip"):
        f = _factory(_allow([{"any": True}], [{kind: {"address_prefix": "10.1.0.0", "prefix_len": 16}}]))
        assert _allowed(f, remote=("10.1.2.3", 5))
        assert _allowed(f, remote=("::ffff:10.1.2.3", 5))  # IPv4-mapped
        assert not _allowed(f, remote=("10.2.0.1", 5))
        assert not _allowed(f, remote=("2001:db8::1", 5))
        assert not _allowed(f, remote=("not-an-ip", 5))
    f = _factory(
        _allow([{"any": True}], [{"direct_remote_ip": {"address_prefix": "2001:db8::", "prefix_len": 32}}])
    )
    assert _allowed(f, remote=("2001:db8:1::5", 5))
    assert not _allowed(f, remote=("2001:db9::5", 5))
    assert not _allowed(f, remote=("10.0.0.1", 5))
    f = _factory(_allow([{"any": True}], [{"remote_ip": {"address_prefix": "0.0.0.0", "prefix_len": 0}}]))
    assert _allowed(f, remote=("203.0.113.7", 5))


def test_principals_authenticated_header_and_composites() -> None:
    f = _factory(
        _allow([{"any": True}], [{"authenticated": {"principal_name": {"exact": "spiffe://edge/ns/a"}}}])
    )
    assert _allowed(f, peer_sans=("dev1.example", "spiffe://edge/ns/a"))
    assert not _allowed(f, peer_sans=("spiffe://edge/ns/b",))
    assert not _allowed(f)

    f = _factory(_allow([{"any": True}], [{"authenticated": {}}]))
    assert _allowed(f, peer_sans=("anything",))
    assert not _allowed(f)

    f = _factory(
        _allow([{"any": True}], [{"header": {"name": "x-device", "string_match": {"prefix": "sensor-"}}}])
    )
    assert _allowed(f, x_device="sensor-12")
    assert not _allowed(f, x_device="cam-1")

    f = _factory(
        _allow(
            [{"any": True}],
            [
                {"and_ids": {"ids": [
                    {"or_ids": {"ids": [{"source_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}},
                                        {"authenticated": {"principal_name": {"suffix": ".trusted"}}}]}},
                    {"not_id": {"header": {"name": "x-block", "present_match": True}}},
                ]}}
            ],
        )
    )  # fmt: skip
    assert _allowed(f, remote=("10.9.9.9", 1))
    assert _allowed(f, remote=("192.0.2.1", 1), peer_sans=("a.trusted",))
    assert not _allowed(f, remote=("192.0.2.1", 1))
    assert not _allowed(f, remote=("10.9.9.9", 1), x_block="1")


def test_policy_needs_permission_and_principal() -> None:
    f = _factory(
        _allow(
            [{"url_path": {"path": {"prefix": "/api"}}}],
            [{"source_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}],
        )
    )
    assert _allowed(f, path="/api/x", remote=("10.0.0.1", 1))
    assert not _allowed(f, path="/api/x", remote=("11.0.0.1", 1))
    assert not _allowed(f, path="/other", remote=("10.0.0.1", 1))


def test_effective_policy_is_first_by_name() -> None:
    raw = {
        "rules": {
            "action": "DENY",
            "policies": {
                "zeta": _policy([{"any": True}], [{"any": True}]),
                "alpha": _policy([{"url_path": {"path": {"prefix": "/"}}}], [{"any": True}]),
            },
        }
    }
    _, cb = _decide(_factory(raw))
    assert cb.replies[0].details == "rbac_access_denied_matched_policy[alpha]"


def test_log_action() -> None:
    store = Store()
    f = _factory(_allow([{"url_path": {"path": {"prefix": "/log"}}}], action="LOG"), store)
    status, cb = _decide(f, path="/log/me")
    assert status is FilterStatus.CONTINUE
    assert cb.exchange.metadata[rbac.METADATA_KEY]["access_log_hint"] is True
    _, cb = _decide(f, path="/quiet")
    assert cb.exchange.metadata[rbac.METADATA_KEY]["access_log_hint"] is False
    assert store.value("http.ingress.rbac.logged") == 1
    assert store.value("http.ingress.rbac.not_logged") == 1


def test_shadow_rules_only_count_and_record() -> None:
    store = Store()
    raw = {
        "shadow_rules": {"action": "DENY", "policies": {"block-post": _policy(
            [{"header": {"name": ":method", "exact_match": "POST"}}], [{"any": True}])}},
        "shadow_rules_stat_prefix": "dry_",
        "rules": {"action": "ALLOW", "policies": {"all": _policy([{"any": True}], [{"any": True}])}},
        "rules_stat_prefix": "live_",
    }  # fmt: skip
    f = _factory(raw, store)
    status, cb = _decide(f, method="POST")
    assert status is FilterStatus.CONTINUE
    assert cb.exchange.metadata[rbac.METADATA_KEY] == {
        "shadow_effective_policy_id": "block-post",
        "shadow_engine_result": "denied",
    }
    _, cb = _decide(f, method="GET")
    assert cb.exchange.metadata[rbac.METADATA_KEY] == {"shadow_engine_result": "allowed"}
    assert store.value("http.ingress.rbac.dry_shadow_denied") == 1
    assert store.value("http.ingress.rbac.dry_shadow_allowed") == 1
    assert store.value("http.ingress.rbac.live_allowed") == 2


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"rules": {"action": "PERMIT"}}, "typed_config.rules.action: unknown value 'PERMIT'"),
        ({"rules": {"policies": {"p": {"principals": [{"any": True}]}}}},
         "typed_config.rules.policies.p.permissions: required"),
        ({"rules": {"policies": {"p": _policy([], [{"any": True}])}}},
         "typed_config.rules.policies.p.permissions: must not be empty"),
        ({"rules": {"policies": {"p": _policy([{"any": False}], [{"any": True}])}}},
         "typed_config.rules.policies.p.permissions[0].any: must be true"),
        ({"rules": {"policies": {"p": _policy([{"metadata": {}}], [{"any": True}])}}},
         "typed_config.rules.policies.p.permissions[0].metadata: not supported"),
        ({"rules": {"policies": {"p": _policy([{}], [{"any": True}])}}},
         "typed_config.rules.policies.p.permissions[0]: one of any"),
        ({"rules": {"policies": {"p": _policy([{"any": True, "destination_port": 1}], [{"any": True}])}}},
         "typed_config.rules.policies.p.permissions[0]: only one of"),
        ({"rules": {"policies": {"p": _policy([{"any": True}], [{"source_ip": _cidr("10.0.0.300", 8)}])}}},
         "typed_config.rules.policies.p.principals[0].source_ip.address_prefix: not an IPv4 or IPv6"),
        ({"rules": {"policies": {"p": _policy([{"any": True}], [{"source_ip": _cidr("10.0.0.0", 33)}])}}},
         "typed_config.rules.policies.p.principals[0].source_ip.prefix_len: must be <= 32"),
        ({"rules": {"policies": {"p": _policy(
            [{"and_rules": {"rules": [{"header": {"name": "x", "safe_regex_match": {"regex": "("}}}]}}],
            [{"any": True}])}}},
         "typed_config.rules.policies.p.permissions[0].and_rules.rules[0].header.safe_regex_match.regex"),
        ({"rules": {"policies": {"p": {**_policy([{"any": True}], [{"any": True}]), "condition": {}}}}},
         "typed_config.rules.policies.p.condition: not supported"),
        ({"matcher": {}}, "typed_config.matcher: not supported"),
        ({"rulez": {}}, "typed_config.rulez: unknown field"),
    ],
)  # fmt: skip
def test_bad_config(raw: object, error: str) -> None:
    errors = parse_errors(rbac, raw)
    assert any(e.startswith(error) for e in errors), errors
