"""``dynamic_resources``: the ADS source, fetch timeout, trusted keys, cache, and the checks against the
static clusters."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from microenvoy.config.loader import parse_bootstrap
from microenvoy.config.xds import DynamicResources
from microenvoy.core.errors import ConfigError

KEY = base64.b64encode(
    Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
).decode()
H2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


def doc(dynamic: dict[str, Any], *, h2: bool = True, node: str = "dev-1") -> dict[str, Any]:
    endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 18000}}}}
    cluster: dict[str, Any] = {
        "name": "xds",
        "load_assignment": {"endpoints": [{"lb_endpoints": [endpoint]}]},
    }
    if h2:
        cluster["typed_extension_protocol_options"] = H2
    return {"node": {"id": node}, "static_resources": {"clusters": [cluster]}, "dynamic_resources": dynamic}


def ads(cluster: str = "xds", **extra: Any) -> dict[str, Any]:
    return {
        "ads_config": {
            "api_type": "DELTA_GRPC",
            "grpc_services": [{"envoy_grpc": {"cluster_name": cluster}}],
        },
        "microenvoy": {"trusted_keys": [KEY], "cache_dir": "/tmp/cache"},
        **extra,
    }


def errors_of(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_bootstrap(d)
    return info.value.errors


def test_parsed() -> None:
    b = parse_bootstrap(
        doc(ads(cds_config={"ads": {}, "initial_fetch_timeout": "3s"}, lds_config={"ads": {}}))
    )
    dyn = b.dynamic_resources
    assert isinstance(dyn, DynamicResources)
    assert dyn.xds_clusters == ("xds",)
    assert dyn.initial_fetch_timeout == 3.0
    assert dyn.trusted_keys == (KEY,)
    assert dyn.cache_dir == "/tmp/cache"
    assert parse_bootstrap(doc(ads())).dynamic_resources.initial_fetch_timeout == 15.0


def test_cluster_checks() -> None:
    p = "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name"
    assert errors_of(doc(ads("nope"))) == [
        f"{p}: unknown cluster 'nope' (the control plane's cluster must be a static cluster)"
    ]
    assert errors_of(doc(ads(), h2=False)) == [
        f"{p}: cluster 'xds' must speak HTTP/2 (gRPC): set http2_protocol_options"
    ]
    assert errors_of(doc(ads(), node="")) == [
        "node.id: required with dynamic_resources (the control plane keys its state by it)"
    ]


def test_bad_fields() -> None:
    d = ads()
    d["ads_config"]["api_type"] = "GRPC"
    d["microenvoy"]["trusted_keys"] = ["not-a-key"]
    d["cds_config"] = {"path": "/x"}
    errors = errors_of(doc(d))
    assert any(e.startswith("dynamic_resources.ads_config.api_type: only the incremental") for e in errors)
    assert any(e.startswith("dynamic_resources.microenvoy.trusted_keys[0]: not an Ed25519") for e in errors)
    assert any(e.startswith("dynamic_resources.cds_config.ads: only ads") for e in errors)


def test_signatures_required_unless_disabled() -> None:
    d = ads()
    d["microenvoy"] = {}
    assert errors_of(doc(d)) == [
        "dynamic_resources.microenvoy.trusted_keys: resources must be signed: give microenvoy.trusted_keys "
        "(or require_signatures: false for a lab)"
    ]
    d["microenvoy"] = {"require_signatures": False}
    assert parse_bootstrap(doc(d)).dynamic_resources.require_signatures is False
