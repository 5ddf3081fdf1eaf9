"""Stats store: text/JSON rendering, filters, histogram quantiles, Prometheus exposition validity."""

from __future__ import annotations

import itertools
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from microenvoy.admin.stats import (
    DEFAULT_BUCKETS,
    SUPPORTED_QUANTILES,
    Counter,
    Histogram,
    Scope,
    Store,
    prometheus_name,
)


def _store() -> Store:
    s = Store()
    s.counter("cluster.web.upstream_rq_total").inc(7)
    s.counter("cluster.web.upstream_rq_retry")  # never used
    s.counter("http.ingress.downstream_rq_2xx").inc(3)
    s.gauge("cluster.web.upstream_cx_active").set(2)
    s.gauge("listener.127.0.0.1_8080.downstream_cx_active")  # zero
    h = s.histogram("cluster.web.upstream_rq_time")
    for v in (1, 2, 3, 4, 20):
        h.record(v)
    s.histogram("http.ingress.downstream_rq_time")  # empty
    return s


# -- text -----------------------------------------------------------------------------------------
def test_text_sorted_counters_and_gauges_then_histograms() -> None:
    lines = list(_store().iter_text())
    assert lines[:5] == [
        "cluster.web.upstream_cx_active: 2",
        "cluster.web.upstream_rq_retry: 0",
        "cluster.web.upstream_rq_total: 7",
        "http.ingress.downstream_rq_2xx: 3",
        "listener.127.0.0.1_8080.downstream_cx_active: 0",
    ]
    assert lines[5].startswith("cluster.web.upstream_rq_time: P0(nan,1) P25(nan,")
    assert lines[5].endswith(" P100(nan,20)")
    assert [p.split("(")[0] for p in lines[5].split(": ")[1].split()] == [
        "P0", "P25", "P50", "P75", "P90", "P95", "P99", "P99.5", "P99.9", "P100",
    ]  # fmt: skip
    assert lines[6] == "http.ingress.downstream_rq_time: No recorded values"
    assert len(lines) == 7


def test_text_filter_is_a_regex_search() -> None:
    s = _store()
    assert list(s.iter_text(r"^cluster\.web\.upstream_rq_t")) == [
        "cluster.web.upstream_rq_total: 7",
        next(x for x in s.iter_text() if x.startswith("cluster.web.upstream_rq_time")),
    ]
    assert list(s.iter_text(re.compile("2xx$"))) == ["http.ingress.downstream_rq_2xx: 3"]
    assert list(s.iter_text("nothing-matches")) == []
    assert list(s.iter_text("")) == list(s.iter_text())  # empty filter = no filter
    with pytest.raises(re.error):
        list(s.iter_text("("))


def test_used_only_drops_untouched_stats() -> None:
    names = [line.split(":")[0] for line in _store().iter_text(used_only=True)]
    assert names == [
        "cluster.web.upstream_cx_active",
        "cluster.web.upstream_rq_total",
        "http.ingress.downstream_rq_2xx",
        "cluster.web.upstream_rq_time",
    ]


def test_json_matches_envoy_shape() -> None:
    doc = _store().json("cluster")
    stats = doc["stats"]
    assert stats[:3] == [
        {"name": "cluster.web.upstream_cx_active", "value": 2},
        {"name": "cluster.web.upstream_rq_retry", "value": 0},
        {"name": "cluster.web.upstream_rq_total", "value": 7},
    ]
    hist = stats[3]["histograms"]
    assert hist["supported_quantiles"] == [0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100]
    (computed,) = hist["computed_quantiles"]
    assert computed["name"] == "cluster.web.upstream_rq_time"
    assert len(computed["values"]) == len(SUPPORTED_QUANTILES)
    assert computed["values"][0] == {"interval": None, "cumulative": 1}
    assert computed["values"][-1] == {"interval": None, "cumulative": 20}
    empty = Store()
    empty.histogram("h")
    assert empty.json()["stats"][0]["histograms"]["computed_quantiles"][0]["values"][0] == {
        "interval": None,
        "cumulative": None,
    }
    assert Store().json() == {"stats": []}
    noisy = Store()
    for v in (1.2, 7):
        noisy.histogram("n").record(v)
    p25 = noisy.json()["stats"][0]["histograms"]["computed_quantiles"][0]["values"][1]["cumulative"]
    assert p25 == 3.1  # not 3.0999999999999996


