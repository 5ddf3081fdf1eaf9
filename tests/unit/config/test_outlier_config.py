"""outlier_detection config: Envoy's defaults, UInt32Value wrappers, percent and duration validation."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.config.outlier import OutlierDetection, parse_outlier_detection
from microenvoy.config.reader import Reader

PATH = "static_resources.clusters[0].outlier_detection"

PERCENT_FIELDS = (
    "max_ejection_percent",
    "enforcing_consecutive_5xx",
    "enforcing_success_rate",
    "enforcing_consecutive_gateway_failure",
    "enforcing_consecutive_local_origin_failure",
    "enforcing_local_origin_success_rate",
    "failure_percentage_threshold",
    "enforcing_failure_percentage",
    "enforcing_failure_percentage_local_origin",
)
COUNT_FIELDS = (
    "consecutive_5xx",
    "success_rate_minimum_hosts",
    "success_rate_request_volume",
    "success_rate_stdev_factor",
    "consecutive_gateway_failure",
    "consecutive_local_origin_failure",
    "failure_percentage_minimum_hosts",
    "failure_percentage_request_volume",
)
DURATION_FIELDS = ("interval", "base_ejection_time", "max_ejection_time", "max_ejection_time_jitter")


def parse(raw: object) -> tuple[OutlierDetection, list[str]]:
    errors: list[str] = []
    r = Reader(raw, PATH, errors)
    config = parse_outlier_detection(r)
    r.finish()  # as a caller wiring it by hand would: must not duplicate errors
    return config, errors


def test_envoy_defaults() -> None:
    config, errors = parse({})
    assert errors == []
    assert config == OutlierDetection()
    expected = {
        "consecutive_5xx": 5,
        "interval": 10.0,
        "base_ejection_time": 30.0,
        "max_ejection_percent": 10,
        "enforcing_consecutive_5xx": 100,
        "enforcing_success_rate": 100,
        "success_rate_minimum_hosts": 5,
        "success_rate_request_volume": 100,
        "success_rate_stdev_factor": 1900,
        "consecutive_gateway_failure": 5,
        "enforcing_consecutive_gateway_failure": 0,
        "split_external_local_origin_errors": False,
        "consecutive_local_origin_failure": 5,
        "enforcing_consecutive_local_origin_failure": 100,
        "enforcing_local_origin_success_rate": 100,
        "failure_percentage_threshold": 85,
        "enforcing_failure_percentage": 0,
        "enforcing_failure_percentage_local_origin": 0,
        "failure_percentage_minimum_hosts": 5,
        "failure_percentage_request_volume": 50,
        "max_ejection_time": 300.0,
        "max_ejection_time_jitter": 0.0,
        "successful_active_health_check_uneject_host": True,
    }
    assert dataclasses.asdict(config) == expected
    # the dataclass defaults agree with the parser's
    assert dataclasses.asdict(OutlierDetection()) == expected


def test_null_mapping_is_all_defaults() -> None:
    config, errors = parse(None)
    assert errors == []
    assert config == OutlierDetection()


@pytest.mark.parametrize("field", PERCENT_FIELDS + COUNT_FIELDS)
def test_wrapped_plain_and_string_integers(field: str) -> None:
    for raw in (7, {"value": 7}, "7"):
        config, errors = parse({field: raw})
        assert errors == []
        assert getattr(config, field) == 7


@pytest.mark.parametrize("field", PERCENT_FIELDS)
def test_percentages_are_0_to_100(field: str) -> None:
    config, errors = parse({field: 100})
    assert errors == []
    assert getattr(config, field) == 100
    config, errors = parse({field: {"value": 101}})
    assert errors == [f"{PATH}.{field}: must be <= 100, got 101"]
    assert getattr(config, field) == getattr(OutlierDetection(), field)  # default kept after an error
    _, errors = parse({field: -1})
    assert errors == [f"{PATH}.{field}: must be >= 0, got -1"]


@pytest.mark.parametrize("field", COUNT_FIELDS)
def test_counts_are_uint32(field: str) -> None:
    config, errors = parse({field: 2**32 - 1})
    assert errors == []
    assert getattr(config, field) == 2**32 - 1
    _, errors = parse({field: 2**32})
    assert errors == [f"{PATH}.{field}: must be <= 4294967295, got 4294967296"]
    _, errors = parse({field: "five"})
    assert errors == [f"{PATH}.{field}: expected an integer, got string"]
    _, errors = parse({field: True})
    assert errors == [f"{PATH}.{field}: expected an integer, got bool"]


def test_durations() -> None:
    config, errors = parse(
        {
            "interval": "250ms",
            "base_ejection_time": 2,
            "max_ejection_time": "20s",
            "max_ejection_time_jitter": "1.5s",
        }
    )
    assert errors == []
    assert (config.interval, config.base_ejection_time) == (0.25, 2.0)
    assert (config.max_ejection_time, config.max_ejection_time_jitter) == (20.0, 1.5)
    config, errors = parse({"interval": {"seconds": 3, "nanos": 500000000}})
    assert errors == []
    assert config.interval == 3.5


@pytest.mark.parametrize("field", ["interval", "base_ejection_time", "max_ejection_time"])
def test_durations_must_be_positive(field: str) -> None:
    _, errors = parse({field: "0s"})
    assert errors == [f"{PATH}.{field}: must be greater than 0"]


def test_jitter_may_be_zero_but_not_negative() -> None:
    config, errors = parse({"max_ejection_time_jitter": "0s"})
    assert errors == []
    assert config.max_ejection_time_jitter == 0.0
    _, errors = parse({"max_ejection_time_jitter": -1})
    assert len(errors) == 1
    assert errors[0].startswith(f"{PATH}.max_ejection_time_jitter: duration must not be negative")


def test_bad_duration_names_the_field() -> None:
    _, errors = parse({"interval": "ten seconds"})
    assert len(errors) == 1
    assert errors[0].startswith(f"{PATH}.interval: expected a duration")


def test_max_ejection_time_defaults_to_the_larger_of_300s_and_base() -> None:
    config, _ = parse({"base_ejection_time": "400s"})
    assert config.max_ejection_time == 400.0
    config, _ = parse({"base_ejection_time": "10s"})
    assert config.max_ejection_time == 300.0


def test_max_ejection_time_below_base_is_an_error() -> None:
    config, errors = parse({"base_ejection_time": "60s", "max_ejection_time": "30s"})
    assert errors == [f"{PATH}.max_ejection_time: must not be smaller than base_ejection_time (60s)"]
    assert config.max_ejection_time == 60.0
    _, errors = parse({"base_ejection_time": "60s", "max_ejection_time": "60s"})
    assert errors == []


def test_booleans_and_bool_value_wrapper() -> None:
    config, errors = parse(
        {
            "split_external_local_origin_errors": True,
            "successful_active_health_check_uneject_host": {"value": False},
        }
    )
    assert errors == []
    assert config.split_external_local_origin_errors is True
    assert config.successful_active_health_check_uneject_host is False
    config, errors = parse({"successful_active_health_check_uneject_host": False})
    assert errors == []
    assert config.successful_active_health_check_uneject_host is False
    _, errors = parse({"split_external_local_origin_errors": "yes"})
    assert errors == [f"{PATH}.split_external_local_origin_errors: expected true or false, got string"]
    _, errors = parse({"successful_active_health_check_uneject_host": {"value": 1}})
    assert errors == [f"{PATH}.successful_active_health_check_uneject_host: expected true or false"]


def test_unknown_field_reported_once_and_every_error_collected() -> None:
    _, errors = parse({"consecutive5xx": 3, "max_ejection_percent": 200, "interval": "0s"})
    assert sorted(errors) == sorted(
        [
            f"{PATH}.consecutive5xx: unknown field",
            f"{PATH}.max_ejection_percent: must be <= 100, got 200",
            f"{PATH}.interval: must be greater than 0",
        ]
    )


def test_not_a_mapping() -> None:
    config, errors = parse([1, 2])
    assert errors == [f"{PATH}: expected a mapping, got list"]
    assert config == OutlierDetection()


def test_through_reader_object_like_the_loader() -> None:
    errors: list[str] = []
    r = Reader({"outlier_detection": {"consecutive_5xx": {"value": 2}, "bogus": 1}}, "clusters[0]", errors)
    config = r.object("outlier_detection", parse_outlier_detection)
    r.finish()
    assert config is not None
    assert config.consecutive_5xx == 2
    assert errors == ["clusters[0].outlier_detection.bogus: unknown field"]


_valid = st.fixed_dictionaries(
    {},
    optional={
        **{f: st.integers(0, 100) | st.integers(0, 100).map(lambda v: {"value": v}) for f in PERCENT_FIELDS},
        **{f: st.integers(0, 2**32 - 1) for f in COUNT_FIELDS},
        "interval": st.integers(1, 10**6).map(lambda ms: f"{ms}ms"),
        "base_ejection_time": st.integers(1, 10**6).map(lambda ms: f"{ms}ms"),
        "max_ejection_time_jitter": st.integers(0, 10**6).map(lambda ms: f"{ms}ms"),
        "split_external_local_origin_errors": st.booleans(),
    },
)


@given(_valid)
def test_valid_configs_parse_without_errors(raw: dict[str, object]) -> None:
    config, errors = parse(raw)
    assert errors == []
    for field in PERCENT_FIELDS + COUNT_FIELDS:
        if field in raw:
            v = raw[field]
            assert getattr(config, field) == (v["value"] if isinstance(v, dict) else v)
    assert config.max_ejection_time >= config.base_ejection_time > 0
    assert config.interval > 0


_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@given(
    st.dictionaries(st.sampled_from((*PERCENT_FIELDS, *COUNT_FIELDS, *DURATION_FIELDS, "x")), _junk) | _junk
)
def test_junk_never_raises_and_errors_carry_the_path(raw: object) -> None:
    config, errors = parse(raw)
    assert isinstance(config, OutlierDetection)
    assert all(e.startswith(PATH) for e in errors)
    for field in PERCENT_FIELDS:
        assert 0 <= getattr(config, field) <= 100
    assert config.interval > 0
    assert config.max_ejection_time >= config.base_ejection_time > 0
