"""Configuration: the frozen model (Envoy v3 field names), the path-carrying reader and the loader.

from microenvoy.config import load_bootstrap, ConfigError
try:
    bootstrap = load_bootstrap("edge.yaml")
except ConfigError as exc:
    for line in exc.errors:  # "static_resources.clusters[1].lb_policy: unknown value ..."
        print(line)
"""

from microenvoy.config import model
from microenvoy.config.loader import load_bootstrap, parse_bootstrap
from microenvoy.core.errors import ConfigError

__all__ = ["ConfigError", "load_bootstrap", "model", "parse_bootstrap"]
