"""microenvoy: a small-footprint Envoy-style mesh agent for edge and IoT devices."""

__version__ = "0.1.0"

__all__ = ["__version__"]