# -- histograms ------------------------------------------------------------------------------------
def test_histogram_quantiles_interpolate_within_buckets() -> None:
    h = Histogram("t", bounds=(10, 20, 30))
    assert h.quantile(0.5) is None
    for v in range(1, 101):  # 1..100: 10 in (0,10], 10 in (10,20], 10 in (20,30], 70 above
        h.record(v)
    assert h.count == 100
    assert h.sum == 5050
    assert h.counts == [10, 10, 10, 70]
    assert h.quantile(0) == 1
    assert h.quantile(1) == 100
    assert h.quantile(0.1) == 10  # top of the first bucket
    assert h.quantile(0.15) == pytest.approx(15)  # half way through (10, 20]
    assert h.quantile(0.3) == 30
    assert h.quantile(0.65) == pytest.approx(30 + 70 * 0.5)  # overflow bucket spans (30, max]


def test_histogram_single_value_is_exact() -> None:
    h = Histogram("t")
    h.record(42.5)
    assert {h.quantile(q) for q in SUPPORTED_QUANTILES} == {42.5}


def test_histogram_ignores_nan_and_handles_inf() -> None:
    h = Histogram("t")
    h.record(math.nan)
    assert h.count == 0
    h.record(math.inf)
    assert h.counts[-1] == 1
    assert h.quantile(0.5) == math.inf


@given(st.lists(st.floats(min_value=0, max_value=1e7, allow_nan=False), min_size=1, max_size=200))
def test_histogram_quantiles_monotone_and_in_range(values: list[float]) -> None:
    h = Histogram("t")
    for v in values:
        h.record(v)
    qs = [h.quantile(q) for q in (0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1)]
    assert all(q is not None for q in qs)
    fqs = [q for q in qs if q is not None]
    assert fqs[0] == min(values)
    assert fqs[-1] == max(values)
    for a, b in itertools.pairwise(fqs):
        assert a <= b + 1e-9 * max(1.0, abs(b))
    assert h.count == len(values)
    assert sum(h.counts) == len(values)


@given(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False))
def test_histogram_bucket_bounds_are_upper_inclusive(v: float) -> None:
    h = Histogram("t")
    h.record(v)
    i = h.counts.index(1)
    if i < len(DEFAULT_BUCKETS):
        assert v <= DEFAULT_BUCKETS[i]
    if i > 0:
        assert v > DEFAULT_BUCKETS[i - 1]


# -- prometheus ------------------------------------------------------------------------------------
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{le="[^"]+"\})? (\S+)$')
_TYPE = re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram)$")


def _check_exposition(text: str) -> None:
    """Stricter than the client parser: each family once, every sample under its own TYPE line."""
    assert text == "" or text.endswith("\n")
    families: set[str] = set()
    current = None
    kind = None
    for line in text.splitlines():
        m = _TYPE.match(line)
        if m:
            assert m[1] not in families, f"duplicate family {m[1]}"
            families.add(m[1])
            current, kind = m[1], m[2]
            continue
        s = _SAMPLE.match(line)
        assert s, f"bad sample line {line!r}"
        assert current is not None
        allowed = {current} if kind != "histogram" else {current + x for x in ("_bucket", "_sum", "_count")}
        assert s[1] in allowed, line
        float(s[3].replace("Inf", "inf"))


