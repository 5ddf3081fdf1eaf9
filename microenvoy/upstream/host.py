"""Upstream hosts: one resolved endpoint address of a cluster, with the counters load balancers look at.

A ``Host`` is mutable runtime state shared by the load balancer (reads ``weight``, ``rq_active``,
``available``), the connection pools (bump ``cx_*``/``rq_*``) and the admin ``/clusters`` page. Health
checking and outlier detection (later) flip ``healthy`` / ``ejected``; the load balancers only ever consult
``available``.
"""

from __future__ import annotations

__all__ = ["Host"]


class Host:
    """One upstream endpoint (an IP address and port) of a cluster."""

    __slots__ = (
        "address",
        "cx_active",
        "cx_connect_fail",
        "cx_total",
        "ejected",
        "healthy",
        "hostname",
        "local_origin_success_rate",
        "rq_active",
        "rq_error",
        "rq_success",
        "rq_timeout",
        "rq_total",
        "success_rate",
        "weight",
    )

    def __init__(self, address: tuple[str, int], weight: int = 1, hostname: str = "") -> None:
        self.address = address
        """``(ip, port)`` as connected to."""
        self.weight = max(1, weight)
        """``load_balancing_weight`` (>= 1)."""
        self.hostname = hostname
        """The DNS name the address came from (STRICT_DNS) or the endpoint's ``hostname``."""
        self.healthy = True
        """Active health checking verdict (always True without health checks)."""
        self.ejected = False
        """Outlier detection ejection."""
        self.rq_active = 0
        self.rq_total = 0
        self.rq_error = 0
        self.rq_success = 0
        self.rq_timeout = 0
        self.cx_active = 0
        self.cx_total = 0
        self.cx_connect_fail = 0
        self.success_rate = -1.0
        """Outlier detection's last computed success rate in percent (-1: not computed), for ``/clusters``."""
        self.local_origin_success_rate = -1.0
        """The same for locally originated results (split mode)."""

    @property
    def available(self) -> bool:
        """May the load balancer pick this host (healthy and not ejected)."""
        return self.healthy and not self.ejected

    @property
    def address_text(self) -> str:
        """``ip:port`` (``[v6]:port`` for IPv6), as Envoy prints host addresses."""
        ip, port = self.address
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    def __repr__(self) -> str:
        state = "healthy" if self.available else "unavailable"
        return f"<Host {self.address_text} w={self.weight} {state} rq_active={self.rq_active}>"
