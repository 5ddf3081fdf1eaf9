"""Stats: counters, gauges and histograms with Envoy's names, rendered as text, JSON or Prometheus.

Hot paths look a metric up once (``scope.counter("downstream_rq_total")``) and keep the object; bumping it is
an attribute add. Names are flat dotted strings as in Envoy (``cluster.<name>.upstream_rq_total``).

Renderings (used by the admin server, ``microenvoy/io/admin_server.py``):

* ``Store.iter_text()``: Envoy's ``/stats`` text, ``name: value`` lines; counters and gauges sorted together,
  then histograms as ``P0(nan,v) P25(nan,v) ... P100(nan,v)`` (Envoy prints ``(interval,cumulative)`` pairs;
  we keep no interval histograms, so the interval is ``nan``) or ``No recorded values``.
* ``Store.json()``: Envoy's ``/stats?format=json`` document.
* ``Store.prometheus()``: text exposition format 0.0.4; a name is ``microenvoy_`` + the stat name with every
  character outside ``[a-zA-Z0-9_]`` replaced by ``_``.

All three take a name filter (a regular expression searched in the Envoy name, as Envoy's ``?filter=``) and
``used_only`` (Envoy's ``?usedonly``: counters and gauges that are non-zero, histograms with samples).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "DEFAULT_BUCKETS",
    "SUPPORTED_QUANTILES",
    "Counter",
    "Gauge",
    "Histogram",
    "Scope",
    "Store",
    "prometheus_name",
]

# Envoy's default histogram buckets (milliseconds).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000,
    1800000, 3600000,
)  # fmt: skip

# The quantiles Envoy's admin reports for every histogram (as fractions).
SUPPORTED_QUANTILES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)

NameFilter = str | re.Pattern[str] | None


class Counter:
    """A monotonically increasing count."""

    __slots__ = ("name", "value")

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n

    def __repr__(self) -> str:
        return f"<Counter {self.name}={self.value}>"


class Gauge:
    """A value that goes up and down (active connections, queue depth)."""

    __slots__ = ("name", "value")

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n

    def dec(self, n: int = 1) -> None:
        self.value -= n

    def set(self, v: int) -> None:
        self.value = v

    def __repr__(self) -> str:
        return f"<Gauge {self.name}={self.value}>"


class Histogram:
    """Cumulative histogram over fixed bucket bounds (values in the stat's unit, ms for latencies).

    Bucket ``i`` counts values ``v`` with ``bounds[i-1] < v <= bounds[i]``; the last bucket counts values
    above every bound. The exact minimum and maximum are kept so quantiles never leave the observed range.
    """

    __slots__ = ("bounds", "count", "counts", "max", "min", "name", "sum")

    def __init__(self, name: str, bounds: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self.name = name
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def record(self, value: float) -> None:
        if value != value:  # NaN carries no information and would poison sum/min/max
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def quantile(self, q: float) -> float | None:
        """Estimate of quantile ``q`` (0..1; None when empty).

        Linear interpolation inside the bucket that holds the quantile, clamped to the observed min/max (the
        same estimate as Prometheus' ``histogram_quantile``, but exact at q=0 and q=1).
        """
        if not self.count:
            return None
        if not q > 0.0:  # also catches NaN
            return self.min
        if q >= 1.0:
            return self.max
        target = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            if c and seen + c >= target:
                lo = max(self.bounds[i - 1], self.min) if i > 0 else self.min
                hi = min(self.bounds[i], self.max) if i < len(self.bounds) else self.max
                return lo if hi <= lo else lo + (hi - lo) * ((target - seen) / c)
            seen += c
        return self.max  # unreachable: the buckets sum to count

    def __repr__(self) -> str:
        return f"<Histogram {self.name} count={self.count}>"


class Store:
    """All metrics of one agent process."""

    def __init__(self) -> None:
        self.counters: dict[str, Counter] = {}
        self.gauges: dict[str, Gauge] = {}
        self.histograms: dict[str, Histogram] = {}
        self._refreshers: list[Callable[[], None]] = []

    def add_refresher(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` before every read of the store: it sets gauges that are derived state (remaining
        circuit-breaker capacity ...) so the request path never has to keep them current."""
        self._refreshers.append(fn)

    def remove_refresher(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._refreshers.remove(fn)

    def refresh(self) -> None:
        for fn in list(self._refreshers):
            fn()

    def counter(self, name: str) -> Counter:
        c = self.counters.get(name)
        if c is None:
            c = self.counters[name] = Counter(name)
        return c

    def gauge(self, name: str) -> Gauge:
        g = self.gauges.get(name)
        if g is None:
            g = self.gauges[name] = Gauge(name)
        return g

    def histogram(self, name: str) -> Histogram:
        h = self.histograms.get(name)
        if h is None:
            h = self.histograms[name] = Histogram(name)
        return h

    def scope(self, prefix: str) -> Scope:
        return Scope(self, prefix)

    def value(self, name: str) -> int | None:
        """Current value of a counter or gauge (tests and admin)."""
        self.refresh()
        if name in self.counters:
            return self.counters[name].value
        if name in self.gauges:
            return self.gauges[name].value
        return None

    def __repr__(self) -> str:
        return (
            f"<Store counters={len(self.counters)} gauges={len(self.gauges)}"
            f" histograms={len(self.histograms)}>"
        )

    # -- selection -----------------------------------------------------------------------------
    def _select(
        self, name_filter: NameFilter, used_only: bool
    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[Histogram]]:
        """Sorted (counters, gauges, histograms) passing the filter. A bad regex raises ``re.error``."""
        self.refresh()
        pattern = re.compile(name_filter) if isinstance(name_filter, str) and name_filter else name_filter
        if not isinstance(pattern, re.Pattern):
            pattern = None

        def keep(name: str, used: bool) -> bool:
            return (used or not used_only) and (pattern is None or pattern.search(name) is not None)

        counters = [(n, c.value) for n, c in sorted(self.counters.items()) if keep(n, c.value != 0)]
        gauges = [(n, g.value) for n, g in sorted(self.gauges.items()) if keep(n, g.value != 0)]
        hists = [h for n, h in sorted(self.histograms.items()) if keep(n, h.count > 0)]
        return counters, gauges, hists

    # -- rendering -----------------------------------------------------------------------------
    def iter_text(self, name_filter: NameFilter = None, *, used_only: bool = False) -> Iterator[str]:
        """Envoy's ``/stats`` text, ``name: value`` lines without newline; counters+gauges, histograms."""
        counters, gauges, hists = self._select(name_filter, used_only)
        for name, value in sorted(counters + gauges):
            yield f"{name}: {value}"
        for h in hists:
            if h.count:
                parts = []
                for q in SUPPORTED_QUANTILES:
                    v = h.quantile(q)
                    parts.append(f"P{_short(q * 100)}(nan,{_short(v if v is not None else math.nan)})")
                yield f"{h.name}: " + " ".join(parts)
            else:
                yield f"{h.name}: No recorded values"

    def json(self, name_filter: NameFilter = None, *, used_only: bool = False) -> dict[str, Any]:
        """Envoy's ``/stats?format=json``: ``{"stats": [{"name":.., "value":..}, .., {"histograms":..}]}``."""
        counters, gauges, hists = self._select(name_filter, used_only)
        stats: list[dict[str, Any]] = [{"name": n, "value": v} for n, v in sorted(counters + gauges)]
        if hists:
            computed = []
            for h in hists:
                values = []
                for q in SUPPORTED_QUANTILES:
                    v = h.quantile(q)
                    values.append({"interval": None, "cumulative": _json_number(v)})
                computed.append({"name": h.name, "values": values})
            stats.append(
                {
                    "histograms": {
                        "supported_quantiles": [q * 100 for q in SUPPORTED_QUANTILES],
                        "computed_quantiles": computed,
                    }
                }
            )
        return {"stats": stats}

    def prometheus(self, name_filter: NameFilter = None, *, used_only: bool = False) -> str:
        """Prometheus text exposition format 0.0.4.

        Two stat names that map to the same Prometheus name (``a.b`` and ``a_b``), or a counter that collides
        with a histogram's ``_bucket``/``_sum``/``_count`` series, would make the exposition invalid; the
        later one (in the order counters, gauges, histograms, each sorted) is left out.
        """
        counters, gauges, hists = self._select(name_filter, used_only)
        taken: set[str] = set()
        out: list[str] = []

        def claim(*names: str) -> bool:
            if any(n in taken for n in names):
                return False
            taken.update(names)
            return True

        for kind, items in (("counter", counters), ("gauge", gauges)):
            for n, value in items:
                pn = prometheus_name(n)
                if claim(pn):
                    out.append(f"# TYPE {pn} {kind}")
                    out.append(f"{pn} {value}")
        for h in hists:
            pn = prometheus_name(h.name)
            if not claim(pn, pn + "_bucket", pn + "_sum", pn + "_count"):
                continue
            out.append(f"# TYPE {pn} histogram")
            cumulative = 0
            for bound, c in zip(h.bounds, h.counts, strict=False):
                cumulative += c
                out.append(f'{pn}_bucket{{le="{_fmt(bound)}"}} {cumulative}')
            out.append(f'{pn}_bucket{{le="+Inf"}} {h.count}')
            out.append(f"{pn}_sum {_fmt(h.sum)}")
            out.append(f"{pn}_count {h.count}")
        return "\n".join(out) + "\n" if out else ""


class Scope:
    """A name prefix over a ``Store`` (``Scope(store, "http.ingress.")``)."""

    __slots__ = ("prefix", "store")

    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix if not prefix or prefix.endswith(".") else prefix + "."

    def counter(self, name: str) -> Counter:
        return self.store.counter(self.prefix + name)

    def gauge(self, name: str) -> Gauge:
        return self.store.gauge(self.prefix + name)

    def histogram(self, name: str) -> Histogram:
        return self.store.histogram(self.prefix + name)

    def scope(self, prefix: str) -> Scope:
        return Scope(self.store, self.prefix + prefix)

    def __repr__(self) -> str:
        return f"<Scope {self.prefix!r}>"


_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_name(name: str) -> str:
    """``cluster.web-1.upstream_rq_total`` -> ``microenvoy_cluster_web_1_upstream_rq_total``."""
    return "microenvoy_" + _INVALID.sub("_", name)


def _fmt(v: float) -> str:
    """A sample value / ``le`` label in Prometheus' float syntax."""
    f = float(v)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    return str(int(f)) if f.is_integer() else repr(f)


def _short(v: float) -> str:
    """Compact human number for the text rendering (``2``, ``99.5``, ``1.23457``, ``nan``)."""
    if math.isfinite(v) and float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.6g}"


def _json_number(v: float | None) -> float | None:
    """Six significant digits (interpolation noise like 3.0999999999999996 is not information); no inf/NaN."""
    return float(f"{v:.6g}") if v is not None and math.isfinite(v) else None
