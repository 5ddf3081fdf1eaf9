"""Stats: counters, gauges and histograms with Envoy's names, rendered as text or Prometheus.

Hot paths look a metric up once (``scope.counter("downstream_rq_total")``) and keep the object; bumping it is
an attribute add. Names are flat dotted strings as in Envoy (``cluster.<name>.upstream_rq_total``).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator

__all__ = ["Counter", "Gauge", "Histogram", "Scope", "Store"]

# Envoy's default histogram buckets (milliseconds).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000,
    1800000, 3600000,
)  # fmt: skip


class Counter:
    __slots__ = ("name", "value")

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n

    def __repr__(self) -> str:
        return f"<Counter {self.name}={self.value}>"


class Gauge:
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
    """Cumulative histogram over fixed bucket bounds (values in the stat's unit, ms for latencies)."""

    __slots__ = ("bounds", "count", "counts", "name", "sum")

    def __init__(self, name: str, bounds: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self.name = name
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def record(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (None when empty)."""
        if not self.count:
            return None
        target = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= target and c:
                return self.bounds[i] if i < len(self.bounds) else float("inf")
        return float("inf")

    def __repr__(self) -> str:
        return f"<Histogram {self.name} count={self.count}>"


class Store:
    """All metrics of one agent process."""

    def __init__(self) -> None:
        self.counters: dict[str, Counter] = {}
        self.gauges: dict[str, Gauge] = {}
        self.histograms: dict[str, Histogram] = {}

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
        if name in self.counters:
            return self.counters[name].value
        if name in self.gauges:
            return self.gauges[name].value
        return None

    # -- rendering -----------------------------------------------------------------------------
    def iter_text(self, name_filter: str | None = None) -> Iterator[str]:
        """Envoy's ``/stats`` text: ``name: value`` sorted, histograms as quantile summaries."""
        pattern = re.compile(name_filter) if name_filter else None
        flat: list[tuple[str, str]] = [(n, str(c.value)) for n, c in self.counters.items()]
        flat += [(n, str(g.value)) for n, g in self.gauges.items()]
        for n, h in self.histograms.items():
            if h.count:
                parts = [f"P{int(q * 100)}({h.quantile(q)})" for q in (0.5, 0.9, 0.99)]
                flat.append((n, f"count({h.count}) sum({h.sum:.3f}) " + " ".join(parts)))
            else:
                flat.append((n, "No recorded values"))
        for name, value in sorted(flat):
            if pattern is None or pattern.search(name):
                yield f"{name}: {value}"

    def prometheus(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        out: list[str] = []
        for n in sorted(self.counters):
            pn = prometheus_name(n)
            out.append(f"# TYPE {pn} counter")
            out.append(f"{pn} {self.counters[n].value}")
        for n in sorted(self.gauges):
            pn = prometheus_name(n)
            out.append(f"# TYPE {pn} gauge")
            out.append(f"{pn} {self.gauges[n].value}")
        for n in sorted(self.histograms):
            h = self.histograms[n]
            pn = prometheus_name(n)
            out.append(f"# TYPE {pn} histogram")
            cumulative = 0
            for bound, c in zip(h.bounds, h.counts, strict=False):
                cumulative += c
                out.append(f'{pn}_bucket{{le="{_fmt(bound)}"}} {cumulative}')
            out.append(f'{pn}_bucket{{le="+Inf"}} {h.count}')
            out.append(f"{pn}_sum {_fmt(h.sum)}")
            out.append(f"{pn}_count {h.count}")
        return "\n".join(out) + "\n"


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
    return "microenvoy_" + _INVALID.sub("_", name)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