def test_prometheus_parses_with_names_types_and_values() -> None:
    s = _store()
    text = s.prometheus()
    _check_exposition(text)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    # the client library strips a counter family's _total suffix; samples keep it
    total = fams["microenvoy_cluster_web_upstream_rq"]
    assert total.type == "counter"
    assert [(x.name, x.value) for x in total.samples] == [("microenvoy_cluster_web_upstream_rq_total", 7)]
    rq2xx = fams["microenvoy_http_ingress_downstream_rq_2xx"]
    assert rq2xx.type == "counter"
    assert rq2xx.samples[0].value == 3
    active = fams["microenvoy_listener_127_0_0_1_8080_downstream_cx_active"]
    assert active.type == "gauge"
    assert active.samples[0].value == 0
    hist = fams["microenvoy_cluster_web_upstream_rq_time"]
    assert hist.type == "histogram"
    buckets = [(x.labels["le"], x.value) for x in hist.samples if x.name.endswith("_bucket")]
    assert buckets[0] == ("0.5", 0)
    assert ("1", 1) in buckets
    assert ("5", 4) in buckets
    assert ("25", 5) in buckets
    assert buckets[-1] == ("+Inf", 5)
    values = [v for _, v in buckets]
    assert values == sorted(values)  # cumulative
    by_name = {x.name: x.value for x in hist.samples if not x.name.endswith("_bucket")}
    assert by_name == {
        "microenvoy_cluster_web_upstream_rq_time_sum": 30,
        "microenvoy_cluster_web_upstream_rq_time_count": 5,
    }
    assert len(fams) == 7


def test_prometheus_filter_used_only_and_empty() -> None:
    s = _store()
    text = s.prometheus("upstream_cx", used_only=True)
    assert text == "# TYPE microenvoy_cluster_web_upstream_cx_active gauge\n" + (
        "microenvoy_cluster_web_upstream_cx_active 2\n"
    )
    assert s.prometheus("nomatch") == ""
    assert Store().prometheus() == ""


def test_prometheus_name_collisions_keep_the_output_valid() -> None:
    s = Store()
    s.counter("a.b").inc()
    s.counter("a_b").inc(2)  # same Prometheus name as a.b
    s.counter("lat_count").inc()  # collides with histogram "lat"'s _count series
    s.histogram("lat").record(1)
    s.gauge("a-b").set(5)
    text = s.prometheus()
    _check_exposition(text)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["microenvoy_a_b"].samples[0].value == 1  # the first (sorted) wins
    assert "microenvoy_lat" not in fams


def test_prometheus_special_values() -> None:
    s = Store()
    s.gauge("neg").set(-3)
    s.histogram("h").record(math.inf)
    text = s.prometheus()
    _check_exposition(text)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["microenvoy_neg"].samples[0].value == -3
    sums = [x.value for x in fams["microenvoy_h"].samples if x.name.endswith("_sum")]
    assert sums == [math.inf]


@given(
    st.dictionaries(
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20),
        st.integers(min_value=-(2**40), max_value=2**40),
        max_size=10,
    )
)
def test_prometheus_valid_for_any_names(stats: dict[str, int]) -> None:
    s = Store()
    for i, (name, value) in enumerate(stats.items()):
        if i % 3 == 0:
            s.counter(name).inc(abs(value))
        elif i % 3 == 1:
            s.gauge(name).set(value)
        else:
            s.histogram(name).record(abs(value))
    text = s.prometheus()
    _check_exposition(text)
    list(text_string_to_metric_families(text))


def test_prometheus_name() -> None:
    assert prometheus_name("cluster.web-1.upstream_rq_total") == "microenvoy_cluster_web_1_upstream_rq_total"
    assert prometheus_name("listener.[::1]:80.x") == "microenvoy_listener____1__80_x"


# -- store / scope ---------------------------------------------------------------------------------
def test_scope_prefixes_and_shares_objects() -> None:
    s = Store()
    scope = s.scope("http.ingress")
    assert scope.prefix == "http.ingress."
    c = scope.counter("downstream_rq_total")
    c.inc()
    assert s.counter("http.ingress.downstream_rq_total") is c
    assert s.value("http.ingress.downstream_rq_total") == 1
    inner = scope.scope("rbac.")
    inner.gauge("g").inc(2)
    assert s.value("http.ingress.rbac.g") == 2
    assert s.value("missing") is None
    assert isinstance(Scope(s, ""), Scope)
    assert Scope(s, "").counter("x") is s.counter("x")
    assert repr(c) == "<Counter http.ingress.downstream_rq_total=1>"
    assert repr(s) == "<Store counters=2 gauges=1 histograms=0>"
    assert isinstance(c, Counter)
