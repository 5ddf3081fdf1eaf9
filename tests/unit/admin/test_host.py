"""Admin endpoint table (sans-IO): every path, formats, method rules, bad parameters, failing hosts."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microenvoy.admin import logging as admin_logging
from microenvoy.admin.host import ENDPOINTS, AdminHost, AdminResponse, handle_request, index_text
from microenvoy.admin.stats import Store


class FakeHost:
    """Records calls; every answer is canned."""

    def __init__(self) -> None:
        self.stats = Store()
        self.stats.counter("cluster.web.upstream_rq_total").inc(4)
        self.stats.gauge("cluster.web.upstream_cx_active").set(1)
        self.stats.histogram("cluster.web.upstream_rq_time").record(3)
        self.is_ready = True
        self.state = "LIVE"
        self.calls: list[tuple[Any, ...]] = []
        self.fail_with: Exception | None = None

    def _call(self, *args: Any) -> None:
        self.calls.append(args)
        if self.fail_with is not None:
            raise self.fail_with

    def ready(self) -> bool:
        self._call("ready")
        return self.is_ready

    def config_dump(self) -> dict[str, Any]:
        self._call("config_dump")
        return {"configs": [{"@type": "bootstrap", "key": "[redacted]"}]}

    def clusters_text(self) -> str:
        self._call("clusters_text")
        return "web::127.0.0.1:8080::rq_total::4"

    def clusters_json(self) -> dict[str, Any]:
        self._call("clusters_json")
        return {"cluster_statuses": [{"name": "web"}]}

    def listeners(self) -> list[dict[str, Any]]:
        self._call("listeners")
        return [
            {
                "name": "http",
                "local_address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": 40001, "protocol": "TCP"}
                },
            },
            {
                "name": "h3",
                "local_address": {
                    "socket_address": {"address": "::1", "port_value": 40002, "protocol": "UDP"}
                },
            },
        ]

    def server_info(self) -> dict[str, Any]:
        self._call("server_info")
        return {"version": "0.1.0", "state": self.state, "uptime": float("inf")}

    def healthcheck_fail(self) -> None:
        self._call("healthcheck_fail")

    def healthcheck_ok(self) -> None:
        self._call("healthcheck_ok")

    def drain_listeners(self, graceful: bool, inbound_only: bool) -> None:
        self._call("drain_listeners", graceful, inbound_only)

    def quit(self) -> None:
        self._call("quit")

    def set_log_level(self, level: str, logger: str | None) -> str:
        self._call("set_log_level", level, logger)
        return f"set {logger}={level}\n"


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


@pytest.fixture(autouse=True)
def _restore_log_levels() -> Iterator[None]:
    names = admin_logging.known_loggers()
    saved = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in saved.items():
        logging.getLogger(n).setLevel(level)


def _get(host: AdminHost, target: str, method: str = "GET") -> AdminResponse:
    return handle_request(host, method, target)


def test_fake_host_satisfies_the_protocol(host: FakeHost) -> None:
    h: AdminHost = host  # mypy checks the structural match
    assert h.ready()


def test_index(host: FakeHost) -> None:
    r = _get(host, "/")
    assert r.status == 200
    assert r.content_type.startswith("text/plain")
    text = r.body.decode()
    assert text.startswith("admin commands are:\n")
    for e in ENDPOINTS:
        if e.path != "/help":
            assert f"  {e.path}: " in text
    assert "  /quitquitquit: (POST) " in text
    assert _get(host, "/help").body == r.body


def test_unknown_path_is_404_with_the_index(host: FakeHost) -> None:
    r = _get(host, "/nope?x=1")
    assert r.status == 404
    assert r.body.decode() == "invalid path. " + index_text()


def test_ready(host: FakeHost) -> None:
    assert (_get(host, "/ready").status, _get(host, "/ready").body) == (200, b"LIVE\n")
    host.is_ready = False
    host.state = "DRAINING"
    assert (_get(host, "/ready").status, _get(host, "/ready").body) == (503, b"DRAINING\n")
    host.state = "LIVE"  # inconsistent host: never claim LIVE on a 503
    assert _get(host, "/ready").body == b"PRE_INITIALIZING\n"


def test_stats_text_filter_usedonly(host: FakeHost) -> None:
    host.stats.counter("cluster.web.upstream_rq_retry")
    r = _get(host, "/stats")
    assert r.status == 200
    assert r.content_type == "text/plain; charset=UTF-8"
    lines = r.body.decode().splitlines()
    assert "cluster.web.upstream_rq_total: 4" in lines
    assert "cluster.web.upstream_rq_retry: 0" in lines
    assert lines[-1].startswith("cluster.web.upstream_rq_time: P0(nan,3)")
    r = _get(host, "/stats?filter=rq_t[a-z]+l$")
    assert r.body == b"cluster.web.upstream_rq_total: 4\n"
    r = _get(
        host, "/stats?filter=%5Ecluster%5C.web%5C.upstream_cx"
    )  # percent-encoded ^cluster\.web\.upstream_cx
    assert r.body == b"cluster.web.upstream_cx_active: 1\n"
    assert b"upstream_rq_retry" not in _get(host, "/stats?usedonly").body
    assert _get(host, "/stats?filter=nothing").body == b""


def test_stats_bad_filter_and_format_are_400(host: FakeHost) -> None:
    r = _get(host, "/stats?filter=(")
    assert r.status == 400
    assert r.body.startswith(b"Invalid regex")
    assert _get(host, "/stats?filter=" + "a" * 2000).status == 400
    r = _get(host, "/stats?format=xml")
    assert r.status == 400
    assert b"invalid format" in r.body


def test_stats_json(host: FakeHost) -> None:
    r = _get(host, "/stats?format=json&filter=upstream_rq")
    assert r.status == 200
    assert r.content_type == "application/json"
    doc = json.loads(r.body)
    assert doc["stats"][0] == {"name": "cluster.web.upstream_rq_total", "value": 4}
    assert doc["stats"][1]["histograms"]["computed_quantiles"][0]["name"] == "cluster.web.upstream_rq_time"
    assert b"\n " not in r.body  # compact by default, as Envoy
    pretty = _get(host, "/stats?format=json&filter=upstream_rq&pretty")
    assert b'\n  "stats": [\n' in pretty.body
    assert json.loads(pretty.body) == doc


def test_prometheus(host: FakeHost) -> None:
    r = _get(host, "/stats/prometheus")
    assert r.status == 200
    assert r.content_type.startswith("text/plain; version=0.0.4")
    assert b"# TYPE microenvoy_cluster_web_upstream_rq_total counter\n" in r.body
    assert b"microenvoy_cluster_web_upstream_rq_total 4\n" in r.body
    assert _get(host, "/stats?format=prometheus").body == r.body
    assert b"upstream_rq_total" not in _get(host, "/stats/prometheus?filter=cx_active").body


def test_config_dump_and_server_info_are_json(host: FakeHost) -> None:
    r = _get(host, "/config_dump")
    assert (r.status, r.content_type) == (200, "application/json")
    assert json.loads(r.body) == {"configs": [{"@type": "bootstrap", "key": "[redacted]"}]}
    r = _get(host, "/server_info")
    assert (r.status, r.content_type) == (200, "application/json")
    assert json.loads(r.body) == {"version": "0.1.0", "state": "LIVE", "uptime": None}  # inf -> null


def test_clusters(host: FakeHost) -> None:
    r = _get(host, "/clusters")
    assert (r.status, r.body) == (200, b"web::127.0.0.1:8080::rq_total::4\n")
    r = _get(host, "/clusters?format=json")
    assert json.loads(r.body) == {"cluster_statuses": [{"name": "web"}]}


def test_listeners(host: FakeHost) -> None:
    r = _get(host, "/listeners")
    assert r.body == b"http::127.0.0.1:40001\nh3::[::1]:40002\n"
    doc = json.loads(_get(host, "/listeners?format=json").body)
    ports = [s["local_address"]["socket_address"]["port_value"] for s in doc["listener_statuses"]]
    assert ports == [40001, 40002]


@pytest.mark.parametrize(
    ("path", "call"),
    [
        ("/healthcheck/fail", ("healthcheck_fail",)),
        ("/healthcheck/ok", ("healthcheck_ok",)),
        ("/drain_listeners", ("drain_listeners", False, False)),
        ("/drain_listeners?graceful", ("drain_listeners", True, False)),
        ("/drain_listeners?graceful&inbound_only=true", ("drain_listeners", True, True)),
        ("/drain_listeners?graceful=false&inbound_only", ("drain_listeners", False, True)),
    ],
)
def test_mutating_endpoints_require_post(host: FakeHost, path: str, call: tuple[Any, ...]) -> None:
    for method in ("GET", "HEAD", "PUT", "DELETE"):
        r = _get(host, path, method)
        assert r.status == 405
        assert ("allow", "POST") in r.headers
    assert _get(host, path, "GET").body == b"Method GET not allowed, POST required.\n"
    assert host.calls == []
    r = _get(host, path, "POST")
    assert (r.status, r.body) == (200, b"OK\n")
    assert host.calls == [call]


def test_quit_runs_after_the_answer(host: FakeHost) -> None:
    assert _get(host, "/quitquitquit").status == 405
    r = _get(host, "/quitquitquit", "POST")
    assert (r.status, r.body) == (200, b"OK\n")
    assert host.calls == []  # not yet: the server calls it once the answer is written
    assert r.after is not None
    r.after()
    assert host.calls == [("quit",)]


def test_read_endpoints_reject_other_methods(host: FakeHost) -> None:
    r = _get(host, "/stats", "DELETE")
    assert r.status == 405
    assert ("allow", "GET, HEAD") in r.headers
    assert _get(host, "/stats", "HEAD").status == 200
    assert _get(host, "/stats", "get").status == 200


def test_logging_get_shows_levels_post_changes(host: FakeHost) -> None:
    r = _get(host, "/logging")
    assert r.status == 200
    assert r.body.decode().startswith("active loggers:\n  microenvoy: ")
    assert _get(host, "/logging", "POST").body == r.body  # Envoy: POST without parameters lists too
    r = _get(host, "/logging?level=debug")
    assert r.status == 405
    assert host.calls == []
    r = _get(host, "/logging?level=debug", "POST")
    assert (r.status, r.body) == (200, b"set None=debug\n")
    r = _get(host, "/logging?io=warning", "POST")
    assert r.body == b"set microenvoy.io=warning\n"
    r = _get(host, "/logging?paths=codecs:error,microenvoy.router:info", "POST")
    assert r.body == b"set microenvoy.router=info\n"
    assert host.calls[1:] == [
        ("set_log_level", "warning", "microenvoy.io"),
        ("set_log_level", "error", "microenvoy.codecs"),
        ("set_log_level", "info", "microenvoy.router"),
    ]
    assert _get(host, "/logging", "DELETE").status == 405


@pytest.mark.parametrize(
    "target", ["/logging?level=loud", "/logging?nosuchlayer=debug", "/logging?io=", "/logging?paths=io"]
)
def test_logging_bad_parameters_are_400_and_apply_nothing(host: FakeHost, target: str) -> None:
    r = _get(host, target + "&level=debug", "POST")
    assert r.status == 400
    assert r.body.startswith(b"error: ")
    assert host.calls == []


def test_host_value_error_from_set_log_level_is_400(host: FakeHost) -> None:
    host.fail_with = ValueError("nope")
    r = _get(host, "/logging?level=info", "POST")
    assert (r.status, r.body) == (400, b"error: nope\n")


def test_failing_host_is_500_not_an_exception(host: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    host.fail_with = RuntimeError("secret detail")
    for path in ("/ready", "/config_dump", "/clusters", "/listeners", "/server_info"):
        r = _get(host, path)
        assert r.status == 500
        assert r.body == b"internal error: RuntimeError\n"  # the message stays in the log
    assert _get(host, "/healthcheck/fail", "POST").status == 500
    assert any(rec.levelno == logging.ERROR for rec in caplog.records)


def test_trailing_slash_and_fragment(host: FakeHost) -> None:
    assert _get(host, "/ready/").status == 200
    assert _get(host, "/ready#frag").status == 200
    assert _get(host, "//").status == 200


def test_too_many_query_fields_is_400(host: FakeHost) -> None:
    assert _get(host, "/stats?" + "&".join(f"a{i}=1" for i in range(100))).status == 400


@given(
    method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "X", ""]) | st.text(max_size=8), target=st.text()
)
def test_any_request_gets_an_http_answer(method: str, target: str) -> None:
    h = FakeHost()
    r = handle_request(h, method, target)
    assert r.status in (200, 400, 404, 405, 503)
    assert isinstance(r.body, bytes)
    if r.after is not None:
        r.after()


@given(st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)), max_size=5))
def test_logging_query_fuzz_never_half_applies(params: list[tuple[str, str]]) -> None:
    from urllib.parse import urlencode

    h = FakeHost()
    r = handle_request(h, "POST", "/logging?" + urlencode(params))
    assert r.status in (200, 400)
    if r.status == 400:
        assert h.calls == []
