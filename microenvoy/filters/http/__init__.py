"""HTTP filters, one module per extension, registered by Envoy's dotted names in ``microenvoy.extensions``:
``router`` (terminal), ``local_ratelimit``, ``rbac``, ``fault``, ``health_check``. User docs:
``docs/filters.md``. Modules are imported lazily, only when a configuration names them."""
