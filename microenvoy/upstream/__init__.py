"""Upstream state without I/O: hosts and load balancers (health checks, outlier detection, circuit breakers
will live here too). The connection pools that do I/O are in ``microenvoy.io.upstream``."""

from microenvoy.upstream.host import Host
from microenvoy.upstream.lb import LeastRequestLb, LoadBalancer, RandomLb, RoundRobinLb, make_lb

__all__ = ["Host", "LeastRequestLb", "LoadBalancer", "RandomLb", "RoundRobinLb", "make_lb"]
