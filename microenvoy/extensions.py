"""The extension registry: dotted names and type URLs -> modules, imported lazily.

Every extension is one module that defines:

* ``NAME``: its dotted name (``envoy.filters.http.router``);
* ``TYPE_URLS``: the ``@type`` values its ``typed_config`` may carry;
* ``parse_config(reader: microenvoy.config.reader.Reader) -> <frozen config dataclass>``;
* for HTTP filters, ``make_factory(config, ctx: microenvoy.core.filter.FactoryContext)
  -> HttpFilterFactory``.

Nothing here imports an extension until a configuration names it, so a firmware profile that leaves an
extension out never pays its import cost.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["HTTP_FILTERS", "NETWORK_FILTERS", "http_filter_module", "network_filter_module"]

_TYPE = "type.googleapis.com/"

HTTP_FILTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (module, type URLs)
    "envoy.filters.http.router": (
        "microenvoy.filters.http.router",
        (_TYPE + "envoy.extensions.filters.http.router.v3.Router",),
    ),
    "envoy.filters.http.local_ratelimit": (
        "microenvoy.filters.http.local_ratelimit",
        (_TYPE + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",),
    ),
    "envoy.filters.http.rbac": (
        "microenvoy.filters.http.rbac",
        (_TYPE + "envoy.extensions.filters.http.rbac.v3.RBAC",),
    ),
    "envoy.filters.http.fault": (
        "microenvoy.filters.http.fault",
        (_TYPE + "envoy.extensions.filters.http.fault.v3.HTTPFault",),
    ),
    "envoy.filters.http.health_check": (
        "microenvoy.filters.http.health_check",
        (_TYPE + "envoy.extensions.filters.http.health_check.v3.HealthCheck",),
    ),
}

NETWORK_FILTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "envoy.filters.network.http_connection_manager": (
        "microenvoy.filters.network.http_connection_manager",
        (_TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",),
    ),
    "microenvoy.filters.network.mqtt_proxy": (
        "microenvoy.filters.network.mqtt_proxy",
        (_TYPE + "microenvoy.extensions.filters.network.mqtt_proxy.v1.MqttProxy",),
    ),
    "microenvoy.filters.network.coap_proxy": (
        "microenvoy.filters.network.coap_proxy",
        (_TYPE + "microenvoy.extensions.filters.network.coap_proxy.v1.CoapProxy",),
    ),
}


def _resolve(
    table: dict[str, tuple[str, tuple[str, ...]]], name: str, type_url: str | None
) -> tuple[str, ModuleType]:
    """Find the extension by type URL first (Envoy's rule), else by name. Raises KeyError."""
    if type_url:
        for ext_name, (module, urls) in table.items():
            if type_url in urls:
                return ext_name, importlib.import_module(module)
        raise KeyError(f"unknown @type {type_url!r}")
    if name in table:
        return name, importlib.import_module(table[name][0])
    raise KeyError(f"unknown extension {name!r} (known: {', '.join(sorted(table))})")


def http_filter_module(name: str, type_url: str | None = None) -> tuple[str, ModuleType]:
    return _resolve(HTTP_FILTERS, name, type_url)


def network_filter_module(name: str, type_url: str | None = None) -> tuple[str, ModuleType]:
    return _resolve(NETWORK_FILTERS, name, type_url)
